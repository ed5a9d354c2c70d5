//! Intercepted CONNECT tunnels: regcache terminates the client's TLS with a
//! leaf certificate for the requested host and serves the HTTP inside (HTTP/2
//! or HTTP/1.1, as ALPN chose) through [`crate::serve`].
//!
//! The certificate is minted for the CONNECT host only: a ClientHello whose
//! SNI names another host, or is not a DNS host name, gets a fatal
//! `unrecognized_name` alert (see [`crate::tls::sni`]); one without SNI
//! (clients send none for IP addresses) gets the CONNECT host's leaf.
//! Requests always go to the CONNECT host, whatever Host the client sends.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use super::idle::IdleWatch;
use super::ConnContext;
use crate::access::ProxyUser;
use crate::http::log::serve_request;
use crate::serve::{self, Origin, Target};
use crate::tls::sni::{choose_leaf, LeafChoice};

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// A plaintext TLS record holding a fatal `unrecognized_name` alert (112),
/// sent before any key exchange when a ClientHello asks for a name that
/// regcache does not answer for.
const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// Serves one intercepted tunnel until the client closes it or shutdown.
/// `proxy_user` marks every request inside when the CONNECT was made by a
/// proxy user.
#[tracing::instrument(name = "tunnel", skip_all, fields(client = %ctx.peer, host = %host))]
pub async fn serve_tunnel(
    ctx: ConnContext,
    upgraded: Upgraded,
    host: String,
    port: u16,
    proxy_user: Option<ProxyUser>,
) {
    let origin = match Origin::https(&host, port) {
        Ok(origin) => origin,
        Err(e) => {
            tracing::info!(host, error = %e, "cannot intercept: bad host");
            return;
        }
    };
    let own = [host.clone()];
    let Some(tls) = accept_tls(&ctx, TokioIo::new(upgraded), &own, &host, None).await else {
        return;
    };
    let state = ctx.app.state.clone();
    let peer = ctx.peer;
    let target = Arc::new(Target::new(origin));
    let service = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        if let Some(user) = proxy_user {
            req.extensions_mut().insert(user);
        }
        let (state, target) = (state.clone(), target.clone());
        async move {
            let resp = serve_request(peer, req, |req| async move {
                serve::handle(&state, &target, req).await
            });
            Ok::<_, Infallible>(resp.await)
        }
    });
    serve_http(&ctx, tls, service).await;
}

/// Answers a client's TLS handshake with `fixed` if given, else with a leaf
/// minted by the regcache CA for its SNI name when that is one of `own`
/// (for `fallback` when it sent no SNI); any other SNI gets a TLS alert and
/// a log line. None if the handshake failed or was refused (logged).
pub async fn accept_tls<IO>(
    ctx: &ConnContext,
    io: IO,
    own: &[String],
    fallback: &str,
    fixed: Option<Arc<rustls::ServerConfig>>,
) -> Option<TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let acceptor = LazyConfigAcceptor::new(Acceptor::default(), io);
    let start = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            tracing::info!(host = fallback, error = %e, "client did not start TLS");
            return None;
        }
        Err(_) => {
            tracing::info!(host = fallback, "client did not start TLS in time");
            return None;
        }
    };
    let sni = start.client_hello().server_name().map(str::to_owned);
    let name = sni.clone().unwrap_or_else(|| fallback.to_string());
    let config = match fixed {
        Some(config) => config,
        None => match choose_leaf(own, fallback, sni.as_deref()) {
            LeafChoice::Mint(name) => match ctx.app.minter.server_config(&name) {
                Ok(config) => config,
                Err(e) => {
                    tracing::warn!(host = %name, error = %e, "cannot mint a certificate");
                    return None;
                }
            },
            LeafChoice::Refuse(rule) => {
                tracing::warn!(
                    host = fallback,
                    sni = sni.as_deref().unwrap_or(""),
                    rule,
                    "TLS refused: no certificate for that name (unrecognized_name alert)"
                );
                let mut io = start.io;
                let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                    io.write_all(&UNRECOGNIZED_NAME_ALERT).await?;
                    io.shutdown().await
                })
                .await;
                return None;
            }
        },
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(config)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::info!(host = %name, error = %e, "TLS handshake failed{}", trust_hint(&e));
            None
        }
        Err(_) => {
            tracing::info!(host = %name, "TLS handshake timed out");
            None
        }
    }
}

/// Serves HTTP/2 or HTTP/1.1 (as ALPN chose) on `io` until the client
/// closes, it stays idle for `client_idle_timeout` (see [`super::idle`]) or
/// regcache shuts down.
pub async fn serve_http<IO, S>(ctx: &ConnContext, io: IO, service: S)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<crate::http::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    // HTTP/1.1: a head gets client_idle_timeout in all. HTTP/2: a peer that
    // does not answer a ping within it is closed. Both: a connection with no
    // request in flight for it (before the first bytes, between requests, no
    // open stream) is shut down gracefully, GOAWAY for HTTP/2, and dropped
    // if it is still open one more client_idle_timeout later with nothing in
    // flight. Bodies are limited per request (crate::http::body::IdleLimited).
    let idle = ctx.app.state.config.client_idle_timeout;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle)
        .max_buf_size(super::MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(idle))
        .keep_alive_timeout(idle);
    let watch = IdleWatch::new(idle);
    let conn = builder.serve_connection(TokioIo::new(io), watch.service(service));
    tokio::pin!(conn);
    let mut closing = false;
    let result = loop {
        tokio::select! {
            result = conn.as_mut() => break result,
            () = watch.idle() => {
                if closing {
                    tracing::debug!("client connection still open after being asked to close; dropping it");
                    break Ok(());
                }
                tracing::debug!(
                    idle_secs = idle.as_secs(),
                    "client connection idle for client_idle_timeout; closing it"
                );
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = ctx.shutdown.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "TLS connection ended with an error");
    }
}

/// A hint for the operator when the client refused our certificate.
fn trust_hint(err: &std::io::Error) -> &'static str {
    let text = err.to_string();
    if text.contains("UnknownCA")
        || text.contains("BadCertificate")
        || text.contains("CertificateUnknown")
    {
        " (the client does not trust the regcache CA: install /ca.crt on it)"
    } else {
        ""
    }
}
