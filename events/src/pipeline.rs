//! The event pipeline the edge publishes into.
//!
//! ```text
//! publish() ─try_send─▶ memory queue ─▶ writer thread ─┬─▶ file (JSON lines)
//!   (request path:        (bounded in      filter,       └─▶ spool ─▶ delivery thread ─▶ Kafka
//!    serialise, enqueue)   events, bytes)  select fields       (bounded)  (one per Kafka subscription)
//! ```
//!
//! `publish` serialises the event once and tries to enqueue it; when the
//! queue is at a limit the event is dropped, counted and logged (at most
//! one line per 10 s). It never blocks. One writer thread applies each
//! subscription's filter and field selection and appends to the
//! destination: a JSON-lines file, or the spool of a Kafka subscription,
//! from which that subscription's delivery thread produces (see
//! `kafka.rs` for the delivery guarantees).
//!
//! Besides the edge config's subscriptions the pipeline runs a set of
//! *runtime* subscriptions, replaced as a whole by
//! [`EventPipeline::set_runtime_subscriptions`] (the admin API's). A change
//! travels to the writer through the same queue as the events, so the
//! writer applies it between the events published before it and those
//! published after: each event is written once, by the old set or by the
//! new one.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    io::{self, Write},
    mem,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    Destination, Event, EventSink, EventType, EventsConfig, FilterInput, Limits, Source,
    Subscription,
    config::{id_problem, runtime_path_problem},
    metrics::{EventMetrics, LogLimiter, MetricsSnapshot, add},
};

/// The writer takes at most this many events at a time.
const BATCH: usize = 512;
/// How often an idle writer looks at the stop flag and syncs.
const TICK: Duration = Duration::from_millis(50);
/// How long the writer lets events gather after writing a batch that did
/// not fill up: a writer that waits on the queue is woken by every event (a
/// futex wake and a context switch each, and a write and a flush for one
/// event), which cost a third of the request rate under load; an event
/// reaches its destinations this much later at most.
const LINGER: Duration = Duration::from_millis(5);
/// What an event's JSON starts with: an HTTP event with a few headers
/// takes about a kilobyte.
const JSON_CAPACITY: usize = 1536;
/// At most one log line per this long for each kind of drop.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Why the pipeline could not start, or a set of runtime subscriptions
/// could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("event subscription {id}: opening the spool {}: {source}", path.display())]
    Spool {
        id: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("event subscription {id}: opening {}: {source}", path.display())]
    File {
        id: String,
        path: PathBuf,
        source: io::Error,
    },
    #[cfg(feature = "kafka")]
    #[error("event subscription {id}: the Kafka producer: {source}")]
    Kafka {
        id: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("starting the event writer thread: {0}")]
    Thread(io::Error),
    /// A runtime subscription with the id of one in the edge config.
    #[error(
        "event subscription {id:?}: the edge config has a subscription with this id; a runtime subscription needs an id of its own"
    )]
    IdInConfig { id: String },
    /// Two runtime subscriptions with one id.
    #[error("event subscription {id:?} is given twice")]
    DuplicateId { id: String },
    /// A runtime subscription that cannot run as it is.
    #[error("event subscription {id:?}: {reason}")]
    Invalid { id: String, reason: String },
    #[error("the event pipeline has shut down")]
    Stopped,
}

impl EventsError {
    /// The subscription an error is about, when it is about one: leaving
    /// that one out lets the others run.
    pub fn subscription_id(&self) -> Option<&str> {
        match self {
            EventsError::Spool { id, .. }
            | EventsError::File { id, .. }
            | EventsError::IdInConfig { id }
            | EventsError::DuplicateId { id }
            | EventsError::Invalid { id, .. } => Some(id),
            #[cfg(feature = "kafka")]
            EventsError::Kafka { id, .. } => Some(id),
            EventsError::Thread(_) | EventsError::Stopped => None,
        }
    }
}

/// What a shutdown left behind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Events still in spools; they are sent after the next start.
    pub undelivered: u64,
    pub metrics: MetricsSnapshot,
}

/// One event on its way from `publish` to the writer.
struct Queued {
    event_type: EventType,
    #[cfg(feature = "kafka")]
    key: Option<String>,
    filter: FilterInput,
    json: Vec<u8>,
    cost: u64,
}

/// What the queue carries to the writer.
enum Item {
    Event(Queued),
    /// A change of the runtime subscriptions, applied between the events
    /// queued before it and those queued after it.
    Control(Control),
}

/// The Kafka key: the endpoint host (`conn.server_name`), so one
/// endpoint's events stay in order on one partition; TCP endpoints have
/// no host and are keyed by `postern.endpoint_id`.
pub fn event_key(event: &Event) -> Option<String> {
    event
        .object
        .conn()
        .and_then(|c| c.server_name.clone())
        .or_else(|| event.object.postern().and_then(|p| p.endpoint_id.clone()))
}

/// The publishing side, shared with the gateway.
struct Front {
    /// Whether some subscription takes each event type; others are not
    /// even serialised.
    wants: [AtomicBool; 2],
    queue: SyncSender<Item>,
    max_events: u64,
    max_bytes: u64,
    metrics: Arc<EventMetrics>,
    closed: AtomicBool,
    drops: LogLimiter,
}

fn index(t: EventType) -> usize {
    match t {
        EventType::HttpRequestComplete => 0,
        EventType::TcpConnectionClosed => 1,
    }
}

