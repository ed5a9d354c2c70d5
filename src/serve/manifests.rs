//! `GET`/`HEAD /v2/<name>/manifests/<reference>`.
//!
//! - By digest: immutable. Served from the cache when allowed by the
//!   request's `Accept` and linked to this repository (or public through
//!   some repository); no upstream contact. A guarded one linked only to
//!   other repositories of the registry needs the registry's `HEAD` in this
//!   repository first; one known only from other registries is fetched
//!   ([`crate::registry::link`]).
//! - By tag: served from the cache while fresh (`tag_ttl`); then revalidated
//!   with a `HEAD` upstream (never a GET, which Docker Hub counts as a pull):
//!   same digest, served cached (REVALIDATED); changed, fetched and stored;
//!   upstream unreachable, 5xx or 429, served stale with `Warning: 110`;
//!   404, answered 404 and the tag forgotten. Concurrent requests for one
//!   stale or unknown tag make a single upstream request ([`super::coalesce`]).
//! - With a shared tier ([`crate::shared`]), a manifest missing here is
//!   first looked for there, by the digest a `HEAD` upstream names for this
//!   request (no counted pull); missing there too, one node of the cluster
//!   fetches it (its lease) and uploads it, while the others wait for it.
//! - A fetched manifest is verified against its digest, stored with its media
//!   type, and linked to the repository. The digests it names are not: a
//!   manifest's content never grants access to anything.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, ETAG};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

use super::coalesce::Turn;
use super::link::{self, Access, Kind};
use super::sharing;
use super::{error_json, passthrough, upstream_uri, CacheStatus, RepoRequest, Served};
use crate::cache::freshness::{
    after_revalidation, classify, now_ms, Revalidation, TagAction, TagRecord,
};
use crate::cache::read::must_verify;
use crate::cache::Cached;
use crate::http::body::{self, Body};
use crate::registry::digest::{Digest, DigestHasher};
use crate::registry::error::ErrorCode;
use crate::registry::media::{accepts, manifest_media_type};
use crate::registry::route::Reference;
use crate::shared::{Claim, Lease, SharedObject, SharedStore, Waited, MAX_CLUSTER_WAIT};

/// The largest manifest regcache accepts (distribution's limit too).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// Serves a manifest request.
pub async fn serve(req: &RepoRequest<'_>, reference: &Reference) -> Served {
    match reference {
        Reference::Digest(digest) => by_digest(req, digest).await,
        Reference::Tag(tag) => by_tag(req, tag).await,
    }
}

async fn by_digest(req: &RepoRequest<'_>, digest: &Digest) -> Served {
    let cache = &req.state.cache;
    let (target, repo) = (req.target, req.repo());
    if let Some(cached) = usable(req, digest) {
        let facts = cache.link_facts(&target.registry, repo, digest, req.state.public_since());
        match link::resolve(req, digest, facts, Kind::Manifest).await {
            Err(refused) => return *refused,
            Ok(Access::Serve) => {
                if let Err(refused) = sharing::check(req).await {
                    return *refused;
                }
                if let Some(served) = from_cache(req, &cached, CacheStatus::Hit).await {
                    return served;
                }
            }
            Ok(Access::Fetch) => {}
        }
    }
    fetch(req, None, Some(digest)).await
}

/// How a leader's upstream lookup of a tag ended, for the requests that
/// waited for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagLookup {
    /// Upstream could not be asked (unreachable, 5xx, 429): the leader served
    /// the stale copy, and so may its followers.
    Unavailable,
    /// Anything else: the tag record says what upstream said.
    Answered,
}

