//! What the OAuth module reads from untrusted input: the reserved `/auth/`
//! paths in every spelling, return paths (never an open redirect), query
//! parameters and cookies.

use http::{HeaderMap, HeaderValue, header};
use openidconnect::url::form_urlencoded;

/// A request under `/auth/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthPath {
    /// `/auth/authn`: start a login, asking the IdP for fresh credentials.
    Authn,
    /// `/auth/logout`: end the session everywhere.
    Logout,
    /// `/auth/callback`: the end of a login, with a one-time code.
    Callback,
    /// Anything else that is, or decodes to, a path under `/auth/`: never
    /// forwarded, never handled.
    Reserved,
}

/// How many rounds of percent-decoding are looked through.
const DECODE_ROUNDS: usize = 4;

fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex_val(bytes[i + 1]), hex_val(bytes[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The spellings of `raw`: itself, then each further round of
/// percent-decoding until nothing changes.
fn spellings(raw: &str) -> Vec<String> {
    let mut out = vec![raw.to_string()];
    for _ in 0..DECODE_ROUNDS {
        let last = out.last().expect("not empty");
        let decoded = String::from_utf8_lossy(&percent_decode(last)).into_owned();
        if &decoded == last {
            break;
        }
        out.push(decoded);
    }
    out
}

/// A path as a lenient server might read it: lower case, `\` as `/`,
/// `;params` dropped, empty and `.` segments removed, `..` applied.
fn normalize(path: &str) -> String {
    let lowered = path.to_ascii_lowercase().replace('\\', "/");
    let mut segments: Vec<&str> = Vec::new();
    for segment in lowered.split('/') {
        let segment = segment.split(';').next().unwrap_or("");
        match segment.trim_matches(|c: char| c.is_ascii_whitespace() || c.is_ascii_control()) {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    format!("/{}", segments.join("/"))
}

/// Whether a request path is under `/auth/` in any spelling, and if so
/// which special path it is. Only the exact spellings are special; every
/// other spelling is [`AuthPath::Reserved`].
pub fn auth_path(path: &str) -> Option<AuthPath> {
    // Also the raw path itself: `/auth/../x` resolves elsewhere, but an
    // upstream must still never see a path that starts under `/auth/`.
    let raw = path.to_ascii_lowercase();
    let raw_under_auth = raw.strip_prefix("/auth").is_some_and(|rest| {
        !rest
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
    });
    let reserved = raw_under_auth
        || spellings(path).iter().any(|p| {
            let n = normalize(p);
            n == "/auth" || n.starts_with("/auth/")
        });
    if !reserved {
        return None;
    }
    Some(match path {
        "/auth/authn" => AuthPath::Authn,
        "/auth/logout" => AuthPath::Logout,
        "/auth/callback" => AuthPath::Callback,
        _ => AuthPath::Reserved,
    })
}

/// `target` if it is a safe place to send the browser after login or
/// logout: a path on this host. The path part (before any `?` or `#`) gets
/// oauth2-proxy's rules (a leading single `/`, no `//`, `/\`, or
/// slash-whitespace-slash and dot tricks anywhere) in every percent-decoded
/// spelling, and no backslash or control character; the whole target must
/// be visible ASCII of at most 2048 bytes. Anything else gets `None` (use
/// `/`).
pub fn safe_return_path(target: &str) -> Option<&str> {
    if target.len() > 2048 || !target.starts_with('/') {
        return None;
    }
    if !target.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    for spelling in spellings(path) {
        let bytes = spelling.as_bytes();
        if bytes.first() != Some(&b'/')
            || spelling.contains('\\')
            || bytes.iter().any(|b| b.is_ascii_control() || *b >= 0x80)
            || slash_trick(bytes)
        {
            return None;
        }
    }
    Some(target)
}

/// oauth2-proxy's `[/\\](?:[\s\v]*|\.{1,2})[/\\]`.
fn slash_trick(bytes: &[u8]) -> bool {
    let slash = |b: u8| b == b'/' || b == b'\\';
    for (i, &b) in bytes.iter().enumerate() {
        if !slash(b) {
            continue;
        }
        let rest = &bytes[i + 1..];
        let spaces = rest
            .iter()
            .take_while(|c| c.is_ascii_whitespace() || **c == 0x0b)
            .count();
        if rest.get(spaces).copied().is_some_and(slash) {
            return true;
        }
        let dots = rest.iter().take_while(|c| **c == b'.').count();
        if (1..=2).contains(&dots) && rest.get(dots).copied().is_some_and(slash) {
            return true;
        }
    }
    false
}

/// The first value of query parameter `name`.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            Some((name.trim(), value.trim().trim_matches('"')))
        })
}

/// Every value of cookie `name` (browsers may send several, e.g. one set
/// by a sibling domain), at most `max`.
pub fn cookie_values<'a>(headers: &'a HeaderMap, name: &str, max: usize) -> Vec<&'a str> {
    cookie_pairs(headers)
        .filter(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
        .take(max)
        .collect()
}

