//! gRPC services behind HTTPS endpoints (`upstream_protocol: http2`): a
//! real gRPC server and client (Python grpcio, no generated code) through
//! a real edge and agent — unary, server, client and bidirectional
//! streaming, an error status, an exceeded deadline, a 10 MB message,
//! trailers end to end, the gRPC status on the event — with an h2c
//! upstream and a TLS (ALPN h2) one.

use std::{path::PathBuf, time::Duration};

use postern_tests::{EVENTS_TO_FILE, HttpUpstream, Spawned, TestCa, TestEdge, free_port, python};
use serde_json::{Value, json};
use tokio::process::Command;

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("grpc")
        .join(name)
}

/// The test gRPC server on a free port, in TLS when given (cert, key) files.
async fn grpc_server(tls: Option<(&PathBuf, &PathBuf)>) -> (Spawned, u16) {
    let port = free_port();
    let mut command = Command::new(python());
    command.arg(script("server.py")).arg(port.to_string());
    if let Some((cert, key)) = tls {
        command.arg(cert).arg(key);
    }
    let mut server = Spawned::spawn(&mut command);
    server.wait_for_line("listening", 30).await;
    (server, port)
}

/// Runs the test client against the edge's HTTPS listener as `host`.
async fn grpc_client(edge: &TestEdge, host: &str) -> Value {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(python())
            .arg(script("client.py"))
            .arg(edge.addrs.https.to_string())
            .arg(host)
            .arg(edge.ca_pem())
            .output(),
    )
    .await
    .expect("the client finishes")
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn expected() -> Value {
    json!({
        "unary": "unary:hi",
        "unary_trailer": "unary",
        "server_stream": ["msg-0", "msg-1", "msg-2", "msg-3", "msg-4"],
        "client_stream": "3:6",
        "bidi": ["echo:x", "echo:y", "echo:z"],
        "fail": ["INVALID_ARGUMENT", "bad thing: nope"],
        "deadline": "DEADLINE_EXCEEDED",
        "big": [10 * 1024 * 1024, true],
    })
}

#[tokio::test]
async fn grpc_calls_of_every_kind_through_an_h2c_upstream() {
    let edge = TestEdge::start_with(EVENTS_TO_FILE).await;
    let (_server, port) = grpc_server(None).await;
    let host = "grpc.example.test";
    let (_agent, _) = edge
        .agent(&format!(
            "  grpc:\n    proto: http\n    addr: {port}\n    domain: {host}\n    upstream_protocol: http2\n"
        ))
        .await;
    assert_eq!(grpc_client(&edge, host).await, expected());

    // The event of each call carries its gRPC status: OK (0) from the
    // trailers, INVALID_ARGUMENT (3) from a trailers-only answer.
    postern_tests::eventually(10, "the calls' events", || async {
        let statuses: Vec<(String, Option<u64>)> = edge
            .file_events("events.jsonl")
            .iter()
            .map(|e| {
                (
                    e["object"]["http"]["request"]["url"]["path"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    e["object"]["postern"]["grpc_status"].as_u64(),
                )
            })
            .collect();
        let of = |method: &str| {
            statuses
                .iter()
                .find(|(url, _)| url.ends_with(method))
                .map(|(_, status)| *status)
        };
        of("/echo.Echo/Unary") == Some(Some(0))
            && of("/echo.Echo/Fail") == Some(Some(3))
            && of("/echo.Echo/Bidi") == Some(Some(0))
    })
    .await;
    for event in edge.file_events("events.jsonl") {
        postern_tests::assert_schema_valid(&event);
    }
}

#[tokio::test]
async fn grpc_through_a_tls_upstream_and_http1_upstreams_unaffected() {
    let edge = TestEdge::start().await;
    let dir = postern_tests::TempDir::new("grpc-tls");
    let ca = TestCa::root("gRPC upstream CA");
    let (cert, key) = ca.server(&["localhost"]).write(dir.path(), "grpc", &[]);
    let (_server, port) = grpc_server(Some((&cert, &key))).await;
    let upstream = HttpUpstream::start().await;
    let host = "grpc-tls.example.test";
    let (_agent, _) = edge
        .agent(&format!(
            "  grpc:\n    proto: http\n    addr: https://localhost:{port}\n    domain: {host}\n    \
             upstream_protocol: http2\n    upstream_tls_verify: false\n  \
             web:\n    proto: http\n    addr: {}\n    domain: plain.example.test\n",
            upstream.port()
        ))
        .await;
    assert_eq!(grpc_client(&edge, host).await, expected());
    let (code, _, body) = edge.fetch("plain.example.test", "/", &[]).await;
    assert_eq!((code, body.as_str()), (200, "hello from upstream"));
}
