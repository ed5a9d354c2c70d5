//! Which registry operation a request path asks for.
//!
//! The distribution API lives under `/v2/`. regcache caches two kinds of
//! request and passes everything else through:
//!
//! | path                              | route                  |
//! |-----------------------------------|------------------------|
//! | `/v2/` or `/v2`                   | [`Route::Base`]        |
//! | `/v2/<name>/manifests/<reference>`| [`Route::Manifest`]    |
//! | `/v2/<name>/blobs/<digest>`       | [`Route::Blob`]        |
//! | `/v2/<name>/referrers/<digest>`   | [`Route::Referrers`]   |
//! | anything else                     | [`Route::Other`]       |
//!
//! A name may itself contain `manifests` or `blobs` components
//! (`/v2/a/blobs/b/manifests/latest` is the manifest `latest` of repository
//! `a/blobs/b`), so the name is split off from the right: the route is chosen
//! by the last two path segments. Blob uploads (`…/blobs/uploads/…`), tag
//! lists and the catalog are [`Route::Other`].
//!
//! [`parse`] takes the raw request path, still percent-encoded. It does not
//! decode: no valid name, tag or digest contains `%`, so an encoded character
//! in a name is simply invalid. A `/v2/` path that tries to escape its
//! directory (a `.` or `..` segment, an encoded `/`, `\` or `.`, or a
//! backslash) is refused outright, whatever it asks for, rather than being
//! passed on for someone else to interpret.

use std::fmt;

use super::digest::Digest;
use super::error::{quoted, ErrorCode, RouteError};
use super::name::RepoName;

/// The longest tag the distribution specification allows.
pub const MAX_TAG_LEN: usize = 128;

/// What a manifest request names: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A tag, `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`; mutable upstream.
    Tag(String),
    /// A digest; immutable.
    Digest(Digest),
}

impl Reference {
    /// Parses the `<reference>` of `/v2/<name>/manifests/<reference>`.
    ///
    /// Anything with a `:` is taken as a digest (tags cannot contain one) and
    /// fails with `DIGEST_INVALID` (400) if malformed. Anything else must be
    /// a valid tag; one that is not names no manifest that can exist, so it
    /// fails with `MANIFEST_UNKNOWN` (404), as the OCI distribution spec's
    /// pull workflow and the registries answer.
    pub fn parse(s: &str) -> Result<Self, RouteError> {
        if s.contains(':') {
            return s
                .parse()
                .map(Reference::Digest)
                .map_err(|e| RouteError::new(ErrorCode::DigestInvalid, e.to_string()));
        }
        check_tag(s).map_err(|why| {
            RouteError::new(
                ErrorCode::ManifestUnknown,
                format!("manifest unknown: {} is not a valid tag ({why})", quoted(s)),
            )
        })?;
        Ok(Reference::Tag(s.to_string()))
    }

    /// The digest, if this reference is one.
    pub fn as_digest(&self) -> Option<&Digest> {
        match self {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => None,
        }
    }

    /// The tag, if this reference is one.
    pub fn as_tag(&self) -> Option<&str> {
        match self {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        }
    }
}

/// Checks the tag grammar; the error says what is wrong.
fn check_tag(s: &str) -> Result<(), String> {
    let Some(first) = s.bytes().next() else {
        return Err("the tag is empty".into());
    };
    if s.len() > MAX_TAG_LEN {
        return Err(format!(
            "the tag is {} characters long; at most {MAX_TAG_LEN} are allowed",
            s.len()
        ));
    }
    if !(first.is_ascii_alphanumeric() || first == b'_') {
        return Err("a tag must begin with a letter, digit or '_'".into());
    }
    if let Some(c) = s
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "the character {c:?} is not allowed (a tag uses A-Z, a-z, 0-9, '.', '_', '-')"
        ));
    }
    Ok(())
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => fmt::Display::fmt(d, f),
        }
    }
}

/// The registry operation a request path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/` or `/v2`: the API version check.
    Base,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest {
        /// The repository.
        name: RepoName,
        /// The tag or digest.
        reference: Reference,
    },
    /// `/v2/<name>/blobs/<digest>`.
    Blob {
        /// The repository.
        name: RepoName,
        /// The blob's digest.
        digest: Digest,
    },
    /// `/v2/<name>/referrers/<digest>` (OCI 1.1; a query such as
    /// `artifactType=` stays on the request).
    Referrers {
        /// The repository.
        name: RepoName,
        /// The manifest whose referrers are asked for.
        digest: Digest,
    },
    /// Any other path (`/v2/…/tags/list`, blob uploads, the
    /// catalog, non-`/v2` paths): passed through to the upstream untouched,
    /// never looked up in the cache.
    Other,
}

