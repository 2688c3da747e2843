"""The in-memory namespace: inodes, directories, links, attributes and their lifetimes.

This is the filesystem model; :mod:`volfs.fs` only translates FUSE requests into calls here.
Failures are raised as :class:`OSError` carrying the errno a POSIX filesystem returns.

An inode lives while anything refers to it: a directory entry (``nlink``), the kernel
(``lookups``, decremented by FORGET) or an open handle (``opens``). Its contents are freed as
soon as no entry and no handle remain, even if the kernel still remembers the inode number:
the memory of an unlinked file returns at its last close, as on tmpfs.
"""

from __future__ import annotations

import errno
import stat
import time
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

from sortedcontainers import SortedDict

from volfs.abi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    NAME_MAX,
    NO_PAGE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PATH_MAX,
    VRANGE_NONVOLATILE,
    VRANGE_PARTIAL,
    VRANGE_VOLATILE,
    XATTR_LIST_MAX,
    XATTR_NAME_MAX,
    XATTR_SIZE_MAX,
    pages_for,
)
from volfs.purge import Purger
from volfs.ranges import InodeRanges, VolatileRange
from volfs.store import FileContents, Store

_U64 = 1 << 64

ROOT_INODE = 1
#: Symlink targets this long or shorter (NUL included) live in the inode for free, as on
#: tmpfs; a longer one takes a page of the size cap.
SHORT_SYMLINK_LEN = 128
#: What an attribute costs the daemon besides its name and value (the dictionary slot and the
#: two bytes objects), charged to the size cap with them.
XATTR_ENTRY_OVERHEAD = 128

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

#: Ranges of closed files dropped in one go: about a millisecond of work.
DISCARD_BUDGET = 200
#: Ranges (or lost runs) one step of a mark or unmark takes on: about a millisecond of work.
VRANGE_STEP = 200


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


@dataclass(slots=True, eq=False)
class Inode:
    """One file, directory, symlink or special file."""

    ino: int
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    nlink: int = 0
    rdev: int = 0
    lookups: int = 0
    opens: int = 0
    #: False once no entry and no handle remain; only the kernel's lookups keep it then.
    alive: bool = True
    #: Regular files only.
    contents: FileContents | None = None
    #: Regular files with volatile ranges or lost pages only; cleared at the last close.
    vranges: InodeRanges | None = None
    #: Directories only.
    entries: DirectoryEntries | None = None
    #: Directories only: the directory holding this one (itself for the root).
    parent: Inode | None = None
    #: Symlinks only.
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    #: Bytes of the attribute names, a NUL each: what listxattr(2) returns.
    xattr_list_bytes: int = 0

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
        if atime:
            self.atime_ns = now
        if mtime:
            self.mtime_ns = now
        if ctime:
            self.ctime_ns = now


@dataclass(frozen=True, slots=True)
class NamespaceStatistics:
    """Counts reported by statfs and the stats interface."""

    inodes: int
    max_inodes: int
    capacity_bytes: int
    used_bytes: int


