//! The cluster's internal CA, derived from the cluster key (an Ed25519 key
//! from a key-derived seed, and a certificate with fixed fields), so every
//! node builds the same CA without shipping a CA key around. It issues the
//! node certificates of the inter-node link and the certificates of agent
//! ingresses (`tunnel.<region>.<ingress domain>`); agents trust it through
//! `<data_dir>/cluster-ca.pem`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use anyhow::Context;
use postern_config_sync::{Cluster, ClusterKey};
use postern_ingress::certified_key_from_pem;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use super::objects::AgentIngress;

/// The name in every node certificate, checked by the other nodes.
pub const NODE_NAME: &str = "node.postern.internal";

/// File in the data directory holding the CA certificate.
pub const CA_FILE: &str = "cluster-ca.pem";

pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl ClusterCa {
    pub fn derive(key: &ClusterKey, cluster_id: &str) -> anyhow::Result<ClusterCa> {
        // PKCS#8 v1 for Ed25519 is a fixed prefix and the 32-byte seed.
        let mut pkcs8 = hex::decode("302e020100300506032b657004220420").expect("hex");
        pkcs8.extend_from_slice(&key.derive("postern cluster ca ed25519 v1"));
        let key = KeyPair::try_from(pkcs8.as_slice()).context("cluster CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Postern cluster CA ({cluster_id})"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2049, 12, 31);
        params.serial_number = Some(SerialNumber::from(1u64));
        let cert = params.self_signed(&key).context("cluster CA certificate")?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for `names` (server and client use); (chain, key) PEM.
    pub fn issue(&self, names: &[String]) -> anyhow::Result<(String, String)> {
        let mut params = CertificateParams::new(names.to_vec())?;
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2049, 12, 31);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    pub fn certified_key(&self, names: &[String]) -> anyhow::Result<CertifiedKey> {
        let (cert, key) = self.issue(names)?;
        Ok(certified_key_from_pem(
            "cluster CA certificate",
            cert.as_bytes(),
            key.as_bytes(),
        )?)
    }

    /// The CA as a trust store.
    pub fn roots(&self) -> rustls::RootCertStore {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let mut roots = rustls::RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(self.cert_pem.as_bytes()).flatten() {
            let _ = roots.add(der);
        }
        roots
    }
}

/// The agent listener's certificates: the node's own agent name, and
/// `tunnel.<region>.<domain>` for every agent ingress in the cluster.
pub struct AgentCerts {
    pub default: Arc<CertifiedKey>,
    pub region: String,
    pub cluster: Cluster,
    pub ca: Arc<ClusterCa>,
    pub issued: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for AgentCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCerts")
            .field("region", &self.region)
            .finish()
    }
}

impl AgentCerts {
    fn for_ingress(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let sni = sni.to_ascii_lowercase();
        let domain = sni.strip_prefix(&format!("tunnel.{}.", self.region))?;
        let known = self
            .cluster
            .list::<AgentIngress>()
            .iter()
            .any(|(_, i)| i.domain == domain);
        if !known {
            return None;
        }
        let mut issued = self.issued.lock().expect("issued lock");
        if let Some(key) = issued.get(&sni) {
            return Some(key.clone());
        }
        match self.ca.certified_key(std::slice::from_ref(&sni)) {
            Ok(key) => {
                let key = Arc::new(key);
                issued.insert(sni, key.clone());
                Some(key)
            }
            Err(e) => {
                tracing::warn!(name = %sni, error = %e, "no certificate for the agent ingress");
                None
            }
        }
    }
}

impl ResolvesServerCert for AgentCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        hello
            .server_name()
            .and_then(|sni| self.for_ingress(sni))
            .or_else(|| Some(self.default.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_derives_the_same_ca_and_its_leaves_verify() {
        let key = ClusterKey::from_secret(&"s".repeat(40)).unwrap();
        let a = ClusterCa::derive(&key, "c1").unwrap();
        let b = ClusterCa::derive(&key, "c1").unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem(), "deterministic");
        let other = ClusterCa::derive(&ClusterKey::from_secret(&"t".repeat(40)).unwrap(), "c1").unwrap();
        assert_ne!(a.cert_pem(), other.cert_pem());
        let leaf = a.certified_key(&[NODE_NAME.to_string()]).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(b.roots()),
            postern_ingress::crypto_provider(),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        let name = rustls::pki_types::ServerName::try_from(NODE_NAME).unwrap();
        verifier
            .verify_server_cert(&leaf.cert[0], &[], &name, &[], rustls::pki_types::UnixTime::now())
            .expect("a leaf of node A verifies against node B's CA");
    }
}
