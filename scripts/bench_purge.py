"""How fast volfs gives memory back: from a pressure signal to the daemon's RSS having dropped.

Mounts a volfs whose pressure source is a FIFO this script owns, fills a file with volatile data
(``--size``, in ranges of ``--range``), then writes one byte to the FIFO — what a PSI trigger
or systemd's memory-pressure socket does — and polls the daemon's RSS until the data's memory
is gone. It reports that time and the throughput, then does the same through VOLFS_IOC_PURGE.

Usage:
  python scripts/bench_purge.py                      # 1 GiB in 1 MiB ranges
  python scripts/bench_purge.py --size 4G --range 64M
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import volfs_mounts

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from volfs.client import VRANGE_VOLATILE, fvrange, purge  # noqa: E402
from volfs.daemon.options import parse_size  # noqa: E402

MiB = 1 << 20


@contextlib.contextmanager
def volfs_with_fifo(python: str, cap: int, batch: int) -> Iterator[tuple[Path, Path, int]]:
    """Mount a volfs watching a FIFO for pressure; yield (mountpoint, fifo, daemon pid)."""
    with tempfile.TemporaryDirectory(prefix="bench_purge-") as workdir:
        mountpoint, fifo = Path(workdir, "mnt"), Path(workdir, "pressure")
        mountpoint.mkdir()
        os.mkfifo(fifo)
        options = f"size={cap},pressure_batch={batch},pressure_watermark=0"
        with volfs_mounts.mounted(
            volfs_mounts.volfs_command(mountpoint, options, python),
            mountpoint,
            Path(workdir, "volfs.log"),
            env={"MEMORY_PRESSURE_WATCH": str(fifo)},
        ) as daemon:
            yield mountpoint, fifo, daemon.process.pid


def fill_volatile(path: Path, size: int, range_size: int) -> int:
    """Write ``size`` bytes and mark them volatile in ranges; return the open descriptor."""
    block = os.urandom(MiB)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    for offset in range(0, size, MiB):
        os.pwrite(fd, block, offset)
    for offset in range(0, size, range_size):
        fvrange(fd, offset, min(range_size, size - offset), VRANGE_VOLATILE)
    return fd


def wait_for_drop(pid: int, baseline: int, amount: int, timeout: float = 60.0) -> float:
    """Poll RSS until it fell ``amount`` below ``baseline``; return when (monotonic)."""
    deadline = time.monotonic() + timeout
    while volfs_mounts.rss_bytes(pid) > baseline - amount:
        if time.monotonic() > deadline:
            raise RuntimeError("memory did not come back in time")
        time.sleep(0.001)
    return time.monotonic()


def measure(python: str, size: int, range_size: int, via: str) -> dict[str, float]:
    """One run: fill, signal (FIFO or ioctl), time the RSS drop."""
    with volfs_with_fifo(python, 2 * size, 2 * size) as (mountpoint, fifo, pid):
        fd = fill_volatile(mountpoint / "cache", size, range_size)
        try:
            baseline = volfs_mounts.rss_bytes(pid)
            start = time.monotonic()
            if via == "pressure":
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.write(writer, b"!")
                os.close(writer)
            else:
                purge(mountpoint)
            answered = time.monotonic()
            done = wait_for_drop(pid, baseline, int(size * 0.98))
        finally:
            os.close(fd)
    return {
        "seconds": done - start,
        "answered_seconds": answered - start,
        "gib_per_second": size / (1 << 30) / (done - start),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="volatile data to purge (default 1G)")
    parser.add_argument("--range", default="1M", help="size of each volatile range (1M)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method (median)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the daemon")
    parser.add_argument("--json", action="store_true", help="print JSON")
    arguments = parser.parse_args(argv)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    size = parse_size(arguments.size, memory=memory)
    range_size = parse_size(arguments.range, memory=memory)
    results: dict[str, dict[str, float]] = {}
    for via in ("pressure", "ioctl"):
        runs = [measure(arguments.python, size, range_size, via) for _ in range(arguments.repeat)]
        runs.sort(key=lambda run: run["seconds"])
        results[via] = runs[len(runs) // 2]
    if arguments.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"# {size / (1 << 30):.2f} GiB volatile in {range_size // MiB} MiB ranges, median")
    print(f"{'signal':10} {'to RSS drop s':>14} {'GiB/s':>8}")
    for via, result in results.items():
        print(f"{via:10} {result['seconds']:14.3f} {result['gib_per_second']:8.2f}")
    target = results["pressure"]["seconds"] <= 1.0
    print(f"target: 1 GiB purged and returned within 1 s: {'met' if target else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
