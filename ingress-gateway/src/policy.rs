//! Traffic Policy: ngrok's rule language as the one engine behind every
//! endpoint module.
//!
//! A policy is rules in three phases (`on_tcp_connect`, `on_http_request`,
//! `on_http_response`); a rule whose CEL expressions all hold runs its
//! actions in order; a terminating action (or a check that fails) ends the
//! phase with its answer. An endpoint's policy is built once, when it is
//! bound, from up to three sources in this order: the operator's policy for
//! the domain (which the agent cannot bypass), the classic modules the
//! agent asked for (IP restrictions, mutual TLS identity, OAuth/OIDC …,
//! translated into rules), and the agent's own `traffic_policy`. Requests
//! then only evaluate compiled expressions and run actions.
//!
//! Adding a module or an action is one file under `policy/actions/` and one
//! line in [`actions::ACTIONS`].

mod actions;
mod cel;
mod document;
mod facts;
mod fast;
mod modules;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use postern_proto::{ErrorCode, Failure};

pub(crate) use actions::rate_limit::LocalRates;

pub use actions::rate_limit::{RateStore, RedisRates};
pub use document::{Document, Phase};
pub use facts::{ConnFacts, EndpointFacts, TlsFacts};
pub use modules::Modules;

use crate::{
    http::{ProxyBody, VisitorBody},
    outcome::HttpRecord,
};
use cel::Expression;
pub(crate) use cel::Scratch;
use facts::{Facts, ReqView};

/// Where part of a policy came from, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The edge operator's policy for the domain.
    Operator,
    /// The bind's module options (`--basic-auth`, …).
    Modules,
    /// The agent's `traffic_policy`.
    Agent,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Operator => f.write_str("the operator's traffic policy for this domain"),
            Origin::Modules => f.write_str("the endpoint's module options"),
            Origin::Agent => f.write_str("the traffic policy"),
        }
    }
}

/// A policy that cannot be used, naming where.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{origin}: {}{reason}", if location.is_empty() { String::new() } else { format!("{location}: ") })]
pub struct PolicyError {
    pub origin: Origin,
    /// `on_http_request[1]` (the rule), `on_http_request[1].actions[0]
    /// (rate-limit)`, or `document`.
    pub location: String,
    pub reason: String,
}

impl PolicyError {
    pub fn failure(&self) -> Failure {
        let code = match self.origin {
            Origin::Modules => ErrorCode::INVALID_BIND,
            _ => ErrorCode::POLICY_INVALID,
        };
        Failure::new(code, self.to_string())
    }
}

/// What `on_tcp_connect` decided for a connection, and what it recorded.
pub(crate) struct ConnectVerdict {
    /// `Err` closes the connection.
    pub result: Result<(), Failure>,
    pub ip_decision: Option<postern_events::Decision>,
    pub logs: Vec<serde_json::Value>,
}

/// What an action decided.
pub(crate) enum Flow {
    /// Go on with the next action.
    Next,
    /// Answer the visitor with this and stop.
    Respond(Response<ProxyBody>),
    /// Close the connection without an answer.
    Close,
}

/// What the request phase works on.
pub(crate) struct RequestCx<'a> {
    pub req: &'a mut Request<VisitorBody>,
    pub conn: &'a ConnFacts,
    pub endpoint: &'a EndpointFacts,
    /// `https` or `http`.
    pub scheme: &'static str,
    /// The routed name.
    pub host: &'a str,
    pub record: &'a mut HttpRecord,
    pub scratch: &'a mut Scratch,
    /// Where `forward-internal` sends the request.
    pub internal: &'a dyn InternalRoutes,
}

/// The edge's internal endpoints (`*.internal`), as `forward-internal`
/// reaches them.
pub(crate) trait InternalRoutes: Send + Sync {
    /// Serves `req` on the internal endpoint named `host` (its own policy
    /// first); the request comes back with the failure when there is none.
    fn forward<'a>(
        &'a self,
        host: &'a str,
        req: Request<VisitorBody>,
        record: &'a mut HttpRecord,
    ) -> BoxFuture<'a, Result<Response<ProxyBody>, InternalMiss>>;
}

/// Why a request was not forwarded internally, with the request.
pub(crate) struct InternalMiss {
    pub failure: Failure,
    pub req: Request<VisitorBody>,
}

