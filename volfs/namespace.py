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
from dataclasses import dataclass, field

from volfs.abi import PAGE_SIZE, VRANGE_NONVOLATILE, VRANGE_PARTIAL, VRANGE_VOLATILE
from volfs.purge import Purger
from volfs.ranges import InodeRanges, VolatileRange
from volfs.store import PAGE_SHIFT, FileContents, Store

_U64 = 1 << 64

ROOT_INODE = 1
NAME_MAX = 255
#: The kernel's limit for one extended attribute value (XATTR_SIZE_MAX).
XATTR_SIZE_MAX = 65536
XATTR_NAME_MAX = 255

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


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
    #: Directories only: name -> inode.
    entries: dict[bytes, Inode] | None = None
    #: Directories only: the directory holding this one (itself for the root).
    parent: Inode | None = None
    #: Symlinks only.
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

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
        #: Bytes of extended attribute names and values held.
        self.xattr_bytes = 0
        self._next_ino = ROOT_INODE
        root = self._new_inode(stat.S_IFDIR | (root_mode & 0o7777), root_uid, root_gid)
        root.entries = {}
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
            if inode.contents is not None:
                inode.contents.clear()
            self.xattr_bytes -= sum(len(name) + len(value) for name, value in inode.xattrs.items())
            inode.xattrs.clear()
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
        if inode.contents is None:
            raise OSError(errno.EISDIR if inode.is_dir() else errno.ENXIO, "not a regular file")
        if truncate and inode.contents.size:
            self.truncate(inode, 0)
            inode.touch(mtime=True, ctime=True)
        inode.opens += 1

    def close(self, inode: Inode) -> None:
        """Forget an open handle.

        The last close ends all volatility of the inode (pages already purged stay holes) and
        frees the contents of an unlinked file.
        """
        inode.opens -= 1
        if not inode.opens and inode.vranges is not None:
            inode.vranges.clear()
            inode.vranges = None
        self._release_if_unused(inode)

    def statistics(self) -> NamespaceStatistics:
        """Return the current counts."""
        return NamespaceStatistics(
            inodes=self.live_inodes,
            max_inodes=self.max_inodes,
            capacity_bytes=self.store.capacity_bytes,
            used_bytes=self.store.used_bytes,
        )

    # -- lookups ----------------------------------------------------------------------------

    def _directory(self, ino: int) -> tuple[Inode, dict[bytes, Inode]]:
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

    def _check_new_name(self, entries: dict[bytes, Inode], name: bytes) -> None:
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
        inode.entries = {}
        inode.parent = parent
        inode.nlink = 2
        parent.nlink += 1
        return inode

    def symlink(self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        """Create a symbolic link to ``target``."""
        if len(target) >= 4096:
            raise OSError(errno.ENAMETOOLONG, "symlink target too long")
        inode = self._link_new(parent_ino, name, stat.S_IFLNK | 0o777, uid, gid)
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

    def _entry(self, parent_ino: int, name: bytes) -> tuple[Inode, dict[bytes, Inode], Inode]:
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
        """Set a regular file's size (pages past it are freed, growth is a hole)."""
        if inode.contents is None:
            raise OSError(errno.EISDIR if inode.is_dir() else errno.EINVAL, "not a regular file")
        inode.contents.truncate(size)
        if inode.vranges is not None:
            inode.vranges.truncate((size + PAGE_SIZE - 1) >> PAGE_SHIFT)

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
                first, last = (offset + PAGE_SIZE - 1) >> PAGE_SHIFT, end >> PAGE_SHIFT
                if first < last:
                    inode.vranges.rewritten(first, last)
            inode.touch(mtime=True, ctime=True)
        else:
            inode.touch(ctime=True)

    def directory_listing(self, ino: int) -> list[tuple[bytes, Inode]]:
        """Return a snapshot of a directory's entries, ``.`` and ``..`` first."""
        directory, entries = self._directory(ino)
        assert directory.parent is not None
        return [(b".", directory), (b"..", directory.parent), *entries.items()]

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
        growth = len(name) + len(value) - (0 if old is None else len(name) + len(old))
        # Attributes live outside the page store; bounding them by the room the cap leaves
        # keeps a writer of attributes from growing the daemon without limit, as on tmpfs.
        if growth > 0 and (
            self.xattr_bytes + growth > self.store.capacity_bytes - self.store.used_bytes
        ):
            raise OSError(errno.ENOSPC, "no space for extended attributes")
        inode.xattrs[name] = value
        self.xattr_bytes += growth
        inode.touch(ctime=True)

    def removexattr(self, inode: Inode, name: bytes) -> None:
        """Remove one extended attribute."""
        try:
            value = inode.xattrs.pop(name)
        except KeyError:
            raise OSError(errno.ENODATA, "no such attribute") from None
        self.xattr_bytes -= len(name) + len(value)
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
        eof_page = (inode.contents.size + PAGE_SIZE - 1) >> PAGE_SHIFT
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
        """Mark a span volatile or non-volatile (VOLFS_IOC_VRANGE).

        Returns:
            ``(marked bytes, purged)``: purged tells, for NON_VOLATILE, whether any of the
            span had been purged while volatile.

        Raises:
            OSError: EINVAL for a bad mode, flag or span; nothing changes then.

        Runtime complexity: O(log n) in the inode's ranges (amortised).
        """
        if mode not in (VRANGE_VOLATILE, VRANGE_NONVOLATILE) or flags & ~VRANGE_PARTIAL:
            raise OSError(errno.EINVAL, "unknown mode or flags")
        first, end = self._span(inode, start, length)
        marked = (end - first) << PAGE_SHIFT
        if first == end:
            return 0, False
        assert inode.contents is not None
        if mode == VRANGE_VOLATILE:
            if inode.vranges is None:
                inode.vranges = InodeRanges(self.purger, inode.ino, inode.contents)
            inode.vranges.mark_volatile(first, end, partial=bool(flags & VRANGE_PARTIAL))
            return marked, False
        if inode.vranges is None:
            return marked, False
        purged = inode.vranges.mark_nonvolatile(first, end)
        if not inode.vranges:
            inode.vranges = None
        return marked, purged

    def vrange_status(self, inode: Inode, start: int, length: int) -> tuple[int, int]:
        """Return ``(volatile bytes, purged bytes)`` of a span (VOLFS_IOC_VRANGE_STATUS)."""
        first, end = self._span(inode, start, length)
        if inode.vranges is None or first == end:
            return 0, 0
        volatile, lost = inode.vranges.status(first, end)
        return volatile << PAGE_SHIFT, lost << PAGE_SHIFT


def _require_regular(inode: Inode) -> None:
    """Volatility belongs to regular files: EISDIR for a directory, EINVAL for the rest."""
    if inode.contents is None:
        raise OSError(errno.EISDIR if inode.is_dir() else errno.EINVAL, "not a regular file")
