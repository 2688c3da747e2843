"""VOLFS_IOC_FILE_INFO on real mounts: which files hold volatile or purged data, and how much."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.conftest import wait_for
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


def errno_of(call: Callable[[], object]) -> int | None:
    try:
        call()
    except OSError as error:
        return error.errno
    return None


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
