//! `GET`/`HEAD /v2/<name>/blobs/<digest>`: from the cache, or from one shared
//! upstream download.
//!
//! - Cached and linked to this repository, or public through some
//!   repository: streamed from disk (206 for a `Range`), no upstream contact.
//! - Cached, guarded, linked in this registry but not to this repository
//!   (or being downloaded through another repository of it): a `HEAD`
//!   upstream for *this* repository decides; on 200 the digest is linked and
//!   served from the cache, otherwise upstream's answer is passed on.
//! - Cached only through other registries: treated as missing, so the bytes
//!   come from this registry (the rule is in [`crate::registry::link`]).
//! - A read from the cache is checked when `verify_reads` asks
//!   ([`read::must_verify`]): a whole file is hashed on its way out, and one
//!   whose bytes changed on disk ends its response with an error and is
//!   fetched again by the next request; for a range the whole file is hashed
//!   first ([`read::intact_for_range`]), and a damaged entry is dropped and
//!   the request answered as a miss.
//! - Missing: `HEAD` is passed upstream; `GET` joins or leads the single
//!   download of the digest ([`crate::cache::fill`]), and the digest is
//!   linked to the repository once the download's bytes matched it.
//! - With a shared tier ([`crate::shared`]): the leader of a missing blob
//!   reads it from the tier when the tier has it and the registry confirms
//!   it for this repository (a `HEAD` with the client's credential). When
//!   the tier does not have it, one node of the cluster fetches it (the one
//!   whose lease was created first) and uploads it once committed; the
//!   others wait for the object and read it from the tier.

use std::sync::Arc;

use http::header::{HeaderValue, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG};
use http::request::Parts;
use http::{Method, Response, StatusCode};

use super::link::{self, Access, Kind};
use super::range::{span, Span};
use super::sharing;
use super::state::State;
use super::{passthrough, upstream_uri, CacheStatus, RepoRequest, Served};
use crate::cache::fill::{Fill, Leader, Role};
use crate::cache::{read, Cache, Cached};
use crate::http::body::{self, Body};
use crate::registry::digest::Digest;
use crate::registry::error::ErrorCode;
use crate::shared::{Claim, Lease, SharedStore, Waited, MAX_CLUSTER_WAIT};

/// How often a request retries after a leader it followed gave up.
const MAX_JOIN_ATTEMPTS: usize = 3;

/// Serves a blob request.
pub async fn serve(req: &RepoRequest<'_>, digest: &Digest) -> Served {
    let (state, target, parts) = (req.state, req.target, req.parts);
    let cache = &state.cache;
    let repo = req.repo();
    if !cache.contains(digest) {
        // A download that just matched may be committing: its entry is a
        // moment away.
        cache.committed(digest).await;
    }
    if cache.contains(digest) {
        let facts = cache.link_facts(&target.registry, repo, digest, state.public_since());
        match link::resolve(req, digest, facts, Kind::Blob).await {
            Err(refused) => return *refused,
            Ok(Access::Serve) => {
                if let Err(refused) = sharing::check(req).await {
                    return *refused;
                }
                if let Some(served) = from_cache(req, digest).await {
                    return served;
                }
            }
            // Asked upstream below, as if it were not cached.
            Ok(Access::Fetch) => {}
        }
    }
    if parts.method == Method::HEAD {
        cache.count(false);
        return forward_method(req, digest, Method::HEAD).await;
    }
    for _ in 0..MAX_JOIN_ATTEMPTS {
        match cache.join_fill(digest) {
            Role::Leader(leader) => return lead(req, digest, leader).await,
            Role::Follower(fill) => {
                if !fill.started().await {
                    continue;
                }
                // A download for this very repository serves it (its bytes
                // are verified before the last one reaches anybody).
                let mut facts =
                    cache.link_facts(&target.registry, repo, digest, state.public_since());
                facts.linked_here |= fill
                    .origin()
                    .is_some_and(|(r, p)| *r == target.registry && p == repo);
                match link::resolve(req, digest, facts, Kind::Blob).await {
                    Err(refused) => return *refused,
                    Ok(Access::Serve) => {}
                    // The download is another registry's bytes: ask this one.
                    Ok(Access::Fetch) => return forward_method(req, digest, Method::GET).await,
                }
                if let Err(refused) = sharing::check(req).await {
                    return *refused;
                }
                cache.count(true);
                return Served::new(from_fill(parts, digest, &fill), CacheStatus::Coalesced);
            }
        }
    }
    // Upstream keeps refusing the leaders: answer as it does.
    forward_method(req, digest, Method::GET).await
}

