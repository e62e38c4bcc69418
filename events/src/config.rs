//! Event subscriptions in the edge config, in two stages:
//! [`RawEventsConfig`] is the `[events]` table as written (unknown keys
//! refused, every field documented), [`EventsConfig`] the validated form.
//!
//! Modelled on ngrok's Event Subscription API: a subscription has
//! sources (an event type, an optional CEL filter and an optional field
//! selection, as ngrok's first Event Source objects had) and a
//! destination (ngrok's Event Destination `target`, which names exactly
//! one kind). Kafka and file destinations are Postern's own.
//!
//! Subscriptions set at run time (through the admin API) are
//! [`ApiSubscription`]s, ngrok's Event Subscription object as JSON; they
//! are validated by the same code, and errors name the field from the
//! object's root (`sources[0].filter`).

use std::{
    collections::BTreeSet,
    path::{Component, Path, PathBuf},
    time::Duration,
};

use postern_net::Secret;
use serde::{Deserialize, Serialize};

use crate::{EventType, FieldSelection, Filter};

/// `[events]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEventsConfig {
    /// How long shutdown waits for events still queued or spooled to be
    /// delivered. What is not delivered by then stays in the spool and is
    /// sent after the next start. Default `"5s"`.
    pub flush_timeout: Option<String>,
    /// Memory and disk bounds of the pipeline.
    #[serde(default)]
    pub limits: RawLimits,
    /// Where events go; none means events are not recorded.
    #[serde(default)]
    pub subscriptions: Vec<RawSubscription>,
}

/// `[events.limits]`. Past a limit new events are dropped, counted
/// (`events_dropped`) and logged; the request path never waits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Events the in-memory queue in front of the writer holds. Default 10000.
    pub memory_queue_events: Option<u64>,
    /// Bytes of serialised events the in-memory queue holds: an integer or a
    /// size like `"32MiB"`. Default 32 MiB.
    pub memory_queue_bytes: Option<ByteSize>,
    /// Undelivered events each Kafka subscription's spool holds. Default 250000.
    pub spool_events: Option<u64>,
    /// Bytes on disk each Kafka subscription's spool may use. Default 256 MiB.
    pub spool_bytes: Option<ByteSize>,
}

/// `[[events.subscriptions]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSubscription {
    /// Names the subscription in logs and metrics and its spool directory
    /// (`<data_dir>/events-spool/<id>`). Required and unique: letters,
    /// digits, `-`, `_`.
    pub id: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Which events, each with an optional filter and field selection.
    pub sources: Vec<RawSource>,
    /// Where they go.
    pub destination: RawDestination,
}

/// One event source of a subscription (ngrok's Event Source object).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// `http_request_complete.v0` or `tcp_connection_closed.v0`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// A CEL expression over `ev` (the event's `object`) that must be true
    /// for an event to be sent, e.g. `ev.conn.server_name == "a.example.com"`.
    /// Only `ev.conn.client_ip`, `ev.conn.server_ip`, `ev.conn.server_name`
    /// and `ev.conn.server_port` may be used, as in ngrok. Default: all events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Dotted paths under `object` to keep, e.g. `["conn.client_ip",
    /// "http.response.status_code"]`; naming an object keeps all of it.
    /// The envelope is always kept. Default: every field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<String>>,
}

/// A subscription's destination: exactly one of `kafka` and `file`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDestination {
    /// Produce to Kafka, through a spool on disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<RawKafka>,
    /// Append JSON lines to a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<RawFile>,
}

/// `destination.kafka`. Serialising it writes `sasl_password` as it is
/// (see [`Secret`]).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// Topic name; `{event_type}` is replaced by the event type, so the
    /// default `"postern.{event_type}"` gives one topic per type
    /// (`postern.http_request_complete.v0`, `postern.tcp_connection_closed.v0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// librdkafka `security.protocol`: `plaintext` (default), `ssl`,
    /// `sasl_plaintext` or `sasl_ssl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_protocol: Option<String>,
    /// librdkafka `ssl.ca.location`: PEM file of the CAs that sign the
    /// brokers' certificates. Default: the system's CA store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_ca_location: Option<PathBuf>,
    /// librdkafka `ssl.certificate.location`: PEM client certificate, for
    /// brokers that require one (with `ssl_key_location`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_certificate_location: Option<PathBuf>,
    /// librdkafka `ssl.key.location`: the client certificate's PEM private
    /// key, unencrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_key_location: Option<PathBuf>,
    /// librdkafka `sasl.mechanism`: `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<String>,
    /// librdkafka `sasl.username`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_username: Option<String>,
    /// librdkafka `sasl.password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_password: Option<Secret>,
    /// `lz4` (default), `gzip`, `snappy` or `none`: what the bundled
    /// librdkafka has built in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// librdkafka `linger.ms`: how long to wait to fill a batch. Default `"5ms"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linger: Option<String>,
}

