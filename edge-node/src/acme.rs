//! Certificates without hands: for every reserved domain whose
//! `certificate_management_policy` asks for it, this node orders a
//! certificate from the ACME CA of `[acme]` (HTTP-01 answered on the
//! gateway's plain-HTTP listener, or TLS-ALPN-01 on its HTTPS listener),
//! installs it in the gateway's
//! certificate store at once, keeps it in `<data_dir>/acme/` so a restart
//! serves it, and renews it once `renew_at` of its lifetime has passed.
//! A failed order is retried with jittered, doubling back-off; the
//! certificate already served stays served meanwhile. Failures show in
//! the log, in `/metrics` and in the reserved domain's
//! `certificate_management_status`.
//!
//! One task per node (owned by [`Acme`], stopped and joined at shutdown)
//! orders one name at a time. Every node orders for itself: there is no
//! cluster lease yet.

mod config;
mod issue;
mod store;

pub use config::{AcmeConfig, Challenge, DnsHook, RawAcme};

use std::{
    collections::HashMap,
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

/// How often the names are looked at when nothing changes.
const SCAN: Duration = Duration::from_secs(60);
/// The longest one order may take, from the new order to the chain,
/// besides the DNS hook's time (see [`AcmeConfig::order_timeout`]).
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);

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
}

/// What this node knows of one managed name's certificate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CertStatus {
    /// The served certificate's end, and when it is renewed.
    pub not_after: Option<SystemTime>,
    pub renews_at: Option<SystemTime>,
    /// An order is running since.
    pub ordering_since: Option<SystemTime>,
    /// Failed orders in a row, the last one's error, and the next try.
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

struct Shared {
    config: AcmeConfig,
    dir: PathBuf,
    certs: Arc<CertStore>,
    challenges: Arc<AcmeChallenges>,
    status: Mutex<HashMap<String, CertStatus>>,
    issued: AtomicU64,
    failed: AtomicU64,
    /// DNS hook cleanups still running; shutdown waits for them.
    cleanups: TaskTracker,
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
        let shared = Arc::new(Shared {
            config,
            dir,
            certs,
            challenges,
            status: Mutex::default(),
            issued: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            cleanups: TaskTracker::new(),
        });
        // What the snapshot of the cluster's config says is managed: a
        // name no longer reserved with a policy is not served again.
        let managed_names: Vec<String> = managed(&cluster, &shared.config)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for name in store::names(&shared.dir) {
            if !managed_names.contains(&name) {
                continue;
            }
            match store::load(&shared.dir, &name).and_then(|c| c.map(validity).transpose()) {
                Ok(Some((cert, not_before, not_after))) => {
                    shared.certs.set(CertSource::Acme, &name, &cert);
                    shared.served(&name, not_before, not_after);
                    tracing::info!(name, "ACME certificate loaded from disk");
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(name, error = %e, "stored ACME certificate not usable"),
            }
        }
        let stop = CancellationToken::new();
        let changes = cluster.subscribe();
        let task = tokio::spawn(run(shared.clone(), cluster, changes, stop.clone()));
        Ok(Arc::new(Acme {
            shared,
            stop,
            task: Mutex::new(Some(task)),
        }))
    }

    /// What this node knows of `name`'s managed certificate.
    pub fn status(&self, name: &str) -> Option<CertStatus> {
        self.shared
            .status
            .lock()
            .expect("acme status lock")
            .get(name)
            .cloned()
    }

    /// Orders that issued and that failed since the start, and the names
    /// whose last order failed.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        let failing = self
            .shared
            .status
            .lock()
            .expect("acme status lock")
            .values()
            .filter(|s| s.last_error.is_some())
            .count() as u64;
        vec![
            (
                "acme_orders_issued",
                self.shared.issued.load(Ordering::Relaxed),
            ),
            (
                "acme_orders_failed",
                self.shared.failed.load(Ordering::Relaxed),
            ),
            ("acme_names_failing", failing),
        ]
    }

    /// Stops ordering (an order in flight is abandoned), joins the task
    /// and waits for the DNS hook to withdraw the abandoned order's records.
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

impl Shared {
    fn with_status<T>(&self, name: &str, f: impl FnOnce(&mut CertStatus) -> T) -> T {
        let mut status = self.status.lock().expect("acme status lock");
        f(status.entry(name.to_string()).or_default())
    }

    fn served(&self, name: &str, not_before: SystemTime, not_after: SystemTime) {
        let renews_at = renewal(not_before, not_after, self.config.renew_at);
        self.with_status(name, |s| {
            *s = CertStatus {
                not_after: Some(not_after),
                renews_at: Some(renews_at),
                ..CertStatus::default()
            }
        });
    }

    fn due(&self, name: &str, now: SystemTime) -> SystemTime {
        self.with_status(name, |s| s.due(now))
    }

    /// Orders, keeps and installs `name`'s certificate.
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
            (&self.challenges, &self.cleanups),
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
        Ok((not_before, not_after))
    }

    fn record(&self, name: &str, result: Result<(SystemTime, SystemTime), AcmeError>) {
        match result {
            Ok((not_before, not_after)) => {
                self.issued.fetch_add(1, Ordering::Relaxed);
                self.served(name, not_before, not_after);
                tracing::info!(
                    name,
                    not_after = %humantime::format_rfc3339_seconds(not_after),
                    "ACME certificate issued and installed"
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
            }
        }
    }
}

/// The names the cluster's reserved domains ask certificates for; the
/// wildcards only when `config` has the DNS hook that proves them (the API
/// refuses them at a node without one, but another node may have one).
fn managed(cluster: &ClusterNode, config: &AcmeConfig) -> Vec<(String, KeyType)> {
    cluster
        .objects::<ReservedDomain>()
        .into_iter()
        .filter_map(|(_, reserved)| {
            let policy = reserved.certificate_management_policy?;
            (config.dns_hook.is_some() || !reserved.domain.starts_with("*."))
                .then_some((reserved.domain, policy.private_key_type))
        })
        .collect()
}

async fn run(
    shared: Arc<Shared>,
    cluster: Arc<ClusterNode>,
    mut changes: broadcast::Receiver<Change>,
    stop: CancellationToken,
) {
    let mut account: Option<Account> = None;
    let mut listening = true;
    loop {
        let mut next = SystemTime::now() + SCAN;
        for (name, key_type) in managed(&cluster, &shared.config) {
            let now = SystemTime::now();
            if shared.due(&name, now) <= now {
                shared.with_status(&name, |s| s.ordering_since = Some(now));
                tracing::info!(name, "ordering an ACME certificate");
                let limit = shared.config.order_timeout(ORDER_TIMEOUT);
                let order =
                    tokio::time::timeout(limit, shared.issue(&mut account, &name, key_type));
                let result = tokio::select! {
                    _ = stop.cancelled() => return,
                    result = order => result.unwrap_or(Err(AcmeError::Timeout(limit))),
                };
                if result.is_err() {
                    // Made again on the next try: the CA may have
                    // forgotten it, or been down while it was made.
                    account = None;
                }
                shared.record(&name, result);
            }
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
