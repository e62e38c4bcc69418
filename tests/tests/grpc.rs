//! gRPC services behind HTTPS endpoints (`upstream_protocol: http2`): a
//! real gRPC server and client (Python grpcio, no generated code) through
//! a real edge and agent — unary, server, client and bidirectional
//! streaming, an error status, an exceeded deadline, a 10 MB message,
//! trailers end to end, the gRPC status on the event — with an h2c
//! upstream and a TLS (ALPN h2) one; and the agent's inspector on such a
//! tunnel.

use std::net::SocketAddr;

use base64::Engine;
use postern_tests::{
    EVENTS_TO_FILE, HttpUpstream, Spawned, TestCa, TestEdge, grpc_client, grpc_expected,
    grpc_script, grpc_server, python,
};
use serde_json::{Value, json};
use tokio::{io::AsyncWriteExt, process::Command};

/// An HTTPS endpoint on `host` whose upstream on `port` speaks h2c.
fn h2c_tunnel(port: u16, host: &str) -> String {
    format!(
        "  grpc:\n    proto: http\n    addr: {port}\n    domain: {host}\n    upstream_protocol: http2\n"
    )
}

#[tokio::test]
async fn grpc_calls_of_every_kind_through_an_h2c_upstream() {
    let edge = TestEdge::start_with(EVENTS_TO_FILE).await;
    let (_server, port) = grpc_server(None).await;
    let host = "grpc.example.test";
    let (_agent, _) = edge.agent(&h2c_tunnel(port, host)).await;
    assert_eq!(grpc_client(&edge, host).await, grpc_expected());

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

/// The HTTP/2 upstream connection stays open between calls, for the next
/// visitor; a drain does not wait for it to time out: the pool lets go of
/// it and it closes once idle, well within the drain grace.
#[tokio::test]
async fn an_idle_http2_upstream_connection_does_not_hold_up_a_drain() {
    let mut edge = TestEdge::start().await;
    let (_server, port) = grpc_server(None).await;
    let host = "grpc.example.test";
    let (_agent, _) = edge.agent(&h2c_tunnel(port, host)).await;
    assert_eq!(grpc_client(&edge, host).await, grpc_expected());
    let drained = edge.stop().await.expect("an in-process edge");
    assert!(
        drained.within_grace,
        "the drain waited out its grace for an idle upstream connection"
    );
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
    assert_eq!(grpc_client(&edge, host).await, grpc_expected());
    let (code, _, body) = edge.fetch("plain.example.test", "/", &[]).await;
    assert_eq!((code, body.as_str()), (200, "hello from upstream"));
}

/// The agent API's answer to `method path` (with a JSON body when given):
/// the status and the JSON (`Null` when there is none).
async fn api_call(api: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let url = format!("http://{api}{path}");
    let data = body.map(Value::to_string);
    let mut args = vec!["-X", method, "-w", "\n%{http_code}", &url];
    if let Some(data) = &data {
        args.extend([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            data,
        ]);
    }
    let out = postern_tests::curl(&args).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, code) = text.rsplit_once('\n').expect("curl wrote the status");
    (
        code.parse().expect("an HTTP status"),
        serde_json::from_str(json).unwrap_or(Value::Null),
    )
}

/// The captures, newest first.
async fn captures(api: SocketAddr) -> Vec<Value> {
    let (code, list) = api_call(api, "GET", "/api/requests/http?limit=1000", None).await;
    assert_eq!(code, 200, "{list}");
    list["requests"].as_array().cloned().unwrap_or_default()
}

/// The newest capture of `path`.
fn newest<'a>(captures: &'a [Value], path: &str) -> Option<&'a Value> {
    captures.iter().find(|c| c["request"]["uri"] == path)
}

