#!/bin/sh
# Set up this host to use regcache: trust its CA and, if asked, send dockerd
# and containerd registry pulls through it.
#
# regcache serves this script at /setup with its own URL filled in:
#
#   curl -fsSL http://regcache.internal:3128/setup | sudo sh
#   curl -fsSL http://regcache.internal:3128/setup | sudo sh -s -- --configure docker,containerd --restart
#
# From a checkout, say where regcache is:
#
#   sudo sh deploy/setup.sh --url http://regcache.internal:3128
#
# Run with --help for all options. Running it again is safe: unchanged files
# are left alone, and --restart only restarts a service whose settings changed
# or that does not run with them yet.

set -eu

# Filled in by regcache when served from /setup.
REGCACHE_URL="${REGCACHE_URL:-@REGCACHE_URL@}"
REGCACHE_CONFIGURE="${REGCACHE_CONFIGURE:-}"
REGCACHE_RESTART="${REGCACHE_RESTART:-0}"
REGCACHE_NO_PROXY="${REGCACHE_NO_PROXY:-localhost,127.0.0.0/8,::1}"
REGCACHE_CA_SHA256="${REGCACHE_CA_SHA256:-}"

# A copy of the CA at a fixed path, for tools configured with a CA file
# (deploy/buildkit/buildkitd.toml, deploy/gitlab-runner/config.toml).
CA_COPY=/etc/regcache/ca.crt

say() { printf 'regcache-setup: %s\n' "$*"; }
warn() { printf 'regcache-setup: warning: %s\n' "$*" >&2; }
die() {
    printf 'regcache-setup: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    cat <<'EOF'
usage: setup.sh [options]

Installs the regcache CA into this host's trust store and copies it to
/etc/regcache/ca.crt. With --configure, also writes systemd drop-ins that
point the named daemons at regcache.

options (each also settable as the environment variable in brackets):
  --url URL            regcache's address, e.g. http://regcache.internal:3128
                       [REGCACHE_URL]; filled in when fetched from /setup
  --configure LIST     comma-separated: docker, containerd. Writes
                       /etc/systemd/system/<unit>.service.d/http-proxy.conf
                       [REGCACHE_CONFIGURE]
  --no-proxy LIST      NO_PROXY for those drop-ins
                       (default: localhost,127.0.0.0/8,::1) [REGCACHE_NO_PROXY]
  --restart            reload systemd and restart the --configure'd services
                       that are running, when this run changed something or
                       they do not use regcache yet [REGCACHE_RESTART=1]
                       Restarting dockerd stops its containers unless
                       "live-restore" is on in /etc/docker/daemon.json.
  --ca-sha256 HEX      refuse the CA unless its SHA-256 fingerprint matches
                       (the SHA-256 line of 'regcache ca show', or
                       openssl x509 -noout -fingerprint -sha256)
                       [REGCACHE_CA_SHA256]
  -h, --help           show this help
EOF
}

need_value() {
    [ "$#" -ge 2 ] || die "$1 needs a value (try --help)"
}

while [ "$#" -gt 0 ]; do
    case $1 in
        --url) need_value "$@"; REGCACHE_URL=$2; shift 2 ;;
        --url=*) REGCACHE_URL=${1#*=}; shift ;;
        --configure) need_value "$@"; REGCACHE_CONFIGURE=$2; shift 2 ;;
        --configure=*) REGCACHE_CONFIGURE=${1#*=}; shift ;;
        --no-proxy) need_value "$@"; REGCACHE_NO_PROXY=$2; shift 2 ;;
        --no-proxy=*) REGCACHE_NO_PROXY=${1#*=}; shift ;;
        --restart) REGCACHE_RESTART=1; shift ;;
        --ca-sha256) need_value "$@"; REGCACHE_CA_SHA256=$2; shift 2 ;;
        --ca-sha256=*) REGCACHE_CA_SHA256=${1#*=}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option: $1 (try --help)" ;;
    esac
done

# --- check the inputs before touching anything ------------------------------

REGCACHE_URL=${REGCACHE_URL%/}
case $REGCACHE_URL in
    '' | *'@REGCACHE_'*)
        die "regcache's URL is not set. Pass --url http://HOST:3128 or set REGCACHE_URL." ;;
    *[[:space:]\"\'\\]*)
        die "REGCACHE_URL contains spaces, quotes or backslashes: $REGCACHE_URL" ;;
    http://?*) ;;
    https://*)
        die "use http:// for REGCACHE_URL: regcache is a plain-HTTP proxy (it carries HTTPS through CONNECT)" ;;
    *)
        die "REGCACHE_URL must look like http://HOST:PORT, got: $REGCACHE_URL" ;;
