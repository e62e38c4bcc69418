//! Traffic Policy end to end: an agent's `traffic_policy` compiled by a
//! real edge and applied to requests from curl, and bad policies refused at
//! bind naming the rule.

use postern_tests::{HttpUpstream, RedisServer, TcpEcho, TestEdge};

fn tunnel(name: &str, domain: &str, port: u16, policy: &str) -> String {
    let indented: String = policy.lines().map(|l| format!("      {l}\n")).collect();
    format!(
        "  {name}:\n    proto: http\n    addr: {port}\n    domain: {domain}\n    inspect: false\n    traffic_policy:\n{indented}"
    )
}

const POLICY: &str = r#"on_http_request:
  - name: teapot
    expressions: ["req.url.path == '/teapot'"]
    actions:
      - type: custom-response
        config:
          status_code: 418
          body: "short and stout, asked with ${req.method}"
          headers: {x-brewed: "yes"}
  - name: no deletes
    expressions: ["req.method == 'DELETE'"]
    actions: [{type: deny, config: {status_code: 405}}]
  - name: moved
    expressions: ["req.url.path.startsWith('/old/')"]
    actions: [{type: redirect, config: {from: "/old/(.*)", to: "/new/$1", status_code: 301}}]
  - name: api v1 is v2 now
    actions: [{type: url-rewrite, config: {from: "/api/v1/", to: "/api/v2/"}}]
  - actions:
      - type: set-vars
        config: {vars: [{who: "${conn.client_ip}"}]}
      - type: add-headers
        config: {headers: {x-client: "${vars.who}", x-endpoint: "${endpoint.id}"}}
      - type: remove-headers
        config: {headers: [x-secret]}
on_http_response:
  - expressions: ["res.status_code == 200 && hasReqHeader('x-want-hsts')"]
    actions:
      - type: add-headers
        config: {headers: {strict-transport-security: "max-age=31536000"}}
"#;

