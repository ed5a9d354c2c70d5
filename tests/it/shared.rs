//! Many nodes on one shared tier (`shared_store`), on a real S3 server
//! (SeaweedFS): what one node fetched, another serves without an upstream
//! GET, after the registry confirmed the client's access with a HEAD; a
//! wrong object in the store is never completed and is replaced; a store
//! that stops answering leaves every node serving, and is used again when
//! it is back. `regcache shared gc` deletes what no node used for a while,
//! and a node marks each use, also of what it serves from its own cache.

use bytes::Bytes;
use hyper::Method;
use regcache::registry::media::OCI_MANIFEST;

use crate::support::http::{read_response, Got, HttpClient};
use crate::support::pattern::blob_bytes;
use crate::support::proxy::{Env, Proxy};
use crate::support::registry::{
    blob_path, image_manifest, manifest_path, Fault, ACCEPT_ALL, HUB, TEAM_CRED,
};
use crate::support::s3::Seaweed;
use crate::support::tls::Alpn;

/// One image: the manifest (digest, bytes) and its blobs.
struct Image {
    repo: &'static str,
    m_d: String,
    m: Bytes,
    blobs: Vec<(String, Bytes)>,
}

/// Puts an image of one 300 kB layer in the registry, tagged `1`.
fn put_image(env: &Env, repo: &'static str, seed: u64) -> Image {
    let layer = blob_bytes(seed, 300_000);
    let layer_d = env.reg.put_blob(repo, layer.clone());
    let config = blob_bytes(seed + 1, 600);
    let config_d = env.reg.put_blob(repo, config.clone());
    let m = image_manifest(
        OCI_MANIFEST,
        (&config_d, config.len()),
        &[(&layer_d, layer.len())],
    );
    let m_d = env
        .reg
        .put_manifest(repo, Some("1"), OCI_MANIFEST, m.clone());
    Image {
        repo,
        m_d,
        m,
        blobs: vec![(config_d, config), (layer_d, layer)],
    }
}

/// A GET through `proxy` (intercepted), with `authorization` if given.
pub(crate) async fn pull(proxy: &Proxy, path: &str, authorization: Option<&str>) -> Got {
    let mut client = proxy.intercepted(HUB, Alpn::Http11).await;
    let mut headers = vec![("accept", ACCEPT_ALL)];
    if let Some(credential) = authorization {
        headers.push(("authorization", credential));
    }
    let req = client.request(Method::GET, path, &headers);
    read_response(client.send(req).await).await
}

/// One of regcache's own pages on the proxy port, as text.
async fn page(proxy: &Proxy, path: &str) -> String {
    let mut client = HttpClient::plain_h1(proxy.addr, "127.0.0.1").await;
    read_response(client.get(path).await).await.text()
}

/// Pulls `image` (manifest by tag, then each blob) through `proxy`,
/// expecting `x_cache` for each.
async fn pull_image(proxy: &Proxy, image: &Image, auth: Option<&str>, x_cache: &str) {
    let served = |got: Got, want: &[u8], what: &str| {
        if got.status != 200 || got.error.is_some() {
            // What the node logged, to explain the failure below.
            eprintln!("{what} failed; the node's log:\n{}", proxy.stderr());
        }
        got.assert_served(want, x_cache, what);
    };
    let got = pull(proxy, &manifest_path(image.repo, "1"), auth).await;
    served(got, &image.m, "manifest by tag");
    for (d, data) in &image.blobs {
        let got = pull(proxy, &blob_path(image.repo, d), auth).await;
        served(got, data, "blob");
    }
}

/// Waits until the tier holds the image's manifest and blobs.
async fn wait_shared(s3: &Seaweed, prefix: &str, image: &Image) {
    s3.wait_object(prefix, &image.m_d, &image.m).await;
    for (d, data) in &image.blobs {
        s3.wait_object(prefix, d, data).await;
    }
}

