//! Single-flight downloads: one upstream GET per missing digest, however many
//! clients ask at once, each client streaming from the growing file.
//!
//! The first request for a missing digest becomes the [`Leader`]; it asks
//! upstream and, on a 200, hands the body to [`Leader::start`], which spawns
//! a detached writer task (a client that hangs up does not cancel the
//! download for the others). The writer appends to a temporary file, hashes
//! as it goes and publishes its progress on a watch channel. Everyone,
//! leader's client included, reads the file at its own pace up to what has
//! been written. When the body ends, digest and length are checked: on a
//! match the download is marked verified, so readers may send the last byte
//! at once, and then the file is made durable and renamed into the cache
//! (the entry, not the response, is what must survive a crash); otherwise it
//! is deleted and every reader's response fails instead of completing.
//! Requests that arrive while a verified download is being committed wait
//! for the commit ([`Cache::committed`]), and so do shutdown and `prefetch`
//! ([`Cache::commits_settled`]).
//!
//! Every fill holds a [`super::Reservation`] (admitted by the caller before
//! [`Leader::start`], [`Cache::admit`]) that holds nothing at first: before
//! each batch is written the writer makes it cover the bytes the file will
//! hold ([`Reservation::cover`], a step ahead, so one short lock per step
//! rather than per write), evicting only for bytes that arrived. When the
//! cap cannot hold them the fill fails like any other. The reservation
//! becomes the entry on commit and is released when the fill fails.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use tokio::sync::watch;

use super::{blocking, Cache, CacheError, Reservation};
use crate::http::body::BoxError;
use crate::registry::digest::{Digest, DigestHasher};

/// Bytes gathered before a write to the temporary file.
const WRITE_CHUNK: usize = 256 * 1024;
/// A partial chunk is written if no more bytes arrive for this long.
const WRITE_IDLE: Duration = Duration::from_millis(20);
/// How long the upstream body may stall before the download is abandoned.
const BODY_STALL: Duration = Duration::from_secs(60);

/// Where a download stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// The leader is waiting for upstream's answer.
    Connecting,
    /// Bytes are arriving.
    Streaming,
    /// Verified and committed.
    Done,
    /// Failed; the reason, for logs and client errors.
    Failed(Arc<str>),
    /// The leader gave up before streaming (upstream answered non-200).
    Abandoned,
}

/// Progress of one download.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The phase.
    pub phase: Phase,
    /// Bytes written to the file so far.
    pub written: u64,
    /// The announced length, if upstream sent one.
    pub total: Option<u64>,
    /// Every byte was written and the whole matched the digest and the
    /// announced length: readers may send all of it, whatever the commit
    /// that follows does (set once, never cleared).
    pub verified: bool,
    /// Why the download failed (a `regcache_fill_failures_total` reason:
    /// `digest_mismatch`, `truncated`, …), once it did.
    pub failure: Option<&'static str>,
}

/// One download in flight.
pub struct Fill {
    /// The digest being downloaded.
    pub digest: Digest,
    progress: watch::Sender<Progress>,
    file: OnceLock<Arc<std::fs::File>>,
    /// The (registry, repository) whose upstream answer is being stored.
    origin: OnceLock<(String, String)>,
}

