//! Certificates on demand (`acme.on_demand`): the names agents of the
//! cluster bind under a wildcard reserved domain with a certificate
//! policy, each ordered for itself by HTTP-01 or TLS-ALPN-01, and the
//! per-hour limit on how many new names one wildcard may have ordered.
//! The names come from the endpoints the nodes announce, never from what
//! visitors ask for, so a visitor cannot make the edge order.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use crate::{
    cluster::{ClusterNode, EndpointAd, KeyType, ReservedDomain},
    registry::host_of,
};

/// The window of `acme.on_demand_per_hour`.
const WINDOW: Duration = Duration::from_secs(3600);

/// A name an agent bound under a wildcard reserved domain with a policy.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct OnDemandName {
    pub name: String,
    /// The wildcard's policy's key type.
    pub key_type: KeyType,
    /// The wildcard reserved domain (`*.example.com`).
    pub under: String,
}

/// The HTTPS endpoints' names bound by the agents of every live node under
/// a wildcard reserved domain with a policy (the most specific one when
/// they nest), by name. Names a reserved domain of their own manages are
/// not among them.
pub(super) fn on_demand_names(cluster: &ClusterNode) -> Vec<OnDemandName> {
    let reserved = cluster.objects::<ReservedDomain>();
    let exact: BTreeSet<&str> = reserved
        .iter()
        .filter(|(_, r)| r.certificate_management_policy.is_some())
        .map(|(_, r)| r.domain.as_str())
        .collect();
    let wildcards: Vec<(&str, KeyType)> = reserved
        .iter()
        .filter(|(_, r)| r.domain.starts_with("*."))
        .filter_map(|(_, r)| {
            let policy = r.certificate_management_policy.as_ref()?;
            Some((r.domain.as_str(), policy.private_key_type))
        })
        .collect();
    let mut names = BTreeMap::new();
    for ad in cluster.live::<EndpointAd>() {
        if ad.value.proto != "https" {
            continue;
        }
        let name = host_of(&ad.value.public_url);
        if name.starts_with("*.") || exact.contains(name) {
            continue;
        }
        let under = wildcards
            .iter()
            .filter(|(wildcard, _)| name.ends_with(&wildcard[1..]))
            .max_by_key(|(wildcard, _)| wildcard.len());
        if let Some((wildcard, key_type)) = under {
            names.insert(
                name.to_string(),
                OnDemandName {
                    name: name.to_string(),
                    key_type: *key_type,
                    under: wildcard.to_string(),
                },
            );
        }
    }
    names.into_values().collect()
}

/// How many new names each wildcard had ordered in the last hour, against
/// `acme.on_demand_per_hour`.
pub(super) struct Admissions {
    per_hour: u32,
    /// Per wildcard, the names admitted in the window, with when.
    admitted: Mutex<HashMap<String, Vec<(SystemTime, String)>>>,
    /// The names refused now, so each refusal is logged and counted once.
    refused: Mutex<BTreeSet<String>>,
    refusals: AtomicU64,
}

impl Admissions {
    pub fn new(per_hour: u32) -> Admissions {
        Admissions {
            per_hour,
            admitted: Mutex::default(),
            refused: Mutex::default(),
            refusals: AtomicU64::new(0),
        }
    }

    /// Whether `name` under `under` may be ordered at `now`: a name
    /// admitted within the hour may (a retry); a new one while fewer than
    /// `per_hour` names were. If not, when one may be; a name refused anew
    /// is logged and counted.
    pub fn check(&self, under: &str, name: &str, now: SystemTime) -> Result<(), SystemTime> {
        let mut admitted = self.admitted.lock().expect("admissions lock");
        let window = admitted.entry(under.to_string()).or_default();
        window.retain(|(at, _)| now.duration_since(*at).is_ok_and(|age| age < WINDOW));
        let mut refused = self.refused.lock().expect("admissions lock");
        if window.iter().any(|(_, n)| n == name) || window.len() < self.per_hour as usize {
            refused.remove(name);
            return Ok(());
        }
        if refused.insert(name.to_string()) {
            self.refusals.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                name,
                reserved_domain = under,
                per_hour = self.per_hour,
                "no certificate ordered on demand: acme.on_demand_per_hour names under this reserved domain were ordered within the hour; the name is served by whatever certificate there is"
            );
        }
        let oldest = window.iter().map(|(at, _)| *at).min().unwrap_or(now);
        Err(oldest + WINDOW)
    }

    /// Counts `name` against `under`'s hour, once it is ordered.
    pub fn record(&self, under: &str, name: &str, now: SystemTime) {
        let mut admitted = self.admitted.lock().expect("admissions lock");
        let window = admitted.entry(under.to_string()).or_default();
        if !window.iter().any(|(_, n)| n == name) {
            window.push((now, name.to_string()));
        }
    }

    /// Names refused since the start (each counted once per refusal).
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_the_limit_of_new_names_per_hour_and_retries_pass() {
        let admissions = Admissions::new(2);
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let wild = "*.example.test";
        for name in ["a.example.test", "b.example.test"] {
            assert_eq!(admissions.check(wild, name, start), Ok(()));
            admissions.record(wild, name, start);
        }
        let later = start + Duration::from_secs(60);
        assert_eq!(
            admissions.check(wild, "c.example.test", later),
            Err(start + WINDOW),
            "the third new name waits for the oldest to leave the hour"
        );
        assert_eq!(
            admissions.check(wild, "c.example.test", later),
            Err(start + WINDOW)
        );
        assert_eq!(admissions.refusals(), 1, "a refusal is counted once");
        assert_eq!(
            admissions.check(wild, "a.example.test", later),
            Ok(()),
            "a retry of an admitted name"
        );
        assert_eq!(
            admissions.check("*.other.test", "c.other.test", later),
            Ok(()),
            "per reserved domain"
        );
        let hour_on = start + WINDOW + Duration::from_secs(1);
        assert_eq!(admissions.check(wild, "c.example.test", hour_on), Ok(()));
        admissions.record(wild, "c.example.test", hour_on);
        assert_eq!(admissions.check(wild, "d.example.test", hour_on), Ok(()));
        admissions.record(wild, "d.example.test", hour_on);
        assert!(admissions.check(wild, "e.example.test", hour_on).is_err());
        assert_eq!(admissions.refusals(), 2);
    }
}
