"""The machine's memory as ``/proc/meminfo`` reports it: defaults and watermarks read it here."""

from __future__ import annotations

import errno

MEMINFO_PATH = "/proc/meminfo"


def meminfo(field: str) -> int:
    """Return one field of /proc/meminfo: bytes for those in kB, else the number as is.

    Args:
        field: the name before the colon, e.g. ``MemTotal`` or ``MemAvailable``.

    Raises:
        OSError: the file cannot be read, or has no such field (ENOENT).
    """
    prefix = f"{field}:"
    with open(MEMINFO_PATH, encoding="ascii") as lines:
        for line in lines:
            if line.startswith(prefix):
                number, *unit = line[len(prefix) :].split()
                return int(number) * 1024 if unit == ["kB"] else int(number)
    raise OSError(errno.ENOENT, f"{field} missing from {MEMINFO_PATH}")
