//! TLS for the in-process servers and the clients.
//!
//! * [`TestCa`]: a throw-away certificate authority (rcgen) that signs the
//!   in-process servers' certificates; its PEM goes to regcache as
//!   `--upstream-ca`. [`TestCa::acceptor`] is a server's TLS config.
//! * [`serve`]: the one accept loop of every in-process server (the
//!   [`upstream`](super::upstream) and the [`registry`](super::registry)):
//!   TLS, plain HTTP, or both on one port, HTTP/2 when ALPN chose it.
//! * The client side: [`connect_tunnel`] opens a CONNECT tunnel through the
//!   proxy, [`tls_connect`] speaks TLS through it trusting only the roots it
//!   is given, and [`sans`] and [`issuer_subject`] read the certificate that
//!   came back.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::http::{parse_status, RespBody};
use super::{within, STEP_TIMEOUT};

/// rustls' ring provider, for every config the tests build.
fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// All certificates in a PEM file's bytes.
pub fn certs_from_pem(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .expect("PEM with certificates")
}

// ---------------------------------------------------------------------------
// A test certificate authority
// ---------------------------------------------------------------------------

/// A certificate authority of this test run (the upstream's, not regcache's).
pub struct TestCa {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA certificate, DER.
    pub cert_der: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A leaf certificate and its key.
struct Leaf {
    cert_der: CertificateDer<'static>,
    key_der: PrivatePkcs8KeyDer<'static>,
}

impl TestCa {
    /// A fresh CA with its own key.
    fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "regcache tests upstream CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// Issue a server certificate for `names` (DNS names or IP addresses).
    fn issue(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0].clone());
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_der: cert.der().clone(),
            key_der: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }

    /// A server's TLS config with a certificate from this CA for `names`,
    /// offering `alpn` (e.g. `[b"h2", b"http/1.1"]`), and that certificate.
    pub fn acceptor(
        &self,
        names: &[&str],
        alpn: &[&[u8]],
    ) -> (TlsAcceptor, CertificateDer<'static>) {
        let leaf = self.issue(names);
        let mut cfg = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.cert_der.clone()],
                PrivateKeyDer::Pkcs8(leaf.key_der),
            )
            .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        (TlsAcceptor::from(Arc::new(cfg)), leaf.cert_der)
    }

    /// A fresh CA, a new temp dir, and the CA's PEM file in it.
    pub fn in_temp_dir() -> (TestCa, PathBuf, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let ca_file = ca.write_pem(dir.path());
        (ca, ca_file, dir)
    }

    /// Write the CA certificate as PEM into `dir` and return the path.
    fn write_pem(&self, dir: &Path) -> PathBuf {
        let path = dir.join("upstream-ca.pem");
        std::fs::write(&path, &self.cert_pem).unwrap();
        path
    }
}

// ---------------------------------------------------------------------------
// The accept loop of the in-process servers
// ---------------------------------------------------------------------------

/// How [`serve`] speaks on the connections it accepts.
#[derive(Clone)]
pub enum Accept {
    /// Plain HTTP/1.1.
    Plain,
    /// TLS, then HTTP/2 when ALPN chose h2 and HTTP/1.1 otherwise.
    Tls(TlsAcceptor),
    /// TLS for a connection that starts with a TLS handshake record, plain
    /// HTTP/1.1 for any other: a plain-http twin on the same port.
    TlsOrPlain(TlsAcceptor),
}

/// What the connection a request came on was.
#[derive(Clone, Debug, Default)]
pub struct Conn {
    /// Whether it spoke TLS.
    pub tls: bool,
    /// The SNI the client sent (TLS only).
    pub sni: Option<String>,
    /// The ALPN protocol negotiated (TLS only).
    pub alpn: Option<String>,
}

/// Serves every connection `listener` accepts with `handle` until the
/// returned task is aborted; aborting it ends every connection too.
pub fn serve<H, F>(listener: TcpListener, accept: Accept, handle: H) -> JoinHandle<()>
where
    H: Fn(Arc<Conn>, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<RespBody>> + Send + 'static,
{
    tokio::spawn(async move {
        // Connections live in the set: aborting this task ends them all.
        let mut conns = JoinSet::new();
        loop {
            let (tcp, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(_) => continue,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            };
            conns.spawn(serve_connection(tcp, accept.clone(), handle.clone()));
        }
    })
}

async fn serve_connection<H, F>(tcp: TcpStream, accept: Accept, handle: H)
where
    H: Fn(Arc<Conn>, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<RespBody>> + Send + 'static,
{
    let acceptor = match accept {
        Accept::Plain => None,
        Accept::Tls(a) => Some(a),
        Accept::TlsOrPlain(a) => {
            let mut first = [0u8; 1];
            // 0x16: a TLS handshake record.
            let tls = !tcp.peek(&mut first).await.is_ok_and(|n| n == 1) || first[0] == 0x16;
            tls.then_some(a)
        }
    };
    let service = |conn: Conn| {
        let conn = Arc::new(conn);
        service_fn(move |req| {
            let answer = handle(conn.clone(), req);
            async move { Ok::<_, Infallible>(answer.await) }
        })
    };
    let Some(acceptor) = acceptor else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tcp), service(Conn::default()))
            .await;
        return;
    };
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    let session = tls.get_ref().1;
    let conn = Conn {
        tls: true,
        sni: session.server_name().map(str::to_owned),
        alpn: session
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
    };
    if conn.alpn.as_deref() == Some("h2") {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tls), service(conn))
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tls), service(conn))
            .await;
    }
}

