#!/usr/bin/env bash
# End-to-end test of regcache's shared tier (shared_store) with real parts.
#
#   store     SeaweedFS (tests/e2e/seaweedfs.sh) on loopback, bucket
#             regcache-e2e; every node uses s3://regcache-e2e/site
#   upstream  two Debian docker-registry (distribution 2.8) instances with
#             one throw-away test CA: registry-1.docker.io (anonymous,
#             library/e2e-small:1 and library/e2e-multi:1 of make_seed.py)
#             and private.registry.test (htpasswd, team/secret:1, the seed's
#             "concurrent" image with its 8 MiB layer)
#   nodes     regcache serve A, B, C (later D and E), each with its own
#             port and cache directory, all with one CA (A's, copied) and
#             --shared-store s3://regcache-e2e/site, --peer-listen
#             127.0.0.1:<free port> (the peer endpoint), --resolve for both
#             registry names, --upstream-ca the test CA
#   clients   skopeo and curl with HTTPS_PROXY=http://127.0.0.1:<node port>,
#             trusting only regcache's CA; the registry names never resolve
#             for them
#
# Checks:
#   1. skopeo through A gets the seed's digest; the bucket then holds the
#      manifest, config and layers under site/blobs/sha256/<hex>.
#   2. skopeo through B, then C: same digest; the registry's access log shows
#      HEADs only (no manifest or blob GET) for each; B's and C's logs say
#      cache=SHARED for the manifest and every blob.
#   3. Private: alice pulls through A; through B without credentials curl
#      gets 401 for the manifest (tag, digest) and every blob, and no bytes;
#      alice through B is served from the tier (SHARED, no upstream GET).
#   4. Peers: one cold 256 MiB blob (library/e2e-big, random bytes, pushed
#      with the registry's upload API) asked for by 90 curl clients at once,
#      30 through each of A, B, C: every client's body (piped into
#      sha256sum, never on disk) has the blob's sha256; the registry's access
#      log shows exactly one GET of it; exactly one node logs cache=MISS for
#      it, the other nodes log cache=PEER for some of their clients (at least
#      one of them; one whose first client came after the upload reads the
#      bucket, SHARED; the rest are COALESCED or HIT on that node), and the
#      fetching node's /metrics shows
#      regcache_peer_requests_total{role="served",result="ok"} >= 1.
#   5. Store stopped: B and C serve their own cache (HIT); a node with an
#      empty cache (D) pulls from the registry (MISS) and logs "shared store
#      unreachable" once; the store restarted on the same directory: a fresh
#      node (E) reads from it (SHARED); A pulls the multi image, and B (never
#      restarted) and D then read it from the tier, D logging "shared store
#      answers again".
#
# Usage:  tests/e2e/shared.sh   (under flock /tmp/regcache-e2e.lock)
# Environment:
#   REGCACHE_BIN   regcache binary (default: <repo>/target/debug/regcache,
#                  built with `cargo build` when REGCACHE_BIN is unset)
#   REGCACHE_ARGS  extra arguments for every `regcache serve`
#   WEED_BIN       a weed binary instead of the pinned one
#   E2E_KEEP=1     keep the work directory (its path is printed)
#   E2E_PEER_MIB, E2E_PEER_CLIENTS
#                  check 4's blob size in MiB (256) and clients per node (30)
#
# Prints PASS/FAIL per check and ends with the line "N passed, M failed";
# the exit status is non-zero when anything failed.

# Functions called only through traps or wait_until look unreachable to it.
# shellcheck disable=SC2317
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HUB=registry-1.docker.io
PRIV=private.registry.test
PNAME=team/secret
ALICE=alice
ALICE_PW=alice-e2e-Pw-0815
BUCKET=regcache-e2e
PREFIX=site

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
# shellcheck source-path=SCRIPTDIR source=seaweedfs.sh
. "$HERE/seaweedfs.sh"

# weed first (its sockets in /tmp), then lib.sh's cleanup with the exit code.
on_exit() {
    local rc=$?
    stop_seaweedfs
    (exit "$rc")
    cleanup
}
trap on_exit EXIT

