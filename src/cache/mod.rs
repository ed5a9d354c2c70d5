//! The content-addressed disk cache.
//!
//! Layout under `cache_dir`:
//! ```text
//! blobs/sha256/ab/abcd…   content (blobs and manifests), named by digest
//! tmp/                    files being downloaded; wiped at start-up
//! index.redb              metadata: entries, links, tags (see index.rs)
//! ```
//! Content is stored once per digest, whatever repository it came through; a
//! *link* (registry, repository, digest) says which repositories may see it:
//! one the registry served or confirmed the digest for, never one a
//! manifest merely names ([`crate::registry::link`] has the rule). Links are
//! kept in memory by digest, so the repositories of a digest are one lookup.
//! A file enters `blobs/` only by an atomic rename after its digest and
//! length matched ([`fill`]), so nothing partial or wrong is ever served.
//!
//! While running, the metadata lives in memory (an LRU ordered by access)
//! and every change is written through to the index. Eviction removes the
//! least recently used entries that nobody is reading until the total fits
//! `cache_size`.
//!
//! Downloads in progress count too, and make their room only as their
//! bytes arrive. A fill is first *admitted* ([`Cache::admit`]): a known
//! length that can never fit (larger than the cap, or than what the entries
//! being read and the other downloads leave) is refused and the blob is
//! streamed to its client uncached; an admitted length is *promised* to the
//! fill, and nothing is evicted yet. As the fill writes, its
//! [`Reservation`] grows a step ahead of the bytes ([`Reservation::cover`],
//! [`ROOM_STEP`], one short lock a step), evicting least recently used
//! entries nobody reads only then, so that the entries plus the
//! reservations never exceed the cap; an upstream that announces a large
//! length and sends nothing evicts nothing. A fill without a length grows
//! the same way, and fails (nothing stored, its readers' responses cut)
//! when its bytes would pass the cap. The reservation becomes the entry
//! when the fill commits, and is released (held and promised bytes) when
//! it fails.
//!
//! Bytes at rest are not trusted across restarts: every entry loaded from the
//! index starts *unverified* (an in-memory flag), and is hashed again as it
//! is served ([`read::verifying`], `verify_reads`). An entry whose bytes no
//! longer match is dropped ([`Cache::drop_damaged`]) and fetched again.

pub mod bundle;
pub mod chunks;
pub mod fill;
pub mod freshness;
pub mod index;
pub mod offline;
pub mod read;
pub mod retention;

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use lru::LruCache;

use crate::registry::digest::Digest;
use crate::registry::link::LinkFacts;
use freshness::TagRecord;
use index::{Change, ContentRow, Index, TagRow};

pub use fill::{FillProgress, SingleFlight};

/// A cache problem.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file or directory operation failed.
    #[error("cache file {path}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The operating system's reason.
        source: io::Error,
    },
    /// The index database failed.
    #[error("cache index: {0}")]
    Index(#[from] index::IndexError),
    /// Bytes did not match their digest or announced length.
    #[error("content does not match {expected}: {actual}")]
    Mismatch {
        /// The digest that was asked for.
        expected: String,
        /// What arrived instead.
        actual: String,
    },
    /// A download's bytes found no room under `cache_size`.
    #[error("no room in the cache: {0}")]
    NoRoom(#[from] NoRoom),
    /// A background task failed to run.
    #[error("cache task failed: {0}")]
    Task(String),
    /// Another process (a running regcache) has the index open.
    #[error("{0}: a running regcache has this cache open; stop it first")]
    InUse(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A cached content entry in memory.
struct Entry {
    size: u64,
    media_type: Arc<str>,
    /// Held by every reader; an entry with readers is never evicted.
    lease: Arc<()>,
    /// Whether its bytes matched its digest in this run.
    verified: Arc<AtomicBool>,
    /// The verdict of the one whole-file check run before a range is served.
    range_check: Arc<tokio::sync::OnceCell<bool>>,
    /// When it was last read or stored, Unix seconds (for `max_unused`).
    last_used: u64,
}

impl Entry {
    fn new(size: u64, media_type: &str, verified: bool, last_used: u64) -> Self {
        Self {
            size,
            last_used,
            media_type: Arc::from(media_type),
            lease: Arc::new(()),
            verified: Arc::new(AtomicBool::new(verified)),
            range_check: Arc::default(),
        }
    }

    fn handle(&self, dir: &Path, digest: &Digest) -> Cached {
        Cached {
            digest: digest.clone(),
            path: content_file(dir, digest),
            size: self.size,
            media_type: self.media_type.clone(),
            lease: self.lease.clone(),
            verified: self.verified.clone(),
            range_check: self.range_check.clone(),
        }
    }
}

/// A verified content file, ready to be served.
#[derive(Debug, Clone)]
pub struct Cached {
    /// Its digest.
    pub digest: Digest,
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// The manifest media type, empty for blobs.
    pub media_type: Arc<str>,
    /// Keeps the entry from eviction while this handle lives.
    pub lease: Arc<()>,
    /// Shared with the entry: set once its bytes matched in this run.
    verified: Arc<AtomicBool>,
    /// Shared with the entry: see [`Cached::range_check`].
    range_check: Arc<tokio::sync::OnceCell<bool>>,
}

impl Cached {
    /// Whether the file's bytes matched the digest since regcache started
    /// (always true for content stored in this run).
    pub fn is_verified(&self) -> bool {
        self.verified.load(Ordering::Relaxed)
    }

    /// Records that the file's bytes matched the digest.
    pub fn mark_verified(&self) {
        self.verified.store(true, Ordering::Relaxed);
    }

    /// Whether the whole file matched when hashed before a range of it was
    /// served, once per entry and run: concurrent ranges wait for the one
    /// check ([`read::intact_for_range`]).
    pub fn range_check(&self) -> &tokio::sync::OnceCell<bool> {
        &self.range_check
    }
}

/// Numbers for `regcache cache stats` and the `cache opened` log line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Content entries.
    pub entries: u64,
    /// Their total size in bytes.
    pub bytes: u64,
    /// Tags known.
    pub tags: u64,
    /// Repository links.
    pub links: u64,
    /// Requests served from the cache (persisted).
    pub hits: u64,
    /// Requests that went upstream (persisted).
    pub misses: u64,
    /// What `max_unused` removed, over the cache's life (persisted).
    pub unused: retention::Removed,
}

struct State {
    content: LruCache<Digest, Entry>,
    total: u64,
    /// Bytes held by downloads in progress (see [`Reservation`]).
    reserved: u64,
    /// Bytes admitted downloads announced and do not hold yet.
    promised: u64,
    /// digest → the (registry, repository) pairs it is linked to.
    links: HashMap<Digest, HashSet<(String, String)>>,
    link_count: u64,
    tags: HashMap<String, TagRecord>,
    touched: HashSet<Digest>,
    hits: u64,
    misses: u64,
    flushed_hits: u64,
    flushed_misses: u64,
    openness: HashMap<String, (bool, u64)>,
    /// What `max_unused` removed, over the cache's life.
    unused: retention::Removed,
}

/// Reservations grow by at most this much per step (one lock each), so that
/// a fill evicts no more than this ahead of the bytes it has received.
pub const ROOM_STEP: u64 = 16 * 1024 * 1024;

/// Room held in the cache for a download in progress: admitted at its
/// start ([`Cache::admit`]), holding nothing yet, then grown as its bytes
/// arrive ([`Reservation::grow`], [`Reservation::cover`]). Released when
/// dropped, or turned into the entry by [`Cache::commit_reserved`].
pub struct Reservation {
    cache: Arc<Cache>,
    /// Bytes held (counted in `State::reserved`).
    bytes: u64,
    /// The announced length, if any: what is not held yet of it is promised
    /// (counted in `State::promised`).
    limit: Option<u64>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("bytes", &self.bytes)
            .field("limit", &self.limit)
            .finish()
    }
}

impl Reservation {
    /// The bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// What is promised to this fill and not held yet.
    fn promise(&self) -> u64 {
        self.limit.map_or(0, |l| l.saturating_sub(self.bytes))
    }

    /// Gives the held and promised bytes back to the cache (under its lock),
    /// leaving nothing for `Drop` to do: it may then be dropped under the lock.
    fn release(&mut self, state: &mut State) {
        state.reserved = state.reserved.saturating_sub(self.bytes);
        state.promised = state.promised.saturating_sub(self.promise());
        self.bytes = 0;
        self.limit = None;
    }

    /// Holds `to` bytes in all, for bytes about to be written: evicts least
    /// recently used entries nobody reads until the entries plus the
    /// reservations fit the cap, in one short lock (files removed after it).
    /// Fails, holding what it held, when `to` can never fit: more than the
    /// cap, or the rest is being read, held or promised to other fills.
    pub async fn grow(&mut self, to: u64) -> Result<(), NoRoom> {
        if to <= self.bytes {
            return Ok(());
        }
        let cache = self.cache.clone();
        let victims = {
            let mut state = cache.lock();
            let delta = to - self.bytes;
            let room = cache.room(&state, delta);
            let evict_bytes = plan_grow(room, self.bytes, self.limit, to)?;
            let covered = delta.min(self.promise());
            state.promised = state.promised.saturating_sub(covered);
            state.reserved += delta;
            self.bytes = to;
            if evict_bytes == 0 {
                Vec::new()
            } else {
                let budget = cache.cap.saturating_sub(state.reserved);
                evict(&mut state, budget)
            }
        };
        cache.drop_evicted(victims).await;
        Ok(())
    }

    /// Makes sure `need` bytes are held, growing by a step ahead of them
    /// ([`ROOM_STEP`], less for a small cache; never past the announced
    /// length or the cap) so that most writes take no lock; when the step
    /// does not fit, exactly `need`.
    pub async fn cover(&mut self, need: u64) -> Result<(), NoRoom> {
        if need <= self.bytes {
            return Ok(());
        }
        let cap = self.cache.cap;
        let target = step_target(self.bytes, need, self.limit, cap);
        match self.grow_to(target, need).await {
            // Room held by downloads whose entries are being committed is
            // a moment from being evictable: wait for them, try once more.
            Err(NoRoom::Busy { .. }) if self.cache.fills.any_committing() => {
                self.cache.commits_settled().await;
                self.grow_to(target, need).await
            }
            done => done,
        }
    }

    /// Grows to `target`, or to `need` when the step does not fit.
    async fn grow_to(&mut self, target: u64, need: u64) -> Result<(), NoRoom> {
        match self.grow(target).await {
            Err(_) if target > need => self.grow(need).await,
            done => done,
        }
    }
}

/// Where a reservation holding `held` bytes grows to for `need` bytes: a
/// step ahead ([`ROOM_STEP`], or a sixteenth of a small `cap`), clamped to
/// the announced `limit` and the cap, never below `need`. A pure decision.
pub fn step_target(held: u64, need: u64, limit: Option<u64>, cap: u64) -> u64 {
    let step = ROOM_STEP.min(cap / 16).max(1);
    held.saturating_add(step)
        .max(need)
        .min(limit.unwrap_or(u64::MAX))
        .min(cap)
        .max(need)
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes == 0 && self.promise() == 0 {
            return;
        }
        let cache = self.cache.clone();
        let mut state = cache.lock();
        self.release(&mut state);
    }
}

