#!/usr/bin/env bash
# Prepare a Debian machine for volfs, as root:
#   - the Debian packages volfs needs and its tests use;
#   - /dev/fuse usable by every user (mode 0666, what Debian's udev rules give it);
#   - volfs for every user: a virtualenv in /usr/local/lib/volfs (Debian's python3) holding
#     this checkout's volfs; `volfs` (for mount -t fuse.volfs and fstab) and `vrangectl` in
#     /usr/local/bin; volfs.h in /usr/local/include with volfs.pc for pkg-config; the man pages
#     volfs(7), volfs(8) and vrangectl(1) in /usr/local/share/man;
#   - a virtualenv for development in .venv: this checkout, editable, with the test tools.
# Idempotent: a second run finds everything in place, changes nothing, needs no network and
# prints nothing. It reinstalls what this checkout has changed since, and says so when the
# installed volfs came from another checkout.
# VOLFS_VENV overrides the development virtualenv's location, VOLFS_PREFIX /usr/local.
set -euo pipefail
umask 022

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VOLFS_VENV:-$repo/.venv}
prefix=${VOLFS_PREFIX:-/usr/local}
installed=$prefix/lib/volfs
packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv fio stress-ng util-linux
    attr man-db passwd)

say() { echo "setup.sh: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    say "run as root (it installs Debian packages and files under $prefix)"
    exit 1
fi

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# systemd-analyze lets the tests check the shipped units; optional, so failing here only warns,
# once: a later run does not try again.
no_systemd=$installed/systemd-analyze-unavailable
if ! command -v systemd-analyze >/dev/null && [ ! -e "$no_systemd" ]; then
    if apt-get update -qq && apt-cache show systemd >/dev/null 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; then
        say "installed systemd for systemd-analyze"
    else
        say "systemd-analyze is unavailable; the unit checks will be skipped"
        mkdir -p "$installed" && touch "$no_systemd"
    fi
fi

# FUSE needs its device; a container may have the module but not the node, nor udev's mode.
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
[ -e /dev/fuse ] || { say "/dev/fuse is missing; FUSE is not available"; exit 1; }
if [ "$(stat -c %a /dev/fuse)" != 666 ]; then
    if chmod 0666 /dev/fuse 2>/dev/null; then
        say "/dev/fuse made usable by every user (mode 0666, as Debian's udev rules make it)"
    else
        say "cannot make /dev/fuse usable by every user (mode 0666): only root can mount"
    fi
fi

# The digest of what a build of volfs is made from, to tell whether an install is current.
source_digest() {
    (cd "$repo" && find pyproject.toml setup.py README.md volfs -type f \
        ! -name '*.so' ! -name '*.pyc' ! -path '*.egg-info/*' -print0 | sort -z \
        | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}
digest=$(source_digest)

# volfs for every user, in a virtualenv of the system's python3 outside any home directory.
stamp=$installed/volfs-source
# -I: the installed volfs, whatever the current directory holds.
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest $repo" ] \
    || ! "$installed/bin/python" -I -c 'import volfs.daemon.main' 2>/dev/null; then
    if [ -s "$stamp" ] && [ "$(cut -d' ' -f2- "$stamp")" != "$repo" ]; then
        say "replacing the volfs in $installed, built from $(cut -d' ' -f2- "$stamp"), with $repo's"
    fi
    # --clear: a virtualenv a failed run or a newer python3 left broken is made anew.
    /usr/bin/python3 -m venv --clear "$installed"
    "$installed/bin/python" -m pip install -q --no-warn-script-location "$repo"
    echo "$digest $repo" >"$stamp"
fi

# Put $1 at $2 as a link; say so if it pointed elsewhere before.
place_link() {
    local target=$1 link=$2 before
    before=$(readlink "$link" 2>/dev/null || true)
    [ "$before" = "$target" ] && return
    if [ -n "$before" ]; then
        say "$link pointed at $before; now at $target"
    elif [ -e "$link" ]; then
        say "$link was not a link; replaced by a link to $target"
    fi
    mkdir -p "$(dirname "$link")"
    ln -sfn "$target" "$link"
}

# Copy $1 to $2 unless it is there already.
place_file() {
    cmp -s "$1" "$2" 2>/dev/null || install -D -m 0644 "$1" "$2"
}

for command in volfs vrangectl; do
    place_link "$installed/bin/$command" "$prefix/bin/$command"
done
package=$("$installed/bin/python" -I -c 'import os, volfs; print(os.path.dirname(volfs.__file__))')
version=$("$installed/bin/python" -I -c 'import volfs; print(volfs.__version__)')
place_file "$package/include/volfs.h" "$prefix/include/volfs.h"
shopt -s nullglob
for page in "$package"/man/*.[0-9]; do
    place_file "$page" "$prefix/share/man/man${page##*.}/$(basename "$page")"
done
pc=$(mktemp)
cat >"$pc" <<EOF
prefix=$prefix
includedir=\${prefix}/include

Name: volfs
Description: volfs's ioctl ABI and segment tables for C (header only)
Version: $version
Cflags: -I\${includedir}
EOF
place_file "$pc" "$prefix/share/pkgconfig/volfs.pc"
rm -f "$pc"

# The development virtualenv: editable, so a change to the Python sources needs nothing; the C
# sources and the dependencies are built in again when they change.
build_digest=$(cd "$repo" && cat pyproject.toml setup.py volfs/__init__.py volfs/*.c \
    volfs/daemon/*.c volfs/include/*.h | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
if [ "$(cat "$venv/volfs-build" 2>/dev/null)" != "$build_digest" ] \
    || ! "$venv/bin/python" -I -c 'import volfs._segments, volfs.daemon._bridge, pytest' 2>/dev/null
then
    "$venv/bin/python" -m pip install -q -e "$repo[test]"
    echo "$build_digest" >"$venv/volfs-build"
fi
