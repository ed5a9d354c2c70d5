//! `regcache prefetch`: fills the cache from upstream through the same code
//! path as a pull, so that an image is there before anyone asks (and can be
//! exported to an air-gapped site).
//!
//! For each image: the manifest is fetched as a client would fetch it; an
//! image index brings every platform's manifest (or those chosen with
//! `--platform`); then every blob those manifests are made of
//! ([`crate::registry::manifest::children`]: not a `subject`, which names
//! another image). Requests carry no client credential, so only what the
//! registry serves anonymously (or to regcache's own account, for public
//! repositories) is fetched.

use std::sync::Arc;

use bytes::Bytes;
use http::header::ACCEPT;
use http::request::Parts;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde::Deserialize;

use crate::registry::digest::Digest;
use crate::registry::manifest::children;
use crate::registry::media::{is_index, manifest_media_type};
use crate::registry::reference::ImageRef;
use crate::registry::route::Reference;
use crate::serve::state::State;
use crate::serve::{blobs, manifests, Origin, RepoRequest, Served, Target};

pub mod warm;

/// Every manifest type regcache understands, for the `Accept` header.
const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Why an image could not be prefetched.
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    /// The reference is not an image reference.
    #[error("{0:?} is not an image reference like alpine:3.20 or ghcr.io/org/tool@sha256:…")]
    BadReference(String),
    /// Upstream (or regcache) refused a part of the image.
    #[error("{what}: {status} {detail}")]
    Refused {
        /// The manifest or blob.
        what: String,
        /// The answer's status.
        status: StatusCode,
        /// Its body, shortened.
        detail: String,
    },
    /// An image rule refuses the image or says it is never stored.
    #[error("{0}")]
    Ruled(String),
    /// A body broke off.
    #[error("{what}: {reason}")]
    Body {
        /// The manifest or blob.
        what: String,
        /// Why.
        reason: String,
    },
}

/// What one image's prefetch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Manifests (index included) fetched or found.
    pub manifests: usize,
    /// Blobs fetched or found.
    pub blobs: usize,
    /// Bytes of blobs.
    pub bytes: u64,
    /// Of those blobs, how many were already cached.
    pub already_cached: usize,
}

