//! Runtime subscriptions ([`EventPipeline::set_runtime_subscriptions`])
//! with file destinations, while events flow: what each subscription
//! receives must be explained by where the changes fell among the
//! published events ([`Publisher::around`], [`explained_by_cuts`]). And
//! [`ApiSubscription`], the JSON object they arrive as.

use std::path::Path;

use serde_json::json;

use super::*;

/// Slow enough that a change falls between a few events, fast enough
/// that each phase sees dozens.
const PACE: Duration = Duration::from_micros(300);

fn source(event_type: EventType, filter: Option<&str>, fields: Option<&[&str]>) -> Source {
    Source {
        event_type,
        filter: filter.map(|f| Filter::compile(f).unwrap()),
        fields: fields.map(|paths| {
            let paths: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
            FieldSelection::new(event_type, &paths).unwrap()
        }),
    }
}

fn file_sub(id: &str, path: impl Into<PathBuf>, sources: Vec<Source>) -> Subscription {
    Subscription {
        id: id.into(),
        description: String::new(),
        metadata: String::new(),
        sources,
        destination: Destination::File(FileDestination { path: path.into() }),
    }
}

/// The lines of a JSON-lines file; none when it does not exist.
fn lines_of(path: &Path) -> Vec<Value> {
    if path.exists() {
        read_lines(path)
    } else {
        Vec::new()
    }
}

/// The indexes (in `published`) of the events in a JSON-lines file, in
/// file order.
fn got(published: &[String], path: &Path) -> Vec<usize> {
    let lines = lines_of(path);
    let ids: Vec<&str> = lines
        .iter()
        .map(|v| v["event_id"].as_str().unwrap())
        .collect();
    indexes(published, &ids)
}

const HTTP: EventType = EventType::HttpRequestComplete;
const TCP: EventType = EventType::TcpConnectionClosed;
const H0: &str = r#"ev.conn.server_name == "h0.example.test""#;

#[tokio::test]
async fn a_runtime_subscription_starts_with_the_call_and_stops_with_its_removal() {
    let dir = TempDir::new("rt-add");
    // No subscriptions at all: the writer starts with the first one.
    let pipeline = EventPipeline::start(&EventsConfig::default(), &dir.0).unwrap();
    assert!(pipeline.sink().is_none());
    let publisher = Publisher::start(pipeline.publisher(), PACE);
    publisher.wait_for_more(20);
    let sub = file_sub("rt", "rt/events.jsonl", all_types());
    let added = publisher.around(|| {
        pipeline
            .set_runtime_subscriptions(vec![sub.clone()])
            .unwrap()
    });
    assert_eq!(pipeline.runtime_subscriptions(), vec![sub.clone()]);
    assert!(pipeline.sink().is_some());
    let ids: Vec<String> = pipeline
        .subscription_metrics()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, ["rt"]);
    publisher.wait_for_more(60);
    let removed = publisher.around(|| pipeline.set_runtime_subscriptions(Vec::new()).unwrap());
    // Removal flushed and closed the file: its count is final, and kept
    // in the totals.
    let delivered = pipeline.metrics().delivered;
    publisher.wait_for_more(20);
    let published = publisher.stop();
    assert!(pipeline.runtime_subscriptions().is_empty());
    assert!(pipeline.subscription_metrics().is_empty());
    let report = pipeline.shutdown().await;
    assert_eq!(report.metrics.delivered, delivered, "{report:?}");

    let path = dir.0.join("rt/events.jsonl");
    assert!(path.exists(), "a removed subscription's file stays");
    let got = got(&published, &path);
    assert_eq!(got.len() as u64, delivered);
    assert!(got.len() >= 60, "{got:?}");
    let all: &dyn Fn(usize) -> bool = &|_| true;
    let none: &dyn Fn(usize) -> bool = &|_| false;
    assert!(
        explained_by_cuts(published.len(), &got, &[added, removed], &[all, none], true),
        "added at {added:?}, removed at {removed:?}: {got:?}"
    );
    for v in lines_of(&path).iter().take(4) {
        assert_valid(v);
    }
}

