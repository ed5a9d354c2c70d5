//! The disk cache, seen from a client and from the upstream: blobs (hits,
//! misses, ranges, single-flight downloads, wrong or cut bytes, CDN
//! redirects, repository links), manifests (by digest, tags and their
//! revalidation, media types), hostile names, eviction, restarts and crashes.
//!
//! Every test spawns the real `regcache` binary with its own cache dir and
//! an in-process registry ([`Registry`]) behind
//! `--resolve registry-1.docker.io=127.0.0.1:PORT`, and checks both what the
//! client got and what the registry saw.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Response, StatusCode};
use regcache::registry::media::{DOCKER_MANIFEST_V2, OCI_INDEX, OCI_MANIFEST};

use crate::support::http::empty;
use crate::support::http::{read_response, Got, HttpClient};
use crate::support::pattern::blob_bytes;
use crate::support::proxy::{files_under, list_dir, regcache_cli, regcache_command, Env, Proxy};
use crate::support::registry::{
    blob_path, image_manifest, manifest_path, oci_index, sha256, Fault, Registry, Req, ACCEPT_ALL,
    HUB, TEAM_CRED,
};
use crate::support::tls::{peer_leaf, sans, tls_connect, Alpn};
use crate::support::{free_port, send_signal, within, Signal, STEP_TIMEOUT};

const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// Sends one request on a fresh connection and returns the response head;
/// the body is left to the caller.
async fn send_on(
    proxy: &Proxy,
    host: &str,
    alpn: Alpn,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Response<Incoming> {
    let mut client = proxy.intercepted(host, alpn).await;
    let req = client.request(method, path, headers);
    client.send(req).await
}

/// One request on a fresh connection to `host`, read to the end; Err if no
/// response head arrived (connection or stream reset).
async fn try_request_to(
    proxy: &Proxy,
    host: &str,
    alpn: Alpn,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Got, String> {
    let tcp = proxy.tunnel(&format!("{host}:443")).await;
    let tls = tls_connect(tcp, host, vec![proxy.ca_der()], alpn, true)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let exchange = async {
        let mut client = HttpClient::try_over_tls(tls, host)
            .await
            .map_err(|e| format!("HTTP handshake: {e:?}"))?;
        let req = client.request(method, path, headers);
        client
            .try_send(req)
            .await
            .map_err(|e| format!("no response over {alpn:?}: {e:?}"))
    };
    let resp = within("a response head", STEP_TIMEOUT, exchange).await?;
    Ok(read_response(resp).await)
}

async fn try_request(
    proxy: &Proxy,
    alpn: Alpn,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Got, String> {
    try_request_to(proxy, HUB, alpn, method, path, headers).await
}

/// One request on a fresh connection, read to the end.
async fn request(
    proxy: &Proxy,
    alpn: Alpn,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Got {
    let what = format!("{method} {path} over {alpn:?}");
    try_request(proxy, alpn, method, path, headers)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}; stderr:\n{}", proxy.stderr()))
}

async fn get(proxy: &Proxy, path: &str) -> Got {
    request(proxy, Alpn::Both, Method::GET, path, &[]).await
}

async fn get_h1(proxy: &Proxy, path: &str) -> Got {
    request(proxy, Alpn::Http11, Method::GET, path, &[]).await
}

async fn head(proxy: &Proxy, path: &str) -> Got {
    request(proxy, Alpn::Both, Method::HEAD, path, &[]).await
}

async fn get_manifest(proxy: &Proxy, path: &str) -> Got {
    request(
        proxy,
        Alpn::Both,
        Method::GET,
        path,
        &[("accept", ACCEPT_ALL)],
    )
    .await
}

async fn head_manifest(proxy: &Proxy, path: &str) -> Got {
    request(
        proxy,
        Alpn::Both,
        Method::HEAD,
        path,
        &[("accept", ACCEPT_ALL)],
    )
    .await
}

/// A manifest with made-up config/layer digests, distinct per `seed`.
fn simple_manifest(seed: u64) -> Bytes {
    let config = sha256(&blob_bytes(seed, 100));
    let layer = sha256(&blob_bytes(seed + 1000, 100));
    image_manifest(OCI_MANIFEST, (&config, 100), &[(&layer, 100)])
}

/// The regcache access log line for `method path`, waiting for it a little
/// (it is written when the response body ends).
async fn access_line(proxy: &Proxy, method: &str, path: &str, nth: usize) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = proxy.stderr();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("regcache::access")
                    && l.contains(&format!("path={path}"))
                    && l.contains(&format!("method={method}"))
            })
            .collect();
        if let Some(l) = lines.get(nth) {
            return l.to_string();
        }
        if std::time::Instant::now() > deadline {
            panic!("no access log line #{nth} for {method} {path}; stderr:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_cache_field(line: &str, status: &str) {
    assert!(
        line.contains(&format!("cache={status}")) || line.contains(&format!("cache=\"{status}\"")),
        "access log line should say cache={status}: {line}"
    );
}

// ---------------------------------------------------------------------------
// 1. Blobs: miss, hit, headers, ranges, HEAD
// ---------------------------------------------------------------------------

#[tokio::test]
async fn blob_miss_is_stored_then_hit_with_headers_and_log() {
    let env = Env::new().await;
    let data = blob_bytes(1, 300_000);
    let digest = env.reg.put_blob("library/alpine", data.clone());
    let path = blob_path("library/alpine", &digest);
    let proxy = env.proxy().start().await;

    // First GET over HTTP/1.1: from upstream, stored on the way.
    let miss = get_h1(&proxy, &path).await;
    miss.assert_served(&data, "MISS", "first GET");
    assert_eq!(miss.header("docker-content-digest"), Some(digest.clone()));
    assert_eq!(miss.content_length(), Some(data.len()));
    assert_eq!(env.reg.count(Method::GET, &path), 1);
    // The verified blob is stored in cache/blobs.
    env.stored(&digest).await;

    // Second GET over HTTP/2: from disk.
    let hit = get(&proxy, &path).await;
    hit.assert_served(&data, "HIT", "second GET");
    assert_eq!(hit.content_length(), Some(data.len()));
    assert_eq!(hit.header("docker-content-digest"), Some(digest.clone()));
    assert_eq!(
        hit.header("content-type").as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(hit.header("etag"), Some(format!("\"{digest}\"")));
    assert_eq!(hit.header("accept-ranges").as_deref(), Some("bytes"));

    // HEAD of a cached blob: headers from the cache, no body.
    let h = head(&proxy, &path).await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.x_cache(), "HIT");
    assert_eq!(h.content_length(), Some(data.len()));
    assert_eq!(h.header("docker-content-digest"), Some(digest.clone()));
    assert!(h.body.is_empty());

    assert_eq!(
        env.reg.summary(),
        vec![format!("GET {path}")],
        "upstream should have seen exactly one GET"
    );
    assert!(env.tmp_files().is_empty(), "tmp: {:?}", env.tmp_files());

    assert_cache_field(&access_line(&proxy, "GET", &path, 0).await, "MISS");
    assert_cache_field(&access_line(&proxy, "GET", &path, 1).await, "HIT");
    assert_cache_field(&access_line(&proxy, "HEAD", &path, 0).await, "HIT");
}

#[tokio::test]
async fn blob_ranges_are_answered_from_the_cache() {
    let env = Env::new().await;
    let data = blob_bytes(2, 200_000);
    let size = data.len();
    let digest = env.reg.put_blob("library/alpine", data.clone());
    let path = blob_path("library/alpine", &digest);
    let proxy = env.proxy().start().await;
    get(&proxy, &path)
        .await
        .assert_served(&data, "MISS", "fill");

    let r = request(
        &proxy,
        Alpn::Both,
        Method::GET,
        &path,
        &[("range", "bytes=100-1099")],
    )
    .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{r:?}");
    assert_eq!(r.x_cache(), "HIT");
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 100-1099/{size}"))
    );
    assert_eq!(r.content_length(), Some(1000));
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(&r.body[..], &data[100..1100]);

    let r = request(
        &proxy,
        Alpn::Http11,
        Method::GET,
        &path,
        &[("range", "bytes=-10")],
    )
    .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&r.body[..], &data[size - 10..]);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes {}-{}/{size}", size - 10, size - 1))
    );

    let r = request(
        &proxy,
        Alpn::Both,
        Method::GET,
        &path,
        &[("range", &format!("bytes={size}-"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "{r:?}");
    assert_eq!(r.header("content-range"), Some(format!("bytes */{size}")));

    assert_eq!(env.reg.summary(), vec![format!("GET {path}")]);
    assert!(
        env.reg.requests(&path)[0].header("range").is_none(),
        "regcache must fetch whole blobs"
    );
}

#[tokio::test]
async fn blob_range_on_a_miss_fetches_the_whole_blob() {
    let env = Env::new().await;
    let data = blob_bytes(3, 400_000);
    let digest = env.reg.put_blob("library/alpine", data.clone());
    let path = blob_path("library/alpine", &digest);
    let proxy = env.proxy().start().await;

    let r = request(
        &proxy,
        Alpn::Both,
        Method::GET,
        &path,
        &[("range", "bytes=1000-1999")],
    )
    .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{r:?}");
    assert_eq!(r.x_cache(), "MISS");
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(&r.body[..], &data[1000..2000]);
    let up = env.reg.requests(&path);
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].method, Method::GET);
    assert!(up[0].header("range").is_none(), "Range was sent upstream");

    // The whole blob was stored meanwhile.
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    while !env.content_file(&digest).exists() {
        assert!(std::time::Instant::now() < deadline, "blob never stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    get(&proxy, &path)
        .await
        .assert_served(&data, "HIT", "after a ranged miss");
    assert_eq!(env.reg.count(Method::GET, &path), 1);
}

#[tokio::test]
async fn blob_head_on_a_miss_is_forwarded_as_head() {
    let env = Env::new().await;
    let data = blob_bytes(4, 50_000);
    let digest = env.reg.put_blob("library/alpine", data.clone());
    let path = blob_path("library/alpine", &digest);
    let proxy = env.proxy().start().await;

    let h = head(&proxy, &path).await;
    assert_eq!(h.status, StatusCode::OK, "{h:?}");
    assert_eq!(h.x_cache(), "MISS");
    assert_eq!(h.content_length(), Some(data.len()));
    assert_eq!(h.header("docker-content-digest"), Some(digest.clone()));
    assert_eq!(env.reg.methods(&path), vec!["HEAD"]);
    assert!(!env.content_file(&digest).exists(), "a HEAD stores nothing");

    get(&proxy, &path)
        .await
        .assert_served(&data, "MISS", "GET after HEAD");
    let h = head(&proxy, &path).await;
    assert_eq!(h.x_cache(), "HIT");
    assert_eq!(h.content_length(), Some(data.len()));
    assert_eq!(env.reg.methods(&path), vec!["HEAD", "GET"]);
}

#[tokio::test]
async fn blob_unknown_upstream_is_404_and_not_cached() {
    let env = Env::new().await;
    let digest = sha256(b"nobody has this");
    let path = blob_path("library/alpine", &digest);
    let proxy = env.proxy().start().await;
    for _ in 0..2 {
        let r = get(&proxy, &path).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{r:?}");
        assert!(r.error.is_none(), "404 body failed: {:?}", r.error);
        assert_eq!(r.error_code().as_deref(), Some("BLOB_UNKNOWN"));
    }
    assert_eq!(env.reg.methods(&path), vec!["GET", "GET"]);
}

// ---------------------------------------------------------------------------
// 2. Single flight
// ---------------------------------------------------------------------------

#[tokio::test]
async fn concurrent_gets_follow_one_upstream_download() {
    let env = Env::new().await;
    let data = blob_bytes(5, 2 * MIB);
    let digest = env.reg.put_blob("library/alpine", data.clone());
    let path = blob_path("library/alpine", &digest);
    // The body stops after 512 KiB until the test opens the gate.
    env.reg.set_fault(
        &path,
        Fault {
            gate_after: Some(512 * 1024),
            ..Fault::default()
        },
    );
    let proxy = env.proxy().start().await;

    let leader = send_on(&proxy, HUB, Alpn::Both, Method::GET, &path, &[]).await;
    assert_eq!(leader.status(), StatusCode::OK);
    assert_eq!(
        leader.headers().get("x-cache").unwrap(),
        "MISS",
        "the first request leads the download"
    );
    env.reg.wait_count(Method::GET, &path, 1).await;

    // Four more while the download is held: they follow it.
    let mut followers = Vec::new();
    for i in 0..4 {
        let alpn = if i % 2 == 0 { Alpn::Http11 } else { Alpn::H2 };
        let resp = send_on(&proxy, HUB, alpn, Method::GET, &path, &[]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers().get("x-cache").map(|v| v.to_str().unwrap()),
            Some("COALESCED"),
            "follower {i}"
        );
        assert_eq!(
            resp.headers()
                .get("content-length")
                .map(|v| v.to_str().unwrap()),
            Some(data.len().to_string().as_str()),
            "follower {i} Content-Length"
        );
        followers.push(resp);
    }
    env.reg.open_gate();

    let mut reads = vec![tokio::spawn(read_response(leader))];
    reads.extend(
        followers
            .into_iter()
            .map(|r| tokio::spawn(read_response(r))),
    );
    for (i, t) in reads.into_iter().enumerate() {
        let got = t.await.unwrap();
        let want = if i == 0 { "MISS" } else { "COALESCED" };
        got.assert_served(&data, want, &format!("request {i}"));
    }
    assert_eq!(
        env.reg.summary(),
        vec![format!("GET {path}")],
        "five clients, one upstream request"
    );
    get(&proxy, &path)
        .await
        .assert_served(&data, "HIT", "afterwards");
    assert_eq!(env.reg.count(Method::GET, &path), 1);
}

#[tokio::test]
async fn concurrent_gets_waiting_for_upstream_answer_share_one_fetch() {
    let env = Env::new().await;
    let data = blob_bytes(6, MIB);
    let digest = env.reg.put_blob("library/alpine", data.clone());
    let path = blob_path("library/alpine", &digest);
    // Upstream takes a while to answer at all: every request arrives while
    // the first is still waiting for the response head.
    env.reg.set_fault(
        &path,
        Fault {
            head_delay: Some(Duration::from_millis(700)),
            ..Fault::default()
        },
    );
    let proxy = env.proxy().start().await;
    // Warm the leaf certificate and connection pool so the requests overlap.
    let _ = get(&proxy, "/v2/").await;

    let mut tasks = Vec::new();
    for i in 0..5 {
        let alpn = if i % 2 == 0 { Alpn::H2 } else { Alpn::Http11 };
        let client = proxy.intercepted(HUB, alpn).await;
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = client;
            let req = client.builder(Method::GET, &path).body(empty()).unwrap();
            read_response(client.send(req).await).await
        }));
    }
    let mut statuses = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap();
        let xc = got.x_cache();
        got.assert_served(&data, &xc, &format!("request {i}"));
        statuses.push(xc);
    }
    statuses.sort();
    assert_eq!(
        statuses,
        vec!["COALESCED", "COALESCED", "COALESCED", "COALESCED", "MISS"],
        "one leader, four followers"
    );
    assert_eq!(
        env.reg.count(Method::GET, &path),
        1,
        "upstream saw {:?}",
        env.reg.summary()
    );
    assert_eq!(
        env.reg.count(Method::HEAD, &path),
        0,
        "followers in the same repository need no access check upstream; saw {:?}",
        env.reg.summary()
    );
}

