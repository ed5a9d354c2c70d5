//! Manifest media types and `Accept` negotiation.
//!
//! A registry may hold several manifests for one tag (a Docker v2 manifest, an
//! OCI index, …) and chooses by the request's `Accept` header, so a cached
//! manifest is served only to a client that accepts its type. What a
//! manifest is made of is read by [`crate::registry::manifest`].
//!
//! Everything here reads untrusted bytes and never panics: bad input gives
//! "no" or the default type.

use http::header::{HeaderMap, ACCEPT};
use serde_json::Value;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index (a list of manifests, one per platform).
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list (schema 2 multi-platform).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 1, signed.
pub const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// Docker image manifest, schema 1, unsigned.
pub const DOCKER_MANIFEST_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";

/// The media type without parameters, trimmed and lower-cased.
fn essence(media_type: &str) -> String {
    media_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// Whether a request's `Accept` headers allow `media_type`.
///
/// Every `Accept` header of the request counts, each possibly a
/// comma-separated list with `;q=` weights. No `Accept` header at all (or
/// only empty ones) allows everything. `*/*` and `type/*` match as wildcards;
/// when several ranges match, the most specific one decides, so
/// `*/*, application/vnd.oci.image.index.v1+json;q=0` allows everything but
/// OCI indexes. A weight of 0 excludes.
pub fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let wanted = essence(media_type);
    let (wanted_type, _) = wanted.split_once('/').unwrap_or((wanted.as_str(), ""));
    let mut any_range = false;
    // (specificity, weight) of the best match so far.
    let mut best: Option<(u8, f32)> = None;
    for value in headers.get_all(ACCEPT) {
        let value = String::from_utf8_lossy(value.as_bytes());
        for item in value.split(',') {
            let mut parts = item.split(';');
            let range = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            if range.is_empty() {
                continue;
            }
            any_range = true;
            let specificity = if range == wanted {
                3
            } else if range.strip_suffix("/*") == Some(wanted_type) {
                2
            } else if range == "*/*" || range == "*" {
                1
            } else {
                continue;
            };
            let weight = parts.find_map(quality).unwrap_or(1.0);
            best = match best {
                Some((s, w)) if s > specificity || (s == specificity && w >= weight) => {
                    Some((s, w))
                }
                _ => Some((specificity, weight)),
            };
        }
    }
    if !any_range {
        return true;
    }
    best.is_some_and(|(_, weight)| weight > 0.0)
}

/// The weight of a `q=` media-range parameter; other parameters give `None`.
/// An unreadable weight counts as 1, as if absent.
fn quality(param: &str) -> Option<f32> {
    let (key, value) = param.split_once('=')?;
    if !key.trim().eq_ignore_ascii_case("q") {
        return None;
    }
    let q = value.trim().trim_matches('"').parse::<f32>().unwrap_or(1.0);
    Some(if q.is_nan() { 1.0 } else { q })
}

/// The media type of a manifest.
///
/// The response `Content-Type` if there is one (parameters stripped,
/// lower-cased); otherwise the body's `mediaType` field; otherwise a guess
/// from the shape: `manifests` means an OCI index, a schema-1 body (with
/// `schemaVersion: 1`) the Docker v1 type (signed if it has `signatures`),
/// anything else an OCI manifest.
pub fn manifest_media_type(content_type: Option<&str>, body: &[u8]) -> String {
    if let Some(ct) = content_type.map(essence).filter(|ct| !ct.is_empty()) {
        return ct;
    }
    let Ok(Value::Object(doc)) = serde_json::from_slice::<Value>(body) else {
        return OCI_MANIFEST.to_string();
    };
    if let Some(mt) = doc.get("mediaType").and_then(Value::as_str) {
        let mt = essence(mt);
        if !mt.is_empty() {
            return mt;
        }
    }
    if doc.contains_key("manifests") {
        return OCI_INDEX.to_string();
    }
    if doc.get("schemaVersion").and_then(Value::as_u64) == Some(1) {
        return if doc.contains_key("signatures") {
            DOCKER_MANIFEST_V1_SIGNED
        } else {
            DOCKER_MANIFEST_V1
        }
        .to_string();
    }
    OCI_MANIFEST.to_string()
}

/// Whether `media_type` is one of the manifest (or index) types above, as
/// opposed to a blob's. Parameters and case are ignored.
pub fn is_manifest(media_type: &str) -> bool {
    let mt = essence(media_type);
    [
        OCI_MANIFEST,
        OCI_INDEX,
        DOCKER_MANIFEST_V2,
        DOCKER_MANIFEST_LIST,
        DOCKER_MANIFEST_V1_SIGNED,
        DOCKER_MANIFEST_V1,
    ]
    .contains(&mt.as_str())
}

