//! The actions a rule may run, one file each, and the table that names
//! them with the phases they run in. Each builder checks its config when
//! the policy is built (unknown keys and bad values are refused, naming
//! them) and returns the action for the phase asked for.

pub(super) mod basic_auth;
mod circuit_breaker;
mod compress;
mod custom_response;
mod deny;
mod forward_internal;
mod headers;
mod jwt_validation;
mod log;
mod oauth;
pub(super) mod rate_limit;
mod redirect;
pub(super) mod restrict_ips;
mod set_vars;
mod values;
mod verify_webhook;

use std::time::Duration;

use serde::de::DeserializeOwned;

use futures_util::future::BoxFuture;

use super::{
    ConnectAction, ConnectCx, Flow, Phase, PolicyEnv, RequestAction, RequestCx, ResponseAction,
    ResponseCx, cel::Scratch, facts::Facts,
};
use Phase::{Connect, Request, Response};

/// An action that reads what the policy knows and writes only its scratch
/// (variables, logs): the same in every phase.
trait ScratchAction: Send + Sync + 'static {
    type Out: Send;
    fn compute(&self, facts: &Facts<'_>) -> Result<Self::Out, String>;
    fn store(out: Self::Out, scratch: &mut Scratch) -> Flow;

    /// The action for `phase`.
    fn built(self, phase: Phase) -> Built
    where
        Self: Sized,
    {
        match phase {
            Phase::Connect => Built::Connect(Box::new(self)),
            Phase::Request => Built::Request(Box::new(self)),
            Phase::Response => Built::Response(Box::new(self)),
        }
    }
}

impl<T: ScratchAction> ConnectAction for T {
    fn on_connect(&self, cx: &mut ConnectCx<'_>) -> Result<Flow, String> {
        let out = self.compute(&cx.facts())?;
        Ok(T::store(out, cx.scratch))
    }
}

impl<T: ScratchAction> RequestAction for T {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        let result = self
            .compute(&cx.facts())
            .map(|out| T::store(out, cx.scratch));
        Box::pin(async move { result })
    }
}

impl<T: ScratchAction> ResponseAction for T {
    fn on_response(&self, cx: &mut ResponseCx<'_>) -> Result<Flow, String> {
        let out = self.compute(&cx.facts())?;
        Ok(T::store(out, cx.scratch))
    }
}

/// An action built for one phase.
pub(crate) enum Built {
    Connect(Box<dyn ConnectAction>),
    Request(Box<dyn RequestAction>),
    Response(Box<dyn ResponseAction>),
}

type Builder = fn(&serde_json::Value, Phase, &PolicyEnv) -> Result<Built, String>;

/// Every action Postern runs: its type, the phases it runs in, its builder.
/// A new action is a file in `actions/` and one line here.
pub(crate) const ACTIONS: &[(&str, &[Phase], Builder)] = &[
    ("add-headers", &[Request, Response], headers::add),
    ("remove-headers", &[Request, Response], headers::remove),
    ("deny", &[Connect, Request], deny::deny),
    ("close-connection", &[Connect, Request], deny::close),
    (
        "custom-response",
        &[Request, Response],
        custom_response::build,
    ),
    ("set-vars", &[Connect, Request, Response], set_vars::build),
    ("log", &[Connect, Request, Response], log::build),
    ("redirect", &[Request], redirect::redirect),
    ("url-rewrite", &[Request], redirect::rewrite),
    (
        "restrict-ips",
        &[Connect, Request, Response],
        restrict_ips::build,
    ),
    ("basic-auth", &[Request], basic_auth::build),
    ("circuit-breaker", &[Request], circuit_breaker::build),
    ("compress-response", &[Response], compress::build),
    ("verify-webhook", &[Request], verify_webhook::build),
    ("rate-limit", &[Request], rate_limit::build),
    ("jwt-validation", &[Request], jwt_validation::build),
    ("forward-internal", &[Request], forward_internal::build),
    ("oauth", &[Request], oauth::oauth),
    ("openid-connect", &[Request], oauth::openid_connect),
];

/// ngrok's actions that Postern does not run; a policy naming one is
/// refused rather than half-applied.
const NOT_SUPPORTED: &[&str] = &[
    "http-request",
    "terminate-tls",
    "owasp-crs-request",
    "owasp-crs-response",
    "request-body-find-replace",
    "response-body-find-replace",
    "sse-find-replace",
    "ai-gateway",
    "saml",
];

/// Builds action `kind` for `phase`.
pub(crate) fn build(
    kind: &str,
    config: &serde_json::Value,
    phase: Phase,
    env: &PolicyEnv,
) -> Result<Built, String> {
    let Some((_, phases, builder)) = ACTIONS.iter().find(|(name, _, _)| *name == kind) else {
        return Err(if NOT_SUPPORTED.contains(&kind) {
            format!("the action {kind} is not supported by Postern")
        } else {
            format!("unknown action type {kind:?}")
        });
    };
    if !phases.contains(&phase) {
        let runs_in: Vec<&str> = phases.iter().map(|p| p.key()).collect();
        return Err(format!(
            "{kind} does not run in {}; it runs in {}",
            phase.key(),
            runs_in.join(", ")
        ));
    }
    builder(config, phase, env)
}

/// An action's config as its type; a missing config is an empty one.
fn config<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, String> {
    let value = match value {
        serde_json::Value::Null => serde_json::Value::Object(Default::default()),
        other => other.clone(),
    };
    serde_json::from_value(value).map_err(|e| format!("config: {e}"))
}

/// A duration as ngrok writes them (`500ms`, `10s`, `2m`, `24h`), or
/// `default` when absent.
fn duration(key: &str, text: Option<&str>, default: Duration) -> Result<Duration, String> {
    let Some(text) = text else {
        return Ok(default);
    };
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("config.{key}: {text:?} is not a duration like 10s or 2m"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => {
            return Err(format!(
                "config.{key}: {text:?} is not a duration like 10s or 2m"
            ));
        }
    };
    Ok(Duration::from_secs_f64(seconds))
}

/// Refuses a list longer than `max`.
fn at_most<T>(what: &str, items: &[T], max: usize) -> Result<(), String> {
    if items.len() > max {
        return Err(format!(
            "config.{what}: at most {max} entries, not {}",
            items.len()
        ));
    }
    Ok(())
}
