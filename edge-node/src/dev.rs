//! `postern-edge --dev`: one node on loopback with a local CA, a generated
//! authtoken and every name under `postern.localhost`, which resolves to
//! 127.0.0.1 in curl and browsers (RFC 6761).

use std::path::{Path, PathBuf};

use postern_net::Secret;

use crate::{
    config::{EdgeConfig, RawConfig, RawListen, RawPublic, RawTcp, RawTls},
    error::ConfigError,
};

/// The dev domain.
pub const DEV_DOMAIN: &str = "postern.localhost";
const TOKEN_FILE: &str = "dev-authtoken";
/// Where `--dev` serves ngrok's SDKs.
pub const DEV_NGROK_AGENT: &str = "127.0.0.1:4444";
const API_KEY_FILE: &str = "dev-api-key";

/// A random secret kept in a file of the data directory.
fn kept_secret(data_dir: &Path, file: &str, prefix: &str) -> Result<String, ConfigError> {
    let path = data_dir.join(file);
    if let Ok(secret) = std::fs::read_to_string(&path) {
        return Ok(secret.trim().to_string());
    }
    let secret = postern_net::random_id(prefix);
    std::fs::write(&path, &secret).map_err(|source| ConfigError::DevFiles {
        action: "writing",
        path: path.clone(),
        source,
    })?;
    Ok(secret)
}

/// A dev node's config, the token agents use and the admin API key.
pub struct DevSetup {
    pub config: EdgeConfig,
    pub authtoken: String,
    pub api_key: String,
}

/// Where `--dev` writes every event, under the data directory.
pub const DEV_EVENTS_FILE: &str = "events.jsonl";

/// Every event as a JSON line in `<data_dir>/events.jsonl`.
fn dev_events() -> postern_events::RawEventsConfig {
    let source = |t: &str| postern_events::RawSource {
        event_type: t.into(),
        filter: None,
        fields: None,
    };
    postern_events::RawEventsConfig {
        subscriptions: vec![postern_events::RawSubscription {
            id: "dev-events".into(),
            description: "every event, as JSON lines".into(),
            sources: vec![
                source(postern_events::HTTP_REQUEST_COMPLETE),
                source(postern_events::TCP_CONNECTION_CLOSED),
            ],
            destination: postern_events::RawDestination {
                file: Some(postern_events::RawFile {
                    path: DEV_EVENTS_FILE.into(),
                }),
                kafka: None,
            },
        }],
        ..Default::default()
    }
}

/// Builds the dev config, creating the data directory and the authtoken on
/// first use.
pub fn dev_config(data_dir: &Path) -> Result<DevSetup, ConfigError> {
    std::fs::create_dir_all(data_dir).map_err(|source| ConfigError::DevFiles {
        action: "creating",
        path: data_dir.to_path_buf(),
        source,
    })?;
    let authtoken = kept_secret(data_dir, TOKEN_FILE, "dev_")?;
    let api_key = kept_secret(data_dir, API_KEY_FILE, "devkey_")?;
    let raw = RawConfig {
        node_id: Some("dev".into()),
        region: Some("us".into()),
        domain: DEV_DOMAIN.into(),
        data_dir: Some(PathBuf::from(data_dir)),
        listen: RawListen {
            agent: Some("127.0.0.1:4443".into()),
            http: Some("127.0.0.1:8080".into()),
            https: Some("127.0.0.1:8443".into()),
            admin: Some("127.0.0.1:9090".into()),
            metrics: Some("127.0.0.1:9100".into()),
            ngrok_agent: Some(DEV_NGROK_AGENT.into()),
            ssh: Some("127.0.0.1:2222".into()),
        },
        public: RawPublic {
            https_port: None,
            tcp_host: Some("localhost".into()),
            random_domain_base: Some(DEV_DOMAIN.into()),
        },
        tcp: RawTcp {
            bind_ip: Some("127.0.0.1".into()),
            ports: Some("20000-20999".into()),
        },
        tls: RawTls {
            dev_ca: true,
            ..RawTls::default()
        },
        admin: crate::config::RawAdmin {
            api_keys: vec![Secret::new(api_key.clone())],
            ..Default::default()
        },
        authtokens: vec![crate::config::RawAuthtoken {
            token: Some(Secret::new(authtoken.clone())),
            token_sha256: None,
            acl: Vec::new(),
            description: "dev token".into(),
        }],
        drain_grace: Some("5s".into()),
        events: dev_events(),
        ..RawConfig::default()
    };
    Ok(DevSetup {
        config: raw.validate()?,
        authtoken,
        api_key,
    })
}
