//! The shared tier: one S3-compatible bucket behind the disk caches of many
//! nodes (`shared_store = "s3://BUCKET/PREFIX"`), through the `object_store`
//! crate.
//!
//! The bucket holds content only, named by digest:
//! `PREFIX/blobs/sha256/<hex>`, the same bytes as a local `blobs/` file.
//!
//! - **Write behind.** A blob reaches the bucket only from a local entry
//!   whose digest matched, after it was committed, as one multipart upload
//!   that is completed only once the file, hashed again on its way out, still
//!   matched ([`SharedStore::upload`]); an upload that fails or does not
//!   match is aborted, so no node ever reads a partial or unverified object.
//! - **Read through.** A node that misses locally streams the object
//!   ([`SharedStore::open`]) into a local download, which verifies it like an
//!   upstream body before its last byte reaches a client. An object that does
//!   not match is deleted ([`SharedStore::discard`]) and the blob fetched
//!   from the registry again.
//! - **Bytes, not trust.** Nothing here decides who may see what:
//!   [`crate::serve`] asks the registry for the client's repository before
//!   it serves anything read from the bucket.
//! - **Degraded, not down.** A failed request marks the tier down (logged
//!   once, `regcache_shared_up` 0) and the caller goes on without it; the next
//!   request that succeeds marks it up again.
//!
//! - **Bounded.** S3 keeps no access time, so a node records a use of a
//!   digest (read from the tier, or served from its own cache) as an empty
//!   marker object `PREFIX/used/sha256/<hex>`, at most once a day per digest
//!   ([`SharedStore::touch`]); `regcache shared gc` ([`gc`]) deletes what no
//!   node used for a while.
//!
//! Credentials, region and endpoint come from the environment as for every
//! S3 client (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL`); plain `http` only to a loopback endpoint or with
//! `AWS_ALLOW_HTTP=true`. Errors name the store as `s3://BUCKET/PREFIX`, never
//! with a credential.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt as _;
use http_body_util::StreamBody;
use hyper::body::Frame;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as StorePath;
use object_store::{
    Attribute, Attributes, ClientOptions, ObjectStore, ObjectStoreExt as _, PutMode, PutOptions,
    PutPayload, PutResult, RetryConfig, UpdateVersion, WriteMultipart,
};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;
use tokio::sync::Semaphore;

use crate::registry::digest::Digest;

pub mod gc;

/// Uploads at a time: each holds up to two parts in memory.
const MAX_UPLOADS: usize = 2;

/// The part size of an upload (S3's smallest part but the last is 5 MiB).
const PART_BYTES: usize = 8 * 1024 * 1024;

/// How much of a local file is read at a time for an upload.
const READ_BYTES: usize = 1024 * 1024;

/// How long one request to the store may take to answer (a part of an
/// upload included), and how long a download from it may stall.
const OP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connection to the store may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How many uploads the store did not take are remembered for a retry.
const MAX_PENDING: usize = 4096;

/// How many distrusted digests are remembered (then forgotten at once).
const MAX_DISTRUSTED: usize = 1024;

/// How often a node records one use of a digest (an upload makes the
/// object itself fresh). `regcache shared gc --unused-for` must be well
/// over this.
pub const TOUCH_EVERY: Duration = Duration::from_secs(24 * 3600);

/// How many digests' last touch are remembered (then forgotten at once).
const MAX_TOUCHED: usize = 100_000;

/// After a failure, how long reads skip the tier before trying it again
/// (uploads, in the background, always try).
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// The shared store could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SharedStoreError {
    /// The S3 client could not be built from the URL and the environment.
    #[error("shared_store {store}: {source}")]
    Setup {
        /// The store, as `s3://BUCKET/PREFIX`.
        store: String,
        /// What object_store said.
        source: object_store::Error,
    },
    /// The endpoint is plain http on an address that is not loopback.
    #[error(
        "shared_store {store}: the endpoint {endpoint} is plain http, which would send the \
         store's credentials in the clear; use https, or set AWS_ALLOW_HTTP=true"
    )]
    PlainHttp {
        /// The store, as `s3://BUCKET/PREFIX`.
        store: String,
        /// The endpoint URL.
        endpoint: String,
    },
}

/// An object of the shared tier, ready to stream.
pub struct SharedObject {
    /// Its length in bytes, as the store reports it.
    pub size: u64,
    /// The `Content-Type` it was stored with (manifests carry theirs).
    pub content_type: Option<String>,
    /// Its bytes.
    pub body: SharedBody,
}

