//! Upstream services the agent forwards to, each recording what it got.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, stream};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    body::{Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use postern_net::proxy_header::{self, ProxyHeader};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    /// The PROXY header in front of the connection, if any.
    pub proxy: Option<ProxyHeader>,
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An HTTP/1.1 upstream:
/// - `/echo`: 200 with the request line and headers as text;
/// - `/bytes/<n>`: streams n bytes;
/// - `/count`: reads the body, answers with its length;
/// - `/slow/<ms>`: answers after ms milliseconds;
/// - `/ws`: a WebSocket echo;
/// - anything else: 200 "hello from upstream".
pub struct HttpUpstream {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: JoinHandle<()>,
}

impl HttpUpstream {
    pub async fn start() -> HttpUpstream {
        Self::start_inner(false).await
    }

    /// Expects a PROXY header (v1 or v2) in front of every connection.
    pub async fn start_with_proxy_header() -> HttpUpstream {
        Self::start_inner(true).await
    }

    async fn start_inner(proxy: bool) -> HttpUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let header = if proxy {
                        match read_proxy_header(&mut stream).await {
                            Some(h) => Some(h),
                            None => return,
                        }
                    } else {
                        None
                    };
                    let service = service_fn(move |req| handle(req, recorded.clone(), header));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        HttpUpstream {
            addr,
            requests,
            task,
        }
    }

    /// Requests received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// The last request to `path`.
    pub fn last(&self, path: &str) -> Recorded {
        self.requests()
            .into_iter()
            .rev()
            .find(|r| r.path == path)
            .unwrap_or_else(|| panic!("the upstream never saw {path}"))
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for HttpUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads a PROXY header byte by byte so nothing after it is consumed.
async fn read_proxy_header(stream: &mut TcpStream) -> Option<ProxyHeader> {
    let mut buf = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        if stream.read_exact(&mut byte).await.is_err() {
            return None;
        }
        buf.push(byte[0]);
        match proxy_header::parse(&buf) {
            Ok(Some((header, _))) => return Some(header),
            Ok(None) => continue,
            Err(_) => return None,
        }
    }
}

async fn handle(
    mut req: Request<Incoming>,
    recorded: Arc<Mutex<Vec<Recorded>>>,
    proxy: Option<ProxyHeader>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    recorded.lock().unwrap().push(Recorded {
        method: req.method().to_string(),
        path: path.clone(),
        version: req.version(),
        headers: req.headers().clone(),
        proxy,
    });
    if path == "/ws" {
        return Ok(websocket_echo(&mut req));
    }
    if path == "/echo" {
        let mut text = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
        for (name, value) in req.headers() {
            text.push_str(&format!(
                "{name}: {}\n",
                value.to_str().unwrap_or("<binary>")
            ));
        }
        return Ok(Response::new(full(text)));
    }
    if path == "/count" {
        let mut body = req.into_body();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => total += frame.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => break,
            }
        }
        return Ok(Response::new(full(total.to_string())));
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let total: u64 = n.parse().unwrap_or(0);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let chunks = stream::unfold(total, move |left| {
            let chunk = chunk.clone();
            async move {
                if left == 0 {
                    return None;
                }
                let n = left.min(chunk.len() as u64);
                Some((
                    Ok::<_, std::io::Error>(Frame::data(chunk.slice(..n as usize))),
                    left - n,
                ))
            }
        });
        let mut response = Response::new(BodyExt::boxed(StreamBody::new(chunks)));
        response.headers_mut().insert(
            http::header::CONTENT_LENGTH,
            total.to_string().parse().unwrap(),
        );
        return Ok(response);
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let mut response = Response::new(full(format!("status {code}")));
        *response.status_mut() = code.parse().unwrap_or(StatusCode::OK);
        return Ok(response);
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        return Ok(Response::new(full("slow done")));
    }
    Ok(Response::new(full("hello from upstream")))
}

