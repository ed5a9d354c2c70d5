//! Intercepted CONNECT tunnels: regcache terminates the client's TLS with a
//! leaf certificate for the requested host and serves the HTTP inside (HTTP/2
//! or HTTP/1.1, as ALPN chose) through [`crate::serve`].
//!
//! The certificate is chosen from the TLS ClientHello's SNI, falling back to
//! the CONNECT host (clients send no SNI for IP addresses). Requests always
//! go to the CONNECT host, whatever Host or SNI the client sends.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::server::Acceptor;
use tokio_rustls::LazyConfigAcceptor;

use super::ConnContext;
use crate::serve::{self, Origin, Target};

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Serves one intercepted tunnel until the client closes it or shutdown.
#[tracing::instrument(name = "tunnel", skip_all, fields(client = %ctx.peer, host = %host))]
pub async fn serve_tunnel(ctx: ConnContext, upgraded: Upgraded, host: String, port: u16) {
    let origin = match Origin::https(&host, port) {
        Ok(origin) => origin,
        Err(e) => {
            tracing::info!(host, error = %e, "cannot intercept: bad host");
            return;
        }
    };
    let acceptor = LazyConfigAcceptor::new(Acceptor::default(), TokioIo::new(upgraded));
    let start = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            tracing::info!(host, error = %e, "client did not start TLS");
            return;
        }
        Err(_) => {
            tracing::info!(host, "client did not start TLS in time");
            return;
        }
    };
    let name = start
        .client_hello()
        .server_name()
        .map(str::to_owned)
        .unwrap_or_else(|| host.clone());
    let config = match ctx.app.minter.server_config(&name) {
        Ok(config) => config,
        Err(e) => {
            tracing::warn!(host = %name, error = %e, "cannot mint a certificate");
            return;
        }
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(config)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(host = %name, error = %e, "TLS handshake failed{}", trust_hint(&e));
            return;
        }
        Err(_) => {
            tracing::info!(host = %name, "TLS handshake timed out");
            return;
        }
    };

    let app = ctx.app.clone();
    let peer = ctx.peer;
    let target = Arc::new(Target::new(origin));
    let service = service_fn(move |req| {
        let (app, target) = (app.clone(), target.clone());
        async move { Ok::<_, Infallible>(serve::handle(&app, &target, peer, req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(super::HEADER_READ_TIMEOUT)
        .max_buf_size(super::MAX_HEADER_BYTES);
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = ctx.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(host = %name, error = %e, "intercepted connection ended with an error");
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
