//! The cluster key: signs every gossiped value (HMAC-SHA256) and seals the
//! few that carry secrets (AES-256-GCM). Both sub-keys are derived from the
//! configured secret, which never leaves this type and prints as `********`.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::{aead, hmac};

/// Shortest secret accepted.
pub const MIN_SECRET_LEN: usize = 32;

/// The shared secret of a cluster.
#[derive(Clone)]
pub struct ClusterKey {
    master: hmac::Key,
    sign: hmac::Key,
    seal: std::sync::Arc<aead::LessSafeKey>,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(********)")
    }
}

/// Why a secret cannot be a cluster key.
#[derive(Debug, thiserror::Error)]
#[error("the cluster key must be at least {MIN_SECRET_LEN} characters (it is {0})")]
pub struct WeakKey(pub usize);

impl ClusterKey {
    /// A key from the configured secret (at least 32 characters).
    pub fn from_secret(secret: &str) -> Result<ClusterKey, WeakKey> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(WeakKey(secret.len()));
        }
        let master = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let derive = |label: &str| hmac::sign(&master, label.as_bytes());
        let sign = hmac::Key::new(
            hmac::HMAC_SHA256,
            derive("postern config-sync sign v1").as_ref(),
        );
        let seal_bytes = derive("postern config-sync seal v1");
        let seal = aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_256_GCM, seal_bytes.as_ref()).expect("32-byte key"),
        );
        Ok(ClusterKey {
            master,
            sign,
            seal: std::sync::Arc::new(seal),
        })
    }

    /// 32 bytes derived from the key for `label`, for other uses of the
    /// same secret (e.g. the seed of the cluster's internal CA).
    pub fn derive(&self, label: &str) -> [u8; 32] {
        let tag = hmac::sign(&self.master, label.as_bytes());
        tag.as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
    }

    pub(crate) fn sign(&self, message: &[u8]) -> hmac::Tag {
        hmac::sign(&self.sign, message)
    }

    pub(crate) fn verify(&self, message: &[u8], tag: &[u8]) -> bool {
        hmac::verify(&self.sign, message, tag).is_ok()
    }

    /// Encrypts `plaintext` so only holders of the cluster key can read it:
    /// base64url of nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, plaintext: &[u8]) -> String {
        let nonce: [u8; 12] = rand::random();
        let mut buf = plaintext.to_vec();
        self.seal
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::empty(),
                &mut buf,
            )
            .expect("AES-GCM sealing does not fail for in-memory inputs");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        URL_SAFE_NO_PAD.encode(out)
    }

    /// The plaintext of [`ClusterKey::seal`], or `None` when it was sealed
    /// with another key or altered.
    pub fn open(&self, sealed: &str) -> Option<Vec<u8>> {
        let mut bytes = URL_SAFE_NO_PAD.decode(sealed).ok()?;
        if bytes.len() < 12 {
            return None;
        }
        let mut rest = bytes.split_off(12);
        let nonce = aead::Nonce::try_assume_unique_for_key(&bytes).ok()?;
        let plain = self
            .seal
            .open_in_place(nonce, aead::Aad::empty(), &mut rest)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_seals_and_hides_itself() {
        assert!(ClusterKey::from_secret("short").is_err());
        let key = ClusterKey::from_secret(&"k".repeat(32)).unwrap();
        let other = ClusterKey::from_secret(&"o".repeat(32)).unwrap();
        let tag = key.sign(b"hello");
        assert!(key.verify(b"hello", tag.as_ref()));
        assert!(!other.verify(b"hello", tag.as_ref()));
        assert!(!key.verify(b"hellO", tag.as_ref()));
        let sealed = key.seal(b"secret");
        assert_eq!(key.open(&sealed).unwrap(), b"secret");
        assert!(other.open(&sealed).is_none());
        assert_eq!(format!("{key:?}"), "ClusterKey(********)");
        assert_eq!(key.derive("a"), key.derive("a"));
        assert_ne!(key.derive("a"), other.derive("a"));
    }
}
