"""The binary interfaces volfs meets: its ioctl ABI, and the kernel's limits it follows.

For the ioctls (numbers, struct layouts, constants) this module is the one definition; the
daemon, :mod:`volfs.client` and ``volfs/include/volfs.h`` agree with it (a test compiles the
header and compares). The kernel's facts below (page size, name and path limits, fallocate
modes, the largest file) are written once here for every module and tool.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import NamedTuple

PAGE_SIZE = 4096
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1

#: Largest file size: the kernel's limit for a 64-bit ``loff_t``, as on tmpfs.
MAX_FILE_SIZE = (1 << 63) - 1
#: The longest name in a directory (NAME_MAX).
NAME_MAX = 255
#: The longest path, and symlink target, its terminating NUL included (PATH_MAX).
PATH_MAX = 4096
#: The kernel's limits on extended attributes: one name, one value, and a listxattr(2) reply.
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536

#: fallocate(2) modes (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40
FALLOC_FL_WRITE_ZEROES = 0x80

#: renameat2(2) flags (linux/fs.h).
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def pages_for(nbytes: int) -> int:
    """Return the number of pages ``nbytes`` take, rounded up."""
    return (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT


def pages_spanned(offset: int, length: int) -> tuple[int, int]:
    """Return the half-open page interval ``[first, end)`` touched by a byte range."""
    return offset >> PAGE_SHIFT, pages_for(offset + length)


#: A page number past the last page of any file.
NO_PAGE = pages_for(MAX_FILE_SIZE) + 1


VRANGE_VOLATILE = 0
VRANGE_NONVOLATILE = 1
VRANGE_FULL = 0
VRANGE_PARTIAL = 1

#: struct vrange_args: start, length, mode, flags, marked, purged, reserved (40 bytes).
VRANGE_ARGS = struct.Struct("=QQIIQII")
#: struct vrange_status: start, length, volatile_bytes, purged_bytes (32 bytes).
VRANGE_STATUS = struct.Struct("=QQQQ")
#: struct volfs_purge: bytes, purged (16 bytes).
VOLFS_PURGE = struct.Struct("=QQ")
#: struct vrange_next: start, range_start, range_end, flags, purged (32 bytes).
VRANGE_NEXT = struct.Struct("=QQQII")

#: struct volfs_stats: capacity_bytes, used_bytes, volatile_bytes, purged_bytes, ranges,
#: purgeable_ranges, purges_ioctl, purges_size, purges_pressure, inodes, max_inodes,
#: segments (96 bytes).
VOLFS_STATS = struct.Struct("=12Q")
VOLFS_STATS_FIELDS = (
    "capacity_bytes",
    "used_bytes",
    "volatile_bytes",
    "purged_bytes",
    "ranges",
    "purgeable_ranges",
    "purges_ioctl",
    "purges_size",
    "purges_pressure",
    "inodes",
    "max_inodes",
    "segments",
)

#: The largest value of a ``__u64`` field.
U64_MAX = (1 << 64) - 1


def saturated(value: int) -> int:
    """``value`` clamped to what a ``__u64`` holds: counters saturate rather than wrap."""
    return min(max(value, 0), U64_MAX)


@dataclasses.dataclass(frozen=True, slots=True)
class MountStatistics:
    """The counters of a mount (``struct volfs_stats``), as ``vrangectl stats`` shows them."""

    capacity_bytes: int
    used_bytes: int
    volatile_bytes: int
    purged_bytes: int
    ranges: int
    purgeable_ranges: int
    purges_ioctl: int
    purges_size: int
    purges_pressure: int
    inodes: int
    max_inodes: int
    #: Segments registered in all files (the field was reserved, 0, before segments).
    segments: int = 0

    def pack(self) -> bytes:
        """The record VOLFS_IOC_STATS returns; a counter past 2**64 - 1 reads as 2**64 - 1."""
        return VOLFS_STATS.pack(*(saturated(value) for value in dataclasses.astuple(self)))

    def describe(self) -> str:
        """``name=value`` pairs on one line, for the log."""
        return " ".join(f"{name}={value}" for name, value in dataclasses.asdict(self).items())


assert tuple(field.name for field in dataclasses.fields(MountStatistics)) == VOLFS_STATS_FIELDS

_IOC_WRITE = 1
_IOC_READ = 2


def _iowr(kind: str, number: int, size: int) -> int:
    """Linux _IOWR(kind, number, size)."""
    return ((_IOC_READ | _IOC_WRITE) << 30) | (size << 16) | (ord(kind) << 8) | number


def _ior(kind: str, number: int, size: int) -> int:
    """Linux _IOR(kind, number, size)."""
    return (_IOC_READ << 30) | (size << 16) | (ord(kind) << 8) | number


VOLFS_IOC_VRANGE = _iowr("v", 0x80, VRANGE_ARGS.size)
VOLFS_IOC_VRANGE_STATUS = _iowr("v", 0x81, VRANGE_STATUS.size)
VOLFS_IOC_PURGE = _iowr("v", 0x82, VOLFS_PURGE.size)
#: Statistics of the whole mount, on any file or directory of it (an extension of the ABI).
VOLFS_IOC_STATS = _ior("v", 0x83, VOLFS_STATS.size)
#: The volatile range holding or following a byte, so a program can list the ranges themselves
#: (an extension of the ABI).
VOLFS_IOC_VRANGE_NEXT = _iowr("v", 0x84, VRANGE_NEXT.size)


# -- segments: volatility pinned and unpinned in shared memory --------------------------------

#: States of a segment's state word (``__u32``, changed only by compare-and-swap).
SEGMENT_FREE = 0  # the slot holds no segment
SEGMENT_PINNED = 1  # non-volatile
SEGMENT_UNPINNED = 2  # volatile, nothing purged
SEGMENT_PURGING = 3  # the daemon is purging it; a pin waits
SEGMENT_PURGED = 4  # volatile, and (some of) it was purged; the next pin reports it
SEGMENT_STALE = 5  # the file's volatility ended (last close, unmount): the table is dead

SEGMENT_TABLE_MAGIC = 0x564F4C53  # "VOLS"
SEGMENT_TABLE_VERSION = 1
#: The table's header: magic, version, capacity (slots), slot size; padded to 64 bytes.
SEGMENT_TABLE_HEADER = struct.Struct("=IIII48x")
#: One slot: state, flags (VRANGE_PARTIAL as registered), stamp (CLOCK_MONOTONIC ns of the
#: last unpin), start, length (bytes, as registered) (32 bytes).
SEGMENT_SLOT = struct.Struct("=IIQQQ")
#: Offset of a slot's stamp, written by unpin before its compare-and-swap.
SEGMENT_STAMP_OFFSET = 8
#: Slots of a table created with capacity 0.
SEGMENTS_DEFAULT = 1024
#: Slots one file's table may have.
SEGMENTS_PER_FILE_MAX = 1 << 17
#: Slots all tables of a mount may have together.
SEGMENTS_PER_MOUNT_MAX = 1 << 20
#: Bytes of a one-time token.
SEGMENT_TOKEN_BYTES = 16
#: How long a token stays valid, in seconds.
SEGMENT_TOKEN_SECONDS = 10
#: Bytes of the socket name field, its terminating NUL included.
SEGMENT_SOCKET_NAME_BYTES = 64
#: How long a client waits for the daemon's socket, in seconds.
SEGMENT_HANDOVER_SECONDS = 5
#: What SO_PEERCRED answers (struct ucred): pid, uid, gid.
PEER_CREDENTIALS = struct.Struct("=iII")
#: The daemon's answer to a token: ``__s32`` status (0, or an errno), with the table's memfd
#: attached (SCM_RIGHTS) on success.
SEGMENT_HANDOVER_STATUS = struct.Struct("=i")


def segment_table_bytes(capacity: int) -> int:
    """The size of a table of ``capacity`` slots: its header and slots, in whole pages."""
    return pages_for(SEGMENT_TABLE_HEADER.size + capacity * SEGMENT_SLOT.size) << PAGE_SHIFT


def segment_slot_offset(index: int) -> int:
    """Where slot ``index`` starts in the table."""
    return SEGMENT_TABLE_HEADER.size + index * SEGMENT_SLOT.size


#: VOLFS_IOC_SEGMENTS flag: only a table the file already has (ENOENT if none); nothing made.
VOLFS_SEGMENTS_EXISTING = 1

#: struct volfs_segments_args: capacity, flags, pid, granted, token, socket (96 bytes).
VOLFS_SEGMENTS = struct.Struct(f"=IIII{SEGMENT_TOKEN_BYTES}s{SEGMENT_SOCKET_NAME_BYTES}s")
#: struct volfs_segment_args: start, length, flags, index (24 bytes).
VOLFS_SEGMENT = struct.Struct("=QQII")

#: A one-time token for a file's segment table (creating it if the file has none).
VOLFS_IOC_SEGMENTS = _iowr("v", 0x85, VOLFS_SEGMENTS.size)
#: Register a segment in a file's table; it starts pinned.
VOLFS_IOC_SEGMENT_REGISTER = _iowr("v", 0x86, VOLFS_SEGMENT.size)
#: Release a segment: its volatility ends, its slot is free again.
VOLFS_IOC_SEGMENT_RELEASE = _iowr("v", 0x87, VOLFS_SEGMENT.size)

#: struct volfs_file_info: size, resident_bytes, volatile_bytes, purged_bytes, openers,
#: segments, reserved[2] (64 bytes).
VOLFS_FILE_INFO = struct.Struct("=8Q")


class FileInfo(NamedTuple):
    """What VOLFS_IOC_FILE_INFO tells of one regular file (``struct volfs_file_info``)."""

    #: ``st_size``.
    size: int
    #: Bytes of memory the file's data holds: its pages, as ``st_blocks`` counts them.
    resident_bytes: int
    #: Volatile bytes: in volatile ranges and unpinned segments (VOLFS_IOC_VRANGE_STATUS).
    volatile_bytes: int
    #: Bytes purged and not rewritten or unmarked since (VOLFS_IOC_VRANGE_STATUS).
    purged_bytes: int
    #: Open file descriptions of the file, in all processes (the asker's own included).
    openers: int
    #: Segments registered in the file's table.
    segments: int

    def pack(self) -> bytes:
        """The record VOLFS_IOC_FILE_INFO returns: the fields, then zeros for the reserved."""
        reserved = VOLFS_FILE_INFO.size // 8 - len(self)
        return VOLFS_FILE_INFO.pack(*(saturated(value) for value in self), *[0] * reserved)

    @classmethod
    def unpack(cls, record: bytes | bytearray) -> FileInfo:
        """The fields of a VOLFS_IOC_FILE_INFO record; the reserved ones are ignored."""
        return cls(*VOLFS_FILE_INFO.unpack(record)[: len(cls._fields)])


#: Size, memory, volatility and openers of a regular file in one round trip (an extension of
#: the ABI, for listing a mount's files).
VOLFS_IOC_FILE_INFO = _ior("v", 0x88, VOLFS_FILE_INFO.size)

#: The numbers as published in volfs.h: what C programs were compiled with.
_PUBLISHED_NUMBERS = (
    (VOLFS_IOC_VRANGE, 0xC0287680),
    (VOLFS_IOC_VRANGE_STATUS, 0xC0207681),
    (VOLFS_IOC_PURGE, 0xC0107682),
    (VOLFS_IOC_STATS, 0x80607683),
    (VOLFS_IOC_VRANGE_NEXT, 0xC0207684),
    (VOLFS_IOC_SEGMENTS, 0xC0607685),
    (VOLFS_IOC_SEGMENT_REGISTER, 0xC0187686),
    (VOLFS_IOC_SEGMENT_RELEASE, 0xC0187687),
    (VOLFS_IOC_FILE_INFO, 0x80407688),
)
assert all(computed == published for computed, published in _PUBLISHED_NUMBERS)
