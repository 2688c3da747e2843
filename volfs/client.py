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
import mmap
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple

from volfs import _segments
from volfs.abi import (
    PAGE_SIZE,
    PEER_CREDENTIALS,
    SEGMENT_FREE,
    SEGMENT_HANDOVER_SECONDS,
    SEGMENT_HANDOVER_STATUS,
    SEGMENT_SLOT,
    SEGMENT_STALE,
    SEGMENT_TABLE_HEADER,
    VOLFS_FILE_INFO,
    VOLFS_IOC_FILE_INFO,
    VOLFS_IOC_PURGE,
    VOLFS_IOC_SEGMENT_REGISTER,
    VOLFS_IOC_SEGMENT_RELEASE,
    VOLFS_IOC_SEGMENTS,
    VOLFS_IOC_STATS,
    VOLFS_IOC_VRANGE,
    VOLFS_IOC_VRANGE_NEXT,
    VOLFS_IOC_VRANGE_STATUS,
    VOLFS_PURGE,
    VOLFS_SEGMENT,
    VOLFS_SEGMENTS,
    VOLFS_SEGMENTS_EXISTING,
    VOLFS_STATS,
    VOLFS_STATS_FIELDS,
    VRANGE_ARGS,
    VRANGE_FULL,
    VRANGE_NEXT,
    VRANGE_NONVOLATILE,
    VRANGE_PARTIAL,
    VRANGE_STATUS,
    VRANGE_VOLATILE,
    FileInfo,
    segment_slot_offset,
)