async fn by_tag(req: &RepoRequest<'_>, tag: &str) -> Served {
    let (state, target, repo) = (req.state, req.target, req.repo());
    if let Some(served) = fresh(req, tag).await {
        return served;
    }
    // Stale or unknown: one request asks upstream, the others wait for it
    // and are then served from what it stored.
    let key = format!("{}/{repo}:{tag}", target.registry);
    match state.tag_lookups.join(key) {
        Turn::Lead(lead) => {
            let served = ask_upstream(req, tag).await;
            lead.finish(if served.cache == CacheStatus::Stale {
                TagLookup::Unavailable
            } else {
                TagLookup::Answered
            });
            served
        }
        Turn::Follow(follow) => {
            let lookup = follow.outcome().await;
            if let Some(served) = fresh(req, tag).await {
                return served;
            }
            if lookup == Some(TagLookup::Unavailable) {
                if let Some((_, cached)) = cached_tag(req, tag) {
                    if let Err(refused) = sharing::check(req).await {
                        return *refused;
                    }
                    return serve_stale(req, tag, &cached).await;
                }
            }
            // The leader's answer does not serve this request (another
            // credential or Accept, or it gave up): ask for ourselves.
            ask_upstream(req, tag).await
        }
    }
}

/// The cached manifest of a fresh tag record, if this request may have it
/// (or the refusal if it may not); None when upstream must be asked.
async fn fresh(req: &RepoRequest<'_>, tag: &str) -> Option<Served> {
    let (state, target) = (req.state, req.target);
    let (record, cached) = cached_tag(req, tag)?;
    let ttl = state.config.tag_ttl_of(&target.registry, &req.rule);
    if !record.is_fresh(now_ms(), ttl) {
        return None;
    }
    if let Err(refused) = sharing::check(req).await {
        return Some(*refused);
    }
    from_cache(req, &cached, CacheStatus::Hit).await
}

/// The tag's record and its cached manifest, if both exist and the request's
/// Accept allows the manifest's type.
fn cached_tag(req: &RepoRequest<'_>, tag: &str) -> Option<(TagRecord, Cached)> {
    let record = req.state.cache.tag(&req.target.registry, req.repo(), tag)?;
    let digest = record.digest.parse::<Digest>().ok()?;
    let cached = usable(req, &digest)?;
    Some((record, cached))
}

/// Revalidates a stale tag with a `HEAD` (or fetches an unknown one).
async fn ask_upstream(req: &RepoRequest<'_>, tag: &str) -> Served {
    let (state, target, parts) = (req.state, req.target, req.parts);
    let cache = &state.cache;
    let repo = req.repo();
    let Some((record, cached)) = cached_tag(req, tag) else {
        return fetch(req, Some(tag), None).await;
    };
    let (outcome, upstream_resp) = match upstream_uri(target, parts) {
        Ok(uri) => match sharing::fetch_for(req, Method::HEAD, uri).await {
            Ok(resp) => {
                let digest = resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                (classify(resp.status(), digest), Some(resp))
            }
            Err(e) => {
                tracing::info!(registry = %target.registry, repo, tag, error = %crate::http::error::error_chain(&e), "tag revalidation failed");
                (Revalidation::Unavailable, None)
            }
        },
        Err(resp) => return Served::new(*resp, CacheStatus::Pass),
    };
    match after_revalidation(&record, &outcome) {
        TagAction::ServeCached => {
            let fresh = TagRecord {
                digest: record.digest.clone(),
                fetched_at_ms: now_ms(),
            };
            if let Err(e) = cache.set_tag(&target.registry, repo, tag, fresh).await {
                tracing::warn!(error = %e, "cannot record tag");
            }
            match from_cache(req, &cached, CacheStatus::Revalidated).await {
                Some(served) => served,
                None => fetch(req, Some(tag), None).await,
            }
        }
        TagAction::Refetch => fetch(req, Some(tag), None).await,
        TagAction::ServeStale => {
            if let Err(refused) = sharing::check(req).await {
                return *refused;
            }
            serve_stale(req, tag, &cached).await
        }
        TagAction::PassUpstream { forget } => {
            if forget {
                if let Err(e) = cache.remove_tag(&target.registry, repo, tag).await {
                    tracing::warn!(error = %e, "cannot forget tag");
                }
            }
            match upstream_resp {
                Some(resp) => Served::new(
                    super::refusal(
                        &parts.method,
                        resp,
                        ErrorCode::ManifestUnknown,
                        &format!("manifest {tag}"),
                    ),
                    CacheStatus::Miss,
                ),
                None => Served::new(
                    error_json(
                        StatusCode::BAD_GATEWAY,
                        ErrorCode::Unsupported,
                        "upstream unavailable",
                    ),
                    CacheStatus::Miss,
                ),
            }
        }
    }
}