/// Finds the route of a raw (percent-encoded) request path.
///
/// A query string, if the caller left one on, is ignored. Errors carry the
/// distribution code to answer with: `NAME_INVALID` or `DIGEST_INVALID`
/// (400), or `MANIFEST_UNKNOWN` (404) for a manifest reference that is not a
/// valid tag.
pub fn parse(path: &str) -> Result<Route, RouteError> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if path == "/v2" || path == "/v2/" {
        return Ok(Route::Base);
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Ok(Route::Other);
    };
    check_not_escaping(path, rest)?;
    let Some((head, last)) = rest.rsplit_once('/') else {
        return Ok(Route::Other);
    };
    let (name, kind) = match head.rsplit_once('/') {
        Some((name, kind)) => (name, kind),
        None => ("", head),
    };
    match kind {
        "manifests" => {
            let name = RepoName::parse(name)?;
            let reference = Reference::parse(last)?;
            Ok(Route::Manifest { name, reference })
        }
        "referrers" if !last.is_empty() => {
            let name = RepoName::parse(name)?;
            let digest = last.parse().map_err(|e: super::digest::DigestError| {
                RouteError::new(ErrorCode::DigestInvalid, e.to_string())
            })?;
            Ok(Route::Referrers { name, digest })
        }
        // `blobs/uploads` and other non-digest words belong to the push API.
        "blobs" if last.contains(':') => {
            let name = RepoName::parse(name)?;
            let digest = last.parse().map_err(|e: super::digest::DigestError| {
                RouteError::new(ErrorCode::DigestInvalid, e.to_string())
            })?;
            Ok(Route::Blob { name, digest })
        }
        _ => Ok(Route::Other),
    }
}

/// The words that end a repository name in a `/v2/` path:
/// `/v2/<name>/manifests/…`, `…/blobs/…` (and `blobs/uploads/…`),
/// `…/tags/list`, `…/referrers/…`.
pub const NAME_ENDS: [&str; 4] = ["/manifests/", "/blobs/", "/tags/", "/referrers/"];

/// The repository a `/v2/` path is about, whatever it asks of it: a
/// manifest or blob by tag or digest, an upload, the tag list, referrers.
/// `None` for a path that names no repository (`/v2/`, `/v2/_catalog`,
/// non-`/v2` paths); an error for an invalid name or an escaping path.
///
/// The name ends at the last of [`NAME_ENDS`], as [`parse`] splits names
/// from the right, and as the registries' routers match (their name pattern
/// is greedy): `/v2/a/blobs/b/manifests/latest` is about `a/blobs/b`.
pub fn repository_of(path: &str) -> Option<Result<RepoName, RouteError>> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let rest = path.strip_prefix("/v2/")?;
    if let Err(e) = check_not_escaping(path, rest) {
        return Some(Err(e));
    }
    let slashed = format!("/{rest}");
    let end = NAME_ENDS.iter().filter_map(|m| slashed.rfind(m)).max()?;
    Some(RepoName::parse(&slashed[1..end.max(1)]))
}

