//! [`State`]: what every request served by [`super`] shares, built once from
//! the [`Config`] by the composition root ([`crate::app`]).

use std::sync::Arc;
use std::time::Duration;

use super::coalesce::Coalescer;
use super::manifests::TagLookup;
use super::sharing::{AccountError, Sharing};
use crate::cache::freshness::now_ms;
use crate::cache::{Cache, CacheError};
use crate::config::Config;
use crate::peer::PeerClient;
use crate::shared::{SharedStore, SharedStoreError};
use crate::tls::peer::PeerTls;
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
    /// The shared tier could not be set up.
    #[error(transparent)]
    Shared(#[from] SharedStoreError),
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
    /// The shared tier behind the disk cache (`shared_store`), if any.
    pub shared: Option<Arc<SharedStore>>,
    /// Calls to the peer endpoints of the other nodes (with a shared tier
    /// and this node's peer TLS).
    pub peers: Option<PeerClient>,
}

impl State {
    /// Builds the upstream client, reads regcache's registry accounts and
    /// opens the cache; with `peer_tls`, other nodes' peer endpoints are
    /// used. Blocking: call before serving.
    pub fn new(config: Config, peer_tls: Option<&PeerTls>) -> Result<Arc<Self>, StateError> {
        let upstream = Upstream::new(&config)?;
        let sharing = Sharing::new(&config)?;
        let cap = config.cache_cap();
        let cache = Cache::open(&config.cache_dir, cap)?;
        let shared = match &config.shared_store {
            Some(url) => {
                let mut shared = SharedStore::from_url(url)?;
                if let Some(peer) = &config.peer {
                    shared.advertise_peer(&peer.advertise);
                }
                tracing::info!(store = shared.name(), "shared tier behind the disk cache");
                Some(Arc::new(shared))
            }
            None => None,
        };
        let advertised = config.peer.as_ref().map(|p| p.advertise.clone());
        let peers = peer_tls
            .filter(|_| shared.is_some())
            .map(|tls| PeerClient::new(tls, advertised));
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
            shared,
            peers,
        }))
    }

    /// The earliest time (Unix ms) a repository found public then still
    /// counts as public: within `public_ttl` of now, the same freshness as
    /// the repository's own requests use before asking the registry again.
    /// For [`Cache::link_facts`].
    pub fn public_since(&self) -> u64 {
        public_since(now_ms(), self.config.public_ttl)
    }
}

/// Found public at or after this (Unix ms) is found public within `ttl`
/// of `now` (`now - at < ttl`; a `ttl` of 0 counts nothing).
fn public_since(now: u64, ttl: Duration) -> u64 {
    let ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    now.saturating_sub(ttl).saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_since_is_the_public_ttl_freshness() {
        let ttl = Duration::from_secs(600);
        let now = 1_000_000_000;
        let since = public_since(now, ttl);
        let fresh = |at: u64| now.saturating_sub(at) < 600_000;
        for at in [now, now - 1, now - 599_999, now - 600_000, now - 600_001, 0] {
            assert_eq!(at >= since, fresh(at), "found public at {at}");
        }
        assert_eq!(public_since(now, Duration::ZERO), now + 1, "ttl 0: none");
        assert_eq!(public_since(5, ttl), 1, "saturates, never wraps");
    }
}