/// Serves a stale cached tag with `Warning: 110` (upstream unavailable).
async fn serve_stale(req: &RepoRequest<'_>, tag: &str, cached: &Cached) -> Served {
    match from_cache(req, cached, CacheStatus::Stale).await {
        Some(mut served) => {
            served.resp.headers_mut().insert(
                http::header::WARNING,
                HeaderValue::from_static(super::STALE_WARNING),
            );
            served
        }
        None => fetch(req, Some(tag), None).await,
    }
}

/// The cached manifest for `digest` if the request's Accept allows its type.
pub(crate) fn usable(req: &RepoRequest<'_>, digest: &Digest) -> Option<Cached> {
    let cached = req.state.cache.get(digest)?;
    accepts(&req.parts.headers, &cached.media_type).then_some(cached)
}

/// Serves a cached manifest; None if its file vanished or no longer
/// matches its digest (checked before serving as `verify_reads` says; a
/// damaged entry is dropped, so the caller fetches it again or answers as
/// for a manifest not cached).
pub(crate) async fn from_cache(
    req: &RepoRequest<'_>,
    cached: &Cached,
    status: CacheStatus,
) -> Option<Served> {
    let (state, parts) = (req.state, req.parts);
    let bytes = read_verified(state, cached).await?;
    crate::shared::touch(state.shared.as_deref(), &cached.digest);
    state.cache.count(true);
    Some(Served::new(
        manifest_response(parts, &cached.digest, &cached.media_type, bytes),
        status,
    ))
}

/// The bytes of a small cached file (a manifest, a referrers list), checked
/// against its digest as `verify_reads` says; None if the file vanished
/// (the entry is forgotten) or no longer matches (the entry is dropped).
pub(crate) async fn read_verified(state: &super::state::State, cached: &Cached) -> Option<Bytes> {
    let bytes = match tokio::fs::read(&cached.path).await {
        Ok(bytes) => Bytes::from(bytes),
        Err(_) => {
            let _ = state.cache.forget(&cached.digest).await;
            return None;
        }
    };
    if must_verify(state.config.verify_reads, cached.is_verified()) {
        if !cached.digest.matches(&bytes) {
            tracing::warn!(
                digest = %cached.digest,
                "cached manifest or list does not match its digest (changed on disk): not served, entry dropped"
            );
            if let Err(e) = state.cache.drop_damaged(cached).await {
                tracing::warn!(error = %e, "cannot drop a damaged cache entry");
            }
            return None;
        }
        cached.mark_verified();
    }
    Some(bytes)
}

