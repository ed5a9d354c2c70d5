//! Hop-by-hop header handling (RFC 9110 §7.6.1).
//!
//! A proxy removes the headers that describe one connection before passing a
//! message on: those named by `Connection`, and the fixed set below. What is
//! left (Authorization, Accept, Docker-Content-Digest, ...) is end-to-end and
//! travels untouched.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that always describe a single hop.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// The largest request head (request line and headers) regcache accepts.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Whether a request's head exceeds [`MAX_HEAD_BYTES`] (431 territory).
///
/// hyper's own limit is a read-buffer size that a head arriving in one read
/// can exceed, so the head is measured here too.
pub fn head_too_large<B>(req: &http::Request<B>) -> bool {
    let line = req.method().as_str().len() + req.uri().to_string().len() + 12;
    let headers: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    line + headers > MAX_HEAD_BYTES
}

/// The `Via` value regcache adds to what it forwards.
pub const VIA: &str = "1.1 regcache";

/// Removes hop-by-hop headers, including any named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// Appends regcache to the message's `Via` chain.
pub fn add_via(headers: &mut HeaderMap) {
    headers.append(header::VIA, HeaderValue::from_static(VIA));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_size_limit() {
        let small = http::Request::get("/").header("x", "y").body(()).unwrap();
        assert!(!head_too_large(&small));
        let big = http::Request::get("/")
            .header("x", "a".repeat(MAX_HEAD_BYTES))
            .body(())
            .unwrap();
        assert!(head_too_large(&big));
    }

    #[test]
    fn removes_fixed_and_connection_named_headers_only() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, X-Foo"));
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            "proxy-authorization",
            HeaderValue::from_static("Basic eA=="),
        );
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("authorization", HeaderValue::from_static("Bearer t"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["authorization", "accept"]);
    }
}
