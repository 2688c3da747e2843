"""Latency of pinning and unpinning volfs segments, next to today's ways of making a page
reclaimable and taking it back; and what a purge costs with many segments.

Mounts one volfs (``<python> -m volfs -f -o size=...,pressure=off``: nothing purges but this
script) and compiles scripts/bench_segments.c with ``--cc``. For every N in ``--sizes`` it
creates a sparse file of N pages, registers every page as a segment of the file's table (one
VOLFS_IOC_SEGMENT_REGISTER each: 10^5 take a few seconds), unpins them all, and times:

  C pair       volfs_segment_pin + volfs_segment_unpin (volfs.h) of a random segment each time,
               in bench_segments.c; one clock_gettime interval per pair (median, p99), then
               the same pairs in a loop with no clock read between them (loop: the mean, in
               the thread's CPU time, which time spent descheduled does not inflate)
  Python pair  Segment.pin() + Segment.unpin() (volfs.client) of a random segment each time;
               one time.perf_counter_ns interval per pair, then the loop as for C
  select       VOLFS_IOC_PURGE of one page while all N segments are unpinned, taken as is: the
               two oldest segments hold the file's only written pages, so the purge takes the
               oldest. Every round first pins and unpins every segment again, which leaves the
               candidates the daemon kept from the round before stale, so the purge drops them
               and scans the whole table anew (the worst case)
  next         a second purge of one page right after: the second oldest, from the candidates
               the daemon kept

Then once, as references (C unless said otherwise):
  ioctl pair   VOLFS_IOC_VRANGE NONVOLATILE + VOLATILE of one page, from Python (fvrange) and C
  MADV_FREE    madvise(MADV_FREE) of one page of anonymous memory, then a store into it
  PUNCH_HOLE   fallocate(PUNCH_HOLE) of one page of a kernel tmpfs file, then pwrite of it
  clock        nothing between the two clock reads: what every C sample includes
And the bulk purge: a file of ``--bulk`` bytes written and registered as segments of
``--bulk-segment`` bytes, all unpinned; the time until VOLFS_IOC_PURGE (everything) returns, and
how far the daemon's memory had fallen then.

Targets: C pair median <= 100 ns and Python pair median <= 2 us at every size, each at the
largest size within 1.5x of the smallest (flat); select median <= 10 ms at the largest size;
the bulk purge (1 GiB) returns within 1 s.

Needs fusermount3, /dev/fuse and a C compiler; PUNCH_HOLE uses /dev/shm if it is a tmpfs, else
mounts one (root only), else is left out.

Usage:
  python scripts/bench_segments.py                 # 10, 10^3, 10^5 segments; 1 GiB purge
  python scripts/bench_segments.py --quick         # the same sizes, fewer samples: ~15 s
  python scripts/bench_segments.py --json > segments.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import volfs_mounts

from volfs.abi import PAGE_SIZE, SEGMENT_PURGED, SEGMENTS_PER_FILE_MAX
from volfs.client import (
    VRANGE_NONVOLATILE,
    VRANGE_VOLATILE,
    Segment,
    SegmentTable,
    fvrange,
    purge,
    vrange_status,
)
from volfs.sizes import SizeError, parse_size, parse_sizes

log = logging.getLogger("bench_segments")

SCRIPTS = Path(__file__).resolve().parent
C_SOURCE = SCRIPTS / "bench_segments.c"
INCLUDE = SCRIPTS.parent / "volfs" / "include"
C_FLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-pedantic", "-Werror")

DEFAULT_SIZES = (10, 1000, 100_000)
MiB = 1 << 20
GiB = 1 << 30

#: Targets (see the module doc).
C_PAIR_TARGET_NS = 100.0
PYTHON_PAIR_TARGET_NS = 2000.0
FLAT_FACTOR = 1.5
SELECT_TARGET_MS = 10.0
BULK_TARGET_S = 1.0

#: Segments registered between two progress lines.
PROGRESS_CHUNK = 10_000
#: Seconds one run of the C program may take.
PROGRAM_TIMEOUT = 600.0
#: Seconds to wait for the daemon's memory to fall after the bulk purge returned.
MEMORY_TIMEOUT = 10.0
#: The share of the purged bytes the daemon's memory must have fallen by to count as given back.
MEMORY_SHARE = 0.9
#: Pages of each file written (the oldest two segments): what the select rounds purge.
SELECT_PAGES = 2
#: The fewest samples a percentile is taken of.
MIN_SAMPLES = 100


class BenchError(RuntimeError):
    """The daemon or a measurement failed; the message says why."""


@dataclass(frozen=True)
class Settings:
    sizes: list[int]
    c_pairs: int
    python_pairs: int
    ioctl_pairs: int
    reference_samples: int
    rounds: int
    bulk: int
    bulk_segment: int
    fs_size: str
    python: str
    cc: str
    seed: int
    mount_timeout: float
    workdir: Path


@dataclass(frozen=True)
class Latency:
    """Nanoseconds per operation."""

    median_ns: float
    p99_ns: float
    mean_ns: float
    samples: int
    #: Pairs only: the mean of the same operations again, with no clock read between them, in
    #: the thread's CPU time (time spent descheduled on a busy machine does not count).
    loop_ns: float | None = None

    @classmethod
    def of(cls, samples: Sequence[int], loop_ns: float | None = None) -> Latency:
        return cls(
            median_ns=statistics.median(samples),
            p99_ns=statistics.quantiles(samples, n=100, method="inclusive")[-1],
            mean_ns=statistics.fmean(samples),
            samples=len(samples),
            loop_ns=loop_ns,
        )

    @classmethod
    def parse(cls, line: str) -> Latency:
        """What bench_segments.c printed: ``median=NS p99=NS mean=NS min=NS samples=N ...``."""
        fields = dict(item.split("=", 1) for item in line.split())
        return cls(
            median_ns=float(fields["median"]),
            p99_ns=float(fields["p99"]),
            mean_ns=float(fields["mean"]),
            samples=int(fields["samples"]),
            loop_ns=float(fields["loop"]) if "loop" in fields else None,
        )


@dataclass(frozen=True)
class SizeResult:
    """What was measured on a file of ``segments`` one-page segments."""

    segments: int
    register_s: float
    c_pair: Latency
    python_pair: Latency
    select_median_ms: float
    select_max_ms: float
    next_median_ms: float


@dataclass(frozen=True)
class BulkResult:
    """The purge of every segment of a file whose data was written."""

    bytes: int
    segments: int
    purge_s: float
    purged_bytes: int
    memory_before: int
    memory_drop_at_return: int
    #: Seconds from the purge's start until the memory had fallen by MEMORY_SHARE of the purged
    #: bytes; None if it did not within MEMORY_TIMEOUT.
    memory_drop_s: float | None


@dataclass(frozen=True)
class Results:
    sizes: list[SizeResult]
    references: dict[str, Latency]
    bulk: BulkResult


# -- mounting and compiling ----------------------------------------------------------------------


def failed(mount: volfs_mounts.Mount, what: str, error: OSError) -> BenchError:
    """The error to raise when a system call on the mount failed (MountError if it died)."""
    mount.check_alive()
    return BenchError(f"{what} failed: {error}")


@contextlib.contextmanager
def mounted(settings: Settings) -> Iterator[volfs_mounts.Mount]:
    """Mount volfs on a fresh directory; always unmount it and remove the directory."""
    mountpoint = Path(tempfile.mkdtemp(prefix="mnt-volfs-", dir=settings.workdir))
    options = f"size={settings.fs_size},pressure=off"
    with volfs_mounts.mounted(
        volfs_mounts.volfs_command(mountpoint, options, settings.python),
        mountpoint,
        settings.workdir / "volfs.log",
        timeout=settings.mount_timeout,
    ) as mount:
        yield mount


def compile_program(settings: Settings) -> Path:
    """Build bench_segments.c; the binary's path."""
    binary = settings.workdir / "bench_segments"
    command = [settings.cc, *C_FLAGS, "-I", str(INCLUDE), "-o", str(binary), str(C_SOURCE)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(command)} failed:\n{result.stderr}")
    return binary


