"""Message throughput between two processes: the volfs ring against its ceiling and pipes.

For each message size (64 B, 4 KiB and 1 MiB by default) one process sends the same message
over and over for ``--seconds`` and then closes; a second process receives until the end of the
stream. The receiver's clock runs from the moment both are ready until the last message is in,
so messages/s and MiB/s count only what arrived. Transports:

  volfs ring          volfs.ring on a volfs file, pinning and unpinning its segments
                      (volatile=True)
  volfs, no segments  the same ring on volfs with volatile=False: what FUSE alone costs
  tmpfs ring          the same ring on a kernel tmpfs file, volatile=False: the ceiling
  mp.Pipe             multiprocessing.Pipe(duplex=False), send_bytes/recv_bytes
  os.pipe             os.pipe, one write(2) per message with an 8-byte length prefix, buffered
                      reads (the default 64 KiB pipe)

The "pins" column counts the segments the median volfs ring run pinned (producer) and
unpinned (consumer). Runs go round robin over the transports, so load from elsewhere on the
machine hits each alike; the table shows each case's median run.

Then the memory an idle ring keeps: one process streams ``--idle-laps`` times the capacity
through a volfs ring in messages of 4000 bytes, receiving each at once, and stops (its last
record ends inside a segment, as a stream's would); the ring file's pages are written back to
the daemon (fsync) and then purged (VOLFS_IOC_PURGE). The report shows what the ring file
holds (its blocks) and the mount's used bytes before and after, and how much the daemon's memory
dropped.

Both ring endpoints open the file by path in processes of their own (forked before either
touches the ring). The script mounts a volfs (``<python> -m volfs -f -o size=... MOUNTPOINT``,
ready once it shows as fuse.volfs in /proc/self/mounts, unmounted with ``fusermount3 -u``) and,
as root, a tmpfs (``mount -t tmpfs``; otherwise it uses /dev/shm, also a kernel tmpfs).

Targets (from the issues): for 1 MiB messages the volfs ring moves at least 0.5x the bytes of
the tmpfs ring, and more than os.pipe; after the purge the idle ring file holds at most the
header page and one segment.

``--quick`` is a smoke run of a few seconds (0.05 s per run, one run per case, a 2 MiB ring):
it shows that every transport works, but its figures are too rough to judge the targets, so
they are printed and do not set the exit status.

Exit status: 0 if every target is met (or ``--quick``), 1 if one is not or a run failed.

Usage:
  sudo python scripts/bench_ring.py
  sudo python scripts/bench_ring.py --sizes 64,1M --seconds 1 --json
  python scripts/bench_ring.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import platform
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import volfs_mounts

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from volfs.abi import PAGE_SIZE  # noqa: E402
from volfs.client import purge, statistics  # noqa: E402
from volfs.ring import (  # noqa: E402
    Consumer,
    Producer,
    RingClosedError,
    create_ring,
    default_segment_size,
)
from volfs.sizes import size_argument, sizes_argument  # noqa: E402

MiB = 1 << 20
TARGET_VS_TMPFS = 0.5
TARGET_SIZE = MiB
#: The sender looks at the clock once per this many messages.
CLOCK_EVERY = 64
#: Every this many messages the receiver compares the bytes, not just the length.
VERIFY_EVERY = 1024
#: Payload bytes of each message of the idle-memory run.
IDLE_MESSAGE = 4000
#: How long the idle-memory run waits for the daemon's memory to fall after the purge.
MEMORY_SETTLE_SECONDS = 5.0

LENGTH = struct.Struct("=Q")

TRANSPORTS = ("volfs ring", "volfs, no segments", "tmpfs ring", "mp.Pipe", "os.pipe")

#: Defaults of a full run and of ``--quick``: seconds per run, runs per case, ring capacity,
#: laps of the idle-memory run.
FULL = {"seconds": 2.0, "repeat": 3, "capacity": 16 * MiB, "idle_laps": 4}
QUICK = {"seconds": 0.05, "repeat": 1, "capacity": 2 * MiB, "idle_laps": 2}


class BenchError(RuntimeError):
    """Mounting or a measurement failed; the message says why."""


def human(size: int) -> str:
    for unit, factor in (("MiB", MiB), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


# -- mounts ------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs_mount(workdir: Path, size: str) -> Iterator[Path]:
    """Mount a kernel tmpfs (root), else use a directory in /dev/shm (also tmpfs)."""
    if os.geteuid() != 0:
        if volfs_mounts.mount_type(Path("/dev/shm")) != "tmpfs":
            raise BenchError("not root, and /dev/shm is no tmpfs: no kernel tmpfs to compare")
        directory = Path(tempfile.mkdtemp(prefix="bench_ring-", dir="/dev/shm"))
        try:
            yield directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    mountpoint = workdir / "tmpfs"
    mountpoint.mkdir()
    with volfs_mounts.tmpfs(mountpoint, size):
        yield mountpoint


# -- the two processes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the receiver saw."""

    messages: int
    payload_bytes: int
    seconds: float


