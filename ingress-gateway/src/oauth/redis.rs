//! [`SessionStore`] on Redis or Redis Cluster, shared by every node of every
//! region. Connections are made lazily and remade by the client after
//! Redis comes back; every command is bounded by a timeout, so a dead or
//! hung Redis costs a request at most that long (and the OAuth module then
//! answers 503).

use std::time::Duration;

use redis::{
    Cmd, FromRedisValue, Pipeline, TlsCertificates,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClientBuilder, ClusterConfig},
    cluster_async::ClusterConnection,
};

use super::store::{SessionStore, StoreError, StoreFuture};

/// Where Redis is. `Debug` hides passwords.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `redis://[user:password@]host:port[/db]` or `rediss://…` (TLS).
    Single(String),
    /// Seed nodes of a Redis Cluster, same URL forms.
    Cluster(Vec<String>),
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisTarget::Single(url) => write!(f, "Single({})", redact_url(url)),
            RedisTarget::Cluster(urls) => f
                .debug_list()
                .entries(urls.iter().map(|u| redact_url(u)))
                .finish(),
        }
    }
}

/// How to reach Redis.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    pub target: RedisTarget,
    /// CAs (PEM) for `rediss://`; default: the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Bound on every command, connecting included.
    pub timeout: Duration,
    /// Prepended to every key, so several deployments can share a Redis.
    pub key_prefix: String,
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Sessions in Redis.
pub struct RedisStore {
    conn: Conn,
    timeout: Duration,
    prefix: String,
    kind: &'static str,
}

/// A URL that names a password shows `********` in its place.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{}{user}:********{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