/// Upstream GETs of the image's manifest (by tag or digest) and blobs.
fn upstream_gets(env: &Env, image: &Image) -> usize {
    let mut paths = vec![
        manifest_path(image.repo, "1"),
        manifest_path(image.repo, &image.m_d),
    ];
    paths.extend(image.blobs.iter().map(|(d, _)| blob_path(image.repo, d)));
    paths.iter().map(|p| env.reg.count(Method::GET, p)).sum()
}

#[tokio::test]
async fn an_image_pulled_through_one_node_comes_from_the_tier_on_the_others() {
    let s3 = Seaweed::start("regcache-one");
    let env = Env::new().await;
    let image = put_image(&env, "library/alpine", 10);
    let a = s3.node(env.proxy_on(&env.path("a")), "site").start().await;
    let b = s3.node(env.proxy_on(&env.path("b")), "site").start().await;
    let c = s3.node(env.proxy_on(&env.path("c")), "site").start().await;

    assert!(
        a.stderr()
            .contains("shared store enforces conditional create"),
        "the start-up probe: {}",
        a.stderr()
    );
    pull_image(&a, &image, None, "MISS").await;
    assert_eq!(upstream_gets(&env, &image), 3, "{:?}", env.reg.summary());
    wait_shared(&s3, "site", &image).await;

    pull_image(&b, &image, None, "SHARED").await;
    pull_image(&c, &image, None, "SHARED").await;
    assert_eq!(
        upstream_gets(&env, &image),
        3,
        "nodes B and C made no upstream GET: {:?}",
        env.reg.summary()
    );
    let heads = env.reg.count(Method::HEAD, &manifest_path(image.repo, "1"));
    // Each node that never saw the tag asks for its digest with a HEAD
    // (not counted as a pull); only A, which found nothing in the tier,
    // then fetched it.
    assert_eq!(heads, 3, "one HEAD of the tag per node");
    // Now in B's own cache.
    pull_image(&b, &image, None, "HIT").await;
    let metrics = page(&b, "/metrics").await;
    assert!(
        metrics.contains("regcache_shared_up{store=\"s3://regcache-one/site\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("regcache_shared_requests_total{op=\"get\",result=\"ok\"} 3"),
        "{metrics}"
    );
    let stats = page(&b, "/api/v1/stats").await;
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(
        stats["shared"]["store"], "s3://regcache-one/site",
        "{stats}"
    );
    assert_eq!(stats["shared"]["reachable"], true, "{stats}");
    assert_eq!(stats["shared"]["reads"], 3, "{stats}");
    assert_eq!(stats["shared"]["uploads"], 0, "B uploaded nothing: {stats}");
}

#[tokio::test]
async fn private_content_in_the_tier_is_refused_to_a_client_the_registry_refuses() {
    let s3 = Seaweed::start("regcache-private");
    let env = Env::new().await;
    env.reg.guard_team();
    let image = put_image(&env, "team/app", 20);
    let a = s3.node(env.proxy_on(&env.path("a")), "p").start().await;
    let b = s3.node(env.proxy_on(&env.path("b")), "p").start().await;
    pull_image(&a, &image, Some(TEAM_CRED), "MISS").await;
    wait_shared(&s3, "p", &image).await;

    // An anonymous client of node B: the registry's 401, none of the bytes.
    let got = pull(&b, &manifest_path(image.repo, "1"), None).await;
    assert_eq!(got.status, 401, "manifest: {}", got.brief());
    assert!(!crate::support::http::contains(&got.body, &image.m[..20]));
    for (d, data) in &image.blobs {
        let got = pull(&b, &blob_path(image.repo, d), None).await;
        assert_eq!(got.status, 401, "blob: {}", got.brief());
        assert!(
            got.body.len() < data.len() && !crate::support::http::contains(&got.body, &data[..64])
        );
    }
    // With the credential the registry accepts: from the tier.
    pull_image(&b, &image, Some(TEAM_CRED), "SHARED").await;
}

#[tokio::test]
async fn a_wrong_object_in_the_tier_is_never_completed_and_is_replaced() {
    let s3 = Seaweed::start("regcache-wrong");
    let env = Env::new().await;
    let image = put_image(&env, "library/busybox", 30);
    let a = s3.node(env.proxy_on(&env.path("a")), "w").start().await;
    pull_image(&a, &image, None, "MISS").await;
    wait_shared(&s3, "w", &image).await;
    let (layer_d, layer) = &image.blobs[1];
    let mut wrong = layer.to_vec();
    wrong[150_000] ^= 0xff;
    s3.overwrite("w", layer_d, Bytes::from(wrong)).await;

    let b = s3.node(env.proxy_on(&env.path("b")), "w").start().await;
    let got = pull(&b, &blob_path(image.repo, layer_d), None).await;
    got.assert_aborted(layer, "a layer read from a damaged shared object");
    // Dropped from the tier; the retry fetches it upstream, and the right
    // bytes go back to the tier.
    let retry = pull(&b, &blob_path(image.repo, layer_d), None).await;
    retry.assert_served(layer, "MISS", "the retry");
    s3.wait_object("w", layer_d, layer).await;
    assert_eq!(
        env.reg.count(Method::GET, &blob_path(image.repo, layer_d)),
        2
    );
}

#[tokio::test]
async fn with_the_store_down_nodes_serve_and_fetch_then_use_it_again() {
    let mut s3 = Seaweed::start("regcache-down");
    let env = Env::new().await;
    let one = put_image(&env, "library/one", 40);
    let two = put_image(&env, "library/two", 50);
    let three = put_image(&env, "library/three", 55);
    let a = s3.node(env.proxy_on(&env.path("a")), "d").start().await;
    let b = s3.node(env.proxy_on(&env.path("b")), "d").start().await;
    pull_image(&a, &one, None, "MISS").await;
    wait_shared(&s3, "d", &one).await;

    s3.kill();
    // A serves what it has; B fetches what it misses from upstream.
    pull_image(&a, &one, None, "HIT").await;
    pull_image(&b, &one, None, "MISS").await;
    b.wait_for_log("shared store unreachable").await;

    // An image only B fetches while the store is down.
    pull_image(&b, &three, None, "MISS").await;

    s3.restart();
    // Its blobs reach the tier once the store answers.
    for (d, data) in &three.blobs {
        s3.wait_object("d", d, data).await;
    }
    assert!(b.stderr().contains("after it came back"), "{}", b.stderr());
    // Used again, without a restart of regcache: B's new pull reaches the
    // tier, and a node that never saw it gets it from there.
    pull_image(&b, &two, None, "MISS").await;
    wait_shared(&s3, "d", &two).await;
    pull_image(&a, &two, None, "SHARED").await;
    assert!(
        b.stderr().contains("shared store answers again"),
        "{}",
        b.stderr()
    );
}

/// A 2 MiB blob whose upstream body stops after 512 KiB until the gate
/// opens.
pub(crate) fn put_held_blob(env: &Env, repo: &str, seed: u64) -> (String, Bytes) {
    let data = blob_bytes(seed, 2 * 1024 * 1024);
    let digest = env.reg.put_blob(repo, data.clone());
    env.reg.set_fault(
        &blob_path(repo, &digest),
        Fault {
            gate_after: Some(512 * 1024),
            ..Fault::default()
        },
    );
    (digest, data)
}

#[tokio::test]
async fn a_blob_missing_everywhere_is_fetched_once_for_the_cluster() {
    let s3 = Seaweed::start("regcache-once");
    let env = Env::new().await;
    let repo = "library/big";
    let (digest, data) = put_held_blob(&env, repo, 60);
    let path = blob_path(repo, &digest);
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        let node = s3.node(env.proxy_on(&env.path(name)), "once").start().await;
        nodes.push(std::sync::Arc::new(node));
    }
    let mut clients = Vec::new();
    for i in 0..30 {
        let (node, path) = (nodes[i % 3].clone(), path.clone());
        clients.push(tokio::spawn(async move { pull(&node, &path, None).await }));
    }
    env.reg.wait_count(Method::GET, &path, 1).await;
    // Every node has asked by now (the others wait on the lease).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    env.reg.open_gate();
    for client in clients {
        let got = client.await.unwrap();
        got.assert_content(&Method::GET, &data, "a client of the cluster");
    }
    assert_eq!(
        env.reg.count(Method::GET, &path),
        1,
        "one upstream GET for three nodes and 30 clients: {:?}",
        env.reg.summary()
    );
}

