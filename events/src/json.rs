//! Events as JSON, byte for byte as `serde_json::to_writer` writes them
//! (compact, the same escapes, integers and floats), in less time.
//!
//! An event is some ninety short strings, keys included. serde_json looks
//! up every byte of a string in a table; here a string is checked eight
//! bytes at a time and copied whole when it needs no escape, which is
//! nearly always. The tests hold the output to serde_json's.

use std::fmt::Display;

use serde::ser::{self, Serialize};

/// Why a value could not be written: a map key that is not a string or a
/// number, or a value's own `Serialize` failing.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct JsonError(String);

impl ser::Error for JsonError {
    fn custom<T: Display>(msg: T) -> JsonError {
        JsonError(msg.to_string())
    }
}

/// Appends `value` to `out` as compact JSON. On an error `out` holds part
/// of the value.
pub fn write<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> Result<(), JsonError> {
    value.serialize(Writer { out })
}

/// Whether `b` must be escaped inside a JSON string.
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Whether no byte of `bytes` needs an escape, checked eight bytes at a
/// time: a word's high bits say whether some byte is below 0x20 or equal
/// to a quote or a backslash (exactly whether, though not always which:
/// a borrow needs a byte below the bound to start it).
fn clean(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES * 0x80;
    let below = |w: u64, n: u8| w.wrapping_sub(ONES * u64::from(n)) & !w & HIGH;
    let dirty = |w: u64| {
        let quote = ONES * u64::from(b'"');
        let backslash = ONES * u64::from(b'\\');
        below(w, 0x20) | below(w ^ quote, 1) | below(w ^ backslash, 1) != 0
    };
    let word = |eight: &[u8]| u64::from_ne_bytes(eight.try_into().expect("eight bytes"));
    let mut words = bytes.chunks_exact(8);
    if words.any(|w| dirty(word(w))) {
        return false;
    }
    match words.remainder() {
        [] => true,
        // The last eight bytes, some already checked.
        _ if bytes.len() >= 8 => !dirty(word(&bytes[bytes.len() - 8..])),
        // A short string, padded with a byte that needs nothing.
        rest => {
            let mut padded = [b' '; 8];
            for (p, &b) in padded.iter_mut().zip(rest) {
                *p = b;
            }
            !dirty(u64::from_ne_bytes(padded))
        }
    }
}

/// Appends `text` as a JSON string.
fn string(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if clean(bytes) {
        out.extend_from_slice(bytes);
    } else {
        let mut copied = 0;
        for (at, &b) in bytes.iter().enumerate() {
            if needs_escape(b) {
                out.extend_from_slice(&bytes[copied..at]);
                escape(out, b);
                copied = at + 1;
            }
        }
        out.extend_from_slice(&bytes[copied..]);
    }
    out.push(b'"');
}

/// The escape of a byte `needs_escape` picked, as serde_json writes it.
fn escape(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let short = match b {
        b'"' => b'"',
        b'\\' => b'\\',
        0x08 => b'b',
        0x0c => b'f',
        b'\n' => b'n',
        b'\r' => b'r',
        b'\t' => b't',
        _ => {
            let hex = [HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]];
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', hex[0], hex[1]]);
            return;
        }
    };
    out.extend_from_slice(&[b'\\', short]);
}

fn integer(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A float as serde_json writes it: shortest round-trip form, `null`
/// when not finite.
fn float(out: &mut Vec<u8>, n: impl zmij::Float, finite: bool) {
    if finite {
        out.extend_from_slice(zmij::Buffer::new().format_finite(n).as_bytes());
    } else {
        out.extend_from_slice(b"null");
    }
}

/// `Serializer` methods that write an integer.
macro_rules! integers {
    ($($method:ident: $ty:ty),*) => {$(
        fn $method(self, v: $ty) -> Result<(), JsonError> {
            integer(self.out, v);
            Ok(())
        }
    )*};
}

/// The compound traits, each of whose elements (with its key, for
/// structs) is written by one method of `Compound`.
macro_rules! compounds {
    ($($trait:ident::$method:ident => $write:ident$(($key:ident: $key_ty:ty))?,)*) => {$(
        impl ser::$trait for Compound<'_> {
            type Ok = ();
            type Error = JsonError;

            fn $method<T: Serialize + ?Sized>(
                &mut self,
                $($key: $key_ty,)?
                value: &T,
            ) -> Result<(), JsonError> {
                self.$write($($key,)? value)
            }

            fn end(self) -> Result<(), JsonError> {
                self.close()
            }
        }
    )*};
}

struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

/// An array or object being written; `close` ends it (and, for an enum
/// variant, the object that names it).
struct Compound<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
    close: &'static [u8],
}

