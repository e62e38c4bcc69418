//! A data stream's outgoing side before anything is known to send: the
//! stream is opened (and, at the edge, parked) first, and what it carries is
//! plugged in later, when a visitor claims it or the upstream is dialled.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use futures_util::{Future, Stream};
use tokio::sync::oneshot;

use crate::pb;

/// Frames to send on a data stream.
pub type BoxFrames = Pin<Box<dyn Stream<Item = pb::Frame> + Send>>;

/// Frames arriving on a data stream: a gRPC stream's, an ngrok SDK's muxado
/// stream read as frames, or those of an agent
/// that lives in the edge (an SSH session).
pub type InboundFrames = Pin<Box<dyn Stream<Item = Result<pb::Frame, tonic::Status>> + Send>>;

/// A stream of frames to be plugged in through the returned sender. It sends
/// nothing until then, and ends quietly if the sender is dropped unused.
pub fn attachable() -> (oneshot::Sender<BoxFrames>, AttachedFrames) {
    let (tx, rx) = oneshot::channel();
    (
        tx,
        AttachedFrames {
            attach: Some(rx),
            frames: None,
        },
    )
}

/// See [`attachable`].
pub struct AttachedFrames {
    attach: Option<oneshot::Receiver<BoxFrames>>,
    frames: Option<BoxFrames>,
}

impl Stream for AttachedFrames {
    type Item = pb::Frame;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<pb::Frame>> {
        if let Some(attach) = self.attach.as_mut() {
            let attached = ready!(Pin::new(attach).poll(cx));
            self.attach = None;
            match attached {
                Ok(frames) => self.frames = Some(frames),
                Err(_) => return Poll::Ready(None),
            }
        }
        match self.frames.as_mut() {
            Some(frames) => frames.as_mut().poll_next(cx),
            None => Poll::Ready(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn sends_what_is_attached_or_ends_when_dropped() {
        let (tx, mut frames) = attachable();
        let frame = pb::Frame {
            eof: true,
            ..Default::default()
        };
        tx.send(Box::pin(futures_util::stream::iter([frame])))
            .ok()
            .unwrap();
        assert!(frames.next().await.unwrap().eof);
        assert!(frames.next().await.is_none());

        let (tx, mut frames) = attachable();
        drop(tx);
        assert!(frames.next().await.is_none());
    }
}