/// Fetches a missing blob for everyone: from the shared tier when it has
/// it and the registry confirms it for this repository, else one upstream
/// GET; stored as it streams to this client and to any that join.
async fn lead(req: &RepoRequest<'_>, digest: &Digest, leader: Leader) -> Served {
    let (state, target, parts) = (req.state, req.target, req.parts);
    let repo = req.repo();
    let (leader, lease) = match &state.shared {
        Some(shared) => match from_shared(req, digest, leader, shared).await {
            Ok(served) => return served,
            Err(back) => back,
        },
        None => (leader, None),
    };
    let uri = match upstream_uri(target, parts) {
        Ok(uri) => uri,
        Err(resp) => return Served::new(*resp, CacheStatus::Pass),
    };
    let resp = match sharing::fetch_for(req, Method::GET, uri).await {
        Ok(resp) => resp,
        Err(e) => return Served::new(super::bad_gateway(target, &e), CacheStatus::Miss),
    };
    state.cache.count(false);
    if resp.status() != StatusCode::OK {
        leader.abandon();
        return Served::new(passthrough(resp), CacheStatus::Miss);
    }
    // Followers from the same repository need no upstream check; the fill
    // links the digest only once its bytes matched (a registry that answers
    // 200 with other bytes earns nothing).
    leader.set_origin(&target.registry, repo);
    let total = content_length(resp.headers());
    // A known length is admitted (it could fit) but evicts nothing: the
    // fill makes room as its bytes arrive. Without admission, this client
    // gets the blob uncached (still verified).
    let reservation = match state.cache.admit_soon(total).await {
        Ok(r) => r,
        Err(no_room) => {
            tracing::info!(%digest, error = %no_room, "not cached (cache_size): streaming the blob uncached");
            leader.abandon();
            let body = super::uncached::verified(resp.into_body(), digest.clone(), total);
            return Served::new(
                blob_response(StatusCode::OK, digest, total, body),
                CacheStatus::Miss,
            );
        }
    };
    match leader
        .start(resp.into_body(), total, String::new(), reservation)
        .await
    {
        Ok(fill) => {
            if let Some(shared) = &state.shared {
                write_behind(state.cache.clone(), shared.clone(), fill.clone(), lease);
            }
            Served::new(from_fill(parts, digest, &fill), CacheStatus::Miss)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot start download");
            Served::new(
                super::error_json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Unsupported,
                    "cache write failed",
                ),
                CacheStatus::Miss,
            )
        }
    }
}

/// A local miss, with a shared tier. When the tier holds the digest, or
/// another node of the cluster is fetching it (a live lease: this node
/// waits until the object is there), the blob is served from the tier once
/// the registry confirmed it for this repository with the client's own
/// credential (a `HEAD`, which Docker Hub does not count as a pull), and
/// stored locally as it streams, verified like an upstream body. Hands the
/// leader back to fetch upstream, with the lease when this node won the
/// fetch for the cluster; also when the tier does not answer or the
/// registry does not confirm (the caller's GET then answers as the
/// registry does).
async fn from_shared(
    req: &RepoRequest<'_>,
    digest: &Digest,
    leader: Leader,
    shared: &Arc<SharedStore>,
) -> Result<Served, (Leader, Option<Lease>)> {
    let started = std::time::Instant::now();
    let mut confirmed = false;
    loop {
        if let Some(object) = shared.open(digest).await {
            if !confirmed && !confirm(req).await {
                return Err((leader, None));
            }
            let source = Source::Tier(shared.clone());
            return fill_from(req, digest, leader, source, Some(object.size), object.body).await;
        }
        let peer = match shared.claim(digest).await {
            Claim::Won(lease) => return Err((leader, Some(lease))),
            Claim::Unavailable => return Err((leader, None)),
            Claim::Held(peer) => peer,
        };
        // The tier holds bytes, not trust: no waiting for a refused client.
        if !confirmed && !confirm(req).await {
            return Err((leader, None));
        }
        confirmed = true;
        // The fetching node streams it while it arrives there.
        if let (Some(addr), Some(peers)) = (peer, &req.state.peers) {
            if let Some(blob) = peers.open(&addr, digest).await {
                return fill_from(req, digest, leader, Source::Peer, blob.size, blob.body).await;
            }
        }
        tracing::debug!(%digest, "another node fetches it: waiting for the shared tier");
        match shared
            .wait_for_fetch(digest, started, MAX_CLUSTER_WAIT)
            .await
        {
            Waited::Present | Waited::Released => {}
            Waited::GaveUp => return Err((leader, None)),
        }
    }
}

