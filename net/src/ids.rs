//! Random ids and names.

use rand::Rng;

/// `len` characters drawn uniformly from `alphabet`.
fn random_string(alphabet: &[u8], len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
        .collect()
}

/// A random id with a prefix, in the style of ngrok's (`ep_…`, `ts_…`,
/// `ev_…`): 27 base-62 characters, about 160 bits.
pub fn random_id(prefix: &str) -> String {
    const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    format!("{prefix}{}", random_string(BASE62, 27))
}

/// A random DNS label (12 lower-case letters and digits), for endpoints
/// bound without a domain and for generated names.
pub fn random_label() -> String {
    random_string(b"abcdefghijklmnopqrstuvwxyz0123456789", 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let id = random_id("ep_");
        assert_eq!(id.len(), 30);
        assert!(id.starts_with("ep_") && id[3..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(id, random_id("ep_"));
        let label = random_label();
        assert_eq!(label.len(), 12);
        assert!(
            label
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
    }
}
