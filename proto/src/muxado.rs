//! muxado frames: the multiplexer under ngrok's agent protocol (see
//! `docs/ngrok-agent-protocol.md`). Four frame types behind an 8-byte
//! header; this module only encodes and decodes them, with every length
//! checked before anything is read or allocated. The session logic lives in
//! the edge (`postern-edge`, `ngrok/mux.rs`).

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 8;
/// The receive window each side assumes for every stream of its peer
/// (not negotiated in muxado).
pub const INITIAL_WINDOW: u32 = 256 * 1024;
/// The largest body this side reads: a DATA frame never carries more than
/// a stream's window, and RST, WNDINC and GOAWAY are small.
pub const MAX_BODY: usize = INITIAL_WINDOW as usize;
/// Flag of a DATA frame: the sender will send no more on this stream.
pub const FLAG_FIN: u8 = 0x1;
/// Flag of a DATA frame: it opens the stream.
pub const FLAG_SYN: u8 = 0x2;

const TYPE_RST: u8 = 0;
const TYPE_DATA: u8 = 1;
const TYPE_WNDINC: u8 = 2;
const TYPE_GOAWAY: u8 = 3;
const ID_MASK: u32 = 0x7FFF_FFFF;

/// muxado's error codes, shared by RST and GOAWAY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MuxError(pub u32);

impl MuxError {
    pub const NONE: MuxError = MuxError(0);
    pub const PROTOCOL: MuxError = MuxError(1);
    pub const INTERNAL: MuxError = MuxError(2);
    pub const FLOW_CONTROL: MuxError = MuxError(3);
    pub const STREAM_CLOSED: MuxError = MuxError(4);
    pub const STREAM_REFUSED: MuxError = MuxError(5);
    pub const STREAM_CANCELLED: MuxError = MuxError(6);
    pub const FRAME_SIZE: MuxError = MuxError(8);
    pub const SESSION_CLOSED: MuxError = MuxError(14);

    /// The code's name, for logs.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "no error",
            1 => "protocol error",
            2 => "internal error",
            3 => "flow control error",
            4 => "stream closed",
            5 => "stream refused",
            6 => "stream cancelled",
            7 => "stream reset",
            8 => "frame size error",
            9 => "accept queue full",
            10 => "enhance your calm",
            11 => "remote gone away",
            12 => "streams exhausted",
            13 => "write timeout",
            14 => "session closed",
            15 => "peer EOF",
            _ => "unknown error",
        }
    }
}

/// A decoded header: what the body that follows is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub length: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream_id: u32,
}

/// A header the peer should not have sent; the session ends with a
/// GOAWAY carrying the code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct FrameError {
    pub code: MuxError,
    pub reason: String,
}

fn frame_error(code: MuxError, reason: impl Into<String>) -> FrameError {
    FrameError {
        code,
        reason: reason.into(),
    }
}

impl Header {
    /// Decodes and checks a header: the body length against the frame
    /// type and [`MAX_BODY`], the stream id against the type.
    pub fn parse(raw: [u8; HEADER_LEN]) -> Result<Header, FrameError> {
        let length = usize::from(raw[0]) << 16 | usize::from(raw[1]) << 8 | usize::from(raw[2]);
        let header = Header {
            length,
            kind: raw[3] >> 4,
            flags: raw[3] & 0x0F,
            stream_id: u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]) & ID_MASK,
        };
        match header.kind {
            TYPE_RST | TYPE_WNDINC if length != 4 => Err(frame_error(
                MuxError::FRAME_SIZE,
                format!("a RST or WNDINC frame of {length} bytes (4 expected)"),
            )),
            TYPE_RST | TYPE_WNDINC | TYPE_DATA if header.stream_id == 0 => Err(frame_error(
                MuxError::PROTOCOL,
                "a stream frame on stream id 0",
            )),
            TYPE_DATA if length > MAX_BODY => Err(frame_error(
                MuxError::FLOW_CONTROL,
                format!("a DATA frame of {length} bytes, beyond the stream window"),
            )),
            TYPE_GOAWAY if header.stream_id != 0 => Err(frame_error(
                MuxError::PROTOCOL,
                "a GOAWAY frame on a stream",
            )),
            4.. => Err(frame_error(
                MuxError::PROTOCOL,
                format!("unknown frame type {}", header.kind),
            )),
            _ => Ok(header),
        }
    }

    /// Whether the body is worth reading: a GOAWAY ends the session, and
    /// some peers send one whose length is wrong, so its body is not read.
    pub fn is_go_away(&self) -> bool {
        self.kind == TYPE_GOAWAY
    }
}

/// A frame with its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream_id: u32,
        syn: bool,
        fin: bool,
        data: Bytes,
    },
    Rst {
        stream_id: u32,
        code: MuxError,
    },
    WndInc {
        stream_id: u32,
        increment: u32,
    },
    GoAway {
        last_stream_id: u32,
        code: MuxError,
        message: Bytes,
    },
}

