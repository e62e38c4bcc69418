//! The fuzz targets' seed corpora (`fuzz/corpus/<target>/`) as regression
//! tests: every input goes through the same entry point its fuzz target
//! drives, without a fuzzer. A crash a fuzzer finds is fixed, then added to
//! the corpus, and from then on this test keeps it fixed.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            (path.display().to_string(), std::fs::read(&path).unwrap())
        })
        .collect();
    inputs.sort();
    assert!(
        inputs.len() >= 3,
        "{target}: the corpus has {} inputs",
        inputs.len()
    );
    inputs
}

#[test]
fn proxy_header_corpus() {
    for (name, data) in corpus("proxy_header") {
        let parsed = postern_net::proxy_header::parse(&data);
        let expect_ok = name.contains("v1-tcp")
            || name.contains("v2-ip")
            || name.contains("unknown")
            || name.contains("local")
            || name.contains("tlv");
        assert_eq!(
            matches!(parsed, Ok(Some(_))),
            expect_ok,
            "{name}: {parsed:?}"
        );
    }
}

#[test]
fn tunnel_messages_corpus() {
    use postern_proto::pb;
    use prost::Message;
    for (name, data) in corpus("tunnel_messages") {
        let decoded = pb::Frame::decode(data.as_slice()).is_ok()
            || pb::AgentMessage::decode(data.as_slice()).is_ok()
            || pb::EdgeMessage::decode(data.as_slice()).is_ok();
        assert_eq!(decoded, !name.ends_with("truncated"), "{name}");
    }
}

#[test]
fn edge_config_corpus() {
    for (name, data) in corpus("edge_config") {
        let result = postern_edge::EdgeConfig::from_toml(std::str::from_utf8(&data).unwrap());
        assert_eq!(
            result.is_ok(),
            !name.ends_with("broken"),
            "{name}: {:?}",
            result.err()
        );
    }
}

#[test]
fn agent_config_corpus() {
    for (name, data) in corpus("agent_config") {
        let value = serde_yaml_ng::from_slice(&data).unwrap();
        let result = postern_agent::parse_raw(value);
        assert_eq!(
            result.is_ok(),
            name.ends_with("v2"),
            "{name}: {:?}",
            result.err()
        );
    }
}

#[test]
fn ca_bundle_corpus() {
    for (name, data) in corpus("ca_bundle") {
        let result = postern_net::parse_ca_bundle(&data);
        assert_eq!(
            result.is_ok(),
            name.ends_with("real-ca.pem"),
            "{name}: {:?}",
            result.err()
        );
    }
}

#[test]
fn acl_rules_corpus() {
    for (name, data) in corpus("acl_rules") {
        let text = String::from_utf8(data).unwrap();
        let mut lines = text.lines();
        let pattern = postern_ingress::DomainPattern::parse(lines.next().unwrap()).unwrap();
        let rules: Vec<&str> = lines.collect();
        match postern_edge::Acl::parse(&rules) {
            Ok(acl) => assert_eq!(
                acl.allows_name(&pattern),
                !name.ends_with("ports"),
                "{name}"
            ),
            Err(_) => assert!(name.ends_with("bad"), "{name}"),
        }
    }
}

#[test]
fn host_corpus() {
    for (name, data) in corpus("host") {
        let host = std::str::from_utf8(&data).unwrap();
        let result = postern_ingress::normalize_host(host);
        let expect_ok = ["upper-dot-port", "ipv6", "ipv4"]
            .iter()
            .any(|n| name.ends_with(n));
        assert_eq!(result.is_ok(), expect_ok, "{name}: {result:?}");
        if let Ok(h) = result {
            assert_eq!(
                postern_ingress::normalize_host(&h),
                Ok(h.clone()),
                "{name}: idempotent"
            );
        }
    }
}

#[test]
fn muxado_frames_corpus() {
    for (name, data) in corpus("muxado_frames") {
        let parsed = postern_proto::muxado::parse_frames(&data);
        assert_eq!(parsed.is_ok(), name.ends_with("-ok"), "{name}: {parsed:?}");
    }
}