/// The body of a [`SharedObject`]: its bytes as HTTP body frames.
pub type SharedBody =
    StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, object_store::Error>>>;

/// The shared tier. Cheap to share (`Arc`).
pub struct SharedStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// `s3://BUCKET/PREFIX`, for logs and the `store` label.
    name: String,
    up: AtomicBool,
    /// When the last failure was, while the tier is down.
    down_since: Mutex<Option<Instant>>,
    /// Digests whose object did not match, not read again until this node
    /// uploads them (the delete may fail or race a retry).
    distrusted: Mutex<HashSet<Digest>>,
    uploads: Semaphore,
    /// Objects read from the tier, and uploaded to it, since start.
    reads: AtomicU64,
    written: AtomicU64,
    /// Uploads the store did not take, by digest: the local file.
    pending: Mutex<HashMap<Digest, PathBuf>>,
    /// This node's name in leases.
    node: String,
    /// This node's peer endpoint (`host:port`), named in its leases.
    peer: Option<String>,
    /// Set when leases are not used.
    leases_off: AtomicBool,
    /// Leases this node holds now.
    leases_held: Arc<AtomicU64>,
    /// When this node last wrote the use marker of a digest.
    touched: Arc<Mutex<HashMap<Digest, Instant>>>,
}

impl SharedStore {
    /// The store of `url` (`s3://BUCKET[/PREFIX]`, checked by the
    /// configuration), with credentials, region and endpoint from the
    /// environment.
    pub fn from_url(url: &str) -> Result<Self, SharedStoreError> {
        // reqwest's rustls needs a process-wide provider: ring, as
        // everywhere else in regcache. Already installed is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rest = url.strip_prefix("s3://").unwrap_or(url);
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // No overall timeout (a large blob takes as long as it takes): each
        // request's answer and each stall of a download are timed here.
        let client = ClientOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout_disabled();
        let retry = RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(10),
            ..RetryConfig::default()
        };
        let mut builder = AmazonS3Builder::from_env()
            .with_client_options(client)
            .with_retry(retry)
            .with_bucket_name(bucket)
            .with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch);
        if let Some(endpoint) = builder.get_config_value(&AmazonS3ConfigKey::Endpoint) {
            let allowed = std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true");
            if endpoint.starts_with("http://") && !allowed {
                if !is_loopback_url(&endpoint) {
                    return Err(SharedStoreError::PlainHttp {
                        store: url.to_string(),
                        endpoint,
                    });
                }
                builder = builder.with_allow_http(true);
            }
        }
        let store = builder.build().map_err(|source| SharedStoreError::Setup {
            store: url.to_string(),
            source,
        })?;
        Ok(Self::with_store(Arc::new(store), url, prefix))
    }

    /// A shared tier on `store` (any object store: tests use an in-memory
    /// one), named `name`, its objects under `prefix`.
    pub fn with_store(store: Arc<dyn ObjectStore>, name: &str, prefix: &str) -> Self {
        let prefix = prefix.trim_matches('/');
        let shared = Self {
            store,
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            name: name.to_string(),
            up: AtomicBool::new(true),
            down_since: Mutex::new(None),
            distrusted: Mutex::default(),
            uploads: Semaphore::new(MAX_UPLOADS),
            reads: AtomicU64::new(0),
            written: AtomicU64::new(0),
            pending: Mutex::default(),
            node: node_name(),
            peer: None,
            leases_off: AtomicBool::new(false),
            leases_held: Arc::default(),
            touched: Arc::default(),
        };
        crate::metrics::get().shared_up(&shared.name, true);
        shared
    }

    /// Names `addr` (`host:port`, this node's peer endpoint) in the
    /// leases this node creates, so that the other nodes stream a fetch
    /// from it while it arrives.
    pub fn advertise_peer(&mut self, addr: &str) {
        self.peer = Some(addr.to_string());
    }

    /// The store, as `s3://BUCKET/PREFIX`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the last request to the store succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Objects read from the tier since start (each a local miss it
    /// answered).
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The cluster's fetches this node holds the lease of now.
    pub fn leases_held(&self) -> u64 {
        self.leases_held.load(Ordering::Relaxed)
    }

    /// Objects this node wrote to the tier since start.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// The object key of `digest`.
    pub fn key(&self, digest: &Digest) -> StorePath {
        StorePath::from(format!(
            "{}blobs/{}/{}",
            self.prefix,
            digest.algorithm().as_str(),
            digest.hex()
        ))
    }

    /// The use marker key of `digest`: an empty object whose
    /// LastModified is the last use any node recorded.
    pub fn marker_key(&self, digest: &Digest) -> StorePath {
        StorePath::from(format!(
            "{}used/{}/{}",
            self.prefix,
            digest.algorithm().as_str(),
            digest.hex()
        ))
    }

    /// Records that this node used `digest` (read it from the tier, or
    /// served it from its own cache): writes its marker in the background,
    /// unless this node did so in the last [`TOUCH_EVERY`] or the tier is
    /// resting after a failure. A failed write is counted
    /// (`regcache_shared_requests_total{op="touch"}`) and forgotten, so the
    /// next use tries again.
    pub fn touch(&self, digest: &Digest) {
        if self.resting() {
            return;
        }
        {
            let mut touched = lock(&self.touched);
            if touched
                .get(digest)
                .is_some_and(|at| at.elapsed() < TOUCH_EVERY)
            {
                return;
            }
            if touched.len() >= MAX_TOUCHED {
                touched.clear();
            }
            touched.insert(digest.clone(), Instant::now());
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, key) = (self.store.clone(), self.marker_key(digest));
        let (touched, digest) = (self.touched.clone(), digest.clone());
        runtime.spawn(async move {
            let result = timed(store.put(&key, PutPayload::new())).await;
            let label = if result.is_ok() { "ok" } else { "error" };
            crate::metrics::get().shared_request("touch", label);
            if result.is_err() {
                lock(&touched).remove(&digest);
            }
        });
    }

    /// Records a request's outcome: metrics, and the up/down state (a
    /// change of which is logged once).
    fn outcome<T>(&self, op: &'static str, result: &object_store::Result<T>) -> Result<(), ()> {
        let (label, ok) = match result {
            Ok(_) => ("ok", true),
            Err(object_store::Error::NotFound { .. }) => ("missing", true),
            Err(_) => ("error", false),
        };
        crate::metrics::get().shared_request(op, label);
        *self.down_since.lock().unwrap_or_else(|p| p.into_inner()) = (!ok).then(Instant::now);
        let was = self.up.swap(ok, Ordering::Relaxed);
        if was != ok {
            crate::metrics::get().shared_up(&self.name, ok);
            match result {
                Err(e) if !ok => {
                    tracing::warn!(store = %self.name, error = %e, "shared store unreachable: going on without it")
                }
                _ => tracing::info!(store = %self.name, "shared store answers again"),
            }
        }
        if ok {
            Ok(())
        } else {
            Err(())
        }
    }

    /// Whether reads should skip the tier: it failed less than
    /// [`RETRY_AFTER`] ago.
    fn resting(&self) -> bool {
        let since = *lock(&self.down_since);
        since.is_some_and(|t| t.elapsed() < RETRY_AFTER)
    }

    /// The object of `digest`, if the store has it and answers. A download
    /// that stalls for [`OP_TIMEOUT`] ends with an error.
    pub async fn open(&self, digest: &Digest) -> Option<SharedObject> {
        if self.resting() || lock(&self.distrusted).contains(digest) {
            return None;
        }
        let result = timed(self.store.get(&self.key(digest))).await;
        self.outcome("get", &result).ok()?;
        let got = result.ok()?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        let size = got.meta.size;
        let content_type = got
            .attributes
            .get(&Attribute::ContentType)
            .map(|v| v.as_ref().to_string());
        let stream = stalling(got.into_stream())
            .map(|chunk| {
                chunk.map(|bytes| {
                    crate::metrics::get().shared_bytes("in", bytes.len() as u64);
                    Frame::data(bytes)
                })
            })
            .boxed();
        Some(SharedObject {
            size,
            content_type,
            body: StreamBody::new(stream),
        })
    }

    /// Whether the store holds an object for `digest` (of any size); None
    /// when it does not answer.
    pub async fn holds(&self, digest: &Digest) -> Option<bool> {
        let result = timed(self.store.head(&self.key(digest))).await;
        self.outcome("head", &result).ok()?;
        Some(result.is_ok())
    }

    /// Deletes the object of `digest` (its bytes did not match); until this
    /// node uploads it again, it is not read from the tier.
    pub async fn discard(&self, digest: &Digest) {
        {
            let mut distrusted = lock(&self.distrusted);
            if distrusted.len() >= MAX_DISTRUSTED {
                distrusted.clear();
            }
            distrusted.insert(digest.clone());
        }
        let result = timed(self.store.delete(&self.key(digest))).await;
        if self.outcome("delete", &result).is_ok() {
            tracing::warn!(store = %self.name, %digest, "shared object did not match its digest: deleted");
        }
    }

    /// Stores `bytes`, which matched `digest`, as one object with
    /// `content_type` (a manifest: small enough for one request), unless
    /// the store already holds it. Returns whether an object was written.
    pub async fn put_bytes(
        &self,
        digest: &Digest,
        bytes: Bytes,
        content_type: &str,
    ) -> Result<bool, UploadError> {
        if !digest.matches(&bytes) {
            return Err(UploadError::Mismatch);
        }
        if self.holds(digest).await.ok_or(UploadError::Unreachable)? {
            return Ok(false);
        }
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::ContentType, content_type.to_string().into());
        let options = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        let len = bytes.len() as u64;
        let result = timed(self.store.put_opts(
            &self.key(digest),
            PutPayload::from(bytes),
            options,
        ))
        .await;
        self.outcome("put", &result)
            .map_err(|()| UploadError::Unreachable)?;
        lock(&self.distrusted).remove(digest);
        self.written.fetch_add(1, Ordering::Relaxed);
        crate::metrics::get().shared_bytes("out", len);
        Ok(true)
    }

    /// Uploads the local file `path`, the committed entry of `digest`, as
    /// one object, unless the store already holds it. The file is hashed
    /// on its way out and the upload completed only if it still matched.
    /// Returns whether an object was written.
    /// An upload the store did not take (it was down) is tried again
    /// later ([`SharedStore::retry_uploads`]).
    pub async fn upload(&self, digest: &Digest, path: &Path) -> Result<bool, UploadError> {
        let result = self.try_upload(digest, path).await;
        if matches!(result, Err(UploadError::Unreachable)) {
            let mut pending = lock(&self.pending);
            if pending.len() < MAX_PENDING {
                pending.insert(digest.clone(), path.to_path_buf());
            }
        }
        result
    }

    /// Tries the uploads the store did not take again, every
    /// [`RETRY_AFTER`] while any wait, until regcache stops. The files are
    /// the cache's, named by digest: one evicted meanwhile is skipped, and
    /// each is hashed again on its way out.
    pub async fn retry_uploads(self: Arc<Self>) {
        loop {
            tokio::time::sleep(RETRY_AFTER).await;
            if self.resting() || lock(&self.pending).is_empty() {
                continue;
            }
            let pending = std::mem::take(&mut *lock(&self.pending));
            let mut left = pending.into_iter();
            for (digest, path) in left.by_ref() {
                match self.try_upload(&digest, &path).await {
                    Err(UploadError::Unreachable) => {
                        lock(&self.pending).insert(digest, path);
                        break;
                    }
                    Ok(true) => {
                        tracing::info!(%digest, store = %self.name, "uploaded to the shared tier after it came back")
                    }
                    _ => {}
                }
            }
            lock(&self.pending).extend(left);
        }
    }

    async fn try_upload(&self, digest: &Digest, path: &Path) -> Result<bool, UploadError> {
        let _turn = self
            .uploads
            .acquire()
            .await
            .map_err(|_| UploadError::Closed)?;
        if self.holds(digest).await.ok_or(UploadError::Unreachable)? {
            return Ok(false);
        }
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(UploadError::Read)?;
        let key = self.key(digest);
        let result = timed(self.store.put_multipart(&key)).await;
        self.outcome("put", &result)
            .map_err(|()| UploadError::Unreachable)?;
        let Ok(upload) = result else {
            return Err(UploadError::Unreachable);
        };
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; READ_BYTES];
        let mut sent = 0u64;
        loop {
            let n = match file.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(UploadError::Read(e));
                }
            };
            hasher.update(&buf[..n]);
            writer.write(&buf[..n]);
            sent += n as u64;
            if let Err(e) = timed(writer.wait_for_capacity(1)).await {
                let _ = self.outcome::<()>("put", &Err(e));
                return Err(UploadError::Unreachable);
            }
        }
        if hex(&hasher.finalize()) != digest.hex() {
            let _ = writer.abort().await;
            return Err(UploadError::Mismatch);
        }
        let done = timed(writer.finish()).await;
        self.outcome("put", &done)
            .map_err(|()| UploadError::Unreachable)?;
        lock(&self.distrusted).remove(digest);
        self.written.fetch_add(1, Ordering::Relaxed);
        crate::metrics::get().shared_bytes("out", sent);
        Ok(true)
    }
}