/// The event types some of `subs` take.
fn wanted<'a>(subs: impl IntoIterator<Item = &'a Subscription>) -> [bool; 2] {
    let mut wants = [false; 2];
    for sub in subs {
        for source in &sub.sources {
            wants[index(source.event_type)] = true;
        }
    }
    wants
}

impl Front {
    fn drop_event(&self, reason: &'static str) {
        add(&self.metrics.dropped, 1);
        if let Some(n) = self.drops.hit() {
            tracing::warn!(
                events = n,
                reason,
                "events dropped (count since the last report)"
            );
        }
    }

    fn set_wants(&self, wants: [bool; 2]) {
        for (flag, want) in self.wants.iter().zip(wants) {
            flag.store(want, Ordering::Release);
        }
    }
}

impl EventSink for Front {
    fn wants(&self, event_type: EventType) -> bool {
        self.wants[index(event_type)].load(Ordering::Acquire)
    }

    fn publish(&self, event: Event) {
        let Some(event_type) = event.kind() else {
            return;
        };
        if !self.wants(event_type) {
            return;
        }
        if self.closed.load(Ordering::Acquire) {
            return self.drop_event("published after the event pipeline shut down");
        }
        // Room for a typical event at once, rather than growing through
        // eight sizes to get there.
        let mut json = Vec::with_capacity(JSON_CAPACITY);
        if let Err(e) = crate::json::write(&mut json, &event) {
            tracing::error!(error = %e, "an event could not be serialised");
            return self.drop_event("unserialisable");
        }
        #[cfg(feature = "kafka")]
        let key = event_key(&event);
        #[cfg(feature = "kafka")]
        let key_len = key.as_ref().map_or(0, String::len);
        #[cfg(not(feature = "kafka"))]
        let key_len = 0;
        let cost = (json.len() + key_len + std::mem::size_of::<Queued>()) as u64;
        let m = &self.metrics;
        let bytes = m.queue_bytes.fetch_add(cost, Ordering::AcqRel) + cost;
        if bytes > self.max_bytes {
            m.queue_bytes.fetch_sub(cost, Ordering::AcqRel);
            return self.drop_event("memory queue full (events.limits.memory_queue_bytes)");
        }
        // Admission by counter, so the gauges never pass the limits (the
        // channel has one slot more, for a change of the subscriptions, as
        // a backstop).
        let events = m.queue_events.fetch_add(1, Ordering::AcqRel) + 1;
        if events > self.max_events {
            m.queue_events.fetch_sub(1, Ordering::AcqRel);
            m.queue_bytes.fetch_sub(cost, Ordering::AcqRel);
            return self.drop_event("memory queue full (events.limits.memory_queue_events)");
        }
        let queued = Queued {
            event_type,
            #[cfg(feature = "kafka")]
            key,
            filter: FilterInput::of(&event),
            json,
            cost,
        };
        match self.queue.try_send(Item::Event(queued)) {
            Ok(()) => {
                add(&m.published, 1);
                m.queue_peak_events.fetch_max(events, Ordering::Relaxed);
                m.queue_peak_bytes.fetch_max(bytes, Ordering::Relaxed);
            }
            Err(e) => {
                m.queue_events.fetch_sub(1, Ordering::AcqRel);
                m.queue_bytes.fetch_sub(cost, Ordering::AcqRel);
                self.drop_event(match e {
                    TrySendError::Full(_) => {
                        "memory queue full (events.limits.memory_queue_events)"
                    }
                    TrySendError::Disconnected(_) => "the event writer has stopped",
                });
            }
        }
    }
}

/// Every subscription's counters: the running ones, and what runtime
/// subscriptions removed since start had counted, so that totals never
/// go backwards.
#[derive(Default)]
struct Registry {
    /// The edge config's subscriptions, then the runtime ones.
    current: RwLock<Vec<(String, Arc<EventMetrics>)>>,
    /// Counters (not gauges) of removed runtime subscriptions.
    retired: Mutex<MetricsSnapshot>,
}

impl Registry {
    fn total(&self) -> MetricsSnapshot {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        let retired = *self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        current
            .iter()
            .map(|(_, m)| m.snapshot())
            .fold(retired, MetricsSnapshot::merge)
    }

    fn each(&self) -> Vec<(String, MetricsSnapshot)> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(id, m)| (id.clone(), m.snapshot()))
            .collect()
    }

    /// The running set is now `running`; the counters of `removed` go to
    /// the retired totals.
    fn replace(&self, running: Vec<(String, Arc<EventMetrics>)>, removed: &[Arc<EventMetrics>]) {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        for m in removed {
            let s = m.snapshot();
            *retired = retired.merge(MetricsSnapshot {
                published: s.published,
                filtered: s.filtered,
                spooled: s.spooled,
                produced: s.produced,
                delivered: s.delivered,
                failed: s.failed,
                dropped: s.dropped,
                ..MetricsSnapshot::default()
            });
        }
        *current = running;
    }
}

/// Reads a pipeline's totals, runtime subscriptions included (those
/// added after the handle was taken too).
#[derive(Clone)]
pub struct MetricsHandle {
    front: Arc<Front>,
    registry: Arc<Registry>,
}

impl MetricsHandle {
    pub fn snapshot(&self) -> MetricsSnapshot {
        self.front.metrics.snapshot().merge(self.registry.total())
    }
}

/// A running pipeline: the sink the gateway publishes into, the writer
/// thread and one delivery thread per Kafka subscription.
pub struct EventPipeline {
    inner: Arc<Inner>,
    flush_timeout: Duration,
}

