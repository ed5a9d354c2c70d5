//! The proxy foundation, seen from a client: CONNECT and interception, ALPN,
//! tunnelling of hosts that are not intercepted, the CONNECT port policy,
//! absolute-form forwarding, hop-by-hop headers, malformed input, logging and
//! graceful shutdown. Every test spawns the real `regcache` binary.

use std::time::{Duration, Instant};

use crate::support::http::{
    body_bytes, body_string, empty, full, header_names, raw, raw_exchange, BoxError, HttpClient,
    ReqBody,
};
use crate::support::pattern::{PatternBody, PatternCheck};
use crate::support::proxy::{Proxy, ProxyBuilder};
use crate::support::tls::{
    connect_tunnel, issuer_subject, negotiated_alpn, peer_leaf, sans, tls_connect, Alpn,
};
use crate::support::upstream::{Fixture, Seen, UpstreamKind};
use crate::support::{send_signal, within, Signal, STEP_TIMEOUT};
use hyper::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------
// 1. Interception: the leaf, its chain, and the request reaching the upstream
// ---------------------------------------------------------------------------

#[tokio::test]
async fn intercepted_host_gets_leaf_for_its_name_signed_by_regcache_ca() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx.proxy().start().await;

    let tcp = proxy.tunnel("upstream.test:443").await;
    // Trusting ONLY the regcache CA: a successful handshake proves the leaf
    // chains to it and is valid for the name.
    let tls = tls_connect(
        tcp,
        "upstream.test",
        vec![proxy.ca_der()],
        Alpn::Http11,
        true,
    )
    .await
    .expect("TLS through the tunnel, trusting only the regcache CA");
    let leaf = peer_leaf(&tls);

    assert_ne!(
        Some(&leaf),
        fx.upstream.leaf_der.as_ref(),
        "the client got the upstream's own certificate: not intercepted"
    );
    let (dns, _) = sans(&leaf);
    assert!(
        dns.iter().any(|d| d == "upstream.test"),
        "leaf SANs {dns:?} should include upstream.test"
    );
    let (leaf_issuer, _) = issuer_subject(&leaf);
    let (_, ca_subject) = issuer_subject(&proxy.ca_der());
    assert_eq!(
        leaf_issuer, ca_subject,
        "leaf issuer should be the regcache CA"
    );

    let mut client = HttpClient::over_tls(tls, "upstream.test").await;
    let req = client
        .builder(Method::POST, "/library/alpine/echo?x=1")
        .header("accept", "application/vnd.oci.image.index.v1+json")
        .body(full("hello upstream"))
        .unwrap();
    let resp = client.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        body_string(resp.into_body()).await,
        "POST /library/alpine/echo?x=1\nhello upstream"
    );

    let seen = fx.upstream.wait_for("/library/alpine/echo").await;
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.path, "/library/alpine/echo?x=1");
    assert_eq!(seen.body_len, "hello upstream".len() as u64);
    assert_eq!(
        seen.headers.get("accept").map(|v| v.to_str().unwrap()),
        Some("application/vnd.oci.image.index.v1+json")
    );
    assert_eq!(
        seen.sni.as_deref(),
        Some("upstream.test"),
        "regcache should connect upstream with SNI upstream.test"
    );
}

#[tokio::test]
async fn builtin_registry_host_is_intercepted_without_flags() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    // fx.proxy() maps registry-1.docker.io to the upstream but does not name
    // it in --intercept: the built-in list must cover it.
    let proxy = fx.proxy().start().await;
    let mut client = proxy.intercepted("registry-1.docker.io", Alpn::Both).await;
    let (dns, _) = sans(client.peer_leaf.as_ref().unwrap());
    assert!(
        dns.iter().any(|d| d == "registry-1.docker.io"),
        "SANs {dns:?}"
    );
    let resp = client.get("/v2/").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_string(resp.into_body()).await, "GET /v2/\n");
    let seen = fx.upstream.wait_for("/v2/").await;
    assert_eq!(seen.sni.as_deref(), Some("registry-1.docker.io"));
}

#[tokio::test]
async fn wildcard_intercept_covers_subdomains() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx
        .proxy()
        .intercept("*.wild.test")
        .resolve("a.wild.test", fx.upstream.port())
        .start()
        .await;
    let mut client = proxy.intercepted("a.wild.test", Alpn::Http11).await;
    assert_ne!(client.peer_leaf, fx.upstream.leaf_der, "not intercepted");
    let (dns, _) = sans(client.peer_leaf.as_ref().unwrap());
    assert!(
        dns.iter().any(|d| d == "a.wild.test"),
        "leaf SANs {dns:?} should name the requested host a.wild.test"
    );
    let resp = client.get("/wild").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_string(resp.into_body()).await, "GET /wild\n");
    assert_eq!(
        fx.upstream.wait_for("/wild").await.sni.as_deref(),
        Some("a.wild.test")
    );
}

#[tokio::test]
async fn leaf_without_sni_names_the_connect_host() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx.proxy().start().await;
    let tcp = proxy.tunnel("upstream.test:443").await;
    // No SNI: regcache must fall back to the CONNECT host for the leaf.
    let tls = tls_connect(
        tcp,
        "upstream.test",
        vec![proxy.ca_der()],
        Alpn::Http11,
        false,
    )
    .await
    .expect("TLS without SNI, verifying the leaf as upstream.test");
    let (dns, ips) = sans(&peer_leaf(&tls));
    assert_eq!(
        dns,
        ["upstream.test"],
        "the leaf names the CONNECT host only"
    );
    assert!(ips.is_empty(), "IP SANs {ips:?}");
    let mut client = HttpClient::over_tls(tls, "upstream.test").await;
    let resp = client.get("/nosni").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_string(resp.into_body()).await, "GET /nosni\n");
}

