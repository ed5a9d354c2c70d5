#!/usr/bin/env bash
# End-to-end test of regcache's other ways in (registry mirror and path
# prefix, no HTTPS_PROXY), of the clients' fallback when regcache is down,
# and of the air-gap round trip (prefetch, export, import, offline).
#
#   upstream  Debian's docker-registry (distribution 2.8) serving TLS with a
#             throw-away test CA on 127.0.0.1:<port>, its certificate valid
#             for registry-1.docker.io and for IP 127.0.0.1; seeded with
#             make_seed.py's small image and multi-platform index
#   proxy     regcache serve --resolve registry-1.docker.io=127.0.0.1:<port>
#             --intercept 127.0.0.1 --connect-ports <port> --upstream-ca <test CA>
#             (?ns=127.0.0.1:<port> reaches only a port CONNECT may reach)
#   clients   a private containerd's ctr with --hosts-dir (hosts.toml naming
#             regcache as a plain-HTTP mirror), skopeo with the path-prefix
#             form, skopeo and ctr against an offline regcache
#
# Checks:
#   1. the upstream is seeded (small image, multi-platform index)
#   2. ctr pulls docker.io/library/e2e-small:1 with a docker.io hosts.toml
#      whose only host is regcache: mirror mode (?ns=docker.io), cache MISS,
#      then with a fresh content store cache HIT; each blob GET once upstream;
#      GET /v2/e2e-small/blobs/…?ns=docker.io answers X-Cache: HIT
#   3. skopeo pulls docker://127.0.0.1:<regcache>/docker.io/library/e2e-small:1
#      (path prefix) from the same cache, no blob fetched upstream again
#   4. a hosts.toml for the registry by address (server 127.0.0.1:<port>,
#      mirror regcache): with regcache up the pull goes through it
#      (?ns=127.0.0.1:<port>); with regcache stopped ctr falls back to the
#      server, in well under 30 s
#   5. air gap: instance A prefetches both images and exports a bundle; a
#      fresh instance B imports it and, --offline with the registry stopped,
#      serves both to skopeo (copy, copy --all) and ctr; a copy of the bundle
#      with one byte flipped in a blob is refused naming the blob, and the
#      cache it was imported into stays empty
#
# registry-1.docker.io never resolves for the clients. ctr's docker.io
# hosts.toml names the real server (as deploy/mirror/containerd-hosts.toml
# does); so that a broken mirror can never send ctr to the internet instead,
# those pulls get HTTPS_PROXY pointing at a closed loopback port: Go never
# proxies loopback addresses, so it changes nothing for regcache at
# 127.0.0.1, and regcache's log must show no CONNECT from them.
#
# Usage:  tests/e2e/mirror.sh
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
HUB=registry-1.docker.io

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

# ------------------------------------------------------------------- set-up
setup_workdir regcache-e2e-mirror
SUMMARY_LOGS=("$W/regcache.log" "$W/regcache-b.log" "$W/registry.log" "$W/containerd.log")
build_regcache

if getent hosts "$HUB" >/dev/null; then
    fail "$HUB resolves on this machine; the clients must reach it only through regcache"
fi
if [ "$(id -u)" -ne 0 ]; then
    note "not root: the private containerd may not start (run with sudo)"
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
# blobs_of ROOT DIGEST: every config and layer digest under DIGEST (an index
# or a manifest) in the OCI layout ROOT, recursively.
blobs_of() {
    python3 - "$1" "$2" <<'PY'
import json, os, sys
root, top = sys.argv[1:3]
def path(d): return os.path.join(root, "blobs", *d.split(":", 1))
need, todo = set(), [top]
while todo:
    doc = json.load(open(path(todo.pop())))
    todo += [m["digest"] for m in doc.get("manifests", [])]
    if "config" in doc: need.add(doc["config"]["digest"])
    need.update(l["digest"] for l in doc.get("layers", []))
print(" ".join(sorted(need)))
PY
}
SMALL_BLOBS=$(blobs_of "$SEED" "$SMALL_DIGEST")
MULTI_BLOBS=$(blobs_of "$SEED" "$MULTI_DIGEST")
note "e2e-small:1 is $SMALL_DIGEST, e2e-multi:1 is $MULTI_DIGEST"

# ---------------------------------------------------------------- test PKI
PKI=$W/pki
if make_pki "$PKI" "$HUB" "DNS:$HUB,IP:127.0.0.1"; then
    pass "test CA and a server certificate for $HUB and 127.0.0.1"
