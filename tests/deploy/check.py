#!/usr/bin/env python3
"""Checks of deploy/grafana and deploy/prometheus that need no Prometheus.

Run by tests/deploy/check.sh (offline) and tests/e2e/metrics.sh (with a
live scrape). Each subcommand prints what it found wrong and exits 1 if
anything was:

  names-source SRC              the sample names src/metrics.rs exposes
  names-scrape FILE             the sample names in a /metrics text
  dashboard JSON NAMES RULES    the dashboard's structure; every metric its
                                expressions name is in NAMES (a file, one name
                                a line); writes the expressions, variables
                                substituted, as a rule file RULES for
                                `promtool check rules` to parse
  exprs JSON                    the dashboard's expressions, substituted, as
                                JSON lines {"title", "expr"} (for queries
                                against a live Prometheus)
  names-in FILE NAMES           every regcache_* name in FILE is in NAMES
  servicemonitor YAML           in rendered manifests, each ServiceMonitor
                                selects a Service of its namespace and names
                                one of its ports
  many-nodes YAML               in rendered manifests (deploy/kubernetes/
                                many-nodes): no StatefulSet; one Deployment of
                                3 replicas whose container takes
                                REGCACHE_SHARED_STORE and the AWS_* keys from
                                the Secret regcache-shared-store, probes
                                /healthz, and caps REGCACHE_CACHE_SIZE below
                                its cache emptyDir's sizeLimit; a
                                PodDisruptionBudget and the Service select its
                                pods

Standard library only, except servicemonitor and many-nodes (PyYAML).
"""

import json
import re
import sys

# A metric name as PromQL writes it (after a non-name character).
NAME_RE = re.compile(r"(?<![A-Za-z0-9_:])((?:regcache|process)_[a-z0-9_]+)")

# Grafana's variables, as the checks substitute them.
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${__range}": "1h",
    "$instance": ".*",
    "${instance}": ".*",
    "$registry": ".*",
    "${registry}": ".*",
}

SUFFIXES = {
    "counter": ["_total"],
    "gauge": [""],
    "histogram": ["_bucket", "_sum", "_count"],
    "info": ["_info"],
}


def fail(errors):
    for e in errors:
        print(f"check.py: {e}", file=sys.stderr)
    sys.exit(1 if errors else 0)


def names_source(path):
    """Sample names from src/metrics.rs: each `r.register("name", "help",
    m.field.clone())` with the field's type from `struct Metrics`, Info for
    `Info::new`, and the collector's literal gauge names."""
    src = open(path, encoding="utf-8").read()
    src = src.split("#[cfg(test)]", 1)[0]
    src = "\n".join(re.sub(r"//.*", "", line) for line in src.splitlines())
    struct = re.search(r"pub struct Metrics \{(.*?)\n\}", src, re.S)
    if not struct:
        fail([f"{path}: no `pub struct Metrics`"])
    types = {}
    for field, ty in re.findall(r"^\s*(\w+):\s*(.+?),\s*$", struct.group(1), re.M):
        last = re.findall(r"\b(Counter|Gauge|Histogram)\b", ty)
        types[field] = last[-1].lower() if last else None
    names = set()
    errors = []
    string = r'"(?:[^"\\]|\\.)*"'
    call = r'\.register\(\s*"(\w+)"\s*,\s*' + string + r"\s*,\s*([^;]*?)\)\s*;"
    for name, arg in re.findall(call, src, re.S):
        m = re.match(r"m\.(\w+)\.clone\(\)", arg.strip())
        if arg.strip().startswith("Info::new"):
            kind = "info"
        elif m and types.get(m.group(1)):
            kind = types[m.group(1)]
        else:
            errors.append(f"{path}: cannot tell the type of {name} ({arg.strip()[:40]})")
            continue
        names.update(name + s for s in SUFFIXES[kind])
    # Collectors name their metrics as literals; one is a counter when a
    # ConstCounter or MetricType::Counter is made between the literal before
    # it and the one after, else a gauge.
    for block in re.findall(r"impl Collector for \w+ \{(.*?)\n\}", src, re.S):
        found = list(re.finditer(r'"((?:regcache|process)_[a-z0-9_]+)"', block))
        for i, m in enumerate(found):
            start = found[i - 1].end() if i else 0
            end = found[i + 1].start() if i + 1 < len(found) else len(block)
            window = block[start:end]
            kind = "counter" if re.search(r"ConstCounter|MetricType::Counter", window) else "gauge"
            names.update(m.group(1) + s for s in SUFFIXES[kind])
    if not names:
        errors.append(f"{path}: no metric found")
    fail(errors) if errors else None
    return names


