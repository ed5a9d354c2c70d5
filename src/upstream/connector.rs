//! TCP connections to upstreams: `--resolve` overrides and the parent proxy.
//!
//! Every connection regcache opens towards a registry, a CDN or the target of
//! a plain tunnel is made by a [`Dialer`], which picks one route for
//! `host:port`, in this order:
//!
//! 1. `host` has a `--resolve` entry: straight to that address. An override
//!    says where the host is, so it never goes through the parent proxy.
//! 2. `host` matches `upstream_no_proxy`: directly, by DNS.
//! 3. `upstream_proxy` is set: a TCP connection to the parent proxy (whose own
//!    host name is looked up in the `--resolve` map first, then DNS), then
//!    `CONNECT host:port HTTP/1.1`, with `Proxy-Authorization: Basic` when
//!    the proxy URL carries `user:password`. After a 2xx answer the socket is
//!    handed on as if it were connected to `host:port` itself.
//! 4. Otherwise directly, by DNS.
//!
//! [`ResolvingConnector`] sits under hyper-rustls: it changes where TCP goes,
//! never the name TLS verifies, so a registry reached through loopback or a
//! parent proxy is still checked against its real host name.
//!
//! A [`ResolvingConnector`] works in one of three [`Mode`]s. For registries
//! it remembers the addresses it reached them at. For the targets of
//! registry redirects it resolves the name itself, once, and refuses a
//! loopback, link-local or private address unless the host has a `--resolve`
//! entry or a registry was reached at that address
//! ([`crate::policy::decide_redirect_address`]). Plain pass-through requests
//! neither remember nor check.
//!
//! No connection a [`Dialer`] makes directly may land on regcache's own
//! listeners ([`OwnListeners`], [`crate::policy::decide_connected`]): each
//! is checked once connected, by its actual peer address, so that no name,
//! `--resolve` entry or DNS answer can point regcache at itself. Through a
//! parent proxy, the peer is the parent, and where it connects is its own
//! business.
//!
//! The parent's answer is read with `peek` and only its head is consumed, so
//! whatever the far end sends first (an SSH banner through a plain tunnel,
//! say) stays in the socket for whoever reads next. The proxy's password is
//! never logged: errors and logs name the proxy as `http://host:port`.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http::{StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode_str;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_service::Service;

use crate::config::{Config, ResolveMap};
use crate::http::body::BoxError;
use crate::policy::{decide_connected, decide_redirect_address, Refusal};
use crate::registry::hosts::{normalize_host, HostPattern};

/// How long establishing a connection may take, including the whole CONNECT
/// exchange with a parent proxy.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest reply head accepted from a parent proxy.
pub const MAX_PROXY_REPLY_BYTES: usize = 16 * 1024;

/// A parent proxy from `upstream_proxy`, and the hosts that bypass it.
#[derive(Clone)]
pub struct ParentProxy {
    /// Host name or IP address, without IPv6 brackets.
    host: String,
    port: u16,
    /// `Basic …`, from the URL's percent-decoded `user:password`.
    authorization: Option<String>,
    no_proxy: Vec<HostPattern>,
}

impl ParentProxy {
    /// The proxy at `url` (`http://[user:pass@]host[:port]`, port 80 if
    /// absent); hosts matching `no_proxy` are reached directly.
    pub fn new(url: &Uri, no_proxy: Vec<HostPattern>) -> Self {
        let authority = url.authority().map(|a| a.as_str()).unwrap_or_default();
        let authorization = authority.rsplit_once('@').map(|(userinfo, _)| {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            let mut credentials: Vec<u8> = percent_decode_str(user).collect();
            credentials.push(b':');
            credentials.extend(percent_decode_str(password));
            format!("Basic {}", STANDARD.encode(&credentials))
        });
        Self {
            host: normalize_host(url.host().unwrap_or_default()),
            port: url.port_u16().unwrap_or(80),
            authorization,
            no_proxy,
        }
    }

    /// The proxy as `http://host:port`, without credentials: safe to log.
    pub fn redacted(&self) -> String {
        format!("http://{}", authority(&self.host, self.port))
    }

    /// Whether `host` is reached directly.
    fn bypassed_by(&self, host: &str) -> bool {
        let host = normalize_host(host);
        self.no_proxy.iter().any(|p| p.matches(&host))
    }

