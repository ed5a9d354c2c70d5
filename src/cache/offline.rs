//! `regcache cache stats|ls|rm|purge`: the cache on disk, read and changed
//! by the command line while no regcache serves it.
//!
//! The index cannot be opened twice, so these commands tell the operator to
//! stop a running regcache first rather than race it.

use std::path::Path;

use super::index::{Change, Index, Snapshot};
use super::{content_file, CacheError};
use crate::registry::digest::Digest;
use crate::registry::hosts::canonical_registry;

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

/// Expands a short image reference the way docker does: `alpine:3` is
/// `docker.io/library/alpine:3`. Returns (registry, repository, tag).
pub fn parse_image_ref(reference: &str) -> Option<(String, String, String)> {
    let (name, tag) = match reference.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, t),
        _ => (reference, "latest"),
    };
    let (registry, repo) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (canonical_registry(first), rest.to_string())
        }
        _ => ("docker.io".to_string(), name.to_string()),
    };
    let repo = if registry == "docker.io" && !repo.contains('/') {
        format!("library/{repo}")
    } else {
        repo
    };
    (!repo.is_empty() && !tag.is_empty()).then_some((registry, repo, tag.to_string()))
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
            let (registry, repo, tag) = parse_image_ref(target).ok_or_else(|| {
                CacheError::Task(format!(
                    "{target:?} is neither a digest nor an image reference"
                ))
            })?;
            let key = super::tag_key(&registry, &repo, &tag);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_references_expand_like_docker() {
        let p = |s| parse_image_ref(s).unwrap();
        assert_eq!(
            p("alpine:3.20"),
            ("docker.io".into(), "library/alpine".into(), "3.20".into())
        );
        assert_eq!(
            p("org/tool"),
            ("docker.io".into(), "org/tool".into(), "latest".into())
        );
        assert_eq!(
            p("ghcr.io/org/tool:1"),
            ("ghcr.io".into(), "org/tool".into(), "1".into())
        );
        assert_eq!(
            p("index.docker.io/library/x:2"),
            ("docker.io".into(), "library/x".into(), "2".into())
        );
        assert_eq!(
            p("localhost:5000/a:b"),
            ("localhost:5000".into(), "a".into(), "b".into())
        );
    }
}