/// Whether the registry confirms the requested blob for this repository
/// and client (a `HEAD` with the client's credential).
async fn confirm(req: &RepoRequest<'_>) -> bool {
    let Ok(uri) = upstream_uri(req.target, req.parts) else {
        return false;
    };
    matches!(sharing::fetch_for(req, Method::HEAD, uri).await,
        Ok(resp) if resp.status() == StatusCode::OK)
}

/// Where a blob that missed locally is read from, within the cluster.
enum Source {
    /// The shared tier: an object that turns out not to match its digest
    /// is deleted there.
    Tier(Arc<SharedStore>),
    /// The peer endpoint of the node fetching it.
    Peer,
}

/// Starts the local download of `body` (`size` bytes, if known), read from
/// within the cluster and verified like an upstream body.
async fn fill_from<B>(
    req: &RepoRequest<'_>,
    digest: &Digest,
    leader: Leader,
    source: Source,
    size: Option<u64>,
    body: B,
) -> Result<Served, (Leader, Option<Lease>)>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<crate::http::body::BoxError> + Send,
{
    let (state, target, parts) = (req.state, req.target, req.parts);
    if let Source::Tier(shared) = &source {
        shared.touch(digest);
    }
    let Ok(reservation) = state.cache.admit_soon(size).await else {
        return Err((leader, None));
    };
    // Confirmed for this repository: the digest is linked to it once the
    // bytes matched, as for an upstream download.
    leader.set_origin(&target.registry, req.repo());
    match leader.start(body, size, String::new(), reservation).await {
        Ok(fill) => {
            let status = match source {
                Source::Tier(shared) => {
                    let fill_for_check = fill.clone();
                    tokio::spawn(async move {
                        fill_for_check.ended().await;
                        if fill_for_check.watch().borrow().failure == Some("digest_mismatch") {
                            shared.discard(&fill_for_check.digest).await;
                        }
                    });
                    CacheStatus::Shared
                }
                Source::Peer => CacheStatus::Peer,
            };
            state.cache.count(true);
            Ok(Served::new(from_fill(parts, digest, &fill), status))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot start download");
            Ok(Served::new(
                super::error_json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Unsupported,
                    "cache write failed",
                ),
                CacheStatus::Miss,
            ))
        }
    }
}

/// Once `fill` (an upstream download) is committed, its entry is uploaded
/// to the shared tier, in the background.
/// The cluster's lease of the fetch, if this node holds it, is released
/// once the upload is done (or failed: another node then fetches it).
fn write_behind(
    cache: Arc<Cache>,
    shared: Arc<SharedStore>,
    fill: Arc<Fill>,
    lease: Option<Lease>,
) {
    tokio::spawn(async move {
        let _lease = lease;
        fill.ended().await;
        let digest = &fill.digest;
        cache.committed(digest).await;
        // Failed, or already evicted: nothing to share.
        let Some(cached) = cache.get(digest) else {
            return;
        };
        match shared.upload(digest, &cached.path).await {
            Ok(true) => {
                tracing::debug!(%digest, store = shared.name(), "uploaded to the shared tier")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::info!(%digest, store = shared.name(), error = %e, "not uploaded to the shared tier")
            }
        }
    });
}

/// Passes a request upstream (a HEAD on a miss, or a GET when the leaders
/// keep failing or the running download is another registry's) and returns
/// upstream's answer; a blob it sends is verified on the way, its last byte
/// held back until it matched `digest` (as fills do), though not cached.
async fn forward_method(req: &RepoRequest<'_>, digest: &Digest, method: Method) -> Served {
    let (target, parts) = (req.target, req.parts);
    let uri = match upstream_uri(target, parts) {
        Ok(uri) => uri,
        Err(resp) => return Served::new(*resp, CacheStatus::Pass),
    };
    let get = method == Method::GET;
    match sharing::fetch_for(req, method, uri).await {
        Ok(resp) if get && resp.status() == StatusCode::OK => {
            let total = content_length(resp.headers());
            let (head, body) = passthrough(resp).into_parts();
            let body = super::uncached::verified(body, digest.clone(), total);
            Served::new(Response::from_parts(head, body), CacheStatus::Miss)
        }
        Ok(resp) => Served::new(passthrough(resp), CacheStatus::Miss),
        Err(e) => Served::new(super::bad_gateway(target, &e), CacheStatus::Miss),
    }
}

