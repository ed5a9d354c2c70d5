//! Keep warm (`prefetch_file`, `prefetch_interval`): a list of images
//! refreshed in the background, so that they are current and there when the
//! upstream is not.
//!
//! Every run reads the file again. A tag is checked with a `HEAD` through the
//! same path as a client's (revalidation, rules, sharing), its freshness
//! ignored so that every run asks upstream; when the registry names the
//! cached digest and everything the image is made of (the chosen platforms
//! of an index) is cached, nothing else is asked: Docker Hub does not count
//! a `HEAD` as a pull. Otherwise, and for a digest that is not complete,
//! the image is fetched as `regcache prefetch` fetches it. Looking at the
//! cached content counts as using it, so `max_unused` keeps warm images.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};

use super::{index_platforms, parse, prefetch, request_head, Source};
use crate::metrics::WarmStatus;
use crate::registry::digest::Digest;
use crate::registry::manifest::children;
use crate::registry::media::{is_index, manifest_media_type};
use crate::registry::reference::ImageRef;
use crate::registry::route::Reference;
use crate::serve::state::State;
use crate::serve::{manifests, CacheStatus, RepoRequest};

/// The largest manifest the completeness check reads.
const MAX_MANIFEST: u64 = 4 * 1024 * 1024;

/// One line of the list: an image and the platforms to keep of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmImage {
    /// The reference as written (`alpine:3.20`, `ghcr.io/org/tool@sha256:…`).
    pub reference: String,
    /// `--platform` filters (`linux/amd64`); empty: every platform.
    pub platforms: Vec<String>,
}

/// Reads the list: one image per line, `#` starts a comment, each image
/// optionally followed by `--platform OS/ARCH[/VARIANT]` (repeatable, also
/// `--platform=…`). Bad lines come back as messages naming their number;
/// the others are still kept warm.
pub fn parse_list(text: &str) -> (Vec<WarmImage>, Vec<String>) {
    let (mut images, mut errors) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        let Some(reference) = words.next() else {
            continue;
        };
        let mut platforms = Vec::new();
        let mut bad = ImageRef::parse(reference).err().map(|e| e.to_string());
        while let Some(word) = words.next() {
            let value = match word.strip_prefix("--platform") {
                Some("") => words.next(),
                Some(rest) => rest.strip_prefix('='),
                None => None,
            };
            match value.filter(|v| v.split('/').count() >= 2 && !v.contains("//")) {
                Some(p) => platforms.push(p.to_string()),
                None => {
                    bad.get_or_insert_with(|| {
                        format!("{word:?}: after the image only --platform OS/ARCH may follow")
                    });
                }
            }
        }
        match bad {
            Some(why) => errors.push(format!("line {}: {reference}: {why}", i + 1)),
            None => images.push(WarmImage {
                reference: reference.to_string(),
                platforms,
            }),
        }
    }
    (images, errors)
}

/// What a run did with one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Unchanged upstream (a `HEAD`) and complete in the cache.
    Unchanged,
    /// Fetched: it changed, or something of it was missing.
    Updated,
}

/// Runs the list in `file` every `every`, the first run at once.
pub async fn keep_warm(state: Arc<State>, file: std::path::PathBuf, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let status = run(&state, &file).await;
        crate::metrics::get().warm_run_done(status);
    }
}

/// One run over the list in `file`: each image checked, logged and counted.
pub async fn run(state: &Arc<State>, file: &Path) -> WarmStatus {
    let mut status = WarmStatus::default();
    let metrics = crate::metrics::get();
    let fail = |status: &mut WarmStatus, why: String| {
        status.failed += 1;
        metrics.warm_image("failed");
        status.last_error = Some(why);
    };
    match tokio::fs::read_to_string(file).await {
        Err(e) => {
            let why = format!("cannot read prefetch_file {}: {e}", file.display());
            tracing::warn!(error = %why, "keep-warm run skipped");
            fail(&mut status, why);
        }
        Ok(text) => {
            let (images, errors) = parse_list(&text);
            for why in errors {
                let why = format!("{}: {why}", file.display());
                tracing::warn!(error = %why, "keep-warm: a line of prefetch_file is not an image");
                fail(&mut status, why);
            }
            for image in &images {
                status.images += 1;
                match warm(state, image).await {
                    Ok(Outcome::Unchanged) => {
                        status.unchanged += 1;
                        metrics.warm_image("unchanged");
                        tracing::info!(image = %image.reference, result = "unchanged", "kept warm");
                    }
                    Ok(Outcome::Updated) => {
                        status.updated += 1;
                        metrics.warm_image("updated");
                        tracing::info!(image = %image.reference, result = "updated", "kept warm");
                    }
                    Err(why) => {
                        tracing::warn!(image = %image.reference, error = %why, "cannot keep an image warm");
                        fail(&mut status, format!("{}: {why}", image.reference));
                    }
                }
            }
        }
    }
    status.last_run_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    tracing::info!(
        images = status.images,
        unchanged = status.unchanged,
        updated = status.updated,
        failed = status.failed,
        "keep-warm run done"
    );
    status
}

