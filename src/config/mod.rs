//! Configuration: one [`Config`] built from four layers.
//!
//! The layers, weakest first: the built-in defaults (`default.toml`, compiled
//! into the binary so that `regcache serve` needs no file), a TOML file given
//! with `--config`, `REGCACHE_*` environment variables, and command-line flags.
//! Every option has the same name in all of them: `ca_dir` in TOML is
//! `REGCACHE_CA_DIR` in the environment and `--ca-dir` on the command line.
//! Clap merges flags over the environment; [`Settings::merged_over`] lays that
//! result over the file and the defaults, and [`Config::from_settings`]
//! validates the outcome into typed values with messages for the user.
//!
//! `default.toml` is the one place a default is written: validation takes
//! every value from the layers (a value missing after layering is a bug in
//! that file, reported as [`ConfigError::MissingDefault`]), and `--help`
//! shows the defaults it reads from there ([`with_defaults_in_help`]).

mod duration;
mod help;
mod resolve;
pub mod secret;
mod settings;

pub use duration::parse_duration;
pub use help::with_defaults_in_help;
pub use resolve::{ResolveEntry, ResolveMap};
use settings::{parse_toml, BUILT_IN};
pub use settings::{RegistrySettings, RuleSettings, Settings, UpstreamCredential, DEFAULT_TOML};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::registry::hosts::{canonical_registry, HostPattern, HostPort, InterceptList};
use crate::registry::rules::{Decision, RuleSpec, Rules};

/// A configuration problem, written for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named by `--config`.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown keys.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file named by `--config`.
        path: PathBuf,
        /// The TOML parser's explanation, on one line.
        message: String,
    },
    /// A value cannot be layered over the others (a path that is not UTF-8).
    #[error("cannot use the settings: {message}")]
    Layer {
        /// What could not be carried over.
        message: String,
    },
    /// An option with a built-in default has no value after layering: the
    /// embedded `default.toml` lacks it (a bug in regcache, not in the input).
    #[error("no value for {key}: the built-in defaults (default.toml) lack one")]
    MissingDefault {
        /// The option's name as written in TOML.
        key: &'static str,
    },
    /// A value is present but not acceptable.
    #[error("invalid value for {key}: {message}")]
    Value {
        /// The option's name as written in TOML.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// What to do with a CONNECT to a host that is not on the intercept list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OtherHosts {
    /// Relay the bytes untouched; the client sees the host's own certificate.
    Tunnel,
    /// Answer 403 Forbidden.
    Refuse,
}

/// When a cached blob's bytes are hashed again as they are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum VerifyReads {
    /// On the first read of each entry after every start (and never again in
    /// that run once it matched).
    First,
    /// On every read.
    Always,
    /// Never: bytes at rest are trusted (a file changed on disk is served).
    Never,
}

/// The format of log lines on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, one line per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the CA comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// regcache's own CA in this directory, created if missing.
    Dir(PathBuf),
    /// An organisation's CA, never written by regcache.
    Files {
        /// PEM certificate.
        cert: PathBuf,
        /// PEM private key.
        key: PathBuf,
    },
}

