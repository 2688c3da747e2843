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
from collections.abc import Callable, Coroutine, Generator, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from volfs import bridge  # binds ahead of pyfuse3: see volfs.bridge

# isort: split
import pyfuse3
import trio

from volfs.abi import (
    NAME_MAX,
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
    pages_spanned,
    saturated,
)
from volfs.namespace import AttributeChanges, Inode, Namespace
from volfs.purge import Invalidation, PurgeSource
from volfs.reclaim import Reclaimer
from volfs.stepping import Backlog, Truncations, finish

log = logging.getLogger(__name__)

#: Seconds the kernel may trust names and attributes without asking again. Every change goes
#: through this kernel, which updates its own caches, so only a short bound is kept for safety.
CACHE_TIMEOUT = 1.0

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

    def __init__(
        self,
        namespace: Namespace,
        reclaimer: Reclaimer,
        *,
        nursery: trio.Nursery,
        discards: Backlog,
    ) -> None:
        """Serve ``namespace``, purging through ``reclaimer``.

        Args:
            nursery: where requests answered later (purges, stepped work) run.
            discards: the task dropping the ranges of closed files, woken by a last close.
        """
        super().__init__()
        self.namespace = namespace
        self.reclaimer = reclaimer
        self._nursery = nursery
        self._discards = discards
        self._truncations = Truncations()
        self._files: dict[int, OpenFile] = {}
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

    async def _make_room(
        self, node: Inode, offset: int, length: int, attempt: Callable[[], _R]
    ) -> _R:
        """Retry ``attempt`` on ``node``'s bytes [offset, offset + length) that hit the cap."""
        assert node.contents is not None
        return await self.reclaimer.make_room(
            node.contents, *pages_spanned(offset, length), attempt
        )

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
        return self._attributes(node)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.namespace.readlink(self.namespace.get(inode))

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

    async def _open(self, node: Inode, flags: int) -> pyfuse3.FileInfo:
        steps = self.namespace.open_steps(node, truncate=bool(flags & os.O_TRUNC))
        if flags & os.O_TRUNC:
            await self._truncations.run(node.ino, steps)
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
                return self.namespace.write(node, off, buf)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
            return await self._make_room(
                node, off, len(buf), lambda: self.namespace.write(node, off, buf)
            )
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
        except MemoryError:
            raise pyfuse3.FUSEError(errno.ENOMEM) from None
        except Exception:
            log.exception("write(fh=%d, off=%d, len=%d) failed; answering EIO", fh, off, len(buf))
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def flush(self, fh: int) -> None:
        pass  # nothing is buffered: data is in the store once WRITE is answered

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    @fuse_errors
    async def release(self, fh: int) -> None:
        if self.namespace.close(self._files.pop(fh).inode):
            self._discards.wake()

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

    # -- ioctls (through the bridge) --------------------------------------------------------

    def ioctl(
        self, request: bridge.Request, ino: int, cmd: int, fh: int, is_dir: bool, data: bytes
    ) -> None:
        """Answer one ioctl; called by the bridge on the thread serving requests.

        The volatility ioctls (VRANGE, VRANGE_STATUS, VRANGE_NEXT) are answered at once, or
        once the file's truncation is over and its purged pages have left the kernel's cache;
        long marks and VOLFS_IOC_PURGE go on in a task. Errors answer the request with their
        errno, never escape.
        """
        with answering(request, "ioctl(ino=%d, cmd=%#x)", ino, cmd):
            if cmd in _VOLATILITY_IOCTLS and (
                self.reclaimer.is_dropping(ino) or ino in self._truncations
            ):
                self._nursery.start_soon(self._volatility_later, request, ino, cmd, fh, data)
            elif cmd == VOLFS_IOC_VRANGE:
                steps = self._vrange_steps(ino, fh, is_dir, data)
                try:
                    next(steps)
                except StopIteration as done:
                    request.reply_ioctl(0, done.value)
                else:
                    # A span over many ranges: the rest between other requests.
                    self._nursery.start_soon(self._vrange_in_steps, request, ino, steps)
            elif cmd == VOLFS_IOC_VRANGE_STATUS:
                request.reply_ioctl(0, self._vrange_status(ino, data))
            elif cmd == VOLFS_IOC_VRANGE_NEXT:
                request.reply_ioctl(0, self._vrange_next(ino, data))
            elif cmd == VOLFS_IOC_STATS:
                request.reply_ioctl(0, self.namespace.statistics().pack())
            elif cmd == VOLFS_IOC_PURGE:
                # Purging takes memory from every user of the mount: only its owner or root.
                if request.uid not in (0, os.getuid()):
                    raise OSError(errno.EPERM, "purge needs root or the mount's owner")
                (wanted, _purged) = VOLFS_PURGE.unpack(data)
                self._nursery.start_soon(self._purge, request, wanted)
            else:
                request.reply_error(errno.ENOTTY)

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
            reply = await finish(steps)
            await self.reclaimer.dropped(ino)
            request.reply_ioctl(0, reply)

    async def _volatility_later(
        self, request: bridge.Request, ino: int, cmd: int, fh: int, data: bytes
    ) -> None:
        """A volatility ioctl on an inode being truncated or whose purged pages are leaving
        the kernel's cache: answered only once both are over, so that a program told its
        range was purged cannot then read the old bytes from the cache.
        """
        with answering(request, "ioctl(ino=%d, cmd=%#x)", ino, cmd):
            await self._truncations.wait(ino)
            await self.reclaimer.dropped(ino)
            if cmd == VOLFS_IOC_VRANGE:
                await self._vrange_in_steps(request, ino, self._vrange_steps(ino, fh, False, data))
            elif cmd == VOLFS_IOC_VRANGE_NEXT:
                request.reply_ioctl(0, self._vrange_next(ino, data))
            else:
                request.reply_ioctl(0, self._vrange_status(ino, data))

    def _vrange_status(self, ino: int, data: bytes) -> bytes:
        start, length, _volatile, _purged = VRANGE_STATUS.unpack(data)
        volatile, lost = self.namespace.vrange_status(self.namespace.get(ino), start, length)
        return VRANGE_STATUS.pack(start, length, volatile, lost)

    def _vrange_next(self, ino: int, data: bytes) -> bytes:
        start, _range_start, _range_end, _flags, _purged = VRANGE_NEXT.unpack(data)
        found = self.namespace.vrange_next(self.namespace.get(ino), start)
        if found is None:
            return VRANGE_NEXT.pack(start, 0, 0, 0, 0)
        flags = VRANGE_PARTIAL if found.partial else VRANGE_FULL
        return VRANGE_NEXT.pack(
            start, found.start << PAGE_SHIFT, found.end << PAGE_SHIFT, flags, int(found.purged)
        )

    async def _purge(self, request: bridge.Request, wanted: int) -> None:
        with answering(request, "purge(%d)", wanted):
            result = await self.reclaimer.purge(wanted, PurgeSource.IOCTL, wait=True)
            request.reply_ioctl(0, VOLFS_PURGE.pack(wanted, saturated(result.freed_bytes)))

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
            try:
                self.namespace.fallocate(node, mode, offset, length)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                await self._make_room(
                    node,
                    offset,
                    length,
                    lambda: self.namespace.fallocate(node, mode, offset, length),
                )
            request.reply_ok()

    def lseek(self, request: bridge.Request, ino: int, fh: int, offset: int, whence: int) -> None:
        """Answer SEEK_DATA and SEEK_HOLE; the kernel handles the other kinds of lseek."""
        with answering(request, "lseek(ino=%d, whence=%d)", ino, whence):
            request.reply_lseek(self.namespace.seek(self.namespace.get(ino), offset, whence))


