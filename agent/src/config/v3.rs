//! ngrok's agent config version 3, read into the version 2 shape the rest
//! of the agent validates: the `agent:` keys at the top (`connect_url` is
//! `server_addr`, `connect_cas` is `root_cas`), and each of `endpoints:` a
//! tunnel whose protocol is its URL's scheme and whose `addr` is its
//! `upstream.url`. `tunnels:` (version 2 keys) may still be given.

use serde_yaml_ng::{Mapping, Value};

use super::url::EndpointUrl;
use crate::error::{ConfigError, bail, invalid};

/// Whether the merged config is a version 3 file.
pub fn is_v3(value: &Value) -> bool {
    match value.get("version") {
        Some(Value::Number(n)) => n.as_u64() == Some(3),
        Some(Value::String(s)) => s == "3",
        _ => false,
    }
}

/// Version 2 names of `agent:` keys whose version 3 names differ.
const RENAMED: &[(&str, &str)] = &[("connect_url", "server_addr"), ("connect_cas", "root_cas")];

/// The version 3 name of a version 2 agent key (the command line's flags
/// are written with version 2 names).
pub fn v3_name(v2: &str) -> &str {
    RENAMED
        .iter()
        .find(|(_, old)| *old == v2)
        .map_or(v2, |(new, _)| new)
}

/// A version 3 config as version 2.
pub fn to_v2(map: Mapping) -> Result<Mapping, ConfigError> {
    let mut out = Mapping::new();
    let mut tunnels = Mapping::new();
    for (key, value) in map {
        let name = key.as_str().unwrap_or("?").to_string();
        match name.as_str() {
            "version" => {}
            "agent" => agent_keys(value, &mut out)?,
            "tunnels" => match value {
                Value::Mapping(t) => tunnels.extend(t),
                Value::Null => {}
                _ => bail!("tunnels: a map of tunnel names to their settings"),
            },
            "endpoints" => endpoints(value, &mut tunnels)?,
            other => bail!(
                "{other}: not a version 3 top-level key (version, agent, endpoints, tunnels); \
                 agent settings go under agent:"
            ),
        }
    }
    if !tunnels.is_empty() {
        out.insert("tunnels".into(), Value::Mapping(tunnels));
    }
    Ok(out)
}

fn agent_keys(value: Value, out: &mut Mapping) -> Result<(), ConfigError> {
    let map = match value {
        Value::Mapping(map) => map,
        Value::Null => return Ok(()),
        _ => bail!("agent: a map of agent settings"),
    };
    for (key, value) in map {
        let name = key.as_str().unwrap_or("?");
        if let Some((new, _)) = RENAMED.iter().find(|(_, old)| *old == name) {
            bail!("agent.{name}: version 3 calls it {new}");
        }
        if name == "tunnels" {
            bail!("agent.tunnels: tunnels go at the top level, or as endpoints:");
        }
        let v2 = RENAMED
            .iter()
            .find(|(new, _)| *new == name)
            .map_or(name, |(_, old)| old);
        out.insert(Value::from(v2), value);
    }
    Ok(())
}

fn endpoints(value: Value, tunnels: &mut Mapping) -> Result<(), ConfigError> {
    let list = match value {
        Value::Sequence(list) => list,
        Value::Null => return Ok(()),
        _ => bail!("endpoints: a list of endpoints, each with a name and an upstream"),
    };
    for (i, item) in list.into_iter().enumerate() {
        let Value::Mapping(map) = item else {
            bail!("endpoints[{i}]: an endpoint is a map with name, url and upstream");
        };
        let name = match map.get("name") {
            Some(Value::String(name)) if !name.is_empty() => name.clone(),
            _ => bail!("endpoints[{i}].name: required, a string"),
        };
        let field = format!("endpoints[{i}] ({name})");
        if tunnels.contains_key(name.as_str()) {
            bail!("{field}.name: another endpoint or tunnel is named {name:?}");
        }
        let tunnel = endpoint(map, &field)?;
        tunnels.insert(Value::from(name), Value::Mapping(tunnel));
    }
    Ok(())
}

