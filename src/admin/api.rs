//! The admin API on the proxy port, JSON over origin-form requests:
//!
//! | request | answer |
//! |---|---|
//! | `GET /api/v1/stats` | [`LiveStats`]: what `cache stats` shows, with capacity, fills, uptime, version |
//! | `GET /api/v1/images` | [`Images`]: the cached tags and content entries, as `cache ls` lists them |
//! | `DELETE /api/v1/images/<ref>` | [`Removed`]: what `cache rm <ref>` removes (a tag or a digest) |
//! | `POST /api/v1/purge` | [`Purged`]: what `cache purge` removes |
//!
//! Each works on the live [`crate::cache::Cache`] (its memory and index),
//! with the decisions of [`crate::cache::offline`], so that what the proxy
//! serves changes at once. Errors are `{"error": "…"}` with 400 (bad
//! reference), 404 (not cached, unknown endpoint), 405 (wrong method),
//! 401 or 403 (see [`decide`]), 500 (the cache failed).
//!
//! Who may call it is [`decide`]: a loopback peer, or a peer sending
//! `Authorization: Bearer <token>` with the token of `admin_token_file`.
//! Every call is logged (method, path, peer, outcome).
//!
//! The running regcache writes the address to reach this API in
//! [`DISCOVERY_FILE`] in its cache directory ([`write_discovery`]), so
//! that `regcache cache …` finds the instance holding the cache.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use http::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::app::App;
use crate::cache::index::{ContentRow, TagRow};
use crate::cache::offline::{self, CacheStats, RemoveError};
use crate::http::body::{self, Body};

/// The path prefix of the API.
pub const PREFIX: &str = "/api/v1/";

/// The file in the cache directory naming the API's address
/// (`127.0.0.1:3128`), written by a running regcache.
pub const DISCOVERY_FILE: &str = "admin-api.addr";

/// Whether `path` belongs to the admin API.
pub fn is_api_path(path: &str) -> bool {
    path.starts_with(PREFIX) || path == "/api/v1"
}

/// `GET /api/v1/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveStats {
    /// What `cache stats` shows of the cache.
    #[serde(flatten)]
    pub cache: CacheStats,
    /// `cache_size` in bytes.
    pub capacity_bytes: u64,
    /// Bytes held or promised to downloads in progress.
    pub filling_bytes: u64,
    /// Downloads in progress.
    pub fills_in_progress: u64,
    /// Seconds since regcache started.
    pub uptime_seconds: u64,
    /// regcache's version.
    pub version: String,
    /// The shared tier, when `shared_store` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<SharedStats>,
    /// The last keep-warm run (`prefetch_file`), once one ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<crate::metrics::WarmStatus>,
}

/// The shared tier in `GET /api/v1/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedStats {
    /// `s3://BUCKET/PREFIX`.
    pub store: String,
    /// Whether its last request succeeded.
    pub reachable: bool,
    /// Objects read from it since start (local misses it answered).
    pub reads: u64,
    /// Objects this node uploaded to it since start.
    pub uploads: u64,
    /// Blobs streamed from other nodes' peer endpoints since start.
    #[serde(default)]
    pub from_peers: u64,
    /// The cluster's fetches this node holds the lease of now.
    #[serde(default)]
    pub leases_held: u64,
}

/// `GET /api/v1/images`: tags by name, then content, the most recently
/// used first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Images {
    /// The cached tags and the digests they name.
    pub tags: Vec<TagRow>,
    /// The content entries: digest, size, last use, media type.
    pub content: Vec<ContentRow>,
}

/// `DELETE /api/v1/images/<ref>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Removed {
    /// `tag KEY` and `content DIGEST`, one per thing removed.
    pub removed: Vec<String>,
}

/// `POST /api/v1/purge`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Purged {
    /// Content entries removed.
    pub entries: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
}

/// Who may call the API, decided by [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A loopback peer: allowed without a token.
    Loopback,
    /// The bearer token matched `admin_token_file`.
    Token,
    /// No token configured and not loopback: 403.
    Forbidden,
    /// A token is configured and the request did not carry it: 401.
    Unauthorized,
}