#: The ioctls about a file's volatility: answered once its purged pages left the kernel's cache.
_VOLATILITY_IOCTLS = (VOLFS_IOC_VRANGE, VOLFS_IOC_VRANGE_STATUS, VOLFS_IOC_VRANGE_NEXT)


def invalidate(invalidations: Sequence[Invalidation]) -> None:
    """Drop byte ranges ``(ino, offset, length)`` from the kernel's page cache.

    Blocks while the kernel writes dirty pages back through the daemon: call it in a worker
    thread. A range the kernel refuses is logged.
    """
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


class Session:
    """The FUSE session of one mount: mounted by :meth:`mount`, unmounted when left.

    Entered before anything the mount needs while it serves, so that the unmount comes only
    after they have ended (no cache drop runs against a closed session).
    """

    def __init__(self) -> None:
        self.mounted = False

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.mounted:
            self.mounted = False
            bridge.close()
            pyfuse3.close(unmount=True)

    def mount(self, operations: VolfsOperations, mountpoint: str, options: set[str]) -> None:
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
        self.mounted = True

    @staticmethod
    async def serve() -> None:
        """Serve requests until the filesystem is unmounted or :func:`terminate` is called."""
        try:
            await pyfuse3.main()
        except* ConnectionAbortedError:
            # The kernel ended the connection as aborted rather than unmounted: it does so
            # now and then on unmount with many inodes to forget, and on a fusectl abort.
            # Either way the filesystem is gone; what it held goes as on any unmount.
            log.warning("the kernel aborted the FUSE connection; serving ends")


def terminate() -> None:
    """Make :meth:`Session.serve` return; call from the event loop's thread."""
    pyfuse3.terminate()