esac

case $REGCACHE_NO_PROXY in
    *[[:space:]\"\'\\]*) die "NO_PROXY list contains spaces, quotes or backslashes: $REGCACHE_NO_PROXY" ;;
esac

case $REGCACHE_RESTART in
    1 | yes | true) REGCACHE_RESTART=1 ;;
    0 | no | false | '') REGCACHE_RESTART=0 ;;
    *) die "REGCACHE_RESTART must be 1 or 0, got: $REGCACHE_RESTART" ;;
esac

units=
for name in $(printf '%s' "$REGCACHE_CONFIGURE" | tr ',' ' '); do
    case $name in
        docker | dockerd) name=docker ;;
        containerd) ;;
        *) die "--configure knows docker and containerd, not: $name" ;;
    esac
    case " $units " in
        *" $name "*) ;;
        *) units="$units $name" ;;
    esac
done
units=${units# }

if [ -n "$units" ] && ! command -v systemctl >/dev/null 2>&1; then
    die "--configure writes systemd drop-ins, but this host has no systemctl. Set HTTPS_PROXY=$REGCACHE_URL in the daemon's environment by hand."
fi

if [ "$(id -u)" -ne 0 ]; then
    die "this changes the system trust store and needs root. Run it with sudo:
    curl -fsSL $REGCACHE_URL/setup | sudo sh"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

changed=0

# Copies $1 to $2 (mode $3) unless $2 already has the same content.
# Returns 0 when it wrote the file, 1 when it was already up to date.
put_file() {
    if [ -d "$2" ]; then
        die "$2 is a directory, not a file (Docker creates one when a bind-mounted file is missing). Remove it and run this again: rmdir $2"
    fi
    if [ -f "$2" ] && cmp -s "$1" "$2" 2>/dev/null; then
        return 1
    fi
    mkdir -p "$(dirname "$2")"
    cp "$1" "$2.regcache-new"
    chmod "$3" "$2.regcache-new"
    mv -f "$2.regcache-new" "$2"
}

# --- download and check the CA ----------------------------------------------

# Talk to regcache directly, not through whatever proxy this shell has.
unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY all_proxy ALL_PROXY

fetch() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS --connect-timeout 10 --max-time 60 -o "$2" "$1"
    elif command -v wget >/dev/null 2>&1; then
        # GNU wget takes a timeout; some BusyBox builds crash on -T.
        if wget --version >/dev/null 2>&1; then
            wget -q -T 30 -O "$2" "$1"
        else
            wget -q -O "$2" "$1"
        fi
    else
        die "need curl or wget to download $1"
    fi
}

say "downloading $REGCACHE_URL/ca.crt"
if ! fetch "$REGCACHE_URL/ca.crt" "$tmp/ca.crt"; then
    die "could not download $REGCACHE_URL/ca.crt. Is regcache running, and is its port open to this host? Check with: curl -v $REGCACHE_URL/healthz"
fi
if ! grep -q -e '-----BEGIN CERTIFICATE-----' "$tmp/ca.crt"; then
    die "$REGCACHE_URL/ca.crt is not a PEM certificate. Is that URL really regcache?"
fi
if grep -q -e 'PRIVATE KEY' "$tmp/ca.crt"; then
    die "$REGCACHE_URL/ca.crt contains a private key. Refusing to install it; fix regcache's CA files."
fi