#[derive(Deserialize)]
struct IndexDoc {
    #[serde(default)]
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
struct IndexEntry {
    digest: String,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

impl Platform {
    /// Whether `wanted` (`os/arch` or `os/arch/variant`) names this platform.
    fn matches(&self, wanted: &str) -> bool {
        let mut parts = wanted.split('/');
        let os = parts.next().unwrap_or("");
        let arch = parts.next().unwrap_or("");
        let variant = parts.next();
        self.os == os
            && self.architecture == arch
            && variant.is_none_or(|v| self.variant.as_deref() == Some(v))
    }
}

/// The manifests of the image index `body` for `platforms` (`linux/amd64`,
/// …; every one when empty); the error says why the index is unreadable.
pub fn index_platforms(body: &[u8], platforms: &[String]) -> Result<Vec<Digest>, String> {
    let doc: IndexDoc =
        serde_json::from_slice(body).map_err(|e| format!("unreadable index ({e})"))?;
    Ok(doc
        .manifests
        .into_iter()
        .filter(|entry| {
            platforms.is_empty()
                || entry
                    .platform
                    .as_ref()
                    .is_some_and(|p| platforms.iter().any(|w| p.matches(w)))
        })
        .filter_map(|entry| entry.digest.parse::<Digest>().ok())
        .collect())
}

/// An image to prefetch: what it names, and the upstream it comes from.
struct Source {
    image: ImageRef,
    target: Target,
}

/// The image `reference` names and the upstream target it comes from.
fn parse(reference: &str) -> Result<Source, PrefetchError> {
    let bad = || PrefetchError::BadReference(reference.to_string());
    let image = ImageRef::parse(reference).map_err(|_| bad())?;
    let (host, port) = image.upstream();
    let origin = Origin::https(&host, port).map_err(|_| bad())?;
    Ok(Source {
        image,
        target: Target::new(origin),
    })
}

/// A GET request head for `path`, as a client accepting every manifest type sends it.
fn request_parts(path: &str) -> Result<Parts, PrefetchError> {
    request_head(Method::GET, path)
}

/// A request head of `method` for `path`, accepting every manifest type.
fn request_head(method: Method, path: &str) -> Result<Parts, PrefetchError> {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(ACCEPT, ACCEPT_ALL)
        .body(())
        .map_err(|e| PrefetchError::Body {
            what: path.to_string(),
            reason: e.to_string(),
        })?;
    Ok(req.into_parts().0)
}

/// Reads a served answer to the end; Err on a refusal or a broken body.
/// `on_bytes` sees each chunk's length (for progress).
async fn drain(
    served: Served,
    what: &str,
    mut on_bytes: impl FnMut(u64),
) -> Result<(Bytes, bool, Option<String>), PrefetchError> {
    let hit = served
        .resp
        .headers()
        .get("x-cache")
        .is_some_and(|v| v.as_bytes() == b"HIT");
    let content_type = served
        .resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let status = served.resp.status();
    let mut body = served.resp.into_body();
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| PrefetchError::Body {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
        if let Ok(data) = frame.into_data() {
            on_bytes(data.len() as u64);
            // Keep manifests (small) and error bodies; blobs are only counted.
            if status != StatusCode::OK || kept.len() < 4 * 1024 * 1024 {
                kept.extend_from_slice(&data);
            }
        }
    }
    if status != StatusCode::OK {
        let detail: String = String::from_utf8_lossy(&kept).chars().take(200).collect();
        return Err(PrefetchError::Refused {
            what: what.to_string(),
            status,
            detail: detail.trim().to_string(),
        });
    }
    Ok((Bytes::from(kept), hit, content_type))
}

/// Prefetches one image; `platforms` (`linux/amd64`, …) limits an index to
/// those platforms (all when empty). `on_bytes` sees blob bytes as they come.
pub async fn prefetch(
    state: &Arc<State>,
    reference: &str,
    platforms: &[String],
    mut on_bytes: impl FnMut(u64),
) -> Result<Fetched, PrefetchError> {
    let Source { image, target } = parse(reference)?;
    let name = &image.repository;
    let rules = &state.config.rules;
    let rule = rules.decide(&target.registry, name.as_str());
    if rule.is_denied() {
        return Err(PrefetchError::Ruled(rules.denial_message(
            &rule,
            &target.registry,
            name.as_str(),
        )));
    }
    if !rule.cache {
        let which = rule.rule.and_then(|n| rules.rule(n));
        return Err(PrefetchError::Ruled(format!(
            "{}/{name} is never stored: {} says cache = false",
            target.registry,
            which.map_or_else(|| "a rule".to_string(), ToString::to_string)
        )));
    }
    let mut fetched = Fetched::default();
    let mut manifests_todo = vec![image.reference.clone()];
    let mut blobs_todo: Vec<Digest> = Vec::new();
    while let Some(reference) = manifests_todo.pop() {
        let path = format!("/v2/{name}/manifests/{reference}");
        let parts = request_parts(&path)?;
        let req = RepoRequest::new(state, &target, name, &parts, rule);
        let served = manifests::serve(&req, &reference).await;
        let what = format!("{}/{name}:{reference}", target.registry);
        let (body, _, content_type) = drain(served, &what, |_| {}).await?;
        fetched.manifests += 1;
        let media_type = manifest_media_type(content_type.as_deref(), &body);
        if is_index(&media_type) {
            let chosen =
                index_platforms(&body, platforms).map_err(|reason| PrefetchError::Body {
                    what: what.clone(),
                    reason,
                })?;
            manifests_todo.extend(chosen.into_iter().map(Reference::Digest));
        } else {
            for child in children(&body) {
                if !blobs_todo.contains(&child.digest) {
                    blobs_todo.push(child.digest);
                }
            }
        }
    }
    for digest in blobs_todo {
        let path = format!("/v2/{name}/blobs/{digest}");
        let parts = request_parts(&path)?;
        let req = RepoRequest::new(state, &target, name, &parts, rule);
        let served = blobs::serve(&req, &digest).await;
        let what = format!("{}/{name}@{digest}", target.registry);
        let mut bytes = 0;
        let (_, hit, _) = drain(served, &what, |n| {
            bytes += n;
            on_bytes(n);
        })
        .await?;
        // The last byte came once the digest matched; the entry is
        // committed right after. Wait for it: this process may exit next.
        state.cache.committed(&digest).await;
        fetched.blobs += 1;
        fetched.bytes += bytes;
        fetched.already_cached += usize::from(hit);
    }
    Ok(fetched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_registry_repository_and_reference() {
        let r = parse("alpine:3.20").unwrap();
        assert_eq!(r.target.origin.authority.as_str(), "registry-1.docker.io");
        assert_eq!(r.target.registry, "docker.io");
        assert_eq!(r.image.repository.as_str(), "library/alpine");
        assert_eq!(r.image.reference.to_string(), "3.20");
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let r = parse(&format!("ghcr.io/org/tool@{d}")).unwrap();
        assert_eq!(r.target.origin.authority.as_str(), "ghcr.io");
        assert_eq!(r.image.reference.to_string(), d);
        let r = parse("localhost:5000/team/app:1").unwrap();
        assert_eq!(r.target.origin.authority.as_str(), "localhost:5000");
        assert!(parse("UPPER/case:1").is_err());
        assert!(parse("x@sha256:short").is_err());
    }

    #[test]
    fn platform_filter() {
        let p = Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: Some("v8".into()),
        };
        assert!(p.matches("linux/arm64"));
        assert!(p.matches("linux/arm64/v8"));
        assert!(!p.matches("linux/arm64/v7"));
        assert!(!p.matches("linux/amd64"));
    }
}
