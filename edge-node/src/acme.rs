//! Certificates without hands: for every reserved domain whose
//! `certificate_management_policy` asks for it, one node of the cluster
//! orders a certificate from the ACME CA of `[acme]` (HTTP-01 answered on
//! the gateways' plain-HTTP listeners, TLS-ALPN-01 on their HTTPS
//! listeners, or DNS-01 through the operator's hook), shares it with the
//! other nodes, and renews it once `renew_at` of its lifetime has passed.
//! Every node installs it in its gateway's certificate store, keeps it in
//! `<data_dir>/acme/` so a restart serves it, and answers the challenges
//! of an order in flight, since the CA may reach any node.
//!
//! One order per cluster: a node orders a name only under the winning
//! lease of the cluster's gossip (see `shared`). When a name is due (no
//! certificate, a renewal, a retry), the node takes a lease unless
//! another live node holds an unexpired one, waits a few gossip rounds for
//! leases taken at the same time to show, and orders only if its own is
//! still the winner (the earliest taken; ties: the lowest node id); the
//! others stand down and wait for the shared certificate. A failed order
//! keeps the lease until its retry, so the back-off holds cluster-wide; a
//! holder that dies or leaves takes its lease with it, and one that hangs
//! lets it expire (order timeout plus a margin): then another node takes
//! over. A failed order is retried with jittered, doubling back-off; the
//! certificate already served stays served meanwhile. Failures show in
//! the log, in `/metrics` and in the reserved domain's
//! `certificate_management_status`, at every node.
//!
//! The names: reserved domains with a policy, each region's name of the
//! agent ingresses with one, and, with `acme.on_demand`, the names agents
//! bind under a wildcard reserved domain with one (see `on_demand`).
//!
//! One task per node (owned by [`Acme`], stopped and joined at shutdown)
//! orders one name at a time.

mod config;
mod issue;
mod on_demand;
mod shared;
mod store;

pub use config::{AcmeConfig, Challenge, DnsHook, RawAcme};
pub use shared::{
    AcmeAnswer, AcmeCertificate, AcmeLease, RemoteAnswers, prune_shared_certificates,
    shared_certificates,
};

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use instant_acme::Account;
use postern_config_sync::Change;
use postern_ingress::{AcmeChallenges, CertSource, CertStore, ServingCert};
use postern_net::Pem;
use tokio::{sync::broadcast, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::cluster::{ClusterNode, KeyType, ReservedDomain};
use on_demand::{Admissions, on_demand_names};
use shared::{
    Cover, ingress_policy_names, key_of, lease_holder, millis, policy_names, reserved_policy_names,
    time_of,
};

/// How often the names are looked at when nothing changes.
const SCAN: Duration = Duration::from_secs(60);
/// The longest one order may take, from the new order to the chain,
/// besides the DNS hook's time (see [`AcmeConfig::order_timeout`]).
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);
/// A lease outlives the order it covers by this much, so that a slow but
/// live holder is not overtaken.
const LEASE_MARGIN: Duration = Duration::from_secs(30);
/// Gossip rounds a node waits after taking a lease, for leases others took
/// at the same time to show.
const SETTLE_ROUNDS: u32 = 5;

/// Why an order or a stored certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    #[error("the authorization is {0}")]
    Authorization(String),
    #[error("the CA offered no {0} challenge")]
    NoChallenge(&'static str),
    #[error("the TLS-ALPN-01 answer: {0}")]
    TlsAlpn01(String),
    #[error("the order did not become ready: {0}")]
    NotReady(String),
    #[error("making the certificate key: {0}")]
    Key(String),
    #[error("the CA's certificate: {0}")]
    Issued(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Stored { path: PathBuf, reason: String },
    #[error("no certificate within {0:?}")]
    Timeout(Duration),
    #[error("a wildcard is proved by DNS-01, and acme.dns_hook is not set")]
    NoDnsHook,
    #[error("the DNS hook ({action} {record}) failed: {reason}")]
    DnsHook {
        action: String,
        record: String,
        reason: String,
    },
    #[error("the cluster's gossip ({what}): {reason}")]
    Gossip { what: String, reason: String },
}

/// What this node knows of one managed name's certificate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CertStatus {
    /// The served certificate's end, and when it is renewed.
    pub not_after: Option<SystemTime>,
    pub renews_at: Option<SystemTime>,
    /// The node that ordered the served certificate, when known (a
    /// certificate kept on disk before certificates were shared says not).
    pub ordered_by: Option<String>,
    /// An order is running here since.
    pub ordering_since: Option<SystemTime>,
    /// Failed orders in a row here, the last one's error, and the next try.
    pub failures: u32,
    pub last_error: Option<String>,
    pub retries_at: Option<SystemTime>,
    /// The lease under which the name is ordered now, when there is one
    /// (filled in when the status is read).
    pub lease: Option<LeaseStatus>,
}

