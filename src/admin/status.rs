//! The status page, `GET /` on the proxy port for a browser: one page that
//! says at a glance what the cache saves and whether anything is wrong.
//!
//! [`snapshot`] gathers the numbers (the admin API's [`LiveStats`], the
//! cache's downloads in flight, and what [`crate::metrics`] recorded:
//! upstream registries, totals today and since start, the most requested
//! images, recent errors); [`render`] is a pure function from that
//! [`StatusSnapshot`] to HTML. The page refreshes itself every
//! [`REFRESH_SECONDS`], has its CSS inline, no script and nothing loaded
//! from elsewhere, reflows to one column on a narrow window, and every
//! text in it is HTML-escaped ([`escape`]): image names come from clients.
//!
//! It shows image names, so it answers whom the admin API answers
//! ([`super::api::decide`]); others get [`forbidden`].

use std::fmt::Write as _;

use crate::admin::api::LiveStats;
use crate::app::App;
use crate::cache::FillProgress;
use crate::metrics::activity::{ActivitySnapshot, Event};
use crate::metrics::UpstreamStatus;

/// How often the page reloads itself, in seconds.
pub const REFRESH_SECONDS: u32 = 10;
/// How many of the most requested images the page lists.
pub const TOP_IMAGES: usize = 10;

/// Everything the page shows.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusSnapshot {
    /// Now, in seconds since the Unix epoch (times are shown against it).
    pub now_unix: u64,
    /// What `GET /api/v1/stats` answers.
    pub stats: LiveStats,
    /// The downloads into the cache in flight.
    pub fills: Vec<FillProgress>,
    /// Each upstream registry contacted.
    pub upstreams: Vec<UpstreamStatus>,
    /// Totals, most requested images, recent errors.
    pub activity: ActivitySnapshot,
}

/// The numbers of the running regcache now.
pub fn snapshot(app: &App) -> StatusSnapshot {
    let metrics = crate::metrics::get();
    StatusSnapshot {
        now_unix: crate::metrics::activity::now_unix(),
        stats: super::api::live_stats(app),
        fills: app.state.cache.fills.progress(),
        upstreams: metrics.upstreams(),
        activity: metrics.activity(TOP_IMAGES),
    }
}

