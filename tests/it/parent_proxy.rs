//! regcache behind a parent proxy (`--upstream-proxy`): registry requests and
//! plain tunnels leave through `CONNECT host:port` to the parent, with Basic
//! credentials; hosts in `--upstream-no-proxy` are reached directly; a parent
//! that refuses gives the client a 502 that says why, and regcache never
//! writes the parent's password anywhere.
//!
//! The parent here is [`Relay`], a minimal in-process CONNECT proxy that
//! records what it was asked and maps target names to loopback ports itself,
//! the way a real parent proxy would resolve them. (`--resolve` is no help
//! for the registry host: a host with a resolve entry goes direct.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::support::http::{basic, body_string, HttpClient};
use crate::support::proxy::ProxyBuilder;
use crate::support::tls::{connect_tunnel, peer_leaf, tls_connect, Alpn};
use crate::support::upstream::{Fixture, UpstreamKind};
use crate::support::{free_port, send_signal, within, Signal, STEP_TIMEOUT};
use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A target the relay answers itself: 200, then this banner in the same
/// write, then an echo of whatever the client sends.
const BANNER_TARGET: &str = "banner.test:443";
const BANNER: &[u8] = b"HELLO FROM THE FAR END\r\n";

/// One CONNECT as the relay saw it.
#[derive(Debug, Clone)]
struct SeenConnect {
    target: String,
    host: Option<String>,
    proxy_authorization: Option<String>,
}

/// A minimal CONNECT proxy on 127.0.0.1.
struct Relay {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenConnect>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// `routes` map CONNECT targets to addresses; `password` is the only
    /// password accepted for user `user` (407 otherwise).
    async fn start(routes: &[(&str, SocketAddr)], password: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<SeenConnect>>> = Arc::default();
        let routes: Arc<HashMap<String, SocketAddr>> = Arc::new(
            routes
                .iter()
                .map(|(target, addr)| (target.to_string(), *addr))
                .collect(),
        );
        let expected = basic("user", password);
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (seen, routes, expected) = (seen2.clone(), routes.clone(), expected.clone());
                tokio::spawn(relay_one(client, seen, routes, expected));
            }
        });
        Relay { addr, seen, task }
    }

    fn seen(&self) -> Vec<SeenConnect> {
        self.seen.lock().unwrap().clone()
    }
}

async fn relay_one(
    mut client: TcpStream,
    seen: Arc<Mutex<Vec<SeenConnect>>>,
    routes: Arc<HashMap<String, SocketAddr>>,
    expected: String,
) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match client.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default();
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let target = match request_line.split(' ').collect::<Vec<_>>()[..] {
        ["CONNECT", target, "HTTP/1.1"] => target.to_string(),
        _ => {
            let _ = client
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
            return;
        }
    };
    let authorization = header("proxy-authorization");
    seen.lock().unwrap().push(SeenConnect {
        target: target.clone(),
        host: header("host"),
        proxy_authorization: authorization.clone(),
    });
    if authorization.as_deref() != Some(expected.as_str()) {
        let _ = client
            .write_all(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                  Proxy-Authenticate: Basic realm=\"relay\"\r\n\
                  Content-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
        return;
    }
    if target == BANNER_TARGET {
        let mut reply = b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec();
        reply.extend_from_slice(BANNER);
        let _ = client.write_all(&reply).await;
        let (mut rd, mut wr) = client.into_split();
        let _ = tokio::io::copy(&mut rd, &mut wr).await;
        return;
    }
    let upstream = match routes.get(&target) {
        Some(addr) => TcpStream::connect(addr).await.ok(),
        None => None,
    };
    let Some(mut upstream) = upstream else {
        let _ = client
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    };
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_ok()
    {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}

fn parent_url(password: &str, relay: &Relay) -> String {
    format!("http://user:{password}@127.0.0.1:{}", relay.addr.port())
}

#[tokio::test]
async fn registry_requests_go_through_the_parent_with_its_credentials() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let relay = Relay::start(&[("registry-1.docker.io:443", fx.upstream.addr)], "p@ss w").await;
    // Percent-encoded in the URL, decoded in the Basic credentials.
    let url = parent_url("p%40ss%20w", &relay);
    let proxy = ProxyBuilder::new()
        .upstream_ca(&fx.ca_file)
        .args(["--upstream-proxy", &url])
        .start()
        .await;

    let mut client = proxy.intercepted("registry-1.docker.io", Alpn::Both).await;
    let resp = client.get("/echo/through-parent").await;
    assert_eq!(resp.status(), StatusCode::OK, "stderr:\n{}", proxy.stderr());
    assert_eq!(
        body_string(resp.into_body()).await,
        "GET /echo/through-parent\n"
    );

    let seen = relay.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].target, "registry-1.docker.io:443");
    assert_eq!(seen[0].host.as_deref(), Some("registry-1.docker.io:443"));
    assert_eq!(
        seen[0].proxy_authorization.as_deref(),
        Some(basic("user", "p@ss w").as_str())
    );
    // TLS inside the tunnel is regcache's, to the registry's real name.
    let at_upstream = fx.upstream.wait_for("/echo/through-parent").await;
    assert_eq!(at_upstream.sni.as_deref(), Some("registry-1.docker.io"));
    let stderr = proxy.stderr();
    assert!(
        !stderr.contains("p@ss") && !stderr.contains("p%40ss"),
        "{stderr}"
    );

    // Without --upstream-ca the same path fails: regcache verifies the
    // upstream's certificate through the parent too.
    let untrusting = ProxyBuilder::new()
        .args(["--upstream-proxy", &url])
        .start()
        .await;
    let mut client = untrusting
        .intercepted("registry-1.docker.io", Alpn::Http11)
        .await;
    let resp = client.get("/echo/unverified").await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body = body_string(resp.into_body()).await;
    assert!(body.to_ascii_lowercase().contains("certificate"), "{body}");
    assert!(fx.upstream.seen_path("/echo/unverified").is_empty());
}

