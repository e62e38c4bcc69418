//! What the OAuth module answers by itself: redirects and short HTML pages
//! that carry their error code (`ngrok-error-code`) and, where it helps, a
//! "log in again" link. Nothing here is cached or leaks a Referer.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use postern_proto::ErrorCode;

use crate::http::ProxyBody;

fn body(text: String) -> ProxyBody {
    Full::new(Bytes::from(text))
        .map_err(|never: std::convert::Infallible| match never {})
        .boxed()
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

/// An error page (see [`crate::http::error_page`]) that sends no referrer on.
pub fn error_page(
    code: ErrorCode,
    detail: &str,
    link: Option<(&str, &str)>,
) -> Response<ProxyBody> {
    let mut response = crate::http::error_page(code, detail, link);
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
    use crate::http::{ERROR_CODE_HEADER, escape};

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
