//! The classic module options of a bind (`ip_restriction`,
//! `mutual_tls_cas`, `oauth`/`oidc`, …) as rules: one rule per module, in
//! a fixed order, between the operator's policy and the agent's. A module
//! is the action of the same name with the module's settings.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use postern_events::Decision;
use postern_proto::pb;

use super::{
    Flow, Phase, PolicyEnv, RequestAction, RequestCx, ResponseAction, ResponseCx, Rule,
    TrafficPolicy,
    actions::{self, Built, basic_auth::BasicAuth, restrict_ips::RestrictIps},
    facts::ReqView,
};
use crate::{
    mtls::ClientIdentity,
    oauth::{Gate, OAuthEndpoint},
};
use postern_net::{IpPolicy, MtlsPolicy};
use postern_proto::{ErrorCode, Failure};

/// What a bind asked for besides its traffic policy.
#[derive(Default)]
pub struct Modules {
    /// `ip_restriction`: on HTTP endpoints per request (403), on TCP and TLS
    /// endpoints when the connection opens (closed).
    pub ip_restriction: Option<IpPolicy>,
    /// `mutual_tls_cas`: the handshake requires the certificate (see the
    /// gateway's TLS termination); per request this names the verified
    /// client to the upstream and the event.
    pub mutual_tls: Option<Arc<MtlsPolicy>>,
    /// `oauth` / `oidc`: login at the edge.
    pub oauth: Option<Arc<OAuthEndpoint>>,
    /// ngrok's other HTTP modules (basic auth, headers, compression, …).
    pub http: Option<pb::HttpModules>,
}

fn rule<A: ?Sized>(name: &str, action: Box<A>) -> Rule<A> {
    Rule {
        label: format!("module {name}"),
        when: Vec::new(),
        actions: vec![action],
    }
}

impl Modules {
    /// Appends the modules' rules to `policy`; a module option that cannot
    /// be used is named in the error.
    pub(super) fn add_to(self, policy: &mut TrafficPolicy, env: &PolicyEnv) -> Result<(), String> {
        let http = env.http;
        if let Some(modules) = &self.http
            && !http
            && modules != &pb::HttpModules::default()
        {
            return Err("the HTTP modules are for HTTP endpoints".into());
        }
        let modules = self.http.unwrap_or_default();
        let (connect, request) = (&mut policy.connect, &mut policy.request);
        if let Some(policy) = self.ip_restriction {
            let action = RestrictIps {
                policy,
                enforce: true,
            };
            if http {
                request.push(rule("ip_restriction", Box::new(action)));
            } else {
                connect.push(rule("ip_restriction", Box::new(action)));
            }
        }
        if let Some(policy) = self.mutual_tls.filter(|_| http) {
            request.push(rule("mutual_tls_cas", Box::new(ClientCertificate(policy))));
        }
        if !modules.basic_auth.is_empty() {
            let credentials: Vec<(String, String)> = modules
                .basic_auth
                .iter()
                .map(|c| (c.username.clone(), c.password_sha256.clone()))
                .collect();
            request.push(rule(
                "basic_auth",
                Box::new(BasicAuth::from_module(&credentials)?),
            ));
        }
        if let Some(endpoint) = self.oauth.filter(|_| http) {
            request.push(rule("oauth", Box::new(OAuthLogin(endpoint))));
        }
        if let Some(filter) = modules
            .user_agent_filter
            .as_ref()
            .filter(|f| !(f.allow.is_empty() && f.deny.is_empty()))
        {
            request.push(rule(
                "user_agent_filter",
                Box::new(UserAgentFilter::new(filter)?),
            ));
        }
        if let Some(verify) = &modules.verify_webhook {
            let action = built_request(
                "verify-webhook",
                serde_json::json!({"provider": verify.provider, "secret": verify.secret}),
                env,
            )
            .map_err(|e| format!("verify_webhook: {}", e.trim_start_matches("config.")))?;
            request.push(rule("verify_webhook", action));
        }
        if modules.circuit_breaker != 0.0 {
            let action = built_request(
                "circuit-breaker",
                serde_json::json!({"error_threshold": modules.circuit_breaker, "volume_threshold": 20}),
                env,
            )
            .map_err(|e| format!("circuit_breaker: {}", e.trim_start_matches("config.error_threshold: ")))?;
            request.push(rule("circuit_breaker", action));
        }
        header_edits(
            policy,
            "request_header",
            modules.request_headers.as_ref(),
            Phase::Request,
            env,
        )?;
        match modules.host_header.as_str() {
            "" | "preserve" => {}
            "rewrite" => {
                return Err("host_header: the agent sends the upstream's host for rewrite".into());
            }
            host => {
                let action = built_request(
                    "add-headers",
                    serde_json::json!({"headers": {"host": host}}),
                    env,
                )
                .map_err(|e| format!("host_header: {e}"))?;
                policy.request.push(rule("host_header", action));
                policy.response.push(rule(
                    "host_header",
                    Box::new(LocationBack(host.to_string())),
                ));
            }
        }
        header_edits(
            policy,
            "response_header",
            modules.response_headers.as_ref(),
            Phase::Response,
            env,
        )?;
        if modules.compression {
            let Built::Response(action) = actions::build(
                "compress-response",
                &serde_json::Value::Null,
                Phase::Response,
                env,
            )?
            else {
                unreachable!("compress-response runs in on_http_response")
            };
            policy.response.push(rule("compression", action));
        }
        Ok(())
    }
}