#[tokio::test]
async fn a_refusing_parent_is_a_502_that_says_why_and_hides_the_password() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let relay = Relay::start(
        &[
            ("registry-1.docker.io:443", fx.upstream.addr),
            ("other.test:443", fx.upstream.addr),
        ],
        "right",
    )
    .await;
    let secret = "Wr0ngS3cret";
    let proxy = ProxyBuilder::new()
        .upstream_ca(&fx.ca_file)
        .args(["--upstream-proxy", &parent_url(secret, &relay)])
        .start()
        .await;

    let mut client = proxy.intercepted("registry-1.docker.io", Alpn::Both).await;
    let resp = client.get("/echo/refused").await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body = body_string(resp.into_body()).await;
    assert!(
        body.contains("parent proxy answered 407 Proxy Authentication Required"),
        "{body}"
    );
    let parent = format!("upstream_proxy http://127.0.0.1:{}", relay.addr.port());
    assert!(body.contains(&parent), "{body}");

    // A plain tunnel through the same parent fails the same way.
    assert_eq!(
        connect_tunnel(proxy.addr, "other.test:443").await.err(),
        Some(502)
    );
    assert_eq!(relay.seen().len(), 2, "{:?}", relay.seen());
    assert!(fx.upstream.seen().is_empty());

    let stderr = proxy.stderr();
    assert!(stderr.contains("407"), "the refusal is logged:\n{stderr}");
    let encoded = basic("user", secret);
    let encoded = encoded.trim_start_matches("Basic ");
    assert!(
        !stderr.contains(secret) && !stderr.contains(encoded),
        "{stderr}"
    );
    assert!(!body.contains(secret) && !body.contains(encoded), "{body}");
}

