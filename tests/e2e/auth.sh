#!/usr/bin/env bash
# End-to-end test of regcache's auth-aware sharing with real parts.
#
#   upstream  Debian's docker-registry (distribution 2.8) with htpasswd auth
#             (bcrypt, `htpasswd -Bbn`), serving TLS for private.registry.test
#             with a throw-away test CA, on 127.0.0.1:<port>; seeded with the
#             small image of make_seed.py as team/secret:1
#   proxy     regcache serve --intercept private.registry.test
#             --resolve private.registry.test=127.0.0.1:<port> --upstream-ca <test CA>
#   clients   skopeo and curl through the proxy, trusting only regcache's CA:
#             A with alice's password, B with none (or a wrong one)
#
# Checks: A pulls (from upstream); B gets 401 with the registry's challenge
# for the manifest (tag and digest) and every blob, GET and HEAD, and never a
# byte of them, also when asking through another repository name; A pulls
# again and is served from the cache after at most one HEAD upstream
# (regcache's access log says cache=HIT, the registry's access log shows no
# new GET); with the registry stopped, alice (verified before) is still
# served and B is not; alice's password never shows in regcache's log or
# cache directory. private.registry.test never resolves for the clients.
#
# Usage:  tests/e2e/auth.sh
# Environment:
#   REGCACHE_BIN   regcache binary (default: <repo>/target/debug/regcache,
#                  built with `cargo build` when REGCACHE_BIN is unset)
#   REGCACHE_ARGS  extra arguments for `regcache serve`
#   E2E_KEEP=1     keep the work directory (its path is printed)
#
# Prints PASS/FAIL per check and ends with the line "N passed, M failed";
# the exit status is non-zero when anything failed.

# Functions called only through traps or wait_until look unreachable to it.
# shellcheck disable=SC2317
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PRIV=private.registry.test
NAME=team/secret
ALICE=alice
ALICE_PW=alice-e2e-Pw-4711
REALM_NAME=regcache-e2e-private

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

# ------------------------------------------------------------------- set-up
setup_workdir regcache-e2e-auth
SUMMARY_LOGS=("$W/regcache.log" "$W/registry.log")

build_regcache

if getent hosts "$PRIV" >/dev/null; then
    fail "$PRIV resolves on this machine; the clients must reach it only through the proxy"
fi

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
# The small image's config and layers.
SMALL_BLOBS=$(python3 - "$SEED" "$SMALL_DIGEST" <<'PY'
import json, os, sys
seed, top = sys.argv[1:3]
m = json.load(open(os.path.join(seed, "blobs", *top.split(":", 1))))
print(" ".join([m["config"]["digest"]] + [l["digest"] for l in m["layers"]]))
PY
)
note "team/secret:1 is $SMALL_DIGEST with blobs $SMALL_BLOBS"

# ---------------------------------------------------------------- test PKI
PKI=$W/pki
if make_pki "$PKI" "$PRIV" "DNS:$PRIV" "regcache e2e private upstream test CA"; then
    pass "test CA and $PRIV server certificate created"
else
    fail "openssl could not create the test PKI"
    show_last
    summary
fi

# ------------------------------------------------ the private upstream
REGPORT=$(free_port)
mkdir -p "$W/registry"
if run htpasswd 30 sh -c "htpasswd -Bbn '$ALICE' '$ALICE_PW' >'$W/registry/htpasswd'" &&
    grep -q "^$ALICE:\$2y\\$" "$W/registry/htpasswd"; then
    pass "htpasswd file with a bcrypt entry for $ALICE"
else
    fail "htpasswd -Bbn (apache2-utils) did not write a bcrypt entry"
    show_last
    summary
fi
note "starting docker-registry (htpasswd auth) on 127.0.0.1:$REGPORT"
start_registry "$W/registry" "127.0.0.1:$REGPORT" "$PKI" "auth:
  htpasswd:
    realm: $REALM_NAME
    path: $W/registry/htpasswd"
direct() { # direct CURL_ARGS...: straight to the registry, not through the proxy
    curl --noproxy '*' --max-time 10 --cacert "$PKI/ca.pem" --resolve "$PRIV:$REGPORT:127.0.0.1" "$@"
}
registry_up() { direct -fsS -u "$ALICE:$ALICE_PW" "https://$PRIV:$REGPORT/v2/"; }
if wait_until 30 "${PID_OF[registry]}" registry_up; then
    pass "docker-registry serves TLS for $PRIV on 127.0.0.1:$REGPORT and accepts $ALICE"
