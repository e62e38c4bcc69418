//! The Kafka destination: one delivery thread per subscription reads its
//! spool in order and produces with an idempotent librdkafka producer,
//! moving the spool's committed offset only on delivery reports.
//!
//! Guarantees and their limits:
//! - **Nothing lost** while the spool is below its limits: a record leaves
//!   the spool only after Kafka acknowledged it (`acks=all`). librdkafka
//!   never gives up on a message (`message.timeout.ms=0`): the spool, not
//!   librdkafka's timer, bounds how long events wait, and a finite timeout
//!   would only turn in-flight messages into "possibly persisted" ones.
//! - **Order per key** (the endpoint host): records go to librdkafka in
//!   spool order, the default partitioner keeps a key on one partition,
//!   and idempotence keeps order through librdkafka's retries. After a
//!   failed delivery report nothing new is sent until every in-flight
//!   record has reported; then the failed ones are sent again, in order.
//! - **No duplicates from Postern's side** through outages and graceful
//!   restarts: idempotence drops librdkafka's own retries at the broker,
//!   and a record is re-sent only if its delivery failed or was never
//!   confirmed. A crash (SIGKILL, power loss) can re-send up to 200 ms of
//!   confirmed records (the committed offset is persisted at most every
//!   200 ms), and a shutdown that purges in-flight messages re-sends those
//!   (the broker may have stored them without the report arriving).
//! - **Bounded memory**: at most `WINDOW_EVENTS` records / `WINDOW_BYTES`
//!   are in librdkafka at once, and librdkafka's queue is capped to twice
//!   that.
//! - **A wedged producer is replaced**: when the broker answers (it is up
//!   and responses arrive) but no delivery report came for `STALL`, the
//!   producer is rebuilt with a new producer id and the records in flight
//!   are sent again in order. This happens when a broker lost the
//!   producer's state (a new cluster at the same address, or tansu's
//!   memory storage after a restart): librdkafka then bumps the epoch and
//!   retries forever. Records the broker had stored without answering for
//!   `STALL` would be duplicated by this; a broker that answers other
//!   requests but not produce requests for that long is not healthy.

use std::{
    collections::BTreeMap,
    mem,
    sync::{Arc, Condvar, Mutex, MutexGuard, mpsc},
    thread,
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig, ClientContext,
    error::{KafkaError, RDKafkaErrorCode as Code},
    producer::{
        BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
    },
};

use crate::{
    KafkaDestination,
    metrics::{EventMetrics, LogLimiter, add},
    spool::{Record, Spool, SpoolReader},
};

/// Records handed to librdkafka and not yet reported, at most.
const WINDOW_EVENTS: usize = 10_000;
/// Bytes of those records, at most.
const WINDOW_BYTES: usize = 16 << 20;
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often the thread wakes without news, to persist the offset.
const TICK: Duration = Duration::from_millis(100);
/// After the flush deadline: time for queued and in-flight records to
/// report.
const LAST_REPORTS: Duration = Duration::from_millis(500);
/// Time for queued and in-flight records to report when another delivery
/// thread takes over the spool (new producer settings at run time):
/// nothing waits on it but that thread, so it may take longer; a record
/// still unreported after it is sent again.
const HANDOVER_REPORTS: Duration = STALL;
/// No delivery report for this long while the broker answers: the
/// producer is wedged and is rebuilt.
const STALL: Duration = Duration::from_secs(10);

/// The librdkafka settings Postern chooses for a destination.
pub(crate) fn producer_config(id: &str, dest: &KafkaDestination) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", dest.brokers.join(","))
        .set("client.id", format!("postern-events-{id}"))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", &dest.compression)
        .set("linger.ms", dest.linger.as_millis().to_string())
        .set("message.timeout.ms", "0")
        .set(
            "queue.buffering.max.messages",
            (2 * WINDOW_EVENTS).to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            (2 * WINDOW_BYTES / 1024).to_string(),
        )
        // Find a restarted broker within 2 s rather than librdkafka's 10 s.
        .set("reconnect.backoff.max.ms", "2000")
        // Broker state and response counts, for the wedge check.
        .set("statistics.interval.ms", "1000");
    if let Some(p) = &dest.security_protocol {
        config.set("security.protocol", p);
    }
    // Without a CA file, the system's store: librdkafka's OpenSSL is built
    // in, and its own default directory holds none.
    let ca = match &dest.tls.ca_location {
        Some(path) => path.display().to_string(),
        None => "probe".into(),
    };
    config.set("ssl.ca.location", ca);
    if let (Some(cert), Some(key)) = (&dest.tls.certificate_location, &dest.tls.key_location) {
        config
            .set("ssl.certificate.location", cert.display().to_string())
            .set("ssl.key.location", key.display().to_string());
    }
    if let Some(m) = &dest.sasl_mechanism {
        config.set("sasl.mechanism", m);
    }
    if let Some(u) = &dest.sasl_username {
        config.set("sasl.username", u);
    }
    if let Some(p) = &dest.sasl_password {
        config.set("sasl.password", p.expose());
    }
    config
}

