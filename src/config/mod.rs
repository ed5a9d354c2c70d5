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

mod resolve;
pub mod secret;

pub use resolve::{ResolveEntry, ResolveMap};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;
use serde::Deserialize;

use crate::registry::hosts::{canonical_registry, HostPattern, HostPort, InterceptList};

/// The built-in configuration, also printed by `regcache config`.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OtherHosts {
    /// Relay the bytes untouched; the client sees the host's own certificate.
    Tunnel,
    /// Answer 403 Forbidden.
    Refuse,
}

/// When a cached blob's bytes are hashed again as they are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum VerifyReads {
    /// On the first complete read of each entry after every start (and never
    /// again in that run once it matched).
    First,
    /// On every complete read.
    Always,
    /// Never: bytes at rest are trusted (a file changed on disk is served).
    Never,
}

/// The format of log lines on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, one line per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// Every option of `regcache serve`, each optional so that layers can be merged.
///
/// The same struct is read from TOML (serde) and from flags and environment
/// (clap), which keeps the names identical in all three places.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address of the forward proxy [default: 127.0.0.1:3128]
    #[arg(long, env = "REGCACHE_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Directory holding the regcache CA (ca.crt, ca.key), created on first start [default: certs]
    #[arg(long, env = "REGCACHE_CA_DIR", value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,

    /// Use this PEM CA certificate instead of the one in ca_dir (needs --ca-key)
    #[arg(
        long,
        env = "REGCACHE_CA_CERT",
        value_name = "FILE",
        requires = "ca_key"
    )]
    pub ca_cert: Option<PathBuf>,

    /// Private key (PEM) of --ca-cert; must not be readable by other users
    #[arg(
        long,
        env = "REGCACHE_CA_KEY",
        value_name = "FILE",
        requires = "ca_cert"
    )]
    pub ca_key: Option<PathBuf>,

    /// Extra PEM file of CA certificates trusted for upstream TLS (repeatable)
    #[arg(
        long,
        env = "REGCACHE_UPSTREAM_CA",
        value_name = "FILE",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub upstream_ca: Vec<PathBuf>,

    /// Send upstream connections for HOST to ADDR, or ADDR:PORT (repeatable)
    #[arg(
        long,
        env = "REGCACHE_RESOLVE",
        value_name = "HOST=ADDR[:PORT]",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub resolve: Vec<String>,

    /// Also intercept this host; "*.corp.example" matches every name under it (repeatable)
    #[arg(
        long,
        env = "REGCACHE_INTERCEPT",
        value_name = "HOST",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub intercept: Vec<String>,

    /// CONNECT to hosts that are not intercepted: tunnel them untouched, or refuse with 403 [default: tunnel]
    #[arg(long, env = "REGCACHE_OTHER_HOSTS", value_name = "POLICY")]
    pub other_hosts: Option<OtherHosts>,

    /// Allow CONNECT to this port besides 443 (repeatable)
    #[arg(
        long,
        env = "REGCACHE_CONNECT_PORTS",
        value_name = "PORT",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub connect_ports: Vec<u16>,

    /// Registry served over plain HTTP, as HOST:PORT (port 80 if absent); its cache is kept apart from the HTTPS registry of that name (repeatable)
    #[arg(
        long = "insecure-registry",
        visible_alias = "insecure-registries",
        env = "REGCACHE_INSECURE_REGISTRIES",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub insecure_registries: Vec<String>,

    /// Log format on stderr [default: text]
    #[arg(long, env = "REGCACHE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT [default: 30]
    #[arg(long, env = "REGCACHE_SHUTDOWN_GRACE", value_name = "SECS")]
    pub shutdown_grace: Option<u64>,

    /// Seconds a client may send nothing while regcache waits for its request head or body; then the request is cut [default: 30]
    #[arg(long, env = "REGCACHE_CLIENT_IDLE_TIMEOUT", value_name = "SECS")]
    pub client_idle_timeout: Option<u64>,

    /// Number of minted leaf certificates kept in memory [default: 1000]
    #[arg(long, env = "REGCACHE_CERT_CACHE", value_name = "N")]
    pub cert_cache: Option<usize>,

    /// Directory of the disk cache [default: cache]
    #[arg(long, env = "REGCACHE_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Largest total size of the cache, e.g. 50GiB [default: half the disk holding cache_dir]
    #[arg(long, env = "REGCACHE_CACHE_SIZE", value_name = "SIZE")]
    pub cache_size: Option<String>,

    /// Seconds a cached tag is served before it is revalidated with a HEAD [default: 60]
    #[arg(long, env = "REGCACHE_TAG_TTL", value_name = "SECS")]
    pub tag_ttl: Option<u64>,

    /// Hash cached blobs again as they are served: on the first complete read after each start, on every one, or never [default: first]
    #[arg(long, env = "REGCACHE_VERIFY_READS", value_name = "WHEN")]
    pub verify_reads: Option<VerifyReads>,

    /// Client networks allowed to use the proxy, as CIDRs (repeatable) [default: loopback, plus the private ranges when listening beyond loopback]
    #[arg(
        long,
        env = "REGCACHE_ALLOW",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub allow: Vec<String>,

    /// File of proxy users (htpasswd format, bcrypt: htpasswd -nbB USER PASS); clients must then send Proxy-Authorization
    #[arg(long, env = "REGCACHE_PROXY_USERS", value_name = "FILE")]
    pub proxy_users: Option<PathBuf>,

    /// Parent proxy for regcache's own upstream traffic, http://[user:pass@]host:port, or "env" to use HTTPS_PROXY/NO_PROXY
    #[arg(long, env = "REGCACHE_UPSTREAM_PROXY", value_name = "URL")]
    pub upstream_proxy: Option<String>,

    /// Hosts reached directly, not through upstream_proxy; "*.corp.example" for a domain (repeatable)
    #[arg(
        long,
        env = "REGCACHE_UPSTREAM_NO_PROXY",
        value_name = "HOST",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub upstream_no_proxy: Vec<String>,

    /// Seconds a repository found public (anonymous pull accepted upstream) stays shared with every client [default: 600]
    #[arg(long, env = "REGCACHE_PUBLIC_TTL", value_name = "SECS")]
    pub public_ttl: Option<u64>,

    /// Seconds a client credential accepted upstream for a private repository is trusted for cached content [default: 300]
    #[arg(long, env = "REGCACHE_AUTH_TTL", value_name = "SECS")]
    pub auth_ttl: Option<u64>,

    /// Also answer the registry API (mirror and path-prefix forms) over HTTPS on this address
    #[arg(long, env = "REGCACHE_MIRROR_TLS", value_name = "ADDR")]
    pub mirror_tls: Option<SocketAddr>,

    /// Certificate (PEM) for mirror_tls instead of one minted by the regcache CA (needs --mirror-key)
    #[arg(
        long,
        env = "REGCACHE_MIRROR_CERT",
        value_name = "FILE",
        requires = "mirror_key"
    )]
    pub mirror_cert: Option<PathBuf>,

    /// Private key (PEM) of --mirror-cert; must not be readable by other users
    #[arg(
        long,
        env = "REGCACHE_MIRROR_KEY",
        value_name = "FILE",
        requires = "mirror_cert"
    )]
    pub mirror_key: Option<PathBuf>,

    /// Names the minted mirror_tls certificate may carry besides the address the client connected to; other SNI names are refused (repeatable)
    #[arg(
        long,
        env = "REGCACHE_MIRROR_NAMES",
        value_name = "HOST",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub mirror_names: Vec<String>,

    /// Never contact upstream: serve only what is cached (tags as cached, misses 404)
    #[arg(long, env = "REGCACHE_OFFLINE", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub offline: Option<bool>,

    /// Offline registries serve content of repositories not known public to every client, not only to proxy users [default: false]
    #[arg(long, env = "REGCACHE_OFFLINE_SHARE_PRIVATE", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub offline_share_private: Option<bool>,

    /// Per-registry settings (TOML only): [registries."ghcr.io"] tag_ttl = 300
    #[arg(skip)]
    #[serde(default)]
    pub registries: HashMap<String, RegistrySettings>,
}