/// Who orders a name now.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseStatus {
    pub holder: String,
    /// The holder is this node.
    pub this_node: bool,
    pub taken_at: SystemTime,
    pub expires_at: SystemTime,
    /// The holder's failed orders in a row, its last error, its next try.
    pub failures: u32,
    pub last_error: Option<String>,
    pub retries_at: Option<SystemTime>,
}

impl CertStatus {
    /// When the name needs an order: now without a certificate, else at
    /// the retry after a failure, else at renewal.
    fn due(&self, now: SystemTime) -> SystemTime {
        self.retries_at.or(self.renews_at).unwrap_or(now)
    }
}

/// One managed name's certificate at this node, for `/metrics`.
#[derive(Clone, Debug)]
pub struct ServedCert {
    /// The id of the reserved domain naming it (`rd_…`): metric labels
    /// carry ids, never host names.
    pub reserved_domain: String,
    pub not_after: SystemTime,
    pub ordered_by: Option<String>,
}

struct Shared {
    config: AcmeConfig,
    dir: PathBuf,
    certs: Arc<CertStore>,
    challenges: Arc<AcmeChallenges>,
    cluster: Arc<ClusterNode>,
    status: Mutex<HashMap<String, CertStatus>>,
    /// The leases this node holds, by name.
    held: Mutex<HashMap<String, AcmeLease>>,
    issued: AtomicU64,
    failed: AtomicU64,
    /// Certificates another node ordered, installed here.
    received: AtomicU64,
    /// Times this node took a lease and stood down for another's.
    stood_down: AtomicU64,
    /// DNS hook cleanups and withdrawals of gossiped challenge answers
    /// still running; shutdown waits for them.
    cleanups: TaskTracker,
    /// With `acme.on_demand`: the names ordered on demand per wildcard
    /// within the hour.
    admissions: Option<Admissions>,
}

/// The node's certificate manager.
pub struct Acme {
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme")
            .field("directory_url", &self.shared.config.directory_url)
            .finish()
    }
}

impl Acme {
    /// Whether this node proves wildcards (it has `acme.dns_hook`).
    pub fn orders_wildcards(&self) -> bool {
        self.shared.config.dns_hook.is_some()
    }

    /// Whether this node orders the names agents bind under a wildcard
    /// reserved domain with a policy (`acme.on_demand`).
    pub fn on_demand(&self) -> bool {
        self.shared.admissions.is_some()
    }