/// Whether two destinations make the same producer: everything but the
/// topic, which each spooled record carries itself.
pub(crate) fn same_producer(a: &KafkaDestination, b: &KafkaDestination) -> bool {
    KafkaDestination {
        topic: String::new(),
        ..a.clone()
    } == KafkaDestination {
        topic: String::new(),
        ..b.clone()
    }
}

/// A delivery report: producer generation, seq, result.
type Report = (u64, u64, Result<(), KafkaError>);

/// What the delivery thread learns from outside: delivery reports, new
/// records in the spool, the broker's health, and when to finish.
#[derive(Default)]
struct Inbox {
    reports: Vec<Report>,
    news: bool,
    finish_by: Option<Instant>,
    /// Stop without waiting for reports: the spool is about to be deleted.
    discard: bool,
    /// Another thread takes over the spool: wait up to `HANDOVER_REPORTS`
    /// for in-flight records to report, so that it sends none of them again.
    handing_over: bool,
    health: Health,
}

/// From librdkafka's statistics.
#[derive(Clone, Copy, Default)]
struct Health {
    /// Some broker connection is up.
    up: bool,
    /// Responses received from brokers so far.
    responses: i64,
}

#[derive(Default)]
struct Shared {
    inbox: Mutex<Inbox>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().expect("delivery inbox lock")
    }
}

/// Lets the writer tell the delivery thread about new records.
#[derive(Clone)]
pub(crate) struct Notify(Arc<Shared>);

impl Notify {
    pub(crate) fn records_written(&self) {
        self.0.lock().news = true;
        self.0.wake.notify_one();
    }
}

struct Context {
    shared: Arc<Shared>,
    id: String,
    generation: u64,
    errors: Arc<LogLimiter>,
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(n) = self.errors.hit() {
            tracing::warn!(subscription = %self.id, %error, reason, occurrences = n, "Kafka client error");
        }
    }

    fn stats_raw(&self, statistics: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Broker {
            state: String,
        }
        #[derive(serde::Deserialize)]
        struct Stats {
            rx: i64,
            brokers: std::collections::HashMap<String, Broker>,
        }
        if let Ok(stats) = serde_json::from_slice::<Stats>(statistics) {
            self.shared.lock().health = Health {
                up: stats.brokers.values().any(|b| b.state == "UP"),
                responses: stats.rx,
            };
        }
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let result = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(e.clone()),
        };
        let mut inbox = self.shared.lock();
        // The delivery thread takes every report at once, so only the
        // first of them needs to wake it: a wake (a futex call) per
        // record was most of what delivering cost.
        let first = inbox.reports.is_empty();
        inbox.reports.push((self.generation, seq as u64, result));
        drop(inbox);
        if first {
            self.shared.wake.notify_one();
        }
    }
}

fn create_producer(
    config: &ClientConfig,
    shared: &Arc<Shared>,
    id: &str,
    generation: u64,
    errors: &Arc<LogLimiter>,
) -> Result<ThreadedProducer<Context>, KafkaError> {
    config.create_with_context(Context {
        shared: shared.clone(),
        id: id.to_string(),
        generation,
        errors: errors.clone(),
    })
}

/// Errors that no retry can fix: the record is dropped and counted.
fn permanent(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            Code::MessageSizeTooLarge
                | Code::InvalidMessageSize
                | Code::InvalidMessage
                | Code::InvalidRecord
                | Code::BadMessage
        )
    )
}

/// How a delivery thread ended.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct DeliveryOutcome {
    /// Records left in the spool for the next start.
    pub undelivered: u64,
}

/// A running delivery thread.
pub(crate) struct KafkaDelivery {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<DeliveryOutcome>>,
}

