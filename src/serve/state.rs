//! [`State`]: what every request served by [`super`] shares, built once from
//! the [`Config`] by the composition root ([`crate::app`]).

use std::sync::Arc;

use super::coalesce::Coalescer;
use super::manifests::TagLookup;
use super::sharing::{AccountError, Sharing};
use crate::cache::{Cache, CacheError};
use crate::config::Config;
use crate::tls::TlsError;
use crate::upstream::Upstream;

/// Why the serving state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The upstream client's trust roots could not be loaded.
    #[error(transparent)]
    Upstream(#[from] TlsError),
    /// The cache could not be opened.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// regcache's own registry accounts could not be loaded.
    #[error(transparent)]
    Account(#[from] AccountError),
}

/// The serving state: configuration, upstream client, cache, what regcache
/// learnt about who may see what, and the coalescers of upstream questions.
/// Held in an `Arc` by every connection task.
pub struct State {
    /// The validated configuration.
    pub config: Config,
    /// The upstream client.
    pub upstream: Upstream,
    /// The disk cache.
    pub cache: Arc<Cache>,
    /// What regcache learnt about who may see which repository.
    pub sharing: Sharing,
    /// Upstream lookups of stale or unknown tags, one per tag at a time.
    pub tag_lookups: Coalescer<TagLookup>,
}

impl State {
    /// Builds the upstream client, reads regcache's registry accounts and
    /// opens the cache. Blocking: call before serving.
    pub fn new(config: Config) -> Result<Arc<Self>, StateError> {
        let upstream = Upstream::new(&config)?;
        let sharing = Sharing::new(&config)?;
        let cap = config.cache_cap();
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
            upstream,
            cache,
            sharing,
            tag_lookups: Coalescer::default(),
        }))
    }
}