else
    fail "openssl could not create the test PKI"
    show_last
    summary
fi

# --------------------------------------------------------- 1. the upstream
REGPORT=$(free_port)
REGADDR=127.0.0.1:$REGPORT
note "starting docker-registry on $REGADDR"
start_registry "$W/registry" "$REGADDR" "$PKI"
registry_up() {
    curl -fsS --noproxy '*' --max-time 3 --cacert "$PKI/ca.pem" \
        --resolve "$HUB:$REGPORT:127.0.0.1" "https://$HUB:$REGPORT/v2/" &&
        curl -fsS --noproxy '*' --max-time 3 --cacert "$PKI/ca.pem" "https://$REGADDR/v2/"
}
if wait_until 30 "${PID_OF[registry]}" registry_up; then
    pass "docker-registry serves TLS as $HUB and as $REGADDR (verified with the test CA)"
else
    fail "docker-registry did not come up"
    summary
fi

note "seeding the upstream (directly, not through regcache)"
seed_ok=1
for pair in "$SMALL_REF:e2e-small:$SMALL_DIGEST" "$MULTI_REF:e2e-multi:$MULTI_DIGEST"; do
    IFS=: read -r ref repo digest <<<"$pair"
    if run "seed-$repo" 120 "${SKOPEO_DIRECT[@]}" copy --all --preserve-digests --dest-tls-verify=false \
        "oci:$SEED:$ref" "docker://$REGADDR/library/$repo:1" &&
        capture "seed-check-$repo" 30 "$W/tmp/raw" "${SKOPEO_DIRECT[@]}" inspect --raw --tls-verify=false \
            "docker://$REGADDR/library/$repo:1" &&
        [ "$(sha256_of <"$W/tmp/raw")" = "$digest" ]; then
        pass "upstream seeded with library/$repo:1 ($digest)"
    else
        fail "seeding library/$repo:1"
        show_last
        seed_ok=0
    fi
done
[ "$seed_ok" = 1 ] || summary

# upstream_blob_gets REPO DIGEST [MARK]: the registry's 200 GETs of a blob.
upstream_blob_gets() {
    since "$W/registry.log" "${3:-0}" | grep -cE "\"GET /v2/library/$1/blobs/$2 HTTP/[0-9.]+\" 200"
}

# ---------------------------------------------------------------- regcache
PROXYPORT=$(free_port)
MIRROR=127.0.0.1:$PROXYPORT
mkdir -p "$W/regcache/certs"
serve_args=(--listen "$MIRROR" --ca-dir "$W/regcache/certs" --cache-dir "$W/regcache/cache"
    --upstream-ca "$PKI/ca.pem" --resolve "$HUB=$REGADDR" --intercept 127.0.0.1
    --connect-ports "$REGPORT")
# shellcheck disable=SC2206
serve_args+=(${REGCACHE_ARGS:-})
# start_regcache NAME LOGFILE ARGS...: regcache serve from inside the work
# directory, with HOME and XDG dirs there.
start_regcache() {
    local name=$1 logf=$2
    shift 2
    start_bg "$name" "$logf" env -C "$W/regcache" HOME="$W/regcache" \
        XDG_CACHE_HOME="$W/regcache/xdg-cache" XDG_CONFIG_HOME="$W/regcache/xdg-config" \
        XDG_DATA_HOME="$W/regcache/xdg-data" RUST_LOG="${RUST_LOG:-info}" \
        "$REGCACHE_BIN" serve "$@"
}
note "starting regcache on $MIRROR: $REGCACHE_BIN serve ${serve_args[*]}"
start_regcache regcache "$W/regcache.log" "${serve_args[@]}"
up() { curl -fsS --noproxy '*' --max-time 3 "http://$1/healthz"; }
if wait_until 30 "${PID_OF[regcache]}" up "$MIRROR"; then
    pass "regcache answers /healthz on $MIRROR"
else
    fail "regcache did not answer /healthz within 30s"
    summary
fi

