//! Origins (issue 10, items 2 to 4): the scheme is part of a registry's
//! identity, every way in goes through one policy, and a client's credential
//! goes only to the origin it was meant for.
//!
//! The upstream is the in-process registry with a plain-http twin on the
//! same port ([`Env::with_twin`]): with
//! `--resolve registry-1.docker.io=127.0.0.1:PORT`, `https://` reaches the
//! real registry and `http://` (port 80) reaches the twin, which plays
//! whoever answers plain HTTP on the path. Internal services are in-process
//! registries on `127.0.0.12`. Each test shows one attack from the issue
//! failing, and checks what the twin or the internal service received.

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Response, StatusCode};
use regcache::registry::media::OCI_MANIFEST;

use crate::support::auth::{Auth, Mode};
use crate::support::http::{basic, contains, read_response, Got, HttpClient};
use crate::support::pattern::blob_bytes;
use crate::support::proxy::{Env, Proxy, ProxyBuilder};
use crate::support::registry::{oci_manifest, sha256, Answer, Fault, Registry, HUB};
use crate::support::tls::{tls_connect, Alpn};
use crate::support::{within, STEP_TIMEOUT};

const ALICE_PW: &str = "alice-pw-Qr8sT2";

/// An image: config and one layer, and its manifest.
struct Image {
    manifest: Bytes,
    digest: String,
    blobs: Vec<Bytes>,
}

impl Image {
    fn new(seed: u64) -> Image {
        let config = Bytes::from(format!("{{\"os\":\"linux\",\"seed\":{seed}}}"));
        let layer = blob_bytes(seed, 20_000);
        let manifest = oci_manifest(&config, &[&layer]);
        Image {
            digest: sha256(&manifest),
            manifest,
            blobs: vec![config, layer],
        }
    }

    fn seed(&self, reg: &Registry, repo: &str, tag: &str) {
        reg.put_manifest(repo, Some(tag), OCI_MANIFEST, self.manifest.clone());
        for b in &self.blobs {
            reg.put_blob(repo, b.clone());
        }
    }

    fn layer_digest(&self) -> String {
        sha256(&self.blobs[1])
    }
}

/// Reads a response; a body that fails (wrong bytes from wherever regcache
/// was sent) reads as empty.
async fn read(resp: Response<Incoming>) -> Got {
    let mut got = read_response(resp).await;
    if got.error.is_some() {
        got.body = Bytes::new();
    }
    got
}