# SHA-256 over the DER form of the first certificate, the same number as
# `openssl x509 -noout -fingerprint -sha256`, as lowercase hex.
ca_sha256() {
    if command -v openssl >/dev/null 2>&1; then
        openssl x509 -in "$1" -noout -fingerprint -sha256 2>/dev/null |
            sed 's/.*=//; s/://g' | tr 'A-F' 'a-f'
    elif command -v base64 >/dev/null 2>&1 && command -v sha256sum >/dev/null 2>&1; then
        awk '/-----BEGIN CERTIFICATE-----/ { p = 1; next }
             /-----END CERTIFICATE-----/ { exit }
             p' "$1" | tr -d ' \t\r\n' | base64 -d 2>/dev/null |
            sha256sum | cut -d ' ' -f 1
    fi
}

fingerprint=$(ca_sha256 "$tmp/ca.crt" || true)
case $fingerprint in
    # Empty input hashes to e3b0c442...: the certificate did not decode.
    e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855) fingerprint= ;;
    [0-9a-f]*) [ "${#fingerprint}" -eq 64 ] || fingerprint= ;;
    *) fingerprint= ;;
esac

if [ -n "$REGCACHE_CA_SHA256" ]; then
    want=$(printf '%s' "$REGCACHE_CA_SHA256" | tr -d ': ' | tr 'A-F' 'a-f')
    [ -n "$fingerprint" ] ||
        die "cannot compute the CA's fingerprint to compare with --ca-sha256 (needs openssl, or base64 and sha256sum)"
    [ "$fingerprint" = "$want" ] ||
        die "the CA from $REGCACHE_URL has SHA-256 $fingerprint, not $want. Not installing it."
    say "CA fingerprint matches --ca-sha256"
elif [ -n "$fingerprint" ]; then
    say "CA SHA-256 fingerprint: $(printf '%s' "$fingerprint" | tr 'a-f' 'A-F' | sed 's/../&:/g; s/:$//')"
    say "  compare with the SHA-256 line of 'regcache ca show' on the regcache host"
fi

# --- install it into the system trust store ---------------------------------

os_words=
if [ -r /etc/os-release ]; then
    # shellcheck disable=SC1091
    os_words=$(. /etc/os-release && printf '%s %s' "${ID:-}" "${ID_LIKE:-}")
fi

family=
for word in $os_words; do
    case $word in
        debian | ubuntu) family=debian ;;
        rhel | fedora | centos | rocky | almalinux | ol | amzn) family=rhel ;;
        suse | opensuse* | sles) family=suse ;;
        alpine) family=alpine ;;
        arch) family=arch ;;
        *) continue ;;
    esac
    break
done
if [ -z "$family" ]; then
    if command -v update-ca-trust >/dev/null 2>&1 && [ -d /etc/pki/ca-trust/source/anchors ]; then
        family=rhel
    elif command -v update-ca-certificates >/dev/null 2>&1 && [ -d /etc/pki/trust/anchors ]; then
        family=suse
    elif command -v update-ca-certificates >/dev/null 2>&1; then
        family=debian
    else
        die "cannot tell how this system manages trusted CAs (no update-ca-certificates or update-ca-trust).
Install $tmp/ca.crt by hand; see regcache's docs/clients.md, 'Trust the CA'."
    fi
fi

case $family in
    debian)
        anchor=/usr/local/share/ca-certificates/regcache.crt
        update="update-ca-certificates"
        package="apt-get install ca-certificates" ;;
    alpine)
        anchor=/usr/local/share/ca-certificates/regcache.crt
        update="update-ca-certificates"
        package="apk add ca-certificates" ;;
    suse)
        anchor=/etc/pki/trust/anchors/regcache.crt
        update="update-ca-certificates"
        package="zypper install ca-certificates" ;;
    rhel)
        anchor=/etc/pki/ca-trust/source/anchors/regcache.crt
        update="update-ca-trust extract"
        package="dnf install ca-certificates" ;;
    arch)
        anchor=/etc/ca-certificates/trust-source/anchors/regcache.crt
        update="update-ca-trust extract"
        package="pacman -S ca-certificates" ;;
esac

update_tool=${update%% *}
command -v "$update_tool" >/dev/null 2>&1 ||
    die "$update_tool is missing. Install it ($package) and run this again."

