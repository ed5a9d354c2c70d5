//! The one body type that flows through regcache, and small constructors.
//!
//! Requests and responses from hyper, files from the cache and generated
//! answers all become a [`Body`], so every layer speaks the same type.
//! Bodies are streamed: nothing here collects a body into memory.
//! [`IdleLimited`] cuts a request body whose client stops sending.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// Any error a body can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed HTTP body.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Wraps any streamed body (e.g. hyper's `Incoming`).
pub fn stream<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// A request body that fails when the client sends nothing for `limit`
/// while regcache is waiting for it: a stalled upload is cut (its error
/// aborts the upstream request it feeds) instead of holding a connection
/// open indefinitely. Only time spent waiting on the client counts, never
/// time the consumer (a slow upstream) takes between reads.
pub struct IdleLimited<B> {
    inner: B,
    limit: std::time::Duration,
    what: String,
    waiting: bool,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

/// The error of an [`IdleLimited`] body whose client went silent.
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing for {secs} s (client_idle_timeout)", secs = .0.as_secs())]
pub struct ClientIdle(pub std::time::Duration);

impl<B> IdleLimited<B> {
    /// Wraps `inner`; `what` (method and path) names the request in the log.
    pub fn new(inner: B, limit: std::time::Duration, what: String) -> Self {
        Self {
            inner,
            limit,
            what,
            waiting: false,
            timer: Box::pin(tokio::time::sleep(limit)),
        }
    }
}

impl<B> http_body::Body for IdleLimited<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::future::Future;
        use std::task::Poll;
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    let deadline = tokio::time::Instant::now() + this.limit;
                    this.timer.as_mut().reset(deadline);
                }
                match this.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        tracing::warn!(
                            request = %this.what,
                            idle_secs = this.limit.as_secs(),
                            "request body stalled: the client sent nothing for client_idle_timeout; \
                             cutting the request and aborting its upstream request"
                        );
                        Poll::Ready(Some(Err(Box::new(ClientIdle(this.limit)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
