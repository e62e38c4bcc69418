//! The HTTP client for back-channel calls to identity providers
//! (discovery, JWKS, token, userinfo): hyper over tokio-rustls with the
//! process's one crypto provider (ring), a bound on every call, a cap on
//! response size, and no redirects followed (they would open the edge to
//! SSRF). Plain `http://` is allowed only to loopback addresses, for IdPs
//! running next to the edge and for tests.

use std::{future::Future, net::IpAddr, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use openidconnect::{AsyncHttpClient, HttpRequest, HttpResponse};
use postern_net::crypto_provider;
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use tokio::net::TcpStream;

/// Largest IdP response read.
const MAX_RESPONSE: usize = 1024 * 1024;

/// Why a back-channel call failed.
#[derive(Debug, thiserror::Error)]
pub enum IdpHttpError {
    #[error("{0}: only https:// (or http:// to a loopback address) is allowed")]
    Scheme(String),
    #[error("{0}: the URL has no host")]
    NoHost(String),
    #[error("{url}: {detail}")]
    Transport { url: String, detail: String },
    #[error("{0}: no answer within {1:?}")]
    Timeout(String, Duration),
}

/// A client for identity providers.
#[derive(Clone)]
pub struct IdpHttp {
    tls: Arc<ClientConfig>,
    timeout: Duration,
}

impl std::fmt::Debug for IdpHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdpHttp")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl IdpHttp {
    /// Trusts the Mozilla roots plus `extra_roots` (PEM certificates).
    pub fn new(
        extra_roots: &[rustls::pki_types::CertificateDer<'static>],
        timeout: Duration,
    ) -> IdpHttp {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in extra_roots {
            if let Err(e) = roots.add(cert.clone()) {
                tracing::warn!(error = %e, "an IdP root CA could not be added");
            }
        }
        let mut config = ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        IdpHttp {
            tls: Arc::new(config),
            timeout,
        }
    }

    /// One request, answered in full within the timeout.
    pub async fn send(&self, request: HttpRequest) -> Result<HttpResponse, IdpHttpError> {
        let url = request.uri().to_string();
        match tokio::time::timeout(self.timeout, self.send_inner(request)).await {
            Ok(result) => result,
            Err(_) => Err(IdpHttpError::Timeout(url, self.timeout)),
        }
    }

    async fn send_inner(&self, request: HttpRequest) -> Result<HttpResponse, IdpHttpError> {
        let uri = request.uri().clone();
        let url = uri.to_string();
        let transport = |detail: String| IdpHttpError::Transport {
            url: url.clone(),
            detail,
        };
        let host = uri
            .host()
            .ok_or_else(|| IdpHttpError::NoHost(url.clone()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") if is_loopback(&host) => false,
            _ => return Err(IdpHttpError::Scheme(url)),
        };
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| transport(format!("connecting: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let (mut parts, body) = request.into_parts();
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_else(|| host.clone());
        parts.uri = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse()
            .map_err(|e| transport(format!("bad path: {e}")))?;
        parts.headers.insert(
            header::HOST,
            HeaderValue::from_str(&authority).map_err(|e| transport(e.to_string()))?,
        );
        parts
            .headers
            .entry(header::USER_AGENT)
            .or_insert(HeaderValue::from_static("postern-edge"));
        let request = Request::from_parts(parts, Full::new(Bytes::from(body)));
        let response = if tls {
            let name = ServerName::try_from(host.clone()).map_err(|e| transport(e.to_string()))?;
            let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| transport(format!("TLS: {e}")))?;
            exchange(TokioIo::new(stream), request).await
        } else {
            exchange(TokioIo::new(tcp), request).await
        }
        .map_err(transport)?;
        Ok(response)
    }
}

async fn exchange<IO>(io: IO, request: Request<Full<Bytes>>) -> Result<HttpResponse, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    // The connection is driven here, next to the exchange: no task of its
    // own to outlive the call.
    let exchange = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| format!("reading the response: {e}"))?
            .to_bytes();
        Ok(Response::from_parts(parts, body.to_vec()))
    };
    tokio::pin!(exchange, conn);
    tokio::select! {
        result = &mut exchange => result,
        // Closed first: what was read is in the exchange's buffers.
        _ = &mut conn => exchange.await,
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl<'c> AsyncHttpClient<'c> for IdpHttp {
    type Error = IdpHttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, IdpHttpError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(self.send(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plain_http_only_to_loopback() {
        let client = IdpHttp::new(&[], Duration::from_secs(1));
        let req = http::Request::get("http://idp.example.test/x")
            .body(Vec::new())
            .unwrap();
        assert!(matches!(
            client.send(req).await,
            Err(IdpHttpError::Scheme(_))
        ));
        assert!(is_loopback("127.0.0.1") && is_loopback("::1") && is_loopback("LOCALHOST"));
        assert!(!is_loopback("10.0.0.1"));
    }
}
