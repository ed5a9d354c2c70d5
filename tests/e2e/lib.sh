# shellcheck shell=bash
# Shared helpers of the end-to-end scripts (run.sh, auth.sh, mirror.sh, shared.sh, ...).
# Sourced, not run: it defines functions and variables, installs the EXIT
# trap that stops every daemon started with start_bg, and clears the proxy
# variables of the environment. Nothing here starts anything.
#
#   pass/fail/skip/note     one line per check; counted for summary
#   run/capture             a command under a timeout, output to a step log
#   wait_until              poll with a deadline (and a process to watch)
#   start_bg/stop_named     daemons in their own session, stopped on exit
#   setup_workdir PREFIX    the work directory $W with an isolated client env
#   build_regcache          cargo build unless REGCACHE_BIN is set
#   make_pki DIR CN SAN     a test CA and a server certificate
#   containerd_config DIR ROOT   a private containerd's config.toml
#   summary                 logs on failure, "N passed, M failed", exit
#
# The scripts set SUMMARY_LOGS (log files shown when something failed)
# before calling summary.

# Functions called only through traps or wait_until look unreachable to it;
# variables set here are used by the scripts that source it.
# shellcheck disable=SC2317,SC2034
E2E_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Nothing in the environment may route our loopback traffic elsewhere.
unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY

PASSED=0
FAILED=0
SKIPPED=0
STEP=0
LAST_LOG=/dev/null
SUMMARY_LOGS=()
pass() { PASSED=$((PASSED + 1)); echo "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL: $*"; }
skip() { SKIPPED=$((SKIPPED + 1)); echo "SKIP: $*"; }
note() { echo "---- $*"; }
indent() { sed 's/^/    | /'; }
show_last() { tail -n 15 "$LAST_LOG" | indent; }

# run NAME SECONDS CMD...: run CMD under a timeout, stdout+stderr to a step log.
run() {
    local name=$1 secs=$2
    shift 2
    STEP=$((STEP + 1))
    LAST_LOG=$W/logs/$(printf '%02d' "$STEP")-$name.log
    printf '+ %q ' "$@" >"$LAST_LOG"
    echo >>"$LAST_LOG"
    timeout --foreground --kill-after=5 "$secs" "$@" >>"$LAST_LOG" 2>&1
}

# capture NAME SECONDS OUTFILE CMD...: like run, but stdout goes to OUTFILE.
capture() {
    local name=$1 secs=$2 out=$3
    shift 3
    STEP=$((STEP + 1))
    LAST_LOG=$W/logs/$(printf '%02d' "$STEP")-$name.log
    printf '+ %q ' "$@" >"$LAST_LOG"
    echo >>"$LAST_LOG"
    timeout --foreground --kill-after=5 "$secs" "$@" >"$out" 2>>"$LAST_LOG"
}

# check_digest WHAT EXPECTED ACTUAL
check_digest() {
    if [ -n "$3" ] && [ "$2" = "$3" ]; then
        pass "$1 ($3)"
    else
        fail "$1: expected $2, got '${3}'"
        show_last
    fi
}

# wait_until SECONDS PID CMD...: poll CMD until it succeeds; give up after
# SECONDS or as soon as process PID (when not empty) has exited.
wait_until() {
    local secs=$1 pid=$2
    shift 2
    local deadline=$((SECONDS + secs))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if "$@" >/dev/null 2>&1; then return 0; fi
        if [ -n "$pid" ] && ! alive "$pid"; then return 1; fi
        sleep 0.3
    done
    return 1
}

alive() { # running and not a zombie (read from /proc: procps may be absent)
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ -n "$stat" ] && [ "${stat:0:1}" != Z ] && [ "${stat:0:1}" != X ]
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

sha256_of() { echo "sha256:$(sha256sum | cut -d' ' -f1)"; }

layout_digest() { # first manifest digest in an OCI layout's index.json
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]+"/index.json"))["manifests"][0]["digest"])' "$1" 2>/dev/null
}

# Marks in the logs, to look only at what a step added.
mark() { wc -l <"$1"; }
since() { tail -n +"$(($2 + 1))" "$1" | sed 's/\x1b\[[0-9;]*m//g'; }