/// A delivery thread with its producer, not reading the spool yet: it
/// starts on [`PendingDelivery::take_over`]. Dropped instead, it ends
/// without having read anything.
pub(crate) struct PendingDelivery {
    delivery: KafkaDelivery,
    notify: Notify,
    gate: mpsc::Sender<Option<KafkaDelivery>>,
}

impl PendingDelivery {
    /// Starts reading the spool, once `previous` (the thread that read the
    /// same spool until now) has stopped: it gets no more time than its
    /// in-flight records need to report (at most `HANDOVER_REPORTS`), and
    /// what it did not deliver is read again from its committed offset by
    /// this thread, so nothing is lost and, unless a report takes longer
    /// than that, nothing is sent twice. Returns at once.
    pub(crate) fn take_over(self, previous: Option<KafkaDelivery>) -> (KafkaDelivery, Notify) {
        // A thread that is gone has dropped the receiver; `previous` then
        // comes back in the error and is dropped, which stops it.
        let _ = self.gate.send(previous);
        (self.delivery, self.notify)
    }
}

impl KafkaDelivery {
    pub(crate) fn start(
        id: &str,
        dest: &KafkaDestination,
        spool: Arc<Spool>,
        metrics: Arc<EventMetrics>,
    ) -> Result<(KafkaDelivery, Notify), KafkaError> {
        Ok(KafkaDelivery::prepare(id, dest, spool, metrics)?.take_over(None))
    }

    /// Creates the producer and the thread, which waits for
    /// [`PendingDelivery::take_over`].
    pub(crate) fn prepare(
        id: &str,
        dest: &KafkaDestination,
        spool: Arc<Spool>,
        metrics: Arc<EventMetrics>,
    ) -> Result<PendingDelivery, KafkaError> {
        let shared = Arc::new(Shared::default());
        let config = producer_config(id, dest);
        let errors = Arc::new(LogLimiter::new(Duration::from_secs(10)));
        let producer = create_producer(&config, &shared, id, 0, &errors)?;
        let (gate, gated) = mpsc::channel::<Option<KafkaDelivery>>();
        let id = id.to_string();
        let thread_shared = shared.clone();
        let thread = thread::Builder::new()
            .name(format!("events-kafka-{id}"))
            .spawn(move || {
                let Ok(previous) = gated.recv() else {
                    return DeliveryOutcome {
                        undelivered: spool.pending(),
                    };
                };
                if let Some(previous) = previous {
                    previous.shared.lock().handing_over = true;
                    previous.finish_by(Instant::now());
                    previous.join();
                }
                // Only now: the previous thread's last commit is in.
                let reader = spool.reader();
                let run = Run {
                    id,
                    config,
                    errors,
                    generation: 0,
                    producer,
                    reader,
                    spool,
                    shared: thread_shared,
                    metrics,
                    window: Window::default(),
                    unsent: None,
                    retry_at: None,
                    backoff: RETRY_FIRST,
                    failures: LogLimiter::new(Duration::from_secs(10)),
                    progress: (Instant::now(), 0),
                };
                run.run()
            })
            .map_err(|e| {
                KafkaError::ClientCreation(format!("starting the delivery thread: {e}"))
            })?;
        Ok(PendingDelivery {
            delivery: KafkaDelivery {
                shared: shared.clone(),
                thread: Some(thread),
            },
            notify: Notify(shared),
            gate,
        })
    }

    /// Asks the thread to deliver what it can by `deadline`, then stop.
    pub(crate) fn finish_by(&self, deadline: Instant) {
        self.shared.lock().finish_by = Some(deadline);
        self.shared.wake.notify_one();
    }

    /// Stops the thread at once, without waiting for in-flight records to
    /// report or committing their offsets (the spool is going away), and
    /// waits for it.
    pub(crate) fn discard(self) {
        self.shared.lock().discard = true;
        self.finish_by(Instant::now());
        self.join();
    }

    /// Waits for the thread (after [`KafkaDelivery::finish_by`]).
    pub(crate) fn join(mut self) -> DeliveryOutcome {
        match self.thread.take().map(thread::JoinHandle::join) {
            Some(Ok(outcome)) => outcome,
            Some(Err(_)) => {
                tracing::error!("the Kafka delivery thread panicked");
                DeliveryOutcome::default()
            }
            None => DeliveryOutcome::default(),
        }
    }
}

impl Drop for KafkaDelivery {
    /// Dropped without `join` (a failed start, a test that panicked):
    /// the thread stops at once; what it did not deliver stays spooled.
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.finish_by(Instant::now());
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    InFlight,
    Acked,
    Failed,
}

