"""The FUSE adapter: pyfuse3 requests in, calls on the namespace, replies out.

The pyfuse3 handlers, and fallocate and lseek, which the bridge (:mod:`volfs.daemon.bridge`)
adds. The core's :class:`OSError` becomes ``FUSEError(errno)`` and any other exception ``EIO``
for that one request (:mod:`volfs.daemon.replies`); the ioctls are :mod:`volfs.daemon.ioctls`',
the session :mod:`volfs.daemon.session`'s. Nothing below :mod:`volfs.daemon` speaks FUSE.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from volfs.daemon import bridge, wire  # binds ahead of pyfuse3: see volfs.daemon.bridge

# isort: split
import pyfuse3
import trio

from volfs.abi import (
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    NAME_MAX,
    NO_PAGE,
    PAGE_SHIFT,
    PAGE_SIZE,
    pages_for,
    pages_spanned,
)
from volfs.core.inode import Inode
from volfs.core.namespace import AttributeChanges, InodeSlotsError, Namespace
from volfs.core.reclaim import FORGET_WAIT, Reclaimer
from volfs.core.stepping import Backlog, Truncations
from volfs.core.store import CapacityError
from volfs.daemon.handles import OpenFiles
from volfs.daemon.handover import TableHandover
from volfs.daemon.ioctls import Ioctls
from volfs.daemon.replies import answering, fuse_errors

log = logging.getLogger(__name__)

#: Seconds the kernel may trust names (present or absent) and attributes without asking
#: again. Every change goes through this kernel, which updates its own caches, and what the
#: daemon changes itself it invalidates (purged pages and st_blocks, removed privileges): the
#: bound only limits how long a missed invalidation could show.
CACHE_TIMEOUT = 3600.0
#: The same as the kernel's replies carry it: (seconds, nanoseconds).
_CACHE_VALID = wire.seconds_and_nanoseconds(CACHE_TIMEOUT)

#: Open files keep the kernel's page cache: every change passes through this kernel, so its
#: cache stays valid across opens; dropping it at each open would cost a re-read for nothing.
KEEP_CACHE = True

#: Forgets taken in one turn of the event loop. When processes holding tens of thousands of
#: removed files exit together, the kernel sends their forgets in batches of up to 65,535,
#: each forget freeing what an inode held (hundreds of milliseconds a batch): beyond a slice
#: they wait for the forget task, which takes a slice a turn. Forgets only lower counts that
#: replies already raised, so taking them later frees nothing too early; a write at the cap
#: waits for queued forgets (see Store.forgets_queued) rather than purge or fail.
FORGET_SLICE = 256
#: O_TRUNC opens that may wait at once for the purged pages of their file to leave the
#: kernel's cache. Each holds one of pyfuse3's 99 workers, and the cache drop needs a worker to
#: answer the write-back it causes: past this many, an open truncates at once, and a page a
#: mapping then writes before the drop reaches it may be discarded with the purged ones.
DROP_WAITERS = 16

_R = TypeVar("_R")


#: The capability that lets a writer keep a file's setuid and setgid (linux/capability.h).
CAP_FSETID = 4


def _has_cap_fsetid(pid: int) -> bool:
    """Whether process ``pid`` has CAP_FSETID in effect; False if that cannot be read."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_FSETID & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


