//! The peer endpoint between nodes (`peer_listen`), on a real S3 server
//! (SeaweedFS): a blob one node is fetching for the cluster streams to the
//! clients of the other nodes while it arrives, before anything is in the
//! shared tier; the endpoint answers only a node of the cluster (a
//! certificate of the cluster's CA for the peer name); a fetcher killed
//! while others stream from it leaves them a clean error, and the retry
//! gets the right bytes.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{Method, Response, StatusCode};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::shared::{pull, put_held_blob};
use crate::support::free_port;
use crate::support::http::read_response;
use crate::support::proxy::{Env, Proxy};
use crate::support::registry::{blob_path, ACCEPT_ALL, HUB};
use crate::support::s3::Seaweed;
use crate::support::tls::Alpn;
use crate::support::{within, STEP_TIMEOUT};

/// The name in every node's peer certificate.
const PEER_NAME: &str = "regcache-peer.invalid";

/// A node of the cluster on `prefix` with a peer endpoint on 127.0.0.1.
async fn node(s3: &Seaweed, env: &Env, name: &str, prefix: &str) -> (Proxy, String) {
    let peer = format!("127.0.0.1:{}", free_port());
    let proxy = s3
        .node(env.proxy_on(&env.path(name)), prefix)
        .args(["--peer-listen", &peer])
        .start()
        .await;
    assert!(
        proxy.stderr().contains("peer endpoint for the other nodes"),
        "{}",
        proxy.stderr()
    );
    (proxy, peer)
}

/// Starts a GET of `path` through `proxy` and returns the response head.
async fn start_get(proxy: &Proxy, path: &str) -> Response<Incoming> {
    let mut client = proxy.intercepted(HUB, Alpn::Http11).await;
    let req = client.request(Method::GET, path, &[("accept", ACCEPT_ALL)]);
    let resp = client.send(req).await;
    // The connection lives in its own task; the body outlives the client.
    drop(client);
    resp
}

/// Reads `body` until at least `n` bytes came (or it ended).
async fn read_at_least(body: &mut Incoming, got: &mut BytesMut, n: usize) {
    while got.len() < n {
        match within("a body frame", STEP_TIMEOUT, body.frame()).await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    got.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => panic!("the body failed after {} bytes: {e}", got.len()),
            None => return,
        }
    }
}

/// Reads the rest of `body`; Err when it ends with an error.
async fn read_rest(mut body: Incoming, mut got: BytesMut) -> Result<Bytes, (usize, String)> {
    loop {
        match within("a body frame", STEP_TIMEOUT, body.frame()).await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    got.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => return Err((got.len(), e.to_string())),
            None => return Ok(got.freeze()),
        }
    }
}

/// One of regcache's own pages on the proxy port, as text.
async fn page(proxy: &Proxy, path: &str) -> String {
    let mut client = crate::support::http::HttpClient::plain_h1(proxy.addr, "127.0.0.1").await;
    read_response(client.get(path).await).await.text()
}

