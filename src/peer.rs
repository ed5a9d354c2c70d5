//! The peer endpoint between the nodes of a cluster (`peer_listen`).
//!
//! The node that won a blob's lease fetches it from the registry for the
//! whole cluster; the others, instead of waiting for the finished object
//! in the shared tier, stream it from that node while it arrives:
//! `GET /peer/v1/blobs/<digest>` on its peer endpoint answers with the
//! download in progress (or the cached file), as its own clients get it
//! (the last byte only once the digest matched there).
//!
//! - **Nodes only.** Mutual TLS with certificates of the regcache CA for
//!   [`crate::tls::peer::PEER_NAME`] ([`crate::tls::peer`]): a client
//!   without one gets no byte, not even an HTTP answer.
//! - **Bytes, not trust.** The endpoint serves content by digest to a
//!   node; the calling node has asked the registry, with its client's
//!   credential, before it asks here ([`crate::serve`]), and verifies the
//!   bytes like any download before its last one reaches a client.
//! - **Bounded.** At most [`MAX_CONNECTIONS`] connections, handshakes and
//!   heads timed, a stalled body cut after [`STALL`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use crate::cache::{read, Cache};
use crate::http::body::{self, Body, BoxError};
use crate::registry::digest::Digest;
use crate::shared::LEASE_TTL;
use crate::tls::peer::{is_peer_certificate, peer_server_name, PeerTls};

/// The path prefix of a blob on the peer endpoint.
pub const PEER_PATH: &str = "/peer/v1/blobs/";

/// Connections the endpoint serves at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 256;

/// How long a TLS handshake, a connect, or a request head may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the endpoint waits for a download that is about to start (the
/// lease was won, the registry has not answered yet) before it says 404.
const START_WAIT: Duration = LEASE_TTL;

/// How long a body may send nothing before it is cut.
pub const STALL: Duration = Duration::from_secs(30);

/// The peer endpoint of this node.
pub struct PeerServer {
    cache: Arc<Cache>,
    tls: TlsAcceptor,
    slots: Arc<Semaphore>,
}

impl PeerServer {
    /// An endpoint serving `cache`'s blobs with this node's peer TLS.
    pub fn new(cache: Arc<Cache>, tls: &PeerTls) -> Self {
        Self {
            cache,
            tls: TlsAcceptor::from(tls.server.clone()),
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }

    /// Serves one connection: mutual TLS, then HTTP/1.1 requests until the
    /// node closes it or `shutdown` is cancelled.
    pub async fn serve(&self, stream: TcpStream, shutdown: CancellationToken) {
        let Ok(_slot) = self.slots.clone().try_acquire_owned() else {
            tracing::warn!("peer endpoint: {MAX_CONNECTIONS} connections open, closing a new one");
            return;
        };
        let peer = stream.peer_addr().ok();
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.tls.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                crate::metrics::get().peer_request("served", "refused");
                tracing::info!(?peer, error = %e, "peer endpoint: TLS refused (not a node of this cluster?)");
                return;
            }
            Err(_) => return,
        };
        let member = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .is_some_and(is_peer_certificate);
        if !member {
            crate::metrics::get().peer_request("served", "refused");
            tracing::info!(
                ?peer,
                "peer endpoint: a client certificate of the CA, but not a node's"
            );
            return;
        }
        let cache = self.cache.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let cache = cache.clone();
            async move { Ok::<_, Infallible>(answer(&cache, &req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HANDSHAKE_TIMEOUT)
            .max_buf_size(crate::http::headers::MAX_HEAD_BYTES)
            .serve_connection(TokioIo::new(tls), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(?peer, error = %e, "peer connection ended with an error");
        }
    }
}

/// One request of a node: the blob of the path, cached or being fetched.
async fn answer(cache: &Arc<Cache>, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only");
    }
    let Some(digest) = req
        .uri()
        .path()
        .strip_prefix(PEER_PATH)
        .and_then(|d| d.parse::<Digest>().ok())
    else {
        return plain(StatusCode::NOT_FOUND, "not a blob path");
    };
    let served = blob(cache, &digest).await;
    let result = if served.status() == StatusCode::OK {
        "ok"
    } else {
        "missing"
    };
    crate::metrics::get().peer_request("served", result);
    served
}

