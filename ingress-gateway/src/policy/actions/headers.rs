//! `add-headers` and `remove-headers`, on the request going upstream or the
//! response going back. Names are lower-cased; adding appends a value,
//! except `host`, which is replaced; `user-agent` and Postern's reserved
//! `ngrok-*` names may be neither added nor removed.

use std::collections::BTreeMap;

use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use super::{Built, at_most, config};
use crate::policy::{
    Flow, Phase, PolicyEnv, RequestAction, RequestCx, ResponseAction, ResponseCx, cel::Template,
    facts::Facts,
};

fn header_name(name: &str) -> Result<HeaderName, String> {
    let lower = name.to_ascii_lowercase();
    if lower == "user-agent" {
        return Err("config.headers: user-agent may not be changed".into());
    }
    if crate::http::is_reserved_header(&lower) {
        return Err(format!(
            "config.headers: {name} is in the ngrok-* space only the edge sets"
        ));
    }
    HeaderName::from_bytes(lower.as_bytes())
        .map_err(|_| format!("config.headers: {name:?} is not a header name"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddConfig {
    headers: BTreeMap<String, String>,
}

/// `add-headers`: values are `${…}` templates.
struct Add(Vec<(HeaderName, Template)>);

pub(super) fn add(value: &serde_json::Value, phase: Phase, _: &PolicyEnv) -> Result<Built, String> {
    let cfg: AddConfig = config(value)?;
    if cfg.headers.is_empty() {
        return Err("config.headers: at least one header".into());
    }
    at_most("headers", &cfg.headers.iter().collect::<Vec<_>>(), 10)?;
    let headers = cfg
        .headers
        .iter()
        .map(|(name, value)| {
            Ok((
                header_name(name)?,
                Template::compile(value, phase)
                    .map_err(|e| format!("config.headers.{name}: {e}"))?,
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(match phase {
        Phase::Response => Built::Response(Box::new(Add(headers))),
        _ => Built::Request(Box::new(Add(headers))),
    })
}

impl Add {
    fn apply(&self, facts: &Facts<'_>) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
        self.0
            .iter()
            .map(|(name, template)| {
                let text = template.render(facts)?;
                let value = HeaderValue::from_str(&text)
                    .map_err(|_| format!("the value for {name} is not a valid header value"))?;
                Ok((name.clone(), value))
            })
            .collect()
    }
}

fn append(headers: &mut HeaderMap, values: Vec<(HeaderName, HeaderValue)>) {
    for (name, value) in values {
        if name == http::header::HOST {
            headers.insert(name, value);
        } else {
            headers.append(name, value);
        }
    }
}

impl RequestAction for Add {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        Box::pin(async move {
            let values = self.apply(&cx.facts())?;
            append(cx.req.headers_mut(), values);
            Ok(Flow::Next)
        })
    }
}

impl ResponseAction for Add {
    fn on_response(&self, cx: &mut ResponseCx<'_>) -> Result<Flow, String> {
        let values = self.apply(&cx.facts())?;
        append(cx.res.headers_mut(), values);
        Ok(Flow::Next)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveConfig {
    headers: Vec<String>,
}

/// `remove-headers`: every value of each name.
struct Remove(Vec<HeaderName>);

pub(super) fn remove(
    value: &serde_json::Value,
    phase: Phase,
    _: &PolicyEnv,
) -> Result<Built, String> {
    let cfg: RemoveConfig = config(value)?;
    if cfg.headers.is_empty() {
        return Err("config.headers: at least one header".into());
    }
    at_most("headers", &cfg.headers, 10)?;
    let names = cfg
        .headers
        .iter()
        .map(|n| header_name(n))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match phase {
        Phase::Response => Built::Response(Box::new(Remove(names))),
        _ => Built::Request(Box::new(Remove(names))),
    })
}

impl RequestAction for Remove {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        for name in &self.0 {
            cx.req.headers_mut().remove(name);
        }
        Box::pin(async { Ok(Flow::Next) })
    }
}

impl ResponseAction for Remove {
    fn on_response(&self, cx: &mut ResponseCx<'_>) -> Result<Flow, String> {
        for name in &self.0 {
            cx.res.headers_mut().remove(name);
        }
        Ok(Flow::Next)
    }
}
