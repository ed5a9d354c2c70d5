//! `regcache import`: a bundle (see [`super`]) into the cache, all or
//! nothing.
//!
//! Three phases:
//! 1. **Stage** (blocking): read the tar once, front to back. Each entry is
//!    classified by name and type ([`super::classify`]); `oci-layout` and
//!    `index.json` are kept in memory (size-limited); each blob is copied to
//!    a fresh file in the cache's `tmp/` (a path regcache makes from the
//!    digest, never from the tar) and hashed on the way; a blob whose bytes
//!    do not hash to its name ends the import.
//! 2. **Verify**: from `index.json` down through every manifest, check each
//!    descriptor's size against the staged blob, work out which content is
//!    a manifest (and of what media type), and which image goes to which
//!    registry, repository and tag.
//! 3. **Commit** (async, on the caller's tokio runtime): move the staged
//!    files into the cache with [`Cache::commit`], link the digests of each
//!    image to its repository and set its tag (`fetched_at` = now).
//!
//! What an image's walk reaches is not all linked to its repository (a
//! manifest's names are pointers, never links; see [`super`]): a digest the
//! image's `io.regcache.withheld` lists is not linked, nor visited below; a
//! digest the bundle does not carry is linked only if the cache already
//! links it there; and for an image without the annotation (an older
//! bundle) only the top manifest is linked (`hold_back_unvouched`). Each
//! is named in a warning and counted in the summary.
//!
//! Until phase 3 nothing in the cache has changed, and staged files are
//! removed on any failure; `tmp/` is also wiped whenever a cache is opened.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::progress::{Progress, ProgressReader};
use super::{
    classify, io_err, parse_withheld, read_limited, BundleError, EntryKind, LayoutIndex,
    CONTAINERD_NAME, MAX_INDEX, MAX_MANIFEST, REGCACHE_PUBLIC, REGCACHE_REF, REGCACHE_WITHHELD,
};
use crate::cache::freshness::{now_ms, TagRecord};
use crate::cache::{Cache, CacheError, Cached};
use crate::registry::digest::Digest;
use crate::registry::manifest::children;
use crate::registry::media::manifest_media_type;
use crate::registry::reference::ImageRef;
use crate::registry::route::Reference;
use crate::registry::rules::Rules;

/// What an import added. The command line shows it (`crate::cli::report`).
#[derive(Debug, Default)]
pub struct ImportSummary {
    /// The images, with their top manifest's digest.
    pub images: Vec<(ImageRef, Digest)>,
    /// Manifests added to the cache.
    pub manifests: usize,
    /// Other blobs added.
    pub blobs: usize,
    /// Bytes added.
    pub bytes: u64,
    /// Content the cache already had.
    pub already: usize,
    /// Content the images refer to that neither the bundle nor the cache has.
    pub missing: Vec<Digest>,
    /// Digests an image's manifests name that were not linked to its
    /// repository (withheld by the exporter, not carried, or below the top
    /// manifest of an image in an older bundle).
    pub not_linked: Vec<(ImageRef, Digest)>,
    /// The bundle.
    pub bundle: PathBuf,
}

/// Opens the cache in `dir` (creating it) for an import, with cap `cap`.
/// A cache that a running regcache holds is refused.
pub fn open_cache(dir: &Path, cap: u64) -> Result<Arc<Cache>, BundleError> {
    Cache::open(dir, cap).map_err(|e| match e {
        CacheError::Index(redb::Error::DatabaseAlreadyOpen) => BundleError::Busy(dir.to_path_buf()),
        other => BundleError::Cache(other),
    })
}

/// Imports the bundle at `bundle` into `cache`: verifies all of it, then
/// commits all of it. Reading the bundle is reported to `progress`, and so
/// is every digest not linked or not found. An image that the operator's
/// `rules` deny, or say is never stored, refuses the whole bundle.
pub async fn import(
    cache: &Arc<Cache>,
    bundle: &Path,
    rules: &Rules,
    progress: Arc<dyn Progress>,
) -> Result<ImportSummary, BundleError> {
    let (task_cache, path, rules) = (cache.clone(), bundle.to_path_buf(), rules.clone());
    let (staged, plan) = tokio::task::spawn_blocking(move || {
        let staged = stage(&task_cache, &path, progress.as_ref())?;
        let plan = verify(&task_cache, &staged, &rules, progress.as_ref())?;
        Ok::<_, BundleError>((staged, plan))
    })
    .await
    .map_err(|e| BundleError::Cache(CacheError::Task(e.to_string())))??;
    let mut summary = commit(cache, &staged, plan).await?;
    summary.bundle = bundle.to_path_buf();
    Ok(summary)
}

/// Staged files, removed when dropped (those committed are gone already).
#[derive(Default)]
struct TempFiles(Vec<PathBuf>);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A bundle read and hashed into `tmp/`.
#[derive(Default)]
struct Staged {
    layout: Option<Vec<u8>>,
    index: Option<Vec<u8>>,
    /// digest → (staged file, size).
    blobs: HashMap<Digest, (PathBuf, u64)>,
    files: TempFiles,
}

