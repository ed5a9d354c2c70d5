//! `regcache cache stats|ls|rm|purge|verify`: the cache on disk, read and
//! changed by the command line while no regcache serves it.
//!
//! The index cannot be opened twice, so these commands tell the operator to
//! stop a running regcache first rather than race it.

use std::path::Path;

use super::index::{Change, Index, Snapshot};
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

/// `cache stats`: one `name: value` line each.
pub fn stats(snap: &Snapshot) -> String {
    let bytes: u64 = snap.content.iter().map(|r| r.size).sum();
    let (hits, misses) = (snap.counter("hits"), snap.counter("misses"));
    let ratio = if hits + misses > 0 {
        format!("{:.1}%", 100.0 * hits as f64 / (hits + misses) as f64)
    } else {
        "unknown".to_string()
    };
    format!(
        "entries:    {}\nbytes:      {} ({})\ntags:       {}\nlinks:      {}\nhits:       {hits}\nmisses:     {misses}\nhit ratio:  {ratio}\n",
        snap.content.len(),
        bytes,
        bytesize::ByteSize::b(bytes).display().iec(),
        snap.tags.len(),
        snap.links.len(),
    )
}

/// `cache ls`: tags, then every content entry with its size and media type.
pub fn list(snap: &Snapshot) -> String {
    let mut out = String::new();
    let mut tags: Vec<_> = snap.tags.iter().collect();
    tags.sort_by(|a, b| a.key.cmp(&b.key));
    for t in tags {
        out += &format!("{}\t{}\n", t.key, t.digest);
    }
    let mut content: Vec<_> = snap.content.iter().collect();
    content.sort_by_key(|r| std::cmp::Reverse(r.last_access));
    for r in content {
        let kind = if r.media_type.is_empty() {
            "blob"
        } else {
            r.media_type.as_str()
        };
        out += &format!(
            "{}\t{}\t{}\n",
            r.digest,
            bytesize::ByteSize::b(r.size).display().iec(),
            kind
        );
    }
    out
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

/// What `cache verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Entries checked.
    pub checked: usize,
    /// Their bytes, as the index gives them.
    pub bytes: u64,
    /// Entries that did not match (digest, why), removed.
    pub damaged: Vec<(String, String)>,
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (digest, why) in &self.damaged {
            writeln!(f, "damaged\t{digest}\t{why}; removed")?;
        }
        writeln!(
            f,
            "checked {} entries ({}): {} damaged{}",
            self.checked,
            bytesize::ByteSize::b(self.bytes).display().iec(),
            self.damaged.len(),
            if self.damaged.is_empty() {
                ""
            } else {
                ", removed (the next pull fetches them again)"
            }
        )
    }
}

/// Why the file of an entry does not hold its content, or None if it does:
/// missing, another length than the index says, or bytes that hash to
/// another digest. Streams the file; never holds it in memory.
pub fn check_file(dir: &Path, digest: &Digest, size: u64) -> Option<String> {
    use std::io::Read;
    let path = content_file(dir, digest);
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => return Some(format!("cannot open {}: {e}", path.display())),
    };
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
