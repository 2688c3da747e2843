"""The vrangectl command on real mounts: its output, its one-line errors and exit statuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import Mount, is_mounted
from volfs.abi import VOLFS_STATS_FIELDS
from volfs.client import (
    VRANGE_PARTIAL,
    VRANGE_VOLATILE,
    SegmentTable,
    fvrange,
    purge,
    statistics,
    vrange_status,
)
from volfs.vrangectl import main

PAGE = 4096
KiB = 1024
MiB = 1024 * 1024
VRANGECTL = Path(sys.executable).parent / "vrangectl"
NOBODY = 65534


def vrangectl(*arguments: object, pass_fds: Sequence[int] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VRANGECTL, *map(str, arguments)],
        capture_output=True,
        text=True,
        pass_fds=pass_fds,
        timeout=60,
        check=False,
    )


def succeeds(*arguments: object, pass_fds: Sequence[int] = ()) -> str:
    """Run vrangectl; it must exit 0 with nothing on stderr. Returns stdout."""
    result = vrangectl(*arguments, pass_fds=pass_fds)
    assert (result.returncode, result.stderr) == (0, ""), result
    return result.stdout


def fails(*arguments: object, pass_fds: Sequence[int] = ()) -> str:
    """Run vrangectl; it must exit 1 with nothing on stdout. Returns stderr."""
    result = vrangectl(*arguments, pass_fds=pass_fds)
    assert (result.returncode, result.stdout) == (1, ""), result
    return result.stderr


def as_nobody(tmp_path: Path, argv: list[str], pass_fds: Sequence[int]) -> tuple[int, str, str]:
    """Run ``vrangectl argv`` as uid 65534 in a forked child; return (status, stdout, stderr).

    Forked rather than executed: the interpreter may live where that user cannot reach.
    """
    out, err = tmp_path / "nobody.out", tmp_path / "nobody.err"
    pid = os.fork()
    if pid == 0:
        status = 100
        try:
            # pytest has replaced sys.stdout and sys.stderr; main prints to whatever they are.
            with open(out, "w") as sys.stdout, open(err, "w") as sys.stderr:
                try:
                    os.setgid(NOBODY)
                    os.setuid(NOBODY)
                    status = main(argv)
                except BaseException:
                    traceback.print_exc()
        finally:
            os._exit(status)
    _pid, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), out.read_text(), err.read_text()


@pytest.fixture
def held(mnt: Path) -> Iterator[tuple[Path, int]]:
    """A 1 MiB file on the mount, held open read-write by the test as a shell would."""
    path = mnt / "cache.bin"
    path.write_bytes(os.urandom(MiB))
    fd = os.open(path, os.O_RDWR)
    try:
        yield path, fd
    finally:
        os.close(fd)


# -- the subcommands ----------------------------------------------------------------------------


def test_volatile_purge_nonvolatile_cycle(mnt: Path, held: tuple[Path, int]) -> None:
    path, fd = held
    descriptor = f"/dev/fd/{fd}"
    assert succeeds("volatile", descriptor, 0, "1M", pass_fds=[fd]) == "marked=1048576 purged=0\n"
    # vrangectl's own handle is gone; the test's descriptor keeps the file's volatility.
    assert vrange_status(fd) == (MiB, 0)
    assert succeeds("status", path) == "volatile=1048576 purged=0\n"
    assert succeeds("purge", mnt) == "purged=1048576\n"
    assert succeeds("status", descriptor, pass_fds=[fd]) == "volatile=1048576 purged=1048576\n"
    assert succeeds("nonvolatile", path, 0, "1M") == "marked=1048576 purged=1\n"
    assert vrange_status(fd) == (0, 0)
    assert os.pread(fd, MiB, 0) == bytes(MiB)
    assert succeeds("purge", mnt) == "purged=0\n"


def test_sizes_take_suffixes(mnt: Path, held: tuple[Path, int]) -> None:
    path, fd = held
    assert succeeds("volatile", path, "4k", "8K") == "marked=8192 purged=0\n"
    assert succeeds("volatile", path, "64K", "0") == "marked=983040 purged=0\n"  # 0: to EOF
    assert succeeds("status", path, "4096", "60k") == "volatile=8192 purged=0\n"
    assert succeeds("status", path, "4KiB", "60kB") == "volatile=8192 purged=0\n"
    assert succeeds("status", path, "0", "1m") == "volatile=991232 purged=0\n"
    assert succeeds("nonvolatile", path, "0", "0") == "marked=1048576 purged=0\n"
    assert vrange_status(fd) == (0, 0)


def test_sizes_take_the_t_suffix_of_the_size_grammar(held: tuple[Path, int]) -> None:
    path, _fd = held
    # The parser takes 1T (and 1TiB): the span is refused by the file, not the parser.
    for length in ("1T", "1TiB", "1t"):
        stderr = fails("status", path, 0, length)
        assert stderr == (
            f"vrangectl: {path}: Invalid argument "
            "(the span ends at 1099511627776, past the end of the file at 1048576)\n"
        )
    assert "past the end of the file" in fails("volatile", path, "1T", 0)
    assert succeeds("purge", path, "--bytes", "1T") == "purged=0\n"


def test_volatile_warns_when_its_own_descriptor_was_the_only_one(mnt: Path) -> None:
    path = mnt / "alone.bin"
    path.write_bytes(bytes(MiB))
    result = vrangectl("volatile", path, 0, "64K", "--partial")
    # The marking was made: exit 0 and the usual output; it ended as vrangectl exited.
    assert (result.returncode, result.stdout) == (0, "marked=65536 purged=0\n")
    assert result.stderr == (
        f"vrangectl: warning: {path}: nothing else has the file open, so the marking ended when "
        f"vrangectl exited; keep it open in the shell: exec 3<>{path}; "
        "vrangectl volatile /dev/fd/3 0 65536 --partial\n"
    )
    assert succeeds("status", path) == "volatile=0 purged=0\n"


def test_volatile_does_not_warn_when_the_shell_holds_the_file(mnt: Path) -> None:
    path = mnt / "held.bin"
    path.write_bytes(bytes(MiB))
    result = subprocess.run(
        [
            "bash",
            "-c",
            f'exec 3<>"$1"; {VRANGECTL} volatile /dev/fd/3 0 1M; {VRANGECTL} ls "$1"',
            "-",
            path,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines()[:3] == [
        "marked=1048576 purged=0",
        "   SIZE  RESIDENT  VOLATILE  PURGED  OPENERS  PATH",
        f"1048576   1048576   1048576       0        1  {path}",
    ]


def test_status_json(mnt: Path, held: tuple[Path, int]) -> None:
    path, fd = held
    fvrange(fd, 0, 64 * KiB, VRANGE_VOLATILE)
    fvrange(fd, 128 * KiB, 64 * KiB, VRANGE_VOLATILE, VRANGE_PARTIAL)
    purge(mnt, 1)
    assert json.loads(succeeds("status", path, "--json")) == {"volatile": 131072, "purged": 65536}
    with SegmentTable(fd) as table:
        table.register(512 * KiB, 64 * KiB).unpin()
        report = json.loads(succeeds("status", "--json", "--ranges", path))
    assert report == {
        "volatile": 196608,
        "purged": 65536,
        "ranges": [
            {"start": 0, "end": 65536, "size": 65536, "flags": "FULL", "state": "purged"},
            {"start": 131072, "end": 196608, "size": 65536, "flags": "PARTIAL", "state": "intact"},
        ],
        "segments": [
            {
                "segment": 0,
                "start": 524288,
                "end": 589824,
                "size": 65536,
                "flags": "FULL",
                "state": "unpinned",
            }
        ],
    }
    # A span, as without --json.
    assert json.loads(succeeds("status", path, "128K", "64K", "-r", "--json")) == {
        "volatile": 65536,
        "purged": 0,
        "ranges": [report["ranges"][1]],
        "segments": [],
    }


def test_version() -> None:
    assert succeeds("--version") == f"vrangectl {metadata.version('volfs')}\n"


def test_a_bad_size_is_a_usage_error_that_says_why() -> None:
    result = vrangectl("volatile", "f", "1.5M", "4K")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines()[-1] == (
        "vrangectl volatile: error: argument OFFSET: invalid size '1.5M': expected a number "
        "with an optional K, M, G, T, P or E suffix (powers of 1024)"
    )
    result = vrangectl("purge", "/mnt", "--bytes", "50%")
    assert result.returncode == 2
    assert "argument --bytes: invalid size '50%'" in result.stderr


def test_ranges_table_lists_each_range(mnt: Path, held: tuple[Path, int]) -> None:
    path, _fd = held
    succeeds("volatile", path, 0, "64K")
    succeeds("volatile", path, "128K", "64K", "--partial")
    succeeds("volatile", path, "512K", "512K")
    # Oldest first: the FULL range goes whole, then the PARTIAL one loses a page from its end.
    assert succeeds("purge", path, "--bytes", "4K") == "purged=65536\n"
    assert succeeds("purge", mnt, "--bytes", "4K") == "purged=4096\n"
    succeeds("volatile", path, "64K", "64K")  # touches its neighbours: a range of its own
    assert succeeds("status", path, "--ranges") == (
        "volatile=720896 purged=69632\n"
        " START      END    SIZE  FLAGS    STATE\n"
        "     0    65536   65536  FULL     purged\n"
        " 65536   131072   65536  FULL     intact\n"
        "131072   192512   61440  PARTIAL  intact\n"
        "192512   196608    4096  PARTIAL  purged\n"
        "524288  1048576  524288  FULL     intact\n"
    )
    # A span lists the ranges overlapping it, each whole.
    assert succeeds("status", path, "4K", "128K", "-r") == (
        "volatile=131072 purged=61440\n"
        " START     END   SIZE  FLAGS    STATE\n"
        "     0   65536  65536  FULL     purged\n"
        " 65536  131072  65536  FULL     intact\n"
        "131072  192512  61440  PARTIAL  intact\n"
    )
    assert succeeds("status", path, "256K", "128K", "-r") == (
        "volatile=0 purged=0\nSTART  END  SIZE  FLAGS  STATE\n"
    )


def test_stats_lists_the_counters(mount_volfs: Callable[..., Mount]) -> None:
    mnt = mount_volfs("size=32M").path
    (mnt / "f").write_bytes(b"x" * (2 * PAGE))
    fd = os.open(mnt / "f", os.O_RDWR)
    try:
        fvrange(fd, 0, 2 * PAGE, VRANGE_VOLATILE)
        lines = succeeds("stats", mnt).splitlines()
        assert [line.partition("=")[0] for line in lines] == list(VOLFS_STATS_FIELDS)
        counters = {line.partition("=")[0]: int(line.partition("=")[2]) for line in lines}
        assert counters == statistics(mnt)
        assert counters["capacity_bytes"] == 32 * MiB
        assert counters["volatile_bytes"] == 2 * PAGE
        assert json.loads(succeeds("stats", mnt / "f", "--json")) == counters
    finally:
        os.close(fd)


def test_help_shows_an_example_for_each_subcommand() -> None:
    overview = succeeds("--help")
    for command in ("volatile", "nonvolatile", "status", "purge", "stats", "ls"):
        assert f"vrangectl {command} " in overview
        text = succeeds(command, "--help")
        assert text.startswith(f"usage: vrangectl {command} ")
        assert "example" in text and f"  vrangectl {command} " in text
    assert "PARTIAL" in succeeds("status", "--help").upper()  # says the table cannot show it


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [("volatile", 0, "4K"), ("nonvolatile", 0, "4K"), ("status",), ("purge",), ("stats",)],
)
def test_not_on_volfs(tmp_path: Path, command: tuple[object, ...]) -> None:
    path = tmp_path / "plain"
    path.write_bytes(bytes(PAGE))
    stderr = fails(command[0], path, *command[1:])
    assert stderr == f"vrangectl: {path}: not a file on a volfs mount\n"


@pytest.mark.parametrize(
    "command",
    [("volatile", 0, "4K"), ("nonvolatile", 0, "4K"), ("status",), ("purge",), ("stats",)],
)
def test_missing_file(mnt: Path, command: tuple[object, ...]) -> None:
    path = mnt / "absent"
    stderr = fails(command[0], path, *command[1:])
    assert stderr == f"vrangectl: {path}: No such file or directory\n"


@pytest.mark.parametrize(
    "command", [("volatile", 0, "4K"), ("nonvolatile", 0, "4K"), ("status",), ("stats",)]
)
def test_descriptor_not_open(command: tuple[object, ...]) -> None:
    # The shell was to hold the file open as descriptor 9 and did not (or closed it).
    for path in ("/dev/fd/9", "/proc/self/fd/9"):
        stderr = fails(command[0], path, *command[1:])
        assert stderr == (
            f"vrangectl: {path}: descriptor 9 is not open "
            "(open the file in the shell first, e.g. exec 9<>FILE)\n"
        )


@pytest.mark.parametrize(
    ("span", "reason"),
    [
        ((1, 4096), "offset and length must be multiples of 4096"),
        ((4096, 100), "offset and length must be multiples of 4096"),
        ((0, "2M"), "the span ends at 2097152, past the end of the file at 1048576"),
        (("1M", "4K"), "the span ends at 1052672, past the end of the file at 1048576"),
        (("2M", 0), "the span ends at 2097152, past the end of the file at 1048576"),
    ],
)
def test_invalid_spans_are_explained(
    held: tuple[Path, int], span: tuple[object, object], reason: str
) -> None:
    path, fd = held
    for command in ("volatile", "nonvolatile", "status"):
        stderr = fails(command, path, *span)
        assert stderr == f"vrangectl: {path}: Invalid argument ({reason})\n"
    assert vrange_status(fd) == (0, 0)


def test_read_only_descriptor(held: tuple[Path, int]) -> None:
    path, fd = held
    fvrange(fd, 0, PAGE, VRANGE_VOLATILE)
    read_only = os.open(path, os.O_RDONLY)
    try:
        descriptor = f"/dev/fd/{read_only}"
        for command in ("volatile", "nonvolatile"):
            stderr = fails(command, descriptor, 0, "4K", pass_fds=[read_only])
            assert stderr == f"vrangectl: {descriptor}: descriptor not open for writing\n"
        # The query needs no write access.
        status = succeeds("status", descriptor, pass_fds=[read_only])
        assert status == "volatile=4096 purged=0\n"
    finally:
        os.close(read_only)
    assert vrange_status(fd) == (PAGE, 0)


def test_non_regular_files_are_named(mnt: Path) -> None:
    assert fails("volatile", mnt, 0, 0) == f"vrangectl: {mnt}: Is a directory\n"
    fifo = mnt / "fifo"
    os.mkfifo(fifo)
    for command in (("volatile", 0, 0), ("status",)):  # must not hang opening it either
        stderr = fails(command[0], fifo, *command[1:])
        assert stderr == f"vrangectl: {fifo}: not a regular file\n"


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_purge_needs_root_or_the_mount_owner(
    tmp_path: Path, mount_volfs: Callable[..., Mount]
) -> None:
    mnt = mount_volfs("size=16M,allow_other").path
    (mnt / "f").write_bytes(bytes(PAGE))
    fd = os.open(mnt / "f", os.O_RDWR)
    directory = os.open(mnt, os.O_RDONLY)
    try:
        fvrange(fd, 0, PAGE, VRANGE_VOLATILE)
        status, stdout, stderr = as_nobody(tmp_path, ["purge", f"/dev/fd/{directory}"], [directory])
        assert (status, stdout) == (1, "")
        assert stderr == (
            f"vrangectl: /dev/fd/{directory}: Operation not permitted "
            "(purging needs root or the user who mounted the filesystem)\n"
        )
        assert vrange_status(fd) == (PAGE, 0)
    finally:
        os.close(directory)
        os.close(fd)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_file_not_writable_by_the_user(tmp_path: Path, mount_volfs: Callable[..., Mount]) -> None:
    mnt = mount_volfs("size=16M,allow_other").path
    (mnt / "f").write_bytes(bytes(PAGE))
    (mnt / "f").chmod(0o644)
    fd = os.open(mnt / "f", os.O_RDWR)  # writable, but only for root
    try:
        status, stdout, stderr = as_nobody(tmp_path, ["volatile", f"/dev/fd/{fd}", "0", "4K"], [fd])
        assert (status, stdout) == (1, "")
        assert stderr == (
            f"vrangectl: /dev/fd/{fd}: Permission denied "
            "(changing volatility needs the file open for writing)\n"
        )
        assert vrange_status(fd) == (0, 0)
    finally:
        os.close(fd)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_read_only_mount(tmp_path: Path, held: tuple[Path, int]) -> None:
    path, _fd = held
    view = tmp_path / "read-only"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(path.parent), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        stderr = fails("volatile", view / path.name, 0, "4K")
        assert stderr == (
            f"vrangectl: {view / path.name}: Read-only file system "
            "(changing volatility needs the file open for writing)\n"
        )
        assert succeeds("status", view / path.name) == "volatile=0 purged=0\n"
    finally:
        subprocess.run(["umount", str(view)], check=True)
    assert not is_mounted(view)


@pytest.mark.parametrize(
    "arguments",
    [
        [],
        ["frobnicate", "f"],
        ["volatile", "f", "0"],
        ["volatile", "f", "1.5M", "4K"],
        ["volatile", "f", "0", "4K", "--bytes", "4K"],
        ["nonvolatile", "f", "0", "4K", "--partial"],
        ["status", "f", "4K"],
        ["purge", "/mnt", "--bytes", "lots"],
        ["stats"],
    ],
)
def test_usage_errors_exit_2(arguments: list[str]) -> None:
    result = vrangectl(*arguments)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("usage: vrangectl")
    assert "Traceback" not in result.stderr


def test_a_reader_that_goes_away_gets_no_traceback(mnt: Path) -> None:
    path = mnt / "many"
    path.write_bytes(bytes(8192 * PAGE))
    fd = os.open(path, os.O_RDWR)
    try:
        for page in range(0, 8192, 2):  # 4096 ranges: more lines than a pipe holds
            fvrange(fd, page * PAGE, PAGE, VRANGE_VOLATILE)
        result = subprocess.run(
            f"{VRANGECTL} status /dev/fd/{fd} --ranges | head -n 2",
            shell=True,
            capture_output=True,
            text=True,
            pass_fds=[fd],
            timeout=60,
            check=False,
        )
    finally:
        os.close(fd)
    assert result.stdout.splitlines()[0] == f"volatile={4096 * PAGE} purged=0"
    assert len(result.stdout.splitlines()) == 2
    assert result.stderr == ""
