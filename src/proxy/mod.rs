//! The forward proxy: the listener, one task per client connection, and the
//! shutdown plumbing.
//!
//! Every connection task (and every tunnel it starts) is tracked. On
//! SIGTERM/SIGINT the listener closes, each connection is asked to finish its
//! current request and close, and regcache waits up to `shutdown_grace` for
//! them before exiting.

mod idle;
mod intercept;
mod listener;
mod tunnel;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;

/// The read buffer limit given to hyper; heads are also measured against
/// [`crate::http::headers::MAX_HEAD_BYTES`].
pub const MAX_HEADER_BYTES: usize = crate::http::headers::MAX_HEAD_BYTES;

/// What every connection task carries.
#[derive(Clone)]
pub struct ConnContext {
    /// Shared state.
    pub app: Arc<App>,
    /// The client's address.
    pub peer: SocketAddr,
    /// Where to spawn tunnel tasks so that shutdown waits for them.
    pub tasks: TaskTracker,
    /// Cancelled when regcache starts shutting down.
    pub shutdown: CancellationToken,
}

/// The listen backlog regcache asks for; the kernel caps it at
/// `net.core.somaxconn` (4096 by default since Linux 5.4).
///
/// tokio's `TcpListener::bind` asks for 128, as the standard library does: a
/// burst of a few hundred clients (a cluster's nodes pulling one new tag)
/// overflows that queue, the kernel drops the extra SYNs and those clients
/// retry only after the 1 s SYN retransmission timeout.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listening TCP socket on `addr` with [`LISTEN_BACKLOG`] (and
/// `SO_REUSEADDR`, as tokio's `TcpListener::bind`). Every listener of the
/// proxy is made here. Must be called within a tokio runtime.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts on `listener`, or waits forever when there is none.
async fn accept_optional(
    listener: Option<&TcpListener>,
) -> io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// A bound proxy, ready to run.
pub struct Proxy {
    app: Arc<App>,
    listener: TcpListener,
    mirror_tls: Option<TcpListener>,
    metrics: Option<TcpListener>,
    peer: Option<TcpListener>,
}

impl Proxy {
    /// Binds the configured listen address.
    pub async fn bind(app: Arc<App>) -> io::Result<Self> {
        let listener = listen(app.state.config.listen)?;
        let mirror_tls = match app.state.config.mirror_tls {
            Some(addr) => Some(listen(addr)?),
            None => None,
        };
        let metrics = match app.state.config.metrics_listen {
            Some(addr) => Some(listen(addr)?),
            None => None,
        };
        let peer = match &app.state.config.peer {
            Some(endpoint) if app.peer_server.is_some() => Some(listen(endpoint.listen)?),
            _ => None,
        };
        // What regcache's own connections may never reach (a wildcard
        // address stands for every address of this host). The peer
        // endpoint is called directly, never through the dialer.
        let own = [
            Some(&listener),
            mirror_tls.as_ref(),
            metrics.as_ref(),
            peer.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(TcpListener::local_addr)
        .collect::<io::Result<Vec<_>>>()?;
        app.state.upstream.dialer().own_listeners().set(own);
        Ok(Self {
            app,
            listener,
            mirror_tls,
            metrics,
            peer,
        })
    }

    /// The address of the peer endpoint (`peer_listen`), if any.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The address of the `mirror_tls` listener, if any.
    pub fn mirror_addr(&self) -> Option<SocketAddr> {
        self.mirror_tls.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The address of the `metrics_listen` listener, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts clients until `signal` completes, then drains and returns.
    pub async fn run(self, signal: impl Future<Output = ()>) {
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        tokio::pin!(signal);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let ctx = ConnContext {
                            app: self.app.clone(),
                            peer,
                            tasks: tasks.clone(),
                            shutdown: shutdown.clone(),
                        };
                        tasks.spawn(listener::serve_client(ctx, stream));
                    }
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                accepted = accept_optional(self.mirror_tls.as_ref()) => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let local = stream.local_addr().map(|a| a.ip().to_string()).unwrap_or_default();
                        let ctx = ConnContext {
                            app: self.app.clone(),
                            peer,
                            tasks: tasks.clone(),
                            shutdown: shutdown.clone(),
                        };
                        tasks.spawn(listener::serve_mirror_tls(ctx, stream, local));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed on mirror_tls");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                accepted = accept_optional(self.metrics.as_ref()) => match accepted {
                    Ok((stream, peer)) => {
                        let ctx = ConnContext {
                            app: self.app.clone(),
                            peer,
                            tasks: tasks.clone(),
                            shutdown: shutdown.clone(),
                        };
                        tasks.spawn(listener::serve_metrics_listen(ctx, stream));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed on metrics_listen");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                accepted = accept_optional(self.peer.as_ref()) => match accepted {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        let (app, shutdown) = (self.app.clone(), shutdown.clone());
                        tasks.spawn(async move {
                            if let Some(server) = &app.peer_server {
                                server.serve(stream, shutdown).await;
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed on peer_listen");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = &mut signal => break,
            }
        }
        drop(self.listener);
        drop(self.mirror_tls);
        drop(self.metrics);
        drop(self.peer);
        let grace = self.app.state.config.shutdown_grace;
        tracing::info!(
            connections = tasks.len(),
            grace_secs = grace.as_secs(),
            "shutting down: finishing in-flight requests"
        );
        shutdown.cancel();
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            tracing::warn!(
                connections = tasks.len(),
                "shutdown grace period over; closing remaining connections"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The burst the test opens: 500 connections (figure 5 of the benchmark),
    /// fewer when `net.core.somaxconn` or the open-files limit is lower.
    fn burst_size() -> usize {
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
        500.min(somaxconn).min(nofile.saturating_sub(256))
    }

    #[tokio::test]
    async fn a_burst_of_connections_fits_the_listen_queue() {
        let n = burst_size();
        if n < 256 {
            eprintln!("skipped: somaxconn or RLIMIT_NOFILE allows only {n} queued connections");
            return;
        }
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // Nothing accepts while the clients connect. With tokio's default
        // backlog of 128 the kernel drops every SYN beyond the full accept
        // queue, and the retransmitted ones too (the queue stays full), so
        // those connects never complete and the timeout below fires; it only
        // bounds loopback handshakes that do complete.
        let connects = (0..n).map(|_| tokio::net::TcpStream::connect(addr));
        let clients = tokio::time::timeout(
            Duration::from_secs(10),
            futures_util::future::join_all(connects),
        )
        .await
        .expect("connections beyond the listen queue did not complete");
        for c in &clients {
            assert!(c.is_ok(), "connect: {c:?}");
        }
        // And the listener holds every one of them (none was dropped after
        // the client saw its handshake complete).
        for i in 0..n {
            let accepted = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await;
            assert!(
                matches!(accepted, Ok(Ok(_))),
                "only {i} of {n} connections were queued"
            );
        }
    }
}