# ------------------------------------------------------------------- set-up
setup_workdir regcache-e2e-shared
SUMMARY_LOGS=("$W/registry.log" "$W/private.log" "$W/s3/weed.log")

build_regcache

for h in "$HUB" "$PRIV"; do
    if getent hosts "$h" | grep -qE '^(127\.|::1)'; then
        fail "$h resolves to loopback on this machine; the clients must reach it only through the proxy"
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
blobs_of() { # blobs_of MANIFEST_DIGEST: its config and layer digests
    python3 - "$SEED" "$1" <<'PY'
import json, os, sys
seed, top = sys.argv[1:3]
m = json.load(open(os.path.join(seed, "blobs", *top.split(":", 1))))
print(" ".join([m["config"]["digest"]] + [l["digest"] for l in m["layers"]]))
PY
}
SMALL_BLOBS=$(blobs_of "$SMALL_DIGEST")
MULTI_BLOBS=$(blobs_of "$MULTI_HOST_DIGEST")
PRIV_BLOBS=$(blobs_of "$CONCURRENT_DIGEST")
# The multi image's blobs that the small one does not have (the others are
# already in the cache of every node that pulled the small one).
MULTI_NEW_BLOBS=$(for d in $MULTI_BLOBS; do [[ " $SMALL_BLOBS " == *" $d "* ]] || echo "$d"; done | tr '\n' ' ')

# ---------------------------------------------------------------- test PKI
PKI=$W/pki
if ! make_pki "$PKI" "$HUB" "DNS:$HUB,DNS:$PRIV"; then
    fail "openssl could not create the test PKI"
    show_last
    summary
fi

# ------------------------------------------------------------- the store
if ! start_seaweedfs "$W/s3" 2>"$W/logs/weed-start.log"; then
    fail "SeaweedFS started (S3 answers a signed ListBuckets)"
    indent <"$W/logs/weed-start.log"
    summary
fi
code=$(s3_curl "" --max-time 10 -o "$W/tmp/mb" -w '%{http_code}' -X PUT "$S3_ENDPOINT/$BUCKET")
if [ "$code" = 200 ]; then
    pass "SeaweedFS on $S3_ENDPOINT (ready after ${SEAWEEDFS_READY_MS} ms), bucket $BUCKET created"
else
    fail "create bucket $BUCKET: $code $(head -c 300 "$W/tmp/mb")"
    summary
fi
in_bucket() { # in_bucket DIGEST...: every object exists
    local d code
    for d in "$@"; do
        code=$(s3_curl "" --max-time 5 -o /dev/null -w '%{http_code}' -I \
            "$S3_ENDPOINT/$BUCKET/$PREFIX/blobs/sha256/${d#sha256:}")
        [ "$code" = 200 ] || return 1
    done
}

# ------------------------------------------------------------ registries
REGPORT=$(free_port)
start_registry "$W/registry" "127.0.0.1:$REGPORT" "$PKI"
PRIVPORT=$(free_port)
mkdir -p "$W/private"
htpasswd -Bbn "$ALICE" "$ALICE_PW" >"$W/private/htpasswd" 2>"$W/logs/htpasswd.log"
start_registry "$W/private" "127.0.0.1:$PRIVPORT" "$PKI" "auth:
  htpasswd:
    realm: regcache-e2e-shared
    path: $W/private/htpasswd" private
reg_up() { # reg_up HOST PORT [CURL_ARGS...]
    local host=$1 port=$2
    shift 2
    curl -fsS --noproxy '*' --max-time 3 --cacert "$PKI/ca.pem" --resolve "$host:$port:127.0.0.1" \
        "$@" "https://$host:$port/v2/"
}
if wait_until 30 "${PID_OF[registry]}" reg_up "$HUB" "$REGPORT" &&
    wait_until 30 "${PID_OF[private]}" reg_up "$PRIV" "$PRIVPORT" -u "$ALICE:$ALICE_PW"; then
    pass "docker-registry for $HUB on :$REGPORT and for $PRIV (htpasswd) on :$PRIVPORT"
else
    fail "the registries did not come up"
    summary