fn manifest_response(
    parts: &Parts,
    digest: &Digest,
    media_type: &str,
    bytes: Bytes,
) -> Response<Body> {
    let len = bytes.len() as u64;
    let body = if parts.method == Method::HEAD {
        body::empty()
    } else {
        body::full(bytes)
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(media_type) {
        h.insert(CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
        h.insert("docker-content-digest", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(ETAG, v);
    }
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// Fetches a manifest upstream (GET; HEAD requests on a miss are passed on as
/// HEAD), verifies, stores, links and serves it.
async fn fetch(req: &RepoRequest<'_>, tag: Option<&str>, expected: Option<&Digest>) -> Served {
    let (state, target, parts) = (req.state, req.target, req.parts);
    let name = req.name;
    let uri = match upstream_uri(target, parts) {
        Ok(uri) => uri,
        Err(resp) => return Served::new(*resp, CacheStatus::Pass),
    };
    let wants_body = parts.method == Method::GET || tag.is_some();
    let mut lease = None;
    if let (Some(shared), true) = (&state.shared, wants_body) {
        match from_shared(req, tag, expected, shared, uri.clone()).await {
            Ok(served) => return served,
            Err(won) => lease = won,
        }
    }
    state.cache.count(false);
    let repo = req.repo();
    // A HEAD by digest is passed on as a HEAD. A HEAD by tag (containerd
    // resolves tags that way, then GETs by digest) fetches the manifest with
    // a GET, so that the tag is recorded: this costs no extra pull, as the
    // client's GET by digest that follows is served from the cache.
    let method = if parts.method == Method::HEAD && tag.is_none() {
        Method::HEAD
    } else {
        Method::GET
    };
    let head_only = method == Method::HEAD;
    let resp = match sharing::fetch_for(req, method, uri).await {
        Ok(resp) => resp,
        Err(e) => return Served::new(super::bad_gateway(target, &e), CacheStatus::Miss),
    };
    if head_only {
        return Served::new(passthrough(resp), CacheStatus::Miss);
    }
    if resp.status() != StatusCode::OK && parts.method == Method::HEAD {
        return Served::new(
            super::refusal(&parts.method, resp, ErrorCode::ManifestUnknown, repo),
            CacheStatus::Miss,
        );
    }
    if resp.status() != StatusCode::OK {
        if resp.status() == StatusCode::NOT_FOUND {
            if let Some(tag) = tag {
                let _ = state
                    .cache
                    .remove_tag(&target.registry, name.as_str(), tag)
                    .await;
            }
        }
        let mut answer = passthrough(resp);
        if parts.method == Method::HEAD {
            // The answer to our GET, minus the body a HEAD must not carry.
            *answer.body_mut() = body::empty();
        }
        return Served::new(answer, CacheStatus::Miss);
    }
    let (head, incoming) = resp.into_parts();
    let bytes = match Limited::new(incoming, MAX_MANIFEST_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            tracing::warn!(error = %e, "manifest body failed or exceeded 4 MiB");
            return Served::new(
                error_json(
                    StatusCode::BAD_GATEWAY,
                    ErrorCode::ManifestInvalid,
                    "upstream manifest unreadable or larger than 4 MiB",
                ),
                CacheStatus::Miss,
            );
        }
    };
    let announced = head
        .headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok());
    let algorithm = expected.or(announced.as_ref()).map(|d| d.algorithm());
    let digest = match algorithm {
        Some(alg) => {
            let mut h = DigestHasher::new(alg);
            h.update(&bytes);
            h.finish()
        }
        None => Digest::of(&bytes),
    };
    let wrong = expected
        .filter(|e| **e != digest)
        .or(announced.as_ref().filter(|a| **a != digest));
    if let Some(wrong) = wrong {
        tracing::warn!(expected = %wrong, actual = %digest, "upstream manifest does not match its digest; not cached");
        return Served::new(
            error_json(
                StatusCode::BAD_GATEWAY,
                ErrorCode::ManifestInvalid,
                &format!("upstream manifest does not match {wrong}"),
            ),
            CacheStatus::Miss,
        );
    }
    let content_type = head.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let media_type = manifest_media_type(content_type, &bytes);
    if let Err(e) = store(req, tag, &digest, &media_type, &bytes).await {
        tracing::warn!(%digest, error = %e, "cannot cache manifest");
    }
    if let Some(shared) = &state.shared {
        let (shared, digest, bytes, media_type) = (
            shared.clone(),
            digest.clone(),
            bytes.clone(),
            media_type.clone(),
        );
        tokio::spawn(async move {
            // The cluster's lease, if this node holds it, goes after the put.
            let _lease = lease;
            if let Err(e) = shared.put_bytes(&digest, bytes, &media_type).await {
                tracing::info!(%digest, store = shared.name(), error = %e, "manifest not uploaded to the shared tier");
            }
        });
    }
    Served::new(
        manifest_response(parts, &digest, &media_type, bytes),
        CacheStatus::Miss,
    )
}

/// A manifest the shared tier holds, served once the registry named its
/// digest for this request: a `HEAD` with the client's credential and
/// `Accept` (which Docker Hub does not count as a pull). The bytes are
/// checked against that digest (an object that does not match is deleted
/// from the tier), then stored, linked and tagged as if fetched. None:
/// fetch it upstream.
async fn from_shared(
    req: &RepoRequest<'_>,
    tag: Option<&str>,
    expected: Option<&Digest>,
    shared: &SharedStore,
    uri: http::Uri,
) -> Result<Served, Option<Lease>> {
    let resp = sharing::fetch_for(req, Method::HEAD, uri)
        .await
        .map_err(|_| None)?;
    if resp.status() != StatusCode::OK {
        return Err(None);
    }
    let named = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok())
        .ok_or(None)?;
    if expected.is_some_and(|e| *e != named) {
        return Err(None);
    }
    // As for blobs: the tier has it, or one node of the cluster GETs it
    // (a counted pull) while the others wait for the object.
    let started = std::time::Instant::now();
    loop {
        if let Some(object) = shared.open(&named).await {
            return serve_object(req, tag, shared, &named, object)
                .await
                .ok_or(None);
        }
        match shared.claim(&named).await {
            Claim::Won(lease) => return Err(Some(lease)),
            Claim::Unavailable => return Err(None),
            Claim::Held(_) => {}
        }
        match shared
            .wait_for_fetch(&named, started, MAX_CLUSTER_WAIT)
            .await
        {
            Waited::Present | Waited::Released => {}
            Waited::GaveUp => return Err(None),
        }
    }
}

/// Serves the manifest `named` from `object`, read from the shared tier:
/// checked against its digest (deleted there if it does not match), then
/// stored, linked and tagged as if fetched. None: fetch it upstream.
async fn serve_object(
    req: &RepoRequest<'_>,
    tag: Option<&str>,
    shared: &SharedStore,
    named: &Digest,
    object: SharedObject,
) -> Option<Served> {
    let (state, parts) = (req.state, req.parts);
    if object.size > MAX_MANIFEST_BYTES as u64 {
        return None;
    }
    let bytes = Limited::new(object.body, MAX_MANIFEST_BYTES)
        .collect()
        .await
        .ok()?
        .to_bytes();
    if !named.matches(&bytes) {
        shared.discard(named).await;
        return None;
    }
    shared.touch(named);
    let media_type = manifest_media_type(object.content_type.as_deref(), &bytes);
    if !accepts(&parts.headers, &media_type) {
        return None;
    }
    if let Err(e) = store(req, tag, named, &media_type, &bytes).await {
        tracing::warn!(digest = %named, error = %e, "cannot cache manifest");
    }
    state.cache.count(true);
    Some(Served::new(
        manifest_response(parts, named, &media_type, bytes),
        CacheStatus::Shared,
    ))
}

async fn store(
    req: &RepoRequest<'_>,
    tag: Option<&str>,
    digest: &Digest,
    media_type: &str,
    bytes: &Bytes,
) -> Result<(), crate::cache::CacheError> {
    let (cache, target, name) = (&req.state.cache, req.target, req.name);
    cache.store_bytes(digest, bytes.clone(), media_type).await?;
    // Only the manifest itself: the digests it names are pointers that the
    // registry has not served for this repository (and may not hold).
    cache
        .link(
            &target.registry,
            name.as_str(),
            std::slice::from_ref(digest),
        )
        .await?;
    if let Some(tag) = tag {
        let record = TagRecord {
            digest: digest.to_string(),
            fetched_at_ms: now_ms(),
        };
        cache
            .set_tag(&target.registry, name.as_str(), tag, record)
            .await?;
    }
    Ok(())
}
