//! A body that passes every frame through untouched and copies the first
//! bytes and the trailers aside: the inspector sees a body without holding
//! it, so a 1 GiB upload or a long gRPC stream passes as it would through
//! the byte pipe.

use std::{
    fmt,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::store::{BodyState, CapturedBody, owned};

/// Called once with what was captured, when the body ends or is dropped.
type OnDone = Box<dyn FnOnce(CapturedBody) + Send>;

pin_project! {
    /// See the module docs.
    pub(crate) struct Tee<B> {
        #[pin]
        inner: B,
        capture: BodyCopy,
    }
}

/// The part of a body kept for the capture: the first `limit` bytes, the
/// size of the whole and the trailers, handed to `done` once the body ends
/// (or, as cut, when dropped before). The passive inspector fills one from
/// the bytes it parses; [`Tee`] from the frames it passes.
pub(super) struct BodyCopy {
    buf: BytesMut,
    limit: usize,
    size: u64,
    trailers: HeaderMap,
    done: Option<OnDone>,
}

impl BodyCopy {
    pub(super) fn new(limit: usize, done: impl FnOnce(CapturedBody) + Send + 'static) -> Self {
        BodyCopy {
            buf: BytesMut::new(),
            limit,
            size: 0,
            trailers: HeaderMap::new(),
            done: Some(Box::new(done)),
        }
    }

    pub(super) fn feed(&mut self, data: &[u8]) {
        self.size += data.len() as u64;
        let room = self.limit.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&data[..room.min(data.len())]);
    }

    pub(super) fn set_trailers(&mut self, trailers: HeaderMap) {
        self.trailers = trailers;
    }

    pub(super) fn finish(&mut self, state: BodyState) {
        if let Some(done) = self.done.take() {
            // A copy trims the buffer's spare capacity.
            done(CapturedBody {
                data: Bytes::copy_from_slice(&self.buf),
                size: self.size,
                state,
                trailers: std::mem::take(&mut self.trailers),
            });
        }
    }
}

impl Drop for BodyCopy {
    fn drop(&mut self) {
        self.finish(BodyState::Cut("the body was not read to its end".into()));
    }
}

impl<B: Body> Tee<B> {
    /// Tees `inner`, keeping at most `limit` bytes; `done` gets them.
    pub fn new(inner: B, limit: usize, done: impl FnOnce(CapturedBody) + Send + 'static) -> Self {
        let mut capture = BodyCopy::new(limit, done);
        // hyper never polls a body that is already at its end.
        if inner.is_end_stream() {
            capture.finish(BodyState::Complete);
        }
        Tee { inner, capture }
    }
}

impl<B> Body for Tee<B>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        match ready!(this.inner.as_mut().poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.capture.feed(data);
                } else if let Some(trailers) = frame.trailers_ref() {
                    this.capture.set_trailers(owned(trailers));
                }
                // Content-length bodies may never be polled past their end.
                if this.inner.is_end_stream() {
                    this.capture.finish(BodyState::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.capture.finish(BodyState::Cut(e.to_string()));
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.capture.finish(BodyState::Complete);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use futures_util::stream;
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    fn sink() -> (
        Arc<Mutex<Option<CapturedBody>>>,
        impl FnOnce(CapturedBody) + Send + 'static,
    ) {
        let got = Arc::new(Mutex::new(None));
        let slot = got.clone();
        (got, move |b| *slot.lock().unwrap() = Some(b))
    }

    #[tokio::test]
    async fn passes_everything_and_keeps_only_the_first_bytes() {
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = (0..100)
            .map(|i| Ok(Frame::data(Bytes::from(vec![i as u8; 1000]))))
            .collect();
        let (got, done) = sink();
        let tee = Tee::new(StreamBody::new(stream::iter(chunks)), 2500, done);
        let all = tee.collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 100_000, "the whole body passes through");
        let captured = got.lock().unwrap().take().expect("captured at the end");
        assert_eq!(captured.size, 100_000);
        assert_eq!(captured.data.len(), 2500);
        assert_eq!(&captured.data[..1000], &[0u8; 1000][..]);
        assert_eq!(&captured.data[2000..2500], &[2u8; 500][..]);
        assert!(captured.truncated());
        assert_eq!(captured.state, BodyState::Complete);
    }

    #[tokio::test]
    async fn an_empty_body_is_complete_without_being_polled() {
        let (got, done) = sink();
        let tee = Tee::new(Full::new(Bytes::new()), 10, done);
        assert!(tee.is_end_stream());
        assert_eq!(
            got.lock().unwrap().take().unwrap().state,
            BodyState::Complete
        );
    }

    #[tokio::test]
    async fn a_full_body_completes_on_its_last_frame() {
        let (got, done) = sink();
        let mut tee = Tee::new(Full::new(Bytes::from_static(b"{\"a\":1}")), 1024, done);
        let frame = tee.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "{\"a\":1}");
        let captured = got
            .lock()
            .unwrap()
            .take()
            .expect("done before None is polled");
        assert_eq!(captured.data, "{\"a\":1}");
        assert!(!captured.truncated());
    }

    #[tokio::test]
    async fn trailers_pass_and_are_kept() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
            Ok(Frame::trailers(trailers)),
        ];
        let (got, done) = sink();
        let tee = Tee::new(StreamBody::new(stream::iter(frames)), 1024, done);
        let collected = tee.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        let captured = got.lock().unwrap().take().unwrap();
        assert_eq!(captured.size, 7);
        assert_eq!(captured.trailers["grpc-status"], "0");
        assert_eq!(captured.state, BodyState::Complete);
    }

    #[tokio::test]
    async fn dropped_early_is_cut() {
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = (0..3)
            .map(|_| Ok(Frame::data(Bytes::from_static(b"abc"))))
            .collect();
        let (got, done) = sink();
        let mut tee = Tee::new(StreamBody::new(stream::iter(chunks)), 1024, done);
        tee.frame().await.unwrap().unwrap();
        drop(tee);
        let captured = got.lock().unwrap().take().unwrap();
        assert_eq!(captured.size, 3);
        assert!(matches!(captured.state, BodyState::Cut(_)));
    }
}