/// Checks one image, fetching it when it changed or is incomplete.
async fn warm(state: &Arc<State>, image: &WarmImage) -> Result<Outcome, String> {
    let Source {
        image: name,
        target,
    } = parse(&image.reference).map_err(|e| e.to_string())?;
    let repo = &name.repository;
    let digest = match &name.reference {
        Reference::Digest(d) => Some(d.clone()),
        Reference::Tag(_) => {
            let rules = &state.config.rules;
            let rule = rules.decide(&target.registry, repo.as_str());
            if rule.is_denied() {
                return Err(rules.denial_message(&rule, &target.registry, repo.as_str()));
            }
            let path = format!("/v2/{repo}/manifests/{}", name.reference);
            let parts = request_head(Method::HEAD, &path).map_err(|e| e.to_string())?;
            // Ask upstream whatever the tag's freshness: this is the check.
            let ask = crate::registry::rules::Decision {
                tag_ttl: Some(Duration::ZERO),
                ..rule
            };
            let req = RepoRequest::new(state, &target, repo, &parts, ask);
            let served = manifests::serve(&req, &name.reference).await;
            let status = served.resp.status();
            if status != StatusCode::OK {
                return Err(format!("the registry answered {status} to a HEAD"));
            }
            if served.cache == CacheStatus::Stale {
                return Err("the registry is unreachable; the cached image is served".into());
            }
            let unchanged = matches!(served.cache, CacheStatus::Hit | CacheStatus::Revalidated);
            served
                .resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<Digest>().ok())
                .filter(|_| unchanged)
        }
    };
    if let Some(digest) = digest {
        if complete(state, &digest, &image.platforms).await {
            return Ok(Outcome::Unchanged);
        }
    }
    prefetch(state, &image.reference, &image.platforms, |_| {})
        .await
        .map(|_| Outcome::Updated)
        .map_err(|e| e.to_string())
}

/// Whether the manifest `digest` and everything it is made of (an index:
/// the chosen platforms' manifests and theirs) are cached. Each entry
/// looked at counts as used.
async fn complete(state: &State, digest: &Digest, platforms: &[String]) -> bool {
    let mut todo = vec![(digest.clone(), true)];
    while let Some((digest, top)) = todo.pop() {
        let Some(cached) = state.cache.get(&digest) else {
            return false;
        };
        if cached.size > MAX_MANIFEST {
            return false;
        }
        let Ok(body) = tokio::fs::read(&cached.path).await else {
            return false;
        };
        let media_type = manifest_media_type(Some(&cached.media_type), &body);
        if is_index(&media_type) {
            if !top {
                return false;
            }
            match index_platforms(&body, platforms) {
                Ok(chosen) => todo.extend(chosen.into_iter().map(|d| (d, false))),
                Err(_) => return false,
            }
        } else if children(&body)
            .iter()
            .any(|child| state.cache.get(&child.digest).is_none())
        {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_has_an_image_per_line_with_platforms_and_bad_lines_named() {
        let text = "\
# base images
alpine:3.20
ghcr.io/org/tool@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  # pinned
python:3.12 --platform linux/amd64 --platform=linux/arm64/v8

UPPER:case
nginx --plat linux/amd64
busybox --platform amd64
";
        let (images, errors) = parse_list(text);
        let want = |r: &str, p: &[&str]| WarmImage {
            reference: r.into(),
            platforms: p.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            images,
            vec![
                want("alpine:3.20", &[]),
                want(
                    "ghcr.io/org/tool@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                    &[]
                ),
                want("python:3.12", &["linux/amd64", "linux/arm64/v8"]),
            ]
        );
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].starts_with("line 6: UPPER:case"), "{errors:?}");
        assert!(
            errors[1].starts_with("line 7: nginx: \"--plat\""),
            "{errors:?}"
        );
        assert!(errors[2].starts_with("line 8: busybox"), "{errors:?}");
    }
}