/// How long a lease lasts unless renewed; renewed every third of it.
pub const LEASE_TTL: Duration = Duration::from_secs(15);

/// The longest a client waits for another node's fetch before this node
/// fetches it itself.
pub const MAX_CLUSTER_WAIT: Duration = Duration::from_secs(300);

/// How often a node waiting for another node's fetch looks again.
pub const LEASE_POLL: Duration = Duration::from_millis(200);

/// The outcome of [`SharedStore::claim`].
pub enum Claim {
    /// This node fetches the digest for the cluster; drop the lease (after
    /// the upload) to release it.
    Won(Lease),
    /// Another node holds a live lease: wait for the object, or stream it
    /// from that node's peer endpoint (`host:port`) when the lease names
    /// one.
    Held(Option<String>),
    /// The store cannot say (unreachable, or no conditional create): fetch
    /// it without the cluster.
    Unavailable,
}

/// How [`SharedStore::wait_for_fetch`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Waited {
    /// The object is in the tier.
    Present,
    /// The lease went away without the object: claim it again.
    Released,
    /// The store stopped answering, or the wait was too long: fetch it
    /// without the cluster.
    GaveUp,
}

/// This node's claim to fetch one digest for the cluster: an object
/// created with a conditional write (`If-None-Match: *`) holding the node
/// and an expiry, renewed while held, deleted when dropped.
pub struct Lease {
    store: Arc<dyn ObjectStore>,
    key: StorePath,
    renew: tokio::task::JoinHandle<()>,
    held: Arc<AtomicU64>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Ordering::Relaxed);
        self.renew.abort();
        let (store, key) = (self.store.clone(), self.key.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = timed(store.delete(&key)).await;
            });
        }
    }
}

