//! Who may see cached content, the I/O half: what regcache remembers, the
//! questions it asks the registry, and the token flow. The verdicts
//! themselves are pure functions in [`crate::registry::sharing`].
//!
//! - A repository is **public** when the upstream accepts an anonymous pull.
//!   regcache checks that itself (an anonymous `HEAD`, following a Bearer
//!   challenge with an anonymous token) and remembers it for `public_ttl`.
//!   Cached content of a public repository is served to every client.
//! - Content of any other repository is served from the cache only to a
//!   client whose credential (its exact `Authorization` value) the upstream
//!   accepted for that repository within `auth_ttl`: one `HEAD` with the
//!   client's own credential, remembered under a SHA-256 of registry,
//!   repository and credential, never the credential itself. Anyone else gets
//!   what the upstream answers (401 with its challenge, 403, 404).
//! - While the upstream is unreachable, what was learnt before still counts.
//! - regcache's own account at a registry (`[registries."HOST"]`) is used for
//!   requests that carry no credential, for public repositories only: it
//!   raises rate limits and never opens what the client could not open.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use base64::Engine as _;
use http::header::{HeaderValue, AUTHORIZATION, COOKIE, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, StatusCode};
use sha2::{Digest as _, Sha256};

use super::coalesce::{Coalescer, Turn};
use super::{
    error_json, refusal, upstream_headers, upstream_uri, CacheStatus, RepoRequest, Served,
};
use crate::cache::freshness::now_ms;
use crate::config::secret::{read_secret, SecretFileError};
use crate::config::{Config, UpstreamCredential};
use crate::registry::auth::{parse_challenge, pull_scope, BearerChallenge, Challenge};
use crate::registry::error::ErrorCode;
use crate::registry::sharing::{
    after_anonymous_token, after_asking, before_asking, learnt_from, probe_outcome, AnonymousToken,
    Answer, Credential, Learnt, Openness, Probe, Verdict,
};
use crate::upstream::redirect::FetchError;
use crate::upstream::token::TokenError;

/// Why regcache's own registry accounts (`[registries."HOST"]`) could not be
/// loaded; fatal at start.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// A password or token file is unreadable or readable by other users.
    #[error("registry account: {0}")]
    Secret(#[from] SecretFileError),
    /// The credential holds characters an `Authorization` header cannot.
    #[error("registry account for {registry}: the credential contains characters not allowed in a header")]
    NotAHeader {
        /// The registry whose account it is.
        registry: String,
    },
}

