//! regcache's integration tests, one binary: every module below spawns the
//! real `regcache` binary (or runs the harness alone) against the in-process
//! servers of [`support`].

mod support;

mod access;
mod admin;
mod artifacts;
mod auth;
mod bundle;
mod cache;
mod cli;
mod harness;
mod metrics;
mod origins;
mod parent_proxy;
mod peer;
mod proxy;
mod relay;
mod rules;
mod shared;
mod status;
mod stream;