    fn error(&self, source: HandshakeError) -> ParentProxyError {
        ParentProxyError {
            proxy: self.redacted(),
            source,
        }
    }
}

impl fmt::Debug for ParentProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParentProxy")
            .field("proxy", &self.redacted())
            .field("authorization", &self.authorization.as_ref().map(|_| "…"))
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

/// A connection through the parent proxy failed; says which proxy (never
/// with its password) and why.
#[derive(Debug, thiserror::Error)]
#[error("upstream_proxy {proxy}: {source}")]
pub struct ParentProxyError {
    proxy: String,
    #[source]
    source: HandshakeError,
}

/// What went wrong between regcache and the parent proxy.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// No TCP connection to the proxy.
    #[error("cannot connect to the parent proxy: {0}")]
    Connect(BoxError),
    /// The exchange took longer than [`CONNECT_TIMEOUT`].
    #[error("no answer to CONNECT {target} within {}s", CONNECT_TIMEOUT.as_secs())]
    Timeout {
        /// `host:port` asked for.
        target: String,
    },
    /// The proxy answered, but not with 2xx.
    #[error("parent proxy answered {status} to CONNECT {target}{hint}")]
    Refused {
        /// Status code and reason, e.g. `407 Proxy Authentication Required`.
        status: String,
        /// `host:port` asked for.
        target: String,
        /// Advice for 407.
        hint: &'static str,
    },
    /// The answer is not an HTTP/1.x response head.
    #[error("parent proxy sent a malformed answer to CONNECT {target}: {line:?}")]
    Malformed {
        /// `host:port` asked for.
        target: String,
        /// The start of what was received, printable characters only.
        line: String,
    },
    /// The answer's head did not end within [`MAX_PROXY_REPLY_BYTES`].
    #[error("parent proxy's answer to CONNECT {0} is larger than 16 KiB")]
    TooLarge(String),
    /// The proxy closed the connection before a complete answer.
    #[error("parent proxy closed the connection before answering CONNECT {0}")]
    Closed(String),
    /// Reading or writing failed.
    #[error("talking to the parent proxy: {0}")]
    Io(#[from] io::Error),
}

/// Where one connection goes.
enum Route {
    /// A `--resolve` override.
    Address(SocketAddr),
    /// The host name, looked up in DNS.
    Dns,
    /// Through the parent proxy.
    Parent(Arc<ParentProxy>),
}

/// The most addresses of one redirect target tried in turn.
const MAX_REDIRECT_TRIES: usize = 4;

/// The most registry addresses remembered (see [`ReachedAddresses`]).
const MAX_REACHED: usize = 4096;

/// The addresses registries were reached at, so that a registry's redirect
/// to its own (internal) address is followed. Bounded by `MAX_REACHED`.
#[derive(Debug, Default)]
pub struct ReachedAddresses {
    addrs: Mutex<HashSet<IpAddr>>,
}

impl ReachedAddresses {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<IpAddr>> {
        self.addrs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that a registry was reached at `ip`, when `ip` is an
    /// internal address (public ones need no exception, and would only fill
    /// the set).
    pub fn insert(&self, ip: IpAddr) {
        let ip = ip.to_canonical();
        if !crate::policy::is_internal(ip) {
            return;
        }
        let mut addrs = self.lock();
        if addrs.len() < MAX_REACHED {
            addrs.insert(ip);
        }
    }

    /// Whether a registry was reached at `ip`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.lock().contains(&ip.to_canonical())
    }
}

/// A redirect target's address was refused.
#[derive(Debug, thiserror::Error)]
#[error("redirect target {host} resolves to {ip}: {refusal}")]
pub struct AddressRefused {
    host: String,
    ip: IpAddr,
    refusal: Refusal,
}

/// regcache's own listening addresses (proxy, `mirror_tls`,
/// `metrics_listen`), known once they are bound: connections that reach one
/// are refused. Empty until [`OwnListeners::set`].
#[derive(Debug, Default)]
pub struct OwnListeners {
    addrs: RwLock<Vec<SocketAddr>>,
}

