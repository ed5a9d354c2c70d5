//! Leaf certificates for intercepted hosts, minted on demand and kept in an LRU.
//!
//! Every leaf shares one ECDSA P-256 key generated at start-up (as mitmproxy
//! does): minting is then a single signature, well under a millisecond. Each
//! leaf has its own random serial number, the host as its only subject
//! alternative name (an IP SAN for addresses), and a validity of 30 days,
//! never beyond the CA's. What the cache holds is a ready rustls
//! [`ServerConfig`] per host, with ALPN `h2` and `http/1.1`.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;
use time::{Duration, OffsetDateTime};

use super::ca::random_serial;
use super::{CertificateAuthority, TlsError};

/// How long a minted leaf is valid.
const LEAF_VALIDITY: Duration = Duration::days(30);
/// A cached leaf is replaced this long before it expires.
const RENEW_BEFORE: Duration = Duration::days(1);

struct Minted {
    config: Arc<ServerConfig>,
    not_after: OffsetDateTime,
}

/// Mints and caches leaf certificates signed by the regcache CA.
pub struct LeafMinter {
    ca: Arc<CertificateAuthority>,
    leaf_key: KeyPair,
    cache: Mutex<LruCache<String, Minted>>,
}

impl LeafMinter {
    /// A minter keeping up to `capacity` hosts' certificates.
    pub fn new(ca: Arc<CertificateAuthority>, capacity: usize) -> Result<Self, TlsError> {
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
            TlsError::Sign {
                subject: "leaf key".into(),
                source,
            }
        })?;
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Ok(Self {
            ca,
            leaf_key,
            cache: Mutex::new(LruCache::new(capacity)),
        })
    }

    /// The TLS server configuration presenting a certificate for `host`.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, TlsError> {
        let host = crate::registry::hosts::normalize_host(host);
        let now = OffsetDateTime::now_utc();
        if let Some(minted) = self.lock().get(&host) {
            if minted.not_after - RENEW_BEFORE > now {
                return Ok(minted.config.clone());
            }
        }
        let minted = self.mint(&host, now)?;
        crate::metrics::get().certificate_minted();
        let config = minted.config.clone();
        self.lock().put(host, minted);
        Ok(config)
    }

    /// Number of hosts whose certificate is cached.
    pub fn cached(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<String, Minted>> {
        // A panic while holding this lock cannot leave the LRU inconsistent
        // for our use, so a poisoned lock is simply taken over.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mint(&self, host: &str, now: OffsetDateTime) -> Result<Minted, TlsError> {
        let sign_err = |source| TlsError::Sign {
            subject: host.to_string(),
            source,
        };
        let mut params = CertificateParams::default();
        let san = match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into().map_err(sign_err)?),
        };
        params.subject_alt_names = vec![san];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = now - Duration::hours(1);
        params.not_after = now + LEAF_VALIDITY;
        let cert = params
            .signed_by(&self.leaf_key, self.ca.issuer())
            .map_err(sign_err)?;

        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        let mut config = ServerConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Minted {
            config: Arc::new(config),
            not_after: params.not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minter(capacity: usize) -> (tempfile::TempDir, LeafMinter) {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(CertificateAuthority::create(dir.path()).unwrap());
        (dir, LeafMinter::new(ca, capacity).unwrap())
    }

    #[test]
    fn caches_per_host_and_evicts_least_recently_used() {
        let (_dir, m) = minter(2);
        let a = m.server_config("a.test").unwrap();
        let a2 = m.server_config("A.test.").unwrap();
        assert!(Arc::ptr_eq(&a, &a2));
        m.server_config("b.test").unwrap();
        m.server_config("a.test").unwrap();
        m.server_config("c.test").unwrap();
        assert_eq!(m.cached(), 2);
        let a3 = m.server_config("a.test").unwrap();
        assert!(Arc::ptr_eq(&a, &a3), "a was recently used and must survive");
    }

    #[test]
    fn offers_h2_and_http11() {
        let (_dir, m) = minter(4);
        let c = m.server_config("127.0.0.1").unwrap();
        assert_eq!(c.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    }
}
