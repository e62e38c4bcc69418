//! The merge of a reconciler pass, apart from gossip: from the values every
//! node publishes (already verified), the config every node converges on
//! and what this node re-publishes or collects for it, the live members,
//! and their node-owned values; then the view made that merge, with the
//! changes to tell.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use chitchat::ChitchatId;

use super::{Change, LocalEntries, Member, NodeInfo, Record, View, split_key};
use crate::{envelope::Payload, hlc::Hlc};

/// A verified payload with the envelope it came in.
pub(super) type Parsed = Arc<(Payload, Arc<str>)>;

/// What a pass read from gossip, every value verified (signature, key,
/// owner, no replay).
#[derive(Default)]
pub(super) struct Gossiped {
    /// The nodes the failure detector holds live.
    pub live: HashSet<ChitchatId>,
    /// Every node's copy of every config object (`c/` keys).
    pub config: Vec<(ChitchatId, String, Parsed)>,
    /// Every node's announcement of itself (`n`).
    pub infos: Vec<(ChitchatId, NodeInfo)>,
    /// The node-owned values (`l/` keys) of live nodes.
    pub locals: Vec<(ChitchatId, String, serde_json::Value)>,
}

/// What a pass makes of what it read.
pub(super) struct Merged {
    pub view: MergedView,
    /// Winners this node does not hold yet: re-published in its key space.
    pub republish: Vec<(String, Arc<str>)>,
    /// Tombstones past their time to live that this node holds: deleted.
    pub collect: Vec<String>,
    /// The newest timestamp seen, for this node's clock.
    pub newest: Option<Hlc>,
}

/// The view as the merge has it.
pub(super) struct MergedView {
    /// The winner of every object not collected.
    pub config: BTreeMap<String, Record>,
    /// Live nodes that announced themselves, by node id.
    pub members: Vec<Member>,
    /// Every region announced, live or not.
    pub regions: BTreeSet<String>,
    /// The values of live members, by kind, sorted by node and id.
    pub locals: BTreeMap<String, LocalEntries>,
}

/// Merges what every node publishes, as seen by `self_id` at `now_ms`
/// (wall clock): the winner of an object is the copy with the highest
/// timestamp (ties: the writing node's id); a tombstone older than
/// `tombstone_ttl` is forgotten.
pub(super) fn merge(
    gossiped: Gossiped,
    self_id: &ChitchatId,
    now_ms: u64,
    tombstone_ttl: Duration,
) -> Merged {
    let (config, republish, collect, newest) =
        merge_config(gossiped.config, self_id, now_ms, tombstone_ttl);
    let (members, regions) = members(&gossiped.infos, &gossiped.live, self_id);
    let locals = locals(gossiped.locals, &members);
    Merged {
        view: MergedView {
            config,
            members: members.into_values().collect(),
            regions,
            locals,
        },
        republish,
        collect,
        newest,
    }
}

type MergedConfig = (
    BTreeMap<String, Record>,
    Vec<(String, Arc<str>)>,
    Vec<String>,
    Option<Hlc>,
);

/// The winner of every object, what this node must re-publish (winners it
/// does not hold) and collect (expired tombstones it holds), and the newest
/// timestamp seen.
fn merge_config(
    copies: Vec<(ChitchatId, String, Parsed)>,
    self_id: &ChitchatId,
    now_ms: u64,
    tombstone_ttl: Duration,
) -> MergedConfig {
    let mut best: HashMap<String, Parsed> = HashMap::new();
    let mut own: HashMap<String, (Hlc, String)> = HashMap::new();
    for (id, key, parsed) in copies {
        let payload = &parsed.0;
        if id == *self_id {
            own.insert(key.clone(), (payload.h, payload.o.clone()));
        }
        let better = best
            .get(&key)
            .is_none_or(|b| (payload.h, &payload.o) > (b.0.h, &b.0.o));
        if better {
            best.insert(key, parsed);
        }
    }
    let ttl = tombstone_ttl.as_millis() as u64;
    let mut config = BTreeMap::new();
    let mut republish = Vec::new();
    let mut collect = Vec::new();
    let mut newest: Option<Hlc> = None;
    for (key, parsed) in best {
        let (payload, env) = &*parsed;
        newest = newest.max(Some(payload.h));
        if payload.d && now_ms.saturating_sub(payload.h.millis()) > ttl {
            if own.contains_key(&key) {
                collect.push(key);
            }
            continue;
        }
        let ours = own.get(&key);
        if ours.is_none_or(|(h, o)| (*h, o) < (payload.h, &payload.o)) {
            republish.push((key.clone(), env.clone()));
        }
        config.insert(
            key,
            Record {
                hlc: payload.h,
                origin: payload.o.clone(),
                deleted: payload.d,
                value: payload.v.clone(),
                envelope: env.clone(),
            },
        );
    }
    (config, republish, collect, newest)
}