fi
seed_ok=1
for spec in "$REGPORT|$SMALL_REF|library/e2e-small|$SMALL_DIGEST|" \
    "$REGPORT|$MULTI_REF|library/e2e-multi|$MULTI_DIGEST|" \
    "$PRIVPORT|$CONCURRENT_REF|$PNAME|$CONCURRENT_DIGEST|$ALICE"; do
    IFS='|' read -r port ref repo digest who <<<"$spec"
    creds=()
    [ -n "$who" ] && creds=(--creds "$ALICE:$ALICE_PW")
    dcreds=()
    [ -n "$who" ] && dcreds=(--dest-creds "$ALICE:$ALICE_PW")
    if run "seed-${repo##*/}" 120 "${SKOPEO_DIRECT[@]}" copy --all --preserve-digests --dest-tls-verify=false \
        "${dcreds[@]}" "oci:$SEED:$ref" "docker://127.0.0.1:$port/$repo:1" &&
        capture "seed-check-${repo##*/}" 30 "$W/tmp/raw" "${SKOPEO_DIRECT[@]}" inspect --raw --tls-verify=false \
            "${creds[@]}" "docker://127.0.0.1:$port/$repo:1" &&
        [ "$(sha256_of <"$W/tmp/raw")" = "$digest" ]; then
        :
    else
        fail "seeding $repo:1"
        show_last
        seed_ok=0
    fi
done
[ "$seed_ok" = 1 ] || summary
pass "seeded library/e2e-small:1, library/e2e-multi:1 and $PRIV/$PNAME:1"

# ----------------------------------------------------------------- nodes
declare -A PORT_OF=() PEER_PORT_OF=()
CA_DIR=""
start_node() { # start_node NAME: a regcache node with a fresh cache dir, log $W/node-NAME.log
    local n=$1 port
    port=$(free_port)
    PORT_OF[$n]=$port
    mkdir -p "$W/node-$n/certs"
    # One CA for every node (A's), so that the clients trust one.
    [ -n "$CA_DIR" ] && cp -p "$CA_DIR/ca.crt" "$CA_DIR/ca.key" "$W/node-$n/certs/"
    PEER_PORT_OF[$n]=$(free_port)
    local args=(--listen "127.0.0.1:$port" --peer-listen "127.0.0.1:${PEER_PORT_OF[$n]}" --ca-dir "$W/node-$n/certs" --cache-dir "$W/node-$n/cache"
        --upstream-ca "$PKI/ca.pem" --intercept "$PRIV"
        --resolve "$HUB=127.0.0.1:$REGPORT" --resolve "$PRIV=127.0.0.1:$PRIVPORT"
        --shared-store "s3://$BUCKET/$PREFIX")
    # shellcheck disable=SC2206
    args+=(${REGCACHE_ARGS:-})
    start_bg "node-$n" "$W/node-$n.log" env -C "$W/node-$n" HOME="$W/node-$n" \
        XDG_CACHE_HOME="$W/node-$n/xdg-cache" XDG_CONFIG_HOME="$W/node-$n/xdg-config" \
        XDG_DATA_HOME="$W/node-$n/xdg-data" \
        AWS_ACCESS_KEY_ID="$S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET_KEY" \
        AWS_REGION="$S3_REGION" AWS_ENDPOINT_URL="$S3_ENDPOINT" \
        "$REGCACHE_BIN" serve "${args[@]}"
    SUMMARY_LOGS+=("$W/node-$n.log")
    PROXY=http://127.0.0.1:$port
    if ! wait_until 30 "${PID_OF[node-$n]}" proxy_up; then
        fail "node $n did not answer /healthz on 127.0.0.1:$port"
        summary
    fi
    [ -n "$CA_DIR" ] || CA_DIR=$W/node-$n/certs
}
start_node A
start_node B
start_node C
CLIENT_CERTS=$W/client-certs
if curl -fsS --noproxy '*' --max-time 10 -o "$CLIENT_CERTS/ca.crt" "http://127.0.0.1:${PORT_OF[C]}/ca.crt" &&
    cmp -s "$CLIENT_CERTS/ca.crt" "$CA_DIR/ca.crt"; then
    pass "nodes A, B, C up on ports ${PORT_OF[A]}, ${PORT_OF[B]}, ${PORT_OF[C]} with one CA"
