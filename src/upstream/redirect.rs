//! Following registry redirects to CDNs, inside regcache.
//!
//! Docker Hub, ghcr.io, quay.io and registry.k8s.io answer blob GETs with a
//! redirect to a CDN. regcache follows it itself (so the blob is cached under
//! its digest and the client never sees the CDN), for a bounded number of
//! hops, resolving relative `Location`s against the current URL.
//!
//! Each target goes through [`crate::policy::decide_redirect`] first
//! (`https` only unless between insecure registries, on an allowed port),
//! and its connection through the redirect connector, which refuses
//! internal addresses ([`super::Mode::Redirect`]). A refusal ends the fetch
//! with [`FetchError::Redirect`], which callers answer with 502 and the
//! reason. The client's `Authorization` header (and cookies) go only to the
//! origin (scheme, host and port) of the first request: CDN URLs carry their
//! own signature.

use super::{exchange, registry_label, Upstream, UpstreamBody, UpstreamError};
use crate::http::body;
use crate::policy::{decide_redirect, keeps_credentials, same_origin};
use http::header::{AUTHORIZATION, COOKIE, LOCATION};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};

/// The most redirects followed for one request.
pub const MAX_REDIRECTS: usize = 5;

/// Why following failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The request itself failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// A redirect could not be followed.
    #[error("bad redirect from {from}: {reason}")]
    Redirect {
        /// The URL that redirected.
        from: String,
        /// What was wrong with it.
        reason: String,
    },
}

impl Upstream {
    /// Sends a body-less request to `uri`, following redirects.
    ///
    /// `headers` go to the first origin as given; on a redirect to another
    /// origin (scheme, host or port), `Authorization` and `Cookie` are
    /// dropped for the rest of the chain.
    pub async fn fetch(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
    ) -> Result<Response<UpstreamBody>, FetchError> {
        self.fetch_from(method, uri, headers, Trust::Registry).await
    }

    /// Like [`Upstream::fetch`], for a URL that a registry named rather than
    /// one regcache was asked for (a token realm): its first request, too, is
    /// held to the address rule of redirect targets.
    pub async fn fetch_named(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
    ) -> Result<Response<UpstreamBody>, FetchError> {
        self.fetch_from(method, uri, headers, Trust::Named).await
    }

    async fn fetch_from(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        trust: Trust,
    ) -> Result<Response<UpstreamBody>, FetchError> {
        let start = uri.clone();
        // Every hop (a CDN, a token realm's redirects) counts for the host
        // the fetch started at.
        let registry = self.recorded.then(|| registry_label(&start));
        let mut uri = uri;
        let mut headers = headers;
        for _ in 0..=MAX_REDIRECTS {
            let mut req = Request::new(body::empty());
            *req.method_mut() = method.clone();
            *req.uri_mut() = uri.clone();
            *req.headers_mut() = headers.clone();
            let client = if trust == Trust::Registry && same_origin(&start, &uri) {
                &self.client
            } else {
                &self.redirect_client
            };
            let resp = exchange(client, req, registry.clone()).await?;
            if !is_redirect(resp.status()) {
                return Ok(resp);
            }
            let next = next_uri(&uri, resp.headers()).map_err(|reason| FetchError::Redirect {
                from: redacted(&uri),
                reason,
            })?;
            if let Err(refusal) = decide_redirect(&self.rules, &start, &next) {
                tracing::warn!(from = %redacted(&uri), to = %redacted(&next), rule = refusal.rule, "redirect refused");
                return Err(FetchError::Redirect {
                    from: redacted(&uri),
                    reason: format!("to {}: {refusal}", redacted(&next)),
                });
            }
            if !keeps_credentials(&start, &next) {
                headers.remove(AUTHORIZATION);
                headers.remove(COOKIE);
            }
            tracing::debug!(from = %redacted(&uri), to = %redacted(&next), "following redirect");
            uri = next;
        }
        Err(FetchError::Redirect {
            from: redacted(&uri),
            reason: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }
}

/// Whose URL a fetch starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trust {
    /// The registry regcache was asked for (connected as configured).
    Registry,
    /// A URL a registry named: every hop is address-checked.
    Named,
}

fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// The target of a redirect: `Location` resolved against `current`.
fn next_uri(current: &Uri, headers: &HeaderMap) -> Result<Uri, String> {
    let location = headers
        .get(LOCATION)
        .ok_or("redirect without Location")?
        .to_str()
        .map_err(|_| "Location is not ASCII".to_string())?;
    let target: Uri = location
        .parse()
        .map_err(|e| format!("Location is not a URL ({e})"))?;
    if target.scheme().is_some() {
        return match target.scheme_str() {
            Some("http") | Some("https") if target.authority().is_some() => Ok(target),
            _ => Err("Location must be an http(s) URL".into()),
        };
    }
    if location.starts_with("//") {
        let scheme = current.scheme_str().unwrap_or("https");
        return format!("{scheme}:{location}")
            .parse()
            .map_err(|e| format!("bad Location ({e})"));
    }
    let path = if location.starts_with('/') {
        location.to_string()
    } else {
        // Relative to the current path's directory.
        let base = current.path();
        let dir = &base[..base.rfind('/').map(|i| i + 1).unwrap_or(0)];
        format!("{dir}{location}")
    };
    let mut parts = current.clone().into_parts();
    parts.path_and_query = Some(path.parse().map_err(|e| format!("bad Location ({e})"))?);
    Uri::from_parts(parts).map_err(|e| format!("bad Location ({e})"))
}

/// A URL without its query (CDN URLs carry signatures there).
pub fn redacted(uri: &Uri) -> String {
    format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("https"),
        uri.authority().map(|a| a.as_str()).unwrap_or(""),
        uri.path()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(current: &str, location: &str) -> Result<String, String> {
        let mut h = HeaderMap::new();
        h.insert(LOCATION, location.parse().unwrap());
        next_uri(&current.parse().unwrap(), &h).map(|u| u.to_string())
    }

    #[test]
    fn resolves_absolute_and_relative_locations() {
        let cur = "https://reg.test/v2/a/blobs/sha256:x";
        assert_eq!(
            loc(cur, "https://cdn.test/b?sig=1").unwrap(),
            "https://cdn.test/b?sig=1"
        );
        assert_eq!(
            loc(cur, "/other/path").unwrap(),
            "https://reg.test/other/path"
        );
        assert_eq!(
            loc(cur, "elsewhere").unwrap(),
            "https://reg.test/v2/a/blobs/elsewhere"
        );
        assert_eq!(loc(cur, "//cdn.test/c").unwrap(), "https://cdn.test/c");
        assert!(loc(cur, "ftp://x/y").is_err());
        assert!(next_uri(&cur.parse().unwrap(), &HeaderMap::new()).is_err());
    }
}