def run_program(binary: Path, *args: object) -> str:
    """Run the C program; the line it printed."""
    command = [str(binary), *map(str, args)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=PROGRAM_TIMEOUT, check=False
    )
    if result.returncode != 0:
        raise BenchError(f"{' '.join(command)} exited {result.returncode}: {result.stderr}")
    return result.stdout.strip()


@contextlib.contextmanager
def kernel_tmpfs(settings: Settings) -> Iterator[Path | None]:
    """A directory on a kernel tmpfs: /dev/shm, or one mounted for the run; None if neither."""
    shm = Path("/dev/shm")
    if volfs_mounts.mount_type(shm) == "tmpfs" and os.access(shm, os.W_OK):
        yield shm
    elif os.geteuid() == 0:
        with volfs_mounts.tmpfs(settings.workdir / "tmpfs", "16M") as path:
            yield path
    else:
        log.warning("no tmpfs to punch holes in: /dev/shm is none and mounting needs root")
        yield None


# -- measuring ---------------------------------------------------------------------------------


@contextlib.contextmanager
def segment_file(
    mount: volfs_mounts.Mount, name: str, count: int, segment_bytes: int
) -> Iterator[tuple[int, SegmentTable, list[Segment], float]]:
    """A file of ``count`` segments of ``segment_bytes``, registered and unpinned.

    Yields its descriptor, its table, the segments and the seconds registering took; closes
    the file (which ends the table) and removes it afterwards.
    """
    path = mount.path / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as error:
        raise failed(mount, f"creating {path}", error) from error
    try:
        try:
            os.ftruncate(fd, count * segment_bytes)
            table = SegmentTable(fd, count)
        except OSError as error:
            raise failed(mount, f"making {path} and its table", error) from error
        with table:
            started = time.perf_counter()
            segments = []
            try:
                for offset in range(0, count * segment_bytes, segment_bytes):
                    segments.append(table.register(offset, segment_bytes))
                    if len(segments) % PROGRESS_CHUNK == 0:
                        log.info("%s: %d/%d segments registered", name, len(segments), count)
            except OSError as error:
                raise failed(mount, f"registering segment {len(segments)}", error) from error
            register_s = time.perf_counter() - started
            for segment in segments:
                segment.unpin()
            yield fd, table, segments, register_s
    finally:
        # On a dead mount close(2) reports ENOTCONN, yet the descriptor is gone all the same.
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise BenchError(message)


