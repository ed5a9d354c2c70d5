//! Auth-aware sharing (docs/security.md, "Against other clients"): who may
//! get cached content.
//!
//! The upstream is Docker Hub's shape, in process: the registry host
//! `registry-1.docker.io` ([`Registry`] with [`Auth`]'s hook)
//! answers only requests carrying a bearer token for the repository, and
//! challenges everything else with
//! `Bearer realm="https://auth.test/token",service="registry.test",scope="repository:NAME:pull"`;
//! the token service is a second in-process server for `auth.test`. Clients
//! do what docker does: ask, get the challenge, fetch a token from the realm
//! through the proxy (intercepted with `--intercept auth.test`, or tunnelled
//! and verified against the test CA), ask again with it.
//!
//! Accounts: `alice` may pull `team/secret`, `bob` may pull `team/other`,
//! `regcache` (regcache's own configured account) may pull `team/secret`;
//! `library/open` is public (anonymous tokens grant it).
//!
//! Every test checks what the clients got and what the upstream saw, and
//! that no credential shows up in regcache's log or cache directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use regcache::registry::media::OCI_MANIFEST;

use crate::support::auth::{repo_of, Auth, Mode, REALM_HOST};
use crate::support::http::{basic, contains, empty, read_response, Got, HttpClient};
use crate::support::pattern::blob_bytes;
use crate::support::proxy::{files_under, run_regcache, write_file, Env, Proxy, ProxyBuilder};
use crate::support::registry::{
    blob_path, manifest_path, oci_manifest, sha256, Answer, Registry, Req, ACCEPT_ALL, HUB,
    OCI_CONFIG, OCI_LAYER,
};
use crate::support::tls::{tls_connect, Alpn};
use crate::support::{free_port, within, STEP_TIMEOUT};

const OPEN: &str = "library/open";
const SECRET: &str = "team/secret";
const OTHER: &str = "team/other";

const ALICE_PW: &str = "alice-pw-7Qz1xW";
const BOB_PW: &str = "bob-pw-Lm4kR9";
const REGCACHE_PW: &str = "regcache-pw-Vb2nT8";

// ---------------------------------------------------------------------------
// Images and the upstream
// ---------------------------------------------------------------------------

/// One image as seeded upstream: a manifest under a tag, its config and layers.
struct Image {
    repo: &'static str,
    tag: &'static str,
    manifest: Bytes,
    digest: String,
    /// Config first, then the layers.
    blobs: Vec<(String, Bytes)>,
}

impl Image {
    fn new(repo: &'static str, seed: u64) -> Image {
        let config = Bytes::from(format!(
            "{{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":{seed}}}"
        ));
        let layers = [blob_bytes(seed, 300_000), blob_bytes(seed + 1, 5_000)];
        let manifest = oci_manifest(&config, &[&layers[0], &layers[1]]);
        let mut blobs = vec![(sha256(&config), config)];
        blobs.extend(layers.into_iter().map(|l| (sha256(&l), l)));
        Image {
            repo,
            tag: "1",
            digest: sha256(&manifest),
            manifest,
            blobs,
        }
    }

    /// An image in `repo` built on `base`: its own config, `base`'s layers,
    /// then one layer of its own.
    fn on_top_of(repo: &'static str, base: &Image, seed: u64) -> Image {
        let config = Bytes::from(format!(
            "{{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":{seed}}}"
        ));
        let own = blob_bytes(seed, 7_000);
        let mut blobs = vec![(sha256(&config), config)];
        blobs.extend(base.blobs[1..].iter().cloned());
        blobs.push((sha256(&own), own));
        let layers: Vec<&[u8]> = blobs[1..].iter().map(|(_, b)| &b[..]).collect();
        let manifest = oci_manifest(&blobs[0].1, &layers);
        Image {
            repo,
            tag: "1",
            digest: sha256(&manifest),
            manifest,
            blobs,
        }
    }

    fn seed(&self, reg: &Registry) {
        reg.put_manifest(
            self.repo,
            Some(self.tag),
            OCI_MANIFEST,
            self.manifest.clone(),
        );
        for (_, b) in &self.blobs {
            reg.put_blob(self.repo, b.clone());
        }
    }

    /// Whether `body` holds any of this image's content (manifest or blob).
    fn leaked_in(&self, body: &[u8]) -> bool {
        if body.is_empty() {
            return false;
        }
        contains(body, &self.manifest)
            || self.blobs.iter().any(|(_, b)| {
                // A 64-byte sample of every blob is enough to tell.
                let sample = &b[..b.len().min(64)];
                contains(body, sample)
            })
    }
}

/// How clients reach the token service through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Realm {
    /// `--intercept auth.test`: TLS with regcache's CA, regcache forwards.
    Intercepted,
    /// Not intercepted: CONNECT tunnel, TLS with the token service's own
    /// certificate (the test CA).
    Tunnelled,
}

/// The registry ([`Env`]), the token service, the accounts and the images.
struct Hub {
    base: Env,
    tokens: Registry,
    auth: Auth,
    open: Image,
    secret: Image,
    other: Image,
}

impl Hub {
    async fn new() -> Hub {
        Hub::with_mode(Mode::Bearer).await
    }

    async fn with_mode(mode: Mode) -> Hub {
        let base = Env::new().await;
        let tokens = Registry::start_with_names(&base.ca, &[REALM_HOST]).await;
        let auth = Auth::new(mode);
        auth.user("alice", ALICE_PW, &[SECRET])
            .user("bob", BOB_PW, &[OTHER])
            .user("regcache", REGCACHE_PW, &[SECRET])
            .public(OPEN);
        base.reg.set_hook(auth.registry_hook());
        tokens.set_hook(auth.token_hook());
        let (open, secret, other) = (
            Image::new(OPEN, 100),
            Image::new(SECRET, 200),
            Image::new(OTHER, 300),
        );
        open.seed(&base.reg);
        secret.seed(&base.reg);
        other.seed(&base.reg);
        Hub {
            base,
            tokens,
            auth,
            open,
            secret,
            other,
        }
    }

    /// regcache trusting the test CA, with registry-1.docker.io and auth.test
    /// sent to the in-process servers; auth.test intercepted or not.
    fn proxy(&self, realm: Realm) -> ProxyBuilder {
        let b = self.base.proxy().resolve(REALM_HOST, self.tokens.port());
        match realm {
            Realm::Intercepted => b.intercept(REALM_HOST),
            Realm::Tunnelled => b,
        }
    }

    /// Upstream requests for paths under `/v2/<repo>/` (manifests and blobs).
    fn repo_requests(&self, repo: &str) -> Vec<Req> {
        let prefix = format!("/v2/{repo}/");
        self.base
            .reg
            .seen()
            .into_iter()
            .filter(|r| r.path.starts_with(&prefix))
            .collect()
    }

    /// `METHOD path [whose credential]` of `reqs`, for failure messages.
    fn describe(&self, reqs: &[Req]) -> Vec<String> {
        reqs.iter()
            .map(|r| {
                let who = match self.auth.subject_of(r.header("authorization").as_deref()) {
                    None if r.header("authorization").is_none() => "no credential".to_string(),
                    None => "unknown credential".to_string(),
                    Some(None) => "anonymous token".to_string(),
                    Some(Some(u)) => format!("{u}'s credential"),
                };
                format!("{} {} [{who}]", r.method, r.path)
            })
            .collect()
    }