/// The validated configuration of a running regcache.
#[derive(Debug, Clone)]
pub struct Config {
    /// Proxy listen address.
    pub listen: SocketAddr,
    /// Where the CA lives.
    pub ca: CaSource,
    /// Extra upstream trust anchors.
    pub upstream_ca: Vec<PathBuf>,
    /// Upstream address overrides.
    pub resolve: ResolveMap,
    /// Hosts whose CONNECT is intercepted.
    pub intercept: InterceptList,
    /// Policy for the other hosts.
    pub other_hosts: OtherHosts,
    /// Ports CONNECT may reach (443 always included).
    pub connect_ports: Vec<u16>,
    /// Registries served over plain HTTP (opt-in, keyed apart).
    pub insecure_registries: Vec<HostPort>,
    /// Log format.
    pub log_format: LogFormat,
    /// Drain time on shutdown.
    pub shutdown_grace: Duration,
    /// Leaf certificate cache capacity.
    pub cert_cache: usize,
    /// How long a client may send nothing while its request head or body
    /// is awaited, or hold a connection with no request in flight.
    pub client_idle_timeout: Duration,
    /// Where the disk cache lives.
    pub cache_dir: PathBuf,
    /// The cache's size cap in bytes (None: half the disk, decided at start).
    pub cache_size: Option<u64>,
    /// Default freshness of a cached tag.
    pub tag_ttl: Duration,
    /// Per-registry tag freshness, by canonical registry name.
    pub registry_tag_ttl: HashMap<String, Duration>,
    /// The keep-warm list (None: off).
    pub prefetch_file: Option<PathBuf>,
    /// How often its images are refreshed.
    pub prefetch_interval: Duration,
    /// Cached content unread for this long is removed (None: kept until
    /// `cache_size` needs the room); rules may set their own.
    pub max_unused: Option<Duration>,
    /// When cached blobs are hashed again as they are served.
    pub verify_reads: VerifyReads,
    /// Client networks allowed to use the proxy.
    pub allow: Vec<ipnet::IpNet>,
    /// htpasswd file of proxy users; None: no Proxy-Authorization needed.
    pub proxy_users: Option<PathBuf>,
    /// File of the admin API's bearer token; None: loopback clients only.
    pub admin_token_file: Option<PathBuf>,
    /// Parent proxy for upstream traffic: `http://[user:pass@]host:port`.
    pub upstream_proxy: Option<http::Uri>,
    /// Hosts reached directly despite `upstream_proxy`.
    pub upstream_no_proxy: Vec<HostPattern>,
    /// How long a repository found public stays shared.
    pub public_ttl: Duration,
    /// How long an accepted client credential is trusted.
    pub auth_ttl: Duration,
    /// regcache's own accounts, by canonical registry name.
    pub credentials: HashMap<String, UpstreamCredential>,
    /// Never contact any upstream.
    pub offline: bool,
    /// Offline registries serve content not known public to every client.
    pub offline_share_private: bool,
    /// HTTPS listener for the mirror endpoints.
    pub mirror_tls: Option<SocketAddr>,
    /// Listener for `/metrics` and `/healthz` alone (None: off).
    pub metrics_listen: Option<SocketAddr>,
    /// The shared tier's `s3://BUCKET/PREFIX` (None: off).
    pub shared_store: Option<String>,
    /// One upstream fetch per cluster through leases in the shared tier.
    pub shared_single_flight: bool,
    /// The peer endpoint: where it listens and the `host:port` other nodes
    /// dial (None: off).
    pub peer: Option<PeerEndpoint>,
    /// Its certificate and key, if not minted by the regcache CA.
    pub mirror_cert: Option<(PathBuf, PathBuf)>,
    /// Host names a minted `mirror_tls` leaf may be for (normalised).
    pub mirror_names: Vec<String>,
    /// Per-registry `offline`, by canonical registry name.
    pub registry_offline: HashMap<String, bool>,
    /// The image rules (`[[rules]]`), first match wins.
    pub rules: Rules,
}

impl Config {
    /// Whether `registry` (a canonical registry name) is served from the
    /// cache only, never asked.
    pub fn is_offline(&self, registry: &str) -> bool {
        settings_of(&self.registry_offline, registry).unwrap_or(self.offline)
    }

    /// The tag freshness for `registry` (a canonical registry name).
    pub fn tag_ttl_for(&self, registry: &str) -> Duration {
        settings_of(&self.registry_tag_ttl, registry).unwrap_or(self.tag_ttl)
    }

    /// The tag freshness for a repository of `registry` the rules decided
    /// `decision` for: the rule's `tag_ttl`, else the registry's.
    pub fn tag_ttl_of(&self, registry: &str, decision: &Decision) -> Duration {
        decision
            .tag_ttl
            .unwrap_or_else(|| self.tag_ttl_for(registry))
    }

    /// The shortest `max_unused` of the configuration, global or of a rule:
    /// how often retention must look (None: it is off).
    pub fn shortest_max_unused(&self) -> Option<Duration> {
        self.rules
            .rules()
            .iter()
            .filter_map(|r| r.spec.max_unused)
            .chain(self.max_unused)
            .min()
    }

