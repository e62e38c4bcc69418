//! The agent API and the request inspector end to end: every route with its
//! errors, tunnels started and stopped at run time (and bound again after a
//! reconnect), captured requests and replays, the API reached through its
//! own tunnel by the real `postern` binary (the site-to-site guide's flow),
//! and the inspector page in a real headless Chromium.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use postern_agent::Agent;
use postern_tests::{
    ACL_TOKEN, HttpUpstream, HttpsClient, Spawned, TempDir, TestCa, TestEdge, binary, curl,
    free_port, read_rss_kib, stream_each_way, url_of, websocket_echo,
};
use serde_json::{Value, json};
use tokio::{net::TcpStream, process::Command};

fn http_tunnel(name: &str, domain: &str, port: u16) -> String {
    format!("  {name}:\n    proto: http\n    addr: {port}\n    domain: {domain}\n")
}

/// An API answer: status, headers and the JSON body (`Null` when empty).
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    json: Value,
}

impl Answer {
    /// The error object's `details.err`.
    fn err(&self) -> String {
        self.json["details"]["err"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// One call to the API at `addr`, with `Host: 127.0.0.1:<port>` unless
/// `headers` gives one.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Answer {
    let tcp = TcpStream::connect(addr).await.expect("the API accepts");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", addr.to_string());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
        .unwrap();
    let response = sender.send_request(req).await.expect("an answer");
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = if bytes.is_empty()
        || parts
            .headers
            .get("content-type")
            .is_some_and(|t| t != "application/json")
    {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {bytes:?}"))
    };
    Answer {
        status: parts.status,
        headers: parts.headers,
        json,
    }
}

/// GETs `path` until `done` holds for its JSON, for at most 10 s.
async fn poll_until(
    api: SocketAddr,
    path: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = get(api, path).await.json;
        if done(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    call(addr, "GET", path, None, &[]).await
}

async fn post(addr: SocketAddr, path: &str, body: &str) -> Answer {
    call(addr, "POST", path, Some(body), &[]).await
}

async fn delete(addr: SocketAddr, path: &str) -> Answer {
    call(addr, "DELETE", path, None, &[]).await
}

/// Asserts an ngrok-style error object with this status, naming `want`.
fn assert_error(a: &Answer, status: u16, want: &str) {
    assert_eq!(a.status, status, "{}", a.json);
    assert_eq!(a.json["status_code"], status, "{}", a.json);
    assert!(a.json["error_code"].is_u64(), "{}", a.json);
    assert!(a.json["msg"].is_string(), "{}", a.json);
    assert!(a.err().contains(want), "{want:?} not in {}", a.json);
}

#[tokio::test]
async fn tunnel_routes_start_show_and_stop_tunnels_and_name_their_errors() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (_agent, api, _) = edge
        .agent_with_api("", &http_tunnel("web", "web.example.test", upstream.port()))
        .await;
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());

    let list = get(api, "/api/tunnels").await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json["uri"], "/api/tunnels");
    let web = &list.json["tunnels"][0];
    assert_eq!(web["name"], "web");
    assert_eq!(web["uri"], "/api/tunnels/web");
    assert_eq!(web["proto"], "https");
    assert!(
        web["public_url"]
            .as_str()
            .unwrap()
            .starts_with("https://web.example.test:"),
        "{web}"
    );
    assert_eq!(
        web["config"]["addr"],
        format!("http://localhost:{}", upstream.port())
    );
    assert_eq!(web["config"]["inspect"], true);

