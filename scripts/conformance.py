#!/usr/bin/env python3
"""Conformance: stress-ng filesystem stressors and fio verification, volfs beside a kernel tmpfs.

Every case runs once on a tmpfs and once on a volfs, each in a fresh directory, and is judged
on what the tool itself reports:

- stress-ng (``--temp-path``, ``--timeout``, ``--metrics-brief``, ``--verify``): *pass* when it
  exits 0, prints no ``fail:`` line and the stressor did some work (bogo ops > 0); *skip* when
  the stressor skipped itself (the reason is shown); *fail* otherwise; *unavailable* when this
  stress-ng does not know the stressor or an option.
- fio with ``verify=crc32c`` (``do_verify``, ``verify_fatal``): *pass* when it exits 0, its JSON
  report shows no error and every byte written was read back and verified.

The table (stressor | tmpfs | volfs | note) ends with the verdict: every case that passes on
tmpfs must pass on volfs, except the differences listed in :data:`KNOWN_DIFFERENCES` with their
reason. When both pass, the note compares volfs's throughput (bogo ops/s) with tmpfs's.

By default the script mounts both itself (a volfs of ``size=2G`` and a tmpfs of the same size,
in a temporary directory; needs root) and checks that the daemon exits 0 without logging an
exception; ``--volfs`` and ``--tmpfs`` use existing mounts instead.

Notes on what FUSE carries: volfs implements no POSIX or BSD locks, so the kernel handles
``flock``, ``lockf``, ``fcntl`` and OFD locks of a FUSE mount locally (as it does for tmpfs);
they work between processes of this machine, which is all a local filesystem needs. Leases
(``F_SETLEASE``) are likewise local. FIEMAP is supported by neither (both stressors skip).

Usage:
  sudo python scripts/conformance.py                    # every case, 3 s per stressor
  sudo python scripts/conformance.py --timeout 10 --instances 2
  sudo python scripts/conformance.py --cases hdd,mmap-file,fio-mmap --json

Exit status: 0 if volfs passes everything tmpfs passes (and its daemon ended cleanly), 1 if not,
2 for usage errors (or a missing stress-ng or fio).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import volfs_mounts

PASS, SKIP, FAIL, UNAVAILABLE = "pass", "skip", "fail", "unavailable"


@dataclass(frozen=True, slots=True)
class Case:
    """One stressor (with options) or one fio job."""

    name: str
    #: ``stress-ng`` or ``fio``.
    tool: str
    arguments: tuple[str, ...]
    #: What the case exercises, for the table.
    about: str = ""


def stress(name: str, *arguments: str, about: str = "") -> Case:
    """A stress-ng case; the stressor is the first argument, run with ``--instances``."""
    return Case(name, "stress-ng", arguments, about)


def fio(name: str, *arguments: str, about: str = "") -> Case:
    """A fio job that writes and verifies with crc32c."""
    return Case(name, "fio", arguments, about)


#: Every case, most valuable first. Sizes fit a 2 GiB cap with room to spare.
CASES: tuple[Case, ...] = (
    stress("hdd", "--hdd", "--hdd-bytes", "64M", about="write, read back, verify"),
    stress(
        "hdd-random",
        "--hdd",
        "--hdd-bytes",
        "64M",
        "--hdd-opts",
        "wr-rnd,rd-rnd,fsync,utimes",
        about="random writes and reads, fsync",
    ),
    stress("hdd-direct", "--hdd", "--hdd-bytes", "32M", "--hdd-opts", "direct", about="O_DIRECT"),
    stress("iomix", "--iomix", "--iomix-bytes", "64M", about="mixed I/O calls at once"),
    # An mmap bogo op touches, msyncs and punches every page of the mapping, one FUSE request
    # each, so the mapping is kept small enough for several ops in a few seconds.
    stress("mmap-file", "--mmap", "--mmap-file", "--mmap-bytes", "4M", about="msync(MS_SYNC)"),
    stress(
        "mmap-async",
        "--mmap",
        "--mmap-file",
        "--mmap-async",
        "--mmap-mprotect",
        "--mmap-bytes",
        "4M",
        about="msync(MS_ASYNC), mprotect",
    ),
    stress("msync", "--msync", "--msync-bytes", "32M", about="msync of a shared file mapping"),
    stress("fallocate", "--fallocate", "--fallocate-bytes", "64M"),
    stress("fpunch", "--fpunch", about="punching holes"),
    stress("seek", "--seek", "--seek-size", "64M", "--seek-punch", about="lseek, holes"),
    stress("sparsefile", "--sparsefile", about="sparse files"),
    stress("readahead", "--readahead", "--readahead-bytes", "64M"),
    stress("sync-file", "--sync-file", "--sync-file-bytes", "64M", about="sync_file_range"),
    stress("fsize", "--fsize", about="RLIMIT_FSIZE"),
    stress("copy-file", "--copy-file", "--copy-file-bytes", "128M", about="copy_file_range"),
    stress("sendfile", "--sendfile"),
    stress("dentry", "--dentry"),
    stress("dir", "--dir"),
    stress("dirdeep", "--dirdeep", "--dirdeep-inodes", "20000"),
    stress("dirmany", "--dirmany"),
    stress("getdent", "--getdent"),
    stress("filename", "--filename"),
    stress("rename", "--rename"),
    stress("link", "--link"),
    stress("symlink", "--symlink"),
    stress("mknod", "--mknod"),
    stress("open", "--open"),
    stress("access", "--access"),
    stress("chmod", "--chmod"),
    stress("chown", "--chown"),
    stress("utime", "--utime"),
    stress("chdir", "--chdir"),
    stress("xattr", "--xattr"),
    stress("flock", "--flock", about="BSD locks (local to the kernel)"),
    stress("lockf", "--lockf", about="POSIX locks (local to the kernel)"),
    stress("locka", "--locka", about="fcntl advisory locks"),
    stress("lockofd", "--lockofd", about="OFD locks"),
    stress("fcntl", "--fcntl"),
    stress("lease", "--lease"),
    stress("aio", "--aio", about="POSIX AIO"),
    stress("aiol", "--aiol", about="Linux AIO"),
    stress("inotify", "--inotify"),
    stress("fanotify", "--fanotify"),
    stress("inode-flags", "--inode-flags", about="FS_IOC_SETFLAGS"),
    stress("file-ioctl", "--file-ioctl"),
    stress("fiemap", "--fiemap", "--fiemap-bytes", "16M"),
    fio(
        "fio-psync-seq",
        "--ioengine=psync",
        "--rw=write",
        "--bs=64k",
        "--size=64M",
        about="sequential writes, crc32c verify",
    ),
    fio(
        "fio-psync-random",
        "--ioengine=psync",
        "--rw=randwrite",
        "--bsrange=512-64k",
        "--size=32M",
        about="random unaligned writes",
    ),
    fio(
        "fio-mmap",
        "--ioengine=mmap",
        "--rw=randwrite",
        "--bs=4k",
        "--size=32M",
        about="writes through a shared mapping",
    ),
    fio(
        "fio-libaio-direct",
        "--ioengine=libaio",
        "--direct=1",
        "--iodepth=8",
        "--rw=randwrite",
        "--bs=4k",
        "--size=32M",
        about="O_DIRECT, queue depth 8",
    ),
    fio(
        "fio-psync-2jobs",
        "--ioengine=psync",
        "--rw=randwrite",
        "--bs=16k",
        "--size=16M",
        "--numjobs=2",
        about="two writers at once",
    ),
)

#: Cases a tmpfs passes and volfs cannot, with the reason (none known).
KNOWN_DIFFERENCES: dict[str, str] = {}

#: A bounded subset for CI: a few seconds per stressor.
CI_CASES = ("hdd", "mmap-file", "iomix", "rename", "xattr", "lockf", "fio-psync-random", "fio-mmap")


@dataclass
class Outcome:
    """How one case went on one filesystem."""

    status: str
    #: Why it skipped or failed: the tool's own words, shortened.
    reason: str = ""
    #: stress-ng bogo ops per second (real time), or fio's bytes per second written.
    rate: float | None = None
    seconds: float = 0.0
    exit_status: int | None = None
    output_tail: list[str] = field(default_factory=list)


@dataclass
class Row:
    """One case on both filesystems."""

    case: Case
    outcomes: dict[str, Outcome]

    def note(self) -> str:
        """What the case exercises, known differences, the tools' reasons, the rate ratio."""
        notes = [self.case.about] if self.case.about else []
        if self.case.name in KNOWN_DIFFERENCES:
            notes.append(KNOWN_DIFFERENCES[self.case.name])
        reasons = {
            name: outcome.reason for name, outcome in self.outcomes.items() if outcome.reason
        }
        if len(set(reasons.values())) == 1 and len(reasons) == len(self.outcomes):
            notes.append(next(iter(reasons.values())))
        else:
            notes.extend(f"{name}: {reason}" for name, reason in reasons.items())
        tmpfs, volfs = self.outcomes.get("tmpfs"), self.outcomes.get("volfs")
        if tmpfs and volfs and tmpfs.status == volfs.status == PASS and tmpfs.rate and volfs.rate:
            notes.append(f"volfs at {100 * volfs.rate / tmpfs.rate:.0f}% of tmpfs's rate")
        return "; ".join(notes)

    def violation(self) -> str | None:
        """Why this row breaks "volfs passes what tmpfs passes", or None."""
        tmpfs, volfs = self.outcomes.get("tmpfs"), self.outcomes.get("volfs")
        if tmpfs is None or volfs is None or tmpfs.status != PASS or volfs.status == PASS:
            return None
        if self.case.name in KNOWN_DIFFERENCES:
            return None
        return f"{self.case.name}: passes on tmpfs, {volfs.status} on volfs ({volfs.reason})"


