"""Volatile ranges for applications: thin wrappers over the volfs ioctls.

Example::

    fd = os.open("/mnt/vol/cache.bin", os.O_RDWR)
    fvrange(fd, 0, 1 << 20, VRANGE_VOLATILE)           # the system may drop this now
    ...
    with pinned(fd, 0, 1 << 20) as pin:                  # non-volatile inside the block
        if pin.purged:
            regenerate(fd)                               # the data was thrown away
        use(fd)
    # volatile again here

Volatility lasts while any descriptor of the file is open, in any process.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from volfs.abi import (
    PAGE_SIZE,
    VOLFS_IOC_PURGE,
    VOLFS_IOC_STATS,
    VOLFS_IOC_VRANGE,
    VOLFS_IOC_VRANGE_NEXT,
    VOLFS_IOC_VRANGE_STATUS,
    VOLFS_PURGE,
    VOLFS_STATS,
    VOLFS_STATS_FIELDS,
    VRANGE_ARGS,
    VRANGE_FULL,
    VRANGE_NEXT,
    VRANGE_NONVOLATILE,
    VRANGE_PARTIAL,
    VRANGE_STATUS,
    VRANGE_VOLATILE,
)

__all__ = [
    "PAGE_SIZE",
    "VOLFS_IOC_PURGE",
    "VOLFS_IOC_VRANGE",
    "VOLFS_IOC_VRANGE_NEXT",
    "VOLFS_IOC_VRANGE_STATUS",
    "VRANGE_FULL",
    "VRANGE_NONVOLATILE",
    "VRANGE_PARTIAL",
    "VRANGE_VOLATILE",
    "Pin",
    "VRange",
    "fvrange",
    "pinned",
    "purge",
    "statistics",
    "vrange_ranges",
    "vrange_status",
]


def fvrange(
    fd: int, start: int, length: int, mode: int, flags: int = VRANGE_FULL
) -> tuple[int, bool]:
    """Mark ``[start, start+length)`` of an open file volatile or non-volatile.

    Args:
        fd: a descriptor open for writing on a volfs file.
        start: byte offset, a multiple of 4096.
        length: a multiple of 4096; 0 means up to the page-rounded end of the file.
        mode: :data:`VRANGE_VOLATILE` or :data:`VRANGE_NONVOLATILE`.
        flags: :data:`VRANGE_FULL` (purged as a whole) or :data:`VRANGE_PARTIAL`.

    Returns:
        ``(marked, purged)``: the bytes set to ``mode``, and for NON_VOLATILE whether any of
        them had been purged (their contents are zeros now).

    Raises:
        OSError: EINVAL for a bad span, mode or flag; EBADF for a read-only descriptor;
            ENOTTY if the file is not on volfs.
    """
    buffer = bytearray(VRANGE_ARGS.pack(start, length, mode, flags, 0, 0, 0))
    fcntl.ioctl(fd, VOLFS_IOC_VRANGE, buffer, True)
    _start, _length, _mode, _flags, marked, purged, _reserved = VRANGE_ARGS.unpack(buffer)
    return marked, bool(purged)


def vrange_status(fd: int, start: int = 0, length: int = 0) -> tuple[int, int]:
    """Return ``(volatile bytes, purged bytes)`` of a span (default: the whole file).

    Purged bytes are those purged and not rewritten or unmarked since: reading them fails.
    """
    buffer = bytearray(VRANGE_STATUS.pack(start, length, 0, 0))
    fcntl.ioctl(fd, VOLFS_IOC_VRANGE_STATUS, buffer, True)
    _start, _length, volatile, purged = VRANGE_STATUS.unpack(buffer)
    return volatile, purged


class VRange(NamedTuple):
    """One volatile range of a file, as :func:`vrange_ranges` lists it."""

    #: First byte.
    start: int
    #: End (exclusive).
    end: int
    #: :data:`VRANGE_FULL` or :data:`VRANGE_PARTIAL`, as it was marked.
    flags: int
    #: Some of it was purged since it was marked: NON_VOLATILE over it would report purged.
    purged: bool


def vrange_ranges(fd: int, start: int = 0) -> Iterator[VRange]:
    """Yield the volatile ranges of an open file that end after ``start``, in file order.

    Ranges that only touch are listed separately, and a purge that took the tail of a PARTIAL
    range leaves that tail a range of its own. Each range is one VOLFS_IOC_VRANGE_NEXT call,
    O(log n) in the file's ranges; ranges changed meanwhile by others show as they are then.

    Args:
        fd: any descriptor of a volfs file, read-only included.
        start: a multiple of 4096; a range holding it is listed whole.

    Raises:
        OSError: EINVAL for an unaligned start or a non-regular file, EISDIR for a directory,
            ENOTTY if the file is not on volfs.
    """
    while True:
        buffer = bytearray(VRANGE_NEXT.pack(start, 0, 0, 0, 0))
        fcntl.ioctl(fd, VOLFS_IOC_VRANGE_NEXT, buffer, True)
        _start, range_start, range_end, flags, purged = VRANGE_NEXT.unpack(buffer)
        if range_end == 0:
            return
        if range_end <= start:
            raise OSError(
                errno.EIO, f"VOLFS_IOC_VRANGE_NEXT answered a range ending at {range_end}"
            )
        yield VRange(range_start, range_end, flags, bool(purged))
        start = range_end


def _ioctl_on(path_or_fd: str | os.PathLike[str] | int, cmd: int, buffer: bytearray) -> None:
    """ioctl on a descriptor, or on a path opened just for it (files and directories alike)."""
    if isinstance(path_or_fd, int):
        fcntl.ioctl(path_or_fd, cmd, buffer, True)
        return
    fd = os.open(path_or_fd, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, cmd, buffer, True)
    finally:
        os.close(fd)


def purge(path_or_fd: str | os.PathLike[str] | int, nbytes: int = 0) -> int:
    """Purge volatile data of the whole mount, oldest first; return the bytes freed.

    Args:
        path_or_fd: any file or directory on the mount, or a descriptor of one.
        nbytes: purge at least this much; 0 purges all volatile data.

    Raises:
        OSError: EPERM unless root or the user who mounted the filesystem.
    """
    buffer = bytearray(VOLFS_PURGE.pack(nbytes, 0))
    _ioctl_on(path_or_fd, VOLFS_IOC_PURGE, buffer)
    _wanted, purged = VOLFS_PURGE.unpack(buffer)
    return int(purged)


def statistics(path_or_fd: str | os.PathLike[str] | int) -> dict[str, int]:
    """Return the counters of the mount holding ``path_or_fd`` (see ``struct volfs_stats``)."""
    buffer = bytearray(VOLFS_STATS.size)
    _ioctl_on(path_or_fd, VOLFS_IOC_STATS, buffer)
    values = VOLFS_STATS.unpack(buffer)
    return dict(zip(VOLFS_STATS_FIELDS, values, strict=False))


@dataclass(frozen=True, slots=True)
class Pin:
    """What :func:`pinned` found when it made the range non-volatile."""

    #: Some of the range had been purged: its contents are zeros and must be regenerated.
    purged: bool


@contextmanager
def pinned(fd: int, start: int, length: int, flags: int = VRANGE_FULL) -> Iterator[Pin]:
    """Keep a range non-volatile for the block, volatile again afterwards (even on error).

    Yields:
        A :class:`Pin` telling whether the data survived while the range was volatile.
    """
    _marked, purged = fvrange(fd, start, length, VRANGE_NONVOLATILE)
    try:
        yield Pin(purged)
    finally:
        fvrange(fd, start, length, VRANGE_VOLATILE, flags)
