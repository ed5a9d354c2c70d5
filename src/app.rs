//! The shared state of a running regcache, built once from the [`Config`].

use std::sync::Arc;

use std::path::Path;
use std::time::Duration;

use crate::access::{Access, AccessError};
use crate::cache::{Cache, CacheError};
use crate::config::Config;
use crate::serve::coalesce::Coalescer;
use crate::serve::manifests::TagLookup;
use crate::serve::sharing::{AccountError, Sharing};
use crate::tls::{CertificateAuthority, LeafMinter, TlsError};
use crate::upstream::Upstream;

/// Why regcache could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The CA or upstream trust could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The cache could not be opened.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The proxy users file could not be loaded.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// regcache's own registry accounts could not be loaded.
    #[error(transparent)]
    Account(#[from] AccountError),
}

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
    /// The disk cache.
    pub cache: Arc<Cache>,
    /// Who may use the proxy: client networks and proxy users.
    pub access: Access,
    /// What regcache learnt about who may see which repository.
    pub sharing: Sharing,
    /// The operator's certificate for `mirror_tls` (None: minted per name).
    pub mirror_tls: Option<Arc<rustls::ServerConfig>>,
    /// Upstream lookups of stale or unknown tags, one per tag at a time.
    pub tag_lookups: Coalescer<TagLookup>,
}

impl App {
    /// Loads (or creates) the CA, opens the cache and builds the upstream
    /// client. Blocking: call before serving.
    pub fn new(config: Config) -> Result<Arc<Self>, StartError> {
        let access = Access::from_config(&config)?;
        let ca = Arc::new(CertificateAuthority::load_or_create(&config.ca)?);
        let minter = LeafMinter::new(ca.clone(), config.cert_cache)?;
        let upstream = Upstream::new(&config)?;
        let sharing = Sharing::new(&config)?;
        let mirror_tls = match &config.mirror_cert {
            Some((cert, key)) => Some(crate::tls::server_config_from_files(cert, key)?),
            None => None,
        };
        let cap = config
            .cache_size
            .unwrap_or_else(|| default_cache_size(&config.cache_dir));
        let cache = Cache::open(&config.cache_dir, cap)?;
        let stats = cache.stats();
        tracing::info!(
            dir = %config.cache_dir.display(),
            entries = stats.entries,
            bytes = stats.bytes,
            cap,
            "cache opened"
        );
        Ok(Arc::new(Self {
            config,
            ca,
            minter,
            upstream,
            cache,
            access,
            sharing,
            mirror_tls,
            tag_lookups: Coalescer::default(),
        }))
    }

    /// Background upkeep: removes orphaned files once, then writes access
    /// times and counters every 30 s.
    pub async fn maintain(self: Arc<Self>, started: std::time::SystemTime) {
        match self.cache.sweep_orphans(started).await {
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
            if let Err(e) = self.cache.flush().await {
                tracing::warn!(error = %e, "cannot write cache access times");
            }
        }
    }
}

/// Half the size of the filesystem holding `dir` (10 GiB if unknown): the
/// cache cap when `cache_size` is not set.
pub fn default_cache_size(dir: &Path) -> u64 {
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
