//! Plain-text error answers and error chains for logs and bodies.

use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Response, StatusCode};

use super::body::{self, Body};

/// A short plain-text error answer.
pub fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    let mut resp = Response::new(body::full(format!("{message}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// 431 for a request head over [`super::headers::MAX_HEAD_BYTES`]; the
/// connection closes after it.
pub fn too_large() -> Response<Body> {
    let mut resp = error_response(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "request headers larger than 64 KiB",
    );
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// `resp` as the answer to a `method` request: for `HEAD`, its headers and
/// the length its body would have, without the body (which hyper's HTTP/2
/// server would otherwise send, a protocol error for the client).
pub fn for_method(method: &Method, resp: Response<Body>) -> Response<Body> {
    use http_body::Body as _;
    if method != Method::HEAD {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    if let Some(len) = body.size_hint().exact() {
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    Response::from_parts(parts, body::empty())
}

/// An error and its causes on one line: "a: b: c".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn an_error_chain_names_every_cause_once() {
        let err = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&err), "outer: inner");
        let io = std::io::Error::other("alone");
        assert_eq!(error_chain(&io), "alone");
    }

    #[test]
    fn a_head_answer_keeps_the_length_and_drops_the_body() {
        use http_body::Body as _;
        let resp = for_method(&Method::HEAD, error_response(StatusCode::NOT_FOUND, "gone"));
        assert_eq!(resp.headers()[CONTENT_LENGTH], "5");
        assert!(resp.body().is_end_stream());
        let resp = for_method(&Method::GET, error_response(StatusCode::NOT_FOUND, "gone"));
        assert!(!resp.body().is_end_stream());
    }
}