#[tokio::test]
async fn changed_sources_apply_from_the_call_on_and_equal_settings_keep_running() {
    let dir = TempDir::new("rt-change");
    // The edge config's subscription takes everything throughout.
    let pipeline = EventPipeline::start(&file_config(all_types()), &dir.0).unwrap();
    let rt = |sources| file_sub("rt", "rt.jsonl", sources);
    let http_only = rt(vec![source(HTTP, None, None)]);
    let h0_and_tcp = rt(vec![source(HTTP, Some(H0), None), source(TCP, None, None)]);
    let h0_selected_and_tcp = rt(vec![
        source(HTTP, Some(H0), Some(&["conn.server_name"])),
        source(TCP, None, None),
    ]);
    pipeline
        .set_runtime_subscriptions(vec![http_only.clone()])
        .unwrap();
    let from_start = Cut { lo: 0, hi: 0 };

    let publisher = Publisher::start(pipeline.publisher(), PACE);
    publisher.wait_for_more(40);
    let again = publisher.around(|| {
        pipeline
            .set_runtime_subscriptions(vec![http_only.clone()])
            .unwrap()
    });
    publisher.wait_for_more(40);
    let filtered = publisher.around(|| {
        pipeline
            .set_runtime_subscriptions(vec![h0_and_tcp.clone()])
            .unwrap()
    });
    assert_eq!(pipeline.runtime_subscriptions(), vec![h0_and_tcp.clone()]);
    publisher.wait_for_more(60);
    let selected = publisher.around(|| {
        pipeline
            .set_runtime_subscriptions(vec![h0_selected_and_tcp.clone()])
            .unwrap()
    });
    publisher.wait_for_more(60);
    let removed = publisher.around(|| pipeline.set_runtime_subscriptions(Vec::new()).unwrap());
    publisher.wait_for_more(20);
    let published = publisher.stop();
    let report = pipeline.shutdown().await;
    assert_eq!(report.metrics.dropped, 0, "{report:?}");
    let n = published.len();

    let config_got = got(&published, &dir.0.join("out/events.jsonl"));
    assert_eq!(
        config_got,
        (0..n).collect::<Vec<_>>(),
        "the edge config's subscription is untouched"
    );

    let path = dir.0.join("rt.jsonl");
    let got = got(&published, &path);
    let http: &dyn Fn(usize) -> bool = &|i| i % 2 == 0;
    let h0_or_tcp: &dyn Fn(usize) -> bool = &|i| i % 4 == 0 || i % 2 == 1;
    let none: &dyn Fn(usize) -> bool = &|_| false;
    let cuts = [from_start, again, filtered, selected, removed];
    assert!(
        explained_by_cuts(
            n,
            &got,
            &cuts,
            &[http, http, h0_or_tcp, h0_or_tcp, none],
            true
        ),
        "cuts {cuts:?}: {got:?}"
    );
    assert!(got.iter().filter(|&&i| i % 2 == 1).count() >= 40, "{got:?}");

    // The field selection: HTTP events before the change whole, after it
    // pruned; TCP events whole throughout.
    let mut pruned = 0;
    for (v, i) in lines_of(&path).iter().zip(&got) {
        if v["event_type"] != HTTP_REQUEST_COMPLETE {
            assert!(v["object"]["conn"]["bytes_in"].is_u64(), "{v}");
        } else if *i < selected.lo {
            assert!(v["object"]["http"].is_object(), "{i}: {v}");
        } else if *i >= selected.hi {
            assert_eq!(
                v["object"],
                json!({"conn": {"server_name": "h0.example.test"}}),
                "{i}"
            );
            pruned += 1;
        }
    }
    assert!(pruned >= 5, "{pruned} pruned events");
}

#[tokio::test]
async fn a_new_destination_takes_over_at_the_call() {
    let dir = TempDir::new("rt-move");
    let pipeline = EventPipeline::start(&EventsConfig::default(), &dir.0).unwrap();
    pipeline
        .set_runtime_subscriptions(vec![file_sub("rt", "a.jsonl", all_types())])
        .unwrap();
    let publisher = Publisher::start(pipeline.publisher(), PACE);
    publisher.wait_for_more(50);
    let moved = publisher.around(|| {
        pipeline
            .set_runtime_subscriptions(vec![file_sub("rt", "b/b.jsonl", all_types())])
            .unwrap()
    });
    publisher.wait_for_more(50);
    let removed = publisher.around(|| pipeline.set_runtime_subscriptions(Vec::new()).unwrap());
    publisher.wait_for_more(10);
    let published = publisher.stop();
    let delivered = pipeline.shutdown().await.metrics.delivered;

    let a = got(&published, &dir.0.join("a.jsonl"));
    let b = got(&published, &dir.0.join("b/b.jsonl"));
    assert!(a.len() >= 50 && b.len() >= 50, "{a:?} {b:?}");
    assert!(a.iter().all(|&i| i < moved.hi), "{moved:?}: {a:?}");
    assert!(b.iter().all(|&i| i >= moved.lo), "{moved:?}: {b:?}");
    // Together: every event from the start to the removal, once, in order.
    let both: Vec<usize> = a.iter().chain(&b).copied().collect();
    assert_eq!(both.len() as u64, delivered, "one subscription's counters");
    let all: &dyn Fn(usize) -> bool = &|_| true;
    let none: &dyn Fn(usize) -> bool = &|_| false;
    assert!(
        explained_by_cuts(
            published.len(),
            &both,
            &[Cut { lo: 0, hi: 0 }, removed],
            &[all, none],
            true
        ),
        "moved at {moved:?}, removed at {removed:?}: {a:?} then {b:?}"
    );
}

