//! The layered settings: one struct read from the built-in defaults
//! (`default.toml`, [`DEFAULT_TOML`]), a TOML file, `REGCACHE_*` and flags,
//! and laid one over another without a field listed by hand
//! ([`Settings::merged_over`]). What the result means is [`super::Config`]'s
//! business.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ConfigError, LogFormat, OtherHosts, VerifyReads};
use crate::registry::rules::Action;

/// The built-in configuration, also printed by `regcache config`.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// Every option of `regcache serve`, each optional so that layers can be merged.
///
/// The same struct is read from TOML (serde) and from flags and environment
/// (clap), which keeps the names identical in all three places.
#[derive(Debug, Default, Clone, clap::Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address of the forward proxy
    #[arg(long, env = "REGCACHE_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Directory holding the regcache CA (ca.crt, ca.key), created on first start
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

    /// CONNECT to hosts that are not intercepted: tunnel them untouched, or refuse with 403
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

    /// Log format on stderr
    #[arg(long, env = "REGCACHE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT
    #[arg(long, env = "REGCACHE_SHUTDOWN_GRACE", value_name = "SECS")]
    pub shutdown_grace: Option<u64>,

    /// Seconds a client may send nothing while regcache waits for its request head or body (then the request is cut), or hold a connection with no request in flight (then it is closed)
    #[arg(long, env = "REGCACHE_CLIENT_IDLE_TIMEOUT", value_name = "SECS")]
    pub client_idle_timeout: Option<u64>,

    /// Number of minted leaf certificates kept in memory
    #[arg(long, env = "REGCACHE_CERT_CACHE", value_name = "N")]
    pub cert_cache: Option<usize>,

    /// Directory of the disk cache
    #[arg(long, env = "REGCACHE_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Largest total size of the cache, e.g. 50GiB; unset: half the disk holding cache_dir
    #[arg(long, env = "REGCACHE_CACHE_SIZE", value_name = "SIZE")]
    pub cache_size: Option<String>,

    /// Seconds a cached tag is served before it is revalidated with a HEAD
    #[arg(long, env = "REGCACHE_TAG_TTL", value_name = "SECS")]
    pub tag_ttl: Option<u64>,

    /// Keep these images warm: a file of image references, refreshed every prefetch_interval
    #[arg(long, env = "REGCACHE_PREFETCH_FILE", value_name = "FILE")]
    pub prefetch_file: Option<PathBuf>,

    /// How often the prefetch_file images are refreshed, e.g. 6h
    #[arg(long, env = "REGCACHE_PREFETCH_INTERVAL", value_name = "DURATION")]
    pub prefetch_interval: Option<String>,

    /// Remove cached content not read for this long, e.g. 30d (even below cache_size)
    #[arg(long, env = "REGCACHE_MAX_UNUSED", value_name = "DURATION")]
    pub max_unused: Option<String>,

    /// Hash cached blobs again as they are served: on the first read after each start (a range hashes the whole file first), on every one, or never
    #[arg(long, env = "REGCACHE_VERIFY_READS", value_name = "WHEN")]
    pub verify_reads: Option<VerifyReads>,

    /// Client networks allowed to use the proxy, as CIDRs (repeatable); none given: loopback, plus the private ranges when listening beyond loopback
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

    /// File holding the admin API's bearer token (readable by its owner only); unset: the API answers loopback clients only
    #[arg(long, env = "REGCACHE_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

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

    /// Seconds a repository found public (anonymous pull accepted upstream) stays shared with every client
    #[arg(long, env = "REGCACHE_PUBLIC_TTL", value_name = "SECS")]
    pub public_ttl: Option<u64>,

    /// Seconds a client credential accepted upstream for a private repository is trusted for cached content
    #[arg(long, env = "REGCACHE_AUTH_TTL", value_name = "SECS")]
    pub auth_ttl: Option<u64>,

    /// Also answer the registry API (mirror and path-prefix forms) over HTTPS on this address
    #[arg(long, env = "REGCACHE_MIRROR_TLS", value_name = "ADDR")]
    pub mirror_tls: Option<SocketAddr>,

    /// Serve /metrics (Prometheus) and /healthz on this address too, to any client that reaches it; empty: off
    #[arg(long, env = "REGCACHE_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,

    /// Shared tier behind the disk cache, s3://BUCKET/PREFIX (credentials, region and endpoint from AWS_* variables); empty: off
    #[arg(long, env = "REGCACHE_SHARED_STORE", value_name = "URL")]
    pub shared_store: Option<String>,

    /// With shared_store: serve blobs being fetched to the other nodes over mutual TLS (the regcache CA) on this address; empty: off
    #[arg(long, env = "REGCACHE_PEER_LISTEN", value_name = "ADDR")]
    pub peer_listen: Option<String>,

    /// The address other nodes dial for peer_listen, host:port (e.g. the pod IP); empty: peer_listen's own address
    #[arg(long, env = "REGCACHE_PEER_ADVERTISE", value_name = "HOST:PORT")]
    pub peer_advertise: Option<String>,

    /// With shared_store: one upstream fetch per cluster through lease objects (needs a store that enforces If-None-Match); false: one per node
    #[arg(long, env = "REGCACHE_SHARED_SINGLE_FLIGHT", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub shared_single_flight: Option<bool>,

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

    /// Offline registries serve content of repositories not known public to every client, not only to proxy users
    #[arg(long, env = "REGCACHE_OFFLINE_SHARE_PRIVATE", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub offline_share_private: Option<bool>,

    /// Per-registry settings (TOML only): [registries."ghcr.io"] tag_ttl = 300
    #[arg(skip)]
    #[serde(default)]
    pub registries: HashMap<String, RegistrySettings>,

    /// Image rules (TOML only), first match wins: [[rules]] match = "ghcr.io/acme/**"
    #[arg(skip)]
    #[serde(default)]
    pub rules: Vec<RuleSettings>,
}