/// The regcache CA signs a leaf only for the intercepted CONNECT host: any
/// other SNI (a real site, `localhost`, a name that is not a DNS host name)
/// gets a fatal `unrecognized_name` alert, no certificate, and a log line
/// naming the CONNECT host and the SNI.
#[tokio::test]
async fn sni_other_than_the_connect_host_gets_an_alert_and_no_leaf() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx.proxy().start().await;
    for (connect, sni) in [
        ("registry-1.docker.io", "accounts.google.com"),
        ("registry-1.docker.io", "docker.io"),
        ("ghcr.io", "localhost"),
        ("ghcr.io", "a_b.docker.io"),
        ("upstream.test", "a_b.upstream.test"),
    ] {
        let tcp = proxy.tunnel(&format!("{connect}:443")).await;
        let err = match tls_connect(tcp, sni, vec![proxy.ca_der()], Alpn::Both, true).await {
            Ok(tls) => panic!(
                "CONNECT {connect} with SNI {sni}: got a leaf with SANs {:?}",
                sans(&peer_leaf(&tls))
            ),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("UnrecognisedName"),
            "CONNECT {connect} with SNI {sni}: {err}"
        );
        let log = proxy.wait_for_log(&format!("sni=\"{sni}\"")).await;
        assert!(
            log.lines().any(|l| l.contains("unrecognized_name")
                && l.contains(&format!("sni=\"{sni}\""))
                && l.contains(&format!("host=\"{connect}\""))),
            "the log names the CONNECT host and the SNI:\n{log}"
        );
    }
    // The matching SNI, in any case and with a trailing dot, still works,
    // and the leaf names the CONNECT host only.
    for (connect, sni) in [("ghcr.io", "ghcr.io"), ("ghcr.io", "GHCR.io.")] {
        let tcp = proxy.tunnel(&format!("{connect}:443")).await;
        let tls = tls_connect(tcp, sni, vec![proxy.ca_der()], Alpn::Both, true)
            .await
            .unwrap_or_else(|e| panic!("CONNECT {connect} with SNI {sni}: {e}"));
        let (dns, ips) = sans(&peer_leaf(&tls));
        assert_eq!(dns, ["ghcr.io"], "SANs for SNI {sni}");
        assert!(ips.is_empty(), "IP SANs {ips:?}");
    }
}

#[tokio::test]
async fn intercepted_ip_host_gets_ip_san() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let port = fx.upstream.port();
    let proxy = fx
        .proxy()
        .intercept("127.0.0.1")
        .arg("--connect-ports")
        .arg(port.to_string())
        .start()
        .await;
    let target = format!("127.0.0.1:{port}");
    let tcp = proxy.tunnel(&target).await;
    let tls = tls_connect(tcp, "127.0.0.1", vec![proxy.ca_der()], Alpn::Http11, true)
        .await
        .expect("TLS to an intercepted IP, verifying against the regcache CA");
    let leaf = peer_leaf(&tls);
    assert_ne!(
        Some(&leaf),
        fx.upstream.leaf_der.as_ref(),
        "not intercepted"
    );
    let (dns, ips) = sans(&leaf);
    assert_eq!(
        ips,
        ["127.0.0.1".parse::<std::net::IpAddr>().unwrap()],
        "leaf IP SANs should be the CONNECT address only"
    );
    assert!(dns.is_empty(), "DNS SANs {dns:?}");
    let mut client = HttpClient::over_tls(tls, &target).await;
    let resp = client.get("/ip-host").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_string(resp.into_body()).await, "GET /ip-host\n");
}

#[tokio::test]
async fn leaf_is_reused_across_connections() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx.proxy().start().await;
    let a = proxy.intercepted("upstream.test", Alpn::Http11).await;
    let b = proxy.intercepted("upstream.test", Alpn::H2).await;
    assert_eq!(
        a.peer_leaf, b.peer_leaf,
        "a second connection to the same host should get the cached leaf"
    );
}

/// Without --upstream-ca the test CA is not trusted: regcache must refuse to
/// talk to the upstream rather than skip verification.
#[tokio::test]
async fn untrusted_upstream_certificate_is_refused() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = ProxyBuilder::new()
        .intercept("upstream.test")
        .resolve("upstream.test", fx.upstream.port())
        .start()
        .await;
    let mut client = proxy.intercepted("upstream.test", Alpn::Http11).await;
    let resp = client.get("/untrusted").await;
    assert!(
        resp.status().is_server_error(),
        "an upstream with an untrusted certificate should give a 5xx, got {}",
        resp.status()
    );
    body_bytes(resp.into_body()).await;
    assert!(
        fx.upstream.seen().is_empty(),
        "no request may reach an upstream whose certificate failed verification"
    );
}

/// The upstream's certificate does not name mismatch.test.
#[tokio::test]
async fn upstream_certificate_for_another_name_is_refused() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx
        .proxy()
        .intercept("mismatch.test")
        .resolve("mismatch.test", fx.upstream.port())
        .start()
        .await;
    let mut client = proxy.intercepted("mismatch.test", Alpn::Http11).await;
    let resp = client.get("/mismatch").await;
    assert!(
        resp.status().is_server_error(),
        "an upstream certificate without the host's name should give a 5xx, got {}",
        resp.status()
    );
    body_bytes(resp.into_body()).await;
    assert!(fx.upstream.seen().is_empty());
}

