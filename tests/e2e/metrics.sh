#!/usr/bin/env bash
# End-to-end test of regcache's metrics with a real Prometheus.
#
#   upstream    Debian's docker-registry serving TLS for registry-1.docker.io
#               (test CA) on 127.0.0.1:<port>, seeded with library/e2e-small:1
#   proxy       regcache serve --metrics-listen 127.0.0.1:<port>
#   prometheus  Debian's prometheus on 127.0.0.1:<port> only, its storage in
#               the work directory, scraping regcache every second with the
#               job of deploy/prometheus/scrape-config.yml and loading
#               deploy/prometheus/alerts.yml
#   client      skopeo, pulling e2e-small:1 twice (cold, then warm)
#
# Checks: the scrape target is up; Prometheus' HTTP API returns
# regcache_requests_total with the counts the two pulls make (every blob a
# miss, then a hit) and the bytes served from the cache; every expression of
# deploy/grafana/regcache.json is accepted by Prometheus and the main panels
# have data; every metric name the dashboard and the alert rules use is in
# the live exposition; the alert rules load and evaluate; `promtool check
# metrics` passes on /metrics, served on --metrics-listen and on the proxy
# port.
#
# Usage:  tests/e2e/metrics.sh   (run under flock /tmp/regcache-e2e.lock)
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

setup_workdir regcache-e2e-metrics
SUMMARY_LOGS=("$W/regcache.log" "$W/prometheus.log" "$W/registry.log")
build_regcache

for cmd in prometheus promtool; do
    if ! command -v "$cmd" >/dev/null 2>&1; then
        fail "$cmd not found (tests/e2e/install-deps.sh installs Debian's prometheus)"
        summary
    fi
