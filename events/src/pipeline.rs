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

use std::{
    borrow::Cow,
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    Destination, Event, EventSink, EventType, EventsConfig, FilterInput, Source,
    metrics::{EventMetrics, LogLimiter, MetricsSnapshot, add},
};

/// The writer takes at most this many events at a time.
const BATCH: usize = 512;
/// How often an idle writer looks at the stop flag and syncs.
const TICK: Duration = Duration::from_millis(50);
/// At most one log line per this long for each kind of drop.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Why the pipeline could not start.
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
    wants: [bool; 2],
    queue: SyncSender<Queued>,
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
}

impl EventSink for Front {
    fn publish(&self, event: Event) {
        let Some(event_type) = event.kind() else {
            return;
        };
        if !self.wants[index(event_type)] {
            return;
        }
        if self.closed.load(Ordering::Acquire) {
            return self.drop_event("published after the event pipeline shut down");
        }
        let json = match serde_json::to_vec(&event) {
            Ok(json) => json,
            Err(e) => {
                tracing::error!(error = %e, "an event could not be serialised");
                return self.drop_event("unserialisable");
            }
        };
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
        // channel has the same capacity as a backstop).
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
        match self.queue.try_send(queued) {
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

/// Reads a pipeline's totals.
#[derive(Clone)]
pub struct MetricsHandle {
    front: Arc<Front>,
    subscriptions: Vec<Arc<EventMetrics>>,
}

impl MetricsHandle {
    pub fn snapshot(&self) -> MetricsSnapshot {
        self.subscriptions
            .iter()
            .map(|m| m.snapshot())
            .fold(self.front.metrics.snapshot(), MetricsSnapshot::merge)
    }
}

/// A running pipeline: the sink the gateway publishes into, the writer
/// thread and one delivery thread per Kafka subscription.
pub struct EventPipeline {
    front: Arc<Front>,
    stop: Arc<AtomicBool>,
    writer: Option<thread::JoinHandle<()>>,
    #[cfg(feature = "kafka")]
    deliveries: Vec<(String, crate::kafka::KafkaDelivery)>,
    subscriptions: Vec<(String, Arc<EventMetrics>)>,
    flush_timeout: Duration,
}

impl EventPipeline {
    /// Opens the destinations (files, spools, producers) and starts the
    /// threads. Relative paths are under `data_dir`, spools in
    /// `<data_dir>/events-spool/<subscription id>/`.
    pub fn start(config: &EventsConfig, data_dir: &Path) -> Result<EventPipeline, EventsError> {
        let limits = config.limits;
        let (queue, rx) = mpsc::sync_channel(limits.memory_queue_events);
        let mut wants = [false; 2];
        let mut writers = Vec::new();
        let mut subscriptions = Vec::new();
        #[cfg(feature = "kafka")]
        let mut deliveries = Vec::new();
        for sub in &config.subscriptions {
            let metrics = Arc::new(EventMetrics::default());
            let mut sources: [Option<Source>; 2] = [None, None];
            for source in &sub.sources {
                wants[index(source.event_type)] = true;
                sources[index(source.event_type)] = Some(source.clone());
            }
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
                    let dir = data_dir.join("events-spool").join(&sub.id);
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
                        crate::kafka::KafkaDelivery::start(&sub.id, kafka, spool, metrics.clone())
                            .map_err(|source| EventsError::Kafka {
                                id: sub.id.clone(),
                                source,
                            })?;
                    deliveries.push((sub.id.clone(), delivery));
                    DestinationWriter::Kafka {
                        writer,
                        topics: EventType::ALL.map(|t| kafka.topic_for(t)),
                        notify,
                    }
                }
                #[cfg(not(feature = "kafka"))]
                Destination::Kafka(_) => {
                    unreachable!("validation refuses Kafka without the feature")
                }
            };
            subscriptions.push((sub.id.clone(), metrics.clone()));
            writers.push(SubscriptionWriter {
                id: sub.id.clone(),
                sources,
                destination,
                metrics,
                drops: LogLimiter::new(LOG_EVERY),
                filter_errors: LogLimiter::new(LOG_EVERY),
            });
        }
        let front = Arc::new(Front {
            wants,
            queue,
            max_events: limits.memory_queue_events as u64,
            max_bytes: limits.memory_queue_bytes,
            metrics: Arc::new(EventMetrics::default()),
            closed: AtomicBool::new(false),
            drops: LogLimiter::new(LOG_EVERY),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let writer = if writers.is_empty() {
            None
        } else {
            let thread = Writer {
                queue: rx,
                stop: stop.clone(),
                metrics: front.metrics.clone(),
                subscriptions: writers,
            };
            Some(
                thread::Builder::new()
                    .name("events-writer".into())
                    .spawn(move || thread.run())
                    .map_err(EventsError::Thread)?,
            )
        };
        Ok(EventPipeline {
            front,
            stop,
            writer,
            #[cfg(feature = "kafka")]
            deliveries,
            subscriptions,
            flush_timeout: config.flush_timeout,
        })
    }

    /// The sink to publish into, or `None` when nothing is subscribed.
    pub fn sink(&self) -> Option<Arc<dyn EventSink>> {
        (!self.subscriptions.is_empty()).then(|| self.front.clone() as Arc<dyn EventSink>)
    }

    /// Totals over the queue and every subscription.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics_handle().snapshot()
    }

    /// A handle that reads the totals later, from elsewhere (`/metrics`).
    pub fn metrics_handle(&self) -> MetricsHandle {
        MetricsHandle {
            front: self.front.clone(),
            subscriptions: self.subscriptions.iter().map(|(_, m)| m.clone()).collect(),
        }
    }

    /// Each subscription's own counters.
    pub fn subscription_metrics(&self) -> Vec<(String, MetricsSnapshot)> {
        self.subscriptions
            .iter()
            .map(|(id, m)| (id.clone(), m.snapshot()))
            .collect()
    }

    /// Stops taking events, writes what is queued, and gives Kafka
    /// subscriptions until `flush_timeout` (plus half a second for the
    /// last reports) to deliver what is spooled. What is left stays in the
    /// spools for the next start; how much is logged and returned.
    pub async fn shutdown(mut self) -> ShutdownReport {
        let deadline = Instant::now() + self.flush_timeout;
        self.front.closed.store(true, Ordering::Release);
        self.stop.store(true, Ordering::Release);
        let writer = self.writer.take();
        #[cfg(feature = "kafka")]
        let deliveries = std::mem::take(&mut self.deliveries);
        let joined = tokio::task::spawn_blocking(move || {
            if let Some(writer) = writer
                && writer.join().is_err()
            {
                tracing::error!("the event writer thread panicked");
            }
            #[cfg(feature = "kafka")]
            {
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
                let _ = deadline;
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
        self.front.closed.store(true, Ordering::Release);
        self.stop.store(true, Ordering::Release);
    }
}

/// The writer thread.
struct Writer {
    queue: Receiver<Queued>,
    stop: Arc<AtomicBool>,
    metrics: Arc<EventMetrics>,
    subscriptions: Vec<SubscriptionWriter>,
}

impl Writer {
    /// Out of the queue (into the batch in hand, at most `BATCH`).
    fn taken(&self, queued: &Queued) {
        self.metrics.queue_events.fetch_sub(1, Ordering::AcqRel);
        self.metrics
            .queue_bytes
            .fetch_sub(queued.cost, Ordering::AcqRel);
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
            for queued in batch.drain(..) {
                for sub in &mut self.subscriptions {
                    sub.write(&queued);
                }
            }
            for sub in &mut self.subscriptions {
                sub.flush();
            }
        }
        for sub in &mut self.subscriptions {
            sub.close();
        }
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
                Cow::Owned(serde_json::to_vec(&value).expect("JSON values serialise"))
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
                let record = crate::spool::Record {
                    key: queued.key.clone(),
                    topic: topics[index(queued.event_type)].clone(),
                    value: json.into_owned(),
                };
                match writer.append(&record) {
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
mod tests;
