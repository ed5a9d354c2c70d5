//! Which name regcache may present a minted certificate for, given the SNI
//! of a client's TLS ClientHello. A pure decision, no I/O.
//!
//! regcache's CA signs leaves only for names regcache answers for: in an
//! intercepted tunnel, the host of the `CONNECT`; on the `mirror_tls` port,
//! regcache's own names (the address the client connected to and
//! `mirror_names`). Any other SNI, or one that is not a DNS host name, is
//! refused, so that the CA never signs whatever name a client asks for.
//! A ClientHello without SNI (clients connecting to an IP address) gets the
//! leaf for the fallback name. rustls itself drops SNI values that are IP
//! literals or not names at all; those arrive here as "no SNI".

use std::net::IpAddr;

use crate::registry::hosts::{is_dns_host_name, normalize_host};

/// The outcome of [`choose_leaf`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeafChoice {
    /// Mint (or reuse) a leaf for this normalised name.
    Mint(String),
    /// Refuse the handshake (TLS alert); the reason names the rule.
    Refuse(&'static str),
}

/// Decides the leaf for a handshake: `own` are the names regcache answers
/// for here, `fallback` the name used when the client sends no SNI (one of
/// `own`), `sni` what the client asked for. Names compare case-insensitively,
/// trailing dot aside.
pub fn choose_leaf(own: &[String], fallback: &str, sni: Option<&str>) -> LeafChoice {
    let Some(sni) = sni else {
        let name = normalize_host(fallback);
        return if is_ip(&name) || is_dns_host_name(&name) {
            LeafChoice::Mint(name)
        } else {
            LeafChoice::Refuse("the intercepted host is not a valid host name")
        };
    };
    let name = normalize_host(sni);
    if !is_dns_host_name(&name) {
        return LeafChoice::Refuse("SNI is not a valid DNS host name");
    }
    if own.iter().any(|o| normalize_host(o) == name) {
        LeafChoice::Mint(name)
    } else {
        LeafChoice::Refuse("SNI is not a name regcache answers for here")
    }
}

fn is_ip(name: &str) -> bool {
    name.parse::<IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Own names, fallback, SNI, and the expected choice (None: refused).
    type Case<'a> = (&'a [String], &'a str, Option<&'a str>, Option<LeafChoice>);

    #[test]
    fn only_the_hosts_own_names_get_a_leaf() {
        let own = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let docker = own(&["registry-1.docker.io"]);
        let ghcr = own(&["ghcr.io"]);
        let ip = own(&["10.0.0.5"]);
        let mint = |n: &str| LeafChoice::Mint(n.to_string());
        let refused = |c: &LeafChoice| matches!(c, LeafChoice::Refuse(_));
        #[rustfmt::skip]
        let cases: &[Case] = &[
            // Matching SNI, any case, trailing dot aside.
            (&docker, "registry-1.docker.io", Some("registry-1.docker.io"), Some(mint("registry-1.docker.io"))),
            (&docker, "registry-1.docker.io", Some("Registry-1.Docker.IO."), Some(mint("registry-1.docker.io"))),
            // No SNI: the fallback (the CONNECT host), names and addresses.
            (&docker, "registry-1.docker.io", None, Some(mint("registry-1.docker.io"))),
            (&ip, "10.0.0.5", None, Some(mint("10.0.0.5"))),
            (&own(&["::1"]), "[::1]", None, Some(mint("::1"))),
            // Another name, even a valid one, is refused.
            (&docker, "registry-1.docker.io", Some("accounts.google.com"), None),
            (&docker, "registry-1.docker.io", Some("docker.io"), None),
            (&ghcr, "ghcr.io", Some("localhost"), None),
            (&ip, "10.0.0.5", Some("example.com"), None),
            // Not DNS host names.
            (&ghcr, "ghcr.io", Some("a_b.docker.io"), None),
            (&own(&["a_b.ghcr.io"]), "a_b.ghcr.io", Some("a_b.ghcr.io"), None),
            (&own(&["a_b.ghcr.io"]), "a_b.ghcr.io", None, None),
            (&ghcr, "ghcr.io", Some("-ghcr.io"), None),
            (&ghcr, "ghcr.io", Some("ghcr..io"), None),
            (&ghcr, "ghcr.io", Some(""), None),
            (&ip, "10.0.0.5", Some("10.0.0.5"), None),
        ];
        for (own, fallback, sni, want) in cases {
            let got = choose_leaf(own, fallback, *sni);
            match want {
                Some(want) => assert_eq!(&got, want, "{own:?} {fallback} {sni:?}"),
                None => assert!(refused(&got), "{own:?} {fallback} {sni:?}: {got:?}"),
            }
        }
    }
}
