"""The volfs ioctls (see ``volfs/include/volfs.h``): unpack the request, call the core, pack
the reply.

The bridge hands every ioctl to :meth:`Ioctls.answer` on the thread serving requests. A short
request is answered there and then; a long mark, one that must wait (for a truncation, or for
purged pages to leave the kernel's cache) and a purge go on in a task, other requests being
served meanwhile.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Generator

import trio

from volfs.abi import (
    PAGE_SHIFT,
    VOLFS_IOC_FILE_INFO,
    VOLFS_IOC_PURGE,
    VOLFS_IOC_SEGMENT_REGISTER,
    VOLFS_IOC_SEGMENT_RELEASE,
    VOLFS_IOC_SEGMENTS,
    VOLFS_IOC_STATS,
    VOLFS_IOC_VRANGE,
    VOLFS_IOC_VRANGE_NEXT,
    VOLFS_IOC_VRANGE_STATUS,
    VOLFS_PURGE,
    VOLFS_SEGMENT,
    VOLFS_SEGMENTS,
    VOLFS_SEGMENTS_EXISTING,
    VRANGE_ARGS,
    VRANGE_FULL,
    VRANGE_NEXT,
    VRANGE_NONVOLATILE,
    VRANGE_PARTIAL,
    VRANGE_STATUS,
    VRANGE_VOLATILE,
    FileInfo,
    saturated,
)
from volfs.core.inode import Inode
from volfs.core.namespace import Namespace
from volfs.core.purge import PurgeSource
from volfs.core.reclaim import Reclaimer
from volfs.core.stepping import Truncations, finish
from volfs.daemon import bridge
from volfs.daemon.handles import OpenFile, OpenFiles
from volfs.daemon.handover import TableHandover
from volfs.daemon.replies import answering

#: The ioctls about a file's volatility: answered once its purged pages left the kernel's cache.
_VOLATILITY_IOCTLS = (
    VOLFS_IOC_VRANGE,
    VOLFS_IOC_VRANGE_STATUS,
    VOLFS_IOC_VRANGE_NEXT,
    VOLFS_IOC_SEGMENT_RELEASE,
    VOLFS_IOC_FILE_INFO,
)


#: The ioctls answered without waiting (unless the file's purged pages are leaving the cache).
_ANSWERED_AT_ONCE = frozenset(
    (
        VOLFS_IOC_VRANGE_STATUS,
        VOLFS_IOC_VRANGE_NEXT,
        VOLFS_IOC_SEGMENTS,
        VOLFS_IOC_SEGMENT_REGISTER,
        VOLFS_IOC_SEGMENT_RELEASE,
        VOLFS_IOC_FILE_INFO,
    )
)


class Ioctls:
    """The ioctls of one mount."""

    def __init__(
        self,
        namespace: Namespace,
        reclaimer: Reclaimer,
        *,
        files: OpenFiles,
        truncations: Truncations,
        nursery: trio.Nursery,
        handover: TableHandover,
    ) -> None:
        """Answer ioctls on ``namespace``'s files, open as ``files`` records them; segment
        tables go to their users through ``handover``."""
        self._namespace = namespace
        self._handover = handover
        self._reclaimer = reclaimer
        self._files = files
        self._truncations = truncations
        self._nursery = nursery

    def answer(
        self, request: bridge.Request, ino: int, cmd: int, fh: int, is_dir: bool, data: bytes
    ) -> None:
        """Answer one ioctl; called by the bridge on the thread serving requests.

        The volatility ioctls (VRANGE, VRANGE_STATUS, VRANGE_NEXT, FILE_INFO) are answered at
        once, or once the file's truncation is over and its purged pages have left the kernel's
        cache; long marks and VOLFS_IOC_PURGE go on in a task. Errors answer the request with
        their errno, never escape.
        """
        with answering(request, "ioctl(ino=%d, cmd=%#x)", ino, cmd):
            if cmd in _VOLATILITY_IOCTLS and (
                self._reclaimer.is_dropping(ino) or ino in self._truncations
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
            elif cmd in _ANSWERED_AT_ONCE:
                request.reply_ioctl(0, self._answer_at_once(cmd, ino, fh, is_dir, data))
            elif cmd == VOLFS_IOC_STATS:
                request.reply_ioctl(0, self._namespace.statistics().pack())
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
        """VOLFS_IOC_VRANGE as steps (see :meth:`Volatility.vrange_steps`); returns the reply."""
        start, length, mode, flags, _marked, _purged, reserved = VRANGE_ARGS.unpack(data)
        node, open_file = self._open_file(ino, fh, is_dir)
        if reserved:
            raise OSError(errno.EINVAL, "reserved field must be zero")
        # As for fallocate: changing a file's data needs a descriptor open for writing.
        if mode in (VRANGE_VOLATILE, VRANGE_NONVOLATILE) and not open_file.writable:
            raise OSError(errno.EBADF, "descriptor not open for writing")
        marked, purged = yield from self._namespace.volatility.vrange_steps(
            node, start, length, mode, flags
        )
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
            await self._reclaimer.dropped(ino)
            request.reply_ioctl(0, reply)

    async def _volatility_later(
        self, request: bridge.Request, ino: int, cmd: int, fh: int, data: bytes
    ) -> None:
        """A volatility ioctl on an inode being truncated or whose purged pages are leaving
        the kernel's cache: answered only once both are over, so that a program told its
        range was purged cannot then read the old bytes from the cache.
        """
        with answering(request, "ioctl(ino=%d, cmd=%#x)", ino, cmd):
            # A truncation may start while a drop is awaited, and a purge while a truncation
            # is: answered only once neither is under way.
            while ino in self._truncations or self._reclaimer.is_dropping(ino):
                await self._truncations.wait(ino)
                await self._reclaimer.dropped(ino)
            if cmd == VOLFS_IOC_VRANGE:
                await self._vrange_in_steps(request, ino, self._vrange_steps(ino, fh, False, data))
            else:
                request.reply_ioctl(0, self._answer_at_once(cmd, ino, fh, False, data))

    def _answer_at_once(self, cmd: int, ino: int, fh: int, is_dir: bool, data: bytes) -> bytes:
        """The reply of one of :data:`_ANSWERED_AT_ONCE`."""
        if cmd == VOLFS_IOC_VRANGE_STATUS:
            return self._vrange_status(ino, data)
        if cmd == VOLFS_IOC_VRANGE_NEXT:
            return self._vrange_next(ino, data)
        if cmd == VOLFS_IOC_FILE_INFO:
            return self._file_info(ino)
        node, open_file = self._open_file(ino, fh, is_dir)
        if cmd == VOLFS_IOC_SEGMENTS:
            return self._segments(node, open_file, data)
        # Registering and releasing change the file's volatility: as for VRANGE.
        if not open_file.writable:
            raise OSError(errno.EBADF, "descriptor not open for writing")
        start, length, flags, index = VOLFS_SEGMENT.unpack(data)
        volatility = self._namespace.volatility
        if cmd == VOLFS_IOC_SEGMENT_REGISTER:
            index = volatility.register(node, start, length, flags).index
            return VOLFS_SEGMENT.pack(start, length, flags, index)
        segment = volatility.release(node, index)
        flags = VRANGE_PARTIAL if segment.partial else VRANGE_FULL
        return VOLFS_SEGMENT.pack(
            segment.first << PAGE_SHIFT, segment.pages << PAGE_SHIFT, flags, index
        )

    def _open_file(self, ino: int, fh: int, is_dir: bool) -> tuple[Inode, OpenFile]:
        """The inode and the open file an ioctl came through.

        Raises:
            OSError: EISDIR for a directory, EBADF for a handle that is not of this inode.
        """
        node = self._namespace.get(ino)
        if is_dir or node.is_dir():
            raise OSError(errno.EISDIR, "volatility belongs to regular files")
        open_file = self._files.get(fh)
        if open_file is None or open_file.inode is not node:
            raise OSError(errno.EBADF, "no such open file")
        return node, open_file

    def _segments(self, node: Inode, open_file: OpenFile, data: bytes) -> bytes:
        """VOLFS_IOC_SEGMENTS: the file's table (made if need be) and a token for it."""
        capacity, flags, _pid, _granted, _token, _socket = VOLFS_SEGMENTS.unpack(data)
        if flags & ~VOLFS_SEGMENTS_EXISTING:
            raise OSError(errno.EINVAL, "unknown flags")
        # A reader only looks: it never makes a table (whose memory the cap would carry).
        if (flags & VOLFS_SEGMENTS_EXISTING or not open_file.writable) and node.segments is None:
            raise OSError(errno.ENOENT, "the file has no segment table")
        table = self._namespace.volatility.segment_table(node, capacity)
        token = self._handover.grant(table, writable=open_file.writable)
        return VOLFS_SEGMENTS.pack(
            capacity, 0, os.getpid(), table.capacity, token, self._handover.name.encode()
        )

    def _vrange_status(self, ino: int, data: bytes) -> bytes:
        start, length, _volatile, _purged = VRANGE_STATUS.unpack(data)
        volatile, lost = self._namespace.volatility.status(self._namespace.get(ino), start, length)
        return VRANGE_STATUS.pack(start, length, volatile, lost)

    def _file_info(self, ino: int) -> bytes:
        """VOLFS_IOC_FILE_INFO: size, memory, volatility and openers of a regular file (EISDIR
        for a directory; the kernel answers other files' ioctls itself)."""
        node = self._namespace.get(ino)
        volatile, lost = self._namespace.volatility.status(node, 0, 0)
        return FileInfo(
            size=node.size,
            resident_bytes=node.blocks << 9,
            volatile_bytes=volatile,
            purged_bytes=lost,
            openers=node.opens,
            segments=0 if node.segments is None else len(node.segments),
        ).pack()

    def _vrange_next(self, ino: int, data: bytes) -> bytes:
        start, _range_start, _range_end, _flags, _purged = VRANGE_NEXT.unpack(data)
        found = self._namespace.volatility.next_range(self._namespace.get(ino), start)
        if found is None:
            return VRANGE_NEXT.pack(start, 0, 0, 0, 0)
        flags = VRANGE_PARTIAL if found.partial else VRANGE_FULL
        return VRANGE_NEXT.pack(
            start, found.start << PAGE_SHIFT, found.end << PAGE_SHIFT, flags, int(found.purged)
        )

    async def _purge(self, request: bridge.Request, wanted: int) -> None:
        with answering(request, "purge(%d)", wanted):
            result = await self._reclaimer.purge(wanted, PurgeSource.IOCTL, wait=True)
            request.reply_ioctl(0, VOLFS_PURGE.pack(wanted, saturated(result.freed_bytes)))
