//! `websocket_tcp_converter`: the edge answers a visitor's WebSocket
//! handshake itself and carries the payload of each message, both ways, as
//! plain bytes on a tunnel stream to a TCP upstream. Visitors' text and
//! binary messages become bytes upstream; what the upstream writes comes
//! back as binary messages. When either side ends, both do. Requests
//! that are not a WebSocket handshake get `400 ERR_POSTERN_9036`.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use postern_proto::{ErrorCode, Failure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, handshake::derive_accept_key, protocol::Role},
};

use super::{ProxyBody, UpstreamPool, VisitorBody, error_response, is_upgrade_request};
use crate::endpoint::ServedBy;

/// Bytes read from the upstream per message at most.
const CHUNK: usize = 16 * 1024;

/// Answers `req` with the WebSocket handshake and bridges the connection
/// on a task of `tracker`, or refuses a request that is not a handshake.
pub async fn convert(
    pool: &UpstreamPool,
    mut req: Request<VisitorBody>,
    tracker: &tokio_util::task::TaskTracker,
) -> Response<ProxyBody> {
    let headers = req.headers();
    let websocket = is_upgrade_request(&req)
        && headers
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13");
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    let (true, Some(key)) = (websocket, key) else {
        return error_response(&Failure::new(
            ErrorCode::WEBSOCKET_ONLY,
            "send a WebSocket handshake (Upgrade: websocket, Sec-WebSocket-Version: 13, Sec-WebSocket-Key)",
        ));
    };
    // The stream to the upstream comes first: a visitor whose agent is gone
    // gets the edge's error page, not a WebSocket that closes at once.
    let upstream = match pool.open_stream().await {
        Ok(upstream) => upstream,
        Err(failure) => return error_response(&failure),
    };
    let served = upstream.served.clone();
    let visitor = hyper::upgrade::on(&mut req);
    tracker.spawn(async move {
        match visitor.await {
            Ok(visitor) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(visitor), Role::Server, None)
                        .await;
                bridge(ws, TokioIo::new(upstream)).await;
            }
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
        }
    });
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response.extensions_mut().insert::<ServedBy>(served);
    response
}

/// Message payloads to the upstream, the upstream's bytes back as binary
/// messages, until either side ends.
async fn bridge<V, U>(ws: WebSocketStream<V>, upstream: U)
where
    V: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut to_visitor, mut from_visitor) = ws.split();
    let (mut from_upstream, mut to_upstream) = tokio::io::split(upstream);
    let up = async {
        while let Some(Ok(message)) = from_visitor.next().await {
            let payload = match message {
                Message::Binary(bytes) => bytes,
                Message::Text(text) => Bytes::from(text.as_str().to_owned()),
                Message::Close(_) => break,
                // Pings are answered by the WebSocket layer.
                _ => continue,
            };
            if to_upstream.write_all(&payload).await.is_err() {
                break;
            }
        }
        let _ = to_upstream.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match from_upstream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let message = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
                    if to_visitor.send(message).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = to_visitor.send(Message::Close(None)).await;
    };
    // A WebSocket has no half-close: when either side ends, both do.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}