/// What [`SharedStore::take_over`] found.
enum TakeOver {
    /// The lease had expired: this node holds it now.
    Won(PutResult),
    /// It is live (or another node took it over first), naming that
    /// node's peer endpoint if it has one.
    Live(Option<String>),
    /// The store does not answer.
    Unanswered,
}

/// What a lease object holds.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct LeaseBody {
    /// Which node holds it (host name and process).
    node: String,
    /// Its peer endpoint (`host:port`), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
    /// Until when, in Unix milliseconds.
    expires_unix_ms: u64,
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// This node's name in leases: host name and process id (read once, at
/// start).
fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}:{}", host.trim(), std::process::id())
}

/// A fresh lease payload each time it is called (a renewal extends the
/// expiry).
fn lease_payload_of(node: String, peer: Option<String>) -> impl Fn() -> PutPayload {
    move || lease_payload(&node, peer.as_deref())
}

fn lease_payload(node: &str, peer: Option<&str>) -> PutPayload {
    let body = LeaseBody {
        node: node.to_string(),
        peer: peer.map(str::to_string),
        expires_unix_ms: now_unix_ms() + LEASE_TTL.as_millis() as u64,
    };
    PutPayload::from(serde_json::to_vec(&body).unwrap_or_default())
}

impl SharedStore {
    /// The lease key of `digest`.
    fn lease_key(&self, digest: &Digest) -> StorePath {
        StorePath::from(format!(
            "{}leases/{}/{}",
            self.prefix,
            digest.algorithm().as_str(),
            digest.hex()
        ))
    }