    /// Serves the certificates kept in `<data_dir>/acme/` for the names
    /// the cluster's reserved domains ask for, then manages those names.
    pub fn start(
        config: AcmeConfig,
        data_dir: &std::path::Path,
        certs: Arc<CertStore>,
        challenges: Arc<AcmeChallenges>,
        cluster: Arc<ClusterNode>,
    ) -> Result<Arc<Acme>, AcmeError> {
        let dir = data_dir.join("acme");
        std::fs::create_dir_all(&dir).map_err(|source| AcmeError::Io {
            path: dir.clone(),
            source,
        })?;
        let admissions = config.on_demand_per_hour.map(Admissions::new);
        let shared = Arc::new(Shared {
            admissions,
            config,
            dir,
            certs,
            challenges,
            cluster: cluster.clone(),
            status: Mutex::default(),
            held: Mutex::default(),
            issued: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            received: AtomicU64::new(0),
            stood_down: AtomicU64::new(0),
            cleanups: TaskTracker::new(),
        });
        // What the snapshot of the cluster's config says is managed: a
        // name no longer reserved with a policy is not served again.
        let cover = Cover::of(&cluster);
        for name in store::names(&shared.dir) {
            if !cover.covers(&name) {
                continue;
            }
            match store::load(&shared.dir, &name).and_then(|c| c.map(validity).transpose()) {
                Ok(Some((cert, not_before, not_after))) => {
                    shared.certs.set(CertSource::Acme, &name, &cert);
                    shared.served(&name, (not_before, not_after), None);
                    tracing::info!(name, "ACME certificate loaded from disk");
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(name, error = %e, "stored ACME certificate not usable"),
            }
        }
        let stop = CancellationToken::new();
        let changes = cluster.subscribe();
        let task = tokio::spawn(run(shared.clone(), changes, stop.clone()));
        Ok(Arc::new(Acme {
            shared,
            stop,
            task: Mutex::new(Some(task)),
        }))
    }

    /// What this node knows of `name`'s managed certificate, with the
    /// lease under which it is ordered now.
    pub fn status(&self, name: &str) -> Option<CertStatus> {
        let status = self
            .shared
            .status
            .lock()
            .expect("acme status lock")
            .get(name)
            .cloned();
        let lease = self.shared.lease(name);
        match (status, lease) {
            (None, None) => None,
            (status, lease) => Some(CertStatus {
                lease,
                ..status.unwrap_or_default()
            }),
        }
    }

    /// The certificates served for the cluster's managed names, with who
    /// ordered them, by reserved domain id.
    pub fn served(&self) -> Vec<ServedCert> {
        let status = self.shared.status.lock().expect("acme status lock");
        reserved_ids(&self.shared.cluster)
            .into_iter()
            .filter_map(|(id, name)| {
                let s = status.get(&name)?;
                Some(ServedCert {
                    reserved_domain: id,
                    not_after: s.not_after?,
                    ordered_by: s.ordered_by.clone(),
                })
            })
            .collect()
    }

    /// The live leases of the cluster's managed names, as `(reserved
    /// domain id, holder)`.
    pub fn leases(&self) -> Vec<(String, String)> {
        reserved_ids(&self.shared.cluster)
            .into_iter()
            .filter_map(|(id, name)| Some((id, self.shared.lease(&name)?.holder)))
            .collect()
    }

    /// Orders that issued and that failed here since the start, the names
    /// whose last order here failed, the certificates received from other
    /// nodes, the leases this node holds, and the times it stood down.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        let failing = self
            .shared
            .status
            .lock()
            .expect("acme status lock")
            .values()
            .filter(|s| s.last_error.is_some())
            .count() as u64;
        let held = self.shared.held.lock().expect("acme lease lock").len() as u64;
        let count = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let refused = self
            .shared
            .admissions
            .as_ref()
            .map_or(0, Admissions::refusals);
        vec![
            ("acme_on_demand_refused", refused),
            ("acme_orders_issued", count(&self.shared.issued)),
            ("acme_orders_failed", count(&self.shared.failed)),
            ("acme_names_failing", failing),
            ("acme_certificates_received", count(&self.shared.received)),
            ("acme_leases_held", held),
            ("acme_leases_stood_down", count(&self.shared.stood_down)),
        ]
    }

    /// Stops ordering (an order in flight is abandoned; its lease goes
    /// when the node leaves the cluster), joins the task and waits for the
    /// DNS hook and the gossip to withdraw the abandoned order's answers.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let task = self.task.lock().expect("acme task lock").take();
        if let Some(task) = task
            && let Err(e) = task.await
        {
            tracing::warn!(error = %e, "the ACME task ended abnormally");
        }
        self.shared.cleanups.close();
        self.shared.cleanups.wait().await;
    }
}

/// The certificate with its validity.
fn validity(cert: ServingCert) -> Result<(ServingCert, SystemTime, SystemTime), AcmeError> {
    use x509_parser::prelude::*;
    let (_, x509) = X509Certificate::from_der(cert.key.cert[0].as_ref())
        .map_err(|e| AcmeError::Issued(e.to_string()))?;
    let at =
        |t: ASN1Time| SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64);
    let validity = x509.validity();
    let (not_before, not_after) = (at(validity.not_before), at(validity.not_after));
    Ok((cert, not_before, not_after))
}

/// When a certificate valid from `not_before` to `not_after` is renewed.
fn renewal(not_before: SystemTime, not_after: SystemTime, fraction: f64) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    not_before + lifetime.mul_f64(fraction)
}

/// The wait after the `failures`-th failure in a row: `min` doubling up to
/// `max`, then a random part of its upper half off, so that names (and
/// nodes) that failed together do not retry together.
fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let doubled = min.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    doubled.min(max).mul_f64(rand::random_range(0.5..=1.0))
}

