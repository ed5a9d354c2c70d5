//! Air-gap bundles: cached images written to one tar file, and read back
//! into another cache that has no way to the registries.
//!
//! A bundle is an [OCI image layout] in a tar, so other tools read it too
//! (`skopeo copy oci-archive:bundle.tar:3.20 …`):
//! ```text
//! oci-layout               {"imageLayoutVersion":"1.0.0"}
//! index.json               one descriptor per exported image (below)
//! blobs/sha256/<hex>       manifests, configs and layers, named by digest
//! ```
//! Each descriptor in `index.json` names an image's top manifest (an image
//! manifest, or an index whose children are in `blobs/` too) and carries the
//! annotations regcache needs to put it back where it came from:
//!
//! | annotation | example | meaning |
//! |---|---|---|
//! | `org.opencontainers.image.ref.name` | `3.20` | the tag (OCI's own, for other tools) |
//! | `io.regcache.ref` | `docker.io/library/alpine:3.20` | registry, repository and tag (or `@digest`) |
//! | `io.containerd.image.name` | the same | the name `ctr images import` gives the image |
//! | `io.regcache.public` | `true` | whether the repository was known public where it was exported (`false` for private images exported with `--include-private`) |
//! | `io.regcache.withheld` | `sha256:…,sha256:…` | digests the image's manifests name that its repository could not see where it was exported (empty when none); always written by regcache |
//!
//! **Withheld digests.** A manifest may name any digest, also one of
//! someone else's private image (registries accept manifests naming digests
//! they do not hold). [`export`] leaves such a digest out *for that image*
//! and lists it in `io.regcache.withheld`, but the bundle may still carry
//! the blob for another image that may see it (`--include-private`).
//! [`import`] therefore never links a withheld digest to the image's
//! repository, nor anything reached only through it. A bundle without the
//! annotation (written by a regcache before it existed, or by another tool)
//! cannot say what its exporter withheld (older exporters copied whatever
//! a manifest named), so import links only each image's top manifest; the
//! rest is linked by a pull. And in any bundle,
//! a digest the bundle does not carry is linked only if the cache already
//! links it to the image's repository. What is not linked is named in a
//! warning; a pull through the repository links it.
//!
//! [`export`] streams cache files into the tar, never holding a blob in
//! memory. [`import`] treats the tar as hostile: only the three kinds of
//! entry above are accepted ([`classify`]), no name from the tar ever
//! becomes a path, every blob is hashed as it is read and checked against
//! its name and every descriptor's size, and nothing is committed to the
//! cache unless the whole bundle verified.
//!
//! [OCI image layout]: https://github.com/opencontainers/image-spec/blob/main/image-layout.md

pub mod export;
pub mod import;
pub mod progress;

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CacheError;
use crate::registry::digest::{Algorithm, Digest, DigestHasher};

pub use progress::{NoProgress, Progress};

/// The name of the layout marker file.
pub const LAYOUT_FILE: &str = "oci-layout";
/// The name of the layout's index.
pub const INDEX_FILE: &str = "index.json";
/// The content of [`LAYOUT_FILE`].
pub const LAYOUT_JSON: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;
/// OCI's annotation for the tag of an image in a layout.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// regcache's annotation holding the full image reference.
pub const REGCACHE_REF: &str = "io.regcache.ref";
/// regcache's annotation saying whether the repository was public.
pub const REGCACHE_PUBLIC: &str = "io.regcache.public";
/// regcache's annotation listing the digests withheld from the image
/// (comma-separated; see the module documentation).
pub const REGCACHE_WITHHELD: &str = "io.regcache.withheld";
/// containerd's annotation for an image's full name.
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The largest manifest read into memory (registries refuse larger ones).
pub const MAX_MANIFEST: u64 = 4 << 20;
/// The largest `index.json` read into memory.
pub const MAX_INDEX: u64 = 16 << 20;

