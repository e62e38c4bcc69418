//! Checking a bind and building the endpoint it asks for: the name or port,
//! the authtoken's ACL and the cluster's reserved domains, then the modules
//! an endpoint carries (TLS termination, client certificates, OAuth, IP
//! rules) and its pool. The same building serves an endpoint of this
//! node's agents and one served through another node; new endpoint modules
//! are added here.

use std::sync::Arc;

use postern_ingress::{
    CertStore, DomainPattern, Endpoint, EndpointKind, EndpointSpec, GatewayConfig, OAuthService,
    PolicyDocument, Protocol, TerminateAt,
};
use postern_net::{
    CaResolver, IpPolicy, MAX_CAS, MtlsPolicy, Pem, certified_key_from_pem, parse_ca_bundle,
};
use postern_proto::{ErrorCode, Failure, pb};

use super::ClusterView;
use crate::{
    acl::Acl,
    ca_store::{CaStore, ca_error_code},
    config::{EndpointPolicy, Required},
};

/// Checks binds and builds endpoints with this node's certificates, CAs,
/// OAuth service and endpoint policies (the edge config's and, in a
/// cluster, the cluster's).
pub struct Binder {
    /// The gateway's certificates: TLS terminated at the edge needs one.
    pub(super) certs: Arc<CertStore>,
    /// CAs that endpoints reference by id.
    pub(super) cas: Arc<CaStore>,
    /// OAuth/OIDC for endpoints that ask for it.
    pub(super) oauth: Arc<OAuthService>,
    /// The edge config's `[[endpoint_policies]]`.
    pub(super) endpoint_policies: Vec<EndpointPolicy>,
    pub(super) cluster: Option<Arc<dyn ClusterView>>,
}

impl Binder {
    /// Refuses what the authtoken's ACL does not permit, and names reserved
    /// for another owner than `owner`.
    pub fn check(
        &self,
        spec: &EndpointSpec,
        acl: &Acl,
        owner: Option<&str>,
    ) -> Result<(), Failure> {
        check_acl(spec, acl)?;
        match &self.cluster {
            Some(cluster) => cluster.check_bind(spec, owner),
            None => Ok(()),
        }
    }

    /// What the edge config's and the cluster's endpoint policies require
    /// of endpoints on `domain`.
    pub fn required(&self, domain: Option<&DomainPattern>) -> Required {
        let Some(domain) = domain else {
            return Required::default();
        };
        let cluster = self.cluster.as_ref().map(|c| c.endpoint_policies());
        EndpointPolicy::required(
            self.endpoint_policies
                .iter()
                .chain(cluster.iter().flatten()),
            domain,
        )
    }

    /// The settings of the endpoint a bind request asks for, as this node
    /// serves it: for an endpoint bound again in place, or one another
    /// node's agent serves (from its bind request as that node announced
    /// it).
    pub async fn build(&self, req: &pb::BindRequest) -> Result<EndpointSpec, Failure> {
        let mut spec = base_spec(req)?;
        self.finish_spec(&mut spec, req).await?;
        Ok(spec)
    }

    /// What the gateway needs beyond the name or port: TLS termination,
    /// client certificates, OAuth, and the pool key of a pooling endpoint.
    pub async fn finish_spec(
        &self,
        spec: &mut EndpointSpec,
        req: &pb::BindRequest,
    ) -> Result<(), Failure> {
        if spec.protocol == Protocol::Tls {
            self.tls_options(spec, req)?;
        }
        let required = self.required(spec.domain.as_ref());
        spec.mutual_tls = self.mutual_tls(spec, req, &required.mutual_tls_cas)?;
        spec.operator_policy = operator_policy(&required.traffic_policies)?;
        spec.oauth = crate::oauth::bind(&self.oauth, spec, req).await?;
        spec.pool_key = req.pooling_enabled.then(|| pool_key(req));
        Ok(())
    }

    /// The client-certificate policy: the agent's PEM bundle and CA ids,
    /// plus the CAs edge policies require for this domain.
    fn mutual_tls(
        &self,
        spec: &EndpointSpec,
        req: &pb::BindRequest,
        required: &[String],
    ) -> Result<Option<Arc<MtlsPolicy>>, Failure> {
        let mut ids = req.mutual_tls_ca_ids.clone();
        ids.extend(required.iter().cloned());
        ids.sort();
        ids.dedup();
        let inline = if req.mutual_tls_cas_pem.is_empty() {
            Vec::new()
        } else {
            parse_ca_bundle(&req.mutual_tls_cas_pem)
                .map_err(|e| Failure::new(ca_error_code(&e), format!("mutual_tls_cas: {e}")))?
        };
        if inline.is_empty() && ids.is_empty() {
            return Ok(None);
        }
        let terminated_here = spec.protocol == Protocol::Http
            || (spec.protocol == Protocol::Tls && spec.terminate_at == TerminateAt::Edge);
        if !terminated_here {
            return Err(Failure::new(
                ErrorCode::MTLS_NEEDS_TERMINATION,
                "mutual TLS needs terminate_at: edge (or terminate_at: agent with the CAs at the agent)",
            ));
        }
        if let Some(missing) = ids.iter().find(|id| self.cas.get(id).is_none()) {
            return Err(Failure::new(
                ErrorCode::MTLS_UNKNOWN_CA,
                format!("mutual_tls_cas: {missing}"),
            ));
        }
        let count = inline.len() + ids.len();
        if count > MAX_CAS {
            return Err(Failure::new(
                ErrorCode::MTLS_TOO_MANY_CAS,
                format!("mutual_tls_cas: {count} CAs; at most {MAX_CAS}"),
            ));
        }
        let resolver: Arc<dyn CaResolver> = self.cas.clone();
        Ok(Some(Arc::new(MtlsPolicy::new(inline, ids, Some(resolver)))))
    }

