//! What the status page shows of recent traffic, recorded beside the
//! Prometheus metrics by [`super::Metrics`] where requests end: totals since
//! start and since 00:00 UTC (requests served from the cache or not, bytes
//! by source), the most requested images, and the recent errors and
//! refusals.
//!
//! Memory stays bounded whatever the traffic: at most [`TOP_CAPACITY`]
//! image names are counted (a new name evicts the least counted one), the
//! ring holds the last [`RECENT_CAPACITY`] events, and every name is cut to
//! [`MAX_NAME`] bytes. Events carry a path without its query (the access
//! log's), never a header value, so no credential or signed URL reaches
//! them.
//!
//! Like its parent, this module names no other module of the crate.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Image names counted for "most requested" at most.
pub const TOP_CAPACITY: usize = 1000;
/// Errors and refusals kept, the newest.
pub const RECENT_CAPACITY: usize = 50;
/// Longest name (image, request target, reason) kept, in bytes.
pub const MAX_NAME: usize = 256;

/// Requests and bytes over a period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Requests served from the cache: `hit`, `coalesced`, `stale`,
    /// `revalidated`.
    pub from_cache: u64,
    /// Requests that could have been and were not: `miss` and `error`.
    pub not_from_cache: u64,
    /// Body bytes served from the cache: bytes that did not cross the WAN.
    pub bytes_from_cache: u64,
    /// Body bytes served from upstream (`miss`, `pass`).
    pub bytes_from_upstream: u64,
}

impl Totals {
    /// Requests served from the cache in percent of [`Totals::from_cache`]
    /// and [`Totals::not_from_cache`] (the dashboard's hit ratio); None
    /// before any.
    pub fn hit_percent(&self) -> Option<f64> {
        let asked = self.from_cache + self.not_from_cache;
        (asked > 0).then(|| 100.0 * self.from_cache as f64 / asked as f64)
    }
}

/// One error or refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When, in seconds since the Unix epoch.
    pub at_unix: u64,
    /// `error` (a 5xx answered), `refused` (401, 403, 407 answered),
    /// `bad request` (400 answered), `throttled` (429 answered), `upstream` (an upstream registry failed
    /// or throttled), `fill` (a download into the cache failed).
    pub kind: &'static str,
    /// What it was about: `registry/repository`, else the registry and
    /// path, else the request target; empty if nothing is known.
    pub target: String,
    /// The HTTP status, when there was one.
    pub status: Option<u16>,
    /// A short reason.
    pub reason: String,
}

/// A request that ended, as [`Activity::request`] takes it.
#[derive(Debug, Clone, Copy)]
pub struct Ended<'a> {
    /// The canonical registry (empty for none).
    pub registry: &'a str,
    /// The request path, without the query.
    pub path: &'a str,
    /// `manifest`, `blob` or `other`.
    pub kind: &'static str,
    /// The `result` label.
    pub result: &'static str,
    /// The response status.
    pub status: u16,
    /// Body bytes sent.
    pub bytes: u64,
}

/// What [`Activity::snapshot`] returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ActivitySnapshot {
    /// Since regcache started.
    pub since_start: Totals,
    /// Since 00:00 UTC today.
    pub today: Totals,
    /// The most requested images (`registry/repository`, manifest
    /// requests), the most first, at most the `top` asked for.
    pub top: Vec<(String, u64)>,
    /// Image names being counted (at most [`TOP_CAPACITY`]).
    pub names_counted: usize,
    /// The recent errors and refusals, the newest first.
    pub recent: Vec<Event>,
}

#[derive(Debug, Default)]
struct Inner {
    since_start: Totals,
    today: Totals,
    /// The UTC day (days since the epoch) `today` counts.
    day: u64,
    top: HashMap<String, u64>,
    recent: VecDeque<Event>,
}

/// The recorder: one short lock per request ended, none per chunk.
#[derive(Debug, Default)]
pub struct Activity {
    inner: Mutex<Inner>,
}

/// Seconds since the Unix epoch now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

const DAY: u64 = 86_400;

/// `s` cut to at most [`MAX_NAME`] bytes, on a character boundary.
fn bounded(s: &str) -> String {
    if s.len() <= MAX_NAME {
        return s.to_string();
    }
    let mut end = MAX_NAME;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The repository of a registry API path `/v2/<name>/manifests/<ref>` or
/// `/v2/<name>/blobs/<digest>`.
pub fn repository_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    let end = rest
        .rfind("/manifests/")
        .or_else(|| rest.rfind("/blobs/"))?;
    let name = &rest[..end];
    (!name.is_empty()).then_some(name)
}

