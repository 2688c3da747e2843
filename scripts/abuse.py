"""What an unprivileged user can do to a shared volfs, and what it costs the daemon and others.

Each attack runs on a fresh volfs mounted by root with ``-o size=256M,allow_other`` (root
directory mode 1777), in a process of user ``nobody`` (uid 65534) that stops at its own bound:
a count, its time limit (``--seconds``), or the first error, whose errno is reported. The
attacker is killed if it outlives the bound, or if the daemon's memory grows past
``--memory-limit``.
Meanwhile a probe of another user (uid 65533) loops ``stat`` + ``open`` + ``close`` on a small
file of the mount, pausing 1 ms between rounds, and every round's latency is kept.

Per attack it reports the daemon's memory growth (the peak during the attack of its resident
memory plus its memfds' pages, minus that before), the bytes the mount shows as used in
``statvfs``/``df`` at the end (charged to the cap), and the probe's p50/p99 latency, then a
table. Targets: what the daemon grew beyond what was charged to the cap is below 64 MiB, and
the probe's p99 is at most 10 ms; a few attacks add their own (``counters``: the statistics
ioctl answers, root's purge succeeds). The daemon must also survive, exit 0 and log no
exception, and the probe must never fail.
Exit status 1 if any target is missed, 2 if the script cannot run.

The probe's percentiles are over the rounds overlapping the attack, or the part of it that
matters (status: the query loop; lastclose: each close, with quiet before and after;
sizepurge: the filling), corrected for coordinated omission: a round stalled for 400 ms stands
for the ~400 rounds it kept from starting, so a stall weighs as the share of time it took.
The uncorrected figures are in the JSON (``raw_p50_ms``, ``raw_p99_ms``), with the time the
daemon's serving thread waited for a CPU (``daemon_cpu_wait_ms``), a sign of a loaded machine.

Attacks:
  dirhandles  many handles of a directory of many entries, each opened and read once, kept open
  symlinks    symlinks with 4000-byte targets
  ranges      every other page of a 1 TiB sparse file marked volatile
  status      whole-file VOLFS_IOC_VRANGE_STATUS in a loop on a file holding many ranges
  lastclose   the last close of a file holding many ranges (the probe around each close)
  sizepurge   empty volatile ranges, some volatile data, then a writer filling the cap
  xattrs      empty user.* attributes with distinct names, then listxattr in a loop
  counters    three 2**63-1 byte files volatile whole, then VOLFS_IOC_STATS and a root purge
  forgets     processes holding removed files (O_PATH descriptors) all killed at once: the
              kernel forgets every one of them together (the probe around the kill)
  capwaiters  a removed file held (O_PATH), the cap filled, then 120 threads writing a page
              each to a file of their own, pausing 20 ms between writes, all failing
  segflip     512 one-page segments over holes, whose words a thread turns back to UNPINNED
              (oldest of all) as soon as a purge claims them, the 16,384 free slots of another
              table set UNPINNED, and behind them a segment of volatile data; then a writer
              filling the cap

Usage (as root):
  python scripts/abuse.py                        # all attacks, full scale, 20 s each
  python scripts/abuse.py --quick                # smaller scale, 5 s each: about a minute
  python scripts/abuse.py --only ranges --only status --seconds 30
  python scripts/abuse.py --quick --json > abuse.json   # JSON on stdout, the report on stderr
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import json
import math
import os
import resource
import select
import signal
import stat
import struct
import sys
import tempfile
import threading
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import volfs_mounts

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from volfs import _segments  # noqa: E402
from volfs.abi import (  # noqa: E402
    MAX_FILE_SIZE,
    PAGE_SIZE,
    SEGMENT_UNPINNED,
    VRANGE_VOLATILE,
)
from volfs.client import SegmentTable, fvrange, purge, statistics, vrange_status  # noqa: E402

MiB = 1 << 20
NOBODY = 65534
PROBE_UID = 65533
MOUNT_OPTIONS = "size=256M,allow_other"
#: The root directory's mode on such a mount: the attacker (nobody) must be able to write it.
ROOT_MODE = 0o1777

#: Target: memory growth beyond what was charged to the cap stays below this.
MEMORY_UNCHARGED = 64 * MiB
#: Target: the probe's p99 latency, ms.
P99_TARGET_MS = 10.0

#: Seconds the parent waits past an attack's bound before it kills the attacker.
KILL_GRACE = 1.0
#: Seconds the probe runs before an attack starts.
WARMUP = 0.3
#: The shortest probe window: an attack over in a few milliseconds still gets probed.
MIN_WINDOW = 0.5
#: Seconds of quiet before and after each last close (lastclose), inside its probe window.
CLOSE_QUIET = 0.2
#: Seconds the probe goes on after the holders of removed files are killed (forgets): the
#: kernel's forgets reach the daemon meanwhile.
FORGET_SETTLE = 1.5
#: Pause between two probe rounds, ms: the probe measures the daemon, not a fight for the CPU.
PROBE_PAUSE_MS = 1
#: capwaiters: threads writing at the full cap, more than the daemon's 99 request workers.
CAP_WRITERS = 120
#: Seconds each of them pauses between two writes: they are to wait, not to flood the daemon.
CAP_WRITER_PAUSE = 0.02
#: segflip: slots of each of the attacker's two tables, and one-page segments over holes it
#: keeps turning back to UNPINNED; every slot of the other table it sets UNPINNED once.
SEGFLIP_SLOTS = 16384
SEGFLIP_SEGMENTS = 512
#: Seconds between two memory samples.
MEMORY_INTERVAL = 0.01
#: Bound on probe samples kept (16 bytes each).
MAX_PROBE_SAMPLES = 1_000_000
#: Address-space limit of the attacker and probe processes.
CHILD_ADDRESS_SPACE = 2 << 30
#: Seconds allowed for root's setup of an attack (dirhandles creates 100k entries).
SETUP_TIMEOUT = 300.0
#: Seconds allowed for one of root's calls on the mount after an attack (statvfs, purge).
CALL_TIMEOUT = 30.0
#: Seconds allowed for the attacker to let go of what it holds (its last closes).
FINISH_TIMEOUT = 60.0
#: Seconds allowed for the probe to notice it should stop.
PROBE_STOP_TIMEOUT = 10.0

#: One probe round: start and end (CLOCK_MONOTONIC, shared by all processes) and its errno.
PROBE_RECORD = struct.Struct("=ddi")

_PR_SET_PDEATHSIG = 1
_F_SETPIPE_SZ = 1031

Message = dict[str, Any]


def errno_name(error: OSError) -> str:
    """``ENOSPC`` for an OSError carrying ENOSPC: comparable, and what the attacker got."""
    return errno.errorcode.get(error.errno or 0, str(error.errno))


# -- scale ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scale:
    """How far each attack goes."""

    #: Time bound of each attack.
    seconds: float
    #: dirhandles: entries of the directory (created by root beforehand) and handles opened.
    entries: int
    handles: int
    #: symlinks: the most created.
    symlinks: int
    #: Range records asked of one file (ranges, status, lastclose, sizepurge): time bounds it.
    ranges: int
    #: xattrs: the most attributes set.
    xattrs: int
    #: lastclose: files built and closed.
    rounds: int
    #: sizepurge: bytes of volatile data behind the empty ranges.
    data: int
    #: status and xattrs: seconds of the query loop, at the end of the bound.
    loop: float
    #: forgets: processes holding removed files, and files each (at most its descriptors).
    holders: int
    held_files: int


FULL = Scale(20.0, 100_000, 200, 300_000, 10_000_000, 1_000_000, 3, 32 * MiB, 5.0, 4, 19_000)
QUICK = Scale(5.0, 20_000, 200, 30_000, 10_000_000, 100_000, 2, 32 * MiB, 2.0, 2, 12_000)


# -- processes -----------------------------------------------------------------------------------


class Channel:
    """A child's side of its two pipes: messages to the parent, commands from it."""

    def __init__(self, out: int, control: int) -> None:
        """Wrap the write end ``out`` and the read end ``control``."""
        self.out = out
        self.control = control

    def send(self, message: Message) -> None:
        """Send one message (a JSON line)."""
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(self.out, data) :]

    def wait_go(self) -> bool:
        """Wait for the parent's go; False if it went away instead."""
        return os.read(self.control, 1) == b"g"

    def wait_finish(self) -> None:
        """Wait until the parent closes the command pipe: until then, hold on to everything."""
        while os.read(self.control, 4096):
            pass