impl<'a> Compound<'a> {
    fn open(out: &'a mut Vec<u8>, open: &[u8], close: &'static [u8]) -> Compound<'a> {
        out.extend_from_slice(open);
        Compound {
            out,
            first: true,
            close,
        }
    }

    /// Opens `{"variant":` followed by `open`.
    fn variant(
        out: &'a mut Vec<u8>,
        variant: &str,
        open: &[u8],
        close: &'static [u8],
    ) -> Compound<'a> {
        out.push(b'{');
        string(out, variant);
        out.push(b':');
        Compound::open(out, open, close)
    }

    fn separate(&mut self) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
    }

    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), JsonError> {
        self.separate();
        value.serialize(Writer { out: self.out })
    }

    fn field<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<(), JsonError> {
        self.separate();
        string(self.out, key);
        self.out.push(b':');
        value.serialize(Writer { out: self.out })
    }

    fn close(self) -> Result<(), JsonError> {
        self.out.extend_from_slice(self.close);
        Ok(())
    }
}

impl<'a> ser::Serializer for Writer<'a> {
    type Ok = ();
    type Error = JsonError;
    type SerializeSeq = Compound<'a>;
    type SerializeTuple = Compound<'a>;
    type SerializeTupleStruct = Compound<'a>;
    type SerializeTupleVariant = Compound<'a>;
    type SerializeMap = Compound<'a>;
    type SerializeStruct = Compound<'a>;
    type SerializeStructVariant = Compound<'a>;

    fn serialize_bool(self, v: bool) -> Result<(), JsonError> {
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }

    integers! {
        serialize_i8: i8, serialize_i16: i16, serialize_i32: i32, serialize_i64: i64,
        serialize_i128: i128, serialize_u8: u8, serialize_u16: u16, serialize_u32: u32,
        serialize_u64: u64, serialize_u128: u128
    }

    fn serialize_f32(self, v: f32) -> Result<(), JsonError> {
        float(self.out, v, v.is_finite());
        Ok(())
    }

    fn serialize_f64(self, v: f64) -> Result<(), JsonError> {
        float(self.out, v, v.is_finite());
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result<(), JsonError> {
        string(self.out, v.encode_utf8(&mut [0; 4]));
        Ok(())
    }

    fn serialize_str(self, v: &str) -> Result<(), JsonError> {
        string(self.out, v);
        Ok(())
    }

    /// An array of numbers, as serde_json writes bytes.
    fn serialize_bytes(self, v: &[u8]) -> Result<(), JsonError> {
        let mut seq = Compound::open(self.out, b"[", b"]");
        for b in v {
            seq.element(b)?;
        }
        seq.close()
    }

    fn serialize_none(self) -> Result<(), JsonError> {
        self.serialize_unit()
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), JsonError> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), JsonError> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), JsonError> {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), JsonError> {
        self.serialize_str(variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), JsonError> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), JsonError> {
        let mut object = Compound::open(self.out, b"{", b"}");
        object.field(variant, value)?;
        object.close()
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Compound<'a>, JsonError> {
        Ok(Compound::open(self.out, b"[", b"]"))
    }

    fn serialize_tuple(self, len: usize) -> Result<Compound<'a>, JsonError> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Compound<'a>, JsonError> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'a>, JsonError> {
        Ok(Compound::variant(self.out, variant, b"[", b"]}"))
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Compound<'a>, JsonError> {
        Ok(Compound::open(self.out, b"{", b"}"))
    }

    fn serialize_struct(self, _name: &'static str, len: usize) -> Result<Compound<'a>, JsonError> {
        self.serialize_map(Some(len))
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'a>, JsonError> {
        Ok(Compound::variant(self.out, variant, b"{", b"}}"))
    }
}

compounds! {
    SerializeSeq::serialize_element => element,
    SerializeTuple::serialize_element => element,
    SerializeTupleStruct::serialize_field => element,
    SerializeTupleVariant::serialize_field => element,
}

impl ser::SerializeMap for Compound<'_> {
    type Ok = ();
    type Error = JsonError;

    /// Keys are strings; numbers and booleans are quoted, as serde_json
    /// does; anything else is refused.
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), JsonError> {
        self.separate();
        let start = self.out.len();
        key.serialize(Writer { out: self.out })?;
        match self.out.get(start) {
            Some(b'"') => Ok(()),
            Some(b'-' | b'0'..=b'9' | b't' | b'f') => {
                self.out.insert(start, b'"');
                self.out.push(b'"');
                Ok(())
            }
            _ => Err(JsonError("key must be a string".into())),
        }
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), JsonError> {
        self.out.push(b':');
        value.serialize(Writer { out: self.out })
    }

    fn end(self) -> Result<(), JsonError> {
        self.close()
    }
}