/// A request-phase action built from its Traffic Policy config.
fn built_request(
    kind: &str,
    config: serde_json::Value,
    env: &PolicyEnv,
) -> Result<Box<dyn RequestAction>, String> {
    match actions::build(kind, &config, Phase::Request, env)? {
        Built::Request(action) => Ok(action),
        _ => unreachable!("{kind} was built for on_http_request"),
    }
}

/// `request_header` / `response_header`: `remove` then `add` (ngrok's
/// `name: value` lines), as the `remove-headers` and `add-headers` actions.
fn header_edits(
    policy: &mut TrafficPolicy,
    module: &str,
    edits: Option<&pb::HeaderEdits>,
    phase: Phase,
    env: &PolicyEnv,
) -> Result<(), String> {
    let Some(edits) = edits else { return Ok(()) };
    let mut push = |kind: &str, config: serde_json::Value| -> Result<(), String> {
        let label = format!("module {module}");
        match actions::build(kind, &config, phase, env)
            .map_err(|e| format!("{module}: {}", e.trim_start_matches("config.")))?
        {
            Built::Request(action) => policy.request.push(Rule {
                label,
                when: Vec::new(),
                actions: vec![action],
            }),
            Built::Response(action) => policy.response.push(Rule {
                label,
                when: Vec::new(),
                actions: vec![action],
            }),
            Built::Connect(_) => unreachable!("header edits are HTTP actions"),
        }
        Ok(())
    };
    if !edits.remove.is_empty() {
        push(
            "remove-headers",
            serde_json::json!({"headers": edits.remove}),
        )?;
    }
    if !edits.add.is_empty() {
        let mut headers = serde_json::Map::new();
        for (i, line) in edits.add.iter().enumerate() {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| format!("{module}.add[{i}]: {line:?} is not \"name: value\""))?;
            headers.insert(
                name.trim().to_string(),
                serde_json::Value::from(value.trim()),
            );
        }
        push("add-headers", serde_json::json!({"headers": headers}))?;
    }
    Ok(())
}

/// `user_agent_filter`: a request passes when its (first) `User-Agent`
/// matches an `allow` regex, or matches no `deny` regex; otherwise
/// `403 ERR_POSTERN_3211`. The verdict goes to the event's
/// `user_agent_filter.decision`.
struct UserAgentFilter {
    allow: Vec<regex::Regex>,
    deny: Vec<regex::Regex>,
}

