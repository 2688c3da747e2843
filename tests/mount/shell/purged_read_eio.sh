#!/usr/bin/env bash
# Reading purged data that is still volatile fails with EIO; the pages around it stay
# readable, and after unmarking the purged pages read as zeros.
# Usage: purged_read_eio.sh MOUNTPOINT (a volfs mount)
set -euo pipefail
mnt=$1
file=$mnt/tiles.bin

# expect OUTPUT COMMAND...: run COMMAND, show its output, fail unless it is exactly OUTPUT.
expect() {
    local want=$1 got
    shift
    got=$("$@")
    printf '%s\n' "$got"
    [ "$got" = "$want" ] || { printf 'expected: %s\n' "$want" >&2; exit 1; }
}

head -c 64K /dev/urandom >"$file"
exec 3<>"$file"
expect "marked=16384 purged=0" vrangectl volatile /dev/fd/3 16K 16K
expect "purged=16384" vrangectl purge "$mnt"

# The 16 KiB before the purged range are intact.
dd if="$file" of=/dev/null bs=4K count=4 status=none

# dd over the purged range must fail, and say why.
status=0
message=$(dd if="$file" of=/dev/null bs=4K skip=4 count=1 status=none 2>&1) || status=$?
echo "dd exit status $status"
[ "$status" -ne 0 ] || { echo "dd read purged data" >&2; exit 1; }
case $message in
    *"Input/output error"*) echo "dd: Input/output error" ;;
    *) printf 'dd failed otherwise: %s\n' "$message" >&2; exit 1 ;;
esac

expect "marked=16384 purged=1" vrangectl nonvolatile /dev/fd/3 16K 16K
zeros=$(head -c 16K /dev/zero | sha256sum)
[ "$(dd if="$file" bs=4K skip=4 count=4 status=none | sha256sum)" = "$zeros" ]
exec 3>&-
