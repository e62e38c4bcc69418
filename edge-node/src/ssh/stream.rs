//! A data stream of an SSH session: parked like an agent's, and once the
//! gateway claims it and sends its `open` frame, carried over a
//! `forwarded-tcpip` channel the edge opens to the client, which connects
//! it to the target of its `-R` (as the agent dials its upstream).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use futures_util::{StreamExt, stream};
use postern_ingress::ClaimedStream;
use postern_proto::{BoxFrames, ErrorCode, Failure, InboundFrames, pb, pipe};
use russh::server::Handle;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

/// A bound forward, as the client knows it: what a `forwarded-tcpip`
/// channel must name for the client to connect it.
#[derive(Clone, Debug)]
pub(super) struct Target {
    pub address: String,
    pub port: u32,
}

/// The session's bound forwards by endpoint id.
pub(super) type Targets = Arc<Mutex<HashMap<String, Target>>>;

/// A stream for the session's pool: the task behind it waits to be
/// claimed, and ends quietly if it never is.
pub(super) fn parked(handle: Handle, targets: Targets, tracker: &TaskTracker) -> ClaimedStream {
    let (attach, attached) = oneshot::channel::<BoxFrames>();
    let (inbound_tx, inbound_rx) = oneshot::channel::<InboundFrames>();
    tracker.spawn(async move {
        if let Ok(frames) = attached.await {
            serve(handle, targets, frames, inbound_tx).await;
        }
    });
    // The client's frames, once the channel is open; nothing before.
    let inbound: InboundFrames = Box::pin(
        stream::once(inbound_rx)
            .filter_map(|frames| std::future::ready(frames.ok()))
            .flatten(),
    );
    ClaimedStream {
        inbound,
        attach,
        permit: None,
    }
}

/// Opens the channel for the stream's endpoint and pipes it, or answers
/// with an error frame when the client cannot connect its target.
async fn serve(
    handle: Handle,
    targets: Targets,
    mut frames: BoxFrames,
    inbound: oneshot::Sender<InboundFrames>,
) {
    let Some(first) = frames.next().await else {
        return;
    };
    let channel = match open_channel(&handle, &targets, &first).await {
        Ok(channel) => channel,
        Err(failure) => {
            tracing::debug!(error = %failure, "SSH stream refused");
            let error = pb::Frame {
                error: Some(failure.to_pb()),
                ..Default::default()
            };
            let _ = inbound.send(Box::pin(stream::iter([Ok(error)])));
            return;
        }
    };
    let (reader, writer) = tokio::io::split(channel.into_stream());
    // The first frame goes through the pipe too: it writes its bytes.
    let from_edge = stream::once(std::future::ready(first))
        .chain(frames)
        .map(Ok);
    let (to_edge, pump) = pipe(reader, writer, from_edge, Vec::new());
    if inbound.send(Box::pin(to_edge.map(Ok))).is_err() {
        return;
    }
    let outcome = pump.run().await;
    tracing::debug!(?outcome, "SSH stream finished");
}

async fn open_channel(
    handle: &Handle,
    targets: &Targets,
    first: &pb::Frame,
) -> Result<russh::Channel<russh::server::Msg>, Failure> {
    let Some(open) = &first.open else {
        return Err(Failure::new(
            ErrorCode::PROTOCOL_VIOLATION,
            "the first frame must open the stream",
        ));
    };
    let target = targets
        .lock()
        .expect("targets lock")
        .get(&open.endpoint_id)
        .cloned()
        .ok_or_else(|| {
            Failure::new(
                ErrorCode::ENDPOINT_OFFLINE,
                format!("the SSH session no longer serves {}", open.endpoint_id),
            )
        })?;
    let client: Option<SocketAddr> = open.client_addr.parse().ok();
    let (ip, port) = client.map_or((String::new(), 0), |a| (a.ip().to_string(), a.port()));
    handle
        .channel_open_forwarded_tcpip(target.address, target.port, ip, u32::from(port))
        .await
        .map_err(|e| {
            Failure::new(
                ErrorCode::UPSTREAM_DIAL_FAILED,
                format!("the SSH client could not connect its forward: {e}"),
            )
        })
}
