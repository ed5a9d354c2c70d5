#!/usr/bin/env bash
# End-to-end test of regcache with real parts.
#
#   upstream  Debian's docker-registry (distribution 2.8) serving TLS for
#             registry-1.docker.io with a throw-away test CA, on 127.0.0.1:<port>
#   proxy     regcache serve, --resolve registry-1.docker.io=127.0.0.1:<port>,
#             trusting the test CA for the upstream
#   clients   skopeo, containerd's ctr (against a private containerd) and a
#             private dockerd, all with HTTPS_PROXY=http://127.0.0.1:<proxy port>
#             and trusting only regcache's CA
#
# registry-1.docker.io is never made resolvable for the clients (no /etc/hosts
# change): they send CONNECT to the proxy and only regcache maps the name to
# loopback. Nothing leaves the machine.
#
# Usage:  tests/e2e/run.sh
# Environment:
#   REGCACHE_BIN        regcache binary (default: <repo>/target/debug/regcache,
#                       built with `cargo build` when REGCACHE_BIN is unset)
#   REGCACHE_ARGS       extra arguments for `regcache serve`
#   E2E_PROXY=tunnel    self-test the harness with tunnel_proxy.py (a plain
#                       CONNECT relay) instead of regcache
#   E2E_SKIP_DOCKERD=1  skip the dockerd part
#   E2E_REQUIRE_DOCKERD=1  a dockerd that does not start is a failure, not a skip
#   E2E_KEEP=1          keep the work directory (its path is printed)
#
# Prints PASS/FAIL/SKIP per check and ends with the line "N passed, M failed";
# the exit status is non-zero when anything failed.

# Functions called only through traps or wait_until look unreachable to it.
# shellcheck disable=SC2317
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
E2E_PROXY=${E2E_PROXY:-regcache}
HUB=registry-1.docker.io

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

# ------------------------------------------------------------------- set-up
setup_workdir regcache-e2e
SUMMARY_LOGS=("$W/regcache.log" "$W/regcache.restart.log" "$W/regcache-rules.log" "$W/registry.log")

# Build first, so that the clock of every later wait starts with a binary.
[ "$E2E_PROXY" = tunnel ] || build_regcache

# The host name must not resolve to loopback for the clients, or dockerd would
# treat the registry as insecure and skip verification (see tests/e2e/README.md).
if getent hosts "$HUB" | grep -qE '^(127\.|::1)'; then
    fail "$HUB resolves to loopback on this machine (/etc/hosts?); the dockerd check would prove nothing"
fi

# ----------------------------------------------------------------- the seed
SEED=$W/seed
if capture make-seed 60 "$W/seed.env" python3 "$HERE/make_seed.py" "$SEED" &&
    capture make-seed-again 60 "$W/seed2.env" python3 "$HERE/make_seed.py" "$W/seed2"; then
    # shellcheck disable=SC1091
    . "$W/seed.env"
    if cmp -s "$W/seed.env" "$W/seed2.env" && diff -r "$SEED" "$W/seed2" >/dev/null; then
        pass "seed image layout is reproducible (small $SMALL_DIGEST, multi $MULTI_DIGEST)"
    else
        fail "seed image layout differs between two runs"
        diff "$W/seed.env" "$W/seed2.env" | indent
    fi
    rm -rf "$W/seed2"
else
    fail "make_seed.py"
    show_last
    summary
fi

# ---------------------------------------------------------------- test PKI
note "creating the test CA and the $HUB server certificate"
PKI=$W/pki
if make_pki "$PKI" "$HUB" "DNS:$HUB"; then
    pass "test CA and $HUB server certificate created"
else
    fail "openssl could not create the test PKI"
    show_last
    summary
fi

# ---------------------------------------------------------------- upstream
REGPORT=$(free_port)
note "starting docker-registry on 127.0.0.1:$REGPORT"
start_registry "$W/registry" "127.0.0.1:$REGPORT" "$PKI"
registry_up() {
    curl -fsS --noproxy '*' --max-time 3 --cacert "$PKI/ca.pem" \
        --resolve "$HUB:$REGPORT:127.0.0.1" "https://$HUB:$REGPORT/v2/"
}
if wait_until 30 "${PID_OF[registry]}" registry_up; then
    pass "docker-registry serves TLS for $HUB on 127.0.0.1:$REGPORT"
else
    fail "docker-registry did not come up"
    summary
fi

note "seeding the upstream (directly, not through the proxy)"
UP=docker://127.0.0.1:$REGPORT/library
seed_ok=1
for pair in "$SMALL_REF:e2e-small:1:$SMALL_DIGEST" "$MULTI_REF:e2e-multi:1:$MULTI_DIGEST" \
    "$CONCURRENT_REF:e2e-concurrent:1:$CONCURRENT_DIGEST"; do
    IFS=: read -r ref repo tag digest <<<"$pair"
    if run "seed-$repo" 120 "${SKOPEO_DIRECT[@]}" copy --all --preserve-digests --dest-tls-verify=false \
        "oci:$SEED:$ref" "$UP/$repo:$tag" &&
        capture "seed-check-$repo" 30 "$W/tmp/raw" "${SKOPEO_DIRECT[@]}" inspect --raw --tls-verify=false "$UP/$repo:$tag" &&
        [ "$(sha256_of <"$W/tmp/raw")" = "$digest" ]; then
        pass "upstream seeded with library/$repo:$tag ($digest)"
    else
        fail "seeding library/$repo:$tag"
        show_last
        seed_ok=0
    fi
done
[ "$seed_ok" = 1 ] || summary

# ------------------------------------------------------------------- proxy
PROXYPORT=$(free_port)
PROXY=http://127.0.0.1:$PROXYPORT
mkdir -p "$W/regcache/certs"
REGCACHE_LOG=$W/regcache.log
TAG_TTL=""
if [ "$E2E_PROXY" = tunnel ]; then
    note "E2E_PROXY=tunnel: self-test with a plain CONNECT relay instead of regcache"
    start_bg regcache "$REGCACHE_LOG" python3 "$HERE/tunnel_proxy.py" --listen "127.0.0.1:$PROXYPORT" \
        --resolve "$HUB=127.0.0.1:$REGPORT" --ca-file "$PKI/ca.pem"
else
    if ! run regcache-help 30 "$REGCACHE_BIN" serve --help; then
        fail "$REGCACHE_BIN serve --help"
        show_last
        summary
    fi
    serve_args=(--listen "127.0.0.1:$PROXYPORT" --ca-dir "$W/regcache/certs"
        --upstream-ca "$PKI/ca.pem" --resolve "$HUB=127.0.0.1:$REGPORT")
    # Keep the cache inside the work directory when the binary has such a flag.
    if grep -q -- '--cache-dir' "$LAST_LOG"; then
        serve_args+=(--cache-dir "$W/regcache/cache")
    fi
    # A short tag TTL makes the later pulls revalidate tags with the live
    # upstream, and lets the test see a deleted tag and a stale tag.
    if grep -q -- '--tag-ttl' "$LAST_LOG"; then
        TAG_TTL=2
        serve_args+=(--tag-ttl "$TAG_TTL")
    fi
    # shellcheck disable=SC2206
    serve_args+=(${REGCACHE_ARGS:-})
    # Run it from inside the work directory, with HOME and XDG dirs there, so
    # that whatever it writes by default stays in the work directory.
    start_regcache() { # start_regcache LOGFILE
        start_bg regcache "$1" env -C "$W/regcache" HOME="$W/regcache" \
            XDG_CACHE_HOME="$W/regcache/xdg-cache" XDG_CONFIG_HOME="$W/regcache/xdg-config" \
            XDG_DATA_HOME="$W/regcache/xdg-data" RUST_LOG="${RUST_LOG:-info,regcache=debug}" \
            "$REGCACHE_BIN" serve "${serve_args[@]}"
    }
    note "starting regcache on 127.0.0.1:$PROXYPORT: $REGCACHE_BIN serve ${serve_args[*]}"
    start_regcache "$REGCACHE_LOG"
