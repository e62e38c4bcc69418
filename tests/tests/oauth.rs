//! OAuth and OpenID Connect at the edge, end to end: a real Redis
//! (`redis-server`), a real OpenID Provider (oidc-provider under node), real
//! edges and agents, an upstream that records what it gets, a scripted
//! browser with a cookie jar and headless Chromium.
//!
//! Missing binaries or node modules fail the tests with a pointer to
//! `./scripts/test.sh`.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use http::StatusCode;
use postern_ingress::{
    MemoryStore, RedisOptions, RedisStore, RedisTarget, SessionStore, StoreError,
};
use postern_tests::{
    API_KEY, Browser, CLIENT_ID, CLIENT_SECRET, HttpUpstream, OidcProvider, Page, RedisCluster,
    RedisServer, TestEdge, chromium_login, eventually, spki_hash,
};
use serde_json::{Value, json};

const APP: &str = "app.example.test";
const AUTH: &str = "auth.example.test";
const SESSION_KEY: &str = "oauth-test-session-key-0123456789abcdef";
const SESSION: &str = "ngrok.session";
/// The edges' Redis command timeout in these tests.
const REDIS_TIMEOUT: Duration = Duration::from_millis(300);

/// One OAuth/OIDC-protected tunnel: its domain and extra YAML lines under
/// `oidc:` (indented six spaces).
struct Tunnel<'a> {
    domain: &'a str,
    oidc: &'a str,
}

const PLAIN: Tunnel<'static> = Tunnel {
    domain: APP,
    oidc: "",
};

/// Redis, edges ("regions") sharing it, the provider, one upstream, and an
/// agent per edge binding every tunnel (plus `plain.example.test` without
/// OAuth).
struct World {
    redis: RedisServer,
    edges: Vec<TestEdge>,
    idp: OidcProvider,
    upstream: HttpUpstream,
    _agents: Vec<postern_agent::Agent>,
}

fn oauth_toml(redis: &RedisServer, extra: &str) -> String {
    format!(
        r#"
[oauth]
redis_url = "{url}"
session_key = "{SESSION_KEY}"
redis_timeout = "{timeout}ms"
auth_check_floor = "1s"
{extra}

[[events.subscriptions]]
id = "oauth-test"
sources = [{{ type = "http_request_complete.v0" }}]
destination = {{ file = {{ path = "events.jsonl" }} }}
"#,
        url = redis.url(),
        timeout = REDIS_TIMEOUT.as_millis(),
    )
}

