//! The OAuth tests' identity provider and browsers: the OpenID Provider in
//! `tests/oidc/server.mjs` (panva's oidc-provider under node), a scripted
//! browser with a cookie jar that logs in through the edge, and headless
//! Chromium driven by `tests/oidc/login.mjs` (playwright-core).
//!
//! Names under `example.test` go to the edge's HTTPS port on 127.0.0.1;
//! the provider itself is at `http://127.0.0.1:<port>`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{net::TcpStream, process::Command};

use crate::{Spawned, TempDir, client::client_tls};

/// `tests/oidc`, where the provider, the Chromium script and their
/// node_modules live.
pub fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

fn require_node_modules() {
    let modules = oidc_dir().join("node_modules");
    assert!(
        modules.join("oidc-provider").exists() && modules.join("playwright-core").exists(),
        "{} is missing oidc-provider or playwright-core: run ./scripts/test.sh (npm ci in tests/oidc)",
        modules.display()
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node not found: run ./scripts/test.sh"
    );
}

/// The test OpenID Provider. Its client is `edge-console` /
/// `edge-console-secret`; users: `alice` (alice@example.test), `bob`
/// (bob@other.test), `carol` (unverified), `mallory` (two `@`), `dave`
/// (`Dave@EXAMPLE.TEST`), `erin` (trailing dot).
pub struct OidcProvider {
    process: Spawned,
    pub issuer: String,
}

pub const CLIENT_ID: &str = "edge-console";
pub const CLIENT_SECRET: &str = "edge-console-secret";

impl OidcProvider {
    /// Starts the provider with these client redirect URIs and waits for
    /// its discovery document.
    pub async fn start(redirect_uris: &[String]) -> OidcProvider {
        require_node_modules();
        let mut process = Spawned::spawn(
            Command::new("node")
                .arg("server.mjs")
                .current_dir(oidc_dir())
                .env("OIDC_PORT", "0")
                .env("OIDC_REDIRECT_URIS", redirect_uris.join(",")),
        );
        let line = process.wait_for_line(" ready", 30).await;
        let issuer = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .expect("issuer in the ready line")
            .to_string();
        OidcProvider { process, issuer }
    }

    /// Creates or changes a user (JSON fields `email`, `email_verified`,
    /// `name`), effective at the next userinfo call.
    pub async fn set_user(&self, id: &str, change: serde_json::Value) {
        let url = format!("{}/test/users/{id}", self.issuer);
        let page = Browser::plain()
            .request(
                "POST",
                &url,
                &[("content-type", "application/json")],
                Some(change.to_string()),
            )
            .await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text());
    }

    /// Stops the provider process.
    pub async fn stop(mut self) {
        let _ = self.process.child.kill().await;
    }
}

