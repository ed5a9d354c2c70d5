//! `regcache cache stats|ls|rm|purge|verify`: the cache on disk, read and
//! changed by the command line while no regcache serves it.
//!
//! The index cannot be opened twice, so these commands tell the operator to
//! stop a running regcache first rather than race it.

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
        redb::Error::DatabaseAlreadyOpen => CacheError::Io {
            path: path.clone(),
            source: std::io::Error::other("a running regcache has this cache open; stop it first"),
        },
        other => CacheError::Index(other),
    })
}

/// What `cache stats` reports: the index's totals and counters. The
/// command line shows it (`crate::cli::report`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
}

impl CacheStats {
    /// Hits in percent of hits and misses; None before any request.
    pub fn hit_percent(&self) -> Option<f64> {
        let asked = self.hits + self.misses;
        (asked > 0).then(|| 100.0 * self.hits as f64 / asked as f64)
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

/// `cache rm`: removes a digest (content and links) or an image tag (the tag
/// and its manifest). Returns what was removed, one per line.
pub fn remove(
    dir: &Path,
    index: &Index,
    snap: &Snapshot,
    target: &str,
) -> Result<String, CacheError> {
    let mut changes = Vec::new();
    let mut files = Vec::new();
    let mut report = String::new();
    let digest = match target.parse::<Digest>() {
        Ok(d) => Some(d),
        Err(_) => {
            let image = ImageRef::parse(target).ok();
            let (image, tag) = image
                .as_ref()
                .and_then(|image| Some((image, image.tag()?)))
                .ok_or_else(|| {
                    CacheError::Task(format!(
                        "{target:?} is neither a digest nor an image reference"
                    ))
                })?;
            let key = super::tag_key(&image.registry, image.repository.as_str(), tag);
            let row = snap
                .tags
                .iter()
                .find(|t| t.key == key)
                .ok_or_else(|| CacheError::Task(format!("{key} is not cached")))?;
            changes.push(Change::RemoveTag(key.clone()));
            report += &format!("tag {key}\n");
            row.digest.parse::<Digest>().ok()
        }
    };
    if let Some(d) = digest {
        let text = d.to_string();
        if snap.content.iter().any(|r| r.digest == text) {
            changes.push(Change::RemoveContent(text.clone()));
            files.push(content_file(dir, &d));
            report += &format!("content {text}\n");
        }
        for link in snap
            .links
            .iter()
            .filter(|l| l.ends_with(&format!("@{text}")))
        {
            changes.push(Change::RemoveLink(link.clone()));
        }
    }
    if changes.is_empty() {
        return Err(CacheError::Task(format!("{target} is not cached")));
    }
    index.apply(&changes)?;
    for f in files {
        let _ = std::fs::remove_file(f);
    }
    Ok(report)
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