/// `destination.file`
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    /// JSON lines file, appended to; a relative path is under the edge's
    /// `data_dir`. A subscription set through the admin API may only name
    /// a relative path without `..`.
    pub path: PathBuf,
}

/// An event subscription as the admin API takes and returns it: ngrok's
/// Event Subscription object (`id`, `description`, `metadata`, `sources`)
/// with the destination inline, in the same shape as
/// `[[events.subscriptions]]`:
///
/// ```json
/// {
///   "id": "traffic",
///   "description": "HTTP traffic of example.com",
///   "metadata": "{\"team\": \"web\"}",
///   "sources": [
///     {"type": "http_request_complete.v0",
///      "filter": "ev.conn.server_name.endsWith(\".example.com\")",
///      "fields": ["conn.client_ip", "http.response.status_code"]}
///   ],
///   "destination": {"kafka": {"brokers": ["kafka-1:9092"], "topic": "postern.{event_type}"}}
/// }
/// ```
///
/// Unknown keys are refused. [`ApiSubscription::validate`] checks it as the
/// edge config's subscriptions are checked; a validated [`Subscription`]
/// serialises back to this shape. Serialising writes `sasl_password` as it
/// is, so that the object can travel to the other nodes; answer API
/// clients with [`ApiSubscription::redacted`].
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSubscription {
    /// Letters, digits, `-`, `_`, at most 128; it names the spool
    /// directory (`<data_dir>/events-spool/<id>`).
    pub id: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Free text for the API's users (ngrok: arbitrary user-defined data,
    /// at most 4096 bytes).
    #[serde(default)]
    pub metadata: String,
    /// Which events, each with an optional filter and field selection.
    pub sources: Vec<RawSource>,
    /// Where they go: `{"kafka": {…}}` or `{"file": {"path": …}}`.
    pub destination: RawDestination,
}

/// ngrok's limit on an object's `metadata`.
const MAX_METADATA: usize = 4096;
/// An id names a directory.
const MAX_ID: usize = 128;

impl ApiSubscription {
    /// Validates as the edge config's subscriptions are validated; errors
    /// name the field from the object's root, e.g.
    /// `sources[0].filter: ERR_POSTERN_6013: …`. A file destination must
    /// be a relative path without `..` (it is under the data directory),
    /// outside `events-spool/`.
    pub fn validate(self) -> Result<Subscription, ConfigError> {
        if self.metadata.len() > MAX_METADATA {
            return Err(invalid(
                "metadata",
                format!("{} bytes; at most {MAX_METADATA}", self.metadata.len()),
            ));
        }
        if let Some(file) = &self.destination.file
            && !file.path.as_os_str().is_empty()
            && let Some(problem) = runtime_path_problem(&file.path)
        {
            return Err(invalid("destination.file.path", problem));
        }
        validate_subscription(
            "",
            self.id,
            self.description,
            self.metadata,
            self.sources,
            self.destination,
        )
    }

    /// The same object with `sasl_password` shown as `********`: what an
    /// answer to an API client may carry.
    pub fn redacted(mut self) -> ApiSubscription {
        if let Some(kafka) = &mut self.destination.kafka
            && kafka.sasl_password.is_some()
        {
            kafka.sasl_password = Some(Secret::new("********"));
        }
        self
    }
}

impl From<&Subscription> for ApiSubscription {
    fn from(sub: &Subscription) -> ApiSubscription {
        let sources = sub
            .sources
            .iter()
            .map(|source| RawSource {
                event_type: source.event_type.as_str().to_string(),
                filter: source.filter.as_ref().map(|f| f.source().to_string()),
                fields: source.fields.as_ref().map(FieldSelection::paths),
            })
            .collect();
        let destination = match &sub.destination {
            Destination::Kafka(k) => RawDestination {
                kafka: Some(RawKafka {
                    brokers: k.brokers.clone(),
                    topic: Some(k.topic.clone()),
                    security_protocol: k.security_protocol.clone(),
                    ssl_ca_location: k.tls.ca_location.clone(),
                    ssl_certificate_location: k.tls.certificate_location.clone(),
                    ssl_key_location: k.tls.key_location.clone(),
                    sasl_mechanism: k.sasl_mechanism.clone(),
                    sasl_username: k.sasl_username.clone(),
                    sasl_password: k.sasl_password.clone(),
                    compression: Some(k.compression.clone()),
                    linger: Some(humantime::format_duration(k.linger).to_string()),
                }),
                file: None,
            },
            Destination::File(f) => RawDestination {
                kafka: None,
                file: Some(RawFile {
                    path: f.path.clone(),
                }),
            },
        };
        ApiSubscription {
            id: sub.id.clone(),
            description: sub.description.clone(),
            metadata: sub.metadata.clone(),
            sources,
            destination,
        }
    }
}

