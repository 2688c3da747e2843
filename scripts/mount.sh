#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and mount a volfs.
# Usage: scripts/mount.sh MOUNTPOINT [-o OPTIONS]     e.g. scripts/mount.sh /mnt/vol -o size=1G
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ $# -lt 1 ]; then
    echo "usage: scripts/mount.sh MOUNTPOINT [-o OPTIONS]" >&2
    exit 2
fi
mountpoint=$1
shift
"$repo/scripts/setup.sh"
mkdir -p "$mountpoint"
volfs "$@" "$mountpoint"
echo "volfs mounted on $mountpoint; unmount with: umount $mountpoint" >&2
