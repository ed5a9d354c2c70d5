//! `GET`/`HEAD /v2/<name>/referrers/<digest>` (OCI distribution 1.1): the
//! signatures, attestations and SBOMs that name a manifest as their
//! `subject`, as an image index.
//!
//! The list grows when a signature is pushed, so it is treated as a tag:
//! cached under a record no tag can collide with (`referrers@sha256-…`: a
//! tag holds no `@`), fresh for the repository's `tag_ttl`, then asked for
//! again; served stale (`Warning: 110`) when upstream is unreachable, 5xx
//! or 429. Upstream is always asked for the whole list, which is stored as
//! content (by its digest) and filtered here for `?artifactType=`
//! (answered with `OCI-Filters-Applied: artifactType`), so one cached list
//! serves every filter. Cached lists reach a client under the rules of
//! cached manifests ([`super::sharing::check`]): a repository not known
//! public only to a client whose credential the registry accepted. Any
//! other answer (a registry without the API answers 404, and clients then
//! use the tag schema, `sha256-<hex>.sig`, which are plain tags) is passed
//! on and not cached.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};

use super::manifests::MAX_MANIFEST_BYTES;
use super::{error_json, passthrough, sharing, CacheStatus, RepoRequest, Served};
use crate::cache::freshness::{now_ms, TagRecord};
use crate::cache::Cached;
use crate::http::body;
use crate::registry::digest::Digest;
use crate::registry::error::ErrorCode;
use crate::registry::media::OCI_INDEX;

/// The tag-table record of the referrers of `subject`: `referrers@sha256-<hex>`,
/// which no tag can be (tags hold no `@`).
pub fn record_key(subject: &Digest) -> String {
    format!("referrers@{}", subject.as_str().replace(':', "-"))
}

/// The `artifactType` filter of a query string, if one is asked. It is
/// percent-decoded, and a `+` stays a `+`: media types hold no spaces but
/// many a `+` (`application/spdx+json`), which clients do not all encode.
pub fn artifact_type(query: Option<&str>) -> Option<String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == "artifactType")
        .map(|(_, v)| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
        .filter(|v| !v.is_empty())
}

/// The list `body` with only the descriptors of `artifact_type`; None if
/// the body is not an index (a JSON object with a `manifests` array).
pub fn filtered(body: &[u8], artifact_type: &str) -> Option<Bytes> {
    let mut doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    let manifests = doc.get_mut("manifests")?.as_array_mut()?;
    manifests.retain(|m| m.get("artifactType").and_then(|t| t.as_str()) == Some(artifact_type));
    serde_json::to_vec(&doc).ok().map(Bytes::from)
}

/// Whether `body` is an image index, as a referrers answer must be.
fn is_list(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .is_some_and(|doc| doc.get("manifests").is_some_and(|m| m.is_array()))
}

/// Serves a referrers request for `subject`.
pub async fn serve(req: &RepoRequest<'_>, subject: &Digest) -> Served {
    let (state, target) = (req.state, req.target);
    let cached = cached_list(req, subject);
    if let Some((record, list)) = &cached {
        let ttl = state.config.tag_ttl_of(&target.registry, &req.rule);
        if record.is_fresh(now_ms(), ttl) {
            if let Err(refused) = sharing::check(req).await {
                return *refused;
            }
            if let Some(served) = from_cache(req, list, CacheStatus::Hit).await {
                return served;
            }
        }
    }
    let uri = match whole_list_uri(req) {
        Ok(uri) => uri,
        Err(resp) => return Served::new(*resp, CacheStatus::Pass),
    };
    state.cache.count(false);
    let resp = match sharing::fetch_for(req, Method::GET, uri).await {
        Ok(resp) => resp,
        Err(e) => {
            return match stale(req, cached.as_ref()).await {
                Some(served) => served,
                None => Served::new(super::bad_gateway(target, &e), CacheStatus::Miss),
            };
        }
    };
    let status = resp.status();
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        if let Some(served) = stale(req, cached.as_ref()).await {
            return served;
        }
    }
    if status != StatusCode::OK {
        let mut answer = passthrough(resp);
        if req.parts.method == Method::HEAD {
            *answer.body_mut() = body::empty();
        }
        return Served::new(answer, CacheStatus::Miss);
    }
    let bytes = match Limited::new(resp.into_body(), MAX_MANIFEST_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            tracing::warn!(error = %e, "referrers list unreadable or larger than 4 MiB");
            return Served::new(
                error_json(
                    StatusCode::BAD_GATEWAY,
                    ErrorCode::ManifestInvalid,
                    "upstream referrers list unreadable or larger than 4 MiB",
                ),
                CacheStatus::Miss,
            );
        }
    };
    if !is_list(&bytes) {
        return Served::new(
            error_json(
                StatusCode::BAD_GATEWAY,
                ErrorCode::ManifestInvalid,
                "upstream referrers answer is not an image index",
            ),
            CacheStatus::Miss,
        );
    }
    let digest = Digest::of(&bytes);
    if let Err(e) = store(req, subject, &digest, &bytes).await {
        tracing::warn!(%digest, error = %e, "cannot cache a referrers list");
    }
    Served::new(respond(req, bytes), CacheStatus::Miss)
}