def _only_fds(keep: set[int]) -> None:
    """Close every descriptor but ``keep``: a child holds no pipe of another child."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _become(uid: int, gid: int) -> None:
    """Take ``uid``/``gid`` with no supplementary groups; die with the parent from then on."""
    parent = os.getppid()
    if uid:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    # After setuid, which clears it.
    _die_with(parent)


def _die_with(parent: int) -> None:
    """Be killed when ``parent``, this process's parent, exits (at once if it already has)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


@dataclass
class Child:
    """A forked process and the parent's ends of its pipes."""

    name: str
    pid: int
    #: Messages (or probe records) from the child; non-blocking.
    messages: int
    #: Commands to the child: ``g`` to start, closed to finish; None once closed.
    control: int | None
    received: list[Message] = field(default_factory=list)
    _buffer: bytearray = field(default_factory=bytearray)
    #: Wait status once reaped.
    status: int | None = None

    def feed(self, data: bytes) -> None:
        """Take bytes from the message pipe; whole lines are messages."""
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line, self._buffer = bytes(self._buffer[:end]), self._buffer[end + 1 :]
            self.received.append(json.loads(line))

    def result(self) -> Message | None:
        """The child's final message (``result`` or ``crash``), if it sent one."""
        for message in self.received:
            if message["kind"] in ("result", "crash"):
                return message
        return None

    def exited(self) -> bool:
        """True once the child has exited (reaping it)."""
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
        return self.status is not None

    def go(self) -> None:
        """Let the child start."""
        assert self.control is not None
        os.write(self.control, b"g")

    def finish(self) -> None:
        """Tell the child to let go of what it holds and exit."""
        if self.control is not None:
            os.close(self.control)
            self.control = None

    def kill(self) -> None:
        """SIGKILL and reap (a child blocked in a FUSE request dies too)."""
        self.finish()
        if not self.exited():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            _pid, self.status = os.waitpid(self.pid, 0)

    def close(self) -> None:
        """Close the message pipe (after the child is gone)."""
        with contextlib.suppress(OSError):
            os.close(self.messages)


def spawn(name: str, uid: int, gid: int, body: Callable[[Channel], None]) -> Child:
    """Fork a child that takes ``uid``/``gid`` and runs ``body``; it never returns here.

    A failure inside ``body`` reaches the parent as a ``crash`` message with its traceback.
    """
    out_read, out_write = os.pipe()
    control_read, control_write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            _only_fds({0, 1, 2, out_write, control_read})
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _become(uid, gid)
            resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))
            os.chdir("/")
            channel = Channel(out_write, control_read)
            try:
                body(channel)
                code = 0
            except BaseException:
                channel.send({"kind": "crash", "traceback": traceback.format_exc()})
        finally:
            os._exit(code)
    os.close(out_write)
    os.close(control_read)
    os.set_blocking(out_read, False)
    return Child(name, pid, out_read, control_write)


# -- the parent's view ---------------------------------------------------------------------------