// ---------------------------------------------------------------------------
// 2. ALPN inside the tunnel
// ---------------------------------------------------------------------------

#[tokio::test]
async fn h2_negotiated_inside_tunnel_with_concurrent_streams() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx.proxy().start().await;
    let client = proxy.intercepted("upstream.test", Alpn::H2).await;
    assert_eq!(client.alpn.as_deref(), Some("h2"), "ALPN should select h2");
    assert!(client.is_h2());

    // Several streams at once on the one connection.
    let mut tasks = vec![];
    for i in 0..4 {
        let mut sender = client.h2_sender();
        let req = client
            .builder(Method::GET, &format!("/h2/{i}"))
            .body(empty())
            .unwrap();
        tasks.push(tokio::spawn(async move {
            sender.ready().await.unwrap();
            let resp = sender.send_request(req).await.expect("h2 request");
            (resp.status(), body_string(resp.into_body()).await)
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, body) = within("h2 stream", STEP_TIMEOUT, t).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("GET /h2/{i}\n"));
    }
    assert_eq!(fx.upstream.seen_path("/h2/").len(), 4);

    // A body upward over h2 as well.
    let mut client = client;
    let req = client
        .builder(Method::PUT, "/h2-put")
        .body(full("over h2"))
        .unwrap();
    let resp = client.send(req).await;
    assert_eq!(body_string(resp.into_body()).await, "PUT /h2-put\nover h2");
}

#[tokio::test]
async fn http11_negotiated_inside_tunnel_with_keepalive() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx.proxy().start().await;
    let mut client = proxy.intercepted("upstream.test", Alpn::Http11).await;
    assert_eq!(client.alpn.as_deref(), Some("http/1.1"));
    assert!(!client.is_h2());
    for i in 0..3 {
        let resp = client.get(&format!("/h1/{i}")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), hyper::Version::HTTP_11);
        assert_eq!(
            body_string(resp.into_body()).await,
            format!("GET /h1/{i}\n")
        );
    }
    assert_eq!(fx.upstream.seen_path("/h1/").len(), 3);
}

#[tokio::test]
async fn no_alpn_inside_tunnel_speaks_http11() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx.proxy().start().await;
    let mut client = proxy.intercepted("upstream.test", Alpn::None).await;
    assert_eq!(client.alpn, None);
    let resp = client.get("/noalpn").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_string(resp.into_body()).await, "GET /noalpn\n");
}

async fn methods_and_statuses(alpn: Alpn) {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx.proxy().start().await;
    let mut client = proxy.intercepted("upstream.test", alpn).await;
    for m in ["PUT", "PATCH", "DELETE", "OPTIONS", "MKCOL"] {
        let method = Method::from_bytes(m.as_bytes()).unwrap();
        let path = format!("/m/{m}");
        let req = client
            .builder(method.clone(), &path)
            .body(full("b"))
            .unwrap();
        let resp = client.send(req).await;
        assert_eq!(resp.status(), StatusCode::OK, "{m}");
        assert_eq!(
            body_string(resp.into_body()).await,
            format!("{m} {path}\nb")
        );
        assert_eq!(fx.upstream.wait_for(&path).await.method, method);
    }
    // HEAD: headers of the GET, no body.
    let req = client
        .builder(Method::HEAD, "/m/HEAD")
        .body(empty())
        .unwrap();
    let resp = client.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get("content-length")
            .map(|v| v.to_str().unwrap()),
        Some("13"),
        "HEAD should carry the upstream's Content-Length"
    );
    assert!(body_bytes(resp.into_body()).await.is_empty());
    assert_eq!(fx.upstream.wait_for("/m/HEAD").await.method, Method::HEAD);

    // Statuses and their headers pass through untouched.
    for code in [401u16, 404, 429, 503] {
        let resp = client.get(&format!("/status/{code}")).await;
        assert_eq!(resp.status().as_u16(), code);
        let h = resp.headers();
        assert_eq!(
            h.get("docker-distribution-api-version")
                .map(|v| v.to_str().unwrap()),
            Some("registry/2.0")
        );
        assert!(h
            .get("www-authenticate")
            .is_some_and(|v| v.to_str().unwrap().starts_with("Bearer realm=")));
        assert_eq!(
            body_string(resp.into_body()).await,
            format!("status {code}\n")
        );
    }
}

#[tokio::test]
async fn any_method_and_status_pass_through_http11() {
    methods_and_statuses(Alpn::Http11).await;
}

#[tokio::test]
async fn any_method_and_status_pass_through_h2() {
    methods_and_statuses(Alpn::H2).await;
}

// ---------------------------------------------------------------------------
// 3. Hosts that are not intercepted, and 4. the CONNECT port policy
// ---------------------------------------------------------------------------