class VolfsOperations(pyfuse3.Operations):
    """pyfuse3 handlers for one mount."""

    enable_writeback_cache = False  # write-through keeps ENOSPC visible to the writer

    def __init__(
        self,
        namespace: Namespace,
        reclaimer: Reclaimer,
        *,
        nursery: trio.Nursery,
        discards: Backlog,
        handover: TableHandover,
    ) -> None:
        """Serve ``namespace``, purging through ``reclaimer``.

        Args:
            nursery: where requests answered later (purges, stepped work) run.
            discards: the task dropping the ranges of closed files, woken by a last close.
            handover: gives segment tables to the files' users.
        """
        super().__init__()
        self.namespace = namespace
        self.reclaimer = reclaimer
        self._nursery = nursery
        self._discards = discards
        self._truncations = Truncations()
        #: O_TRUNC opens waiting for a cache drop (at most :data:`DROP_WAITERS`).
        self._drop_waiters = 0
        self._files = OpenFiles()
        #: Open directory handles: the inode listed. Listings resume from the offset the
        #: kernel passes back, so a handle holds nothing of the directory.
        self._directories: dict[int, Inode] = {}
        self._directory_handles = itertools.count(1)
        #: Forgets left for the forget task, oldest first.
        self._pending_forgets: deque[tuple[int, int]] = deque()
        self._forgets = Backlog(self._forget_a_slice)
        nursery.start_soon(self._forgets.run, name="forget")
        #: The requests :meth:`answer_at_once` answers, by opcode.
        self._answers_at_once: dict[int, Callable[[int, int, int, bytes], bytes | None]] = {
            wire.FUSE_LOOKUP: self._lookup_at_once,
            wire.FUSE_GETATTR: self._getattr_at_once,
            wire.FUSE_CREATE: self._create_at_once,
            wire.FUSE_OPEN: self._open_at_once,
            wire.FUSE_RELEASE: self._release_at_once,
            wire.FUSE_UNLINK: self._unlink_at_once,
            wire.FUSE_FORGET: self._forget_at_once,
            wire.FUSE_BATCH_FORGET: self._batch_forget_at_once,
        }
        #: The bridge's handler of ioctls.
        self.ioctls = Ioctls(
            namespace,
            reclaimer,
            files=self._files,
            truncations=self._truncations,
            nursery=nursery,
            handover=handover,
        )

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _attributes(inode: Inode) -> pyfuse3.EntryAttributes:
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = inode.ino
        attributes.generation = 0
        attributes.entry_timeout = CACHE_TIMEOUT
        attributes.attr_timeout = CACHE_TIMEOUT
        attributes.st_mode = inode.mode
        attributes.st_nlink = inode.nlink
        attributes.st_uid = inode.uid
        attributes.st_gid = inode.gid
        attributes.st_rdev = inode.rdev
        attributes.st_size = inode.size
        attributes.st_blksize = PAGE_SIZE
        attributes.st_blocks = inode.blocks
        attributes.st_atime_ns = inode.atime_ns
        attributes.st_mtime_ns = inode.mtime_ns
        attributes.st_ctime_ns = inode.ctime_ns
        return attributes

    @staticmethod
    def _attribute_fields(inode: Inode) -> tuple[int, ...]:
        """What :meth:`_attributes` holds, in the order of the kernel's ``struct fuse_attr``."""
        atime, atime_ns = divmod(inode.atime_ns, 1_000_000_000)
        mtime, mtime_ns = divmod(inode.mtime_ns, 1_000_000_000)
        ctime, ctime_ns = divmod(inode.ctime_ns, 1_000_000_000)
        return (
            inode.ino,
            inode.size,
            inode.blocks,
            atime,
            mtime,
            ctime,
            atime_ns,
            mtime_ns,
            ctime_ns,
            inode.mode,
            inode.nlink,
            inode.uid,
            inode.gid,
            inode.rdev & 0xFFFFFFFF,  # the kernel's new_encode_dev() form, as libfuse sends it
            PAGE_SIZE,
            0,
        )

    @classmethod
    def _entry(cls, inode: Inode) -> bytes:
        """``inode`` as the kernel's ``struct fuse_entry_out``."""
        seconds, nanoseconds = _CACHE_VALID
        return wire.ENTRY_OUT.pack(
            inode.ino, 0, seconds, seconds, nanoseconds, nanoseconds, *cls._attribute_fields(inode)
        )

    async def _make_room(
        self, node: Inode, offset: int, length: int, attempt: Callable[[], _R]
    ) -> _R:
        """Retry ``attempt`` on ``node``'s bytes [offset, offset + length) that hit the cap."""
        assert node.contents is not None
        return await self.reclaimer.make_room(
            node.contents, *pages_spanned(offset, length), attempt
        )

    async def _with_inode_slot(self, attempt: Callable[[], _R]) -> _R:
        """Retry ``attempt`` that found every ``nr_inodes`` slot taken while inodes without
        a name are still held.

        The kernel lets go of a removed inode at its unlink or, if it was open, once the
        RELEASE of its last close is answered, then sends its FORGET; it may queue both
        behind other requests, so a create that follows may come first. It waits for them:
        while the daemon has forgets queued, then for up to :data:`FORGET_WAIT` in all (a
        program may hold a removed inode for good, open or through an O_PATH descriptor),
        unless too many requests wait so already (:meth:`Store.wait_forgotten`).

        Raises:
            OSError: ENOSPC if no slot came free.
        """
        deadline = trio.current_time() + FORGET_WAIT
        while True:
            try:
                return attempt()
            except InodeSlotsError as error:
                if not error.forgets_pending:
                    raise
            if not await self.namespace.store.wait_forgotten(deadline):
                raise OSError(errno.ENOSPC, "no free inodes")

    # -- names ------------------------------------------------------------------------------

    def _lookup(self, parent_inode: int, name: bytes) -> Inode | None:
        """The inode ``name`` in ``parent_inode`` names, None if the name does not exist.

        The kernel remembers an absent name too (an entry of inode 0), until the name is
        made, which it sees, or the timeout ends.
        """
        try:
            return self.namespace.lookup(parent_inode, name)
        except OSError as error:
            if error.errno != errno.ENOENT:
                raise
        return None

    @fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._lookup(parent_inode, name)
        if node is not None:
            return self._attributes(node)
        absent = pyfuse3.EntryAttributes()
        absent.st_ino = 0
        absent.entry_timeout = CACHE_TIMEOUT
        return absent

    def _forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # FORGET has no reply, so nothing may escape from here.
        for ino, count in inode_list:
            try:
                self.namespace.forget(ino, count)
            except Exception:
                log.exception("forget(%d, %d) failed", ino, count)

    def _forget_soon(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Forget a small batch now, unless others wait; leave the rest to the forget task."""
        if len(inode_list) <= FORGET_SLICE and not self._pending_forgets:
            self._forget(inode_list)
        else:
            self._pending_forgets.extend(inode_list)
            self.namespace.store.note_forgets_queued(len(inode_list))
            self._forgets.wake()

    def _forget_a_slice(self) -> bool:
        """Take up to FORGET_SLICE waiting forgets; True while more wait."""
        pending = self._pending_forgets
        taken = [pending.popleft() for _ in range(min(FORGET_SLICE, len(pending)))]
        self._forget(taken)
        self.namespace.store.note_forgets_queued(-len(taken))
        return bool(pending)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self._forget_soon(inode_list)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # Among the most frequent requests: no decorator frame (nothing else here can fail).
        try:
            return self._attributes(self.namespace.get(inode))
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None

    @fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self.namespace.get(inode)
        changes = AttributeChanges(
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        steps = self.namespace.setattr_steps(node, changes)
        if changes.size is None:
            for _step in steps:
                pass
        else:
            await self._truncations.run(node.ino, steps)
            # The kernel drops its cached pages past the new size once answered.
            self._data_again(node.ino, pages_for(changes.size), NO_PAGE)
        return self._attributes(node)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.namespace.readlink(self.namespace.get(inode))

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = await self._with_inode_slot(
            lambda: self.namespace.mknod(parent_inode, name, mode, ctx.uid, ctx.gid, rdev)
        )
        return self._attributes(node)

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = await self._with_inode_slot(
            lambda: self.namespace.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid)
        )
        return self._attributes(node)

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = await self._with_inode_slot(
            lambda: self.namespace.symlink(parent_inode, name, target, ctx.uid, ctx.gid)
        )
        return self._attributes(node)

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = await self._with_inode_slot(
            lambda: self.namespace.link(inode, new_parent_inode, new_name)
        )
        return self._attributes(node)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.namespace.unlink(parent_inode, name)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.namespace.rmdir(parent_inode, name)

    @fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self.namespace.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # -- files ------------------------------------------------------------------------------

    def _open_now(self, node: Inode, flags: int) -> int | None:
        """Open ``node`` and return the handle; None, having done nothing, if the open
        must truncate, which goes a step at a time (:meth:`_open`)."""
        truncate = bool(flags & os.O_TRUNC)
        if truncate and (
            node.ino in self._truncations or (node.contents is not None and node.contents.size)
        ):
            return None
        for _step in self.namespace.open_steps(node, truncate=truncate):
            pass
        return self._files.add(node, flags)

    async def _open(self, node: Inode, flags: int) -> pyfuse3.FileInfo:
        handle = self._open_now(node, flags)
        if handle is None:
            # The kernel goes on writing back while it waits for an O_TRUNC open (it does not
            # for a truncation), so purged pages it writes back after the truncation would be
            # stored: the truncation waits for them to have left the cache.
            if self.reclaimer.is_dropping(node.ino) and self._drop_waiters < DROP_WAITERS:
                self._drop_waiters += 1
                try:
                    await self.reclaimer.dropped(node.ino)
                finally:
                    self._drop_waiters -= 1
            await self._truncations.run(node.ino, self.namespace.open_steps(node, truncate=True))
            handle = self._files.add(node, flags)
        return pyfuse3.FileInfo(fh=handle, keep_cache=KEEP_CACHE)

    def _data_again(self, ino: int, first: int, end: int) -> None:
        """Tell the bridge that pages [first, end) of an inode, written or truncated away, are
        data again while its purged pages are on their way out of the kernel's cache: a drop
        must store their write-back, not discard it (see the bridge)."""
        if first < end and self.reclaimer.is_dropping(ino):
            bridge.exempt_writeback(ino, first << PAGE_SHIFT, (end - first) << PAGE_SHIFT)

    def _create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, uid: int, gid: int
    ) -> tuple[Inode, int]:
        """Make a regular file and open it; return it and the handle."""
        node = self.namespace.mknod(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), uid, gid)
        handle = self._open_now(node, flags)
        assert handle is not None, "a new file has nothing to truncate"
        return node, handle

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return await self._open(self.namespace.get(inode), flags)

    @fuse_errors
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node, handle = await self._with_inode_slot(
            lambda: self._create(parent_inode, name, mode, flags, ctx.uid, ctx.gid)
        )
        return pyfuse3.FileInfo(fh=handle, keep_cache=KEEP_CACHE), self._attributes(node)

    async def read(self, fh: int, off: int, size: int) -> Any:
        # The hot path: no decorator frame, and the reply is a view of the arena, not a copy.
        try:
            return self.namespace.read(self._files[fh].inode, off, size)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
        except Exception:
            log.exception("read(fh=%d, off=%d, size=%d) failed; answering EIO", fh, off, size)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            node = self._files[fh].inode
            if node.ino in self._truncations:
                await self._truncations.wait(node.ino)
            try:
                written = self.namespace.write(node, off, buf)
            except CapacityError:
                written = await self._make_room(
                    node, off, len(buf), lambda: self.namespace.write(node, off, buf)
                )
            if written:
                self._data_again(node.ino, *pages_spanned(off, written))
            return written
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
        except MemoryError:
            raise pyfuse3.FUSEError(errno.ENOMEM) from None
        except Exception:
            log.exception("write(fh=%d, off=%d, len=%d) failed; answering EIO", fh, off, len(buf))
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    def _release(self, fh: int) -> None:
        if self.namespace.close(self._files.pop(fh).inode):
            self._discards.wake()

    @fuse_errors
    async def release(self, fh: int) -> None:
        self._release(fh)

    # -- directories ------------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.namespace.get(inode)
        if not node.is_dir():
            raise OSError(errno.ENOTDIR, "not a directory")
        handle = next(self._directory_handles)
        self._directories[handle] = node
        return handle

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        directory = self._directories[fh]
        for next_id, name, node in self.namespace.directory_listing(directory.ino, start_id):
            if not pyfuse3.readdir_reply(token, name, self._attributes(node), next_id):
                return
            if name not in (b".", b".."):
                self.namespace.count_lookup(node)

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        del self._directories[fh]

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    # -- the filesystem ---------------------------------------------------------------------

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        statistics = self.namespace.statistics()
        data = pyfuse3.StatvfsData()
        data.f_bsize = PAGE_SIZE
        data.f_frsize = PAGE_SIZE
        data.f_blocks = statistics.capacity_bytes >> PAGE_SHIFT
        data.f_bfree = data.f_bavail = (
            statistics.capacity_bytes - statistics.used_bytes
        ) >> PAGE_SHIFT
        if statistics.max_inodes:
            data.f_files = statistics.max_inodes
            data.f_ffree = data.f_favail = statistics.max_inodes - statistics.inodes
        data.f_namemax = NAME_MAX
        return data

    # -- extended attributes ----------------------------------------------------------------

    @fuse_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self.namespace.setxattr(self.namespace.get(inode), name, value)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # On the write path: the kernel asks for security.capability before every write(2),
        # and the answer is almost always "none". Answer that without a decorator frame and
        # without raising twice.
        try:
            value = self.namespace.getxattr(self.namespace.get(inode), name)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return self.namespace.listxattr(self.namespace.get(inode))

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.namespace.removexattr(self.namespace.get(inode), name)

    # -- requests answered at once (through the bridge) -------------------------------------

    def answer_at_once(
        self, opcode: int, nodeid: int, uid: int, gid: int, argument: bytes
    ) -> bytes | int | None:
        """Answer one of the namespace's frequent requests as the kernel sent it (see
        :mod:`volfs.daemon.wire`); called by the bridge on the thread serving requests as it
        reads the request, so between two awaits of every task. The same calls on the
        namespace as the pyfuse3 handlers above, without pyfuse3.

        Returns:
            The reply's bytes (those of a FORGET are not sent), an errno to answer with, or
            None, having done nothing, for a request to go through pyfuse3 (an open that must
            truncate, which goes a step at a time).
        """
        answer = self._answers_at_once.get(opcode)
        if answer is None:
            return None
        try:
            return answer(nodeid, uid, gid, argument)
        except OSError as error:
            return error.errno or errno.EIO
        except MemoryError:
            log.error("request %d: out of memory", opcode)
            return errno.ENOMEM
        except Exception:
            log.exception("request %d on inode %d failed; answering EIO", opcode, nodeid)
            return errno.EIO

    def _lookup_at_once(self, parent: int, uid: int, gid: int, argument: bytes) -> bytes:
        node = self._lookup(parent, wire.name_of(argument))
        return _ABSENT_ENTRY if node is None else self._entry(node)

    def _getattr_at_once(self, ino: int, uid: int, gid: int, argument: bytes) -> bytes:
        seconds, nanoseconds = _CACHE_VALID
        fields = self._attribute_fields(self.namespace.get(ino))
        return wire.ATTR_OUT.pack(seconds, nanoseconds, 0, *fields)

    def _create_at_once(self, parent: int, uid: int, gid: int, argument: bytes) -> bytes | None:
        flags, mode, _umask, _open_flags = wire.CREATE_IN.unpack_from(argument)
        name = wire.name_of(argument, wire.CREATE_IN.size)
        try:
            node, handle = self._create(parent, name, mode, flags, uid, gid)
        except InodeSlotsError as error:
            if error.forgets_pending:
                return None  # create() waits for them
            raise
        return self._entry(node) + _open_out(handle)

    def _open_at_once(self, ino: int, uid: int, gid: int, argument: bytes) -> bytes | None:
        flags, _open_flags = wire.OPEN_IN.unpack_from(argument)
        handle = self._open_now(self.namespace.get(ino), flags)
        return None if handle is None else _open_out(handle)

    def _release_at_once(self, ino: int, uid: int, gid: int, argument: bytes) -> bytes:
        fh, _flags, _release_flags, _lock_owner = wire.RELEASE_IN.unpack_from(argument)
        self._release(fh)
        return b""

    def _unlink_at_once(self, parent: int, uid: int, gid: int, argument: bytes) -> bytes:
        self.namespace.unlink(parent, wire.name_of(argument))
        return b""

    def _forget_at_once(self, ino: int, uid: int, gid: int, argument: bytes) -> bytes:
        (count,) = wire.FORGET_IN.unpack_from(argument)
        self._forget_soon([(ino, count)])
        return b""

    def _batch_forget_at_once(self, ino: int, uid: int, gid: int, argument: bytes) -> bytes:
        (count, _padding) = wire.BATCH_FORGET_IN.unpack_from(argument)
        start = wire.BATCH_FORGET_IN.size
        entries = argument[start : start + count * wire.FORGET_ONE.size]
        self._forget_soon(list(wire.FORGET_ONE.iter_unpack(entries)))
        return b""

    # -- fallocate and lseek (through the bridge) -------------------------------------------

    def fallocate(
        self, request: bridge.Request, ino: int, fh: int, mode: int, offset: int, length: int
    ) -> None:
        """Answer fallocate(2); called by the bridge on the thread serving requests."""
        self._nursery.start_soon(self._fallocate, request, fh, mode, offset, length)

    async def _fallocate(
        self, request: bridge.Request, fh: int, mode: int, offset: int, length: int
    ) -> None:
        with answering(request, "fallocate(fh=%d, mode=%#x)", fh, mode):
            node = self._files[fh].inode
            await self._truncations.wait(node.ino)
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                # The kernel drops its cached pages of the span once answered: those it
                # caches later are new data, which the drop of a purge must not discard.
                await self.reclaimer.dropped(node.ino)
            # The kernel asks for no removal on fallocate (it does on writes): done here, as
            # the kernel's file_modified() would.
            if node.mode & (stat.S_ISUID | stat.S_ISGID) and not _has_cap_fsetid(request.pid):
                self.kill_privileges(node.ino)
            try:
                self.namespace.fallocate(node, mode, offset, length)
            except CapacityError:
                await self._make_room(
                    node,
                    offset,
                    length,
                    lambda: self.namespace.fallocate(node, mode, offset, length),
                )
            request.reply_ok()

    def kill_privileges(self, ino: int) -> None:
        """Remove setuid, setgid and security.capability as the kernel asks before a write, a
        truncation or a chown (FUSE_HANDLE_KILLPRIV_V2); called by the bridge before the
        request that asks is processed, on the thread serving requests.

        The kernel keeps the mode it had cached, so its attributes are invalidated when
        something was removed.
        """
        try:
            if self.namespace.kill_privileges(self.namespace.get(ino)):
                bridge.invalidate_range(ino, -1, 0)  # attributes only
        except Exception:
            # The request itself goes on; only the removal is lost, and logged.
            log.exception("cannot remove the privileges of inode %d", ino)

    def lseek(self, request: bridge.Request, ino: int, fh: int, offset: int, whence: int) -> None:
        """Answer SEEK_DATA and SEEK_HOLE; the kernel handles the other kinds of lseek."""
        with answering(request, "lseek(ino=%d, whence=%d)", ino, whence):
            request.reply_lseek(self.namespace.seek(self.namespace.get(ino), offset, whence))


#: The kernel's entry for a name that does not exist: inode 0, remembered as long as any.
_ABSENT_ENTRY = wire.ENTRY_OUT.pack(
    0, 0, _CACHE_VALID[0], _CACHE_VALID[0], _CACHE_VALID[1], _CACHE_VALID[1], *(0,) * 16
)


def _open_out(handle: int) -> bytes:
    """An open handle as the kernel's ``struct fuse_open_out``."""
    return wire.OPEN_OUT.pack(handle, wire.FOPEN_KEEP_CACHE if KEEP_CACHE else 0, 0)
