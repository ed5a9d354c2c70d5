#!/usr/bin/env bash
# Offline checks of deploy/prometheus, deploy/grafana and the Kubernetes
# manifests (run by tests/all.sh; needs promtool from Debian's prometheus,
# kubectl with kustomize, python3 with pip):
#   - promtool check rules on alerts.yml, promtool test rules on
#     alerts_test.yml, promtool check config on scrape-config.yml alone and
#     with the rules;
#   - every regcache_* name in the alerts, their tests and the dashboard is a
#     metric src/metrics.rs exposes; the dashboard's structure; each of its
#     expressions parses (promtool check rules on them as recording rules);
#   - deploy/kubernetes with the deploy/prometheus component renders
#     (kustomize), its standard resources pass kubernetes-validate --strict
#     (a pinned PyPI package, in a venv under target/), and the ServiceMonitor
#     selects the Service and names one of its ports. The ServiceMonitor's own
#     schema (a CRD) is not checked: no offline schema for it ships here;
#   - deploy/kubernetes/many-nodes renders, alone and with deploy/prometheus;
#     it, and its many-nodes/secret.example.yaml, pass kubernetes-validate
#     --strict; it has no StatefulSet and one Deployment of 3 replicas whose
#     container takes REGCACHE_SHARED_STORE and AWS_* from secretKeyRefs to
#     regcache-shared-store, probes /healthz and keeps REGCACHE_CACHE_SIZE below
#     its emptyDir's sizeLimit, listens for peers on a container port and
#     advertises the pod's IP; a PodDisruptionBudget and the Service select
#     its pods, a NetworkPolicy admits only them to the peer port, and a
#     CronJob runs `regcache shared gc --unused-for` with the store from the
#     same Secret (check.py many-nodes). The single-node render keeps its
#     StatefulSet and has no Deployment;
#   - negative controls: a broken rule threshold makes promtool test rules
#     fail, a misspelt metric in the dashboard makes the name check fail, a
#     ServiceMonitor naming no port of the Service fails; the many-nodes check
#     fails on the single-node render, on a PDB that selects other pods, on
#     AWS_ACCESS_KEY_ID from another key, on a peer port open to any
#     address, and on a gc CronJob made a dry run.
#   - deploy/kubernetes/kyverno renders; its ClusterPolicy has an explicit
#     failurePolicy, background false, matches Pods and their ephemeral
#     containers, excludes kube-system, and its rewrites (read from the
#     render and evaluated by check.py kyverno on a table of images) give
#     regcache's path-prefix form for docker.io (short names and aliases),
#     ghcr.io and quay.io, keep tags and digests, leave other registries,
#     localhost and already rewritten images alone, and are idempotent;
#     negative controls: a short-name pattern that takes registry hosts, and
#     no failurePolicy.
# Prints one PASS/FAIL line per check and "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
REPO=$PWD

PASSED=0
FAILED=0
SKIPPED=0
skip() { SKIPPED=$((SKIPPED + 1)); echo "SKIP: $*"; }
pass() { PASSED=$((PASSED + 1)); echo "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL: $*"; }
indent() { sed 's/^/    | /'; }

T=$(mktemp -d /tmp/regcache-deploy-check.XXXXXX)
trap 'rm -rf "${T:?}"' EXIT

# check NAME CMD...: PASS when CMD succeeds, else FAIL with its output.
check() {
    local name=$1
    shift
    if "$@" >"$T/out" 2>&1; then
        pass "$name"
    else
        fail "$name"
        tail -n 30 "$T/out" | indent
    fi
}

# refute NAME CMD...: PASS when CMD fails (a negative control).
refute() {
    local name=$1
    shift
    if "$@" >"$T/out" 2>&1; then
        fail "$name (it passed)"
        tail -n 30 "$T/out" | indent
    else
        pass "$name"
    fi
}

for cmd in promtool python3; do
    command -v "$cmd" >/dev/null 2>&1 || { echo "check.sh: $cmd not found (tests/e2e/install-deps.sh installs it)" >&2; exit 1; }