Send = Callable[[bytes], None]
Receive = Callable[[], "bytes | None"]


def send_for(send: Send, payload: bytes, seconds: float) -> int:
    """Send ``payload`` repeatedly for ``seconds``; return how many were sent."""
    deadline = time.monotonic() + seconds
    sent = 0
    while True:
        for _ in range(CLOCK_EVERY):
            send(payload)
        sent += CLOCK_EVERY
        if time.monotonic() >= deadline:
            return sent


def receive_all(receive: Receive, payload: bytes) -> tuple[int, int]:
    """Receive until the end of the stream (None); return messages and bytes, checking them."""
    messages = total = 0
    size = len(payload)
    while (message := receive()) is not None:
        if len(message) != size or (messages % VERIFY_EVERY == 0 and message != payload):
            raise BenchError(f"message {messages} arrived damaged ({len(message)} bytes)")
        messages += 1
        total += size
    return messages, total


def ring_sender(
    path: str, volatile: bool, payload: bytes, seconds: float, ready: Any, report: Connection
) -> None:
    with Producer(path, volatile=volatile) as ring:
        ready.wait()
        report.send(send_for(ring.send, payload, seconds))
        report.send(asdict(ring.statistics()))


def ring_receiver(
    path: str, volatile: bool, payload: bytes, ready: Any, report: Connection
) -> None:
    with Consumer(path, volatile=volatile) as ring:

        def receive() -> bytes | None:
            try:
                return ring.receive()
            except RingClosedError:
                return None

        ready.wait()
        started = time.perf_counter()
        messages, total = receive_all(receive, payload)
        report.send(Outcome(messages, total, time.perf_counter() - started))
        report.send(asdict(ring.statistics()))


def mp_pipe_sender(
    end: Connection,
    other: Connection,
    payload: bytes,
    seconds: float,
    ready: Any,
    report: Connection,
) -> None:
    other.close()  # the forked copy of the receiving end
    ready.wait()
    report.send(send_for(end.send_bytes, payload, seconds))
    end.close()


def mp_pipe_receiver(
    end: Connection, other: Connection, payload: bytes, ready: Any, report: Connection
) -> None:
    other.close()  # the forked copy of the sending end, or EOF never comes

    def receive() -> bytes | None:
        try:
            return end.recv_bytes()
        except EOFError:
            return None

    ready.wait()
    started = time.perf_counter()
    messages, total = receive_all(receive, payload)
    report.send(Outcome(messages, total, time.perf_counter() - started))


def os_pipe_sender(
    fd: int, other: int, payload: bytes, seconds: float, ready: Any, report: Connection
) -> None:
    os.close(other)
    frame = memoryview(LENGTH.pack(len(payload)) + payload)  # one write(2) per message

    def send(_payload: bytes) -> None:
        rest = frame
        while rest:  # a signal may cut a large pipe write short: finish it
            rest = rest[os.write(fd, rest) :]

    ready.wait()
    report.send(send_for(send, payload, seconds))
    os.close(fd)


def os_pipe_receiver(fd: int, other: int, payload: bytes, ready: Any, report: Connection) -> None:
    os.close(other)  # the forked copy of the write end, or EOF never comes
    stream = io.BufferedReader(io.FileIO(fd, "rb"), buffer_size=1 << 16)

    def receive() -> bytes | None:
        header = stream.read(LENGTH.size)
        if len(header) < LENGTH.size:
            return None
        (size,) = LENGTH.unpack(header)
        return stream.read(size)

    ready.wait()
    started = time.perf_counter()
    messages, total = receive_all(receive, payload)
    report.send(Outcome(messages, total, time.perf_counter() - started))


# -- one measurement ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    transport: str
    size: int
    messages: int
    seconds: float
    sender: dict[str, int] | None
    receiver: dict[str, int] | None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def mib_per_s(self) -> float:
        return self.messages * self.size / self.seconds / MiB


def optional(report: Connection, timeout: float = 10) -> Any:
    """The next report, or None if the process sent no more (the pipes send no statistics,
    a process that failed sends nothing)."""
    try:
        return report.recv() if report.poll(timeout) else None
    except EOFError:
        return None