    fn tls_options(&self, spec: &mut EndpointSpec, req: &pb::BindRequest) -> Result<(), Failure> {
        let has_cert = !req.tls_cert_pem.is_empty() || !req.tls_key_pem.is_empty();
        spec.terminate_at = match pb::TerminateAt::try_from(req.terminate_at) {
            Ok(pb::TerminateAt::Unspecified) if has_cert => TerminateAt::Edge,
            Ok(pb::TerminateAt::Unspecified | pb::TerminateAt::Upstream) => TerminateAt::Upstream,
            Ok(pb::TerminateAt::Edge) => TerminateAt::Edge,
            Ok(pb::TerminateAt::Agent) => TerminateAt::Agent,
            Err(_) => {
                return Err(Failure::new(
                    ErrorCode::INVALID_TERMINATE_AT,
                    format!("value {}", req.terminate_at),
                ));
            }
        };
        if spec.terminate_at != TerminateAt::Edge {
            return Ok(());
        }
        if has_cert {
            let key = certified_key_from_pem(
                Pem::new("crt", &req.tls_cert_pem),
                Pem::new("key", &req.tls_key_pem),
            )
            .map_err(|e| Failure::new(ErrorCode::INVALID_BIND, e.to_string()))?;
            spec.certificate = Some(Arc::new(key));
            return Ok(());
        }
        let name = match &spec.domain {
            Some(DomainPattern::Exact(name)) => name.clone(),
            Some(DomainPattern::Wildcard(suffix)) => format!("x.{suffix}"),
            None => return Ok(()), // a random name under the base: the dev CA or a configured wildcard covers it
        };
        if self.certs.lookup(&name).is_none() {
            return Err(Failure::new(
                ErrorCode::INVALID_BIND,
                format!(
                    "the edge has no certificate for {name}; pass --crt and --key to terminate at the edge"
                ),
            ));
        }
        Ok(())
    }
}

/// Refuses a name or port the authtoken's ACL does not permit.
fn check_acl(spec: &EndpointSpec, acl: &Acl) -> Result<(), Failure> {
    if spec.protocol == Protocol::Tcp {
        if !acl.allows_port(spec.remote_port) {
            return Err(Failure::new(
                ErrorCode::ACL_DENIES_ADDRESS,
                match spec.remote_port {
                    0 => "the authtoken's ACL allows only certain ports; ask for one with --remote-addr".to_string(),
                    p => format!("the authtoken's ACL does not permit binding port {p}"),
                },
            ));
        }
        return Ok(());
    }
    match &spec.domain {
        Some(domain) if !acl.allows_name(domain) => Err(Failure::new(
            ErrorCode::ACL_DENIES_NAME,
            format!("the authtoken's ACL does not permit binding {domain}"),
        )),
        None if !acl.is_unrestricted() => Err(Failure::new(
            ErrorCode::ACL_DENIES_NAME,
            "the authtoken's ACL allows only certain names; give one with --domain",
        )),
        _ => Ok(()),
    }
}

