//! Prometheus metrics: the one place they are defined and recorded.
//!
//! Every layer records through [`get`] (one process-wide [`Metrics`]): the
//! access log ([`crate::http::log`]) once per request when its response
//! ends, the upstream client once per upstream response, the proxy per
//! connection, handshake and refusal, the cache per eviction or failed
//! fill. Recording is a hash lookup and an atomic add; no lock is held per
//! chunk. Gauges of the cache are read when scraped, from the
//! [`CacheGauges`] given to [`Metrics::set_cache`].
//!
//! Labels stay bounded: the canonical registry host, the kind of request
//! (`manifest`, `blob`, `other`), a result or reason from a fixed set;
//! never a repository, tag or client address. docs/metrics.md lists every
//! metric.
//!
//! Beside them, [`activity`] keeps what the status page shows of recent
//! traffic (totals today, the most requested images, recent errors), fed
//! from the same recording points; [`Metrics::upstreams`] reads each
//! upstream registry's state back from the metrics themselves.
//!
//! This module is the lowest layer: it names no other module of the crate,
//! so every layer may record.

pub mod activity;

use std::collections::BTreeMap;

use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::render`]: the Prometheus text format.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Labels of `regcache_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    registry: String,
    kind: &'static str,
    result: &'static str,
}

/// Labels of `regcache_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DurationLabels {
    kind: &'static str,
    result: &'static str,
}

/// Labels of `regcache_served_bytes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServedLabels {
    registry: String,
    source: &'static str,
}

/// Labels of `regcache_upstream_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    registry: String,
    method: String,
    code: String,
}

/// A `registry` label alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistryLabel {
    registry: String,
}

/// A `reason` label alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The `rule` label of `regcache_rule_denials_total`: a rule's number.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    rule: String,
}

/// A `result` label alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// A `kind` label alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// What the cache tells a scrape (see [`CacheGauges`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheSnapshot {
    /// Bytes of the content entries.
    pub size_bytes: u64,
    /// The cache's capacity in bytes.
    pub capacity_bytes: u64,
    /// Content entries that are manifests (or indexes).
    pub manifests: u64,
    /// Content entries that are blobs.
    pub blobs: u64,
    /// Downloads into the cache in progress.
    pub fills_in_progress: u64,
}

/// The cache as a source of gauges, read at scrape time.
pub trait CacheGauges: Send + Sync {
    /// The numbers now.
    fn snapshot(&self) -> CacheSnapshot;
}

/// Reads the cache's gauges when scraped.
#[derive(Default)]
struct CacheCollector {
    source: RwLock<Option<Arc<dyn CacheGauges>>>,
}