def run_pair(
    transport: str,
    size: int,
    seconds: float,
    sender: Callable[..., None],
    sender_args: tuple[Any, ...],
    receiver: Callable[..., None],
    receiver_args: tuple[Any, ...],
    close_in_parent: Sequence[Any] = (),
) -> Result:
    """Run one sender and one receiver process; return what the receiver measured."""
    context = multiprocessing.get_context("fork")
    payload = os.urandom(size)
    ready = context.Barrier(2)
    send_report, send_result = context.Pipe(duplex=False)
    receive_report, receive_result = context.Pipe(duplex=False)
    processes = [
        context.Process(
            target=sender, args=(*sender_args, payload, seconds, ready, send_result), daemon=True
        ),
        context.Process(
            target=receiver, args=(*receiver_args, payload, ready, receive_result), daemon=True
        ),
    ]
    for process in processes:
        process.start()
    for item in close_in_parent:  # the children have their copies
        if isinstance(item, Connection):
            item.close()
        else:
            os.close(item)
    send_result.close()
    receive_result.close()
    try:
        outcome: Outcome | None = optional(receive_report, seconds + 120)
        if outcome is None:
            raise BenchError(f"{transport}, {human(size)}: the receiver reported nothing")
        receiver_stats = optional(receive_report)
        sent: int = send_report.recv() if send_report.poll(10) else -1
        sender_stats = optional(send_report)
        if sent != outcome.messages:
            raise BenchError(
                f"{transport}, {human(size)}: sent {sent} messages, received {outcome.messages}"
            )
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if failed:
        raise BenchError(f"{transport}, {human(size)}: a process exited with {failed}")
    return Result(transport, size, outcome.messages, outcome.seconds, sender_stats, receiver_stats)


def measure(
    transport: str, size: int, seconds: float, directory: Path | None, settings: Settings
) -> Result:
    if transport in ("mp.Pipe", "os.pipe"):
        if transport == "mp.Pipe":
            read_end, write_end = multiprocessing.get_context("fork").Pipe(duplex=False)
            return run_pair(
                transport,
                size,
                seconds,
                mp_pipe_sender,
                (write_end, read_end),
                mp_pipe_receiver,
                (read_end, write_end),
                (read_end, write_end),
            )
        read_fd, write_fd = os.pipe()
        return run_pair(
            transport,
            size,
            seconds,
            os_pipe_sender,
            (write_fd, read_fd),
            os_pipe_receiver,
            (read_fd, write_fd),
            (read_fd, write_fd),
        )
    assert directory is not None
    path = directory / f"ring-{size}"
    volatile = transport == "volfs ring"
    create_ring(path, settings.capacity, segment_size=settings.segment)
    try:
        return run_pair(
            transport,
            size,
            seconds,
            ring_sender,
            (str(path), volatile),
            ring_receiver,
            (str(path), volatile),
        )
    finally:
        path.unlink()


# -- the memory an idle ring keeps --------------------------------------------------------------


@dataclass(frozen=True)
class IdleMemory:
    """An idle volfs ring whose consumer caught up, before and after a purge."""

    capacity: int
    segment: int
    #: Bytes of records streamed through the ring before it went idle.
    streamed: int
    #: Bytes the ring file held (its blocks), written back to the daemon, before the purge.
    file_before: int
    file_after: int
    #: The mount's used bytes (the ring file, its segment table and records).
    used_before: int
    used_after: int
    #: What VOLFS_IOC_PURGE reported freed.
    purged: int
    #: How much the daemon's resident memory fell over the purge.
    memory_drop: int

    @property
    def met(self) -> bool:
        """The idle ring keeps at most its header page and one segment."""
        return self.file_after <= PAGE_SIZE + self.segment


def file_bytes(path: Path) -> int:
    """The bytes a file really holds (``du``)."""
    return path.stat().st_blocks * 512


