//! `postern-edge --dev`: one node on loopback with a local CA, a generated
//! authtoken and every name under `postern.localhost`, which resolves to
//! 127.0.0.1 in curl and browsers (RFC 6761).

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::{EdgeConfig, RawConfig, RawListen, RawPublic, RawTcp, RawTls};

/// The dev domain.
pub const DEV_DOMAIN: &str = "postern.localhost";
const TOKEN_FILE: &str = "dev-authtoken";

/// A dev node's config and the token agents use.
pub struct DevSetup {
    pub config: EdgeConfig,
    pub authtoken: String,
}

/// Builds the dev config, creating the data directory and the authtoken on
/// first use.
pub fn dev_config(data_dir: &Path) -> anyhow::Result<DevSetup> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let token_path = data_dir.join(TOKEN_FILE);
    let authtoken = match std::fs::read_to_string(&token_path) {
        Ok(token) => token.trim().to_string(),
        Err(_) => {
            let token = postern_ingress::random_id("dev_");
            std::fs::write(&token_path, &token)
                .with_context(|| format!("writing {}", token_path.display()))?;
            token
        }
    };
    let raw = RawConfig {
        node_id: Some("dev".into()),
        region: Some("us".into()),
        domain: DEV_DOMAIN.into(),
        data_dir: Some(PathBuf::from(data_dir)),
        listen: RawListen {
            agent: Some("127.0.0.1:4443".into()),
            http: Some("127.0.0.1:8080".into()),
            https: Some("127.0.0.1:8443".into()),
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
        authtokens: vec![crate::config::RawAuthtoken {
            token: Some(authtoken.clone()),
            token_sha256: None,
            acl: Vec::new(),
            description: "dev token".into(),
        }],
        drain_grace: Some("5s".into()),
        ..RawConfig::default()
    };
    Ok(DevSetup {
        config: raw.validate()?,
        authtoken,
    })
}