impl Verdict {
    /// Whether the call may go ahead.
    pub fn allowed(self) -> bool {
        matches!(self, Verdict::Loopback | Verdict::Token)
    }

    fn as_str(self) -> &'static str {
        match self {
            Verdict::Loopback => "loopback",
            Verdict::Token => "token",
            Verdict::Forbidden => "forbidden",
            Verdict::Unauthorized => "unauthorized",
        }
    }
}

/// Whether `ip` is a loopback address (`127.0.0.0/8`, `::1`, and IPv4
/// loopback mapped into IPv6, `::ffff:127.0.0.1`).
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Who may call the API: a loopback `peer` always; any other peer only
/// with `Authorization: Bearer <token>` equal to the configured `token`
/// (compared in constant time), and never when no token is configured.
pub fn decide(peer: IpAddr, authorization: Option<&[u8]>, token: Option<&str>) -> Verdict {
    if is_loopback(peer) {
        return Verdict::Loopback;
    }
    let Some(token) = token else {
        return Verdict::Forbidden;
    };
    let offered = authorization.and_then(bearer);
    match offered {
        Some(offered) if same_secret(offered, token.as_bytes()) => Verdict::Token,
        _ => Verdict::Unauthorized,
    }
}

/// The credentials of `Bearer <credentials>` (scheme in any case).
fn bearer(header: &[u8]) -> Option<&[u8]> {
    let scheme = header.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let rest = &header[7..];
    let start = rest.iter().position(|b| *b != b' ')?;
    let end = rest.iter().rposition(|b| *b != b' ')? + 1;
    Some(&rest[start..end])
}

/// Whether `a` and `b` are equal, in time that depends on neither: both
/// are hashed, and the digests compared byte by byte without stopping.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

/// Answers an admin API request from `peer`, and logs it.
pub async fn handle<B>(app: &App, peer: SocketAddr, req: &Request<B>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let authorization = req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes);
    let verdict = decide(peer.ip(), authorization, app.admin_token.as_deref());
    let resp = match verdict {
        Verdict::Forbidden => error(
            StatusCode::FORBIDDEN,
            "the admin API answers loopback clients only (set admin_token_file for others)",
        ),
        Verdict::Unauthorized => {
            let mut resp = error(
                StatusCode::UNAUTHORIZED,
                "the admin API needs Authorization: Bearer <token of admin_token_file>",
            );
            resp.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"regcache admin\""),
            );
            resp
        }
        Verdict::Loopback | Verdict::Token => route(app, &method, &path).await,
    };
    tracing::info!(
        %method,
        path,
        %peer,
        access = verdict.as_str(),
        status = resp.status().as_u16(),
        "admin API call"
    );
    resp
}

