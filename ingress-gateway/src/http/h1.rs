//! HTTP/1.1 to the upstream without hyper's client, for every request but
//! an upgrade. The request's head goes out as one frame on the data
//! stream, its body (if any) after it, frame by frame, while the response
//! is read from the frames as they arrive: its head parsed in place, its
//! body handed on as the frames' own bytes, not copied. The exchange runs
//! inside the request's future, so the only task it wakes is the visitor
//! connection's. Upgrades (WebSockets) and CONNECT still go through
//! hyper's client (see `upstream`), which hands over the connection.

use std::{
    fmt::Write as _,
    future::poll_fn,
    io,
    mem::MaybeUninit,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use postern_proto::{ErrorCode, Failure, InboundFrames, TunnelIo};
use sync_wrapper::SyncWrapper;

use super::{BoxError, TunnelConn, upstream::PoolInner};

/// Bytes a response head may take, 1xx responses before it included:
/// hyper's client allows about as much.
const MAX_HEAD: usize = 400 * 1024;
/// Header fields a response head may have: hyper's default.
const MAX_HEADERS: usize = 100;
/// Bytes a chunk-size line may take.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Bytes the trailers of a chunked body may take.
const MAX_TRAILERS: usize = 16 * 1024;

/// Whether the request can take this path: anything but an upgrade.
pub(super) fn suits<B>(req: &Request<B>) -> bool {
    req.method() != Method::CONNECT && !req.headers().contains_key(http::header::UPGRADE)
}

/// The request's head as HTTP/1.1 puts it on the wire; its headers as the
/// request has them (the hop-by-hop ones already gone, the body's framing
/// added by [`sending`]).
pub(super) fn encode_head<B>(req: &Request<B>) -> Bytes {
    let method = req.method().as_str();
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let fields: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    let mut head = BytesMut::with_capacity(method.len() + target.len() + 13 + fields);
    for part in [method.as_bytes(), b" ", target.as_bytes(), b" HTTP/1.1\r\n"] {
        head.extend_from_slice(part);
    }
    for (name, value) in req.headers() {
        for part in [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
            head.extend_from_slice(part);
        }
    }
    head.extend_from_slice(b"\r\n");
    head.freeze()
}

/// Why an exchange ended without a response.
pub(super) enum ExchangeError {
    /// The request could not be written: the stream was gone.
    Unsent(io::Error),
    /// The stream ended or failed before a byte of the response came.
    NoResponse(io::Error),
    /// The response failed part way, or is not HTTP/1.1.
    Failed(Failure),
}

/// A response head and how its body is framed.
struct Head {
    response: Response<()>,
    framing: Framing,
    keep_alive: bool,
}

#[derive(Debug, PartialEq)]
enum Framing {
    /// HEAD, 204, 304: no body whatever the headers say.
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes.
    Close,
}

fn invalid(detail: impl Into<String>) -> Failure {
    Failure::new(ErrorCode::UPSTREAM_INVALID_RESPONSE, detail)
}

/// How a request's body goes to the upstream.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Sending {
    /// No body.
    Nothing,
    /// As it comes, its length in `Content-Length`.
    AsIs,
    /// In chunks.
    Chunked,
}

