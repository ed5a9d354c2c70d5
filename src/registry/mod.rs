//! Knowledge of the OCI distribution protocol and of the public registries.
//!
//! Nothing here does I/O: it parses, names and matches, so that every part of
//! it can be tested with plain values.

pub mod auth;
pub mod digest;
pub mod error;
pub mod hosts;
pub mod link;
pub mod manifest;
pub mod media;
pub mod name;
pub mod reference;
pub mod route;
pub mod rules;
pub mod sharing;

pub use digest::{Algorithm, Digest, DigestError, DigestHasher};
pub use error::{error_body, ErrorCode, RouteError};
pub use hosts::canonical_registry;
pub use manifest::{Child, ChildKind};
pub use media::{
    accepts, is_index, manifest_media_type, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_V1,
    DOCKER_MANIFEST_V1_SIGNED, DOCKER_MANIFEST_V2, OCI_INDEX, OCI_MANIFEST,
};
pub use name::RepoName;
pub use reference::{ImageRef, ReferenceError};
pub use route::{parse, Reference, Route};