#[tokio::test]
async fn no_proxy_hosts_are_reached_directly() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let relay = Relay::start(&[], "pw").await;
    let port = fx.upstream.port();
    let proxy = ProxyBuilder::new()
        .upstream_ca(&fx.ca_file)
        .args(["--upstream-proxy", &parent_url("pw", &relay)])
        .args(["--upstream-no-proxy", "127.0.0.1"])
        .args(["--upstream-no-proxy", "localhost"])
        .intercept("127.0.0.1")
        .args(["--connect-ports", &port.to_string()])
        .start()
        .await;

    // Intercepted: regcache's own client connects directly.
    let target = format!("127.0.0.1:{port}");
    let tcp = proxy.tunnel(&target).await;
    let tls = tls_connect(tcp, "127.0.0.1", vec![proxy.ca_der()], Alpn::Both, true)
        .await
        .expect("TLS to the intercepted IP");
    let mut client = HttpClient::over_tls(tls, &target).await;
    let resp = client.get("/echo/direct").await;
    assert_eq!(resp.status(), StatusCode::OK, "stderr:\n{}", proxy.stderr());
    assert_eq!(body_string(resp.into_body()).await, "GET /echo/direct\n");

    // A plain tunnel to a no-proxy host: directly too.
    let tcp = proxy.tunnel(&format!("localhost:{port}")).await;
    let tls = tls_connect(
        tcp,
        "127.0.0.1",
        vec![fx.ca.cert_der.clone()],
        Alpn::Http11,
        true,
    )
    .await
    .expect("TLS to the upstream itself through the tunnel");
    let mut client = HttpClient::over_tls(tls, "localhost").await;
    let resp = client.get("/echo/direct-tunnel").await;
    assert_eq!(resp.status(), StatusCode::OK);

    assert!(relay.seen().is_empty(), "{:?}", relay.seen());
}

#[tokio::test]
async fn tunnels_go_through_the_parent_found_by_its_resolve_entry() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let relay = Relay::start(&[("other.test:443", fx.upstream.addr)], "pw").await;
    // The parent's own name is looked up in the --resolve map.
    let proxy = ProxyBuilder::new()
        .args(["--upstream-proxy", "http://user:pw@parent.test:3128"])
        .resolve("parent.test", relay.addr.port())
        .start()
        .await;

    let tcp = proxy.tunnel("other.test:443").await;
    // The client's TLS goes end to end: it sees the upstream's own
    // certificate, verified against the test CA.
    let tls = tls_connect(
        tcp,
        "other.test",
        vec![fx.ca.cert_der.clone()],
        Alpn::Http11,
        true,
    )
    .await
    .expect("TLS to other.test through regcache and the parent");
    assert_eq!(Some(peer_leaf(&tls)), fx.upstream.leaf_der.clone());
    let mut client = HttpClient::over_tls(tls, "other.test").await;
    let resp = client.get("/echo/tunnelled").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_string(resp.into_body()).await, "GET /echo/tunnelled\n");

    // Bytes the far end sends right after the parent's 200 reach the client.
    let mut tcp = proxy.tunnel(BANNER_TARGET).await;
    let mut banner = vec![0u8; BANNER.len()];
    within("the banner", STEP_TIMEOUT, tcp.read_exact(&mut banner))
        .await
        .expect("banner through the tunnel");
    assert_eq!(banner, BANNER);
    tcp.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    within("the echo", STEP_TIMEOUT, tcp.read_exact(&mut echo))
        .await
        .unwrap();
    assert_eq!(&echo, b"ping");

    let targets: Vec<_> = relay.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["other.test:443", BANNER_TARGET]);
    assert!(relay
        .seen()
        .iter()
        .all(|s| s.proxy_authorization.as_deref() == Some(basic("user", "pw").as_str())));
}

// ---------------------------------------------------------------------------
// A real parent: Debian's squid, when installed
// ---------------------------------------------------------------------------

