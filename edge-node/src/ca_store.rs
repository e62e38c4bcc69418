//! The certificate-authority store: CAs uploaded through the admin API,
//! referenced by endpoints as `mutual_tls_cas: [id, …]`. Ids are derived
//! from the SHA-256 fingerprint, so the same CA always has the same id
//! (Tyk's predictable ids). The store persists to one JSON file in the data
//! directory; a private key uploaded with a CA is kept only encrypted
//! (AES-256-GCM) and never returned.
//!
//! Every read goes through [`CaResolver`], so endpoints see a deletion or a
//! replacement at their next handshake.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use base64::Engine;
use postern_net::{CaCert, CaError, CaResolver, ca_cert, parse_ca_bundle};
use postern_proto::{ErrorCode, Failure};
use ring::aead;
use rustls::pki_types::{
    CertificateDer,
    pem::{PemObject, SectionKind},
};
use serde::{Deserialize, Serialize};

/// A stored CA with what the API shows about it.
#[derive(Clone, Debug)]
pub struct StoredCa {
    pub id: String,
    pub ca: CaCert,
    pub created_at: String,
    pub description: String,
    pub metadata: String,
    encrypted_key: Option<String>,
}

impl StoredCa {
    pub fn has_private_key(&self) -> bool {
        self.encrypted_key.is_some()
    }
}

/// What an upload carries.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCa {
    pub ca_pem: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub metadata: String,
    /// Optional; stored encrypted, never returned.
    #[serde(default)]
    pub private_key_pem: Option<String>,
}

/// A CA as stored on disk and gossiped between nodes: the certificate as
/// PEM (checked again wherever it is read), the key still encrypted.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaRecord {
    pub id: String,
    pub ca_pem: String,
    pub created_at: String,
    pub description: String,
    pub metadata: String,
    #[serde(default)]
    pub encrypted_key: Option<String>,
}

impl CaRecord {
    /// The stored CA, after the same checks as an upload: one real CA
    /// certificate whose fingerprint is the id.
    fn check(self) -> Result<StoredCa, String> {
        let mut cas = parse_ca_bundle(self.ca_pem.as_bytes()).map_err(|e| e.to_string())?;
        if cas.len() != 1 {
            return Err(format!("{} certificates; one expected", cas.len()));
        }
        let ca = cas.remove(0);
        if ca_id(&ca) != self.id {
            return Err(format!("the certificate's id is {}", ca_id(&ca)));
        }
        Ok(StoredCa {
            id: self.id,
            ca,
            created_at: self.created_at,
            description: self.description,
            metadata: self.metadata,
            encrypted_key: self.encrypted_key,
        })
    }
}

impl StoredCa {
    pub fn record(&self) -> CaRecord {
        CaRecord {
            id: self.id.clone(),
            ca_pem: pem_of(&self.ca.der),
            created_at: self.created_at.clone(),
            description: self.description.clone(),
            metadata: self.metadata.clone(),
            encrypted_key: self.encrypted_key.clone(),
        }
    }
}

/// The store.
pub struct CaStore {
    path: PathBuf,
    key: Option<aead::LessSafeKey>,
    cas: RwLock<BTreeMap<String, StoredCa>>,
    version: AtomicU64,
}

/// Now, as API objects show times.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// `ca_` + the SHA-256 fingerprint.
pub fn ca_id(ca: &CaCert) -> String {
    format!("ca_{}", ca.fingerprint)
}

/// The error code an agent or API client sees for a refused CA bundle.
pub fn ca_error_code(e: &CaError) -> ErrorCode {
    match e {
        CaError::NoPemData => ErrorCode::MTLS_NO_PEM,
        CaError::TooMany { .. } => ErrorCode::MTLS_TOO_MANY_CAS,
        _ => ErrorCode::MTLS_NOT_A_CA,
    }
}

fn failure(e: CaError) -> Failure {
    Failure::new(ca_error_code(&e), e.to_string())
}

/// Why the store's file cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {error}", path.display())]
    Parse {
        path: PathBuf,
        error: serde_json::Error,
    },
    /// A stored CA fails the checks an upload passes.
    #[error("{}: {id}: {reason}", path.display())]
    Invalid {
        path: PathBuf,
        id: String,
        reason: String,
    },
}