# access_lines LOG MARK HOST REPO KIND DIGEST_OR_TAG: regcache's access log
# lines since MARK for GET HOST/v2/library/REPO/KIND/REF.
access_lines() {
    since "$1" "$2" | grep 'regcache::access' | grep -E "host=\"?$3\"? " |
        grep -F "path=/v2/library/$4/$5/$6" | grep -E 'method="?GET'
}
# small_blobs_served HOST [CACHE]: regcache's log has, since $rc_mark, a
# 200 GET of every blob of the small image for upstream HOST, the last one
# with cache=CACHE when given; what is not so goes to $bad.
small_blobs_served() {
    local d line c
    bad=""
    for d in $SMALL_BLOBS; do
        line=$(access_lines "$W/regcache.log" "$rc_mark" "$1" e2e-small blobs "$d" | tail -n1)
        c=$(echo "$line" | sed -nE 's/.*cache="?([A-Z-]+).*/\1/p')
        if [ -z "$line" ]; then
            bad="$bad ${d:7:12}=no-log-line"
        elif ! echo "$line" | grep -qE 'status="?200'; then
            bad="$bad ${d:7:12}=$(echo "$line" | grep -oE 'status="?[0-9]+')"
        elif [ -n "${2:-}" ] && [ "$c" != "$2" ]; then
            bad="$bad ${d:7:12}=cache:$c"
        fi
    done
    [ -z "$bad" ]
}
# upstream_served [UA]: the registry's log has, since $reg_mark, a 200 GET of
# every blob of the small image (by a client whose User-Agent has UA); what
# is missing goes to $missing.
upstream_served() {
    local d
    missing=""
    for d in $SMALL_BLOBS; do
        since "$W/registry.log" "$reg_mark" | grep -E "\"GET /v2/library/e2e-small/blobs/$d HTTP/[0-9.]+\" 200" |
            grep -F "${1:-}" >/dev/null || missing="$missing ${d:7:12}"
    done
    [ -z "$missing" ]
}
# (In these pipelines grep reads to the end, never -q: with pipefail, a
# writer killed by SIGPIPE after an early match would fail the pipeline.)
# settle CMD...: CMD's answer once the logs have caught up (each daemon writes
# a request's line when its response is over, a moment after the client has
# every byte): retried for up to 5 seconds.
settle() { wait_until 5 "" "$@"; "$@"; }

# ------------------------------------------------------- private containerd
# Each generation gets a fresh root, hence an empty content store.
CTR=()
start_containerd() { # start_containerd GENERATION
    stop_named containerd
    local dir=$W/ctrd-$1
    containerd_config "$dir" "$dir/root"
    start_bg containerd "$W/containerd-$1.log" containerd --config "$dir/config.toml"
    ln -sf "containerd-$1.log" "$W/containerd.log"
    CTR=(ctr -a "$dir/c.sock" -n e2e)
    wait_until 30 "${PID_OF[containerd]}" "${CTR[@]}" version
}
ctr_digest() { # ctr_digest REF: the digest containerd recorded for REF
    "${CTR[@]}" images ls 2>/dev/null | awk -v r="$1" '$1 == r {print $3}'
}
# A loopback port nothing listens on: HTTPS_PROXY for the docker.io pulls,
# so that no fallback to registry-1.docker.io can leave the machine (Go does
# not proxy loopback addresses, so the mirror at 127.0.0.1 is reached directly).
DEAD_PORT=$(free_port)
NO_EXIT=(env HTTPS_PROXY="http://127.0.0.1:$DEAD_PORT" HTTP_PROXY="http://127.0.0.1:$DEAD_PORT"
    SSL_CERT_FILE="$W/empty.pem" SSL_CERT_DIR="$W/empty-certs" "${ISOLATE_ENV[@]}")
# Straight to loopback only: no proxy variables at all.
DIRECT_ENV=(env SSL_CERT_FILE="$W/empty.pem" SSL_CERT_DIR="$W/empty-certs" "${ISOLATE_ENV[@]}")

# hosts.toml for docker.io: the real server, regcache as the (only) mirror.
HUBHOSTS=$W/hosts-hub
mkdir -p "$HUBHOSTS/docker.io"
cat >"$HUBHOSTS/docker.io/hosts.toml" <<EOF
server = "https://$HUB"

[host."http://$MIRROR"]
  capabilities = ["pull", "resolve"]
EOF

# ctr_pull NAME HOSTS_DIR REF ENV...: ctr --debug images pull (its request
# URLs go to the step log).
ctr_pull() {
    local name=$1 hosts=$2 ref=$3
    shift 3
    run "$name" 120 "$@" "${CTR[@]}" --debug images pull --snapshotter native --hosts-dir "$hosts" "$ref"
}
# requested_urls: the registry URLs ctr asked for in the last step log.
requested_urls() { grep -oE 'url="?[^" ]+' "$LAST_LOG" | sed -E 's/^url="?//' | sort -u; }

