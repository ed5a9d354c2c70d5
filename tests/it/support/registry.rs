//! An in-process OCI registry for the cache tests: HTTPS (ALPN h2 and
//! http/1.1) on `127.0.0.1:0`, with a certificate from the test CA for
//! [`REGISTRY_NAMES`], content held in memory, and fault knobs per path.
//!
//! * Content: [`Registry::put_blob`] and [`Registry::put_manifest`] store
//!   bytes under `/v2/<repo>/blobs/<digest>` and `/v2/<repo>/manifests/<ref>`
//!   with the headers a registry sends (`Docker-Content-Digest`,
//!   `Content-Type`, `Content-Length`); [`Registry::put_raw`] stores any path
//!   (a CDN object, a relative redirect target). Unknown paths answer 404 with
//!   a distribution error body. `HEAD` answers carry the length the `GET`
//!   would have, as registries (Go's net/http) do, also for error answers.
//! * Knobs ([`Fault`], per path, set and cleared by the test): wrong bytes,
//!   a body cut after N bytes, chunk size and delay, a gate that holds the
//!   body after N bytes until [`Registry::open_gate`], a delay before the
//!   response head, status overrides for `GET` and `HEAD`, a redirect, and a
//!   body without `Content-Length`.
//! * Plain-http twin ([`Registry::start_plain`]): the same registry without
//!   TLS, to play an insecure registry or a hostile responder on port 80;
//!   [`Registry::start_tls_on`] binds another loopback address
//!   (`127.0.0.12`), to play an internal service.
//! * Record: every request, with method, path, query, headers and the SNI
//!   it came with ([`Req`]), to assert what regcache asked upstream.
//! * Hook ([`Registry::set_hook`]): a function that sees every request first
//!   and may answer it itself ([`Answer`]): an auth layer, a token endpoint
//!   (see `support/auth.rs`). Content and knobs apply when it answers None.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::PrivateKeyDer;
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::{ring, BoxError, TestCa, STEP_TIMEOUT};

type RespBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Host names the registry's certificate is valid for.
pub const REGISTRY_NAMES: &[&str] = &[
    "registry-1.docker.io",
    "cdn.test",
    "other.test",
    "ghcr.io",
    "127.0.0.1",
];

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// `len` pseudo-random bytes, different for every `seed`.
pub fn blob_bytes(seed: u64, len: usize) -> Bytes {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

/// What can go wrong with one path. Everything off by default.
#[derive(Clone, Default, Debug)]
pub struct Fault {
    /// Flip the byte at this offset of the body (same length, wrong digest).
    pub corrupt_at: Option<usize>,
    /// Send this many body bytes, then fail the body (connection cut).
    pub cut_after: Option<usize>,
    /// Body chunk size (default 64 KiB).
    pub chunk: Option<usize>,
    /// Wait this long before each body chunk.
    pub delay: Option<Duration>,
    /// After this many body bytes, wait until the registry's gate opens.
    pub gate_after: Option<usize>,
    /// Wait this long before answering a GET at all (response head included).
    pub head_delay: Option<Duration>,
    /// Answer GETs with this status (and an error body).
    pub get_status: Option<u16>,
    /// Answer HEADs with this status.
    pub head_status: Option<u16>,
    /// Wait this long before answering a GET or HEAD, whatever the answer.
    pub answer_delay: Option<Duration>,
    /// Answer GET and HEAD with this redirect status and Location.
    pub redirect: Option<(u16, String)>,
    /// Send the body without Content-Length (chunked on HTTP/1.1).
    pub no_length: bool,
}

/// One request as the registry saw it.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: Method,
    /// The path without the query.
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// The TLS SNI the connection came with.
    pub sni: Option<String>,
    /// The host the request named (`:authority` or `Host`).
    pub host: Option<String>,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
}

#[derive(Clone)]
struct Resource {
    content_type: String,
    /// Docker-Content-Digest to announce (None for raw objects).
    digest: Option<String>,
    body: Bytes,
}

