//! `regcache cache stats|ls|rm|purge|verify`: the cache on disk, read and
//! changed by the command line while no regcache serves it.
//!
//! The index cannot be opened twice, so these commands tell the operator to
//! stop a running regcache first rather than race it.

use std::path::Path;

use super::index::{Change, Index, Snapshot};
use super::{content_file, CacheError};
use crate::registry::digest::Digest;
use crate::registry::hosts::canonical_registry;
use crate::registry::name::RepoName;
use crate::registry::route::Reference;

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

/// An image in a registry, as the command line names it and as a bundle's
/// `io.regcache.ref` annotation records it: registry, repository, and a tag
/// or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The canonical registry name (`docker.io`, `ghcr.io`, `localhost:5000`).
    pub registry: String,
    /// The repository (`library/alpine`).
    pub repository: String,
    /// The tag or digest within the repository.
    pub reference: Reference,
}

impl ImageRef {
    /// Expands an image reference the way docker does: `alpine:3` is
    /// `docker.io/library/alpine:3`, no tag means `latest`, and
    /// `name@sha256:…` (or `name:tag@sha256:…`) names a digest. The
    /// repository, tag and digest must be valid; the error says why not.
    pub fn parse(reference: &str) -> Result<Self, String> {
        let (name, digest) = match reference.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (reference, None),
        };
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t),
            _ => (name, "latest"),
        };
        let (registry, repo) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (canonical_registry(first), rest.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        let registry_ok = !registry.is_empty()
            && registry
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        if !registry_ok {
            return Err(format!(
                "{reference:?}: {registry:?} is not a registry host name"
            ));
        }
        let repo = if registry == "docker.io" && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo
        };
        let repository = RepoName::parse(&repo).map_err(|e| e.to_string())?;
        let reference = match digest {
            Some(d) => Reference::Digest(d.parse::<Digest>().map_err(|e| e.to_string())?),
            None => Reference::parse(tag).map_err(|e| e.to_string())?,
        };
        Ok(Self {
            registry,
            repository: repository.as_str().to_string(),
            reference,
        })
    }

    /// The tag, if the reference names one.
    pub fn tag(&self) -> Option<&str> {
        self.reference.as_tag()
    }
}

impl std::fmt::Display for ImageRef {
    /// `docker.io/library/alpine:3.20` or `ghcr.io/org/tool@sha256:…`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (registry, repo) = (&self.registry, &self.repository);
        match &self.reference {
            Reference::Tag(tag) => write!(f, "{registry}/{repo}:{tag}"),
            Reference::Digest(digest) => write!(f, "{registry}/{repo}@{digest}"),
        }
    }
}

/// Expands a short image reference the way docker does: `alpine:3` is
/// `docker.io/library/alpine:3`. Returns (registry, repository, tag); None
/// for an invalid reference or one naming a digest (see [`ImageRef::parse`]).
pub fn parse_image_ref(reference: &str) -> Option<(String, String, String)> {
    let image = ImageRef::parse(reference).ok()?;
    let tag = image.tag()?.to_string();
    Some((image.registry, image.repository, tag))
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
        assert_eq!(parse_image_ref("alpine@sha256:abc"), None);
        assert_eq!(parse_image_ref("Alpine:3"), None);
    }

    #[test]
    fn image_references_with_digests_and_their_full_names() {
        let digest = Digest::of(b"x");
        let image = ImageRef::parse(&format!("registry-1.docker.io/library/x@{digest}")).unwrap();
        assert_eq!(image.registry, "docker.io");
        assert_eq!(image.repository, "library/x");
        assert_eq!(image.reference, Reference::Digest(digest.clone()));
        assert_eq!(image.to_string(), format!("docker.io/library/x@{digest}"));
        let image = ImageRef::parse(&format!("ghcr.io/org/tool:1@{digest}")).unwrap();
        assert_eq!(image.tag(), None, "the digest wins over the tag");
        let image = ImageRef::parse("alpine:3.20").unwrap();
        assert_eq!(image.to_string(), "docker.io/library/alpine:3.20");
        assert_eq!(ImageRef::parse(&image.to_string()).unwrap(), image);
        let image = ImageRef::parse("localhost:5000/a/b").unwrap();
        assert_eq!(image.to_string(), "localhost:5000/a/b:latest");
        for bad in [
            "",
            "x@sha256:abc",
            "x@latest",
            "../x:1",
            "a//b",
            "x:bad tag",
            "x:",
            "bad host.io/x:1",
            "UPPER",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?}");
        }
    }
}