// ---------------------------------------------------------------------------
// 3. Wrong and cut bytes
// ---------------------------------------------------------------------------

#[tokio::test]
async fn corrupt_blob_aborts_every_reader_and_is_not_cached() {
    let env = Env::new().await;
    let data = blob_bytes(7, MIB);
    let digest = env.reg.put_blob("library/alpine", data.clone());
    let path = blob_path("library/alpine", &digest);
    env.reg.set_fault(
        &path,
        Fault {
            corrupt_at: Some(700_000),
            gate_after: Some(300_000),
            ..Fault::default()
        },
    );
    let proxy = env.proxy().start().await;

    let leader = send_on(&proxy, HUB, Alpn::Http11, Method::GET, &path, &[]).await;
    assert_eq!(leader.status(), StatusCode::OK);
    env.reg.wait_count(Method::GET, &path, 1).await;
    let follower = send_on(&proxy, HUB, Alpn::H2, Method::GET, &path, &[]).await;
    assert_eq!(
        follower
            .headers()
            .get("x-cache")
            .map(|v| v.to_str().unwrap()),
        Some("COALESCED")
    );
    env.reg.open_gate();
    let leader = read_response(leader).await;
    let follower = read_response(follower).await;
    leader.assert_aborted(&data, "leader (HTTP/1.1) of a corrupt download");
    follower.assert_aborted(&data, "follower (h2) of a corrupt download");

    assert!(!env.content_file(&digest).exists(), "corrupt blob stored");
    // The failed download is cleaned up.
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    while !env.tmp_files().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "tmp keeps {:?}",
            env.tmp_files()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Upstream fixed: the next request goes upstream again and is stored.
    env.reg.clear_fault(&path);
    get(&proxy, &path)
        .await
        .assert_served(&data, "MISS", "retry");
    get(&proxy, &path)
        .await
        .assert_served(&data, "HIT", "after retry");
    assert_eq!(env.reg.methods(&path), vec!["GET", "GET"]);
}

#[tokio::test]
async fn corrupt_blob_without_length_is_never_completed() {
    let env = Env::new().await;
    let data = blob_bytes(8, 600_000);
    let digest = env.reg.put_blob("library/alpine", data.clone());
    let path = blob_path("library/alpine", &digest);
    env.reg.set_fault(
        &path,
        Fault {
            corrupt_at: Some(599_999),
            no_length: true,
            ..Fault::default()
        },
    );
    let proxy = env.proxy().start().await;

    for alpn in [Alpn::Http11, Alpn::H2] {
        // The stream may be reset before the client has read the response
        // head (h2 sends both in quick succession): that too is an abort.
        match try_request(&proxy, alpn, Method::GET, &path, &[]).await {
            Ok(r) => {
                assert_eq!(r.status, StatusCode::OK);
                r.assert_aborted(&data, &format!("chunked corrupt download over {alpn:?}"));
            }
            Err(e) => assert!(
                e.contains("Reset") || e.contains("closed") || e.contains("Incomplete"),
                "chunked corrupt download over {alpn:?}: {e}"
            ),
        }
    }
    assert!(!env.content_file(&digest).exists());
    env.reg.clear_fault(&path);
    get(&proxy, &path)
        .await
        .assert_served(&data, "MISS", "retry");
    get(&proxy, &path)
        .await
        .assert_served(&data, "HIT", "after retry");
    assert_eq!(env.reg.methods(&path), vec!["GET", "GET", "GET"]);
}

#[tokio::test]
async fn cut_blob_download_is_not_cached_and_retry_succeeds() {
    let env = Env::new().await;
    let data = blob_bytes(9, MIB);
    let digest = env.reg.put_blob("library/alpine", data.clone());
    let path = blob_path("library/alpine", &digest);
    env.reg.set_fault(
        &path,
        Fault {
            cut_after: Some(400_000),
            ..Fault::default()
        },
    );
    let proxy = env.proxy().start().await;

    for alpn in [Alpn::Http11, Alpn::H2] {
        let r = request(&proxy, alpn, Method::GET, &path, &[]).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "cut download over {alpn:?}: {r:?}; upstream saw {:?}; stderr:\n{}",
            env.reg.summary(),
            proxy.stderr()
        );
        r.assert_aborted(&data, &format!("cut download over {alpn:?}"));
        assert!(
            r.body.len() <= 400_000,
            "more bytes than upstream sent: {}",
            r.body.len()
        );
        assert_eq!(
            &r.body[..],
            &data[..r.body.len()],
            "the bytes that came are right"
        );
    }
    assert!(!env.content_file(&digest).exists());
    env.reg.clear_fault(&path);
    get(&proxy, &path)
        .await
        .assert_served(&data, "MISS", "retry");
    get(&proxy, &path)
        .await
        .assert_served(&data, "HIT", "after retry");
    assert_eq!(env.reg.methods(&path), vec!["GET", "GET", "GET"]);
}

#[tokio::test]
async fn range_on_a_miss_never_completes_with_unverified_wrong_bytes() {
    let env = Env::new().await;
    let data = blob_bytes(10, MIB);
    let digest = env.reg.put_blob("library/alpine", data.clone());
    let path = blob_path("library/alpine", &digest);
    // Byte 50 is wrong; the download then pauses at 300 KB, long before the
    // digest can be checked.
    env.reg.set_fault(
        &path,
        Fault {
            corrupt_at: Some(50),
            gate_after: Some(300_000),
            ..Fault::default()
        },
    );
    let proxy = env.proxy().start().await;
    let resp = send_on(
        &proxy,
        HUB,
        Alpn::Both,
        Method::GET,
        &path,
        &[("range", "bytes=0-99")],
    )
    .await;
    let reading = tokio::spawn(read_response(resp));
    // Give regcache time to pass on the first bytes, then let the download
    // finish (and fail verification).
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.reg.open_gate();
    let got = reading.await.unwrap();
    let delivered_wrong = got.error.is_none()
        && got.status == StatusCode::PARTIAL_CONTENT
        && got.body.len() == 100
        && got.body[..] != data[..100];
    assert!(
        !delivered_wrong,
        "a 206 for bytes 0-99 completed with bytes that do not match the blob \
         (byte 50 was corrupted upstream; the digest was not verified yet)"
    );
    assert!(!env.content_file(&digest).exists());
}

// ---------------------------------------------------------------------------
// 4. Redirects
// ---------------------------------------------------------------------------