/// How `req`'s body will be sent, with the header that says so added
/// when the request has none: its `Content-Length` kept, an exact length
/// known (a body a policy read whole) given one, any other body chunked.
pub(super) fn sending<B: http_body::Body>(req: &mut Request<B>) -> Sending {
    if req.body().is_end_stream() {
        return Sending::Nothing;
    }
    if req.headers().contains_key(http::header::CONTENT_LENGTH) {
        return Sending::AsIs;
    }
    if let Some(length) = req.body().size_hint().exact() {
        req.headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
        return Sending::AsIs;
    }
    req.headers_mut().insert(
        http::header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    Sending::Chunked
}

/// Sends `head` on `conn`, then the request's `body` (taken once the head
/// is out, so that a request whose head could not be sent keeps it) while
/// the response's head is read. `head_request`: the request is a HEAD,
/// whose response has no body. A response that comes before the request's
/// body has all been sent ends the sending, and its stream is not used
/// again.
pub(super) async fn exchange(
    mut conn: TunnelConn,
    mut head: Bytes,
    (body, sending): (&mut Option<super::VisitorBody>, Sending),
    head_request: bool,
    pool: Arc<PoolInner>,
) -> Result<Response<ResponseBody>, ExchangeError> {
    let io = conn.io.inner_mut();
    let _waiting = Waiting::start(io);
    while !head.is_empty() {
        poll_fn(|cx| io.poll_send(cx, &mut head))
            .await
            .map_err(ExchangeError::Unsent)?;
    }
    let mut body = body.take().filter(|_| sending != Sending::Nothing);
    // Bytes of the body taken from the visitor and not yet sent.
    let mut out = Bytes::new();
    let mut ended = false;
    // All of the body went out: only then may the stream be used again.
    let mut sent = body.is_none();
    let mut reader = HeadReader::default();
    let (mut parsed, rest) = poll_fn(|cx| {
        while let Some(visitor) = body.as_mut() {
            if !out.is_empty() {
                match io.poll_send(cx, &mut out) {
                    Poll::Ready(Ok(())) => continue,
                    // The stream is gone: the reading says how.
                    Poll::Ready(Err(_)) => body = None,
                    Poll::Pending => {}
                }
                break;
            }
            if ended {
                sent = true;
                body = None;
                break;
            }
            match http_body::Body::poll_frame(Pin::new(visitor), cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers are dropped, as hyper's client drops those
                    // no `Trailer` header announced (it is hop-by-hop).
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        out = match sending {
                            Sending::Chunked => chunk(&data),
                            _ => data,
                        };
                    }
                }
                Poll::Ready(None) => {
                    ended = true;
                    if sending == Sending::Chunked {
                        out = Bytes::from_static(b"0\r\n\r\n");
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(ExchangeError::Failed(Failure::new(
                        ErrorCode::BAD_REQUEST,
                        format!("the request body failed: {e}"),
                    ))));
                }
                Poll::Pending => break,
            }
        }
        reader.poll(io, cx, head_request)
    })
    .await?;
    if !sent {
        // Answered before all of the body was sent, or the sending failed.
        parsed.keep_alive = false;
    }
    let Head {
        response,
        framing,
        keep_alive,
    } = parsed;
    let state = match framing {
        Framing::Empty | Framing::Length(0) => State::Done,
        Framing::Length(n) => State::Length(n),
        Framing::Chunked => State::Chunked(Chunked::default()),
        Framing::Close => State::Close,
    };
    let mut body = ResponseBody {
        conn: Some(SyncWrapper::new(conn)),
        rest,
        state,
        keep_alive,
        pool,
    };
    if matches!(body.state, State::Done) {
        body.finish();
    }
    Ok(response.map(|()| body))
}

/// One chunk of a chunked request body: size line, data, CRLF.
fn chunk(data: &[u8]) -> Bytes {
    // At most 16 hexadecimal digits and two CRLFs around the data.
    let mut chunk = BytesMut::with_capacity(data.len() + 20);
    write!(chunk, "{:x}\r\n", data.len()).expect("a BytesMut grows");
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(b"\r\n");
    chunk.freeze()
}

/// Exchanges between sending their request and reading their response's
/// head, in the whole process.
static WAITING: AtomicUsize = AtomicUsize::new(0);

/// One exchange counted in [`WAITING`] while it lives. An exchange that
/// starts while others wait defers its stream's wakes of the connection's
/// task ([`TunnelIo::defer_wakes`]): under load, its frames join the
/// others' in one write to the tunnel; one visitor alone pays nothing.
struct Waiting;

