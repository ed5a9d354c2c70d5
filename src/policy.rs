//! Where a request may go: one policy for every way into regcache.
//!
//! Every way a request names an upstream goes through the pure decisions
//! here: `CONNECT host:port` ([`decide_connect`]), absolute-form
//! `GET http://host:port/…` ([`decide_plain_http`]), the mirror's `?ns=` and
//! path-prefix forms ([`decide_mirror`]) and the targets of registry
//! redirects ([`decide_redirect`], [`decide_redirect_address`]). Three rules:
//!
//! - **Port rule.** TLS goes to port 443 and the `connect_ports`; plain HTTP
//!   goes to an insecure registry's own port, and passes through to other
//!   hosts on port 80 (or a `connect_ports` port) only.
//! - **Host rule.** Registry hosts on the intercept list are answered by
//!   regcache itself, over HTTPS only; plain HTTP is for the registries named
//!   in `insecure_registries`, whose knowledge is keyed apart
//!   (`http://host:port`). Other hosts are passed through untouched or
//!   refused, as `other_hosts` says.
//! - **Redirect rule.** A redirect target must be `https` (plain `http` only
//!   from an insecure registry to an insecure registry), on an allowed port,
//!   and not on a loopback, link-local or private address unless a registry
//!   is reached there (a `--resolve` entry says so, or it resolved there).
//!   A client's credential follows a redirect only to the same origin.
//! - **Own-listener rule.** regcache never relays to itself: a connection
//!   it opens (a tunnel, a plain pass-through, a registry or redirect
//!   target) that lands on one of its own listening sockets is refused
//!   ([`decide_connected`]). Otherwise a client could reach regcache's
//!   loopback-only pages (the admin API, the status page) through the proxy,
//!   its request arriving from 127.0.0.1, or make regcache loop.
//!
//! Each refusal names its rule ([`Refusal::rule`]) for the log line.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use http::uri::Scheme;
use http::Uri;

use crate::config::{Config, OtherHosts};
use crate::registry::hosts::{normalize_host, HostPort};

/// Why a request may not go where it asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The rule (or option) that refuses it, for logs: `connect_ports`, say.
    pub rule: &'static str,
    /// What the client is told.
    pub reason: &'static str,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (rule: {})", self.reason, self.rule)
    }
}

const CONNECT_PORT: Refusal = Refusal {
    rule: "connect_ports",
    reason: "CONNECT to this port is not allowed",
};
const OTHER_HOSTS: Refusal = Refusal {
    rule: "other_hosts",
    reason: "this proxy only serves container registries",
};
const PLAIN_PORT: Refusal = Refusal {
    rule: "plain_http_port",
    reason: "plain HTTP is passed through to port 80 (or a connect_ports port) only",
};
const REGISTRY_OVER_HTTP: Refusal = Refusal {
    rule: "insecure_registries",
    reason: "plain HTTP to a registry host is refused: use HTTPS (CONNECT), \
             or name it in insecure_registries",
};
const MIRROR_PORT: Refusal = Refusal {
    rule: "connect_ports",
    reason: "this registry port is not allowed (443, connect_ports or an insecure registry)",
};
const MIRROR_HOST: Refusal = Refusal {
    rule: "intercept",
    reason: "not a registry this regcache serves (add it to intercept)",
};
const REDIRECT_SCHEME: Refusal = Refusal {
    rule: "redirect_scheme",
    reason: "redirect to plain http refused (https only, unless between insecure registries)",
};
const REDIRECT_PORT: Refusal = Refusal {
    rule: "redirect_port",
    reason: "redirect to a port other than 443 and connect_ports refused",
};
const REDIRECT_ADDRESS: Refusal = Refusal {
    rule: "redirect_address",
    reason: "redirect or token realm at a loopback, link-local or private address refused \
             (map that host with --resolve to allow it)",
};
const OWN_LISTENER: Refusal = Refusal {
    rule: "own_listener",
    reason: "regcache does not relay to itself",
};
const REALM_SCHEME: Refusal = Refusal {
    rule: "realm_scheme",
    reason: "token realm over plain http refused (https only, unless an insecure registry)",
};
const REALM_PORT: Refusal = Refusal {
    rule: "realm_port",
    reason: "token realm on a port other than 443 and connect_ports refused \
             (add the port to connect_ports to allow it)",
};

/// What to do with a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Terminate TLS with a minted certificate and serve the registry API.
    Intercept,
    /// Relay bytes untouched.
    PassThrough,
    /// Answer 403.
    Refuse(Refusal),
}

