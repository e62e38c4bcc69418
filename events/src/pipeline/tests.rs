//! One conformance suite for every sink (STYLE habit 12): the in-memory
//! reference sink, the pipeline with a file destination and, with the
//! `kafka` feature, the pipeline with a Kafka destination on a real
//! Kafka-protocol broker (tansu). Each must deliver every event exactly
//! once, unchanged, valid against its schema, and in order per key.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde_json::Value;

use crate::*;

pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "postern-events-{tag}-{}",
            event_id().trim_start_matches("ev_")
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A realistic event: HTTP for even `i`, TCP for odd, on one of four hosts.
pub(crate) fn sample(i: usize) -> Event {
    let host = format!("h{}.example.test", i % 4);
    let conn = Conn {
        client_ip: Some("127.0.0.1".into()),
        server_ip: Some("127.0.0.1".into()),
        server_name: Some(host.clone()),
        server_port: Some(443),
        start_ts: Some(timestamp(SystemTime::now())),
        ..Default::default()
    };
    let postern = PosternFields {
        region: Some("us".into()),
        node_id: Some("test-node".into()),
        endpoint_id: Some("ep_2abcdefghijklmnopqrstuvwxy".into()),
        duration_ms: Some(1.5),
        ..Default::default()
    };
    if i.is_multiple_of(2) {
        let mut headers = http::HeaderMap::new();
        headers.insert("user-agent", "curl/8".parse().unwrap());
        Event::http(
            HttpRequestComplete {
                conn: Some(conn),
                http: Some(Http {
                    request: Some(HttpRequest {
                        method: Some("GET".into()),
                        version: Some("HTTP/1.1".into()),
                        body_length: Some(0),
                        headers: Some(Headers::new(&headers)),
                        user_agent: Some("curl/8".into()),
                        url: Some(Url {
                            raw: Some(format!("https://{host}/r/{i}?q=1")),
                            scheme: Some("https".into()),
                            host: Some(host.clone()),
                            path: Some(format!("/r/{i}")),
                            query: Some("q=1".into()),
                        }),
                        ..Default::default()
                    }),
                    response: Some(HttpResponse {
                        status_code: Some(200),
                        body_length: Some(42),
                        ..Default::default()
                    }),
                }),
                tls: Some(Tls {
                    version: Some("TLSv1.3".into()),
                    cipher_suite: Some("TLS_AES_128_GCM_SHA256".into()),
                    client_cert: None,
                }),
                postern: Some(postern),
                ..Default::default()
            },
            SystemTime::now(),
            None,
        )
    } else {
        Event::tcp(
            TcpConnectionClosed {
                conn: Some(Conn {
                    bytes_in: Some(i as u64),
                    bytes_out: Some(2 * i as u64),
                    end_ts: Some(timestamp(SystemTime::now())),
                    ..conn
                }),
                ip_policy: None,
                traffic_policy: None,
                postern: Some(PosternFields {
                    endpoint_proto: Some("tls".into()),
                    ..postern
                }),
            },
            SystemTime::now(),
            None,
        )
    }
}

/// Checks an event against the schema of its type; panics with the errors.
pub(crate) fn assert_valid(event: &Value) {
    let event_type = event["event_type"]
        .as_str()
        .and_then(EventType::parse)
        .unwrap_or_else(|| panic!("no known event_type: {event}"));
    let schema: Value = serde_json::from_str(schema(event_type)).unwrap();
    let validator = jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap();
    let errors: Vec<String> = validator
        .iter_errors(event)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{event} does not match its schema: {errors:?}"
    );
}

/// A sink under test: where to publish, and what arrived once it has
/// flushed, as (key, event) in arrival order.
trait SinkUnderTest {
    fn sink(&self) -> Arc<dyn EventSink>;
    async fn delivered(self) -> Vec<(Option<String>, Value)>;
}

struct Memory(Arc<MemorySink>);

impl SinkUnderTest for Memory {
    fn sink(&self) -> Arc<dyn EventSink> {
        self.0.clone()
    }

    async fn delivered(self) -> Vec<(Option<String>, Value)> {
        self.0
            .events()
            .iter()
            .map(|e| (event_key(e), serde_json::to_value(e).unwrap()))
            .collect()
    }
}

struct FilePipeline {
    _dir: TempDir,
    path: PathBuf,
    pipeline: EventPipeline,
}

fn file_config(sources: Vec<Source>) -> EventsConfig {
    EventsConfig {
        subscriptions: vec![Subscription {
            id: "file".into(),
            description: String::new(),
            metadata: String::new(),
            sources,
            destination: Destination::File(FileDestination {
                path: "out/events.jsonl".into(),
            }),
        }],
        ..EventsConfig::default()
    }
}

