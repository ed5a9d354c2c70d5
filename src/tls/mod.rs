//! TLS: regcache's certificate authority, the leaf certificates it mints for
//! intercepted hosts, and the trust used for upstream connections.

pub mod ca;
pub mod client;
pub mod mint;

use std::path::PathBuf;

pub use ca::CertificateAuthority;
pub use mint::LeafMinter;

/// A TLS set-up problem, with the file or host it concerns.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// A key file is readable by other users.
    #[error("{path} is readable by other users (mode {mode:o}); run: chmod 600 {path}")]
    KeyExposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {message}")]
    Pem {
        /// The file concerned.
        path: PathBuf,
        /// What is missing or wrong.
        message: String,
    },
    /// Only one of ca.crt and ca.key exists in the CA directory.
    #[error("{present} exists but {missing} does not; restore it, or replace both with `regcache ca init --force`")]
    HalfCa {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// Certificate generation or signing failed.
    #[error("certificate for {subject}: {source}")]
    Sign {
        /// The certificate's subject.
        subject: String,
        /// rcgen's reason.
        source: rcgen::Error,
    },
    /// rustls refused a configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider used everywhere (ring).
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