def idle_memory(mount: volfs_mounts.Mount, settings: Settings) -> IdleMemory:
    """Stream ``idle_laps`` laps through a ring, go idle, write back and purge (see above)."""
    path = mount.path / "idle-ring"
    create_ring(path, settings.capacity, segment_size=settings.segment)
    try:
        with Consumer(path) as consumer, Producer(path) as producer:
            message = os.urandom(IDLE_MESSAGE)  # records end anywhere in a segment
            count = settings.idle_laps * settings.capacity // (IDLE_MESSAGE + LENGTH.size)
            for _ in range(count):
                producer.send(message)
                if consumer.receive(timeout=10) != message:
                    raise BenchError("idle ring: a message arrived damaged")
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # the pages the mappings dirtied reach the daemon
            finally:
                os.close(fd)
            file_before, used_before = file_bytes(path), statistics(mount.path)["used_bytes"]
            memory_before = mount.memory_bytes()
            purged = purge(mount.path)
            # The daemon gives the memory back in a worker thread: let it.
            deadline = time.monotonic() + MEMORY_SETTLE_SECONDS
            while (
                memory_before - mount.memory_bytes() < purged * 0.9 and time.monotonic() < deadline
            ):
                time.sleep(0.01)
            return IdleMemory(
                capacity=settings.capacity,
                segment=producer.segment_size,
                streamed=count * (IDLE_MESSAGE + LENGTH.size),
                file_before=file_before,
                file_after=file_bytes(path),
                used_before=used_before,
                used_after=statistics(mount.path)["used_bytes"],
                purged=purged,
                memory_drop=memory_before - mount.memory_bytes(),
            )
    finally:
        path.unlink()


def describe_idle(idle: IdleMemory) -> str:
    def kib(value: int) -> str:
        return f"{value / 1024:,.0f} KiB"

    return (
        f"idle ring of {human(idle.capacity)} ({human(idle.segment)} segments) after "
        f"{human_bytes(idle.streamed)} streamed: the ring file held {kib(idle.file_before)}, "
        f"after the purge {kib(idle.file_after)}; the mount's used bytes "
        f"{kib(idle.used_before)} -> {kib(idle.used_after)} (the rest: the segment table "
        f"and its records); purge freed {kib(idle.purged)}, the daemon's memory fell by "
        f"{kib(idle.memory_drop)}"
    )


def human_bytes(value: int) -> str:
    return f"{value / MiB:,.1f} MiB"


# -- report ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    sizes: list[int]
    seconds: float
    repeat: int
    capacity: int
    segment: int | None
    volfs_size: str
    python: str
    #: Laps of the ring's capacity streamed before the idle-memory measurement.
    idle_laps: int
    #: A smoke run: the targets are shown but not judged.
    quick: bool = False