    /// Every secret this run handed out: passwords, Basic values, tokens.
    fn secrets(&self) -> Vec<String> {
        let mut s = vec![
            ALICE_PW.to_string(),
            BOB_PW.to_string(),
            REGCACHE_PW.to_string(),
            basic("alice", ALICE_PW),
            basic("bob", BOB_PW),
            basic("regcache", REGCACHE_PW),
        ];
        // "Basic xyz": the base64 part alone is the secret.
        for i in 3..6 {
            let b64 = s[i].trim_start_matches("Basic ").to_string();
            s.push(b64);
        }
        s.extend(self.auth.tokens());
        s
    }

    /// No secret in regcache's stderr, nor in any file under the cache dir.
    fn assert_no_secrets(&self, proxy: &Proxy) {
        let log = proxy.stderr();
        let secrets = self.secrets();
        assert!(
            self.auth.mode() == Mode::Basic || !self.auth.tokens().is_empty(),
            "sanity: the test issued tokens"
        );
        for s in &secrets {
            if let Some(line) = log.lines().find(|l| l.contains(s.as_str())) {
                panic!("regcache's stderr contains the secret {s:?}:\n{line}");
            }
        }
        let files = files_under(&self.base.cache_dir());
        assert!(
            files.iter().any(|f| f.ends_with("index.redb")),
            "sanity: the cache dir has index.redb; files: {files:?}"
        );
        for f in &files {
            let Ok(bytes) = std::fs::read(f) else {
                continue;
            };
            for s in &secrets {
                let needle = s.as_bytes();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    panic!(
                        "{} (under the cache dir) contains the secret {s:?}",
                        f.display()
                    );
                }
            }
        }
    }
}

/// `key="value"` parameters of a `Bearer …` challenge.
fn challenge_params(challenge: &str) -> HashMap<String, String> {
    let rest = challenge
        .split_once(' ')
        .map(|(_, r)| r)
        .unwrap_or_default();
    let mut out = HashMap::new();
    let mut s = rest;
    while let Some((k, v)) = s.split_once("=\"") {
        let Some((value, tail)) = v.split_once('"') else {
            break;
        };
        out.insert(
            k.trim().trim_start_matches(',').trim().to_ascii_lowercase(),
            value.to_owned(),
        );
        s = tail;
    }
    out
}

// ---------------------------------------------------------------------------
// A registry client doing docker's token dance through the proxy
// ---------------------------------------------------------------------------

struct Client<'a> {
    env: &'a Hub,
    proxy: &'a Proxy,
    realm: Realm,
    /// The name in failure messages.
    name: &'static str,
    /// `Authorization` for the token service (Basic), None: anonymous.
    login: Option<String>,
    /// Fetch a token and retry when challenged (docker does).
    dance: bool,
    /// Tokens by scope.
    tokens: HashMap<String, String>,
    /// The Authorization the last request carried.
    last_auth: Option<String>,
}

impl<'a> Client<'a> {
    fn anonymous(env: &'a Hub, proxy: &'a Proxy, realm: Realm) -> Self {
        Client {
            env,
            proxy,
            realm,
            name: "anonymous",
            login: None,
            dance: true,
            tokens: HashMap::new(),
            last_auth: None,
        }
    }

    fn user(
        env: &'a Hub,
        proxy: &'a Proxy,
        realm: Realm,
        name: &'static str,
        password: &str,
    ) -> Self {
        Client {
            name,
            login: Some(basic(name, password)),
            ..Client::anonymous(env, proxy, realm)
        }
    }

    /// A client that never fetches a token (no Authorization at all).
    fn bare(env: &'a Hub, proxy: &'a Proxy) -> Self {
        Client {
            name: "credential-less",
            dance: false,
            ..Client::anonymous(env, proxy, Realm::Intercepted)
        }
    }

    /// One request to the registry through the proxy, on a fresh
    /// connection, with exactly `authorization`.
    async fn send(&self, method: Method, path: &str, authorization: Option<&str>) -> Got {
        let mut c = self.proxy.intercepted(HUB, Alpn::Both).await;
        let mut b = c.builder(method.clone(), path);
        if path.contains("/manifests/") {
            b = b.header("accept", ACCEPT_ALL);
        }
        if let Some(a) = authorization {
            b = b.header("authorization", a);
        }
        let resp = c.send(b.body(empty()).unwrap()).await;
        read_response(resp).await
    }

    /// A request as docker makes it: with the token held for the path's
    /// repository if any; challenged, fetch a token and try once more.
    async fn request(&mut self, method: Method, path: &str) -> Got {
        let scope = repo_of(path).map(|r| format!("repository:{r}:pull"));
        let held = scope
            .as_ref()
            .and_then(|s| self.tokens.get(s))
            .map(|t| format!("Bearer {t}"));
        self.last_auth = held.clone();
        let got = self.send(method.clone(), path, held.as_deref()).await;
        if got.status != StatusCode::UNAUTHORIZED || !self.dance || held.is_some() {
            return got;
        }
        let Some(challenge) = got.header("www-authenticate") else {
            return got;
        };
        let Some(token) = self.token(&challenge).await else {
            return got;
        };
        let auth = format!("Bearer {token}");
        self.last_auth = Some(auth.clone());
        self.send(method, path, Some(&auth)).await
    }

    async fn get(&mut self, path: &str) -> Got {
        self.request(Method::GET, path).await
    }

    /// Fetches a token for a Bearer challenge from its realm, through the
    /// proxy; None for other challenges.
    async fn token(&mut self, challenge: &str) -> Option<String> {
        if !challenge.to_ascii_lowercase().starts_with("bearer ") {
            return None;
        }
        let p = challenge_params(challenge);
        let realm = p.get("realm").expect("realm in the challenge");
        let rest = realm
            .strip_prefix("https://")
            .unwrap_or_else(|| panic!("realm {realm} is not https"));
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut q = form_urlencoded::Serializer::new(String::new());
        if let Some(s) = p.get("service") {
            q.append_pair("service", s);
        }
        if let Some(s) = p.get("scope") {
            q.append_pair("scope", s);
        }
        let target = format!("/{path}?{}", q.finish());
        let mut c = self.realm_client(host).await;
        let mut b = c.builder(Method::GET, &target);
        if let Some(l) = &self.login {
            b = b.header("authorization", l);
        }
        let got = read_response(c.send(b.body(empty()).unwrap()).await).await;
        assert_eq!(
            got.status,
            StatusCode::OK,
            "{}: token request {target} to {host} through the proxy ({:?}): {}",
            self.name,
            self.realm,
            got.brief()
        );
        let v: serde_json::Value = serde_json::from_slice(&got.body).expect("token JSON");
        let token = v["token"].as_str().expect("token in the answer").to_owned();
        if let Some(scope) = p.get("scope") {
            self.tokens.insert(scope.clone(), token.clone());
        }
        Some(token)
    }

