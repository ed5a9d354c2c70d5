//! Who may go where: the decision for each CONNECT and absolute-form request.
//!
//! Registry hosts on the intercept list are answered by regcache itself.
//! Other hosts are tunnelled untouched or refused, as `other_hosts` says.
//! CONNECT may only reach port 443 and the configured `connect_ports`, so the
//! proxy cannot be used to reach mail servers or SSH daemons.

use crate::config::{Config, OtherHosts};

/// What to do with a CONNECT or forwarded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Terminate TLS with a minted certificate and serve the registry API.
    Intercept,
    /// Relay bytes (CONNECT) or forward the request (absolute-form) untouched.
    PassThrough,
    /// Answer 403 with this reason.
    Refuse(&'static str),
}

/// Decides a `CONNECT host:port`.
pub fn decide_connect(config: &Config, host: &str, port: u16) -> Decision {
    if !config.connect_ports.contains(&port) {
        return Decision::Refuse("CONNECT to this port is not allowed");
    }
    decide_host(config, host)
}

/// Decides a request for `host`, whatever the port.
pub fn decide_host(config: &Config, host: &str) -> Decision {
    if config.intercept.matches(host) {
        Decision::Intercept
    } else if config.other_hosts == OtherHosts::Tunnel {
        Decision::PassThrough
    } else {
        Decision::Refuse("this proxy only serves container registries")
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
            ..Settings::default()
        })
        .unwrap()
    }

    #[test]
    fn decision_table() {
        let tunnel = config(OtherHosts::Tunnel, vec![8443]);
        let refuse = config(OtherHosts::Refuse, vec![]);
        assert_eq!(decide_connect(&tunnel, "ghcr.io", 443), Decision::Intercept);
        assert_eq!(
            decide_connect(&tunnel, "ghcr.io", 8443),
            Decision::Intercept
        );
        assert_eq!(
            decide_connect(&tunnel, "example.com", 443),
            Decision::PassThrough
        );
        assert!(matches!(
            decide_connect(&tunnel, "ghcr.io", 25),
            Decision::Refuse(_)
        ));
        assert!(matches!(
            decide_connect(&refuse, "example.com", 443),
            Decision::Refuse(_)
        ));
        assert!(matches!(
            decide_connect(&refuse, "ghcr.io", 8443),
            Decision::Refuse(_)
        ));
        assert_eq!(decide_connect(&refuse, "quay.io", 443), Decision::Intercept);
    }
}
