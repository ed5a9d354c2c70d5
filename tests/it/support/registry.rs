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
//! * Plain http: a twin on the same port ([`Registry::start_with_twin`]),
//!   with its own content, knobs and record, to play an insecure registry or
//!   a hostile responder on port 80; [`Registry::start_plain_on`] and
//!   [`Registry::start_tls_on`] bind another loopback address (`127.0.0.12`),
//!   to play an internal service.
//! * Record: every request, with method, path, query, headers and the SNI
//!   it came with ([`Req`]), to assert what regcache asked upstream.
//! * Hook ([`Registry::set_hook`]): a function that sees every request first
//!   and may answer it itself ([`Answer`]): an auth layer, a token endpoint
//!   (see [`super::auth`]). Content and knobs apply when it answers None.
//! * Test data: [`HUB`], paths ([`blob_path`], [`manifest_path`]), the media types regcache does not export
//!   ([`OCI_CONFIG`], [`OCI_LAYER`]), [`ACCEPT_ALL`], and manifests
//!   ([`image_manifest`], [`oci_manifest`], [`oci_index`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use regcache::registry::media::{DOCKER_MANIFEST_V2, OCI_INDEX, OCI_MANIFEST};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::http::{full, header_text, BoxError, RespBody};
use super::tls::{serve, Accept, TestCa};
use super::STEP_TIMEOUT;

/// The registry host regcache sends to the in-process registry.
pub const HUB: &str = "registry-1.docker.io";

/// Media type of an OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of an OCI gzip layer.
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// What docker and containerd send when pulling by tag.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

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

/// `/v2/<repo>/blobs/<digest>`.
pub fn blob_path(repo: &str, digest: &str) -> String {
    format!("/v2/{repo}/blobs/{digest}")
}

/// `/v2/<repo>/manifests/<reference>`.
pub fn manifest_path(repo: &str, reference: &str) -> String {
    format!("/v2/{repo}/manifests/{reference}")
}

/// An image manifest of `media_type` naming `config` and `layers` (digest,
/// size), with the config and layer types that go with it (Docker's for
/// [`DOCKER_MANIFEST_V2`], OCI's otherwise).
pub fn image_manifest(media_type: &str, config: (&str, usize), layers: &[(&str, usize)]) -> Bytes {
    let docker = media_type == DOCKER_MANIFEST_V2;
    let layer_type = if docker {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    } else {
        OCI_LAYER
    };
    let config_type = if docker {
        "application/vnd.docker.container.image.v1+json"
    } else {
        OCI_CONFIG
    };
    let layers: Vec<_> = layers
        .iter()
        .map(|(d, s)| serde_json::json!({"mediaType": layer_type, "digest": d, "size": s}))
        .collect();
    Bytes::from(
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": config_type, "digest": config.0, "size": config.1},
            "layers": layers,
        })
        .to_string(),
    )
}

/// An OCI image manifest naming the blobs `config` and `layers`.
pub fn oci_manifest(config: &[u8], layers: &[&[u8]]) -> Bytes {
    let layers: Vec<(String, usize)> = layers.iter().map(|l| (sha256(l), l.len())).collect();
    let layers: Vec<(&str, usize)> = layers.iter().map(|(d, n)| (d.as_str(), *n)).collect();
    image_manifest(OCI_MANIFEST, (&sha256(config), config.len()), &layers)
}

/// An OCI index of image `manifests`, each for `linux/<architecture>`.
pub fn oci_index(manifests: &[(&[u8], &str)]) -> Bytes {
    let entries: Vec<_> = manifests
        .iter()
        .map(|(m, arch)| {
            serde_json::json!({
                "mediaType": OCI_MANIFEST, "digest": sha256(m), "size": m.len(),
                "platform": {"architecture": arch, "os": "linux"}
            })
        })
        .collect();
    Bytes::from(
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": entries,
        })
        .to_string(),
    )
}

/// The credential the repositories under `team/` accept once
/// [`Registry::guard_team`] guards them (Basic).
pub const TEAM_CRED: &str = "Basic dGVhbTp0ZWFtLXB3";

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
    /// Extra response headers (name, value) on GET and HEAD answers, content
    /// or status alike (`ratelimit-remaining`, say).
    pub headers: Vec<(String, String)>,
}