impl CaStore {
    /// Opens the store in `data_dir`; `secret` (any string) is the key for
    /// private keys, hashed to 256 bits.
    pub fn open(data_dir: PathBuf, secret: Option<&str>) -> Result<CaStore, OpenError> {
        let path = data_dir.join("certificate_authorities.json");
        let key = secret.map(|s| {
            let digest = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
            let unbound =
                aead::UnboundKey::new(&aead::AES_256_GCM, digest.as_ref()).expect("32-byte key");
            aead::LessSafeKey::new(unbound)
        });
        let mut cas = BTreeMap::new();
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|source| OpenError::Read {
                path: path.clone(),
                source,
            })?;
            let persisted: Vec<CaRecord> =
                serde_json::from_str(&text).map_err(|error| OpenError::Parse {
                    path: path.clone(),
                    error,
                })?;
            for p in persisted {
                // Re-checked on load: a file edited by hand gets no pass.
                let id = p.id.clone();
                let stored = p.check().map_err(|reason| OpenError::Invalid {
                    path: path.clone(),
                    id: id.clone(),
                    reason,
                })?;
                cas.insert(id, stored);
            }
        }
        Ok(CaStore {
            path,
            key,
            cas: RwLock::new(cas),
            version: AtomicU64::new(1),
        })
    }

    /// Adds (or replaces, same id) a CA. Exactly one certificate, a CA.
    pub fn insert(&self, new: NewCa) -> Result<StoredCa, Failure> {
        let stored = self.prepare(new)?;
        {
            let mut cas = self.cas.write().expect("ca store lock");
            cas.insert(stored.id.clone(), stored.clone());
            self.persist(&cas)?;
        }
        self.version.fetch_add(1, Ordering::SeqCst);
        Ok(stored)
    }

    /// Checks an upload and builds what [`CaStore::insert`] would store,
    /// without storing it (a cluster node stores what the cluster merged).
    pub fn prepare(&self, new: NewCa) -> Result<StoredCa, Failure> {
        let mut certificates = Vec::new();
        let mut key_pem = new.private_key_pem.clone();
        for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(new.ca_pem.as_bytes()) {
            let (kind, der) = section.map_err(|e| failure(CaError::BadPem(e.to_string())))?;
            match kind {
                SectionKind::Certificate => certificates.push(der),
                SectionKind::PrivateKey
                | SectionKind::RsaPrivateKey
                | SectionKind::EcPrivateKey
                    if key_pem.is_none() =>
                {
                    key_pem = Some(new.ca_pem.clone());
                }
                other => {
                    return Err(failure(CaError::NotACertificate {
                        index: certificates.len() + 1,
                        kind: format!("{other:?}"),
                    }));
                }
            }
        }
        let der = match certificates.len() {
            0 => return Err(failure(CaError::NoPemData)),
            1 => certificates.remove(0),
            n => {
                return Err(Failure::new(
                    ErrorCode::API_BAD_REQUEST,
                    format!("{n} certificates in one upload; upload each CA on its own"),
                ));
            }
        };
        let ca = ca_cert(1, CertificateDer::from(der)).map_err(failure)?;
        let encrypted_key = match (key_pem, &self.key) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(Failure::new(
                    ErrorCode::API_BAD_REQUEST,
                    "a private key is stored only when admin.key_encryption_secret is set",
                ));
            }
            (Some(pem), Some(key)) => Some(seal(key, pem.as_bytes())),
        };
        Ok(StoredCa {
            id: ca_id(&ca),
            created_at: now_rfc3339(),
            description: new.description,
            metadata: new.metadata,
            ca,
            encrypted_key,
        })
    }

    /// Makes the store hold exactly `records` (the cluster's CAs), each
    /// checked as an upload is; a record that fails is left out and logged.
    pub fn replace_all(&self, records: Vec<CaRecord>) -> Result<(), Failure> {
        let mut next = BTreeMap::new();
        for record in records {
            let id = record.id.clone();
            match record.check() {
                Ok(stored) => {
                    next.insert(id, stored);
                }
                Err(e) => {
                    tracing::warn!(id, error = %e, "a certificate authority from the cluster is refused");
                }
            }
        }
        let mut cas = self.cas.write().expect("ca store lock");
        let same = cas.len() == next.len()
            && cas.iter().zip(&next).all(|((a, x), (b, y))| {
                a == b
                    && x.ca.fingerprint == y.ca.fingerprint
                    && x.description == y.description
                    && x.metadata == y.metadata
                    && x.encrypted_key == y.encrypted_key
            });
        if !same {
            *cas = next;
            self.persist(&cas)?;
            self.version.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    pub fn get_stored(&self, id: &str) -> Option<StoredCa> {
        self.cas.read().expect("ca store lock").get(id).cloned()
    }

    pub fn list(&self) -> Vec<StoredCa> {
        self.cas
            .read()
            .expect("ca store lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn delete(&self, id: &str) -> Result<bool, Failure> {
        let mut cas = self.cas.write().expect("ca store lock");
        let removed = cas.remove(id).is_some();
        if removed {
            self.persist(&cas)?;
            self.version.fetch_add(1, Ordering::SeqCst);
        }
        Ok(removed)
    }

    fn persist(&self, cas: &BTreeMap<String, StoredCa>) -> Result<(), Failure> {
        let persisted: Vec<CaRecord> = cas.values().map(StoredCa::record).collect();
        let text = serde_json::to_string_pretty(&persisted).expect("CAs serialise");
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| {
            Failure::new(
                ErrorCode::INTERNAL,
                format!("saving {}: {e}", self.path.display()),
            )
        })
    }
}

impl CaResolver for CaStore {
    fn get(&self, id: &str) -> Option<CaCert> {
        self.cas
            .read()
            .expect("ca store lock")
            .get(id)
            .map(|s| s.ca.clone())
    }

    fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }
}

