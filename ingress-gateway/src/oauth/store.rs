//! Where login state, one-time codes and sessions live: a small key-value
//! contract ([`SessionStore`]) with an in-memory implementation for dev
//! nodes and unit tests, and Redis (see `redis.rs`) for every real
//! deployment, so that a session is the same in every region. One
//! conformance suite (in `tests/tests/oauth.rs`) runs against both.
//!
//! The store holds bytes; what they mean, and which secrets are sealed
//! before they get here, is the OAuth module's business.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::Duration,
};

use futures_util::future::BoxFuture;
use tokio::time::Instant;

/// The store did not answer: the OAuth module fails closed (503) on it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("the session store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the session store failed: {0}")]
    Failed(String),
}

pub type StoreFuture<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

/// The operations the OAuth module needs. Times to live are honoured to
/// the millisecond; an expired key reads as absent.
pub trait SessionStore: Send + Sync + 'static {
    /// Sets `key` to `value`, living `ttl`.
    fn set(&self, key: &str, value: Vec<u8>, ttl: Duration) -> StoreFuture<'_, ()>;
    /// As [`SessionStore::set`] if `key` exists; whether it did. A value
    /// deleted meanwhile stays deleted.
    fn replace(&self, key: &str, value: Vec<u8>, ttl: Duration) -> StoreFuture<'_, bool>;
    /// As [`SessionStore::set`] if `key` does not exist; whether it was set.
    fn set_if_absent(&self, key: &str, value: Vec<u8>, ttl: Duration) -> StoreFuture<'_, bool>;
    fn get(&self, key: &str) -> StoreFuture<'_, Option<Vec<u8>>>;
    /// Reads and deletes in one step: of concurrent takes, one gets the value.
    fn take(&self, key: &str) -> StoreFuture<'_, Option<Vec<u8>>>;
    /// Whether the key existed.
    fn delete(&self, key: &str) -> StoreFuture<'_, bool>;
    /// A new time to live; false if the key does not exist.
    fn expire(&self, key: &str, ttl: Duration) -> StoreFuture<'_, bool>;
    /// Adds `member` to the set `key` and makes the set live `ttl` from now.
    fn set_add(&self, key: &str, member: &str, ttl: Duration) -> StoreFuture<'_, ()>;
    fn set_remove(&self, key: &str, member: &str) -> StoreFuture<'_, ()>;
    fn set_members(&self, key: &str) -> StoreFuture<'_, Vec<String>>;
    /// `memory`, `redis` or `redis-cluster`, for logs.
    fn kind(&self) -> &'static str;
}

enum Value {
    Bytes(Vec<u8>),
    Set(HashSet<String>),
}

struct Entry {
    value: Value,
    expires: Instant,
}

/// Sessions in this process only: for dev nodes (sessions are then per
/// node and lost on restart) and tests. Expired entries are purged as the
/// map grows.
#[derive(Default)]
pub struct MemoryStore {
    entries: Mutex<HashMap<String, Entry>>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Entry>, Instant) -> T) -> T {
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("memory store lock");
        if entries.len() > 1024 && entries.len().is_power_of_two() {
            entries.retain(|_, e| e.expires > now);
        }
        f(&mut entries, now)
    }

    fn live<'a>(
        entries: &'a mut HashMap<String, Entry>,
        key: &str,
        now: Instant,
    ) -> Option<&'a mut Entry> {
        if entries.get(key).is_some_and(|e| e.expires <= now) {
            entries.remove(key);
        }
        entries.get_mut(key)
    }
}

fn ready<'a, T: Send + 'a>(value: T) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(Ok(value)))
}

impl SessionStore for MemoryStore {
    fn set(&self, key: &str, value: Vec<u8>, ttl: Duration) -> StoreFuture<'_, ()> {
        self.with(|entries, now| {
            entries.insert(
                key.to_string(),
                Entry {
                    value: Value::Bytes(value),
                    expires: now + ttl,
                },
            )
        });
        ready(())
    }

    fn replace(&self, key: &str, value: Vec<u8>, ttl: Duration) -> StoreFuture<'_, bool> {
        let replaced = self.with(|entries, now| match Self::live(entries, key, now) {
            Some(entry) => {
                entry.value = Value::Bytes(value);
                entry.expires = now + ttl;
                true
            }
            None => false,
        });
        ready(replaced)
    }

    fn set_if_absent(&self, key: &str, value: Vec<u8>, ttl: Duration) -> StoreFuture<'_, bool> {
        let set = self.with(|entries, now| {
            if Self::live(entries, key, now).is_some() {
                return false;
            }
            entries.insert(
                key.to_string(),
                Entry {
                    value: Value::Bytes(value),
                    expires: now + ttl,
                },
            );
            true
        });
        ready(set)
    }

    fn get(&self, key: &str) -> StoreFuture<'_, Option<Vec<u8>>> {
        let value = self.with(|entries, now| match Self::live(entries, key, now) {
            Some(Entry {
                value: Value::Bytes(b),
                ..
            }) => Some(b.clone()),
            _ => None,
        });
        ready(value)
    }

    fn take(&self, key: &str) -> StoreFuture<'_, Option<Vec<u8>>> {
        let value = self.with(|entries, now| {
            Self::live(entries, key, now)?;
            match entries.remove(key) {
                Some(Entry {
                    value: Value::Bytes(b),
                    ..
                }) => Some(b),
                _ => None,
            }
        });
        ready(value)
    }

    fn delete(&self, key: &str) -> StoreFuture<'_, bool> {
        let existed = self.with(|entries, now| {
            Self::live(entries, key, now).is_some() && entries.remove(key).is_some()
        });
        ready(existed)
    }

    fn expire(&self, key: &str, ttl: Duration) -> StoreFuture<'_, bool> {
        let found = self.with(|entries, now| match Self::live(entries, key, now) {
            Some(entry) => {
                entry.expires = now + ttl;
                true
            }
            None => false,
        });
        ready(found)
    }

    fn set_add(&self, key: &str, member: &str, ttl: Duration) -> StoreFuture<'_, ()> {
        self.with(|entries, now| {
            let expires = now + ttl;
            match Self::live(entries, key, now) {
                Some(Entry {
                    value: Value::Set(set),
                    expires: e,
                }) => {
                    set.insert(member.to_string());
                    *e = expires;
                }
                _ => {
                    entries.insert(
                        key.to_string(),
                        Entry {
                            value: Value::Set(HashSet::from([member.to_string()])),
                            expires,
                        },
                    );
                }
            }
        });
        ready(())
    }

    fn set_remove(&self, key: &str, member: &str) -> StoreFuture<'_, ()> {
        self.with(|entries, now| {
            let empty = match Self::live(entries, key, now) {
                Some(Entry {
                    value: Value::Set(set),
                    ..
                }) => {
                    set.remove(member);
                    set.is_empty()
                }
                _ => false,
            };
            if empty {
                entries.remove(key);
            }
        });
        ready(())
    }

    fn set_members(&self, key: &str) -> StoreFuture<'_, Vec<String>> {
        let members = self.with(|entries, now| match Self::live(entries, key, now) {
            Some(Entry {
                value: Value::Set(set),
                ..
            }) => set.iter().cloned().collect(),
            _ => Vec::new(),
        });
        ready(members)
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