/// Records sent and not yet out of the window, by seq, with how many are
/// in flight and how many failed: the delivery loop asks both on every
/// wake, and a window of 10,000 records scanned each time (a broker down
/// under load) cost some 18 million instructions a second.
#[derive(Default)]
struct Window {
    records: BTreeMap<u64, (Slot, Record)>,
    bytes: usize,
    in_flight: usize,
    failed: usize,
}

impl Window {
    fn tally(&mut self, slot: Slot, added: bool) {
        let count = match slot {
            Slot::InFlight => &mut self.in_flight,
            Slot::Failed => &mut self.failed,
            Slot::Acked => return,
        };
        if added {
            *count += 1;
        } else {
            *count -= 1;
        }
    }

    fn insert(&mut self, seq: u64, slot: Slot, record: Record) {
        self.bytes += record.size();
        self.tally(slot, true);
        self.records.insert(seq, (slot, record));
    }

    /// Moves `seq` to `slot`; its old slot, or `None` when it is not in
    /// the window.
    fn set(&mut self, seq: u64, slot: Slot) -> Option<Slot> {
        let entry = &mut self.records.get_mut(&seq)?.0;
        let old = mem::replace(entry, slot);
        self.tally(old, false);
        self.tally(slot, true);
        Some(old)
    }

    /// Every record in flight is marked failed (its producer is gone).
    fn fail_in_flight(&mut self) {
        for (slot, _) in self.records.values_mut() {
            if *slot == Slot::InFlight {
                *slot = Slot::Failed;
            }
        }
        self.failed += mem::take(&mut self.in_flight);
    }

    /// Drops acknowledged records from the front.
    fn drop_acked_front(&mut self) {
        while let Some(entry) = self.records.first_entry() {
            if entry.get().0 != Slot::Acked {
                break;
            }
            let (_, record) = entry.remove();
            self.bytes -= record.size();
        }
    }

    fn failed_seqs(&self) -> Vec<u64> {
        if self.failed == 0 {
            return Vec::new();
        }
        self.records
            .iter()
            .filter(|(_, (slot, _))| *slot == Slot::Failed)
            .map(|(seq, _)| *seq)
            .collect()
    }
}

struct Run {
    id: String,
    config: ClientConfig,
    errors: Arc<LogLimiter>,
    /// Which producer this is; reports of earlier ones are ignored.
    generation: u64,
    producer: ThreadedProducer<Context>,
    reader: SpoolReader,
    spool: Arc<Spool>,
    shared: Arc<Shared>,
    metrics: Arc<EventMetrics>,
    window: Window,
    /// Read from the spool but not accepted by librdkafka yet.
    unsent: Option<(u64, Record)>,
    retry_at: Option<Instant>,
    backoff: Duration,
    failures: LogLimiter,
    /// When the last report arrived (or the window filled from empty),
    /// and the broker responses counted then.
    progress: (Instant, i64),
}

enum Sent {
    Ok,
    QueueFull,
    Dropped,
    Retry,
}

impl Run {
    fn run(mut self) -> DeliveryOutcome {
        loop {
            let (reports, finish_by, health) = {
                let mut inbox = self.shared.lock();
                inbox.news = false;
                (mem::take(&mut inbox.reports), inbox.finish_by, inbox.health)
            };
            if !reports.is_empty() || !self.in_flight() {
                self.progress = (Instant::now(), health.responses);
            }
            for (generation, seq, result) in reports {
                if generation == self.generation {
                    self.report(seq, result);
                }
            }
            self.commit(false);
            let now = Instant::now();
            if self.in_flight()
                && health.up
                && now.duration_since(self.progress.0) >= STALL
                && health.responses > self.progress.1 + 2
            {
                self.rebuild(health.responses);
            }
            if let Some(deadline) = finish_by
                && (self.all_delivered() || now >= deadline)
            {
                break;
            }
            self.send(now);
            let mut wait = TICK;
            if let Some(at) = self.retry_at
                && at > now
            {
                wait = wait.min(at - now);
            }
            if let Some(deadline) = finish_by {
                wait = wait.min(deadline.saturating_duration_since(now));
            }
            let inbox = self.shared.lock();
            if inbox.reports.is_empty() && !inbox.news && inbox.finish_by == finish_by {
                let _ = self.shared.wake.wait_timeout(inbox, wait);
            }
        }
        self.finish()
    }

