//! `regcache export`: cached images into one bundle (see [`super`]).
//!
//! Works on a stopped regcache's cache: the index is opened (which keeps a
//! regcache from starting on it meanwhile) and read once; then every
//! image's manifests and blobs are streamed from their cache files into the
//! tar, hashed on the way so a damaged file is found before the bundle
//! travels. The tar is written as `<output>.partial` and renamed when
//! complete, so an interrupted export leaves no bundle that looks whole.
//!
//! An image's content is found by walking its manifests in the cache, and a
//! digest a manifest names goes into the bundle only if the image's
//! repository may see it: linked to that repository or public through some
//! repository ([`crate::registry::link`]). A manifest can name digests of
//! someone else's private image; those are left out (with a warning), as the
//! proxy would not serve them through that repository either, and listed in
//! the image's `io.regcache.withheld` annotation: the bundle may still carry
//! the blob for another image (a private one, with `--include-private`),
//! and the annotation tells an importing regcache not to link it to this
//! image's repository. Every image's manifests are walked in full for this,
//! also below content an earlier image already wrote.
//!
//! Only images of repositories known public (the registry accepted an
//! anonymous pull) are exported unless `--include-private` is given: a
//! bundle travels to places and people the registry never vetted. The images
//! left out are named on stderr with the reason; with the flag, the private
//! images included are named instead and carry `io.regcache.public=false`,
//! so an importing regcache guards them. The bundle holds content and names
//! only: no links of other repositories, no credentials, no openness of
//! repositories it does not carry.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::progress::{Progress, ProgressReader};
use super::{
    blob_name, format_withheld, io_err, read_limited, BundleError, Descriptor, HashingReader,
    LayoutIndex, CONTAINERD_NAME, INDEX_FILE, LAYOUT_FILE, LAYOUT_JSON, MAX_MANIFEST, REF_NAME,
    REGCACHE_PUBLIC, REGCACHE_REF, REGCACHE_WITHHELD,
};
use crate::cache::index::Snapshot;
use crate::cache::offline;
use crate::cache::{content_file, link_key, parse_link_key, tag_key};
use crate::registry::digest::Digest;
use crate::registry::link::{verdict, LinkFacts, LinkVerdict};
use crate::registry::manifest::children;
use crate::registry::media::{manifest_media_type, OCI_INDEX};
use crate::registry::name::RepoName;
use crate::registry::reference::ImageRef;
use crate::registry::route::Reference;

/// What an export wrote. The command line shows it (`crate::cli::report`).
#[derive(Debug, Default)]
pub struct ExportSummary {
    /// The images, with their top manifest's digest.
    pub images: Vec<(ImageRef, Digest)>,
    /// Manifests written (tops and children).
    pub manifests: usize,
    /// Other blobs written.
    pub blobs: usize,
    /// Bytes of content written.
    pub bytes: u64,
    /// Content the images refer to that the cache did not have.
    pub missing: Vec<Digest>,
    /// Images of repositories not known public, left out.
    pub private_left_out: Vec<ImageRef>,
    /// Images of repositories not known public, exported (`--include-private`).
    pub private_included: Vec<ImageRef>,
    /// The bundle.
    pub output: PathBuf,
}

/// What the index says about cached content.
struct Catalog {
    dir: PathBuf,
    /// digest → (size, media type; empty for blobs).
    content: HashMap<Digest, (u64, String)>,
    /// digest → the (registry, repository) pairs it is linked to.
    places: HashMap<Digest, HashSet<(String, String)>>,
    /// "registry/repository" of the repositories last found public.
    public: HashSet<String>,
    snap: Snapshot,
}

impl Catalog {
    fn new(dir: &Path, snap: Snapshot) -> Self {
        let content = snap
            .content
            .iter()
            .filter_map(|r| {
                let digest = r.digest.parse::<Digest>().ok()?;
                Some((digest, (r.size, r.media_type.clone())))
            })
            .collect();
        let mut places: HashMap<Digest, HashSet<(String, String)>> = HashMap::new();
        for (registry, repo, digest) in snap.links.iter().filter_map(|k| parse_link_key(k)) {
            places.entry(digest).or_default().insert((registry, repo));
        }
        let public = snap
            .openness
            .iter()
            .filter(|(_, public, _)| *public)
            .map(|(k, _, _)| k.clone())
            .collect();
        Self {
            dir: dir.to_path_buf(),
            content,
            places,
            public,
            snap,
        }
    }

