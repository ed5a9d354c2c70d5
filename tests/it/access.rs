//! Who may use the proxy, seen from a client: the `allow` networks (403 and a
//! closed connection for anyone else) and proxy users (`--proxy-users`, an
//! htpasswd file of bcrypt hashes; 407 without valid `Proxy-Authorization`,
//! except for the set-up pages). Every test spawns the real `regcache` binary.
//!
//! CONNECT to a port outside `connect_ports` (403) is covered by
//! `connect_to_disallowed_ports_is_403` in [`crate::proxy`].

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::support::http::{basic, body_string, empty, raw, HttpClient, RawResponse};
use crate::support::proxy::{run_regcache, users_file, Proxy};
use crate::support::tls::{connect_tunnel, connect_tunnel_as, Alpn};
use crate::support::upstream::{Fixture, UpstreamKind};
use crate::support::{free_port, within, STEP_TIMEOUT};
use hyper::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Sends `request` on a fresh connection and reads until the proxy closes it.
async fn exchange_until_closed(proxy: &Proxy, request: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    within(
        "the proxy closing a refused connection",
        STEP_TIMEOUT,
        s.read_to_end(&mut out),
    )
    .await
    .expect("read until the proxy closes");
    String::from_utf8_lossy(&out).into_owned()
}

fn assert_407(r: &RawResponse, what: &str) {
    assert_eq!(r.status, 407, "{what}: expected 407, got head {:?}", r.head);
    assert_eq!(
        r.header("proxy-authenticate").as_deref(),
        Some("Basic realm=\"regcache\""),
        "{what}: head {:?}",
        r.head
    );
}

// ---------------------------------------------------------------------------
// 1. Client networks
// ---------------------------------------------------------------------------

#[tokio::test]
async fn client_outside_allow_gets_403_and_a_closed_connection() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let proxy = fx
        .proxy()
        .args(["--allow", "10.0.0.0/8"])
        .ready_status(403)
        .start()
        .await;

    let r = raw(
        proxy.addr,
        b"CONNECT upstream.test:443 HTTP/1.1\r\nHost: upstream.test:443\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 403, "CONNECT from 127.0.0.1: {:?}", r.head);
    assert_eq!(r.header("connection").as_deref(), Some("close"));

    for request in [
        &b"GET /ca.crt HTTP/1.1\r\nHost: localhost\r\n\r\n"[..],
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET http://upstream.test/v2/ HTTP/1.1\r\nHost: upstream.test\r\n\r\n",
    ] {
        // Keep-alive requests, yet the proxy answers and closes.
        let answer = exchange_until_closed(&proxy, request).await;
        let shown = String::from_utf8_lossy(&request[..20]);
        assert!(
            answer.starts_with("HTTP/1.1 403"),
            "{shown:?} from 127.0.0.1: {answer:?}"
        );
        assert!(!answer.contains("BEGIN CERTIFICATE"), "{answer}");
    }
    assert!(
        matches!(
            connect_tunnel(proxy.addr, "upstream.test:443").await,
            Err(403)
        ),
        "CONNECT through the harness client should be refused"
    );

    let log = proxy.wait_for_log("not in allow").await;
    let line = log.lines().find(|l| l.contains("not in allow")).unwrap();
    assert!(
        line.contains("127.0.0.1"),
        "the log line names the client: {line}"
    );
    assert!(
        fx.upstream.seen().is_empty(),
        "a refused client reached the upstream"
    );
}

/// Listens on the IPv4-mapped IPv6 address `[::ffff:127.0.0.1]`, so that
/// clients connecting to 127.0.0.1 appear as `::ffff:127.0.0.1`.
async fn proxy_on_mapped_socket(fx: &Fixture, ca: &Path, allow: &str, ready: u16) -> Proxy {
    let port = free_port();
    fx.proxy()
        .without_listen_flags()
        .ca_dir(ca)
        .args(["--listen", &format!("[::ffff:127.0.0.1]:{port}")])
        .args(["--ca-dir", ca.to_str().unwrap(), "--allow", allow])
        .ready_status(ready)
        .start_on(port)
        .await
}

#[tokio::test]
async fn ipv4_mapped_clients_match_ipv4_networks() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let ca = tempfile::tempdir().unwrap();
    let open = proxy_on_mapped_socket(&fx, ca.path(), "127.0.0.0/8", 200).await;
    let mut client = open.intercepted("upstream.test", Alpn::Http11).await;
    let resp = client.get("/mapped").await;
    assert_eq!(resp.status(), StatusCode::OK);
    drop(open);

    let closed = proxy_on_mapped_socket(&fx, ca.path(), "10.0.0.0/8", 403).await;
    assert_eq!(
        connect_tunnel(closed.addr, "upstream.test:443").await.err(),
        Some(403)
    );
}

// ---------------------------------------------------------------------------
// 2. Proxy users
// ---------------------------------------------------------------------------

const PASSWORD: &str = "SECRET-pw-correct-horse";