else
    fail "node C does not serve A's CA"
    summary
fi

# pull NODE NAME SRC [CREDS]: skopeo copy of SRC (docker://...) through NODE
# into oci:$W/out/NAME; prints nothing, leaves the layout's digest in GOT.
pull() {
    local node=$1 name=$2 src=$3 cred=${4:-}
    PROXY=http://127.0.0.1:${PORT_OF[$node]}
    set_client_env
    local c=()
    [ -n "$cred" ] && c=(--src-creds "$cred")
    GOT=""
    run "pull-$name" 120 "${CLIENT_ENV[@]}" skopeo --policy "$W/policy.json" copy \
        --src-cert-dir "$CLIENT_CERTS" "${c[@]}" "$src" "oci:$W/out/$name:x" &&
        GOT=$(layout_digest "$W/out/$name")
}
# through NODE CURL_ARGS...: curl through NODE, trusting only regcache's CA.
through() {
    curl -sS --max-time 20 --proxy "http://127.0.0.1:${PORT_OF[$1]}" --cacert "$CLIENT_CERTS/ca.crt" "${@:2}"
}
# upstream_requests LOG MARK REPO: manifest/blob requests of REPO since MARK,
# after a moment for the access log to catch up.
upstream_requests() {
    sleep 0.5
    since "$1" "$2" | grep -E "\"(GET|HEAD) /v2/$3/(manifests|blobs)/" >"$W/tmp/upstream"
    UP_GETS=$(grep -c '"GET ' "$W/tmp/upstream")
    UP_HEADS=$(grep -c '"HEAD ' "$W/tmp/upstream")
}
# cache_of NODE MARK REPO KIND REF: the cache= of the last GET of
# /v2/REPO/KIND/REF in NODE's access log since MARK.
cache_of() {
    since "$W/node-$1.log" "$2" | grep 'regcache::access' | grep -F "path=/v2/$3/$4/$5 " |
        grep -E 'method="?GET' | tail -n1 | sed -n 's/.*cache="\{0,1\}\([A-Z_-]*\).*/\1/p'
}
# served_as NODE MARK WANT REPO TAG BLOBS...: every blob, and the manifest by
# TAG (unless TAG is -), logged with cache=WANT; sets BAD to what was not.
served_as() {
    local node=$1 m=$2 want=$3 repo=$4 tag=$5 d got
    shift 5
    BAD=""
    if [ "$tag" != - ]; then
        got=$(cache_of "$node" "$m" "$repo" manifests "$tag")
        [ "$got" = "$want" ] || BAD="$BAD manifest:$tag=${got:-none}"
    fi
    for d in "$@"; do
        got=$(cache_of "$node" "$m" "$repo" blobs "$d")
        [ "$got" = "$want" ] || BAD="$BAD ${d:7:12}=${got:-none}"
    done
    [ -z "$BAD" ]
}
SMALL=docker://$HUB/library/e2e-small:1
MULTI=docker://$HUB/library/e2e-multi:1
PRIVATE=docker://$PRIV/$PNAME:1

# ------------------------------------------------- 1. A fetches upstream
# shellcheck disable=SC2086
if pull A small-A "$SMALL"; then
    check_digest "1. skopeo through A pulls library/e2e-small:1" "$SMALL_DIGEST" "$GOT"
else
    fail "1. skopeo through A pull of library/e2e-small:1"
    show_last
fi
# shellcheck disable=SC2086
if wait_until 20 "" in_bucket "$SMALL_DIGEST" $SMALL_BLOBS; then
    pass "1. the bucket holds the manifest and every blob under $PREFIX/blobs/sha256/"
else
    fail "1. the bucket lacks objects of library/e2e-small:1 after 20 s"
fi

