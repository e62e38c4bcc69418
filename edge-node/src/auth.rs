//! Authtokens: stored only as SHA-256 hashes, looked up by the hash of what
//! an agent presents, so the comparison reveals nothing through timing and a
//! leaked config or store reveals no token. SSH keys registered through the
//! admin API are looked up the same way, by the SHA-256 of the key (what
//! `ssh-keygen -l` shows as its fingerprint), and give the same kind of
//! record: an ACL and the credential it came from.

use std::{collections::HashMap, sync::RwLock};

use postern_proto::{ErrorCode, Failure};

use crate::acl::Acl;

/// Longest token accepted on the wire.
const MAX_TOKEN: usize = 512;
/// Shortest token accepted in config.
const MIN_TOKEN: usize = 8;

/// An authtoken, or its hash, that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Malformed(String),
    #[error("the token must be at least {MIN_TOKEN} characters")]
    TooShort,
    #[error("expected 64 hex characters (the token's SHA-256)")]
    NotSha256,
}

/// One authtoken's record, or an SSH key's.
#[derive(Clone, Debug)]
pub struct AuthtokenRecord {
    /// Hex SHA-256 of the token (of the key's wire form for an SSH key);
    /// also its id in logs (first 12 chars).
    pub sha256: String,
    pub acl: Acl,
    pub description: String,
    /// For a credential of the admin API: its id and owner (a bot user).
    /// Tokens of the config file have none.
    pub credential: Option<CredentialRef>,
}

/// Which API credential a token or SSH key is, and whose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialRef {
    pub id: String,
    pub owner_id: Option<String>,
}

impl CredentialRef {
    /// Whether the credential `id` is an SSH key's (by its prefix).
    pub fn is_ssh_key(id: &str) -> bool {
        id.starts_with(SSH_CREDENTIAL_PREFIX)
    }

    /// Where the admin API shows the credential `id`: `/credentials/…` or
    /// `/ssh_credentials/…`.
    pub fn uri(id: &str) -> String {
        if Self::is_ssh_key(id) {
            format!("/ssh_credentials/{id}")
        } else {
            format!("/credentials/{id}")
        }
    }
}

/// The prefix of SSH credentials' ids (ngrok's).
pub const SSH_CREDENTIAL_PREFIX: &str = "sshcr_";

fn sha256_hex(token: &str) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ))
}

impl AuthtokenRecord {
    pub fn from_token(token: &str, acl: Acl, description: String) -> Result<Self, TokenError> {
        check_shape(token).map_err(|e| TokenError::Malformed(e.detail))?;
        if token.len() < MIN_TOKEN {
            return Err(TokenError::TooShort);
        }
        Ok(AuthtokenRecord {
            sha256: sha256_hex(token),
            acl,
            description,
            credential: None,
        })
    }

    pub fn from_sha256_hex(hash: &str, acl: Acl, description: String) -> Result<Self, TokenError> {
        let hash = hash.trim().to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::NotSha256);
        }
        Ok(AuthtokenRecord {
            sha256: hash,
            acl,
            description,
            credential: None,
        })
    }

    /// The owner of a credential's token.
    pub fn owner_id(&self) -> Option<&str> {
        self.credential.as_ref()?.owner_id.as_deref()
    }

    /// Short id for logs.
    pub fn id(&self) -> &str {
        &self.sha256[..12]
    }
}

/// A token must be printable ASCII without spaces, and not huge.
fn check_shape(token: &str) -> Result<(), Failure> {
    if token.is_empty() {
        return Err(Failure::new(
            ErrorCode::AUTHTOKEN_MALFORMED,
            "no authtoken was given",
        ));
    }
    if token.len() > MAX_TOKEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Failure::new(
            ErrorCode::AUTHTOKEN_MALFORMED,
            "the authtoken must be at most 512 printable characters without spaces",
        ));
    }
    Ok(())
}

/// The known authtokens: those of the config file, and in a cluster the
/// credentials and SSH keys registered through the admin API of any node.
#[derive(Debug, Default)]
pub struct Authtokens {
    by_hash: HashMap<String, AuthtokenRecord>,
    credentials: RwLock<ApiCredentials>,
}

/// The admin API's credentials, each set by the hash it is looked up by.
#[derive(Debug, Default)]
struct ApiCredentials {
    tokens: HashMap<String, AuthtokenRecord>,
    ssh_keys: HashMap<String, AuthtokenRecord>,
}

fn by_hash(records: Vec<AuthtokenRecord>) -> HashMap<String, AuthtokenRecord> {
    records.into_iter().map(|r| (r.sha256.clone(), r)).collect()
}