impl Frame {
    /// The frame of `header` with `body` (exactly `header.length` bytes;
    /// GOAWAY: whatever of it arrived).
    pub fn from_parts(header: Header, body: Bytes) -> Result<Frame, FrameError> {
        let word = |at: usize| {
            body.get(at..at + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        let short = || {
            frame_error(
                MuxError::FRAME_SIZE,
                "a frame body shorter than its type needs",
            )
        };
        Ok(match header.kind {
            TYPE_RST => Frame::Rst {
                stream_id: header.stream_id,
                code: MuxError(word(0).ok_or_else(short)?),
            },
            TYPE_DATA => Frame::Data {
                stream_id: header.stream_id,
                syn: header.flags & FLAG_SYN != 0,
                fin: header.flags & FLAG_FIN != 0,
                data: body,
            },
            TYPE_WNDINC => Frame::WndInc {
                stream_id: header.stream_id,
                increment: word(0).ok_or_else(short)? & ID_MASK,
            },
            _ => Frame::GoAway {
                last_stream_id: word(0).unwrap_or(0) & ID_MASK,
                code: MuxError(word(4).unwrap_or(0)),
                message: body
                    .get(8..)
                    .map(Bytes::copy_from_slice)
                    .unwrap_or_default(),
            },
        })
    }

    /// The frame on the wire.
    pub fn encode(&self) -> Bytes {
        let (kind, flags, id, body_len) = match self {
            Frame::Data {
                stream_id,
                syn,
                fin,
                data,
            } => (
                TYPE_DATA,
                if *syn { FLAG_SYN } else { 0 } | if *fin { FLAG_FIN } else { 0 },
                *stream_id,
                data.len(),
            ),
            Frame::Rst { stream_id, .. } => (TYPE_RST, 0, *stream_id, 4),
            Frame::WndInc { stream_id, .. } => (TYPE_WNDINC, 0, *stream_id, 4),
            Frame::GoAway { message, .. } => (TYPE_GOAWAY, 0, 0, 8 + message.len()),
        };
        debug_assert!(body_len <= 0xFF_FFFF, "frame body over 24 bits");
        let mut out = BytesMut::with_capacity(HEADER_LEN + body_len);
        out.put_uint(body_len as u64, 3);
        out.put_u8(kind << 4 | flags);
        out.put_u32(id & ID_MASK);
        match self {
            Frame::Data { data, .. } => out.put_slice(data),
            Frame::Rst { code, .. } => out.put_u32(code.0),
            Frame::WndInc { increment, .. } => out.put_u32(*increment & ID_MASK),
            Frame::GoAway {
                last_stream_id,
                code,
                message,
            } => {
                out.put_u32(*last_stream_id & ID_MASK);
                out.put_u32(code.0);
                out.put_slice(message);
            }
        }
        out.freeze()
    }
}

/// Splits `input` into frames the way a session reads them: stops at the
/// first GOAWAY, at a bad header, or where the input runs out. For the fuzz
/// target and its corpus.
pub fn parse_frames(mut input: &[u8]) -> Result<Vec<Frame>, FrameError> {
    let mut frames = Vec::new();
    while input.len() >= HEADER_LEN {
        let mut raw = [0u8; HEADER_LEN];
        raw.copy_from_slice(&input[..HEADER_LEN]);
        let header = Header::parse(raw)?;
        input = &input[HEADER_LEN..];
        let take = if header.is_go_away() {
            input.len().min(header.length)
        } else if input.len() < header.length {
            break;
        } else {
            header.length
        };
        let frame = Frame::from_parts(header, Bytes::copy_from_slice(&input[..take]))?;
        input = &input[take..];
        let end = matches!(frame, Frame::GoAway { .. });
        frames.push(frame);
        if end {
            break;
        }
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syn_with_the_auth_type_is_the_documented_bytes() {
        let frame = Frame::Data {
            stream_id: 3,
            syn: true,
            fin: false,
            data: Bytes::from_static(&[0, 0, 0, 0]),
        };
        let wire = frame.encode();
        assert_eq!(&wire[..], &[0, 0, 4, 0x12, 0, 0, 0, 3, 0, 0, 0, 0]);
        assert_eq!(parse_frames(&wire).unwrap(), vec![frame]);
    }

    #[test]
    fn every_frame_round_trips() {
        let frames = vec![
            Frame::WndInc {
                stream_id: 5,
                increment: 1000,
            },
            Frame::Rst {
                stream_id: 2,
                code: MuxError::STREAM_CANCELLED,
            },
            Frame::Data {
                stream_id: 4,
                syn: false,
                fin: true,
                data: Bytes::new(),
            },
            Frame::GoAway {
                last_stream_id: 7,
                code: MuxError::NONE,
                message: Bytes::from_static(b"bye"),
            },
        ];
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.encode().to_vec()).collect();
        assert_eq!(parse_frames(&wire).unwrap(), frames);
    }

    #[test]
    fn bad_headers_are_refused_before_any_body() {
        // RST of 5 bytes, DATA on stream 0, DATA over the window, type 9.
        for (raw, code) in [
            ([0, 0, 5, 0x00, 0, 0, 0, 1], MuxError::FRAME_SIZE),
            ([0, 0, 1, 0x10, 0, 0, 0, 0], MuxError::PROTOCOL),
            ([0x10, 0, 0, 0x10, 0, 0, 0, 1], MuxError::FLOW_CONTROL),
            ([0, 0, 0, 0x90, 0, 0, 0, 1], MuxError::PROTOCOL),
        ] {
            assert_eq!(Header::parse(raw).unwrap_err().code, code, "{raw:?}");
        }
    }

    #[test]
    fn a_go_away_with_a_short_length_ends_parsing() {
        // The Rust SDK declares only the message's length.
        let mut wire = vec![0, 0, 3, 0x30, 0, 0, 0, 0];
        wire.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, b'b', b'y', b'e']);
        let frames = parse_frames(&wire).unwrap();
        assert_eq!(frames.len(), 1);
        assert!(matches!(frames[0], Frame::GoAway { .. }));
    }
}
