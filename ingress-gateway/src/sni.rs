//! Peeks the TLS ClientHello a client sends first, so the edge can route by
//! SNI (and see the offered ALPN protocols) before any TLS termination.
//!
//! The parser only reads: the caller keeps the bytes and, for TLS
//! passthrough, forwards them untouched. It is std-only, never panics and
//! never allocates more than the bytes it was given.
//!
//! Errors are only reported once the bytes seen so far prove the stream can
//! never become a valid ClientHello, so every prefix of a valid hello yields
//! [`Peek::Incomplete`].

/// Largest TLS record length we accept: 2^14 bytes of plaintext plus the
/// 2048 bytes of expansion RFC 5246 allows for ciphertext.
pub const MAX_RECORD_LEN: usize = (1 << 14) + 2048;

const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const NAME_TYPE_HOST_NAME: u8 = 0;
const MAX_SESSION_ID_LEN: usize = 32;
const MAX_HOST_NAME_LEN: usize = 255;

/// What the ClientHello says, as far as routing needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientHello {
    /// SNI host_name, lower-cased, trailing dot removed; None when absent.
    pub server_name: Option<String>,
    /// ALPN protocol names offered, in order (empty when absent).
    pub alpn: Vec<Vec<u8>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peek {
    /// More bytes are needed.
    Incomplete,
    /// The whole ClientHello was found in `buf`.
    Complete(ClientHello),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeekError {
    #[error("not a TLS handshake")]
    NotTls,
    #[error("ClientHello larger than {0} bytes")]
    TooLarge(usize),
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

impl PeekError {
    /// Short stable label for metrics: "not_tls", "too_large", "malformed".
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            PeekError::NotTls => "not_tls",
            PeekError::TooLarge(_) => "too_large",
            PeekError::Malformed(_) => "malformed",
        }
    }
}

use PeekError::Malformed;

/// Parses the ClientHello at the start of `buf` (raw bytes from the socket).
/// `max_len` caps the bytes we are willing to buffer (record headers included).
///
/// The ClientHello may be fragmented over several consecutive handshake
/// records; they are reassembled. Bytes after the record that ends the
/// ClientHello are ignored.
///
/// Returns [`Peek::Incomplete`] while more bytes are needed and may still fit
/// in `max_len`.
///
/// # Errors
///
/// - [`PeekError::NotTls`] when the first record is not a TLS handshake
///   record (plain HTTP, SSLv2-style hello, ...).
/// - [`PeekError::TooLarge`] when the records carrying the ClientHello cannot
///   fit in `max_len` bytes.
/// - [`PeekError::Malformed`] when the bytes seen can never become a valid
///   ClientHello.
pub fn peek_client_hello(buf: &[u8], max_len: usize) -> Result<Peek, PeekError> {
    // Handshake bytes reassembled from the records read so far.
    let mut handshake: Vec<u8> = Vec::new();
    // Start of the current record in `buf`.
    let mut pos: usize = 0;

    loop {
        let rest = buf.get(pos..).unwrap_or_default();
        check_record_header(rest, pos == 0)?;
        // Total handshake message length, once its 4-byte header is known.
        // Invariant here: if known, it is larger than `handshake.len()`.
        let message_len = handshake_message_len(&handshake)?;

        let Some(record_len) = rest.get(3..RECORD_HEADER_LEN).map(be_usize) else {
            let missing = message_len.map_or(0, |m| m.saturating_sub(handshake.len()));
            return need(
                pos.saturating_add(RECORD_HEADER_LEN)
                    .saturating_add(missing),
                max_len,
            );
        };
        if record_len == 0 {
            return Err(Malformed("empty handshake record"));
        }
        if record_len > MAX_RECORD_LEN {
            return Err(Malformed("record too long"));
        }

        let body_start = pos.saturating_add(RECORD_HEADER_LEN);
        let record_end = body_start.saturating_add(record_len);
        let available = buf
            .get(body_start..record_end.min(buf.len()))
            .unwrap_or_default();
        let record_complete = available.len() == record_len;
        // Handshake length once this whole record is appended.
        let after_record = handshake.len().saturating_add(record_len);
        handshake.extend_from_slice(available);

        match handshake_message_len(&handshake)? {
            Some(m) if m < after_record => {
                // The record carries more than the ClientHello: a client must
                // wait for the server before sending any other handshake message.
                return Err(Malformed("trailing data after ClientHello"));
            }
            Some(m) if m == after_record => {
                if !record_complete {
                    return need(record_end, max_len);
                }
                if record_end > max_len {
                    return Err(PeekError::TooLarge(max_len));
                }
                let body = handshake.get(HANDSHAKE_HEADER_LEN..).unwrap_or_default();
                return parse_client_hello(body).map(Peek::Complete);
            }
            Some(m) => {
                // At least one more record, with its header, is required.
                let lower_bound = record_end
                    .saturating_add(RECORD_HEADER_LEN)
                    .saturating_add(m.saturating_sub(after_record));
                if !record_complete || lower_bound > max_len {
                    return need(lower_bound, max_len);
                }
            }
            None => {
                if !record_complete {
                    return need(record_end, max_len);
                }
            }
        }
        pos = record_end;
    }
}