def names_scrape(path):
    """Sample names in a Prometheus text exposition: every sample, and what
    each `# TYPE` line's family exposes (families with no sample yet)."""
    names = set()
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                fam, kind = parts[2], parts[3]
                for s in SUFFIXES.get(kind, [""]):
                    names.add(fam if fam.endswith(s) and s else fam + s)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, 1)[0])
    return names


def substitute(expr):
    for k in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(k, GRAFANA_VARS[k])
    return expr


def panels_of(dash):
    for p in dash.get("panels", []):
        yield p
        yield from p.get("panels", [])


def dashboard(path, names_file, rules_out):
    dash = json.load(open(path, encoding="utf-8"))
    names = set(open(names_file, encoding="utf-8").read().split())
    errors = []
    inputs = [i.get("name") for i in dash.get("__inputs", [])]
    if "DS_PROMETHEUS" not in inputs:
        errors.append("no DS_PROMETHEUS in __inputs")
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
        errors.append(f"schemaVersion {dash.get('schemaVersion')!r}: want 36 or later")
    if not dash.get("uid") or not dash.get("title"):
        errors.append("no uid or title")
    ids = set()
    exprs = []
    for p in panels_of(dash):
        title = p.get("title", "?")
        if p.get("id") in ids:
            errors.append(f"panel {title!r}: id {p.get('id')} used twice")
        ids.add(p.get("id"))
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in "hwxy") or g["x"] + g["w"] > 24:
            errors.append(f"panel {title!r}: bad gridPos {g}")
        if p.get("type") == "row":
            continue
        targets = p.get("targets") or []
        if not targets:
            errors.append(f"panel {title!r}: no targets")
        if not p.get("description"):
            errors.append(f"panel {title!r}: no description")
        for t in targets:
            ds = t.get("datasource") or p.get("datasource") or {}
            if ds.get("uid") != "${DS_PROMETHEUS}":
                errors.append(f"panel {title!r}: datasource {ds} is not ${{DS_PROMETHEUS}}")
            expr = t.get("expr", "")
            if not expr.strip():
                errors.append(f"panel {title!r} target {t.get('refId')}: no expr")
                continue
            found = NAME_RE.findall(expr)
            if not found:
                errors.append(f"panel {title!r}: {expr!r} names no regcache metric")
            for n in found:
                if n not in names:
                    errors.append(f"panel {title!r}: {n} is not a metric regcache exposes")
            exprs.append((title, substitute(expr)))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("definition", "")
        for n in NAME_RE.findall(q):
            if n not in names:
                errors.append(f"variable {v.get('name')!r}: {n} is not a metric regcache exposes")
    # PromQL syntax: each expression as a recording rule, for promtool.
    with open(rules_out, "w", encoding="utf-8") as f:
        f.write("groups:\n  - name: dashboard\n    rules:\n")
        for i, (title, expr) in enumerate(exprs):
            f.write(f"      - record: dashboard:expr_{i}\n")
            f.write(f"        expr: {json.dumps(expr)}\n")
    print(f"dashboard: {len(list(panels_of(dash)))} panels, {len(exprs)} expressions")
    fail(errors)


def exprs(path):
    dash = json.load(open(path, encoding="utf-8"))
    for p in panels_of(dash):
        for t in p.get("targets") or []:
            if t.get("expr"):
                print(json.dumps({"title": p.get("title"), "expr": substitute(t["expr"])}))


def names_in(path, names_file):
    names = set(open(names_file, encoding="utf-8").read().split())
    errors = []
    seen = 0
    for no, line in enumerate(open(path, encoding="utf-8"), 1):
        line = re.sub(r"^\s*#.*", "", line)
        for n in NAME_RE.findall(line):
            seen += 1
            if n not in names:
                errors.append(f"{path}:{no}: {n} is not a metric regcache exposes")
    if not seen:
        errors.append(f"{path}: names no regcache metric")
    print(f"{path}: {seen} metric names")
    fail(errors)


