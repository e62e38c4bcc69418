//! The gossip socket: chitchat's UDP transport (or its in-memory one, for
//! simulations), opened before chitchat starts so a node can listen on
//! port 0 and advertise the port it got, and wrapped so that tests can cut
//! the link to chosen peers ([`Partition`]).

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Context;
use async_trait::async_trait;
use chitchat::{
    ChitchatEnvelope,
    transport::{ChannelTransport, RecvOutcome, SendOutcome, Socket, Transport, UdpTransport},
};

use crate::ClusterError;

/// Where gossip goes.
#[derive(Clone, Debug)]
pub enum GossipTransport {
    /// UDP on `listen` (port 0 picks one); peers are told `advertise`, by
    /// default the listen address with the port actually bound.
    Udp {
        listen: SocketAddr,
        advertise: Option<SocketAddr>,
    },
    /// A simulated network in this process.
    InMemory {
        network: InMemoryNetwork,
        addr: SocketAddr,
    },
}

/// A network of nodes in one process (chitchat's channel transport with
/// the UDP datagram limit), for simulations of large clusters.
#[derive(Clone)]
pub struct InMemoryNetwork(ChannelTransport);

impl std::fmt::Debug for InMemoryNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InMemoryNetwork")
    }
}

impl Default for InMemoryNetwork {
    fn default() -> Self {
        InMemoryNetwork(ChannelTransport::with_mtu(65_507))
    }
}

impl InMemoryNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    /// Messages and bytes sent on the network so far.
    pub fn traffic(&self) -> (u64, u64) {
        let s = self.0.statistics();
        (s.num_messages_total, s.num_bytes_total)
    }
}

/// Cuts gossip to and from chosen peers (by gossip address): a partition
/// without touching the host's network. For fault-injection tests.
#[derive(Clone, Debug, Default)]
pub struct Partition {
    blocked: Arc<Mutex<HashSet<SocketAddr>>>,
    dropped: Arc<AtomicU64>,
}

impl Partition {
    /// Drops every datagram to or from `peer`.
    pub fn block(&self, peer: SocketAddr) {
        self.blocked.lock().expect("partition lock").insert(peer);
    }

    /// Lets all traffic through again.
    pub fn heal(&self) {
        self.blocked.lock().expect("partition lock").clear();
    }

    /// Datagrams dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn blocks(&self, peer: SocketAddr) -> bool {
        let blocked = self.blocked.lock().expect("partition lock").contains(&peer);
        if blocked {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        blocked
    }
}

/// Opens the socket now; chitchat gets it when it calls `open`.
pub(crate) async fn open(
    transport: &GossipTransport,
    partition: Partition,
) -> Result<(PreOpened, SocketAddr, SocketAddr), ClusterError> {
    // chitchat's sockets say what failed in an `anyhow::Error`; this is
    // where it becomes ours.
    let gossip = |e: anyhow::Error| ClusterError::Gossip(format!("{e:#}"));
    let (socket, advertise) = match transport {
        GossipTransport::Udp { listen, advertise } => {
            let socket = UdpTransport.open(*listen).await.map_err(gossip)?;
            let bound = socket.local_addr().map_err(gossip)?;
            let advertise = match advertise {
                Some(a) => *a,
                None if bound.ip().is_unspecified() => {
                    return Err(ClusterError::Gossip(format!(
                        "listening on {bound}: give the address peers should use (gossip_advertise)"
                    )));
                }
                None => bound,
            };
            (socket, advertise)
        }
        GossipTransport::InMemory { network, addr } => {
            let socket = network.0.open(*addr).await.map_err(gossip)?;
            let bound = socket.local_addr().map_err(gossip)?;
            (socket, bound)
        }
    };
    let bound = socket.local_addr().map_err(gossip)?;
    Ok((
        PreOpened {
            socket: Mutex::new(Some(Box::new(Filtered {
                inner: socket,
                partition,
            }))),
        },
        bound,
        advertise,
    ))
}

/// A transport whose one socket is already open.
pub(crate) struct PreOpened {
    socket: Mutex<Option<Box<dyn Socket>>>,
}

#[async_trait]
impl Transport for PreOpened {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        self.socket
            .lock()
            .expect("socket lock")
            .take()
            .context("the gossip socket is already in use")
    }
}

struct Filtered {
    inner: Box<dyn Socket>,
    partition: Partition,
}

#[async_trait]
impl Socket for Filtered {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        if self.partition.blocks(to) {
            return Ok(SendOutcome { num_bytes_sent: 0 });
        }
        self.inner.send(to, envelope).await
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let received = self.inner.recv().await?;
            if !self.partition.blocks(received.from_addr) {
                return Ok(received);
            }
        }
    }
}
