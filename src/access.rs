//! Who may use the proxy: the client address check and proxy authentication.
//!
//! Two gates, both on the proxy port:
//!
//! * **Client networks** ([`ClientNets`]). A client whose address is not in
//!   `allow` is answered 403 to whatever it asks and the connection is closed.
//!   The decision is taken once, when the connection is accepted: the address
//!   cannot change afterwards. An IPv4 client reaching an IPv6 socket shows up
//!   as `::ffff:a.b.c.d`; such addresses are matched against the IPv4 ranges.
//! * **Proxy users** ([`ProxyUsers`]), when `proxy_users` names an htpasswd
//!   file. Every request must then carry `Proxy-Authorization: Basic …` for a
//!   user of the file, or it is answered 407 with `Proxy-Authenticate`. For a
//!   CONNECT the check covers the whole tunnel. regcache's own set-up pages
//!   (`/healthz`, `/ca.crt`, `/setup`) stay open: they hold nothing secret and
//!   a host needs them before it can be configured.
//!
//! bcrypt is slow on purpose (tens of milliseconds per check), so it runs on
//! the blocking pool, a few at a time, and a credential once accepted is
//! remembered under its SHA-256 (never the credential itself). The
//! `Proxy-Authorization` header is hop-by-hop: it is removed before any
//! request goes upstream and is never logged.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use http::header::{HeaderValue, CONNECTION, PROXY_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::config::secret::{check_private, SecretFileError};
use crate::config::Config;
use crate::http::body::Body;
use crate::http::error::error_response;

/// The realm named in `Proxy-Authenticate`.
pub const REALM: &str = "regcache";

/// Origin-form pages reachable without proxy credentials.
const OPEN_PAGES: [&str; 3] = ["/healthz", "/ca.crt", "/setup"];

/// How many accepted credentials are remembered before the memory is reset.
const VERIFIED_CAPACITY: usize = 4096;

/// Why the access settings could not be loaded; each is fatal at start.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The users file could not be read.
    #[error("cannot read proxy_users file {path}: {source}")]
    Read {
        /// The file named by `proxy_users`.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The users file is readable by other users.
    #[error("proxy_users: {0}")]
    Exposed(#[source] SecretFileError),
    /// A line of the users file is not `user:bcrypt-hash`.
    #[error("proxy_users file {path}, line {line}: {message}")]
    Malformed {
        /// The file named by `proxy_users`.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong with the line (never the hash itself).
        message: String,
    },
    /// The users file names nobody, which would lock every client out.
    #[error("proxy_users file {path} holds no users; add one with: htpasswd -B {path} USER")]
    NoUsers {
        /// The file named by `proxy_users`.
        path: PathBuf,
    },
}

/// Why a request's proxy credentials were not accepted. The variants never
/// carry the password or the header value, so they are safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// No `Proxy-Authorization` header.
    #[error("no Proxy-Authorization header")]
    Missing,
    /// A header that is not `Basic base64(user:password)`.
    #[error("Proxy-Authorization is not Basic user:password")]
    Malformed,
    /// A user name that is not in the file.
    #[error("unknown proxy user")]
    UnknownUser,
    /// A known user with the wrong password.
    #[error("wrong password for proxy user {user:?}")]
    WrongPassword {
        /// The user name (from the file, so safe to log).
        user: String,
    },
    /// The check itself failed (the verifying task panicked).
    #[error("password check failed")]
    Internal,
}

/// The client networks allowed to use the proxy.
#[derive(Debug, Clone)]
pub struct ClientNets {
    nets: Vec<ipnet::IpNet>,
}

impl ClientNets {
    /// Allows exactly these networks.
    pub fn new(nets: Vec<ipnet::IpNet>) -> Self {
        Self { nets }
    }

    /// Whether `ip` is in one of the networks. An IPv4-mapped IPv6 address
    /// (`::ffff:10.1.2.3`) matches as its IPv4 address, and an IPv4 address
    /// also matches a network written in the mapped form.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let (v4, mapped) = match ip.to_canonical() {
            IpAddr::V4(v4) => (Some(IpAddr::V4(v4)), IpAddr::V6(v4.to_ipv6_mapped())),
            v6 => (None, v6),
        };
        self.nets.iter().any(|net| {
            net.contains(&mapped) || v4.is_some_and(|v4| net.contains(&v4)) || net.contains(&ip)
        })
    }
}