impl Waiting {
    fn start(io: &TunnelIo<InboundFrames>) -> Waiting {
        io.defer_wakes(WAITING.fetch_add(1, Ordering::Relaxed) > 0);
        Waiting
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        WAITING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads a response head from the frames as they arrive.
#[derive(Default)]
struct HeadReader {
    /// The head so far, when it did not come in one frame.
    gathered: BytesMut,
    /// Where the search for the head's end goes on from.
    scanned: usize,
}

impl HeadReader {
    /// The head, and the bytes after it.
    fn poll(
        &mut self,
        io: &mut TunnelIo<InboundFrames>,
        cx: &mut Context<'_>,
        head_request: bool,
    ) -> Poll<Result<(Head, Bytes), ExchangeError>> {
        loop {
            let chunk = match ready!(io.poll_chunk(cx)) {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection before it responded",
                    );
                    return Poll::Ready(Err(if self.gathered.is_empty() {
                        ExchangeError::NoResponse(e)
                    } else {
                        ExchangeError::Failed(invalid(e.to_string()))
                    }));
                }
                Err(e) if self.gathered.is_empty() => {
                    return Poll::Ready(Err(ExchangeError::NoResponse(e)));
                }
                Err(e) => {
                    return Poll::Ready(Err(ExchangeError::Failed(super::classify_client_error(
                        &e,
                    ))));
                }
            };
            if self.gathered.is_empty() {
                // The usual case: the whole head in the first frame.
                if let Some((len, parsed)) =
                    parse_head(&chunk, head_request).map_err(ExchangeError::Failed)?
                {
                    return Poll::Ready(Ok((parsed, chunk.slice(len..))));
                }
            }
            self.gathered.extend_from_slice(&chunk);
            if self.gathered.len() > MAX_HEAD {
                return Poll::Ready(Err(ExchangeError::Failed(invalid(
                    "the upstream's response head is too large",
                ))));
            }
            // Parse again only once a head's end has arrived.
            let from = self.scanned.saturating_sub(3);
            self.scanned = self.gathered.len();
            if !self.gathered[from..].windows(4).any(|w| w == b"\r\n\r\n") {
                continue;
            }
            let whole = self.gathered.split().freeze();
            match parse_head(&whole, head_request).map_err(ExchangeError::Failed)? {
                Some((len, parsed)) => return Poll::Ready(Ok((parsed, whole.slice(len..)))),
                None => self.gathered = BytesMut::from(whole),
            }
        }
    }
}

/// Parses the response head at the start of `buf`, skipping 1xx interim
/// responses: its length (theirs included) and the head, or `None` when
/// more bytes are needed.
fn parse_head(buf: &Bytes, head_request: bool) -> Result<Option<(usize, Head)>, Failure> {
    let mut start = 0;
    loop {
        // Left uninitialised: the parser writes the fields it finds.
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let config = httparse::ParserConfig::default();
        let len = match config.parse_response_with_uninit_headers(
            &mut parsed,
            &buf[start..],
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => {
                return Err(invalid(format!(
                    "the upstream's response head is invalid: {e}"
                )));
            }
        };
        let status = parsed
            .code
            .and_then(|code| StatusCode::from_u16(code).ok())
            .ok_or_else(|| invalid("the upstream's response has an invalid status code"))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(invalid(
                "the upstream switched protocols on a request that did not ask it to",
            ));
        }
        if status.is_informational() {
            start += len;
            continue;
        }
        let version = if parsed.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        let mut headers = HeaderMap::with_capacity(parsed.headers.len());
        let mut keep_alive = version == Version::HTTP_11;
        let mut close = false;
        for field in parsed.headers.iter() {
            let (name, value) = header_field(buf, field)?;
            if name == http::header::CONNECTION {
                for token in value.as_bytes().split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            }
            headers.append(name, value);
        }
        let framing = framing(&headers, status, version, head_request)?;
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        if let Some(reason) = parsed.reason
            && Some(reason) != status.canonical_reason()
            && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason.as_bytes())
        {
            response.extensions_mut().insert(reason);
        }
        *response.headers_mut() = headers;
        let keep_alive = keep_alive && !close && framing != Framing::Close;
        return Ok(Some((
            start + len,
            Head {
                response,
                framing,
                keep_alive,
            },
        )));
    }
}

/// A parsed header field of `buf` as a name and a value, the value's
/// bytes shared with `buf`.
fn header_field(
    buf: &Bytes,
    field: &httparse::Header<'_>,
) -> Result<(HeaderName, HeaderValue), Failure> {
    let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| {
        invalid(format!(
            "the upstream sent an invalid header name {:?}",
            field.name
        ))
    })?;
    let value = HeaderValue::from_maybe_shared(buf.slice_ref(field.value))
        .map_err(|_| invalid(format!("the upstream sent an invalid value for {name}")))?;
    Ok((name, value))
}