/// An export or import problem, worded for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The operating system's reason.
        source: io::Error,
    },
    /// The cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A running regcache holds the cache.
    #[error("a running regcache has the cache in {} open; stop it first", .0.display())]
    Busy(PathBuf),
    /// An image reference given on the command line is malformed.
    #[error("{0}")]
    Reference(String),
    /// An image asked for is not in the cache.
    #[error("{0} is not cached")]
    NotCached(String),
    /// The cache holds no tagged image to export.
    #[error("nothing to export: the cache holds no tagged images")]
    Empty,
    /// Every image selected is of a repository not known public.
    #[error("nothing to export: the {0} selected image(s) are not known to be public; --include-private exports them")]
    OnlyPrivate(usize),
    /// A cached file does not match its digest.
    #[error("cached file for {digest} is damaged ({why}); remove it with `regcache cache rm {digest}` and pull again")]
    Damaged {
        /// The digest.
        digest: Digest,
        /// What is wrong.
        why: String,
    },
    /// A tar entry that has no place in a bundle.
    #[error("bundle entry {name}: {why}")]
    Entry {
        /// The entry's name, quoted.
        name: String,
        /// Why it is refused.
        why: String,
    },
    /// The layout (oci-layout, index.json, a manifest) is missing or malformed.
    #[error("not a usable bundle: {0}")]
    Layout(String),
    /// A blob's bytes do not hash to its name.
    #[error(
        "bundle is corrupt: blob {digest} does not match its digest (its bytes hash to {actual})"
    )]
    Corrupt {
        /// The digest the blob is named by.
        digest: Digest,
        /// What its bytes hash to.
        actual: Digest,
    },
    /// A blob's size differs from what a descriptor says.
    #[error("bundle is corrupt: blob {digest} is {actual} bytes, but {expected} are announced")]
    Size {
        /// The digest.
        digest: Digest,
        /// The size in the descriptor.
        expected: u64,
        /// The size in the bundle.
        actual: u64,
    },
    /// The bundle does not fit the cache.
    #[error("the bundle holds {need} bytes of new content, more than cache_size ({cap} bytes)")]
    TooBig {
        /// Bytes to add.
        need: u64,
        /// The cache's cap.
        cap: u64,
    },
}

/// A closure mapping an I/O error on `path` to a [`BundleError`].
pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a tar entry is, once accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// `oci-layout`.
    Layout,
    /// `index.json`.
    Index,
    /// `blobs/<alg>/<hex>`.
    Blob(Digest),
    /// A directory of the layout (`blobs/`, `blobs/sha256/`) or a pax global
    /// header: nothing to read.
    Skip,
}

/// Decides what a tar entry is from its name and type, refusing anything an
/// OCI image layout does not hold: other names, absolute paths, `..`,
/// symbolic and hard links, devices, FIFOs. A leading `./` is allowed (as
/// `tar -C dir -cf bundle.tar .` writes). Nothing here touches the disk.
pub fn classify(name: &[u8], kind: tar::EntryType) -> Result<EntryKind, BundleError> {
    let refuse = |why: &str| BundleError::Entry {
        name: shown(name),
        why: why.to_string(),
    };
    if kind.is_pax_global_extensions() {
        return Ok(EntryKind::Skip);
    }
    let text = std::str::from_utf8(name).map_err(|_| refuse("the name is not UTF-8"))?;
    let text = text.strip_prefix("./").unwrap_or(text);
    if kind.is_dir() {
        let dir = text.strip_suffix('/').unwrap_or(text);
        let layout_dir = match dir {
            "" | "." | "blobs" => true,
            _ => dir.strip_prefix("blobs/").is_some_and(|alg| {
                [Algorithm::Sha256, Algorithm::Sha512]
                    .iter()
                    .any(|a| a.as_str() == alg)
            }),
        };
        return if layout_dir {
            Ok(EntryKind::Skip)
        } else {
            Err(refuse("a directory an OCI image layout does not have"))
        };
    }
    if !kind.is_file() {
        return Err(refuse(&format!(
            "a {} entry; a bundle holds only regular files and directories",
            entry_type_name(kind)
        )));
    }
    match text {
        LAYOUT_FILE => return Ok(EntryKind::Layout),
        INDEX_FILE => return Ok(EntryKind::Index),
        _ => {}
    }
    let Some((alg, hex)) = text.strip_prefix("blobs/").and_then(|r| r.split_once('/')) else {
        return Err(refuse(
            "not part of an OCI image layout (oci-layout, index.json, blobs/<algorithm>/<hex>)",
        ));
    };
    format!("{alg}:{hex}")
        .parse::<Digest>()
        .map(EntryKind::Blob)
        .map_err(|e| refuse(&format!("not a blob name: {e}")))
}

