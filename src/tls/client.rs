//! Trust for upstream connections: the system store, the Mozilla roots
//! (webpki-roots, so a minimal container image still verifies), and any
//! `upstream_ca` files. Upstream certificates are always verified.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};

use super::TlsError;

/// Builds the root store from the system, the Mozilla roots and `extra` files.
pub fn root_store(extra: &[PathBuf]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    for err in &native.errors {
        tracing::debug!(error = %err, "skipping part of the system certificate store");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, "system roots loaded");
    for path in extra {
        for cert in super::read_certificates(path)? {
            roots.add(cert).map_err(|e| TlsError::Pem {
                path: path.clone(),
                message: format!("unusable certificate ({e})"),
            })?;
        }
    }
    Ok(roots)
}

/// The rustls client configuration for upstream connections (no ALPN yet:
/// the HTTP connector adds `h2` and `http/1.1`).
pub fn upstream_config(extra: &[PathBuf]) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(super::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(extra)?)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