if put_file "$tmp/ca.crt" "$anchor" 0644; then
    say "installed the CA as $anchor; running $update"
    # $update is one of the fixed commands above; split on purpose.
    # shellcheck disable=SC2086
    if ! $update >"$tmp/update.log" 2>&1; then
        cat "$tmp/update.log" >&2
        die "$update failed"
    fi
    changed=1
else
    say "the CA is already in the trust store ($anchor)"
fi

if put_file "$tmp/ca.crt" "$CA_COPY" 0644; then
    say "copied the CA to $CA_COPY"
fi

# --- systemd drop-ins ---------------------------------------------------------

# systemd expands %-specifiers in Environment=; a literal % is written %%.
systemd_escape() { printf '%s' "$1" | sed 's/%/%%/g'; }

write_dropin() {
    unit=$1
    dir=/etc/systemd/system/$unit.service.d
    file=$dir/http-proxy.conf
    {
        printf '# Written by regcache setup.sh: %s pulls images through regcache.\n' "$unit"
        printf '# Apply changes with: systemctl daemon-reload && systemctl restart %s\n' "$unit"
        printf '[Service]\n'
        printf 'Environment="HTTPS_PROXY=%s"\n' "$(systemd_escape "$REGCACHE_URL")"
        printf 'Environment="HTTP_PROXY=%s"\n' "$(systemd_escape "$REGCACHE_URL")"
        printf 'Environment="NO_PROXY=%s"\n' "$(systemd_escape "$REGCACHE_NO_PROXY")"
    } >"$tmp/$unit.conf"

    if [ -f "$file" ] && cmp -s "$tmp/$unit.conf" "$file" 2>/dev/null; then
        say "$file is up to date"
        return 0
    fi
    if [ -f "$file" ] && ! grep -q 'regcache setup.sh' "$file"; then
        backup=$file.orig-$(date +%Y%m%d%H%M%S)
        mv "$file" "$backup"
        warn "moved your $file to $backup (systemd ignores it there); copy back any settings you still need"
    fi
    if ! systemctl cat "$unit.service" >/dev/null 2>&1; then
        warn "no $unit.service on this host; writing the drop-in anyway"
    fi
    put_file "$tmp/$unit.conf" "$file" 0644 || true
    say "wrote $file"
    changed=1
}

for unit in $units; do
    write_dropin "$unit"
done

# --- restart, only when asked -------------------------------------------------

# True when the running $1.service lacks this run's proxy setting, e.g. after
# an earlier run that wrote the drop-in without --restart.
runs_without_proxy() {
    pid=$(systemctl show -p MainPID --value "$1.service" 2>/dev/null || true)
    case $pid in '' | 0) return 1 ;; esac
    [ -r "/proc/$pid/environ" ] || return 1
    ! tr '\000' '\n' <"/proc/$pid/environ" | grep -qxF "HTTPS_PROXY=$REGCACHE_URL"
}

if [ -n "$units" ]; then
    # containerd first: on some distributions docker.service requires it and
    # follows its restarts anyway.
    ordered=
    case " $units " in *" containerd "*) ordered=containerd ;; esac
    case " $units " in *" docker "*) ordered="$ordered docker" ;; esac
    ordered=${ordered# }

    if [ "$REGCACHE_RESTART" != 1 ]; then
        if [ "$changed" = 1 ]; then
            say "to apply, run: systemctl daemon-reload && systemctl restart $ordered"
        fi
    else
        if [ "$changed" = 1 ]; then
            systemctl daemon-reload || die "systemctl daemon-reload failed"
        fi
        for unit in $ordered; do
            if ! systemctl is-active --quiet "$unit.service"; then
                say "$unit is not running; it will use the new settings when it starts"
            elif [ "$changed" = 1 ] || runs_without_proxy "$unit"; then
                say "restarting $unit"
                systemctl restart "$unit.service" ||
                    die "restarting $unit failed; see: journalctl -u $unit.service"
            else
                say "$unit already runs with these settings; not restarting it"
            fi
        done
    fi
elif [ "$changed" = 1 ]; then
    say "restart running dockerd, containerd or buildkitd so they load the new CA"
fi

say "done. Registry clients use: HTTPS_PROXY=$REGCACHE_URL"