done

P=deploy/prometheus
CHECK=(python3 tests/deploy/check.py)

# ------------------------------------------------------------ prometheus
check "promtool check rules $P/alerts.yml" promtool check rules "$P/alerts.yml"
check "promtool test rules $P/alerts_test.yml" promtool test rules "$P/alerts_test.yml"
check "promtool check config $P/scrape-config.yml" promtool check config "$P/scrape-config.yml"
{
    cat "$P/scrape-config.yml"
    printf 'rule_files:\n  - %s/%s/alerts.yml\n' "$REPO" "$P"
} >"$T/prometheus.yml"
check "promtool check config: the scrape job with the alert rules" promtool check config "$T/prometheus.yml"

# ------------------------------------------------------------ metric names
if "${CHECK[@]}" names-source src/metrics.rs >"$T/names" 2>"$T/out" && [ -s "$T/names" ]; then
    pass "metric names read from src/metrics.rs ($(wc -l <"$T/names"))"
else
    fail "metric names read from src/metrics.rs"
    indent <"$T/out"
fi
check "the names in $P/alerts.yml are regcache's" "${CHECK[@]}" names-in "$P/alerts.yml" "$T/names"
check "the names in $P/alerts_test.yml are regcache's" "${CHECK[@]}" names-in "$P/alerts_test.yml" "$T/names"
check "deploy/grafana/regcache.json: structure and metric names" \
    "${CHECK[@]}" dashboard deploy/grafana/regcache.json "$T/names" "$T/dashboard-rules.yml"
check "deploy/grafana/regcache.json: every expression parses (promtool)" promtool check rules "$T/dashboard-rules.yml"

# ------------------------------------------------------------ kubernetes
VENV=${DEPLOY_CHECK_VENV:-$REPO/target/deploy-check-venv}
if [ ! -x "$VENV/bin/kubernetes-validate" ]; then
    { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q -r tests/deploy/requirements.txt; } >"$T/venv.log" 2>&1 ||
        { fail "kubernetes-validate installed in $VENV"; indent <"$T/venv.log"; }
fi
# kubectl with kustomize 3.7 or later (components): the machine image's;
# Debian 12's kubernetes-client (kubectl 1.20, kustomize 2) is too old.
if ! command -v kubectl >/dev/null 2>&1 || ! kubectl kustomize --help >/dev/null 2>&1; then
    skip "kustomize and ServiceMonitor checks: no kubectl with kustomize"