# -- running the tools ------------------------------------------------------------------------

_FAIL_LINE = re.compile(r"stress-ng: fail:\s*\[\d+\]\s*(.*)")
_SKIP_LINE = re.compile(r"stress-ng: (?:info|warn):\s*\[\d+\]\s*(.*skipping.*)", re.IGNORECASE)
_METRIC_LINE = re.compile(
    r"stress-ng: metrc:\s*\[\d+\]\s*(\S+)\s+(\d+)\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)"
)


def shorten(text: str, limit: int = 110) -> str:
    """One line of at most ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


#: The reason given when a stressor neither skipped itself nor did any work.
NO_WORK = "no bogo operations done"


#: How much longer the second run of a stressor that did no work in the first one is.
RETRY_FACTOR = 5


def run_stress_ng(case: Case, directory: Path, timeout: float, instances: int) -> Outcome:
    """Run one stress-ng stressor with its temporary files in ``directory``.

    A stressor that ran cleanly but finished no bogo op in ``timeout`` (one op can take
    longer than the run on a loaded machine) runs once more for ``RETRY_FACTOR`` times as
    long: the verdict is about what the filesystem does, the rate tells how fast.
    """
    outcome = _run_stress_ng_once(case, directory, timeout, instances)
    if outcome.status == SKIP and outcome.reason == NO_WORK:
        retry = _run_stress_ng_once(case, directory, timeout * RETRY_FACTOR, instances)
        retry.seconds += outcome.seconds
        return retry
    return outcome


def _run_stress_ng_once(case: Case, directory: Path, timeout: float, instances: int) -> Outcome:
    stressor, *options = case.arguments
    command = [
        "stress-ng",
        stressor,
        str(instances),
        *options,
        "--temp-path",
        str(directory),
        "--timeout",
        f"{timeout:g}s",
        "--metrics-brief",
        "--verify",
    ]
    started = time.monotonic()
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout * 4 + 60, check=False
        )
    except subprocess.TimeoutExpired:
        return Outcome(
            FAIL,
            f"hung: still running {timeout * 4 + 60:g} s after a {timeout:g} s run",
            seconds=time.monotonic() - started,
        )
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    lines = output.splitlines()
    tail = lines[-20:]
    markers = ("unrecognized option", "Unknown stressor", "out of range", "not known")
    refusal = next((line for line in lines if any(marker in line for marker in markers)), None)
    if result.returncode == 1 and refusal is not None:
        return Outcome(
            UNAVAILABLE,
            f"stress-ng {stress_ng_version()} refuses it: {shorten(refusal)}",
            seconds=seconds,
            exit_status=result.returncode,
            output_tail=tail,
        )
    failures = [match.group(1) for line in lines if (match := _FAIL_LINE.search(line))]
    skips = [match.group(1) for line in lines if (match := _SKIP_LINE.search(line))]
    name = stressor.lstrip("-")
    rate = None
    ops = 0
    for line in lines:
        match = _METRIC_LINE.search(line)
        if match and match.group(1) == name:
            ops = int(match.group(2))
            rate = float(match.group(4))
    if result.returncode != 0 or failures:
        reason = failures[0] if failures else f"exit status {result.returncode}"
        return Outcome(FAIL, shorten(reason), rate, seconds, result.returncode, tail)
    if skips or ops == 0:
        reason = skips[0] if skips else NO_WORK
        # The same reason on both filesystems reads the same: drop the stressor and fs type.
        reason = re.sub(r"^\S+: |,? *skipping stressor|,? *filesystem type: \S+", "", reason)
        return Outcome(SKIP, shorten(reason), None, seconds, result.returncode, tail)
    return Outcome(PASS, "", rate, seconds, result.returncode, tail)


def stress_ng_version() -> str:
    """The version of the installed stress-ng, e.g. ``0.15.06``."""
    result = subprocess.run(["stress-ng", "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"version (\S+)", result.stdout + result.stderr)
    return match.group(1) if match else "(unknown version)"


def run_fio(case: Case, directory: Path, timeout: float) -> Outcome:
    """Run one fio job in ``directory``: write, then read back and verify every block."""
    command = [
        "fio",
        "--output-format=json",
        f"--name={case.name}",
        f"--directory={directory}",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_dump=0",
        "--verify_state_save=0",
        "--group_reporting=0",
        *case.arguments,
    ]
    started = time.monotonic()
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout * 20 + 120,
            check=False,
            cwd=directory,  # anything fio leaves behind goes with the directory
        )
    except subprocess.TimeoutExpired:
        return Outcome(FAIL, "hung", seconds=time.monotonic() - started)
    seconds = time.monotonic() - started
    tail = (result.stdout + result.stderr).splitlines()[-20:]
    if result.returncode != 0:
        reason = next(
            (line for line in result.stderr.splitlines() if "verify" in line or "error" in line),
            f"exit status {result.returncode}",
        )
        return Outcome(FAIL, shorten(reason), None, seconds, result.returncode, tail)
    try:
        jobs = json.loads(result.stdout[result.stdout.index("{") :])["jobs"]
    except (ValueError, KeyError) as error:
        return Outcome(FAIL, f"unreadable fio report: {error}", None, seconds, 0, tail)
    written = sum(job["write"]["io_bytes"] for job in jobs)
    verified = sum(job["read"]["io_bytes"] for job in jobs)
    errors = [job["error"] for job in jobs if job["error"]]
    if errors:
        return Outcome(FAIL, f"fio error {errors[0]}", None, seconds, 0, tail)
    if not written or verified != written:
        return Outcome(
            FAIL, f"verified {verified} of {written} bytes written", None, seconds, 0, tail
        )
    rate = sum(job["write"]["bw_bytes"] for job in jobs)
    return Outcome(PASS, "", float(rate), seconds, 0, tail)


def run_case(case: Case, root: Path, *, timeout: float, instances: int = 1) -> Outcome:
    """Run ``case`` in a fresh directory under ``root`` and remove what it left."""
    directory = root / f"conformance-{case.name}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    directory.chmod(0o777)  # stressors that drop privileges still write here
    try:
        if case.tool == "fio":
            return run_fio(case, directory, timeout)
        return run_stress_ng(case, directory, timeout, instances)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_suite(
    cases: Sequence[Case],
    roots: dict[str, Path],
    *,
    timeout: float,
    instances: int = 1,
    progress: bool = False,
) -> list[Row]:
    """Run every case on every filesystem of ``roots`` (``{"tmpfs": path, "volfs": path}``)."""
    rows = []
    for case in cases:
        outcomes = {}
        for name, root in roots.items():
            outcomes[name] = run_case(case, root, timeout=timeout, instances=instances)
            if progress:
                outcome = outcomes[name]
                print(
                    f"  {case.name:<18} {name:<6} {outcome.status:<11} {outcome.seconds:5.1f} s"
                    f"  {outcome.reason}",
                    file=sys.stderr,
                )
        rows.append(Row(case, outcomes))
    return rows


def select(names: Sequence[str] | None) -> list[Case]:
    """The cases named (all if None), in the order of :data:`CASES`.

    Raises:
        KeyError: a name that is no case.
    """
    if names is None:
        return list(CASES)
    known = {case.name: case for case in CASES}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise KeyError(", ".join(unknown))
    return [case for case in CASES if case.name in names]


def format_table(rows: Sequence[Row], filesystems: Sequence[str] = ("tmpfs", "volfs")) -> str:
    """stressor | tmpfs | volfs | note, as a Markdown table."""
    header = ["stressor", *filesystems, "note"]
    lines = [
        [
            row.case.name,
            *(row.outcomes[name].status if name in row.outcomes else "-" for name in filesystems),
            row.note(),
        ]
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header) - 1)]

    def render(cells: list[str]) -> str:
        padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=False)]
        return "| " + " | ".join([*padded, cells[-1]]) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|------|"
    return "\n".join([render(header), separator, *(render(cells) for cells in lines)])


def violations(rows: Sequence[Row]) -> list[str]:
    """Every case that passes on tmpfs and not on volfs, without a known reason."""
    return [problem for row in rows if (problem := row.violation()) is not None]


# -- mounting ---------------------------------------------------------------------------------


@contextlib.contextmanager
def own_mounts(
    size: str, volfs_options: str
) -> Iterator[tuple[dict[str, Path], dict[str, object]]]:
    """A tmpfs and a volfs of ``size`` in a temporary directory; reports the daemon's end."""
    with tempfile.TemporaryDirectory(prefix="conformance-") as workdir:
        tmpfs, volfs = Path(workdir) / "tmpfs", Path(workdir) / "volfs"
        tmpfs.mkdir()
        volfs.mkdir()
        options = ",".join(option for option in (f"size={size}", volfs_options) if option)
        daemon_report: dict[str, object] = {}
        with (
            volfs_mounts.tmpfs(tmpfs, size),
            volfs_mounts.mounted(
                volfs_mounts.volfs_command(volfs, options),
                volfs,
                Path(workdir) / "volfs.log",
                outcome=daemon_report,
            ),
        ):
            yield {"tmpfs": tmpfs, "volfs": volfs}, daemon_report


