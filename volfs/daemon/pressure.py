"""Memory-pressure sources that make volfs purge: PSI triggers and a free-memory watermark.

- **PSI.** A trigger on the daemon's cgroup ``memory.pressure`` (or ``/proc/pressure/memory``)
  fires when tasks stall on memory for longer than a threshold within a window; the kernel
  signals it with POLLPRI. When systemd hands the service ``$MEMORY_PRESSURE_WATCH`` (and
  ``$MEMORY_PRESSURE_WRITE``, the base64 trigger to write), that is used instead; it may also
  be a FIFO or a socket, which signal by becoming readable.
- **Watermark.** ``MemAvailable`` below a threshold, sampled periodically.

On a signal the daemon purges a batch of volatile data and keeps purging, batch after batch,
while the watermark is still breached. The sources only say *when*; :mod:`volfs.core.purge` decides
*what*.
"""

from __future__ import annotations

import base64
import logging
import os
import select
import socket
import stat
from collections.abc import Awaitable, Callable

import trio

from volfs.core.worker import WorkerThread
from volfs.daemon.meminfo import meminfo
from volfs.daemon.options import PressureSettings

log = logging.getLogger(__name__)


def cgroup_pressure_path() -> str | None:
    """The ``memory.pressure`` file of this process's cgroup (v2), if there is one."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as cgroup:
            for line in cgroup:
                if line.startswith("0::"):
                    path = f"/sys/fs/cgroup{line[3:].strip()}/memory.pressure"
                    return path if os.path.exists(path) else None
    except OSError:
        pass
    return None


#: How long the PSI poller blocks at a time (ms): bounds how long closing it waits.
_PSI_POLL_MS = 200


class SourceGoneError(Exception):
    """The pressure source can signal no more: its socket was closed, its trigger is gone."""


class PressureSource:
    """An open pressure notification: a PSI trigger, a FIFO or a socket."""

    def __init__(self, path: str, trigger: bytes | None) -> None:
        """Open ``path`` and arm it with ``trigger`` (written as is), if any.

        Raises:
            OSError: the path cannot be opened or the trigger is refused.
        """
        self.path = path
        self._socket: socket.socket | None = None
        self._poller: WorkerThread | None = None
        mode = os.stat(path).st_mode
        if stat.S_ISSOCK(mode):
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._socket.connect(path)
            self._socket.setblocking(False)
            self.fd = self._socket.fileno()
            if trigger:
                self._socket.send(trigger)
        elif stat.S_ISFIFO(mode):
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        else:
            self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            if trigger:
                os.write(self.fd, trigger)
            # A PSI trigger signals with POLLPRI, which trio cannot wait for, and the kernel
            # clears its event as any poll reports it: a second poller (trio re-arming a
            # nested epoll set, say) would swallow events. One thread of our own is the only
            # poller, started now since a thread may not start once memory is short.
            self._poller = WorkerThread("volfs-pressure").__enter__()

    async def wait(self) -> None:
        """Wait for the next pressure event.

        Raises:
            SourceGoneError: the source can signal no more.
        """
        if self._poller is not None:
            while not await self._poller.run(self._poll_psi):
                # The poller's calls are shielded: cancellation gets in only here.
                await trio.lowlevel.checkpoint()
            return
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                data = self._socket.recv(4096) if self._socket else os.read(self.fd, 4096)
            except (BlockingIOError, InterruptedError):
                continue
            if data:
                return
            if self._socket is not None:
                raise SourceGoneError("the socket was closed")
            # A FIFO whose writers all left: wait for the next one without spinning.
            await trio.sleep(0.1)

    def _poll_psi(self) -> bool:
        """Block up to _PSI_POLL_MS for the trigger; True if it fired. Runs in the poller."""
        poller = select.poll()
        poller.register(self.fd, select.POLLPRI)
        events = poller.poll(_PSI_POLL_MS)
        if any(event & (select.POLLERR | select.POLLNVAL) for _fd, event in events):
            raise SourceGoneError("no trigger armed")
        return bool(events)

    def close(self) -> None:
        """Disarm and close."""
        if self._poller is not None:
            self._poller.__exit__(None, None, None)
        if self._socket is not None:
            self._socket.close()
        else:
            os.close(self.fd)


def open_pressure_source(settings: PressureSettings) -> PressureSource | None:
    """Open the best PSI source available: systemd's, the cgroup's, then the system's.

    Returns None (and logs why) when none can be armed, e.g. without PSI in the kernel.
    """
    watch = os.environ.get("MEMORY_PRESSURE_WATCH")
    if watch == "/dev/null":
        return None  # systemd's way of saying: do not watch
    # The kernel overwrites the last byte written with a NUL: end with a newline.
    trigger = f"some {settings.stall_us} {settings.window_us}\n".encode()
    candidates: list[tuple[str, bytes | None]] = []
    if watch:
        written = os.environ.get("MEMORY_PRESSURE_WRITE")
        if written:
            candidates.append((watch, base64.b64decode(written)))
        else:
            # Nothing to write: a socket or FIFO needs nothing, a PSI file our own trigger.
            candidates.append((watch, None if _is_stream(watch) else trigger))
    cgroup = cgroup_pressure_path()
    if cgroup:
        candidates.append((cgroup, trigger))
    candidates.append(("/proc/pressure/memory", trigger))
    for path, write in candidates:
        try:
            source = PressureSource(path, write)
        except OSError as error:
            log.info("memory pressure: cannot watch %s: %s", path, error.strerror)
            continue
        log.info("memory pressure: watching %s", path)
        return source
    log.warning("memory pressure: no PSI source can be watched; only the watermark is used")
    return None


def _is_stream(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False  # opening it will fail and say why
    return stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode)


async def watch_pressure(
    settings: PressureSettings,
    purge_batch: Callable[[int], Awaitable[int]],
    *,
    source: PressureSource | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Purge when pressure is signalled or the watermark is breached, until cancelled.

    Args:
        settings: thresholds.
        purge_batch: purges up to the given bytes of volatile data and returns what it freed.
        source: an already opened source (tests); by default :func:`open_pressure_source`.
    """
    if not settings.enabled:
        task_status.started()
        return
    if source is None:
        source = open_pressure_source(settings)
    try:
        async with trio.open_nursery() as nursery:
            if source is not None:
                nursery.start_soon(_on_events, source, settings, purge_batch)
            if settings.watermark:
                nursery.start_soon(_on_watermark, settings, purge_batch)
            task_status.started()
    finally:
        if source is not None:
            source.close()


async def _on_events(
    source: PressureSource,
    settings: PressureSettings,
    purge_batch: Callable[[int], Awaitable[int]],
) -> None:
    while True:
        try:
            await source.wait()
        except SourceGoneError as gone:
            log.warning(
                "memory pressure: %s can signal no more (%s); watching stops", source.path, gone
            )
            return
        await purge_batch(settings.batch)
        await _purge_while_low(settings, purge_batch)


async def _on_watermark(
    settings: PressureSettings, purge_batch: Callable[[int], Awaitable[int]]
) -> None:
    while True:
        await trio.sleep(settings.interval)
        await _purge_while_low(settings, purge_batch)


async def _purge_while_low(
    settings: PressureSettings, purge_batch: Callable[[int], Awaitable[int]]
) -> None:
    while settings.watermark and meminfo("MemAvailable") < settings.watermark:
        if not await purge_batch(settings.batch):
            return  # nothing volatile left to give