    /// The cache's size cap in bytes: `cache_size`, or when it is unset half
    /// the size of the filesystem holding `cache_dir` (10 GiB if that cannot
    /// be read). Reads the filesystem, so call it once, at start.
    pub fn cache_cap(&self) -> u64 {
        self.cache_size
            .unwrap_or_else(|| half_the_filesystem_holding(&self.cache_dir))
    }
}

/// Half the size of the filesystem holding `dir`, or of its parent while
/// `dir` does not exist yet; 10 GiB if neither can be read.
fn half_the_filesystem_holding(dir: &Path) -> u64 {
    const FALLBACK: u64 = 10 * 1024 * 1024 * 1024;
    let probe = if dir.exists() {
        dir
    } else {
        dir.parent().unwrap_or(Path::new("."))
    };
    let probe = if probe.as_os_str().is_empty() {
        Path::new(".")
    } else {
        probe
    };
    match rustix::fs::statvfs(probe) {
        Ok(st) => (st.f_blocks.saturating_mul(st.f_frsize) / 2).max(1),
        Err(_) => FALLBACK,
    }
}

/// The per-registry setting for the registry keyed `registry`, from its
/// `[registries."…"]` table. An insecure registry (keyed `http://host:port`)
/// is configured under its `host:port`, or its `host` for port 80, like the
/// HTTPS registry of that name.
fn settings_of<T: Copy>(table: &HashMap<String, T>, registry: &str) -> Option<T> {
    let Some(host_port) = registry.strip_prefix("http://") else {
        return table.get(registry).copied();
    };
    table.get(host_port).copied().or_else(|| {
        host_port
            .strip_suffix(":80")
            .and_then(|host| table.get(host).copied())
    })
}