fi
if wait_until 30 "${PID_OF[regcache]}" proxy_up; then
    pass "$E2E_PROXY answers /healthz on 127.0.0.1:$PROXYPORT"
else
    fail "$E2E_PROXY did not answer /healthz within 30s"
    summary
fi

# The CA the clients trust: regcache's own, fetched over HTTP like a user would.
CLIENT_CA=$W/client-certs/ca.crt
if curl -fsS --noproxy '*' --max-time 10 -o "$CLIENT_CA" "$PROXY/ca.crt" &&
    openssl x509 -in "$CLIENT_CA" -noout 2>/dev/null; then
    if [ "$E2E_PROXY" = tunnel ]; then
        pass "GET /ca.crt serves a certificate"
    elif ! cmp -s "$CLIENT_CA" "$W/regcache/certs/ca.crt"; then
        fail "GET /ca.crt differs from --ca-dir/ca.crt"
    elif ! openssl x509 -in "$CLIENT_CA" -noout -text | grep 'CA:TRUE' >/dev/null; then
        fail "GET /ca.crt is not a CA certificate (no basicConstraints CA:TRUE)"
    else
        pass "GET /ca.crt serves the CA written to --ca-dir ($(openssl x509 -in "$CLIENT_CA" -noout -subject))"
    fi
else
    fail "GET /ca.crt did not return a PEM certificate"
    summary
