//! Bearer tokens from a registry's token realm, fetched by regcache itself:
//! anonymously (to learn whether a repository is public) or with regcache's
//! own account (for public content, to raise rate limits).
//!
//! Tokens are cached until shortly before they expire, keyed by realm,
//! service, scope and a hash of the account; never logged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::header::{HeaderValue, AUTHORIZATION};
use http::{HeaderMap, Method, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::redirect::FetchError;
use super::Upstream;
use crate::registry::auth::BearerChallenge;

/// The largest token response read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
/// Assumed lifetime when the realm does not say (the spec's default).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);

/// Why no token was had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The realm could not be reached.
    #[error("token realm unreachable: {0}")]
    Fetch(#[from] FetchError),
    /// The realm refused (wrong account, no access).
    #[error("token realm answered {0}")]
    Refused(StatusCode),
    /// The realm's answer made no sense.
    #[error("token realm answer unusable: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// Cached tokens.
#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

impl TokenCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (String, Instant)>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn cache_key(challenge: &BearerChallenge, scope: &str, basic: Option<&HeaderValue>) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [
        challenge.realm.as_bytes(),
        challenge.service.as_deref().unwrap_or("").as_bytes(),
        scope.as_bytes(),
        basic.map(|b| b.as_bytes()).unwrap_or(b""),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

impl Upstream {
    /// A bearer token for `scope` from the challenge's realm; `basic` is an
    /// `Authorization: Basic …` value for regcache's own account, or None
    /// for an anonymous token.
    pub async fn bearer_token(
        &self,
        challenge: &BearerChallenge,
        scope: &str,
        basic: Option<&HeaderValue>,
    ) -> Result<String, TokenError> {
        let key = cache_key(challenge, scope, basic);
        if let Some((token, until)) = self.tokens.lock().get(&key) {
            if *until > Instant::now() {
                return Ok(token.clone());
            }
        }
        let query = {
            let mut query = form_urlencoded::Serializer::new(String::new());
            if let Some(service) = &challenge.service {
                query.append_pair("service", service);
            }
            query.append_pair("scope", scope);
            query.finish()
        };
        let sep = if challenge.realm.contains('?') {
            '&'
        } else {
            '?'
        };
        let uri: Uri = format!("{}{sep}{}", challenge.realm, query)
            .parse()
            .map_err(|e| TokenError::Invalid(format!("realm is not a URL ({e})")))?;
        let mut headers = HeaderMap::new();
        match basic {
            // regcache's own account never travels over plain HTTP.
            Some(_) if uri.scheme_str() != Some("https") => {
                return Err(TokenError::Invalid(
                    "the realm is not https; regcache's account is not sent there".into(),
                ))
            }
            Some(basic) => {
                headers.insert(AUTHORIZATION, basic.clone());
            }
            None => {}
        }
        let resp = self.fetch(Method::GET, uri, headers).await?;
        if resp.status() != StatusCode::OK {
            return Err(TokenError::Refused(resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE)
            .collect()
            .await
            .map_err(|e| TokenError::Invalid(e.to_string()))?
            .to_bytes();
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| TokenError::Invalid("no token in the answer".into()))?;
        let lifetime = parsed
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_LIFETIME);
        // Renew a little early so a token never expires in flight.
        let until = Instant::now()
            + lifetime
                .saturating_sub(Duration::from_secs(10))
                .max(Duration::from_secs(1));
        self.tokens.lock().insert(key, (token.clone(), until));
        Ok(token)
    }
}