/// squid in the foreground on a free port, requiring Basic `user:pw`,
/// allowing CONNECT to `ports`, resolving `names` to 127.0.0.1 itself.
struct Squid {
    port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Squid {
    fn drop(&mut self) {
        // SIGTERM lets squid stop its helpers; SIGKILL if it lingers.
        send_signal(self.child.id(), Signal::TERM);
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_program(name: &str, extra_dirs: &[&str]) -> Option<std::path::PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(extra_dirs.iter().copied())
        .map(|dir| std::path::Path::new(dir).join(name))
        .find(|p| p.is_file())
}

impl Squid {
    /// None (and a note on stderr) when squid or its Basic helper is absent.
    async fn start(ports: &[u16], names: &[&str]) -> Option<Squid> {
        let squid = find_program("squid", &["/usr/sbin"]);
        let helper = std::path::Path::new("/usr/lib/squid/basic_ncsa_auth");
        let openssl = find_program("openssl", &[]);
        let (Some(squid), true, Some(openssl)) = (squid, helper.is_file(), openssl) else {
            eprintln!("skipped: needs squid, {} and openssl", helper.display());
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // squid started as root drops to its own user, which must write here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let hash = std::process::Command::new(openssl)
            .args(["passwd", "-apr1", "pw"])
            .output()
            .unwrap();
        let hash = String::from_utf8(hash.stdout).unwrap();
        std::fs::write(d.join("passwd"), format!("user:{}\n", hash.trim())).unwrap();
        let hosts: String = names.iter().map(|n| format!("127.0.0.1 {n}\n")).collect();
        std::fs::write(d.join("hosts"), hosts).unwrap();
        let port = free_port();
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let conf = format!(
            "http_port 127.0.0.1:{port}\n\
             pid_filename {d}/squid.pid\n\
             cache_log {d}/cache.log\n\
             access_log stdio:{d}/access.log\n\
             coredump_dir {d}\n\
             hosts_file {d}/hosts\n\
             pinger_enable off\n\
             shutdown_lifetime 0 seconds\n\
             auth_param basic program {helper} {d}/passwd\n\
             acl authed proxy_auth REQUIRED\n\
             acl CONNECT method CONNECT\n\
             acl tunnel_ports port {ports}\n\
             http_access deny CONNECT !tunnel_ports\n\
             http_access allow authed\n\
             http_access deny all\n",
            d = d.display(),
            helper = helper.display(),
            ports = ports.join(" "),
        );
        std::fs::write(d.join("squid.conf"), conf).unwrap();
        let child = std::process::Command::new(squid)
            .args(["-N", "-d", "1", "-f"])
            .arg(d.join("squid.conf"))
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(d.join("out.log")).unwrap())
            .stderr(std::fs::File::create(d.join("err.log")).unwrap())
            .spawn()
            .unwrap();
        let mut squid = Squid {
            port,
            child,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + STEP_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            let exited = squid.child.try_wait().unwrap();
            if exited.is_some() || std::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(squid._dir.path().join("err.log"));
                panic!("squid did not start ({exited:?}): {log:?}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Some(squid)
    }
}

#[tokio::test]
async fn squid_as_the_parent() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let up = fx.upstream.port();
    let Some(squid) = Squid::start(&[up], &["upstream.test", "other.test"]).await else {
        return;
    };
    let proxy_with = |password: &str| {
        ProxyBuilder::new()
            .upstream_ca(&fx.ca_file)
            .intercept("upstream.test")
            .args(["--connect-ports", &up.to_string()])
            .args([
                "--upstream-proxy",
                &format!("http://user:{password}@127.0.0.1:{}", squid.port),
            ])
    };
    let proxy = proxy_with("pw").start().await;

    // An intercepted registry request: regcache -> squid -> upstream.
    let target = format!("upstream.test:{up}");
    let tcp = proxy.tunnel(&target).await;
    let tls = tls_connect(tcp, "upstream.test", vec![proxy.ca_der()], Alpn::Both, true)
        .await
        .expect("TLS to the intercepted host");
    let mut client = HttpClient::over_tls(tls, &target).await;
    let resp = client.get("/echo/via-squid").await;
    assert_eq!(resp.status(), StatusCode::OK, "stderr:\n{}", proxy.stderr());
    let seen = fx.upstream.wait_for("/echo/via-squid").await;
    assert_eq!(seen.sni.as_deref(), Some("upstream.test"));

    // A plain tunnel: the client's own TLS, end to end.
    let tcp = proxy.tunnel(&format!("other.test:{up}")).await;
    let tls = tls_connect(
        tcp,
        "other.test",
        vec![fx.ca.cert_der.clone()],
        Alpn::Http11,
        true,
    )
    .await
    .expect("TLS to other.test through regcache and squid");
    let mut client = HttpClient::over_tls(tls, "other.test").await;
    let resp = client.get("/echo/squid-tunnel").await;
    assert_eq!(resp.status(), StatusCode::OK);

    // squid refuses a wrong password with 407.
    let wrong = proxy_with("nope").start().await;
    let tcp = wrong.tunnel(&target).await;
    let tls = tls_connect(
        tcp,
        "upstream.test",
        vec![wrong.ca_der()],
        Alpn::Http11,
        true,
    )
    .await
    .expect("TLS to the intercepted host");
    let mut client = HttpClient::over_tls(tls, &target).await;
    let resp = client.get("/echo/refused-by-squid").await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body = body_string(resp.into_body()).await;
    assert!(
        body.contains("parent proxy answered 407 Proxy Authentication Required"),
        "{body}"
    );
}
