//! The status page (`GET /` with `Accept: text/html`) after pulls through
//! the in-process registry: the hit ratio, the upstream's state, the most
//! requested images, recent refusals; names from clients escaped; the top
//! list and the ring bounded; the one-line hint for clients that are not
//! browsers; and the admin API's access rule (tried from a network
//! namespace).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::Method;
use regcache::registry::media::OCI_MANIFEST;

use crate::admin::Netns;
use crate::support::http::{raw, read_response, Got, HttpClient};
use crate::support::pattern::blob_bytes;
use crate::support::proxy::{write_file, Env, Proxy};
use crate::support::registry::{blob_path, manifest_path, oci_manifest, Fault, ACCEPT_ALL, HUB};
use crate::support::tls::Alpn;

/// What Chromium sends as `Accept` for a page.
const BROWSER_ACCEPT: &str =
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";

/// A GET through the proxy (intercepted), read to its end.
async fn pull(proxy: &Proxy, path: &str) -> Got {
    let mut client = proxy.intercepted(HUB, Alpn::Http11).await;
    let req = client.request(Method::GET, path, &[("accept", ACCEPT_ALL)]);
    read_response(client.send(req).await).await
}

/// `GET /` on the proxy port with `headers`.
async fn root(addr: SocketAddr, headers: &[(&str, &str)]) -> Got {
    let mut client = HttpClient::plain_h1(addr, &addr.to_string()).await;
    let req = client.request(Method::GET, "/", headers);
    read_response(client.send(req).await).await
}

