//! `log`: adds its metadata (strings are `${…}` templates) to the event's
//! `traffic_policy.logs`.

use serde::Deserialize;

use super::{Built, ScratchAction, config, values::Dynamic};
use crate::policy::{Flow, Phase, PolicyEnv, cel::Scratch, facts::Facts};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    metadata: serde_json::Map<String, serde_json::Value>,
}

struct Log(Dynamic);

/// At most this many log entries per request or connection.
const MAX_LOGS: usize = 64;

pub(super) fn build(
    value: &serde_json::Value,
    phase: Phase,
    _: &PolicyEnv,
) -> Result<Built, String> {
    let cfg: Config = config(value)?;
    if cfg.metadata.is_empty() {
        return Err("config.metadata: at least one entry".into());
    }
    let metadata = Dynamic::compile(
        &serde_json::Value::Object(cfg.metadata),
        phase,
        "config.metadata",
    )?;
    Ok(Log(metadata).built(phase))
}

impl ScratchAction for Log {
    type Out = serde_json::Value;

    fn compute(&self, facts: &Facts<'_>) -> Result<Self::Out, String> {
        self.0.render(facts)
    }

    fn store(entry: Self::Out, scratch: &mut Scratch) -> Flow {
        if scratch.logs.len() < MAX_LOGS {
            scratch.logs.push(entry);
        }
        Flow::Next
    }
}