impl OwnListeners {
    /// Records the addresses regcache listens on.
    pub fn set(&self, addrs: Vec<SocketAddr>) {
        *self.addrs.write().unwrap_or_else(|p| p.into_inner()) = addrs;
    }

    /// Refuses `stream` when it is connected to one of them.
    pub fn check(&self, stream: &TcpStream) -> Result<(), RelayToSelf> {
        let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else {
            // Not connected any more: the first read or write will say so.
            return Ok(());
        };
        let addrs = self.addrs.read().unwrap_or_else(|p| p.into_inner());
        decide_connected(peer, local.ip(), &addrs).map_err(|refusal| {
            tracing::warn!(%peer, rule = refusal.rule, "connection to regcache's own listener refused");
            RelayToSelf { peer, refusal }
        })
    }
}

/// A connection reached one of regcache's own listeners and was dropped.
#[derive(Debug, thiserror::Error)]
#[error("{peer} is regcache itself: {refusal}")]
pub struct RelayToSelf {
    peer: SocketAddr,
    /// The rule that refused it.
    pub refusal: Refusal,
}

impl RelayToSelf {
    /// The [`RelayToSelf`] somewhere in `err`'s chain of sources, also
    /// inside an [`io::Error`] (whose `source` skips what it wraps).
    pub fn in_chain<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a RelayToSelf> {
        let mut next = Some(err);
        while let Some(e) = next {
            let wrapped = e
                .downcast_ref::<io::Error>()
                .and_then(io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<RelayToSelf>());
            if let Some(found) = e.downcast_ref::<RelayToSelf>().or(wrapped) {
                return Some(found);
            }
            next = e.source();
        }
        None
    }
}

/// What a [`ResolvingConnector`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Registry origins: remember the addresses reached.
    Registry,
    /// Targets of registry redirects: refuse internal addresses.
    Redirect,
    /// Plain pass-through to hosts that are not registries.
    Plain,
}

/// Opens upstream TCP connections: `--resolve`, `upstream_no_proxy`,
/// `upstream_proxy`, DNS. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Dialer {
    resolve: Arc<ResolveMap>,
    parent: Option<Arc<ParentProxy>>,
    reached: Arc<ReachedAddresses>,
    own: Arc<OwnListeners>,
}

impl Dialer {
    /// A dialer with these overrides and, optionally, a parent proxy.
    pub fn new(resolve: ResolveMap, parent: Option<ParentProxy>) -> Self {
        Self {
            resolve: Arc::new(resolve),
            parent: parent.map(Arc::new),
            reached: Arc::default(),
            own: Arc::default(),
        }
    }

    /// The dialer the configuration describes.
    pub fn from_config(config: &Config) -> Self {
        let parent = config
            .upstream_proxy
            .as_ref()
            .map(|url| ParentProxy::new(url, config.upstream_no_proxy.clone()));
        Self::new(config.resolve.clone(), parent)
    }

    /// The resolve overrides.
    pub fn resolve(&self) -> &ResolveMap {
        &self.resolve
    }

    /// The addresses registries were reached at.
    pub fn reached(&self) -> &ReachedAddresses {
        &self.reached
    }

    /// regcache's own listeners, which its connections may not reach.
    pub fn own_listeners(&self) -> &OwnListeners {
        &self.own
    }

    /// The parent proxy, if one is configured.
    pub fn parent(&self) -> Option<&ParentProxy> {
        self.parent.as_deref()
    }

    fn route(&self, host: &str, port: u16) -> Route {
        if let Some(addr) = self.resolve.target(host, port) {
            return Route::Address(addr);
        }
        match &self.parent {
            Some(parent) if !parent.bypassed_by(host) => Route::Parent(parent.clone()),
            _ => Route::Dns,
        }
    }

    /// Where the parent proxy itself is: its `--resolve` entry, else its
    /// name for DNS, as an `http://` URI for [`HttpConnector`].
    fn parent_uri(&self, parent: &ParentProxy) -> Result<Uri, http::uri::InvalidUri> {
        match self.resolve.target(&parent.host, parent.port) {
            Some(addr) => format!("http://{addr}").parse(),
            None => parent.redacted().parse(),
        }
    }

    async fn connect_parent_tcp(&self, parent: &ParentProxy) -> io::Result<TcpStream> {
        match self.resolve.target(&parent.host, parent.port) {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect((parent.host.as_str(), parent.port)).await,
        }
    }
}