/// Whether this node may order a due name now.
#[derive(Debug, PartialEq)]
enum Turn {
    /// It may: no other live node holds an unexpired lease.
    Mine,
    /// Not before then (not due, not caught up with the cluster, or
    /// another node's lease).
    Wait(SystemTime),
}

/// How taking a lease went.
enum Taken {
    /// This node's lease won: order.
    Won,
    /// Another node's won, or the name stopped being due meanwhile; look
    /// again by then.
    StoodDown(SystemTime),
    /// The node is stopping.
    Stopped,
}

impl Shared {
    fn with_status<T>(&self, name: &str, f: impl FnOnce(&mut CertStatus) -> T) -> T {
        let mut status = self.status.lock().expect("acme status lock");
        f(status.entry(name.to_string()).or_default())
    }

    fn served(&self, name: &str, validity: (SystemTime, SystemTime), ordered_by: Option<String>) {
        let (not_before, not_after) = validity;
        let renews_at = renewal(not_before, not_after, self.config.renew_at);
        self.with_status(name, |s| {
            *s = CertStatus {
                not_after: Some(not_after),
                renews_at: Some(renews_at),
                ordered_by,
                ..CertStatus::default()
            }
        });
    }

    fn due(&self, name: &str, now: SystemTime) -> SystemTime {
        self.with_status(name, |s| s.due(now))
    }

    fn me(&self) -> &str {
        self.cluster.node_id()
    }

    /// The winning live lease of `name`, if any.
    fn lease(&self, name: &str) -> Option<LeaseStatus> {
        let leases = self.cluster.live::<AcmeLease>();
        let won = lease_holder(&leases, name, millis(SystemTime::now()))?;
        let lease = &won.value;
        Some(LeaseStatus {
            holder: won.node.node_id.clone(),
            this_node: won.node.is_self,
            taken_at: time_of(lease.taken_at),
            expires_at: time_of(lease.expires_at),
            failures: lease.failures,
            last_error: lease.last_error.clone(),
            retries_at: lease.retries_at.map(time_of),
        })
    }