    /// Claims the fetch of `digest` for the cluster: creates its lease, or
    /// takes over one that expired (a conditional update on the ETag read,
    /// so that of several nodes one wins).
    pub async fn claim(&self, digest: &Digest) -> Claim {
        // A store that just failed is not asked again for a while.
        if self.leases_off.load(Ordering::Relaxed) || self.resting() {
            return Claim::Unavailable;
        }
        let key = self.lease_key(digest);
        let create = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let created = timed(self.store.put_opts(
            &key,
            lease_payload(&self.node, self.peer.as_deref()),
            create,
        ))
        .await;
        let version = match created {
            Ok(put) => Some(put),
            Err(object_store::Error::AlreadyExists { .. }) => None,
            Err(e) => {
                let _ = self.outcome::<()>("put", &Err(e));
                return Claim::Unavailable;
            }
        };
        let put = match version {
            Some(put) => put,
            None => match self.take_over(&key).await {
                TakeOver::Won(put) => put,
                TakeOver::Live(peer) => return Claim::Held(peer),
                TakeOver::Unanswered => return Claim::Unavailable,
            },
        };
        crate::metrics::get().lease("won");
        let renew = tokio::spawn(renew(
            self.store.clone(),
            key.clone(),
            put,
            lease_payload_of(self.node.clone(), self.peer.clone()),
        ));
        self.leases_held.fetch_add(1, Ordering::Relaxed);
        Claim::Won(Lease {
            store: self.store.clone(),
            key,
            renew,
            held: self.leases_held.clone(),
        })
    }