else
    mkdir -p "$T/k"
    rel=$(realpath --relative-to="$T/k" "$REPO/deploy")
    printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - %s/kubernetes\ncomponents:\n  - %s/prometheus\n' \
        "$rel" "$rel" >"$T/k/kustomization.yaml"
    check "kustomize: deploy/kubernetes renders" kubectl kustomize deploy/kubernetes
    if kubectl kustomize "$T/k" >"$T/rendered.yaml" 2>"$T/out"; then
        pass "kustomize: deploy/kubernetes with the deploy/prometheus component renders"
    else
        fail "kustomize: deploy/kubernetes with the deploy/prometheus component renders"
        indent <"$T/out"
    fi
    if [ -x "$VENV/bin/kubernetes-validate" ]; then
        check "kubernetes-validate --strict (Namespace, ConfigMap, Service, StatefulSet)" \
            "$VENV/bin/kubernetes-validate" --strict --quiet --no-warn "$T/rendered.yaml"
        check "the ServiceMonitor selects the Service and names its port" \
            "$VENV/bin/python" tests/deploy/check.py servicemonitor "$T/rendered.yaml"
        # The ServiceMonitor's endpoint port, wherever kustomize put it.
        awk '/^kind: ServiceMonitor/ {sm = 1} /^---/ {sm = 0} sm && /^ *(- )?port: proxy$/ {sub(/proxy$/, "metrics")} {print}' \
            "$T/rendered.yaml" >"$T/bad-sm.yaml"
        if cmp -s "$T/rendered.yaml" "$T/bad-sm.yaml"; then
            fail "negative control: the ServiceMonitor's port was found to break"
        else
            refute "negative control: a ServiceMonitor port the Service lacks is caught" \
                "$VENV/bin/python" tests/deploy/check.py servicemonitor "$T/bad-sm.yaml"
        fi
    fi

    # ---------------------------------------------------- kubernetes: many nodes
    M=deploy/kubernetes/many-nodes
    check "kustomize: the single-node render has a StatefulSet and no Deployment" \
        sh -c 'kubectl kustomize deploy/kubernetes >"$1" && grep -qx "kind: StatefulSet" "$1" && ! grep -qx "kind: Deployment" "$1"' \
        sh "$T/single.yaml"
    if kubectl kustomize "$M" >"$T/many.yaml" 2>"$T/out"; then
        pass "kustomize: $M renders"
    else
        fail "kustomize: $M renders"
        indent <"$T/out"
    fi
    mkdir -p "$T/km"
    rel=$(realpath --relative-to="$T/km" "$REPO/deploy")
    printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - %s/kubernetes/many-nodes\ncomponents:\n  - %s/prometheus\n' \
        "$rel" "$rel" >"$T/km/kustomization.yaml"
    if kubectl kustomize "$T/km" >"$T/many-sm.yaml" 2>"$T/out"; then
        pass "kustomize: $M with the deploy/prometheus component renders"
    else
        fail "kustomize: $M with the deploy/prometheus component renders"
        indent <"$T/out"
    fi
    if [ -x "$VENV/bin/kubernetes-validate" ]; then
        check "kubernetes-validate --strict $M (Namespace, ConfigMap, Service, Deployment, PodDisruptionBudget, NetworkPolicy, CronJob)" \
            "$VENV/bin/kubernetes-validate" --strict --quiet --no-warn "$T/many.yaml"
        check "kubernetes-validate --strict $M/secret.example.yaml" \
            "$VENV/bin/kubernetes-validate" --strict --quiet --no-warn "$M/secret.example.yaml"
        check "$M: 3 replicas, the Secret's env, /healthz probes, cache under sizeLimit, PDB and Service select the pods, no StatefulSet, a daily shared gc" \
            "$VENV/bin/python" tests/deploy/check.py many-nodes "$T/many.yaml"
        check "$M with deploy/prometheus: the ServiceMonitor selects the Service and names its port" \
            "$VENV/bin/python" tests/deploy/check.py servicemonitor "$T/many-sm.yaml"
        refute "negative control: the many-nodes check fails on the single-node render" \
            "$VENV/bin/python" tests/deploy/check.py many-nodes "$T/single.yaml"
        # The PDB's selector, wherever kustomize put it, made to select other pods.
        awk '/^kind: PodDisruptionBudget/ {p = 1} /^---/ {p = 0} p && /^      app.kubernetes.io\/name: regcache$/ {sub(/regcache$/, "other")} {print}' \
            "$T/many.yaml" >"$T/bad-pdb.yaml"
        if cmp -s "$T/many.yaml" "$T/bad-pdb.yaml"; then
            fail "negative control: the PDB's selector was found to break"
        else
            refute "negative control: a PDB selecting other pods is caught" \
                "$VENV/bin/python" tests/deploy/check.py many-nodes "$T/bad-pdb.yaml"
        fi
        sed 's/^\( *- \)--unused-for$/\1--dry-run/' "$T/many.yaml" >"$T/bad-gc.yaml"
        if cmp -s "$T/many.yaml" "$T/bad-gc.yaml"; then
            fail "negative control: the gc CronJob's --unused-for was found to break"
        else
            refute "negative control: a gc CronJob that is a dry run is caught" \
                "$VENV/bin/python" tests/deploy/check.py many-nodes "$T/bad-gc.yaml"
        fi
        sed 's/^\( *key:\) AWS_ACCESS_KEY_ID$/\1 access-key/' "$T/many.yaml" >"$T/bad-env.yaml"
        if cmp -s "$T/many.yaml" "$T/bad-env.yaml"; then
            fail "negative control: AWS_ACCESS_KEY_ID's secretKeyRef was found to break"
        else
            refute "negative control: AWS_ACCESS_KEY_ID from another key of the Secret is caught" \
                "$VENV/bin/python" tests/deploy/check.py many-nodes "$T/bad-env.yaml"
        fi
        # The peer port's NetworkPolicy rule opened to everyone.
        python3 - "$T/many.yaml" "$T/bad-peer.yaml" <<'PY'
