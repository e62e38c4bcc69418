//! The records the OAuth module keeps in the store, their keys and times
//! to live, and the admin operations on sessions (list, revoke).
//!
//! | key | value | lives |
//! |---|---|---|
//! | `state:<h(state)>` | [`LoginState`], sealed | the login timeout (15 min) |
//! | `handoff:<h(code)>` | [`Handoff`] (state + IdP code), sealed | 60 s, taken once |
//! | `session:<h(cookie)>` | [`SessionRecord`], tokens sealed | max duration / inactivity, else 30 days sliding |
//! | `user:<h(user id)>`, `email:<h(email)>` | set of session ids | 30 days from the last touch |
//! | `check:<session id>` | lock while one node re-checks a user | 30 s |
//!
//! `h` is the first 128 bits of SHA-256: the store never holds a value a
//! browser could present.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{
    OAuthService,
    seal::{self, key_hash},
    store::StoreError,
};

/// How long a handed-off login may wait for the browser.
pub const HANDOFF_TTL: Duration = Duration::from_secs(60);
/// Longest life of a session and its index entries without activity, when
/// neither a maximum duration nor an inactivity timeout is set.
pub const SESSION_CAP: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long one node may hold a user's re-check.
pub const CHECK_LOCK: Duration = Duration::from_secs(30);

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn state_key(state: &str) -> String {
    format!("state:{}", key_hash(state))
}

pub fn handoff_key(code: &str) -> String {
    format!("handoff:{}", key_hash(code))
}

pub fn session_key(id: &str) -> String {
    format!("session:{id}")
}

fn user_index(user_id: &str) -> String {
    format!("user:{}", key_hash(user_id))
}

fn email_index(email: &str) -> String {
    format!("email:{}", key_hash(&email.to_ascii_lowercase()))
}

pub fn check_lock(id: &str) -> String {
    format!("check:{id}")
}

/// A login in progress, from the redirect to the IdP until the callback.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoginState {
    /// The endpoint host the login started on (normalised).
    pub host: String,
    pub provider: String,
    pub client_id: String,
    /// The OIDC issuer, for the callback's `iss`.
    pub issuer: Option<String>,
    /// Where the browser goes after login (already checked).
    pub return_to: String,
    /// Suffix of the nonce cookie's name.
    pub attempt: String,
    /// `h(nonce cookie value)`: binds the login to the browser.
    pub binding: String,
    pub pkce_verifier: String,
    pub nonce: String,
    pub redirect_uri: String,
    /// Milliseconds since the epoch.
    pub created: u64,
}

/// A state swapped for a one-time code by the auth host, with the IdP's code.
#[derive(Debug, Serialize, Deserialize)]
pub struct Handoff {
    pub state: LoginState,
    pub code: String,
}

/// A session. The cookie holds only a random id; this record is at
/// `session:<h(cookie)>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionRecord {
    /// `h(cookie)`, also the admin API's id (`oas_<id>`).
    pub id: String,
    pub host: String,
    pub provider: String,
    pub client_id: String,
    /// The endpoint configuration the user was last checked against.
    pub config: String,
    pub user_id: String,
    pub user_name: Option<String>,
    /// Only a verified, well-formed address.
    pub email: Option<String>,
    /// [`super::provider::Tokens`], sealed.
    pub tokens: String,
    /// Milliseconds since the epoch.
    pub created: u64,
    pub last_seen: u64,
    pub last_check: u64,
}

/// A session as the admin API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SessionView {
    pub id: String,
    pub host: String,
    pub provider: String,
    pub app_client_id: String,
    pub user_id: String,
    pub user_name: Option<String>,
    pub user_email: Option<String>,
    /// Milliseconds since the epoch.
    pub created_at_ms: u64,
    pub last_active_ms: u64,
    pub last_checked_ms: u64,
}

impl From<&SessionRecord> for SessionView {
    fn from(r: &SessionRecord) -> SessionView {
        SessionView {
            id: format!("oas_{}", r.id),
            host: r.host.clone(),
            provider: r.provider.clone(),
            app_client_id: r.client_id.clone(),
            user_id: r.user_id.clone(),
            user_name: r.user_name.clone(),
            user_email: r.email.clone(),
            created_at_ms: r.created,
            last_active_ms: r.last_seen,
            last_checked_ms: r.last_check,
        }
    }
}

