#!/usr/bin/env bash
# Volatility belongs to the file, not to a process: a second shell with its own descriptor
# sees and changes what the first one marked, and its changes outlive it while the first
# shell keeps the file open. Usage: two_shells.sh MOUNTPOINT (a volfs mount)
set -euo pipefail
mnt=$1
file=$mnt/shared.bin

# expect OUTPUT COMMAND...: run COMMAND, show its output, fail unless it is exactly OUTPUT.
expect() {
    local want=$1 got
    shift
    got=$("$@")
    printf '%s\n' "$got"
    [ "$got" = "$want" ] || { printf 'expected: %s\n' "$want" >&2; exit 1; }
}
export -f expect

head -c 1M /dev/urandom >"$file"
exec 3<>"$file"
expect "marked=524288 purged=0" vrangectl volatile /dev/fd/3 0 512K

# The second shell: another bash process that does not inherit our descriptor 3 (3>&-) and
# opens the file itself.
bash -c '
    set -euo pipefail
    [ ! -e /dev/fd/3 ] || { echo "the second shell inherited descriptor 3" >&2; exit 1; }
    exec 4<>"$1"
    expect "volatile=524288 purged=0" vrangectl status /dev/fd/4
    expect "marked=131072 purged=0" vrangectl nonvolatile /dev/fd/4 0 128K
    expect "marked=262144 purged=0" vrangectl volatile /dev/fd/4 768K 256K
' second "$file" 3>&-

# The second shell has closed its descriptor and exited; ours keeps its changes alive.
expect "volatile=655360 purged=0
 START      END    SIZE  FLAGS  STATE
131072   524288  393216  FULL   intact
786432  1048576  262144  FULL   intact" vrangectl status /dev/fd/3 --ranges

bash -c 'expect "purged=655360" vrangectl purge "$1"' second "$mnt" 3>&-
expect "marked=1048576 purged=1" vrangectl nonvolatile /dev/fd/3 0 1M
exec 3>&-
