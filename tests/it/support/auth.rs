//! Registry authentication for the in-process registry
//! ([`Registry`](super::registry::Registry)): Docker Hub's token flow, or plain Basic.
//!
//! One [`Auth`] holds the accounts (users, passwords, which private
//! repositories each may pull), the public repositories, and every token it
//! issued. It plugs into two registries through their hooks:
//!
//! * [`Auth::registry_hook`] on the registry host (`registry-1.docker.io`):
//!   `/v2/` and every `/v2/<name>/…` request needs `Authorization: Bearer T`
//!   with a token `T` that was issued for a pull of `<name>` and not revoked;
//!   anything else gets `401` with
//!   `WWW-Authenticate: Bearer realm="https://auth.test/token",service="registry.test",scope="repository:<name>:pull"`
//!   (no `scope` for `/v2/`), with a JSON error body for GETs. With
//!   [`Mode::Basic`] it takes `Authorization: Basic user:password` instead
//!   (public repositories need none) and challenges with
//!   `Basic realm="registry.test"`.
//! * [`Auth::token_hook`] on the token host (`auth.test`): `GET /token?service=…&scope=…`
//!   answers `{"token":"…","access_token":"…","expires_in":300}`, for
//!   anonymous requests (public repositories only in the grant) or with
//!   `Authorization: Basic` of a known user (`401` for a wrong password).
//!   Like Docker Hub it issues a token even for scopes the caller may not
//!   pull; the registry then refuses that token for those repositories.
//!
//! Knobs: [`Auth::revoke`] (every token of a user stops working),
//! [`Auth::make_private`], [`Auth::mint`] (a token issued out of band).
//! Records: [`Auth::token_requests`] and
//! [`Auth::subject_of`] (whose token an `Authorization` value carries), to
//! assert what regcache sent where.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use base64::Engine as _;

use super::registry::{Answer, Req};

/// The token service's host name (its realm is `https://auth.test/token`).
pub const REALM_HOST: &str = "auth.test";
/// The realm URL in challenges.
const REALM: &str = "https://auth.test/token";
/// The `service` in challenges and token requests.
const SERVICE: &str = "registry.test";

/// How the registry wants to be authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Docker Hub: a bearer token from the realm.
    Bearer,
    /// htpasswd-style: Basic user:password on every request.
    Basic,
}

/// One token as issued.
#[derive(Debug, Clone)]
struct Issued {
    /// The user it was issued to; None for an anonymous token.
    subject: Option<String>,
    /// Repositories it may pull.
    repos: HashSet<String>,
    /// Whether [`Auth::revoke`] revoked it.
    revoked: bool,
}

/// One request to the token endpoint.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// The Authorization header it carried, as sent.
    pub authorization: Option<String>,
    /// The user it authenticated as (None: anonymous or refused).
    pub subject: Option<String>,
    /// The token given (None when refused).
    pub token: Option<String>,
}

#[derive(Default)]
struct State {
    passwords: HashMap<String, String>,
    grants: HashMap<String, HashSet<String>>,
    public: HashSet<String>,
    tokens: HashMap<String, Issued>,
    requests: Vec<TokenRequest>,
    issued: u64,
}

/// Accounts, public repositories and tokens, shared by the hooks.
#[derive(Clone)]
pub struct Auth {
    mode: Mode,
    state: Arc<Mutex<State>>,
}

impl Auth {
    /// No accounts, no public repositories, no tokens yet.
    pub fn new(mode: Mode) -> Auth {
        Auth {
            mode,
            state: Arc::default(),
        }
    }

    /// How the registry wants to be authenticated.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Adds a user with `password` who may pull the private `repos`.
    pub fn user(&self, name: &str, password: &str, repos: &[&str]) -> &Self {
        let mut st = self.lock();
        st.passwords.insert(name.into(), password.into());
        st.grants
            .entry(name.into())
            .or_default()
            .extend(repos.iter().map(|r| r.to_string()));
        self
    }