class Namespace:
    """The tree of inodes of one mount."""

    def __init__(
        self,
        store: Store,
        purger: Purger,
        *,
        max_inodes: int,
        root_mode: int,
        root_uid: int,
        root_gid: int,
    ) -> None:
        """Create an empty tree whose root has the given mode and owner.

        Args:
            store: where file contents live.
            purger: the purge order volatile ranges join.
            max_inodes: the most inodes that may exist at once (0 = no limit).
            root_mode: permission bits of the root directory (type bits are added).
            root_uid: owner of the root directory.
            root_gid: group of the root directory.
        """
        self.store = store
        self.purger = purger
        self.max_inodes = max_inodes
        self._inodes: dict[int, Inode] = {}
        #: Inodes with an entry or a handle, plus extra hard links: what ``nr_inodes`` limits.
        self.live_inodes = 0
        #: Range sets whose volatility ended, waiting for :meth:`discard_ended`.
        self._ended: deque[InodeRanges] = deque()
        self._next_ino = ROOT_INODE
        root = self._new_inode(stat.S_IFDIR | (root_mode & 0o7777), root_uid, root_gid)
        root.entries = DirectoryEntries()
        root.parent = root
        root.nlink = 2
        root.lookups = 1  # the kernel holds the root for the whole mount
        self.root = root

    # -- inode table ------------------------------------------------------------------------

    def _new_inode(self, mode: int, uid: int, gid: int) -> Inode:
        if self.max_inodes and self.live_inodes >= self.max_inodes:
            raise OSError(errno.ENOSPC, "no free inodes")
        now = time.time_ns()
        inode = Inode(
            ino=self._next_ino,
            mode=mode,
            uid=uid,
            gid=gid,
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
        )
        self._next_ino += 1
        self._inodes[inode.ino] = inode
        self.live_inodes += 1
        return inode

    def get(self, ino: int) -> Inode:
        """Return the live inode ``ino``.

        Raises:
            OSError: ENOENT (ESTALE would also do) if it no longer exists.
        """
        try:
            return self._inodes[ino]
        except KeyError:
            raise OSError(errno.ENOENT, "no such inode") from None

    def _release_if_unused(self, inode: Inode) -> None:
        """Free what nobody can reach any more: contents first, then the inode itself."""
        if inode.nlink or inode.opens:
            return
        if inode.alive:
            inode.alive = False
            self.live_inodes -= 1
            self.store.uncharge(_symlink_charge(inode.target))
        # Every time, not only the first: an inode nobody can name may still be reached
        # (reopened through /proc/self/fd, given attributes through a removed directory held
        # open), and what it gained since must go too.
        if inode.contents is not None:
            inode.contents.clear()
        if inode.vranges is not None:
            inode.vranges.clear()  # what is gone cannot be lost any more
            inode.vranges = None
        if inode.xattrs:
            self.store.uncharge(
                sum(_xattr_charge(name, value) for name, value in inode.xattrs.items())
            )
            inode.xattrs.clear()
            inode.xattr_list_bytes = 0
        if not inode.lookups and inode is not self.root:
            del self._inodes[inode.ino]

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped ``count`` references to ``ino``."""
        inode = self._inodes.get(ino)
        if inode is None:
            return
        inode.lookups = max(0, inode.lookups - count)
        self._release_if_unused(inode)

    def open(self, inode: Inode, *, truncate: bool = False) -> None:
        """Count an open handle of a regular file; ``truncate`` empties it (O_TRUNC)."""
        for _step in self.open_steps(inode, truncate=truncate):
            pass

    def open_steps(self, inode: Inode, *, truncate: bool = False) -> Iterator[None]:
        """Count an open handle of a regular file; ``truncate`` empties it (O_TRUNC).

        The handle counts from the start, so the file stays while its ranges are dropped
        a step at a time (see :meth:`truncate_steps`).
        """
        if inode.contents is None:
            raise OSError(errno.EISDIR if inode.is_dir() else errno.ENXIO, "not a regular file")
        inode.opens += 1
        if truncate and inode.contents.size:
            try:
                yield from self.truncate_steps(inode, 0)
            except BaseException:
                self.close(inode)  # no handle will be made: its count goes again
                raise
            inode.touch(mtime=True, ctime=True)

    def close(self, inode: Inode) -> bool:
        """Forget an open handle.

        The last close ends all volatility of the inode and frees the contents of an unlinked
        file. Pages already purged stay lost (EIO) until rewritten, truncated away or reported
        by an unmark: nobody has been told of them yet.

        Returns:
            True if ranges were left for :meth:`discard_ended` to drop.

        Runtime complexity: O(1) (a file's ranges are dropped by :meth:`discard_ended`).
        """
        inode.opens -= 1
        ended = None
        if not inode.opens and inode.vranges is not None:
            ended = inode.vranges
            inode.vranges = ended.end_volatility()
            if ended.discard(DISCARD_BUDGET):
                ended = None
            else:
                self._ended.append(ended)
        self._release_if_unused(inode)
        return ended is not None

    def discard_ended(self, budget: int = DISCARD_BUDGET) -> bool:
        """Drop up to ``budget`` ranges of files whose volatility ended; True if more remain.

        Runtime complexity: O(budget log n).
        """
        while self._ended and budget > 0:
            ranges = self._ended[0]
            count = min(budget, ranges.range_count)
            if ranges.discard(count):
                self._ended.popleft()
            budget -= count
        return bool(self._ended)

    def statistics(self) -> NamespaceStatistics:
        """Return the current counts."""
        return NamespaceStatistics(
            inodes=self.live_inodes,
            max_inodes=self.max_inodes,
            capacity_bytes=self.store.capacity_bytes,
            used_bytes=self.store.used_bytes,
        )

    # -- lookups ----------------------------------------------------------------------------

    def _directory(self, ino: int) -> tuple[Inode, DirectoryEntries]:
        directory = self.get(ino)
        if directory.entries is None:
            raise OSError(errno.ENOTDIR, "not a directory")
        return directory, directory.entries

    def lookup(self, parent_ino: int, name: bytes) -> Inode:
        """Return the inode ``name`` names in directory ``parent_ino``, counting a lookup."""
        directory, entries = self._directory(parent_ino)
        if name == b".":
            inode = directory
        elif name == b"..":
            assert directory.parent is not None
            inode = directory.parent
        else:
            found = entries.get(name)
            if found is None:
                if len(name) > NAME_MAX:
                    raise OSError(errno.ENAMETOOLONG, "name too long")
                raise OSError(errno.ENOENT, "no such file or directory")
            inode = found
        inode.lookups += 1
        return inode

    # -- creation ---------------------------------------------------------------------------

    def _check_new_name(self, entries: DirectoryEntries, name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, "name too long")
        if name in entries or name in (b".", b".."):
            raise OSError(errno.EEXIST, "file exists")

    def _link_new(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        directory, entries = self._directory(parent_ino)
        if not directory.nlink:
            raise OSError(errno.ENOENT, "directory was removed")
        self._check_new_name(entries, name)
        # setgid directories hand their group (and, to subdirectories, the bit) down.
        if directory.mode & stat.S_ISGID:
            gid = directory.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        inode = self._new_inode(mode, uid, gid)
        inode.nlink = 1
        inode.lookups = 1
        entries[name] = inode
        directory.touch(mtime=True, ctime=True)
        return inode

    def mknod(
        self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0
    ) -> Inode:
        """Create a regular file, FIFO, socket or device node."""
        kind = stat.S_IFMT(mode)
        if kind == 0:
            mode |= stat.S_IFREG
        elif kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise OSError(errno.EINVAL, "cannot create this file type with mknod")
        inode = self._link_new(parent_ino, name, mode, uid, gid)
        if stat.S_ISREG(mode):
            inode.contents = self.store.new_file()
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            inode.rdev = rdev
        return inode

    def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        """Create a directory."""
        inode = self._link_new(parent_ino, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)
        parent = self._inodes[parent_ino]
        inode.entries = DirectoryEntries()
        inode.parent = parent
        inode.nlink = 2
        parent.nlink += 1
        return inode

    def symlink(self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        """Create a symbolic link to ``target``; a long target is charged to the size cap.

        Raises:
            OSError: ENAMETOOLONG for a target of PATH_MAX bytes or more; ENOSPC when the cap
                has no room for it.
        """
        if len(target) >= PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, "symlink target too long")
        charge = _symlink_charge(target)
        self.store.charge(charge)
        try:
            inode = self._link_new(parent_ino, name, stat.S_IFLNK | 0o777, uid, gid)
        except BaseException:
            self.store.uncharge(charge)
            raise
        inode.target = target
        return inode

    def link(self, ino: int, parent_ino: int, name: bytes) -> Inode:
        """Add a hard link ``name`` to ``ino``."""
        inode = self.get(ino)
        if inode.is_dir():
            raise OSError(errno.EPERM, "hard links to directories are not allowed")
        if not inode.nlink:
            # linkat() of an unlinked file is allowed only through O_TMPFILE, which FUSE lacks.
            raise OSError(errno.ENOENT, "file was removed")
        directory, entries = self._directory(parent_ino)
        if not directory.nlink:
            raise OSError(errno.ENOENT, "directory was removed")
        self._check_new_name(entries, name)
        # As on tmpfs, every hard link takes an inode slot: nr_inodes bounds the entries too.
        if self.max_inodes and self.live_inodes >= self.max_inodes:
            raise OSError(errno.ENOSPC, "no free inodes")
        self.live_inodes += 1
        entries[name] = inode
        inode.nlink += 1
        inode.lookups += 1
        inode.touch(ctime=True)
        directory.touch(mtime=True, ctime=True)
        return inode

    # -- removal ----------------------------------------------------------------------------

    def _entry(self, parent_ino: int, name: bytes) -> tuple[Inode, DirectoryEntries, Inode]:
        directory, entries = self._directory(parent_ino)
        inode = entries.get(name)
        if inode is None:
            if name in (b".", b".."):
                raise OSError(errno.EINVAL if name == b"." else errno.ENOTEMPTY, "bad name")
            raise OSError(errno.ENOENT, "no such file or directory")
        return directory, entries, inode

    def _drop_link(self, inode: Inode) -> None:
        if inode.nlink > 1:
            self.live_inodes -= 1  # an extra hard link gives back its inode slot
        inode.nlink -= 1
        inode.touch(ctime=True)
        self._release_if_unused(inode)

    def unlink(self, parent_ino: int, name: bytes) -> None:
        """Remove the entry of a non-directory."""
        directory, entries, inode = self._entry(parent_ino, name)
        if inode.is_dir():
            raise OSError(errno.EISDIR, "is a directory")
        del entries[name]
        directory.touch(mtime=True, ctime=True)
        self._drop_link(inode)

    def rmdir(self, parent_ino: int, name: bytes) -> None:
        """Remove an empty directory."""
        directory, entries, inode = self._entry(parent_ino, name)
        if inode.entries is None:
            raise OSError(errno.ENOTDIR, "not a directory")
        if inode.entries:
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        del entries[name]
        directory.nlink -= 1
        directory.touch(mtime=True, ctime=True)
        inode.nlink = 0
        inode.touch(ctime=True)
        self._release_if_unused(inode)

    # -- rename -----------------------------------------------------------------------------

    def _is_ancestor(self, candidate: Inode, inode: Inode) -> bool:
        """True if ``candidate`` is ``inode`` or one of its ancestors."""
        node = inode
        while True:
            if node is candidate:
                return True
            if node.parent is None or node.parent is node:
                return False
            node = node.parent

    def rename(
        self,
        old_parent_ino: int,
        old_name: bytes,
        new_parent_ino: int,
        new_name: bytes,
        flags: int = 0,
    ) -> None:
        """Move an entry, replacing or exchanging with the target as ``flags`` say.

        Args:
            flags: 0, :data:`RENAME_NOREPLACE` or :data:`RENAME_EXCHANGE`.
        """
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise OSError(errno.EINVAL, "unknown rename flags")
        old_dir, old_entries, moved = self._entry(old_parent_ino, old_name)
        new_dir, new_entries = self._directory(new_parent_ino)
        if len(new_name) > NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, "name too long")
        if new_name in (b".", b".."):
            raise OSError(errno.EBUSY, "cannot rename onto . or ..")
        target = new_entries.get(new_name)
        if moved.is_dir() and moved is not new_dir and self._is_ancestor(moved, new_dir):
            raise OSError(errno.EINVAL, "cannot move a directory into itself")

        if flags & RENAME_EXCHANGE:
            if target is None:
                raise OSError(errno.ENOENT, "exchange target does not exist")
            if target.is_dir() and self._is_ancestor(target, old_dir):
                raise OSError(errno.EINVAL, "cannot move a directory into itself")
            old_entries[old_name], new_entries[new_name] = target, moved
            if old_dir is not new_dir:
                self._reparent(moved, old_dir, new_dir)
                self._reparent(target, new_dir, old_dir)
            for inode in (moved, target, old_dir, new_dir):
                inode.touch(ctime=True)
            old_dir.touch(mtime=True)
            new_dir.touch(mtime=True)
            return

        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise OSError(errno.EEXIST, "target exists")
            if target is moved:
                return  # two links to one inode: POSIX says do nothing
            if moved.is_dir():
                if target.entries is None:
                    raise OSError(errno.ENOTDIR, "target is not a directory")
                if target.entries:
                    raise OSError(errno.ENOTEMPTY, "target directory not empty")
            elif target.is_dir():
                raise OSError(errno.EISDIR, "target is a directory")
        del old_entries[old_name]
        new_entries[new_name] = moved
        if old_dir is not new_dir:
            self._reparent(moved, old_dir, new_dir)
        if target is not None:
            if target.is_dir():
                new_dir.nlink -= 1
                target.nlink = 0
                target.touch(ctime=True)
                self._release_if_unused(target)
            else:
                self._drop_link(target)
        moved.touch(ctime=True)
        old_dir.touch(mtime=True, ctime=True)
        new_dir.touch(mtime=True, ctime=True)

    @staticmethod
    def _reparent(inode: Inode, old_dir: Inode, new_dir: Inode) -> None:
        if inode.is_dir():
            inode.parent = new_dir
            old_dir.nlink -= 1
            new_dir.nlink += 1

    # -- attributes -------------------------------------------------------------------------

    def truncate(self, inode: Inode, size: int) -> None:
        """Set a regular file's size in one go; see :meth:`truncate_steps`."""
        for _step in self.truncate_steps(inode, size):
            pass

    def truncate_steps(self, inode: Inode, size: int) -> Iterator[None]:
        """Set a regular file's size (pages past it are freed, growth is a hole).

        The size and the pages change at once; the ranges past the new end are then dropped
        :data:`VRANGE_STEP` at a time, the generator yielding between steps. Meanwhile no
        mark can reach past the new end, and what a purge takes there holds no page; the
        caller keeps writes to the inode waiting until the last step (a write past the new end
        would land in a range about to go).

        Raises:
            OSError: EISDIR or EINVAL for a file that is not regular, EFBIG for a size past
                the largest file size; nothing changes then.
        """
        if inode.contents is None:
            raise OSError(errno.EISDIR if inode.is_dir() else errno.EINVAL, "not a regular file")
        inode.contents.truncate(size)
        end_page = pages_for(size)
        while True:
            # The set itself may change between steps (the last close leaves one of lost
            # pages only): what lies past the new end goes from whichever holds it.
            ranges = inode.vranges
            if ranges is None:
                return
            cut = ranges.next_cut(end_page, NO_PAGE, VRANGE_STEP)
            ranges.mark_nonvolatile(end_page, cut, admit=False)
            if not ranges:
                inode.vranges = None
            if cut >= NO_PAGE:
                return
            yield

    def fallocate(self, inode: Inode, mode: int, offset: int, length: int) -> None:
        """Allocate, punch or zero a byte range of a regular file (fallocate(2)).

        Args:
            mode: 0 (allocate; the size grows to cover the range), with
                ``FALLOC_FL_KEEP_SIZE`` (allocate past EOF too, size unchanged),
                ``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`` (free the pages) or
                ``FALLOC_FL_ZERO_RANGE`` (zeros, pages kept).

        Raises:
            OSError: EOPNOTSUPP for other modes; EINVAL for a bad range; ENOSPC when the
                allocation does not fit (nothing changes then).
        """
        contents = inode.contents
        if contents is None:
            raise OSError(errno.EISDIR if inode.is_dir() else errno.ENODEV, "not a regular file")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise OSError(errno.EOPNOTSUPP, "unsupported fallocate mode")
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, "bad range")
        end = offset + length
        zeroed = pages_for(offset), end >> PAGE_SHIFT
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) and inode.vranges is not None:
            inode.vranges.admit_rewrite(*zeroed)
        if mode & FALLOC_FL_PUNCH_HOLE:
            if not mode & FALLOC_FL_KEEP_SIZE or mode & FALLOC_FL_ZERO_RANGE:
                raise OSError(errno.EOPNOTSUPP, "punching a hole needs FALLOC_FL_KEEP_SIZE")
            contents.punch(offset, length)
        else:
            contents.allocate(offset, length)
            if mode & FALLOC_FL_ZERO_RANGE:
                contents.zero(offset, length)
            if not mode & FALLOC_FL_KEEP_SIZE and end > contents.size:
                contents.size = end
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            # Zeros written, in effect: purged pages in the range are plain holes from now on.
            if inode.vranges is not None:
                inode.vranges.rewritten(*zeroed)
            inode.touch(mtime=True, ctime=True)
        else:
            inode.touch(ctime=True)

    def directory_listing(self, ino: int, offset: int) -> Iterator[tuple[int, bytes, Inode]]:
        """Yield ``(next offset, name, inode)`` of a directory's entries from ``offset`` on.

        Offsets are readdir cookies: 0 starts with ``.``, then ``..``, then the entries in
        the order they were created; each entry's next offset resumes after it. The walk
        follows the live directory and holds nothing of it between calls.

        Runtime complexity: O(log n) to start, O(1) amortised per entry.
        """
        directory, entries = self._directory(ino)
        assert directory.parent is not None
        if offset <= 0:
            yield 1, b".", directory
        if offset <= 1:
            yield 2, b"..", directory.parent
        for serial, name, inode in entries.listing(max(offset, 2) - 2):
            yield serial + 3, name, inode

    # -- extended attributes ----------------------------------------------------------------

    def setxattr(self, inode: Inode, name: bytes, value: bytes) -> None:
        """Set one extended attribute."""
        if len(name) > XATTR_NAME_MAX:
            raise OSError(errno.ERANGE, "attribute name too long")
        if len(value) > XATTR_SIZE_MAX:
            raise OSError(errno.E2BIG, "attribute value too large")
        if not name.startswith((b"user.", b"trusted.", b"security.")):
            raise OSError(errno.EOPNOTSUPP, "unsupported attribute namespace")
        if name.startswith(b"user.") and not (stat.S_ISREG(inode.mode) or inode.is_dir()):
            # As on tmpfs: user attributes only on files and directories.
            raise OSError(errno.EPERM, "user attributes only on files and directories")
        old = inode.xattrs.get(name)
        list_bytes = inode.xattr_list_bytes
        if old is None:
            list_bytes += len(name) + 1
            # More names than one listxattr(2) can return could never be listed, and listing
            # stays bounded by what the kernel lets a caller receive.
            if list_bytes > XATTR_LIST_MAX:
                raise OSError(errno.ENOSPC, "too many extended attributes on this inode")
        # Attributes live outside the page store: charged to the size cap, entry overhead
        # included, they cannot grow the daemon past what df shows.
        growth = _xattr_charge(name, value) - (0 if old is None else _xattr_charge(name, old))
        if growth > 0:
            self.store.charge(growth)
        else:
            self.store.uncharge(-growth)
        inode.xattrs[name] = value
        inode.xattr_list_bytes = list_bytes
        inode.touch(ctime=True)

    def removexattr(self, inode: Inode, name: bytes) -> None:
        """Remove one extended attribute."""
        try:
            value = inode.xattrs.pop(name)
        except KeyError:
            raise OSError(errno.ENODATA, "no such attribute") from None
        self.store.uncharge(_xattr_charge(name, value))
        inode.xattr_list_bytes -= len(name) + 1
        inode.touch(ctime=True)

    # -- volatile ranges --------------------------------------------------------------------

    @staticmethod
    def _span(inode: Inode, start: int, length: int) -> tuple[int, int]:
        """Validate an ioctl's byte span and return it as pages ``[first, end)``.

        Raises:
            OSError: EISDIR or EINVAL for a non-regular file; EINVAL for an unaligned start
                or length, an overflowing span, or one past the page-rounded file size.
        """
        _require_regular(inode)
        assert inode.contents is not None
        if start % PAGE_SIZE or length % PAGE_SIZE:
            raise OSError(errno.EINVAL, "start and length must be multiples of the page size")
        eof_page = pages_for(inode.contents.size)
        first = start >> PAGE_SHIFT
        end = eof_page if length == 0 else (start + length) >> PAGE_SHIFT
        if start + length >= _U64 or first > end or end > eof_page:
            raise OSError(errno.EINVAL, "span past the end of the file")
        return first, end

    @staticmethod
    def vrange_next(inode: Inode, start: int) -> VolatileRange | None:
        """The first range of a file ending after byte ``start`` (VOLFS_IOC_VRANGE_NEXT).

        Raises:
            OSError: EISDIR or EINVAL for a non-regular file; EINVAL for an unaligned start.

        Runtime complexity: O(log n) in the file's ranges.
        """
        _require_regular(inode)
        if start % PAGE_SIZE:
            raise OSError(errno.EINVAL, "start must be a multiple of the page size")
        return None if inode.vranges is None else inode.vranges.next_range(start >> PAGE_SHIFT)

    def vrange(
        self, inode: Inode, start: int, length: int, mode: int, flags: int
    ) -> tuple[int, bool]:
        """Mark a span volatile or non-volatile (VOLFS_IOC_VRANGE) in one go.

        See :meth:`vrange_steps`, which this runs to the end.
        """
        steps = self.vrange_steps(inode, start, length, mode, flags)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                result: tuple[int, bool] = done.value
                return result

    def vrange_steps(
        self, inode: Inode, start: int, length: int, mode: int, flags: int
    ) -> Generator[None, None, tuple[int, bool]]:
        """Mark a span volatile or non-volatile (VOLFS_IOC_VRANGE), a bounded step at a time.

        A span over many ranges is taken in pieces of at most :data:`VRANGE_STEP` ranges (or
        lost runs) each, from left to right, each piece's end found in the live set; the
        generator yields between them so that the caller can serve other requests. Pieces
        taken in order do what the whole span does (an unmark splits at most the ranges
        straddling the span's two ends; each piece of a mark merges the one before it), and
        everything that can fail is checked before the first one. What other requests do in
        between takes effect as if it came before or after.

        Returns:
            ``(marked bytes, purged)``: purged tells, for NON_VOLATILE, whether any of the
            span had been purged while volatile.

        Raises:
            OSError: EINVAL for a bad mode, flag or span; ENOSPC if a bound on ranges would be
                passed; nothing changes then.

        Runtime complexity: O(log n) per step in the inode's ranges, plus O(1) amortised per
        range merged or removed; a step takes on at most :data:`VRANGE_STEP` of them.
        """
        if mode not in (VRANGE_VOLATILE, VRANGE_NONVOLATILE) or flags & ~VRANGE_PARTIAL:
            raise OSError(errno.EINVAL, "unknown mode or flags")
        first, end = self._span(inode, start, length)
        marked = (end - first) << PAGE_SHIFT
        if first == end:
            return 0, False
        contents = inode.contents
        assert contents is not None
        ranges = inode.vranges
        if mode == VRANGE_VOLATILE:
            partial = bool(flags & VRANGE_PARTIAL)
            if ranges is None:
                ranges = inode.vranges = InodeRanges(self.purger, inode.ino, contents)
            ranges.admit_mark(first, end)
            low = first
            while True:
                live = self._ranges_of(inode)
                # A truncation meanwhile may have cut the span short: nothing past EOF.
                stop = min(end, pages_for(contents.size))
                cut = min(live.next_cut(low, stop, VRANGE_STEP, lost=False), stop)
                # The piece marked by the step before ends at ``low``: marking over it merges
                # the two, one neighbour more to merge whatever happened in between.
                left = live.range_ending_at(low) if low > first else None
                live.mark_volatile(
                    low if left is None else left.start, cut, partial=partial, admit=low == first
                )
                if cut >= stop:
                    return marked, False
                low = cut
                yield
        if ranges is None:
            return marked, False
        ranges.admit_unmark(first, end)
        purged = False
        low = first
        while True:
            ranges = inode.vranges
            if ranges is None:
                break  # another request left nothing to unmark
            cut = ranges.next_cut(low, end, VRANGE_STEP)
            purged = ranges.mark_nonvolatile(low, cut, admit=False) or purged
            if not ranges:
                inode.vranges = None
            if cut >= end:
                break
            low = cut
            yield
        return marked, purged

    def _ranges_of(self, inode: Inode) -> InodeRanges:
        """The inode's range set, created empty if it has none."""
        if inode.vranges is None:
            assert inode.contents is not None
            inode.vranges = InodeRanges(self.purger, inode.ino, inode.contents)
        return inode.vranges

    def vrange_status(self, inode: Inode, start: int, length: int) -> tuple[int, int]:
        """Return ``(volatile bytes, purged bytes)`` of a span (VOLFS_IOC_VRANGE_STATUS)."""
        first, end = self._span(inode, start, length)
        if inode.vranges is None or first == end:
            return 0, 0
        volatile, lost = inode.vranges.status(first, end)
        return volatile << PAGE_SHIFT, lost << PAGE_SHIFT


def _symlink_charge(target: bytes) -> int:
    """What a symlink's target costs the size cap: a page unless it is short, as on tmpfs."""
    return PAGE_SIZE if len(target) + 1 > SHORT_SYMLINK_LEN else 0


def _xattr_charge(name: bytes, value: bytes) -> int:
    """What one extended attribute costs the size cap."""
    return len(name) + len(value) + XATTR_ENTRY_OVERHEAD


def _require_regular(inode: Inode) -> None:
    """Volatility belongs to regular files: EISDIR for a directory, EINVAL for the rest."""
    if inode.contents is None:
        raise OSError(errno.EISDIR if inode.is_dir() else errno.EINVAL, "not a regular file")
