//! `bench_client`: the load generator and meter used by `bench/run.sh`.
//!
//! It compares regcache with other proxies and servers: `get` fetches a URL
//! many times (optionally through an HTTP `CONNECT` proxy, HTTP/1.1 or, with
//! `--http2`, HTTP/2 over rustls) and reports throughput and latency;
//! `handshake` times
//! CONNECT + TLS handshakes through a proxy; `tcp` and `tls-ceiling` measure
//! the machine's and this client's own ceilings; `fill-cache` builds a large
//! regcache cache index for start-up timing. Every mode prints exactly one
//! JSON object on stdout. Exit code 1 when a request failed, 2 on a usage
//! error.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::{http1, http2};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Size of the reused buffers for raw TCP and the in-process TLS server.
const CHUNK: usize = 1 << 20;

/// Read buffer under the TLS client, so rustls's small reads are not syscalls.
const TLS_READ_BUF: usize = 256 << 10;

/// ALPN protocol ids.
const ALPN_H2: &[u8] = b"h2";
const ALPN_H1: &[u8] = b"http/1.1";

#[derive(Parser)]
#[command(
    name = "bench_client",
    about = "Load generator and meter for bench/run.sh"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch URL -n times with -c concurrent keep-alive connections.
    Get(GetArgs),
    /// Time CONNECT + TLS handshakes through a proxy, one after another.
    Handshake(HandshakeArgs),
    /// Raw loopback TCP throughput (the machine's ceiling).
    Tcp {
        /// Bytes to send.
        #[arg(long, default_value_t = 4 << 30)]
        bytes: u64,
    },
    /// This client's TLS receive ceiling, against an in-process rustls server.
    TlsCeiling {
        /// Body size of each response.
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// Concurrent connections, one request each (one per stream with
        /// --http2 --streams).
        #[arg(short = 'c', long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        concurrency: u64,
        #[command(flatten)]
        h2: H2Args,
    },
    /// Create a regcache cache directory whose index holds N entries.
    FillCache {
        /// The cache directory to create or extend.
        dir: PathBuf,
        /// Number of content entries, each linked once.
        #[arg(long)]
        entries: usize,
    },
}

#[derive(clap::Args)]
struct GetArgs {
    /// https://host[:port]/path (or http:// for plain HTTP).
    url: String,
    /// HTTP proxy HOST:PORT; each connection is tunnelled with CONNECT.
    #[arg(long)]
    proxy: Option<String>,
    /// PEM file of trusted CA certificates (repeatable); no system roots.
    #[arg(long)]
    cacert: Vec<PathBuf>,
    /// HOST:PORT=ADDR:PORT: dial ADDR:PORT for HOST:PORT, keeping SNI and Host.
    #[arg(long)]
    connect_to: Vec<String>,
    /// HOST:PORT (repeatable): new connections dial these in turn (the
    /// first connection the first one, and so on) instead of the proxy, or
    /// with no --proxy instead of the server (SNI and Host stay the URL's):
    /// clients spread round-robin over several nodes.
    #[arg(long)]
    spread: Vec<String>,
    /// Concurrent workers, each with its own connection.
    #[arg(short = 'c', long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: u64,
    /// Total requests (default: the concurrency).
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// GET or HEAD.
    #[arg(long, default_value = "GET", value_parser = ["GET", "HEAD"])]
    method: String,
    /// Extra request header "Name: value" (repeatable).
    #[arg(long)]
    header: Vec<String>,
    /// Open a fresh TCP (+CONNECT) +TLS connection for every request.
    #[arg(long)]
    new_connection: bool,
    /// A request is ok only if its body has exactly this many bytes.
    #[arg(long)]
    expect_bytes: Option<u64>,
    /// A request is ok only with this status.
    #[arg(long, default_value_t = 200)]
    expect_status: u16,
    /// Speak plain HTTP (no TLS) even for an https:// URL.
    #[arg(long)]
    insecure_plain: bool,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// Another path on the same server (repeatable): request i asks for the
    /// i-th of URL's path and these, in turn (--expect-bytes applies to all).
    #[arg(long)]
    path: Vec<String>,
    #[command(flatten)]
    h2: H2Args,
}