#[tokio::test]
async fn non_intercepted_host_is_tunnelled_untouched() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx
        .proxy()
        .resolve("other.test", fx.upstream.port())
        .start()
        .await;

    let tcp = proxy.tunnel("other.test:443").await;
    // Trusting ONLY the test CA: this works only if the bytes reach the
    // upstream untouched.
    let tls = tls_connect(
        tcp,
        "other.test",
        vec![fx.ca.cert_der.clone()],
        Alpn::Both,
        true,
    )
    .await
    .expect("TLS with the upstream itself through the tunnel (test CA only)");
    assert_eq!(
        Some(&peer_leaf(&tls)),
        fx.upstream.leaf_der.as_ref(),
        "the client should see the upstream's own certificate"
    );
    let (issuer, _) = issuer_subject(&peer_leaf(&tls));
    let (_, regcache_ca) = issuer_subject(&proxy.ca_der());
    assert_ne!(issuer, regcache_ca);
    // The client's own ALPN choice reached the upstream: h2 end to end.
    assert_eq!(negotiated_alpn(&tls).as_deref(), Some("h2"));

    let mut client = HttpClient::over_tls(tls, "other.test").await;
    let resp = client.get("/tunnelled").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_string(resp.into_body()).await, "GET /tunnelled\n");
    let seen = fx.upstream.wait_for("/tunnelled").await;
    assert_eq!(seen.sni.as_deref(), Some("other.test"));
    assert_eq!(seen.alpn.as_deref(), Some("h2"));
}

#[tokio::test]
async fn other_hosts_refuse_answers_403_but_intercepts_still_work() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx
        .proxy()
        .resolve("other.test", fx.upstream.port())
        .args(["--other-hosts", "refuse"])
        .start()
        .await;
    match connect_tunnel(proxy.addr, "other.test:443").await {
        Err(403) => {}
        Ok(_) => panic!("CONNECT other.test:443 with --other-hosts refuse: expected 403, got 200"),
        Err(s) => panic!("CONNECT other.test:443 with --other-hosts refuse: expected 403, got {s}"),
    }
    assert!(
        fx.upstream.seen().is_empty(),
        "nothing should reach the upstream"
    );
    let mut client = proxy.intercepted("upstream.test", Alpn::Http11).await;
    let resp = client.get("/still").await;
    assert_eq!(resp.status(), StatusCode::OK);
    proxy.assert_healthy("a refused CONNECT").await;
}

#[tokio::test]
async fn connect_port_flag_allows_extra_port() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let port = fx.upstream.port();
    let proxy = fx
        .proxy()
        .args(["--connect-ports", &port.to_string()])
        .start()
        .await;
    let tcp = proxy.tunnel(&format!("127.0.0.1:{port}")).await;
    let tls = tls_connect(
        tcp,
        "127.0.0.1",
        vec![fx.ca.cert_der.clone()],
        Alpn::Http11,
        true,
    )
    .await
    .expect("tunnel to 127.0.0.1 on an allowed extra port reaches the upstream itself");
    assert_eq!(Some(&peer_leaf(&tls)), fx.upstream.leaf_der.as_ref());
    let mut client = HttpClient::over_tls(tls, &format!("127.0.0.1:{port}")).await;
    let resp = client.get("/extra-port").await;
    assert_eq!(body_string(resp.into_body()).await, "GET /extra-port\n");
}

#[tokio::test]
async fn connect_to_disallowed_ports_is_403() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx
        .proxy()
        .resolve("other.test", fx.upstream.port())
        .start()
        .await;
    let up = fx.upstream.port();
    for target in [
        "upstream.test:25".to_string(),
        "other.test:25".to_string(),
        "127.0.0.1:25".to_string(),
        format!("127.0.0.1:{up}"),
    ] {
        match connect_tunnel(proxy.addr, &target).await {
            Err(403) => {}
            Ok(_) => panic!("CONNECT {target}: expected 403, got 200"),
            Err(s) => panic!("CONNECT {target}: expected 403, got {s}"),
        }
        proxy.assert_healthy(&format!("CONNECT {target}")).await;
    }
    assert!(fx.upstream.seen().is_empty());
}

// ---------------------------------------------------------------------------
// 6. Malformed input
// ---------------------------------------------------------------------------

async fn expect_status(proxy: &Proxy, request: &[u8], want: u16) {
    let r = raw(proxy.addr, request).await;
    let shown = String::from_utf8_lossy(&request[..request.len().min(80)]).into_owned();
    assert_eq!(
        r.status, want,
        "request {shown:?}: expected {want}, got head {:?}",
        r.head
    );
    proxy.assert_healthy(&format!("request {shown:?}")).await;
}

#[tokio::test]
async fn garbage_request_line_is_400() {
    let proxy = ProxyBuilder::new().start().await;
    expect_status(&proxy, b"hello world\r\n\r\n", 400).await;
    expect_status(&proxy, b"GET /a b c HTTP/1.1\r\nHost: x\r\n\r\n", 400).await;
    expect_status(
        &proxy,
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
        400,
    )
    .await;
}

#[tokio::test]
async fn malformed_connect_targets_are_400() {
    let proxy = ProxyBuilder::new().start().await;
    for target in [
        "nohostport",
        "upstream.test:notaport",
        "upstream.test:99999",
        ":443",
    ] {
        let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        expect_status(&proxy, req.as_bytes(), 400).await;
    }
}

#[tokio::test]
async fn origin_form_without_host_is_400() {
    let proxy = ProxyBuilder::new().start().await;
    expect_status(&proxy, b"GET /v2/ HTTP/1.1\r\n\r\n", 400).await;
}

// ---------------------------------------------------------------------------
// Clients that stop sending: client_idle_timeout
// ---------------------------------------------------------------------------

/// The generous bound within which a 1 s `client_idle_timeout` must act.
const IDLE_BOUND: Duration = Duration::from_secs(10);

