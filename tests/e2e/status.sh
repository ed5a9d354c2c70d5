#!/usr/bin/env bash
# End-to-end test of regcache's status page in a real browser.
#
#   upstream    Debian's docker-registry serving TLS for registry-1.docker.io
#               (test CA) on 127.0.0.1:<port>, seeded with library/e2e-small:1
#   proxy       regcache serve on 127.0.0.1:<port>
#   client      skopeo, pulling e2e-small:1 twice (cold, then warm)
#   browser     Debian's chromium, headless, loading http://127.0.0.1:<port>/
#               only: no proxy, a host resolver that maps every name but
#               loopback to nothing, background networking off, a user-data
#               directory in the work directory
#
# Checks: curl still gets the one-line hint at /; the DOM Chromium dumps
# shows the hit ratio (50.0% today and since start: every request of the
# cold pull a miss, of the warm pull a hit), the upstream docker.io "up",
# e2e-small among the most requested images, and no script; a screenshot
# at 420x900 (a narrow window) is a PNG of that size, kept as
# $W/status.png and copied to target/e2e-artifacts/status.png.
#
# Usage:  tests/e2e/status.sh   (run under flock /tmp/regcache-e2e.lock)
# Environment: REGCACHE_BIN, E2E_KEEP=1 as for run.sh.
# Prints PASS/FAIL/SKIP per check and ends with "N passed, M failed".

# Functions called only through wait_until look unreachable to it.
# shellcheck disable=SC2317
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
HUB=registry-1.docker.io

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

setup_workdir regcache-e2e-status
SUMMARY_LOGS=("$W/regcache.log" "$W/registry.log")
build_regcache

if ! command -v chromium >/dev/null 2>&1; then
    fail "chromium not found (tests/e2e/install-deps.sh installs Debian's chromium)"
    summary
fi

# ------------------------------------------------------ seed and upstream
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
if ! make_pki "$PKI" "$HUB" "DNS:$HUB"; then
    fail "openssl could not create the test PKI"
    show_last
    summary
fi
REGPORT=$(free_port)
start_registry "$W/registry" "127.0.0.1:$REGPORT" "$PKI"
registry_up() {
    curl -fsS --noproxy '*' --max-time 3 --cacert "$PKI/ca.pem" \
        --resolve "$HUB:$REGPORT:127.0.0.1" "https://$HUB:$REGPORT/v2/"
}
if ! wait_until 30 "${PID_OF[registry]}" registry_up; then
    fail "docker-registry did not come up"
    summary
fi
if run seed-small 120 "${SKOPEO_DIRECT[@]}" copy --all --preserve-digests --dest-tls-verify=false \
    "oci:$SEED:$SMALL_REF" "docker://127.0.0.1:$REGPORT/library/e2e-small:1"; then
    pass "upstream seeded with library/e2e-small:1"
else
    fail "seeding library/e2e-small:1"
    show_last
    summary
fi

# ------------------------------------------------------------------ proxy
PROXYPORT=$(free_port)
PROXY=http://127.0.0.1:$PROXYPORT
mkdir -p "$W/regcache/certs"
start_bg regcache "$W/regcache.log" env -C "$W/regcache" HOME="$W/regcache" \
    XDG_CACHE_HOME="$W/regcache/xdg-cache" XDG_CONFIG_HOME="$W/regcache/xdg-config" \
    XDG_DATA_HOME="$W/regcache/xdg-data" RUST_LOG="${RUST_LOG:-info}" \
    "$REGCACHE_BIN" serve --listen "127.0.0.1:$PROXYPORT" --ca-dir "$W/regcache/certs" \
    --cache-dir "$W/regcache/cache" --upstream-ca "$PKI/ca.pem" --resolve "$HUB=127.0.0.1:$REGPORT"
if wait_until 30 "${PID_OF[regcache]}" proxy_up; then
    pass "regcache answers /healthz on $PROXY"
else
    fail "regcache did not serve /healthz within 30s"
    summary
fi

