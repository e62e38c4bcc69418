//! Every failure an agent or a visitor can see, in one table: its number
//! (shown as `ERR_POSTERN_<n>`), the HTTP status a visitor gets, and who is at
//! fault. Numbers follow ngrok's `ERR_NGROK_<n>` where ngrok has the same
//! situation, so that runbooks keyed on them carry over; Postern's own cases
//! use 9000 and up.

use std::fmt;

use crate::pb;

/// Who caused a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The visitor (public client) sent something wrong.
    Client,
    /// The agent or its configuration is wrong or gone.
    Agent,
    /// The agent's upstream service failed.
    Upstream,
    /// The edge itself failed or is overloaded.
    Edge,
}

/// One entry of the error table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorCode {
    pub number: u32,
    /// Status for HTTP visitors; agent-side errors use 400.
    pub http_status: u16,
    pub fault: Fault,
    /// One line, for the error page and logs.
    pub summary: &'static str,
}

macro_rules! codes {
    ($($name:ident = ($n:expr, $status:expr, $fault:ident, $summary:expr);)*) => {
        impl ErrorCode {
            $(pub const $name: ErrorCode = ErrorCode {
                number: $n, http_status: $status, fault: Fault::$fault, summary: $summary,
            };)*

            /// Every code, in table order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];
        }
    };
}