/// Phase 1: reads the tar, staging and hashing every blob.
fn stage(cache: &Cache, bundle: &Path, progress: &dyn Progress) -> Result<Staged, BundleError> {
    let file = File::open(bundle).map_err(io_err(bundle))?;
    let total = file.metadata().map_err(io_err(bundle))?.len();
    progress.begin(&format!("reading {}", bundle.display()), total);
    let mut archive = tar::Archive::new(ProgressReader::new(
        BufReader::with_capacity(1 << 20, file),
        progress,
    ));
    let tar_err = |e| BundleError::Io {
        path: bundle.to_path_buf(),
        source: e,
    };
    let mut staged = Staged::default();
    for entry in archive.entries().map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        let name = entry.path_bytes().into_owned();
        let kind = classify(&name, entry.header().entry_type())?;
        let duplicate =
            || BundleError::Layout(format!("{} appears twice", String::from_utf8_lossy(&name)));
        match kind {
            EntryKind::Skip => {}
            EntryKind::Layout => {
                if staged.layout.is_some() {
                    return Err(duplicate());
                }
                staged.layout = Some(read_limited(&mut entry, 64 << 10, "oci-layout")?);
            }
            EntryKind::Index => {
                if staged.index.is_some() {
                    return Err(duplicate());
                }
                staged.index = Some(read_limited(&mut entry, MAX_INDEX, "index.json")?);
            }
            EntryKind::Blob(digest) => {
                if staged.blobs.contains_key(&digest) {
                    return Err(duplicate());
                }
                let path = cache.temp_path(&digest);
                staged.files.0.push(path.clone());
                let size = copy_verified(&mut entry, &path, &digest, bundle)?;
                staged.blobs.insert(digest, (path, size));
            }
        }
    }
    progress.end();
    Ok(staged)
}

/// Copies one blob to `path`, hashing it; Err if it does not match `digest`.
fn copy_verified(
    entry: &mut impl std::io::Read,
    path: &Path,
    digest: &Digest,
    bundle: &Path,
) -> Result<u64, BundleError> {
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(path))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut reader = super::HashingReader::new(entry, digest.algorithm());
    std::io::copy(&mut reader, &mut out).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData => BundleError::Io {
            path: bundle.to_path_buf(),
            source: e,
        },
        _ => BundleError::Io {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    out.flush().map_err(io_err(path))?;
    let (actual, size) = reader.finish();
    if actual != *digest {
        return Err(BundleError::Corrupt {
            digest: digest.clone(),
            actual,
        });
    }
    Ok(size)
}

/// One piece of content to commit.
#[derive(Debug)]
struct Item {
    digest: Digest,
    /// The manifest media type, empty for other blobs.
    media_type: String,
}

/// One image to link and tag.
#[derive(Debug)]
struct PlannedImage {
    name: ImageRef,
    root: Digest,
    /// The digests of the image to link to its repository: reached by its
    /// walk, carried by the bundle (or linked there already), not withheld.
    digests: Vec<Digest>,
    /// Whether its descriptor says what the exporter withheld
    /// ([`REGCACHE_WITHHELD`], even empty).
    vouched: bool,
    public: Option<bool>,
}

/// One image's walk: what it reaches, and what it may not link.
struct Reach<'a> {
    name: &'a ImageRef,
    /// Its [`REGCACHE_WITHHELD`] digests.
    withheld: HashSet<Digest>,
    /// Reached and linkable.
    digests: Vec<Digest>,
    /// Named, but not to be linked (and not walked below).
    held: Vec<Digest>,
}

/// What phase 2 decided.
#[derive(Debug, Default)]
struct Plan {
    /// Children before the manifests naming them.
    items: Vec<Item>,
    images: Vec<PlannedImage>,
    missing: Vec<Digest>,
    not_linked: Vec<(ImageRef, Digest)>,
}