/// `GET path` inside `CONNECT host:port`, trusting only the regcache CA.
async fn https_get(
    proxy: &Proxy,
    host: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> Got {
    let tcp = proxy.tunnel(&format!("{host}:{port}")).await;
    let tls = tls_connect(tcp, host, vec![proxy.ca_der()], Alpn::Http11, true)
        .await
        .unwrap_or_else(|e| panic!("TLS to {host}: {e}; stderr:\n{}", proxy.stderr()));
    let mut client = HttpClient::over_tls(tls, host).await;
    let req = client.request(Method::GET, path, headers);
    read(client.send(req).await).await
}

/// An absolute-form request `GET url` on the proxy port.
async fn http_get(proxy: &Proxy, url: &str, headers: &[(&str, &str)]) -> Got {
    let uri: hyper::Uri = url.parse().unwrap();
    let host = uri.authority().unwrap().to_string();
    let mut client = HttpClient::plain_h1(proxy.addr, &host).await;
    let req = client.request(Method::GET, url, headers);
    read(client.send(req).await).await
}

/// An origin-form (mirror) request `GET path` on the proxy port.
async fn mirror_get(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut client = HttpClient::plain_h1(proxy.addr, "localhost").await;
    let req = client.request(Method::GET, path, headers);
    read(client.send(req).await).await
}

/// A twin that answers 200 to everything, as a hostile responder would.
fn answer_everything(twin: &Registry) {
    twin.set_hook(|_req| Some(Answer::json(200, vec![], "{}")));
}

// ---------------------------------------------------------------------------
// 2. A plain http:// request shares the cache identity of the HTTPS registry
// ---------------------------------------------------------------------------

#[tokio::test]
async fn plain_http_probe_cannot_make_a_private_repository_public() {
    let (env, twin) = Env::with_twin(&["plain.test"]).await;
    let auth = Auth::new(Mode::Basic);
    auth.user("alice", ALICE_PW, &["team/secret"]);
    env.reg.set_hook(auth.registry_hook());
    let image = Image::new(21);
    image.seed(&env.reg, "team/secret", "1");
    answer_everything(&twin);
    let proxy = env.regcache().start().await;

    // The attack: anonymous plain-http requests for the private repository,
    // as anyone may send them; the twin answers 200 to everything.
    let attack = http_get(
        &proxy,
        &format!("http://{HUB}/v2/team/secret/manifests/{}", image.digest),
        &[],
    )
    .await;

    // alice pulls through HTTPS with her credential: the cache now holds it.
    let alice = basic("alice", ALICE_PW);
    let manifest_path = format!("/v2/team/secret/manifests/{}", image.digest);
    let got = https_get(
        &proxy,
        HUB,
        443,
        &manifest_path,
        &[("authorization", &alice), ("accept", OCI_MANIFEST)],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "alice: {}", got.text());
    assert_eq!(got.body, image.manifest);
    let layer_path = format!("/v2/team/secret/blobs/{}", image.layer_digest());
    let got = https_get(&proxy, HUB, 443, &layer_path, &[("authorization", &alice)]).await;
    assert_eq!(got.status, StatusCode::OK);

    // Anonymous HTTPS and mirror clients still get the registry's answer.
    for (what, got) in [
        (
            "https manifest",
            https_get(
                &proxy,
                HUB,
                443,
                &manifest_path,
                &[("accept", OCI_MANIFEST)],
            )
            .await,
        ),
        (
            "https blob",
            https_get(&proxy, HUB, 443, &layer_path, &[]).await,
        ),
        (
            "mirror manifest",
            mirror_get(&proxy, &manifest_path, &[("accept", OCI_MANIFEST)]).await,
        ),
        ("mirror blob", mirror_get(&proxy, &layer_path, &[]).await),
    ] {
        assert_eq!(
            got.status,
            StatusCode::UNAUTHORIZED,
            "anonymous {what} after a plain-http probe: X-Cache {:?}, {}",
            got.header("x-cache"),
            got.text()
        );
        assert!(
            !contains(&got.body, &image.manifest) && !contains(&got.body, &image.blobs[1][..64])
        );
    }

    assert_eq!(attack.status, StatusCode::FORBIDDEN, "{}", attack.text());
    assert!(
        attack.text().contains("insecure_registries"),
        "{}",
        attack.text()
    );
    assert!(
        twin.seen().is_empty(),
        "the twin was asked: {:?}",
        twin.summary()
    );
    let log = proxy.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("refused") && l.contains("insecure_registries")),
        "no log line naming the rule:\n{log}"
    );
}

#[tokio::test]
async fn plain_http_cannot_poison_tags_for_https_and_mirror_clients() {
    let (env, twin) = Env::with_twin(&["plain.test"]).await;
    let real = Image::new(31);
    let poisoned = Image::new(666);
    real.seed(&env.reg, "library/alpine", "3.20");
    poisoned.seed(&twin, "library/alpine", "3.20");
    let proxy = env.regcache().start().await;

    let tag = "/v2/library/alpine/manifests/3.20";
    let attack = http_get(
        &proxy,
        &format!("http://{HUB}{tag}"),
        &[("accept", OCI_MANIFEST)],
    )
    .await;
    let attack_layer = http_get(
        &proxy,
        &format!(
            "http://{HUB}/v2/library/alpine/blobs/{}",
            poisoned.layer_digest()
        ),
        &[],
    )
    .await;

    let https = https_get(&proxy, HUB, 443, tag, &[("accept", OCI_MANIFEST)]).await;
    assert_eq!(https.status, StatusCode::OK, "{}", https.text());
    assert_eq!(
        https.body, real.manifest,
        "the HTTPS client got a poisoned tag"
    );
    assert_eq!(
        https.header("docker-content-digest"),
        Some(real.digest.clone())
    );
    for path in [
        "/v2/library/alpine/manifests/3.20",
        "/v2/alpine/manifests/3.20?ns=docker.io",
    ] {
        let mirror = mirror_get(&proxy, path, &[("accept", OCI_MANIFEST)]).await;
        assert_eq!(mirror.status, StatusCode::OK, "{path}: {}", mirror.text());
        assert_eq!(
            mirror.body, real.manifest,
            "{path}: the mirror client got a poisoned tag"
        );
    }
    let layer = https_get(
        &proxy,
        HUB,
        443,
        &format!("/v2/library/alpine/blobs/{}", poisoned.layer_digest()),
        &[],
    )
    .await;
    assert_eq!(
        layer.status,
        StatusCode::NOT_FOUND,
        "the attacker's layer is served over HTTPS"
    );

    for got in [&attack, &attack_layer] {
        assert_eq!(got.status, StatusCode::FORBIDDEN, "{}", got.text());
    }
    assert!(
        twin.seen().is_empty(),
        "the twin was asked: {:?}",
        twin.summary()
    );
}

