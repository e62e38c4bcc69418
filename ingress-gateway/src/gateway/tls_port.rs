//! The HTTPS/TLS port: the ClientHello peeked for SNI, then HTTP served,
//! TLS ended at the edge, or TLS passed through to the agent.

use super::*;

/// The fatal `unrecognized_name` alert (RFC 6066), sent before any
/// handshake state exists.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 112];

pub(super) async fn handle_tls_port(inner: Arc<Inner>, accepted: Accepted) {
    let Accepted {
        mut stream,
        client,
        local,
        prefix,
        slot: _slot,
    } = accepted;
    let config = &inner.config;
    let mut buf = BytesMut::from(prefix.as_ref());
    let peeked = tokio::time::timeout(
        config.client_hello_timeout,
        read_client_hello(&mut stream, &mut buf, config.client_hello_max),
    )
    .await;
    let hello = match peeked {
        Err(_) => {
            inner.count(Counter::TlsClientHelloTimeout);
            return;
        }
        Ok(Err(e)) => {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                inner.count(Counter::TlsBadClientHello);
                tracing::debug!(%client, error = %e, "bad ClientHello");
            }
            return;
        }
        Ok(Ok(hello)) => hello,
    };
    let Some(name) = hello.server_name else {
        inner.count(Counter::TlsNoSni);
        match inner.no_sni_tls.clone() {
            // Serve HTTP with the default certificate; routing is by Host.
            Some(config) => {
                let start = SystemTime::now();
                if let Some(tls) = accept_tls(&inner, config, buf.freeze(), stream).await {
                    let conn = ConnInfo::tls(client, local, None, tls.get_ref().1, start);
                    serve_http_connection(inner.clone(), tls, conn).await;
                }
            }
            None => {
                let _ = stream.write_all(&ALERT_UNRECOGNIZED_NAME).await;
            }
        }
        return;
    };
    if hello.alpn.iter().any(|p| p == ACME_TLS_ALPN)
        && let Some(key) = inner.acme.tls_alpn01(&name)
    {
        // An ACME CA validating TLS-ALPN-01 (RFC 8737): the handshake
        // shows the validation certificate and the connection ends.
        let config = single_cert_config(key, &[ACME_TLS_ALPN]);
        if let Some(mut tls) = accept_tls(&inner, config, buf.freeze(), stream).await {
            let _ = tls.shutdown().await;
        }
        return;
    }
    if inner
        .config
        .oauth
        .as_ref()
        .is_some_and(|o| o.is_auth_host(&name))
    {
        // The OAuth callback host: HTTPS with the shared certificates.
        let start = SystemTime::now();
        let config = inner.http_tls.clone();
        if let Some(tls) = accept_tls(&inner, config, buf.freeze(), stream).await {
            let conn = ConnInfo::tls(client, local, Some(name), tls.get_ref().1, start);
            serve_http_connection(inner.clone(), tls, conn).await;
        }
        return;
    }
    let route = inner
        .routes
        .read()
        .expect("routes lock")
        .lookup(&name)
        .cloned();
    let Some(route) = route else {
        inner.count(Counter::TlsUnknownSni);
        let _ = stream.write_all(&ALERT_UNRECOGNIZED_NAME).await;
        return;
    };
    let prefix = buf.freeze();
    let start = SystemTime::now();
    if let (EndpointKind::Http, Some(config)) = (&route.kind, route.termination.clone()) {
        // HTTP endpoints apply IP restrictions per request, with a 403 page.
        if let Some(tls) = accept_tls(&inner, config, prefix, stream).await {
            let conn = ConnInfo::tls(client, local, Some(name), tls.get_ref().1, start);
            serve_http_connection(inner.clone(), tls, conn).await;
        }
        return;
    }
    let Some(first) = route.pool.pick(&[]) else {
        inner.count(Counter::TlsUnknownSni);
        let _ = stream.write_all(&ALERT_UNRECOGNIZED_NAME).await;
        return;
    };
    let mut record = ConnRecord {
        client,
        server: local,
        name: &name,
        start,
        proto: "tls",
        endpoint: first.endpoint.clone(),
        ip_decision: None,
        logs: Vec::new(),
    };
    let admitted = on_connect(&inner, &route, &mut record);
    let span = record.span();
    let visitor = Visitor {
        client,
        local,
        name: &name,
    };
    let result = async {
        match route.termination.clone() {
            // Refused before any byte reaches the agent, without a handshake.
            _ if let Err(refused) = admitted => Some(Err(refused)),
            Some(config) => {
                let tls = accept_tls(&inner, config, prefix, stream).await?;
                let (r, w) = tokio::io::split(tls);
                Some(
                    proxy_bytes(
                        &inner,
                        &route,
                        first,
                        &mut record,
                        r,
                        w,
                        Bytes::new(),
                        &visitor,
                    )
                    .await,
                )
            }
            None => {
                let (r, w) = stream.into_split();
                Some(proxy_bytes(&inner, &route, first, &mut record, r, w, prefix, &visitor).await)
            }
        }
    }
    .instrument(span.clone())
    .await;
    let Some(result) = result else {
        return;
    };
    outcome::tcp_closed(&inner.outcomes, &record, &span, &result);
    if let Err(e) = result {
        tracing::debug!(endpoint = %record.endpoint.id, error = %e, "TLS connection not proxied");
    }
}

async fn accept_tls(
    inner: &Inner,
    config: Arc<ServerConfig>,
    prefix: Bytes,
    stream: TcpStream,
) -> Option<tokio_rustls::server::TlsStream<Prefixed<TcpStream>>> {
    let io = Prefixed::new(prefix, stream);
    let accept = TlsAcceptor::from(config).accept(io).into_fallible();
    match tokio::time::timeout(inner.config.tls_handshake_timeout, accept).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err((e, mut io))) => {
            inner.count(Counter::TlsHandshakeFailed);
            let client_cert = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .is_some_and(|r| {
                    matches!(
                        r,
                        rustls::Error::InvalidCertificate(_)
                            | rustls::Error::NoCertificatesPresented
                    )
                });
            if client_cert {
                inner.count(Counter::TlsBadClientCert);
            }
            tracing::debug!(error = %e, "TLS handshake failed");
            // The alert is written; close gently so it is not lost to a
            // reset (a TLS 1.3 client may already have sent its request).
            let _ = io.shutdown().await;
            let mut sink = tokio::io::sink();
            let drain = tokio::io::copy(&mut io, &mut sink);
            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
            None
        }
        Err(_) => {
            inner.count(Counter::TlsHandshakeFailed);
            None
        }
    }
}

/// Reads until `buf` holds a whole ClientHello.
async fn read_client_hello(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    max: usize,
) -> io::Result<sni::ClientHello> {
    loop {
        match sni::peek_client_hello(buf, max) {
            Ok(Peek::Complete(hello)) => return Ok(hello),
            Ok(Peek::Incomplete) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
        let room = max.saturating_sub(buf.len()).min(4096);
        buf.reserve(room);
        let read = stream.read_buf(&mut (&mut *buf).limit(room)).await?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

use bytes::BufMut;
