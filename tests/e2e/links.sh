#!/usr/bin/env bash
# End-to-end test: a manifest's content never grants access to cached
# digests (issue 10, item 1), with real registries.
#
#   private   Debian's docker-registry (distribution 2.8) with htpasswd auth
#             for private.registry.test, seeded with make_seed.py's small
#             image as team/secret:1 (alice's password)
#   public    a second docker-registry for public.registry.test, anonymous
#             pull and push (a registry anyone may push to, as a public
#             GitLab project or a Docker Hub account is for its owner)
#   proxy     regcache serve --intercept both, --resolve both to loopback
#   clients   skopeo (alice) and curl (anonymous) through the proxy,
#             trusting only regcache's CA; the registry names never resolve
#             for them
#
# The attack: alice pulls team/secret:1 through regcache; the attacker pushes
# (directly, with curl) to public.registry.test/attacker/pub an OCI manifest
# whose `subject` names the private manifest and whose `blobs` name the
# private config and layers (distribution 2.8 checks neither), pulls it once
# anonymously through regcache, then asks anonymously through regcache for
# the private digests in attacker/pub. The public registry answers 404 to
# those requests itself; regcache must answer the same, with no byte of the
# private image. (Within one real registry every repository is guarded by
# htpasswd, so the same-registry case is held by the integration tests with
# a Bearer realm: tests/it/auth.rs.)
#
# Usage:  tests/e2e/links.sh
# Environment: REGCACHE_BIN, REGCACHE_ARGS, E2E_KEEP=1 (as auth.sh).
# Prints PASS/FAIL per check and ends with "N passed, M failed"; the exit
# status is non-zero when anything failed.

# Functions called only through traps or wait_until look unreachable to it.
# shellcheck disable=SC2317
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PRIV=private.registry.test
PUB=public.registry.test
NAME=team/secret
EVIL_REPO=attacker/pub
ALICE=alice
ALICE_PW=alice-e2e-Pw-0815
OCI_MANIFEST=application/vnd.oci.image.manifest.v1+json

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

setup_workdir regcache-e2e-links
SUMMARY_LOGS=("$W/regcache.log" "$W/registry.log" "$W/pubregistry.log")
build_regcache

for host in "$PRIV" "$PUB"; do
    if getent hosts "$host" >/dev/null; then
        fail "$host resolves on this machine; the clients must reach it only through the proxy"
    fi
done

# ----------------------------------------------------------------- the seed
SEED=$W/seed
if capture make-seed 60 "$W/seed.env" python3 "$HERE/make_seed.py" "$SEED"; then
    # shellcheck disable=SC1091
    . "$W/seed.env"
else
    fail "make_seed.py"
    show_last
    summary
fi
# "digest size" of the small image's config and layers, one per line.
python3 - "$SEED" "$SMALL_DIGEST" >"$W/private-blobs" <<'PY'
import json, os, sys
seed, top = sys.argv[1:3]
m = json.load(open(os.path.join(seed, "blobs", *top.split(":", 1))))
for d in [m["config"]] + m["layers"]:
    print(d["digest"], d["size"])
PY
SMALL_BLOBS=$(cut -d' ' -f1 <"$W/private-blobs" | tr '\n' ' ')
SMALL_SIZE=$(wc -c <"$SEED/blobs/sha256/${SMALL_DIGEST#sha256:}")
note "team/secret:1 is $SMALL_DIGEST with blobs $SMALL_BLOBS"

# ---------------------------------------------------------------- test PKI
PKI=$W/pki
if make_pki "$PKI" "$PRIV" "DNS:$PRIV,DNS:$PUB" "regcache e2e links test CA"; then
    pass "test CA and a server certificate for $PRIV and $PUB"
else
    fail "openssl could not create the test PKI"
    show_last
    summary
fi

# ------------------------------------------------------ the two registries
REGPORT=$(free_port)
mkdir -p "$W/registry"
if ! run htpasswd 30 sh -c "htpasswd -Bbn '$ALICE' '$ALICE_PW' >'$W/registry/htpasswd'"; then
    fail "htpasswd -Bbn"
    show_last
    summary
fi
start_registry "$W/registry" "127.0.0.1:$REGPORT" "$PKI" "auth:
  htpasswd:
    realm: regcache-e2e-links
    path: $W/registry/htpasswd"

PUBPORT=$(free_port)
mkdir -p "$W/pubregistry/data"
cat >"$W/pubregistry/config.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $W/pubregistry/data
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$PUBPORT
  secret: regcache-e2e-not-a-secret
  tls:
    certificate: $PKI/server.pem
    key: $PKI/server.key
EOF
start_bg pubregistry "$W/pubregistry.log" docker-registry serve "$W/pubregistry/config.yml"

