//! Prometheus metrics (`GET /metrics`), seen after known traffic: exact
//! request counts by result (hit, miss, coalesced), bytes by source, what
//! the upstream client saw (status codes, bytes, 429s, the rate-limit
//! headers Docker Hub sends), TLS handshakes and minted certificates; the
//! `metrics_listen` address; and no metrics for a client the allow list
//! refuses. A scrape passes `promtool check metrics` when promtool is
//! installed (Debian's `prometheus`, see tests/e2e/install-deps.sh).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use regcache::registry::media::OCI_MANIFEST;

use crate::support::free_port;
use crate::support::http::{raw, read_response, Got};
use crate::support::pattern::blob_bytes;
use crate::support::proxy::{Env, Proxy};
use crate::support::registry::{blob_path, manifest_path, oci_manifest, Fault, HUB};
use crate::support::tls::Alpn;

/// One GET of `path` at Docker Hub through the proxy, on its own
/// connection, read to the end.
async fn pull(proxy: &Proxy, path: &str) -> Got {
    let mut client = proxy.intercepted(HUB, Alpn::Both).await;
    read_response(client.get(path).await).await
}

/// `GET path` on `addr` in origin form (regcache's own pages).
async fn page(addr: SocketAddr, path: &str) -> crate::support::http::RawResponse {
    let request = format!("GET {path} HTTP/1.1\r\nHost: regcache\r\nConnection: close\r\n\r\n");
    raw(addr, request.as_bytes()).await
}