/// Reads from `io` until the peer closes (or fails) the connection; returns
/// what arrived and how long it took. Panics after [`IDLE_BOUND`].
async fn read_until_closed<IO: tokio::io::AsyncRead + Unpin>(io: &mut IO) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + IDLE_BOUND).into(), io.read(&mut buf)).await {
            Err(_) => panic!(
                "the connection was still open after {IDLE_BOUND:?}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, started.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A request head that stops half way is closed after client_idle_timeout,
/// on the proxy port and inside an intercepted tunnel.
#[tokio::test]
async fn stalled_request_head_is_closed_after_client_idle_timeout() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx
        .proxy()
        .args(["--client-idle-timeout", "1"])
        .start()
        .await;

    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        .await
        .unwrap();
    let (_, took) = read_until_closed(&mut tcp).await;
    assert!(took < IDLE_BOUND, "proxy port: closed after {took:?}");

    let mut tls = proxy.tls_in_tunnel("upstream.test", Alpn::Http11).await;
    tls.write_all(b"GET /v2/ HTTP/1.1\r\nHost: upstream.test\r\nX-Slow: a")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let (_, took) = read_until_closed(&mut tls).await;
    assert!(took < IDLE_BOUND, "tunnel: closed after {took:?}");
    assert!(
        fx.upstream.seen().is_empty(),
        "a partial head reached upstream"
    );
    proxy.assert_healthy("after stalled heads").await;
}

/// A push whose body stalls after one byte (HTTP/1.1) is cut after
/// client_idle_timeout: the client's connection closes, the upstream
/// request is aborted, and a log line says so.
#[tokio::test]
async fn stalled_request_body_is_cut_and_its_upstream_request_aborted() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx
        .proxy()
        .args(["--client-idle-timeout", "1"])
        .start()
        .await;
    let mut tls = proxy.tls_in_tunnel("upstream.test", Alpn::Http11).await;
    tls.write_all(
        b"PUT /upload/stall-h1 HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: 1000\r\n\r\nx",
    )
    .await
    .unwrap();
    tls.flush().await.unwrap();
    let (answer, took) = read_until_closed(&mut tls).await;
    assert!(took < IDLE_BOUND, "closed after {took:?}");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        !answer.contains("201"),
        "the stalled upload must not be answered as complete: {answer}"
    );
    let seen = fx.upstream.wait_for("/upload/stall-h1").await;
    assert_eq!(seen.body_len, 1, "upstream got the byte sent");
    assert_eq!(
        seen.body_pattern_ok,
        Some(false),
        "the upstream request must end in an error (aborted), not look complete"
    );
    proxy.wait_for_log("request body stalled").await;
}

/// The same over HTTP/2: the stalled stream gets an error answer or a reset
/// within the bound, and the upstream request is aborted.
#[tokio::test]
async fn stalled_request_body_over_h2_is_cut() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx
        .proxy()
        .args(["--client-idle-timeout", "1"])
        .start()
        .await;
    let client = proxy.intercepted("upstream.test", Alpn::H2).await;
    assert_eq!(client.alpn.as_deref(), Some("h2"));
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<hyper::body::Frame<bytes::Bytes>, BoxError>>(1);
    tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
        b"x",
    ))))
    .await
    .unwrap();
    // `tx` stays alive: the body neither ends nor sends more.
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|frame| (frame, rx))
    });
    let body = http_body_util::StreamBody::new(frames);
    let req = client
        .builder(Method::PUT, "/upload/stall-h2")
        .header("content-length", "1000")
        .body(http_body_util::BodyExt::boxed(body))
        .unwrap();
    let started = Instant::now();
    let mut sender = client.h2_sender();
    let outcome = tokio::time::timeout(IDLE_BOUND, sender.send_request(req)).await;
    let took = started.elapsed();
    match outcome {
        Err(_) => panic!("no answer and no reset after {took:?}"),
        Ok(Ok(resp)) => assert_ne!(resp.status(), StatusCode::CREATED),
        Ok(Err(_reset)) => {}
    }
    let seen = fx.upstream.wait_for("/upload/stall-h2").await;
    assert_eq!(seen.body_len, 1);
    assert_eq!(seen.body_pattern_ok, Some(false));
    proxy.wait_for_log("request body stalled").await;
    drop(tx);
}

/// A short client_idle_timeout cuts only clients that send nothing: a normal
/// push still arrives whole, and a slow download to a client that sends
/// nothing while it reads (HTTP/1.1 and HTTP/2) runs to its end.
#[tokio::test]
async fn normal_push_and_slow_download_outlast_a_short_idle_timeout() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx
        .proxy()
        .args(["--client-idle-timeout", "1"])
        .start()
        .await;
    for alpn in [Alpn::Http11, Alpn::H2] {
        let mut client = proxy.intercepted("upstream.test", alpn).await;
        let size = 4 * 1024 * 1024;
        let req = client
            .builder(Method::PUT, "/upload/normal")
            .body(PatternBody::new(size).boxed())
            .unwrap();
        let resp = client.send(req).await;
        assert_eq!(resp.status(), StatusCode::CREATED, "{alpn:?}");
        assert_eq!(
            body_string(resp.into_body()).await,
            format!("received={size} ok=true err=")
        );
        // 25 chunks 120 ms apart: 3 s of download, the client silent.
        let resp = client.get("/bytes/25600?chunk=1024&delay_ms=120").await;
        assert_eq!(resp.status(), StatusCode::OK, "{alpn:?}");
        let body = body_bytes(resp.into_body()).await;
        assert_eq!(body.len(), 25600, "{alpn:?}: the slow download was cut");
    }
}

/// An HTTP/2 client over an intercepted tunnel whose connection task is the
/// test's own (it answers the proxy's pings), so that its end is seen.
async fn h2_client_conn(
    proxy: &Proxy,
) -> (
    hyper::client::conn::http2::SendRequest<ReqBody>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tls = proxy.tls_in_tunnel("upstream.test", Alpn::H2).await;
    assert_eq!(negotiated_alpn(&tls).as_deref(), Some("h2"));
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(conn))
}

