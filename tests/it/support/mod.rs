//! Shared harness for regcache's integration tests.
//!
//! The pieces, in the order a test meets them:
//!
//! * [`TestCa`]: a throw-away certificate authority (rcgen) that signs the
//!   in-process upstream's certificate. Its PEM is written to a temp file and
//!   handed to regcache as `--upstream-ca`, so regcache can verify the upstream
//!   while a client that trusts only the regcache CA cannot.
//! * [`Upstream`]: an in-process origin (hyper server, HTTPS or plain HTTP) on
//!   `127.0.0.1:0`. It records every request it saw ([`Seen`]) and serves a few
//!   routes: an echo, a body of N bytes generated on the fly, a slow body, an
//!   upload sink that checks every byte, a response carrying hop-by-hop
//!   headers, and arbitrary status codes.
//! * [`Proxy`]: the real `regcache` binary, spawned with a temp CA dir and a
//!   free port, ready once `/healthz` answers 200; killed when dropped. Its
//!   stderr goes to a file so tests can read the log.
//! * [`connect_tunnel`], [`tls_connect`], [`HttpClient`]: a CONNECT client that
//!   opens a tunnel, speaks TLS through it trusting only the roots it is given,
//!   and runs a hyper HTTP/1.1 or HTTP/2 client connection on top.
//! * [`raw_exchange`]: write arbitrary bytes to the proxy port and read one
//!   response head back, for the malformed-input tests.
//!
//! Bodies are checked against [`pattern`], a fixed pseudo-random buffer whose
//! length is a prime, so byte `i` of any generated body is
//! `pattern()[i % PATTERN_LEN]`. [`PatternBody`] produces such a body without
//! allocating and [`PatternCheck`] verifies one with `memcmp`, which keeps
//! gigabyte transfers cheap even in a debug build.

pub mod auth;
pub mod registry;

use std::convert::Infallible;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ReqBody = BoxBody<Bytes, BoxError>;
pub type RespBody = BoxBody<Bytes, BoxError>;

/// Host names the upstream's certificate is valid for.
pub const UPSTREAM_NAMES: &[&str] = &[
    "upstream.test",
    "registry-1.docker.io",
    "other.test",
    "plain.test",
    "*.wild.test",
    "127.0.0.1",
];

/// Generous deadline for anything that should be quick.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = StdTcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Run `fut` with a deadline; panic with `what` when it is exceeded.
pub async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

pub fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn empty() -> ReqBody {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed()
}