direct_priv() { curl --noproxy '*' -sS --max-time 10 --cacert "$PKI/ca.pem" --resolve "$PRIV:$REGPORT:127.0.0.1" "$@"; }
direct_pub() { curl --noproxy '*' -sS --max-time 10 --cacert "$PKI/ca.pem" --resolve "$PUB:$PUBPORT:127.0.0.1" "$@"; }
priv_up() { direct_priv -f -u "$ALICE:$ALICE_PW" "https://$PRIV:$REGPORT/v2/"; }
pub_up() { direct_pub -f "https://$PUB:$PUBPORT/v2/"; }
if wait_until 30 "${PID_OF[registry]}" priv_up && wait_until 30 "${PID_OF[pubregistry]}" pub_up; then
    pass "both registries serve TLS: $PRIV (htpasswd) on :$REGPORT, $PUB (anonymous) on :$PUBPORT"
else
    fail "the registries did not come up"
    summary
fi

if run seed 120 "${SKOPEO_DIRECT[@]}" copy --preserve-digests --dest-tls-verify=false \
    --dest-creds "$ALICE:$ALICE_PW" "oci:$SEED:$SMALL_REF" "docker://127.0.0.1:$REGPORT/$NAME:1"; then
    pass "$PRIV seeded with $NAME:1"
else
    fail "seeding $NAME:1"
    show_last
    summary
fi

# ------------------------------------------------------------------- proxy
PROXYPORT=$(free_port)
PROXY=http://127.0.0.1:$PROXYPORT
mkdir -p "$W/regcache/certs"
serve_args=(--listen "127.0.0.1:$PROXYPORT" --ca-dir "$W/regcache/certs" --cache-dir "$W/regcache/cache"
    --upstream-ca "$PKI/ca.pem" --intercept "$PRIV" --intercept "$PUB"
    --resolve "$PRIV=127.0.0.1:$REGPORT" --resolve "$PUB=127.0.0.1:$PUBPORT")
# shellcheck disable=SC2206
serve_args+=(${REGCACHE_ARGS:-})
note "starting regcache: $REGCACHE_BIN serve ${serve_args[*]}"
start_bg regcache "$W/regcache.log" env -C "$W/regcache" HOME="$W/regcache" \
    "$REGCACHE_BIN" serve "${serve_args[@]}"
if wait_until 30 "${PID_OF[regcache]}" proxy_up; then
    pass "regcache answers /healthz"
else
    fail "regcache did not answer /healthz within 30s"
    summary
fi
CLIENT_CA=$W/client-certs/ca.crt
if ! curl -fsS --noproxy '*' --max-time 10 -o "$CLIENT_CA" "$PROXY/ca.crt"; then
    fail "GET /ca.crt"
    summary
fi
set_client_env
SKOPEO=("${CLIENT_ENV[@]}" skopeo --policy "$W/policy.json")
through() { curl -sS --max-time 20 --proxy "$PROXY" --cacert "$CLIENT_CA" "$@"; }

# ------------------------------------------- alice pulls the private image
if run skopeo-alice 120 "${SKOPEO[@]}" copy --src-cert-dir "$W/client-certs" \
    --src-creds "$ALICE:$ALICE_PW" "docker://$PRIV/$NAME:1" "oci:$W/out/alice:x"; then
    check_digest "alice pulls $PRIV/$NAME:1 through regcache (now cached)" "$SMALL_DIGEST" \
        "$(layout_digest "$W/out/alice")"
else
    fail "alice's pull of $PRIV/$NAME:1 through regcache"
    show_last
fi

# ---------------------------------- the attacker pushes a hostile manifest
# push_blob FILE: uploads FILE to $PUB/$EVIL_REPO (monolithic), prints its digest.
push_blob() {
    local file=$1 digest location
    digest=$(sha256_of <"$file")
    location=$(direct_pub -f -X POST -D - -o /dev/null "https://$PUB:$PUBPORT/v2/$EVIL_REPO/blobs/uploads/" |
        tr -d '\r' | sed -n 's/^[Ll]ocation: *//p')
    [ -n "$location" ] || return 1
    case $location in http*) ;; *) location=https://$PUB:$PUBPORT$location ;; esac
    case $location in *\?*) location="$location&digest=$digest" ;; *) location="$location?digest=$digest" ;; esac
    direct_pub -f -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$file" \
        -o /dev/null "$location" || return 1
    echo "$digest"
}
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' >"$W/tmp/evil-config"
head -c 2048 /dev/urandom >"$W/tmp/evil-layer"
EVIL_CONFIG=$(push_blob "$W/tmp/evil-config")
EVIL_LAYER=$(push_blob "$W/tmp/evil-layer")
python3 - "$EVIL_CONFIG" "$(wc -c <"$W/tmp/evil-config")" "$EVIL_LAYER" "$(wc -c <"$W/tmp/evil-layer")" \
    "$SMALL_DIGEST" "$SMALL_SIZE" "$W/private-blobs" >"$W/tmp/evil-manifest" <<'PY'
