//! The registry API on regcache's own listener, for clients configured with a
//! mirror instead of `HTTPS_PROXY`: the same cache, links and sharing rules.
//!
//! Two ways to name the upstream registry in an origin-form `/v2/…` request:
//! - **Mirror**: `/v2/<name>/…?ns=<registry>`, as containerd and buildkit
//!   send it; without `ns` (Docker's `registry-mirrors`) the registry is
//!   Docker Hub, where a one-component name means `library/<name>`.
//! - **Path prefix**: `/v2/<registry-host>/<name>/…`, as Harbor-style
//!   pull-through caches and containerd's `override_path` use; the first
//!   component is a registry when it holds a dot or a port, or is `localhost`.
//!
//! Only registries on the intercept list (on port 443 or a `connect_ports`
//! port) and the `insecure_registries` (over plain HTTP) can be reached this
//! way, as [`crate::policy::decide_mirror`] decides, so the mirror is no relay
//! to arbitrary hosts or ports. regcache answers `/v2/` itself:
//! clients need no upstream token, and regcache runs the upstream's token
//! flow for public repositories.

use http::header::{HeaderValue, CONTENT_TYPE};
use http::uri::{PathAndQuery, Scheme};
use http::{Response, StatusCode, Uri};

use super::{error_json, Origin, Target};
use crate::config::Config;
use crate::http::body::{self, Body};
use crate::policy::decide_mirror;
use crate::registry::error::{ErrorCode, RouteError};
use crate::registry::hosts::{
    canonical_registry, normalize_host, upstream_host_port, HostPattern, DOCKER_HUB,
};
use crate::registry::reference::{docker_hub_repository, names_registry};

/// What an origin-form `/v2` request is for.
#[derive(Debug)]
pub enum MirrorRequest {
    /// `/v2/`: regcache's own answer.
    Base,
    /// A registry request: the upstream and the path to ask it for.
    Upstream {
        /// Where it goes.
        target: Target,
        /// The path (and query, minus `ns`) as the upstream names it.
        path: PathAndQuery,
    },
}

/// Whether an origin-form path belongs to the registry API.
pub fn is_registry_path(path: &str) -> bool {
    path == "/v2" || path.starts_with("/v2/")
}

/// Works out the upstream and its path for an origin-form `/v2` request.
pub fn resolve(config: &Config, uri: &Uri) -> Result<MirrorRequest, RouteError> {
    let path = uri.path();
    let rest = path.strip_prefix("/v2").unwrap_or(path);
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Ok(MirrorRequest::Base);
    }
    let mut ns = None;
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (key, value) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        if key == "ns" {
            ns = Some(value.into_owned());
        } else {
            query.append_pair(&key, &value);
        }
    }
    let query = query.finish();

    let (first, after) = rest.split_once('/').unwrap_or((rest, ""));
    let (registry, name_and_rest) = match ns {
        Some(ns) => (ns, rest.to_string()),
        None if names_registry(first) => (first.to_string(), after.to_string()),
        None => (DOCKER_HUB.to_string(), rest.to_string()),
    };
    let host = normalize_host(&registry);
    let (name_part, port_part) = match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p)),
        _ => (host.as_str(), None),
    };
    let valid_host = name_part
        .parse::<HostPattern>()
        .is_ok_and(|p| matches!(p, HostPattern::Exact(_)))
        && port_part.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if !valid_host {
        return Err(RouteError::new(
            ErrorCode::NameInvalid,
            format!("{registry:?} is not a registry host"),
        ));
    }
    let canonical = canonical_registry(&host);
    let asked_port = port_part.and_then(|p| p.parse::<u16>().ok());
    let scheme = if canonical == DOCKER_HUB {
        Scheme::HTTPS
    } else {
        decide_mirror(config, name_part, asked_port).map_err(|refusal| {
            RouteError::new(ErrorCode::Denied, format!("{canonical}: {refusal}"))
        })?
    };
    let name_and_rest = if canonical == DOCKER_HUB {
        hub_name(&name_and_rest)
    } else {
        name_and_rest
    };
    let mut path = format!("/v2/{name_and_rest}");
    if !query.is_empty() {
        path.push('?');
        path.push_str(&query);
    }
    let path = path.parse::<PathAndQuery>().map_err(|_| {
        RouteError::new(
            ErrorCode::NameInvalid,
            "the path is not a valid request target",
        )
    })?;
    let (host, port) = upstream_host_port(&canonical);
    let origin = if scheme == Scheme::HTTP {
        Origin::http(name_part, asked_port.unwrap_or(80))
    } else {
        Origin::https(&host, port)
    };
    let origin = origin.map_err(|_| {
        RouteError::new(
            ErrorCode::NameInvalid,
            format!("{canonical:?} is not a registry host"),
        )
    })?;
    Ok(MirrorRequest::Upstream {
        target: Target::new(origin),
        path,
    })
}