def python_pairs(segments: Sequence[Segment], iterations: int, seed: int) -> Latency:
    """Time ``iterations`` pin + unpin pairs on random segments, after a tenth as warm-up."""
    rng = random.Random(seed)
    warmup = iterations // 10
    order = [segments[rng.randrange(len(segments))] for _ in range(warmup + iterations)]
    samples = [0] * (warmup + iterations)
    purged = 0
    clock = time.perf_counter_ns
    for n, segment in enumerate(order):
        start = clock()
        was_purged = segment.pin()
        segment.unpin()
        samples[n] = clock() - start
        purged += was_purged
    loop = time.thread_time_ns()
    for segment in order[warmup:]:
        purged += segment.pin()
        segment.unpin()
    loop = time.thread_time_ns() - loop
    expect(purged == 0, f"{purged} pins reported a purge nobody made")
    return Latency.of(samples[warmup:], loop / iterations)


def c_pairs(binary: Path, path: Path, count: int, iterations: int, seed: int) -> Latency:
    line = run_program(binary, "pairs", path, iterations, seed)
    fields = dict(item.split("=", 1) for item in line.split())
    expect(int(fields["segments"]) == count, f"the C program found {fields['segments']} segments")
    expect(fields["purged"] == "0", f"{fields['purged']} C pins reported a purge nobody made")
    return Latency.parse(line)


def timed_purge(mount: volfs_mounts.Mount, wanted: int) -> tuple[int, float]:
    """VOLFS_IOC_PURGE of ``wanted`` bytes: what it purged and the seconds it took."""
    started = time.perf_counter()
    try:
        purged = purge(mount.path, wanted)
    except OSError as error:
        raise failed(mount, "VOLFS_IOC_PURGE", error) from error
    return purged, time.perf_counter() - started