impl Config {
    /// Validates settings laid over the built-in defaults.
    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        Self::validate(s.merged_over(Settings::defaults()?)?)
    }

    /// Validates settings that already hold the built-in defaults; an option
    /// `default.toml` should have set but did not is a
    /// [`ConfigError::MissingDefault`].
    fn validate(s: Settings) -> Result<Config, ConfigError> {
        let ca = match (s.ca_cert, s.ca_key) {
            (Some(cert), Some(key)) => CaSource::Files { cert, key },
            (None, None) => CaSource::Dir(built_in(s.ca_dir, "ca_dir")?),
            _ => {
                return Err(ConfigError::Value {
                    key: "ca_cert",
                    message: "ca_cert and ca_key must be given together".into(),
                })
            }
        };
        let resolve = s
            .resolve
            .iter()
            .map(|e| e.parse::<ResolveEntry>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| ConfigError::Value {
                key: "resolve",
                message,
            })?;
        let extra = s
            .intercept
            .iter()
            .map(|p| p.parse::<HostPattern>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| ConfigError::Value {
                key: "intercept",
                message,
            })?;
        let mut connect_ports = vec![443];
        for port in s.connect_ports {
            if port == 0 {
                return Err(ConfigError::Value {
                    key: "connect_ports",
                    message: "port 0 is not a port".into(),
                });
            }
            if !connect_ports.contains(&port) {
                connect_ports.push(port);
            }
        }
        let insecure_registries = s
            .insecure_registries
            .iter()
            .map(|e| HostPort::parse(e, 80))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| ConfigError::Value {
                key: "insecure_registries",
                message,
            })?;
        let cert_cache = built_in(s.cert_cache, "cert_cache")?;
        if cert_cache == 0 {
            return Err(ConfigError::Value {
                key: "cert_cache",
                message: "must be at least 1".into(),
            });
        }
        let client_idle_timeout = match built_in(s.client_idle_timeout, "client_idle_timeout")? {
            0 => {
                return Err(ConfigError::Value {
                    key: "client_idle_timeout",
                    message: "must be at least 1 second".into(),
                })
            }
            secs => Duration::from_secs(secs),
        };
        let cache_size = match &s.cache_size {
            None => None,
            Some(text) => Some(
                text.trim()
                    .parse::<bytesize::ByteSize>()
                    .map_err(|e| ConfigError::Value {
                        key: "cache_size",
                        message: format!("{text:?} is not a size like 50GiB ({e})"),
                    })?
                    .as_u64(),
            ),
        };
        let registry_tag_ttl = s
            .registries
            .iter()
            .filter_map(|(host, r)| {
                r.tag_ttl
                    .map(|t| (canonical_registry(host), Duration::from_secs(t)))
            })
            .collect();
        let listen = built_in(s.listen, "listen")?;
        let allow = allow_list(&s.allow, listen)?;
        let (upstream_proxy, upstream_no_proxy) =
            parent_proxy(s.upstream_proxy.as_deref(), &s.upstream_no_proxy)?;
        let mut credentials = HashMap::new();
        for (host, r) in &s.registries {
            let cred = match (&r.username, &r.password_file, &r.token_file) {
                (None, None, None) => continue,
                (Some(username), Some(password_file), None) => UpstreamCredential::Basic {
                    username: username.clone(),
                    password_file: password_file.clone(),
                },
                (None, None, Some(token_file)) => UpstreamCredential::Token(token_file.clone()),
                _ => {
                    return Err(ConfigError::Value {
                        key: "registries",
                        message: format!(
                            "[registries.{host:?}] needs username with password_file, or token_file alone"
                        ),
                    })
                }
            };
            credentials.insert(canonical_registry(host), cred);
        }
        let registry_offline = s
            .registries
            .iter()
            .filter_map(|(host, r)| r.offline.map(|o| (canonical_registry(host), o)))
            .collect();
        let rules = rules_of(&s.rules)?;
        let prefetch_interval = built_in(s.prefetch_interval, "prefetch_interval")?;
        let prefetch_interval = parse_duration(&prefetch_interval)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| ConfigError::Value {
                key: "prefetch_interval",
                message: format!("{prefetch_interval:?} is not a duration like 6h, 30m or 45s"),
            })?;
        let prefetch_file = s.prefetch_file.filter(|p| !p.as_os_str().is_empty());
        let max_unused = match s.max_unused.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(text) => Some(parse_duration(text).map_err(|message| ConfigError::Value {
                key: "max_unused",
                message,
            })?),
        };
        let mirror_cert = match (s.mirror_cert, s.mirror_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Value {
                    key: "mirror_cert",
                    message: "mirror_cert and mirror_key must be given together".into(),
                })
            }
        };
        let mirror_names = mirror_names(&s.mirror_names)?;
        let metrics_listen = match s.metrics_listen.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(addr) => Some(addr.parse().map_err(|e| ConfigError::Value {
                key: "metrics_listen",
                message: format!("{addr:?} is not an address and port ({e})"),
            })?),
        };
        let shared_store = match s.shared_store.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(url) => Some(shared_store_url(url)?),
        };
        let peer = peer_endpoint(
            s.peer_listen.as_deref(),
            s.peer_advertise.as_deref(),
            shared_store.is_some(),
        )?;
        Ok(Config {
            peer,
            mirror_tls: s.mirror_tls,
            metrics_listen,
            shared_store,
            shared_single_flight: built_in(s.shared_single_flight, "shared_single_flight")?,
            mirror_cert,
            mirror_names,
            offline: built_in(s.offline, "offline")?,
            offline_share_private: built_in(s.offline_share_private, "offline_share_private")?,
            registry_offline,
            rules,
            allow,
            proxy_users: s.proxy_users,
            admin_token_file: s.admin_token_file,
            upstream_proxy,
            upstream_no_proxy,
            public_ttl: Duration::from_secs(built_in(s.public_ttl, "public_ttl")?),
            auth_ttl: Duration::from_secs(built_in(s.auth_ttl, "auth_ttl")?),
            credentials,
            cache_dir: built_in(s.cache_dir, "cache_dir")?,
            cache_size,
            tag_ttl: Duration::from_secs(built_in(s.tag_ttl, "tag_ttl")?),
            registry_tag_ttl,
            max_unused,
            prefetch_file,
            prefetch_interval,
            verify_reads: built_in(s.verify_reads, "verify_reads")?,
            listen,
            ca,
            upstream_ca: s.upstream_ca,
            resolve: ResolveMap::new(resolve),
            intercept: InterceptList::with_defaults(extra),
            other_hosts: built_in(s.other_hosts, "other_hosts")?,
            connect_ports,
            insecure_registries,
            log_format: built_in(s.log_format, "log_format")?,
            shutdown_grace: Duration::from_secs(built_in(s.shutdown_grace, "shutdown_grace")?),
            cert_cache,
            client_idle_timeout,
        })
    }
}