/// Refuses a `/v2/` path with dot segments or encoded separators.
fn check_not_escaping(path: &str, rest: &str) -> Result<(), RouteError> {
    let dot_segment = rest.split('/').any(|seg| seg == "." || seg == "..");
    let lower = rest.to_ascii_lowercase();
    let encoded = ["%2f", "%5c", "%2e", "%00"]
        .iter()
        .any(|e| lower.contains(e));
    if dot_segment || encoded || rest.contains('\\') {
        return Err(RouteError::new(
            ErrorCode::NameInvalid,
            format!(
                "the path {} has a dot segment or an encoded separator; \
                 repository names are plain a-z, 0-9, '.', '_', '-' and '/'",
                quoted(path)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn name(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    fn digest() -> Digest {
        D.parse().unwrap()
    }

    fn code(path: &str) -> ErrorCode {
        match parse(path) {
            Err(e) => e.code,
            Ok(r) => panic!("{path:?} parsed as {r:?}"),
        }
    }

    #[test]
    fn base_and_pass_through_paths() {
        assert_eq!(parse("/v2/").unwrap(), Route::Base);
        assert_eq!(parse("/v2").unwrap(), Route::Base);
        assert_eq!(parse("/v2/?x=1").unwrap(), Route::Base);
        for other in [
            "/v2/_catalog",
            "/v2/a/tags/list",
            "/v2/library/alpine/tags/list",
            "/v2/Bad_Name/tags/list",
            "/v2/a/blobs/uploads/",
            "/v2/a/blobs/uploads/uuid",
            "/v2/a/blobs/uploads/3f2a-11ee/extra",
            "/v2/a/blobs/uploads",
            "/v2/a/blobs/",
            "/v2/a",
            "/v2//",
            "/v2/x/blobs/y/referrers/",
            "/v2/x/manifests/y/tags/list",
            "/v1/search",
            "/",
            "",
            "*",
            "/ca.crt",
            "/v20/a/manifests/latest",
            "/V2/a/manifests/latest",
        ] {
            assert_eq!(parse(other).unwrap(), Route::Other, "{other:?}");
        }
    }

    #[test]
    fn referrers_of_a_digest() {
        assert_eq!(
            parse(&format!(
                "/v2/org/tool/referrers/{D}?artifactType=application%2Fx"
            ))
            .unwrap(),
            Route::Referrers {
                name: name("org/tool"),
                digest: digest()
            }
        );
        assert_eq!(code("/v2/a/referrers/sha256:abc"), ErrorCode::DigestInvalid);
        assert_eq!(code("/v2/A/referrers/sha256:abc"), ErrorCode::NameInvalid);
    }

    #[test]
    fn manifests_by_tag_and_digest() {
        assert_eq!(
            parse("/v2/library/alpine/manifests/3.20").unwrap(),
            Route::Manifest {
                name: name("library/alpine"),
                reference: Reference::Tag("3.20".into()),
            }
        );
        assert_eq!(
            parse(&format!("/v2/a/b/c/manifests/{D}")).unwrap(),
            Route::Manifest {
                name: name("a/b/c"),
                reference: Reference::Digest(digest()),
            }
        );
        assert_eq!(
            parse("/v2/a/manifests/latest?ns=docker.io").unwrap(),
            Route::Manifest {
                name: name("a"),
                reference: Reference::Tag("latest".into()),
            }
        );
    }

    #[test]
    fn blobs_by_digest() {
        assert_eq!(
            parse(&format!("/v2/my-org/team.x/app__v2/blobs/{D}")).unwrap(),
            Route::Blob {
                name: name("my-org/team.x/app__v2"),
                digest: digest(),
            }
        );
    }

    #[test]
    fn names_may_contain_the_route_words() {
        assert_eq!(
            parse("/v2/a/blobs/b/manifests/latest").unwrap(),
            Route::Manifest {
                name: name("a/blobs/b"),
                reference: Reference::Tag("latest".into()),
            }
        );
        assert_eq!(
            parse(&format!("/v2/manifests/blobs/{D}")).unwrap(),
            Route::Blob {
                name: name("manifests"),
                digest: digest(),
            }
        );
        assert_eq!(
            parse("/v2/manifests/manifests/manifests").unwrap(),
            Route::Manifest {
                name: name("manifests"),
                reference: Reference::Tag("manifests".into()),
            }
        );
    }

    #[test]
    fn hostile_names_are_refused() {
        for path in [
            "/v2/../etc/manifests/x",
            "/v2/a/../../etc/manifests/x",
            "/v2/./a/manifests/x",
            "/v2/a/..",
            "/v2/../etc/tags/list",
            &format!("/v2/a%2fb/blobs/{D}"),
            &format!("/v2/a%2Fb/blobs/{D}"),
            &format!("/v2/a%2F..%2Fb/manifests/{D}"),
            "/v2/%2e%2e/manifests/latest",
            "/v2/a%5cb/manifests/latest",
            "/v2/a\\b/manifests/latest",
            "/v2/a/blobs/uploads/../../b",
            "/v2/a%00/manifests/latest",
            "/v2/A/manifests/latest",
            "/v2/a//b/manifests/latest",
            "/v2//manifests/latest",
            "/v2/manifests/latest",
            &format!("/v2//blobs/{D}"),
            "/v2/a%41/manifests/latest",
            &format!("/v2/{}/manifests/latest", "a".repeat(300)),
            &format!("/v2/{}/blobs/{D}", ["abc"; 75].join("/")),
        ] {
            assert_eq!(code(path), ErrorCode::NameInvalid, "{path:?}");
        }
    }

    #[test]
    fn bad_digests_are_refused_and_bad_tags_are_unknown_manifests() {
        let hex = &D[7..];
        for path in [
            "/v2/a/blobs/sha256:XYZ",
            "/v2/a/blobs/sha256:",
            "/v2/a/blobs/:",
            &format!("/v2/a/blobs/sha256:{}", hex.to_uppercase()),
            &format!("/v2/a/blobs/sha384:{hex}"),
            &format!("/v2/a/blobs/sha256:{hex}0"),
            "/v2/a/manifests/sha256:abc",
            &format!("/v2/a/manifests/sha256:{}", hex.to_uppercase()),
        ] {
            assert_eq!(code(path), ErrorCode::DigestInvalid, "{path:?}");
        }
        for path in [
            &format!("/v2/a/manifests/{}", "t".repeat(129)),
            "/v2/a/manifests/",
            "/v2/a/manifests/.hidden",
            "/v2/a/manifests/-x",
            "/v2/a/manifests/a%20b",
            "/v2/a/manifests/a@b",
            "/v2/a/manifests/ü",
            "/v2/a/manifests/a!b",
        ] {
            assert_eq!(code(path), ErrorCode::ManifestUnknown, "{path:?}");
            assert_eq!(
                parse(path).unwrap_err().code.status(),
                http::StatusCode::NOT_FOUND,
                "{path:?}"
            );
        }
        // Unsafe names and malformed digests stay 400, whatever the tag.
        assert_eq!(code("/v2/a%2fb/manifests/.x"), ErrorCode::NameInvalid);
        assert_eq!(code("/v2/../manifests/.x"), ErrorCode::NameInvalid);
        assert_eq!(code("/v2/a/manifests/sha256:zz"), ErrorCode::DigestInvalid);
        assert_eq!(
            ErrorCode::DigestInvalid.status(),
            http::StatusCode::BAD_REQUEST
        );
        assert!(parse(&format!("/v2/a/manifests/{}", "t".repeat(128))).is_ok());
        assert!(parse("/v2/a/manifests/_x.Y-9").is_ok());
    }

    #[test]
    fn name_is_checked_before_the_reference() {
        assert_eq!(code("/v2/A/blobs/sha256:XYZ"), ErrorCode::NameInvalid);
        assert_eq!(code("/v2/A/manifests/-"), ErrorCode::NameInvalid);
    }

    #[test]
    fn references_display_as_written() {
        assert_eq!(Reference::Tag("v1.2".into()).to_string(), "v1.2");
        let d = Reference::parse(D).unwrap();
        assert_eq!(d.to_string(), D);
        assert_eq!(d.as_digest(), Some(&digest()));
        assert_eq!(d.as_tag(), None);
        assert_eq!(Reference::parse("latest").unwrap().as_tag(), Some("latest"));
    }

    /// A tiny linear congruential generator: random-looking input, no deps.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn never_panics_on_random_paths() {
        const PIECES: &[&str] = &[
            "/",
            "v2",
            "/v2/",
            "manifests",
            "blobs",
            "uploads",
            ":",
            "sha256:",
            "..",
            ".",
            "%2f",
            "%2F",
            "%",
            "a",
            "Z",
            "_",
            "-",
            "__",
            "é",
            "\\",
            "?",
            "#",
            D,
            "tags",
            "list",
        ];
        let mut rng = Lcg(0x5eed);
        for _ in 0..20_000 {
            let mut bytes = Vec::new();
            if rng.next().is_multiple_of(2) {
                bytes.extend_from_slice(b"/v2/");
            }
            for _ in 0..rng.next() % 24 {
                if rng.next().is_multiple_of(3) {
                    bytes.push((rng.next() % 256) as u8);
                } else {
                    let piece = PIECES[(rng.next() as usize) % PIECES.len()];
                    bytes.extend_from_slice(piece.as_bytes());
                }
            }
            let path = String::from_utf8_lossy(&bytes);
            let (name, tail) = match parse(&path) {
                Ok(Route::Manifest { name, reference }) => (name, format!("manifests/{reference}")),
                Ok(Route::Blob { name, digest }) => (name, format!("blobs/{digest}")),
                _ => continue,
            };
            let name = name.as_str();
            assert!(!name.contains("..") && !name.contains('%'), "{path:?}");
            let without_query = path.split(['?', '#']).next().unwrap_or_default();
            assert_eq!(format!("/v2/{name}/{tail}"), without_query);
        }
    }

    #[test]
    fn every_path_about_a_repository_names_it() {
        let table = [
            ("/v2/library/alpine/manifests/3.20", Some("library/alpine")),
            (
                "/v2/library/alpine/manifests/sha256:0000000000000000000000000000000000000000000000000000000000000000",
                Some("library/alpine"),
            ),
            ("/v2/a/b/blobs/sha256:abc", Some("a/b")),
            ("/v2/a/b/blobs/uploads/", Some("a/b")),
            ("/v2/a/b/blobs/uploads/1234-abcd?_state=x", Some("a/b")),
            ("/v2/a/tags/list?n=10", Some("a")),
            ("/v2/a/referrers/sha256:abc?artifactType=x", Some("a")),
            ("/v2/a/blobs/b/manifests/latest", Some("a/blobs/b")),
            ("/v2/a/manifests/b/tags/list", Some("a/manifests/b")),
            ("/v2/", None),
            ("/v2/_catalog", None),
            ("/token", None),
        ];
        for (path, want) in table {
            let got = repository_of(path).map(|r| r.map(|n| n.as_str().to_string()));
            assert_eq!(got, want.map(|w| Ok(w.to_string())), "{path}");
        }
        for bad in [
            "/v2/Upper/tags/list",
            "/v2/a/../b/tags/list",
            "/v2/a%2fb/blobs/uploads/",
            "/v2//manifests/x",
            "/v2/manifests/x",
        ] {
            assert!(matches!(repository_of(bad), Some(Err(_))), "{bad}");
        }
    }
}