/// The users of an htpasswd file (bcrypt hashes only) and the credentials
/// recently accepted.
pub struct ProxyUsers {
    /// User name to bcrypt hash.
    users: HashMap<String, String>,
    /// A hash checked for unknown users, so that they take as long to refuse
    /// as known ones and user names cannot be probed by timing.
    decoy: String,
    /// SHA-256 of `Proxy-Authorization` values already accepted.
    verified: Mutex<HashSet<[u8; 32]>>,
    /// Bounds the bcrypt checks running at once.
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for ProxyUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyUsers")
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

impl ProxyUsers {
    /// Reads an htpasswd file, refusing one that other users can read.
    pub fn load(path: &Path) -> Result<Self, AccessError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccessError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        check_private(path).map_err(AccessError::Exposed)?;
        Self::parse(&text, path)
    }

    /// Parses htpasswd text: one `user:hash` per line, the hash made by
    /// `htpasswd -B` (`$2y$`, or `$2a$`/`$2b$`). Blank lines and lines
    /// starting with `#` are skipped. `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, AccessError> {
        let mut users = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let malformed = |message: String| AccessError::Malformed {
                path: path.to_path_buf(),
                line: index + 1,
                message,
            };
            let (user, hash) = parse_line(line).map_err(malformed)?;
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(malformed(format!("user {user:?} appears twice")));
            }
        }
        let decoy = users
            .values()
            .next()
            .cloned()
            .ok_or_else(|| AccessError::NoUsers {
                path: path.to_path_buf(),
            })?;
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Self {
            users,
            decoy,
            verified: Mutex::new(HashSet::new()),
            permits: Arc::new(Semaphore::new(parallel)),
        })
    }

    /// Checks a `Proxy-Authorization` header value.
    pub async fn check(&self, header: Option<&HeaderValue>) -> Result<(), AuthFailure> {
        let header = header.ok_or(AuthFailure::Missing)?;
        let key: [u8; 32] = Sha256::digest(header.as_bytes()).into();
        if self.remembers(&key) {
            return Ok(());
        }
        let (user, password) = parse_basic(header.as_bytes()).ok_or(AuthFailure::Malformed)?;
        let (hash, known) = match self.users.get(&user) {
            Some(hash) => (hash.clone(), true),
            None => (self.decoy.clone(), false),
        };
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| AuthFailure::Internal)?;
        let matched = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            bcrypt::verify(password, &hash).unwrap_or(false)
        })
        .await
        .map_err(|_| AuthFailure::Internal)?;
        match (known, matched) {
            (true, true) => {
                self.remember(key);
                Ok(())
            }
            (true, false) => Err(AuthFailure::WrongPassword { user }),
            (false, _) => Err(AuthFailure::UnknownUser),
        }
    }

    fn remembers(&self, key: &[u8; 32]) -> bool {
        self.verified
            .lock()
            .map(|set| set.contains(key))
            .unwrap_or(false)
    }

    fn remember(&self, key: [u8; 32]) {
        if let Ok(mut set) = self.verified.lock() {
            if set.len() >= VERIFIED_CAPACITY {
                set.clear();
            }
            set.insert(key);
        }
    }
}

/// Marks a request whose `Proxy-Authorization` named a user of
/// `proxy_users`: a request extension, set by the proxy on the request
/// itself and, for a CONNECT, on every request inside its tunnel (the check
/// covers the whole tunnel). Offline registries serve private content only
/// to such requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyUser;

/// Both gates, built once at start from the [`Config`].
#[derive(Debug)]
pub struct Access {
    /// The client networks allowed.
    pub nets: ClientNets,
    /// The proxy users, when `proxy_users` is set.
    pub users: Option<ProxyUsers>,
}

impl Access {
    /// Loads the access settings; reads the users file if one is configured.
    pub fn from_config(config: &Config) -> Result<Self, AccessError> {
        let users = match &config.proxy_users {
            Some(path) => Some(ProxyUsers::load(path)?),
            None => None,
        };
        Ok(Self {
            nets: ClientNets::new(config.allow.clone()),
            users,
        })
    }

    /// The users whose credentials `req` must carry, or `None` when it needs
    /// none (no users file, one of the open set-up pages, or the admin API,
    /// which has its own rule: loopback or its bearer token).
    pub fn users_for<B>(&self, req: &Request<B>) -> Option<&ProxyUsers> {
        let users = self.users.as_ref()?;
        (!is_open_page(req) && !is_admin_api(req)).then_some(users)
    }
}