/// `fault`'s extra headers added to `r`.
fn with_fault_headers(mut r: Response<RespBody>, fault: &Fault) -> Response<RespBody> {
    for (k, v) in &fault.headers {
        r.headers_mut().append(
            hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    r
}

/// One request as the registry saw it.
#[derive(Debug, Clone)]
pub struct Req {
    /// The request method.
    pub method: Method,
    /// The path without the query.
    pub path: String,
    /// The query, if any.
    pub query: Option<String>,
    /// The request headers.
    pub headers: HeaderMap,
    /// The TLS SNI the connection came with.
    pub sni: Option<String>,
}

impl Req {
    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        header_text(&self.headers, name)
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
    /// The status.
    pub status: u16,
    /// The response headers (name, value).
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
type Hook = Arc<dyn Fn(&Req) -> Option<Answer> + Send + Sync>;

#[derive(Default)]
struct State {
    resources: HashMap<String, Resource>,
    faults: HashMap<String, Fault>,
    seen: Vec<Req>,
    hook: Option<Hook>,
}

/// The fake registry. Stops serving when dropped (or on [`Registry::stop`]).
pub struct Registry {
    /// Where it listens.
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
        let (acceptor, _) = ca.acceptor(names, &[b"h2", b"http/1.1"]);
        Registry::serve(listener, Accept::Tls(acceptor), None)
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
        let (acceptor, _) = ca.acceptor(names, &[b"h2", b"http/1.1"]);
        let twin = Registry {
            addr: listener.local_addr().unwrap(),
            state: Arc::default(),
            gate: watch::channel(false).0,
            task: Mutex::new(None),
        };
        let plain = (twin.state.clone(), twin.gate.subscribe());
        let tls = Registry::serve(listener, Accept::TlsOrPlain(acceptor), Some(plain));
        (tls, twin)
    }

    /// Starts a plain-http registry on `bind` (`127.0.0.12:0`, say: an
    /// internal service), with its own content, knobs and record.
    pub async fn start_plain_on(bind: &str) -> Registry {
        Registry::serve(TcpListener::bind(bind).await.unwrap(), Accept::Plain, None)
    }

    /// Serves `listener` as `accept` says; with a `twin` (state and gate),
    /// plain-HTTP connections go to the twin.
    fn serve(
        listener: TcpListener,
        accept: Accept,
        twin: Option<(Arc<Mutex<State>>, watch::Receiver<bool>)>,
    ) -> Registry {
        let addr = listener.local_addr().unwrap();
        let state: Arc<Mutex<State>> = Arc::default();
        let (gate, gate_rx) = watch::channel(false);
        let own = (state.clone(), gate_rx);
        let task = serve(listener, accept, move |conn, req| {
            let (st, gate_rx) = match &twin {
                Some(twin) if !conn.tls => twin.clone(),
                _ => own.clone(),
            };
            handle(st, gate_rx, conn.sni.clone(), req)
        });
        Registry {
            addr,
            state,
            gate,
            task: Mutex::new(Some(task)),
        }
    }

    /// The port it listens on.
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
            blob_path(repo, &digest),
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
            .insert(manifest_path(repo, &digest), res.clone());
        if let Some(tag) = tag {
            st.resources.insert(manifest_path(repo, tag), res);
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

    /// Sets the knobs for `path`.
    pub fn set_fault(&self, path: &str, fault: Fault) {
        self.lock().faults.insert(path.into(), fault);
    }

    /// Turns every knob for `path` off.
    pub fn clear_fault(&self, path: &str) {
        self.lock().faults.remove(path);
    }

    /// Lets `hook` see every request first and answer it (Some) or leave it
    /// to the registry's content and knobs (None).
    pub fn set_hook(&self, hook: impl Fn(&Req) -> Option<Answer> + Send + Sync + 'static) {
        self.lock().hook = Some(Arc::new(hook));
    }

    /// Guards the repositories under `team/`: 401 with a Basic challenge
    /// unless the request carries [`TEAM_CRED`].
    pub fn guard_team(&self) {
        self.set_hook(|req| {
            let guarded = req.path.starts_with("/v2/team/");
            (guarded && req.header("authorization").as_deref() != Some(TEAM_CRED)).then(|| {
                Answer::error(
                    401,
                    &req.path,
                    vec![("www-authenticate".into(), "Basic realm=\"team\"".into())],
                )
            })
        });
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

/// An answer with no content: its status, an error body for GET, and for
/// HEAD the Content-Length that body would have.
fn status_only(method: &Method, status: u16, path: &str) -> Response<RespBody> {
    let body = error_json(status_code_name(status, path));
    let len = body.len();
    let mut r = Response::new(if *method == Method::HEAD {
        full(Bytes::new())
    } else {
        full(body)
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
        full(Bytes::new())
    } else {
        full(answer.body)
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
) -> Response<RespBody> {
    let (parts, _body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let record = Req {
        method: parts.method.clone(),
        path: path.clone(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers.clone(),
        sni,
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
        return hooked(&parts.method, answer);
    }
    let method = parts.method;
    if method != Method::GET && method != Method::HEAD {
        return status_only(&method, 405, &path);
    }
    if let Some((status, location)) = &fault.redirect {
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::from_u16(*status).unwrap();
        r.headers_mut()
            .insert("location", HeaderValue::from_str(location).unwrap());
        return r;
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
        return with_fault_headers(status_only(&method, status, &path), &fault);
    }
    let Some(res) = resource else {
        return status_only(&method, 404, &path);
    };
    if method == Method::GET {
        if let Some(d) = fault.head_delay {
            tokio::time::sleep(d).await;
        }
    }

    let len = res.body.len();
    let body = if method == Method::HEAD {
        full(Bytes::new())
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
    with_fault_headers(r, &fault)
}