# ------------------------------------------------- 2. B and C from the tier
for n in B C; do
    reg_mark=$(mark "$W/registry.log")
    node_mark=$(mark "$W/node-$n.log")
    if pull "$n" "small-$n" "$SMALL"; then
        check_digest "2. skopeo through $n pulls library/e2e-small:1" "$SMALL_DIGEST" "$GOT"
    else
        fail "2. skopeo through $n pull of library/e2e-small:1"
        show_last
    fi
    upstream_requests "$W/registry.log" "$reg_mark" library/e2e-small
    if [ "$UP_GETS" = 0 ] && [ "$UP_HEADS" -gt 0 ]; then
        pass "2. $n's pull: the registry saw $UP_HEADS HEAD and no GET of a manifest or blob"
    else
        fail "2. $n's pull: the registry saw $UP_GETS GET and $UP_HEADS HEAD (expected HEADs only)"
        indent <"$W/tmp/upstream"
    fi
    # shellcheck disable=SC2086
    if served_as "$n" "$node_mark" SHARED library/e2e-small 1 $SMALL_BLOBS; then
        pass "2. $n's log says cache=SHARED for the manifest and every blob"
    else
        fail "2. $n's log, not cache=SHARED:$BAD"
    fi
done

# ------------------------------------------------- 3. private content
if pull A priv-A "$PRIVATE" "$ALICE:$ALICE_PW"; then
    check_digest "3. $ALICE pulls $PRIV/$PNAME:1 through A" "$CONCURRENT_DIGEST" "$GOT"
else
    fail "3. $ALICE's pull of $PRIV/$PNAME:1 through A"
    show_last
fi
# shellcheck disable=SC2086
if wait_until 30 "" in_bucket "$CONCURRENT_DIGEST" $PRIV_BLOBS; then
    pass "3. the bucket holds the private manifest and blobs"
else
    fail "3. the bucket lacks objects of $PNAME:1 after 30 s"
fi
node_mark=$(mark "$W/node-B.log")
bad=""
for path in "$PNAME/manifests/1" "$PNAME/manifests/$CONCURRENT_DIGEST" $(for d in $PRIV_BLOBS; do echo "$PNAME/blobs/$d"; done); do
    : >"$W/tmp/anon"
    code=$(through B -o "$W/tmp/anon" -w '%{http_code}' \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json' "https://$PRIV/v2/$path")
    [ "$code" = 401 ] || bad="$bad $path=$code"
    got=$(sha256_of <"$W/tmp/anon")
    if [ "$got" = "${path##*/}" ] || [ "$got" = "$CONCURRENT_DIGEST" ] || [ "$(wc -c <"$W/tmp/anon")" -gt 4096 ]; then
        bad="$bad $path:CONTENT-DELIVERED"
    fi
done
if [ -z "$bad" ]; then
    pass "3. through B without credentials: 401 for the manifest (tag, digest) and every blob, no content"
else
    fail "3. through B without credentials:$bad"
fi
if since "$W/node-B.log" "$node_mark" | grep 'regcache::access' | grep -F "path=/v2/$PNAME/" | grep -q 'cache="\?SHARED'; then
    fail "3. B logged cache=SHARED for an anonymous request of $PNAME"
fi
reg_mark=$(mark "$W/private.log")
node_mark=$(mark "$W/node-B.log")
if pull B priv-B "$PRIVATE" "$ALICE:$ALICE_PW"; then
    check_digest "3. $ALICE pulls $PRIV/$PNAME:1 through B" "$CONCURRENT_DIGEST" "$GOT"
else
    fail "3. $ALICE's pull of $PRIV/$PNAME:1 through B"
    show_last
fi
upstream_requests "$W/private.log" "$reg_mark" "$PNAME"
# shellcheck disable=SC2086
if served_as B "$node_mark" SHARED "$PNAME" 1 $PRIV_BLOBS && [ "$UP_GETS" = 0 ]; then
    pass "3. $ALICE through B: cache=SHARED for the manifest and every blob, $UP_HEADS HEAD and no GET upstream"
else
    fail "3. $ALICE through B: not SHARED:$BAD; $UP_GETS GET upstream"
    indent <"$W/tmp/upstream"
fi

# ------------------------------------------------- 4. peers: one cold blob, 90 clients
BIG=library/e2e-big
BIG_MIB=${E2E_PEER_MIB:-256}
BIG_CLIENTS=${E2E_PEER_CLIENTS:-30} # per node
mkdir -p "$W/big"
# The data straight to a file (never in bash's memory), then its digest.
head -c "$((BIG_MIB << 20))" /dev/urandom >"$W/big/blob"
BIG_DIGEST=sha256:$(sha256sum <"$W/big/blob" | cut -d' ' -f1)
# Pushed with the registry's upload API (POST, then PUT of the whole body
# with ?digest=), straight to the registry, not through a node.
reg_direct() {
    curl -sS --noproxy '*' --max-time 120 --cacert "$PKI/ca.pem" \
        --resolve "$HUB:$REGPORT:127.0.0.1" "$@"
}
loc=$(reg_direct -o /dev/null -D - -X POST "https://$HUB:$REGPORT/v2/$BIG/blobs/uploads/" |
    tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
[ "${loc:0:1}" = / ] && loc=https://$HUB:$REGPORT$loc
case $loc in *\?*) sep='&' ;; *) sep='?' ;; esac
code=$(reg_direct -o "$W/tmp/put" -w '%{http_code}' -X PUT -H 'Content-Type: application/octet-stream' \
    -T "$W/big/blob" "$loc${sep}digest=$BIG_DIGEST")
