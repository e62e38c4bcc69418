//! The [`Cluster`] handle: joins the gossip, publishes this node's values,
//! merges everyone's, and keeps a materialized view that reads without
//! touching chitchat.
//!
//! Gossip keys, each in the key space of the node that publishes it:
//!
//! - `c/<kind>/<id>`: this node's copy of a cluster-wide config object
//!   (signed envelope; tombstones are envelopes with `d`). Every node
//!   re-publishes the winner it merged, so an object survives the node that
//!   took the write.
//! - `l/<kind>/<id>`: live state this node owns (routes, sessions). Only
//!   read from live nodes; gone with the node.
//! - `n`: the node's region and inter-node address.

mod merge;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use chitchat::{
    Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ListenerHandle,
    NodeState, ProtocolVersion, VersionedValue, spawn_chitchat,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::{
    sync::{Notify, broadcast, watch},
    task::JoinHandle,
};

use crate::{
    ClusterError,
    envelope::{self, MAX_ENVELOPE, Payload},
    hlc::{Clock, Hlc},
    key::ClusterKey,
    snapshot,
    transport::{self, GossipTransport, Partition},
};

use merge::{Gossiped, Parsed};

/// A type of gossiped object. `KIND` names it in gossip keys: a short
/// lower-case word without `/` or `#`.
pub trait Kind: Serialize + DeserializeOwned + Send + Sync + 'static {
    const KIND: &'static str;
}

/// How a node joins.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// Only nodes with the same id gossip together.
    pub cluster_id: String,
    /// This node, unique in the cluster.
    pub node_id: String,
    /// Its region code.
    pub region: String,
    /// Signs and checks every value.
    pub key: ClusterKey,
    pub transport: GossipTransport,
    /// `host:port` gossip addresses of other nodes to join through.
    pub seeds: Vec<String>,
    /// Gossip round interval.
    pub gossip_interval: Duration,
    /// Phi-accrual threshold: a node silent for about `phi × the mean
    /// heartbeat interval` is dead.
    pub phi_threshold: f64,
    /// How long deletions are remembered. A node cut off for longer than
    /// this can bring a deleted object back.
    pub tombstone_ttl: Duration,
    /// Where the config snapshot lives; `None` keeps nothing on disk.
    pub data_dir: Option<PathBuf>,
    /// This node's inter-node (forwarding) address, told to the others;
    /// `None` when the node offers none.
    pub rpc_addr: Option<SocketAddr>,
    /// Where agents reach this node (`host:port`), told to the others so
    /// that agents can be pointed at another node of their region.
    pub agent_addr: Option<String>,
}

/// A live node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub node_id: String,
    pub region: String,
    /// Its inter-node address, if it offers one.
    pub rpc_addr: Option<SocketAddr>,
    /// Where agents reach it, if it says.
    pub agent_addr: Option<String>,
    pub gossip_addr: SocketAddr,
    /// Changes at every restart.
    pub generation: u64,
    /// This node.
    pub is_self: bool,
}

/// A value owned by a live node.
#[derive(Clone, Debug)]
pub struct Local<T> {
    pub node: Member,
    pub id: String,
    pub value: T,
}

/// Something in the view changed. Consumers re-read what they need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Objects of this kind were written, deleted or merged in.
    Config(String),
    /// Live values of this kind changed (published, withdrawn, or their
    /// node joined or died).
    Local(String),
    /// A node joined, left or died.
    Members,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct NodeInfo {
    region: String,
    #[serde(default)]
    rpc: Option<SocketAddr>,
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    leaving: bool,
}

#[derive(Clone, Debug)]
struct Record {
    hlc: Hlc,
    origin: String,
    deleted: bool,
    value: Option<serde_json::Value>,
    envelope: Arc<str>,
}

impl Record {
    fn rank(&self) -> (Hlc, &str) {
        (self.hlc, &self.origin)
    }
}

type LocalEntries = Vec<(Member, String, serde_json::Value)>;

