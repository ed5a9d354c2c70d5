//! The composition root: builds, from the [`Config`], the serving state
//! ([`State`]), the CA and leaf minter, and client access; and runs the
//! background upkeep of the cache.

use std::sync::Arc;
use std::time::Duration;

use crate::access::{Access, AccessError};
use crate::config::Config;
use crate::peer::PeerServer;
use crate::serve::state::{State, StateError};
use crate::tls::peer::PeerTls;
use crate::tls::{CertificateAuthority, LeafMinter, TlsError};

/// Why regcache could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The CA or the `mirror_tls` certificate could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The serving state (upstream trust, accounts, cache) could not be built.
    #[error(transparent)]
    State(#[from] StateError),
    /// The proxy users file could not be loaded.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The `admin_token_file` could not be read, is empty, or its group or
    /// other users can read it.
    #[error("admin_token_file: {0}")]
    AdminToken(String),
}

impl App {
    /// Removes content not read for its `max_unused`, every
    /// [`crate::cache::retention::period`] of the shortest limit; the rules
    /// give each repository's limit. Runs beside serving: the cache lock is
    /// held only to pick and to remove (see [`crate::cache::Cache::remove_unused`]).
    async fn retain(self: Arc<Self>, shortest: Duration) {
        let every = crate::cache::retention::period(shortest);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let config = self.config();
        let limit_for = |registry: &str, repo: &str| config.rules.decide(registry, repo).max_unused;
        loop {
            tick.tick().await;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let cache = &self.state.cache;
            match cache
                .remove_unused(now, shortest, &limit_for, config.max_unused)
                .await
            {
                Ok(removed) if removed.is_empty() => {}
                Ok(removed) => {
                    crate::metrics::get().removed_unused(removed.entries, removed.bytes);
                    tracing::info!(
                        entries = removed.entries,
                        bytes = removed.bytes,
                        tags = removed.tags,
                        "removed content not read for max_unused"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "cannot remove unused cache content"),
            }
        }
    }
}

/// The token in `path`: readable by its owner only, and not empty.
fn read_admin_token(path: &std::path::Path) -> Result<String, StartError> {
    let token = crate::config::secret::read_owner_secret(path)
        .map_err(|e| StartError::AdminToken(e.to_string()))?;
    if token.is_empty() {
        return Err(StartError::AdminToken(format!(
            "{} is empty",
            path.display()
        )));
    }
    Ok(token)
}

/// Everything connection tasks share. Held in an `Arc`.
pub struct App {
    /// What serving a registry request needs (config, cache, upstream, ...).
    pub state: Arc<State>,
    /// The CA whose certificate clients trust.
    pub ca: Arc<CertificateAuthority>,
    /// Leaf certificates for intercepted hosts.
    pub minter: LeafMinter,
    /// Who may use the proxy: client networks and proxy users.
    pub access: Access,
    /// The operator's certificate for `mirror_tls` (None: minted per name).
    pub mirror_tls: Option<Arc<rustls::ServerConfig>>,
    /// The admin API's bearer token, from `admin_token_file` (None: the API
    /// answers loopback clients only).
    pub admin_token: Option<String>,
    /// The peer endpoint of this node (`peer_listen`), if any.
    pub peer_server: Option<PeerServer>,
    /// When this App was built (the admin API's uptime).
    pub started: std::time::Instant,
}

impl App {
    /// Loads (or creates) the CA, then builds the serving state. Blocking:
    /// call before serving.
    pub fn new(config: Config) -> Result<Arc<Self>, StartError> {
        let access = Access::from_config(&config)?;
        let admin_token = match &config.admin_token_file {
            Some(path) => Some(read_admin_token(path)?),
            None => None,
        };
        let ca = Arc::new(CertificateAuthority::load_or_create(&config.ca)?);
        let minter = LeafMinter::new(ca.clone(), config.cert_cache)?;
        let mirror_tls = match &config.mirror_cert {
            Some((cert, key)) => Some(crate::tls::server_config_from_files(cert, key)?),
            None => None,
        };
        // Nodes of one cluster share the CA; with a shared tier each mints
        // its peer certificate from it.
        let peer_tls = match config.shared_store {
            Some(_) => Some(PeerTls::new(&ca)?),
            None => None,
        };
        let serves_peers = config.peer.is_some();
        let state = State::new(config, peer_tls.as_ref())?;
        let peer_server = peer_tls
            .filter(|_| serves_peers)
            .map(|tls| PeerServer::new(state.cache.clone(), &tls));
        crate::metrics::get().set_cache(state.cache.clone());
        Ok(Arc::new(Self {
            state,
            ca,
            minter,
            access,
            mirror_tls,
            admin_token,
            peer_server,
            started: std::time::Instant::now(),
        }))
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.state.config
    }

    /// Background upkeep: removes orphaned files once, then writes access
    /// times and counters every 30 s; with `max_unused` (global or in a
    /// rule), removes unused content beside it ([`App::retain`]).
    pub async fn maintain(self: Arc<Self>, started: std::time::SystemTime) {
        if let Some(shortest) = self.config().shortest_max_unused() {
            tokio::spawn(self.clone().retain(shortest));
        }
        let cache = &self.state.cache;
        match cache.sweep_orphans(started).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                removed = n,
                "removed cache files left by an interrupted run"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot sweep the cache for orphaned files"),
        }
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = cache.flush().await {
                tracing::warn!(error = %e, "cannot write cache access times");
            }
        }
    }
}