/// HTTP/2: the protocol and the client's receive settings. The defaults are
/// those of Go's HTTP/2 transport (golang.org/x/net/http2, as in containerd,
/// dockerd, skopeo, buildkit): a 4 MiB stream window
/// (`transportDefaultStreamFlow`), a connection window raised by 1 GiB
/// (`transportDefaultConnFlow`) and 16 KiB frames (`MaxReadFrameSize` unset).
#[derive(clap::Args, Clone)]
struct H2Args {
    /// Speak HTTP/2 (ALPN h2; an error if the server does not choose it).
    #[arg(long)]
    http2: bool,
    /// With --http2: concurrent streams on each connection; the requests
    /// are spread over connections x streams.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    streams: u64,
    /// With --http2: the stream receive window (SETTINGS_INITIAL_WINDOW_SIZE).
    #[arg(long, default_value_t = 4 << 20, value_parser = clap::value_parser!(u32).range(1..=0x7fff_ffff))]
    h2_stream_window: u32,
    /// With --http2: the connection receive window.
    #[arg(long, default_value_t = (1 << 30) + 65_535, value_parser = clap::value_parser!(u32).range(65_535..=0x7fff_ffff))]
    h2_conn_window: u32,
    /// With --http2: the largest frame the client accepts
    /// (SETTINGS_MAX_FRAME_SIZE), which bounds the server's DATA frames.
    #[arg(long, default_value_t = 16 << 10, value_parser = clap::value_parser!(u32).range(16_384..=16_777_215))]
    h2_frame: u32,
}

impl H2Args {
    /// The HTTP/2 settings when --http2 was given; a usage error when an
    /// HTTP/2 option was given without it.
    fn settings(&self) -> Result<Option<H2Settings>, Usage> {
        if !self.http2 {
            if self.streams != 1 {
                return Err(Usage("--streams needs --http2".into()));
            }
            return Ok(None);
        }
        Ok(Some(H2Settings {
            streams: self.streams,
            stream_window: self.h2_stream_window,
            conn_window: self.h2_conn_window,
            frame: self.h2_frame,
        }))
    }
}

/// What an HTTP/2 connection of the client announces and carries.
#[derive(Clone, Copy)]
struct H2Settings {
    streams: u64,
    stream_window: u32,
    conn_window: u32,
    frame: u32,
}

#[derive(clap::Args)]
struct HandshakeArgs {
    /// HTTP proxy HOST:PORT.
    #[arg(long)]
    proxy: String,
    /// PEM file of trusted CA certificates (repeatable).
    #[arg(long, required = true)]
    cacert: Vec<PathBuf>,
    /// Host name; `{i}` is replaced by the measurement index.
    #[arg(long)]
    host: String,
    /// Number of measurements.
    #[arg(short = 'n', default_value_t = 50)]
    n: u64,
    /// Port asked for in CONNECT.
    #[arg(long, default_value_t = 443)]
    port: u16,
}

/// A usage or set-up error: exit code 2.
struct Usage(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Get(args) => runtime().and_then(|rt| rt.block_on(get_main(args))),
        Cmd::Handshake(args) => runtime().and_then(|rt| rt.block_on(handshake_main(args))),
        Cmd::Tcp { bytes } => tcp_main(bytes),
        Cmd::TlsCeiling {
            bytes,
            concurrency,
            h2,
        } => h2.settings().and_then(|h2| {
            runtime().and_then(|rt| rt.block_on(tls_ceiling_main(bytes, concurrency, h2)))
        }),
        Cmd::FillCache { dir, entries } => fill_cache_main(&dir, entries),
    };
    match result {
        Ok(code) => code,
        Err(Usage(msg)) => {
            eprintln!("bench_client: {msg}");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Usage> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Usage(format!("tokio runtime: {e}")))
}

/// Prints one JSON object (fields in declaration order) on stdout.
fn print_json<T: Serialize>(v: &T) {
    match serde_json::to_string(v) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("bench_client: JSON: {e}"),
    }
}

#[derive(Serialize)]
struct GetReport {
    requests: u64,
    ok: u64,
    failed: u64,
    bytes: u64,
    wall_s: f64,
    mib_s: f64,
    lat_mean_s: Option<f64>,
    lat_p50_s: Option<f64>,
    lat_p99_s: Option<f64>,
    lat_max_s: Option<f64>,
    first_error: Option<String>,
    /// "h2" or "http/1.1".
    proto: &'static str,
    /// Concurrent streams per connection (1 for HTTP/1.1).
    streams: u64,
}

#[derive(Serialize)]
struct HandshakeReport {
    n: u64,
    ok: u64,
    failed: u64,
    mean_s: Option<f64>,
    p50_s: Option<f64>,
    min_s: Option<f64>,
    max_s: Option<f64>,
    first_error: Option<String>,
}