    /// Makes `repo` pullable by anyone (anonymous tokens grant it).
    pub fn public(&self, repo: &str) -> &Self {
        self.lock().public.insert(repo.into());
        self
    }

    /// Makes `repo` private again: anonymous tokens stop granting it, those
    /// issued before included (as a registry that checks access on every
    /// request; a JWT would keep its grant until it expires); Basic mode:
    /// anonymous requests are refused.
    pub fn make_private(&self, repo: &str) {
        let mut st = self.lock();
        st.public.remove(repo);
        for t in st.tokens.values_mut() {
            if t.subject.is_none() {
                t.repos.remove(repo);
            }
        }
    }

    /// A token for `subject` granting `repos`, as if issued earlier (a
    /// personal access token put in a file, say).
    pub fn mint(&self, subject: &str, repos: &[&str]) -> String {
        let mut st = self.lock();
        st.issued += 1;
        let token = format!(
            "pat.{subject}.{}.{:016x}",
            st.issued,
            0x2545_F491_4F6C_DD1Du64.wrapping_mul(st.issued * 2 + 1)
        );
        st.tokens.insert(
            token.clone(),
            Issued {
                subject: Some(subject.into()),
                repos: repos.iter().map(|r| r.to_string()).collect(),
                revoked: false,
            },
        );
        token
    }

    /// Every token issued to `name` stops working (401 from the registry).
    pub fn revoke(&self, name: &str) {
        for t in self.lock().tokens.values_mut() {
            if t.subject.as_deref() == Some(name) {
                t.revoked = true;
            }
        }
    }

