//! Random ids and names.

use rand::RngCore;

/// Appends `len` characters drawn uniformly from `alphabet` (ASCII, at
/// most 256 characters) to `into`. Random bytes are drawn a block at a
/// time; a byte maps to `alphabet[byte % alphabet.len()]`, and bytes at or
/// above the largest multiple of the alphabet's size are drawn again so
/// that every character is as likely.
fn push_random(into: &mut String, alphabet: &[u8], len: usize) {
    let limit = 256 - 256 % alphabet.len();
    let mut rng = rand::rng();
    let mut block = [0u8; 64];
    let mut left = len;
    while left > 0 {
        rng.fill_bytes(&mut block);
        for &b in block.iter().filter(|&&b| usize::from(b) < limit).take(left) {
            into.push(char::from(alphabet[usize::from(b) % alphabet.len()]));
            left -= 1;
        }
    }
}

/// A random id with a prefix, in the style of ngrok's (`ep_…`, `ts_…`,
/// `ev_…`): 27 base-62 characters, about 160 bits.
pub fn random_id(prefix: &str) -> String {
    const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut id = String::with_capacity(prefix.len() + 27);
    id.push_str(prefix);
    push_random(&mut id, BASE62, 27);
    id
}

/// A random DNS label (12 lower-case letters and digits), for endpoints
/// bound without a domain and for generated names.
pub fn random_label() -> String {
    let mut label = String::with_capacity(12);
    push_random(&mut label, b"abcdefghijklmnopqrstuvwxyz0123456789", 12);
    label
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

    #[test]
    fn every_character_is_as_likely() {
        // 540,000 characters: about 8,710 of each of the 62. Taking bytes
        // modulo 62 without drawing again would give the first eight
        // characters a fifth more than the rest; the bound is nine
        // standard deviations either way.
        let mut counts = std::collections::HashMap::<char, u32>::new();
        for _ in 0..20_000 {
            for c in random_id("ev_")[3..].chars() {
                *counts.entry(c).or_default() += 1;
            }
        }
        assert_eq!(counts.len(), 62, "{counts:?}");
        let expected = 20_000.0 * 27.0 / 62.0;
        for (c, n) in counts {
            let off = (f64::from(n) - expected).abs() / expected;
            assert!(
                off < 0.1,
                "{c:?} drawn {n} times, expected about {expected:.0}"
            );
        }
    }
}