impl Fill {
    /// Subscribes to progress updates.
    pub fn watch(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// The file being written (present once streaming started).
    pub fn file(&self) -> Option<Arc<std::fs::File>> {
        self.file.get().cloned()
    }

    /// Waits until the leader started streaming (true) or gave up (false).
    pub async fn started(&self) -> bool {
        let mut rx = self.watch();
        let started = match rx.wait_for(|p| p.phase != Phase::Connecting).await {
            Ok(p) => p.phase != Phase::Abandoned,
            Err(_) => false,
        };
        started
    }

    /// Whether the bytes matched and the entry is being committed now.
    pub fn committing(&self) -> bool {
        let p = self.progress.borrow();
        p.verified && !matches!(p.phase, Phase::Done | Phase::Failed(_))
    }

    /// Waits until the download ended, committed or failed.
    pub async fn ended(&self) {
        let mut rx = self.watch();
        let _ = rx
            .wait_for(|p| matches!(p.phase, Phase::Done | Phase::Failed(_) | Phase::Abandoned))
            .await;
    }

    /// The (registry, repository) the bytes come from, once the leader set it.
    pub fn origin(&self) -> Option<&(String, String)> {
        self.origin.get()
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        self.progress.send_modify(f);
    }
}

/// One download in flight as [`SingleFlight::progress`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillProgress {
    /// The digest being downloaded (`sha256:…`).
    pub digest: String,
    /// The (registry, repository) it comes from, once known.
    pub origin: Option<(String, String)>,
    /// Bytes written so far.
    pub written: u64,
    /// The announced length, if any.
    pub total: Option<u64>,
    /// `connecting`, `streaming`, `committing`, `done`, `failed` or
    /// `abandoned`.
    pub phase: &'static str,
}

/// The downloads in flight, by digest.
#[derive(Default)]
pub struct SingleFlight {
    fills: Mutex<HashMap<Digest, Arc<Fill>>>,
}

impl SingleFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<Fill>>> {
        self.fills.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of downloads whose bytes are still arriving (one whose bytes
    /// all came and matched, its entry being committed, is not counted).
    pub fn len(&self) -> usize {
        self.lock()
            .values()
            .filter(|f| !f.progress.borrow().verified)
            .count()
    }

    /// Whether no download's bytes are still arriving.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where each download in flight stands (the status page), by digest.
    pub fn progress(&self) -> Vec<FillProgress> {
        let fills: Vec<Arc<Fill>> = self.lock().values().cloned().collect();
        let mut out: Vec<FillProgress> = fills
            .iter()
            .map(|f| {
                let p = f.progress.borrow();
                let phase = match &p.phase {
                    Phase::Connecting => "connecting",
                    Phase::Streaming if p.verified => "committing",
                    Phase::Streaming => "streaming",
                    Phase::Done => "done",
                    Phase::Failed(_) => "failed",
                    Phase::Abandoned => "abandoned",
                };
                FillProgress {
                    digest: f.digest.to_string(),
                    origin: f.origin().cloned(),
                    written: p.written,
                    total: p.total,
                    phase,
                }
            })
            .collect();
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        out
    }

    /// The downloads whose bytes matched and whose entries are being
    /// committed.
    fn committing(&self) -> Vec<Arc<Fill>> {
        self.lock()
            .values()
            .filter(|f| f.committing())
            .cloned()
            .collect()
    }

    /// Whether any download is being committed.
    pub fn any_committing(&self) -> bool {
        self.lock().values().any(|f| f.committing())
    }

    fn get(&self, digest: &Digest) -> Option<Arc<Fill>> {
        self.lock().get(digest).cloned()
    }

    fn remove(&self, fill: &Arc<Fill>) {
        let mut fills = self.lock();
        if fills
            .get(&fill.digest)
            .is_some_and(|f| Arc::ptr_eq(f, fill))
        {
            fills.remove(&fill.digest);
        }
    }
}

/// What a request for a missing digest becomes.
pub enum Role {
    /// Nobody is fetching it: this request asks upstream.
    Leader(Leader),
    /// A download is under way: follow it.
    Follower(Arc<Fill>),
}

/// The right (and duty) to fetch a digest; dropping it unstarted lets the
/// followers retry.
pub struct Leader {
    cache: Arc<Cache>,
    fill: Arc<Fill>,
    started: bool,
}

impl Cache {
    /// Waits while a download of `digest` whose bytes matched is being
    /// committed, so that the caller finds the entry (or, if the commit
    /// failed, nothing) rather than the download.
    pub async fn committed(&self, digest: &Digest) {
        let fill = self.fills.get(digest);
        if let Some(fill) = fill.filter(|f| f.committing()) {
            fill.ended().await;
        }
    }

