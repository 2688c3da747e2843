"""tmpfs parity: fallocate modes, SEEK_DATA/SEEK_HOLE and st_blocks, side by side with tmpfs.

Each test runs the same calls on a volfs file and on a kernel tmpfs file of the same size cap
and compares what a program sees.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Mount
from volfs.client import VRANGE_VOLATILE, fvrange, purge

PAGE = 4096
MiB = 1 << 20
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting tmpfs needs root")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode, which the os module does not offer."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def outcome(call: Callable[[], object]) -> object:
    """The result of a call, or the errno it failed with: comparable across filesystems."""
    try:
        return call()
    except OSError as error:
        return f"errno {errno.errorcode.get(error.errno or 0, error.errno)}"


@pytest.fixture
def both(mount_volfs: Callable[..., Mount], tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A volfs and a tmpfs, both with a 16 MiB cap."""
    volfs = mount_volfs("size=16M").path
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16M", "tmpfs", str(tmpfs)], check=True)
    try:
        yield {"volfs": volfs, "tmpfs": tmpfs}
    finally:
        subprocess.run(["umount", str(tmpfs)], check=True)


def on_both(both: dict[str, Path], scenario: Callable[[Path], object]) -> dict[str, object]:
    return {name: scenario(root) for name, root in both.items()}


def assert_same(results: dict[str, object]) -> None:
    assert results["volfs"] == results["tmpfs"], results


def layout(fd: int) -> tuple[object, ...]:
    """What a program can learn about a file's data: size, blocks, and its data/hole map."""
    info = os.fstat(fd)
    points = [0, 100, PAGE, PAGE + 1, 3 * PAGE, MiB - 1, MiB, info.st_size - 1, info.st_size]
    seeks = tuple(
        outcome(lambda p=point, w=whence: os.lseek(fd, p, w))
        for point in points
        for whence in (os.SEEK_DATA, os.SEEK_HOLE)
    )
    return info.st_size, info.st_blocks, seeks


def test_fallocate_reserves_zeroed_space_and_keeps_size(both: dict[str, Path]) -> None:
    def scenario(root: Path) -> object:
        fd = os.open(root / "f", os.O_RDWR | os.O_CREAT)
        try:
            os.posix_fallocate(fd, 0, MiB)
            grown = layout(fd), os.pread(fd, MiB, 0) == bytes(MiB)
            fallocate(fd, FALLOC_FL_KEEP_SIZE, MiB, MiB)
            kept = layout(fd)
            too_big = outcome(lambda: fallocate(fd, 0, 0, 64 * MiB))
            return grown, kept, too_big, os.fstat(fd).st_size
        finally:
            os.close(fd)

    results = on_both(both, scenario)
    assert_same(results)
    assert results["volfs"][2] == "errno ENOSPC"  # type: ignore[index]


def test_punch_hole_frees_pages_and_reads_zeros(both: dict[str, Path]) -> None:
    data = os.urandom(2 * MiB)

    def scenario(root: Path) -> object:
        fd = os.open(root / "f", os.O_RDWR | os.O_CREAT)
        try:
            os.write(fd, data)
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, PAGE + 100, 3 * PAGE)
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, MiB, MiB + PAGE)
            without_keep = outcome(lambda: fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, PAGE))
            return layout(fd), os.pread(fd, 2 * MiB, 0), without_keep
        finally:
            os.close(fd)

    results = on_both(both, scenario)
    assert_same(results)
    contents = results["volfs"][1]  # type: ignore[index]
    assert contents[: PAGE + 100] == data[: PAGE + 100]
    assert contents[PAGE + 100 : 4 * PAGE + 100] == bytes(3 * PAGE)
    assert contents[MiB:] == bytes(MiB)