#[tokio::test]
async fn a_refused_change_changes_nothing() {
    let dir = TempDir::new("rt-refused");
    // The edge config has subscription "file".
    let pipeline = EventPipeline::start(&file_config(all_types()), &dir.0).unwrap();
    let rt = file_sub("rt", "rt.jsonl", vec![source(HTTP, None, None)]);
    pipeline
        .set_runtime_subscriptions(vec![rt.clone()])
        .unwrap();
    let tcp_rt = file_sub("rt", "rt.jsonl", vec![source(TCP, None, None)]);
    let z = file_sub("z", "z/z.jsonl", all_types());
    std::fs::write(dir.0.join("blocker"), "not a directory").unwrap();
    let outside = dir.0.join("outside.jsonl");

    type Check = Box<dyn Fn(&EventsError) -> bool>;
    let invalid = |want: &'static str, part: &'static str| -> Check {
        Box::new(
            move |e| matches!(e, EventsError::Invalid { id, reason } if id == want && reason.contains(part)),
        )
    };
    let cases: Vec<(&str, Vec<Subscription>, Check)> = vec![
        (
            "an id of the edge config",
            vec![tcp_rt.clone(), file_sub("file", "x.jsonl", all_types())],
            Box::new(|e| matches!(e, EventsError::IdInConfig { id } if id == "file")),
        ),
        (
            "an id twice",
            vec![
                tcp_rt.clone(),
                z.clone(),
                file_sub("z", "z2.jsonl", all_types()),
            ],
            Box::new(|e| matches!(e, EventsError::DuplicateId { id } if id == "z")),
        ),
        (
            "an absolute path",
            vec![tcp_rt.clone(), file_sub("abs", &outside, all_types())],
            invalid("abs", "relative path"),
        ),
        (
            "a path with ..",
            vec![
                tcp_rt.clone(),
                file_sub("up", "sub/../../outside.jsonl", all_types()),
            ],
            invalid("up", "relative path"),
        ),
        (
            "a path into the spools",
            vec![
                tcp_rt.clone(),
                file_sub("spool", "./events-spool/other/0.seg", all_types()),
            ],
            invalid("spool", "events-spool"),
        ),
        (
            "an id that cannot name a directory",
            vec![tcp_rt.clone(), file_sub("../x", "x.jsonl", all_types())],
            invalid("../x", "names a directory"),
        ),
        (
            "a file that cannot be opened, after others that could",
            vec![
                tcp_rt.clone(),
                z.clone(),
                file_sub("y", "blocker/y.jsonl", all_types()),
            ],
            Box::new(|e| matches!(e, EventsError::File { id, .. } if id == "y")),
        ),
    ];
    for (what, subs, check) in cases {
        let err = pipeline.set_runtime_subscriptions(subs).unwrap_err();
        assert!(check(&err), "{what}: {err:?}");
        assert_eq!(pipeline.runtime_subscriptions(), vec![rt.clone()], "{what}");
        let ids: Vec<String> = pipeline
            .subscription_metrics()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, ["file", "rt"], "{what}");
    }
    // Still the old set: rt takes HTTP only; then a valid change applies.
    let sink = pipeline.publisher();
    let events: Vec<Event> = (0..40).map(sample).collect();
    for e in &events[..20] {
        sink.publish(e.clone());
    }
    pipeline
        .set_runtime_subscriptions(vec![tcp_rt.clone()])
        .unwrap();
    for e in &events[20..] {
        sink.publish(e.clone());
    }
    pipeline.shutdown().await;
    let published: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
    let want: Vec<usize> = (0..20)
        .filter(|i| i % 2 == 0)
        .chain((20..40).filter(|i| i % 2 == 1))
        .collect();
    assert_eq!(got(&published, &dir.0.join("rt.jsonl")), want);
    assert!(lines_of(&dir.0.join("z/z.jsonl")).is_empty());
    assert!(!outside.exists());
    assert!(!dir.0.join("x.jsonl").exists());
}

