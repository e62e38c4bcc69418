//! `custom-response`: answers without the upstream (on_http_request), or
//! replaces the upstream's answer (on_http_response). The body and header
//! values are `${…}` templates; without a `content-type` header one is
//! inferred from the body.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderName, HeaderValue, StatusCode};
use serde::Deserialize;

use super::{Built, at_most, config};
use crate::policy::{
    Flow, Phase, PolicyEnv, RequestAction, RequestCx, ResponseAction, ResponseCx, cel::Template,
    facts::Facts, respond,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "ok")]
    status_code: u16,
    #[serde(default)]
    body: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

fn ok() -> u16 {
    200
}

struct CustomResponse {
    status: StatusCode,
    body: Template,
    headers: Vec<(HeaderName, Template)>,
}

pub(super) fn build(
    value: &serde_json::Value,
    phase: Phase,
    _: &PolicyEnv,
) -> Result<Built, String> {
    let cfg: Config = config(value)?;
    let status = StatusCode::from_u16(cfg.status_code)
        .ok()
        .filter(|s| (100..600).contains(&s.as_u16()) && !s.is_informational())
        .ok_or_else(|| {
            format!(
                "config.status_code: {} is not a final HTTP status",
                cfg.status_code
            )
        })?;
    at_most("headers", &cfg.headers.iter().collect::<Vec<_>>(), 10)?;
    let headers = cfg
        .headers
        .iter()
        .map(|(name, value)| {
            let header = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map_err(|_| format!("config.headers: {name:?} is not a header name"))?;
            let template = Template::compile(value, phase)
                .map_err(|e| format!("config.headers.{name}: {e}"))?;
            Ok((header, template))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let action = CustomResponse {
        status,
        body: Template::compile(&cfg.body, phase).map_err(|e| format!("config.body: {e}"))?,
        headers,
    };
    Ok(match phase {
        Phase::Response => Built::Response(Box::new(action)),
        _ => Built::Request(Box::new(action)),
    })
}

/// What a body looks like: HTML, JSON or text.
fn infer_content_type(body: &str) -> &'static str {
    let trimmed = body.trim_start();
    if trimmed.starts_with('<') {
        "text/html; charset=utf-8"
    } else if (trimmed.starts_with('{') || trimmed.starts_with('['))
        && serde_json::from_str::<serde_json::Value>(trimmed).is_ok()
    {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    }
}

impl CustomResponse {
    fn answer(&self, facts: &Facts<'_>) -> Result<Flow, String> {
        let body = self.body.render(facts)?;
        let mut headers = Vec::with_capacity(self.headers.len() + 1);
        for (name, template) in &self.headers {
            let value = HeaderValue::from_str(&template.render(facts)?)
                .map_err(|_| format!("the value for {name} is not a valid header value"))?;
            headers.push((name.clone(), value));
        }
        if !headers.iter().any(|(n, _)| n == http::header::CONTENT_TYPE) {
            headers.push((
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(infer_content_type(&body)),
            ));
        }
        Ok(Flow::Respond(respond(
            self.status,
            headers,
            Bytes::from(body),
        )))
    }
}

impl RequestAction for CustomResponse {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        let flow = self.answer(&cx.facts());
        Box::pin(async move { flow })
    }
}

impl ResponseAction for CustomResponse {
    fn on_response(&self, cx: &mut ResponseCx<'_>) -> Result<Flow, String> {
        self.answer(&cx.facts())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_are_inferred() {
        assert_eq!(
            infer_content_type("<h1>hi</h1>"),
            "text/html; charset=utf-8"
        );
        assert_eq!(infer_content_type(r#"{"a": 1}"#), "application/json");
        assert_eq!(infer_content_type("{not json"), "text/plain; charset=utf-8");
        assert_eq!(infer_content_type("hello"), "text/plain; charset=utf-8");
    }
}
