//! `regcache cache stats|ls|rm|purge|verify`: the cache on disk, read and
//! changed by the command line while no regcache serves it.
//!
//! The index cannot be opened twice: [`open`] fails with
//! [`CacheError::InUse`] while a regcache serves the cache, and the command
//! line then asks that regcache through its admin API, which runs the same
//! decisions ([`stats`], [`list`], [`plan_remove`]) on the live cache.

use std::path::Path;

use super::index::{Change, ContentRow, Index, Snapshot, TagRow};
use super::{content_file, CacheError};
use crate::registry::digest::Digest;
use crate::registry::reference::ImageRef;

/// The file name of the index inside the cache directory.
pub const INDEX_FILE: &str = "index.redb";

/// Opens the index of the cache in `dir`, which must exist.
pub fn open(dir: &Path) -> Result<Index, CacheError> {
    let path = dir.join(INDEX_FILE);
    if !path.exists() {
        return Err(CacheError::Io {
            path,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no cache here (regcache has not run with this cache_dir)",
            ),
        });
    }
    Index::open(&path).map_err(|e| match e {
        redb::Error::DatabaseAlreadyOpen => CacheError::InUse(path.clone()),
        other => CacheError::Index(other),
    })
}

/// What `cache stats` reports: the index's totals and counters. The
/// command line shows it (`crate::cli::report`); the admin API sends it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    /// Content entries.
    pub entries: usize,
    /// Their bytes, as the index gives them.
    pub bytes: u64,
    /// Tags.
    pub tags: usize,
    /// Links.
    pub links: usize,
    /// Requests served from the cache.
    pub hits: u64,
    /// Requests that went upstream.
    pub misses: u64,
    /// Entries removed because nobody read them for `max_unused`.
    #[serde(default)]
    pub unused_entries: u64,
    /// Their bytes.
    #[serde(default)]
    pub unused_bytes: u64,
    /// Tags dropped with their manifest.
    #[serde(default)]
    pub unused_tags: u64,
}

impl CacheStats {
    /// Hits in percent of hits and misses; None before any request.
    pub fn hit_percent(&self) -> Option<f64> {
        let asked = self.hits + self.misses;
        (asked > 0).then(|| 100.0 * self.hits as f64 / asked as f64)
    }
}

impl From<super::Stats> for CacheStats {
    /// The numbers of a running cache.
    fn from(s: super::Stats) -> Self {
        Self {
            entries: s.entries as usize,
            bytes: s.bytes,
            tags: s.tags as usize,
            links: s.links as usize,
            hits: s.hits,
            misses: s.misses,
            unused_entries: s.unused.entries,
            unused_bytes: s.unused.bytes,
            unused_tags: s.unused.tags,
        }
    }
}

/// `cache stats`: the totals of the index in `snap`.
pub fn stats(snap: &Snapshot) -> CacheStats {
    CacheStats {
        entries: snap.content.len(),
        bytes: snap.content.iter().map(|r| r.size).sum(),
        tags: snap.tags.len(),
        links: snap.links.len(),
        hits: snap.counter("hits"),
        misses: snap.counter("misses"),
        unused_entries: snap.counter(super::retention::COUNTERS[0]),
        unused_bytes: snap.counter(super::retention::COUNTERS[1]),
        unused_tags: snap.counter(super::retention::COUNTERS[2]),
    }
}

/// What `cache ls` lists, in its order. The command line shows it
/// (`crate::cli::report`).
#[derive(Debug)]
pub struct Listing<'a> {
    /// The tags, by key.
    pub tags: Vec<&'a TagRow>,
    /// The content entries, the most recently used first.
    pub content: Vec<&'a ContentRow>,
}

/// `cache ls`: the tags and content entries of `snap`.
pub fn list(snap: &Snapshot) -> Listing<'_> {
    let mut tags: Vec<_> = snap.tags.iter().collect();
    tags.sort_by(|a, b| a.key.cmp(&b.key));
    let mut content: Vec<_> = snap.content.iter().collect();
    content.sort_by_key(|r| std::cmp::Reverse(r.last_access));
    Listing { tags, content }
}

/// Why `cache rm` removed nothing.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    /// The target is neither a digest nor an image reference with a tag.
    #[error("{0:?} is neither a digest nor an image reference")]
    BadTarget(String),
    /// Nothing of the target is cached.
    #[error("{0} is not cached")]
    NotCached(String),
    /// The index or a file could not be changed.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// What `cache rm` needs to know of a cache: the index on disk (a
/// [`Snapshot`]) or a running cache's memory.
pub trait Contents {
    /// The digest the tag `key` names, if the tag is cached.
    fn tag_digest(&self, key: &str) -> Option<String>;
    /// Whether content `digest` is cached.
    fn has_content(&self, digest: &Digest) -> bool;
    /// The link keys of `digest`.
    fn links_of(&self, digest: &Digest) -> Vec<String>;
}

impl Contents for Snapshot {
    fn tag_digest(&self, key: &str) -> Option<String> {
        self.tags
            .iter()
            .find(|t| t.key == key)
            .map(|t| t.digest.clone())
    }

    fn has_content(&self, digest: &Digest) -> bool {
        let text = digest.to_string();
        self.content.iter().any(|r| r.digest == text)
    }

    fn links_of(&self, digest: &Digest) -> Vec<String> {
        let suffix = format!("@{digest}");
        self.links
            .iter()
            .filter(|l| l.ends_with(&suffix))
            .cloned()
            .collect()
    }
}

/// What `cache rm` removes, decided before anything changes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removal {
    /// The tag key removed, if the target was an image tag.
    pub tag: Option<String>,
    /// The content removed (its file goes too).
    pub content: Option<Digest>,
    /// The link keys of that content, removed with it.
    pub links: Vec<String>,
}