/// Sets the runtime subscriptions of a pipeline from elsewhere (the task
/// that follows the cluster's config): a cheap, `'static` handle. Once the
/// pipeline has shut down (or was dropped), [`RuntimeSubscriptions::set`]
/// answers [`EventsError::Stopped`].
#[derive(Clone)]
pub struct RuntimeSubscriptions {
    inner: Arc<Inner>,
}

/// What the pipeline and its handles share.
struct Inner {
    front: Arc<Front>,
    stop: Arc<AtomicBool>,
    registry: Arc<Registry>,
    data_dir: PathBuf,
    limits: Limits,
    /// The event types the edge config's subscriptions take.
    config_wants: [bool; 2],
    config_ids: BTreeSet<String>,
    /// Also what serialises changes of the runtime subscriptions.
    state: Mutex<State>,
}

struct State {
    stopped: bool,
    writer: Option<thread::JoinHandle<()>>,
    /// The writer's end of the queue, until the writer starts (when the
    /// first subscription does).
    queue: Option<Receiver<Item>>,
    config: Vec<Running>,
    runtime: Vec<Running>,
}

/// A subscription as the pipeline runs it, outside the writer thread.
struct Running {
    sub: Subscription,
    metrics: Arc<EventMetrics>,
    #[cfg(feature = "kafka")]
    kafka: Option<RunningKafka>,
}

#[cfg(feature = "kafka")]
struct RunningKafka {
    dir: PathBuf,
    spool: Arc<crate::spool::Spool>,
    delivery: crate::kafka::KafkaDelivery,
}

impl Running {
    fn metrics_entry(&self) -> (String, Arc<EventMetrics>) {
        (self.sub.id.clone(), self.metrics.clone())
    }
}

/// Sources by event type.
fn sources_of(sub: &Subscription) -> [Option<Source>; 2] {
    let mut sources: [Option<Source>; 2] = [None, None];
    for source in &sub.sources {
        sources[index(source.event_type)] = Some(source.clone());
    }
    sources
}

/// Opens `sub`'s destination: its file, or its spool and delivery thread.
fn open(
    data_dir: &Path,
    limits: Limits,
    sub: &Subscription,
    metrics: Arc<EventMetrics>,
) -> Result<(SubscriptionWriter, Running), EventsError> {
    #[cfg(feature = "kafka")]
    let mut kafka_running = None;
    let destination = match &sub.destination {
        Destination::File(file) => {
            let path = data_dir.join(&file.path);
            let open = || {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent)?;
                }
                OpenOptions::new().create(true).append(true).open(&path)
            };
            let file = open().map_err(|source| EventsError::File {
                id: sub.id.clone(),
                path: path.clone(),
                source,
            })?;
            DestinationWriter::File {
                path,
                file,
                batch: Vec::new(),
                records: 0,
            }
        }
        #[cfg(feature = "kafka")]
        Destination::Kafka(kafka) => {
            let dir = spool_dir(data_dir, &sub.id);
            let spool_limits = crate::spool::SpoolLimits {
                events: limits.spool_events,
                bytes: limits.spool_bytes,
            };
            let (spool, writer, recovery) =
                crate::spool::Spool::open(&dir, spool_limits, metrics.clone()).map_err(
                    |source| EventsError::Spool {
                        id: sub.id.clone(),
                        path: dir.clone(),
                        source,
                    },
                )?;
            if recovery.pending > 0 {
                tracing::info!(subscription = %sub.id, events = recovery.pending, "events from an earlier run are waiting in the spool; sending them");
            }
            let (delivery, notify) =
                crate::kafka::KafkaDelivery::start(&sub.id, kafka, spool.clone(), metrics.clone())
                    .map_err(|source| EventsError::Kafka {
                        id: sub.id.clone(),
                        source,
                    })?;
            kafka_running = Some(RunningKafka {
                dir,
                spool,
                delivery,
            });
            DestinationWriter::Kafka {
                writer,
                topics: EventType::ALL.map(|t| kafka.topic_for(t)),
                notify,
            }
        }
        #[cfg(not(feature = "kafka"))]
        Destination::Kafka(_) => {
            let _ = limits;
            return Err(EventsError::Invalid {
                id: sub.id.clone(),
                reason: "this build has no Kafka support (postern-events feature `kafka`)".into(),
            });
        }
    };
    let writer = SubscriptionWriter {
        id: sub.id.clone(),
        sources: sources_of(sub),
        destination,
        metrics: metrics.clone(),
        drops: LogLimiter::new(LOG_EVERY),
        filter_errors: LogLimiter::new(LOG_EVERY),
    };
    let running = Running {
        sub: sub.clone(),
        metrics,
        #[cfg(feature = "kafka")]
        kafka: kafka_running,
    };
    Ok((writer, running))
}

/// `<data_dir>/events-spool/<id>`
#[cfg(feature = "kafka")]
fn spool_dir(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join(crate::config::SPOOL_DIR).join(id)
}

/// Stops a Kafka subscription's delivery thread without waiting for
/// Kafka and deletes its spool; what it had not delivered is counted as
/// dropped.
#[cfg(feature = "kafka")]
fn discard_spool(id: &str, kafka: RunningKafka, metrics: &EventMetrics) {
    let RunningKafka {
        dir,
        spool,
        delivery,
    } = kafka;
    delivery.discard();
    let lost = spool.pending();
    drop(spool);
    match fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::error!(subscription = %id, dir = %dir.display(), error = %e, "could not delete the spool of a removed event subscription");
        }
    }
    add(&metrics.dropped, lost);
    metrics.spool_events.store(0, Ordering::Relaxed);
    metrics.spool_bytes.store(0, Ordering::Relaxed);
    if lost > 0 {
        tracing::warn!(subscription = %id, events = lost, "the event subscription's undelivered events are discarded with its spool");
    }
}