/// Whose sessions.
#[derive(Clone, Debug)]
pub enum SessionQuery {
    UserId(String),
    Email(String),
}

impl OAuthService {
    pub(super) fn seal_json<T: Serialize>(&self, purpose: &str, value: &T) -> Vec<u8> {
        let json = serde_json::to_vec(value).expect("records serialise");
        self.key.seal(purpose, &json).into_bytes()
    }

    pub(super) fn open_json<T: for<'de> Deserialize<'de>>(
        &self,
        purpose: &str,
        bytes: &[u8],
    ) -> Option<T> {
        let text = std::str::from_utf8(bytes).ok()?;
        let plain = self.key.open(purpose, text).ok()?;
        serde_json::from_slice(&plain).ok()
    }

    pub(super) fn seal_str(&self, purpose: &str, plain: &[u8]) -> String {
        self.key.seal(purpose, plain)
    }

    pub(super) fn open_str(&self, purpose: &str, sealed: &str) -> Result<Vec<u8>, seal::Unseal> {
        self.key.open(purpose, sealed)
    }

    pub(super) async fn load_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self
            .store
            .get(&session_key(id))
            .await?
            .and_then(|bytes| serde_json::from_slice(&bytes).ok()))
    }

    /// Writes a new session and its index entries.
    pub(super) async fn create_session(
        &self,
        record: &SessionRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.index(record).await?;
        let bytes = serde_json::to_vec(record).expect("records serialise");
        self.store.set(&session_key(&record.id), bytes, ttl).await
    }

    /// Rewrites a session only if it still exists, so a request in flight
    /// can never bring back a session that was just revoked. Whether it did.
    pub(super) async fn update_session(
        &self,
        record: &SessionRecord,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let bytes = serde_json::to_vec(record).expect("records serialise");
        let replaced = self
            .store
            .replace(&session_key(&record.id), bytes, ttl)
            .await?;
        if replaced {
            self.index(record).await?;
        }
        Ok(replaced)
    }

    async fn index(&self, record: &SessionRecord) -> Result<(), StoreError> {
        self.store
            .set_add(&user_index(&record.user_id), &record.id, SESSION_CAP)
            .await?;
        if let Some(email) = &record.email {
            self.store
                .set_add(&email_index(email), &record.id, SESSION_CAP)
                .await?;
        }
        Ok(())
    }

    /// Deletes a session everywhere; whether it existed.
    pub(super) async fn delete_session(&self, record: &SessionRecord) -> Result<bool, StoreError> {
        let existed = self.store.delete(&session_key(&record.id)).await?;
        self.store
            .set_remove(&user_index(&record.user_id), &record.id)
            .await?;
        if let Some(email) = &record.email {
            self.store
                .set_remove(&email_index(email), &record.id)
                .await?;
        }
        Ok(existed)
    }

    /// A user's live sessions.
    pub async fn list_sessions(
        &self,
        query: &SessionQuery,
    ) -> Result<Vec<SessionView>, StoreError> {
        let index = match query {
            SessionQuery::UserId(id) => user_index(id),
            SessionQuery::Email(email) => email_index(email),
        };
        let mut out = Vec::new();
        for id in self.store.set_members(&index).await? {
            match self.load_session(&id).await? {
                Some(record) => out.push(SessionView::from(&record)),
                None => self.store.set_remove(&index, &id).await?,
            }
        }
        out.sort_by_key(|v| v.created_at_ms);
        Ok(out)
    }

    /// Revokes one session by its admin id (`oas_…`); whether it existed.
    pub async fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        let Some(id) = id
            .strip_prefix("oas_")
            .filter(|i| i.bytes().all(|b| b.is_ascii_hexdigit()))
        else {
            return Ok(false);
        };
        match self.load_session(id).await? {
            Some(record) => self.delete_session(&record).await,
            None => self.store.delete(&session_key(id)).await,
        }
    }

    /// Revokes every session of a user; how many there were.
    pub async fn revoke_user(&self, user_id: &str) -> Result<usize, StoreError> {
        let index = user_index(user_id);
        let mut count = 0;
        for id in self.store.set_members(&index).await? {
            match self.load_session(&id).await? {
                Some(record) => {
                    if self.delete_session(&record).await? {
                        count += 1;
                    }
                }
                None => self.store.set_remove(&index, &id).await?,
            }
        }
        self.store.delete(&index).await?;
        Ok(count)
    }
}
