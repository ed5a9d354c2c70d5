//! Who may see cached content: the sharing verdicts, as pure functions of
//! what regcache knows and what the registry said, with a table of tests
//! (the I/O that gathers the facts is `serve::sharing`).
//!
//! - A repository is **public** when the registry accepts an anonymous pull
//!   ([`probe_outcome`] reads the registry's answer to an anonymous `HEAD`,
//!   [`after_anonymous_token`] the answer once an anonymous token was got).
//!   Cached content of a public repository is served to every client.
//! - Content of any other repository is served from the cache only to a
//!   client whose credential the registry accepted for that repository
//!   within `auth_ttl` ([`before_asking`]); otherwise the registry is asked
//!   with the client's own credential and its answer decides
//!   ([`after_asking`]). While the registry gives no answer, a credential it
//!   accepted before, however long ago, still counts.
//! - An offline registry cannot be asked at all ([`offline_verdict`]).
//! - What an answer proves is [`learnt_from`]: a 200 to the client's own
//!   credential verifies that credential; a 200 to no credential at all
//!   (regcache's own account not used) makes the repository public.

use http::StatusCode;

/// What regcache learnt about a repository's openness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Openness {
    /// The registry serves it to anonymous clients.
    Public,
    /// The registry refused an anonymous client.
    Guarded,
}

impl Openness {
    /// The openness a stored "is public" flag records.
    pub fn of(public: bool) -> Self {
        if public {
            Openness::Public
        } else {
            Openness::Guarded
        }
    }
}

/// What regcache remembers of this client's credential for the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// No credential, or one the registry never accepted here.
    Unverified,
    /// Accepted by the registry for this repository within `auth_ttl`.
    Fresh,
    /// Accepted, but longer ago than `auth_ttl`.
    Stale,
}

/// How the registry answered regcache's question on the client's behalf (a
/// `HEAD` with the client's own headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 200: the client may pull.
    Accepted,
    /// Any other answer with a verdict (401, 403, 404, ...).
    Refused,
    /// No verdict: unreachable, 5xx or 429.
    Unavailable,
}

impl Answer {
    /// The answer an HTTP status gives.
    pub fn of(status: StatusCode) -> Self {
        if status == StatusCode::OK {
            Answer::Accepted
        } else if no_verdict(status) {
            Answer::Unavailable
        } else {
            Answer::Refused
        }
    }
}

/// Whether a status says nothing of the client's rights (5xx, 429).
pub fn no_verdict(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

/// The sharing verdict for one request for cached content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Serve the cached content.
    Serve(Why),
    /// Ask the registry with the client's own credential first.
    AskRegistry,
    /// Give the client the registry's own refusal (401 with its challenge,
    /// 403, 404): no cached bytes.
    Refuse,
    /// The registry cannot be asked and nothing proves this client may see
    /// the repository: 503, no cached bytes.
    Withhold,
}

/// Why cached content is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The repository is public.
    Public,
    /// The registry accepted this credential within `auth_ttl`.
    FreshCredential,
    /// The registry accepted this credential just now.
    Accepted,
    /// The registry cannot be asked; it accepted this credential before.
    StaleCredential,
}

/// Before any question to the registry: `openness` is what is known of the
/// repository now (fresh, or learnt by a probe, or stale when the probe got
/// no answer; None when never learnt).
pub fn before_asking(credential: Credential, openness: Option<Openness>) -> Verdict {
    match (credential, openness) {
        (Credential::Fresh, _) => Verdict::Serve(Why::FreshCredential),
        (_, Some(Openness::Public)) => Verdict::Serve(Why::Public),
        _ => Verdict::AskRegistry,
    }
}

/// After the registry answered the client's own question.
pub fn after_asking(credential: Credential, answer: Answer) -> Verdict {
    match (answer, credential) {
        (Answer::Accepted, _) => Verdict::Serve(Why::Accepted),
        (Answer::Refused, _) => Verdict::Refuse,
        (Answer::Unavailable, Credential::Unverified) => Verdict::Withhold,
        (Answer::Unavailable, _) => Verdict::Serve(Why::StaleCredential),
    }
}

