#!/usr/bin/env bash
# Mark a file volatile, purge it as memory pressure would, and learn on unmarking that the
# data is gone. Usage: mark_purge_unmark.sh MOUNTPOINT (a volfs mount)
set -euo pipefail
mnt=$1
file=$mnt/cache.bin

# expect OUTPUT COMMAND...: run COMMAND, show its output, fail unless it is exactly OUTPUT.
expect() {
    local want=$1 got
    shift
    got=$("$@")
    printf '%s\n' "$got"
    [ "$got" = "$want" ] || { printf 'expected: %s\n' "$want" >&2; exit 1; }
}

head -c 1M /dev/urandom >"$file"

# The shell holds the file open: volatility lasts only while some descriptor is open, and
# vrangectl's own closes when it exits.
exec 3<>"$file"
expect "marked=1048576 purged=0" vrangectl volatile /dev/fd/3 0 1M
expect "volatile=1048576 purged=0" vrangectl status /dev/fd/3

expect "purged=1048576" vrangectl purge "$mnt"
expect "volatile=1048576 purged=1048576" vrangectl status /dev/fd/3

# Unmarking tells the program to regenerate: the purged bytes read as zeros from now on.
expect "marked=1048576 purged=1" vrangectl nonvolatile /dev/fd/3 0 1M
expect "volatile=0 purged=0" vrangectl status /dev/fd/3
[ "$(sha256sum <"$file")" = "$(head -c 1M /dev/zero | sha256sum)" ]

# The purge was reported once; a new cycle starts clean.
expect "marked=1048576 purged=0" vrangectl volatile /dev/fd/3 0 1M
expect "marked=1048576 purged=0" vrangectl nonvolatile /dev/fd/3 0 1M
exec 3>&-