fn all_types() -> Vec<Source> {
    EventType::ALL
        .into_iter()
        .map(|event_type| Source {
            event_type,
            filter: None,
            fields: None,
        })
        .collect()
}

impl FilePipeline {
    fn start() -> FilePipeline {
        let dir = TempDir::new("file");
        let pipeline = EventPipeline::start(&file_config(all_types()), &dir.0).unwrap();
        FilePipeline {
            path: dir.0.join("out/events.jsonl"),
            _dir: dir,
            pipeline,
        }
    }
}

fn read_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

impl SinkUnderTest for FilePipeline {
    fn sink(&self) -> Arc<dyn EventSink> {
        self.pipeline.sink().unwrap()
    }

    async fn delivered(self) -> Vec<(Option<String>, Value)> {
        let report = self.pipeline.shutdown().await;
        assert_eq!(report.undelivered, 0);
        read_lines(&self.path)
            .into_iter()
            .map(|v| {
                let event: Event = serde_json::from_value(v.clone()).unwrap();
                (event_key(&event), v)
            })
            .collect()
    }
}

async fn conformance<S: SinkUnderTest>(under_test: S) {
    const N: usize = 400;
    let sink = under_test.sink();
    let events: Vec<Event> = (0..N).map(sample).collect();
    for event in &events {
        sink.publish(event.clone());
    }
    drop(sink);
    let delivered = under_test.delivered().await;
    assert_eq!(delivered.len(), N, "every event, exactly once");
    let by_id: BTreeMap<&str, &Event> = events.iter().map(|e| (e.event_id.as_str(), e)).collect();
    let mut seen = BTreeSet::new();
    for (key, json) in &delivered {
        assert_valid(json);
        let id = json["event_id"].as_str().unwrap();
        assert!(seen.insert(id.to_string()), "{id} arrived twice");
        let original = by_id
            .get(id)
            .unwrap_or_else(|| panic!("{id} was never published"));
        assert_eq!(json, &serde_json::to_value(original).unwrap(), "unchanged");
        assert_eq!(key, &event_key(original), "keyed by the endpoint host");
        let back: Event = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(&&back, original, "deserialises to the same event");
    }
    // Order per key: each host's events arrive in publish order.
    let order = |list: Vec<(Option<String>, String)>| {
        let mut per_key: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
        for (k, id) in list {
            per_key.entry(k).or_default().push(id);
        }
        per_key
    };
    let published = order(
        events
            .iter()
            .map(|e| (event_key(e), e.event_id.clone()))
            .collect(),
    );
    let arrived = order(
        delivered
            .iter()
            .map(|(k, v)| (k.clone(), v["event_id"].as_str().unwrap().to_string()))
            .collect(),
    );
    assert_eq!(published, arrived);
}

#[tokio::test]
async fn conformance_memory() {
    conformance(Memory(Arc::default())).await;
}

#[tokio::test]
async fn conformance_file() {
    conformance(FilePipeline::start()).await;
}