/// As an [`ApiSubscription`], the secret included.
impl Serialize for Subscription {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ApiSubscription::from(self).serialize(s)
    }
}

/// The directory under the data directory that holds the Kafka spools,
/// one per subscription id.
pub(crate) const SPOOL_DIR: &str = "events-spool";

/// Why a subscription set at run time may not write to the file `path`:
/// it must stay under the data directory (relative, without `..` or a
/// root) and out of the spools there.
pub(crate) fn runtime_path_problem(path: &Path) -> Option<String> {
    let plain = !path.as_os_str().is_empty()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    let shown = path.display().to_string();
    if !plain {
        return Some(format!(
            "{shown:?}: a subscription set at run time writes under the data directory; \
             give a relative path without `..`"
        ));
    }
    let first = path
        .components()
        .find(|c| matches!(c, Component::Normal(_)));
    first
        .is_some_and(|c| c.as_os_str() == SPOOL_DIR)
        .then(|| format!("{shown:?}: {SPOOL_DIR}/ holds the Kafka spools"))
}

/// Why `id` cannot name a subscription (and its spool directory).
pub(crate) fn id_problem(id: &str) -> Option<String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    (!ok).then(|| {
        format!("{id:?} must be 1 to {MAX_ID} letters, digits, '-' and '_' (it names a directory)")
    })
}

/// A size in bytes: an integer, or a string like `"64KiB"`, `"32MiB"`, `"1GB"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => ByteSize::parse(&s).ok_or_else(|| {
                serde::de::Error::custom(format_args!(
                    "{s:?} is not a size like \"32MiB\" or 1048576"
                ))
            }),
        }
    }
}

impl ByteSize {
    pub fn parse(text: &str) -> Option<ByteSize> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().ok()?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1000,
            "kib" => 1 << 10,
            "mb" => 1000 * 1000,
            "mib" => 1 << 20,
            "gb" => 1000 * 1000 * 1000,
            "gib" => 1 << 30,
            _ => return None,
        };
        number.checked_mul(multiplier).map(ByteSize)
    }
}

/// Validated `[events]`.
#[derive(Clone, Debug)]
pub struct EventsConfig {
    pub flush_timeout: Duration,
    pub limits: Limits,
    pub subscriptions: Vec<Subscription>,
}

impl Default for EventsConfig {
    fn default() -> EventsConfig {
        EventsConfig {
            flush_timeout: Duration::from_secs(5),
            limits: Limits::default(),
            subscriptions: Vec::new(),
        }
    }
}

/// Validated `[events.limits]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub memory_queue_events: usize,
    pub memory_queue_bytes: u64,
    pub spool_events: u64,
    pub spool_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            memory_queue_events: 10_000,
            memory_queue_bytes: 32 << 20,
            spool_events: 250_000,
            spool_bytes: 256 << 20,
        }
    }
}

/// A validated subscription. Equal subscriptions have equal settings
/// (filters compare by their source text). It serialises as an
/// [`ApiSubscription`].
#[derive(Clone, Debug, PartialEq)]
pub struct Subscription {
    pub id: String,
    pub description: String,
    /// Set through the admin API; empty for the edge config's.
    pub metadata: String,
    pub sources: Vec<Source>,
    pub destination: Destination,
}

/// A validated event source.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    pub event_type: EventType,
    pub filter: Option<Filter>,
    pub fields: Option<FieldSelection>,
}

/// Where a subscription's events go.
#[derive(Clone, Debug, PartialEq)]
pub enum Destination {
    Kafka(KafkaDestination),
    File(FileDestination),
}

/// A validated Kafka destination.
#[derive(Clone, Debug, PartialEq)]
pub struct KafkaDestination {
    pub brokers: Vec<String>,
    pub topic: String,
    pub security_protocol: Option<String>,
    pub tls: Box<KafkaTls>,
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<Secret>,
    pub compression: String,
    pub linger: Duration,
}

/// TLS to the brokers (`security_protocol` `ssl` or `sasl_ssl`): the files
/// librdkafka reads, each checked to hold PEM of the right kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KafkaTls {
    pub ca_location: Option<PathBuf>,
    /// Client certificate and its key, both or neither.
    pub certificate_location: Option<PathBuf>,
    pub key_location: Option<PathBuf>,
}