    async fn realm_client(&self, host: &str) -> HttpClient {
        match self.realm {
            Realm::Intercepted => self.proxy.intercepted(host, Alpn::Both).await,
            Realm::Tunnelled => {
                let tcp = self.proxy.tunnel(&format!("{host}:443")).await;
                // Not intercepted: the token service's own certificate.
                let tls = tls_connect(
                    tcp,
                    host,
                    vec![self.env.base.ca.cert_der.clone()],
                    Alpn::Both,
                    true,
                )
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "TLS to {host} through a tunnel, trusting the token service's CA: {e}; \
                         stderr:\n{}",
                        self.proxy.stderr()
                    )
                });
                HttpClient::over_tls(tls, host).await
            }
        }
    }

    /// Pulls `img` by tag (manifest, config, layers) and checks every byte;
    /// returns each response's X-Cache.
    async fn pull(&mut self, img: &Image) -> Vec<String> {
        let mut caches = vec![];
        let path = manifest_path(img.repo, img.tag);
        let m = self.get(&path).await;
        m.assert_content(
            &Method::GET,
            &img.manifest,
            &format!("{} GET {path}", self.name),
        );
        caches.push(m.x_cache());
        for (digest, bytes) in &img.blobs {
            let path = blob_path(img.repo, digest);
            let b = self.get(&path).await;
            b.assert_content(&Method::GET, bytes, &format!("{} GET {path}", self.name));
            caches.push(b.x_cache());
        }
        caches
    }

    /// Every path of `img` (manifest by tag and digest, each blob), asked as
    /// GET and HEAD: all must be served, from the cache.
    async fn fetch_all_cached(&mut self, img: &Image) {
        for path in all_paths(img, img.repo, true) {
            for method in [Method::GET, Method::HEAD] {
                let got = self.request(method.clone(), &path).await;
                got.assert_content(
                    &method,
                    want_of(img, &path),
                    &format!("{} {method} {path}", self.name),
                );
                assert_eq!(
                    got.x_cache(),
                    "HIT",
                    "{} {method} {path}: should come from the cache",
                    self.name
                );
            }
        }
    }
}

/// Paths of `img`'s content asked through repository `via`: the manifest by
/// digest (and by tag when `tag`), every blob.
fn all_paths(img: &Image, via: &str, tag: bool) -> Vec<String> {
    let mut v = vec![manifest_path(via, &img.digest)];
    if tag {
        v.push(manifest_path(via, img.tag));
    }
    v.extend(img.blobs.iter().map(|(d, _)| blob_path(via, d)));
    v
}

/// The bytes a GET of `path` (one of `img`'s) would return.
fn want_of<'i>(img: &'i Image, path: &str) -> &'i [u8] {
    if path.contains("/manifests/") {
        return &img.manifest;
    }
    let digest = path.rsplit('/').next().unwrap();
    &img.blobs.iter().find(|(d, _)| d == digest).unwrap().1
}

/// Asks for every piece of `img` through `via` as `client` (GET and HEAD),
/// and checks each answer is what the upstream answers that client's
/// credential (status and challenge), never the content.
async fn assert_refused_everywhere(client: &mut Client<'_>, img: &Image, via: &[&str]) {
    let env = client.env;
    for repo in via {
        let tag = *repo == img.repo;
        for path in all_paths(img, repo, tag) {
            for method in [Method::GET, Method::HEAD] {
                let got = client.request(method.clone(), &path).await;
                let what = format!(
                    "{} {method} {path} (credential: {})",
                    client.name,
                    match &client.last_auth {
                        None => "none".to_string(),
                        Some(a) => format!("{:?}", env.auth.subject_of(Some(a))),
                    }
                );
                assert!(
                    !img.leaked_in(&got.body),
                    "{what}: got {} content bytes: {}",
                    img.repo,
                    got.brief()
                );
                let upstream = env.auth.decide(&path, client.last_auth.as_deref());
                let (want_status, want_challenge) = match &upstream {
                    Some(a) => (
                        a.status,
                        a.headers
                            .iter()
                            .find(|(k, _)| k == "www-authenticate")
                            .map(|(_, v)| v.clone()),
                    ),
                    // The credential is good for this repository, which
                    // does not have the content.
                    None => (404, None),
                };
                // Through a public repository, regcache may ask upstream
                // itself (the repository's anonymous access), which answers
                // that it does not have the content: 404 is as good as the
                // challenge the client's own credential would get.
                let also_ok = *repo != img.repo
                    && env.auth.decide(&path, None).is_some()
                    && *repo == OPEN
                    && want_status == 401
                    && got.status == StatusCode::NOT_FOUND;
                assert!(
                    got.status.as_u16() == want_status || also_ok,
                    "{what}: the upstream answers {want_status}; regcache answered {}",
                    got.brief()
                );
                let want_status = got.status.as_u16();
                if want_status == 401 {
                    assert_eq!(
                        got.header("www-authenticate"),
                        want_challenge,
                        "{what}: the upstream's challenge, as it sent it"
                    );
                }
                if method == Method::GET {
                    let code = got.error_code();
                    let want_code = match want_status {
                        401 => "UNAUTHORIZED",
                        403 => "DENIED",
                        _ if path.contains("/manifests/") => "MANIFEST_UNKNOWN",
                        _ => "BLOB_UNKNOWN",
                    };
                    assert_eq!(
                        code.as_deref(),
                        Some(want_code),
                        "{what}: a JSON error body like the upstream's: {}",
                        got.brief()
                    );
                } else {
                    assert!(got.body.is_empty(), "{what}: a HEAD answer has no body");
                }
            }
        }
    }
}

/// Upstream GETs among `reqs`.
fn gets(reqs: &[Req]) -> usize {
    reqs.iter().filter(|r| r.method == Method::GET).count()
}

fn heads(reqs: &[Req]) -> usize {
    reqs.iter().filter(|r| r.method == Method::HEAD).count()
}

// ---------------------------------------------------------------------------
// 1. Public repositories are shared
// ---------------------------------------------------------------------------

#[tokio::test]
async fn public_pull_is_shared_with_every_client_without_upstream_gets() {
    let env = Hub::new().await;
    let proxy = env.proxy(Realm::Intercepted).start().await;

    // Client A: anonymous, token dance through the intercepted realm.
    let mut a = Client::anonymous(&env, &proxy, Realm::Intercepted);
    let caches = a.pull(&env.open).await;
    assert!(
        caches.iter().all(|c| c == "MISS"),
        "first pull: every piece from upstream; X-Cache {caches:?}"
    );
    // A either got the registry's challenge and came back with a token of
    // its own (sent upstream as A sent it), or regcache ran the token flow
    // for it anonymously; either way every blob was fetched once, with no
    // user's credential.
    let a_token = a.tokens.get(&format!("repository:{OPEN}:pull")).cloned();
    let first = env.repo_requests(OPEN);
    for (digest, _) in &env.open.blobs {
        let path = blob_path(OPEN, digest);
        let carried: Vec<_> = first
            .iter()
            .filter(|r| {
                r.method == Method::GET && r.path == path && r.header("authorization").is_some()
            })
            .filter(|r| {
                env.auth
                    .subject_of(r.header("authorization").as_deref())
                    .is_some()
            })
            .map(|r| r.header("authorization"))
            .collect();
        assert_eq!(
            carried.len(),
            1,
            "one authorized upstream GET of {path}; upstream saw {:?}",
            env.describe(&first)
        );
        match &a_token {
            Some(t) => assert_eq!(
                carried[0],
                Some(format!("Bearer {t}")),
                "A's token went upstream as A sent it; upstream saw {:?}",
                env.describe(&first)
            ),
            None => assert_eq!(
                env.auth.subject_of(carried[0].as_deref()),
                Some(None),
                "regcache's anonymous token for A; upstream saw {:?}",
                env.describe(&first)
            ),
        }
    }
    if let Some(t) = &a_token {
        assert!(
            env.auth
                .token_requests()
                .iter()
                .any(|r| r.subject.is_none() && r.token.as_deref() == Some(t.as_str())),
            "A's token came from the realm through the intercepted auth.test"
        );
    }

    // Client B: anonymous too. Nothing is fetched upstream again.
    let mut b = Client::anonymous(&env, &proxy, Realm::Intercepted);
    b.pull(&env.open).await;
    b.fetch_all_cached(&env.open).await;
    let after_b = env.repo_requests(OPEN);
    let b_only = &after_b[first.len()..];
    assert_eq!(
        gets(b_only),
        0,
        "B: no upstream GET of a manifest or blob of the public repository; upstream saw {:?}",
        env.describe(b_only)
    );
    // At most the public check (HEADs) on B's first request.
    assert!(
        heads(b_only) <= 2,
        "B: at most the public check's HEADs upstream; saw {:?}",
        env.describe(b_only)
    );

    // Client C: a logged-in user with no special right to library/open, and
    // a client that never authenticates: served, and the repository being
    // known public by now, with no upstream contact at all.
    let mut c = Client::user(&env, &proxy, Realm::Intercepted, "bob", BOB_PW);
    c.fetch_all_cached(&env.open).await;
    let mut bare = Client::bare(&env, &proxy);
    bare.fetch_all_cached(&env.open).await;
    let after_c = env.repo_requests(OPEN);
    let c_only = &after_c[after_b.len()..];
    assert!(
        c_only.is_empty(),
        "public content is served to everyone with no further upstream contact; upstream saw {:?}",
        env.describe(c_only)
    );
    env.assert_no_secrets(&proxy);
}