/// Runs `connect` (a TCP connection to `parent`) and the CONNECT exchange
/// for `host:port` on its result, all within [`CONNECT_TIMEOUT`].
async fn through_parent<F, E>(
    parent: &ParentProxy,
    host: &str,
    port: u16,
    connect: F,
) -> Result<TcpStream, ParentProxyError>
where
    F: Future<Output = Result<TcpStream, E>>,
    E: Into<BoxError>,
{
    let target = authority(host, port);
    tracing::debug!(to = %target, proxy = %parent.redacted(), "CONNECT through the parent proxy");
    let attempt = async {
        let mut stream = connect
            .await
            .map_err(|e| HandshakeError::Connect(e.into()))?;
        stream.set_nodelay(true)?;
        handshake(&mut stream, &target, parent.authorization.as_deref()).await?;
        Ok(stream)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(HandshakeError::Timeout {
                target: target.clone(),
            })
        })
        .map_err(|e| parent.error(e))
}

/// Asks the proxy on `stream` for a tunnel to `target` (`host:port`) and
/// reads its answer; anything after the answer's head stays unread.
pub async fn handshake(
    stream: &mut TcpStream,
    target: &str,
    authorization: Option<&str>,
) -> Result<(), HandshakeError> {
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(credentials) = authorization {
        request.push_str("Proxy-Authorization: ");
        request.push_str(credentials);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let head = read_reply_head(stream, target).await?;
    check_reply(&head, target, authorization.is_some())
}

/// Reads the proxy's reply head, up to and including its blank line, and no
/// further: bytes are peeked first and only the head's are consumed.
async fn read_reply_head(stream: &mut TcpStream, target: &str) -> Result<Vec<u8>, HandshakeError> {
    let mut head = Vec::new();
    let mut peeked = vec![0u8; MAX_PROXY_REPLY_BYTES];
    loop {
        let room = MAX_PROXY_REPLY_BYTES - head.len();
        if room == 0 {
            return Err(HandshakeError::TooLarge(target.into()));
        }
        let n = stream.peek(&mut peeked[..room]).await?;
        if n == 0 {
            return Err(HandshakeError::Closed(target.into()));
        }
        let before = head.len();
        head.extend_from_slice(&peeked[..n]);
        let prefix = &head[..head.len().min(5)];
        if !b"HTTP/".starts_with(prefix) {
            return Err(malformed(&head, target));
        }
        let scan_from = before.saturating_sub(3);
        let end = find(&head[scan_from..], b"\r\n\r\n").map(|i| scan_from + i + 4);
        if let Some(end) = end {
            head.truncate(end);
        }
        // Everything taken into `head` is part of the head: consume it.
        stream
            .read_exact(&mut peeked[..head.len() - before])
            .await?;
        if end.is_some() {
            return Ok(head);
        }
    }
}

/// Accepts a 2xx status line; anything else is an error naming it.
fn check_reply(head: &[u8], target: &str, authorized: bool) -> Result<(), HandshakeError> {
    let line = &head[..find(head, b"\r\n").unwrap_or(head.len())];
    let line = String::from_utf8_lossy(line);
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts
        .next()
        .filter(|c| c.len() == 3)
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok());
    let (true, Some(code)) = (version.starts_with("HTTP/1."), code) else {
        return Err(malformed(head, target));
    };
    if code.is_success() {
        return Ok(());
    }
    let reason = printable(parts.next().unwrap_or_default().trim());
    let reason = match reason.as_str() {
        "" => code.canonical_reason().unwrap_or_default().to_string(),
        _ => reason,
    };
    let hint = match (code, authorized) {
        (StatusCode::PROXY_AUTHENTICATION_REQUIRED, true) => {
            "; check the user name and password in upstream_proxy"
        }
        (StatusCode::PROXY_AUTHENTICATION_REQUIRED, false) => {
            "; give them in upstream_proxy as http://user:password@host:port"
        }
        _ => "",
    };
    Err(HandshakeError::Refused {
        status: format!("{} {reason}", code.as_u16()),
        target: target.into(),
        hint,
    })
}

