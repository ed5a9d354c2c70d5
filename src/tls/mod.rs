//! TLS: regcache's certificate authority, the leaf certificates it mints for
//! intercepted hosts, the trust used for upstream connections, and the
//! mutual TLS between the nodes of a cluster.

pub mod ca;
pub mod client;
pub mod mint;
pub mod peer;
pub mod sni;

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
    /// A key file is readable by other users, or unreadable.
    #[error(transparent)]
    Key(#[from] crate::config::secret::SecretFileError),
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

/// The crypto provider used everywhere: ring, with AES-128-GCM preferred
/// over AES-256-GCM (as Go's crypto/tls does on machines with AES hardware;
/// about a third less work per byte) and ChaCha20 last. As a server regcache
/// still follows the client's order; this order is what it offers upstream.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite_rank(suite.suite()));
    std::sync::Arc::new(provider)
}

fn suite_rank(suite: rustls::CipherSuite) -> u8 {
    use rustls::CipherSuite as S;
    match suite {
        S::TLS13_AES_128_GCM_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        S::TLS13_AES_256_GCM_SHA384
        | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        _ => 2,
    }
}

/// A TLS server configuration (ALPN h2, http/1.1) from an operator's PEM
/// certificate chain and private key (which must not be readable by others).
pub fn server_config_from_files(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    crate::config::secret::check_private(key)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_is_offered_first_and_nothing_is_dropped() {
        let ours = provider();
        let default = rustls::crypto::ring::default_provider();
        assert_eq!(ours.cipher_suites.len(), default.cipher_suites.len());
        assert_eq!(
            ours.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        let ranks: Vec<u8> = ours
            .cipher_suites
            .iter()
            .map(|s| suite_rank(s.suite()))
            .collect();
        assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{ranks:?}");
    }
}