done
if ! run regcache-help 30 "$REGCACHE_BIN" serve --help || ! grep -q -- '--metrics-listen' "$LAST_LOG"; then
    fail "$REGCACHE_BIN serve has no --metrics-listen"
    show_last
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
# The blobs of e2e-small (config and layers), their count and total size.
read -r N_BLOBS BLOB_BYTES < <(python3 -c '
import json, sys
root, digest = sys.argv[1], sys.argv[2]
m = json.load(open(root + "/blobs/" + digest.replace(":", "/", 1)))
blobs = [m["config"]] + m["layers"]
print(len(blobs), sum(b["size"] for b in blobs))' "$SEED" "$SMALL_DIGEST")
if [ -z "${N_BLOBS:-}" ]; then
    fail "reading e2e-small's manifest from the seed"
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
    pass "upstream seeded with library/e2e-small:1 ($N_BLOBS blobs, $BLOB_BYTES bytes)"
else
    fail "seeding library/e2e-small:1"
    show_last
    summary
fi

# ------------------------------------------------------------------ proxy
PROXYPORT=$(free_port)
MPORT=$(free_port)
PROXY=http://127.0.0.1:$PROXYPORT
METRICS=http://127.0.0.1:$MPORT/metrics
mkdir -p "$W/regcache/certs"
serve_args=(--listen "127.0.0.1:$PROXYPORT" --metrics-listen "127.0.0.1:$MPORT" --ca-dir "$W/regcache/certs"
    --upstream-ca "$PKI/ca.pem" --resolve "$HUB=127.0.0.1:$REGPORT")
grep -q -- '--cache-dir' "$W/logs/"*regcache-help.log && serve_args+=(--cache-dir "$W/regcache/cache")
start_bg regcache "$W/regcache.log" env -C "$W/regcache" HOME="$W/regcache" \
    XDG_CACHE_HOME="$W/regcache/xdg-cache" XDG_CONFIG_HOME="$W/regcache/xdg-config" \
    XDG_DATA_HOME="$W/regcache/xdg-data" RUST_LOG="${RUST_LOG:-info}" \
    "$REGCACHE_BIN" serve "${serve_args[@]}"
metrics_up() { curl -fsS --noproxy '*' --max-time 3 -o /dev/null "$METRICS"; }
if wait_until 30 "${PID_OF[regcache]}" proxy_up && wait_until 10 "${PID_OF[regcache]}" metrics_up; then
    pass "regcache answers /healthz on $PROXY and /metrics on 127.0.0.1:$MPORT"
else
    fail "regcache did not serve /healthz and --metrics-listen /metrics within 30s"
    summary
fi

# ------------------------------------------------------------- prometheus
PROMPORT=$(free_port)
PROM=http://127.0.0.1:$PROMPORT
mkdir -p "$W/prometheus/data"
# The job of deploy/prometheus/scrape-config.yml, pointed at regcache's
# metrics address, scraped every second.
sed -e "s|\"localhost:3128\"|\"127.0.0.1:$MPORT\"|" -e 's|scrape_interval: 30s|scrape_interval: 1s|' \
    -e 's|scrape_timeout: 10s|scrape_timeout: 1s|' "$REPO/deploy/prometheus/scrape-config.yml" >"$W/prometheus/prometheus.yml"
printf 'global:\n  evaluation_interval: 1s\nrule_files:\n  - %s\n' "$REPO/deploy/prometheus/alerts.yml" >>"$W/prometheus/prometheus.yml"
if ! grep -q "127.0.0.1:$MPORT" "$W/prometheus/prometheus.yml" || ! grep -q 'scrape_interval: 1s' "$W/prometheus/prometheus.yml"; then
    fail "deploy/prometheus/scrape-config.yml no longer has the target and interval this script rewrites"
    summary
fi
if ! run promtool-check-config 30 promtool check config "$W/prometheus/prometheus.yml"; then
    fail "promtool check config on the e2e Prometheus config"
    show_last
    summary
fi
start_bg prometheus "$W/prometheus.log" prometheus --config.file="$W/prometheus/prometheus.yml" \
    --storage.tsdb.path="$W/prometheus/data" --web.listen-address="127.0.0.1:$PROMPORT" \
    --storage.tsdb.retention.time=1h --log.level=info
prom_up() { curl -fsS --noproxy '*' --max-time 3 "$PROM/-/ready"; }
if wait_until 60 "${PID_OF[prometheus]}" prom_up; then
    pass "prometheus ready on 127.0.0.1:$PROMPORT"
else
    fail "prometheus did not become ready within 60s"
    summary
fi
# It listens on loopback only: no socket of its process on another address.
listening=$(python3 - "${PID_OF[prometheus]}" <<'PY'
import os, sys
pid = sys.argv[1]
inodes = set()
for fd in os.listdir(f"/proc/{pid}/fd"):
    try:
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        continue
    if link.startswith("socket:["):
        inodes.add(link[8:-1])
for table in ("tcp", "tcp6"):
    for line in open(f"/proc/{pid}/net/{table}").readlines()[1:]:
        f = line.split()
        if f[3] == "0A" and f[9] in inodes:  # LISTEN
            print(f[1])
PY
)
if [ -n "$listening" ] && ! grep -qv '^0100007F:' <<<"$listening"; then
    pass "prometheus listens on 127.0.0.1 only ($(tr '\n' ' ' <<<"$listening"))"
else
    fail "prometheus listens beyond loopback: $listening"
fi

# query EXPR: the JSON answer of an instant query (to $W/tmp/q.json).
query() {
    curl -fsS --noproxy '*' --max-time 10 -o "$W/tmp/q.json" --data-urlencode "query=$1" "$PROM/api/v1/query"
}
# value EXPR: the first sample's value of an instant query, or nothing.
value() {
    query "$1" && python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["data"]["result"]
print(r[0]["value"][1] if r else "")' "$W/tmp/q.json"
}
# wait_value SECONDS EXPR WANT: poll until EXPR's value is WANT.
is_value() { [ "$(value "$1")" = "$2" ]; }
wait_value() { wait_until "$1" "${PID_OF[prometheus]}" is_value "$2" "$3"; }

if wait_value 30 'up{job="regcache"}' 1; then
    pass "prometheus scrapes regcache (up{job=\"regcache\"} == 1)"
else
    fail "the regcache target is not up"
    curl -fsS --noproxy '*' --max-time 10 "$PROM/api/v1/targets" | head -c 1500 | indent
    summary
fi

# ---------------------------------------------------------------- traffic
CLIENT_CA=$W/client-certs/ca.crt
if ! curl -fsS --noproxy '*' --max-time 10 -o "$CLIENT_CA" "$PROXY/ca.crt"; then
    fail "GET /ca.crt"
    summary
fi
set_client_env
SKOPEO=("${CLIENT_ENV[@]}" skopeo --policy "$W/policy.json")
# pull NAME: skopeo copy e2e-small:1 through regcache into a new layout.
pull() {
    if run "skopeo-copy-$1" 120 "${SKOPEO[@]}" copy --src-cert-dir "$W/client-certs" \
        "docker://$HUB/library/e2e-small:1" "oci:$W/out/$1:x"; then
        check_digest "skopeo copy e2e-small:1 via regcache ($1)" "$SMALL_DIGEST" "$(layout_digest "$W/out/$1")"
    else
        fail "skopeo copy e2e-small:1 via regcache ($1)"
        show_last
    fi
}
# blobs_are MISSES HITS: Prometheus has these blob request counts.
blob='regcache_requests_total{job="regcache",kind="blob"'
blobs_are() {
    if wait_value 20 "sum($blob,result=\"miss\"})" "$1" && wait_value 5 "sum($blob,result=\"hit\"})" "$2"; then
        pass "prometheus: regcache_requests_total{kind=\"blob\"}: $1 misses, $2 hits"
    else
        fail "prometheus: regcache_requests_total{kind=\"blob\"}: want $1 misses and $2 hits"
        query "sum by (kind, result) (regcache_requests_total)" && indent <"$W/tmp/q.json"
    fi
}

# The blobs: each a miss on the cold pull, a hit on each warm one. The
# second warm pull comes after Prometheus has seen the first, so that the
# hits rise within its samples (increase() on the dashboard counts only
# rises it sees; a series is born at its first value).
pull cold
pull warm
blobs_are "$N_BLOBS" "$N_BLOBS"
pull warm-again
blobs_are "$N_BLOBS" $((2 * N_BLOBS))
manifests=$(value 'sum(regcache_requests_total{job="regcache",kind="manifest"})')
if [ -n "$manifests" ] && [ "$manifests" -ge 3 ] 2>/dev/null; then
    pass "prometheus: regcache_requests_total{kind=\"manifest\"} counts the three pulls' manifests ($manifests)"
else
    fail "prometheus: regcache_requests_total{kind=\"manifest\"} is '$manifests', want 3 or more"
fi
# Bytes saved: the warm pulls' blobs (and manifests, served from the cache).
saved=$(value 'sum(regcache_served_bytes_total{job="regcache",source="cache"})')
if [ -n "$saved" ] && [ "$saved" -ge $((2 * BLOB_BYTES)) ] 2>/dev/null; then
    pass "prometheus: regcache_served_bytes_total{source=\"cache\"} $saved >= twice the image's $BLOB_BYTES blob bytes"
else
    fail "prometheus: regcache_served_bytes_total{source=\"cache\"} is '$saved', want >= 2 x $BLOB_BYTES"
fi
# The same counts in regcache's own exposition (what Prometheus stored is
# what regcache said).
if capture scrape 10 "$W/metrics.txt" curl -fsS --noproxy '*' --max-time 5 "$METRICS" &&
    python3 - "$W/metrics.txt" "$N_BLOBS" <<'PY'; then
import re, sys
text, n = open(sys.argv[1]).read(), int(sys.argv[2])
got = {}
for line in text.splitlines():
    m = re.match(r'regcache_requests_total\{(.*)\} (\S+)$', line)
    if m and 'kind="blob"' in m.group(1):
        r = re.search(r'result="(\w+)"', m.group(1)).group(1)
        got[r] = got.get(r, 0) + float(m.group(2))
sys.exit(0 if got.get("miss") == n and got.get("hit") == 2 * n else f"blob requests {got}")
PY
    pass "GET /metrics: regcache_requests_total{kind=\"blob\"} $N_BLOBS misses and $((2 * N_BLOBS)) hits"
else
    fail "GET /metrics does not show $N_BLOBS blob misses and $((2 * N_BLOBS)) hits"
fi

# ------------------------------------------------------------- exposition
if run promtool-check-metrics 30 sh -c "promtool check metrics <'$W/metrics.txt'"; then
    pass "promtool check metrics on --metrics-listen /metrics"
else
    fail "promtool check metrics on --metrics-listen /metrics"
    show_last
fi
if capture scrape-proxy-port 10 "$W/metrics-proxy.txt" curl -fsS --noproxy '*' --max-time 5 "$PROXY/metrics" &&
    grep -q '^regcache_requests_total{' "$W/metrics-proxy.txt" &&
    run promtool-check-metrics-proxy 30 sh -c "promtool check metrics <'$W/metrics-proxy.txt'"; then
    pass "GET /metrics on the proxy port (loopback client) passes promtool check metrics"
else
    fail "GET /metrics on the proxy port"
    show_last
fi

# ---------------------------------------------------- dashboard and alerts
# Families with no sample yet (no 429, no refusal, no failed fill in this
# run) are absent from the exposition: those names come from src/metrics.rs.
CHECK=(python3 "$REPO/tests/deploy/check.py")
if "${CHECK[@]}" names-scrape "$W/metrics.txt" >"$W/names-live.txt" &&
    "${CHECK[@]}" names-source "$REPO/src/metrics.rs" >"$W/names-source.txt"; then
    sort -u "$W/names-live.txt" "$W/names-source.txt" >"$W/names.txt"
    only_source=$(comm -13 <(sort -u "$W/names-live.txt") <(sort -u "$W/names-source.txt") | tr '\n' ' ')
    only_live=$(comm -23 <(sort -u "$W/names-live.txt") <(sort -u "$W/names-source.txt") | tr '\n' ' ')
    if [ -n "$only_live" ]; then
        fail "src/metrics.rs, as tests/deploy/check.py reads it, misses exposed names: $only_live"
    else
        pass "tests/deploy/check.py reads every exposed name from src/metrics.rs"
    fi
    if run dashboard-live-names 30 "${CHECK[@]}" dashboard "$REPO/deploy/grafana/regcache.json" "$W/names.txt" "$W/tmp/rules.yml" &&
        run alerts-live-names 30 "${CHECK[@]}" names-in "$REPO/deploy/prometheus/alerts.yml" "$W/names.txt"; then
        pass "every metric the dashboard and the alert rules name is in the live /metrics (or not yet sampled: $only_source)"
    else
        fail "the dashboard or the alert rules name metrics regcache does not expose"
        show_last
    fi
else
    fail "reading the metric names of the live /metrics and of src/metrics.rs"
fi

# Every expression of the dashboard, as Grafana would send it (variables
# substituted): accepted by Prometheus; the main panels have data.
sleep 2 # a few more samples after the last pull, for rate() and increase()
"${CHECK[@]}" exprs "$REPO/deploy/grafana/regcache.json" >"$W/exprs.jsonl"
bad=""
empty=""
n=0
while IFS= read -r line; do
    n=$((n + 1))
    title=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["title"])' "$line")
    expr=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["expr"])' "$line")
    if ! query "$expr" || ! grep -q '"status":"success"' "$W/tmp/q.json"; then
        bad="$bad [$title]"
        continue
    fi
    case "$title" in
    "Hit ratio" | "Bytes saved" | "Cache fill" | "Upstreams" | "Request duration" | "Upstream latency" | "Requests by result" | "Version")
        if grep -q '"result":\[\]' "$W/tmp/q.json" || grep -q '"NaN"' "$W/tmp/q.json"; then
            empty="$empty [$title: $expr]"
        fi
        ;;
    esac