    /// Installs the cluster's shared certificate for `name` when it is
    /// newer than the one served here (and keeps it on disk); `seen` holds
    /// the shared chain last looked at per name, so each is looked at once.
    fn adopt(&self, name: &str, seen: &mut HashMap<String, String>) {
        let Some(shared) = self
            .cluster
            .object::<AcmeCertificate>(&key_of(name))
            .filter(|c| c.name == name)
        else {
            return;
        };
        if seen.get(name) == Some(&shared.certificate_pem) {
            return;
        }
        seen.insert(name.to_string(), shared.certificate_pem.clone());
        let opened = shared
            .serving(|sealed| self.cluster.open_sealed(sealed))
            .map_err(AcmeError::Issued)
            .and_then(validity);
        let (cert, not_before, not_after) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                tracing::warn!(name, ordered_by = shared.ordered_by, error = %e, "the cluster's ACME certificate is not usable here");
                return;
            }
        };
        let current = self.with_status(name, |s| s.not_after);
        if current.is_some_and(|served| served >= not_after) {
            if current == Some(not_after) {
                // The same certificate (kept on disk here): now we know
                // who ordered it.
                self.with_status(name, |s| {
                    s.ordered_by.get_or_insert(shared.ordered_by.clone());
                });
            }
            return;
        }
        let key_pem = self
            .cluster
            .open_sealed(&shared.private_key_sealed)
            .unwrap_or_default();
        if let Err(e) = store::save(&self.dir, name, &shared.certificate_pem, &key_pem) {
            tracing::warn!(name, error = %e, "the cluster's ACME certificate is served but not kept on disk");
        }
        self.certs.set(CertSource::Acme, name, &cert);
        self.served(
            name,
            (not_before, not_after),
            Some(shared.ordered_by.clone()),
        );
        if shared.ordered_by != self.me() {
            self.received.fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(
            name,
            ordered_by = shared.ordered_by,
            not_after = %humantime::format_rfc3339_seconds(not_after),
            "ACME certificate from the cluster installed"
        );
    }

    /// Whether this node may order `name` now.
    fn turn(&self, name: &str, now: SystemTime) -> Turn {
        let due = self.due(name, now);
        if due > now {
            return Turn::Wait(due);
        }
        if !self.cluster.caught_up() {
            // The cluster's certificate or lease may be on its way.
            return Turn::Wait(now + Duration::from_secs(1));
        }
        match self.lease(name) {
            Some(lease) if !lease.this_node => {
                tracing::debug!(name, holder = lease.holder, "another node orders this name");
                Turn::Wait(lease.expires_at)
            }
            _ => Turn::Mine,
        }
    }

    /// Publishes this node's lease for `name`, `failures` etc. from its
    /// status, lasting until `until`, keeping the time it was first taken
    /// while this node holds it.
    async fn publish_lease(&self, name: &str, until: SystemTime) -> Result<bool, AcmeError> {
        let now = millis(SystemTime::now());
        let (failures, last_error, retries_at) = self.with_status(name, |s| {
            (s.failures, s.last_error.clone(), s.retries_at.map(millis))
        });
        let kept = self
            .held
            .lock()
            .expect("acme lease lock")
            .get(name)
            .filter(|l| l.expires_at > now)
            .map(|l| l.taken_at);
        let lease = AcmeLease {
            name: name.to_string(),
            taken_at: kept.unwrap_or(now),
            expires_at: millis(until),
            failures,
            last_error,
            retries_at,
        };
        self.cluster
            .publish_local(&key_of(name), &lease)
            .await
            .map_err(|f| AcmeError::Gossip {
                what: format!("the lease of {name}"),
                reason: f.detail,
            })?;
        self.held
            .lock()
            .expect("acme lease lock")
            .insert(name.to_string(), lease);
        Ok(kept.is_some())
    }

    async fn withdraw_lease(&self, name: &str) {
        let held = self.held.lock().expect("acme lease lock").remove(name);
        if held.is_some() {
            self.cluster
                .withdraw_local::<AcmeLease>(&key_of(name))
                .await;
        }
    }

    /// Takes the lease of `name` for one order, then, when other nodes
    /// are live and the lease is new, waits [`SETTLE_ROUNDS`] gossip
    /// rounds and orders only if it still wins and the name is still due
    /// (a certificate may have come meanwhile).
    async fn take_lease(
        &self,
        name: &str,
        limit: Duration,
        seen: &mut HashMap<String, String>,
        stop: &CancellationToken,
    ) -> Result<Taken, AcmeError> {
        let settle = self.cluster.gossip_interval() * SETTLE_ROUNDS;
        let until = SystemTime::now() + settle + limit + LEASE_MARGIN;
        let kept = self.publish_lease(name, until).await?;
        if kept || self.cluster.member_ids().len() <= 1 {
            return Ok(Taken::Won);
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(Taken::Stopped),
            _ = tokio::time::sleep(settle) => {}
        }
        self.adopt(name, seen);
        let now = SystemTime::now();
        let due = self.due(name, now);
        if due > now {
            self.withdraw_lease(name).await;
            return Ok(Taken::StoodDown(due));
        }
        match self.lease(name) {
            Some(lease) if !lease.this_node => {
                self.withdraw_lease(name).await;
                self.stood_down.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    name,
                    holder = lease.holder,
                    "another node took the lease first; standing down"
                );
                Ok(Taken::StoodDown(lease.expires_at))
            }
            _ => Ok(Taken::Won),
        }
    }

    /// Orders, keeps, installs and shares `name`'s certificate.
    async fn issue(
        &self,
        account: &mut Option<Account>,
        name: &str,
        key_type: KeyType,
    ) -> Result<(SystemTime, SystemTime), AcmeError> {
        if account.is_none() {
            *account = Some(issue::account(&self.config, &self.dir).await?);
        }
        let account = account.as_ref().expect("made above");
        let issued = issue::order(
            account,
            issue::Answering {
                challenges: &self.challenges,
                cluster: &self.cluster,
                cleanups: &self.cleanups,
            },
            (self.config.challenge, self.config.dns_hook.as_ref()),
            name,
            key_type,
        )
        .await?;
        let cert = ServingCert::from_pem(
            Pem::new("the issued chain", issued.chain_pem.as_bytes()),
            Pem::new("its key", issued.key_pem.as_bytes()),
        )
        .map_err(|e| AcmeError::Issued(e.to_string()))?;
        let (cert, not_before, not_after) = validity(cert)?;
        store::save(&self.dir, name, &issued.chain_pem, &issued.key_pem)?;
        self.certs.set(CertSource::Acme, name, &cert);
        let shared = AcmeCertificate {
            name: name.to_string(),
            certificate_pem: issued.chain_pem,
            private_key_sealed: self.cluster.seal(issued.key_pem.as_bytes()),
            ordered_by: self.me().to_string(),
        };
        if let Err(e) = self.cluster.put_object(&key_of(name), &shared).await {
            // Served here; the others order it themselves once their
            // leases allow (this node's lease is withdrawn).
            tracing::warn!(name, error = %e.detail, "the issued certificate was not shared with the cluster");
        }
        Ok((not_before, not_after))
    }

    /// Records an order's outcome; after a failure this node keeps the
    /// lease until its retry.
    async fn record(&self, name: &str, result: Result<(SystemTime, SystemTime), AcmeError>) {
        match result {
            Ok(validity) => {
                self.issued.fetch_add(1, Ordering::Relaxed);
                self.served(name, validity, Some(self.me().to_string()));
                self.withdraw_lease(name).await;
                tracing::info!(
                    name,
                    not_after = %humantime::format_rfc3339_seconds(validity.1),
                    "ACME certificate issued, installed and shared"
                );
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let (min, max) = (self.config.retry_min, self.config.retry_max);
                let (failures, wait) = self.with_status(name, |s| {
                    s.failures += 1;
                    s.ordering_since = None;
                    s.last_error = Some(e.to_string());
                    let wait = backoff(s.failures, min, max);
                    s.retries_at = Some(SystemTime::now() + wait);
                    (s.failures, wait)
                });
                tracing::warn!(
                    name,
                    error = %e,
                    failures,
                    retry_in = ?wait,
                    "ACME order failed; the certificate already served (if any) stays served"
                );
                let limit = self.config.order_timeout(ORDER_TIMEOUT);
                let until = SystemTime::now() + wait + limit + LEASE_MARGIN;
                if let Err(e) = self.publish_lease(name, until).await {
                    tracing::warn!(name, error = %e, "the lease was not kept until the retry");
                }
            }
        }
    }

    /// Withdraws the leases of names this node no longer orders.
    async fn release(&self, ordered: &[Ordered]) {
        let stale: Vec<String> = self
            .held
            .lock()
            .expect("acme lease lock")
            .keys()
            .filter(|name| !ordered.iter().any(|o| o.name == **name))
            .cloned()
            .collect();
        for name in stale {
            self.withdraw_lease(&name).await;
        }
    }
}