#[tokio::test]
async fn public_status_is_checked_again_after_public_ttl() {
    let env = Hub::new().await;
    let proxy = env
        .proxy(Realm::Intercepted)
        .args(["--public-ttl", "1"])
        .start()
        .await;
    Client::anonymous(&env, &proxy, Realm::Intercepted)
        .pull(&env.open)
        .await;
    // Known public: served to a client with no credential at all.
    Client::bare(&env, &proxy).fetch_all_cached(&env.open).await;

    // The owner makes the repository private.
    env.auth.make_private(OPEN);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut bare = Client::bare(&env, &proxy);
    for path in all_paths(&env.open, OPEN, true) {
        let got = bare.request(Method::GET, &path).await;
        assert_eq!(
            got.status,
            StatusCode::UNAUTHORIZED,
            "GET {path} with no credential, the repository private now and public_ttl over: {}",
            got.brief()
        );
        assert!(!env.open.leaked_in(&got.body), "GET {path}: content leaked");
    }
    env.assert_no_secrets(&proxy);
}

// ---------------------------------------------------------------------------
// 2. Private repositories: only to credentials the upstream accepted
// ---------------------------------------------------------------------------

#[tokio::test]
async fn private_content_is_served_only_to_credentials_the_upstream_accepts() {
    let env = Hub::new().await;
    // The token service is tunnelled here: regcache never sees the tokens
    // being issued, only the Authorization headers that carry them.
    let proxy = env.proxy(Realm::Tunnelled).start().await;

    let mut alice = Client::user(&env, &proxy, Realm::Tunnelled, "alice", ALICE_PW);
    let caches = alice.pull(&env.secret).await;
    assert!(
        caches.iter().all(|c| c == "MISS"),
        "alice's first pull is from upstream: {caches:?}"
    );
    let alice_auth = alice.last_auth.clone().expect("alice used a token");
    assert_eq!(
        env.auth.subject_of(Some(&alice_auth)),
        Some(Some("alice".to_string()))
    );
    for r in env
        .repo_requests(SECRET)
        .iter()
        .filter(|r| r.method == Method::GET)
    {
        // None, an anonymous token (regcache's token flow for a request
        // without credentials), or alice's own.
        let who = env.auth.subject_of(r.header("authorization").as_deref());
        assert!(
            matches!(&who, None | Some(None)) || who == Some(Some("alice".into())),
            "upstream GET {} carried someone else's credential: {who:?}",
            r.path
        );
    }
    assert!(
        env.auth
            .token_requests()
            .iter()
            .any(|t| t.subject.as_deref() == Some("alice")),
        "alice logged in at the realm through the tunnel"
    );

    // Nobody else gets any of it: not by tag, not by digest, not through
    // another repository name; each gets what the upstream answers them.
    let mut anon = Client::anonymous(&env, &proxy, Realm::Tunnelled);
    assert_refused_everywhere(&mut anon, &env.secret, &[SECRET, OPEN, OTHER]).await;
    let mut bob = Client::user(&env, &proxy, Realm::Tunnelled, "bob", BOB_PW);
    assert_refused_everywhere(&mut bob, &env.secret, &[SECRET, OPEN, OTHER]).await;
    let mut bare = Client::bare(&env, &proxy);
    assert_refused_everywhere(&mut bare, &env.secret, &[SECRET, OPEN, OTHER]).await;
    // A made-up token is no better.
    for path in all_paths(&env.secret, SECRET, true) {
        let got = anon
            .send(Method::GET, &path, Some("Bearer not-a-token-anyone-issued"))
            .await;
        assert_eq!(
            got.status,
            StatusCode::UNAUTHORIZED,
            "forged token, GET {path}: {}",
            got.brief()
        );
        assert!(!env.secret.leaked_in(&got.body));
    }

    // alice again, same token: from the cache, after at most one HEAD.
    let before = env.repo_requests(SECRET).len();
    alice.fetch_all_cached(&env.secret).await;
    let again = env.repo_requests(SECRET);
    let again = &again[before..];
    assert!(
        gets(again) == 0 && heads(again) <= 1,
        "alice again: no GET, at most one HEAD upstream; saw {:?}",
        env.describe(again)
    );
    for r in again {
        assert_eq!(
            r.header("authorization").as_deref(),
            Some(alice_auth.as_str()),
            "the access check HEAD carries alice's own credential"
        );
    }

    // alice logs in again (a new token): checked once upstream, then cached.
    let mut alice2 = Client::user(&env, &proxy, Realm::Tunnelled, "alice", ALICE_PW);
    let before = env.repo_requests(SECRET).len();
    alice2.pull(&env.secret).await;
    alice2.fetch_all_cached(&env.secret).await;
    let new_token = env.repo_requests(SECRET);
    let new_token = &new_token[before..];
    assert_eq!(
        gets(new_token),
        0,
        "alice with a new token: no upstream GET; saw {:?}",
        env.describe(new_token)
    );
    env.assert_no_secrets(&proxy);
}

// ---------------------------------------------------------------------------
// 2b. A manifest's content grants nothing (issue 10, item 1)
// ---------------------------------------------------------------------------

const ATTACKER_REPO: &str = "attacker/pub";
const DERIVED: &str = "team/derived";
const DAVE_PW: &str = "dave-pw-Hq8sN3";