/// How the body of a response is delimited (RFC 9112 section 6.3).
fn framing(
    headers: &HeaderMap,
    status: StatusCode,
    version: Version,
    head_request: bool,
) -> Result<Framing, Failure> {
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Empty);
    }
    if headers.contains_key(http::header::TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(invalid(
                "the upstream sent Transfer-Encoding in an HTTP/1.0 response",
            ));
        }
        let last = headers
            .get_all(http::header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|t| !t.is_empty());
        return Ok(match last {
            Some(t) if t.eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
            _ => Framing::Close,
        });
    }
    let mut length = None;
    for value in headers.get_all(http::header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|b| *b == b',') {
            let n = std::str::from_utf8(part.trim_ascii())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| invalid("the upstream sent an invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid(
                    "the upstream sent conflicting Content-Length values",
                ));
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::Close, Framing::Length))
}

/// A response body read from the data stream; once it has ended, the
/// stream goes back to its pool for the next request when the upstream
/// keeps the connection.
pub(crate) struct ResponseBody {
    /// The stream, until the body has ended.
    conn: Option<SyncWrapper<TunnelConn>>,
    /// Bytes read and not decoded yet.
    rest: Bytes,
    state: State,
    keep_alive: bool,
    pool: Arc<PoolInner>,
}

enum State {
    Length(u64),
    Chunked(Chunked),
    Close,
    Done,
}

impl ResponseBody {
    /// The body has ended: its stream goes back to the pool, unless the
    /// upstream closes the connection or sent more than the body.
    fn finish(&mut self) {
        self.state = State::Done;
        let conn = self.conn.take();
        if self.keep_alive
            && self.rest.is_empty()
            && let Some(conn) = conn
        {
            self.pool.park_own(conn.into_inner());
        }
    }

    /// Bytes not decoded yet, read from the stream when none are left;
    /// `None` at its end.
    fn poll_bytes(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, BoxError>> {
        if !self.rest.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.rest))));
        }
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(None));
        };
        Poll::Ready(match ready!(conn.get_mut().io.inner_mut().poll_chunk(cx)) {
            Ok(chunk) => Ok(chunk),
            Err(e) => Err(Box::new(super::classify_client_error(&e))),
        })
    }
}