compounds! {
    SerializeStruct::serialize_field => field(key: &'static str),
    SerializeStructVariant::serialize_field => field(key: &'static str),
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Serialize;
    use serde_json::json;

    use super::*;

    /// Ours, and serde_json's.
    fn both<T: Serialize + ?Sized>(value: &T) -> (Result<String, String>, Result<String, String>) {
        let mut out = Vec::new();
        let ours = write(&mut out, value)
            .map(|()| String::from_utf8(out).expect("UTF-8"))
            .map_err(|e| e.to_string());
        let theirs = serde_json::to_string(value).map_err(|e| e.to_string());
        (ours, theirs)
    }

    fn same<T: Serialize + ?Sized + std::fmt::Debug>(value: &T) {
        let (ours, theirs) = both(value);
        assert_eq!(
            ours,
            Ok(theirs.expect("serde_json writes it")),
            "for {value:?}"
        );
    }

    #[test]
    fn every_ascii_byte_in_every_position_of_a_chunk_is_written_as_serde_json_writes_it() {
        for b in 0u8..=0x7f {
            let c = char::from(b);
            for len in [0, 1, 7, 15, 16, 17, 31, 32, 33, 40] {
                for at in [0, len / 2, len] {
                    let mut text: String = "a".repeat(len);
                    text.insert(at, c);
                    same(&text);
                    text.insert(0, c);
                    same(&text);
                }
            }
        }
    }

    #[test]
    fn random_strings_of_escapes_and_unicode_are_written_as_serde_json_writes_them() {
        let alphabet: Vec<char> = "aZ09 \"\\/\n\r\t\u{0}\u{1f}\u{7f}\u{8}\u{c}é€😀\u{2028}-:"
            .chars()
            .collect();
        // xorshift64, seeded: the same strings every run.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 70) as usize;
            let text: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            same(&text);
        }
    }

    #[test]
    fn values_of_every_kind_are_written_as_serde_json_writes_them() {
        same(&json!({
            "null": null, "t": true, "f": false,
            "ints": [0, -1, 1, i64::MIN, i64::MAX, u64::MAX],
            "floats": [0.0, -0.0, 0.1, 1.5e-7, 1e300, -2.5, 100.0, f64::MIN_POSITIVE],
            "nested": {"a": [[], {}, [{}], {"b": {"c": ["x\"y"]}}], "": ""},
            "unicode \u{1}": "é😀\u{7f}",
        }));
        same(&[f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
        same(&(1.5f32, f32::NAN, 'x', '"', '\n', (), Some(3), None::<u8>));
        same(&BTreeMap::from([(1, "one"), (-2, "minus two")]));
        same(&BTreeMap::from([(true, 1), (false, 0)]));
        same(&BTreeMap::from([('k', 1)]));
        same(&serde_bytes_like(b"\x00\xffab"));
    }

    /// `serialize_bytes`, which neither `Vec<u8>` nor `&[u8]` calls.
    fn serde_bytes_like(bytes: &'static [u8]) -> impl Serialize + std::fmt::Debug {
        #[derive(Debug)]
        struct Bytes(&'static [u8]);
        impl Serialize for Bytes {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(self.0)
            }
        }
        Bytes(bytes)
    }

    #[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
    enum Shape {
        Unit,
        Newtype(u8),
        Tuple(u8, String),
        Struct { a: u8, b: Option<String> },
    }

    #[derive(Debug, Serialize)]
    struct Wrapper(Shape);

    #[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
    struct Pair(u8, u8);

    #[derive(Debug, Serialize)]
    struct Empty;

    #[test]
    fn enums_and_structs_of_every_shape_are_written_as_serde_json_writes_them() {
        same(&[
            Shape::Unit,
            Shape::Newtype(7),
            Shape::Tuple(1, "two".into()),
            Shape::Struct { a: 1, b: None },
            Shape::Struct {
                a: 2,
                b: Some("b".into()),
            },
        ]);
        same(&Wrapper(Shape::Unit));
        same(&(Pair(1, 2), Empty));
        same(&BTreeMap::from([(Shape::Unit, 1)]));
    }

    #[test]
    fn events_are_written_as_serde_json_writes_them() {
        use crate::{
            Decision, DecisionField, EventObject, OAuth, OAuthUser, TrafficPolicyLogs,
            pipeline::tests::sample,
        };
        for i in 0..4 {
            let mut event = sample(i);
            same(&event);
            event.account_id = Some("ac_1".into());
            if let EventObject::Http(object) = &mut event.object {
                object.ip_policy = Some(DecisionField {
                    decision: Some(Decision::Block),
                });
                object.oauth = Some(OAuth {
                    app_client_id: Some("client \"one\"".into()),
                    decision: Some(Decision::Allow),
                    user: Some(OAuthUser {
                        id: Some("u\u{1}".into()),
                        name: Some("Zoë".into()),
                    }),
                });
                object.traffic_policy = Some(TrafficPolicyLogs {
                    logs: vec![json!({"metadata": {"n": 1.25, "tags": ["a", null]}})],
                });
            }
            same(&event);
        }
    }

    #[test]
    fn keys_that_are_not_strings_or_numbers_are_refused_like_serde_json_refuses_them() {
        for (ours, theirs) in [
            both(&BTreeMap::from([(Some(()), 1)])),
            both(&BTreeMap::from([(vec![1], 1)])),
            both(&BTreeMap::from([(Pair(1, 2), 1)])),
        ] {
            assert_eq!(ours, Err("key must be a string".to_string()));
            assert!(theirs.is_err(), "serde_json refuses it too");
        }
    }
}
