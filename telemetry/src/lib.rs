//! Logs and traces for both binaries. Log lines go to stderr as text (the
//! default) or one JSON object per line; when an OTLP endpoint is
//! configured ([`TraceSettings`], else `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), the spans of Postern's crates are
//! also exported over OTLP/gRPC (plain `http://`: a collector next to the
//! node), honouring the standard `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`(`_ARG`) and
//! `OTEL_BSP_*` variables. W3C trace context (`traceparent`, `tracestate`)
//! is read from and written to HTTP headers here, so that the edge, the
//! agent and the upstream share one trace.
//!
//! This crate knows nothing of tunnels, endpoints or sessions.

use std::{collections::HashMap, str::FromStr};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use serde::Deserialize;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{FilterExt, LevelFilter, Targets},
    layer::SubscriberExt,
    util::SubscriberInitExt,
};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`,
    /// and, when the filter lets debug lines through, the enclosing spans
    /// with their fields).
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?}: use text or json")),
        }
    }
}

/// Trace export settings from a config file; each one left out falls back
/// to the standard `OTEL_*` variable.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTraceSettings {
    /// OTLP/gRPC collector, `http://host:4317`. Default:
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_ENDPOINT`;
    /// neither set: no export.
    pub otlp_endpoint: Option<String>,
    /// `service.name`. Default: `OTEL_SERVICE_NAME`, else the binary's.
    pub service_name: Option<String>,
    /// Share of new traces recorded, 0.0 to 1.0; a trace the client
    /// started follows the client's sampled flag. Default:
    /// `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`, else 1.0.
    pub sample_ratio: Option<f64>,
}

/// Validated [`RawTraceSettings`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TraceSettings {
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
    pub sample_ratio: Option<f64>,
}

/// Trace settings with a bad value, or logs and traces that could not be
/// set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A setting with a bad value; the message names its key.
    #[error("{key}: {reason}")]
    Setting { key: &'static str, reason: String },
    #[error("the OTLP exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    #[error("installing the log subscriber")]
    Subscriber(#[source] tracing_subscriber::util::TryInitError),
}

impl RawTraceSettings {
    /// Checks the values; errors name the key.
    pub fn validate(self) -> Result<TraceSettings, TelemetryError> {
        let setting = |key, reason| Err(TelemetryError::Setting { key, reason });
        if let Some(endpoint) = &self.otlp_endpoint {
            let uri: http::Uri = match endpoint.parse() {
                Ok(uri) => uri,
                Err(e) => return setting("otlp_endpoint", format!("{endpoint:?}: {e}")),
            };
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                return setting(
                    "otlp_endpoint",
                    format!("{endpoint:?}: give http://host:port (OTLP over gRPC without TLS)"),
                );
            }
        }
        if let Some(ratio) = self.sample_ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            return setting(
                "sample_ratio",
                format!("{ratio} is not between 0.0 and 1.0"),
            );
        }
        if let Some(name) = &self.service_name
            && name.trim().is_empty()
        {
            return setting("service_name", "empty".into());
        }
        Ok(TraceSettings {
            otlp_endpoint: self.otlp_endpoint,
            service_name: self.service_name,
            sample_ratio: self.sample_ratio,
        })
    }
}

/// The installed logging and tracing; [`Telemetry::shutdown`] sends the
/// spans still buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Whether an OTLP endpoint is configured.
fn otlp_configured(settings: &TraceSettings) -> bool {
    settings.otlp_endpoint.is_some()
        || [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ]
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|v| !v.trim().is_empty()))
}

/// The configured `service.name`, else the one `OTEL_SERVICE_NAME` or
/// `OTEL_RESOURCE_ATTRIBUTES` gives, else `default_service`.
fn resource(settings: &TraceSettings, default_service: &'static str) -> Resource {
    let builder = Resource::builder();
    if let Some(name) = &settings.service_name {
        return builder.with_service_name(name.clone()).build();
    }
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
            v.split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    if named {
        builder.build()
    } else {
        builder.with_service_name(default_service).build()
    }
}

impl Telemetry {
    /// Installs the global subscriber. `default_filter` applies to log
    /// lines when `RUST_LOG` is unset; exported spans are those of
    /// `postern*` targets at INFO and above, whatever the log filter. Must
    /// run inside a Tokio runtime when OTLP is configured.
    pub fn init(
        default_service: &'static str,
        default_filter: &str,
        format: LogFormat,
        settings: &TraceSettings,
    ) -> Result<Telemetry, TelemetryError> {
        let filter =
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
        // Log lines carry the spans they happen in only when the filter
        // lets debug lines through: otherwise the log layer would format
        // the fields of every request's and connection's span for the
        // rare line logged inside one, a cost paid on every request.
        let spans_in_logs = filter
            .max_level_hint()
            .is_none_or(|max| max >= LevelFilter::DEBUG);
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let fmt = match format {
            LogFormat::Text => fmt.boxed(),
            LogFormat::Json => fmt.json().boxed(),
        }
        .with_filter(filter.and((!spans_in_logs).then_some(NoSpans)));
        let provider = if otlp_configured(settings) {
            let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(endpoint) = &settings.otlp_endpoint {
                exporter = exporter.with_endpoint(endpoint.clone());
            }
            let exporter = exporter.build().map_err(TelemetryError::Exporter)?;
            let mut provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource(settings, default_service));
            if let Some(ratio) = settings.sample_ratio {
                provider = provider.with_sampler(Sampler::ParentBased(Box::new(
                    Sampler::TraceIdRatioBased(ratio),
                )));
            }
            Some(provider.build())
        } else {
            None
        };
        let otel = provider.as_ref().map(|provider| {
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("postern"))
                .with_filter(Targets::new().with_target("postern", tracing::Level::INFO))
        });
        // Without OTLP the export layer is left out rather than added as
        // `None`: an absent optional layer declares interest in every
        // span, and the registry would then build and drop the spans of
        // every request that nothing reads.
        let registry = tracing_subscriber::registry().with(fmt);
        match otel {
            Some(otel) => registry.with(otel).try_init(),
            None => registry.try_init(),
        }
        .map_err(TelemetryError::Subscriber)?;
        if provider.is_some() {
            tracing::info!("exporting traces over OTLP");
        }
        Ok(Telemetry { provider })
    }

    /// Exports the spans still buffered (bounded by the exporter's
    /// timeout) and stops the exporter.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = flushed {
            eprintln!("WARN: exporting the last traces: {e}");
        }
    }
}

/// Lets every event through and no span. Decided per call site, once, so
/// call sites the log filter turns off stay off without a check per call.
struct NoSpans;

impl<S> tracing_subscriber::layer::Filter<S> for NoSpans {
    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        !meta.is_span()
    }

    fn callsite_enabled(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if meta.is_span() {
            tracing::subscriber::Interest::never()
        } else {
            tracing::subscriber::Interest::always()
        }
    }
}

struct HeaderReader<'a>(&'a HeaderMap);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderWriter<'a>(&'a mut HeaderMap);

impl Injector for HeaderWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Makes `span` a child of the W3C trace context in `headers`, if any.
/// Call it right after creating the span, before it is entered. Malformed
/// headers are ignored (the span starts a trace of its own).
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if span.is_disabled() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderReader(headers));
    // Fails only when no trace layer is installed or the span is disabled:
    // then there is nothing to continue.
    let _ = span.set_parent(parent);
}

/// Writes `span`'s trace context into `headers` (`traceparent`, and
/// `tracestate` when there is one), replacing what was there. Without an
/// exporter the headers are left as they came, so a client's trace context
/// still reaches the upstream.
pub fn inject_trace(span: &tracing::Span, headers: &mut HeaderMap) {
    if span.is_disabled() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderWriter(headers));
}

/// `span`'s W3C `traceparent`, for a carrier other than HTTP headers (the
/// tunnel's `StreamOpen`); `None` when nothing is traced.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of a W3C `traceparent` value; empty or malformed
/// values are ignored.
pub fn continue_traceparent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let _ = span.set_parent(TraceContextPropagator::new().extract(&carrier));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let raw = |endpoint: &str, ratio: f64| RawTraceSettings {
            otlp_endpoint: Some(endpoint.to_string()),
            service_name: None,
            sample_ratio: Some(ratio),
        };
        assert!(raw("http://collector:4317", 0.25).validate().is_ok());
        let e = raw("https://collector:4317", 0.5).validate().unwrap_err();
        assert!(e.to_string().starts_with("otlp_endpoint:"), "{e}");
        let e = raw("http://collector:4317", 1.5).validate().unwrap_err();
        assert!(e.to_string().starts_with("sample_ratio:"), "{e}");
        let e = raw("not a uri", 0.5).validate().unwrap_err();
        assert!(e.to_string().starts_with("otlp_endpoint:"), "{e}");
    }

    #[test]
    fn log_formats_parse() {
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert!("xml".parse::<LogFormat>().is_err());
    }

    #[test]
    fn a_trace_is_continued_and_written_back() {
        use opentelemetry::trace::TraceContextExt;
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let mut headers = HeaderMap::new();
            headers.insert(
                "traceparent",
                HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            );
            let span = tracing::info_span!("request");
            continue_trace(&span, &headers);
            inject_trace(&span, &mut headers);
            let value = headers["traceparent"].to_str().unwrap().to_string();
            assert!(
                value.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{value}"
            );
            assert!(
                !value.contains("00f067aa0ba902b7"),
                "a new span id: {value}"
            );
            let cx = span.context();
            assert_eq!(
                cx.span().span_context().trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            // Through a plain traceparent value (the tunnel's StreamOpen).
            let carried = traceparent(&span).expect("traced");
            let next = tracing::info_span!("stream");
            continue_traceparent(&next, &carried);
            assert!(
                traceparent(&next)
                    .unwrap()
                    .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
            );
            // Garbage starts a trace of its own instead of failing.
            let mut bad = HeaderMap::new();
            bad.insert("traceparent", HeaderValue::from_static("zz-nonsense"));
            let span = tracing::info_span!("request");
            continue_trace(&span, &bad);
            inject_trace(&span, &mut bad);
            let value = bad["traceparent"].to_str().unwrap();
            assert!(value.starts_with("00-") && value.len() == 55, "{value}");
        });
    }

    #[test]
    fn without_a_trace_layer_headers_pass_unchanged() {
        let mut headers = HeaderMap::new();
        let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert("traceparent", HeaderValue::from_static(client));
        let span = tracing::info_span!("request");
        continue_trace(&span, &headers);
        inject_trace(&span, &mut headers);
        assert_eq!(headers["traceparent"], client);
        assert_eq!(traceparent(&span), None);
    }
}
