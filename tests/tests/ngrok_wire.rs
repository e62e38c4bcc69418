//! ngrok's agent protocol as ngrok-go speaks it, byte by byte: the Go SDK
//! cannot be fetched here, so this raw muxado client does what it does
//! differently from the Rust crate — the `Authtoken` spelling, a newline
//! after each JSON message, reading one JSON value rather than to the end,
//! a `SrvInfo` probe before Auth, `URL` in the bind options, and stream id
//! parity checks.

use std::{sync::Arc, time::Duration};

use postern_tests::{DOMAIN, TestEdge};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

const DATA: u8 = 1;
const GOAWAY: u8 = 3;
const SYN: u8 = 0x2;
const FIN: u8 = 0x1;

struct Frame {
    kind: u8,
    flags: u8,
    id: u32,
    body: Vec<u8>,
}

/// A raw muxado client over TLS, as ngrok-go's session is.
struct GoClient {
    read: ReadHalf<TlsStream<TcpStream>>,
    write: WriteHalf<TlsStream<TcpStream>>,
}

impl GoClient {
    async fn connect(edge: &TestEdge) -> GoClient {
        let addr = edge.addrs.ngrok_agent.unwrap();
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(edge.ca_pem()).unwrap();
        for cert in rustls_pemfile_certs(&pem) {
            roots.add(cert).unwrap();
        }
        // Go sets no ALPN and verifies the host part of the address.
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS without ALPN");
        let (read, write) = tokio::io::split(tls);
        GoClient { read, write }
    }

    async fn send(&mut self, kind: u8, flags: u8, id: u32, body: &[u8]) {
        let len = body.len() as u32;
        let mut frame = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind << 4 | flags,
        ];
        frame.extend_from_slice(&id.to_be_bytes());
        frame.extend_from_slice(body);
        self.write.write_all(&frame).await.unwrap();
    }

    /// Opens stream `id` with `stream_type` and a JSON line, as Go's
    /// encoder writes it (with `\n`), not half-closed.
    async fn rpc(&mut self, id: u32, stream_type: u32, request: &Value) {
        let mut body = stream_type.to_be_bytes().to_vec();
        body.extend(serde_json::to_vec(request).unwrap());
        body.push(b'\n');
        self.send(DATA, SYN, id, &body).await;
    }

    async fn frame(&mut self) -> Option<Frame> {
        let mut head = [0u8; 8];
        tokio::time::timeout(Duration::from_secs(10), self.read.read_exact(&mut head))
            .await
            .expect("a frame within 10s")
            .ok()?;
        let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
        let mut body = vec![0u8; len];
        self.read.read_exact(&mut body).await.ok()?;
        Some(Frame {
            kind: head[3] >> 4,
            flags: head[3] & 0xF,
            id: u32::from_be_bytes([head[4], head[5], head[6], head[7]]) & 0x7FFF_FFFF,
            body,
        })
    }

    /// Decodes one JSON value from stream `id`, as Go's decoder does (it
    /// does not wait for the FIN).
    async fn reply(&mut self, id: u32) -> Value {
        let mut buf = Vec::new();
        loop {
            let f = self.frame().await.expect("the reply");
            if f.kind == DATA && f.id == id {
                buf.extend_from_slice(&f.body);
                let mut values = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
                if let Some(Ok(v)) = values.next() {
                    return v;
                }
            }
        }
    }
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .map(|c| c.unwrap())
        .collect()
}