/// The text of `GET /metrics` on `addr`, checked to be a 200 in the
/// Prometheus text format.
async fn scrape(addr: SocketAddr) -> String {
    let resp = page(addr, "/metrics").await;
    assert_eq!(resp.status, 200, "GET /metrics: {}", resp.head);
    assert_eq!(
        resp.header("content-type").as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8"),
        "the Prometheus text format, labelled as such"
    );
    String::from_utf8(resp.body).expect("metrics are UTF-8")
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// Scrapes until every `(series, value)` of `want` holds (a request is
/// counted when its response body ends on regcache's side, a moment after
/// the client read it); panics with the last scrape after 10 s.
async fn wait_for(addr: SocketAddr, want: &[(String, f64)]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(addr).await;
        let wrong: Vec<String> = want
            .iter()
            .filter(|(series, value)| sample(&text, series) != Some(*value))
            .map(|(series, value)| {
                format!("{series}: want {value}, got {:?}", sample(&text, series))
            })
            .collect();
        if wrong.is_empty() {
            return text;
        }
        if Instant::now() > deadline {
            panic!("{}\n\nscrape:\n{text}", wrong.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn series(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

fn requests(kind: &str, result: &str) -> String {
    series(
        "regcache_requests_total",
        &[
            ("registry", "docker.io"),
            ("kind", kind),
            ("result", result),
        ],
    )
}

fn served(source: &str) -> String {
    series(
        "regcache_served_bytes_total",
        &[("registry", "docker.io"), ("source", source)],
    )
}

fn hub(name: &str) -> String {
    series(name, &[("registry", "docker.io")])
}

/// Runs `promtool check metrics` on `text` when promtool is installed.
fn promtool_check(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            eprintln!("promtool check metrics skipped: no promtool ({e}); tests/e2e/install-deps.sh installs it");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n\nscrape:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn pulls_count_hits_misses_coalesced_and_bytes_by_source() {
    let env = Env::new().await;
    let blob = blob_bytes(41, 1024 * 1024);
    let digest = env.reg.put_blob("library/alpine", blob.clone());
    let blob_at = blob_path("library/alpine", &digest);
    let manifest = oci_manifest(b"config", &[&blob]);
    env.reg.put_manifest(
        "library/alpine",
        Some("3.20"),
        OCI_MANIFEST,
        manifest.clone(),
    );
    let manifest_at = manifest_path("library/alpine", "3.20");
    // The blob's download stops after 256 KiB until the gate opens, so that
    // the next two requests arrive while it is in flight.
    env.reg.set_fault(
        &blob_at,
        Fault {
            gate_after: Some(256 * 1024),
            ..Fault::default()
        },
    );
    let proxy = env.proxy().start().await;

    let mut leader = proxy.intercepted(HUB, Alpn::Both).await;
    let leader = leader.get(&blob_at).await;
    assert_eq!(leader.status(), StatusCode::OK);
    env.reg.wait_count(Method::GET, &blob_at, 1).await;
    let mut followers = Vec::new();
    for _ in 0..2 {
        let mut client = proxy.intercepted(HUB, Alpn::Both).await;
        followers.push(client.get(&blob_at).await);
    }
    env.reg.open_gate();
    read_response(leader)
        .await
        .assert_served(&blob, "MISS", "the first pull");
    for (i, f) in followers.into_iter().enumerate() {
        read_response(f)
            .await
            .assert_served(&blob, "COALESCED", &format!("follower {i}"));
    }
    for i in 0..2 {
        pull(&proxy, &blob_at)
            .await
            .assert_served(&blob, "HIT", &format!("cached pull {i}"));
    }
    let want_manifest = ["MISS", "HIT", "HIT"];
    for (i, want) in want_manifest.iter().enumerate() {
        pull(&proxy, &manifest_at).await.assert_served(
            &manifest,
            want,
            &format!("manifest pull {i}"),
        );
    }
    assert_eq!(
        env.reg.summary(),
        vec![format!("GET {blob_at}"), format!("GET {manifest_at}")],
        "one upstream GET each"
    );

    let (b, m) = (blob.len() as f64, manifest.len() as f64);
    let text = wait_for(
        proxy.addr,
        &[
            (requests("blob", "miss"), 1.0),
            (requests("blob", "coalesced"), 2.0),
            (requests("blob", "hit"), 2.0),
            (requests("manifest", "miss"), 1.0),
            (requests("manifest", "hit"), 2.0),
            (
                series(
                    "regcache_request_duration_seconds_count",
                    &[("kind", "blob"), ("result", "hit")],
                ),
                2.0,
            ),
            // Four blob answers and two manifest answers from the cache,
            // one of each from upstream.
            (served("cache"), 4.0 * b + 2.0 * m),
            (served("upstream"), b + m),
            (
                series(
                    "regcache_upstream_requests_total",
                    &[
                        ("registry", "docker.io"),
                        ("method", "GET"),
                        ("code", "200"),
                    ],
                ),
                2.0,
            ),
            (hub("regcache_upstream_bytes_total"), b + m),
            (hub("regcache_upstream_up"), 1.0),
            (
                series(
                    "regcache_upstream_request_duration_seconds_count",
                    &[("registry", "docker.io")],
                ),
                2.0,
            ),
            // Eight intercepted connections, one leaf for the one host.
            (
                series("regcache_tls_handshakes_total", &[("result", "ok")]),
                8.0,
            ),
            ("regcache_certificates_minted_total".into(), 1.0),
            (series("regcache_cache_entries", &[("kind", "blob")]), 1.0),
            (
                series("regcache_cache_entries", &[("kind", "manifest")]),
                1.0,
            ),
            ("regcache_cache_size_bytes".into(), b + m),
            ("regcache_fills_in_progress".into(), 0.0),
        ],
    )
    .await;
    for absent in [
        requests("blob", "error"),
        requests("manifest", "miss").replace("miss", "coalesced"),
    ] {
        assert_eq!(sample(&text, &absent), None, "{absent} in\n{text}");
    }
    promtool_check(&text);
}

#[tokio::test]
async fn rate_limit_gauges_follow_the_headers_and_a_429_counts_as_throttled() {
    let env = Env::new().await;
    let manifest = oci_manifest(b"config-rl", &[b"layer-rl"]);
    env.reg
        .put_manifest("library/nginx", Some("1"), OCI_MANIFEST, manifest.clone());
    let nginx_at = manifest_path("library/nginx", "1");
    // Docker Hub's headers on a manifest GET.
    let hub_headers = |remaining: &str| {
        vec![
            ("ratelimit-limit".to_string(), "100;w=21600".to_string()),
            (
                "ratelimit-remaining".to_string(),
                format!("{remaining};w=21600"),
            ),
        ]
    };
    env.reg.set_fault(
        &nginx_at,
        Fault {
            headers: hub_headers("76"),
            ..Fault::default()
        },
    );
    let proxy = env.proxy().start().await;
    pull(&proxy, &nginx_at)
        .await
        .assert_served(&manifest, "MISS", "the manifest");
    wait_for(
        proxy.addr,
        &[
            (hub("regcache_upstream_ratelimit_limit"), 100.0),
            (hub("regcache_upstream_ratelimit_remaining"), 76.0),
            (hub("regcache_upstream_ratelimit_window_seconds"), 21600.0),
        ],
    )
    .await;

    // The allowance is spent: Docker Hub answers 429.
    let redis_at = manifest_path("library/redis", "7");
    env.reg.set_fault(
        &redis_at,
        Fault {
            get_status: Some(429),
            head_status: Some(429),
            headers: hub_headers("0"),
            ..Fault::default()
        },
    );
    let got = pull(&proxy, &redis_at).await;
    assert_eq!(got.status, StatusCode::TOO_MANY_REQUESTS, "{}", got.brief());
    let asked = env.reg.requests(&redis_at).len();
    assert!(asked >= 1, "the registry was asked");
    let text = wait_for(
        proxy.addr,
        &[
            (hub("regcache_upstream_throttled_total"), asked as f64),
            (
                series(
                    "regcache_upstream_requests_total",
                    &[
                        ("registry", "docker.io"),
                        ("method", "GET"),
                        ("code", "429"),
                    ],
                ),
                env.reg.count(Method::GET, &redis_at) as f64,
            ),
            (hub("regcache_upstream_ratelimit_remaining"), 0.0),
            (hub("regcache_upstream_ratelimit_limit"), 100.0),
            // A 429 is an answer: the registry is up.
            (hub("regcache_upstream_up"), 1.0),
        ],
    )
    .await;
    promtool_check(&text);
}

#[tokio::test]
async fn metrics_listen_serves_metrics_and_healthz_only() {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let env = Env::new().await;
    let proxy = env
        .proxy()
        .args(["--metrics-listen", &addr.to_string()])
        .start()
        .await;
    let text = scrape(addr).await;
    assert!(
        text.contains("regcache_build_info{version=\""),
        "build info in\n{text}"
    );
    assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
    let health = page(addr, "/healthz").await;
    assert_eq!((health.status, health.body.as_slice()), (200, &b"ok\n"[..]));
    for other in ["/ca.crt", "/setup", "/v2/"] {
        assert_eq!(
            page(addr, other).await.status,
            404,
            "{other} on metrics_listen"
        );
    }
    // The proxy port serves the same page.
    let on_proxy = scrape(proxy.addr).await;
    assert!(on_proxy.contains("regcache_build_info{version=\""));
    promtool_check(&text);
}

#[tokio::test]
async fn a_client_outside_allow_gets_no_metrics() {
    let port = free_port();
    let metrics = SocketAddr::from(([127, 0, 0, 1], port));
    let env = Env::new().await;
    let proxy = env
        .proxy()
        .args(["--allow", "10.0.0.0/8"])
        .args(["--metrics-listen", &metrics.to_string()])
        .ready_status(403)
        .start()
        .await;
    let denied = series("regcache_denied_total", &[("reason", "allow")]);
    let before = sample(&scrape(metrics).await, &denied).unwrap_or(0.0);
    let resp = page(proxy.addr, "/metrics").await;
    assert_eq!(resp.status, 403, "{}", resp.head);
    let body = String::from_utf8_lossy(&resp.body);
    assert!(!body.contains("regcache_"), "metrics leaked: {body}");
    wait_for(metrics, &[(denied, before + 1.0)]).await;
}

#[tokio::test]
async fn failed_downloads_count_by_reason_and_evictions_are_counted() {
    let env = Env::new().await;
    let mib = 1024 * 1024;
    let put = |seed, fault: Option<Fault>| {
        let data = blob_bytes(seed, 2 * mib);
        let path = blob_path("library/alpine", &env.reg.put_blob("library/alpine", data));
        if let Some(fault) = fault {
            env.reg.set_fault(&path, fault);
        }
        path
    };
    let corrupt = put(
        51,
        Some(Fault {
            corrupt_at: Some(1000),
            ..Fault::default()
        }),
    );
    let cut = put(
        52,
        Some(Fault {
            cut_after: Some(300_000),
            ..Fault::default()
        }),
    );
    let (first, second) = (put(53, None), put(54, None));
    let proxy = env.proxy().args(["--cache-size", "3MiB"]).start().await;
    for path in [&corrupt, &cut] {
        let got = pull(&proxy, path).await;
        assert!(got.error.is_some(), "{path}: the client sees the failure");
    }
    // Two 2 MiB blobs under a 3 MiB cap: the second evicts the first.
    for path in [&first, &second] {
        assert_eq!(pull(&proxy, path).await.x_cache(), "MISS");
    }
    let reason = |r| series("regcache_fill_failures_total", &[("reason", r)]);
    wait_for(
        proxy.addr,
        &[
            (reason("digest_mismatch"), 1.0),
            (reason("upstream_error"), 1.0),
            ("regcache_cache_evictions_total".into(), 1.0),
            (series("regcache_cache_entries", &[("kind", "blob")]), 1.0),
            ("regcache_cache_size_bytes".into(), (2 * mib) as f64),
            ("regcache_cache_capacity_bytes".into(), (3 * mib) as f64),
        ],
    )
    .await;
}