#[tokio::test]
async fn the_handle_sets_until_shutdown_and_then_answers_stopped() {
    let dir = TempDir::new("rt-stopped");
    let pipeline = EventPipeline::start(&file_config(all_types()), &dir.0).unwrap();
    let handle = pipeline.runtime_handle();
    let rt = file_sub("rt", "rt.jsonl", all_types());
    let set = {
        let (handle, rt) = (handle.clone(), rt.clone());
        tokio::task::spawn_blocking(move || handle.set(vec![rt]))
    };
    set.await.unwrap().unwrap();
    assert_eq!(handle.current(), vec![rt.clone()]);
    let sink = pipeline.publisher();
    for i in 0..30 {
        sink.publish(sample(i));
    }
    let report = pipeline.shutdown().await;
    assert_eq!(report.metrics.delivered, 60, "{report:?}");
    assert_eq!(
        read_lines(&dir.0.join("rt.jsonl")).len(),
        30,
        "what was queued for it is written at shutdown"
    );
    assert!(matches!(handle.set(Vec::new()), Err(EventsError::Stopped)));
    assert!(matches!(
        handle.set(vec![file_sub("other", "other.jsonl", all_types())]),
        Err(EventsError::Stopped)
    ));
    assert!(!dir.0.join("other.jsonl").exists());

    // Dropped without shutdown: the same.
    let pipeline = EventPipeline::start(&EventsConfig::default(), &dir.0).unwrap();
    let handle = pipeline.runtime_handle();
    drop(pipeline);
    assert!(matches!(handle.set(vec![rt]), Err(EventsError::Stopped)));
}

/// The admin API's example, with a file destination.
fn api_json() -> Value {
    json!({
        "id": "traffic",
        "description": "HTTP traffic of example.com",
        "metadata": "{\"team\": \"web\"}",
        "sources": [
            {"type": "http_request_complete.v0",
             "filter": "ev.conn.server_name.endsWith(\".example.com\")",
             "fields": ["conn.client_ip", "http.response.status_code"]},
            {"type": "tcp_connection_closed.v0"}
        ],
        "destination": {"file": {"path": "events/traffic.jsonl"}}
    })
}

#[test]
fn an_api_subscription_round_trips_through_json() {
    let json = api_json();
    let api: ApiSubscription = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(serde_json::to_value(&api).unwrap(), json);
    let sub = api.clone().validate().unwrap();
    assert_eq!(sub.metadata, "{\"team\": \"web\"}");
    assert_eq!(serde_json::to_value(&sub).unwrap(), json);
    assert_eq!(ApiSubscription::from(&sub), api);
    let back: ApiSubscription =
        serde_json::from_value(serde_json::to_value(&sub).unwrap()).unwrap();
    assert_eq!(back.validate().unwrap(), sub);

    let minimal: ApiSubscription = serde_json::from_value(json!({
        "id": "m",
        "sources": [{"type": "tcp_connection_closed.v0"}],
        "destination": {"file": {"path": "m.jsonl"}}
    }))
    .unwrap();
    let sub = minimal.validate().unwrap();
    assert_eq!((sub.description.as_str(), sub.metadata.as_str()), ("", ""));
}

#[cfg(feature = "kafka")]
#[test]
fn a_kafka_api_subscription_serialises_with_its_defaults_filled_in() {
    let api: ApiSubscription = serde_json::from_value(json!({
        "id": "k",
        "sources": [{"type": "http_request_complete.v0"}],
        "destination": {"kafka": {"brokers": ["kafka-1:9092"], "compression": "GZIP"}}
    }))
    .unwrap();
    let sub = api.validate().unwrap();
    let json = serde_json::to_value(&sub).unwrap();
    assert_eq!(
        json["destination"],
        json!({"kafka": {"brokers": ["kafka-1:9092"], "topic": "postern.{event_type}",
                        "compression": "gzip", "linger": "5ms"}})
    );
    let back: ApiSubscription = serde_json::from_value(json).unwrap();
    assert_eq!(back.validate().unwrap(), sub);
}