/// Phase 2: checks the layout, every descriptor's size, and the names.
fn verify(
    cache: &Cache,
    staged: &Staged,
    rules: &Rules,
    progress: &dyn Progress,
) -> Result<Plan, BundleError> {
    let layout = staged.layout.as_deref().ok_or_else(|| {
        BundleError::Layout("no oci-layout file (is this an OCI image layout?)".into())
    })?;
    let version = serde_json::from_slice::<serde_json::Value>(layout)
        .ok()
        .and_then(|v| v.get("imageLayoutVersion")?.as_str().map(str::to_string));
    if !version.as_deref().is_some_and(|v| v.starts_with("1.")) {
        return Err(BundleError::Layout(
            "oci-layout does not name image layout version 1.x".into(),
        ));
    }
    let index = staged
        .index
        .as_deref()
        .ok_or_else(|| BundleError::Layout("no index.json".into()))?;
    let index: LayoutIndex = serde_json::from_slice(index)
        .map_err(|e| BundleError::Layout(format!("index.json: {e}")))?;
    if index.manifests.is_empty() {
        return Err(BundleError::Layout("index.json names no images".into()));
    }
    let mut walk = Walk {
        cache,
        staged,
        plan: Plan::default(),
        planned: HashSet::new(),
        progress,
    };
    for desc in &index.manifests {
        let root = desc
            .digest
            .parse::<Digest>()
            .map_err(|e| BundleError::Layout(format!("index.json: {e}")))?;
        let name = image_name(&desc.annotations, &root)?;
        check_rules(rules, &name)?;
        // A top manifest the bundle does not carry counts only if this cache
        // already has it for the image's repository.
        let carried = staged.blobs.contains_key(&root);
        let linked_here = cache.contains(&root)
            && cache.is_linked(&name.registry, name.repository.as_str(), &root);
        if !carried && !linked_here {
            return Err(BundleError::Layout(format!(
                "index.json names {root} ({name}), which the bundle does not contain"
            )));
        }
        let withheld = match desc.annotations.get(REGCACHE_WITHHELD) {
            None => None,
            Some(value) => Some(parse_withheld(value).map_err(|e| {
                BundleError::Layout(format!(
                    "index.json entry {root} ({name}): {REGCACHE_WITHHELD}: {e}"
                ))
            })?),
        };
        let vouched = withheld.is_some();
        let withheld: HashSet<Digest> = withheld.into_iter().flatten().collect();
        if withheld.contains(&root) {
            return Err(BundleError::Layout(format!(
                "index.json entry {root} ({name}) withholds its own manifest"
            )));
        }
        let mut reach = Reach {
            name: &name,
            withheld,
            digests: Vec::new(),
            held: Vec::new(),
        };
        walk.visit(&root, Some(desc.size), &desc.media_type, true, &mut reach)?;
        let (digests, held) = (reach.digests, reach.held);
        walk.plan
            .not_linked
            .extend(held.into_iter().map(|d| (name.clone(), d)));
        let public = desc
            .annotations
            .get(REGCACHE_PUBLIC)
            .and_then(|v| v.parse::<bool>().ok());
        walk.plan.images.push(PlannedImage {
            name,
            root,
            digests,
            vouched,
            public,
        });
    }
    let mut plan = walk.plan;
    for (i, held) in hold_back_unvouched(&mut plan.images) {
        let image = plan.images[i].name.clone();
        progress.warn(&format!(
            "{image}: the bundle does not say what its exporter withheld (no {REGCACHE_WITHHELD}: \
             an older regcache or another tool wrote it), so only its top manifest is linked to \
             {}/{}; {} digests it names are not (a pull of {image} links them; a bundle \
             exported by this regcache links them all)",
            image.registry,
            image.repository,
            held.len()
        ));
        plan.not_linked
            .extend(held.into_iter().map(|d| (image.clone(), d)));
    }
    let need: u64 = plan
        .items
        .iter()
        .filter(|i| !cache.contains(&i.digest))
        .filter_map(|i| staged.blobs.get(&i.digest).map(|(_, size)| size))
        .sum();
    if need > cache.cap() {
        return Err(BundleError::TooBig {
            need,
            cap: cache.cap(),
        });
    }
    Ok(plan)
}

/// Refuses an image the rules deny or never store, naming the rule.
fn check_rules(rules: &Rules, name: &ImageRef) -> Result<(), BundleError> {
    let (registry, repo) = (&name.registry, name.repository.as_str());
    let rule = rules.decide(registry, repo);
    let why = if rule.is_denied() {
        rules.denial_message(&rule, registry, repo)
    } else if !rule.cache {
        let which = rule.rule.and_then(|n| rules.rule(n));
        format!(
            "{registry}/{repo} is never stored: {} says cache = false",
            which.map_or_else(|| "a rule".to_string(), ToString::to_string)
        )
    } else {
        return Ok(());
    };
    Err(BundleError::Layout(format!(
        "{name}: {why}; nothing was imported"
    )))
}

/// Where an image goes: its `io.regcache.ref` (or containerd's name).
fn image_name(
    annotations: &std::collections::BTreeMap<String, String>,
    root: &Digest,
) -> Result<ImageRef, BundleError> {
    let text = annotations
        .get(REGCACHE_REF)
        .or_else(|| annotations.get(CONTAINERD_NAME))
        .ok_or_else(|| {
            BundleError::Layout(format!(
                "index.json entry {root} has no {REGCACHE_REF} annotation, so regcache cannot tell which repository it belongs to"
            ))
        })?;
    let name = ImageRef::parse(text)
        .map_err(|e| BundleError::Layout(format!("index.json entry {root}: {e}")))?;
    if let Reference::Digest(d) = &name.reference {
        if d != root {
            return Err(BundleError::Layout(format!(
                "index.json entry {root} is named {name}, another digest"
            )));
        }
    }
    Ok(name)
}

