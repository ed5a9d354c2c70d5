//! The command line, configuration and the regcache CA: `serve` creating and
//! reusing the CA, `/ca.crt` and `/setup`, the `ca` subcommands, and the
//! contract for bad invocations (one line on stderr, exit code 2).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::support::free_port;
use crate::support::http::{body_string, empty, raw};
use crate::support::proxy::{run_regcache, ProxyBuilder};
use crate::support::tls::{certs_from_pem, connect_tunnel, Alpn};
use crate::support::upstream::{Fixture, UpstreamKind};
use hyper::{Method, StatusCode};

fn key_mode(dir: &Path) -> u32 {
    std::fs::metadata(dir.join("ca.key"))
        .expect("ca.key exists")
        .permissions()
        .mode()
        & 0o777
}

fn assert_is_p256_ca(der: &[u8]) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("CA parses");
    let bc = cert
        .basic_constraints()
        .expect("basic constraints readable")
        .expect("CA has basic constraints");
    assert!(bc.value.ca, "CA certificate must have CA:TRUE");
    assert_eq!(
        cert.issuer().to_string(),
        cert.subject().to_string(),
        "CA should be self-signed"
    );
    let alg = &cert.public_key().algorithm;
    assert_eq!(
        alg.algorithm.to_id_string(),
        "1.2.840.10045.2.1",
        "CA key should be EC"
    );
    let curve = alg
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    assert_eq!(
        curve.as_deref(),
        Some("1.2.840.10045.3.1.7"),
        "CA key should be P-256"
    );
    assert!(
        cert.validity().is_valid(),
        "CA certificate should be valid now"
    );
}

#[tokio::test]
async fn first_start_creates_private_ca_served_at_ca_crt() {
    let proxy = ProxyBuilder::new().start().await;
    let pem = proxy.ca_pem();
    assert!(String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----"));
    assert_eq!(key_mode(&proxy.ca_dir), 0o600, "ca.key must be mode 0600");
    assert_is_p256_ca(&proxy.ca_der());

    let r = raw(
        proxy.addr,
        b"GET /ca.crt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(
        r.body,
        pem,
        "/ca.crt should serve the bytes of ca.crt; got:\n{}",
        String::from_utf8_lossy(&r.body)
    );
    // The key must not leak through the admin port.
    assert!(!String::from_utf8_lossy(&r.body).contains("PRIVATE KEY"));
}

#[tokio::test]
async fn second_start_reuses_the_same_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let (cert1, key1) = {
        let proxy = ProxyBuilder::new().ca_dir(&ca_dir).start().await;
        (
            proxy.ca_pem(),
            std::fs::read(ca_dir.join("ca.key")).unwrap(),
        )
    };
    let proxy = ProxyBuilder::new().ca_dir(&ca_dir).start().await;
    assert_eq!(proxy.ca_pem(), cert1, "ca.crt changed on the second start");
    assert_eq!(
        std::fs::read(ca_dir.join("ca.key")).unwrap(),
        key1,
        "ca.key changed on the second start"
    );
    let r = raw(
        proxy.addr,
        b"GET /ca.crt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.body, cert1);
    assert_eq!(key_mode(&ca_dir), 0o600);
}

#[tokio::test]
async fn setup_endpoint_serves_a_shell_script() {
    let proxy = ProxyBuilder::new().start().await;
    let r = raw(
        proxy.addr,
        b"GET /setup HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let body = String::from_utf8_lossy(&r.body);
    assert!(
        body.starts_with("#!"),
        "/setup should be a shell script:\n{body}"
    );
}

#[test]
fn ca_init_path_and_show() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("myca");
    let d = ca_dir.to_str().unwrap();

    let out = run_regcache(&["ca", "init", "--ca-dir", d]);
    assert!(
        out.status.success(),
        "ca init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = std::fs::read(ca_dir.join("ca.crt")).expect("ca init wrote ca.crt");
    assert!(ca_dir.join("ca.key").exists(), "ca init wrote ca.key");
    assert_eq!(key_mode(&ca_dir), 0o600);
    assert_is_p256_ca(&certs_from_pem(&pem)[0]);

    let out = run_regcache(&["ca", "path", "--ca-dir", d]);
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(
        std::fs::canonicalize(&printed).ok(),
        std::fs::canonicalize(ca_dir.join("ca.crt")).ok(),
        "ca path printed {printed:?}"
    );

    let out = run_regcache(&["ca", "show", "--ca-dir", d]);
    assert!(out.status.success());
    let shown = String::from_utf8_lossy(&out.stdout);
    let pem_text = String::from_utf8_lossy(&pem);
    assert!(
        shown.contains(pem_text.trim()),
        "ca show should print the PEM; printed:\n{shown}"
    );
    assert!(
        shown.lines().count() > pem_text.trim().lines().count(),
        "ca show should print details besides the PEM:\n{shown}"
    );
    assert!(
        !shown.contains("PRIVATE KEY"),
        "ca show must not print the key"
    );

    // init again on an existing CA does not silently replace it.
    let out = run_regcache(&["ca", "init", "--ca-dir", d]);
    assert_eq!(
        std::fs::read(ca_dir.join("ca.crt")).unwrap(),
        pem,
        "a second `ca init` replaced the CA (exit {}, stderr {})",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// Bad invocations: exit code 2, one line on stderr
// ---------------------------------------------------------------------------

/// Checks one bad invocation; returns what is wrong with regcache's answer.
fn usage_error_problems(args: &[&str], mention: &str) -> Vec<String> {
    one_line_failure_problems(args, 2, mention)
}

/// Check every case, then fail once listing all the problems.
fn assert_usage_errors(cases: &[(Vec<&str>, &str)]) {
    let problems: Vec<String> = cases
        .iter()
        .flat_map(|(args, mention)| usage_error_problems(args, mention))
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n----\n"));
}

fn assert_usage_error(args: &[&str], mention: &str) {
    assert_usage_errors(&[(args.to_vec(), mention)]);
}

fn serve_args<'a>(port: &'a str, dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["serve", "--listen", port, "--ca-dir", dir];
    v.extend_from_slice(extra);
    v
}

#[test]
fn unknown_flag_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let port = format!("127.0.0.1:{}", free_port());
    let d = dir.path().to_str().unwrap();
    assert_usage_error(&serve_args(&port, d, &["--no-such-flag"]), "--no-such-flag");
}

#[test]
fn bad_option_values_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let port = format!("127.0.0.1:{}", free_port());
    let d = dir.path().to_str().unwrap();
    assert_usage_errors(&[
        (serve_args(&port, d, &["--other-hosts", "maybe"]), "maybe"),
        (serve_args(&port, d, &["--log-format", "xml"]), "xml"),
        (
            serve_args(&port, d, &["--resolve", "no-equals-sign"]),
            "no-equals-sign",
        ),
        (serve_args("not-an-address", d, &[]), "not-an-address"),
    ]);
}

#[test]
fn missing_config_file_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope").join("regcache.toml");
    let m = missing.to_str().unwrap();
    assert_usage_error(&["serve", "--config", m], "regcache.toml");
}