#[derive(Serialize)]
struct TcpReport {
    bytes: u64,
    wall_s: f64,
    mib_s: f64,
}

#[derive(Serialize)]
struct FillReport {
    entries: usize,
}

// ---------------------------------------------------------------- get

/// Everything a worker needs to open connections and send requests.
struct Target {
    /// Addresses to dial: the proxy, or the server; with --spread one list
    /// per node, taken in turn by new connections (`next_dial`).
    dial: Vec<Vec<SocketAddr>>,
    next_dial: AtomicU64,
    /// CONNECT authority when going through a proxy.
    connect: Option<String>,
    /// TLS settings and server name; None for plain HTTP.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    method: Method,
    /// Request paths, taken in turn (the `next` counter).
    paths: Vec<String>,
    next: AtomicU64,
    /// `http` or `https`, for HTTP/2's `:scheme`.
    scheme: &'static str,
    /// HTTP/2 when set.
    h2: Option<H2Settings>,
    host_header: String,
    /// HOST[:PORT] of the URL, HTTP/2's `:authority`.
    authority: String,
    headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
    new_connection: bool,
    expect_status: StatusCode,
    expect_bytes: Option<u64>,
    timeout: Duration,
    first_error: Mutex<Option<String>>,
}

impl Target {
    /// The addresses a new connection dials: the next node in turn.
    fn next_addrs(&self) -> &[SocketAddr] {
        let n = self.dial.len() as u64;
        let i = self.next_dial.fetch_add(1, Ordering::Relaxed) % n.max(1);
        self.dial.get(i as usize).map_or(&[], Vec::as_slice)
    }

    fn record_error(&self, e: String) {
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert(e);
        }
    }

    /// The path of the next request.
    fn next_path(&self) -> &str {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        &self.paths[i % self.paths.len()]
    }
}