/// The `[[rules]]` tables compiled, in order; a bad pattern or duration
/// names its rule.
fn rules_of(tables: &[RuleSettings]) -> Result<Rules, ConfigError> {
    let mut specs = Vec::with_capacity(tables.len());
    for (i, table) in tables.iter().enumerate() {
        let max_unused = match &table.max_unused {
            None => None,
            Some(text) => Some(parse_duration(text).map_err(|e| ConfigError::Value {
                key: "rules",
                message: format!(
                    "rule {} (match = {:?}): max_unused: {e}",
                    i + 1,
                    table.pattern
                ),
            })?),
        };
        specs.push(RuleSpec {
            pattern: table.pattern.clone(),
            action: table.action,
            cache: table.cache.unwrap_or(true),
            tag_ttl: table.tag_ttl.map(Duration::from_secs),
            max_unused,
        });
    }
    Rules::new(specs).map_err(|e| ConfigError::Value {
        key: "rules",
        message: e.to_string(),
    })
}

/// The value of an option that `default.toml` sets, so that only a bug in the
/// embedded file leaves it unset after layering.
fn built_in<T>(value: Option<T>, key: &'static str) -> Result<T, ConfigError> {
    value.ok_or(ConfigError::MissingDefault { key })
}

/// The client networks allowed: as configured, or by default loopback plus,
/// when listening beyond loopback, the private ranges (RFC 1918, RFC 4193).
fn allow_list(entries: &[String], listen: SocketAddr) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    if !entries.is_empty() {
        return entries
            .iter()
            .map(|e| {
                e.parse::<ipnet::IpNet>()
                    .or_else(|_| e.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| ConfigError::Value {
                        key: "allow",
                        message: format!("{e:?} is not a CIDR like 10.0.0.0/8 or an IP address"),
                    })
            })
            .collect();
    }
    let mut nets = vec!["127.0.0.0/8", "::1/128"];
    if !listen.ip().is_loopback() {
        nets.extend([
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "fc00::/7",
            "fe80::/10",
        ]);
    }
    Ok(nets.into_iter().filter_map(|n| n.parse().ok()).collect())
}

/// The parent proxy and its exceptions; `env` takes them from HTTPS_PROXY
/// and NO_PROXY (either case).
fn parent_proxy(
    setting: Option<&str>,
    no_proxy: &[String],
) -> Result<(Option<http::Uri>, Vec<HostPattern>), ConfigError> {
    let env = |names: [&str; 2]| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
    };
    let mut exceptions: Vec<String> = no_proxy.to_vec();
    let url = match setting {
        None | Some("") => return Ok((None, Vec::new())),
        Some("env") => {
            if let Some(list) = env(["NO_PROXY", "no_proxy"]) {
                exceptions.extend(
                    list.split(',')
                        .map(|h| h.trim().trim_start_matches('.').to_string())
                        .filter(|h| !h.is_empty()),
                );
            }
            match env(["HTTPS_PROXY", "https_proxy"]) {
                Some(url) => url,
                None => return Ok((None, Vec::new())),
            }
        }
        Some(url) => url.to_string(),
    };
    // The URL may hold a password: errors show it redacted.
    let shown = match url
        .split_once("://")
        .and_then(|(scheme, rest)| rest.split_once('@').map(|(_, host)| (scheme, host)))
    {
        Some((scheme, host)) => format!("{scheme}://***@{host}"),
        None => url.clone(),
    };
    let uri: http::Uri = url.parse().map_err(|e| ConfigError::Value {
        key: "upstream_proxy",
        message: format!("{shown:?} is not a URL ({e})"),
    })?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(ConfigError::Value {
            key: "upstream_proxy",
            message: format!("{shown:?} must look like http://host:port"),
        });
    }
    let mut patterns = Vec::new();
    for e in exceptions {
        let pattern = if e.starts_with("*.") || e.parse::<std::net::IpAddr>().is_ok() {
            e.clone()
        } else {
            e.split(':').next().unwrap_or_default().to_string()
        };
        if let Ok(p) = pattern.parse::<HostPattern>() {
            patterns.push(p);
        }
        if !pattern.starts_with("*.") {
            if let Ok(p) = format!("*.{pattern}").parse::<HostPattern>() {
                patterns.push(p);
            }
        }
    }
    Ok((Some(uri), patterns))
}

