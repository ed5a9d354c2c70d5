//! Offline registries (`offline = true`): answered from the cache alone.
//!
//! No upstream is contacted, ever: tags resolve to what the cache holds
//! whatever their age, digests are served when cached and linked to the
//! repository or public through some repository (the verdict of
//! [`crate::registry::link`] with no registry to confirm), and everything
//! else answers 404 at once (with a log line), so clients fail fast instead of waiting for a network that is not there.
//!
//! With no upstream to judge credentials, only content of repositories known
//! public (the registry was seen to accept an anonymous pull, or an imported
//! bundle said so) is served to every client. Content of any other
//! repository is served only to proxy users (a request whose
//! `Proxy-Authorization` named a user of `proxy_users`) or, when the operator
//! chose so, to everyone (`offline_share_private = true`); anyone else gets
//! 403 whether or not the repository is cached, so the answer does not tell
//! which private images are there
//! ([`crate::registry::sharing::offline_verdict`]).

use std::sync::Arc;

use http::request::Parts;
use http::{Method, StatusCode};

use super::state::State;
use super::{blobs, error_json, manifests, mirror, CacheStatus, RepoRequest, Served, Target};
use crate::access::ProxyUser;
use crate::registry::error::ErrorCode;
use crate::registry::link::{self, LinkVerdict};
use crate::registry::route::{Reference, Route};
use crate::registry::rules::Decision;
use crate::registry::sharing::{offline_verdict, OfflineVerdict, Openness};

/// The 403 for a repository an offline registry does not serve to this
/// request, with a log line naming the rule.
fn refused(target: &Target, repo: &str) -> Served {
    tracing::warn!(
        registry = %target.registry,
        repo,
        "offline: repository not known public; its content is served only to proxy users (proxy_users) or with offline_share_private = true (403)"
    );
    Served::new(
        error_json(
            StatusCode::FORBIDDEN,
            ErrorCode::Denied,
            &format!(
                "{} is offline and serves repositories not known public only to proxy users",
                target.registry
            ),
        ),
        CacheStatus::Pass,
    )
}

/// Serves a request for an offline registry.
pub async fn serve(
    state: &Arc<State>,
    target: &Target,
    route: Route,
    parts: &Parts,
    rule: Decision,
) -> Served {
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
    let proxy_user = parts.extensions.get::<ProxyUser>().is_some();
    let allowed = |repo: &str| {
        let openness = state
            .cache
            .openness(registry, repo)
            .map(|(public, _)| Openness::of(public));
        offline_verdict(openness, proxy_user, state.config.offline_share_private)
            != OfflineVerdict::Refused
    };
    match route {
        Route::Base => Served::new(mirror::base_response(), CacheStatus::Hit),
        Route::Manifest { name, .. } | Route::Blob { name, .. } | Route::Referrers { name, .. }
            if !allowed(name.as_str()) =>
        {
            refused(target, name.as_str())
        }
        Route::Manifest { name, reference } => {
            let req = RepoRequest::new(state, target, &name, parts, rule);
            let repo = name.as_str();
            let digest = match &reference {
                Reference::Digest(d) => Some(d.clone()),
                Reference::Tag(tag) => state
                    .cache
                    .tag(registry, repo, tag)
                    .and_then(|r| r.digest.parse().ok()),
            };
            let found = digest
                .filter(|d| servable(state, registry, repo, d))
                .and_then(|d| manifests::usable(&req, &d));
            if let Some(cached) = found {
                if let Some(served) = manifests::from_cache(&req, &cached, CacheStatus::Hit).await {
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
            if servable(state, registry, repo, &digest) {
                let req = RepoRequest::new(state, target, &name, parts, rule);
                if let Some(served) = blobs::from_cache(&req, &digest).await {
                    return served;
                }
            }
            missing(target, &format!("{repo}@{digest}"), ErrorCode::BlobUnknown)
        }
        Route::Referrers { name, digest } => {
            let req = RepoRequest::new(state, target, &name, parts, rule);
            if let Some(served) = super::referrers::offline(&req, &digest).await {
                return served;
            }
            missing(
                target,
                &format!("the referrers of {}@{digest}", name.as_str()),
                ErrorCode::ManifestUnknown,
            )
        }
        Route::Other => missing(target, "this request", ErrorCode::Unsupported),
    }
}

/// Whether `digest` may be served through `repo` with no registry to ask.
/// Openness is the last finding however old (`public_since` 0): there is no
/// registry to ask again, as for [`serve`]'s own check of the repository.
fn servable(state: &State, registry: &str, repo: &str, digest: &crate::registry::Digest) -> bool {
    link::verdict(state.cache.link_facts(registry, repo, digest, 0)) == LinkVerdict::Serve
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