#[derive(Default)]
struct WorkerStats {
    ok: u64,
    failed: u64,
    bytes: u64,
    latencies: Vec<f64>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A rustls client offering `alpn` (most preferred first).
fn client_config(roots: RootCertStore, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, Usage> {
    // regcache's provider offers AES-128-GCM first, as the Go clients
    // (containerd, docker, skopeo) do on machines with AES hardware.
    let mut config = ClientConfig::builder_with_provider(regcache::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Usage(format!("TLS config: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Every handshake is a full one, as for Go clients (containerd, docker).
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

fn load_roots(files: &[PathBuf]) -> Result<RootCertStore, Usage> {
    let mut roots = RootCertStore::empty();
    for file in files {
        let iter = CertificateDer::pem_file_iter(file)
            .map_err(|e| Usage(format!("{}: {e}", file.display())))?;
        let mut n = 0;
        for cert in iter {
            let cert = cert.map_err(|e| Usage(format!("{}: {e}", file.display())))?;
            roots
                .add(cert)
                .map_err(|e| Usage(format!("{}: {e}", file.display())))?;
            n += 1;
        }
        if n == 0 {
            return Err(Usage(format!("{}: no certificate", file.display())));
        }
    }
    Ok(roots)
}

async fn resolve(addr: &str) -> Result<Vec<SocketAddr>, Usage> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| Usage(format!("cannot resolve {addr}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(Usage(format!("cannot resolve {addr}")));
    }
    Ok(addrs)
}

/// Host without IPv6 brackets, for SNI.
fn bare_host(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

async fn get_main(args: GetArgs) -> Result<ExitCode, Usage> {
    let uri: hyper::Uri = args
        .url
        .parse()
        .map_err(|e| Usage(format!("bad URL {}: {e}", args.url)))?;
    let tls_scheme = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(Usage(format!("URL must be http:// or https://: {uri}"))),
    };
    let host = uri
        .host()
        .ok_or_else(|| Usage(format!("URL has no host: {uri}")))?
        .to_string();
    let default_port = if tls_scheme { 443 } else { 80 };
    let port = uri.port_u16().unwrap_or(default_port);
    let authority = format!("{host}:{port}");
    let host_header = if port == default_port {
        host.clone()
    } else {
        authority.clone()
    };
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());

    // --connect-to HOST:PORT=ADDR:PORT; the first one matching wins.
    let mut target_addr = authority.clone();
    for rule in &args.connect_to {
        let (from, to) = rule
            .split_once('=')
            .ok_or_else(|| Usage(format!("--connect-to wants HOST:PORT=ADDR:PORT: {rule}")))?;
        if from.eq_ignore_ascii_case(&authority) {
            target_addr = to.to_string();
            break;
        }
    }

    let (mut dial, connect) = match &args.proxy {
        Some(proxy) => (vec![resolve(proxy).await?], Some(target_addr)),
        None => (vec![resolve(&target_addr).await?], None),
    };
    if !args.spread.is_empty() {
        dial.clear();
        for node in &args.spread {
            dial.push(resolve(node).await?);
        }
    }

    let h2 = args.h2.settings()?;
    if h2.is_some() && args.new_connection {
        return Err(Usage(
            "--http2 with --new-connection is not supported".into(),
        ));
    }
    // With --http2, ALPN offers h2 first, as the Go clients do.
    let alpn: &[&[u8]] = if h2.is_some() {
        &[ALPN_H2, ALPN_H1]
    } else {
        &[ALPN_H1]
    };
    let tls = if tls_scheme && !args.insecure_plain {
        if args.cacert.is_empty() {
            return Err(Usage("https:// needs at least one --cacert".into()));
        }
        let config = client_config(load_roots(&args.cacert)?, alpn)?;
        let name = ServerName::try_from(bare_host(&host).to_string())
            .map_err(|e| Usage(format!("bad server name {host}: {e}")))?;
        Some((TlsConnector::from(config), name))
    } else {
        None
    };

    let mut headers = Vec::new();
    for h in &args.header {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| Usage(format!("--header wants \"Name: value\": {h}")))?;
        let name = hyper::header::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|e| Usage(format!("bad header name in {h}: {e}")))?;
        let value = hyper::header::HeaderValue::from_str(value.trim())
            .map_err(|e| Usage(format!("bad header value in {h}: {e}")))?;
        headers.push((name, value));
    }
    let has_host = headers.iter().any(|(n, _)| n == hyper::header::HOST);
    let expect_status = StatusCode::from_u16(args.expect_status)
        .map_err(|e| Usage(format!("bad --expect-status: {e}")))?;
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        return Err(Usage("--timeout must be positive".into()));
    }

    let target = Arc::new(Target {
        dial,
        next_dial: AtomicU64::new(0),
        connect,
        tls,
        method: if args.method == "HEAD" {
            Method::HEAD
        } else {
            Method::GET
        },
        paths: std::iter::once(path).chain(args.path).collect(),
        next: AtomicU64::new(0),
        scheme: if tls_scheme && !args.insecure_plain {
            "https"
        } else {
            "http"
        },
        h2,
        authority: host_header.clone(),
        host_header: if has_host { String::new() } else { host_header },
        headers,
        new_connection: args.new_connection,
        expect_status,
        expect_bytes: args.expect_bytes,
        timeout: Duration::from_secs_f64(args.timeout),
        first_error: Mutex::new(None),
    });
    let requests = args.requests.unwrap_or(args.concurrency);
    let code = run_load(target, args.concurrency, requests).await;
    Ok(code)
}

/// Runs `requests` requests spread over `concurrency` connections (each
/// carrying `streams` concurrent requests with HTTP/2), prints the JSON
/// report, and returns the exit code.
async fn run_load(target: Arc<Target>, concurrency: u64, requests: u64) -> ExitCode {
    let streams = target.h2.map_or(1, |h| h.streams);
    let slots = concurrency * streams;
    // Requests of slot i: an even share, the first ones taking the rest.
    let share = |i: u64| requests / slots + u64::from(i < requests % slots);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let target = target.clone();
        if target.h2.is_some() {
            let counts: Vec<u64> = (0..streams).map(|s| share(c * streams + s)).collect();
            if counts.iter().all(|&n| n == 0) {
                continue;
            }
            tasks.push(tokio::spawn(h2_connection(target, counts)));
        } else {
            let count = share(c);
            if count == 0 {
                continue;
            }
            tasks.push(tokio::spawn(worker(target, count)));
        }
    }
    let mut total = WorkerStats::default();
    for task in tasks {
        match task.await {
            Ok(s) => total.add(s),
            Err(e) => {
                target.record_error(format!("worker panicked: {e}"));
            }
        }
    }
    let wall = start.elapsed().as_secs_f64();
    // Requests of a worker that panicked count as failed.
    total.failed = requests.saturating_sub(total.ok);
    let lat = Summary::of(&mut total.latencies);
    let first_error = target.first_error.lock().ok().and_then(|e| e.clone());
    print_json(&GetReport {
        requests,
        ok: total.ok,
        failed: total.failed,
        bytes: total.bytes,
        wall_s: wall,
        mib_s: total.bytes as f64 / (1u64 << 20) as f64 / wall,
        lat_mean_s: lat.as_ref().map(|l| l.mean),
        lat_p50_s: lat.as_ref().map(|l| l.p50),
        lat_p99_s: lat.as_ref().map(|l| l.p99),
        lat_max_s: lat.as_ref().map(|l| l.max),
        first_error,
        proto: if target.h2.is_some() {
            "h2"
        } else {
            "http/1.1"
        },
        streams,
    });
    if total.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

struct Summary {
    mean: f64,
    p50: f64,
    p99: f64,
    min: f64,
    max: f64,
}

impl Summary {
    fn of(v: &mut [f64]) -> Option<Summary> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Summary {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: rank(0.5),
            p99: rank(0.99),
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

impl WorkerStats {
    fn add(&mut self, s: WorkerStats) {
        self.ok += s.ok;
        self.failed += s.failed;
        self.bytes += s.bytes;
        self.latencies.extend(s.latencies);
    }

    /// Counts one request that ended with `result` after `start`.
    fn record(&mut self, target: &Target, start: Instant, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.ok += 1;
                self.latencies.push(start.elapsed().as_secs_f64());
            }
            Err(e) => {
                self.failed += 1;
                target.record_error(e);
            }
        }
    }
}

/// `count` HTTP/1.1 requests one after another, on one keep-alive
/// connection (reopened when the server closes it).
async fn worker(target: Arc<Target>, count: u64) -> WorkerStats {
    let mut stats = WorkerStats::default();
    let mut conn: Option<http1::SendRequest<Empty<Bytes>>> = None;
    for _ in 0..count {
        let start = Instant::now();
        let mut bytes = 0u64;
        let result =
            tokio::time::timeout(target.timeout, one_request(&target, &mut conn, &mut bytes))
                .await
                .unwrap_or_else(|_| Err(format!("timed out after {:?}", target.timeout)));
        stats.bytes += bytes;
        if result.is_err() {
            conn = None;
        }
        stats.record(&target, start, result);
    }
    stats
}

/// One HTTP/2 connection carrying `counts.len()` streams at a time, stream
/// slot i sending `counts[i]` requests one after another.
async fn h2_connection(target: Arc<Target>, counts: Vec<u64>) -> WorkerStats {
    let mut stats = WorkerStats::default();
    let opened = tokio::time::timeout(target.timeout, open_h2(&target))
        .await
        .unwrap_or_else(|_| Err(format!("connect timed out after {:?}", target.timeout)));
    let sender = match opened {
        Ok(s) => s,
        Err(e) => {
            stats.failed = counts.iter().sum();
            target.record_error(e);
            return stats;
        }
    };
    let mut slots = Vec::new();
    for count in counts.into_iter().filter(|&n| n > 0) {
        let target = target.clone();
        let mut sender = sender.clone();
        slots.push(tokio::spawn(async move {
            let mut stats = WorkerStats::default();
            for _ in 0..count {
                let start = Instant::now();
                let mut bytes = 0u64;
                let result = tokio::time::timeout(
                    target.timeout,
                    h2_request(&target, &mut sender, &mut bytes),
                )
                .await
                .unwrap_or_else(|_| Err(format!("timed out after {:?}", target.timeout)));
                stats.bytes += bytes;
                stats.record(&target, start, result);
            }
            stats
        }));
    }
    for slot in slots {
        match slot.await {
            Ok(s) => stats.add(s),
            Err(e) => target.record_error(format!("stream task panicked: {e}")),
        }
    }
    stats
}

/// Opens TCP (+CONNECT) (+TLS) and an HTTP/1.1 connection on it.
async fn open(target: &Target) -> Result<http1::SendRequest<Empty<Bytes>>, String> {
    let (io, _) = open_stream(
        target.next_addrs(),
        target.connect.as_deref(),
        target.tls.as_ref().map(|(c, n)| (c, n)),
    )
    .await?;
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        // Errors show up on the request side.
        let _ = conn.await;
    });
    Ok(sender)
}