if [ "$code" = 201 ] && [ "$(reg_direct -o /dev/null -w '%{http_code}' -I "https://$HUB:$REGPORT/v2/$BIG/blobs/$BIG_DIGEST")" = 200 ]; then
    pass "4. pushed a $BIG_MIB MiB random blob ${BIG_DIGEST:0:19}… to $BIG"
    rm -f "$W/big/blob"
    # big_client NODE I: one client through NODE, its body's sha256 (never
    # written to disk) in $W/big/got-NODE-I, curl's status in rc-NODE-I.
    big_client() {
        curl -sS --max-time 150 --proxy "http://127.0.0.1:${PORT_OF[$1]}" --cacert "$CLIENT_CERTS/ca.crt" \
            "https://$HUB/v2/$BIG/blobs/$BIG_DIGEST" 2>"$W/big/err-$1-$2" |
            sha256sum | cut -d' ' -f1 >"$W/big/got-$1-$2"
        echo "${PIPESTATUS[0]}" >"$W/big/rc-$1-$2"
    }
    reg_mark=$(mark "$W/registry.log")
    declare -A big_mark=()
    for n in A B C; do big_mark[$n]=$(mark "$W/node-$n.log"); done
    t0=$SECONDS
    pids=()
    for i in $(seq 1 "$BIG_CLIENTS"); do
        for n in A B C; do
            big_client "$n" "$i" &
            pids+=($!)
        done
    done
    wait "${pids[@]}"
    secs=$((SECONDS - t0))
    bad=""
    right=0
    for n in A B C; do
        for i in $(seq 1 "$BIG_CLIENTS"); do
            got=$(cat "$W/big/got-$n-$i" 2>/dev/null)
            rc=$(cat "$W/big/rc-$n-$i" 2>/dev/null)
            if [ "sha256:$got" = "$BIG_DIGEST" ] && [ "$rc" = 0 ]; then
                right=$((right + 1))
            else
                bad="$bad $n$i(curl=$rc $(head -c 80 "$W/big/err-$n-$i" | tr '\n' ' '))"
            fi
        done
    done
    if [ -z "$bad" ]; then
        pass "4. $((3 * BIG_CLIENTS)) clients at once ($BIG_CLIENTS through each of A, B, C): every body has the blob's sha256 (${secs} s)"
    else
        fail "4. $right of $((3 * BIG_CLIENTS)) clients got the right bytes; wrong:${bad:0:1500}"
    fi
    sleep 0.5
    since "$W/registry.log" "$reg_mark" | grep -F "/v2/$BIG/blobs/$BIG_DIGEST" >"$W/tmp/upstream"
    big_gets=$(grep -c '"GET ' "$W/tmp/upstream")
    if [ "$big_gets" = 1 ]; then
        pass "4. the registry's access log shows exactly one GET of the blob ($(grep -c '"HEAD ' "$W/tmp/upstream") HEAD)"
    else
        fail "4. the registry's access log shows $big_gets GET of the blob (expected 1)"
        indent <"$W/tmp/upstream" | head -n 20
    fi
    # big_counts NODE: "MISS:1 PEER:29 ..." for the blob's GETs in NODE's log.
    big_counts() {
        since "$W/node-$1.log" "${big_mark[$1]}" | grep 'regcache::access' |
            grep -F "path=/v2/$BIG/blobs/$BIG_DIGEST " | grep -E 'method="?GET' |
            sed -n 's/.*cache="\{0,1\}\([A-Z_-]*\).*/\1/p' | sort | uniq -c |
            awk '{ printf "%s%s:%s", sep, $2, $1; sep = " " }'
    }
    fetcher=""
    for n in A B C; do
        counts=$(big_counts "$n")
        note "node $n: ${counts:-no access log line for the blob}"
        case " $counts " in *" MISS:"*) fetcher="$fetcher$n" ;; esac
    done
    if [ "${#fetcher}" = 1 ]; then
        pass "4. one node fetched the blob upstream (cache=MISS): $fetcher"
        # A node whose first client came only after the fetcher's upload
        # (a busy machine) reads the bucket instead (SHARED): that is right
        # too, but at least one of the two must have streamed from the peer.
        peered=""
        for n in A B C; do
            [ "$n" = "$fetcher" ] && continue
            counts=$(big_counts "$n")
            if [[ " $counts " == *" PEER:"* ]]; then
                peered="$peered$n"
                pass "4. $n (not the fetcher) served clients from $fetcher's peer endpoint: $counts"
            elif [[ " $counts " == *" SHARED:"* ]]; then
                note "$n (not the fetcher) read the blob from the bucket, after the upload: $counts"
            else
                fail "4. $n (not the fetcher) got the blob neither from the peer nor the bucket: ${counts:-nothing}"
            fi
        done
        [ -n "$peered" ] || fail "4. no node streamed the blob from $fetcher's peer endpoint (cache=PEER)"
        curl -fsS --noproxy '*' --max-time 10 -o "$W/tmp/metrics" "http://127.0.0.1:${PORT_OF[$fetcher]}/metrics"
        served=$(grep -E '^regcache_peer_requests_total\{' "$W/tmp/metrics" |
            grep -F 'role="served"' | grep -F 'result="ok"' | awk '{s += $NF} END {print s + 0}')
        if [ "$served" -ge 1 ]; then
            pass "4. $fetcher's /metrics: regcache_peer_requests_total{role=\"served\",result=\"ok\"} $served"
        else
            fail "4. $fetcher's /metrics: no regcache_peer_requests_total{role=\"served\",result=\"ok\"} >= 1"
            grep -F regcache_peer_requests_total "$W/tmp/metrics" | indent
        fi
    else
        fail "4. nodes that logged cache=MISS for the blob: '${fetcher}' (expected exactly one)"
    fi
