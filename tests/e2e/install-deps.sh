#!/usr/bin/env bash
# Install the Debian 12 packages the end-to-end test drives. Idempotent: does
# nothing when every command is already present. Needs root (or sudo) only
# when something is missing.
set -euo pipefail

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
    [promtool]=prometheus
)

missing=()
for cmd in "${!PROVIDER[@]}"; do
    # dockerd lives in /usr/sbin, which is not always on a user's PATH.
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
        missing+=("${PROVIDER[$cmd]}")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: all commands present"
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

# Debian's prometheus package starts its service on install (listening on
# every interface, port 9090). The tests run promtool, and prometheus
# themselves on loopback, never the service: a policy-rc.d that refuses starts
# keeps it from starting (invoke-rc.d and deb-systemd-invoke both ask it),
# and the service is disabled afterwards so that it does not start at boot.
own_policy=""
if printf '%s\n' "${packages[@]}" | grep -qx prometheus && [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# install-deps.sh: no service starts while installing\nexit 101\n' \
        | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${SUDO[@]}" chmod 755 /usr/sbin/policy-rc.d
    own_policy=/usr/sbin/policy-rc.d
fi
remove_policy() {
    if [ -n "$own_policy" ]; then
        "${SUDO[@]}" rm -f "$own_policy"
    fi
}
trap remove_policy EXIT
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