codes! {
    // Agent session and authentication.
    PROTOCOL_VIOLATION = (100, 400, Agent, "the agent broke the tunnel protocol");
    AUTHTOKEN_MALFORMED = (105, 400, Agent, "the authtoken is malformed");
    AUTHTOKEN_INVALID = (107, 400, Agent, "the authtoken is not valid");
    TOO_MANY_SESSIONS = (108, 400, Agent, "too many simultaneous agent sessions for this authtoken");
    PROTOCOL_VERSION = (120, 400, Agent, "the agent and the edge have no protocol version in common");
    SESSION_SUPERSEDED = (121, 400, Agent, "a newer session of the same agent replaced this one");
    AGENT_INGRESS_NOT_PERMITTED = (122, 400, Agent, "the authtoken's owner may not use this agent ingress");
    // Binding endpoints.
    INVALID_TERMINATE_AT = (224, 400, Agent, "terminate_at must be edge, agent or upstream");
    MTLS_TOO_MANY_CAS = (1675, 400, Agent, "more than 10 certificate authorities for mutual TLS");
    MTLS_NEEDS_TERMINATION = (1694, 400, Agent, "mutual TLS needs TLS terminated at the edge or the agent");
    MTLS_NO_PEM = (1695, 400, Agent, "the CA bundle holds no PEM certificate");
    MTLS_NOT_A_CA = (1696, 400, Agent, "a certificate given as a mutual TLS CA is not a valid CA");
    MTLS_UNKNOWN_CA = (1697, 400, Agent, "no certificate authority with this id");
    INVALID_BIND = (225, 400, Agent, "the bind request is invalid");
    POLICY_INVALID = (2236, 400, Agent, "the traffic policy is invalid");
    TCP_PORT_UNAVAILABLE = (307, 400, Agent, "the requested TCP port is not available");
    ACL_DENIES_ADDRESS = (308, 400, Agent, "the authtoken's ACL does not permit binding this address");
    ACL_DENIES_NAME = (316, 400, Agent, "the authtoken's ACL does not permit binding this name");
    TOO_MANY_ENDPOINTS = (324, 400, Agent, "too many endpoints on one agent session");
    AGENT_CONNECTION_LIMIT = (714, 503, Agent, "the agent is at its limit of simultaneous connections");
    INVALID_DOMAIN = (326, 400, Agent, "the domain name is invalid");
    PUBLIC_PORT = (9035, 400, Agent, "the URL's port is not one this edge serves the scheme on");
    ENDPOINT_ALREADY_BOUND = (334, 400, Agent, "the endpoint is already online in another agent session");
    DOMAIN_RESERVED = (320, 400, Agent, "the domain is reserved by another owner");
    UNKNOWN_ENDPOINT = (335, 400, Agent, "no such endpoint in this session");
    DRAINING = (742, 503, Edge, "the edge node is draining; reconnect to another node");
    // Agentless tunnels over SSH (ngrok's 11xx numbers).
    SSH_KEY_UNKNOWN = (1102, 400, Agent, "the SSH key is not registered (any more)");
    SSH_MULTIPLEXING = (1104, 400, Agent, "one SSH connection runs one session channel (no connection sharing)");
    SSH_TOO_MANY_FORWARDS = (1105, 400, Agent, "more remote forwards (ssh -R) than one SSH session may hold");
    SSH_COMMAND_REQUIRED = (1107, 400, Agent, "an SSH tunnel needs a command: http, tls or tcp");
    SSH_UNKNOWN_COMMAND = (1108, 400, Agent, "the SSH command is not http, tls or tcp");
    SSH_BAD_OPTION = (1109, 400, Agent, "an option of the SSH command is invalid");
    SSH_NO_FORWARD = (1112, 400, Agent, "the SSH session asked for no remote forward (ssh -R)");
    SSH_BAD_PORT = (1116, 400, Agent, "the remote port of ssh -R does not fit the command");
    SSH_NOT_SUPPORTED = (9020, 400, Agent, "not supported over SSH");
    // Visitors.
    TLS_HANDSHAKE = (3002, 400, Client, "the TLS handshake failed");
    TLS_NO_SNI = (3003, 400, Client, "the client sent no TLS SNI, which this endpoint needs");
    UPSTREAM_INVALID_RESPONSE = (3004, 502, Upstream, "the upstream returned an invalid HTTP response");
    UPSTREAM_TIMEOUT = (3008, 504, Upstream, "the upstream did not respond in time");
    CIRCUIT_OPEN = (3202, 503, Upstream, "the circuit breaker is open: the upstream failed too often; try again shortly");
    WEBHOOK_UNVERIFIED = (3204, 403, Client, "the webhook's signature could not be verified");
    USER_AGENT_DENIED = (3211, 403, Client, "the user agent is not allowed by the endpoint's filter");
    IP_RESTRICTED = (3205, 403, Client, "the client's IP address is not allowed by the endpoint's IP restrictions");
    ENDPOINT_OFFLINE = (3200, 404, Client, "no endpoint is online for this host");
    AGENT_FORWARD_FAILED = (3210, 502, Agent, "the connection to the agent failed");
    NODE_UNREACHABLE = (9011, 502, Edge, "the edge node the endpoint's agent is connected to could not be reached");
    SESSION_STOPPED = (9012, 400, Agent, "the session was stopped through the admin API");
    COMMAND_UNSUPPORTED = (9021, 400, Agent, "the agent does not take this command");
    COMMAND_FAILED = (9022, 502, Agent, "the agent's handler for the command failed or did not answer");
    UPSTREAM_DIAL_FAILED = (8012, 502, Upstream, "the agent could not connect to the upstream");
    // OAuth and OpenID Connect: binding, then what visitors see (ngrok's
    // 31xx numbers where ngrok has the case).
    OIDC_DISCOVERY_FAILED = (2227, 400, Agent, "OpenID Connect discovery failed for the issuer");
    OAUTH_INVALID_CONFIG = (2228, 400, Agent, "the OAuth/OIDC configuration is invalid");
    OAUTH_CLIENT_REQUIRED = (2229, 400, Agent, "OAuth/OIDC needs the app's client id and client secret (there are no managed apps)");
    OAUTH_LOGIN_REQUIRED = (3100, 401, Client, "the login session is missing or expired; reload the page to log in");
    OAUTH_USER_NOT_ALLOWED = (3105, 403, Client, "the signed-in user is not allowed to use this site");
    OAUTH_STATE_MISSING = (3107, 400, Client, "the login callback carried no state or code");
    OAUTH_NO_EMAIL = (3109, 403, Client, "the identity provider gave no usable email address");
    OAUTH_IDP_ERROR = (3112, 400, Client, "the identity provider returned an error");
    OAUTH_LOGIN_TOO_SLOW = (3119, 400, Client, "the login took too long; start again");
    OAUTH_STATE_INVALID = (3120, 400, Client, "the login state is unknown, already used or expired");
    OAUTH_NONCE_MISSING = (3121, 400, Client, "the login's nonce cookie is missing; start the login again in this browser");
    OAUTH_STATE_WRONG_HOST = (3124, 400, Client, "the login state belongs to another endpoint");
    OAUTH_STORE_UNAVAILABLE = (3150, 503, Edge, "the session store is unavailable; try again shortly");
    OAUTH_IDP_UNAVAILABLE = (3160, 502, Edge, "the identity provider could not be reached");
    OAUTH_RESERVED_PATH = (9010, 404, Client, "paths under /auth/ are reserved for login and logout");
    // Postern's own.
    MISDIRECTED_REQUEST = (9001, 421, Client, "the Host header names another endpoint than the TLS SNI");
    BAD_HOST = (9002, 400, Client, "the request has a missing or invalid Host");
    BAD_REQUEST = (9009, 400, Client, "the request is malformed");
    WEBSOCKET_ONLY = (9036, 400, Client, "this endpoint converts WebSocket connections to TCP and takes nothing else");
    CONTROL_FLOOD = (9008, 400, Agent, "the agent sent control messages faster than allowed");
    POLICY_FAILED = (9015, 500, Agent, "the endpoint's traffic policy failed while running");
    BASIC_AUTH_REQUIRED = (9016, 401, Client, "valid basic auth credentials are required");
    RATE_LIMITED = (9018, 429, Client, "the endpoint's rate limit is reached; try again later");
    JWT_INVALID = (9019, 401, Client, "a valid JWT is required");
    POLICY_DENIED = (9017, 403, Client, "the endpoint's traffic policy refused the connection");
    CONTROL_THROTTLED = (9013, 429, Agent, "the agent is over its control budget; this message was refused, send it again later");
    AGENT_QUEUE_FULL = (9014, 429, Agent, "the agent has too many tunnel starts waiting for the edge; try again later");
    EDGE_OVERLOADED = (9003, 503, Edge, "the edge is at its connection limit");
    STREAM_UNAVAILABLE = (9004, 503, Agent, "the agent did not provide a data stream in time");
    CONNECTION_RESET = (9005, 502, Client, "the peer reset the connection");
    HEARTBEAT_TIMEOUT = (9006, 400, Agent, "no heartbeat arrived within the tolerance");
    MTLS_CERT_REQUIRED = (9007, 403, Client, "a valid client certificate is required");
    TLS_CERT_INVALID = (9040, 400, Client, "the uploaded certificate is not a usable PEM certificate chain with a DNS name");
    TLS_KEY_INVALID = (9041, 400, Client, "the uploaded private key is not a usable unencrypted PEM key");
    TLS_KEY_MISMATCH = (9042, 400, Client, "the uploaded private key does not belong to the certificate");
    TLS_CERT_NOT_CURRENT = (9043, 400, Client, "the uploaded certificate has expired or is not valid yet");
    CERT_UNKNOWN = (9044, 400, Client, "certificate_id names no uploaded TLS certificate");
    CERT_NOT_COVERING = (9045, 400, Client, "the certificate's DNS names do not cover the reserved domain");
    CERT_EXCLUSIVE = (9046, 400, Client, "a reserved domain takes certificate_id or certificate_management_policy, not both");
    CERT_IN_USE = (9047, 409, Client, "the certificate is named by a reserved domain; detach it first");
    API_UNAUTHORIZED = (9401, 401, Client, "a valid API key is required");
    API_NOT_FOUND = (9404, 404, Client, "no such resource");
    API_BAD_REQUEST = (9400, 400, Client, "the request is invalid");
    API_METHOD = (9405, 405, Client, "the method is not allowed here");
    API_READ_ONLY = (9406, 400, Client, "the object is managed by the edge itself and cannot be changed or deleted through the API");
    INTERNAL = (9999, 500, Edge, "internal error");
}

