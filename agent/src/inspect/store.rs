//! Captured requests in memory, oldest evicted first once their estimated
//! size passes `inspect_db_size`.

use std::{
    borrow::Cow,
    collections::VecDeque,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

/// How far a captured body got.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum BodyState {
    /// Still streaming.
    #[default]
    Streaming,
    /// Read to its end.
    Complete,
    /// Ended early: the peer went away or failed.
    Cut(String),
}

/// A request or response body as captured: the first bytes, the size of
/// the whole, and its trailers (HTTP/2 and chunked HTTP/1.1; gRPC's
/// `grpc-status` travels there).
#[derive(Clone, Debug, Default)]
pub(crate) struct CapturedBody {
    /// At most [`super::BODY_CAPTURE_LIMIT`] bytes.
    pub data: Bytes,
    /// Bytes that went through, captured or not.
    pub size: u64,
    pub state: BodyState,
    /// Empty when the body had none.
    pub trailers: HeaderMap,
}

impl CapturedBody {
    /// Whether `data` misses part of the body.
    pub fn truncated(&self) -> bool {
        self.size > self.data.len() as u64
    }
}

/// A message's captured headers: a map, or the head's bytes as they
/// passed (the passive inspector's), made a map only when read.
#[derive(Clone, Debug)]
pub(crate) enum Headers {
    Map(HeaderMap),
    /// A whole message head (start line, header lines, blank line).
    Head(Bytes),
}

impl Headers {
    /// The headers as a map; a head's values are slices of its bytes.
    pub fn map(&self) -> Cow<'_, HeaderMap> {
        match self {
            Headers::Map(map) => Cow::Borrowed(map),
            Headers::Head(head) => Cow::Owned(head_headers(head)),
        }
    }

    /// Bytes the headers hold, roughly.
    fn weight(&self) -> usize {
        match self {
            Headers::Map(map) => map_weight(map),
            Headers::Head(head) => allocation(head.len()),
        }
    }
}

impl From<HeaderMap> for Headers {
    fn from(map: HeaderMap) -> Self {
        Headers::Map(map)
    }
}

/// The header lines of a message head that parsed before; a line that does
/// not (it cannot happen) ends the map there.
fn head_headers(head: &Bytes) -> HeaderMap {
    let lines = head
        .iter()
        .position(|&b| b == b'\n')
        .map_or(head.len(), |start_line| start_line + 1);
    let block = head.slice(lines..);
    let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(&block, &mut parsed) {
        Ok(httparse::Status::Complete((_, parsed))) => header_map(&block, &block, parsed),
        _ => HeaderMap::new(),
    }
}

/// Headers parsed from a message head; more end the parse.
pub(super) const MAX_HEADERS: usize = 128;

/// The headers `parsed` from `base`, as owned values sharing `copy`, which
/// holds `base`'s bytes up to its last header at least (no allocation
/// each). A name or value `http` refuses is left out (the bytes still went
/// through).
pub(super) fn header_map<'a>(
    base: &[u8],
    copy: &Bytes,
    parsed: impl IntoIterator<Item = &'a httparse::Header<'a>>,
) -> HeaderMap {
    let parsed = parsed.into_iter();
    let mut map = HeaderMap::with_capacity(parsed.size_hint().0);
    for h in parsed {
        // httparse's values are slices of `base` (checked all the same:
        // an empty one need not point into it).
        let start = (h.value.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize);
        let value = match start.checked_add(h.value.len()) {
            Some(end) if end <= copy.len() && !h.value.is_empty() => {
                HeaderValue::from_maybe_shared(copy.slice(start..end))
            }
            _ => HeaderValue::from_bytes(h.value),
        };
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(h.name.as_bytes()), value) {
            map.append(name, value);
        }
    }
    map
}

/// The request line and headers as the agent received them.
#[derive(Clone, Debug)]
pub(crate) struct RequestHead {
    pub method: Method,
    /// Path and query.
    pub uri: String,
    pub version: Version,
    pub headers: Headers,
}

/// The upstream's answer.
#[derive(Clone, Debug)]
pub(crate) struct ResponseCapture {
    pub status: StatusCode,
    pub version: Version,
    pub headers: Headers,
    pub body: CapturedBody,
}

/// One request through an inspected tunnel (or a replay).
#[derive(Clone, Debug)]
pub(crate) struct Captured {
    pub id: String,
    pub tunnel_name: String,
    /// The visitor's IP, as the edge reported it.
    pub remote_addr: String,
    /// The data stream's addresses, for PROXY headers on replay.
    pub client_addr: String,
    pub server_addr: String,
    pub start: SystemTime,
    /// Until the response body ended; `None` while in flight.
    pub duration: Option<Duration>,
    pub request: RequestHead,
    pub request_body: CapturedBody,
    /// `None` until the upstream answers.
    pub response: Option<ResponseCapture>,
    /// Why the upstream gave no answer.
    pub error: Option<String>,
    /// The capture this one replayed.
    pub replay_of: Option<String>,
}