/// Live nodes that announced themselves and are not leaving, by node id (a
/// restarted node's newest generation only), and every region announced.
fn members(
    infos: &[(ChitchatId, NodeInfo)],
    live: &HashSet<ChitchatId>,
    self_id: &ChitchatId,
) -> (BTreeMap<String, Member>, BTreeSet<String>) {
    let mut regions = BTreeSet::new();
    let mut chosen: BTreeMap<String, Member> = BTreeMap::new();
    for (id, info) in infos {
        regions.insert(info.region.clone());
        if !live.contains(id) || info.leaving {
            continue;
        }
        let member = Member {
            node_id: id.node_id.to_string(),
            region: info.region.clone(),
            rpc_addr: info.rpc,
            agent_addr: info.agent.clone(),
            gossip_addr: id.gossip_advertise_addr,
            generation: id.generation_id,
            is_self: id == self_id,
        };
        let newer = chosen
            .get(&member.node_id)
            .is_none_or(|m| m.generation < member.generation);
        if newer {
            chosen.insert(member.node_id.clone(), member);
        }
    }
    (chosen, regions)
}

/// The values of the members' own generations, by kind.
fn locals(
    values: Vec<(ChitchatId, String, serde_json::Value)>,
    members: &BTreeMap<String, Member>,
) -> BTreeMap<String, LocalEntries> {
    let mut locals: BTreeMap<String, LocalEntries> = BTreeMap::new();
    for (id, key, value) in values {
        let Some(member) = members
            .get(&*id.node_id)
            .filter(|m| m.generation == id.generation_id)
        else {
            continue;
        };
        if let Some((kind, local_id)) = split_key(&key) {
            locals.entry(kind.to_string()).or_default().push((
                member.clone(),
                local_id.to_string(),
                value,
            ));
        }
    }
    for entries in locals.values_mut() {
        entries.sort_by(|a, b| (&a.0.node_id, &a.1).cmp(&(&b.0.node_id, &b.1)));
    }
    locals
}

impl MergedView {
    /// Makes `view` this merge and returns the changes: the kinds of config
    /// objects that changed (the config and its generation are replaced
    /// only then), the kinds of node-owned values, the members.
    pub fn apply(self, view: &mut View) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut kinds = BTreeSet::new();
        for (key, record) in &self.config {
            if view
                .config
                .get(key)
                .is_none_or(|old| old.rank() != record.rank())
            {
                kinds.extend(split_key(key).map(|(k, _)| k.to_string()));
            }
        }
        for key in view.config.keys() {
            if !self.config.contains_key(key) {
                kinds.extend(split_key(key).map(|(k, _)| k.to_string()));
            }
        }
        if !kinds.is_empty() {
            view.generation += 1;
            view.config = self.config;
        }
        changes.extend(kinds.into_iter().map(Change::Config));
        let local_kinds: BTreeSet<&String> = view.locals.keys().chain(self.locals.keys()).collect();
        for kind in local_kinds {
            if view.locals.get(kind) != self.locals.get(kind) {
                changes.push(Change::Local(kind.clone()));
            }
        }
        view.locals = self.locals;
        if view.members != self.members {
            changes.push(Change::Members);
            view.members = self.members;
        }
        view.regions = self.regions;
        changes
    }
}

#[cfg(test)]
mod tests;