def test_unsupported_modes_fail_alike(both: dict[str, Path]) -> None:
    def scenario(root: Path) -> object:
        fd = os.open(root / "f", os.O_RDWR | os.O_CREAT)
        try:
            os.write(fd, bytes(4 * PAGE))
            return [
                outcome(lambda m=mode: fallocate(fd, m, 0, PAGE))
                for mode in (FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE)
            ]
        finally:
            os.close(fd)

    results = on_both(both, scenario)
    assert_same(results)
    assert results["volfs"] == ["errno ENOTSUP", "errno ENOTSUP"]  # EOPNOTSUPP on Linux


def test_zero_range_works_on_volfs(mnt: Path) -> None:
    """tmpfs lacks FALLOC_FL_ZERO_RANGE (EOPNOTSUPP); volfs zeroes and keeps the pages."""
    data = os.urandom(4 * PAGE)
    fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, data)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 100, 2 * PAGE)
        assert os.pread(fd, 4 * PAGE, 0) == data[:100] + bytes(2 * PAGE) + data[2 * PAGE + 100 :]
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 4 * PAGE, PAGE)
        assert os.fstat(fd).st_size == 5 * PAGE
        assert os.fstat(fd).st_blocks == 5 * PAGE // 512
    finally:
        os.close(fd)


def test_seek_data_and_hole_on_sparse_files(both: dict[str, Path]) -> None:
    def scenario(root: Path) -> object:
        fd = os.open(root / "f", os.O_RDWR | os.O_CREAT)
        try:
            os.pwrite(fd, b"a" * PAGE, 0)
            os.pwrite(fd, b"b" * 100, MiB + 10)
            os.ftruncate(fd, 3 * MiB)
            sparse = layout(fd)
            os.ftruncate(fd, MiB + 50)
            truncated = layout(fd)
            empty = os.open(root / "empty", os.O_RDWR | os.O_CREAT)
            try:
                nothing = layout(empty)
            finally:
                os.close(empty)
            return sparse, truncated, nothing
        finally:
            os.close(fd)

    assert_same(on_both(both, scenario))


def test_util_linux_fallocate_command(both: dict[str, Path]) -> None:
    def scenario(root: Path) -> object:
        path = root / "f"
        path.write_bytes(b"x" * (4 * PAGE))
        punch = subprocess.run(
            ["fallocate", "-p", "-o", str(PAGE), "-l", str(PAGE), str(path)], check=False
        )
        dig = subprocess.run(["fallocate", "-d", str(path)], check=False)
        data = path.read_bytes()
        return punch.returncode, dig.returncode, data, os.stat(path).st_blocks

    results = on_both(both, scenario)
    assert_same(results)
    assert results["volfs"][2] == b"x" * PAGE + bytes(PAGE) + b"x" * (2 * PAGE)  # type: ignore[index]


def test_purged_pages_are_holes_for_du_and_cp(mnt: Path, tmp_path: Path) -> None:
    data = os.urandom(4 * MiB)
    source = mnt / "cache"
    source.write_bytes(data)
    fd = os.open(source, os.O_RDWR)
    try:
        fvrange(fd, MiB, 2 * MiB, VRANGE_VOLATILE)
        assert os.fstat(fd).st_blocks == 4 * MiB // 512
        purge(mnt)
        assert os.fstat(fd).st_blocks == 2 * MiB // 512
        assert os.lseek(fd, MiB, os.SEEK_DATA) == 3 * MiB
        assert os.lseek(fd, 0, os.SEEK_HOLE) == MiB
        usage = subprocess.run(
            ["du", "-B1", str(source)], capture_output=True, text=True, check=True
        )
        assert usage.stdout.split()[0] == str(2 * MiB)
        copy = mnt / "copy"
        subprocess.run(["cp", "--sparse=always", str(source), str(copy)], check=True)
        assert os.stat(copy).st_blocks == 2 * MiB // 512
        copied = copy.read_bytes()
        assert copied == data[:MiB] + bytes(2 * MiB) + data[3 * MiB :]
    finally:
        os.close(fd)