impl Captured {
    /// What the capture costs in memory, roughly: its slot in the store
    /// and its own fields, every string, the headers and the bodies kept,
    /// each of these an allocation of its own. (The fixed part alone is
    /// some 1,000 bytes: counting only the bodies and headers, a store
    /// of 50 MB of small requests took 140 MB.)
    fn weight(&self) -> u64 {
        let strings = [
            Some(&self.id),
            Some(&self.tunnel_name),
            Some(&self.remote_addr),
            Some(&self.client_addr),
            Some(&self.server_addr),
            Some(&self.request.uri),
            self.error.as_ref(),
            self.replay_of.as_ref(),
        ];
        let mut n = size_of::<Entry>()
            + allocation(size_of::<Captured>())
            + strings
                .into_iter()
                .flatten()
                .map(|s| allocation(s.capacity()))
                .sum::<usize>()
            + self.request.headers.weight()
            + self.request_body.weight();
        if let Some(response) = &self.response {
            n += response.headers.weight() + response.body.weight();
        }
        n as u64
    }
}

impl CapturedBody {
    /// Bytes the body and its trailers hold, roughly.
    fn weight(&self) -> usize {
        allocation(self.data.len()) + map_weight(&self.trailers)
    }
}

/// Bytes an allocation of `len` takes, roughly: the allocator's rounding
/// and bookkeeping on top (none when empty, as nothing is allocated).
fn allocation(len: usize) -> usize {
    if len == 0 { 0 } else { len + 16 }
}

fn map_weight(map: &HeaderMap) -> usize {
    map.iter()
        .map(|(n, v)| {
            n.as_str().len() + v.len() + size_of::<HeaderName>() + size_of::<HeaderValue>()
        })
        .sum()
}

/// A copy of `headers` that owns its values. hyper's values are slices of
/// the connection's read buffer; a capture holding them would keep that
/// whole buffer alive.
pub(super) fn owned(headers: &HeaderMap) -> HeaderMap {
    let mut copy = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let mut v = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        v.set_sensitive(value.is_sensitive());
        copy.append(name.clone(), v);
    }
    copy
}

/// A capture in the store, with its weight when last changed.
type Entry = (u64, Box<Captured>);

/// Which capture of the store: the number of captures inserted before it.
/// What an exchange changes its capture by, found without a search.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Key(u64);

/// The inspector's store.
pub(crate) struct Captures {
    limit: u64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Oldest first, each with its weight when last changed. Boxed, so
    /// that the queue's spare slots (up to as many again as it holds)
    /// are small.
    entries: VecDeque<Entry>,
    total: u64,
    /// The key of the oldest capture kept (of the next one, when none is).
    first: u64,
}

impl Inner {
    fn evict(&mut self, limit: u64) {
        while self.total > limit {
            match self.entries.pop_front() {
                Some((weight, _)) => {
                    self.total -= weight;
                    self.first += 1;
                }
                None => break,
            }
        }
    }

    /// Where the capture of `key` is, if it is still kept.
    fn index(&self, Key(key): Key) -> Option<usize> {
        let i = usize::try_from(key.checked_sub(self.first)?).ok()?;
        (i < self.entries.len()).then_some(i)
    }

    fn position(&self, id: &str) -> Option<usize> {
        self.entries.iter().rposition(|(_, c)| c.id == id)
    }
}