__all__ = [
    "PAGE_SIZE",
    "VOLFS_IOC_FILE_INFO",
    "VOLFS_IOC_PURGE",
    "VOLFS_IOC_VRANGE",
    "VOLFS_IOC_VRANGE_NEXT",
    "VOLFS_IOC_VRANGE_STATUS",
    "VRANGE_FULL",
    "VRANGE_NONVOLATILE",
    "VRANGE_PARTIAL",
    "VRANGE_VOLATILE",
    "FileInfo",
    "Pin",
    "Segment",
    "SegmentSlot",
    "SegmentTable",
    "VRange",
    "file_info",
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


def file_info(fd: int) -> FileInfo:
    """Return what a regular file holds: its size, its memory, its volatile and purged bytes
    (as :func:`vrange_status` counts them), its openers and its segments, in one round trip.

    Args:
        fd: any descriptor of a regular volfs file, read-only included. It counts among the
            openers: ``openers == 1`` means nobody else has the file open, so its volatility
            ends when ``fd`` closes.

    Raises:
        OSError: EISDIR for a directory, ENOTTY for a FIFO or device node (the kernel answers
            their ioctls itself) or a file not on volfs.
    """
    buffer = bytearray(VOLFS_FILE_INFO.size)
    fcntl.ioctl(fd, VOLFS_IOC_FILE_INFO, buffer, True)
    return FileInfo.unpack(buffer)


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


class SegmentTable:
    """The segment table of a volfs file, mapped into this process (see volfs.h).

    Example::

        table = SegmentTable(fd)
        segment = table.register(0, 1 << 20)        # pinned
        segment.unpin()                             # the system may drop it now
        with segment.pinned() as purged:            # no system call
            if purged:
                regenerate(fd)

    Every process with the file open for writing may get the table and pin or unpin any of
    its segments; one with a read-only descriptor sees their states only. The table lives
    until the file's last close; after that pin and unpin fail with ESTALE.
    """

    def __init__(self, fd: int, capacity: int = 0, *, create: bool = True) -> None:
        """Get the table of the volfs file open as ``fd``, creating it with ``capacity``
        slots (0: 1024) if the file has none and ``create`` allows.

        Raises:
            OSError: ENOTTY if the file is not on volfs; ENOENT if it has no table and
                ``create`` is False; EINVAL for a capacity past 131072; ENOSPC if the table
                does not fit under ``size=``; EPERM if the socket is not the daemon's; what
                connecting to the daemon raises.
        """
        flags = 0 if create else VOLFS_SEGMENTS_EXISTING
        request = bytearray(VOLFS_SEGMENTS.pack(capacity, flags, 0, 0, b"", b""))
        fcntl.ioctl(fd, VOLFS_IOC_SEGMENTS, request, True)
        _capacity, _flags, pid, granted, token, name = VOLFS_SEGMENTS.unpack(request)
        memfd = _receive_table(pid, token, name.split(b"\0", 1)[0])
        try:
            self.writable = fcntl.fcntl(memfd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
            size = os.fstat(memfd).st_size
            if size < SEGMENT_TABLE_HEADER.size + granted * SEGMENT_SLOT.size:
                raise OSError(errno.EPROTO, "the daemon sent a table smaller than announced")
            protection = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
            self._map = mmap.mmap(memfd, size, prot=protection)
        finally:
            os.close(memfd)
        #: The descriptor registering and releasing go through (not closed by the table).
        self.fd = fd
        #: Slots of the table.
        self.capacity = granted
        #: The daemon's pid: a pin waiting for a purge stops if it is gone.
        self.daemon_pid = pid

    def register(self, offset: int, length: int, *, partial: bool = False) -> Segment:
        """Register bytes ``[offset, offset+length)`` as a segment, pinned (a round trip).

        Raises:
            OSError: EBADF if the descriptor is read-only; EINVAL for a bad span; EBUSY if
                it overlaps a segment, a volatile range or purged data nobody was told of;
                ENOSPC if the table is full.
        """
        flags = VRANGE_PARTIAL if partial else VRANGE_FULL
        request = bytearray(VOLFS_SEGMENT.pack(offset, length, flags, 0))
        fcntl.ioctl(self.fd, VOLFS_IOC_SEGMENT_REGISTER, request, True)
        index = VOLFS_SEGMENT.unpack(request)[3]
        return Segment(self, index, offset, length, partial)

    def state(self, index: int) -> int:
        """The state word of slot ``index`` (``volfs.abi.SEGMENT_*``)."""
        return _segments.state(self._map, index)

    def slots(self) -> Iterator[SegmentSlot]:
        """The slots holding a segment, in slot order, as the table shows them now (the
        span and flags as registered, unless a holder of the table overwrote them)."""
        for index in range(self.capacity):
            state, flags, _stamp, start, length = SEGMENT_SLOT.unpack_from(
                self._map, segment_slot_offset(index)
            )
            if state != SEGMENT_FREE:
                yield SegmentSlot(index, start, length, flags, self.state(index))

    def close(self) -> None:
        """Unmap the table; its segments stay as they are."""
        self._map.close()

    def __enter__(self) -> SegmentTable:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class SegmentSlot(NamedTuple):
    """One slot of a table holding a segment, as :meth:`SegmentTable.slots` lists it."""

    #: The segment's index in its table.
    slot: int
    start: int
    length: int
    #: :data:`VRANGE_FULL` or :data:`VRANGE_PARTIAL`, as registered.
    flags: int
    #: ``volfs.abi.SEGMENT_*``.
    state: int


@dataclass(frozen=True, slots=True)
class Segment:
    """One registered segment of a :class:`SegmentTable`."""

    table: SegmentTable
    index: int
    offset: int
    length: int
    partial: bool

    def pin(self) -> bool:
        """Make the segment non-volatile; return True if it was purged while unpinned (its
        bytes read as zeros now). No system call unless a purge is under way (then it
        waits for it).

        Raises:
            OSError: ESTALE once the file's volatility ended (last close, unmount), EBADF
                for a read-only table, EINVAL for a released segment.
        """
        self._writable()
        return _segments.pin(self.table._map, self.index, self.table.daemon_pid)

    def unpin(self) -> None:
        """Make the segment volatile: the system may purge it from now on. No system call.

        Raises:
            OSError: as :meth:`pin`.
        """
        self._writable()
        _segments.unpin(self.table._map, self.index)

    def release(self) -> None:
        """End the segment (a round trip): no longer volatile, its slot free again."""
        request = bytearray(VOLFS_SEGMENT.pack(0, 0, 0, self.index))
        fcntl.ioctl(self.table.fd, VOLFS_IOC_SEGMENT_RELEASE, request, True)

    @property
    def state(self) -> int:
        """The segment's state word (``volfs.abi.SEGMENT_*``)."""
        return self.table.state(self.index)

    @property
    def stale(self) -> bool:
        """True once the file's volatility ended: the table is dead."""
        return self.state == SEGMENT_STALE

    @contextmanager
    def pinned(self) -> Iterator[bool]:
        """Pinned for the block, unpinned afterwards (even on error); yields whether the
        segment had been purged."""
        purged = self.pin()
        try:
            yield purged
        finally:
            self.unpin()

    def _writable(self) -> None:
        if not self.table.writable:
            raise OSError(errno.EBADF, "the table was obtained through a read-only descriptor")


def _receive_table(pid: int, token: bytes, name: bytes) -> int:
    """Redeem a token at the daemon's socket; return the table's memfd."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(SEGMENT_HANDOVER_SECONDS)
        connection.connect(b"\0" + name)
        credentials = connection.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CREDENTIALS.size
        )
        peer_pid, _uid, _gid = PEER_CREDENTIALS.unpack(credentials)
        if peer_pid != pid:
            raise OSError(errno.EPERM, "the segment socket is not the daemon's")
        connection.sendall(token)
        message, fds, _flags, _address = socket.recv_fds(
            connection, SEGMENT_HANDOVER_STATUS.size, 1
        )
        try:
            if len(message) != SEGMENT_HANDOVER_STATUS.size:
                raise OSError(errno.EPROTO, "the daemon hung up")
            (status,) = SEGMENT_HANDOVER_STATUS.unpack(message)
            if status:
                raise OSError(status, os.strerror(status))
            if len(fds) != 1:
                raise OSError(errno.EPROTO, "the daemon sent no table")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds[0]
