//! Signatures and other artifacts through the cache: the OCI 1.1 referrers
//! API (cached as a tag, filtered by `artifactType` here), the tag schema
//! cosign writes (`sha256-<hex>.sig`) and non-image artifacts, served from
//! the cache while the upstream is stopped and only to clients the registry
//! would let see them.

use bytes::Bytes;
use hyper::{Method, StatusCode};
use regcache::registry::media::{OCI_INDEX, OCI_MANIFEST};

use crate::support::http::{read_response, Got};
use crate::support::pattern::blob_bytes;
use crate::support::proxy::{Env, Proxy};
use crate::support::registry::{blob_path, manifest_path, sha256, ACCEPT_ALL, HUB, TEAM_CRED};
use crate::support::tls::Alpn;

async fn get(proxy: &Proxy, path: &str, credential: Option<&str>) -> Got {
    let mut client = proxy.intercepted(HUB, Alpn::Both).await;
    let mut headers = vec![("accept", ACCEPT_ALL)];
    if let Some(c) = credential {
        headers.push(("authorization", c));
    }
    let req = client.request(Method::GET, path, &headers);
    read_response(client.send(req).await).await
}

const SIG_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
const SBOM_TYPE: &str = "application/spdx+json";

/// A subject image in `repo` and two artifacts about it (a signature and
/// an SBOM, OCI 1.1 style with `subject` and `artifactType`), pushed with
/// the referrers list the registry would answer and the cosign tag-schema
/// signature `sha256-<hex>.sig`. Returns (subject digest, list, sig tag
/// manifest, sig layer digest and bytes).
fn put_signed_image(env: &Env, repo: &str) -> (String, Bytes, Bytes, String, Bytes) {
    let config = blob_bytes(1, 100);
    let layer = blob_bytes(2, 2000);
    let m = crate::support::registry::oci_manifest(&config, &[&layer]);
    env.reg.put_blob(repo, config);
    env.reg.put_blob(repo, layer);
    let subject = env
        .reg
        .put_manifest(repo, Some("1"), OCI_MANIFEST, m.clone());
    let empty = Bytes::from_static(b"{}");
    let empty_d = env.reg.put_blob(repo, empty.clone());
    let mut descriptors = Vec::new();
    for (artifact_type, payload) in [(SIG_TYPE, &b"signature"[..]), (SBOM_TYPE, &b"sbom"[..])] {
        let payload_d = env.reg.put_blob(repo, Bytes::copy_from_slice(payload));
        let artifact = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty_d, "size": 2},
            "layers": [{"mediaType": artifact_type, "digest": payload_d, "size": payload.len()}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": m.len()}
        })
        .to_string();
        let d = env
            .reg
            .put_manifest(repo, None, OCI_MANIFEST, Bytes::from(artifact.clone()));
        descriptors.push(serde_json::json!({
            "mediaType": OCI_MANIFEST, "digest": d, "size": artifact.len(), "artifactType": artifact_type
        }));
    }
    let list = Bytes::from(
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors})
            .to_string(),
    );
    env.reg.put_raw(
        &format!("/v2/{repo}/referrers/{subject}"),
        OCI_INDEX,
        list.clone(),
    );
    // cosign's tag schema: an image manifest whose layer is the signed payload.
    let sig_layer =
        Bytes::from_static(b"{\"critical\":{\"type\":\"cosign container image signature\"}}");
    let sig_layer_d = env.reg.put_blob(repo, sig_layer.clone());
    let sig_config = blob_bytes(3, 50);
    let sig_config_d = env.reg.put_blob(repo, sig_config.clone());
    let sig = Bytes::from(
        serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sig_config_d, "size": sig_config.len()},
            "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": sig_layer_d,
                "size": sig_layer.len(), "annotations": {"dev.cosignproject.cosign/signature": "MEUCIQ…"}}]
        })
        .to_string(),
    );
    let sig_tag = format!("{}.sig", subject.replace(':', "-"));
    env.reg
        .put_manifest(repo, Some(&sig_tag), OCI_MANIFEST, sig.clone());
    (subject, list, sig, sig_layer_d, sig_layer)
}