/// One endpoint as a version 2 tunnel.
fn endpoint(map: Mapping, field: &str) -> Result<Mapping, ConfigError> {
    let mut tunnel = Mapping::new();
    let url = match map.get("url") {
        None | Some(Value::Null) => None,
        Some(Value::String(url)) if url.is_empty() => None,
        Some(Value::String(url)) => {
            Some(EndpointUrl::parse(url).map_err(|e| e.within(format!("{field}.url")))?)
        }
        Some(_) => bail!("{field}.url: a string such as https://app.example.com"),
    };
    let proto = url
        .as_ref()
        .and_then(|u| u.scheme)
        .map_or(super::Proto::Http, |s| s.proto());
    let proto_name = match proto {
        super::Proto::Http => "http",
        super::Proto::Tls => "tls",
        super::Proto::Tcp => "tcp",
    };
    tunnel.insert("proto".into(), proto_name.into());
    let mut policy_file = None;
    for (key, value) in map {
        let name = key.as_str().unwrap_or("?");
        match name {
            "name" => {}
            "url" => {
                if !value.as_str().is_some_and(str::is_empty) {
                    tunnel.insert("url".into(), value);
                }
            }
            "upstream" => upstream(value, proto, field, &mut tunnel)?,
            "traffic_policy" | "pooling_enabled" | "inspect" => {
                tunnel.insert(key, value);
            }
            "traffic_policy_file" => {
                let path = value
                    .as_str()
                    .ok_or_else(|| invalid!("{field}.traffic_policy_file: a file path"))?;
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::field(format!("{field}.traffic_policy_file: reading {path}"), e)
                })?;
                policy_file = Some(text);
            }
            "bindings" => bindings(&value, url.as_ref(), field)?,
            "metadata" | "description" => tracing::warn!(
                "{field}.{name}: accepted for ngrok compatibility and ignored (Postern has no endpoint API objects to show it on)"
            ),
            "agent_tls_termination" => agent_tls(value, proto, field, &mut tunnel)?,
            other => bail!(
                "{field}.{other}: not a version 3 endpoint key (name, url, upstream, traffic_policy, \
                 traffic_policy_file, pooling_enabled, bindings, agent_tls_termination, inspect, metadata, description)"
            ),
        }
    }
    if let Some(text) = policy_file {
        if tunnel.contains_key("traffic_policy") {
            bail!("{field}: give traffic_policy or traffic_policy_file, not both");
        }
        tunnel.insert("traffic_policy".into(), Value::from(text));
    }
    if !tunnel.contains_key("addr") {
        bail!("{field}.upstream.url: required (a port, host:port or URL of the service)");
    }
    Ok(tunnel)
}

/// `upstream: {url, protocol, proxy_protocol}`.
fn upstream(
    value: Value,
    proto: super::Proto,
    field: &str,
    tunnel: &mut Mapping,
) -> Result<(), ConfigError> {
    let Value::Mapping(map) = value else {
        bail!("{field}.upstream: a map with url (and protocol, proxy_protocol)");
    };
    for (key, value) in map {
        match key.as_str().unwrap_or("?") {
            "url" => {
                let addr = super::scalar(&value)
                    .ok_or_else(|| invalid!("{field}.upstream.url: a port or an address"))?;
                tunnel.insert("addr".into(), Value::from(upstream_addr(&addr, proto)));
            }
            "protocol" => match value.as_str() {
                Some(protocol @ ("http1" | "http2")) => {
                    tunnel.insert("upstream_protocol".into(), Value::from(protocol));
                }
                _ => bail!("{field}.upstream.protocol: http1 or http2"),
            },
            "proxy_protocol" => {
                tunnel.insert("proxy_proto".into(), value);
            }
            other => bail!(
                "{field}.upstream.{other}: not an upstream key (url, protocol, proxy_protocol)"
            ),
        }
    }
    Ok(())
}

/// ngrok's `upstream.url` forms in the agent's address syntax: a bare
/// domain of an HTTP endpoint is `http://domain` (port 80), a scheme alone
/// is that scheme on localhost.
fn upstream_addr(addr: &str, proto: super::Proto) -> String {
    if let Some(scheme) = addr.strip_suffix("://") {
        return format!("{scheme}://localhost");
    }
    let bare_name =
        !addr.contains("://") && !addr.contains(':') && !addr.bytes().all(|b| b.is_ascii_digit());
    if proto == super::Proto::Http && bare_name {
        return format!("http://{addr}");
    }
    addr.to_string()
}

/// `bindings`: exactly one of `public` (the default) and `internal`
/// (which needs a `.internal` URL); `kubernetes` is not served here.
fn bindings(value: &Value, url: Option<&EndpointUrl>, field: &str) -> Result<(), ConfigError> {
    let list: Vec<&str> = match value {
        Value::Sequence(items) => items.iter().filter_map(Value::as_str).collect(),
        Value::String(one) => vec![one.as_str()],
        _ => bail!("{field}.bindings: a list with one of public, internal"),
    };
    let internal_url = url
        .and_then(|u| u.host.as_deref())
        .is_some_and(|h| h.ends_with(".internal"));
    match list.as_slice() {
        ["public"] if !internal_url => Ok(()),
        ["public"] => bail!("{field}.bindings: a .internal URL is bound internal, not public"),
        ["internal"] if internal_url => Ok(()),
        ["internal"] => {
            bail!("{field}.bindings: internal endpoints need a URL ending in .internal")
        }
        ["kubernetes"] => {
            bail!("{field}.bindings: kubernetes bindings are not supported by Postern")
        }
        _ => bail!("{field}.bindings: exactly one of public, internal"),
    }
}

/// `agent_tls_termination`: TLS ends at this agent with its certificate.
fn agent_tls(
    value: Value,
    proto: super::Proto,
    field: &str,
    tunnel: &mut Mapping,
) -> Result<(), ConfigError> {
    if proto != super::Proto::Tls {
        bail!("{field}.agent_tls_termination: only for tls:// URLs");
    }
    let Value::Mapping(map) = value else {
        bail!(
            "{field}.agent_tls_termination: a map with server_certificate and server_private_key"
        );
    };
    tunnel.insert("terminate_at".into(), "agent".into());
    for (key, value) in map {
        let v2 = match key.as_str().unwrap_or("?") {
            "server_certificate" => "crt",
            "server_private_key" => "key",
            "mutual_tls_certificate_authorities" => "mutual_tls_cas",
            other => bail!(
                "{field}.agent_tls_termination.{other}: not a key here (server_certificate, \
                 server_private_key, mutual_tls_certificate_authorities)"
            ),
        };
        tunnel.insert(v2.into(), value);
    }
    Ok(())
}
