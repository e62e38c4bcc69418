//! Every metric of the public side, rendered in the Prometheus text format
//! by one function: requests and connections by endpoint, and the
//! gateway-wide counters (refused handshakes, shed connections, …).
//! Labels stay bounded: endpoint ids (one per bound endpoint), status
//! classes, decisions and reasons — never paths or client addresses.

use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use postern_net::{metric_header as header, metric_sample};

/// Upper bounds of the request-duration histogram, in seconds.
const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, bucket) in BUCKETS.iter().zip(self.buckets.iter_mut()) {
            if seconds <= *bound {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// `allow`, `block`, or `none` when no module decided.
pub fn decision_label(decisions: &[Option<postern_events::Decision>]) -> &'static str {
    use postern_events::Decision;
    if decisions.contains(&Some(Decision::Block)) {
        "block"
    } else if decisions.contains(&Some(Decision::Allow)) {
        "allow"
    } else {
        "none"
    }
}

/// `2xx`, `4xx`, ...
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[derive(Default)]
struct ConnSeries {
    connections: u64,
    bytes_in: u64,
    bytes_out: u64,
}

/// One endpoint's connection series by (`tcp`/`tls`, decision).
type ConnsByKind = BTreeMap<(&'static str, &'static str), ConnSeries>;

/// One endpoint's HTTP series.
#[derive(Default)]
struct HttpSeries {
    /// (status class, decision) → count
    requests: BTreeMap<(&'static str, &'static str), u64>,
    durations: Histogram,
    /// Body bytes (in: from visitors, out).
    bytes: (u64, u64),
}

/// A gateway-wide count of something that happened on the public side.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Counter {
    TlsNoSni,
    TlsUnknownSni,
    TlsBadClientHello,
    TlsClientHelloTimeout,
    /// Handshakes refused for a missing or bad client certificate (mTLS).
    TlsBadClientCert,
    TlsHandshakeFailed,
    /// New connections closed because the edge was at its connection cap.
    ShedConnections,
    /// Connections or requests refused by an IP restriction.
    IpDenied,
    /// Bad or missing PROXY headers from trusted load balancers.
    BadProxyHeaders,
    /// TCP/TLS endpoint connections closed for being idle.
    IdleClosed,
    AcceptErrors,
    HttpRequests,
    TcpConnections,
}

/// Where a counter shows in the Prometheus text.
enum Exposed {
    /// A `reason` of `postern_tls_handshake_failures_total`.
    TlsFailure(&'static str),
    /// A metric of its own: name and help.
    Alone(&'static str, &'static str),
    /// Only in [`Metrics::counters`].
    Unexposed,
}

impl Counter {
    /// Every counter, in the order they are rendered.
    const ALL: [Counter; 13] = [
        Counter::TlsNoSni,
        Counter::TlsUnknownSni,
        Counter::TlsBadClientHello,
        Counter::TlsClientHelloTimeout,
        Counter::TlsBadClientCert,
        Counter::TlsHandshakeFailed,
        Counter::ShedConnections,
        Counter::IpDenied,
        Counter::BadProxyHeaders,
        Counter::IdleClosed,
        Counter::AcceptErrors,
        Counter::HttpRequests,
        Counter::TcpConnections,
    ];