impl Captures {
    /// A store of at most `limit` bytes (estimated).
    pub fn new(limit: u64) -> Captures {
        Captures {
            limit,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("captures lock")
    }

    /// Adds a capture as the newest.
    pub fn insert(&self, captured: Captured) -> Key {
        let weight = captured.weight();
        let mut inner = self.lock();
        let key = Key(inner.first + inner.entries.len() as u64);
        inner.total += weight;
        inner.entries.push_back((weight, Box::new(captured)));
        inner.evict(self.limit);
        key
    }

    /// Changes a capture, if it is still kept.
    pub fn update(&self, key: Key, f: impl FnOnce(&mut Captured)) {
        let mut inner = self.lock();
        let Some(i) = inner.index(key) else { return };
        let (old, captured) = &mut inner.entries[i];
        let old = *old;
        f(captured);
        let new = captured.weight();
        inner.entries[i].0 = new;
        inner.total = inner.total - old + new;
        inner.evict(self.limit);
    }

    /// Newest first, at most `limit`, optionally of one tunnel.
    pub fn list(&self, limit: usize, tunnel_name: Option<&str>) -> Vec<Captured> {
        self.lock()
            .entries
            .iter()
            .rev()
            .map(|(_, c)| &**c)
            .filter(|c| tunnel_name.is_none_or(|t| c.tunnel_name == t))
            .take(limit)
            .cloned()
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<Captured> {
        let inner = self.lock();
        inner.position(id).map(|i| (*inner.entries[i].1).clone())
    }

    /// The id of the capture of `key`, if it is still kept.
    pub fn id(&self, key: Key) -> Option<String> {
        let inner = self.lock();
        inner.index(key).map(|i| inner.entries[i].1.id.clone())
    }

    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.first += inner.entries.len() as u64;
        inner.entries.clear();
        inner.total = 0;
    }

    /// Estimated bytes held.
    #[cfg(test)]
    fn total(&self) -> u64 {
        self.lock().total
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A capture with a body of `body` bytes.
    pub(crate) fn captured(id: &str, tunnel: &str, body: usize) -> Captured {
        Captured {
            id: id.to_string(),
            tunnel_name: tunnel.to_string(),
            remote_addr: "203.0.113.7".into(),
            client_addr: "203.0.113.7:5000".into(),
            server_addr: "127.0.0.1:443".into(),
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: None,
            request: RequestHead {
                method: Method::POST,
                uri: "/items?x=1".into(),
                version: Version::HTTP_11,
                headers: HeaderMap::new().into(),
            },
            request_body: CapturedBody {
                data: Bytes::from(vec![b'a'; body]),
                size: body as u64,
                state: BodyState::Complete,
                trailers: HeaderMap::new(),
            },
            response: None,
            error: None,
            replay_of: None,
        }
    }

    #[test]
    fn newest_first_filtered_and_limited() {
        let store = Captures::new(1 << 20);
        store.insert(captured("a", "web", 1));
        store.insert(captured("b", "api", 1));
        store.insert(captured("c", "web", 1));
        let ids = |v: Vec<Captured>| v.into_iter().map(|c| c.id).collect::<Vec<_>>();
        assert_eq!(ids(store.list(10, None)), ["c", "b", "a"]);
        assert_eq!(ids(store.list(10, Some("web"))), ["c", "a"]);
        assert_eq!(ids(store.list(1, None)), ["c"]);
        assert_eq!(store.get("b").unwrap().tunnel_name, "api");
        assert!(store.get("zz").is_none());
        store.clear();
        assert!(store.list(10, None).is_empty());
        assert_eq!(store.total(), 0);
    }

    #[test]
    fn the_oldest_go_when_the_size_limit_is_passed() {
        // Each capture weighs a little over 10 KB.
        let store = Captures::new(35_000);
        let keys: Vec<Key> = ["a", "b", "c", "d"]
            .into_iter()
            .map(|id| store.insert(captured(id, "web", 10_000)))
            .collect();
        let ids: Vec<_> = store.list(10, None).into_iter().map(|c| c.id).collect();
        assert_eq!(ids, ["d", "c", "b"], "a was evicted");
        assert!(store.total() <= 35_000);
        // Growing a capture (its response arrives) evicts older ones too.
        store.update(keys[3], |c| {
            c.response = Some(ResponseCapture {
                status: StatusCode::OK,
                version: Version::HTTP_11,
                headers: HeaderMap::new().into(),
                body: CapturedBody {
                    data: Bytes::from(vec![b'r'; 10_000]),
                    size: 10_000,
                    state: BodyState::Complete,
                    trailers: HeaderMap::new(),
                },
            })
        });
        let ids: Vec<_> = store.list(10, None).into_iter().map(|c| c.id).collect();
        assert_eq!(ids, ["d", "c"]);
        assert!(store.total() <= 35_000);
        // Updating an evicted capture is a no-op.
        store.update(keys[0], |c| c.error = Some("late".into()));
        assert!(store.get("a").is_none());
        assert_eq!(store.id(keys[0]), None);
        assert_eq!(store.id(keys[2]).as_deref(), Some("c"));
    }

    #[test]
    fn a_capture_weighs_at_least_what_it_occupies() {
        // Its slot, its own fields and its strings, not only the bodies and
        // headers: those alone let a 50 MB store take 140 MB.
        let c = captured("a", "web", 0);
        let strings = c.id.len()
            + c.tunnel_name.len()
            + c.remote_addr.len()
            + c.client_addr.len()
            + c.server_addr.len()
            + c.request.uri.len();
        let occupied = size_of::<Entry>() + size_of::<Captured>() + strings;
        assert!(c.weight() >= occupied as u64, "{} < {occupied}", c.weight());
    }

    #[test]
    fn truncation_is_size_beyond_data() {
        let mut body = CapturedBody {
            data: Bytes::from_static(b"abc"),
            size: 3,
            state: BodyState::Complete,
            trailers: HeaderMap::new(),
        };
        assert!(!body.truncated());
        body.size = 4;
        assert!(body.truncated());
    }
}