#[tokio::test]
async fn an_agents_policy_answers_redirects_rewrites_and_edits_headers() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let host = "policy.example.test";
    let (agent, status) = edge
        .agent(&tunnel("web", host, upstream.port(), POLICY))
        .await;
    assert_eq!(status.tunnels.len(), 1);

    // A custom response, without the upstream.
    let (code, head, body) = edge.fetch(host, "/teapot", &[]).await;
    assert_eq!(code, 418);
    assert_eq!(body, "short and stout, asked with GET");
    assert!(head.contains("x-brewed: yes"), "{head}");
    assert!(head.contains("content-type: text/plain"), "{head}");
    // Denied, without the upstream.
    let (code, _, _) = edge.fetch(host, "/anything", &["-X", "DELETE"]).await;
    assert_eq!(code, 405);
    assert!(
        upstream
            .requests()
            .iter()
            .all(|r| r.path != "/teapot" && r.method != "DELETE")
    );
    // A redirect to the rewritten URL.
    let (code, head, _) = edge.fetch(host, "/old/page", &[]).await;
    assert_eq!(code, 301);
    let location = head
        .lines()
        .find_map(|l| l.strip_prefix("location: "))
        .unwrap();
    assert_eq!(location.trim(), edge.https_url(host, "/new/page"));
    // A rewrite the upstream sees.
    let (code, _, _) = edge.fetch(host, "/api/v1/items", &[]).await;
    assert_eq!(code, 200);
    assert_eq!(upstream.requests().last().unwrap().path, "/api/v2/items");
    // Variables and headers.
    let (code, head, _) = edge
        .fetch(
            host,
            "/echo",
            &["-H", "x-secret: hush", "-H", "x-want-hsts: 1"],
        )
        .await;
    assert_eq!(code, 200);
    let seen = upstream.last("/echo");
    assert_eq!(seen.headers["x-client"], "127.0.0.1");
    assert!(
        seen.headers["x-endpoint"]
            .to_str()
            .unwrap()
            .starts_with("ep_")
    );
    assert!(!seen.headers.contains_key("x-secret"));
    assert!(
        head.contains("strict-transport-security: max-age=31536000"),
        "{head}"
    );
    let (_, head, _) = edge.fetch(host, "/echo", &[]).await;
    assert!(
        !head.contains("strict-transport-security"),
        "only when asked: {head}"
    );
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn basic_auth_from_a_policy_asks_for_and_checks_credentials() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let host = "private.example.test";
    let policy = "on_http_request:\n  - actions:\n      - type: basic-auth\n        config: {credentials: [\"alice:correct horse\"]}\n";
    let (agent, _) = edge
        .agent(&tunnel("web", host, upstream.port(), policy))
        .await;
    let (code, head, _) = edge.fetch(host, "/echo", &[]).await;
    assert_eq!(code, 401);
    assert!(
        head.contains("www-authenticate: basic realm=\"ngrok\""),
        "{head}"
    );
    assert!(
        head.contains("ngrok-error-code: err_postern_9016"),
        "{head}"
    );
    let (code, _, _) = edge
        .fetch(host, "/echo", &["-u", "alice:wrong password"])
        .await;
    assert_eq!(code, 401);
    let (code, _, _) = edge
        .fetch(host, "/echo", &["-u", "alice:correct horse"])
        .await;
    assert_eq!(code, 200);
    assert!(upstream.last("/echo").headers.contains_key("authorization"));
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_tcp_endpoints_connect_rules_close_refused_visitors() {
    let edge = TestEdge::start().await;
    let echo = TcpEcho::start(false).await;
    let policy = "on_tcp_connect:\n  - actions:\n      - type: restrict-ips\n        config: {deny: [127.0.0.0/8]}\n";
    let indented: String = policy.lines().map(|l| format!("      {l}\n")).collect();
    let (agent, status) = edge
        .agent(&format!(
            "  db:\n    proto: tcp\n    addr: {}\n    traffic_policy:\n{indented}",
            echo.addr.port()
        ))
        .await;
    let url = &status.tunnels[0].1;
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = conn.write_all(b"hello").await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut buf))
        .await
        .expect("the edge closes the connection");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "nothing is echoed: {read:?}"
    );
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_policies_are_refused_at_bind_naming_the_rule_and_the_reason() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let cases = [
        ("on_http_requests: []\n", "on_http_requests"),
        (
            "on_http_request:\n  - actions: [{type: teleport}]\n",
            "on_http_request[0].actions[0] (teleport): unknown action type \"teleport\"",
        ),
        (
            "on_http_request:\n  - expressions: [\"req.method ==\"]\n    actions: [{type: deny}]\n",
            "on_http_request[0].expressions[0]: does not compile",
        ),
        (
            "on_http_request:\n  - expressions: [\"req.nope == 1\"]\n    actions: [{type: deny}]\n",
            "unknown variable `req.nope`",
        ),
        (
            "on_http_response:\n  - actions: [{type: deny}]\n",
            "deny does not run in on_http_response",
        ),
        (
            "on_http_request:\n  - actions: [{type: http-request, config: {url: \"https://x.internal\"}}]\n",
            "not supported by Postern",
        ),
        (
            "on_http_request:\n  - actions: [{type: basic-auth, config: {credentials: [\"bob:short\"]}}]\n",
            "8 to 128 characters",
        ),
    ];
    for (i, (policy, want)) in cases.iter().enumerate() {
        let err = edge
            .agent_with(
                &edge.token.clone(),
                &tunnel(
                    "web",
                    &format!("bad{i}.example.test"),
                    upstream.port(),
                    policy,
                ),
            )
            .await
            .err()
            .unwrap_or_else(|| panic!("case {i} was accepted: {policy}"));
        let text = format!("{err:#}");
        assert!(text.contains("ERR_POSTERN_2236"), "case {i}: {text}");
        assert!(text.contains(want), "case {i}: {want:?} not in {text}");
    }
}

