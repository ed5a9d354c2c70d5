#!/usr/bin/env bash
# End-to-end test of registry origins (issue 10, items 2 and 3): the scheme is
# part of a registry's identity, plain-http registries are opt-in, and no way
# into regcache reaches another port or an internal service.
#
#   upstreams two Debian docker-registry (distribution 2.8) instances on one
#             loopback address, as a registry name and whoever answers plain
#             HTTP on its address would be: TLS on 127.0.0.80:443 (a
#             throw-away test CA, certificate for registry-1.docker.io)
#             holding e2e-small:1, and plain HTTP on 127.0.0.80:80 holding a
#             different image (the multi-platform index) under the same
#             name and tag, library/e2e-small:1
#   proxy     regcache serve --resolve registry-1.docker.io=127.0.0.80
#             --upstream-ca <test CA>; later again with
#             --insecure-registry registry-1.docker.io:80, same cache
#   clients   curl (absolute-form with -x, and the mirror form), skopeo
#             through HTTPS_PROXY/HTTP_PROXY
#
# Checks:
#   1. absolute-form GET http://registry-1.docker.io/v2/…/manifests/1 through
#      the proxy answers 403 naming insecure_registries, regcache logs the
#      rule, and the plain registry sees no request
#   2. skopeo through HTTPS_PROXY and the mirror form still get the real
#      (TLS) image for e2e-small:1
#   3. http://127.0.0.80:8080/ (absolute-form, a port CONNECT refuses) and
#      ?ns=registry-1.docker.io:5000 (mirror) answer 403
#   4. with --insecure-registry registry-1.docker.io:80: skopeo
#      (--tls-verify=false, through HTTP_PROXY) pulls
#      registry-1.docker.io:80/library/e2e-small:1 over plain HTTP and gets
#      the plain registry's image; a manifest asked again with curl is an
#      X-Cache HIT
#   5. the HTTPS registry of the same name shares none of it: skopeo through
#      HTTPS_PROXY and the mirror still get the TLS image, and a manifest of
#      the plain image is not served through the HTTPS registry (404)
#
# registry-1.docker.io never resolves for the clients; regcache maps it.
# Needs root (ports 80 and 443 on 127.0.0.80).
#
# Usage:  tests/e2e/origins.sh
# Environment:
#   REGCACHE_BIN   regcache binary (default: <repo>/target/debug/regcache,
#                  built with `cargo build` when REGCACHE_BIN is unset)
#   E2E_KEEP=1     keep the work directory (its path is printed)
#
# Prints PASS/FAIL per check and ends with the line "N passed, M failed";
# the exit status is non-zero when anything failed.

# Functions called only through wait_until look unreachable to it.
# shellcheck disable=SC2317
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HUB=registry-1.docker.io
ADDR=127.0.0.80

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

setup_workdir regcache-e2e-origins
SUMMARY_LOGS=("$W/regcache.log" "$W/regcache-insecure.log" "$W/registry.log" "$W/registry-plain.log")
build_regcache

if getent hosts "$HUB" >/dev/null; then
    fail "$HUB resolves on this machine; the clients must reach it only through regcache"
fi
if [ "$(id -u)" -ne 0 ]; then
    skip "not root: cannot bind ports 80 and 443 on $ADDR"
    summary
fi
for port in 80 443; do
    if curl -s --noproxy '*' --max-time 2 -o /dev/null "http://$ADDR:$port/"; then
        fail "something already listens on $ADDR:$port"
        summary
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

PKI=$W/pki
if ! make_pki "$PKI" "$HUB" "DNS:$HUB,IP:$ADDR"; then
    fail "openssl could not create the test PKI"
    show_last
    summary
fi

# ------------------------------------------------------------- upstreams
start_registry "$W/registry" "$ADDR:443" "$PKI"
mkdir -p "$W/registry-plain/data"
cat >"$W/registry-plain/config.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $W/registry-plain/data
http:
  addr: $ADDR:80
  secret: regcache-e2e-not-a-secret
