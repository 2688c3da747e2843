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


def job_randwrite(mountpoint: Path, ops: int, rng: random.Random, trace: Trace) -> None:
    fd = prepare_file(mountpoint)
    block = os.urandom(PAGE)
    trace.start()
    for _ in range(ops):
        os.pwrite(fd, block, random_page(rng))
    trace.stop()
    os.close(fd)


def job_randread(mountpoint: Path, ops: int, rng: random.Random, trace: Trace) -> None:
    fd = prepare_file(mountpoint)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    # Random reads: the kernel's readahead would otherwise fetch neighbours.
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    trace.start()
    for _ in range(ops):
        os.pread(fd, PAGE, random_page(rng))
    trace.stop()
    os.close(fd)


def job_mmap(mountpoint: Path, ops: int, rng: random.Random, trace: Trace) -> None:
    fd = prepare_file(mountpoint)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    with mmap.mmap(fd, FILE_SIZE) as mapping:
        mapping.madvise(mmap.MADV_RANDOM)
        trace.start()
        for index in range(ops):
            offset = random_page(rng)
            if index % 2:
                mapping[offset : offset + 8] = b"written!"
            else:
                _ = mapping[offset : offset + 8]
        mapping.flush()
        trace.stop()
    os.close(fd)


def job_metadata(mountpoint: Path, ops: int, _rng: random.Random, trace: Trace) -> None:
    paths = [mountpoint / f"meta-{i}" for i in range(ops)]
    trace.start()
    for path in paths:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
        os.stat(path)
        os.unlink(path)
    trace.stop()


JOBS: dict[str, Callable[[Path, int, random.Random, Trace], None]] = {
    "randwrite": job_randwrite,
    "randread": job_randread,
    "mmap": job_mmap,
    "metadata": job_metadata,
}


class Trace:
    """The daemon's trace (its log), and where in it the measured operations begin and end."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.begin = self.end = 0

    def start(self) -> None:
        self.begin = self.log.stat().st_size

    def stop(self) -> None:
        # The last request is answered once the operations returned, but its trace line may
        # still be in the daemon's stdio buffer.
        time.sleep(0.5)
        self.end = self.log.stat().st_size

    def requests(self) -> collections.Counter[str]:
        """The requests of each kind the trace shows between start and stop."""
        with open(self.log, "rb") as trace:
            trace.seek(self.begin)
            text = trace.read(self.end - self.begin)
        return collections.Counter(match.decode() for match in _REQUEST.findall(text))


def daemon_command(target: str, mountpoint: Path) -> list[str]:
    if target == "volfs":
        command = volfs_mounts.volfs_command(mountpoint, "size=1G")
        return [*command[:-1], "-d", command[-1]]
    return [sys.executable, str(CEILING_SCRIPT), str(mountpoint), "--debug"]


def measure(job: str, ops: int, workdir: Path, target: str = "volfs") -> collections.Counter[str]:
    """Mount ``target`` with its trace in ``workdir``, run ``ops`` of ``job`` and return the
    requests they cost, by kind."""
    mountpoint = workdir / job
    mountpoint.mkdir()
    trace = Trace(workdir / f"{job}.log")
    with volfs_mounts.mounted(
        daemon_command(target, mountpoint), mountpoint, trace.log, name=target, fstype=None
    ):
        JOBS[job](mountpoint, ops, random.Random(1), trace)
    return trace.requests()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("volfs", "ceiling"), default="volfs")
    parser.add_argument("--ops", type=int, default=2000, help="operations per job")
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated jobs")
    arguments = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="count-requests-") as workdir:
        for job in arguments.jobs.split(","):
            requests = measure(job, arguments.ops, Path(workdir), arguments.target)
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