else
    fail "docker-registry did not come up"
    summary
fi
UPSTREAM_CHALLENGE=$(direct -sS -o /dev/null -D - "https://$PRIV:$REGPORT/v2/$NAME/manifests/1" |
    tr -d '\r' | sed -n 's/^[Ww]ww-[Aa]uthenticate: *//p')
code=$(direct -sS -o /dev/null -w '%{http_code}' "https://$PRIV:$REGPORT/v2/")
if [ "$code" = 401 ] && [ -n "$UPSTREAM_CHALLENGE" ]; then
    pass "the registry refuses anonymous requests (401, challenge: $UPSTREAM_CHALLENGE)"
else
    fail "the registry should refuse anonymous requests: /v2/ answered $code, challenge '$UPSTREAM_CHALLENGE'"
fi

note "seeding $NAME:1 (directly, with $ALICE's password)"
if run seed 120 "${SKOPEO_DIRECT[@]}" copy --preserve-digests --dest-tls-verify=false \
    --dest-creds "$ALICE:$ALICE_PW" "oci:$SEED:$SMALL_REF" "docker://127.0.0.1:$REGPORT/$NAME:1" &&
    capture seed-check 30 "$W/tmp/raw" "${SKOPEO_DIRECT[@]}" inspect --raw --tls-verify=false \
        --creds "$ALICE:$ALICE_PW" "docker://127.0.0.1:$REGPORT/$NAME:1" &&
    [ "$(sha256_of <"$W/tmp/raw")" = "$SMALL_DIGEST" ]; then
    pass "upstream seeded with $NAME:1 ($SMALL_DIGEST)"
else
    fail "seeding $NAME:1"
    show_last
    summary
fi

# ------------------------------------------------------------------- proxy
PROXYPORT=$(free_port)
PROXY=http://127.0.0.1:$PROXYPORT
mkdir -p "$W/regcache/certs"
CACHE_DIR=$W/regcache/cache
serve_args=(--listen "127.0.0.1:$PROXYPORT" --ca-dir "$W/regcache/certs" --cache-dir "$CACHE_DIR"
    --upstream-ca "$PKI/ca.pem" --intercept "$PRIV" --resolve "$PRIV=127.0.0.1:$REGPORT")
# shellcheck disable=SC2206
serve_args+=(${REGCACHE_ARGS:-})
note "starting regcache on 127.0.0.1:$PROXYPORT: $REGCACHE_BIN serve ${serve_args[*]}"
start_bg regcache "$W/regcache.log" env -C "$W/regcache" HOME="$W/regcache" \
    XDG_CACHE_HOME="$W/regcache/xdg-cache" XDG_CONFIG_HOME="$W/regcache/xdg-config" \
    XDG_DATA_HOME="$W/regcache/xdg-data" "$REGCACHE_BIN" serve "${serve_args[@]}"
if wait_until 30 "${PID_OF[regcache]}" proxy_up; then
    pass "regcache answers /healthz on 127.0.0.1:$PROXYPORT"
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
SRC=docker://$PRIV/$NAME
# through NAME CURL_ARGS...: curl through the proxy, trusting only regcache's CA.
through() { curl -sS --max-time 20 --proxy "$PROXY" --cacert "$CLIENT_CA" "$@"; }
BASE=https://$PRIV/v2

# ------------------------------------------------- A: alice's first pull
reg_mark=$(mark "$W/registry.log")
if run skopeo-alice-1 120 "${SKOPEO[@]}" copy --src-cert-dir "$W/client-certs" \
    --src-creds "$ALICE:$ALICE_PW" "$SRC:1" "oci:$W/out/alice-1:x"; then
    check_digest "A (skopeo --src-creds $ALICE) pulls $NAME:1 through the proxy" "$SMALL_DIGEST" \
        "$(layout_digest "$W/out/alice-1")"
else
    fail "A (skopeo --src-creds $ALICE) pull of $NAME:1 through the proxy"
    show_last
fi
# The registry writes its access log line once a response is over, which may
# be a moment after the client has every byte.
missing_gets() { # missing_gets MARK: blobs with no upstream GET since MARK
    local d
    missing=""
    for d in $SMALL_BLOBS; do
        since "$W/registry.log" "$1" | grep -E "\"GET /v2/$NAME/blobs/$d HTTP/[0-9.]+\" 200" >/dev/null ||
            missing="$missing ${d:7:12}"
    done
    [ -z "$missing" ]
}
wait_until 5 "" missing_gets "$reg_mark"
if missing_gets "$reg_mark"; then
    pass "A's first pull fetched every blob from the registry"
