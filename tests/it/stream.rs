//! Large bodies through the interception, both ways, with the proxy's memory
//! watched: a 1 GiB download and a 256 MiB upload must stream, not buffer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::http::{body_string, HttpClient};
use crate::support::pattern::{check_pattern_body, PatternBody};
use crate::support::proxy::Proxy;
use crate::support::tls::Alpn;
use crate::support::upstream::{Fixture, UpstreamKind};
use crate::support::within;
use hyper::{Method, StatusCode};

const MIB: u64 = 1024 * 1024;
/// How much the proxy's RSS may grow over its baseline while streaming.
const RSS_CEILING: u64 = 100 * MIB;
/// Per-transfer deadline (debug builds are slow; this only stops a hang).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(300);

/// VmRSS of a process in bytes, from /proc/<pid>/status.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Polls a process's VmRSS every 20 ms on a thread and keeps the peak.
struct RssWatch {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(rss_bytes(pid).unwrap_or(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(r) = rss_bytes(pid) {
                    p.fetch_max(r, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        RssWatch {
            peak,
            stop,
            thread: Some(thread),
        }
    }
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.peak.load(Ordering::Relaxed)
    }
}

/// Warm the proxy up (TLS, leaf cache, upstream connection pool) and return
/// its RSS afterwards.
async fn baseline(proxy: &Proxy, client: &mut HttpClient) -> u64 {
    for _ in 0..2 {
        let resp = client.get(&format!("/bytes/{}", 4 * MIB)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let check = check_pattern_body(resp.into_body()).await.unwrap();
        assert_eq!(check.len, 4 * MIB);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    rss_bytes(proxy.pid()).expect("proxy RSS")
}

fn report(what: &str, bytes: u64, took: Duration, base: u64, peak: u64) {
    eprintln!(
        "{what}: {} MiB in {:.1?} ({:.0} MiB/s); proxy RSS baseline {} MiB, peak {} MiB (+{} MiB)",
        bytes / MIB,
        took,
        bytes as f64 / MIB as f64 / took.as_secs_f64(),
        base / MIB,
        peak / MIB,
        peak.saturating_sub(base) / MIB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_1gib_streams_with_bounded_memory() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx.proxy().start().await;
    let mut client = proxy.intercepted("upstream.test", Alpn::Http11).await;
    let base = baseline(&proxy, &mut client).await;

    let total: u64 = 1024 * MIB;
    let watch = RssWatch::start(proxy.pid());
    let started = Instant::now();
    let resp = client.get(&format!("/bytes/{total}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get("content-length")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some(total.to_string()),
        "Content-Length should pass through"
    );
    let check = within(
        "1 GiB download",
        TRANSFER_TIMEOUT,
        check_pattern_body(resp.into_body()),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", proxy.stderr()));
    let took = started.elapsed();
    let peak = watch.finish();
    report("download", total, took, base, peak);

    assert_eq!(check.len, total, "byte count");
    assert!(
        check.ok(),
        "content differs at byte {:?}",
        check.first_mismatch
    );
    assert!(
        peak.saturating_sub(base) < RSS_CEILING,
        "proxy RSS grew by {} MiB during a 1 GiB download (baseline {} MiB, peak {} MiB): it buffers",
        (peak - base) / MIB,
        base / MIB,
        peak / MIB
    );
}

async fn upload(alpn: Alpn, method: Method, size: u64, sized: bool) {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx.proxy().start().await;
    let mut client = proxy.intercepted("upstream.test", alpn).await;
    let base = baseline(&proxy, &mut client).await;

    let path = format!("/upload/{}", method.as_str().to_lowercase());
    let body = if sized {
        PatternBody::new(size).boxed()
    } else {
        PatternBody::new(size).without_length().boxed()
    };
    // Without a length, hyper sends HTTP/1.1 bodies chunked.
    let req = client.builder(method.clone(), &path).body(body).unwrap();

    let watch = RssWatch::start(proxy.pid());
    let started = Instant::now();
    let resp = client.send_within(req, TRANSFER_TIMEOUT).await;
    let status = resp.status();
    let text = body_string(resp.into_body()).await;
    let took = started.elapsed();
    let peak = watch.finish();
    report(
        &format!("{method} upload ({alpn:?}, sized={sized})"),
        size,
        took,
        base,
        peak,
    );

    assert_eq!(
        status,
        StatusCode::CREATED,
        "upload answered {status}: {text}"
    );
    assert_eq!(text, format!("received={size} ok=true err="));
    let seen = fx.upstream.wait_for(&path).await;
    assert_eq!(seen.method, method);
    assert_eq!(seen.body_len, size);
    assert_eq!(seen.body_pattern_ok, Some(true));
    assert!(
        peak.saturating_sub(base) < RSS_CEILING,
        "proxy RSS grew by {} MiB during a {} MiB upload: it buffers",
        (peak - base) / MIB,
        size / MIB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_256mib_put_reaches_upstream_byte_exact() {
    upload(Alpn::Http11, Method::PUT, 256 * MIB, true).await;
}

/// `docker push` sends layer data as a chunked PATCH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_chunked_patch_reaches_upstream_byte_exact() {
    upload(Alpn::Http11, Method::PATCH, 64 * MIB, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upload_and_download_stream() {
    upload(Alpn::H2, Method::PUT, 64 * MIB, false).await;

    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx.proxy().start().await;
    let mut client = proxy.intercepted("upstream.test", Alpn::H2).await;
    assert!(client.is_h2());
    let total = 128 * MIB;
    let resp = client.get(&format!("/bytes/{total}?unsized=1")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let check = within(
        "h2 download",
        TRANSFER_TIMEOUT,
        check_pattern_body(resp.into_body()),
    )
    .await
    .unwrap();
    assert_eq!(check.len, total);
    assert!(check.ok(), "content differs at {:?}", check.first_mismatch);
}
