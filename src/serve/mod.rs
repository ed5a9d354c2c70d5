//! Serving registry requests that arrive inside an intercepted connection (or
//! in absolute form): the policy brain.
//!
//! [`handle`] parses the path ([`crate::registry::route`]): manifest and blob
//! reads go to [`manifests`] and [`blobs`] (and referrers lists to
//! [`referrers`]), which decide between the cache
//! and upstream; a hostile or malformed name or digest gets a 400 in the
//! registry's JSON error format without reaching upstream or the disk;
//! everything else (`/v2/`, tags/list, pushes, ...) is forwarded untouched
//! with bodies streamed both ways.

pub mod blobs;
pub mod coalesce;
pub mod link;
pub mod manifests;
pub mod mirror;
pub mod offline;
pub mod range;
pub mod referrers;
pub mod sharing;
pub mod state;
pub mod uncached;

use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use crate::http::body::{self, Body};
use crate::http::error::{error_chain, error_response, for_method};
use crate::http::headers::{add_via, strip_hop_by_hop};
use crate::http::log::LogNote;
use crate::registry::error::{error_body, ErrorCode};
use crate::registry::hosts::canonical_registry;
use crate::registry::name::RepoName;
use crate::registry::route::{self, Route};
use crate::registry::rules::Decision;
use crate::upstream::{Upstream, UpstreamBody};
use state::State;

/// Where requests on one connection go: the host the client asked for.
#[derive(Debug, Clone)]
pub struct Origin {
    /// `https` for intercepted CONNECT tunnels and the mirror, `http` only
    /// for an insecure registry (`insecure_registries`).
    pub scheme: Scheme,
    /// Host and port (the port only when it is not the scheme's default).
    pub authority: Authority,
}

impl Origin {
    /// The origin of an insecure (plain-http) registry at `host:port`.
    pub fn http(host: &str, port: u16) -> Result<Self, http::Error> {
        let host = crate::registry::hosts::HostPort {
            host: crate::registry::hosts::normalize_host(host),
            port,
        };
        Ok(Self {
            scheme: Scheme::HTTP,
            authority: host.to_string().parse::<Authority>()?,
        })
    }

    /// The origin of an intercepted `CONNECT host:port`.
    pub fn https(host: &str, port: u16) -> Result<Self, http::Error> {
        let authority = if port == 443 {
            host.parse::<Authority>()?
        } else {
            format!("{host}:{port}").parse::<Authority>()?
        };
        Ok(Self {
            scheme: Scheme::HTTPS,
            authority,
        })
    }
}

/// The `Warning` value on answers served stale (RFC 7234's code 110).
pub const STALE_WARNING: &str = "110 regcache \"Response is Stale\"";

/// How a response was served, for `X-Cache` and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// From the cache, no upstream contact (or only an access check).
    Hit,
    /// From the shared tier (`shared_store`), after the registry confirmed
    /// the client's access, and stored locally.
    Shared,
    /// Streamed from the node fetching it for the cluster (the peer
    /// endpoint), after the registry confirmed the client's access, and
    /// stored locally.
    Peer,
    /// From upstream (and stored, when cacheable).
    Miss,
    /// A stale cached copy, upstream being unavailable.
    Stale,
    /// A cached tag that upstream confirmed unchanged.
    Revalidated,
    /// Following another request's download of the same digest.
    Coalesced,
    /// Not a cacheable request: forwarded untouched.
    Pass,
}

impl CacheStatus {
    /// The `X-Cache` value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Shared => "SHARED",
            CacheStatus::Peer => "PEER",
            CacheStatus::Miss => "MISS",
            CacheStatus::Stale => "STALE",
            CacheStatus::Revalidated => "REVALIDATED",
            CacheStatus::Coalesced => "COALESCED",
            CacheStatus::Pass => "-",
        }
    }
}

/// A response and how it was served.
pub struct Served {
    /// The response.
    pub resp: Response<Body>,
    /// How.
    pub cache: CacheStatus,
}

impl Served {
    /// Pairs a response with its cache status.
    pub fn new(resp: Response<Body>, cache: CacheStatus) -> Self {
        Self { resp, cache }
    }
}

/// The registry a request is for: where to send it upstream, and the
/// canonical name that keys the cache (docker.io for all its aliases).
#[derive(Debug, Clone)]
pub struct Target {
    /// Upstream scheme and authority.
    pub origin: Origin,
    /// Canonical registry name.
    pub registry: String,
}

impl Target {
    /// The target for `origin`. The scheme is part of the registry's
    /// identity: an `https` registry is keyed by its canonical name
    /// (`docker.io`, `ghcr.io:8443`), a plain-http one (an insecure
    /// registry) by `http://host:port`, so the two never share cached tags,
    /// links, openness or verified credentials.
    pub fn new(origin: Origin) -> Self {
        let registry = registry_key(&origin);
        Self { origin, registry }
    }
}

