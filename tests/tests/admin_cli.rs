//! `postern api`: the edge's admin API through the real `postern` binary,
//! against a real node (a one-node cluster, so that every resource is
//! served): create, list, get, update and delete of every resource, the
//! live resources, API errors with their codes, a wrong key, and where the
//! address and key come from.

use postern_tests::{
    API_KEY, DOMAIN, HttpUpstream, TempDir, TestCa, TestEdge, binary,
    cluster::{Run, TestCluster},
    eventually,
};
use serde_json::Value;

/// What one `postern api …` run gave.
struct Outcome {
    ok: bool,
    json: Value,
    stdout: String,
    stderr: String,
}

/// `postern api` pointed at `edge` through POSTERN_API_URL and
/// POSTERN_API_KEY (`key`), with `extra` arguments before `api`.
async fn api_with(edge: &TestEdge, key: &str, extra: &[&str], args: &[&str]) -> Outcome {
    let url = format!("http://{}", edge.addrs.admin.expect("admin listener"));
    let out = tokio::process::Command::new(binary("postern"))
        .args(extra)
        .arg("api")
        .args(args)
        .env("POSTERN_API_URL", url)
        .env("POSTERN_API_KEY", key)
        .env("HOME", "/nonexistent")
        .output()
        .await
        .expect("postern runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Outcome {
        ok: out.status.success(),
        json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `postern api <args>` with the test key; it must succeed.
async fn ok(edge: &TestEdge, args: &[&str]) -> Value {
    let run = api_with(edge, API_KEY, &[], args).await;
    assert!(run.ok, "postern api {args:?} failed: {}", run.stderr);
    run.json
}

/// `postern api <args>` with the test key; it must fail. Its stderr.
async fn fails(edge: &TestEdge, args: &[&str]) -> String {
    let run = api_with(edge, API_KEY, &[], args).await;
    assert!(!run.ok, "postern api {args:?} succeeded: {}", run.stdout);
    run.stderr
}

async fn one_node() -> TestCluster {
    TestCluster::start_nodes(&[("edge-us-1", "us", Run::InProcess)], "").await
}

#[tokio::test]
async fn every_resource_is_created_listed_read_changed_and_deleted() {
    let cluster = one_node().await;
    let edge = cluster.us();
    let dir = TempDir::new("api-cli");

    let bot = ok(edge, &["bot-users", "create", "--name", "ci"]).await;
    let bot_id = bot["id"].as_str().unwrap().to_string();
    assert!(bot_id.starts_with("bot_"), "{bot}");
    assert_eq!(bot["active"], true);

    let credential = ok(
        edge,
        &[
            "credentials",
            "create",
            "--acl",
            "bind:*.customer9.example.test",
            "--acl",
            "bind:*:29501",
            "--description",
            "site 9",
            "--owner-id",
            &bot_id,
        ],
    )
    .await;
    assert!(
        credential["token"].as_str().unwrap().starts_with("pt_"),
        "the token is shown on create: {credential}"
    );
    assert_eq!(
        credential["acl"],
        serde_json::json!(["bind:*.customer9.example.test", "bind:*:29501"])
    );
    assert_eq!(credential["owner_id"], bot_id.as_str());

    let ca = TestCa::root("postern api test CA");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let ca_object = ok(
        edge,
        &[
            "certificate-authorities",
            "create",
            "--ca-pem",
            &format!("@{}", ca_file.display()),
            "--description",
            "clients",
        ],
    )
    .await;
    assert_eq!(ca_object["subject_common_name"], "postern api test CA");
    let ca_id = ca_object["id"].as_str().unwrap().to_string();

    let policy = ok(
        edge,
        &[
            "endpoint-policies",
            "create",
            "--domain",
            "app.customer9.example.test",
            "--mutual-tls-cas",
            &ca_id,
        ],
    )
    .await;
    assert_eq!(policy["mutual_tls_cas"], serde_json::json!([ca_id]));
    // The operator's Traffic Policy, from a YAML file.
    let traffic_policy = dir.path().join("policy.yml");
    std::fs::write(
        &traffic_policy,
        "on_http_request:\n  - actions:\n      - type: deny\n",
    )
    .unwrap();
    let with_policy = ok(
        edge,
        &[
            "endpoint-policies",
            "update",
            policy["id"].as_str().unwrap(),
            "--traffic-policy",
            &format!("@{}", traffic_policy.display()),
        ],
    )
    .await;
    assert!(
        with_policy["traffic_policy"]
            .as_str()
            .is_some_and(|p| p.contains("deny")),
        "{with_policy}"
    );
    let reserved = ok(
        edge,
        &[
            "reserved-domains",
            "create",
            "--domain",
            "*.customer9.example.test",
            "--owner-id",
            &bot_id,
        ],
    )
    .await;
    assert_eq!(reserved["domain"], "*.customer9.example.test");
    let ingress = ok(
        edge,
        &[
            "agent-ingresses",
            "create",
            "--domain",
            "connect.customer9.example.test",
        ],
    )
    .await;
    assert_eq!(
        ingress["region_domains"],
        serde_json::json!(["tunnel.us.connect.customer9.example.test"])
    );
    let sources = dir.path().join("sources.json");
    std::fs::write(&sources, r#"[{"type": "http_request_complete.v0"}]"#).unwrap();
    let subscription = ok(
        edge,
        &[
            "event-subscriptions",
            "create",
            "--sources",
            &format!("@{}", sources.display()),
            "--destination",
            r#"{"file": {"path": "cli.jsonl"}}"#,
        ],
    )
    .await;
    assert_eq!(
        subscription["sources"][0]["type"],
        "http_request_complete.v0"
    );

    // Every object: listed, read, changed where the API allows it, deleted
    // (no output), then gone with the API's code.
    let objects = [
        ("credentials", &credential, true),
        ("endpoint-policies", &policy, true),
        ("certificate-authorities", &ca_object, false),
        ("reserved-domains", &reserved, true),
        ("agent-ingresses", &ingress, true),
        ("event-subscriptions", &subscription, true),
        ("bot-users", &bot, false),
    ];
    for (resource, object, updatable) in objects {
        let id = object["id"].as_str().unwrap();
        let list = ok(edge, &[resource, "list"]).await;
        let key = resource.replace('-', "_");
        assert!(
            list[&key].as_array().unwrap().iter().any(|o| o["id"] == id),
            "{resource} list has {id}: {list}"
        );
        assert_eq!(ok(edge, &[resource, "get", id]).await["id"], id);
        if updatable {
            let changed = ok(edge, &[resource, "update", id, "--description", "changed"]).await;
            assert_eq!(changed["description"], "changed", "{resource}: {changed}");
        }
        let deleted = api_with(edge, API_KEY, &[], &[resource, "delete", id]).await;
        assert!(deleted.ok, "{resource} delete: {}", deleted.stderr);
        assert_eq!(deleted.stdout, "", "a delete prints nothing");
        let gone = fails(edge, &[resource, "get", id]).await;
        assert!(
            gone.contains("ERR_POSTERN_") && gone.contains("HTTP 404"),
            "{resource} get after delete: {gone}"
        );
    }
    let renamed = ok(edge, &["bot-users", "create", "--name", "x"]).await;
    let renamed_id = renamed["id"].as_str().unwrap();
    let renamed = ok(
        edge,
        &[
            "bot-users",
            "update",
            renamed_id,
            "--name",
            "y",
            "--active",
            "false",
        ],
    )
    .await;
    assert_eq!(
        (&renamed["name"], &renamed["active"]),
        (&"y".into(), &false.into())
    );
}

#[tokio::test]
async fn endpoints_and_tunnel_sessions_are_listed_read_and_stopped() {
    let cluster = one_node().await;
    let edge = cluster.us();
    let upstream = HttpUpstream::start().await;
    let host = format!("cli.{DOMAIN}");
    let tunnel = format!(
        "  web:\n    proto: http\n    addr: {}\n    domain: {host}\n",
        upstream.port()
    );
    let (agent, status) = edge.agent(&tunnel).await;
    eventually(10, "the session is listed", || async {
        let listed = ok(edge, &["tunnel-sessions", "list"]).await;
        listed["tunnel_sessions"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    })
    .await;
    let sessions = ok(edge, &["tunnel-sessions", "list"]).await;
    assert_eq!(
        sessions["tunnel_sessions"][0]["id"],
        status.session_id.as_str()
    );
    let session = ok(edge, &["tunnel-sessions", "get", &status.session_id]).await;
    assert_eq!(session["region"], "us");

    let endpoints = ok(edge, &["endpoints", "list"]).await;
    let endpoint = &endpoints["endpoints"][0];
    assert!(
        endpoint["public_url"].as_str().unwrap().contains(&host),
        "{endpoints}"
    );
    let id = endpoint["id"].as_str().unwrap();
    assert_eq!(ok(edge, &["endpoints", "get", id]).await["id"], id);

    let stopped = api_with(
        edge,
        API_KEY,
        &[],
        &["tunnel-sessions", "stop", &status.session_id],
    )
    .await;
    assert!(stopped.ok, "{}", stopped.stderr);
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), agent.wait())
        .await
        .expect("the stopped agent exits");
    assert!(format!("{:#}", ended.unwrap_err()).contains("ERR_POSTERN_9012"));
    let unknown = fails(edge, &["tunnel-sessions", "stop", "ts_nope"]).await;
    assert!(unknown.contains("no tunnel session ts_nope"), "{unknown}");
}

#[tokio::test]
async fn errors_show_the_api_code_and_a_wrong_key_says_so() {
    let cluster = one_node().await;
    let edge = cluster.us();

    // The API refuses a bad ACL: its message and code, exit 1.
    let refused = fails(edge, &["credentials", "create", "--acl", "bond:x"]).await;
    assert!(
        refused.contains("acl:") && refused.contains("(ERR_POSTERN_9400, HTTP 400)"),
        "{refused}"
    );

    let wrong = api_with(
        edge,
        "not-the-key-0123456789",
        &[],
        &["credentials", "list"],
    )
    .await;
    assert!(!wrong.ok);
    assert!(
        wrong
            .stderr
            .contains("refused the API key (HTTP 401, ERR_POSTERN_")
            && wrong.stderr.contains("POSTERN_API_KEY"),
        "{}",
        wrong.stderr
    );

    // Without a key anywhere, nothing is sent.
    let none = api_with(edge, "", &[], &["credentials", "list"]).await;
    assert!(
        none.stderr.contains("no admin API key: pass --api-key"),
        "{}",
        none.stderr
    );

    // api_url and api_key from the agent config are used (the flags and
    // variables are not set here), and --api-url wins over it.
    let dir = TempDir::new("api-cli-config");
    let config = dir.path().join("postern.yml");
    std::fs::write(
        &config,
        format!(
            "version: \"2\"\napi_url: http://{}\napi_key: {API_KEY}\n",
            edge.addrs.admin.unwrap()
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(binary("postern"))
        .args(["api", "bot-users", "list", "--config"])
        .arg(&config)
        .env_remove("POSTERN_API_URL")
        .env_remove("POSTERN_API_KEY")
        .output()
        .await
        .unwrap();
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(
        listed["uri"],
        "/bot_users",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let elsewhere = tokio::process::Command::new(binary("postern"))
        .args([
            "api",
            "--api-url",
            "http://127.0.0.1:1",
            "bot-users",
            "list",
            "--config",
        ])
        .arg(&config)
        .env_remove("POSTERN_API_URL")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(
        !elsewhere.status.success()
            && stderr.contains("cannot reach the admin API at http://127.0.0.1:1"),
        "{stderr}"
    );

    // Usage errors, before anything is sent.
    let missing = fails(
        edge,
        &[
            "certificate-authorities",
            "create",
            "--ca-pem",
            "@/nonexistent.pem",
        ],
    )
    .await;
    assert!(
        missing.contains("cannot read /nonexistent.pem"),
        "{missing}"
    );
    let nothing = fails(edge, &["credentials", "update", "cr_1"]).await;
    assert!(
        nothing.contains("--acl"),
        "an update names its flags: {nothing}"
    );
    let session_flag = api_with(edge, API_KEY, &["--authtoken", "x"], &["bot-users", "list"]).await;
    assert!(
        session_flag
            .stderr
            .contains("--authtoken: `postern api` starts no session"),
        "{}",
        session_flag.stderr
    );

    // Help for every resource and verb.
    let help = api_with(edge, API_KEY, &[], &["credentials", "create", "--help"]).await;
    assert!(help.ok);
    assert!(
        help.stdout.contains("--acl <ACL>") && help.stdout.contains("ngrok ACL rules"),
        "{}",
        help.stdout
    );
    let resources = api_with(edge, API_KEY, &[], &["--help"]).await;
    for resource in [
        "credentials",
        "certificate-authorities",
        "bot-users",
        "reserved-domains",
        "agent-ingresses",
        "endpoint-policies",
        "event-subscriptions",
        "endpoints",
        "tunnel-sessions",
        "oauth-sessions",
    ] {
        assert!(
            resources.stdout.contains(resource),
            "{resource} in {}",
            resources.stdout
        );
    }
}

#[tokio::test]
async fn without_a_cluster_the_cluster_resources_say_what_they_need() {
    let edge = TestEdge::start().await;
    let refused = fails(&edge, &["credentials", "list"]).await;
    assert!(
        refused.contains("needs a [cluster] table") && refused.contains("HTTP 404"),
        "{refused}"
    );
    // Certificate authorities live on every node.
    let list = ok(&edge, &["certificate-authorities", "list"]).await;
    assert_eq!(list["certificate_authorities"], serde_json::json!([]));
}

#[tokio::test]
async fn oauth_sessions_are_listed_and_deleted_by_user() {
    // The node's OAuth sessions (in its memory here; tests/tests/oauth.rs
    // fills them through a real login).
    let edge = TestEdge::start().await;
    let list = ok(
        &edge,
        &["oauth-sessions", "list", "--email", "nobody@example.test"],
    )
    .await;
    assert_eq!(list["oauth_sessions"], serde_json::json!([]), "{list}");
    let neither = fails(&edge, &["oauth-sessions", "list"]).await;
    assert!(
        neither.contains("give exactly one of ?user_id= and ?email=")
            && neither.contains("HTTP 400"),
        "{neither}"
    );
    let missing = fails(&edge, &["oauth-sessions", "delete", "os_missing"]).await;
    assert!(
        missing.contains("no OAuth session os_missing") && missing.contains("HTTP 404"),
        "{missing}"
    );
    let all = ok(
        &edge,
        &["oauth-sessions", "delete-all", "--user-id", "alice"],
    )
    .await;
    assert_eq!(all["deleted"], 0, "{all}");
}