def runqueue_wait(pid: int) -> int:
    """Nanoseconds the main thread of ``pid`` has waited for a CPU (0 if unknown).

    The daemon serves requests on its main thread: time it spends waiting for a CPU is probe
    latency the machine's load caused, not the attack.
    """
    try:
        with open(f"/proc/{pid}/schedstat") as schedstat:
            return int(schedstat.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


class ProbeLog:
    """The probe's rounds: start and end times, and how many failed with which errno."""

    def __init__(self) -> None:
        """Start empty."""
        self.starts = array("d")
        self.ends = array("d")
        self.errors: Counter[str] = Counter()
        self.dropped = 0
        self._partial = b""

    def feed(self, data: bytes) -> None:
        """Take records from the probe's pipe."""
        data = self._partial + data
        whole = len(data) - len(data) % PROBE_RECORD.size
        self._partial = data[whole:]
        for start, end, code in PROBE_RECORD.iter_unpack(data[:whole]):
            self.add(start, end, code)

    def add(self, start: float, end: float, code: int = 0) -> None:
        """Record one round."""
        if code:
            self.errors[errno.errorcode.get(code, str(code))] += 1
        if len(self.starts) >= MAX_PROBE_SAMPLES:
            self.dropped += 1
            return
        self.starts.append(start)
        self.ends.append(end)

    @property
    def last_end(self) -> float | None:
        """When the latest round ended."""
        return self.ends[-1] if self.ends else None

    def summary(self, windows: Sequence[tuple[float, float]]) -> Message:
        """Latencies of the rounds overlapping any window, ms: p50, p99, max, and raw p50/p99.

        p50 and p99 are corrected for coordinated omission (as HdrHistogram's
        ``recordValueWithExpectedInterval``): a round that took L stood for the rounds the
        probe would have started meanwhile, one each interval I (the pause plus the raw
        median), so it is counted with L - I, L - 2I, ... down to I. A 400 ms stall in a
        second of 1 ms rounds then weighs as 40% of the time it is, not as one round in 600.
        """
        raw = sorted(
            (end - start) * 1000
            for start, end in zip(self.starts, self.ends, strict=True)
            if any(start < high and end > low for low, high in windows)
        )
        if not raw:
            return {"samples": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
        interval = PROBE_PAUSE_MS + percentile(raw, 0.50)
        corrected = array("d", raw)
        for latency in raw:
            missing = latency - interval
            while missing >= interval:
                corrected.append(missing)
                missing -= interval
        latencies = sorted(corrected)
        return {
            "samples": len(raw),
            "p50_ms": round(percentile(latencies, 0.50), 3),
            "p99_ms": round(percentile(latencies, 0.99), 3),
            "max_ms": round(raw[-1], 3),
            "raw_p50_ms": round(percentile(raw, 0.50), 3),
            "raw_p99_ms": round(percentile(raw, 0.99), 3),
        }


class Monitor:
    """Drains the children's pipes and samples the daemon's memory, from the script's one thread."""

    def __init__(self, daemon_pid: int, probe: ProbeLog) -> None:
        """Watch the daemon ``daemon_pid``; probe records go to ``probe``."""
        self.daemon_pid = daemon_pid
        self.probe = probe
        self._poller = select.poll()
        self._feeds: dict[int, Callable[[bytes], None]] = {}
        #: The daemon's memory at the last sample; None if it was gone.
        self.memory: int | None = None
        self.peak = 0
        #: Whether samples count towards ``peak``.
        self.tracking = False
        self.sample()

    def watch(self, fd: int, feed: Callable[[bytes], None]) -> None:
        """Hand what arrives on ``fd`` to ``feed``."""
        self._poller.register(fd, select.POLLIN)
        self._feeds[fd] = feed

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (after draining it)."""
        if fd in self._feeds:
            self._drain(fd)
            self._poller.unregister(fd)
            del self._feeds[fd]

    def _drain(self, fd: int) -> bool:
        """Read what ``fd`` has; False at end of file."""
        while True:
            try:
                data = os.read(fd, 1 << 20)
            except BlockingIOError:
                return True
            if not data:
                return False
            self._feeds[fd](data)

    def sample(self) -> None:
        """Sample the daemon's memory now."""
        try:
            self.memory = volfs_mounts.memory_bytes(self.daemon_pid)
        except (FileNotFoundError, ProcessLookupError, ValueError):  # a zombie has no VmRSS
            self.memory = None
        if self.tracking and self.memory is not None:
            self.peak = max(self.peak, self.memory)
        self._next_sample = time.monotonic() + MEMORY_INTERVAL

    def step(self, until: float) -> None:
        """Wait for data until ``until`` or the next memory sample, whichever comes first."""
        timeout = max(0.0, min(until, self._next_sample) - time.monotonic())
        for fd, _events in self._poller.poll(math.ceil(timeout * 1000)):
            if fd in self._feeds and not self._drain(fd):
                self._poller.unregister(fd)
                del self._feeds[fd]
        if time.monotonic() >= self._next_sample:
            self.sample()

    def wait(self, done: Callable[[], bool], deadline: float) -> bool:
        """Step until ``done()`` or ``deadline``; return ``done()``."""
        while not done():
            if time.monotonic() >= deadline:
                return done()
            self.step(deadline)
        return True

    def pause(self, seconds: float) -> None:
        """Keep draining and sampling for ``seconds``."""
        self.wait(lambda: False, time.monotonic() + seconds)


def call(
    monitor: Monitor, name: str, action: Callable[[], Message], timeout: float, uid: int = 0
) -> Message:
    """Run ``action`` in a child of ``uid`` (root by default) and return what it returned.

    The parent never blocks on the mount itself: a daemon stuck in a request costs a timeout
    and a killed child. An OSError comes back as ``{"errno": NAME, "error": text}``.
    """

    def body(channel: Channel) -> None:
        try:
            value = action()
        except OSError as error:
            value = {"errno": errno_name(error), "error": str(error)}
        channel.send({"kind": "result", "value": value})

    child = spawn(name, uid, uid, body)
    monitor.watch(child.messages, child.feed)
    try:
        monitor.wait(
            lambda: child.result() is not None or child.exited(), time.monotonic() + timeout
        )
    finally:
        child.kill()
        monitor.unwatch(child.messages)
        child.close()
    result = child.result()
    if result is None:
        return {"errno": None, "error": f"{name}: no answer within {timeout:g} s"}
    if result["kind"] == "crash":
        return {"errno": None, "error": result["traceback"]}
    value: Message = result["value"]
    return value


# -- the attacker's side -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Loop:
    """How a repeated step ended: how many were done, and why it stopped."""

    done: int
    #: ``count`` (all done), ``time`` (the bound), or ``error`` (then ``errno``).
    stopped: str
    errno: str | None = None
    error: str | None = None

    def fields(self) -> Message:
        """As message fields."""
        return dataclasses.asdict(self)


@dataclass
class Attacker:
    """What an attack runs with, in the attacker's process (as nobody)."""

    mount: Path
    scale: Scale
    channel: Channel
    #: When the attack's time bound ends (CLOCK_MONOTONIC).
    deadline: float
    _next_progress: float = 0.0

    def progress(self, **fields: Any) -> None:
        """Tell the parent how far the attack got, at most a few times a second.

        So an attacker killed at the bound is still reported with its counts.
        """
        now = time.monotonic()
        if now >= self._next_progress:
            self._next_progress = now + 0.25
            self.channel.send({"kind": "progress", **fields})

    def window_start(self) -> None:
        """The probe counts from now on (instead of over the whole attack)."""
        self.channel.send({"kind": "window_start", "t": time.monotonic()})

    def window_end(self) -> None:
        """The probe window closes now."""
        self.channel.send({"kind": "window_end", "t": time.monotonic()})

    def repeat(
        self, step: Callable[[int], object], count: int, unit: str, until: float | None = None
    ) -> Loop:
        """Call ``step(0)``, ``step(1)``, ... until ``count``, the bound or an OSError."""
        end = self.deadline if until is None else min(until, self.deadline)
        done = 0
        try:
            while done < count:
                if time.monotonic() >= end:
                    return Loop(done, "time")
                step(done)
                done += 1
                self.progress(unit=unit, done=done)
        except OSError as error:
            return Loop(done, "error", errno_name(error), str(error))
        return Loop(done, "count")

    def build_ranges(self, name: str, until: float) -> tuple[int, Loop]:
        """A 1 TiB sparse file with every other page volatile, until an error or ``until``.

        Returns its descriptor (open for writing, so the ranges last) and how marking ended.
        """
        fd = os.open(self.mount / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, 1 << 40)

        def mark(index: int) -> None:
            fvrange(fd, 2 * index * PAGE_SIZE, PAGE_SIZE, VRANGE_VOLATILE)

        return fd, self.repeat(mark, self.scale.ranges, "ranges", until)


def attacker_body(attack: Attack, mount: Path, scale: Scale) -> Callable[[Channel], None]:
    """The attacker process: wait for the go, attack, report, hold on until told to finish."""

    def body(channel: Channel) -> None:
        os.umask(0o022)
        if not channel.wait_go():
            return
        attacker = Attacker(mount, scale, channel, time.monotonic() + scale.seconds)
        result = attack.run(attacker)
        channel.send({"kind": "result", **result})
        channel.wait_finish()

    return body


# -- attacks -------------------------------------------------------------------------------------


def setup_dirhandles(mount: Path, scale: Scale) -> Message:
    """Root fills ``dir`` with empty files."""
    started = time.monotonic()
    os.mkdir(mount / "dir", 0o755)
    directory = os.open(mount / "dir", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for index in range(scale.entries):
            os.mknod(f"f{index}", stat.S_IFREG | 0o644, dir_fd=directory)
    finally:
        os.close(directory)
    return {"entries": scale.entries, "seconds": round(time.monotonic() - started, 2)}


def attack_dirhandles(attacker: Attacker) -> Message:
    """Open handles of the big directory, read the first batch of each, keep them open."""
    handles: list[int] = []
    path = attacker.mount / "dir"

    def open_one(_index: int) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        handles.append(fd)
        # scandir reads through a duplicate of fd (one getdents) and rewinds it when closed.
        with os.scandir(fd) as entries:
            next(entries, None)

    loop = attacker.repeat(open_one, attacker.scale.handles, "handles")
    return {"unit": "handles", **loop.fields(), "open_handles": len(handles)}


def attack_symlinks(attacker: Attacker) -> Message:
    """Symlinks with 4000-byte targets in a directory of the attacker's."""
    os.mkdir(attacker.mount / "links", 0o755)
    directory = os.open(attacker.mount / "links", os.O_RDONLY | os.O_DIRECTORY)
    target = "t" * 4000

    def create(index: int) -> None:
        os.symlink(target, f"l{index}", dir_fd=directory)

    loop = attacker.repeat(create, attacker.scale.symlinks, "symlinks")
    return {"unit": "symlinks", **loop.fields(), "target_bytes": len(target)}


def attack_ranges(attacker: Attacker) -> Message:
    """Every other page of a 1 TiB sparse file volatile: one range record each."""
    _fd, loop = attacker.build_ranges("ranges", attacker.deadline)
    return {"unit": "ranges", **loop.fields()}


def attack_status(attacker: Attacker) -> Message:
    """A file with as many ranges as allowed, then whole-file VRANGE_STATUS in a loop."""
    loop_start = attacker.deadline - attacker.scale.loop
    fd, built = attacker.build_ranges("status", loop_start)
    attacker.window_start()
    calls = 0
    slowest = 0.0
    failure: OSError | None = None
    while time.monotonic() < attacker.deadline:
        before = time.monotonic()
        try:
            vrange_status(fd)
        except OSError as error:
            failure = error
            break
        slowest = max(slowest, time.monotonic() - before)
        calls += 1
        attacker.progress(unit="ranges", done=built.done, status_calls=calls)
    attacker.window_end()
    return {
        "unit": "ranges",
        **built.fields(),
        "status_calls": calls,
        "status_slowest_ms": round(slowest * 1000, 3),
        "status_errno": None if failure is None else errno_name(failure),
    }


def attack_lastclose(attacker: Attacker) -> Message:
    """Files with as many ranges as allowed, each closed for the last time: probed per close.

    Each close gets a window of its own, quiet before and after, so the probe sees what the
    close costs and not the marking. The release is processed after close(2) returns; a
    statistics ioctl sent right after it is answered once the release is done.
    """
    root = os.open(attacker.mount, os.O_RDONLY | os.O_DIRECTORY)
    rounds = attacker.scale.rounds
    started = time.monotonic()
    building = max((attacker.deadline - started) * 0.8 / rounds - 2 * CLOSE_QUIET, 0.5)
    built: list[Message] = []
    close_ms: list[float] = []
    for index in range(rounds):
        fd, loop = attacker.build_ranges(f"lastclose{index}", time.monotonic() + building)
        built.append(loop.fields())
        attacker.window_start()
        time.sleep(CLOSE_QUIET)
        closing = time.monotonic()
        os.close(fd)
        with contextlib.suppress(OSError):
            statistics(root)
        released = time.monotonic()
        close_ms.append(round((released - closing) * 1000, 3))
        time.sleep(CLOSE_QUIET)
        attacker.window_end()
        if (loop.stopped == "error" and loop.errno != "ENOSPC") or (
            time.monotonic() > attacker.deadline
        ):
            break
    return {
        "unit": "ranges",
        **built[0],
        "done": max(round_["done"] for round_ in built),
        "rounds": len(close_ms),
        "ranges_per_round": [round_["done"] for round_ in built],
        "close_ms": close_ms,
    }


#: A holder's report: files made, why it stopped (an index into HOLDER_STOPS) and the errno
#: of an error (EMFILE at its descriptor limit).
HOLDER_REPORT = struct.Struct("=qii")
HOLDER_STOPS = ("count", "time", "error")


def _holder(directory: Path, prefix: str, count: int, until: float) -> tuple[int, int]:
    """Fork a process that makes up to ``count`` removed files held by O_PATH descriptors,
    stopping at ``until``, at its descriptor limit or at an error; it reports how many and
    why (HOLDER_REPORT) on a pipe, then holds them until killed.

    Returns its pid and the read end of that pipe.
    """
    made_read, made_write = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the holder
        try:
            _only_fds({0, 1, 2, made_write})
            _die_with(parent)
            _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            held: list[int] = []
            stop, code = "count", 0
            try:
                while len(held) < count:
                    if len(held) >= hard - 16:
                        stop, code = "error", errno.EMFILE
                        break
                    if time.monotonic() >= until:
                        stop = "time"
                        break
                    path = directory / f"{prefix}{len(held)}"
                    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                    held.append(os.open(path, os.O_PATH))
                    os.unlink(path)
            except OSError as error:
                stop, code = "error", error.errno or 0
            report = HOLDER_REPORT.pack(len(held), HOLDER_STOPS.index(stop), code)
            os.write(made_write, report)
            while True:
                signal.pause()
        finally:
            os._exit(1)
    os.close(made_write)
    return pid, made_read


def attack_forgets(attacker: Attacker) -> Message:
    """Processes holding removed files through O_PATH descriptors, all killed at once.

    Each file is the daemon's until the kernel forgets it, and the kernel forgets them all
    together once the holders die: in batches of up to 65,535 forgets. The probe window covers
    the kill and what follows, quiet before and after.
    """
    directory = attacker.mount / "held"
    os.mkdir(directory, 0o700)
    until = attacker.deadline - 2 * CLOSE_QUIET - FORGET_SETTLE
    holders = [
        _holder(directory, f"h{index}-", attacker.scale.held_files, until)
        for index in range(attacker.scale.holders)
    ]
    made = []
    stops = set()
    errors = set()
    for _pid, made_read in holders:
        count, stop, code = HOLDER_REPORT.unpack(os.read(made_read, HOLDER_REPORT.size))
        os.close(made_read)
        made.append(count)
        stops.add(HOLDER_STOPS[stop])
        if code:
            errors.add(errno.errorcode.get(code, str(code)))
    attacker.window_start()
    time.sleep(CLOSE_QUIET)
    for pid, _made_read in holders:
        os.kill(pid, signal.SIGKILL)
    for pid, _made_read in holders:
        os.waitpid(pid, 0)
    time.sleep(FORGET_SETTLE + CLOSE_QUIET)
    attacker.window_end()
    stopped = next((stop for stop in ("error", "time") if stop in stops), "count")
    return {
        "unit": "removed files",
        "done": sum(made),
        "stopped": stopped,
        "errno": ",".join(sorted(errors)) or None,
        "per_holder": made,
    }


def attack_sizepurge(attacker: Attacker) -> Message:
    """Empty volatile ranges, volatile data marked after them, then a writer filling the cap.

    The writer that meets the cap makes the daemon purge oldest first: every empty range
    before it reaches the data.
    """
    fill_time = max(2.5, attacker.scale.seconds * 0.4)
    _ranges_fd, built = attacker.build_ranges("sizepurge-ranges", attacker.deadline - fill_time)
    block = b"\x5a" * MiB
    data = os.open(attacker.mount / "sizepurge-data", os.O_RDWR | os.O_CREAT, 0o600)
    for offset in range(0, attacker.scale.data, MiB):
        os.pwrite(data, block, offset)
    fvrange(data, 0, attacker.scale.data, VRANGE_VOLATILE)
    fill = os.open(attacker.mount / "sizepurge-fill", os.O_WRONLY | os.O_CREAT, 0o600)
    attacker.window_start()
    written = 0
    slowest = 0.0
    failure: OSError | None = None
    while time.monotonic() < attacker.deadline:
        before = time.monotonic()
        try:
            count = os.write(fill, block)
        except OSError as error:
            failure = error
            break
        slowest = max(slowest, time.monotonic() - before)
        written += count
        attacker.progress(unit="ranges", done=built.done, filled_mib=round(written / MiB, 1))
    attacker.window_end()
    counters: Message = {}
    with contextlib.suppress(OSError):
        counters = statistics(fill)
    return {
        "unit": "ranges",
        **built.fields(),
        "filled_mib": round(written / MiB, 1),
        "fill_errno": None if failure is None else errno_name(failure),
        "slowest_write_ms": round(slowest * 1000, 3),
        "purges_size": counters.get("purges_size"),
    }


def attack_capwaiters(attacker: Attacker) -> Message:
    """Many writers at the full cap while a removed file of the attacker's holds pages.

    Each write that meets the cap may wait for that file's memory, which its O_PATH
    descriptor keeps from coming back: a waiting request holds one of the daemon's request
    workers, so writers enough could hold them all.
    """
    held = attacker.mount / "capwaiters-held"
    fd = os.open(held, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.pwrite(fd, b"\x5a" * MiB, 0)
    os.close(fd)
    holder = os.open(held, os.O_PATH)
    os.unlink(held)
    fill = os.open(attacker.mount / "capwaiters-fill", os.O_WRONLY | os.O_CREAT, 0o600)
    filled = 0
    for block in (b"\x5a" * MiB, b"\x5a" * PAGE_SIZE):  # to the last page
        with contextlib.suppress(OSError):
            while time.monotonic() < attacker.deadline:
                filled += os.write(fill, block)
    files = [
        os.open(attacker.mount / f"capwaiters-{index}", os.O_WRONLY | os.O_CREAT, 0o600)
        for index in range(CAP_WRITERS)
    ]
    failures: Counter[str] = Counter()
    lock = threading.Lock()

    def writer(descriptor: int) -> None:
        while time.monotonic() < attacker.deadline:
            try:
                os.pwrite(descriptor, b"w" * PAGE_SIZE, 0)
            except OSError as error:
                with lock:
                    failures[errno_name(error)] += 1
            time.sleep(CAP_WRITER_PAUSE)

    threading.stack_size(256 * 1024)  # 120 default stacks would take much of the address space
    threads = [threading.Thread(target=writer, args=(descriptor,)) for descriptor in files]
    attacker.window_start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    attacker.window_end()
    os.close(holder)
    return {
        "unit": "failed writes",
        "done": sum(failures.values()),
        "stopped": "time",
        "errno": ",".join(sorted(failures)) or None,
        "writers": CAP_WRITERS,
        "filled_mib": round(filled / MiB, 1),
    }


def attack_segflip(attacker: Attacker) -> Message:
    """Segments whose words the attacker turns back to UNPINNED, older than its volatile data,
    then a writer filling the cap.

    The writer that meets the cap makes the daemon purge oldest first: the purge must reach
    the data however often it finds the turned-back segments, and end once nothing is left.
    """
    holes = os.open(attacker.mount / "segflip-holes", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(holes, 1 << 30)
    table = SegmentTable(holes, SEGFLIP_SLOTS)
    flipped = [table.register(2 * i * PAGE_SIZE, PAGE_SIZE) for i in range(SEGFLIP_SEGMENTS)]
    words = table._map  # a client may write anything into its mapping of the table
    for segment in flipped:
        segment.unpin()
    empty = os.open(attacker.mount / "segflip-empty", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    empty_words = SegmentTable(empty, SEGFLIP_SLOTS)._map
    for index in range(SEGFLIP_SLOTS):
        _segments.set(empty_words, index, SEGMENT_UNPINNED)
    data = os.open(attacker.mount / "segflip-data", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    for offset in range(0, attacker.scale.data, MiB):
        os.pwrite(data, b"\x5a" * MiB, offset)
    data_segment = SegmentTable(data, 1).register(0, attacker.scale.data)
    data_segment.unpin()
    stop = threading.Event()
    turned_back = 0

    def flipper() -> None:
        nonlocal turned_back
        while not stop.is_set():
            for segment in flipped:
                if _segments.state(words, segment.index) != SEGMENT_UNPINNED:
                    _segments.set(words, segment.index, SEGMENT_UNPINNED)
                    turned_back += 1
            time.sleep(0.0005)

    thread = threading.Thread(target=flipper)
    thread.start()
    fill = os.open(attacker.mount / "segflip-fill", os.O_WRONLY | os.O_CREAT, 0o600)
    attacker.window_start()
    written = 0
    slowest = 0.0
    failure: OSError | None = None
    try:
        while time.monotonic() < attacker.deadline:
            before = time.monotonic()
            try:
                written += os.write(fill, b"\x5a" * MiB)
            except OSError as error:
                failure = error
                break
            slowest = max(slowest, time.monotonic() - before)
            attacker.progress(unit="turned back", done=turned_back)
    finally:
        attacker.window_end()
        stop.set()
        thread.join()
    return {
        "unit": "turned back",
        "done": turned_back,
        "stopped": "time" if failure is None else "error",
        "errno": None if failure is None else errno_name(failure),
        "filled_mib": round(written / MiB, 1),
        "slowest_write_ms": round(slowest * 1000, 3),
        "data_purged": data_segment.pin(),
    }


def checks_segflip(attacker: Message, _after: Message) -> dict[str, bool]:
    """The writer's purges reached the data behind the turned-back segments, and the writer
    met the cap's ENOSPC once nothing was left: no purge went on for ever."""
    return {
        "data purged": attacker.get("data_purged") is True,
        "cap met": attacker.get("errno") == "ENOSPC",
    }


def attack_xattrs(attacker: Attacker) -> Message:
    """Empty user.* attributes with distinct names on a file of its own, then listxattr."""
    fd = os.open(attacker.mount / "xattrs", os.O_RDWR | os.O_CREAT, 0o600)

    def set_one(index: int) -> None:
        os.setxattr(fd, f"user.{index}", b"")

    loop = attacker.repeat(
        set_one, attacker.scale.xattrs, "xattrs", attacker.deadline - attacker.scale.loop
    )
    calls = 0
    slowest = 0.0
    listed: int | None = None
    failure: str | None = None
    while time.monotonic() < attacker.deadline:
        before = time.monotonic()
        try:
            listed = len(os.listxattr(fd))
        except OSError as error:
            failure = failure or errno_name(error)
        slowest = max(slowest, time.monotonic() - before)
        calls += 1
        attacker.progress(unit="xattrs", done=loop.done, listxattr_calls=calls)
    return {
        "unit": "xattrs",
        **loop.fields(),
        "listxattr_calls": calls,
        "listxattr_names": listed,
        "listxattr_errno": failure,
        "listxattr_slowest_ms": round(slowest * 1000, 3),
    }


def attack_counters(attacker: Attacker) -> Message:
    """Three 2**63-1 byte files volatile whole; then the mount's statistics, and a purge try."""
    fds: list[int] = []

    def make(index: int) -> None:
        fd = os.open(attacker.mount / f"huge{index}", os.O_RDWR | os.O_CREAT, 0o600)
        fds.append(fd)
        os.ftruncate(fd, MAX_FILE_SIZE)
        fvrange(fd, 0, 0, VRANGE_VOLATILE)

    loop = attacker.repeat(make, 3, "files")
    result: Message = {"unit": "files", **loop.fields()}
    try:
        counters = statistics(attacker.mount)
        result["stats"] = "ok"
        result["volatile_bytes"] = counters["volatile_bytes"]
    except OSError as error:
        result["stats"] = errno_name(error)
    try:
        result["nobody_purge"] = f"ok ({purge(attacker.mount)} bytes)"
    except OSError as error:
        result["nobody_purge"] = errno_name(error)
    return result


def after_counters(mount: Path) -> Message:
    """Root purges everything while the huge ranges are held, then reads the statistics."""
    result: Message = {}
    try:
        result["purged_bytes"] = purge(mount)
        result["purge"] = "ok"
    except OSError as error:
        result["purge"] = errno_name(error)
    try:
        result["root_stats_volatile_bytes"] = statistics(mount)["volatile_bytes"]
        result["root_stats"] = "ok"
    except OSError as error:
        result["root_stats"] = errno_name(error)
    return result


def checks_counters(attacker: Message, after: Message) -> dict[str, bool]:
    """nobody's VOLFS_IOC_STATS answers; root's VOLFS_IOC_PURGE succeeds."""
    return {"stats": attacker.get("stats") == "ok", "purge": after.get("purge") == "ok"}


@dataclass(frozen=True, slots=True)
class Attack:
    """One attack: what nobody runs, and what root does before and after."""

    name: str
    summary: str
    run: Callable[[Attacker], Message]
    #: Root, before the attack (the probe file is made for every attack).
    setup: Callable[[Path, Scale], Message] | None = None
    #: Root, after the attack, while the attacker still holds what it made.
    after: Callable[[Path], Message] | None = None
    #: Targets of its own: name -> met, from the attacker's and ``after``'s results.
    checks: Callable[[Message, Message], dict[str, bool]] | None = None


ATTACKS = (
    Attack(
        "dirhandles",
        "handles of a directory of many entries, each opened and read once, kept open",
        attack_dirhandles,
        setup=setup_dirhandles,
    ),
    Attack("symlinks", "symlinks with 4000-byte targets", attack_symlinks),
    Attack("ranges", "every other page of a 1 TiB sparse file volatile", attack_ranges),
    Attack("status", "whole-file VRANGE_STATUS on a file of many ranges", attack_status),
    Attack("lastclose", "last close of files of many ranges", attack_lastclose),
    Attack("sizepurge", "a writer filling the cap behind empty volatile ranges", attack_sizepurge),
    Attack("xattrs", "empty user.* attributes, then listxattr", attack_xattrs),
    Attack(
        "counters",
        "three 2**63-1 byte files volatile whole, then STATS and a root PURGE",
        attack_counters,
        after=after_counters,
        checks=checks_counters,
    ),
    Attack("forgets", "holders of many removed files all killed at once", attack_forgets),
    Attack("capwaiters", "writers at the full cap while a removed file is held", attack_capwaiters),
    Attack(
        "segflip",
        "segments turned back to UNPINNED, older than volatile data, then a writer at the cap",
        attack_segflip,
        checks=checks_segflip,
    ),
)
ATTACK_NAMES = tuple(attack.name for attack in ATTACKS)


# -- one attack, from the parent ----------------------------------------------------------------


def make_probe_file(mount: Path) -> Message:
    """Root's small file, readable by all, that the probe opens."""
    path = mount / "probe"
    path.write_bytes(b"p" * PAGE_SIZE)
    path.chmod(0o644)
    return {}


def probe_body(path: Path) -> Callable[[Channel], None]:
    """The probe: stat + open + close of ``path`` until the parent closes the command pipe."""

    def body(channel: Channel) -> None:
        poller = select.poll()
        poller.register(channel.control, select.POLLIN)
        name = str(path)
        while True:
            code = 0
            start = time.monotonic()
            try:
                os.stat(name)
                os.close(os.open(name, os.O_RDONLY))
            except OSError as error:
                code = error.errno or -1
            end = time.monotonic()
            os.write(channel.out, PROBE_RECORD.pack(start, end, code))
            if poller.poll(PROBE_PAUSE_MS):
                return

    return body


def statvfs_used(mount: Path) -> Message:
    """Bytes the mount shows as used (what df shows)."""
    info = os.statvfs(mount)
    return {"used": (info.f_blocks - info.f_bfree) * info.f_frsize}


@dataclass
class Run:
    """The parent's record of one attack while it runs."""

    attacker: Message = field(default_factory=dict)
    #: The attacker's latest progress report: what it is reported with if killed.
    progress: Message = field(default_factory=dict)
    windows: list[tuple[float, float]] = field(default_factory=list)
    open_window: float | None = None
    #: The attacker's result (or crash) arrived.
    finished: bool = False

    def take(self, messages: list[Message]) -> None:
        """Fold the attacker's messages into the record."""
        for message in messages:
            kind = message["kind"]
            if kind == "window_start":
                self.open_window = message["t"]
            elif kind == "window_end" and self.open_window is not None:
                self.windows.append((self.open_window, message["t"]))
                self.open_window = None
            elif kind == "progress":
                self.progress = {k: v for k, v in message.items() if k != "kind"}
            elif kind == "result":
                self.attacker = {k: v for k, v in message.items() if k != "kind"}
                self.finished = True
            elif kind == "crash":
                self.attacker = {**self.progress, "stopped": "a crash"}
                self.attacker["error"] = message["traceback"]
                self.finished = True
        messages.clear()


def run_attack(
    attack: Attack, scale: Scale, workdir: Path, python: str, options: str, memory_limit: int
) -> Message:
    """Mount a fresh volfs, run one attack against it with the probe running, measure."""
    mountpoint = workdir / f"mnt-{attack.name}"
    mountpoint.mkdir()
    record: Message = {"attack": attack.name, "summary": attack.summary, "seconds": scale.seconds}
    outcome: dict[str, object] = {}
    with volfs_mounts.mounted(
        volfs_mounts.volfs_command(mountpoint, options, python),
        mountpoint,
        workdir / f"volfs-{attack.name}.log",
        outcome=outcome,
    ) as daemon:
        pid = daemon.process.pid
        probe_log = ProbeLog()
        monitor = Monitor(pid, probe_log)
        children: list[Child] = []
        try:
            record.update(
                attack_on_mount(attack, scale, mountpoint, daemon, monitor, children, memory_limit)
            )
        finally:
            for child in children:
                child.kill()
                child.close()
    log = str(outcome.pop("log", ""))
    if log:
        outcome["log_tail"] = log[-4000:]
    record["daemon"] = outcome
    record["checks"] = targets(record, attack)
    return record


def attack_on_mount(
    attack: Attack,
    scale: Scale,
    mount: Path,
    daemon: volfs_mounts.Mount,
    monitor: Monitor,
    children: list[Child],
    memory_limit: int,
) -> Message:
    """The body of :func:`run_attack`, on the mounted volfs; ``children`` are killed after."""
    record: Message = {"setup": set_up(attack, scale, mount, monitor)}
    probe, attacker = start_children(attack, scale, mount, monitor, children)
    window = run_window(attacker, daemon, monitor, scale, memory_limit)
    record.update(measure_cost(attack, mount, daemon, monitor, window))
    record.update(stop_probe(probe, monitor, window))
    record["daemon_alive"] = daemon.process.poll() is None
    attacker.finish()
    if not monitor.wait(attacker.exited, time.monotonic() + FINISH_TIMEOUT):
        record["attacker"]["finish"] = f"still closing after {FINISH_TIMEOUT:g} s, killed"
    attacker.kill()
    monitor.unwatch(attacker.messages)
    return record


def set_up(attack: Attack, scale: Scale, mount: Path, monitor: Monitor) -> Message:
    """Check the mount's root, make the probe's file and run the attack's own setup."""
    mode = stat.S_IMODE(os.stat(mount).st_mode)
    if mode != ROOT_MODE:
        raise RuntimeError(f"{mount}: root directory mode {mode:o}, expected {ROOT_MODE:o}")

    def setup() -> Message:
        make_probe_file(mount)
        return attack.setup(mount, scale) if attack.setup else {}

    result = call(monitor, "setup", setup, SETUP_TIMEOUT)
    if result.get("error"):
        raise RuntimeError(f"setup of {attack.name} failed: {result['error']}")
    return result


def start_children(
    attack: Attack, scale: Scale, mount: Path, monitor: Monitor, children: list[Child]
) -> tuple[Child, Child]:
    """Start the probe and the attacker (which waits for its go); let the probe warm up."""
    probe = spawn("probe", PROBE_UID, PROBE_UID, probe_body(mount / "probe"))
    children.append(probe)
    with contextlib.suppress(OSError):  # a bigger pipe: the parent may be busy for a while
        fcntl.fcntl(probe.messages, _F_SETPIPE_SZ, 1 << 20)
    monitor.watch(probe.messages, monitor.probe.feed)
    attacker = spawn(attack.name, NOBODY, NOBODY, attacker_body(attack, mount, scale))
    children.append(attacker)
    monitor.watch(attacker.messages, attacker.feed)
    monitor.pause(WARMUP)
    return probe, attacker


@dataclass
class AttackWindow:
    """The timed part of an attack, as the parent saw it."""

    run: Run
    #: When the attacker was let go, and when it stopped or was stopped (monotonic seconds).
    started: float
    ended: float
    #: The daemon's memory, and its run-queue wait in ns, when the attacker was let go.
    memory_before: int
    runqueue_before: int


def run_window(
    attacker: Child,
    daemon: volfs_mounts.Mount,
    monitor: Monitor,
    scale: Scale,
    memory_limit: int,
) -> AttackWindow:
    """Let the attacker go and follow it until it is done, dies or has to be killed."""
    run = Run()
    monitor.sample()
    before = monitor.memory or 0
    waited = runqueue_wait(daemon.process.pid)
    monitor.peak = before
    monitor.tracking = True
    started = time.monotonic()
    attacker.go()
    deadline = started + scale.seconds + KILL_GRACE
    stop = follow_attack(run, attacker, daemon, monitor, before, memory_limit, deadline)
    if stop is not None and stop.startswith("a kill"):
        attacker.kill()
    ended = time.monotonic()
    if run.open_window is not None:
        run.windows.append((run.open_window, ended))
    if stop is not None:
        run.attacker = {**run.progress, **run.attacker, "stopped": stop}
    if ended < started + MIN_WINDOW:
        monitor.pause(started + MIN_WINDOW - ended)
        ended = time.monotonic()
    monitor.sample()
    monitor.tracking = False
    return AttackWindow(run, started, ended, before, waited)


def follow_attack(
    run: Run,
    attacker: Child,
    daemon: volfs_mounts.Mount,
    monitor: Monitor,
    memory_before: int,
    memory_limit: int,
    deadline: float,
) -> str | None:
    """Watch until the attacker reports its result (None), or say what stopped it.

    The attacker is stopped once the daemon's memory grew ``memory_limit`` past ``memory_before``.
    """
    while True:
        run.take(attacker.received)
        if run.finished:
            return None
        if attacker.exited():
            monitor.unwatch(attacker.messages)
            run.take(attacker.received)
            return None if run.finished else "its exit without a result"
        if daemon.process.poll() is not None:
            return "the daemon's death"
        if monitor.memory is not None and monitor.memory - memory_before > memory_limit:
            return f"a kill at the memory limit (the daemon grew {memory_limit // MiB} MiB)"
        if time.monotonic() >= deadline:
            return "a kill at the time bound"
        monitor.step(deadline)


def measure_cost(
    attack: Attack,
    mount: Path,
    daemon: volfs_mounts.Mount,
    monitor: Monitor,
    window: AttackWindow,
) -> Message:
    """What the attack cost the daemon: memory, CPU wait, bytes charged; the attack's checks."""
    before = window.memory_before
    waited = runqueue_wait(daemon.process.pid) - window.runqueue_before
    record: Message = {
        "attacker": window.run.attacker,
        "duration": round(window.ended - window.started, 3),
        "memory_before_mib": round(before / MiB, 1),
        "memory_peak_mib": round(monitor.peak / MiB, 1),
        "memory_growth_mib": round((monitor.peak - before) / MiB, 1),
        "daemon_cpu_wait_ms": round(waited / 1e6, 1),
    }
    used = call(monitor, "statvfs", lambda: statvfs_used(mount), CALL_TIMEOUT)
    record["charged_mib"] = round(used["used"] / MiB, 1) if "used" in used else None
    if "used" not in used:
        record["charged_error"] = used.get("error")
    hook = attack.after
    if hook is not None:
        record["after"] = call(monitor, "after", lambda: hook(mount), CALL_TIMEOUT)
    return record


def stop_probe(probe: Child, monitor: Monitor, window: AttackWindow) -> Message:
    """Stop the probe; its latencies within the attack's windows and over the whole attack."""
    probe.finish()
    if not monitor.wait(probe.exited, time.monotonic() + PROBE_STOP_TIMEOUT):
        last = monitor.probe.last_end or window.started
        monitor.probe.add(last, time.monotonic(), errno.ETIMEDOUT)  # stuck in one round
    probe.kill()
    monitor.unwatch(probe.messages)
    whole = [(window.started, window.ended)]
    windows = window.run.windows or whole
    return {
        "probe": {
            **monitor.probe.summary(windows),
            "errors": dict(monitor.probe.errors),
            "windows": len(windows),
        },
        "probe_whole_attack": monitor.probe.summary(whole),
    }


def targets(record: Message, attack: Attack) -> dict[str, bool]:
    """Which targets the attack met: name -> met.

    Besides the memory and latency targets: the probe never failed, the daemon outlived the
    attack and exited 0 without logging an exception, the attacker ran and stopped at its
    bound by itself, and the attack's own checks.
    """
    growth = record["memory_growth_mib"] * MiB
    charged = record["charged_mib"]
    probe = record["probe"]
    daemon = record["daemon"]
    checks = {
        "memory": charged is not None and growth - charged * MiB < MEMORY_UNCHARGED,
        "p99": probe["p99_ms"] is not None and probe["p99_ms"] <= P99_TARGET_MS,
        "probe errors": not probe["errors"],
        "daemon": record["daemon_alive"]
        and daemon.get("exit_status") == 0
        and not daemon.get("logged_exception"),
    }
    stopped = record["attacker"].get("stopped")
    if stopped in ("a crash", "its exit without a result"):
        checks["attacker ran"] = False
    if stopped == "a kill at the time bound":
        checks["in time"] = False  # a request held the attacker past its bound
    if attack.checks is not None:
        checks.update(attack.checks(record["attacker"], record.get("after", {})))
    return checks


def verdict(record: Message) -> str:
    """``ok``, or ``FAIL (missed, targets)``."""
    missed = [name for name, met in record["checks"].items() if not met]
    return "FAIL (" + ", ".join(missed) + ")" if missed else "ok"


# -- report --------------------------------------------------------------------------------------


def number(value: float | None, digits: int = 1) -> str:
    """A table cell: the value with ``digits`` decimals, or a dash."""
    return "-" if value is None else f"{value:.{digits}f}"


def describe(record: Message, out: TextIO) -> None:
    """The per-attack lines."""
    print(f"== {record['attack']}: {record['summary']}", file=out)
    if "failure" in record:
        print(f"   could not run: {record['failure']}", file=out)
        print(f"   verdict: {record['verdict']}", file=out)
        return
    setup = record.get("setup") or {}
    if setup.get("entries"):
        print(f"   setup (root): {setup['entries']} entries in {setup['seconds']} s", file=out)
    attacker = dict(record["attacker"])
    unit = attacker.pop("unit", "steps")
    done = attacker.pop("done", None)
    stopped = attacker.pop("stopped", None)
    got = attacker.pop("errno", None)
    error = attacker.pop("error", None)
    why = {"count": "its count", "time": "its time bound"}.get(
        str(stopped), f"error {got}" if stopped == "error" else str(stopped)
    )
    print(
        f"   attacker (uid {NOBODY}): {done} {unit}, stopped by {why}; "
        f"{record['duration']} s in all",
        file=out,
    )
    if error and stopped != "error":
        print(f"   attacker error: {error.strip().splitlines()[-1]}", file=out)
    extra = " ".join(f"{key}={value}" for key, value in attacker.items())
    if extra:
        print(f"   {extra}", file=out)
    if record.get("after"):
        after = " ".join(f"{key}={value}" for key, value in record["after"].items())
        print(f"   root afterwards: {after}", file=out)
    print(
        f"   daemon memory {record['memory_before_mib']} -> {record['memory_peak_mib']} MiB "
        f"(+{record['memory_growth_mib']}), charged {number(record['charged_mib'])} MiB; "
        f"waited {record['daemon_cpu_wait_ms']} ms for a CPU",
        file=out,
    )
    probe = record["probe"]
    errors = "" if not probe["errors"] else f", errors {probe['errors']}"
    print(
        f"   probe (uid {PROBE_UID}, {probe['windows']} window(s)): {probe['samples']} rounds, "
        f"p50 {number(probe['p50_ms'], 2)} ms, p99 {number(probe['p99_ms'], 2)} ms, "
        f"max {number(probe['max_ms'], 2)} ms{errors}",
        file=out,
    )
    daemon = record.get("daemon", {})
    if daemon.get("exit_status") not in (0, None) or daemon.get("logged_exception"):
        print(
            f"   daemon: exit status {daemon.get('exit_status')}, "
            f"logged an exception: {daemon.get('logged_exception')}",
            file=out,
        )
    print(f"   verdict: {record['verdict']}", file=out, flush=True)


def table(records: list[Message], out: TextIO) -> None:
    """The markdown table."""
    print(
        "| attack | memory growth MiB | charged MiB | probe p50 ms | probe p99 ms | verdict |",
        file=out,
    )
    print("| --- | ---: | ---: | ---: | ---: | --- |", file=out)
    for record in records:
        probe = record.get("probe", {})
        print(
            f"| {record['attack']} | {number(record.get('memory_growth_mib'))} "
            f"| {number(record.get('charged_mib'))} | {number(probe.get('p50_ms'), 2)} "
            f"| {number(probe.get('p99_ms'), 2)} | {record['verdict']} |",
            file=out,
        )


# -- main ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen attacks; print the report (and JSON); 1 if any target was missed."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join((__doc__ or "").splitlines()[1:]),
    )
    parser.add_argument("--quick", action="store_true", help="smaller scale, 5 s per attack")
    parser.add_argument(
        "--only", action="append", choices=ATTACK_NAMES, metavar="NAME", help="repeatable"
    )
    parser.add_argument("--seconds", type=float, help="time bound per attack (20, quick 5)")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, report on stderr")
    parser.add_argument("--options", default="", help=f"mount options added to {MOUNT_OPTIONS!r}")
    parser.add_argument(
        "--memory-limit",
        type=int,
        default=2048,
        metavar="MIB",
        help="kill an attacker once the daemon grew this much (MiB, default 2048)",
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for the daemon")
    parser.add_argument("-v", "--verbose", action="store_true", help="log mounts and unmounts")
    arguments = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("abuse.py: run as root (it mounts, and runs attacks as other users)", file=sys.stderr)
        return 2
    if arguments.seconds is not None and arguments.seconds <= 0:
        parser.error("--seconds must be positive")
    scale = QUICK if arguments.quick else FULL
    if arguments.seconds is not None:
        scale = replace(
            scale, seconds=arguments.seconds, loop=min(scale.loop, arguments.seconds / 2)
        )
    options = ",".join(filter(None, [MOUNT_OPTIONS, arguments.options]))
    chosen = [a for a in ATTACKS if not arguments.only or a.name in arguments.only]
    volfs_mounts.setup_main(arguments.verbose)
    if not arguments.verbose:
        volfs_mounts.log.setLevel("WARNING")
    out = sys.stderr if arguments.json else sys.stdout

    records: list[Message] = []
    workdir = Path(tempfile.mkdtemp(prefix="volfs-abuse-"))
    try:
        workdir.chmod(0o755)  # other users reach the mountpoints through it
        for attack in chosen:
            try:
                record = run_attack(
                    attack, scale, workdir, arguments.python, options, arguments.memory_limit * MiB
                )
            except (volfs_mounts.MountError, RuntimeError, OSError) as error:
                record = {
                    "attack": attack.name,
                    "summary": attack.summary,
                    "failure": str(error),
                    "checks": {"ran": False},
                }
            record["verdict"] = verdict(record)
            records.append(record)
            describe(record, out)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        volfs_mounts.remove_workdir(workdir)

    print(file=out)
    table(records, out)
    failed = [record["attack"] for record in records if record["verdict"] != "ok"]
    if arguments.json:
        report = {
            "quick": arguments.quick,
            "scale": dataclasses.asdict(scale),
            "mount_options": options,
            "targets": {
                "memory_uncharged_mib": MEMORY_UNCHARGED // MiB,
                "p99_ms": P99_TARGET_MS,
            },
            "attacks": records,
            "failed": failed,
        }
        print(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
