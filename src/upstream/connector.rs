//! TCP connections to upstreams, honouring `--resolve` overrides.
//!
//! [`ResolvingConnector`] sits under hyper-rustls: it rewrites the address a
//! connection goes to, never the name TLS verifies, so a registry mapped to
//! loopback is still checked against its real host name.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::body::BoxError;
use crate::config::ResolveMap;

/// How long establishing a TCP connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An [`HttpConnector`] that applies the resolve overrides first.
#[derive(Clone)]
pub struct ResolvingConnector {
    inner: HttpConnector,
    resolve: Arc<ResolveMap>,
}

impl ResolvingConnector {
    /// A connector using `resolve` for overridden hosts and DNS otherwise.
    pub fn new(resolve: Arc<ResolveMap>) -> Self {
        let mut inner = HttpConnector::new();
        inner.enforce_http(false);
        inner.set_nodelay(true);
        inner.set_connect_timeout(Some(CONNECT_TIMEOUT));
        inner.set_keepalive(Some(Duration::from_secs(60)));
        Self { inner, resolve }
    }
}

type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, BoxError>> + Send>>;

impl Service<Uri> for ResolvingConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let target = uri.host().and_then(|host| {
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("http") => 80,
                _ => 443,
            });
            self.resolve.target(host, port)
        });
        let uri = match target {
            Some(addr) => match format!("http://{addr}").parse::<Uri>() {
                Ok(rewritten) => rewritten,
                Err(e) => return Box::pin(async move { Err(e.into()) }),
            },
            None => uri,
        };
        let connecting = self.inner.call(uri);
        Box::pin(async move { connecting.await.map_err(Into::into) })
    }
}

/// Opens a plain TCP connection to `host:port` (for tunnels).
pub async fn connect_tcp(resolve: &ResolveMap, host: &str, port: u16) -> io::Result<TcpStream> {
    let connecting = async {
        match resolve.target(host, port) {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect((host, port)).await,
        }
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
