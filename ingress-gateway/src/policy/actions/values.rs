//! Config values that may hold `${…}` anywhere in their strings: compiled
//! once, rendered into JSON per request (`set-vars`, `log`).

use crate::policy::{Phase, cel::Template, facts::Facts};

/// A JSON value whose strings are templates.
pub(super) enum Dynamic {
    Text(Template),
    List(Vec<Dynamic>),
    Map(Vec<(String, Dynamic)>),
    Fixed(serde_json::Value),
}

impl Dynamic {
    pub fn compile(value: &serde_json::Value, phase: Phase, at: &str) -> Result<Dynamic, String> {
        Ok(match value {
            serde_json::Value::String(s) => {
                Dynamic::Text(Template::compile(s, phase).map_err(|e| format!("{at}: {e}"))?)
            }
            serde_json::Value::Array(items) => Dynamic::List(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Dynamic::compile(v, phase, &format!("{at}[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
            serde_json::Value::Object(map) => Dynamic::Map(
                map.iter()
                    .map(|(k, v)| {
                        Ok((k.clone(), Dynamic::compile(v, phase, &format!("{at}.{k}"))?))
                    })
                    .collect::<Result<_, String>>()?,
            ),
            other => Dynamic::Fixed(other.clone()),
        })
    }

    pub fn render(&self, facts: &Facts<'_>) -> Result<serde_json::Value, String> {
        Ok(match self {
            Dynamic::Text(t) => serde_json::Value::String(t.render(facts)?),
            Dynamic::List(items) => serde_json::Value::Array(
                items
                    .iter()
                    .map(|i| i.render(facts))
                    .collect::<Result<_, _>>()?,
            ),
            Dynamic::Map(entries) => serde_json::Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), v.render(facts)?)))
                    .collect::<Result<_, String>>()?,
            ),
            Dynamic::Fixed(v) => v.clone(),
        })
    }
}