    /// Waits until no verified download is still being committed: before
    /// the process exits, so that what clients received is in the cache.
    pub async fn commits_settled(&self) {
        loop {
            let pending = self.fills.committing();
            if pending.is_empty() {
                return;
            }
            for fill in pending {
                fill.ended().await;
            }
        }
    }

    /// The download of `digest` under way (or about to start), if any,
    /// without joining it.
    pub fn running_fill(&self, digest: &Digest) -> Option<Arc<Fill>> {
        self.fills.get(digest)
    }

    /// Joins the download of `digest`, or becomes its leader.
    pub fn join_fill(self: &Arc<Self>, digest: &Digest) -> Role {
        let mut fills = self.fills.lock();
        if let Some(fill) = fills.get(digest) {
            return Role::Follower(fill.clone());
        }
        let (progress, _) = watch::channel(Progress {
            phase: Phase::Connecting,
            written: 0,
            total: None,
            verified: false,
            failure: None,
        });
        let fill = Arc::new(Fill {
            digest: digest.clone(),
            progress,
            file: OnceLock::new(),
            origin: OnceLock::new(),
        });
        fills.insert(digest.clone(), fill.clone());
        Role::Leader(Leader {
            cache: self.clone(),
            fill,
            started: false,
        })
    }
}

impl Leader {
    /// Records which (registry, repository) the download is for, before
    /// [`Leader::start`]: followers can tell whether it serves them, and the
    /// digest is linked to it once the bytes matched.
    pub fn set_origin(&self, registry: &str, repo: &str) {
        let _ = self
            .fill
            .origin
            .set((registry.to_string(), repo.to_string()));
    }

    /// Starts storing `body` (upstream's 200 answer) as `digest`.
    ///
    /// `total` is the announced Content-Length; `media_type` is stored with
    /// the entry (empty for blobs); `reservation` is its admission (see
    /// [`Cache::admit`]), grown as the bytes are written. Returns the fill
    /// to read from.
    pub async fn start<B>(
        mut self,
        body: B,
        total: Option<u64>,
        media_type: String,
        reservation: Reservation,
    ) -> Result<Arc<Fill>, CacheError>
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError> + Send,
    {
        let temp = self.cache.temp_path(&self.fill.digest);
        let path = temp.clone();
        let file = blocking(move || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(super::io_err(&path))
        })
        .await?;
        let file = Arc::new(file);
        let _ = self.fill.file.set(file.clone());
        self.fill.update(|p| {
            p.phase = Phase::Streaming;
            p.total = total;
        });
        self.started = true;
        let fill = self.fill.clone();
        let cache = self.cache.clone();
        tokio::spawn(write_fill(
            cache,
            fill.clone(),
            file,
            temp,
            body,
            (total, media_type),
            reservation,
        ));
        Ok(fill)
    }

    /// Gives up without streaming: followers retry on their own.
    pub fn abandon(self) {
        // Drop does the work.
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.started {
            self.fill.update(|p| p.phase = Phase::Abandoned);
            self.cache.fills.remove(&self.fill);
        }
    }
}

