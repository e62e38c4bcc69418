//! `set-vars`: names values (strings are `${…}` templates) as `vars.<name>`
//! for the rules after it.

use serde::Deserialize;

use super::{Built, ScratchAction, config, values::Dynamic};
use crate::policy::{
    Flow, Phase, PolicyEnv,
    cel::{Scratch, from_json},
    facts::Facts,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    vars: Vec<serde_json::Map<String, serde_json::Value>>,
}

struct SetVars(Vec<(String, Dynamic)>);

pub(super) fn build(
    value: &serde_json::Value,
    phase: Phase,
    _: &PolicyEnv,
) -> Result<Built, String> {
    let cfg: Config = config(value)?;
    let mut vars = Vec::new();
    for (i, entry) in cfg.vars.iter().enumerate() {
        let mut entries = entry.iter();
        let (Some((name, value)), None) = (entries.next(), entries.next()) else {
            return Err(format!(
                "config.vars[{i}]: each entry is a map with one name"
            ));
        };
        vars.push((
            name.clone(),
            Dynamic::compile(value, phase, &format!("config.vars[{i}].{name}"))?,
        ));
    }
    Ok(SetVars(vars).built(phase))
}

impl ScratchAction for SetVars {
    type Out = Vec<(String, cel::Value)>;

    fn compute(&self, facts: &Facts<'_>) -> Result<Self::Out, String> {
        self.0
            .iter()
            .map(|(name, value)| Ok((name.clone(), from_json(&value.render(facts)?))))
            .collect()
    }

    fn store(out: Self::Out, scratch: &mut Scratch) -> Flow {
        scratch.vars.extend(out);
        Flow::Next
    }
}