#[tokio::test]
async fn redirect_to_cdn_is_followed_without_the_registry_credentials() {
    let env = Env::new().await;
    let cdn = Registry::start(&env.ca).await;
    let data = blob_bytes(11, 500_000);
    let digest = env.reg.put_blob("library/alpine", data.clone());
    let path = blob_path("library/alpine", &digest);
    let hex = digest.strip_prefix("sha256:").unwrap();
    let cdn_path = format!("/store/{hex}");
    cdn.put_raw(&cdn_path, "application/octet-stream", data.clone());
    env.reg.set_fault(
        &path,
        Fault {
            redirect: Some((307, format!("https://cdn.test{cdn_path}?sig=s3cr3t&exp=9"))),
            ..Fault::default()
        },
    );
    let proxy = env.proxy().resolve("cdn.test", cdn.port()).start().await;

    let got = request(
        &proxy,
        Alpn::Both,
        Method::GET,
        &path,
        &[
            ("authorization", "Bearer client-token"),
            ("cookie", "session=registry-only"),
        ],
    )
    .await;
    got.assert_served(&data, "MISS", "redirected GET");
    assert!(got.header("location").is_none());
    assert_eq!(got.header("docker-content-digest"), Some(digest.clone()));

    // Besides the GET, the registry may see regcache's own anonymous openness
    // check (a HEAD), started in the background after a credentialed pull.
    let at_registry: Vec<_> = env
        .reg
        .requests(&path)
        .into_iter()
        .filter(|r| r.method == Method::GET)
        .collect();
    assert_eq!(at_registry.len(), 1, "{:?}", env.reg.summary());
    assert_eq!(
        at_registry[0].header("authorization").as_deref(),
        Some("Bearer client-token"),
        "the registry gets the client's credentials"
    );
    let at_cdn: Vec<_> = cdn
        .seen()
        .into_iter()
        .filter(|r| r.method == Method::GET)
        .collect();
    assert_eq!(at_cdn.len(), 1, "{:?}", cdn.summary());
    assert_eq!(at_cdn[0].method, Method::GET);
    assert_eq!(at_cdn[0].path, cdn_path);
    assert_eq!(at_cdn[0].query.as_deref(), Some("sig=s3cr3t&exp=9"));
    assert_eq!(at_cdn[0].sni.as_deref(), Some("cdn.test"));
    assert!(
        at_cdn[0].header("authorization").is_none(),
        "the CDN got the registry Authorization: {:?}",
        at_cdn[0].header("authorization")
    );
    assert!(
        at_cdn[0].header("cookie").is_none(),
        "the CDN got the Cookie"
    );

    // A second client without credentials: regcache first learns whether the
    // repository is public (one anonymous HEAD, which follows the redirect),
    // then serves the cached bytes; nobody sees a second GET.
    get(&proxy, &path)
        .await
        .assert_served(&data, "HIT", "second GET");
    let gets = |seen: Vec<Req>| seen.iter().filter(|r| r.method == Method::GET).count();
    assert_eq!(gets(env.reg.seen()), 1, "{:?}", env.reg.summary());
    assert_eq!(gets(cdn.seen()), 1, "{:?}", cdn.summary());
    assert!(
        env.reg
            .seen()
            .iter()
            .all(|r| r.method != Method::HEAD || r.header("authorization").is_none()),
        "the openness check is anonymous"
    );
}

#[tokio::test]
async fn relative_redirect_is_followed_on_the_same_registry() {
    let env = Env::new().await;
    let data = blob_bytes(12, 100_000);
    let digest = env.reg.put_blob("library/alpine", data.clone());
    let path = blob_path("library/alpine", &digest);
    let hex = digest.strip_prefix("sha256:").unwrap();
    let storage = format!("/storage/{hex}");
    env.reg
        .put_raw(&storage, "application/octet-stream", data.clone());
    env.reg.set_fault(
        &path,
        Fault {
            redirect: Some((302, storage.clone())),
            ..Fault::default()
        },
    );
    let proxy = env.proxy().start().await;
    get_h1(&proxy, &path)
        .await
        .assert_served(&data, "MISS", "relative redirect");
    assert_eq!(
        env.reg.summary(),
        vec![format!("GET {path}"), format!("GET {storage}")]
    );
    get(&proxy, &path)
        .await
        .assert_served(&data, "HIT", "second GET");
    assert_eq!(env.reg.seen().len(), 2);
}

// ---------------------------------------------------------------------------
// 5. Links between repositories
// ---------------------------------------------------------------------------

/// Methods of the requests for `path` that carried [`TEAM_CRED`] (regcache's
/// own anonymous openness probes left out).
fn team_methods(reg: &Registry, path: &str) -> Vec<String> {
    reg.requests(path)
        .iter()
        .filter(|r| r.header("authorization").as_deref() == Some(TEAM_CRED))
        .map(|r| r.method.to_string())
        .collect()
}

#[tokio::test]
async fn blob_cached_for_one_repo_needs_upstream_confirmation_for_another() {
    let env = Env::new().await;
    env.reg.guard_team();
    let data = blob_bytes(13, 200_000);
    let digest = env.reg.put_blob("team/a", data.clone());
    env.reg.put_blob("team/b", data.clone()); // b has it too; c does not.
    let (pa, pb, pc) = (
        blob_path("team/a", &digest),
        blob_path("team/b", &digest),
        blob_path("team/c", &digest),
    );
    let cred = [("authorization", TEAM_CRED)];
    let proxy = env.proxy().start().await;
    request(&proxy, Alpn::Both, Method::GET, &pa, &cred)
        .await
        .assert_served(&data, "MISS", "via a");

    // b: upstream confirms with a HEAD, bytes come from the cache.
    request(&proxy, Alpn::Both, Method::GET, &pb, &cred)
        .await
        .assert_served(&data, "HIT", "via b");
    assert_eq!(
        team_methods(&env.reg, &pb),
        vec!["HEAD"],
        "b needs a HEAD, no GET"
    );

    // c: upstream says 404 to the HEAD (with the Content-Length its GET
    // error body would have, as Go registries do): so does regcache, with a
    // well-formed 404 for the GET.
    for (i, alpn) in [Alpn::Http11, Alpn::H2].into_iter().enumerate() {
        let r = try_request(&proxy, alpn, Method::GET, &pc, &cred)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "GET via c over {alpn:?}: no well-formed response: {e} (upstream answered \
                     the access-check HEAD with 404 and the Content-Length of its GET body)"
                )
            });
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{r:?}");
        assert!(
            r.error.is_none(),
            "GET via c over {alpn:?}: the 404 should be a complete response; the body failed \
             after {} bytes: {:?} (headers {:?})",
            r.body.len(),
            r.error,
            r.headers
        );
        assert_ne!(&r.body[..], &data[..], "c must not get the bytes");
        assert_eq!(
            team_methods(&env.reg, &pc),
            vec!["HEAD"; i + 1],
            "c: a HEAD per request, no GET"
        );
    }

    // A HEAD for c is refused as well, and b is linked now.
    let h = request(&proxy, Alpn::Both, Method::HEAD, &pc, &cred).await;
    assert_eq!(h.status, StatusCode::NOT_FOUND);
    request(&proxy, Alpn::Both, Method::GET, &pb, &cred)
        .await
        .assert_served(&data, "HIT", "via b again");
    assert_eq!(
        team_methods(&env.reg, &pb),
        vec!["HEAD"],
        "b was linked by the HEAD"
    );
    assert_eq!(team_methods(&env.reg, &pa), vec!["GET"]);
    assert_eq!(team_methods(&env.reg, &pc), vec!["HEAD", "HEAD", "HEAD"]);
}

#[tokio::test]
async fn blob_public_through_one_repo_is_served_through_another_without_upstream_contact() {
    let env = Env::new().await;
    let data = blob_bytes(14, 200_000);
    let digest = env.reg.put_blob("library/a", data.clone());
    let (pa, pb) = (
        blob_path("library/a", &digest),
        blob_path("library/b", &digest),
    );
    // library/b's image names the same layer (it was built on a's).
    let manifest = image_manifest(OCI_MANIFEST, (&digest, data.len()), &[]);
    env.reg
        .put_manifest("library/b", Some("1"), OCI_MANIFEST, manifest.clone());
    let proxy = env.proxy().start().await;
    get(&proxy, &pa).await.assert_served(&data, "MISS", "via a");
    get_manifest(&proxy, &manifest_path("library/b", "1"))
        .await
        .assert_served(&manifest, "MISS", "b's manifest");
    // library/a answered an anonymous GET: public, so anyone may have its
    // bytes through any repository name; b answered one too, so the access
    // check for b needs no upstream contact either.
    get(&proxy, &pb).await.assert_served(&data, "HIT", "via b");
    assert_eq!(env.reg.methods(&pa), vec!["GET"]);
    assert!(
        env.reg.methods(&pb).is_empty(),
        "b: no upstream request for the blob: {:?}",
        env.reg.summary()
    );
}

// ---------------------------------------------------------------------------
// 6. Manifests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn manifest_by_digest_is_served_without_upstream_contact() {
    let env = Env::new().await;
    let m = simple_manifest(20);
    let digest = env
        .reg
        .put_manifest("library/alpine", None, OCI_MANIFEST, m.clone());
    let path = manifest_path("library/alpine", &digest);
    let proxy = env.proxy().start().await;

    let first = get_manifest(&proxy, &path).await;
    first.assert_served(&m, "MISS", "first GET by digest");
    assert_eq!(first.header("content-type").as_deref(), Some(OCI_MANIFEST));
    assert_eq!(first.header("docker-content-digest"), Some(digest.clone()));

    for _ in 0..2 {
        let hit = get_manifest(&proxy, &path).await;
        hit.assert_served(&m, "HIT", "GET by digest");
        assert_eq!(hit.header("content-type").as_deref(), Some(OCI_MANIFEST));
        assert_eq!(hit.header("docker-content-digest"), Some(digest.clone()));
        assert_eq!(hit.content_length(), Some(m.len()));
    }
    let h = head_manifest(&proxy, &path).await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.x_cache(), "HIT");
    assert_eq!(h.header("docker-content-digest"), Some(digest.clone()));
    assert_eq!(h.content_length(), Some(m.len()));
    assert!(h.body.is_empty());
    assert_eq!(env.reg.summary(), vec![format!("GET {path}")]);
}

