//! The gRPC test server and client (`tests/grpc/`, Python grpcio without
//! generated code), run as processes.

use std::{path::PathBuf, time::Duration};

use serde_json::{Value, json};
use tokio::process::Command;

use crate::{Spawned, TestEdge, free_port, python};

/// A script of `tests/grpc/`.
pub fn grpc_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("grpc")
        .join(name)
}

/// The test gRPC server on a free port, in TLS when given (cert, key) files.
pub async fn grpc_server(tls: Option<(&PathBuf, &PathBuf)>) -> (Spawned, u16) {
    let port = free_port();
    let mut command = Command::new(python());
    command.arg(grpc_script("server.py")).arg(port.to_string());
    if let Some((cert, key)) = tls {
        command.arg(cert).arg(key);
    }
    let mut server = Spawned::spawn(&mut command);
    server.wait_for_line("listening", 30).await;
    (server, port)
}

/// Runs the test client's every call against the edge's HTTPS listener as
/// `host`: what came back, to compare with [`grpc_expected`].
pub async fn grpc_client(edge: &TestEdge, host: &str) -> Value {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(python())
            .arg(grpc_script("client.py"))
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

/// What [`grpc_client`] gets when every call went through as it should.
pub fn grpc_expected() -> Value {
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