/// Removes the module's cookies (`<prefix>session`, `<prefix>nonce.*`, in
/// any case) from the request, so the upstream never sees them.
pub fn strip_cookies(headers: &mut HeaderMap, prefix: &str) {
    let session = format!("{prefix}session").to_ascii_lowercase();
    let nonce = format!("{prefix}nonce.").to_ascii_lowercase();
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(n, _)| n).trim();
            let name = name.to_ascii_lowercase();
            name != session && !name.starts_with(&nonce)
        })
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(value) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(header::COOKIE, value);
    }
}

/// A `Set-Cookie` with the module's attributes: `Secure; HttpOnly;
/// SameSite=Lax; Path=/`, host-only, and `Max-Age` when given (0 deletes).
pub fn set_cookie(name: &str, value: &str, max_age_secs: Option<u64>) -> HeaderValue {
    let mut cookie = format!("{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax");
    if let Some(age) = max_age_secs {
        cookie.push_str(&format!("; Max-Age={age}"));
    }
    HeaderValue::from_str(&cookie).expect("cookie names and values are checked tokens")
}

/// Whether `prefix` can start a cookie name: RFC 6265 token characters.
pub fn valid_cookie_prefix(prefix: &str) -> bool {
    prefix.len() <= 64
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_paths_in_every_spelling() {
        assert_eq!(auth_path("/auth/authn"), Some(AuthPath::Authn));
        assert_eq!(auth_path("/auth/logout"), Some(AuthPath::Logout));
        assert_eq!(auth_path("/auth/callback"), Some(AuthPath::Callback));
        for reserved in [
            "/auth/",
            "/auth",
            "/auth/other",
            "/AUTH/logout",
            "/Auth/callback",
            "//auth/callback",
            "/auth/callback;x=1",
            "/auth%2flogout",
            "/auth%252flogout",
            "/%61uth/logout",
            "/x/../auth/logout",
            "/x/%2e%2e/auth/logout",
            "/x/%252e%252e/auth/logout",
            "\\auth\\logout",
            "/auth/logout%00",
            "/./auth/logout",
            "/auth/../auth/logout",
            "/auth/../secret",
            "/auth/%2e%2e/secret",
            "/authz/../auth/x",
        ] {
            assert_eq!(auth_path(reserved), Some(AuthPath::Reserved), "{reserved}");
        }
        for normal in [
            "/",
            "/secret",
            "/authors",
            "/auth.html",
            "/x/auth/logout",
            "/secret?x=/auth/callback",
        ] {
            let path = normal.split('?').next().unwrap();
            assert_eq!(auth_path(path), None, "{normal}");
        }
    }

    #[test]
    fn return_paths_are_never_open_redirects() {
        for good in [
            "/",
            "/app",
            "/a/b?c=d&e=/f",
            "/a%20b",
            "/search?q=x#frag",
            "/search?u=https://x.example/",
        ] {
            assert_eq!(safe_return_path(good), Some(good), "{good}");
        }
        for bad in [
            "",
            "//evil.example",
            "/\\evil.example",
            "\\/evil.example",
            "https://evil.example",
            "https:evil.example",
            "javascript:alert(1)",
            "/%2f%2fevil.example",
            "/%5cevil.example",
            "/%09/evil.example",
            "/%2F%2Fevil.example",
            "/%252f%252fevil.example",
            "/%3F%2F%2Fevil.example",
            "//evil.example?/ok",
            "/ /evil.example",
            "/./evil",
            "/a/../b",
            "/\tevil",
            "/x\r\nSet-Cookie: a=b",
            "/é",
            "evil.example",
        ] {
            assert_eq!(safe_return_path(bad), None, "{bad:?}");
        }
        assert_eq!(safe_return_path(&format!("/{}", "a".repeat(3000))), None);
    }

    #[test]
    fn cookies_are_read_and_stripped() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; ngrok.session=s1; ngrok.nonce.ab12=n"),
        );
        h.append(
            header::COOKIE,
            HeaderValue::from_static("NGROK.SESSION=s2; ngrok.session=s3; b=2"),
        );
        assert_eq!(cookie_values(&h, "ngrok.session", 4), ["s1", "s3"]);
        assert_eq!(cookie_values(&h, "ngrok.session", 1), ["s1"]);
        strip_cookies(&mut h, "ngrok.");
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1; b=2");
        let mut only = HeaderMap::new();
        only.insert(header::COOKIE, HeaderValue::from_static("ngrok.session=x"));
        strip_cookies(&mut only, "ngrok.");
        assert!(!only.contains_key(header::COOKIE));
    }

    #[test]
    fn set_cookie_attributes() {
        assert_eq!(
            set_cookie("ngrok.session", "v", Some(60)),
            "ngrok.session=v; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=60"
        );
        assert!(valid_cookie_prefix("ngrok.") && valid_cookie_prefix("__Host-app."));
        assert!(
            !valid_cookie_prefix("a b") && !valid_cookie_prefix("a;") && !valid_cookie_prefix("a=")
        );
    }

    #[test]
    fn query_params() {
        assert_eq!(
            query_param(Some("code=a%2Bb&x=1"), "code").as_deref(),
            Some("a+b")
        );
        assert_eq!(query_param(None, "code"), None);
    }
}
