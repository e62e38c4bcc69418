//! The connector a tonic channel dials with, and the links between edge
//! nodes: TLS naming a server over a stream a function opens (plain TCP,
//! or through a proxy).

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsConnector, client::TlsStream};

/// TLS with `tls`, naming `name`, over the stream `dial` opens; the URI a
/// channel passes is not used (the dialler knows where to go).
#[derive(Clone)]
pub struct TlsConnect<D> {
    pub dial: D,
    pub name: ServerName<'static>,
    pub tls: TlsConnector,
}

impl<D, F, S> tower_service::Service<Uri> for TlsConnect<D>
where
    D: Fn() -> F + Clone + Send + 'static,
    F: Future<Output = io::Result<S>> + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Response = TokioIo<TlsStream<S>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let connect = self.connect();
        Box::pin(async move { Ok(TokioIo::new(connect.await?)) })
    }
}

impl<D, F, S> TlsConnect<D>
where
    D: Fn() -> F,
    F: Future<Output = io::Result<S>> + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Opens the stream and completes the TLS handshake over it: what a
    /// channel's dial does, for a caller that speaks HTTP/2 itself (the
    /// links between edge nodes).
    pub fn connect(&self) -> impl Future<Output = io::Result<TlsStream<S>>> + Send + 'static {
        let (stream, name, tls) = ((self.dial)(), self.name.clone(), self.tls.clone());
        async move { tls.connect(name, stream.await?).await }
    }
}

/// A TCP connection to `addr` with `TCP_NODELAY`, for [`TlsConnect`].
pub async fn tcp_nodelay(addr: std::net::SocketAddr) -> io::Result<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}
