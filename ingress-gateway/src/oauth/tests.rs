//! The OAuth module in-process: option checks, a plain OAuth 2.0 provider
//! with GitHub's user API (a fake one on loopback), and a whole login
//! through [`OAuthEndpoint::gate`] and the auth host on a memory store,
//! including a store that fails. The OpenID Connect path runs end to end
//! against a real provider in `tests/tests/oauth.rs`.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use postern_events::{Decision, MemorySink};
use postern_proto::pb;

use super::{
    flow::Gate,
    provider::{ClientCreds, IdpError, Tokens, UserApi},
    store::{StoreError, StoreFuture},
    *,
};
use crate::outcome::tests::record;

/// A fake GitHub: token endpoint and user API. The token endpoint takes
/// `code=good` with a PKCE verifier, `grant_type=refresh_token` with
/// `refresh_token=r1`; the user's primary email is settable.
struct FakeGitHub {
    addr: SocketAddr,
    email: Arc<Mutex<(String, bool)>>,
}

impl FakeGitHub {
    async fn start() -> FakeGitHub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let email = Arc::new(Mutex::new(("octo@acme.org".to_string(), true)));
        let shared = email.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let email = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(req, email.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeGitHub { addr, email }
    }

    fn provider(&self) -> Provider {
        let base = format!("http://{}/", self.addr);
        let url = |p: &str| openidconnect::url::Url::parse(&format!("{base}{p}")).unwrap();
        Provider::oauth2(
            "github",
            url("login/oauth/authorize"),
            url("login/oauth/access_token"),
            UserApi::GitHub { base: url("") },
            &["read:user", "user:email"],
            Some(("prompt", "select_account")),
        )
    }
}

async fn answer(
    req: Request<Incoming>,
    email: Arc<Mutex<(String, bool)>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let json = |status: StatusCode, body: serde_json::Value| {
        let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
        *r.status_mut() = status;
        Ok(r)
    };
    let path = req.uri().path().to_string();
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let form: Vec<(String, String)> = openidconnect::url::form_urlencoded::parse(&body)
        .into_owned()
        .collect();
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    match path.as_str() {
        "/login/oauth/access_token" => {
            if field("client_secret") != Some("s3cret") {
                return json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": "incorrect_client_credentials"}),
                );
            }
            let ok = match field("grant_type") {
                Some("authorization_code") => {
                    field("code") == Some("good")
                        && field("code_verifier").is_some_and(|v| v.len() >= 43)
                }
                Some("refresh_token") => field("refresh_token") == Some("r1"),
                _ => false,
            };
            if ok {
                json(
                    StatusCode::OK,
                    serde_json::json!({"access_token": "gho_token", "refresh_token": "r1", "token_type": "bearer"}),
                )
            } else {
                // GitHub answers errors with 200.
                json(
                    StatusCode::OK,
                    serde_json::json!({"error": "bad_verification_code"}),
                )
            }
        }
        _ if bearer.as_deref() != Some("Bearer gho_token") => json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"message": "Bad credentials"}),
        ),
        "/user" => json(
            StatusCode::OK,
            serde_json::json!({"id": 42, "login": "octo", "name": null}),
        ),
        "/user/emails" => {
            let (email, verified) = email.lock().unwrap().clone();
            json(
                StatusCode::OK,
                serde_json::json!([
                    {"email": "other@example.net", "primary": false, "verified": true},
                    {"email": email, "primary": true, "verified": verified},
                ]),
            )
        }
        _ => json(StatusCode::NOT_FOUND, serde_json::json!({})),
    }
}

fn service_with(store: Arc<dyn SessionStore>) -> Arc<OAuthService> {
    OAuthService::new(
        OAuthSettings {
            auth_host: "auth.example.test".into(),
            https_port: 443,
            auth_check_floor: Duration::from_secs(180),
            login_timeout: Duration::from_secs(60),
        },
        store,
        SessionKey::from_secret(&Secret::new("k".repeat(32))),
        IdpHttp::new(&[], Duration::from_secs(5)),
    )
}

fn options(extra: impl FnOnce(&mut pb::OAuthOptions)) -> pb::OAuthOptions {
    let mut o = pb::OAuthOptions {
        provider: "github".into(),
        client_id: "client-1".into(),
        client_secret: "s3cret".into(),
        allow_domains: vec!["acme.org".into()],
        ..Default::default()
    };
    extra(&mut o);
    o
}