#[tokio::test]
async fn a_fetcher_killed_mid_fetch_hands_the_blob_to_another_node() {
    let s3 = Seaweed::start("regcache-kill");
    let env = Env::new().await;
    let repo = "library/big";
    let (digest, data) = put_held_blob(&env, repo, 70);
    let path = blob_path(repo, &digest);
    let a = std::sync::Arc::new(s3.node(env.proxy_on(&env.path("a")), "k").start().await);
    let b = s3.node(env.proxy_on(&env.path("b")), "k").start().await;
    let a_client = {
        let (a, path) = (a.clone(), path.clone());
        tokio::spawn(async move { pull(&a, &path, None).await })
    };
    env.reg.wait_count(Method::GET, &path, 1).await;
    // B's client waits for A's fetch...
    let b_client = {
        let path = path.clone();
        let b = std::sync::Arc::new(b);
        let waiting = b.clone();
        (
            tokio::spawn(async move { pull(&waiting, &path, None).await }),
            b,
        )
    };
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    // ...and A dies with the lease held.
    crate::support::send_signal(a.pid(), crate::support::Signal::KILL);
    let cut = a_client.await.unwrap();
    cut.assert_aborted(&data, "A's own client");
    env.reg.open_gate();
    // The lease expires; B takes over and fetches it itself.
    let got = b_client.0.await.unwrap();
    got.assert_content(&Method::GET, &data, "B's client after the takeover");
    assert_eq!(
        env.reg.count(Method::GET, &path),
        2,
        "{:?}",
        env.reg.summary()
    );
    assert!(
        b_client.1.stderr().contains("took over an expired lease"),
        "{}",
        b_client.1.stderr()
    );
    s3.wait_object("k", &digest, &data).await;
}

