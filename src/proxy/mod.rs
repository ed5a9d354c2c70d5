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

use tokio::net::TcpListener;
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
}

impl Proxy {
    /// Binds the configured listen address.
    pub async fn bind(app: Arc<App>) -> io::Result<Self> {
        let listener = TcpListener::bind(app.state.config.listen).await?;
        let mirror_tls = match app.state.config.mirror_tls {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        Ok(Self {
            app,
            listener,
            mirror_tls,
        })
    }

    /// The address of the `mirror_tls` listener, if any.
    pub fn mirror_addr(&self) -> Option<SocketAddr> {
        self.mirror_tls.as_ref().and_then(|l| l.local_addr().ok())
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
                _ = &mut signal => break,
            }
        }
        drop(self.listener);
        drop(self.mirror_tls);
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