#[tokio::test]
async fn filters_and_field_selection_apply_per_source() {
    let dir = TempDir::new("select");
    let sources = vec![
        Source {
            event_type: EventType::HttpRequestComplete,
            filter: Some(Filter::compile(r#"ev.conn.server_name == "h0.example.test""#).unwrap()),
            fields: Some(
                FieldSelection::new(
                    EventType::HttpRequestComplete,
                    &[
                        "conn.server_name".into(),
                        "http.response.status_code".into(),
                    ],
                )
                .unwrap(),
            ),
        },
        Source {
            event_type: EventType::TcpConnectionClosed,
            filter: None,
            fields: None,
        },
    ];
    let pipeline = EventPipeline::start(&file_config(sources), &dir.0).unwrap();
    let sink = pipeline.sink().unwrap();
    for i in 0..40 {
        sink.publish(sample(i));
    }
    let report = pipeline.shutdown().await;
    let lines = read_lines(&dir.0.join("out/events.jsonl"));
    // HTTP: i even, host h0 when i % 4 == 0: 10 of them; TCP: all 20.
    let http: Vec<&Value> = lines
        .iter()
        .filter(|v| v["event_type"] == HTTP_REQUEST_COMPLETE)
        .collect();
    assert_eq!(http.len(), 10);
    assert_eq!(lines.len(), 30);
    assert_eq!(report.metrics.filtered, 10);
    assert_eq!(report.metrics.delivered, 30);
    for v in &http {
        assert_valid(v);
        assert_eq!(
            v["object"],
            serde_json::json!({"conn": {"server_name": "h0.example.test"}, "http": {"response": {"status_code": 200}}})
        );
    }
    for v in lines
        .iter()
        .filter(|v| v["event_type"] == TCP_CONNECTION_CLOSED)
    {
        assert_valid(v);
        assert!(v["object"]["conn"]["bytes_in"].is_u64());
    }
}

#[tokio::test]
async fn a_full_memory_queue_drops_and_counts_without_blocking() {
    let dir = TempDir::new("overflow");
    let mut config = file_config(all_types());
    config.limits.memory_queue_events = 5;
    let pipeline = EventPipeline::start(&config, &dir.0).unwrap();
    let sink = pipeline.sink().unwrap();
    // Faster than the writer can take them: some must be dropped.
    let started = std::time::Instant::now();
    for i in 0..5000 {
        sink.publish(sample(i));
    }
    let took = started.elapsed();
    let report = pipeline.shutdown().await;
    let m = report.metrics;
    assert_eq!(m.published + m.dropped, 5000, "{m:?}");
    assert!(m.dropped > 0, "{m:?}");
    assert!(m.queue_peak_events <= 5, "{m:?}");
    assert_eq!(
        read_lines(&dir.0.join("out/events.jsonl")).len() as u64,
        m.published
    );
    assert!(took < Duration::from_secs(5), "publishing took {took:?}");
}

#[tokio::test]
async fn the_byte_limit_of_the_memory_queue_holds() {
    // The destination is a FIFO read only after all events are published:
    // the writer blocks once the pipe is full, so the queue must fill up
    // however fast this machine's writer thread is.
    let dir = TempDir::new("bytes");
    std::fs::create_dir_all(dir.0.join("out")).unwrap();
    let fifo = dir.0.join("out/events.jsonl");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.unwrap().success(), "mkfifo failed");
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        // Opening blocks until the pipeline opens its end.
        let mut fifo = std::fs::File::open(fifo).unwrap();
        wait.recv().unwrap();
        std::io::copy(&mut fifo, &mut std::io::sink()).unwrap()
    });
    let mut config = file_config(all_types());
    config.limits.memory_queue_bytes = 4096;
    let pipeline = EventPipeline::start(&config, &dir.0).unwrap();
    let sink = pipeline.sink().unwrap();
    for i in 0..2000 {
        sink.publish(sample(i));
    }
    go.send(()).unwrap();
    let m = pipeline.shutdown().await.metrics;
    assert!(reader.join().unwrap() > 0);
    assert!(m.queue_peak_bytes <= 4096, "{m:?}");
    assert!(m.dropped > 0, "{m:?}");
    assert_eq!(m.published + m.dropped, 2000);
}

#[tokio::test]
async fn events_published_after_shutdown_go_nowhere() {
    let dir = TempDir::new("closed");
    let pipeline = EventPipeline::start(&file_config(all_types()), &dir.0).unwrap();
    let sink = pipeline.sink().unwrap();
    sink.publish(sample(0));
    let report = pipeline.shutdown().await;
    assert_eq!(report.metrics.delivered, 1);
    sink.publish(sample(1));
    assert_eq!(read_lines(&dir.0.join("out/events.jsonl")).len(), 1);
}

#[tokio::test]
async fn drops_are_counted_and_logged_once_per_interval() {
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let dir = TempDir::new("logged");
    let mut config = file_config(all_types());
    config.limits.memory_queue_bytes = 16; // smaller than any event
    let pipeline = EventPipeline::start(&config, &dir.0).unwrap();
    let sink = pipeline.sink().unwrap();
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..100 {
            sink.publish(sample(i));
        }
    });
    let m = pipeline.shutdown().await.metrics;
    assert_eq!(m.dropped, 100);
    assert_eq!(m.published, 0);
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("events dropped"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one line per 10 s, not one per event: {text}"
    );
    assert!(lines[0].contains("memory_queue_bytes"), "{}", lines[0]);
}

#[tokio::test]
async fn no_subscriptions_means_no_sink() {
    let dir = TempDir::new("none");
    let pipeline = EventPipeline::start(&EventsConfig::default(), &dir.0).unwrap();
    assert!(pipeline.sink().is_none());
    assert_eq!(pipeline.shutdown().await, ShutdownReport::default());
}

/// Publishes `sample(0)`, `sample(1)`, … from a thread, one every
/// `pace`, until stopped; event `i` has the id `ids[i]`.
pub(crate) struct Publisher {
    ids: Arc<std::sync::Mutex<Vec<String>>>,
    /// Events whose `publish` has returned.
    published: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Where a change fell among the published events: those below `lo`
/// were published before the call, those from `hi` on after it returned.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cut {
    pub(crate) lo: usize,
    pub(crate) hi: usize,
}

