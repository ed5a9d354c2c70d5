//! Closing client connections that hold no request.
//!
//! hyper's HTTP/1.1 server closes an idle keep-alive connection after its
//! `header_read_timeout`, but its HTTP/2 server has no idle limit: a client
//! that answers pings and opens no stream would hold its connection (its TLS
//! state, task and file descriptor) forever, and so would a TLS client that
//! never sends its first bytes (hyper-util's protocol detection waits without
//! a limit). [`IdleWatch`] counts the requests in flight on one connection;
//! [`IdleWatch::idle`] resolves once none has been in flight for the timeout,
//! and the connection's server then shuts it down gracefully (GOAWAY).
//!
//! A request counts from the moment hyper hands it to the service until its
//! response body has ended or been dropped, so a blob download, whose handler
//! returns before the body is streamed, holds its connection open however
//! long it takes. The cost per request is two atomic updates and a clock
//! read; nothing is done per body chunk.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

/// The requests in flight on one client connection, and since when there
/// has been none.
#[derive(Clone)]
pub struct IdleWatch {
    inner: Arc<Inner>,
}

struct Inner {
    timeout: Duration,
    /// The origin of `last_end`.
    base: Instant,
    /// Requests begun and not yet ended.
    active: AtomicUsize,
    /// When the latest request ended, in nanoseconds since `base`.
    last_end: AtomicU64,
}

impl Inner {
    fn nanos_since_base(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }
}

impl IdleWatch {
    /// A watch for a new connection, idle from now; idle means no request
    /// in flight for `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                timeout,
                base: Instant::now(),
                active: AtomicUsize::new(0),
                last_end: AtomicU64::new(0),
            }),
        }
    }

    /// Counts one request in flight until the returned guard is dropped.
    pub fn begin(&self) -> InFlight {
        self.inner.active.fetch_add(1, Ordering::AcqRel);
        InFlight {
            inner: self.inner.clone(),
        }
    }

    /// The number of requests in flight.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Resolves once no request has been in flight for the timeout, counted
    /// from the later of this call and the end of the latest request.
    /// Cancel-safe; while requests are in flight it wakes once a timeout.
    pub async fn idle(&self) {
        let inner = &*self.inner;
        let start = Instant::now();
        loop {
            let now = Instant::now();
            // Acquire on `active` makes the `last_end` written before the
            // decrement to 0 visible.
            let wake = if inner.active.load(Ordering::Acquire) > 0 {
                now + inner.timeout
            } else {
                let last_end =
                    inner.base + Duration::from_nanos(inner.last_end.load(Ordering::Acquire));
                let deadline = start.max(last_end) + inner.timeout;
                if now >= deadline {
                    return;
                }
                deadline
            };
            tokio::time::sleep_until(wake).await;
        }
    }

    /// Wraps a service so that each of its requests is counted until its
    /// response body ends.
    pub fn service<S>(&self, inner: S) -> Watched<S> {
        Watched {
            inner,
            watch: self.clone(),
        }
    }
}

/// One request in flight; dropping it ends the request for [`IdleWatch`].
pub struct InFlight {
    inner: Arc<Inner>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.inner.nanos_since_base(Instant::now());
        // Before the decrement, so that a watcher seeing 0 sees this end.
        self.inner.last_end.fetch_max(now, Ordering::Release);
        self.inner.active.fetch_sub(1, Ordering::Release);
    }
}

/// A service whose requests are counted by an [`IdleWatch`] (see
/// [`IdleWatch::service`]).
#[derive(Clone)]
pub struct Watched<S> {
    inner: S,
    watch: IdleWatch,
}