#[tokio::test]
async fn a_go_style_session_probes_authenticates_binds_and_serves() {
    let edge = TestEdge::start().await;
    let mut go = GoClient::connect(&edge).await;

    // The diagnostics probe: SrvInfo before (and without) Auth.
    go.rpc(3, 8, &json!({})).await;
    assert_eq!(go.reply(3).await, json!({"Region": "us"}));

    // Heartbeats are echoed before Auth.
    let mut beat = 0xFFFF_FFFFu32.to_be_bytes().to_vec();
    beat.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    go.send(DATA, SYN, 5, &beat).await;
    loop {
        let f = go.frame().await.unwrap();
        if f.kind == DATA && f.id == 5 && !f.body.is_empty() {
            assert_eq!(f.body, 0x1234_5678u32.to_be_bytes());
            break;
        }
    }

    // Auth with Go's key spelling.
    let auth = json!({"Version": ["3", "2"], "ClientId": "", "Extra": {
        "OS": "linux", "Arch": "amd64", "Authtoken": edge.token, "Version": "2.0.0",
        "Hostname": "", "UserAgent": "ngrok-go/2.0.0", "Metadata": "", "Cookie": "",
        "HeartbeatInterval": 10_000_000_000i64, "HeartbeatTolerance": 15_000_000_000i64,
        "Fingerprint": null, "UpdateUnsupportedError": null, "StopUnsupportedError": null,
        "RestartUnsupportedError": null, "ProxyType": "", "MutualTLS": false,
        "ServiceRun": false, "ConfigVersion": "", "CustomInterface": false,
        "CustomCAs": false, "ClientType": "ngrok-go", "LegNumber": 0}});
    go.rpc(7, 0, &auth).await;
    let resp = go.reply(7).await;
    assert!(resp.get("Error").is_none(), "{resp}");
    assert!(!resp["ClientId"].as_str().unwrap().is_empty());

    // Bind the Go v2 way: the name in Opts.URL.
    let host = format!("go.{DOMAIN}");
    let bind = json!({"Id": "", "Proto": "https", "ForwardsTo": "http://localhost:8080",
        "ForwardsProto": "", "Opts": {"URL": format!("https://{host}"), "ProxyProto": 0,
        "TrafficPolicy": ""}, "Extra": {"Token": "", "IPPolicyRef": "", "Metadata": "",
        "Bindings": ["public"], "PoolingEnabled": false, "Name": "", "Description": ""}});
    go.rpc(9, 1, &bind).await;
    let resp = go.reply(9).await;
    assert_eq!(resp["URL"], edge.https_url(&host, ""), "{resp}");
    assert_eq!(resp["Opts"]["URL"], format!("https://{host}"));
    let tunnel_id = resp["Id"].as_str().unwrap().to_string();

    // A visitor: the edge opens an even stream, type 3, the header.
    let visit = {
        let (ca, resolve, url) = (
            edge.ca_pem(),
            edge.resolve(&host),
            edge.https_url(&host, "/go"),
        );
        tokio::spawn(async move {
            let out = postern_tests::curl(&[
                "--cacert",
                ca.to_str().unwrap(),
                "--resolve",
                &resolve,
                &url,
            ])
            .await;
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let (id, mut data) = loop {
        let f = go.frame().await.unwrap();
        if f.kind == DATA && f.flags & SYN != 0 {
            break (f.id, f.body);
        }
    };
    assert_eq!(id % 2, 0, "the edge opens even stream ids");
    while data.len() < 12 {
        data.extend(go.frame().await.unwrap().body);
    }
    assert_eq!(&data[..4], &3u32.to_be_bytes());
    let len = i64::from_le_bytes(data[4..12].try_into().unwrap()) as usize;
    while data.len() < 12 + len + 4 {
        let f = go.frame().await.unwrap();
        if f.id == id {
            data.extend(f.body);
        }
    }
    let header: Value = serde_json::from_slice(&data[12..12 + len]).unwrap();
    assert_eq!(header["Id"], tunnel_id.as_str());
    assert_eq!(header["Proto"], "https");
    assert_eq!(header["EdgeType"], "");
    // HTTP streams are kept alive and reused across visitors, as a
    // Postern agent's are: no one visitor's address (it is in
    // X-Forwarded-For).
    assert_eq!(header["ClientAddr"], "0.0.0.0:0", "{header}");
    assert!(String::from_utf8_lossy(&data[12 + len..]).starts_with("GET /go HTTP/1.1"));
    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nconnection: close\r\n\r\nfrom go!";
    go.send(DATA, FIN, id, answer).await;
    assert_eq!(visit.await.unwrap(), "from go!");
}

#[tokio::test]
async fn a_stream_id_of_the_wrong_parity_ends_the_session() {
    let edge = TestEdge::start().await;
    let mut go = GoClient::connect(&edge).await;
    go.send(DATA, SYN, 4, &8u32.to_be_bytes()).await;
    let goaway = loop {
        match go.frame().await {
            Some(f) if f.kind == GOAWAY => break f,
            Some(_) => continue,
            None => panic!("closed without GOAWAY"),
        }
    };
    assert_eq!(u32::from_be_bytes(goaway.body[4..8].try_into().unwrap()), 1);
    assert!(go.frame().await.is_none(), "the connection stays open");
}

#[tokio::test]
async fn binds_before_auth_and_unknown_options_are_refused() {
    let edge = TestEdge::start().await;
    let mut go = GoClient::connect(&edge).await;
    go.rpc(3, 1, &json!({"Proto": "https", "Opts": {}})).await;
    let resp = go.reply(3).await;
    assert!(resp["Error"].as_str().unwrap().contains("Auth"), "{resp}");

    go.rpc(
        5,
        0,
        &json!({"Version": ["3"], "Extra": {"AuthToken": edge.token, "ClientType": "ngrok-go"}}),
    )
    .await;
    assert!(go.reply(5).await.get("Error").is_none());
    let bind = json!({"Proto": "tcp", "Opts": {"Addr": "", "SomethingNew": {"x": 1}}});
    go.rpc(7, 1, &bind).await;
    let resp = go.reply(7).await;
    let error = resp["Error"].as_str().unwrap();
    assert!(
        error.contains("somethingnew") && error.contains("ERR_NGROK_225"),
        "{error}"
    );
}