/// What the registry's answer to an anonymous `HEAD` says of openness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Settled.
    Settled(Openness),
    /// A Bearer challenge: ask again with an anonymous token.
    NeedsToken,
    /// No verdict (5xx, 429): openness stays as it was.
    Unsettled,
}

/// Reads the answer to an anonymous `HEAD`; `bearer` says whether a 401
/// came with a Bearer challenge.
pub fn probe_outcome(status: StatusCode, bearer: bool) -> Probe {
    match status {
        StatusCode::OK => Probe::Settled(Openness::Public),
        StatusCode::UNAUTHORIZED if bearer => Probe::NeedsToken,
        s if no_verdict(s) => Probe::Unsettled,
        _ => Probe::Settled(Openness::Guarded),
    }
}

/// How asking a token realm for an anonymous token went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnonymousToken {
    /// The realm refused an anonymous client.
    Refused,
    /// The realm could not be asked, or answered nonsense.
    Failed,
    /// A token came; the registry answered the retry with this status.
    Retried(StatusCode),
}

/// What a Bearer registry's openness is, once the token step is over.
pub fn after_anonymous_token(token: AnonymousToken) -> Option<Openness> {
    match token {
        AnonymousToken::Refused => Some(Openness::Guarded),
        AnonymousToken::Failed => None,
        AnonymousToken::Retried(status) => match probe_outcome(status, false) {
            Probe::Settled(openness) => Some(openness),
            Probe::NeedsToken | Probe::Unsettled => None,
        },
    }
}

/// What an answer to regcache's request for a client proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learnt {
    /// The client's credential is good for this repository.
    Credential,
    /// The repository is public.
    Public,
    /// Nothing.
    Nothing,
}

/// What a `status` answer proves: `credential` says whether the request
/// carried the client's credential, `account` whether regcache's own
/// registry account may have gone along instead (then a 200 proves nothing
/// about anonymous clients).
pub fn learnt_from(status: StatusCode, credential: bool, account: bool) -> Learnt {
    match (status == StatusCode::OK, credential, account) {
        (false, _, _) => Learnt::Nothing,
        (true, true, _) => Learnt::Credential,
        (true, false, false) => Learnt::Public,
        (true, false, true) => Learnt::Nothing,
    }
}

/// Whether an offline registry serves a repository's cached content to a
/// request, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfflineVerdict {
    /// The repository is known public: to everyone.
    Public,
    /// Not known public, but the request comes from a proxy user.
    ProxyUser,
    /// Not known public, but `offline_share_private = true`.
    SharedByConfig,
    /// Not known public, and none of the above: refused.
    Refused,
}

