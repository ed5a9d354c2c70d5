//! The one body type that flows through regcache, and small constructors.
//!
//! Requests and responses from hyper, files from the cache and generated
//! answers all become a [`Body`], so every layer speaks the same type.
//! Bodies are streamed: nothing here collects a body into memory.
//! [`IdleLimited`] cuts a request body whose client stops sending, or
//! trickles.

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

/// The slowest request body regcache waits for, in bytes per second of
/// waiting on the client: about 8 kbit/s, far below any real upload.
pub const MIN_BODY_RATE: u64 = 1024;

/// A request body that fails when the client sends nothing for `limit`, or
/// less than [`MIN_BODY_RATE`] bytes per second over each `limit` of
/// waiting, while regcache is waiting for it: a stalled or trickling upload
/// is cut (its error aborts the upstream request it feeds) instead of
/// holding a connection open indefinitely. Only time spent waiting on the
/// client counts, never time the consumer (a slow upstream) takes between
/// reads.
pub struct IdleLimited<B> {
    inner: B,
    limit: std::time::Duration,
    what: String,
    /// Since when the current wait for the client has lasted.
    wait_started: Option<std::time::Instant>,
    /// Time waited on the client, and bytes it sent, in the current window.
    window_wait: std::time::Duration,
    window_bytes: u64,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

/// The error of an [`IdleLimited`] body whose client went silent.
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing for {secs} s (client_idle_timeout)", secs = .0.as_secs())]
pub struct ClientIdle(pub std::time::Duration);

/// The error of an [`IdleLimited`] body whose client sends too slowly.
#[derive(Debug, thiserror::Error)]
#[error(
    "the client sent {bytes} bytes in {secs} s, less than {MIN_BODY_RATE} bytes a second \
     (client_idle_timeout)",
    bytes = .bytes,
    secs = .waited.as_secs()
)]
pub struct ClientTooSlow {
    /// Bytes the client sent in the window.
    pub bytes: u64,
    /// Time waited on it in that window.
    pub waited: std::time::Duration,
}

/// Whether a window of `waited` on the client that brought `bytes` is too
/// slow, once the window is at least `limit` long.
fn too_slow(bytes: u64, waited: std::time::Duration, limit: std::time::Duration) -> bool {
    waited >= limit && u128::from(bytes) * 1000 < u128::from(MIN_BODY_RATE) * waited.as_millis()
}

impl<B> IdleLimited<B> {
    /// Wraps `inner`; `what` (method and path) names the request in the log.
    pub fn new(inner: B, limit: std::time::Duration, what: String) -> Self {
        Self {
            inner,
            limit,
            what,
            wait_started: None,
            window_wait: std::time::Duration::ZERO,
            window_bytes: 0,
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
                if let Some(started) = this.wait_started.take() {
                    this.window_wait += started.elapsed();
                }
                if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(|f| f.data_ref())) {
                    this.window_bytes += data.map_or(0, |d| d.len() as u64);
                }
                if too_slow(this.window_bytes, this.window_wait, this.limit) {
                    tracing::warn!(
                        request = %this.what,
                        bytes = this.window_bytes,
                        waited_secs = this.window_wait.as_secs(),
                        "request body too slow: cutting the request and aborting its upstream request"
                    );
                    return Poll::Ready(Some(Err(Box::new(ClientTooSlow {
                        bytes: this.window_bytes,
                        waited: this.window_wait,
                    }))));
                }
                if this.window_wait >= this.limit {
                    this.window_wait = std::time::Duration::ZERO;
                    this.window_bytes = 0;
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if this.wait_started.is_none() {
                    this.wait_started = Some(std::time::Instant::now());
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn too_slow_table() {
        let limit = Duration::from_secs(30);
        for (bytes, waited, want) in [
            (0, 29, false),            // not a whole window yet
            (30, 30, true),            // one byte a second
            (30 * 1024 - 1, 30, true), // just under the rate
            (30 * 1024, 30, false),    // at the rate
            (10 << 20, 31, false),     // a real upload
        ] {
            assert_eq!(
                too_slow(bytes, Duration::from_secs(waited), limit),
                want,
                "{bytes} bytes in {waited} s"
            );
        }
    }

    /// A body of `n` one-byte frames, each after `gap`.
    fn trickle(
        n: usize,
        gap: Duration,
    ) -> impl http_body::Body<Data = Bytes, Error = BoxError> + Unpin {
        let frames = futures_util::stream::unfold(0, move |i| async move {
            if i == n {
                return None;
            }
            tokio::time::sleep(gap).await;
            Some((
                Ok::<_, BoxError>(http_body::Frame::data(Bytes::from_static(b"x"))),
                i + 1,
            ))
        });
        http_body_util::StreamBody::new(Box::pin(frames))
    }

    #[tokio::test]
    async fn a_trickling_body_is_cut_and_a_steady_one_is_not() {
        let limit = Duration::from_millis(200);
        let slow = IdleLimited::new(
            trickle(1000, Duration::from_millis(10)),
            limit,
            "PUT /x".into(),
        );
        let err = slow
            .collect()
            .await
            .expect_err("a trickle of 100 bytes a second is cut");
        assert!(err.is::<ClientTooSlow>(), "{err}");

        let steady = IdleLimited::new(trickle(20, Duration::ZERO), limit, "PUT /y".into());
        let body = steady
            .collect()
            .await
            .expect("a body sent at once passes")
            .to_bytes();
        assert_eq!(body.len(), 20);
    }
}