else
    fail "A's first pull: the registry log shows no GET for:$missing"
fi

# ------------------------------------------------- B: no credential
run skopeo-anon-inspect 60 "${SKOPEO[@]}" inspect --raw --cert-dir "$W/client-certs" "$SRC:1"
rc=$?
if [ "$rc" != 0 ] && ! grep -q '"schemaVersion"' "$LAST_LOG" &&
    grep -qiE 'unauthorized|authentication required|401' "$LAST_LOG"; then
    pass "B (skopeo, no credentials) inspect $NAME:1 is refused as unauthorized"
else
    fail "B (skopeo, no credentials) inspect $NAME:1: rc=$rc, expected an authentication failure"
    show_last
fi
run skopeo-anon-copy 60 "${SKOPEO[@]}" copy --src-cert-dir "$W/client-certs" "$SRC:1" "oci:$W/out/anon:x"
rc=$?
got_blobs=$(find "$W/out/anon/blobs" -type f 2>/dev/null | wc -l)
if [ "$rc" != 0 ] && [ "$got_blobs" = 0 ]; then
    pass "B (skopeo, no credentials) copy of $NAME:1 fails with nothing copied"
else
    fail "B (skopeo, no credentials) copy of $NAME:1: rc=$rc, $got_blobs blobs copied"
    show_last
fi

# refused_everywhere WHO EXPECTED_STATUS CURL_AUTH_ARGS...: GET and HEAD of
# the manifest (tag, digest) and every blob through the proxy.
refused_everywhere() {
    local who=$1 want=$2 path code bad="" out=$W/tmp/refused hdr=$W/tmp/refused.h d
    shift 2
    local paths=("$NAME/manifests/1" "$NAME/manifests/$SMALL_DIGEST")
    for d in $SMALL_BLOBS; do paths+=("$NAME/blobs/$d"); done
    for path in "${paths[@]}"; do
        : >"$out"
        : >"$hdr"
        code=$(through "$@" -o "$out" -D "$hdr" -w '%{http_code}' \
            -H 'Accept: application/vnd.oci.image.manifest.v1+json' "$BASE/$path")
        challenge=$(tr -d '\r' <"$hdr" | sed -n 's/^[Ww]ww-[Aa]uthenticate: *//p' | tail -n1)
        if [ "$code" != "$want" ]; then
            bad="$bad GET:$path=$code"
        elif [ "$want" = 401 ] && [ "$challenge" != "$UPSTREAM_CHALLENGE" ]; then
            bad="$bad GET:$path:challenge='$challenge'"
        elif ! grep -q '"errors"' "$out"; then
            bad="$bad GET:$path:no-JSON-error-body($(head -c 80 "$out"))"
        fi
        got=$(sha256_of <"$out")
        if [ "$got" = "${path##*/}" ] || { [ "${path##*/}" = 1 ] && [ "$got" = "$SMALL_DIGEST" ]; } ||
            [ "$(wc -c <"$out")" -gt 4096 ]; then
            bad="$bad GET:$path:CONTENT-DELIVERED"
        fi
        code=$(through "$@" -I -o "$hdr" -w '%{http_code}' \
            -H 'Accept: application/vnd.oci.image.manifest.v1+json' "$BASE/$path")
        [ "$code" = "$want" ] || bad="$bad HEAD:$path=$code"
    done
    if [ -z "$bad" ]; then
        pass "$who: $want for the manifest (tag, digest) and every blob, GET and HEAD, no content"
    else
        fail "$who: expected $want everywhere, no content; got:$bad"
    fi
}
refused_everywhere "B (curl, no credentials)" 401
refused_everywhere "B (curl, wrong password)" 401 -u "$ALICE:not-the-password"

# The same digests through another repository name: the registry decides
# for that repository (401 without credentials, 404 for alice: it has none).
bad=""
for d in $SMALL_DIGEST $SMALL_BLOBS; do
    kind=blobs
    [ "$d" = "$SMALL_DIGEST" ] && kind=manifests
    code=$(through -o "$W/tmp/x" -w '%{http_code}' "$BASE/team/other/$kind/$d")
    [ "$code" = 401 ] || bad="$bad anonymous:$kind/${d:7:12}=$code"
    [ "$(sha256_of <"$W/tmp/x")" = "$d" ] && bad="$bad anonymous:$kind/${d:7:12}:CONTENT"
    code=$(through -u "$ALICE:$ALICE_PW" -o "$W/tmp/x" -w '%{http_code}' "$BASE/team/other/$kind/$d")
    [ "$code" = 404 ] || bad="$bad alice:$kind/${d:7:12}=$code"
    [ "$(sha256_of <"$W/tmp/x")" = "$d" ] && bad="$bad alice:$kind/${d:7:12}:CONTENT"