impl Publisher {
    pub(crate) fn start(sink: Arc<dyn EventSink>, pace: Duration) -> Publisher {
        use std::sync::atomic::Ordering;
        let ids = Arc::new(std::sync::Mutex::new(Vec::new()));
        let published = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (ids, published, stop) = (ids.clone(), published.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Acquire) {
                    let event = sample(i);
                    ids.lock().unwrap().push(event.event_id.clone());
                    sink.publish(event);
                    i += 1;
                    published.store(i, Ordering::Release);
                    std::thread::sleep(pace);
                }
            })
        };
        Publisher {
            ids,
            published,
            stop,
            thread: Some(thread),
        }
    }

    pub(crate) fn published(&self) -> usize {
        self.published.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until `n` more events have been published.
    pub(crate) fn wait_for_more(&self, n: usize) {
        let target = self.published() + n;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.published() < target {
            assert!(
                std::time::Instant::now() < deadline,
                "the publisher is stuck"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Runs `change` and says where it fell.
    pub(crate) fn around(&self, change: impl FnOnce()) -> Cut {
        let lo = self.published();
        change();
        // Event `published()` may have been mid-publish at the return;
        // the next one started after it.
        Cut {
            lo,
            hi: self.published() + 1,
        }
    }

    /// Stops; the ids of every event published, in order.
    pub(crate) fn stop(mut self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.take().unwrap().join().unwrap();
        self.ids.lock().unwrap().clone()
    }
}

/// Whether `got` (event indexes, in arrival order) is what a subscription
/// changed at `cuts` should have received of `n` published events: for
/// some point `c[k]` within each cut, the events from `c[k]` up to the
/// next point are taken where `phases[k]` says so, none before the first.
/// `ordered: false` compares as sets (Kafka partitions reorder); either
/// way nothing may come twice.
pub(crate) fn explained_by_cuts(
    n: usize,
    got: &[usize],
    cuts: &[Cut],
    phases: &[&dyn Fn(usize) -> bool],
    ordered: bool,
) -> bool {
    assert_eq!(cuts.len(), phases.len());
    let mut got = got.to_vec();
    if !ordered {
        got.sort_unstable();
    }
    fn search(
        n: usize,
        got: &[usize],
        cuts: &[Cut],
        phases: &[&dyn Fn(usize) -> bool],
        points: &mut Vec<usize>,
    ) -> bool {
        let k = points.len();
        if k == cuts.len() {
            let expected: Vec<usize> = (0..n)
                .filter(|&i| {
                    let phase = points.iter().rposition(|&c| i >= c);
                    phase.is_some_and(|p| phases[p](i))
                })
                .collect();
            return expected == got;
        }
        let from = cuts[k].lo.max(points.last().copied().unwrap_or(0));
        for c in from..=cuts[k].hi.min(n) {
            points.push(c);
            if search(n, got, cuts, phases, points) {
                return true;
            }
            points.pop();
        }
        false
    }
    search(n, &got, cuts, phases, &mut Vec::new())
}

/// Indexes of `ids` in `published` (which lists every event once).
pub(crate) fn indexes(published: &[String], ids: &[&str]) -> Vec<usize> {
    let at: BTreeMap<&str, usize> = published
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    ids.iter()
        .map(|id| {
            *at.get(id)
                .unwrap_or_else(|| panic!("{id} was never published"))
        })
        .collect()
}

#[test]
fn cuts_explain_exactly_what_they_should() {
    let cut = |lo, hi| Cut { lo, hi };
    let all: &dyn Fn(usize) -> bool = &|_| true;
    let even: &dyn Fn(usize) -> bool = &|i| i % 2 == 0;
    let none: &dyn Fn(usize) -> bool = &|_| false;
    let phases = [all, even, none];
    let cuts = [cut(2, 4), cut(6, 7), cut(9, 9)];
    // Cut points 3, 6, 9: 3 4 5 then 6 8 then nothing.
    assert!(explained_by_cuts(
        12,
        &[3, 4, 5, 6, 8],
        &cuts,
        &phases,
        true
    ));
    assert!(explained_by_cuts(12, &[4, 5, 6, 8], &cuts, &phases, true));
    assert!(explained_by_cuts(12, &[8, 6, 5, 4], &cuts, &phases, false));
    assert!(!explained_by_cuts(12, &[8, 6, 5, 4], &cuts, &phases, true));
    assert!(!explained_by_cuts(
        12,
        &[1, 2, 3, 4, 5, 6, 8],
        &cuts,
        &phases,
        true
    ));
    assert!(
        !explained_by_cuts(12, &[3, 5, 6, 8], &cuts, &phases, true),
        "a gap"
    );
    assert!(
        !explained_by_cuts(12, &[3, 4, 5, 6, 8, 8], &cuts, &phases, false),
        "twice"
    );
    assert!(
        !explained_by_cuts(12, &[3, 4, 5, 6, 8, 10], &cuts, &phases, true),
        "after removal"
    );
}

mod runtime;

#[cfg(feature = "kafka")]
mod kafka;
