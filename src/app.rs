//! The shared state of a running regcache, built once from the [`Config`].

use std::sync::Arc;

use crate::config::Config;
use crate::tls::{CertificateAuthority, LeafMinter, TlsError};
use crate::upstream::Upstream;

/// Everything connection tasks share. Held in an `Arc`.
pub struct App {
    /// The validated configuration.
    pub config: Config,
    /// The CA whose certificate clients trust.
    pub ca: Arc<CertificateAuthority>,
    /// Leaf certificates for intercepted hosts.
    pub minter: LeafMinter,
    /// The upstream client.
    pub upstream: Upstream,
}

impl App {
    /// Loads (or creates) the CA and builds the upstream client.
    pub fn new(config: Config) -> Result<Arc<Self>, TlsError> {
        let ca = Arc::new(CertificateAuthority::load_or_create(&config.ca)?);
        let minter = LeafMinter::new(ca.clone(), config.cert_cache)?;
        let upstream = Upstream::new(&config)?;
        Ok(Arc::new(Self {
            config,
            ca,
            minter,
            upstream,
        }))
    }
}