impl Authtokens {
    pub fn new(records: Vec<AuthtokenRecord>) -> Self {
        Authtokens {
            by_hash: by_hash(records),
            credentials: RwLock::default(),
        }
    }

    /// Replaces the API credentials (the cluster's current set): tokens,
    /// and SSH keys by the hash of the key.
    pub fn set_credentials(&self, tokens: Vec<AuthtokenRecord>, ssh_keys: Vec<AuthtokenRecord>) {
        *self.credentials.write().expect("credentials lock") = ApiCredentials {
            tokens: by_hash(tokens),
            ssh_keys: by_hash(ssh_keys),
        };
    }

    fn lookup(&self, sha256: &str) -> Option<AuthtokenRecord> {
        self.by_hash.get(sha256).cloned().or_else(|| {
            self.credentials
                .read()
                .expect("credentials lock")
                .tokens
                .get(sha256)
                .cloned()
        })
    }

    /// Whether a session's token or SSH key (by hash) is still valid.
    pub fn knows(&self, sha256: &str) -> bool {
        self.lookup(sha256).is_some()
            || self
                .credentials
                .read()
                .expect("credentials lock")
                .ssh_keys
                .contains_key(sha256)
    }

    /// The record of a registered SSH key, by the hex SHA-256 of its wire
    /// form.
    pub fn ssh_key(&self, sha256: &str) -> Option<AuthtokenRecord> {
        self.credentials
            .read()
            .expect("credentials lock")
            .ssh_keys
            .get(sha256)
            .cloned()
    }

    /// The record for a presented token. Unknown and revoked tokens get the
    /// same answer.
    pub fn authenticate(&self, token: &str) -> Result<AuthtokenRecord, Failure> {
        check_shape(token)?;
        self.lookup(&sha256_hex(token))
            .ok_or_else(|| Failure::new(ErrorCode::AUTHTOKEN_INVALID, "the authtoken is not valid"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authenticates_by_hash() {
        let a = AuthtokenRecord::from_token("secret-token-1", Acl::default(), "a".into()).unwrap();
        let b = AuthtokenRecord::from_sha256_hex(
            &sha256_hex("secret-token-2"),
            Acl::default(),
            "b".into(),
        )
        .unwrap();
        let tokens = Authtokens::new(vec![a, b]);
        assert_eq!(
            tokens.authenticate("secret-token-1").unwrap().description,
            "a"
        );
        assert_eq!(
            tokens.authenticate("secret-token-2").unwrap().description,
            "b"
        );
        assert_eq!(
            tokens.authenticate("secret-token-3").unwrap_err().code,
            ErrorCode::AUTHTOKEN_INVALID
        );
        assert_eq!(
            tokens.authenticate("").unwrap_err().code,
            ErrorCode::AUTHTOKEN_MALFORMED
        );
        assert_eq!(
            tokens.authenticate("has space").unwrap_err().code,
            ErrorCode::AUTHTOKEN_MALFORMED
        );
        assert_eq!(
            tokens.authenticate(&"x".repeat(600)).unwrap_err().code,
            ErrorCode::AUTHTOKEN_MALFORMED
        );
    }

    #[test]
    fn credentials_are_replaced_as_a_set() {
        let tokens = Authtokens::new(Vec::new());
        let cred =
            AuthtokenRecord::from_token("api-credential-1", Acl::default(), "c".into()).unwrap();
        let hash = cred.sha256.clone();
        let key =
            AuthtokenRecord::from_sha256_hex(&"ab".repeat(32), Acl::default(), "k".into()).unwrap();
        tokens.set_credentials(vec![cred], vec![key.clone()]);
        assert!(tokens.knows(&hash));
        assert!(tokens.knows(&key.sha256), "an SSH key's session is valid");
        assert_eq!(tokens.ssh_key(&key.sha256).unwrap().description, "k");
        assert!(tokens.ssh_key(&hash).is_none(), "a token is no SSH key");
        assert_eq!(
            tokens.authenticate("api-credential-1").unwrap().description,
            "c"
        );
        tokens.set_credentials(Vec::new(), Vec::new());
        assert!(!tokens.knows(&hash), "revoked");
        assert!(!tokens.knows(&key.sha256), "revoked");
        assert_eq!(
            tokens.authenticate("api-credential-1").unwrap_err().code,
            ErrorCode::AUTHTOKEN_INVALID
        );
    }

    #[test]
    fn config_tokens_are_checked() {
        assert!(AuthtokenRecord::from_token("short", Acl::default(), String::new()).is_err());
        assert!(AuthtokenRecord::from_sha256_hex("abc", Acl::default(), String::new()).is_err());
    }
}