/// `GET https://upstream.test{path}` over HTTP/2.
fn h2_get(path: &str) -> hyper::Request<ReqBody> {
    hyper::Request::builder()
        .uri(format!("https://upstream.test{path}"))
        .version(hyper::Version::HTTP_2)
        .body(empty())
        .unwrap()
}

/// An HTTP/2 connection that holds no stream (it answers pings, so the
/// keep-alive never closes it) is shut down gracefully (GOAWAY) once it has
/// been idle for client_idle_timeout, instead of holding its TLS state, task
/// and file descriptor forever.
#[tokio::test]
async fn idle_h2_connection_is_closed_with_goaway_after_client_idle_timeout() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx
        .proxy()
        .args(["--client-idle-timeout", "1"])
        .start()
        .await;
    let (mut sender, conn) = h2_client_conn(&proxy).await;
    let resp = sender.send_request(h2_get("/bytes/1000")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_bytes(resp.into_body()).await.len(), 1000);
    let idle_from = Instant::now();
    let ended = tokio::time::timeout(IDLE_BOUND, conn).await;
    let took = idle_from.elapsed();
    let ended = ended
        .unwrap_or_else(|_| panic!("the idle h2 connection was still open after {IDLE_BOUND:?}"));
    ended
        .unwrap()
        .expect("the connection should end cleanly (GOAWAY), not with an error");
    assert!(
        took >= Duration::from_millis(200),
        "closed {took:?} after its only response ended: sooner than client_idle_timeout"
    );
    assert!(sender.is_closed());
    proxy.assert_healthy("after an idle h2 connection").await;
}

/// A TLS client that completes the handshake and then sends nothing (no
/// HTTP/2 preface, no request line) is closed after client_idle_timeout, and
/// so is a client of the proxy port that sends nothing.
#[tokio::test]
async fn silent_client_after_tls_is_closed_after_client_idle_timeout() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx
        .proxy()
        .args(["--client-idle-timeout", "1"])
        .start()
        .await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (_, took) = read_until_closed(&mut tcp).await;
    assert!(took < IDLE_BOUND, "proxy port: closed after {took:?}");
    for alpn in [Alpn::H2, Alpn::Http11] {
        let mut tls = proxy.tls_in_tunnel("upstream.test", alpn).await;
        let (got, took) = read_until_closed(&mut tls).await;
        assert!(took < IDLE_BOUND, "{alpn:?}: closed after {took:?}");
        assert!(got.len() < 100, "{alpn:?}: got {got:?}");
    }
}

