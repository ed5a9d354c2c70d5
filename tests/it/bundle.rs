//! Air gap: `regcache export` and `regcache import`, end to end.
//!
//! Images are pulled through a real regcache from the in-process registry
//! ([`crate::support::registry`]), regcache is stopped, the cache is exported
//! to a bundle, and the bundle is imported into a fresh cache. A regcache started
//! on that cache, with the registry gone, must then serve every manifest and
//! blob as a HIT with the same bytes. A bundle with one flipped byte must be
//! rejected, naming the blob, with nothing imported.

use std::io::Read;
use std::path::Path;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use regcache::registry::media::{OCI_INDEX, OCI_MANIFEST};

use crate::support::auth::{Auth, Mode};
use crate::support::http::{basic, empty, read_response, Got};
use crate::support::pattern::blob_bytes;
use crate::support::proxy::{files_under, regcache_cli, users_file, Env, Proxy, ProxyBuilder};
use crate::support::registry::{oci_index, oci_manifest, sha256, ACCEPT_ALL, HUB, TEAM_CRED};
use crate::support::tls::Alpn;

/// regcache on `cache`, quick to stop.
fn regcache_on(env: &Env, cache: &Path) -> ProxyBuilder {
    env.proxy_on(cache).args(["--shutdown-grace", "2"])
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// GET `path` from the registry host through the proxy, on a fresh connection.
async fn get(proxy: &Proxy, path: &str) -> Got {
    get_with(proxy, path, None, None).await
}

/// What was pulled: (request path, bytes) of every manifest and blob.
type Pulled = Vec<(String, Bytes)>;

/// Puts two images in the registry and pulls them through `proxy`:
/// `alpine:3.20` (one platform) and `org/tool:1` (an index of two
/// platforms, of which one layer is never pulled). Returns what was pulled
/// and the layer left out.
async fn pull_two_images(env: &Env, proxy: &Proxy) -> (Pulled, String) {
    let mut pulled: Pulled = Vec::new();
    let blob = |pulled: &mut Pulled, repo: &str, data: Bytes| {
        let d = env.reg.put_blob(repo, data.clone());
        pulled.push((format!("/v2/{repo}/blobs/{d}"), data));
    };

    let alpine = "library/alpine";
    let (config, layer1, layer2) = (
        blob_bytes(1, 700),
        blob_bytes(2, 600_000),
        blob_bytes(3, 90_000),
    );
    let m = oci_manifest(&config, &[&layer1, &layer2]);
    for data in [&config, &layer1, &layer2] {
        blob(&mut pulled, alpine, data.clone());
    }
    let m_d = env
        .reg
        .put_manifest(alpine, Some("3.20"), OCI_MANIFEST, m.clone());
    pulled.push((format!("/v2/{alpine}/manifests/3.20"), m.clone()));
    pulled.push((format!("/v2/{alpine}/manifests/{m_d}"), m));

    let tool = "org/tool";
    let (amd_c, amd_l) = (blob_bytes(10, 500), blob_bytes(11, 300_000));
    let (arm_c, arm_l) = (blob_bytes(20, 500), blob_bytes(21, 200_000));
    let amd = oci_manifest(&amd_c, &[&amd_l]);
    let arm = oci_manifest(&arm_c, &[&arm_l]);
    for data in [&amd_c, &amd_l, &arm_c] {
        blob(&mut pulled, tool, data.clone());
    }
    let arm_l_d = env.reg.put_blob(tool, arm_l.clone());
    let amd_d = env.reg.put_manifest(tool, None, OCI_MANIFEST, amd.clone());
    let arm_d = env.reg.put_manifest(tool, None, OCI_MANIFEST, arm.clone());
    let index = oci_index(&[(&amd, "amd64"), (&arm, "arm64")]);
    let index_d = env
        .reg
        .put_manifest(tool, Some("1"), OCI_INDEX, index.clone());
    pulled.push((format!("/v2/{tool}/manifests/1"), index.clone()));
    pulled.push((format!("/v2/{tool}/manifests/{index_d}"), index));
    pulled.push((format!("/v2/{tool}/manifests/{amd_d}"), amd));
    pulled.push((format!("/v2/{tool}/manifests/{arm_d}"), arm));

    for (path, body) in &pulled {
        let got = get(proxy, path).await;
        assert_eq!(got.status, StatusCode::OK, "pull {path}");
        assert_eq!(got.body, *body, "pull {path}");
    }
    (pulled, arm_l_d)
}

/// The bundle's entries: name → bytes (small test bundles only).
fn entries(bundle: &Path) -> Vec<(String, Vec<u8>)> {
    let mut archive = tar::Archive::new(std::fs::File::open(bundle).unwrap());
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (name, data)
        })
        .collect()
}