#[tokio::test]
async fn responses_are_compressed_by_what_the_visitor_accepts() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let host = "zip.example.test";
    let policy = "on_http_response:\n  - actions: [{type: compress-response}]\n";
    let (agent, _) = edge
        .agent(&tunnel("web", host, upstream.port(), policy))
        .await;
    for (accept, encoding) in [
        ("gzip", "gzip"),
        ("br, gzip;q=0.5", "br"),
        ("deflate", "deflate"),
    ] {
        // curl decodes what it asked for; the body must come out whole.
        let header = format!("accept-encoding: {accept}");
        let (code, head, body) = edge
            .fetch(host, "/bytes/200000", &["-H", &header, "--compressed"])
            .await;
        assert_eq!(code, 200);
        assert!(
            head.contains(&format!("content-encoding: {encoding}")),
            "{head}"
        );
        assert!(!head.contains("content-length: 200000"), "{head}");
        assert!(head.contains("vary: accept-encoding"), "{head}");
        assert_eq!(body.len(), 200_000, "{accept}");
    }
    // Nothing accepted, or a small body: as it was.
    let (_, head, body) = edge.fetch(host, "/bytes/200000", &[]).await;
    assert!(!head.contains("content-encoding"), "{head}");
    assert_eq!(body.len(), 200_000);
    let (_, head, _) = edge
        .fetch(host, "/bytes/100", &["-H", "accept-encoding: gzip"])
        .await;
    assert!(!head.contains("content-encoding"), "{head}");
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_circuit_breaker_opens_on_upstream_errors_and_closes_after_a_good_probe() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let host = "fragile.example.test";
    let policy = "on_http_request:\n  - actions:\n      - type: circuit-breaker\n        config: {error_threshold: 0.5, volume_threshold: 4, tripped_duration: 1s}\n";
    let (agent, _) = edge
        .agent(&tunnel("web", host, upstream.port(), policy))
        .await;
    for _ in 0..4 {
        let (code, _, _) = edge.fetch(host, "/status/500", &[]).await;
        assert_eq!(code, 500, "the upstream's own error passes while closed");
    }
    let (code, head, _) = edge.fetch(host, "/status/200", &[]).await;
    assert_eq!(code, 503, "open: refused at the edge");
    assert!(head.contains("err_postern_3202"), "{head}");
    let seen = upstream.requests().len();
    // After the tripped time one probe goes through; a good answer closes it.
    let mut code = 503;
    for _ in 0..100 {
        (code, _, _) = edge.fetch(host, "/status/200", &[]).await;
        if code == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        code, 200,
        "the probe went through once the breaker half-opened"
    );
    assert_eq!(
        upstream.requests().len(),
        seen + 1,
        "refused requests never reached it"
    );
    let (code, _, _) = edge.fetch(host, "/status/200", &[]).await;
    assert_eq!(code, 200, "closed again");
    agent.shutdown().await.unwrap();
}

/// Signatures computed here as each provider's documentation describes,
/// independently of the edge.
mod webhooks {
    use super::*;
    use base64::Engine;

    /// Header names and values a provider sends.
    type Headers = Vec<(String, String)>;

    fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
        ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), data)
            .as_ref()
            .to_vec()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[tokio::test]
    async fn each_providers_signature_is_verified_and_a_forgery_refused() {
        let edge = TestEdge::start().await;
        let upstream = HttpUpstream::start().await;
        let body = r#"{"event":"push","id":42}"#;
        let b64 = base64::engine::general_purpose::STANDARD;
        let ts = now().to_string();
        let svix_key = b"svix test key 0123456789abcdef!";
        let cases: Vec<(&str, String, Headers)> = vec![
            (
                "github",
                "gh-secret".into(),
                vec![(
                    "x-hub-signature-256".into(),
                    format!(
                        "sha256={}",
                        hex::encode(hmac_sha256(b"gh-secret", body.as_bytes()))
                    ),
                )],
            ),
            (
                "stripe",
                "whsec_stripe_test".into(),
                vec![(
                    "stripe-signature".into(),
                    format!(
                        "t={ts},v1={}",
                        hex::encode(hmac_sha256(
                            b"whsec_stripe_test",
                            format!("{ts}.{body}").as_bytes()
                        ))
                    ),
                )],
            ),
            (
                "shopify",
                "shpss_test".into(),
                vec![(
                    "x-shopify-hmac-sha256".into(),
                    b64.encode(hmac_sha256(b"shpss_test", body.as_bytes())),
                )],
            ),
            (
                "gitlab",
                "gitlab-token".into(),
                vec![("x-gitlab-token".into(), "gitlab-token".into())],
            ),
            (
                "svix",
                format!("whsec_{}", b64.encode(svix_key)),
                vec![
                    ("svix-id".into(), "msg_1".into()),
                    ("svix-timestamp".into(), ts.clone()),
                    (
                        "svix-signature".into(),
                        format!(
                            "v1,{}",
                            b64.encode(hmac_sha256(
                                svix_key,
                                format!("msg_1.{ts}.{body}").as_bytes()
                            ))
                        ),
                    ),
                ],
            ),
            (
                "slack",
                "slack-signing".into(),
                vec![
                    ("x-slack-request-timestamp".into(), ts.clone()),
                    (
                        "x-slack-signature".into(),
                        format!(
                            "v0={}",
                            hex::encode(hmac_sha256(
                                b"slack-signing",
                                format!("v0:{ts}:{body}").as_bytes()
                            ))
                        ),
                    ),
                ],
            ),
        ];
        for (i, (provider, secret, headers)) in cases.iter().enumerate() {
            let host = format!("hook{i}.example.test");
            let policy = format!(
                "on_http_request:\n  - actions:\n      - type: verify-webhook\n        config: {{provider: {provider}, secret: \"{secret}\"}}\n"
            );
            let (agent, _) = edge
                .agent(&tunnel(
                    &format!("hook{i}"),
                    &host,
                    upstream.port(),
                    &policy,
                ))
                .await;
            let mut args: Vec<String> = vec![
                "-X".into(),
                "POST".into(),
                "--data-binary".into(),
                body.into(),
            ];
            for (k, v) in headers {
                args.extend(["-H".into(), format!("{k}: {v}")]);
            }
            let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, _, echoed) = edge.fetch(&host, "/echo", &args_ref).await;
            assert_eq!(code, 200, "{provider}: a genuine webhook passes");
            assert!(echoed.starts_with("POST /echo"), "{provider}: {echoed}");
            // The same signature on another body is a forgery.
            let mut forged = args.clone();
            forged[3] = r#"{"event":"push","id":43}"#.into();
            let forged_ref: Vec<&str> = forged.iter().map(String::as_str).collect();
            let (code, head, _) = edge.fetch(&host, "/echo", &forged_ref).await;
            if *provider == "gitlab" {
                assert_eq!(code, 200, "gitlab signs nothing but the token");
            } else {
                assert_eq!(code, 403, "{provider}: a forged body is refused");
                assert!(head.contains("err_postern_3204"), "{head}");
            }
            agent.shutdown().await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_per_ip_rate_limit_answers_429_past_capacity_and_recovers() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let host = "limited.example.test";
    let policy = "on_http_request:\n  - actions:\n      - type: rate-limit\n        config: {name: per ip, algorithm: sliding_window, capacity: 3, rate: 2s, bucket_key: [conn.client_ip]}\n";
    let (agent, _) = edge
        .agent(&tunnel("web", host, upstream.port(), policy))
        .await;
    // The first 3 pass; within a few more (a window may roll over between
    // requests, and the previous one then weighs a little less) one is
    // refused.
    let mut codes = Vec::new();
    let (mut code, mut head) = (0, String::new());
    while code != 429 && codes.len() < 20 {
        (code, head, _) = edge.fetch(host, "/", &[]).await;
        codes.push(code);
    }
    assert_eq!(&codes[..3], [200, 200, 200], "{codes:?}");
    assert_eq!(code, 429, "{codes:?}");
    assert!(head.contains("retry-after: "), "{head}");
    assert!(head.contains("err_postern_9018"), "{head}");
    // Two quiet windows later the count has decayed.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    assert_eq!(edge.fetch(host, "/", &[]).await.0, 200, "recovered");
    agent.shutdown().await.unwrap();
}

