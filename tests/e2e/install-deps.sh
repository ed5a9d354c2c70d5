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
# Refresh the package lists once, only when they were never fetched (fresh
# image) or when the install fails for lack of a candidate.
if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" apt-get install -y --no-install-recommends "${packages[@]}"
elif ! "${SUDO[@]}" apt-get install -y --no-install-recommends "${packages[@]}"; then
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" apt-get install -y --no-install-recommends "${packages[@]}"
fi