else
    fail "4. push of the $BIG_MIB MiB blob to $BIG: PUT $code $(head -c 300 "$W/tmp/put")"
    rm -f "$W/big/blob"
fi

# ------------------------------------------------- 5. store down, then back
note "stopping SeaweedFS"
stop_seaweedfs
for n in B C; do
    node_mark=$(mark "$W/node-$n.log")
    if pull "$n" "small-$n-2" "$SMALL"; then
        check_digest "5. store down: skopeo through $n pulls library/e2e-small:1 again" "$SMALL_DIGEST" "$GOT"
    else
        fail "5. store down: skopeo through $n pull of library/e2e-small:1"
        show_last
    fi
    # The tag may be revalidated upstream; the blobs are the node's own.
    # shellcheck disable=SC2086
    if served_as "$n" "$node_mark" HIT library/e2e-small - $SMALL_BLOBS; then
        pass "5. store down: $n serves every blob from its own cache (cache=HIT; the tag: $(cache_of "$n" "$node_mark" library/e2e-small manifests 1))"
    else
        fail "5. store down: $n, not cache=HIT:$BAD"
    fi
done
start_node D
reg_mark=$(mark "$W/registry.log")
t0=$SECONDS
if pull D small-D "$SMALL"; then
    check_digest "5. store down: node D (empty cache) pulls library/e2e-small:1 in $((SECONDS - t0)) s" \
        "$SMALL_DIGEST" "$GOT"
else
    fail "5. store down: node D pull of library/e2e-small:1"
    show_last
