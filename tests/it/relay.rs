//! regcache never relays to itself: a tunnel, a plain pass-through or an
//! upstream connection that lands on one of its own listeners is refused
//! with 403, so that no client reaches the loopback-only admin API and
//! status page through the proxy (its request would arrive from 127.0.0.1).
//! The `mirror_tls` port serves the registry API, `/ca.crt` and `/healthz`,
//! not the admin API or the status page.

use hyper::StatusCode;

use crate::admin::Netns;
use crate::support::free_port;
use crate::support::http::{raw, read_response, HttpClient};
use crate::support::proxy::{write_file, Env};
use crate::support::tls::{tls_connect, Alpn};

const REFUSAL: &str = "regcache does not relay to itself";

/// A config file letting CONNECT and plain HTTP through to `ports`.
fn ports_config(env: &Env, ports: &[u16]) -> String {
    let path = write_file(
        env.dir.path(),
        "ports.toml",
        &format!("connect_ports = {ports:?}\n"),
        0o600,
    );
    path.to_str().unwrap().to_string()
}

#[tokio::test]
async fn tunnels_and_pass_through_to_its_own_port_are_refused() {
    let env = Env::new().await;
    let port = free_port();
    let metrics_port = free_port();
    // Another server on this host, on an allowed port: says hello, closes.
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_port = other.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = other.accept().await {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b"hello").await;
        }
    });
    let config = ports_config(&env, &[port, metrics_port, other_port]);
    let proxy = env
        .proxy()
        .args(["--config", &config])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .start_on(port)
        .await;
    let own = [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("127.0.0.1:{metrics_port}"),
    ];
    for target in &own {
        let connect = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        let resp = raw(proxy.addr, connect.as_bytes()).await;
        assert_eq!(resp.status, 403, "CONNECT {target}: {}", resp.head);
        assert!(
            String::from_utf8_lossy(&resp.body).contains(REFUSAL),
            "CONNECT {target}"
        );
        for path in ["/api/v1/stats", "/metrics"] {
            let get = format!("GET http://{target}{path} HTTP/1.1\r\nHost: {target}\r\n\r\n");
            let resp = raw(proxy.addr, get.as_bytes()).await;
            let body = String::from_utf8_lossy(&resp.body);
            assert_eq!(resp.status, 403, "GET http://{target}{path}: {body}");
            assert!(body.contains(REFUSAL), "GET http://{target}{path}: {body}");
        }
    }
    let log = proxy.wait_for_log("rule=\"own_listener\"").await;
    assert!(log.contains("own listener refused"), "{log}");

    // The other server is still reached through a tunnel.
    let target = format!("127.0.0.1:{other_port}");
    let connect = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    let resp = raw(proxy.addr, connect.as_bytes()).await;
    assert_eq!(resp.status, 200, "a tunnel to {target}: {}", resp.head);
    assert_eq!(resp.body, b"hello");
}

/// The hole this closes, as an attacker on another host met it: regcache on
/// every address, port 80, that host allowed; the admin API refuses it
/// directly, and must refuse it through the proxy too.
#[tokio::test]
async fn a_client_on_another_host_cannot_reach_the_admin_api_through_the_proxy() {
    let Some(ns) = Netns::create() else {
        return;
    };
    let env = Env::new().await;
    let port = free_port();
    let config = ports_config(&env, &[port]);
    let allow = format!("{}/30", ns.host);
    let proxy = env
        .proxy()
        .listen_ip("0.0.0.0".parse().unwrap())
        .args(["--config", &config])
        .args(["--allow", &allow, "--allow", "127.0.0.0/8"])
        .start_on(port)
        .await;
    let direct = format!("http://{}:{port}/api/v1/stats", ns.host);
    let (status, body) = ns.curl("GET", &direct, &[]);
    assert_eq!(status, 403, "asked directly: {body}");

    let via = format!("http://{}:{port}", ns.host);
    for url in [
        format!("http://127.0.0.1:{port}/api/v1/stats"),
        format!("http://{}:{port}/api/v1/stats", ns.host),
        format!("http://127.0.0.1:{port}/api/v1/purge"),
    ] {
        let method = if url.ends_with("purge") {
            "POST"
        } else {
            "GET"
        };
        let (status, body) = ns.curl_with(method, &url, &["--proxy", &via]);
        assert_eq!(status, 403, "{method} {url} through the proxy: {body}");
        assert!(body.contains(REFUSAL), "{method} {url}: {body}");
        // Through a tunnel the proxy itself refuses: the CONNECT's status.
        let tunnel = ["--proxytunnel", "--proxy", &via, "-w", "\n%{http_connect}"];
        let (status, body) = ns.curl_with(method, &url, &tunnel);
        assert_eq!(status, 403, "{method} {url} through a tunnel: {body}");
    }
    assert!(
        !proxy.stderr().contains("access=\"loopback\""),
        "no request reached the API as loopback:\n{}",
        proxy.stderr()
    );
}

#[tokio::test]
async fn the_mirror_port_serves_no_admin_api_or_status_page() {
    let env = Env::new().await;
    let mirror_port = free_port();
    let proxy = env
        .proxy()
        .args(["--mirror-tls", &format!("127.0.0.1:{mirror_port}")])
        .args(["--mirror-names", "regcache.test"])
        .start()
        .await;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", mirror_port))
        .await
        .unwrap();
    let tls = tls_connect(
        tcp,
        "regcache.test",
        vec![proxy.ca_der()],
        Alpn::Http11,
        true,
    )
    .await
    .unwrap();
    let mut client = HttpClient::over_tls(tls, "regcache.test").await;
    for path in ["/api/v1/stats", "/api/v1/images", "/metrics", "/setup"] {
        let got = read_response(client.get(path).await).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{path}: {}", got.text());
    }
    let page = client
        .builder(hyper::Method::GET, "/")
        .header("accept", "text/html")
        .body(crate::support::http::empty())
        .unwrap();
    let got = read_response(client.send(page).await).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND, "the status page");
    assert!(!got.text().contains("<html"), "{}", got.text());
    for (path, want) in [("/healthz", "ok"), ("/ca.crt", "BEGIN CERTIFICATE")] {
        let got = read_response(client.get(path).await).await;
        assert_eq!(got.status, StatusCode::OK, "{path}");
        assert!(got.text().contains(want), "{path}: {}", got.text());
    }
    // The same pages stay on the proxy port.
    let mut plain = HttpClient::plain_h1(proxy.addr, "127.0.0.1").await;
    let got = read_response(plain.get("/api/v1/stats").await).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
}