fn malformed(head: &[u8], target: &str) -> HandshakeError {
    let line = &head[..find(head, b"\r\n").unwrap_or(head.len())];
    HandshakeError::Malformed {
        target: target.into(),
        line: printable(&String::from_utf8_lossy(line)),
    }
}

/// At most 100 printable ASCII characters of `text`.
fn printable(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(100)
        .collect()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `host:port`, with brackets around an IPv6 address.
fn authority(host: &str, port: u16) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// An [`HttpConnector`] that routes each connection with a [`Dialer`].
#[derive(Clone)]
pub struct ResolvingConnector {
    inner: HttpConnector,
    dialer: Dialer,
    mode: Mode,
}

impl ResolvingConnector {
    /// A connector for registry origins, routing with `dialer`.
    pub fn new(dialer: Dialer) -> Self {
        Self::with_mode(dialer, Mode::Registry)
    }

    /// A connector routing with `dialer`, for `mode`.
    pub fn with_mode(dialer: Dialer, mode: Mode) -> Self {
        let mut inner = HttpConnector::new();
        inner.enforce_http(false);
        inner.set_nodelay(true);
        inner.set_connect_timeout(Some(CONNECT_TIMEOUT));
        inner.set_keepalive(Some(Duration::from_secs(60)));
        Self {
            inner,
            dialer,
            mode,
        }
    }

    /// A redirect target reached by DNS: resolved here, once, and connected
    /// to the first address the policy allows.
    fn connect_checked(&self, host: String, port: u16) -> Connecting {
        let mut inner = self.inner.clone();
        let dialer = self.dialer.clone();
        Box::pin(async move {
            let addrs = tokio::time::timeout(
                CONNECT_TIMEOUT,
                tokio::net::lookup_host((host.as_str(), port)),
            )
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "name lookup timed out"))??;
            let mut refused = None;
            let mut failed: Option<BoxError> = None;
            // Every allowed address in turn, as HttpConnector would: a CDN's
            // IPv6 address may be unreachable from here. A few at most, so
            // that a name with many dead addresses cannot hold a request.
            let mut tries = 0;
            for addr in addrs {
                if tries == MAX_REDIRECT_TRIES {
                    break;
                }
                let ip = addr.ip();
                if let Err(refusal) =
                    decide_redirect_address(ip, false, dialer.reached.contains(ip))
                {
                    refused = Some(AddressRefused {
                        host: host.clone(),
                        ip,
                        refusal,
                    });
                    continue;
                }
                tries += 1;
                let uri: Uri = format!("http://{addr}").parse()?;
                match inner.call(uri).await {
                    Ok(stream) => {
                        dialer.own.check(stream.inner())?;
                        return Ok(stream);
                    }
                    Err(e) => failed = Some(e.into()),
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
            let err: BoxError = match refused {
                Some(refused) => {
                    tracing::warn!(host = %refused.host, ip = %refused.ip, rule = refused.refusal.rule, "redirect target refused");
                    refused.into()
                }
                None => format!("{host} has no address").into(),
            };
            Err(err)
        })
    }
}

/// A redirect target named by an IP address that the policy refuses, even
/// through a parent proxy.
fn refused_literal(host: &str, reached: &ReachedAddresses) -> Option<AddressRefused> {
    let ip = host.parse::<IpAddr>().ok()?;
    let refusal = decide_redirect_address(ip, false, reached.contains(ip)).err()?;
    tracing::warn!(host, rule = refusal.rule, "redirect target refused");
    Some(AddressRefused {
        host: host.to_string(),
        ip,
        refusal,
    })
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
        let Some(host) = uri.host().map(normalize_host) else {
            let connecting = self.inner.call(uri);
            return Box::pin(async move { connecting.await.map_err(Into::into) });
        };
        let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
            Some("http") => 80,
            _ => 443,
        });
        let uri = match self.dialer.route(&host, port) {
            Route::Address(addr) => {
                if self.mode == Mode::Registry {
                    self.dialer.reached.insert(addr.ip());
                }
                format!("http://{addr}").parse::<Uri>()
            }
            Route::Dns if self.mode == Mode::Redirect => return self.connect_checked(host, port),
            Route::Dns => Ok(uri),
            Route::Parent(parent) => {
                if self.mode == Mode::Redirect {
                    if let Some(refused) = refused_literal(&host, &self.dialer.reached) {
                        return Box::pin(async move { Err(refused.into()) });
                    }
                }
                let proxy_uri = match self.dialer.parent_uri(&parent) {
                    Ok(proxy_uri) => proxy_uri,
                    Err(e) => return Box::pin(async move { Err(e.into()) }),
                };
                let mut inner = self.inner.clone();
                return Box::pin(async move {
                    let tcp = async { inner.call(proxy_uri).await.map(TokioIo::into_inner) };
                    let stream = through_parent(&parent, &host, port, tcp).await?;
                    Ok(TokioIo::new(stream))
                });
            }
        };
        let connecting = match uri {
            Ok(uri) => self.inner.call(uri),
            Err(e) => return Box::pin(async move { Err(e.into()) }),
        };
        let reached = (self.mode == Mode::Registry).then(|| self.dialer.reached.clone());
        let own = self.dialer.own.clone();
        Box::pin(async move {
            let stream = connecting.await?;
            own.check(stream.inner())?;
            if let (Some(reached), Ok(peer)) = (reached, stream.inner().peer_addr()) {
                reached.insert(peer.ip());
            }
            Ok(stream)
        })
    }
}