#[tokio::test]
async fn proxy_users_need_valid_credentials_except_for_setup_pages() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let plain = Fixture::new(UpstreamKind::Plain).await;
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path(), &[("alice", PASSWORD), ("bob", "b")], 0o600);
    let proxy = fx
        .proxy()
        .resolve("plain.test", plain.upstream.port())
        .args(["--proxy-users", users.to_str().unwrap()])
        .start()
        .await;
    let good = basic("alice", PASSWORD);

    // Refused: CONNECT without, or with wrong, credentials.
    let wrong = basic("alice", "SECRET-pw-wrong");
    let unknown = basic("mallory", PASSWORD);
    for (what, auth) in [
        ("no credentials", None),
        ("a wrong password", Some(wrong.as_str())),
        ("an unknown user", Some(unknown.as_str())),
        ("a bearer token", Some("Bearer SECRET-token")),
    ] {
        let mut req =
            "CONNECT upstream.test:443 HTTP/1.1\r\nHost: upstream.test:443\r\n".to_string();
        if let Some(auth) = auth {
            req.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
        }
        req.push_str("\r\n");
        assert_407(
            &raw(proxy.addr, req.as_bytes()).await,
            &format!("CONNECT with {what}"),
        );
    }
    // Absolute-form and other origin-form pages need credentials too.
    let r = raw(
        proxy.addr,
        b"GET http://plain.test/abs HTTP/1.1\r\nHost: plain.test\r\n\r\n",
    )
    .await;
    assert_407(&r, "absolute-form without credentials");
    let r = raw(
        proxy.addr,
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert_407(&r, "GET /metrics without credentials");

    // Open: the set-up pages.
    for page in ["/ca.crt", "/healthz", "/setup"] {
        let req = format!("GET {page} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let r = raw(proxy.addr, req.as_bytes()).await;
        assert_eq!(r.status, 200, "{page} without credentials: {:?}", r.head);
        if page == "/ca.crt" {
            assert_eq!(r.body, proxy.ca_pem());
        }
    }

    // Accepted: CONNECT with the right credentials, twice (the second is
    // answered from memory), and the tunnel reaches the upstream.
    for round in ["first", "second"] {
        let mut client = proxy
            .intercepted_as("upstream.test", Alpn::Http11, Some(&good))
            .await;
        let path = format!("/access/{round}");
        let resp = client.get(&path).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_string(resp.into_body()).await, format!("GET {path}\n"));
    }
    // A user whose password is a single letter works as well.
    let mut client = proxy
        .intercepted_as("upstream.test", Alpn::Http11, Some(&basic("bob", "b")))
        .await;
    assert_eq!(client.get("/access/bob").await.status(), StatusCode::OK);
    // Credentials do not open ports outside connect_ports.
    let refused = connect_tunnel_as(proxy.addr, "upstream.test:25", Some(&good))
        .await
        .expect_err("CONNECT to port 25 must be refused");
    assert!(
        refused.head.starts_with("HTTP/1.1 403"),
        "{:?}",
        refused.head
    );

    // Absolute-form with credentials is forwarded without them.
    let mut client = HttpClient::plain_h1(proxy.addr, "plain.test").await;
    let req = hyper::Request::builder()
        .method(Method::GET)
        .uri("http://plain.test/abs/authed")
        .header("host", "plain.test")
        .header("proxy-authorization", &good)
        .body(empty())
        .unwrap();
    let resp = client.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = plain.upstream.wait_for("/abs/authed").await;
    assert!(
        seen.headers.get("proxy-authorization").is_none(),
        "Proxy-Authorization reached the upstream"
    );
    assert!(plain.upstream.seen_path("/abs").len() == 1);
    for seen in fx.upstream.seen() {
        assert!(seen.headers.get("proxy-authorization").is_none());
    }

    // The refusals are logged, the credentials never.
    let log = proxy.wait_for_log("/abs/authed").await;
    assert!(log.contains("407"), "no 407 in the log:\n{log}");
    assert!(
        log.contains("wrong password"),
        "no reason in the log:\n{log}"
    );
    let encoded = good.trim_start_matches("Basic ");
    for secret in [PASSWORD, encoded, "SECRET-pw-wrong", "SECRET-token"] {
        assert!(
            !log.contains(secret),
            "{secret:?} appears in the log:\n{log}"
        );
    }
}

// ---------------------------------------------------------------------------
// 3. A users file that cannot be used stops regcache at start
// ---------------------------------------------------------------------------

/// Runs `regcache serve --proxy-users FILE`; returns the exit code and stderr.
fn serve_with_users(dir: &Path, file: &Path) -> (Option<i32>, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let ca = dir.join("ca");
    let cache = dir.join("cache");
    let out = run_regcache(&[
        "serve",
        "--listen",
        &listen,
        "--ca-dir",
        ca.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--proxy-users",
        file.to_str().unwrap(),
    ]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_error(result: (Option<i32>, String), mentions: &[&str]) {
    let (code, stderr) = result;
    assert_eq!(code, Some(2), "exit code; stderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected; stderr:\n{stderr}");
    for m in mentions {
        assert!(lines[0].contains(m), "{m:?} not in {:?}", lines[0]);
    }
}

#[test]
fn unusable_users_file_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let exposed = users_file(dir.path(), &[("alice", PASSWORD)], 0o644);
    let path = exposed.to_str().unwrap();
    assert_one_line_error(
        serve_with_users(dir.path(), &exposed),
        &[path, "readable by other users", "chmod 600"],
    );

    let malformed = dir.path().join("malformed");
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    std::fs::write(&malformed, format!("alice:{hash}\nbob\n")).unwrap();
    std::fs::set_permissions(&malformed, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_one_line_error(serve_with_users(dir.path(), &malformed), &["line 2"]);

    let md5 = dir.path().join("md5");
    std::fs::write(&md5, "alice:$apr1$abcdefgh$0123456789abcdefghijkl\n").unwrap();
    std::fs::set_permissions(&md5, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_one_line_error(serve_with_users(dir.path(), &md5), &["line 1", "bcrypt"]);

    let missing = dir.path().join("missing");
    assert_one_line_error(serve_with_users(dir.path(), &missing), &["missing"]);
    assert!(
        !dir.path().join("cache").exists(),
        "regcache created its cache before refusing the users file"
    );
}