fn spawn_writer(
    queue: Receiver<Item>,
    stop: Arc<AtomicBool>,
    metrics: Arc<EventMetrics>,
    subscriptions: Vec<SubscriptionWriter>,
) -> Result<thread::JoinHandle<()>, EventsError> {
    let writer = Writer {
        queue,
        stop,
        metrics,
        subscriptions,
    };
    thread::Builder::new()
        .name("events-writer".into())
        .spawn(move || writer.run())
        .map_err(EventsError::Thread)
}

impl EventPipeline {
    /// Opens the destinations (files, spools, producers) and starts the
    /// threads. Relative paths are under `data_dir`, spools in
    /// `<data_dir>/events-spool/<subscription id>/`.
    pub fn start(config: &EventsConfig, data_dir: &Path) -> Result<EventPipeline, EventsError> {
        let limits = config.limits;
        let (queue, rx) = mpsc::sync_channel(limits.memory_queue_events + 1);
        let mut writers = Vec::new();
        let mut running = Vec::new();
        for sub in &config.subscriptions {
            let (writer, run) = open(data_dir, limits, sub, Arc::default())?;
            writers.push(writer);
            running.push(run);
        }
        let config_wants = wanted(&config.subscriptions);
        let front = Arc::new(Front {
            wants: config_wants.map(AtomicBool::new),
            queue,
            max_events: limits.memory_queue_events as u64,
            max_bytes: limits.memory_queue_bytes,
            metrics: Arc::new(EventMetrics::default()),
            closed: AtomicBool::new(false),
            drops: LogLimiter::new(LOG_EVERY),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let registry = Arc::new(Registry::default());
        registry.replace(running.iter().map(Running::metrics_entry).collect(), &[]);
        let mut state = State {
            stopped: false,
            writer: None,
            queue: Some(rx),
            config: running,
            runtime: Vec::new(),
        };
        if !writers.is_empty() {
            let rx = state.queue.take().expect("the queue is new");
            state.writer = Some(spawn_writer(
                rx,
                stop.clone(),
                front.metrics.clone(),
                writers,
            )?);
        }
        Ok(EventPipeline {
            inner: Arc::new(Inner {
                front,
                stop,
                registry,
                data_dir: data_dir.to_path_buf(),
                limits,
                config_wants,
                config_ids: config.subscriptions.iter().map(|s| s.id.clone()).collect(),
                state: Mutex::new(state),
            }),
            flush_timeout: config.flush_timeout,
        })
    }

    /// The sink to publish into, or `None` when nothing is subscribed now.
    /// An edge whose runtime subscriptions may change takes
    /// [`EventPipeline::publisher`] instead.
    pub fn sink(&self) -> Option<Arc<dyn EventSink>> {
        let state = self.inner.lock_state();
        (!state.config.is_empty() || !state.runtime.is_empty()).then(|| self.publisher())
    }

    /// The sink, whether or not anything is subscribed now: events go to
    /// the subscriptions there are when they are published. An event of a
    /// type no subscription takes costs an atomic load.
    pub fn publisher(&self) -> Arc<dyn EventSink> {
        self.inner.front.clone()
    }

    /// Replaces the runtime subscriptions (those set through the admin
    /// API) with `subscriptions`; the edge config's stay as they are. By id:
    ///
    /// - a new id starts: its file or spool is opened, its Kafka delivery
    ///   thread started;
    /// - an id whose settings are equal keeps running untouched;
    /// - an id whose settings changed is replaced. With the same
    ///   destination only its sources (filters, field selections) change;
    ///   a Kafka destination with new settings keeps its spool, so nothing
    ///   undelivered is lost: a new delivery thread takes over from the old
    ///   one's committed offset (events spooled before the change keep the
    ///   topic they were spooled for). Any other destination is opened
    ///   anew; a Kafka spool it leaves is deleted as below;
    /// - an id no longer present is stopped: its delivery thread stops and
    ///   its spool directory is deleted. **Deleting a subscription discards
    ///   what it had not delivered** (counted in `events_dropped`). A file
    ///   destination's file stays.
    ///
    /// Events published before the call go by the old set, events
    /// published after it returns by the new one, each once; `publish`
    /// never waits for a change. Nothing changes when an error is
    /// returned: an id that an edge-config subscription has
    /// ([`EventsError::IdInConfig`]), is given twice, cannot name a
    /// directory, or a file destination that is not a relative path
    /// without `..` (runtime subscriptions write under the data
    /// directory) or that is inside `events-spool/` (the spools), or a
    /// destination that cannot be opened.
    ///
    /// Blocks until the writer has taken the change (after the events
    /// queued before it) and removed spools are gone; it does not wait for
    /// Kafka. From async code, call it in `spawn_blocking` (see
    /// [`EventPipeline::runtime_handle`]).
    pub fn set_runtime_subscriptions(
        &self,
        subscriptions: Vec<Subscription>,
    ) -> Result<(), EventsError> {
        self.inner.set_runtime(subscriptions)
    }

    /// The runtime subscriptions now, in the order they were set.
    pub fn runtime_subscriptions(&self) -> Vec<Subscription> {
        self.inner.runtime()
    }

    /// A handle that sets the runtime subscriptions later, from elsewhere.
    pub fn runtime_handle(&self) -> RuntimeSubscriptions {
        RuntimeSubscriptions {
            inner: self.inner.clone(),
        }
    }

    /// Totals over the queue and every subscription.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics_handle().snapshot()
    }

    /// A handle that reads the totals later, from elsewhere (`/metrics`).
    pub fn metrics_handle(&self) -> MetricsHandle {
        MetricsHandle {
            front: self.inner.front.clone(),
            registry: self.inner.registry.clone(),
        }
    }

    /// Each subscription's own counters: the edge config's, then the
    /// runtime ones.
    pub fn subscription_metrics(&self) -> Vec<(String, MetricsSnapshot)> {
        self.inner.registry.each()
    }

    /// Stops taking events, writes what is queued, and gives Kafka
    /// subscriptions (runtime ones too) until `flush_timeout` (plus half
    /// a second for the last reports) to deliver what is spooled. What is
    /// left stays in the spools for the next start (a runtime
    /// subscription's, for when it is set again); how much is logged and
    /// returned.
    pub async fn shutdown(self) -> ShutdownReport {
        let deadline = Instant::now() + self.flush_timeout;
        let inner = self.inner.clone();
        inner.front.closed.store(true, Ordering::Release);
        inner.stop.store(true, Ordering::Release);
        let joined = tokio::task::spawn_blocking(move || {
            let (writer, running) = {
                let mut state = inner.lock_state();
                state.stopped = true;
                let mut running = mem::take(&mut state.config);
                running.append(&mut state.runtime);
                (state.writer.take(), running)
            };
            if let Some(writer) = writer
                && writer.join().is_err()
            {
                tracing::error!("the event writer thread panicked");
            }
            #[cfg(feature = "kafka")]
            {
                let deliveries: Vec<(String, crate::kafka::KafkaDelivery)> = running
                    .into_iter()
                    .filter_map(|r| r.kafka.map(|k| (r.sub.id, k.delivery)))
                    .collect();
                for (_, delivery) in &deliveries {
                    delivery.finish_by(deadline);
                }
                deliveries
                    .into_iter()
                    .map(|(id, d)| (id, d.join().undelivered))
                    .collect::<Vec<_>>()
            }
            #[cfg(not(feature = "kafka"))]
            {
                let _ = (deadline, running);
                Vec::<(String, u64)>::new()
            }
        })
        .await;
        let left = joined.unwrap_or_else(|e| {
            tracing::error!(error = %e, "waiting for the event threads failed");
            Vec::new()
        });
        let undelivered = left.iter().map(|(_, n)| n).sum();
        for (id, n) in &left {
            if *n > 0 {
                tracing::warn!(subscription = %id, events = n, "events not delivered before shutdown; they stay in the spool and are sent after the next start");
            }
        }
        let metrics = self.metrics();
        tracing::info!(
            delivered = metrics.delivered,
            dropped = metrics.dropped,
            undelivered,
            "event pipeline stopped"
        );
        ShutdownReport {
            undelivered,
            metrics,
        }
    }
}

impl Drop for EventPipeline {
    /// Without `shutdown`: the writer writes what is queued and stops,
    /// delivery threads stop at once (their `Drop`); nothing is joined.
    fn drop(&mut self) {
        self.inner.front.closed.store(true, Ordering::Release);
        self.inner.stop.store(true, Ordering::Release);
        let (config, runtime) = {
            let mut state = self.inner.lock_state();
            state.stopped = true;
            (mem::take(&mut state.config), mem::take(&mut state.runtime))
        };
        drop((config, runtime));
    }
}

impl RuntimeSubscriptions {
    /// [`EventPipeline::set_runtime_subscriptions`]. Blocks; from async
    /// code: `spawn_blocking(move || handle.set(subscriptions))`.
    pub fn set(&self, subscriptions: Vec<Subscription>) -> Result<(), EventsError> {
        self.inner.set_runtime(subscriptions)
    }