# ------------------------------------------------------- 2. mirror mode
REF_SMALL=docker.io/library/e2e-small:1
if start_containerd 1; then
    pass "private containerd is up"
else
    fail "private containerd did not start"
    tail -n 20 "$W/containerd-1.log" | indent
    summary
fi
rc_mark=$(mark "$W/regcache.log")
reg_mark=$(mark "$W/registry.log")
if ctr_pull ctr-mirror-1 "$HUBHOSTS" "$REF_SMALL" "${NO_EXIT[@]}"; then
    check_digest "ctr pull $REF_SMALL with regcache as docker.io mirror (hosts.toml, no proxy)" \
        "$SMALL_DIGEST" "$(ctr_digest "$REF_SMALL")"
else
    fail "ctr pull $REF_SMALL with regcache as docker.io mirror"
    show_last
fi
requested_urls >"$W/tmp/urls-1"
if [ -s "$W/tmp/urls-1" ] && ! grep -vqE "^http://$MIRROR/v2/library/e2e-small/[^?]+\?ns=docker\.io$" "$W/tmp/urls-1"; then
    pass "ctr sent every request to http://$MIRROR/v2/library/e2e-small/…?ns=docker.io ($(wc -l <"$W/tmp/urls-1") URLs)"
else
    fail "ctr's requests were not all mirror-mode requests to $MIRROR with ns=docker.io:"
    head -n 10 "$W/tmp/urls-1" | indent
fi
if settle small_blobs_served "$HUB" MISS; then
    pass "regcache served every blob of the first mirror pull from $HUB, cache=MISS"
else
    fail "regcache's log for the first mirror pull, blobs not cache=MISS:$bad"
fi
if since "$W/regcache.log" "$rc_mark" | grep 'regcache::access' | grep -E 'method="?CONNECT' >/dev/null; then
    fail "regcache saw a CONNECT during the mirror pull (the client used it as a proxy)"
else
    pass "no CONNECT reached regcache during the mirror pull (origin-form /v2 only)"
fi
if settle upstream_served; then
    pass "the registry served every blob of the first mirror pull (to regcache)"
else
    fail "the registry log shows no GET for:$missing"
fi

# The same pull with an empty content store: from regcache's cache.
if start_containerd 2; then
    rc_mark=$(mark "$W/regcache.log")
    reg_mark=$(mark "$W/registry.log")
    if ctr_pull ctr-mirror-2 "$HUBHOSTS" "$REF_SMALL" "${NO_EXIT[@]}"; then
        check_digest "ctr pull $REF_SMALL again, fresh content store" "$SMALL_DIGEST" "$(ctr_digest "$REF_SMALL")"
    else
        fail "second ctr pull of $REF_SMALL through the mirror"
        show_last
    fi
    settle small_blobs_served "$HUB" HIT
    sleep 1 # the registry's log too, for what must not be in it
    if small_blobs_served "$HUB" HIT; then
        pass "second mirror pull: cache=HIT for every blob"
    else
        fail "second mirror pull, blobs not cache=HIT:$bad"
    fi
    n=$(since "$W/registry.log" "$reg_mark" | grep -cE '"GET /v2/library/e2e-small/blobs/')
    if [ "$n" = 0 ]; then
        pass "second mirror pull: no blob GET upstream"
    else
        fail "second mirror pull: $n blob GETs upstream (expected 0)"
    fi
else
    fail "private containerd (second generation) did not start"
fi
# Straight at the mirror endpoint: a one-component name with ns=docker.io is
# Docker Hub's library/ repository, answered from the cache with X-Cache.
code=$(curl -sS --noproxy '*' --max-time 20 -o "$W/tmp/blob" -D "$W/tmp/blob.h" -w '%{http_code}' \
    "http://$MIRROR/v2/e2e-small/blobs/$PAYLOAD_DIGEST?ns=docker.io")
xcache=$(tr -d '\r' <"$W/tmp/blob.h" | sed -n 's/^[Xx]-[Cc]ache: *//p')
if [ "$code" = 200 ] && [ "$xcache" = HIT ] && [ "$(sha256_of <"$W/tmp/blob")" = "$PAYLOAD_DIGEST" ]; then
    pass "GET /v2/e2e-small/blobs/<3 MiB layer>?ns=docker.io: 200, X-Cache: HIT, content matches"
