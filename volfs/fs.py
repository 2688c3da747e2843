"""The FUSE adapter: pyfuse3 requests in, calls on the namespace and store, replies out.

This is the only module that speaks FUSE. It turns the core's :class:`OSError` into
``FUSEError(errno)``, and any other exception into ``EIO`` for that one request, logged with
its traceback: a bug must fail the request that met it, never the daemon.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3

from volfs.namespace import Inode, Namespace
from volfs.store import PAGE_SHIFT, PAGE_SIZE

log = logging.getLogger(__name__)

#: Seconds the kernel may trust names and attributes without asking again. Every change goes
#: through this kernel, which updates its own caches, so only a short bound is kept for safety.
CACHE_TIMEOUT = 1.0

#: relatime: atime is refreshed by reads at most this often unless older than mtime or ctime.
RELATIME_INTERVAL_NS = 24 * 3600 * 10**9

_P = ParamSpec("_P")
_R = TypeVar("_R")


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


@dataclass(slots=True)
class OpenDirectory:
    """A directory being listed: a snapshot taken at opendir and at each rewind."""

    inode: Inode
    listing: list[tuple[bytes, Inode]]


class VolfsOperations(pyfuse3.Operations):
    """pyfuse3 handlers for one mount."""

    enable_writeback_cache = False  # write-through keeps ENOSPC visible to the writer

    def __init__(self, namespace: Namespace) -> None:
        """Serve ``namespace``."""
        super().__init__()
        self.namespace = namespace
        self._files: dict[int, OpenFile] = {}
        self._directories: dict[int, OpenDirectory] = {}
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

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(self.namespace.get(inode))

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
            self.namespace.truncate(node, attr.st_size)
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

    def _open(self, node: Inode, flags: int) -> pyfuse3.FileInfo:
        self.namespace.open(node, truncate=bool(flags & os.O_TRUNC))
        handle = self._handle()
        self._files[handle] = OpenFile(node, flags)
        # keep_cache: every change passes through this kernel, so its page cache stays valid
        # across opens; dropping it at each open would cost a re-read for nothing.
        return pyfuse3.FileInfo(fh=handle, keep_cache=True)

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return self._open(self.namespace.get(inode), flags)

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
        return self._open(node, flags), self._attributes(node)

    async def read(self, fh: int, off: int, size: int) -> Any:
        # The hot path: no decorator frame, and the reply is a view of the arena, not a copy.
        try:
            node = self._files[fh].inode
            assert node.contents is not None
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
            try:
                written = node.contents.write(off, buf)
            except OSError as error:
                if error.errno != errno.ENOSPC or not self.namespace.store.reclaim_pending:
                    raise
                # Memory just released is still being punched: wait for it, then retry.
                await self.namespace.store.wait_reclaimed()
                written = node.contents.write(off, buf)
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

    async def flush(self, fh: int) -> None:
        pass  # nothing is buffered: data is in the store once WRITE is answered

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    @fuse_errors
    async def release(self, fh: int) -> None:
        self.namespace.close(self._files.pop(fh).inode)

    # -- directories ------------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        listing = self.namespace.directory_listing(inode)
        handle = self._handle()
        self._directories[handle] = OpenDirectory(self.namespace.get(inode), listing)
        return handle

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        directory = self._directories[fh]
        if start_id == 0:
            directory.listing = self.namespace.directory_listing(directory.inode.ino)
        entries = directory.inode.entries
        assert entries is not None
        listing = directory.listing
        for index in range(start_id, len(listing)):
            name, node = listing[index]
            dot = name in (b".", b"..")
            # An entry removed since the snapshot is skipped, never revived.
            if not dot and entries.get(name) is not node:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attributes(node), index + 1):
                return
            if not dot:
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

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self.namespace.getxattr(self.namespace.get(inode), name)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return list(self.namespace.get(inode).xattrs)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.namespace.removexattr(self.namespace.get(inode), name)