    /// [`EventPipeline::runtime_subscriptions`].
    pub fn current(&self) -> Vec<Subscription> {
        self.inner.runtime()
    }
}

/// What becomes of one runtime subscription in a change.
enum Plan {
    /// Equal settings: nothing to do.
    Keep,
    /// The same destination: new sources (or only a new description).
    Sources,
    /// Kafka with the same producer settings and another topic.
    #[cfg(feature = "kafka")]
    Topics,
    /// Kafka with other producer settings: the same spool, read by a new
    /// delivery thread once the old one has stopped.
    #[cfg(feature = "kafka")]
    Producer(crate::kafka::PendingDelivery),
    /// A new id, or another destination: opened (the old one's writer
    /// is replaced).
    Open(Box<(SubscriptionWriter, Running)>),
}

impl Inner {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn runtime(&self) -> Vec<Subscription> {
        self.lock_state()
            .runtime
            .iter()
            .map(|r| r.sub.clone())
            .collect()
    }

    /// Checks that need nothing opened.
    fn check(&self, subscriptions: &[Subscription]) -> Result<(), EventsError> {
        let mut ids = BTreeSet::new();
        for sub in subscriptions {
            let id = &sub.id;
            if let Some(reason) = id_problem(id) {
                return Err(EventsError::Invalid {
                    id: id.clone(),
                    reason,
                });
            }
            if self.config_ids.contains(id) {
                return Err(EventsError::IdInConfig { id: id.clone() });
            }
            if !ids.insert(id.as_str()) {
                return Err(EventsError::DuplicateId { id: id.clone() });
            }
            if let Destination::File(file) = &sub.destination
                && let Some(problem) = runtime_path_problem(&file.path)
            {
                return Err(EventsError::Invalid {
                    id: id.clone(),
                    reason: format!("destination.file.path {problem}"),
                });
            }
        }
        Ok(())
    }