impl ErrorCode {
    /// Looks a code up by number, e.g. for a code that arrived from the peer.
    pub fn from_number(number: u32) -> Option<ErrorCode> {
        Self::ALL.iter().copied().find(|c| c.number == number)
    }

    /// `ERR_POSTERN_<n>`.
    pub fn id(&self) -> String {
        format!("ERR_POSTERN_{}", self.number)
    }

    /// The wire form with a specific message.
    pub fn to_pb(&self, message: impl Into<String>) -> pb::Error {
        pb::Error {
            code: self.number,
            message: message.into(),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.id(), self.summary)
    }
}

/// A failure with its code and the specifics of this occurrence.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", code.id())]
pub struct Failure {
    pub code: ErrorCode,
    pub detail: String,
}

impl Failure {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Failure {
        Failure {
            code,
            detail: detail.into(),
        }
    }

    /// The wire form.
    pub fn to_pb(&self) -> pb::Error {
        self.code.to_pb(self.detail.clone())
    }

    /// From the wire; an unknown number becomes [`ErrorCode::INTERNAL`]
    /// with the number kept in the detail.
    pub fn from_pb(error: &pb::Error) -> Failure {
        match ErrorCode::from_number(error.code) {
            Some(code) => Failure::new(code, error.message.clone()),
            None => Failure::new(
                ErrorCode::INTERNAL,
                format!("ERR_POSTERN_{}: {}", error.code, error.message),
            ),
        }
    }
}

impl fmt::Display for pb::Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ERR_POSTERN_{}: {}", self.code, self.message)
    }
}

impl std::error::Error for pb::Error {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn numbers_are_unique_and_round_trip() {
        let mut seen = HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.number), "duplicate {}", code.number);
            assert_eq!(ErrorCode::from_number(code.number), Some(*code));
            assert!((100..600).contains(&code.http_status));
        }
        assert_eq!(ErrorCode::ENDPOINT_OFFLINE.id(), "ERR_POSTERN_3200");
        assert_eq!(ErrorCode::from_number(1), None);
    }
}