    /// Its name in [`Metrics::counters`], and where it shows in the
    /// Prometheus text.
    fn describe(self) -> (&'static str, Exposed) {
        use Exposed::*;
        match self {
            Counter::TlsNoSni => ("tls_no_sni", TlsFailure("no_sni")),
            Counter::TlsUnknownSni => ("tls_unknown_sni", TlsFailure("unknown_sni")),
            Counter::TlsBadClientHello => ("tls_bad_client_hello", TlsFailure("bad_client_hello")),
            Counter::TlsClientHelloTimeout => (
                "tls_client_hello_timeout",
                TlsFailure("client_hello_timeout"),
            ),
            Counter::TlsBadClientCert => {
                ("tls_bad_client_cert", TlsFailure("bad_client_certificate"))
            }
            Counter::TlsHandshakeFailed => ("tls_handshake_failed", TlsFailure("handshake")),
            Counter::ShedConnections => (
                "shed_connections",
                Alone(
                    "postern_connections_shed_total",
                    "Connections shed at the connection cap.",
                ),
            ),
            Counter::IpDenied => (
                "ip_denied",
                Alone(
                    "postern_ip_denied_total",
                    "Connections and requests refused by IP restrictions.",
                ),
            ),
            Counter::BadProxyHeaders => (
                "bad_proxy_headers",
                Alone(
                    "postern_bad_proxy_headers_total",
                    "Bad PROXY headers from trusted load balancers.",
                ),
            ),
            Counter::IdleClosed => (
                "idle_closed",
                Alone(
                    "postern_idle_closed_total",
                    "TCP/TLS endpoint connections closed for idleness.",
                ),
            ),
            Counter::AcceptErrors => (
                "accept_errors",
                Alone(
                    "postern_accept_errors_total",
                    "Failed accepts on public listeners.",
                ),
            ),
            Counter::HttpRequests => ("http_requests", Unexposed),
            Counter::TcpConnections => ("tcp_connections", Unexposed),
        }
    }
}

/// Requests and connections by endpoint, and the gateway-wide counters.
/// One lock per kind of series, taken once per request or connection; a
/// known endpoint's name is not copied again.
#[derive(Default)]
pub struct Metrics {
    /// endpoint → HTTP series
    http: Mutex<BTreeMap<String, HttpSeries>>,
    /// endpoint → (`tcp`/`tls`, decision) → series
    connections: Mutex<BTreeMap<String, ConnsByKind>>,
    /// By [`Counter`].
    counters: [AtomicU64; Counter::ALL.len()],
}

/// The entry for `key`, allocating its name only the first time.
fn entry<'m, V: Default>(map: &'m mut BTreeMap<String, V>, key: &str) -> &'m mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key).expect("inserted above")
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Counts one `counter`.
    pub(crate) fn count(&self, counter: Counter) {
        self.counters[counter as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Name and value of every gateway-wide counter (`tls_no_sni`,
    /// `http_requests`, …).
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .map(|&c| (c.describe().0, self.get(c)))
            .collect()
    }

    fn get(&self, counter: Counter) -> u64 {
        self.counters[counter as usize].load(Ordering::Relaxed)
    }

    /// One finished HTTP request.
    pub fn request(
        &self,
        endpoint: &str,
        status: u16,
        decision: &'static str,
        took: Duration,
        bytes: (u64, u64),
    ) {
        let endpoint = if endpoint.is_empty() {
            "none"
        } else {
            endpoint
        };
        let mut http = self.http.lock().expect("metrics lock");
        let series = entry(&mut http, endpoint);
        *series
            .requests
            .entry((status_class(status), decision))
            .or_default() += 1;
        series.durations.observe(took.as_secs_f64());
        series.bytes.0 += bytes.0;
        series.bytes.1 += bytes.1;
    }

    /// One finished TCP or TLS endpoint connection.
    pub fn connection(
        &self,
        endpoint: &str,
        proto: &'static str,
        decision: &'static str,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let mut connections = self.connections.lock().expect("metrics lock");
        let series = entry(&mut connections, endpoint)
            .entry((proto, decision))
            .or_default();
        series.connections += 1;
        series.bytes_in += bytes_in;
        series.bytes_out += bytes_out;
    }

    /// Appends the Prometheus text form.
    pub fn render(&self, out: &mut String) {
        header(
            out,
            "postern_http_requests_total",
            "counter",
            "HTTP requests answered, by endpoint, status class and module decision.",
        );
        let http = self.http.lock().expect("metrics lock");
        for (endpoint, series) in http.iter() {
            for ((class, decision), n) in &series.requests {
                let _ = writeln!(
                    out,
                    "postern_http_requests_total{{endpoint=\"{endpoint}\",code=\"{class}\",decision=\"{decision}\"}} {n}"
                );
            }
        }
        header(
            out,
            "postern_http_request_duration_seconds",
            "histogram",
            "Time from request to the end of the response body.",
        );
        for (endpoint, h) in http.iter().map(|(e, s)| (e, &s.durations)) {
            for (bound, n) in BUCKETS.iter().zip(h.buckets.iter()) {
                let _ = writeln!(
                    out,
                    "postern_http_request_duration_seconds_bucket{{endpoint=\"{endpoint}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "postern_http_request_duration_seconds_bucket{{endpoint=\"{endpoint}\",le=\"+Inf\"}} {}\n\
                 postern_http_request_duration_seconds_sum{{endpoint=\"{endpoint}\"}} {}\n\
                 postern_http_request_duration_seconds_count{{endpoint=\"{endpoint}\"}} {}",
                h.count, h.sum, h.count
            );
        }
        header(
            out,
            "postern_http_body_bytes_total",
            "counter",
            "HTTP body bytes, by endpoint and direction (in: from visitors).",
        );
        for (endpoint, (bytes_in, bytes_out)) in http.iter().map(|(e, s)| (e, s.bytes)) {
            let _ = writeln!(
                out,
                "postern_http_body_bytes_total{{endpoint=\"{endpoint}\",direction=\"in\"}} {bytes_in}"
            );
            let _ = writeln!(
                out,
                "postern_http_body_bytes_total{{endpoint=\"{endpoint}\",direction=\"out\"}} {bytes_out}"
            );
        }
        header(
            out,
            "postern_connections_total",
            "counter",
            "TCP and TLS endpoint connections, by endpoint, protocol and decision.",
        );
        let connections = self.connections.lock().expect("metrics lock");
        let by_endpoint = || {
            connections.iter().flat_map(|(endpoint, series)| {
                series
                    .iter()
                    .map(move |((proto, decision), s)| (endpoint, proto, decision, s))
            })
        };
        for (endpoint, proto, decision, s) in by_endpoint() {
            let _ = writeln!(
                out,
                "postern_connections_total{{endpoint=\"{endpoint}\",proto=\"{proto}\",decision=\"{decision}\"}} {}",
                s.connections
            );
        }
        header(
            out,
            "postern_connection_bytes_total",
            "counter",
            "TCP and TLS endpoint bytes, by endpoint, protocol and direction.",
        );
        for (endpoint, proto, decision, s) in by_endpoint() {
            for (direction, n) in [("in", s.bytes_in), ("out", s.bytes_out)] {
                let _ = writeln!(
                    out,
                    "postern_connection_bytes_total{{endpoint=\"{endpoint}\",proto=\"{proto}\",decision=\"{decision}\",direction=\"{direction}\"}} {n}"
                );
            }
        }
        self.render_counters(out);
    }

    /// The gateway-wide counters: the refused handshakes as one metric by
    /// reason, the others each as its own.
    fn render_counters(&self, out: &mut String) {
        let failures = "postern_tls_handshake_failures_total";
        header(
            out,
            failures,
            "counter",
            "TLS connections refused before any endpoint saw them, by reason.",
        );
        for counter in Counter::ALL {
            if let (_, Exposed::TlsFailure(reason)) = counter.describe() {
                metric_sample(out, failures, &[("reason", reason)], self.get(counter));
            }
        }
        for counter in Counter::ALL {
            if let (_, Exposed::Alone(name, help)) = counter.describe() {
                header(out, name, "counter", help);
                metric_sample(out, name, &[], self.get(counter));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.request("ep_1", 200, "none", Duration::from_millis(30), (10, 20));
        m.request("ep_1", 503, "block", Duration::from_millis(2), (0, 5));
        m.connection("ep_2", "tcp", "allow", 7, 9);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains(
            "postern_http_requests_total{endpoint=\"ep_1\",code=\"2xx\",decision=\"none\"} 1"
        ));
        assert!(out.contains(
            "postern_http_requests_total{endpoint=\"ep_1\",code=\"5xx\",decision=\"block\"} 1"
        ));
        assert!(out.contains(
            "postern_http_request_duration_seconds_bucket{endpoint=\"ep_1\",le=\"0.005\"} 1"
        ));
        assert!(out.contains(
            "postern_http_request_duration_seconds_bucket{endpoint=\"ep_1\",le=\"0.05\"} 2"
        ));
        assert!(out.contains("postern_http_request_duration_seconds_count{endpoint=\"ep_1\"} 2"));
        assert!(out.contains("postern_connection_bytes_total{endpoint=\"ep_2\",proto=\"tcp\",decision=\"allow\",direction=\"out\"} 9"));
        assert_eq!(status_class(101), "1xx");
    }

    #[test]
    fn renders_the_gateway_counters() {
        let m = Metrics::default();
        m.count(Counter::TlsNoSni);
        m.count(Counter::ShedConnections);
        m.count(Counter::ShedConnections);
        m.count(Counter::HttpRequests);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("postern_tls_handshake_failures_total{reason=\"no_sni\"} 1\n"));
        assert!(out.contains("postern_tls_handshake_failures_total{reason=\"handshake\"} 0\n"));
        assert!(out.contains(
            "# TYPE postern_connections_shed_total counter\npostern_connections_shed_total 2\n"
        ));
        assert!(!out.contains("http_requests "));
        let counters = m.counters();
        assert!(counters.contains(&("shed_connections", 2)));
        assert!(counters.contains(&("http_requests", 1)));
        assert!(counters.contains(&("idle_closed", 0)));
    }
}