// ---------------------------------------------------------------------------
// The client side: CONNECT, TLS, the certificate that came back
// ---------------------------------------------------------------------------

/// A CONNECT the proxy did not answer with `HTTP/1.1 200`.
#[derive(Debug)]
pub struct Refused {
    /// The answer's status (0 when the proxy closed or answered garbage).
    pub status: u16,
    /// The response head, as far as it arrived.
    pub head: String,
}

/// Send `CONNECT target` and read the response head. On 200 the stream is
/// positioned at the first tunnelled byte; otherwise Err(status) (0 if the
/// proxy closed or answered garbage).
pub async fn connect_tunnel(proxy: SocketAddr, target: &str) -> Result<TcpStream, u16> {
    connect_tunnel_as(proxy, target, None)
        .await
        .map_err(|r| r.status)
}

/// [`connect_tunnel`] with `Proxy-Authorization: proxy_auth` when given; a
/// refusal keeps the head the proxy sent.
pub async fn connect_tunnel_as(
    proxy: SocketAddr,
    target: &str,
    proxy_auth: Option<&str>,
) -> Result<TcpStream, Refused> {
    let refused = |head: &[u8]| {
        let head = String::from_utf8_lossy(head).into_owned();
        Refused {
            status: parse_status(&head),
            head,
        }
    };
    let Ok(mut s) = TcpStream::connect(proxy).await else {
        return Err(refused(b""));
    };
    let auth = proxy_auth
        .map(|a| format!("Proxy-Authorization: {a}\r\n"))
        .unwrap_or_default();
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return Err(refused(b""));
    }
    // Read byte by byte so nothing after the head is consumed.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut b).await {
                Ok(1) => head.push(b[0]),
                _ => return false,
            }
            if head.len() > 64 * 1024 {
                return false;
            }
        }
        true
    };
    let complete = within("reading the CONNECT response", STEP_TIMEOUT, read).await;
    if complete && head.starts_with(b"HTTP/1.1 200") {
        Ok(s)
    } else {
        Err(refused(&head))
    }
}

/// What to offer in ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// `h2` only.
    H2,
    /// `http/1.1` only.
    Http11,
    /// `h2` and `http/1.1`, as docker and containerd do.
    Both,
    /// No ALPN extension at all.
    None,
}

impl Alpn {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::H2 => vec![b"h2".to_vec()],
            Alpn::Http11 => vec![b"http/1.1".to_vec()],
            Alpn::Both => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Alpn::None => vec![],
        }
    }
}

/// A client TLS stream over TCP.
pub type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// TLS over `stream`, verifying the server as `name` against ONLY `roots`.
pub async fn tls_connect(
    stream: TcpStream,
    name: &str,
    roots: Vec<CertificateDer<'static>>,
    alpn: Alpn,
    sni: bool,
) -> Result<ClientTls, std::io::Error> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r).expect("root certificate");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.protocols();
    cfg.enable_sni = sni;
    let server_name = ServerName::try_from(name.to_owned()).expect("server name");
    let connector = TlsConnector::from(Arc::new(cfg));
    within(
        "TLS handshake",
        STEP_TIMEOUT,
        connector.connect(server_name, stream),
    )
    .await
}

/// The leaf certificate the server presented.
pub fn peer_leaf(tls: &ClientTls) -> CertificateDer<'static> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server sent a certificate")
        .clone()
}

/// The ALPN protocol the server chose, if any.
pub fn negotiated_alpn(tls: &ClientTls) -> Option<String> {
    tls.get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
}
/// Parse a DER certificate and return its DNS and IP subject alt names.
pub fn sans(der: &[u8]) -> (Vec<String>, Vec<std::net::IpAddr>) {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse certificate");
    let mut dns = vec![];
    let mut ips = vec![];
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(b) if b.len() == 4 => {
                    ips.push(std::net::IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()))
                }
                GeneralName::IPAddress(b) if b.len() == 16 => {
                    ips.push(std::net::IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()))
                }
                _ => {}
            }
        }
    }
    (dns, ips)
}

/// Issuer and subject of a DER certificate, as strings.
pub fn issuer_subject(der: &[u8]) -> (String, String) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse certificate");
    (cert.issuer().to_string(), cert.subject().to_string())
}