impl RequestCx<'_> {
    pub fn facts(&self) -> Facts<'_> {
        Facts {
            conn: self.conn,
            endpoint: self.endpoint,
            req: Some(ReqView::of(self.req, self.scheme, self.host)),
            res: None,
            scratch: self.scratch,
        }
    }
}

/// What the response phase works on.
pub(crate) struct ResponseCx<'a> {
    pub res: &'a mut Response<ProxyBody>,
    /// The request as it went upstream (head only).
    pub req: &'a Request<()>,
    pub conn: &'a ConnFacts,
    pub endpoint: &'a EndpointFacts,
    pub scheme: &'static str,
    pub host: &'a str,
    pub record: &'a mut HttpRecord,
    pub scratch: &'a mut Scratch,
}

impl ResponseCx<'_> {
    pub fn facts(&self) -> Facts<'_> {
        Facts {
            conn: self.conn,
            endpoint: self.endpoint,
            req: Some(ReqView::of(self.req, self.scheme, self.host)),
            res: Some((self.res.status(), self.res.headers())),
            scratch: self.scratch,
        }
    }
}

impl ConnectCx<'_> {
    pub fn facts(&self) -> Facts<'_> {
        Facts {
            conn: self.conn,
            endpoint: self.endpoint,
            req: None,
            res: None,
            scratch: self.scratch,
        }
    }
}

/// What the connect phase works on.
pub(crate) struct ConnectCx<'a> {
    pub conn: &'a ConnFacts,
    pub endpoint: &'a EndpointFacts,
    pub scratch: &'a mut Scratch,
    /// The IP restriction's verdict, for the event.
    pub ip_decision: &'a mut Option<postern_events::Decision>,
}

/// Told the status of the upstream's answer to a request it let through.
pub(crate) trait ResponseObserver: Send + Sync {
    fn observe(&self, status: http::StatusCode);
}

/// An action that runs in `on_tcp_connect`.
pub(crate) trait ConnectAction: Send + Sync {
    fn on_connect(&self, cx: &mut ConnectCx<'_>) -> Result<Flow, String>;
}

/// An action that runs in `on_http_request`.
pub(crate) trait RequestAction: Send + Sync {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>>;
}

/// An action that runs in `on_http_response`.
pub(crate) trait ResponseAction: Send + Sync {
    fn on_response(&self, cx: &mut ResponseCx<'_>) -> Result<Flow, String>;
}

struct Rule<A: ?Sized> {
    /// `on_http_request[2] "name"` of its origin, for logs.
    label: String,
    when: Vec<Expression>,
    actions: Vec<Box<A>>,
}

/// An endpoint's compiled policy. Empty when nothing was asked for.
#[derive(Default)]
pub struct TrafficPolicy {
    connect: Vec<Rule<dyn ConnectAction>>,
    request: Vec<Rule<dyn RequestAction>>,
    response: Vec<Rule<dyn ResponseAction>>,
}

impl std::fmt::Debug for TrafficPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrafficPolicy")
            .field("on_tcp_connect", &self.connect.len())
            .field("on_http_request", &self.request.len())
            .field("on_http_response", &self.response.len())
            .finish()
    }
}

/// What building a policy may use.
#[derive(Clone)]
pub struct PolicyEnv {
    /// The endpoint speaks HTTP (all three phases) or not (connect only).
    pub http: bool,
    /// Where rate limits count.
    pub(crate) rates: Arc<dyn RateStore>,
    /// The client for JWKS and other back-channel calls.
    pub(crate) http_client: crate::oauth::IdpHttp,
    /// The edge's OAuth (sessions, auth host), for `oauth` and
    /// `openid-connect`.
    pub(crate) oauth: Option<Arc<crate::oauth::OAuthService>>,
}

impl TrafficPolicy {
    /// Builds an endpoint's policy: the operator's rules, then the
    /// modules', then the agent's.
    pub fn build(
        operator: Option<Document>,
        modules: Modules,
        agent: Option<Document>,
        env: &PolicyEnv,
    ) -> Result<Arc<TrafficPolicy>, PolicyError> {
        let mut policy = TrafficPolicy::default();
        if let Some(doc) = operator {
            policy.add(Origin::Operator, doc, env)?;
        }
        modules
            .add_to(&mut policy, env)
            .map_err(|reason| PolicyError {
                origin: Origin::Modules,
                location: String::new(),
                reason,
            })?;
        if let Some(doc) = agent {
            policy.add(Origin::Agent, doc, env)?;
        }
        Ok(Arc::new(policy))
    }