/// Decides who an offline registry serves: `openness` is what the cache
/// knows of the repository, whatever its age, since no registry can be
/// asked again.
pub fn offline_verdict(
    openness: Option<Openness>,
    proxy_user: bool,
    share_private: bool,
) -> OfflineVerdict {
    match openness {
        Some(Openness::Public) => OfflineVerdict::Public,
        _ if proxy_user => OfflineVerdict::ProxyUser,
        _ if share_private => OfflineVerdict::SharedByConfig,
        _ => OfflineVerdict::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Credential::{Fresh, Stale, Unverified};
    use Openness::{Guarded, Public};

    #[test]
    fn before_asking_the_registry() {
        // (credential, openness) -> verdict
        let table = [
            (Fresh, None, Verdict::Serve(Why::FreshCredential)),
            (Fresh, Some(Guarded), Verdict::Serve(Why::FreshCredential)),
            (Fresh, Some(Public), Verdict::Serve(Why::FreshCredential)),
            (Unverified, Some(Public), Verdict::Serve(Why::Public)),
            (Stale, Some(Public), Verdict::Serve(Why::Public)),
            (Unverified, Some(Guarded), Verdict::AskRegistry),
            (Unverified, None, Verdict::AskRegistry),
            (Stale, Some(Guarded), Verdict::AskRegistry),
            (Stale, None, Verdict::AskRegistry),
        ];
        for (credential, openness, want) in table {
            assert_eq!(
                before_asking(credential, openness),
                want,
                "{credential:?} {openness:?}"
            );
        }
    }

    #[test]
    fn after_the_registry_answered() {
        // (credential, upstream status or None for unreachable) -> verdict
        let table = [
            (Unverified, Some(200), Verdict::Serve(Why::Accepted)),
            (Stale, Some(200), Verdict::Serve(Why::Accepted)),
            (Unverified, Some(401), Verdict::Refuse),
            (Unverified, Some(403), Verdict::Refuse),
            (Unverified, Some(404), Verdict::Refuse),
            // A credential accepted before does not outlive a refusal.
            (Stale, Some(401), Verdict::Refuse),
            (Stale, Some(404), Verdict::Refuse),
            (Unverified, Some(500), Verdict::Withhold),
            (Unverified, Some(503), Verdict::Withhold),
            (Unverified, Some(429), Verdict::Withhold),
            (Unverified, None, Verdict::Withhold),
            (Stale, Some(502), Verdict::Serve(Why::StaleCredential)),
            (Stale, Some(429), Verdict::Serve(Why::StaleCredential)),
            (Stale, None, Verdict::Serve(Why::StaleCredential)),
        ];
        for (credential, status, want) in table {
            let answer = status
                .map(|s| Answer::of(StatusCode::from_u16(s).unwrap()))
                .unwrap_or(Answer::Unavailable);
            assert_eq!(
                after_asking(credential, answer),
                want,
                "{credential:?} {status:?}"
            );
        }
    }

    #[test]
    fn what_an_anonymous_probe_says() {
        // (status, Bearer challenge) -> outcome
        let table = [
            (200, false, Probe::Settled(Public)),
            (401, true, Probe::NeedsToken),
            (401, false, Probe::Settled(Guarded)),
            (403, false, Probe::Settled(Guarded)),
            (404, false, Probe::Settled(Guarded)),
            (404, true, Probe::Settled(Guarded)),
            (429, false, Probe::Unsettled),
            (500, false, Probe::Unsettled),
            (503, true, Probe::Unsettled),
        ];
        for (status, bearer, want) in table {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(probe_outcome(status, bearer), want, "{status} {bearer}");
        }
        // ... and after the anonymous token step.
        let table = [
            (AnonymousToken::Refused, Some(Guarded)),
            (AnonymousToken::Failed, None),
            (AnonymousToken::Retried(StatusCode::OK), Some(Public)),
            (
                AnonymousToken::Retried(StatusCode::UNAUTHORIZED),
                Some(Guarded),
            ),
            (
                AnonymousToken::Retried(StatusCode::NOT_FOUND),
                Some(Guarded),
            ),
            (AnonymousToken::Retried(StatusCode::TOO_MANY_REQUESTS), None),
            (AnonymousToken::Retried(StatusCode::BAD_GATEWAY), None),
        ];
        for (token, want) in table {
            assert_eq!(after_anonymous_token(token), want, "{token:?}");
        }
    }

    #[test]
    fn what_an_answer_proves() {
        // (status, client credential sent, regcache's account possible) -> learnt
        let table = [
            (200, true, false, Learnt::Credential),
            (200, true, true, Learnt::Credential),
            (200, false, false, Learnt::Public),
            // regcache's account may have opened it: nothing about anonymous clients.
            (200, false, true, Learnt::Nothing),
            (401, true, false, Learnt::Nothing),
            (404, false, false, Learnt::Nothing),
            (500, false, false, Learnt::Nothing),
        ];
        for (status, credential, account, want) in table {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(
                learnt_from(status, credential, account),
                want,
                "{status} {credential} {account}"
            );
        }
    }

    #[test]
    fn who_an_offline_registry_serves() {
        // (openness, proxy user, offline_share_private) -> verdict
        let table = [
            (Some(Public), false, false, OfflineVerdict::Public),
            (Some(Public), true, true, OfflineVerdict::Public),
            (Some(Guarded), true, false, OfflineVerdict::ProxyUser),
            (None, true, true, OfflineVerdict::ProxyUser),
            (Some(Guarded), false, true, OfflineVerdict::SharedByConfig),
            (None, false, true, OfflineVerdict::SharedByConfig),
            (Some(Guarded), false, false, OfflineVerdict::Refused),
            (None, false, false, OfflineVerdict::Refused),
        ];
        for (openness, proxy_user, share, want) in table {
            assert_eq!(
                offline_verdict(openness, proxy_user, share),
                want,
                "{openness:?} {proxy_user} {share}"
            );
        }
    }
}