/// One response, with the URL it answered.
#[derive(Debug, Clone)]
pub struct Page {
    pub url: String,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Page {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn location(&self) -> Option<String> {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// `Set-Cookie` values naming `name`.
    pub fn set_cookies(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter(|v| v.split('=').next() == Some(name))
            .map(str::to_string)
            .collect()
    }

    pub fn error_code(&self) -> Option<String> {
        self.headers
            .get("ngrok-error-code")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

#[derive(Clone, Debug)]
struct Cookie {
    host: String,
    path: String,
    name: String,
    value: String,
    secure: bool,
}

/// A scripted browser: a cookie jar (host-only, path-aware, `Max-Age=0`
/// deletes), no automatic redirects. `*.example.test` is the edge. A clone
/// has a copy of the jar.
#[derive(Clone)]
pub struct Browser {
    jar: Vec<Cookie>,
    /// The HTTPS port `*.example.test` names connect to.
    pub edge_port: u16,
    /// The plain-HTTP port they connect to for `http://` URLs.
    pub edge_http_port: u16,
    tls: Arc<ClientConfig>,
}

impl Browser {
    /// Trusts the CAs in `ca_pems`.
    pub fn new(ca_pems: &[&Path], edge_port: u16) -> Browser {
        let mut pem = Vec::new();
        for path in ca_pems {
            pem.extend(std::fs::read(path).expect("CA file"));
            pem.push(b'\n');
        }
        Browser {
            jar: Vec::new(),
            edge_port,
            edge_http_port: 0,
            tls: client_tls(&pem, &[b"http/1.1"]),
        }
    }

    /// A browser for plain-HTTP loopback URLs only.
    pub fn plain() -> Browser {
        Self::new(&[], 0)
    }

    /// The jar's value of cookie `name` for `host`.
    pub fn cookie(&self, host: &str, name: &str) -> Option<String> {
        self.jar
            .iter()
            .find(|c| c.host == host && c.name == name)
            .map(|c| c.value.clone())
    }

    /// Puts a cookie in the jar (path `/`, secure).
    pub fn set_cookie(&mut self, host: &str, name: &str, value: &str) {
        self.jar
            .retain(|c| !(c.host == host && c.name == name && c.path == "/"));
        self.jar.push(Cookie {
            host: host.into(),
            path: "/".into(),
            name: name.into(),
            value: value.into(),
            secure: true,
        });
    }

    pub fn remove_cookie(&mut self, host: &str, name: &str) {
        self.jar.retain(|c| !(c.host == host && c.name == name));
    }

    fn store(&mut self, host: &str, headers: &HeaderMap) {
        for value in headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
        {
            let mut parts = value.split(';').map(str::trim);
            let Some((name, val)) = parts.next().and_then(|p| p.split_once('=')) else {
                continue;
            };
            let mut cookie = Cookie {
                host: host.into(),
                path: "/".into(),
                name: name.into(),
                value: val.into(),
                secure: false,
            };
            let mut delete = false;
            for attr in parts {
                let (k, v) = attr.split_once('=').unwrap_or((attr, ""));
                match k.to_ascii_lowercase().as_str() {
                    "path" => cookie.path = v.into(),
                    "secure" => cookie.secure = true,
                    "max-age" => delete = v.trim() == "0" || v.trim().starts_with('-'),
                    _ => {}
                }
            }
            self.jar.retain(|c| {
                !(c.host == cookie.host && c.name == cookie.name && c.path == cookie.path)
            });
            if !delete {
                self.jar.push(cookie);
            }
        }
    }

    fn cookie_header(&self, host: &str, path: &str, https: bool) -> Option<String> {
        let pairs: Vec<String> = self
            .jar
            .iter()
            .filter(|c| c.host == host && path.starts_with(&c.path) && (https || !c.secure))
            .map(|c| format!("{}={}", c.name, c.value))
            .collect();
        (!pairs.is_empty()).then(|| pairs.join("; "))
    }

    /// One request, no redirects followed; cookies stored.
    pub async fn request(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Page {
        let uri: Uri = url.parse().unwrap_or_else(|e| panic!("{url}: {e}"));
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().expect("URL host").to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addr: SocketAddr = if host.ends_with("example.test") {
            let port = if https {
                self.edge_port
            } else {
                self.edge_http_port
            };
            ([127, 0, 0, 1], port).into()
        } else {
            format!("{host}:{port}")
                .parse()
                .expect("a loopback address")
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let mut req = Request::builder()
            .method(method)
            .uri(&path)
            .header(header::HOST, uri.authority().unwrap().as_str());
        if let Some(cookies) = self.cookie_header(&host, uri.path(), https) {
            req = req.header(header::COOKIE, cookies);
        }
        if body.is_some()
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req = req.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .unwrap();
        let tcp = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let response = if https {
            let name = ServerName::try_from(host.clone()).unwrap();
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .unwrap_or_else(|e| panic!("TLS to {host}: {e}"));
            send(TokioIo::new(tls), req).await
        } else {
            send(TokioIo::new(tcp), req).await
        };
        let (parts, body) = response.into_parts();
        self.store(&host, &parts.headers);
        Page {
            url: url.to_string(),
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&mut self, url: &str) -> Page {
        self.request("GET", url, &[], None).await
    }

    /// Follows redirects from `url` (at most 20); returns the last page
    /// and every page on the way.
    pub async fn follow(&mut self, url: &str) -> (Page, Vec<Page>) {
        let mut hops = Vec::new();
        let mut page = self.get(url).await;
        for _ in 0..20 {
            let Some(next) = page.location().filter(|_| page.status.is_redirection()) else {
                return (page, hops);
            };
            let next = resolve(&page.url, &next);
            hops.push(page);
            page = self.get(&next).await;
        }
        panic!("more than 20 redirects from {url}");
    }

    /// Logs `user` in: follows redirects from `start` (a page on an OAuth
    /// endpoint, or a response already redirecting to the IdP), filling
    /// the provider's login and consent forms, until a page answers that
    /// is not a redirect. Returns it with every page on the way.
    pub async fn login(&mut self, start: Page, user: &str) -> (Page, Vec<Page>) {
        match self.login_until(start, user, |_| false).await {
            (Ok(page), hops) => (page, hops),
            (Err(url), _) => unreachable!("never stops early: {url}"),
        }
    }

    /// As [`Browser::login`], but stops before requesting the first URL
    /// for which `stop` holds, and returns that URL instead of a page.
    pub async fn login_until(
        &mut self,
        start: Page,
        user: &str,
        stop: impl Fn(&str) -> bool,
    ) -> (Result<Page, String>, Vec<Page>) {
        let mut hops = Vec::new();
        let mut page = start;
        for _ in 0..30 {
            if page.status.is_redirection() {
                let next = resolve(
                    &page.url,
                    &page.location().expect("redirect has a Location"),
                );
                hops.push(page);
                if stop(&next) {
                    return (Err(next), hops);
                }
                page = self.get(&next).await;
                continue;
            }
            let on_interaction =
                page.url.contains("/interaction/") && page.status == StatusCode::OK;
            if !on_interaction {
                return (Ok(page), hops);
            }
            let text = page.text();
            let form = if text.contains("name=\"login\"") {
                format!("prompt=login&login={user}&password=test-password")
            } else if text.contains("value=\"consent\"") {
                "prompt=consent".to_string()
            } else {
                panic!("unknown interaction page: {text}");
            };
            let url = page.url.clone();
            hops.push(page);
            page = self.request("POST", &url, &[], Some(form)).await;
        }
        panic!("login did not finish");
    }
}

async fn send<IO>(io: IO, req: Request<Full<Bytes>>) -> http::Response<Bytes>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let response = sender.send_request(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    http::Response::from_parts(parts, body)
}

/// `location` relative to `base`.
pub fn resolve(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let uri: Uri = base.parse().unwrap();
    let origin = format!(
        "{}://{}",
        uri.scheme_str().unwrap(),
        uri.authority().unwrap()
    );
    if location.starts_with('/') {
        format!("{origin}{location}")
    } else {
        let path = uri.path();
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        format!("{origin}{dir}{location}")
    }
}

/// base64 SHA-256 of a TLS server's leaf certificate's public key (SPKI),
/// as Chromium's `--ignore-certificate-errors-spki-list` wants it.
pub async fn spki_hash(addr: SocketAddr, name: &str, ca_pem: &Path) -> String {
    use base64::Engine;
    use x509_parser::prelude::FromDer;
    let config = client_tls(&std::fs::read(ca_pem).unwrap(), &[]);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf.as_ref()).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.tbs_certificate.subject_pki.raw);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// What `tests/oidc/login.mjs` reports.
#[derive(Debug, serde::Deserialize)]
pub struct ChromiumLogin {
    /// The URL after login.
    pub url: String,
    /// The page's text.
    pub body: String,
    /// The cookies of the endpoint's host, as the browser keeps them.
    pub cookies: Vec<serde_json::Value>,
    /// Milliseconds from the first navigation to the logged-in page.
    pub elapsed_ms: f64,
}

/// Logs `user` in with headless Chromium, starting at `start_url`. Names
/// under `example.test` map to 127.0.0.1 (`--host-resolver-rules`); the
/// edge's certificates are trusted by their public-key hashes
/// (`--ignore-certificate-errors-spki-list`), not by ignoring errors.
pub async fn chromium_login(start_url: &str, user: &str, spki: &[String]) -> ChromiumLogin {
    require_node_modules();
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find_map(|b| {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {b}"))
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .expect("chromium not found: run ./scripts/test.sh (apt-get install chromium)");
    let profile = TempDir::new("chromium");
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        Command::new("node")
            .arg("login.mjs")
            .current_dir(oidc_dir())
            .env("CHROMIUM_BIN", chromium)
            .env("START_URL", start_url)
            .env("LOGIN_USER", user)
            .env("SPKI_LIST", spki.join(","))
            .env("PROFILE_DIR", profile.path())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Chromium login finishes within 90s")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "login.mjs failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("login.mjs output {line:?}: {e}"))
}