impl Removal {
    /// The index changes that carry it out.
    pub fn changes(&self) -> Vec<Change> {
        let mut changes = Vec::new();
        if let Some(key) = &self.tag {
            changes.push(Change::RemoveTag(key.clone()));
        }
        if let Some(d) = &self.content {
            changes.push(Change::RemoveContent(d.to_string()));
        }
        changes.extend(self.links.iter().cloned().map(Change::RemoveLink));
        changes
    }

    /// What was removed, one `tag KEY` or `content DIGEST` line each.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(key) = &self.tag {
            lines.push(format!("tag {key}"));
        }
        if let Some(d) = &self.content {
            lines.push(format!("content {d}"));
        }
        lines
    }
}

/// `cache rm`, decided: a digest (its content and links) or an image tag
/// (the tag, its manifest and the manifest's links).
pub fn plan_remove(cache: &impl Contents, target: &str) -> Result<Removal, RemoveError> {
    let mut removal = Removal::default();
    let digest = match target.parse::<Digest>() {
        Ok(d) => Some(d),
        Err(_) => {
            let image = ImageRef::parse(target).ok();
            let (image, tag) = image
                .as_ref()
                .and_then(|image| Some((image, image.tag()?)))
                .ok_or_else(|| RemoveError::BadTarget(target.to_string()))?;
            let key = super::tag_key(&image.registry, image.repository.as_str(), tag);
            let digest = cache
                .tag_digest(&key)
                .ok_or_else(|| RemoveError::NotCached(key.clone()))?;
            removal.tag = Some(key);
            digest.parse::<Digest>().ok()
        }
    };
    if let Some(d) = digest {
        if cache.has_content(&d) {
            removal.content = Some(d.clone());
        }
        removal.links = cache.links_of(&d);
    }
    if removal.tag.is_none() && removal.content.is_none() && removal.links.is_empty() {
        return Err(RemoveError::NotCached(target.to_string()));
    }
    Ok(removal)
}

/// `cache rm` on the index in `dir`: removes a digest (content and links)
/// or an image tag (the tag and its manifest). Returns what was removed.
pub fn remove(
    dir: &Path,
    index: &Index,
    snap: &Snapshot,
    target: &str,
) -> Result<Removal, RemoveError> {
    let removal = plan_remove(snap, target)?;
    index.apply(&removal.changes()).map_err(CacheError::from)?;
    if let Some(d) = &removal.content {
        let _ = std::fs::remove_file(content_file(dir, d));
    }
    Ok(removal)
}

/// What `cache verify` found. The command line shows it
/// (`crate::cli::report`).
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Entries checked.
    pub checked: usize,
    /// Their bytes, as the index gives them.
    pub bytes: u64,
    /// Entries that did not match (digest, why), removed.
    pub damaged: Vec<(String, String)>,
}

/// Why the file of an entry does not hold its content, or None if it does:
/// missing, another length than the index says, or bytes that hash to
/// another digest. Streams the file; never holds it in memory.
pub fn check_file(dir: &Path, digest: &Digest, size: u64) -> Option<String> {
    let path = content_file(dir, digest);
    match std::fs::File::open(&path) {
        Ok(file) => check_content(file, &path, digest, size),
        Err(e) => Some(format!("cannot open {}: {e}", path.display())),
    }
}

/// [`check_file`] for a file already open (read from its current offset to
/// its end; `path` only names it in the answer). Blocking: run it on the
/// blocking pool.
pub fn check_content(
    mut file: impl std::io::Read,
    path: &Path,
    digest: &Digest,
    size: u64,
) -> Option<String> {
    let mut hasher = digest.hasher();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                len += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Some(format!("cannot read {}: {e}", path.display())),
        }
    }
    if len != size {
        return Some(format!("{len} bytes, the index says {size}"));
    }
    let actual = hasher.finish();
    (actual != *digest).then(|| format!("its bytes hash to {actual}"))
}

/// `cache verify`: hashes every entry's file against its digest; removes the
/// entries (index row and file) that do not match. Links and tags stay, so a
/// later pull fetches the content again.
pub fn verify(dir: &Path, index: &Index, snap: &Snapshot) -> Result<VerifyReport, CacheError> {
    let mut report = VerifyReport::default();
    let mut changes = Vec::new();
    let mut files = Vec::new();
    for row in &snap.content {
        report.checked += 1;
        report.bytes += row.size;
        let why = match row.digest.parse::<Digest>() {
            Ok(digest) => check_file(dir, &digest, row.size)
                .inspect(|_| files.push(content_file(dir, &digest))),
            Err(e) => Some(format!("not a digest: {e}")),
        };
        if let Some(why) = why {
            changes.push(Change::RemoveContent(row.digest.clone()));
            report.damaged.push((row.digest.clone(), why));
        }
    }
    if !changes.is_empty() {
        index.apply(&changes)?;
    }
    for f in files {
        let _ = std::fs::remove_file(f);
    }
    Ok(report)
}

/// `cache purge`: removes every entry, file and the index.
pub fn purge(dir: &Path) -> Result<(), CacheError> {
    // Opening first proves no regcache is using the cache.
    drop(open(dir)?);
    for sub in ["blobs", "tmp"] {
        let p = dir.join(sub);
        if p.exists() {
            std::fs::remove_dir_all(&p).map_err(|source| CacheError::Io {
                path: p.clone(),
                source,
            })?;
        }
    }
    let index = dir.join(INDEX_FILE);
    std::fs::remove_file(&index).map_err(|source| CacheError::Io {
        path: index,
        source,
    })
}
