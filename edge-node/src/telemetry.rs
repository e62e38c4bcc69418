//! `/metrics` (Prometheus text), `/healthz` (alive) and `/readyz` (ready to
//! take traffic: not before the node has started, in a cluster not before
//! it has caught up with the cluster's config, not while it drains) on
//! their own listener.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use postern_ingress::Gateway;
use postern_net::{metric_header, metric_sample};

use crate::{CertReloads, acme::Acme, cluster::ClusterNode, registry::Registry};

/// What the telemetry endpoints read.
pub struct Telemetry {
    pub gateway: Gateway,
    pub registry: Arc<Registry>,
    pub region: String,
    pub events: postern_events::MetricsHandle,
    pub ready: Arc<AtomicBool>,
    /// Gossip counters, in a cluster.
    pub cluster: Option<Arc<ClusterNode>>,
    /// ACME orders (`[acme]`).
    pub acme: Option<Arc<Acme>>,
    /// SIGHUP reloads of the certificate files.
    pub reloads: Arc<CertReloads>,
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

pub async fn handle(
    state: Arc<Telemetry>,
    req: Request<Incoming>,
    _peer: std::net::SocketAddr,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if !state.ready.load(Ordering::Relaxed) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        "/readyz" if state.cluster.as_ref().is_some_and(|c| !c.caught_up()) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: catching up with the cluster's config\n".into(),
        ),
        "/readyz" => text(StatusCode::OK, "text/plain", "ready\n".into()),
        "/metrics" => text(StatusCode::OK, "text/plain; version=0.0.4", state.render()),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

impl Telemetry {
    /// Every metric of the node.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.gateway.metrics().render(&mut out);
        metric_header(
            &mut out,
            "postern_open_connections",
            "gauge",
            "Visitor connections open now.",
        );
        metric_sample(
            &mut out,
            "postern_open_connections",
            &[],
            self.gateway.open_connections() as u64,
        );
        metric_header(
            &mut out,
            "postern_agent_sessions",
            "gauge",
            "Agent sessions connected to this node, by region.",
        );
        metric_sample(
            &mut out,
            "postern_agent_sessions",
            &[("region", &self.region)],
            self.registry.session_count() as u64,
        );
        metric_header(
            &mut out,
            "postern_agent_connections",
            "gauge",
            "Connections the agents of this node's sessions have open (several per session with `connections`).",
        );
        metric_sample(
            &mut out,
            "postern_agent_connections",
            &[("region", &self.region)],
            self.registry.connection_count() as u64,
        );
        let counters = self.registry.counters();
        let region = [("region", self.region.as_str())];
        for (name, help, value) in [
            (
                "postern_agent_sessions_opened_total",
                "Agent sessions opened on this node.",
                &counters.opened,
            ),
            (
                "postern_agent_sessions_superseded_total",
                "Sessions replaced by a newer one of the same agent (it reconnected first).",
                &counters.superseded,
            ),
        ] {
            metric_header(&mut out, name, "counter", help);
            metric_sample(&mut out, name, &region, value.load(Ordering::Relaxed));
        }
        for (name, help, by_code) in [
            (
                "postern_agent_sessions_refused_total",
                "Agent hellos refused, by error code.",
                counters.sessions_refused(),
            ),
            (
                "postern_binds_refused_total",
                "Binds refused, by error code.",
                counters.binds_refused(),
            ),
        ] {
            metric_header(&mut out, name, "counter", help);
            for (code, n) in by_code {
                metric_sample(&mut out, name, &[("code", &code)], n);
            }
        }
        if let Some(cluster) = &self.cluster {
            render_cluster(&mut out, &cluster.stats());
        }
        if let Some(acme) = &self.acme {
            render_acme(&mut out, acme);
        }
        let reloads = "postern_certificate_reloads_total";
        metric_header(
            &mut out,
            reloads,
            "counter",
            "SIGHUP reloads of the tls.certificates files, by result (failed: the certificates served stayed).",
        );
        for (result, count) in [("ok", &self.reloads.done), ("failed", &self.reloads.failed)] {
            metric_sample(
                &mut out,
                reloads,
                &[("result", result)],
                count.load(Ordering::Relaxed),
            );
        }
        metric_header(
            &mut out,
            "postern_events_total",
            "counter",
            "Events, by what happened to them.",
        );
        let mut gauges = Vec::new();
        for (name, value) in self.events.snapshot().pairs() {
            let name = name.trim_start_matches("events_");
            match name {
                "published" | "filtered" | "spooled" | "produced" | "delivered" | "failed"
                | "dropped" => {
                    metric_sample(&mut out, "postern_events_total", &[("state", name)], value)
                }
                _ => gauges.push((name, value)),
            }
        }
        for (name, value) in gauges {
            let name = format!("postern_events_{name}");
            metric_header(&mut out, &name, "gauge", "Event queue and spool occupancy.");
            metric_sample(&mut out, &name, &[], value);
        }
        out
    }
}