import sys
text = open(sys.argv[1], encoding="utf-8").read()
marker = "  - from:\n    - podSelector:\n        matchLabels:\n          app.kubernetes.io/name: regcache\n"
open(sys.argv[2], "w", encoding="utf-8").write(text.replace(marker, "  - from:\n    - ipBlock:\n        cidr: 0.0.0.0/0\n", 1))
PY
        if cmp -s "$T/many.yaml" "$T/bad-peer.yaml"; then
            fail "negative control: the NetworkPolicy's peer rule was found to break"
        else
            refute "negative control: a peer port open to any address is caught" \
                "$VENV/bin/python" tests/deploy/check.py many-nodes "$T/bad-peer.yaml"
        fi
    fi
fi

# ------------------------------------------------------------ kyverno
# deploy/kubernetes/kyverno: its ClusterPolicy (a CRD kubernetes-validate has
# no schema for) is checked by check.py kyverno: its form, and its rewrites
# evaluated on a table of images (regexes read from the render).
if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
    if kubectl kustomize deploy/kubernetes/kyverno >"$T/kyverno.yaml" 2>"$T/out"; then
        pass "kustomize: deploy/kubernetes/kyverno renders"
        check "kyverno: the ClusterPolicy rewrites docker.io, ghcr.io and quay.io images to regcache's path prefix, and nothing else" \
            "$VENV/bin/python" tests/deploy/check.py kyverno "$T/kyverno.yaml"
        # A Docker Hub short-name pattern that also takes registry names.
        sed 's/\[^\.\/:@\]+/[^\/:@]+/' "$T/kyverno.yaml" >"$T/bad-kyverno.yaml"
        if cmp -s "$T/kyverno.yaml" "$T/bad-kyverno.yaml"; then
            fail "negative control: the Docker Hub short-name pattern was found to break"
        else
            refute "negative control: a short-name pattern that rewrites registry.k8s.io images is caught" \
                "$VENV/bin/python" tests/deploy/check.py kyverno "$T/bad-kyverno.yaml"
        fi
        grep -v 'failurePolicy:' "$T/kyverno.yaml" >"$T/bad-kyverno2.yaml"
        refute "negative control: a policy without an explicit failurePolicy is caught" \
            "$VENV/bin/python" tests/deploy/check.py kyverno "$T/bad-kyverno2.yaml"
    else
        fail "kustomize: deploy/kubernetes/kyverno renders"
        indent <"$T/out"
    fi
fi

# ------------------------------------------------------------ negative controls
mkdir -p "$T/bad"
sed 's/< 0\.1$/< 0.01/' "$P/alerts.yml" >"$T/bad/alerts.yml"
cp "$P/alerts_test.yml" "$T/bad/"
if cmp -s "$P/alerts.yml" "$T/bad/alerts.yml"; then
    fail "negative control: the rate-limit threshold was found to break"
else
    refute "negative control: a broken rule (rate limit < 0.01) fails promtool test rules" \
        promtool test rules "$T/bad/alerts_test.yml"
fi
sed 's/regcache_upstream_up{/regcache_upstream_upp{/' deploy/grafana/regcache.json >"$T/bad/regcache.json"
refute "negative control: a misspelt metric in the dashboard is caught" \
    "${CHECK[@]}" dashboard "$T/bad/regcache.json" "$T/names" "$T/bad/rules.yml"

if [ "$SKIPPED" -gt 0 ]; then
    echo "$PASSED passed, $FAILED failed, $SKIPPED skipped"
else
    echo "$PASSED passed, $FAILED failed"
fi
[ "$FAILED" -eq 0 ]
