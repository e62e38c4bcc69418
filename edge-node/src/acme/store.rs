//! Issued certificates on disk, under `<data_dir>/acme/`: per name a chain
//! (`<name>.pem`) and its key (`<name>.key.pem`, mode 0600), each written
//! whole and renamed into place, so a restart serves what was issued
//! without asking the CA.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use postern_ingress::ServingCert;
use postern_net::Pem;

use super::AcmeError;

/// Writes `bytes` to `path` (owner-only), replacing it atomically.
pub(super) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AcmeError> {
    let io = |source| AcmeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key.pem")),
    )
}

/// Keeps `name`'s chain and key; the key first, so a chain on disk always
/// has its key.
pub(super) fn save(
    dir: &Path,
    name: &str,
    chain_pem: &str,
    key_pem: &str,
) -> Result<(), AcmeError> {
    let (chain, key) = paths(dir, name);
    write_private(&key, key_pem.as_bytes())?;
    write_private(&chain, chain_pem.as_bytes())
}

/// `name`'s stored certificate, checked as a configured one is.
pub(super) fn load(dir: &Path, name: &str) -> Result<Option<ServingCert>, AcmeError> {
    let (chain, key) = paths(dir, name);
    let (Ok(chain_pem), Ok(key_pem)) = (std::fs::read(&chain), std::fs::read(&key)) else {
        return Ok(None);
    };
    let cert = ServingCert::from_pem(
        Pem::new(&chain.display().to_string(), &chain_pem),
        Pem::new(&key.display().to_string(), &key_pem),
    )
    .map_err(|e| AcmeError::Stored {
        path: chain,
        reason: e.to_string(),
    })?;
    Ok(Some(cert))
}

/// The names with a stored certificate.
pub(super) fn names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|f| {
            f.strip_suffix(".pem")
                .filter(|n| !n.ends_with(".key"))
                .map(str::to_string)
        })
        .collect();
    names.sort();
    names
}