    /// Whether `image`'s repository may see `digest`: the proxy's link
    /// verdict, with no registry to confirm anything. Openness is the last
    /// finding however old, as offline serving keeps it (no registry to ask
    /// again; [`Catalog::public`] chooses the images the same way).
    fn visible(&self, image: &ImageRef, digest: &Digest) -> bool {
        let places = self.places.get(digest).into_iter().flatten();
        let facts = LinkFacts::of(
            &image.registry,
            image.repository.as_str(),
            places.map(|(r, p)| (r.as_str(), p.as_str())),
            |r, p| self.public.contains(&format!("{r}/{p}")),
        );
        verdict(facts) == LinkVerdict::Serve
    }

    /// The cached size of `digest`, if its entry and file exist.
    fn cached(&self, digest: &Digest) -> Option<u64> {
        let (size, _) = self.content.get(digest)?;
        content_file(&self.dir, digest).is_file().then_some(*size)
    }

    fn public(&self, image: &ImageRef) -> Option<bool> {
        let key = format!("{}/{}", image.registry, image.repository);
        self.snap
            .openness
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, public, _)| *public)
    }
}

/// Writes the images named by `requested` (every tagged image when empty)
/// from the cache in `dir` to the bundle `output`. Images of repositories
/// not known public are left out (and named on stderr) unless
/// `include_private`; then they are exported, named on stderr, and marked
/// not public in the bundle.
pub fn export(
    dir: &Path,
    requested: &[String],
    output: &Path,
    include_private: bool,
    progress: &dyn Progress,
) -> Result<ExportSummary, BundleError> {
    let index = offline::open(dir)?;
    let catalog = Catalog::new(dir, index.load().map_err(crate::cache::CacheError::from)?);
    let selected = select(&catalog, requested, progress)?;
    let mut images = Vec::new();
    let (mut left_out, mut included) = (Vec::new(), Vec::new());
    for (image, digest) in selected {
        let openness = catalog.public(&image);
        if openness == Some(true) {
            images.push((image, digest));
            continue;
        }
        let why = private_reason(&image, openness);
        if include_private {
            progress.warn(&format!(
                "including private image {image} ({why}): whoever holds the bundle can read it"
            ));
            included.push(image.clone());
            images.push((image, digest));
        } else {
            progress.warn(&format!(
                "left out {image}: {why} (--include-private exports it)"
            ));
            left_out.push(image);
        }
    }
    if images.is_empty() {
        return Err(BundleError::OnlyPrivate(left_out.len()));
    }
    let mut summary = write_bundle(&catalog, &images, output, progress)?;
    summary.private_left_out = left_out;
    summary.private_included = included;
    drop(index);
    Ok(summary)
}

/// Why an image does not count as public, for the person at the terminal.
fn private_reason(image: &ImageRef, openness: Option<bool>) -> String {
    let repo = format!("{}/{}", image.registry, image.repository);
    match openness {
        Some(false) => format!("{repo} is private: its registry refused an anonymous pull"),
        _ => format!("{repo} is not known to be public: no anonymous pull of it was seen to work"),
    }
}

/// The images to export, with their top manifests.
fn select(
    catalog: &Catalog,
    requested: &[String],
    progress: &dyn Progress,
) -> Result<Vec<(ImageRef, Digest)>, BundleError> {
    if requested.is_empty() {
        return every_tag(catalog, progress);
    }
    let mut images = Vec::new();
    for text in requested {
        let image = ImageRef::parse(text).map_err(|e| BundleError::Reference(e.to_string()))?;
        let digest = match &image.reference {
            Reference::Tag(tag) => {
                let key = tag_key(&image.registry, image.repository.as_str(), tag);
                catalog
                    .snap
                    .tags
                    .iter()
                    .find(|t| t.key == key)
                    .and_then(|t| t.digest.parse::<Digest>().ok())
                    .ok_or_else(|| BundleError::NotCached(image.to_string()))?
            }
            Reference::Digest(d) => {
                let link = link_key(&image.registry, image.repository.as_str(), d);
                if !catalog.snap.links.contains(&link) {
                    return Err(BundleError::NotCached(image.to_string()));
                }
                d.clone()
            }
        };
        if catalog.cached(&digest).is_none() {
            return Err(BundleError::NotCached(format!(
                "{image} (its manifest {digest})"
            )));
        }
        images.push((image, digest));
    }
    Ok(images)
}

/// Every tag whose manifest is still cached, in name order; the others are
/// named in a warning.
fn every_tag(
    catalog: &Catalog,
    progress: &dyn Progress,
) -> Result<Vec<(ImageRef, Digest)>, BundleError> {
    let mut tags: Vec<_> = catalog.snap.tags.iter().collect();
    tags.sort_by(|a, b| a.key.cmp(&b.key));
    let mut images = Vec::new();
    for tag in tags {
        let (Some(image), Ok(digest)) = (image_of_tag_key(&tag.key), tag.digest.parse::<Digest>())
        else {
            progress.warn(&format!(
                "skipping {}: not expressible as an image reference",
                tag.key
            ));
            continue;
        };
        if catalog.cached(&digest).is_none() {
            progress.warn(&format!(
                "skipping {image}: its manifest {digest} is no longer cached"
            ));
            continue;
        }
        images.push((image, digest));
    }
    if images.is_empty() {
        return Err(BundleError::Empty);
    }
    Ok(images)
}