/// `s` with `&`, `<`, `>`, `"` and `'` escaped: safe in text and in quoted
/// attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "\
*{box-sizing:border-box}\
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;padding:1rem;max-width:76rem;background:#f5f6f8;color:#1b1f24}\
header h1{margin:0;font-size:1.4rem}\
header p{margin:.2rem 0 1rem;color:#555}\
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,22rem),1fr));gap:1rem}\
section{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:.8rem 1rem;min-width:0}\
section.wide{grid-column:1/-1}\
h2{font-size:1rem;margin:0 0 .6rem}\
.big{font-size:1.9rem;font-weight:650;line-height:1.1}\
.pair{display:flex;flex-wrap:wrap;gap:1rem 2rem}\
.pair>div{min-width:9rem}\
table{border-collapse:collapse;width:100%}\
th,td{text-align:left;padding:.3rem .45rem;border-bottom:1px solid #eef0f2;vertical-align:top}\
th{font-weight:600;color:#444;font-size:.85rem}\
.scroll{overflow-x:auto}\
.name{overflow-wrap:anywhere;word-break:break-word}\
.host{white-space:nowrap}\
.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}\
.bar{height:.85rem;background:#e3e6ea;border-radius:4px;overflow:hidden;margin:.35rem 0}\
.bar span{display:block;height:100%;background:#2e7d32}\
.bar.full span{background:#c62828}\
.up{color:#1b6e20;font-weight:650}\
.down{color:#b3261e;font-weight:650}\
.muted{color:#666}\
code{font-size:.9em}\
@media (max-width:32rem){body{padding:.5rem;font-size:14px}.big{font-size:1.5rem}th,td{padding:.25rem .3rem}}";

/// The page for `s`.
pub fn render(s: &StatusSnapshot) -> String {
    let mut h = String::with_capacity(8 * 1024);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <title>regcache status</title><style>{STYLE}</style></head><body>\
         <header><h1>regcache</h1><p>version <span id=\"version\">{}</span> · up <span id=\"uptime\">{}</span> · \
         {} UTC · refreshes every {REFRESH_SECONDS} s</p></header><main class=\"grid\">",
        escape(&s.stats.version),
        duration(s.stats.uptime_seconds),
        utc(s.now_unix),
    );
    saved(&mut h, s);
    cache(&mut h, s);
    warm(&mut h, s);
    upstreams(&mut h, s);
    top(&mut h, &s.activity);
    fills(&mut h, &s.fills);
    recent(&mut h, &s.activity.recent, s.now_unix);
    h.push_str("</main></body></html>\n");
    h
}

/// The 403 page for a client the access rule refuses, saying why.
pub fn forbidden(message: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>regcache: forbidden</title><style>{STYLE}</style></head><body>\
         <header><h1>403 Forbidden</h1></header><section><p>{}</p></section></body></html>\n",
        escape(message)
    )
}

fn percent(p: Option<f64>) -> String {
    match p {
        Some(p) => format!("{p:.1}%"),
        None => "–".to_string(),
    }
}

fn saved(h: &mut String, s: &StatusSnapshot) {
    let a = &s.activity;
    h.push_str("<section><h2>Served from the cache</h2><div class=\"pair\">");
    for (id, label, t) in [
        ("today", "today (since 00:00 UTC)", &a.today),
        ("start", "since start", &a.since_start),
    ] {
        let _ = write!(
            h,
            "<div><div class=\"muted\">{label}</div>\
             <div class=\"big\" id=\"hit-ratio-{id}\">{}</div><div>hit ratio, {} of {} requests</div>\
             <div class=\"big\" id=\"saved-{id}\">{}</div><div>saved (served from the cache); {} from upstream</div></div>",
            percent(t.hit_percent()),
            t.from_cache,
            t.from_cache + t.not_from_cache,
            bytes(t.bytes_from_cache),
            bytes(t.bytes_from_upstream),
        );
    }
    let c = &s.stats.cache;
    let _ = write!(
        h,
        "</div><p class=\"muted\">Hit ratio: requests answered from the cache (hit, coalesced, stale, revalidated) \
         among those, the misses and the errors. Over the cache's life, all runs: {} of {} requests.</p></section>",
        percent(c.hit_percent()),
        c.hits + c.misses,
    );
}

fn cache(h: &mut String, s: &StatusSnapshot) {
    let st = &s.stats;
    let used = st.cache.bytes;
    let cap = st.capacity_bytes;
    let share = if cap > 0 {
        (used as f64 / cap as f64 * 100.0).clamp(0.0, 100.0)
    } else {
        0.0
    };
    let full = if share >= 90.0 { " full" } else { "" };
    let tier = match &st.shared {
        Some(t) => format!(
            "<div id=\"shared\">shared tier {}: <span class=\"{}\">{}</span> · {} read · {} uploaded · {} from peers · {} leases held</div>",
            escape(&t.store),
            if t.reachable { "up" } else { "down" },
            if t.reachable { "reachable" } else { "unreachable" },
            t.reads,
            t.uploads,
            t.from_peers,
            t.leases_held,
        ),
        None => String::new(),
    };
    let c = &st.cache;
    let unused = if c.unused_entries + c.unused_tags > 0 {
        format!(
            "<div class=\"muted\" id=\"unused\">removed as unused (max_unused): {} entr{} ({}), {} tag{}</div>",
            c.unused_entries,
            if c.unused_entries == 1 { "y" } else { "ies" },
            bytes(c.unused_bytes),
            c.unused_tags,
            if c.unused_tags == 1 { "" } else { "s" },
        )
    } else {
        String::new()
    };
    let _ = write!(
        h,
        "<section><h2>Cache</h2><div class=\"big\" id=\"cache-fill\">{share:.1}%</div>\
         <div class=\"bar{full}\" role=\"img\" aria-label=\"cache {share:.0}% full\"><span style=\"width:{share:.1}%\"></span></div>\
         <div>{} of {} · {} entries · {} tag{}</div>\
         <div class=\"muted\">{} download{} in progress holding {}</div>{unused}{tier}</section>",
        bytes(used),
        bytes(cap),
        st.cache.entries,
        st.cache.tags,
        if st.cache.tags == 1 { "" } else { "s" },
        st.fills_in_progress,
        if st.fills_in_progress == 1 { "" } else { "s" },
        bytes(st.filling_bytes),
    );
}

/// The keep-warm list's last run, when `prefetch_file` is set and one ended.
fn warm(h: &mut String, s: &StatusSnapshot) {
    let Some(w) = &s.stats.warm else {
        return;
    };
    let error = match &w.last_error {
        Some(e) if w.failed > 0 => format!(
            "<div class=\"muted\" id=\"warm-error\">last failure: {}</div>",
            escape(e)
        ),
        _ => String::new(),
    };
    let _ = write!(
        h,
        "<section><h2>Keep warm</h2><div id=\"warm\">last run {} ({}): {} image{} · {} unchanged · {} updated · \
         <span class=\"{}\">{} failed</span></div>{error}</section>",
        utc(w.last_run_unix),
        ago(s.now_unix, w.last_run_unix),
        w.images,
        if w.images == 1 { "" } else { "s" },
        w.unchanged,
        w.updated,
        if w.failed > 0 { "down" } else { "up" },
        w.failed,
    );
}

fn upstreams(h: &mut String, s: &StatusSnapshot) {
    h.push_str("<section class=\"wide\"><h2>Upstream registries</h2>");
    if s.upstreams.is_empty() {
        h.push_str("<p class=\"muted\">No upstream registry contacted yet.</p></section>");
        return;
    }
    h.push_str(
        "<div class=\"scroll\"><table id=\"upstreams\"><thead><tr><th>registry</th><th>state</th>\
         <th>last contact</th><th class=\"num\">mean latency</th><th class=\"num\">requests</th>\
         <th>rate limit left</th><th class=\"num\">429s</th></tr></thead><tbody>",
    );
    for u in &s.upstreams {
        let (class, state) = if u.up { ("up", "up") } else { ("down", "down") };
        let latency = match u.mean_latency_seconds {
            Some(l) if l < 0.01 => format!("{:.1} ms", l * 1000.0),
            Some(l) => format!("{:.0} ms", l * 1000.0),
            None => "–".into(),
        };
        let limit = match (u.ratelimit_remaining, u.ratelimit_limit) {
            (Some(r), Some(l)) => {
                let window = u
                    .ratelimit_window_seconds
                    .map(|w| format!(" per {}", duration(u64::try_from(w).unwrap_or(0))))
                    .unwrap_or_default();
                format!("{r} / {l}{window}")
            }
            (Some(r), None) => format!("{r} left"),
            (None, Some(l)) => format!("? / {l}"),
            (None, None) => "not announced".into(),
        };
        let _ = write!(
            h,
            "<tr><td class=\"host\">{}</td><td class=\"{class}\">{state}</td><td>{}</td>\
             <td class=\"num\">{latency}</td><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td></tr>",
            escape(&u.registry),
            ago(s.now_unix, u.last_contact_unix),
            u.requests,
            escape(&limit),
            u.throttled,
        );
    }
    h.push_str("</tbody></table></div></section>");
}

fn top(h: &mut String, a: &ActivitySnapshot) {
    h.push_str("<section><h2>Most requested images</h2>");
    if a.top.is_empty() {
        h.push_str("<p class=\"muted\">No pulls yet.</p></section>");
        return;
    }
    h.push_str("<table id=\"top\"><thead><tr><th>image</th><th class=\"num\">manifest requests</th></tr></thead><tbody>");
    for (name, n) in &a.top {
        let _ = write!(
            h,
            "<tr><td class=\"name\">{}</td><td class=\"num\">{n}</td></tr>",
            escape(name)
        );
    }
    let _ = write!(
        h,
        "</tbody></table><p class=\"muted\">Since start; {} name{} counted.</p></section>",
        a.names_counted,
        if a.names_counted == 1 { "" } else { "s" },
    );
}

fn fills(h: &mut String, fills: &[FillProgress]) {
    h.push_str("<section><h2>Downloads in progress</h2>");
    if fills.is_empty() {
        h.push_str("<p class=\"muted\">None.</p></section>");
        return;
    }
    h.push_str("<table id=\"fills\"><tbody>");
    for f in fills {
        let short = f
            .digest
            .split_once(':')
            .map(|(_, hex)| hex)
            .unwrap_or(&f.digest);
        let short: String = short.chars().take(12).collect();
        let image = f
            .origin
            .as_ref()
            .map(|(r, repo)| format!("{r}/{repo}"))
            .unwrap_or_default();
        let (share, of) = match f.total {
            Some(total) if total > 0 => (
                (f.written as f64 / total as f64 * 100.0).clamp(0.0, 100.0),
                format!("{} / {}", bytes(f.written), bytes(total)),
            ),
            _ => (0.0, format!("{} / ?", bytes(f.written))),
        };
        let _ = write!(
            h,
            "<tr><td class=\"name\"><code>{}</code> {}<div class=\"bar\"><span style=\"width:{share:.1}%\"></span></div>\
             <span class=\"muted\">{} · {}</span></td></tr>",
            escape(&short),
            escape(&image),
            of,
            escape(f.phase),
        );
    }
    h.push_str("</tbody></table></section>");
}

fn recent(h: &mut String, events: &[Event], now: u64) {
    h.push_str("<section class=\"wide\"><h2>Recent errors and refusals</h2>");
    if events.is_empty() {
        h.push_str("<p class=\"muted\">None since start.</p></section>");
        return;
    }
    h.push_str(
        "<div class=\"scroll\"><table id=\"recent\"><thead><tr><th>when</th><th>kind</th><th>what</th>\
         <th class=\"num\">status</th><th>reason</th></tr></thead><tbody>",
    );
    for e in events {
        let status = e.status.map(|s| s.to_string()).unwrap_or_default();
        let _ = write!(
            h,
            "<tr><td title=\"{}\">{}</td><td>{}</td><td class=\"name\">{}</td><td class=\"num\">{status}</td>\
             <td class=\"name\">{}</td></tr>",
            utc(e.at_unix),
            ago(now, e.at_unix),
            escape(e.kind),
            escape(&e.target),
            escape(&e.reason),
        );
    }
    h.push_str("</tbody></table></div></section>");
}

/// `n` bytes in binary units (`1.5 MiB`).
fn bytes(n: u64) -> String {
    bytesize::ByteSize::b(n).display().iec().to_string()
}

/// `secs` as the two largest units (`2d 3h`, `4m 5s`, `6s`).
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// How long before `now` `then` was (`5s ago`).
fn ago(now: u64, then: u64) -> String {
    format!("{} ago", duration(now.saturating_sub(then)))
}

/// `unix` as `2026-12-02 10:26:08` (UTC).
fn utc(unix: u64) -> String {
    let t = i64::try_from(unix)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok());
    match t {
        Some(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        None => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::offline::CacheStats;
    use crate::metrics::activity::Totals;

    fn empty() -> StatusSnapshot {
        StatusSnapshot {
            now_unix: 1_764_670_000,
            stats: LiveStats {
                cache: CacheStats {
                    entries: 0,
                    bytes: 0,
                    tags: 0,
                    links: 0,
                    hits: 0,
                    misses: 0,
                    unused_entries: 0,
                    unused_bytes: 0,
                    unused_tags: 0,
                },
                capacity_bytes: 10 << 30,
                filling_bytes: 0,
                fills_in_progress: 0,
                uptime_seconds: 3725,
                version: "0.1.0".into(),
                shared: None,
                warm: None,
            },
            fills: vec![],
            upstreams: vec![],
            activity: ActivitySnapshot::default(),
        }
    }

    fn busy() -> StatusSnapshot {
        let mut s = empty();
        s.stats.cache.bytes = 9 << 30;
        s.stats.cache.entries = 12;
        s.activity.today = Totals {
            from_cache: 2,
            not_from_cache: 1,
            bytes_from_cache: 3 << 20,
            bytes_from_upstream: 1 << 20,
        };
        s.activity.since_start = s.activity.today;
        s.activity.top = vec![("docker.io/library/alpine".into(), 3)];
        s.activity.names_counted = 1;
        s.activity.recent = vec![Event {
            at_unix: s.now_unix - 5,
            kind: "upstream",
            target: "docker.io/library/alpine".into(),
            status: Some(503),
            reason: "GET: Service Unavailable".into(),
        }];
        s.upstreams = vec![UpstreamStatus {
            registry: "registry-1.docker.io".into(),
            up: true,
            last_contact_unix: s.now_unix - 2,
            requests: 4,
            mean_latency_seconds: Some(0.1234),
            ratelimit_limit: Some(100),
            ratelimit_remaining: Some(76),
            ratelimit_window_seconds: Some(21600),
            throttled: 0,
        }];
        s.fills = vec![FillProgress {
            digest: format!("sha256:{}", "ab".repeat(32)),
            origin: Some(("docker.io".into(), "library/alpine".into())),
            written: 1 << 20,
            total: Some(4 << 20),
            phase: "streaming",
        }];
        s
    }

    #[test]
    fn the_page_shows_what_the_snapshot_holds() {
        let page = render(&busy());
        for want in [
            "<meta http-equiv=\"refresh\" content=\"10\">",
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
            "id=\"version\">0.1.0<",
            "id=\"uptime\">1h 2m<",
            "2025-12-02 10:06:40 UTC",
            "id=\"hit-ratio-today\">66.7%<",
            "id=\"saved-today\">3.0 MiB<",
            "id=\"cache-fill\">90.0%<",
            "class=\"bar full\"",
            "width:90.0%",
            "<td class=\"up\">up</td>",
            "123 ms",
            "76 / 100 per 6h 0m",
            "docker.io/library/alpine</td><td class=\"num\">3<",
            "<code>abababababab</code> docker.io/library/alpine",
            "1.0 MiB / 4.0 MiB · streaming",
            "width:25.0%",
            "5s ago",
            "GET: Service Unavailable",
        ] {
            assert!(page.contains(want), "{want:?} missing from\n{page}");
        }
        let mut down = busy();
        down.upstreams[0].up = false;
        assert!(render(&down).contains("<td class=\"down\">down</td>"));
    }

    #[test]
    fn an_empty_cache_says_so_without_dividing_by_zero() {
        let page = render(&empty());
        for want in [
            "id=\"hit-ratio-today\">–<",
            "id=\"hit-ratio-start\">–<",
            "id=\"cache-fill\">0.0%<",
            "No upstream registry contacted yet.",
            "No pulls yet.",
            "None since start.",
            "0 downloads in progress",
        ] {
            assert!(page.contains(want), "{want:?} missing from\n{page}");
        }
        assert!(!page.contains("NaN") && !page.contains("inf"), "{page}");
        let mut none = empty();
        none.stats.capacity_bytes = 0;
        assert!(render(&none).contains("id=\"cache-fill\">0.0%<"));
    }

    #[test]
    fn names_from_clients_are_escaped_everywhere() {
        let hostile = "<script>alert(\"x\")</script>&'";
        let mut s = busy();
        s.activity.top = vec![(format!("docker.io/{hostile}"), 1)];
        s.activity.recent[0].target = hostile.into();
        s.activity.recent[0].reason = hostile.into();
        s.upstreams[0].registry = hostile.into();
        s.fills[0].origin = Some(("r".into(), hostile.into()));
        s.fills[0].digest = format!("sha256:{hostile}");
        s.stats.version = hostile.into();
        s.stats.shared = Some(crate::admin::api::SharedStats {
            store: hostile.into(),
            reachable: false,
            reads: 7,
            uploads: 1,
            from_peers: 2,
            leases_held: 3,
        });
        let page = render(&s);
        assert!(
            page.contains(
                "<span class=\"down\">unreachable</span> · 7 read · 1 uploaded · 2 from peers · 3 leases held"
            ),
            "the tier is shown"
        );
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("alert(\"x\")"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"));
        assert_eq!(escape("a<b>&\"'c"), "a&lt;b&gt;&amp;&quot;&#39;c");
        assert!(!forbidden("<b>").contains("<b>"));
    }

    #[test]
    fn the_markup_is_self_contained_and_reflows_on_a_narrow_window() {
        let page = render(&busy());
        // Nothing from elsewhere, no script.
        for banned in [
            "<script", "<link", "src=", "http://", "https://", "@import", "url(",
        ] {
            assert!(!page.contains(banned), "{banned} in\n{page}");
        }
        // A grid of sections that falls to one column, wide tables that
        // scroll inside their section, long names that wrap.
        assert!(page.contains("minmax(min(100%,22rem),1fr)"));
        assert!(page.contains("@media (max-width:32rem)"));
        assert!(page.contains(".scroll{overflow-x:auto}"));
        assert!(page.contains("overflow-wrap:anywhere"));
        assert_eq!(
            page.matches("<section").count(),
            page.matches("</section>").count()
        );
        assert_eq!(
            page.matches("<table").count(),
            page.matches("</table>").count()
        );
        assert_eq!(page.matches("<tr>").count(), page.matches("</tr>").count());
    }

    #[test]
    fn keep_warm_and_unused_removals_show_when_there_are_any() {
        let mut s = empty();
        let page = render(&s);
        assert!(!page.contains("Keep warm") && !page.contains("id=\"unused\""));
        s.stats.warm = Some(crate::metrics::WarmStatus {
            last_run_unix: s.now_unix - 60,
            images: 3,
            unchanged: 1,
            updated: 1,
            failed: 1,
            last_error: Some("<x>: the registry answered 404".into()),
        });
        s.stats.cache.unused_entries = 2;
        s.stats.cache.unused_bytes = 2048;
        s.stats.cache.unused_tags = 1;
        let page = render(&s);
        assert!(
            page.contains(
                "3 images · 1 unchanged · 1 updated · <span class=\"down\">1 failed</span>"
            ),
            "{page}"
        );
        assert!(page.contains("last failure: &lt;x&gt;: the registry answered 404"));
        assert!(page.contains("removed as unused (max_unused): 2 entries (2.0 KiB), 1 tag"));
    }

    #[test]
    fn durations_and_times_read_as_people_write_them() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(65), "1m 5s");
        assert_eq!(duration(3725), "1h 2m");
        assert_eq!(duration(2 * 86_400 + 3 * 3600 + 7), "2d 3h");
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(ago(10, 20), "0s ago");
    }
}
