//! ACME HTTP-01 answers (RFC 8555 §8.3): while the edge orders a
//! certificate, the CA fetches
//! `http://<name>/.well-known/acme-challenge/<token>` from the plain-HTTP
//! listener and must get the key authorization back. The edge's ACME
//! client puts tokens here; the gateway answers them before any routing,
//! so a name with no endpoint bound can still be validated.

use std::{collections::HashMap, sync::RwLock};

/// The path prefix HTTP-01 requests use.
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// Pending HTTP-01 tokens and their key authorizations.
#[derive(Debug, Default)]
pub struct Http01Challenges {
    tokens: RwLock<HashMap<String, String>>,
}

impl Http01Challenges {
    /// Answers `token` with `key_authorization` until [`Self::remove`].
    pub fn insert(&self, token: &str, key_authorization: &str) {
        self.tokens
            .write()
            .expect("challenge lock")
            .insert(token.to_string(), key_authorization.to_string());
    }

    pub fn remove(&self, token: &str) {
        self.tokens.write().expect("challenge lock").remove(token);
    }

    /// The key authorization for a request path, if it asks for a pending
    /// token.
    pub fn answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(HTTP01_PREFIX)?;
        self.tokens
            .read()
            .expect("challenge lock")
            .get(token)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_only_pending_tokens_under_the_prefix() {
        let challenges = Http01Challenges::default();
        challenges.insert("tok1", "tok1.thumb");
        assert_eq!(
            challenges
                .answer("/.well-known/acme-challenge/tok1")
                .as_deref(),
            Some("tok1.thumb")
        );
        assert_eq!(challenges.answer("/.well-known/acme-challenge/tok2"), None);
        assert_eq!(challenges.answer("/tok1"), None);
        challenges.remove("tok1");
        assert_eq!(challenges.answer("/.well-known/acme-challenge/tok1"), None);
    }
}