/// The cached list of `subject` in this repository, if its record and its
/// content are there.
fn cached_list(req: &RepoRequest<'_>, subject: &Digest) -> Option<(TagRecord, Cached)> {
    let cache = &req.state.cache;
    let record = cache.tag(&req.target.registry, req.repo(), &record_key(subject))?;
    let list = cache.get(&record.digest.parse::<Digest>().ok()?)?;
    Some((record, list))
}

/// Serves the cached list of `subject` as is, for an offline registry
/// (the caller decided the client may have it); None if none is cached.
pub async fn offline(req: &RepoRequest<'_>, subject: &Digest) -> Option<Served> {
    let (_, list) = cached_list(req, subject)?;
    from_cache(req, &list, CacheStatus::Hit).await
}

/// The cached list, stale, with `Warning: 110`, if there is one and this
/// client may have it.
async fn stale(req: &RepoRequest<'_>, cached: Option<&(TagRecord, Cached)>) -> Option<Served> {
    let (_, list) = cached?;
    if let Err(refused) = sharing::check(req).await {
        return Some(*refused);
    }
    let mut served = from_cache(req, list, CacheStatus::Stale).await?;
    served.resp.headers_mut().insert(
        http::header::WARNING,
        HeaderValue::from_static(super::STALE_WARNING),
    );
    Some(served)
}

/// Stores the whole list and records it for `subject`.
async fn store(
    req: &RepoRequest<'_>,
    subject: &Digest,
    digest: &Digest,
    bytes: &Bytes,
) -> Result<(), crate::cache::CacheError> {
    let cache = &req.state.cache;
    cache.store_bytes(digest, bytes.clone(), OCI_INDEX).await?;
    let record = TagRecord {
        digest: digest.to_string(),
        fetched_at_ms: now_ms(),
    };
    cache
        .set_tag(
            &req.target.registry,
            req.repo(),
            &record_key(subject),
            record,
        )
        .await
}

/// Serves a cached list (checked against its digest as `verify_reads`
/// says); None if its file vanished or no longer matches.
async fn from_cache(req: &RepoRequest<'_>, list: &Cached, status: CacheStatus) -> Option<Served> {
    let state = req.state;
    let bytes = super::manifests::read_verified(state, list).await?;
    state.cache.count(true);
    Some(Served::new(respond(req, bytes), status))
}

/// The answer to the client: the whole list, or filtered by its
/// `artifactType`.
fn respond(req: &RepoRequest<'_>, whole: Bytes) -> Response<body::Body> {
    let wanted = artifact_type(req.parts.uri.query());
    let (bytes, applied) = match wanted.as_deref().and_then(|t| filtered(&whole, t)) {
        Some(bytes) => (bytes, true),
        None => (whole, false),
    };
    let len = bytes.len() as u64;
    let mut resp = Response::new(if req.parts.method == Method::HEAD {
        body::empty()
    } else {
        body::full(bytes)
    });
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(OCI_INDEX));
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    if applied {
        h.insert(
            "oci-filters-applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    resp
}

/// The upstream URL of the whole list: the request's path, no query.
fn whole_list_uri(req: &RepoRequest<'_>) -> Result<Uri, Box<Response<body::Body>>> {
    let origin = &req.target.origin;
    Uri::builder()
        .scheme(origin.scheme.clone())
        .authority(origin.authority.clone())
        .path_and_query(req.parts.uri.path())
        .build()
        .map_err(|e| {
            Box::new(crate::http::error::error_response(
                StatusCode::BAD_REQUEST,
                &format!("bad request target: {e}"),
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_is_no_tag_and_the_filter_keeps_one_artifact_type() {
        let d: Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            .parse()
            .unwrap();
        let key = record_key(&d);
        assert!(key.contains('@') && !key.contains(':'), "{key}");
        assert!(crate::registry::route::Reference::parse(&key).is_err());

        assert_eq!(
            artifact_type(Some(
                "n=1&artifactType=application%2Fvnd.dev.sigstore.bundle.v0.3%2Bjson"
            )),
            Some("application/vnd.dev.sigstore.bundle.v0.3+json".into())
        );
        assert_eq!(
            artifact_type(Some("artifactType=application/spdx+json")),
            Some("application/spdx+json".into())
        );
        assert_eq!(artifact_type(Some("artifactType=")), None);
        assert_eq!(artifact_type(None), None);

        let list = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {"digest":"sha256:aa","artifactType":"application/sig"},
            {"digest":"sha256:bb","artifactType":"application/sbom"}]}"#;
        let only: serde_json::Value =
            serde_json::from_slice(&filtered(list, "application/sbom").unwrap()).unwrap();
        assert_eq!(only["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(only["manifests"][0]["digest"], "sha256:bb");
        assert!(filtered(b"not json", "x").is_none());
        assert!(is_list(list) && !is_list(br#"{"errors":[]}"#));
    }
}