/// A download over HTTP/2 that the client reads slowly, for several times
/// client_idle_timeout, runs to its end: a stream in flight keeps its
/// connection open (only once the proxy has sent the last byte may the idle
/// clock start).
#[tokio::test]
async fn slowly_read_h2_download_outlasts_client_idle_timeout() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx
        .proxy()
        .args(["--client-idle-timeout", "1"])
        .start()
        .await;
    let (mut sender, _conn) = h2_client_conn(&proxy).await;
    let size: u64 = 8 * 1024 * 1024;
    let resp = sender
        .send_request(h2_get(&format!("/bytes/{size}")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let started = Instant::now();
    let mut body = resp.into_body();
    let mut check = PatternCheck::default();
    // At most 16 KiB a frame and 10 ms between frames: 5 s or more, so the
    // proxy's side of the stream lasts well over client_idle_timeout even
    // with the flow-control windows full.
    let read = async {
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            if let Ok(data) = frame?.into_data() {
                check.feed(&data);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok::<_, hyper::Error>(())
    };
    let outcome = tokio::time::timeout(Duration::from_secs(120), read).await;
    let took = started.elapsed();
    outcome
        .expect("the slow read took over 120 s")
        .unwrap_or_else(|e| {
            panic!(
                "the download was cut after {} bytes, {took:?}: {e:?}",
                check.len
            )
        });
    assert_eq!(check.len, size, "cut after {took:?}");
    assert!(check.ok());
    assert!(
        took > Duration::from_secs(3),
        "not slow enough to test: {took:?}"
    );
}

#[tokio::test]
async fn oversized_headers_are_431() {
    let proxy = ProxyBuilder::new().start().await;
    let one_header = |size: usize| {
        let mut req = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', size));
        req.extend_from_slice(b"\r\n\r\n");
        req
    };
    // Far over any limit.
    expect_status(&proxy, &one_header(1024 * 1024), 431).await;
    // Over the 64 KiB limit, sent in one write (so it arrives in one burst).
    expect_status(&proxy, &one_header(100 * 1024), 431).await;

    // Many headers that add up to more than 64 KiB.
    let mut req = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n".to_vec();
    for i in 0..90 {
        req.extend_from_slice(format!("X-H{i}: {}\r\n", "b".repeat(1000)).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    expect_status(&proxy, &req, 431).await;
}

// ---------------------------------------------------------------------------
// 7. Absolute-form requests (plain HTTP forward proxying)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn absolute_form_http_is_forwarded() {
    let fx = Fixture::new(UpstreamKind::Plain).await;
    let port = fx.upstream.port();
    let proxy = ProxyBuilder::new()
        .resolve("plain.test", port)
        .arg("--connect-ports")
        .arg(port.to_string())
        .start()
        .await;

    // By address and port (plain HTTP passes through to port 80 and the
    // connect_ports only; crate::origins has the refusals).
    let host = format!("127.0.0.1:{port}");
    let mut client = HttpClient::plain_h1(proxy.addr, &host).await;
    let req = hyper::Request::builder()
        .uri(format!("http://{host}/abs/x?y=1"))
        .header("host", &host)
        .body(empty())
        .unwrap();
    let resp = client.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_string(resp.into_body()).await, "GET /abs/x?y=1\n");
    let seen = fx.upstream.wait_for("/abs/x").await;
    assert_eq!(seen.path, "/abs/x?y=1");
    assert_eq!(seen.method, Method::GET);

    // By a name that --resolve maps (port 80 implied), with a body.
    let req = hyper::Request::builder()
        .method(Method::POST)
        .uri("http://plain.test/named?z=2")
        .header("host", "plain.test")
        .body(full("posted"))
        .unwrap();
    let resp = client.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        body_string(resp.into_body()).await,
        "POST /named?z=2\nposted"
    );
    let seen = fx.upstream.wait_for("/named").await;
    assert_eq!(seen.method, Method::POST);
    assert_eq!(
        seen.headers.get("host").map(|v| v.to_str().unwrap()),
        Some("plain.test")
    );
}

// ---------------------------------------------------------------------------
// 8. Hop-by-hop headers
// ---------------------------------------------------------------------------

fn assert_hop_by_hop_stripped(seen: &Seen, resp_headers: &hyper::HeaderMap) {
    let h = &seen.headers;
    let names = header_names(h);
    for gone in ["x-foo", "proxy-authorization", "keep-alive"] {
        assert!(
            !h.contains_key(gone),
            "upstream must not see {gone}; it saw {names:?}"
        );
    }
    assert!(
        h.get("te")
            .is_none_or(|v| v.to_str().unwrap().trim() == "trailers"),
        "TE: gzip is hop-by-hop and must not be forwarded; upstream saw te={:?}",
        h.get("te")
    );
    for v in h.get_all("connection") {
        assert!(
            !v.to_str().unwrap().to_ascii_lowercase().contains("x-foo"),
            "the client's Connection header was forwarded: {v:?}"
        );
    }
    assert_eq!(
        h.get("authorization").map(|v| v.to_str().unwrap()),
        Some("Bearer end-to-end-token"),
        "Authorization is end-to-end and must arrive"
    );
    assert_eq!(
        h.get("accept").map(|v| v.to_str().unwrap()),
        Some("application/vnd.oci.image.manifest.v1+json")
    );
    assert_eq!(h.get("x-end").map(|v| v.to_str().unwrap()), Some("1"));

    let rnames = header_names(resp_headers);
    assert!(
        !resp_headers.contains_key("x-resp-hop"),
        "response header named in the upstream's Connection must be dropped; client saw {rnames:?}"
    );
    assert!(
        !resp_headers.contains_key("keep-alive"),
        "upstream's Keep-Alive must be dropped; client saw {rnames:?}"
    );
    for v in resp_headers.get_all("connection") {
        assert!(!v.to_str().unwrap().contains("x-resp-hop"));
    }
    assert_eq!(
        resp_headers
            .get("x-end-to-end")
            .map(|v| v.to_str().unwrap()),
        Some("kept")
    );
}

fn hop_request(builder: hyper::http::request::Builder) -> hyper::Request<ReqBody> {
    builder
        .header("connection", "x-foo")
        .header("x-foo", "1")
        .header("proxy-authorization", "Basic dXNlcjpzZWNyZXQ=")
        .header("keep-alive", "timeout=5")
        .header("te", "gzip")
        .header("authorization", "Bearer end-to-end-token")
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .header("x-end", "1")
        .body(empty())
        .unwrap()
}

#[tokio::test]
async fn hop_by_hop_headers_removed_inside_tunnel() {
    // HTTP/1.1-only upstream, so headers travel on the wire as sent.
    let fx = Fixture::new(UpstreamKind::HttpsH1Only).await;
    let proxy = fx.proxy().start().await;
    let mut client = proxy.intercepted("upstream.test", Alpn::Http11).await;
    let req = hop_request(client.builder(Method::GET, "/hop/tunnel"));
    let resp = client.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let headers = resp.headers().clone();
    body_bytes(resp.into_body()).await;
    let seen = fx.upstream.wait_for("/hop/tunnel").await;
    assert_hop_by_hop_stripped(&seen, &headers);
}

#[tokio::test]
async fn hop_by_hop_headers_removed_absolute_form() {
    let fx = Fixture::new(UpstreamKind::Plain).await;
    let port = fx.upstream.port();
    let proxy = ProxyBuilder::new()
        .resolve("plain.test", port)
        .start()
        .await;
    let mut client = HttpClient::plain_h1(proxy.addr, "plain.test").await;
    let req = hop_request(
        hyper::Request::builder()
            .uri("http://plain.test/hop/abs")
            .header("host", "plain.test"),
    );
    let resp = client.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let headers = resp.headers().clone();
    body_bytes(resp.into_body()).await;
    let seen = fx.upstream.wait_for("/hop/abs").await;
    assert_hop_by_hop_stripped(&seen, &headers);
}

// ---------------------------------------------------------------------------
// 10. Logging
// ---------------------------------------------------------------------------

const SECRETS: [&str; 3] = [
    "SECRET-bearer-7f3a9c",
    "dXNlcjpTRUNSRVQtYmFzaWMtNGQ=",
    "SECRET-proxyauth-1b2e",
];

async fn make_secret_requests(fx: &Fixture, proxy: &Proxy, path: &str) {
    let proxy_auth = format!("Basic {}", SECRETS[2]);
    let mut client = proxy
        .intercepted_as("upstream.test", Alpn::Http11, Some(&proxy_auth))
        .await;
    let req = client
        .builder(Method::GET, path)
        .header("authorization", format!("Bearer {}", SECRETS[0]))
        .body(empty())
        .unwrap();
    let resp = client.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    body_bytes(resp.into_body()).await;
    let seen = fx.upstream.wait_for(path).await;
    assert_eq!(
        seen.headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some(format!("Bearer {}", SECRETS[0]))
    );
    // A second request that fails upstream, with Basic credentials.
    let req = client
        .builder(Method::GET, "/status/401")
        .header("authorization", format!("Basic {}", SECRETS[1]))
        .body(empty())
        .unwrap();
    let resp = client.send(req).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    body_bytes(resp.into_body()).await;
}

fn assert_no_secrets(log: &str) {
    for s in SECRETS {
        assert!(
            !log.contains(s),
            "credential {s:?} appears in the log:\n{log}"
        );
    }
}

#[tokio::test]
async fn authorization_never_logged_and_requests_are_logged() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx.proxy().start().await;
    let path = "/logcheck/manifests/latest";
    make_secret_requests(&fx, &proxy, path).await;
    let log = proxy.wait_for_log(path).await;
    // Give a late line (e.g. the 401) a moment to land, then look again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = if proxy.stderr().len() > log.len() {
        proxy.stderr()
    } else {
        log
    };
    assert_no_secrets(&log);
    let line = log.lines().find(|l| l.contains(path)).unwrap();
    for want in ["GET", "200", "upstream.test"] {
        assert!(
            line.contains(want),
            "request log line lacks {want:?}: {line}"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("/status/401") && l.contains("401")),
        "no log line for the 401 request:\n{log}"
    );
}