/// One `[[rules]]` table: a `registry/repository` glob and what it says
/// (see [`crate::registry::rules`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSettings {
    /// The glob, e.g. `docker.io/library/*`; `**` spans slashes.
    #[serde(rename = "match")]
    pub pattern: String,
    /// `allow` (the default) or `deny`.
    #[serde(default)]
    pub action: Action,
    /// `false`: pass requests through, never store (default true).
    pub cache: Option<bool>,
    /// Seconds a cached tag of the repository is fresh (overrides tag_ttl).
    pub tag_ttl: Option<u64>,
    /// Entries unread for this long are removed ("30d"; overrides max_unused).
    pub max_unused: Option<String>,
}

/// Settings for one registry host, in the `[registries."HOST"]` TOML table.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
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
        parse_toml(text, origin)
    }

    /// Reads settings from a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// The built-in defaults, parsed from [`DEFAULT_TOML`].
    pub fn defaults() -> Result<Self, ConfigError> {
        parse_toml(DEFAULT_TOML, Path::new(BUILT_IN))
    }

    /// Lays `self` over `base`: every option set in `self` wins; a list, or
    /// the `registries` table, given in `self` replaces that of `base` whole.
    ///
    /// Works on the serialized options, so a new option needs no line here.
    /// Fails only for a value that cannot be serialized (a path that is not
    /// UTF-8).
    pub fn merged_over(self, base: Settings) -> Result<Settings, ConfigError> {
        let mut merged = base.to_options()?;
        for (key, value) in self.to_options()? {
            if is_given(&value) {
                merged.insert(key, value);
            }
        }
        serde_json::from_value(serde_json::Value::Object(merged)).map_err(layer_error)
    }

    /// Every option by its TOML name; unset ones are null, empty lists `[]`.
    fn to_options(&self) -> Result<serde_json::Map<String, serde_json::Value>, ConfigError> {
        match serde_json::to_value(self).map_err(layer_error)? {
            serde_json::Value::Object(options) => Ok(options),
            other => Err(layer_error(format!("settings serialized as {other}"))),
        }
    }

    /// Builds the effective settings: `self` (flags and environment) over the
    /// file named by `config_file`, if any, over the built-in defaults.
    pub fn layered(self, config_file: Option<&Path>) -> Result<Settings, ConfigError> {
        let file = match config_file {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        self.merged_over(file.merged_over(Settings::defaults()?)?)
    }
}

/// Whether a serialized option was given in its layer: set, and not an empty
/// list or table (which leave the layer below in force).
fn is_given(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::Null => false,
        Value::Array(items) => !items.is_empty(),
        Value::Object(entries) => !entries.is_empty(),
        _ => true,
    }
}

/// Settings that cannot be carried from one layer to the next.
fn layer_error(message: impl std::fmt::Display) -> ConfigError {
    ConfigError::Layer {
        message: message.to_string(),
    }
}

/// How [`DEFAULT_TOML`] is named in errors.
pub(super) const BUILT_IN: &str = "<built-in defaults>";

