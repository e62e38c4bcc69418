use serde_json::json;

use super::*;

const TTL: Duration = Duration::from_secs(60);
/// "Now", in wall-clock milliseconds.
const NOW: u64 = 1_000_000;

fn node(name: &str, generation: u64) -> ChitchatId {
    let port = 7000 + name.len() as u16 + generation as u16;
    ChitchatId::new(name.to_string(), generation, ([127, 0, 0, 1], port).into())
}

fn at(millis: u64) -> Hlc {
    Hlc(millis << 16)
}

/// The copy of config object `key` that node `by` holds, written by
/// `origin` at `h` (`None`: a tombstone).
fn copy(
    by: &ChitchatId,
    key: &str,
    h: Hlc,
    origin: &str,
    value: Option<serde_json::Value>,
) -> (ChitchatId, String, Parsed) {
    let payload = Payload {
        k: key.to_string(),
        h,
        o: origin.to_string(),
        g: 0,
        d: value.is_none(),
        v: value,
    };
    let env: Arc<str> = format!("env:{key}:{}:{origin}", h.0).into();
    (by.clone(), key.to_string(), Arc::new((payload, env)))
}

fn info(region: &str) -> NodeInfo {
    NodeInfo {
        region: region.to_string(),
        rpc: None,
        agent: None,
        leaving: false,
    }
}

fn live(ids: &[&ChitchatId]) -> HashSet<ChitchatId> {
    ids.iter().map(|id| (*id).clone()).collect()
}

#[test]
fn the_newest_copy_wins_and_this_node_republishes_what_it_lacks() {
    let (me, other) = (node("a", 1), node("b", 1));
    let new = copy(&other, "c/ca/x", at(NOW - 5), "b", Some(json!(2)));
    let new_envelope = new.2.1.clone();
    let gossiped = Gossiped {
        live: live(&[&me, &other]),
        config: vec![
            copy(&me, "c/ca/x", at(NOW - 10), "a", Some(json!(1))),
            new,
            copy(&other, "c/ca/y", at(NOW - 7), "b", Some(json!(3))),
        ],
        ..Gossiped::default()
    };
    let merged = merge(gossiped, &me, NOW, TTL);
    let x = &merged.view.config["c/ca/x"];
    assert_eq!((x.hlc, x.origin.as_str()), (at(NOW - 5), "b"));
    assert_eq!(x.value, Some(json!(2)));
    let mut republished: Vec<&str> = merged.republish.iter().map(|(k, _)| k.as_str()).collect();
    republished.sort();
    assert_eq!(republished, ["c/ca/x", "c/ca/y"]);
    assert_eq!(
        merged
            .republish
            .iter()
            .find(|(k, _)| k == "c/ca/x")
            .unwrap()
            .1,
        new_envelope
    );
    assert_eq!(merged.newest, Some(at(NOW - 5)));
    assert!(merged.collect.is_empty());
}

#[test]
fn ties_go_to_the_higher_node_id_and_a_held_winner_is_not_republished() {
    let (me, other) = (node("b", 1), node("a", 1));
    let h = at(NOW - 1);
    let gossiped = Gossiped {
        live: live(&[&me, &other]),
        config: vec![
            copy(&other, "c/ca/x", h, "a", Some(json!("a"))),
            copy(&me, "c/ca/x", h, "b", Some(json!("b"))),
        ],
        ..Gossiped::default()
    };
    let merged = merge(gossiped, &me, NOW, TTL);
    assert_eq!(merged.view.config["c/ca/x"].origin, "b");
    assert!(merged.republish.is_empty(), "this node holds the winner");
}

