//! [`Secret`]: authtokens, API keys, client secrets, passwords and keys
//! that must never reach a log line.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A secret whose `Debug` and `Display` print `********`; [`Secret::expose`]
/// is the one way to the value.
///
/// It deserialises from a plain string, so a raw config field can be a
/// `Secret` from the start. `Serialize` writes the value itself: a secret
/// gossiped to the other nodes must arrive whole; whatever is shown to
/// people is redacted before it is serialised.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("********")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("********")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_and_reads_from_a_string() {
        let s = Secret::new("client-secret-value");
        assert_eq!(format!("{s:?} {s}"), "******** ********");
        assert_eq!(s.expose(), "client-secret-value");
        #[derive(Debug, Deserialize)]
        struct Raw {
            key: Secret,
        }
        let raw: Raw = serde_json::from_str(r#"{"key": "hunter2-hunter2"}"#).unwrap();
        assert_eq!(raw.key.expose(), "hunter2-hunter2");
        assert_eq!(format!("{raw:?}"), "Raw { key: ******** }");
    }
}