else
    fail "GET /v2/e2e-small/blobs/$PAYLOAD_DIGEST?ns=docker.io: $code, X-Cache '$xcache'"
fi

# ------------------------------------------------------- 3. path prefix
reg_mark=$(mark "$W/registry.log")
rc_mark=$(mark "$W/regcache.log")
PREFIX_SRC=docker://$MIRROR/docker.io/library/e2e-small:1
if capture skopeo-prefix-inspect 60 "$W/tmp/raw" "${DIRECT_ENV[@]}" skopeo --policy "$W/policy.json" \
    inspect --raw --tls-verify=false "$PREFIX_SRC"; then
    check_digest "skopeo inspect --raw $PREFIX_SRC (path prefix)" "$SMALL_DIGEST" "$(sha256_of <"$W/tmp/raw")"
else
    fail "skopeo inspect --raw $PREFIX_SRC (path prefix)"
    show_last
fi
if run skopeo-prefix-copy 120 "${DIRECT_ENV[@]}" skopeo --policy "$W/policy.json" \
    copy --src-tls-verify=false "$PREFIX_SRC" "oci:$W/out/prefix-small:x"; then
    check_digest "skopeo copy $PREFIX_SRC (path prefix)" "$SMALL_DIGEST" "$(layout_digest "$W/out/prefix-small")"
    bad=""
    for d in $SMALL_BLOBS; do
        cmp -s "$SEED/blobs/sha256/${d#sha256:}" "$W/out/prefix-small/blobs/sha256/${d#sha256:}" || bad="$bad ${d:7:12}"
    done
    if [ -z "$bad" ]; then
        pass "the path-prefix copy has every blob of the seed, byte for byte"
    else
        fail "the path-prefix copy lacks or differs in:$bad"
    fi
else
    fail "skopeo copy $PREFIX_SRC (path prefix)"
    show_last
fi
settle small_blobs_served "$HUB" HIT
sleep 1
if small_blobs_served "$HUB" HIT; then
    pass "path-prefix pull: regcache served every blob from the cache the mirror pull filled (cache=HIT)"
else
    fail "path-prefix pull, blobs not cache=HIT:$bad"
fi
n=$(since "$W/registry.log" "$reg_mark" | grep -cE '"GET /v2/library/e2e-small/blobs/')
if [ "$n" = 0 ]; then
    pass "path-prefix pull: no blob GET upstream"
else
    fail "path-prefix pull: $n blob GETs upstream (expected 0)"
fi
twice=""
for d in $SMALL_BLOBS; do
    n=$(upstream_blob_gets e2e-small "$d")
    [ "$n" = 1 ] || twice="$twice ${d:7:12}=${n}x"
done
if [ -z "$twice" ]; then
    pass "across two mirror pulls and one path-prefix pull the registry served each blob once"
else
    fail "the registry served blobs other than once:$twice"
fi

# ------------------------------------------------------- 4. fallback
# The registry by address: ctr can reach the server itself, so it can fall
# back to it when the mirror does not answer.
IPHOSTS=$W/hosts-ip
mkdir -p "$IPHOSTS/$REGADDR"
cat >"$IPHOSTS/$REGADDR/hosts.toml" <<EOF
server = "https://$REGADDR"
ca = "$PKI/ca.pem"

[host."http://$MIRROR"]
  capabilities = ["pull", "resolve"]
EOF
REF_IP=$REGADDR/library/e2e-small:1
ns_re="ns=127\.0\.0\.1(%3A|:)$REGPORT"
if start_containerd 3; then
    rc_mark=$(mark "$W/regcache.log")
    reg_mark=$(mark "$W/registry.log")
    if ctr_pull ctr-ip-mirror "$IPHOSTS" "$REF_IP" "${DIRECT_ENV[@]}"; then
        check_digest "ctr pull $REF_IP with regcache as its mirror" "$SMALL_DIGEST" "$(ctr_digest "$REF_IP")"
    else
        fail "ctr pull $REF_IP with regcache as its mirror"
        show_last
    fi
    requested_urls >"$W/tmp/urls-3"
    if [ -s "$W/tmp/urls-3" ] && ! grep -vqE "^http://$MIRROR/v2/library/e2e-small/[^?]+\?$ns_re$" "$W/tmp/urls-3"; then
        pass "ctr sent every request to the mirror with ns=$REGADDR"
    else
        fail "ctr's requests were not all mirror requests with ns=$REGADDR:"
        head -n 10 "$W/tmp/urls-3" | indent
    fi
    if settle small_blobs_served "$REGADDR"; then
        pass "regcache served every blob for upstream $REGADDR (its log: host=$REGADDR, status 200)"
    else
        fail "regcache's log for upstream $REGADDR, blobs not served:$bad"
        since "$W/regcache.log" "$rc_mark" | grep -E 'regcache::access|refused' | tail -n 8 | cut -c1-300 | indent
    fi
