//! The one walk over what a manifest is made of.
//!
//! A manifest names its parts by descriptor: an index (or Docker manifest
//! list) its child `manifests`; an image manifest its `config` and
//! `layers`; an OCI artifact manifest its `blobs`; a Docker schema-1
//! manifest its `fsLayers[].blobSum`. [`children`] lists them, typed, for
//! everything that follows a manifest down to its blobs: prefetch, bundle
//! export and bundle import.
//!
//! **The rule for `subject` and referrers.** A manifest's `subject` names
//! the manifest it is *about* (a signature's image), and referrers are
//! found through the registry's referrers API, not in the body. Both are
//! pointers to other images, never parts of this one, so neither is a
//! child: a walk does not follow them, and nothing reached by a walk is
//! linked because a manifest named it (a manifest's content never grants
//! access; see [`crate::registry::link`]).
//!
//! Everything here reads untrusted bytes and never panics: a body that is
//! not a JSON object has no children, and a descriptor whose digest does not
//! parse is left out.

use serde_json::Value;

use super::digest::Digest;

/// What a child is to the manifest that names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildKind {
    /// An entry of an index's `manifests`: a manifest itself.
    Manifest,
    /// The image's `config`.
    Config,
    /// An entry of `layers`, or of a schema-1 manifest's `fsLayers`.
    Layer,
    /// An entry of an OCI artifact manifest's `blobs`.
    Blob,
}

/// One part of a manifest, as its descriptor names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    /// Its digest.
    pub digest: Digest,
    /// Its size, if the descriptor says (schema 1 does not).
    pub size: Option<u64>,
    /// Its media type as the descriptor gives it (empty if it does not).
    pub media_type: String,
    /// What it is to the manifest.
    pub kind: ChildKind,
}

impl Child {
    /// Whether the child is a manifest (walked further) rather than a blob.
    pub fn is_manifest(&self) -> bool {
        self.kind == ChildKind::Manifest
    }
}