#[test]
fn invalid_toml_config_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "listen = [\"unclosed\n").unwrap();
    assert_usage_error(&["serve", "--config", file.to_str().unwrap()], "bad.toml");
}

#[test]
fn unknown_config_key_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("unknown.toml");
    std::fs::write(
        &file,
        format!("listen = \"127.0.0.1:{}\"\nbogus_key = 1\n", free_port()),
    )
    .unwrap();
    assert_usage_error(&["serve", "--config", file.to_str().unwrap()], "bogus_key");
}

// ---------------------------------------------------------------------------
// Configuration sources that work
// ---------------------------------------------------------------------------

#[tokio::test]
async fn config_file_sets_every_foundation_option() {
    let fx = Fixture::new(UpstreamKind::Https).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let port = free_port();
    let up = fx.upstream.port();
    let toml = format!(
        r#"listen = "127.0.0.1:{port}"
ca_dir = "{ca}"
upstream_ca = ["{upca}"]
resolve = ["upstream.test=127.0.0.1:{up}", "other.test=127.0.0.1:{up}"]
intercept = ["upstream.test"]
other_hosts = "refuse"
connect_ports = [{up}]
"#,
        ca = ca_dir.display(),
        upca = fx.ca_file.display(),
    );
    let file = dir.path().join("regcache.toml");
    std::fs::write(&file, toml).unwrap();

    let proxy = ProxyBuilder::new()
        .without_listen_flags()
        .ca_dir(&ca_dir)
        .args(["--config", file.to_str().unwrap()])
        .start_on(port)
        .await;

    // intercept + resolve + upstream_ca
    let mut client = proxy.intercepted("upstream.test", Alpn::Http11).await;
    let req = client
        .builder(Method::GET, "/from-config")
        .body(empty())
        .unwrap();
    let resp = client.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_string(resp.into_body()).await, "GET /from-config\n");
    // other_hosts = refuse
    assert_eq!(
        connect_tunnel(proxy.addr, "other.test:443").await.err(),
        Some(403),
        "other_hosts = \"refuse\" from the config file"
    );
    // connect_ports: the upstream's port is allowed for CONNECT; 25 is not.
    let tcp = connect_tunnel(proxy.addr, &format!("upstream.test:{up}"))
        .await
        .unwrap_or_else(|s| panic!("CONNECT upstream.test:{up} (in connect_ports) answered {s}"));
    drop(tcp);
    assert_eq!(
        connect_tunnel(proxy.addr, "upstream.test:25").await.err(),
        Some(403)
    );
}

