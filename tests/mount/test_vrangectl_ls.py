"""``vrangectl ls`` and VOLFS_IOC_FILE_INFO on real mounts: which files hold volatile or purged
data, and how much, as a user reads it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from volfs_mounts import tmpfs

from tests.conftest import Mount, wait_for
from tests.mount.test_vrangectl import as_nobody, fails, succeeds, vrangectl
from volfs.client import (
    VRANGE_PARTIAL,
    VRANGE_VOLATILE,
    FileInfo,
    SegmentTable,
    file_info,
    fvrange,
    purge,
    vrange_status,
)

PAGE = 4096
KiB = 1024
MiB = 1024 * 1024
HEADER = ("SIZE", "RESIDENT", "VOLATILE", "PURGED", "OPENERS", "PATH")


def errno_of(call: Callable[[], object]) -> int | None:
    try:
        call()
    except OSError as error:
        return error.errno
    return None


def table(stdout: str) -> list[tuple[str, ...]]:
    """The lines of an ``ls`` table split into their six columns (PATH may hold spaces)."""
    return [tuple(line.split(maxsplit=5)) for line in stdout.splitlines()]


def row(path: Path | str, fd: int, openers: int, *, deleted: bool = False) -> tuple[str, ...]:
    """The line ``ls`` should print for the file open as ``fd``, from stat and status."""
    seen = os.fstat(fd)
    volatile, purged = vrange_status(fd)
    shown = f"{path} (deleted)" if deleted else str(path)
    numbers = (seen.st_size, seen.st_blocks * 512, volatile, purged, openers)
    return (*map(str, numbers), shown)


def total(rows: list[tuple[str, ...]]) -> tuple[str, ...]:
    return (*(str(sum(int(r[column]) for r in rows)) for column in range(4)), "-", "TOTAL")


@pytest.fixture
def files(mnt: Path) -> Iterator[dict[str, int]]:
    """Files held open read-write by the test, as a program using them would: ``hot`` (1 MiB,
    half volatile), ``cold`` (64 KiB, no volatility) and ``dir/with space`` (256 KiB, all of
    it volatile, PARTIAL); by name, their descriptors."""
    (mnt / "dir").mkdir()
    sizes = {"hot": MiB, "cold": 64 * KiB, "dir/with space": 256 * KiB}
    with ExitStack() as stack:
        fds = {}
        for name, size in sizes.items():
            (mnt / name).write_bytes(os.urandom(size))
            fds[name] = os.open(mnt / name, os.O_RDWR)
            stack.callback(os.close, fds[name])
        fvrange(fds["hot"], 0, 512 * KiB, VRANGE_VOLATILE)
        fvrange(fds["dir/with space"], 0, 0, VRANGE_VOLATILE, VRANGE_PARTIAL)
        yield fds


# -- VOLFS_IOC_FILE_INFO ------------------------------------------------------------------------


def test_file_info_agrees_with_stat_and_status(mnt: Path, files: dict[str, int]) -> None:
    fd = files["hot"]
    seen = os.fstat(fd)
    assert file_info(fd) == FileInfo(
        size=MiB,
        resident_bytes=seen.st_blocks * 512,
        volatile_bytes=512 * KiB,
        purged_bytes=0,
        openers=1,
        segments=0,
    )
    assert seen.st_blocks * 512 == MiB
    assert purge(mnt) == 512 * KiB + 256 * KiB
    info = file_info(fd)
    assert (info.volatile_bytes, info.purged_bytes) == vrange_status(fd) == (512 * KiB, 512 * KiB)
    assert info.resident_bytes == os.fstat(fd).st_blocks * 512 == 512 * KiB
    # A sparse file holds no memory for its holes.
    sparse = os.open(mnt / "sparse", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(sparse, MiB)
        os.pwrite(sparse, b"x", 0)
        assert file_info(sparse)[:2] == (MiB, PAGE)
    finally:
        os.close(sparse)


def test_file_info_counts_unpinned_segments(mnt: Path, files: dict[str, int]) -> None:
    fd = files["cold"]
    with SegmentTable(fd) as table:
        first = table.register(0, 16 * KiB)
        table.register(16 * KiB, 16 * KiB)
        first.unpin()
        info = file_info(fd)
        assert (info.segments, info.volatile_bytes, info.purged_bytes) == (2, 16 * KiB, 0)
        purge(mnt)
        info = file_info(fd)
        assert (info.volatile_bytes, info.purged_bytes) == vrange_status(fd)
        assert (info.volatile_bytes, info.purged_bytes) == (16 * KiB, 16 * KiB)
        assert info.resident_bytes == os.fstat(fd).st_blocks * 512 == 48 * KiB


def test_file_info_counts_the_openers_of_every_process(mnt: Path) -> None:
    path = mnt / "shared"
    path.write_bytes(bytes(PAGE))
    fd = os.open(path, os.O_RDONLY)  # a read-only descriptor may ask too
    try:
        assert file_info(fd).openers == 1
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; f = open(sys.argv[1], 'rb'); sys.stdin.read()",
                path,
            ],
            stdin=subprocess.PIPE,
        )
        try:
            wait_for(lambda: file_info(fd).openers == 2, 10, "the other process's open")
            duplicate = os.dup(fd)  # the same open file description: no new opener
            assert file_info(duplicate).openers == 2
            os.close(duplicate)
        finally:
            holder.communicate(b"", timeout=30)
        # FUSE tells the daemon of a close after close(2) returned: a moment later.
        wait_for(lambda: file_info(fd).openers == 1, 10, "the other process's close")
    finally:
        os.close(fd)


def test_file_info_errors(mnt: Path, tmp_path: Path) -> None:
    directory = os.open(mnt, os.O_RDONLY)
    try:
        assert errno_of(lambda: file_info(directory)) == errno.EISDIR
    finally:
        os.close(directory)
    os.mkfifo(mnt / "fifo")
    fifo = os.open(mnt / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert errno_of(lambda: file_info(fifo)) == errno.ENOTTY  # never reaches volfs
    finally:
        os.close(fifo)
    (tmp_path / "plain").write_bytes(b"x")
    with open(tmp_path / "plain", "rb") as plain:
        assert errno_of(lambda: file_info(plain.fileno())) == errno.ENOTTY


# -- vrangectl ls -------------------------------------------------------------------------------


def test_ls_lists_the_files_with_volatile_or_purged_data(mnt: Path, files: dict[str, int]) -> None:
    assert succeeds("purge", mnt, "--bytes", "4K") == "purged=524288\n"  # the oldest: hot
    hot = row(mnt / "hot", files["hot"], 1)
    spaced = row(mnt / "dir/with space", files["dir/with space"], 1)
    assert hot[:4] == (str(MiB), str(512 * KiB), str(512 * KiB), str(512 * KiB))
    assert spaced[:4] == (str(256 * KiB),) * 3 + ("0",)
    stdout = succeeds("ls", mnt)
    assert table(stdout) == [HEADER, spaced, hot, total([spaced, hot])]
    # Aligned under the header, numbers to the right, the path last.
    lines = stdout.splitlines()
    assert lines[0] == "   SIZE  RESIDENT  VOLATILE  PURGED  OPENERS  PATH"
    assert {len(line.rsplit("  ", 1)[0]) for line in lines} == {len(lines[0]) - len("  PATH")}
    # The same numbers as status gives.
    assert succeeds("status", mnt / "hot") == f"volatile={hot[2]} purged={hot[3]}\n"

    # --all: every regular file; a directory or file operand lists what is below it.
    cold = row(mnt / "cold", files["cold"], 1)
    assert table(succeeds("ls", "--all", mnt)) == [
        HEADER,
        cold,
        spaced,
        hot,
        total([cold, spaced, hot]),
    ]
    spaced_here = (*spaced[:5], f"{mnt}/dir/with space")
    assert table(succeeds("ls", mnt / "dir", mnt / "cold")) == [
        HEADER,
        spaced_here,
        total([spaced]),
    ]


def test_ls_lists_purged_data_after_the_last_close(mnt: Path) -> None:
    """The data purged while a file was volatile stays lost after its last close: ls shows
    whose, with nobody holding it open."""
    path = mnt / "stale"
    path.write_bytes(os.urandom(64 * KiB))
    with open(path, "r+b") as held:
        fvrange(held.fileno(), 0, 0, VRANGE_VOLATILE)
        purge(mnt)
    wait_for(lambda: "0  " in succeeds("ls", mnt).splitlines()[1], 10, "the close")
    assert table(succeeds("ls", mnt)) == [
        HEADER,
        ("65536", "0", "0", "65536", "0", str(path)),
        ("65536", "0", "0", "65536", "-", "TOTAL"),
    ]
    assert succeeds("status", path) == "volatile=0 purged=65536\n"


def test_ls_json(mnt: Path, files: dict[str, int]) -> None:
    purge(mnt, 1)
    report = json.loads(succeeds("ls", "--json", "--all", mnt))
    expected = []
    for name in ("cold", "dir/with space", "hot"):
        size, resident, volatile, purged, openers, path = row(mnt / name, files[name], 1)
        expected.append(
            {
                "path": path,
                "deleted": False,
                "size": int(size),
                "resident": int(resident),
                "volatile": int(volatile),
                "purged": int(purged),
                "openers": int(openers),
                "segments": 0,
            }
        )
    assert report["files"] == expected
    assert report["total"] == {
        "files": 3,
        **{
            key: sum(f[key] for f in expected) for key in ("size", "resident", "volatile", "purged")
        },
    }
    assert report["skipped"] == 0
    assert json.loads(succeeds("ls", "--json", mnt / "cold")) == {
        "files": [],
        "total": {"files": 0, "size": 0, "resident": 0, "volatile": 0, "purged": 0},
        "skipped": 0,
    }


def test_ls_lists_unlinked_files_still_held_open(mnt: Path, files: dict[str, int]) -> None:
    (mnt / "dir/with space").unlink()
    spaced = row(mnt / "dir/with space", files["dir/with space"], 1, deleted=True)
    hot = row(mnt / "hot", files["hot"], 1)
    assert table(succeeds("ls", mnt)) == [HEADER, hot, spaced, total([hot, spaced])]
    # Below the directory it was in, not below another.
    assert table(succeeds("ls", mnt / "dir"))[1] == (*spaced[:5], f"{mnt}/dir/with space (deleted)")
    (mnt / "other").mkdir()
    assert len(table(succeeds("ls", mnt / "other"))) == 2
    report = json.loads(succeeds("ls", "--json", mnt))
    assert [(f["path"], f["deleted"]) for f in report["files"]] == [
        (str(mnt / "hot"), False),
        (str(mnt / "dir/with space"), True),
    ]


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_ls_stays_on_the_mount_and_follows_no_symlinks(
    mnt: Path, files: dict[str, int], tmp_path: Path
) -> None:
    (mnt / "link").symlink_to(mnt / "hot")
    (mnt / "outside").symlink_to(tmp_path)
    os.link(mnt / "hot", mnt / "zz hard link")  # one file, listed once
    (tmp_path / "elsewhere").write_bytes(b"x")
    with tmpfs(mnt / "below", "1M") as below:
        (below / "tmpfs-file").write_bytes(b"x")
        result = vrangectl("ls", "--all", mnt)
    assert (result.returncode, result.stderr) == (0, "")
    assert [line[-1] for line in table(result.stdout)] == [
        "PATH",
        f"{mnt}/cold",
        f"{mnt}/dir/with space",
        f"{mnt}/hot",
        "TOTAL",
    ]


def test_ls_operands_that_are_not_on_volfs_fail(mnt: Path, tmp_path: Path) -> None:
    assert fails("ls", mnt, tmp_path) == f"vrangectl: {tmp_path}: not a file on a volfs mount\n"
    assert (
        fails("ls", mnt / "absent") == f"vrangectl: {mnt / 'absent'}: No such file or directory\n"
    )
    os.mkfifo(mnt / "fifo")
    assert (
        fails("ls", mnt / "fifo") == f"vrangectl: {mnt / 'fifo'}: not a regular file or directory\n"
    )
    assert vrangectl("ls").returncode == 2


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_ls_skips_what_the_user_cannot_open(
    tmp_path: Path, mount_volfs: Callable[..., Mount]
) -> None:
    mnt = mount_volfs("size=16M,allow_other").path
    with ExitStack() as stack:
        for name, mode in (("public", 0o644), ("private/secret", 0o600), ("locked", 0o600)):
            (mnt / name).parent.mkdir(mode=0o700, exist_ok=True)
            (mnt / name).write_bytes(bytes(2 * PAGE))
            (mnt / name).chmod(mode)
            fd = os.open(mnt / name, os.O_RDWR)
            stack.callback(os.close, fd)
            fvrange(fd, 0, PAGE, VRANGE_VOLATILE)
        top = os.open(mnt, os.O_RDONLY)  # the user cannot reach the mount's path
        stack.callback(os.close, top)
        status, stdout, stderr = as_nobody(tmp_path, ["ls", f"/dev/fd/{top}"], [top])
    assert status == 0, stderr
    assert table(stdout) == [
        HEADER,
        ("8192", "8192", "4096", "0", "1", f"/dev/fd/{top}/public"),
        ("8192", "8192", "4096", "0", "-", "TOTAL"),
    ]
    # The directory private and the file locked.
    assert (
        stderr
        == "vrangectl: skipped 2 files or directories that could not be opened: Permission denied\n"
    )