def select_rounds(
    mount: volfs_mounts.Mount, fd: int, segments: Sequence[Segment], rounds: int
) -> tuple[list[float], list[float]]:
    """Time one-page purges with every segment unpinned (see the module doc): the first after
    all were unpinned anew, and the next one; milliseconds each."""
    firsts: list[float] = []
    nexts: list[float] = []
    oldest = segments[:SELECT_PAGES]
    data = b"s" * PAGE_SIZE
    for _ in range(rounds):
        for segment in segments:
            segment.pin()
        for segment in oldest:
            os.pwrite(fd, data, segment.offset)  # what the previous round purged
        for segment in segments:  # the written ones first: the oldest
            segment.unpin()
        for segment, times in zip(oldest, (firsts, nexts), strict=True):
            purged, seconds = timed_purge(mount, PAGE_SIZE)
            expect(purged == PAGE_SIZE, f"a purge of one page purged {purged} bytes")
            expect(
                segment.state == SEGMENT_PURGED,
                f"after a one-page purge the oldest segment is in state {segment.state}, "
                f"not PURGED ({SEGMENT_PURGED})",
            )
            times.append(1000 * seconds)
    return firsts, nexts


def measure_size(
    mount: volfs_mounts.Mount, binary: Path, count: int, settings: Settings
) -> SizeResult:
    name = f"segments-{count}"
    with segment_file(mount, name, count, PAGE_SIZE) as (fd, _table, segments, register_s):
        log.info("%d segments: registered in %.1f s; timing pairs", count, register_s)
        try:
            c_pair = c_pairs(binary, mount.path / name, count, settings.c_pairs, settings.seed)
            python_pair = python_pairs(segments, settings.python_pairs, settings.seed)
            volatile, purged = vrange_status(fd)
            expect(
                (volatile, purged) == (count * PAGE_SIZE, 0),
                f"after the pairs: {volatile} bytes volatile and {purged} purged",
            )
            log.info("%d segments: timing %d rounds of purges", count, settings.rounds)
            firsts, nexts = select_rounds(mount, fd, segments, settings.rounds)
        except OSError as error:
            raise failed(mount, f"timing with {count} segments", error) from error
    return SizeResult(
        segments=count,
        register_s=register_s,
        c_pair=c_pair,
        python_pair=python_pair,
        select_median_ms=statistics.median(firsts),
        select_max_ms=max(firsts),
        next_median_ms=statistics.median(nexts),
    )


def python_ioctl_pairs(fd: int, iterations: int) -> Latency:
    warmup = iterations // 10
    samples = [0] * (warmup + iterations)
    clock = time.perf_counter_ns
    for n in range(warmup + iterations):
        start = clock()
        fvrange(fd, 0, PAGE_SIZE, VRANGE_NONVOLATILE)
        fvrange(fd, 0, PAGE_SIZE, VRANGE_VOLATILE)
        samples[n] = clock() - start
    return Latency.of(samples[warmup:])


def measure_references(
    mount: volfs_mounts.Mount, binary: Path, settings: Settings
) -> dict[str, Latency]:
    references = {}
    path = mount.path / "ranges"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as error:
        raise failed(mount, f"creating {path}", error) from error
    try:
        os.pwrite(fd, b"r" * PAGE_SIZE, 0)
        fvrange(fd, 0, PAGE_SIZE, VRANGE_VOLATILE)
        log.info("timing %d ioctl pairs from Python and from C", settings.ioctl_pairs)
        references["ioctl pair, Python"] = python_ioctl_pairs(fd, settings.ioctl_pairs)
        references["ioctl pair, C"] = Latency.parse(
            run_program(binary, "ioctl", path, settings.ioctl_pairs)
        )
    except OSError as error:
        raise failed(mount, "the ioctl pairs", error) from error
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    samples = settings.reference_samples
    references["MADV_FREE + store"] = Latency.parse(run_program(binary, "madvise", samples))
    with kernel_tmpfs(settings) as directory:
        if directory is not None:
            target = directory / f"bench_segments-{os.getpid()}"
            references["PUNCH_HOLE + pwrite"] = Latency.parse(
                run_program(binary, "punch", target, samples)
            )
    references["clock"] = Latency.parse(run_program(binary, "clock", samples))
    return references