#[test]
fn an_expired_tombstone_is_forgotten_and_collected_where_held() {
    let (me, other) = (node("a", 1), node("b", 1));
    let expired = NOW - TTL.as_millis() as u64 - 1;
    let fresh = NOW - 1;
    let gossiped = Gossiped {
        live: live(&[&me, &other]),
        config: vec![
            copy(&me, "c/ca/old", at(expired), "b", None),
            copy(&other, "c/ca/old", at(expired), "b", None),
            copy(&other, "c/ca/theirs", at(expired), "b", None),
            copy(&other, "c/ca/new", at(fresh), "b", None),
        ],
        ..Gossiped::default()
    };
    let merged = merge(gossiped, &me, NOW, TTL);
    assert_eq!(merged.collect, ["c/ca/old"], "only what this node holds");
    let kept: Vec<&String> = merged.view.config.keys().collect();
    assert_eq!(kept, ["c/ca/new"], "a fresh tombstone is remembered");
    assert!(merged.view.config["c/ca/new"].deleted);
    assert_eq!(
        merged.newest,
        Some(at(fresh)),
        "expired ones count for the clock"
    );
}

#[test]
fn members_are_live_nodes_not_leaving_in_their_newest_generation_with_their_values() {
    let me = node("a", 1);
    let (restarted_old, restarted_new) = (node("b", 1), node("b", 2));
    let dead = node("c", 1);
    let leaving = node("d", 1);
    let mut going = info("ap");
    going.leaving = true;
    let gossiped = Gossiped {
        live: live(&[&me, &restarted_old, &restarted_new, &leaving]),
        infos: vec![
            (me.clone(), info("us")),
            (restarted_old.clone(), info("eu")),
            (restarted_new.clone(), info("eu")),
            (dead.clone(), info("sa")),
            (leaving.clone(), going),
        ],
        locals: vec![
            (restarted_new.clone(), "l/endpoint/ep_2".into(), json!(2)),
            (restarted_old.clone(), "l/endpoint/ep_old".into(), json!(0)),
            (me.clone(), "l/endpoint/ep_1".into(), json!(1)),
            (leaving.clone(), "l/session/ts_1".into(), json!(3)),
        ],
        ..Gossiped::default()
    };
    let merged = merge(gossiped, &me, NOW, TTL);
    let members: Vec<(&str, u64, bool)> = merged
        .view
        .members
        .iter()
        .map(|m| (m.node_id.as_str(), m.generation, m.is_self))
        .collect();
    assert_eq!(members, [("a", 1, true), ("b", 2, false)]);
    let regions: Vec<&String> = merged.view.regions.iter().collect();
    assert_eq!(regions, ["ap", "eu", "sa", "us"], "every region announced");
    let endpoints: Vec<(&str, &str)> = merged.view.locals["endpoint"]
        .iter()
        .map(|(m, id, _)| (m.node_id.as_str(), id.as_str()))
        .collect();
    assert_eq!(endpoints, [("a", "ep_1"), ("b", "ep_2")]);
    assert!(!merged.view.locals.contains_key("session"));
}

#[test]
fn applying_reports_what_changed_and_bumps_the_generation_only_for_config() {
    let me = node("a", 1);
    let gossiped = |value: serde_json::Value| Gossiped {
        live: live(&[&me]),
        config: vec![copy(&me, "c/ca/x", at(NOW - 1), "a", Some(value))],
        infos: vec![(me.clone(), info("us"))],
        locals: vec![(me.clone(), "l/endpoint/ep_1".into(), json!(1))],
    };
    let mut view = View::default();
    let changes = merge(gossiped(json!(1)), &me, NOW, TTL)
        .view
        .apply(&mut view);
    assert_eq!(
        changes,
        [
            Change::Config("ca".into()),
            Change::Local("endpoint".into()),
            Change::Members
        ]
    );
    assert_eq!(view.generation, 1);
    assert_eq!(view.members.len(), 1);

    let again = merge(gossiped(json!(1)), &me, NOW, TTL)
        .view
        .apply(&mut view);
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(view.generation, 1);

    let emptied = merge(
        Gossiped {
            live: live(&[&me]),
            infos: vec![(me.clone(), info("us"))],
            ..Gossiped::default()
        },
        &me,
        NOW,
        TTL,
    )
    .view
    .apply(&mut view);
    assert_eq!(
        emptied,
        [
            Change::Config("ca".into()),
            Change::Local("endpoint".into())
        ]
    );
    assert!(view.config.is_empty());
    assert_eq!(view.generation, 2);
}