/// Why a fill cannot be admitted or its reservation cannot grow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoRoom {
    /// Larger than `cache_size` itself.
    #[error("{want} bytes is more than cache_size ({cap} bytes)")]
    TooLarge {
        /// Bytes asked for.
        want: u64,
        /// The cap.
        cap: u64,
    },
    /// The rest of the cache is being read, or held or promised to other
    /// downloads.
    #[error("only {free} of {want} bytes can be freed: the rest is being read or downloaded")]
    Busy {
        /// Bytes asked for.
        want: u64,
        /// Bytes that could be made free.
        free: u64,
    },
}

/// The cache's room as counted under its lock, for [`plan_admit`] and
/// [`plan_grow`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Room {
    /// `cache_size`.
    pub cap: u64,
    /// Bytes of the entries.
    pub total: u64,
    /// Of those, bytes of entries nobody reads, which may be evicted (or at
    /// least as many as the decision needs).
    pub evictable: u64,
    /// Bytes held by fills for what they wrote or are writing.
    pub reserved: u64,
    /// Bytes admitted fills announced and do not hold yet.
    pub promised: u64,
}

impl Room {
    /// Bytes of entries being read: they cannot be evicted.
    fn pinned(&self) -> u64 {
        self.total.saturating_sub(self.evictable)
    }

    /// Whether `want` more bytes fit next to the entries being read, the
    /// bytes held and `promised` (other fills' promises).
    fn fits(&self, want: u64, promised: u64) -> Result<(), NoRoom> {
        let used = self
            .pinned()
            .saturating_add(self.reserved)
            .saturating_add(promised);
        if used.saturating_add(want) > self.cap {
            let free = self.cap.saturating_sub(used);
            return Err(NoRoom::Busy { want, free });
        }
        Ok(())
    }
}

/// Whether a fill announcing `len` bytes may start: it must fit under the
/// cap next to the entries being read and what other fills hold or were
/// promised. Admission evicts nothing: the bytes make their room as they
/// arrive ([`plan_grow`]). A pure decision.
pub fn plan_admit(room: Room, len: u64) -> Result<(), NoRoom> {
    if len > room.cap {
        return Err(NoRoom::TooLarge {
            want: len,
            cap: room.cap,
        });
    }
    room.fits(len, room.promised)
}

/// Whether a reservation holding `held` bytes (of an announced `limit`, if
/// any) may grow to `to`: Ok(bytes of entries to evict so that the entries
/// plus the reservations stay within the cap; promises evict nothing) or
/// why not: `to` is more than the cap, or does not fit next to the entries
/// being read and what the other fills hold or were promised. A pure
/// decision.
pub fn plan_grow(room: Room, held: u64, limit: Option<u64>, to: u64) -> Result<u64, NoRoom> {
    if to <= held {
        return Ok(0);
    }
    if to > room.cap {
        return Err(NoRoom::TooLarge {
            want: to,
            cap: room.cap,
        });
    }
    let delta = to - held;
    let own = limit.map_or(0, |l| l.saturating_sub(held));
    room.fits(delta, room.promised.saturating_sub(own))?;
    Ok(room
        .total
        .saturating_add(room.reserved)
        .saturating_add(delta)
        .saturating_sub(room.cap))
}

/// The cache. Shared as `Arc<Cache>`.
pub struct Cache {
    dir: PathBuf,
    cap: u64,
    index: Arc<Index>,
    state: Mutex<State>,
    /// Downloads in progress, one per digest.
    pub fills: SingleFlight,
    /// Held for writing by a test to keep verified downloads from being
    /// committed (each commit holds it for reading).
    #[cfg(test)]
    commit_gate: tokio::sync::RwLock<()>,
}

/// The file of `digest` in the cache at `dir`: `blobs/<alg>/<2 hex>/<hex>`.
pub fn content_file(dir: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.hex();
    dir.join("blobs")
        .join(digest.algorithm().as_str())
        .join(&hex[..2])
        .join(hex)
}

/// Links each of `digests` to (`registry`, `repo`) in `state`; returns the
/// index changes for the links that are new.
fn add_links(state: &mut State, registry: &str, repo: &str, digests: &[Digest]) -> Vec<Change> {
    let place = (registry.to_string(), repo.to_string());
    let mut changes = Vec::new();
    for d in digests {
        if state
            .links
            .entry(d.clone())
            .or_default()
            .insert(place.clone())
        {
            state.link_count += 1;
            changes.push(Change::PutLink(link_key(registry, repo, d)));
        }
    }
    changes
}

/// The link key for (registry, repository, digest).
pub fn link_key(registry: &str, repo: &str, digest: &Digest) -> String {
    format!("{registry}/{repo}@{digest}")
}

/// The (registry, repository, digest) of a link key; None if it is not one.
pub fn parse_link_key(key: &str) -> Option<(String, String, Digest)> {
    let (name, digest) = key.rsplit_once('@')?;
    let (registry, repo) = split_registry(name)?;
    Some((registry.to_string(), repo.to_string(), digest.parse().ok()?))
}

/// Splits `registry/repository` of a key into its two parts. A registry key
/// may carry a scheme (`http://host:port`, an insecure registry), whose
/// slashes are not the separator.
pub fn split_registry(name: &str) -> Option<(&str, &str)> {
    let scheme = name.find("://").map(|i| i + 3).unwrap_or(0);
    let slash = scheme + name[scheme..].find('/')?;
    Some((&name[..slash], &name[slash + 1..]))
}