def wait_for_memory(mount: volfs_mounts.Mount, below: int, started: float) -> float | None:
    """Seconds from ``started`` until the daemon's memory fell below ``below``; None on timeout."""
    deadline = time.perf_counter() + MEMORY_TIMEOUT
    while mount.memory_bytes() >= below:
        if time.perf_counter() > deadline:
            return None
        time.sleep(volfs_mounts.POLL_INTERVAL / 10)
    return time.perf_counter() - started


def measure_bulk(mount: volfs_mounts.Mount, settings: Settings) -> BulkResult:
    size, segment_bytes = settings.bulk, settings.bulk_segment
    count = size // segment_bytes
    block = os.urandom(MiB)
    log.info("bulk: %d MiB in %d segments of %d KiB", size >> 20, count, segment_bytes >> 10)
    with segment_file(mount, "bulk", count, segment_bytes) as (fd, _table, _segments, _s):
        try:
            for offset in range(0, size, MiB):
                os.pwrite(fd, block[: min(MiB, size - offset)], offset)
        except OSError as error:
            raise failed(mount, "writing the bulk file", error) from error
        memory_before = mount.memory_bytes()
        started = time.perf_counter()
        purged, purge_s = timed_purge(mount, 0)
        memory_at_return = mount.memory_bytes()
        memory_drop_s = wait_for_memory(mount, memory_before - int(MEMORY_SHARE * purged), started)
        expect(purged == size, f"the bulk purge freed {purged} bytes of {size}")
        expect(vrange_status(fd) == (size, size), "the bulk file is not all purged")
    return BulkResult(
        bytes=size,
        segments=count,
        purge_s=purge_s,
        purged_bytes=purged,
        memory_before=memory_before,
        memory_drop_at_return=memory_before - memory_at_return,
        memory_drop_s=memory_drop_s,
    )


def benchmark(settings: Settings) -> Results:
    binary = compile_program(settings)
    sizes = []
    with mounted(settings) as mount:
        for count in settings.sizes:
            result = measure_size(mount, binary, count, settings)
            log.info(
                "%d segments: C pair %.0f ns, Python pair %.0f ns, select %.2f ms",
                count,
                result.c_pair.median_ns,
                result.python_pair.median_ns,
                result.select_median_ms,
            )
            sizes.append(result)
        references = measure_references(mount, binary, settings)
        bulk = measure_bulk(mount, settings)
        mount.check_alive()
    return Results(sizes, references, bulk)


# -- reporting ---------------------------------------------------------------------------------


def power_of_ten(count: int) -> str:
    exponent = len(str(count)) - 1
    return f"10^{exponent}" if count == 10**exponent and exponent > 1 else str(count)


