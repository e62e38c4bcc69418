//! `GET /metrics`: the agent's session and per-tunnel counters in the
//! Prometheus text format. Tunnels are labelled by name (the config's and
//! the API's, so as many as the user runs); no addresses or paths.

use postern_net::{metric_header as header, metric_sample as sample};

use crate::state::AgentState;

/// Every metric of the agent.
pub(super) fn render(state: &AgentState) -> String {
    let mut out = String::new();
    let status = state.status.borrow().clone();
    header(
        &mut out,
        "postern_agent_session_up",
        "gauge",
        "1 while the session to the edge is online, by the edge's region.",
    );
    sample(
        &mut out,
        "postern_agent_session_up",
        &[("region", &status.region)],
        u64::from(status.online),
    );
    header(
        &mut out,
        "postern_agent_reconnects_total",
        "counter",
        "Sessions lost and dials that failed, each followed by a new attempt.",
    );
    sample(
        &mut out,
        "postern_agent_reconnects_total",
        &[],
        status.reconnects,
    );
    let tunnels: Vec<_> = state
        .tunnels()
        .into_iter()
        .map(|t| {
            let bound = u64::from(t.public_url().is_some());
            (t.name().to_string(), bound, t.target.metrics.snapshot())
        })
        .collect();
    type Pick = fn(&(String, u64, crate::state::MetricsSnapshot)) -> u64;
    let series: [(&str, &str, &str, Pick); 4] = [
        (
            "postern_agent_tunnel_up",
            "gauge",
            "1 while the tunnel is bound at the edge.",
            |t| t.1,
        ),
        (
            "postern_agent_tunnel_connections_total",
            "counter",
            "Connections (data streams) served, by tunnel.",
            |t| t.2.conns_total,
        ),
        (
            "postern_agent_tunnel_open_connections",
            "gauge",
            "Connections open now, by tunnel.",
            |t| t.2.conns_open,
        ),
        (
            "postern_agent_tunnel_http_requests_total",
            "counter",
            "HTTP requests seen, by tunnel (inspected HTTP tunnels only).",
            |t| t.2.http_requests,
        ),
    ];
    for (name, kind, help, pick) in series {
        header(&mut out, name, kind, help);
        for t in &tunnels {
            sample(&mut out, name, &[("tunnel", &t.0)], pick(t));
        }
    }
    header(
        &mut out,
        "postern_agent_tunnel_bytes_total",
        "counter",
        "Bytes by tunnel and direction (in: toward the upstream).",
    );
    for (name, _, m) in &tunnels {
        for (direction, n) in [("in", m.bytes_in), ("out", m.bytes_out)] {
            sample(
                &mut out,
                "postern_agent_tunnel_bytes_total",
                &[("tunnel", name), ("direction", direction)],
                n,
            );
        }
    }
    out
}