fn tunnels_yaml(tunnels: &[Tunnel<'_>], issuer: &str, upstream: u16) -> String {
    let mut yaml = format!(
        "  plain:\n    proto: http\n    addr: {upstream}\n    domain: plain.example.test\n"
    );
    for (i, t) in tunnels.iter().enumerate() {
        yaml.push_str(&format!(
            "  web{i}:\n    proto: http\n    addr: {upstream}\n    domain: {domain}\n    oidc:\n      \
             issuer_url: {issuer}\n      client_id: {CLIENT_ID}\n      client_secret: {CLIENT_SECRET}\n      \
             scopes: [openid, email, profile]\n{extra}",
            domain = t.domain,
            extra = t.oidc,
        ));
    }
    yaml
}

impl World {
    async fn start(edges: usize, tunnels: &[Tunnel<'_>], oauth_extra: &str) -> World {
        let redis = RedisServer::start().await;
        let mut started = Vec::new();
        for _ in 0..edges {
            started.push(TestEdge::start_with(&oauth_toml(&redis, oauth_extra)).await);
        }
        let callbacks: Vec<String> = started
            .iter()
            .map(|e| format!("https://{AUTH}:{}/oauth2/callback", e.addrs.https.port()))
            .collect();
        let idp = OidcProvider::start(&callbacks).await;
        let upstream = HttpUpstream::start().await;
        let yaml = tunnels_yaml(tunnels, &idp.issuer, upstream.port());
        let mut agents = Vec::new();
        for edge in &started {
            agents.push(edge.agent(&yaml).await.0);
        }
        World {
            redis,
            edges: started,
            idp,
            upstream,
            _agents: agents,
        }
    }

    /// A browser pointed at edge `i`, trusting every edge's dev CA.
    fn browser(&self, i: usize) -> Browser {
        let cas: Vec<_> = self.edges.iter().map(|e| e.ca_pem()).collect();
        let cas: Vec<&Path> = cas.iter().map(|p| p.as_path()).collect();
        let mut browser = Browser::new(&cas, self.edges[i].addrs.https.port());
        browser.edge_http_port = self.edges[i].addrs.http.unwrap().port();
        browser
    }

    /// `https://<host>:<port of edge i><path>`.
    fn url(&self, i: usize, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.edges[i].addrs.https.port())
    }

    /// Logs `user` in on edge 0 starting at `path` of `host`.
    async fn login(
        &self,
        browser: &mut Browser,
        host: &str,
        path: &str,
        user: &str,
    ) -> (Page, Vec<Page>) {
        let start = browser.get(&self.url(0, host, path)).await;
        assert_eq!(start.status, StatusCode::FOUND, "{}", start.text());
        browser.login(start, user).await
    }

    /// Requests the upstream got for `path` so far.
    fn upstream_saw(&self, path: &str) -> usize {
        self.upstream
            .requests()
            .iter()
            .filter(|r| r.path == path)
            .count()
    }
}

/// The `http_request_complete.v0` events edge `edge` wrote so far.
fn events(edge: &TestEdge) -> Vec<Value> {
    edge.file_events("events.jsonl")
}

async fn wait_for_event(edge: &TestEdge, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(e) = events(edge).into_iter().find(|e| pred(e)) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no event {what}: {:#?}",
            events(edge)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` every 50 ms until it holds, or panics after `secs`.
async fn until(secs: u64, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {secs}s waiting for: {what}");
}

fn header<'a>(r: &'a postern_tests::Recorded, name: &str) -> Vec<&'a str> {
    r.headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect()
}

fn query_of(url: &str) -> Vec<(String, String)> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.replace('+', " ").into_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn assert_cookie_attributes(set_cookie: &str) {
    for attr in ["Path=/", "Secure", "HttpOnly", "SameSite=Lax"] {
        assert!(
            set_cookie.split(';').any(|a| a.trim() == attr),
            "{attr} missing from {set_cookie}"
        );
    }
    assert!(
        !set_cookie.to_ascii_lowercase().contains("domain="),
        "host-only: {set_cookie}"
    );
}

/// A raw HTTPS request to edge `i` with the request target as written
/// (no client-side normalisation); the status, or 0 if the connection
/// closed without one.
async fn raw_get(world: &World, i: usize, host: &str, target: &str, cookie: Option<&str>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let edge = &world.edges[i];
    let pem = std::fs::read(edge.ca_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::pem_slice_iter(
            &pem,
        )
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(postern_net::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(edge.addrs.https)
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from(host.to_string()).unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    let request =
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{cookie}Connection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

// ---- the session store contract ------------------------------------------

/// One conformance suite for every [`SessionStore`] (STYLE habit 12).
async fn store_conformance(store: &dyn SessionStore) {
    let tag = postern_net::random_label();
    let k = |s: &str| format!("conformance:{tag}:{s}");
    assert!(!store.kind().is_empty());

    // set, get, overwrite, absent keys, binary values
    store
        .set(&k("a"), b"one".to_vec(), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        store.get(&k("a")).await.unwrap().as_deref(),
        Some(&b"one"[..])
    );
    store
        .set(&k("a"), b"two".to_vec(), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        store.get(&k("a")).await.unwrap().as_deref(),
        Some(&b"two"[..])
    );
    assert_eq!(store.get(&k("absent")).await.unwrap(), None);
    let binary: Vec<u8> = (0..=255).collect();
    store
        .set(&k("bin"), binary.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(store.get(&k("bin")).await.unwrap(), Some(binary));

    // time to live, to the millisecond
    store
        .set(&k("ttl"), b"x".to_vec(), Duration::from_millis(300))
        .await
        .unwrap();
    assert!(store.get(&k("ttl")).await.unwrap().is_some());
    let started = Instant::now();
    eventually(3, "a 300 ms key expires", || async {
        store.get(&k("ttl")).await.unwrap().is_none()
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "expired late"
    );

    // take: once
    store
        .set(&k("once"), b"t".to_vec(), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        store.take(&k("once")).await.unwrap().as_deref(),
        Some(&b"t"[..])
    );
    assert_eq!(store.take(&k("once")).await.unwrap(), None);
    assert_eq!(store.get(&k("once")).await.unwrap(), None);
    // concurrent takes: exactly one wins
    store
        .set(&k("race"), b"r".to_vec(), Duration::from_secs(10))
        .await
        .unwrap();
    let takes = futures_util::future::join_all((0..16).map(|_| store.take(&k("race")))).await;
    assert_eq!(takes.iter().filter(|t| matches!(t, Ok(Some(_)))).count(), 1);

    // delete
    store
        .set(&k("del"), b"d".to_vec(), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(store.delete(&k("del")).await.unwrap());
    assert!(!store.delete(&k("del")).await.unwrap());

    // expire: only existing keys
    assert!(
        !store
            .expire(&k("absent"), Duration::from_secs(1))
            .await
            .unwrap()
    );
    store
        .set(&k("exp"), b"e".to_vec(), Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        store
            .expire(&k("exp"), Duration::from_millis(200))
            .await
            .unwrap()
    );
    eventually(3, "a shortened key expires", || async {
        store.get(&k("exp")).await.unwrap().is_none()
    })
    .await;

    // replace: never brings a key back
    assert!(
        !store
            .replace(&k("gone"), b"g".to_vec(), Duration::from_secs(10))
            .await
            .unwrap()
    );
    assert_eq!(store.get(&k("gone")).await.unwrap(), None);
    store
        .set(&k("rep"), b"1".to_vec(), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        store
            .replace(&k("rep"), b"2".to_vec(), Duration::from_millis(300))
            .await
            .unwrap()
    );
    assert_eq!(
        store.get(&k("rep")).await.unwrap().as_deref(),
        Some(&b"2"[..])
    );
    eventually(3, "a replaced key takes its new TTL", || async {
        store.get(&k("rep")).await.unwrap().is_none()
    })
    .await;

    // set_if_absent
    assert!(
        store
            .set_if_absent(&k("lock"), b"1".to_vec(), Duration::from_millis(300))
            .await
            .unwrap()
    );
    assert!(
        !store
            .set_if_absent(&k("lock"), b"2".to_vec(), Duration::from_secs(10))
            .await
            .unwrap()
    );
    assert_eq!(
        store.get(&k("lock")).await.unwrap().as_deref(),
        Some(&b"1"[..])
    );
    eventually(3, "a lock expires", || async {
        store
            .set_if_absent(&k("lock"), b"3".to_vec(), Duration::from_secs(10))
            .await
            .unwrap()
    })
    .await;

    // sets
    assert!(store.set_members(&k("set")).await.unwrap().is_empty());
    store
        .set_add(&k("set"), "a", Duration::from_secs(10))
        .await
        .unwrap();
    store
        .set_add(&k("set"), "b", Duration::from_secs(10))
        .await
        .unwrap();
    store
        .set_add(&k("set"), "a", Duration::from_secs(10))
        .await
        .unwrap();
    let mut members = store.set_members(&k("set")).await.unwrap();
    members.sort();
    assert_eq!(members, ["a", "b"]);
    store.set_remove(&k("set"), "a").await.unwrap();
    store.set_remove(&k("set"), "absent").await.unwrap();
    assert_eq!(store.set_members(&k("set")).await.unwrap(), ["b"]);
    store.set_remove(&k("set"), "b").await.unwrap();
    assert!(store.set_members(&k("set")).await.unwrap().is_empty());
    assert!(
        !store.delete(&k("set")).await.unwrap(),
        "an emptied set is gone"
    );
    store
        .set_add(&k("set-ttl"), "x", Duration::from_millis(300))
        .await
        .unwrap();
    eventually(3, "a set expires", || async {
        store.set_members(&k("set-ttl")).await.unwrap().is_empty()
    })
    .await;
}

fn redis_store(target: RedisTarget) -> RedisStore {
    RedisStore::new(RedisOptions {
        target,
        ca_pem: None,
        timeout: REDIS_TIMEOUT,
        key_prefix: "postern-test:".into(),
    })
    .unwrap()
}

#[tokio::test]
async fn session_store_conformance_memory() {
    store_conformance(&MemoryStore::new()).await;
}

#[tokio::test]
async fn session_store_conformance_redis() {
    let redis = RedisServer::start().await;
    store_conformance(&redis_store(RedisTarget::Single(redis.url()))).await;
}

#[tokio::test]
async fn session_store_conformance_redis_cluster() {
    let cluster = RedisCluster::start().await;
    store_conformance(&redis_store(RedisTarget::Cluster(cluster.urls()))).await;
}

/// A hung Redis (SIGSTOP) costs a command at most the timeout; a dead one
/// fails at once; the client reconnects by itself once Redis is back.
#[tokio::test]
async fn redis_store_is_bounded_and_reconnects() {
    let mut redis = RedisServer::start().await;
    let store = redis_store(RedisTarget::Single(redis.url()));
    store
        .set("k", b"v".to_vec(), Duration::from_secs(60))
        .await
        .unwrap();
    redis.freeze();
    let started = Instant::now();
    let err = store.get("k").await.unwrap_err();
    let hung = started.elapsed();
    assert_eq!(err, StoreError::Timeout(REDIS_TIMEOUT));
    assert!(
        hung < REDIS_TIMEOUT + Duration::from_millis(200),
        "{hung:?}"
    );
    redis.thaw();
    redis.stop();
    let started = Instant::now();
    assert!(store.get("k").await.is_err());
    assert!(started.elapsed() <= REDIS_TIMEOUT + Duration::from_millis(200));
    redis.restart().await;
    eventually(
        10,
        "the store reconnects to the restarted Redis",
        || async {
            store
                .set("k2", b"v".to_vec(), Duration::from_secs(60))
                .await
                .is_ok()
        },
    )
    .await;
    assert_eq!(store.get("k").await.unwrap(), None, "nothing was persisted");
}

// ---- logins ----------------------------------------------------------------

/// The whole flow with a cookie jar, hop by hop.
#[tokio::test]
async fn login_with_a_cookie_jar() {
    let world = World::start(
        1,
        &[Tunnel {
            domain: APP,
            oidc: "      allow_domains: [example.test]\n",
        }],
        "",
    )
    .await;
    let mut browser = world.browser(0);
    let began = Instant::now();
    let first = browser.get(&world.url(0, APP, "/private/page?x=1")).await;
    assert_eq!(first.status, StatusCode::FOUND);
    let to_idp = first.location().unwrap();
    assert!(
        to_idp.starts_with(&format!("{}/auth?", world.idp.issuer)),
        "{to_idp}"
    );
    let q = query_of(&to_idp);
    let param = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(param("client_id").as_deref(), Some(CLIENT_ID));
    assert_eq!(
        param("redirect_uri"),
        Some(format!(
            "https://{AUTH}:{}/oauth2/callback",
            world.edges[0].addrs.https.port()
        ))
    );
    assert_eq!(param("code_challenge_method").as_deref(), Some("S256"));
    assert!(param("code_challenge").unwrap().len() >= 43);
    assert!(
        param("state").unwrap().len() >= 43,
        "state carries 256 random bits"
    );
    assert!(param("nonce").unwrap().len() >= 43);
    assert!(param("scope").unwrap().split(' ').any(|s| s == "openid"));
    assert!(
        !to_idp.contains("private"),
        "the return path stays in the server-side state"
    );
    let nonce = first
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("ngrok.nonce."))
        .expect("a nonce cookie");
    assert_cookie_attributes(&nonce);

    let (last, hops) = browser.login(first, "alice").await;
    let round_trip = began.elapsed();
    assert_eq!(last.status, StatusCode::OK, "{}", last.text());
    assert_eq!(
        last.url,
        world.url(0, APP, "/private/page?x=1"),
        "the original path came back"
    );
    assert_eq!(last.text(), "hello from upstream");
    let at_auth_host = hops
        .iter()
        .find(|p| p.url.starts_with(&format!("https://{AUTH}:")))
        .expect("the IdP sent the browser to the auth host");
    let handoff = at_auth_host.location().unwrap();
    assert!(
        handoff.starts_with(&world.url(0, APP, "/auth/callback?code=")),
        "{handoff}"
    );
    let callback = hops.iter().find(|p| p.url == handoff).unwrap();
    assert_eq!(callback.location().as_deref(), Some("/private/page?x=1"));
    let session_cookie = callback.set_cookies(SESSION);
    assert_eq!(session_cookie.len(), 1, "{:?}", callback.headers);
    assert_cookie_attributes(&session_cookie[0]);
    let cleared_nonce = callback
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .find(|c| c.starts_with("ngrok.nonce."))
        .unwrap();
    assert!(cleared_nonce.contains("Max-Age=0"), "{cleared_nonce}");
    let cookie = browser.cookie(APP, SESSION).unwrap();
    assert!(cookie.len() >= 43, "at least 256 random bits: {cookie}");

    let seen = world.upstream.last("/private/page");
    assert_eq!(header(&seen, "ngrok-auth-user-id"), ["alice"]);
    assert_eq!(header(&seen, "ngrok-auth-user-name"), ["Alice Liddell"]);
    assert_eq!(
        header(&seen, "ngrok-auth-user-email"),
        ["alice@example.test"]
    );
    let access_token = header(&seen, "ngrok-auth-oauth-access-token")[0].to_string();
    assert!(!access_token.is_empty());
    assert!(
        seen.headers.get("cookie").is_none(),
        "no cookie reaches the upstream: {:?}",
        seen.headers
    );

    // Redis holds neither the cookie nor the token in the clear.
    let dump = tokio::process::Command::new("redis-cli")
        .args(["-p", &world.redis.port.to_string(), "--scan"])
        .output()
        .await
        .unwrap();
    let keys = String::from_utf8_lossy(&dump.stdout).to_string();
    assert!(
        keys.contains("postern:oauth:session:") && !keys.contains(&cookie),
        "{keys}"
    );
    for key in keys.lines() {
        let value = tokio::process::Command::new("redis-cli")
            .args(["-p", &world.redis.port.to_string(), "get", key])
            .output()
            .await
            .unwrap();
        let value = String::from_utf8_lossy(&value.stdout);
        assert!(
            !value.contains(&access_token) && !value.contains(&cookie),
            "{key}: {value}"
        );
    }

    // Logged in: no more redirects.
    let again = browser.get(&world.url(0, APP, "/other")).await;
    assert_eq!(again.status, StatusCode::OK);

    // A POST without a session comes back as a GET to the captured path.
    let mut poster = world.browser(0);
    let post = poster
        .request("POST", &world.url(0, APP, "/form"), &[], Some("a=1".into()))
        .await;
    assert_eq!(post.status, StatusCode::FOUND);
    let (done, _) = poster.login(post, "alice").await;
    assert_eq!(done.status, StatusCode::OK);
    let form = world.upstream.last("/form");
    assert_eq!(form.method, "GET");
    assert!(
        !world
            .upstream
            .requests()
            .iter()
            .any(|r| r.path == "/form" && r.method == "POST")
    );

    let event = wait_for_event(&world.edges[0], "allow for alice", |e| {
        e["object"]["oauth"]["decision"] == "allow" && e["object"]["oauth"]["user"]["id"] == "alice"
    })
    .await;
    assert_eq!(event["object"]["oauth"]["app_client_id"], CLIENT_ID);
    assert_eq!(event["object"]["oauth"]["user"]["name"], "Alice Liddell");
    eprintln!(
        "MEASURED login round trip (cookie jar, {} hops): {:.1} ms",
        hops.len() + 1,
        round_trip.as_secs_f64() * 1000.0
    );
}

/// The provider's real login form, in headless Chromium, through the edge.
#[tokio::test]
async fn login_in_headless_chromium() {
    let world = World::start(
        1,
        &[Tunnel {
            domain: APP,
            oidc: "      allow_domains: [example.test]\n",
        }],
        "",
    )
    .await;
    let edge = &world.edges[0];
    let mut spki = Vec::new();
    for name in [APP, AUTH] {
        spki.push(spki_hash(edge.addrs.https, name, &edge.ca_pem()).await);
    }
    let result = chromium_login(&world.url(0, APP, "/hello"), "alice", &spki).await;
    assert_eq!(result.url, world.url(0, APP, "/hello"));
    assert!(
        result.body.contains("hello from upstream"),
        "{}",
        result.body
    );
    let session = result
        .cookies
        .iter()
        .find(|c| c["name"] == SESSION)
        .expect("the session cookie");
    assert_eq!(session["secure"], true);
    assert_eq!(session["httpOnly"], true);
    assert_eq!(session["sameSite"], "Lax");
    assert_eq!(session["path"], "/");
    assert_eq!(session["domain"], APP, "host-only");
    assert!(
        !result
            .cookies
            .iter()
            .any(|c| c["name"].as_str().unwrap().starts_with("ngrok.nonce.")),
        "the nonce cookie is gone after login"
    );
    let seen = world.upstream.last("/hello");
    assert_eq!(
        header(&seen, "ngrok-auth-user-email"),
        ["alice@example.test"]
    );
    eprintln!(
        "MEASURED login round trip (Chromium, form filling included): {:.0} ms",
        result.elapsed_ms
    );
}

/// Two regions share one Redis: a session made in one works in the other,
/// and a logout in either ends it in both.
#[tokio::test]
async fn two_regions_share_sessions() {
    let world = World::start(2, &[PLAIN], "").await;
    let mut browser = world.browser(0);
    let (page, _) = world.login(&mut browser, APP, "/", "alice").await;
    assert_eq!(page.status, StatusCode::OK);
    let cookie = browser.cookie(APP, SESSION).unwrap();

    browser.edge_port = world.edges[1].addrs.https.port();
    let other_region = browser.get(&world.url(1, APP, "/from-region-2")).await;
    assert_eq!(
        other_region.status,
        StatusCode::OK,
        "no new login in region 2"
    );
    assert_eq!(
        header(&world.upstream.last("/from-region-2"), "ngrok-auth-user-id"),
        ["alice"]
    );

    let logout = browser.get(&world.url(1, APP, "/auth/logout")).await;
    assert_eq!(logout.status, StatusCode::OK);
    assert!(logout.text().contains("Logged out"));
    assert!(logout.set_cookies(SESSION)[0].contains("Max-Age=0"));

    // Region 1 refuses the same cookie now.
    browser.edge_port = world.edges[0].addrs.https.port();
    browser.set_cookie(APP, SESSION, &cookie);
    let refused = browser.get(&world.url(0, APP, "/after-logout")).await;
    assert_eq!(refused.status, StatusCode::FOUND);
    assert!(refused.location().unwrap().starts_with(&world.idp.issuer));
    assert_eq!(world.upstream_saw("/after-logout"), 0);
}

// ---- authorization -----------------------------------------------------------

#[tokio::test]
async fn allow_lists_decide_and_events_say_so() {
    let world = World::start(
        1,
        &[Tunnel {
            domain: APP,
            oidc: "      allow_emails: [bob@other.test]\n      allow_domains: [example.test]\n",
        }],
        "",
    )
    .await;
    world
        .idp
        .set_user(
            "frank",
            json!({"name": "Frank", "email": "frank@other.test", "email_verified": true}),
        )
        .await;
    for (user, allowed) in [
        ("alice", true),
        ("dave", true),     // Dave@EXAMPLE.TEST: case does not matter
        ("bob", true),      // by exact address
        ("carol", false),   // email_verified: false
        ("mallory", false), // two @
        ("erin", false),    // trailing dot: another domain
        ("frank", false),   // not listed
    ] {
        let mut browser = world.browser(0);
        let path = format!("/who/{user}");
        let (page, _) = world.login(&mut browser, APP, &path, user).await;
        if allowed {
            assert_eq!(page.status, StatusCode::OK, "{user}: {}", page.text());
            assert_eq!(world.upstream_saw(&path), 1, "{user}");
        } else {
            assert_eq!(
                page.status,
                StatusCode::FORBIDDEN,
                "{user}: {}",
                page.text()
            );
            assert_eq!(
                page.error_code().as_deref(),
                Some("ERR_POSTERN_3105"),
                "{user}"
            );
            assert!(
                page.text().contains("href=\"/auth/authn\""),
                "a way to log in again"
            );
            assert!(
                browser.cookie(APP, SESSION).is_none(),
                "{user} got no session"
            );
            assert_eq!(
                world.upstream_saw(&path),
                0,
                "{user} never reached the upstream"
            );
            let again = browser.get(&world.url(0, APP, &path)).await;
            assert_eq!(
                again.status,
                StatusCode::FOUND,
                "{user}: still not logged in"
            );
            wait_for_event(&world.edges[0], &format!("block for {user}"), |e| {
                e["object"]["oauth"]["decision"] == "block"
                    && e["object"]["oauth"]["user"]["id"] == user
            })
            .await;
        }
    }
    let dave = world.upstream.last("/who/dave");
    assert_eq!(
        header(&dave, "ngrok-auth-user-email"),
        ["Dave@EXAMPLE.TEST"]
    );
}

#[tokio::test]
async fn sessions_expire_on_inactivity_and_maximum_duration() {
    let world = World::start(
        1,
        &[
            Tunnel {
                domain: "idle.example.test",
                oidc: "      inactivity_timeout: 2s\n",
            },
            Tunnel {
                domain: "max.example.test",
                oidc: "      maximum_duration: 3s\n",
            },
        ],
        "",
    )
    .await;

    // Inactivity: used within the timeout it lives; left alone it ends.
    let mut idle = world.browser(0);
    let (page, _) = world
        .login(&mut idle, "idle.example.test", "/", "alice")
        .await;
    assert_eq!(page.status, StatusCode::OK);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let page = idle.get(&world.url(0, "idle.example.test", "/busy")).await;
        assert_eq!(page.status, StatusCode::OK, "active within 2s");
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let page = idle
        .get(&world.url(0, "idle.example.test", "/after-idle"))
        .await;
    assert_eq!(page.status, StatusCode::FOUND, "idle for 2.5s: a new login");
    assert!(page.location().unwrap().starts_with(&world.idp.issuer));
    assert_eq!(world.upstream_saw("/after-idle"), 0);

    // Maximum duration: ends even while in use.
    let mut capped = world.browser(0);
    let began = Instant::now();
    let (page, hops) = world
        .login(&mut capped, "max.example.test", "/", "alice")
        .await;
    assert_eq!(page.status, StatusCode::OK);
    let callback = hops
        .iter()
        .find(|p| p.url.contains("/auth/callback?code="))
        .unwrap();
    assert!(callback.set_cookies(SESSION)[0].contains("Max-Age=3"));
    let ended = loop {
        let page = capped
            .get(&world.url(0, "max.example.test", "/capped"))
            .await;
        if page.status == StatusCode::FOUND {
            break began.elapsed();
        }
        assert_eq!(page.status, StatusCode::OK);
        assert!(
            began.elapsed() < Duration::from_secs(8),
            "the session outlived its maximum"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        ended >= Duration::from_millis(2900),
        "ended early: {ended:?}"
    );
}

/// Continuous authorization: after the auth check interval the edge asks
/// the provider again; a user whose email changed out of the allowed
/// domain is logged out.
#[tokio::test]
async fn auth_check_interval_reevaluates_the_user() {
    let world = World::start(
        1,
        &[Tunnel {
            domain: APP,
            oidc: "      allow_domains: [example.test]\n      auth_check_interval: 1s\n",
        }],
        "",
    )
    .await;
    let mut browser = world.browser(0);
    let (page, _) = world.login(&mut browser, APP, "/", "alice").await;
    assert_eq!(page.status, StatusCode::OK);
    // Checked again after a second: still allowed, and the data is fresh.
    world
        .idp
        .set_user("alice", json!({"name": "Alice L."}))
        .await;
    until(10, "the new name reaches the upstream", async || {
        let page = browser.get(&world.url(0, APP, "/name")).await;
        page.status == StatusCode::OK
            && header(&world.upstream.last("/name"), "ngrok-auth-user-name") == ["Alice L."]
    })
    .await;
    world
        .idp
        .set_user("alice", json!({"email": "alice@elsewhere.test"}))
        .await;
    let mut blocked = None;
    until(
        10,
        "the user is logged out once her email changed",
        async || {
            let page = browser.get(&world.url(0, APP, "/check")).await;
            let done = page.status == StatusCode::FORBIDDEN;
            if done {
                blocked = Some(page);
            }
            done
        },
    )
    .await;
    let blocked = blocked.unwrap();
    assert_eq!(blocked.error_code().as_deref(), Some("ERR_POSTERN_3105"));
    assert!(blocked.set_cookies(SESSION)[0].contains("Max-Age=0"));
    let after = browser.get(&world.url(0, APP, "/check")).await;
    assert_eq!(after.status, StatusCode::FOUND, "a new login is needed");
    wait_for_event(&world.edges[0], "block after the auth check", |e| {
        e["object"]["oauth"]["decision"] == "block"
    })
    .await;
}

// ---- what never reaches the upstream -------------------------------------------

#[tokio::test]
async fn spoofed_headers_session_cookies_and_auth_paths_never_reach_the_upstream() {
    let world = World::start(1, &[PLAIN], "").await;
    let mut browser = world.browser(0);
    world.login(&mut browser, APP, "/", "alice").await;
    browser.set_cookie(APP, "theme", "dark");
    let spoofs = [
        ("ngrok-auth-user-email", "root@evil.test"),
        ("Ngrok-Auth-User-Id", "root"),
        ("ngrok_auth_user_name", "Root"),
        ("NGROK-AUTH-OAUTH-ACCESS-TOKEN", "forged"),
        ("ngrok-auth-oauth-refresh-token", "forged"),
        ("ngrok-auth-user-email", "second@evil.test"),
    ];
    let page = browser
        .request("GET", &world.url(0, APP, "/spoof"), &spoofs, None)
        .await;
    assert_eq!(page.status, StatusCode::OK);
    let seen = world.upstream.last("/spoof");
    assert_eq!(
        header(&seen, "ngrok-auth-user-email"),
        ["alice@example.test"]
    );
    assert_eq!(header(&seen, "ngrok-auth-user-id"), ["alice"]);
    assert_eq!(header(&seen, "ngrok-auth-user-name"), ["Alice Liddell"]);
    assert_ne!(header(&seen, "ngrok-auth-oauth-access-token"), ["forged"]);
    assert!(seen.headers.get("ngrok_auth_user_name").is_none());
    assert!(
        header(&seen, "ngrok-auth-oauth-refresh-token")
            .iter()
            .all(|v| *v != "forged")
    );
    assert_eq!(
        header(&seen, "cookie"),
        ["theme=dark"],
        "only the site's own cookies"
    );

    // Without a session the spoofed identity is worth nothing.
    let mut stranger = world.browser(0);
    let page = stranger
        .request("GET", &world.url(0, APP, "/spoof2"), &spoofs, None)
        .await;
    assert_eq!(page.status, StatusCode::FOUND);
    assert_eq!(world.upstream_saw("/spoof2"), 0);

    // Nothing under /auth/, in any spelling, reaches the upstream, with or
    // without a session.
    let cookie = format!("{SESSION}={}", browser.cookie(APP, SESSION).unwrap());
    let before = world.upstream.requests().len();
    let variants = [
        "/auth/",
        "/auth",
        "/auth/whatever",
        "/auth/../secret",
        "/auth/%2e%2e/secret",
        "/auth%2flogout",
        "//auth/callback",
        "/AUTH/logout",
        "/Auth/Callback",
        "/auth/callback;x=1",
        "/auth/%252e%252e/secret",
        "/%61uth/logout",
        "/x/../auth/logout",
        "/x/%2e%2e/auth/logout",
        "/auth/logout%00",
        "/./auth/logout",
        "/auth/authn/../../secret",
        "/auth\\logout",
        "\\auth\\logout",
    ];
    for target in variants {
        for cookie in [None, Some(cookie.as_str())] {
            let status = raw_get(&world, 0, APP, target, cookie).await;
            assert_ne!(status, 200, "{target} (session: {})", cookie.is_some());
        }
    }
    let leaked: Vec<_> = world.upstream.requests()[before..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert!(leaked.is_empty(), "reached the upstream: {leaked:?}");
    // A protected path that merely mentions /auth/ in its query is normal.
    assert_eq!(
        raw_get(&world, 0, APP, "/secret?x=/auth/callback", Some(&cookie)).await,
        200
    );
    assert_eq!(
        raw_get(&world, 0, APP, "/secret?x=/auth/callback", None).await,
        302
    );
    assert_eq!(world.upstream_saw("/secret"), 1);
}

#[tokio::test]
async fn open_redirects_in_the_return_path_are_refused() {
    let world = World::start(1, &[PLAIN], "").await;
    let payloads: Vec<String> = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/openredirects.txt"),
    )
    .unwrap()
    .lines()
    .filter(|l| !l.is_empty() && !l.starts_with("# "))
    .map(str::to_string)
    .collect();
    assert!(payloads.len() > 150, "{}", payloads.len());
    let mut browser = world.browser(0);
    let mut accepted = Vec::new();
    for payload in &payloads {
        let url = world.url(
            0,
            APP,
            &format!("/auth/logout?redirect_path={}", percent_encode(payload)),
        );
        let page = browser.get(&url).await;
        assert_eq!(page.status, StatusCode::FOUND, "{payload}");
        let location = page.location().unwrap();
        if location != "/" {
            accepted.push((payload.clone(), location));
        }
    }
    assert!(
        accepted.is_empty(),
        "{} of {} accepted: {accepted:?}",
        accepted.len(),
        payloads.len()
    );
    eprintln!(
        "MEASURED open-redirect payloads refused: {} of {}",
        payloads.len(),
        payloads.len()
    );

    // As the login's return path: /auth/authn?redirect_path=…
    for payload in [
        "//evil.example",
        "/\\evil.example",
        "https://evil.example",
        "/%2F%2Fevil.example",
    ] {
        let mut b = world.browser(0);
        let start = b
            .get(&world.url(
                0,
                APP,
                &format!("/auth/authn?redirect_path={}", percent_encode(payload)),
            ))
            .await;
        assert_eq!(start.status, StatusCode::FOUND);
        let (page, hops) = b.login(start, "alice").await;
        let callback = hops
            .iter()
            .find(|p| p.url.contains("/auth/callback?code="))
            .unwrap();
        assert_eq!(callback.location().as_deref(), Some("/"), "{payload}");
        assert_eq!(page.status, StatusCode::OK);
    }
    // A fine return path is kept.
    let mut b = world.browser(0);
    let start = b
        .get(&world.url(
            0,
            APP,
            &format!(
                "/auth/authn?redirect_path={}",
                percent_encode("/deep/link?q=1")
            ),
        ))
        .await;
    let (page, _) = b.login(start, "alice").await;
    assert_eq!(page.url, world.url(0, APP, "/deep/link?q=1"));

    // As the captured request path itself (a valid request target).
    for target in ["//evil.example/x", "/\\evil.example"] {
        let mut b = world.browser(0);
        let status = raw_get(&world, 0, APP, target, None).await;
        assert_eq!(status, 302, "{target}");
        let start = b.get(&format!("{}{target}", world.url(0, APP, ""))).await;
        let (_, hops) = b.login(start, "alice").await;
        let callback = hops
            .iter()
            .find(|p| p.url.contains("/auth/callback?code="))
            .unwrap();
        assert_eq!(callback.location().as_deref(), Some("/"), "{target}");
    }
}

// ---- cookies, state and nonce ------------------------------------------------

#[tokio::test]
async fn forged_expired_and_foreign_cookies_mean_a_new_login_and_logins_never_keep_an_old_session()
{
    let world = World::start(
        1,
        &[
            PLAIN,
            Tunnel {
                domain: "app2.example.test",
                oidc: "",
            },
        ],
        "",
    )
    .await;
    let mut browser = world.browser(0);
    world.login(&mut browser, APP, "/", "alice").await;
    let good = browser.cookie(APP, SESSION).unwrap();
    let mut flipped = good.clone().into_bytes();
    flipped[5] = if flipped[5] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    let forged = [
        "random-value".to_string(),
        flipped,
        good[..good.len() - 1].to_string(),
        format!("{good}x"),
        "a".repeat(8 * 1024),
        String::new(),
    ];
    for value in &forged {
        let mut b = world.browser(0);
        b.set_cookie(APP, SESSION, value);
        let page = b.get(&world.url(0, APP, "/forged")).await;
        assert_eq!(page.status, StatusCode::FOUND, "cookie {:.20}…", value);
        assert!(page.location().unwrap().starts_with(&world.idp.issuer));
    }
    assert_eq!(world.upstream_saw("/forged"), 0);

    // Another endpoint's cookie (same parent domain, other host) is no session there.
    let mut foreign = world.browser(0);
    foreign.set_cookie("app2.example.test", SESSION, &good);
    let page = foreign
        .get(&world.url(0, "app2.example.test", "/foreign"))
        .await;
    assert_eq!(page.status, StatusCode::FOUND);

    // A session whose key expired in Redis.
    let mut expiring = world.browser(0);
    world.login(&mut expiring, APP, "/", "alice").await;
    let cookie = expiring.cookie(APP, SESSION).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, cookie.as_bytes());
    let key: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let out = tokio::process::Command::new("redis-cli")
        .args([
            "-p",
            &world.redis.port.to_string(),
            "pexpire",
            &format!("postern:oauth:session:{key}"),
            "1",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "the session key exists"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let page = expiring.get(&world.url(0, APP, "/expired")).await;
    assert_eq!(page.status, StatusCode::FOUND);
    assert!(
        page.set_cookies(SESSION)[0].contains("Max-Age=0"),
        "the dead cookie is cleared"
    );

    // Session fixation: a planted session cookie (the attacker's own, valid)
    // is dropped when the victim logs in, and the login gets a fresh id.
    let mut attacker = world.browser(0);
    world.login(&mut attacker, APP, "/", "bob").await;
    let planted = attacker.cookie(APP, SESSION).unwrap();
    let mut victim = world.browser(0);
    victim.set_cookie(APP, SESSION, &planted);
    let start = victim.get(&world.url(0, APP, "/auth/authn")).await;
    assert_eq!(start.status, StatusCode::FOUND);
    assert!(
        start.set_cookies(SESSION)[0].contains("Max-Age=0"),
        "sign-in start clears it"
    );
    let (page, _) = victim.login(start, "alice").await;
    assert_eq!(page.status, StatusCode::OK);
    let fresh = victim.cookie(APP, SESSION).unwrap();
    assert_ne!(fresh, planted);
    assert_eq!(
        header(&world.upstream.last("/"), "ngrok-auth-user-id"),
        ["alice"]
    );
    let old = attacker.get(&world.url(0, APP, "/old")).await;
    assert_eq!(old.status, StatusCode::FOUND, "the planted session is over");
}

#[tokio::test]
async fn state_codes_and_nonce_are_single_use_and_bound() {
    let world = World::start(
        1,
        &[
            PLAIN,
            Tunnel {
                domain: "app2.example.test",
                oidc: "",
            },
        ],
        "login_timeout = \"3s\"",
    )
    .await;
    let at_app_callback = |url: &str| url.contains("/auth/callback?code=");

    // Replays: the auth host's state and the endpoint's one-time code work once.
    let mut browser = world.browser(0);
    let (page, hops) = world.login(&mut browser, APP, "/", "alice").await;
    assert_eq!(page.status, StatusCode::OK);
    let auth_host_url = hops
        .iter()
        .find(|p| p.url.starts_with(&format!("https://{AUTH}:")))
        .unwrap()
        .url
        .clone();
    let handoff_url = hops
        .iter()
        .find(|p| at_app_callback(&p.url))
        .unwrap()
        .url
        .clone();
    let replay = browser.get(&auth_host_url).await;
    assert_eq!(replay.status, StatusCode::BAD_REQUEST);
    assert_eq!(replay.error_code().as_deref(), Some("ERR_POSTERN_3120"));
    let replay = browser.get(&handoff_url).await;
    assert_eq!(replay.error_code().as_deref(), Some("ERR_POSTERN_3120"));

    // No nonce cookie at the endpoint's callback: the login started in
    // another browser.
    let mut b = world.browser(0);
    let start = b.get(&world.url(0, APP, "/")).await;
    let (stopped, _) = b.login_until(start, "alice", at_app_callback).await;
    let callback = stopped.unwrap_err();
    let mut other = world.browser(0);
    let page = other.get(&callback).await;
    assert_eq!(page.error_code().as_deref(), Some("ERR_POSTERN_3121"));
    assert!(other.cookie(APP, SESSION).is_none());

    // A code for app.example.test presented at app2.example.test.
    let mut b = world.browser(0);
    let start = b.get(&world.url(0, APP, "/")).await;
    let (stopped, _) = b.login_until(start, "alice", at_app_callback).await;
    let wrong_host = stopped.unwrap_err().replace(APP, "app2.example.test");
    let page = b.get(&wrong_host).await;
    assert_eq!(page.error_code().as_deref(), Some("ERR_POSTERN_3124"));

    // A state for the wrong IdP round trip, or none at all.
    let none = browser
        .get(&world.url(0, AUTH, "/oauth2/callback?code=x"))
        .await;
    assert_eq!(none.error_code().as_deref(), Some("ERR_POSTERN_3107"));
    let forged = browser
        .get(&world.url(0, AUTH, "/oauth2/callback?code=x&state=18f00000000.forged"))
        .await;
    assert_eq!(forged.error_code().as_deref(), Some("ERR_POSTERN_3120"));

    // The IdP reports an error (the user declined).
    let mut b = world.browser(0);
    let start = b.get(&world.url(0, APP, "/declined")).await;
    let state = query_of(&start.location().unwrap())
        .into_iter()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1;
    let page = b
        .get(&world.url(
            0,
            AUTH,
            &format!(
                "/oauth2/callback?state={}&error=access_denied",
                percent_encode(&state)
            ),
        ))
        .await;
    assert_eq!(page.error_code().as_deref(), Some("ERR_POSTERN_3112"));
    assert!(page.text().contains("access_denied"));
    assert!(page.text().contains("/declined"), "a way to try again");

    // A login slower than the login timeout (3s here).
    let mut b = world.browser(0);
    let start = b.get(&world.url(0, APP, "/slow")).await;
    let (stopped, _) = b
        .login_until(start, "alice", |url| {
            url.starts_with(&format!("https://{AUTH}:"))
        })
        .await;
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let page = b.get(&stopped.unwrap_err()).await;
    assert_eq!(page.error_code().as_deref(), Some("ERR_POSTERN_3119"));
    assert_eq!(world.upstream_saw("/slow"), 0);
}

// ---- Redis down ----------------------------------------------------------------

/// Redis hung or gone: OAuth endpoints answer 503 with Retry-After within
/// the bound (Redis timeout + 500 ms), forward nothing, clear no cookie,
/// start no login; other endpoints are unaffected; everything works again
/// once Redis is back, without restarting the edge.
#[tokio::test]
async fn redis_down_fails_closed_and_recovers_by_itself() {
    let mut world = World::start(1, &[PLAIN], "").await;
    let bound = REDIS_TIMEOUT + Duration::from_millis(500);
    let mut browser = world.browser(0);
    world.login(&mut browser, APP, "/", "alice").await;
    // A login in flight, stopped at the endpoint's callback.
    let mut pending = world.browser(0);
    let start = pending.get(&world.url(0, APP, "/pending")).await;
    let (stopped, _) = pending
        .login_until(start, "alice", |u| u.contains("/auth/callback?code="))
        .await;
    let callback = stopped.unwrap_err();

    for how in ["hung (SIGSTOP)", "stopped"] {
        if how == "stopped" {
            world.redis.thaw();
            world.redis.stop();
        } else {
            world.redis.freeze();
        }
        let mut worst = Duration::ZERO;
        let mut check = async |b: &mut Browser, url: String, what: &str| {
            let began = Instant::now();
            let page = b.get(&url).await;
            let took = began.elapsed();
            worst = worst.max(took);
            assert_eq!(
                page.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{how}: {what}: {}",
                page.text()
            );
            assert_eq!(
                page.error_code().as_deref(),
                Some("ERR_POSTERN_3150"),
                "{how}: {what}"
            );
            assert_eq!(page.headers.get("retry-after").unwrap(), "2");
            assert!(page.location().is_none(), "no login loop");
            assert!(
                page.set_cookies(SESSION).is_empty(),
                "{how}: {what}: the cookie stays"
            );
            assert!(took <= bound, "{how}: {what} took {took:?}");
        };
        check(&mut browser, world.url(0, APP, "/down"), "with a session").await;
        check(
            &mut world.browser(0),
            world.url(0, APP, "/down"),
            "without a session",
        )
        .await;
        check(
            &mut pending.clone(),
            callback.clone(),
            "the endpoint's callback",
        )
        .await;
        check(&mut browser, world.url(0, APP, "/auth/logout"), "logout").await;
        let began = Instant::now();
        let plain = browser
            .get(&world.url(0, "plain.example.test", "/plain"))
            .await;
        assert_eq!(
            plain.status,
            StatusCode::OK,
            "{how}: endpoints without OAuth work"
        );
        assert!(began.elapsed() < Duration::from_millis(200));
        eprintln!(
            "MEASURED Redis {how}: slowest 503 {:.0} ms (Redis timeout {} ms)",
            worst.as_secs_f64() * 1000.0,
            REDIS_TIMEOUT.as_millis()
        );
    }
    assert_eq!(
        world.upstream_saw("/down"),
        0,
        "nothing reached the upstream"
    );
    assert_eq!(world.upstream_saw("/pending"), 0);

    world.redis.restart().await;
    let back = Instant::now();
    until(10, "OAuth endpoints work again", async || {
        browser.get(&world.url(0, APP, "/back")).await.status != StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let recovered = back.elapsed();
    // The restarted Redis is empty: a new login, which works end to end.
    let (page, _) = world.login(&mut browser, APP, "/back", "alice").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(world.upstream_saw("/back"), 1);
    eprintln!(
        "MEASURED recovery after Redis restart: {:.0} ms",
        recovered.as_secs_f64() * 1000.0
    );
}

// ---- binds, the admin API, OPTIONS -------------------------------------------------

#[tokio::test]
async fn bind_errors_have_codes() {
    let edge = TestEdge::start().await;
    let idp = OidcProvider::start(&[format!(
        "https://{AUTH}:{}/oauth2/callback",
        edge.addrs.https.port()
    )])
    .await;
    let tunnel = |oauth: &str, domain: &str| {
        format!("  web:\n    proto: http\n    addr: 9\n    domain: {domain}\n{oauth}")
    };
    for (yaml, code) in [
        (
            tunnel(
                &format!(
                    "    oidc:\n      issuer_url: {}\n      client_id: {CLIENT_ID}\n",
                    idp.issuer
                ),
                APP,
            ),
            "ERR_POSTERN_2229",
        ),
        (
            tunnel(
                &format!(
                    "    oauth:\n      provider: github\n      client_secret: {CLIENT_SECRET}\n"
                ),
                APP,
            ),
            "ERR_POSTERN_2229",
        ),
        (
            tunnel(
                "    oidc:\n      issuer_url: http://127.0.0.1:1\n      client_id: a\n      client_secret: b\n",
                APP,
            ),
            "ERR_POSTERN_2227",
        ),
        (
            tunnel(
                "    oauth:\n      provider: myspace\n      client_id: a\n      client_secret: b\n",
                APP,
            ),
            "ERR_POSTERN_2228",
        ),
        (
            tunnel(
                "    oauth:\n      provider: github\n      client_id: a\n      client_secret: b\n      allow_emails: [not-an-email]\n",
                APP,
            ),
            "ERR_POSTERN_2228",
        ),
        (tunnel("", AUTH), "ERR_POSTERN_326"),
    ] {
        let err = edge.agent_with(&edge.token, &yaml).await.unwrap_err();
        assert!(
            format!("{err:#}").contains(code),
            "{code} not in {err:#} for\n{yaml}"
        );
    }
    // Without Redis the edge keeps sessions in memory: a named provider
    // without discovery binds.
    let ok = tunnel(
        "    oauth:\n      provider: github\n      client_id: a\n      client_secret: b\n",
        APP,
    );
    edge.agent(&ok).await;
}

#[tokio::test]
async fn admin_api_lists_and_revokes_sessions() {
    let world = World::start(1, &[PLAIN], "").await;
    let (mut a, mut b, mut c) = (world.browser(0), world.browser(0), world.browser(0));
    world.login(&mut a, APP, "/", "alice").await;
    world.login(&mut b, APP, "/", "alice").await;
    world.login(&mut c, APP, "/", "bob").await;
    let admin = format!("http://{}", world.edges[0].addrs.admin.unwrap());
    let auth = format!("Bearer {API_KEY}");
    let mut api = Browser::plain();
    let call = async |api: &mut Browser, method: &str, path: &str| {
        api.request(
            method,
            &format!("{admin}{path}"),
            &[("authorization", auth.as_str())],
            None,
        )
        .await
    };

    let list = call(&mut api, "GET", "/oauth_sessions?user_id=alice").await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text());
    let body: Value = serde_json::from_slice(&list.body).unwrap();
    let sessions = body["oauth_sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2, "{body:#}");
    assert_eq!(sessions[0]["user"]["email"], "alice@example.test");
    assert_eq!(sessions[0]["host"], APP);
    assert_eq!(sessions[0]["app_client_id"], CLIENT_ID);
    let by_email = call(
        &mut api,
        "GET",
        "/oauth_sessions?email=ALICE%40example.test",
    )
    .await;
    let by_email: Value = serde_json::from_slice(&by_email.body).unwrap();
    assert_eq!(by_email["oauth_sessions"].as_array().unwrap().len(), 2);

    // Which session is a's? Revoke the first and see who is logged out.
    let id = sessions[0]["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("oas_"));
    let deleted = call(&mut api, "DELETE", &format!("/oauth_sessions/{id}")).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let again = call(&mut api, "DELETE", &format!("/oauth_sessions/{id}")).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    let statuses = [
        a.get(&world.url(0, APP, "/r1")).await.status,
        b.get(&world.url(0, APP, "/r1")).await.status,
    ];
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::FOUND).count(),
        1,
        "exactly one of alice's sessions ended: {statuses:?}"
    );

    let all = call(&mut api, "DELETE", "/oauth_sessions?user_id=alice").await;
    assert_eq!(all.status, StatusCode::OK);
    let all: Value = serde_json::from_slice(&all.body).unwrap();
    assert_eq!(all["deleted"], 1);
    for browser in [&mut a, &mut b] {
        assert_eq!(
            browser.get(&world.url(0, APP, "/r2")).await.status,
            StatusCode::FOUND
        );
    }
    assert_eq!(
        c.get(&world.url(0, APP, "/r2")).await.status,
        StatusCode::OK,
        "bob keeps his"
    );
    let list = call(&mut api, "GET", "/oauth_sessions?user_id=alice").await;
    let body: Value = serde_json::from_slice(&list.body).unwrap();
    assert!(body["oauth_sessions"].as_array().unwrap().is_empty());

    let unauthorized = api
        .get(&format!("{admin}/oauth_sessions?user_id=alice"))
        .await;
    assert_eq!(unauthorized.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn options_passthrough_fetches_and_plain_http() {
    let world = World::start(
        1,
        &[Tunnel {
            domain: APP,
            oidc: "      options_passthrough: true\n",
        }],
        "",
    )
    .await;
    let mut browser = world.browser(0);
    let page = browser
        .request(
            "OPTIONS",
            &world.url(0, APP, "/api"),
            &[
                ("origin", "https://other.example.test"),
                ("ngrok-auth-user-id", "root"),
            ],
            None,
        )
        .await;
    assert_eq!(page.status, StatusCode::OK);
    let seen = world.upstream.last("/api");
    assert_eq!(seen.method, "OPTIONS");
    assert!(
        !seen
            .headers
            .keys()
            .any(|k| k.as_str().starts_with("ngrok-auth")),
        "no identity on passthrough OPTIONS: {:?}",
        seen.headers
    );

    // A fetch cannot follow a login redirect: 401 and no login started.
    let page = browser
        .request(
            "GET",
            &world.url(0, APP, "/api"),
            &[("sec-fetch-mode", "cors")],
            None,
        )
        .await;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED);
    assert_eq!(page.error_code().as_deref(), Some("ERR_POSTERN_3100"));
    assert!(page.location().is_none());
    let page = browser
        .request(
            "GET",
            &world.url(0, APP, "/api"),
            &[("sec-fetch-mode", "navigate")],
            None,
        )
        .await;
    assert_eq!(page.status, StatusCode::FOUND);

    // Plain HTTP goes to HTTPS (the session cookie is Secure).
    let page = browser
        .get(&format!(
            "http://{APP}:{}/x?y=1",
            world.edges[0].addrs.http.unwrap().port()
        ))
        .await;
    assert_eq!(page.status, StatusCode::FOUND);
    assert_eq!(page.location().unwrap(), world.url(0, APP, "/x?y=1"));
    assert_eq!(
        world
            .upstream
            .requests()
            .iter()
            .filter(|r| r.method == "GET")
            .count(),
        0
    );
}

/// Issue 28: `openid-connect` as a Traffic Policy action (no `oidc:`
/// module), and a later rule deciding on the signed-in user it exposes.
#[tokio::test]
async fn openid_connect_as_a_policy_action_and_a_rule_on_the_user() {
    let redis = RedisServer::start().await;
    let edge = TestEdge::start_with(&oauth_toml(&redis, "")).await;
    let callback = format!("https://{AUTH}:{}/oauth2/callback", edge.addrs.https.port());
    let idp = OidcProvider::start(&[callback]).await;
    let upstream = HttpUpstream::start().await;
    let policy = format!(
        "on_http_request:\n\
         \x20 - actions:\n\
         \x20     - type: openid-connect\n\
         \x20       config: {{issuer_url: \"{issuer}\", client_id: {CLIENT_ID}, client_secret: {CLIENT_SECRET}, scopes: [openid, email, profile]}}\n\
         \x20 - expressions: [\"actions.ngrok.oauth.identity.email != 'alice@example.test'\"]\n\
         \x20   actions: [{{type: custom-response, config: {{status_code: 403, body: \"only alice\"}}}}]\n",
        issuer = idp.issuer
    );
    let indented: String = policy.lines().map(|l| format!("      {l}\n")).collect();
    let (_agent, _) = edge
        .agent(&format!(
            "  web:\n    proto: http\n    addr: {}\n    domain: {APP}\n    inspect: false\n    traffic_policy:\n{indented}",
            upstream.port()
        ))
        .await;
    let url = format!("https://{APP}:{}/private", edge.addrs.https.port());
    let mut alice = Browser::new(&[edge.ca_pem().as_path()], edge.addrs.https.port());
    let start = alice.get(&url).await;
    assert_eq!(start.status, StatusCode::FOUND, "{}", start.text());
    let (page, _) = alice.login(start, "alice").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text());
    assert_eq!(page.text(), "hello from upstream");
    let seen = upstream.last("/private");
    assert_eq!(
        header(&seen, "ngrok-auth-user-email"),
        ["alice@example.test"]
    );
    let mut bob = Browser::new(&[edge.ca_pem().as_path()], edge.addrs.https.port());
    let start = bob.get(&url).await;
    let (page, _) = bob.login(start, "bob").await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert_eq!(page.text(), "only alice");
    assert_eq!(
        upstream
            .requests()
            .iter()
            .filter(|r| r.path == "/private")
            .count(),
        1
    );
}
