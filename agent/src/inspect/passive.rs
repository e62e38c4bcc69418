//! Inspection of an HTTP/1.1 stream beside the byte pipe. The stream goes
//! through the same pipe as an uninspected tunnel's, byte for byte; a
//! [`Tap`], hooked on the upstream socket ([`Watch`]), sees each write
//! toward the upstream (requests) and each read from it (responses) and
//! parses them to fill in the captures. Nothing is parsed twice or served
//! again, and what the tap cannot follow (a head too large, a malformed
//! message) only ends the capturing of that stream: the bytes go on.
//!
//! After a `101 Switching Protocols` (WebSocket and other upgrades) the
//! stream is no longer HTTP and both directions go unparsed.

use std::{
    collections::VecDeque,
    mem::MaybeUninit,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Version};
use postern_net::{Hooked, IoHook};
use postern_proto::pb;

use super::{
    BODY_CAPTURE_LIMIT,
    proxy::{Capture, HeaderValues, forwarded_for, is_upgrade, remote_addr, text},
    store::{BodyState, Captures, Headers, MAX_HEADERS, RequestHead, header_map},
    tee::BodyCopy,
};
use crate::state::TunnelMetrics;

/// The longest message head (or chunked trailer section) the tap holds
/// while waiting for its end; a longer one ends capturing.
const MAX_HEAD: usize = 64 * 1024;

/// One stream's parse, shared by its two directions.
#[derive(Clone)]
pub(crate) struct Tap(Arc<Mutex<Exchange>>);

