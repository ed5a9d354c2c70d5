//! Self-checks of the test harness itself (no regcache involved): the
//! in-process upstream, the TLS client and the pattern bodies. When a proxy
//! test fails, these say whether the harness or regcache is at fault, and the
//! timings give the no-proxy baseline for the big transfers.

use std::time::Instant;

use crate::support::http::{body_string, full, raw, HttpClient};
use crate::support::pattern::pattern;
use crate::support::pattern::{check_pattern_body, PatternBody, PatternCheck, PATTERN_LEN};
use crate::support::tls::{tls_connect, Alpn};
use crate::support::upstream::{Fixture, UpstreamKind};
use hyper::{Method, StatusCode};
use tokio::net::TcpStream;

async fn direct(fx: &Fixture, alpn: Alpn) -> HttpClient {
    let tcp = TcpStream::connect(fx.upstream.addr).await.unwrap();
    let tls = tls_connect(
        tcp,
        "upstream.test",
        vec![fx.ca.cert_der.clone()],
        alpn,
        true,
    )
    .await
    .expect("direct TLS to the upstream with the test CA");
    HttpClient::over_tls(tls, "upstream.test").await
}

#[tokio::test]
async fn upstream_routes_work_directly() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    for alpn in [Alpn::Http11, Alpn::H2] {
        let mut c = direct(&fx, alpn).await;
        assert_eq!(c.is_h2(), alpn == Alpn::H2);
        let req = c.builder(Method::POST, "/e?q=1").body(full("x")).unwrap();
        let resp = c.send(req).await;
        assert_eq!(body_string(resp.into_body()).await, "POST /e?q=1\nx");

        let resp = c.get("/bytes/3000001?chunk=7777").await;
        let check = check_pattern_body(resp.into_body()).await.unwrap();
        assert_eq!(check.len, 3_000_001);
        assert!(check.ok());

        let req = c
            .builder(Method::PUT, "/upload/x")
            .body(
                PatternBody::new(2_500_000)
                    .chunk(10_000)
                    .without_length()
                    .boxed(),
            )
            .unwrap();
        let resp = c.send(req).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(
            body_string(resp.into_body()).await,
            "received=2500000 ok=true err="
        );

        let resp = c.get("/status/404").await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }
    let seen = fx.upstream.seen_path("/e");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].sni.as_deref(), Some("upstream.test"));
    assert_eq!(seen[0].alpn.as_deref(), Some("http/1.1"));
    assert_eq!(seen[1].alpn.as_deref(), Some("h2"));
}

#[test]
fn pattern_check_detects_a_flipped_byte() {
    let mut good = PatternCheck::default();
    let p = pattern();
    good.feed(&p[..1000]);
    good.feed(&p[1000..]);
    good.feed(&p[..10]);
    assert!(good.ok());
    assert_eq!(good.len, PATTERN_LEN as u64 + 10);

    let mut bad = PatternCheck::default();
    let mut v = p[..5000].to_vec();
    v[4321] ^= 1;
    bad.feed(&v);
    assert_eq!(bad.first_mismatch, Some(4321));
}

#[tokio::test]
async fn raw_exchange_reads_plain_responses() {
    let fx = Fixture::new(UpstreamKind::Plain).await;
    let r = raw(
        fx.upstream.addr,
        b"GET /raw HTTP/1.1\r\nHost: plain.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"GET /raw\n");
    // hyper's own reaction to garbage, as a reference for the proxy tests.
    let r = raw(fx.upstream.addr, b"hello world\r\n\r\n").await;
    assert_eq!(r.status, 400);
}

/// Baseline throughput of the harness alone (debug build), 256 MiB over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_download_baseline() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let mut c = direct(&fx, Alpn::Http11).await;
    let total = 256u64 << 20;
    let t = Instant::now();
    let resp = c.get(&format!("/bytes/{total}")).await;
    let check = check_pattern_body(resp.into_body()).await.unwrap();
    assert_eq!(check.len, total);
    assert!(check.ok());
    eprintln!(
        "direct 256 MiB over TLS without the proxy: {:?}",
        t.elapsed()
    );
}