#[tokio::test]
async fn options_are_checked_with_codes() {
    let service = service_with(Arc::new(MemoryStore::new()));
    let code = |o: pb::OAuthOptions| {
        let service = service.clone();
        async move { service.endpoint(&o).await.unwrap_err().code.number }
    };
    assert_eq!(code(options(|o| o.provider.clear())).await, 2228);
    assert_eq!(code(options(|o| o.provider = "myspace".into())).await, 2228);
    assert_eq!(
        code(options(|o| o.issuer_url = "https://idp.example".into())).await,
        2228
    );
    assert_eq!(code(options(|o| o.client_secret.clear())).await, 2229);
    assert_eq!(code(options(|o| o.client_id = "  ".into())).await, 2229);
    assert_eq!(
        code(options(|o| o.allow_emails = vec!["a@b@c".into()])).await,
        2228
    );
    assert_eq!(
        code(options(|o| o.allow_domains = vec!["a@b".into()])).await,
        2228
    );
    assert_eq!(code(options(|o| o.scopes = vec!["a b".into()])).await, 2228);
    assert_eq!(
        code(options(|o| o.cookie_prefix = "a;b".into())).await,
        2228
    );
    assert_eq!(code(options(|o| o.provider = "oidc".into())).await, 2228);
    // An unreachable issuer fails discovery.
    let e = service
        .endpoint(&options(|o| {
            o.provider.clear();
            o.issuer_url = "http://127.0.0.1:1".into();
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code.number, 2227);
    // The secret never shows; the auth check interval has a floor.
    let endpoint = service
        .endpoint(&options(|o| o.auth_check_interval_secs = 5))
        .await
        .unwrap();
    assert!(!format!("{endpoint:?}").contains("s3cret"));
    assert_eq!(endpoint.auth_check_interval(), Duration::from_secs(180));
    assert_eq!(endpoint.provider(), "github");
    assert_eq!(endpoint.client_id(), "client-1");
    let never = service.endpoint(&options(|_| {})).await.unwrap();
    assert_eq!(never.auth_check_interval(), Duration::ZERO);
    let long = service
        .endpoint(&options(|o| o.auth_check_interval_secs = 600))
        .await
        .unwrap();
    assert_eq!(long.auth_check_interval(), Duration::from_secs(600));
}

#[tokio::test]
async fn github_code_exchange_user_api_and_refresh() {
    let fake = FakeGitHub::start().await;
    let provider = fake.provider();
    let http = IdpHttp::new(&[], Duration::from_secs(5));
    let client = ClientCreds {
        id: "client-1".into(),
        secret: Secret::new("s3cret"),
    };
    let verifier = provider::pkce_verifier();
    let url = provider
        .authorize_url(
            &client,
            &provider::AuthorizeRequest {
                redirect_uri: "https://auth.example.test/oauth2/callback",
                scopes: &["read:user".into(), "user:email".into()],
                state: "st",
                nonce: "n",
                pkce_verifier: &verifier,
                force_login: true,
            },
        )
        .unwrap();
    for part in [
        "state=st",
        "code_challenge_method=S256",
        "scope=read%3Auser+user%3Aemail",
        "prompt=select_account",
    ] {
        assert!(url.contains(part), "{part} not in {url}");
    }
    assert!(!url.contains(&verifier), "only the challenge travels");
    let login = provider
        .exchange(
            &http,
            &client,
            "good",
            "https://auth.example.test/oauth2/callback",
            &verifier,
            "n",
        )
        .await
        .unwrap();
    assert_eq!(login.user.id, "42");
    assert_eq!(login.user.name.as_deref(), Some("octo"));
    assert_eq!(login.user.email.as_deref(), Some("octo@acme.org"));
    assert_eq!(login.user.email_verified, Some(true));
    assert_eq!(login.tokens.refresh.as_deref(), Some("r1"));
    let refused = provider
        .exchange(&http, &client, "bad", "https://x/", &verifier, "n")
        .await
        .unwrap_err();
    assert!(
        matches!(refused, IdpError::Rejected(ref e) if e == "bad_verification_code"),
        "{refused:?}"
    );
    *fake.email.lock().unwrap() = ("octo@elsewhere.org".into(), true);
    let again = provider
        .refresh(&http, &client, &login.tokens, "42")
        .await
        .unwrap();
    assert_eq!(again.user.email.as_deref(), Some("octo@elsewhere.org"));
    let other = provider
        .refresh(&http, &client, &login.tokens, "41")
        .await
        .unwrap_err();
    assert!(matches!(other, IdpError::Invalid(_)));
    let dead = Tokens {
        access: "expired".into(),
        refresh: None,
    };
    assert!(matches!(
        provider.refresh(&http, &client, &dead, "42").await,
        Err(IdpError::Rejected(_))
    ));
}

fn get(path: &str, cookies: &[String]) -> Request<()> {
    let mut req = Request::get(path).header(header::HOST, "app.example.test");
    if !cookies.is_empty() {
        req = req.header(header::COOKIE, cookies.join("; "));
    }
    req.body(()).unwrap()
}

/// `name=value` of a `Set-Cookie` header starting with `prefix`.
fn set_cookie<B>(response: &Response<B>, prefix: &str) -> String {
    response
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap())
        .find(|c| c.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} cookie in {:?}", response.headers()))
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

fn location<B>(response: &Response<B>) -> String {
    response.headers()[header::LOCATION]
        .to_str()
        .unwrap()
        .to_string()
}

async fn gate(endpoint: &OAuthEndpoint, sink: &Arc<MemorySink>, mut req: Request<()>) -> Gate {
    let mut rec = record(sink, &req);
    endpoint
        .gate(&mut req, true, "app.example.test", &mut rec)
        .await
}

fn respond(gate: Gate) -> Response<crate::http::ProxyBody> {
    match gate {
        Gate::Respond(r) => r,
        Gate::Forward(h) => panic!("forwarded with {h:?}"),
    }
}

#[tokio::test]
async fn a_whole_login_through_the_gate_and_the_auth_host() {
    let fake = FakeGitHub::start().await;
    let service = service_with(Arc::new(MemoryStore::new()));
    let opts = options(|_| {});
    let endpoint = service.endpoint_with(
        &opts,
        fake.provider(),
        Checked {
            oidc: false,
            allow_emails: Vec::new(),
            allow_domains: vec!["acme.org".into()],
            cookie_prefix: "ngrok.".into(),
        },
    );
    let sink = Arc::new(MemorySink::default());

    // No session: to the provider.
    let start = respond(gate(&endpoint, &sink, get("/deep?x=1", &[])).await);
    assert_eq!(start.status(), StatusCode::FOUND);
    let to_idp = location(&start);
    assert!(to_idp.starts_with(&format!("http://{}/login/oauth/authorize?", fake.addr)));
    let state = openidconnect::url::Url::parse(&to_idp)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let nonce = set_cookie(&start, "ngrok.nonce.");

    // The provider sends the browser to the auth host.
    let callback = Request::get(format!("/oauth2/callback?code=good&state={state}"))
        .body(())
        .unwrap();
    let handoff = service.serve_auth_host(&callback, true).await;
    assert_eq!(handoff.status(), StatusCode::FOUND);
    let handoff = location(&handoff);
    let path = handoff
        .strip_prefix("https://app.example.test")
        .expect("to the endpoint");
    assert!(path.starts_with("/auth/callback?code="));
    let replay = service.serve_auth_host(&callback, true).await;
    assert_eq!(replay.headers()["ngrok-error-code"], "ERR_POSTERN_3120");

    // The endpoint's callback sets the session and returns to the path.
    let done = respond(gate(&endpoint, &sink, get(path, std::slice::from_ref(&nonce))).await);
    assert_eq!(done.status(), StatusCode::FOUND);
    assert_eq!(location(&done), "/deep?x=1");
    let session = set_cookie(&done, "ngrok.session=");

    // With the session: forwarded, the user named, our cookies stripped.
    let mut req = get("/deep", &[session.clone(), "theme=dark".into()]);
    req.headers_mut()
        .insert("x-keep", HeaderValue::from_static("1"));
    let mut rec = record(&sink, &req);
    let forwarded = endpoint
        .gate(&mut req, true, "app.example.test", &mut rec)
        .await;
    drop(rec);
    let Gate::Forward(headers) = forwarded else {
        panic!("not forwarded")
    };
    let get_h = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get_h("ngrok-auth-user-id"), Some("42"));
    assert_eq!(get_h("ngrok-auth-user-name"), Some("octo"));
    assert_eq!(get_h("ngrok-auth-user-email"), Some("octo@acme.org"));
    assert_eq!(get_h("ngrok-auth-oauth-access-token"), Some("gho_token"));
    assert_eq!(get_h("ngrok-auth-oauth-refresh-token"), Some("r1"));
    assert_eq!(req.headers()[header::COOKIE], "theme=dark");
    let last = sink.events().pop().unwrap();
    let object = serde_json::to_value(&last.object).unwrap();
    assert_eq!(object["oauth"]["decision"], "allow");
    assert_eq!(object["oauth"]["user"]["id"], "42");
    assert_eq!(object["oauth"]["app_client_id"], "client-1");

    // Options and reserved paths.
    let reserved = respond(
        gate(
            &endpoint,
            &sink,
            get("/auth/other", std::slice::from_ref(&session)),
        )
        .await,
    );
    assert_eq!(reserved.headers()["ngrok-error-code"], "ERR_POSTERN_9010");
    let mut options_req = Request::options("/x").body(()).unwrap();
    let mut rec = record(&sink, &options_req);
    let options_gate = endpoint
        .gate(&mut options_req, true, "app.example.test", &mut rec)
        .await;
    assert!(
        matches!(options_gate, Gate::Respond(_)),
        "no passthrough configured"
    );

    // Logout ends it.
    let out = respond(
        gate(
            &endpoint,
            &sink,
            get("/auth/logout", std::slice::from_ref(&session)),
        )
        .await,
    );
    assert_eq!(out.status(), StatusCode::OK);
    let after = respond(gate(&endpoint, &sink, get("/deep", &[session])).await);
    assert_eq!(after.status(), StatusCode::FOUND);

    // A user outside the allow-list: 403 and a block decision.
    *fake.email.lock().unwrap() = ("octo@other.org".into(), true);
    let start = respond(gate(&endpoint, &sink, get("/", &[])).await);
    let state = openidconnect::url::Url::parse(&location(&start))
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let nonce = set_cookie(&start, "ngrok.nonce.");
    let cb = Request::get(format!("/oauth2/callback?code=good&state={state}"))
        .body(())
        .unwrap();
    let handoff = location(&service.serve_auth_host(&cb, true).await);
    let path = handoff
        .strip_prefix("https://app.example.test")
        .unwrap()
        .to_string();
    let blocked = respond(gate(&endpoint, &sink, get(&path, &[nonce])).await);
    assert_eq!(blocked.status(), StatusCode::FORBIDDEN);
    assert_eq!(blocked.headers()["ngrok-error-code"], "ERR_POSTERN_3105");
    let last = sink.events().pop().unwrap();
    assert_eq!(
        serde_json::to_value(&last.object).unwrap()["oauth"]["decision"],
        serde_json::to_value(Decision::Block).unwrap()
    );
}

/// A store that is down.
struct DownStore;

impl SessionStore for DownStore {
    fn set(&self, _: &str, _: Vec<u8>, _: Duration) -> StoreFuture<'_, ()> {
        down()
    }
    fn replace(&self, _: &str, _: Vec<u8>, _: Duration) -> StoreFuture<'_, bool> {
        down()
    }
    fn set_if_absent(&self, _: &str, _: Vec<u8>, _: Duration) -> StoreFuture<'_, bool> {
        down()
    }
    fn get(&self, _: &str) -> StoreFuture<'_, Option<Vec<u8>>> {
        down()
    }
    fn take(&self, _: &str) -> StoreFuture<'_, Option<Vec<u8>>> {
        down()
    }
    fn delete(&self, _: &str) -> StoreFuture<'_, bool> {
        down()
    }
    fn expire(&self, _: &str, _: Duration) -> StoreFuture<'_, bool> {
        down()
    }
    fn set_add(&self, _: &str, _: &str, _: Duration) -> StoreFuture<'_, ()> {
        down()
    }
    fn set_remove(&self, _: &str, _: &str) -> StoreFuture<'_, ()> {
        down()
    }
    fn set_members(&self, _: &str) -> StoreFuture<'_, Vec<String>> {
        down()
    }
    fn kind(&self) -> &'static str {
        "down"
    }
}