impl Tap {
    pub(crate) fn new(
        captures: Arc<Captures>,
        tunnel_name: &str,
        open: &pb::StreamOpen,
        metrics: Arc<TunnelMetrics>,
    ) -> Tap {
        Tap(Arc::new(Mutex::new(Exchange {
            source: Source {
                captures,
                tunnel_name: tunnel_name.to_string(),
                open: pb::StreamOpen {
                    client_addr: open.client_addr.clone(),
                    server_addr: open.server_addr.clone(),
                    ..Default::default()
                },
                metrics,
            },
            requests: Side::Head(Vec::new()),
            responses: Side::Head(Vec::new()),
            pending: VecDeque::new(),
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Exchange> {
        // A poisoned lock only means a parse panicked: the bytes matter more.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where captures go and what they name.
struct Source {
    captures: Arc<Captures>,
    tunnel_name: String,
    /// The stream's addresses.
    open: pb::StreamOpen,
    metrics: Arc<TunnelMetrics>,
}

/// The parse of both directions of a stream.
struct Exchange {
    source: Source,
    /// Toward the upstream.
    requests: Side,
    /// Back from the upstream.
    responses: Side,
    /// Requests sent, oldest first, still waiting for their response head.
    pending: VecDeque<Pending>,
}

/// A request waiting for its response.
struct Pending {
    capture: Capture,
    /// A HEAD request: its response has no body, whatever it says.
    head: bool,
    /// It asks to switch protocols with `Upgrade` (a 101 switches).
    upgrade: bool,
    /// A CONNECT (a 2xx switches).
    connect: bool,
}

/// Where one direction's parse is.
enum Side {
    /// Reading a message head; the bytes of it held so far.
    Head(Vec<u8>),
    /// In a message body. `then_hold`: the message asked for an upgrade,
    /// so what follows it waits for the response.
    Body {
        framing: Framing,
        copy: BodyCopy,
        then_hold: bool,
    },
    /// Bytes kept unparsed for now: toward the upstream, what follows an
    /// upgrade request, parsed if the upstream declines the upgrade; back
    /// from it, a response read before its request was recorded.
    Held(Vec<u8>),
    /// Not parsed any more (upgraded, or lost track).
    Off,
}

/// How a message body ends.
enum Framing {
    /// With the head.
    Empty,
    /// After this many more bytes.
    Length(u64),
    Chunked(Chunked),
    /// When the upstream closes the connection.
    UntilClose,
}

/// A parse that could not go on.
struct Lost(&'static str);

/// A message head parsed, and its length in bytes; `None` when the bytes
/// end before the head does.
type Parsed<T> = Result<Option<(T, usize)>, Lost>;

/// What a direction made of bytes, in the states both share.
enum Flow {
    /// All taken; nothing more to do now.
    Wait,
    Lost(Lost),
    /// A body ended after this many of the bytes; the rest follow it.
    Ended(usize),
    /// At a message head, to be read by the direction.
    AtHead,
}

impl Side {
    /// Takes `data` into held bytes or a body; `held_what` names held
    /// bytes grown past [`MAX_HEAD`].
    fn take(&mut self, data: &[u8], held_what: &'static str) -> Flow {
        match self {
            Side::Off => Flow::Wait,
            Side::Held(held) => {
                if held.len() + data.len() > MAX_HEAD {
                    return Flow::Lost(Lost(held_what));
                }
                held.extend_from_slice(data);
                Flow::Wait
            }
            Side::Body {
                framing,
                copy,
                then_hold,
            } => match framing.feed(data, copy) {
                Err(lost) => Flow::Lost(lost),
                Ok(None) => Flow::Wait,
                Ok(Some(used)) => {
                    copy.finish(BodyState::Complete);
                    *self = if *then_hold {
                        Side::Held(Vec::new())
                    } else {
                        Side::Head(Vec::new())
                    };
                    Flow::Ended(used)
                }
            },
            Side::Head(_) if data.is_empty() => Flow::Wait,
            Side::Head(_) => Flow::AtHead,
        }
    }
}

/// A direction of the stream.
#[derive(Clone, Copy)]
enum Direction {
    /// Written toward the upstream: requests.
    Requests,
    /// Read back from the upstream: responses.
    Responses,
}

/// What a response parsed while no request waits ends in, held past
/// [`MAX_HEAD`] or found in a head.
const NO_REQUEST: &str = "a response with no request waiting for it";

impl Exchange {
    /// Bytes that went one way.
    fn feed(&mut self, direction: Direction, mut data: &[u8]) {
        loop {
            let (side, held_what) = match direction {
                Direction::Requests => (&mut self.requests, "the bytes after an upgrade request"),
                Direction::Responses => (&mut self.responses, NO_REQUEST),
            };
            match side.take(data, held_what) {
                Flow::Wait => return,
                Flow::Lost(lost) => return self.lose(lost),
                Flow::Ended(used) => data = &data[used..],
                Flow::AtHead => match self.at_head(direction, data) {
                    Err(lost) => return self.lose(lost),
                    Ok(None) => return,
                    Ok(Some(used)) => data = &data[used..],
                },
            }
        }
    }

    /// Reads the message head `data` begins or goes on with, and acts on
    /// it: how many bytes of `data` it took, or `None` when it goes on past
    /// them (or a response waits for its request).
    fn at_head(&mut self, direction: Direction, data: &[u8]) -> Result<Option<usize>, Lost> {
        match direction {
            Direction::Requests => {
                let Side::Head(held) = &mut self.requests else {
                    return Ok(None);
                };
                let Some((request, used)) = read_head(held, data, parse_request)? else {
                    return Ok(None);
                };
                self.begin(request);
                Ok(Some(used))
            }
            Direction::Responses => {
                let Side::Head(held) = &mut self.responses else {
                    return Ok(None);
                };
                if self.pending.is_empty() {
                    // Read before its request's write was told of (the
                    // two directions run on different threads): held
                    // until the request is recorded.
                    let mut early = std::mem::take(held);
                    early.extend_from_slice(data);
                    self.responses = Side::Held(early);
                    return Ok(None);
                }
                let Some((response, used)) = read_head(held, data, parse_response)? else {
                    return Ok(None);
                };
                self.answer(response)?;
                Ok(Some(used))
            }
        }
    }

    /// Captures a request whose head was just read.
    fn begin(&mut self, parsed: ParsedRequest) {
        let ParsedRequest {
            request,
            upgrade,
            framing,
            forwarded_for,
        } = parsed;
        let source = &self.source;
        source.metrics.add_request();
        let head = request.method == Method::HEAD;
        let connect = request.method == Method::CONNECT;
        let capture = Capture::begin(
            source.captures.clone(),
            &source.tunnel_name,
            remote_addr(forwarded_for, &source.open.client_addr),
            &source.open,
            request,
            None,
        );
        self.requests = Side::Body {
            framing,
            copy: BodyCopy::new(BODY_CAPTURE_LIMIT, capture.request_body_done()),
            then_hold: upgrade || connect,
        };
        self.pending.push_back(Pending {
            capture,
            head,
            upgrade,
            connect,
        });
        if let Side::Held(early) = &mut self.responses {
            let early = std::mem::take(early);
            self.responses = Side::Head(Vec::new());
            self.feed(Direction::Responses, &early);
        }
    }

    /// Gives the oldest pending request the response whose head was just
    /// read.
    fn answer(&mut self, response: ParsedResponse) -> Result<(), Lost> {
        let status = response.status;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            // 100 Continue and the like: the final response follows.
            return Ok(());
        }
        // Heads are read only while a request waits (see `at_head`); a
        // request given up on stays pending, for `lose` to fail it.
        let asked_upgrade = self.pending.front().ok_or(Lost(NO_REQUEST))?.upgrade;
        if status == StatusCode::SWITCHING_PROTOCOLS && !asked_upgrade {
            return Err(Lost(
                "a 101 response to a request that asked for no upgrade",
            ));
        }
        let pending = self.pending.pop_front().ok_or(Lost(NO_REQUEST))?;
        if status == StatusCode::SWITCHING_PROTOCOLS || (pending.connect && status.is_success()) {
            pending
                .capture
                .response(status, response.version, response.headers, true);
            self.requests = Side::Off;
            self.responses = Side::Off;
            return Ok(());
        }
        let framing = if pending.head
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Empty
        } else {
            response.framing
        };
        pending
            .capture
            .response(status, response.version, response.headers, false);
        self.responses = Side::Body {
            framing,
            copy: BodyCopy::new(BODY_CAPTURE_LIMIT, pending.capture.response_body_done()),
            then_hold: false,
        };
        // A declined upgrade: the connection goes on as HTTP/1.1.
        if let Side::Held(held) = &mut self.requests {
            let held = std::mem::take(held);
            self.requests = Side::Head(Vec::new());
            self.feed(Direction::Requests, &held);
        }
        Ok(())
    }

    /// The upstream closed its side: a body read to the close is complete,
    /// and requests still waiting get no answer.
    fn upstream_closed(&mut self) {
        if let Side::Body {
            framing: Framing::UntilClose,
            copy,
            ..
        } = &mut self.responses
        {
            copy.finish(BodyState::Complete);
        }
        self.responses = Side::Off;
        for pending in self.pending.drain(..) {
            pending
                .capture
                .failed("the upstream closed the connection before it answered".into());
        }
    }

    /// Stops capturing this stream; the requests still waiting say why.
    fn lose(&mut self, Lost(what): Lost) {
        tracing::debug!(what, "the inspector stopped following a stream");
        self.requests = Side::Off;
        self.responses = Side::Off;
        for pending in self.pending.drain(..) {
            pending.capture.failed(format!(
                "the inspector could not follow this connection's HTTP after {what}"
            ));
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        for pending in self.pending.drain(..) {
            pending
                .capture
                .failed("the stream ended before the upstream answered".into());
        }
    }
}

impl Framing {
    /// From a message's headers; `otherwise` when they give no length.
    fn of(headers: &(impl HeaderValues + ?Sized), otherwise: Framing) -> Framing {
        if let Some(coding) = headers.values("transfer-encoding").last() {
            let last = coding.rsplit(|&b| b == b',').next().unwrap_or(b"");
            return if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                Framing::Chunked(Chunked::Size {
                    size: 0,
                    digits: 0,
                    ext: false,
                })
            } else {
                otherwise
            };
        }
        match headers
            .values("content-length")
            .next()
            .and_then(text)
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => otherwise,
        }
    }

    /// Feeds body bytes into `copy`: `Some(used)` once the body ended,
    /// `used` bytes of `data` into it; `None` when all of `data` was body.
    fn feed(&mut self, data: &[u8], copy: &mut BodyCopy) -> Result<Option<usize>, Lost> {
        match self {
            Framing::Empty => Ok(Some(0)),
            Framing::Length(left) => {
                let n = data.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                copy.feed(&data[..n]);
                *left -= n as u64;
                Ok((*left == 0).then_some(n))
            }
            Framing::Chunked(chunked) => chunked.feed(data, copy),
            Framing::UntilClose => {
                copy.feed(data);
                Ok(None)
            }
        }
    }
}

/// Where a chunked body's decoding is (RFC 9112 7.1).
#[derive(Debug, PartialEq, Eq)]
enum Chunked {
    /// In a chunk-size line: the size so far, its digits, and whether the
    /// extensions (ignored) began.
    Size { size: u64, digits: u8, ext: bool },
    /// Chunk data still to come.
    Data(u64),
    /// The line end after a chunk's data.
    DataEnd,
    /// After the last chunk: the trailer section so far.
    Trailers(Vec<u8>),
}

impl Chunked {
    fn feed(&mut self, data: &[u8], copy: &mut BodyCopy) -> Result<Option<usize>, Lost> {
        let mut at = 0;
        while at < data.len() {
            match self {
                Chunked::Size { size, digits, ext } => {
                    let b = data[at];
                    at += 1;
                    match b {
                        b'\n' if *digits == 0 => return Err(Lost("a chunk with no size")),
                        b'\n' if *size == 0 => *self = Chunked::Trailers(Vec::new()),
                        b'\n' => *self = Chunked::Data(*size),
                        b'\r' => {}
                        _ if *ext => {}
                        b';' | b' ' | b'\t' => *ext = true,
                        _ => {
                            let digit = (b as char)
                                .to_digit(16)
                                .ok_or(Lost("a chunk size that is not hexadecimal"))?;
                            if *digits >= 15 {
                                return Err(Lost("a chunk size too large"));
                            }
                            *size = *size * 16 + u64::from(digit);
                            *digits += 1;
                        }
                    }
                }
                Chunked::Data(left) => {
                    let n = (data.len() - at).min(usize::try_from(*left).unwrap_or(usize::MAX));
                    copy.feed(&data[at..at + n]);
                    at += n;
                    *left -= n as u64;
                    if *left == 0 {
                        *self = Chunked::DataEnd;
                    }
                }
                Chunked::DataEnd => {
                    let b = data[at];
                    at += 1;
                    match b {
                        b'\r' => {}
                        b'\n' => {
                            *self = Chunked::Size {
                                size: 0,
                                digits: 0,
                                ext: false,
                            }
                        }
                        _ => return Err(Lost("chunk data longer than its size")),
                    }
                }
                Chunked::Trailers(held) => {
                    held.push(data[at]);
                    at += 1;
                    if held.len() > MAX_HEAD {
                        return Err(Lost("a trailer section too large"));
                    }
                    let ended = held.as_slice() == b"\r\n"
                        || held.as_slice() == b"\n"
                        || held.ends_with(b"\r\n\r\n")
                        || held.ends_with(b"\n\n");
                    if ended {
                        if held.len() > 2 {
                            copy.set_trailers(parse_trailers(held)?);
                        }
                        return Ok(Some(at));
                    }
                }
            }
        }
        Ok(None)
    }
}

/// Reads a message head from `held` (bytes of it from earlier reads) and
/// `data`: the parsed head and how many bytes of `data` it took, or `None`
/// when the head goes on past `data` (then kept in `held`).
fn read_head<T>(held: &mut Vec<u8>, data: &[u8], parse: fn(&[u8]) -> Parsed<T>) -> Parsed<T> {
    let before = held.len();
    let parsed = if before == 0 {
        parse(data)?
    } else {
        held.extend_from_slice(data);
        parse(held)?
    };
    match parsed {
        Some((head, len)) => {
            held.clear();
            // A head held before ends in `data`: earlier parses found no end.
            Ok(Some((head, len - before)))
        }
        None => {
            if before == 0 {
                held.extend_from_slice(data);
            }
            if held.len() > MAX_HEAD {
                return Err(Lost("a message head too large"));
            }
            Ok(None)
        }
    }
}

/// The length of a complete head, `None` for a partial one.
fn head_len(
    status: httparse::Result<usize>,
    malformed: &'static str,
) -> Result<Option<usize>, Lost> {
    match status {
        Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(Lost(malformed)),
    }
}

/// A request head read: what the capture keeps (the head as it passed),
/// and what the tap reads from its headers itself.
struct ParsedRequest {
    request: RequestHead,
    upgrade: bool,
    framing: Framing,
    /// Its last `X-Forwarded-For` entry: the visitor's address.
    forwarded_for: Option<String>,
}

fn parse_request(bytes: &[u8]) -> Parsed<ParsedRequest> {
    // Left uninitialised: the parser writes the fields it finds.
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut request,
        bytes,
        &mut headers,
    );
    let Some(len) = head_len(parsed, "a malformed request head")? else {
        return Ok(None);
    };
    let method = request
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or(Lost("a request with an invalid method"))?;
    let version = version(request.version);
    let parsed = ParsedRequest {
        upgrade: is_upgrade(version, request.headers),
        framing: Framing::of(request.headers, Framing::Empty),
        forwarded_for: forwarded_for(request.headers),
        request: RequestHead {
            uri: request.path.unwrap_or("/").to_string(),
            version,
            headers: Headers::Head(Bytes::copy_from_slice(&bytes[..len])),
            method,
        },
    };
    Ok(Some((parsed, len)))
}

/// A response head read: what the capture keeps, and how its body ends
/// by its headers (a response to HEAD, a 204 and a 304 have none
/// whatever they say).
struct ParsedResponse {
    status: StatusCode,
    version: Version,
    headers: Headers,
    framing: Framing,
}

fn parse_response(bytes: &[u8]) -> Parsed<ParsedResponse> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        bytes,
        &mut headers,
    );
    let Some(len) = head_len(parsed, "a malformed response head")? else {
        return Ok(None);
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(Lost("a response with an invalid status"))?;
    Ok(Some((
        ParsedResponse {
            status,
            version: version(response.version),
            headers: Headers::Head(Bytes::copy_from_slice(&bytes[..len])),
            framing: Framing::of(response.headers, Framing::UntilClose),
        },
        len,
    )))
}

fn parse_trailers(section: &[u8]) -> Result<HeaderMap, Lost> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(section, &mut headers) {
        Ok(httparse::Status::Complete((len, parsed))) => Ok(header_map(
            section,
            &Bytes::copy_from_slice(&section[..len]),
            parsed,
        )),
        _ => Err(Lost("a malformed trailer section")),
    }
}

fn version(minor: Option<u8>) -> Version {
    match minor {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    }
}

/// The hook on a piped stream's upstream socket ([`Hooked`]): counts the
/// bytes into the tunnel's metrics as they move, and gives them to the
/// stream's [`Tap`] when it is inspected. Writes are requests, reads are
/// responses.
pub(crate) struct Watch {
    metrics: Arc<TunnelMetrics>,
    tap: Option<Tap>,
}

impl Watch {
    /// An upstream socket's two halves, each with its hook.
    pub(crate) fn halves<R, W>(
        (reader, writer): (R, W),
        metrics: &Arc<TunnelMetrics>,
        tap: Option<Tap>,
    ) -> (Hooked<R, Watch>, Hooked<W, Watch>) {
        let reads = Watch {
            metrics: metrics.clone(),
            tap: tap.clone(),
        };
        let writes = Watch {
            metrics: metrics.clone(),
            tap,
        };
        (Hooked::new(reader, reads), Hooked::new(writer, writes))
    }
}

impl<S> IoHook<S> for Watch {
    fn read(&self, _io: &S, bytes: &[u8]) {
        self.metrics.add_bytes(0, bytes.len() as u64);
        if let Some(tap) = &self.tap {
            tap.lock().feed(Direction::Responses, bytes);
        }
    }

    fn read_eof(&self, _io: &S) {
        if let Some(tap) = &self.tap {
            tap.lock().upstream_closed();
        }
    }

    fn wrote(&self, _io: &S, bytes: &[u8]) {
        self.metrics.add_bytes(bytes.len() as u64, 0);
        if let Some(tap) = &self.tap {
            tap.lock().feed(Direction::Requests, bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::Captured;

    fn new_tap() -> (Tap, Arc<Captures>) {
        let captures = Arc::new(Captures::new(u64::MAX));
        let open = pb::StreamOpen {
            client_addr: "198.51.100.7:4431".into(),
            server_addr: "127.0.0.1:80".into(),
            ..Default::default()
        };
        let tap = Tap::new(captures.clone(), "web", &open, Arc::default());
        (tap, captures)
    }

    /// Oldest first.
    fn captured(captures: &Captures) -> Vec<Captured> {
        let mut all = captures.list(usize::MAX, None);
        all.reverse();
        all
    }

    /// Feeds `bytes` in pieces of `piece` bytes.
    fn requests(tap: &Tap, bytes: &[u8], piece: usize) {
        for chunk in bytes.chunks(piece) {
            tap.lock().feed(Direction::Requests, chunk);
        }
    }

    fn responses(tap: &Tap, bytes: &[u8], piece: usize) {
        for chunk in bytes.chunks(piece) {
            tap.lock().feed(Direction::Responses, chunk);
        }
    }

    const KEPT_ALIVE_REQUESTS: &[u8] = b"GET /a?x=1 HTTP/1.1\r\nhost: app.example.test\r\n\
        x-forwarded-for: 203.0.113.9\r\n\r\n\
        POST /b HTTP/1.1\r\nhost: app.example.test\r\ncontent-length: 5\r\n\r\nhello\
        PUT /c HTTP/1.1\r\nhost: app.example.test\r\ntransfer-encoding: chunked\r\n\r\n\
        3;ext=1\r\nabc\r\n0\r\n\r\n";

    const KEPT_ALIVE_RESPONSES: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok\
        HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n\
        4\r\nmade\r\nA\r\n0123456789\r\n0\r\ngrpc-status: 0\r\n\r\n\
        HTTP/1.1 204 No Content\r\n\r\n";

    #[test]
    fn kept_alive_exchanges_are_captured_however_the_reads_split_them() {
        for piece in [1, 2, 3, 7, 64, 4096] {
            let (tap, captures) = new_tap();
            requests(&tap, KEPT_ALIVE_REQUESTS, piece);
            responses(&tap, KEPT_ALIVE_RESPONSES, piece);
            let all = captured(&captures);
            assert_eq!(all.len(), 3, "pieces of {piece}");
            let [a, b, c] = &all[..] else { unreachable!() };
            assert_eq!(
                (a.request.method.as_str(), a.request.uri.as_str()),
                ("GET", "/a?x=1")
            );
            assert_eq!(a.request.headers.map()["host"], "app.example.test");
            assert_eq!(a.remote_addr, "203.0.113.9", "the edge's X-Forwarded-For");
            assert_eq!(b.remote_addr, "198.51.100.7", "else the stream's client");
            assert_eq!(b.request_body.data, "hello");
            assert_eq!(b.request_body.state, BodyState::Complete);
            assert_eq!(c.request_body.data, "abc", "chunked, decoded");
            assert_eq!(c.request_body.state, BodyState::Complete);
            let (ra, rb, rc) = (
                a.response.as_ref().unwrap(),
                b.response.as_ref().unwrap(),
                c.response.as_ref().unwrap(),
            );
            assert_eq!((ra.status.as_u16(), &ra.body.data[..]), (200, &b"ok"[..]));
            assert_eq!(rb.status, StatusCode::CREATED);
            assert_eq!(rb.body.data, "made0123456789");
            assert_eq!(rb.body.size, 14);
            assert_eq!(rb.body.trailers["grpc-status"], "0");
            assert_eq!(rc.status, StatusCode::NO_CONTENT);
            for c in &all {
                let response = c.response.as_ref().unwrap();
                assert_eq!(response.body.state, BodyState::Complete);
                assert!(c.duration.is_some(), "complete: {}", c.request.uri);
                assert_eq!(c.error, None);
            }
        }
    }

    #[test]
    fn head_responses_and_interim_ones_have_no_body() {
        let (tap, captures) = new_tap();
        requests(
            &tap,
            b"HEAD /h HTTP/1.1\r\n\r\nPOST /p HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\nhi",
            5,
        );
        responses(
            &tap,
            b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n\
              HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nyes",
            5,
        );
        let all = captured(&captures);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].response.as_ref().unwrap().body.size, 0);
        assert!(all[0].duration.is_some());
        let second = all[1].response.as_ref().unwrap();
        assert_eq!(
            second.status,
            StatusCode::OK,
            "the final response, not the 100"
        );
        assert_eq!(second.body.data, "yes");
    }

    #[test]
    fn an_upgrade_ends_the_parse_and_a_declined_one_does_not() {
        let upgrade = b"GET /ws HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
        // Declined: the connection goes on as HTTP, the next request too.
        let (tap, captures) = new_tap();
        requests(&tap, upgrade, 9);
        requests(&tap, b"GET /next HTTP/1.1\r\n\r\n", 9);
        responses(
            &tap,
            b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            9,
        );
        let all = captured(&captures);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].response.as_ref().unwrap().status.as_u16(), 426);
        assert_eq!(all[1].request.uri, "/next");
        assert_eq!(all[1].response.as_ref().unwrap().status, StatusCode::OK);

        // Switched: what follows is WebSocket frames, not HTTP.
        let (tap, captures) = new_tap();
        requests(&tap, upgrade, 9);
        responses(
            &tap,
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n\x81\x02hi",
            9,
        );
        requests(&tap, b"GET /not-a-request HTTP/1.1\r\n\r\n", 9);
        let all = captured(&captures);
        assert_eq!(all.len(), 1);
        assert_eq!(
            all[0].response.as_ref().unwrap().status,
            StatusCode::SWITCHING_PROTOCOLS
        );
        assert!(all[0].duration.is_some(), "an upgrade is complete at once");
    }

    #[test]
    fn the_upstream_closing_ends_a_body_read_to_the_close_and_fails_the_unanswered() {
        let (tap, captures) = new_tap();
        requests(&tap, b"GET /one HTTP/1.1\r\n\r\n", 64);
        responses(&tap, b"HTTP/1.1 200 OK\r\n\r\nuntil the close", 64);
        tap.lock().upstream_closed();
        let one = &captured(&captures)[0];
        let body = &one.response.as_ref().unwrap().body;
        assert_eq!(
            (body.data.as_ref(), &body.state),
            (&b"until the close"[..], &BodyState::Complete)
        );

        let (tap, captures) = new_tap();
        requests(&tap, b"GET /two HTTP/1.1\r\n\r\n", 64);
        responses(
            &tap,
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
            64,
        );
        requests(&tap, b"GET /three HTTP/1.1\r\n\r\n", 64);
        tap.lock().upstream_closed();
        let all = captured(&captures);
        assert!(matches!(
            all[0].response.as_ref().unwrap().body.state,
            BodyState::Cut(_)
        ));
        assert_eq!(
            all[1].error.as_deref(),
            Some("the upstream closed the connection before it answered")
        );
    }

    #[test]
    fn what_the_tap_cannot_follow_ends_capturing_and_says_why() {
        let (tap, captures) = new_tap();
        requests(&tap, b"GET /ok HTTP/1.1\r\n\r\n", 64);
        responses(
            &tap,
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            64,
        );
        // Nothing more is parsed, whatever comes.
        requests(&tap, b"GET /after HTTP/1.1\r\n\r\n", 64);
        responses(&tap, b"\0\x01garbage", 64);
        let all = captured(&captures);
        assert_eq!(all.len(), 1);
        assert!(matches!(
            all[0].response.as_ref().unwrap().body.state,
            BodyState::Cut(_)
        ));

        let (tap, captures) = new_tap();
        requests(&tap, b"GET /waiting HTTP/1.1\r\n\r\n", 64);
        responses(&tap, b"NOT HTTP\r\n\r\n", 64);
        assert_eq!(
            captured(&captures)[0].error.as_deref(),
            Some(
                "the inspector could not follow this connection's HTTP after a malformed response head"
            )
        );

        let (tap, captures) = new_tap();
        let mut long = b"GET / HTTP/1.1\r\nx-long: ".to_vec();
        long.resize(MAX_HEAD + 10, b'a');
        requests(&tap, &long, 4096);
        requests(&tap, b"\r\n\r\n", 4096);
        assert!(captured(&captures).is_empty(), "a head past the limit");
    }

    #[test]
    fn a_stream_that_ends_leaves_no_request_in_flight() {
        let (tap, captures) = new_tap();
        requests(&tap, b"GET /cut HTTP/1.1\r\n\r\n", 64);
        drop(tap);
        assert_eq!(
            captured(&captures)[0].error.as_deref(),
            Some("the stream ended before the upstream answered")
        );
    }

    #[test]
    fn header_values_are_kept_whatever_their_place_in_the_head() {
        let (tap, captures) = new_tap();
        requests(
            &tap,
            b"GET / HTTP/1.1\r\nx-empty:\r\nhost: a.example.test\r\nx-two: 1\r\nx-two: 2\r\n\r\n",
            3,
        );
        let headers = captured(&captures)[0].request.headers.map().into_owned();
        assert_eq!(headers["x-empty"], "");
        assert_eq!(headers["host"], "a.example.test");
        let two: Vec<_> = headers.get_all("x-two").iter().collect();
        assert_eq!(two, ["1", "2"]);
    }

    #[test]
    fn an_answer_read_before_its_request_was_told_of_waits_for_it() {
        let (tap, captures) = new_tap();
        responses(
            &tap,
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst",
            7,
        );
        assert!(captured(&captures).is_empty());
        requests(&tap, b"GET /one HTTP/1.1\r\n\r\n", 7);
        responses(
            &tap,
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            7,
        );
        requests(&tap, b"GET /two HTTP/1.1\r\n\r\n", 7);
        let all = captured(&captures);
        assert_eq!(all.len(), 2);
        let one = all[0].response.as_ref().expect("the held answer, given");
        assert_eq!(
            (one.status.as_u16(), &one.body.data[..]),
            (200, &b"first"[..])
        );
        assert_eq!(all[1].response.as_ref().unwrap().status.as_u16(), 404);
        assert!(all.iter().all(|c| c.error.is_none()));
    }

    /// Pieces of HTTP/1.1 traffic, right and wrong, for the test below.
    const REQUEST_PIECES: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nhost: a\r\n\r\n",
        b"HEAD /h HTTP/1.1\r\n\r\n",
        b"POST /p HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc",
        b"PUT /c HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\n\r\n",
        b"GET /x HTTP/1.0\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n",
        b"\r\n\r\n",
        b"ffffffffffffffff\r\n",
        b"\x00\xff\xfe garbage",
    ];
    const RESPONSE_PIECES: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1;x\r\na\r\n0\r\nt: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nto the close",
        b"HTTP/1.0 404 Not Found\r\ncontent-length: 99999999999\r\n\r\n",
        b"HTTP/1.1 999 Odd\r\n\r\n",
        b"zz\r\n",
        b"\xff\x00\x01",
    ];

    /// Whatever bytes come either way, in whatever pieces and order, the
    /// tap never panics, and once the stream is gone no capture is left
    /// in flight: each has its answer (bodies ended or cut) or an error.
    #[test]
    fn any_bytes_either_way_leave_no_capture_in_flight() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(27);
        for _ in 0..5_000 {
            let (tap, captures) = new_tap();
            for _ in 0..rng.random_range(1..12) {
                let (pieces, toward_upstream) = if rng.random_bool(0.5) {
                    (REQUEST_PIECES, true)
                } else {
                    (RESPONSE_PIECES, false)
                };
                let mut bytes = pieces[rng.random_range(0..pieces.len())].to_vec();
                if rng.random_bool(0.2) {
                    // A piece cut short, or with a byte changed.
                    let at = rng.random_range(0..bytes.len());
                    if rng.random_bool(0.5) {
                        bytes.truncate(at);
                    } else {
                        bytes[at] = rng.random();
                    }
                }
                let piece = rng.random_range(1..=bytes.len().max(1));
                if toward_upstream {
                    requests(&tap, &bytes, piece);
                } else {
                    responses(&tap, &bytes, piece);
                }
                if rng.random_bool(0.05) {
                    tap.lock().upstream_closed();
                }
            }
            drop(tap);
            for c in captured(&captures) {
                let answered = c.response.as_ref().is_some_and(|r| {
                    r.body.state != BodyState::Streaming
                        && c.request_body.state != BodyState::Streaming
                });
                assert!(
                    answered || c.error.is_some(),
                    "left in flight: {} {} {:?}",
                    c.request.method,
                    c.request.uri,
                    c.response.as_ref().map(|r| r.status)
                );
            }
        }
    }

    #[test]
    fn chunk_sizes_are_checked() {
        let (tap, captures) = new_tap();
        requests(
            &tap,
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n10000000000000000\r\n",
            64,
        );
        assert!(matches!(
            captured(&captures)[0].request_body.state,
            BodyState::Cut(_)
        ));
    }
}
