"""Latency of volatile-range ioctls on files holding many ranges, next to a FUSE round trip.

Mounts one volfs (``<python> -m volfs -f -o size=4G,max_ranges=...`` with the bounds on
range records raised to the largest N) and, for every size N in
``--sizes``, creates a sparse file of 2N pages, marks N disjoint one-page ranges volatile in it
(range i is page 2i, FULL) and then times ``--pairs`` VOLATILE + NON_VOLATILE ioctl pairs on
one odd page in the middle of the set (a page no range holds, so the pair adds one range and
removes it again: adjacent ranges are not merged).

Each timed round is, in this order:
  pair      VOLFS_IOC_VRANGE VOLATILE then NON_VOLATILE on the middle page (mark, unmark)
  status    VOLFS_IOC_VRANGE_STATUS on the one page of a second file that holds no ranges
  no-op     an ioctl number volfs does not know (_IOWR('v', 0x90, 8 bytes)), which the daemon
            answers ENOTTY: the pure FUSE round trip
Interleaving keeps the reference round trips under the same conditions as the pairs. fstat is
no round trip here (the kernel caches attributes for a second). Every latency is one
``time.perf_counter_ns`` interval around one system call; ``--warmup`` rounds are discarded.

Targets: the mark and the unmark medians are each at most 2x the no-op round
trip at every size, and the pair median at the largest size is at most 2x the one at the
smallest (10^6 against 10^2 by default).

Needs fusermount3 and /dev/fuse.

Usage:
  python scripts/bench_vrange.py                               # 10^2, 10^4 and 10^6 ranges
  python scripts/bench_vrange.py --sizes 100,10000 --pairs 500 # quick
  python scripts/bench_vrange.py --json > vrange.json
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import volfs_mounts

from volfs.abi import (
    PAGE_SIZE,
    VOLFS_IOC_PURGE,
    VOLFS_IOC_VRANGE,
    VOLFS_IOC_VRANGE_STATUS,
    VRANGE_ARGS,
    VRANGE_FULL,
    VRANGE_NONVOLATILE,
    VRANGE_STATUS,
    VRANGE_VOLATILE,
)
from volfs.client import fvrange, vrange_status
from volfs.sizes import SizeError, parse_sizes

log = logging.getLogger("bench_vrange")

DEFAULT_SIZES = (100, 10_000, 1_000_000)
#: Both latencies of a pair, and of the scaling check, may be this many times the reference.
TARGET_FACTOR = 2.0
#: Ranges marked between two looks at the clock while populating.
POPULATE_CHUNK = 4096
#: The fewest timed pairs: the p90 (statistics.quantiles) needs two samples.
MIN_PAIRS = 2
#: Seconds between two progress lines while populating.
PROGRESS_INTERVAL = 5.0

#: The ``start`` field of struct vrange_args, rewritten in place while populating.
_START_FIELD = struct.Struct("=Q")


def _iowr(kind: str, number: int, size: int) -> int:
    """Linux _IOWR(kind, number, size)."""
    return (3 << 30) | (size << 16) | (ord(kind) << 8) | number


#: An ioctl volfs does not define: the daemon answers ENOTTY without looking at anything.
NOOP_IOCTL = _iowr("v", 0x90, 8)
assert NOOP_IOCTL not in (VOLFS_IOC_VRANGE, VOLFS_IOC_VRANGE_STATUS, VOLFS_IOC_PURGE)


class BenchError(RuntimeError):
    """The daemon or a measurement failed; the message says why."""


@dataclass(frozen=True)
class Settings:
    sizes: list[int]
    pairs: int
    warmup: int
    fs_size: str
    python: str
    mount_timeout: float
    workdir: Path


@dataclass(frozen=True)
class SizeResult:
    """Latencies (microseconds) measured on a file holding ``ranges`` volatile ranges."""

    ranges: int
    populate_s: float
    pair_median: float
    pair_p90: float
    mark_median: float
    unmark_median: float
    noop_median: float
    status_median: float

    @property
    def ratio(self) -> float:
        """Pair median over two no-op round trips."""
        return self.pair_median / (2 * self.noop_median)

    @property
    def status_ratio(self) -> float:
        """Pair median over two status round trips."""
        return self.pair_median / (2 * self.status_median)

    @property
    def meets_target(self) -> bool:
        """Mark and unmark medians each within TARGET_FACTOR of the no-op round trip."""
        limit = TARGET_FACTOR * self.noop_median
        return self.mark_median <= limit and self.unmark_median <= limit


# -- mounting ----------------------------------------------------------------------------------


def failed(mount: volfs_mounts.Mount, what: str, error: OSError) -> BenchError:
    """The error to raise when a system call on the mount failed (MountError if it died)."""
    mount.check_alive()
    return BenchError(f"{what} failed: {error}")


@contextlib.contextmanager
def mounted(settings: Settings) -> Iterator[volfs_mounts.Mount]:
    """Mount volfs on a fresh directory; always unmount it and remove the directory."""
    mountpoint = Path(tempfile.mkdtemp(prefix="mnt-volfs-", dir=settings.workdir))
    # The bounds on range records must hold the largest set, and the pair's extra range.
    records = max(settings.sizes) + 16
    options = f"size={settings.fs_size},max_ranges={records},max_file_ranges={records}"
    with volfs_mounts.mounted(
        volfs_mounts.volfs_command(mountpoint, options, settings.python),
        mountpoint,
        settings.workdir / "volfs.log",
        timeout=settings.mount_timeout,
    ) as mount:
        yield mount


@contextlib.contextmanager
def open_file(mount: volfs_mounts.Mount, name: str, pages: int) -> Iterator[int]:
    """Create a sparse file of ``pages`` pages; close and remove it afterwards."""
    path = mount.path / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as error:
        raise failed(mount, f"creating {path}", error) from error
    try:
        try:
            os.ftruncate(fd, pages * PAGE_SIZE)
        except OSError as error:
            raise failed(mount, f"ftruncate {path} to {pages} pages", error) from error
        yield fd
    finally:
        # On a dead mount close(2) reports ENOTCONN, yet the descriptor is gone all the same.
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()


# -- measuring ---------------------------------------------------------------------------------


def populate(mount: volfs_mounts.Mount, fd: int, count: int) -> float:
    """Mark pages 0, 2, 4, ... 2(count-1) volatile, one range each; return the seconds taken."""
    buffer = bytearray(VRANGE_ARGS.pack(0, PAGE_SIZE, VRANGE_VOLATILE, VRANGE_FULL, 0, 0, 0))
    set_start = _START_FIELD.pack_into
    ioctl = fcntl.ioctl
    request = VOLFS_IOC_VRANGE
    step = 2 * PAGE_SIZE
    done = 0
    started = last_report = time.perf_counter()
    try:
        while done < count:
            chunk_end = min(count, done + POPULATE_CHUNK)
            for offset in range(done * step, chunk_end * step, step):
                set_start(buffer, 0, offset)
                ioctl(fd, request, buffer, True)
            done = chunk_end
            now = time.perf_counter()
            if now - last_report >= PROGRESS_INTERVAL and done < count:
                last_report = now
                rate = done / (now - started)
                log.info(
                    "populating: %d/%d ranges (%.0f%%), %.1f us each, %.0f s to go",
                    done,
                    count,
                    100 * done / count,
                    1e6 / rate,
                    (count - done) / rate,
                )
    except OSError as error:
        raise failed(mount, f"marking range {done + 1} of {count} volatile", error) from error
    return time.perf_counter() - started


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise BenchError(message)


def check_ranges(fd: int, count: int, page: int) -> None:
    """The file holds ``count`` volatile pages, none of them ``page``."""
    volatile, purged = vrange_status(fd)
    expect(
        (volatile, purged) == (count * PAGE_SIZE, 0),
        f"expected {count} volatile pages and none purged, "
        f"found {volatile // PAGE_SIZE} volatile and {purged // PAGE_SIZE} purged",
    )
    expect(
        vrange_status(fd, page * PAGE_SIZE, PAGE_SIZE) == (0, 0),
        f"page {page} should not be volatile",
    )


def check_pair(fd: int, count: int, page: int) -> None:
    """One pair through the client API does what the timed ones are assumed to do."""
    marked = fvrange(fd, page * PAGE_SIZE, PAGE_SIZE, VRANGE_VOLATILE)
    expect(marked == (PAGE_SIZE, False), f"marking page {page} returned {marked}")
    volatile, _purged = vrange_status(fd)
    expect(
        volatile == (count + 1) * PAGE_SIZE,
        f"after marking page {page}: {volatile // PAGE_SIZE} volatile pages, not {count + 1}",
    )
    unmarked = fvrange(fd, page * PAGE_SIZE, PAGE_SIZE, VRANGE_NONVOLATILE)
    expect(unmarked == (PAGE_SIZE, False), f"unmarking page {page} returned {unmarked}")


def check_references(fd: int) -> None:
    """The status ioctl answers and the no-op ioctl fails with ENOTTY (so it reached volfs)."""
    expect(vrange_status(fd, 0, PAGE_SIZE) == (0, 0), "the reference file holds ranges")
    try:
        fcntl.ioctl(fd, NOOP_IOCTL, bytearray(8), True)
    except OSError as error:
        expect(error.errno == errno.ENOTTY, f"the no-op ioctl failed with {error}, not ENOTTY")
    else:
        raise BenchError(f"ioctl {NOOP_IOCTL:#x} succeeded: it is no no-op")


@dataclass
class Samples:
    """Nanoseconds per call, one entry per timed round."""

    mark: list[int]
    unmark: list[int]
    status: list[int]
    noop: list[int]


def time_rounds(fd: int, ref_fd: int, page: int, rounds: int) -> Samples:
    """Time ``rounds`` rounds of mark, unmark, status and no-op ioctls (see the module doc)."""
    mark = bytearray(VRANGE_ARGS.pack(page * PAGE_SIZE, PAGE_SIZE, VRANGE_VOLATILE, 0, 0, 0, 0))
    unmark = bytearray(
        VRANGE_ARGS.pack(page * PAGE_SIZE, PAGE_SIZE, VRANGE_NONVOLATILE, 0, 0, 0, 0)
    )
    status = bytearray(VRANGE_STATUS.pack(0, PAGE_SIZE, 0, 0))
    noop = bytearray(8)
    samples = Samples([0] * rounds, [0] * rounds, [0] * rounds, [0] * rounds)
    marks, unmarks, statuses, noops = samples.mark, samples.unmark, samples.status, samples.noop
    clock = time.perf_counter_ns
    ioctl = fcntl.ioctl
    vrange_request = VOLFS_IOC_VRANGE
    status_request = VOLFS_IOC_VRANGE_STATUS
    noop_request = NOOP_IOCTL
    enotty = errno.ENOTTY
    for i in range(rounds):
        t0 = clock()
        ioctl(fd, vrange_request, mark, True)
        t1 = clock()
        ioctl(fd, vrange_request, unmark, True)
        t2 = clock()
        ioctl(ref_fd, status_request, status, True)
        t3 = clock()
        try:
            ioctl(ref_fd, noop_request, noop, True)
        except OSError as error:
            t4 = clock()
            if error.errno != enotty:
                raise
        else:
            raise BenchError(f"ioctl {noop_request:#x} succeeded: it is no no-op")
        marks[i] = t1 - t0
        unmarks[i] = t2 - t1
        statuses[i] = t3 - t2
        noops[i] = t4 - t3
    return samples


def median_us(values: Sequence[int]) -> float:
    return statistics.median(values) / 1000


def p90_us(values: Sequence[int]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1] / 1000


def measure_size(
    mount: volfs_mounts.Mount, ref_fd: int, count: int, settings: Settings
) -> SizeResult:
    """Populate a file with ``count`` ranges and time the rounds on it."""
    page = 2 * (count // 2) + 1
    with open_file(mount, f"ranges-{count}", 2 * count) as fd:
        log.info("%d ranges: populating", count)
        populate_s = populate(mount, fd, count)
        log.info(
            "%d ranges: populated in %.1f s (%.1f us per range); timing %d pairs",
            count,
            populate_s,
            1e6 * populate_s / count,
            settings.pairs,
        )
        try:
            check_ranges(fd, count, page)
            check_pair(fd, count, page)
            time_rounds(fd, ref_fd, page, settings.warmup)
            samples = time_rounds(fd, ref_fd, page, settings.pairs)
            check_ranges(fd, count, page)
        except OSError as error:
            raise failed(mount, f"timing with {count} ranges", error) from error
        log.info("%d ranges: closing the file (drops its ranges)", count)
    pairs = [m + u for m, u in zip(samples.mark, samples.unmark, strict=True)]
    return SizeResult(
        ranges=count,
        populate_s=populate_s,
        pair_median=median_us(pairs),
        pair_p90=p90_us(pairs),
        mark_median=median_us(samples.mark),
        unmark_median=median_us(samples.unmark),
        noop_median=median_us(samples.noop),
        status_median=median_us(samples.status),
    )


def benchmark(settings: Settings) -> list[SizeResult]:
    results = []
    with mounted(settings) as mount, open_file(mount, "reference", 1) as ref_fd:
        try:
            check_references(ref_fd)
        except OSError as error:
            raise failed(mount, "the reference ioctls", error) from error
        for count in settings.sizes:
            result = measure_size(mount, ref_fd, count, settings)
            log.info(
                "%d ranges: pair %.1f us, mark %.1f us, unmark %.1f us, no-op %.1f us",
                count,
                result.pair_median,
                result.mark_median,
                result.unmark_median,
                result.noop_median,
            )
            results.append(result)
        mount.check_alive()
    return results


# -- reporting ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scaling:
    """The pair median at the largest size against the one at the smallest."""

    small: int
    large: int
    ratio: float

    @property
    def met(self) -> bool:
        return self.ratio <= TARGET_FACTOR


def scaling(results: Sequence[SizeResult]) -> Scaling | None:
    if not results:
        return None
    small = min(results, key=lambda r: r.ranges)
    large = max(results, key=lambda r: r.ranges)
    if small.ranges == large.ranges:
        return None
    return Scaling(small.ranges, large.ranges, large.pair_median / small.pair_median)


def power_of_ten(count: int) -> str:
    exponent = len(str(count)) - 1
    return f"10^{exponent}" if count == 10**exponent and exponent > 1 else str(count)


def render_table(results: Sequence[SizeResult]) -> str:
    header = [
        "ranges in file",
        "pair median us",
        "pair p90 us",
        "mark median us",
        "unmark median us",
        "no-op median us",
        "status median us",
        "pair / (2 x no-op)",
        "populate s",
    ]
    rows = [header]
    for r in results:
        rows.append(
            [
                power_of_ten(r.ranges),
                f"{r.pair_median:.1f}",
                f"{r.pair_p90:.1f}",
                f"{r.mark_median:.1f}",
                f"{r.unmark_median:.1f}",
                f"{r.noop_median:.1f}",
                f"{r.status_median:.1f}",
                f"{r.ratio:.2f}",
                f"{r.populate_s:.2f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def render_report(results: Sequence[SizeResult], settings: Settings) -> str:
    lines = [
        f"# volfs volatile-range ioctls: {settings.pairs} timed pairs per size "
        f"({settings.warmup} warm-up), medians in microseconds",
        f"# {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs, "
        f"daemon {settings.python}",
        "# no-op: unknown ioctl answered ENOTTY by the daemon; status: VRANGE_STATUS on an "
        "empty span",
        "",
        render_table(results),
        "",
    ]
    for r in results:
        lines.append(
            f"target: mark ({r.mark_median:.1f}) and unmark ({r.unmark_median:.1f}) median "
            f"<= {TARGET_FACTOR:g} x no-op ({TARGET_FACTOR * r.noop_median:.1f}) "
            f"at {power_of_ten(r.ranges)} ranges: {verdict(r.meets_target)}"
        )
    check = scaling(results)
    if check is not None:
        lines.append(
            f"target: pair median at {power_of_ten(check.large)} ranges within "
            f"{TARGET_FACTOR:g} x of the one at {power_of_ten(check.small)} "
            f"(ratio {check.ratio:.2f}): {verdict(check.met)}"
        )
    return "\n".join(lines)


def report_json(results: Sequence[SizeResult], settings: Settings) -> dict[str, Any]:
    check = scaling(results)
    return {
        "config": {
            "sizes": settings.sizes,
            "pairs": settings.pairs,
            "warmup": settings.warmup,
            "fs_size": settings.fs_size,
            "python": settings.python,
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
        },
        "unit": "us",
        "results": [
            {
                **{key: round(value, 3) for key, value in asdict(r).items()},
                "pair_over_2_noop": round(r.ratio, 3),
                "pair_over_2_status": round(r.status_ratio, 3),
                "target_met": r.meets_target,
            }
            for r in results
        ],
        "targets": {
            "factor": TARGET_FACTOR,
            "ioctl_vs_noop": all(r.meets_target for r in results),
            "scaling": None
            if check is None
            else {
                "small": check.small,
                "large": check.large,
                "ratio": round(check.ratio, 3),
                "met": check.met,
            },
        },
    }


# -- main --------------------------------------------------------------------------------------


def range_counts(text: str) -> list[int]:
    """Parse ``--sizes``: numbers of ranges such as ``100,10_000,64k`` (k = 1024), all above 0."""
    try:
        counts = parse_sizes(text)
    except SizeError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of positive range counts, got {text!r}"
        )
    return counts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    assert __doc__ is not None
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sizes",
        type=range_counts,
        default=list(DEFAULT_SIZES),
        help="comma-separated numbers of volatile ranges in the file "
        f"(default: {','.join(map(str, DEFAULT_SIZES))})",
    )
    parser.add_argument(
        "--pairs", type=int, default=2000, help="timed pairs per size (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=200,
        help="untimed rounds before the timed ones (default: %(default)s)",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="python for the volfs daemon (default: this interpreter)",
    )
    parser.add_argument("--fs-size", default="4G", help="size= mount option (default: %(default)s)")
    parser.add_argument(
        "--mount-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for the daemon to mount (default: %(default)s)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print results as JSON instead of the table"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.pairs < MIN_PAIRS or args.warmup < 0:
        parser.error(f"--pairs must be at least {MIN_PAIRS} and --warmup not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    volfs_mounts.setup_main(args.verbose)
    if not shutil.which("fusermount3"):
        log.error("fusermount3 not found")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="bench_vrange-"))
    settings = Settings(
        sizes=args.sizes,
        pairs=args.pairs,
        warmup=args.warmup,
        fs_size=args.fs_size,
        python=args.python,
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