/// Opens TCP (+CONNECT) (+TLS, where the server must choose h2) and an
/// HTTP/2 connection with the target's receive settings.
async fn open_h2(target: &Target) -> Result<http2::SendRequest<Empty<Bytes>>, String> {
    let settings = target
        .h2
        .ok_or_else(|| "HTTP/2 connection without --http2".to_string())?;
    let (io, alpn) = open_stream(
        target.next_addrs(),
        target.connect.as_deref(),
        target.tls.as_ref().map(|(c, n)| (c, n)),
    )
    .await?;
    if target.tls.is_some() && alpn.as_deref() != Some(ALPN_H2) {
        return Err(format!(
            "the server did not choose h2 (ALPN: {})",
            alpn.as_deref()
                .map_or("none".into(), |p| String::from_utf8_lossy(p).into_owned())
        ));
    }
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(settings.stream_window)
        .initial_connection_window_size(settings.conn_window)
        .max_frame_size(settings.frame)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(async move {
        // Errors show up on the request side.
        let _ = conn.await;
    });
    Ok(sender)
}

async fn dial(addrs: &[SocketAddr]) -> Result<TcpStream, String> {
    let mut last = String::from("no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = format!("connect {addr}: {e}"),
        }
    }
    Err(last)
}

/// Sends `CONNECT authority` and waits for a 2xx answer.
async fn tunnel(stream: &mut TcpStream, authority: &str) -> Result<(), String> {
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("CONNECT write: {e}"))?;
    let mut buf = [0u8; 4096];
    let mut len = 0;
    let end = loop {
        if len == buf.len() {
            return Err("CONNECT response head too large".into());
        }
        let n = stream
            .read(&mut buf[len..])
            .await
            .map_err(|e| format!("CONNECT read: {e}"))?;
        if n == 0 {
            return Err(format!(
                "proxy closed during CONNECT: {:?}",
                String::from_utf8_lossy(&buf[..len])
            ));
        }
        len += n;
        if let Some(p) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let status_line = head.lines().next().unwrap_or("");
    let code = status_line.split_whitespace().nth(1).unwrap_or("");
    if !code.starts_with('2') || code.len() != 3 {
        return Err(format!("CONNECT {authority}: {status_line}"));
    }
    if end != len {
        return Err("proxy sent data after its CONNECT response".into());
    }
    Ok(())
}