#[derive(Default)]
struct View {
    config: BTreeMap<String, Record>,
    locals: BTreeMap<String, LocalEntries>,
    members: Vec<Member>,
    regions: BTreeSet<String>,
    generation: u64,
}

#[derive(Default)]
struct Counters {
    refused: AtomicU64,
    stale: AtomicU64,
    republished: AtomicU64,
    collected: AtomicU64,
    passes: AtomicU64,
}

struct Tasks {
    chitchat: ChitchatHandle,
    reconciler: JoinHandle<()>,
    _listener: ListenerHandle,
}

struct Inner {
    cluster_id: String,
    node_id: String,
    region: String,
    key: ClusterKey,
    tombstone_ttl: Duration,
    gossip_interval: Duration,
    rpc_addr: Option<SocketAddr>,
    agent_addr: Option<String>,
    self_id: ChitchatId,
    chitchat: Arc<tokio::sync::Mutex<Chitchat>>,
    clock: Clock,
    view: RwLock<View>,
    changes: broadcast::Sender<Change>,
    poke: Arc<Notify>,
    counters: Counters,
    partition: Partition,
    snapshot_path: Option<PathBuf>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Option<Tasks>>,
}

/// A node's membership in the cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.inner.node_id)
            .field("region", &self.inner.region)
            .field("gossip", &self.inner.self_id.gossip_advertise_addr)
            .finish()
    }
}

fn config_key(kind: &str, id: &str) -> String {
    format!("c/{kind}/{id}")
}

fn local_key(kind: &str, id: &str) -> String {
    format!("l/{kind}/{id}")
}

/// `(kind, id)` of a `c/` or `l/` key.
fn split_key(key: &str) -> Option<(&str, &str)> {
    key.get(2..)?.split_once('/')
}

fn check_id(what: &str, id: &str) -> Result<(), ClusterError> {
    if id.is_empty() || id.len() > 200 || id.contains(['/', '#']) {
        return Err(ClusterError::Settings {
            field: what.to_string(),
            reason: format!("{id:?} must be 1-200 characters without '/' or '#'"),
        });
    }
    Ok(())
}

fn wall_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Sets a (possibly chunked) envelope in this node's key space, removing
/// chunks a previous, larger value left behind.
fn set_split(state: &mut NodeState, key: &str, envelope: &str) {
    let old_chunks = state
        .get(key)
        .and_then(envelope::manifest)
        .map(|(_, n)| n)
        .unwrap_or(0);
    let values = envelope::split(key, envelope);
    let new_chunks = values.len().saturating_sub(1);
    for (k, v) in values {
        state.set(k, v);
    }
    for i in new_chunks..old_chunks {
        state.delete(&envelope::chunk_key(key, i));
    }
}

fn delete_split(state: &mut NodeState, key: &str) {
    let chunks = state
        .get(key)
        .and_then(envelope::manifest)
        .map(|(_, n)| n)
        .unwrap_or(0);
    state.delete(key);
    for i in 0..chunks {
        state.delete(&envelope::chunk_key(key, i));
    }
}

