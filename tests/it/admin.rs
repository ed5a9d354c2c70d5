//! The admin API (`/api/v1/…`) and `regcache cache stats|ls|rm|purge` on a
//! running regcache: what the commands show and remove while the proxy
//! serves, and who may call the API (loopback; others with the bearer
//! token of `admin_token_file`, tried from a network namespace).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use regcache::registry::media::OCI_MANIFEST;

use crate::support::http::{read_response, Got, HttpClient};
use crate::support::pattern::blob_bytes;
use crate::support::proxy::{regcache_cli, users_file, write_file, Env, Proxy};
use crate::support::registry::{blob_path, image_manifest, manifest_path, ACCEPT_ALL, HUB};
use crate::support::tls::Alpn;

/// An image pulled through the proxy: its manifest digest, the manifest,
/// and (digest, bytes) of its config and layer.
struct Pulled {
    m_d: String,
    m: Bytes,
    blobs: Vec<(String, Bytes)>,
}

const REPO: &str = "library/alpine";

/// Puts `alpine:3.20` in the registry and pulls it through `proxy`.
async fn pull_alpine(env: &Env, proxy: &Proxy) -> Pulled {
    let layer = blob_bytes(80, 300_000);
    let layer_d = env.reg.put_blob(REPO, layer.clone());
    let config = blob_bytes(81, 500);
    let config_d = env.reg.put_blob(REPO, config.clone());
    let m = image_manifest(
        OCI_MANIFEST,
        (&config_d, config.len()),
        &[(&layer_d, layer.len())],
    );
    let m_d = env
        .reg
        .put_manifest(REPO, Some("3.20"), OCI_MANIFEST, m.clone());
    pull(proxy, &manifest_path(REPO, "3.20"))
        .await
        .assert_served(&m, "MISS", "manifest");
    let blobs = vec![(config_d, config), (layer_d, layer)];
    for (d, data) in &blobs {
        pull(proxy, &blob_path(REPO, d))
            .await
            .assert_served(data, "MISS", "blob");
        env.stored(d).await;
    }
    Pulled { m_d, m, blobs }
}

/// A GET through the proxy (intercepted), read to its end.
async fn pull(proxy: &Proxy, path: &str) -> Got {
    let mut client = proxy.intercepted(HUB, Alpn::Http11).await;
    let req = client.request(Method::GET, path, &[("accept", ACCEPT_ALL)]);
    read_response(client.send(req).await).await
}

/// An origin-form request to the proxy port.
async fn api(addr: SocketAddr, method: Method, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut client = HttpClient::plain_h1(addr, &addr.to_string()).await;
    let req = client.request(method, path, headers);
    read_response(client.send(req).await).await
}

fn json(got: &Got) -> serde_json::Value {
    serde_json::from_slice(&got.body).unwrap_or_else(|e| panic!("{e}: {}", got.brief()))
}

/// `regcache cache ARGS --cache-dir DIR`: (exit code, stdout, stderr).
fn cache_cli(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let dir = dir.to_str().unwrap();
    regcache_cli(&[&["cache"], args, &["--cache-dir", dir]].concat())
}

