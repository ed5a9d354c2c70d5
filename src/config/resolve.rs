//! `--resolve HOST=ADDR[:PORT]`: upstream address overrides.
//!
//! Like curl's option of the same name, an entry sends every upstream
//! connection for HOST (registry requests and plain tunnels alike) to ADDR,
//! and to PORT when one is given. Tests use it to put a real registry on
//! loopback under a public name; air-gapped sites use it instead of DNS.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use crate::registry::hosts::normalize_host;

/// One override: where connections for a host name go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveEntry {
    /// The host name, lower case, without a trailing dot.
    pub host: String,
    /// The address connections go to.
    pub addr: IpAddr,
    /// The port, if the entry overrides it too.
    pub port: Option<u16>,
}

impl FromStr for ResolveEntry {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (host, target) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not HOST=ADDR[:PORT]"))?;
        let host = normalize_host(host);
        if host.is_empty() {
            return Err(format!("{s:?} has an empty host name"));
        }
        let (addr, port) = if let Ok(sock) = target.parse::<SocketAddr>() {
            (sock.ip(), Some(sock.port()))
        } else if let Ok(ip) = target.trim_matches(['[', ']']).parse::<IpAddr>() {
            (ip, None)
        } else {
            return Err(format!(
                "{target:?} in {s:?} is not an IP address, optionally with :PORT"
            ));
        };
        Ok(ResolveEntry { host, addr, port })
    }
}

/// All overrides, looked up by host name.
#[derive(Debug, Clone, Default)]
pub struct ResolveMap {
    entries: HashMap<String, ResolveEntry>,
}

impl ResolveMap {
    /// Builds the map; a later entry for the same host replaces an earlier one.
    pub fn new(entries: Vec<ResolveEntry>) -> Self {
        Self {
            entries: entries.into_iter().map(|e| (e.host.clone(), e)).collect(),
        }
    }

    /// The socket address to use for `host:port`, if `host` is overridden.
    pub fn target(&self, host: &str, port: u16) -> Option<SocketAddr> {
        let entry = self.entries.get(&normalize_host(host))?;
        Some(SocketAddr::new(entry.addr, entry.port.unwrap_or(port)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_address_with_and_without_port() {
        let e: ResolveEntry = "Registry-1.Docker.IO=127.0.0.1:5000".parse().unwrap();
        assert_eq!(e.host, "registry-1.docker.io");
        assert_eq!(e.port, Some(5000));
        let e: ResolveEntry = "quay.io=::1".parse().unwrap();
        assert_eq!(e.addr, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(e.port, None);
        let e: ResolveEntry = "quay.io=[::1]:8443".parse().unwrap();
        assert_eq!(e.port, Some(8443));
    }

    #[test]
    fn refuses_names_and_garbage() {
        assert!("quay.io".parse::<ResolveEntry>().is_err());
        assert!("quay.io=localhost".parse::<ResolveEntry>().is_err());
        assert!("=127.0.0.1".parse::<ResolveEntry>().is_err());
        assert!("a=127.0.0.1:99999".parse::<ResolveEntry>().is_err());
    }

    #[test]
    fn target_keeps_the_request_port_unless_overridden() {
        let map = ResolveMap::new(vec![
            "a.test=127.0.0.1".parse().unwrap(),
            "b.test=127.0.0.2:99".parse().unwrap(),
        ]);
        assert_eq!(
            map.target("A.test.", 443),
            Some("127.0.0.1:443".parse().unwrap())
        );
        assert_eq!(
            map.target("b.test", 443),
            Some("127.0.0.2:99".parse().unwrap())
        );
        assert_eq!(map.target("c.test", 443), None);
    }
}
