//! TCP endpoints, and the piping of any visitor connection (TCP, or TLS
//! passed through or ended here) into a data stream of the agent.

use super::*;

impl Gateway {
    /// Accepts visitors of a TCP endpoint until `stop`.
    pub(super) fn serve_tcp(
        &self,
        listener: TcpListener,
        route: Arc<Route>,
        stop: CancellationToken,
    ) {
        spawn_accept_loop(
            &self.inner,
            "tcp endpoint",
            listener,
            &stop,
            Shed::Close,
            move |inner, accepted| {
                let route = route.clone();
                async move {
                    let accepted = accepted;
                    inner.count(Counter::TcpConnections);
                    let Some(first) = route.pool.pick(&[]) else {
                        return;
                    };
                    let mut record = ConnRecord {
                        client: accepted.client,
                        server: accepted.local,
                        name: "",
                        start: SystemTime::now(),
                        proto: "tcp",
                        endpoint: first.endpoint.clone(),
                        ip_decision: None,
                        logs: Vec::new(),
                    };
                    let admitted = on_connect(&inner, &route, &mut record);
                    let span = record.span();
                    let result = if let Err(refused) = admitted {
                        Err(refused)
                    } else {
                        let (r, w) = accepted.stream.into_split();
                        let visitor = Visitor {
                            client: accepted.client,
                            local: accepted.local,
                            name: "",
                        };
                        proxy_bytes(
                            &inner,
                            &route,
                            first,
                            &mut record,
                            r,
                            w,
                            accepted.prefix,
                            &visitor,
                        )
                        .instrument(span.clone())
                        .await
                    };
                    outcome::tcp_closed(&inner.outcomes, &record, &span, &result);
                    if let Err(e) = result {
                        tracing::debug!(endpoint = %record.endpoint.id, error = %e, "TCP connection not proxied");
                    }
                }
            },
        );
    }
}

/// Runs a TCP or TLS endpoint's `on_tcp_connect` rules for a new
/// connection; an `Err` closes it. The record gets the IP verdict and the
/// policy's logs.
pub(super) fn on_connect(
    inner: &Inner,
    route: &Route,
    record: &mut ConnRecord<'_>,
) -> Result<(), Failure> {
    if !route.policy.has(Phase::Connect) {
        return Ok(());
    }
    let conn = ConnFacts {
        client: record.client,
        server: record.server,
        region: inner.outcomes.region.as_str().into(),
        start: record.start,
        tls: (!record.name.is_empty()).then(|| TlsFacts {
            sni: Some(record.name.to_string()),
            ..Default::default()
        }),
    };
    let verdict = route
        .policy
        .on_connect(&conn, &EndpointFacts::of(&record.endpoint));
    record.ip_decision = verdict.ip_decision;
    record.logs = verdict.logs;
    inner.count_ip_denial(verdict.ip_decision);
    verdict.result
}

/// Who a piped connection is from and for.
pub(super) struct Visitor<'a> {
    pub client: SocketAddr,
    pub local: SocketAddr,
    /// The SNI, for TLS endpoints.
    pub name: &'a str,
}

/// Pipes a visitor's connection into a data stream of `first`'s agent, or
/// of another endpoint of the pool when that agent is gone; the record
/// names the endpoint that served.
#[allow(clippy::too_many_arguments)]
pub(super) async fn proxy_bytes<R, W>(
    inner: &Inner,
    route: &Route,
    first: Arc<Member>,
    record: &mut ConnRecord<'_>,
    reader: R,
    writer: W,
    prefix: Bytes,
    visitor: &Visitor<'_>,
) -> Result<PipeOutcome, Failure>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: postern_proto::LocalWrite,
{
    let (member, claimed) = route.pool.claim(first).await?;
    record.served_by(&member.endpoint);
    let _permit = claimed.permit;
    let mut open = open_frame(
        &member.endpoint,
        visitor.client,
        visitor.local,
        visitor.name,
    );
    let prefix_len = prefix.len() as u64;
    open.data = prefix;
    let (outbound, pump) = pipe(reader, writer, claimed.inbound, vec![open]);
    claimed.attach.send(Box::pin(outbound)).map_err(|_| {
        Failure::new(
            ErrorCode::AGENT_FORWARD_FAILED,
            "the agent's data stream closed",
        )
    })?;
    let mut outcome = pump.run_with_idle_timeout(inner.config.idle_timeout).await;
    if matches!(&outcome.inbound, postern_proto::End::Aborted(reason) if reason.starts_with("idle"))
    {
        inner.count(Counter::IdleClosed);
    }
    tracing::debug!(?outcome, "connection finished");
    outcome.bytes_to_peer += prefix_len;
    Ok(outcome)
}