/// The name or port, protocol and IP policy a bind asks for, checked for
/// form only.
pub fn base_spec(req: &pb::BindRequest) -> Result<EndpointSpec, Failure> {
    let protocol = match pb::Protocol::try_from(req.protocol) {
        Ok(pb::Protocol::Http) => Protocol::Http,
        Ok(pb::Protocol::Tls) => Protocol::Tls,
        Ok(pb::Protocol::Tcp) => Protocol::Tcp,
        _ => {
            return Err(Failure::new(
                ErrorCode::INVALID_BIND,
                "protocol must be http, tls or tcp",
            ));
        }
    };
    let mut spec = EndpointSpec {
        id: None,
        name: req.name.clone(),
        protocol,
        domain: None,
        remote_port: 0,
        terminate_at: TerminateAt::Upstream,
        certificate: None,
        proxy_proto: req.proxy_proto != 0,
        mutual_tls: None,
        oauth: None,
        ip_policy: match &req.ip_restriction {
            Some(r) if !(r.allow_cidrs.is_empty() && r.deny_cidrs.is_empty()) => Some(Arc::new(
                IpPolicy::parse(&r.allow_cidrs, &r.deny_cidrs).map_err(|e| {
                    Failure::new(ErrorCode::INVALID_BIND, format!("ip_restriction.{e}"))
                })?,
            )),
            _ => None,
        },
        pool_key: None,
        remote: None,
        traffic_policy: match req.traffic_policy.trim() {
            "" => None,
            text => Some(PolicyDocument::parse(text).map_err(|e| {
                Failure::new(
                    ErrorCode::POLICY_INVALID,
                    format!("the traffic policy is not a policy document: {e}"),
                )
            })?),
        },
        operator_policy: None,
        http_modules: req.modules.clone(),
        upstream_http2: req.upstream_http2,
    };
    if req.upstream_http2 && protocol != Protocol::Http {
        return Err(Failure::new(
            ErrorCode::INVALID_BIND,
            "upstream_protocol http2 is for HTTP endpoints",
        ));
    }
    if protocol == Protocol::Tcp {
        spec.remote_port = u16::try_from(req.remote_port).map_err(|_| {
            Failure::new(
                ErrorCode::INVALID_BIND,
                format!("{} is not a port", req.remote_port),
            )
        })?;
    } else if !req.domain.is_empty() {
        spec.domain = Some(DomainPattern::parse(&req.domain).map_err(|e| {
            Failure::new(ErrorCode::INVALID_DOMAIN, format!("{:?}: {e}", req.domain))
        })?);
    }
    Ok(spec)
}

/// ngrok's `--subdomain` made a domain under the edge's base for random
/// names, and the port of ngrok's `--url` checked: `req` as the rest of the
/// bind reads it.
pub(super) fn resolve_url(
    mut req: pb::BindRequest,
    config: &GatewayConfig,
) -> Result<pb::BindRequest, Failure> {
    if !req.subdomain.is_empty() {
        if !req.domain.is_empty() {
            return Err(Failure::new(
                ErrorCode::INVALID_BIND,
                "give a domain or a subdomain, not both",
            ));
        }
        let base = config.random_domain_base.as_deref().ok_or_else(|| {
            Failure::new(
                ErrorCode::INVALID_BIND,
                format!(
                    "subdomain {:?}: this edge has no base domain for subdomains (public.random_domain_base); give a full domain",
                    req.subdomain
                ),
            )
        })?;
        req.domain = format!("{}.{base}", std::mem::take(&mut req.subdomain));
    }
    let port = req.public_port;
    if port != 0 {
        let served = match pb::Protocol::try_from(req.protocol) {
            Ok(pb::Protocol::Tcp) => true,
            _ => port == 80 || port == 443 || port == u32::from(config.https_public_port),
        };
        if !served {
            return Err(Failure::new(
                ErrorCode::PUBLIC_PORT,
                format!(
                    "port {port}: this edge serves HTTP and TLS endpoints on port {}; leave the port out of the URL",
                    config.https_public_port
                ),
            ));
        }
        req.public_port = 0;
    }
    Ok(req)
}

/// The name a bind request binds, if it binds one (not TCP).
pub(super) fn domain_of(req: &pb::BindRequest) -> Option<DomainPattern> {
    base_spec(req)
        .ok()
        .filter(|spec| spec.protocol != Protocol::Tcp)
        .and_then(|spec| spec.domain)
}

/// What endpoints of one pool must share, as a digest: everything a bind
/// sets but its request id, tunnel name, upstream, name and port.
fn pool_key(req: &pb::BindRequest) -> String {
    use prost::Message;
    let mut settings = req.clone();
    settings.request_id = 0;
    settings.name.clear();
    settings.forwards_to.clear();
    settings.domain.clear();
    settings.remote_port = 0;
    settings.mutual_tls_ca_ids.sort();
    let digest = ring::digest::digest(&ring::digest::SHA256, &settings.encode_to_vec());
    hex::encode(&digest.as_ref()[..16])
}

/// `req` with the name or port `endpoint` was bound on: what builds the
/// same endpoint again, here or at another node.
pub(super) fn bound_request(endpoint: &Endpoint, req: &pb::BindRequest) -> pb::BindRequest {
    let mut bound = req.clone();
    bound.request_id = 0;
    match endpoint.kind {
        EndpointKind::Tcp { port } => bound.remote_port = u32::from(port),
        _ => bound.domain = host_of(&endpoint.public_url).to_string(),
    }
    bound
}

/// `app.example.com` of `https://app.example.com:8443`.
pub fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.rsplit_once(':').map_or(rest, |(host, _)| host)
}

/// The operator's Traffic Policy documents for a domain as one: their rules
/// in order, phase by phase.
fn operator_policy(texts: &[String]) -> Result<Option<PolicyDocument>, Failure> {
    let mut merged: Option<PolicyDocument> = None;
    for text in texts {
        let doc = PolicyDocument::parse(text).map_err(|e| {
            Failure::new(
                ErrorCode::POLICY_INVALID,
                format!(
                    "the operator's traffic policy for this domain is not a policy document: {e}"
                ),
            )
        })?;
        match &mut merged {
            Some(all) => all.append(doc),
            None => merged = Some(doc),
        }
    }
    Ok(merged)
}
