//! The access log: one line per request, written when its response ends.
//!
//! [`LoggedBody`] wraps a response body, counts the bytes that reach the
//! client and writes the line when the body finishes or is dropped (a client
//! that hangs up still gets its line, marked incomplete). Only the path is
//! logged, never the query or any header value, so credentials and signed
//! URLs stay out of the log.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{Method, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::body::{Body, BoxError};

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
            started: Instant::now(),
            bytes: 0,
            complete: false,
            emit: true,
        }
    }

    /// Drops the line unwritten, for requests that log elsewhere.
    pub fn discard(mut self) {
        self.emit = false;
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        if !self.emit {
            return;
        }
        tracing::info!(
            target: "regcache::access",
            client = %self.client,
            host = %self.host,
            method = %self.method,
            path = %self.path,
            status = self.status.as_u16(),
            bytes = self.bytes,
            duration_ms = self.started.elapsed().as_millis() as u64,
            cache = self.cache,
            complete = self.complete,
            "request"
        );
    }
}

/// Attaches `log` to `resp`: its status now, its line when the body ends.
pub fn logged(resp: Response<Body>, mut log: RequestLog) -> Response<Body> {
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
    pub fn new(inner: Body, mut log: RequestLog, length: Option<u64>) -> Self {
        log.complete = inner.is_end_stream();
        Self { inner, log, length }
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
                    this.log.complete = true;
                }
            }
            Poll::Ready(None) => this.log.complete = true,
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