/// An OCI manifest pushed to a public repository by whoever may push there,
/// whose `config`, `layers`, `blobs` and `subject` name `victim`'s digests
/// (registries accept that: `subject` may point nowhere, distribution 2.8
/// does not check `blobs`).
fn hostile_manifest(victim: &Image) -> Bytes {
    let desc = |media: &str, d: &str, len: usize| serde_json::json!({"mediaType": media, "digest": d, "size": len});
    let (config, layers) = (&victim.blobs[0], &victim.blobs[1..]);
    let layer_descs: Vec<_> = layers
        .iter()
        .map(|(d, b)| desc(OCI_LAYER, d, b.len()))
        .collect();
    Bytes::from(
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": desc(OCI_CONFIG, &config.0, config.1.len()),
            "layers": layer_descs,
            "blobs": layer_descs,
            "subject": desc(OCI_MANIFEST, &victim.digest, victim.manifest.len()),
        })
        .to_string(),
    )
}

#[tokio::test]
async fn manifest_naming_private_digests_opens_nothing_through_a_public_repository() {
    let env = Hub::new().await;
    env.auth.public(ATTACKER_REPO);
    let hostile = hostile_manifest(&env.secret);
    env.base
        .reg
        .put_manifest(ATTACKER_REPO, Some("evil"), OCI_MANIFEST, hostile.clone());
    let proxy = env.proxy(Realm::Intercepted).start().await;

    // The owner pulls the private image through regcache: all of it cached.
    Client::user(&env, &proxy, Realm::Intercepted, "alice", ALICE_PW)
        .pull(&env.secret)
        .await;
    // The attacker's manifest, pulled once anonymously through regcache.
    let mut anon = Client::anonymous(&env, &proxy, Realm::Intercepted);
    let evil = format!("/v2/{ATTACKER_REPO}/manifests/evil");
    anon.get(&evil).await.assert_content(
        &Method::GET,
        &hostile,
        "anonymous GET of the attacker's manifest",
    );

    // Every private digest through the public repository: the registry's
    // answer (the repository does not have them), never the bytes.
    let mut bare = Client::bare(&env, &proxy);
    for path in all_paths(&env.secret, ATTACKER_REPO, false) {
        for client in [&mut anon, &mut bare] {
            for method in [Method::GET, Method::HEAD] {
                let got = client.request(method.clone(), &path).await;
                let what = format!("{} {method} {path}", client.name);
                assert!(
                    !env.secret.leaked_in(&got.body),
                    "{what}: private bytes through the attacker's repository: {}",
                    got.brief()
                );
                assert_eq!(
                    got.status,
                    StatusCode::NOT_FOUND,
                    "{what}: the registry answers 404 (no such content in {ATTACKER_REPO}): {}",
                    got.brief()
                );
            }
        }
    }
    env.assert_no_secrets(&proxy);
}

/// A repository found public opens its digests through other repositories
/// only while that finding is fresh: made private at the registry, it stops
/// doing so once `public_ttl` is over, even though nobody asks for the
/// repository itself (which would find it private again).
#[tokio::test]
async fn a_repository_made_private_stops_opening_its_digests_elsewhere_after_public_ttl() {
    let env = Hub::new().await;
    env.auth.public(ATTACKER_REPO);
    // A public manifest naming library/open's digests: pointers, no links.
    let naming = hostile_manifest(&env.open);
    env.base
        .reg
        .put_manifest(ATTACKER_REPO, Some("evil"), OCI_MANIFEST, naming.clone());
    let ttl = Duration::from_secs(2);
    let proxy = env
        .proxy(Realm::Intercepted)
        .args(["--public-ttl", &ttl.as_secs().to_string()])
        .start()
        .await;

    let mut anon = Client::anonymous(&env, &proxy, Realm::Intercepted);
    anon.pull(&env.open).await;
    let evil = format!("/v2/{ATTACKER_REPO}/manifests/evil");
    anon.get(&evil).await.assert_content(
        &Method::GET,
        &naming,
        "anonymous GET of the naming manifest",
    );

    // Within public_ttl: library/open's content is public somewhere, so it is
    // served through the other public repository from the cache.
    let through = all_paths(&env.open, ATTACKER_REPO, false);
    for path in &through {
        let got = anon.get(path).await;
        got.assert_content(
            &Method::GET,
            want_of(&env.open, path),
            &format!("GET {path}, library/open found public within public_ttl"),
        );
        assert_eq!(got.x_cache(), "HIT", "GET {path}: from the cache");
    }

    // The owner makes library/open private; nobody asks for it again.
    env.auth.make_private(OPEN);
    tokio::time::sleep(ttl + Duration::from_millis(500)).await;
    // The other repository's own manifest, asked again: its openness is
    // found anew (public, fresh), library/open's is older than public_ttl.
    anon.get(&evil).await.assert_content(
        &Method::GET,
        &naming,
        "the naming manifest, public_ttl over",
    );
    for path in &through {
        for method in [Method::GET, Method::HEAD] {
            let got = anon.request(method.clone(), path).await;
            let what = format!("anonymous {method} {path}, public_ttl over");
            assert!(
                !env.open.leaked_in(&got.body),
                "{what}: bytes of the now private {OPEN}: {}",
                got.brief()
            );
            assert_eq!(
                got.status,
                StatusCode::NOT_FOUND,
                "{what}: the registry answers 404 (no such content in {ATTACKER_REPO}): {}",
                got.brief()
            );
        }
    }
    env.assert_no_secrets(&proxy);
}

#[tokio::test]
async fn public_layers_shared_with_another_public_repository_need_no_upstream_request() {
    let env = Hub::new().await;
    let open2 = Image::on_top_of("library/open2", &env.open, 150);
    env.auth.public(open2.repo);
    open2.seed(&env.base.reg);
    let proxy = env.proxy(Realm::Intercepted).start().await;

    Client::anonymous(&env, &proxy, Realm::Intercepted)
        .pull(&env.open)
        .await;
    let mut b = Client::anonymous(&env, &proxy, Realm::Intercepted);
    let caches = b.pull(&open2).await;
    let shared: Vec<_> = env.open.blobs[1..].iter().map(|(d, _)| d.clone()).collect();
    let requests = env.repo_requests(open2.repo);
    for (i, (digest, _)) in open2.blobs.iter().enumerate() {
        let path = blob_path(open2.repo, digest);
        let upstream: Vec<_> = requests
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect();
        if shared.contains(digest) {
            assert_eq!(caches[i + 1], "HIT", "shared layer {path}: from the cache");
            assert!(
                upstream.is_empty(),
                "shared public layer {path}: no upstream request at all; upstream saw {:?}",
                env.describe(&upstream)
            );
        } else {
            assert_eq!(caches[i + 1], "MISS", "{path}: its own blob, from upstream");
        }
    }
}