    fn set_runtime(&self, subscriptions: Vec<Subscription>) -> Result<(), EventsError> {
        self.check(&subscriptions)?;
        let mut state = self.lock_state();
        if state.stopped {
            return Err(EventsError::Stopped);
        }
        // Open what is new; nothing running changes yet, and an error
        // drops what was opened.
        let plans = subscriptions
            .iter()
            .map(|sub| {
                let old = state.runtime.iter().find(|r| r.sub.id == sub.id);
                self.plan(old, sub)
            })
            .collect::<Result<Vec<Plan>, EventsError>>()?;
        if state.writer.is_none() && !subscriptions.is_empty() {
            // The first subscription of a pipeline that had none: the
            // writer starts empty and takes the change below like any.
            let Some(rx) = state.queue.take() else {
                return Err(EventsError::Stopped);
            };
            state.writer = Some(spawn_writer(
                rx,
                self.stop.clone(),
                self.front.metrics.clone(),
                Vec::new(),
            )?);
        }

        // From here on nothing fails but a writer that is gone.
        let new_wants = wanted(&subscriptions);
        let wants =
            |extra: [bool; 2]| [0, 1].map(|i| self.config_wants[i] || new_wants[i] || extra[i]);
        // Events the new set takes are let in before the change is queued.
        self.front
            .set_wants(wants(wanted(state.runtime.iter().map(|r| &r.sub))));
        let applied = apply_plans(mem::take(&mut state.runtime), subscriptions, plans);
        let result = self.send_to_writer(applied.changes);
        self.front.set_wants(wants([false; 2]));
        self.retire(
            applied.left,
            applied.removed,
            &state.config,
            &applied.runtime,
        );
        state.runtime = applied.runtime;
        result
    }

    /// What becomes of `sub`, running as `old` before, with what it opens.
    fn plan(&self, old: Option<&Running>, sub: &Subscription) -> Result<Plan, EventsError> {
        let open = |metrics| {
            open(&self.data_dir, self.limits, sub, metrics)
                .map(|opened| Plan::Open(Box::new(opened)))
        };
        let Some(old) = old else {
            return open(Arc::default());
        };
        if old.sub == *sub {
            return Ok(Plan::Keep);
        }
        if old.sub.destination == sub.destination {
            return Ok(Plan::Sources);
        }
        #[cfg(feature = "kafka")]
        if let (Destination::Kafka(a), Destination::Kafka(b)) =
            (&old.sub.destination, &sub.destination)
        {
            if crate::kafka::same_producer(a, b) {
                return Ok(Plan::Topics);
            }
            let spool = old
                .kafka
                .as_ref()
                .expect("a Kafka subscription has a spool")
                .spool
                .clone();
            return crate::kafka::KafkaDelivery::prepare(&sub.id, b, spool, old.metrics.clone())
                .map(Plan::Producer)
                .map_err(|source| EventsError::Kafka {
                    id: sub.id.clone(),
                    source,
                });
        }
        open(old.metrics.clone())
    }

    /// Queues `changes` for the writer and waits until it has taken them;
    /// the writers it took out are closed then.
    fn send_to_writer(&self, changes: Vec<Change>) -> Result<(), EventsError> {
        if changes.is_empty() {
            return Ok(());
        }
        let (done, taken) = mpsc::channel();
        let sent = self
            .front
            .queue
            .send(Item::Control(Control { changes, done }));
        // The writer answers with the writers it took out, closed.
        match sent.ok().and_then(|()| taken.recv().ok()) {
            Some(closed) => {
                drop(closed);
                Ok(())
            }
            None => Err(EventsError::Stopped),
        }
    }