mod jwt {
    use super::*;
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves `body` as JSON to every request on a loopback port.
    async fn serve_json(body: String) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        port
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[tokio::test]
    async fn a_jwt_signed_by_the_issuers_key_passes_and_a_tampered_one_does_not() {
        let edge = TestEdge::start().await;
        let upstream = HttpUpstream::start().await;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = key.public_key_raw().to_vec();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "test-key", "alg": "ES256", "use": "sig",
            "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..65]),
        }]});
        let jwks_port = serve_json(jwks.to_string()).await;
        let signing = jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der());
        let sign = |claims: serde_json::Value| {
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
            header.kid = Some("test-key".into());
            jsonwebtoken::encode(&header, &claims, &signing).unwrap()
        };
        let issuer = "https://issuer.example.test";
        let good = sign(
            serde_json::json!({"iss": issuer, "aud": "orders-api", "sub": "u1", "exp": now() + 300}),
        );
        let host = "jwt.example.test";
        let policy = format!(
            "on_http_request:\n  - actions:\n      - type: jwt-validation\n        config:\n          issuer: {{allow_list: [{{value: \"{issuer}\"}}]}}\n          audience: {{allow_list: [{{value: orders-api}}]}}\n          http: {{tokens: [{{type: jwt, method: header, name: Authorization, prefix: \"Bearer \"}}]}}\n          jws: {{allowed_algorithms: [ES256], keys: {{sources: {{additional_jkus: [\"http://127.0.0.1:{jwks_port}/jwks.json\"]}}}}}}\n"
        );
        let (agent, _) = edge
            .agent(&tunnel("web", host, upstream.port(), &policy))
            .await;
        let bearer = |token: &str| format!("authorization: Bearer {token}");
        let (code, _, _) = edge.fetch(host, "/echo", &["-H", &bearer(&good)]).await;
        assert_eq!(code, 200, "a good token passes");
        assert!(upstream.last("/echo").headers.contains_key("authorization"));
        // The payload changed after signing.
        let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
        let payload = String::from_utf8(b64.decode(&parts[1]).unwrap()).unwrap();
        parts[1] = b64.encode(payload.replace("u1", "admin"));
        let tampered = parts.join(".");
        let wrong_issuer = sign(
            serde_json::json!({"iss": "https://evil.example", "aud": "orders-api", "exp": now() + 300}),
        );
        let expired =
            sign(serde_json::json!({"iss": issuer, "aud": "orders-api", "exp": now() - 600}));
        let wrong_audience =
            sign(serde_json::json!({"iss": issuer, "aud": "billing", "exp": now() + 300}));
        for (what, token) in [
            ("tampered", tampered),
            ("another issuer", wrong_issuer),
            ("expired", expired),
            ("another audience", wrong_audience),
        ] {
            let (code, head, _) = edge.fetch(host, "/echo", &["-H", &bearer(&token)]).await;
            assert_eq!(code, 401, "{what}");
            assert!(
                head.contains("www-authenticate: bearer error=\"invalid_token\""),
                "{head}"
            );
        }
        let (code, _, _) = edge.fetch(host, "/echo", &[]).await;
        assert_eq!(code, 401, "no token");
        agent.shutdown().await.unwrap();
    }
}