pub fn full(data: impl Into<Bytes>) -> ReqBody {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

/// Collect a whole (small) body.
pub async fn body_bytes(body: Incoming) -> Bytes {
    within("reading a response body", STEP_TIMEOUT, body.collect())
        .await
        .expect("response body failed")
        .to_bytes()
}

pub async fn body_string(body: Incoming) -> String {
    String::from_utf8_lossy(&body_bytes(body).await).into_owned()
}

/// All certificates in a PEM file's bytes.
pub fn certs_from_pem(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .expect("PEM with certificates")
}

/// VmRSS of a process in bytes, from /proc/<pid>/status.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn send_signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid we spawned ourselves.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

// ---------------------------------------------------------------------------
// The byte pattern
// ---------------------------------------------------------------------------

/// Length of [`pattern`]; a prime, so chunk boundaries never line up with it.
pub const PATTERN_LEN: usize = 1_000_003;

/// A fixed pseudo-random buffer (xorshift64), built once per test process.
pub fn pattern() -> &'static Bytes {
    static P: OnceLock<Bytes> = OnceLock::new();
    P.get_or_init(|| {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut v = Vec::with_capacity(PATTERN_LEN + 8);
        while v.len() < PATTERN_LEN {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.truncate(PATTERN_LEN);
        Bytes::from(v)
    })
}

/// A body of `len` bytes of [`pattern`], produced chunk by chunk as the
/// connection asks for it (zero-copy slices of the shared pattern).
pub struct PatternBody {
    offset: u64,
    end: u64,
    chunk: usize,
    exact: bool,
    delay: Option<Duration>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl PatternBody {
    /// A body with a known length (sent with Content-Length).
    pub fn new(len: u64) -> Self {
        PatternBody {
            offset: 0,
            end: len,
            chunk: 64 * 1024,
            exact: true,
            delay: None,
            sleep: None,
        }
    }
    /// Do not announce the length (HTTP/1.1 sends it chunked).
    pub fn without_length(mut self) -> Self {
        self.exact = false;
        self
    }
    pub fn chunk(mut self, size: usize) -> Self {
        self.chunk = size.max(1);
        self
    }
    /// Wait this long before each chunk.
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }
    pub fn boxed(self) -> ReqBody {
        BodyExt::boxed(self)
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.offset >= this.end {
            return Poll::Ready(None);
        }
        if let Some(d) = this.delay {
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(d)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.sleep = None;
        }
        let start = (this.offset % PATTERN_LEN as u64) as usize;
        let n = (this.chunk as u64)
            .min((PATTERN_LEN - start) as u64)
            .min(this.end - this.offset) as usize;
        this.offset += n as u64;
        Poll::Ready(Some(Ok(Frame::data(pattern().slice(start..start + n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.offset >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.end - self.offset)
        } else {
            SizeHint::default()
        }
    }
}

/// Verifies that a byte stream is [`pattern`] from offset 0, chunk by chunk.
#[derive(Debug, Default)]
pub struct PatternCheck {
    pub len: u64,
    /// Offset of the first byte that differed, if any.
    pub first_mismatch: Option<u64>,
}

impl PatternCheck {
    pub fn feed(&mut self, mut data: &[u8]) {
        let p = pattern();
        while !data.is_empty() {
            let start = (self.len % PATTERN_LEN as u64) as usize;
            let n = data.len().min(PATTERN_LEN - start);
            if self.first_mismatch.is_none() && data[..n] != p[start..start + n] {
                let i = (0..n).find(|&i| data[i] != p[start + i]).unwrap_or(0);
                self.first_mismatch = Some(self.len + i as u64);
            }
            self.len += n as u64;
            data = &data[n..];
        }
    }
    pub fn ok(&self) -> bool {
        self.first_mismatch.is_none()
    }
}

/// Read a body to its end, checking it against the pattern.
pub async fn check_pattern_body(mut body: Incoming) -> Result<PatternCheck, String> {
    let mut check = PatternCheck::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body error after {} bytes: {e}", check.len))?;
        if let Ok(data) = frame.into_data() {
            check.feed(&data);
        }
    }
    Ok(check)
}

// ---------------------------------------------------------------------------
// A test certificate authority
// ---------------------------------------------------------------------------

pub struct TestCa {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A leaf certificate and its key.
pub struct Leaf {
    pub cert_der: CertificateDer<'static>,
    pub key_der: PrivatePkcs8KeyDer<'static>,
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "regcache tests upstream CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// Issue a server certificate for `names` (DNS names or IP addresses).
    pub fn issue(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0].clone());
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_der: cert.der().clone(),
            key_der: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }

    /// Write the CA certificate as PEM into `dir` and return the path.
    pub fn write_pem(&self, dir: &Path) -> PathBuf {
        let path = dir.join("upstream-ca.pem");
        std::fs::write(&path, &self.cert_pem).unwrap();
        path
    }
}

// ---------------------------------------------------------------------------
// The in-process upstream
// ---------------------------------------------------------------------------

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    /// Path and query, e.g. `/echo/a?b=c`.
    pub path: String,
    pub version: Version,
    pub headers: HeaderMap,
    /// Request body bytes received (for routes that read the body).
    pub body_len: u64,
    /// For `/upload`: whether every byte matched the pattern.
    pub body_pattern_ok: Option<bool>,
    /// The TLS SNI the connecting client sent (HTTPS upstreams only).
    pub sni: Option<String>,
    /// The ALPN protocol negotiated on the connection (HTTPS upstreams only).
    pub alpn: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamKind {
    /// TLS with ALPN h2 and http/1.1.
    Https,
    /// TLS offering only http/1.1 (so hop-by-hop headers travel on the wire).
    HttpsH1Only,
    /// Plain HTTP/1.1.
    Plain,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub kind: UpstreamKind,
    /// The upstream's leaf certificate (TLS kinds).
    pub leaf_der: Option<CertificateDer<'static>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct ConnInfo {
    sni: Option<String>,
    alpn: Option<String>,
}

impl Upstream {
    /// Start an upstream of `kind`; TLS kinds use a certificate from `ca` for
    /// [`UPSTREAM_NAMES`].
    pub async fn start(kind: UpstreamKind, ca: &TestCa) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();

        let (acceptor, leaf_der) = if kind == UpstreamKind::Plain {
            (None, None)
        } else {
            let leaf = ca.issue(UPSTREAM_NAMES);
            let mut cfg = rustls::ServerConfig::builder_with_provider(ring())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![leaf.cert_der.clone()],
                    PrivateKeyDer::Pkcs8(leaf.key_der.clone_key()),
                )
                .unwrap();
            cfg.alpn_protocols = match kind {
                UpstreamKind::Https => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                _ => vec![b"http/1.1".to_vec()],
            };
            (Some(TlsAcceptor::from(Arc::new(cfg))), Some(leaf.cert_der))
        };

        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let seen = seen2.clone();
                tokio::spawn(async move {
                    match acceptor {
                        None => {
                            let info = Arc::new(ConnInfo {
                                sni: None,
                                alpn: None,
                            });
                            let svc =
                                service_fn(move |req| handle(seen.clone(), info.clone(), req));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tcp), svc)
                                .await;
                        }
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let conn = tls.get_ref().1;
                            let info = Arc::new(ConnInfo {
                                sni: conn.server_name().map(str::to_owned),
                                alpn: conn
                                    .alpn_protocol()
                                    .map(|p| String::from_utf8_lossy(p).into_owned()),
                            });
                            let h2 = info.alpn.as_deref() == Some("h2");
                            let svc =
                                service_fn(move |req| handle(seen.clone(), info.clone(), req));
                            if h2 {
                                let _ =
                                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                        .serve_connection(TokioIo::new(tls), svc)
                                        .await;
                            } else {
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(tls), svc)
                                    .await;
                            }
                        }
                    }
                });
            }
        });

        Upstream {
            addr,
            kind,
            leaf_der,
            seen,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Everything seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests seen whose path starts with `prefix`.
    pub fn seen_path(&self, prefix: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path.starts_with(prefix))
            .collect()
    }

    /// Wait (briefly) until a request whose path starts with `prefix` shows up.
    pub async fn wait_for(&self, prefix: &str) -> Seen {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(s) = self.seen_path(prefix).into_iter().next() {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "upstream never saw a request for {prefix}; saw: {:?}",
                    self.seen().iter().map(|s| &s.path).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn query_param(path: &str, key: &str) -> Option<u64> {
    let q = path.split_once('?')?.1;
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

fn resp(status: StatusCode, body: RespBody) -> Response<RespBody> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r
}

/// The upstream's routes:
/// * `/bytes/N[?chunk=C&delay_ms=D&unsized=1]`: N bytes of the pattern.
/// * `/upload...`: reads the body, checking it against the pattern; answers
///   `received=N ok=BOOL`.
/// * `/hop...`: echo, plus hop-by-hop response headers.
/// * `/status/CODE`: that status, with a couple of registry-ish headers.
/// * anything else: echo, `METHOD PATH\n` followed by the request body.
async fn handle(
    seen: Arc<Mutex<Vec<Seen>>>,
    info: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let mut record = Seen {
        method: parts.method.clone(),
        path: path.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body_len: 0,
        body_pattern_ok: None,
        sni: info.sni.clone(),
        alpn: info.alpn.clone(),
    };
    let proto = HeaderValue::from_str(&format!("{:?}", parts.version)).unwrap();

    if let Some(rest) = path.strip_prefix("/bytes/") {
        let n: u64 = rest
            .split(['?', '/'])
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut b = PatternBody::new(n);
        if let Some(c) = query_param(&path, "chunk") {
            b = b.chunk(c as usize);
        }
        if let Some(d) = query_param(&path, "delay_ms") {
            b = b.delay(Duration::from_millis(d));
        }
        if query_param(&path, "unsized") == Some(1) {
            b = b.without_length();
        }
        seen.lock().unwrap().push(record);
        let mut r = resp(StatusCode::OK, b.boxed());
        r.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("application/octet-stream"),
        );
        r.headers_mut().insert("x-upstream-proto", proto);
        return Ok(r);
    }

    if path.starts_with("/upload") {
        let mut check = PatternCheck::default();
        let mut body = body;
        let mut err = None;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(d) = f.into_data() {
                        check.feed(&d);
                    }
                }
                Err(e) => {
                    err = Some(e.to_string());
                    break;
                }
            }
        }
        record.body_len = check.len;
        record.body_pattern_ok = Some(check.ok() && err.is_none());
        seen.lock().unwrap().push(record);
        let text = format!(
            "received={} ok={} err={}",
            check.len,
            check.ok(),
            err.unwrap_or_default()
        );
        let mut r = resp(StatusCode::CREATED, full(text));
        r.headers_mut().insert("x-upstream-proto", proto);
        return Ok(r);
    }

    if let Some(code) = path.strip_prefix("/status/") {
        let code: u16 = code.split('?').next().unwrap().parse().unwrap_or(500);
        seen.lock().unwrap().push(record);
        let status = StatusCode::from_u16(code).unwrap();
        let mut r = resp(status, full(format!("status {code}\n")));
        let h = r.headers_mut();
        h.insert(
            "docker-distribution-api-version",
            HeaderValue::from_static("registry/2.0"),
        );
        h.insert(
            "www-authenticate",
            HeaderValue::from_static(
                "Bearer realm=\"https://auth.test/token\",service=\"upstream.test\"",
            ),
        );
        h.insert("x-upstream-proto", proto);
        return Ok(r);
    }

    // Echo (and /hop).
    let data = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => Bytes::new(),
    };
    record.body_len = data.len() as u64;
    seen.lock().unwrap().push(record);
    let mut out = format!("{} {}\n", parts.method, path).into_bytes();
    out.extend_from_slice(&data);
    let len = out.len();
    let head = parts.method == Method::HEAD;
    // HEAD: no body (hyper's HTTP/2 server would send one), but the length
    // the GET would have.
    let mut r = resp(StatusCode::OK, if head { empty() } else { full(out) });
    let h = r.headers_mut();
    h.insert("x-upstream-proto", proto);
    h.insert("x-end-to-end", HeaderValue::from_static("kept"));
    if head {
        h.insert("content-length", HeaderValue::from(len));
    }
    if path.starts_with("/hop") {
        h.insert("connection", HeaderValue::from_static("x-resp-hop"));
        h.insert("x-resp-hop", HeaderValue::from_static("must-not-pass"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5, max=100"));
    }
    Ok(r)
}

// ---------------------------------------------------------------------------
// The regcache process
// ---------------------------------------------------------------------------

/// How to start regcache. Most tests use `ProxyBuilder::new().upstream(&up, &ca_file)`.
pub struct ProxyBuilder {
    args: Vec<String>,
    ca_dir: Option<PathBuf>,
    env: Vec<(String, String)>,
    no_listen_flag: bool,
    ready_status: u16,
}

impl Default for ProxyBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyBuilder {
    pub fn new() -> Self {
        ProxyBuilder {
            args: vec![],
            ca_dir: None,
            env: vec![],
            no_listen_flag: false,
            ready_status: 200,
        }
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Self {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    /// Use an existing CA dir (to test reuse) instead of a fresh temp dir.
    pub fn ca_dir(mut self, dir: &Path) -> Self {
        self.ca_dir = Some(dir.to_owned());
        self
    }
    /// `--resolve HOST=127.0.0.1:PORT`.
    pub fn resolve(self, host: &str, port: u16) -> Self {
        self.arg("--resolve")
            .arg(format!("{host}=127.0.0.1:{port}"))
    }
    pub fn intercept(self, host: &str) -> Self {
        self.arg("--intercept").arg(host)
    }
    pub fn upstream_ca(self, path: &Path) -> Self {
        self.arg("--upstream-ca").arg(path.to_str().unwrap())
    }
    /// Leave `--listen` and `--ca-dir` out of the command line (they come from
    /// a config file or the environment); the port and dir must still be given
    /// to `start_with` so the harness knows where to look.
    pub fn without_listen_flags(mut self) -> Self {
        self.no_listen_flag = true;
        self
    }

    pub async fn start(self) -> Proxy {
        let port = free_port();
        self.start_on(port).await
    }

    pub async fn start_on(self, port: u16) -> Proxy {
        let tmp = tempfile::tempdir().unwrap();
        let ca_dir = self.ca_dir.clone().unwrap_or_else(|| tmp.path().join("ca"));
        let stderr_path = tmp.path().join("stderr.log");
        let stdout_path = tmp.path().join("stdout.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regcache"));
        // Defaults relative to the working directory (cache/, certs/) land in
        // the temp dir, never in the source tree.
        cmd.current_dir(tmp.path());
        cmd.arg("serve");
        if !self.no_listen_flag {
            cmd.arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--ca-dir")
                .arg(&ca_dir);
        }
        cmd.args(&self.args)
            .env_remove("HTTPS_PROXY")
            .env_remove("HTTP_PROXY")
            .env_remove("https_proxy")
            .env_remove("http_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout_path).unwrap())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        for (k, _) in std::env::vars() {
            if k.starts_with("REGCACHE_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn regcache");
        let mut proxy = Proxy {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: Some(child),
            ca_dir,
            stderr_path,
            stdout_path,
            _tmp: tmp,
        };
        proxy.wait_ready(self.ready_status).await;
        proxy
    }
}

pub struct Proxy {
    pub addr: SocketAddr,
    child: Option<Child>,
    pub ca_dir: PathBuf,
    pub stderr_path: PathBuf,
    pub stdout_path: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Proxy {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("process still owned").id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The regcache CA certificate as written to the CA dir.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.ca_dir.join("ca.crt")).expect("ca.crt in the CA dir")
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        certs_from_pem(&self.ca_pem())
            .into_iter()
            .next()
            .expect("ca.crt holds a certificate")
    }

    async fn wait_ready(&mut self, ready_status: u16) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "regcache exited early with {status}; stderr:\n{}",
                    self.stderr()
                );
            }
            if let Ok(Ok(r)) = tokio::time::timeout(
                Duration::from_secs(2),
                raw_exchange(
                    self.addr,
                    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                ),
            )
            .await
            {
                if r.status == ready_status {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!("regcache never became ready; stderr:\n{}", self.stderr());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET /healthz` on a fresh connection; returns the status (0 if the
    /// exchange failed).
    pub async fn healthz(&self) -> u16 {
        match tokio::time::timeout(
            Duration::from_secs(5),
            raw_exchange(
                self.addr,
                b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            ),
        )
        .await
        {
            Ok(Ok(r)) => r.status,
            _ => 0,
        }
    }

    pub async fn assert_healthy(&self, after: &str) {
        assert_eq!(
            self.healthz().await,
            200,
            "/healthz on a fresh connection after {after} should be 200; stderr:\n{}",
            self.stderr()
        );
    }

    /// Send SIGTERM.
    pub fn sigterm(&self) {
        send_signal(self.pid(), libc::SIGTERM);
    }

    /// Wait for the process to exit; None on timeout.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Open a CONNECT tunnel to `target` (e.g. `upstream.test:443`).
    pub async fn tunnel(&self, target: &str) -> TcpStream {
        match connect_tunnel(self.addr, target).await {
            Ok(s) => s,
            Err(status) => panic!(
                "CONNECT {target}: expected 200, got {status}; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// CONNECT + TLS (trusting only the regcache CA) + an HTTP client.
    pub async fn intercepted(&self, host: &str, alpn: Alpn) -> HttpClient {
        let tcp = self.tunnel(&format!("{host}:443")).await;
        let tls = tls_connect(tcp, host, vec![self.ca_der()], alpn, true)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "TLS to {host} through the tunnel, trusting only the regcache CA: {e}; stderr:\n{}",
                    self.stderr()
                )
            });
        HttpClient::over_tls(tls, host).await
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP on the proxy port
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

fn parse_status(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Write `request` to a fresh connection (while reading, so a server that
/// answers early is heard) and read one response: head, then a body as long as
/// Content-Length says, or until EOF if there is none.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<RawResponse> {
    let stream = TcpStream::connect(addr).await?;
    let (mut rd, mut wr) = stream.into_split();
    let req = request.to_vec();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&req).await;
        let _ = wr.flush().await;
        // Keep the write half open (no FIN) until the read side is done.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(wr);
    });
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
        let n = rd.read(&mut tmp).await?;
        if n == 0 {
            writer.abort();
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before a response head; got {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = parse_status(&head);
    let mut body = buf[head_end..].to_vec();
    let mut r = RawResponse {
        status,
        head,
        body: vec![],
    };
    let no_body = request.starts_with(b"HEAD ") || status == 204 || status == 304;
    match r
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        _ if no_body => body.clear(),
        Some(len) => {
            while body.len() < len {
                let n = rd.read(&mut tmp).await?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&tmp[..n]);
            }
            body.truncate(len);
        }
        None if r
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) =>
        {
            // Read until the terminating chunk, then decode.
            while find(&body, b"0\r\n\r\n").is_none() {
                let n = rd.read(&mut tmp).await?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&tmp[..n]);
            }
            body = dechunk(&body);
        }
        None => {
            // Read to EOF (bounded in time by the caller).
            loop {
                match rd.read(&mut tmp).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => body.extend_from_slice(&tmp[..n]),
                }
            }
        }
    }
    writer.abort();
    r.body = body;
    Ok(r)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(p) = find(data, b"\r\n") {
        let size_str = String::from_utf8_lossy(&data[..p]);
        let size =
            usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        data = &data[p + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

/// Same as [`raw_exchange`], with a deadline.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    within(
        "raw exchange with the proxy",
        STEP_TIMEOUT,
        raw_exchange(addr, request),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "raw exchange {:?} failed: {e}",
            String::from_utf8_lossy(&request[..request.len().min(120)])
        )
    })
}

// ---------------------------------------------------------------------------
// CONNECT + TLS + HTTP clients
// ---------------------------------------------------------------------------

/// Send `CONNECT target` and read the response head. On 200 the stream is
/// positioned at the first tunnelled byte; otherwise Err(status) (0 if the
/// proxy closed or answered garbage).
pub async fn connect_tunnel(proxy: SocketAddr, target: &str) -> Result<TcpStream, u16> {
    let mut s = TcpStream::connect(proxy).await.map_err(|_| 0u16)?;
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|_| 0u16)?;
    // Read byte by byte so nothing after the head is consumed.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut b).await {
                Ok(1) => head.push(b[0]),
                _ => return false,
            }
            if head.len() > 64 * 1024 {
                return false;
            }
        }
        true
    };
    let complete = within("reading the CONNECT response", STEP_TIMEOUT, read).await;
    let status = parse_status(&String::from_utf8_lossy(&head));
    if !complete {
        return Err(status);
    }
    if status == 200 {
        Ok(s)
    } else {
        Err(status)
    }
}

/// What to offer in ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http11,
    Both,
    None,
}

impl Alpn {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::H2 => vec![b"h2".to_vec()],
            Alpn::Http11 => vec![b"http/1.1".to_vec()],
            Alpn::Both => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Alpn::None => vec![],
        }
    }
}

pub type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// TLS over `stream`, verifying the server as `name` against ONLY `roots`.
pub async fn tls_connect(
    stream: TcpStream,
    name: &str,
    roots: Vec<CertificateDer<'static>>,
    alpn: Alpn,
    sni: bool,
) -> Result<ClientTls, std::io::Error> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r).expect("root certificate");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.protocols();
    cfg.enable_sni = sni;
    let server_name = ServerName::try_from(name.to_owned()).expect("server name");
    let connector = TlsConnector::from(Arc::new(cfg));
    within(
        "TLS handshake",
        STEP_TIMEOUT,
        connector.connect(server_name, stream),
    )
    .await
}

/// The leaf certificate the server presented.
pub fn peer_leaf(tls: &ClientTls) -> CertificateDer<'static> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server sent a certificate")
        .clone()
}

pub fn negotiated_alpn(tls: &ClientTls) -> Option<String> {
    tls.get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<ReqBody>),
    H2(hyper::client::conn::http2::SendRequest<ReqBody>),
}

/// A hyper client connection (HTTP/1.1 or HTTP/2) to one host.
pub struct HttpClient {
    sender: Sender,
    /// Host used in the Host header (h1) or :authority (h2).
    pub host: String,
    /// "https" or "http".
    scheme: &'static str,
    /// ALPN the TLS layer negotiated, if TLS.
    pub alpn: Option<String>,
    /// Leaf certificate the server presented, if TLS.
    pub peer_leaf: Option<CertificateDer<'static>>,
}

impl HttpClient {
    /// Run HTTP/2 if ALPN chose h2, HTTP/1.1 otherwise.
    pub async fn over_tls(tls: ClientTls, host: &str) -> HttpClient {
        let alpn = negotiated_alpn(&tls);
        let leaf = peer_leaf(&tls);
        let io = TokioIo::new(tls);
        let sender = if alpn.as_deref() == Some("h2") {
            let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .expect("h2 handshake");
            tokio::spawn(conn);
            Sender::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("http1 handshake");
            tokio::spawn(conn);
            Sender::H1(s)
        };
        HttpClient {
            sender,
            host: host.to_owned(),
            scheme: "https",
            alpn,
            peer_leaf: Some(leaf),
        }
    }

    /// A plain HTTP/1.1 connection to the proxy port, for absolute-form
    /// requests (`host` is what goes in the Host header).
    pub async fn plain_h1(addr: SocketAddr, host: &str) -> HttpClient {
        let tcp = TcpStream::connect(addr).await.expect("connect to proxy");
        let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("http1 handshake");
        tokio::spawn(conn);
        HttpClient {
            sender: Sender::H1(s),
            host: host.to_owned(),
            scheme: "http",
            alpn: None,
            peer_leaf: None,
        }
    }

    pub fn is_h2(&self) -> bool {
        matches!(self.sender, Sender::H2(_))
    }

    /// A request builder for `path` on this connection's host: origin-form
    /// plus Host for HTTP/1.1, absolute URI for HTTP/2.
    pub fn builder(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        match self.sender {
            Sender::H1(_) => Request::builder()
                .method(method)
                .uri(path)
                .header("host", &self.host),
            Sender::H2(_) => Request::builder()
                .method(method)
                .version(Version::HTTP_2)
                .uri(format!("{}://{}{}", self.scheme, self.host, path)),
        }
    }

    pub async fn send(&mut self, req: Request<ReqBody>) -> Response<Incoming> {
        self.send_within(req, STEP_TIMEOUT).await
    }

    /// Send and wait for the response head at most `limit`.
    pub async fn send_within(
        &mut self,
        req: Request<ReqBody>,
        limit: Duration,
    ) -> Response<Incoming> {
        let what = format!("{} {}", req.method(), req.uri());
        let fut = async {
            match &mut self.sender {
                Sender::H1(s) => {
                    s.ready().await?;
                    s.send_request(req).await
                }
                Sender::H2(s) => {
                    s.ready().await?;
                    s.send_request(req).await
                }
            }
        };
        within(&format!("response to {what}"), limit, fut)
            .await
            .unwrap_or_else(|e| panic!("{what} through the proxy failed: {e:?}"))
    }

    /// Clone the sender (HTTP/2 only) to run requests concurrently.
    pub fn h2_sender(&self) -> hyper::client::conn::http2::SendRequest<ReqBody> {
        match &self.sender {
            Sender::H2(s) => s.clone(),
            Sender::H1(_) => panic!("not an h2 connection"),
        }
    }

    pub async fn get(&mut self, path: &str) -> Response<Incoming> {
        let req = self.builder(Method::GET, path).body(empty()).unwrap();
        self.send(req).await
    }
}

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

/// A test CA, its PEM file, and an upstream signed by it.
pub struct Fixture {
    pub ca: TestCa,
    pub ca_file: PathBuf,
    pub upstream: Upstream,
    _dir: tempfile::TempDir,
}

impl Fixture {
    pub async fn new(kind: UpstreamKind) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let ca_file = ca.write_pem(dir.path());
        let upstream = Upstream::start(kind, &ca).await;
        Fixture {
            ca,
            ca_file,
            upstream,
            _dir: dir,
        }
    }

    /// A proxy that intercepts `upstream.test` and sends it (and
    /// `registry-1.docker.io`) to the upstream, trusting the test CA.
    pub fn proxy(&self) -> ProxyBuilder {
        ProxyBuilder::new()
            .upstream_ca(&self.ca_file)
            .intercept("upstream.test")
            .resolve("upstream.test", self.upstream.port())
            .resolve("registry-1.docker.io", self.upstream.port())
    }
}

/// Parse a DER certificate and return its DNS and IP subject alt names.
pub fn sans(der: &[u8]) -> (Vec<String>, Vec<std::net::IpAddr>) {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse certificate");
    let mut dns = vec![];
    let mut ips = vec![];
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(b) if b.len() == 4 => {
                    ips.push(std::net::IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()))
                }
                GeneralName::IPAddress(b) if b.len() == 16 => {
                    ips.push(std::net::IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()))
                }
                _ => {}
            }
        }
    }
    (dns, ips)
}

/// Issuer and subject of a DER certificate, as strings.
pub fn issuer_subject(der: &[u8]) -> (String, String) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse certificate");
    (cert.issuer().to_string(), cert.subject().to_string())
}

/// Run a blocking command (the regcache binary) and capture its output.
pub fn run_regcache(args: &[&str]) -> std::process::Output {
    run_regcache_env(args, &[])
}

pub fn run_regcache_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regcache"));
    cmd.args(args).stdin(Stdio::null()).env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("REGCACHE_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn regcache");
    // A bad invocation must exit on its own; don't let a server hang the test.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "regcache {args:?} did not exit within 15s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Header names as lowercase strings.
pub fn header_names(h: &HeaderMap) -> Vec<String> {
    h.keys()
        .map(|k: &HeaderName| k.as_str().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------
// Helpers for the access tests
// ---------------------------------------------------------------------------

impl ProxyBuilder {
    /// Consider regcache ready when `GET /healthz` answers `status` (default
    /// 200), e.g. 403 for a proxy that refuses the test's own address.
    pub fn ready_status(mut self, status: u16) -> Self {
        self.ready_status = status;
        self
    }
}