/// The reserved domains with a certificate policy, as `(id, name)`, by id.
fn reserved_ids(cluster: &ClusterNode) -> Vec<(String, String)> {
    let mut ids: Vec<(String, String)> = cluster
        .objects::<ReservedDomain>()
        .into_iter()
        .filter(|(_, r)| r.certificate_management_policy.is_some())
        .map(|(id, r)| (id, r.domain))
        .collect();
    ids.sort();
    ids
}

/// A name this node orders.
struct Ordered {
    name: String,
    key_type: KeyType,
    /// For a name ordered on demand, the wildcard reserved domain it is
    /// bound under.
    under: Option<String>,
}

impl Shared {
    /// The names this node orders: those the cluster's reserved domains
    /// ask certificates for, the wildcards only when it has the DNS hook
    /// that proves them (the API refuses them at a node without one, but
    /// another node may have one); this region's names of the agent
    /// ingresses with a policy (each region's nodes order their own); and
    /// with `acme.on_demand`, of the names bound under a wildcard with a
    /// policy (`on_demand`), those no certificate served here covers
    /// unless ordered before (a wildcard's own certificate, an uploaded
    /// one).
    fn managed(&self, on_demand: Vec<on_demand::OnDemandName>) -> Vec<Ordered> {
        let cluster = &self.cluster;
        let ordered = |(name, key_type)| Ordered {
            name,
            key_type,
            under: None,
        };
        let mut names: Vec<Ordered> = reserved_policy_names(cluster)
            .into_iter()
            .filter(|(name, _)| self.config.dns_hook.is_some() || !name.starts_with("*."))
            .map(ordered)
            .collect();
        let here = BTreeSet::from([cluster.region().to_string()]);
        names.extend(
            ingress_policy_names(cluster, &here)
                .into_iter()
                .map(ordered),
        );
        if self.admissions.is_some() {
            names.extend(
                on_demand
                    .into_iter()
                    .filter(|o| {
                        self.with_status(&o.name, |s| s.not_after.is_some())
                            || !self.certs.serves(&o.name)
                    })
                    .map(|o| Ordered {
                        name: o.name,
                        key_type: o.key_type,
                        under: Some(o.under),
                    }),
            );
        }
        names
    }
}

