//! Who may see cached content: public repositories are shared, everything
//! else is guarded by the upstream's own judgement of each client.
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
use std::sync::{Arc, Mutex};
use std::time::Instant;

use base64::Engine as _;
use http::header::{HeaderValue, AUTHORIZATION, COOKIE, WWW_AUTHENTICATE};
use http::request::Parts;
use http::{HeaderMap, Method, StatusCode};
use sha2::{Digest as _, Sha256};

use super::coalesce::{Coalescer, Turn};
use super::state::State;
use super::{error_json, refusal, upstream_headers, upstream_uri, CacheStatus, Served, Target};
use crate::cache::freshness::now_ms;
use crate::config::secret::{read_secret, SecretFileError};
use crate::config::{Config, UpstreamCredential};
use crate::registry::auth::{parse_challenge, pull_scope, Challenge};
use crate::registry::error::ErrorCode;
use crate::upstream::redirect::FetchError;

/// What regcache learnt about a repository's openness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Openness {
    Public,
    Guarded,
}

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

/// What is known of `repo`'s openness, and whether it is still fresh.
fn openness(state: &State, target: &Target, repo: &str) -> Option<(Openness, bool)> {
    let (public, at) = state.cache.openness(&target.registry, repo)?;
    let fresh = now_ms().saturating_sub(at) < state.config.public_ttl.as_millis() as u64;
    let openness = if public {
        Openness::Public
    } else {
        Openness::Guarded
    };
    Some((openness, fresh))
}

/// Records `repo`'s openness (and the registry's challenge, if seen).
async fn learn_openness(
    state: &State,
    target: &Target,
    repo: &str,
    openness: Openness,
    challenge: Option<Challenge>,
) {
    if let Some(challenge) = challenge {
        lock(&state.sharing.challenges).insert(format!("{}/{repo}", target.registry), challenge);
    }
    let public = openness == Openness::Public;
    if let Err(e) = state
        .cache
        .set_openness(&target.registry, repo, public, now_ms())
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
/// proves: a 200 to the client's own credential verifies it; a 200 to no
/// credential at all makes the repository public.
pub async fn learn(
    state: &Arc<State>,
    target: &Target,
    repo: &str,
    parts: &Parts,
    status: StatusCode,
) {
    if status != StatusCode::OK {
        return;
    }
    match parts.headers.get(AUTHORIZATION) {
        Some(credential) => {
            let key = credential_key(&target.registry, repo, credential);
            lock(&state.sharing.verified).insert(key, Instant::now());
            // Learn soon whether everyone may see this repository, so that
            // its content is shared (and stays shared while upstream is down).
            if !matches!(openness(state, target, repo), Some((_, true))) {
                probe_in_background(state, target, repo, parts);
            }
        }
        None => {
            if !state.sharing.accounts.contains_key(&target.registry) {
                learn_openness(state, target, repo, Openness::Public, None).await;
            }
        }
    }
}

/// The headers for regcache's own upstream request on behalf of this client:
/// the client's, plus regcache's account for a public repository when the
/// client sent no credential.
async fn upstream_request_headers(
    state: &State,
    target: &Target,
    repo: &str,
    parts: &Parts,
) -> HeaderMap {
    let mut headers = upstream_headers(parts);
    if headers.contains_key(AUTHORIZATION) || !state.sharing.accounts.contains_key(&target.registry)
    {
        return headers;
    }
    if public(state, target, repo, parts).await != Some(Openness::Public) {
        return headers;
    }
    if let Some(value) = account_authorization(state, target, repo).await {
        headers.insert(AUTHORIZATION, value);
    }
    headers
}

/// Sends regcache's upstream request on behalf of this client, and learns
/// from the answer. A client without credentials is treated as docker treats
/// an anonymous pull: on a Bearer challenge, regcache gets a token for it
/// (with its own account when configured, else anonymously) and asks again,
/// so mirror clients and anonymous clients get public content.
pub async fn fetch_for(
    state: &Arc<State>,
    target: &Target,
    repo: &str,
    parts: &Parts,
    method: Method,
    uri: http::Uri,
) -> Result<http::Response<hyper::body::Incoming>, FetchError> {
    let headers = upstream_request_headers(state, target, repo, parts).await;
    let anonymous = !headers.contains_key(AUTHORIZATION);
    let mut resp = state
        .upstream
        .fetch(method.clone(), uri.clone(), headers.clone())
        .await?;
    if anonymous && resp.status() == StatusCode::UNAUTHORIZED {
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge);
        if let Some(Challenge::Bearer(bearer)) = challenge {
            // regcache's own account only for a repository known to be
            // public; anything else gets an anonymous token, so that the
            // answer is what an anonymous client would get.
            let public = matches!(
                openness(state, target, repo),
                Some((Openness::Public, true))
            );
            let account = state
                .sharing
                .accounts
                .get(&target.registry)
                .filter(|_| public);
            let basic = account.filter(|a| a.as_bytes().starts_with(b"Basic "));
            if let Ok(token) = state
                .upstream
                .bearer_token(&bearer, &pull_scope(repo), basic)
                .await
            {
                if let Some(value) = bearer_value(&token) {
                    let mut headers = headers;
                    headers.insert(AUTHORIZATION, value);
                    resp = state.upstream.fetch(method, uri, headers).await?;
                }
            }
            lock(&state.sharing.challenges).insert(
                format!("{}/{repo}", target.registry),
                Challenge::Bearer(bearer),
            );
        }
    }
    learn(state, target, repo, parts, resp.status()).await;
    Ok(resp)
}

