//! `redirect` and `url-rewrite`: a regex (`from`, unanchored; the whole URL
//! when omitted) matched against the whole URL (`scheme://host/path?query`)
//! and replaced by `to` (`$1`… for groups); both are `${…}` templates,
//! rendered before the regex is applied. A redirect answers with
//! `Location` when the URL changed; a rewrite changes the path and query
//! the upstream gets.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderName, HeaderValue, StatusCode};
use regex::Regex;
use serde::Deserialize;

use super::{Built, at_most, config};
use crate::policy::{
    Flow, Phase, PolicyEnv, RequestAction, RequestCx,
    cel::Template,
    facts::{Facts, ReqView},
    respond,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedirectConfig {
    #[serde(default)]
    from: Option<String>,
    to: String,
    #[serde(default = "found")]
    status_code: u16,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

fn found() -> u16 {
    302
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RewriteConfig {
    #[serde(default)]
    from: Option<String>,
    to: String,
}

/// `from` and `to`: fixed text compiled once, or templates compiled per
/// request.
struct Replace {
    from: Option<Template>,
    /// The regex, when `from` has no `${…}`.
    fixed: Option<Regex>,
    to: Template,
}

impl Replace {
    fn compile(from: Option<&str>, to: &str) -> Result<Replace, String> {
        let from = from
            .map(|f| Template::compile(f, Phase::Request).map_err(|e| format!("config.from: {e}")))
            .transpose()?;
        let fixed = match from.as_ref().map(Template::fixed) {
            Some(Some(text)) => {
                Some(Regex::new(&text).map_err(|e| format!("config.from: not a regex: {e}"))?)
            }
            _ => None,
        };
        Ok(Replace {
            from,
            fixed,
            to: Template::compile(to, Phase::Request).map_err(|e| format!("config.to: {e}"))?,
        })
    }

    /// The URL after the replacement.
    fn apply(&self, url: &str, facts: &Facts<'_>) -> Result<String, String> {
        let to = self.to.render(facts)?;
        let regex = match (&self.fixed, &self.from) {
            (Some(regex), _) => regex.clone(),
            (None, Some(template)) => Regex::new(&template.render(facts)?)
                .map_err(|e| format!("config.from rendered to an invalid regex: {e}"))?,
            (None, None) => return Ok(to),
        };
        Ok(regex.replace_all(url, to.as_str()).into_owned())
    }
}

fn whole_url(cx: &RequestCx<'_>) -> String {
    ReqView::of(cx.req, cx.scheme, cx.host).url()
}

struct Redirect {
    replace: Replace,
    status: StatusCode,
    headers: Vec<(HeaderName, Template)>,
}

pub(super) fn redirect(
    value: &serde_json::Value,
    _: Phase,
    _: &PolicyEnv,
) -> Result<Built, String> {
    let cfg: RedirectConfig = config(value)?;
    let status = StatusCode::from_u16(cfg.status_code)
        .ok()
        .filter(StatusCode::is_redirection)
        .ok_or_else(|| {
            format!(
                "config.status_code: {} is not a 3xx status",
                cfg.status_code
            )
        })?;
    at_most("headers", &cfg.headers.iter().collect::<Vec<_>>(), 10)?;
    let headers = cfg
        .headers
        .iter()
        .map(|(name, value)| {
            Ok((
                HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                    .map_err(|_| format!("config.headers: {name:?} is not a header name"))?,
                Template::compile(value, Phase::Request)
                    .map_err(|e| format!("config.headers.{name}: {e}"))?,
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Built::Request(Box::new(Redirect {
        replace: Replace::compile(cfg.from.as_deref(), &cfg.to)?,
        status,
        headers,
    })))
}

impl RequestAction for Redirect {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        let result = (|| {
            let url = whole_url(cx);
            let facts = cx.facts();
            let target = self.replace.apply(&url, &facts)?;
            if target == url {
                return Ok(Flow::Next);
            }
            let mut headers = vec![(
                http::header::LOCATION,
                HeaderValue::from_str(&target).map_err(|_| {
                    format!("the redirect target {target:?} is not a valid header value")
                })?,
            )];
            for (name, template) in &self.headers {
                let value = HeaderValue::from_str(&template.render(&facts)?)
                    .map_err(|_| format!("the value for {name} is not a valid header value"))?;
                headers.push((name.clone(), value));
            }
            Ok(Flow::Respond(respond(self.status, headers, Bytes::new())))
        })();
        Box::pin(async move { result })
    }
}

struct Rewrite(Replace);

pub(super) fn rewrite(value: &serde_json::Value, _: Phase, _: &PolicyEnv) -> Result<Built, String> {
    let cfg: RewriteConfig = config(value)?;
    Ok(Built::Request(Box::new(Rewrite(Replace::compile(
        cfg.from.as_deref(),
        &cfg.to,
    )?))))
}

/// The path and query of a URL written whole or as a path.
fn path_and_query(url: &str) -> &str {
    match url.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => url,
    }
}

impl RequestAction for Rewrite {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        let result = (|| {
            let url = whole_url(cx);
            let target = self.0.apply(&url, &cx.facts())?;
            if target != url {
                let uri: http::Uri = path_and_query(&target).parse().map_err(|_| {
                    format!("the rewritten URL {target:?} is not a valid request target")
                })?;
                *cx.req.uri_mut() = uri;
            }
            Ok(Flow::Next)
        })();
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_of_rewritten_urls() {
        assert_eq!(path_and_query("https://a.example/x?y=1"), "/x?y=1");
        assert_eq!(path_and_query("https://a.example"), "/");
        assert_eq!(path_and_query("/v2/items"), "/v2/items");
    }
}