else
    fail "private containerd (third generation) did not start"
fi

note "stopping regcache; ctr must fall back to the server"
stop_named regcache
if start_containerd 4; then
    reg_mark=$(mark "$W/registry.log")
    t0=$SECONDS
    ctr_pull ctr-fallback "$IPHOSTS" "$REF_IP" "${DIRECT_ENV[@]}"
    rc=$?
    took=$((SECONDS - t0))
    if [ "$rc" = 0 ]; then
        check_digest "regcache down: ctr pull $REF_IP falls back to the server" "$SMALL_DIGEST" "$(ctr_digest "$REF_IP")"
        if [ "$took" -lt 30 ]; then
            pass "the fallback pull took ${took}s (< 30s)"
        else
            fail "the fallback pull took ${took}s (expected < 30s)"
        fi
    else
        fail "regcache down: ctr pull $REF_IP did not fall back to the server (rc=$rc, ${took}s)"
        show_last
    fi
    if grep 'trying next host' "$LAST_LOG" | grep -F "$MIRROR" | grep 'connection refused' >/dev/null; then
        pass "ctr tried the mirror first and moved on to the next host"
    else
        fail "ctr's log does not show it trying the mirror and moving on"
    fi
    if settle upstream_served '"containerd/'; then
        pass "the registry served every blob of the fallback pull to containerd itself (User-Agent)"
    else
        fail "the registry log shows no GET by containerd for:$missing"
    fi
else
    fail "private containerd (fourth generation) did not start"
fi
stop_named containerd

# ------------------------------------------------------- 5. air gap
A=$W/a
B=$W/b
mkdir -p "$A/certs" "$B/certs"
reg_mark=$(mark "$W/registry.log")
# inst_args DIR: regcache's options for the instance in DIR (in INST).
inst_args() { INST=(--ca-dir "$1/certs" --cache-dir "$1/cache" --upstream-ca "$PKI/ca.pem" --resolve "$HUB=$REGADDR"); }
inst_args "$A"
if run prefetch-a 180 env -C "$A" HOME="$A" "$REGCACHE_BIN" prefetch "${INST[@]}" \
    e2e-small:1 docker.io/library/e2e-multi:1; then
    pass "instance A: regcache prefetch e2e-small:1 docker.io/library/e2e-multi:1 (registry up, serve not running)"
else
    fail "instance A: regcache prefetch of both images"
    show_last
fi
# A layer both images share is fetched once, under either repository. The
# registry writes its access log line once a response is over, which may be
# a moment after the client has every byte.
prefetch_missing() {
    local d
    missing=""
    for d in $(echo "$SMALL_BLOBS $MULTI_BLOBS" | tr ' ' '\n' | sort -u); do
        since "$W/registry.log" "$reg_mark" | grep -E "\"GET /v2/library/e2e-(small|multi)/blobs/$d HTTP/[0-9.]+\" 200" >/dev/null ||
            missing="$missing ${d:7:12}"
    done
    [ -z "$missing" ]
}
wait_until 5 "" prefetch_missing
if prefetch_missing; then
    pass "prefetch fetched every blob of both images (every platform of the index) from the registry"
else
    fail "prefetch fetched (registry log) none of:$missing"
fi
mkdir -p "$W/x"
inst_args "$W/x"
run prefetch-missing 60 env -C "$W/x" HOME="$W/x" "$REGCACHE_BIN" prefetch "${INST[@]}" \
    e2e-small:1 e2e-nope:1
rc=$?
if [ "$rc" != 0 ] && grep -q 'e2e-nope' "$LAST_LOG"; then
    pass "prefetch of a missing image exits $rc and names it"
else
    fail "prefetch of e2e-small:1 and the missing e2e-nope:1: rc=$rc, expected non-zero naming e2e-nope"
    show_last
fi

BUNDLE=$W/bundle.tar
if run export-a 120 "$REGCACHE_BIN" export --output "$BUNDLE" --cache-dir "$A/cache" && [ -s "$BUNDLE" ]; then
    pass "instance A: regcache export --output bundle.tar ($(wc -c <"$BUNDLE") bytes)"
