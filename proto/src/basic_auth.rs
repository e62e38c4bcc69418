//! ngrok's `basic_auth` pairs in the form a bind carries them: the
//! password leaves the agent (or the edge's SSH ingress, which reads the
//! same flag) only as its SHA-256.

use crate::pb;

impl pb::BasicAuthCredential {
    /// Checks a `user:password` pair as ngrok does and hashes the
    /// password. The error says what is wrong and never shows the password.
    pub fn from_pair(pair: &str) -> Result<pb::BasicAuthCredential, String> {
        let Some((user, password)) = pair.split_once(':') else {
            return Err("not of the form user:password".into());
        };
        if user.is_empty() || user.chars().count() > 128 {
            return Err("the user name must be 1 to 128 characters".into());
        }
        let length = password.chars().count();
        if !(8..=128).contains(&length) {
            return Err(format!(
                "the password of {user:?} must be 8 to 128 characters, not {length} (ngrok's ERR_NGROK_360)"
            ));
        }
        if pair.chars().any(char::is_control) {
            return Err("control characters are not allowed (RFC 7617 2.1)".into());
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, password.as_bytes());
        Ok(pb::BasicAuthCredential {
            username: user.to_string(),
            password_sha256: hex::encode(digest.as_ref()),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::pb::BasicAuthCredential;

    #[test]
    fn pairs_are_checked_and_hashed() {
        let c = BasicAuthCredential::from_pair("alice:correct-horse").unwrap();
        assert_eq!(c.username, "alice");
        assert_eq!(c.password_sha256.len(), 64);
        assert!(!c.password_sha256.contains("correct"));
        for (bad, why) in [
            ("alice", "user:password"),
            (":password1", "user name"),
            ("alice:short", "8 to 128"),
            ("alice:pass\u{7}word1", "control"),
        ] {
            let e = BasicAuthCredential::from_pair(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
