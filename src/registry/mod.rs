//! Knowledge of the OCI distribution protocol and of the public registries.
//!
//! Nothing here does I/O: it parses, names and matches, so that every part of
//! it can be tested with plain values.

pub mod hosts;