/// The tag key for (registry, repository, tag).
pub fn tag_key(registry: &str, repo: &str, tag: &str) -> String {
    format!("{registry}/{repo}:{tag}")
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Cache {
    /// Opens the cache in `dir` (creating it), keeping at most `cap` bytes.
    ///
    /// Blocking: loads the whole index into memory and wipes `tmp/`. The
    /// index is opened first: it cannot be opened twice, so a cache that a
    /// running regcache holds fails here with its downloads left alone.
    pub fn open(dir: &Path, cap: u64) -> Result<Arc<Self>, CacheError> {
        std::fs::create_dir_all(dir.join("blobs")).map_err(io_err(dir))?;
        let index = Index::open(&dir.join("index.redb"))?;
        let tmp = dir.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let snap = index.load()?;
        let (hits, misses) = (snap.counter("hits"), snap.counter("misses"));
        let [entries, bytes, tags] = retention::COUNTERS.map(|c| snap.counter(c));
        let unused = retention::Removed {
            entries,
            bytes,
            tags,
        };

        let mut rows = snap.content;
        rows.sort_by_key(|r| r.last_access);
        let mut content = LruCache::unbounded();
        let mut total = 0u64;
        for row in rows {
            let Ok(digest) = row.digest.parse::<Digest>() else {
                continue;
            };
            total += row.size;
            // Bytes at rest are checked again before they count as verified.
            content.put(
                digest,
                Entry::new(row.size, &row.media_type, false, row.last_access),
            );
        }
        let tags = snap
            .tags
            .into_iter()
            .map(|t| {
                (
                    t.key,
                    TagRecord {
                        digest: t.digest,
                        fetched_at_ms: t.fetched_at_ms,
                    },
                )
            })
            .collect();
        let mut links: HashMap<Digest, HashSet<(String, String)>> = HashMap::new();
        let mut link_count = 0;
        for (registry, repo, digest) in snap.links.iter().filter_map(|k| parse_link_key(k)) {
            if links.entry(digest).or_default().insert((registry, repo)) {
                link_count += 1;
            }
        }
        let state = State {
            content,
            total,
            reserved: 0,
            promised: 0,
            links,
            link_count,
            tags,
            touched: HashSet::new(),
            hits,
            misses,
            flushed_hits: hits,
            flushed_misses: misses,
            openness: snap
                .openness
                .into_iter()
                .map(|(k, public, at)| (k, (public, at)))
                .collect(),
            unused,
        };
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            cap,
            index: Arc::new(index),
            state: Mutex::new(state),
            fills: SingleFlight::default(),
            #[cfg(test)]
            commit_gate: tokio::sync::RwLock::new(()),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The size cap in bytes.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// Where the content of `digest` lives (whether or not it is cached).
    pub fn content_path(&self, digest: &Digest) -> PathBuf {
        content_file(&self.dir, digest)
    }

    /// A fresh temporary path for downloading `digest`.
    pub fn temp_path(&self, digest: &Digest) -> PathBuf {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dir
            .join("tmp")
            .join(format!("{}.{}.{n}", digest.hex(), std::process::id()))
    }

    /// The cached content for `digest`, marking it recently used.
    pub fn get(&self, digest: &Digest) -> Option<Cached> {
        let mut state = self.lock();
        let entry = state.content.get_mut(digest)?;
        entry.last_used = unix_secs();
        let cached = entry.handle(&self.dir, digest);
        state.touched.insert(digest.clone());
        Some(cached)
    }

    /// Whether `digest` is cached (without touching it).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.lock().content.contains(digest)
    }

    /// Whether `repo` on `registry` may see `digest`.
    pub fn is_linked(&self, registry: &str, repo: &str, digest: &Digest) -> bool {
        self.lock()
            .links
            .get(digest)
            .is_some_and(|places| places.contains(&(registry.to_string(), repo.to_string())))
    }

    /// What the links of `digest` say about serving it through `repo` on
    /// `registry`, for [`crate::registry::link::verdict`]: one lookup of the
    /// digest, then its repositories (never a scan of every link).
    ///
    /// A repository makes the digest public somewhere only if it was found
    /// public at or after `public_since` (Unix ms): a repository made private
    /// stops opening its digests through other repositories once that
    /// finding is older than `public_ttl` (the caller passes
    /// [`crate::serve::state::State::public_since`]). With no registry to ask
    /// again (offline), 0 keeps the last finding, however old.
    pub fn link_facts(
        &self,
        registry: &str,
        repo: &str,
        digest: &Digest,
        public_since: u64,
    ) -> LinkFacts {
        let state = self.lock();
        let Some(places) = state.links.get(digest) else {
            return LinkFacts::default();
        };
        LinkFacts::of(
            registry,
            repo,
            places.iter().map(|(r, p)| (r.as_str(), p.as_str())),
            |r, p| {
                state
                    .openness
                    .get(&format!("{r}/{p}"))
                    .is_some_and(|&(public, at)| public && at >= public_since)
            },
        )
    }

    /// Lets `repo` on `registry` see `digests`, persistently.
    pub async fn link(
        &self,
        registry: &str,
        repo: &str,
        digests: &[Digest],
    ) -> Result<(), CacheError> {
        let changes = add_links(&mut self.lock(), registry, repo, digests);
        self.persist(changes).await
    }

    /// What `registry/repo:tag` pointed to when last learnt.
    pub fn tag(&self, registry: &str, repo: &str, tag: &str) -> Option<TagRecord> {
        self.lock().tags.get(&tag_key(registry, repo, tag)).cloned()
    }

    /// Records that `registry/repo:tag` points to `record.digest`.
    pub async fn set_tag(
        &self,
        registry: &str,
        repo: &str,
        tag: &str,
        record: TagRecord,
    ) -> Result<(), CacheError> {
        let key = tag_key(registry, repo, tag);
        let row = TagRow {
            key: key.clone(),
            digest: record.digest.clone(),
            fetched_at_ms: record.fetched_at_ms,
        };
        self.lock().tags.insert(key, record);
        self.persist(vec![Change::PutTag(row)]).await
    }

    /// Forgets `registry/repo:tag`.
    pub async fn remove_tag(
        &self,
        registry: &str,
        repo: &str,
        tag: &str,
    ) -> Result<(), CacheError> {
        let key = tag_key(registry, repo, tag);
        self.lock().tags.remove(&key);
        self.persist(vec![Change::RemoveTag(key)]).await
    }

    /// Whether `registry/repo` was found public, and when (Unix ms).
    pub fn openness(&self, registry: &str, repo: &str) -> Option<(bool, u64)> {
        self.lock()
            .openness
            .get(&format!("{registry}/{repo}"))
            .copied()
    }

    /// Records whether `registry/repo` is public, persistently, so that a
    /// restarted regcache can still share public content while upstream is down.
    pub async fn set_openness(
        &self,
        registry: &str,
        repo: &str,
        public: bool,
        at_ms: u64,
    ) -> Result<(), CacheError> {
        let key = format!("{registry}/{repo}");
        let changed =
            self.lock().openness.insert(key.clone(), (public, at_ms)) != Some((public, at_ms));
        if !changed {
            return Ok(());
        }
        self.persist(vec![Change::PutOpenness(key, public, at_ms)])
            .await
    }

    /// Counts a request served from the cache or from upstream.
    pub fn count(&self, hit: bool) {
        let mut state = self.lock();
        if hit {
            state.hits += 1;
        } else {
            state.misses += 1;
        }
    }

    /// Drops an entry whose file vanished (deleted behind regcache's back).
    pub async fn forget(&self, digest: &Digest) -> Result<(), CacheError> {
        let removed = {
            let mut state = self.lock();
            match state.content.pop(digest) {
                Some(e) => {
                    state.total -= e.size;
                    true
                }
                None => false,
            }
        };
        if removed {
            tracing::warn!(%digest, "cached file is missing; dropped from the index");
            self.persist(vec![Change::RemoveContent(digest.to_string())])
                .await?;
        }
        Ok(())
    }

    /// Admits a download of `len` bytes (None: unknown), evicting nothing:
    /// a known length must fit under the cap next to the entries being read
    /// and what other downloads hold or were promised, and is then promised
    /// to it. The returned [`Reservation`] holds no bytes yet; the fill
    /// grows it as its bytes arrive ([`Reservation::cover`]).
    pub fn admit(self: &Arc<Self>, len: Option<u64>) -> Result<Reservation, NoRoom> {
        self.try_admit(len)
    }

    /// [`Cache::admit`], waiting first for the downloads being committed
    /// when they hold the room it lacks (their entries can then be evicted).
    pub async fn admit_soon(self: &Arc<Self>, len: Option<u64>) -> Result<Reservation, NoRoom> {
        match self.try_admit(len) {
            Err(NoRoom::Busy { .. }) if self.fills.any_committing() => {
                self.commits_settled().await;
                self.try_admit(len)
            }
            done => done,
        }
    }

    fn try_admit(self: &Arc<Self>, len: Option<u64>) -> Result<Reservation, NoRoom> {
        if let Some(len) = len {
            let mut state = self.lock();
            plan_admit(self.room(&state, len), len)?;
            state.promised += len;
        }
        Ok(Reservation {
            cache: self.clone(),
            bytes: 0,
            limit: len,
        })
    }

    /// The room under the lock, for `want` more bytes: entries nobody reads
    /// are counted from the least recently used only as far as `want` could
    /// need them (none when it fits anyway), so that a step of a fill is
    /// not a walk over the whole cache.
    fn room(&self, state: &State, want: u64) -> Room {
        let mut room = Room {
            cap: self.cap,
            total: state.total,
            evictable: 0,
            reserved: state.reserved,
            promised: state.promised,
        };
        let short = room
            .total
            .saturating_add(room.reserved)
            .saturating_add(room.promised)
            .saturating_add(want)
            .saturating_sub(room.cap);
        if short > 0 {
            let mut evictable = 0u64;
            for (_, e) in state.content.iter().rev() {
                if evictable >= short {
                    break;
                }
                if Arc::strong_count(&e.lease) == 1 {
                    evictable += e.size;
                }
            }
            room.evictable = evictable;
        }
        room
    }

    /// Records entries evicted under the lock and removes their files.
    async fn drop_evicted(&self, victims: Vec<Digest>) {
        if victims.is_empty() {
            return;
        }
        let changes = victims
            .iter()
            .map(|d| Change::RemoveContent(d.to_string()))
            .collect();
        if let Err(e) = self.persist(changes).await {
            tracing::warn!(error = %e, "cannot record evicted entries");
        }
        self.unlink(victims).await;
    }

    /// Bytes held by downloads in progress.
    pub fn reserved(&self) -> u64 {
        self.lock().reserved
    }

    /// Bytes admitted downloads announced and do not hold yet.
    pub fn promised(&self) -> u64 {
        self.lock().promised
    }

    /// Drops an entry whose bytes at rest no longer match its digest: its
    /// index row and its file go, its links and tags stay (they are still
    /// true of the registry), so the next request fetches it again. Only the
    /// entry `damaged` was read from is dropped: one stored again since is
    /// left alone. Returns whether anything was dropped.
    pub async fn drop_damaged(self: &Arc<Self>, damaged: &Cached) -> Result<bool, CacheError> {
        let cache = self.clone();
        let (digest, lease) = (damaged.digest.clone(), damaged.lease.clone());
        let dropped = blocking(move || {
            let mut state = cache.lock();
            let same = state
                .content
                .peek(&digest)
                .is_some_and(|e| Arc::ptr_eq(&e.lease, &lease));
            if !same {
                return Ok(false);
            }
            // Under the lock: no commit of a good copy can come in between.
            let path = cache.content_path(&digest);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(CacheError::Io { path, source }),
            }
            if let Some(e) = state.content.pop(&digest) {
                state.total -= e.size;
            }
            state.touched.remove(&digest);
            Ok(true)
        })
        .await?;
        if dropped {
            self.persist(vec![Change::RemoveContent(damaged.digest.to_string())])
                .await?;
        }
        Ok(dropped)
    }

    /// Moves a verified temporary file into the cache as `digest`.
    ///
    /// The caller has checked digest and size. Older entries are evicted first
    /// if needed; content larger than the whole cap is not kept (Ok(None)).
    pub async fn commit(
        &self,
        temp: &Path,
        digest: &Digest,
        size: u64,
        media_type: &str,
    ) -> Result<Option<Cached>, CacheError> {
        self.commit_reserved(temp, digest, size, media_type, None, None)
            .await
    }

    /// [`Cache::commit`] for a download that held `reservation`: the
    /// reservation becomes the entry (released whatever the outcome), and
    /// `link_to` (registry, repository), the place whose upstream served the
    /// bytes, is linked to it in the same update of memory and index.
    pub async fn commit_reserved(
        &self,
        temp: &Path,
        digest: &Digest,
        size: u64,
        media_type: &str,
        reservation: Option<Reservation>,
        link_to: Option<(&str, &str)>,
    ) -> Result<Option<Cached>, CacheError> {
        // Released (also on early returns) once the entry is counted.
        let mut reservation = reservation;
        if let Some(cached) = self.get(digest) {
            let _ = tokio::fs::remove_file(temp).await;
            if let Some((registry, repo)) = link_to {
                self.link(registry, repo, std::slice::from_ref(digest))
                    .await?;
            }
            return Ok(Some(cached));
        }
        if size > self.cap {
            tracing::info!(%digest, size, cap = self.cap, "not cached: larger than cache_size");
            let _ = tokio::fs::remove_file(temp).await;
            return Ok(None);
        }
        let dest = self.content_path(digest);
        let (from, to) = (temp.to_path_buf(), dest);
        blocking(move || {
            let file = std::fs::File::open(&from).map_err(io_err(&from))?;
            file.sync_all().map_err(io_err(&from))?;
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            std::fs::rename(&from, &to).map_err(io_err(&to))
        })
        .await?;

        let (victims, cached, links) = {
            let mut state = self.lock();
            // The reservation held every byte written: it becomes the entry.
            if let Some(mut r) = reservation.take() {
                r.release(&mut state);
            }
            let budget = self.cap.saturating_sub(size).saturating_sub(state.reserved);
            let victims = evict(&mut state, budget);
            // The caller hashed these bytes on their way in.
            let entry = Entry::new(size, media_type, true, unix_secs());
            let cached = entry.handle(&self.dir, digest);
            state.total += size;
            state.content.put(digest.clone(), entry);
            let links = match link_to {
                Some((registry, repo)) => {
                    add_links(&mut state, registry, repo, std::slice::from_ref(digest))
                }
                None => Vec::new(),
            };
            (victims, cached, links)
        };
        let mut changes: Vec<Change> = victims
            .iter()
            .map(|d| Change::RemoveContent(d.to_string()))
            .collect();
        changes.push(Change::PutContent(ContentRow {
            digest: digest.to_string(),
            size,
            last_access: unix_secs(),
            media_type: media_type.to_string(),
        }));
        changes.extend(links);
        self.persist(changes).await?;
        self.unlink(victims).await;
        Ok(Some(cached))
    }

    /// Stores small verified content (a manifest) held in memory.
    pub async fn store_bytes(
        &self,
        digest: &Digest,
        bytes: bytes::Bytes,
        media_type: &str,
    ) -> Result<Option<Cached>, CacheError> {
        if let Some(cached) = self.get(digest) {
            return Ok(Some(cached));
        }
        let temp = self.temp_path(digest);
        let path = temp.clone();
        let size = bytes.len() as u64;
        blocking(move || std::fs::write(&path, &bytes).map_err(io_err(&path))).await?;
        self.commit(&temp, digest, size, media_type).await
    }

    async fn unlink(&self, victims: Vec<Digest>) {
        if victims.is_empty() {
            return;
        }
        let paths: Vec<PathBuf> = victims.iter().map(|d| self.content_path(d)).collect();
        tracing::info!(
            evicted = victims.len(),
            "evicted least recently used entries"
        );
        let _ = blocking(move || {
            for p in paths {
                if let Err(e) = std::fs::remove_file(&p) {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove evicted file");
                }
            }
            Ok(())
        })
        .await;
    }

    /// Deletes content files that no index entry names: left behind by a
    /// crash between a file's rename and its entry's commit (or by an entry's
    /// removal and its file's). Files written since `started` are left alone,
    /// as they may belong to a commit in progress.
    pub async fn sweep_orphans(self: &Arc<Self>, started: SystemTime) -> Result<usize, CacheError> {
        let cache = self.clone();
        blocking(move || {
            let mut removed = 0;
            let root = cache.dir.join("blobs");
            for alg in read_dir(&root)? {
                for shard in read_dir(&alg)? {
                    for file in read_dir(&shard)? {
                        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
                        let alg_name = alg.file_name().and_then(|n| n.to_str()).unwrap_or("");
                        let known = format!("{alg_name}:{name}")
                            .parse::<Digest>()
                            .is_ok_and(|d| cache.contains(&d));
                        let recent = std::fs::metadata(&file)
                            .and_then(|m| m.modified())
                            .is_ok_and(|t| t >= started);
                        if !known && !recent && std::fs::remove_file(&file).is_ok() {
                            removed += 1;
                        }
                    }
                }
            }
            Ok(removed)
        })
        .await
    }

    /// Writes access times and counters gathered since the last call.
    pub async fn flush(&self) -> Result<(), CacheError> {
        let changes = {
            let mut state = self.lock();
            let now = unix_secs();
            let mut changes: Vec<Change> = state
                .touched
                .drain()
                .map(|d| Change::Touch(d.to_string(), now))
                .collect();
            let hits = state.hits - state.flushed_hits;
            let misses = state.misses - state.flushed_misses;
            state.flushed_hits = state.hits;
            state.flushed_misses = state.misses;
            if hits > 0 {
                changes.push(Change::Count("hits", hits));
            }
            if misses > 0 {
                changes.push(Change::Count("misses", misses));
            }
            changes
        };
        self.persist(changes).await
    }

    /// Current numbers (hits and misses as persisted plus pending).
    pub fn stats(&self) -> Stats {
        let state = self.lock();
        Stats {
            entries: state.content.len() as u64,
            bytes: state.total,
            tags: state.tags.len() as u64,
            links: state.link_count,
            hits: state.hits,
            misses: state.misses,
            unused: state.unused,
        }
    }

    /// Removes the entries nobody is reading that went unread longer than
    /// their limit at `now` (Unix seconds; [`retention::limit_of`] with the
    /// rules' `limit_for` and the `global` limit; none is shorter than
    /// `shortest`), then the tags whose manifest is no longer cached.
    ///
    /// The lock is held only to pick the candidates (unread for `shortest`)
    /// and to remove them; their limits are worked out between the two, and
    /// an entry read meanwhile stays. Memory changes at once; the index
    /// next, entries before their files (as eviction does), with the
    /// counters `cache stats` shows.
    pub async fn remove_unused(
        &self,
        now: u64,
        shortest: std::time::Duration,
        limit_for: &(dyn Fn(&str, &str) -> Option<std::time::Duration> + Sync),
        global: Option<std::time::Duration>,
    ) -> Result<retention::Removed, CacheError> {
        type Candidate = (Digest, u64, Vec<(String, String)>);
        let candidates: Vec<Candidate> = {
            let state = self.lock();
            state
                .content
                .iter()
                .filter(|(_, e)| retention::is_unused(e.last_used, now, shortest))
                .map(|(d, e)| {
                    let places = state.links.get(d).into_iter().flatten().cloned().collect();
                    (d.clone(), e.last_used, places)
                })
                .collect()
        };
        let mut limits: HashMap<(String, String), Option<std::time::Duration>> = HashMap::new();
        let expired: Vec<(Digest, u64)> = candidates
            .into_iter()
            .filter(|(_, last_used, places)| {
                for place in places {
                    limits
                        .entry(place.clone())
                        .or_insert_with(|| limit_for(&place.0, &place.1));
                }
                let limit_of_place = |r: &str, p: &str| {
                    limits
                        .get(&(r.to_string(), p.to_string()))
                        .copied()
                        .flatten()
                };
                let places = places.iter().map(|(r, p)| (r.as_str(), p.as_str()));
                retention::limit_of(places, &limit_of_place, global)
                    .is_some_and(|limit| retention::is_unused(*last_used, now, limit))
            })
            .map(|(d, last_used, _)| (d, last_used))
            .collect();
        let (victims, tags, removed) = {
            let mut state = self.lock();
            let mut removed = retention::Removed::default();
            let mut victims = Vec::new();
            for (digest, last_used) in expired {
                let idle = state
                    .content
                    .peek(&digest)
                    .is_some_and(|e| e.last_used == last_used && Arc::strong_count(&e.lease) == 1);
                if !idle {
                    continue;
                }
                if let Some(e) = state.content.pop(&digest) {
                    state.total -= e.size;
                    state.touched.remove(&digest);
                    removed.entries += 1;
                    removed.bytes += e.size;
                    victims.push(digest);
                }
            }
            let State { content, tags, .. } = &*state;
            let gone: Vec<String> = tags
                .iter()
                .filter(|(_, t)| {
                    t.digest
                        .parse::<Digest>()
                        .map_or(true, |d| !content.contains(&d))
                })
                .map(|(k, _)| k.clone())
                .collect();
            for key in &gone {
                state.tags.remove(key);
            }
            removed.tags = gone.len() as u64;
            let total = &mut state.unused;
            total.entries += removed.entries;
            total.bytes += removed.bytes;
            total.tags += removed.tags;
            (victims, gone, removed)
        };
        if removed.is_empty() {
            return Ok(removed);
        }
        let mut changes: Vec<Change> = victims
            .iter()
            .map(|d| Change::RemoveContent(d.to_string()))
            .chain(tags.into_iter().map(Change::RemoveTag))
            .collect();
        let [entries, bytes, tags] = retention::COUNTERS;
        for (name, n) in [
            (entries, removed.entries),
            (bytes, removed.bytes),
            (tags, removed.tags),
        ] {
            if n > 0 {
                changes.push(Change::Count(name, n));
            }
        }
        self.persist(changes).await?;
        let paths = victims.iter().map(|d| self.content_path(d)).collect();
        self.remove_files(paths).await;
        Ok(removed)
    }

    /// `cache rm` on the running cache: decided by
    /// [`offline::plan_remove`] on the memory, under its lock, which is
    /// changed at once (the next request misses), then written through to
    /// the index and the content file removed.
    pub async fn remove(&self, target: &str) -> Result<offline::Removal, offline::RemoveError> {
        let removal = {
            let mut state = self.lock();
            let removal = offline::plan_remove(&*state, target)?;
            if let Some(key) = &removal.tag {
                state.tags.remove(key);
            }
            if let Some(d) = &removal.content {
                if let Some(e) = state.content.pop(d) {
                    state.total -= e.size;
                }
                state.touched.remove(d);
            }
            let linked = removal.content.clone().or_else(|| {
                let (_, _, d) = parse_link_key(removal.links.first()?)?;
                Some(d)
            });
            if let Some(places) = linked.and_then(|d| state.links.remove(&d)) {
                state.link_count -= places.len() as u64;
            }
            removal
        };
        self.persist(removal.changes()).await?;
        if let Some(d) = &removal.content {
            self.remove_files(vec![self.content_path(d)]).await;
        }
        Ok(removal)
    }

    /// `cache purge` on the running cache: forgets every entry, link, tag,
    /// counter and openness finding, in memory at once and in the index,
    /// then removes the content files. Downloads in progress go on and are
    /// stored when complete. Returns the entries and bytes removed.
    pub async fn purge(&self) -> Result<(u64, u64), CacheError> {
        let (paths, bytes) = {
            let mut state = self.lock();
            let paths: Vec<PathBuf> = state
                .content
                .iter()
                .map(|(d, _)| self.content_path(d))
                .collect();
            let bytes = state.total;
            state.content.clear();
            state.total = 0;
            state.links.clear();
            state.link_count = 0;
            state.tags.clear();
            state.touched.clear();
            state.hits = 0;
            state.misses = 0;
            state.flushed_hits = 0;
            state.flushed_misses = 0;
            state.openness.clear();
            state.unused = retention::Removed::default();
            (paths, bytes)
        };
        let entries = paths.len() as u64;
        self.persist(vec![Change::Clear]).await?;
        self.remove_files(paths).await;
        Ok((entries, bytes))
    }

    /// The index as it is now (access times and counters flushed first),
    /// for `cache ls` on the running cache ([`offline::list`]).
    pub async fn snapshot(&self) -> Result<index::Snapshot, CacheError> {
        self.flush().await?;
        let index = self.index.clone();
        blocking(move || index.load().map_err(CacheError::from)).await
    }

    /// Removes files off the async threads; one already gone is fine.
    async fn remove_files(&self, paths: Vec<PathBuf>) {
        let _ = blocking(move || {
            for p in paths {
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(path = %p.display(), error = %e, "cannot remove cache file")
                    }
                }
            }
            Ok(())
        })
        .await;
    }

    async fn persist(&self, changes: Vec<Change>) -> Result<(), CacheError> {
        if changes.is_empty() {
            return Ok(());
        }
        let index = self.index.clone();
        blocking(move || index.apply(&changes).map_err(CacheError::from)).await
    }
}