/// Reads a tag key (`registry/repository:tag`) back into its parts.
fn image_of_tag_key(key: &str) -> Option<ImageRef> {
    let (name, tag) = key.rsplit_once(':')?;
    let (registry, repository) = crate::cache::split_registry(name)?;
    let image = ImageRef {
        registry: registry.to_string(),
        repository: RepoName::parse(repository).ok()?,
        reference: Reference::parse(tag).ok()?,
    };
    // Only what round-trips through the bundle's annotation is exported.
    (ImageRef::parse(&image.to_string()).ok()? == image).then_some(image)
}

/// What one image's walk found.
#[derive(Debug, Default)]
struct ImagePlan {
    /// Content not yet written: (digest, size, is a manifest), top
    /// manifest first.
    items: Vec<(Digest, u64, bool)>,
    /// Cached digests its manifests name that its repository may not see:
    /// not written for it, and listed in [`REGCACHE_WITHHELD`].
    withheld: Vec<Digest>,
}

/// Walks one image from its top manifest `root` through every manifest
/// (also those `written` for an earlier image, so that what is withheld
/// from this image is known in full). Children the cache lacks go to
/// `missing`; withheld ones go there too, once, as they are left out of
/// this image.
fn plan(
    catalog: &Catalog,
    image: &ImageRef,
    root: &Digest,
    written: &HashSet<Digest>,
    missing: &mut Vec<Digest>,
    progress: &dyn Progress,
) -> Result<ImagePlan, BundleError> {
    let mut out = ImagePlan::default();
    let mut seen = HashSet::new();
    let mut stack = vec![(root.clone(), true)];
    while let Some((digest, manifest)) = stack.pop() {
        if !seen.insert(digest.clone()) {
            continue;
        }
        let Some(size) = catalog.cached(&digest) else {
            if !missing.contains(&digest) {
                progress.warn(&format!("{digest} is not in the cache; left out"));
                missing.push(digest);
            }
            continue;
        };
        if digest != *root && !catalog.visible(image, &digest) {
            progress.warn(&format!(
                "{digest} is named by {image} but not linked to its repository; left out of it (and withheld from it on import)"
            ));
            if !missing.contains(&digest) {
                missing.push(digest.clone());
            }
            out.withheld.push(digest);
            continue;
        }
        if !written.contains(&digest) {
            out.items.push((digest.clone(), size, manifest));
        }
        if manifest {
            let path = content_file(&catalog.dir, &digest);
            let file = File::open(&path).map_err(io_err(&path))?;
            let body = read_limited(file, MAX_MANIFEST, &format!("manifest {digest}"))?;
            for child in children(&body).into_iter().rev() {
                stack.push((child.digest.clone(), child.is_manifest()));
            }
        }
    }
    Ok(out)
}

/// Deletes a file when dropped, unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn write_bundle(
    catalog: &Catalog,
    images: &[(ImageRef, Digest)],
    output: &Path,
    progress: &dyn Progress,
) -> Result<ExportSummary, BundleError> {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    let partial = output.with_file_name(name);
    let file = File::create(&partial).map_err(io_err(&partial))?;
    let mut guard = RemoveOnDrop(Some(partial.clone()));
    let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
    let werr = |e| BundleError::Io {
        path: partial.clone(),
        source: e,
    };

    append_bytes(&mut tar, LAYOUT_FILE, LAYOUT_JSON.as_bytes()).map_err(werr)?;
    append_dir(&mut tar, "blobs/").map_err(werr)?;
    let mut dirs = HashSet::new();
    let mut summary = ExportSummary {
        output: output.to_path_buf(),
        ..ExportSummary::default()
    };
    let mut written = HashSet::new();
    let mut descriptors = Vec::new();
    for (image, root) in images {
        progress.begin(&image.to_string(), 0);
        let ImagePlan { items, withheld } = plan(
            catalog,
            image,
            root,
            &written,
            &mut summary.missing,
            progress,
        )?;
        progress.set_total(items.iter().map(|(_, size, _)| size).sum());
        for (digest, size, manifest) in items {
            let alg = digest.algorithm();
            if dirs.insert(alg) {
                append_dir(&mut tar, &format!("blobs/{alg}/")).map_err(werr)?;
            }
            append_content(&mut tar, catalog, &digest, size, progress, &partial)?;
            summary.bytes += size;
            if manifest {
                summary.manifests += 1;
            } else {
                summary.blobs += 1;
            }
            written.insert(digest);
        }
        progress.end();
        descriptors.push(descriptor(catalog, image, root, &withheld)?);
        summary.images.push((image.clone(), root.clone()));
    }

    let index = LayoutIndex {
        schema_version: 2,
        media_type: OCI_INDEX.to_string(),
        manifests: descriptors,
    };
    let json = serde_json::to_vec(&index).map_err(|e| werr(e.into()))?;
    append_bytes(&mut tar, INDEX_FILE, &json).map_err(werr)?;
    let file = tar
        .into_inner()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .map_err(werr)?;
    file.sync_all().map_err(werr)?;
    drop(file);
    std::fs::rename(&partial, output).map_err(io_err(output))?;
    guard.0 = None;
    Ok(summary)
}