/// Decides a `CONNECT host:port`.
pub fn decide_connect(config: &Config, host: &str, port: u16) -> Decision {
    if !config.connect_ports.contains(&port) {
        return Decision::Refuse(CONNECT_PORT);
    }
    if config.intercept.matches(host) {
        Decision::Intercept
    } else if config.other_hosts == OtherHosts::Tunnel {
        Decision::PassThrough
    } else {
        Decision::Refuse(OTHER_HOSTS)
    }
}

/// What to do with an absolute-form `http://host:port/…` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlainHttp {
    /// A registry in `insecure_registries`: served (and cached) over plain
    /// HTTP under its own `http://host:port` identity.
    InsecureRegistry,
    /// Not a registry: forwarded untouched, never cached.
    PassThrough,
    /// Answer 403.
    Refuse(Refusal),
}

/// Whether `host:port` is one of the `insecure_registries`.
pub fn is_insecure_registry(config: &Config, host: &str, port: u16) -> bool {
    config
        .insecure_registries
        .iter()
        .any(|r| r.matches(host, port))
}

/// Decides an absolute-form `http://host:port/…` request.
pub fn decide_plain_http(config: &Config, host: &str, port: u16) -> PlainHttp {
    if is_insecure_registry(config, host, port) {
        return PlainHttp::InsecureRegistry;
    }
    if config.intercept.matches(host) {
        return PlainHttp::Refuse(REGISTRY_OVER_HTTP);
    }
    if config.other_hosts == OtherHosts::Refuse {
        return PlainHttp::Refuse(OTHER_HOSTS);
    }
    if port != 80 && !config.connect_ports.contains(&port) {
        return PlainHttp::Refuse(PLAIN_PORT);
    }
    PlainHttp::PassThrough
}

/// Decides the registry a mirror request names (`?ns=host[:port]` or a path
/// prefix): the scheme to reach it with, or a refusal. Docker Hub is always
/// served; other hosts must be intercepted (HTTPS, on 443 or a
/// `connect_ports` port) or insecure registries (plain HTTP).
pub fn decide_mirror(config: &Config, host: &str, port: Option<u16>) -> Result<Scheme, Refusal> {
    // A name without a port is the HTTPS registry; an insecure one is
    // named with its port (`ns=host:80`).
    if port.is_some_and(|port| is_insecure_registry(config, host, port)) {
        return Ok(Scheme::HTTP);
    }
    if !config.intercept.matches(host) {
        return Err(MIRROR_HOST);
    }
    if !config.connect_ports.contains(&port.unwrap_or(443)) {
        return Err(MIRROR_PORT);
    }
    Ok(Scheme::HTTPS)
}

/// What redirect targets are checked against: the allowed TLS ports and the
/// insecure registries. Built once from the configuration.
#[derive(Debug, Clone, Default)]
pub struct RedirectRules {
    /// Ports an `https` target may use (443 and `connect_ports`).
    pub tls_ports: Vec<u16>,
    /// The only `http` origins a target may be.
    pub insecure_registries: Vec<HostPort>,
}

impl RedirectRules {
    /// The rules the configuration describes.
    pub fn from_config(config: &Config) -> Self {
        Self {
            tls_ports: config.connect_ports.clone(),
            insecure_registries: config.insecure_registries.clone(),
        }
    }
}

/// A URI's origin: scheme, normalized host and effective port.
fn origin(uri: &Uri) -> Option<(&str, String, u16)> {
    let scheme = uri.scheme_str()?;
    let default = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let host = normalize_host(uri.host()?);
    Some((scheme, host, uri.port_u16().unwrap_or(default)))
}