    /// The lease at `key` exists: take it over if it expired.
    async fn take_over(&self, key: &StorePath) -> TakeOver {
        let got = timed(self.store.get(key)).await;
        let got = match got {
            Ok(got) => got,
            // Released meanwhile: live for whoever claims it next.
            Err(object_store::Error::NotFound { .. }) => return TakeOver::Live(None),
            Err(e) => {
                let _ = self.outcome::<()>("get", &Err(e));
                return TakeOver::Unanswered;
            }
        };
        let e_tag = got.meta.e_tag.clone();
        let version = got.meta.version.clone();
        let Ok(bytes) = timed(got.bytes()).await else {
            return TakeOver::Unanswered;
        };
        let lease = serde_json::from_slice::<LeaseBody>(&bytes).ok();
        if let Some(lease) = lease.filter(|l| l.expires_unix_ms >= now_unix_ms()) {
            crate::metrics::get().lease("held");
            return TakeOver::Live(lease.peer);
        }
        let update = PutOptions {
            mode: PutMode::Update(UpdateVersion { e_tag, version }),
            ..PutOptions::default()
        };
        match timed(self.store.put_opts(
            key,
            lease_payload(&self.node, self.peer.as_deref()),
            update,
        ))
        .await
        {
            Ok(put) => {
                crate::metrics::get().lease("taken_over");
                tracing::info!(store = %self.name, key = %key, "took over an expired lease");
                TakeOver::Won(put)
            }
            Err(_) => TakeOver::Live(None),
        }
    }

    /// Waits while another node's lease of `digest` is live, until the
    /// object is in the tier ([`Waited::Present`]), the lease is gone or
    /// expired without it ([`Waited::Released`]: claim again), the store
    /// stops answering, or `limit` has passed since `started`.
    pub async fn wait_for_fetch(
        &self,
        digest: &Digest,
        started: Instant,
        limit: Duration,
    ) -> Waited {
        loop {
            if started.elapsed() > limit {
                return Waited::GaveUp;
            }
            tokio::time::sleep(LEASE_POLL).await;
            if self.holds(digest).await == Some(true) {
                return Waited::Present;
            }
            match self.lease_live(digest).await {
                Some(true) => continue,
                Some(false) => return Waited::Released,
                None => return Waited::GaveUp,
            }
        }
    }

    /// Whether a live lease for `digest` exists; None when the store does
    /// not answer.
    pub async fn lease_live(&self, digest: &Digest) -> Option<bool> {
        let got = timed(self.store.get(&self.lease_key(digest))).await;
        let got = match got {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Some(false),
            Err(_) => return None,
        };
        let bytes = timed(got.bytes()).await.ok()?;
        Some(
            serde_json::from_slice::<LeaseBody>(&bytes)
                .is_ok_and(|lease| lease.expires_unix_ms >= now_unix_ms()),
        )
    }
}

/// [`SharedStore::touch`] on the tier, if there is one.
pub fn touch(shared: Option<&SharedStore>, digest: &Digest) {
    if let Some(shared) = shared {
        shared.touch(digest);
    }
}

/// What the start-up probe found about conditional writes.
#[derive(Debug)]
pub enum CreateProbe {
    /// A second create of one key was refused: leases work.
    Enforced,
    /// The store overwrote the key (it ignores `If-None-Match`: Garage
    /// 2.5 does): leases would let several nodes fetch at once.
    Ignored,
    /// The store did not answer; the tier is used when it does.
    Unreachable(String),
}

impl SharedStore {
    /// Creates one probe object twice with `If-None-Match: *`, then
    /// deletes it: whether the store enforces conditional create, which
    /// the cluster-wide lease relies on.
    pub async fn probe_conditional_create(&self) -> CreateProbe {
        let key = StorePath::from(format!(
            "{}leases/probe-{}-{}",
            self.prefix,
            self.node.replace(':', "-"),
            now_unix_ms()
        ));
        let create = || PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let payload = || PutPayload::from_static(b"probe");
        if let Err(e) = timed(self.store.put_opts(&key, payload(), create())).await {
            return CreateProbe::Unreachable(e.to_string());
        }
        let second = timed(self.store.put_opts(&key, payload(), create())).await;
        let _ = timed(self.store.delete(&key)).await;
        match second {
            Err(object_store::Error::AlreadyExists { .. }) => CreateProbe::Enforced,
            Ok(_) => CreateProbe::Ignored,
            Err(e) => CreateProbe::Unreachable(e.to_string()),
        }
    }