/// A whole answer given by a hook instead of the registry's content.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body of a GET; a HEAD gets none, with this body's length.
    pub body: Bytes,
}

impl Answer {
    /// `status` with `headers` and a JSON `body`.
    pub fn json(status: u16, headers: Vec<(String, String)>, body: impl Into<Bytes>) -> Answer {
        let mut headers = headers;
        headers.push(("content-type".into(), "application/json".into()));
        Answer {
            status,
            headers,
            body: body.into(),
        }
    }

    /// `status` with a distribution error body (`UNAUTHORIZED`, `DENIED`...)
    /// for the request's path, plus `headers`.
    pub fn error(status: u16, path: &str, headers: Vec<(String, String)>) -> Answer {
        Answer::json(status, headers, error_json(status_code_name(status, path)))
    }
}

/// Sees each request first (after it is recorded); Some answers it.
pub type Hook = Arc<dyn Fn(&Req) -> Option<Answer> + Send + Sync>;

#[derive(Default)]
struct State {
    resources: HashMap<String, Resource>,
    faults: HashMap<String, Fault>,
    seen: Vec<Req>,
    hook: Option<Hook>,
}

/// The fake registry. Stops serving when dropped (or on [`Registry::stop`]).
pub struct Registry {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    gate: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap().take() {
            t.abort();
        }
    }
}

impl Registry {
    /// Starts a registry whose certificate (from `ca`) is valid for
    /// [`REGISTRY_NAMES`].
    pub async fn start(ca: &TestCa) -> Registry {
        Registry::start_with_names(ca, REGISTRY_NAMES).await
    }

    /// Starts a registry whose certificate (from `ca`) is valid for `names`
    /// (a token service on its own host, say).
    pub async fn start_with_names(ca: &TestCa, names: &[&str]) -> Registry {
        Registry::start_tls_on(ca, names, "127.0.0.1:0").await
    }