def median(results: Sequence[Result]) -> Result:
    """The median run by throughput."""
    ordered = sorted(results, key=lambda r: r.rate)
    return ordered[len(ordered) // 2]


def render(results: dict[tuple[str, int], Result], idle: IdleMemory, settings: Settings) -> str:
    header = ["size", "transport", "messages/s", "MiB/s", "vs tmpfs ring", "vs os.pipe", "pins"]
    rows = [header]
    for size in settings.sizes:
        ceiling = results[("tmpfs ring", size)]
        pipe = results[("os.pipe", size)]
        for transport in TRANSPORTS:
            r = results[(transport, size)]
            pins = ""
            if r.sender is not None and r.receiver is not None and transport == "volfs ring":
                pins = f"{r.sender['pins']}+{r.receiver['unpins']}"
            rows.append(
                [
                    human(size),
                    transport,
                    f"{r.rate:,.0f}",
                    f"{r.mib_per_s:,.1f}",
                    f"{r.rate / ceiling.rate:.2f}x",
                    f"{r.rate / pipe.rate:.2f}x",
                    pins,
                ]
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines[0:0] = [
        f"# {settings.seconds:g} s per run, median of {settings.repeat}; ring capacity "
        f"{human(settings.capacity)}, segment "
        f"{human(settings.segment) if settings.segment else 'default'}",
        f"# Linux {platform.release()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "",
    ]
    lines += ["", describe_idle(idle), ""]
    for verdict in targets(results, idle, settings):
        lines.append(
            f"target: {verdict['what']}: {verdict['figure']}: "
            + ("met" if verdict["met"] else "NOT met")
            + (" (not judged: --quick)" if settings.quick else "")
        )
    return "\n".join(lines)


def targets(
    results: dict[tuple[str, int], Result], idle: IdleMemory, settings: Settings
) -> list[dict[str, Any]]:
    verdicts: list[dict[str, Any]] = []
    if TARGET_SIZE in settings.sizes:
        ring = results[("volfs ring", TARGET_SIZE)].rate
        ceiling = results[("tmpfs ring", TARGET_SIZE)].rate
        pipe = results[("os.pipe", TARGET_SIZE)].rate
        verdicts += [
            {
                "what": f"volfs ring >= {TARGET_VS_TMPFS}x tmpfs ring at 1 MiB",
                "figure": f"{ring / ceiling:.2f}x",
                "met": ring >= TARGET_VS_TMPFS * ceiling,
            },
            {
                "what": "volfs ring > os.pipe at 1 MiB",
                "figure": f"{ring / pipe:.2f}x",
                "met": ring > pipe,
            },
        ]
    verdicts.append(
        {
            "what": "an idle ring purged to its header page and one segment at most",
            "figure": f"{idle.file_after // 1024} KiB",
            "met": idle.met,
        }
    )
    return verdicts


def benchmark(settings: Settings) -> tuple[dict[tuple[str, int], Result], IdleMemory]:
    results: dict[tuple[str, int], Result] = {}
    workdir = Path(tempfile.mkdtemp(prefix="bench_ring-"))
    try:
        volfs = workdir / "volfs"
        volfs.mkdir()
        with (
            volfs_mounts.mounted(
                volfs_mounts.volfs_command(volfs, f"size={settings.volfs_size}", settings.python),
                volfs,
                workdir / "volfs.log",
            ) as mount,
            tmpfs_mount(workdir, f"{settings.capacity // MiB + 64}m") as tmpfs,
        ):
            for size in settings.sizes:
                # Round robin: load from elsewhere on the machine hits every transport alike.
                runs: dict[str, list[Result]] = {transport: [] for transport in TRANSPORTS}
                for _round in range(settings.repeat):
                    for transport in TRANSPORTS:
                        directory = tmpfs if transport == "tmpfs ring" else volfs
                        run = measure(transport, size, settings.seconds, directory, settings)
                        runs[transport].append(run)
                        print(
                            f"{human(size):>8}  {transport:<18} {run.rate:>12,.0f} msg/s "
                            f"{run.mib_per_s:>10,.1f} MiB/s",
                            file=sys.stderr,
                        )
                for transport in TRANSPORTS:
                    results[(transport, size)] = median(runs[transport])
            idle = idle_memory(mount, settings)
    finally:
        volfs_mounts.remove_workdir(workdir)
    return results, idle


def main(argv: Sequence[str] | None = None) -> int:
    assert __doc__ is not None
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sizes",
        type=sizes_argument,
        default=[64, 4096, MiB],
        help="message sizes (default: 64,4K,1M)",
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="sending time per run (2; --quick: 0.05)"
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="runs per case, median (3; --quick: 1)"
    )
    parser.add_argument(
        "--capacity",
        type=size_argument,
        default=None,
        help="ring data capacity (16M; --quick: 2M)",
    )
    parser.add_argument(
        "--segment",
        type=size_argument,
        default=None,
        help="ring segment: what the consumer unpins and the producer pins at once "
        "(the ring's default: 64K for a ring of 256K or more)",
    )
    parser.add_argument(
        "--idle-laps",
        type=int,
        default=None,
        help="laps of the ring streamed before the idle-memory run (4; --quick: 2)",
    )
    parser.add_argument("--volfs-size", default="1G", help="size= of the volfs mount (1G)")
    parser.add_argument("--python", default=sys.executable, help="python for the daemon")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run of a few seconds; the targets are shown, not judged (exit status 0)",
    )
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    segment = args.segment or default_segment_size(args.capacity)
    if max(args.sizes) > args.capacity - segment:
        parser.error(
            "every message size must fit the ring: at most the capacity minus a segment "
            f"({args.capacity - segment} bytes)"
        )
    settings = Settings(
        args.sizes,
        args.seconds,
        args.repeat,
        args.capacity,
        args.segment,
        args.volfs_size,
        args.python,
        args.idle_laps,
        args.quick,
    )
    try:
        results, idle = benchmark(settings)
    except (BenchError, volfs_mounts.MountError) as error:
        print(f"bench_ring: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json:
        json.dump(
            {
                "config": asdict(settings),
                "results": [
                    {
                        "transport": r.transport,
                        "size": r.size,
                        "messages_per_s": round(r.rate, 1),
                        "mib_per_s": round(r.mib_per_s, 2),
                        "messages": r.messages,
                        "seconds": round(r.seconds, 4),
                        "sender": r.sender,
                        "receiver": r.receiver,
                    }
                    for r in results.values()
                ],
                "idle": asdict(idle),
                "targets": targets(results, idle, settings),
            },
            sys.stdout,
            indent=2,
        )
        print()
    else:
        print(render(results, idle, settings))
    if settings.quick:
        return 0
    return 0 if all(v["met"] for v in targets(results, idle, settings)) else 1


if __name__ == "__main__":
    sys.exit(main())
