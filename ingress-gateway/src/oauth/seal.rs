//! The cryptography of the OAuth module: random tokens, hashes used as
//! store keys, and [`SessionKey`], which seals what the store must not hold
//! in the clear (tokens, PKCE verifiers, IdP codes) with AES-256-GCM.

use std::fmt;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use postern_net::Secret;
use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    digest,
    rand::{SecureRandom, SystemRandom},
};

/// `n` random bytes as unpadded base64url.
pub fn random_token(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random source works");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `n` random bytes as lower-case hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random source works");
    hex(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first 128 bits of SHA-256, hex: store keys derived from bearer
/// secrets (cookies, state, codes), so a copy of the store holds nothing a
/// browser could present.
pub fn key_hash(s: &str) -> String {
    hex(&digest::digest(&digest::SHA256, s.as_bytes()).as_ref()[..16])
}

/// Constant-time comparison.
pub fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A sealed value could not be opened: wrong key, tampered or truncated.
#[derive(Debug, thiserror::Error)]
#[error("sealed data could not be opened (wrong session key or tampered)")]
pub struct Unseal;

/// The AES-256-GCM key that seals secrets kept in the session store. Every
/// node sharing a store must use the same key.
pub struct SessionKey {
    key: LessSafeKey,
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(********)")
    }
}

impl SessionKey {
    /// The key is the SHA-256 of the configured secret (as for the CA
    /// store's `key_encryption_secret`).
    pub fn from_secret(secret: &Secret) -> SessionKey {
        let digest = digest::digest(&digest::SHA256, secret.expose().as_bytes());
        let key = UnboundKey::new(&AES_256_GCM, digest.as_ref()).expect("32-byte AES key");
        SessionKey {
            key: LessSafeKey::new(key),
        }
    }

    /// A random key, for nodes whose sessions live only in their memory.
    pub fn random() -> SessionKey {
        Self::from_secret(&Secret::new(random_token(32)))
    }

    /// Seals `plain`; `purpose` is bound in as associated data, so a value
    /// sealed for one use cannot be replayed as another.
    pub fn seal(&self, purpose: &str, plain: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system random source works");
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(purpose.as_bytes()),
                &mut buf,
            )
            .expect("AES-GCM sealing does not fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        URL_SAFE_NO_PAD.encode(out)
    }

    pub fn open(&self, purpose: &str, sealed: &str) -> Result<Vec<u8>, Unseal> {
        let raw = URL_SAFE_NO_PAD.decode(sealed).map_err(|_| Unseal)?;
        if raw.len() < NONCE_LEN {
            return Err(Unseal);
        }
        let (nonce, body) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| Unseal)?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(purpose.as_bytes()), &mut body)
            .map_err(|_| Unseal)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_keys_never_print() {
        let s = Secret::new("client-secret-value");
        assert_eq!(
            format!("{:?}", SessionKey::from_secret(&s)),
            "SessionKey(********)"
        );
    }

    #[test]
    fn seal_round_trip_and_tamper() {
        let key = SessionKey::from_secret(&Secret::new("k".repeat(32)));
        let sealed = key.seal("tokens", b"access-token");
        assert_eq!(key.open("tokens", &sealed).unwrap(), b"access-token");
        assert!(key.open("state", &sealed).is_err(), "purpose is bound");
        let other = SessionKey::from_secret(&Secret::new("x".repeat(32)));
        assert!(other.open("tokens", &sealed).is_err(), "other key");
        let mut bytes = URL_SAFE_NO_PAD.decode(&sealed).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(key.open("tokens", &URL_SAFE_NO_PAD.encode(bytes)).is_err());
        assert!(key.open("tokens", "short").is_err());
        assert_ne!(sealed, key.seal("tokens", b"access-token"), "fresh nonce");
    }

    #[test]
    fn tokens_are_long_and_distinct() {
        let a = random_token(32);
        assert_eq!(a.len(), 43);
        assert_ne!(a, random_token(32));
        assert_eq!(random_hex(8).len(), 16);
        assert_eq!(key_hash("x").len(), 32);
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("ab", "abc"));
    }
}
