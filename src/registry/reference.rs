//! Image references as people write them (`alpine:3.20`,
//! `ghcr.io/org/tool@sha256:…`), expanded the way docker expands them.
//!
//! The rules, in one place for the command line, bundles, prefetch and the
//! mirror:
//! - the first `/`-separated component names a registry when it holds a
//!   `.` or a `:` (a port), or is `localhost` ([`names_registry`]);
//!   otherwise the registry is Docker Hub;
//! - Docker Hub's aliases (`index.docker.io`, `registry-1.docker.io`) are
//!   `docker.io`, and a port 443 is dropped
//!   ([`canonical_registry`]);
//! - on Docker Hub a one-component name is an official image:
//!   `alpine` is `library/alpine` ([`docker_hub_repository`]);
//! - no tag means `latest`; `@digest` names a digest, and wins over a tag
//!   given with it (`name:tag@sha256:…`);
//! - Docker Hub's API is not on `docker.io` but on `registry-1.docker.io`
//!   ([`ImageRef::upstream`]).
//!
//! Nothing here does I/O, and bad input gives an error, never a panic.

use std::fmt;

use super::digest::Digest;
use super::hosts::{canonical_registry, upstream_host_port, DOCKER_HUB};
use super::name::RepoName;
use super::route::Reference;

/// Why text is not an image reference; the message says which part is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ReferenceError(String);

/// An image in a registry: registry, repository, and a tag or a digest.
///
/// This is how the command line names images and how a bundle's
/// `io.regcache.ref` annotation records them; [`fmt::Display`] writes the
/// full form (`docker.io/library/alpine:3.20`), which [`ImageRef::parse`]
/// reads back to the same value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The canonical registry name (`docker.io`, `ghcr.io`, `localhost:5000`).
    pub registry: String,
    /// The repository (`library/alpine`).
    pub repository: RepoName,
    /// The tag or digest within the repository.
    pub reference: Reference,
}

impl ImageRef {
    /// Expands an image reference the way docker does (see the module
    /// documentation): `alpine:3` is `docker.io/library/alpine:3`. The
    /// registry, repository, tag and digest must be valid; the error says
    /// why not.
    pub fn parse(text: &str) -> Result<Self, ReferenceError> {
        let (name, digest) = match text.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (text, None),
        };
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t),
            _ => (name, "latest"),
        };
        let (registry, repo) = match name.split_once('/') {
            Some((first, rest)) if names_registry(first) => (canonical_registry(first), rest),
            _ => (DOCKER_HUB.to_string(), name),
        };
        let registry_ok = !registry.is_empty()
            && registry
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        if !registry_ok {
            return Err(ReferenceError(format!(
                "{text:?}: {registry:?} is not a registry host name"
            )));
        }
        let repo = if registry == DOCKER_HUB {
            docker_hub_repository(repo)
        } else {
            repo.to_string()
        };
        let repository = RepoName::parse(&repo).map_err(|e| ReferenceError(e.to_string()))?;
        let reference = match digest {
            Some(d) => Reference::Digest(
                d.parse::<Digest>()
                    .map_err(|e| ReferenceError(e.to_string()))?,
            ),
            None => Reference::parse(tag).map_err(|e| ReferenceError(e.to_string()))?,
        };
        Ok(Self {
            registry,
            repository,
            reference,
        })
    }

    /// The tag, if the reference names one.
    pub fn tag(&self) -> Option<&str> {
        self.reference.as_tag()
    }

    /// Where the image's registry API is reached: (host, port), with Docker
    /// Hub's API host for `docker.io` (see [`upstream_host_port`]).
    pub fn upstream(&self) -> (String, u16) {
        upstream_host_port(&self.registry)
    }
}

impl fmt::Display for ImageRef {
    /// `docker.io/library/alpine:3.20` or `ghcr.io/org/tool@sha256:…`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (registry, repo) = (&self.registry, &self.repository);
        match &self.reference {
            Reference::Tag(tag) => write!(f, "{registry}/{repo}:{tag}"),
            Reference::Digest(digest) => write!(f, "{registry}/{repo}@{digest}"),
        }
    }
}