def render_rows(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def render_sizes(results: Sequence[SizeResult]) -> str:
    rows = [
        [
            "segments",
            "C pair median ns",
            "C p99 ns",
            "C loop ns",
            "Python pair median ns",
            "Python p99 ns",
            "Python loop ns",
            "select median ms",
            "select max ms",
            "next median ms",
            "register s",
        ]
    ]
    for r in results:
        rows.append(
            [
                power_of_ten(r.segments),
                f"{r.c_pair.median_ns:.0f}",
                f"{r.c_pair.p99_ns:.0f}",
                f"{r.c_pair.loop_ns or 0:.1f}",
                f"{r.python_pair.median_ns:.0f}",
                f"{r.python_pair.p99_ns:.0f}",
                f"{r.python_pair.loop_ns or 0:.0f}",
                f"{r.select_median_ms:.2f}",
                f"{r.select_max_ms:.2f}",
                f"{r.next_median_ms:.2f}",
                f"{r.register_s:.2f}",
            ]
        )
    return render_rows(rows)


def render_references(results: Results) -> str:
    smallest = min(results.sizes, key=lambda r: r.segments)
    rows = [["one page", "median ns", "p99 ns", "median / C pair"]]
    for name, latency in results.references.items():
        rows.append(
            [
                name,
                f"{latency.median_ns:.0f}",
                f"{latency.p99_ns:.0f}",
                f"{latency.median_ns / smallest.c_pair.median_ns:.1f}x",
            ]
        )
    return render_rows(rows)


@dataclass(frozen=True)
class Verdicts:
    c_pair: bool
    python_pair: bool
    c_flat: float
    python_flat: float
    select: bool
    bulk: bool


def verdicts(results: Results) -> Verdicts:
    small = min(results.sizes, key=lambda r: r.segments)
    large = max(results.sizes, key=lambda r: r.segments)
    return Verdicts(
        c_pair=all(r.c_pair.median_ns <= C_PAIR_TARGET_NS for r in results.sizes),
        python_pair=all(r.python_pair.median_ns <= PYTHON_PAIR_TARGET_NS for r in results.sizes),
        c_flat=large.c_pair.median_ns / small.c_pair.median_ns,
        python_flat=large.python_pair.median_ns / small.python_pair.median_ns,
        select=large.select_median_ms <= SELECT_TARGET_MS,
        bulk=results.bulk.purge_s <= BULK_TARGET_S,
    )


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def render_report(results: Results, settings: Settings) -> str:
    bulk = results.bulk
    large = max(results.sizes, key=lambda r: r.segments)
    small = min(results.sizes, key=lambda r: r.segments)
    check = verdicts(results)
    drop = "not within 10 s" if bulk.memory_drop_s is None else f"{bulk.memory_drop_s:.3f} s"
    lines = [
        f"# volfs segments: {settings.c_pairs} C and {settings.python_pairs} Python pairs per "
        f"size, {settings.rounds} purge rounds; latencies in ns, purges in ms",
        f"# {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs, "
        f"daemon {settings.python}, {settings.cc}",
        "# every C sample includes one clock read (see 'clock'); loop: CPU time per pair of the "
        "same pairs with no clock read between them",
        "# select: one-page purge with every segment unpinned, after a re-unpin of all; next: "
        "the purge after it",
        "",
        render_sizes(results.sizes),
        "",
        render_references(results),
        "",
        f"bulk purge: {bulk.bytes >> 20} MiB in {bulk.segments} segments of "
        f"{(bulk.bytes // bulk.segments) >> 10} KiB: VOLFS_IOC_PURGE returned after "
        f"{bulk.purge_s:.3f} s ({bulk.purged_bytes / MiB / bulk.purge_s:.0f} MiB/s); daemon "
        f"memory {bulk.memory_before >> 20} MiB before, {bulk.memory_drop_at_return >> 20} MiB "
        f"less at the return, {MEMORY_SHARE:.0%} of the purge given back after {drop}",
        "",
        f"target: C pair median <= {C_PAIR_TARGET_NS:.0f} ns at every size: "
        f"{verdict(check.c_pair)}",
        f"target: Python pair median <= {PYTHON_PAIR_TARGET_NS:.0f} ns at every size: "
        f"{verdict(check.python_pair)}",
        *(
            f"target: {language} pair median at {power_of_ten(large.segments)} within "
            f"{FLAT_FACTOR:g}x of the one at {power_of_ten(small.segments)} ({ratio:.2f}x): "
            f"{verdict(ratio <= FLAT_FACTOR)}"
            for language, ratio in (("C", check.c_flat), ("Python", check.python_flat))
        ),
        f"target: select median at {power_of_ten(large.segments)} ({large.select_median_ms:.2f}"
        f" ms) <= {SELECT_TARGET_MS:g} ms: {verdict(check.select)}",
        f"target: {bulk.bytes >> 20} MiB purged ({bulk.purge_s:.3f} s) within "
        f"{BULK_TARGET_S:g} s: {verdict(check.bulk)}",
    ]
    return "\n".join(lines)


def report_json(results: Results, settings: Settings) -> dict[str, Any]:
    check = verdicts(results)
    return {
        "config": {
            **{key: value for key, value in asdict(settings).items() if key != "workdir"},
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
        },
        "unit": "ns (latencies), ms (select), s (bulk)",
        "sizes": [asdict(r) for r in results.sizes],
        "references": {name: asdict(latency) for name, latency in results.references.items()},
        "bulk": asdict(results.bulk),
        "targets": {
            "c_pair_ns": C_PAIR_TARGET_NS,
            "python_pair_ns": PYTHON_PAIR_TARGET_NS,
            "flat_factor": FLAT_FACTOR,
            "select_ms": SELECT_TARGET_MS,
            "bulk_s": BULK_TARGET_S,
            **asdict(check),
        },
    }


# -- main --------------------------------------------------------------------------------------


def segment_counts(text: str) -> list[int]:
    """Parse ``--sizes``: segment counts such as ``10,1000,100_000`` (k = 1024)."""
    try:
        counts = parse_sizes(text)
    except SizeError:
        counts = []
    if not counts or min(counts) < SELECT_PAGES or max(counts) > SEGMENTS_PER_FILE_MAX:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of segment counts from {SELECT_PAGES} to "
            f"{SEGMENTS_PER_FILE_MAX}, got {text!r}"
        )
    return counts


