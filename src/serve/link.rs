//! The I/O of the link verdict ([`crate::registry::link`]): a cached digest
//! asked through a repository it is not linked to is served only when it is
//! public through some repository, or after the registry confirmed with a
//! `HEAD` in *this* repository (client's own credential) that it has it;
//! failing both, it is fetched from the registry like a missing digest.

use http::{Method, StatusCode};

use super::sharing;
use super::{refusal, upstream_uri, CacheStatus, RepoRequest, Served};
use crate::registry::digest::Digest;
use crate::registry::error::ErrorCode;
use crate::registry::link::{verdict, LinkFacts, LinkVerdict};

/// What a request for a cached digest may do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Serve the cached content (after [`sharing::check`] for the repository).
    Serve,
    /// Ask the registry with a `GET`: the bytes come from it, verified.
    Fetch,
}

/// A blob or a manifest, for error codes and log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/blobs/<digest>`.
    Blob,
    /// `/manifests/<digest>`.
    Manifest,
}

impl Kind {
    fn not_found(self) -> ErrorCode {
        match self {
            Kind::Blob => ErrorCode::BlobUnknown,
            Kind::Manifest => ErrorCode::ManifestUnknown,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Kind::Blob => "blob",
            Kind::Manifest => "manifest",
        }
    }
}

/// Applies the link verdict for `digest` through `repo` given `facts`
/// (usually [`crate::cache::Cache::link_facts`]). A confirmation that the
/// registry answers 200 links the digest to `repo`; any other answer is
/// returned as the refusal to give the client (no bytes).
pub async fn resolve(
    req: &RepoRequest<'_>,
    digest: &Digest,
    facts: LinkFacts,
    kind: Kind,
) -> Result<Access, Box<Served>> {
    let (target, repo) = (req.target, req.repo());
    match verdict(facts) {
        LinkVerdict::Serve => Ok(Access::Serve),
        LinkVerdict::Fetch => {
            tracing::info!(registry = %target.registry, repo, %digest, kind = kind.as_str(), rule = "link: cached only through another registry; asked upstream with a GET", "cached digest not linked in this registry");
            Ok(Access::Fetch)
        }
        LinkVerdict::Confirm => confirm(req, digest, kind).await,
    }
}

/// Asks the registry with a `HEAD` in `repo`, with the client's own
/// credential, whether it has `digest`.
async fn confirm(
    req: &RepoRequest<'_>,
    digest: &Digest,
    kind: Kind,
) -> Result<Access, Box<Served>> {
    let (state, target, parts) = (req.state, req.target, req.parts);
    let repo = req.repo();
    let uri = upstream_uri(target, parts)
        .map_err(|resp| Box::new(Served::new(*resp, CacheStatus::Pass)))?;
    match sharing::fetch_for(req, Method::HEAD, uri).await {
        Ok(resp) if resp.status() == StatusCode::OK => {
            if let Err(e) = state
                .cache
                .link(&target.registry, repo, std::slice::from_ref(digest))
                .await
            {
                tracing::warn!(error = %e, "cannot record link");
            }
            Ok(Access::Serve)
        }
        Ok(resp) => {
            tracing::info!(registry = %target.registry, repo, %digest, kind = kind.as_str(), status = resp.status().as_u16(), rule = "link: a guarded digest is served through another repository only when the registry confirms that repository has it", "cached digest refused");
            Err(Box::new(Served::new(
                refusal(&parts.method, resp, kind.not_found(), kind.as_str()),
                CacheStatus::Miss,
            )))
        }
        Err(e) => Err(Box::new(Served::new(
            super::bad_gateway(target, &e),
            CacheStatus::Miss,
        ))),
    }
}