/// Whether `a` and `b` have the same origin (scheme, host and port).
pub fn same_origin(a: &Uri, b: &Uri) -> bool {
    match (origin(a), origin(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Decides whether a redirect from a request that started at `start` may be
/// followed to `next`. (The address `next` resolves to is checked when the
/// connection is made: [`decide_redirect_address`].)
pub fn decide_redirect(rules: &RedirectRules, start: &Uri, next: &Uri) -> Result<(), Refusal> {
    let Some((scheme, host, port)) = origin(next) else {
        return Err(REDIRECT_SCHEME);
    };
    if same_origin(start, next) {
        return Ok(());
    }
    if scheme == "http" {
        let from_insecure = start.scheme_str() == Some("http");
        let to_insecure = rules
            .insecure_registries
            .iter()
            .any(|r| r.matches(&host, port));
        return if from_insecure && to_insecure {
            Ok(())
        } else {
            Err(REDIRECT_SCHEME)
        };
    }
    if !rules.tls_ports.contains(&port) {
        return Err(REDIRECT_PORT);
    }
    Ok(())
}

/// Decides whether regcache may ask the token realm a registry's Bearer
/// challenge names. The registry chooses that URL, so it is held to the
/// rules of a redirect target: `https` on 443 or a `connect_ports` port, plain
/// `http` only to an insecure registry (and the address is checked when the
/// connection is made, as for redirects).
pub fn decide_realm(rules: &RedirectRules, realm: &Uri) -> Result<(), Refusal> {
    let Some((scheme, host, port)) = origin(realm) else {
        return Err(REALM_SCHEME);
    };
    if scheme == "http" {
        let insecure = rules
            .insecure_registries
            .iter()
            .any(|r| r.matches(&host, port));
        return if insecure { Ok(()) } else { Err(REALM_SCHEME) };
    }
    if rules.tls_ports.contains(&port) {
        Ok(())
    } else {
        Err(REALM_PORT)
    }
}

/// Whether a client's `Authorization` and `Cookie` may go to `next` in a
/// request meant for `start`: only to the very same origin.
pub fn keeps_credentials(start: &Uri, next: &Uri) -> bool {
    same_origin(start, next)
}

/// Whether `ip` is a loopback, link-local, private, shared (CGNAT),
/// unspecified or broadcast address: somewhere inside, not on the internet.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || (a == 100 && (64..128).contains(&b)) // shared (CGNAT)
                || a == 0
                || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
                || (a == 198 && (b & 0xfe) == 18) // benchmarking
                || a >= 240 // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let s = v6.segments();
            // IPv4-compatible (::a.b.c.d) and NAT64 (64:ff9b::a.b.c.d) carry
            // an IPv4 address: judge that one.
            let embedded = std::net::Ipv4Addr::new(
                (s[6] >> 8) as u8,
                s[6] as u8,
                (s[7] >> 8) as u8,
                s[7] as u8,
            );
            let compatible = s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified();
            let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
            if compatible || nat64 {
                return is_internal(IpAddr::V4(embedded));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local
        }
    }
}

/// Decides the address a redirect target resolved to: an internal address
/// only when the operator mapped the host there (`mapped`, a `--resolve`
/// entry) or a registry is reached at that address (`registry_there`).
pub fn decide_redirect_address(
    ip: IpAddr,
    mapped: bool,
    registry_there: bool,
) -> Result<(), Refusal> {
    if mapped || registry_there || !is_internal(ip) {
        Ok(())
    } else {
        Err(REDIRECT_ADDRESS)
    }
}

/// Decides a connection regcache opened, once connected: from its own
/// address `local` to `peer`. Refused when `peer` is one of regcache's own
/// `listeners`: the same address, or the same port on a listener bound to
/// every address (`0.0.0.0`, `[::]`) when `peer` is on this host (loopback,
/// or the very address the connection left from, as the kernel picks for a
/// destination on this host).
pub fn decide_connected(
    peer: SocketAddr,
    local: IpAddr,
    listeners: &[SocketAddr],
) -> Result<(), Refusal> {
    let ip = peer.ip().to_canonical();
    let on_this_host = ip.is_loopback() || ip == local.to_canonical();
    let own = listeners.iter().any(|listener| {
        let bound = listener.ip().to_canonical();
        listener.port() == peer.port() && (bound == ip || (bound.is_unspecified() && on_this_host))
    });
    if own {
        Err(OWN_LISTENER)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn config(other: OtherHosts, ports: Vec<u16>) -> Config {
        Config::from_settings(Settings {
            other_hosts: Some(other),
            connect_ports: ports,
            insecure_registries: vec!["plain.test:5000".into(), "[::1]:8080".into()],
            ..Settings::default()
        })
        .unwrap()
    }

    fn rule(decision: Decision) -> Option<&'static str> {
        match decision {
            Decision::Refuse(r) => Some(r.rule),
            _ => None,
        }
    }

    #[test]
    fn connect_table() {
        let tunnel = config(OtherHosts::Tunnel, vec![8443]);
        let refuse = config(OtherHosts::Refuse, vec![]);
        let d = decide_connect;
        assert_eq!(d(&tunnel, "ghcr.io", 443), Decision::Intercept);
        assert_eq!(d(&tunnel, "ghcr.io", 8443), Decision::Intercept);
        assert_eq!(d(&tunnel, "example.com", 443), Decision::PassThrough);
        assert_eq!(rule(d(&tunnel, "ghcr.io", 25)), Some("connect_ports"));
        assert_eq!(rule(d(&tunnel, "127.0.0.12", 5000)), Some("connect_ports"));
        assert_eq!(rule(d(&refuse, "example.com", 443)), Some("other_hosts"));
        assert_eq!(rule(d(&refuse, "ghcr.io", 8443)), Some("connect_ports"));
        assert_eq!(d(&refuse, "quay.io", 443), Decision::Intercept);
    }

    #[test]
    fn plain_http_table() {
        let tunnel = config(OtherHosts::Tunnel, vec![8443]);
        let refuse = config(OtherHosts::Refuse, vec![]);
        let refused = |c: &Config, host: &str, port: u16| match decide_plain_http(c, host, port) {
            PlainHttp::Refuse(r) => r.rule,
            other => panic!("{host}:{port} not refused: {other:?}"),
        };
        for c in [&tunnel, &refuse] {
            assert_eq!(
                decide_plain_http(c, "Plain.Test", 5000),
                PlainHttp::InsecureRegistry
            );
            assert_eq!(
                decide_plain_http(c, "::1", 8080),
                PlainHttp::InsecureRegistry
            );
            // The registry hosts, on any port, are never reached over http.
            assert_eq!(refused(c, "registry.gitlab.com", 80), "insecure_registries");
            assert_eq!(refused(c, "quay.io", 5000), "insecure_registries");
            assert_eq!(
                refused(c, "registry-1.docker.io", 80),
                "insecure_registries"
            );
        }
        // plain.test on another port is no registry, and no open port either.
        assert_eq!(refused(&tunnel, "plain.test", 5001), "plain_http_port");
        assert_eq!(refused(&tunnel, "127.0.0.12", 5000), "plain_http_port");
        assert_eq!(
            decide_plain_http(&tunnel, "deb.debian.org", 80),
            PlainHttp::PassThrough
        );
        assert_eq!(
            decide_plain_http(&tunnel, "127.0.0.12", 8443),
            PlainHttp::PassThrough
        );
        assert_eq!(refused(&refuse, "deb.debian.org", 80), "other_hosts");
    }

    #[test]
    fn mirror_table() {
        let c = config(OtherHosts::Refuse, vec![8443]);
        assert_eq!(decide_mirror(&c, "quay.io", None), Ok(Scheme::HTTPS));
        assert_eq!(decide_mirror(&c, "quay.io", Some(443)), Ok(Scheme::HTTPS));
        assert_eq!(decide_mirror(&c, "quay.io", Some(8443)), Ok(Scheme::HTTPS));
        assert_eq!(
            decide_mirror(&c, "plain.test", Some(5000)),
            Ok(Scheme::HTTP)
        );
        assert_eq!(
            decide_mirror(&c, "quay.io", Some(5000)).unwrap_err().rule,
            "connect_ports"
        );
        assert_eq!(
            decide_mirror(&c, "plain.test", None).unwrap_err().rule,
            "intercept"
        );
        assert_eq!(
            decide_mirror(&c, "evil.example", None).unwrap_err().rule,
            "intercept"
        );
    }

    #[test]
    fn realm_table() {
        let rules = RedirectRules::from_config(&config(OtherHosts::Tunnel, vec![8443]));
        for (realm, want) in [
            ("https://auth.docker.io/token", Ok(())),
            ("https://gitlab.example:8443/jwt/auth", Ok(())),
            ("https://auth.test:5001/token", Err("realm_port")),
            ("https://127.0.0.12:22/token", Err("realm_port")),
            ("http://auth.docker.io/token", Err("realm_scheme")),
            ("http://plain.test:5000/token", Ok(())),
            ("http://plain.test:5001/token", Err("realm_scheme")),
            ("ftp://auth.test/token", Err("realm_scheme")),
            ("/token", Err("realm_scheme")),
        ] {
            let got = decide_realm(&rules, &realm.parse().unwrap()).map_err(|r| r.rule);
            assert_eq!(got, want, "{realm}");
        }
    }

    #[test]
    fn redirect_table() {
        let rules = RedirectRules::from_config(&config(OtherHosts::Tunnel, vec![8443]));
        let https = "https://reg.test/v2/a/blobs/x";
        let plain = "http://plain.test:5000/v2/a/blobs/x";
        for (start, next, want) in [
            (https, "https://cdn.test/b?sig=1", Ok(())),
            (https, "https://cdn.test:8443/b", Ok(())),
            (https, "https://reg.test/other", Ok(())),
            (
                https,
                "http://reg.test/v2/a/blobs/x",
                Err("redirect_scheme"),
            ),
            (https, "http://cdn.test/b", Err("redirect_scheme")),
            (https, "http://plain.test:5000/b", Err("redirect_scheme")),
            (https, "https://reg.test:5000/b", Err("redirect_port")),
            (https, "https://127.0.0.12:22/", Err("redirect_port")),
            (https, "ftp://cdn.test/b", Err("redirect_scheme")),
            (plain, "http://plain.test:5000/other", Ok(())),
            (
                plain,
                "http://plain.test:5001/other",
                Err("redirect_scheme"),
            ),
            (plain, "http://[::1]:8080/other", Ok(())),
            (plain, "https://cdn.test/b", Ok(())),
            ("https://reg.test:5000/x", "https://reg.test:5000/y", Ok(())),
        ] {
            let got = decide_redirect(&rules, &start.parse().unwrap(), &next.parse().unwrap())
                .map_err(|r| r.rule);
            assert_eq!(got, want, "{start} -> {next}");
        }
    }

    #[test]
    fn credentials_stay_with_their_origin() {
        let start: Uri = "https://reg.test/v2/x".parse().unwrap();
        for (next, keeps) in [
            ("https://reg.test/other", true),
            ("https://REG.test:443/other", true),
            ("http://reg.test/v2/x", false),
            ("https://reg.test:8443/v2/x", false),
            ("https://cdn.test/v2/x", false),
        ] {
            assert_eq!(
                keeps_credentials(&start, &next.parse().unwrap()),
                keeps,
                "{next}"
            );
        }
    }

    #[test]
    fn address_table() {
        let internal = [
            "127.0.0.12",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "192.0.0.1",
            "198.18.0.1",
            "198.19.255.254",
            "240.0.0.1",
            "255.255.255.255",
            "::10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "fec0::1",
        ];
        for ip in internal {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(is_internal(ip), "{ip}");
            assert_eq!(
                decide_redirect_address(ip, false, false).unwrap_err().rule,
                "redirect_address"
            );
            assert!(decide_redirect_address(ip, true, false).is_ok());
            assert!(decide_redirect_address(ip, false, true).is_ok());
        }
        for ip in [
            "93.184.216.34",
            "2606:4700::1111",
            "100.128.0.1",
            "8.8.8.8",
            "198.20.0.1",
            "64:ff9b::808:808",
            "::8.8.8.8",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(!is_internal(ip), "{ip}");
            assert!(decide_redirect_address(ip, false, false).is_ok());
        }
    }

    #[test]
    fn connected_table() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let proxy = a("127.0.0.1:3128");
        let wildcard = a("0.0.0.0:80");
        let wildcard6 = a("[::]:5443");
        let veth = a("192.0.2.2:8080");
        let listeners = [proxy, wildcard, wildcard6, veth];
        // (peer, local address of the connection, refused?)
        let cases = [
            ("127.0.0.1:3128", "127.0.0.1", true),
            ("127.0.0.1:3129", "127.0.0.1", false),
            ("127.0.0.2:3128", "127.0.0.1", false),
            ("[::ffff:127.0.0.1]:3128", "::ffff:127.0.0.1", true),
            // A wildcard listener: any address of this host.
            ("127.0.0.1:80", "127.0.0.1", true),
            ("127.9.9.9:80", "127.0.0.1", true),
            ("192.0.2.2:80", "192.0.2.2", true),
            ("[::1]:80", "::1", true),
            // ...but another host on that port is a real server.
            ("192.0.2.9:80", "192.0.2.2", false),
            ("93.184.216.34:80", "10.0.0.5", false),
            ("[::1]:5443", "::1", true),
            ("10.0.0.5:5443", "10.0.0.5", true),
            ("[2001:db8::1]:5443", "2001:db8::2", false),
            // A listener on one address.
            ("192.0.2.2:8080", "192.0.2.2", true),
            ("127.0.0.1:8080", "127.0.0.1", false),
            ("192.0.2.3:8080", "192.0.2.2", false),
        ];
        for (peer, local, refused) in cases {
            let verdict = decide_connected(a(peer), ip(local), &listeners);
            assert_eq!(verdict.is_err(), refused, "{peer} from {local}");
            if let Err(refusal) = verdict {
                assert_eq!(refusal.rule, "own_listener");
            }
        }
        assert!(decide_connected(proxy, ip("127.0.0.1"), &[]).is_ok());
    }
}
