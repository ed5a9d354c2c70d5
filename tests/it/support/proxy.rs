//! The regcache process: [`ProxyBuilder`] spawns the real binary with a temp
//! CA dir and a free port and waits until `/healthz` answers; the
//! [`Proxy`] it returns is killed when dropped and keeps its stderr in a file
//! so tests can read the log. [`run_regcache`] runs a command that must
//! exit on its own. [`Env`] is a registry, the test CA that signed it, and
//! the dirs regcache keeps between restarts.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;

use super::http::{raw_exchange, HttpClient};
use super::registry::{Registry, HUB, REGISTRY_NAMES};
use super::tls::{certs_from_pem, connect_tunnel_as, tls_connect, Alpn, ClientTls, TestCa};
use super::{send_signal, Signal};

/// The regcache binary, with nothing from the test's own environment that
/// would change what it does: no `REGCACHE_*`, no `RUST_LOG`, no proxy
/// variables; stdin from /dev/null.
pub fn regcache_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regcache"));
    cmd.stdin(Stdio::null());
    for k in [
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "https_proxy",
        "http_proxy",
        "ALL_PROXY",
        "RUST_LOG",
    ] {
        cmd.env_remove(k);
    }
    for (k, _) in std::env::vars() {
        if k.starts_with("REGCACHE_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// How to start regcache: `ProxyBuilder::new()`, or [`Env::proxy`] and
/// [`Fixture::proxy`](super::upstream::Fixture::proxy) for one that trusts
/// the test CA.
pub struct ProxyBuilder {
    args: Vec<String>,
    ca_dir: Option<PathBuf>,
    env: Vec<(String, String)>,
    no_listen_flag: bool,
    ready_status: u16,
    listen_ip: std::net::IpAddr,
}

impl Default for ProxyBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyBuilder {
    /// `regcache serve` on a free port with a fresh CA dir, nothing else.
    pub fn new() -> Self {
        ProxyBuilder {
            args: vec![],
            ca_dir: None,
            env: vec![],
            no_listen_flag: false,
            ready_status: 200,
            listen_ip: std::net::Ipv4Addr::LOCALHOST.into(),
        }
    }
    /// One more command-line argument.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    /// More command-line arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Self {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }
    /// An environment variable for regcache.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    /// Use an existing CA dir (to test reuse) instead of a fresh temp dir.
    pub fn ca_dir(mut self, dir: &Path) -> Self {
        self.ca_dir = Some(dir.to_owned());
        self
    }
    /// `--resolve HOST=127.0.0.1:PORT`.
    pub fn resolve(self, host: &str, port: u16) -> Self {
        self.arg("--resolve")
            .arg(format!("{host}=127.0.0.1:{port}"))
    }
    /// `--intercept HOST`.
    pub fn intercept(self, host: &str) -> Self {
        self.arg("--intercept").arg(host)
    }
    /// `--upstream-ca PATH`: trust the test CA upstream.
    pub fn upstream_ca(self, path: &Path) -> Self {
        self.arg("--upstream-ca").arg(path.to_str().unwrap())
    }
    /// Leave `--listen` and `--ca-dir` out of the command line (they come from
    /// a config file or the environment); the port and dir must still be given
    /// to [`ProxyBuilder::start_on`] and [`ProxyBuilder::ca_dir`] so the
    /// harness knows where to look.
    pub fn without_listen_flags(mut self) -> Self {
        self.no_listen_flag = true;
        self
    }

    /// Consider regcache ready when `GET /healthz` answers `status` (default
    /// 200), e.g. 403 for a proxy that refuses the test's own address.
    pub fn ready_status(mut self, status: u16) -> Self {
        self.ready_status = status;
        self
    }

    /// Listen on `ip` (a local address) instead of 127.0.0.1; the harness
    /// checks readiness there too.
    pub fn listen_ip(mut self, ip: std::net::IpAddr) -> Self {
        self.listen_ip = ip;
        self
    }

    /// Start regcache on a port the kernel picks (`--listen IP:0`; the
    /// address is read from its log) and wait until it is ready. A port
    /// picked by the test could be taken by another test's regcache in the
    /// meantime, and the harness would then talk to that one.
    pub async fn start(self) -> Proxy {
        assert!(
            !self.no_listen_flag,
            "without_listen_flags needs start_on(port): the port is in the config"
        );
        self.start_on(0).await
    }

    /// Start regcache on `port` (0: one the kernel picks) and wait until it
    /// is ready.
    pub async fn start_on(self, port: u16) -> Proxy {
        let tmp = tempfile::tempdir().unwrap();
        let ca_dir = self.ca_dir.clone().unwrap_or_else(|| tmp.path().join("ca"));
        let stderr_path = tmp.path().join("stderr.log");
        let mut cmd = regcache_command();
        // Defaults relative to the working directory (cache/, certs/) land in
        // the temp dir, never in the source tree.
        cmd.current_dir(tmp.path());
        cmd.arg("serve");
        if !self.no_listen_flag {
            cmd.arg("--listen")
                .arg(SocketAddr::new(self.listen_ip, port).to_string())
                .arg("--ca-dir")
                .arg(&ca_dir);
        }
        cmd.args(&self.args)
            .stdout(std::fs::File::create(tmp.path().join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn regcache");
        let mut proxy = Proxy {
            addr: SocketAddr::new(self.listen_ip, port),
            child: Some(child),
            ca_dir,
            stderr_path,
            _tmp: tmp,
        };
        proxy.wait_ready(self.ready_status).await;
        proxy
    }
}

/// A running regcache; killed when dropped.
pub struct Proxy {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Option<Child>,
    /// Its CA dir (`ca.crt`, `ca.key`).
    pub ca_dir: PathBuf,
    /// Where its stderr (the log) goes.
    stderr_path: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Proxy {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("process still owned").id()
    }

    /// Everything it logged so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The regcache CA certificate as written to the CA dir.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.ca_dir.join("ca.crt")).expect("ca.crt in the CA dir")
    }

    /// The regcache CA certificate, DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        certs_from_pem(&self.ca_pem())
            .into_iter()
            .next()
            .expect("ca.crt holds a certificate")
    }

    /// Waits until this process logged where it listens (so the port is its
    /// own, not another test's) and `GET /healthz` there answers
    /// `ready_status`.
    async fn wait_ready(&mut self, ready_status: u16) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut listening = None;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "regcache exited early with {status}; stderr:\n{}",
                    self.stderr()
                );
            }
            if listening.is_none() {
                listening = logged_listen_addr(&self.stderr());
                if let Some(addr) = listening {
                    assert!(
                        self.addr.port() == 0 || self.addr.port() == addr.port(),
                        "regcache logged {addr}, started on {}",
                        self.addr
                    );
                    self.addr = addr;
                }
            }
            if listening.is_some()
                && self.healthz_within(Duration::from_secs(2)).await == ready_status
            {
                return;
            }
            if Instant::now() > deadline {
                panic!("regcache never became ready; stderr:\n{}", self.stderr());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET /healthz` on a fresh connection; returns the status (0 if the
    /// exchange failed).
    pub async fn healthz(&self) -> u16 {
        self.healthz_within(Duration::from_secs(5)).await
    }

    async fn healthz_within(&self, limit: Duration) -> u16 {
        match tokio::time::timeout(
            limit,
            raw_exchange(
                self.addr,
                b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            ),
        )
        .await
        {
            Ok(Ok(r)) => r.status,
            _ => 0,
        }
    }

    /// `GET /healthz` on a fresh connection answers 200.
    pub async fn assert_healthy(&self, after: &str) {
        assert_eq!(
            self.healthz().await,
            200,
            "/healthz on a fresh connection after {after} should be 200; stderr:\n{}",
            self.stderr()
        );
    }

    /// Send SIGTERM.
    pub fn sigterm(&self) {
        send_signal(self.pid(), Signal::TERM);
    }

    /// Wait for the process to exit; None on timeout.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// A CONNECT tunnel to `host:443` with TLS inside, trusting only the
    /// proxy's CA, with SNI and the given ALPN.
    pub async fn tls_in_tunnel(&self, host: &str, alpn: Alpn) -> ClientTls {
        let tcp = self.tunnel(&format!("{host}:443")).await;
        tls_connect(tcp, host, vec![self.ca_der()], alpn, true)
            .await
            .unwrap_or_else(|e| panic!("TLS to {host} through the proxy: {e}"))
    }

    /// Open a CONNECT tunnel to `target` (e.g. `upstream.test:443`).
    pub async fn tunnel(&self, target: &str) -> TcpStream {
        self.tunnel_as(target, None).await
    }

    /// [`Proxy::tunnel`] with `Proxy-Authorization: proxy_auth` when given.
    async fn tunnel_as(&self, target: &str, proxy_auth: Option<&str>) -> TcpStream {
        match connect_tunnel_as(self.addr, target, proxy_auth).await {
            Ok(s) => s,
            Err(refused) => panic!(
                "CONNECT {target}: expected 200, got {} (head {:?}); stderr:\n{}",
                refused.status,
                refused.head,
                self.stderr()
            ),
        }
    }

    /// CONNECT + TLS (trusting only the regcache CA) + an HTTP client.
    pub async fn intercepted(&self, host: &str, alpn: Alpn) -> HttpClient {
        self.intercepted_as(host, alpn, None).await
    }

    /// [`Proxy::intercepted`] with `Proxy-Authorization: proxy_auth` on the
    /// CONNECT when given.
    pub async fn intercepted_as(
        &self,
        host: &str,
        alpn: Alpn,
        proxy_auth: Option<&str>,
    ) -> HttpClient {
        let tcp = self.tunnel_as(&format!("{host}:443"), proxy_auth).await;
        let tls = tls_connect(tcp, host, vec![self.ca_der()], alpn, true)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "TLS to {host} through the tunnel, trusting only the regcache CA: {e}; stderr:\n{}",
                    self.stderr()
                )
            });
        HttpClient::over_tls(tls, host).await
    }

    /// SIGTERM, then a clean exit (status 0) within 10 s.
    pub async fn stop(mut self) {
        self.sigterm();
        let status = self
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("regcache should exit after SIGTERM");
        assert!(status.success(), "exit status {status}");
    }

    /// Waits (up to 10 s) until the log mentions `needle`; returns the log.
    pub async fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.stderr();
            if log.contains(needle) {
                return log;
            }
            if Instant::now() > deadline {
                panic!("no log line mentioning {needle:?}; stderr:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Run a regcache command to its end (at most 15 s) and capture its output.
pub fn run_regcache(args: &[&str]) -> Output {
    let child = regcache_command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn regcache");
    let pid = child.id();
    // The pipes are drained while waiting, so a chatty command cannot stall.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    // A bad invocation must exit on its own; don't let a server hang the test.
    let out = match rx.recv_timeout(Duration::from_secs(15)) {
        Ok(out) => return out.expect("wait for regcache"),
        Err(_) => {
            send_signal(pid, Signal::KILL);
            rx.recv()
                .expect("the waiting thread")
                .expect("wait for regcache")
        }
    };
    panic!(
        "regcache {args:?} did not exit within 15s; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `regcache ARGS` (see [`run_regcache`]); returns (exit code, -1 for
/// a signal; stdout; stderr).
pub fn regcache_cli(args: &[&str]) -> (i32, String, String) {
    let out = run_regcache(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------
// A registry and the dirs regcache keeps
// ---------------------------------------------------------------------------

/// A registry, the test CA that signed it, and a temp dir for what regcache
/// keeps between restarts (its CA dir, caches, bundles).
pub struct Env {
    /// The CA that signed the registry's certificate.
    pub ca: TestCa,
    /// The temp dir.
    pub dir: tempfile::TempDir,
    /// The CA's PEM file (`--upstream-ca`).
    pub ca_file: PathBuf,
    /// The registry, `registry-1.docker.io` to regcache.
    pub reg: Registry,
}

impl Env {
    /// A registry for [`REGISTRY_NAMES`].
    pub async fn new() -> Env {
        let (ca, ca_file, dir) = TestCa::in_temp_dir();
        let reg = Registry::start(&ca).await;
        Env {
            ca,
            dir,
            ca_file,
            reg,
        }
    }

    /// A registry for [`REGISTRY_NAMES`] and `more` names, and its plain-http
    /// twin on the same port ([`Registry::start_with_twin`]).
    pub async fn with_twin(more: &[&str]) -> (Env, Registry) {
        let (ca, ca_file, dir) = TestCa::in_temp_dir();
        let names = [REGISTRY_NAMES, more].concat();
        let (reg, twin) = Registry::start_with_twin(&ca, &names).await;
        let env = Env {
            ca,
            dir,
            ca_file,
            reg,
        };
        (env, twin)
    }

    /// `name` in the temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The cache dir [`Env::proxy`] uses.
    pub fn cache_dir(&self) -> PathBuf {
        self.path("cache")
    }

    /// regcache trusting the test CA, with `registry-1.docker.io` (both
    /// schemes) on the registry's port; its own CA dir and cache.
    pub fn regcache(&self) -> ProxyBuilder {
        ProxyBuilder::new()
            .upstream_ca(&self.ca_file)
            .resolve(HUB, self.reg.port())
    }

    /// [`Env::regcache`] with this env's cache dir and CA dir, which outlive
    /// a restart.
    pub fn proxy(&self) -> ProxyBuilder {
        self.proxy_on(&self.cache_dir())
    }

    /// [`Env::proxy`] on the cache dir `cache`.
    pub fn proxy_on(&self, cache: &Path) -> ProxyBuilder {
        self.regcache()
            .ca_dir(&self.path("ca"))
            .arg("--cache-dir")
            .arg(cache.to_str().unwrap())
    }

    /// Files left in `cache/tmp`.
    pub fn tmp_files(&self) -> Vec<String> {
        list_dir(&self.cache_dir().join("tmp"))
    }

    /// Where a cached digest's file lives.
    pub fn content_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.cache_dir()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
    }

    /// Waits (up to 10 s) until `digest` is stored: a client gets a
    /// download's last byte once the bytes matched, and the entry is
    /// committed (fsync, rename, index) just after.
    pub async fn stored(&self, digest: &str) -> PathBuf {
        let path = self.content_file(digest);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !path.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{digest} was not stored within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        path
    }
}

/// The names in `dir` (none when it does not exist).
pub fn list_dir(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    }
}

/// Writes `content` to `dir/name` with permission bits `mode`; returns the
/// path.
pub fn write_file(dir: &Path, name: &str, content: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// `dir/users.htpasswd` (for `--proxy-users`) of `(user, password)`, bcrypt
/// cost 4 (fast), with permission bits `mode`.
pub fn users_file(dir: &Path, users: &[(&str, &str)], mode: u32) -> PathBuf {
    let text: String = users
        .iter()
        .map(|(user, password)| format!("{user}:{}\n", bcrypt::hash(password, 4).unwrap()))
        .collect();
    write_file(dir, "users.htpasswd", &text, mode)
}

/// Every file under `dir`, recursively (none when it does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return vec![];
    };
    rd.filter_map(|e| e.ok())
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() {
                files_under(&p)
            } else {
                vec![p]
            }
        })
        .collect()
}

/// The address regcache's start-up line names (`HTTPS_PROXY=http://ADDR`),
/// in either log format.
fn logged_listen_addr(log: &str) -> Option<SocketAddr> {
    let (_, rest) = log.split_once("HTTPS_PROXY=http://")?;
    let end = rest.find(|c: char| c.is_whitespace() || c == '"')?;
    rest[..end].parse().ok()
}