# curl is not a browser: the hint, as before.
if capture curl-root 10 "$W/root.txt" curl -sS --noproxy '*' --max-time 5 "$PROXY/" &&
    grep -q 'regcache is a proxy' "$W/root.txt" && ! grep -q '<html' "$W/root.txt"; then
    pass "curl $PROXY/ gets the one-line hint"
else
    fail "curl $PROXY/: $(head -c 200 "$W/root.txt")"
fi

# ---------------------------------------------------------------- traffic
CLIENT_CA=$W/client-certs/ca.crt
if ! curl -fsS --noproxy '*' --max-time 10 -o "$CLIENT_CA" "$PROXY/ca.crt"; then
    fail "GET /ca.crt"
    summary
fi
set_client_env
SKOPEO=("${CLIENT_ENV[@]}" skopeo --policy "$W/policy.json")
pull() {
    if run "skopeo-copy-$1" 120 "${SKOPEO[@]}" copy --src-cert-dir "$W/client-certs" \
        "docker://$HUB/library/e2e-small:1" "oci:$W/out/$1:x"; then
        check_digest "skopeo copy e2e-small:1 via regcache ($1)" "$SMALL_DIGEST" "$(layout_digest "$W/out/$1")"
    else
        fail "skopeo copy e2e-small:1 via regcache ($1)"
        show_last
    fi
}
pull cold
pull warm

# ---------------------------------------------------------------- browser
# Loopback only: no proxy, every other name resolves to nothing, no
# background requests (updates, safe browsing, field trials).
CHROMIUM=(chromium --headless=new --no-sandbox --disable-gpu --no-proxy-server
    --user-data-dir="$W/chromium-profile" --no-first-run --no-default-browser-check
    --disable-background-networking --disable-component-update --disable-sync
    --disable-default-apps --disable-extensions --disable-breakpad --metrics-recording-only
    --host-resolver-rules="MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
# page_ok: the DOM shows the numbers of the two pulls (requests are counted
# when their response ends, a moment after skopeo read it).
page_ok() {
    capture chromium-dump-dom 60 "$W/status.html" "${CHROMIUM[@]}" --dump-dom "$PROXY/" &&
        grep -q 'id="hit-ratio-today">50.0%<' "$W/status.html" &&
        grep -q 'id="hit-ratio-start">50.0%<' "$W/status.html" &&
        grep -q '<td class="host">docker.io</td><td class="up">up</td>' "$W/status.html" &&
        grep -q 'docker.io/library/e2e-small</td>' "$W/status.html"
}
if wait_until 60 "" page_ok; then
    pass "chromium --dump-dom $PROXY/: hit ratio 50.0% today and since start, upstream docker.io up, e2e-small most requested"
else
    fail "chromium --dump-dom $PROXY/ does not show the hit ratio, the upstream's state and the image"
    show_last
    grep -o 'id="hit-ratio-[a-z]*">[^<]*<\|<td class="name">[^<]*</td><td class="[a-z]*">[a-z]*</td>' "$W/status.html" | indent
fi
if grep -q '<title>regcache status</title>' "$W/status.html" && ! grep -qi '<script' "$W/status.html"; then
    pass "the page chromium rendered is regcache's status page, with no script"
else
    fail "the dumped DOM is not the status page, or has a script"
fi

# A narrow window: 420 px wide.
rm -f "$W/status.png"
if run chromium-screenshot 60 "${CHROMIUM[@]}" --screenshot="$W/status.png" --window-size=420,900 \
    --hide-scrollbars "$PROXY/" &&
    size=$(python3 -c '
import struct, sys
b = open(sys.argv[1], "rb").read(24)
assert b[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
print("%dx%d" % struct.unpack(">II", b[16:24]))' "$W/status.png") && [ "$size" = 420x900 ]; then
    mkdir -p "$REPO/target/e2e-artifacts"
    cp "$W/status.png" "$REPO/target/e2e-artifacts/status.png"
    pass "chromium --screenshot --window-size=420,900: a 420x900 PNG, kept as target/e2e-artifacts/status.png"
else
    fail "chromium --screenshot at 420x900 (${size:-no PNG})"
    show_last
fi

summary
