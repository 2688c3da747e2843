"""I/O benchmark for volfs against the pyfuse3 ceiling, a C libfuse reference and tmpfs.

Mounts each target in its own temporary directory, runs the same jobs on it and prints one row
per job with the value for every target and the ratios volfs/ceiling, volfs/c-ref and
volfs/tmpfs.

Targets:
  volfs    ``<python> -m volfs -f -o size=4G MOUNTPOINT`` (the filesystem under test)
  ceiling  ``<python> scripts/ceiling_fs.py MOUNTPOINT``: the thinnest pyfuse3 in-memory
           filesystem with the same FUSE settings as volfs, i.e. the best any pyfuse3 daemon
           can do on this machine
  c-ref    ``ref_memfs MOUNTPOINT``: scripts/ref_memfs.c, the thinnest multi-threaded C libfuse
           in-memory filesystem with the same FUSE settings as the ceiling, i.e. the fastest a
           C libfuse daemon does these jobs on this machine; compiled at the start of the run
           into the work directory with ``$CC`` (default ``cc``) and ``pkg-config fuse3``
  ceiling-noxattr  ceiling without extended attributes (not run by default): the kernel then
           skips the GETXATTR(security.capability) it sends before every write(2) to a
           filesystem with xattrs, which shows what xattr support costs small writes
  tmpfs    ``mount -t tmpfs -o size=4G tmpfs MOUNTPOINT`` (the in-kernel reference)

Jobs (fio jobs run as a single fio process each, ``--output-format=json``):
  seqwrite   1 MiB sequential write of a new file, psync                    MiB/s
  seqread    1 MiB sequential read, cold cache, 5 passes                    MiB/s
  randread   4 KiB random read, cold cache, time based                      IOPS
  randwrite  4 KiB random write, time based                                 IOPS
  mmap       4 KiB random read/write through mmap, cold cache, time based   IOPS (read+write)
  metadata   Python loop: open(O_CREAT|O_WRONLY), close, stat, unlink       files/s
"Cold" means fio drops the file from the page cache before the job (``invalidate=1``, a
posix_fadvise(POSIX_FADV_DONTNEED) of the file), so every read goes to the daemon. Not
/proc/sys/vm/drop_caches: besides the file it marks every page of a daemon's memfd for reclaim,
which turns fault-around off for them, so a daemon that maps its memfd would pay a page fault
for every page it reads: the cost of a drop_caches, not of reading a file cold. In the mmap
job every first touch of a page is a READ, and the pages written reach the daemon as WRITEs
when the kernel writes them back. The time-based jobs are cold for their first pass through
the file only (a warning says when they went further).
seqwrite writes a new file; the other fio jobs reuse it (laid out first if seqwrite is not
selected). Results are the median of ``--repeat`` runs, each on a fresh mount, the targets
taking turns (reversed every other repeat); a ratio is the median of the repeats' ratios.

Needs root (tmpfs mount), fio and fusermount3; c-ref also a C compiler, pkg-config
and the libfuse 3 headers (Debian: gcc, pkg-config, libfuse3-dev).

Usage:
  python scripts/bench_io.py                                    # all targets, full run
  python scripts/bench_io.py --targets ceiling,tmpfs --quick    # smoke test
  python scripts/bench_io.py --targets volfs,c-ref --jobs randwrite,metadata  # against C
  python scripts/bench_io.py --repeat 3 --runtime 20 --size 2G  # median of 3 runs
  python scripts/bench_io.py --jobs seqwrite,metadata --json > result.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import volfs_mounts

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from volfs.sizes import size_argument  # noqa: E402

log = logging.getLogger("bench_io")

CEILING_SCRIPT = Path(__file__).resolve().parent / "ceiling_fs.py"
REF_SOURCE = Path(__file__).resolve().parent / "ref_memfs.c"
#: The name of the compiled c-ref daemon in the work directory.
REF_BINARY = "ref_memfs"
#: c-ref is compiled with ``$CC REF_CFLAGS -o BINARY SOURCE $(pkg-config --cflags --libs fuse3)
#: REF_LIBS``, ``$CC`` being ``cc`` unless set.
REF_CFLAGS = ("-O2", "-Wall", "-Wextra")
REF_LIBS = ("-lpthread",)

TARGETS = ("volfs", "ceiling", "c-ref", "tmpfs", "ceiling-noxattr")
DEFAULT_TARGETS = ("volfs", "ceiling", "c-ref", "tmpfs")
FUSE_TARGETS = ("volfs", "ceiling", "c-ref", "ceiling-noxattr")
#: The type /proc/self/mounts shows for each FUSE target.
FUSE_TYPES = {
    "volfs": "fuse.volfs",
    "ceiling": "fuse.ceiling",
    "c-ref": "fuse.ref_memfs",
    "ceiling-noxattr": "fuse.ceiling",
}
MIB = 1 << 20
#: Figures this large are shown without decimals, which would only be noise.
WHOLE_FIGURES_FROM = 100


@dataclass(frozen=True)
class JobSpec:
    label: str
    unit: str


JOBS: dict[str, JobSpec] = {
    "seqwrite": JobSpec("seqwrite 1M", "MiB/s"),
    "seqread": JobSpec("seqread 1M cold", "MiB/s"),
    "randread": JobSpec("randread 4k cold", "IOPS"),
    "randwrite": JobSpec("randwrite 4k", "IOPS"),
    "mmap": JobSpec("mmap randrw 4k cold", "IOPS"),
    "metadata": JobSpec("create+stat+unlink", "files/s"),
}


@dataclass(frozen=True)
class Preset:
    size: str
    runtime: float
    files: int


#: Passes of the cold sequential read: one pass of 1 GiB takes half a second, too short to
#: measure steadily.
SEQREAD_LOOPS = 5

FULL = Preset(size="1G", runtime=10.0, files=10_000)
QUICK = Preset(size="64M", runtime=2.0, files=1_000)


class BenchError(RuntimeError):
    """A target or job failed; the message says why."""


@dataclass(frozen=True)
class Settings:
    size: int
    runtime: float
    files: int
    fs_size: str
    python: str
    mount_timeout: float
    workdir: Path


# -- helpers -----------------------------------------------------------------------------------


def positive_size(text: str) -> int:
    """Parse ``1G``, ``256M``, ``64k``, ``4096`` (binary multiples, as fio does) into bytes."""
    size = size_argument(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def parse_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(choices)}, got {text!r}"
            )
        return [choice for choice in choices if choice in items]

    return parse


def format_size(size: int) -> str:
    for shift, suffix in ((30, "G"), (20, "M"), (10, "K")):
        if size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}"
    return str(size)


# -- mounting ----------------------------------------------------------------------------------


def compiler() -> list[str]:
    """The C compiler's command: ``$CC`` if set, else ``cc``."""
    return shlex.split(os.environ.get("CC", "").strip() or "cc")