/// `mirror_names`, normalised; each must be a DNS host name.
fn mirror_names(names: &[String]) -> Result<Vec<String>, ConfigError> {
    names
        .iter()
        .map(|n| {
            let name = crate::registry::hosts::normalize_host(n);
            if crate::registry::hosts::is_dns_host_name(&name) {
                Ok(name)
            } else {
                Err(ConfigError::Value {
                    key: "mirror_names",
                    message: format!("{n:?} is not a DNS host name"),
                })
            }
        })
        .collect()
}

/// Where the peer endpoint listens, and the address other nodes dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEndpoint {
    /// The listening address.
    pub listen: SocketAddr,
    /// `host:port` written into this node's leases.
    pub advertise: String,
}

/// Checks `peer_listen` and `peer_advertise`: the endpoint needs a shared
/// tier (leases name it), and an address other nodes can dial (a wildcard
/// listener needs `peer_advertise`).
fn peer_endpoint(
    listen: Option<&str>,
    advertise: Option<&str>,
    shared: bool,
) -> Result<Option<PeerEndpoint>, ConfigError> {
    let listen = match listen.map(str::trim) {
        None | Some("") => return Ok(None),
        Some(addr) => addr.parse::<SocketAddr>().map_err(|e| ConfigError::Value {
            key: "peer_listen",
            message: format!("{addr:?} is not an address and port ({e})"),
        })?,
    };
    if !shared {
        return Err(ConfigError::Value {
            key: "peer_listen",
            message: "the peer endpoint serves the nodes of a shared tier: set shared_store too"
                .into(),
        });
    }
    let advertise = match advertise.map(str::trim) {
        Some(a) if !a.is_empty() => {
            let ok = a.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty()
                    && port.parse::<u16>().is_ok_and(|p| p != 0)
                    && !host.contains(['/', '@', '?', '#', ' '])
            });
            if !ok {
                return Err(ConfigError::Value {
                    key: "peer_advertise",
                    message: format!("{a:?} is not host:port"),
                });
            }
            a.to_string()
        }
        _ if listen.ip().is_unspecified() || listen.port() == 0 => {
            return Err(ConfigError::Value {
                key: "peer_advertise",
                message: format!(
                    "peer_listen {listen} is not an address other nodes can dial: set \
                     peer_advertise (e.g. the pod's IP and port, 10.0.0.5:{})",
                    listen.port()
                ),
            })
        }
        _ => listen.to_string(),
    };
    Ok(Some(PeerEndpoint { listen, advertise }))
}

