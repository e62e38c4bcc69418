//! The classic module options of a bind (`ip_restriction`,
//! `mutual_tls_cas`, `oauth`/`oidc`, …) as rules: one rule per module, in
//! a fixed order, between the operator's policy and the agent's. A module
//! is the action of the same name with the module's settings.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{
    Flow, RequestAction, RequestCx, Rule, TrafficPolicy, actions::restrict_ips::RestrictIps,
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
}

fn rule<A: ?Sized>(name: &str, action: Box<A>) -> Rule<A> {
    Rule {
        label: format!("module {name}"),
        when: Vec::new(),
        actions: vec![action],
    }
}

impl Modules {
    /// Appends the modules' rules to `policy`.
    pub(super) fn add_to(self, policy: &mut TrafficPolicy, http: bool) {
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
        if let Some(endpoint) = self.oauth.filter(|_| http) {
            request.push(rule("oauth", Box::new(OAuthLogin(endpoint))));
        }
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
