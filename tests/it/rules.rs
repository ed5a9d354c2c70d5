//! Operators' image rules (`[[rules]]`), seen from clients and from the
//! upstream: a denied repository is refused whatever the reference and
//! whichever way the request comes in (interception, mirror `?ns=`, path
//! prefix, prefetch), without reaching the registry; a `cache = false`
//! repository is served and never stored; a rule's `tag_ttl` wins over the
//! global one.

use bytes::Bytes;
use hyper::{Method, StatusCode};
use regcache::registry::media::OCI_MANIFEST;

use crate::support::http::{read_response, Got, HttpClient};
use crate::support::pattern::blob_bytes;
use crate::support::proxy::{regcache_command, Env, Proxy};
use crate::support::registry::{blob_path, manifest_path, oci_manifest, sha256, ACCEPT_ALL, HUB};
use crate::support::tls::Alpn;

/// One request through an intercepted connection to Docker Hub.
async fn intercepted(proxy: &Proxy, method: Method, path: &str) -> Got {
    let mut client = proxy.intercepted(HUB, Alpn::Both).await;
    let req = client.request(method, path, &[("accept", ACCEPT_ALL)]);
    read_response(client.send(req).await).await
}

/// An origin-form request to regcache's own listener (mirror and prefix).
async fn origin_form(proxy: &Proxy, path: &str) -> Got {
    let mut client = HttpClient::plain_h1(proxy.addr, &proxy.addr.to_string()).await;
    read_response(client.get(path).await).await
}

/// Writes `rules` (TOML) as the configuration file and returns its path.
fn config_file(env: &Env, toml: &str) -> String {
    let path = env.path("regcache.toml");
    std::fs::write(&path, toml).unwrap();
    path.to_str().unwrap().to_string()
}

/// An image of one config and one layer blob in `repo`, tagged `latest`:
/// (manifest, its digest, [(blob digest, bytes)]).
fn put_image(env: &Env, repo: &str, seed: u64) -> (Bytes, String, Vec<(String, Bytes)>) {
    let config = blob_bytes(seed, 200);
    let layer = blob_bytes(seed + 1, 5000);
    let m = oci_manifest(&config, &[&layer]);
    let mut blobs = Vec::new();
    for data in [config, layer] {
        blobs.push((env.reg.put_blob(repo, data.clone()), data));
    }
    let digest = env
        .reg
        .put_manifest(repo, Some("latest"), OCI_MANIFEST, m.clone());
    (m, digest, blobs)
}

fn assert_denied(got: &Got, method: &Method, rule: &str, what: &str) {
    assert_eq!(got.status, StatusCode::FORBIDDEN, "{what}: {}", got.brief());
    if *method == Method::HEAD {
        assert!(got.body.is_empty(), "{what}: a HEAD answer has no body");
        return;
    }
    assert_eq!(got.error_code().as_deref(), Some("DENIED"), "{what}");
    let text = got.text();
    assert!(
        text.contains("docker.io/evil/tool is denied by regcache")
            && text.contains(&format!("rule {rule} (match = ")),
        "{what}: the message names the repository and the rule: {text}"
    );
}

const ALLOW_OFFICIAL_DENY_REST: &str = "\
[[rules]]
match = \"docker.io/library/*\"
[[rules]]
match = \"**\"
action = \"deny\"
";