/// Parses TOML text into `T`; `origin` names the text in errors.
pub(super) fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &Path,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: origin.to_path_buf(),
        message: one_line(&e.to_string()),
    })
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
    fn unknown_key_is_an_error_naming_it() {
        let err = Settings::from_toml("lisen = \"x\"", Path::new("f.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("lisen"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    /// Settings from TOML text, for the tables below.
    fn toml(text: &str) -> Settings {
        Settings::from_toml(text, Path::new("test")).unwrap()
    }

    /// The options of `s` by name, for comparing settings.
    fn options(s: Settings) -> serde_json::Value {
        serde_json::Value::Object(s.to_options().unwrap())
    }

    #[test]
    fn merging_a_layer_over_another() {
        let cases = [
            // (top, base, merged)
            (
                "what is set on top wins",
                "listen = \"127.0.0.1:2\"",
                "listen = \"127.0.0.1:1\"\ntag_ttl = 5",
                "listen = \"127.0.0.1:2\"\ntag_ttl = 5",
            ),
            (
                "what is unset on top leaves the base",
                "",
                "cache_size = \"1GiB\"\nupstream_proxy = \"env\"",
                "cache_size = \"1GiB\"\nupstream_proxy = \"env\"",
            ),
            (
                "false and the empty string are set",
                "offline = false\nupstream_proxy = \"\"",
                "offline = true\nupstream_proxy = \"env\"",
                "offline = false\nupstream_proxy = \"\"",
            ),
            (
                "a list given on top replaces the base's, not appends",
                "connect_ports = [8443]\nintercept = [\"b.test\"]",
                "connect_ports = [5000, 5001]\nintercept = [\"a.test\"]",
                "connect_ports = [8443]\nintercept = [\"b.test\"]",
            ),
            (
                "an empty list on top leaves the base's",
                "allow = []",
                "allow = [\"10.0.0.0/8\"]",
                "allow = [\"10.0.0.0/8\"]",
            ),
            (
                "registries on top replace the base's table whole",
                "[registries.\"ghcr.io\"]\ntag_ttl = 1",
                "[registries.\"docker.io\"]\ntag_ttl = 2\n[registries.\"ghcr.io\"]\noffline = true",
                "[registries.\"ghcr.io\"]\ntag_ttl = 1",
            ),
            (
                "no registries on top leave the base's",
                "tag_ttl = 3",
                "[registries.\"docker.io\"]\ntag_ttl = 2",
                "tag_ttl = 3\n[registries.\"docker.io\"]\ntag_ttl = 2",
            ),
        ];
        for (name, top, base, merged) in cases {
            assert_eq!(
                options(toml(top).merged_over(toml(base)).unwrap()),
                options(toml(merged)),
                "{name}"
            );
        }
    }

    #[test]
    fn merging_a_path_that_is_not_utf8_is_an_error_not_a_panic() {
        use std::os::unix::ffi::OsStrExt;
        let flags = Settings {
            ca_dir: Some(PathBuf::from(std::ffi::OsStr::from_bytes(b"ca\xff"))),
            ..Settings::default()
        };
        let err = flags.merged_over(Settings::default()).unwrap_err();
        assert!(matches!(err, ConfigError::Layer { .. }), "{err}");
    }

    #[test]
    fn every_option_has_its_default_in_default_toml() {
        let table: toml::Table = toml::from_str(DEFAULT_TOML).unwrap();
        let names: Vec<String> = options(Settings::default())
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        assert!(names.len() > 30, "options found: {names:?}");
        for name in &names {
            // Set, or shown commented out (an option with no default value).
            let documented = DEFAULT_TOML.lines().any(|line| {
                line.starts_with(&format!("# {name} = "))
                    || line.starts_with(&format!("# [{name}."))
                    || line.starts_with(&format!("# [[{name}]]"))
            });
            assert!(
                table.contains_key(name) || documented,
                "{name} is neither set nor shown commented out in default.toml"
            );
        }
        for key in table.keys() {
            assert!(names.contains(key), "default.toml sets unknown {key}");
        }
    }

    #[test]
    fn the_embedded_defaults_parse() {
        let defaults = Settings::defaults().expect("default.toml must parse");
        assert_eq!(defaults.listen, Some("127.0.0.1:3128".parse().unwrap()));
    }

    #[test]
    fn the_readme_table_shows_the_defaults_of_default_toml() {
        let table: toml::Table = toml::from_str(DEFAULT_TOML).unwrap();
        let readme = include_str!("../../README.md");
        // Rows like: | `tag_ttl` | `60` | what it does |
        let rows: HashMap<&str, &str> = readme
            .lines()
            .filter_map(|line| {
                let mut cells = line.split('|').map(str::trim).skip(1);
                let key = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
                Some((key, cells.next()?))
            })
            .collect();
        for (key, value) in &table {
            let shown = match value {
                toml::Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            let row = rows.get(key.as_str());
            assert!(row.is_some(), "README's option table has no row for {key}");
            if let Some(cell) = row.and_then(|c| c.strip_prefix('`')?.strip_suffix('`')) {
                assert_eq!(cell, shown, "README's default for {key}");
            }
        }
    }
}