    /// Stops claiming leases: each node fetches on its own
    /// (`shared_single_flight = false`, or a store without conditional
    /// create).
    pub fn without_leases(&self) {
        self.leases_off.store(true, Ordering::Relaxed);
    }
}

/// Renews a lease every third of [`LEASE_TTL`] until aborted, or until the
/// store refuses (another node took it over: this node's fetch goes on,
/// and its upload is as good as anyone's).
async fn renew(
    store: Arc<dyn ObjectStore>,
    key: StorePath,
    mut put: PutResult,
    payload: impl Fn() -> PutPayload,
) {
    loop {
        tokio::time::sleep(LEASE_TTL / 3).await;
        let update = PutOptions {
            mode: PutMode::Update(UpdateVersion {
                e_tag: put.e_tag.clone(),
                version: put.version.clone(),
            }),
            ..PutOptions::default()
        };
        match timed(store.put_opts(&key, payload(), update)).await {
            Ok(next) => put = next,
            Err(e) => {
                crate::metrics::get().lease("lost");
                tracing::warn!(key = %key, error = %e, "lease renewal refused or failed");
                return;
            }
        }
    }
}

/// Why an upload to the shared tier did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The store did not answer, or refused (logged by the tier).
    #[error("the shared store did not take it")]
    Unreachable,
    /// The local file could not be read.
    #[error("cannot read the local file: {0}")]
    Read(std::io::Error),
    /// The local file no longer matches its digest.
    #[error("the local file no longer matches its digest")]
    Mismatch,
    /// regcache is shutting down.
    #[error("shutting down")]
    Closed,
}

/// Locks `mutex`, also after a panic elsewhere.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// `request`, or a timeout error after [`OP_TIMEOUT`].
async fn timed<T>(
    request: impl std::future::Future<Output = object_store::Result<T>>,
) -> object_store::Result<T> {
    tokio::time::timeout(OP_TIMEOUT, request)
        .await
        .unwrap_or_else(|_| Err(timeout_error()))
}

fn timeout_error() -> object_store::Error {
    object_store::Error::Generic {
        store: "shared_store",
        source: format!("no answer within {} s", OP_TIMEOUT.as_secs()).into(),
    }
}

