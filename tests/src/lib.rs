//! Harness for Postern's end-to-end tests: a real edge and real agents
//! (in-process through the libraries, or as the built binaries), real
//! upstream servers on loopback, and real clients (curl, openssl, a Rust
//! HTTPS client). Everything binds 127.0.0.1 on port 0.

mod client;
pub mod cluster;
mod edge;
mod grpc;
mod kafka;
pub mod netns;
mod oidc;
mod otlp;
mod pebble;
mod pki;
mod process;
mod raw_agent;
mod redis;
mod relay;
mod upstream;

pub use client::{
    HttpsClient, Response, curl, http1_get_all, openssl_s_client, stream_each_way, websocket_echo,
    websocket_to_tcp_echo,
};
pub use edge::{ACL_TOKEN, API_KEY, DOMAIN, EVENTS_TO_FILE, TestEdge, init, url_of};
pub use grpc::{grpc_client, grpc_expected, grpc_script, grpc_server};
pub use kafka::{
    Broker, Consumed, KafkaTlsFront, assert_schema_valid, consume, consume_with,
    kafka_subscription, python, topic, topic_template,
};
pub use oidc::{
    Browser, CLIENT_ID, CLIENT_SECRET, ChromiumLogin, OidcProvider, Page, chromium_login, oidc_dir,
    resolve, spki_hash,
};
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use pebble::{Pebble, acme_toml, served_serial};
pub use pki::{Issued, TestCa, seed_001_certificates, with_mounted_secrets};
pub use process::{Spawned, binary, free_port, read_rss_kib};
pub use raw_agent::RawSession;
pub use redis::{RedisCluster, RedisServer};
pub use relay::TcpRelay;
pub use upstream::{HttpUpstream, Recorded, Script, ScriptedUpstream, TcpEcho, TlsUpstream};

use std::path::PathBuf;

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("postern-test-{tag}-{}", rand_suffix()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> String {
    postern_net::random_label()
}

/// Waits until `check` holds, polling every 20 ms, or panics after `secs`.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("timed out after {secs}s waiting for: {what}");
}
