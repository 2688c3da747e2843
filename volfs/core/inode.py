"""One inode of the namespace (a file, directory, symlink or special file) and a directory's
entries."""

from __future__ import annotations

import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from sortedcontainers import SortedDict

from volfs.abi import PAGE_SHIFT
from volfs.core._pagemap import PageMap
from volfs.core.ranges import InodeRanges
from volfs.core.segments import SegmentTable
from volfs.core.store import HOLD_PRIVILEGED, HOLD_SEGMENTS, HOLD_VOLATILE, FileContents

#: The extended attribute holding a file's capabilities, which a write removes.
SECURITY_CAPABILITY = b"security.capability"


class DirectoryEntries:
    """The entries of one directory: name -> inode, each with a serial for readdir.

    Serials grow with each new name and stay with it (a name replaced by rename keeps its
    serial), so a directory listing resumes from a serial in O(log n) without a snapshot:
    entries present for a whole listing appear exactly once, others may or may not.
    """

    __slots__ = ("_inodes", "_names", "_next_serial", "_serials")

    def __init__(self) -> None:
        self._inodes: dict[bytes, Inode] = {}
        self._serials: dict[bytes, int] = {}
        self._names: SortedDict[int, bytes] = SortedDict()
        self._next_serial = 0

    def __len__(self) -> int:
        return len(self._inodes)

    def __bool__(self) -> bool:
        return bool(self._inodes)

    def __contains__(self, name: bytes) -> bool:
        return name in self._inodes

    def __getitem__(self, name: bytes) -> Inode:
        return self._inodes[name]

    def get(self, name: bytes) -> Inode | None:
        """The inode ``name`` names, or None. Runtime complexity: O(1)."""
        return self._inodes.get(name)

    def __setitem__(self, name: bytes, inode: Inode) -> None:
        """Add or replace an entry. Runtime complexity: O(log n)."""
        if name not in self._inodes:
            serial = self._next_serial
            self._next_serial += 1
            self._serials[name] = serial
            self._names[serial] = name
        self._inodes[name] = inode

    def __delitem__(self, name: bytes) -> None:
        """Remove an entry. Runtime complexity: O(log n)."""
        del self._inodes[name]
        del self._names[self._serials.pop(name)]

    def items(self) -> Iterator[tuple[bytes, Inode]]:
        """All entries, oldest name first. Runtime complexity: O(n)."""
        inodes = self._inodes
        return ((name, inodes[name]) for name in self._names.values())

    def listing(self, serial: int) -> Iterator[tuple[int, bytes, Inode]]:
        """Yield ``(serial, name, inode)`` of the entries from ``serial`` on, in serial order.

        The walk follows the live directory: entries added or removed while it goes on
        may or may not be seen.

        Runtime complexity: O(log n) to start, O(1) amortised per entry.
        """
        names, inodes = self._names, self._inodes
        while True:
            index = names.bisect_left(serial)
            if index == len(names):
                return
            serial, name = names.peekitem(index)
            yield serial, name, inodes[name]
            serial += 1


@dataclass(slots=True)
class Timestamps:
    """The timestamps of an inode that is not a regular file, in ns since the epoch."""

    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(slots=True, eq=False)
class Inode:
    """One file, directory, symlink or special file."""

    ino: int
    mode: int
    uid: int
    gid: int
    #: A regular file's are its page map's, which the bridge's request threads update too.
    times: Timestamps | PageMap
    nlink: int = 0
    rdev: int = 0
    lookups: int = 0
    opens: int = 0
    #: Regular files only (see :meth:`set_contents`).
    contents: FileContents | None = None
    _vranges: InodeRanges | None = None
    _segments: SegmentTable | None = None
    #: Directories only.
    entries: DirectoryEntries | None = None
    #: Directories only: the directory holding this one (itself for the root).
    parent: Inode | None = None
    #: Symlinks only.
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    #: Bytes of the attribute names, a NUL each: what listxattr(2) returns.
    xattr_list_bytes: int = 0

    def set_contents(self, contents: FileContents) -> None:
        """Make this a regular file holding ``contents``, which keep its timestamps from now."""
        self.contents = contents
        self.times = contents.map
        self.note_privileges()

    def note_privileges(self) -> None:
        """Keep the bridge's request threads off a file a write may have to strip (called
        after each change of the mode or the extended attributes)."""
        mode = self.mode
        privileged = bool(
            mode & stat.S_ISUID
            or (mode & stat.S_ISGID and mode & stat.S_IXGRP)
            or SECURITY_CAPABILITY in self.xattrs
        )
        self._hold(HOLD_PRIVILEGED, privileged)

    @property
    def vranges(self) -> InodeRanges | None:
        """Regular files with volatile ranges or lost pages only. The last close ends the
        ranges and leaves a set of the lost pages alone, if there are any."""
        return self._vranges

    @vranges.setter
    def vranges(self, ranges: InodeRanges | None) -> None:
        self._vranges = ranges
        self._hold(HOLD_VOLATILE, ranges is not None)

    @property
    def segments(self) -> SegmentTable | None:
        """Regular files whose segment table was asked for, until their last close."""
        return self._segments

    @segments.setter
    def segments(self, table: SegmentTable | None) -> None:
        self._segments = table
        self._hold(HOLD_SEGMENTS, table is not None)

    def _hold(self, bit: int, on: bool) -> None:
        if self.contents is not None:
            self.contents.map.set_hold(bit, on)

    @property
    def atime_ns(self) -> int:
        """Last access."""
        return self.times.atime_ns

    @atime_ns.setter
    def atime_ns(self, value: int) -> None:
        self.times.atime_ns = value

    @property
    def mtime_ns(self) -> int:
        """Last modification of the contents."""
        return self.times.mtime_ns

    @mtime_ns.setter
    def mtime_ns(self, value: int) -> None:
        self.times.mtime_ns = value

    @property
    def ctime_ns(self) -> int:
        """Last change of the inode."""
        return self.times.ctime_ns

    @ctime_ns.setter
    def ctime_ns(self, value: int) -> None:
        self.times.ctime_ns = value

    @property
    def size(self) -> int:
        """``st_size`` as stat(2) reports it."""
        if self.contents is not None:
            return self.contents.size
        if self.entries is not None:
            return 0
        return len(self.target)

    @property
    def blocks(self) -> int:
        """``st_blocks``: 512-byte units of memory really held."""
        if self.contents is None:
            return 0
        return self.contents.pages << (PAGE_SHIFT - 9)

    def is_dir(self) -> bool:
        """True for directories."""
        return self.entries is not None

    def touch(self, *, atime: bool = False, mtime: bool = False, ctime: bool = False) -> None:
        """Set the chosen timestamps to now."""
        now = time.time_ns()
        times = self.times
        if atime:
            times.atime_ns = now
        if mtime:
            times.mtime_ns = now
        if ctime:
            times.ctime_ns = now
