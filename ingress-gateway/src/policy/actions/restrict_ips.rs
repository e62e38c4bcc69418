//! `restrict-ips`: lets a visitor through only when its address (the TCP
//! peer, or what a trusted load balancer said; never `X-Forwarded-For`
//! from the visitor) is in some `allow` CIDR and in no `deny` CIDR. HTTP
//! visitors refused get `403 ERR_POSTERN_3205`; TCP and TLS connections
//! are closed. The verdict goes to the event's `ip_policy.decision`.

use futures_util::future::BoxFuture;
use postern_events::Decision;
use postern_proto::{ErrorCode, Failure};
use serde::Deserialize;

use super::{Built, config};
use postern_net::IpPolicy;

use crate::policy::{
    ConnectAction, ConnectCx, Flow, Phase, PolicyEnv, RequestAction, RequestCx, ResponseAction,
    ResponseCx, cel::map_value,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default = "yes")]
    enforce: bool,
    #[serde(default)]
    ip_policies: Vec<String>,
}

fn yes() -> bool {
    true
}

pub(crate) struct RestrictIps {
    pub policy: IpPolicy,
    pub enforce: bool,
}

pub(super) fn build(
    value: &serde_json::Value,
    phase: Phase,
    _: &PolicyEnv,
) -> Result<Built, String> {
    let cfg: Config = config(value)?;
    if !cfg.ip_policies.is_empty() {
        return Err("config.ip_policies: ngrok's IP policy objects are not supported by Postern; list the CIDRs in allow and deny".into());
    }
    if cfg.allow.is_empty() && cfg.deny.is_empty() {
        return Err("config: allow or deny needs at least one CIDR".into());
    }
    let policy = IpPolicy::parse(&cfg.allow, &cfg.deny).map_err(|e| format!("config.{e}"))?;
    let action = RestrictIps {
        policy,
        enforce: cfg.enforce,
    };
    Ok(match phase {
        Phase::Connect => Built::Connect(Box::new(action)),
        Phase::Request => Built::Request(Box::new(action)),
        Phase::Response => Built::Response(Box::new(action)),
    })
}

impl RestrictIps {
    /// The verdict, and `actions.ngrok.restrict_ips`.
    fn decide(&self, client: std::net::IpAddr) -> (Decision, cel::Value) {
        let allowed = self.policy.allows(client);
        let decision = if allowed || !self.enforce {
            Decision::Allow
        } else {
            Decision::Block
        };
        let result = map_value([(
            "action",
            cel::Value::from(if allowed { "allow" } else { "deny" }),
        )]);
        (decision, result)
    }

    fn refused(client: std::net::IpAddr) -> Flow {
        Flow::Respond(crate::http::error_response(&Failure::new(
            ErrorCode::IP_RESTRICTED,
            client.to_string(),
        )))
    }
}

impl ConnectAction for RestrictIps {
    fn on_connect(&self, cx: &mut ConnectCx<'_>) -> Result<Flow, String> {
        let (decision, result) = self.decide(cx.conn.client.ip());
        cx.scratch.actions.insert("restrict_ips", result);
        *cx.ip_decision = Some(decision);
        Ok(match decision {
            Decision::Allow => Flow::Next,
            Decision::Block => Flow::Close,
        })
    }
}

impl RequestAction for RestrictIps {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        let client = cx.conn.client.ip();
        let (decision, result) = self.decide(client);
        cx.scratch.actions.insert("restrict_ips", result);
        cx.record.ip_decision(decision);
        Box::pin(async move {
            Ok(match decision {
                Decision::Allow => Flow::Next,
                Decision::Block => Self::refused(client),
            })
        })
    }
}

impl ResponseAction for RestrictIps {
    fn on_response(&self, cx: &mut ResponseCx<'_>) -> Result<Flow, String> {
        let client = cx.conn.client.ip();
        let (decision, result) = self.decide(client);
        cx.scratch.actions.insert("restrict_ips", result);
        cx.record.ip_decision(decision);
        Ok(match decision {
            Decision::Allow => Flow::Next,
            Decision::Block => Self::refused(client),
        })
    }
}