done
if [ -z "$bad" ]; then
    pass "the digests through team/other: 401 without credentials, 404 for $ALICE, never the content"
else
    fail "the digests through team/other:$bad"
fi

# ------------------------------------------------- A again: from the cache
reg_mark=$(mark "$W/registry.log")
rc_mark=$(mark "$W/regcache.log")
if run skopeo-alice-2 120 "${SKOPEO[@]}" copy --src-cert-dir "$W/client-certs" \
    --src-creds "$ALICE:$ALICE_PW" "$SRC:1" "oci:$W/out/alice-2:x"; then
    check_digest "A pulls $NAME:1 again" "$SMALL_DIGEST" "$(layout_digest "$W/out/alice-2")"
else
    fail "A's second pull of $NAME:1"
    show_last
fi
sleep 1 # let both access logs catch up with the last response
since "$W/registry.log" "$reg_mark" | grep -E "\"(GET|HEAD) /v2/$NAME/(manifests|blobs)/" >"$W/tmp/upstream-2"
gets=$(grep -c '"GET ' "$W/tmp/upstream-2")
heads=$(grep -c '"HEAD ' "$W/tmp/upstream-2")
if [ "$gets" = 0 ] && [ "$heads" -le 1 ]; then
    pass "A's second pull: no GET of a manifest or blob upstream, $heads HEAD (at most one)"
else
    fail "A's second pull: $gets GET and $heads HEAD of manifests/blobs upstream (expected 0 and at most 1)"
    indent <"$W/tmp/upstream-2"
fi
notcached=""
for d in $SMALL_BLOBS; do
    line=$(since "$W/regcache.log" "$rc_mark" | grep 'regcache::access' | grep -F "path=/v2/$NAME/blobs/$d" |
        grep -E 'method="?GET' | tail -n1)
    echo "$line" | grep -qE 'cache="?HIT' || notcached="$notcached ${d:7:12}:[${line:-no log line}]"
done
if [ -z "$notcached" ]; then
    pass "regcache's log says cache=HIT for every blob of A's second pull"
else
    fail "regcache's log for A's second pull, blobs not cache=HIT:$notcached"
fi