fn entry_type_name(kind: tar::EntryType) -> &'static str {
    use tar::EntryType as T;
    match kind {
        T::Symlink => "symbolic link",
        T::Link => "hard link",
        T::Char => "character device",
        T::Block => "block device",
        T::Fifo => "FIFO",
        T::GNUSparse => "sparse file",
        _ => "special",
    }
}

/// A tar entry name for a message: lossy UTF-8, quoted, cut short.
fn shown(name: &[u8]) -> String {
    let text = String::from_utf8_lossy(name);
    let cut: String = text.chars().take(100).collect();
    if cut.len() < text.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// The path of a blob inside the layout: `blobs/sha256/<hex>`.
pub fn blob_name(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm().as_str(), digest.hex())
}

/// A content descriptor as `index.json` and manifests write it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Descriptor {
    /// The media type of the content.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// `sha256:…`, validated by the reader.
    pub digest: String,
    /// The size in bytes.
    pub size: u64,
    /// Annotations (the image's names in `index.json`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The layout's `index.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LayoutIndex {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// The OCI index media type.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// One per image.
    pub manifests: Vec<Descriptor>,
}

/// The value of [`REGCACHE_WITHHELD`] for `digests`: comma-separated, in the
/// order given, empty for none.
pub fn format_withheld(digests: &[Digest]) -> String {
    digests
        .iter()
        .map(Digest::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads a [`REGCACHE_WITHHELD`] value back: empty means none; spaces
/// around items are ignored; anything that is not a digest is an error (a
/// bundle whose annotation cannot be read is refused, not half trusted).
pub fn parse_withheld(value: &str) -> Result<Vec<Digest>, String> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(Vec::new());
    }
    value
        .split(',')
        .map(|item| {
            let item = item.trim();
            item.parse::<Digest>()
                .map_err(|e| format!("{:?} is not a digest: {e}", cut(item)))
        })
        .collect()
}

/// At most 100 characters of `text`, for messages.
fn cut(text: &str) -> String {
    text.chars().take(100).collect()
}

/// Reads all of `reader`, refusing more than `limit` bytes.
pub(crate) fn read_limited(
    reader: impl Read,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, BundleError> {
    let mut out = Vec::new();
    reader
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| BundleError::Layout(format!("cannot read {what}: {e}")))?;
    if out.len() as u64 > limit {
        return Err(BundleError::Layout(format!(
            "{what} is larger than {limit} bytes"
        )));
    }
    Ok(out)
}