fi
upstream_requests "$W/registry.log" "$reg_mark" library/e2e-small
# shellcheck disable=SC2086
if served_as D 0 MISS library/e2e-small 1 $SMALL_BLOBS && [ "$UP_GETS" -gt 0 ]; then
    pass "5. store down: D's log says cache=MISS for the manifest and every blob ($UP_GETS GET upstream)"
else
    fail "5. store down: D, not cache=MISS:$BAD; $UP_GETS GET upstream"
fi
sleep 0.5
down=$(grep -c 'shared store unreachable: going on without it' "$W/node-D.log")
if [ "$down" = 1 ]; then
    pass "5. store down: D logs \"shared store unreachable: going on without it\" once"
else
    fail "5. store down: D logs \"shared store unreachable\" $down times (expected once)"
fi

note "starting SeaweedFS again on the same directory"
if start_seaweedfs "$W/s3" 2>"$W/logs/weed-restart.log"; then
    pass "5. SeaweedFS restarted on the same directory (ready after ${SEAWEEDFS_READY_MS} ms)"
else
    fail "5. SeaweedFS restart"
    indent <"$W/logs/weed-restart.log"
    summary
fi
start_node E
if pull E small-E "$SMALL"; then
    check_digest "5. store back: node E (fresh) pulls library/e2e-small:1" "$SMALL_DIGEST" "$GOT"
else
    fail "5. store back: node E pull of library/e2e-small:1"
    show_last
fi
# shellcheck disable=SC2086
if served_as E 0 SHARED library/e2e-small 1 $SMALL_BLOBS; then
    pass "5. store back: E's log says cache=SHARED for the manifest and every blob"
else
    fail "5. store back: E, not cache=SHARED:$BAD"
fi
# Something new in the tier, read by B (never restarted) and D (which saw
# the store down).
if pull A multi-A "$MULTI"; then
    check_digest "5. store back: A pulls library/e2e-multi:1" "$MULTI_HOST_DIGEST" "$GOT"
else
    fail "5. store back: A pull of library/e2e-multi:1"
    show_last
fi
# shellcheck disable=SC2086
if wait_until 20 "" in_bucket "$MULTI_DIGEST" "$MULTI_HOST_DIGEST" $MULTI_BLOBS; then
    pass "5. store back: the bucket holds library/e2e-multi:1 (index, manifest, blobs) from A"
else
    fail "5. store back: the bucket lacks objects of library/e2e-multi:1 after 20 s"
fi
for n in B D; do
    reg_mark=$(mark "$W/registry.log")
    node_mark=$(mark "$W/node-$n.log")
    if pull "$n" "multi-$n" "$MULTI"; then
        check_digest "5. store back: $n pulls library/e2e-multi:1" "$MULTI_HOST_DIGEST" "$GOT"
    else
        fail "5. store back: $n pull of library/e2e-multi:1"
        show_last
    fi
    upstream_requests "$W/registry.log" "$reg_mark" library/e2e-multi
    # shellcheck disable=SC2086
    served_as "$n" "$node_mark" SHARED library/e2e-multi 1 $MULTI_NEW_BLOBS
    got=$(cache_of "$n" "$node_mark" library/e2e-multi manifests "$MULTI_HOST_DIGEST")
    [ "$got" = SHARED ] || BAD="$BAD manifest:${MULTI_HOST_DIGEST:7:12}=${got:-none}"
    if [ -z "$BAD" ] && [ "$UP_GETS" = 0 ]; then
        pass "5. store back: $n's log says cache=SHARED for the index, the manifest and every blob it lacked, no GET upstream"
    else
        fail "5. store back: $n, not cache=SHARED:$BAD; $UP_GETS GET upstream"
        indent <"$W/tmp/upstream"
    fi
done
if grep -q 'shared store answers again' "$W/node-D.log"; then
    pass "5. store back: D logs \"shared store answers again\""
else
    fail "5. store back: D never logged \"shared store answers again\""
fi

if grep -hE 'panicked at|stack backtrace' "$W"/node-*.log >"$W/tmp/panics"; then
    fail "a node logged a panic"
    head -n 5 "$W/tmp/panics" | indent
else
    pass "no panic in the nodes' logs"
fi

summary