impl RedisStore {
    /// Prepares the client; no connection is made until the first command,
    /// so a node starts even while Redis is down. Must run inside a Tokio
    /// runtime.
    pub fn new(options: RedisOptions) -> Result<RedisStore, StoreError> {
        let bad = |url: &str, e: redis::RedisError| {
            StoreError::Failed(format!("{}: {e}", redact_url(url)))
        };
        let certs = || TlsCertificates {
            client_tls: None,
            root_cert: options.ca_pem.clone(),
        };
        let (conn, kind) = match &options.target {
            RedisTarget::Single(url) => {
                let client = match &options.ca_pem {
                    Some(_) => redis::Client::build_with_tls(url.as_str(), certs()),
                    None => redis::Client::open(url.as_str()),
                }
                .map_err(|e| bad(url, e))?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(options.timeout))
                    .set_response_timeout(Some(options.timeout))
                    .set_number_of_retries(2)
                    .set_min_delay(Duration::from_millis(20))
                    .set_max_delay(Duration::from_millis(500));
                let manager = ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(|e| bad(url, e))?;
                (Conn::Single(manager), "redis")
            }
            RedisTarget::Cluster(urls) => {
                let mut builder = ClusterClientBuilder::new(urls.iter().map(String::as_str))
                    .connection_timeout(options.timeout)
                    .response_timeout(options.timeout)
                    .retries(2);
                if options.ca_pem.is_some() {
                    builder = builder.certs(certs());
                }
                let client = builder.build().map_err(|e| bad(&urls.join(","), e))?;
                let config = ClusterConfig::new()
                    .set_connection_timeout(options.timeout)
                    .set_response_timeout(options.timeout);
                (
                    Conn::Cluster(client.get_pending_async_connection_with_config(config)),
                    "redis-cluster",
                )
            }
        };
        Ok(RedisStore {
            conn,
            timeout: options.timeout,
            prefix: options.key_prefix,
            kind,
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn error(&self, e: redis::RedisError) -> StoreError {
        if e.is_timeout() {
            StoreError::Timeout(self.timeout)
        } else {
            StoreError::Failed(e.to_string())
        }
    }

    async fn run<T: FromRedisValue>(&self, cmd: Cmd) -> Result<T, StoreError> {
        let query = async {
            match self.conn.clone() {
                Conn::Single(mut c) => cmd.query_async(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async(&mut c).await,
            }
        };
        match tokio::time::timeout(self.timeout, query).await {
            Ok(result) => result.map_err(|e| self.error(e)),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    async fn run_pipe<T: FromRedisValue>(&self, pipe: Pipeline) -> Result<T, StoreError> {
        let query = async {
            match self.conn.clone() {
                Conn::Single(mut c) => pipe.query_async::<T>(&mut c).await,
                Conn::Cluster(mut c) => pipe.query_async::<T>(&mut c).await,
            }
        };
        match tokio::time::timeout(self.timeout, query).await {
            Ok(result) => result.map_err(|e| self.error(e)),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }
}

impl RedisStore {
    /// Counts one hit of rate-limit bucket `key` in window number
    /// `window` (of `width`) and returns (hits in the previous window, hits
    /// in this one). One round trip: `INCR` of this window's key, which
    /// expires two windows later, and `GET` of the previous window's. Both
    /// keys carry the same hash tag, so Redis Cluster keeps them on one
    /// node; the bucket key itself is hashed (it may hold anything a CEL
    /// expression yields).
    pub async fn rate_hit(
        &self,
        key: &str,
        window: u64,
        width: Duration,
    ) -> Result<(u64, u64), StoreError> {
        let tag = super::seal::key_hash(key);
        let current = self.key(&format!("rl:{{{tag}}}:{window}"));
        let previous = self.key(&format!("rl:{{{tag}}}:{}", window.wrapping_sub(1)));
        let mut pipe = redis::pipe();
        pipe.cmd("INCR")
            .arg(&current)
            .cmd("PEXPIRE")
            .arg(&current)
            .arg(millis(width * 2))
            .ignore()
            .cmd("GET")
            .arg(&previous);
        let (current, previous): (u64, Option<u64>) = self.run_pipe(pipe).await?;
        Ok((previous.unwrap_or(0), current))
    }
}

fn millis(ttl: Duration) -> u64 {
    (ttl.as_millis() as u64).max(1)
}

impl SessionStore for RedisStore {
    fn set(&self, key: &str, value: Vec<u8>, ttl: Duration) -> StoreFuture<'_, ()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key)).arg(value).arg("PX").arg(millis(ttl));
        Box::pin(async move { self.run::<()>(cmd).await })
    }

    fn replace(&self, key: &str, value: Vec<u8>, ttl: Duration) -> StoreFuture<'_, bool> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key))
            .arg(value)
            .arg("PX")
            .arg(millis(ttl))
            .arg("XX");
        Box::pin(async move { Ok(self.run::<Option<String>>(cmd).await?.is_some()) })
    }

    fn set_if_absent(&self, key: &str, value: Vec<u8>, ttl: Duration) -> StoreFuture<'_, bool> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key))
            .arg(value)
            .arg("PX")
            .arg(millis(ttl))
            .arg("NX");
        Box::pin(async move { Ok(self.run::<Option<String>>(cmd).await?.is_some()) })
    }

    fn get(&self, key: &str) -> StoreFuture<'_, Option<Vec<u8>>> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.key(key));
        Box::pin(async move { self.run(cmd).await })
    }

    fn take(&self, key: &str) -> StoreFuture<'_, Option<Vec<u8>>> {
        let mut cmd = redis::cmd("GETDEL");
        cmd.arg(self.key(key));
        Box::pin(async move { self.run(cmd).await })
    }

    fn delete(&self, key: &str) -> StoreFuture<'_, bool> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.key(key));
        Box::pin(async move { Ok(self.run::<i64>(cmd).await? > 0) })
    }

    fn expire(&self, key: &str, ttl: Duration) -> StoreFuture<'_, bool> {
        let mut cmd = redis::cmd("PEXPIRE");
        cmd.arg(self.key(key)).arg(millis(ttl));
        Box::pin(async move { Ok(self.run::<i64>(cmd).await? == 1) })
    }

    fn set_add(&self, key: &str, member: &str, ttl: Duration) -> StoreFuture<'_, ()> {
        let key = self.key(key);
        let mut pipe = redis::pipe();
        pipe.cmd("SADD")
            .arg(&key)
            .arg(member)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(millis(ttl))
            .ignore();
        Box::pin(async move { self.run_pipe(pipe).await })
    }

    fn set_remove(&self, key: &str, member: &str) -> StoreFuture<'_, ()> {
        let mut cmd = redis::cmd("SREM");
        cmd.arg(self.key(key)).arg(member);
        Box::pin(async move { self.run::<()>(cmd).await })
    }

    fn set_members(&self, key: &str) -> StoreFuture<'_, Vec<String>> {
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(self.key(key));
        Box::pin(async move { self.run(cmd).await })
    }

    fn kind(&self) -> &'static str {
        self.kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://app:s3cret@cache:6379/0"),
            "redis://app:********@cache:6379/0"
        );
        assert_eq!(
            redact_url("rediss://:s3cret@cache:6380"),
            "rediss://:********@cache:6380"
        );
        assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
        let target = RedisTarget::Cluster(vec!["redis://:pw@a:1".into()]);
        assert!(!format!("{target:?}").contains("pw"));
    }
}
