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

/// A TLS server configuration (ALPN h2, http/1.1) from an operator's PEM
/// certificate chain and private key (which must not be readable by others).
pub fn server_config_from_files(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    ca::check_private(key)?;
    let chain = read_certificates(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
        path: key.to_path_buf(),
        message: format!("no usable private key ({e})"),
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(std::sync::Arc::new(config))
}

/// The certificates of a PEM file; an error if there are none.
pub fn read_certificates(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            message: format!("cannot read certificates ({e})"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            message: "contains no PEM certificate".into(),
        });
    }
    Ok(certs)
}
