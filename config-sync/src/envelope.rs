//! How a value travels in gossip: a signed envelope
//! `1.<base64url(payload)>.<base64url(HMAC)>`, where the payload names its
//! own key, so a valid envelope cannot be replayed under another key, and
//! the HMAC covers the cluster id too. Envelopes larger than one gossip
//! value are split into chunks under `<key>#<i>`; the key itself then holds
//! a manifest `m.<sha256>.<n>` and the reader checks the hash of the whole.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

use crate::{hlc::Hlc, key::ClusterKey};

/// Largest single gossip value; bigger envelopes are chunked.
pub(crate) const CHUNK: usize = 16 * 1024;
/// Largest envelope accepted at all.
pub(crate) const MAX_ENVELOPE: usize = 1024 * 1024;

/// What is signed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Payload {
    /// The gossip key (without chunk suffix).
    pub k: String,
    /// When it was written.
    pub h: Hlc,
    /// The node that wrote it (config) or owns it (node-scoped values).
    pub o: String,
    /// Node-scoped values: the owner's generation.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub g: u64,
    /// A tombstone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub d: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<serde_json::Value>,
}

fn is_zero(g: &u64) -> bool {
    *g == 0
}

/// Why an envelope was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    Malformed,
    BadSignature,
    /// Valid, but signed for another key than the one it is stored under.
    Misplaced,
}

fn signed_message(cluster_id: &str, payload: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(payload.len() + cluster_id.len() + 24);
    message.extend_from_slice(b"postern-config-sync/1\n");
    message.extend_from_slice(cluster_id.as_bytes());
    message.push(b'\n');
    message.extend_from_slice(payload);
    message
}

pub(crate) fn seal(key: &ClusterKey, cluster_id: &str, payload: &Payload) -> String {
    let json = serde_json::to_vec(payload).expect("payloads serialise");
    let tag = key.sign(&signed_message(cluster_id, &json));
    format!(
        "1.{}.{}",
        URL_SAFE_NO_PAD.encode(&json),
        URL_SAFE_NO_PAD.encode(tag.as_ref())
    )
}

pub(crate) fn open(
    key: &ClusterKey,
    cluster_id: &str,
    gossip_key: &str,
    envelope: &str,
) -> Result<Payload, Refusal> {
    let mut parts = envelope.split('.');
    let (Some("1"), Some(body), Some(tag), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::Malformed);
    };
    let body = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| Refusal::Malformed)?;
    let tag = URL_SAFE_NO_PAD
        .decode(tag)
        .map_err(|_| Refusal::Malformed)?;
    if !key.verify(&signed_message(cluster_id, &body), &tag) {
        return Err(Refusal::BadSignature);
    }
    let payload: Payload = serde_json::from_slice(&body).map_err(|_| Refusal::Malformed)?;
    if payload.k != gossip_key {
        return Err(Refusal::Misplaced);
    }
    Ok(payload)
}

/// The gossip values that carry `envelope` under `key`: the key itself,
/// and chunks when it is large.
pub(crate) fn split(key: &str, envelope: &str) -> Vec<(String, String)> {
    if envelope.len() <= CHUNK {
        return vec![(key.to_string(), envelope.to_string())];
    }
    let hash = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        envelope.as_bytes(),
    ));
    // Envelopes are ASCII (base64 and dots), so byte chunks are strings.
    let chunks: Vec<&[u8]> = envelope.as_bytes().chunks(CHUNK).collect();
    let mut values = vec![(key.to_string(), format!("m.{hash}.{}", chunks.len()))];
    for (i, chunk) in chunks.iter().enumerate() {
        values.push((
            chunk_key(key, i),
            String::from_utf8(chunk.to_vec()).expect("envelopes are ASCII"),
        ));
    }
    values
}

pub(crate) fn chunk_key(key: &str, i: usize) -> String {
    format!("{key}#{i}")
}

/// A manifest's hash and chunk count.
pub(crate) fn manifest(value: &str) -> Option<(&str, usize)> {
    let rest = value.strip_prefix("m.")?;
    let (hash, n) = rest.split_once('.')?;
    let n: usize = n.parse().ok()?;
    (hash.len() == 64 && n > 0 && n * CHUNK <= MAX_ENVELOPE + CHUNK).then_some((hash, n))
}

/// Joins chunks read by `get`; `None` until all are there and match.
pub(crate) fn join(
    key: &str,
    hash: &str,
    n: usize,
    get: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    let mut whole = String::new();
    for i in 0..n {
        whole.push_str(&get(&chunk_key(key, i))?);
    }
    let actual = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        whole.as_bytes(),
    ));
    (actual == hash).then_some(whole)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn key(c: char) -> ClusterKey {
        ClusterKey::from_secret(&c.to_string().repeat(40)).unwrap()
    }

    fn payload(k: &str, v: serde_json::Value) -> Payload {
        Payload {
            k: k.into(),
            h: Hlc(42 << 16),
            o: "n1".into(),
            g: 0,
            d: false,
            v: Some(v),
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let (k, wrong) = (key('a'), key('b'));
        let p = payload("c/ca/x", serde_json::json!({"pem": "…"}));
        let env = seal(&k, "c1", &p);
        assert_eq!(open(&k, "c1", "c/ca/x", &env).unwrap(), p);
        assert_eq!(
            open(&wrong, "c1", "c/ca/x", &env),
            Err(Refusal::BadSignature)
        );
        assert_eq!(open(&k, "c2", "c/ca/x", &env), Err(Refusal::BadSignature));
        assert_eq!(open(&k, "c1", "c/ca/y", &env), Err(Refusal::Misplaced));
        assert_eq!(open(&k, "c1", "c/ca/x", "garbage"), Err(Refusal::Malformed));
        let forged = seal(&wrong, "c1", &p);
        assert_eq!(
            open(&k, "c1", "c/ca/x", &forged),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn large_envelopes_are_chunked_and_joined() {
        let k = key('a');
        let big = "x".repeat(CHUNK * 3);
        let env = seal(&k, "c1", &payload("c/big/1", serde_json::json!(big)));
        let values = split("c/big/1", &env);
        assert!(values.len() >= 4);
        let map: HashMap<String, String> = values.into_iter().collect();
        let (hash, n) = manifest(&map["c/big/1"]).unwrap();
        let whole = join("c/big/1", hash, n, |k| map.get(k).cloned()).unwrap();
        assert_eq!(whole, env);
        assert!(
            join("c/big/1", hash, n, |k| (k != "c/big/1#1")
                .then(|| map[k].clone()))
            .is_none()
        );
        assert_eq!(
            split("c/small", "abc"),
            vec![("c/small".into(), "abc".into())]
        );
    }
}