    /// Starts a registry on `bind` (`127.0.0.12:0`, say: an "internal"
    /// service) whose certificate is valid for `names`.
    pub async fn start_tls_on(ca: &TestCa, names: &[&str], bind: &str) -> Registry {
        let listener = TcpListener::bind(bind).await.unwrap();
        let leaf = ca.issue(names);
        let mut cfg = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.cert_der.clone()],
                PrivateKeyDer::Pkcs8(leaf.key_der.clone_key()),
            )
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Registry::serve(listener, Some(TlsAcceptor::from(Arc::new(cfg))), None)
    }

    /// A registry for `names` and its plain-http twin on the same port: a
    /// connection that starts with a TLS ClientHello reaches the first, any
    /// other the second, with its own content, knobs and record. With
    /// `--resolve NAME=127.0.0.1:PORT`, `https://NAME` (port 443) is the real
    /// registry and `http://NAME` (port 80) whoever answers plain HTTP on
    /// that address: a hostile responder on the path, or an insecure
    /// registry of the same name. The twin stops with the first.
    pub async fn start_with_twin(ca: &TestCa, names: &[&str]) -> (Registry, Registry) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let leaf = ca.issue(names);
        let mut cfg = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.cert_der.clone()],
                PrivateKeyDer::Pkcs8(leaf.key_der.clone_key()),
            )
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let twin = Registry {
            addr: listener.local_addr().unwrap(),
            state: Arc::default(),
            gate: watch::channel(false).0,
            task: Mutex::new(None),
        };
        let plain = (twin.state.clone(), twin.gate.subscribe());
        let tls = Registry::serve(
            listener,
            Some(TlsAcceptor::from(Arc::new(cfg))),
            Some(plain),
        );
        (tls, twin)
    }

    /// Starts a plain-http registry on `127.0.0.1:0`: an insecure registry,
    /// or a hostile twin of an https one (whoever answers port 80 on the
    /// path), with the same content, knobs and record as the TLS one.
    pub async fn start_plain() -> Registry {
        Registry::start_plain_on("127.0.0.1:0").await
    }

    /// [`Registry::start_plain`] on `bind`.
    pub async fn start_plain_on(bind: &str) -> Registry {
        Registry::serve(TcpListener::bind(bind).await.unwrap(), None, None)
    }

    /// Serves `listener`: TLS with `acceptor`, plain HTTP without; with both
    /// an acceptor and a `twin` (state and gate), plain-HTTP connections go
    /// to the twin.
    fn serve(
        listener: TcpListener,
        acceptor: Option<TlsAcceptor>,
        twin: Option<(Arc<Mutex<State>>, watch::Receiver<bool>)>,
    ) -> Registry {
        let addr = listener.local_addr().unwrap();
        let state: Arc<Mutex<State>> = Arc::default();
        let (gate, _) = watch::channel(false);

        let st = state.clone();
        let gate_rx = gate.subscribe();
        let task = tokio::spawn(async move {
            // Connections live in the set: aborting this task ends them all.
            let mut conns = JoinSet::new();
            loop {
                let (tcp, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                };
                let mut acceptor = acceptor.clone();
                let mut st = st.clone();
                let mut gate_rx = gate_rx.clone();
                let twin = twin.clone();
                conns.spawn(async move {
                    if let Some((twin_st, twin_gate)) = twin {
                        let mut first = [0u8; 1];
                        // 0x16: a TLS handshake record.
                        if tcp.peek(&mut first).await.is_ok_and(|n| n == 1) && first[0] != 0x16 {
                            acceptor = None;
                            st = twin_st;
                            gate_rx = twin_gate;
                        }
                    }
                    let Some(acceptor) = acceptor else {
                        let svc =
                            service_fn(move |req| handle(st.clone(), gate_rx.clone(), None, req));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), svc)
                            .await;
                        return;
                    };
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let conn = tls.get_ref().1;
                    let sni = conn.server_name().map(str::to_owned);
                    let h2 = conn.alpn_protocol() == Some(b"h2");
                    let svc = service_fn(move |req| {
                        handle(st.clone(), gate_rx.clone(), sni.clone(), req)
                    });
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    }
                });
            }
        });
        Registry {
            addr,
            state,
            gate,
            task: Mutex::new(Some(task)),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Stops listening and drops every connection; what was seen stays readable.
    pub async fn stop(&self) {
        let task = self.task.lock().unwrap().take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Stores a blob for `repo`; returns its digest.
    pub fn put_blob(&self, repo: &str, data: Bytes) -> String {
        let digest = sha256(&data);
        self.lock().resources.insert(
            format!("/v2/{repo}/blobs/{digest}"),
            Resource {
                content_type: "application/octet-stream".into(),
                digest: Some(digest.clone()),
                body: data,
            },
        );
        digest
    }

    /// Stores a manifest for `repo` under its digest and, if given, `tag`
    /// (replacing what the tag pointed to); returns its digest.
    pub fn put_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        data: Bytes,
    ) -> String {
        let digest = sha256(&data);
        let res = Resource {
            content_type: media_type.into(),
            digest: Some(digest.clone()),
            body: data,
        };
        let mut st = self.lock();
        st.resources
            .insert(format!("/v2/{repo}/manifests/{digest}"), res.clone());
        if let Some(tag) = tag {
            st.resources
                .insert(format!("/v2/{repo}/manifests/{tag}"), res);
        }
        digest
    }

    /// Stores any object at `path` (no Docker-Content-Digest).
    pub fn put_raw(&self, path: &str, content_type: &str, data: Bytes) {
        self.lock().resources.insert(
            path.into(),
            Resource {
                content_type: content_type.into(),
                digest: None,
                body: data,
            },
        );
    }

    /// Forgets `path` (404 from now on).
    pub fn remove(&self, path: &str) {
        self.lock().resources.remove(path);
    }

    pub fn set_fault(&self, path: &str, fault: Fault) {
        self.lock().faults.insert(path.into(), fault);
    }

    pub fn clear_fault(&self, path: &str) {
        self.lock().faults.remove(path);
    }

    /// Lets `hook` see every request first and answer it (Some) or leave it
    /// to the registry's content and knobs (None).
    pub fn set_hook(&self, hook: impl Fn(&Req) -> Option<Answer> + Send + Sync + 'static) {
        self.lock().hook = Some(Arc::new(hook));
    }

    pub fn clear_hook(&self) {
        self.lock().hook = None;
    }

    /// Lets every body held by a `gate_after` knob go on.
    pub fn open_gate(&self) {
        let _ = self.gate.send(true);
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Req> {
        self.lock().seen.clone()
    }

    /// Requests for exactly `path` (query ignored).
    pub fn requests(&self, path: &str) -> Vec<Req> {
        self.seen().into_iter().filter(|r| r.path == path).collect()
    }

    /// How many `method` requests for exactly `path` arrived.
    pub fn count(&self, method: Method, path: &str) -> usize {
        self.requests(path)
            .iter()
            .filter(|r| r.method == method)
            .count()
    }

    /// Methods of the requests for `path`, in order: e.g. `["GET", "HEAD"]`.
    pub fn methods(&self, path: &str) -> Vec<String> {
        self.requests(path)
            .iter()
            .map(|r| r.method.to_string())
            .collect()
    }

    /// `METHOD path` of every request, for failure messages.
    pub fn summary(&self) -> Vec<String> {
        self.seen()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }

    /// Waits until at least `n` `method` requests for `path` arrived.
    pub async fn wait_count(&self, method: Method, path: &str, n: usize) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while self.count(method.clone(), path) < n {
            if Instant::now() > deadline {
                panic!(
                    "registry never saw {n} {method} {path}; saw {:?}",
                    self.summary()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn error_json(code: &str) -> Bytes {
    Bytes::from(format!(
        "{{\"errors\":[{{\"code\":\"{code}\",\"message\":\"fake registry says {code}\",\"detail\":null}}]}}"
    ))
}

fn status_code_name(status: u16, path: &str) -> &'static str {
    match status {
        404 if path.contains("/manifests/") => "MANIFEST_UNKNOWN",
        404 => "BLOB_UNKNOWN",
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        429 => "TOOMANYREQUESTS",
        _ => "UNAVAILABLE",
    }
}

fn full_body(data: Bytes) -> RespBody {
    http_body_util::Full::new(data)
        .map_err(|e| match e {})
        .boxed()
}

/// An answer with no content: its status, an error body for GET, and for
/// HEAD the Content-Length that body would have.
fn status_only(method: &Method, status: u16, path: &str) -> Response<RespBody> {
    let body = error_json(status_code_name(status, path));
    let len = body.len();
    let mut r = Response::new(if *method == Method::HEAD {
        full_body(Bytes::new())
    } else {
        full_body(body)
    });
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert("content-length", HeaderValue::from(len));
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    if status == 429 || status == 503 {
        h.insert("retry-after", HeaderValue::from_static("1"));
    }
    r
}

/// A hook's answer as a response: a HEAD gets no body but its length.
fn hooked(method: &Method, answer: Answer) -> Response<RespBody> {
    let len = answer.body.len();
    let mut r = Response::new(if *method == Method::HEAD {
        full_body(Bytes::new())
    } else {
        full_body(answer.body)
    });
    *r.status_mut() = StatusCode::from_u16(answer.status).unwrap();
    let h = r.headers_mut();
    for (k, v) in &answer.headers {
        h.append(
            hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h.insert("content-length", HeaderValue::from(len));
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    r
}

struct Streamer {
    data: Bytes,
    pos: usize,
    chunk: usize,
    delay: Option<Duration>,
    cut_after: Option<usize>,
    gate: Option<(usize, watch::Receiver<bool>)>,
    failed: bool,
}

async fn next_frame(mut s: Streamer) -> Option<(Result<Frame<Bytes>, BoxError>, Streamer)> {
    if s.failed {
        return None;
    }
    if s.cut_after.is_some_and(|cut| s.pos >= cut) {
        // Let the head and the bytes so far reach the wire first: an HTTP/2
        // reset drops frames still queued, which would make this a failure
        // before the response rather than a cut in the middle of the body.
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.failed = true;
        return Some((Err("fake registry cut the body".into()), s));
    }
    if s.pos >= s.data.len() {
        return None;
    }
    if let Some((after, rx)) = &mut s.gate {
        if s.pos >= *after {
            let _ = rx.wait_for(|open| *open).await;
            s.gate = None;
        }
    }
    if let Some(d) = s.delay {
        tokio::time::sleep(d).await;
    }
    let mut end = (s.pos + s.chunk).min(s.data.len());
    if let Some(cut) = s.cut_after {
        end = end.min(cut.max(s.pos + 1));
    }
    if let Some((after, _)) = &s.gate {
        if s.pos < *after {
            end = end.min(*after);
        }
    }
    let frame = Frame::data(s.data.slice(s.pos..end));
    s.pos = end;
    Some((Ok(frame), s))
}

async fn handle(
    state: Arc<Mutex<State>>,
    gate: watch::Receiver<bool>,
    sni: Option<String>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let (parts, _body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let host = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
        parts
            .headers
            .get("host")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    let record = Req {
        method: parts.method.clone(),
        path: path.clone(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers.clone(),
        sni,
        host,
    };
    let (resource, fault, hook) = {
        let mut st = state.lock().unwrap();
        st.seen.push(record.clone());
        (
            st.resources.get(&path).cloned(),
            st.faults.get(&path).cloned().unwrap_or_default(),
            st.hook.clone(),
        )
    };
    // Called without the lock: a hook may look at other shared state.
    if let Some(answer) = hook.and_then(|h| h(&record)) {
        return Ok(hooked(&parts.method, answer));
    }
    let method = parts.method;
    if method != Method::GET && method != Method::HEAD {
        return Ok(status_only(&method, 405, &path));
    }
    if let Some((status, location)) = &fault.redirect {
        let mut r = Response::new(full_body(Bytes::new()));
        *r.status_mut() = StatusCode::from_u16(*status).unwrap();
        r.headers_mut()
            .insert("location", HeaderValue::from_str(location).unwrap());
        return Ok(r);
    }
    if let Some(d) = fault.answer_delay {
        tokio::time::sleep(d).await;
    }
    let forced = if method == Method::HEAD {
        fault.head_status
    } else {
        fault.get_status
    };
    if let Some(status) = forced {
        return Ok(status_only(&method, status, &path));
    }
    let Some(res) = resource else {
        return Ok(status_only(&method, 404, &path));
    };
    if method == Method::GET {
        if let Some(d) = fault.head_delay {
            tokio::time::sleep(d).await;
        }
    }

    let len = res.body.len();
    let body = if method == Method::HEAD {
        full_body(Bytes::new())
    } else {
        let mut data = res.body.clone();
        if let Some(at) = fault.corrupt_at {
            let mut v = data.to_vec();
            v[at] ^= 0xff;
            data = Bytes::from(v);
        }
        let streamer = Streamer {
            data,
            pos: 0,
            chunk: fault.chunk.unwrap_or(64 * 1024),
            delay: fault.delay,
            cut_after: fault.cut_after,
            gate: fault.gate_after.map(|n| (n, gate)),
            failed: false,
        };
        StreamBody::new(stream::unfold(streamer, next_frame)).boxed()
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_str(&res.content_type).unwrap(),
    );
    if !(fault.no_length && method == Method::GET) {
        h.insert("content-length", HeaderValue::from(len));
    }
    if let Some(d) = &res.digest {
        h.insert("docker-content-digest", HeaderValue::from_str(d).unwrap());
        h.insert("etag", HeaderValue::from_str(&format!("\"{d}\"")).unwrap());
    }
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    Ok(r)
}