impl Cluster {
    /// Joins the cluster: opens the gossip socket, loads the snapshot (so
    /// the config is there before gossip catches up), publishes this node.
    pub async fn start(settings: ClusterSettings) -> Result<Cluster, ClusterError> {
        check_id("cluster.node_id", &settings.node_id)?;
        if settings.cluster_id.is_empty() {
            return Err(ClusterError::Settings {
                field: "cluster.cluster_id".into(),
                reason: "must not be empty".into(),
            });
        }
        if settings.gossip_interval.is_zero()
            || settings.phi_threshold.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        {
            return Err(ClusterError::Settings {
                field: "cluster.gossip_interval".into(),
                reason: "the gossip interval and phi threshold must be positive".into(),
            });
        }
        let partition = Partition::default();
        let (socket, bound, advertise) =
            transport::open(&settings.transport, partition.clone()).await?;
        let generation = wall_millis();
        let self_id = ChitchatId::new(settings.node_id.clone(), generation, advertise);
        let clock = Clock::default();

        let snapshot_path = settings.data_dir.as_deref().map(snapshot::path);
        let mut restored = BTreeMap::new();
        if let Some(path) = &snapshot_path {
            for (key, env) in snapshot::load(path)?.entries {
                match envelope::open(&settings.key, &settings.cluster_id, &key, &env) {
                    Ok(p) if key.starts_with("c/") => {
                        clock.observe(p.h);
                        restored.insert(
                            key,
                            Record {
                                hlc: p.h,
                                origin: p.o,
                                deleted: p.d,
                                value: p.v,
                                envelope: env.into(),
                            },
                        );
                    }
                    _ => tracing::warn!(path = %path.display(), key, "snapshot entry refused"),
                }
            }
            if !restored.is_empty() {
                tracing::info!(
                    objects = restored.len(),
                    "cluster config restored from the snapshot"
                );
            }
        }

        let config = ChitchatConfig {
            chitchat_id: self_id.clone(),
            cluster_id: settings.cluster_id.clone(),
            gossip_interval: settings.gossip_interval,
            listen_addr: bound,
            seed_nodes: settings.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: settings.phi_threshold,
                sampling_window_size: 1000,
                max_interval: (settings.gossip_interval * 10).max(Duration::from_secs(2)),
                initial_interval: settings.gossip_interval,
                dead_node_grace_period: Duration::from_secs(24 * 3600),
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V1,
        };
        let handle = spawn_chitchat(config, Vec::new(), &socket)
            .await
            .map_err(|e| ClusterError::Gossip(format!("{e:#}")))?;
        let chitchat = handle.chitchat();
        let poke = Arc::new(Notify::new());
        let (changes, _) = broadcast::channel(1024);
        let (stop, stop_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            cluster_id: settings.cluster_id,
            node_id: settings.node_id,
            region: settings.region,
            key: settings.key,
            tombstone_ttl: settings.tombstone_ttl,
            gossip_interval: settings.gossip_interval,
            rpc_addr: settings.rpc_addr,
            agent_addr: settings.agent_addr,
            self_id,
            chitchat: chitchat.clone(),
            clock,
            view: RwLock::new(View {
                config: restored.clone(),
                generation: 1,
                ..Default::default()
            }),
            changes,
            poke: poke.clone(),
            counters: Counters::default(),
            partition,
            snapshot_path,
            stop,
            tasks: Mutex::new(None),
        });
        let cluster = Cluster { inner };
        let listener = {
            let mut cc = chitchat.lock().await;
            let state = cc.self_node_state();
            for (key, record) in &restored {
                set_split(state, key, &record.envelope);
            }
            let poke = poke.clone();
            cc.subscribe_event("", move |_| poke.notify_one())
        };
        cluster.publish_info(false).await;
        let reconciler = tokio::spawn(
            Reconciler {
                inner: cluster.inner.clone(),
                cache: HashMap::new(),
                high_water: HashMap::new(),
                fingerprint: Vec::new(),
                last_full: std::time::Instant::now(),
                saved_generation: 0,
            }
            .run(stop_rx),
        );
        *cluster.inner.tasks.lock().expect("tasks lock") = Some(Tasks {
            chitchat: handle,
            reconciler,
            _listener: listener,
        });
        tracing::info!(
            node_id = %cluster.inner.node_id,
            region = %cluster.inner.region,
            gossip = %advertise,
            "joined the cluster gossip"
        );
        Ok(cluster)
    }

    async fn publish_info(&self, leaving: bool) {
        let info = NodeInfo {
            region: self.inner.region.clone(),
            rpc: self.inner.rpc_addr,
            agent: self.inner.agent_addr.clone(),
            leaving,
        };
        let value = serde_json::to_value(info).expect("node info serialises");
        let _ = self.write_local("n".to_string(), Some(value)).await;
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    pub fn region(&self) -> &str {
        &self.inner.region
    }

    /// The address peers gossip with this node on.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.inner.self_id.gossip_advertise_addr
    }

    /// The fault-injection switch of this node's gossip socket.
    pub fn partition(&self) -> &Partition {
        &self.inner.partition
    }

    /// Changes to the view, as they are merged. A receiver that lags
    /// should re-read everything.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.inner.changes.subscribe()
    }

    /// Goes up whenever any config object changes; for caches.
    pub fn config_generation(&self) -> u64 {
        self.inner.view.read().expect("view lock").generation
    }

    /// Encrypts a secret for a gossiped value.
    pub fn seal(&self, plaintext: &[u8]) -> String {
        self.inner.key.seal(plaintext)
    }

    /// Opens [`Cluster::seal`]'s output.
    pub fn open_sealed(&self, sealed: &str) -> Option<Vec<u8>> {
        self.inner.key.open(sealed)
    }

    /// Writes a config object here; it reaches every node by gossip.
    pub async fn put<T: Kind>(&self, id: &str, value: &T) -> Result<Hlc, ClusterError> {
        check_id("id", id)?;
        let value = serde_json::to_value(value).map_err(|e| ClusterError::Encode(e.to_string()))?;
        self.write_config(config_key(T::KIND, id), Some(value))
            .await
    }

    /// Deletes a config object (a tombstone that wins over every older
    /// write). `false` when there was nothing to delete.
    pub async fn delete<T: Kind>(&self, id: &str) -> Result<bool, ClusterError> {
        let key = config_key(T::KIND, id);
        let live = self
            .inner
            .view
            .read()
            .expect("view lock")
            .config
            .get(&key)
            .is_some_and(|r| !r.deleted);
        if !live {
            return Ok(false);
        }
        self.write_config(key, None).await?;
        Ok(true)
    }

    async fn write_config(
        &self,
        key: String,
        value: Option<serde_json::Value>,
    ) -> Result<Hlc, ClusterError> {
        let inner = &self.inner;
        let hlc = inner.clock.now();
        let payload = Payload {
            k: key.clone(),
            h: hlc,
            o: inner.node_id.clone(),
            g: 0,
            d: value.is_none(),
            v: value.clone(),
        };
        let env = envelope::seal(&inner.key, &inner.cluster_id, &payload);
        if env.len() > MAX_ENVELOPE {
            return Err(ClusterError::TooLarge {
                key,
                size: env.len(),
                max: MAX_ENVELOPE,
            });
        }
        {
            let mut cc = inner.chitchat.lock().await;
            set_split(cc.self_node_state(), &key, &env);
        }
        {
            let mut view = inner.view.write().expect("view lock");
            view.config.insert(
                key.clone(),
                Record {
                    hlc,
                    origin: inner.node_id.clone(),
                    deleted: value.is_none(),
                    value,
                    envelope: env.into(),
                },
            );
            view.generation += 1;
        }
        if let Some((kind, _)) = split_key(&key) {
            let _ = inner.changes.send(Change::Config(kind.to_string()));
        }
        inner.poke.notify_one();
        Ok(hlc)
    }

    /// A config object.
    pub fn get<T: Kind>(&self, id: &str) -> Option<T> {
        let view = self.inner.view.read().expect("view lock");
        let record = view.config.get(&config_key(T::KIND, id))?;
        if record.deleted {
            return None;
        }
        serde_json::from_value(record.value.clone()?).ok()
    }

    /// When the object was last written, and by which node.
    pub fn written<T: Kind>(&self, id: &str) -> Option<(Hlc, String)> {
        let view = self.inner.view.read().expect("view lock");
        let record = view.config.get(&config_key(T::KIND, id))?;
        (!record.deleted).then(|| (record.hlc, record.origin.clone()))
    }

    /// Every object of a kind, by id.
    pub fn list<T: Kind>(&self) -> Vec<(String, T)> {
        let prefix = format!("c/{}/", T::KIND);
        let view = self.inner.view.read().expect("view lock");
        view.config
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(_, r)| !r.deleted)
            .filter_map(|(k, r)| {
                let value = serde_json::from_value(r.value.clone()?).ok()?;
                Some((k[prefix.len()..].to_string(), value))
            })
            .collect()
    }

    /// Publishes a value this node owns (e.g. an endpoint it serves).
    pub async fn set_local<T: Kind>(&self, id: &str, value: &T) -> Result<(), ClusterError> {
        check_id("id", id)?;
        let value = serde_json::to_value(value).map_err(|e| ClusterError::Encode(e.to_string()))?;
        self.write_local(local_key(T::KIND, id), Some(value)).await
    }

    /// Withdraws a value this node owns.
    pub async fn remove_local<T: Kind>(&self, id: &str) {
        let _ = self.write_local(local_key(T::KIND, id), None).await;
    }

    async fn write_local(
        &self,
        key: String,
        value: Option<serde_json::Value>,
    ) -> Result<(), ClusterError> {
        let inner = &self.inner;
        let mut cc = inner.chitchat.lock().await;
        match value {
            Some(v) => {
                let payload = Payload {
                    k: key.clone(),
                    h: inner.clock.now(),
                    o: inner.node_id.clone(),
                    g: inner.self_id.generation_id,
                    d: false,
                    v: Some(v),
                };
                let env = envelope::seal(&inner.key, &inner.cluster_id, &payload);
                if env.len() > MAX_ENVELOPE {
                    return Err(ClusterError::TooLarge {
                        key,
                        size: env.len(),
                        max: MAX_ENVELOPE,
                    });
                }
                set_split(cc.self_node_state(), &key, &env);
            }
            None => delete_split(cc.self_node_state(), &key),
        }
        drop(cc);
        inner.poke.notify_one();
        Ok(())
    }

    /// Values of a kind owned by live nodes (this one included).
    pub fn locals<T: Kind>(&self) -> Vec<Local<T>> {
        let view = self.inner.view.read().expect("view lock");
        view.locals
            .get(T::KIND)
            .map(|entries| {
                entries
                    .iter()
                    .filter_map(|(node, id, v)| {
                        Some(Local {
                            node: node.clone(),
                            id: id.clone(),
                            value: serde_json::from_value(v.clone()).ok()?,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Live nodes, this one included, by node id.
    pub fn members(&self) -> Vec<Member> {
        self.inner.view.read().expect("view lock").members.clone()
    }

    /// Every region a node has announced, live or not, this one included.
    pub fn regions(&self) -> BTreeSet<String> {
        let mut regions = self.inner.view.read().expect("view lock").regions.clone();
        regions.insert(self.inner.region.clone());
        regions
    }

    /// Counters: values refused (bad signature, malformed, misplaced),
    /// stale replays, copies re-published, tombstones collected, datagrams
    /// dropped by the partition switch.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let view = self.inner.view.read().expect("view lock");
        vec![
            ("cluster_values_refused", get(&c.refused)),
            ("cluster_values_stale", get(&c.stale)),
            ("cluster_values_republished", get(&c.republished)),
            ("cluster_tombstones_collected", get(&c.collected)),
            ("cluster_merge_passes", get(&c.passes)),
            ("cluster_gossip_dropped", self.inner.partition.dropped()),
            ("cluster_members", view.members.len() as u64),
            (
                "cluster_objects",
                view.config.values().filter(|r| !r.deleted).count() as u64,
            ),
        ]
    }

    /// Tells the others this node is leaving (they drop its live values at
    /// once instead of waiting for the failure detector), saves the
    /// snapshot, and stops gossiping. Idempotent.
    pub async fn shutdown(&self) {
        let Some(tasks) = self.inner.tasks.lock().expect("tasks lock").take() else {
            return;
        };
        self.publish_info(true).await;
        // One or two rounds carry the news; bounded, never required.
        tokio::time::sleep(self.inner.gossip_interval * 2).await;
        let _ = self.inner.stop.send(true);
        let _ = tasks.reconciler.await;
        if let Err(e) = tasks.chitchat.shutdown().await {
            tracing::warn!(error = %e, "gossip did not stop cleanly");
        }
        save_snapshot(&self.inner);
        tracing::info!(node_id = %self.inner.node_id, "left the cluster gossip");
    }
}

fn save_snapshot(inner: &Inner) {
    let Some(path) = &inner.snapshot_path else {
        return;
    };
    let entries = inner
        .view
        .read()
        .expect("view lock")
        .config
        .iter()
        .map(|(k, r)| (k.clone(), r.envelope.to_string()))
        .collect();
    let snap = snapshot::Snapshot {
        version: 1,
        entries,
    };
    if let Err(e) = snapshot::save(path, &snap) {
        tracing::warn!(error = %e, "cluster snapshot not saved");
    }
}

/// Merges gossip into the view, re-publishes winners, collects old
/// tombstones, saves the snapshot: [`Reconciler::read`] takes what every
/// node publishes, verified, [`merge`] decides, the rest writes.
struct Reconciler {
    inner: Arc<Inner>,
    /// Verified payloads by node and key, valid for one chitchat version
    /// (`None`: refused).
    cache: HashMap<ChitchatId, HashMap<String, (u64, Option<Parsed>)>>,
    /// Highest timestamp accepted per node-scoped key, so an old value
    /// replayed under a higher chitchat version changes nothing.
    high_water: HashMap<ChitchatId, HashMap<String, Hlc>>,
    /// Node versions and liveness at the last pass; unchanged → skip.
    fingerprint: Vec<(ChitchatId, u64, bool)>,
    last_full: std::time::Instant,
    saved_generation: u64,
}

impl Reconciler {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let period = (self.inner.gossip_interval / 2).min(Duration::from_millis(250));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = self.inner.poke.notified() => {}
                _ = tick.tick() => {}
            }
            self.pass().await;
        }
    }

    async fn pass(&mut self) {
        let inner = self.inner.clone();
        let mut cc = inner.chitchat.lock().await;
        let live: HashSet<ChitchatId> = cc.live_nodes().cloned().collect();
        if !self.changed(&cc, &live) {
            return;
        }
        inner.counters.passes.fetch_add(1, Ordering::Relaxed);
        let gossiped = self.read(&cc, live);
        let merged = merge::merge(gossiped, &inner.self_id, wall_millis(), inner.tombstone_ttl);
        if let Some(newest) = merged.newest {
            inner.clock.observe(newest);
        }
        if !merged.republish.is_empty() || !merged.collect.is_empty() {
            let state = cc.self_node_state();
            for (key, env) in &merged.republish {
                set_split(state, key, env);
            }
            for key in &merged.collect {
                delete_split(state, key);
            }
            let counters = &inner.counters;
            let count = |n: usize| n as u64;
            counters
                .republished
                .fetch_add(count(merged.republish.len()), Ordering::Relaxed);
            counters
                .collected
                .fetch_add(count(merged.collect.len()), Ordering::Relaxed);
        }
        drop(cc);
        let changes = merged
            .view
            .apply(&mut inner.view.write().expect("view lock"));
        for change in changes {
            let _ = inner.changes.send(change);
        }
        let generation = inner.view.read().expect("view lock").generation;
        if generation != self.saved_generation {
            self.saved_generation = generation;
            save_snapshot(&inner);
        }
    }

    /// Whether any node's state or liveness changed since the last pass;
    /// every 5 s a pass runs anyway.
    fn changed(&mut self, cc: &Chitchat, live: &HashSet<ChitchatId>) -> bool {
        let full = self.last_full.elapsed() > Duration::from_secs(5);
        let fingerprint: Vec<(ChitchatId, u64, bool)> = cc
            .node_states()
            .iter()
            .map(|(id, s)| (id.clone(), s.max_version(), live.contains(id)))
            .collect();
        if !full && fingerprint == self.fingerprint {
            return false;
        }
        self.fingerprint = fingerprint;
        if full {
            self.last_full = std::time::Instant::now();
        }
        true
    }

    /// What every node publishes, verified: config copies, node
    /// announcements, and the node-owned values of live nodes.
    fn read(&mut self, cc: &Chitchat, live: HashSet<ChitchatId>) -> Gossiped {
        let inner = &self.inner;
        let mut gossiped = Gossiped {
            live,
            ..Gossiped::default()
        };
        let known: HashSet<&ChitchatId> = cc.node_states().keys().collect();
        self.cache.retain(|id, _| known.contains(id));
        for (id, state) in cc.node_states() {
            let cache = self.cache.entry(id.clone()).or_default();
            let mut seen_keys = HashSet::new();
            for (key, vv) in state.key_values_including_deleted() {
                if vv.is_deleted() || key.contains('#') {
                    continue;
                }
                seen_keys.insert(key);
                let Some(parsed) = open_cached(inner, cache, id, state, key, vv) else {
                    continue;
                };
                if key.starts_with("c/") {
                    gossiped.config.push((id.clone(), key.to_string(), parsed));
                    continue;
                }
                if key != "n" && !key.starts_with("l/") {
                    continue;
                }
                let high = self.high_water.entry(id.clone()).or_default();
                let Some(value) = node_scoped(inner, cache, high, id, key, vv.version, &parsed.0)
                else {
                    continue;
                };
                if key == "n" {
                    if let Ok(info) = serde_json::from_value::<NodeInfo>(value) {
                        gossiped.infos.push((id.clone(), info));
                    }
                } else if gossiped.live.contains(id) {
                    gossiped.locals.push((id.clone(), key.to_string(), value));
                }
            }
            cache.retain(|k, _| seen_keys.contains(k.as_str()));
        }
        gossiped
    }
}

/// The verified payload of `key` in `state`, opened once per chitchat
/// version; `None` when refused (counted and logged) or when its chunks
/// are still on their way.
fn open_cached(
    inner: &Inner,
    cache: &mut HashMap<String, (u64, Option<Parsed>)>,
    id: &ChitchatId,
    state: &NodeState,
    key: &str,
    vv: &VersionedValue,
) -> Option<Parsed> {
    if let Some((version, parsed)) = cache.get(key)
        && *version == vv.version
    {
        return parsed.clone();
    }
    let env = match envelope::manifest(&vv.value) {
        Some((hash, n)) => envelope::join(key, hash, n, |k| state.get(k).map(str::to_string))?,
        None => vv.value.clone(),
    };
    let parsed = match envelope::open(&inner.key, &inner.cluster_id, key, &env) {
        Ok(payload) => Some(Arc::new((payload, Arc::<str>::from(env)))),
        Err(refusal) => {
            inner.counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(node = %id.node_id, gossip = %id.gossip_advertise_addr, key, ?refusal, "gossiped value refused");
            None
        }
    };
    cache.insert(key.to_string(), (vv.version, parsed.clone()));
    parsed
}

/// The value of a node-scoped key (`n`, `l/…`) of node `id`, unless it was
/// signed for another node or an earlier run of it, or is older than one
/// accepted before (a replay): those are refused and counted.
fn node_scoped(
    inner: &Inner,
    cache: &mut HashMap<String, (u64, Option<Parsed>)>,
    high: &mut HashMap<String, Hlc>,
    id: &ChitchatId,
    key: &str,
    version: u64,
    payload: &Payload,
) -> Option<serde_json::Value> {
    if payload.o != *id.node_id || payload.g != id.generation_id {
        // Signed for another node or an earlier run.
        if cache.get(key).is_some_and(|(_, p)| p.is_some()) {
            inner.counters.refused.fetch_add(1, Ordering::Relaxed);
            cache.insert(key.to_string(), (version, None));
        }
        return None;
    }
    match high.get(key) {
        Some(h) if payload.h < *h => {
            inner.counters.stale.fetch_add(1, Ordering::Relaxed);
            cache.insert(key.to_string(), (version, None));
            return None;
        }
        _ => {
            high.insert(key.to_string(), payload.h);
        }
    }
    payload.v.clone()
}