/// A reader that hashes and counts what passes through it.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: DigestHasher,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R, algorithm: Algorithm) -> Self {
        Self {
            inner,
            hasher: DigestHasher::new(algorithm),
            count: 0,
        }
    }

    /// The digest and length of everything read.
    pub(crate) fn finish(self) -> (Digest, u64) {
        (self.hasher.finish(), self.count)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tar::EntryType as T;

    fn hex() -> String {
        Digest::of(b"x").hex().to_string()
    }

    #[test]
    fn layout_entries_are_accepted() {
        let blob = format!("blobs/sha256/{}", hex());
        assert_eq!(
            classify(b"oci-layout", T::Regular).unwrap(),
            EntryKind::Layout
        );
        assert_eq!(
            classify(b"./index.json", T::Regular).unwrap(),
            EntryKind::Index
        );
        assert_eq!(
            classify(blob.as_bytes(), T::Regular).unwrap(),
            EntryKind::Blob(Digest::of(b"x"))
        );
        assert_eq!(
            classify(format!("./{blob}").as_bytes(), T::Regular).unwrap(),
            EntryKind::Blob(Digest::of(b"x"))
        );
        for dir in [
            "blobs/",
            "blobs",
            "./blobs/sha256/",
            "blobs/sha512",
            "./",
            ".",
        ] {
            assert_eq!(
                classify(dir.as_bytes(), T::Directory).unwrap(),
                EntryKind::Skip,
                "{dir}"
            );
        }
        assert_eq!(
            classify(b"pax_global_header", T::XGlobalHeader).unwrap(),
            EntryKind::Skip
        );
    }

    #[test]
    fn anything_else_is_refused() {
        let h = hex();
        let names = [
            "/oci-layout".to_string(),
            "/etc/passwd".to_string(),
            "../index.json".to_string(),
            format!("blobs/sha256/../../{h}"),
            format!("blobs/sha256/{h}/x"),
            format!("/blobs/sha256/{h}"),
            format!("blobs/sha256//{h}"),
            format!("blobs/md5/{h}"),
            format!("blobs/sha256/{}", h.to_uppercase()),
            format!("blobs/sha256/{}", &h[1..]),
            format!("blobs/{h}"),
            "blobs/sha256/".to_string(),
            "manifest.json".to_string(),
            "index.json/".to_string(),
            ".//oci-layout".to_string(),
            "".to_string(),
        ];
        for name in &names {
            let err = classify(name.as_bytes(), T::Regular).unwrap_err();
            assert!(matches!(err, BundleError::Entry { .. }), "{name}: {err}");
        }
        assert!(classify(b"\xffoci-layout", T::Regular).is_err());
        for dir in ["etc", "blobs/sha256/x", "../blobs", "/blobs"] {
            assert!(classify(dir.as_bytes(), T::Directory).is_err(), "{dir}");
        }
    }

    #[test]
    fn links_devices_and_fifos_are_refused_whatever_their_name() {
        let blob = format!("blobs/sha256/{}", hex());
        for kind in [
            T::Symlink,
            T::Link,
            T::Char,
            T::Block,
            T::Fifo,
            T::GNUSparse,
        ] {
            for name in ["oci-layout", "index.json", blob.as_str()] {
                let err = classify(name.as_bytes(), kind).unwrap_err().to_string();
                assert!(err.contains("only regular files"), "{name} {kind:?}: {err}");
            }
        }
    }

    #[test]
    fn long_names_are_cut_in_messages() {
        let name = "x".repeat(5000);
        let err = classify(name.as_bytes(), T::Regular)
            .unwrap_err()
            .to_string();
        assert!(err.len() < 400, "{err}");
    }

    #[test]
    fn withheld_lists_round_trip_and_refuse_garbage() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        assert_eq!(format_withheld(&[]), "");
        assert_eq!(parse_withheld("").unwrap(), Vec::<Digest>::new());
        assert_eq!(parse_withheld("  ").unwrap(), Vec::<Digest>::new());
        let text = format_withheld(&[a.clone(), b.clone()]);
        assert_eq!(text, format!("{a},{b}"));
        assert_eq!(parse_withheld(&text).unwrap(), [a.clone(), b.clone()]);
        assert_eq!(parse_withheld(&format!(" {a} , {b} ")).unwrap(), [a, b]);
        for bad in ["sha256:bogus", ",", "x", &format!("{},", Digest::of(b"c"))] {
            assert!(parse_withheld(bad).is_err(), "{bad:?}");
        }
        let long = "y".repeat(5000);
        assert!(parse_withheld(&long).unwrap_err().len() < 300);
    }

    #[test]
    fn hashing_reader_hashes_what_passes() {
        let mut r = HashingReader::new(&b"hello"[..], Algorithm::Sha256);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(r.finish(), (Digest::of(b"hello"), 5));
        assert!(read_limited(&b"12345"[..], 4, "x").is_err());
        assert_eq!(read_limited(&b"1234"[..], 4, "x").unwrap(), b"1234");
    }
}