/// The cache's gauges, read when `/metrics` is scraped: one short lock and
/// a walk over the entries (a hash-table iteration, no I/O).
impl crate::metrics::CacheGauges for Cache {
    fn snapshot(&self) -> crate::metrics::CacheSnapshot {
        let fills_in_progress = self.fills.len() as u64;
        let state = self.lock();
        let manifests = state
            .content
            .iter()
            .filter(|(_, e)| crate::registry::media::is_manifest(&e.media_type))
            .count() as u64;
        crate::metrics::CacheSnapshot {
            size_bytes: state.total,
            capacity_bytes: self.cap,
            manifests,
            blobs: (state.content.len() as u64).saturating_sub(manifests),
            fills_in_progress,
        }
    }
}

impl offline::Contents for State {
    fn tag_digest(&self, key: &str) -> Option<String> {
        self.tags.get(key).map(|t| t.digest.clone())
    }

    fn has_content(&self, digest: &Digest) -> bool {
        self.content.contains(digest)
    }

    fn links_of(&self, digest: &Digest) -> Vec<String> {
        self.links
            .get(digest)
            .map(|places| places.iter().map(|(r, p)| link_key(r, p, digest)).collect())
            .unwrap_or_default()
    }
}

/// The entries of a directory (none if it does not exist).
fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, CacheError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries.filter_map(|e| e.ok().map(|e| e.path())).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(CacheError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Removes least recently used entries without readers until `total <= budget`.
fn evict(state: &mut State, budget: u64) -> Vec<Digest> {
    let mut victims = Vec::new();
    if state.total <= budget {
        return victims;
    }
    let mut need = state.total - budget;
    let candidates: Vec<(Digest, u64)> = state
        .content
        .iter()
        .rev()
        .filter(|(_, e)| Arc::strong_count(&e.lease) == 1)
        .map(|(d, e)| (d.clone(), e.size))
        .take_while(|(_, size)| {
            let go = need > 0;
            need = need.saturating_sub(*size);
            go
        })
        .collect();
    for (digest, size) in candidates {
        state.content.pop(&digest);
        state.total -= size;
        state.touched.remove(&digest);
        victims.push(digest);
    }
    crate::metrics::get().evicted(victims.len() as u64);
    victims
}

/// Runs blocking file or index work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CacheError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn unused_entries_go_after_their_limit_and_used_or_read_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 20).unwrap();
        let store = |name: &'static [u8], repo: &'static str| {
            let cache = cache.clone();
            async move {
                let d = Digest::of(name);
                let media = if name.starts_with(b"m") {
                    "application/vnd.oci.image.manifest.v1+json"
                } else {
                    ""
                };
                cache
                    .store_bytes(&d, bytes::Bytes::from_static(name), media)
                    .await
                    .unwrap();
                cache
                    .link("docker.io", repo, std::slice::from_ref(&d))
                    .await
                    .unwrap();
                d
            }
        };
        let old_manifest = store(b"m-old", "library/old").await;
        let old_blob = store(b"old blob", "library/old").await;
        let used = store(b"used blob", "library/used").await;
        let patient = store(b"patient blob", "acme/tool").await;
        let held = store(b"held blob", "library/old").await;
        let tag = |digest: &Digest| TagRecord {
            digest: digest.to_string(),
            fetched_at_ms: 1,
        };
        cache
            .set_tag("docker.io", "library/old", "1", tag(&old_manifest))
            .await
            .unwrap();
        let start = unix_secs();
        let day = Duration::from_secs(86_400);
        // acme/tool's rule keeps it 90 days; everything else 30 (global).
        let rules = |_: &str, repo: &str| (repo == "acme/tool").then_some(90 * day);
        let pass = |now: u64| {
            let cache = cache.clone();
            async move {
                cache
                    .remove_unused(now, 30 * day, &rules, Some(30 * day))
                    .await
                    .unwrap()
            }
        };

        // Twenty days on: nothing has gone unread for 30.
        assert!(pass(start + 20 * 86_400).await.is_empty());
        // Read `used` on day 20 (the clock of the test), hold `held`.
        cache.lock().content.get_mut(&used).unwrap().last_used = start + 20 * 86_400;
        let reader = cache.get(&held).unwrap();

        // Day 31: the unread old image goes, with its tag; the rest stays.
        let removed = pass(start + 31 * 86_400).await;
        let old_bytes = (b"m-old".len() + b"old blob".len()) as u64;
        assert_eq!(
            removed,
            retention::Removed {
                entries: 2,
                bytes: old_bytes,
                tags: 1
            }
        );
        for (d, kept) in [
            (&old_manifest, false),
            (&old_blob, false),
            (&used, true),
            (&patient, true),
            (&held, true),
        ] {
            assert_eq!(cache.contains(d), kept, "{d} in memory");
            assert_eq!(cache.content_path(d).exists(), kept, "{d} on disk");
        }
        assert!(cache.tag("docker.io", "library/old", "1").is_none());
        drop(reader);

        // Day 91: `used` (read on day 20) and the released `held` are past
        // 30 days; acme/tool's blob is past its 90.
        let removed = pass(start + 91 * 86_400).await;
        assert_eq!(removed.entries, 3);
        assert_eq!(cache.stats().entries, 0);
        let total = cache.stats().unused;
        assert_eq!((total.entries, total.tags), (5, 1));

        // The totals survive a restart (they are index counters).
        drop(cache);
        let again = Cache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(again.stats().unused, total);
        assert_eq!(again.stats().entries, 0);
    }

    #[tokio::test]
    async fn remove_and_purge_change_the_running_cache_and_its_index_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 20).unwrap();
        let manifest = Digest::of(b"manifest");
        let blob = Digest::of(b"blob");
        for (d, bytes, media) in [
            (
                &manifest,
                &b"manifest"[..],
                "application/vnd.oci.image.manifest.v1+json",
            ),
            (&blob, &b"blob"[..], ""),
        ] {
            cache
                .store_bytes(d, bytes::Bytes::copy_from_slice(bytes), media)
                .await
                .unwrap();
            cache
                .link("docker.io", "library/alpine", std::slice::from_ref(d))
                .await
                .unwrap();
        }
        let record = TagRecord {
            digest: manifest.to_string(),
            fetched_at_ms: 1,
        };
        cache
            .set_tag("docker.io", "library/alpine", "3.20", record)
            .await
            .unwrap();
        assert_eq!(cache.stats().links, 2);

        // By tag: the tag, its manifest and the manifest's links, at once.
        let removed = cache.remove("alpine:3.20").await.unwrap();
        assert_eq!(
            removed.lines(),
            [
                "tag docker.io/library/alpine:3.20".to_string(),
                format!("content {manifest}")
            ]
        );
        assert!(cache.get(&manifest).is_none());
        assert!(cache.tag("docker.io", "library/alpine", "3.20").is_none());
        assert!(!cache.is_linked("docker.io", "library/alpine", &manifest));
        assert!(!content_file(dir.path(), &manifest).exists());
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.tags, stats.links), (1, 0, 1));
        let snap = cache.snapshot().await.unwrap();
        assert_eq!(offline::stats(&snap), stats.clone().into());

        assert!(matches!(
            cache.remove("alpine:3.20").await,
            Err(offline::RemoveError::NotCached(_))
        ));
        assert!(matches!(
            cache.remove("Not A Ref!").await,
            Err(offline::RemoveError::BadTarget(_))
        ));

        cache.count(true);
        assert_eq!(cache.purge().await.unwrap(), (1, 4));
        assert!(cache.get(&blob).is_none());
        assert!(!content_file(dir.path(), &blob).exists());
        assert_eq!(cache.stats(), Stats::default());
        let snap = cache.snapshot().await.unwrap();
        assert_eq!(offline::stats(&snap), offline::CacheStats::default());
        // Stored again after a purge, as any pull would.
        cache
            .store_bytes(&blob, bytes::Bytes::from_static(b"blob"), "")
            .await
            .unwrap();
        assert_eq!(cache.stats().entries, 1);
    }

    #[test]
    fn link_keys_read_back_whatever_the_registry_scheme() {
        let d = Digest::of(b"x");
        for (registry, repo) in [
            ("docker.io", "library/alpine"),
            ("localhost:5000", "team/app"),
            ("http://reg.test:5000", "team/app"),
            ("http://[::1]:80", "a/b/c"),
        ] {
            let key = link_key(registry, repo, &d);
            assert_eq!(
                parse_link_key(&key),
                Some((registry.to_string(), repo.to_string(), d.clone())),
                "{key}"
            );
        }
        assert_eq!(split_registry("http://reg.test"), None);
        assert_eq!(parse_link_key("no-slash@sha256:00"), None);
    }

    #[tokio::test]
    async fn openness_learnt_over_plain_http_makes_nothing_public_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 20).unwrap();
        let d = put(&cache, b"layer").await;
        let insecure = "http://plain.test:80";
        cache
            .link(insecure, "library/app", std::slice::from_ref(&d))
            .await
            .unwrap();
        cache
            .set_openness(insecure, "library/app", true, 1)
            .await
            .unwrap();
        let elsewhere = cache.link_facts("plain.test", "library/app", &d, 0);
        assert!(!elsewhere.public_somewhere && !elsewhere.linked_in_registry);
        let there = cache.link_facts(insecure, "library/other", &d, 0);
        assert!(there.public_somewhere && there.linked_in_registry);
        cache
            .link("docker.io", "library/app", std::slice::from_ref(&d))
            .await
            .unwrap();
        cache
            .set_openness("docker.io", "library/app", true, 1)
            .await
            .unwrap();
        assert!(cache.link_facts("ghcr.io", "x/y", &d, 0).public_somewhere);
    }

    #[tokio::test]
    async fn a_repository_counts_as_public_somewhere_only_since_the_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 20).unwrap();
        let d = put(&cache, b"layer").await;
        cache
            .link("docker.io", "library/once-open", std::slice::from_ref(&d))
            .await
            .unwrap();
        cache
            .set_openness("docker.io", "library/once-open", true, 5_000)
            .await
            .unwrap();
        let public_since = |since| {
            cache
                .link_facts("docker.io", "attacker/pub", &d, since)
                .public_somewhere
        };
        assert!(public_since(0), "offline: the last finding, however old");
        assert!(
            public_since(4_999) && public_since(5_000),
            "found public since"
        );
        assert!(
            !public_since(5_001),
            "found public before the threshold: stale"
        );
        // Stale or not, the link to this registry still asks for a confirmation.
        let stale = cache.link_facts("docker.io", "attacker/pub", &d, 5_001);
        assert!(stale.linked_in_registry && !stale.linked_here);
        // Found private since: never public somewhere.
        cache
            .set_openness("docker.io", "library/once-open", false, 6_000)
            .await
            .unwrap();
        assert!(!public_since(0) && !public_since(6_000));
    }

    async fn put(cache: &Cache, content: &[u8]) -> Digest {
        let digest = Digest::of(content);
        cache
            .store_bytes(&digest, bytes::Bytes::copy_from_slice(content), "")
            .await
            .unwrap();
        digest
    }

    #[tokio::test]
    async fn evicts_least_recently_used_but_never_a_held_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 3000).unwrap();
        let a = put(&cache, &[1; 1000]).await;
        let b = put(&cache, &[2; 1000]).await;
        let c = put(&cache, &[3; 1000]).await;
        let held_a = cache.get(&a).unwrap(); // a: most recent, and in use
        let d = put(&cache, &[4; 1000]).await;
        assert!(cache.contains(&a) && cache.contains(&c) && cache.contains(&d));
        assert!(!cache.contains(&b), "b was least recently used");
        assert!(!cache.content_path(&b).exists(), "its file is gone");
        // Now a is least recently used, but held: c goes instead.
        put(&cache, &[5; 1000]).await;
        assert!(cache.contains(&a), "a held entry survives eviction");
        assert!(!cache.contains(&c));
        drop(held_a);
        assert!(cache.stats().bytes <= 3000);
    }

    #[test]
    fn admission_counts_what_is_read_held_and_promised_and_evicts_nothing() {
        use NoRoom::*;
        /// (cap, total, evictable, reserved, promised, len) -> Ok or why not.
        type Case = ((u64, u64, u64, u64, u64, u64), Result<(), NoRoom>);
        #[rustfmt::skip]
        let cases: &[Case] = &[
            // A full cache of unread entries admits the whole cap.
            ((100, 100, 100, 0, 0, 100), Ok(())),
            ((100, 0, 0, 0, 0, 100), Ok(())),
            ((100, 0, 0, 0, 0, 101), Err(TooLarge { want: 101, cap: 100 })),
            // Entries being read are not room.
            ((100, 100, 40, 0, 0, 41), Err(Busy { want: 41, free: 40 })),
            ((100, 100, 40, 0, 0, 40), Ok(())),
            // Nor is what other fills hold or were promised.
            ((100, 50, 50, 30, 20, 50), Ok(())),
            ((100, 50, 50, 30, 20, 51), Err(Busy { want: 51, free: 50 })),
            ((100, 0, 0, 0, 100, 1), Err(Busy { want: 1, free: 0 })),
            ((100, 0, 0, 0, 0, 0), Ok(())),
        ];
        for ((cap, total, evictable, reserved, promised, len), expected) in cases {
            let room = Room {
                cap: *cap,
                total: *total,
                evictable: *evictable,
                reserved: *reserved,
                promised: *promised,
            };
            assert_eq!(&plan_admit(room, *len), expected, "{room:?} len {len}");
        }
    }

    #[test]
    fn growing_evicts_only_for_the_bytes_held_and_never_past_the_cap() {
        use NoRoom::*;
        /// ((cap, total, evictable, reserved, promised), held, limit, to) -> bytes to evict, or why not.
        type Case = (
            (u64, u64, u64, u64, u64),
            u64,
            Option<u64>,
            u64,
            Result<u64, NoRoom>,
        );
        #[rustfmt::skip]
        let cases: &[Case] = &[
            // Full of unread entries; a fill admitted for 100 (all promised)
            // evicts only what it grows into.
            ((100, 100, 100, 0, 100), 0, Some(100), 10, Ok(10)),
            ((100, 90, 90, 10, 90), 10, Some(100), 30, Ok(20)),
            ((100, 70, 70, 30, 70), 30, Some(100), 100, Ok(70)),
            // Already held: nothing to do.
            ((100, 100, 100, 10, 90), 10, Some(100), 10, Ok(0)),
            // Room to spare: nothing evicted.
            ((100, 20, 20, 0, 50), 0, Some(50), 50, Ok(0)),
            // Without a length: grows while entries can go, never past the cap.
            ((100, 100, 100, 0, 0), 0, None, 60, Ok(60)),
            ((100, 40, 40, 60, 0), 60, None, 100, Ok(40)),
            ((100, 0, 0, 100, 0), 100, None, 101, Err(TooLarge { want: 101, cap: 100 })),
            // Entries being read stay, and so does what is promised to others.
            ((100, 100, 50, 0, 0), 0, None, 60, Err(Busy { want: 60, free: 50 })),
            ((100, 0, 0, 0, 70), 0, None, 40, Err(Busy { want: 40, free: 30 })),
            ((100, 0, 0, 0, 70), 0, None, 30, Ok(0)),
            // Its own promise is its own: 60 promised to it, 40 to another.
            ((100, 0, 0, 0, 100), 0, Some(60), 60, Ok(0)),
            ((100, 50, 50, 0, 100), 0, Some(60), 60, Ok(10)),
        ];
        for ((cap, total, evictable, reserved, promised), held, limit, to, expected) in cases {
            let room = Room {
                cap: *cap,
                total: *total,
                evictable: *evictable,
                reserved: *reserved,
                promised: *promised,
            };
            assert_eq!(
                &plan_grow(room, *held, *limit, *to),
                expected,
                "{room:?} held {held} limit {limit:?} to {to}"
            );
        }
    }

    #[test]
    fn steps_run_ahead_of_the_bytes_within_the_length_and_the_cap() {
        const GIB: u64 = 1 << 30;
        // A big cache: ROOM_STEP ahead, clamped to the announced length.
        assert_eq!(step_target(0, 1, None, 100 * GIB), ROOM_STEP);
        assert_eq!(
            step_target(ROOM_STEP, ROOM_STEP + 1, None, 100 * GIB),
            2 * ROOM_STEP
        );
        assert_eq!(step_target(0, 1, Some(1000), 100 * GIB), 1000);
        // A batch bigger than a step is covered whole.
        assert_eq!(
            step_target(0, 3 * ROOM_STEP, None, 100 * GIB),
            3 * ROOM_STEP
        );
        // A small cache: a sixteenth of it, never past it.
        assert_eq!(step_target(0, 1, None, 1600), 100);
        assert_eq!(step_target(1550, 1560, None, 1600), 1600);
        // Past the cap, the need itself (which then fails to grow).
        assert_eq!(step_target(1600, 1700, None, 1600), 1700);
    }

    #[tokio::test]
    async fn admission_evicts_nothing_and_growth_evicts_as_bytes_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 3000).unwrap();
        let a = put(&cache, &[1; 1000]).await;
        let b = put(&cache, &[2; 1000]).await;
        let c = put(&cache, &[3; 1000]).await;
        let held_b = cache.get(&b).unwrap();
        let within_cap = |c: &Cache| c.stats().bytes + c.reserved() <= 3000;

        // Admitted for what the unread entries could make room for; nothing
        // goes yet, and what is read or promised is no room for others.
        assert!(matches!(cache.admit(Some(2001)), Err(NoRoom::Busy { .. })));
        assert!(matches!(
            cache.admit(Some(3001)),
            Err(NoRoom::TooLarge { .. })
        ));
        let mut r1 = cache.admit(Some(2000)).unwrap();
        assert_eq!((cache.reserved(), cache.promised()), (0, 2000));
        assert!(matches!(cache.admit(Some(1)), Err(NoRoom::Busy { .. })));
        assert_eq!(cache.stats().bytes, 3000, "admission evicted nothing");

        // Its bytes arrive: the least recently used unread entry goes, only then.
        r1.grow(500).await.unwrap();
        assert!(within_cap(&cache));
        assert!(!cache.contains(&a) && !cache.content_path(&a).exists());
        assert!(cache.contains(&b) && cache.contains(&c));
        assert_eq!((cache.reserved(), cache.promised()), (500, 1500));
        r1.grow(2000).await.unwrap();
        assert!(within_cap(&cache));
        assert!(cache.contains(&b), "never evicted under a reader");
        assert!(!cache.contains(&c));
        assert_eq!((cache.reserved(), cache.promised()), (2000, 0));

        // A fill without a length grows while there is room, never past the cap.
        let mut r2 = cache.admit(None).unwrap();
        assert!(matches!(r2.grow(1).await, Err(NoRoom::Busy { .. })));
        assert_eq!(r2.bytes(), 0);
        drop(held_b);
        r2.grow(1000).await.unwrap();
        assert!(!cache.contains(&b) && within_cap(&cache));
        assert!(matches!(r2.cover(1001).await, Err(NoRoom::Busy { .. })));
        assert!(matches!(r2.grow(3001).await, Err(NoRoom::TooLarge { .. })));
        assert_eq!(cache.reserved(), 3000);

        // A failed fill releases its room; a committed one becomes the entry
        // (a reservation grown ahead of its bytes gives the rest back).
        drop(r2);
        assert_eq!(cache.reserved(), 2000);
        let d = Digest::of(&[4; 1500]);
        let temp = cache.temp_path(&d);
        std::fs::write(&temp, [4; 1500]).unwrap();
        cache
            .commit_reserved(&temp, &d, 1500, "", Some(r1), None)
            .await
            .unwrap();
        assert_eq!((cache.reserved(), cache.promised()), (0, 0));
        assert_eq!(cache.stats().bytes, 1500);
        assert!(cache.contains(&d));

        // Promised but not held: released when dropped, nothing evicted.
        let r3 = cache.admit(Some(3000)).unwrap();
        assert_eq!(cache.promised(), 3000);
        drop(r3);
        assert_eq!((cache.reserved(), cache.promised()), (0, 0));
        assert!(cache.contains(&d));
    }

    #[tokio::test]
    async fn covering_steps_ahead_and_falls_back_to_the_bytes_needed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1600).unwrap();
        let mut r = cache.admit(None).unwrap();
        r.cover(10).await.unwrap();
        assert_eq!(r.bytes(), 100, "a step (a sixteenth of a small cache)");
        r.cover(100).await.unwrap();
        assert_eq!(r.bytes(), 100, "covered already: no step");
        // Another fill was promised 1000, which leaves 600 for this one.
        let _other = cache.admit(Some(1000)).unwrap();
        r.cover(550).await.unwrap();
        assert_eq!(r.bytes(), 550, "a batch bigger than a step: covered whole");
        // The step (to 650) does not fit; the bytes needed do.
        r.cover(560).await.unwrap();
        assert_eq!(r.bytes(), 560);
        r.cover(600).await.unwrap();
        assert_eq!(r.bytes(), 600);
        assert!(matches!(r.cover(601).await, Err(NoRoom::Busy { .. })));
        assert_eq!(cache.reserved(), 600);
    }

    #[tokio::test]
    async fn a_failed_fill_releases_its_reservation() {
        use http_body_util::StreamBody;
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 3000).unwrap();
        let digest = Digest::of(&[7; 2000]);
        let fill::Role::Leader(leader) = cache.join_fill(&digest) else {
            panic!("nobody else fills");
        };
        let reservation = cache.admit(Some(2000)).unwrap();
        assert_eq!(cache.promised(), 2000);
        let frames: Vec<Result<http_body::Frame<bytes::Bytes>, crate::http::body::BoxError>> = vec![
            Ok(http_body::Frame::data(bytes::Bytes::from_static(&[7; 500]))),
            Err("upstream cut".into()),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let fill = leader
            .start(body, Some(2000), String::new(), reservation)
            .await
            .unwrap();
        let mut rx = fill.watch();
        let phase = rx
            .wait_for(|p| matches!(p.phase, fill::Phase::Failed(_)))
            .await
            .unwrap()
            .phase
            .clone();
        assert!(matches!(phase, fill::Phase::Failed(_)));
        assert_eq!(
            (cache.reserved(), cache.promised()),
            (0, 0),
            "released when the fill failed"
        );
        assert!(!cache.contains(&digest));
    }

    #[tokio::test]
    async fn a_verified_download_ends_for_its_readers_before_its_entry_is_committed() {
        use http_body_util::{BodyExt, StreamBody};
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 20).unwrap();
        let content = [5u8; 3000];
        let digest = Digest::of(&content);
        let fill::Role::Leader(leader) = cache.join_fill(&digest) else {
            panic!("nobody else fills");
        };
        let frames: Vec<Result<http_body::Frame<bytes::Bytes>, crate::http::body::BoxError>> =
            content
                .chunks(1000)
                .map(|c| Ok(http_body::Frame::data(bytes::Bytes::copy_from_slice(c))))
                .collect();
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let room = cache.admit(Some(3000)).unwrap();
        // Commits wait while this is held.
        let gate = cache.commit_gate.write().await;
        let fill = leader
            .start(body, Some(3000), String::new(), room)
            .await
            .unwrap();
        let file = fill.file().unwrap();
        let whole = read::growing(fill.clone(), file, 0, 3000);
        let got = tokio::time::timeout(Duration::from_secs(5), whole.collect())
            .await
            .expect("the last byte goes once the bytes matched, before the commit")
            .unwrap()
            .to_bytes();
        assert_eq!(&got[..], &content[..]);
        assert!(fill.committing() && !cache.contains(&digest));
        assert!(cache.fills.is_empty(), "its bytes are no longer arriving");
        // A request arriving now waits for the entry, and so does shutdown.
        let waiting = {
            let cache = cache.clone();
            let digest = digest.clone();
            tokio::spawn(async move { cache.committed(&digest).await })
        };
        let settling = {
            let cache = cache.clone();
            tokio::spawn(async move { cache.commits_settled().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished() && !settling.is_finished());
        drop(gate);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("committed returns once the entry is in")
            .unwrap();
        assert!(cache.contains(&digest), "committed: the entry is there");
        tokio::time::timeout(Duration::from_secs(5), settling)
            .await
            .expect("no commit pending")
            .unwrap();
        assert!(!fill.committing());
    }

    /// Readers racing the end of a download (the bytes arriving, matching and
    /// being committed while they poll) each get every byte: none ends its
    /// body early because the download finished between two looks at it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn readers_racing_the_end_of_a_download_get_every_byte() {
        use http_body_util::{BodyExt, StreamBody};
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 30).unwrap();
        for round in 0..3000u32 {
            let mut content: Vec<u8> = (0..1500u32).map(|i| (i ^ round) as u8).collect();
            content.extend_from_slice(&round.to_le_bytes());
            let len = content.len() as u64;
            let digest = Digest::of(&content);
            let fill::Role::Leader(leader) = cache.join_fill(&digest) else {
                panic!("nobody else fills");
            };
            let (tx, rx) = tokio::sync::mpsc::channel::<
                Result<http_body::Frame<bytes::Bytes>, crate::http::body::BoxError>,
            >(4);
            let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|frame| (frame, rx))
            });
            let body = StreamBody::new(Box::pin(frames));
            let room = cache.admit(Some(len)).unwrap();
            let fill = leader
                .start(body, Some(len), String::new(), room)
                .await
                .unwrap();
            let file = fill.file().unwrap();
            let readers: Vec<_> = (0..32)
                .map(|_| {
                    let whole = read::growing(fill.clone(), file.clone(), 0, len);
                    tokio::spawn(async move { whole.collect().await.map(|c| c.to_bytes()) })
                })
                .collect();
            // Two frames: readers wake on the first, and the end (the last
            // byte released, the digest matched) comes while they read.
            let half = content.len() / 2;
            for part in [&content[..half], &content[half..]] {
                let frame = http_body::Frame::data(bytes::Bytes::copy_from_slice(part));
                tx.send(Ok(frame)).await.unwrap();
                tokio::task::yield_now().await;
            }
            drop(tx);
            for reader in readers {
                let got = tokio::time::timeout(Duration::from_secs(10), reader)
                    .await
                    .expect("the body ends")
                    .unwrap()
                    .expect("no error");
                assert_eq!(got.len(), content.len(), "round {round}: every byte");
                assert_eq!(&got[..], &content[..], "round {round}");
            }
        }
    }

    /// Starts a fill of 2000 bytes of `byte` and waits until its bytes
    /// matched; with the commit gate held by the caller it stays committing.
    async fn committing_fill(cache: &Arc<Cache>, byte: u8) -> Arc<fill::Fill> {
        use http_body_util::StreamBody;
        let content = [byte; 2000];
        let fill::Role::Leader(leader) = cache.join_fill(&Digest::of(&content)) else {
            panic!("nobody else fills");
        };
        let frames: Vec<Result<http_body::Frame<bytes::Bytes>, crate::http::body::BoxError>> =
            vec![Ok(http_body::Frame::data(bytes::Bytes::copy_from_slice(
                &content,
            )))];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let room = cache.admit(Some(2000)).unwrap();
        let fill = leader
            .start(body, Some(2000), String::new(), room)
            .await
            .unwrap();
        fill.watch().wait_for(|p| p.verified).await.unwrap();
        fill
    }

    #[tokio::test]
    async fn admission_waits_for_room_held_by_a_download_being_committed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 3000).unwrap();
        let gate = cache.commit_gate.write().await;
        let held = committing_fill(&cache, 6).await;
        // Its 2000 bytes are held while it commits: 2000 more do not fit yet.
        assert!(matches!(cache.admit(Some(2000)), Err(NoRoom::Busy { .. })));
        let next = {
            let cache = cache.clone();
            tokio::spawn(async move { cache.admit_soon(Some(2000)).await.map(|r| r.promise()) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!next.is_finished(), "waits for the commit");
        drop(gate);
        let admitted = tokio::time::timeout(Duration::from_secs(5), next).await;
        assert!(matches!(admitted, Ok(Ok(Ok(2000)))), "{admitted:?}");
        assert!(
            cache.contains(&held.digest),
            "committed, and evicted only as bytes come"
        );
    }

    #[tokio::test]
    async fn growing_waits_for_room_held_by_a_download_being_committed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 3000).unwrap();
        let gate = cache.commit_gate.write().await;
        let held = committing_fill(&cache, 7).await;
        let mut room = cache.admit(None).unwrap();
        let growing = tokio::spawn(async move { room.cover(1500).await.map(|_| room.bytes()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!growing.is_finished(), "waits for the commit");
        drop(gate);
        let grown = tokio::time::timeout(Duration::from_secs(5), growing).await;
        assert!(matches!(grown, Ok(Ok(Ok(b))) if b >= 1500), "{grown:?}");
        assert!(
            !cache.contains(&held.digest),
            "the committed entry made the room"
        );
    }

    #[tokio::test]
    async fn a_fill_without_length_past_the_cap_fails_and_releases_its_room() {
        use http_body_util::StreamBody;
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 3000).unwrap();
        let kept = put(&cache, &[1; 1000]).await;
        let _reader = cache.get(&kept).unwrap();
        let content = [8u8; 2500];
        let digest = Digest::of(&content);
        let fill::Role::Leader(leader) = cache.join_fill(&digest) else {
            panic!("nobody else fills");
        };
        let frames: Vec<Result<http_body::Frame<bytes::Bytes>, crate::http::body::BoxError>> =
            content
                .chunks(500)
                .map(|c| Ok(http_body::Frame::data(bytes::Bytes::copy_from_slice(c))))
                .collect();
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let room = cache.admit(None).unwrap();
        let fill = leader.start(body, None, String::new(), room).await.unwrap();
        let mut rx = fill.watch();
        let phase = rx
            .wait_for(|p| matches!(p.phase, fill::Phase::Failed(_) | fill::Phase::Done))
            .await
            .unwrap()
            .phase
            .clone();
        let fill::Phase::Failed(why) = phase else {
            panic!("2500 bytes next to 1000 being read passed a cap of 3000: {phase:?}");
        };
        assert!(why.contains("no room"), "{why}");
        assert_eq!(cache.reserved(), 0);
        assert!(!cache.contains(&digest) && cache.contains(&kept));
    }

    #[tokio::test]
    async fn survives_reopening_and_sweeps_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let a = {
            let cache = Cache::open(dir.path(), 1 << 20).unwrap();
            let a = put(&cache, b"kept").await;
            cache
                .link("docker.io", "library/x", std::slice::from_ref(&a))
                .await
                .unwrap();
            a
        };
        // A file no entry names, as a crash after its rename would leave.
        let orphan = Digest::of(b"orphan");
        let path = content_file(dir.path(), &orphan);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"orphan").unwrap();
        std::fs::write(dir.path().join("tmp").join("partial"), b"half").unwrap();

        let started = SystemTime::now() + std::time::Duration::from_secs(1);
        let cache = Cache::open(dir.path(), 1 << 20).unwrap();
        assert!(cache.get(&a).is_some());
        assert!(cache.is_linked("docker.io", "library/x", &a));
        assert!(!cache.is_linked("docker.io", "library/y", &a));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert_eq!(cache.sweep_orphans(started).await.unwrap(), 1);
        assert!(!path.exists());
        assert!(cache.content_path(&a).exists());
    }
}