/// Whether `media_type` is a list of manifests: an OCI index or a Docker
/// manifest list. Parameters and case are ignored.
pub fn is_index(media_type: &str) -> bool {
    let mt = essence(media_type);
    mt == OCI_INDEX || mt == DOCKER_MANIFEST_LIST
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::manifest::tests::{DOCKER_LIST, OCI_IMAGE};
    use http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(ACCEPT, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn no_accept_header_accepts_everything() {
        assert!(accepts(&HeaderMap::new(), OCI_INDEX));
        assert!(accepts(&headers(&[""]), OCI_INDEX));
        assert!(accepts(&headers(&[" , "]), DOCKER_MANIFEST_V2));
    }

    #[test]
    fn exact_types_across_several_headers() {
        let h = headers(&[
            DOCKER_MANIFEST_V2,
            &format!("{DOCKER_MANIFEST_LIST}, {OCI_MANIFEST}"),
        ]);
        assert!(accepts(&h, DOCKER_MANIFEST_V2));
        assert!(accepts(&h, DOCKER_MANIFEST_LIST));
        assert!(accepts(&h, OCI_MANIFEST));
        assert!(!accepts(&h, OCI_INDEX));
        assert!(!accepts(&h, DOCKER_MANIFEST_V1_SIGNED));
    }

    #[test]
    fn wildcards_match() {
        assert!(accepts(&headers(&["*/*"]), OCI_INDEX));
        assert!(accepts(&headers(&["text/html, application/*"]), OCI_INDEX));
        assert!(!accepts(&headers(&["text/*"]), OCI_INDEX));
        assert!(!accepts(&headers(&["application/json"]), OCI_INDEX));
    }

    #[test]
    fn zero_weight_excludes_and_the_most_specific_range_wins() {
        assert!(!accepts(
            &headers(&[&format!("{OCI_INDEX};q=0")]),
            OCI_INDEX
        ));
        assert!(!accepts(
            &headers(&[&format!("{OCI_INDEX}; Q=0.0")]),
            OCI_INDEX
        ));
        assert!(accepts(
            &headers(&[&format!("{OCI_INDEX};q=0.1")]),
            OCI_INDEX
        ));
        let h = headers(&["*/*", &format!("{OCI_INDEX};q=0")]);
        assert!(!accepts(&h, OCI_INDEX));
        assert!(accepts(&h, OCI_MANIFEST));
        let h = headers(&["*/*;q=0", &format!("{OCI_INDEX};q=0.5")]);
        assert!(accepts(&h, OCI_INDEX));
        assert!(!accepts(&h, OCI_MANIFEST));
        let h = headers(&["application/*;q=0, */*"]);
        assert!(!accepts(&h, OCI_MANIFEST));
        assert!(accepts(&h, "text/plain"));
    }

    #[test]
    fn parameters_and_case_are_ignored() {
        let h = headers(&[&format!(
            "{}; charset=utf-8; q=0.9",
            OCI_MANIFEST.to_uppercase()
        )]);
        assert!(accepts(&h, OCI_MANIFEST));
        assert!(accepts(&h, &format!("{OCI_MANIFEST}; charset=utf-8")));
        assert!(accepts(
            &headers(&[&format!("{OCI_MANIFEST};q=bogus")]),
            OCI_MANIFEST
        ));
    }

    #[test]
    fn real_client_accept_lists() {
        // containerd sends one comma-separated list ending in */*.
        let h = headers(&[&format!(
            "{DOCKER_MANIFEST_V2}, {DOCKER_MANIFEST_LIST}, {OCI_MANIFEST}, {OCI_INDEX}, */*"
        )]);
        assert!(accepts(&h, OCI_INDEX));
        assert!(accepts(&h, DOCKER_MANIFEST_V1_SIGNED));
        // docker sends one header per type.
        let h = headers(&[OCI_MANIFEST, DOCKER_MANIFEST_V2, DOCKER_MANIFEST_V1_SIGNED]);
        assert!(accepts(&h, DOCKER_MANIFEST_V1_SIGNED));
        assert!(!accepts(&h, DOCKER_MANIFEST_LIST));
    }

    #[test]
    fn media_type_from_header_then_body_then_shape() {
        assert_eq!(
            manifest_media_type(
                Some("Application/VND.oci.image.index.v1+json; charset=x"),
                b""
            ),
            OCI_INDEX
        );
        assert_eq!(
            manifest_media_type(Some(" "), DOCKER_LIST.as_bytes()),
            DOCKER_MANIFEST_LIST
        );
        assert_eq!(
            manifest_media_type(None, OCI_IMAGE.as_bytes()),
            OCI_MANIFEST
        );
        assert_eq!(
            manifest_media_type(None, br#"{"schemaVersion":2,"manifests":[]}"#),
            OCI_INDEX
        );
        assert_eq!(
            manifest_media_type(None, br#"{"schemaVersion":2}"#),
            OCI_MANIFEST
        );
        assert_eq!(
            manifest_media_type(None, br#"{"schemaVersion":1,"signatures":[]}"#),
            DOCKER_MANIFEST_V1_SIGNED
        );
        assert_eq!(
            manifest_media_type(None, br#"{"schemaVersion":1}"#),
            DOCKER_MANIFEST_V1
        );
        assert_eq!(
            manifest_media_type(None, br#"{"mediaType":7}"#),
            OCI_MANIFEST
        );
        assert_eq!(manifest_media_type(None, b"not json"), OCI_MANIFEST);
    }

    #[test]
    fn index_types() {
        assert!(is_index(OCI_INDEX));
        assert!(is_index(DOCKER_MANIFEST_LIST));
        assert!(is_index("application/vnd.oci.image.index.v1+json; x=y"));
        assert!(!is_index(OCI_MANIFEST));
        assert!(!is_index(DOCKER_MANIFEST_V2));
        assert!(!is_index(""));
    }
}