# ------------------------------------------------- upstream down
note "stopping the registry"
stop_named registry
blob=${SMALL_BLOBS##* }
code=$(through -u "$ALICE:$ALICE_PW" -o "$W/tmp/x" -w '%{http_code}' "$BASE/$NAME/blobs/$blob")
if [ "$code" = 200 ] && [ "$(sha256_of <"$W/tmp/x")" = "$blob" ]; then
    pass "registry down: $ALICE (verified before) still gets a cached blob"
else
    fail "registry down: $ALICE's cached blob answered $code"
fi
code=$(through -o "$W/tmp/x" -w '%{http_code}' "$BASE/$NAME/blobs/$blob")
if [ "${code:0:1}" != 2 ] && [ "$(sha256_of <"$W/tmp/x")" != "$blob" ]; then
    pass "registry down: B (no credentials) is still refused ($code), no content"
else
    fail "registry down: B (no credentials) got $code for a cached blob"
fi
if run skopeo-alice-offline 120 "${SKOPEO[@]}" copy --src-cert-dir "$W/client-certs" \
    --src-creds "$ALICE:$ALICE_PW" "$SRC@$SMALL_DIGEST" "oci:$W/out/alice-offline:x"; then
    check_digest "registry down: A (skopeo) pulls $NAME@digest from the cache" "$SMALL_DIGEST" \
        "$(layout_digest "$W/out/alice-offline")"
else
    fail "registry down: A (skopeo --src-creds) pull of $NAME@digest"
    show_last
fi

# ------------------------------------------------- secrets
B64=$(printf '%s' "$ALICE:$ALICE_PW" | base64 -w0)
leaks=""
grep -qF -- "$ALICE_PW" "$W/regcache.log" && leaks="$leaks password-in-log"
grep -qF -- "$B64" "$W/regcache.log" && leaks="$leaks basic-value-in-log"
if [ -f "$CACHE_DIR/index.redb" ]; then
    grep -rlaF -- "$ALICE_PW" "$CACHE_DIR" >/dev/null && leaks="$leaks password-in-cache-dir"
    grep -rlaF -- "$B64" "$CACHE_DIR" >/dev/null && leaks="$leaks basic-value-in-cache-dir"
else
    leaks="$leaks no-index.redb-in-$CACHE_DIR"
fi
if [ -z "$leaks" ]; then
    pass "$ALICE's password and Basic value appear neither in regcache's log nor in its cache dir"
else
    fail "secrets:$leaks"
fi
# ------------------------------------------------- export and offline
# The private image never leaves in a bundle unless asked for, and an offline
# regcache does not hand it to anonymous clients.
note "stopping regcache; exporting its cache"
stop_named regcache
BUNDLE=$W/bundle.tar
run export-default 60 "$REGCACHE_BIN" export -o "$BUNDLE" --cache-dir "$CACHE_DIR"
rc=$?
if [ "$rc" != 0 ] && [ ! -e "$BUNDLE" ] && grep -q "left out $PRIV/$NAME:1" "$LAST_LOG"; then
    pass "export without --include-private leaves out $NAME:1 (exit $rc, no bundle): $(grep -m1 'left out' "$LAST_LOG" | cut -c1-160)"
else
    fail "export without --include-private: rc=$rc, bundle $(test -e "$BUNDLE" && echo written || echo absent)"
    show_last
fi
PBUNDLE=$W/bundle-private.tar
if run export-private 60 "$REGCACHE_BIN" export --include-private -o "$PBUNDLE" --cache-dir "$CACHE_DIR" &&
    grep -q "including private image $PRIV/$NAME:1" "$LAST_LOG"; then
    marked=$(python3 -c 'import json, sys, tarfile
t = tarfile.open(sys.argv[1])
idx = json.load(t.extractfile("index.json"))
print(" ".join(d["annotations"]["io.regcache.ref"] + "=" + d["annotations"]["io.regcache.public"] for d in idx["manifests"]))' "$PBUNDLE")
    if [ "$marked" = "$PRIV/$NAME:1=false" ]; then
        pass "export --include-private says so on stderr and marks the image not public ($marked)"
    else
        fail "export --include-private: index.json annotations are '$marked'"
    fi
    if grep -qaF -- "$ALICE_PW" "$PBUNDLE" || grep -qaF -- "$B64" "$PBUNDLE"; then
        fail "the bundle holds $ALICE's credential"
    else
        pass "the bundle holds no credential"
    fi
else
    fail "export --include-private"
    show_last
fi
OFF_CACHE=$W/offline-cache
if run import-private 60 "$REGCACHE_BIN" import "$PBUNDLE" --cache-dir "$OFF_CACHE"; then
    serve_args=(--listen "127.0.0.1:$PROXYPORT" --ca-dir "$W/regcache/certs" --cache-dir "$OFF_CACHE"
        --intercept "$PRIV" --resolve "$PRIV=127.0.0.1:$REGPORT" --offline)
    start_bg regcache "$W/regcache.offline.log" env -C "$W/regcache" HOME="$W/regcache" \
        "$REGCACHE_BIN" serve "${serve_args[@]}"
    if wait_until 30 "${PID_OF[regcache]}" proxy_up; then
        code=$(through -o "$W/tmp/x" -w '%{http_code}' "$BASE/$NAME/blobs/$blob")
        if [ "$code" = 403 ] && [ "$(sha256_of <"$W/tmp/x")" != "$blob" ]; then
            pass "offline regcache with the imported private image: anonymous GET of its blob is refused (403)"
        else
            fail "offline regcache: anonymous GET of the imported private blob answered $code"
        fi
        if run skopeo-anon-offline 60 "${SKOPEO[@]}" copy --src-cert-dir "$W/client-certs" \
            "$SRC:1" "oci:$W/out/anon-offline:x"; then
            fail "offline regcache: an anonymous skopeo copy of $NAME:1 succeeded"
        else
            pass "offline regcache: an anonymous skopeo copy of $NAME:1 fails"
        fi
        stop_named regcache
    else
        fail "the offline regcache did not start"
        tail -n 20 "$W/regcache.offline.log" | indent
    fi
else
    fail "import of the --include-private bundle"
    show_last
fi

if grep -hE 'panicked at|stack backtrace' "$W"/regcache*.log >"$W/tmp/panics"; then
    fail "regcache logged a panic"
    head -n 5 "$W/tmp/panics" | indent
else
    pass "no panic in the regcache log"
fi

summary
