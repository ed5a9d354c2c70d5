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

/// How much of a response body hyper's HTTP/2 server buffers per stream
/// ahead of the connection's writes: two cache chunks, one being framed and
/// encrypted while the next is read. hyper's default (400 KiB) kept seven
/// chunks per stream in flight; on the benchmark machine eight concurrent
/// blob streams on one connection ran 11% faster with two (median of 37
/// paired runs, 28 faster; 1 MiB was 5% slower than the default), and a
/// slow client holds less memory per stream (bench/README.md, "HTTP/2
/// settings").
const H2_SEND_BUF: usize = 2 * crate::cache::chunks::CHUNK;

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
            crate::metrics::get().tls_handshake("failed");
            tracing::info!(host = fallback, error = %e, "client did not start TLS");
            return None;
        }
        Err(_) => {
            crate::metrics::get().tls_handshake("failed");
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
                    crate::metrics::get().tls_handshake("failed");
                    tracing::warn!(host = %name, error = %e, "cannot mint a certificate");
                    return None;
                }
            },
            LeafChoice::Refuse(rule) => {
                crate::metrics::get().tls_handshake("refused");
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
        Ok(Ok(tls)) => {
            crate::metrics::get().tls_handshake("ok");
            Some(tls)
        }
        Ok(Err(e)) => {
            crate::metrics::get().tls_handshake("failed");
            tracing::info!(host = %name, error = %e, "TLS handshake failed{}", trust_hint(&e));
            None
        }
        Err(_) => {
            crate::metrics::get().tls_handshake("failed");
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
    size_h2_for_blobs(&mut builder);
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

/// Sizes the HTTP/2 side of `builder` for blob downloads: the send buffer
/// per stream ([`H2_SEND_BUF`]). For downloads the client's receive windows
/// govern (Go's transport announces 4 MiB per stream and 1 GiB for the
/// connection); regcache's own receive windows (hyper's 1 MiB) and frame
/// size limit only what clients upload and made no difference to downloads.
fn size_h2_for_blobs(builder: &mut auto::Builder<TokioExecutor>) {
    builder.http2().max_send_buf_size(H2_SEND_BUF);
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

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body::Frame;
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::cache::chunks::CHUNK;

    static ZEROS: [u8; CHUNK] = [0; CHUNK];

    /// An endless body of chunks, counting the bytes hyper took from it.
    struct Endless(Arc<AtomicU64>);

    impl http_body::Body for Endless {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0.fetch_add(CHUNK as u64, Ordering::Relaxed);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&ZEROS)))))
        }
    }

    /// An HTTP/2 frame: 9-byte header and payload.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    #[tokio::test]
    async fn an_h2_stream_buffers_two_chunks_ahead_of_a_slow_client() {
        let produced = Arc::new(AtomicU64::new(0));
        let counter = produced.clone();
        let service = service_fn(move |_req: http::Request<hyper::body::Incoming>| {
            let body = Endless(counter.clone());
            async move { Ok::<_, Infallible>(http::Response::new(body)) }
        });
        // The client's side of the pipe holds 16 KiB and is never read: the
        // server's writes stall as on a slow link, while the client's windows
        // (Go's: 4 MiB per stream, 1 GiB more for the connection) allow far
        // more than the server may buffer.
        const PIPE: usize = 16 << 10;
        let (mut client, server) = tokio::io::duplex(PIPE);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        size_h2_for_blobs(&mut builder);
        tokio::spawn(async move {
            let _ = builder
                .serve_connection(TokioIo::new(server), service)
                .await;
        });
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS_INITIAL_WINDOW_SIZE (4) = 4 MiB; WINDOW_UPDATE +1 GiB.
        hello.extend(frame(0x4, 0, 0, &[0, 4, 0, 0x40, 0, 0]));
        hello.extend(frame(0x8, 0, 0, &(1u32 << 30).to_be_bytes()));
        // HEADERS, END_STREAM | END_HEADERS: GET, http, /, :authority a.test
        // (HPACK static table entries 2, 6, 4 and a literal for 1).
        let mut block = vec![0x82, 0x86, 0x84, 0x01, 6];
        block.extend(b"a.test");
        hello.extend(frame(0x1, 0x5, 1, &block));
        client.write_all(&hello).await.unwrap();

        // Wait until the server stops taking from the body (unchanged for
        // half a second), at most 10 s.
        let mut last = u64::MAX;
        let mut still = 0;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = produced.load(Ordering::Relaxed);
            still = if now == last { still + 1 } else { 0 };
            last = now;
            if still == 10 {
                break;
            }
        }
        // What the pipe holds, the send buffer, and a chunk or so of slack
        // for the frame being written and the chunk in hyper's hands (taken
        // here: 256 KiB; with hyper's default send buffer, 512 KiB).
        let bound = (PIPE + H2_SEND_BUF + 3 * CHUNK) as u64;
        assert!(
            last <= bound,
            "took {last} bytes of the body ahead of the client (at most {bound})"
        );
        assert!(last > 0, "the response was not started");
        drop(client);
    }
}