/// `stream`, ending with a timeout error when no chunk comes for
/// [`OP_TIMEOUT`].
fn stalling(
    stream: BoxStream<'static, object_store::Result<Bytes>>,
) -> BoxStream<'static, object_store::Result<Bytes>> {
    futures_util::stream::unfold(Some(stream), |state| async move {
        let mut stream = state?;
        match tokio::time::timeout(OP_TIMEOUT, stream.next()).await {
            Ok(Some(item)) => Some((item, Some(stream))),
            Ok(None) => None,
            Err(_) => Some((Err(timeout_error()), None)),
        }
    })
    .boxed()
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether an `http://host[:port]/…` URL names a loopback host.
fn is_loopback_url(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn digest_of(data: &[u8]) -> Digest {
        Digest::of(data)
    }

    #[tokio::test]
    async fn an_upload_is_read_back_byte_for_byte_and_made_once() {
        let store = Arc::new(InMemory::new());
        let shared = SharedStore::with_store(store.clone(), "s3://test/p", "p");
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3 * PART_BYTES as u32 / 2).map(|i| i as u8).collect();
        let digest = digest_of(&data);
        let path = dir.path().join("blob");
        std::fs::write(&path, &data).unwrap();
        assert_eq!(shared.holds(&digest).await, Some(false));
        assert!(shared.open(&digest).await.is_none());
        assert!(shared.upload(&digest, &path).await.unwrap());
        assert!(
            !shared.upload(&digest, &path).await.unwrap(),
            "already there"
        );
        let key = format!("p/blobs/sha256/{}", digest.hex());
        assert_eq!(shared.key(&digest).as_ref(), key);
        let object = shared.open(&digest).await.unwrap();
        assert_eq!(object.size, data.len() as u64);
        let got = http_body_util::BodyExt::collect(object.body)
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(got.as_ref(), data.as_slice());
        shared.discard(&digest).await;
        assert_eq!(shared.holds(&digest).await, Some(false));
    }

    #[tokio::test]
    async fn a_manifest_keeps_its_media_type() {
        let shared = SharedStore::with_store(Arc::new(InMemory::new()), "s3://test", "");
        let manifest = Bytes::from_static(b"{\"schemaVersion\":2}");
        let digest = digest_of(&manifest);
        let media = "application/vnd.oci.image.manifest.v1+json";
        assert!(shared
            .put_bytes(&digest, manifest.clone(), media)
            .await
            .unwrap());
        assert!(!shared
            .put_bytes(&digest, manifest.clone(), media)
            .await
            .unwrap());
        let object = shared.open(&digest).await.unwrap();
        assert_eq!(object.content_type.as_deref(), Some(media));
        assert!(matches!(
            shared
                .put_bytes(&digest_of(b"other"), manifest, media)
                .await,
            Err(UploadError::Mismatch)
        ));
    }

    #[tokio::test]
    async fn a_file_that_no_longer_matches_is_never_uploaded() {
        let store = Arc::new(InMemory::new());
        let shared = SharedStore::with_store(store, "s3://test", "");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"changed on disk").unwrap();
        let digest = digest_of(b"what was committed");
        assert!(matches!(
            shared.upload(&digest, &path).await,
            Err(UploadError::Mismatch)
        ));
        assert_eq!(shared.holds(&digest).await, Some(false));
        assert_eq!(
            shared.key(&digest).as_ref(),
            format!("blobs/sha256/{}", digest.hex())
        );
    }

    #[tokio::test]
    async fn one_node_wins_the_lease_until_it_is_released_or_expires() {
        let store = Arc::new(InMemory::new());
        let mut a = SharedStore::with_store(store.clone(), "s3://test", "p");
        a.advertise_peer("10.0.0.5:3130");
        let b = SharedStore::with_store(store.clone(), "s3://test", "p");
        let digest = digest_of(b"a cold blob");
        let Claim::Won(lease) = a.claim(&digest).await else {
            panic!("the first claim wins");
        };
        // The holder's peer endpoint, for the others to stream from.
        assert!(
            matches!(b.claim(&digest).await, Claim::Held(Some(peer)) if peer == "10.0.0.5:3130")
        );
        assert_eq!(b.lease_live(&digest).await, Some(true));
        drop(lease);
        // The release is a spawned delete.
        for _ in 0..100 {
            if b.lease_live(&digest).await == Some(false) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let Claim::Won(_lease) = b.claim(&digest).await else {
            panic!("a released lease can be claimed");
        };
        // An expired lease is taken over, by one node only.
        let other = digest_of(b"another blob");
        let expired = serde_json::to_vec(&LeaseBody {
            node: "dead:1".into(),
            peer: None,
            expires_unix_ms: now_unix_ms() - 1,
        })
        .unwrap();
        store
            .put(&a.lease_key(&other), PutPayload::from(expired))
            .await
            .unwrap();
        assert_eq!(a.lease_live(&other).await, Some(false));
        let Claim::Won(_taken) = a.claim(&other).await else {
            panic!("an expired lease is taken over");
        };
        assert!(matches!(b.claim(&other).await, Claim::Held(_)));
    }

    #[tokio::test]
    async fn the_probe_finds_conditional_create_enforced_and_leases_can_be_off() {
        let shared = SharedStore::with_store(Arc::new(InMemory::new()), "s3://test", "");
        assert!(matches!(
            shared.probe_conditional_create().await,
            CreateProbe::Enforced
        ));
        let digest = digest_of(b"x");
        shared.without_leases();
        assert!(matches!(shared.claim(&digest).await, Claim::Unavailable));
    }

    #[tokio::test]
    async fn a_use_writes_the_marker_once_a_day() {
        let store = Arc::new(InMemory::new());
        let shared = SharedStore::with_store(store.clone(), "s3://test/p", "p");
        let digest = digest_of(b"used");
        let key = shared.marker_key(&digest);
        assert_eq!(key.as_ref(), format!("p/used/sha256/{}", digest.hex()));
        shared.touch(&digest);
        let mut first = None;
        for _ in 0..100 {
            if let Ok(meta) = store.head(&key).await {
                first = Some(meta.last_modified);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let first = first.expect("the marker is written");
        tokio::time::sleep(Duration::from_millis(20)).await;
        touch(Some(&shared), &digest);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(store.head(&key).await.unwrap().last_modified, first);
    }

    #[test]
    fn plain_http_is_for_loopback_endpoints() {
        for (url, loopback) in [
            ("http://127.0.0.1:8333", true),
            ("http://127.9.0.1:8333/", true),
            ("http://localhost:9000", true),
            ("http://[::1]:9000", true),
            ("http://minio.internal:9000", false),
            ("http://10.0.0.5:9000", false),
            ("not a url", false),
        ] {
            assert_eq!(is_loopback_url(url), loopback, "{url}");
        }
    }
}