/// A cached blob answered with no upstream contact (offline registries);
/// None if it is not cached, its file vanished, or a range check found its
/// bytes changed on disk (the entry is then dropped: the caller fetches it
/// or answers as for a blob not cached).
pub(crate) async fn from_cache(req: &RepoRequest<'_>, digest: &Digest) -> Option<Served> {
    let (state, parts) = (req.state, req.parts);
    let cached = state.cache.get(digest)?;
    let Some(file) = open(&cached).await else {
        let _ = state.cache.forget(digest).await;
        return None;
    };
    if is_part(parts, cached.size)
        && !read::intact_for_range(&state.cache, &cached, &file, state.config.verify_reads).await
    {
        return None;
    }
    crate::shared::touch(state.shared.as_deref(), digest);
    state.cache.count(true);
    Some(Served::new(
        from_file(state, parts, &cached, file),
        CacheStatus::Hit,
    ))
}

/// Whether a request reads a part (not all) of a blob of `size` bytes.
fn is_part(parts: &Parts, size: u64) -> bool {
    parts.method != Method::HEAD
        && matches!(span(&parts.headers, size),
            Span::Part { start, end } if !(start == 0 && end == size))
}

/// Opens a cached file; None if it vanished.
async fn open(cached: &Cached) -> Option<Arc<std::fs::File>> {
    let path = cached.path.clone();
    match tokio::task::spawn_blocking(move || std::fs::File::open(path)).await {
        Ok(Ok(file)) => Some(Arc::new(file)),
        _ => None,
    }
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The blob headers every answer carries.
fn blob_response(
    status: StatusCode,
    digest: &Digest,
    length: Option<u64>,
    body: Body,
) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
        h.insert("docker-content-digest", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(ETAG, v);
    }
    if let Some(len) = length {
        h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    resp
}

fn with_range(mut resp: Response<Body>, start: u64, end: u64, size: u64) -> Response<Body> {
    if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", start, end - 1)) {
        resp.headers_mut().insert(CONTENT_RANGE, v);
    }
    resp
}

fn unsatisfiable(digest: &Digest, size: u64) -> Response<Body> {
    let mut resp = blob_response(
        StatusCode::RANGE_NOT_SATISFIABLE,
        digest,
        Some(0),
        body::empty(),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
        resp.headers_mut().insert(CONTENT_RANGE, v);
    }
    resp
}

/// A cached blob, whole or in part (a part already checked as
/// `verify_reads` asks).
fn from_file(
    state: &State,
    parts: &Parts,
    cached: &Cached,
    file: Arc<std::fs::File>,
) -> Response<Body> {
    let size = cached.size;
    let head = parts.method == Method::HEAD;
    let body_of = |start: u64, end: u64| {
        let whole = start == 0 && end == size;
        if head {
            body::empty()
        } else if whole && read::must_verify(state.config.verify_reads, cached.is_verified()) {
            read::verifying(state.cache.clone(), cached, file)
        } else {
            // A part was checked before, if it had to be (`from_cache`).
            read::complete(file, start, end, cached.lease.clone())
        }
    };
    match span(&parts.headers, size) {
        Span::Whole => {
            let body = body_of(0, size);
            blob_response(StatusCode::OK, &cached.digest, Some(size), body)
        }
        Span::Part { start, end } => {
            let body = body_of(start, end);
            let resp = blob_response(
                StatusCode::PARTIAL_CONTENT,
                &cached.digest,
                Some(end - start),
                body,
            );
            with_range(resp, start, end, size)
        }
        Span::Unsatisfiable => unsatisfiable(&cached.digest, size),
    }
}

/// A blob being downloaded, whole or in part (a range needs a known length).
fn from_fill(parts: &Parts, digest: &Digest, fill: &Arc<Fill>) -> Response<Body> {
    let Some(file) = fill.file() else {
        return super::error_json(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Unsupported,
            "download has no file",
        );
    };
    let total = fill.watch().borrow().total;
    match (total, total.map(|t| span(&parts.headers, t))) {
        (Some(size), Some(Span::Part { start, end })) => {
            let body = read::growing(fill.clone(), file, start, end);
            let resp = blob_response(StatusCode::PARTIAL_CONTENT, digest, Some(end - start), body);
            with_range(resp, start, end, size)
        }
        (Some(size), Some(Span::Unsatisfiable)) => unsatisfiable(digest, size),
        (total, _) => {
            let body = read::growing(fill.clone(), file, 0, total.unwrap_or(u64::MAX));
            blob_response(StatusCode::OK, digest, total, body)
        }
    }
}
