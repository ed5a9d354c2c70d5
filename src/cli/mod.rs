//! What the command line shows: progress bars ([`progress`]) and the text
//! of reports, with human-readable sizes ([`report`]); and how it asks a
//! running regcache ([`remote`]).
//!
//! The store and the bundle code return data and report progress through
//! [`crate::cache::bundle::Progress`]; how that looks on a terminal is
//! decided here, above them.

pub mod progress;
pub mod remote;
pub mod report;
