//! Registry host names: which hosts regcache intercepts.
//!
//! The built-in list names the public registries that container clients talk
//! to. Operators add their own hosts; a pattern `*.example.com` matches every
//! name below `example.com` (at any depth) but not `example.com` itself.

use std::fmt;
use std::str::FromStr;

/// Registry hosts intercepted out of the box.
pub const DEFAULT_REGISTRY_HOSTS: &[&str] = &[
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "quay.io",
    "ghcr.io",
    "gcr.io",
    "*.gcr.io",
    "registry.k8s.io",
    "*.pkg.dev",
    "public.ecr.aws",
    "mcr.microsoft.com",
    "nvcr.io",
    "registry.gitlab.com",
];

/// Lower-cases a host name and drops a trailing dot and IPv6 brackets.
pub fn normalize_host(host: &str) -> String {
    host.trim()
        .trim_end_matches('.')
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

/// Docker Hub's canonical registry name: what keys its cache entries and
/// what image references mean when they name no registry.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API (`docker.io` itself does
/// not).
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// Host names that all serve Docker Hub's content.
const DOCKER_HUB_ALIASES: &[&str] = &[DOCKER_HUB, "index.docker.io", DOCKER_HUB_API];

/// The cache identity of a registry host: lower-case, port kept if not 443;
/// docker.io, index.docker.io and registry-1.docker.io all become "docker.io".
///
/// `authority` is `host[:port]` as in a CONNECT target or `Host` header; a
/// trailing dot and `user@` are dropped, and an IPv6 address keeps its
/// brackets (`[::1]:5000`) so the port stays unambiguous.
pub fn canonical_registry(authority: &str) -> String {
    let authority = authority.trim();
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let (host, port) = split_authority(authority);
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let port = match port.map(str::trim) {
        None | Some("") => None,
        Some(p) => match p.parse::<u16>() {
            Ok(443) => None,
            Ok(n) => Some(n.to_string()),
            Err(_) => Some(p.to_ascii_lowercase()),
        },
    };
    let host = if port.is_none() && DOCKER_HUB_ALIASES.contains(&host.as_str()) {
        "docker.io".to_string()
    } else if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    match port {
        Some(port) => format!("{host}:{port}"),
        None => host,
    }
}

/// Where the registry API of the canonical registry name `registry` (see
/// [`canonical_registry`]) is reached: (host, port). Docker Hub's API is on
/// [`DOCKER_HUB_API`]; otherwise the host is the name's and the port is the
/// name's or 443. An IPv6 host keeps its brackets (`[::1]`), so that
/// `host:port` can be written back. A port that is not a number stays part
/// of the host (and fails wherever the host is parsed).
pub fn upstream_host_port(registry: &str) -> (String, u16) {
    if registry == DOCKER_HUB {
        return (DOCKER_HUB_API.to_string(), 443);
    }
    match split_authority(registry) {
        (host, Some(port)) if !host.is_empty() => match port.parse::<u16>() {
            Ok(port) if host.contains(':') => (format!("[{host}]"), port),
            Ok(port) => (host.to_string(), port),
            Err(_) => (registry.to_string(), 443),
        },
        _ => (registry.to_string(), 443),
    }
}

/// Splits `host[:port]`, `[v6]` or `[v6]:port`; the host comes back without
/// brackets. A bare IPv6 address (several colons, no brackets) is all host.
fn split_authority(authority: &str) -> (&str, Option<&str>) {
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':')),
            None => (rest, None),
        };
    }
    match authority.split_once(':') {
        Some((host, port)) if !port.contains(':') => (host, Some(port)),
        _ => (authority, None),
    }
}

/// One host name, or a `*.suffix` wildcard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Matches this name only.
    Exact(String),
    /// Matches any name ending in `.suffix`.
    Subdomains(String),
}

impl FromStr for HostPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let name = normalize_host(s);
        let (wild, rest) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, name.clone()),
        };
        let valid = !rest.is_empty()
            && rest.len() <= 253
            && rest.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(format!("{s:?} is not a host name or *.domain pattern"));
        }
        Ok(if wild {
            HostPattern::Subdomains(rest)
        } else {
            HostPattern::Exact(rest)
        })
    }
}