#[tokio::test]
async fn tag_is_fresh_for_its_ttl_then_revalidated_with_head() {
    let env = Env::new().await;
    let m = simple_manifest(21);
    let digest = env
        .reg
        .put_manifest("library/alpine", Some("3.20"), OCI_MANIFEST, m.clone());
    let path = manifest_path("library/alpine", "3.20");
    let proxy = env.proxy().args(["--tag-ttl", "1"]).start().await;

    get_manifest(&proxy, &path)
        .await
        .assert_served(&m, "MISS", "first");
    let fresh = get_manifest(&proxy, &path).await;
    fresh.assert_served(&m, "HIT", "within the TTL");
    assert_eq!(fresh.header("docker-content-digest"), Some(digest.clone()));
    assert_eq!(
        env.reg.methods(&path),
        vec!["GET"],
        "no contact while fresh"
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get_manifest(&proxy, &path).await;
    r.assert_served(&m, "REVALIDATED", "after the TTL");
    assert_eq!(r.header("docker-content-digest"), Some(digest.clone()));
    assert_eq!(
        env.reg.methods(&path),
        vec!["GET", "HEAD"],
        "revalidation must be a HEAD, never a second GET"
    );
    // Revalidation restarted the TTL.
    get_manifest(&proxy, &path)
        .await
        .assert_served(&m, "HIT", "fresh again");
    assert_eq!(env.reg.methods(&path), vec!["GET", "HEAD"]);
    assert_cache_field(&access_line(&proxy, "GET", &path, 2).await, "REVALIDATED");
}

#[tokio::test]
async fn changed_tag_is_fetched_anew() {
    let env = Env::new().await;
    let old = simple_manifest(22);
    let new = simple_manifest(23);
    let path = manifest_path("library/nginx", "latest");
    let old_digest =
        env.reg
            .put_manifest("library/nginx", Some("latest"), OCI_MANIFEST, old.clone());
    let proxy = env.proxy().args(["--tag-ttl", "0"]).start().await;

    let r = get_manifest(&proxy, &path).await;
    r.assert_served(&old, "MISS", "first");
    assert_eq!(r.header("docker-content-digest"), Some(old_digest.clone()));
    get_manifest(&proxy, &path)
        .await
        .assert_served(&old, "REVALIDATED", "unchanged");

    let new_digest =
        env.reg
            .put_manifest("library/nginx", Some("latest"), OCI_MANIFEST, new.clone());
    let r = get_manifest(&proxy, &path).await;
    r.assert_served(&new, "MISS", "after the tag moved");
    assert_eq!(r.header("docker-content-digest"), Some(new_digest.clone()));
    get_manifest(&proxy, &path)
        .await
        .assert_served(&new, "REVALIDATED", "new one unchanged");
    assert_eq!(
        env.reg.methods(&path),
        vec!["GET", "HEAD", "HEAD", "GET", "HEAD"]
    );
    // The old manifest is still there by digest.
    get_manifest(&proxy, &manifest_path("library/nginx", &old_digest))
        .await
        .assert_served(&old, "HIT", "old by digest");
}

#[tokio::test]
async fn tag_revalidation_429_or_503_serves_stale_with_warning() {
    let env = Env::new().await;
    let m = simple_manifest(24);
    let path = manifest_path("library/redis", "7");
    env.reg
        .put_manifest("library/redis", Some("7"), OCI_MANIFEST, m.clone());
    let proxy = env.proxy().args(["--tag-ttl", "0"]).start().await;
    get_manifest(&proxy, &path)
        .await
        .assert_served(&m, "MISS", "first");

    for status in [429, 503] {
        env.reg.set_fault(
            &path,
            Fault {
                head_status: Some(status),
                get_status: Some(status),
                ..Fault::default()
            },
        );
        let r = get_manifest(&proxy, &path).await;
        r.assert_served(&m, "STALE", &format!("upstream HEAD {status}"));
        let warning = r.header("warning").unwrap_or_default();
        assert!(
            warning.contains("110"),
            "upstream {status}: Warning should carry 110, got {warning:?}"
        );
        let h = head_manifest(&proxy, &path).await;
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(h.x_cache(), "STALE");
        assert_eq!(h.content_length(), Some(m.len()));
    }
    assert_eq!(
        env.reg.methods(&path),
        vec!["GET", "HEAD", "HEAD", "HEAD", "HEAD"],
        "only HEADs after the first GET"
    );
    env.reg.clear_fault(&path);
    get_manifest(&proxy, &path)
        .await
        .assert_served(&m, "REVALIDATED", "upstream back");
}

#[tokio::test]
async fn tag_revalidation_with_upstream_down_serves_stale() {
    let env = Env::new().await;
    let m = simple_manifest(25);
    let path = manifest_path("library/redis", "8");
    env.reg
        .put_manifest("library/redis", Some("8"), OCI_MANIFEST, m.clone());
    let proxy = env.proxy().args(["--tag-ttl", "0"]).start().await;
    get_manifest(&proxy, &path)
        .await
        .assert_served(&m, "MISS", "first");
    env.reg.stop().await;
    let r = get_manifest(&proxy, &path).await;
    r.assert_served(&m, "STALE", "upstream unreachable");
    assert!(r.header("warning").unwrap_or_default().contains("110"));
}

/// `n` concurrent manifest GETs of `path`, each on its own connection; the
/// X-Cache value of each, sorted.
async fn concurrent_manifest_gets(
    proxy: &Proxy,
    path: &str,
    n: usize,
    want: &Bytes,
) -> Vec<String> {
    let mut clients = Vec::new();
    for i in 0..n {
        let alpn = if i % 2 == 0 { Alpn::H2 } else { Alpn::Http11 };
        clients.push(proxy.intercepted(HUB, alpn).await);
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let path = path.to_string();
            tokio::spawn(async move {
                let req = client
                    .builder(Method::GET, &path)
                    .header("accept", ACCEPT_ALL)
                    .body(empty())
                    .unwrap();
                read_response(client.send(req).await).await
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap();
        let xc = got.x_cache();
        got.assert_served(want, &xc, &format!("request {i}"));
        statuses.push(xc);
    }
    statuses.sort();
    statuses
}

#[tokio::test]
async fn concurrent_requests_for_one_tag_make_one_upstream_request() {
    let env = Env::new().await;
    let m = simple_manifest(26);
    let path = manifest_path("library/busybox", "1.36");
    env.reg
        .put_manifest("library/busybox", Some("1.36"), OCI_MANIFEST, m.clone());
    // Every upstream answer takes a while, so all requests overlap it.
    env.reg.set_fault(
        &path,
        Fault {
            answer_delay: Some(Duration::from_millis(500)),
            ..Fault::default()
        },
    );
    let proxy = env.proxy().args(["--tag-ttl", "1"]).start().await;
    let _ = get(&proxy, "/v2/").await;

    // Unknown tag: one GET; the others are served what it stored.
    let statuses = concurrent_manifest_gets(&proxy, &path, 30, &m).await;
    assert_eq!(
        statuses.iter().filter(|s| *s == "MISS").count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(env.reg.methods(&path), vec!["GET"], "cold tag");

    // Stale tag: one HEAD.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let statuses = concurrent_manifest_gets(&proxy, &path, 30, &m).await;
    assert_eq!(
        statuses.iter().filter(|s| *s == "REVALIDATED").count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(env.reg.methods(&path), vec!["GET", "HEAD"], "stale tag");

    // Stale tag, upstream failing: one HEAD, every request served stale.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    env.reg.set_fault(
        &path,
        Fault {
            answer_delay: Some(Duration::from_millis(500)),
            head_status: Some(503),
            get_status: Some(503),
            ..Fault::default()
        },
    );
    let statuses = concurrent_manifest_gets(&proxy, &path, 30, &m).await;
    assert_eq!(statuses, vec!["STALE"; 30]);
    assert_eq!(
        env.reg.methods(&path),
        vec!["GET", "HEAD", "HEAD"],
        "upstream down"
    );
}

#[tokio::test]
async fn tag_gone_upstream_is_404_and_forgotten() {
    let env = Env::new().await;
    let m = simple_manifest(26);
    let path = manifest_path("library/busybox", "old");
    env.reg
        .put_manifest("library/busybox", Some("old"), OCI_MANIFEST, m.clone());
    let proxy = env.proxy().args(["--tag-ttl", "0"]).start().await;
    get_manifest(&proxy, &path)
        .await
        .assert_served(&m, "MISS", "first");

    env.reg.set_fault(
        &path,
        Fault {
            head_status: Some(404),
            get_status: Some(404),
            ..Fault::default()
        },
    );
    let r = get_manifest(&proxy, &path).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{r:?}");
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(r.error_code().as_deref(), Some("MANIFEST_UNKNOWN"));
    assert_eq!(env.reg.methods(&path), vec!["GET", "HEAD"]);

    // Forgotten: the next request is a plain GET upstream, not a revalidation.
    env.reg.clear_fault(&path);
    get_manifest(&proxy, &path)
        .await
        .assert_served(&m, "MISS", "after the tag came back");
    assert_eq!(env.reg.methods(&path), vec!["GET", "HEAD", "GET"]);
}

#[tokio::test]
async fn manifest_head_answers_carry_digest_and_length() {
    let env = Env::new().await;
    let m = simple_manifest(27);
    let path = manifest_path("library/alpine", "edge");
    let digest = env
        .reg
        .put_manifest("library/alpine", Some("edge"), OCI_MANIFEST, m.clone());
    let proxy = env.proxy().start().await;

    // HEAD of a tag on a miss: fetched upstream with a GET (so the tag is
    // recorded), answered without a body.
    let h = head_manifest(&proxy, &path).await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.x_cache(), "MISS");
    assert_eq!(h.header("docker-content-digest"), Some(digest.clone()));
    assert_eq!(h.content_length(), Some(m.len()));
    assert!(h.body.is_empty());
    assert_eq!(env.reg.methods(&path), vec!["GET"]);

    get_manifest(&proxy, &path)
        .await
        .assert_served(&m, "HIT", "GET after the HEAD");
    for p in [path.clone(), manifest_path("library/alpine", &digest)] {
        let h = head_manifest(&proxy, &p).await;
        assert_eq!(h.status, StatusCode::OK, "HEAD {p}");
        assert_eq!(h.x_cache(), "HIT", "HEAD {p}");
        assert_eq!(h.header("docker-content-digest"), Some(digest.clone()));
        assert_eq!(h.content_length(), Some(m.len()), "HEAD {p}");
        assert_eq!(h.header("content-type").as_deref(), Some(OCI_MANIFEST));
        assert!(h.body.is_empty());
    }
    assert_eq!(env.reg.methods(&path), vec!["GET"]);
    assert_eq!(env.reg.seen().len(), 1);
}

#[tokio::test]
async fn cached_manifest_is_not_served_to_a_request_that_does_not_accept_its_type() {
    let env = Env::new().await;
    let config = sha256(b"config");
    let layer = sha256(b"layer");
    let m = image_manifest(DOCKER_MANIFEST_V2, (&config, 6), &[(&layer, 5)]);
    let digest = env
        .reg
        .put_manifest("library/debian", Some("12"), DOCKER_MANIFEST_V2, m.clone());
    let by_tag = manifest_path("library/debian", "12");
    let by_digest = manifest_path("library/debian", &digest);
    let proxy = env.proxy().start().await;

    let docker_only = [("accept", DOCKER_MANIFEST_V2)];
    let oci_only = [(
        "accept",
        "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
    )];
    let r = request(&proxy, Alpn::Both, Method::GET, &by_tag, &docker_only).await;
    r.assert_served(&m, "MISS", "docker Accept");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some(DOCKER_MANIFEST_V2)
    );
    request(&proxy, Alpn::Both, Method::GET, &by_tag, &docker_only)
        .await
        .assert_served(&m, "HIT", "docker Accept again");
    request(&proxy, Alpn::Both, Method::GET, &by_digest, &docker_only)
        .await
        .assert_served(&m, "HIT", "by digest, docker Accept");
    assert_eq!(env.reg.seen().len(), 1);

    // An OCI-only client is not handed the cached Docker manifest.
    let r = request(&proxy, Alpn::Both, Method::GET, &by_tag, &oci_only).await;
    assert_ne!(r.x_cache(), "HIT", "tag: served a type the client refused");
    assert_eq!(
        env.reg.count(Method::GET, &by_tag),
        2,
        "{:?}",
        env.reg.summary()
    );
    let r = request(&proxy, Alpn::Both, Method::GET, &by_digest, &oci_only).await;
    assert_ne!(
        r.x_cache(),
        "HIT",
        "digest: served a type the client refused"
    );
    assert_eq!(
        env.reg.count(Method::GET, &by_digest),
        1,
        "{:?}",
        env.reg.summary()
    );
}

#[tokio::test]
async fn index_and_platform_manifests_are_cached_alike() {
    let env = Env::new().await;
    let repo = "library/python";
    let amd = simple_manifest(30);
    let arm = simple_manifest(31);
    let amd_d = env.reg.put_manifest(repo, None, OCI_MANIFEST, amd.clone());
    let arm_d = env.reg.put_manifest(repo, None, OCI_MANIFEST, arm.clone());
    let index = oci_index(&[(&amd, "amd64"), (&arm, "arm64")]);
    let index_d = env
        .reg
        .put_manifest(repo, Some("3.12"), OCI_INDEX, index.clone());
    let proxy = env.proxy().start().await;

    let paths = [
        (manifest_path(repo, "3.12"), index.clone(), OCI_INDEX),
        (manifest_path(repo, &index_d), index.clone(), OCI_INDEX),
        (manifest_path(repo, &amd_d), amd.clone(), OCI_MANIFEST),
        (manifest_path(repo, &arm_d), arm.clone(), OCI_MANIFEST),
    ];
    let first = get_manifest(&proxy, &paths[0].0).await;
    first.assert_served(&index, "MISS", "index by tag");
    assert_eq!(first.header("content-type").as_deref(), Some(OCI_INDEX));
    get_manifest(&proxy, &paths[2].0)
        .await
        .assert_served(&amd, "MISS", "amd64 manifest");
    get_manifest(&proxy, &paths[3].0)
        .await
        .assert_served(&arm, "MISS", "arm64 manifest");
    let before = env.reg.seen().len();
    assert_eq!(before, 3);
    for (p, body, ct) in &paths {
        let r = get_manifest(&proxy, p).await;
        r.assert_served(body, "HIT", p);
        assert_eq!(r.header("content-type").as_deref(), Some(*ct), "{p}");
    }
    assert_eq!(env.reg.seen().len(), 3, "{:?}", env.reg.summary());
}

#[tokio::test]
async fn corrupt_manifest_is_refused_and_not_cached() {
    let env = Env::new().await;
    let m = simple_manifest(32);
    let digest = env
        .reg
        .put_manifest("library/alpine", None, OCI_MANIFEST, m.clone());
    let path = manifest_path("library/alpine", &digest);
    env.reg.set_fault(
        &path,
        Fault {
            corrupt_at: Some(10),
            ..Fault::default()
        },
    );
    let proxy = env.proxy().start().await;
    let r = get_manifest(&proxy, &path).await;
    assert_ne!(
        r.status,
        StatusCode::OK,
        "a manifest not matching its digest was served: {r:?}"
    );
    assert!(r.body[..] != m[..]);
    env.reg.clear_fault(&path);
    get_manifest(&proxy, &path)
        .await
        .assert_served(&m, "MISS", "retry");
    get_manifest(&proxy, &path)
        .await
        .assert_served(&m, "HIT", "after retry");
    assert_eq!(env.reg.methods(&path), vec!["GET", "GET"]);
}

#[tokio::test]
async fn per_registry_tag_ttl_from_config_file() {
    let env = Env::new().await;
    let m = simple_manifest(33);
    let path = manifest_path("library/alpine", "latest");
    env.reg
        .put_manifest("library/alpine", Some("latest"), OCI_MANIFEST, m.clone());
    let config = env.dir.path().join("regcache.toml");
    std::fs::write(
        &config,
        "tag_ttl = 3600\n[registries.\"registry-1.docker.io\"]\ntag_ttl = 0\n",
    )
    .unwrap();
    let proxy = env
        .proxy()
        .arg("--config")
        .arg(config.to_str().unwrap())
        .intercept("other.test")
        .resolve("other.test", env.reg.port())
        .start()
        .await;

    // Docker Hub: ttl 0, every request is revalidated.
    get_manifest(&proxy, &path)
        .await
        .assert_served(&m, "MISS", "hub 1");
    get_manifest(&proxy, &path)
        .await
        .assert_served(&m, "REVALIDATED", "hub 2");

    // other.test: the global 3600 s.
    let other = |p: String| {
        let proxy = &proxy;
        async move {
            try_request_to(
                proxy,
                "other.test",
                Alpn::Both,
                Method::GET,
                &p,
                &[("accept", ACCEPT_ALL)],
            )
            .await
            .unwrap()
        }
    };
    other(path.clone())
        .await
        .assert_served(&m, "MISS", "other 1");
    other(path.clone())
        .await
        .assert_served(&m, "HIT", "other 2");

    let seen: Vec<(String, String)> = env
        .reg
        .requests(&path)
        .iter()
        .map(|r| (r.sni.clone().unwrap_or_default(), r.method.to_string()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (HUB.to_string(), "GET".to_string()),
            (HUB.to_string(), "HEAD".to_string()),
            ("other.test".to_string(), "GET".to_string()),
        ]
    );
}

// ---------------------------------------------------------------------------
// 7. Hostile names
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hostile_names_are_refused_without_asking_upstream() {
    let env = Env::new().await;
    let proxy = env.proxy().start().await;
    let hex = "a".repeat(64);
    let long = "a".repeat(300);
    let cases = [
        ("/v2/../x/manifests/latest".to_string(), "NAME_INVALID"),
        (format!("/v2/a%2fb/blobs/sha256:{hex}"), "NAME_INVALID"),
        (format!("/v2/{long}/manifests/latest"), "NAME_INVALID"),
        (format!("/v2/{long}/blobs/sha256:{hex}"), "NAME_INVALID"),
        ("/v2/a/blobs/sha256:XYZ".to_string(), "DIGEST_INVALID"),
        ("/v2/a/manifests/sha256:XYZ".to_string(), "DIGEST_INVALID"),
    ];
    for (path, code) in &cases {
        for alpn in [Alpn::Http11, Alpn::H2] {
            let r = request(&proxy, alpn, Method::GET, path, &[]).await;
            assert_eq!(
                r.status,
                StatusCode::BAD_REQUEST,
                "{path} over {alpn:?}: {r:?}"
            );
            assert_eq!(r.error_code().as_deref(), Some(*code), "{path}");
            assert!(
                r.header("content-type")
                    .unwrap_or_default()
                    .contains("json"),
                "{path}: content-type"
            );
        }
        let h = request(&proxy, Alpn::Both, Method::HEAD, path, &[]).await;
        assert_eq!(h.status, StatusCode::BAD_REQUEST, "HEAD {path}");
    }
    assert!(
        env.reg.seen().is_empty(),
        "upstream saw {:?}",
        env.reg.summary()
    );
    assert!(list_dir(&env.cache_dir().join("blobs")).is_empty());
}

/// A manifest reference that is not a valid tag (a leading dot, more than
/// 128 characters, characters a tag cannot hold) names no manifest that can
/// exist: 404 `MANIFEST_UNKNOWN`, as the OCI spec's pull workflow and the
/// registries answer, without asking the upstream. Unsafe names and
/// malformed digests keep their 400.
#[tokio::test]
async fn invalid_tags_are_unknown_manifests_without_asking_upstream() {
    let env = Env::new().await;
    let proxy = env.proxy().start().await;
    let long = "t".repeat(129);
    let refs = [".hidden", "-x", long.as_str(), "a!b", "a%20b", "ü"];
    for reference in refs {
        let path = format!("/v2/library/alpine/manifests/{reference}");
        for alpn in [Alpn::Http11, Alpn::H2] {
            let r = request(&proxy, alpn, Method::GET, &path, &[]).await;
            assert_eq!(
                r.status,
                StatusCode::NOT_FOUND,
                "{path} over {alpn:?}: {r:?}"
            );
            assert_eq!(
                r.error_code().as_deref(),
                Some("MANIFEST_UNKNOWN"),
                "{path}"
            );
            assert!(
                r.header("content-type")
                    .unwrap_or_default()
                    .contains("json"),
                "{path}: content-type"
            );
        }
        for alpn in [Alpn::Http11, Alpn::H2] {
            let h = request(&proxy, alpn, Method::HEAD, &path, &[]).await;
            assert_eq!(h.status, StatusCode::NOT_FOUND, "HEAD {path} over {alpn:?}");
            assert!(h.body.is_empty(), "HEAD {path} over {alpn:?} has a body");
            assert!(h.header("content-length").is_some(), "HEAD {path}");
        }
    }
    for (path, code) in [
        ("/v2/library/alpine/manifests/sha256:zz", "DIGEST_INVALID"),
        ("/v2/a%2fb/manifests/.hidden", "NAME_INVALID"),
        ("/v2/../manifests/.hidden", "NAME_INVALID"),
    ] {
        let r = request(&proxy, Alpn::Both, Method::GET, path, &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {r:?}");
        assert_eq!(r.error_code().as_deref(), Some(code), "{path}");
    }
    assert!(
        env.reg.seen().is_empty(),
        "upstream saw {:?}",
        env.reg.summary()
    );
}

// ---------------------------------------------------------------------------
// 8. Eviction, restart, crash
// ---------------------------------------------------------------------------

/// Bytes in the files under `dir`, recursively.
fn dir_bytes(dir: &Path) -> u64 {
    files_under(dir)
        .iter()
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Downloads in progress count against cache_size: with a 3 MiB cap, two
/// cached MiB and four concurrent cold 1 MiB fills held open by the gate,
/// the disk never holds more than the cap (blobs and downloads together).
/// Reservations evict the cached entries before writing; the fill that finds
/// no room streams to its client uncached. Every client gets the right bytes.
#[tokio::test]
async fn concurrent_cold_fills_never_put_more_than_cache_size_on_disk() {
    let env = Env::new().await;
    let repo = "library/fills";
    let cap = 3 * MIB as u64;
    let put = |seed: u64| {
        let data = blob_bytes(seed, MIB);
        let digest = env.reg.put_blob(repo, data.clone());
        (data, blob_path(repo, &digest))
    };
    let warm: Vec<_> = (0..2).map(|i| put(300 + i)).collect();
    let cold: Vec<_> = (0..4).map(|i| put(310 + i)).collect();
    let proxy = env.proxy().args(["--cache-size", "3MiB"]).start().await;
    for (data, path) in &warm {
        get(&proxy, path)
            .await
            .assert_served(data, "MISS", "warm fill");
    }
    for (_, path) in &cold {
        env.reg.set_fault(
            path,
            Fault {
                gate_after: Some(MIB - 1),
                ..Fault::default()
            },
        );
    }
    let on_disk =
        || dir_bytes(&env.cache_dir().join("blobs")) + dir_bytes(&env.cache_dir().join("tmp"));
    assert!(on_disk() <= cap);

    // Each client reads up to its gate (the last byte is held back until the
    // blob is verified, cached or not), says so, then reads on.
    let (near, mut all_near) = tokio::sync::mpsc::channel::<()>(cold.len());
    let mut readers = Vec::new();
    for (i, (data, path)) in cold.iter().enumerate() {
        let alpn = if i % 2 == 0 { Alpn::Http11 } else { Alpn::H2 };
        let resp = send_on(&proxy, HUB, alpn, Method::GET, path, &[]).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let near = near.clone();
        let (data, path) = (data.clone(), path.clone());
        readers.push(tokio::spawn(async move {
            let mut body = resp.into_body();
            let mut got = Vec::new();
            let mut told = false;
            while let Some(frame) = body.frame().await {
                if let Ok(d) = frame.expect("body").into_data() {
                    got.extend_from_slice(&d);
                }
                if !told && got.len() >= MIB - 1 {
                    told = true;
                    let _ = near.send(()).await;
                }
            }
            assert!(
                got == data[..],
                "{path}: wrong bytes ({} of {})",
                got.len(),
                data.len()
            );
        }));
    }
    for _ in 0..cold.len() {
        within("clients near their gates", STEP_TIMEOUT, all_near.recv())
            .await
            .expect("a reader ended early");
    }
    let held = on_disk();
    assert!(
        held <= cap,
        "with four fills held open the cache holds {held} bytes on disk, more than cache_size ({cap})"
    );
    env.reg.open_gate();
    for r in readers {
        within("a reader", STEP_TIMEOUT, r).await.unwrap();
    }
    assert!(on_disk() <= cap, "after the fills: {} bytes", on_disk());
    assert!(proxy.stderr().contains("streaming the blob uncached"));
}

/// A hostile upstream (or a registry user's own push) announces a
/// Content-Length as large as the whole cache and then sends nothing: the
/// fill is admitted (it could fit) but evicts nothing until its bytes come,
/// so a full cache stays whole and keeps serving. Once the bytes do come,
/// they make their room and the blob is stored like any other.
#[tokio::test]
async fn a_hostile_content_length_evicts_nothing_before_its_bytes_arrive() {
    let env = Env::new().await;
    let repo = "library/hostile";
    let cap = 3 * MIB as u64;
    let put = |seed: u64, len: usize| {
        let data = blob_bytes(seed, len);
        let digest = env.reg.put_blob(repo, data.clone());
        (data, digest)
    };
    let warm: Vec<_> = (0..3).map(|i| put(320 + i, MIB)).collect();
    let (data, digest) = put(330, 3 * MIB);
    let path = blob_path(repo, &digest);
    let proxy = env.proxy().args(["--cache-size", "3MiB"]).start().await;
    for (data, digest) in &warm {
        get(&proxy, &blob_path(repo, digest))
            .await
            .assert_served(data, "MISS", "warm fill");
    }
    // The cache is full; the stalling body announces all of it.
    env.reg.set_fault(
        &path,
        Fault {
            gate_after: Some(0),
            ..Fault::default()
        },
    );
    let stalled = send_on(&proxy, HUB, Alpn::Http11, Method::GET, &path, &[]).await;
    assert_eq!(stalled.status(), StatusCode::OK);
    assert_eq!(
        stalled
            .headers()
            .get("x-cache")
            .map(|v| v.to_str().unwrap()),
        Some("MISS"),
        "a fill, not streamed uncached"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (i, (data, digest)) in warm.iter().enumerate() {
        assert!(
            env.content_file(digest).exists(),
            "entry {i} evicted for bytes that never came"
        );
        get(&proxy, &blob_path(repo, digest)).await.assert_served(
            data,
            "HIT",
            "an entry while the hostile fill stalls",
        );
    }

    // The bytes come: they make their room as they arrive.
    env.reg.open_gate();
    let got = read_response(stalled).await;
    got.assert_content(&Method::GET, &data, "the stalled blob, once sent");
    get(&proxy, &path)
        .await
        .assert_served(&data, "HIT", "stored once its bytes came");
    let on_disk = dir_bytes(&env.cache_dir().join("blobs"));
    assert!(on_disk <= cap, "{on_disk} bytes on disk");
    assert!(!proxy.stderr().contains("streaming the blob uncached"));
}

/// A fill without Content-Length makes its room as its bytes arrive, like
/// one with: cached entries go for bytes that came, and when the next bytes
/// would pass cache_size the fill fails (its client's response ends with an
/// error, nothing is stored, its temporary file goes); the disk never holds
/// more than the cap.
#[tokio::test]
async fn a_fill_without_content_length_past_cache_size_fails_and_the_cap_holds() {
    let env = Env::new().await;
    let repo = "library/unsized";
    let cap = 3 * MIB as u64;
    let warm: Vec<_> = (0..2)
        .map(|i| {
            let data = blob_bytes(340 + i, MIB);
            let digest = env.reg.put_blob(repo, data.clone());
            (data, digest)
        })
        .collect();
    let data = blob_bytes(345, 3 * MIB + MIB / 2);
    let digest = env.reg.put_blob(repo, data.clone());
    let path = blob_path(repo, &digest);
    let proxy = env.proxy().args(["--cache-size", "3MiB"]).start().await;
    for (data, digest) in &warm {
        get(&proxy, &blob_path(repo, digest))
            .await
            .assert_served(data, "MISS", "warm fill");
    }
    let gate = 3 * MIB - 128 * 1024;
    env.reg.set_fault(
        &path,
        Fault {
            no_length: true,
            gate_after: Some(gate),
            ..Fault::default()
        },
    );
    let on_disk =
        || dir_bytes(&env.cache_dir().join("blobs")) + dir_bytes(&env.cache_dir().join("tmp"));

    let resp = send_on(&proxy, HUB, Alpn::Http11, Method::GET, &path, &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // Held at the gate, nearly the whole cap written: room was made for it.
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    while dir_bytes(&env.cache_dir().join("tmp")) < gate as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the download never reached its gate; stderr:\n{}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = on_disk();
    assert!(
        held <= cap,
        "with a download of unknown length at its gate the cache holds {held} bytes on disk, \
         more than cache_size ({cap})"
    );

    // The rest would pass the cap: the fill fails, cleanly.
    env.reg.open_gate();
    let got = read_response(resp).await;
    got.assert_aborted(&data, "a download of unknown length past cache_size");
    assert_eq!(
        &got.body[..],
        &data[..got.body.len()],
        "the bytes that came are right"
    );
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    while !env.tmp_files().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "tmp keeps {:?}",
            env.tmp_files()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!env.content_file(&digest).exists(), "stored past the cap");
    assert!(on_disk() <= cap, "after the fill: {} bytes", on_disk());
    assert!(
        proxy.stderr().contains("no room in the cache"),
        "stderr:\n{}",
        proxy.stderr()
    );
}

#[tokio::test]
async fn eviction_removes_the_least_recently_used_blob() {
    let env = Env::new().await;
    let repo = "library/big";
    let blobs: Vec<(Bytes, String)> = (0..4)
        .map(|i| {
            let data = blob_bytes(40 + i, MIB);
            let d = env.reg.put_blob(repo, data.clone());
            (data, d)
        })
        .collect();
    let p = |i: usize| blob_path(repo, &blobs[i].1);
    let proxy = env.proxy().args(["--cache-size", "3MiB"]).start().await;

    for (data, digest) in &blobs[..3] {
        get(&proxy, &blob_path(repo, digest))
            .await
            .assert_served(data, "MISS", "fill A/B/C");
    }
    // Touch A: now B is the least recently used.
    get(&proxy, &p(0))
        .await
        .assert_served(&blobs[0].0, "HIT", "touch A");
    get(&proxy, &p(3))
        .await
        .assert_served(&blobs[3].0, "MISS", "D");
    env.stored(&blobs[3].1).await;

    assert!(
        !env.content_file(&blobs[1].1).exists(),
        "B's file should be gone"
    );
    for i in [0, 2, 3] {
        assert!(env.content_file(&blobs[i].1).exists(), "blob {i} evicted");
    }
    get(&proxy, &p(0))
        .await
        .assert_served(&blobs[0].0, "HIT", "A stays");
    get(&proxy, &p(3))
        .await
        .assert_served(&blobs[3].0, "HIT", "D stays");
    get(&proxy, &p(1))
        .await
        .assert_served(&blobs[1].0, "MISS", "B was evicted");
    for (i, want) in [1, 2, 1, 1].iter().enumerate() {
        assert_eq!(
            env.reg.count(Method::GET, &p(i)),
            *want,
            "upstream GETs for blob {i}: {:?}",
            env.reg.summary()
        );
    }
}

#[tokio::test]
async fn restart_keeps_everything_cached() {
    let env = Env::new().await;
    let repo = "library/alpine";
    let layer = blob_bytes(50, 700_000);
    let layer_d = env.reg.put_blob(repo, layer.clone());
    let config = blob_bytes(51, 1_000);
    let config_d = env.reg.put_blob(repo, config.clone());
    let m = image_manifest(
        OCI_MANIFEST,
        (&config_d, config.len()),
        &[(&layer_d, layer.len())],
    );
    let m_d = env
        .reg
        .put_manifest(repo, Some("3"), OCI_MANIFEST, m.clone());
    let paths = [
        (manifest_path(repo, "3"), m.clone()),
        (manifest_path(repo, &m_d), m.clone()),
        (blob_path(repo, &config_d), config.clone()),
        (blob_path(repo, &layer_d), layer.clone()),
    ];

    let proxy = env.proxy().args(["--shutdown-grace", "2"]).start().await;
    for (p, body) in &paths {
        let r = get_manifest(&proxy, p).await;
        assert_eq!(r.status, StatusCode::OK, "{p}");
        assert_eq!(&r.body[..], &body[..], "{p}");
    }
    let upstream_before = env.reg.seen().len();
    proxy.stop().await;

    // The registry is gone: anything not served from disk would fail.
    env.reg.stop().await;
    let proxy = env.proxy().start().await;
    for (p, body) in &paths {
        get_manifest(&proxy, p)
            .await
            .assert_served(body, "HIT", &format!("after restart: {p}"));
    }
    let h = head(&proxy, &paths[3].0).await;
    assert_eq!(h.x_cache(), "HIT");
    assert_eq!(h.content_length(), Some(layer.len()));
    assert_eq!(
        env.reg.seen().len(),
        upstream_before,
        "{:?}",
        env.reg.summary()
    );
}

// ---------------------------------------------------------------------------
// Bytes at rest: verify_reads and `cache verify`
// ---------------------------------------------------------------------------

/// Flips one byte of a file in place (same inode, same length), as a disk
/// fault or another local user with write access would.
fn flip_byte(path: &Path, offset: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&[b[0] ^ 0x01]).unwrap();
    f.sync_all().unwrap();
}

/// Waits until a damaged entry's file is gone (the entry is dropped in the
/// background after the response that found it ended).
async fn wait_gone(env: &Env, digest: &str, proxy: &Proxy) {
    let file = env.content_file(digest);
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    while file.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the damaged entry {digest} was never dropped; stderr:\n{}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One image (manifest, config, a 700 kB layer) pulled through a regcache
/// that is then stopped. Returns (layer path, layer, manifest path by
/// digest, manifest, layer digest, manifest digest).
async fn pulled_then_stopped(env: &Env) -> (String, Bytes, String, Bytes, String, String) {
    let repo = "library/alpine";
    let layer = blob_bytes(70, 700_000);
    let layer_d = env.reg.put_blob(repo, layer.clone());
    let config = blob_bytes(71, 900);
    let config_d = env.reg.put_blob(repo, config.clone());
    let m = image_manifest(
        OCI_MANIFEST,
        (&config_d, config.len()),
        &[(&layer_d, layer.len())],
    );
    let m_d = env
        .reg
        .put_manifest(repo, Some("3"), OCI_MANIFEST, m.clone());
    let (layer_p, m_p) = (blob_path(repo, &layer_d), manifest_path(repo, &m_d));
    let proxy = env.proxy().args(["--shutdown-grace", "2"]).start().await;
    get(&proxy, &layer_p)
        .await
        .assert_served(&layer, "MISS", "fill the layer");
    get_manifest(&proxy, &m_p)
        .await
        .assert_served(&m, "MISS", "fill the manifest");
    proxy.stop().await;
    (layer_p, layer, m_p, m, layer_d, m_d)
}

#[tokio::test]
async fn a_blob_changed_on_disk_while_stopped_is_never_served_complete_and_is_fetched_again() {
    let env = Env::new().await;
    let (layer_p, layer, m_p, m, layer_d, m_d) = pulled_then_stopped(&env).await;
    flip_byte(&env.content_file(&layer_d), 350_000);
    flip_byte(&env.content_file(&m_d), 10);

    // Default verify_reads = "first": the first complete read after the start
    // is hashed and its last chunk held back.
    let proxy = env.proxy().start().await;
    get_h1(&proxy, &layer_p)
        .await
        .assert_aborted(&layer, "GET of the damaged layer");
    wait_gone(&env, &layer_d, &proxy).await;
    assert!(
        proxy.stderr().contains("does not match its digest"),
        "a log line names the rule: {}",
        proxy.stderr()
    );
    assert_eq!(env.reg.count(Method::GET, &layer_p), 1, "not yet refetched");

    // The next GET fetches it again, and it is cached again.
    get(&proxy, &layer_p).await.assert_served(
        &layer,
        "MISS",
        "after the damaged entry was dropped",
    );
    assert_eq!(env.reg.count(Method::GET, &layer_p), 2);
    get(&proxy, &layer_p)
        .await
        .assert_served(&layer, "HIT", "then cached again");

    // The manifest is checked before it is served: fetched again, right bytes.
    get_manifest(&proxy, &m_p)
        .await
        .assert_served(&m, "MISS", "the damaged manifest");
    assert_eq!(env.reg.count(Method::GET, &m_p), 2);
    get_manifest(&proxy, &m_p)
        .await
        .assert_served(&m, "HIT", "the manifest cached again");
}

/// `GET` of bytes 100..1100.
async fn part_100_1099(proxy: &Proxy, path: &str) -> Got {
    let range = [("range", "bytes=100-1099")];
    request(proxy, Alpn::Both, Method::GET, path, &range).await
}

#[tokio::test]
async fn a_range_of_a_blob_changed_on_disk_is_never_served_unchecked() {
    let env = Env::new().await;
    let (layer_p, layer, _, _, layer_d, _) = pulled_then_stopped(&env).await;

    // Intact after a restart: the whole file is hashed first, then the range
    // comes from the cache.
    let proxy = env.proxy().args(["--shutdown-grace", "2"]).start().await;
    let part = part_100_1099(&proxy, &layer_p).await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert!(part.error.is_none(), "{:?}", part.error);
    assert_eq!(&part.body[..], &layer[100..1100]);
    assert_eq!(part.x_cache(), "HIT");
    assert_eq!(env.reg.count(Method::GET, &layer_p), 1);
    proxy.stop().await;

    // Changed inside the range while stopped: the flipped byte never goes
    // out; the entry is dropped and the range answered from a new download.
    flip_byte(&env.content_file(&layer_d), 500);
    let proxy = env.proxy().start().await;
    let part = part_100_1099(&proxy, &layer_p).await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert!(part.error.is_none(), "{:?}", part.error);
    assert!(
        part.body[..] == layer[100..1100],
        "the upstream's bytes, never the flipped one ({} bytes)",
        part.body.len()
    );
    assert_eq!(part.x_cache(), "MISS");
    assert_eq!(
        part.header("content-range").as_deref(),
        Some(format!("bytes 100-1099/{}", layer.len()).as_str())
    );
    assert_eq!(env.reg.count(Method::GET, &layer_p), 2, "fetched again");
    assert!(
        env.reg.requests(&layer_p)[1].header("range").is_none(),
        "the whole blob is fetched again"
    );
    assert!(
        proxy.stderr().contains("does not match its digest"),
        "a log line names the rule: {}",
        proxy.stderr()
    );
    // The range ended only once the download was stored: it replaced the
    // damaged entry.
    get(&proxy, &layer_p)
        .await
        .assert_served(&layer, "HIT", "cached again");
    assert_eq!(env.reg.count(Method::GET, &layer_p), 2);
}

#[tokio::test]
async fn verify_reads_always_catches_a_change_while_running_and_never_trusts_the_disk() {
    let env = Env::new().await;
    let (layer_p, layer, _, _, layer_d, _) = pulled_then_stopped(&env).await;

    let proxy = env.proxy().args(["--verify-reads", "always"]).start().await;
    get(&proxy, &layer_p)
        .await
        .assert_served(&layer, "HIT", "intact, verified on the way out");
    flip_byte(&env.content_file(&layer_d), 699_999);
    get_h1(&proxy, &layer_p)
        .await
        .assert_aborted(&layer, "changed while running");
    wait_gone(&env, &layer_d, &proxy).await;
    get(&proxy, &layer_p)
        .await
        .assert_served(&layer, "MISS", "fetched again");
    proxy.stop().await;

    // verify_reads = "never" trusts bytes at rest: the trade-off is that a
    // file changed on disk is served as it is.
    flip_byte(&env.content_file(&layer_d), 1);
    let proxy = env
        .proxy()
        .env("REGCACHE_VERIFY_READS", "never")
        .start()
        .await;
    let got = get(&proxy, &layer_p).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.error.is_none(), "{:?}", got.error);
    assert_eq!(got.body.len(), layer.len());
    assert_ne!(got.body, layer, "never: the changed bytes are served");
    assert_eq!(env.reg.count(Method::GET, &layer_p), 2);
}

#[tokio::test]
async fn cache_verify_finds_and_removes_damaged_entries() {
    let env = Env::new().await;
    let (layer_p, layer, m_p, m, layer_d, _) = pulled_then_stopped(&env).await;
    let dir = env.cache_dir();

    let (code, out, err) = cache_cli(&dir, &["verify"]);
    assert_eq!(code, 0, "an intact cache verifies: {out} {err}");
    assert!(
        out.contains("checked 2 entries") && out.contains("0 damaged"),
        "{out}"
    );

    flip_byte(&env.content_file(&layer_d), 123_456);
    let (code, out, err) = cache_cli(&dir, &["verify"]);
    assert_eq!(code, 1, "damage makes the exit code non-zero: {out} {err}");
    assert!(out.contains(&format!("damaged\t{layer_d}")), "{out}");
    assert!(out.contains("1 damaged"), "{out}");
    assert!(err.contains("1 damaged cache entries"), "{err}");
    assert!(!env.content_file(&layer_d).exists(), "its file is removed");
    let (_, ls, _) = cache_cli(&dir, &["ls"]);
    assert!(!ls.contains(&layer_d), "its entry is removed: {ls}");
    let (code, out, _) = cache_cli(&dir, &["verify"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("checked 1 entries"), "{out}");

    // Like the other cache commands, it refuses a cache in use.
    let proxy = env.proxy().start().await;
    let (code, _, err) = cache_cli(&dir, &["verify"]);
    assert_eq!(code, 1);
    assert!(err.contains("stop it first"), "{err}");
    // The removed layer is fetched again; the rest is still cached.
    get(&proxy, &layer_p)
        .await
        .assert_served(&layer, "MISS", "removed by cache verify");
    get_manifest(&proxy, &m_p)
        .await
        .assert_served(&m, "HIT", "intact manifest");
}

#[tokio::test]
async fn kill_9_mid_download_leaves_no_partial_entry() {
    let env = Env::new().await;
    let data = blob_bytes(60, 2 * MIB);
    let digest = env.reg.put_blob("library/slow", data.clone());
    let path = blob_path("library/slow", &digest);
    env.reg.set_fault(
        &path,
        Fault {
            chunk: Some(64 * 1024),
            delay: Some(Duration::from_millis(40)),
            ..Fault::default()
        },
    );
    let mut proxy = env.proxy().start().await;

    let resp = send_on(&proxy, HUB, Alpn::Http11, Method::GET, &path, &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut received = 0usize;
    within("half of the slow blob", STEP_TIMEOUT, async {
        while received < MIB {
            match body.frame().await {
                Some(Ok(f)) => received += f.into_data().map(|d| d.len()).unwrap_or(0),
                other => panic!("body ended early after {received}: {other:?}"),
            }
        }
    })
    .await;
    let partial = env.tmp_files();
    assert_eq!(partial.len(), 1, "one download in cache/tmp: {partial:?}");

    send_signal(proxy.pid(), Signal::KILL);
    proxy
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("regcache should die on SIGKILL");
    drop(body);
    drop(proxy);

    env.reg.clear_fault(&path);
    let proxy = env.proxy().start().await;
    assert!(
        env.tmp_files().is_empty(),
        "cache/tmp after restart: {:?}",
        env.tmp_files()
    );
    assert!(!env.content_file(&digest).exists());
    get(&proxy, &path)
        .await
        .assert_served(&data, "MISS", "after the crash");
    get(&proxy, &path)
        .await
        .assert_served(&data, "HIT", "then cached");
    assert_eq!(env.reg.methods(&path), vec!["GET", "GET"]);
    assert!(env.tmp_files().is_empty(), "{:?}", env.tmp_files());
}

/// Runs `regcache cache ARGS --cache-dir DIR` and returns (exit code, stdout, stderr).
fn cache_cli(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let dir = dir.to_str().unwrap();
    regcache_cli(&[&["cache"], args, &["--cache-dir", dir]].concat())
}

#[tokio::test]
async fn cache_commands_show_and_remove_what_was_pulled() {
    let env = Env::new().await;
    let repo = "library/alpine";
    let layer = blob_bytes(60, 300_000);
    let layer_d = env.reg.put_blob(repo, layer.clone());
    let config = blob_bytes(61, 500);
    let config_d = env.reg.put_blob(repo, config.clone());
    let m = image_manifest(
        OCI_MANIFEST,
        (&config_d, config.len()),
        &[(&layer_d, layer.len())],
    );
    let m_d = env
        .reg
        .put_manifest(repo, Some("3.20"), OCI_MANIFEST, m.clone());

    let mut proxy = env.proxy().args(["--shutdown-grace", "2"]).start().await;
    for p in [
        manifest_path(repo, "3.20"),
        blob_path(repo, &config_d),
        blob_path(repo, &layer_d),
    ] {
        let r = get_manifest(&proxy, &p).await;
        assert_eq!(r.status, StatusCode::OK, "{p}");
    }
    // A running regcache holds the index: the commands ask it (tests/it/admin.rs).
    let (code, out, err) = cache_cli(&env.cache_dir(), &["stats"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("entries:    3") && out.contains("uptime:"),
        "{out}"
    );
    proxy.sigterm();
    proxy
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("regcache should exit after SIGTERM");
    drop(proxy);

    let (code, out, err) = cache_cli(&env.cache_dir(), &["stats"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("entries:    3"), "{out}");
    assert!(out.contains("tags:       1"), "{out}");
    let (code, out, _) = cache_cli(&env.cache_dir(), &["ls"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("docker.io/library/alpine:3.20\t{m_d}")),
        "{out}"
    );
    assert!(out.contains(&layer_d), "{out}");

    // rm by short image reference drops the tag and its manifest; by digest, a blob.
    let (code, out, err) = cache_cli(&env.cache_dir(), &["rm", "alpine:3.20"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&m_d), "{out}");
    let (code, _, err) = cache_cli(&env.cache_dir(), &["rm", &layer_d]);
    assert_eq!(code, 0, "{err}");
    assert!(!env.content_file(&layer_d).exists());
    let (code, _, err) = cache_cli(&env.cache_dir(), &["rm", &layer_d]);
    assert_ne!(code, 0, "removing twice is an error");
    assert!(err.contains("not cached"), "{err}");
    let (_, out, _) = cache_cli(&env.cache_dir(), &["stats"]);
    assert!(out.contains("entries:    1"), "{out}");
    assert!(out.contains("tags:       0"), "{out}");

    let (code, _, err) = cache_cli(&env.cache_dir(), &["purge"]);
    assert_eq!(code, 0, "{err}");
    assert!(!env.content_file(&config_d).exists());
    let (code, _, err) = cache_cli(&env.cache_dir(), &["stats"]);
    assert_ne!(code, 0, "nothing left to show");
    assert!(err.contains("no cache here"), "{err}");
}

/// An origin-form request to regcache's own listener (mirror and prefix modes).
async fn mirror_get(proxy: &Proxy, path: &str) -> Got {
    let mut client = HttpClient::plain_h1(proxy.addr, &proxy.addr.to_string()).await;
    read_response(client.get(path).await).await
}

#[tokio::test]
async fn one_cache_for_interception_mirror_and_prefix_modes() {
    let env = Env::new().await;
    let repo = "library/alpine";
    let layer = blob_bytes(70, 400_000);
    let layer_d = env.reg.put_blob(repo, layer.clone());
    let config = blob_bytes(71, 700);
    let config_d = env.reg.put_blob(repo, config.clone());
    let m = image_manifest(
        OCI_MANIFEST,
        (&config_d, config.len()),
        &[(&layer_d, layer.len())],
    );
    let m_d = env
        .reg
        .put_manifest(repo, Some("3.20"), OCI_MANIFEST, m.clone());
    let proxy = env.proxy().start().await;

    // Interception fills the cache.
    get_manifest(&proxy, &manifest_path(repo, "3.20"))
        .await
        .assert_served(&m, "MISS", "intercepted manifest");
    for (d, data) in [(&config_d, &config), (&layer_d, &layer)] {
        get(&proxy, &blob_path(repo, d))
            .await
            .assert_served(data, "MISS", "intercepted blob");
    }
    let gets_before = env
        .reg
        .seen()
        .iter()
        .filter(|r| r.method == Method::GET)
        .count();

    // The same content through the three other doors: mirror with ?ns=,
    // mirror without ns (Docker's registry-mirrors, short name), path prefix.
    let doors = [
        ("/v2/library/alpine", "?ns=docker.io"),
        ("/v2/alpine", ""),
        ("/v2/docker.io/library/alpine", ""),
        ("/v2/index.docker.io/library/alpine", ""),
    ];
    for (prefix, query) in doors {
        let got = mirror_get(&proxy, &format!("{prefix}/manifests/{m_d}{query}")).await;
        got.assert_served(&m, "HIT", &format!("manifest via {prefix}{query}"));
        for (d, data) in [(&config_d, &config), (&layer_d, &layer)] {
            mirror_get(&proxy, &format!("{prefix}/blobs/{d}{query}"))
                .await
                .assert_served(data, "HIT", &format!("blob via {prefix}{query}"));
        }
    }
    let gets_after = env
        .reg
        .seen()
        .iter()
        .filter(|r| r.method == Method::GET)
        .count();
    assert_eq!(
        gets_before,
        gets_after,
        "no upstream GET after the first pull: {:?}",
        env.reg.summary()
    );

    // regcache answers /v2/ itself; hostile or unknown prefixes are refused.
    let base = mirror_get(&proxy, "/v2/").await;
    assert_eq!(base.status, StatusCode::OK);
    for hostile in [
        "/v2/../etc/manifests/latest",
        "/v2/a..b/x/manifests/1",
        &format!("/v2/alpine/blobs/{layer_d}?ns=a%2Fb"),
        "/v2/library/a%2fb/manifests/1",
    ] {
        let got = mirror_get(&proxy, hostile).await;
        assert_eq!(
            got.status,
            StatusCode::BAD_REQUEST,
            "{hostile}: {}",
            String::from_utf8_lossy(&got.body)
        );
    }
    let got = mirror_get(&proxy, "/v2/evil.example/x/manifests/1").await;
    assert_eq!(
        got.status,
        StatusCode::FORBIDDEN,
        "a registry not on the intercept list"
    );
    assert!(
        env.reg
            .seen()
            .iter()
            .all(|r| !r.path.contains("etc") && !r.path.contains("/x/")),
        "refused requests never reach upstream: {:?}",
        env.reg.summary()
    );
}

/// Runs `regcache prefetch` against the fake registry (which lives on this
/// test's runtime, hence the async child); returns (exit code, stderr).
async fn prefetch_cli(env: &Env, images: &[&str], extra: &[&str]) -> (i32, String) {
    let mut cmd = regcache_command();
    cmd.arg("prefetch")
        .args(images)
        .args(extra)
        .arg("--cache-dir")
        .arg(env.cache_dir())
        .arg("--ca-dir")
        .arg(env.path("ca"))
        .arg("--resolve")
        .arg(format!("{HUB}=127.0.0.1:{}", env.reg.port()))
        .arg("--upstream-ca")
        .arg(&env.ca_file);
    let out = tokio::process::Command::from(cmd)
        .output()
        .await
        .expect("run regcache prefetch");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn prefetch_fills_the_cache_and_offline_serves_it_without_upstream() {
    let env = Env::new().await;
    // A multi-platform image whose platforms have blobs of their own.
    let repo = "library/python";
    let mut platform_manifests = Vec::new();
    let mut blobs = Vec::new();
    for (seed, arch) in [(80u64, "amd64"), (82, "arm64")] {
        let layer = blob_bytes(seed, 200_000);
        let layer_d = env.reg.put_blob(repo, layer.clone());
        let config = blob_bytes(seed + 1, 300);
        let config_d = env.reg.put_blob(repo, config.clone());
        let m = image_manifest(
            OCI_MANIFEST,
            (&config_d, config.len()),
            &[(&layer_d, layer.len())],
        );
        let m_d = env.reg.put_manifest(repo, None, OCI_MANIFEST, m.clone());
        blobs.push((layer_d, layer));
        blobs.push((config_d, config));
        platform_manifests.push((m_d, m, arch));
    }
    let platforms: Vec<(&[u8], &str)> = platform_manifests
        .iter()
        .map(|(_, m, arch)| (&m[..], *arch))
        .collect();
    let index = oci_index(&platforms);
    let index_d = env
        .reg
        .put_manifest(repo, Some("3.12"), OCI_INDEX, index.clone());

    let (code, err) = prefetch_cli(&env, &["python:3.12"], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("1 of 1 images prefetched"), "{err}");
    assert!(
        !env.path("ca").exists(),
        "prefetch needs no CA and creates none"
    );
    let (code, err) = prefetch_cli(&env, &["python:3.12", "library/nothere:1"], &[]).await;
    assert_ne!(code, 0, "a missing image fails the run");
    assert!(
        err.contains("library/nothere:1"),
        "the failure names the image: {err}"
    );
    let gets = env
        .reg
        .seen()
        .iter()
        .filter(|r| r.method == Method::GET)
        .count();
    assert_eq!(
        gets,
        3 + blobs.len() + 1,
        "the second run fetched nothing again: {:?}",
        env.reg.summary()
    );

    // The registry is gone; an offline regcache serves all of it.
    env.reg.stop().await;
    let proxy = env.proxy().arg("--offline").start().await;
    get_manifest(&proxy, &manifest_path(repo, "3.12"))
        .await
        .assert_served(&index, "HIT", "index by tag, offline");
    get_manifest(&proxy, &manifest_path(repo, &index_d))
        .await
        .assert_served(&index, "HIT", "index by digest, offline");
    for (d, m, _) in &platform_manifests {
        get_manifest(&proxy, &manifest_path(repo, d))
            .await
            .assert_served(m, "HIT", "platform manifest, offline");
    }
    for (d, data) in &blobs {
        get(&proxy, &blob_path(repo, d))
            .await
            .assert_served(data, "HIT", "blob, offline");
    }
    // Misses answer 404 at once, without waiting for a network.
    let started = std::time::Instant::now();
    let miss = get_manifest(&proxy, &manifest_path(repo, "3.13")).await;
    assert_eq!(miss.status, StatusCode::NOT_FOUND);
    assert!(started.elapsed() < Duration::from_secs(2));
    // A repository never seen is not known public: offline, that is a 403
    // for anyone but proxy users, cached or not (see `crate::bundle`).
    let miss = get(&proxy, &blob_path("library/other", &blobs[0].0)).await;
    assert_eq!(
        miss.status,
        StatusCode::FORBIDDEN,
        "not linked to that repository, which is not known public"
    );
    let unknown = sha256(b"never cached");
    let miss = get(&proxy, &blob_path(repo, &unknown)).await;
    assert_eq!(miss.status, StatusCode::NOT_FOUND, "not in the cache");
    assert!(proxy.stderr().contains("offline: not in the cache"));
}

#[tokio::test]
async fn mirror_over_tls_serves_the_same_cache_over_h2_and_http11() {
    let env = Env::new().await;
    let repo = "library/alpine";
    let data = blob_bytes(90, 250_000);
    let digest = env.reg.put_blob(repo, data.clone());
    let mirror_port = free_port();
    let proxy = env
        .proxy()
        .arg("--mirror-tls")
        .arg(format!("127.0.0.1:{mirror_port}"))
        .arg("--mirror-names")
        .arg("regcache.test")
        .start()
        .await;
    // Interception fills the cache; the HTTPS mirror then serves it.
    get(&proxy, &blob_path(repo, &digest))
        .await
        .assert_served(&data, "MISS", "intercepted blob");
    for alpn in [Alpn::H2, Alpn::Http11] {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", mirror_port))
            .await
            .unwrap();
        // The mirror presents a leaf from the regcache CA for the name asked.
        let tls = tls_connect(tcp, "regcache.test", vec![proxy.ca_der()], alpn, true)
            .await
            .expect("the mirror's certificate chains to the regcache CA");
        let mut client = HttpClient::over_tls(tls, "regcache.test").await;
        assert_eq!(client.is_h2(), alpn == Alpn::H2);
        let path = format!("/v2/alpine/blobs/{digest}?ns=docker.io");
        let resp = client.get(&path).await;
        read_response(resp).await.assert_served(
            &data,
            "HIT",
            &format!("mirror over TLS, {alpn:?}"),
        );
    }
    assert_eq!(env.reg.count(Method::GET, &blob_path(repo, &digest)), 1);
}

/// The minted mirror certificate names only regcache's own names: the
/// address the client connected to and `mirror_names`; any other SNI gets a
/// TLS alert, not a leaf signed by the regcache CA.
#[tokio::test]
async fn mirror_over_tls_mints_only_for_its_own_names() {
    let env = Env::new().await;
    let mirror_port = free_port();
    let proxy = env
        .proxy()
        .arg("--mirror-tls")
        .arg(format!("127.0.0.1:{mirror_port}"))
        .arg("--mirror-names")
        .arg("regcache.test")
        .start()
        .await;
    let connect = || async {
        tokio::net::TcpStream::connect(("127.0.0.1", mirror_port))
            .await
            .unwrap()
    };
    for sni in ["accounts.google.com", "registry-1.docker.io", "localhost"] {
        match tls_connect(connect().await, sni, vec![proxy.ca_der()], Alpn::Both, true).await {
            Ok(tls) => panic!("SNI {sni}: got a leaf {:?}", sans(&peer_leaf(&tls))),
            Err(e) => assert!(e.to_string().contains("UnrecognisedName"), "SNI {sni}: {e}"),
        }
    }
    let tls = tls_connect(
        connect().await,
        "regcache.test",
        vec![proxy.ca_der()],
        Alpn::Both,
        true,
    )
    .await
    .expect("a configured mirror name");
    assert_eq!(
        sans(&peer_leaf(&tls)),
        (vec!["regcache.test".to_string()], vec![])
    );
    // No SNI (a client connecting by address): the leaf names that address.
    let tls = tls_connect(
        connect().await,
        "127.0.0.1",
        vec![proxy.ca_der()],
        Alpn::Both,
        true,
    )
    .await
    .expect("the address the client connected to");
    assert_eq!(
        sans(&peer_leaf(&tls)),
        (
            vec![],
            vec!["127.0.0.1".parse::<std::net::IpAddr>().unwrap()]
        )
    );
    assert!(proxy.stderr().contains("unrecognized_name"));
}

#[tokio::test]
async fn head_of_an_uncached_tag_records_it_as_containerd_resolves() {
    let env = Env::new().await;
    let repo = "library/alpine";
    let m = simple_manifest(95);
    let m_d = env
        .reg
        .put_manifest(repo, Some("edge"), OCI_MANIFEST, m.clone());
    let proxy = env.proxy().start().await;
    // containerd: HEAD the tag, then GET by digest.
    let h = request(
        &proxy,
        Alpn::Both,
        Method::HEAD,
        &manifest_path(repo, "edge"),
        &[("accept", OCI_MANIFEST)],
    )
    .await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.header("docker-content-digest"), Some(m_d.clone()));
    assert_eq!(h.header("content-length"), Some(m.len().to_string()));
    assert!(h.body.is_empty());
    get_manifest(&proxy, &manifest_path(repo, &m_d))
        .await
        .assert_served(&m, "HIT", "GET by digest after the HEAD");
    // One upstream GET for both; with the registry gone, the tag still resolves.
    assert_eq!(env.reg.methods(&manifest_path(repo, "edge")), vec!["GET"]);
    env.reg.stop().await;
    let h = request(
        &proxy,
        Alpn::Both,
        Method::HEAD,
        &manifest_path(repo, "edge"),
        &[("accept", OCI_MANIFEST)],
    )
    .await;
    assert_eq!(h.status, StatusCode::OK, "the tag resolves from the cache");
    assert_eq!(h.header("docker-content-digest"), Some(m_d));
}