#[tokio::test]
async fn a_new_tag_asked_on_every_node_at_once_is_one_counted_pull() {
    let s3 = Seaweed::start("regcache-tag");
    let env = Env::new().await;
    let image = put_image(&env, "library/hot", 80);
    let tag_path = manifest_path(image.repo, "1");
    // The manifest GET (a counted pull) is slow; its HEAD is not.
    env.reg.set_fault(
        &tag_path,
        Fault {
            head_delay: Some(std::time::Duration::from_secs(1)),
            ..Fault::default()
        },
    );
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        let node = s3.node(env.proxy_on(&env.path(name)), "tag").start().await;
        nodes.push(std::sync::Arc::new(node));
    }
    let mut clients = Vec::new();
    for i in 0..15 {
        let (node, path) = (nodes[i % 3].clone(), tag_path.clone());
        clients.push(tokio::spawn(async move { pull(&node, &path, None).await }));
    }
    for client in clients {
        let got = client.await.unwrap();
        got.assert_content(&Method::GET, &image.m, "the manifest by tag");
    }
    assert_eq!(
        env.reg.count(Method::GET, &tag_path),
        1,
        "one GET of the tag for the cluster: {:?}",
        env.reg.summary()
    );
}

/// An S3 endpoint on loopback that takes every PUT (`If-None-Match: *`
/// ignored, as Garage 2.5 does) and DELETE, and has no object: a store on
/// which nodes could not agree on one fetcher. Returns its address and how
/// many PUTs carried `If-None-Match`.
async fn store_ignoring_conditional_writes() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conditional = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = conditional.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let mut resp =
                                hyper::Response::new(http_body_util::Full::new(Bytes::new()));
                            match *req.method() {
                                Method::PUT => {
                                    if req.headers().contains_key("if-none-match") {
                                        seen.fetch_add(1, Ordering::SeqCst);
                                    }
                                    resp.headers_mut().insert(
                                        "etag",
                                        hyper::header::HeaderValue::from_static("\"1\""),
                                    );
                                }
                                Method::DELETE => {
                                    *resp.status_mut() = hyper::StatusCode::NO_CONTENT
                                }
                                _ => *resp.status_mut() = hyper::StatusCode::NOT_FOUND,
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, conditional)
}