def missing_tools() -> list[str]:
    """stress-ng and fio, if not installed."""
    return [tool for tool in ("stress-ng", "fio") if shutil.which(tool) is None]


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="stress-ng and fio on volfs and tmpfs side by side.",
    )
    parser.add_argument(
        "--cases", help=f"comma-separated cases (default: all); 'ci' for {','.join(CI_CASES)}"
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per stressor")
    parser.add_argument("--instances", type=int, default=1, help="instances per stressor")
    parser.add_argument("--size", default="2G", help="size of the mounts made (default 2G)")
    parser.add_argument("--volfs-options", default="", help="more options for the volfs mount")
    parser.add_argument("--volfs", type=Path, help="use this volfs mount")
    parser.add_argument("--tmpfs", type=Path, help="use this tmpfs mount")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    arguments = parser.parse_args(argv)
    if (arguments.volfs is None) != (arguments.tmpfs is None):
        parser.error("--volfs and --tmpfs go together")
    return arguments


def wanted_cases(spec: str | None) -> list[Case]:
    """The cases ``--cases`` names: all without it, the CI set for ``ci``.

    Raises:
        KeyError: unknown names (see :func:`select`).
    """
    if not spec:
        return select(None)
    return select(list(CI_CASES) if spec == "ci" else spec.split(","))


def run_on_mounts(
    arguments: argparse.Namespace, cases: Sequence[Case]
) -> tuple[list[Row], dict[str, object]]:
    """Run the cases on the mounts given, or on a tmpfs and a volfs of our own.

    Returns:
        The rows, and how our own volfs daemon ended (empty for mounts given).
    """
    daemon: dict[str, object] = {}
    with contextlib.ExitStack() as stack:
        if arguments.volfs is not None:
            roots = {"tmpfs": arguments.tmpfs, "volfs": arguments.volfs}
        else:
            roots, daemon = stack.enter_context(own_mounts(arguments.size, arguments.volfs_options))
        rows = run_suite(
            cases,
            roots,
            timeout=arguments.timeout,
            instances=arguments.instances,
            progress=not arguments.json,
        )
    return rows, daemon


def daemon_problems(daemon: dict[str, object]) -> list[str]:
    """What went wrong with our own volfs daemon, if it failed."""
    if daemon and (daemon["exit_status"] != 0 or daemon["logged_exception"]):
        return [f"the volfs daemon failed: {daemon}"]
    return []


def print_json(rows: Sequence[Row], problems: Sequence[str], daemon: dict[str, object]) -> None:
    """The rows, the violations and the daemon's end as one JSON object."""
    report = {
        "rows": [
            {
                "case": asdict(row.case),
                "note": row.note(),
                "outcomes": {name: asdict(outcome) for name, outcome in row.outcomes.items()},
            }
            for row in rows
        ],
        "violations": problems,
        "daemon": daemon,
    }
    print(json.dumps(report, indent=2))


def print_verdict(rows: Sequence[Row], problems: Sequence[str]) -> None:
    """The table, then OK or FAILED with every violation."""
    print(format_table(rows))
    passed = sum(1 for row in rows if row.outcomes["tmpfs"].status == PASS)
    print()
    if problems:
        print("conformance: FAILED")
        for problem in problems:
            print(f"  {problem}")
    else:
        print(
            f"conformance: OK: volfs passes every case tmpfs passes ({passed} of {len(rows)} cases)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; see the module docstring."""
    arguments = parse_arguments(argv)
    if arguments.list:
        for case in CASES:
            print(f"{case.name:<18} {case.tool:<9} {' '.join(case.arguments)}")
        return 0
    missing = missing_tools()
    if missing:
        print(f"conformance: {' and '.join(missing)} not installed", file=sys.stderr)
        return 2
    try:
        cases = wanted_cases(arguments.cases)
    except KeyError as error:
        print(f"conformance: unknown cases: {error.args[0]}", file=sys.stderr)
        return 2
    if arguments.volfs is None and os.geteuid() != 0:
        print("conformance: mounting tmpfs needs root", file=sys.stderr)
        return 2
    rows, daemon = run_on_mounts(arguments, cases)
    problems = violations(rows) + daemon_problems(daemon)
    if arguments.json:
        print_json(rows, problems, daemon)
    else:
        print_verdict(rows, problems)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