done <"$W/exprs.jsonl"
if [ "$n" -gt 0 ] && [ -z "$bad" ]; then
    pass "prometheus accepts all $n expressions of deploy/grafana/regcache.json"
else
    fail "prometheus rejects dashboard expressions:$bad"
fi
if [ -z "$empty" ]; then
    pass "the dashboard's main panels (hit ratio, bytes saved, cache fill, upstreams, latencies, version) have data"
else
    fail "dashboard panels without data after two pulls:$empty"
fi
# Since start: two of every three requests for the image were cached (the
# blobs and the manifest: a miss, then two hits).
ratio=$(value 'sum(regcache_requests_total{result=~"hit|coalesced|stale|revalidated"}) / sum(regcache_requests_total{result=~"hit|coalesced|stale|revalidated|miss|error"})')
if python3 -c 'import sys; sys.exit(0 if abs(float(sys.argv[1]) - 2 / 3) < 1e-9 else 1)' "${ratio:-x}" 2>/dev/null; then
    pass "hit ratio after a cold and two warm pulls is 2/3 ($ratio)"
else
    fail "hit ratio after a cold and two warm pulls is '$ratio', want 2/3"
fi

# The alert rules load and evaluate against the live series; none fires.
rules_ok() {
    curl -fsS --noproxy '*' --max-time 5 "$PROM/api/v1/rules" | python3 -c '
import json, sys
rules = [r for g in json.load(sys.stdin)["data"]["groups"] for r in g["rules"]]
ok = [r for r in rules if r.get("health") == "ok"]
firing = [r["name"] for r in rules if r.get("state") == "firing"]
print(len(rules), len(ok), firing)
sys.exit(0 if rules and len(ok) == len(rules) and not firing else 1)'
}
if wait_until 15 "${PID_OF[prometheus]}" rules_ok; then
    pass "prometheus loaded deploy/prometheus/alerts.yml: $(rules_ok | cut -d' ' -f1) rules, all evaluated, none firing"
else
    fail "alert rules in prometheus: $(rules_ok) (rules, evaluated ok, firing)"
fi

summary