else
    fail "instance A: regcache export"
    show_last
fi
# The bundle's index names both images, and holds every blob of both.
if python3 - "$BUNDLE" "$SEED" "$SMALL_DIGEST" "$MULTI_DIGEST" >"$W/tmp/bundle-check" 2>&1 <<'PY'; then
import json, sys, tarfile
bundle, seed, small, multi = sys.argv[1:5]
tar = tarfile.open(bundle)
names = set(tar.getnames())
index = json.load(tar.extractfile("index.json"))
refs = {m["digest"]: m.get("annotations", {}).get("io.regcache.ref") for m in index["manifests"]}
problems = []
for d, ref in ((small, "docker.io/library/e2e-small:1"), (multi, "docker.io/library/e2e-multi:1")):
    if refs.get(d) != ref:
        problems.append(f"index.json: {d} has io.regcache.ref {refs.get(d)!r}, expected {ref!r}")
def path(d): return "blobs/" + d.replace(":", "/")
todo, need = [small, multi], set()
while todo:
    d = todo.pop(); need.add(d)
    doc = json.load(open(f"{seed}/blobs/{d.replace(':', '/')}"))
    todo += [m["digest"] for m in doc.get("manifests", [])]
    if "config" in doc: need.add(doc["config"]["digest"])
    need.update(l["digest"] for l in doc.get("layers", []))
problems += [f"missing {d}" for d in sorted(need) if path(d) not in names]
print("refs:", refs)
print("\n".join(problems))
sys.exit(1 if problems else 0)
PY
    pass "the bundle's index.json names both images (io.regcache.ref) and the tar holds every manifest and blob of both"
else
    fail "bundle contents"
    indent <"$W/tmp/bundle-check"
fi

note "stopping the registry: instance B has no upstream"
stop_named registry
if run import-b 120 "$REGCACHE_BIN" import "$BUNDLE" --cache-dir "$B/cache"; then
    pass "instance B (fresh cache and CA dirs): regcache import bundle.tar"
else
    fail "instance B: regcache import bundle.tar"
    show_last
fi
BPORT=$(free_port)
BPROXY=http://127.0.0.1:$BPORT
inst_args "$B"
# shellcheck disable=SC2206
INST+=(--intercept 127.0.0.1 --offline ${REGCACHE_ARGS:-})
start_regcache regcache-b "$W/regcache-b.log" --listen "127.0.0.1:$BPORT" "${INST[@]}"
if wait_until 30 "${PID_OF[regcache-b]}" up "127.0.0.1:$BPORT"; then
    pass "instance B serves --offline on 127.0.0.1:$BPORT (registry stopped)"
else
    fail "instance B did not answer /healthz"
    summary
fi
mkdir -p "$W/b-client-certs"
if ! curl -fsS --noproxy '*' --max-time 10 -o "$W/b-client-certs/ca.crt" "$BPROXY/ca.crt"; then
    fail "GET /ca.crt from instance B"
fi
B_ENV=(env HTTPS_PROXY="$BPROXY" https_proxy="$BPROXY" HTTP_PROXY="$BPROXY" http_proxy="$BPROXY"
    SSL_CERT_FILE="$W/empty.pem" SSL_CERT_DIR="$W/empty-certs" "${ISOLATE_ENV[@]}")
B_SKOPEO=("${B_ENV[@]}" skopeo --policy "$W/policy.json")
if run b-skopeo-small 120 "${B_SKOPEO[@]}" copy --src-cert-dir "$W/b-client-certs" \
    "docker://$HUB/library/e2e-small:1" "oci:$W/out/b-small:x"; then
    check_digest "offline B: skopeo copy e2e-small:1 (HTTPS_PROXY, B's CA)" "$SMALL_DIGEST" "$(layout_digest "$W/out/b-small")"
else
    fail "offline B: skopeo copy e2e-small:1"
    show_last
fi
if run b-skopeo-multi 180 "${B_SKOPEO[@]}" copy --all --src-cert-dir "$W/b-client-certs" \
    "docker://$HUB/library/e2e-multi:1" "oci:$W/out/b-multi:x"; then
    check_digest "offline B: skopeo copy --all e2e-multi:1 (index)" "$MULTI_DIGEST" "$(layout_digest "$W/out/b-multi")"
    got=$(blobs_of "$W/out/b-multi" "$MULTI_DIGEST" 2>/dev/null)
    if [ "$got" = "$MULTI_BLOBS" ]; then
        pass "offline B: the --all copy has every platform's config and layers"
    else
        fail "offline B: the --all copy's blobs differ from the seed's"
    fi
