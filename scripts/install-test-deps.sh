#!/usr/bin/env bash
# Install the external tools the chainvault test suite uses (idempotent).
#
# Checks every tool first; only when something is missing does it run
# `apt-get update` once and `apt-get install` the Debian packages that
# provide the missing tools. Needs root for that; without root it exits
# non-zero and names the packages to install.
#
# Also installs cargo-nextest with `cargo install --locked` if it is missing
# (it is normally preinstalled).
set -euo pipefail

log() { printf '==> install-test-deps: %s\n' "$*"; }

# tool  package   (tools may live in sbin directories that are not on a
# non-root PATH, so those are searched too)
TOOLS=(
    "qemu-img qemu-utils"
    "qemu-io qemu-utils"
    "qemu-nbd qemu-utils"
    "nbdinfo libnbd-bin"
    "nbdcopy libnbd-bin"
    "nbdsh libnbd-bin"
    "nbdfuse libnbd-bin"
    "nbdkit nbdkit"
    "fusermount3 fuse3"
    "mkfs.ext4 e2fsprogs"
    "debugfs e2fsprogs"
    "mkfs.fat dosfstools"
    "mcopy mtools"
    "ntfs-3g ntfs-3g"
    "mkntfs ntfs-3g"
    "sgdisk gdisk"
    "sfdisk fdisk"
    "fio fio"
    "python3 python3"
    "b3sum b3sum"
    "openssl openssl"
    "mountpoint util-linux"
    "ntfsinfo ntfs-3g"
    "ntfscat ntfs-3g"
)
# Debian packages that provide no command of their own to look for.
LIBRARY_PACKAGES=(python3-libnbd)

have_tool() {
    local t=$1 d
    command -v "$t" >/dev/null 2>&1 && return 0
    for d in /usr/local/sbin /usr/sbin /sbin /usr/local/bin /usr/bin /bin; do
        [[ -x "$d/$t" ]] && return 0
    done
    return 1
}

have_package() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == "installed" ]]
}

missing_pkgs=()
add_missing() {
    local p=$1 q
    for q in "${missing_pkgs[@]+"${missing_pkgs[@]}"}"; do
        [[ "$q" == "$p" ]] && return 0
    done
    missing_pkgs+=("$p")
}

for entry in "${TOOLS[@]}"; do
    read -r tool pkg <<<"$entry"
    if ! have_tool "$tool"; then
        log "missing tool '$tool' (Debian package $pkg)"
        add_missing "$pkg"
    fi
done
for pkg in "${LIBRARY_PACKAGES[@]}"; do
    if ! have_package "$pkg"; then
        log "missing Debian package $pkg"
        add_missing "$pkg"
    fi
done

if ((${#missing_pkgs[@]} > 0)); then
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "install-test-deps: missing Debian packages: ${missing_pkgs[*]}" >&2
        echo "install-test-deps: run as root, or: sudo apt-get install -y --no-install-recommends ${missing_pkgs[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    log "apt-get update"
    apt-get update
    log "apt-get install -y --no-install-recommends ${missing_pkgs[*]}"
    apt-get install -y --no-install-recommends "${missing_pkgs[@]}"
    # Verify: every tool must now be present.
    still=()
    for entry in "${TOOLS[@]}"; do
        read -r tool pkg <<<"$entry"
        have_tool "$tool" || still+=("$tool ($pkg)")
    done
    for pkg in "${LIBRARY_PACKAGES[@]}"; do
        have_package "$pkg" || still+=("$pkg")
    done
    if ((${#still[@]} > 0)); then
        echo "install-test-deps: still missing after install: ${still[*]}" >&2
        exit 1
    fi
else
    log "all external test tools present"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    log "cargo-nextest missing: cargo install --locked cargo-nextest"
    cargo install --locked cargo-nextest
else
    log "$(cargo nextest --version 2>/dev/null | head -n1)"
fi
log "done"