fn header(resp: &Response<Incoming>, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn a_blob_being_fetched_streams_to_the_other_nodes_from_the_fetcher() {
    let s3 = Seaweed::start("regcache-peer");
    let env = Env::new().await;
    let repo = "library/big";
    // Upstream sends 512 KiB of the 2 MiB, then holds the rest.
    let (digest, data) = put_held_blob(&env, repo, 80);
    let path = blob_path(repo, &digest);
    let (a, _) = node(&s3, &env, "a", "p").await;
    let (b, _) = node(&s3, &env, "b", "p").await;
    let (c, _) = node(&s3, &env, "c", "p").await;

    let a_client = start_get(&a, &path).await;
    env.reg.wait_count(Method::GET, &path, 1).await;
    // While A's fetch is held upstream (nothing can be in the tier), the
    // clients of B and C get its first bytes from A.
    let mut streaming = Vec::new();
    for (name, node) in [("B", &b), ("C", &c)] {
        let resp = start_get(node, &path).await;
        assert_eq!(resp.status(), StatusCode::OK, "{name}: {}", node.stderr());
        assert_eq!(header(&resp, "x-cache"), "PEER", "{name}");
        let mut body = resp.into_body();
        let mut got = BytesMut::new();
        read_at_least(&mut body, &mut got, 256 * 1024).await;
        assert!(got.len() >= 256 * 1024, "{name} got {} bytes", got.len());
        streaming.push((name, body, got));
    }
    assert_eq!(
        s3.object("p", &digest).await,
        None,
        "the tier has nothing yet: those bytes came from A"
    );
    env.reg.open_gate();
    for (name, body, got) in streaming {
        let all = read_rest(body, got)
            .await
            .unwrap_or_else(|(n, e)| panic!("{name}'s client: cut after {n} bytes: {e}"));
        assert!(all == data, "{name}'s client got other bytes");
    }
    let a_all = read_rest(a_client.into_body(), BytesMut::new()).await;
    assert!(a_all.is_ok_and(|all| all == data), "A's own client");
    assert_eq!(
        env.reg.count(Method::GET, &path),
        1,
        "one upstream GET for the cluster: {:?}",
        env.reg.summary()
    );
    // B and C stored it: from their own caches now.
    for node in [&b, &c] {
        pull(node, &path, None)
            .await
            .assert_served(&data, "HIT", "again");
    }
    for node in [&b, &c] {
        let stats = page(node, "/api/v1/stats").await;
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        assert_eq!(stats["shared"]["from_peers"], 1, "{stats}");
    }
    let metrics = page(&a, "/metrics").await;
    assert!(
        metrics.contains("regcache_peer_requests_total{role=\"served\",result=\"ok\"} 2"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("peer"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn a_fetcher_killed_while_others_stream_from_it_leaves_a_clean_error_then_the_right_bytes() {
    let s3 = Seaweed::start("regcache-peerkill");
    let env = Env::new().await;
    let repo = "library/big";
    let (digest, data) = put_held_blob(&env, repo, 90);
    let path = blob_path(repo, &digest);
    let (a, _) = node(&s3, &env, "a", "k").await;
    let (b, _) = node(&s3, &env, "b", "k").await;

    let _a_client = start_get(&a, &path).await;
    env.reg.wait_count(Method::GET, &path, 1).await;
    let resp = start_get(&b, &path).await;
    assert_eq!(header(&resp, "x-cache"), "PEER");
    let mut body = resp.into_body();
    let mut got = BytesMut::new();
    read_at_least(&mut body, &mut got, 256 * 1024).await;
    // A dies with the lease held and the stream to B half sent.
    crate::support::send_signal(a.pid(), crate::support::Signal::KILL);
    let cut = read_rest(body, got).await;
    assert!(
        cut.is_err(),
        "B's client must see an error, never a short body completed"
    );
    env.reg.open_gate();
    // The retry: A's lease expires, B takes the fetch over.
    let again = pull(&b, &path, None).await;
    again.assert_content(&Method::GET, &data, "B's client, retrying");
    s3.wait_object("k", &digest, &data).await;
}

/// A certificate (and key) for `name` with `clientAuth`, signed by `issuer`.
fn client_cert(
    name: &str,
    issuer: &Issuer<'_, KeyPair>,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, issuer).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (cert.der().clone(), key)
}

/// `GET path` on the peer endpoint at `addr`, trusting `ca`, presenting
/// `cert` if given: the status line's code, or None when no HTTP answer
/// came (the handshake or the connection was refused).
async fn peer_get(
    addr: &str,
    ca: &CertificateDer<'static>,
    cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    path: &str,
) -> Option<(u16, Vec<u8>)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match cert {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(PEER_NAME).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = within("peer TLS", STEP_TIMEOUT, connector.connect(name, tcp))
        .await
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    let read = within("peer answer", STEP_TIMEOUT, tls.read_to_end(&mut out)).await;
    if read.is_err() && out.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&out);
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| out[at + 4..].to_vec())
        .unwrap_or_default();
    Some((code, body))
}

#[tokio::test]
async fn the_peer_endpoint_answers_only_the_nodes_of_the_cluster() {
    let s3 = Seaweed::start("regcache-peerauth");
    let env = Env::new().await;
    let repo = "library/big";
    let (digest, data) = put_held_blob(&env, repo, 100);
    env.reg.open_gate();
    let path = blob_path(repo, &digest);
    let (a, peer) = node(&s3, &env, "a", "x").await;
    pull(&a, &path, None)
        .await
        .assert_served(&data, "MISS", "A fetches it");
    let blob = format!("/peer/v1/blobs/{digest}");

    // The cluster's CA, as every node holds it.
    let ca_dir = env.path("ca");
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.crt")).unwrap();
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let ca = a.ca_der();
    let cluster = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();

    // A node's certificate: served, by digest only.
    let member = || Some(client_cert(PEER_NAME, &cluster));
    let got = peer_get(&peer, &ca, member(), &blob).await;
    assert!(
        got.as_ref()
            .is_some_and(|(code, body)| *code == 200 && body == &data[..]),
        "a node of the cluster: {:?}",
        got.map(|(c, b)| (c, b.len()))
    );
    let unknown = format!("/peer/v1/blobs/sha256:{}", "0".repeat(64));
    assert_eq!(
        peer_get(&peer, &ca, member(), &unknown).await.map(|g| g.0),
        Some(404)
    );
    for hostile in [
        "/peer/v1/blobs/../../ca.key",
        "/v2/",
        "/metrics",
        "/peer/v1/blobs/sha256:zz",
    ] {
        assert_eq!(
            peer_get(&peer, &ca, member(), hostile).await.map(|g| g.0),
            Some(404),
            "{hostile}"
        );
    }

    // No client certificate, one of another CA, or one of the cluster's
    // CA for another name: no HTTP answer at all.
    let mut other_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    other_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let other_key = KeyPair::generate().unwrap();
    let other = Issuer::new(other_params, other_key);
    let strangers = [
        ("no certificate", None),
        ("another CA's", Some(client_cert(PEER_NAME, &other))),
        (
            "the CA's, for another name",
            Some(client_cert("node.test", &cluster)),
        ),
    ];
    for (what, cert) in strangers {
        let got = peer_get(&peer, &ca, cert, &blob).await;
        assert!(got.is_none(), "{what}: answered {:?}", got.map(|g| g.0));
    }
}