impl UserAgentFilter {
    fn new(filter: &pb::UserAgentFilter) -> Result<UserAgentFilter, String> {
        let compile = |list: &[String], key: &str| {
            list.iter()
                .enumerate()
                .map(|(i, r)| {
                    regex::Regex::new(r).map_err(|e| {
                        format!("user_agent_filter.{key}[{i}]: {r:?} is not a regex: {e}")
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(UserAgentFilter {
            allow: compile(&filter.allow, "allow")?,
            deny: compile(&filter.deny, "deny")?,
        })
    }

    fn allows(&self, agent: &str) -> bool {
        self.allow.iter().any(|r| r.is_match(agent)) || !self.deny.iter().any(|r| r.is_match(agent))
    }
}

impl RequestAction for UserAgentFilter {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        let agent = cx
            .req
            .headers()
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let allowed = self.allows(agent);
        cx.record.user_agent_filter(if allowed {
            Decision::Allow
        } else {
            Decision::Block
        });
        let flow = if allowed {
            Flow::Next
        } else {
            Flow::Respond(crate::http::error_response(&Failure::new(
                ErrorCode::USER_AGENT_DENIED,
                agent.to_string(),
            )))
        };
        Box::pin(async move { Ok(flow) })
    }
}

/// With `host_header` set, a `Location` the upstream writes for its own
/// host goes back to the endpoint's name, as ngrok does.
struct LocationBack(String);

impl ResponseAction for LocationBack {
    fn on_response(&self, cx: &mut ResponseCx<'_>) -> Result<Flow, String> {
        let location = cx
            .res
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        for scheme in ["http://", "https://"] {
            if let Some(rest) = location.strip_prefix(&format!("{scheme}{}", self.0)) {
                let public = format!(
                    "{}://{}{rest}",
                    cx.scheme,
                    ReqView::of(cx.req, cx.scheme, cx.host).authority
                );
                if let Ok(value) = http::HeaderValue::from_str(&public) {
                    cx.res.headers_mut().insert(http::header::LOCATION, value);
                }
                break;
            }
        }
        Ok(Flow::Next)
    }
}

/// Mutual TLS on HTTP endpoints: the verified client certificate goes to
/// the event and, as the `ngrok-mtls-*` headers, to the upstream. An
/// SNI-routed handshake already verified it; when the handshake had no SNI
/// (so no endpoint required the certificate yet) it is verified here.
struct ClientCertificate(Arc<MtlsPolicy>);

impl ClientCertificate {
    fn identity(&self, cx: &RequestCx<'_>) -> Result<ClientIdentity, Failure> {
        let required =
            |detail: &str| Failure::new(ErrorCode::MTLS_CERT_REQUIRED, detail.to_string());
        let tls = cx.conn.tls.as_ref();
        if let Some(verified) = tls.and_then(|t| t.client.clone()) {
            return Ok(verified);
        }
        let chain = tls
            .and_then(|t| t.peer_chain.as_ref())
            .filter(|c| !c.is_empty())
            .ok_or_else(|| required("no client certificate was presented"))?;
        if tls.is_some_and(|t| t.sni.is_none()) {
            let now = rustls::pki_types::UnixTime::now();
            self.0
                .verify(&chain[0], &chain[1..], now)
                .map_err(|e| required(&format!("the client certificate was refused: {e}")))?;
        }
        ClientIdentity::of(&chain[0])
            .ok_or_else(|| required("the client certificate cannot be read"))
    }
}

impl RequestAction for ClientCertificate {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        let flow = match self.identity(cx) {
            Ok(identity) => {
                cx.record.client_cert(&identity);
                insert_headers(cx, identity.headers());
                Flow::Next
            }
            Err(failure) => Flow::Respond(crate::http::error_response(&failure)),
        };
        Box::pin(async move { Ok(flow) })
    }
}

pub(super) fn insert_headers(cx: &mut RequestCx<'_>, headers: Vec<(&'static str, String)>) {
    for (name, value) in headers {
        if let Ok(value) = http::HeaderValue::from_str(&value) {
            cx.req.headers_mut().insert(name, value);
        }
    }
}

/// OAuth/OIDC: the module answers by itself (login, its paths, refusals)
/// or names the signed-in user to the upstream.
struct OAuthLogin(Arc<OAuthEndpoint>);

impl RequestAction for OAuthLogin {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        Box::pin(async move {
            let tls = cx.conn.tls.is_some();
            match self.0.gate(cx.req, tls, cx.host, cx.record).await {
                Gate::Respond(response) => Ok(Flow::Respond(response)),
                Gate::Forward(headers) => {
                    insert_headers(cx, headers);
                    Ok(Flow::Next)
                }
            }
        })
    }
}