/// One request for a repository's content (a manifest or a blob), as it
/// passes through the phases of serving it: the shared state, the registry
/// it is for, the repository and the client's request head.
#[derive(Clone, Copy)]
pub struct RepoRequest<'a> {
    /// What serving shares.
    pub state: &'a Arc<State>,
    /// The registry.
    pub target: &'a Target,
    /// The repository.
    pub name: &'a RepoName,
    /// The client's request: method, path, headers (its credential among
    /// them) and extensions.
    pub parts: &'a Parts,
    /// What the operator's rules say about the repository, decided once
    /// for the request ([`crate::registry::rules::Rules::decide`]).
    pub rule: Decision,
}

impl<'a> RepoRequest<'a> {
    /// A request of `parts` for the repository `name` of `target`, which
    /// the rules decided `rule` for.
    pub fn new(
        state: &'a Arc<State>,
        target: &'a Target,
        name: &'a RepoName,
        parts: &'a Parts,
        rule: Decision,
    ) -> Self {
        Self {
            state,
            target,
            name,
            parts,
            rule,
        }
    }

    /// The repository's name.
    pub fn repo(&self) -> &'a str {
        self.name.as_str()
    }
}

/// The cache identity of the registry at `origin` (see [`Target::new`]).
pub fn registry_key(origin: &Origin) -> String {
    let authority = &origin.authority;
    if origin.scheme == Scheme::HTTPS {
        return canonical_registry(authority.as_str());
    }
    let host = crate::registry::hosts::normalize_host(authority.host());
    let port = authority.port_u16().unwrap_or(80);
    let host = crate::registry::hosts::HostPort { host, port };
    format!("{}://{host}", origin.scheme)
}

/// How long the client of a request may send nothing while its body is
/// awaited; set by [`handle`] as a request extension and applied by
/// [`try_forward`], the one place that reads request bodies.
#[derive(Debug, Clone, Copy)]
pub struct ClientIdleTimeout(pub std::time::Duration);

/// Answers one request for `target`; the response carries the [`LogNote`]
/// for its access-log line (written by [`crate::http::log::serve_request`]).
pub async fn handle(
    state: &Arc<State>,
    target: &Target,
    mut req: Request<Incoming>,
) -> Response<Body> {
    req.extensions_mut()
        .insert(ClientIdleTimeout(state.config.client_idle_timeout));
    let path = req.uri().path().to_string();
    let served = dispatch(state, target, req).await;
    let mut resp = served.resp;
    if served.cache != CacheStatus::Pass {
        resp.headers_mut()
            .insert("x-cache", HeaderValue::from_static(served.cache.as_str()));
    }
    let note = LogNote {
        host: Some(target.origin.authority.to_string()),
        path: Some(path),
        cache: Some(served.cache.as_str()),
        registry: Some(target.registry.clone()),
        discard: false,
    };
    note.on(resp)
}

async fn dispatch(state: &Arc<State>, target: &Target, req: Request<Incoming>) -> Served {
    let rule = match route::repository_of(req.uri().path()) {
        None => Decision::DEFAULT,
        Some(Err(e)) => return route_error(&req, &e),
        Some(Ok(name)) => {
            let rule = state.config.rules.decide(&target.registry, name.as_str());
            if rule.is_denied() {
                return denied(state, target, &name, rule, req.method());
            }
            rule
        }
    };
    if state.config.is_offline(&target.registry) {
        return match route::parse(req.uri().path()) {
            Err(e) => route_error(&req, &e),
            Ok(route) => {
                let (parts, _) = req.into_parts();
                offline::serve(state, target, route, &parts, rule).await
            }
        };
    }
    let bypass = !rule.cache || (req.method() != Method::GET && req.method() != Method::HEAD);
    if bypass {
        return Served::new(
            forward(&state.upstream, &target.origin, req).await,
            CacheStatus::Pass,
        );
    }
    match route::parse(req.uri().path()) {
        Err(e) => route_error(&req, &e),
        Ok(Route::Manifest { name, reference }) => {
            let (parts, _) = req.into_parts();
            let req = RepoRequest::new(state, target, &name, &parts, rule);
            manifests::serve(&req, &reference).await
        }
        Ok(Route::Base) => base(state, target, req).await,
        Ok(Route::Blob { name, digest }) => {
            let (parts, _) = req.into_parts();
            let req = RepoRequest::new(state, target, &name, &parts, rule);
            blobs::serve(&req, &digest).await
        }
        Ok(Route::Referrers { name, digest }) => {
            let (parts, _) = req.into_parts();
            let req = RepoRequest::new(state, target, &name, &parts, rule);
            referrers::serve(&req, &digest).await
        }
        Ok(_) => Served::new(
            forward(&state.upstream, &target.origin, req).await,
            CacheStatus::Pass,
        ),
    }
}