/// For the images whose descriptor does not say what its exporter withheld
/// (`vouched` false: an older regcache or another tool wrote the bundle):
/// takes every digest but the top manifest out of `digests`. Exporters
/// before `io.regcache.withheld` copied whatever an image's manifests named,
/// so nothing tells an image's own layers from another repository's private
/// digests that a hostile manifest named; a pull of the image links them.
/// Returns (image index into `images`, digests held back).
fn hold_back_unvouched(images: &mut [PlannedImage]) -> Vec<(usize, Vec<Digest>)> {
    let mut out = Vec::new();
    for (i, image) in images.iter_mut().enumerate() {
        if image.vouched {
            continue;
        }
        let root = image.root.clone();
        let (keep, held): (Vec<Digest>, Vec<Digest>) =
            image.digests.drain(..).partition(|d| *d == root);
        image.digests = keep;
        if !held.is_empty() {
            out.push((i, held));
        }
    }
    out
}

/// The walk from each image's top manifest down to its blobs.
struct Walk<'a> {
    cache: &'a Cache,
    staged: &'a Staged,
    plan: Plan,
    /// Content already in `plan.items`.
    planned: HashSet<Digest>,
    /// Where warnings go.
    progress: &'a dyn Progress,
}

impl Walk<'_> {
    /// Checks `digest` (and, for a manifest, what it names) and plans it;
    /// notes it in `reach` as linkable, or held back.
    fn visit(
        &mut self,
        digest: &Digest,
        size: Option<u64>,
        media_type: &str,
        manifest: bool,
        reach: &mut Reach<'_>,
    ) -> Result<(), BundleError> {
        if reach.digests.contains(digest) || reach.held.contains(digest) {
            return Ok(());
        }
        let name = reach.name;
        if reach.withheld.contains(digest) {
            self.progress.warn(&format!(
                "{digest} is named by {name} but its exporter withheld it ({name}'s repository could not see it there); not linked to {}/{}",
                name.registry, name.repository
            ));
            reach.held.push(digest.clone());
            return Ok(());
        }
        let body_path = match self.staged.blobs.get(digest) {
            Some((path, actual)) => {
                if let Some(expected) = size.filter(|s| s != actual) {
                    return Err(BundleError::Size {
                        digest: digest.clone(),
                        expected,
                        actual: *actual,
                    });
                }
                path.clone()
            }
            None if self.cache.contains(digest)
                && self
                    .cache
                    .is_linked(&name.registry, name.repository.as_str(), digest) =>
            {
                self.cache.content_path(digest)
            }
            None if self.cache.contains(digest) => {
                self.progress.warn(&format!(
                    "{digest} is named by {name}, not in the bundle, and not linked to {}/{} in this cache; not linked (a pull of {name} links it)",
                    name.registry, name.repository
                ));
                reach.held.push(digest.clone());
                return Ok(());
            }
            None => {
                if !self.plan.missing.contains(digest) {
                    self.progress
                        .warn(&format!("{digest} is not in the bundle"));
                    self.plan.missing.push(digest.clone());
                }
                return Ok(());
            }
        };
        reach.digests.push(digest.clone());
        let mut stored_type = String::new();
        if manifest {
            let file = File::open(&body_path).map_err(io_err(&body_path))?;
            let body = read_limited(file, MAX_MANIFEST, &format!("manifest {digest}"))?;
            for child in children(&body) {
                self.visit(
                    &child.digest,
                    child.size,
                    &child.media_type,
                    child.is_manifest(),
                    reach,
                )?;
            }
            let announced = Some(media_type).filter(|t| !t.trim().is_empty());
            stored_type = manifest_media_type(announced, &body);
        }
        if self.planned.insert(digest.clone()) && self.staged.blobs.contains_key(digest) {
            self.plan.items.push(Item {
                digest: digest.clone(),
                media_type: stored_type,
            });
        }
        Ok(())
    }
}

