//! The inter-node link: gRPC (`NodeLink.Forward`) over mutual TLS with
//! certificates from the cluster CA. A node that receives a visitor for an
//! endpoint served elsewhere opens a `Forward` stream to a holding node;
//! that node claims a data stream from its own agent and relays frames both
//! ways, rewriting only the endpoint id of the first frame. Nothing is
//! buffered beyond the HTTP/2 windows on either hop.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use futures_util::{Stream, StreamExt, future::BoxFuture};
use hyper_util::rt::TokioIo;
use postern_ingress::ClaimedStream;
use postern_proto::{ErrorCode, Failure, h2_settings, metadata, pb};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming, transport::Channel};

use super::pki::{ClusterCa, NODE_NAME};
use crate::session::Registry;

/// A node that holds an endpoint, as a forwarding target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub node_id: String,
    pub region: String,
    pub rpc_addr: SocketAddr,
    /// The endpoint's id at that node.
    pub endpoint_id: String,
}

/// Client side: one lazily connected channel per peer.
pub struct Links {
    node_id: String,
    tls: Arc<rustls::ClientConfig>,
    channels: Mutex<HashMap<SocketAddr, Channel>>,
    timeout: Duration,
}

impl Links {
    pub fn new(node_id: String, ca: &ClusterCa, timeout: Duration) -> anyhow::Result<Links> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let (cert, key) = ca.issue(&[NODE_NAME.to_string()])?;
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
        let mut tls = rustls::ClientConfig::builder_with_provider(postern_ingress::crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(ca.roots())
            .with_client_auth_cert(chain, key)?;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Links {
            node_id,
            tls: Arc::new(tls),
            channels: Mutex::new(HashMap::new()),
            timeout,
        })
    }

    fn channel(&self, addr: SocketAddr) -> Channel {
        let mut channels = self.channels.lock().expect("channels lock");
        channels
            .entry(addr)
            .or_insert_with(|| {
                tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .expect("a socket address is a valid URI")
                    .connect_timeout(Duration::from_secs(2))
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .keep_alive_while_idle(true)
                    .initial_stream_window_size(h2_settings::STREAM_WINDOW)
                    .initial_connection_window_size(h2_settings::CONNECTION_WINDOW)
                    .tcp_nodelay(true)
                    .connect_with_connector_lazy(Connector {
                        addr,
                        tls: TlsConnector::from(self.tls.clone()),
                    })
            })
            .clone()
    }

    /// A data stream to an agent of `holder`, relayed by it.
    pub async fn forward(&self, holder: &Holder) -> Result<ClaimedStream, Failure> {
        let (attach, frames) = postern_proto::attachable();
        let mut request = Request::new(frames);
        let meta = request.metadata_mut();
        for (key, value) in [
            (metadata::FORWARD_ENDPOINT, holder.endpoint_id.as_str()),
            (metadata::FORWARD_FROM, self.node_id.as_str()),
        ] {
            if let Ok(v) = value.parse() {
                meta.insert(key, v);
            }
        }
        let mut client = pb::node_link_client::NodeLinkClient::new(self.channel(holder.rpc_addr));
        let failed = |detail: String| {
            Failure::new(
                ErrorCode::AGENT_FORWARD_FAILED,
                format!("forwarding to node {} ({}): {detail}", holder.node_id, holder.region),
            )
        };
        let response = tokio::time::timeout(self.timeout, client.forward(request))
            .await
            .map_err(|_| failed(format!("no stream within {:?}", self.timeout)))?
            .map_err(|status| {
                let code = status
                    .metadata()
                    .get(metadata::ERROR_CODE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .and_then(ErrorCode::from_number);
                match code {
                    Some(code) => Failure::new(code, status.message().to_string()),
                    None => failed(status.message().to_string()),
                }
            })?;
        Ok(ClaimedStream {
            inbound: response.into_inner(),
            attach,
            permit: None,
        })
    }
}

#[derive(Clone)]
struct Connector {
    addr: SocketAddr,
    tls: TlsConnector,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Self::Response>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let (addr, tls) = (self.addr, self.tls.clone());
        Box::pin(async move {
            let tcp = TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(NODE_NAME).expect("valid name");
            Ok(TokioIo::new(tls.connect(name, tcp).await?))
        })
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Server side: relays a forwarded connection into a local agent.
pub struct NodeLinkService {
    pub registry: Arc<Registry>,
}

fn refuse(failure: Failure) -> Status {
    let mut status = Status::unavailable(failure.to_string());
    if let Ok(v) = failure.code.number.to_string().parse() {
        status.metadata_mut().insert(metadata::ERROR_CODE, v);
    }
    status
}

#[tonic::async_trait]
impl pb::node_link_server::NodeLink for NodeLinkService {
    type ForwardStream = BoxStream<pb::Frame>;

    async fn forward(
        &self,
        request: Request<Streaming<pb::Frame>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let value = |key: &str| {
            request
                .metadata()
                .get(key)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let (endpoint_id, from) = (value(metadata::FORWARD_ENDPOINT), value(metadata::FORWARD_FROM));
        let pool = self.registry.local_pool(&endpoint_id).ok_or_else(|| {
            refuse(Failure::new(
                ErrorCode::ENDPOINT_OFFLINE,
                format!("no agent of this node serves {endpoint_id}"),
            ))
        })?;
        let claimed = pool.claim_local().await.map_err(refuse)?;
        tracing::debug!(endpoint = %endpoint_id, from = %from, "forwarded connection");
        let permit = claimed.permit;
        let local_id = endpoint_id.clone();
        let from_sender = request.into_inner().map_while(Result::ok).map(move |mut frame| {
            if let Some(open) = frame.open.as_mut() {
                open.endpoint_id = local_id.clone();
            }
            frame
        });
        claimed.attach.send(Box::pin(from_sender)).map_err(|_| {
            refuse(Failure::new(
                ErrorCode::AGENT_FORWARD_FAILED,
                "the agent's data stream closed",
            ))
        })?;
        let to_sender = claimed.inbound.map(move |frame| {
            let _held = &permit;
            frame
        });
        Ok(Response::new(Box::pin(to_sender)))
    }
}

/// Serves the link on `listener` until `stop`.
pub fn serve(
    listener: TcpListener,
    ca: &ClusterCa,
    registry: Arc<Registry>,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>> {
    let provider = postern_ingress::crypto_provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(ca.roots()),
        provider.clone(),
    )
    .build()?;
    let (cert, key) = ca.issue(&[NODE_NAME.to_string()])?;
    let certified = postern_ingress::certified_key_from_pem("node certificate", cert.as_bytes(), key.as_bytes())?;
    let resolver = Arc::new(rustls::sign::SingleCertAndKey::from(Arc::new(certified)));
    let config = postern_ingress::build_server_config(resolver, Some(verifier), &[b"h2"]);
    let incoming = crate::service::agent_incoming(listener, config, stop.clone());
    let server = crate::service::server_builder(Duration::from_secs(5), Duration::from_secs(10))
        .add_service(pb::node_link_server::NodeLinkServer::new(NodeLinkService { registry }));
    Ok(tokio::spawn(
        server.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()),
    ))
}