/// The blob `digest` from the cache, or from the download under way.
async fn blob(cache: &Arc<Cache>, digest: &Digest) -> Response<Body> {
    if !cache.contains(digest) {
        cache.committed(digest).await;
    }
    if let Some(cached) = cache.get(digest) {
        let path = cached.path.clone();
        if let Ok(Ok(file)) = tokio::task::spawn_blocking(move || std::fs::File::open(path)).await {
            let body = read::complete(Arc::new(file), 0, cached.size, cached.lease.clone());
            return with_length(body, Some(cached.size));
        }
    }
    let Some(fill) = cache.running_fill(digest) else {
        return plain(StatusCode::NOT_FOUND, "not being fetched here");
    };
    if !matches!(
        tokio::time::timeout(START_WAIT, fill.started()).await,
        Ok(true)
    ) {
        return plain(StatusCode::NOT_FOUND, "not being fetched here");
    }
    let Some(file) = fill.file() else {
        return plain(StatusCode::NOT_FOUND, "not being fetched here");
    };
    let total = fill.watch().borrow().total;
    let body = read::growing(fill, file, 0, total.unwrap_or(u64::MAX));
    with_length(body, total)
}

fn with_length(body: Body, length: Option<u64>) -> Response<Body> {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(len) = length {
        h.insert(CONTENT_LENGTH, http::HeaderValue::from(len));
    }
    resp
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(body::full(text));
    *resp.status_mut() = status;
    resp
}

/// A blob streaming from another node.
pub struct PeerBlob {
    /// Its length, when the node knows it.
    pub size: Option<u64>,
    /// Its bytes (cut with an error after [`STALL`] without any).
    pub body: Body,
}

/// Calls to the peer endpoints of the other nodes.
pub struct PeerClient {
    tls: TlsConnector,
    /// Blobs streamed from other nodes since start.
    reads: std::sync::atomic::AtomicU64,
    /// This node's own advertised address: never called.
    own: Option<String>,
}

impl PeerClient {
    /// A client presenting this node's peer certificate; `own` is this
    /// node's advertised address, if it has an endpoint.
    pub fn new(tls: &PeerTls, own: Option<String>) -> Self {
        Self {
            tls: TlsConnector::from(tls.client.clone()),
            reads: std::sync::atomic::AtomicU64::new(0),
            own,
        }
    }

    /// Blobs streamed from other nodes' endpoints since start.
    pub fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Streams `digest` from the node at `addr` (`host:port`), if that
    /// node is fetching it (or has it) and answers; None otherwise (the
    /// caller then waits for the shared tier).
    pub async fn open(&self, addr: &str, digest: &Digest) -> Option<PeerBlob> {
        if self.own.as_deref() == Some(addr) {
            return None;
        }
        match self.request(addr, digest).await {
            Ok(Some(blob)) => {
                crate::metrics::get().peer_request("fetched", "ok");
                self.reads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Some(blob)
            }
            Ok(None) => {
                crate::metrics::get().peer_request("fetched", "missing");
                None
            }
            Err(e) => {
                crate::metrics::get().peer_request("fetched", "error");
                tracing::info!(peer = addr, %digest, error = %e, "peer endpoint not usable: waiting for the shared tier");
                None
            }
        }
    }

    async fn request(&self, addr: &str, digest: &Digest) -> Result<Option<PeerBlob>, BoxError> {
        let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out")??;
        let _ = tcp.set_nodelay(true);
        let tls =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, self.tls.connect(peer_server_name(), tcp))
                .await
                .map_err(|_| "TLS handshake timed out")??;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::get(format!("{PEER_PATH}{digest}"))
            .header(HOST, addr)
            .body(body::empty())?;
        // The endpoint waits up to START_WAIT for a download to start.
        let resp = tokio::time::timeout(START_WAIT + HANDSHAKE_TIMEOUT, sender.send_request(req))
            .await
            .map_err(|_| "no answer")??;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            other => return Err(format!("answered {other}").into()),
        }
        let size = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok(Some(PeerBlob {
            size,
            body: stalling(resp.into_body()),
        }))
    }
}

/// `body`, ended with an error when it sends nothing for [`STALL`].
fn stalling(body: Incoming) -> Body {
    let frames = stream::unfold(Some(body), |state| async move {
        let mut body = state?;
        match tokio::time::timeout(STALL, body.frame()).await {
            Ok(Some(Ok(frame))) => Some((Ok::<Frame<Bytes>, BoxError>(frame), Some(body))),
            Ok(Some(Err(e))) => Some((Err(e.into()), None)),
            Ok(None) => None,
            Err(_) => Some((Err("the peer sent nothing for 30 s".into()), None)),
        }
    });
    StreamBody::new(frames).boxed()
}
