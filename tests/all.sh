#!/usr/bin/env bash
# Runs every test of regcache on this machine, installing what the tests need:
#   1. Debian packages for the end-to-end test (docker-registry, skopeo,
#      containerd, docker.io, ...) via tests/e2e/install-deps.sh;
#   2. formatting and lint (cargo fmt --check, cargo clippy -D warnings);
#   3. unit and integration tests (cargo test);
#   4. the monitoring files of deploy/ (tests/deploy/check.sh: promtool on
#      the alert rules and their unit tests, the scrape config, the Grafana
#      dashboard's metric names, the kustomize component's ServiceMonitor);
#   5. the end-to-end tests with the real registry and real clients
#      (run.sh, auth.sh, links.sh, mirror.sh, origins.sh, metrics.sh,
#      status.sh), the probe of the S3 server the shared tier is tested on
#      (s3_probe.sh: SeaweedFS on loopback) and the shared tier itself
#      (shared.sh: three regcache nodes on one SeaweedFS bucket);
#   6. a smoke run of the benchmark (bench/run.sh --smoke: every peer started
#      and measured once with small sizes, to keep the script working; its
#      targets are not checked here).
# Needs root (or sudo) for apt-get and for the private dockerd/containerd.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s ===\n' "$*"; }

if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
  SUDO=sudo
else
  SUDO=
fi

step "installing test dependencies"
$SUDO tests/e2e/install-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

step "cargo build"
cargo build --locked

step "cargo test"
# No backtraces: a failing test's message stays at the end of the output.
RUST_BACKTRACE=0 cargo test --locked

step "monitoring files (promtool check/test rules, scrape config, dashboard metric names, ServiceMonitor)"
tests/deploy/check.sh

step "end-to-end test (real registry, skopeo, ctr, dockerd)"
$SUDO env REGCACHE_BIN="$PWD/target/debug/regcache" tests/e2e/run.sh

step "end-to-end test of private images (real registry with htpasswd, skopeo, curl)"
$SUDO env REGCACHE_BIN="$PWD/target/debug/regcache" tests/e2e/auth.sh

step "end-to-end test of links (a manifest naming private digests opens nothing; two real registries, skopeo, curl)"
$SUDO env REGCACHE_BIN="$PWD/target/debug/regcache" tests/e2e/links.sh

step "end-to-end test of mirror and path-prefix modes, fallback, air gap (ctr hosts.toml, skopeo, export/import)"
$SUDO env REGCACHE_BIN="$PWD/target/debug/regcache" tests/e2e/mirror.sh

step "end-to-end test of registry origins (plain-http twin of a TLS docker-registry, insecure_registries, no relay)"
$SUDO env REGCACHE_BIN="$PWD/target/debug/regcache" tests/e2e/origins.sh

step "end-to-end test of metrics (a real Prometheus scrapes regcache; promtool check metrics; the dashboard's expressions and the alert rules live)"
$SUDO env REGCACHE_BIN="$PWD/target/debug/regcache" tests/e2e/metrics.sh

step "end-to-end test of the status page (headless chromium loads / after two pulls; a narrow screenshot in target/e2e-artifacts/status.png)"
$SUDO env REGCACHE_BIN="$PWD/target/debug/regcache" tests/e2e/status.sh

step "probe of the S3 server of the shared-tier tests (SeaweedFS on loopback: signing, conditional writes, multipart, restart)"
$SUDO tests/e2e/s3_probe.sh

step "end-to-end test of the shared tier (SeaweedFS, three regcache nodes, public and htpasswd registries, skopeo; store down and back)"
$SUDO env REGCACHE_BIN="$PWD/target/debug/regcache" tests/e2e/shared.sh

step "benchmark smoke run (bench/run.sh --smoke: squid, distribution mirror, nginx, direct, regcache; one small round)"
cargo build --locked --example bench_client
$SUDO env REGCACHE_BIN="$PWD/target/debug/regcache" BENCH_CLIENT="$PWD/target/debug/examples/bench_client" bench/run.sh --smoke