#[tokio::test]
async fn private_base_layer_shared_by_two_private_repositories_needs_one_head_with_the_clients_credential(
) {
    let env = Hub::new().await;
    env.auth.user("dave", DAVE_PW, &[DERIVED]);
    let derived = Image::on_top_of(DERIVED, &env.secret, 250);
    derived.seed(&env.base.reg);
    let proxy = env.proxy(Realm::Intercepted).start().await;

    Client::user(&env, &proxy, Realm::Intercepted, "alice", ALICE_PW)
        .pull(&env.secret)
        .await;
    let shared: Vec<_> = env.secret.blobs[1..]
        .iter()
        .map(|(d, _)| d.clone())
        .collect();

    // dave may read team/derived only: the base layers, cached through
    // team/secret, come from the cache after one HEAD each with dave's own
    // credential, no GET.
    let mut dave = Client::user(&env, &proxy, Realm::Intercepted, "dave", DAVE_PW);
    let caches = dave.pull(&derived).await;
    let dave_auth = dave.last_auth.clone().expect("dave used a token");
    let requests = env.repo_requests(DERIVED);
    for digest in &shared {
        let path = blob_path(DERIVED, digest);
        let upstream: Vec<_> = requests
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect();
        let daves: Vec<_> = upstream
            .iter()
            .filter(|r| r.header("authorization").as_deref() == Some(dave_auth.as_str()))
            .cloned()
            .collect();
        assert_eq!(
            gets(&upstream),
            0,
            "{path}: no GET; upstream saw {:?}",
            env.describe(&upstream)
        );
        assert_eq!(
            (heads(&daves), daves.len()),
            (1, 1),
            "{path}: exactly one HEAD with dave's credential; upstream saw {:?}",
            env.describe(&upstream)
        );
    }
    assert!(
        caches[2..caches.len() - 1].iter().all(|c| c == "HIT"),
        "the shared layers from the cache: {caches:?}"
    );
    // Confirmed once: dave again needs nothing upstream for them.
    let before = env.repo_requests(DERIVED).len();
    for digest in &shared {
        let path = blob_path(DERIVED, digest);
        let got = dave.get(&path).await;
        got.assert_content(&Method::GET, want_of(&derived, &path), "dave again");
    }
    let again = env.repo_requests(DERIVED);
    assert_eq!(
        again.len(),
        before,
        "dave again: linked, no upstream request; saw {:?}",
        env.describe(&again[before..])
    );

    // Clients without a credential for team/derived get the registry's own
    // refusal for every piece of it, shared layers included; so does alice
    // (team/secret has the layers, team/derived is not hers).
    let mut anon = Client::anonymous(&env, &proxy, Realm::Intercepted);
    assert_refused_everywhere(&mut anon, &derived, &[DERIVED]).await;
    let mut bare = Client::bare(&env, &proxy);
    assert_refused_everywhere(&mut bare, &derived, &[DERIVED]).await;
    env.assert_no_secrets(&proxy);
}

/// A hostile registry answers `HEAD` 200 for any digest (and sends other
/// bytes to a `GET`): that is no proof it holds the private bytes cached
/// from another registry, so regcache asks it with a GET and serves only
/// what it sends, verified; nothing gets linked, nothing private leaves.
#[tokio::test]
async fn a_registry_that_confirms_everything_gets_no_bytes_cached_from_another_registry() {
    const EVIL: &str = "evil.test";
    let env = Hub::new().await;
    let evil = Registry::start_with_names(&env.base.ca, &[EVIL]).await;
    evil.set_hook(|req| {
        let digest = req.path.rsplit('/').next().unwrap_or_default().to_string();
        let body = Bytes::from(vec![b'x'; 5_000]);
        let mut headers = vec![("docker-content-digest".to_string(), digest)];
        headers.push(("content-type".into(), "application/octet-stream".into()));
        Some(Answer {
            status: 200,
            headers,
            body,
        })
    });
    let proxy = env
        .proxy(Realm::Intercepted)
        .resolve(EVIL, evil.port())
        .intercept(EVIL)
        .start()
        .await;
    Client::user(&env, &proxy, Realm::Intercepted, "alice", ALICE_PW)
        .pull(&env.secret)
        .await;

    for round in 0..2 {
        for path in all_paths(&env.secret, "any/repo", false) {
            for method in [Method::HEAD, Method::GET] {
                let c = proxy.intercepted(EVIL, Alpn::H2).await;
                let mut b = c.builder(method.clone(), &path);
                if path.contains("/manifests/") {
                    b = b.header("accept", ACCEPT_ALL);
                }
                let what = format!("round {round}: {method} {EVIL}{path}");
                // A download that fails verification may reset the stream
                // before its head: no bytes at all, as good as a refusal.
                let sent = within(
                    &what,
                    STEP_TIMEOUT,
                    c.h2_sender().send_request(b.body(empty()).unwrap()),
                )
                .await;
                let Ok(resp) = sent else {
                    continue;
                };
                let got = read_response(resp).await;
                assert!(
                    !env.secret.leaked_in(&got.body),
                    "{what}: private bytes of {HUB} went to another registry's client: {}",
                    got.brief()
                );
                if method == Method::GET {
                    assert!(
                        got.status != StatusCode::OK || got.error.is_some(),
                        "{what}: the hostile registry's wrong bytes must never complete: {}",
                        got.brief()
                    );
                }
            }
        }
    }
    let evil_gets = evil
        .seen()
        .iter()
        .filter(|r| r.method == Method::GET)
        .count();
    assert!(
        evil_gets >= 2 * (env.secret.blobs.len() + 1),
        "every GET went to the hostile registry (its bytes or nothing): {:?}",
        evil.summary()
    );
    env.assert_no_secrets(&proxy);
}

// ---------------------------------------------------------------------------
// 3. auth_ttl: a revoked credential stops working
// ---------------------------------------------------------------------------

#[tokio::test]
async fn revoked_credential_is_refused_after_auth_ttl() {
    let env = Hub::new().await;
    let proxy = env
        .proxy(Realm::Intercepted)
        .args(["--auth-ttl", "1"])
        .start()
        .await;
    let mut alice = Client::user(&env, &proxy, Realm::Intercepted, "alice", ALICE_PW);
    alice.pull(&env.secret).await;
    alice.fetch_all_cached(&env.secret).await;
    let token = alice.last_auth.clone().unwrap();

    env.auth.revoke("alice");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    for path in all_paths(&env.secret, SECRET, true) {
        for method in [Method::GET, Method::HEAD] {
            let got = alice.send(method.clone(), &path, Some(&token)).await;
            let what = format!("alice's revoked token, {method} {path}, after auth_ttl");
            assert_eq!(
                got.status,
                StatusCode::UNAUTHORIZED,
                "{what}: the upstream refuses it now; regcache answered {}",
                got.brief()
            );
            assert!(!env.secret.leaked_in(&got.body), "{what}: content leaked");
            let challenge = got.header("www-authenticate").unwrap_or_default();
            assert!(
                challenge.starts_with("Bearer realm=\"https://auth.test/token\""),
                "{what}: the upstream's challenge: {challenge:?}"
            );
        }
    }
    env.assert_no_secrets(&proxy);
}

// ---------------------------------------------------------------------------
// 4. regcache's own account: public content only
// ---------------------------------------------------------------------------

fn credentials_config(env: &Hub, password_file: &Path) -> PathBuf {
    let config = env.base.path("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "[registries.\"{HUB}\"]\nusername = \"regcache\"\npassword_file = \"{}\"\n",
            password_file.display()
        ),
    )
    .unwrap();
    config
}

