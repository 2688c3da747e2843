"""The ``volfs`` command: parse options, mount, serve until unmounted, clean up.

Two calling conventions are accepted::

    volfs [-f|-d] [-o OPTIONS] MOUNTPOINT          # by hand, by systemd, by tests
    volfs SOURCE MOUNTPOINT [-o OPTIONS]           # by mount.fuse3 (mount -t fuse.volfs, fstab)

Without ``-f`` the command returns once the mount is ready and a background process serves it;
with ``-f`` it serves in the foreground. SIGTERM, SIGINT and SIGHUP unmount cleanly and exit 0.
Under systemd (``Type=notify``, ``$NOTIFY_SOCKET``) it reports ``READY=1`` once mounted
and ``STOPPING=1`` as it starts to unmount.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import gc
import logging
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import trio

from volfs import __version__
from volfs.core.namespace import Namespace
from volfs.core.ranges import RecordLimits
from volfs.core.reclaim import Reclaimer
from volfs.core.stepping import Backlog
from volfs.core.store import Store
from volfs.core.worker import WorkerThread
from volfs.daemon import bridge, fs
from volfs.daemon.handover import TableHandover
from volfs.daemon.logs import configure_logging
from volfs.daemon.options import (
    MAX_SIZE,
    MountOptions,
    OptionError,
    options_help,
    parse_mount_options,
)
from volfs.daemon.pressure import watch_pressure
from volfs.daemon.session import Session, invalidate, raise_readahead

log = logging.getLogger(__name__)

EXIT_FAILURE = 1
EXIT_USAGE = 2
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}

#: Seconds between two full garbage collections (see :func:`_schedule_garbage_collection`).
FULL_COLLECTION_INTERVAL = 600.0


class MountError(Exception):
    """The filesystem could not be mounted; the message says why."""


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser; its help lists every mount option."""
    parser = argparse.ArgumentParser(
        prog="volfs",
        usage="%(prog)s [-h] [-V] [-f] [-d] [-o OPTIONS] [SOURCE] MOUNTPOINT",
        description="Mount a volfs: a tmpfs-like filesystem in memory with volatile ranges.",
        epilog=f"{options_help()}\n\nUnmount with umount MOUNTPOINT or fusermount3 -u MOUNTPOINT.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source",
        nargs="?",
        default="volfs",
        metavar="SOURCE",
        help="name shown as the filesystem's source (given by mount.fuse3)",
    )
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="comma-separated mount options (listed below); may be repeated",
    )
    parser.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="serve in the foreground, logging to stderr, instead of returning once mounted",
    )
    parser.add_argument(
        "-d",
        "--debug",
        action="store_true",
        help="-f with log_level=debug, and libfuse prints every request (all served by Python)",
    )
    parser.add_argument("-V", "--version", action="version", version=f"volfs {__version__}")
    return parser