/// Settings for one registry host, in the `[registries."HOST"]` TOML table.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    /// Overrides `tag_ttl` for this registry.
    pub tag_ttl: Option<u64>,
    /// User name of regcache's own account at this registry.
    pub username: Option<String>,
    /// File holding that account's password or access token.
    pub password_file: Option<PathBuf>,
    /// File holding a bearer token to present as is.
    pub token_file: Option<PathBuf>,
    /// Never contact this registry (see `offline`).
    pub offline: Option<bool>,
}

/// regcache's own account at one registry, used only for public content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamCredential {
    /// User name and the file holding the password (read at start).
    Basic {
        /// User name.
        username: String,
        /// Password file.
        password_file: PathBuf,
    },
    /// A file holding a bearer token.
    Token(PathBuf),
}

impl Settings {
    /// Parses settings from TOML text; `origin` names the text in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: one_line(&e.to_string()),
        })
    }

    /// Reads settings from a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// The built-in defaults.
    pub fn defaults() -> Self {
        // The embedded file is part of the binary and covered by a unit test.
        Self::from_toml(DEFAULT_TOML, Path::new("<built-in defaults>")).unwrap_or_default()
    }

    /// Lays `self` over `base`: every option set in `self` wins; lists set in
    /// `self` replace those of `base`.
    pub fn merged_over(self, base: Settings) -> Settings {
        fn list<T>(top: Vec<T>, base: Vec<T>) -> Vec<T> {
            if top.is_empty() {
                base
            } else {
                top
            }
        }
        Settings {
            listen: self.listen.or(base.listen),
            ca_dir: self.ca_dir.or(base.ca_dir),
            ca_cert: self.ca_cert.or(base.ca_cert),
            ca_key: self.ca_key.or(base.ca_key),
            upstream_ca: list(self.upstream_ca, base.upstream_ca),
            resolve: list(self.resolve, base.resolve),
            intercept: list(self.intercept, base.intercept),
            other_hosts: self.other_hosts.or(base.other_hosts),
            connect_ports: list(self.connect_ports, base.connect_ports),
            insecure_registries: list(self.insecure_registries, base.insecure_registries),
            log_format: self.log_format.or(base.log_format),
            shutdown_grace: self.shutdown_grace.or(base.shutdown_grace),
            cert_cache: self.cert_cache.or(base.cert_cache),
            client_idle_timeout: self.client_idle_timeout.or(base.client_idle_timeout),
            cache_dir: self.cache_dir.or(base.cache_dir),
            cache_size: self.cache_size.or(base.cache_size),
            tag_ttl: self.tag_ttl.or(base.tag_ttl),
            verify_reads: self.verify_reads.or(base.verify_reads),
            allow: list(self.allow, base.allow),
            proxy_users: self.proxy_users.or(base.proxy_users),
            upstream_proxy: self.upstream_proxy.or(base.upstream_proxy),
            upstream_no_proxy: list(self.upstream_no_proxy, base.upstream_no_proxy),
            public_ttl: self.public_ttl.or(base.public_ttl),
            auth_ttl: self.auth_ttl.or(base.auth_ttl),
            offline: self.offline.or(base.offline),
            offline_share_private: self.offline_share_private.or(base.offline_share_private),
            mirror_tls: self.mirror_tls.or(base.mirror_tls),
            mirror_cert: self.mirror_cert.or(base.mirror_cert),
            mirror_key: self.mirror_key.or(base.mirror_key),
            mirror_names: list(self.mirror_names, base.mirror_names),
            registries: if self.registries.is_empty() {
                base.registries
            } else {
                self.registries
            },
        }
    }

    /// Builds the effective settings: `self` (flags and environment) over the
    /// file named by `config_file`, if any, over the built-in defaults.
    pub fn layered(self, config_file: Option<&Path>) -> Result<Settings, ConfigError> {
        let file = match config_file {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        Ok(self.merged_over(file.merged_over(Settings::defaults())))
    }
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
    /// is awaited.
    pub client_idle_timeout: Duration,
    /// Where the disk cache lives.
    pub cache_dir: PathBuf,
    /// The cache's size cap in bytes (None: half the disk, decided at start).
    pub cache_size: Option<u64>,
    /// Default freshness of a cached tag.
    pub tag_ttl: Duration,
    /// Per-registry tag freshness, by canonical registry name.
    pub registry_tag_ttl: HashMap<String, Duration>,
    /// When cached blobs are hashed again as they are served.
    pub verify_reads: VerifyReads,
    /// Client networks allowed to use the proxy.
    pub allow: Vec<ipnet::IpNet>,
    /// htpasswd file of proxy users; None: no Proxy-Authorization needed.
    pub proxy_users: Option<PathBuf>,
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
    /// Its certificate and key, if not minted by the regcache CA.
    pub mirror_cert: Option<(PathBuf, PathBuf)>,
    /// Host names a minted `mirror_tls` leaf may be for (normalised).
    pub mirror_names: Vec<String>,
    /// Per-registry `offline`, by canonical registry name.
    pub registry_offline: HashMap<String, bool>,
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
    /// Validates merged settings. Missing values take the built-in defaults.
    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let s = s.merged_over(Settings::defaults());
        let ca = match (s.ca_cert, s.ca_key) {
            (Some(cert), Some(key)) => CaSource::Files { cert, key },
            (None, None) => CaSource::Dir(s.ca_dir.unwrap_or_else(|| PathBuf::from("certs"))),
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
        let cert_cache = s.cert_cache.unwrap_or(1000);
        if cert_cache == 0 {
            return Err(ConfigError::Value {
                key: "cert_cache",
                message: "must be at least 1".into(),
            });
        }
        let client_idle_timeout = match s.client_idle_timeout.unwrap_or(30) {
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
        let listen = s
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3128)));
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
        Ok(Config {
            mirror_tls: s.mirror_tls,
            mirror_cert,
            mirror_names,
            offline: s.offline.unwrap_or(false),
            offline_share_private: s.offline_share_private.unwrap_or(false),
            registry_offline,
            allow,
            proxy_users: s.proxy_users,
            upstream_proxy,
            upstream_no_proxy,
            public_ttl: Duration::from_secs(s.public_ttl.unwrap_or(600)),
            auth_ttl: Duration::from_secs(s.auth_ttl.unwrap_or(300)),
            credentials,
            cache_dir: s.cache_dir.unwrap_or_else(|| PathBuf::from("cache")),
            cache_size,
            tag_ttl: Duration::from_secs(s.tag_ttl.unwrap_or(60)),
            registry_tag_ttl,
            verify_reads: s.verify_reads.unwrap_or(VerifyReads::First),
            listen,
            ca,
            upstream_ca: s.upstream_ca,
            resolve: ResolveMap::new(resolve),
            intercept: InterceptList::with_defaults(extra),
            other_hosts: s.other_hosts.unwrap_or(OtherHosts::Tunnel),
            connect_ports,
            insecure_registries,
            log_format: s.log_format.unwrap_or(LogFormat::Text),
            shutdown_grace: Duration::from_secs(s.shutdown_grace.unwrap_or(30)),
            cert_cache,
            client_idle_timeout,
        })
    }
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

/// Folds a multi-line message (TOML errors draw carets) into one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '|' || c == '^' || c == ' '))
        .collect::<Vec<_>>()
        .join(" ")
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
    fn unknown_key_is_an_error_naming_it() {
        let err = Settings::from_toml("lisen = \"x\"", Path::new("f.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("lisen"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
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
        let config = Config::from_settings(flags.merged_over(file)).unwrap();
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
}
