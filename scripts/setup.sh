#!/usr/bin/env bash
# Prepare a Debian machine for volfs, as root: system packages, a virtualenv in .venv with
# volfs and its test tools, and `volfs` (for mount -t fuse.volfs and fstab) and `vrangectl` on
# root's PATH.
# Idempotent: a second run only checks. VOLFS_VENV overrides the virtualenv's location.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VOLFS_VENV:-$repo/.venv}
packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv fio stress-ng util-linux attr)

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (it installs Debian packages)" >&2
    exit 1
fi

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# systemd-analyze lets the tests check the shipped units; optional, so failing here only warns.
if ! command -v systemd-analyze >/dev/null; then
    if apt-get update -qq && apt-cache show systemd >/dev/null 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; then
        echo "setup.sh: installed systemd for systemd-analyze" >&2
    else
        echo "setup.sh: systemd-analyze is unavailable; the unit checks will be skipped" >&2
    fi
fi

# FUSE needs its device; a container may have the module but not the node.
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
[ -e /dev/fuse ] || { echo "setup.sh: /dev/fuse is missing; FUSE is not available" >&2; exit 1; }

python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
"$venv/bin/python" -m pip install -q -e "$repo[test]"

ln -sf "$venv/bin/volfs" /usr/local/bin/volfs
ln -sf "$venv/bin/vrangectl" /usr/local/bin/vrangectl
