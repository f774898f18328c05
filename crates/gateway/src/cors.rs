//! Cross-origin requests from browsers: by default only pages served from this machine
//! (`http(s)://localhost`, `127.0.0.1` or `[::1]`, any port) may call the API; `--cors-origin`
//! adds origins (`*` allows every origin). Preflight `OPTIONS` requests are answered here,
//! before the API key is checked (browsers send no credentials on them). A page from any
//! other origin gets no `Access-Control-Allow-Origin`, so the browser refuses it the answer.

use axum::http::{header, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Whether `origin` is a page served from this machine.
fn is_local(origin: &[u8]) -> bool {
    let Ok(origin) = std::str::from_utf8(origin) else {
        return false;
    };
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let host = match rest.strip_prefix('[') {
        Some(v6) => v6.split(']').next().map(|h| format!("[{h}]")),
        None => rest.split(':').next().map(str::to_owned),
    };
    let port_ok = |after: &str| after.is_empty() || after[1..].bytes().all(|b| b.is_ascii_digit());
    match host.as_deref() {
        Some(h @ ("localhost" | "127.0.0.1" | "[::1]")) => {
            let after = &rest[h.len()..];
            (after.is_empty() || after.starts_with(':')) && port_ok(after)
        }
        _ => false,
    }
}

/// The CORS layer for the configured extra `origins` (`*`: any).
pub fn layer(origins: &[String]) -> CorsLayer {
    let any = origins.iter().any(|o| o == "*");
    let extra: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok())
        .collect();
    let allow = AllowOrigin::predicate(move |origin: &HeaderValue, _| {
        any || is_local(origin.as_bytes()) || extra.contains(origin)
    });
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("x-api-key"),
        ])
        .expose_headers([
            header::HeaderName::from_static("x-plexus-seed"),
            header::HeaderName::from_static("x-plexus-request-id"),
            header::HeaderName::from_static("x-plexus-seed-commitment"),
        ])
        .max_age(std::time::Duration::from_secs(600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_origins() {
        for ok in [
            "http://localhost",
            "http://localhost:3000",
            "https://127.0.0.1:8443",
            "http://[::1]:5173",
        ] {
            assert!(is_local(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "http://localhost.evil.com",
            "http://evil.com",
            "http://127.0.0.1.nip.io",
            "http://localhost:80x",
            "file://localhost",
            "null",
            "http://[::2]:80",
        ] {
            assert!(!is_local(bad.as_bytes()), "{bad}");
        }
    }
}
