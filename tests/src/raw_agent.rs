//! A raw agent session: the tunnel protocol's control stream driven by the
//! test itself, for agents that break the rules (floods, bad messages).

use postern_net::{TlsConnect, tcp_nodelay};
use postern_proto::{MAX_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, pb};
use rustls::pki_types::ServerName;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;

use crate::{TestEdge, client::client_tls};

/// A connection to the agent listener and the outbound side of the data
/// stream opened on it.
pub struct RawConnection {
    _client: pb::tunnel_client::TunnelClient<tonic::transport::Channel>,
    _outbound: mpsc::Sender<pb::Frame>,
}

/// A control stream opened with Hello and answered with Welcome.
pub struct RawSession {
    /// The connection the control stream is on, as tonic's client.
    client: pb::tunnel_client::TunnelClient<tonic::transport::Channel>,
    pub tx: mpsc::Sender<pb::AgentMessage>,
    pub inbound: tonic::Streaming<pb::EdgeMessage>,
    pub welcome: pb::Welcome,
}

impl RawSession {
    /// Opens a data stream on the session's own connection, as an agent
    /// with one connection and tonic's client does: the stream's inbound
    /// side, or the edge's refusal, and its outbound side.
    pub async fn open_data(
        &self,
    ) -> (
        Result<tonic::Streaming<pb::Frame>, tonic::Status>,
        mpsc::Sender<pb::Frame>,
    ) {
        open_data(&mut self.client.clone(), self).await
    }

    /// Sends one message; false when the stream is gone.
    pub async fn send(&self, msg: pb::agent_message::Msg) -> bool {
        self.tx
            .send(pb::AgentMessage { msg: Some(msg) })
            .await
            .is_ok()
    }

    /// The next message from the edge; `None` when the stream ended.
    pub async fn next(&mut self) -> Option<pb::edge_message::Msg> {
        loop {
            match self.inbound.message().await {
                Ok(Some(pb::EdgeMessage { msg: Some(msg) })) => return Some(msg),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }
}

impl TestEdge {
    /// A new TLS + HTTP/2 connection to the agent listener.
    async fn raw_connection(&self) -> pb::tunnel_client::TunnelClient<tonic::transport::Channel> {
        let pem = std::fs::read(self.ca_pem()).expect("the dev CA");
        let agent = self.addrs.agent;
        let connector = TlsConnect {
            dial: move || tcp_nodelay(agent),
            name: ServerName::try_from("tunnel.us.connect.example.test").expect("a DNS name"),
            tls: TlsConnector::from(client_tls(&pem, &[b"h2"])),
        };
        let channel = tonic::transport::Endpoint::from_static("http://edge")
            .connect_with_connector(connector)
            .await
            .expect("the edge accepts the connection");
        pb::tunnel_client::TunnelClient::new(channel)
    }

    /// Opens a data stream for `session` on a connection of its own: the
    /// stream's inbound side, or the edge's refusal; and the connection
    /// with the stream's outbound side, both closed when it is dropped.
    pub async fn raw_data_connection(
        &self,
        session: &RawSession,
    ) -> (
        Result<tonic::Streaming<pb::Frame>, tonic::Status>,
        RawConnection,
    ) {
        let mut client = self.raw_connection().await;
        let (opened, outbound) = open_data(&mut client, session).await;
        (
            opened,
            RawConnection {
                _client: client,
                _outbound: outbound,
            },
        )
    }

    /// Opens a control stream with `token` and waits for the Welcome.
    pub async fn raw_session(&self, token: &str) -> RawSession {
        let client = self.raw_connection().await;
        let (tx, rx) = mpsc::channel(4096);
        let hello = pb::Hello {
            protocol_version: MAX_PROTOCOL_VERSION,
            min_protocol_version: MIN_PROTOCOL_VERSION,
            authtoken: token.to_string(),
            agent_version: "raw-test-agent".into(),
            instance_id: crate::rand_suffix(),
            os: "linux".into(),
            stream_pool: 0,
        };
        tx.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(hello)),
        })
        .await
        .unwrap();
        let mut session = RawSession {
            inbound: client
                .clone()
                .control(ReceiverStream::new(rx))
                .await
                .expect("the control stream opens")
                .into_inner(),
            client,
            tx,
            welcome: pb::Welcome::default(),
        };
        match session.next().await {
            Some(pb::edge_message::Msg::Welcome(welcome)) => session.welcome = welcome,
            other => panic!("no welcome: {other:?}"),
        }
        session
    }
}

/// Opens a data stream for `session` on `client`'s connection.
async fn open_data(
    client: &mut pb::tunnel_client::TunnelClient<tonic::transport::Channel>,
    session: &RawSession,
) -> (
    Result<tonic::Streaming<pb::Frame>, tonic::Status>,
    mpsc::Sender<pb::Frame>,
) {
    let (outbound, frames) = mpsc::channel(8);
    let mut request = tonic::Request::new(ReceiverStream::new(frames));
    let meta = request.metadata_mut();
    meta.insert(
        postern_proto::metadata::SESSION,
        session.welcome.session_id.parse().expect("an ASCII id"),
    );
    meta.insert(
        postern_proto::metadata::STREAM_TOKEN,
        session
            .welcome
            .stream_token
            .parse()
            .expect("an ASCII token"),
    );
    let opened = client.data(request).await.map(|r| r.into_inner());
    (opened, outbound)
}