fi
if [ "$E2E_PROXY" != tunnel ]; then
    perms=$(stat -c %a "$W/regcache/certs/ca.key" 2>/dev/null)
    if [ -z "$perms" ]; then
        fail "--ca-dir has no ca.key"
    elif [ $((8#$perms & 8#077)) -ne 0 ]; then
        fail "ca.key is readable by group/others (mode $perms)"
    else
        pass "ca.key exists with mode $perms"
    fi
fi

# Interception: through the proxy, $HUB must present a leaf signed by the
# regcache CA, not the upstream's certificate.
if [ "$E2E_PROXY" = tunnel ]; then
    skip "interception checks (tunnel self-test)"
else
    if run curl-intercept 30 curl -fsS --max-time 20 --proxy "$PROXY" --cacert "$CLIENT_CA" "https://$HUB/v2/"; then
        pass "CONNECT $HUB:443 is intercepted with a leaf signed by the regcache CA"
    else
        fail "curl through the proxy with the regcache CA: https://$HUB/v2/"
        show_last
    fi
    run curl-no-tunnel 30 curl -sS --max-time 20 --proxy "$PROXY" --cacert "$PKI/ca.pem" "https://$HUB/v2/"
    case $? in
    0) fail "the proxy relayed the upstream's own certificate (tunnel, not interception)" ;;
    60) pass "a client trusting only the upstream's CA is refused: the upstream's certificate is not relayed" ;;
    *)
        fail "curl trusting only the upstream CA failed, but not with a certificate error"
        show_last
        ;;
    esac
    if run openssl-leaf 30 sh -c "openssl s_client -proxy 127.0.0.1:$PROXYPORT -connect $HUB:443 \
            -servername $HUB -CAfile '$CLIENT_CA' -verify_return_error </dev/null 2>&1 |
            sed -n '/BEGIN CERT/,/END CERT/p' | openssl x509 -noout -ext subjectAltName" &&
        grep -q "DNS:$HUB" "$LAST_LOG"; then
        pass "leaf certificate names DNS:$HUB"
    else
        fail "leaf certificate for $HUB (SAN) via openssl s_client"
        show_last
    fi
    # Inside the $HUB tunnel the CA signs for $HUB only: another SNI, or one
    # that is not a DNS host name, gets a TLS alert and no certificate.
    sni_bad=""
    for sni in accounts.google.com localhost a_b.docker.io; do
        run "openssl-sni-$sni" 30 sh -c "openssl s_client -proxy 127.0.0.1:$PROXYPORT -connect $HUB:443 \
            -servername $sni -CAfile '$CLIENT_CA' </dev/null 2>&1" || true
        if grep -q 'BEGIN CERT' "$LAST_LOG" || ! grep -qiE 'unrecognized name|alert number 112' "$LAST_LOG"; then
            sni_bad="$sni_bad $sni"
        fi
    done
    if [ -z "$sni_bad" ]; then
        pass "in a CONNECT $HUB tunnel, other SNI names get an unrecognized_name alert, no certificate"
    else
        fail "SNI other than $HUB got a certificate or no unrecognized_name alert:$sni_bad"
        show_last
    fi
    # A manifest by tag through the proxy carries the seed digest.
    if run curl-manifest 30 curl -fsS --max-time 20 --proxy "$PROXY" --cacert "$CLIENT_CA" -o "$W/tmp/m.json" \
        -D "$W/tmp/m.headers" -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
        "https://$HUB/v2/library/e2e-small/manifests/1"; then
        hdr=$(tr -d '\r' <"$W/tmp/m.headers" | sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest: *//p' | tail -n1)
        body=$(sha256_of <"$W/tmp/m.json")
        if [ "$body" = "$SMALL_DIGEST" ] && { [ -z "$hdr" ] || [ "$hdr" = "$SMALL_DIGEST" ]; }; then
            pass "GET manifest by tag through the proxy: body digest ${hdr:+and Docker-Content-Digest }match the seed"
        else
            fail "GET manifest by tag: body $body, Docker-Content-Digest '$hdr', seed $SMALL_DIGEST"
        fi
    else
        fail "GET /v2/library/e2e-small/manifests/1 through the proxy"
        show_last
    fi

    # A 3 MiB blob, over HTTP/1.1 and over HTTP/2 (ALPN), then a range of it.
    blob_url=https://$HUB/v2/library/e2e-small/blobs/$PAYLOAD_DIGEST
    seed_blob=$SEED/blobs/sha256/${PAYLOAD_DIGEST#sha256:}
    for proto in http1.1 http2; do
        if [ "$proto" = http2 ] && ! curl -V | grep -w HTTP2 >/dev/null; then
            skip "blob over HTTP/2: this curl has no HTTP/2"
            continue
        fi
        if capture "curl-blob-$proto" 60 "$W/tmp/curl.out" curl -fsS --max-time 50 --proxy "$PROXY" \
            --cacert "$CLIENT_CA" "--$proto" -o "$W/tmp/blob" -w '%{http_version}' "$blob_url"; then
            got=$(sha256_of <"$W/tmp/blob")
            ver=$(cat "$W/tmp/curl.out")
            if [ "$got" != "$PAYLOAD_DIGEST" ]; then
                fail "GET blob over $proto: content digest $got, expected $PAYLOAD_DIGEST"
            elif [ "$proto" = http2 ] && [ "$ver" != 2 ]; then
                fail "GET blob over HTTP/2: ALPN did not select h2 (HTTP/$ver)"
            else
                pass "GET 3 MiB blob through the proxy over HTTP/$ver: content matches its digest"
            fi
        else
            fail "GET blob over $proto through the proxy"
            show_last
        fi
    done
    if capture curl-range 60 "$W/tmp/curl.out" curl -sS --max-time 50 --proxy "$PROXY" --cacert "$CLIENT_CA" \
        -r 100-1123 -o "$W/tmp/range" -w '%{http_code}' "$blob_url"; then
        code=$(cat "$W/tmp/curl.out")
        if [ "$code" = 206 ] && cmp -s "$W/tmp/range" <(tail -c +101 "$seed_blob" | head -c 1024); then
            pass "Range: bytes=100-1123 of a cached blob answers 206 with the right bytes"
        else
            fail "Range: bytes=100-1123 answered $code with $(wc -c <"$W/tmp/range") bytes"
        fi
    else
        fail "GET blob with Range through the proxy"
        show_last
    fi

    # Errors: an unknown tag is the upstream's 404; a malformed digest is
    # answered 400 with an OCI error body, whatever the upstream does
    # (docs/security.md, "Bad input gets a clear error").
    code=$(curl -sS --max-time 20 --proxy "$PROXY" --cacert "$CLIENT_CA" -o "$W/tmp/err" -w '%{http_code}' \
        "https://$HUB/v2/library/e2e-small/manifests/no-such-tag")
    if [ "$code" = 404 ]; then
        pass "unknown tag answers 404"
    else
        fail "unknown tag answered $code: $(head -c 300 "$W/tmp/err")"
    fi
    # A reference that is not a valid tag names no manifest: regcache answers
    # 404 MANIFEST_UNKNOWN itself (OCI distribution spec), as the registry does.
    bad=""
    long_tag=$(printf 't%.0s' $(seq 129))
    for ref in .hidden -x "$long_tag" 'a!b'; do
        for method in GET HEAD; do
            if [ "$method" = HEAD ]; then head=(-I); else head=(); fi
            direct=$(curl -sS --noproxy '*' --max-time 10 --cacert "$PKI/ca.pem" --resolve "$HUB:$REGPORT:127.0.0.1" \
                "${head[@]}" -o /dev/null -w '%{http_code}' "https://$HUB:$REGPORT/v2/library/e2e-small/manifests/$ref")
            got=$(curl -sS --max-time 20 --proxy "$PROXY" --cacert "$CLIENT_CA" "${head[@]}" -o "$W/tmp/err" \
                -w '%{http_code}' "https://$HUB/v2/library/e2e-small/manifests/$ref")
            if [ "$got" != 404 ] || [ "$got" != "$direct" ] ||
                { [ "$method" = GET ] && ! grep -q '"MANIFEST_UNKNOWN"' "$W/tmp/err"; }; then
                bad="$bad $method:${ref:0:10}=regcache:$got,registry:$direct"
            fi
        done
    done
    if [ -z "$bad" ]; then
        pass "references that are not valid tags answer 404 MANIFEST_UNKNOWN, as docker-registry does directly"
    else
        fail "references that are not valid tags:$bad"
    fi

    # A second regcache with a 2 s client_idle_timeout and a 5 MiB cache_size.
    P2PORT=$(free_port)
    P2=http://127.0.0.1:$P2PORT
    mkdir -p "$W/regcache2"
    start_bg regcache-idle "$W/regcache2.log" env -C "$W/regcache2" "$REGCACHE_BIN" serve \
        --listen "127.0.0.1:$P2PORT" --ca-dir "$W/regcache2/certs" --cache-dir "$W/regcache2/cache" \
        --upstream-ca "$PKI/ca.pem" --resolve "$HUB=127.0.0.1:$REGPORT" \
        --client-idle-timeout 2 --cache-size 5MiB
    p2_up() { curl -fsS --noproxy '*' --max-time 3 "$P2/healthz"; }
    if wait_until 30 "${PID_OF[regcache-idle]}" p2_up; then
        P2CA=$W/regcache2/certs/ca.crt
        P2CURL=(curl -sS --max-time 30 --proxy "$P2" --cacert "$P2CA")
        uploads=https://$HUB/v2/library/e2e-idle/blobs/uploads/
        # A push whose body stalls after one byte is cut after the timeout.
        "${P2CURL[@]}" -X POST -D "$W/tmp/up.headers" -o /dev/null "$uploads"
        loc=$(tr -d '\r' <"$W/tmp/up.headers" | sed -n 's/^[Ll]ocation: *//p' | tail -n1)
        case $loc in /*) loc=https://$HUB$loc ;; esac
        # A client that sends the head and one byte, then nothing, and reads
        # until regcache closes (curl blocks on its stdin and cannot show it).
        out=$(python3 - "$P2PORT" "$HUB" "$loc" "$P2CA" <<'PY'
import socket, ssl, sys, time
port, hub, loc, ca = sys.argv[1:5]
path = loc.split(hub, 1)[1] if loc.startswith("https://") else loc
s = socket.create_connection(("127.0.0.1", int(port)), timeout=20)
s.sendall(f"CONNECT {hub}:443 HTTP/1.1\r\nHost: {hub}:443\r\n\r\n".encode())
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1)
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["http/1.1"])
t = ctx.wrap_socket(s, server_hostname=hub)
t.sendall(f"PATCH {path} HTTP/1.1\r\nHost: {hub}\r\nContent-Type: application/octet-stream\r\n"
          f"Content-Length: 1000\r\n\r\nx".encode())
start, got = time.monotonic(), b""
try:
    while chunk := t.recv(4096):
        got += chunk
except (OSError, ssl.SSLError):
    pass
status = got.split(b" ", 2)[1].decode() if got.startswith(b"HTTP/") else "000"
print(status, int(time.monotonic() - start))
PY
        )
        code=${out%% *}
        took=${out#* }
        if [ -z "$loc" ]; then
            fail "client_idle_timeout: docker-registry gave no upload location"
        elif [ "$took" -lt 10 ] && [ "$code" != 202 ] && grep -q 'request body stalled' "$W/regcache2.log"; then
            pass "a push to docker-registry whose body stalls is cut after client_idle_timeout (${took}s, status $code)"
        else
            fail "stalled push: took ${took}s, status $code; log: $(grep -c 'request body stalled' "$W/regcache2.log") stall lines"
        fi
        # A normal push still works: a monolithic upload of a small blob.
        printf 'e2e idle push\n' >"$W/tmp/small.blob"
        small=$(sha256_of <"$W/tmp/small.blob")
        "${P2CURL[@]}" -X POST -D "$W/tmp/up2.headers" -o /dev/null "$uploads"
        loc=$(tr -d '\r' <"$W/tmp/up2.headers" | sed -n 's/^[Ll]ocation: *//p' | tail -n1)
        case $loc in /*) loc=https://$HUB$loc ;; esac
        case $loc in *\?*) sep='&' ;; *) sep='?' ;; esac
        code=$("${P2CURL[@]}" -X PUT -H 'Content-Type: application/octet-stream' --data-binary @"$W/tmp/small.blob" \
            -o /dev/null -w '%{http_code}' "$loc${sep}digest=$small")
        if [ "$code" = 201 ]; then
            pass "a normal push through regcache with client_idle_timeout = 2 s is accepted (201)"
        else
            fail "a normal push with client_idle_timeout = 2 s answered $code"
        fi
        # cache_size 5 MiB: a 6 MiB blob does not fit; it is streamed
        # uncached (and verified), a 3 MiB one is cached, the disk stays under
        # the cap. Both are pushed to docker-registry directly first.
        direct_push() { # direct_push FILE: the blob into library/e2e-idle
            local d loc sep
            d=$(sha256_of <"$1")
            loc=$(curl -sS --noproxy '*' --max-time 20 --cacert "$PKI/ca.pem" --resolve "$HUB:$REGPORT:127.0.0.1" \
                -X POST -D - -o /dev/null "https://$HUB:$REGPORT/v2/library/e2e-idle/blobs/uploads/" |
                tr -d '\r' | sed -n 's/^[Ll]ocation: *//p' | tail -n1)
            case $loc in /*) loc=https://$HUB:$REGPORT$loc ;; esac
            case $loc in *\?*) sep='&' ;; *) sep='?' ;; esac
            curl -fsS --noproxy '*' --max-time 60 --cacert "$PKI/ca.pem" --resolve "$HUB:$REGPORT:127.0.0.1" \
                -X PUT -H 'Content-Type: application/octet-stream' --data-binary @"$1" -o /dev/null "$loc${sep}digest=$d" &&
                echo "$d"
        }
        head -c $((6 * 1024 * 1024)) /dev/urandom >"$W/tmp/six.blob"
        head -c $((3 * 1024 * 1024)) /dev/urandom >"$W/tmp/three.blob"
        six=$(direct_push "$W/tmp/six.blob")
        three=$(direct_push "$W/tmp/three.blob")
        "${P2CURL[@]}" -o "$W/tmp/six.got" "https://$HUB/v2/library/e2e-idle/blobs/$six"
        "${P2CURL[@]}" -o "$W/tmp/three.got" "https://$HUB/v2/library/e2e-idle/blobs/$three"
        disk=$(find "$W/regcache2/cache/blobs" "$W/regcache2/cache/tmp" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
        if [ -n "$six" ] && [ -n "$three" ] && cmp -s "$W/tmp/six.blob" "$W/tmp/six.got" &&
            cmp -s "$W/tmp/three.blob" "$W/tmp/three.got" &&
            grep -q 'streaming the blob uncached' "$W/regcache2.log" &&
            [ "$disk" -ge $((3 * 1024 * 1024)) ] && [ "$disk" -le $((5 * 1024 * 1024)) ]; then
            pass "cache_size 5 MiB: a 6 MiB blob streams uncached and whole, a 3 MiB one is cached, $disk bytes on disk"
        else
            fail "cache_size 5 MiB: pushed '$six' '$three', $disk bytes on disk"
            grep -iE 'uncached|cache_size' "$W/regcache2.log" | tail -n 5 | indent
        fi
    else
        fail "a second regcache (client_idle_timeout, cache_size) did not start"
        tail -n 10 "$W/regcache2.log" | indent
    fi
    stop_named regcache-idle
    bad=""
    for path in manifests/sha256:0123 blobs/sha256:0123 blobs/sha256:XYZ; do
        code=$(curl -sS --max-time 20 --proxy "$PROXY" --cacert "$CLIENT_CA" -o "$W/tmp/err" -w '%{http_code}' \
            "https://$HUB/v2/library/e2e-small/$path")
        if [ "$code" != 400 ] || ! grep -q '"errors"' "$W/tmp/err"; then
            bad="$bad $path=$code($(head -c 120 "$W/tmp/err"))"
        fi
    done
    if [ -z "$bad" ]; then
        pass "malformed digests answer 400 with an OCI error body"
    else
        fail "malformed digests:$bad"
    fi
fi

# ------------------------------------------------------------------ skopeo
# Clients: proxy in their environment, an empty system trust store, and only
# the proxy's CA in their certificate directory.
set_client_env
SKOPEO=("${CLIENT_ENV[@]}" skopeo --policy "$W/policy.json")
HUBLIB=docker://$HUB/library

run skopeo-untrusted 60 "${SKOPEO[@]}" inspect --raw --cert-dir "$W/empty-certs" "$HUBLIB/e2e-small:1" || true
if grep -qiE 'x509|certificate' "$LAST_LOG" && ! grep -q '"schemaVersion"' "$LAST_LOG"; then
    pass "skopeo without the proxy CA is refused (certificate error): the system trust store is not used"
else
    fail "skopeo without the proxy CA did not fail with a certificate error"
    show_last
fi

skopeo_src=(--src-cert-dir "$W/client-certs")
if capture skopeo-inspect-small 60 "$W/tmp/raw" "${SKOPEO[@]}" inspect --raw --cert-dir "$W/client-certs" "$HUBLIB/e2e-small:1"; then
    check_digest "skopeo inspect --raw e2e-small:1 via proxy" "$SMALL_DIGEST" "$(sha256_of <"$W/tmp/raw")"
else
    fail "skopeo inspect --raw e2e-small:1 via proxy"
    show_last
fi
if run skopeo-copy-small 120 "${SKOPEO[@]}" copy "${skopeo_src[@]}" "$HUBLIB/e2e-small:1" "oci:$W/out/skopeo-small:x"; then
    check_digest "skopeo copy e2e-small:1 via proxy" "$SMALL_DIGEST" "$(layout_digest "$W/out/skopeo-small")"
else
    fail "skopeo copy e2e-small:1 via proxy"
    show_last
fi
if run skopeo-copy-multi 180 "${SKOPEO[@]}" copy --all "${skopeo_src[@]}" "$HUBLIB/e2e-multi:1" "oci:$W/out/skopeo-multi:x"; then
    check_digest "skopeo copy --all e2e-multi:1 via proxy (index)" "$MULTI_DIGEST" "$(layout_digest "$W/out/skopeo-multi")"
    # Every blob the seed index references, recursively, must be in the copy.
    missing=$(python3 - "$SEED" "$W/out/skopeo-multi" "$MULTI_DIGEST" <<'PY'
import json, os, sys
seed, out, top = sys.argv[1:4]
def blob(root, d): return os.path.join(root, "blobs", *d.split(":", 1))
need, todo = set(), [top]
while todo:
    d = todo.pop(); need.add(d)
    doc = json.load(open(blob(seed, d)))
    for m in doc.get("manifests", []): todo.append(m["digest"])
    if "config" in doc: need.add(doc["config"]["digest"])
    for l in doc.get("layers", []): need.add(l["digest"])
print(" ".join(sorted(d for d in need if not os.path.exists(blob(out, d)))))
PY
    )
    if [ -z "$missing" ]; then
        pass "skopeo copy --all fetched every platform's manifest, config and layers"
    else
        fail "skopeo copy --all is missing blobs: $missing"
    fi
else
    fail "skopeo copy --all e2e-multi:1 via proxy"
    show_last
fi

# ------------------------------------------------------------ image rules
# A regcache with the same CA (the clients trust it) and rules that allow
# library/e2e-small and deny everything else: skopeo prints the registry
# error regcache answers, naming the rule, by tag and by digest.
if [ "$E2E_PROXY" != tunnel ]; then
    RPORT=$(free_port)
    RP=http://127.0.0.1:$RPORT
    mkdir -p "$W/regcache-rules"
    printf '[[rules]]\nmatch = "library/e2e-small"\n[[rules]]\nmatch = "**"\naction = "deny"\n' \
        >"$W/regcache-rules/regcache.toml"
    start_bg regcache-rules "$W/regcache-rules.log" env -C "$W/regcache-rules" "$REGCACHE_BIN" serve \
        --config "$W/regcache-rules/regcache.toml" --listen "127.0.0.1:$RPORT" --ca-dir "$W/regcache/certs" \
        --cache-dir "$W/regcache-rules/cache" --upstream-ca "$PKI/ca.pem" --resolve "$HUB=127.0.0.1:$REGPORT"
    rules_up() { curl -fsS --noproxy '*' --max-time 3 "$RP/healthz"; }
    if wait_until 30 "${PID_OF[regcache-rules]}" rules_up; then
        SKOPEO_RULES=(env HTTPS_PROXY="$RP" https_proxy="$RP" HTTP_PROXY="$RP" http_proxy="$RP"
            SSL_CERT_FILE="$W/empty.pem" SSL_CERT_DIR="$W/empty-certs" "${ISOLATE_ENV[@]}"
            skopeo --policy "$W/policy.json")
        for ref in "e2e-multi:1" "e2e-multi@$MULTI_DIGEST"; do
            if run "rules-denied" 60 "${SKOPEO_RULES[@]}" inspect --raw --cert-dir "$W/client-certs" "$HUBLIB/$ref"; then
                fail "skopeo inspect $ref through a regcache whose rules deny it succeeded"
            elif grep -q 'docker.io/library/e2e-multi is denied by regcache: rule 2 (match = ..\*\*' "$LAST_LOG"; then
                pass "skopeo inspect $ref is denied with a message naming the repository and the rule"
            else
                fail "skopeo inspect $ref: no readable denial"
                show_last
            fi
        done
        # The manifest only: blobs fetched again here would count against the
        # one-upstream-fetch-per-blob check below.
        if capture rules-allowed 60 "$W/tmp/raw" "${SKOPEO_RULES[@]}" inspect --raw --cert-dir "$W/client-certs" \
            "$HUBLIB/e2e-small:1"; then
            check_digest "skopeo inspect e2e-small:1 through the rules regcache (allowed by rule 1)" "$SMALL_DIGEST" \
                "$(sha256_of <"$W/tmp/raw")"
        else
            fail "skopeo inspect e2e-small:1 through the rules regcache"
            show_last
        fi
        denials=$(curl -fsS --noproxy '*' --max-time 5 "$RP/metrics" |
            sed -n 's/^regcache_rule_denials_total{rule="2"} //p')
        if [ "${denials:-0}" -ge 2 ] && grep -q 'refused by an image rule' "$W/regcache-rules.log"; then
            pass "each denial is logged and counted (regcache_rule_denials_total{rule=\"2\"} $denials)"
        else
            fail "denials not counted or logged: '${denials}'"
        fi
    else
        fail "the regcache with image rules did not start"
        tail -n 10 "$W/regcache-rules.log" | indent
    fi
    stop_named regcache-rules
fi

# --------------------------------------------------------- OCI artifacts
# A Helm chart (an OCI artifact: Helm's config and layer media types) and a
# cosign-style signature tag (sha256-<hex>.sig) pushed to docker-registry
# directly with curl, then pulled through regcache with curl: cold (MISS),
# warm (HIT), the bytes as pushed.
if [ "$E2E_PROXY" != tunnel ]; then
    DIRECT=(curl -fsS --noproxy '*' --max-time 30 --cacert "$PKI/ca.pem" --resolve "$HUB:$REGPORT:127.0.0.1")
    REG=https://$HUB:$REGPORT
    push_blob() { # push_blob REPO FILE: monolithic upload; prints the digest
        local d loc sep
        d=$(sha256_of <"$2")
        loc=$("${DIRECT[@]}" -X POST -D - -o /dev/null "$REG/v2/$1/blobs/uploads/" |
            tr -d '\r' | sed -n 's/^[Ll]ocation: *//p' | tail -n1)
        case $loc in /*) loc=$REG$loc ;; esac
        case $loc in *\?*) sep='&' ;; *) sep='?' ;; esac
        "${DIRECT[@]}" -X PUT -H 'Content-Type: application/octet-stream' --data-binary @"$2" \
            -o /dev/null "$loc${sep}digest=$d" && echo "$d"
    }
    A=$W/artifact
    mkdir -p "$A"
    printf '{"name":"web","version":"1.2.3","apiVersion":"v2"}' >"$A/config.json"
    head -c 200000 /dev/urandom >"$A/chart.tgz"
    printf '{"critical":{"type":"cosign container image signature"}}' >"$A/sig.json"
    printf '{}' >"$A/empty.json"
    cfg=$(push_blob charts/web "$A/config.json")
    chart=$(push_blob charts/web "$A/chart.tgz")
    sigl=$(push_blob charts/web "$A/sig.json")
    empty=$(push_blob charts/web "$A/empty.json")
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.cncf.helm.chart.content.v1.tar+gzip","digest":"%s","size":%s}]}' \
        "$cfg" "$(stat -c %s "$A/config.json")" "$chart" 200000 >"$A/manifest.json"
    chart_m=$(sha256_of <"$A/manifest.json")
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"%s","size":2},"layers":[{"mediaType":"application/vnd.dev.cosign.simplesigning.v1+json","digest":"%s","size":%s,"annotations":{"dev.cosignproject.cosign/signature":"MEUCIQ"}}]}' \
        "$empty" "$sigl" "$(stat -c %s "$A/sig.json")" >"$A/sig-manifest.json"
    sig_tag=sha256-${chart_m#sha256:}.sig
    put_manifest() { # put_manifest REPO REF FILE
        "${DIRECT[@]}" -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
            --data-binary @"$3" -o /dev/null "$REG/v2/$1/manifests/$2"
    }
    if [ -n "$cfg" ] && [ -n "$chart" ] && [ -n "$sigl" ] && [ -n "$empty" ] &&
        put_manifest charts/web 1.2.3 "$A/manifest.json" && put_manifest charts/web "$sig_tag" "$A/sig-manifest.json"; then
        pass "a Helm chart and its cosign-style signature tag pushed to docker-registry with curl"
        VIA=(curl -sS --max-time 30 --proxy "$PROXY" --cacert "$CLIENT_CA"
            -H 'Accept: application/vnd.oci.image.manifest.v1+json')
        pull() { # pull WHAT PATH WANT_DIGEST: cold MISS, then warm HIT, both with the pushed bytes
            local round got cache ok=1 seen=""
            for round in MISS HIT; do
                "${VIA[@]}" -D "$A/h" -o "$A/body" "https://$HUB/v2/charts/web/$2"
                got=$(sha256_of <"$A/body")
                cache=$(tr -d '\r' <"$A/h" | sed -n 's/^[Xx]-[Cc]ache: *//p')
                seen="$seen $cache:${got:7:12}"
                { [ "$got" = "$3" ] && [ "$cache" = "$round" ]; } || ok=0
            done
            if [ "$ok" = 1 ]; then
                pass "$1 pulled through regcache cold (MISS) and warm (HIT), $3"
            else
                fail "$1 through regcache:$seen (want MISS then HIT of $3)"
            fi
        }
        pull "the chart's manifest" "manifests/1.2.3" "$chart_m"
        pull "the chart" "blobs/$chart" "$chart"
        pull "the signature tag $sig_tag" "manifests/$sig_tag" "$(sha256_of <"$A/sig-manifest.json")"
        pull "the signature payload" "blobs/$sigl" "$sigl"
        code=$("${VIA[@]}" -o /dev/null -w '%{http_code}' "https://$HUB/v2/charts/web/referrers/$chart_m")
        if [ "$code" = 404 ]; then
            pass "docker-registry 2.8 has no referrers API: its 404 is passed on (clients use the tag schema)"
        else
            fail "referrers through regcache against docker-registry 2.8 answered $code"
        fi
    else
        fail "pushing the Helm chart artifact to docker-registry"
    fi
fi

# ------------------------------------------------- concurrent first pulls
# Three clients pull an image nobody pulled before, at the same time.
note "three concurrent skopeo pulls of e2e-concurrent:1"
cpids=()
for i in 1 2 3; do
    timeout --kill-after=5 180 "${SKOPEO[@]}" copy "${skopeo_src[@]}" "$HUBLIB/e2e-concurrent:1" \
        "oci:$W/out/concurrent-$i:x" >"$W/logs/concurrent-$i.log" 2>&1 &
    cpids+=($!)
done
cfail=""
for i in 1 2 3; do
    wait "${cpids[$((i - 1))]}" || cfail="$cfail client$i(rc=$?)"
    got=$(layout_digest "$W/out/concurrent-$i")
    [ "$got" = "$CONCURRENT_DIGEST" ] || cfail="$cfail client$i(digest '$got')"
done
if [ -z "$cfail" ]; then
    pass "3 concurrent skopeo pulls of e2e-concurrent:1 all got $CONCURRENT_DIGEST"
else
    fail "concurrent pulls:$cfail"
    tail -n 5 "$W"/logs/concurrent-*.log | indent
fi
if [ "$E2E_PROXY" != tunnel ]; then
    n=$(grep -cE "\"GET /v2/[^ ]*/blobs/$CONCURRENT_LAYER_DIGEST HTTP/[0-9.]+\" 20[06]" "$W/registry.log")
    if [ "$n" = 1 ]; then
        pass "the concurrent pulls made one upstream fetch of the 8 MiB layer (single flight)"
    else
        fail "the concurrent pulls made $n upstream fetches of the 8 MiB layer (expected 1)"
    fi
fi

# -------------------------------------------------------------- containerd
note "starting a private containerd"
CTRD=$W/containerd
containerd_config "$CTRD" "$CTRD/root"
start_bg containerd "$W/containerd.log" containerd --config "$CTRD/config.toml"
CTR=(ctr -a "$CTRD/c.sock" -n e2e)
ctr_digest() { # ctr_digest REF: the digest containerd recorded for REF
    "${CTR[@]}" images ls 2>/dev/null | awk -v r="$1" '$1 == r {print $3}'
}
if wait_until 30 "${PID_OF[containerd]}" "${CTR[@]}" version; then
    pass "private containerd is up ($CTRD/c.sock)"
    if run ctr-untrusted 60 "${CLIENT_ENV[@]}" "${CTR[@]}" images pull --snapshotter native \
        docker.io/library/e2e-small:1; then
        fail "ctr pull without --tlscacert succeeded (should not trust the proxy)"
    elif grep -qiE 'x509|certificate' "$LAST_LOG"; then
        pass "ctr without the proxy CA is refused (certificate error)"
    else
        fail "ctr without the proxy CA failed, but not with a certificate error"
        show_last
    fi
    for pair in "e2e-small:$SMALL_DIGEST" "e2e-multi:$MULTI_DIGEST"; do
        repo=${pair%%:*}
        digest=${pair#*:}
        ref=docker.io/library/$repo:1
        if run "ctr-pull-$repo" 180 "${CLIENT_ENV[@]}" "${CTR[@]}" images pull --snapshotter native \
            --tlscacert "$CLIENT_CA" "$ref"; then
            check_digest "ctr pull $ref via proxy" "$digest" "$(ctr_digest "$ref")"
        else
            fail "ctr pull $ref via proxy"
            show_last
        fi
    done
    if "${CTR[@]}" content ls 2>/dev/null | grep "$MULTI_HOST_DIGEST" >/dev/null; then
        pass "ctr fetched the $SEED_ARCH manifest of the index ($MULTI_HOST_DIGEST)"
    else
        fail "ctr content store lacks the $SEED_ARCH manifest $MULTI_HOST_DIGEST"
    fi
else
    fail "private containerd did not start"
    tail -n 20 "$W/containerd.log" | indent
fi
stop_named containerd

# ------------------------------------------------------------------ dockerd
DOCKER_BIN=$(command -v /usr/bin/docker || command -v docker)
DK=$W/docker
DOCKER=(env DOCKER_CONFIG="$W/docker-cli" "$DOCKER_BIN" -H "unix://$DK/d.sock")
docker_repo_digest() {
    "${DOCKER[@]}" image inspect --format '{{index .RepoDigests 0}}' "$1" 2>/dev/null | sed 's/.*@//'
}
dockerd_skip_reason=""
if [ "${E2E_SKIP_DOCKERD:-0}" = 1 ]; then
    dockerd_skip_reason="E2E_SKIP_DOCKERD=1"
elif [ "$(id -u)" -ne 0 ]; then
    dockerd_skip_reason="not root; dockerd needs root"
elif ! command -v dockerd >/dev/null; then
    dockerd_skip_reason="no dockerd"
fi
if [ -n "$dockerd_skip_reason" ]; then
    skip "dockerd checks: $dockerd_skip_reason"
else
    note "starting a private dockerd"
    mkdir -p "$DK/data" "$DK/exec"
    # deprecated-key-path keeps dockerd 20.10 from creating /etc/docker/key.json.
    printf '{"deprecated-key-path": "%s"}\n' "$DK/key.json" >"$DK/daemon.json"
    # dockerd reads HTTPS_PROXY from its own environment. For docker.io it
    # verifies with the system pool only (/etc/docker/certs.d is not consulted
    # for the default registry), so the proxy CA goes in through SSL_CERT_FILE,
    # which Go reads as the system pool.
    start_bg dockerd "$W/dockerd.log" env HTTPS_PROXY="$PROXY" HTTP_PROXY="$PROXY" \
        SSL_CERT_FILE="$CLIENT_CA" SSL_CERT_DIR="$W/empty-certs" \
        dockerd --config-file "$DK/daemon.json" --data-root "$DK/data" --exec-root "$DK/exec" \
        --pidfile "$DK/docker.pid" -H "unix://$DK/d.sock" --iptables=false --ip6tables=false \
        --bridge=none --storage-driver=vfs
    if wait_until 60 "${PID_OF[dockerd]}" "${DOCKER[@]}" version; then
        pass "private dockerd is up ($DK/d.sock)"
        for pair in "e2e-small:$SMALL_DIGEST" "e2e-multi:$MULTI_DIGEST"; do
            repo=${pair%%:*}
            digest=${pair#*:}
            if run "docker-pull-$repo" 180 "${DOCKER[@]}" pull "$repo:1"; then
                check_digest "docker pull $repo:1 via proxy" "$digest" "$(docker_repo_digest "$repo:1")"
            else
                fail "docker pull $repo:1 via proxy"
                show_last
                tail -n 15 "$W/dockerd.log" | indent
            fi
        done
    else
        reason=$(grep -m1 -iE 'level=(fatal|error)|failed to start' "$W/dockerd.log")
        if [ "${E2E_REQUIRE_DOCKERD:-0}" = 1 ]; then
            fail "dockerd did not start: $reason"
        else
            skip "dockerd could not start on this machine: ${reason:-see log}"
        fi
        tail -n 20 "$W/dockerd.log" | indent
    fi
fi

# ------------------------------------------------------------ cache checks
if [ "$E2E_PROXY" = tunnel ]; then
    skip "cache checks (tunnel self-test)"
else
    # Every client above pulled the same blobs; the upstream should have been
    # asked for each blob at most once.
    twice=""
    for b in $BLOB_DIGESTS; do
        n=$(grep -cE "\"GET /v2/[^ ]*/blobs/$b HTTP/[0-9.]+\" 20[06]" "$W/registry.log")
        [ "$n" -gt 1 ] && twice="$twice ${b:7:12}=${n}x"
    done
    if [ -z "$twice" ]; then
        pass "upstream served each blob at most once across skopeo, ctr and dockerd"
    else
        fail "upstream served some blobs more than once:$twice"
    fi

    # A tag deleted upstream is gone through the proxy once its TTL is over.
    if [ -n "$TAG_TTL" ]; then
        code=$(curl -sS --noproxy '*' --max-time 10 --cacert "$PKI/ca.pem" --resolve "$HUB:$REGPORT:127.0.0.1" \
            -o /dev/null -w '%{http_code}' -X DELETE \
            "https://$HUB:$REGPORT/v2/library/e2e-concurrent/manifests/$CONCURRENT_DIGEST")
        sleep $((TAG_TTL + 1))
        got=$(curl -sS --max-time 20 --proxy "$PROXY" --cacert "$CLIENT_CA" -o "$W/tmp/err" -w '%{http_code}' \
            -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
            "https://$HUB/v2/library/e2e-concurrent/manifests/1")
        if [ "$code" != 202 ]; then
            fail "could not delete e2e-concurrent upstream (DELETE answered $code)"
        elif [ "$got" = 404 ]; then
            pass "a tag deleted upstream answers 404 through the proxy after its TTL (${TAG_TTL}s)"
        else
            fail "a tag deleted upstream still answers $got through the proxy after its TTL (${TAG_TTL}s)"
        fi
    fi

    # Bytes at rest: a layer file changed while regcache was stopped must not
    # be served as complete; the entry is dropped and fetched again.
    note "stopping regcache, flipping one byte in two cached layers, starting it again"
    cache_file() { echo "$W/regcache/cache/blobs/sha256/${1:7:2}/${1:7}"; }
    flip_middle() { # flip_middle FILE: xor one byte in the middle, in place
        python3 -c 'import os, sys
p = sys.argv[1]
with open(p, "r+b") as f:
    f.seek(os.path.getsize(p) // 2); b = f.read(1); f.seek(-1, 1); f.write(bytes([b[0] ^ 1]))' "$1"
    }
    layer_gets() { grep -cE "\"GET /v2/[^ ]*/blobs/$1 HTTP/[0-9.]+\" 20[06]" "$W/registry.log"; }
    stop_named regcache
    if flip_middle "$(cache_file "$PAYLOAD_DIGEST")" && flip_middle "$(cache_file "$CONCURRENT_LAYER_DIGEST")"; then
        before=$(layer_gets "$PAYLOAD_DIGEST")
        REGCACHE_LOG=$W/regcache.verify.log
        start_regcache "$REGCACHE_LOG"
        if wait_until 30 "${PID_OF[regcache]}" proxy_up; then
            # skopeo is the first reader of the damaged layer of e2e-small:1.
            ok=0
            for attempt in 1 2 3; do
                if run "verify-skopeo-small-$attempt" 120 "${SKOPEO[@]}" copy "${skopeo_src[@]}" \
                    "$HUBLIB/e2e-small:1" "oci:$W/out/verify-small-$attempt:x"; then
                    ok=1
                    break
                fi
                note "skopeo attempt $attempt failed: $(grep -m1 -iE 'fatal|error' "$LAST_LOG" | cut -c1-300)"
            done
            if [ "$ok" = 1 ]; then
                check_digest "skopeo copy e2e-small:1 with a layer changed on disk (succeeded on attempt $attempt)" \
                    "$SMALL_DIGEST" "$(layout_digest "$W/out/verify-small-$attempt")"
            else
                fail "skopeo copy e2e-small:1 with a layer changed on disk failed 3 times"
                show_last
            fi
            after=$(layer_gets "$PAYLOAD_DIGEST")
            if [ "$after" -gt "$before" ]; then
                pass "the registry log shows the damaged layer fetched again ($before -> $after GETs)"
            else
                fail "the damaged layer was not fetched again from the registry ($before -> $after GETs)"
            fi
            # A plain GET of the other damaged layer must not complete.
            curl -sS --max-time 30 --proxy "$PROXY" --cacert "$CLIENT_CA" -o "$W/tmp/damaged" \
                "https://$HUB/v2/library/e2e-concurrent/blobs/$CONCURRENT_LAYER_DIGEST" 2>"$W/tmp/curl.err"
            crc=$?
            if [ "$crc" != 0 ] && [ "$(sha256_of <"$W/tmp/damaged")" != "$CONCURRENT_LAYER_DIGEST" ]; then
                pass "curl GET of a layer changed on disk does not complete (exit $crc: $(head -c 100 "$W/tmp/curl.err" | tr '\n' ' '))"
            else
                fail "a layer changed on disk was served complete (curl exit $crc)"
            fi
            if grep -q 'does not match its digest' "$REGCACHE_LOG"; then
                pass "regcache logs the damaged entries (does not match its digest)"
            else
                fail "regcache did not log the damaged entries"
            fi
        else
            fail "regcache did not come back after the byte flips"
            tail -n 20 "$REGCACHE_LOG" | indent
        fi
    else
        fail "cannot flip a byte in the cached layers (not cached?)"
    fi

    note "stopping the upstream; pulls must now be served from the cache"
    stop_named registry
    if [ -n "$TAG_TTL" ]; then
        sleep $((TAG_TTL + 1))
        if curl -sS --max-time 20 --proxy "$PROXY" --cacert "$CLIENT_CA" -o "$W/tmp/m.json" -D "$W/tmp/m.headers" \
            -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
            "https://$HUB/v2/library/e2e-small/manifests/1" >/dev/null 2>&1 &&
            head -n1 "$W/tmp/m.headers" | grep ' 200' >/dev/null &&
            [ "$(sha256_of <"$W/tmp/m.json")" = "$SMALL_DIGEST" ]; then
            if grep -qi '^warning:' "$W/tmp/m.headers"; then
                pass "a stale tag is served from the cache with a Warning header when the upstream is down"
            else
                fail "a stale tag is served with the upstream down, but without a Warning header"
            fi
        else
            fail "a stale tag with the upstream down: $(head -n1 "$W/tmp/m.headers" 2>/dev/null | tr -d '\r')"
        fi
    fi
    if run offline-skopeo-small 120 "${SKOPEO[@]}" copy "${skopeo_src[@]}" "$HUBLIB/e2e-small:1" "oci:$W/out/offline-small:x"; then
        check_digest "skopeo copy e2e-small:1 with the upstream down" "$SMALL_DIGEST" "$(layout_digest "$W/out/offline-small")"
    else
        fail "skopeo copy e2e-small:1 with the upstream down"
        show_last
    fi
    if run offline-skopeo-multi 120 "${SKOPEO[@]}" copy --all "${skopeo_src[@]}" "$HUBLIB/e2e-multi@$MULTI_DIGEST" "oci:$W/out/offline-multi:x"; then
        check_digest "skopeo copy --all e2e-multi@digest with the upstream down" "$MULTI_DIGEST" "$(layout_digest "$W/out/offline-multi")"
    else
        fail "skopeo copy --all e2e-multi@digest with the upstream down"
        show_last
    fi
    if [ -n "${PID_OF[dockerd]:-}" ] && alive "${PID_OF[dockerd]}"; then
        if run docker-rmi 60 "${DOCKER[@]}" rmi e2e-small:1 &&
            run offline-docker-pull 120 "${DOCKER[@]}" pull e2e-small:1; then
            check_digest "docker pull e2e-small:1 with the upstream down" "$SMALL_DIGEST" "$(docker_repo_digest e2e-small:1)"
        else
            fail "docker pull e2e-small:1 with the upstream down"
            show_last
        fi
    fi

    # SIGTERM stops regcache gracefully; a restart keeps the CA and the cache.
    idx=""
    for i in "${!NAMES[@]}"; do [ "${NAMES[$i]}" = regcache ] && idx=$i; done
    pid=${PIDS[$idx]}
    kill -TERM "$pid"
    deadline=$((SECONDS + 15))
    while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    if alive "$pid"; then
        fail "regcache still running 15s after SIGTERM"
        stop_pid "$pid"
    else
        wait "$pid"
        rc=$?
        if [ "$rc" = 0 ]; then
            pass "regcache exits with status 0 on SIGTERM"
        else
            fail "regcache exited with status $rc on SIGTERM (expected a graceful exit, 0)"
        fi
    fi
    PIDS[idx]=""

    note "restarting regcache with the same directories (upstream still down)"
    REGCACHE_LOG=$W/regcache.restart.log
    start_regcache "$REGCACHE_LOG"
    if wait_until 30 "${PID_OF[regcache]}" proxy_up; then
        if curl -fsS --noproxy '*' --max-time 10 "$PROXY/ca.crt" | cmp -s - "$CLIENT_CA"; then
            pass "after a restart regcache serves the same CA"
        else
            fail "after a restart /ca.crt changed (the CA in --ca-dir was not reused)"
        fi
        # Straight HTTP first, so a failure below can be told apart from a
        # client-side step (like the /v2/ ping) failing.
        if curl -fsS --max-time 20 --proxy "$PROXY" --cacert "$CLIENT_CA" -o "$W/tmp/m.json" \
            -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
            "https://$HUB/v2/library/e2e-small/manifests/$SMALL_DIGEST" 2>"$W/tmp/curl.err" &&
            curl -fsS --max-time 20 --proxy "$PROXY" --cacert "$CLIENT_CA" -o "$W/tmp/blob" \
                "https://$HUB/v2/library/e2e-small/blobs/$PAYLOAD_DIGEST" 2>>"$W/tmp/curl.err" &&
            [ "$(sha256_of <"$W/tmp/m.json")" = "$SMALL_DIGEST" ] &&
            [ "$(sha256_of <"$W/tmp/blob")" = "$PAYLOAD_DIGEST" ]; then
            pass "after a restart, a manifest by digest and a blob are served from the cache (upstream down)"
        else
            fail "after a restart, GET manifest by digest / blob with the upstream down: $(head -c 300 "$W/tmp/curl.err")"
        fi
        code=$(curl -sS --max-time 20 --proxy "$PROXY" --cacert "$CLIENT_CA" -o /dev/null -w '%{http_code}' "https://$HUB/v2/")
        if [ "$code" = 200 ] || [ "$code" = 401 ]; then
            pass "GET /v2/ (the clients' API check) answers $code with the upstream down"
        else
            fail "GET /v2/ (the clients' API check) answers $code with the upstream down; skopeo, podman and buildah give up on it"
        fi
        if run restart-skopeo-small 120 "${SKOPEO[@]}" copy "${skopeo_src[@]}" "$HUBLIB/e2e-small@$SMALL_DIGEST" \
            "oci:$W/out/restart-small:x"; then
            check_digest "after a restart, e2e-small@digest comes from the cache (upstream down)" "$SMALL_DIGEST" \
                "$(layout_digest "$W/out/restart-small")"
        else
            fail "after a restart, skopeo copy e2e-small@digest with the upstream down"
            show_last
        fi
        if run restart-skopeo-multi 120 "${SKOPEO[@]}" copy --all "${skopeo_src[@]}" "$HUBLIB/e2e-multi:1" \
            "oci:$W/out/restart-multi:x"; then
            check_digest "after a restart, e2e-multi:1 (tag) comes from the cache (upstream down)" "$MULTI_DIGEST" \
                "$(layout_digest "$W/out/restart-multi")"
        else
            fail "after a restart, skopeo copy --all e2e-multi:1 with the upstream down"
            show_last
        fi
    else
        fail "regcache did not come back after a restart"
        tail -n 20 "$REGCACHE_LOG" | indent
    fi

    if grep -hE 'panicked at|stack backtrace' "$W"/regcache*.log >"$W/tmp/panics"; then
        fail "regcache logged a panic"
        head -n 5 "$W/tmp/panics" | indent
    else
        pass "no panic in the regcache logs"
    fi
fi

summary