#[test]
fn api_validation_errors_name_the_field_from_the_root() {
    let with = |pointer: &str, value: Value| {
        let mut json = api_json();
        *json.pointer_mut(pointer).unwrap() = value;
        json
    };
    let mut cases = vec![
        (
            with("/sources/0/filter", json!("ev.conn.server_name ==")),
            "sources[0].filter: ERR_POSTERN_6013",
        ),
        (
            with("/sources/0/type", json!("http_request_started.v0")),
            "sources[0].type: ERR_POSTERN_238",
        ),
        (
            with("/sources/1/type", json!("http_request_complete.v0")),
            "sources[1].type: ",
        ),
        (
            with("/sources/0/fields", json!(["http.nope"])),
            "sources[0].fields: ERR_POSTERN_239",
        ),
        (with("/sources", json!([])), "sources: "),
        (with("/id", json!("")), "id: "),
        (with("/id", json!("a/b")), "id: "),
        (with("/id", json!("x".repeat(129))), "id: "),
        (with("/metadata", json!("m".repeat(4097))), "metadata: "),
        (
            with("/destination", json!({})),
            "destination: ERR_POSTERN_236",
        ),
        (
            with("/destination/file/path", json!("/etc/postern.jsonl")),
            "destination.file.path: ",
        ),
        (
            with("/destination/file/path", json!("a/../../b.jsonl")),
            "destination.file.path: ",
        ),
        (
            with("/destination/file/path", json!("events-spool/k/0.seg")),
            "destination.file.path: ",
        ),
        (
            with("/destination/file/path", json!("")),
            "destination.file.path: must not be empty",
        ),
        (
            with("/destination", json!({"kafka": {"brokers": ["nohost"]}})),
            "destination.kafka.brokers: ",
        ),
    ];
    if !cfg!(feature = "kafka") {
        cases.push((
            with("/destination", json!({"kafka": {"brokers": ["h:1"]}})),
            "destination.kafka: this build has no Kafka support",
        ));
    }
    let ok = ApiSubscription::validate(serde_json::from_value(api_json()).unwrap());
    assert!(ok.is_ok(), "{ok:?}");
    for (json, want) in cases {
        let api: ApiSubscription = serde_json::from_value(json.clone()).unwrap();
        let err = api.validate().unwrap_err().to_string();
        assert!(err.starts_with(want), "{want:?} does not start {err}");
    }

    // Unknown keys are refused, at the root and inside.
    let mut extra = api_json();
    extra["secret"] = json!(true);
    let err = serde_json::from_value::<ApiSubscription>(extra).unwrap_err();
    assert!(err.to_string().contains("unknown field `secret`"), "{err}");
    let extra = with(
        "/sources/1",
        json!({"type": "tcp_connection_closed.v0", "filtr": "x"}),
    );
    let err = serde_json::from_value::<ApiSubscription>(extra).unwrap_err();
    assert!(err.to_string().contains("unknown field `filtr`"), "{err}");
}

#[test]
fn redacted_hides_the_sasl_password_and_serialising_keeps_it() {
    let api: ApiSubscription = serde_json::from_value(json!({
        "id": "k",
        "sources": [{"type": "http_request_complete.v0"}],
        "destination": {"kafka": {
            "brokers": ["h:1"], "security_protocol": "sasl_ssl",
            "sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "hunter2"
        }}
    }))
    .unwrap();
    assert!(!format!("{api:?}").contains("hunter2"));
    let full = serde_json::to_value(&api).unwrap();
    assert_eq!(
        full["destination"]["kafka"]["sasl_password"], "hunter2",
        "for the other nodes"
    );
    let shown = serde_json::to_value(api.clone().redacted()).unwrap();
    assert_eq!(shown["destination"]["kafka"]["sasl_password"], "********");
    assert!(!shown.to_string().contains("hunter2"), "{shown}");
    assert_eq!(shown["destination"]["kafka"]["sasl_username"], "u");
    let mut unredacted = shown;
    unredacted["destination"]["kafka"]["sasl_password"] = json!("hunter2");
    assert_eq!(unredacted, full, "nothing else changes");

    // Without a password there is nothing to hide, and none is made up.
    let file: ApiSubscription = serde_json::from_value(api_json()).unwrap();
    assert_eq!(file.clone().redacted(), file);

    #[cfg(feature = "kafka")]
    {
        let sub = api.validate().unwrap();
        assert!(!format!("{sub:?}").contains("hunter2"));
        assert!(
            serde_json::to_string(&sub.clone())
                .unwrap()
                .contains("hunter2"),
            "a validated subscription serialises the secret too"
        );
        let shown = serde_json::to_string(&ApiSubscription::from(&sub).redacted()).unwrap();
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