#[tokio::test]
async fn a_store_that_ignores_conditional_writes_stops_regcache_unless_single_flight_is_off() {
    let (store, conditional) = store_ignoring_conditional_writes().await;
    let env = Env::new().await;
    let node = |dir: &str| {
        env.proxy_on(&env.path(dir))
            .args(["--shared-store", "s3://garage-like/p"])
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "garage")
            .env("AWS_ENDPOINT_URL", &format!("http://{store}"))
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = crate::support::proxy::regcache_command();
    cmd.current_dir(tmp.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--ca-dir"])
        .arg(env.path("ca-refused"))
        .args(["--cache-dir"])
        .arg(tmp.path().join("cache"))
        .args(["--shared-store", "s3://garage-like/p"])
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "garage")
        .env("AWS_ENDPOINT_URL", format!("http://{store}"));
    // Not std's output(): the fake store answers on this runtime.
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let refused = crate::support::within(
        "regcache refusing the store",
        std::time::Duration::from_secs(30),
        cmd.output(),
    )
    .await
    .expect("run regcache");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("ignores conditional writes")
            && stderr.contains("shared_single_flight = false"),
        "the reason and the way out: {stderr}"
    );
    assert!(
        conditional.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the probe sent conditional creates"
    );
    // Told to run without cluster-wide single flight: it serves.
    let running = node("b")
        .args(["--shared-single-flight", "false"])
        .start()
        .await;
    assert!(
        running
            .stderr()
            .contains("each node fetches on its own (shared_single_flight = false)"),
        "{}",
        running.stderr()
    );
}

/// Now, in Unix milliseconds.
fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The digests of an image: its manifest, then its blobs.
fn digests(image: &Image) -> Vec<&str> {
    let mut all = vec![image.m_d.as_str()];
    all.extend(image.blobs.iter().map(|(d, _)| d.as_str()));
    all
}

/// The object key of `digest` under `prefix`, as gc prints it.
fn object_key(prefix: &str, digest: &str) -> String {
    format!(
        "{prefix}/blobs/sha256/{}",
        digest.trim_start_matches("sha256:")
    )
}