/// Docker Hub's short names: `alpine/manifests/3` is `library/alpine/…`.
fn hub_name(name_and_rest: &str) -> String {
    let cut = crate::registry::route::NAME_ENDS
        .iter()
        .filter_map(|m| name_and_rest.find(m))
        .min()
        .unwrap_or(name_and_rest.len());
    let (name, rest) = name_and_rest.split_at(cut);
    format!("{}{rest}", docker_hub_repository(name))
}

/// regcache's own answer to `GET /v2/`: the API is here, no token needed.
pub fn base_response() -> Response<Body> {
    let mut resp = Response::new(body::full("{}"));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp
}

/// A refused mirror request, in the registry's error format.
pub fn refusal(err: &RouteError) -> Response<Body> {
    let status = match err.code {
        ErrorCode::Denied => StatusCode::FORBIDDEN,
        code => code.status(),
    };
    error_json(status, err.code, &err.message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn config() -> Config {
        Config::from_settings(Settings {
            intercept: vec!["registry.test".into()],
            connect_ports: vec![5000],
            insecure_registries: vec!["plain.test:5000".into()],
            ..Settings::default()
        })
        .unwrap()
    }

    fn upstream(uri: &str) -> (String, String, String) {
        match resolve(&config(), &uri.parse().unwrap()).unwrap() {
            MirrorRequest::Upstream { target, path } => (
                target.origin.authority.to_string(),
                target.registry,
                path.to_string(),
            ),
            MirrorRequest::Base => ("base".into(), String::new(), String::new()),
        }
    }

    #[test]
    fn mirror_and_prefix_forms() {
        let hub = |p: &str| {
            (
                "registry-1.docker.io".to_string(),
                "docker.io".to_string(),
                p.to_string(),
            )
        };
        assert_eq!(
            upstream("/v2/library/alpine/manifests/3.20"),
            hub("/v2/library/alpine/manifests/3.20")
        );
        assert_eq!(
            upstream("/v2/alpine/manifests/3.20"),
            hub("/v2/library/alpine/manifests/3.20")
        );
        assert_eq!(
            upstream("/v2/alpine/manifests/3.20?ns=docker.io"),
            hub("/v2/library/alpine/manifests/3.20")
        );
        assert_eq!(
            upstream("/v2/docker.io/library/alpine/blobs/sha256:ab"),
            hub("/v2/library/alpine/blobs/sha256:ab")
        );
        assert_eq!(
            upstream("/v2/org/tool/manifests/1?ns=ghcr.io"),
            (
                "ghcr.io".into(),
                "ghcr.io".into(),
                "/v2/org/tool/manifests/1".into()
            )
        );
        assert_eq!(
            upstream("/v2/ghcr.io/org/tool/tags/list?n=10"),
            (
                "ghcr.io".into(),
                "ghcr.io".into(),
                "/v2/org/tool/tags/list?n=10".into()
            )
        );
        assert_eq!(
            upstream("/v2/registry.test:5000/a/manifests/x"),
            (
                "registry.test:5000".into(),
                "registry.test:5000".into(),
                "/v2/a/manifests/x".into()
            )
        );
        assert!(matches!(
            resolve(&config(), &"/v2/".parse().unwrap()),
            Ok(MirrorRequest::Base)
        ));
        // An insecure registry is reached over http and keyed apart.
        assert_eq!(
            upstream("/v2/a/manifests/x?ns=plain.test:5000"),
            (
                "plain.test:5000".into(),
                "http://plain.test:5000".into(),
                "/v2/a/manifests/x".into()
            )
        );
    }

    #[test]
    fn unknown_and_hostile_registries_are_refused() {
        let code = |uri: &str| resolve(&config(), &uri.parse().unwrap()).unwrap_err().code;
        assert_eq!(code("/v2/evil.example/x/manifests/1"), ErrorCode::Denied);
        assert_eq!(code("/v2/x/manifests/1?ns=evil.example"), ErrorCode::Denied);
        // Any port of an intercepted host is no way in either.
        assert_eq!(code("/v2/x/manifests/1?ns=quay.io:5001"), ErrorCode::Denied);
        assert_eq!(code("/v2/quay.io:22/x/manifests/1"), ErrorCode::Denied);
        assert_eq!(code("/v2/x/manifests/1?ns=plain.test"), ErrorCode::Denied);
        for hostile in [
            "/v2/../x/manifests/1",
            "/v2/x/manifests/1?ns=a%2Fb",
            "/v2/x/manifests/1?ns=",
            "/v2/a..b/x/manifests/1",
            "/v2/registry.test:99999/x/manifests/1",
        ] {
            assert_eq!(code(hostile), ErrorCode::NameInvalid, "{hostile}");
        }
    }
}