    /// Lets go of the subscriptions that `left` a Kafka destination or were
    /// `removed` (their spools go), and makes the metrics those of
    /// `config` and `runtime`.
    #[cfg_attr(not(feature = "kafka"), allow(unused_mut))]
    fn retire(
        &self,
        mut left: Vec<Running>,
        mut removed: Vec<Running>,
        config: &[Running],
        runtime: &[Running],
    ) {
        #[cfg(feature = "kafka")]
        for r in left.iter_mut().chain(removed.iter_mut()) {
            if let Some(kafka) = r.kafka.take() {
                discard_spool(&r.sub.id, kafka, &r.metrics);
            }
        }
        drop(left);
        let removed_metrics: Vec<Arc<EventMetrics>> =
            removed.iter().map(|r| r.metrics.clone()).collect();
        self.registry.replace(
            config
                .iter()
                .chain(runtime)
                .map(Running::metrics_entry)
                .collect(),
            &removed_metrics,
        );
    }
}

/// The runtime subscriptions once their plans are carried out.
struct Applied {
    runtime: Vec<Running>,
    /// What the writer must do.
    changes: Vec<Change>,
    /// Subscriptions whose destination changed: what ran before.
    left: Vec<Running>,
    removed: Vec<Running>,
}

/// Carries out `plans` (one per subscription) on the subscriptions
/// running before (`old`).
fn apply_plans(old: Vec<Running>, subscriptions: Vec<Subscription>, plans: Vec<Plan>) -> Applied {
    let mut old: BTreeMap<String, Running> =
        old.into_iter().map(|r| (r.sub.id.clone(), r)).collect();
    let mut applied = Applied {
        runtime: Vec::with_capacity(subscriptions.len()),
        changes: Vec::new(),
        left: Vec::new(),
        removed: Vec::new(),
    };
    for (sub, plan) in subscriptions.into_iter().zip(plans) {
        let previous = old.remove(&sub.id);
        let running = apply_plan(sub, plan, previous, &mut applied);
        applied.runtime.push(running);
    }
    for (id, previous) in old {
        tracing::info!(subscription = %id, "event subscription removed");
        applied.changes.push(Change::Remove(id));
        applied.removed.push(previous);
    }
    applied
}

/// `sub` running as `plan` says, from what ran before with its id.
fn apply_plan(
    sub: Subscription,
    plan: Plan,
    previous: Option<Running>,
    applied: &mut Applied,
) -> Running {
    match plan {
        Plan::Keep => previous.expect("kept"),
        Plan::Sources => {
            let mut r = previous.expect("changed");
            tracing::info!(subscription = %sub.id, "event subscription changed (its sources)");
            applied.changes.push(Change::Sources {
                id: sub.id.clone(),
                sources: sources_of(&sub),
                #[cfg(feature = "kafka")]
                kafka: None,
            });
            r.sub = sub;
            r
        }
        #[cfg(feature = "kafka")]
        Plan::Topics => {
            let mut r = previous.expect("changed");
            let Destination::Kafka(kafka) = &sub.destination else {
                unreachable!("planned for Kafka")
            };
            tracing::info!(subscription = %sub.id, topic = %kafka.topic, "event subscription changed (its sources or topic)");
            applied.changes.push(Change::Sources {
                id: sub.id.clone(),
                sources: sources_of(&sub),
                kafka: Some((EventType::ALL.map(|t| kafka.topic_for(t)), None)),
            });
            r.sub = sub;
            r
        }
        #[cfg(feature = "kafka")]
        Plan::Producer(pending) => {
            let mut r = previous.expect("changed");
            let Destination::Kafka(kafka) = &sub.destination else {
                unreachable!("planned for Kafka")
            };
            let RunningKafka {
                dir,
                spool,
                delivery,
            } = r.kafka.take().expect("a Kafka subscription has a spool");
            let (delivery, notify) = pending.take_over(Some(delivery));
            tracing::info!(subscription = %sub.id, "event subscription changed (its Kafka settings); a new producer takes over the spool");
            applied.changes.push(Change::Sources {
                id: sub.id.clone(),
                sources: sources_of(&sub),
                kafka: Some((EventType::ALL.map(|t| kafka.topic_for(t)), Some(notify))),
            });
            r.kafka = Some(RunningKafka {
                dir,
                spool,
                delivery,
            });
            r.sub = sub;
            r
        }
        Plan::Open(opened) => {
            let (writer, running) = *opened;
            match previous {
                None => tracing::info!(subscription = %sub.id, "event subscription started"),
                Some(previous) => {
                    tracing::info!(subscription = %sub.id, "event subscription changed (its destination)");
                    applied.left.push(previous);
                }
            }
            applied.changes.push(Change::Add(writer));
            running
        }
    }
}

/// A change of the runtime subscriptions, for the writer.
struct Control {
    changes: Vec<Change>,
    /// Gets the subscription writers taken out, closed.
    done: mpsc::Sender<Vec<SubscriptionWriter>>,
}

enum Change {
    /// A new subscription, or the new destination of the one with its id.
    Add(SubscriptionWriter),
    /// New sources for the subscription with this id; its destination
    /// stays open. For Kafka also its topics and, with a new delivery
    /// thread, whom to tell about new records.
    Sources {
        id: String,
        sources: [Option<Source>; 2],
        #[cfg(feature = "kafka")]
        kafka: Option<([String; 2], Option<crate::kafka::Notify>)>,
    },
    Remove(String),
}

/// The writer thread.
struct Writer {
    queue: Receiver<Item>,
    stop: Arc<AtomicBool>,
    metrics: Arc<EventMetrics>,
    subscriptions: Vec<SubscriptionWriter>,
}

impl Writer {
    /// Out of the queue (into the batch in hand, at most `BATCH`).
    fn taken(&self, item: &Item) {
        if let Item::Event(queued) = item {
            self.metrics.queue_events.fetch_sub(1, Ordering::AcqRel);
            self.metrics
                .queue_bytes
                .fetch_sub(queued.cost, Ordering::AcqRel);
        }
    }

    fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let stopping = self.stop.load(Ordering::Acquire);
            match self
                .queue
                .recv_timeout(if stopping { Duration::ZERO } else { TICK })
            {
                Ok(first) => {
                    self.taken(&first);
                    batch.push(first);
                    while batch.len() < BATCH {
                        match self.queue.try_recv() {
                            Ok(next) => {
                                self.taken(&next);
                                batch.push(next);
                            }
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) if stopping => break,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let written = batch.len();
            for item in batch.drain(..) {
                match item {
                    Item::Event(queued) => {
                        for sub in &mut self.subscriptions {
                            sub.write(&queued);
                        }
                    }
                    Item::Control(control) => self.apply(control),
                }
            }
            for sub in &mut self.subscriptions {
                sub.flush();
            }
            if (1..BATCH).contains(&written) && !stopping {
                std::thread::sleep(LINGER);
            }
        }
        for sub in &mut self.subscriptions {
            sub.close();
        }
    }

    /// A change of the runtime subscriptions, between two events.
    fn apply(&mut self, control: Control) {
        let mut closed = Vec::new();
        for change in control.changes {
            match change {
                Change::Add(new) => match self.position(&new.id) {
                    Some(i) => {
                        let mut old = mem::replace(&mut self.subscriptions[i], new);
                        old.close();
                        closed.push(old);
                    }
                    None => self.subscriptions.push(new),
                },
                Change::Sources {
                    id,
                    sources,
                    #[cfg(feature = "kafka")]
                    kafka,
                } => {
                    let Some(i) = self.position(&id) else {
                        continue;
                    };
                    let sub = &mut self.subscriptions[i];
                    sub.sources = sources;
                    #[cfg(feature = "kafka")]
                    if let Some((new_topics, new_notify)) = kafka
                        && let DestinationWriter::Kafka { topics, notify, .. } =
                            &mut sub.destination
                    {
                        *topics = new_topics;
                        if let Some(new_notify) = new_notify {
                            *notify = new_notify;
                        }
                    }
                }
                Change::Remove(id) => {
                    if let Some(i) = self.position(&id) {
                        let mut old = self.subscriptions.remove(i);
                        old.close();
                        closed.push(old);
                    }
                }
            }
        }
        let _ = control.done.send(closed);
    }

    fn position(&self, id: &str) -> Option<usize> {
        self.subscriptions.iter().position(|s| s.id == id)
    }
}

enum DestinationWriter {
    File {
        path: PathBuf,
        file: File,
        batch: Vec<u8>,
        records: u64,
    },
    #[cfg(feature = "kafka")]
    Kafka {
        writer: crate::spool::SpoolWriter,
        topics: [String; 2],
        notify: crate::kafka::Notify,
    },
}

struct SubscriptionWriter {
    id: String,
    sources: [Option<Source>; 2],
    destination: DestinationWriter,
    metrics: Arc<EventMetrics>,
    drops: LogLimiter,
    filter_errors: LogLimiter,
}

impl SubscriptionWriter {
    fn write(&mut self, queued: &Queued) {
        let Some(source) = &self.sources[index(queued.event_type)] else {
            return;
        };
        if let Some(filter) = &source.filter {
            match filter.matches(&queued.filter) {
                Ok(true) => {}
                Ok(false) => return add(&self.metrics.filtered, 1),
                Err(e) => {
                    add(&self.metrics.filtered, 1);
                    if let Some(n) = self.filter_errors.hit() {
                        tracing::warn!(subscription = %self.id, filter = filter.source(), error = %e, events = n, "the filter failed; events left out");
                    }
                    return;
                }
            }
        }
        let json: Cow<'_, [u8]> = match &source.fields {
            None => Cow::Borrowed(&queued.json),
            Some(selection) => {
                let mut value: serde_json::Value =
                    serde_json::from_slice(&queued.json).expect("the pipeline wrote this JSON");
                selection.apply(&mut value);
                let mut json = Vec::with_capacity(queued.json.len());
                crate::json::write(&mut json, &value).expect("JSON values serialise");
                Cow::Owned(json)
            }
        };
        match &mut self.destination {
            DestinationWriter::File { batch, records, .. } => {
                batch.extend_from_slice(&json);
                batch.push(b'\n');
                *records += 1;
                add(&self.metrics.produced, 1);
            }
            #[cfg(feature = "kafka")]
            DestinationWriter::Kafka { writer, topics, .. } => {
                let entry = crate::spool::Entry {
                    key: queued.key.as_deref(),
                    topic: &topics[index(queued.event_type)],
                    value: &json,
                };
                match writer.append(entry) {
                    Ok(()) => add(&self.metrics.spooled, 1),
                    Err(e) => {
                        add(&self.metrics.dropped, 1);
                        if let Some(n) = self.drops.hit() {
                            tracing::warn!(subscription = %self.id, reason = %e, events = n, "events dropped (count since the last report)");
                        }
                    }
                }
            }
        }
    }

    /// After each batch (and on idle ticks): push the batch to the OS.
    fn flush(&mut self) {
        match &mut self.destination {
            DestinationWriter::File {
                path,
                file,
                batch,
                records,
            } => {
                if *records == 0 {
                    return;
                }
                match file.write_all(batch) {
                    Ok(()) => add(&self.metrics.delivered, *records),
                    Err(e) => {
                        add(&self.metrics.failed, *records);
                        add(&self.metrics.dropped, *records);
                        if let Some(n) = self.drops.hit() {
                            tracing::error!(subscription = %self.id, file = %path.display(), error = %e, reports = n, "writing events failed; they are lost");
                        }
                    }
                }
                batch.clear();
                *records = 0;
            }
            #[cfg(feature = "kafka")]
            DestinationWriter::Kafka { writer, notify, .. } => match writer.flush() {
                Ok(()) => notify.records_written(),
                Err((lost, e)) => {
                    self.metrics.spooled.fetch_sub(lost, Ordering::Relaxed);
                    add(&self.metrics.dropped, lost);
                    if let Some(n) = self.drops.hit() {
                        tracing::error!(subscription = %self.id, error = %e, events = lost, reports = n, "writing to the spool failed; events lost");
                    }
                }
            },
        }
    }

    fn close(&mut self) {
        self.flush();
        let result = match &mut self.destination {
            DestinationWriter::File { file, .. } => file.sync_all(),
            #[cfg(feature = "kafka")]
            DestinationWriter::Kafka { writer, notify, .. } => {
                let result = writer.sync();
                notify.records_written();
                result
            }
        };
        if let Err(e) = result {
            tracing::error!(subscription = %self.id, error = %e, "syncing events to disk failed");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