def servicemonitor(path):
    import yaml  # noqa: PLC0415 (only this check needs it)

    docs = [d for d in yaml.safe_load_all(open(path, encoding="utf-8")) if d]
    services = [d for d in docs if d.get("kind") == "Service" and d.get("apiVersion") == "v1"]
    monitors = [d for d in docs if d.get("kind") == "ServiceMonitor"]
    errors = []
    if not monitors:
        errors.append(f"{path}: no ServiceMonitor")
    for sm in monitors:
        name = sm.get("metadata", {}).get("name")
        if sm.get("apiVersion") != "monitoring.coreos.com/v1":
            errors.append(f"ServiceMonitor {name}: apiVersion {sm.get('apiVersion')}")
        ns = sm.get("metadata", {}).get("namespace")
        spec = sm.get("spec") or {}
        want = (spec.get("selector") or {}).get("matchLabels") or {}
        if not want:
            errors.append(f"ServiceMonitor {name}: no spec.selector.matchLabels")
        namespaces = (spec.get("namespaceSelector") or {}).get("matchNames") or [ns]
        selected = [
            s
            for s in services
            if s.get("metadata", {}).get("namespace") in namespaces
            and all((s.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in want.items())
        ]
        if not selected:
            errors.append(f"ServiceMonitor {name}: selects no Service in {namespaces}")
        endpoints = spec.get("endpoints") or []
        if not endpoints:
            errors.append(f"ServiceMonitor {name}: no endpoints")
        for e in endpoints:
            if e.get("path", "/metrics") != "/metrics":
                errors.append(f"ServiceMonitor {name}: path {e.get('path')} is not /metrics")
            for s in selected:
                ports = [p.get("name") for p in s.get("spec", {}).get("ports", [])]
                if e.get("port") not in ports:
                    errors.append(f"ServiceMonitor {name}: port {e.get('port')!r} is not one of Service "
                                  f"{s['metadata']['name']}'s ports {ports}")
        print(f"ServiceMonitor {name}: selects {[s['metadata']['name'] for s in selected]}")
    fail(errors)


def quantity(text):
    """Bytes in a Kubernetes quantity (20Gi, 500M) or a regcache size (16GiB)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGTP]?)(i?)B?\s*", str(text))
    if not m:
        return None
    base = 1024 if m.group(3) else 1000
    return float(m.group(1)) * base ** " KMGTP".index(m.group(2) or " ")


def selects(selector, labels):
    """Whether a matchLabels selector (non-empty) matches labels."""
    want = (selector or {}).get("matchLabels") or {}
    return bool(want) and all((labels or {}).get(k) == v for k, v in want.items())


def many_nodes(path):
    import yaml  # noqa: PLC0415 (only this check needs it)

    docs = [d for d in yaml.safe_load_all(open(path, encoding="utf-8")) if d]
    kinds = {}
    for d in docs:
        kinds.setdefault(d.get("kind"), []).append(d)
    errors = []
    if kinds.get("StatefulSet"):
        errors.append(f"{path}: a StatefulSet ({[d['metadata']['name'] for d in kinds['StatefulSet']]})")
    deployments = kinds.get("Deployment", [])
    if len(deployments) != 1:
        fail(errors + [f"{path}: {len(deployments)} Deployments, want 1"])
    dep = deployments[0]
    name = dep["metadata"]["name"]
    ns = dep["metadata"].get("namespace")
    spec = dep.get("spec") or {}
    if spec.get("replicas") != 3:
        errors.append(f"Deployment {name}: replicas {spec.get('replicas')}, want 3")
    pod_labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    if not selects(spec.get("selector"), pod_labels):
        errors.append(f"Deployment {name}: its selector does not match its pod template")
    pod = (spec.get("template") or {}).get("spec") or {}
    containers = pod.get("containers") or []
    rc = [c for c in containers if c.get("name") == "regcache"]
    if not rc:
        fail(errors + [f"Deployment {name}: no container regcache"])
    c = rc[0]
    env = {e["name"]: e for e in c.get("env") or []}
    for var in ["REGCACHE_SHARED_STORE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"]:
        ref = ((env.get(var) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        if ref.get("name") != "regcache-shared-store" or ref.get("key") != var:
            errors.append(f"container regcache: {var} is not from secretKeyRef regcache-shared-store/{var}")
        elif ref.get("optional"):
            errors.append(f"container regcache: {var}'s secretKeyRef is optional")
    for probe in ["readinessProbe", "livenessProbe"]:
        get = (c.get(probe) or {}).get("httpGet") or {}
        ports = [p.get("name") for p in c.get("ports") or []] + [p.get("containerPort") for p in c.get("ports") or []]
        if get.get("path") != "/healthz" or get.get("port") not in ports:
            errors.append(f"container regcache: {probe} is not httpGet /healthz on one of its ports")
    mounts = {m.get("mountPath"): m.get("name") for m in c.get("volumeMounts") or []}
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    cache = volumes.get(mounts.get("/var/lib/regcache")) or {}
    limit = quantity((cache.get("emptyDir") or {}).get("sizeLimit"))
    size = quantity((env.get("REGCACHE_CACHE_SIZE") or {}).get("value"))
    if limit is None:
        errors.append("the volume at /var/lib/regcache is not an emptyDir with a sizeLimit")
    elif size is None or size >= limit:
        errors.append(f"REGCACHE_CACHE_SIZE {size} is not below the cache emptyDir's sizeLimit {limit}")
    pdbs = [p for p in kinds.get("PodDisruptionBudget", [])
            if p["metadata"].get("namespace") == ns and selects(p.get("spec", {}).get("selector"), pod_labels)]
    if not pdbs:
        errors.append(f"no PodDisruptionBudget in {ns} selects Deployment {name}'s pods")
    for p in pdbs:
        s = p.get("spec") or {}
        if s.get("minAvailable") not in (None, 2) or s.get("maxUnavailable") not in (None, 1) or \
                (s.get("minAvailable") is None) == (s.get("maxUnavailable") is None):
            errors.append(f"PodDisruptionBudget {p['metadata']['name']}: want minAvailable 2 or maxUnavailable 1")
    services = [s for s in kinds.get("Service", [])
                if s["metadata"].get("namespace") == ns and selects({"matchLabels": s.get("spec", {}).get("selector")}, pod_labels)]
    if not services:
        errors.append(f"no Service in {ns} selects Deployment {name}'s pods")
    errors += peer_endpoint(c, kinds, ns, pod_labels)
    gcs = [j for j in kinds.get("CronJob", []) if j["metadata"].get("namespace") == ns]
    gc_ok = False
    for j in gcs:
        jpod = (((j.get("spec") or {}).get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
        for gc in (jpod.get("spec") or {}).get("containers") or []:
            cmd = (gc.get("command") or []) + (gc.get("args") or [])
            genv = {e["name"]: e for e in gc.get("env") or []}
            refs = [((genv.get(v) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
                    for v in ["REGCACHE_SHARED_STORE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"]]
            if cmd[1:3] == ["shared", "gc"] and "--unused-for" in cmd and "--dry-run" not in cmd and \
                    all(r.get("name") == "regcache-shared-store" for r in refs):
                gc_ok = True
    if not gc_ok:
        errors.append(f"no CronJob in {ns} runs `regcache shared gc --unused-for` with the Secret's store")
    print(f"Deployment {name}: {spec.get('replicas')} replicas; PDBs {[p['metadata']['name'] for p in pdbs]}; "
          f"Services {[s['metadata']['name'] for s in services]}")
    fail(errors)


def peer_endpoint(c, kinds, ns, pod_labels):
    """The peer endpoint: REGCACHE_PEER_LISTEN on a container port, advertised
    as the pod's IP (POD_IP from the downward API, defined before it is
    used), and a NetworkPolicy that lets only the regcache pods reach it."""
    errors = []
    names = [e["name"] for e in c.get("env") or []]
    env = {e["name"]: e for e in c.get("env") or []}
    listen = (env.get("REGCACHE_PEER_LISTEN") or {}).get("value") or ""
    port = listen.rsplit(":", 1)[-1]
    if not port.isdigit():
        return [f"container regcache: REGCACHE_PEER_LISTEN {listen!r} has no port"]
    port = int(port)
    if port not in [p.get("containerPort") for p in c.get("ports") or []]:
        errors.append(f"container regcache: the peer port {port} is not a container port")
    ip = ((env.get("POD_IP") or {}).get("valueFrom") or {}).get("fieldRef") or {}
    advertise = (env.get("REGCACHE_PEER_ADVERTISE") or {}).get("value")
    if ip.get("fieldPath") != "status.podIP":
        errors.append("container regcache: POD_IP is not the downward API's status.podIP")
    elif advertise != f"$(POD_IP):{port}":
        errors.append(f"container regcache: REGCACHE_PEER_ADVERTISE {advertise!r}, want $(POD_IP):{port}")
    elif names.index("POD_IP") > names.index("REGCACHE_PEER_ADVERTISE"):
        errors.append("container regcache: POD_IP is defined after REGCACHE_PEER_ADVERTISE uses it")
    policies = [p for p in kinds.get("NetworkPolicy", [])
                if p["metadata"].get("namespace") == ns and selects(p.get("spec", {}).get("podSelector"), pod_labels)]
    if not policies:
        return errors + [f"no NetworkPolicy in {ns} selects the regcache pods (the peer port is open to all)"]
    for pol in policies:
        for rule in pol["spec"].get("ingress") or []:
            ports = [p.get("port") for p in rule.get("ports") or []]
            if ports and port not in ports:
                continue
            sources = rule.get("from") or []
            if not sources or any(not selects(f.get("podSelector"), pod_labels) or "namespaceSelector" in f
                                  or "ipBlock" in f for f in sources):
                errors.append(f"NetworkPolicy {pol['metadata']['name']}: the peer port {port} is reachable "
                              f"by others than the regcache pods")
    return errors


KYVERNO_IMAGE = re.compile(
    r"^\{\{ regex_replace_all\('((?:[^']|'')*)', element\.image, "
    r"join\('', \[regcache, '([^']*)'\]\)\) \}\}$")
KYVERNO_GUARD = re.compile(r"^\{\{ regex_match\('((?:[^']|'')*)', element\.image\) \}\}$")
POD_FIELDS = ("containers", "initContainers", "ephemeralContainers")
DIGEST = "sha256:" + "ab" * 32


def kyverno_rewrites(pol):
    """The policy's rewrites per Pod field, [(guard regex or None, regex, the replacement after
    the regcache host)], and that host: read out of the rendered policy (Go regexes and ${n}
    replacements made Python's), with the errors found on the way."""
    errors, rewrites, host = [], {f: [] for f in POD_FIELDS}, None
    for rule in pol["spec"].get("rules", []):
        for ctx in rule.get("context", []):
            if ctx.get("name") == "regcache":
                host = ctx.get("variable", {}).get("value")
        for each in rule.get("mutate", {}).get("foreach", []):
            field = next((f for f in POD_FIELDS if each.get("list", "").startswith(f"request.object.spec.{f} ")), None)
            patch = each.get("patchStrategicMerge", {}).get("spec", {})
            items = patch.get(field) if field else None
            if not field or not items or len(items) != 1 or items[0].get("name") != "{{ element.name }}":
                errors.append(f"rule {rule.get('name')}: a foreach that does not patch one Pod field by name: {each}")
                continue
            m = KYVERNO_IMAGE.match(items[0].get("image", ""))
            if not m:
                errors.append(f"rule {rule.get('name')}: an image expression not of the checked form: {items[0].get('image')}")
                continue
            guard = None
            for cond in each.get("preconditions", {}).get("all", []):
                g = KYVERNO_GUARD.match(cond.get("key", ""))
                if not g or cond.get("operator") != "Equals" or cond.get("value") is not False:
                    errors.append(f"rule {rule.get('name')}: a precondition not of the checked form: {cond}")
                else:
                    guard = g.group(1).replace("''", "'")
            repl = re.sub(r"\$\{(\d+)\}", r"\\g<\1>", m.group(2))
            rewrites[field].append((guard, m.group(1).replace("''", "'"), repl))
    return errors, rewrites, host


def kyverno(path):
    """deploy/kubernetes/kyverno: one ClusterPolicy whose rewrites, evaluated here on a table
    of images, give regcache's path-prefix form for docker.io, ghcr.io and quay.io only."""
    import yaml
    docs = [d for d in yaml.safe_load_all(open(path, encoding="utf-8")) if d]
    errors = []
    pols = [d for d in docs if d.get("kind") == "ClusterPolicy"]
    if len(pols) != 1 or pols[0].get("apiVersion") != "kyverno.io/v1":
        fail([f"want one kyverno.io/v1 ClusterPolicy, found {[(d.get('apiVersion'), d.get('kind')) for d in docs]}"])
    pol = pols[0]
    spec = pol["spec"]
    if spec.get("failurePolicy") not in ("Ignore", "Fail"):
        errors.append(f"failurePolicy {spec.get('failurePolicy')!r}: set Ignore or Fail explicitly")
    if spec.get("background") is not False:
        errors.append("background must be false (Pods are mutated at admission only)")
    for rule in spec.get("rules", []):
        kinds = [k for a in rule.get("match", {}).get("any", []) for k in a.get("resources", {}).get("kinds", [])]
        if "Pod" not in kinds or "Pod/ephemeralcontainers" not in kinds:
            errors.append(f"rule {rule.get('name')}: must match Pod and Pod/ephemeralcontainers, matches {kinds}")
        excluded = [n for a in rule.get("exclude", {}).get("any", []) for n in a.get("resources", {}).get("namespaces", [])]
        if "kube-system" not in excluded:
            errors.append(f"rule {rule.get('name')}: kube-system is not excluded")
    found, rewrites, host = kyverno_rewrites(pol)
    errors += found
    if not host or not re.fullmatch(r"[a-z0-9.-]+(:\d+)?", host):
        errors.append(f"the regcache context variable is not a host[:port]: {host!r}")
        fail(errors)
    for field in POD_FIELDS:
        if not rewrites[field]:
            errors.append(f"no rewrite of {field}")

    def rewrite(field, image):
        out, changed = image, 0
        for guard, regex, repl in rewrites[field]:
            if guard and re.search(guard, image):
                continue
            new = re.sub(regex, host + repl, image)
            if new != image:
                out, changed = new, changed + 1
        if changed > 1:
            errors.append(f"{field}: {image} is rewritten by {changed} foreach entries")
        return out

    h = host
    table = {
        "nginx": f"{h}/docker.io/nginx",
        "nginx:1.27": f"{h}/docker.io/nginx:1.27",
        "library/nginx:1.27": f"{h}/docker.io/library/nginx:1.27",
        f"acme/app@{DIGEST}": f"{h}/docker.io/acme/app@{DIGEST}",
        f"acme/app.v2:1@{DIGEST}": f"{h}/docker.io/acme/app.v2:1@{DIGEST}",
        "docker.io/library/nginx:1.27": f"{h}/docker.io/library/nginx:1.27",
        "index.docker.io/x/y": f"{h}/index.docker.io/x/y",
        "registry-1.docker.io/x/y:2": f"{h}/registry-1.docker.io/x/y:2",
        "ghcr.io/acme/app:1": f"{h}/ghcr.io/acme/app:1",
        f"quay.io/org/tool@{DIGEST}": f"{h}/quay.io/org/tool@{DIGEST}",
        "registry.k8s.io/pause:3.10": "registry.k8s.io/pause:3.10",
        "gcr.io/distroless/static": "gcr.io/distroless/static",
        "ghcr.io.evil.example/x": "ghcr.io.evil.example/x",
        "localhost/x": "localhost/x",
        "localhost": "localhost",
        "localhost:5000/x": "localhost:5000/x",
        "myhost:5000/x": "myhost:5000/x",
        f"{h}/docker.io/nginx": f"{h}/docker.io/nginx",
        f"{h}/ghcr.io/acme/app:1": f"{h}/ghcr.io/acme/app:1",
    }
    for field in POD_FIELDS:
        for image, want in table.items():
            got = rewrite(field, image)
            if got != want:
                errors.append(f"{field}: {image} -> {got}, want {want}")
            elif rewrite(field, got) != got:
                errors.append(f"{field}: rewriting {got} again changes it (not idempotent)")
    fail(errors)


def main(argv):
    cmd, args = (argv[1], argv[2:]) if len(argv) > 1 else (None, [])
    if cmd == "names-source" and len(args) == 1:
        print("\n".join(sorted(names_source(args[0]))))
    elif cmd == "names-scrape" and len(args) == 1:
        print("\n".join(sorted(names_scrape(args[0]))))
    elif cmd == "dashboard" and len(args) == 3:
        dashboard(*args)
    elif cmd == "exprs" and len(args) == 1:
        exprs(args[0])
    elif cmd == "names-in" and len(args) == 2:
        names_in(*args)
    elif cmd == "servicemonitor" and len(args) == 1:
        servicemonitor(args[0])
    elif cmd == "many-nodes" and len(args) == 1:
        many_nodes(args[0])
    elif cmd == "kyverno" and len(args) == 1:
        kyverno(args[0])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv)