#[tokio::test]
async fn cache_commands_show_and_remove_while_the_proxy_serves() {
    let env = Env::new().await;
    let proxy = env.proxy().start().await;
    let p = pull_alpine(&env, &proxy).await;
    let (config_d, layer_d) = (&p.blobs[0].0, &p.blobs[1].0);
    let dir = env.cache_dir();

    let (code, out, err) = cache_cli(&dir, &["stats"]);
    assert_eq!(code, 0, "cache stats while serving: {err}");
    for line in [
        "entries:    3",
        "tags:       1",
        "misses:     3",
        "capacity:",
        "version:    0.1.0",
    ] {
        assert!(out.contains(line), "{line:?} in:\n{out}");
    }
    let (code, out, err) = cache_cli(&dir, &["ls"]);
    assert_eq!(code, 0, "cache ls while serving: {err}");
    assert!(
        out.contains(&format!("docker.io/library/alpine:3.20\t{}", p.m_d)),
        "{out}"
    );
    assert!(
        out.contains(&format!("{layer_d}\t293.0 KiB\tblob")),
        "{out}"
    );
    assert!(out.contains(&format!("{}\t", p.m_d)), "{out}");

    // rm by tag: the next pull of the tag is a miss, at once.
    let (code, out, err) = cache_cli(&dir, &["rm", "alpine:3.20"]);
    assert_eq!(code, 0, "cache rm while serving: {err}");
    assert!(
        out.contains("tag docker.io/library/alpine:3.20") && out.contains(&p.m_d),
        "{out}"
    );
    // The serving regcache forgot them at once: its numbers and listing say so.
    let (_, out, _) = cache_cli(&dir, &["stats"]);
    assert!(
        out.contains("entries:    2") && out.contains("tags:       0"),
        "{out}"
    );
    let (_, out, _) = cache_cli(&dir, &["ls"]);
    assert!(
        !out.contains("alpine:3.20") && !out.contains(&p.m_d),
        "{out}"
    );
    let manifest_gets = env.reg.count(Method::GET, &manifest_path(REPO, "3.20"));
    pull(&proxy, &manifest_path(REPO, "3.20"))
        .await
        .assert_served(&p.m, "MISS", "the manifest after cache rm");
    assert_eq!(
        env.reg.count(Method::GET, &manifest_path(REPO, "3.20")),
        manifest_gets + 1
    );
    // rm by digest: the file goes, the next pull is a miss.
    let (code, _, err) = cache_cli(&dir, &["rm", layer_d]);
    assert_eq!(code, 0, "{err}");
    assert!(!env.content_file(layer_d).exists());
    pull(&proxy, &blob_path(REPO, layer_d)).await.assert_served(
        &p.blobs[1].1,
        "MISS",
        "the layer after cache rm",
    );
    pull(&proxy, &blob_path(REPO, config_d))
        .await
        .assert_served(&p.blobs[0].1, "HIT", "the config, left alone");
    let (code, _, err) = cache_cli(&dir, &["rm", "ghcr.io/nobody/none:1"]);
    assert_eq!(code, 1);
    assert!(err.contains("is not cached"), "{err}");
    let (code, _, err) = cache_cli(&dir, &["rm", "Not A Ref!"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("neither a digest nor an image reference"),
        "{err}"
    );

    // purge: everything goes, the next pull is a miss.
    let (code, out, err) = cache_cli(&dir, &["purge"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("purged"), "{out}");
    assert!(!env.content_file(config_d).exists());
    let (_, out, _) = cache_cli(&dir, &["stats"]);
    assert!(out.contains("entries:    0"), "{out}");
    pull(&proxy, &blob_path(REPO, config_d))
        .await
        .assert_served(&p.blobs[0].1, "MISS", "the config after cache purge");

    // Stopped: the address file goes and the commands open the files again.
    proxy.stop().await;
    assert!(!dir.join("admin-api.addr").exists());
    let (code, out, err) = cache_cli(&dir, &["stats"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("entries:    1") && !out.contains("uptime"),
        "{out}"
    );
}

#[tokio::test]
async fn the_api_answers_json_and_refuses_wrong_methods_and_references() {
    let env = Env::new().await;
    let proxy = env.proxy().start().await;
    let p = pull_alpine(&env, &proxy).await;
    let addr = proxy.addr;

    let got = api(addr, Method::GET, "/api/v1/stats", &[]).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.brief());
    assert_eq!(
        got.header("content-type").as_deref(),
        Some("application/json")
    );
    let stats = json(&got);
    assert_eq!(stats["entries"], 3, "{stats}");
    assert_eq!(stats["tags"], 1, "{stats}");
    assert_eq!(stats["fills_in_progress"], 0, "{stats}");
    assert!(stats["capacity_bytes"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["uptime_seconds"].is_u64(), "{stats}");

    let images = json(&api(addr, Method::GET, "/api/v1/images", &[]).await);
    assert_eq!(images["tags"][0]["image"], "docker.io/library/alpine:3.20");
    assert_eq!(images["tags"][0]["digest"], p.m_d.as_str());
    let content = images["content"].as_array().unwrap();
    assert_eq!(content.len(), 3, "{images}");
    assert!(content
        .iter()
        .all(|c| c["last_used"].is_u64() && c["size"].is_u64()));

    for (method, path, status) in [
        (
            Method::POST,
            "/api/v1/stats",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::DELETE,
            "/api/v1/images",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (Method::GET, "/api/v1/purge", StatusCode::METHOD_NOT_ALLOWED),
        (
            Method::GET,
            "/api/v1/images/alpine:3.20",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::DELETE,
            "/api/v1/images/Not%20A%20Ref!",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::DELETE,
            "/api/v1/images/%FF%FE",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::DELETE,
            "/api/v1/images/busybox:1",
            StatusCode::NOT_FOUND,
        ),
        (Method::GET, "/api/v1/nothing", StatusCode::NOT_FOUND),
    ] {
        let got = api(addr, method.clone(), path, &[]).await;
        assert_eq!(got.status, status, "{method} {path}: {}", got.brief());
        assert!(
            json(&got)["error"].is_string(),
            "{method} {path}: {}",
            got.brief()
        );
    }
    let got = api(addr, Method::DELETE, "/api/v1/images/alpine:3.20", &[]).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.brief());
    let removed = json(&got);
    assert_eq!(removed["removed"][0], "tag docker.io/library/alpine:3.20");
    let got = api(addr, Method::POST, "/api/v1/purge", &[]).await;
    assert_eq!(json(&got)["entries"], 2, "{}", got.brief());
    assert_eq!(
        json(&api(addr, Method::GET, "/api/v1/stats", &[]).await)["entries"],
        0
    );

    let log = proxy.wait_for_log("admin API call").await;
    assert!(
        log.contains("path=\"/api/v1/purge\"") || log.contains("path=/api/v1/purge"),
        "every call is logged:\n{log}"
    );
    proxy.assert_healthy("the admin API calls").await;
}

#[tokio::test]
async fn with_proxy_users_the_api_keeps_its_own_rule() {
    let env = Env::new().await;
    let users = users_file(env.dir.path(), &[("ci", "pw")], 0o600);
    let proxy = env
        .proxy()
        .args(["--proxy-users", users.to_str().unwrap()])
        .start()
        .await;
    // Proxy users guard the proxy, not the API: loopback needs no credentials.
    let got = api(proxy.addr, Method::GET, "/api/v1/stats", &[]).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.brief());
    let (code, out, err) = cache_cli(&env.cache_dir(), &["stats"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("entries:    0"), "{out}");
    let got = api(proxy.addr, Method::GET, "/v2/", &[]).await;
    assert_eq!(
        got.status,
        StatusCode::PROXY_AUTHENTICATION_REQUIRED,
        "{}",
        got.brief()
    );
}

#[tokio::test]
async fn a_token_file_its_group_can_read_stops_regcache_at_start() {
    let env = Env::new().await;
    let token = write_file(env.dir.path(), "admin-token", "s3cret\n", 0o640);
    let (code, _, err) = regcache_cli(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--ca-dir",
        env.path("ca").to_str().unwrap(),
        "--cache-dir",
        env.cache_dir().to_str().unwrap(),
        "--admin-token-file",
        token.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("admin_token_file") && err.contains("chmod 600"),
        "{err}"
    );
}

/// A network namespace with a veth pair: the host side `host`, the
/// namespace side `peer`. Removed (with the pair) when dropped.
pub(crate) struct Netns {
    name: String,
    pub(crate) host: IpAddr,
    pub(crate) peer: IpAddr,
}

impl Netns {
    /// A namespace for this test, or None (with the reason printed) where
    /// namespaces cannot be made (not root, no `ip`).
    pub(crate) fn create() -> Option<Netns> {
        let id = std::process::id();
        let name = format!("rcadm{}", id % 100_000);
        let net = 16 + id % 200;
        let host: IpAddr = format!("10.213.{net}.1").parse().unwrap();
        let peer: IpAddr = format!("10.213.{net}.2").parse().unwrap();
        let (h, n) = (format!("{name}h"), format!("{name}n"));
        let ns = Netns { name, host, peer };
        let steps: Vec<Vec<String>> = [
            "netns add NS",
            "link add H type veth peer name N",
            "link set N netns NS",
            "addr add HOST/30 dev H",
            "link set H up",
            "-n NS addr add PEER/30 dev N",
            "-n NS link set N up",
            "-n NS link set lo up",
        ]
        .iter()
        .map(|s| {
            s.replace("NS", &ns.name)
                .replace("HOST", &host.to_string())
                .replace("PEER", &peer.to_string())
                .replace('H', &h)
                .replace(" N", &format!(" {n}"))
                .split(' ')
                .map(str::to_string)
                .collect()
        })
        .collect();
        for args in steps {
            let ok = Command::new("ip")
                .args(&args)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !ok {
                eprintln!(
                    "skipping the network-namespace check: ip {} failed",
                    args.join(" ")
                );
                return None;
            }
        }
        Some(ns)
    }

    /// `curl` from inside the namespace: (HTTP status, body).
    pub(crate) fn curl(&self, method: &str, url: &str, headers: &[&str]) -> (u16, String) {
        let mut args = vec!["--noproxy", "*"];
        for h in headers {
            args.extend(["-H", h]);
        }
        self.curl_with(method, url, &args)
    }

    /// `curl` from inside the namespace with these options (`--proxy URL`,
    /// say): (HTTP status, body).
    pub(crate) fn curl_with(&self, method: &str, url: &str, options: &[&str]) -> (u16, String) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, "curl", "-sS", "-X", method])
            .args(["-w", "\n%{http_code}"])
            .args(options);
        let out = cmd.arg(url).output().expect("run curl in the namespace");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[tokio::test]
async fn from_another_host_the_api_needs_the_token() {
    let Some(ns) = Netns::create() else {
        return;
    };
    let env = Env::new().await;
    let token = write_file(env.dir.path(), "admin-token", "s3cret-t0ken\n", 0o600);
    let allow = format!("{}/30", ns.host);
    let proxy = env
        .proxy()
        .listen_ip(ns.host)
        .args(["--allow", &allow])
        .args(["--admin-token-file", token.to_str().unwrap()])
        .start()
        .await;
    let p = pull_alpine(&env, &proxy).await;
    let stats = format!("http://{}/api/v1/stats", proxy.addr);

    // From the namespace: a peer that is not loopback.
    let (status, body) = ns.curl("GET", &stats, &[]);
    assert_eq!(status, 401, "{body}");
    let (status, body) = ns.curl("GET", &stats, &["Authorization: Bearer wrong"]);
    assert_eq!(status, 401, "{body}");
    let (status, body) = ns.curl("GET", &stats, &["Authorization: Bearer s3cret-t0ken"]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"entries\": 3"), "{body}");
    let url = format!("http://{}/api/v1/images/alpine:3.20", proxy.addr);
    let (status, _) = ns.curl("DELETE", &url, &[]);
    assert_eq!(status, 401);
    let (status, body) = ns.curl("DELETE", &url, &["Authorization: Bearer s3cret-t0ken"]);
    assert_eq!(status, 200, "{body}");
    let log = proxy.wait_for_log("access=\"unauthorized\"").await;
    assert!(
        log.contains(&ns.peer.to_string()),
        "the peer is logged:\n{log}"
    );

    // The command line on the host reaches the API on the veth address
    // (not loopback either): with the config's token file only.
    let dir = env.cache_dir();
    let (code, _, err) = cache_cli(&dir, &["ls"]);
    assert_eq!(code, 1);
    assert!(err.contains("set admin_token_file"), "{err}");
    let config = env.path("regcache.toml");
    std::fs::write(
        &config,
        format!("admin_token_file = {:?}\n", token.to_str().unwrap()),
    )
    .unwrap();
    let (code, out, err) = cache_cli(&dir, &["ls", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&p.blobs[1].0) && !out.contains("alpine:3.20"),
        "{out}"
    );
    drop(proxy);

    // Without a token file, a peer that is not loopback is refused (403).
    let proxy = env
        .proxy()
        .listen_ip(ns.host)
        .args(["--allow", &allow])
        .start()
        .await;
    let stats = format!("http://{}/api/v1/stats", proxy.addr);
    let (status, body) = ns.curl("GET", &stats, &["Authorization: Bearer s3cret-t0ken"]);
    assert_eq!(status, 403, "{body}");
    let (status, _) = ns.curl("GET", &format!("http://{}/healthz", proxy.addr), &[]);
    assert_eq!(status, 200, "the namespace reaches the proxy");
}