async fn run(
    shared: Arc<Shared>,
    mut changes: broadcast::Receiver<Change>,
    stop: CancellationToken,
) {
    let mut account: Option<Account> = None;
    let mut listening = true;
    let mut seen = HashMap::new();
    loop {
        let mut next = SystemTime::now() + SCAN;
        let on_demand = on_demand_names(&shared.cluster);
        let names = policy_names(&shared.cluster).into_iter().map(|(n, _)| n);
        for name in names.chain(on_demand.iter().map(|o| o.name.clone())) {
            shared.adopt(&name, &mut seen);
        }
        let ordered = shared.managed(on_demand);
        shared.release(&ordered).await;
        for Ordered {
            name,
            key_type,
            under,
        } in ordered
        {
            if let Turn::Wait(until) = shared.turn(&name, SystemTime::now()) {
                next = next.min(until);
                continue;
            }
            // A first order on demand, within the wildcard's hourly limit.
            let first_on_demand = under
                .as_deref()
                .zip(shared.admissions.as_ref())
                .filter(|_| shared.with_status(&name, |s| s.not_after.is_none()));
            if let Some((under, admissions)) = first_on_demand
                && let Err(until) = admissions.check(under, &name, SystemTime::now())
            {
                next = next.min(until);
                continue;
            }
            let limit = shared.config.order_timeout(ORDER_TIMEOUT);
            match shared.take_lease(&name, limit, &mut seen, &stop).await {
                Ok(Taken::Won) => {}
                Ok(Taken::StoodDown(until)) => {
                    next = next.min(until);
                    continue;
                }
                Ok(Taken::Stopped) => return,
                Err(e) => {
                    tracing::warn!(name, error = %e, "the lease could not be taken; no order");
                    next = next.min(SystemTime::now() + shared.config.retry_min);
                    continue;
                }
            }
            let now = SystemTime::now();
            if let Some((under, admissions)) = first_on_demand {
                admissions.record(under, &name, now);
            }
            shared.with_status(&name, |s| s.ordering_since = Some(now));
            tracing::info!(name, "ordering an ACME certificate");
            let order = tokio::time::timeout(limit, shared.issue(&mut account, &name, key_type));
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                result = order => result.unwrap_or(Err(AcmeError::Timeout(limit))),
            };
            if result.is_err() {
                // Made again on the next try: the CA may have
                // forgotten it, or been down while it was made.
                account = None;
            }
            shared.record(&name, result).await;
            next = next.min(shared.due(&name, SystemTime::now()));
        }
        let wait = next.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            change = changes.recv(), if listening => {
                listening = !matches!(change, Err(broadcast::error::RecvError::Closed));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_at_the_fraction_of_the_lifetime() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_secs(90 * 86400);
        assert_eq!(
            renewal(start, end, 2.0 / 3.0),
            start + Duration::from_secs(60 * 86400)
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_stops_at_the_max() {
        let (min, max) = (Duration::from_secs(60), Duration::from_secs(3600));
        for (failures, ceiling) in [(1, 60), (2, 120), (3, 240), (7, 3600), (40, 3600)] {
            let wait = backoff(failures, min, max);
            let ceiling = Duration::from_secs(ceiling);
            assert!(
                wait <= ceiling && wait >= ceiling / 2,
                "{failures}: {wait:?}"
            );
        }
        let waits: std::collections::HashSet<Duration> =
            (0..20).map(|_| backoff(3, min, max)).collect();
        assert!(waits.len() > 1, "jittered");
    }

    #[test]
    fn due_now_without_a_certificate_then_at_retry_or_renewal() {
        let now = SystemTime::now();
        let mut status = CertStatus::default();
        assert_eq!(status.due(now), now);
        status.renews_at = Some(now + Duration::from_secs(100));
        assert_eq!(status.due(now), now + Duration::from_secs(100));
        status.retries_at = Some(now + Duration::from_secs(5));
        assert_eq!(status.due(now), now + Duration::from_secs(5));
    }
}