/// regcache's `Authorization` for `repo`: a token from the registry's realm
/// got with the account, or the account's own value.
async fn account_authorization(state: &State, target: &Target, repo: &str) -> Option<HeaderValue> {
    let account = state.sharing.accounts.get(&target.registry)?;
    let challenge = lock(&state.sharing.challenges)
        .get(&format!("{}/{repo}", target.registry))
        .cloned();
    match challenge {
        Some(Challenge::Bearer(bearer)) if account.as_bytes().starts_with(b"Basic ") => match state
            .upstream
            .bearer_token(&bearer, &pull_scope(repo), Some(account))
            .await
        {
            Ok(token) => bearer_value(&token),
            Err(e) => {
                tracing::warn!(registry = %target.registry, error = %e, "regcache's registry account got no token; asking anonymously");
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

/// Whether `repo` is public: learnt within `public_ttl`, else asked anonymously.
/// None when unknown (upstream unreachable and nothing learnt before).
async fn public(state: &State, target: &Target, repo: &str, parts: &Parts) -> Option<Openness> {
    let known = openness(state, target, repo);
    if let Some((openness, true)) = known {
        return Some(openness);
    }
    // Concurrent requests for one repository wait for a single probe.
    let found = match state
        .sharing
        .probes
        .join(format!("{}/{repo}", target.registry))
    {
        Turn::Lead(lead) => {
            let found = match probe_anonymously(state, target, repo, parts).await {
                Some((openness, challenge)) => {
                    learn_openness(state, target, repo, openness, challenge).await;
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

/// Starts an anonymous openness probe of `repo`, unless one is running.
fn probe_in_background(state: &Arc<State>, target: &Target, repo: &str, parts: &Parts) {
    let key = format!("{}/{repo}", target.registry);
    if !lock(&state.sharing.probing).insert(key.clone()) {
        return;
    }
    let (mut probe, ()) = http::Request::new(()).into_parts();
    probe.method = Method::HEAD;
    probe.uri = parts.uri.clone();
    probe.headers = parts.headers.clone();
    probe.headers.remove(AUTHORIZATION);
    probe.headers.remove(COOKIE);
    let (state, target, repo) = (state.clone(), target.clone(), repo.to_string());
    tokio::spawn(async move {
        if let Some((found, challenge)) = probe_anonymously(&state, &target, &repo, &probe).await {
            learn_openness(&state, &target, &repo, found, challenge).await;
        }
        lock(&state.sharing.probing).remove(&key);
    });
}

/// Asks upstream for this request's path with no credential (following a
/// Bearer challenge with an anonymous token). None if upstream gave no answer
/// that settles it.
async fn probe_anonymously(
    state: &State,
    target: &Target,
    repo: &str,
    parts: &Parts,
) -> Option<(Openness, Option<Challenge>)> {
    let uri = upstream_uri(target, parts).ok()?;
    let mut headers = upstream_headers(parts);
    // Anonymous: nothing of the client's identity goes along.
    headers.remove(AUTHORIZATION);
    headers.remove(COOKIE);
    let resp = state
        .upstream
        .fetch(Method::HEAD, uri.clone(), headers.clone())
        .await
        .ok()?;
    let status = resp.status();
    let challenge = resp
        .headers()
        .get(WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_challenge);
    match status {
        StatusCode::OK => Some((Openness::Public, challenge)),
        StatusCode::UNAUTHORIZED => match &challenge {
            Some(Challenge::Bearer(bearer)) => {
                let token = match state
                    .upstream
                    .bearer_token(bearer, &pull_scope(repo), None)
                    .await
                {
                    Ok(token) => token,
                    Err(crate::upstream::token::TokenError::Refused(_)) => {
                        return Some((Openness::Guarded, challenge))
                    }
                    Err(_) => return None,
                };
                headers.insert(AUTHORIZATION, bearer_value(&token)?);
                let retry = state
                    .upstream
                    .fetch(Method::HEAD, uri, headers)
                    .await
                    .ok()?;
                match retry.status() {
                    StatusCode::OK => Some((Openness::Public, challenge)),
                    s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => None,
                    _ => Some((Openness::Guarded, challenge)),
                }
            }
            _ => Some((Openness::Guarded, challenge)),
        },
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => None,
        _ => Some((Openness::Guarded, challenge)),
    }
}

/// Decides whether this client may be served cached content of `repo`.
/// Err holds the answer to give instead (upstream's own refusal).
pub async fn check(
    state: &Arc<State>,
    target: &Target,
    repo: &str,
    parts: &Parts,
) -> Result<(), Box<Served>> {
    let credential = parts.headers.get(AUTHORIZATION);
    let key = credential.map(|c| credential_key(&target.registry, repo, c));
    let verified = key.and_then(|k| state.sharing.verified_at(&k));
    if verified.is_some_and(|at| at.elapsed() < state.config.auth_ttl) {
        return Ok(());
    }
    if public(state, target, repo, parts).await == Some(Openness::Public) {
        return Ok(());
    }
    // Guarded (or unknown): ask upstream with the client's own headers.
    let uri = upstream_uri(target, parts)
        .map_err(|resp| Box::new(Served::new(*resp, CacheStatus::Pass)))?;
    match state
        .upstream
        .fetch(Method::HEAD, uri, upstream_headers(parts))
        .await
    {
        Ok(resp) if resp.status() == StatusCode::OK => {
            learn(state, target, repo, parts, StatusCode::OK).await;
            Ok(())
        }
        Ok(resp)
            if resp.status().is_server_error()
                || resp.status() == StatusCode::TOO_MANY_REQUESTS =>
        {
            offline_decision(verified, target, repo)
        }
        Ok(resp) => {
            tracing::info!(registry = %target.registry, repo, status = resp.status().as_u16(), "cached content refused to a client upstream does not accept");
            Err(Box::new(Served::new(
                refusal(&parts.method, resp, ErrorCode::NameUnknown, repo),
                CacheStatus::Miss,
            )))
        }
        Err(_) => offline_decision(verified, target, repo),
    }
}

/// Upstream gives no verdict: serve only to a credential verified before.
fn offline_decision(
    verified: Option<Instant>,
    target: &Target,
    repo: &str,
) -> Result<(), Box<Served>> {
    if verified.is_some() {
        return Ok(());
    }
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