/// Checks a `shared_store` URL: `s3://BUCKET` or `s3://BUCKET/PREFIX`,
/// without credentials in it (they come from the environment).
fn shared_store_url(url: &str) -> Result<String, ConfigError> {
    let invalid = |why: &str| ConfigError::Value {
        key: "shared_store",
        message: format!("{url:?} {why}: use s3://BUCKET/PREFIX"),
    };
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| invalid("is not an s3:// URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        return Err(invalid(
            "does not name a bucket (3 to 63 of a-z, 0-9, '-', '.')",
        ));
    }
    let prefix_ok = prefix.split('/').filter(|p| !p.is_empty()).all(|p| {
        p != "."
            && p != ".."
            && p.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#')
    });
    if !prefix_ok || url.contains('@') {
        return Err(invalid("has a prefix that is not a plain path"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_defaults_parse_and_validate() {
        let parsed = Settings::from_toml(DEFAULT_TOML, Path::new("default.toml"))
            .expect("default.toml must parse");
        let config = Config::from_settings(parsed).expect("defaults must validate");
        assert_eq!(config.listen, "127.0.0.1:3128".parse().unwrap());
        assert_eq!(config.ca, CaSource::Dir(PathBuf::from("certs")));
        assert_eq!(config.connect_ports, vec![443]);
        assert_eq!(config.other_hosts, OtherHosts::Tunnel);
        assert_eq!(config.verify_reads, VerifyReads::First);
        assert!(!config.offline_share_private);
    }

    #[test]
    fn verify_reads_and_offline_share_private_from_a_file() {
        let file = Settings::from_toml(
            "verify_reads = \"always\"\noffline_share_private = true",
            Path::new("f"),
        )
        .unwrap();
        let config = Config::from_settings(file).unwrap();
        assert_eq!(config.verify_reads, VerifyReads::Always);
        assert!(config.offline_share_private);
        let err = Settings::from_toml("verify_reads = \"sometimes\"", Path::new("f")).unwrap_err();
        assert!(err.to_string().contains("verify_reads"), "{err}");
    }

    #[test]
    fn flags_win_over_file_and_lists_replace() {
        let file = Settings::from_toml(
            "listen = \"127.0.0.1:1\"\nconnect_ports = [8443]\nintercept = [\"a.test\"]",
            Path::new("f"),
        )
        .unwrap();
        let flags = Settings {
            listen: Some("127.0.0.1:2".parse().unwrap()),
            intercept: vec!["b.test".into()],
            ..Settings::default()
        };
        let config = Config::from_settings(flags.merged_over(file).unwrap()).unwrap();
        assert_eq!(config.listen.port(), 2);
        assert_eq!(config.connect_ports, vec![443, 8443]);
        assert!(config.intercept.matches("b.test"));
        assert!(!config.intercept.matches("a.test"));
    }

    #[test]
    fn cache_size_and_per_registry_ttl() {
        let file = Settings::from_toml(
            "cache_size = \"2GiB\"\ntag_ttl = 5\n[registries.\"index.docker.io\"]\ntag_ttl = 300",
            Path::new("f"),
        )
        .unwrap();
        let config = Config::from_settings(file).unwrap();
        assert_eq!(config.cache_size, Some(2 * 1024 * 1024 * 1024));
        assert_eq!(config.tag_ttl_for("docker.io"), Duration::from_secs(300));
        assert_eq!(config.tag_ttl_for("ghcr.io"), Duration::from_secs(5));
        let bad = Settings {
            cache_size: Some("lots".into()),
            ..Settings::default()
        };
        let msg = Config::from_settings(bad).unwrap_err().to_string();
        assert!(msg.contains("cache_size"), "{msg}");
    }

    #[test]
    fn insecure_registries_take_the_settings_of_their_host() {
        let file = Settings::from_toml(
            "tag_ttl = 5\ninsecure_registries = [\"plain.test:5000\", \"lab.test\"]\n\
             [registries.\"plain.test:5000\"]\ntag_ttl = 300\noffline = true\n\
             [registries.\"lab.test\"]\ntag_ttl = 7",
            Path::new("f"),
        )
        .unwrap();
        let config = Config::from_settings(file).unwrap();
        assert_eq!(
            config.tag_ttl_for("http://plain.test:5000"),
            Duration::from_secs(300)
        );
        assert!(config.is_offline("http://plain.test:5000"));
        assert_eq!(
            config.tag_ttl_for("http://lab.test:80"),
            Duration::from_secs(7)
        );
        assert!(!config.is_offline("http://lab.test:80"));
        assert_eq!(
            config.tag_ttl_for("http://other.test:80"),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn upstream_proxy_errors_hide_the_password() {
        let s = Settings {
            upstream_proxy: Some("https://user:hunter2@proxy:8080".into()),
            ..Settings::default()
        };
        let msg = Config::from_settings(s).unwrap_err().to_string();
        assert!(
            msg.contains("upstream_proxy") && !msg.contains("hunter2"),
            "{msg}"
        );
    }

    #[test]
    fn offline_globally_or_per_registry() {
        let file = Settings::from_toml(
            "offline = true\n[registries.\"ghcr.io\"]\noffline = false",
            Path::new("f"),
        )
        .unwrap();
        let config = Config::from_settings(file).unwrap();
        assert!(config.is_offline("docker.io"));
        assert!(!config.is_offline("ghcr.io"));
        assert!(!Config::from_settings(Settings::default())
            .unwrap()
            .is_offline("docker.io"));
    }

    #[test]
    fn half_a_ca_is_refused() {
        let s = Settings {
            ca_cert: Some("x.crt".into()),
            ..Settings::default()
        };
        assert!(Config::from_settings(s).is_err());
    }

    #[test]
    fn client_idle_timeout_defaults_to_30_and_is_never_0() {
        let config = Config::from_settings(Settings::default()).unwrap();
        assert_eq!(config.client_idle_timeout, Duration::from_secs(30));
        let s = Settings {
            client_idle_timeout: Some(0),
            ..Settings::default()
        };
        let msg = Config::from_settings(s).unwrap_err().to_string();
        assert!(msg.contains("client_idle_timeout"), "{msg}");
    }

    #[test]
    fn mirror_names_are_host_names() {
        let s = Settings {
            mirror_names: vec!["Regcache.Internal.".into()],
            ..Settings::default()
        };
        let config = Config::from_settings(s).unwrap();
        assert_eq!(config.mirror_names, vec!["regcache.internal".to_string()]);
        let s = Settings {
            mirror_names: vec!["*.internal".into()],
            ..Settings::default()
        };
        let msg = Config::from_settings(s).unwrap_err().to_string();
        assert!(msg.contains("mirror_names"), "{msg}");
    }

    #[test]
    fn bad_resolve_entry_names_the_option() {
        let s = Settings {
            resolve: vec!["nohost".into()],
            ..Settings::default()
        };
        let msg = Config::from_settings(s).unwrap_err().to_string();
        assert!(msg.starts_with("invalid value for resolve"), "{msg}");
    }

    #[test]
    fn a_default_missing_after_layering_is_an_error_naming_it() {
        let mut defaults = Settings::defaults().unwrap();
        defaults.tag_ttl = None;
        let err = Config::validate(defaults).unwrap_err();
        assert!(
            matches!(err, ConfigError::MissingDefault { key: "tag_ttl" }),
            "{err}"
        );
        assert!(err.to_string().contains("default.toml"), "{err}");
    }

    #[test]
    fn cache_cap_is_cache_size_or_half_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let set = Settings {
            cache_dir: Some(dir.path().join("cache")),
            cache_size: Some("2GiB".into()),
            ..Settings::default()
        };
        assert_eq!(
            Config::from_settings(set).unwrap().cache_cap(),
            2 * 1024 * 1024 * 1024
        );
        let unset = Settings {
            cache_dir: Some(dir.path().join("cache")),
            ..Settings::default()
        };
        let st = rustix::fs::statvfs(dir.path()).unwrap();
        assert_eq!(
            Config::from_settings(unset).unwrap().cache_cap(),
            (st.f_blocks * st.f_frsize / 2).max(1)
        );
    }

    #[test]
    fn the_peer_endpoint_needs_a_shared_tier_and_an_address_to_dial() {
        let ok = |listen, advertise| peer_endpoint(Some(listen), advertise, true);
        assert_eq!(
            peer_endpoint(None, Some("10.0.0.5:3130"), true).unwrap(),
            None
        );
        assert_eq!(peer_endpoint(Some(""), None, false).unwrap(), None);
        assert!(peer_endpoint(Some("127.0.0.1:3130"), None, false).is_err());
        assert_eq!(
            ok("10.0.0.5:3130", None).unwrap(),
            Some(PeerEndpoint {
                listen: "10.0.0.5:3130".parse().unwrap(),
                advertise: "10.0.0.5:3130".into()
            })
        );
        assert_eq!(
            ok("0.0.0.0:3130", Some("node-1.regcache:3130"))
                .unwrap()
                .map(|p| p.advertise),
            Some("node-1.regcache:3130".into())
        );
        for (listen, advertise) in [
            ("0.0.0.0:3130", None),
            ("[::]:3130", Some("")),
            ("10.0.0.5:0", None),
            ("10.0.0.5:3130", Some("no-port")),
            ("10.0.0.5:3130", Some("host:0")),
            ("10.0.0.5:3130", Some("evil@host:3130")),
            ("10.0.0.5:3130", Some(":3130")),
            ("not an address", None),
        ] {
            assert!(ok(listen, advertise).is_err(), "{listen} {advertise:?}");
        }
    }
}
