//! Clients: curl and openssl as processes, and a Rust HTTPS client.

use std::{net::SocketAddr, path::Path, process::Output, sync::Arc};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A TLS client config that trusts the CAs in `pem` and offers `alpn`.
pub(crate) fn client_tls(pem: &[u8], alpn: &[&[u8]]) -> Arc<ClientConfig> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots
            .add(cert.expect("PEM certificates"))
            .expect("a usable CA");
    }
    let mut config = ClientConfig::builder_with_provider(postern_net::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Runs curl with `args`; `-sS` is added.
pub async fn curl(args: &[&str]) -> Output {
    tokio::process::Command::new("curl")
        .arg("-sS")
        .args(args)
        .output()
        .await
        .expect("curl runs (is it installed?)")
}

/// Streams `bytes` up to `{url}/count` (curl reads stdin as it goes, the
/// upstream counts) and then down from `{url}/bytes/<n>` (the upstream
/// streams, curl counts), asserting that every byte arrived both ways.
/// `url` is `https://<host>:<port>`, `resolve` curl's `--resolve` value.
pub async fn stream_each_way(url: &str, ca: &Path, resolve: &str, bytes: u64) {
    let ca = ca.display().to_string();
    let upload = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {bytes} /dev/zero | curl -sS --http1.1 --cacert {ca} --resolve {resolve} -T - {url}/count"
        ))
        .output()
        .await
        .unwrap();
    assert!(
        upload.status.success(),
        "{}",
        String::from_utf8_lossy(&upload.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&upload.stdout), bytes.to_string());
    let out = curl(&[
        "--cacert",
        &ca,
        "--resolve",
        resolve,
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &format!("{url}/bytes/{bytes}"),
    ])
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), bytes.to_string());
}

/// A WebSocket through the edge at `addr` (trusting `ca_pem`) to
/// `wss://<host>/ws`, the upstream's echo: checks the 101, echoes three
/// text messages and one 100 KB binary message, and returns the socket
/// still open.
pub async fn websocket_echo(
    addr: SocketAddr,
    ca_pem: &Path,
    host: &str,
) -> tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let tls = HttpsClient::new(addr, ca_pem).connect(host).await.unwrap();
    let url = format!("wss://{host}:{}/ws", addr.port());
    let (mut ws, response) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("websocket handshake");
    assert_eq!(response.status(), 101);
    for i in 0..3 {
        let text = format!("ping-{i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
    }
    ws.send(Message::binary(vec![7u8; 100_000])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().len(), 100_000);
    ws
}

/// A WebSocket through the edge at `addr` (trusting `ca_pem`) to
/// `wss://<host>/` on an endpoint with `websocket_tcp_converter` whose
/// upstream is a TCP echo: checks the 101, that binary and text messages
/// reach the echo as bare payloads and come back as binary messages (a
/// 100 KB one too), and closes it.
pub async fn websocket_to_tcp_echo(addr: SocketAddr, ca_pem: &Path, host: &str) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let tls = HttpsClient::new(addr, ca_pem).connect(host).await.unwrap();
    let url = format!("wss://{host}:{}/", addr.port());
    let (mut ws, response) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    assert_eq!(response.status(), 101);
    for (sent, bytes) in [
        (
            Message::binary(b"\x00hello\xff".to_vec()),
            &b"\x00hello\xff"[..],
        ),
        (Message::text("plain text"), &b"plain text"[..]),
        (Message::binary(vec![9u8; 100_000]), &[9u8; 100_000][..]),
    ] {
        ws.send(sent).await.unwrap();
        let mut echoed = Vec::new();
        while echoed.len() < bytes.len() {
            match ws.next().await.unwrap().unwrap() {
                Message::Binary(chunk) => echoed.extend_from_slice(&chunk),
                other => panic!("only binary messages come back: {other:?}"),
            }
        }
        assert_eq!(echoed, bytes, "the upstream saw the bare payload, no HTTP");
    }
    ws.close(None).await.unwrap();
}

/// Runs `openssl s_client` against `addr` with extra args, feeding `stdin`.
pub async fn openssl_s_client(addr: SocketAddr, args: &[&str], stdin: &[u8]) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl runs (is it installed?)");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    // Keep stdin open briefly so the reply can arrive before EOF ends the session.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(input);
    child.wait_with_output().await.unwrap()
}

/// A response read in full.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// HTTPS over HTTP/1.1 to 127.0.0.1:port with any SNI/Host, trusting one CA.
#[derive(Clone)]
pub struct HttpsClient {
    config: Arc<ClientConfig>,
    addr: SocketAddr,
}

impl HttpsClient {
    pub fn new(addr: SocketAddr, ca_pem: &Path) -> HttpsClient {
        let pem = std::fs::read(ca_pem).expect("CA file");
        Self::with_ca_pem(addr, &pem)
    }

    pub fn with_ca_pem(addr: SocketAddr, pem: &[u8]) -> HttpsClient {
        HttpsClient {
            config: client_tls(pem, &[b"http/1.1"]),
            addr,
        }
    }

    /// Offers these ALPN protocols instead of `http/1.1`.
    pub fn with_alpn(mut self, protocols: &[&[u8]]) -> HttpsClient {
        Arc::make_mut(&mut self.config).alpn_protocols =
            protocols.iter().map(|p| p.to_vec()).collect();
        self
    }

    /// A new TLS connection with `host` as SNI.
    pub async fn connect(&self, host: &str) -> anyhow::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        let name = ServerName::try_from(host.to_string())?;
        Ok(tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await?)
    }

    /// One request on a new connection.
    pub async fn request(
        &self,
        host: &str,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<Response> {
        let tls = self.connect(host).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host)
            .body(Full::new(body))?;
        let response = sender.send_request(req).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Response {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub async fn get(&self, host: &str, path: &str) -> anyhow::Result<Response> {
        self.request(host, "GET", path, Bytes::new()).await
    }
}

/// `GET` every path with `Host: host` over plain HTTP/1.1 to `addr`, on
/// `connections` kept-alive connections in parallel; the statuses in the
/// order of `paths`. A request that fails gets `None`.
pub async fn http1_get_all(
    addr: SocketAddr,
    host: &str,
    paths: &[String],
    connections: usize,
) -> Vec<Option<StatusCode>> {
    let mut tasks = Vec::new();
    for lane in 0..connections {
        let mine: Vec<(usize, String)> = paths
            .iter()
            .enumerate()
            .skip(lane)
            .step_by(connections)
            .map(|(i, p)| (i, p.clone()))
            .collect();
        let host = host.to_string();
        tasks.push(tokio::spawn(async move {
            let mut sender = None;
            let mut out = Vec::new();
            for (i, path) in mine {
                let status = async {
                    if sender.is_none() {
                        let tcp = TcpStream::connect(addr).await.ok()?;
                        let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                            .await
                            .ok()?;
                        tokio::spawn(conn);
                        sender = Some(s);
                    }
                    let req = Request::get(path.as_str())
                        .header("host", host.as_str())
                        .body(Full::new(Bytes::new()))
                        .ok()?;
                    let result = sender.as_mut()?.send_request(req).await;
                    let Ok(response) = result else {
                        sender = None;
                        return None;
                    };
                    let status = response.status();
                    response.into_body().collect().await.ok()?;
                    Some(status)
                }
                .await;
                out.push((i, status));
            }
            out
        }));
    }
    let mut all = vec![None; paths.len()];
    for task in tasks {
        for (i, status) in task.await.expect("request task") {
            all[i] = status;
        }
    }
    all
}