/// The numbers of `GET /api/v1/stats` now (the status page shows them too).
pub fn live_stats(app: &App) -> LiveStats {
    let cache = &app.state.cache;
    LiveStats {
        cache: cache.stats().into(),
        capacity_bytes: cache.cap(),
        filling_bytes: cache.reserved() + cache.promised(),
        fills_in_progress: cache.fills.len() as u64,
        uptime_seconds: app.started.elapsed().as_secs(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        shared: app.state.shared.as_ref().map(|shared| SharedStats {
            store: shared.name().to_string(),
            reachable: shared.is_up(),
            reads: shared.reads(),
            uploads: shared.written(),
            from_peers: app.state.peers.as_ref().map_or(0, |p| p.reads()),
            leases_held: shared.leases_held(),
        }),
        warm: crate::metrics::get().warm_status(),
    }
}

/// The endpoint for an allowed call.
async fn route(app: &App, method: &Method, path: &str) -> Response<Body> {
    let cache = &app.state.cache;
    let rest = path.strip_prefix(PREFIX).unwrap_or("");
    match rest {
        "stats" => {
            if method != Method::GET {
                return not_allowed("GET");
            }
            json(StatusCode::OK, &live_stats(app))
        }
        "images" => {
            if method != Method::GET {
                return not_allowed("GET");
            }
            match cache.snapshot().await {
                Ok(snap) => {
                    let listing = offline::list(&snap);
                    json(
                        StatusCode::OK,
                        &Images {
                            tags: listing.tags.into_iter().cloned().collect(),
                            content: listing.content.into_iter().cloned().collect(),
                        },
                    )
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        "purge" => {
            if method != Method::POST {
                return not_allowed("POST");
            }
            match cache.purge().await {
                Ok((entries, bytes)) => json(StatusCode::OK, &Purged { entries, bytes }),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        _ => match rest.strip_prefix("images/") {
            Some(target) => {
                if method != Method::DELETE {
                    return not_allowed("DELETE");
                }
                remove(app, target).await
            }
            None => error(
                StatusCode::NOT_FOUND,
                "no such endpoint; the admin API has /api/v1/stats, /api/v1/images, /api/v1/images/<ref>, /api/v1/purge",
            ),
        },
    }
}

/// `DELETE /api/v1/images/<ref>`, `<ref>` percent-decoded.
async fn remove(app: &App, target: &str) -> Response<Body> {
    let Ok(target) = percent_encoding::percent_decode_str(target).decode_utf8() else {
        return error(StatusCode::BAD_REQUEST, "the reference is not UTF-8");
    };
    match app.state.cache.remove(&target).await {
        Ok(removal) => json(
            StatusCode::OK,
            &Removed {
                removed: removal.lines(),
            },
        ),
        Err(e @ RemoveError::BadTarget(_)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e @ RemoveError::NotCached(_)) => error(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e @ RemoveError::Cache(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("this endpoint answers {allow} only"),
    );
    resp.headers_mut()
        .insert(http::header::ALLOW, HeaderValue::from_static(allow));
    resp
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(
        status,
        &ApiError {
            error: message.to_string(),
        },
    )
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let text = serde_json::to_string_pretty(value)
        .unwrap_or_else(|e| format!("{{\"error\": \"cannot write JSON: {e}\"}}"));
    let mut resp = Response::new(body::full(text + "\n"));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The address a local client uses to reach a listener bound to `bound`:
/// loopback of the same family for a wildcard (`0.0.0.0`, `::`), else
/// `bound` itself.
pub fn reachable_at(bound: SocketAddr) -> SocketAddr {
    match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), bound.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), bound.port())
        }
        _ => bound,
    }
}

/// The discovery file of the cache in `cache_dir`.
pub fn discovery_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join(DISCOVERY_FILE)
}

/// Writes where the API of the proxy bound to `bound` is reached, in the
/// cache directory, atomically (a temporary file renamed).
pub async fn write_discovery(cache_dir: &Path, bound: SocketAddr) -> std::io::Result<()> {
    let path = discovery_path(cache_dir);
    let temp = cache_dir.join(format!("{DISCOVERY_FILE}.{}.tmp", std::process::id()));
    tokio::fs::write(&temp, format!("{}\n", reachable_at(bound))).await?;
    tokio::fs::rename(&temp, &path).await
}

/// Removes the discovery file (at exit), if this process wrote it.
pub async fn remove_discovery(cache_dir: &Path, bound: SocketAddr) {
    let path = discovery_path(cache_dir);
    if read_discovery(&path).await == Some(reachable_at(bound)) {
        let _ = tokio::fs::remove_file(&path).await;
    }
}

/// The address in a discovery file, if it holds one.
pub async fn read_discovery(path: &Path) -> Option<SocketAddr> {
    let text = tokio::fs::read_to_string(path).await.ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_may_call_the_api() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let token = Some("s3cret-token");
        // (peer, Authorization, configured token, verdict)
        let table: &[(&str, Option<&str>, Option<&str>, Verdict)] = &[
            ("127.0.0.1", None, None, Verdict::Loopback),
            ("127.8.9.10", None, None, Verdict::Loopback),
            ("::1", None, None, Verdict::Loopback),
            ("::ffff:127.0.0.1", None, None, Verdict::Loopback),
            ("127.0.0.1", Some("Bearer wrong"), token, Verdict::Loopback),
            ("10.0.0.7", None, None, Verdict::Forbidden),
            (
                "10.0.0.7",
                Some("Bearer s3cret-token"),
                None,
                Verdict::Forbidden,
            ),
            ("::ffff:10.0.0.7", None, None, Verdict::Forbidden),
            ("fe80::1", None, None, Verdict::Forbidden),
            ("0.0.0.0", None, None, Verdict::Forbidden),
            ("10.0.0.7", None, token, Verdict::Unauthorized),
            (
                "10.0.0.7",
                Some("Bearer s3cret-token"),
                token,
                Verdict::Token,
            ),
            (
                "10.0.0.7",
                Some("bearer  s3cret-token "),
                token,
                Verdict::Token,
            ),
            (
                "2001:db8::1",
                Some("BEARER s3cret-token"),
                token,
                Verdict::Token,
            ),
            (
                "10.0.0.7",
                Some("Bearer s3cret-tokeN"),
                token,
                Verdict::Unauthorized,
            ),
            (
                "10.0.0.7",
                Some("Bearer s3cret-token2"),
                token,
                Verdict::Unauthorized,
            ),
            (
                "10.0.0.7",
                Some("Bearer s3cret"),
                token,
                Verdict::Unauthorized,
            ),
            ("10.0.0.7", Some("Bearer "), token, Verdict::Unauthorized),
            (
                "10.0.0.7",
                Some("Basic s3cret-token"),
                token,
                Verdict::Unauthorized,
            ),
            (
                "10.0.0.7",
                Some("s3cret-token"),
                token,
                Verdict::Unauthorized,
            ),
            ("10.0.0.7", Some(""), token, Verdict::Unauthorized),
        ];
        for &(peer, header, configured, want) in table {
            let got = decide(ip(peer), header.map(str::as_bytes), configured);
            assert_eq!(got, want, "{peer} {header:?} {configured:?}");
            assert_eq!(
                got.allowed(),
                matches!(want, Verdict::Loopback | Verdict::Token)
            );
        }
    }

    #[test]
    fn a_wildcard_listener_is_reached_on_loopback() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        for (bound, reach) in [
            ("0.0.0.0:3128", "127.0.0.1:3128"),
            ("[::]:3128", "[::1]:3128"),
            ("127.0.0.1:4000", "127.0.0.1:4000"),
            ("10.1.2.3:3128", "10.1.2.3:3128"),
        ] {
            assert_eq!(reachable_at(addr(bound)), addr(reach), "{bound}");
        }
    }

    #[test]
    fn stats_json_carries_what_cache_stats_shows() {
        let stats = LiveStats {
            cache: CacheStats {
                entries: 3,
                bytes: 1000,
                tags: 1,
                links: 3,
                hits: 2,
                misses: 3,
                unused_entries: 0,
                unused_bytes: 0,
                unused_tags: 0,
            },
            capacity_bytes: 1 << 30,
            filling_bytes: 0,
            fills_in_progress: 0,
            uptime_seconds: 5,
            version: "0.1.0".into(),
            shared: None,
            warm: None,
        };
        let text = serde_json::to_string(&stats).unwrap();
        assert!(
            text.starts_with("{\"entries\":3,\"bytes\":1000,\"tags\":1"),
            "{text}"
        );
        assert!(!text.contains("shared"), "{text}");
        let back: LiveStats = serde_json::from_str(&text).unwrap();
        assert_eq!(back, stats);
        let tiered = LiveStats {
            shared: Some(SharedStats {
                store: "s3://b/p".into(),
                reachable: true,
                reads: 4,
                uploads: 2,
                from_peers: 3,
                leases_held: 1,
            }),
            warm: None,
            ..stats
        };
        let text = serde_json::to_string(&tiered).unwrap();
        assert!(
            text.contains("\"shared\":{\"store\":\"s3://b/p\",\"reachable\":true,\"reads\":4"),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<LiveStats>(&text).unwrap(), tiered);
    }
}