    /// Whether the policy has rules in `phase`.
    pub fn has(&self, phase: Phase) -> bool {
        match phase {
            Phase::Connect => !self.connect.is_empty(),
            Phase::Request => !self.request.is_empty(),
            Phase::Response => !self.response.is_empty(),
        }
    }

    fn add(&mut self, origin: Origin, doc: Document, env: &PolicyEnv) -> Result<(), PolicyError> {
        for (phase, rules) in doc.phases(env.http) {
            if !env.http && phase != Phase::Connect && !rules.is_empty() {
                return Err(PolicyError {
                    origin,
                    location: phase.key().to_string(),
                    reason: "TCP and TLS endpoints have only on_tcp_connect".into(),
                });
            }
            for (i, raw) in rules.into_iter().enumerate() {
                let label = match &raw.name {
                    Some(name) => format!("{}[{i}] ({name:?})", phase.key()),
                    None => format!("{}[{i}]", phase.key()),
                };
                let error = |location: String, reason: String| PolicyError {
                    origin: origin.clone(),
                    location,
                    reason,
                };
                let when = raw
                    .expressions
                    .iter()
                    .enumerate()
                    .map(|(j, e)| {
                        Expression::compile(e, phase)
                            .map_err(|r| error(format!("{label}.expressions[{j}]"), r))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if raw.actions.is_empty() {
                    return Err(error(label, "a rule needs at least one action".into()));
                }
                let mut built = Vec::new();
                for (j, action) in raw.actions.iter().enumerate() {
                    let location = format!("{label}.actions[{j}] ({})", action.kind);
                    built.push(
                        actions::build(&action.kind, &action.config, phase, env)
                            .map_err(|r| error(location, r))?,
                    );
                }
                self.push(label, when, built);
            }
        }
        Ok(())
    }

    fn push(&mut self, label: String, when: Vec<Expression>, built: Vec<actions::Built>) {
        use actions::Built;
        // `actions::build` gives each action the phase it was asked for.
        match built.first() {
            Some(Built::Connect(_)) => self.connect.push(Rule {
                label,
                when,
                actions: built
                    .into_iter()
                    .filter_map(|b| match b {
                        Built::Connect(a) => Some(a),
                        _ => None,
                    })
                    .collect(),
            }),
            Some(Built::Request(_)) => self.request.push(Rule {
                label,
                when,
                actions: built
                    .into_iter()
                    .filter_map(|b| match b {
                        Built::Request(a) => Some(a),
                        _ => None,
                    })
                    .collect(),
            }),
            Some(Built::Response(_)) => self.response.push(Rule {
                label,
                when,
                actions: built
                    .into_iter()
                    .filter_map(|b| match b {
                        Built::Response(a) => Some(a),
                        _ => None,
                    })
                    .collect(),
            }),
            None => {}
        }
    }

    /// Runs `on_tcp_connect` for a connection to a TCP or TLS endpoint.
    pub(crate) fn on_connect(&self, conn: &ConnFacts, endpoint: &EndpointFacts) -> ConnectVerdict {
        let mut scratch = Scratch::default();
        let mut ip_decision = None;
        let mut cx = ConnectCx {
            conn,
            endpoint,
            scratch: &mut scratch,
            ip_decision: &mut ip_decision,
        };
        let result = match self.connect(&mut cx) {
            Ok(true) => Ok(()),
            Ok(false) if ip_decision == Some(postern_events::Decision::Block) => Err(Failure::new(
                ErrorCode::IP_RESTRICTED,
                conn.client.ip().to_string(),
            )),
            Ok(false) => Err(Failure::new(
                ErrorCode::POLICY_DENIED,
                "on_tcp_connect closed the connection",
            )),
            Err(failure) => Err(failure),
        };
        ConnectVerdict {
            result,
            ip_decision,
            logs: scratch.logs,
        }
    }

    /// Runs `on_tcp_connect`: `Ok(true)` to go on, `Ok(false)` to close.
    fn connect(&self, cx: &mut ConnectCx<'_>) -> Result<bool, Failure> {
        for rule in &self.connect {
            if !holds(&rule.label, &rule.when, &cx.facts())? {
                continue;
            }
            for action in &rule.actions {
                match action.on_connect(cx).map_err(|e| failed(&rule.label, e))? {
                    Flow::Next => {}
                    Flow::Respond(_) | Flow::Close => return Ok(false),
                }
            }
        }
        Ok(true)
    }

    /// Whether the policy has no rule at all.
    pub fn is_empty(&self) -> bool {
        self.connect.is_empty() && self.request.is_empty() && self.response.is_empty()
    }

    /// Runs an HTTP endpoint's `on_tcp_connect` rules (for each request:
    /// connections are routed by request) and `on_http_request`: `None`
    /// to forward the (possibly changed) request, or what the visitor gets
    /// instead. A closed connection is a `403` page with `Connection:
    /// close`.
    pub(crate) async fn on_request(
        &self,
        cx: &mut RequestCx<'_>,
    ) -> Result<Option<Response<ProxyBody>>, Failure> {
        if !self.connect.is_empty() {
            let mut ip_decision = None;
            let mut connect = ConnectCx {
                conn: cx.conn,
                endpoint: cx.endpoint,
                scratch: cx.scratch,
                ip_decision: &mut ip_decision,
            };
            let go_on = self.connect(&mut connect);
            if let Some(decision) = ip_decision {
                cx.record.ip_decision(decision);
            }
            if !go_on? {
                return Ok(Some(closed()));
            }
        }
        for rule in &self.request {
            if !holds(&rule.label, &rule.when, &cx.facts())? {
                continue;
            }
            for action in &rule.actions {
                match action
                    .on_request(cx)
                    .await
                    .map_err(|e| failed(&rule.label, e))?
                {
                    Flow::Next => {}
                    Flow::Respond(response) => return Ok(Some(response)),
                    Flow::Close => return Ok(Some(closed())),
                }
            }
        }
        Ok(None)
    }

    /// Runs `on_http_response` on the upstream's (or an earlier action's)
    /// response.
    pub(crate) fn on_response(&self, cx: &mut ResponseCx<'_>) -> Result<(), Failure> {
        for rule in &self.response {
            if !holds(&rule.label, &rule.when, &cx.facts())? {
                continue;
            }
            for action in &rule.actions {
                match action.on_response(cx).map_err(|e| failed(&rule.label, e))? {
                    Flow::Next => {}
                    Flow::Respond(replacement) => {
                        *cx.res = replacement;
                        return Ok(());
                    }
                    Flow::Close => return Ok(()),
                }
            }
        }
        Ok(())
    }
}

/// What an HTTP visitor gets for a connection a policy closed.
fn closed() -> Response<ProxyBody> {
    crate::http::close_after(crate::http::error_response(&Failure::new(
        ErrorCode::POLICY_DENIED,
        "the traffic policy closed the connection",
    )))
}

fn holds(label: &str, when: &[Expression], facts: &Facts<'_>) -> Result<bool, Failure> {
    for expression in when {
        if !expression.holds(facts).map_err(|e| failed(label, e))? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A rule that failed while running: the visitor gets a 500 and the log
/// says which rule and why (fail closed: a broken rule never lets through
/// what it was written to stop).
fn failed(label: &str, reason: String) -> Failure {
    tracing::warn!(rule = label, %reason, "traffic policy failed");
    Failure::new(ErrorCode::POLICY_FAILED, format!("{label}: {reason}"))
}

/// A body with nothing in it.
pub(crate) fn empty_body() -> ProxyBody {
    use http_body_util::{BodyExt, Empty};
    Empty::new()
        .map_err(|never: std::convert::Infallible| match never {})
        .boxed()
}

/// A plain response with `status`, `body` and headers.
pub(crate) fn respond(
    status: http::StatusCode,
    headers: impl IntoIterator<Item = (http::HeaderName, http::HeaderValue)>,
    body: Bytes,
) -> Response<ProxyBody> {
    use http_body_util::{BodyExt, Full};
    let mut response = Response::new(
        Full::new(body)
            .map_err(|never: std::convert::Infallible| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().extend(headers);
    response
}