impl fmt::Debug for CacheCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CacheCollector")
    }
}

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let source = self
            .source
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(source) = source else {
            return Ok(());
        };
        let s = source.snapshot();
        let gauges: [(&str, &str, u64); 3] = [
            (
                "regcache_cache_size_bytes",
                "Bytes of the content in the cache.",
                s.size_bytes,
            ),
            (
                "regcache_cache_capacity_bytes",
                "The cache's capacity in bytes.",
                s.capacity_bytes,
            ),
            (
                "regcache_fills_in_progress",
                "Downloads into the cache in progress.",
                s.fills_in_progress,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(clamp(value));
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        let mut metric = encoder.encode_descriptor(
            "regcache_cache_entries",
            "Content entries in the cache, by kind.",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (kind, value) in [("manifest", s.manifests), ("blob", s.blobs)] {
            let gauge = ConstGauge::new(clamp(value));
            gauge.encode(metric.encode_family(&KindLabel { kind })?)?;
        }
        Ok(())
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The `process_*` metrics of the Prometheus client libraries, read from
/// `/proc/self` when scraped (prometheus-client has no process collector):
/// CPU seconds, resident and virtual memory, open and maximum file
/// descriptors, start time. On a system without `/proc` it reports nothing.
#[derive(Debug)]
struct ProcessCollector;

/// What [`ProcessCollector`] read.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct ProcessStat {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    start_time_seconds: u64,
}

/// Reads `/proc/self/stat` text (`pid (comm) state ...`): user plus system
/// CPU time, virtual size, resident pages, and the start time in ticks since
/// boot, converted with `ticks` per second, `page` bytes and `boot_time`
/// (seconds since the epoch). None if the text is not of that form.
fn parse_stat(stat: &str, ticks: u64, page: u64, boot_time: u64) -> Option<ProcessStat> {
    // The command name may hold spaces and parentheses: fields start after
    // the last ')'. Field 3 (state) is index 0 here.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let ticks = ticks.max(1);
    let cpu = field(14)?.saturating_add(field(15)?);
    Some(ProcessStat {
        cpu_seconds: cpu as f64 / ticks as f64,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)?.saturating_mul(page),
        start_time_seconds: boot_time.saturating_add(field(22)? / ticks),
    })
}

/// The `btime` line of `/proc/stat`: when the system booted.
fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| boot_time(&s))
            .unwrap_or(0);
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                parse_stat(
                    &s,
                    rustix::param::clock_ticks_per_second(),
                    rustix::param::page_size() as u64,
                    boot,
                )
            });
        if let Some(stat) = stat {
            let cpu = ConstCounter::new(stat.cpu_seconds);
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                cpu.metric_type(),
            )?;
            cpu.encode(metric)?;
            for (name, help, value) in [
                (
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes.",
                    stat.resident_bytes,
                ),
                (
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes.",
                    stat.virtual_bytes,
                ),
                (
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    stat.start_time_seconds,
                ),
            ] {
                let gauge = ConstGauge::new(clamp(value));
                let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
                gauge.encode(metric)?;
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle itself is one of them.
            let open = dir.count().saturating_sub(1) as u64;
            let gauge = ConstGauge::new(clamp(open));
            let metric = encoder.encode_descriptor(
                "process_open_fds",
                "Number of open file descriptors.",
                None,
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        if let Some(max) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
            let gauge = ConstGauge::new(clamp(max));
            let metric = encoder.encode_descriptor(
                "process_max_fds",
                "Maximum number of open file descriptors.",
                None,
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

/// The `reason`s of `regcache_fill_failures_total`.
pub const FILL_FAILURE_REASONS: [&str; 5] = [
    "digest_mismatch",
    "truncated",
    "upstream_error",
    "disk_full",
    "other",
];

/// The `reason`s of `regcache_denied_total`.
pub const DENIED_REASONS: [&str; 5] = ["allow", "proxy_auth", "port", "host", "rule"];

/// The `result`s of `regcache_tls_handshakes_total`.
pub const TLS_RESULTS: [&str; 3] = ["ok", "failed", "refused"];

/// The last keep-warm run (`prefetch_file`), for the status page and the
/// admin API.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WarmStatus {
    /// When it ended, Unix seconds.
    pub last_run_unix: u64,
    /// Images it checked.
    pub images: u64,
    /// Of those, found unchanged upstream and complete in the cache.
    pub unchanged: u64,
    /// Fetched because they changed or something of them was missing.
    pub updated: u64,
    /// That could not be checked or fetched (bad lines included).
    pub failed: u64,
    /// The last failure's message.
    pub last_error: Option<String>,
}

/// Labels of `regcache_shared_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SharedLabels {
    op: &'static str,
    result: &'static str,
}

/// Labels of `regcache_peer_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    role: &'static str,
    result: &'static str,
}

/// Labels of `regcache_shared_bytes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

/// Labels of `regcache_shared_up`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabel {
    store: String,
}

/// The `op`s of `regcache_shared_requests_total`.
pub const SHARED_OPS: [&str; 5] = ["get", "head", "put", "delete", "touch"];

/// Every metric regcache exposes.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<DurationLabels, Histogram>,
    served_bytes: Family<ServedLabels, Counter>,
    upstream_requests: Family<UpstreamLabels, Counter>,
    upstream_duration: Family<RegistryLabel, Histogram>,
    upstream_bytes: Family<RegistryLabel, Counter>,
    upstream_up: Family<RegistryLabel, Gauge>,
    ratelimit_limit: Family<RegistryLabel, Gauge>,
    ratelimit_remaining: Family<RegistryLabel, Gauge>,
    ratelimit_window: Family<RegistryLabel, Gauge>,
    throttled: Family<RegistryLabel, Counter>,
    evictions: Counter,
    fill_failures: Family<ReasonLabel, Counter>,
    verify_failures: Counter,
    connections_open: Gauge,
    tls_handshakes: Family<ResultLabel, Counter>,
    certificates_minted: Counter,
    denied: Family<ReasonLabel, Counter>,
    rule_denials: Family<RuleLabel, Counter>,
    unused_entries: Counter,
    unused_bytes: Counter,
    warm_images: Family<ResultLabel, Counter>,
    warm_last_run: Gauge,
    warm: Mutex<Option<WarmStatus>>,
    shared_requests: Family<SharedLabels, Counter>,
    shared_bytes: Family<DirectionLabel, Counter>,
    shared_up: Family<StoreLabel, Gauge>,
    leases: Family<ResultLabel, Counter>,
    peer_requests: Family<PeerLabels, Counter>,
    cache: Arc<CacheCollector>,
    activity: activity::Activity,
    /// The upstream registries contacted, with the last contact and the
    /// latency sum (prometheus-client does not read a histogram back).
    contacts: Mutex<BTreeMap<String, Contact>>,
}

