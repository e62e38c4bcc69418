//! `forward-internal`: serves the request on one of the edge's internal
//! endpoints (an HTTP endpoint bound on a `.internal` name, which no
//! listener routes to), running that endpoint's own policy first. The
//! `Host` header keeps the public name. Without such an endpoint (or past
//! three internal hops, a loop) the visitor gets the error, unless
//! `on_error: continue`, which goes on with the next rule.

use futures_util::future::BoxFuture;
use serde::Deserialize;

use super::{Built, config};
use crate::{
    http::{VisitorBody, error_response},
    policy::{Flow, Phase, PolicyEnv, RequestAction, RequestCx, cel::Template},
    router::normalize_host,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    url: String,
    #[serde(default)]
    on_error: Option<String>,
}

struct ForwardInternal {
    url: Template,
    keep_going: bool,
}

pub(super) fn build(
    value: &serde_json::Value,
    phase: Phase,
    _: &PolicyEnv,
) -> Result<Built, String> {
    let cfg: Config = config(value)?;
    let keep_going = match cfg.on_error.as_deref() {
        None | Some("halt") => false,
        Some("continue") => true,
        Some(other) => return Err(format!("config.on_error: {other:?} is halt or continue")),
    };
    let url = Template::compile(&cfg.url, phase).map_err(|e| format!("config.url: {e}"))?;
    if let Some(fixed) = url.fixed() {
        internal_host(&fixed)?;
    }
    Ok(Built::Request(Box::new(ForwardInternal {
        url,
        keep_going,
    })))
}

/// The internal endpoint's name in a URL like `https://a.internal`.
fn internal_host(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("config.url: {url:?} is not an http:// or https:// URL"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = normalize_host(authority).map_err(|e| format!("config.url: {url:?}: {e}"))?;
    if !host.ends_with(".internal") {
        return Err(format!(
            "config.url: {host} is not an internal endpoint (*.internal)"
        ));
    }
    Ok(host)
}

impl RequestAction for ForwardInternal {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        Box::pin(async move {
            let host = internal_host(&self.url.render(&cx.facts())?)?;
            let req = std::mem::replace(
                cx.req,
                http::Request::new(VisitorBody::Read(Default::default())),
            );
            match cx.internal.forward(&host, req, cx.record).await {
                Ok(response) => Ok(Flow::Respond(response)),
                Err(miss) if self.keep_going => {
                    *cx.req = miss.req;
                    Ok(Flow::Next)
                }
                Err(miss) => Ok(Flow::Respond(error_response(&miss.failure))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_internal_names() {
        assert_eq!(internal_host("https://a.internal").unwrap(), "a.internal");
        assert_eq!(
            internal_host("https://B.Internal:443/x").unwrap(),
            "b.internal"
        );
        assert!(internal_host("https://a.example.com").is_err());
        assert!(internal_host("tcp://a.internal:5432").is_err());
    }
}
