"""Ceiling filesystem: the thinnest in-memory pyfuse3 filesystem.

Used by ``scripts/bench_io.py`` as the upper bound of what any pyfuse3 + trio daemon can reach
on a machine. It supports exactly what fio and a create/stat/unlink loop need: one flat root
directory of regular files, each file's contents held in one ``bytearray``. Reads return
``memoryview`` slices (no copy); writes copy into the ``bytearray``, growing it as needed.
There are no subdirectories, no size limit and no accounting.

Its FUSE settings are what a plain pyfuse3 filesystem gets: ``pyfuse3.default_options`` plus
``fsname=ceiling,subtype=ceiling``, no writeback cache, no direct I/O, ``keep_cache`` on every
open, 1 s entry/attribute timeouts and an ``st_blksize`` of 4096. volfs starts from the same
and saves requests beyond them (its bridge negotiates FUSE_HANDLE_KILLPRIV_V2, it caches names
and attributes for an hour, absent names included, and sends no FLUSH): the difference
between the two is what a daemon gains from those, on top of its own speed.

Extended attributes exist (as none at all: GETXATTR answers ENODATA, LISTXATTR an empty
list) because that changes the protocol: the kernel asks a filesystem that has xattrs for
``security.capability`` before every write(2), while one answering ENOSYS is never asked
again. ``--no-xattr`` drops them to measure what that costs.

Usage::

    python scripts/ceiling_fs.py MOUNTPOINT [--debug]

Runs in the foreground until ``fusermount3 -u MOUNTPOINT``, SIGTERM or SIGINT, unmounts and
exits 0.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import time
from collections.abc import Sequence

import pyfuse3
import trio

log = logging.getLogger("ceiling_fs")

TIMEOUT = 1.0
BLKSIZE = 4096
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class _Node:
    """One inode: the root directory or a regular file."""

    __slots__ = ("atime", "ctime", "data", "gid", "ino", "lookups", "mode", "mtime", "nlink", "uid")

    def __init__(self, ino: int, mode: int, uid: int, gid: int, nlink: int) -> None:
        now = time.time_ns()
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = nlink
        self.lookups = 0
        self.data = bytearray()
        self.atime = self.mtime = self.ctime = now


def _resize(node: _Node, length: int) -> bytearray:
    """Resize ``node.data`` to *length* bytes (zero-filled) and return it."""
    data = node.data
    try:
        if length < len(data):
            del data[length:]
        else:
            data.extend(bytes(length - len(data)))
    except BufferError:
        # A view handed out by read() is still alive; move the file to a fresh buffer.
        fresh = bytearray(length)
        keep = min(length, len(data))
        fresh[:keep] = data[:keep]
        node.data = data = fresh
    return data


class CeilingFS(pyfuse3.Operations):
    """Flat, unaccounted in-memory filesystem."""

    enable_writeback_cache = False

    def __init__(self, *, xattrs: bool = True) -> None:
        super().__init__()
        self.xattrs = xattrs
        self._root = _Node(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), 2)
        self._nodes: dict[int, _Node] = {self._root.ino: self._root}
        self._entries: dict[bytes, int] = {}
        self._next_ino = self._root.ino + 1

    # -- helpers -------------------------------------------------------------------------------

    def _node(self, inode: int) -> _Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    @staticmethod
    def _attr(node: _Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        size = len(node.data)
        attr.st_ino = node.ino
        attr.generation = 0
        attr.entry_timeout = TIMEOUT
        attr.attr_timeout = TIMEOUT
        attr.st_mode = node.mode
        attr.st_nlink = node.nlink
        attr.st_uid = node.uid
        attr.st_gid = node.gid
        attr.st_rdev = 0
        attr.st_size = size
        attr.st_blksize = BLKSIZE
        attr.st_blocks = (size + 511) // 512
        attr.st_atime_ns = node.atime
        attr.st_mtime_ns = node.mtime
        attr.st_ctime_ns = node.ctime
        return attr

    def _file_info(self, inode: int) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    def _drop_if_unused(self, node: _Node) -> None:
        if node.nlink == 0 and node.lookups <= 0:
            del self._nodes[node.ino]

    # -- entries -------------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != self._root.ino:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._attr(self._root)
        ino = self._entries.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self._nodes[ino]
        node.lookups += 1
        return self._attr(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, nlookup in inode_list:
            node = self._nodes.get(inode)
            if node is None or node is self._root:
                continue
            node.lookups -= nlookup
            self._drop_if_unused(node)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self._node(inode))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        now = time.time_ns()
        if fields.update_size:
            if not stat.S_ISREG(node.mode):
                raise pyfuse3.FUSEError(errno.EISDIR)
            _resize(node, attr.st_size)
            node.mtime = now
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime = attr.st_mtime_ns
        node.ctime = attr.st_ctime_ns if fields.update_ctime else now
        return self._attr(node)

    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if parent_inode != self._root.ino:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in self._entries:
            raise pyfuse3.FUSEError(errno.EEXIST)
        node = _Node(
            self._next_ino, stat.S_IFREG | (stat.S_IMODE(mode) & ~ctx.umask), ctx.uid, ctx.gid, 1
        )
        self._next_ino += 1
        node.lookups = 1
        self._nodes[node.ino] = node
        self._entries[name] = node.ino
        self._root.mtime = self._root.ctime = node.ctime
        return self._file_info(node.ino), self._attr(node)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if parent_inode != self._root.ino:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        ino = self._entries.pop(name, None)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self._nodes[ino]
        node.nlink = 0
        node.ctime = self._root.mtime = self._root.ctime = time.time_ns()
        self._drop_if_unused(node)

    # -- file I/O ------------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if not stat.S_ISREG(node.mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC and node.data:
            _resize(node, 0)
            node.mtime = node.ctime = time.time_ns()
        return self._file_info(inode)

    async def read(self, fh: int, off: int, size: int) -> memoryview:  # type: ignore[override]
        return memoryview(self._nodes[fh].data)[off : off + size]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self._nodes[fh]
        data = node.data
        end = off + len(buf)
        if end <= len(data):
            data[off:end] = buf
        else:
            if off > len(data):
                data = _resize(node, off)
            try:
                data[off:] = buf
            except BufferError:
                # A view handed out by read() is still alive; move to a fresh buffer.
                node.data = data = bytearray(data)
                data[off:] = buf
        node.mtime = node.ctime = time.time_ns()
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    # -- directory -----------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != self._root.ino:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Entries are kept in creation order, i.e. ascending inode number, so the inode number
        # is a stable resume cookie even if entries are added or removed between calls.
        for name, ino in self._entries.items():
            if ino <= start_id:
                continue
            node = self._nodes[ino]
            if not pyfuse3.readdir_reply(token, name, self._attr(node), ino):
                break
            node.lookups += 1

    async def releasedir(self, fh: int) -> None:
        pass

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return []

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = BLKSIZE
        st.f_frsize = BLKSIZE
        st.f_blocks = st.f_bfree = st.f_bavail = (1 << 40) // BLKSIZE
        st.f_files = st.f_ffree = st.f_favail = 1 << 32
        st.f_namemax = 255
        return st


async def _stop_on_signal(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        task_status.started()
        async for signum in signals:
            log.info("received %s, unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint", help="directory to mount on")
    parser.add_argument("--debug", action="store_true", help="log FUSE debug output")
    parser.add_argument(
        "--no-xattr", action="store_true", help="answer ENOSYS to xattr requests (see above)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s ceiling_fs %(levelname)s %(message)s",
    )

    options = set(pyfuse3.default_options)
    options.add("fsname=ceiling")
    options.add("subtype=ceiling")
    if args.debug:
        options.add("debug")

    # Hold SIGTERM/SIGINT until the trio signal receiver is in place, so a stop request that
    # arrives while mounting still ends in a clean unmount.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    pyfuse3.init(CeilingFS(xattrs=not args.no_xattr), args.mountpoint, options)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
