//! Serving registry requests that arrive inside an intercepted connection (or
//! in absolute form): today every request is forwarded to its upstream with
//! bodies streamed both ways; the cache decisions will live here too.

pub mod headers;
pub mod log;

use std::net::SocketAddr;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use crate::body::{self, Body};
use crate::upstream::Upstream;
use headers::{add_via, strip_hop_by_hop};
use log::{LoggedBody, RequestLog};

/// Where requests on one connection go: the host the client asked for.
#[derive(Debug, Clone)]
pub struct Origin {
    /// `https` inside intercepted CONNECT tunnels, `http` for absolute-form.
    pub scheme: Scheme,
    /// Host and port (the port only when it is not the scheme's default).
    pub authority: Authority,
}

impl Origin {
    /// The origin of an intercepted `CONNECT host:port`.
    pub fn https(host: &str, port: u16) -> Result<Self, http::Error> {
        let authority = if port == 443 {
            host.parse::<Authority>()?
        } else {
            format!("{host}:{port}").parse::<Authority>()?
        };
        Ok(Self {
            scheme: Scheme::HTTPS,
            authority,
        })
    }
}

/// Answers one request for `origin` from `client`, and logs it.
pub async fn handle(
    upstream: &Upstream,
    origin: &Origin,
    client: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let mut log = RequestLog::start(
        client,
        origin.authority.to_string(),
        req.method().clone(),
        req.uri().path().to_string(),
    );
    let response = forward(upstream, origin, req).await;
    log.status = response.status();
    response.map(|b| http_body_util::BodyExt::boxed(LoggedBody::new(b, log)))
}

/// Sends the request on to `origin` and streams its answer back.
pub async fn forward(
    upstream: &Upstream,
    origin: &Origin,
    req: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, incoming) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let uri = match Uri::builder()
        .scheme(origin.scheme.clone())
        .authority(origin.authority.clone())
        .path_and_query(path)
        .build()
    {
        Ok(uri) => uri,
        Err(e) => {
            return error_response(StatusCode::BAD_REQUEST, &format!("bad request target: {e}"))
        }
    };
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(http::header::HOST);
    add_via(&mut parts.headers);
    let req = Request::from_parts(parts, body::stream(incoming));

    match upstream.send(req).await {
        Ok(resp) => {
            let (mut parts, incoming) = resp.into_parts();
            parts.version = Version::HTTP_11;
            strip_hop_by_hop(&mut parts.headers);
            add_via(&mut parts.headers);
            Response::from_parts(parts, body::stream(incoming))
        }
        Err(e) => {
            tracing::warn!(upstream = %origin.authority, error = %error_chain(&e), "upstream request failed");
            error_response(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "regcache: cannot reach {}: {}",
                    origin.authority,
                    error_chain(&e)
                ),
            )
        }
    }
}

/// A short plain-text error answer.
pub fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    let mut resp = Response::new(body::full(format!("{message}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
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