/// What [`Metrics::upstreams`] keeps of one registry's contacts.
#[derive(Debug, Clone, Copy, Default)]
struct Contact {
    last_unix: u64,
    requests: u64,
    seconds: f64,
}

/// One upstream registry as the status page shows it, read from the
/// metrics ([`Metrics::upstreams`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamStatus {
    /// The canonical registry host.
    pub registry: String,
    /// Whether the last contact got a response below 500
    /// (`regcache_upstream_up`).
    pub up: bool,
    /// When that was, in seconds since the epoch.
    pub last_contact_unix: u64,
    /// Requests sent (as the upstream duration histogram counts them).
    pub requests: u64,
    /// Their mean time to the response head, in seconds.
    pub mean_latency_seconds: Option<f64>,
    /// The pull limit last announced.
    pub ratelimit_limit: Option<i64>,
    /// What remains of it.
    pub ratelimit_remaining: Option<i64>,
    /// Its window in seconds.
    pub ratelimit_window_seconds: Option<i64>,
    /// 429 answers received.
    pub throttled: u64,
}

fn request_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let m = Self {
            registry: Registry::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(request_histogram),
            served_bytes: Family::default(),
            upstream_requests: Family::default(),
            upstream_duration: Family::new_with_constructor(request_histogram),
            upstream_bytes: Family::default(),
            upstream_up: Family::default(),
            ratelimit_limit: Family::default(),
            ratelimit_remaining: Family::default(),
            ratelimit_window: Family::default(),
            throttled: Family::default(),
            evictions: Counter::default(),
            fill_failures: Family::default(),
            verify_failures: Counter::default(),
            connections_open: Gauge::default(),
            tls_handshakes: Family::default(),
            certificates_minted: Counter::default(),
            denied: Family::default(),
            rule_denials: Family::default(),
            unused_entries: Counter::default(),
            unused_bytes: Counter::default(),
            warm_images: Family::default(),
            warm_last_run: Gauge::default(),
            warm: Mutex::new(None),
            shared_requests: Family::default(),
            shared_bytes: Family::default(),
            shared_up: Family::default(),
            leases: Family::default(),
            peer_requests: Family::default(),
            cache: Arc::default(),
            activity: activity::Activity::default(),
            contacts: Mutex::default(),
        };
        let mut r = Registry::default();
        r.register(
            "regcache_build",
            "regcache's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        r.register(
            "regcache_requests",
            "Client requests answered, by registry, kind and result",
            m.requests.clone(),
        );
        r.register(
            "regcache_request_duration_seconds",
            "Time from a client request to the end of its response body",
            m.request_duration.clone(),
        );
        r.register(
            "regcache_served_bytes",
            "Response body bytes sent to clients, from the cache or from upstream",
            m.served_bytes.clone(),
        );
        r.register(
            "regcache_upstream_requests",
            "Requests sent to upstream registries, by status code (error: no response)",
            m.upstream_requests.clone(),
        );
        r.register(
            "regcache_upstream_request_duration_seconds",
            "Time until an upstream registry's response head arrived",
            m.upstream_duration.clone(),
        );
        r.register(
            "regcache_upstream_bytes",
            "Response body bytes received from upstream registries (and the CDNs they redirect to)",
            m.upstream_bytes.clone(),
        );
        r.register(
            "regcache_upstream_up",
            "1 if the last contact with the registry got a response below 500, else 0",
            m.upstream_up.clone(),
        );
        r.register(
            "regcache_upstream_ratelimit_limit",
            "The pull limit the registry last announced (ratelimit-limit)",
            m.ratelimit_limit.clone(),
        );
        r.register(
            "regcache_upstream_ratelimit_remaining",
            "The pulls the registry last said remain (ratelimit-remaining)",
            m.ratelimit_remaining.clone(),
        );
        r.register(
            "regcache_upstream_ratelimit_window_seconds",
            "The window of the registry's pull limit (w= of ratelimit-limit)",
            m.ratelimit_window.clone(),
        );
        r.register(
            "regcache_upstream_throttled",
            "Upstream answers 429 Too Many Requests",
            m.throttled.clone(),
        );
        r.register(
            "regcache_cache_evictions",
            "Content entries evicted to make room",
            m.evictions.clone(),
        );
        r.register(
            "regcache_fill_failures",
            "Downloads into the cache that failed, by reason",
            m.fill_failures.clone(),
        );
        r.register(
            "regcache_verify_failures",
            "Cached files found not to match their digest when read",
            m.verify_failures.clone(),
        );
        r.register(
            "regcache_connections_open",
            "Client connections open on the proxy port and mirror_tls",
            m.connections_open.clone(),
        );
        r.register(
            "regcache_tls_handshakes",
            "TLS handshakes with clients (intercepted hosts, mirror_tls), by result",
            m.tls_handshakes.clone(),
        );
        r.register(
            "regcache_certificates_minted",
            "Leaf certificates minted by regcache's CA",
            m.certificates_minted.clone(),
        );
        r.register(
            "regcache_denied",
            "Requests or connections refused by regcache, by the rule that refused them",
            m.denied.clone(),
        );
        r.register(
            "regcache_rule_denials",
            "Requests refused by an image rule ([[rules]] action = \"deny\"), by the rule's number",
            m.rule_denials.clone(),
        );
        r.register(
            "regcache_warm_images",
            "Images of prefetch_file checked by keep-warm runs, by result (unchanged, updated, failed)",
            m.warm_images.clone(),
        );
        r.register(
            "regcache_warm_last_run_timestamp_seconds",
            "When the last keep-warm run (prefetch_file) ended, Unix seconds",
            m.warm_last_run.clone(),
        );
        r.register(
            "regcache_unused_removed_entries",
            "Cache entries removed because nobody read them for max_unused",
            m.unused_entries.clone(),
        );
        r.register(
            "regcache_unused_removed_bytes",
            "Bytes of the entries removed because nobody read them for max_unused",
            m.unused_bytes.clone(),
        );
        r.register(
            "regcache_shared_requests",
            "Requests to the shared store (shared_store), by operation and result (ok, missing, error)",
            m.shared_requests.clone(),
        );
        r.register(
            "regcache_shared_bytes",
            "Bytes read from (in) and written to (out) the shared store",
            m.shared_bytes.clone(),
        );
        r.register(
            "regcache_shared_up",
            "Whether the last request to the shared store succeeded (only with shared_store)",
            m.shared_up.clone(),
        );
        r.register(
            "regcache_leases",
            "Claims of a cluster-wide fetch in the shared store: won, held (another node fetches), taken_over (an expired lease), lost (a renewal refused)",
            m.leases.clone(),
        );
        r.register(
            "regcache_peer_requests",
            "Requests of the peer endpoint between nodes, by role (served: this node answered; fetched: this node asked) and result (ok, missing, refused, error)",
            m.peer_requests.clone(),
        );
        r.register_collector(Box::new(m.cache.clone()));
        r.register_collector(Box::new(ProcessCollector));
        // The fixed label sets start at 0, so that rates and alerts over
        // them have a series before the first event.
        for reason in FILL_FAILURE_REASONS {
            let _ = m.fill_failures.get_or_create(&ReasonLabel { reason });
        }
        for reason in DENIED_REASONS {
            let _ = m.denied.get_or_create(&ReasonLabel { reason });
        }
        for result in TLS_RESULTS {
            let _ = m.tls_handshakes.get_or_create(&ResultLabel { result });
        }
        Self { registry: r, ..m }
    }

    /// The metrics in the Prometheus text format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// Reads the cache's gauges from `source` from now on.
    pub fn set_cache(&self, source: Arc<dyn CacheGauges>) {
        *self.cache.source.write().unwrap_or_else(|p| p.into_inner()) = Some(source);
    }

    /// One client request answered: `registry` is the canonical host (empty
    /// if the request was for none: regcache's own pages, refusals before a
    /// registry was known), `path` the request path, `cache` how it was
    /// served (the access log's `cache` field), `bytes` the body bytes sent.
    /// Served bytes count only for a registry's content: from the cache for
    /// the cache's results, from upstream for `miss` and `pass`; never for
    /// refusals and errors.
    pub fn request(
        &self,
        registry: &str,
        path: &str,
        cache: &str,
        status: u16,
        bytes: u64,
        elapsed: Duration,
    ) {
        let kind = kind_of(path);
        let result = result_of(cache, status);
        self.requests
            .get_or_create(&RequestLabels {
                registry: registry.to_string(),
                kind,
                result,
            })
            .inc();
        self.request_duration
            .get_or_create(&DurationLabels { kind, result })
            .observe(elapsed.as_secs_f64());
        self.activity.request(&activity::Ended {
            registry,
            path,
            kind,
            result,
            status,
            bytes,
        });
        let source = match result {
            "hit" | "shared" | "peer" | "coalesced" | "stale" | "revalidated" => "cache",
            "miss" | "pass" => "upstream",
            // Refusals and errors: not content, from either.
            _ => return,
        };
        if bytes > 0 && !registry.is_empty() {
            self.served_bytes
                .get_or_create(&ServedLabels {
                    registry: registry.to_string(),
                    source,
                })
                .inc_by(bytes);
        }
    }

    /// An upstream registry answered `status` (with `headers`) to `method
    /// path` after `elapsed`; `registry` is its canonical host. The rate
    /// limit gauges follow the `ratelimit-*` headers of manifest GETs and
    /// HEADs only (where Docker Hub sends them); a 429 counts as throttled.
    pub fn upstream_response(
        &self,
        registry: &str,
        method: &str,
        path: &str,
        status: u16,
        headers: &http::HeaderMap,
        elapsed: Duration,
    ) {
        self.upstream(registry, method, &status.to_string(), elapsed, status < 500);
        let label = RegistryLabel {
            registry: registry.to_string(),
        };
        if status == 429 {
            self.throttled.get_or_create(&label).inc();
        }
        if status == 429 || status >= 500 {
            let reason = http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("");
            self.activity.event(
                "upstream",
                &activity::target(registry, path),
                Some(status),
                &format!("{method}: {reason}"),
            );
        }
        if !matches!(method, "GET" | "HEAD") || kind_of(path) != "manifest" {
            return;
        }
        let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
        if let Some(limit) = header("ratelimit-limit").and_then(parse_ratelimit) {
            self.ratelimit_limit
                .get_or_create(&label)
                .set(clamp(limit.quota));
            if let Some(w) = limit.window_seconds {
                self.ratelimit_window.get_or_create(&label).set(clamp(w));
            }
        }
        if let Some(remaining) = header("ratelimit-remaining").and_then(parse_ratelimit) {
            self.ratelimit_remaining
                .get_or_create(&label)
                .set(clamp(remaining.quota));
        }
    }

    /// An upstream request to `registry` failed without a response.
    pub fn upstream_failed(&self, registry: &str, method: &str, elapsed: Duration) {
        self.upstream(registry, method, "error", elapsed, false);
        self.activity.event(
            "upstream",
            &format!("{registry} {method}"),
            None,
            "no response",
        );
    }

    fn upstream(&self, registry: &str, method: &str, code: &str, elapsed: Duration, up: bool) {
        self.upstream_requests
            .get_or_create(&UpstreamLabels {
                registry: registry.to_string(),
                method: method.to_string(),
                code: code.to_string(),
            })
            .inc();
        let label = RegistryLabel {
            registry: registry.to_string(),
        };
        self.upstream_duration
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
        self.upstream_up.get_or_create(&label).set(i64::from(up));
        let mut contacts = self.contacts.lock().unwrap_or_else(|p| p.into_inner());
        let contact = match contacts.get_mut(registry) {
            Some(c) => c,
            None => contacts.entry(registry.to_string()).or_default(),
        };
        contact.last_unix = activity::now_unix();
        contact.requests += 1;
        contact.seconds += elapsed.as_secs_f64();
    }

    /// Each upstream registry contacted since start, by name.
    pub fn upstreams(&self) -> Vec<UpstreamStatus> {
        let contacts: Vec<(String, Contact)> = self
            .contacts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        contacts
            .into_iter()
            .map(|(registry, c)| {
                let label = RegistryLabel {
                    registry: registry.clone(),
                };
                let gauge = |f: &Family<RegistryLabel, Gauge>| f.get(&label).map(|g| g.get());
                UpstreamStatus {
                    up: gauge(&self.upstream_up) == Some(1),
                    last_contact_unix: c.last_unix,
                    requests: c.requests,
                    mean_latency_seconds: (c.requests > 0).then(|| c.seconds / c.requests as f64),
                    ratelimit_limit: gauge(&self.ratelimit_limit),
                    ratelimit_remaining: gauge(&self.ratelimit_remaining),
                    ratelimit_window_seconds: gauge(&self.ratelimit_window),
                    throttled: self.throttled.get(&label).map(|c| c.get()).unwrap_or(0),
                    registry,
                }
            })
            .collect()
    }

    /// What the status page shows of recent traffic, with the `top` most
    /// requested images.
    pub fn activity(&self, top: usize) -> activity::ActivitySnapshot {
        self.activity.snapshot(top)
    }

    /// `n` body bytes arrived from `registry` (once per response, when its
    /// body ends or is dropped).
    pub fn upstream_bytes(&self, registry: &str, n: u64) {
        self.upstream_bytes
            .get_or_create(&RegistryLabel {
                registry: registry.to_string(),
            })
            .inc_by(n);
    }

    /// `n` content entries were evicted.
    pub fn evicted(&self, n: u64) {
        self.evictions.inc_by(n);
    }

    /// A download into the cache failed: one of [`FILL_FAILURE_REASONS`].
    /// `what` names it for the status page (image and digest).
    pub fn fill_failed(&self, reason: &'static str, what: &str) {
        self.fill_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
        self.activity
            .event("fill", what, None, &format!("download failed: {reason}"));
    }

    /// A request to the shared store ended: `op` one of [`SHARED_OPS`],
    /// `result` `ok`, `missing` (no such object) or `error`.
    pub fn shared_request(&self, op: &'static str, result: &'static str) {
        self.shared_requests
            .get_or_create(&SharedLabels { op, result })
            .inc();
    }

    /// `n` bytes moved between regcache and the shared store: `in` (read
    /// from it) or `out` (written to it).
    pub fn shared_bytes(&self, direction: &'static str, n: u64) {
        self.shared_bytes
            .get_or_create(&DirectionLabel { direction })
            .inc_by(n);
    }

    /// A lease claim ended with `result`: `won`, `held`, `taken_over`,
    /// `lost`.
    pub fn lease(&self, result: &'static str) {
        self.leases.get_or_create(&ResultLabel { result }).inc();
    }

    /// A request of the peer endpoint ended: `role` `served` or `fetched`,
    /// `result` `ok`, `missing` (not being fetched there), `refused` (not a
    /// node of the cluster) or `error`.
    pub fn peer_request(&self, role: &'static str, result: &'static str) {
        self.peer_requests
            .get_or_create(&PeerLabels { role, result })
            .inc();
    }

    /// Whether the shared store `store` (its URL) answered the last request.
    pub fn shared_up(&self, store: &str, up: bool) {
        self.shared_up
            .get_or_create(&StoreLabel {
                store: store.to_string(),
            })
            .set(i64::from(up));
    }

    /// A cached file did not match its digest.
    pub fn verify_failed(&self) {
        self.verify_failures.inc();
    }

    /// A client connection opened; it counts as open until the guard drops.
    pub fn connection(&self) -> ConnectionGuard {
        self.connections_open.inc();
        ConnectionGuard(self.connections_open.clone())
    }

    /// A client TLS handshake ended: `ok`, `failed` or `refused`.
    pub fn tls_handshake(&self, result: &'static str) {
        self.tls_handshakes
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// A leaf certificate was minted.
    pub fn certificate_minted(&self) {
        self.certificates_minted.inc();
    }

    /// regcache refused a client by `reason`: `allow` (the client's address),
    /// `proxy_auth` (no or wrong proxy credentials), `port` or `host` (see
    /// [`Metrics::refused_by_policy`]).
    pub fn denied(&self, reason: &'static str) {
        self.denied.get_or_create(&ReasonLabel { reason }).inc();
        // The others answer a request, which the access log records.
        if reason == "allow" {
            self.activity.event(
                "refused",
                "",
                None,
                "client address not in allow (connection closed)",
            );
        }
    }

    /// A keep-warm run checked one image: `unchanged`, `updated` or `failed`.
    pub fn warm_image(&self, result: &'static str) {
        self.warm_images
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// A keep-warm run ended; `status` is what the status page shows.
    pub fn warm_run_done(&self, status: WarmStatus) {
        self.warm_last_run
            .set(i64::try_from(status.last_run_unix).unwrap_or(i64::MAX));
        *self.warm.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
    }

    /// The last keep-warm run, if one ended.
    pub fn warm_status(&self) -> Option<WarmStatus> {
        self.warm.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The retention pass removed `entries` entries of `bytes` bytes not
    /// read for their `max_unused`.
    pub fn removed_unused(&self, entries: u64, bytes: u64) {
        self.unused_entries.inc_by(entries);
        self.unused_bytes.inc_by(bytes);
    }

    /// regcache refused a request for a repository by the image rule
    /// numbered `rule` (`regcache_denied_total{reason="rule"}` as well).
    pub fn denied_by_rule(&self, rule: usize) {
        self.denied("rule");
        self.rule_denials
            .get_or_create(&RuleLabel {
                rule: rule.to_string(),
            })
            .inc();
    }

    /// regcache refused a CONNECT or plain-HTTP request by the policy `rule`
    /// (the option that refused it): `port` for the port rules
    /// (`connect_ports`, `plain_http_port`), `host` for the others
    /// (`other_hosts`, `intercept`, `insecure_registries`).
    pub fn refused_by_policy(&self, rule: &str) {
        self.denied(if rule.contains("port") {
            "port"
        } else {
            "host"
        });
    }
}

/// Counts a client connection as open while it lives.
#[derive(Debug)]
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The `kind` label of a registry request path.
pub fn kind_of(path: &str) -> &'static str {
    if path.contains("/manifests/") {
        "manifest"
    } else if path.contains("/blobs/") && !path.contains("/blobs/uploads") {
        "blob"
    } else {
        "other"
    }
}

/// The `result` label of a request served as `cache` (the access log's
/// field) with `status`: `error` for a 5xx, the cache status when there is
/// one, `denied` for a refusal (401, 403, 407), else `pass` (forwarded
/// untouched: not a cacheable request).
pub fn result_of(cache: &str, status: u16) -> &'static str {
    if status >= 500 {
        return "error";
    }
    match cache {
        "HIT" => "hit",
        "SHARED" => "shared",
        "PEER" => "peer",
        "MISS" => "miss",
        "COALESCED" => "coalesced",
        "STALE" => "stale",
        "REVALIDATED" => "revalidated",
        _ if matches!(status, 401 | 403 | 407) => "denied",
        _ => "pass",
    }
}