# ---------------------------------------------------------------- processes
# Every daemon runs in its own session (setsid) so that stopping it also
# stops its children (dockerd's containerd). Stopped newest first.
PIDS=()
NAMES=()
declare -A PID_OF=()
start_bg() { # start_bg NAME LOGFILE CMD...
    local name=$1 logf=$2
    shift 2
    setsid "$@" >"$logf" 2>&1 </dev/null &
    local pid=$!
    PIDS+=("$pid")
    NAMES+=("$name")
    PID_OF[$name]=$pid
}

stop_pid() {
    local pid=$1 i
    if ! alive "$pid"; then
        kill -KILL -- "-$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        return 0
    fi
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 50); do
        alive "$pid" || break
        sleep 0.2
    done
    if alive "$pid"; then
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
    fi
    # Anything left in its process group goes too; the leader is not reaped
    # yet, so the group id cannot have been reused.
    kill -KILL -- "-$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return 0
}

stop_named() { # stop_named NAME: stop one daemon started with start_bg
    local i
    for i in "${!NAMES[@]}"; do
        if [ "${NAMES[$i]}" = "$1" ] && [ -n "${PIDS[$i]}" ]; then
            stop_pid "${PIDS[$i]}"
            PIDS[i]=""
        fi
    done
}

cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    # Clients still running in the background (run.sh's concurrent pulls)
    # first: timeout passes the TERM on to its command.
    local daemons=" ${PIDS[*]} " job
    for job in $(jobs -p); do
        [[ $daemons == *" $job "* ]] || kill -TERM "$job" 2>/dev/null
    done
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        [ -n "${PIDS[$i]}" ] && stop_pid "${PIDS[$i]}"
    done
    if [ -n "${W:-}" ] && [ -d "$W" ]; then
        # dockerd or containerd may leave mounts behind if they were killed.
        grep -F " $W/" /proc/mounts 2>/dev/null | awk '{print $2}' | sort -r | while read -r m; do
            umount -l "$m" 2>/dev/null
        done
        if [ "${E2E_KEEP:-0}" = 1 ]; then
            echo "work directory kept: $W"
        else
            rm -rf "$W"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------- set-up
# setup_workdir PREFIX: installs missing packages, creates the work directory
# $W (/tmp/PREFIX.XXXXXX) and the isolated environment of the clients:
# ISOLATE_ENV (HOME, XDG dirs, registries.conf, auth file, TMPDIR in $W) and
# SKOPEO_DIRECT (skopeo with it, accepting any image).
setup_workdir() {
    bash "$E2E_LIB_DIR/install-deps.sh" || { echo "FAIL: install-deps.sh"; echo "0 passed, 1 failed"; exit 1; }
    PATH=$PATH:/usr/sbin:/sbin
    W=$(mktemp -d "/tmp/$1.XXXXXX")
    mkdir -p "$W/logs" "$W/tmp" "$W/out" "$W/empty-certs" "$W/client-certs" "$W/docker-cli" "$W/home" \
        "$W/xdg-data" "$W/xdg-config" "$W/xdg-run"
    chmod 700 "$W/xdg-run"
    : >"$W/empty.pem"
    : >"$W/registries.conf"
    echo '{"auths":{}}' >"$W/auth.json"
    echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$W/policy.json"
    note "work directory $W"
    # containers/image keeps a blob-info cache in /var/lib/containers/cache for
    # root; the rootless code path (chosen by _CONTAINERS_ROOTLESS_UID) keeps it
    # under XDG_DATA_HOME instead, so every run starts clean and leaves no trace.
    ISOLATE_ENV=(HOME="$W/home" XDG_DATA_HOME="$W/xdg-data" XDG_CONFIG_HOME="$W/xdg-config"
        XDG_RUNTIME_DIR="$W/xdg-run" _CONTAINERS_ROOTLESS_UID=4242
        CONTAINERS_REGISTRIES_CONF="$W/registries.conf" REGISTRY_AUTH_FILE="$W/auth.json"
        DOCKER_CONFIG="$W/docker-cli" TMPDIR="$W/tmp")
    SKOPEO_DIRECT=(env "${ISOLATE_ENV[@]}" skopeo --policy "$W/policy.json")
}