fn cut_short() -> BoxError {
    Box::new(invalid(
        "the upstream closed the connection before the body ended",
    ))
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Length(left) => {
                    let left = *left;
                    let Some(mut data) = ready!(this.poll_bytes(cx))? else {
                        this.state = State::Done;
                        return Poll::Ready(Some(Err(cut_short())));
                    };
                    if data.len() as u64 > left {
                        // More than the body: the connection is not reused.
                        this.keep_alive = false;
                        data.truncate(left as usize);
                    }
                    let left = left - data.len() as u64;
                    this.state = State::Length(left);
                    if left == 0 {
                        this.finish();
                    }
                    if !data.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                State::Close => match ready!(this.poll_bytes(cx))? {
                    Some(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    None => this.finish(),
                },
                State::Chunked(_) if this.rest.is_empty() => match ready!(this.poll_bytes(cx))? {
                    Some(data) => this.rest = data,
                    None => {
                        this.state = State::Done;
                        return Poll::Ready(Some(Err(cut_short())));
                    }
                },
                State::Chunked(chunked) => match chunked.decode(&mut this.rest)? {
                    Some(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Some(Decoded::End(trailers)) => {
                        this.finish();
                        if let Some(trailers) = trailers {
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                    }
                    None => {}
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(left) => SizeHint::with_exact(left),
            State::Chunked(_) | State::Close => SizeHint::default(),
        }
    }
}

/// Where a chunked body's decoding is (RFC 9112 section 7.1).
#[derive(Default)]
struct Chunked {
    step: Step,
    /// A line begun in an earlier frame.
    line: BytesMut,
    /// The trailer fields so far, each with its CRLF.
    trailers: BytesMut,
}

#[derive(Default)]
enum Step {
    #[default]
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

enum Decoded {
    Data(Bytes),
    /// The last chunk, and the trailer fields after it if there were any.
    End(Option<HeaderMap>),
}

impl Chunked {
    /// Decodes from the start of `input`, taking what it uses: some data,
    /// or the end, or `None` when `input` ran out first.
    fn decode(&mut self, input: &mut Bytes) -> Result<Option<Decoded>, Failure> {
        loop {
            match self.step {
                Step::Size => {
                    let Some(line) = self.line(input, MAX_CHUNK_LINE)? else {
                        return Ok(None);
                    };
                    self.step = match chunk_size(&line)? {
                        0 => Step::Trailers,
                        size => Step::Data(size),
                    };
                }
                Step::Data(left) => {
                    if input.is_empty() {
                        return Ok(None);
                    }
                    let n = left.min(input.len() as u64);
                    self.step = if n == left {
                        Step::DataEnd
                    } else {
                        Step::Data(left - n)
                    };
                    return Ok(Some(Decoded::Data(input.split_to(n as usize))));
                }
                Step::DataEnd => {
                    let Some(line) = self.line(input, 0)? else {
                        return Ok(None);
                    };
                    if !line.is_empty() {
                        return Err(invalid(
                            "a chunk of the upstream's body is longer than its size",
                        ));
                    }
                    self.step = Step::Size;
                }
                Step::Trailers => {
                    let Some(line) = self.line(input, MAX_TRAILERS)? else {
                        return Ok(None);
                    };
                    if !line.is_empty() {
                        if self.trailers.len() + line.len() + 2 > MAX_TRAILERS {
                            return Err(invalid(
                                "the trailers of the upstream's body are too large",
                            ));
                        }
                        self.trailers.extend_from_slice(&line);
                        self.trailers.extend_from_slice(b"\r\n");
                        continue;
                    }
                    self.step = Step::Size;
                    return Ok(Some(Decoded::End(self.take_trailers()?)));
                }
            }
        }
    }

    /// The next line of `input` without its CRLF, joined to the part an
    /// earlier frame brought; `None` when it has not ended yet. A line
    /// may have at most `max` bytes before its CRLF.
    fn line(&mut self, input: &mut Bytes, max: usize) -> Result<Option<Bytes>, Failure> {
        let too_long = || invalid("a line of the upstream's chunked body is too long");
        let Some(end) = input.iter().position(|b| *b == b'\n') else {
            if self.line.len() + input.len() > max + 1 {
                return Err(too_long());
            }
            self.line.extend_from_slice(input);
            input.clear();
            return Ok(None);
        };
        let part = input.split_to(end + 1);
        let mut line = if self.line.is_empty() {
            part
        } else {
            self.line.extend_from_slice(&part);
            self.line.split().freeze()
        };
        if line.len() > max + 2 {
            return Err(too_long());
        }
        if !line.ends_with(b"\r\n") {
            return Err(invalid(
                "a line of the upstream's chunked body does not end in CRLF",
            ));
        }
        line.truncate(line.len() - 2);
        Ok(Some(line))
    }

    fn take_trailers(&mut self) -> Result<Option<HeaderMap>, Failure> {
        if self.trailers.is_empty() {
            return Ok(None);
        }
        self.trailers.extend_from_slice(b"\r\n");
        let block = self.trailers.split().freeze();
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let bad = || invalid("the trailers of the upstream's body are invalid");
        match httparse::parse_headers(&block, &mut fields) {
            Ok(httparse::Status::Complete((_, fields))) => {
                let mut trailers = HeaderMap::with_capacity(fields.len());
                for field in fields.iter() {
                    let (name, value) = header_field(&block, field).map_err(|_| bad())?;
                    trailers.append(name, value);
                }
                Ok(Some(trailers))
            }
            _ => Err(bad()),
        }
    }
}

/// A chunk-size line's size: hexadecimal digits, then perhaps extensions
/// (ignored, as every server does).
fn chunk_size(line: &[u8]) -> Result<u64, Failure> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let after = line[digits..].trim_ascii();
    if digits == 0 || digits > 16 || !(after.is_empty() || after.starts_with(b";")) {
        return Err(invalid("a chunk size in the upstream's body is invalid"));
    }
    let digits = std::str::from_utf8(&line[..digits]).expect("hexadecimal digits are ASCII");
    u64::from_str_radix(digits, 16)
        .map_err(|_| invalid("a chunk size in the upstream's body is invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str, head_request: bool) -> Result<Option<(usize, Head)>, Failure> {
        parse_head(&Bytes::copy_from_slice(text.as_bytes()), head_request)
    }

    fn complete(text: &str) -> Head {
        let (len, parsed) = head(text, false).unwrap().expect("a complete head");
        assert_eq!(&text[len..], "body", "the head ends where the body starts");
        parsed
    }

    /// Decodes `wire` fed in pieces of `step` bytes: the data and the
    /// trailers. Nothing may follow the end.
    fn dechunk(wire: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>), Failure> {
        let mut chunked = Chunked::default();
        let mut data = Vec::new();
        for piece in wire.chunks(step) {
            let mut input = Bytes::copy_from_slice(piece);
            while let Some(decoded) = chunked.decode(&mut input)? {
                match decoded {
                    Decoded::Data(bytes) => data.extend_from_slice(&bytes),
                    Decoded::End(trailers) => {
                        assert!(input.is_empty(), "bytes after the end");
                        return Ok((data, trailers));
                    }
                }
            }
        }
        Err(invalid("the body did not end"))
    }

    #[test]
    fn a_request_head_is_written_as_http_1_1_with_its_headers() {
        let req = Request::builder()
            .method("GET")
            .uri("/a/b?c=d")
            .header("host", "app.example.test")
            .header("x-forwarded-for", "10.0.0.1")
            .body(())
            .unwrap();
        assert_eq!(
            encode_head(&req),
            "GET /a/b?c=d HTTP/1.1\r\nhost: app.example.test\r\nx-forwarded-for: 10.0.0.1\r\n\r\n"
        );
    }

    #[test]
    fn every_request_but_an_upgrade_takes_this_path() {
        let post = Request::post("/")
            .body(http_body_util::Full::new(Bytes::from_static(b"x")))
            .unwrap();
        assert!(suits(&post));
        let upgrade = Request::get("/")
            .header("upgrade", "websocket")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        assert!(!suits(&upgrade));
        let connect = Request::connect("example.test:443")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        assert!(!suits(&connect));
    }

    #[test]
    fn a_request_body_is_sent_as_its_headers_say_or_in_chunks() {
        let mut get = Request::get("/")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        assert!(sending(&mut get) == Sending::Nothing);
        assert!(get.headers().is_empty(), "nothing added");

        let mut known = Request::post("/")
            .body(http_body_util::Full::new(Bytes::from_static(b"abc")))
            .unwrap();
        assert!(sending(&mut known) == Sending::AsIs);
        assert_eq!(
            known.headers()["content-length"],
            "3",
            "an exact length is told"
        );

        let mut told = Request::post("/")
            .header("content-length", "3")
            .body(http_body_util::Full::new(Bytes::from_static(b"abc")))
            .unwrap();
        assert!(sending(&mut told) == Sending::AsIs);
        assert_eq!(told.headers().len(), 1, "the visitor's length is kept");

        let streamed = http_body_util::StreamBody::new(futures_util::stream::iter(vec![Ok::<
            _,
            std::convert::Infallible,
        >(
            Frame::data(Bytes::from_static(b"abc")),
        )]));
        let mut unknown = Request::post("/").body(streamed).unwrap();
        assert!(sending(&mut unknown) == Sending::Chunked);
        assert_eq!(unknown.headers()["transfer-encoding"], "chunked");
        assert_eq!(chunk(b"hello, world!!!!!"), "11\r\nhello, world!!!!!\r\n");
    }

    #[test]
    fn response_heads_give_status_headers_and_framing() {
        let ok = complete("HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-A: 1\r\nX-A: 2\r\n\r\nbody");
        assert_eq!(ok.response.status(), 200);
        assert_eq!(ok.framing, Framing::Length(4));
        assert!(ok.keep_alive);
        let values: Vec<_> = ok.response.headers().get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert!(
            ok.response
                .extensions()
                .get::<hyper::ext::ReasonPhrase>()
                .is_none()
        );

        let chunked =
            complete("HTTP/1.1 201 Made It\r\nTransfer-Encoding: gzip, chunked\r\n\r\nbody");
        assert_eq!(chunked.framing, Framing::Chunked);
        let reason = chunked
            .response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .unwrap();
        assert_eq!(reason.as_bytes(), b"Made It", "a reason of its own is kept");

        let until_close = complete("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nbody");
        assert_eq!(until_close.framing, Framing::Close);
        assert!(!until_close.keep_alive);
        let no_length = complete("HTTP/1.1 200 OK\r\n\r\nbody");
        assert_eq!(no_length.framing, Framing::Close);

        let closing =
            complete("HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbody");
        assert!(!closing.keep_alive);
        let old = complete("HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nbody");
        assert!(
            !old.keep_alive,
            "HTTP/1.0 closes unless asked to keep alive"
        );
        let old_kept =
            complete("HTTP/1.0 200 OK\r\nContent-Length: 4\r\nConnection: Keep-Alive\r\n\r\nbody");
        assert!(old_kept.keep_alive);
        assert_eq!(old_kept.response.version(), Version::HTTP_10);
    }

    #[test]
    fn responses_without_a_body_whatever_their_headers_say() {
        for text in [
            "HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\nbody",
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\nbody",
        ] {
            assert_eq!(complete(text).framing, Framing::Empty, "{text}");
        }
        let (_, to_head) = head("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(
            to_head.framing,
            Framing::Empty,
            "a HEAD's response has no body"
        );
    }

    #[test]
    fn interim_responses_are_skipped() {
        let parsed = complete(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody",
        );
        assert_eq!(parsed.response.status(), 200);
        assert!(parsed.response.headers().get("link").is_none());
        assert!(
            head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200", false)
                .unwrap()
                .is_none(),
            "more bytes are needed after the interim response"
        );
    }

    #[test]
    fn incomplete_heads_wait_for_more() {
        let whole = "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n";
        for end in 0..whole.len() {
            assert!(head(&whole[..end], false).unwrap().is_none(), "{end}");
        }
    }

    #[test]
    fn invalid_responses_are_refused_with_a_reason() {
        for (text, why) in [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
                "conflicting",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 4, 5\r\n\r\n",
                "conflicting",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: -4\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: +4\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                "HTTP/1.0",
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\n\r\n",
                "switched protocols",
            ),
            ("HTTP/1.1 099 Odd\r\n\r\n", "invalid"),
            ("HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "invalid"),
            ("SMTP ready\r\n\r\n", "invalid"),
        ] {
            let Err(failure) = head(text, false) else {
                panic!("{text:?} was accepted");
            };
            assert_eq!(failure.code, ErrorCode::UPSTREAM_INVALID_RESPONSE);
            assert!(failure.to_string().contains(why), "{text:?}: {failure}");
        }
        let same_twice =
            complete("HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nbody");
        assert_eq!(same_twice.framing, Framing::Length(4));
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: y\r\n"))
            .collect();
        assert!(head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), false).is_err());
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_frames_they_come_in() {
        let wire = b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Sum: 9\r\nX-Two: 2\r\n\r\n";
        for step in 1..=wire.len() {
            let (data, trailers) = dechunk(wire, step).unwrap();
            assert_eq!(data, b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            let trailers = trailers.expect("trailers");
            assert_eq!(trailers["x-sum"], "9");
            assert_eq!(trailers["x-two"], "2");
        }
        let (data, trailers) = dechunk(b"0\r\n\r\n", 1).unwrap();
        assert!(data.is_empty() && trailers.is_none());
    }

    #[test]
    fn bad_chunked_bodies_are_refused() {
        for wire in [
            &b"5\r\nhelloX\r\n0\r\n\r\n"[..],
            b"zz\r\n",
            b"\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"5 x\r\nhello\r\n",
            b"0\r\nBad Name: 1\r\n\r\n",
        ] {
            for step in [1, wire.len()] {
                assert!(
                    dechunk(wire, step).is_err(),
                    "{:?} in pieces of {step}",
                    String::from_utf8_lossy(wire)
                );
            }
        }
        let long_line = format!("5;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert!(dechunk(long_line.as_bytes(), 7).is_err());
        let many_trailers = format!("0\r\n{}\r\n", "x-t: 1\r\n".repeat(MAX_TRAILERS / 8 + 1));
        assert!(dechunk(many_trailers.as_bytes(), 100).is_err());
    }

    #[test]
    fn chunk_sizes_are_hexadecimal_up_to_sixteen_digits() {
        assert_eq!(chunk_size(b"ff").unwrap(), 255);
        assert_eq!(chunk_size(b"FFFFFFFFFFFFFFFF").unwrap(), u64::MAX);
        assert_eq!(chunk_size(b"10 ; name=value").unwrap(), 16);
        assert!(chunk_size(b"").is_err());
        assert!(chunk_size(b"0x10").is_err());
    }
}