/// A `ratelimit-limit` or `ratelimit-remaining` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// The number: the limit, or what remains of it.
    pub quota: u64,
    /// The window (`w=`) in seconds, if given.
    pub window_seconds: Option<u64>,
}

/// Parses a rate-limit header value as Docker Hub sends it (`100;w=21600`)
/// or as the IETF draft writes it, a list whose first item is the quota in
/// force and whose others describe policies (`100, 100;w=21600`,
/// `10, 10;w=1, 50;w=60`). The window is the first item's `w=`, else the
/// `w=` of the policy whose quota is the first item's. None if the first
/// item is not a number.
pub fn parse_ratelimit(value: &str) -> Option<RateLimit> {
    let mut items = value.split(',').map(parse_item);
    let (quota, window) = items.next()??;
    let window_seconds = window.or_else(|| {
        items
            .flatten()
            .find(|(q, w)| *q == quota && w.is_some())
            .and_then(|(_, w)| w)
    });
    Some(RateLimit {
        quota,
        window_seconds,
    })
}

/// One list item: `N` or `N;w=S` (other parameters ignored).
fn parse_item(item: &str) -> Option<(u64, Option<u64>)> {
    let mut parts = item.split(';');
    let quota = parts.next()?.trim().parse().ok()?;
    let window = parts
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("w"))
        .and_then(|(_, v)| v.trim().trim_matches('"').parse().ok());
    Some((quota, window))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_headers_are_read_in_their_real_forms() {
        let rl = |quota, w| {
            Some(RateLimit {
                quota,
                window_seconds: w,
            })
        };
        let table: &[(&str, Option<RateLimit>)] = &[
            // Docker Hub, anonymous and authenticated.
            ("100;w=21600", rl(100, Some(21600))),
            ("76;w=21600", rl(76, Some(21600))),
            ("200;w=21600", rl(200, Some(21600))),
            ("0;w=21600", rl(0, Some(21600))),
            // The IETF draft's list: the quota, then its policies.
            ("100, 100;w=21600", rl(100, Some(21600))),
            ("10, 10;w=1, 50;w=60", rl(10, Some(1))),
            ("50, 10;w=1, 50;w=60", rl(50, Some(60))),
            // Spacing, other parameters, quoted values.
            (" 100 ; w=21600 ", rl(100, Some(21600))),
            ("100;W=\"3600\"", rl(100, Some(3600))),
            ("100;comment=\"x\";w=60", rl(100, Some(60))),
            // No window.
            ("100", rl(100, None)),
            ("100, 50;w=60", rl(100, None)),
            // Not rate limits.
            ("", None),
            ("unlimited", None),
            ("-1;w=60", None),
            (";w=60", None),
        ];
        for (value, want) in table {
            assert_eq!(parse_ratelimit(value), *want, "{value:?}");
        }
    }

    #[test]
    fn results_and_kinds_come_from_the_fixed_sets() {
        let table = [
            ("HIT", 200, "hit"),
            ("HIT", 206, "hit"),
            ("SHARED", 200, "shared"),
            ("PEER", 200, "peer"),
            ("MISS", 200, "miss"),
            ("MISS", 404, "miss"),
            ("COALESCED", 200, "coalesced"),
            ("STALE", 200, "stale"),
            ("REVALIDATED", 200, "revalidated"),
            ("MISS", 502, "error"),
            ("-", 500, "error"),
            ("-", 407, "denied"),
            ("-", 403, "denied"),
            ("-", 401, "denied"),
            ("-", 200, "pass"),
            ("INTERCEPT", 200, "pass"),
        ];
        for (cache, status, want) in table {
            assert_eq!(result_of(cache, status), want, "{cache} {status}");
        }
        assert_eq!(kind_of("/v2/library/alpine/manifests/3.20"), "manifest");
        assert_eq!(kind_of("/v2/library/alpine/blobs/sha256:ab"), "blob");
        assert_eq!(kind_of("/v2/library/alpine/blobs/uploads/"), "other");
        assert_eq!(kind_of("/v2/"), "other");
    }

    #[test]
    fn render_names_every_family_in_the_text_format() {
        let m = Metrics::new();
        m.request(
            "docker.io",
            "/v2/a/blobs/sha256:x",
            "HIT",
            200,
            10,
            Duration::from_millis(3),
        );
        let mut headers = http::HeaderMap::new();
        headers.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
        headers.insert("ratelimit-remaining", "76;w=21600".parse().unwrap());
        m.upstream_response(
            "docker.io",
            "GET",
            "/v2/library/alpine/manifests/3.20",
            200,
            &headers,
            Duration::from_millis(1),
        );
        // Rate-limit headers on a blob answer are not Docker Hub's pull
        // count: ignored.
        headers.insert("ratelimit-remaining", "5;w=21600".parse().unwrap());
        m.upstream_response(
            "docker.io",
            "GET",
            "/v2/library/alpine/blobs/sha256:ab",
            200,
            &headers,
            Duration::from_millis(1),
        );
        m.upstream_bytes("docker.io", 7);
        let text = m.render();
        for line in [
            "regcache_requests_total{registry=\"docker.io\",kind=\"blob\",result=\"hit\"} 1",
            "regcache_served_bytes_total{registry=\"docker.io\",source=\"cache\"} 10",
            "regcache_upstream_ratelimit_limit{registry=\"docker.io\"} 100",
            "regcache_upstream_ratelimit_remaining{registry=\"docker.io\"} 76",
            "regcache_upstream_ratelimit_window_seconds{registry=\"docker.io\"} 21600",
            "regcache_upstream_up{registry=\"docker.io\"} 1",
            "regcache_upstream_bytes_total{registry=\"docker.io\"} 7",
            "regcache_build_info{version=\"",
            "# HELP regcache_requests_total Client requests answered, by registry, kind and result.\n",
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_open_fds ",
            "regcache_fill_failures_total{reason=\"digest_mismatch\"} 0",
            "regcache_denied_total{reason=\"proxy_auth\"} 0",
            "regcache_tls_handshakes_total{result=\"refused\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn process_stat_is_read_past_a_command_with_spaces() {
        // A real line of /proc/self/stat, its command name made awkward.
        let stat = "4242 (reg (cache) x) S 1 4242 4242 0 -1 4194560 1535 0 0 0 \
                    250 50 0 0 20 0 9 0 8000 123456789 2048 18446744073709551615 1 1 0 0 0 0 0 \
                    4096 17664 0 0 0 17 1 0 0 0 0 0";
        let got = parse_stat(stat, 100, 4096, 1_700_000_000).unwrap();
        assert_eq!(got.cpu_seconds, 3.0);
        assert_eq!(got.virtual_bytes, 123_456_789);
        assert_eq!(got.resident_bytes, 2048 * 4096);
        assert_eq!(got.start_time_seconds, 1_700_000_080);
        assert_eq!(parse_stat("garbage", 100, 4096, 0), None);
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
    }
}
