//! The certificate authority that signs regcache's leaf certificates.
//!
//! By default regcache keeps its own CA in `ca_dir` (`certs/`): on first start
//! it generates an ECDSA P-256 key and a self-signed CA certificate valid for
//! ten years, writing the key with mode 0600 before any byte of it is stored.
//! An organisation can bring its own CA with `ca_cert`/`ca_key` instead; then
//! regcache only reads. A key file readable by other users is refused.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use super::TlsError;
use crate::config::secret::check_private;
use crate::config::CaSource;

/// File name of the CA certificate inside `ca_dir`.
pub const CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside `ca_dir`.
pub const KEY_FILE: &str = "ca.key";

/// A loaded CA: its certificate, to hand out, and its key, to sign leaves.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    cert_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads the configured CA, creating regcache's own on first start.
    pub fn load_or_create(source: &CaSource) -> Result<Self, TlsError> {
        match source {
            CaSource::Files { cert, key } => Self::load(cert, key),
            CaSource::Dir(dir) => {
                let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
                match (cert.exists(), key.exists()) {
                    (true, true) => Self::load(&cert, &key),
                    (false, false) => Self::create(dir),
                    (true, false) => Err(TlsError::HalfCa {
                        present: cert,
                        missing: key,
                    }),
                    (false, true) => Err(TlsError::HalfCa {
                        present: key,
                        missing: cert,
                    }),
                }
            }
        }
    }

    /// Generates a new CA in `dir`, replacing any there.
    ///
    /// Both files are written under temporary names and renamed into place,
    /// key first, so a crash never leaves a certificate without its key.
    pub fn create(dir: &Path) -> Result<Self, TlsError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TlsError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
            TlsError::Sign {
                subject: "regcache CA".into(),
                source,
            }
        })?;
        let params = ca_params()?;
        let cert = params.self_signed(&key).map_err(|source| TlsError::Sign {
            subject: "regcache CA".into(),
            source,
        })?;

        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        let (cert_tmp, key_tmp) = (dir.join(".ca.crt.tmp"), dir.join(".ca.key.tmp"));
        write_new(&key_tmp, key.serialize_pem().as_bytes(), 0o600).map_err(io(&key_tmp))?;
        write_new(&cert_tmp, cert.pem().as_bytes(), 0o644).map_err(io(&cert_tmp))?;
        fs::rename(&key_tmp, &key_path).map_err(io(&key_path))?;
        fs::rename(&cert_tmp, &cert_path).map_err(io(&cert_path))?;
        tracing::info!(cert = %cert_path.display(), "created a new regcache CA");
        Self::load(&cert_path, &key_path)
    }

    /// Loads a CA from a PEM certificate and a PEM (PKCS#8) private key.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        check_private(key_path)?;
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|source| TlsError::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| TlsError::Pem {
                path: cert_path.to_path_buf(),
                message: format!("no PEM certificate found ({e})"),
            })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Pem {
            path: key_path.to_path_buf(),
            message: format!(
                "not a usable PKCS#8 private key ({e}); convert with: \
                 openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pkcs8"
            ),
        })?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| TlsError::Pem {
            path: cert_path.to_path_buf(),
            message: format!("not a usable CA certificate ({e})"),
        })?;
        Ok(Self {
            cert_pem,
            cert_der,
            cert_path: cert_path.to_path_buf(),
            issuer,
        })
    }

    /// The CA certificate in PEM, as served at `/ca.crt`.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate in DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Where the CA certificate was read from.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The issuer that signs leaf certificates.
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

/// Parameters of a new regcache CA: CA:TRUE (path length 0), keyCertSign,
/// about ten years.
fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "regcache");
    let host = fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let cn = if host.is_empty() {
        "regcache CA".to_string()
    } else {
        format!("regcache CA ({host})")
    };
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(3650);
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

/// A random, positive 128-bit certificate serial number.
pub(crate) fn random_serial() -> Result<SerialNumber, TlsError> {
    let mut bytes = [0u8; 16];
    super::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| TlsError::Rustls(rustls::Error::FailedToGetRandomBytes))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Creates `path` (which must not exist) with `mode` from the first byte on.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_a_private_key_and_reloads_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(&CaSource::Dir(dir.path().into())).unwrap();
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again =
            CertificateAuthority::load_or_create(&CaSource::Dir(dir.path().into())).unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());
    }

    #[test]
    fn refuses_a_world_readable_key() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::create(dir.path()).unwrap();
        let key = dir.path().join(KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = CertificateAuthority::load_or_create(&CaSource::Dir(dir.path().into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn refuses_half_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::create(dir.path()).unwrap();
        fs::remove_file(dir.path().join(CERT_FILE)).unwrap();
        let err =
            CertificateAuthority::load_or_create(&CaSource::Dir(dir.path().into())).unwrap_err();
        assert!(matches!(err, TlsError::HalfCa { .. }), "{err}");
    }
}