#[tokio::test]
async fn exported_images_are_served_offline_from_a_fresh_cache() {
    let env = Env::new().await;
    let cache = env.path("cache");
    let proxy = regcache_on(&env, &cache).start().await;
    let (pulled, left_out) = pull_two_images(&env, &proxy).await;

    // A running regcache holds the cache: export says so.
    let bundle = env.path("bundle.tar");
    let (code, _, err) = regcache_cli(&["export", "-o", s(&bundle), "--cache-dir", s(&cache)]);
    assert_ne!(code, 0);
    assert!(err.contains("stop it first"), "{err}");
    proxy.stop().await;

    let (code, out, err) =
        regcache_cli(&["export", "--output", s(&bundle), "--cache-dir", s(&cache)]);
    assert_eq!(code, 0, "export failed: {err}");
    assert!(
        out.contains("exported 2 images (4 manifests, 6 blobs"),
        "{out}"
    );
    assert!(
        out.contains("1 item not in the cache was left out"),
        "{out}"
    );
    assert!(err.contains(&left_out), "the missing layer is named: {err}");
    assert!(
        !err.contains('\r') && !err.contains('\u{1b}'),
        "no progress bar in a log: {err:?}"
    );
    assert!(!env.path("bundle.tar.partial").exists());

    // The bundle is an OCI image layout naming both images.
    let files = entries(&bundle);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"oci-layout"));
    assert!(names.contains(&"index.json"));
    assert!(names
        .iter()
        .all(
            |n| ["oci-layout", "index.json", "blobs/", "blobs/sha256/"].contains(n)
                || n.starts_with("blobs/sha256/")
        ));
    let index = &files.iter().find(|(n, _)| n == "index.json").unwrap().1;
    let index: serde_json::Value = serde_json::from_slice(index).unwrap();
    let refs: Vec<(&str, &str)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let a = &d["annotations"];
            (
                a["io.regcache.ref"].as_str().unwrap(),
                a["org.opencontainers.image.ref.name"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["annotations"]["io.regcache.public"] == "true"),
        "both repositories were pulled anonymously, so public: {index}"
    );
    assert_eq!(
        refs,
        [
            ("docker.io/library/alpine:3.20", "3.20"),
            ("docker.io/org/tool:1", "1")
        ]
    );
    // Every blob's bytes match its name.
    for (name, data) in &files {
        if let Some(hex) = name.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
            assert_eq!(sha256(data), format!("sha256:{hex}"), "{name}");
        }
    }

    // Exporting by name: one image, by tag or by digest.
    let one = env.path("one.tar");
    let (code, out, err) = regcache_cli(&[
        "export",
        "-o",
        s(&one),
        "--cache-dir",
        s(&cache),
        "alpine:3.20",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("exported 1 image (1 manifests, 3 blobs"),
        "{out}"
    );
    let tool_index = pulled
        .iter()
        .find_map(|(p, _)| p.strip_prefix("/v2/org/tool/manifests/sha256:"))
        .map(|hex| format!("sha256:{hex}"))
        .unwrap();
    let by_digest = format!("registry-1.docker.io/org/tool@{tool_index}");
    let (code, out, err) = regcache_cli(&[
        "export",
        "-o",
        s(&one),
        "--cache-dir",
        s(&cache),
        &by_digest,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("docker.io/org/tool@{tool_index}")),
        "{out}"
    );
    let (code, _, err) = regcache_cli(&[
        "export",
        "-o",
        s(&one),
        "--cache-dir",
        s(&cache),
        "alpine:9",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("docker.io/library/alpine:9 is not cached"),
        "{err}"
    );
    let (code, _, err) = regcache_cli(&[
        "export",
        "-o",
        s(&one),
        "--cache-dir",
        s(&cache),
        "Bad//Name",
    ]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // Other tools read the bundle (where skopeo is installed).
    if std::process::Command::new("skopeo")
        .arg("--version")
        .output()
        .is_ok()
    {
        let raw = std::process::Command::new("skopeo")
            .args([
                "inspect",
                "--raw",
                &format!("oci-archive:{}:3.20", s(&bundle)),
            ])
            .output()
            .unwrap();
        assert!(
            raw.status.success(),
            "{}",
            String::from_utf8_lossy(&raw.stderr)
        );
        assert_eq!(raw.stdout, alpine_manifest(&pulled));
    }

    // Import into a fresh cache, then serve it with the registry gone.
    let fresh = env.path("fresh");
    let (code, out, err) = regcache_cli(&["import", s(&bundle), "--cache-dir", s(&fresh)]);
    assert_eq!(code, 0, "import failed: {err}");
    assert!(
        out.contains("imported 2 images (4 manifests, 6 blobs"),
        "{out}"
    );
    assert!(out.contains("1 item was not in the bundle"), "{out}");
    env.reg.stop().await;
    let upstream_seen = env.reg.seen().len();
    let proxy = regcache_on(&env, &fresh).start().await;
    for (path, body) in &pulled {
        let got = get(&proxy, path).await;
        assert_eq!(
            got.status,
            StatusCode::OK,
            "offline {path}; stderr:\n{}",
            proxy.stderr()
        );
        assert_eq!(got.x_cache(), "HIT", "offline {path}");
        assert_eq!(got.body, *body, "offline {path}");
    }
    // The serving regcache holds the cache: import says so.
    let (code, _, err) = regcache_cli(&["import", s(&bundle), "--cache-dir", s(&fresh)]);
    assert_eq!(code, 1);
    assert!(err.contains("stop it first"), "{err}");
    let missing = get(&proxy, &format!("/v2/org/tool/blobs/{left_out}")).await;
    assert_ne!(
        missing.status,
        StatusCode::OK,
        "the layer never pulled is not there"
    );
    assert_eq!(env.reg.seen().len(), upstream_seen);
}

/// The manifest of alpine:3.20 as pulled.
fn alpine_manifest(pulled: &Pulled) -> Vec<u8> {
    pulled
        .iter()
        .find(|(p, _)| p.ends_with("/manifests/3.20"))
        .unwrap()
        .1
        .to_vec()
}

#[tokio::test]
async fn a_bundle_with_one_flipped_byte_is_rejected_whole() {
    let env = Env::new().await;
    let cache = env.path("cache");
    let proxy = regcache_on(&env, &cache).start().await;
    let (pulled, _) = pull_two_images(&env, &proxy).await;
    proxy.stop().await;
    let bundle = env.path("bundle.tar");
    let (code, _, err) = regcache_cli(&["export", "-o", s(&bundle), "--cache-dir", s(&cache)]);
    assert_eq!(code, 0, "{err}");

    // Flip one byte in the middle of alpine's big layer.
    let layer = &pulled[1];
    let layer_d = layer.0.rsplit('/').next().unwrap().to_string();
    let name = format!("blobs/sha256/{}", layer_d.strip_prefix("sha256:").unwrap());
    let mut archive = tar::Archive::new(std::fs::File::open(&bundle).unwrap());
    let offset = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.path().unwrap().to_str() == Some(name.as_str()))
        .expect("the layer is in the bundle")
        .raw_file_position();
    let mut bytes = std::fs::read(&bundle).unwrap();
    bytes[offset as usize + 300_000] ^= 0x20;
    std::fs::write(&bundle, &bytes).unwrap();

    let fresh = env.path("fresh");
    let (code, out, err) = regcache_cli(&["import", s(&bundle), "--cache-dir", s(&fresh)]);
    assert_eq!(code, 1, "a corrupt bundle must fail: {out}");
    assert!(err.contains(&layer_d), "the message names the blob: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let (code, stats, err) = regcache_cli(&["cache", "stats", "--cache-dir", s(&fresh)]);
    assert_eq!(code, 0, "{err}");
    assert!(stats.contains("entries:    0"), "{stats}");
    assert!(stats.contains("tags:       0"), "{stats}");
    assert!(files_under(&fresh.join("blobs")).is_empty());
    assert!(files_under(&fresh.join("tmp")).is_empty());

    // The bundle as exported imports fine into the same cache afterwards.
    bytes[offset as usize + 300_000] ^= 0x20;
    std::fs::write(&bundle, &bytes).unwrap();
    let (code, _, err) = regcache_cli(&["import", s(&bundle), "--cache-dir", s(&fresh)]);
    assert_eq!(code, 0, "{err}");
}

// ---------------------------------------------------------------------------
// Private images: export leaves them out, offline serving guards them
// ---------------------------------------------------------------------------

const ALICE_PW: &str = "alice-pw-4f1e";
const SECRET_REPO: &str = "team/secret";

/// An image of `repo:tag` in the registry: (paths and bytes to pull,
/// manifest digest).
fn put_image(env: &Env, repo: &str, tag: &str, seed: u64) -> (Pulled, String) {
    let (config, layer) = (blob_bytes(seed, 600), blob_bytes(seed + 1, 200_000));
    let mut pulled: Pulled = Vec::new();
    for data in [&config, &layer] {
        let d = env.reg.put_blob(repo, data.clone());
        pulled.push((format!("/v2/{repo}/blobs/{d}"), data.clone()));
    }
    let m = oci_manifest(&config, &[&layer]);
    let m_d = env
        .reg
        .put_manifest(repo, Some(tag), OCI_MANIFEST, m.clone());
    pulled.push((format!("/v2/{repo}/manifests/{tag}"), m.clone()));
    pulled.push((format!("/v2/{repo}/manifests/{m_d}"), m));
    (pulled, m_d)
}

/// A response to GET `path` with optional `Authorization` and
/// `Proxy-Authorization` (on the CONNECT).
async fn get_with(proxy: &Proxy, path: &str, auth: Option<&str>, proxy_auth: Option<&str>) -> Got {
    let mut client = proxy.intercepted_as(HUB, Alpn::Both, proxy_auth).await;
    let mut b = client
        .builder(Method::GET, path)
        .header("accept", ACCEPT_ALL);
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    let got = read_response(client.send(b.body(empty()).unwrap()).await).await;
    assert!(
        got.error.is_none(),
        "GET {path}: body failed: {:?}",
        got.error
    );
    got
}

/// Asserts every item of `pulled` is served (200, same bytes) or refused (403).
async fn assert_offline(
    proxy: &Proxy,
    pulled: &Pulled,
    proxy_auth: Option<&str>,
    served: bool,
    what: &str,
) {
    for (path, body) in pulled {
        let got = get_with(proxy, path, None, proxy_auth).await;
        if served {
            assert_eq!(
                got.status,
                StatusCode::OK,
                "{what}: {path}; stderr:\n{}",
                proxy.stderr()
            );
            assert_eq!(got.body, *body, "{what}: {path}");
            assert_eq!(got.x_cache(), "HIT", "{what}: {path}");
        } else {
            assert_eq!(got.status, StatusCode::FORBIDDEN, "{what}: {path}");
            assert!(
                !got.body
                    .windows(body.len().min(64))
                    .any(|w| w == &body[..body.len().min(64)]),
                "{what}: {path}: refused without the content"
            );
        }
    }
}

fn bundle_index(bundle: &Path) -> serde_json::Value {
    let files = entries(bundle);
    let index = &files.iter().find(|(n, _)| n == "index.json").unwrap().1;
    serde_json::from_slice(index).unwrap()
}

#[tokio::test]
async fn private_images_stay_out_of_bundles_and_offline_serves_them_only_to_proxy_users() {
    let env = Env::new().await;
    let auth = Auth::new(Mode::Basic);
    auth.user("alice", ALICE_PW, &[SECRET_REPO])
        .public("library/alpine");
    env.reg.set_hook(auth.registry_hook());
    let (public, _) = put_image(&env, "library/alpine", "3.20", 30);
    let (secret, secret_m) = put_image(&env, SECRET_REPO, "1", 40);
    let alice = basic("alice", ALICE_PW);

    let cache = env.path("cache");
    let proxy = regcache_on(&env, &cache).start().await;
    for (path, body) in &public {
        let got = get_with(&proxy, path, None, None).await;
        assert_eq!(
            (got.status, &got.body),
            (StatusCode::OK, body),
            "public {path}"
        );
    }
    for (path, body) in &secret {
        let anon = get_with(&proxy, path, None, None).await;
        assert_eq!(
            anon.status,
            StatusCode::UNAUTHORIZED,
            "sanity: {path} is private"
        );
        let got = get_with(&proxy, path, Some(&alice), None).await;
        assert_eq!(
            (got.status, &got.body),
            (StatusCode::OK, body),
            "alice {path}"
        );
    }
    proxy.stop().await;

    // Without --include-private: only the public image, and stderr says which
    // image was left out and why.
    let bundle = env.path("public.tar");
    let (code, out, err) = regcache_cli(&["export", "-o", s(&bundle), "--cache-dir", s(&cache)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("exported 1 image"), "{out}");
    assert!(
        out.contains("1 private image left out (--include-private"),
        "{out}"
    );
    assert!(
        err.contains("left out docker.io/team/secret:1: docker.io/team/secret is"),
        "{err}"
    );
    let names: Vec<String> = entries(&bundle).into_iter().map(|(n, _)| n).collect();
    for (path, _) in &secret {
        if let Some(d) = path
            .rsplit('/')
            .next()
            .and_then(|d| d.strip_prefix("sha256:"))
        {
            assert!(
                !names.iter().any(|n| n.ends_with(d)),
                "the private {path} is not in the bundle: {names:?}"
            );
        }
    }
    let raw = std::fs::read(&bundle).unwrap();
    for needle in ["team/secret", ALICE_PW, alice.as_str()] {
        assert!(
            !raw.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "the bundle records nothing of {needle:?}"
        );
    }
    let index = bundle_index(&bundle);
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1, "{index}");
    assert_eq!(
        index["manifests"][0]["annotations"]["io.regcache.public"],
        "true"
    );

    // Asking for the private image by name does not export it either.
    let (code, _, err) = regcache_cli(&[
        "export",
        "-o",
        s(&bundle),
        "--cache-dir",
        s(&cache),
        "team/secret:1",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("not known to be public; --include-private"),
        "{err}"
    );

    // With --include-private: both, said on stderr, the private one marked.
    let both = env.path("both.tar");
    let (code, out, err) = regcache_cli(&[
        "export",
        "--include-private",
        "-o",
        s(&both),
        "--cache-dir",
        s(&cache),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("exported 2 images") && out.contains("1 private image included"),
        "{out}"
    );
    assert!(
        err.contains("including private image docker.io/team/secret:1"),
        "{err}"
    );
    let index = bundle_index(&both);
    let marked: Vec<(String, String)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let a = &d["annotations"];
            (
                a["io.regcache.ref"].as_str().unwrap().to_string(),
                a["io.regcache.public"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        marked,
        [
            (
                "docker.io/library/alpine:3.20".to_string(),
                "true".to_string()
            ),
            ("docker.io/team/secret:1".to_string(), "false".to_string()),
        ]
    );

    // Imported into a fresh cache and served offline with the registry gone.
    let fresh = env.path("fresh");
    let (code, _, err) = regcache_cli(&["import", s(&both), "--cache-dir", s(&fresh)]);
    assert_eq!(code, 0, "{err}");
    env.reg.stop().await;
    let proxy = regcache_on(&env, &fresh).arg("--offline").start().await;
    assert_offline(&proxy, &public, None, true, "public, anonymous").await;
    assert_offline(&proxy, &secret, None, false, "private, anonymous").await;
    // A registry credential cannot be checked offline: still refused.
    let got = get_with(
        &proxy,
        &format!("/v2/{SECRET_REPO}/manifests/{secret_m}"),
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(got.status, StatusCode::FORBIDDEN);
    // The same answer for a repository that is not cached at all.
    let got = get_with(&proxy, "/v2/team/other/manifests/1", None, None).await;
    assert_eq!(got.status, StatusCode::FORBIDDEN);
    assert!(
        proxy.stderr().contains("not known public"),
        "the log names the rule: {}",
        proxy.stderr()
    );
    proxy.stop().await;

    // offline_share_private = true: the operator shares everything cached.
    let proxy = regcache_on(&env, &fresh)
        .args(["--offline", "--offline-share-private"])
        .start()
        .await;
    assert_offline(&proxy, &secret, None, true, "private, shared by config").await;
    proxy.stop().await;

    // Proxy users: the authenticated user gets the private image.
    let users = users_file(env.dir.path(), &[("carol", "carol-pw")], 0o600);
    let proxy = regcache_on(&env, &fresh)
        .args(["--offline", "--proxy-users", s(&users)])
        .start()
        .await;
    let carol = basic("carol", "carol-pw");
    assert_offline(&proxy, &secret, Some(&carol), true, "private, proxy user").await;
    assert_offline(&proxy, &public, Some(&carol), true, "public, proxy user").await;
    proxy.stop().await;
}

/// A manifest in a public repository naming the digests of someone else's
/// private image: exporting it carries none of the private bytes (the proxy
/// would not serve them through that repository either).
#[tokio::test]
async fn export_leaves_out_private_digests_a_public_manifest_names() {
    let env = Env::new().await;
    env.reg.guard_team();
    let (config, layer) = (blob_bytes(40, 700), blob_bytes(41, 200_000));
    let secret = oci_manifest(&config, &[&layer]);
    for data in [&config, &layer] {
        env.reg.put_blob("team/secret", data.clone());
    }
    let secret_d = env
        .reg
        .put_manifest("team/secret", Some("1"), OCI_MANIFEST, secret.clone());
    // The attacker's image: their own config, the private layer as theirs.
    let own = blob_bytes(42, 500);
    env.reg.put_blob("attacker/pub", own.clone());
    let hostile = oci_manifest(&own, &[&layer]);
    env.reg
        .put_manifest("attacker/pub", Some("evil"), OCI_MANIFEST, hostile.clone());

    let cache = env.path("cache");
    let proxy = regcache_on(&env, &cache).start().await;
    let secret_paths = [
        format!("/v2/team/secret/manifests/{secret_d}"),
        format!("/v2/team/secret/blobs/{}", sha256(&config)),
        format!("/v2/team/secret/blobs/{}", sha256(&layer)),
    ];
    for path in &secret_paths {
        let mut client = proxy.intercepted(HUB, Alpn::Both).await;
        let req = client
            .builder(Method::GET, path)
            .header("accept", ACCEPT_ALL)
            .header("authorization", TEAM_CRED)
            .body(empty())
            .unwrap();
        assert_eq!(client.send(req).await.status(), StatusCode::OK, "{path}");
    }
    for path in [
        "/v2/attacker/pub/manifests/evil".to_string(),
        format!("/v2/attacker/pub/blobs/{}", sha256(&own)),
    ] {
        let got = get(&proxy, &path).await;
        assert_eq!(got.status, StatusCode::OK, "{path}");
    }
    proxy.stop().await;

    let bundle = env.path("evil.tar");
    let (code, out, err) = regcache_cli(&[
        "export",
        "-o",
        s(&bundle),
        "--cache-dir",
        s(&cache),
        "attacker/pub:evil",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&sha256(&layer)) && err.contains("not linked to its repository"),
        "the private layer is named as left out: {err}"
    );
    assert!(
        out.contains("1 item not in the cache was left out"),
        "{out}"
    );
    let private_layer = blob_name(&sha256(&layer));
    for (name, data) in entries(&bundle) {
        assert_ne!(name, private_layer, "the private layer is in the bundle");
        assert!(
            data.len() < layer.len() || data[..64] != layer[..64],
            "{name} holds the private layer's bytes"
        );
    }
}

/// `blobs/<alg>/<hex>`, a digest's name in an OCI layout.
fn blob_name(digest: &str) -> String {
    let (alg, hex) = digest.split_once(':').unwrap();
    format!("blobs/{alg}/{hex}")
}

/// `--include-private` puts a private image (team/secret) and an attacker's
/// public image (attacker/pub) whose manifest names the private layer into
/// one bundle. The bundle carries the layer for team/secret, but export
/// records it as withheld from attacker/pub, and import never links it
/// there: after import, no anonymous client reads the private layer through
/// attacker/pub, offline or with the registry unreachable. The private
/// image still reaches its proxy users, and a base layer legitimately
/// shared by a public image (library/base) and a private one (team/app) is
/// still linked to the public image.
#[tokio::test]
async fn a_hostile_public_manifest_in_a_bundle_with_the_private_image_gets_no_link_to_its_layer() {
    let env = Env::new().await;
    env.reg.guard_team();
    // The private image, and the attacker's image naming its layer.
    let (config, layer) = (blob_bytes(50, 700), blob_bytes(51, 200_000));
    let secret = oci_manifest(&config, &[&layer]);
    for data in [&config, &layer] {
        env.reg.put_blob("team/secret", data.clone());
    }
    let secret_d = env
        .reg
        .put_manifest("team/secret", Some("1"), OCI_MANIFEST, secret.clone());
    let own = blob_bytes(52, 500);
    env.reg.put_blob("attacker/pub", own.clone());
    let hostile = oci_manifest(&own, &[&layer]);
    let hostile_d =
        env.reg
            .put_manifest("attacker/pub", Some("evil"), OCI_MANIFEST, hostile.clone());
    // A public base image and a private image built on it.
    let (base_c, base_l) = (blob_bytes(60, 600), blob_bytes(61, 150_000));
    let (app_c, app_l) = (blob_bytes(62, 600), blob_bytes(63, 100_000));
    let base = oci_manifest(&base_c, &[&base_l]);
    let app = oci_manifest(&app_c, &[&base_l, &app_l]);
    for data in [&base_c, &base_l] {
        env.reg.put_blob("library/base", data.clone());
    }
    for data in [&app_c, &base_l, &app_l] {
        env.reg.put_blob("team/app", data.clone());
    }
    let base_d = env
        .reg
        .put_manifest("library/base", Some("1"), OCI_MANIFEST, base.clone());
    let app_d = env
        .reg
        .put_manifest("team/app", Some("1"), OCI_MANIFEST, app.clone());

    let secret_pulled: Pulled = vec![
        ("/v2/team/secret/manifests/1".into(), secret.clone()),
        (format!("/v2/team/secret/manifests/{secret_d}"), secret),
        (format!("/v2/team/secret/blobs/{}", sha256(&config)), config),
        (
            format!("/v2/team/secret/blobs/{}", sha256(&layer)),
            layer.clone(),
        ),
    ];
    let app_pulled: Pulled = vec![
        ("/v2/team/app/manifests/1".into(), app.clone()),
        (format!("/v2/team/app/manifests/{app_d}"), app),
        (format!("/v2/team/app/blobs/{}", sha256(&app_c)), app_c),
        (
            format!("/v2/team/app/blobs/{}", sha256(&base_l)),
            base_l.clone(),
        ),
        (format!("/v2/team/app/blobs/{}", sha256(&app_l)), app_l),
    ];
    let public_pulled: Pulled = vec![
        ("/v2/library/base/manifests/1".into(), base.clone()),
        (format!("/v2/library/base/manifests/{base_d}"), base),
        (
            format!("/v2/library/base/blobs/{}", sha256(&base_c)),
            base_c,
        ),
        (
            format!("/v2/library/base/blobs/{}", sha256(&base_l)),
            base_l,
        ),
        ("/v2/attacker/pub/manifests/evil".into(), hostile.clone()),
        (format!("/v2/attacker/pub/manifests/{hostile_d}"), hostile),
        (format!("/v2/attacker/pub/blobs/{}", sha256(&own)), own),
    ];

    let cache = env.path("cache");
    let proxy = regcache_on(&env, &cache).start().await;
    for (path, body) in secret_pulled.iter().chain(&app_pulled) {
        let got = get_with(&proxy, path, Some(TEAM_CRED), None).await;
        assert_eq!((got.status, &got.body), (StatusCode::OK, body), "{path}");
    }
    for (path, body) in &public_pulled {
        let got = get(&proxy, path).await;
        assert_eq!((got.status, &got.body), (StatusCode::OK, body), "{path}");
    }
    let evil_layer = format!("/v2/attacker/pub/blobs/{}", sha256(&layer));
    let got = get(&proxy, &evil_layer).await;
    assert_ne!(got.status, StatusCode::OK, "sanity: online, no link yet");
    proxy.stop().await;

    // The private image first, so its layer is written before the
    // attacker's image is walked.
    let bundle = env.path("both.tar");
    let (code, _, err) = regcache_cli(&[
        "export",
        "--include-private",
        "-o",
        s(&bundle),
        "--cache-dir",
        s(&cache),
        "team/secret:1",
        "team/app:1",
        "library/base:1",
        "attacker/pub:evil",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!(
            "{} is named by docker.io/attacker/pub:evil but not linked",
            sha256(&layer)
        )),
        "{err}"
    );
    let names: Vec<String> = entries(&bundle).into_iter().map(|(n, _)| n).collect();
    assert!(
        names.contains(&blob_name(&sha256(&layer))),
        "the bundle carries the private layer for team/secret: {names:?}"
    );
    let index = bundle_index(&bundle);
    let withheld: Vec<(String, String)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let a = &d["annotations"];
            (
                a["io.regcache.ref"].as_str().unwrap().to_string(),
                a["io.regcache.withheld"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        withheld,
        [
            ("docker.io/team/secret:1".to_string(), String::new()),
            ("docker.io/team/app:1".to_string(), String::new()),
            ("docker.io/library/base:1".to_string(), String::new()),
            ("docker.io/attacker/pub:evil".to_string(), sha256(&layer)),
        ]
    );

    let fresh = env.path("fresh");
    let (code, out, err) = regcache_cli(&["import", s(&bundle), "--cache-dir", s(&fresh)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 digest not linked"), "{out}");
    assert!(err.contains("withheld"), "{err}");
    env.reg.stop().await;

    let refused = |got: &Got, what: &str| {
        assert_ne!(got.status, StatusCode::OK, "{what}");
        assert!(
            !got.body.windows(64).any(|w| w == &layer[..64]),
            "{what}: not the private bytes"
        );
    };
    let users = users_file(env.dir.path(), &[("carol", "carol-pw")], 0o600);
    let carol = basic("carol", "carol-pw");

    // Offline: public content to everyone, the private layer not through
    // attacker/pub, the private images to nobody anonymous.
    let proxy = regcache_on(&env, &fresh).arg("--offline").start().await;
    refused(&get(&proxy, &evil_layer).await, "offline, anonymous");
    assert_offline(&proxy, &public_pulled, None, true, "public, anonymous").await;
    assert_offline(&proxy, &secret_pulled, None, false, "private, anonymous").await;
    proxy.stop().await;

    // Offline with proxy users: carol gets the private images, and still
    // not the private layer through attacker/pub (it is not linked there).
    let proxy = regcache_on(&env, &fresh)
        .args(["--offline", "--proxy-users", s(&users)])
        .start()
        .await;
    assert_offline(
        &proxy,
        &secret_pulled,
        Some(&carol),
        true,
        "private, proxy user",
    )
    .await;
    assert_offline(
        &proxy,
        &app_pulled,
        Some(&carol),
        true,
        "private app, proxy user",
    )
    .await;
    assert_offline(
        &proxy,
        &public_pulled,
        Some(&carol),
        true,
        "public, proxy user",
    )
    .await;
    refused(
        &get_with(&proxy, &evil_layer, None, Some(&carol)).await,
        "offline, proxy user",
    );
    proxy.stop().await;

    // Online with the registry gone: the same.
    let proxy = regcache_on(&env, &fresh).start().await;
    refused(&get(&proxy, &evil_layer).await, "registry unreachable");
    let base_layer = &public_pulled[3];
    let got = get(&proxy, &base_layer.0).await;
    assert_eq!(
        (got.status, &got.body, got.x_cache().as_str()),
        (StatusCode::OK, &base_layer.1, "HIT"),
        "the shared base layer is linked to library/base"
    );
    proxy.stop().await;
}