import json, sys
cfg, cfg_size, layer, layer_size, subject, subject_size, private = sys.argv[1:8]
blobs = [l.split() for l in open(private) if l.strip()]
print(json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": int(cfg_size)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": int(layer_size)}],
    "blobs": [{"mediaType": "application/octet-stream", "digest": d, "size": int(s)} for d, s in blobs],
    "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": subject, "size": int(subject_size)},
}, separators=(",", ":")), end="")
PY
EVIL_DIGEST=$(sha256_of <"$W/tmp/evil-manifest")
code=$(direct_pub -o "$W/tmp/put" -w '%{http_code}' -X PUT -H "Content-Type: $OCI_MANIFEST" \
    --data-binary "@$W/tmp/evil-manifest" "https://$PUB:$PUBPORT/v2/$EVIL_REPO/manifests/evil")
if [ "$code" = 201 ] && [ -n "$EVIL_CONFIG" ] && [ -n "$EVIL_LAYER" ]; then
    pass "$PUB accepts the attacker's manifest $EVIL_DIGEST naming the private digests in subject and blobs"
else
    fail "pushing the attacker's manifest to $PUB: $code $(head -c 200 "$W/tmp/put")"
    summary
fi
# The registry's own answer for the private digests in attacker/pub.
bad=""
for d in $SMALL_DIGEST $SMALL_BLOBS; do
    kind=blobs
    [ "$d" = "$SMALL_DIGEST" ] && kind=manifests
    code=$(direct_pub -o /dev/null -w '%{http_code}' -H "Accept: $OCI_MANIFEST" \
        "https://$PUB:$PUBPORT/v2/$EVIL_REPO/$kind/$d")
    [ "$code" = 404 ] || bad="$bad $kind/${d:7:12}=$code"
done
if [ -z "$bad" ]; then
    pass "$PUB itself answers 404 for every private digest in $EVIL_REPO"
else
    fail "$PUB should not have the private digests:$bad"
fi

# ---------------------------------- the attack, anonymously through regcache
code=$(through -o "$W/tmp/evil-got" -w '%{http_code}' -H "Accept: $OCI_MANIFEST" \
    "https://$PUB/v2/$EVIL_REPO/manifests/evil")
if [ "$code" = 200 ] && [ "$(sha256_of <"$W/tmp/evil-got")" = "$EVIL_DIGEST" ]; then
    pass "anonymous GET of $PUB/$EVIL_REPO:evil through regcache (the manifest is now cached)"
else
    fail "anonymous GET of $PUB/$EVIL_REPO:evil through regcache: $code"
fi
rc_mark=$(mark "$W/regcache.log")
bad=""
for round in 1 2; do
    for d in $SMALL_DIGEST $SMALL_BLOBS; do
        kind=blobs
        [ "$d" = "$SMALL_DIGEST" ] && kind=manifests
        url=https://$PUB/v2/$EVIL_REPO/$kind/$d
        : >"$W/tmp/x"
        code=$(through -o "$W/tmp/x" -w '%{http_code}' -H "Accept: $OCI_MANIFEST" "$url")
        [ "$code" = 404 ] || bad="$bad GET:$kind/${d:7:12}=$code"
        [ "$(sha256_of <"$W/tmp/x")" = "$d" ] && bad="$bad GET:$kind/${d:7:12}:PRIVATE-CONTENT"
        code=$(through -I -o /dev/null -w '%{http_code}' -H "Accept: $OCI_MANIFEST" "$url")
        [ "$code" = 404 ] || bad="$bad HEAD:$kind/${d:7:12}=$code"
    done
done
if [ -z "$bad" ]; then
    pass "anonymous GET and HEAD of every private digest through $PUB/$EVIL_REPO: 404 (the registry's answer), no content, twice"
else
    fail "private digests through $PUB/$EVIL_REPO:$bad"
fi
if since "$W/regcache.log" "$rc_mark" | grep 'link: cached only through another registry' >/dev/null; then
    pass "regcache's log names the rule: a digest cached through another registry is asked upstream"
else
    fail "no log line naming the link rule"
fi

# alice still gets her image (from the cache), the attacker's requests changed nothing.
if run skopeo-alice-2 120 "${SKOPEO[@]}" copy --src-cert-dir "$W/client-certs" \
    --src-creds "$ALICE:$ALICE_PW" "docker://$PRIV/$NAME:1" "oci:$W/out/alice-2:x"; then
    check_digest "alice pulls $PRIV/$NAME:1 again" "$SMALL_DIGEST" "$(layout_digest "$W/out/alice-2")"
else
    fail "alice's second pull"
    show_last
fi
if grep -hE 'panicked at|stack backtrace' "$W/regcache.log" >"$W/tmp/panics"; then
    fail "regcache logged a panic"
    head -n 5 "$W/tmp/panics" | indent
else
    pass "no panic in the regcache log"
fi

summary