/// What a manifest is made of, in this order without repeats (the first
/// mention of a digest counts): the child `manifests` of an index, then
/// `config`, `layers`, `blobs` and `fsLayers`. `subject` is not a child
/// (see the module documentation). Descriptors whose digest does not parse
/// are left out; a body that is not a JSON object gives an empty list.
pub fn children(body: &[u8]) -> Vec<Child> {
    let Ok(Value::Object(doc)) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let list = |key: &str| doc.get(key).and_then(Value::as_array).into_iter().flatten();
    let descriptors = list("manifests")
        .map(|d| (d, "digest", ChildKind::Manifest))
        .chain(doc.get("config").map(|d| (d, "digest", ChildKind::Config)))
        .chain(list("layers").map(|d| (d, "digest", ChildKind::Layer)))
        .chain(list("blobs").map(|d| (d, "digest", ChildKind::Blob)))
        .chain(list("fsLayers").map(|d| (d, "blobSum", ChildKind::Layer)));
    let mut out: Vec<Child> = Vec::new();
    for (desc, key, kind) in descriptors {
        let Some(digest) = desc
            .get(key)
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<Digest>().ok())
        else {
            continue;
        };
        if out.iter().any(|c| c.digest == digest) {
            continue;
        }
        out.push(Child {
            digest,
            size: desc.get("size").and_then(Value::as_u64),
            media_type: desc
                .get("mediaType")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            kind,
        });
    }
    out
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use ChildKind::{Blob, Config, Layer, Manifest};

    /// An OCI image manifest with a subject and one bad layer digest (also
    /// used by the media type tests).
    pub(in crate::registry) const OCI_IMAGE: &str = r#"{
      "schemaVersion": 2,
      "mediaType": "application/vnd.oci.image.manifest.v1+json",
      "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7",
        "size": 7023
      },
      "layers": [
        {
          "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
          "digest": "sha256:9834876dcfb05cb167a5c24953eba58c4ac89b1adf57f28f2f9d09af107ee8f0",
          "size": 32654
        },
        {
          "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
          "digest": "sha256:3c3a4604a545cdc127456d94e421cd355bca5b528f4a9c1905b15da2eb4a4c6b",
          "size": 16724
        },
        {
          "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
          "digest": "SHA256:NOT-A-DIGEST",
          "size": 1
        }
      ],
      "subject": {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:5b0bcabd1ed22e9fb1310cf6c2dec7cdef19f0ad69efa1f392e94a4333501270",
        "size": 7682
      },
      "annotations": { "com.example.key1": "value1" }
    }"#;

    /// A Docker manifest list naming one manifest twice.
    pub(in crate::registry) const DOCKER_LIST: &str = r#"{
      "schemaVersion": 2,
      "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
      "manifests": [
        {
          "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
          "digest": "sha256:e692418e4cbaf90ca69d05a66403747baa33ee08806650b51fab815ad7fc331f",
          "size": 7143,
          "platform": { "architecture": "ppc64le", "os": "linux" }
        },
        {
          "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
          "digest": "sha256:5b0bcabd1ed22e9fb1310cf6c2dec7cdef19f0ad69efa1f392e94a4333501270",
          "size": 7682,
          "platform": { "architecture": "amd64", "os": "linux", "features": ["sse4"] }
        },
        {
          "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
          "digest": "sha256:e692418e4cbaf90ca69d05a66403747baa33ee08806650b51fab815ad7fc331f",
          "size": 7143
        }
      ]
    }"#;

    /// A child as the tests compare it: (first 8 hex digits, size, kind).
    type Row = (String, Option<u64>, ChildKind);
    /// A child as the table writes it.
    type WantRow<'a> = (&'a str, Option<u64>, ChildKind);

    fn summary(body: &[u8]) -> Vec<Row> {
        children(body)
            .iter()
            .map(|c| (c.digest.hex()[..8].to_string(), c.size, c.kind))
            .collect()
    }

    fn rows(want: &[WantRow<'_>]) -> Vec<Row> {
        want.iter()
            .map(|(hex, size, kind)| (hex.to_string(), *size, *kind))
            .collect()
    }

    #[test]
    fn children_of_each_kind_of_manifest() {
        let (a, b, c, s) = (
            Digest::of(b"a"),
            Digest::of(b"b"),
            Digest::of(b"c"),
            Digest::of(b"subject"),
        );
        let hex = |d: &Digest| d.hex()[..8].to_string();
        let index_with_subject = serde_json::json!({
            "manifests": [
                {"mediaType": "m", "digest": a.to_string(), "size": 3},
                {"digest": "sha256:bogus", "size": 1},
                {"digest": a.to_string(), "size": 3},
            ],
            "subject": {"digest": s.to_string(), "size": 1},
        })
        .to_string();
        let schema1 = format!(r#"{{"schemaVersion":1,"fsLayers":[{{"blobSum":"{a}"}}]}}"#);
        let artifact = format!(
            r#"{{"blobs":[{{"digest":"{a}","size":1}}, 7, null],"subject":{{"digest":"{s}"}}}}"#
        );
        let image = serde_json::json!({
            "config": {"digest": a.to_string(), "size": 1},
            "layers": [{"digest": b.to_string(), "size": 2}],
            "fsLayers": [{"blobSum": c.to_string()}],
        })
        .to_string();
        let everything = serde_json::json!({
            "config": {"digest": a.to_string(), "size": 1},
            "layers": [{"digest": b.to_string(), "size": 2}, {"digest": a.to_string()}],
            "manifests": [{"digest": c.to_string(), "size": 9}],
            "blobs": [{"digest": b.to_string(), "size": 2}],
            "fsLayers": [{"blobSum": s.to_string()}],
        })
        .to_string();
        let (ha, hb, hc, hs) = (hex(&a), hex(&b), hex(&c), hex(&s));
        let cases: Vec<(&str, &[u8], Vec<WantRow<'_>>)> = vec![
            (
                "OCI image: config, then layers; a bad digest and subject left out",
                OCI_IMAGE.as_bytes(),
                vec![
                    ("b5b2b2c5", Some(7023), Config),
                    ("9834876d", Some(32654), Layer),
                    ("3c3a4604", Some(16724), Layer),
                ],
            ),
            (
                "Docker manifest list, without repeats",
                DOCKER_LIST.as_bytes(),
                vec![
                    ("e692418e", Some(7143), Manifest),
                    ("5b0bcabd", Some(7682), Manifest),
                ],
            ),
            (
                "OCI index with a subject",
                index_with_subject.as_bytes(),
                vec![(&ha, Some(3), Manifest)],
            ),
            (
                "image: config, layers, then schema-1 layers",
                image.as_bytes(),
                vec![
                    (&ha, Some(1), Config),
                    (&hb, Some(2), Layer),
                    (&hc, None, Layer),
                ],
            ),
            ("schema 1", schema1.as_bytes(), vec![(&ha, None, Layer)]),
            (
                "artifact with blobs and a subject",
                artifact.as_bytes(),
                vec![(&ha, Some(1), Blob)],
            ),
            (
                "every key: manifests first, the first mention of a digest counts",
                everything.as_bytes(),
                vec![
                    (&hc, Some(9), Manifest),
                    (&ha, Some(1), Config),
                    (&hb, Some(2), Layer),
                    (&hs, None, Layer),
                ],
            ),
        ];
        for (what, body, want) in cases {
            assert_eq!(summary(body), rows(&want), "{what}");
        }
        let got = children(index_with_subject.as_bytes());
        assert_eq!(got[0].media_type, "m");
        assert!(got[0].is_manifest());
        assert!(children(OCI_IMAGE.as_bytes())
            .iter()
            .all(|c| !c.is_manifest() && c.media_type.starts_with("application/vnd.oci.image.")));
        // `subject` is never a child, whatever the manifest.
        for body in [OCI_IMAGE, &index_with_subject, &artifact] {
            assert!(
                children(body.as_bytes())
                    .iter()
                    .all(|c| !c.digest.hex().starts_with("5b0bcabd") && c.digest != s),
                "{body}"
            );
        }
    }

    #[test]
    fn garbage_has_no_children() {
        let deep = "[".repeat(100_000);
        for body in [
            &b""[..],
            b"not json",
            b"null",
            b"[1,2,3]",
            b"\"sha256:e3b0\"",
            b"{\"layers\": 5, \"config\": [], \"manifests\": {\"digest\": 1}}",
            b"{\"config\": {\"digest\": 42}}",
            b"{\"subject\": {\"digest\": \"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\"}}",
            b"\xff\xfe{",
            b"{\"layers\":[",
            deep.as_bytes(),
        ] {
            assert!(children(body).is_empty(), "{body:?}");
        }
    }
}