/// The registry's error answer to a path regcache will not send on.
fn route_error(req: &Request<Incoming>, e: &crate::registry::RouteError) -> Served {
    tracing::info!(path = %req.uri().path(), code = %e.code, error = %e.message, "answered a registry request without asking upstream");
    Served::new(
        for_method(
            req.method(),
            error_json(e.code.status(), e.code, &e.message),
        ),
        CacheStatus::Pass,
    )
}

/// 403 `DENIED` for a repository an operator's rule denies, logged and
/// counted; the message names the repository and the rule, which docker,
/// containerd and podman print.
fn denied(
    state: &State,
    target: &Target,
    name: &RepoName,
    rule: Decision,
    method: &Method,
) -> Served {
    let rules = &state.config.rules;
    let message = rules.denial_message(&rule, &target.registry, name.as_str());
    let number = rule.rule.unwrap_or_default();
    tracing::info!(registry = %target.registry, repository = %name, rule = number, "refused by an image rule");
    crate::metrics::get().denied_by_rule(number);
    Served::new(
        for_method(
            method,
            error_json(StatusCode::FORBIDDEN, ErrorCode::Denied, &message),
        ),
        CacheStatus::Pass,
    )
}

/// The upstream URL for a request's path and query.
pub fn upstream_uri(target: &Target, parts: &Parts) -> Result<Uri, Box<Response<Body>>> {
    origin_uri(&target.origin, &parts.uri).map_err(|e| {
        Box::new(error_response(
            StatusCode::BAD_REQUEST,
            &format!("bad request target: {e}"),
        ))
    })
}

/// The client's headers as sent upstream by regcache's own requests: end to
/// end headers (Authorization, Accept, User-Agent) kept; hop-by-hop, Host,
/// conditionals, Range and Accept-Encoding dropped (regcache fetches whole,
/// unencoded content to hash it).
pub fn upstream_headers(parts: &Parts) -> HeaderMap {
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    for name in [
        http::header::HOST,
        http::header::RANGE,
        http::header::IF_RANGE,
        http::header::IF_NONE_MATCH,
        http::header::IF_MATCH,
        http::header::IF_MODIFIED_SINCE,
        http::header::IF_UNMODIFIED_SINCE,
        http::header::ACCEPT_ENCODING,
        http::header::CONTENT_LENGTH,
    ] {
        headers.remove(name);
    }
    add_via(&mut headers);
    headers
}

/// Upstream's answer, passed on with hop-by-hop headers removed.
pub fn passthrough(resp: Response<UpstreamBody>) -> Response<Body> {
    let (mut parts, incoming) = resp.into_parts();
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    add_via(&mut parts.headers);
    Response::from_parts(parts, body::stream(incoming))
}

/// Upstream's refusal of a `HEAD` made on behalf of a client's request: passed
/// on as is for a `HEAD`; for a `GET`, the same status and challenge with the
/// registry's JSON error body (a HEAD answer has none, and its Content-Length
/// describes a body that is not there).
pub fn refusal(
    method: &Method,
    head: Response<UpstreamBody>,
    not_found: ErrorCode,
    what: &str,
) -> Response<Body> {
    if *method == Method::HEAD {
        return passthrough(head);
    }
    let status = head.status();
    let code = match status {
        StatusCode::NOT_FOUND => not_found,
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        StatusCode::FORBIDDEN => ErrorCode::Denied,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::TooManyRequests,
        _ => ErrorCode::Unsupported,
    };
    let mut answer = error_json(status, code, &format!("{what}: upstream answered {status}"));
    if let Some(challenge) = head.headers().get(http::header::WWW_AUTHENTICATE) {
        answer
            .headers_mut()
            .insert(http::header::WWW_AUTHENTICATE, challenge.clone());
    }
    answer
}