def check_mountpoint(path: str) -> None:
    """Fail early, with a readable reason, where the kernel would fail obscurely.

    A mountpoint left behind by a daemon that died (ENOTCONN) is detached first, so that
    starting volfs again is all it takes to recover.
    """
    try:
        # statfs always reaches the filesystem, where stat may be answered from a cache.
        os.statvfs(path)
        info = os.stat(path)
    except OSError as error:
        if error.errno != errno.ENOTCONN:
            raise MountError(f"mountpoint {path}: {error.strerror}") from None
        log.warning("%s: the filesystem's daemon is gone; detaching the dead mount", path)
        detach_dead_mount(path)
        try:
            info = os.stat(path)
        except OSError as again:
            raise MountError(f"mountpoint {path}: {again.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise MountError(f"mountpoint {path}: not a directory")


def detach_dead_mount(path: str) -> None:
    """Lazily unmount a FUSE mount whose daemon has died."""
    for command in (["fusermount3", "-u", "-z", path], ["umount", "-l", path]):
        try:
            if subprocess.run(command, capture_output=True, check=False).returncode == 0:
                return
        except FileNotFoundError:
            continue
    raise MountError(f"mountpoint {path}: a dead mount is in the way and cannot be detached")


async def run_mount(
    options: MountOptions,
    mountpoint: str,
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    """The whole life of one mount: set up, mount, call ``on_ready``, serve, take down.

    Returns once the filesystem is unmounted (from outside, or by a stop signal).

    Raises:
        MountError: the store cannot be allocated or the filesystem cannot be mounted (within
            an exception group if raised once tasks run).
    """
    async with contextlib.AsyncExitStack() as stack:
        try:
            store = stack.enter_context(Store(options.size or MAX_SIZE))
        except OSError as error:
            raise MountError(f"cannot allocate the store: {error.strerror}") from None
        session = stack.enter_context(Session())
        cache_dropper = stack.enter_context(WorkerThread("volfs-cache-drop"))
        nursery = await stack.enter_async_context(trio.open_nursery())
        # Left in this order: the tasks end, then the thread, then the session is unmounted.
        stack.callback(nursery.cancel_scope.cancel)
        namespace = Namespace(
            store,
            limits=RecordLimits(per_inode=options.max_file_ranges, per_mount=options.max_ranges),
            max_inodes=options.nr_inodes,
            root_mode=options.mode,
            root_uid=options.uid,
            root_gid=options.gid,
            purged_reads_zero=options.purged_reads_zero,
        )
        reclaimer = Reclaimer(
            namespace.purger,
            store,
            invalidate=invalidate,
            nursery=nursery,
            cache_dropper=cache_dropper,
            statistics=namespace.statistics,
            settled=bridge.end_exemption,
        )
        discards = Backlog(namespace.discard_ended)
        await nursery.start(_stop_on_signals, session, reclaimer, name="signals")
        nursery.start_soon(_collect_garbage, name="garbage")
        await nursery.start(store.run_reclaimer, name="reclaimer")
        await nursery.start(discards.run, name="discard")
        await nursery.start(
            functools.partial(watch_pressure, options.pressure, reclaimer.relieve_pressure),
            name="pressure",
        )
        handover = TableHandover()
        await nursery.start(handover.serve, name="segment tables")
        # Whatever ends the mount, the users of segment tables learn it (ESTALE).
        stack.callback(namespace.volatility.end_all_segments)
        operations = fs.VolfsOperations(
            namespace, reclaimer, nursery=nursery, discards=discards, handover=handover
        )
        try:
            session.mount(operations, mountpoint, set(options.fuse_options))
        except RuntimeError as error:
            raise MountError(f"cannot mount on {mountpoint}: {error}") from None
        nursery.start_soon(raise_readahead, mountpoint, name="readahead")
        log.info("mounted on %s (size cap %d bytes)", mountpoint, store.capacity_bytes)
        on_ready()
        try:
            await session.serve()
        finally:
            # Reached on a stop signal, an unmount from outside and a failure alike.
            notify_service_manager("STOPPING=1")


def _schedule_garbage_collection() -> None:
    """Keep CPython's full collections off the request path.

    A full collection walks every object the daemon holds: tens of milliseconds with 10^5
    volatile ranges, during which no request is served, and CPython starts one whenever
    enough new objects survived, which a client making ranges causes at will. What exists at
    mount lives as long as the daemon and is never walked again; young objects are still
    collected as usual (cheap), and full collections come from :func:`_collect_garbage`.
    """
    gc.freeze()
    young, middle, _full = gc.get_threshold()
    gc.set_threshold(young, middle, 1 << 30)


async def _collect_garbage() -> None:
    """Collect reference cycles among long-lived objects now and then, between requests."""
    while True:
        await trio.sleep(FULL_COLLECTION_INTERVAL)
        gc.collect()


async def _stop_on_signals(
    session: Session,
    reclaimer: Reclaimer,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        task_status.started()
        async for signum in signals:
            log.info("%s received: unmounting", signal.Signals(signum).name)
            # Serving goes on until the cache drops under way are over: they may need it.
            await reclaimer.close()
            session.stop()
            return


def _daemonize() -> int | None:
    """Fork; the parent waits for the child's word and returns the exit status to use.

    Returns:
        None in the child (which goes on to mount), an exit status in the parent.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message == "ready":
            return 0
        _, status = os.waitpid(pid, 0)
        if message:
            print(message, file=sys.stderr)
        return os.waitstatus_to_exitcode(status) or EXIT_FAILURE
    os.close(read_end)
    os.setsid()
    os.environ["VOLFS_READY_FD"] = str(write_end)
    return None


def _report_ready(message: str = "ready") -> None:
    """Tell a waiting parent that the mount is ready (or why it failed), then detach stdio."""
    fd = os.environ.pop("VOLFS_READY_FD", None)
    if fd is None:
        return
    os.write(int(fd), message.encode())
    os.close(int(fd))
    if message == "ready":
        null = os.open(os.devnull, os.O_RDWR)
        for stream in (0, 1, 2):
            os.dup2(null, stream)
        os.close(null)


def notify_service_manager(*fields: str) -> None:
    """Tell systemd (or another service manager) about the daemon's state, as sd_notify does.

    Does nothing unless ``$NOTIFY_SOCKET`` names an AF_UNIX datagram socket (``@`` for an
    abstract one). A failure is logged, never fatal: the mount works whoever listens.

    Args:
        fields: ``KEY=VALUE`` lines, e.g. ``READY=1``.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        log.warning("NOTIFY_SOCKET=%s: not an AF_UNIX socket; not notifying", address)
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), target)
    except OSError as error:
        log.warning("cannot notify the service manager at %s: %s", address, error.strerror)


def _fail(message: str, status: int) -> NoReturn:
    if "VOLFS_READY_FD" in os.environ:
        _report_ready(f"volfs: {message}")
    else:
        print(f"volfs: {message}", file=sys.stderr)
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``volfs`` command."""
    arguments = build_parser().parse_args(argv)
    if arguments.debug:
        arguments.foreground = True
        arguments.options.append("debug,log_level=debug")
    try:
        options = parse_mount_options(arguments.options, source=arguments.source)
        check_mountpoint(arguments.mountpoint)
    except OptionError as error:
        print(f"volfs: {error}", file=sys.stderr)
        return EXIT_USAGE
    except MountError as error:
        print(f"volfs: {error}", file=sys.stderr)
        return EXIT_FAILURE

    if not arguments.foreground:
        status = _daemonize()
        if status is not None:
            return status
    mountpoint = os.path.abspath(arguments.mountpoint)
    configure_logging(options.log_level, foreground=arguments.foreground, mountpoint=mountpoint)
    # Held until the signal task listens, so that a stop request arriving while mounting still
    # ends in a clean unmount rather than a dead daemon and a stale mountpoint.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    # What the signal task leaves behind once the first stop request took it away: another
    # one while unmounting must not kill the daemon half way (a dead mount). Not SIG_IGN,
    # which would discard a request made before the task listens instead of holding it.
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stopping_already)
    _raise_descriptor_limit()
    failure = ""
    try:
        trio.run(
            run_mount,
            options,
            mountpoint,
            functools.partial(_announce_ready, mountpoint),
        )
    except* MountError as errors:
        failure = str(errors.exceptions[0])
    except* Exception:
        log.exception("the FUSE loop failed")
        failure = "the FUSE loop failed"
    if failure:
        _fail(failure, EXIT_FAILURE)
    log.info("unmounted %s", mountpoint)
    return 0


def _raise_descriptor_limit() -> None:
    """Take the hard RLIMIT_NOFILE as the soft one, as servers polling with epoll do: each
    segment table holds a descriptor, and the soft limit bounds how many the daemon may
    hold (:func:`volfs.core.segments.tables_allowed`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if hard == resource.RLIM_INFINITY:
        with open("/proc/sys/fs/nr_open") as nr_open:  # what the kernel allows instead
            wanted = int(nr_open.read())
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (OSError, ValueError) as error:
        log.warning("cannot raise the descriptor limit from %d: %s", soft, error)


def _stopping_already(signum: int, _frame: object) -> None:
    log.info("%s received while unmounting: unmounting goes on", signal.Signals(signum).name)


def _announce_ready(mountpoint: str) -> None:
    """The mount is ready: tell whoever waits for it, and start collecting as a daemon does."""
    _report_ready()
    notify_service_manager("READY=1", f"STATUS=serving {mountpoint}")
    _schedule_garbage_collection()
