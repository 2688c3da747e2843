"""tmpfs parity: fallocate modes, SEEK_DATA/SEEK_HOLE and st_blocks, side by side with tmpfs.

Tests that use the ``both`` fixture run the same calls on a volfs file and on a kernel tmpfs file
of the same size cap and compare what a program sees; mounting tmpfs needs root, so only those
tests are skipped without it. Tests of what tmpfs cannot do (volatile ranges, purges, ZERO_RANGE)
run on volfs alone and assert the expected bytes, sizes and errnos outright.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.conftest import Mount
from volfs.abi import (
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_INSERT_RANGE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_UNSHARE_RANGE,
    FALLOC_FL_WRITE_ZEROES,
    FALLOC_FL_ZERO_RANGE,
)
from volfs.client import (
    VRANGE_NONVOLATILE,
    VRANGE_PARTIAL,
    VRANGE_VOLATILE,
    fvrange,
    purge,
    vrange_status,
)

PAGE = 4096
MiB = 1 << 20
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

_Result = TypeVar("_Result")

#: st_size, st_blocks, and where SEEK_DATA and SEEK_HOLE land from a few offsets.
Layout = tuple[int, int, tuple[int | str, ...]]

_needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting tmpfs needs root")


def mounts_tmpfs(test: Callable[..., None]) -> Callable[..., None]:
    """Mark a test that mounts a kernel tmpfs: it needs root and is skipped without it."""
    # Typed by hand: pytest's overloads of MarkDecorator.__call__ give Any for a Callable.
    marked: Callable[..., None] = _needs_root(pytest.mark.root(test))
    return marked


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) itself.

    glibc's ``fallocate()`` is a bare system call wrapper, so an EOPNOTSUPP from the filesystem
    reaches the caller. ``os.posix_fallocate`` would instead fall back to writing zeros, and a
    "reads as zeros" check would pass even if the filesystem refused the call.
    """
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def errno_name(error: OSError) -> str:
    """``"errno ENOSPC"`` and the like."""
    return f"errno {errno.errorcode.get(error.errno or 0, error.errno)}"


def outcome(call: Callable[[], _Result]) -> _Result | str:
    """The result of a call, or the errno it failed with: comparable across filesystems."""
    try:
        return call()
    except OSError as error:
        return errno_name(error)


def try_fallocate(fd: int, mode: int, offset: int, length: int) -> str:
    """fallocate(2) as a comparable outcome: ``"ok"`` or the errno it failed with."""
    try:
        fallocate(fd, mode, offset, length)
    except OSError as error:
        return errno_name(error)
    return "ok"


def seek(fd: int, offset: int, whence: int) -> int | str:
    """lseek(2), or the errno it failed with."""
    return outcome(lambda: os.lseek(fd, offset, whence))


def try_pread(fd: int, length: int, offset: int) -> bytes | str:
    """pread(2), or the errno it failed with."""
    return outcome(lambda: os.pread(fd, length, offset))


def write_all(fd: int, data: bytes) -> tuple[int, str]:
    """Write ``data`` as a careful program does, going on after short writes.

    Returns:
        The bytes written and how it ended: ``"done"`` or the errno that stopped it.
    """
    view = memoryview(data)
    written = 0
    while written < len(data):
        try:
            written += os.write(fd, view[written:])
        except OSError as error:
            return written, errno_name(error)
    return written, "done"


def used_bytes(root: Path) -> int:
    """Bytes in use as df(1) shows them."""
    info = os.statvfs(root)
    return (info.f_blocks - info.f_bfree) * info.f_frsize


def file_state(fd: int) -> tuple[int, int, bytes]:
    """Size, st_blocks and every byte of an open file."""
    info = os.fstat(fd)
    return info.st_size, info.st_blocks, os.pread(fd, info.st_size, 0)


@pytest.fixture
def tmpfs(mount_tmpfs: Callable[..., Path]) -> Path:
    """A kernel tmpfs with a 16 MiB cap; only tests marked ``mounts_tmpfs`` may use it."""
    return mount_tmpfs("16M")


@pytest.fixture
def both(mount_volfs: Callable[..., Mount], tmpfs: Path) -> dict[str, Path]:
    """A volfs and a tmpfs, both with a 16 MiB cap."""
    return {"volfs": mount_volfs("size=16M").path, "tmpfs": tmpfs}