// ---------------------------------------------------------------------------
// 3. The proxy is an open relay and reaches any port
// ---------------------------------------------------------------------------

#[tokio::test]
async fn absolute_form_and_mirror_reach_no_internal_service_and_no_other_port() {
    let (env, twin) = Env::with_twin(&["plain.test"]).await;
    answer_everything(&twin);
    // An internal service on another loopback address.
    let internal = Registry::start_plain_on("127.0.0.12:0").await;
    answer_everything(&internal);
    let port = internal.port();
    // quay.io on any port goes to the twin, were it reached.
    let proxy = env
        .proxy()
        .resolve("quay.io", env.reg.port())
        .args(["--other-hosts", "refuse"])
        .start()
        .await;
    let tunnel_proxy = env
        .regcache()
        .resolve("quay.io", env.reg.port())
        .start()
        .await;

    for proxy in [&proxy, &tunnel_proxy] {
        for url in [
            format!("http://127.0.0.12:{port}/admin"),
            "http://quay.io:5000/v2/".to_string(),
            "http://quay.io/v2/x/manifests/1".to_string(),
        ] {
            let got = http_get(proxy, &url, &[]).await;
            assert_eq!(got.status, StatusCode::FORBIDDEN, "{url}: {}", got.text());
        }
        for path in [
            "/v2/x/manifests/1?ns=quay.io:5000",
            "/v2/quay.io:5000/x/manifests/1",
            "/v2/x/manifests/1?ns=127.0.0.12:5000",
        ] {
            let got = mirror_get(proxy, path, &[]).await;
            assert_eq!(got.status, StatusCode::FORBIDDEN, "{path}: {}", got.text());
        }
    }
    assert!(
        internal.seen().is_empty(),
        "the internal service was reached: {:?}",
        internal.summary()
    );
    assert!(
        twin.seen().is_empty(),
        "quay.io's plain port was reached: {:?}",
        twin.summary()
    );
    let log = proxy.stderr();
    for rule in [
        "other_hosts",
        "insecure_registries",
        "connect_ports",
        "intercept",
    ] {
        assert!(log.contains(rule), "no log line names {rule}:\n{log}");
    }
    assert!(tunnel_proxy.stderr().contains("plain_http_port"));
}

// ---------------------------------------------------------------------------
// 3 and 4. Redirects: scheme, port, address, and the client's credential
// ---------------------------------------------------------------------------

#[tokio::test]
async fn redirect_to_plain_http_is_refused_and_carries_no_credential() {
    let (env, twin) = Env::with_twin(&["plain.test"]).await;
    let image = Image::new(41);
    image.seed(&env.reg, "library/alpine", "1");
    image.seed(&twin, "library/alpine", "1");
    let layer_path = format!("/v2/library/alpine/blobs/{}", image.layer_digest());
    // The same host, the same path, over plain http: the twin answers it.
    env.reg.set_fault(
        &layer_path,
        Fault {
            redirect: Some((302, format!("http://{HUB}{layer_path}"))),
            ..Fault::default()
        },
    );
    let proxy = env.regcache().start().await;

    let got = https_get(
        &proxy,
        HUB,
        443,
        &layer_path,
        &[
            ("authorization", "Bearer client-secret-token"),
            ("cookie", "session=s3cr3t"),
        ],
    )
    .await;
    let leaked: Vec<_> = twin
        .seen()
        .into_iter()
        .filter(|r| r.header("authorization").is_some() || r.header("cookie").is_some())
        .collect();
    assert!(
        leaked.is_empty(),
        "the credential went over plain http: {leaked:?}"
    );
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{}", got.text());
    assert!(got.text().contains("redirect_scheme"), "{}", got.text());
    assert!(twin.seen().is_empty(), "{:?}", twin.summary());
    assert!(
        proxy.stderr().contains("redirect_scheme"),
        "{}",
        proxy.stderr()
    );
}