impl KafkaTls {
    /// The `ssl_*` files: only with a TLS `security_protocol`, the
    /// certificate and key together, each a readable PEM file of its kind.
    fn check(self, field: &str, security_protocol: Option<&str>) -> Result<KafkaTls, ConfigError> {
        let files = [
            ("ssl_ca_location", &self.ca_location, "CERTIFICATE"),
            (
                "ssl_certificate_location",
                &self.certificate_location,
                "CERTIFICATE",
            ),
            ("ssl_key_location", &self.key_location, "PRIVATE KEY"),
        ];
        let uses_tls = matches!(security_protocol, Some("ssl" | "sasl_ssl"));
        for (name, path, kind) in files {
            let Some(path) = path else { continue };
            let at = format!("{field}.{name}");
            if !uses_tls {
                return Err(invalid(
                    at,
                    "TLS settings need security_protocol ssl or sasl_ssl",
                ));
            }
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid(&at, format!("cannot read {}: {e}", path.display())))?;
            let label = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("-----BEGIN "))
                .and_then(|l| l.strip_suffix("-----"));
            match label {
                Some(l) if l.contains("ENCRYPTED") => {
                    return Err(invalid(
                        at,
                        format!(
                            "{} holds an encrypted key; give it unencrypted",
                            path.display()
                        ),
                    ));
                }
                Some(l) if l.ends_with(kind) => {}
                _ => {
                    return Err(invalid(
                        at,
                        format!("{} holds no PEM {kind}", path.display()),
                    ));
                }
            }
        }
        if self.certificate_location.is_some() != self.key_location.is_some() {
            return Err(invalid(
                format!("{field}.ssl_key_location"),
                "ssl_certificate_location and ssl_key_location go together",
            ));
        }
        Ok(self)
    }
}

/// The default topic template.
pub const DEFAULT_TOPIC: &str = "postern.{event_type}";

/// `template` with `{event_type}` replaced.
pub fn topic_name(template: &str, event_type: EventType) -> String {
    template.replace("{event_type}", event_type.as_str())
}

impl KafkaDestination {
    /// The topic events of `event_type` go to.
    pub fn topic_for(&self, event_type: EventType) -> String {
        topic_name(&self.topic, event_type)
    }
}

/// A validated file destination.
#[derive(Clone, Debug, PartialEq)]
pub struct FileDestination {
    /// As configured; relative to the edge's `data_dir` when relative.
    pub path: PathBuf,
}

