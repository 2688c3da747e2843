"""The FUSE session of a mount: mounting, serving, unmounting, and dropping cached pages.

The requests are :mod:`volfs.daemon.fs`' and :mod:`volfs.daemon.ioctls`'; the bridge
(:mod:`volfs.daemon.bridge`) adds the requests and notifications pyfuse3 lacks.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence

from volfs.daemon import bridge  # binds ahead of pyfuse3: see volfs.daemon.bridge

# isort: split
import pyfuse3
import trio

from volfs.core.namespace import RELATIME_INTERVAL_NS
from volfs.core.purge import Invalidation
from volfs.daemon.fs import VolfsOperations

log = logging.getLogger(__name__)

#: Threads reading requests: each serves reads and writes of ordinary pages on its own and
#: hands the rest to the event loop. Not one per CPU: on a small machine a thread is often
#: preempted by the very client it serves (or the kernel's flusher) while requests queue, and
#: the next request waits for it unless another thread is already waiting in its read.
#: libfuse's default is at most 10.
REQUEST_THREADS = 8


def invalidate(invalidations: Sequence[Invalidation]) -> int:
    """Drop purged byte ranges ``(ino, offset, length)`` from the kernel's page cache.

    Blocks while the kernel writes dirty pages back through the daemon: call it in a worker
    thread. What it writes back inside the ranges meanwhile was purged and is discarded by
    the bridge, not stored. A range the kernel refuses is logged.

    Returns:
        The bytes discarded so: memory the purge kept from being taken again.
    """
    discarded, failures = bridge.drop_purged_ranges(invalidations)
    for ino, code in failures:
        # Only an unmounted session refuses; its cache is gone with it.
        log.warning(
            "cannot drop inode %d's purged pages from the kernel cache: %s", ino, os.strerror(code)
        )
    return discarded


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
        #: A stop was asked for: :meth:`serve` returns at once, or as soon as it can.
        self.stopping = False

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.mounted:
            self.mounted = False
            reads, writes, handed, at_once = bridge.served()
            bridge.close()
            pyfuse3.close(unmount=True)
            log.debug(
                "served %d reads and %d writes in C; the request threads handed %d requests "
                "to Python; %d requests answered at once",
                reads,
                writes,
                handed,
                at_once,
            )

    def mount(self, operations: VolfsOperations, mountpoint: str, options: set[str]) -> None:
        """Mount ``operations`` on ``mountpoint``; returns once the kernel knows the mount.

        Raises:
            RuntimeError: libfuse could not mount (it has printed why), or the bridge is not
                active, so ioctls would not reach the daemon.
        """
        if "debug" not in options:
            # libfuse's trace of every request would miss those the threads serve.
            store = operations.namespace.store
            bridge.serve_pages(
                store.table,
                store.arena.view,
                arena_fd=store.arena.fd,
                mapped=store.arena.mapped,
                threads=REQUEST_THREADS,
                relatime_ns=RELATIME_INTERVAL_NS,
                # libfuse's own rule for allow_root, which requests it does not see must keep.
                deny_others="allow_root" in options,
            )
        try:
            pyfuse3.init(operations, mountpoint, options)
            if not bridge.active():
                pyfuse3.close(unmount=True)
                raise RuntimeError("the ioctl bridge did not take hold of the FUSE session")
        except BaseException:
            bridge.close()  # lets go of the store's memory
            raise
        bridge.set_handlers(
            ioctl=operations.ioctls.answer,
            fallocate=operations.fallocate,
            lseek=operations.lseek,
            failure=_log_unserved_request,
            kill_privileges=operations.kill_privileges,
            at_once=operations.answer_at_once,
        )
        self.mounted = True

    def stop(self) -> None:
        """Make :meth:`serve` return, at once or when it starts; call from the event loop.

        Safe before the mount, which :func:`terminate` is not (libfuse has no session yet).
        """
        self.stopping = True
        if self.mounted:
            terminate()

    async def serve(self) -> None:
        """Serve requests until the filesystem is unmounted or a stop is asked for."""
        if self.stopping:
            return
        try:
            await pyfuse3.main()
        except* ConnectionAbortedError:
            # The kernel ended the connection as aborted rather than unmounted: it does so
            # now and then on unmount with many inodes to forget, and on a fusectl abort.
            # Either way the filesystem is gone; what it held goes as on any unmount.
            log.warning("the kernel aborted the FUSE connection; serving ends")


#: The readahead (KiB) a mount's sequential reads get: 1 MiB requests instead of 128 KiB,
#: each a round trip. The kernel offers its default (128 KiB) at INIT and takes no more from
#: the daemon, so it is set on the mount's backing device once INIT is over.
READAHEAD_KB = 1024


async def raise_readahead(mountpoint: str) -> None:
    """Set the mount's readahead to :data:`READAHEAD_KB` (root only: sysfs is root's).

    A failure is logged and changes nothing else: reads work at any readahead.
    """
    if os.geteuid() != 0:
        return
    try:
        # Answered once INIT is over (a request waits for it), when the kernel has settled
        # the readahead it will otherwise keep.
        device = (await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)).st_dev
        path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
        with open(path, "w") as setting:
            setting.write(str(READAHEAD_KB))
    except OSError as error:
        log.warning("cannot set the mount's readahead to %d KiB: %s", READAHEAD_KB, error)


def terminate() -> None:
    """Make :meth:`Session.serve` return; call from the event loop's thread while it serves."""
    pyfuse3.terminate()