/// The detached writer: body → temp file → verify → commit.
async fn write_fill<B>(
    cache: Arc<Cache>,
    fill: Arc<Fill>,
    file: Arc<std::fs::File>,
    temp: PathBuf,
    body: B,
    (total, media_type): (Option<u64>, String),
    mut reservation: Reservation,
) where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError> + Send,
{
    let outcome = copy_and_verify(&fill, file, body, total, &mut reservation).await;
    // On failure the reservation is dropped here, released before anyone
    // hears of the failure.
    let outcome = match outcome {
        Ok(size) => {
            // The bytes matched: readers may finish while the entry is made
            // durable (fsync, rename, index), which is what a crash must not
            // lose or corrupt.
            fill.update(|p| p.verified = true);
            #[cfg(test)]
            let _gate = cache.commit_gate.read().await;
            // The registry served these bytes for its repository and they
            // matched: that earns the link, made with the entry, so that
            // nobody finds one without the other.
            let origin = fill.origin().map(|(r, p)| (r.as_str(), p.as_str()));
            cache
                .commit_reserved(
                    &temp,
                    &fill.digest,
                    size,
                    &media_type,
                    Some(reservation),
                    origin,
                )
                .await
                .map(|_| size)
                .map_err(Failure::from)
        }
        Err(e) => {
            drop(reservation);
            Err(e)
        }
    };
    match outcome {
        Ok(size) => {
            tracing::debug!(digest = %fill.digest, size, "download verified and stored");
            fill.update(|p| p.phase = Phase::Done);
        }
        Err(Failure { reason, error: e }) => {
            let what = match fill.origin() {
                Some((registry, repo)) => format!("{registry}/{repo} {}", fill.digest),
                None => fill.digest.to_string(),
            };
            crate::metrics::get().fill_failed(reason, &what);
            tracing::warn!(digest = %fill.digest, error = %e, reason, "download failed; nothing stored");
            let _ = tokio::fs::remove_file(&temp).await;
            fill.update(|p| {
                p.phase = Phase::Failed(Arc::from(e.to_string()));
                p.failure = Some(reason);
            });
        }
    }
    cache.fills.remove(&fill);
}

/// A failed fill: the error, and its `regcache_fill_failures_total` reason.
#[derive(Debug)]
struct Failure {
    reason: &'static str,
    error: CacheError,
}

impl Failure {
    fn new(reason: &'static str, error: CacheError) -> Self {
        Self { reason, error }
    }
}

/// A local failure (writing, committing): `disk_full` when the cache or the
/// disk had no room, else `other`. Upstream's failures are tagged where
/// they are found.
impl From<CacheError> for Failure {
    fn from(error: CacheError) -> Self {
        Failure::new(local_failure_reason(&error), error)
    }
}

/// The reason of a fill's local failure: `disk_full` for no room under
/// `cache_size` or on the disk (ENOSPC, EDQUOT), else `other`.
fn local_failure_reason(error: &CacheError) -> &'static str {
    match error {
        CacheError::NoRoom(_) => "disk_full",
        CacheError::Io { source, .. }
            if source.kind() == std::io::ErrorKind::StorageFull
                || source.kind() == std::io::ErrorKind::QuotaExceeded =>
        {
            "disk_full"
        }
        _ => "other",
    }
}