EOF
start_bg registry-plain "$W/registry-plain.log" docker-registry serve "$W/registry-plain/config.yml"
tls_up() { curl -fsS --noproxy '*' --max-time 3 --cacert "$PKI/ca.pem" "https://$ADDR/v2/"; }
plain_up() { curl -fsS --noproxy '*' --max-time 3 "http://$ADDR/v2/"; }
if wait_until 30 "${PID_OF[registry]}" tls_up && wait_until 30 "${PID_OF[registry-plain]}" plain_up; then
    pass "docker-registry serves TLS on $ADDR:443 and plain HTTP on $ADDR:80"
else
    fail "the docker-registry instances did not come up"
    summary
fi

seed() { # seed NAME ADDR:PORT REF DIGEST
    if run "seed-$1" 120 "${SKOPEO_DIRECT[@]}" copy --all --preserve-digests --dest-tls-verify=false \
        "oci:$SEED:$3" "docker://$2/library/e2e-small:1" &&
        capture "seed-check-$1" 30 "$W/tmp/raw" "${SKOPEO_DIRECT[@]}" inspect --raw --tls-verify=false \
            "docker://$2/library/e2e-small:1" &&
        [ "$(sha256_of <"$W/tmp/raw")" = "$4" ]; then
        pass "$1 registry seeded with library/e2e-small:1 ($4)"
    else
        fail "seeding the $1 registry"
        show_last
        summary
    fi
}
seed tls "$ADDR:443" "$SMALL_REF" "$SMALL_DIGEST"
seed plain "$ADDR:80" "$MULTI_REF" "$MULTI_DIGEST"

# ---------------------------------------------------------------- regcache
PROXYPORT=$(free_port)
PROXY=http://127.0.0.1:$PROXYPORT
mkdir -p "$W/regcache/certs"
serve_args=(--listen "127.0.0.1:$PROXYPORT" --ca-dir "$W/regcache/certs" --cache-dir "$W/regcache/cache"
    --upstream-ca "$PKI/ca.pem" --resolve "$HUB=$ADDR")
start_regcache() { # start_regcache NAME LOG ARGS...
    local name=$1 logf=$2
    shift 2
    start_bg "$name" "$logf" env -C "$W/regcache" HOME="$W/regcache" RUST_LOG="${RUST_LOG:-info}" \
        "$REGCACHE_BIN" serve "$@"
    if ! wait_until 30 "${PID_OF[$name]}" curl -fsS --noproxy '*' --max-time 3 "$PROXY/healthz"; then
        fail "regcache ($name) did not answer /healthz within 30s"
        summary
    fi
}
start_regcache regcache "$W/regcache.log" "${serve_args[@]}"
CLIENT_CA=$W/client-certs/ca.crt
curl -fsS --noproxy '*' --max-time 10 -o "$CLIENT_CA" "$PROXY/ca.crt" || { fail "GET /ca.crt"; summary; }
set_client_env
SKOPEO=("${CLIENT_ENV[@]}" skopeo --policy "$W/policy.json")
ACCEPT='Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json'

# https_tag WHAT: the TLS image through HTTPS_PROXY (skopeo) and the mirror (curl).
https_tag() {
    if capture "skopeo-https-$1" 60 "$W/tmp/raw" "${SKOPEO[@]}" inspect --raw --cert-dir "$W/client-certs" \
        "docker://$HUB/library/e2e-small:1"; then
        check_digest "$1: skopeo through HTTPS_PROXY gets the TLS registry's e2e-small:1" "$SMALL_DIGEST" \
            "$(sha256_of <"$W/tmp/raw")"
    else
        fail "$1: skopeo inspect through HTTPS_PROXY"
        show_last
    fi
    curl -sS --noproxy '*' --max-time 20 -H "$ACCEPT" -o "$W/tmp/mirror" \
        "$PROXY/v2/library/e2e-small/manifests/1?ns=docker.io"
    check_digest "$1: the mirror form gets the TLS registry's e2e-small:1" "$SMALL_DIGEST" \
        "$(sha256_of <"$W/tmp/mirror")"
}

# ------------------------------------- 1. plain http to a registry host
plain_mark=$(mark "$W/registry-plain.log")
rc_mark=$(mark "$W/regcache.log")
code=$(curl -sS --max-time 20 -x "$PROXY" -H "$ACCEPT" -o "$W/tmp/body" -w '%{http_code}' \
    "http://$HUB/v2/library/e2e-small/manifests/1")
