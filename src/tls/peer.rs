//! Mutual TLS between the nodes of a cluster (the peer endpoint).
//!
//! Every node of a cluster holds the same regcache CA (clients trust that
//! one CA), so holding its key is what makes a node a member. At start a
//! node mints, with that CA, one certificate for [`PEER_NAME`] with both
//! `serverAuth` and `clientAuth`, and presents it on both ends: the peer
//! endpoint asks every client for a certificate chaining to the CA, and
//! the caller checks the endpoint's. A certificate of the CA for another
//! name (the leaves minted for intercepted hosts are `serverAuth` only,
//! and their key never leaves regcache) is refused, and so is one of any
//! other CA.

use std::sync::Arc;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use time::{Duration, OffsetDateTime};

use super::ca::random_serial;
use super::{CertificateAuthority, TlsError};

/// The name in every node's peer certificate, and the one a caller asks
/// for, whatever address it dials (`.invalid`: no public CA issues it).
pub const PEER_NAME: &str = "regcache-peer.invalid";

/// How long a node's peer certificate is valid (minted again at each
/// start).
const PEER_VALIDITY: Duration = Duration::days(365);

/// Both ends of this node's peer TLS.
pub struct PeerTls {
    /// For the peer endpoint: this node's certificate, a client
    /// certificate of the CA required.
    pub server: Arc<ServerConfig>,
    /// For calls to other nodes: their certificate must be the CA's, for
    /// [`PEER_NAME`]; this node's presented.
    pub client: Arc<ClientConfig>,
    /// This node's peer certificate.
    pub certificate: CertificateDer<'static>,
}

impl PeerTls {
    /// Mints this node's peer certificate with `ca`.
    pub fn new(ca: &CertificateAuthority) -> Result<Self, TlsError> {
        let sign_err = |source| TlsError::Sign {
            subject: PEER_NAME.to_string(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::DnsName(PEER_NAME.try_into().map_err(sign_err)?)];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, PEER_NAME);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + PEER_VALIDITY;
        let cert = params.signed_by(&key, ca.issuer()).map_err(sign_err)?;
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        let private = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));

        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone())?;
        let roots = Arc::new(roots);
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), super::provider())
                .build()
                .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        let mut server = ServerConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), private())?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut client = ClientConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private())?;
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
            certificate: cert.der().clone(),
        })
    }
}

/// The name a caller verifies the peer endpoint's certificate against.
pub fn peer_server_name() -> ServerName<'static> {
    ServerName::DnsName(
        rustls::pki_types::DnsName::try_from(PEER_NAME)
            .expect("PEER_NAME is a DNS name")
            .to_owned(),
    )
}

/// Whether the client certificate an endpoint received is a peer's (for
/// [`PEER_NAME`]); its chain to the CA was verified in the handshake.
pub fn is_peer_certificate(cert: &CertificateDer<'_>) -> bool {
    rustls::server::ParsedCertificate::try_from(cert)
        .and_then(|parsed| rustls::client::verify_server_name(&parsed, &peer_server_name()))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_certificate_names_the_peer_and_another_of_the_ca_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::create(dir.path()).unwrap();
        let tls = PeerTls::new(&ca).unwrap();
        assert!(is_peer_certificate(&tls.certificate));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let other = CertificateParams::new(vec!["registry.test".to_string()])
            .unwrap()
            .signed_by(&key, ca.issuer())
            .unwrap();
        assert!(!is_peer_certificate(other.der()));
        assert!(!is_peer_certificate(&CertificateDer::from(vec![0u8; 16])));
    }
}