impl HostPattern {
    /// Whether `host` (already normalized) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => host == name,
            HostPattern::Subdomains(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Subdomains(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// A `host:port` pair, as in `insecure_registries`: the host normalized
/// (lower case, no trailing dot, IPv6 without brackets), the port explicit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// Host name or IP address.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl HostPort {
    /// Parses `host[:port]` (`[v6]:port` for IPv6), with `default_port` when
    /// none is given; the host must be a host name or an IP address.
    pub fn parse(text: &str, default_port: u16) -> Result<Self, String> {
        let (host, port) = split_authority(text.trim());
        let port = match port {
            None => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{text:?} has no valid port"))?,
        };
        let host = normalize_host(host);
        let is_ip = host.parse::<std::net::IpAddr>().is_ok();
        if !is_ip && !matches!(host.parse::<HostPattern>(), Ok(HostPattern::Exact(_))) {
            return Err(format!("{text:?} is not host:port"));
        }
        Ok(Self { host, port })
    }

    /// Whether this is `host` (normalized) on `port`.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        self.port == port && normalize_host(host) == self.host
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The hosts whose CONNECT regcache answers itself.
#[derive(Debug, Clone)]
pub struct InterceptList {
    patterns: Vec<HostPattern>,
}

impl InterceptList {
    /// The built-in registry hosts plus `extra`.
    pub fn with_defaults(extra: Vec<HostPattern>) -> Self {
        let mut patterns: Vec<HostPattern> = DEFAULT_REGISTRY_HOSTS
            .iter()
            .filter_map(|h| h.parse().ok())
            .collect();
        patterns.extend(extra);
        Self { patterns }
    }

    /// Whether CONNECT to `host` is intercepted.
    pub fn matches(&self, host: &str) -> bool {
        let host = normalize_host(host);
        self.patterns.iter().any(|p| p.matches(&host))
    }

    /// The patterns, for display.
    pub fn patterns(&self) -> &[HostPattern] {
        &self.patterns
    }
}

/// Whether `name` (normalised: lower case, no trailing dot) is a DNS host
/// name: at most 253 characters, labels of 1 to 63 letters, digits and
/// hyphens, not starting or ending with a hyphen (RFC 1123), and not an IP
/// address.
pub fn is_dns_host_name(name: &str) -> bool {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    !name.is_empty()
        && name.len() <= 253
        && name.parse::<std::net::IpAddr>().is_err()
        && name.split('.').all(label_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_ins_match_the_public_registries() {
        let list = InterceptList::with_defaults(vec![]);
        for host in [
            "registry-1.docker.io",
            "Quay.IO",
            "ghcr.io.",
            "us-docker.pkg.dev",
            "eu.gcr.io",
            "registry.k8s.io",
        ] {
            assert!(list.matches(host), "{host}");
        }
        for host in ["pkg.dev", "example.com", "evilghcr.io", "ghcr.io.evil.com"] {
            assert!(!list.matches(host), "{host}");
        }
    }

    #[test]
    fn wildcards_match_any_depth_below_the_suffix_only() {
        let p: HostPattern = "*.corp.example".parse().unwrap();
        assert!(p.matches("reg.corp.example"));
        assert!(p.matches("a.b.corp.example"));
        assert!(!p.matches("corp.example"));
        assert!(!p.matches("xcorp.example"));
    }

    #[test]
    fn canonical_registry_folds_docker_hub_and_default_port() {
        for (authority, want) in [
            ("docker.io", "docker.io"),
            ("index.docker.io", "docker.io"),
            ("registry-1.docker.io:443", "docker.io"),
            ("Registry-1.Docker.IO.", "docker.io"),
            ("ghcr.io:443", "ghcr.io"),
            ("GHCR.io", "ghcr.io"),
            ("registry.local:5000", "registry.local:5000"),
            ("registry.local:05000", "registry.local:5000"),
            ("registry.local:", "registry.local"),
            ("user@quay.io", "quay.io"),
            ("[::1]:5000", "[::1]:5000"),
            ("[::1]:443", "[::1]"),
            ("[::1]", "[::1]"),
            ("::1", "[::1]"),
            ("127.0.0.1:8443", "127.0.0.1:8443"),
            ("docker.io:5000", "docker.io:5000"),
            ("registry-1.docker.io:5000", "registry-1.docker.io:5000"),
            ("", ""),
        ] {
            assert_eq!(canonical_registry(authority), want, "{authority:?}");
        }
    }

    #[test]
    fn upstream_host_ports_of_canonical_names() {
        for (registry, host, port) in [
            ("docker.io", "registry-1.docker.io", 443),
            ("ghcr.io", "ghcr.io", 443),
            ("localhost:5000", "localhost", 5000),
            ("registry.local:8443", "registry.local", 8443),
            ("docker.io:5000", "docker.io", 5000),
            ("[::1]:5000", "[::1]", 5000),
            ("[::1]", "[::1]", 443),
            ("127.0.0.1:8443", "127.0.0.1", 8443),
            ("registry.local:abc", "registry.local:abc", 443),
            ("registry.local:", "registry.local:", 443),
            (":5000", ":5000", 443),
            ("", "", 443),
        ] {
            assert_eq!(
                upstream_host_port(registry),
                (host.to_string(), port),
                "{registry:?}"
            );
        }
    }

    #[test]
    fn host_ports_parse_with_a_default_port() {
        let hp = |s: &str| HostPort::parse(s, 80).map(|h| h.to_string());
        assert_eq!(hp("Reg.Test:5000").unwrap(), "reg.test:5000");
        assert_eq!(hp("reg.test").unwrap(), "reg.test:80");
        assert_eq!(hp("127.0.0.1:5000").unwrap(), "127.0.0.1:5000");
        assert_eq!(hp("[::1]:5000").unwrap(), "[::1]:5000");
        for bad in [
            "",
            "reg.test:0",
            "reg.test:99999",
            "a b:1",
            "*.x:1",
            "reg.test:x",
        ] {
            assert!(HostPort::parse(bad, 80).is_err(), "{bad:?}");
        }
        let entry = HostPort::parse("reg.test:5000", 80).unwrap();
        assert!(entry.matches("REG.test.", 5000));
        assert!(!entry.matches("reg.test", 80));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["", "*.", "a..b", "a b", "*.*.x", "a/b", "x:443"] {
            assert!(bad.parse::<HostPattern>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dns_host_name_limits() {
        assert!(is_dns_host_name("a.b-c.example"));
        assert!(is_dns_host_name(&"a".repeat(63)));
        assert!(!is_dns_host_name(&"a".repeat(64)));
        assert!(!is_dns_host_name(&format!("{}a", "a.".repeat(127))));
        assert!(is_dns_host_name(&["a"; 127].join(".")));
        assert!(!is_dns_host_name("ex ample.com"));
        assert!(!is_dns_host_name("exämple.com"));
        assert!(!is_dns_host_name("host-.example"));
    }
}