/// Opens TCP, CONNECT through `connect` when set, and TLS when set; returns
/// the stream and the ALPN protocol the server chose.
async fn open_stream(
    addrs: &[SocketAddr],
    connect: Option<&str>,
    tls: Option<(&TlsConnector, &ServerName<'static>)>,
) -> Result<(Box<dyn Io>, Option<Vec<u8>>), String> {
    let mut stream = dial(addrs).await?;
    if let Some(authority) = connect {
        tunnel(&mut stream, authority).await?;
    }
    match tls {
        Some((connector, name)) => {
            // rustls reads TLS records 4 KiB at a time; a user-space buffer
            // underneath turns that into few large read syscalls.
            let stream = tokio::io::BufReader::with_capacity(TLS_READ_BUF, stream);
            let tls = connector
                .connect(name.clone(), stream)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            Ok((Box::new(tls), alpn))
        }
        None => Ok((Box::new(stream), None)),
    }
}

/// The request for the target's next path; `absolute` gives the URI the
/// scheme and authority (HTTP/2's `:scheme` and `:authority`).
fn build_request(target: &Target, absolute: bool) -> Result<Request<Empty<Bytes>>, String> {
    let path = target.next_path();
    let mut builder = Request::builder().method(target.method.clone());
    if absolute {
        builder = builder.uri(format!("{}://{}{path}", target.scheme, target.authority));
    } else {
        builder = builder.uri(path);
        if !target.host_header.is_empty() {
            builder = builder.header(hyper::header::HOST, target.host_header.as_str());
        }
    }
    for (name, value) in &target.headers {
        builder = builder.header(name, value);
    }
    builder
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))
}

/// Reads the body of `resp` (counting into `bytes`) and checks it against
/// the expected status and size.
async fn check_response(
    target: &Target,
    resp: Response<Incoming>,
    bytes: &mut u64,
) -> Result<(), String> {
    let status = resp.status();
    if target.method != Method::HEAD {
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("body error after {} bytes: {e}", *bytes))?;
            if let Some(data) = frame.data_ref() {
                *bytes += data.len() as u64;
            }
        }
    }
    if status != target.expect_status {
        return Err(format!(
            "status {} (expected {})",
            status.as_u16(),
            target.expect_status.as_u16()
        ));
    }
    if let Some(want) = target.expect_bytes {
        if *bytes != want {
            return Err(format!("body of {} bytes, expected {want}", *bytes));
        }
    }
    Ok(())
}