else
    fail "offline B: skopeo copy --all e2e-multi:1"
    show_last
fi
# ctr with B as its docker.io mirror.
BHOSTS=$W/hosts-b
mkdir -p "$BHOSTS/docker.io"
cat >"$BHOSTS/docker.io/hosts.toml" <<EOF
server = "https://$HUB"

[host."http://127.0.0.1:$BPORT"]
  capabilities = ["pull", "resolve"]
EOF
REF_MULTI=docker.io/library/e2e-multi:1
if start_containerd 5; then
    if ctr_pull b-ctr-multi "$BHOSTS" "$REF_MULTI" "${NO_EXIT[@]}"; then
        check_digest "offline B: ctr pull $REF_MULTI with B as docker.io mirror" "$MULTI_DIGEST" "$(ctr_digest "$REF_MULTI")"
    else
        fail "offline B: ctr pull $REF_MULTI with B as docker.io mirror"
        show_last
    fi
    sleep 1
    # Everything B served for the images came from its cache.
    grep 'regcache::access' "$W/regcache-b.log" | grep -F 'path=/v2/library/' |
        grep -vE 'cache="?HIT' >"$W/tmp/b-not-hit"
    n=$(grep -c 'path=/v2/library/' <(grep 'regcache::access' "$W/regcache-b.log"))
    if [ "$n" -gt 0 ] && [ ! -s "$W/tmp/b-not-hit" ]; then
        pass "offline B answered all $n manifest and blob requests from its cache (cache=HIT)"
    else
        fail "offline B: of $n manifest and blob requests, some were not cache=HIT:"
        cut -c1-300 "$W/tmp/b-not-hit" | head -n 8 | indent
    fi
else
    fail "private containerd (fifth generation) did not start"
fi
stop_named containerd

# One flipped byte in the middle of a blob: the whole bundle is refused.
BAD=$W/bad.tar
BAD_DIGEST=$PAYLOAD_DIGEST
if python3 - "$BUNDLE" "$BAD" "$BAD_DIGEST" <<'PY'; then
import shutil, sys, tarfile
src, dst, digest = sys.argv[1:4]
member = tarfile.open(src).getmember("blobs/" + digest.replace(":", "/"))
shutil.copyfile(src, dst)
with open(dst, "r+b") as f:
    at = member.offset_data + member.size // 2
    f.seek(at)
    b = f.read(1)
    f.seek(at)
    f.write(bytes([b[0] ^ 0xFF]))
PY
    note "flipped one byte in the middle of blob $BAD_DIGEST inside $(basename "$BAD")"
else
    fail "could not write the corrupted bundle"
fi
C=$W/c
mkdir -p "$C"
run import-bad 120 "$REGCACHE_BIN" import "$BAD" --cache-dir "$C/cache"
rc=$?
if [ "$rc" != 0 ] && grep -qF "${BAD_DIGEST#sha256:}" "$LAST_LOG"; then
    pass "import of the bundle with a flipped byte exits $rc naming $BAD_DIGEST"
else
    fail "import of the bundle with a flipped byte: rc=$rc, expected non-zero and a message naming $BAD_DIGEST"
    show_last
fi
run stats-bad 30 "$REGCACHE_BIN" cache stats --cache-dir "$C/cache"
rc=$?
files=$(find "$C/cache" -path '*blobs*' -type f 2>/dev/null | wc -l)
if { { [ "$rc" = 0 ] && grep -qE '^ *entries: +0 *$' "$LAST_LOG"; } ||
    { [ "$rc" != 0 ] && [ ! -e "$C/cache/index.redb" ]; }; } && [ "$files" = 0 ]; then
    pass "after the refused import the cache is empty ($(grep -m1 -E '^ *entries:' "$LAST_LOG" | tr -s ' ' || echo 'no cache'), no blob files)"
else
    fail "after the refused import: cache stats rc=$rc, $files files under blobs/"
    show_last
fi

if grep -hE 'panicked at|stack backtrace' "$W"/regcache*.log >"$W/tmp/panics"; then
    fail "regcache logged a panic"
    head -n 5 "$W/tmp/panics" | indent
else
    pass "no panic in the regcache logs"
fi

summary