/// Phase 3: moves the staged content into the cache, then links and tags.
async fn commit(
    cache: &Arc<Cache>,
    staged: &Staged,
    plan: Plan,
) -> Result<ImportSummary, BundleError> {
    let mut summary = ImportSummary {
        missing: plan.missing,
        not_linked: plan.not_linked,
        ..ImportSummary::default()
    };
    // Held until the end, so committing later items never evicts earlier ones.
    let mut held: Vec<Cached> = Vec::new();
    for item in &plan.items {
        let Some((path, size)) = staged.blobs.get(&item.digest) else {
            continue;
        };
        if let Some(cached) = cache.get(&item.digest) {
            summary.already += 1;
            held.push(cached);
            continue;
        }
        let cached = cache
            .commit(path, &item.digest, *size, &item.media_type)
            .await?
            .ok_or(BundleError::TooBig {
                need: *size,
                cap: cache.cap(),
            })?;
        held.push(cached);
        summary.bytes += size;
        if item.media_type.is_empty() {
            summary.blobs += 1;
        } else {
            summary.manifests += 1;
        }
    }
    // Content the bundle did not carry but the cache has is "already cached"
    // too; count each digest once.
    let carried: HashSet<&Digest> = plan.items.iter().map(|i| &i.digest).collect();
    let mut counted = HashSet::new();
    let now = now_ms();
    for image in &plan.images {
        let (registry, repo) = (&image.name.registry, image.name.repository.as_str());
        for d in &image.digests {
            if !carried.contains(d) && counted.insert(d.clone()) {
                summary.already += 1;
            }
        }
        cache.link(registry, repo, &image.digests).await?;
        if let Some(tag) = image.name.tag() {
            let record = TagRecord {
                digest: image.root.to_string(),
                fetched_at_ms: now,
            };
            cache.set_tag(registry, repo, tag, record).await?;
        }
        if let Some(public) = image.public {
            if cache.openness(registry, repo).is_none() {
                cache.set_openness(registry, repo, public, now).await?;
            }
        }
        summary
            .images
            .push((image.name.clone(), image.root.clone()));
    }
    drop(held);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::super::progress::NoProgress;
    use super::super::{blob_name, LAYOUT_JSON, REF_NAME};
    use super::*;

    /// Tests look at the summary, not at the terminal.
    fn quiet() -> Arc<dyn Progress> {
        Arc::new(NoProgress)
    }

    /// A raw tar entry: name bytes written as they are, so tests can build
    /// what `tar::Builder` would refuse (`..`, absolute names).
    fn entry(tar: &mut tar::Builder<Vec<u8>>, name: &str, kind: tar::EntryType, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        if kind == tar::EntryType::Symlink {
            h.set_link_name("/etc/passwd").unwrap();
        }
        h.set_cksum();
        tar.append(&h, data).unwrap();
    }

    /// A one-image bundle: (layer, config, manifest, index.json) and extra
    /// entries; `edit` may change the blobs' bytes before they are written.
    struct Bundle {
        layer: Vec<u8>,
        config: Vec<u8>,
        manifest: Vec<u8>,
        manifest_size: u64,
        extra: Vec<(String, tar::EntryType, Vec<u8>)>,
    }

    impl Bundle {
        fn new() -> Self {
            let layer = vec![7u8; 5000];
            let config = b"{\"architecture\":\"amd64\"}".to_vec();
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": Digest::of(&config).to_string(), "size": config.len()},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": Digest::of(&layer).to_string(), "size": layer.len()}],
            })
            .to_string()
            .into_bytes();
            let manifest_size = manifest.len() as u64;
            Self {
                layer,
                config,
                manifest,
                manifest_size,
                extra: Vec::new(),
            }
        }

        fn manifest_digest(&self) -> Digest {
            Digest::of(&self.manifest)
        }

        fn write(&self, dir: &Path) -> PathBuf {
            let index = serde_json::json!({
                "schemaVersion": 2,
                "manifests": [{
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": self.manifest_digest().to_string(),
                    "size": self.manifest_size,
                    "annotations": {REF_NAME: "3.20", REGCACHE_REF: "docker.io/library/alpine:3.20",
                                    REGCACHE_PUBLIC: "true", REGCACHE_WITHHELD: ""},
                }],
            })
            .to_string();
            let mut tar = tar::Builder::new(Vec::new());
            let regular = tar::EntryType::Regular;
            entry(&mut tar, "oci-layout", regular, LAYOUT_JSON.as_bytes());
            entry(&mut tar, "blobs/", tar::EntryType::Directory, b"");
            // Blobs are named by the digest of the original bytes, whatever
            // a test did to them.
            let original = Bundle::new();
            for (orig, now) in [
                (&original.layer, &self.layer),
                (&original.config, &self.config),
                (&self.manifest, &self.manifest),
            ] {
                entry(&mut tar, &blob_name(&Digest::of(orig)), regular, now);
            }
            for (name, kind, data) in &self.extra {
                entry(&mut tar, name, *kind, data);
            }
            entry(&mut tar, "index.json", regular, index.as_bytes());
            let path = dir.join("bundle.tar");
            std::fs::write(&path, tar.into_inner().unwrap()).unwrap();
            path
        }
    }

    async fn import_into(
        dir: &Path,
        bundle: &Bundle,
    ) -> (Arc<Cache>, Result<ImportSummary, BundleError>) {
        let path = bundle.write(dir);
        let cache = open_cache(&dir.join("cache"), 1 << 30).unwrap();
        let result = import(&cache, &path, &Rules::default(), quiet()).await;
        (cache, result)
    }

    fn assert_untouched(dir: &Path, cache: &Cache) {
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.tags, stats.links), (0, 0, 0));
        let tmp = std::fs::read_dir(dir.join("cache/tmp")).unwrap().count();
        assert_eq!(tmp, 0, "staged files are removed");
        let blobs = std::fs::read_dir(dir.join("cache/blobs")).unwrap().count();
        assert_eq!(blobs, 0, "nothing under blobs/");
    }

    #[tokio::test]
    async fn a_good_bundle_is_committed_linked_and_tagged() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = Bundle::new();
        let (cache, result) = import_into(dir.path(), &bundle).await;
        let summary = result.unwrap();
        assert_eq!((summary.manifests, summary.blobs), (1, 2), "{summary}");
        assert!(summary.missing.is_empty());
        let m = bundle.manifest_digest();
        let tag = cache.tag("docker.io", "library/alpine", "3.20").unwrap();
        assert_eq!(tag.digest, m.to_string());
        assert!(now_ms() - tag.fetched_at_ms < 60_000, "fetched_at is now");
        for d in [&m, &Digest::of(&bundle.layer), &Digest::of(&bundle.config)] {
            assert!(cache.is_linked("docker.io", "library/alpine", d));
            assert!(cache.content_path(d).is_file());
        }
        let stored = cache.get(&m).unwrap();
        assert_eq!(
            &*stored.media_type,
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(
            &*cache.get(&Digest::of(&bundle.layer)).unwrap().media_type,
            ""
        );
        assert_eq!(
            cache.openness("docker.io", "library/alpine").map(|o| o.0),
            Some(true)
        );

        // Importing again adds nothing.
        let again = import(
            &cache,
            &bundle.write(dir.path()),
            &Rules::default(),
            quiet(),
        )
        .await
        .unwrap();
        assert_eq!((again.manifests, again.blobs, again.already), (0, 0, 3));
    }

    #[tokio::test]
    async fn an_image_the_rules_deny_or_never_store_refuses_the_bundle() {
        use crate::registry::rules::{Action, RuleSpec};
        for (action, cache_it, says) in [
            (Action::Deny, true, "is denied by regcache: rule 1"),
            (Action::Allow, false, "is never stored: rule 1"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let bundle = Bundle::new();
            let path = bundle.write(dir.path());
            let cache = open_cache(&dir.path().join("cache"), 1 << 30).unwrap();
            let rules = Rules::new(vec![RuleSpec {
                pattern: "library/*".into(),
                action,
                cache: cache_it,
                tag_ttl: None,
                max_unused: None,
            }])
            .unwrap();
            let err = import(&cache, &path, &rules, quiet()).await.unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
            assert_untouched(dir.path(), &cache);
        }
    }

    #[tokio::test]
    async fn a_flipped_byte_rejects_the_whole_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let mut bundle = Bundle::new();
        bundle.layer[4321] ^= 1;
        let (cache, result) = import_into(dir.path(), &bundle).await;
        let err = result.unwrap_err().to_string();
        let layer = Digest::of(&Bundle::new().layer);
        assert!(err.contains(layer.as_str()), "{err}");
        assert_untouched(dir.path(), &cache);
    }

    #[tokio::test]
    async fn a_size_that_differs_from_its_descriptor_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut bundle = Bundle::new();
        bundle.manifest_size += 1;
        let (cache, result) = import_into(dir.path(), &bundle).await;
        let err = result.unwrap_err();
        assert!(matches!(err, BundleError::Size { .. }), "{err}");
        assert_untouched(dir.path(), &cache);
    }

    #[tokio::test]
    async fn hostile_entries_are_refused_and_never_written() {
        for (name, kind) in [
            ("../escaped", tar::EntryType::Regular),
            ("/tmp/escaped", tar::EntryType::Regular),
            ("blobs/sha256/link", tar::EntryType::Symlink),
            ("index.json", tar::EntryType::Symlink),
            ("dev", tar::EntryType::Char),
            ("notes.txt", tar::EntryType::Regular),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut bundle = Bundle::new();
            bundle.extra.push((name.to_string(), kind, b"x".to_vec()));
            let (cache, result) = import_into(dir.path(), &bundle).await;
            let err = result.unwrap_err();
            assert!(matches!(err, BundleError::Entry { .. }), "{name}: {err}");
            assert!(!dir.path().parent().unwrap().join("escaped").exists());
            assert_untouched(dir.path(), &cache);
        }
    }

    #[tokio::test]
    async fn a_bundle_without_names_or_index_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open_cache(&dir.path().join("cache"), 1 << 30).unwrap();
        let mut tar = tar::Builder::new(Vec::new());
        entry(
            &mut tar,
            "oci-layout",
            tar::EntryType::Regular,
            LAYOUT_JSON.as_bytes(),
        );
        let path = dir.path().join("empty.tar");
        std::fs::write(&path, tar.into_inner().unwrap()).unwrap();
        let err = import(&cache, &path, &Rules::default(), quiet())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no index.json"), "{err}");
        std::fs::write(&path, b"this is not a tar file at all, not even close").unwrap();
        assert!(import(&cache, &path, &Rules::default(), quiet())
            .await
            .is_err());
        assert_untouched(dir.path(), &cache);
    }

    #[tokio::test]
    async fn a_bundle_larger_than_the_cache_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = Bundle::new().write(dir.path());
        let cache = open_cache(&dir.path().join("cache"), 1000).unwrap();
        let err = import(&cache, &path, &Rules::default(), quiet())
            .await
            .unwrap_err();
        assert!(matches!(err, BundleError::TooBig { .. }), "{err}");
        assert_untouched(dir.path(), &cache);
    }

    #[test]
    fn a_cache_held_by_a_running_regcache_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _held = open_cache(dir.path(), 1 << 20).unwrap();
        let err = open_cache(dir.path(), 1 << 20).err().unwrap().to_string();
        assert!(err.contains("stop it first"), "{err}");
    }

    /// An image manifest naming `config` and `layers`.
    fn manifest_of(config: &[u8], layers: &[&[u8]]) -> Vec<u8> {
        let layers: Vec<_> = layers
            .iter()
            .map(|l| {
                serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                        "digest": Digest::of(l).to_string(), "size": l.len()})
            })
            .collect();
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": Digest::of(config).to_string(), "size": config.len()},
            "layers": layers,
        })
        .to_string()
        .into_bytes()
    }

    /// One image of [`write_images`]: reference, public, withheld (None: no
    /// annotation), manifest.
    type Img<'a> = (&'a str, bool, Option<String>, &'a [u8]);

    /// A bundle of `images` carrying `blobs` (and every manifest).
    fn write_images(path: &Path, images: &[Img<'_>], blobs: &[&[u8]]) -> PathBuf {
        let manifests: Vec<_> = images
            .iter()
            .map(|(name, public, withheld, m)| {
                let mut a =
                    serde_json::json!({REGCACHE_REF: name, REGCACHE_PUBLIC: public.to_string()});
                if let Some(w) = withheld {
                    a[REGCACHE_WITHHELD] = serde_json::Value::from(w.as_str());
                }
                serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                   "digest": Digest::of(m).to_string(), "size": m.len(),
                                   "annotations": a})
            })
            .collect();
        let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests}).to_string();
        let mut tar = tar::Builder::new(Vec::new());
        let regular = tar::EntryType::Regular;
        entry(&mut tar, "oci-layout", regular, LAYOUT_JSON.as_bytes());
        let mut all: Vec<&[u8]> = blobs.to_vec();
        all.extend(images.iter().map(|i| i.3));
        let mut done = HashSet::new();
        for b in all {
            if done.insert(Digest::of(b)) {
                entry(&mut tar, &blob_name(&Digest::of(b)), regular, b);
            }
        }
        entry(&mut tar, "index.json", regular, index.as_bytes());
        std::fs::write(path, tar.into_inner().unwrap()).unwrap();
        path.to_path_buf()
    }

    /// team/secret (private) and attacker/pub (public), whose manifest names
    /// the private layer: (secret config, layer, attacker config, secret
    /// manifest, attacker manifest).
    fn hostile_pair() -> [Vec<u8>; 5] {
        let (config, layer, own) = (
            b"{\"s\":1}".to_vec(),
            vec![9u8; 3000],
            b"{\"a\":1}".to_vec(),
        );
        let secret = manifest_of(&config, &[&layer]);
        let hostile = manifest_of(&own, &[&layer]);
        [config, layer, own, secret, hostile]
    }

    const SECRET: &str = "docker.io/team/secret:1";
    const EVIL: &str = "docker.io/attacker/pub:evil";

    #[tokio::test]
    async fn a_withheld_digest_is_never_linked_to_the_image_it_was_withheld_from() {
        let dir = tempfile::tempdir().unwrap();
        let [config, layer, own, secret, hostile] = hostile_pair();
        let l = Digest::of(&layer);
        let path = write_images(
            &dir.path().join("b.tar"),
            &[
                (EVIL, true, Some(l.to_string()), &hostile),
                (SECRET, false, Some(String::new()), &secret),
            ],
            &[&config, &layer, &own],
        );
        let cache = open_cache(&dir.path().join("cache"), 1 << 30).unwrap();
        let summary = import(&cache, &path, &Rules::default(), quiet())
            .await
            .unwrap();
        assert!(!cache.is_linked("docker.io", "attacker/pub", &l));
        assert!(cache.is_linked("docker.io", "team/secret", &l));
        for d in [Digest::of(&hostile), Digest::of(&own)] {
            assert!(cache.is_linked("docker.io", "attacker/pub", &d));
        }
        assert_eq!(summary.not_linked.len(), 1, "{summary}");
        assert_eq!(summary.not_linked[0].1, l);
        assert!(
            summary.to_string().contains("1 digest not linked"),
            "{summary}"
        );
        assert!(
            cache.content_path(&l).is_file(),
            "committed for team/secret"
        );
    }

    #[tokio::test]
    async fn an_older_bundle_links_only_each_images_top_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let [config, layer, own, secret, hostile] = hostile_pair();
        // Without the annotation a hostile image that names a private
        // layer cannot be told from an image and its own layers, whether
        // or not the private image is in the bundle too: nothing but the
        // top manifests is linked (pulls re-earn the rest).
        let path = write_images(
            &dir.path().join("b.tar"),
            &[(EVIL, true, None, &hostile), (SECRET, false, None, &secret)],
            &[&config, &layer, &own],
        );
        let cache = open_cache(&dir.path().join("cache"), 1 << 30).unwrap();
        let summary = import(&cache, &path, &Rules::default(), quiet())
            .await
            .unwrap();
        let l = Digest::of(&layer);
        assert!(!cache.is_linked("docker.io", "attacker/pub", &l));
        assert!(!cache.is_linked("docker.io", "attacker/pub", &Digest::of(&own)));
        assert!(cache.is_linked("docker.io", "attacker/pub", &Digest::of(&hostile)));
        assert!(cache.is_linked("docker.io", "team/secret", &Digest::of(&secret)));
        assert!(!cache.is_linked("docker.io", "team/secret", &l));
        assert!(cache.content_path(&l).is_file(), "the content is imported");
        // hostile: own config + layer; secret: config + layer.
        assert_eq!(summary.not_linked.len(), 4, "{summary}");
        // The hostile image alone, as an older exporter wrote it (carrying
        // the private layer): still nothing of it but its manifest.
        let alone = write_images(
            &dir.path().join("alone.tar"),
            &[(EVIL, true, None, &hostile)],
            &[&layer, &own],
        );
        let fresh = open_cache(&dir.path().join("fresh"), 1 << 30).unwrap();
        import(&fresh, &alone, &Rules::default(), quiet())
            .await
            .unwrap();
        assert!(!fresh.is_linked("docker.io", "attacker/pub", &l));
    }

    #[tokio::test]
    async fn content_the_bundle_does_not_carry_is_linked_only_if_already_linked_there() {
        let dir = tempfile::tempdir().unwrap();
        let [config, layer, own, secret, hostile] = hostile_pair();
        let cache = open_cache(&dir.path().join("cache"), 1 << 30).unwrap();
        let first = write_images(
            &dir.path().join("secret.tar"),
            &[(SECRET, false, Some(String::new()), &secret)],
            &[&config, &layer],
        );
        import(&cache, &first, &Rules::default(), quiet())
            .await
            .unwrap();
        // A later bundle names the cached private layer without carrying it
        // (and withholds nothing): the cache's copy is not linked to it.
        let second = write_images(
            &dir.path().join("evil.tar"),
            &[(EVIL, true, Some(String::new()), &hostile)],
            &[&own],
        );
        let summary = import(&cache, &second, &Rules::default(), quiet())
            .await
            .unwrap();
        let l = Digest::of(&layer);
        assert!(!cache.is_linked("docker.io", "attacker/pub", &l));
        assert_eq!(summary.not_linked, [(ImageRef::parse(EVIL).unwrap(), l)]);
        // Nor may index.json point a tag at a cached manifest of another
        // repository that the bundle does not carry.
        let third = dir.path().join("third.tar");
        let mut tar = tar::Builder::new(Vec::new());
        let regular = tar::EntryType::Regular;
        entry(&mut tar, "oci-layout", regular, LAYOUT_JSON.as_bytes());
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": Digest::of(&secret).to_string(), "size": secret.len(),
            "annotations": {REGCACHE_REF: EVIL, REGCACHE_PUBLIC: "true", REGCACHE_WITHHELD: ""}}]})
        .to_string();
        entry(&mut tar, "index.json", regular, index.as_bytes());
        std::fs::write(&third, tar.into_inner().unwrap()).unwrap();
        let err = import(&cache, &third, &Rules::default(), quiet())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not contain"), "{err}");
        assert!(!cache.is_linked("docker.io", "attacker/pub", &Digest::of(&secret)));
    }

    #[tokio::test]
    async fn a_bad_withheld_annotation_refuses_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let [config, layer, _, secret, _] = hostile_pair();
        for bad in ["sha256:nope".to_string(), Digest::of(&secret).to_string()] {
            let path = write_images(
                &dir.path().join("b.tar"),
                &[(SECRET, false, Some(bad.clone()), &secret)],
                &[&config, &layer],
            );
            let cache = open_cache(&dir.path().join(format!("c{}", bad.len())), 1 << 30).unwrap();
            let err = import(&cache, &path, &Rules::default(), quiet())
                .await
                .unwrap_err();
            assert!(matches!(err, BundleError::Layout(_)), "{bad}: {err}");
            assert_eq!(cache.stats().links, 0);
        }
    }
}
