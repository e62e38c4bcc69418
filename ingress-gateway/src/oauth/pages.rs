//! What the OAuth module answers by itself: redirects and short HTML pages
//! that carry their error code (`ngrok-error-code`) and, where it helps, a
//! "log in again" link. Nothing here is cached or leaks a Referer.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use postern_proto::ErrorCode;

use crate::http::{ERROR_CODE_HEADER, ProxyBody};

/// How long a client is asked to wait when the session store is down.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);

fn body(text: String) -> ProxyBody {
    Full::new(Bytes::from(text))
        .map_err(|never: std::convert::Infallible| match never {})
        .boxed()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn private(response: &mut Response<ProxyBody>) {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
}

/// A redirect (302: the browser follows with a GET whatever the method).
pub fn redirect(location: &str) -> Response<ProxyBody> {
    let mut response = Response::new(body(String::new()));
    *response.status_mut() = StatusCode::FOUND;
    match HeaderValue::from_str(location) {
        Ok(value) => {
            response.headers_mut().insert(header::LOCATION, value);
        }
        Err(_) => {
            response
                .headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/"));
        }
    }
    private(&mut response);
    response
}

/// An error page: the code's status and summary, a detail line, and an
/// optional link (e.g. to log in again).
pub fn error_page(
    code: ErrorCode,
    detail: &str,
    link: Option<(&str, &str)>,
) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(code.http_status).unwrap_or(StatusCode::BAD_REQUEST);
    let id = code.id();
    let link = link
        .map(|(href, text)| format!("<p><a href=\"{}\">{}</a></p>", escape(href), escape(text)))
        .unwrap_or_default();
    let page = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{status}</title></head>\
         <body><h1>{status}</h1><p>{}</p><p>{}</p>{link}<p><code>{id}</code></p></body></html>\n",
        escape(code.summary),
        escape(detail),
    );
    let mut response = Response::new(body(page));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        ERROR_CODE_HEADER,
        HeaderValue::from_str(&id).expect("ids are ASCII"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from_str(&RETRY_AFTER.as_secs().to_string()).expect("digits"),
        );
    }
    private(&mut response);
    response
}

/// The page after `/auth/logout` when no `redirect_path` was given.
pub fn logged_out() -> Response<ProxyBody> {
    let page = "<!doctype html><html><head><meta charset=\"utf-8\"><title>Logged out</title></head>\
                <body><h1>Logged out</h1><p>You are logged out of this site.</p>\
                <p><a href=\"/auth/authn\">Log in again</a></p></body></html>\n";
    let mut response = Response::new(body(page.to_string()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    private(&mut response);
    response
}

/// Adds `Set-Cookie` headers.
pub fn with_cookies(
    mut response: Response<ProxyBody>,
    cookies: impl IntoIterator<Item = HeaderValue>,
) -> Response<ProxyBody> {
    for cookie in cookies {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_carry_code_retry_after_and_no_cache() {
        let r = error_page(ErrorCode::OAUTH_STORE_UNAVAILABLE, "redis down", None);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[ERROR_CODE_HEADER], "ERR_POSTERN_3150");
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        let r = redirect("https://idp.example/auth?x=1");
        assert_eq!(r.status(), StatusCode::FOUND);
        assert_eq!(r.headers()["referrer-policy"], "no-referrer");
        assert_eq!(escape("<a href=\"x\">"), "&lt;a href=&quot;x&quot;&gt;");
    }
}