/// More bytes are needed: `total` is a lower bound for the bytes required.
fn need(total: usize, max_len: usize) -> Result<Peek, PeekError> {
    if total > max_len {
        Err(PeekError::TooLarge(max_len))
    } else {
        Ok(Peek::Incomplete)
    }
}

/// Checks whatever part of a record header is present at the start of `rest`.
fn check_record_header(rest: &[u8], first: bool) -> Result<(), PeekError> {
    let err = |what| {
        if first {
            PeekError::NotTls
        } else {
            Malformed(what)
        }
    };
    if rest.first().is_some_and(|&t| t != CONTENT_TYPE_HANDSHAKE) {
        return Err(err("non-handshake record inside ClientHello"));
    }
    if rest.get(1).is_some_and(|&major| major != 3) {
        return Err(err("bad record version"));
    }
    Ok(())
}

/// Length of the handshake message (header included) once its header is
/// known; checks the message type as soon as it is.
fn handshake_message_len(handshake: &[u8]) -> Result<Option<usize>, PeekError> {
    let mut r = Reader::new(handshake);
    if r.u8().is_some_and(|t| t != HANDSHAKE_CLIENT_HELLO) {
        return Err(Malformed("first handshake message is not a ClientHello"));
    }
    Ok(r.u24().map(|len| len.saturating_add(HANDSHAKE_HEADER_LEN)))
}

/// Parses the ClientHello body (after the 4-byte handshake header).
fn parse_client_hello(body: &[u8]) -> Result<ClientHello, PeekError> {
    let mut r = Reader::new(body);
    let version = r.u16().ok_or(Malformed("truncated legacy_version"))?;
    if version >> 8 != 3 {
        return Err(Malformed("bad legacy_version"));
    }
    r.bytes(32).ok_or(Malformed("truncated random"))?;
    let session_id = r.vec_u8().ok_or(Malformed("bad session_id length"))?;
    if session_id.len() > MAX_SESSION_ID_LEN {
        return Err(Malformed("session_id longer than 32 bytes"));
    }
    let cipher_suites = r.vec_u16().ok_or(Malformed("bad cipher_suites length"))?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err(Malformed("bad cipher_suites length"));
    }
    let compression = r
        .vec_u8()
        .ok_or(Malformed("bad compression_methods length"))?;
    if compression.is_empty() {
        return Err(Malformed("no compression_methods"));
    }

    let mut hello = ClientHello {
        server_name: None,
        alpn: Vec::new(),
    };
    if r.is_empty() {
        // No extensions block at all: valid (pre-TLS 1.2 style).
        return Ok(hello);
    }
    let extensions = r.vec_u16().ok_or(Malformed("bad extensions length"))?;
    if !r.is_empty() {
        return Err(Malformed("trailing data after extensions"));
    }

    let mut exts = Reader::new(extensions);
    let (mut seen_sni, mut seen_alpn) = (false, false);
    while !exts.is_empty() {
        let ext_type = exts.u16().ok_or(Malformed("truncated extension header"))?;
        let data = exts.vec_u16().ok_or(Malformed("bad extension length"))?;
        match ext_type {
            EXT_SERVER_NAME => {
                if std::mem::replace(&mut seen_sni, true) {
                    return Err(Malformed("duplicate server_name extension"));
                }
                hello.server_name = parse_server_name(data)?;
            }
            EXT_ALPN => {
                if std::mem::replace(&mut seen_alpn, true) {
                    return Err(Malformed("duplicate ALPN extension"));
                }
                hello.alpn = parse_alpn(data)?;
            }
            _ => {}
        }
    }
    Ok(hello)
}