    // Start a tunnel at run time: 201 and a Tunnel object, and it serves.
    let body = json!({
        "name": "second", "proto": "http", "addr": upstream.port().to_string(),
        "domain": "second.example.test", "inspect": false,
    })
    .to_string();
    let started = post(api, "/api/tunnels", &body).await;
    assert_eq!(started.status, 201, "{}", started.json);
    assert_eq!(started.json["name"], "second");
    assert_eq!(started.json["config"]["inspect"], false);
    assert_eq!(started.headers["location"], "/api/tunnels/second");
    assert!(
        started.json["public_url"]
            .as_str()
            .unwrap()
            .contains("second.example.test"),
        "{}",
        started.json
    );
    let r = client.get("second.example.test", "/hi").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello from upstream");
    let one = get(api, "/api/tunnels/second").await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json["name"], "second");
    assert_eq!(one.json["origin"], "api");
    assert_eq!(one.json["metrics"]["conns"]["count"], 1);
    assert_eq!(
        get(api, "/api/tunnels").await.json["tunnels"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Errors, each naming what is wrong.
    assert_error(
        &post(api, "/api/tunnels", &body).await,
        409,
        "already running",
    );
    assert_error(
        &post(api, "/api/tunnels", "{\"name\": ").await,
        400,
        "not valid JSON",
    );
    assert_error(&post(api, "/api/tunnels", "[1]").await, 400, "JSON object");
    assert_error(
        &post(
            api,
            "/api/tunnels",
            r#"{"name":"x","proto":"http","addr":"1","colour":"red"}"#,
        )
        .await,
        400,
        "colour",
    );
    assert_error(
        &post(api, "/api/tunnels", r#"{"proto":"http","addr":"1"}"#).await,
        400,
        "name",
    );
    assert_error(
        &post(
            api,
            "/api/tunnels",
            r#"{"name":"x","proto":"udp","addr":"1"}"#,
        )
        .await,
        400,
        "proto",
    );
    assert_error(
        &post(
            api,
            "/api/tunnels",
            r#"{"name":"x","proto":"tls","addr":"1","terminate_at":"agent"}"#,
        )
        .await,
        400,
        "crt and key",
    );
    // The edge refuses a bad domain: 502 with the edge's code.
    let refused = post(
        api,
        "/api/tunnels",
        r#"{"name":"bad","proto":"http","addr":"1","domain":"bad_domain!"}"#,
    )
    .await;
    assert_error(&refused, 502, "ERR_POSTERN_326");
    assert_error(&get(api, "/api/tunnels/bad").await, 404, "bad");

    // Stop it: 204, then the edge no longer routes its domain.
    assert_eq!(delete(api, "/api/tunnels/second").await.status, 204);
    let refused = client.get("second.example.test", "/hi").await.unwrap_err();
    assert!(
        format!("{refused:#}").contains("UnrecognisedName"),
        "no certificate for a name without a route: {refused:#}"
    );
    let http = edge.addrs.http.unwrap();
    let out = curl(&[
        "-i",
        "-H",
        "Host: second.example.test",
        &format!("http://{http}/hi"),
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 404"), "{text}");
    assert!(text.contains("err_postern_3200"), "{text}");
    assert_error(&get(api, "/api/tunnels/second").await, 404, "second");
    assert_error(&delete(api, "/api/tunnels/second").await, 404, "second");
    assert_error(&get(api, "/api/nope").await, 404, "/api/nope");
    assert_error(
        &call(api, "PUT", "/api/tunnels", None, &[]).await,
        405,
        "GET, POST",
    );
    // Stopping a config tunnel works too.
    assert_eq!(delete(api, "/api/tunnels/web").await.status, 204);
    assert!(client.get("web.example.test", "/").await.is_err());
    assert_eq!(
        get(api, "/api/tunnels").await.json["tunnels"],
        json!([]),
        "no tunnel left"
    );
}

#[tokio::test]
async fn requests_are_captured_listed_replayed_and_cleared() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let port = upstream.port();
    let tunnels = format!(
        "{}{}    inspect: false\n",
        http_tunnel("web", "web.example.test", port),
        http_tunnel("raw", "raw.example.test", port),
    );
    let (_agent, api, _) = edge.agent_with_api("", &tunnels).await;
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    let payload = r#"{"greeting":"hello","n":1}"#;
    let r = client
        .request(
            "web.example.test",
            "POST",
            "/echo?x=1",
            Bytes::from(payload),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        client.get("raw.example.test", "/n").await.unwrap().status,
        200
    );

    let list = poll_until(api, "/api/requests/http", "the capture's response", |l| {
        l["requests"][0]["response"]["body"]["state"] == "complete"
    })
    .await;
    assert_eq!(list["uri"], "/api/requests/http");
    let requests = list["requests"].as_array().unwrap();
    assert_eq!(
        requests.len(),
        1,
        "the inspect: false tunnel is not captured: {list}"
    );
    let c = &requests[0];
    let id = c["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("airt_"), "{id}");
    assert_eq!(c["uri"], format!("/api/requests/http/{id}"));
    assert_eq!(c["tunnel_name"], "web");
    assert_eq!(c["remote_addr"], "127.0.0.1");
    assert!(c["start"].as_str().unwrap().ends_with('Z'));
    assert!(c["duration"].as_u64().unwrap() > 0);
    assert_eq!(c["request"]["method"], "POST");
    assert_eq!(c["request"]["uri"], "/echo?x=1");
    assert_eq!(c["request"]["proto"], "HTTP/1.1");
    assert_eq!(c["request"]["headers"]["X-Forwarded-Proto"][0], "https");
    assert_eq!(c["request"]["body"]["size"], payload.len());
    assert_eq!(c["request"]["body"]["truncated"], false);
    assert!(c["request"]["raw"].as_str().unwrap().len() > payload.len());
    assert_eq!(c["response"]["status_code"], 200);
    assert_eq!(c["response"]["status"], "200 OK");
    assert_eq!(
        c["response"]["body"]["size"].as_u64().unwrap(),
        r.body.len() as u64
    );

    // Filters and limits.
    let none = get(api, "/api/requests/http?tunnel_name=raw").await;
    assert_eq!(none.json["requests"].as_array().unwrap().len(), 0);
    assert_error(
        &get(api, "/api/requests/http?limit=abc").await,
        400,
        "limit",
    );
    let one = get(api, &format!("/api/requests/http/{id}")).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json["id"], id.as_str());
    assert_error(
        &get(api, "/api/requests/http/airt_nope").await,
        404,
        "airt_nope",
    );

    // Replay: 204, the upstream sees the request again, and the replay is
    // captured as a new request.
    let before = upstream
        .requests()
        .iter()
        .filter(|r| r.path == "/echo")
        .count();
    let replayed = post(api, "/api/requests/http", &json!({ "id": id }).to_string()).await;
    assert_eq!(replayed.status, 204);
    let location = replayed.headers["location"].to_str().unwrap().to_string();
    assert_eq!(
        upstream
            .requests()
            .iter()
            .filter(|r| r.path == "/echo")
            .count(),
        before + 1
    );
    let again = get(api, &location).await.json;
    assert_eq!(again["replay_of"], id.as_str());
    assert_eq!(again["request"]["body"]["size"], payload.len());
    assert_eq!(again["response"]["status_code"], 200);

    // Replay with edits, to another tunnel's upstream.
    let edited = json!({
        "id": id, "tunnel_name": "raw", "method": "PUT", "uri": "/echo?edited=1",
        "headers": { "X-Edited": ["yes"], "Host": ["web.example.test"] },
        "body": "{\"greeting\":\"edited\"}",
    });
    assert_eq!(
        post(api, "/api/requests/http", &edited.to_string())
            .await
            .status,
        204
    );
    let seen = upstream.last("/echo");
    assert_eq!(seen.method, "PUT");
    assert_eq!(seen.headers["x-edited"], "yes");
    assert_eq!(seen.headers["content-length"], "21");

    // Replay errors.
    assert_error(
        &post(api, "/api/requests/http", r#"{"id":"airt_nope"}"#).await,
        404,
        "airt_nope",
    );
    assert_error(
        &post(
            api,
            "/api/requests/http",
            &format!(r#"{{"id":"{id}","colour":1}}"#),
        )
        .await,
        400,
        "colour",
    );
    assert_error(
        &post(api, "/api/requests/http", "not json").await,
        400,
        "expected",
    );
    assert_error(
        &post(
            api,
            "/api/requests/http",
            &format!(r#"{{"id":"{id}","tunnel_name":"gone"}}"#),
        )
        .await,
        404,
        "gone",
    );
    assert_error(
        &post(
            api,
            "/api/requests/http",
            &format!(r#"{{"id":"{id}","uri":"http://x/"}}"#),
        )
        .await,
        400,
        "uri",
    );

    // Clear.
    assert_eq!(delete(api, "/api/requests/http").await.status, 204);
    let empty = get(api, "/api/requests/http").await;
    assert_eq!(empty.json["requests"].as_array().unwrap().len(), 0);
    assert_error(
        &call(api, "PATCH", "/api/requests/http", None, &[]).await,
        405,
        "GET, POST, DELETE",
    );
}

#[tokio::test]
async fn status_reports_the_session_latency_and_per_tunnel_counters() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (_agent, api, status) = edge
        .agent_with_api("", &http_tunnel("web", "web.example.test", upstream.port()))
        .await;
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    for i in 0..3 {
        let r = client
            .get("web.example.test", &format!("/bytes/{}", 1000 * (i + 1)))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let s = poll_until(api, "/api/status", "the first heartbeat round trip", |s| {
        s["session"]["legs"][0]["latency"].is_u64()
    })
    .await;
    assert_eq!(s["status"], "online");
    assert_eq!(s["uri"], "/api/status");
    assert_eq!(s["session"]["id"], status.session_id.as_str());
    assert_eq!(s["session"]["region"], "us");
    assert_eq!(s["session"]["node"], "test-edge");
    assert_eq!(s["session"]["reconnects"], 0);
    assert!(s["session"]["legs"][0]["latency"].as_u64().unwrap() > 0);
    let web = &s["tunnels"][0];
    assert_eq!(web["name"], "web");
    let m = &web["metrics"];
    assert!(m["conns"]["count"].as_u64().unwrap() >= 1, "{web}");
    assert_eq!(m["http"]["count"], 3, "{web}");
    assert!(m["bytes"]["out"].as_u64().unwrap() >= 6000, "{web}");
    assert!(m["bytes"]["in"].as_u64().unwrap() > 0, "{web}");
    assert_error(&post(api, "/api/status", "").await, 405, "GET");
}

#[tokio::test]
async fn api_tunnels_are_bound_again_after_a_reconnect() {
    let mut edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (agent, api, _) = edge
        .agent_with_api("", &http_tunnel("web", "web.example.test", upstream.port()))
        .await;
    let body = json!({"name": "late", "proto": "http", "addr": upstream.port(), "domain": "late.example.test"});
    assert_eq!(
        post(api, "/api/tunnels", &body.to_string()).await.status,
        201
    );
    edge.restart().await;
    let mut status = agent.status();
    tokio::time::timeout(
        Duration::from_secs(20),
        status.wait_for(|s| s.online && s.reconnects >= 1 && s.tunnels.len() == 2),
    )
    .await
    .expect("both tunnels are bound again after the reconnect")
    .unwrap();
    assert!(url_of(&status.borrow(), "late").contains("late.example.test"));
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    assert_eq!(
        client.get("late.example.test", "/").await.unwrap().status,
        200
    );
    let s = get(api, "/api/status").await.json;
    assert!(s["session"]["reconnects"].as_u64().unwrap() >= 1, "{s}");
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn host_allow_list_credentials_and_cross_site_writes() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let tunnels = http_tunnel("web", "web.example.test", upstream.port());
    let (_open, api, _) = edge
        .agent_with_api("web_allow_hosts: [\".corp.example\"]\n", &tunnels)
        .await;
    let host = |h: &'static str| [("host", h)];
    assert_eq!(
        call(api, "GET", "/api/tunnels", None, &host("localhost:4040"))
            .await
            .status,
        200
    );
    assert_eq!(
        call(api, "GET", "/api/tunnels", None, &host("box.corp.example"))
            .await
            .status,
        200
    );
    assert_error(
        &call(api, "GET", "/api/tunnels", None, &host("evil.example")).await,
        403,
        "web_allow_hosts",
    );
    // A browser page from another site may read nothing it can use, and
    // change nothing.
    let cross = call(
        api,
        "DELETE",
        "/api/requests/http",
        None,
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_error(&cross, 403, "Origin");

    let basic = "web_auth:\n  basic: \"admin:s3cret-pass\"\n";
    let (_basic, api, _) = edge.agent_with_api(basic, "").await;
    let denied = get(api, "/api/tunnels").await;
    assert_error(&denied, 401, "web_auth");
    assert!(
        denied.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic"),
        "browsers ask for basic credentials"
    );
    // admin:s3cret-pass
    let good = [("authorization", "Basic YWRtaW46czNjcmV0LXBhc3M=")];
    assert_eq!(
        call(api, "GET", "/api/tunnels", None, &good).await.status,
        200
    );
    assert_eq!(call(api, "GET", "/", None, &good).await.status, 200);

    let bearer = "web_auth:\n  bearer_token: tok-0123456789abcdef\n";
    let (_bearer, api, _) = edge.agent_with_api(bearer, "").await;
    assert_error(&get(api, "/api/status").await, 401, "web_auth");
    let wrong = [("authorization", "Bearer tok-wrong")];
    assert_error(
        &call(api, "GET", "/api/status", None, &wrong).await,
        401,
        "web_auth",
    );
    let right = [("authorization", "Bearer tok-0123456789abcdef")];
    assert_eq!(
        call(api, "GET", "/api/status", None, &right).await.status,
        200
    );
}

#[tokio::test]
async fn inspection_off_and_api_off() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let tunnels = http_tunnel("web", "web.example.test", upstream.port());
    let (_agent, api, _) = edge.agent_with_api("inspect_db_size: -1\n", &tunnels).await;
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    assert_eq!(
        client.get("web.example.test", "/").await.unwrap().status,
        200
    );
    let list = get(api, "/api/requests/http").await;
    assert_eq!(list.json["requests"].as_array().unwrap().len(), 0);
    assert_eq!(
        get(api, "/api/tunnels/web").await.json["config"]["inspect"],
        false
    );
    assert_error(
        &get(api, "/api/requests/http/airt_x").await,
        404,
        "inspection is off",
    );

    let yaml = format!(
        "web_addr: false\n{}",
        edge.agent_yaml(
            &edge.token,
            &http_tunnel("w2", "w2.example.test", upstream.port())
        )
    );
    let config = postern_agent::parse_raw(serde_yaml_ng::from_str(&yaml).unwrap())
        .and_then(|raw| raw.validate(None))
        .unwrap();
    let agent = Agent::start(config);
    assert_eq!(agent.web_addr(), None);
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn websocket_upgrades_work_through_the_inspector_and_are_captured() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (_agent, api, _) = edge
        .agent_with_api("", &http_tunnel("ws", "ws.example.test", upstream.port()))
        .await;
    let mut ws = websocket_echo(edge.addrs.https, &edge.ca_pem(), "ws.example.test").await;
    let list = get(api, "/api/requests/http").await.json;
    assert_eq!(list["requests"][0]["request"]["uri"], "/ws");
    assert_eq!(list["requests"][0]["response"]["status_code"], 101);
    let gauge = get(api, "/api/tunnels/ws").await.json["metrics"]["conns"]["gauge"].clone();
    assert_eq!(gauge, 1, "the upgraded connection is still open");
    ws.close(None).await.unwrap();
}

/// Writes a server certificate for `names` and its CA, and a client
/// certificate from another CA, for the passthrough tunnel.
struct Pki {
    crt: PathBuf,
    key: PathBuf,
    server_ca: PathBuf,
    client_ca: PathBuf,
    client_crt: PathBuf,
    client_key: PathBuf,
}

fn pki(dir: &Path, names: &[&str]) -> Pki {
    let server_ca = TestCa::root("customer1 server CA");
    let (crt, key) = server_ca.server(names).write(dir, "server", &[]);
    let client_ca = TestCa::root("customer1 client CA");
    let (client_crt, client_key) =
        client_ca
            .client("partner", &[], &[], (-1, 30))
            .write(dir, "client", &[]);
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    Pki {
        crt,
        key,
        server_ca: write("server-ca.pem", &server_ca.pem),
        client_ca: write("client-ca.pem", &client_ca.pem),
        client_crt,
        client_key,
    }
}

/// The site-to-site guide with the real binary: the agent API is exposed
/// through its own tunnel, and a remote operator starts and stops a TLS
/// tunnel terminated (with mutual TLS) at the agent.
#[tokio::test]
async fn site_to_site_the_api_through_its_own_tunnel_starts_and_stops_a_tls_tunnel() {
    let edge = TestEdge::start().await;
    let service = HttpUpstream::start().await;
    let dir = TempDir::new("site-to-site");
    let web_port = free_port();
    // The customer's own config, and the file we give them; merged.
    let customer = dir.path().join("customer.yml");
    std::fs::write(
        &customer,
        format!(
            "version: \"2\"\nauthtoken: {ACL_TOKEN}\nserver_addr: {agent}\ntls_server_name: tunnel.us.connect.example.test\n\
             root_cas: {ca}\nweb_addr: 127.0.0.1:1\ntunnels:\n  their-app:\n    proto: http\n    addr: 9\n",
            agent = edge.addrs.agent,
            ca = edge.ca_pem().display(),
        ),
    )
    .unwrap();
    let ours = dir.path().join("postern.yml");
    std::fs::write(
        &ours,
        format!(
            "web_addr: 127.0.0.1:{web_port}\ntunnels:\n  agent-api:\n    proto: http\n    domain: agent.customer1.example.test\n    addr: {web_port}\n    inspect: false\n"
        ),
    )
    .unwrap();
    let mut agent = Spawned::spawn(
        Command::new(binary("postern"))
            .args(["start", "agent-api", "--config"])
            .arg(&customer)
            .arg("--config")
            .arg(&ours),
    );
    let line = agent
        .wait_for_line("agent.customer1.example.test", 20)
        .await;
    assert!(line.contains("Forwarding"), "{line}");
    let web_line = agent.wait_for_line("Web Interface", 5).await;
    assert!(
        web_line.contains(&format!("127.0.0.1:{web_port}")),
        "{web_line}"
    );

    // The operator's side: curl to the agent API through the edge.
    let edge_ca = edge.ca_pem().display().to_string();
    let resolve_api = edge.resolve("agent.customer1.example.test");
    let api_url = |path: &str| edge.https_url("agent.customer1.example.test", path);
    let operator = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&args).await
    };
    let certs = pki(dir.path(), &["api.customer1.example.test"]);
    let start = json!({
        "name": "passthrough", "proto": "tls", "terminate_at": "agent",
        "addr": service.port().to_string(), "domain": "api.customer1.example.test",
        "mutual_tls_cas": certs.client_ca, "crt": certs.crt, "key": certs.key,
    });
    let out = operator(vec![
        "--cacert".into(),
        edge_ca.clone(),
        "--resolve".into(),
        resolve_api.clone(),
        "-H".into(),
        "Content-Type: application/json".into(),
        "-w".into(),
        "\n%{http_code}".into(),
        "-X".into(),
        "POST".into(),
        api_url("/api/tunnels"),
        "-d".into(),
        start.to_string(),
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap();
    assert_eq!(
        code,
        "201",
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tunnel: Value = serde_json::from_str(body).unwrap();
    assert_eq!(tunnel["name"], "passthrough");
    assert_eq!(tunnel["proto"], "tls");
    let public = tunnel["public_url"].as_str().unwrap().to_string();
    assert!(
        public.starts_with("tls://api.customer1.example.test"),
        "{public}"
    );
    agent.wait_for_line("api.customer1.example.test", 5).await;

    // The partner reaches the customer's service with its client
    // certificate; TLS ends at the agent.
    let resolve_svc = edge.resolve("api.customer1.example.test");
    let svc_url = edge.https_url("api.customer1.example.test", "/orders");
    let partner = |with_cert: bool| {
        let mut args = vec![
            "--cacert".to_string(),
            certs.server_ca.display().to_string(),
            "--resolve".into(),
            resolve_svc.clone(),
        ];
        if with_cert {
            args.extend([
                "--cert".into(),
                certs.client_crt.display().to_string(),
                "--key".into(),
                certs.client_key.display().to_string(),
            ]);
        }
        args.push(svc_url.clone());
        operator(args)
    };
    let served = partner(true).await;
    assert!(
        served.status.success(),
        "{}",
        String::from_utf8_lossy(&served.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&served.stdout),
        "hello from upstream"
    );
    assert_eq!(service.last("/orders").method, "GET");
    assert!(
        !partner(false).await.status.success(),
        "no client certificate, no service"
    );

    // The operator lists, then stops the tunnel; the service is refused.
    let list = operator(vec![
        "--cacert".into(),
        edge_ca.clone(),
        "--resolve".into(),
        resolve_api.clone(),
        api_url("/api/tunnels"),
    ])
    .await;
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    let names: Vec<&str> = list["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["agent-api", "passthrough"],
        "their-app was not started"
    );
    let stop = operator(vec![
        "--cacert".into(),
        edge_ca.clone(),
        "--resolve".into(),
        resolve_api.clone(),
        "-w".into(),
        "%{http_code}".into(),
        "-X".into(),
        "DELETE".into(),
        api_url("/api/tunnels/passthrough"),
    ])
    .await;
    assert_eq!(String::from_utf8_lossy(&stop.stdout), "204");
    let refused = partner(true).await;
    assert!(
        !refused.status.success(),
        "the stopped tunnel refuses traffic"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("unrecognized name"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    agent.terminate().await;
}

#[tokio::test]
async fn one_gib_each_way_streams_through_the_inspector_without_being_held() {
    const GIB: u64 = 1 << 30;
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let dir = TempDir::new("big");
    let config = dir.path().join("web.yml");
    std::fs::write(&config, "web_addr: 127.0.0.1:0\n").unwrap();
    let mut agent = Spawned::spawn(
        Command::new(binary("postern"))
            .args([
                "http",
                &upstream.port().to_string(),
                "--domain",
                "big.example.test",
            ])
            .arg("--config")
            .arg(&config)
            .args(edge.agent_args(&edge.token)),
    );
    // The banner names the port the API got.
    let line = agent.wait_for_line("Web Interface", 20).await;
    let api: SocketAddr = line
        .rsplit("http://")
        .next()
        .unwrap()
        .trim()
        .parse()
        .expect("the banner names the API address");
    agent.wait_for_line("Forwarding", 20).await;
    let url = edge.https_url("big.example.test", "");
    let resolve = edge.resolve("big.example.test");
    let started = Instant::now();
    stream_each_way(&url, &edge.ca_pem(), &resolve, GIB).await;
    let (rss, peak) = read_rss_kib(agent.pid());
    println!(
        "2 GiB through the inspected path in {:?}; agent RSS {rss} KiB, peak {peak} KiB",
        started.elapsed()
    );
    assert!(
        peak < 200 * 1024,
        "the agent peaked at {peak} KiB: the inspector must tee, not buffer"
    );
    let list = get(api, "/api/requests/http").await.json;
    let requests = list["requests"].as_array().unwrap();
    let download = &requests[0];
    let upload = &requests[1];
    assert_eq!(download["response"]["body"]["size"], GIB, "{download}");
    assert_eq!(download["response"]["body"]["truncated"], true);
    assert_eq!(upload["request"]["body"]["size"], GIB, "{upload}");
    assert!(upload["request"]["body"]["captured"].as_u64().unwrap() <= 256 * 1024);
    agent.terminate().await;
}

/// Chromium from Debian and playwright-core from npm, as `scripts/test.sh`
/// installs them; missing either is a failure, not a skip.
fn browser_tools() -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    let chromium = ["chromium", "chromium-browser"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH")?
                .to_str()?
                .split(':')
                .map(|p| Path::new(p).join(name))
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| {
            panic!(
                "Chromium is not installed: run ./scripts/test.sh (it installs Debian's chromium)"
            )
        });
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "{} has no node_modules/playwright-core: run ./scripts/test.sh (it runs npm ci there)",
        dir.display()
    );
    (chromium, dir)
}

#[tokio::test]
async fn the_inspector_page_in_a_real_browser_shows_and_replays_a_request() {
    let (chromium, dir) = browser_tools();
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (_agent, api, _) = edge
        .agent_with_api("", &http_tunnel("web", "app.example.test", upstream.port()))
        .await;
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    let payload = r#"{"order":{"id":42,"items":["tea","scones"]},"express":true}"#;
    let r = client
        .request(
            "app.example.test",
            "POST",
            "/echo?source=browser-test",
            Bytes::from(payload),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let echo_count = || {
        upstream
            .requests()
            .iter()
            .filter(|r| r.path == "/echo")
            .count()
    };
    assert_eq!(echo_count(), 1);

    let mut script = Command::new("node");
    script
        .arg(dir.join("inspector.mjs"))
        .current_dir(&dir)
        .env("CHROMIUM_BIN", &chromium)
        .env("INSPECTOR_URL", format!("http://{api}/"))
        .env("EXPECT_PATH", "/echo?source=browser-test");
    if let Some(shot) = std::env::var_os("POSTERN_INSPECTOR_SCREENSHOT") {
        script.env("SCREENSHOT", shot);
    }
    let out = tokio::time::timeout(Duration::from_secs(90), script.kill_on_drop(true).output())
        .await
        .expect("the browser script finishes within 90 s")
        .expect("node runs (is it installed? run ./scripts/test.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    assert_eq!(result["rowsBefore"], 1, "{result}");
    assert_eq!(result["rowsAfter"], 2, "{result}");
    assert!(
        result["requestBody"]
            .as_str()
            .unwrap()
            .contains("\"items\": [\n"),
        "the JSON body is pretty-printed: {result}"
    );
    // The upstream saw the replay.
    assert_eq!(echo_count(), 2);
    let list = get(api, "/api/requests/http").await.json;
    assert_eq!(list["requests"][0]["replay_of"], list["requests"][1]["id"]);
}

/// Not a benchmark: the cost of the inspected path against the raw pipe,
/// measured with the same edge, upstream and client, printed for the record.
#[tokio::test]
async fn inspection_overhead_is_measured() {
    const REQUESTS: usize = 2000;
    const LANES: usize = 8;
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let tunnels = format!(
        "{}{}    inspect: false\n",
        http_tunnel("inspected", "inspected.example.test", upstream.port()),
        http_tunnel("raw", "raw.example.test", upstream.port()),
    );
    let (_agent, api, _) = edge.agent_with_api("", &tunnels).await;
    let http = edge.addrs.http.unwrap();
    let mut results = Vec::new();
    for round in 0..2 {
        for host in ["raw.example.test", "inspected.example.test"] {
            let (elapsed, mut latencies) = drive(http, host, REQUESTS, LANES).await;
            latencies.sort();
            let p = |q: f64| {
                latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)]
            };
            let line = format!(
                "round {round} {host:<24} {REQUESTS} requests on {LANES} connections in {elapsed:?}: \
                 {:.0} req/s, p50 {:?}, p99 {:?}",
                REQUESTS as f64 / elapsed.as_secs_f64(),
                p(0.5),
                p(0.99)
            );
            println!("{line}");
            results.push(line);
        }
    }
    let captured = get(api, "/api/requests/http?limit=100000&tunnel_name=inspected")
        .await
        .json;
    assert_eq!(
        captured["requests"].as_array().unwrap().len(),
        2 * REQUESTS,
        "every inspected request was captured"
    );
}

/// `total` GETs over `lanes` kept-alive HTTP/1.1 connections to the edge's
/// plain listener; the wall time and each request's latency.
async fn drive(
    http: SocketAddr,
    host: &str,
    total: usize,
    lanes: usize,
) -> (Duration, Vec<Duration>) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..lanes {
        let host = host.to_string();
        tasks.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(http).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut latencies = Vec::new();
            for _ in 0..total / lanes {
                let t = Instant::now();
                let req = Request::get("/")
                    .header("host", host.as_str())
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let response = sender.send_request(req).await.unwrap();
                assert_eq!(response.status(), 200);
                response.into_body().collect().await.unwrap();
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (started.elapsed(), all)
}

/// Issue 26: 300 concurrent `POST /api/tunnels` never cost the session.
/// The agent answers what the edge would refuse itself (`409` with
/// `ERR_POSTERN_324` past the endpoint limit) and paces the rest within the
/// edge's control budget (`429` with `Retry-After` when too many wait, which
/// this client honours, as a script should); the config tunnel serves
/// throughout and the session never reconnects.
/// `budget` is the edge's `[limits]` control budget, when not the default.
async fn a_burst_of_tunnel_starts_keeps_the_session(preloaded: usize, budget: Option<&str>) -> u32 {
    const LIMIT: usize = 100; // the edge's endpoints_per_session
    let edge = TestEdge::start_with(
        &budget
            .map(|b| format!("[limits]\n{b}\n"))
            .unwrap_or_default(),
    )
    .await;
    let upstream = HttpUpstream::start().await;
    let (agent, api, _) = edge
        .agent_with_api("", &http_tunnel("web", "web.example.test", upstream.port()))
        .await;
    let start = |name: String| {
        json!({"name": name, "proto": "http", "addr": upstream.port(), "domain": format!("{name}.example.test")})
            .to_string()
    };
    for i in 0..preloaded {
        let a = post(api, "/api/tunnels", &start(format!("pre{i}"))).await;
        assert_eq!(a.status, 201, "{}", a.json);
    }

    // A visitor of the config tunnel, every 20 ms during the burst.
    let stop = Arc::new(AtomicBool::new(false));
    let visitor = tokio::spawn({
        let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
        let stop = stop.clone();
        async move {
            let mut served = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let r = client.get("web.example.test", "/").await;
                assert!(
                    r.as_ref().is_ok_and(|r| r.status == 200),
                    "the config tunnel stopped serving during the burst after {served} requests: {:?}",
                    r.map(|r| r.status)
                );
                served += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            served
        }
    });
    let starts: Vec<_> = (0..300)
        .map(|i| {
            let body = start(format!("burst{i}"));
            tokio::spawn(async move {
                let mut told_to_wait = 0;
                loop {
                    let a = post(api, "/api/tunnels", &body).await;
                    if a.status != StatusCode::TOO_MANY_REQUESTS {
                        return (a, told_to_wait);
                    }
                    told_to_wait += 1;
                    let after: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
                    assert!(after >= 1, "{}", a.json);
                    tokio::time::sleep(Duration::from_secs(after)).await;
                }
            })
        })
        .collect();
    let (mut created, mut over_limit, mut waits) = (0, 0, 0);
    for task in starts {
        let (a, told_to_wait) = task.await.unwrap();
        waits += told_to_wait;
        match a.status.as_u16() {
            201 => created += 1,
            409 => {
                assert_error(&a, 409, "ERR_POSTERN_324");
                over_limit += 1;
            }
            other => panic!("unexpected answer {other}: {}", a.json),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let served = visitor.await.unwrap();
    println!(
        "{created} created, {over_limit} over the limit, {waits} times told to wait; the config tunnel served {served} requests meanwhile"
    );
    assert_eq!(created, LIMIT - 1 - preloaded, "exactly up to the limit");
    assert_eq!(over_limit, 300 - created);
    assert!(served > 0);
    let listed = get(api, "/api/tunnels").await.json;
    assert_eq!(listed["tunnels"].as_array().unwrap().len(), LIMIT);
    let s = get(api, "/api/status").await.json;
    assert_eq!(s["session"]["reconnects"], 0, "{s}");
    assert!(agent.status().borrow().online);
    agent.shutdown().await.unwrap();
    waits
}

#[tokio::test]
async fn a_burst_of_300_tunnel_starts_on_a_nearly_full_session_never_costs_the_session() {
    a_burst_of_tunnel_starts_keeps_the_session(95, None).await;
}

#[tokio::test]
async fn a_burst_of_300_tunnel_starts_on_an_empty_session_never_costs_the_session() {
    a_burst_of_tunnel_starts_keeps_the_session(0, None).await;
}

/// With a budget too small for 99 binds at once, the agent's queue fills
/// and callers are told to come back (`429`, `Retry-After`) instead.
#[tokio::test]
async fn a_burst_of_300_tunnel_starts_within_a_small_budget_is_queued_and_told_to_wait() {
    let waits = a_burst_of_tunnel_starts_keeps_the_session(
        0,
        Some("control_messages_per_second = 20\ncontrol_burst = 30"),
    )
    .await;
    assert!(
        waits > 0,
        "the queue of 64 filled, so some callers were told to wait"
    );
}