/// ngrok's A/B test example ("How to run an A/B test"), unchanged: half
/// the traffic to one internal endpoint, the rest to another. Internal
/// endpoints are reachable only that way.
/// With `rate_limit.store = "redis"` two edges sharing one Redis count a
/// visitor's requests together; with Redis gone each edge counts alone and
/// still serves.
#[tokio::test]
async fn rate_limits_are_counted_together_through_redis_and_served_without_it() {
    let mut redis = RedisServer::start().await;
    let extra = format!(
        "[oauth]\nredis_url = \"{}\"\nsession_key = \"{}\"\n[rate_limit]\nstore = \"redis\"\n",
        redis.url(),
        "k".repeat(40)
    );
    let (a, b) = (
        TestEdge::start_with(&extra).await,
        TestEdge::start_with(&extra).await,
    );
    let upstream = HttpUpstream::start().await;
    let host = "shared-limit.example.test";
    let policy = "on_http_request:\n  - actions:\n      - type: rate-limit\n        config: {name: shared, algorithm: sliding_window, capacity: 4, rate: 60s, bucket_key: [conn.client_ip]}\n";
    let tunnel = tunnel("web", host, upstream.port(), policy);
    let (_at_a, _) = a.agent(&tunnel).await;
    let (_at_b, _) = b.agent(&tunnel).await;
    let mut codes = Vec::new();
    for edge in [&a, &b, &a, &b, &a, &b] {
        codes.push(edge.fetch(host, "/", &[]).await.0);
    }
    assert_eq!(
        codes,
        [200, 200, 200, 200, 429, 429],
        "4 per minute in all: the fifth request is refused at either edge"
    );

    redis.stop();
    let (code, _, _) = a.fetch(host, "/", &[]).await;
    assert_eq!(code, 200, "without Redis the edge counts alone and serves");
}

#[tokio::test]
async fn ngroks_ab_test_example_splits_traffic_between_internal_endpoints() {
    let edge = TestEdge::start().await;
    let (a, b) = (HttpUpstream::start().await, HttpUpstream::start().await);
    let example = "on_http_request:\n- expressions:\n  - rand.double() <= 0.5\n  actions:\n  - type: forward-internal\n    config:\n      url: https://a.internal\n- actions:\n  - type: forward-internal\n    config:\n      url: https://b.internal\n";
    let host = "ab.example.test";
    let tunnels = format!(
        "{}  a:\n    proto: http\n    addr: {}\n    domain: a.internal\n    inspect: false\n  b:\n    proto: http\n    addr: {}\n    domain: b.internal\n    inspect: false\n",
        tunnel("web", host, 9, example),
        a.port(),
        b.port()
    );
    let (agent, status) = edge.agent(&tunnels).await;
    assert!(
        status
            .tunnels
            .iter()
            .any(|(_, url)| url == "https://a.internal"),
        "{status:?}"
    );
    for i in 0..40 {
        let (code, _, body) = edge.fetch(host, &format!("/r{i}"), &[]).await;
        assert_eq!((code, body.as_str()), (200, "hello from upstream"));
    }
    let (to_a, to_b) = (a.requests().len(), b.requests().len());
    assert_eq!(to_a + to_b, 40);
    assert!(to_a > 0 && to_b > 0, "both sides served: {to_a} / {to_b}");
    assert_eq!(
        a.requests()[0].headers["host"]
            .to_str()
            .unwrap()
            .split(':')
            .next(),
        Some(host),
        "the Host stays the public name"
    );
    // Not reachable from outside: no listener routes the name.
    let status = edge
        .https_status("a.internal", "/", &["--max-time", "5"])
        .await;
    assert_eq!(status, "000", "refused in the TLS handshake");
    agent.shutdown().await.unwrap();
}