#[tokio::test]
async fn redirects_to_internal_addresses_or_other_ports_are_refused() {
    let (env, _twin) = Env::with_twin(&["plain.test"]).await;
    let image = Image::new(51);
    image.seed(&env.reg, "library/alpine", "1");
    // An internal HTTPS service that would happily answer.
    let internal = Registry::start_tls_on(&env.ca, &["127.0.0.12"], "127.0.0.12:0").await;
    answer_everything(&internal);
    // Another service on the registry's own address, on a port CONNECT refuses.
    let other_port = Registry::start(&env.ca).await;
    answer_everything(&other_port);
    let config = sha256(&image.blobs[0]);
    let layer = image.layer_digest();
    let to_internal = format!("/v2/library/alpine/blobs/{config}");
    let to_port = format!("/v2/library/alpine/blobs/{layer}");
    env.reg.set_fault(
        &to_internal,
        Fault {
            redirect: Some((307, format!("https://127.0.0.12:{}/x", internal.port()))),
            ..Fault::default()
        },
    );
    env.reg.set_fault(
        &to_port,
        Fault {
            redirect: Some((307, format!("https://127.0.0.1:{}/x", other_port.port()))),
            ..Fault::default()
        },
    );
    // The internal port is allowed for CONNECT: only the address rule stops it.
    let proxy = env
        .proxy()
        .arg("--connect-ports")
        .arg(internal.port().to_string())
        .start()
        .await;

    for (path, rule) in [
        (&to_internal, "redirect_address"),
        (&to_port, "redirect_port"),
    ] {
        let got = https_get(&proxy, HUB, 443, path, &[("authorization", "Bearer t")]).await;
        assert_eq!(
            got.status,
            StatusCode::BAD_GATEWAY,
            "{path}: {}",
            got.text()
        );
        assert!(got.text().contains(rule), "{path}: {}", got.text());
        assert!(proxy.stderr().contains(rule), "no log line names {rule}");
    }
    assert!(
        internal.seen().is_empty(),
        "the internal service was reached: {:?}",
        internal.summary()
    );
    assert!(
        other_port.seen().is_empty(),
        "another port was reached: {:?}",
        other_port.summary()
    );
}