/// server_name extension (RFC 6066 section 3): returns the first host_name.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, PeekError> {
    let mut r = Reader::new(data);
    let list = r
        .vec_u16()
        .ok_or(Malformed("bad server_name_list length"))?;
    if !r.is_empty() {
        return Err(Malformed("trailing data after server_name_list"));
    }
    if list.is_empty() {
        return Err(Malformed("empty server_name_list"));
    }
    let mut entries = Reader::new(list);
    let mut host_name = None;
    while !entries.is_empty() {
        let name_type = entries
            .u8()
            .ok_or(Malformed("truncated server_name entry"))?;
        let name = entries
            .vec_u16()
            .ok_or(Malformed("bad server name length"))?;
        if name_type == NAME_TYPE_HOST_NAME && host_name.is_none() {
            host_name = Some(normalize_host_name(name)?);
        }
    }
    Ok(host_name)
}

/// Validates an SNI host_name (LDH labels, plus '_'), lower-cases it and
/// strips one trailing dot.
fn normalize_host_name(name: &[u8]) -> Result<String, PeekError> {
    if name.is_empty() {
        return Err(Malformed("empty server name"));
    }
    if name.len() > MAX_HOST_NAME_LEN {
        return Err(Malformed("server name longer than 255 bytes"));
    }
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    if !name.iter().all(allowed) {
        return Err(Malformed("invalid character in server name"));
    }
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.split(|&b| b == b'.').any(<[u8]>::is_empty) {
        return Err(Malformed("empty label in server name"));
    }
    Ok(name
        .iter()
        .map(|b| char::from(b.to_ascii_lowercase()))
        .collect())
}

/// ALPN extension (RFC 7301 section 3.1): the offered protocol names.
fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, PeekError> {
    let mut r = Reader::new(data);
    let list = r.vec_u16().ok_or(Malformed("bad ALPN list length"))?;
    if !r.is_empty() {
        return Err(Malformed("trailing data after ALPN list"));
    }
    if list.is_empty() {
        return Err(Malformed("empty ALPN list"));
    }
    let mut names = Reader::new(list);
    let mut protocols = Vec::new();
    while !names.is_empty() {
        let name = names
            .vec_u8()
            .ok_or(Malformed("bad ALPN protocol length"))?;
        if name.is_empty() {
            return Err(Malformed("empty ALPN protocol name"));
        }
        protocols.push(name.to_vec());
    }
    Ok(protocols)
}

/// Big-endian unsigned integer of up to `usize` bytes (callers pass 2 or 3).
fn be_usize(bytes: &[u8]) -> usize {
    bytes.iter().fold(0, |n, &b| (n << 8) | usize::from(b))
}