/// What is wrong with `[events]`; `field` is the path in the edge config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// ngrok's ERR_NGROK_238.
    #[error(
        "{field}: ERR_POSTERN_238: unknown event type {value:?}; Postern publishes {} (ngrok: ERR_NGROK_238)",
        known_types()
    )]
    UnknownEventType { field: String, value: String },
    /// ngrok's ERR_NGROK_239.
    #[error(
        "{field}: ERR_POSTERN_239: {path:?} is not a field of {event_type} (ngrok: ERR_NGROK_239)"
    )]
    UnknownField {
        field: String,
        path: String,
        event_type: EventType,
    },
    /// ngrok's ERR_NGROK_6013.
    #[error(
        "{field}: ERR_POSTERN_6013: the filter does not compile: {reason} (ngrok: ERR_NGROK_6013)"
    )]
    FilterCompile { field: String, reason: String },
    /// ngrok's ERR_NGROK_236.
    #[error(
        "{field}: ERR_POSTERN_236: a destination names exactly one of `kafka` and `file` (ngrok: ERR_NGROK_236)"
    )]
    Destination { field: String },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn known_types() -> String {
    EventType::ALL
        .iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(" and ")
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl RawEventsConfig {
    /// Validates; errors name the field as it is spelled in the edge config
    /// (`events.subscriptions[0].sources[1].filter`).
    pub fn validate(self) -> Result<EventsConfig, ConfigError> {
        let defaults = Limits::default();
        let flush_timeout = match &self.flush_timeout {
            None => Duration::from_secs(5),
            Some(v) => humantime::parse_duration(v).map_err(|_| {
                invalid(
                    "events.flush_timeout",
                    format!("{v:?} is not a duration like \"5s\""),
                )
            })?,
        };
        let l = &self.limits;
        let positive = |field: &str, v: Option<u64>, default: u64| match v {
            Some(0) => Err(invalid(
                format!("events.limits.{field}"),
                "must be at least 1",
            )),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let limits = Limits {
            memory_queue_events: positive(
                "memory_queue_events",
                l.memory_queue_events,
                defaults.memory_queue_events as u64,
            )? as usize,
            memory_queue_bytes: positive(
                "memory_queue_bytes",
                l.memory_queue_bytes.map(|b| b.0),
                defaults.memory_queue_bytes,
            )?,
            spool_events: positive("spool_events", l.spool_events, defaults.spool_events)?,
            spool_bytes: positive(
                "spool_bytes",
                l.spool_bytes.map(|b| b.0),
                defaults.spool_bytes,
            )?,
        };
        let mut ids = BTreeSet::new();
        let mut subscriptions = Vec::new();
        for (i, raw) in self.subscriptions.into_iter().enumerate() {
            let field = format!("events.subscriptions[{i}]");
            if let Some(problem) = id_problem(&raw.id) {
                return Err(invalid(format!("{field}.id"), problem));
            }
            if !ids.insert(raw.id.clone()) {
                return Err(invalid(
                    format!("{field}.id"),
                    format!("{:?} is used by another subscription", raw.id),
                ));
            }
            subscriptions.push(validate_subscription(
                &field,
                raw.id,
                raw.description,
                String::new(),
                raw.sources,
                raw.destination,
            )?);
        }
        Ok(EventsConfig {
            flush_timeout,
            limits,
            subscriptions,
        })
    }
}

/// `field` under `prefix`, or alone at the root.
fn under(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

/// One subscription, from the edge config (`field` is
/// `events.subscriptions[i]`) or the admin API (`field` is empty).
fn validate_subscription(
    field: &str,
    id: String,
    description: String,
    metadata: String,
    raw_sources: Vec<RawSource>,
    raw_destination: RawDestination,
) -> Result<Subscription, ConfigError> {
    if let Some(problem) = id_problem(&id) {
        return Err(invalid(under(field, "id"), problem));
    }
    if raw_sources.is_empty() {
        return Err(invalid(
            under(field, "sources"),
            "name at least one event type",
        ));
    }
    let mut seen = BTreeSet::new();
    let mut sources = Vec::new();
    for (j, raw) in raw_sources.into_iter().enumerate() {
        let field = under(field, &format!("sources[{j}]"));
        let event_type =
            EventType::parse(&raw.event_type).ok_or_else(|| ConfigError::UnknownEventType {
                field: format!("{field}.type"),
                value: raw.event_type.clone(),
            })?;
        if !seen.insert(event_type) {
            return Err(invalid(
                format!("{field}.type"),
                format!("{event_type} is named twice in this subscription"),
            ));
        }
        let filter = raw
            .filter
            .map(|f| {
                Filter::compile(&f).map_err(|e| ConfigError::FilterCompile {
                    field: format!("{field}.filter"),
                    reason: e.to_string(),
                })
            })
            .transpose()?;
        let fields = raw
            .fields
            .map(|paths| {
                FieldSelection::new(event_type, &paths).map_err(|path| ConfigError::UnknownField {
                    field: format!("{field}.fields"),
                    path,
                    event_type,
                })
            })
            .transpose()?;
        sources.push(Source {
            event_type,
            filter,
            fields,
        });
    }
    let field = under(field, "destination");
    let destination = match (raw_destination.kafka, raw_destination.file) {
        (Some(kafka), None) => Destination::Kafka(kafka.validate(&format!("{field}.kafka"))?),
        (None, Some(file)) => {
            if file.path.as_os_str().is_empty() {
                return Err(invalid(format!("{field}.file.path"), "must not be empty"));
            }
            Destination::File(FileDestination { path: file.path })
        }
        _ => return Err(ConfigError::Destination { field }),
    };
    Ok(Subscription {
        id,
        description,
        metadata,
        sources,
        destination,
    })
}

impl RawKafka {
    fn validate(self, field: &str) -> Result<KafkaDestination, ConfigError> {
        check_brokers(field, &self.brokers)?;
        let topic = kafka_topic(field, self.topic)?;
        let security_protocol = security_protocol(field, self.security_protocol)?;
        let tls = Box::new(
            KafkaTls {
                ca_location: self.ssl_ca_location,
                certificate_location: self.ssl_certificate_location,
                key_location: self.ssl_key_location,
            }
            .check(field, security_protocol.as_deref())?,
        );
        let sasl_mechanism = sasl_mechanism(field, self.sasl_mechanism)?;
        let uses_sasl = security_protocol
            .as_deref()
            .is_some_and(|p| p.starts_with("sasl_"));
        let has_sasl_settings = sasl_mechanism.is_some()
            || self.sasl_username.is_some()
            || self.sasl_password.is_some();
        if has_sasl_settings && !uses_sasl {
            return Err(invalid(
                format!("{field}.security_protocol"),
                "SASL settings need security_protocol sasl_plaintext or sasl_ssl",
            ));
        }
        if self.sasl_username.is_some() != self.sasl_password.is_some() {
            return Err(invalid(
                format!("{field}.sasl_password"),
                "sasl_username and sasl_password go together",
            ));
        }
        let compression = compression(field, self.compression)?;
        let linger = linger(field, self.linger.as_deref())?;
        if !cfg!(feature = "kafka") {
            return Err(invalid(
                field,
                "this build has no Kafka support (postern-events feature `kafka`)",
            ));
        }
        Ok(KafkaDestination {
            brokers: self.brokers,
            topic,
            security_protocol,
            tls,
            sasl_mechanism,
            sasl_username: self.sasl_username,
            sasl_password: self.sasl_password,
            compression,
            linger,
        })
    }
}

/// At least one broker, each `host:port`.
fn check_brokers(field: &str, brokers: &[String]) -> Result<(), ConfigError> {
    if brokers.is_empty() {
        return Err(invalid(
            format!("{field}.brokers"),
            "name at least one broker, host:port",
        ));
    }
    for broker in brokers {
        let ok = broker
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            return Err(invalid(
                format!("{field}.brokers"),
                format!("{broker:?} is not host:port"),
            ));
        }
    }
    Ok(())
}

/// The topic (default [`DEFAULT_TOPIC`]), which must make a legal Kafka
/// topic name for every event type.
fn kafka_topic(field: &str, topic: Option<String>) -> Result<String, ConfigError> {
    let topic = topic.unwrap_or_else(|| DEFAULT_TOPIC.to_string());
    for t in EventType::ALL {
        let name = topic_name(&topic, t);
        let legal = !name.is_empty()
            && name.len() <= 249
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !legal {
            return Err(invalid(
                format!("{field}.topic"),
                format!(
                    "{name:?} is not a Kafka topic name (letters, digits, '.', '_', '-'; at most 249)"
                ),
            ));
        }
    }
    Ok(topic)
}

/// One of `allowed`, compared in the case `normalise` gives it.
fn one_of(
    field: String,
    value: Option<String>,
    normalise: fn(&str) -> String,
    allowed: &[&str],
    listed: &str,
) -> Result<Option<String>, ConfigError> {
    value
        .map(|v| {
            let v = normalise(&v);
            if allowed.contains(&v.as_str()) {
                Ok(v)
            } else {
                Err(invalid(field, format!("{v:?} is not one of {listed}")))
            }
        })
        .transpose()
}

/// `security_protocol`, lower case.
fn security_protocol(field: &str, value: Option<String>) -> Result<Option<String>, ConfigError> {
    one_of(
        format!("{field}.security_protocol"),
        value,
        str::to_ascii_lowercase,
        &["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"],
        "plaintext, ssl, sasl_plaintext, sasl_ssl",
    )
}

/// `sasl_mechanism`, upper case.
fn sasl_mechanism(field: &str, value: Option<String>) -> Result<Option<String>, ConfigError> {
    one_of(
        format!("{field}.sasl_mechanism"),
        value,
        str::to_ascii_uppercase,
        &[
            "PLAIN",
            "SCRAM-SHA-256",
            "SCRAM-SHA-512",
            "GSSAPI",
            "OAUTHBEARER",
        ],
        "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, GSSAPI, OAUTHBEARER",
    )
}

/// `compression`, lower case, `lz4` by default.
fn compression(field: &str, value: Option<String>) -> Result<String, ConfigError> {
    let compression = value
        .map(|c| c.to_ascii_lowercase())
        .unwrap_or_else(|| "lz4".into());
    if !matches!(compression.as_str(), "none" | "gzip" | "snappy" | "lz4") {
        return Err(invalid(
            format!("{field}.compression"),
            format!("{compression:?} is not one of lz4, gzip, snappy, none (zstd is not built in)"),
        ));
    }
    Ok(compression)
}

/// `linger`, 5 ms by default.
fn linger(field: &str, value: Option<&str>) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(Duration::from_millis(5)),
        Some(v) => humantime::parse_duration(v).map_err(|_| {
            invalid(
                format!("{field}.linger"),
                format!("{v:?} is not a duration like \"5ms\""),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<EventsConfig, String> {
        #[derive(Deserialize)]
        struct Root {
            events: RawEventsConfig,
        }
        let root: Root = toml_like(text)?;
        root.events.validate().map_err(|e| e.to_string())
    }

    /// The edge reads TOML; these tests write the same structure as JSON
    /// to keep this crate free of a TOML dependency.
    fn toml_like<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    const KAFKA: &str = r#""destination": {"kafka": {"brokers": ["127.0.0.1:9092"]}}"#;
    const FILE: &str = r#""destination": {"file": {"path": "events.jsonl"}}"#;

    #[test]
    fn defaults() {
        let c = parse(&format!(
            r#"{{"events": {{"subscriptions": [{{"id": "all", "sources": [{{"type": "http_request_complete.v0"}}, {{"type": "tcp_connection_closed.v0"}}], {FILE}}}]}}}}"#
        ))
        .unwrap();
        assert_eq!(c.flush_timeout, Duration::from_secs(5));
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.subscriptions[0].sources.len(), 2);
        assert!(matches!(
            &c.subscriptions[0].destination,
            Destination::File(f) if f.path == std::path::Path::new("events.jsonl")
        ));
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn kafka_defaults() {
        let c = parse(&format!(
            r#"{{"events": {{"subscriptions": [{{"id": "all", "sources": [{{"type": "http_request_complete.v0"}}], {KAFKA}}}]}}}}"#
        ))
        .unwrap();
        let Destination::Kafka(k) = &c.subscriptions[0].destination else {
            panic!("kafka")
        };
        assert_eq!(
            k.topic_for(EventType::HttpRequestComplete),
            "postern.http_request_complete.v0"
        );
        assert_eq!(k.compression, "lz4");
        assert_eq!(k.linger, Duration::from_millis(5));
    }

    #[test]
    fn errors_name_the_field_and_the_ngrok_code() {
        let sub = |source: &str, dest: &str| {
            format!(
                r#"{{"events": {{"subscriptions": [{{"id": "s", "sources": [{source}], {dest}}}]}}}}"#
            )
        };
        let cases = [
            (
                sub(r#"{"type": "http_request_started.v0"}"#, KAFKA),
                "events.subscriptions[0].sources[0].type: ERR_POSTERN_238",
            ),
            (
                sub(
                    r#"{"type": "tcp_connection_closed.v0", "fields": ["http.request.method"]}"#,
                    KAFKA,
                ),
                "events.subscriptions[0].sources[0].fields: ERR_POSTERN_239",
            ),
            (
                sub(
                    r#"{"type": "http_request_complete.v0", "filter": "ev.conn.server_name =="}"#,
                    KAFKA,
                ),
                "events.subscriptions[0].sources[0].filter: ERR_POSTERN_6013",
            ),
            (
                sub(
                    r#"{"type": "http_request_complete.v0", "filter": "ev.http.request.method == 'GET'"}"#,
                    KAFKA,
                ),
                "not filterable",
            ),
            (
                sub(
                    r#"{"type": "http_request_complete.v0"}"#,
                    r#""destination": {}"#,
                ),
                "events.subscriptions[0].destination: ERR_POSTERN_236",
            ),
            (
                sub(
                    r#"{"type": "http_request_complete.v0"}"#,
                    r#""destination": {"kafka": {"brokers": ["nohost"]}}"#,
                ),
                "events.subscriptions[0].destination.kafka.brokers",
            ),
            (
                sub(
                    r#"{"type": "http_request_complete.v0"}"#,
                    r#""destination": {"kafka": {"brokers": ["h:1"], "topic": "bad topic"}}"#,
                ),
                "destination.kafka.topic",
            ),
            (
                sub(
                    r#"{"type": "http_request_complete.v0"}"#,
                    r#""destination": {"kafka": {"brokers": ["h:1"], "sasl_username": "u", "sasl_password": "p"}}"#,
                ),
                "destination.kafka.security_protocol",
            ),
            (
                sub(
                    r#"{"type": "http_request_complete.v0"}"#,
                    r#""destination": {"kafka": {"brokers": ["h:1"], "compression": "zstd"}}"#,
                ),
                "destination.kafka.compression",
            ),
            (
                r#"{"events": {"flush_timeout": "soon"}}"#.to_string(),
                "events.flush_timeout",
            ),
            (
                r#"{"events": {"limits": {"spool_bytes": "12 parsecs"}}}"#.to_string(),
                "parsecs",
            ),
        ];
        for (text, want) in cases {
            let err = parse(&text).expect_err(&text);
            assert!(err.contains(want), "{want:?} not in: {err}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("32MiB"), Some(ByteSize(32 << 20)));
        assert_eq!(ByteSize::parse("64 KiB"), Some(ByteSize(64 << 10)));
        assert_eq!(ByteSize::parse("1GB"), Some(ByteSize(1_000_000_000)));
        assert_eq!(ByteSize::parse("4096"), Some(ByteSize(4096)));
        assert_eq!(ByteSize::parse("lots"), None);
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn tls_files_are_checked_and_errors_name_the_field() {
        let dir = std::env::temp_dir().join(format!("postern-kafka-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let cert = file(
            "c.pem",
            "-----BEGIN CERTIFICATE-----\nMII=\n-----END CERTIFICATE-----\n",
        );
        let key = file(
            "k.pem",
            "-----BEGIN PRIVATE KEY-----\nMII=\n-----END PRIVATE KEY-----\n",
        );
        let sealed = file(
            "e.pem",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMII=\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        let missing = dir.join("none.pem").display().to_string();
        let kafka = |protocol: &str, tls: &str| {
            format!(
                r#"{{"events": {{"subscriptions": [{{"id": "s", "sources": [{{"type": "http_request_complete.v0"}}], "destination": {{"kafka": {{"brokers": ["h:1"], "security_protocol": "{protocol}"{tls}}}}}}}]}}}}"#
            )
        };
        let ok = parse(&kafka(
            "ssl",
            &format!(r#", "ssl_ca_location": "{cert}", "ssl_certificate_location": "{cert}", "ssl_key_location": "{key}""#),
        ))
        .unwrap();
        let Destination::Kafka(k) = &ok.subscriptions[0].destination else {
            panic!("a Kafka destination")
        };
        assert_eq!(
            k.tls.key_location.as_ref().unwrap().display().to_string(),
            key
        );
        let cases = [
            (
                kafka(
                    "sasl_plaintext",
                    &format!(r#", "ssl_ca_location": "{cert}""#),
                ),
                "kafka.ssl_ca_location: ",
                "need security_protocol ssl or sasl_ssl",
            ),
            (
                kafka("ssl", &format!(r#", "ssl_ca_location": "{missing}""#)),
                "kafka.ssl_ca_location: ",
                "cannot read",
            ),
            (
                kafka("ssl", &format!(r#", "ssl_ca_location": "{key}""#)),
                "kafka.ssl_ca_location: ",
                "no PEM CERTIFICATE",
            ),
            (
                kafka(
                    "sasl_ssl",
                    &format!(r#", "ssl_certificate_location": "{cert}""#),
                ),
                "kafka.ssl_key_location: ",
                "go together",
            ),
            (
                kafka(
                    "ssl",
                    &format!(
                        r#", "ssl_certificate_location": "{cert}", "ssl_key_location": "{cert}""#
                    ),
                ),
                "kafka.ssl_key_location: ",
                "no PEM PRIVATE KEY",
            ),
            (
                kafka(
                    "ssl",
                    &format!(
                        r#", "ssl_certificate_location": "{cert}", "ssl_key_location": "{sealed}""#
                    ),
                ),
                "kafka.ssl_key_location: ",
                "encrypted",
            ),
        ];
        for (text, field, reason) in cases {
            let err = parse(&text).expect_err(&text);
            assert!(
                err.contains(field) && err.contains(reason),
                "{field}{reason:?} not in: {err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn sasl_settings_pass_through_and_the_password_never_prints() {
        let c = parse(
            r#"{"events": {"subscriptions": [{"id": "s", "sources": [{"type": "http_request_complete.v0"}], "destination": {"kafka": {"brokers": ["h:1"], "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "plain", "sasl_username": "u", "sasl_password": "hunter2"}}}]}}"#,
        )
        .unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("********"));
        let Destination::Kafka(k) = &c.subscriptions[0].destination else {
            panic!("kafka")
        };
        assert_eq!(k.security_protocol.as_deref(), Some("sasl_plaintext"));
        assert_eq!(k.sasl_mechanism.as_deref(), Some("PLAIN"));
        assert_eq!(k.sasl_password.as_ref().unwrap().expose(), "hunter2");
    }

    #[test]
    fn duplicate_ids_and_types_are_refused() {
        let text = format!(
            r#"{{"events": {{"subscriptions": [{{"id": "s", "sources": [{{"type": "http_request_complete.v0"}}], {FILE}}}, {{"id": "s", "sources": [{{"type": "http_request_complete.v0"}}], {FILE}}}]}}}}"#
        );
        assert!(
            parse(&text)
                .unwrap_err()
                .contains("events.subscriptions[1].id")
        );
        let text = format!(
            r#"{{"events": {{"subscriptions": [{{"id": "s", "sources": [{{"type": "http_request_complete.v0"}}, {{"type": "http_request_complete.v0"}}], {FILE}}}]}}}}"#
        );
        assert!(
            parse(&text)
                .unwrap_err()
                .contains("events.subscriptions[0].sources[1].type")
        );
    }
}