async fn one_request(
    target: &Target,
    conn: &mut Option<http1::SendRequest<Empty<Bytes>>>,
    bytes: &mut u64,
) -> Result<(), String> {
    let reused = conn.is_some() && !target.new_connection;
    let mut sender = match conn.take() {
        Some(s) if reused && !s.is_closed() => s,
        _ => open(target).await?,
    };
    if sender.ready().await.is_err() {
        if !reused {
            return Err("connection closed before the request".into());
        }
        // The server closed the idle keep-alive connection: open another.
        sender = open(target).await?;
        sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
    }
    let req = build_request(target, false)?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let keep_alive = !resp
        .headers()
        .get(hyper::header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let result = check_response(target, resp, bytes).await;
    if !target.new_connection && keep_alive {
        *conn = Some(sender);
    }
    result
}

/// One request on a stream of an HTTP/2 connection.
async fn h2_request(
    target: &Target,
    sender: &mut http2::SendRequest<Empty<Bytes>>,
    bytes: &mut u64,
) -> Result<(), String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("HTTP/2 connection: {e}"))?;
    let req = build_request(target, true)?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    check_response(target, resp, bytes).await
}

// ---------------------------------------------------------------- handshake

async fn handshake_main(args: HandshakeArgs) -> Result<ExitCode, Usage> {
    let dial_addrs = resolve(&args.proxy).await?;
    let connector = TlsConnector::from(client_config(load_roots(&args.cacert)?, &[ALPN_H1])?);
    let mut times = Vec::new();
    let mut failed = 0u64;
    let mut first_error: Option<String> = None;
    for i in 0..args.n {
        let host = args.host.replace("{i}", &i.to_string());
        let name = ServerName::try_from(host.clone())
            .map_err(|e| Usage(format!("bad host name {host}: {e}")))?;
        let authority = format!("{host}:{}", args.port);
        let start = Instant::now();
        let result = tokio::time::timeout(
            Duration::from_secs(60),
            open_stream(&dial_addrs, Some(&authority), Some((&connector, &name))),
        )
        .await
        .unwrap_or_else(|_| Err("timed out after 60 s".into()));
        let elapsed = start.elapsed().as_secs_f64();
        match result {
            Ok((mut stream, _)) => {
                times.push(elapsed);
                let _ = stream.shutdown().await;
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(format!("{host}: {e}"));
            }
        }
    }
    let s = Summary::of(&mut times);
    print_json(&HandshakeReport {
        n: args.n,
        ok: times.len() as u64,
        failed,
        mean_s: s.as_ref().map(|s| s.mean),
        p50_s: s.as_ref().map(|s| s.p50),
        min_s: s.as_ref().map(|s| s.min),
        max_s: s.as_ref().map(|s| s.max),
        first_error,
    });
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

// ---------------------------------------------------------------- tcp

fn tcp_main(bytes: u64) -> Result<ExitCode, Usage> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Usage(format!("bind 127.0.0.1:0: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Usage(format!("local address: {e}")))?;
    let start = Instant::now();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = std::net::TcpStream::connect(addr)?;
        let buf = vec![0x5au8; CHUNK];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            s.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    let (mut conn, _) = listener
        .accept()
        .map_err(|e| Usage(format!("accept: {e}")))?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < bytes {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Usage(format!("read: {e}"))),
        }
    }
    let wall = start.elapsed().as_secs_f64();
    match sender.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Usage(format!("sender: {e}"))),
        Err(_) => return Err(Usage("sender panicked".into())),
    }
    if got != bytes {
        return Err(Usage(format!("received {got} of {bytes} bytes")));
    }
    print_json(&TcpReport {
        bytes,
        wall_s: wall,
        mib_s: bytes as f64 / (1u64 << 20) as f64 / wall,
    });
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------- tls-ceiling

/// The in-process server's HTTP/2 send buffer per stream: generous, so that
/// the ceiling is the client's (hyper's default is 400 KiB).
const CEILING_H2_SEND_BUF: usize = 4 << 20;

