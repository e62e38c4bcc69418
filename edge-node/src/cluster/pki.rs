//! The cluster's internal CAs, derived from the cluster key so that every
//! node holds the same ones without exchanging a private key: one for the
//! link between nodes, one for agent ingresses. And the agent listener's
//! certificate choice: `tunnel.<this region>.<ingress domain>` gets a
//! certificate of the agent-ingress CA, any other name the node's own
//! agent certificate. An agent ingress with a certificate policy has its
//! name's ACME certificate served instead, once one is issued.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, RwLock},
};

use postern_config_sync::ClusterKey;
use postern_ingress::{CertSource, CertStore, DevCa, normalize_name};
use postern_net::{Pem, TlsError, certified_key_from_pem};
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// The CA of the link between nodes.
pub fn node_ca(cluster_id: &str, key: &ClusterKey) -> Result<DevCa, TlsError> {
    DevCa::derived(
        &format!("Postern cluster {cluster_id} node CA"),
        &key.derive("postern node-link CA v1"),
    )
}

/// The CA of agent ingresses: what agents trust (`root_cas`) to connect
/// through an agent ingress.
pub fn agent_ca(cluster_id: &str, key: &ClusterKey) -> Result<DevCa, TlsError> {
    DevCa::derived(
        &format!("Postern cluster {cluster_id} agent ingress CA"),
        &key.derive("postern agent-ingress CA v1"),
    )
}

/// Certificates for this region's names of the agent ingresses: the one
/// ACME issued for the name when there is one (an ingress with a
/// certificate policy), else one of the agent-ingress CA, issued on first
/// use.
pub struct IngressCerts {
    ca: DevCa,
    /// The gateway's certificates, where ACME installs what it issued.
    acme: Arc<CertStore>,
    region: String,
    /// The ingresses' domains.
    domains: RwLock<BTreeSet<String>>,
    issued: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl IngressCerts {
    pub fn new(ca: DevCa, acme: Arc<CertStore>, region: &str) -> IngressCerts {
        IngressCerts {
            ca,
            acme,
            region: region.to_string(),
            domains: RwLock::default(),
            issued: Mutex::default(),
        }
    }

    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    pub fn set_domains(&self, domains: BTreeSet<String>) {
        *self.domains.write().expect("domains lock") = domains;
    }

    /// The ingress domain `name` is this region's name of, if any.
    pub fn ingress_of(&self, name: &str) -> Option<String> {
        let name = normalize_name(name).ok()?;
        let domain = name.strip_prefix(&format!("tunnel.{}.", self.region))?;
        self.domains
            .read()
            .expect("domains lock")
            .contains(domain)
            .then(|| domain.to_string())
    }

    fn key_for(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.ingress_of(name)?;
        let name = normalize_name(name).ok()?;
        if let Some(key) = self.acme.get(CertSource::Acme, &name) {
            return Some(key);
        }
        let mut issued = self.issued.lock().expect("issued lock");
        if let Some(key) = issued.get(&name) {
            return Some(key.clone());
        }
        let key = self
            .ca
            .issue_pem(std::slice::from_ref(&name))
            .and_then(|(cert, key)| {
                certified_key_from_pem(
                    Pem::new(&name, cert.as_bytes()),
                    Pem::new(&name, key.as_bytes()),
                )
            })
            .inspect_err(
                |e| tracing::warn!(%name, error = %e, "issuing an agent ingress certificate"),
            )
            .ok()?;
        let key = Arc::new(key);
        issued.insert(name, key.clone());
        Some(key)
    }
}

/// The agent listener's certificate by SNI.
#[derive(Debug)]
pub struct AgentCerts {
    pub default: Arc<CertifiedKey>,
    pub ingresses: Option<Arc<IngressCerts>>,
}

impl std::fmt::Debug for IngressCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngressCerts")
            .field("region", &self.region)
            .field(
                "domains",
                &self.domains.read().map(|d| d.len()).unwrap_or(0),
            )
            .finish()
    }
}

impl ResolvesServerCert for AgentCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        hello
            .server_name()
            .zip(self.ingresses.as_ref())
            .and_then(|(name, ingresses)| ingresses.key_for(name))
            .or_else(|| Some(self.default.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_regions_names_of_known_ingresses() {
        let key = ClusterKey::from_secret("a-cluster-secret-of-32-characters-or-more").unwrap();
        let store = Arc::new(CertStore::new(None));
        let certs = IngressCerts::new(agent_ca("c1", &key).unwrap(), store.clone(), "eu");
        certs.set_domains(BTreeSet::from(["connect.acme.test".to_string()]));
        assert_eq!(
            certs.ingress_of("Tunnel.EU.connect.acme.test.").as_deref(),
            Some("connect.acme.test")
        );
        assert!(certs.ingress_of("tunnel.us.connect.acme.test").is_none());
        assert!(certs.ingress_of("tunnel.eu.connect.other.test").is_none());
        assert!(certs.key_for("tunnel.eu.connect.acme.test").is_some());
        assert!(certs.key_for("tunnel.us.connect.acme.test").is_none());
        // An ACME certificate for the name is served instead, once issued.
        let name = "tunnel.eu.connect.acme.test".to_string();
        let derived = certs.key_for(&name).unwrap().cert[0].clone();
        let other_ca = node_ca("c1", &key).unwrap();
        let (cert, key_pem) = other_ca.issue_pem(std::slice::from_ref(&name)).unwrap();
        let acme = postern_ingress::ServingCert::from_pem(
            Pem::new("cert", cert.as_bytes()),
            Pem::new("key", key_pem.as_bytes()),
        )
        .unwrap();
        store.set(CertSource::Acme, &name, &acme);
        let served = certs.key_for("Tunnel.EU.connect.acme.test").unwrap().cert[0].clone();
        assert_ne!(
            served, derived,
            "the ACME certificate, not the derived CA's"
        );
        assert_eq!(served, acme.key.cert[0]);
        // Every node derives the same CA from the same key.
        assert_eq!(
            agent_ca("c1", &key).unwrap().cert_pem(),
            certs.ca_pem(),
            "derived, not random"
        );
        assert_ne!(
            node_ca("c1", &key).unwrap().cert_pem(),
            certs.ca_pem(),
            "one CA per purpose"
        );
    }
}