/// Polls the captures until `done` holds for them, for at most 10 s.
async fn captured_until(
    api: SocketAddr,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let found = std::sync::Mutex::new(Vec::new());
    postern_tests::eventually(10, what, || async {
        let list = captures(api).await;
        let ok = done(&list);
        *found.lock().unwrap() = list;
        ok
    })
    .await;
    found.into_inner().unwrap()
}

/// Asks the agent to replay the capture `id`.
async fn replay(api: SocketAddr, id: &Value) -> (u16, Value) {
    api_call(
        api,
        "POST",
        "/api/requests/http",
        Some(&json!({ "id": id })),
    )
    .await
}

/// A replay of `id` is refused because its request was not captured whole.
async fn assert_replay_refused(api: SocketAddr, id: &Value) {
    let (code, refused) = replay(api, id).await;
    assert_eq!(code, 400, "{refused}");
    let err = refused["details"]["err"].as_str().unwrap_or_default();
    assert!(err.contains("the captured body is incomplete"), "{refused}");
}

fn body_text(message: &Value) -> String {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(message["raw"].as_str().expect("raw"))
        .expect("raw is base64");
    String::from_utf8_lossy(&raw).into_owned()
}

/// The agent's inspector on an HTTP/2 (h2c) tunnel: every call of the
/// suite behaves as without it and is captured with its gRPC status and
/// trailers (a 10 MB message only as its first 256 KiB); a bidirectional
/// call goes back and forth message by message while the inspector already
/// shows it, still streaming; a unary call replays, an unfinished or
/// truncated one is refused; an HTTP/1.1 tunnel on the same agent is still
/// captured.
#[tokio::test]
async fn the_inspector_captures_grpc_calls_and_streams_stay_streams() {
    let edge = TestEdge::start().await;
    let (_server, port) = grpc_server(None).await;
    let upstream = HttpUpstream::start().await;
    let host = "grpc-inspect.example.test";
    let (_agent, api, _) = edge
        .agent_with_api(
            "",
            &format!(
                "  grpc:\n    proto: http\n    addr: {port}\n    domain: {host}\n    \
                 upstream_protocol: http2\n  \
                 web:\n    proto: http\n    addr: {}\n    domain: plain-inspect.example.test\n",
                upstream.port()
            ),
        )
        .await;
    assert_eq!(grpc_client(&edge, host).await, grpc_expected());

    let statuses = [
        "/echo.Echo/Unary",
        "/echo.Echo/Fail",
        "/echo.Echo/ServerStream",
        "/echo.Echo/Bidi",
        "/echo.Echo/ClientStream",
        "/echo.Echo/Big",
    ];
    let list = captured_until(api, "every call's gRPC status", |list| {
        statuses
            .iter()
            .all(|path| newest(list, path).is_some_and(|c| c["response"]["grpc_status"].is_u64()))
    })
    .await;
    let unary = newest(&list, "/echo.Echo/Unary").unwrap();
    assert_eq!(unary["tunnel_name"], "grpc");
    assert_eq!(unary["request"]["method"], "POST");
    assert_eq!(unary["request"]["proto"], "HTTP/2.0");
    assert_eq!(unary["request"]["headers"]["Host"], json!([host]));
    assert_eq!(
        unary["request"]["headers"]["Content-Type"],
        json!(["application/grpc"])
    );
    assert_eq!(
        unary["request"]["body"]["size"], 7,
        "a 5-byte prefix and \"hi\""
    );
    assert_eq!(unary["response"]["status_code"], 200);
    assert_eq!(unary["response"]["proto"], "HTTP/2.0");
    assert_eq!(unary["response"]["grpc_status"], 0);
    assert_eq!(unary["response"]["trailers"]["X-Served"], json!(["unary"]));
    assert_eq!(unary["response"]["trailers"]["Grpc-Status"], json!(["0"]));
    assert_eq!(unary["response"]["body"]["state"], "complete");
    assert!(body_text(&unary["response"]).ends_with("unary:hi"));
    assert!(unary["duration"].as_u64().unwrap() > 0);

    let fail = newest(&list, "/echo.Echo/Fail").unwrap();
    assert_eq!(fail["response"]["grpc_status"], 3, "INVALID_ARGUMENT");
    assert_eq!(fail["response"]["grpc_message"], "bad thing: nope");
    let stream = newest(&list, "/echo.Echo/ServerStream").unwrap();
    assert_eq!(stream["response"]["grpc_status"], 0);
    assert_eq!(
        stream["response"]["body"]["size"],
        5 * (5 + 5),
        "five framed messages"
    );
    let big = newest(&list, "/echo.Echo/Big").unwrap();
    assert_eq!(big["request"]["body"]["size"], 10 * 1024 * 1024 + 5);
    assert_eq!(big["request"]["body"]["captured"], 256 * 1024);
    assert_eq!(big["request"]["body"]["truncated"], true);
    assert_eq!(big["response"]["body"]["size"], 10 * 1024 * 1024 + 5);

    // Message by message: the second goes only once the first came back,
    // and meanwhile the inspector shows the call with both bodies open.
    let mut command = Command::new(python());
    command
        .arg(grpc_script("client.py"))
        .arg(edge.addrs.https.to_string())
        .arg(host)
        .arg(edge.ca_pem())
        .arg("pingpong")
        .stdin(std::process::Stdio::piped());
    let mut pingpong = Spawned::spawn(&mut command);
    pingpong.wait_for_line("first echo:1", 30).await;
    let list = captured_until(api, "the call in flight", |list| {
        newest(list, "/echo.Echo/Bidi")
            .is_some_and(|c| c["response"]["body"]["state"] == "streaming")
    })
    .await;
    let in_flight = newest(&list, "/echo.Echo/Bidi").unwrap().clone();
    assert_eq!(in_flight["request"]["body"]["state"], "streaming");
    assert_eq!(in_flight["response"]["status_code"], 200);
    assert_replay_refused(api, &in_flight["id"]).await;
    let mut stdin = pingpong.child.stdin.take().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    let done = pingpong.wait_for_line("done", 30).await;
    assert_eq!(done, r#"done ["echo:2"]"#);
    captured_until(api, "the call's end", |list| {
        list.iter().any(|c| {
            c["id"] == in_flight["id"]
                && c["response"]["grpc_status"] == 0
                && c["response"]["body"]["state"] == "complete"
        })
    })
    .await;

    // A unary call replays from the agent, over HTTP/2 with its trailers;
    // a call whose request the capture holds only in part does not.
    let (code, answer) = replay(api, &unary["id"]).await;
    assert_eq!(code, 204, "{answer}");
    let list = captured_until(api, "the replay", |list| {
        list.iter()
            .any(|c| c["replay_of"] == unary["id"] && c["response"]["grpc_status"] == 0)
    })
    .await;
    let replayed = list.iter().find(|c| c["replay_of"] == unary["id"]).unwrap();
    assert_eq!(replayed["request"]["proto"], "HTTP/2.0");
    assert_eq!(
        replayed["response"]["trailers"]["X-Served"],
        json!(["unary"])
    );
    assert!(body_text(&replayed["response"]).ends_with("unary:hi"));
    assert_replay_refused(api, &big["id"]).await;

    // The HTTP/1.1 tunnel on the same agent is inspected as before.
    let (code, _, body) = edge
        .fetch("plain-inspect.example.test", "/plain", &[])
        .await;
    assert_eq!((code, body.as_str()), (200, "hello from upstream"));
    let list = captured_until(api, "the HTTP/1.1 request", |list| {
        newest(list, "/plain").is_some()
    })
    .await;
    let plain = newest(&list, "/plain").unwrap();
    assert_eq!(plain["tunnel_name"], "web");
    assert_eq!(plain["request"]["proto"], "HTTP/1.1");
    assert_eq!(plain["response"]["status_code"], 200);
}