#[tokio::test]
async fn env_vars_set_listen_and_ca_dir() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("envca");
    let port = free_port();
    let proxy = ProxyBuilder::new()
        .without_listen_flags()
        .ca_dir(&ca_dir)
        .env("REGCACHE_LISTEN", &format!("127.0.0.1:{port}"))
        .env("REGCACHE_CA_DIR", ca_dir.to_str().unwrap())
        .start_on(port)
        .await;
    assert!(ca_dir.join("ca.crt").exists(), "REGCACHE_CA_DIR not used");
    proxy.assert_healthy("start from env").await;
}

#[tokio::test]
async fn flags_override_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let file = dir.path().join("regcache.toml");
    // The file names a port that is not the one the flag gives.
    std::fs::write(&file, format!("listen = \"127.0.0.1:{}\"\n", free_port())).unwrap();
    let proxy = ProxyBuilder::new()
        .ca_dir(&ca_dir)
        .args(["--config", file.to_str().unwrap()])
        .start()
        .await;
    proxy
        .assert_healthy("--listen overriding the config file")
        .await;
}

// ---------------------------------------------------------------------------
// Exit codes: 2 for usage, 1 for failures to start; defaults shown in --help
// ---------------------------------------------------------------------------

/// Checks one failing invocation: exit `code`, and a last line on stderr
/// that names the error and mentions `mention`. A usage error (code 2) is
/// the only line; a failure to start may follow the log lines of the start.
/// Returns what is wrong with regcache's answer.
fn one_line_failure_problems(args: &[&str], code: i32, mention: &str) -> Vec<String> {
    let out = run_regcache(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut problems = vec![];
    if out.status.code() != Some(code) {
        problems.push(format!(
            "regcache {args:?} should exit {code}; got {}; stderr:\n{stderr}",
            out.status
        ));
    }
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    if code == 2 && lines.len() != 1 {
        problems.push(format!(
            "regcache {args:?} should print a one-line error; stderr has {} lines:\n{stderr}",
            lines.len()
        ));
    }
    let last = lines.last().copied().unwrap_or_default();
    if !(last.starts_with("regcache: error: ") && last.contains(mention)) {
        problems.push(format!(
            "the error for {args:?} should mention {mention:?} on its last line; stderr:\n{stderr}"
        ));
    }
    problems
}

#[test]
fn invalid_config_values_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let port = format!("127.0.0.1:{}", free_port());
    let d = dir.path().to_str().unwrap();
    let file = dir.path().join("zero.toml");
    std::fs::write(&file, "client_idle_timeout = 0\n").unwrap();
    let f = file.to_str().unwrap();
    assert_usage_errors(&[
        (serve_args(&port, d, &["--cert-cache", "0"]), "cert_cache"),
        (
            serve_args(&port, d, &["--cache-size", "lots"]),
            "cache_size",
        ),
        (
            serve_args(&port, d, &["--config", f]),
            "client_idle_timeout",
        ),
    ]);
}

#[test]
fn failures_to_start_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // A regular file where a directory must be: the CA cannot be created,
    // the cache cannot be opened (whoever runs the test, root included).
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let f = file.to_str().unwrap();
    let cache = dir.path().join("cache");
    let c = cache.to_str().unwrap();
    let port = format!("127.0.0.1:{}", free_port());
    // Held for the run: the port is in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (serve_args(&port, f, &["--cache-dir", c]), "a-file"),
        (serve_args(&port, d, &["--cache-dir", f]), "a-file"),
        (serve_args(&busy, d, &["--cache-dir", c]), "cannot listen"),
    ];
    let problems: Vec<String> = cases
        .iter()
        .flat_map(|(args, mention)| one_line_failure_problems(args, 1, mention))
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n----\n"));
    drop(taken);
}

/// `--help` of `args`, with runs of white space (clap wraps lines) as one space.
fn help_text(args: &[&str]) -> String {
    let out = run_regcache(args);
    assert!(out.status.success(), "regcache {args:?}: {}", out.status);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn help_shows_the_defaults_of_default_toml() {
    let serve = help_text(&["serve", "--help"]);
    for shown in [
        "--listen <ADDR> Address of the forward proxy [default: 127.0.0.1:3128]",
        "created on first start [default: certs]",
        "[default: cache]",
        "[default: tunnel]",
        "[default: 60]",
        "[default: first]",
    ] {
        assert!(
            serve.contains(shown),
            "serve --help lacks {shown:?}:\n{serve}"
        );
    }
    let short = help_text(&["serve", "-h"]);
    assert!(
        short.contains("[default: 127.0.0.1:3128]"),
        "serve -h:\n{short}"
    );
    let ca = help_text(&["ca", "init", "--help"]);
    assert!(
        ca.contains("Directory holding the regcache CA [default: certs]"),
        "ca init --help:\n{ca}"
    );
    let cache = help_text(&["cache", "stats", "--help"]);
    assert!(
        cache.contains("Directory of the disk cache [default: cache]"),
        "cache stats --help:\n{cache}"
    );
}