# summary: on failure, the last lines of every SUMMARY_LOGS file; then the
# counts, and exit (non-zero when anything failed).
summary() {
    local f
    if [ "$FAILED" -gt 0 ]; then
        for f in "${SUMMARY_LOGS[@]}"; do
            [ -s "$f" ] || continue
            echo "==== last lines of $(basename "$f")"
            sed 's/\x1b\[[0-9;]*m//g' "$f" | grep -v 'msg="response completed"' | tail -n 40 | cut -c1-400 | indent
        done
    fi
    [ "$SKIPPED" -gt 0 ] && echo "$SKIPPED skipped"
    echo "elapsed ${SECONDS}s"
    echo "$PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]
    exit
}

# build_regcache: with REGCACHE_BIN unset, `cargo build` the repository's
# binary (a failure ends the run) and point REGCACHE_BIN at it.
build_regcache() {
    [ -n "${REGCACHE_BIN:-}" ] && return 0
    local repo
    repo=$(cd "$E2E_LIB_DIR/../.." && pwd)
    note "building regcache (cargo build)"
    if ! (cd "$repo" && cargo build >"$W/logs/cargo-build.log" 2>&1); then
        fail "cargo build"
        tail -n 30 "$W/logs/cargo-build.log" | indent
        summary
    fi
    REGCACHE_BIN=$repo/target/debug/regcache
}

# make_pki DIR CN SAN [CA_CN]: a throw-away CA (DIR/ca.pem, ca.key) and a
# server certificate for CN (DIR/server.pem, server.key) with subjectAltName
# SAN (e.g. "DNS:host,IP:127.0.0.1"), valid two days. Logged as step "pki".
make_pki() {
    local dir=$1 cn=$2 san=$3 ca_cn=${4:-regcache e2e upstream test CA}
    mkdir -p "$dir"
    cat >"$dir/server.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EOF
    run pki 60 sh -c "
        set -e
        cd '$dir'
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout ca.key -out ca.pem -days 2 -subj '/CN=$ca_cn' \
            -addext 'basicConstraints=critical,CA:TRUE' -addext 'keyUsage=critical,keyCertSign,cRLSign'
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout server.key -out server.csr -subj '/CN=$cn'
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -out server.pem -days 2 -extfile server.ext
        openssl verify -CAfile ca.pem server.pem
    "
}

# proxy_up: regcache at $PROXY answers /healthz (for wait_until).
proxy_up() { curl -fsS --noproxy '*' --max-time 3 "$PROXY/healthz"; }

# set_client_env: CLIENT_ENV, the env prefix of a client under test: every
# proxy variable pointing at $PROXY, no system CA (each command is given the
# trust it needs), and the isolated home and XDG directories.
set_client_env() {
    CLIENT_ENV=(env HTTPS_PROXY="$PROXY" https_proxy="$PROXY" HTTP_PROXY="$PROXY" http_proxy="$PROXY"
        SSL_CERT_FILE="$W/empty.pem" SSL_CERT_DIR="$W/empty-certs" "${ISOLATE_ENV[@]}")
}

# start_registry DIR ADDR PKI [EXTRA_YAML] [NAME]: Debian's docker-registry
# serving TLS (PKI/server.pem, server.key) on ADDR, filesystem storage under
# DIR/data, config DIR/config.yml, log $W/NAME.log; EXTRA_YAML is appended as
# top-level configuration (an auth: section, say). Started as daemon NAME
# ("registry" unless given: a second instance needs another).
start_registry() {
    local dir=$1 addr=$2 pki=$3 extra=${4:-} name=${5:-registry}
    mkdir -p "$dir/data"
    cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: $addr
  secret: regcache-e2e-not-a-secret
  tls:
    certificate: $pki/server.pem
    key: $pki/server.key
  headers:
    X-Content-Type-Options: [nosniff]
$extra
EOF
    start_bg "$name" "$W/$name.log" docker-registry serve "$dir/config.yml"
}

# containerd_config DIR ROOT: DIR/config.toml for a private containerd with
# its content and metadata under ROOT, its state and sockets under DIR
# (grpc socket DIR/c.sock), the CRI plugin and every snapshotter but native
# disabled.
containerd_config() {
    local dir=$1 root=$2
    mkdir -p "$dir"
    cat >"$dir/config.toml" <<EOF
version = 2
root = "$root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.overlayfs"]
[grpc]
  address = "$dir/c.sock"
[ttrpc]
  address = "$dir/c.sock.ttrpc"
[debug]
  address = "$dir/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/opt"
EOF
}