/// Bounds-checked cursor over a byte slice; every read returns `None`
/// instead of running past the end.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.array().map(|[b]: [u8; 1]| b)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u24(&mut self) -> Option<usize> {
        self.bytes(3).map(be_usize)
    }

    /// A vector with a 1-byte length prefix.
    fn vec_u8(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.bytes(usize::from(len))
    }

    /// A vector with a 2-byte length prefix.
    fn vec_u16(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.bytes(usize::from(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same cap the fuzz target and the edge use: one full record.
    const MAX: usize = 16 * 1024 + 5;

    /// A real ClientHello, captured from
    /// `openssl s_client -connect 127.0.0.1:PORT -servername app.example.test -alpn h2,http/1.1`
    /// (OpenSSL 3.0.19) against a local listener that dumped the first bytes.
    const OPENSSL_HELLO_HEX: &str = "\
        160301014f0100014b0303d02d0db90016b13bd245028532ae90ee2cfe468854\
        2d18102f19d5ca64e3b0ad20743f7e54a6820351e8ad6af84f96b07cd7aad76e\
        64683e1348aa24157fcd56dc003e130213031301c02cc030009fcca9cca8ccaa\
        c02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d\
        009c003d003c0035002f00ff010000c40000001500130000106170702e657861\
        6d706c652e74657374000b000403000102000a00160014001d0017001e001900\
        1801000101010201030104002300000010000e000c02683208687474702f312e\
        310016000000170000000d002a0028040305030603080708080809080a080b08\
        0408050806040105010601030303010302040205020602002b00090803040303\
        03020301002d00020101003300260024001d0020811e1a7b834482f19a896311\
        34a139b8ee924252ff9105a0367e328fe7577073";

    fn unhex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .map(|b| char::from(b).to_digit(16).expect("hex digit") as u8)
            .collect();
        digits.chunks(2).map(|p| (p[0] << 4) | p[1]).collect()
    }

    fn openssl_hello() -> Vec<u8> {
        unhex(OPENSSL_HELLO_HEX)
    }

    fn u16_prefixed(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    fn u8_prefixed(body: &[u8]) -> Vec<u8> {
        let mut out = vec![body.len() as u8];
        out.extend_from_slice(body);
        out
    }

    fn ext(ext_type: u16, data: &[u8]) -> Vec<u8> {
        let mut out = ext_type.to_be_bytes().to_vec();
        out.extend(u16_prefixed(data));
        out
    }

    /// server_name extension with one host_name entry, raw bytes.
    fn sni_ext(name: &[u8]) -> Vec<u8> {
        let mut entry = vec![NAME_TYPE_HOST_NAME];
        entry.extend(u16_prefixed(name));
        ext(EXT_SERVER_NAME, &u16_prefixed(&entry))
    }

    fn alpn_ext(protocols: &[&str]) -> Vec<u8> {
        let list: Vec<u8> = protocols
            .iter()
            .flat_map(|p| u8_prefixed(p.as_bytes()))
            .collect();
        ext(EXT_ALPN, &u16_prefixed(&list))
    }

    /// A ClientHello handshake message (with its 4-byte header) carrying
    /// `extensions` verbatim as the extensions block; `None` omits the block.
    fn handshake_with(extensions: Option<&[u8]>) -> Vec<u8> {
        let mut body = vec![0x03, 0x03]; // legacy_version TLS 1.2
        body.extend((0u8..32).map(|i| i.wrapping_mul(37))); // random
        body.extend(u8_prefixed(&[0xab; 32])); // session_id
        body.extend(u16_prefixed(&[0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f])); // cipher_suites
        body.extend(u8_prefixed(&[0])); // compression_methods: null
        if let Some(extensions) = extensions {
            body.extend(u16_prefixed(extensions));
        }
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend(body);
        msg
    }

    /// Splits a handshake message into TLS records of at most `chunk` bytes.
    fn records(handshake: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in handshake.chunks(chunk) {
            out.extend_from_slice(&[CONTENT_TYPE_HANDSHAKE, 0x03, 0x01]);
            out.extend(u16_prefixed(part));
        }
        out
    }

    fn handshake(sni: Option<&str>, alpn: &[&str]) -> Vec<u8> {
        let mut exts = ext(0x000a, &[0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]); // supported_groups
        if let Some(name) = sni {
            exts.extend(sni_ext(name.as_bytes()));
        }
        if !alpn.is_empty() {
            exts.extend(alpn_ext(alpn));
        }
        exts.extend(ext(0x002b, &[0x04, 0x03, 0x04, 0x03, 0x03])); // supported_versions
        handshake_with(Some(&exts))
    }

    /// A ClientHello in a single record, like most clients send it.
    fn hello(sni: Option<&str>, alpn: &[&str]) -> Vec<u8> {
        let msg = handshake(sni, alpn);
        records(&msg, msg.len())
    }

    fn complete(buf: &[u8]) -> ClientHello {
        match peek_client_hello(buf, MAX) {
            Ok(Peek::Complete(hello)) => hello,
            other => panic!("expected Complete, got {other:?}"),
        }
    }

    fn malformed(buf: &[u8]) -> &'static str {
        match peek_client_hello(buf, MAX) {
            Err(Malformed(what)) => what,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    fn malformed_hello(extensions: &[u8]) -> &'static str {
        let msg = handshake_with(Some(extensions));
        malformed(&records(&msg, msg.len()))
    }

    /// Every strict prefix is Incomplete; the whole buffer is Complete.
    fn assert_prefixes_incomplete(buf: &[u8]) {
        for n in 0..buf.len() {
            assert_eq!(
                peek_client_hello(&buf[..n], MAX),
                Ok(Peek::Incomplete),
                "prefix {n}"
            );
        }
        complete(buf);
    }

    #[test]
    fn sni_is_lowercased_and_trailing_dot_stripped() {
        let h = complete(&hello(Some("App.Example.TEST."), &[]));
        assert_eq!(h.server_name.as_deref(), Some("app.example.test"));
        assert!(h.alpn.is_empty());
    }

    #[test]
    fn no_sni() {
        let h = complete(&hello(None, &["h2"]));
        assert_eq!(h.server_name, None);
        assert_eq!(h.alpn, vec![b"h2".to_vec()]);
    }

    #[test]
    fn alpn_list_in_order() {
        let h = complete(&hello(Some("a.test"), &["h2", "http/1.1", "acme-tls/1"]));
        assert_eq!(h.server_name.as_deref(), Some("a.test"));
        assert_eq!(
            h.alpn,
            vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"acme-tls/1".to_vec()]
        );
    }

    #[test]
    fn no_extensions_block() {
        let msg = handshake_with(None);
        let h = complete(&records(&msg, msg.len()));
        assert_eq!(
            h,
            ClientHello {
                server_name: None,
                alpn: vec![]
            }
        );
        // An empty extensions block is fine too.
        let msg = handshake_with(Some(&[]));
        assert_eq!(complete(&records(&msg, msg.len())).server_name, None);
    }

    #[test]
    fn real_openssl_capture() {
        let buf = openssl_hello();
        assert_eq!(buf.len(), 340);
        let h = complete(&buf);
        assert_eq!(h.server_name.as_deref(), Some("app.example.test"));
        assert_eq!(h.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    }

    #[test]
    fn every_prefix_is_incomplete() {
        assert_prefixes_incomplete(&openssl_hello());
        assert_prefixes_incomplete(&hello(Some("app.example.test"), &["h2"]));
        assert_prefixes_incomplete(&hello(None, &[]));
        let msg = handshake(Some("split.example.test"), &["h2"]);
        assert_prefixes_incomplete(&records(&msg, msg.len().div_ceil(3)));
        assert_prefixes_incomplete(&records(&msg, 1));
    }

    #[test]
    fn split_into_three_records() {
        let msg = handshake(Some("Split.Example.Test"), &["h2", "http/1.1"]);
        let buf = records(&msg, msg.len().div_ceil(3));
        assert_eq!(buf.len(), msg.len() + 3 * RECORD_HEADER_LEN);
        let h = complete(&buf);
        assert_eq!(h.server_name.as_deref(), Some("split.example.test"));
        assert_eq!(h.alpn.len(), 2);
    }

    #[test]
    fn real_capture_refragmented() {
        // The handshake header itself split over records, down to 1 byte each.
        let msg = openssl_hello()[RECORD_HEADER_LEN..].to_vec();
        for chunk in [1, 2, 3, 4, 5, 100, msg.len() - 1] {
            let h = complete(&records(&msg, chunk));
            assert_eq!(
                h.server_name.as_deref(),
                Some("app.example.test"),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn bytes_after_the_hello_are_ignored() {
        let mut buf = openssl_hello();
        buf.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01]); // ChangeCipherSpec
        buf.extend_from_slice(b"\x17\x03\x03\x00\x05early");
        assert_eq!(
            complete(&buf).server_name.as_deref(),
            Some("app.example.test")
        );
    }

    #[test]
    fn too_large() {
        let buf = hello(Some("app.example.test"), &["h2"]);
        // Cap below the hello size: TooLarge as soon as the headers tell.
        let cap = buf.len() - 1;
        assert_eq!(peek_client_hello(&buf, cap), Err(PeekError::TooLarge(cap)));
        assert_eq!(
            peek_client_hello(&buf[..5], cap),
            Err(PeekError::TooLarge(cap))
        );
        assert_eq!(peek_client_hello(&buf[..4], cap), Ok(Peek::Incomplete));
        assert_eq!(
            peek_client_hello(&buf, buf.len()),
            Ok(Peek::Complete(complete(&buf)))
        );
        assert_eq!(peek_client_hello(&[], 0), Err(PeekError::TooLarge(0)));

        // A handshake length that can never fit, in a record that does.
        let header = [22, 3, 1, 0x40, 0x00, 1, 0x00, 0xff, 0xff];
        assert_eq!(
            peek_client_hello(&header, MAX),
            Err(PeekError::TooLarge(MAX))
        );
        // Fragmented: after the first record, at least one more record
        // header and the rest of the message are needed.
        let msg = handshake(Some("x.test"), &[]);
        let buf = records(&msg, 20);
        let lower_bound = 25 + 5 + (msg.len() - 20);
        let cap = lower_bound - 1;
        assert_eq!(
            peek_client_hello(&buf[..25], cap),
            Err(PeekError::TooLarge(cap))
        );
        assert_eq!(
            peek_client_hello(&buf[..25], lower_bound),
            Ok(Peek::Incomplete)
        );
        let cap = buf.len() - 1;
        assert_eq!(peek_client_hello(&buf, cap), Err(PeekError::TooLarge(cap)));
        assert!(matches!(
            peek_client_hello(&buf, buf.len()),
            Ok(Peek::Complete(_))
        ));

        // The cap bounds the hello, not the buffer: extra bytes after it are fine.
        let mut buf = openssl_hello();
        buf.extend_from_slice(&[0x17; 100]);
        assert!(matches!(
            peek_client_hello(&buf, 340),
            Ok(Peek::Complete(_))
        ));
        assert_eq!(peek_client_hello(&buf, 339), Err(PeekError::TooLarge(339)));
    }

    #[test]
    fn not_tls() {
        for buf in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"G",
            b"PRI * HTTP/2.0\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            &[0x80, 0x2e, 0x01, 0x03, 0x01], // SSLv2-style hello
            &[0x17, 0x03, 0x03, 0x00, 0x10], // application data first
            &[0x16, 0x02],                   // handshake type but bad version major
        ] {
            assert_eq!(
                peek_client_hello(buf, MAX),
                Err(PeekError::NotTls),
                "{buf:?}"
            );
        }
        assert_eq!(peek_client_hello(&[], MAX), Ok(Peek::Incomplete));
        assert_eq!(peek_client_hello(&[0x16], MAX), Ok(Peek::Incomplete));
    }

    #[test]
    fn bad_record_layer_is_malformed() {
        // Record longer than 2^14 + 2048.
        malformed(&[22, 3, 1, 0x48, 0x01]);
        // Zero-length handshake record.
        malformed(&[22, 3, 1, 0, 0]);
        // Not a ClientHello (ServerHello type 2).
        malformed(&[22, 3, 3, 0, 4, 2]);
        // Second record is not a handshake record / has a bad version.
        let msg = handshake(Some("a.test"), &[]);
        let mut buf = records(&msg, 50);
        buf[55] = 0x17;
        assert_eq!(malformed(&buf), "non-handshake record inside ClientHello");
        let mut buf = records(&msg, 50);
        buf[56] = 0x02;
        malformed(&buf);
        // Record carries more than the ClientHello.
        let mut buf = records(&msg, msg.len());
        buf.push(0);
        buf[4] += 1;
        assert_eq!(malformed(&buf), "trailing data after ClientHello");
        assert_eq!(malformed(&buf[..9]), "trailing data after ClientHello");
        assert_eq!(peek_client_hello(&buf[..8], MAX), Ok(Peek::Incomplete));
    }

    #[test]
    fn bad_lengths_are_malformed() {
        let good = handshake(Some("a.test"), &["h2"]);
        let wrap = |msg: &[u8]| records(msg, msg.len());

        // session_id of 33 bytes.
        let mut msg = good.clone();
        msg[4 + 2 + 32] = 33;
        let mut msg2 = msg.clone();
        msg2.insert(4 + 2 + 32 + 1, 0);
        let len = (msg2.len() - 4) as u32;
        msg2[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
        assert_eq!(malformed(&wrap(&msg2)), "session_id longer than 32 bytes");
        // session_id length running past the end of the message.
        msg[4 + 2 + 32] = 0xff;
        malformed(&wrap(&msg));

        // Odd cipher_suites length.
        let cs = 4 + 2 + 32 + 1 + 32;
        let mut msg = good.clone();
        msg[cs + 1] = 5;
        malformed(&wrap(&msg));
        // Empty cipher_suites and compression_methods.
        let mut msg = good.clone();
        msg[cs + 1] = 0;
        malformed(&wrap(&msg));

        // Extensions length one more / one less than present.
        for delta in [1i32, -1] {
            let mut msg = handshake_with(Some(&sni_ext(b"a.test")));
            let at = msg.len() - sni_ext(b"a.test").len() - 2;
            let n = u16::from_be_bytes([msg[at], msg[at + 1]]) as i32 + delta;
            msg[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
            malformed(&wrap(&msg));
        }

        // Extension data length past the block; server name length past the list.
        malformed_hello(&[0x00, 0x00, 0x00, 0x09, 0x00]);
        let mut sni = sni_ext(b"a.test");
        sni[8] += 1;
        malformed_hello(&sni);
        // server_name_list shorter than the extension / empty.
        malformed_hello(&ext(EXT_SERVER_NAME, &[0x00, 0x00]));
        malformed_hello(&ext(EXT_SERVER_NAME, &[]));
        malformed_hello(&ext(EXT_SERVER_NAME, &[0x00, 0x03, 0x00, 0x00, 0x00, 0xff]));

        // ALPN: empty list, empty name, name length past the list, junk after.
        malformed_hello(&ext(EXT_ALPN, &[0x00, 0x00]));
        assert_eq!(
            malformed_hello(&alpn_ext(&["h2", ""])),
            "empty ALPN protocol name"
        );
        malformed_hello(&ext(EXT_ALPN, &[0x00, 0x03, 0x05, b'h', b'2']));
        malformed_hello(&ext(EXT_ALPN, &[0x00, 0x03, 0x02, b'h', b'2', 0x00]));

        // Trailing bytes after the extensions block.
        let mut msg = good.clone();
        msg.push(0);
        let len = (msg.len() - 4) as u32;
        msg[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
        assert_eq!(malformed(&wrap(&msg)), "trailing data after extensions");
    }

    #[test]
    fn bad_server_names_are_malformed() {
        for name in [
            &b"app\0.example.test"[..],
            b"app.example.test\0",
            b"app example.test",
            b"caf\xc3\xa9.test",
            b"app/x.test",
            b"",
            b".",
            b"a..b",
            b".a.test",
            b"a.test..",
            &[b'a'; 256],
        ] {
            let what = malformed_hello(&sni_ext(name));
            assert!(what.contains("server name"), "{name:?}: {what}");
        }
        assert_eq!(
            malformed_hello(&sni_ext(b"app\0.example.test")),
            "invalid character in server name"
        );
    }

    #[test]
    fn acceptable_server_names() {
        let name_of = |name: &[u8]| {
            let msg = handshake_with(Some(&sni_ext(name)));
            complete(&records(&msg, msg.len())).server_name
        };
        assert_eq!(
            name_of(b"internal_host.corp").as_deref(),
            Some("internal_host.corp")
        );
        assert_eq!(name_of(b"127.0.0.1").as_deref(), Some("127.0.0.1"));
        assert_eq!(name_of(b"LOCALHOST").as_deref(), Some("localhost"));
        let long = [b'a'; 255];
        assert_eq!(name_of(&long).map(|n| n.len()), Some(255));
        let mut long_dot = [b'a'; 255];
        long_dot[254] = b'.';
        assert_eq!(name_of(&long_dot).map(|n| n.len()), Some(254));
    }

    #[test]
    fn server_name_list_takes_first_host_name() {
        // An unknown name_type entry first, then two host_names.
        let mut list = vec![7, 0, 1, b'x'];
        list.extend([0, 0, 6]);
        list.extend(b"first.");
        list.extend([0, 0, 6]);
        list.extend(b"second");
        let h = complete(&{
            let msg = handshake_with(Some(&ext(EXT_SERVER_NAME, &u16_prefixed(&list))));
            records(&msg, msg.len())
        });
        assert_eq!(h.server_name.as_deref(), Some("first"));
        // Only a non-host_name entry: no server name.
        let msg = handshake_with(Some(&ext(EXT_SERVER_NAME, &u16_prefixed(&[7, 0, 1, b'x']))));
        assert_eq!(complete(&records(&msg, msg.len())).server_name, None);
    }

    #[test]
    fn duplicate_extensions_are_malformed() {
        let mut exts = sni_ext(b"a.test");
        exts.extend(sni_ext(b"b.test"));
        assert_eq!(malformed_hello(&exts), "duplicate server_name extension");
        let mut exts = alpn_ext(&["h2"]);
        exts.extend(alpn_ext(&["http/1.1"]));
        assert_eq!(malformed_hello(&exts), "duplicate ALPN extension");
    }

    #[test]
    fn labels() {
        assert_eq!(PeekError::NotTls.label(), "not_tls");
        assert_eq!(PeekError::TooLarge(1).label(), "too_large");
        assert_eq!(Malformed("x").label(), "malformed");
        assert_eq!(
            PeekError::TooLarge(9).to_string(),
            "ClientHello larger than 9 bytes"
        );
    }

    #[test]
    fn reader_helpers() {
        let mut r = Reader::new(&[1, 0, 2, 0, 0, 3, 1, 9, 0, 1, 8, 7]);
        assert_eq!(r.u8(), Some(1));
        assert_eq!(r.u16(), Some(2));
        assert_eq!(r.u24(), Some(3));
        assert_eq!(r.vec_u8(), Some(&[9][..]));
        assert_eq!(r.vec_u16(), Some(&[8][..]));
        assert_eq!(r.vec_u16(), None);
        assert_eq!(r.bytes(1), Some(&[7][..]));
        assert!(r.is_empty());
        assert_eq!(r.u8(), None);
    }

    /// Deterministic mutations of real and synthetic hellos: never panic,
    /// and a Complete result always carries a normalised name.
    #[test]
    fn mutations_never_panic() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let msg = handshake(Some("a.test"), &["h2"]);
        let seeds = [
            openssl_hello(),
            hello(Some("x.y"), &["h2"]),
            records(&msg, 7),
        ];
        for seed in &seeds {
            for _ in 0..3000 {
                let mut buf = seed.clone();
                for _ in 0..(next() % 4 + 1) {
                    let i = (next() as usize) % buf.len();
                    buf[i] = next() as u8;
                }
                let cut = (next() as usize) % (buf.len() + 1);
                if let Ok(Peek::Complete(h)) = peek_client_hello(&buf[..cut], MAX)
                    && let Some(name) = h.server_name
                {
                    assert!(!name.is_empty() && !name.ends_with('.'));
                    assert_eq!(name, name.to_ascii_lowercase());
                }
            }
        }
    }

    /// Replays the committed fuzz seed corpus (and every prefix of each
    /// input). Files named `<label>-*.bin` must give that outcome
    /// (`complete`, `incomplete`, `not_tls`, `too_large`, `malformed`);
    /// other files (e.g. saved fuzz crashes) only have to not panic.
    #[test]
    fn corpus_never_panics() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/client_hello");
        let mut files = 0;
        for entry in std::fs::read_dir(dir).expect("fuzz corpus directory") {
            let path = entry.expect("corpus entry").path();
            let data = std::fs::read(&path).expect("corpus file");
            // Every prefix of small inputs; a sample of prefixes of big ones.
            for n in (0..data.len()).step_by(data.len() / 4096 + 1) {
                let _ = peek_client_hello(&data[..n], MAX);
            }
            let result = peek_client_hello(&data, MAX);
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or_default();
            let expected = file
                .split_once('-')
                .map(|(label, _)| label)
                .filter(|label| {
                    [
                        "complete",
                        "incomplete",
                        "not_tls",
                        "too_large",
                        "malformed",
                    ]
                    .contains(label)
                });
            if let Some(expected) = expected {
                let got = match &result {
                    Ok(Peek::Complete(_)) => "complete",
                    Ok(Peek::Incomplete) => "incomplete",
                    Err(e) => e.label(),
                };
                assert_eq!(got, expected, "{file}: {result:?}");
            }
            files += 1;
        }
        assert!(files >= 8, "only {files} corpus files in {dir}");
    }
}