#[tokio::test]
async fn json_log_format_writes_json_lines_without_secrets() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx.proxy().args(["--log-format", "json"]).start().await;
    let path = "/jsonlog/blobs/x";
    make_secret_requests(&fx, &proxy, path).await;
    let log = proxy.wait_for_log("jsonlog").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = if proxy.stderr().len() > log.len() {
        proxy.stderr()
    } else {
        log
    };
    assert_no_secrets(&log);
    let line = log.lines().find(|l| l.contains("jsonlog")).unwrap().trim();
    assert!(
        line.starts_with('{') && line.ends_with('}'),
        "with --log-format json the request line should be a JSON object: {line}"
    );
    assert!(line.contains("200"), "{line}");
    for l in log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(l.trim_start().starts_with('{'), "non-JSON log line: {l}");
    }
}

// ---------------------------------------------------------------------------
// 11. Graceful shutdown
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_inflight_download_then_exits_zero() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let mut proxy = fx.proxy().start().await;
    let mut client = proxy.intercepted("upstream.test", Alpn::Http11).await;

    // 24 chunks of 64 KiB, 100 ms apart: about 2.4 s in flight.
    let total: u64 = 24 * 65536;
    let resp = client
        .get(&format!("/bytes/{total}?chunk=65536&delay_ms=100"))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut check = PatternCheck::default();
    use http_body_util::BodyExt;
    // Wait for the first bytes so the download is surely in flight.
    while check.len == 0 {
        let frame = within("first chunk", STEP_TIMEOUT, body.frame())
            .await
            .expect("body ended early")
            .expect("body error");
        if let Ok(d) = frame.into_data() {
            check.feed(&d);
        }
    }
    let signalled = Instant::now();
    proxy.sigterm();

    // New connections are no longer served while the download drains.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = tokio::time::timeout(
        Duration::from_millis(1500),
        raw_exchange(
            proxy.addr,
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        ),
    )
    .await;
    if let Ok(Ok(r)) = &fresh {
        assert_ne!(
            r.status, 200,
            "a new connection was served after SIGTERM (should stop accepting)"
        );
    }

    while let Some(frame) = within("draining download", STEP_TIMEOUT, body.frame()).await {
        let frame = frame.unwrap_or_else(|e| {
            panic!(
                "in-flight download cut after {} of {total} bytes by SIGTERM: {e}",
                check.len
            )
        });
        if let Ok(d) = frame.into_data() {
            check.feed(&d);
        }
    }
    assert_eq!(check.len, total, "download incomplete after SIGTERM");
    assert!(check.ok(), "bytes differ at {:?}", check.first_mismatch);
    drop(client);

    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("regcache still running 10 s after the drained download"));
    assert!(
        status.success(),
        "exit status after SIGTERM should be 0, got {status}; stderr:\n{}",
        proxy.stderr()
    );
    eprintln!("SIGTERM to exit: {:?}", signalled.elapsed());
}

#[tokio::test]
async fn sigint_idle_exits_zero_promptly() {
    let mut proxy = ProxyBuilder::new().start().await;
    send_signal(proxy.pid(), Signal::INT);
    let status = proxy
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("regcache should exit within 5 s of SIGINT when idle");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn sigterm_with_idle_keepalive_tunnel_exits_promptly() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let mut proxy = fx.proxy().start().await;
    // An intercepted connection that has finished its request and sits idle.
    let mut client = proxy.intercepted("upstream.test", Alpn::Http11).await;
    let resp = client.get("/idle").await;
    body_bytes(resp.into_body()).await;
    proxy.sigterm();
    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("regcache should not wait forever on an idle keep-alive connection after SIGTERM");
    assert!(status.success(), "exit status {status}");
    drop(client);
}