/// What an event is about: `registry/repository`, else `registry` and
/// path, else the path (a CONNECT target, regcache's own page).
pub fn target(registry: &str, path: &str) -> String {
    match (registry, repository_of(path)) {
        ("", _) => bounded(path),
        (registry, Some(repo)) => bounded(&format!("{registry}/{repo}")),
        (registry, None) => bounded(&format!("{registry} {path}")),
    }
}

/// The reason phrase of `status`, or empty.
fn reason_phrase(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

impl Inner {
    /// Starts a new `today` when the UTC day changed.
    fn roll(&mut self, now: u64) {
        let day = now / DAY;
        if day != self.day {
            self.day = day;
            self.today = Totals::default();
        }
    }

    fn push(&mut self, event: Event) {
        if self.recent.len() == RECENT_CAPACITY {
            self.recent.pop_front();
        }
        self.recent.push_back(event);
    }

    fn count(&mut self, name: String) {
        if let Some(n) = self.top.get_mut(&name) {
            *n += 1;
            return;
        }
        if self.top.len() >= TOP_CAPACITY {
            let least = self
                .top
                .iter()
                .min_by_key(|(_, n)| **n)
                .map(|(k, _)| k.clone());
            if let Some(least) = least {
                self.top.remove(&least);
            }
        }
        self.top.insert(name, 1);
    }
}

impl Activity {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A client request ended (see [`Ended`]).
    pub fn request(&self, r: &Ended<'_>) {
        self.request_at(r, now_unix());
    }

    fn request_at(&self, r: &Ended<'_>, now: u64) {
        let mut inner = self.lock();
        inner.roll(now);
        let add = |t: &mut Totals| match r.result {
            "hit" | "shared" | "peer" | "coalesced" | "stale" | "revalidated" => {
                t.from_cache += 1;
                t.bytes_from_cache += r.bytes;
            }
            "miss" | "pass" | "error" => {
                if r.result != "pass" {
                    t.not_from_cache += 1;
                }
                if r.result != "error" {
                    t.bytes_from_upstream += r.bytes;
                }
            }
            _ => {}
        };
        add(&mut inner.since_start);
        add(&mut inner.today);
        if r.kind == "manifest" && !r.registry.is_empty() && r.status < 400 {
            if let Some(repo) = repository_of(r.path) {
                inner.count(bounded(&format!("{}/{repo}", r.registry)));
            }
        }
        let kind = match (r.result, r.status) {
            ("error", _) => "error",
            ("denied", _) => "refused",
            (_, 429) => "throttled",
            (_, 400) => "bad request",
            _ => return,
        };
        inner.push(Event {
            at_unix: now,
            kind,
            target: target(r.registry, r.path),
            status: Some(r.status),
            reason: reason_phrase(r.status).to_string(),
        });
    }

    /// Something failed outside a client's answer: an upstream registry
    /// (`upstream`), a download (`fill`), a client refused before any
    /// request (`refused`).
    pub fn event(&self, kind: &'static str, target: &str, status: Option<u16>, reason: &str) {
        let now = now_unix();
        let mut inner = self.lock();
        inner.push(Event {
            at_unix: now,
            kind,
            target: bounded(target),
            status,
            reason: bounded(reason),
        });
    }

    /// The numbers now, with the `top` most requested images.
    pub fn snapshot(&self, top: usize) -> ActivitySnapshot {
        self.snapshot_at(top, now_unix())
    }

    fn snapshot_at(&self, top: usize, now: u64) -> ActivitySnapshot {
        let mut inner = self.lock();
        inner.roll(now);
        let mut names: Vec<(String, u64)> =
            inner.top.iter().map(|(k, n)| (k.clone(), *n)).collect();
        names.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        names.truncate(top);
        ActivitySnapshot {
            since_start: inner.since_start,
            today: inner.today,
            top: names,
            names_counted: inner.top.len(),
            recent: inner.recent.iter().rev().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended<'a>(registry: &'a str, path: &'a str, result: &'static str, status: u16) -> Ended<'a> {
        Ended {
            registry,
            path,
            kind: crate::metrics::kind_of(path),
            result,
            status,
            bytes: 10,
        }
    }

    #[test]
    fn totals_count_today_and_since_start() {
        let a = Activity::default();
        let day1 = 20_000 * DAY + 3600;
        let blob = "/v2/library/alpine/blobs/sha256:ab";
        a.request_at(&ended("docker.io", blob, "miss", 200), day1);
        a.request_at(&ended("docker.io", blob, "hit", 200), day1);
        a.request_at(&ended("docker.io", blob, "coalesced", 200), day1);
        a.request_at(&ended("", "/metrics", "pass", 200), day1);
        let s = a.snapshot_at(10, day1);
        assert_eq!(s.since_start, s.today);
        assert_eq!(
            s.today,
            Totals {
                from_cache: 2,
                not_from_cache: 1,
                bytes_from_cache: 20,
                bytes_from_upstream: 20,
            }
        );
        assert!((s.today.hit_percent().unwrap() - 200.0 / 3.0).abs() < 1e-9);
        // At 00:00 UTC the day starts again; since start does not.
        let day2 = 20_001 * DAY;
        let s = a.snapshot_at(10, day2);
        assert_eq!(s.today, Totals::default());
        assert_eq!(s.today.hit_percent(), None);
        assert_eq!(s.since_start.from_cache, 2);
        a.request_at(&ended("docker.io", blob, "hit", 200), day2 + 5);
        let s = a.snapshot_at(10, day2 + 6);
        assert_eq!((s.today.from_cache, s.since_start.from_cache), (1, 3));
    }

    #[test]
    fn the_most_requested_images_are_manifest_pulls_by_repository() {
        let a = Activity::default();
        for (path, n) in [
            ("/v2/library/alpine/manifests/3.20", 3),
            ("/v2/library/busybox/manifests/latest", 1),
            ("/v2/team/app/manifests/sha256:ab", 2),
        ] {
            for _ in 0..n {
                a.request_at(&ended("docker.io", path, "hit", 200), 0);
            }
        }
        // Blobs, refusals and regcache's own pages are not pulls.
        a.request_at(
            &ended(
                "docker.io",
                "/v2/library/busybox/blobs/sha256:ab",
                "hit",
                200,
            ),
            0,
        );
        a.request_at(
            &ended(
                "docker.io",
                "/v2/library/busybox/manifests/x",
                "denied",
                401,
            ),
            0,
        );
        a.request_at(&ended("", "/v2/x/manifests/y", "pass", 200), 0);
        let s = a.snapshot_at(2, 0);
        assert_eq!(
            s.top,
            vec![
                ("docker.io/library/alpine".to_string(), 3),
                ("docker.io/team/app".to_string(), 2)
            ]
        );
        assert_eq!(s.names_counted, 3);
    }

    #[test]
    fn the_counts_and_the_ring_stay_bounded() {
        let a = Activity::default();
        let hot = "/v2/hot/app/manifests/1";
        for _ in 0..5 {
            a.request_at(&ended("r.example", hot, "hit", 200), 0);
        }
        for i in 0..3 * TOP_CAPACITY {
            let path = format!("/v2/n{i}/manifests/1");
            a.request_at(&ended("r.example", &path, "miss", 200), 0);
        }
        let long = format!("/v2/{}/manifests/1", "a".repeat(10 * MAX_NAME));
        a.request_at(&ended("r.example", &long, "miss", 200), 0);
        for i in 0..3 * RECENT_CAPACITY {
            let path = format!("/v2/e{i}/blobs/sha256:ab");
            a.request_at(&ended("r.example", &path, "error", 502), i as u64);
        }
        let s = a.snapshot_at(TOP_CAPACITY * 2, 1_000);
        assert_eq!(s.names_counted, TOP_CAPACITY);
        assert_eq!(s.top.len(), TOP_CAPACITY);
        assert_eq!(s.top[0], ("r.example/hot/app".to_string(), 5));
        assert!(s.top.iter().all(|(n, _)| n.len() <= MAX_NAME + "…".len()));
        assert_eq!(s.recent.len(), RECENT_CAPACITY);
        let newest = &s.recent[0];
        assert_eq!(
            newest.target,
            format!("r.example/e{}", 3 * RECENT_CAPACITY - 1)
        );
        assert_eq!(
            (newest.kind, newest.status, newest.reason.as_str()),
            ("error", Some(502), "Bad Gateway")
        );
    }

    #[test]
    fn events_name_refusals_and_throttling_not_successes() {
        let a = Activity::default();
        a.request_at(&ended("", "evil.example:443", "denied", 403), 7);
        a.request_at(&ended("docker.io", "/v2/a/manifests/1", "miss", 429), 8);
        a.request_at(&ended("docker.io", "/v2/", "pass", 200), 9);
        a.request_at(&ended("docker.io", "/v2/a/manifests/2", "miss", 404), 9);
        let s = a.snapshot_at(10, 10);
        let got: Vec<_> = s
            .recent
            .iter()
            .map(|e| (e.kind, e.target.as_str(), e.status))
            .collect();
        assert_eq!(
            got,
            vec![
                ("throttled", "docker.io/a", Some(429)),
                ("refused", "evil.example:443", Some(403)),
            ]
        );
        assert_eq!(repository_of("/v2/a/b/c/blobs/sha256:x"), Some("a/b/c"));
        assert_eq!(repository_of("/v2/"), None);
        assert_eq!(repository_of("/metrics"), None);
    }
}