/// The `index.json` entry of one image; `withheld` are the digests its
/// manifests name that its repository may not see.
fn descriptor(
    catalog: &Catalog,
    image: &ImageRef,
    root: &Digest,
    withheld: &[Digest],
) -> Result<Descriptor, BundleError> {
    let (size, cached_type) = catalog
        .content
        .get(root)
        .cloned()
        .ok_or_else(|| BundleError::NotCached(image.to_string()))?;
    let media_type = if cached_type.is_empty() {
        let path = content_file(&catalog.dir, root);
        let body = read_limited(
            File::open(&path).map_err(io_err(&path))?,
            MAX_MANIFEST,
            &format!("manifest {root}"),
        )?;
        manifest_media_type(None, &body)
    } else {
        cached_type
    };
    let name = image.to_string();
    let mut annotations = BTreeMap::new();
    if let Some(tag) = image.tag() {
        annotations.insert(REF_NAME.to_string(), tag.to_string());
    }
    annotations.insert(REGCACHE_REF.to_string(), name.clone());
    annotations.insert(CONTAINERD_NAME.to_string(), name);
    // Always said: an importing regcache takes "true" as public and guards
    // everything else.
    let public = catalog.public(image) == Some(true);
    annotations.insert(REGCACHE_PUBLIC.to_string(), public.to_string());
    // Always said, empty for none: its absence marks a bundle of a regcache
    // (or tool) that did not say, which import treats conservatively.
    annotations.insert(REGCACHE_WITHHELD.to_string(), format_withheld(withheld));
    Ok(Descriptor {
        media_type,
        digest: root.to_string(),
        size,
        annotations,
    })
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode);
    header.set_mtime(0);
    header
}

fn append_bytes<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    data: &[u8],
) -> std::io::Result<()> {
    let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644);
    tar.append_data(&mut h, name, data)
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, name: &str) -> std::io::Result<()> {
    let mut h = header(tar::EntryType::Directory, 0, 0o755);
    tar.append_data(&mut h, name, std::io::empty())
}

/// Streams one cache file into the tar, checking its length and digest.
fn append_content<W: Write>(
    tar: &mut tar::Builder<W>,
    catalog: &Catalog,
    digest: &Digest,
    size: u64,
    progress: &dyn Progress,
    partial: &Path,
) -> Result<(), BundleError> {
    let path = content_file(&catalog.dir, digest);
    let file = File::open(&path).map_err(io_err(&path))?;
    let actual = file.metadata().map_err(io_err(&path))?.len();
    if actual != size {
        return Err(BundleError::Damaged {
            digest: digest.clone(),
            why: format!("{actual} bytes, the index says {size}"),
        });
    }
    let mut reader = HashingReader::new(
        ProgressReader::new(file, progress).take(size),
        digest.algorithm(),
    );
    let mut h = header(tar::EntryType::Regular, size, 0o644);
    tar.append_data(&mut h, blob_name(digest), &mut reader)
        .map_err(io_err(partial))?;
    let (got, count) = reader.finish();
    if count != size || got != *digest {
        return Err(BundleError::Damaged {
            digest: digest.clone(),
            why: format!("its {count} bytes hash to {got}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_keys_read_back_into_references() {
        let image = image_of_tag_key("docker.io/library/alpine:3.20").unwrap();
        assert_eq!(image.to_string(), "docker.io/library/alpine:3.20");
        let image = image_of_tag_key("localhost:5000/team/app:v1").unwrap();
        assert_eq!(image.registry, "localhost:5000");
        assert_eq!(image.repository.as_str(), "team/app");
        // An insecure registry's images (keyed `http://host:port`) have no
        // reference that round-trips through a bundle: not exported.
        assert!(image_of_tag_key("http://reg.test:5000/team/app:v1").is_none());
        assert!(image_of_tag_key("no-tag").is_none());
        assert!(image_of_tag_key("docker.io/UPPER:1").is_none());
    }
}