/// What a running regcache learnt about who may see which repository.
///
/// Openness is kept in the cache index (it survives restarts, so public
/// content stays shared while upstream is down); verified credentials and
/// registries' challenges only in memory.
pub struct Sharing {
    challenges: Mutex<HashMap<String, Challenge>>,
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    accounts: HashMap<String, HeaderValue>,
    /// Each registry's last `/v2/` challenge, to repeat while it is down.
    base_challenges: Mutex<HashMap<String, HeaderValue>>,
    /// Repositories whose openness is being probed in the background.
    probing: Mutex<std::collections::HashSet<String>>,
    /// Openness probes a request waits for, one per repository at a time.
    probes: Coalescer<Option<Openness>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sharing {
    /// Reads regcache's own registry accounts (files must not be readable by
    /// other users).
    pub fn new(config: &Config) -> Result<Self, AccountError> {
        let mut accounts = HashMap::new();
        for (registry, credential) in &config.credentials {
            let value = match credential {
                UpstreamCredential::Basic {
                    username,
                    password_file,
                } => {
                    let password = read_secret(password_file)?;
                    let encoded = base64::engine::general_purpose::STANDARD
                        .encode(format!("{username}:{password}"));
                    format!("Basic {encoded}")
                }
                UpstreamCredential::Token(file) => format!("Bearer {}", read_secret(file)?),
            };
            let mut value =
                HeaderValue::from_str(&value).map_err(|_| AccountError::NotAHeader {
                    registry: registry.clone(),
                })?;
            value.set_sensitive(true);
            accounts.insert(registry.clone(), value);
        }
        Ok(Self {
            challenges: Mutex::default(),
            verified: Mutex::default(),
            accounts,
            base_challenges: Mutex::default(),
            probing: Mutex::default(),
            probes: Coalescer::default(),
        })
    }

    /// Remembers the challenge a registry's `/v2/` answered with.
    pub fn remember_base_challenge(&self, registry: &str, challenge: &HeaderValue) {
        lock(&self.base_challenges).insert(registry.to_string(), challenge.clone());
    }

    /// The `/v2/` challenge to repeat while the registry is down: only a
    /// Basic one, which clients can answer without reaching anything else
    /// (a Bearer challenge would send them to a token realm that is likely
    /// down too, and would keep them from pulling public content).
    pub fn offline_base_challenge(&self, registry: &str) -> Option<HeaderValue> {
        let value = lock(&self.base_challenges).get(registry)?.clone();
        let basic = value
            .to_str()
            .ok()
            .and_then(parse_challenge)
            .is_some_and(|c| c == Challenge::Basic);
        basic.then_some(value)
    }

    fn verified_at(&self, key: &[u8; 32]) -> Option<Instant> {
        lock(&self.verified).get(key).copied()
    }
}

/// What is known of the repository's openness, and whether it is still
/// fresh (learnt within `public_ttl`).
fn openness(req: &RepoRequest<'_>) -> Option<(Openness, bool)> {
    let state = req.state;
    let (public, at) = state.cache.openness(&req.target.registry, req.repo())?;
    let fresh = at >= state.public_since();
    Some((Openness::of(public), fresh))
}

/// The key of per-repository memories: `registry/repo`.
fn repo_key(req: &RepoRequest<'_>) -> String {
    format!("{}/{}", req.target.registry, req.repo())
}

/// Records the repository's openness (and the registry's challenge, if seen).
async fn learn_openness(req: &RepoRequest<'_>, openness: Openness, challenge: Option<Challenge>) {
    let state = req.state;
    if let Some(challenge) = challenge {
        lock(&state.sharing.challenges).insert(repo_key(req), challenge);
    }
    let public = openness == Openness::Public;
    if let Err(e) = state
        .cache
        .set_openness(&req.target.registry, req.repo(), public, now_ms())
        .await
    {
        tracing::warn!(error = %e, "cannot record whether a repository is public");
    }
}

fn credential_key(registry: &str, repo: &str, credential: &HeaderValue) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [registry.as_bytes(), repo.as_bytes(), credential.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// Remembers what an upstream answer to a request made for this client
/// proves ([`learnt_from`]).
pub async fn learn(req: &RepoRequest<'_>, status: StatusCode) {
    let state = req.state;
    let credential = req.parts.headers.get(AUTHORIZATION);
    let account = state.sharing.accounts.contains_key(&req.target.registry);
    match learnt_from(status, credential.is_some(), account) {
        Learnt::Credential => {
            if let Some(credential) = credential {
                let key = credential_key(&req.target.registry, req.repo(), credential);
                lock(&state.sharing.verified).insert(key, Instant::now());
            }
            // Learn soon whether everyone may see this repository, so that
            // its content is shared (and stays shared while upstream is down).
            if !matches!(openness(req), Some((_, true))) {
                probe_in_background(req);
            }
        }
        Learnt::Public => learn_openness(req, Openness::Public, None).await,
        Learnt::Nothing => {}
    }
}

/// The headers for regcache's own upstream request on behalf of this client:
/// the client's, plus regcache's account for a public repository when the
/// client sent no credential.
async fn upstream_request_headers(req: &RepoRequest<'_>) -> HeaderMap {
    let mut headers = upstream_headers(req.parts);
    let has_account = req
        .state
        .sharing
        .accounts
        .contains_key(&req.target.registry);
    if headers.contains_key(AUTHORIZATION) || !has_account {
        return headers;
    }
    if public(req).await != Some(Openness::Public) {
        return headers;
    }
    if let Some(value) = account_authorization(req).await {
        headers.insert(AUTHORIZATION, value);
    }
    headers
}

/// The Bearer challenge of a 401 answer, if it has one.
fn bearer_challenge(
    resp: &http::Response<crate::upstream::UpstreamBody>,
) -> Option<BearerChallenge> {
    if resp.status() != StatusCode::UNAUTHORIZED {
        return None;
    }
    let challenge = resp
        .headers()
        .get(WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_challenge)?;
    match challenge {
        Challenge::Bearer(bearer) => Some(bearer),
        Challenge::Basic => None,
    }
}

/// The one token retry: gets a pull token for the repository from the
/// challenge's realm (with `basic`, regcache's own account, or anonymously)
/// and sends the request once more with it. Err is the token step's failure;
/// the caller decides what that means.
async fn retry_with_token(
    req: &RepoRequest<'_>,
    bearer: &BearerChallenge,
    basic: Option<&HeaderValue>,
    (method, uri, mut headers): (Method, http::Uri, HeaderMap),
) -> Result<Result<http::Response<crate::upstream::UpstreamBody>, FetchError>, TokenError> {
    let upstream = &req.state.upstream;
    let token = upstream
        .bearer_token(bearer, &pull_scope(req.repo()), basic)
        .await?;
    let value = bearer_value(&token)
        .ok_or_else(|| TokenError::Invalid("token not usable in a header".into()))?;
    headers.insert(AUTHORIZATION, value);
    Ok(upstream.fetch(method, uri, headers).await)
}

/// Sends regcache's upstream request on behalf of this client, and learns
/// from the answer. A client without credentials is treated as docker treats
/// an anonymous pull: on a Bearer challenge, regcache gets a token for it
/// (with its own account when configured, else anonymously) and asks again,
/// so mirror clients and anonymous clients get public content.
pub async fn fetch_for(
    req: &RepoRequest<'_>,
    method: Method,
    uri: http::Uri,
) -> Result<http::Response<crate::upstream::UpstreamBody>, FetchError> {
    let state = req.state;
    let headers = upstream_request_headers(req).await;
    let anonymous = !headers.contains_key(AUTHORIZATION);
    let mut resp = state
        .upstream
        .fetch(method.clone(), uri.clone(), headers.clone())
        .await?;
    if let Some(bearer) = bearer_challenge(&resp).filter(|_| anonymous) {
        // regcache's own account only for a repository known to be
        // public; anything else gets an anonymous token, so that the
        // answer is what an anonymous client would get.
        let public = matches!(openness(req), Some((Openness::Public, true)));
        let account = state
            .sharing
            .accounts
            .get(&req.target.registry)
            .filter(|_| public);
        let basic = account.filter(|a| a.as_bytes().starts_with(b"Basic "));
        if let Ok(retried) = retry_with_token(req, &bearer, basic, (method, uri, headers)).await {
            resp = retried?;
        }
        lock(&state.sharing.challenges).insert(repo_key(req), Challenge::Bearer(bearer));
    }
    learn(req, resp.status()).await;
    Ok(resp)
}

/// regcache's `Authorization` for the repository: a token from the
/// registry's realm got with the account, or the account's own value.
async fn account_authorization(req: &RepoRequest<'_>) -> Option<HeaderValue> {
    let state = req.state;
    let account = state.sharing.accounts.get(&req.target.registry)?;
    let challenge = lock(&state.sharing.challenges).get(&repo_key(req)).cloned();
    match challenge {
        Some(Challenge::Bearer(bearer)) if account.as_bytes().starts_with(b"Basic ") => match state
            .upstream
            .bearer_token(&bearer, &pull_scope(req.repo()), Some(account))
            .await
        {
            Ok(token) => bearer_value(&token),
            Err(e) => {
                tracing::warn!(registry = %req.target.registry, error = %e, "regcache's registry account got no token; asking anonymously");
                None
            }
        },
        _ => Some(account.clone()),
    }
}

fn bearer_value(token: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// Whether the repository is public: learnt within `public_ttl`, else asked
/// anonymously (one probe per repository however many requests wait), else
/// what was learnt before. None when unknown (upstream unreachable and
/// nothing learnt before).
async fn public(req: &RepoRequest<'_>) -> Option<Openness> {
    let known = openness(req);
    if let Some((openness, true)) = known {
        return Some(openness);
    }
    let found = match req.state.sharing.probes.join(repo_key(req)) {
        Turn::Lead(lead) => {
            let found = match probe_anonymously(req).await {
                Some((openness, challenge)) => {
                    learn_openness(req, openness, challenge).await;
                    Some(openness)
                }
                None => None,
            };
            lead.finish(found);
            found
        }
        Turn::Follow(follow) => follow.outcome().await.flatten(),
    };
    found.or(known.map(|(openness, _)| openness))
}

/// Starts an anonymous openness probe of the repository, unless one is
/// running. The probe is a real request head of its own: this request's
/// path and headers, as a `HEAD`, without the client's identity.
fn probe_in_background(req: &RepoRequest<'_>) {
    let key = repo_key(req);
    let state = req.state;
    if !lock(&state.sharing.probing).insert(key.clone()) {
        return;
    }
    let mut probe = http::Request::builder()
        .method(Method::HEAD)
        .uri(req.parts.uri.clone())
        .body(())
        .map(|r| r.into_parts().0);
    if let Ok(probe) = &mut probe {
        probe.headers = req.parts.headers.clone();
        probe.headers.remove(AUTHORIZATION);
        probe.headers.remove(COOKIE);
    }
    let (state, target, name, rule) = (
        state.clone(),
        req.target.clone(),
        req.name.clone(),
        req.rule,
    );
    tokio::spawn(async move {
        if let Ok(parts) = probe {
            let req = RepoRequest::new(&state, &target, &name, &parts, rule);
            if let Some((found, challenge)) = probe_anonymously(&req).await {
                learn_openness(&req, found, challenge).await;
            }
        }
        lock(&state.sharing.probing).remove(&key);
    });
}

/// Asks upstream for this request's path with no credential (following a
/// Bearer challenge with an anonymous token). None if upstream gave no answer
/// that settles it.
async fn probe_anonymously(req: &RepoRequest<'_>) -> Option<(Openness, Option<Challenge>)> {
    let uri = upstream_uri(req.target, req.parts).ok()?;
    let mut headers = upstream_headers(req.parts);
    // Anonymous: nothing of the client's identity goes along.
    headers.remove(AUTHORIZATION);
    headers.remove(COOKIE);
    let resp = req
        .state
        .upstream
        .fetch(Method::HEAD, uri.clone(), headers.clone())
        .await
        .ok()?;
    let challenge = resp
        .headers()
        .get(WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_challenge);
    let bearer = bearer_challenge(&resp);
    let openness = match (probe_outcome(resp.status(), bearer.is_some()), bearer) {
        (Probe::Settled(openness), _) => Some(openness),
        (Probe::Unsettled, _) => None,
        (Probe::NeedsToken, None) => None,
        (Probe::NeedsToken, Some(bearer)) => {
            let token =
                match retry_with_token(req, &bearer, None, (Method::HEAD, uri, headers)).await {
                    Err(TokenError::Refused(_)) => AnonymousToken::Refused,
                    Err(_) | Ok(Err(_)) => AnonymousToken::Failed,
                    Ok(Ok(retry)) => AnonymousToken::Retried(retry.status()),
                };
            after_anonymous_token(token)
        }
    };
    openness.map(|openness| (openness, challenge))
}

/// Decides whether this client may be served cached content of the
/// repository ([`before_asking`], then [`after_asking`]). Err holds the
/// answer to give instead (upstream's own refusal, or 503).
pub async fn check(req: &RepoRequest<'_>) -> Result<(), Box<Served>> {
    let state = req.state;
    let (target, repo) = (req.target, req.repo());
    let key = req
        .parts
        .headers
        .get(AUTHORIZATION)
        .map(|c| credential_key(&target.registry, repo, c));
    let credential = match key.and_then(|k| state.sharing.verified_at(&k)) {
        None => Credential::Unverified,
        Some(at) if at.elapsed() < state.config.auth_ttl => Credential::Fresh,
        Some(_) => Credential::Stale,
    };
    // Openness is only worth a probe when a fresh credential does not settle it.
    let openness = match credential {
        Credential::Fresh => None,
        _ => public(req).await,
    };
    if let Verdict::Serve(_) = before_asking(credential, openness) {
        return Ok(());
    }
    // Guarded (or unknown): ask upstream with the client's own headers.
    let uri = upstream_uri(target, req.parts)
        .map_err(|resp| Box::new(Served::new(*resp, CacheStatus::Pass)))?;
    let answer = state
        .upstream
        .fetch(Method::HEAD, uri, upstream_headers(req.parts))
        .await
        .ok();
    let outcome = answer
        .as_ref()
        .map_or(Answer::Unavailable, |resp| Answer::of(resp.status()));
    match (after_asking(credential, outcome), answer) {
        (Verdict::Serve(_), _) => {
            if outcome == Answer::Accepted {
                learn(req, StatusCode::OK).await;
            }
            Ok(())
        }
        (Verdict::Refuse, Some(resp)) => {
            tracing::info!(registry = %target.registry, repo, status = resp.status().as_u16(), "cached content refused to a client upstream does not accept");
            let resp = refusal(&req.parts.method, resp, ErrorCode::NameUnknown, repo);
            Err(Box::new(Served::new(resp, CacheStatus::Miss)))
        }
        // Withheld (a refusal always comes with an answer).
        _ => {
            tracing::info!(registry = %target.registry, repo, "upstream unavailable; guarded content withheld from an unverified client");
            Err(Box::new(Served::new(
                error_json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Unauthorized,
                    "upstream unavailable and this client was not verified for this repository",
                ),
                CacheStatus::Miss,
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_keys_separate_repositories_and_values() {
        let a = HeaderValue::from_static("Bearer a");
        let b = HeaderValue::from_static("Bearer b");
        assert_ne!(credential_key("r", "x", &a), credential_key("r", "y", &a));
        assert_ne!(credential_key("r", "x", &a), credential_key("r", "x", &b));
        assert_ne!(credential_key("r", "xy", &a), credential_key("rx", "y", &a));
        assert_eq!(credential_key("r", "x", &a), credential_key("r", "x", &a));
    }
}
