//! The access log: one line per request, written when its response ends.
//!
//! [`LoggedBody`] wraps a response body, counts the bytes that reach the
//! client and writes the line when the body finishes or is dropped (a client
//! that hangs up still gets its line, marked incomplete). Only the path is
//! logged, never the query or any header value, so credentials and signed
//! URLs stay out of the log.
//!
//! [`serve_request`] is the request layer every way in goes through: it
//! starts the line from the request, answers an oversized head with 431, and
//! attaches the line to the handler's response. A handler that knows more
//! (the registry a mirror path named, how the cache served it) says so in a
//! [`LogNote`] on its response.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use super::body::{Body, BoxError};
use super::error::too_large;
use super::headers::head_too_large;

/// What a handler adds to its response's log line, as a response extension
/// read (and removed) by [`logged`].
#[derive(Debug, Clone, Default)]
pub struct LogNote {
    /// The host to log instead of the one the request named (the registry a
    /// mirror path resolved to).
    pub host: Option<String>,
    /// The path to log instead of the request's (the registry path of a
    /// mirror request).
    pub path: Option<String>,
    /// How the response was served (`HIT`, `INTERCEPT`, ...).
    pub cache: Option<&'static str>,
    /// The canonical registry the request was served for (the `registry`
    /// label of its metrics).
    pub registry: Option<String>,
    /// No line for this request: it writes its own (a tunnel).
    pub discard: bool,
}

impl LogNote {
    /// A note that only names how the response was served.
    pub fn cache(cache: &'static str) -> Self {
        Self {
            cache: Some(cache),
            ..Self::default()
        }
    }

    /// Attaches this note to `resp`.
    pub fn on(self, mut resp: Response<Body>) -> Response<Body> {
        resp.extensions_mut().insert(self);
        resp
    }
}

/// The request layer: one access-log line per request, and 431 for a head
/// over [`super::headers::MAX_HEAD_BYTES`] before `handler` sees it.
pub async fn serve_request<B, F, Fut>(
    client: SocketAddr,
    req: Request<B>,
    handler: F,
) -> Response<Body>
where
    F: FnOnce(Request<B>) -> Fut,
    Fut: Future<Output = Response<Body>>,
{
    let log = RequestLog::of(client, &req);
    if head_too_large(&req) {
        return logged(too_large(), log);
    }
    logged(handler(req).await, log)
}

/// What one request log line says.
#[derive(Debug)]
pub struct RequestLog {
    /// The client's address.
    pub client: SocketAddr,
    /// The registry host (authority) the request was for.
    pub host: String,
    /// The request method.
    pub method: Method,
    /// The request path, without the query.
    pub path: String,
    /// The response status.
    pub status: StatusCode,
    /// How the response was served: `-` for a pass-through.
    pub cache: &'static str,
    /// The canonical registry, when the serve layer named one.
    pub registry: Option<String>,
    started: Instant,
    bytes: u64,
    complete: bool,
    emit: bool,
}

impl RequestLog {
    /// Starts timing a request.
    pub fn start(client: SocketAddr, host: String, method: Method, path: String) -> Self {
        Self {
            client,
            host,
            method,
            path,
            status: StatusCode::OK,
            cache: "-",
            registry: None,
            started: Instant::now(),
            bytes: 0,
            complete: false,
            emit: true,
        }
    }

    /// Starts timing `req`, named as [`request_target`] names it.
    pub fn of<B>(client: SocketAddr, req: &Request<B>) -> Self {
        let (host, path) = request_target(req);
        Self::start(client, host, req.method().clone(), path)
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        if !self.emit {
            return;
        }
        let elapsed = self.started.elapsed();
        let status = self.status.as_u16();
        // A CONNECT's own answer is not a request for content (the requests
        // inside the tunnel are); its refusal is.
        if self.method != Method::CONNECT || status >= 400 {
            crate::metrics::get().request(
                self.registry.as_deref().unwrap_or(""),
                &self.path,
                self.cache,
                status,
                self.bytes,
                elapsed,
            );
        }
        tracing::info!(
            target: "regcache::access",
            client = %self.client,
            host = %self.host,
            method = %self.method,
            path = %self.path,
            status = self.status.as_u16(),
            bytes = self.bytes,
            duration_ms = elapsed.as_millis() as u64,
            cache = self.cache,
            complete = self.complete,
            "request"
        );
    }
}