#[tokio::test]
async fn configured_credentials_serve_public_content_and_never_open_a_private_repo() {
    let env = Hub::new().await;
    let pw = write_file(
        env.base.dir.path(),
        "hub.pw",
        &format!("{REGCACHE_PW}\n"),
        0o600,
    );
    let config = credentials_config(&env, &pw);
    let proxy = env
        .proxy(Realm::Intercepted)
        .arg("--config")
        .arg(config.to_str().unwrap())
        .start()
        .await;

    // A client with no credential at all pulls the public repository: no
    // challenge for it, regcache's own token goes upstream.
    let mut bare = Client::bare(&env, &proxy);
    bare.pull(&env.open).await;
    let open_reqs = env.repo_requests(OPEN);
    let fetches: Vec<_> = open_reqs
        .iter()
        .filter(|r| r.method == Method::GET)
        .collect();
    assert!(
        !fetches.is_empty(),
        "sanity: the pull went upstream; saw {:?}",
        env.describe(&open_reqs)
    );
    for r in &fetches {
        assert_eq!(
            env.auth.subject_of(r.header("authorization").as_deref()),
            Some(Some("regcache".to_string())),
            "upstream GET {} should carry regcache's own token; upstream saw {:?}",
            r.path,
            env.describe(&open_reqs)
        );
    }
    let logins: Vec<_> = env
        .auth
        .token_requests()
        .into_iter()
        .filter(|t| t.subject.as_deref() == Some("regcache"))
        .collect();
    assert!(
        !logins.is_empty(),
        "regcache got its token at the realm with Basic regcache:<password file>; token requests: {:?}",
        env.auth.token_requests()
    );
    assert!(
        logins
            .iter()
            .all(|t| t.authorization.as_deref() == Some(basic("regcache", REGCACHE_PW).as_str())),
        "the password is the file's first line, without its newline"
    );

    // team/secret: regcache's account could read it, an anonymous client
    // may not. Before anyone pulled it, and after alice did.
    let refuse_anonymous = |when: &'static str| {
        let env = &env;
        let proxy = &proxy;
        async move {
            let mut bare = Client::bare(env, proxy);
            for path in all_paths(&env.secret, SECRET, true) {
                for method in [Method::GET, Method::HEAD] {
                    let got = bare.request(method.clone(), &path).await;
                    assert_eq!(
                        got.status,
                        StatusCode::UNAUTHORIZED,
                        "anonymous {method} {path} {when}: regcache's account must not open it: {}",
                        got.brief()
                    );
                    assert!(!env.secret.leaked_in(&got.body));
                }
            }
            let mut anon = Client::anonymous(env, proxy, Realm::Intercepted);
            assert_refused_everywhere(&mut anon, &env.secret, &[SECRET]).await;
        }
    };
    refuse_anonymous("before anyone pulled it").await;
    let mut alice = Client::user(&env, &proxy, Realm::Intercepted, "alice", ALICE_PW);
    alice.pull(&env.secret).await;
    refuse_anonymous("after alice pulled it").await;

    let secret_reqs = env.repo_requests(SECRET);
    for r in &secret_reqs {
        let who = env.auth.subject_of(r.header("authorization").as_deref());
        assert_ne!(
            who,
            Some(Some("regcache".to_string())),
            "{} {} went upstream with regcache's own credential; upstream saw {:?}",
            r.method,
            r.path,
            env.describe(&secret_reqs)
        );
    }
    env.assert_no_secrets(&proxy);
}

#[tokio::test]
async fn configured_token_file_is_presented_for_public_content_only() {
    let env = Hub::new().await;
    let pat = env.auth.mint("regcache", &[OPEN, SECRET]);
    let file = write_file(env.base.dir.path(), "hub.token", &format!("{pat}\n"), 0o600);
    let config = env.base.path("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "[registries.\"{HUB}\"]\ntoken_file = \"{}\"\n",
            file.display()
        ),
    )
    .unwrap();
    let proxy = env
        .proxy(Realm::Intercepted)
        .arg("--config")
        .arg(config.to_str().unwrap())
        .start()
        .await;
    Client::bare(&env, &proxy).pull(&env.open).await;
    let open_reqs = env.repo_requests(OPEN);
    let fetches: Vec<_> = open_reqs
        .iter()
        .filter(|r| r.method == Method::GET)
        .collect();
    assert!(!fetches.is_empty(), "sanity: the pull went upstream");
    for r in &fetches {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {pat}")),
            "upstream GET {} should carry the token file's token; upstream saw {:?}",
            r.path,
            env.describe(&open_reqs)
        );
    }
    let mut bare = Client::bare(&env, &proxy);
    for path in all_paths(&env.secret, SECRET, true) {
        let got = bare.request(Method::GET, &path).await;
        assert_eq!(
            got.status,
            StatusCode::UNAUTHORIZED,
            "anonymous GET {path}: regcache's token must not open a private repository: {}",
            got.brief()
        );
        assert!(!env.secret.leaked_in(&got.body));
    }
    for r in env.repo_requests(SECRET) {
        assert_ne!(
            r.header("authorization"),
            Some(format!("Bearer {pat}")),
            "{} {} went upstream with regcache's token",
            r.method,
            r.path
        );
    }
    env.assert_no_secrets(&proxy);
}