/// The status page, once it contains every one of `want` (requests are
/// recorded when their response ends on regcache's side, a moment after
/// the client read it); panics with the last page after 10 s.
async fn page_with(addr: SocketAddr, want: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = root(addr, &[("accept", BROWSER_ACCEPT)]).await;
        assert_eq!(got.status, 200, "{}", got.brief());
        assert_eq!(
            got.header("content-type").as_deref(),
            Some("text/html; charset=utf-8")
        );
        let page = got.text();
        let missing: Vec<&&str> = want.iter().filter(|w| !page.contains(**w)).collect();
        if missing.is_empty() {
            return page;
        }
        if Instant::now() > deadline {
            panic!("{missing:?} missing from the status page:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The rows of the page's table `id`.
fn rows(page: &str, id: &str) -> usize {
    let Some(start) = page.find(&format!("<table id=\"{id}\">")) else {
        return 0;
    };
    let table = &page[start..];
    let end = table.find("</table>").unwrap_or(table.len());
    table[..end].matches("<tr>").count() - table[..end].matches("<thead>").count()
}

#[tokio::test]
async fn after_pulls_the_page_shows_hit_ratio_upstream_and_images_escaped_and_bounded() {
    let env = Env::new().await;
    let layer = blob_bytes(90, 200_000);
    let layer_d = env.reg.put_blob("library/alpine", layer.clone());
    let m = oci_manifest(b"config", &[&layer]);
    env.reg
        .put_manifest("library/alpine", Some("3.20"), OCI_MANIFEST, m.clone());
    // Twelve more images, pulled once each: the page lists ten.
    for i in 0..12 {
        let repo = format!("team/app{i:02}");
        let m = oci_manifest(format!("config {i}").as_bytes(), &[]);
        env.reg.put_manifest(&repo, Some("1"), OCI_MANIFEST, m);
    }
    let proxy = env.proxy().start().await;

    // Not a browser: today's one-line hint, whatever else it accepts.
    for headers in [
        &[][..],
        &[("accept", "*/*")][..],
        &[("accept", "application/json")][..],
    ] {
        let got = root(proxy.addr, headers).await;
        assert_eq!(got.status, 404, "{headers:?}: {}", got.brief());
        assert!(
            got.text().contains("regcache is a proxy: set HTTPS_PROXY"),
            "{}",
            got.brief()
        );
    }
    // Before any pull: an empty page, not an error.
    page_with(
        proxy.addr,
        &["No upstream registry contacted yet.", "No pulls yet."],
    )
    .await;

    let manifest_at = manifest_path("library/alpine", "3.20");
    let blob_at = blob_path("library/alpine", &layer_d);
    pull(&proxy, &manifest_at)
        .await
        .assert_served(&m, "MISS", "manifest");
    pull(&proxy, &blob_at)
        .await
        .assert_served(&layer, "MISS", "blob");
    for i in 0..2 {
        pull(&proxy, &manifest_at)
            .await
            .assert_served(&m, "HIT", &format!("manifest {i}"));
        pull(&proxy, &blob_at)
            .await
            .assert_served(&layer, "HIT", &format!("blob {i}"));
    }
    // 4 hits of 6: 66.7%; the hits' bytes are the bytes saved.
    let saved = 2 * (m.len() + layer.len());
    let page = page_with(
        proxy.addr,
        &[
            "id=\"hit-ratio-today\">66.7%<",
            "id=\"hit-ratio-start\">66.7%<",
            "<td class=\"host\">docker.io</td><td class=\"up\">up</td>",
            "docker.io/library/alpine</td><td class=\"num\">3<",
        ],
    )
    .await;
    let saved_text = bytesize::ByteSize::b(saved as u64)
        .display()
        .iec()
        .to_string();
    assert!(
        page.contains(&format!("id=\"saved-today\">{saved_text}<")),
        "{saved_text} saved:\n{page}"
    );
    assert!(page.contains(&format!(
        "version <span id=\"version\">{}<",
        env!("CARGO_PKG_VERSION")
    )));

    for i in 0..12 {
        let got = pull(&proxy, &manifest_path(&format!("team/app{i:02}"), "1")).await;
        assert_eq!(got.status, 200, "{}", got.brief());
    }
    // Sixty refusals: the ring keeps fifty.
    for _ in 0..60 {
        let resp = raw(
            proxy.addr,
            b"CONNECT 127.0.0.1:25 HTTP/1.1\r\nHost: 127.0.0.1:25\r\n\r\n",
        )
        .await;
        assert_eq!(resp.status, 403, "{}", resp.head);
    }
    // Then a repository name a client chose, with the characters a path may
    // carry unencoded that HTML must not ("<" and ">" cannot reach a path).
    let hostile = "x\"onmouseover='alert(1)'&amp";
    let got = pull(&proxy, &format!("/v2/{hostile}/manifests/1")).await;
    assert!(got.status.is_client_error(), "{}", got.brief());
    let page = page_with(
        proxy.addr,
        &[
            "docker.io/library/alpine</td><td class=\"num\">3<",
            "<td class=\"name\">127.0.0.1:25</td>",
            "x&quot;onmouseover=&#39;alert(1)&#39;&amp;amp",
        ],
    )
    .await;
    assert!(!page.contains(hostile), "the name is escaped:\n{page}");
    assert!(!page.contains("onmouseover='"), "{page}");
    assert_eq!(rows(&page, "top"), 10, "ten most requested:\n{page}");
    assert!(page.contains("13 names counted"), "{page}");
    assert_eq!(rows(&page, "recent"), 50, "the last fifty events:\n{page}");
    assert_eq!(page.matches("127.0.0.1:25").count(), 49, "{page}");
}

#[tokio::test]
async fn from_another_host_the_page_needs_the_admin_token() {
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
    let url = format!("http://{}/", proxy.addr);
    let html = "Accept: text/html";
    let (status, body) = ns.curl("GET", &url, &[html]);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("shows image names") && body.contains("admin_token_file"),
        "{body}"
    );
    assert!(!body.contains("hit-ratio"), "{body}");
    let (status, body) = ns.curl("GET", &url, &[html, "Authorization: Bearer wrong"]);
    assert_eq!(status, 403, "{body}");
    let (status, body) = ns.curl("GET", &url, &[html, "Authorization: Bearer s3cret-t0ken"]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("id=\"hit-ratio-today\""), "{body}");
    // curl as it is: the hint, as before.
    let (status, body) = ns.curl("GET", &url, &[]);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("regcache is a proxy"), "{body}");
    drop(proxy);

    // Without a token file, only loopback.
    let proxy = env
        .proxy()
        .listen_ip(ns.host)
        .args(["--allow", &allow])
        .start()
        .await;
    let url = format!("http://{}/", proxy.addr);
    let (status, body) = ns.curl("GET", &url, &[html, "Authorization: Bearer s3cret-t0ken"]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("loopback clients only"), "{body}");
}

#[tokio::test]
async fn a_download_in_flight_shows_its_progress() {
    let env = Env::new().await;
    let blob = blob_bytes(91, 1024 * 1024);
    let digest = env.reg.put_blob("library/busybox", blob.clone());
    let blob_at = blob_path("library/busybox", &digest);
    // The download stops after 256 KiB until the gate opens.
    env.reg.set_fault(
        &blob_at,
        Fault {
            gate_after: Some(256 * 1024),
            ..Fault::default()
        },
    );
    let proxy = env.proxy().start().await;
    let mut client = proxy.intercepted(HUB, Alpn::Http11).await;
    let resp = client.get(&blob_at).await;
    let hex = digest.strip_prefix("sha256:").unwrap_or(&digest);
    let page = page_with(
        proxy.addr,
        &[
            &format!("<code>{}</code> docker.io/library/busybox", &hex[..12]),
            "256.0 KiB / 1.0 MiB · streaming",
            "1 download in progress",
        ],
    )
    .await;
    assert_eq!(rows(&page, "fills"), 1, "{page}");
    env.reg.open_gate();
    read_response(resp)
        .await
        .assert_served(&blob, "MISS", "the download, once the gate opened");
    page_with(
        proxy.addr,
        &[
            "0 downloads in progress",
            "<h2>Downloads in progress</h2><p class=\"muted\">None.</p>",
        ],
    )
    .await;
}
