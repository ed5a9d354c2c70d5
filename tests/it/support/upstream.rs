//! An in-process origin for the proxy tests: a hyper server (HTTPS or plain
//! HTTP) on `127.0.0.1:0` that records every request it saw ([`Seen`]) and
//! serves a few routes: an echo, a body of N bytes generated on the fly, a
//! slow body, an upload sink that checks every byte, a response carrying
//! hop-by-hop headers, and arbitrary status codes. [`Fixture`] is the test CA,
//! its PEM file and such an upstream, with the proxy that sends to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;

use super::http::{empty, full, read_chunks, RespBody};
use super::pattern::{PatternBody, PatternCheck};
use super::proxy::ProxyBuilder;
use super::tls::{serve, Accept, Conn, TestCa};
use super::STEP_TIMEOUT;

/// Host names the upstream's certificate is valid for.
const UPSTREAM_NAMES: &[&str] = &[
    "upstream.test",
    "registry-1.docker.io",
    "other.test",
    "plain.test",
    "*.wild.test",
    "127.0.0.1",
];

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The request method.
    pub method: Method,
    /// Path and query, e.g. `/echo/a?b=c`.
    pub path: String,
    /// The request headers.
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

/// What the upstream speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamKind {
    /// TLS with ALPN h2 and http/1.1.
    Https,
    /// TLS offering only http/1.1 (so hop-by-hop headers travel on the wire).
    HttpsH1Only,
    /// Plain HTTP/1.1.
    Plain,
}

/// The running upstream; stops serving when dropped.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
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

impl Upstream {
    /// Start an upstream of `kind`; TLS kinds use a certificate from `ca` for
    /// [`UPSTREAM_NAMES`].
    pub async fn start(kind: UpstreamKind, ca: &TestCa) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (accept, leaf_der) = match kind {
            UpstreamKind::Plain => (Accept::Plain, None),
            UpstreamKind::Https | UpstreamKind::HttpsH1Only => {
                let alpn: &[&[u8]] = if kind == UpstreamKind::Https {
                    &[b"h2", b"http/1.1"]
                } else {
                    &[b"http/1.1"]
                };
                let (acceptor, leaf) = ca.acceptor(UPSTREAM_NAMES, alpn);
                (Accept::Tls(acceptor), Some(leaf))
            }
        };
        let record = seen.clone();
        let task = serve(listener, accept, move |conn, req| {
            handle(record.clone(), conn, req)
        });
        Upstream {
            addr,
            leaf_der,
            seen,
            task,
        }
    }

    /// The port it listens on.
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
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let mut record = Seen {
        method: parts.method.clone(),
        path: path.clone(),
        headers: parts.headers.clone(),
        body_len: 0,
        body_pattern_ok: None,
        sni: conn.sni.clone(),
        alpn: conn.alpn.clone(),
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
        return r;
    }

    if path.starts_with("/upload") {
        let mut check = PatternCheck::default();
        let read = read_chunks(body, |d| check.feed(d)).await;
        let err = read.err().map(|e| e.to_string());
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
        return r;
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
        return r;
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
    r
}

/// A test CA, its PEM file, and an upstream signed by it.
pub struct Fixture {
    /// The CA that signed the upstream's certificate.
    pub ca: TestCa,
    /// Its PEM file (`--upstream-ca`).
    pub ca_file: PathBuf,
    /// The upstream.
    pub upstream: Upstream,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// A fresh CA and an upstream of `kind` signed by it.
    pub async fn new(kind: UpstreamKind) -> Fixture {
        let (ca, ca_file, dir) = TestCa::in_temp_dir();
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