fn descriptors(got: &Got) -> Vec<String> {
    let doc: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    doc["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["artifactType"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn referrers_and_cosign_signatures_are_cached_filtered_and_served_with_the_upstream_stopped()
{
    let env = Env::new().await;
    let repo = "org/tool";
    let (subject, list, sig, sig_layer_d, sig_layer) = put_signed_image(&env, repo);
    let proxy = env.proxy().start().await;
    let referrers = format!("/v2/{repo}/referrers/{subject}");
    let sig_tag = manifest_path(repo, &format!("{}.sig", subject.replace(':', "-")));
    let sig_blob = blob_path(repo, &sig_layer_d);

    // Cold: from upstream, whole.
    let got = get(&proxy, &referrers, None).await;
    got.assert_served(&list, "MISS", "referrers, cold");
    assert_eq!(got.header("content-type").as_deref(), Some(OCI_INDEX));
    get(&proxy, &sig_tag, None)
        .await
        .assert_served(&sig, "MISS", "cosign .sig tag, cold");
    get(&proxy, &sig_blob, None).await.assert_served(
        &sig_layer,
        "MISS",
        "the signature payload, cold",
    );
    env.stored(&sha256(&sig)).await;
    env.stored(&sig_layer_d).await;

    // A filter is answered from the cached whole list.
    let got = get(
        &proxy,
        &format!("{referrers}?artifactType={SBOM_TYPE}"),
        None,
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.brief());
    assert_eq!(got.x_cache(), "HIT");
    assert_eq!(descriptors(&got), [SBOM_TYPE], "{}", got.text());
    assert_eq!(
        got.header("oci-filters-applied").as_deref(),
        Some("artifactType")
    );
    let asked: Vec<_> = env
        .reg
        .seen()
        .iter()
        .filter(|r| r.path == referrers)
        .map(|r| (r.method.to_string(), r.query.clone()))
        .collect();
    assert_eq!(
        asked,
        [("GET".to_string(), None)],
        "one unfiltered GET upstream"
    );

    // Upstream stopped: everything cosign needs is still served.
    env.reg.stop().await;
    get(&proxy, &referrers, None)
        .await
        .assert_served(&list, "HIT", "referrers, upstream stopped");
    let got = get(
        &proxy,
        &format!("{referrers}?artifactType={SIG_TYPE}"),
        None,
    )
    .await;
    assert_eq!(descriptors(&got), [SIG_TYPE]);
    get(&proxy, &sig_tag, None).await.assert_served(
        &sig,
        "HIT",
        "cosign .sig tag, upstream stopped",
    );
    get(&proxy, &sig_blob, None).await.assert_served(
        &sig_layer,
        "HIT",
        "signature payload, upstream stopped",
    );
}

#[tokio::test]
async fn a_private_repositorys_signatures_reach_only_clients_the_registry_accepts() {
    let env = Env::new().await;
    let repo = "team/app";
    let (subject, list, sig, _, _) = put_signed_image(&env, repo);
    env.reg.guard_team();
    let proxy = env.proxy().start().await;
    let referrers = format!("/v2/{repo}/referrers/{subject}");
    let sig_tag = manifest_path(repo, &format!("{}.sig", subject.replace(':', "-")));

    // The team member fills the cache.
    get(&proxy, &referrers, Some(TEAM_CRED))
        .await
        .assert_served(&list, "MISS", "referrers for the team");
    get(&proxy, &sig_tag, Some(TEAM_CRED))
        .await
        .assert_served(&sig, "MISS", ".sig for the team");

    // An anonymous client gets what the registry gives it: 401.
    for path in [&referrers, &sig_tag] {
        let got = get(&proxy, path, None).await;
        assert_eq!(
            got.status,
            StatusCode::UNAUTHORIZED,
            "{path}: {}",
            got.brief()
        );
        assert!(!crate::support::http::contains(&got.body, &list), "{path}");
        assert!(!crate::support::http::contains(&got.body, &sig), "{path}");
        assert!(
            got.header("www-authenticate").is_some(),
            "{path}: the challenge is passed on"
        );
    }
    // The member again: from the cache.
    get(&proxy, &referrers, Some(TEAM_CRED))
        .await
        .assert_served(&list, "HIT", "referrers for the team, cached");
}

#[tokio::test]
async fn a_registry_without_the_referrers_api_is_passed_through_and_nothing_is_cached() {
    let env = Env::new().await;
    let subject = sha256(b"no such image");
    let proxy = env.proxy().start().await;
    let path = format!("/v2/org/tool/referrers/{subject}");
    for _ in 0..2 {
        let got = get(&proxy, &path, None).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{}", got.brief());
    }
    assert_eq!(
        env.reg.count(Method::GET, &path),
        2,
        "a 404 is never cached"
    );
}

#[tokio::test]
async fn a_helm_chart_and_other_artifacts_are_cached_like_images() {
    let env = Env::new().await;
    let repo = "charts/web";
    let config =
        Bytes::from_static(b"{\"name\":\"web\",\"version\":\"1.2.3\",\"apiVersion\":\"v2\"}");
    let chart = blob_bytes(7, 4000);
    let config_d = env.reg.put_blob(repo, config.clone());
    let chart_d = env.reg.put_blob(repo, chart.clone());
    let m = Bytes::from(
        serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": config_d, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.cncf.helm.chart.content.v1.tar+gzip", "digest": chart_d, "size": chart.len()}]
        })
        .to_string(),
    );
    env.reg
        .put_manifest(repo, Some("1.2.3"), OCI_MANIFEST, m.clone());
    let proxy = env.proxy().start().await;
    let tag = manifest_path(repo, "1.2.3");
    let layer = blob_path(repo, &chart_d);
    get(&proxy, &tag, None)
        .await
        .assert_served(&m, "MISS", "chart manifest");
    get(&proxy, &layer, None)
        .await
        .assert_served(&chart, "MISS", "chart");
    env.stored(&chart_d).await;
    env.reg.stop().await;
    let got = get(&proxy, &tag, None).await;
    assert_eq!(got.body, m);
    assert!(
        matches!(got.x_cache().as_str(), "HIT" | "STALE"),
        "{}",
        got.brief()
    );
    get(&proxy, &layer, None)
        .await
        .assert_served(&chart, "HIT", "chart, upstream stopped");
}

#[tokio::test]
async fn a_stale_referrers_list_is_served_with_a_warning_when_the_upstream_is_down() {
    let env = Env::new().await;
    let repo = "org/tool";
    let (subject, list, _, _, _) = put_signed_image(&env, repo);
    let proxy = env.proxy().args(["--tag-ttl", "0"]).start().await;
    let referrers = format!("/v2/{repo}/referrers/{subject}");
    get(&proxy, &referrers, None)
        .await
        .assert_served(&list, "MISS", "cold");
    env.reg.stop().await;
    let got = get(&proxy, &referrers, None).await;
    got.assert_served(&list, "STALE", "tag_ttl 0, upstream stopped");
    assert!(got.header("warning").is_some_and(|w| w.starts_with("110")));
}
