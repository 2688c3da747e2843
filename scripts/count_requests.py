"""FUSE requests per operation: how many round trips each of bench_io.py's small jobs costs.

Mounts volfs (or the pyfuse3 ceiling, ``--target ceiling``) with ``-d``, whose libfuse trace
names every request the kernel sends, runs each job's operation ``--ops`` times and divides the
requests the trace shows by the operations:

  randwrite  pwrite(2) of 4 KiB at a random page of a 16 MiB file
  randread   pread(2) of 4 KiB at a random page, the page cache dropped first (fadvise)
  mmap       a 4 KiB read or store at a random page of a MAP_SHARED mapping, then msync
  metadata   open(O_CREAT|O_WRONLY) + close, stat, unlink of a new name

Usage:
  python scripts/count_requests.py                  # volfs, 2000 operations a job
  python scripts/count_requests.py --target ceiling --ops 500
"""

from __future__ import annotations

import argparse
import collections
import mmap
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import volfs_mounts

PAGE = 4096
FILE_SIZE = 16 << 20
CEILING_SCRIPT = Path(__file__).resolve().parent / "ceiling_fs.py"

#: One line of libfuse's trace per request: ``unique: 8, opcode: CREATE (35), ...``.
_REQUEST = re.compile(rb"opcode: ([A-Z_]+) \(")


def prepare_file(mountpoint: Path) -> int:
    """A 16 MiB file of data, open for reading and writing."""
    fd = os.open(mountpoint / "data", os.O_RDWR | os.O_CREAT, 0o644)
    chunk = os.urandom(1 << 20)
    for offset in range(0, FILE_SIZE, len(chunk)):
        os.pwrite(fd, chunk, offset)
    return fd


def random_page(rng: random.Random) -> int:
    return rng.randrange(FILE_SIZE // PAGE) * PAGE


def job_randwrite(mountpoint: Path, ops: int, rng: random.Random) -> None:
    fd = prepare_file(mountpoint)
    block = os.urandom(PAGE)
    mark = _mark()
    for _ in range(ops):
        os.pwrite(fd, block, random_page(rng))
    mark.end()
    os.close(fd)


def job_randread(mountpoint: Path, ops: int, rng: random.Random) -> None:
    fd = prepare_file(mountpoint)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    # Random reads: the kernel's readahead would otherwise fetch neighbours.
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    mark = _mark()
    for _ in range(ops):
        os.pread(fd, PAGE, random_page(rng))
    mark.end()
    os.close(fd)


def job_mmap(mountpoint: Path, ops: int, rng: random.Random) -> None:
    fd = prepare_file(mountpoint)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    with mmap.mmap(fd, FILE_SIZE) as mapping:
        mapping.madvise(mmap.MADV_RANDOM)
        mark = _mark()
        for index in range(ops):
            offset = random_page(rng)
            if index % 2:
                mapping[offset : offset + 8] = b"written!"
            else:
                _ = mapping[offset : offset + 8]
        mapping.flush()
        mark.end()
    os.close(fd)


def job_metadata(mountpoint: Path, ops: int, _rng: random.Random) -> None:
    paths = [mountpoint / f"meta-{i}" for i in range(ops)]
    mark = _mark()
    for path in paths:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
        os.stat(path)
        os.unlink(path)
    mark.end()


JOBS: dict[str, Callable[[Path, int, random.Random], None]] = {
    "randwrite": job_randwrite,
    "randread": job_randread,
    "mmap": job_mmap,
    "metadata": job_metadata,
}


class _Span:
    """Where in the daemon's trace a job's operations begin and end."""

    log: Path

    def __init__(self) -> None:
        self.start = self.log.stat().st_size
        self.stop = self.start

    def end(self) -> None:
        # The trace is written as requests are answered; the last answer is in once the
        # operations returned, but stdio may still hold it.
        time.sleep(0.5)
        self.stop = self.log.stat().st_size


_spans: list[_Span] = []


def _mark() -> _Span:
    span = _Span()
    _spans.append(span)
    return span


def count(log: Path, span: _Span) -> collections.Counter[str]:
    """The requests of each kind the trace shows within ``span``."""
    with open(log, "rb") as trace:
        trace.seek(span.start)
        text = trace.read(span.stop - span.start)
    return collections.Counter(match.decode() for match in _REQUEST.findall(text))


def daemon_command(target: str, mountpoint: Path) -> list[str]:
    if target == "volfs":
        command = volfs_mounts.volfs_command(mountpoint, "size=1G")
        return [*command[:-1], "-d", command[-1]]
    return [sys.executable, str(CEILING_SCRIPT), str(mountpoint), "--debug"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("volfs", "ceiling"), default="volfs")
    parser.add_argument("--ops", type=int, default=2000, help="operations per job")
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated jobs")
    arguments = parser.parse_args(argv)
    rng = random.Random(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="count-requests-") as workdir:
        for job in arguments.jobs.split(","):
            mountpoint = Path(workdir) / job
            mountpoint.mkdir()
            log = Path(workdir) / f"{job}.log"
            _Span.log = log
            with volfs_mounts.mounted(
                daemon_command(arguments.target, mountpoint),
                mountpoint,
                log,
                name=arguments.target,
                fstype=None,
            ):
                JOBS[job](mountpoint, arguments.ops, rng)
                requests = count(log, _spans[-1])
            total = sum(requests.values())
            breakdown = ", ".join(
                f"{name} {number / arguments.ops:.2f}" for name, number in requests.most_common()
            )
            rows.append((job, total / arguments.ops, breakdown))
    print(f"requests per operation ({arguments.target}, {arguments.ops} operations a job)")
    for job, per_operation, breakdown in rows:
        print(f"{job:<10} {per_operation:6.2f}   {breakdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
