//! regcache: a forward, TLS-intercepting caching proxy for container registries.
//!
//! A client sets `HTTPS_PROXY=http://regcache:3128` and trusts regcache's CA.
//! `CONNECT` to a registry host is answered with a certificate minted for
//! that host ([`tls`]); the registry requests inside are served by [`serve`]
//! from the upstream ([`upstream`]). Other hosts are tunnelled untouched
//! ([`proxy`]). See README.md for the architecture picture.

pub mod access;
pub mod admin;
pub mod app;
pub mod cache;
pub mod cli;
pub mod config;
pub mod http;
pub mod metrics;
pub mod peer;
pub mod policy;
pub mod prefetch;
pub mod proxy;
pub mod registry;
pub mod serve;
pub mod shared;
pub mod tls;
pub mod upstream;

#[cfg(test)]
mod layers;