def check_ref_toolchain() -> None:
    """Raise BenchError unless c-ref can be compiled here."""
    if not REF_SOURCE.is_file():
        raise BenchError(f"{REF_SOURCE} not found")
    missing = [tool for tool in (compiler()[0], "pkg-config") if not shutil.which(tool)]
    if missing:
        raise BenchError(
            f"c-ref needs a C compiler and pkg-config; missing: {', '.join(missing)} "
            "(Debian: apt-get install gcc pkg-config libfuse3-dev)"
        )
    result = subprocess.run(
        ["pkg-config", "--exists", "fuse3"], check=False, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise BenchError(
            "c-ref needs the libfuse 3 headers, which pkg-config does not find as fuse3 "
            "(Debian: apt-get install libfuse3-dev)"
        )


def build_ref(workdir: Path) -> Path:
    """Compile scripts/ref_memfs.c into *workdir*; return the program's path."""
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "fuse3"],
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if flags.returncode != 0:
        raise BenchError(f"pkg-config --cflags --libs fuse3 failed:\n{flags.stderr.strip()}")
    binary = workdir / REF_BINARY
    cmd = [
        *compiler(),
        *REF_CFLAGS,
        "-o",
        str(binary),
        str(REF_SOURCE),
        *flags.stdout.split(),
        *REF_LIBS,
    ]
    log.info("compiling %s", REF_SOURCE.name)
    log.debug("running %s", " ".join(cmd))
    result = subprocess.run(
        cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise BenchError(
            f"compiling {REF_SOURCE} failed (status {result.returncode}):\n"
            f"{' '.join(cmd)}\n{result.stderr.strip()}"
        )
    if result.stderr.strip():
        log.warning("compiling %s:\n%s", REF_SOURCE.name, result.stderr.strip())
    return binary


def daemon_command(target: str, settings: Settings, mountpoint: Path) -> list[str]:
    if target == "volfs":
        return volfs_mounts.volfs_command(mountpoint, f"size={settings.fs_size}", settings.python)
    if target == "c-ref":
        return [str(settings.workdir / REF_BINARY), str(mountpoint)]
    extra = ["--no-xattr"] if target == "ceiling-noxattr" else []
    return [settings.python, str(CEILING_SCRIPT), str(mountpoint), *extra]


@contextlib.contextmanager
def mounted(target: str, settings: Settings) -> Iterator[Path]:
    """Mount *target* on a fresh directory; always unmount and remove it afterwards."""
    mountpoint = Path(tempfile.mkdtemp(prefix=f"mnt-{target}-", dir=settings.workdir))
    with contextlib.ExitStack() as stack:
        if target == "tmpfs":
            stack.enter_context(volfs_mounts.tmpfs(mountpoint, settings.fs_size))
        else:
            stack.enter_context(
                volfs_mounts.mounted(
                    daemon_command(target, settings, mountpoint),
                    mountpoint,
                    settings.workdir / f"{mountpoint.name}.log",
                    name=target,
                    fstype=FUSE_TYPES[target],
                    timeout=settings.mount_timeout,
                )
            )
        yield mountpoint


# -- jobs --------------------------------------------------------------------------------------


class JobRunner:
    """Runs the jobs on one mounted target."""

    def __init__(self, target: str, mountpoint: Path, settings: Settings, rep: int) -> None:
        self.target = target
        self.mountpoint = mountpoint
        self.settings = settings
        self.rep = rep
        self.datafile = mountpoint / "bench.dat"

    def run(self, job: str) -> float:
        method: Callable[[], float] = getattr(self, f"job_{job}")
        return method()

    def fio(self, name: str, *options: str) -> dict[str, Any]:
        output = self.settings.workdir / f"fio-{self.target}-{name}.json"
        cmd = [
            "fio",
            f"--name={name}",
            f"--filename={self.datafile}",
            f"--size={self.settings.size}",
            "--numjobs=1",
            "--fallocate=none",
            "--output-format=json",
            f"--output={output}",
            *options,
        ]
        log.debug("running %s", " ".join(cmd))
        result = subprocess.run(
            cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
        if result.stderr.strip():
            log.debug("fio stderr: %s", result.stderr.strip())
        try:
            report = json.loads(output.read_text())
            job = report["jobs"][0]
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise BenchError(
                f"{self.target}: fio {name} failed (status {result.returncode}, {exc}):\n"
                f"{result.stderr.strip() or result.stdout.strip()}"
            ) from None
        if result.returncode != 0 or job.get("error"):
            raise BenchError(
                f"{self.target}: fio {name} failed (status {result.returncode}, "
                f"error {job.get('error')}):\n{result.stderr.strip()}"
            )
        return dict(job)

    def timed(self, *options: str) -> tuple[str, ...]:
        return ("--time_based", f"--runtime={self.settings.runtime:g}", *options)

    def ensure_datafile(self) -> None:
        try:
            if self.datafile.stat().st_size >= self.settings.size:
                return
        except FileNotFoundError:
            pass
        log.info("%s: laying out %s", self.target, format_size(self.settings.size))
        self.fio("layout", "--rw=write", "--bs=1M", "--ioengine=psync")

    def job_seqwrite(self) -> float:
        self.datafile.unlink(missing_ok=True)
        os.sync()
        job = self.fio("seqwrite", "--rw=write", "--bs=1M", "--ioengine=psync")
        return float(job["write"]["bw_bytes"]) / MIB

    def job_seqread(self) -> float:
        self.ensure_datafile()
        # fio drops the file's cache before each loop, so every pass reads cold.
        job = self.fio(
            "seqread",
            "--rw=read",
            "--bs=1M",
            "--ioengine=psync",
            "--invalidate=1",
            f"--loops={SEQREAD_LOOPS}",
        )
        return float(job["read"]["bw_bytes"]) / MIB

    def job_randread(self) -> float:
        self.ensure_datafile()
        job = self.fio(
            "randread",
            *self.timed("--rw=randread", "--bs=4k", "--ioengine=psync", "--invalidate=1"),
        )
        self.warn_if_warm("randread", job["read"]["total_ios"])
        return float(job["read"]["iops"])

    def warn_if_warm(self, name: str, blocks: int) -> None:
        """Warn when a cold job touched more 4 KiB blocks than the file holds: fio's random
        map touches every block once a pass, and later passes hit the page cache."""
        passes = blocks * 4096 / self.settings.size
        if passes > 1 and self.target in FUSE_TARGETS:
            log.warning(
                "%s: %s went %.1f times through the file, so it was partly warm; "
                "use a larger --size or a shorter --runtime for a cold result",
                self.target,
                name,
                passes,
            )

    def job_randwrite(self) -> float:
        self.ensure_datafile()
        job = self.fio("randwrite", *self.timed("--rw=randwrite", "--bs=4k", "--ioengine=psync"))
        return float(job["write"]["iops"])

    def job_mmap(self) -> float:
        self.ensure_datafile()
        job = self.fio(
            "mmap", *self.timed("--rw=randrw", "--bs=4k", "--ioengine=mmap", "--invalidate=1")
        )
        self.warn_if_warm("mmap", job["read"]["total_ios"] + job["write"]["total_ios"])
        return float(job["read"]["iops"]) + float(job["write"]["iops"])

    def job_metadata(self) -> float:
        paths = [
            os.path.join(self.mountpoint, f"meta-{self.rep}-{i}")
            for i in range(self.settings.files)
        ]
        flags = os.O_CREAT | os.O_WRONLY
        os.sync()
        start = time.perf_counter()
        for path in paths:
            os.close(os.open(path, flags, 0o644))
            os.stat(path)
            os.unlink(path)
        return len(paths) / (time.perf_counter() - start)


# -- reporting ---------------------------------------------------------------------------------


def paired_ratio(runs: dict[str, list[float]], num: str, den: str) -> float | None:
    """The median over repeats of ``num``'s value divided by ``den``'s in the same repeat.

    Runs of one repeat are minutes apart at most, so a machine that slows down or speeds up
    over the whole benchmark moves both sides of each quotient alike.
    """
    pairs = zip(runs.get(num, []), runs.get(den, []), strict=False)
    quotients = [a / b for a, b in pairs if b > 0]
    return statistics.median(quotients) if quotients else None


def ratio_columns(targets: Sequence[str]) -> list[tuple[str, str]]:
    return [
        ("volfs", other)
        for other in ("ceiling", "c-ref", "tmpfs")
        if "volfs" in targets and other in targets
    ]


def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= WHOLE_FIGURES_FROM else f"{value:.1f}"


def format_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_table(
    runs: dict[str, dict[str, list[float]]], targets: Sequence[str], jobs: Sequence[str]
) -> str:
    ratios = ratio_columns(targets)
    header = ["job", "unit", *targets, *(f"{a}/{b}" for a, b in ratios)]
    rows = [header]
    for job in jobs:
        values = runs[job]
        rows.append(
            [
                JOBS[job].label,
                JOBS[job].unit,
                *(
                    format_value(statistics.median(values[t]) if t in values else None)
                    for t in targets
                ),
                *(format_ratio(paired_ratio(values, a, b)) for a, b in ratios),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--targets",
        type=parse_list(TARGETS),
        default=list(DEFAULT_TARGETS),
        help=f"comma-separated targets of {','.join(TARGETS)} "
        f"(default: {','.join(DEFAULT_TARGETS)})",
    )
    parser.add_argument(
        "--jobs",
        type=parse_list(tuple(JOBS)),
        default=list(JOBS),
        help="comma-separated jobs (default: all)",
    )
    parser.add_argument(
        "--size",
        type=positive_size,
        help=f"file size for the fio jobs (default: {FULL.size}, --quick: {QUICK.size})",
    )
    parser.add_argument(
        "--runtime",
        type=float,
        help=f"seconds per time-based job (default: {FULL.runtime:g}, --quick: {QUICK.runtime:g})",
    )
    parser.add_argument(
        "--files",
        type=int,
        help=f"files in the metadata loop (default: {FULL.files}, --quick: {QUICK.files})",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run everything N times and report the median (default: 1)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and short runtimes, for smoke testing"
    )
    parser.add_argument(
        "--fs-size",
        default="4G",
        help="size= mount option for volfs and tmpfs (default: %(default)s)",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="python for the FUSE daemons (default: this interpreter)",
    )
    parser.add_argument(
        "--mount-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for a daemon to mount (default: %(default)s)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print results as JSON instead of the table"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    if args.size is None:
        args.size = positive_size(defaults.size)
    if args.runtime is None:
        args.runtime = defaults.runtime
    if args.files is None:
        args.files = defaults.files
    if args.repeat < 1 or args.runtime <= 0 or args.files < 1:
        parser.error("--repeat, --runtime and --files must be positive")
    return args


def preflight(targets: Sequence[str]) -> None:
    missing = [tool for tool in ("fio", "fusermount3", "mount", "umount") if not shutil.which(tool)]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)}")
    if os.geteuid() != 0 and "tmpfs" in targets:
        raise BenchError("must run as root (tmpfs mount)")
    if {"ceiling", "ceiling-noxattr"} & set(targets) and not CEILING_SCRIPT.is_file():
        raise BenchError(f"{CEILING_SCRIPT} not found")
    if "c-ref" in targets:
        check_ref_toolchain()


def benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, list[float]]]:
    settings = Settings(
        size=args.size,
        runtime=args.runtime,
        files=args.files,
        fs_size=args.fs_size,
        python=args.python,
        mount_timeout=args.mount_timeout,
        workdir=workdir,
    )
    if "c-ref" in args.targets:
        build_ref(workdir)
    runs: dict[str, dict[str, list[float]]] = {job: {} for job in args.jobs}
    for rep in range(args.repeat):
        # Every other repeat in reverse order, so that no target always runs first or last.
        order = args.targets if rep % 2 == 0 else args.targets[::-1]
        for target in order:
            with mounted(target, settings) as mountpoint:
                runner = JobRunner(target, mountpoint, settings, rep)
                for job in args.jobs:
                    value = runner.run(job)
                    runs[job].setdefault(target, []).append(value)
                    log.info(
                        "run %d/%d %-7s %-18s %12s %s",
                        rep + 1,
                        args.repeat,
                        target,
                        JOBS[job].label,
                        format_value(value),
                        JOBS[job].unit,
                    )
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    volfs_mounts.setup_main(args.verbose)
    try:
        preflight(args.targets)
        workdir = Path(tempfile.mkdtemp(prefix="bench_io-"))
        try:
            runs = benchmark(args, workdir)
        finally:
            volfs_mounts.remove_workdir(workdir)
    except (BenchError, volfs_mounts.MountError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130

    medians = {
        job: {t: statistics.median(v) for t, v in per_target.items()}
        for job, per_target in runs.items()
    }
    if args.json:
        result = {
            "config": {
                "targets": args.targets,
                "size": args.size,
                "runtime": args.runtime,
                "files": args.files,
                "repeat": args.repeat,
                "fs_size": args.fs_size,
            },
            "jobs": {
                job: {
                    "label": JOBS[job].label,
                    "unit": JOBS[job].unit,
                    "median": medians[job],
                    "runs": runs[job],
                    "ratios": {
                        f"{a}/{b}": paired_ratio(runs[job], a, b)
                        for a, b in ratio_columns(args.targets)
                    },
                }
                for job in args.jobs
            },
        }
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(
            f"# size={format_size(args.size)} runtime={args.runtime:g}s files={args.files} "
            f"repeat={args.repeat} (medians; ratios are medians of each repeat's ratio)"
        )
        print(render_table(runs, args.targets, args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