/// One certificate as PEM.
pub fn pem_of(der: &CertificateDer<'_>) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// AES-256-GCM with a random nonce; base64 of nonce ‖ ciphertext ‖ tag.
fn seal(key: &aead::LessSafeKey, plaintext: &[u8]) -> String {
    let nonce_bytes: [u8; 12] = rand::random();
    let mut buf = plaintext.to_vec();
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key(nonce_bytes),
        aead::Aad::empty(),
        &mut buf,
    )
    .expect("AES-GCM sealing cannot fail for small inputs");
    let mut out = nonce_bytes.to_vec();
    out.extend_from_slice(&buf);
    base64::engine::general_purpose::STANDARD.encode(out)
}

#[cfg(test)]
fn open_sealed(key: &aead::LessSafeKey, sealed: &str) -> Option<Vec<u8>> {
    let mut bytes = base64::engine::general_purpose::STANDARD
        .decode(sealed)
        .ok()?;
    if bytes.len() < 12 {
        return None;
    }
    let mut rest = bytes.split_off(12);
    let nonce = aead::Nonce::try_assume_unique_for_key(&bytes).ok()?;
    let plain = key
        .open_in_place(nonce, aead::Aad::empty(), &mut rest)
        .ok()?;
    Some(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem(name: &str, is_ca: bool) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        if is_ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    #[test]
    fn insert_list_delete_persist_and_refuse() {
        let dir = std::env::temp_dir().join(format!("postern-castore-{}", rand::random::<u64>()));
        let store = CaStore::open(dir.clone(), Some("secret")).unwrap();
        let (pem, key) = ca_pem("Store CA", true);
        let v0 = store.version();
        let stored = store
            .insert(NewCa {
                ca_pem: format!("{pem}{key}"),
                ..Default::default()
            })
            .unwrap();
        assert!(stored.id.starts_with("ca_") && stored.id.len() == 3 + 64);
        assert!(stored.has_private_key());
        assert!(store.version() > v0);
        let sealed = stored.encrypted_key.clone().unwrap();
        assert!(!sealed.contains("PRIVATE KEY"), "never stored in the clear");
        let k = store.key.as_ref().unwrap();
        assert_eq!(
            open_sealed(k, &sealed).unwrap(),
            format!("{pem}{key}").as_bytes()
        );
        let on_disk = std::fs::read_to_string(dir.join("certificate_authorities.json")).unwrap();
        assert!(!on_disk.contains("PRIVATE KEY"));

        let again = CaStore::open(dir.clone(), Some("secret")).unwrap();
        assert_eq!(again.list().len(), 1, "persists across restarts");
        assert_eq!(
            CaResolver::get(&again, &stored.id).unwrap().fingerprint,
            stored.ca.fingerprint
        );

        let (leaf, _) = ca_pem("Not a CA", false);
        let err = store
            .insert(NewCa {
                ca_pem: leaf,
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::MTLS_NOT_A_CA);
        assert!(err.detail.contains("CN=Not a CA"), "{err}");

        assert!(store.delete(&stored.id).unwrap());
        assert!(CaResolver::get(&store, &stored.id).is_none());
        assert!(CaStore::open(dir.clone(), None).unwrap().list().is_empty());
        let no_secret = CaStore::open(dir.clone(), None).unwrap();
        let err = no_secret
            .insert(NewCa {
                ca_pem: format!("{pem}{key}"),
                ..Default::default()
            })
            .unwrap_err();
        assert!(err.detail.contains("key_encryption_secret"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