if [ "$code" = 403 ] && grep -q insecure_registries "$W/tmp/body"; then
    pass "absolute-form http://$HUB/… answers 403 naming insecure_registries"
else
    fail "absolute-form http://$HUB/… answered $code: $(head -c 300 "$W/tmp/body")"
fi
if since "$W/regcache.log" "$rc_mark" | grep 'rule="\?insecure_registries' >/dev/null; then
    pass "regcache's log names the rule"
else
    fail "no log line names insecure_registries"
fi
if since "$W/registry-plain.log" "$plain_mark" | grep 'GET /v2/' >/dev/null; then
    fail "the plain-http registry was asked: $(since "$W/registry-plain.log" "$plain_mark" | grep 'GET /v2/' | head -3)"
else
    pass "the plain-http registry saw no request"
fi

# ------------------------------------------------ 2. HTTPS clients unharmed
https_tag "after the plain-http request"

# ------------------------------------------- 3. no other port, no relay
code=$(curl -sS --max-time 20 -x "$PROXY" -o "$W/tmp/body" -w '%{http_code}' "http://$ADDR:8080/")
if [ "$code" = 403 ]; then
    pass "absolute-form http://$ADDR:8080/ (a port CONNECT refuses) answers 403"
else
    fail "absolute-form http://$ADDR:8080/ answered $code"
fi
code=$(curl -sS --noproxy '*' --max-time 20 -o "$W/tmp/body" -w '%{http_code}' \
    "$PROXY/v2/library/e2e-small/manifests/1?ns=$HUB:5000")
if [ "$code" = 403 ]; then
    pass "mirror ?ns=$HUB:5000 answers 403"
else
    fail "mirror ?ns=$HUB:5000 answered $code: $(head -c 300 "$W/tmp/body")"
fi

# ------------------------------------------ 4. an insecure registry, opt-in
stop_named regcache
start_regcache regcache-insecure "$W/regcache-insecure.log" "${serve_args[@]}" --insecure-registry "$HUB:80"
rc_mark=$(mark "$W/regcache-insecure.log")
if run skopeo-insecure 120 "${SKOPEO[@]}" copy --all --src-tls-verify=false \
    "docker://$HUB:80/library/e2e-small:1" "oci:$W/out/insecure:x"; then
    check_digest "skopeo pulls $HUB:80/library/e2e-small:1 over plain HTTP through the proxy" \
        "$MULTI_DIGEST" "$(layout_digest "$W/out/insecure")"
else
    fail "skopeo pull of the insecure registry through the proxy"
    show_last
fi
if since "$W/regcache-insecure.log" "$rc_mark" | grep 'regcache::access' | grep "host=\"\?$HUB:80" >/dev/null; then
    pass "regcache served the insecure registry's requests itself (access log host=$HUB:80)"
else
    fail "no access log line for host $HUB:80"
fi
# A manifest of the plain image that skopeo's pull cached, asked again with
# curl through absolute-form: served from the cache.
blob=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["manifests"][0]["digest"])' \
    "$SEED/blobs/sha256/${MULTI_DIGEST#sha256:}")
curl -sS --max-time 20 -x "$PROXY" -D "$W/tmp/head" -o "$W/tmp/blob" -H "$ACCEPT" \
    "http://$HUB:80/v2/library/e2e-small/manifests/$blob"
got=$(tr -d '\r' <"$W/tmp/head" | sed -n 's/^[Xx]-[Cc]ache: //p')
if [ "$(sha256_of <"$W/tmp/blob")" = "$blob" ] && [ "$got" = HIT ]; then
    pass "absolute-form GET of $blob from the insecure registry is a cache HIT"
else
    fail "absolute-form GET of $blob from the insecure registry: X-Cache '$got', want HIT"
fi

# ------------------------------------------- 5. keyed apart from HTTPS
https_tag "with the insecure registry of the same name cached"
code=$(curl -sS --max-time 20 --proxy "$PROXY" --cacert "$CLIENT_CA" -H "$ACCEPT" -o "$W/tmp/body" \
    -w '%{http_code}' "https://$HUB/v2/library/e2e-small/manifests/$blob")
if [ "$code" = 404 ]; then
    pass "the plain registry's manifest is not served through the HTTPS registry (404)"
else
    fail "the plain registry's manifest through the HTTPS registry answered $code"
fi

summary