/// Whether the first `/`-separated component of an image name (or of a
/// mirror path) names a registry rather than a repository: it holds a `.`
/// or a `:`, or is `localhost`.
pub fn names_registry(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// A repository name on Docker Hub as its API names it: a one-component
/// name is an official image (`alpine` is `library/alpine`); any other name
/// (and the empty one) is unchanged.
pub fn docker_hub_repository(name: &str) -> String {
    if name.is_empty() || name.contains('/') {
        name.to_string()
    } else {
        format!("library/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest() -> Digest {
        Digest::of(b"x")
    }

    #[test]
    fn references_expand_like_docker() {
        let d = digest();
        let with_digest = |s: &str| format!("{s}@{d}");
        let cases: Vec<(String, &str, &str, String)> = vec![
            // Docker Hub: no registry, short names, its aliases.
            (
                "alpine".into(),
                "docker.io",
                "library/alpine",
                "latest".into(),
            ),
            (
                "alpine:3.20".into(),
                "docker.io",
                "library/alpine",
                "3.20".into(),
            ),
            ("user/img".into(), "docker.io", "user/img", "latest".into()),
            ("org/tool".into(), "docker.io", "org/tool", "latest".into()),
            (
                "docker.io/x".into(),
                "docker.io",
                "library/x",
                "latest".into(),
            ),
            (
                "docker.io/library/x:1".into(),
                "docker.io",
                "library/x",
                "1".into(),
            ),
            (
                "index.docker.io/x".into(),
                "docker.io",
                "library/x",
                "latest".into(),
            ),
            (
                "index.docker.io/library/x:2".into(),
                "docker.io",
                "library/x",
                "2".into(),
            ),
            (
                "registry-1.docker.io/u/x:3".into(),
                "docker.io",
                "u/x",
                "3".into(),
            ),
            (
                "docker.io:443/x".into(),
                "docker.io",
                "library/x",
                "latest".into(),
            ),
            (
                with_digest("registry-1.docker.io/library/x"),
                "docker.io",
                "library/x",
                d.to_string(),
            ),
            // `localhost` is a name on Docker Hub unless a repository follows.
            (
                "localhost".into(),
                "docker.io",
                "library/localhost",
                "latest".into(),
            ),
            ("localhost/x".into(), "localhost", "x", "latest".into()),
            // Other registries, with and without ports.
            (
                "ghcr.io/org/tool:1".into(),
                "ghcr.io",
                "org/tool",
                "1".into(),
            ),
            (
                "GHCR.io/org/tool".into(),
                "ghcr.io",
                "org/tool",
                "latest".into(),
            ),
            (
                "localhost:5000/x".into(),
                "localhost:5000",
                "x",
                "latest".into(),
            ),
            (
                "localhost:5000/a:b".into(),
                "localhost:5000",
                "a",
                "b".into(),
            ),
            (
                "localhost:5000/a/b".into(),
                "localhost:5000",
                "a/b",
                "latest".into(),
            ),
            ("host:5000/x:tag".into(), "host:5000", "x", "tag".into()),
            (
                "registry.local:443/x".into(),
                "registry.local",
                "x",
                "latest".into(),
            ),
            (
                "docker.io:5000/x".into(),
                "docker.io:5000",
                "x",
                "latest".into(),
            ),
            ("[::1]:5000/x:1".into(), "[::1]:5000", "x", "1".into()),
            (
                "a.b/c/d/e:v1.0_x-Y".into(),
                "a.b",
                "c/d/e",
                "v1.0_x-Y".into(),
            ),
            // Digests, alone or after a tag (the digest wins).
            (with_digest("x"), "docker.io", "library/x", d.to_string()),
            (
                with_digest("x:tag"),
                "docker.io",
                "library/x",
                d.to_string(),
            ),
            (
                with_digest("ghcr.io/org/tool:1"),
                "ghcr.io",
                "org/tool",
                d.to_string(),
            ),
            (
                with_digest("localhost:5000/x"),
                "localhost:5000",
                "x",
                d.to_string(),
            ),
        ];
        for (text, registry, repository, reference) in cases {
            let image = ImageRef::parse(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(image.registry, registry, "{text:?}");
            assert_eq!(image.repository.as_str(), repository, "{text:?}");
            assert_eq!(image.reference.to_string(), reference, "{text:?}");
            assert_eq!(image.tag().is_none(), reference.contains(':'), "{text:?}");
            // The full form reads back to the same image.
            assert_eq!(ImageRef::parse(&image.to_string()), Ok(image), "{text:?}");
        }
    }

    #[test]
    fn bad_references_are_errors() {
        let long_tag = format!("x:{}", "a".repeat(129));
        let long_name = "a".repeat(300);
        for bad in [
            "",
            ":",
            ":tag",
            "@",
            "x@",
            "x@sha256:abc",
            "alpine@sha256:abc",
            "x@latest",
            "x:tag@",
            &format!("x@sha256:{}", "A".repeat(64)),
            "../x:1",
            "x/..",
            "ghcr.io/../x",
            "a//b",
            "/x",
            "x/",
            "docker.io/",
            "ghcr.io/",
            "x:bad tag",
            "x:",
            "a/b:",
            "x:-dash",
            "bad host.io/x:1",
            "bad_host.io/x",
            "UPPER",
            "Alpine:3",
            "ghcr.io/Org/tool",
            "a%2fb",
            &long_tag,
            &long_name,
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn full_names_and_upstreams() {
        let d = digest();
        for (text, shown, host, port) in [
            (
                "alpine:3.20",
                "docker.io/library/alpine:3.20".to_string(),
                "registry-1.docker.io",
                443,
            ),
            (
                &format!("registry-1.docker.io/library/x@{d}"),
                format!("docker.io/library/x@{d}"),
                "registry-1.docker.io",
                443,
            ),
            (
                &format!("index.docker.io/library/x@{d}"),
                format!("docker.io/library/x@{d}"),
                "registry-1.docker.io",
                443,
            ),
            (
                "localhost:5000/a/b",
                "localhost:5000/a/b:latest".to_string(),
                "localhost",
                5000,
            ),
            (
                "ghcr.io/org/tool:1",
                "ghcr.io/org/tool:1".to_string(),
                "ghcr.io",
                443,
            ),
            (
                "[::1]:5000/x",
                "[::1]:5000/x:latest".to_string(),
                "[::1]",
                5000,
            ),
        ] {
            let image = ImageRef::parse(text).unwrap();
            assert_eq!(image.to_string(), shown, "{text:?}");
            assert_eq!(image.upstream(), (host.to_string(), port), "{text:?}");
        }
    }

    #[test]
    fn registry_components_and_hub_names() {
        for (component, is_registry) in [
            ("ghcr.io", true),
            ("localhost", true),
            ("localhost:5000", true),
            ("host:5000", true),
            ("library", false),
            ("user", false),
            ("Localhost", false),
            ("", false),
        ] {
            assert_eq!(names_registry(component), is_registry, "{component:?}");
        }
        for (name, hub) in [
            ("alpine", "library/alpine"),
            ("library/alpine", "library/alpine"),
            ("user/img", "user/img"),
            ("a/b/c", "a/b/c"),
            ("", ""),
        ] {
            assert_eq!(docker_hub_repository(name), hub, "{name:?}");
        }
    }
}