#[tokio::test]
async fn world_readable_password_file_is_refused_at_start() {
    let env = Hub::new().await;
    let pw = write_file(env.base.dir.path(), "hub.pw", REGCACHE_PW, 0o644);
    let config = credentials_config(&env, &pw);
    let port = free_port().to_string();
    let out = run_regcache(&[
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--ca-dir",
        env.base.path("ca").to_str().unwrap(),
        "--cache-dir",
        env.base.cache_dir().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a password file readable by others must be refused; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("hub.pw"),
        "the error names the file: {stderr}"
    );
    assert!(
        !stderr.contains(REGCACHE_PW),
        "the error must not print the password: {stderr}"
    );
}

// ---------------------------------------------------------------------------
// 5. Upstream down
// ---------------------------------------------------------------------------

/// regcache with a 1 s tag TTL, so that tags are stale once the registry
/// is stopped (the token service stays up).
async fn proxy_with_short_tags(env: &Hub) -> Proxy {
    env.proxy(Realm::Intercepted)
        .args(["--tag-ttl", "1"])
        .start()
        .await
}

/// GETs every piece of library/open as `c`: all served, the stale tag with
/// `Warning: 110`.
async fn assert_public_served_offline(c: &mut Client<'_>, img: &Image) {
    for path in all_paths(img, img.repo, true) {
        let got = c.get(&path).await;
        got.assert_content(
            &Method::GET,
            want_of(img, &path),
            &format!("{} GET {path} with the upstream down", c.name),
        );
        if path.ends_with(&format!("/manifests/{}", img.tag)) {
            let warning = got.header("warning").unwrap_or_default();
            assert!(
                warning.starts_with("110"),
                "{} GET {path}: stale tag with Warning 110, got {warning:?}",
                c.name
            );
        }
    }
}

#[tokio::test]
async fn upstream_down_serves_private_content_only_to_credentials_verified_before() {
    let env = Hub::new().await;
    let proxy = proxy_with_short_tags(&env).await;
    let mut anon = Client::anonymous(&env, &proxy, Realm::Intercepted);
    anon.pull(&env.open).await;
    let mut alice = Client::user(&env, &proxy, Realm::Intercepted, "alice", ALICE_PW);
    alice.pull(&env.secret).await;
    let mut bob = Client::user(&env, &proxy, Realm::Intercepted, "bob", BOB_PW);
    assert_refused_everywhere(&mut bob, &env.secret, &[SECRET]).await;
    let bob_auth = bob
        .tokens
        .get(&format!("repository:{SECRET}:pull"))
        .map(|t| format!("Bearer {t}"))
        .expect("bob holds a token for the scope (which does not grant it)");

    env.base.reg.stop().await;
    tokio::time::sleep(Duration::from_millis(1200)).await; // tags stale

    // Private: alice (verified before) gets it; bob and anonymous do not.
    for path in all_paths(&env.secret, SECRET, true) {
        let got = alice.get(&path).await;
        got.assert_content(
            &Method::GET,
            want_of(&env.secret, &path),
            &format!("alice GET {path} with the upstream down"),
        );
        for (who, authz) in [("bob", Some(bob_auth.as_str())), ("anonymous", None)] {
            for method in [Method::GET, Method::HEAD] {
                let got = alice.send(method.clone(), &path, authz).await;
                assert!(
                    !got.status.is_success(),
                    "{who} {method} {path} with the upstream down: never verified, must be refused: {}",
                    got.brief()
                );
                assert!(
                    !env.secret.leaked_in(&got.body),
                    "{who} {method} {path}: content leaked"
                );
            }
        }
    }
    // The client that pulled the public image gets it again.
    assert_public_served_offline(&mut anon, &env.open).await;
    env.assert_no_secrets(&proxy);
}

#[tokio::test]
async fn upstream_down_serves_public_content_to_every_client() {
    let env = Hub::new().await;
    let proxy = proxy_with_short_tags(&env).await;
    // One docker-like pull (anonymous token), as when a single CI runner
    // pulled the image before Docker Hub went down.
    let mut first = Client::anonymous(&env, &proxy, Realm::Intercepted);
    first.pull(&env.open).await;

    env.base.reg.stop().await;
    tokio::time::sleep(Duration::from_millis(1200)).await; // tags stale

    // A new anonymous client (fresh anonymous token) and one that sends no
    // credential at all: the repository is public, its content is served.
    let mut fresh = Client::anonymous(&env, &proxy, Realm::Intercepted);
    assert_public_served_offline(&mut fresh, &env.open).await;
    let mut bare = Client::bare(&env, &proxy);
    assert_public_served_offline(&mut bare, &env.open).await;
    env.assert_no_secrets(&proxy);
}

// ---------------------------------------------------------------------------
// 6. Secrets stay secret, also in debug logs
// ---------------------------------------------------------------------------

#[tokio::test]
async fn credentials_never_reach_the_log_or_the_cache_dir() {
    let env = Hub::new().await;
    let pw = write_file(env.base.dir.path(), "hub.pw", REGCACHE_PW, 0o600);
    let config = credentials_config(&env, &pw);
    let proxy = env
        .proxy(Realm::Intercepted)
        .arg("--config")
        .arg(config.to_str().unwrap())
        .env("REGCACHE_LOG", "debug")
        .start()
        .await;
    Client::bare(&env, &proxy).pull(&env.open).await;
    Client::anonymous(&env, &proxy, Realm::Intercepted)
        .pull(&env.open)
        .await;
    let mut alice = Client::user(&env, &proxy, Realm::Intercepted, "alice", ALICE_PW);
    alice.pull(&env.secret).await;
    alice.fetch_all_cached(&env.secret).await;
    let mut bob = Client::user(&env, &proxy, Realm::Intercepted, "bob", BOB_PW);
    bob.pull(&env.other).await;
    assert_refused_everywhere(&mut bob, &env.secret, &[SECRET]).await;
    // Basic straight at the registry (refused by this registry) goes through
    // regcache's paths too.
    let _ = bob
        .send(
            Method::GET,
            &manifest_path(SECRET, "1"),
            Some(&basic("bob", BOB_PW)),
        )
        .await;
    assert!(
        proxy.stderr().contains("regcache::access"),
        "sanity: regcache logged the requests"
    );
    env.assert_no_secrets(&proxy);
}

// ---------------------------------------------------------------------------
// 7. Basic auth registries (htpasswd style)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn basic_auth_registry_content_is_served_only_to_accepted_credentials() {
    let env = Hub::with_mode(Mode::Basic).await;
    let proxy = env.proxy(Realm::Intercepted).start().await;
    let alice = basic("alice", ALICE_PW);
    let bob = basic("bob", BOB_PW);
    let c = Client::bare(&env, &proxy);
    let paths = all_paths(&env.secret, SECRET, true);
    for path in &paths {
        let got = c.send(Method::GET, path, Some(&alice)).await;
        got.assert_content(
            &Method::GET,
            want_of(&env.secret, path),
            &format!("alice (Basic) GET {path}"),
        );
    }
    // Everything fetched for alice carries her credential as sent; the only
    // other request is regcache's own anonymous openness check (a HEAD).
    let first = env.repo_requests(SECRET);
    assert!(
        first.iter().all(
            |r| r.header("authorization").as_deref() == Some(alice.as_str())
                || (r.method == Method::HEAD && r.header("authorization").is_none())
        ),
        "alice's Basic went upstream as sent: {:?}",
        env.describe(&first)
    );
    assert!(
        first
            .iter()
            .filter(|r| r.header("authorization").is_none())
            .count()
            <= 1,
        "one anonymous openness check at most: {:?}",
        env.describe(&first)
    );
    for (who, authz) in [
        ("bob", Some(bob.as_str())),
        ("anonymous", None),
        ("wrong password", Some(&*basic("alice", "guess"))),
    ] {
        for path in &paths {
            for method in [Method::GET, Method::HEAD] {
                let got = c.send(method.clone(), path, authz).await;
                assert_eq!(
                    got.status,
                    StatusCode::UNAUTHORIZED,
                    "{who} {method} {path}: {}",
                    got.brief()
                );
                assert_eq!(
                    got.header("www-authenticate").as_deref(),
                    Some("Basic realm=\"registry.test\""),
                    "{who} {method} {path}: the upstream's challenge"
                );
                assert!(!env.secret.leaked_in(&got.body));
            }
        }
    }
    let before = env.repo_requests(SECRET).len();
    for path in &paths {
        let got = c.send(Method::GET, path, Some(&alice)).await;
        got.assert_content(
            &Method::GET,
            want_of(&env.secret, path),
            &format!("alice again {path}"),
        );
        assert_eq!(got.x_cache(), "HIT", "alice again {path}");
    }
    let again = env.repo_requests(SECRET);
    let again = &again[before..];
    assert!(
        gets(again) == 0 && heads(again) <= 1,
        "alice again: no GET, at most one HEAD; saw {:?}",
        env.describe(again)
    );

    // The registry goes down. skopeo, podman and docker send a credential
    // only when their `/v2/` ping was challenged (containers/image
    // setupRequestAuth: no challenges, no Authorization), so alice's
    // verified password only helps if the ping still asks for it.
    let ping = c.send(Method::GET, "/v2/", None).await;
    assert_eq!(
        ping.status,
        StatusCode::UNAUTHORIZED,
        "/v2/ with the registry up: {}",
        ping.brief()
    );
    env.base.reg.stop().await;
    let ping = c.send(Method::GET, "/v2/", None).await;
    let sent = (ping.status == StatusCode::UNAUTHORIZED).then_some(alice.as_str());
    for path in &paths {
        let got = c.send(Method::GET, path, sent).await;
        got.assert_content(
            &Method::GET,
            want_of(&env.secret, path),
            &format!(
                "registry down: alice as skopeo does it (the /v2/ ping answered {}, so she sent {}) GET {path}",
                ping.status,
                if sent.is_some() { "her password" } else { "no credential" }
            ),
        );
        for (who, authz) in [("bob", Some(bob.as_str())), ("anonymous", None)] {
            let got = c.send(Method::GET, path, authz).await;
            assert!(
                !got.status.is_success() && !env.secret.leaked_in(&got.body),
                "registry down: {who} GET {path} must be refused: {}",
                got.brief()
            );
        }
    }
    env.assert_no_secrets(&proxy);
}