fn down<'a, T: Send + 'a>() -> StoreFuture<'a, T> {
    Box::pin(async { Err(StoreError::Failed("connection refused".into())) })
}

#[tokio::test]
async fn a_store_that_is_down_means_503_everywhere() {
    let fake = FakeGitHub::start().await;
    let service = service_with(Arc::new(DownStore));
    let endpoint = service.endpoint_with(
        &options(|_| {}),
        fake.provider(),
        Checked {
            oidc: false,
            allow_emails: Vec::new(),
            allow_domains: Vec::new(),
            cookie_prefix: "ngrok.".into(),
        },
    );
    let sink = Arc::new(MemorySink::default());
    for (path, cookie) in [
        ("/", None),
        ("/", Some("ngrok.session=abc")),
        ("/auth/logout", Some("ngrok.session=abc")),
        ("/auth/callback?code=abc", None),
        ("/auth/authn", None),
    ] {
        let cookies: Vec<String> = cookie.map(str::to_string).into_iter().collect();
        let r = respond(gate(&endpoint, &sink, get(path, &cookies)).await);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert!(
            r.headers().get(header::SET_COOKIE).is_none(),
            "{path}: cookies untouched"
        );
    }
    let cb = Request::get("/oauth2/callback?code=c&state=s")
        .body(())
        .unwrap();
    assert_eq!(
        service.serve_auth_host(&cb, true).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(matches!(
        service
            .list_sessions(&SessionQuery::UserId("u".into()))
            .await,
        Err(StoreError::Failed(_))
    ));
}