/// Opens a plain TCP connection to `host:port` for a tunnel, routed like
/// every other upstream connection.
pub async fn connect_tcp(dialer: &Dialer, host: &str, port: u16) -> io::Result<TcpStream> {
    let direct = |addr: Option<SocketAddr>| async move {
        let connecting = async {
            match addr {
                Some(addr) => TcpStream::connect(addr).await,
                None => TcpStream::connect((host, port)).await,
            }
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        dialer
            .own
            .check(&stream)
            .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))?;
        Ok(stream)
    };
    match dialer.route(host, port) {
        Route::Address(addr) => direct(Some(addr)).await,
        Route::Dns => direct(None).await,
        Route::Parent(parent) => {
            let tcp = dialer.connect_parent_tcp(&parent);
            through_parent(&parent, host, port, tcp)
                .await
                .map_err(io::Error::other)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const USER_PW: &str = "Basic dXNlcjpwdw=="; // user:pw

    /// A one-shot fake parent proxy: reads the request head, writes `pieces`
    /// a little apart, closes its sending side, and hands back the request.
    async fn fake_parent(pieces: Vec<Vec<u8>>) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && s.read(&mut byte).await.unwrap() == 1 {
                request.push(byte[0]);
            }
            for piece in pieces {
                // The client may hang up early (an oversized reply).
                let _ = s.write_all(&piece).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = s.shutdown().await;
            let _ = s.read(&mut byte).await;
            String::from_utf8(request).unwrap()
        });
        (addr, task)
    }

    /// The handshake's outcome, the request the parent saw, and the bytes
    /// left readable on the stream after a successful handshake.
    async fn exchange(
        pieces: &[&[u8]],
        auth: Option<&str>,
    ) -> (Result<(), HandshakeError>, String, Vec<u8>) {
        let (addr, parent) = fake_parent(pieces.iter().map(|p| p.to_vec()).collect()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let result = handshake(&mut stream, "reg.test:443", auth).await;
        let mut rest = Vec::new();
        if result.is_ok() {
            stream.read_to_end(&mut rest).await.unwrap();
        }
        drop(stream);
        (result, parent.await.unwrap(), rest)
    }

    #[tokio::test]
    async fn good_reply_opens_the_tunnel_and_keeps_what_follows() {
        let (result, request, rest) = exchange(
            &[b"HTTP/1.1 200 Connection established\r\nVia: 1.1 parent\r\n\r\nSSH-2.0-banner\r\n"],
            Some(USER_PW),
        )
        .await;
        result.unwrap();
        assert_eq!(
            request,
            "CONNECT reg.test:443 HTTP/1.1\r\nHost: reg.test:443\r\n\
             Proxy-Authorization: Basic dXNlcjpwdw==\r\n\r\n"
        );
        assert_eq!(rest, b"SSH-2.0-banner\r\n");
    }

    #[tokio::test]
    async fn reply_split_anywhere_is_reassembled() {
        let (result, request, rest) =
            exchange(&[b"HTT", b"P/1.0 200 OK\r\n\r", b"\ntunnelled"], None).await;
        result.unwrap();
        assert!(!request.contains("Proxy-Authorization"), "{request}");
        assert_eq!(rest, b"tunnelled");
    }

    #[tokio::test]
    async fn proxy_authentication_required_is_a_clear_error() {
        let reply = b"HTTP/1.1 407 Proxy Authentication Required\r\n\
            Proxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 4\r\n\r\nnope";
        let (result, _, _) = exchange(&[reply], Some(USER_PW)).await;
        let err = result.unwrap_err();
        assert!(matches!(err, HandshakeError::Refused { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "parent proxy answered 407 Proxy Authentication Required to CONNECT reg.test:443"
            ),
            "{msg}"
        );
        assert!(msg.contains("check the user name and password"), "{msg}");

        let (result, _, _) = exchange(&[b"HTTP/1.1 407 \r\n\r\n"], None).await;
        let msg = result.unwrap_err().to_string();
        assert!(msg.contains("407 Proxy Authentication Required"), "{msg}");
        assert!(msg.contains("http://user:password@host:port"), "{msg}");

        let (result, _, _) = exchange(&[b"HTTP/1.1 503 Service Unavailable\r\n\r\n"], None).await;
        let msg = result.unwrap_err().to_string();
        assert_eq!(
            msg,
            "parent proxy answered 503 Service Unavailable to CONNECT reg.test:443"
        );
    }

    #[tokio::test]
    async fn garbage_is_malformed() {
        // Not HTTP at all: refused as soon as the first bytes show it.
        let (result, _, _) = exchange(&[b"SSH-2.0-OpenSSH_9.2\r\n"], None).await;
        let err = result.unwrap_err();
        assert!(matches!(err, HandshakeError::Malformed { .. }), "{err:?}");
        assert!(err.to_string().contains("SSH-2.0-OpenSSH_9.2"), "{err}");
        for reply in [
            &b"HTTP/1.1 2000 OK\r\n\r\n"[..],
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/2 200\r\n\r\n",
            b"HTTP/1.1\r\n\r\n",
        ] {
            let (result, _, _) = exchange(&[reply], None).await;
            let err = result.unwrap_err();
            assert!(matches!(err, HandshakeError::Malformed { .. }), "{err:?}");
        }
    }

    #[tokio::test]
    async fn oversized_or_truncated_replies_are_refused() {
        let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
        while big.len() <= MAX_PROXY_REPLY_BYTES {
            big.extend_from_slice(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        big.extend_from_slice(b"\r\n");
        let (result, _, _) = exchange(&[&big], None).await;
        let err = result.unwrap_err();
        assert!(matches!(err, HandshakeError::TooLarge(_)), "{err:?}");

        let (result, _, _) = exchange(&[b"HTTP/1.1 200 OK\r\n"], None).await;
        let err = result.unwrap_err();
        assert!(matches!(err, HandshakeError::Closed(_)), "{err:?}");
    }

    #[test]
    fn proxy_url_credentials_are_percent_decoded_and_never_shown() {
        let url: Uri = "http://us%65r:p%40ss%3Aw%rd@Proxy.Test:3128"
            .parse()
            .unwrap();
        let parent = ParentProxy::new(&url, vec![]);
        assert_eq!(
            parent.authorization.as_deref(),
            Some(format!("Basic {}", STANDARD.encode(b"user:p@ss:w%rd")).as_str())
        );
        assert_eq!(parent.redacted(), "http://proxy.test:3128");
        let debug = format!("{parent:?}");
        assert!(
            !debug.contains("p%40ss") && !debug.contains("Basic"),
            "{debug}"
        );

        let bare = ParentProxy::new(&"http://[::1]".parse().unwrap(), vec![]);
        assert_eq!(bare.authorization, None);
        assert_eq!(bare.redacted(), "http://[::1]:80");
        let user_only = ParentProxy::new(&"http://bob@p.test:8080".parse().unwrap(), vec![]);
        assert_eq!(user_only.authorization.as_deref(), Some("Basic Ym9iOg=="));
    }

    #[test]
    fn resolve_entries_and_no_proxy_hosts_go_direct() {
        let resolve = ResolveMap::new(vec!["mapped.test=127.0.0.1:5000".parse().unwrap()]);
        let no_proxy = vec![
            "direct.test".parse().unwrap(),
            "*.corp.test".parse().unwrap(),
        ];
        let parent = ParentProxy::new(&"http://p.test:3128".parse().unwrap(), no_proxy);
        let dialer = Dialer::new(resolve, Some(parent));
        let route = |host| match dialer.route(host, 443) {
            Route::Address(addr) => format!("address {addr}"),
            Route::Dns => "dns".into(),
            Route::Parent(p) => format!("parent {}", p.redacted()),
        };
        assert_eq!(route("mapped.test"), "address 127.0.0.1:5000");
        assert_eq!(route("Direct.Test."), "dns");
        assert_eq!(route("reg.corp.test"), "dns");
        assert_eq!(route("corp.test"), "parent http://p.test:3128");
        assert_eq!(route("registry-1.docker.io"), "parent http://p.test:3128");
        let no_parent = Dialer::new(ResolveMap::default(), None);
        assert!(matches!(no_parent.route("x.test", 443), Route::Dns));
    }

    #[tokio::test]
    async fn tunnels_reach_the_parent_by_its_resolve_entry_and_hide_the_password() {
        let (addr, parent) = fake_parent(vec![b"HTTP/1.1 407 Nope\r\n\r\n".to_vec()]).await;
        let resolve = ResolveMap::new(vec![format!("parent.test={addr}").parse().unwrap()]);
        let url = format!("http://user:s3cret@parent.test:{}", addr.port());
        let proxy = ParentProxy::new(&url.parse().unwrap(), vec![]);
        let dialer = Dialer::new(resolve, Some(proxy));
        let err = connect_tcp(&dialer, "::1", 8443).await.unwrap_err();
        let request = parent.await.unwrap();
        assert!(
            request.starts_with("CONNECT [::1]:8443 HTTP/1.1\r\n"),
            "{request}"
        );
        let msg = err.to_string();
        assert_eq!(
            msg,
            format!(
                "upstream_proxy http://parent.test:{}: parent proxy answered 407 Nope to \
                 CONNECT [::1]:8443; check the user name and password in upstream_proxy",
                addr.port()
            )
        );
        assert!(!format!("{err:?}").contains("s3cret"));
    }

    #[tokio::test]
    async fn redirect_connections_refuse_internal_addresses_unless_a_registry_is_there() {
        let listener = TcpListener::bind("127.0.0.12:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                drop(s);
            }
        });
        let resolve = ResolveMap::new(vec![format!("mapped.test=127.0.0.12:{port}")
            .parse()
            .unwrap()]);
        let dialer = Dialer::new(resolve, None);
        let mut redirect = ResolvingConnector::with_mode(dialer.clone(), Mode::Redirect);
        let by_address: Uri = format!("http://127.0.0.12:{port}/").parse().unwrap();
        let err = redirect.call(by_address.clone()).await.unwrap_err();
        assert!(err.to_string().contains("redirect_address"), "{err}");
        // A --resolve entry says where the host is: allowed.
        let mapped: Uri = "http://mapped.test/".parse().unwrap();
        redirect.call(mapped).await.unwrap();
        // A plain pass-through connection neither checks nor remembers.
        let mut plain = ResolvingConnector::with_mode(dialer.clone(), Mode::Plain);
        plain.call(by_address.clone()).await.unwrap();
        assert!(!dialer.reached().contains("127.0.0.12".parse().unwrap()));
        // Once a registry is reached there, its redirects may go there too.
        let mut registry = ResolvingConnector::new(dialer.clone());
        registry.call(by_address.clone()).await.unwrap();
        assert!(dialer
            .reached()
            .contains("::ffff:127.0.0.12".parse().unwrap()));
        redirect.call(by_address).await.unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_parent_is_named() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://u:hidden@127.0.0.1:{port}");
        let dialer = Dialer::new(
            ResolveMap::default(),
            Some(ParentProxy::new(&url.parse().unwrap(), vec![])),
        );
        let msg = connect_tcp(&dialer, "reg.test", 443)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with(&format!(
                "upstream_proxy http://127.0.0.1:{port}: cannot connect to the parent proxy"
            )),
            "{msg}"
        );
        assert!(!msg.contains("hidden"), "{msg}");
    }
}
