//! HTTP plumbing shared by every way in, and the bottom layer of regcache:
//! the one streamed body type ([`body`]), hop-by-hop headers and the head
//! size limit ([`headers`]), plain-text error answers ([`error`]) and the
//! access log with the request layer that writes it ([`log`]).
//!
//! Nothing here knows registries, the cache or clients' rights; everything
//! above may use it.

pub mod body;
pub mod error;
pub mod headers;
pub mod log;