impl<S, R, B> hyper::service::Service<R> for Watched<S>
where
    S: hyper::service::Service<R, Response = http::Response<B>>,
{
    type Response = http::Response<Counted<B>>;
    type Error = S::Error;
    type Future = WatchedFuture<S::Future>;

    fn call(&self, req: R) -> Self::Future {
        WatchedFuture {
            in_flight: Some(self.watch.begin()),
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The response future of a [`Watched`] service: the request is in
    /// flight while it runs, and its guard moves into the response body.
    pub struct WatchedFuture<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
    }
}

impl<F, B, E> Future for WatchedFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<Counted<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let in_flight = this.in_flight.take();
        Poll::Ready(result.map(|resp| resp.map(|inner| Counted { inner, in_flight })))
    }
}

pin_project! {
    /// A response body that keeps its request in flight until it ends (its
    /// last frame or an error) or is dropped.
    pub struct Counted<B> {
        #[pin]
        inner: B,
        in_flight: Option<InFlight>,
    }
}

impl<B: Body> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if matches!(frame, None | Some(Err(_))) {
            this.in_flight.take();
        }
        Poll::Ready(frame)
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
    use http_body_util::{BodyExt, Empty, Full};

    // Real time: only lower bounds are asserted, which hold however slow
    // the machine is.
    const TIMEOUT: Duration = Duration::from_millis(100);

    #[tokio::test]
    async fn a_new_connection_is_idle_after_the_timeout() {
        let watch = IdleWatch::new(TIMEOUT);
        let started = Instant::now();
        watch.idle().await;
        assert!(started.elapsed() >= TIMEOUT);
    }

    #[tokio::test]
    async fn a_request_in_flight_is_never_idle_and_its_end_restarts_the_clock() {
        let watch = IdleWatch::new(TIMEOUT);
        let started = Instant::now();
        let req = watch.begin();
        assert_eq!(watch.in_flight(), 1);
        let waiter = tokio::spawn({
            let watch = watch.clone();
            async move { watch.idle().await }
        });
        tokio::time::sleep(TIMEOUT * 3).await;
        assert!(!waiter.is_finished(), "idle with a request in flight");
        drop(req);
        assert_eq!(watch.in_flight(), 0);
        let ended = Instant::now();
        waiter.await.unwrap();
        assert!(ended.elapsed() >= TIMEOUT);
        assert!(started.elapsed() >= TIMEOUT * 4);
    }

    #[tokio::test]
    async fn a_request_during_the_wait_postpones_idle() {
        let watch = IdleWatch::new(TIMEOUT);
        let waiter = tokio::spawn({
            let watch = watch.clone();
            async move { watch.idle().await }
        });
        tokio::time::sleep(TIMEOUT / 2).await;
        let ended = Instant::now();
        drop(watch.begin());
        waiter.await.unwrap();
        assert!(ended.elapsed() >= TIMEOUT);
    }

    #[tokio::test]
    async fn the_response_body_keeps_the_request_in_flight_until_it_ends() {
        let watch = IdleWatch::new(TIMEOUT);
        let service = watch.service(hyper::service::service_fn(
            |_req: http::Request<Empty<bytes::Bytes>>| async {
                let body = Full::new(bytes::Bytes::from_static(b"blob"));
                Ok::<_, std::convert::Infallible>(http::Response::new(body))
            },
        ));
        let call =
            |svc: &Watched<_>| hyper::service::Service::call(svc, http::Request::new(Empty::new()));
        let resp = call(&service).await.unwrap();
        // The handler has returned; the body is not yet sent.
        assert_eq!(watch.in_flight(), 1);
        let mut body = resp.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "blob");
        assert!(body.frame().await.is_none());
        assert_eq!(watch.in_flight(), 0, "ended with its last frame");

        let resp = call(&service).await.unwrap();
        assert_eq!(watch.in_flight(), 1);
        drop(resp);
        assert_eq!(watch.in_flight(), 0, "ended when dropped unread");

        let pending = call(&service);
        assert_eq!(watch.in_flight(), 1, "counted from the call");
        drop(pending);
        assert_eq!(watch.in_flight(), 0, "ended when the handler is dropped");
    }
}