/// An error answer in the registry's JSON format.
pub fn error_json(status: StatusCode, code: ErrorCode, message: &str) -> Response<Body> {
    let mut resp = Response::new(body::full(error_body(code, message)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// 502 for an upstream that could not be reached.
pub fn bad_gateway(target: &Target, err: &dyn std::error::Error) -> Response<Body> {
    tracing::warn!(upstream = %target.origin.authority, error = %error_chain(err), "upstream request failed");
    error_response(
        StatusCode::BAD_GATEWAY,
        &format!(
            "regcache: cannot reach {}: {}",
            target.origin.authority,
            error_chain(err)
        ),
    )
}

/// Sends the request on to `origin` and streams its answer back; 502 if
/// upstream cannot be reached.
pub async fn forward(
    upstream: &Upstream,
    origin: &Origin,
    req: Request<Incoming>,
) -> Response<Body> {
    match try_forward(upstream, origin, req).await {
        Ok(resp) => resp,
        Err(e) => unreachable_upstream(&origin.authority, &e),
    }
}

/// Like [`forward`], but hands back the failure to reach upstream.
pub async fn try_forward(
    upstream: &Upstream,
    origin: &Origin,
    req: Request<Incoming>,
) -> Result<Response<Body>, crate::upstream::UpstreamError> {
    let (mut parts, incoming) = req.into_parts();
    parts.uri = match origin_uri(origin, &parts.uri) {
        Ok(uri) => uri,
        Err(e) => {
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                &format!("bad request target: {e}"),
            ))
        }
    };
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(http::header::HOST);
    add_via(&mut parts.headers);
    let body = match parts.extensions.get::<ClientIdleTimeout>() {
        Some(ClientIdleTimeout(limit)) => {
            let what = format!("{} {}", parts.method, parts.uri.path());
            body::stream(body::IdleLimited::new(incoming, *limit, what))
        }
        None => body::stream(incoming),
    };
    let req = Request::from_parts(parts, body);
    Ok(passthrough(upstream.send(req).await?))
}

/// `origin` with the path and query of `uri`.
fn origin_uri(origin: &Origin, uri: &Uri) -> Result<Uri, http::Error> {
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::builder()
        .scheme(origin.scheme.clone())
        .authority(origin.authority.clone())
        .path_and_query(path)
        .build()
}

/// `GET /v2/`: upstream's answer (an auth challenge, typically) when it
/// answers; when it is down or failing, regcache's own 200 so that clients go
/// on to pull what is cached.
async fn base(state: &Arc<State>, target: &Target, req: Request<Incoming>) -> Served {
    match try_forward(&state.upstream, &target.origin, req).await {
        Ok(resp) if !resp.status().is_server_error() => {
            if resp.status() == StatusCode::UNAUTHORIZED {
                if let Some(challenge) = resp.headers().get(http::header::WWW_AUTHENTICATE) {
                    state
                        .sharing
                        .remember_base_challenge(&target.registry, challenge);
                }
            }
            Served::new(resp, CacheStatus::Pass)
        }
        outcome => {
            let why = match &outcome {
                Ok(resp) => format!("upstream answered {}", resp.status()),
                Err(e) => error_chain(e),
            };
            tracing::info!(registry = %target.registry, reason = %why, "upstream unavailable; answering /v2/ from the cache");
            if let Some(challenge) = state.sharing.offline_base_challenge(&target.registry) {
                // Clients only send credentials when challenged.
                let mut resp = error_json(
                    StatusCode::UNAUTHORIZED,
                    ErrorCode::Unauthorized,
                    "authentication required",
                );
                resp.headers_mut()
                    .insert(http::header::WWW_AUTHENTICATE, challenge);
                return Served::new(resp, CacheStatus::Stale);
            }
            let mut resp = mirror::base_response();
            resp.headers_mut().insert(
                http::header::WARNING,
                HeaderValue::from_static(STALE_WARNING),
            );
            Served::new(resp, CacheStatus::Stale)
        }
    }
}

/// 502 naming the upstream that could not be reached.
fn unreachable_upstream(
    authority: &Authority,
    err: &(dyn std::error::Error + 'static),
) -> Response<Body> {
    if let Some(own) = crate::upstream::RelayToSelf::in_chain(err) {
        crate::metrics::get().refused_by_policy(own.refusal.rule);
        return error_response(StatusCode::FORBIDDEN, own.refusal.reason);
    }
    tracing::warn!(upstream = %authority, error = %error_chain(err), "upstream request failed");
    error_response(
        StatusCode::BAD_GATEWAY,
        &format!("regcache: cannot reach {authority}: {}", error_chain(err)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_is_part_of_the_registry_identity() {
        let https = |host: &str, port: u16| registry_key(&Origin::https(host, port).unwrap());
        let http = |host: &str, port: u16| registry_key(&Origin::http(host, port).unwrap());
        assert_eq!(https("registry-1.docker.io", 443), "docker.io");
        assert_eq!(https("ghcr.io", 8443), "ghcr.io:8443");
        assert_eq!(
            http("registry-1.docker.io", 80),
            "http://registry-1.docker.io:80"
        );
        assert_eq!(http("Reg.Test.", 5000), "http://reg.test:5000");
        assert_eq!(http("::1", 5000), "http://[::1]:5000");
        assert_ne!(http("ghcr.io", 443), https("ghcr.io", 443));
    }
}