/// ACME: orders placed here by result (`postern_acme_orders_total{result="failed"}`
/// going up means a CA problem), the managed names whose last order here
/// failed (they are served their old certificate, if any, meanwhile),
/// certificates another node ordered and this one installed, the leases
/// this node holds and the times it stood down; then, per reserved domain
/// with a policy (labelled by id, not name), the served certificate's end
/// with the node that ordered it, and the node holding the lease to order
/// it now.
fn render_acme(out: &mut String, acme: &Acme) {
    let stats = acme.stats();
    let stat = |name: &str| {
        stats
            .iter()
            .find(|(stat, _)| *stat == name)
            .map_or(0, |(_, v)| *v)
    };
    let orders = "postern_acme_orders_total";
    metric_header(
        out,
        orders,
        "counter",
        "ACME certificate orders this node placed, by result.",
    );
    metric_sample(
        out,
        orders,
        &[("result", "issued")],
        stat("acme_orders_issued"),
    );
    metric_sample(
        out,
        orders,
        &[("result", "failed")],
        stat("acme_orders_failed"),
    );
    for (name, kind, help, stat_name) in [
        (
            "postern_acme_names_failing",
            "gauge",
            "Managed names whose last ACME order here failed.",
            "acme_names_failing",
        ),
        (
            "postern_acme_certificates_received_total",
            "counter",
            "ACME certificates another node of the cluster ordered, installed here.",
            "acme_certificates_received",
        ),
        (
            "postern_acme_leases_held",
            "gauge",
            "Names this node holds the cluster's order lease for.",
            "acme_leases_held",
        ),
        (
            "postern_acme_on_demand_refused_total",
            "counter",
            "Names bound under a wildcard reserved domain that got no order on demand: acme.on_demand_per_hour was reached.",
            "acme_on_demand_refused",
        ),
        (
            "postern_acme_leases_stood_down_total",
            "counter",
            "Leases this node took and gave up to another node's earlier one.",
            "acme_leases_stood_down",
        ),
    ] {
        metric_header(out, name, kind, help);
        metric_sample(out, name, &[], stat(stat_name));
    }
    let expiry = "postern_acme_certificate_not_after_seconds";
    metric_header(
        out,
        expiry,
        "gauge",
        "When the ACME certificate served for a reserved domain ends (Unix time), with the node that ordered it.",
    );
    for served in acme.served() {
        let not_after = served
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let ordered_by = served.ordered_by.as_deref().unwrap_or("");
        metric_sample(
            out,
            expiry,
            &[
                ("reserved_domain", &served.reserved_domain),
                ("ordered_by", ordered_by),
            ],
            not_after,
        );
    }
    let lease = "postern_acme_lease";
    metric_header(
        out,
        lease,
        "gauge",
        "1 for the node holding the cluster's lease to order a reserved domain's certificate now.",
    );
    for (id, holder) in acme.leases() {
        metric_sample(
            out,
            lease,
            &[("reserved_domain", &id), ("holder", &holder)],
            1,
        );
    }
}

/// Gossip: members and objects as gauges, the rest as counters
/// (`postern_cluster_merge_passes_total` shows convergence work).
fn render_cluster(out: &mut String, stats: &[(&'static str, u64)]) {
    for (name, value) in stats {
        let (kind, help) = match *name {
            "cluster_members" => ("gauge", "Live members of the cluster."),
            "cluster_objects" => ("gauge", "Replicated objects (CAs) this node holds."),
            "cluster_values_refused" => (
                "counter",
                "Gossiped values refused: bad signature, malformed or misplaced.",
            ),
            "cluster_values_stale" => ("counter", "Gossiped values older than what is held."),
            "cluster_merge_passes" => ("counter", "Passes merging gossiped state."),
            "cluster_gossip_dropped" => ("counter", "Gossip datagrams dropped."),
            _ => ("counter", "Cluster gossip."),
        };
        let metric = match kind {
            "gauge" => format!("postern_{name}"),
            _ => format!("postern_{name}_total"),
        };
        metric_header(out, &metric, kind, help);
        metric_sample(out, &metric, &[], *value);
    }
}
