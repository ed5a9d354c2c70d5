//! Offline registries (`offline = true`): answered from the cache alone.
//!
//! No upstream is contacted, ever: tags resolve to what the cache holds
//! whatever their age, digests are served when cached and linked to the
//! repository or public through some repository (the verdict of
//! [`crate::registry::link`] with no registry to confirm), and everything else answers 404 at once (with a log line),
//! so clients fail fast instead of waiting for a network that is not there.
//! With no upstream to judge credentials, cached content is served to every
//! client allowed on the proxy: `allow` and `proxy_users` guard it.

use http::request::Parts;
use http::{Method, StatusCode};

use super::{blobs, error_json, manifests, mirror, CacheStatus, Served, Target};
use crate::app::App;
use crate::registry::error::ErrorCode;
use crate::registry::link::{verdict, LinkVerdict};
use crate::registry::route::{Reference, Route};

/// Serves a request for an offline registry.
pub async fn serve(app: &App, target: &Target, route: Route, parts: &Parts) -> Served {
    let registry = &target.registry;
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return Served::new(
            error_json(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::Unsupported,
                &format!("{registry} is offline: only pulls are served"),
            ),
            CacheStatus::Pass,
        );
    }
    match route {
        Route::Base => Served::new(mirror::base_response(), CacheStatus::Hit),
        Route::Manifest { name, reference } => {
            let repo = name.as_str();
            let digest = match &reference {
                Reference::Digest(d) => Some(d.clone()),
                Reference::Tag(tag) => app
                    .cache
                    .tag(registry, repo, tag)
                    .and_then(|r| r.digest.parse().ok()),
            };
            let found = digest
                .filter(|d| servable(app, registry, repo, d))
                .and_then(|d| manifests::usable(app, &d, parts));
            if let Some(cached) = found {
                if let Some(served) =
                    manifests::from_cache(app, &cached, parts, CacheStatus::Hit).await
                {
                    return served;
                }
            }
            missing(
                target,
                &format!("{repo}:{reference}"),
                ErrorCode::ManifestUnknown,
            )
        }
        Route::Blob { name, digest } => {
            let repo = name.as_str();
            if servable(app, registry, repo, &digest) {
                if let Some(served) = blobs::from_cache(app, parts, &digest).await {
                    return served;
                }
            }
            missing(target, &format!("{repo}@{digest}"), ErrorCode::BlobUnknown)
        }
        Route::Other => missing(target, "this request", ErrorCode::Unsupported),
    }
}

/// Whether `digest` may be served through `repo` with no registry to ask.
fn servable(app: &App, registry: &str, repo: &str, digest: &crate::registry::Digest) -> bool {
    verdict(app.cache.link_facts(registry, repo, digest)) == LinkVerdict::Serve
}

fn missing(target: &Target, what: &str, code: ErrorCode) -> Served {
    tracing::info!(registry = %target.registry, what, "offline: not in the cache");
    Served::new(
        error_json(
            StatusCode::NOT_FOUND,
            code,
            &format!("{what} is not cached, and {} is offline", target.registry),
        ),
        CacheStatus::Miss,
    )
}