#[tokio::test]
async fn gc_deletes_what_no_node_used_and_keeps_what_one_did() {
    let s3 = Seaweed::start("regcache-gc");
    let env = Env::new().await;
    let used = put_image(&env, "library/used", 90);
    let unused = put_image(&env, "library/unused", 95);
    let a = s3.node(env.proxy_on(&env.path("a")), "gc").start().await;
    pull_image(&a, &used, None, "MISS").await;
    pull_image(&a, &unused, None, "MISS").await;
    wait_shared(&s3, "gc", &used).await;
    wait_shared(&s3, "gc", &unused).await;
    // A node fetching the unused image's config holds its lease; a
    // crashed node left one that expired two hours ago.
    let leased = unused.blobs[0].0.as_str();
    s3.put_lease("gc", leased, now_unix_ms() + 600_000).await;
    let crashed = format!("sha256:{}", "ab".repeat(32));
    s3.put_lease("gc", &crashed, now_unix_ms() - 2 * 3_600_000)
        .await;

    // SeaweedFS cannot backdate an object: a tiny duration, then a wait.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    // A new node reads the used image from the tier: its use is marked.
    let b = s3.node(env.proxy_on(&env.path("b")), "gc").start().await;
    pull_image(&b, &used, None, "SHARED").await;
    for d in digests(&used) {
        s3.wait_marker("gc", d).await;
    }

    let (code, out, err) = s3.gc("gc", &["--unused-for", "5s", "--dry-run"]);
    assert_eq!(code, 0, "dry run: {out}{err}");
    for d in [&unused.m_d, &unused.blobs[1].0] {
        assert!(
            out.contains(&format!("would delete {}", object_key("gc", d))),
            "{out}"
        );
    }
    for d in digests(&used).into_iter().chain([leased]) {
        assert!(!out.contains(&object_key("gc", d)), "{d} kept: {out}");
    }
    assert!(out.contains("would delete: 2 objects"), "{out}");
    wait_shared(&s3, "gc", &unused).await;
    assert!(
        s3.has_lease("gc", &crashed).await,
        "a dry run deletes nothing"
    );

    let (code, out, err) = s3.gc("gc", &["--unused-for", "5s"]);
    assert_eq!(code, 0, "gc: {out}{err}");
    assert!(out.contains("deleted: 2 objects"), "{out}");
    assert!(out.contains("1 stale leases"), "{out}");
    assert!(s3.object("gc", &unused.m_d).await.is_none(), "{out}");
    assert!(s3.object("gc", &unused.blobs[1].0).await.is_none(), "{out}");
    assert!(
        s3.object("gc", leased).await.is_some(),
        "a leased object is kept"
    );
    assert!(s3.has_lease("gc", leased).await);
    assert!(
        !s3.has_lease("gc", &crashed).await,
        "the stale lease is gone"
    );
    wait_shared(&s3, "gc", &used).await;
    // What gc deleted is fetched from the registry again.
    let c = s3.node(env.proxy_on(&env.path("c")), "gc").start().await;
    let got = pull(&c, &blob_path(unused.repo, &unused.blobs[1].0), None).await;
    got.assert_served(&unused.blobs[1].1, "MISS", "a deleted layer");
}

#[tokio::test]
async fn a_node_serving_from_its_own_cache_marks_the_use_in_the_tier() {
    let s3 = Seaweed::start("regcache-touch");
    let env = Env::new().await;
    let image = put_image(&env, "library/touched", 100);
    let a = s3.node(env.proxy_on(&env.path("a")), "t").start().await;
    pull_image(&a, &image, None, "MISS").await;
    wait_shared(&s3, "t", &image).await;
    for d in digests(&image) {
        assert!(
            s3.marker("t", d).await.is_none(),
            "an upload is fresh: no marker"
        );
    }
    pull_image(&a, &image, None, "HIT").await;
    for d in digests(&image) {
        s3.wait_marker("t", d).await;
    }
    let metrics = page(&a, "/metrics").await;
    assert!(
        metrics.contains("regcache_shared_requests_total{op=\"touch\",result=\"ok\"} 3"),
        "{metrics}"
    );
    // Once a day: a second hit writes nothing.
    let first = s3.marker("t", &image.blobs[1].0).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    pull_image(&a, &image, None, "HIT").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let again = s3.marker("t", &image.blobs[1].0).await.unwrap();
    assert_eq!(again.last_modified, first.last_modified);
}

#[test]
fn gc_without_a_reachable_store_fails_with_a_clear_message() {
    use crate::support::proxy::regcache_command;
    // A loopback port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = regcache_command()
        .args(["shared", "gc", "--unused-for", "30d"])
        .args(["--shared-store", "s3://nowhere/p"])
        .env("AWS_ACCESS_KEY_ID", "k")
        .env("AWS_SECRET_ACCESS_KEY", "s")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("regcache: error: shared_store s3://nowhere/p: cannot list"),
        "{err}"
    );
    let out = regcache_command()
        .args(["shared", "gc", "--unused-for", "30d"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no shared_store"), "{err}");
    let out = regcache_command()
        .args(["shared", "gc", "--unused-for", "30 days"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
