"""The FUSE adapter: pyfuse3 requests in, calls on the namespace and store, replies out.

This is the only module that speaks FUSE (pyfuse3, and :mod:`volfs.bridge` for the ioctls
pyfuse3 lacks). It turns the core's :class:`OSError` into ``FUSEError(errno)``, and any other
exception into ``EIO`` for that one request, logged with its traceback: a bug must fail the
request that met it, never the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

from volfs import bridge  # binds ahead of pyfuse3: see volfs.bridge

# isort: split
import pyfuse3
import trio

from volfs.abi import (
    PAGE_SHIFT,
    PAGE_SIZE,
    VOLFS_IOC_PURGE,
    VOLFS_IOC_STATS,
    VOLFS_IOC_VRANGE,
    VOLFS_IOC_VRANGE_NEXT,
    VOLFS_IOC_VRANGE_STATUS,
    VOLFS_PURGE,
    VRANGE_ARGS,
    VRANGE_FULL,
    VRANGE_NEXT,
    VRANGE_NONVOLATILE,
    VRANGE_PARTIAL,
    VRANGE_STATUS,
    VRANGE_VOLATILE,
    MountStatistics,
    saturated,
)
from volfs.namespace import Inode, Namespace
from volfs.pressure import PressureSettings, watch_pressure
from volfs.purge import Invalidation, PurgeResult
from volfs.store import FileContents
from volfs.worker import WorkerThread

log = logging.getLogger(__name__)

#: Seconds the kernel may trust names and attributes without asking again. Every change goes
#: through this kernel, which updates its own caches, so only a short bound is kept for safety.
CACHE_TIMEOUT = 1.0

#: Purged ranges whose pages leave the kernel's cache in one hand-off to the worker thread.
DROP_BATCH = 1024

#: relatime: atime is refreshed by reads at most this often unless older than mtime or ctime.
RELATIME_INTERVAL_NS = 24 * 3600 * 10**9

_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextlib.contextmanager
def answering(request: bridge.Request, what: str, *args: object) -> Iterator[None]:
    """Answer ``request`` with the errno of an error escaping the block (EIO for a bug).

    ``what`` and ``args`` describe the request in the log (``%``-style) if a bug shows.
    """
    try:
        yield
    except OSError as error:
        _answer_error(request, error.errno or errno.EIO)
    except Exception:
        log.exception(what + " failed; answering EIO", *args)
        _answer_error(request, errno.EIO)


def _answer_error(request: bridge.Request, code: int) -> None:
    """Answer ``request`` with errno ``code`` (EIO if the kernel cannot take it), unless it was.

    A reply that cannot be sent is dropped: the kernel no longer waits for the request (its
    connection was aborted) or the request's session has ended.
    """
    if request.answered:
        return
    try:
        request.reply_error(code if 0 < code < 512 else errno.EIO)
    except OSError as error:
        log.debug("cannot answer a request with %s: %s", errno.errorcode.get(code, code), error)


def fuse_errors(
    handler: Callable[Concatenate[VolfsOperations, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[VolfsOperations, _P], Coroutine[Any, Any, _R]]:
    """Map the core's errors to ``FUSEError`` and contain unexpected ones to the request."""

    async def wrapper(self: VolfsOperations, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
        except MemoryError:
            log.error("%s: out of memory", handler.__name__)
            raise pyfuse3.FUSEError(errno.ENOMEM) from None
        except Exception:
            log.exception("%s failed; answering EIO", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    functools.update_wrapper(wrapper, handler)
    return wrapper


@dataclass(slots=True)
class OpenFile:
    """One open file description as the kernel passed it to OPEN or CREATE."""

    inode: Inode
    flags: int

    @property
    def writable(self) -> bool:
        """True if opened for writing."""
        return self.flags & os.O_ACCMODE != os.O_RDONLY


class VolfsOperations(pyfuse3.Operations):
    """pyfuse3 handlers for one mount."""

    enable_writeback_cache = False  # write-through keeps ENOSPC visible to the writer

    def __init__(self, namespace: Namespace, *, purged_reads_zero: bool = False) -> None:
        """Serve ``namespace``.

        Args:
            purged_reads_zero: reads of purged volatile data return zeros instead of EIO.
        """
        super().__init__()
        self.namespace = namespace
        self.purged_reads_zero = purged_reads_zero
        #: Where requests answered later (purges) run; set by :func:`serve`.
        self.nursery: trio.Nursery | None = None
        #: The thread dropping purged pages from the kernel's cache, while serving.
        self.cache_dropper: WorkerThread | None = None
        #: Inodes whose purged pages are still being dropped from the kernel's cache, with
        #: an event per drop in progress.
        self._dropping: dict[int, list[trio.Event]] = {}
        self._files: dict[int, OpenFile] = {}
        self._discard_wakeup = trio.Event()
        #: Inodes being truncated a step at a time, with the event that ends it.
        self._truncating: dict[int, trio.Event] = {}
        #: Open directory handles: the inode listed. Listings resume from the offset the
        #: kernel passes back, so a handle holds nothing of the directory.
        self._directories: dict[int, Inode] = {}
        self._next_handle = 1

    # -- helpers ----------------------------------------------------------------------------

    def _handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

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

    # -- names ------------------------------------------------------------------------------

    @fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attributes(self.namespace.lookup(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # FORGET has no reply, so nothing may escape from here.
        for ino, count in inode_list:
            try:
                self.namespace.forget(ino, count)
            except Exception:
                log.exception("forget(%d, %d) failed", ino, count)

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
        if fields.update_size:
            await self._truncate(node, self.namespace.truncate_steps(node, attr.st_size))
            node.touch(mtime=True)
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.touch(ctime=True)
        return self._attributes(node)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.namespace.get(inode)
        if not stat.S_ISLNK(node.mode):
            raise OSError(errno.EINVAL, "not a symlink")
        return node.target

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self.namespace.mknod(parent_inode, name, mode, ctx.uid, ctx.gid, rdev)
        return self._attributes(node)

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attributes(self.namespace.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self.namespace.symlink(parent_inode, name, target, ctx.uid, ctx.gid)
        return self._attributes(node)

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attributes(self.namespace.link(inode, new_parent_inode, new_name))

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

    async def _truncate(self, node: Inode, steps: Iterator[None]) -> None:
        """Run a truncation's steps, serving other requests between them.

        Writes, fallocate and volatility ioctls of the inode wait until it is over: a write
        past the new end would land in a range that is about to go, where a purge could take
        it. Truncations of one inode go one at a time.
        """
        await self._truncated(node.ino)
        done = trio.Event()
        self._truncating[node.ino] = done
        try:
            for _step in steps:
                await trio.sleep(0)
        finally:
            del self._truncating[node.ino]
            done.set()

    async def _truncated(self, ino: int) -> None:
        """Wait until no truncation of ``ino`` is in progress."""
        while (truncation := self._truncating.get(ino)) is not None:
            await truncation.wait()

    async def _open(self, node: Inode, flags: int) -> pyfuse3.FileInfo:
        steps = self.namespace.open_steps(node, truncate=bool(flags & os.O_TRUNC))
        if flags & os.O_TRUNC:
            await self._truncate(node, steps)
        else:
            for _step in steps:
                pass
        handle = self._handle()
        self._files[handle] = OpenFile(node, flags)
        # keep_cache: every change passes through this kernel, so its page cache stays valid
        # across opens; dropping it at each open would cost a re-read for nothing.
        return pyfuse3.FileInfo(fh=handle, keep_cache=True)

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
        node = self.namespace.mknod(
            parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx.uid, ctx.gid
        )
        return await self._open(node, flags), self._attributes(node)

    async def read(self, fh: int, off: int, size: int) -> Any:
        # The hot path: no decorator frame, and the reply is a view of the arena, not a copy.
        try:
            node = self._files[fh].inode
            assert node.contents is not None
            vranges = node.vranges
            if (
                vranges is not None
                and not self.purged_reads_zero
                and vranges.is_lost(off >> PAGE_SHIFT, (off + size + PAGE_SIZE - 1) >> PAGE_SHIFT)
            ):
                # The whole request fails: a short reply would be taken for EOF.
                raise OSError(errno.EIO, "read of purged volatile data")
            data = node.contents.read(off, size)
            now = time.time_ns()
            if (
                now - node.atime_ns > RELATIME_INTERVAL_NS
                or node.atime_ns <= node.mtime_ns
                or node.atime_ns <= node.ctime_ns
            ):
                node.atime_ns = now
            return data
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
        except Exception:
            log.exception("read(fh=%d, off=%d, size=%d) failed; answering EIO", fh, off, size)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            node = self._files[fh].inode
            assert node.contents is not None
            if node.ino in self._truncating:
                await self._truncated(node.ino)
            try:
                written = node.contents.write(off, buf)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                contents = node.contents
                written = await self._retry_after_making_room(
                    contents,
                    off >> PAGE_SHIFT,
                    (off + len(buf) + PAGE_SIZE - 1) >> PAGE_SHIFT,
                    lambda: contents.write(off, buf),
                )
            if node.vranges is not None:
                node.vranges.rewritten(
                    off >> PAGE_SHIFT, (off + written + PAGE_SIZE - 1) >> PAGE_SHIFT
                )
            now = time.time_ns()
            node.mtime_ns = now
            node.ctime_ns = now
            return written
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
        except MemoryError:
            raise pyfuse3.FUSEError(errno.ENOMEM) from None
        except Exception:
            log.exception("write(fh=%d, off=%d, len=%d) failed; answering EIO", fh, off, len(buf))
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def _retry_after_making_room(
        self, contents: FileContents, first: int, end: int, attempt: Callable[[], _R]
    ) -> _R:
        """Retry an allocation of the holes of [first, end) in ``contents`` that hit the cap.

        Memory just released is waited for; then volatile data is purged, oldest first, for
        the pages still missing (holes of the span, not pages the file already holds), so
        ENOSPC is returned only when no volatile data is left. A purge may take pages of
        this very span and so widen what is missing: it goes on until the attempt fits or
        nothing is left to purge. The purged pages are dropped from the kernel's cache in
        the background, not before the request is answered: the kernel may hold locked
        pages of a write in a purged range.
        """
        store = self.namespace.store
        if store.reclaim_pending:
            await store.wait_reclaimed()
            try:
                return attempt()
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
        arena = store.arena
        if end - first > arena.capacity_pages:
            raise OSError(errno.ENOSPC, "more than the whole filesystem")  # purge nobody's cache
        while True:
            holes = sum(count for _page, count in contents.holes(first, end))
            missing = holes - arena.available_pages - arena.dirty_pages
            purged = await self._purge(max(missing, 1) << PAGE_SHIFT, "size")
            try:
                return attempt()
            except OSError as error:
                if error.errno != errno.ENOSPC or not purged.ranges:
                    raise

    async def flush(self, fh: int) -> None:
        pass  # nothing is buffered: data is in the store once WRITE is answered

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    @fuse_errors
    async def release(self, fh: int) -> None:
        if self.namespace.close(self._files.pop(fh).inode):
            self._discard_wakeup.set()

    async def discard_ended_ranges(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Drop the ranges of closed files a little at a time, until cancelled.

        A last close ends a file's volatility at once; dropping its ranges one by one
        could hold the event loop for a second, so it happens here, between requests.
        """
        task_status.started()
        while True:
            await self._discard_wakeup.wait()
            self._discard_wakeup = trio.Event()
            while self.namespace.discard_ended():
                await trio.sleep(0)

    # -- directories ------------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.namespace.get(inode)
        if not node.is_dir():
            raise OSError(errno.ENOTDIR, "not a directory")
        handle = self._handle()
        self._directories[handle] = node
        return handle

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        directory = self._directories[fh]
        for next_id, name, node in self.namespace.directory_listing(directory.ino, start_id):
            if not pyfuse3.readdir_reply(token, name, self._attributes(node), next_id):
                return
            if name not in (b".", b".."):
                node.lookups += 1

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
        data.f_namemax = 255
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
            value = self.namespace.get(inode).xattrs.get(name)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return list(self.namespace.get(inode).xattrs)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.namespace.removexattr(self.namespace.get(inode), name)

    # -- ioctls (through the bridge) --------------------------------------------------------

    def ioctl(
        self,
        request: bridge.Request,
        ino: int,
        cmd: int,
        fh: int,
        is_dir: bool,
        data: bytes,
        out_size: int,
    ) -> None:
        """Answer one ioctl; called by the bridge on the thread serving requests.

        The volatility ioctls (VRANGE, VRANGE_STATUS, VRANGE_NEXT) are answered at once, or
        once the file's purged pages have left the kernel's cache; VOLFS_IOC_PURGE
        continues in a task, since dropping purged pages from the kernel's cache must happen
        off this thread. Errors answer the request with their errno, never escape.
        """
        with answering(request, "ioctl(ino=%d, cmd=%#x)", ino, cmd):
            if cmd in _VOLATILITY_IOCTLS and (ino in self._dropping or ino in self._truncating):
                assert self.nursery is not None
                self.nursery.start_soon(self._vrange_once_dropped, request, ino, cmd, fh, data)
            elif cmd == VOLFS_IOC_VRANGE:
                steps = self._vrange_steps(ino, fh, is_dir, data)
                try:
                    next(steps)
                except StopIteration as done:
                    request.reply_ioctl(0, done.value)
                else:
                    # A span over many ranges: the rest between other requests.
                    assert self.nursery is not None
                    self.nursery.start_soon(self._vrange_in_steps, request, ino, steps)
            elif cmd == VOLFS_IOC_VRANGE_STATUS:
                request.reply_ioctl(0, self._vrange_status(ino, data))
            elif cmd == VOLFS_IOC_VRANGE_NEXT:
                request.reply_ioctl(0, self._vrange_next(ino, data))
            elif cmd == VOLFS_IOC_STATS:
                request.reply_ioctl(0, self.statistics().pack())
            elif cmd == VOLFS_IOC_PURGE:
                # Purging takes memory from every user of the mount: only its owner or root.
                if request.uid not in (0, os.getuid()):
                    raise OSError(errno.EPERM, "purge needs root or the mount's owner")
                (wanted, _purged) = VOLFS_PURGE.unpack(data)
                assert self.nursery is not None
                self.nursery.start_soon(self._purge_ioctl, request, wanted)
            else:
                request.reply_error(errno.ENOTTY)

    # -- fallocate and lseek (through the bridge) -------------------------------------------

    def fallocate(
        self, request: bridge.Request, ino: int, fh: int, mode: int, offset: int, length: int
    ) -> None:
        """Answer fallocate(2); called by the bridge on the thread serving requests."""
        assert self.nursery is not None
        self.nursery.start_soon(self._fallocate, request, fh, mode, offset, length)

    async def _fallocate(
        self, request: bridge.Request, fh: int, mode: int, offset: int, length: int
    ) -> None:
        with answering(request, "fallocate(fh=%d, mode=%#x)", fh, mode):
            node = self._files[fh].inode
            await self._truncated(node.ino)
            try:
                self.namespace.fallocate(node, mode, offset, length)
            except OSError as error:
                if error.errno != errno.ENOSPC or node.contents is None:
                    raise
                await self._retry_after_making_room(
                    node.contents,
                    offset >> PAGE_SHIFT,
                    (offset + length + PAGE_SIZE - 1) >> PAGE_SHIFT,
                    lambda: self.namespace.fallocate(node, mode, offset, length),
                )
            request.reply_ok()

    def lseek(self, request: bridge.Request, ino: int, fh: int, offset: int, whence: int) -> None:
        """Answer SEEK_DATA and SEEK_HOLE; the kernel handles the other kinds of lseek."""
        with answering(request, "lseek(ino=%d, whence=%d)", ino, whence):
            contents = self.namespace.get(ino).contents
            if contents is None or whence not in (os.SEEK_DATA, os.SEEK_HOLE):
                raise OSError(errno.EINVAL, "SEEK_DATA and SEEK_HOLE on regular files only")
            if offset < 0:
                raise OSError(errno.ENXIO, "negative offset")
            found = (
                contents.seek_data(offset) if whence == os.SEEK_DATA else contents.seek_hole(offset)
            )
            if found is None:
                raise OSError(errno.ENXIO, "no more data")
            request.reply_lseek(found)

    def statistics(self) -> MountStatistics:
        """The mount's counters, as ``vrangectl stats`` shows them."""
        names = self.namespace.statistics()
        purges = self.namespace.purger.statistics()
        return MountStatistics(
            capacity_bytes=names.capacity_bytes,
            used_bytes=names.used_bytes,
            volatile_bytes=purges.volatile_bytes,
            purged_bytes=purges.purged_bytes,
            ranges=purges.ranges,
            purgeable_ranges=purges.purgeable_ranges,
            purges_ioctl=purges.purges.get("ioctl", 0),
            purges_size=purges.purges.get("size", 0),
            purges_pressure=purges.purges.get("pressure", 0),
            inodes=names.inodes,
            max_inodes=names.max_inodes,
        )

    def _vrange_steps(
        self, ino: int, fh: int, is_dir: bool, data: bytes
    ) -> Generator[None, None, bytes]:
        """VOLFS_IOC_VRANGE as steps (see :meth:`Namespace.vrange_steps`); returns the reply."""
        start, length, mode, flags, _marked, _purged, reserved = VRANGE_ARGS.unpack(data)
        node = self.namespace.get(ino)
        if is_dir or node.is_dir():
            raise OSError(errno.EISDIR, "volatile ranges belong to regular files")
        open_file = self._files.get(fh)
        if open_file is None or open_file.inode is not node:
            raise OSError(errno.EBADF, "no such open file")
        if reserved:
            raise OSError(errno.EINVAL, "reserved field must be zero")
        # As for fallocate: changing a file's data needs a descriptor open for writing.
        if mode in (VRANGE_VOLATILE, VRANGE_NONVOLATILE) and not open_file.writable:
            raise OSError(errno.EBADF, "descriptor not open for writing")
        marked, purged = yield from self.namespace.vrange_steps(node, start, length, mode, flags)
        return VRANGE_ARGS.pack(start, length, mode, flags, marked, int(purged), 0)

    async def _vrange_in_steps(
        self, request: bridge.Request, ino: int, steps: Generator[None, None, bytes]
    ) -> None:
        """Go on with a VOLFS_IOC_VRANGE a step at a time, letting other requests run between.

        A purge may take part of the span meanwhile: the answer waits, as any volatility
        ioctl does, until its pages have left the kernel's cache.
        """
        with answering(request, "ioctl(ino=%d, VRANGE)", ino):
            reply = await self._finish_steps(steps)
            await self._dropped(ino)
            request.reply_ioctl(0, reply)

    @staticmethod
    async def _finish_steps(steps: Generator[None, None, bytes]) -> bytes:
        """Run ``steps`` to the end, serving other requests between two of them."""
        while True:
            try:
                next(steps)
            except StopIteration as done:
                reply: bytes = done.value
                return reply
            await trio.sleep(0)

    async def _vrange_once_dropped(
        self, request: bridge.Request, ino: int, cmd: int, fh: int, data: bytes
    ) -> None:
        """A volatility ioctl on an inode being truncated or whose purged pages are leaving
        the kernel's cache.

        Answered only once the truncation is over and the pages are gone: a program told its
        range was purged must not then read the old bytes from the cache.
        """
        with answering(request, "ioctl(ino=%d, cmd=%#x)", ino, cmd):
            await self._truncated(ino)
            await self._dropped(ino)
            if cmd == VOLFS_IOC_VRANGE:
                await self._vrange_in_steps(request, ino, self._vrange_steps(ino, fh, False, data))
            elif cmd == VOLFS_IOC_VRANGE_NEXT:
                request.reply_ioctl(0, self._vrange_next(ino, data))
            else:
                request.reply_ioctl(0, self._vrange_status(ino, data))

    async def _dropped(self, ino: int) -> None:
        """Wait until no purged page of ``ino`` is on its way out of the kernel's cache."""
        while (drops := self._dropping.get(ino)) is not None:
            await drops[0].wait()

    def _note_dropping(self, inodes: set[int], done: trio.Event) -> None:
        """Note ``inodes`` as having purged pages on their way out of the kernel's cache.

        Noted as soon as they are purged, before anything is awaited: a volatility change on
        them waits for ``done`` instead of being answered while the cache may still serve
        their old bytes.
        """
        for ino in inodes:
            self._dropping.setdefault(ino, []).append(done)

    def _start_drop(self, invalidations: list[Invalidation]) -> trio.Event:
        """Start dropping purged byte ranges from the kernel's cache; return its event."""
        assert self.nursery is not None, "purges happen while serving"
        dropped = trio.Event()

        async def drop() -> None:
            try:
                await self._drop_ranges(invalidations)
            finally:
                dropped.set()

        self.nursery.start_soon(drop)
        return dropped

    async def _end_drop(
        self, batches: list[trio.Event], inodes: set[int], done: trio.Event
    ) -> None:
        """Once every batch of a purge left the cache, lift its notes and set ``done``."""
        try:
            for batch in batches:
                await batch.wait()
        finally:
            done.set()
            for ino in inodes:
                events = self._dropping[ino]
                events.remove(done)
                if not events:
                    del self._dropping[ino]

    async def _drop_ranges(self, invalidations: list[Invalidation]) -> None:
        """Drop purged byte ranges ``(ino, offset, length)`` from the kernel's page cache.

        Done in a worker thread: the kernel first writes dirty mmap pages of the range back
        through this daemon, whose requests the event loop must stay free to serve.
        """
        assert self.cache_dropper is not None, "drops start once serving"
        await self.cache_dropper.run(functools.partial(_invalidate_all, invalidations))

    def _vrange_status(self, ino: int, data: bytes) -> bytes:
        start, length, _volatile, _purged = VRANGE_STATUS.unpack(data)
        volatile, lost = self.namespace.vrange_status(self.namespace.get(ino), start, length)
        return VRANGE_STATUS.pack(start, length, volatile, lost)

    def _vrange_next(self, ino: int, data: bytes) -> bytes:
        """Answer VOLFS_IOC_VRANGE_NEXT: the first range of the file ending after ``start``."""
        start, _range_start, _range_end, _flags, _purged = VRANGE_NEXT.unpack(data)
        found = self.namespace.vrange_next(self.namespace.get(ino), start)
        if found is None:
            return VRANGE_NEXT.pack(start, 0, 0, 0, 0)
        flags = VRANGE_PARTIAL if found.partial else VRANGE_FULL
        return VRANGE_NEXT.pack(
            start, found.start << PAGE_SHIFT, found.end << PAGE_SHIFT, flags, int(found.purged)
        )

    async def _purge(self, wanted: int, source: str, *, wait: bool = False) -> PurgeResult:
        """Purge up to ``wanted`` bytes (0: all) oldest first, a budget at a time.

        Between budgets other requests are served. The inodes a budget purged are noted as
        leaving the kernel's cache at once, and their pages leave it in batches of
        :data:`DROP_BATCH` ranges (whatever happens next); with ``wait`` this returns only
        once they are all gone. The purge is logged with the counters ``vrangectl stats``
        shows, so a log alone tells what each one did to the mount.

        Returns:
            What the whole purge did.
        """
        assert self.nursery is not None, "purges happen while serving"
        purger = self.namespace.purger
        purger.count_purge(source)
        freed = ranges = 0
        done = trio.Event()
        noted: set[int] = set()
        pending: list[Invalidation] = []
        batches: list[trio.Event] = []
        try:
            while True:
                invalidations: list[Invalidation] = []
                try:
                    result = purger.purge(wanted - freed if wanted else 0, invalidations)
                finally:
                    inodes = {ino for ino, _offset, _length in invalidations} - noted
                    self._note_dropping(inodes, done)
                    noted |= inodes
                    pending += invalidations
                    if len(pending) >= DROP_BATCH:
                        batches.append(self._start_drop(pending))
                        pending = []
                freed += result.freed_bytes
                ranges += result.ranges
                if result.complete:
                    break
                await trio.sleep(0)
        finally:
            if pending:
                batches.append(self._start_drop(pending))
            self.nursery.start_soon(self._end_drop, batches, noted, done)
        if ranges:
            self._log_purge(source, ranges, freed)
        if wait:
            await done.wait()
        return PurgeResult(freed, ranges)

    def _log_purge(self, source: str, ranges: int, freed: int) -> None:
        try:
            log.info(
                "purge (%s): %d ranges, %d bytes freed; %s",
                source,
                ranges,
                freed,
                self.statistics().describe(),
            )
        except Exception:
            # Nothing about a log line may undo or fail a purge that has happened.
            log.exception("cannot log a purge")

    async def purge_for_pressure(self, wanted: int) -> int:
        """Purge up to ``wanted`` bytes for memory pressure; return the bytes freed.

        Returns once the memory is back with the system, so the caller can judge whether
        the pressure eased.
        """
        try:
            result = await self._purge(wanted, "pressure", wait=True)
            await self.namespace.store.wait_reclaimed()
        except Exception:
            # The watcher must outlive a failed batch (out of memory, a bug): it is what
            # gives memory back the next time.
            log.exception("purging for memory pressure failed")
            return 0
        return result.freed_bytes

    async def _purge_ioctl(self, request: bridge.Request, wanted: int) -> None:
        with answering(request, "purge(%d)", wanted):
            result = await self._purge(wanted, "ioctl", wait=True)
            request.reply_ioctl(0, VOLFS_PURGE.pack(wanted, saturated(result.freed_bytes)))


#: The ioctls about a file's volatility: answered once its purged pages left the kernel's cache.
_VOLATILITY_IOCTLS = (VOLFS_IOC_VRANGE, VOLFS_IOC_VRANGE_STATUS, VOLFS_IOC_VRANGE_NEXT)


def _invalidate_all(invalidations: list[Invalidation]) -> None:
    for ino, code in bridge.invalidate_ranges(invalidations):
        # Only an unmounted session refuses; its cache is gone with it.
        log.warning(
            "cannot drop inode %d's purged pages from the kernel cache: %s", ino, os.strerror(code)
        )


def _log_unserved_request(operation: str, error: BaseException, code: int) -> None:
    """Log a request pyfuse3 could not hand to its handler; the bridge answered ``code``."""
    reason = "out of memory" if isinstance(error, MemoryError) else repr(error)
    log.error(
        "%s request failed before its handler ran: %s; answered %s",
        operation,
        reason,
        errno.errorcode.get(code, code),
    )


def mount(operations: VolfsOperations, mountpoint: str, options: set[str]) -> None:
    """Mount ``operations`` on ``mountpoint``; returns once the kernel knows the mount.

    Raises:
        RuntimeError: libfuse could not mount (it has printed why), or the bridge is not
            active, so ioctls would not reach the daemon.
    """
    pyfuse3.init(operations, mountpoint, options)
    if not bridge.active():
        pyfuse3.close(unmount=True)
        raise RuntimeError("the ioctl bridge did not take hold of the FUSE session")
    bridge.set_handlers(
        ioctl=operations.ioctl,
        fallocate=operations.fallocate,
        lseek=operations.lseek,
        failure=_log_unserved_request,
    )


async def serve(operations: VolfsOperations, pressure: PressureSettings) -> None:
    """Serve requests until the filesystem is unmounted or :func:`terminate` is called."""
    with WorkerThread("volfs-cache-drop") as cache_dropper:
        operations.cache_dropper = cache_dropper
        try:
            await _serve_until_unmounted(operations, pressure)
        finally:
            operations.cache_dropper = None


async def _serve_until_unmounted(operations: VolfsOperations, pressure: PressureSettings) -> None:
    async with trio.open_nursery() as nursery:
        operations.nursery = nursery
        await nursery.start(operations.namespace.store.run_reclaimer, name="reclaimer")
        await nursery.start(operations.discard_ended_ranges, name="discard")
        await nursery.start(
            functools.partial(watch_pressure, pressure, operations.purge_for_pressure),
            name="pressure",
        )
        try:
            await pyfuse3.main()
        except* ConnectionAbortedError:
            # The kernel ended the connection as aborted rather than unmounted: it does so
            # now and then on unmount with many inodes to forget, and on a fusectl abort.
            # Either way the filesystem is gone; what it held goes as on any unmount.
            log.warning("the kernel aborted the FUSE connection; serving ends")
        nursery.cancel_scope.cancel()


def terminate() -> None:
    """Make :func:`serve` return; call from the event loop's thread."""
    pyfuse3.terminate()


def unmount() -> None:
    """Unmount (if still mounted) and release the FUSE session."""
    bridge.set_handlers()
    pyfuse3.close(unmount=True)