/// Whether `req` is an origin-form request for one of the set-up pages.
pub fn is_open_page<B>(req: &Request<B>) -> bool {
    req.method() != Method::CONNECT
        && req.uri().scheme().is_none()
        && req.uri().authority().is_none()
        && OPEN_PAGES.contains(&req.uri().path())
}

/// Whether `req` is an origin-form request for the admin API (`/api/v1/…`,
/// see `crate::admin::api`).
pub fn is_admin_api<B>(req: &Request<B>) -> bool {
    let path = req.uri().path();
    req.method() != Method::CONNECT
        && req.uri().scheme().is_none()
        && req.uri().authority().is_none()
        && (path.starts_with("/api/v1/") || path == "/api/v1")
}

/// The 407 answer asking for proxy credentials.
pub fn auth_required() -> Response<Body> {
    let mut resp = error_response(
        StatusCode::PROXY_AUTHENTICATION_REQUIRED,
        "this proxy needs a user name and password (Proxy-Authorization: Basic)",
    );
    resp.headers_mut().insert(
        PROXY_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"regcache\""),
    );
    resp
}

/// The 403 answer to a client outside `allow`; the connection closes after it.
pub fn client_refused() -> Response<Body> {
    let mut resp = error_response(
        StatusCode::FORBIDDEN,
        "your address is not allowed to use this proxy (see `allow` in regcache's configuration)",
    );
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Splits one non-blank htpasswd line into user and bcrypt hash.
fn parse_line(line: &str) -> Result<(&str, &str), String> {
    let Some((user, hash)) = line.split_once(':') else {
        return Err("expected user:hash, as written by htpasswd -nbB USER PASSWORD".into());
    };
    if user.is_empty() {
        return Err("the user name is empty".into());
    }
    let bcrypt_prefix = ["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p));
    if !bcrypt_prefix {
        return Err(format!(
            "the hash for user {user:?} is not bcrypt; only bcrypt is supported (htpasswd -B)"
        ));
    }
    if hash.parse::<bcrypt::HashParts>().is_err() {
        return Err(format!("the bcrypt hash for user {user:?} is damaged"));
    }
    Ok((user, hash))
}

/// Decodes `Basic base64(user:password)`; the scheme is case-insensitive.
fn parse_basic(value: &[u8]) -> Option<(String, Vec<u8>)> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> ClientNets {
        ClientNets::new(list.iter().map(|n| n.parse().unwrap()).collect())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_matching() {
        let allow = nets(&["127.0.0.0/8", "10.0.0.0/8", "fd00::/8"]);
        assert!(allow.allows(ip("127.0.0.1")));
        assert!(allow.allows(ip("10.255.1.2")));
        assert!(allow.allows(ip("fd00::2")));
        assert!(!allow.allows(ip("11.0.0.1")));
        assert!(!allow.allows(ip("192.168.1.1")));
        assert!(!allow.allows(ip("::1")));
        assert!(!allow.allows(ip("fe80::1")));
        assert!(!nets(&[]).allows(ip("127.0.0.1")));
        assert!(nets(&["192.0.2.7/32"]).allows(ip("192.0.2.7")));
        assert!(!nets(&["192.0.2.7/32"]).allows(ip("192.0.2.8")));
    }

    #[test]
    fn mapped_ipv6_matches_ipv4_networks() {
        let allow = nets(&["10.0.0.0/8"]);
        assert!(allow.allows(ip("::ffff:10.1.2.3")));
        assert!(!allow.allows(ip("::ffff:11.1.2.3")));
        // The other way round: a network written in the mapped form.
        let mapped = nets(&["::ffff:10.0.0.0/104"]);
        assert!(mapped.allows(ip("10.1.2.3")));
        assert!(mapped.allows(ip("::ffff:10.1.2.3")));
        assert!(!mapped.allows(ip("11.1.2.3")));
        // ::/0 covers mapped addresses and so every IPv4 client: that is
        // what the network says.
        assert!(nets(&["::/0"]).allows(ip("10.1.2.3")));
        assert!(!nets(&["::1/128"]).allows(ip("127.0.0.1")));
    }

    fn users_text(entries: &[(&str, &str)]) -> String {
        entries
            .iter()
            .map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 4).unwrap()))
            .collect()
    }

    fn basic(user: &str, password: &str) -> HeaderValue {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
    }

    fn parse_error(text: &str) -> String {
        ProxyUsers::parse(text, Path::new("users"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn htpasswd_parsing() {
        let mut text = String::from("# proxy users\n\n");
        text.push_str(&users_text(&[("alice", "a1"), ("bob", "b:2")]));
        // htpasswd -nbB writes $2y$; the crate writes $2b$.
        text.push_str(&format!(
            "carol:{}\n",
            bcrypt::hash("c3", 4).unwrap().replacen("$2b$", "$2y$", 1)
        ));
        let users = ProxyUsers::parse(&text, Path::new("users")).unwrap();
        assert_eq!(users.users.len(), 3);

        let good = "alice:$2y$04$n4Uy0eSnMfvnESYL.bLwuuj0U/ETSsoTpRT9GVk5bektyVVa5xnIi";
        let err = parse_error(&format!("{good}\nno-colon-here\n"));
        assert!(err.contains("line 2") && err.contains("user:hash"), "{err}");
        let err = parse_error("bob:$apr1$abc$def\n");
        assert!(
            err.contains("line 1") && err.contains("not bcrypt"),
            "{err}"
        );
        let err = parse_error(":$2y$04$n4Uy0eSnMfvnESYL.bLwuuj0U/ETSsoTpRT9GVk5bektyVVa5xnIi");
        assert!(err.contains("line 1") && err.contains("empty"), "{err}");
        let err = parse_error("\n\nbob:$2y$04$short\n");
        assert!(err.contains("line 3") && err.contains("damaged"), "{err}");
        let err = parse_error(&format!("{good}\n{good}\n"));
        assert!(err.contains("line 2") && err.contains("twice"), "{err}");
        let err = parse_error("# nobody\n");
        assert!(err.contains("no users"), "{err}");
    }

    #[tokio::test]
    async fn verification() {
        let text = users_text(&[("alice", "a1"), ("bob", "b:2")]);
        let users = ProxyUsers::parse(&text, Path::new("users")).unwrap();
        assert_eq!(users.check(Some(&basic("alice", "a1"))).await, Ok(()));
        // A password may itself contain a colon.
        assert_eq!(users.check(Some(&basic("bob", "b:2"))).await, Ok(()));
        // Remembered: answered again, and only under its hash.
        assert_eq!(users.check(Some(&basic("alice", "a1"))).await, Ok(()));
        assert_eq!(users.verified.lock().unwrap().len(), 2);
        assert_eq!(
            users.check(Some(&basic("alice", "wrong"))).await,
            Err(AuthFailure::WrongPassword {
                user: "alice".into()
            })
        );
        assert_eq!(
            users.check(Some(&basic("mallory", "a1"))).await,
            Err(AuthFailure::UnknownUser)
        );
        assert_eq!(users.check(None).await, Err(AuthFailure::Missing));
        for bad in ["Bearer abc", "Basic !!!", "Basic", "Basic YWxpY2U="] {
            let value = HeaderValue::from_static(bad);
            assert_eq!(
                users.check(Some(&value)).await,
                Err(AuthFailure::Malformed),
                "{bad}"
            );
        }
        let lower = HeaderValue::from_str(
            &basic("alice", "a1")
                .to_str()
                .unwrap()
                .replace("Basic", "basic"),
        )
        .unwrap();
        assert_eq!(users.check(Some(&lower)).await, Ok(()));
    }

    #[test]
    fn open_pages_are_origin_form_only() {
        let req = |method: Method, uri: &str| Request::builder().method(method).uri(uri).body(());
        assert!(is_open_page(&req(Method::GET, "/ca.crt").unwrap()));
        assert!(is_open_page(&req(Method::GET, "/healthz").unwrap()));
        assert!(is_open_page(&req(Method::HEAD, "/setup").unwrap()));
        assert!(!is_open_page(&req(Method::GET, "/metrics").unwrap()));
        assert!(!is_open_page(
            &req(Method::GET, "http://upstream.test/ca.crt").unwrap()
        ));
        assert!(!is_open_page(
            &req(Method::CONNECT, "upstream.test:443").unwrap()
        ));
    }

    #[test]
    fn answers() {
        let resp = auth_required();
        assert_eq!(resp.status(), StatusCode::PROXY_AUTHENTICATION_REQUIRED);
        assert_eq!(
            resp.headers()[PROXY_AUTHENTICATE],
            format!("Basic realm=\"{REALM}\"").as_str()
        );
        let resp = client_refused();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(resp.headers()[CONNECTION], "close");
    }
}
