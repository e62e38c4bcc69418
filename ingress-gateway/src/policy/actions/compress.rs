//! `compress-response` (and the `compression` module): compresses the
//! upstream's body as it streams, with the best of the configured
//! algorithms the visitor accepts (`Accept-Encoding` with q-values);
//! `Content-Length` goes, `Content-Encoding` and `Vary: Accept-Encoding`
//! come. Bodies already encoded, small ones (a known length under 1 KiB),
//! media that is compressed by nature, `HEAD` answers, 204 and 304 pass
//! unchanged.

use async_compression::tokio::bufread::{BrotliEncoder, DeflateEncoder, GzipEncoder};
use futures_util::TryStreamExt;
use http::{HeaderValue, header};
use http_body_util::{BodyExt, StreamBody};
use serde::Deserialize;
use tokio_util::io::{ReaderStream, StreamReader};

use super::{Built, config};
use crate::{
    http::{BoxError, ProxyBody},
    policy::{Flow, Phase, PolicyEnv, ResponseAction, ResponseCx},
};

/// Bodies known to be smaller than this are not worth it.
const MIN_LENGTH: u64 = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Algorithm {
    Gzip,
    Deflate,
    Brotli,
}

impl Algorithm {
    fn token(self) -> &'static str {
        match self {
            Algorithm::Gzip => "gzip",
            Algorithm::Deflate => "deflate",
            Algorithm::Brotli => "br",
        }
    }

    fn parse(name: &str) -> Result<Algorithm, String> {
        match name {
            "gzip" => Ok(Algorithm::Gzip),
            "deflate" => Ok(Algorithm::Deflate),
            "br" => Ok(Algorithm::Brotli),
            "compress" => Err("config.algorithms: compress (LZW) is not supported by Postern; use gzip, deflate or br".into()),
            other => Err(format!("config.algorithms: unknown algorithm {other:?}; use gzip, deflate or br")),
        }
    }

    /// The body, compressed as it streams.
    fn wrap(self, body: ProxyBody) -> ProxyBody {
        let reader = StreamReader::new(
            body.into_data_stream()
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
        match self {
            Algorithm::Gzip => frames(GzipEncoder::new(reader)),
            Algorithm::Deflate => frames(DeflateEncoder::new(reader)),
            Algorithm::Brotli => frames(BrotliEncoder::new(reader)),
        }
    }
}

/// An encoder's output as a body.
fn frames<R: tokio::io::AsyncRead + Send + Sync + 'static>(encoder: R) -> ProxyBody {
    StreamBody::new(
        ReaderStream::new(encoder)
            .map_ok(http_body::Frame::data)
            .map_err(BoxError::from),
    )
    .boxed()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    algorithms: Option<Vec<String>>,
}

/// The algorithms Postern offers, in its order of preference.
pub(crate) struct Compress(pub Vec<Algorithm>);

pub(super) fn build(value: &serde_json::Value, _: Phase, _: &PolicyEnv) -> Result<Built, String> {
    let cfg: Config = config(value)?;
    let algorithms = match cfg.algorithms {
        None => vec![Algorithm::Brotli, Algorithm::Gzip, Algorithm::Deflate],
        Some(names) if names.is_empty() => {
            return Err("config.algorithms: at least one of gzip, deflate, br".into());
        }
        Some(names) => names
            .iter()
            .map(|n| Algorithm::parse(n))
            .collect::<Result<_, _>>()?,
    };
    Ok(Built::Response(Box::new(Compress(algorithms))))
}

/// The algorithm to use for a visitor's `Accept-Encoding`: the one it
/// weighs highest among `offered` (ties go to `offered`'s order).
fn negotiate(accept: &str, offered: &[Algorithm]) -> Option<Algorithm> {
    let mut best: Option<(f32, usize)> = None;
    for (rank, algorithm) in offered.iter().enumerate() {
        let mut q = None;
        for item in accept.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let weight = parts
                .find_map(|p| p.trim().strip_prefix("q="))
                .and_then(|v| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if name == algorithm.token() || (name == "*" && q.is_none()) {
                q = Some(weight);
            }
        }
        if let Some(q) = q.filter(|q| *q > 0.0)
            && best.is_none_or(|(bq, _)| q > bq)
        {
            best = Some((q, rank));
        }
    }
    best.map(|(_, rank)| offered[rank])
}

/// Content compressed by nature.
fn already_compact(content_type: &str) -> bool {
    let t = content_type.to_ascii_lowercase();
    ["image/", "video/", "audio/"]
        .iter()
        .any(|p| t.starts_with(p))
        && !t.starts_with("image/svg")
        || [
            "application/zip",
            "application/gzip",
            "application/x-gzip",
            "application/octet-stream",
        ]
        .iter()
        .any(|p| t.starts_with(p))
}

impl ResponseAction for Compress {
    fn on_response(&self, cx: &mut ResponseCx<'_>) -> Result<Flow, String> {
        let res = &mut *cx.res;
        let headers = res.headers();
        let status = res.status();
        let skip = cx.req.method() == http::Method::HEAD
            || status == http::StatusCode::NO_CONTENT
            || status == http::StatusCode::NOT_MODIFIED
            || status == http::StatusCode::SWITCHING_PROTOCOLS
            || headers.contains_key(header::CONTENT_ENCODING)
            || headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|n| n < MIN_LENGTH)
            || headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(already_compact);
        let accept = cx
            .req
            .headers()
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let chosen = (!skip).then(|| negotiate(accept, &self.0)).flatten();
        cx.record
            .compression(chosen.map_or("none", Algorithm::token));
        if let Some(algorithm) = chosen {
            let headers = res.headers_mut();
            headers.remove(header::CONTENT_LENGTH);
            headers.insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_static(algorithm.token()),
            );
            headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
            let body = std::mem::replace(res.body_mut(), crate::policy::empty_body());
            *res.body_mut() = algorithm.wrap(body);
        }
        Ok(Flow::Next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Algorithm::*;

    #[test]
    fn accept_encoding_is_negotiated_by_weight_then_preference() {
        let all = [Brotli, Gzip, Deflate];
        assert_eq!(negotiate("gzip, deflate, br", &all), Some(Brotli));
        assert_eq!(negotiate("gzip;q=1, br;q=0.5", &all), Some(Gzip));
        assert_eq!(negotiate("br;q=0", &all), None);
        assert_eq!(negotiate("identity", &all), None);
        assert_eq!(negotiate("*", &all), Some(Brotli));
        assert_eq!(negotiate("*, br;q=0", &all), Some(Gzip));
        assert_eq!(negotiate("deflate", &[Gzip]), None);
    }

    #[test]
    fn media_that_is_compact_already() {
        assert!(already_compact("image/png"));
        assert!(!already_compact("image/svg+xml"));
        assert!(!already_compact("text/html; charset=utf-8"));
        assert!(already_compact("application/zip"));
    }
}