/// Copies the body into `file`, hashing it, with `room` covering every
/// byte before it is written; checks digest and length.
///
/// Pipelined: while one batch is written and hashed on the blocking pool,
/// the next is received (and decrypted) on the async thread. Frames are
/// written as they came, never copied into a bigger buffer first.
async fn copy_and_verify<B>(
    fill: &Fill,
    file: Arc<std::fs::File>,
    mut body: B,
    total: Option<u64>,
    room: &mut Reservation,
) -> Result<u64, Failure>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError> + Send,
{
    let mut writer = Writer {
        file,
        room,
        hasher: Some(DigestHasher::new(fill.digest.algorithm())),
        written: 0,
        queued: 0,
        in_flight: None,
    };
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batched = 0usize;
    let mut received = 0u64;
    let mismatch = |reason, actual: String| {
        Failure::new(
            reason,
            CacheError::Mismatch {
                expected: fill.digest.to_string(),
                actual,
            },
        )
    };
    loop {
        let wait = if batch.is_empty() {
            BODY_STALL
        } else {
            WRITE_IDLE
        };
        let next = tokio::select! {
            // Publish each finished write at once, so readers go on.
            done = writer.finished(), if writer.in_flight.is_some() => {
                fill.update(|p| p.written = writer.written);
                done?;
                continue;
            }
            next = tokio::time::timeout(wait, body.frame()) => next,
        };
        let frame = match next {
            Ok(Some(Ok(frame))) => Some(frame),
            Ok(Some(Err(e))) => {
                let e: BoxError = e.into();
                return Err(mismatch(
                    "upstream_error",
                    format!("upstream body failed after {received} bytes: {e}"),
                ));
            }
            Ok(None) => None,
            Err(_) if batch.is_empty() => {
                return Err(mismatch(
                    "upstream_error",
                    format!("upstream stalled after {received} bytes"),
                ))
            }
            Err(_) => {
                // Idle: write what we have so readers can go on.
                writer.submit(std::mem::take(&mut batch)).await?;
                batched = 0;
                fill.update(|p| p.written = writer.written);
                continue;
            }
        };
        let end = frame.is_none();
        if let Some(data) = frame.and_then(|f| f.into_data().ok()) {
            received += data.len() as u64;
            if total.is_some_and(|t| received > t) {
                return Err(mismatch(
                    "truncated",
                    format!(
                        "upstream sent more than the announced {} bytes",
                        total.unwrap_or(0)
                    ),
                ));
            }
            if !data.is_empty() {
                batched += data.len();
                batch.push(data);
            }
        }
        if batched >= WRITE_CHUNK || (end && !batch.is_empty()) {
            writer.submit(std::mem::take(&mut batch)).await?;
            batched = 0;
            fill.update(|p| p.written = writer.written);
        }
        if end {
            break;
        }
    }
    writer.finished().await?;
    let written = writer.written;
    fill.update(|p| p.written = written);
    if let Some(t) = total {
        if written != t {
            return Err(mismatch(
                "truncated",
                format!("{written} bytes instead of the announced {t}"),
            ));
        }
    }
    let actual = writer
        .hasher
        .take()
        .map(DigestHasher::finish)
        .ok_or_else(|| CacheError::Task("hasher lost".into()))?;
    if actual != fill.digest {
        return Err(mismatch(
            "digest_mismatch",
            format!("the bytes hash to {actual}"),
        ));
    }
    Ok(written)
}

type WriteResult = Result<(DigestHasher, u64), CacheError>;

/// Appends batches to the temporary file and hashes them, one batch at a
/// time on the blocking pool, each within the room its reservation holds.
struct Writer<'a> {
    file: Arc<std::fs::File>,
    /// Grown to cover every batch before it is written.
    room: &'a mut Reservation,
    /// The hasher, while no write holds it.
    hasher: Option<DigestHasher>,
    /// Bytes written and hashed.
    written: u64,
    /// Bytes submitted: written, or being written.
    queued: u64,
    in_flight: Option<tokio::task::JoinHandle<WriteResult>>,
}

impl Writer<'_> {
    /// Waits for the write in flight, if any, and counts it.
    async fn finished(&mut self) -> Result<(), CacheError> {
        let Some(task) = self.in_flight.as_mut() else {
            return Ok(());
        };
        let outcome = task.await;
        self.in_flight = None;
        let (hasher, len) = outcome.map_err(|e| CacheError::Task(e.to_string()))??;
        self.hasher = Some(hasher);
        self.written += len;
        Ok(())
    }

    /// Starts writing `batch` after the write in flight has finished, once
    /// the reservation covers it (its room made while that write runs).
    async fn submit(&mut self, batch: Vec<Bytes>) -> Result<(), CacheError> {
        let len: u64 = batch.iter().map(|b| b.len() as u64).sum();
        if let Err(no_room) = self.room.cover(self.queued + len).await {
            // The write in flight was covered: let it end before the
            // reservation goes.
            let _ = self.finished().await;
            return Err(no_room.into());
        }
        self.queued += len;
        self.finished().await?;
        let file = self.file.clone();
        let mut hasher = self
            .hasher
            .take()
            .ok_or_else(|| CacheError::Task("hasher lost".into()))?;
        let mut offset = self.written;
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let start = offset;
            for chunk in &batch {
                file.write_all_at(chunk, offset)
                    .map_err(|source| CacheError::Io {
                        path: PathBuf::from("<download>"),
                        source,
                    })?;
                hasher.update(chunk);
                offset += chunk.len() as u64;
            }
            Ok((hasher, offset - start))
        }));
        Ok(())
    }
}