@pytest.fixture
def small(mount_volfs: Callable[..., Mount]) -> Path:
    """A volfs with a 16 MiB cap, for tests of what happens when it is full."""
    return mount_volfs("size=16M").path


def on_both(both: dict[str, Path], scenario: Callable[[Path], _Result]) -> dict[str, _Result]:
    """Run ``scenario`` on the volfs and on the tmpfs."""
    return {name: scenario(root) for name, root in both.items()}


def assert_same(results: dict[str, _Result]) -> None:
    assert results["volfs"] == results["tmpfs"], results


def layout(fd: int) -> Layout:
    """What a program can learn about a file's data: size, blocks, and its data/hole map."""
    info = os.fstat(fd)
    points = [0, 100, PAGE, PAGE + 1, 3 * PAGE, MiB - 1, MiB, info.st_size - 1, info.st_size]
    seeks = tuple(
        seek(fd, point, whence) for point in points for whence in (os.SEEK_DATA, os.SEEK_HOLE)
    )
    return info.st_size, info.st_blocks, seeks


# -- fallocate mode 0 and KEEP_SIZE --------------------------------------------------------


@mounts_tmpfs
def test_fallocate_reserves_zeroed_space_and_keeps_size(both: dict[str, Path]) -> None:
    def scenario(root: Path) -> tuple[tuple[Layout, bytes], Layout, str, int]:
        fd = os.open(root / "f", os.O_RDWR | os.O_CREAT)
        try:
            os.pwrite(fd, b"kept", PAGE + 1)
            fallocate(fd, 0, 0, MiB)
            grown = layout(fd), os.pread(fd, MiB, 0)
            fallocate(fd, FALLOC_FL_KEEP_SIZE, MiB, MiB)
            kept = layout(fd)
            too_big = try_fallocate(fd, 0, 0, 64 * MiB)
            return grown, kept, too_big, os.fstat(fd).st_size
        finally:
            os.close(fd)

    results = on_both(both, scenario)
    assert_same(results)
    grown, kept, too_big, size = results["volfs"]
    assert grown[1] == bytes(PAGE + 1) + b"kept" + bytes(MiB - PAGE - 5)
    assert grown[0][:2] == (MiB, MiB // 512)
    assert kept[:2] == (MiB, 2 * MiB // 512)
    assert (too_big, size) == ("errno ENOSPC", MiB)


def test_fallocate_on_a_full_mount_purges_volatile_data_first(small: Path) -> None:
    """12 MiB volatile on a 16 MiB mount: a 10 MiB reservation purges it and succeeds."""
    cache = os.open(small / "cache", os.O_RDWR | os.O_CREAT)
    reserved = os.open(small / "reserved", os.O_RDWR | os.O_CREAT)
    try:
        assert write_all(cache, os.urandom(12 * MiB)) == (12 * MiB, "done")
        fvrange(cache, 0, 12 * MiB, VRANGE_VOLATILE)

        fallocate(reserved, 0, 0, 10 * MiB)

        assert file_state(reserved) == (10 * MiB, 10 * MiB // 512, bytes(10 * MiB))
        assert fvrange(cache, 0, 12 * MiB, VRANGE_NONVOLATILE) == (12 * MiB, True)
        assert file_state(cache) == (12 * MiB, 0, bytes(12 * MiB))
        assert used_bytes(small) == 10 * MiB
    finally:
        os.close(cache)
        os.close(reserved)


def test_fallocate_fails_with_enospc_only_once_no_volatile_data_is_left(small: Path) -> None:
    """Not enough even after purging: ENOSPC, the volatile data gone, the target untouched."""
    fill = os.open(small / "fill", os.O_RDWR | os.O_CREAT)
    cache = os.open(small / "cache", os.O_RDWR | os.O_CREAT)
    target = os.open(small / "target", os.O_RDWR | os.O_CREAT)
    try:
        assert write_all(fill, b"f" * (12 * MiB)) == (12 * MiB, "done")
        assert write_all(cache, b"c" * (2 * MiB)) == (2 * MiB, "done")
        fvrange(cache, 0, 2 * MiB, VRANGE_VOLATILE)
        assert write_all(target, os.urandom(MiB)) == (MiB, "done")
        before = file_state(target)
        # 3.5 MiB of holes to fill; 1 MiB free plus 2 MiB volatile is not enough.
        failed = try_fallocate(target, 0, MiB // 2, 4 * MiB)
        failed_keep = try_fallocate(target, FALLOC_FL_KEEP_SIZE, 0, 8 * MiB)

        assert (failed, failed_keep) == ("errno ENOSPC", "errno ENOSPC")
        assert file_state(target) == before
        assert vrange_status(cache) == (2 * MiB, 2 * MiB)
        assert used_bytes(small) == 13 * MiB
        assert os.lseek(target, 0, os.SEEK_HOLE) == MiB
    finally:
        for fd in (fill, cache, target):
            os.close(fd)


def test_fallocate_purges_only_what_it_needs_of_a_partial_range(small: Path) -> None:
    """DESIGN 6: a VRANGE_PARTIAL range loses only as much as the pressure needs.

    The reservation covers 1 MiB the file already holds and 2 MiB of holes; with 1 MiB free,
    exactly 1 MiB of the volatile range has to go.
    """
    target = os.open(small / "target", os.O_RDWR | os.O_CREAT)
    fill = os.open(small / "fill", os.O_RDWR | os.O_CREAT)
    cache = os.open(small / "cache", os.O_RDWR | os.O_CREAT)
    try:
        assert write_all(target, b"t" * MiB) == (MiB, "done")
        assert write_all(fill, b"f" * (10 * MiB)) == (10 * MiB, "done")
        assert write_all(cache, b"c" * (4 * MiB)) == (4 * MiB, "done")
        fvrange(cache, 0, 4 * MiB, VRANGE_VOLATILE, VRANGE_PARTIAL)

        fallocate(target, 0, 0, 3 * MiB)

        assert os.fstat(target).st_blocks == 3 * MiB // 512
        assert vrange_status(cache) == (4 * MiB, MiB)
        assert used_bytes(small) == 16 * MiB
    finally:
        for fd in (target, fill, cache):
            os.close(fd)


@mounts_tmpfs
def test_failed_fallocate_changes_nothing_as_on_tmpfs(both: dict[str, Path]) -> None:
    data = os.urandom(MiB)

    def scenario(
        root: Path,
    ) -> tuple[tuple[tuple[int, int, bytes], int], list[str], tuple[int, int, bytes], int]:
        fill = os.open(root / "fill", os.O_RDWR | os.O_CREAT)
        target = os.open(root / "target", os.O_RDWR | os.O_CREAT)
        try:
            write_all(fill, b"f" * (12 * MiB))
            write_all(target, data)
            before = file_state(target), used_bytes(root)
            failed = [
                try_fallocate(target, 0, MiB // 2, 8 * MiB),
                try_fallocate(target, FALLOC_FL_KEEP_SIZE, 0, 8 * MiB),
            ]
            return before, failed, file_state(target), used_bytes(root)
        finally:
            os.close(fill)
            os.close(target)

    results = on_both(both, scenario)
    assert_same(results)
    before, failed, after, used = results["volfs"]
    assert failed == ["errno ENOSPC", "errno ENOSPC"]
    assert after == before[0] == (MiB, MiB // 512, data)
    assert used == before[1] == 13 * MiB


@mounts_tmpfs
def test_fallocated_space_counts_against_the_size_cap(both: dict[str, Path]) -> None:
    """A 12 MiB reservation on a 16 MiB mount leaves room for 4 MiB of writes, as on tmpfs."""

    def scenario(root: Path) -> tuple[object, ...]:
        reserve = os.open(root / "reserve", os.O_RDWR | os.O_CREAT)
        writer = os.open(root / "writer", os.O_RDWR | os.O_CREAT)
        try:
            fallocate(reserve, 0, 0, 12 * MiB)
            reserved = used_bytes(root)
            blocked = write_all(writer, b"w" * (8 * MiB))
            full = os.fstat(writer).st_size, os.fstat(writer).st_blocks, used_bytes(root)
            fallocate(reserve, PUNCH, 0, 12 * MiB)
            released = used_bytes(root)
            rest = write_all(writer, b"w" * (4 * MiB))
            return reserved, blocked, full, released, rest, used_bytes(root)
        finally:
            os.close(reserve)
            os.close(writer)

    results = on_both(both, scenario)
    assert_same(results)
    assert results["volfs"] == (
        12 * MiB,
        (4 * MiB, "errno ENOSPC"),
        (4 * MiB, 4 * MiB // 512, 16 * MiB),
        4 * MiB,
        (4 * MiB, "done"),
        8 * MiB,
    )


# -- punching, zeroing --------------------------------------------------------------------


@mounts_tmpfs
def test_punch_hole_frees_pages_and_reads_zeros(both: dict[str, Path]) -> None:
    data = os.urandom(2 * MiB)

    def scenario(root: Path) -> tuple[Layout, bytes, str]:
        fd = os.open(root / "f", os.O_RDWR | os.O_CREAT)
        try:
            os.write(fd, data)
            fallocate(fd, PUNCH, PAGE + 100, 3 * PAGE)
            fallocate(fd, PUNCH, MiB, MiB + PAGE)
            # The kernel refuses this one itself, on either filesystem.
            without_keep = try_fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, PAGE)
            return layout(fd), os.pread(fd, 2 * MiB, 0), without_keep
        finally:
            os.close(fd)

    results = on_both(both, scenario)
    assert_same(results)
    contents = results["volfs"][1]
    assert contents[: PAGE + 100] == data[: PAGE + 100]
    assert contents[PAGE + 100 : 4 * PAGE + 100] == bytes(3 * PAGE)
    assert contents[MiB:] == bytes(MiB)


@mounts_tmpfs
def test_unsupported_modes_fail_alike(both: dict[str, Path]) -> None:
    """Modes neither filesystem offers fail with EOPNOTSUPP on both.

    A parity check only: the kernel's FUSE client refuses every mode but KEEP_SIZE,
    PUNCH_HOLE and ZERO_RANGE (and the VFS refuses PUNCH_HOLE without KEEP_SIZE) before the
    daemon is asked, so this cannot catch a daemon that accepted them. The daemon's own
    refusal is tested without the kernel in tests/model/test_fallocate_core.py.
    """
    modes = (
        FALLOC_FL_COLLAPSE_RANGE,
        FALLOC_FL_INSERT_RANGE,
        FALLOC_FL_UNSHARE_RANGE,
        FALLOC_FL_WRITE_ZEROES,
        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
    )

    def scenario(root: Path) -> tuple[list[str], tuple[int, int, bytes]]:
        fd = os.open(root / "f", os.O_RDWR | os.O_CREAT)
        try:
            os.write(fd, b"x" * (4 * PAGE))
            failures = [try_fallocate(fd, mode, 0, PAGE) for mode in modes]
            return failures, file_state(fd)
        finally:
            os.close(fd)

    results = on_both(both, scenario)
    assert_same(results)
    assert results["volfs"] == (
        ["errno ENOTSUP"] * len(modes),  # EOPNOTSUPP on Linux
        (4 * PAGE, 4 * PAGE // 512, b"x" * (4 * PAGE)),
    )


def test_zero_range_zeroes_and_allocates_with_or_without_keep_size(mnt: Path) -> None:
    """FALLOC_FL_ZERO_RANGE|KEEP_SIZE and util-linux ``fallocate -z`` (ZERO_RANGE alone).

    The range reads as zeros and every page of it is held (st_blocks). Pages that were data
    stay data for SEEK_DATA; pages it had to allocate are reserved, not written, so SEEK_DATA
    skips them, as it does pages reserved by mode 0 on tmpfs.
    """
    data = os.urandom(12 * PAGE)
    path = mnt / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, data[: 4 * PAGE], 0)
        os.pwrite(fd, data[8 * PAGE :], 8 * PAGE)  # pages 4 to 7 are a hole

        # To page 14, two pages past EOF: they are held but the size stays.
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 2 * PAGE + 100, 12 * PAGE - 100)

        zeroed = data[: 2 * PAGE + 100] + bytes(10 * PAGE - 100)
        assert file_state(fd) == (12 * PAGE, 14 * PAGE // 512, zeroed)
        seeks = [
            seek(fd, 0, os.SEEK_DATA),
            seek(fd, 0, os.SEEK_HOLE),
            seek(fd, 4 * PAGE, os.SEEK_DATA),
            seek(fd, 8 * PAGE, os.SEEK_HOLE),
        ]
        assert seeks == [0, 4 * PAGE, 8 * PAGE, 12 * PAGE]

        command = ["fallocate", "-z", "-o", str(11 * PAGE), "-l", str(4 * PAGE), str(path)]
        run = subprocess.run(command, capture_output=True, text=True, check=False)

        assert (run.returncode, run.stderr) == (0, "")
        assert file_state(fd) == (
            15 * PAGE,
            15 * PAGE // 512,
            data[: 2 * PAGE + 100] + bytes(13 * PAGE - 100),
        )
        assert os.lseek(fd, 8 * PAGE, os.SEEK_HOLE) == 12 * PAGE
        assert seek(fd, 12 * PAGE, os.SEEK_DATA) == "errno ENXIO"
    finally:
        os.close(fd)


@mounts_tmpfs
def test_zero_range_is_refused_by_tmpfs_and_done_by_volfs(both: dict[str, Path]) -> None:
    """tmpfs answers EOPNOTSUPP to ZERO_RANGE (and ``fallocate -z`` fails); volfs zeroes."""

    def scenario(root: Path) -> tuple[list[str], int, tuple[int, int, bytes]]:
        path = root / "f"
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        try:
            os.write(fd, b"x" * (4 * PAGE))
            calls = [
                try_fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, PAGE),
                try_fallocate(fd, FALLOC_FL_ZERO_RANGE, PAGE, PAGE),
            ]
            command = ["fallocate", "-z", "-o", str(2 * PAGE), "-l", str(4 * PAGE), str(path)]
            run = subprocess.run(command, capture_output=True, check=False)
            return calls, run.returncode, file_state(fd)
        finally:
            os.close(fd)

    results = on_both(both, scenario)
    assert results["tmpfs"] == (
        ["errno ENOTSUP", "errno ENOTSUP"],
        1,
        (4 * PAGE, 4 * PAGE // 512, b"x" * (4 * PAGE)),
    )
    assert results["volfs"] == (["ok", "ok"], 0, (6 * PAGE, 6 * PAGE // 512, bytes(6 * PAGE)))


# -- punching and zeroing inside volatile ranges --------------------------------------------


def test_punch_in_an_unpurged_volatile_range_is_a_hole_not_a_purge(mnt: Path) -> None:
    data = os.urandom(MiB)
    fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, data)
        fvrange(fd, 0, MiB, VRANGE_VOLATILE)

        fallocate(fd, PUNCH, 4 * PAGE, 4 * PAGE)

        assert file_state(fd) == (
            MiB,
            (MiB - 4 * PAGE) // 512,
            data[: 4 * PAGE] + bytes(4 * PAGE) + data[8 * PAGE :],
        )
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 4 * PAGE
        assert os.lseek(fd, 4 * PAGE, os.SEEK_DATA) == 8 * PAGE
        assert vrange_status(fd) == (MiB, 0)
        assert fvrange(fd, 4 * PAGE, 4 * PAGE, VRANGE_NONVOLATILE) == (4 * PAGE, False)
        assert fvrange(fd, 0, MiB, VRANGE_NONVOLATILE) == (MiB, False)
    finally:
        os.close(fd)


def test_punch_or_zero_in_a_purged_volatile_range_reads_zeros_while_volatile(mnt: Path) -> None:
    """Punched (or zeroed) pages of a purged range are zeros at once; the rest still EIO."""
    fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, os.urandom(MiB))
        fvrange(fd, 0, MiB, VRANGE_VOLATILE)
        assert purge(mnt) == MiB
        assert try_pread(fd, PAGE, 4 * PAGE) == "errno EIO"

        fallocate(fd, PUNCH, 4 * PAGE, 4 * PAGE)
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 16 * PAGE, 4 * PAGE)

        assert os.pread(fd, 4 * PAGE, 4 * PAGE) == bytes(4 * PAGE)
        assert os.pread(fd, 4 * PAGE, 16 * PAGE) == bytes(4 * PAGE)
        assert try_pread(fd, PAGE, 3 * PAGE) == "errno EIO"
        assert try_pread(fd, PAGE, 8 * PAGE) == "errno EIO"
        assert try_pread(fd, PAGE, 20 * PAGE) == "errno EIO"
        assert os.lseek(fd, 4 * PAGE, os.SEEK_HOLE) == 4 * PAGE
        assert os.fstat(fd).st_blocks == 4 * PAGE // 512  # the zeroed pages are held
        assert vrange_status(fd) == (MiB, MiB - 8 * PAGE)
        # The punched bytes had been purged while volatile, and NON_VOLATILE says so.
        assert fvrange(fd, 4 * PAGE, 4 * PAGE, VRANGE_NONVOLATILE) == (4 * PAGE, True)
        assert fvrange(fd, 0, MiB, VRANGE_NONVOLATILE) == (MiB, True)
        assert os.pread(fd, MiB, 0) == bytes(MiB)
    finally:
        os.close(fd)


def test_a_punch_is_a_hole_until_a_purge_takes_its_range_whole(mnt: Path) -> None:
    """Punching inside a volatile range makes holes, not purged data; a purge is per range.

    As with ashmem's unpinned regions, a purge takes a FULL range as a whole, whatever it
    holds: afterwards the range is purged (EIO while volatile, purged=1 on unmarking), holes
    included, and frees only the pages that were held.
    """
    fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, os.urandom(16 * PAGE))
        fvrange(fd, 0, 16 * PAGE, VRANGE_VOLATILE)
        fallocate(fd, PUNCH, 0, 12 * PAGE)
        assert os.fstat(fd).st_blocks == 4 * PAGE // 512
        assert os.pread(fd, 12 * PAGE, 0) == bytes(12 * PAGE)  # a hole, readable while volatile
        assert vrange_status(fd) == (16 * PAGE, 0)

        assert purge(mnt) == 4 * PAGE  # only the held pages were memory
        assert vrange_status(fd) == (16 * PAGE, 16 * PAGE)
        assert try_pread(fd, PAGE, 0) == "errno EIO"
        assert fvrange(fd, 0, 16 * PAGE, VRANGE_NONVOLATILE) == (16 * PAGE, True)
        assert os.pread(fd, 16 * PAGE, 0) == bytes(16 * PAGE)
    finally:
        os.close(fd)


# -- SEEK_DATA / SEEK_HOLE, st_blocks, tools --------------------------------------------------


@mounts_tmpfs
def test_seek_data_and_hole_on_sparse_files(both: dict[str, Path]) -> None:
    def scenario(root: Path) -> tuple[Layout, Layout, Layout]:
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


@mounts_tmpfs
def test_util_linux_fallocate_command(both: dict[str, Path]) -> None:
    def scenario(root: Path) -> tuple[int, int, bytes, int]:
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
    assert results["volfs"][2] == b"x" * PAGE + bytes(PAGE) + b"x" * (2 * PAGE)


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


@mounts_tmpfs
def test_purged_range_looks_like_a_punched_tmpfs_range(both: dict[str, Path]) -> None:
    """Purged and unmarked on volfs, punched on tmpfs: same layout, blocks and sparse copies."""
    data = os.urandom(4 * MiB)

    def purge_middle(root: Path, fd: int) -> None:
        fvrange(fd, MiB, 2 * MiB, VRANGE_VOLATILE)
        assert purge(root) == 2 * MiB
        assert fvrange(fd, MiB, 2 * MiB, VRANGE_NONVOLATILE) == (2 * MiB, True)

    def punch_middle(root: Path, fd: int) -> None:
        fallocate(fd, PUNCH, MiB, 2 * MiB)

    def scenario(
        root: Path, drop: Callable[[Path, int], None]
    ) -> tuple[tuple[Layout, bytes], tuple[Layout, bytes]]:
        source = root / "source"
        copy = root / "copy"
        fd = os.open(source, os.O_RDWR | os.O_CREAT)
        try:
            assert write_all(fd, data) == (4 * MiB, "done")
            drop(root, fd)
            original = layout(fd), os.pread(fd, 4 * MiB, 0)
        finally:
            os.close(fd)
        subprocess.run(["cp", "--sparse=always", str(source), str(copy)], check=True)
        fd = os.open(copy, os.O_RDONLY)
        try:
            return original, (layout(fd), os.pread(fd, 4 * MiB, 0))
        finally:
            os.close(fd)

    results = {
        "volfs": scenario(both["volfs"], purge_middle),
        "tmpfs": scenario(both["tmpfs"], punch_middle),
    }
    assert_same(results)
    original, copied = results["volfs"]
    assert original[1] == copied[1] == data[:MiB] + bytes(2 * MiB) + data[3 * MiB :]
    assert original[0][:2] == copied[0][:2] == (4 * MiB, 2 * MiB // 512)