    fn in_flight(&self) -> bool {
        self.window.in_flight > 0
    }

    /// Replaces a wedged producer: the broker answers, nothing is
    /// delivered. Records in flight are sent again, in order, by the new one.
    fn rebuild(&mut self, responses: i64) {
        self.progress = (Instant::now(), responses);
        let generation = self.generation + 1;
        let producer = match create_producer(
            &self.config,
            &self.shared,
            &self.id,
            generation,
            &self.errors,
        ) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(subscription = %self.id, error = %e, "could not create a new Kafka producer");
                return;
            }
        };
        tracing::warn!(subscription = %self.id, stalled_for = ?STALL, "the broker answers but delivers nothing (it may have lost the producer's state); starting a new producer");
        self.generation = generation;
        let old = mem::replace(&mut self.producer, producer);
        old.purge(PurgeConfig::default().queue().inflight());
        drop(old);
        self.window.fail_in_flight();
        self.retry_at = None;
        self.backoff = RETRY_FIRST;
    }

    fn all_delivered(&self) -> bool {
        self.window.records.is_empty()
            && self.unsent.is_none()
            && self.spool.caught_up(self.reader.position())
    }

    fn report(&mut self, seq: u64, result: Result<(), KafkaError>) {
        let slot = match &result {
            Ok(()) => Slot::Acked,
            Err(e) if permanent(e) => Slot::Acked,
            Err(_) => Slot::Failed,
        };
        if self.window.set(seq, slot).is_none() {
            return;
        }
        match result {
            Ok(()) => {
                add(&self.metrics.delivered, 1);
                self.backoff = RETRY_FIRST;
            }
            Err(e) if permanent(&e) => {
                add(&self.metrics.failed, 1);
                add(&self.metrics.dropped, 1);
                tracing::error!(subscription = %self.id, seq, error = %e, "Kafka refused an event for good; dropped");
            }
            Err(e) => {
                add(&self.metrics.failed, 1);
                self.retry_at = Some(Instant::now() + self.backoff);
                if let Some(n) = self.failures.hit() {
                    tracing::warn!(subscription = %self.id, error = %e, failures = n, retry_in = ?self.backoff, "Kafka delivery failed; the events stay spooled and are sent again");
                }
                self.backoff = (self.backoff * 2).min(RETRY_MAX);
            }
        }
    }

    /// Drops acknowledged records from the front of the window and moves
    /// the spool's committed offset to the first record not acknowledged.
    fn commit(&mut self, force: bool) {
        self.window.drop_acked_front();
        let first_open = self
            .window
            .records
            .first_key_value()
            .map(|(seq, _)| *seq)
            .into_iter()
            .chain(self.unsent.as_ref().map(|(seq, _)| *seq))
            .min()
            .unwrap_or(self.reader.position());
        if let Err(e) = self.spool.commit(first_open, force) {
            tracing::error!(subscription = %self.id, error = %e, "spool: could not persist the committed offset");
        }
    }

    fn send(&mut self, now: Instant) {
        if self.retry_at.is_some_and(|at| now < at) {
            return;
        }
        let failed = self.window.failed_seqs();
        if !failed.is_empty() {
            if self.in_flight() {
                return; // resend in order once everything in flight has reported
            }
            self.retry_at = None;
            for seq in failed {
                let (_, record) = &self.window.records[&seq];
                match self.produce(seq, record) {
                    Sent::Ok => {
                        self.window.set(seq, Slot::InFlight);
                    }
                    Sent::Dropped => {
                        self.window.set(seq, Slot::Acked);
                    }
                    Sent::QueueFull | Sent::Retry => {
                        self.retry_at.get_or_insert(now + self.backoff);
                        return;
                    }
                }
            }
            return;
        }
        self.retry_at = None;
        while self.window.records.len() < WINDOW_EVENTS && self.window.bytes < WINDOW_BYTES {
            let (seq, record) = match self.unsent.take() {
                Some(next) => next,
                None => match self.reader.next() {
                    Ok(Some(next)) => next,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::error!(subscription = %self.id, error = %e, "spool: read failed; trying again");
                        self.retry_at = Some(now + self.backoff);
                        return;
                    }
                },
            };
            match self.produce(seq, &record) {
                Sent::Ok => {
                    add(&self.metrics.produced, 1);
                    self.window.insert(seq, Slot::InFlight, record);
                }
                Sent::Dropped => {
                    self.window.insert(seq, Slot::Acked, record);
                }
                Sent::QueueFull => {
                    self.unsent = Some((seq, record));
                    return;
                }
                Sent::Retry => {
                    self.unsent = Some((seq, record));
                    self.retry_at = Some(now + self.backoff);
                    self.backoff = (self.backoff * 2).min(RETRY_MAX);
                    return;
                }
            }
        }
    }

    fn produce(&self, seq: u64, record: &Record) -> Sent {
        let mut base = BaseRecord::with_opaque_to(&record.topic, seq as usize)
            .payload(record.value.as_slice());
        if let Some(key) = &record.key {
            base = base.key(key.as_str());
        }
        match self.producer.send(base) {
            Ok(()) => Sent::Ok,
            Err((KafkaError::MessageProduction(Code::QueueFull), _)) => Sent::QueueFull,
            Err((e, _)) if permanent(&e) => {
                add(&self.metrics.failed, 1);
                add(&self.metrics.dropped, 1);
                tracing::error!(subscription = %self.id, seq, error = %e, "Kafka refused an event for good; dropped");
                Sent::Dropped
            }
            Err((e, _)) => {
                add(&self.metrics.failed, 1);
                if let Some(n) = self.failures.hit() {
                    tracing::warn!(subscription = %self.id, error = %e, failures = n, "could not hand an event to librdkafka; trying again");
                }
                Sent::Retry
            }
        }
    }

    /// After the deadline: let what is in flight report for a moment, keep
    /// what was confirmed, and leave the rest in the spool.
    fn finish(mut self) -> DeliveryOutcome {
        if self.shared.lock().discard {
            self.producer
                .purge(PurgeConfig::default().queue().inflight());
            return DeliveryOutcome {
                undelivered: self.spool.pending(),
            };
        }
        if !self.window.records.is_empty() {
            // Queued records are sent, not purged: a purged record would
            // leave a gap in the window behind which records of other
            // partitions are delivered; the offset stops at the gap, and
            // whoever reads the spool next would send those again.
            let wait = match self.shared.lock().handing_over {
                true => HANDOVER_REPORTS,
                false => LAST_REPORTS,
            };
            let _ = self.producer.flush(wait);
            let reports = mem::take(&mut self.shared.lock().reports);
            for (generation, seq, result) in reports {
                if generation == self.generation && result.is_ok() {
                    self.report(seq, result);
                }
            }
        }
        self.commit(true);
        DeliveryOutcome {
            undelivered: self.spool.pending(),
        }
        // Dropping the producer purges whatever is still in flight; those
        // records are not committed, so the next start sends them.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize) -> Record {
        Record {
            key: None,
            topic: "t".into(),
            value: vec![0; n],
        }
    }

    /// The counts the delivery loop reads instead of scanning the window.
    fn counts(w: &Window) -> (usize, usize, usize) {
        let scanned = |s: Slot| w.records.values().filter(|(slot, _)| *slot == s).count();
        assert_eq!(w.in_flight, scanned(Slot::InFlight), "in flight");
        assert_eq!(w.failed, scanned(Slot::Failed), "failed");
        (w.in_flight, w.failed, w.records.len())
    }

    #[test]
    fn the_windows_counts_follow_every_change_of_a_slot() {
        let mut w = Window::default();
        for seq in 0..4 {
            w.insert(seq, Slot::InFlight, record(10));
        }
        w.insert(4, Slot::Acked, record(10));
        assert_eq!(counts(&w), (4, 0, 5));
        assert_eq!(w.bytes, 5 * record(10).size());

        assert!(w.set(1, Slot::Failed) == Some(Slot::InFlight));
        assert!(w.set(0, Slot::Acked) == Some(Slot::InFlight));
        assert!(w.set(99, Slot::Acked).is_none(), "not in the window");
        assert_eq!(counts(&w), (2, 1, 5));
        assert_eq!(w.failed_seqs(), [1]);

        w.drop_acked_front();
        assert_eq!(counts(&w), (2, 1, 4), "only the acknowledged front goes");
        assert_eq!(w.bytes, 4 * record(10).size());

        w.fail_in_flight();
        assert_eq!(counts(&w), (0, 3, 4));
        assert_eq!(w.failed_seqs(), [1, 2, 3]);
        for seq in 1..4 {
            w.set(seq, Slot::Acked);
        }
        w.drop_acked_front();
        assert_eq!(counts(&w), (0, 0, 0));
        assert_eq!(w.bytes, 0);
    }
}