async fn tls_ceiling_main(
    bytes: u64,
    concurrency: u64,
    h2: Option<H2Settings>,
) -> Result<ExitCode, Usage> {
    const NAME: &str = "tls-ceiling.bench.test";
    let key = rcgen::generate_simple_self_signed(vec![NAME.to_string()])
        .map_err(|e| Usage(format!("rcgen: {e}")))?;
    let cert_der = key.cert.der().clone();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.signing_key.serialize_der()));
    let mut server = ServerConfig::builder_with_provider(regcache::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Usage(format!("TLS server config: {e}")))?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key_der)
        .map_err(|e| Usage(format!("TLS server config: {e}")))?;
    server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_H1.to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Usage(format!("bind 127.0.0.1:0: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Usage(format!("local address: {e}")))?;
    let payload = Bytes::from(vec![0x5au8; CHUNK]);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                if tls.get_ref().1.alpn_protocol() == Some(ALPN_H2) {
                    let service = hyper::service::service_fn(move |_req| {
                        let body = Repeat {
                            left: bytes,
                            chunk: payload.clone(),
                        };
                        async move { Ok::<_, Infallible>(Response::new(body)) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_send_buf_size(CEILING_H2_SEND_BUF)
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                } else {
                    let _ = serve_static(tls, bytes, &payload).await;
                }
            });
        }
    });

    let mut roots = RootCertStore::empty();
    roots
        .add(cert_der)
        .map_err(|e| Usage(format!("root store: {e}")))?;
    let name =
        ServerName::try_from(NAME.to_string()).map_err(|e| Usage(format!("server name: {e}")))?;
    let alpn: &[&[u8]] = if h2.is_some() {
        &[ALPN_H2, ALPN_H1]
    } else {
        &[ALPN_H1]
    };
    let target = Arc::new(Target {
        dial: vec![vec![addr]],
        next_dial: AtomicU64::new(0),
        connect: None,
        tls: Some((TlsConnector::from(client_config(roots, alpn)?), name)),
        method: Method::GET,
        paths: vec!["/blob".into()],
        next: AtomicU64::new(0),
        scheme: "https",
        h2,
        host_header: NAME.into(),
        authority: NAME.into(),
        headers: Vec::new(),
        new_connection: false,
        expect_status: StatusCode::OK,
        expect_bytes: Some(bytes),
        timeout: Duration::from_secs(3600),
        first_error: Mutex::new(None),
    });
    let requests = concurrency * h2.map_or(1, |h| h.streams);
    Ok(run_load(target, concurrency, requests).await)
}

/// A response body of `left` bytes, `chunk` repeated.
struct Repeat {
    left: u64,
    chunk: Bytes,
}

impl hyper::body::Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

/// Answers each HTTP/1.1 request on `io` with `len` bytes of `payload`.
async fn serve_static<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    len: u64,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut filled = 0;
    loop {
        let end = loop {
            if let Some(p) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if filled == buf.len() {
                return Ok(());
            }
            let n = io.read(&mut buf[filled..]).await?;
            if n == 0 {
                return Ok(());
            }
            filled += n;
        };
        let head_only = buf.starts_with(b"HEAD ");
        buf.copy_within(end..filled, 0);
        filled -= end;
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
        );
        io.write_all(head.as_bytes()).await?;
        if !head_only {
            let mut left = len;
            while left > 0 {
                let n = left.min(payload.len() as u64) as usize;
                io.write_all(&payload[..n]).await?;
                left -= n as u64;
            }
        }
        io.flush().await?;
    }
}

// ---------------------------------------------------------------- fill-cache

fn fill_cache_main(dir: &Path, entries: usize) -> Result<ExitCode, Usage> {
    use regcache::cache::index::{Change, ContentRow, Index};
    use regcache::registry::digest::Digest;

    std::fs::create_dir_all(dir).map_err(|e| Usage(format!("{}: {e}", dir.display())))?;
    let index = Index::open(&dir.join("index.redb"))
        .map_err(|e| Usage(format!("open index in {}: {e}", dir.display())))?;
    // The same rows as `populated()` in benches/cache.rs.
    let mut changes = Vec::with_capacity(2 * entries);
    for i in 0..entries {
        let digest = Digest::of(&i.to_le_bytes()).to_string();
        changes.push(Change::PutLink(format!(
            "docker.io/library/img{}@{digest}",
            i % 100
        )));
        changes.push(Change::PutContent(ContentRow {
            digest,
            size: 1000 + i as u64,
            last_access: i as u64,
            media_type: String::new(),
        }));
    }
    index
        .apply(&changes)
        .map_err(|e| Usage(format!("populate index: {e}")))?;
    print_json(&FillReport { entries });
    Ok(ExitCode::SUCCESS)
}