#[tokio::test]
async fn a_denied_repository_is_refused_by_tag_digest_and_every_way_in_without_asking_upstream() {
    let env = Env::new().await;
    let (_, evil_m, evil_blobs) = put_image(&env, "evil/tool", 10);
    let (ok_m, _, _) = put_image(&env, "library/alpine", 20);
    let config = config_file(&env, ALLOW_OFFICIAL_DENY_REST);
    let proxy = env
        .proxy()
        .arg("--config")
        .arg(config.clone())
        .start()
        .await;

    // The allowed repository is served (the control).
    let got = intercepted(
        &proxy,
        Method::GET,
        &manifest_path("library/alpine", "latest"),
    )
    .await;
    got.assert_served(&ok_m, "MISS", "allowed official image");

    let blob = &evil_blobs[1].0;
    let intercepted_paths = [
        (Method::GET, manifest_path("evil/tool", "latest")),
        (Method::HEAD, manifest_path("evil/tool", "latest")),
        (Method::GET, manifest_path("evil/tool", &evil_m)),
        (Method::GET, blob_path("evil/tool", blob)),
        (Method::HEAD, blob_path("evil/tool", blob)),
        (Method::GET, "/v2/evil/tool/tags/list".to_string()),
        (Method::GET, format!("/v2/evil/tool/referrers/{evil_m}")),
        (Method::POST, "/v2/evil/tool/blobs/uploads/".to_string()),
    ];
    for (method, path) in &intercepted_paths {
        let got = intercepted(&proxy, method.clone(), path).await;
        assert_denied(&got, method, "2", &format!("{method} {path}"));
    }
    for path in [
        "/v2/evil/tool/manifests/latest?ns=docker.io".to_string(),
        format!("/v2/evil/tool/blobs/{blob}?ns=index.docker.io"),
        format!("/v2/docker.io/evil/tool/manifests/{evil_m}"),
        format!("/v2/index.docker.io/evil/tool/blobs/{blob}"),
    ] {
        let got = origin_form(&proxy, &path).await;
        assert_denied(&got, &Method::GET, "2", &path);
    }
    let asked: Vec<String> = env
        .reg
        .seen()
        .iter()
        .filter(|r| r.path.contains("evil"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(asked.is_empty(), "the registry never saw: {asked:?}");

    // Each denial is logged and counted.
    proxy.wait_for_log("refused by an image rule").await;
    let metrics = origin_form(&proxy, "/metrics").await.text();
    let denials = metrics
        .lines()
        .find(|l| l.starts_with("regcache_rule_denials_total{rule=\"2\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    let expected = (intercepted_paths.len() + 4) as u64;
    assert_eq!(denials, Some(expected), "{metrics}");

    // Prefetch meets the same rule.
    let out = tokio::process::Command::from(prefetch(&env, &config, "evil/tool:latest"))
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("docker.io/evil/tool is denied by regcache: rule 2"),
        "{stderr}"
    );
}

/// `regcache prefetch IMAGE` with `config`, against this env's registry.
fn prefetch(env: &Env, config: &str, image: &str) -> std::process::Command {
    let mut cmd = regcache_command();
    cmd.arg("prefetch")
        .arg(image)
        .arg("--config")
        .arg(config)
        .arg("--cache-dir")
        .arg(env.path("prefetch-cache"))
        .arg("--ca-dir")
        .arg(env.path("ca"))
        .arg("--resolve")
        .arg(format!("{HUB}=127.0.0.1:{}", env.reg.port()))
        .arg("--upstream-ca")
        .arg(&env.ca_file);
    cmd
}

#[tokio::test]
async fn a_cache_false_repository_is_served_from_upstream_and_never_stored() {
    let env = Env::new().await;
    let (m, _, blobs) = put_image(&env, "acme/private-tool", 30);
    let (_, _, ok_blobs) = put_image(&env, "library/alpine", 40);
    let config = config_file(&env, "[[rules]]\nmatch = \"acme/*\"\ncache = false\n");
    let proxy = env.proxy().arg("--config").arg(config).start().await;

    let mpath = manifest_path("acme/private-tool", "latest");
    let (bd, bytes) = &blobs[1];
    let bpath = blob_path("acme/private-tool", bd);
    for round in 0..2 {
        let got = intercepted(&proxy, Method::GET, &mpath).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.brief());
        assert_eq!(got.body, m, "manifest, round {round}");
        assert_eq!(got.header("x-cache"), None, "passed through, round {round}");
        let got = intercepted(&proxy, Method::GET, &bpath).await;
        assert_eq!(got.body, *bytes, "blob, round {round}");
        assert_eq!(got.header("x-cache"), None);
    }
    assert_eq!(
        env.reg.count(Method::GET, &mpath),
        2,
        "each GET went upstream"
    );
    assert_eq!(env.reg.count(Method::GET, &bpath), 2);
    assert!(!env.content_file(bd).exists(), "the blob was never stored");
    assert!(!env.content_file(&sha256(&m)).exists(), "nor the manifest");

    // Another repository is cached as usual (the control).
    let (okd, okb) = &ok_blobs[1];
    let got = intercepted(&proxy, Method::GET, &blob_path("library/alpine", okd)).await;
    got.assert_served(okb, "MISS", "official image blob");
    let got = intercepted(&proxy, Method::GET, &blob_path("library/alpine", okd)).await;
    got.assert_served(okb, "HIT", "official image blob again");
}

#[tokio::test]
async fn a_rules_tag_ttl_wins_over_the_global_one() {
    let env = Env::new().await;
    let (hourly, _, _) = put_image(&env, "library/alpine", 50);
    let (other, _, _) = put_image(&env, "library/busybox", 60);
    let config = config_file(
        &env,
        "tag_ttl = 3600\n[[rules]]\nmatch = \"docker.io/library/alpine\"\ntag_ttl = 0\n",
    );
    let proxy = env.proxy().arg("--config").arg(config).start().await;

    let alpine = manifest_path("library/alpine", "latest");
    let busybox = manifest_path("library/busybox", "latest");
    intercepted(&proxy, Method::GET, &alpine)
        .await
        .assert_served(&hourly, "MISS", "alpine 1");
    intercepted(&proxy, Method::GET, &alpine)
        .await
        .assert_served(&hourly, "REVALIDATED", "alpine 2: the rule's tag_ttl = 0");
    intercepted(&proxy, Method::GET, &busybox)
        .await
        .assert_served(&other, "MISS", "busybox 1");
    intercepted(&proxy, Method::GET, &busybox)
        .await
        .assert_served(&other, "HIT", "busybox 2: the global 3600 s");
    assert_eq!(env.reg.count(Method::HEAD, &alpine), 1);
    assert_eq!(env.reg.count(Method::HEAD, &busybox), 0);
}

#[tokio::test]
async fn rules_test_says_which_rule_matches_and_a_bad_rule_stops_the_start() {
    let env = Env::new().await;
    let config = config_file(&env, ALLOW_OFFICIAL_DENY_REST);
    let out = regcache_command()
        .args(["rules", "test", "--config", &config])
        .args(["alpine:3.20", "index.docker.io/evil/tool@sha256:0000000000000000000000000000000000000000000000000000000000000000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert_eq!(
        stdout,
        "docker.io/library/alpine: rule 1 (match = \"docker.io/library/*\"): allow, cached, otherwise the global settings\n\
         docker.io/evil/tool: rule 2 (match = \"**\"): deny (every request for it gets 403 DENIED)\n"
    );

    let bad = config_file(
        &env,
        "[[rules]]\nmatch = \"nginx:1.25\"\naction = \"deny\"\n",
    );
    let out = regcache_command()
        .args(["serve", "--config", &bad, "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("rule 1 (match = \"nginx:1.25\")") && stderr.contains("not a tag"),
        "{stderr}"
    );
}

#[tokio::test]
async fn max_unused_removes_what_nobody_read_and_keeps_what_is_used_or_ruled_longer() {
    let env = Env::new().await;
    let (_, _, old) = put_image(&env, "library/old", 70);
    let (_, _, used) = put_image(&env, "library/used", 80);
    let (_, _, kept) = put_image(&env, "acme/kept", 90);
    let config = config_file(
        &env,
        "max_unused = \"2s\"\n[[rules]]\nmatch = \"acme/*\"\nmax_unused = \"1h\"\n",
    );
    let proxy = env.proxy().arg("--config").arg(config).start().await;

    let blob = |repo: &str, d: &str| blob_path(repo, d);
    let (old_d, old_b) = &old[1];
    let (used_d, used_b) = &used[1];
    let (kept_d, kept_b) = &kept[1];
    let old_tag = manifest_path("library/old", "latest");
    intercepted(&proxy, Method::GET, &old_tag).await;
    for (repo, d, b) in [
        ("library/old", old_d, old_b),
        ("library/used", used_d, used_b),
        ("acme/kept", kept_d, kept_b),
    ] {
        intercepted(&proxy, Method::GET, &blob(repo, d))
            .await
            .assert_served(b, "MISS", repo);
        env.stored(d).await;
    }

    // Read library/used every half second while library/old goes unread
    // past its 2 s; the retention pass runs every second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while env.content_file(old_d).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the unread blob was never removed; stderr:\n{}",
            proxy.stderr()
        );
        intercepted(&proxy, Method::GET, &blob("library/used", used_d))
            .await
            .assert_served(used_b, "HIT", "the blob in use");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    proxy
        .wait_for_log("removed content not read for max_unused")
        .await;
    intercepted(&proxy, Method::GET, &blob("library/used", used_d))
        .await
        .assert_served(used_b, "HIT", "the blob in use stays");
    intercepted(&proxy, Method::GET, &blob("acme/kept", kept_d))
        .await
        .assert_served(kept_b, "HIT", "its rule keeps acme/kept an hour");
    intercepted(&proxy, Method::GET, &blob("library/old", old_d))
        .await
        .assert_served(old_b, "MISS", "the removed blob is fetched again");

    // `cache stats` (through the running regcache) shows what went: the
    // old image's manifest and blobs, and its tag.
    let dir = env.cache_dir();
    let (code, stdout, stderr) = crate::support::proxy::regcache_cli(&[
        "cache",
        "stats",
        "--cache-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("unused:"))
        .unwrap_or_else(|| panic!("no unused line: {stdout}"));
    let entries: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(entries >= 2, "{line}");
    assert!(line.contains("and 1 tags removed"), "{line}");
}

/// Waits until regcache logged `needle` at least `n` times.
async fn wait_for_count(proxy: &Proxy, needle: &str, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while proxy.stderr().matches(needle).count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{needle:?} not logged {n} times; stderr:\n{}",
            proxy.stderr()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_warm_list_is_checked_with_heads_only_and_fetched_when_it_changed() {
    let env = Env::new().await;
    let (_, _, warm) = put_image(&env, "library/warm", 100);
    let (_, pinned_m, pinned) = put_image(&env, "library/pinned", 110);
    // A two-platform index; only arm64 is kept warm.
    let mut platform = Vec::new();
    for (seed, arch) in [(120, "amd64"), (130, "arm64")] {
        let layer = blob_bytes(seed, 3000);
        let config = blob_bytes(seed + 1, 100);
        let m = oci_manifest(&config, &[&layer]);
        let layer_d = env.reg.put_blob("library/multi", layer);
        env.reg.put_blob("library/multi", config);
        env.reg
            .put_manifest("library/multi", None, OCI_MANIFEST, m.clone());
        platform.push((m, arch, layer_d));
    }
    let index = regcache::registry::media::OCI_INDEX;
    let pairs: Vec<(&[u8], &str)> = platform.iter().map(|(m, a, _)| (&m[..], *a)).collect();
    env.reg.put_manifest(
        "library/multi",
        Some("1"),
        index,
        crate::support::registry::oci_index(&pairs),
    );
    let list = env.path("warm.txt");
    std::fs::write(
        &list,
        format!(
            "# kept warm\nlibrary/warm:latest\nlibrary/pinned@{pinned_m}\n\
             library/multi:1 --platform linux/arm64\nUPPER:case\n"
        ),
    )
    .unwrap();
    let config = config_file(
        &env,
        &format!(
            "tag_ttl = 3600\nprefetch_file = {:?}\nprefetch_interval = \"1s\"\n",
            list.to_str().unwrap()
        ),
    );
    let proxy = env.proxy().arg("--config").arg(config).start().await;

    // The first run fetches everything listed, arm64 only of the index.
    wait_for_count(&proxy, "keep-warm run done", 1).await;
    for (d, _) in warm.iter().chain(&pinned) {
        env.stored(d).await;
    }
    env.stored(&platform[1].2).await;
    assert!(
        !env.content_file(&platform[0].2).exists(),
        "amd64 is not kept"
    );
    assert!(
        proxy.stderr().contains("line 5: UPPER:case"),
        "the bad line is named; stderr:\n{}",
        proxy.stderr()
    );

    // Two more runs with nothing changed: HEADs of the tags, nothing else,
    // although the tags are fresh for an hour.
    let before = env.reg.seen().len();
    let runs = proxy.stderr().matches("keep-warm run done").count();
    wait_for_count(&proxy, "keep-warm run done", runs + 2).await;
    let asked: Vec<String> = env.reg.seen()[before..]
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(!asked.is_empty(), "each run asks upstream");
    assert!(
        asked
            .iter()
            .all(|a| a == "HEAD /v2/library/warm/manifests/latest"
                || a == "HEAD /v2/library/multi/manifests/1"),
        "only HEADs of the tags: {asked:?}"
    );

    // The tag changes upstream: the next run fetches the new image.
    let (_, new_m, new_blobs) = put_image(&env, "library/warm", 140);
    for (d, _) in &new_blobs {
        env.stored(d).await;
    }
    env.stored(&new_m).await;

    // Visible in the metrics and the admin API.
    let metrics = origin_form(&proxy, "/metrics").await.text();
    for result in ["unchanged", "updated", "failed"] {
        let line = format!("regcache_warm_images_total{{result=\"{result}\"}}");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    let stats = origin_form(&proxy, "/api/v1/stats").await.text();
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(stats["warm"]["unchanged"].as_u64() > Some(0), "{stats}");
    assert!(stats["warm"]["failed"].as_u64() >= Some(1), "{stats}");
}