    /// Every request to the token endpoint so far.
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.lock().requests.clone()
    }

    /// Every token issued so far (the secrets to look for in logs).
    pub fn tokens(&self) -> Vec<String> {
        self.lock().tokens.keys().cloned().collect()
    }

    /// Whose credential an `Authorization` value is: `Some(Some(user))` for
    /// a user's token or Basic, `Some(None)` for an anonymous token, None for
    /// no header or one this service never issued.
    pub fn subject_of(&self, authorization: Option<&str>) -> Option<Option<String>> {
        let value = authorization?;
        if let Some(token) = value.strip_prefix("Bearer ") {
            return self.lock().tokens.get(token).map(|t| t.subject.clone());
        }
        let (user, _) = basic_credentials(value)?;
        Some(Some(user))
    }

    /// What the registry answers `method path` with `authorization`, as its
    /// hook would (None: the content decides, i.e. 200 or 404).
    pub fn decide(&self, path: &str, authorization: Option<&str>) -> Option<Answer> {
        if !path.starts_with("/v2/") && path != "/v2" {
            return None;
        }
        let name = repo_of(path);
        let allowed = match self.mode {
            Mode::Bearer => self.bearer_allows(authorization, name.as_deref()),
            Mode::Basic => self.basic_allows(authorization, name.as_deref()),
        };
        if allowed {
            if name.is_none() {
                return Some(Answer::json(200, vec![], "{}"));
            }
            return None;
        }
        let challenge = match (self.mode, &name) {
            (Mode::Basic, _) => format!("Basic realm=\"{SERVICE}\""),
            (Mode::Bearer, None) => format!("Bearer realm=\"{REALM}\",service=\"{SERVICE}\""),
            (Mode::Bearer, Some(n)) => format!(
                "Bearer realm=\"{REALM}\",service=\"{SERVICE}\",scope=\"repository:{n}:pull\""
            ),
        };
        Some(Answer::error(
            401,
            path,
            vec![("www-authenticate".into(), challenge)],
        ))
    }

    fn bearer_allows(&self, authorization: Option<&str>, name: Option<&str>) -> bool {
        let Some(token) = authorization.and_then(|a| a.strip_prefix("Bearer ")) else {
            return false;
        };
        let st = self.lock();
        let Some(t) = st.tokens.get(token) else {
            return false;
        };
        !t.revoked && name.is_none_or(|n| t.repos.contains(n))
    }

    fn basic_allows(&self, authorization: Option<&str>, name: Option<&str>) -> bool {
        let st = self.lock();
        if name.is_some_and(|n| st.public.contains(n)) {
            return true;
        }
        drop(st);
        let Some((user, password)) = authorization.and_then(basic_credentials) else {
            return false;
        };
        let st = self.lock();
        if st.passwords.get(&user) != Some(&password) {
            return false;
        }
        name.is_none_or(|n| {
            st.public.contains(n) || st.grants.get(&user).is_some_and(|g| g.contains(n))
        })
    }

    /// The hook for the registry host.
    pub fn registry_hook(&self) -> impl Fn(&Req) -> Option<Answer> + Send + Sync + 'static {
        let auth = self.clone();
        move |req: &Req| auth.decide(&req.path, req.header("authorization").as_deref())
    }

    /// The hook for the token host: answers `/token`, 404 for anything else.
    pub fn token_hook(&self) -> impl Fn(&Req) -> Option<Answer> + Send + Sync + 'static {
        let auth = self.clone();
        move |req: &Req| {
            if req.path != "/token" {
                return Some(Answer::error(404, &req.path, vec![]));
            }
            Some(auth.issue(req))
        }
    }

    fn issue(&self, req: &Req) -> Answer {
        let authorization = req.header("authorization");
        let scopes: Vec<String> =
            form_urlencoded::parse(req.query.as_deref().unwrap_or("").as_bytes())
                .filter(|(k, _)| k == "scope")
                .map(|(_, v)| v.into_owned())
                .collect();
        let mut st = self.lock();
        let subject = match authorization.as_deref().map(basic_credentials) {
            None => Ok(None),
            Some(Some((user, password))) if st.passwords.get(&user) == Some(&password) => {
                Ok(Some(user))
            }
            Some(_) => Err(()),
        };
        let Ok(subject) = subject else {
            st.requests.push(TokenRequest {
                authorization,
                subject: None,
                token: None,
            });
            return Answer::json(
                401,
                vec![],
                r#"{"details":"incorrect username or password"}"#,
            );
        };
        let mut repos = HashSet::new();
        for scope in &scopes {
            // repository:<name>:pull[,push]
            let mut it = scope.splitn(3, ':');
            let (Some("repository"), Some(name), Some(actions)) = (it.next(), it.next(), it.next())
            else {
                continue;
            };
            if !actions.split(',').any(|a| a == "pull") {
                continue;
            }
            let granted = st.public.contains(name)
                || subject
                    .as_ref()
                    .and_then(|u| st.grants.get(u))
                    .is_some_and(|g| g.contains(name));
            if granted {
                repos.insert(name.to_owned());
            }
        }
        st.issued += 1;
        let who = subject.as_deref().unwrap_or("anon");
        let token = format!(
            "tk.{who}.{}.{:016x}",
            st.issued,
            0x5DEE_CE66_D1CE_F00Du64.wrapping_mul(st.issued * 2 + 1)
        );
        st.tokens.insert(
            token.clone(),
            Issued {
                subject: subject.clone(),
                repos,
                revoked: false,
            },
        );
        st.requests.push(TokenRequest {
            authorization,
            subject,
            token: Some(token.clone()),
        });
        Answer::json(
            200,
            vec![],
            serde_json::json!({
                "token": token,
                "access_token": token,
                "expires_in": 300,
                "issued_at": "2024-01-01T00:00:00Z",
            })
            .to_string(),
        )
    }
}

/// `Basic base64(user:password)` → (user, password).
fn basic_credentials(value: &str) -> Option<(String, String)> {
    let b64 = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

/// The repository a `/v2/<name>/(manifests|blobs|tags)/…` path names; None
/// for `/v2/` itself.
pub fn repo_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v2/")?;
    for marker in ["/manifests/", "/blobs/", "/tags/"] {
        if let Some(i) = rest.rfind(marker) {
            return Some(rest[..i].to_owned());
        }
    }
    if rest.is_empty() {
        None
    } else {
        Some(rest.trim_end_matches('/').to_owned())
    }
}