#[tokio::test]
async fn token_realms_at_internal_addresses_or_other_ports_are_not_asked() {
    let (env, _twin) = Env::with_twin(&["plain.test"]).await;
    let image = Image::new(55);
    image.seed(&env.reg, "library/alpine", "1");
    // Services a hostile registry would have regcache call: one on an
    // internal address (its port allowed for CONNECT, so only the address
    // rule stops it), one on a port CONNECT refuses, one over plain http.
    let internal = Registry::start_tls_on(&env.ca, &["127.0.0.12"], "127.0.0.12:0").await;
    answer_everything(&internal);
    let other_port = Registry::start(&env.ca).await;
    answer_everything(&other_port);
    let realms = [
        (
            format!("https://127.0.0.12:{}/token", internal.port()),
            "redirect_address",
        ),
        (
            format!("https://127.0.0.1:{}/token", other_port.port()),
            "realm_port",
        ),
        (
            format!("http://127.0.0.12:{}/token", internal.port()),
            "realm_scheme",
        ),
    ];
    let proxy = env
        .proxy()
        .arg("--connect-ports")
        .arg(internal.port().to_string())
        .start()
        .await;
    for (realm, rule) in &realms {
        let challenge = format!("Bearer realm=\"{realm}\",service=\"hub\"");
        env.reg.set_hook(move |req| {
            req.header("authorization").is_none().then(|| {
                Answer::error(
                    401,
                    &req.path,
                    vec![("www-authenticate".into(), challenge.clone())],
                )
            })
        });
        let got = https_get(&proxy, HUB, 443, "/v2/library/alpine/manifests/1", &[]).await;
        assert_eq!(
            got.status,
            StatusCode::UNAUTHORIZED,
            "{realm}: {}",
            got.text()
        );
        within(&format!("a log line naming {rule}"), STEP_TIMEOUT, async {
            while !proxy.stderr().contains(rule) {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    assert!(
        internal.seen().is_empty(),
        "the internal service was asked for a token: {:?}",
        internal.summary()
    );
    assert!(
        other_port.seen().is_empty(),
        "another port was asked for a token: {:?}",
        other_port.summary()
    );
}

#[tokio::test]
async fn redirect_to_another_port_of_the_same_host_drops_the_credential() {
    let (env, _twin) = Env::with_twin(&["plain.test"]).await;
    let image = Image::new(61);
    image.seed(&env.reg, "library/alpine", "1");
    let store = Registry::start(&env.ca).await;
    let layer_path = format!("/v2/library/alpine/blobs/{}", image.layer_digest());
    store.put_raw(
        "/store/layer",
        "application/octet-stream",
        image.blobs[1].clone(),
    );
    // ghcr.io on two ports: the registry's, and the store's.
    env.reg.set_fault(
        &layer_path,
        Fault {
            redirect: Some((307, format!("https://ghcr.io:{}/store/layer", store.port()))),
            ..Fault::default()
        },
    );
    let proxy = ProxyBuilder::new()
        .upstream_ca(&env.ca_file)
        .args(["--resolve", "ghcr.io=127.0.0.1"])
        .arg("--connect-ports")
        .arg(format!("{},{}", env.reg.port(), store.port()))
        .start()
        .await;

    let got = https_get(
        &proxy,
        "ghcr.io",
        env.reg.port(),
        &layer_path,
        &[("authorization", "Bearer t0k3n")],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(got.body, image.blobs[1]);
    let at_registry = env.reg.requests(&layer_path);
    assert_eq!(
        at_registry[0].header("authorization").as_deref(),
        Some("Bearer t0k3n")
    );
    // The GET, and perhaps regcache's own anonymous openness check (a HEAD).
    let at_store = store.requests("/store/layer");
    assert!(
        at_store.iter().any(|r| r.method == Method::GET),
        "{:?}",
        store.summary()
    );
    for r in &at_store {
        assert!(
            r.header("authorization").is_none(),
            "the credential went to another port: {:?}",
            r.header("authorization")
        );
    }
}

// ---------------------------------------------------------------------------
// 2. Insecure registries: opt-in, served over plain http, keyed apart
// ---------------------------------------------------------------------------

#[tokio::test]
async fn insecure_registry_is_served_over_plain_http_and_keyed_apart() {
    let (env, twin) = Env::with_twin(&["plain.test"]).await;
    // plain.test over https (the registry) and over http (the twin, now an
    // insecure registry of the same name) hold different images under one tag.
    let secure = Image::new(71);
    let insecure = Image::new(72);
    secure.seed(&env.reg, "library/app", "1");
    insecure.seed(&twin, "library/app", "1");
    let proxy = ProxyBuilder::new()
        .upstream_ca(&env.ca_file)
        .resolve("plain.test", env.reg.port())
        .intercept("plain.test")
        .arg("--insecure-registry")
        .arg("plain.test:80")
        .start()
        .await;

    let tag = "/v2/library/app/manifests/1";
    let layer = format!("/v2/library/app/blobs/{}", insecure.layer_digest());
    for (round, cache) in [("first", "MISS"), ("second", "HIT")] {
        let got = http_get(
            &proxy,
            &format!("http://plain.test{tag}"),
            &[("accept", OCI_MANIFEST)],
        )
        .await;
        assert_eq!(got.status, StatusCode::OK, "{round}: {}", got.text());
        assert_eq!(got.body, insecure.manifest, "{round}");
        let got = http_get(&proxy, &format!("http://plain.test{layer}"), &[]).await;
        assert_eq!(got.status, StatusCode::OK, "{round}: {}", got.text());
        assert_eq!(got.body, insecure.blobs[1], "{round}");
        assert_eq!(
            got.header("x-cache").as_deref(),
            Some(cache),
            "{round} blob"
        );
    }
    // The mirror reaches it under its host:port, from the same cache.
    let got = mirror_get(&proxy, &format!("{layer}?ns=plain.test:80"), &[]).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(got.header("x-cache").as_deref(), Some("HIT"));

    // The https registry of the same name shares none of it.
    let got = https_get(&proxy, "plain.test", 443, tag, &[("accept", OCI_MANIFEST)]).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(
        got.body, secure.manifest,
        "the https tag came from the insecure registry"
    );
    let got = https_get(&proxy, "plain.test", 443, &layer, &[]).await;
    assert_eq!(
        got.status,
        StatusCode::NOT_FOUND,
        "X-Cache {:?}",
        got.header("x-cache")
    );
    let got = mirror_get(
        &proxy,
        &format!("{tag}?ns=plain.test"),
        &[("accept", OCI_MANIFEST)],
    )
    .await;
    assert_eq!(got.body, secure.manifest);

    // Another port of the insecure host is not a registry.
    let got = http_get(&proxy, &format!("http://plain.test:8080{tag}"), &[]).await;
    assert_eq!(got.status, StatusCode::FORBIDDEN, "{}", got.text());
}
