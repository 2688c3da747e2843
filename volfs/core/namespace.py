"""The in-memory namespace: inodes, directories, links, attributes and their lifetimes.

This is the filesystem model; :mod:`volfs.daemon.fs` only translates FUSE requests into calls here,
so every rule about an inode (its data, attributes, times, names and volatility) is written
once, here, and testable without a mount. Failures are raised as :class:`OSError` carrying the
errno a POSIX filesystem returns.

An inode lives while anything refers to it: a directory entry (``nlink``), the kernel
(``lookups``, decremented by FORGET) or an open handle (``opens``). Once no entry and no
handle remain, the kernel forgets it at once unless a program still holds it (as a working
directory, through an O_PATH descriptor); then its contents, attributes and ``nr_inodes``
slot are freed, as tmpfs frees an inode when it is evicted.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from volfs.abi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    NAME_MAX,
    PAGE_SHIFT,
    PAGE_SIZE,
    PATH_MAX,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_LIST_MAX,
    XATTR_NAME_MAX,
    XATTR_SIZE_MAX,
    MountStatistics,
    pages_for,
    pages_spanned,
)
from volfs.core.inode import SECURITY_CAPABILITY, DirectoryEntries, Inode, Timestamps
from volfs.core.purge import Purger, PurgeSource
from volfs.core.ranges import InodeRanges, RecordLimits
from volfs.core.store import FileContents, Store
from volfs.core.volatility import Volatility

ROOT_INODE = 1
#: Symlink targets this long or shorter (NUL included) live in the inode for free, as on
#: tmpfs; a longer one takes a page of the size cap.
SHORT_SYMLINK_LEN = 128
#: What an attribute costs the daemon besides its name and value (the dictionary slot and the
#: two bytes objects), charged to the size cap with them.
XATTR_ENTRY_OVERHEAD = 128

#: relatime: reads refresh atime at most this often, unless it is older than mtime or ctime.
RELATIME_INTERVAL_NS = 24 * 3600 * 10**9

#: Ranges of closed files dropped in one go: about a millisecond of work.
DISCARD_BUDGET = 200


@dataclass(frozen=True, slots=True)
class AttributeChanges:
    """What a SETATTR changes; None leaves an attribute as it is."""

    size: int | None = None
    #: Permission bits; the file type never changes.
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


class Namespace:
    """The tree of inodes of one mount."""

    def __init__(
        self,
        store: Store,
        *,
        limits: RecordLimits | None = None,
        max_inodes: int,
        root_mode: int,
        root_uid: int,
        root_gid: int,
        purged_reads_zero: bool = False,
    ) -> None:
        """Create an empty tree whose root has the given mode and owner.

        Args:
            store: where file contents live.
            limits: the bounds on records of volatile ranges (default: none).
            max_inodes: the most inodes that may exist at once (0 = no limit).
            root_mode: permission bits of the root directory (type bits are added).
            root_uid: owner of the root directory.
            root_gid: group of the root directory.
            purged_reads_zero: reads of purged volatile data return zeros instead of EIO.
        """
        self.store = store
        #: The purge order of the files' volatile ranges.
        self.purger = Purger(
            self._contents_of, limits, lose=self._lose_pages, forget=self._forget_lost
        )
        #: The volatility of the files: marks, unmarks, segments and what they report.
        self.volatility = Volatility(self.purger, store)
        self.max_inodes = max_inodes
        self.purged_reads_zero = purged_reads_zero
        self._inodes: dict[int, Inode] = {}
        #: Inodes with an entry, a handle or the kernel's reference, plus extra hard links: what
        #: ``nr_inodes`` limits. As on tmpfs, a removed inode keeps its slot until the kernel
        #: forgets (evicts) it.
        self.live_inodes = 0
        #: Inodes without a name whose last close or FORGET has not come yet (a program may
        #: still hold them, or the kernel has yet to tell).
        self.unlinked_inodes = 0
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

    def _take_inode_slot(self) -> None:
        """Count one more inode or hard link against ``nr_inodes``.

        Raises:
            InodeSlotsError: every slot is taken; ``forgets_pending`` if inodes without a
                name still hold some.
        """
        if self.max_inodes and self.live_inodes >= self.max_inodes:
            raise InodeSlotsError(bool(self.unlinked_inodes))
        self.live_inodes += 1

    def _new_inode(self, mode: int, uid: int, gid: int) -> Inode:
        self._take_inode_slot()
        now = time.time_ns()
        inode = Inode(
            ino=self._next_ino,
            mode=mode,
            uid=uid,
            gid=gid,
            times=Timestamps(atime_ns=now, mtime_ns=now, ctime_ns=now),
        )
        self._next_ino += 1
        self._inodes[inode.ino] = inode
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

    def _contents_of(self, ino: int) -> FileContents:
        """The pages of regular file ``ino``, which has ranges in the purge order.

        Raises:
            LookupError: no such regular file (a bug: its ranges should have gone with it).
        """
        contents = self._inodes[ino].contents
        if contents is None:
            raise LookupError(f"inode {ino} is not a regular file")
        return contents

    def _lose_pages(self, ino: int, first: int, end: int) -> None:
        """Pages of file ``ino`` were lost to a segment purge."""
        self.volatility.ranges_of(self._inodes[ino]).lose(first, end)

    def _forget_lost(self, ino: int, first: int, end: int) -> None:
        """Pages of file ``ino`` lost to a segment purge were reported by a pin."""
        self.volatility.forget_lost(self._inodes[ino], first, end)

    def _release_if_unused(self, inode: Inode) -> None:
        """Free an inode nobody can reach any more: once no name and no handle is left and
        the kernel has forgotten it too, its contents, attributes and inode slot.

        Until then the kernel may still open it, as on tmpfs: a path walk that found it
        before its last name went (a rename over it, an unlink racing the open), or an
        O_PATH descriptor through /proc/self/fd. The kernel forgets an inode without names
        as soon as nothing of it is in use: at the unlink, or once the RELEASE of its last
        close is answered.
        """
        if inode.nlink or inode.opens:
            return
        if inode.lookups:
            if inode.contents is not None:
                self.store.note_unforgotten(inode.ino, inode.contents.pages)
            else:
                self.store.note_unforgotten(inode.ino, pages_for(_symlink_charge(inode.target)))
            return
        self.live_inodes -= 1
        self.unlinked_inodes -= 1
        if inode.contents is not None:
            inode.contents.clear()
        # A long target is held until here, like a file's pages: an O_PATH descriptor of a
        # removed symlink still reads it (readlink through /proc/self/fd).
        self.store.uncharge(_symlink_charge(inode.target))
        if inode.vranges is not None:
            inode.vranges.clear()  # what is gone cannot be lost any more
            inode.vranges = None
        if inode.xattrs:
            self.store.uncharge(
                sum(_xattr_charge(name, value) for name, value in inode.xattrs.items())
            )
            inode.xattrs.clear()
            inode.xattr_list_bytes = 0
            inode.note_privileges()
        del self._inodes[inode.ino]
        self.store.forget_file(inode.ino)
        self.store.note_forgotten(inode.ino)

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
        if not inode.nlink and not inode.opens:
            self.store.note_reopened(inode.ino)  # through /proc/PID/fd: its pages stay
        inode.opens += 1
        if truncate and inode.contents.size:
            try:
                yield from self.truncate_steps(inode, 0)
            except BaseException:
                self.close(inode)  # no handle will be made: its count goes again
                raise
        if truncate:
            inode.touch(mtime=True, ctime=True)  # as on tmpfs, even if it was empty

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
        if not inode.opens:
            self.volatility.end_segments(inode)
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

    def statistics(self) -> MountStatistics:
        """The mount's counters, as statfs and ``vrangectl stats`` show them."""
        purges = self.purger.statistics()
        return MountStatistics(
            capacity_bytes=self.store.capacity_bytes,
            used_bytes=self.store.used_bytes,
            volatile_bytes=purges.volatile_bytes,
            purged_bytes=purges.purged_bytes,
            ranges=purges.ranges,
            purgeable_ranges=purges.purgeable_ranges,
            purges_ioctl=purges.purges[PurgeSource.IOCTL],
            purges_size=purges.purges[PurgeSource.SIZE],
            purges_pressure=purges.purges[PurgeSource.PRESSURE],
            inodes=self.live_inodes,
            max_inodes=self.max_inodes,
            segments=purges.segments,
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
            if not directory.nlink:
                # The parent of a removed directory may be gone too: it leads nowhere.
                raise OSError(errno.ENOENT, "directory was removed")
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

    @staticmethod
    def count_lookup(inode: Inode) -> None:
        """The kernel took a reference to ``inode`` from a directory listing (READDIRPLUS)."""
        inode.lookups += 1

    @staticmethod
    def readlink(inode: Inode) -> bytes:
        """The target of a symlink; EINVAL for anything else."""
        if not stat.S_ISLNK(inode.mode):
            raise OSError(errno.EINVAL, "not a symlink")
        return inode.target

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
            inode.set_contents(self.store.new_file(inode.ino, inode.times))
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
        self._take_inode_slot()
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

    def unlink(self, parent_ino: int, name: bytes) -> None:
        """Remove the entry of a non-directory."""
        directory, entries, inode = self._entry(parent_ino, name)
        if inode.is_dir():
            raise OSError(errno.EISDIR, "is a directory")
        del entries[name]
        directory.touch(mtime=True, ctime=True)
        self._unlinked(directory, inode)

    def rmdir(self, parent_ino: int, name: bytes) -> None:
        """Remove an empty directory."""
        directory, entries, inode = self._entry(parent_ino, name)
        if inode.entries is None:
            raise OSError(errno.ENOTDIR, "not a directory")
        if inode.entries:
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        del entries[name]
        directory.touch(mtime=True, ctime=True)
        self._unlinked(directory, inode)

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
        if flags not in (0, RENAME_NOREPLACE, RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unknown rename flags")
        old_dir, old_entries, moved = self._entry(old_parent_ino, old_name)
        new_dir, new_entries = self._directory(new_parent_ino)
        _check_rename_target_name(new_name)
        if not new_dir.nlink:
            raise OSError(errno.ENOENT, "directory was removed")
        target = new_entries.get(new_name)
        if moved.is_dir() and self._is_ancestor(moved, new_dir):
            raise OSError(errno.EINVAL, "cannot move a directory into itself")
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise OSError(errno.ENOENT, "exchange target does not exist")
            if target.is_dir() and self._is_ancestor(target, old_dir):
                raise OSError(errno.EINVAL, "cannot move a directory into itself")
            self._exchange((old_dir, old_name, moved), (new_dir, new_name, target))
        elif target is None or self._may_replace(moved, target, flags):
            del old_entries[old_name]
            new_entries[new_name] = moved
            if old_dir is not new_dir:
                self._reparent(moved, old_dir, new_dir)
            if target is not None:
                self._unlinked(new_dir, target)
            moved.touch(ctime=True)
            old_dir.touch(mtime=True, ctime=True)
            new_dir.touch(mtime=True, ctime=True)

    def _exchange(self, one: tuple[Inode, bytes, Inode], other: tuple[Inode, bytes, Inode]) -> None:
        """Swap two entries ``(directory, name, inode)`` (RENAME_EXCHANGE)."""
        one_dir, one_name, one_inode = one
        other_dir, other_name, other_inode = other
        assert one_dir.entries is not None and other_dir.entries is not None
        one_dir.entries[one_name], other_dir.entries[other_name] = other_inode, one_inode
        if one_dir is not other_dir:
            self._reparent(one_inode, one_dir, other_dir)
            self._reparent(other_inode, other_dir, one_dir)
        for inode in (one_inode, other_inode, one_dir, other_dir):
            inode.touch(ctime=True)
        one_dir.touch(mtime=True)
        other_dir.touch(mtime=True)

    @staticmethod
    def _may_replace(moved: Inode, target: Inode, flags: int) -> bool:
        """Whether a rename of ``moved`` over an existing ``target`` does anything.

        Raises:
            OSError: why it may not: EEXIST (NOREPLACE), ENOTDIR, ENOTEMPTY or EISDIR.
        """
        if flags & RENAME_NOREPLACE:
            raise OSError(errno.EEXIST, "target exists")
        if target is moved:
            return False  # two links to one inode: POSIX says do nothing
        if moved.is_dir():
            if target.entries is None:
                raise OSError(errno.ENOTDIR, "target is not a directory")
            if target.entries:
                raise OSError(errno.ENOTEMPTY, "target directory not empty")
        elif target.is_dir():
            raise OSError(errno.EISDIR, "target is a directory")
        return True

    def _unlinked(self, directory: Inode, inode: Inode) -> None:
        """``inode``'s entry in ``directory`` is gone (an empty directory's only one)."""
        if inode.is_dir():
            directory.nlink -= 1
            inode.nlink = 0
            inode.touch(ctime=True)
        else:
            self._drop_link(inode)
        if not inode.nlink:
            self.unlinked_inodes += 1
            self._release_if_unused(inode)

    @staticmethod
    def _reparent(inode: Inode, old_dir: Inode, new_dir: Inode) -> None:
        if inode.is_dir():
            inode.parent = new_dir
            old_dir.nlink -= 1
            new_dir.nlink += 1

    # -- data -------------------------------------------------------------------------------

    def read(self, inode: Inode, offset: int, size: int) -> memoryview | bytes | bytearray:
        """Read from an open regular file: a view of the store where it can be (no copy).

        Refreshes atime as relatime does.

        Raises:
            OSError: EIO if the span touches purged volatile data (unless ``purged=zero``):
                the whole read fails, since a short one would be taken for EOF.

        Runtime complexity: O(log e + k) for the k runs of the span, plus O(log n) in the
        file's lost runs if it has any.
        """
        contents = inode.contents
        assert contents is not None, "only regular files are opened"
        if inode.vranges is not None and not self.purged_reads_zero:
            self._check_not_lost(inode, offset, min(size, contents.size - offset))
        data = contents.read(offset, size)
        now = time.time_ns()
        if (
            now - inode.atime_ns > RELATIME_INTERVAL_NS
            or inode.atime_ns <= inode.mtime_ns
            or inode.atime_ns <= inode.ctime_ns
        ):
            inode.atime_ns = now
        return data

    def _check_not_lost(self, inode: Inode, offset: int, length: int) -> None:
        """Raise EIO if bytes [offset, offset+length) touch lost pages; only what lies before
        EOF (``length`` may be 0 or less: none) can be lost. Lost pages of a segment a pin
        reported since read as zeros."""
        if length <= 0 or inode.vranges is None:
            return
        span = pages_spanned(offset, length)
        if inode.vranges.is_lost(*span):
            self.volatility.acknowledge(inode, *span)
            if inode.vranges is not None and inode.vranges.is_lost(*span):
                raise OSError(errno.EIO, "read of purged volatile data")

    def write(self, inode: Inode, offset: int, data: bytes | memoryview) -> int:
        """Write to an open regular file; return the bytes written (all of them, unless the
        system runs out of memory partway: see :meth:`FileContents.write`).

        Pages written are no longer lost, and purgeable again if volatile.

        Raises:
            OSError: ENOSPC when the cap has no room for the pages it fills (nothing changes
                then), EFBIG past the largest file.
        """
        contents = inode.contents
        assert contents is not None, "only regular files are opened"
        written = contents.write(offset, data)
        if inode.vranges is not None:  # most writes go to files with no ranges: no page math
            inode.vranges.rewritten(*pages_spanned(offset, written))
        if inode.segments is not None:  # most files have none: no page math
            self.volatility.refilled(inode, *pages_spanned(offset, written))
        now = time.time_ns()
        inode.mtime_ns = now
        inode.ctime_ns = now
        return written

    @staticmethod
    def seek(inode: Inode, offset: int, whence: int) -> int:
        """Answer lseek(2)'s SEEK_DATA or SEEK_HOLE on a regular file.

        Raises:
            OSError: EINVAL for another kind or file, ENXIO past the data or a negative offset.
        """
        contents = inode.contents
        if contents is None or whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "SEEK_DATA and SEEK_HOLE on regular files only")
        if offset < 0:
            raise OSError(errno.ENXIO, "negative offset")
        found = contents.seek_data(offset) if whence == os.SEEK_DATA else contents.seek_hole(offset)
        if found is None:
            raise OSError(errno.ENXIO, "no more data")
        return found

    # -- attributes -------------------------------------------------------------------------

    def setattr_steps(self, inode: Inode, changes: AttributeChanges) -> Iterator[None]:
        """Change attributes (SETATTR); a size change runs as :meth:`truncate_steps` does.

        A new size also sets mtime; given times are set as given, after that; ctime is always
        set. Permission checks are the kernel's (``default_permissions``).
        """
        if changes.size is not None:
            yield from self.truncate_steps(inode, changes.size)
            inode.touch(mtime=True)
        if changes.mode is not None:
            inode.mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(changes.mode)
            inode.note_privileges()
        if changes.uid is not None:
            inode.uid = changes.uid
        if changes.gid is not None:
            inode.gid = changes.gid
        if changes.atime_ns is not None:
            inode.atime_ns = changes.atime_ns
        if changes.mtime_ns is not None:
            inode.mtime_ns = changes.mtime_ns
        inode.touch(ctime=True)

    def kill_privileges(self, inode: Inode) -> bool:
        """Remove what a write, truncation or chown by someone without CAP_FSETID removes, as
        the kernel's file_remove_privs does: setuid, setgid if the group may execute (without
        that it marks mandatory locking, not privilege), and security.capability.

        Returns:
            Whether anything was removed (ctime is then set).
        """
        if inode.is_dir():
            return False
        mode = inode.mode & ~stat.S_ISUID
        if mode & stat.S_IXGRP:
            mode &= ~stat.S_ISGID
        changed = mode != inode.mode
        inode.mode = mode
        inode.note_privileges()
        if SECURITY_CAPABILITY in inode.xattrs:
            self.removexattr(inode, SECURITY_CAPABILITY)
            changed = True
        if changed:
            inode.touch(ctime=True)
        return changed

    def truncate(self, inode: Inode, size: int) -> None:
        """Set a regular file's size in one go; see :meth:`truncate_steps`."""
        for _step in self.truncate_steps(inode, size):
            pass

    def truncate_steps(self, inode: Inode, size: int) -> Iterator[None]:
        """Set a regular file's size (pages past it are freed, growth is a hole).

        The size and the pages change at once; the ranges past the new end are then dropped
        a step at a time (:meth:`Volatility.cut_steps`), the generator yielding between steps.
        Meanwhile no mark can reach past the new end, and what a purge takes there holds no
        page; the caller keeps writes to the inode waiting until the last step (a write past
        the new end would land in a range about to go).

        Raises:
            OSError: EISDIR or EINVAL for a file that is not regular, EFBIG for a size past
                the largest file size; nothing changes then.
        """
        if inode.contents is None:
            raise OSError(errno.EISDIR if inode.is_dir() else errno.EINVAL, "not a regular file")
        inode.contents.truncate(size)
        # A removed file truncated through /proc/PID/fd: fewer pages on their way back.
        self._release_if_unused(inode)
        yield from self.volatility.cut_steps(inode, pages_for(size))

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
        zeroing = bool(mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE))
        ranges = inode.vranges if zeroing else None
        if ranges is not None:
            ranges.admit_rewrite(*zeroed)
        if mode & FALLOC_FL_PUNCH_HOLE:
            if not mode & FALLOC_FL_KEEP_SIZE or mode & FALLOC_FL_ZERO_RANGE:
                raise OSError(errno.EOPNOTSUPP, "punching a hole needs FALLOC_FL_KEEP_SIZE")
            contents.punch(offset, length)
        else:
            contents.allocate(offset, length)
            if mode & FALLOC_FL_ZERO_RANGE:
                contents.zero(offset, length)
            if not mode & FALLOC_FL_KEEP_SIZE:
                contents.grow(end)
            self.volatility.refilled(inode, *pages_spanned(offset, length))
        if ranges is not None:
            # Zeros written, in effect: purged pages in the range are plain holes from now on.
            ranges.rewritten(*zeroed)
        inode.touch(mtime=zeroing, ctime=True)

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
        inode.note_privileges()
        inode.touch(ctime=True)

    @staticmethod
    def getxattr(inode: Inode, name: bytes) -> bytes | None:
        """The value of one extended attribute, None if it has none of that name."""
        return inode.xattrs.get(name)

    @staticmethod
    def listxattr(inode: Inode) -> list[bytes]:
        """The names of the inode's extended attributes."""
        return list(inode.xattrs)

    def removexattr(self, inode: Inode, name: bytes) -> None:
        """Remove one extended attribute."""
        try:
            value = inode.xattrs.pop(name)
        except KeyError:
            raise OSError(errno.ENODATA, "no such attribute") from None
        self.store.uncharge(_xattr_charge(name, value))
        inode.xattr_list_bytes -= len(name) + 1
        inode.note_privileges()
        inode.touch(ctime=True)


def _check_rename_target_name(name: bytes) -> None:
    """Refuse a name no entry may be renamed to: ENAMETOOLONG, or EBUSY for . and ..."""
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    if name in (b".", b".."):
        raise OSError(errno.EBUSY, "cannot rename onto . or ..")


class InodeSlotsError(OSError):
    """ENOSPC: every ``nr_inodes`` slot is taken.

    ``forgets_pending`` is True when inodes without a name hold some: the RELEASE of their
    last close and their FORGET free them, usually a few requests later.
    """

    def __init__(self, forgets_pending: bool) -> None:
        super().__init__(errno.ENOSPC, "no free inodes")
        self.forgets_pending = forgets_pending


def _symlink_charge(target: bytes) -> int:
    """What a symlink's target costs the size cap: a page unless it is short, as on tmpfs."""
    return PAGE_SIZE if len(target) + 1 > SHORT_SYMLINK_LEN else 0


def _xattr_charge(name: bytes, value: bytes) -> int:
    """What one extended attribute costs the size cap."""
    return len(name) + len(value) + XATTR_ENTRY_OVERHEAD