/// ngrok's documentation examples, as published: user agent filtering
/// (`req.user_agent.name`, `req.user_agent.is_bot`) and "deny non-GET
/// requests".
#[tokio::test]
async fn ngroks_user_agent_and_method_examples_run_unchanged() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let examples = [
        "on_http_request:\n- expressions:\n  - req.user_agent.name == 'Edge'\n  actions:\n  - type: custom-response\n    config:\n      status_code: 200\n      body: Hello Edge User!\n",
        "on_http_request:\n- expressions:\n  - req.user_agent.is_bot\n  actions:\n  - type: deny\n    config:\n      status_code: 403\n",
        "on_http_request:\n- expressions:\n  - \"req.method != 'GET'\"\n  actions:\n  - type: deny\n",
    ];
    let mut tunnels = String::new();
    for (i, example) in examples.iter().enumerate() {
        tunnels.push_str(&tunnel(
            &format!("ex{i}"),
            &format!("ex{i}.example.test"),
            upstream.port(),
            example,
        ));
    }
    let (agent, _) = edge.agent(&tunnels).await;
    let edge_ua = "user-agent: Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 Edg/120.0.0.0";
    let firefox =
        "user-agent: Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0";
    let googlebot =
        "user-agent: Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
    let (code, _, body) = edge.fetch("ex0.example.test", "/", &["-H", edge_ua]).await;
    assert_eq!((code, body.as_str()), (200, "Hello Edge User!"));
    let (_, _, body) = edge.fetch("ex0.example.test", "/", &["-H", firefox]).await;
    assert_eq!(body, "hello from upstream");
    assert_eq!(
        edge.fetch("ex1.example.test", "/", &["-H", googlebot])
            .await
            .0,
        403
    );
    assert_eq!(
        edge.fetch("ex1.example.test", "/", &["-H", firefox])
            .await
            .0,
        200
    );
    assert_eq!(
        edge.fetch("ex2.example.test", "/", &["-X", "POST"]).await.0,
        403
    );
    assert_eq!(edge.fetch("ex2.example.test", "/", &[]).await.0, 200);
    agent.shutdown().await.unwrap();
}

/// The operator's policy for a domain (`[[endpoint_policies]]`) runs
/// before the agent's, which cannot bypass it.
#[tokio::test]
async fn the_operators_policy_runs_first_and_the_agent_cannot_bypass_it() {
    let edge = TestEdge::start_with(
        "[[endpoint_policies]]\ndomain = \"*.guarded.example.test\"\ntraffic_policy = \"\"\"\non_http_request:\n  - actions:\n      - type: basic-auth\n        config: {credentials: [\"ops:operator secret\"]}\n\"\"\"\n",
    )
    .await;
    let upstream = HttpUpstream::start().await;
    // The agent's own policy answers everything itself…
    let agents = "on_http_request:\n  - actions: [{type: custom-response, config: {status_code: 200, body: agent says hi}}]\n";
    let (agent, _) = edge
        .agent(&tunnel(
            "web",
            "app.guarded.example.test",
            upstream.port(),
            agents,
        ))
        .await;
    // …but only after the operator's basic auth.
    let (code, head, _) = edge.fetch("app.guarded.example.test", "/", &[]).await;
    assert_eq!(code, 401, "{head}");
    let (code, _, body) = edge
        .fetch(
            "app.guarded.example.test",
            "/",
            &["-u", "ops:operator secret"],
        )
        .await;
    assert_eq!((code, body.as_str()), (200, "agent says hi"));
    // A name the policy does not cover is the agent's alone.
    let (other, _) = edge
        .agent(&tunnel(
            "other",
            "other.example.test",
            upstream.port(),
            agents,
        ))
        .await;
    assert_eq!(edge.fetch("other.example.test", "/", &[]).await.0, 200);
    agent.shutdown().await.unwrap();
    other.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_operator_policy_that_is_not_a_document_is_refused_at_load() {
    let toml = "[[endpoint_policies]]\ndomain = \"*.guarded.example.test\"\ntraffic_policy = \"on_http_requests: []\"\n";
    let config = postern_edge::EdgeConfig::from_toml(&format!(
        "domain = \"example.test\"\n[tls]\ndev_ca = true\n{toml}"
    ));
    let text = format!("{:#}", config.expect_err("refused"));
    assert!(
        text.contains("endpoint_policies[0].traffic_policy") && text.contains("on_http_requests"),
        "{text}"
    );
}