def byte_size(text: str) -> int:
    """Parse a size such as ``1G`` or ``64K``: a positive multiple of the page size."""
    try:
        size = parse_size(text)
    except SizeError:
        size = 0
    if size <= 0 or size % PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"expected a size in whole pages, got {text!r}")
    return size


#: Samples and rounds: (default, --quick).
SAMPLES = {
    "c_pairs": (1_000_000, 100_000),
    "python_pairs": (200_000, 20_000),
    "ioctl_pairs": (2000, 200),
    "reference_samples": (100_000, 10_000),
    "rounds": (10, 3),
    "bulk": (GiB, 256 * MiB),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    assert __doc__ is not None
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sizes",
        type=segment_counts,
        default=list(DEFAULT_SIZES),
        help=f"comma-separated segments per file (default: {','.join(map(str, DEFAULT_SIZES))})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer samples and rounds and a 256 MiB bulk purge, for a run of ~15 s",
    )
    for name, (default, quick) in SAMPLES.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=byte_size if name == "bulk" else int,
            default=None,
            help=f"default {default}, {quick} with --quick",
        )
    parser.add_argument(
        "--bulk-segment",
        type=byte_size,
        default=64 * 1024,
        help="segment size of the bulk purge (default: 64K)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="python for the volfs daemon (default: this interpreter)",
    )
    parser.add_argument("--cc", default="cc", help="C compiler (default: %(default)s)")
    parser.add_argument("--fs-size", default="4G", help="size= mount option (default: %(default)s)")
    parser.add_argument(
        "--mount-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for the daemon to mount (default: %(default)s)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print results as JSON instead of the tables"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    for name, (default, quick) in SAMPLES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    if min(args.c_pairs, args.python_pairs, args.reference_samples) < MIN_SAMPLES:
        parser.error(f"every count of samples must be at least {MIN_SAMPLES}")
    if min(args.ioctl_pairs, args.rounds) < 1:
        parser.error("--ioctl-pairs and --rounds must be at least 1")
    if args.bulk < args.bulk_segment or args.bulk % args.bulk_segment:
        parser.error("--bulk must be a multiple of --bulk-segment")
    if args.bulk // args.bulk_segment > SEGMENTS_PER_FILE_MAX:
        parser.error(f"--bulk makes more than {SEGMENTS_PER_FILE_MAX} segments")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    volfs_mounts.setup_main(args.verbose)
    for tool in ("fusermount3", args.cc):
        if not shutil.which(tool):
            log.error("%s not found", tool)
            return 1
    workdir = Path(tempfile.mkdtemp(prefix="bench_segments-"))
    settings = Settings(
        sizes=args.sizes,
        c_pairs=args.c_pairs,
        python_pairs=args.python_pairs,
        ioctl_pairs=args.ioctl_pairs,
        reference_samples=args.reference_samples,
        rounds=args.rounds,
        bulk=args.bulk,
        bulk_segment=args.bulk_segment,
        fs_size=args.fs_size,
        python=args.python,
        cc=args.cc,
        seed=args.seed,
        mount_timeout=args.mount_timeout,
        workdir=workdir,
    )
    try:
        results = benchmark(settings)
    except (BenchError, volfs_mounts.MountError) as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    finally:
        volfs_mounts.remove_workdir(workdir)

    if args.json:
        json.dump(report_json(results, settings), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render_report(results, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