fn websocket_echo(req: &mut Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        let mut r = Response::new(full("not a websocket request"));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        let (mut tx, mut rx) = ws.split();
        while let Some(Ok(msg)) = rx.next().await {
            if msg.is_close() {
                break;
            }
            if tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .body(full(Bytes::new()))
        .unwrap()
}

/// An HTTP/1.1 upstream written by hand: each request gets the bytes
/// `script` gives for its request line, written a few bytes at a time so
/// that they reach the edge in many frames; `None` after the bytes closes
/// the connection. It counts the connections it accepted.
pub struct ScriptedUpstream {
    pub addr: SocketAddr,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

/// What a scripted upstream answers: the bytes, and whether the
/// connection stays open after them.
pub type Script = fn(&str) -> (&'static [u8], bool);

impl ScriptedUpstream {
    pub async fn start(script: Script) -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                stream.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => seen.extend_from_slice(&buf[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&seen[..end]).into_owned();
                        seen.drain(..end + 4);
                        let line = head.lines().next().unwrap_or_default().to_string();
                        let (answer, keep) = script(&line);
                        for piece in answer.chunks(7) {
                            if stream.write_all(piece).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        if !keep {
                            let _ = stream.shutdown().await;
                            return;
                        }
                    }
                });
            }
        });
        ScriptedUpstream {
            addr,
            connections,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP echo server that records the PROXY header of each connection
/// when `proxy` is set.
pub struct TcpEcho {
    pub addr: SocketAddr,
    headers: Arc<Mutex<Vec<ProxyHeader>>>,
    task: JoinHandle<()>,
}

impl TcpEcho {
    pub async fn start(proxy: bool) -> TcpEcho {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let headers: Arc<Mutex<Vec<ProxyHeader>>> = Arc::default();
        let seen = headers.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    if proxy {
                        match read_proxy_header(&mut stream).await {
                            Some(h) => seen.lock().unwrap().push(h),
                            None => return,
                        }
                    }
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        TcpEcho {
            addr,
            headers,
            task,
        }
    }

    pub fn proxy_headers(&self) -> Vec<ProxyHeader> {
        self.headers.lock().unwrap().clone()
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An upstream that terminates TLS itself (for `terminate_at: upstream`)
/// with a certificate from its own CA, then answers one HTTP/1.1 request
/// per connection with `tls-upstream <sni>`.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    /// The CA that issued the upstream's certificate (PEM).
    pub ca_pem: String,
    task: JoinHandle<()>,
}

impl TlsUpstream {
    pub async fn start(names: &[&str]) -> TlsUpstream {
        Self::start_inner(names, None).await
    }

    /// Requires a client certificate from `client_ca_pem`; the answer names
    /// its CN.
    pub async fn start_requiring_client_cert(names: &[&str], client_ca_pem: &str) -> TlsUpstream {
        Self::start_inner(names, Some(client_ca_pem)).await
    }

    async fn start_inner(names: &[&str], client_ca_pem: Option<&str>) -> TlsUpstream {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "upstream test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let acceptor = tls_acceptor(
            &cert.pem(),
            &key.serialize_pem(),
            client_ca_pem,
            &[b"http/1.1"],
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().unwrap_or("").to_string();
                    let client = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| postern_ingress::ClientIdentity::of(&c[0]))
                        .and_then(|id| id.subject_cn)
                        .map(|cn| format!(" client={cn}"))
                        .unwrap_or_default();
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let body = format!("tls-upstream {sni}{client}");
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        TlsUpstream {
            addr,
            ca_pem: ca_cert.pem(),
            task,
        }
    }
}

/// A TLS acceptor for a test server: its certificate and key (PEM), and,
/// with `client_ca_pem`, a required client certificate from that CA.
pub(crate) fn tls_acceptor(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: Option<&str>,
    alpn: &[&[u8]],
) -> tokio_rustls::TlsAcceptor {
    let certified = postern_net::certified_key_from_pem(
        postern_net::Pem::new("test server certificate", cert_pem.as_bytes()),
        postern_net::Pem::new("test server key", key_pem.as_bytes()),
    )
    .unwrap();
    let client_auth = client_ca_pem.map(|pem| {
        let cas = postern_net::parse_ca_bundle(pem.as_bytes()).unwrap();
        let policy = Arc::new(postern_net::MtlsPolicy::new(cas, Vec::new(), None));
        Arc::new(postern_net::RequireClientCert(policy))
            as Arc<dyn rustls::server::danger::ClientCertVerifier>
    });
    let resolver = Arc::new(rustls::sign::SingleCertAndKey::from(Arc::new(certified)));
    tokio_rustls::TlsAcceptor::from(postern_ingress::build_server_config(
        resolver,
        client_auth,
        alpn,
    ))
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
