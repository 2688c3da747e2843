#!/usr/bin/env bash
# Volatility ends with the file's last close, and the data with it is safe again.
# Usage: last_close.sh MOUNTPOINT (a volfs mount)
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
checksum=$(cksum <"$file")

# Given the path, vrangectl's own descriptor is the only one: the marking ends as it exits
# (and vrangectl warns so on stderr).
expect "marked=1048576 purged=0" vrangectl volatile "$file" 0 1M 2>/dev/null
expect "volatile=0 purged=0" vrangectl status "$file"

# Held open by the shell, the marking lasts...
exec 3<>"$file"
expect "marked=1048576 purged=0" vrangectl volatile /dev/fd/3 0 1M
expect "volatile=1048576 purged=0" vrangectl status "$file"

# ...until the shell closes the last descriptor: nothing is volatile any more, a purge finds
# nothing to take, and the data is intact.
exec 3>&-
expect "volatile=0 purged=0" vrangectl status "$file"
expect "purged=0" vrangectl purge "$mnt"
[ "$(cksum <"$file")" = "$checksum" ]
