//! The client side: regcache's connections to upstream registries.
//!
//! One pooled hyper client speaks HTTP/1.1 (one connection per download,
//! see [`Upstream::new`]) over verified TLS, or plain HTTP for `http://`
//! registries. Connections go where
//! `--resolve` says, else through the parent proxy (`upstream_proxy`) unless
//! the host is in `upstream_no_proxy`, else where DNS says: see [`Dialer`].
//!
//! Every response from a registry (or a CDN it redirected to, or its token
//! service) is recorded in [`crate::metrics`] here: status, time to the
//! head, rate-limit headers, and, when its body ends, the bytes received
//! ([`UpstreamBody`]). Plain pass-through to hosts that are not registries
//! is not recorded.

mod connector;
pub mod redirect;
pub mod token;

pub use connector::{
    connect_tcp, AddressRefused, Dialer, HandshakeError, Mode, OwnListeners, ParentProxy,
    ParentProxyError, ReachedAddresses, RelayToSelf, ResolvingConnector, CONNECT_TIMEOUT,
    MAX_PROXY_REPLY_BYTES,
};

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Scheme;
use http::{Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{Config, ResolveMap};
use crate::http::body::Body;
use crate::tls::{client::upstream_config, TlsError};

/// An upstream request failed before a response arrived.
#[derive(Debug, thiserror::Error)]
#[error("upstream request failed: {0}")]
pub struct UpstreamError(#[from] hyper_util::client::legacy::Error);

type HttpClient = Client<HttpsConnector<ResolvingConnector>, Body>;

/// The shared upstream client. Cheap to clone.
///
/// Three connection pools, one per [`Mode`]: registry origins, the targets
/// of their redirects (checked against the address rule), and plain
/// pass-through to hosts that are not registries.
#[derive(Clone)]
pub struct Upstream {
    client: HttpClient,
    redirect_client: HttpClient,
    plain_client: HttpClient,
    dialer: Dialer,
    rules: Arc<crate::policy::RedirectRules>,
    tokens: Arc<token::TokenCache>,
    /// Whether responses are recorded in the metrics (not for [`Upstream::plain`]).
    recorded: bool,
}

/// An upstream response body: counts the bytes that arrive and adds them
/// to `regcache_upstream_bytes_total` once, when the body ends or is
/// dropped.
pub struct UpstreamBody {
    inner: Incoming,
    /// The registry label, None when not recorded.
    registry: Option<String>,
    bytes: u64,
}

impl UpstreamBody {
    fn new(inner: Incoming, registry: Option<String>) -> Self {
        Self {
            inner,
            registry,
            bytes: 0,
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(registry) = &self.registry {
            if self.bytes > 0 {
                crate::metrics::get().upstream_bytes(registry, self.bytes);
            }
        }
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes += data.len() as u64;
            }
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

/// The `registry` label of requests to `uri`: the canonical host for
/// `https`, `http://host:port` for a plain-http registry (as the cache keys
/// them).
pub fn registry_label(uri: &Uri) -> String {
    let authority = uri.authority().map_or("", |a| a.as_str());
    if uri.scheme() == Some(&Scheme::HTTP) {
        let port = uri.port_u16().unwrap_or(80);
        let host = crate::registry::hosts::normalize_host(uri.host().unwrap_or(""));
        format!("http://{}", crate::registry::hosts::HostPort { host, port })
    } else {
        crate::registry::hosts::canonical_registry(authority)
    }
}

impl Upstream {
    /// Builds the client from the configuration's trust, resolve and parent
    /// proxy settings.
    pub fn new(config: &Config) -> Result<Self, TlsError> {
        let dialer = Dialer::from_config(config);
        if let Some(parent) = dialer.parent() {
            tracing::info!(
                proxy = %parent.redacted(),
                no_proxy = config.upstream_no_proxy.len(),
                "upstream connections go through a parent proxy"
            );
        }
        let tls = upstream_config(&config.upstream_ca)?;
        // HTTP/1.1 only: each download gets its own connection, and a blob
        // arrives 1.4 times faster than as 16 KiB frames multiplexed on one
        // HTTP/2 connection (bench/run.sh, cold blob from distribution).
        let client = |mode| {
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config((*tls).clone())
                .https_or_http()
                .enable_http1()
                .wrap_connector(ResolvingConnector::with_mode(dialer.clone(), mode));
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(https)
        };
        Ok(Self {
            client: client(Mode::Registry),
            redirect_client: client(Mode::Redirect),
            plain_client: client(Mode::Plain),
            rules: Arc::new(crate::policy::RedirectRules::from_config(config)),
            dialer,
            tokens: Arc::default(),
            recorded: true,
        })
    }

    /// Sends a request whose URI is absolute (`https://host/path`).
    pub async fn send(&self, req: Request<Body>) -> Result<Response<UpstreamBody>, UpstreamError> {
        let registry = self.recorded.then(|| registry_label(req.uri()));
        exchange(&self.client, req, registry).await
    }

    /// The same client for plain pass-through to hosts that are not
    /// registries: its connections are kept apart from the registries'.
    pub fn plain(&self) -> Upstream {
        Upstream {
            client: self.plain_client.clone(),
            recorded: false,
            ..self.clone()
        }
    }

    /// The resolve overrides, for tunnels.
    pub fn resolve(&self) -> &ResolveMap {
        self.dialer.resolve()
    }

    /// How upstream connections are made, for tunnels.
    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }
}

/// Sends `req` on `client`; with a `registry` label, records the answer (or
/// the failure) in the metrics and counts its body's bytes.
async fn exchange(
    client: &HttpClient,
    req: Request<Body>,
    registry: Option<String>,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    let Some(registry) = registry else {
        let resp = client.request(req).await?;
        return Ok(resp.map(|b| UpstreamBody::new(b, None)));
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = Instant::now();
    let metrics = crate::metrics::get();
    match client.request(req).await {
        Ok(resp) => {
            metrics.upstream_response(
                &registry,
                method.as_str(),
                &path,
                resp.status().as_u16(),
                resp.headers(),
                started.elapsed(),
            );
            Ok(resp.map(|b| UpstreamBody::new(b, Some(registry))))
        }
        Err(e) => {
            metrics.upstream_failed(&registry, method.as_str(), started.elapsed());
            Err(e.into())
        }
    }
}