/// The host and path a log line names for `req`: the CONNECT target's host
/// and the target itself, or the absolute-form authority (else the `Host`
/// header) and the request path.
pub fn request_target<B>(req: &Request<B>) -> (String, String) {
    let uri = req.uri();
    match uri.authority() {
        Some(authority) if req.method() == Method::CONNECT => {
            (authority.host().to_string(), authority.to_string())
        }
        Some(authority) => (authority.to_string(), uri.path().to_string()),
        None => (
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("")
                .to_string(),
            uri.path().to_string(),
        ),
    }
}

/// Attaches `log` to `resp`: its status (and the handler's [`LogNote`]) now,
/// its line when the body ends.
pub fn logged(mut resp: Response<Body>, mut log: RequestLog) -> Response<Body> {
    if let Some(note) = resp.extensions_mut().remove::<LogNote>() {
        if note.discard {
            log.emit = false;
        }
        if let Some(host) = note.host {
            log.host = host;
        }
        if let Some(path) = note.path {
            log.path = path;
        }
        log.cache = note.cache.unwrap_or(log.cache);
        if note.registry.is_some() {
            log.registry = note.registry;
        }
    }
    log.status = resp.status();
    let length = resp
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    resp.map(|body| LoggedBody::new(body, log, length).boxed())
}

/// A response body that writes its request's log line when it ends.
pub struct LoggedBody {
    inner: Body,
    log: RequestLog,
    /// The announced length: hyper stops polling once it is sent.
    length: Option<u64>,
}

impl LoggedBody {
    /// Wraps `inner`; the line is written when the result ends or is dropped.
    pub fn new(inner: Body, log: RequestLog, length: Option<u64>) -> Self {
        let mut body = Self { inner, log, length };
        if body.inner.is_end_stream() {
            body.ended();
        }
        body
    }

    /// The body ended: complete when it carried the announced length (a
    /// body that ends short of it is a cut response: hyper aborts it). A
    /// HEAD, 204 or 304 announces a length it never carries.
    fn ended(&mut self) {
        let bodiless = self.log.method == Method::HEAD
            || matches!(
                self.log.status,
                StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
            );
        self.log.complete = bodiless || self.length.is_none_or(|length| length == self.log.bytes);
    }
}

impl HttpBody for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.log.bytes += data.len() as u64;
                }
                if this.inner.is_end_stream() || this.length == Some(this.log.bytes) {
                    this.ended();
                }
            }
            Poll::Ready(None) => this.ended(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    /// Reads `body` (announcing `length`) to its end; whether the line
    /// says complete.
    async fn logged_complete(
        method: Method,
        status: StatusCode,
        body: Body,
        length: Option<u64>,
    ) -> bool {
        let client = SocketAddr::from(([127, 0, 0, 1], 1));
        let mut log = RequestLog::start(client, "r.example".into(), method, "/v2/".into());
        log.status = status;
        let mut logged = LoggedBody::new(body, log, length);
        while let Some(frame) = logged.frame().await {
            assert!(frame.is_ok());
        }
        logged.log.emit = false;
        logged.log.complete
    }

    #[tokio::test]
    async fn a_body_is_complete_only_with_its_announced_length() {
        let full = || {
            Full::new(Bytes::from_static(b"abc"))
                .map_err(|e| match e {})
                .boxed()
        };
        let empty = || http_body_util::Empty::new().map_err(|e| match e {}).boxed();
        let ok = StatusCode::OK;
        // (method, status, body, announced length) -> complete
        let table = [
            (Method::GET, ok, full(), Some(3), true),
            (Method::GET, ok, full(), None, true),
            // Ends after 3 of 10 announced bytes: cut, whatever the body says.
            (Method::GET, ok, full(), Some(10), false),
            (Method::GET, ok, empty(), Some(10), false),
            // Lengths these never carry.
            (Method::HEAD, ok, empty(), Some(10), true),
            (
                Method::GET,
                StatusCode::NOT_MODIFIED,
                empty(),
                Some(10),
                true,
            ),
            (Method::GET, StatusCode::NO_CONTENT, empty(), Some(10), true),
        ];
        for (method, status, body, length, want) in table {
            let got = logged_complete(method.clone(), status, body, length).await;
            assert_eq!(got, want, "{method} {status} announcing {length:?}");
        }
    }
}
