//! A session's control stream: the loop that answers the agent's binds,
//! unbinds and heartbeats within its control budget, and the stream of
//! messages the edge sends.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use futures_util::{Stream, StreamExt};
use postern_proto::{ErrorCode, Failure, Take, TokenBucket, pb};
use tokio::sync::mpsc;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::Status;

use super::{Registry, session::AgentSession};
use crate::config::Limits;

/// Where the edge queues its control messages to one session.
pub type ControlTx = mpsc::Sender<Result<pb::EdgeMessage, Status>>;

pub(super) fn edge_message(msg: pb::edge_message::Msg) -> Result<pb::EdgeMessage, Status> {
    Ok(pb::EdgeMessage { msg: Some(msg) })
}

/// Answers the agent's control messages until the session ends: the
/// reason to tell the agent, if any.
pub(super) async fn run(
    registry: &Registry,
    session: &Arc<AgentSession>,
    mut inbound: impl Stream<Item = Result<pb::AgentMessage, Status>> + Unpin,
) -> Option<Failure> {
    let control = session.control()?;
    let settings = &registry.settings.session;
    let mut ticker = tokio::time::interval(settings.heartbeat_interval);
    ticker.tick().await;
    let mut last_seen = Instant::now();
    let mut nonce = 0u64;
    let limits = &registry.settings.limits;
    let mut budget = TokenBucket::new(limits.control_messages_per_second, limits.control_burst);
    loop {
        let message = tokio::select! {
            _ = session.cancel.cancelled() => return None,
            _ = ticker.tick() => {
                if last_seen.elapsed() > settings.heartbeat_tolerance {
                    tracing::info!(session.id = %session.id, "agent missed its heartbeats");
                    return Some(Failure::new(
                        ErrorCode::HEARTBEAT_TIMEOUT,
                        format!("nothing from the agent for {:?}", settings.heartbeat_tolerance),
                    ));
                }
                nonce += 1;
                let ping = pb::edge_message::Msg::Ping(pb::Heartbeat { nonce });
                let _ = control.try_send(edge_message(ping));
                continue;
            }
            message = inbound.next() => message,
        };
        let msg = match message {
            Some(Ok(pb::AgentMessage { msg: Some(msg) })) => msg,
            Some(Ok(pb::AgentMessage { msg: None })) => continue,
            None => return None,
            Some(Err(status)) => {
                tracing::debug!(session.id = %session.id, %status, "control stream failed");
                return None;
            }
        };
        last_seen = Instant::now();
        let throttled = match within_budget(&mut budget, limits, last_seen) {
            Ok(throttled) => throttled,
            Err(flood) => {
                tracing::warn!(session.id = %session.id, "agent flooded the control stream");
                return Some(flood);
            }
        };
        // Boxed: a bind's future (certificates, policy, ACLs) is kilobytes,
        // and inline every idle session's task would hold room for it.
        let reply = match Box::pin(answer(registry, session, msg, throttled)).await {
            Ok(Some(reply)) => reply,
            Ok(None) => continue,
            Err(failure) => return Some(failure),
        };
        if control.send(edge_message(reply)).await.is_err() {
            return None;
        }
    }
}

/// Takes one message from the budget. Over it, binds and unbinds are
/// refused one by one (`Ok(Some(refusal))`; a heartbeat is still answered:
/// it is what keeps the session alive); a peer a whole burst beyond it is
/// cut off (`Err`).
pub(super) fn within_budget(
    budget: &mut TokenBucket,
    limits: &Limits,
    now: Instant,
) -> Result<Option<Failure>, Failure> {
    match budget.take(now) {
        Take::Granted => Ok(None),
        Take::Throttled { retry_after } => Ok(Some(Failure::new(
            ErrorCode::CONTROL_THROTTLED,
            format!(
                "over the control budget ({} messages a second, burst {}); send it again in {} ms",
                limits.control_messages_per_second,
                limits.control_burst,
                retry_after.as_millis().max(1)
            ),
        ))),
        Take::Exhausted => Err(Failure::new(
            ErrorCode::CONTROL_FLOOD,
            format!(
                "a whole burst ({}) of control messages beyond the budget of {} a second",
                limits.control_burst, limits.control_messages_per_second
            ),
        )),
    }
}

/// The reply to one control message (`None`: nothing to say), or the
/// failure that ends the session.
async fn answer(
    registry: &Registry,
    session: &Arc<AgentSession>,
    msg: pb::agent_message::Msg,
    throttled: Option<Failure>,
) -> Result<Option<pb::edge_message::Msg>, Failure> {
    use pb::agent_message::Msg;
    let reply = match (msg, throttled) {
        (Msg::Bind(req), Some(failure)) => {
            registry.counters.bind_refused(&failure);
            pb::edge_message::Msg::Bind(pb::BindResponse {
                request_id: req.request_id,
                error: Some(failure.to_pb()),
                ..Default::default()
            })
        }
        (Msg::Unbind(req), Some(failure)) => pb::edge_message::Msg::Unbind(pb::UnbindResponse {
            request_id: req.request_id,
            error: Some(failure.to_pb()),
        }),
        (Msg::Hello(_), _) => {
            return Err(Failure::new(
                ErrorCode::PROTOCOL_VIOLATION,
                "hello sent twice",
            ));
        }
        (Msg::Bind(req), None) => {
            let request_id = req.request_id;
            let response = match registry.bind(session, req).await {
                Ok((endpoint_id, public_url)) => pb::BindResponse {
                    request_id,
                    endpoint_id,
                    public_url,
                    error: None,
                },
                Err(failure) => {
                    registry.counters.bind_refused(&failure);
                    tracing::info!(session.id = %session.id, error = %failure, "bind refused");
                    pb::BindResponse {
                        request_id,
                        error: Some(failure.to_pb()),
                        ..Default::default()
                    }
                }
            };
            pb::edge_message::Msg::Bind(response)
        }
        (Msg::Unbind(req), None) => {
            let error = registry
                .unbind(session, &req.endpoint_id)
                .err()
                .map(|f| f.to_pb());
            pb::edge_message::Msg::Unbind(pb::UnbindResponse {
                request_id: req.request_id,
                error,
            })
        }
        (Msg::Ping(hb), _) => pb::edge_message::Msg::Pong(hb),
        (Msg::Pong(_), _) => return Ok(None),
    };
    Ok(Some(reply))
}

/// The control stream the edge sends: queued messages, then the end once
/// the session is cancelled.
pub struct ControlOut {
    rx: mpsc::Receiver<Result<pb::EdgeMessage, Status>>,
    cancelled: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl ControlOut {
    pub fn new(
        rx: mpsc::Receiver<Result<pb::EdgeMessage, Status>>,
        cancelled: Option<WaitForCancellationFutureOwned>,
    ) -> Self {
        ControlOut {
            rx,
            cancelled: cancelled.map(Box::pin),
        }
    }
}

impl Stream for ControlOut {
    type Item = Result<pb::EdgeMessage, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Poll::Ready(item) = self.rx.poll_recv(cx) {
            return Poll::Ready(item);
        }
        let cancelled = self
            .cancelled
            .as_mut()
            .is_some_and(|c| c.as_mut().poll(cx).is_ready());
        if cancelled {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}
