//! When a cached tag may be served as is, and what to do after asking upstream.
//!
//! Pure decisions, tested as a table. A tag is fresh for `tag_ttl` after it
//! was learnt from upstream; after that it is revalidated with a `HEAD`
//! (Docker Hub does not count HEAD requests against its pull limit).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What a tag pointed to, and when regcache learnt it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRecord {
    /// The manifest digest, `sha256:…`.
    pub digest: String,
    /// When upstream last confirmed it, Unix milliseconds.
    pub fetched_at_ms: u64,
}

impl TagRecord {
    /// Whether the record may be served without asking upstream.
    pub fn is_fresh(&self, now_ms: u64, ttl: Duration) -> bool {
        now_ms.saturating_sub(self.fetched_at_ms) < ttl.as_millis() as u64
    }
}

/// What upstream said to the revalidating `HEAD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revalidation {
    /// 200 with this `Docker-Content-Digest` (None if the header was missing).
    Found(Option<String>),
    /// 404: the tag is gone.
    NotFound,
    /// 401 or 403: this client may not see it.
    Refused,
    /// 429, 5xx, or no answer at all.
    Unavailable,
    /// Any other status.
    Other,
}

/// What to do with a stale tag after revalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagAction {
    /// Same digest: serve the cached manifest and restart the TTL.
    ServeCached,
    /// Changed (or unknown) digest: fetch the manifest and store it.
    Refetch,
    /// Serve the stale copy with a `Warning: 110` header.
    ServeStale,
    /// Answer as upstream did; forget the tag if `forget`.
    PassUpstream {
        /// Drop the tag record (404).
        forget: bool,
    },
}

/// Decides what follows a revalidation of `cached`.
pub fn after_revalidation(cached: &TagRecord, outcome: &Revalidation) -> TagAction {
    match outcome {
        Revalidation::Found(Some(digest)) if *digest == cached.digest => TagAction::ServeCached,
        Revalidation::Found(_) => TagAction::Refetch,
        Revalidation::NotFound => TagAction::PassUpstream { forget: true },
        Revalidation::Refused | Revalidation::Other => TagAction::PassUpstream { forget: false },
        Revalidation::Unavailable => TagAction::ServeStale,
    }
}

/// Classifies an upstream status for revalidation.
pub fn classify(status: http::StatusCode, digest: Option<String>) -> Revalidation {
    match status.as_u16() {
        200 => Revalidation::Found(digest),
        404 => Revalidation::NotFound,
        401 | 403 => Revalidation::Refused,
        429 | 500..=599 => Revalidation::Unavailable,
        _ => Revalidation::Other,
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn rec() -> TagRecord {
        TagRecord {
            digest: "sha256:a".into(),
            fetched_at_ms: 1_000,
        }
    }

    #[test]
    fn freshness_window() {
        let ttl = Duration::from_secs(60);
        assert!(rec().is_fresh(1_000, ttl));
        assert!(rec().is_fresh(60_999, ttl));
        assert!(!rec().is_fresh(61_000, ttl));
        assert!(
            rec().is_fresh(0, ttl),
            "a clock step backwards keeps it fresh"
        );
        assert!(
            !rec().is_fresh(1_000, Duration::ZERO),
            "ttl 0 always revalidates"
        );
    }

    #[test]
    fn decision_table() {
        let table = [
            (StatusCode::OK, Some("sha256:a"), TagAction::ServeCached),
            (StatusCode::OK, Some("sha256:b"), TagAction::Refetch),
            (StatusCode::OK, None, TagAction::Refetch),
            (
                StatusCode::NOT_FOUND,
                None,
                TagAction::PassUpstream { forget: true },
            ),
            (
                StatusCode::UNAUTHORIZED,
                None,
                TagAction::PassUpstream { forget: false },
            ),
            (
                StatusCode::FORBIDDEN,
                None,
                TagAction::PassUpstream { forget: false },
            ),
            (StatusCode::TOO_MANY_REQUESTS, None, TagAction::ServeStale),
            (StatusCode::SERVICE_UNAVAILABLE, None, TagAction::ServeStale),
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                TagAction::ServeStale,
            ),
            (
                StatusCode::BAD_REQUEST,
                None,
                TagAction::PassUpstream { forget: false },
            ),
        ];
        for (status, digest, want) in table {
            let got = after_revalidation(&rec(), &classify(status, digest.map(String::from)));
            assert_eq!(got, want, "{status} {digest:?}");
        }
        assert_eq!(
            after_revalidation(&rec(), &Revalidation::Unavailable),
            TagAction::ServeStale
        );
    }
}
