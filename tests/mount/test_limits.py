"""Absurd inputs: extreme offsets and sizes, long names, deep trees, huge directories and range
sets. Where a kernel tmpfs can answer the same call, volfs must answer alike; either way the
daemon must keep answering (the fixture also checks it exits 0 without logging an exception).

``VOLFS_LIMITS_FILES`` (default 100000) files in one directory and ``VOLFS_LIMITS_RANGES``
(default 1000000) volatile ranges in one file can be raised for longer runs, e.g.
``VOLFS_LIMITS_FILES=1000000 scripts/test.sh tests/mount/test_limits.py``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Mount, is_mounted
from volfs import abi
from volfs.client import (
    VRANGE_NONVOLATILE,
    VRANGE_PARTIAL,
    VRANGE_VOLATILE,
    fvrange,
    purge,
    statistics,
    vrange_status,
)

PAGE = 4096
MiB = 1 << 20
TiB = 1 << 40
#: The kernel's largest offset and file size (MAX_LFS_FILESIZE on 64-bit).
MAX_OFFSET = (1 << 63) - 1
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

FILES = int(os.environ.get("VOLFS_LIMITS_FILES", "100000"))
RANGES = int(os.environ.get("VOLFS_LIMITS_RANGES", "1000000"))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.ftruncate.argtypes = [ctypes.c_int, ctypes.c_int64]
_libc.lseek.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int]
_libc.lseek.restype = ctypes.c_int64

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting tmpfs needs root")


def _check(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode and signed 64-bit arguments."""
    _check(_libc.fallocate(fd, mode, offset, length))


def ftruncate(fd: int, length: int) -> None:
    """ftruncate(2) that passes negative lengths through to the kernel."""
    _check(_libc.ftruncate(fd, length))


def lseek(fd: int, offset: int, whence: int) -> int:
    """lseek(2) that passes any signed 64-bit offset through to the kernel."""
    return _check(_libc.lseek(fd, offset, whence))


def outcome(call: Callable[[], object]) -> object:
    """The result of a call, or the errno it failed with: comparable across filesystems."""
    try:
        return call()
    except OSError as error:
        return f"errno {errno.errorcode.get(error.errno or 0, error.errno)}"


def settled_free_inodes(root: Path, expected: int, timeout: float = 10.0) -> int:
    """``f_ffree`` once it reaches ``expected``, or as it is after ``timeout`` seconds: a
    removed inode's slot comes back when the kernel forgets it, which it tells the daemon a
    moment after the unlink or close that let go of it (it may queue a FORGET behind other
    requests)."""
    deadline = time.monotonic() + timeout
    while (free := os.statvfs(root).f_ffree) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return free


def assert_answers(root: Path) -> None:
    """The daemon still serves: statfs, a create, a write and a read back."""
    os.statvfs(root)
    probe = root / ".still-answering"
    probe.write_bytes(b"alive")
    assert probe.read_bytes() == b"alive"
    probe.unlink()


@pytest.fixture
def both(
    mount_volfs: Callable[..., Mount], mount_tmpfs: Callable[..., Path]
) -> Iterator[dict[str, Path]]:
    """A volfs and a tmpfs, both with a 64 MiB cap and at most 100000 inodes."""
    volfs = mount_volfs("size=64M,nr_inodes=100000").path
    yield {"volfs": volfs, "tmpfs": mount_tmpfs("64M", nr_inodes=100000)}
    assert_answers(volfs)


def on_both(both: dict[str, Path], scenario: Callable[[Path], object]) -> dict[str, object]:
    return {name: scenario(root) for name, root in both.items()}


def assert_same(results: dict[str, object]) -> object:
    assert results["volfs"] == results["tmpfs"], results
    return results["volfs"]


# -- offsets near 2**63 -----------------------------------------------------------------------


@needs_root
def test_offsets_near_two_to_the_63_fail_as_on_tmpfs(both: dict[str, Path]) -> None:
    """Calls past or across the largest offset fail with the errno tmpfs gives."""

    def scenario(root: Path) -> object:
        fd = os.open(root / "f", os.O_RDWR | os.O_CREAT)
        try:
            os.write(fd, b"head")
            calls: dict[str, Callable[[], object]] = {
                "pwrite at 2**63-1": lambda: os.pwrite(fd, b"x", MAX_OFFSET),
                "pwrite across 2**63": lambda: os.pwrite(fd, b"xy" * 8, MAX_OFFSET - 3),
                "pwrite at -1": lambda: os.pwrite(fd, b"x", -1),
                "pread at 2**63-1": lambda: os.pread(fd, 1, MAX_OFFSET),
                "pread 0 at 2**63-1": lambda: os.pread(fd, 0, MAX_OFFSET),
                "pread across 2**63": lambda: os.pread(fd, 16, MAX_OFFSET - 3),
                "pread at -1": lambda: os.pread(fd, 1, -1),
                "truncate -1": lambda: ftruncate(fd, -1),
                "truncate -2**63": lambda: ftruncate(fd, -(1 << 63)),
                "fallocate to 2**63": lambda: fallocate(fd, 0, MAX_OFFSET + 1 - PAGE, PAGE),
                "fallocate len 2**63-1": lambda: fallocate(fd, 0, PAGE, MAX_OFFSET),
                "fallocate at -1": lambda: fallocate(fd, 0, -1, PAGE),
                "fallocate len 0": lambda: fallocate(fd, 0, 0, 0),
                "fallocate len -1": lambda: fallocate(fd, 0, 0, -1),
                "punch to 2**63": lambda: fallocate(
                    fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, MAX_OFFSET - 1, 2
                ),
                "keep-size to 2**63": lambda: fallocate(fd, FALLOC_FL_KEEP_SIZE, MAX_OFFSET - 1, 2),
                "seek set 2**63-1": lambda: lseek(fd, MAX_OFFSET, os.SEEK_SET),
                "seek set -1": lambda: lseek(fd, -1, os.SEEK_SET),
                "seek cur past 2**63": lambda: lseek(fd, 2, os.SEEK_CUR),
                "seek end 2**63-1": lambda: lseek(fd, MAX_OFFSET, os.SEEK_END),
                "seek data 2**63-1": lambda: lseek(fd, MAX_OFFSET, os.SEEK_DATA),
                "seek hole 2**63-1": lambda: lseek(fd, MAX_OFFSET, os.SEEK_HOLE),
                "seek data -1": lambda: lseek(fd, -1, os.SEEK_DATA),
                "seek hole -1": lambda: lseek(fd, -1, os.SEEK_HOLE),
            }
            results = {}
            for name, call in calls.items():
                # The position matters to SEEK_CUR: start each call from the same place.
                lseek(fd, MAX_OFFSET - 1, os.SEEK_SET)
                results[name] = outcome(call)
            info = os.fstat(fd)
            results["size, blocks"] = (info.st_size, info.st_blocks)
            results["data"] = os.pread(fd, 16, 0)
            return results
        finally:
            os.close(fd)

    results = assert_same(on_both(both, scenario))
    assert isinstance(results, dict)
    assert results["size, blocks"] == (4, 8), "a failed call changed the file"
    assert results["pwrite at 2**63-1"] == "errno EINVAL"
    assert results["fallocate to 2**63"] == "errno EFBIG"


@needs_root
def test_a_file_of_nearly_2_to_the_63_bytes_works_as_on_tmpfs(both: dict[str, Path]) -> None:
    """Near the largest offset: sparse growth, writes, holes, seeks, reads."""
    last_page = MAX_OFFSET + 1 - 2 * PAGE  # the page below the last one

    def scenario(root: Path) -> object:
        fd = os.open(root / "huge", os.O_RDWR | os.O_CREAT)
        try:
            steps: dict[str, object] = {}
            steps["write at the top"] = outcome(lambda: os.pwrite(fd, b"top" * 100, last_page))
            steps["write at 0"] = os.pwrite(fd, b"bottom", 0)
            info = os.fstat(fd)
            steps["size, blocks"] = (info.st_size, info.st_blocks)
            steps["read top"] = os.pread(fd, 400, last_page)
            steps["read the hole"] = os.pread(fd, 8, 1 << 62)
            steps["seeks"] = [
                outcome(lambda w=whence, o=offset: lseek(fd, o, w))
                for whence in (os.SEEK_DATA, os.SEEK_HOLE)
                for offset in (0, PAGE, 1 << 62, last_page, last_page + 299, last_page + 300)
            ]
            steps["seek end"] = lseek(fd, 0, os.SEEK_END)
            steps["punch the top"] = outcome(
                lambda: fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, last_page, PAGE)
            )
            steps["blocks after punch"] = os.fstat(fd).st_blocks
            steps["reserve below the top"] = outcome(
                lambda: fallocate(fd, FALLOC_FL_KEEP_SIZE, last_page - PAGE, PAGE)
            )
            steps["truncate to the top"] = outcome(lambda: ftruncate(fd, last_page + PAGE))
            steps["truncate down"] = outcome(lambda: ftruncate(fd, 10))
            info = os.fstat(fd)
            steps["after"] = (info.st_size, info.st_blocks, os.pread(fd, 100, 0))
            return steps
        finally:
            os.close(fd)

    steps = assert_same(on_both(both, scenario))
    assert isinstance(steps, dict)
    assert steps["read top"] == b"top" * 100
    assert steps["after"] == (10, 8, b"bottom\0\0\0\0")


@needs_root
def test_the_largest_file_size_is_the_kernels(both: dict[str, Path]) -> None:
    """2**63-1 bytes (MAX_LFS_FILESIZE), up to the last byte, as on tmpfs."""

    def scenario(root: Path) -> object:
        fd = os.open(root / "top", os.O_RDWR | os.O_CREAT)
        try:
            return {
                "write the last byte": outcome(lambda: os.pwrite(fd, b"z", MAX_OFFSET - 1)),
                "truncate to 2**63-1": outcome(lambda: ftruncate(fd, MAX_OFFSET)),
                "size": os.fstat(fd).st_size,
                "fallocate the last page": outcome(
                    lambda: fallocate(fd, FALLOC_FL_KEEP_SIZE, MAX_OFFSET + 1 - PAGE, PAGE - 1)
                ),
                "write across the last page": outcome(
                    lambda: os.pwrite(fd, b"ab", MAX_OFFSET + 1 - PAGE - 1)
                ),
                "read the last byte": outcome(lambda: os.pread(fd, 1, MAX_OFFSET - 1)),
            }
        finally:
            os.close(fd)

    results = assert_same(on_both(both, scenario))
    assert isinstance(results, dict)
    assert results["size"] == MAX_OFFSET


def test_volatility_of_the_largest_file(mnt: Path) -> None:
    """Ranges of up to 2**51 pages (2**63 bytes, the page-rounded end of a 2**63-1 byte file):
    marked, counted, purged and unmarked in O(log n)."""
    rounded = 1 << 63
    fd = os.open(mnt / "huge", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, MAX_OFFSET)
        os.pwrite(fd, b"a" * PAGE, 0)
        os.pwrite(fd, b"m" * PAGE, 1 << 62)
        assert fvrange(fd, 0, 0, VRANGE_VOLATILE) == (rounded, False)
        assert vrange_status(fd) == (rounded, 0)
        assert statistics(fd)["volatile_bytes"] == rounded
        assert fvrange(fd, (1 << 62) + PAGE, 0, VRANGE_NONVOLATILE) == (
            rounded - (1 << 62) - PAGE,
            False,
        )
        assert vrange_status(fd) == ((1 << 62) + PAGE, 0)
        assert purge(mnt) == 2 * PAGE
        assert vrange_status(fd) == ((1 << 62) + PAGE, (1 << 62) + PAGE)
        for offset in (0, 1 << 61, 1 << 62):
            with pytest.raises(OSError) as caught:
                os.pread(fd, 10, offset)
            assert caught.value.errno == errno.EIO
        assert os.pread(fd, 10, rounded - PAGE) == bytes(10)  # never volatile: a hole
        assert fvrange(fd, 0, 0, VRANGE_NONVOLATILE) == (rounded, True)
        assert os.pread(fd, 10, 1 << 62) == bytes(10)
        assert vrange_status(fd) == (0, 0)
        assert os.fstat(fd).st_blocks == 0
    finally:
        os.close(fd)
    assert statistics(mnt)["volatile_bytes"] == 0
    assert_answers(mnt)


def test_purging_the_whole_of_the_largest_file(mount_volfs: Callable[..., Mount]) -> None:
    """fvrange(fd, 0, 0) of a 2**63-1 byte file is one range of 2**63 bytes: it must be purged,
    and dropped from the kernel's cache, like any other, by request and at the size cap."""
    mnt = mount_volfs("size=8M").path
    last = (1 << 63) - PAGE
    fd = os.open(mnt / "huge", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, MAX_OFFSET)
        cached = os.urandom(PAGE - 1)
        os.pwrite(fd, cached, last)
        assert os.pread(fd, PAGE - 1, last) == cached  # now in the kernel's page cache
        assert fvrange(fd, 0, 0, VRANGE_VOLATILE) == (1 << 63, False)
        assert purge(mnt) == PAGE
        with pytest.raises(OSError) as caught:
            os.pread(fd, 10, last)  # not the cached bytes
        assert caught.value.errno == errno.EIO
        assert fvrange(fd, 0, 0, VRANGE_NONVOLATILE) == (1 << 63, True)

        # At the size cap: 6 MiB of volatile data in the file must make room for 6 MiB more.
        os.pwrite(fd, b"v" * (6 * MiB), 0)
        assert fvrange(fd, 0, 0, VRANGE_VOLATILE) == (1 << 63, False)
        (mnt / "other").write_bytes(b"o" * (6 * MiB))
        assert fvrange(fd, 0, 0, VRANGE_NONVOLATILE) == (1 << 63, True)
        assert (mnt / "other").read_bytes() == b"o" * (6 * MiB)
    finally:
        os.close(fd)
    assert_answers(mnt)


def ioctl_errno(fd: int, command: int, record: bytes) -> int | None:
    """Run one ioctl; return its errno, or None if it succeeded."""
    try:
        fcntl.ioctl(fd, command, bytearray(record), True)
    except OSError as error:
        return error.errno
    return None


#: Spans whose end overflows 64 bits, or lies past the page-rounded end of the largest file.
BAD_SPANS = [
    (2**64 - PAGE, PAGE),  # ends exactly at 2**64
    (2**64 - PAGE, 2 * PAGE),
    (PAGE, 2**64 - PAGE),
    (2**63, 2**63),
    (2**64 - PAGE, 2**64 - PAGE),
    (2**64 - PAGE, 0),  # "to EOF" from past it
    (0, 2**64 - PAGE),
    (2**63 - PAGE, 2 * PAGE),
]


def test_fvrange_spans_that_overflow_are_einval(mnt: Path) -> None:
    fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, MAX_OFFSET)  # as large as a file gets: only overflow is left
        fvrange(fd, 0, PAGE, VRANGE_VOLATILE)
        for start, length in BAD_SPANS:
            for mode in (VRANGE_VOLATILE, VRANGE_NONVOLATILE):
                record = abi.VRANGE_ARGS.pack(start, length, mode, 0, 0, 0, 0)
                failed = ioctl_errno(fd, abi.VOLFS_IOC_VRANGE, record)
                assert failed == errno.EINVAL, (start, length, mode)
            record = abi.VRANGE_STATUS.pack(start, length, 0, 0)
            failed = ioctl_errno(fd, abi.VOLFS_IOC_VRANGE_STATUS, record)
            assert failed == errno.EINVAL, (start, length)
        assert vrange_status(fd) == (PAGE, 0), "a refused request changed the ranges"
        # The largest spans that fit are fine: up to the page-rounded end, 2**63.
        assert vrange_status(fd, (1 << 63) - PAGE, PAGE) == (0, 0)
        assert fvrange(fd, PAGE, (1 << 63) - PAGE, VRANGE_VOLATILE) == ((1 << 63) - PAGE, False)
        assert vrange_status(fd) == (1 << 63, 0)
    finally:
        os.close(fd)
    assert_answers(mnt)


# -- the size cap -----------------------------------------------------------------------------


@needs_root
def test_size_larger_than_ram_mounts_and_df_shows_it(
    mount_volfs: Callable[..., Mount], mount_tmpfs: Callable[..., Path]
) -> None:
    volfs = mount_volfs("size=1T").path
    sizes = {}
    for name, root in (("volfs", volfs), ("tmpfs", mount_tmpfs("1T"))):
        (root / "f").write_bytes(b"d" * MiB)
        df = subprocess.run(
            ["df", "-B1", "--output=size,used", str(root)],
            capture_output=True,
            text=True,
            check=True,
        )
        sizes[name] = tuple(int(field) for field in df.stdout.split()[-2:])
    assert sizes["volfs"] == sizes["tmpfs"] == (TiB, MiB), sizes
    assert os.statvfs(volfs).f_bavail * PAGE == TiB - MiB
    assert_answers(volfs)


def test_size_zero_means_no_cap_but_memory(mount_volfs: Callable[..., Mount]) -> None:
    mnt = mount_volfs("size=0").path
    with open("/proc/meminfo") as meminfo:
        total = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal"))
    capacity = os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize
    assert capacity >= total, "size=0 must not cap below the machine's memory"
    data = os.urandom(8 * MiB)
    (mnt / "f").write_bytes(data)
    assert (mnt / "f").read_bytes() == data
    assert statistics(mnt)["used_bytes"] == 8 * MiB
    assert_answers(mnt)


@pytest.mark.parametrize(
    "options",
    [
        "size=65T",
        "size=1E",
        "size=-1",
        "size=1.5G",
        "size=",
        f"size={2**70}",
        "size=101%x",
        "nr_inodes=-5",
        "nr_inodes=1x",
        "mode=8888",
        "mode=77777",
        "uid=-1",
        f"uid={2**32}",
        "gid=abc",
        "purged=sometimes",
        "pressure_stall=0",
        "pressure_batch=0",
        "no_such_option",
    ],
)
def test_absurd_options_are_refused_with_status_2(tmp_path: Path, options: str) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "volfs", "-f", "-o", options, str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not is_mounted(mountpoint)


@needs_root
def test_inode_limit_matches_tmpfs(
    mount_volfs: Callable[..., Mount], mount_tmpfs: Callable[..., Path]
) -> None:
    volfs = mount_volfs("size=16M,nr_inodes=64").path
    tmpfs = mount_tmpfs("16M", nr_inodes=64)

    def scenario(root: Path) -> object:
        created = 0
        while True:
            try:
                if created % 2:
                    os.mkdir(root / f"d{created}")
                else:
                    (root / f"f{created}").touch()
            except OSError as error:
                failure = errno.errorcode[error.errno or 0]
                break
            created += 1
        info = os.statvfs(root)
        full = (info.f_files, info.f_ffree)
        os.unlink(root / "f0")
        (root / "again").touch()  # a freed inode can be used again
        (root / "again").unlink()
        return created, failure, full

    results = assert_same(on_both({"volfs": volfs, "tmpfs": tmpfs}, scenario))
    assert results == (63, "ENOSPC", (64, 0))
    assert_answers(volfs)


@needs_root
def test_hard_links_count_against_nr_inodes_as_on_tmpfs(
    mount_volfs: Callable[..., Mount], mount_tmpfs: Callable[..., Path]
) -> None:
    volfs = mount_volfs("size=16M,nr_inodes=64").path
    tmpfs = mount_tmpfs("16M", nr_inodes=64)

    def scenario(root: Path) -> object:
        (root / "file").touch()
        links, failure = 0, None
        while links < 1000 and failure is None:
            try:
                os.link(root / "file", root / f"link-{links:04d}-{'n' * 200}")
                links += 1
            except OSError as error:
                failure = errno.errorcode[error.errno or 0]
        return links, failure, os.stat(root / "file").st_nlink

    results = assert_same(on_both({"volfs": volfs, "tmpfs": tmpfs}, scenario))
    assert results == (62, "ENOSPC", 63)


@needs_root
def test_removed_inodes_held_through_o_path_keep_their_slot_as_on_tmpfs(
    mount_volfs: Callable[..., Mount], mount_tmpfs: Callable[..., Path]
) -> None:
    volfs = mount_volfs("size=16M,nr_inodes=64").path
    tmpfs = mount_tmpfs("16M", nr_inodes=64)

    def scenario(root: Path) -> object:
        held = []
        for index in range(63):
            path = root / f"f{index}"
            path.touch()
            held.append(os.open(path, os.O_PATH))
            path.unlink()
        try:
            while_held = outcome((root / "new").touch), os.statvfs(root).f_ffree
        finally:
            for descriptor in held:
                os.close(descriptor)
        # Their last references went with the descriptors.
        return while_held, outcome((root / "new").touch), settled_free_inodes(root, 62)

    results = assert_same(on_both({"volfs": volfs, "tmpfs": tmpfs}, scenario))
    assert results == (("errno ENOSPC", 0), None, 62), results
    assert_answers(volfs)


@needs_root
def test_extended_attribute_space_is_bounded_as_on_tmpfs(
    mount_volfs: Callable[..., Mount], mount_tmpfs: Callable[..., Path]
) -> None:
    volfs = mount_volfs("size=16M,nr_inodes=1000").path
    tmpfs = mount_tmpfs("16M", nr_inodes=1000)
    budget = 64 * MiB  # four times the size cap: far more than any bound would allow

    def scenario(root: Path) -> object:
        (root / "file").touch()
        stored, failure = 0, None
        while stored < budget and failure is None:
            try:
                os.setxattr(root / "file", f"user.attribute-{stored}", bytes(65536))
                stored += 65536
            except OSError as error:
                failure = errno.errorcode[error.errno or 0]
        os.unlink(root / "file")
        return stored, failure

    results = on_both({"volfs": volfs, "tmpfs": tmpfs}, scenario)
    assert results["tmpfs"][1] == "ENOSPC"  # type: ignore[index]
    assert results["volfs"][1] == "ENOSPC", results  # type: ignore[index]
    assert_answers(volfs)


# -- names and paths --------------------------------------------------------------------------


@needs_root
def test_name_length_limits_as_on_tmpfs(both: dict[str, Path]) -> None:
    def scenario(root: Path) -> object:
        results: dict[str, object] = {}
        (root / "src").write_bytes(b"s")
        for length in (255, 256, 4096):
            name = "n" * length
            results[f"create {length}"] = outcome(lambda n=name: (root / n).touch())
            results[f"mkdir {length}"] = outcome(lambda n=name: os.mkdir(root / ("d" + n[1:])))
            results[f"symlink {length}"] = outcome(
                lambda n=name: os.symlink("t", root / ("s" + n[1:]))
            )
            results[f"link {length}"] = outcome(
                lambda n=name: os.link(root / "src", root / ("l" + n[1:]))
            )
            results[f"rename {length}"] = outcome(
                lambda n=name: os.rename(root / "src", root / ("r" + n[1:]))
            )
            results[f"mknod {length}"] = outcome(
                lambda n=name: os.mknod(root / ("p" + n[1:]), stat.S_IFIFO | 0o600)
            )
            results[f"stat {length}"] = outcome(lambda n=name: os.stat(root / ("q" + n[1:])))
            if results[f"rename {length}"] is None:
                os.rename(root / ("r" + name[1:]), root / "src")
        for length in (4095, 4096):
            target = "t" * length
            results[f"symlink target {length}"] = outcome(
                lambda t=target, n=length: os.symlink(t, root / f"target{n}")
            )
            results[f"readlink {length}"] = outcome(
                lambda n=length: len(os.readlink(root / f"target{n}"))
            )
        for prefix in ("user.", "trusted."):
            for length in (255, 256):
                attribute = prefix + "a" * (length - len(prefix))
                results[f"xattr name {length} {prefix}"] = outcome(
                    lambda a=attribute: os.setxattr(root / "src", a, b"v")
                )
        for size in (65536, 65537):
            results[f"xattr value {size}"] = outcome(
                lambda s=size: os.setxattr(root / "src", "user.big", b"v" * s)
            )
        results["xattr value back"] = len(os.getxattr(root / "src", "user.big"))
        odd = [b"\xff\xfe", b"new\nline", b"tab\there", b" ", b"-", b"\x01\x7f", "é✓".encode()]
        for raw in odd:
            (root / os.fsdecode(raw)).write_bytes(raw)
        listing = sorted(raw for raw in os.listdir(os.fsencode(root)) if raw in odd)
        results["odd names"] = (listing, [(root / os.fsdecode(n)).read_bytes() for n in listing])
        results["entries"] = len(os.listdir(root))
        return results

    results = assert_same(on_both(both, scenario))
    assert isinstance(results, dict)
    assert results["create 255"] is None and results["create 256"] == "errno ENAMETOOLONG"
    assert results["symlink target 4095"] is None
    assert results["symlink target 4096"] == "errno ENAMETOOLONG"
    assert results["xattr value 65537"] == "errno E2BIG"


@needs_root
def test_deep_trees_and_paths_longer_than_path_max(both: dict[str, Path]) -> None:
    depth = 200

    def scenario(root: Path) -> object:
        results: dict[str, object] = {}
        bottom = root
        for _level in range(depth):
            bottom = bottom / "d"
            bottom.mkdir()
        (bottom / "leaf").write_bytes(b"at the bottom")
        results["walk"] = sum(1 for _entry in os.walk(root / "d"))
        results["leaf"] = (bottom / "leaf").read_bytes()
        results["nlink"] = os.stat(root / "d").st_nlink
        results["into its own descendant"] = outcome(lambda: os.rename(root / "d", bottom / "x"))
        results["rename the deep leaf up"] = outcome(lambda: os.rename(bottom / "leaf", root / "l"))

        # 20 levels of 250-byte names: 5 KiB, more than PATH_MAX; reachable only by descriptors.
        name = "n" * 250
        descriptors = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
        try:
            for _level in range(20):
                os.mkdir(name, dir_fd=descriptors[-1])
                descriptors.append(
                    os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=descriptors[-1])
                )
            fd = os.open("file", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=descriptors[-1])
            os.write(fd, b"far down")
            os.close(fd)
            long_path = os.path.join(root, *([name] * 20), "file")
            results["long path length"] = len(long_path) > 4096
            results["open the long path"] = outcome(lambda: os.stat(long_path))
            fd = os.open("file", os.O_RDONLY, dir_fd=descriptors[-1])
            results["read by descriptor"] = os.read(fd, 100)
            os.close(fd)
            os.unlink("file", dir_fd=descriptors[-1])
            for level in range(20, 0, -1):
                os.close(descriptors.pop())
                os.rmdir(name, dir_fd=descriptors[level - 1])
        finally:
            for fd in descriptors:
                os.close(fd)
        shutil.rmtree(root / "d")
        results["left"] = sorted(os.listdir(root))
        return results

    results = assert_same(on_both(both, scenario))
    assert isinstance(results, dict)
    assert results["walk"] == depth
    assert results["leaf"] == b"at the bottom"
    assert results["into its own descendant"] == "errno EINVAL"
    assert results["open the long path"] == "errno ENAMETOOLONG"
    assert results["read by descriptor"] == b"far down"
    assert results["left"] == ["l"]


# -- large directories and range sets ---------------------------------------------------------


def test_many_files_in_one_directory(mount_volfs: Callable[..., Mount]) -> None:
    mnt = mount_volfs(f"size=64M,nr_inodes={FILES + 100}").path
    directory = mnt / "many"
    directory.mkdir()
    before = os.statvfs(mnt).f_ffree
    names = {f"file-{index:07d}-{'x' * (index % 50)}" for index in range(FILES)}
    for name in names:
        os.close(os.open(directory / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    assert os.statvfs(mnt).f_ffree == before - FILES
    listed = os.listdir(directory)
    assert len(listed) == FILES
    assert set(listed) == names
    with os.scandir(directory) as entries:
        assert sum(1 for entry in entries if entry.is_file()) == FILES
    assert os.stat(directory).st_nlink == 2
    sample = sorted(names)[:: max(1, FILES // 100)]
    for name in sample:
        assert os.stat(directory / name).st_size == 0
    # Removing while listing must neither skip nor repeat what stays.
    with os.scandir(directory) as entries:
        for count, entry in enumerate(entries):
            os.unlink(entry.path)
            if count == FILES // 2:
                break
    for name in os.listdir(directory):
        os.unlink(directory / name)
    assert os.listdir(directory) == []
    directory.rmdir()
    assert settled_free_inodes(mnt, before + 1) == before + 1
    assert_answers(mnt)


def page_pattern(page: int) -> bytes:
    """A page filled with its own number, so a page read back names where it came from."""
    return page.to_bytes(8, "little") * 512


def mark_even_pages_volatile(fd: int) -> None:
    """One volatile range on every even page, every other one PARTIAL; check the counts."""
    for index in range(RANGES):
        flags = VRANGE_PARTIAL if index % 2 else 0
        assert fvrange(fd, 2 * index * PAGE, PAGE, VRANGE_VOLATILE, flags) == (PAGE, False)
    assert vrange_status(fd) == (RANGES * PAGE, 0)
    counters = statistics(fd)
    assert (counters["ranges"], counters["purgeable_ranges"]) == (RANGES, RANGES)
    assert counters["volatile_bytes"] == RANGES * PAGE
    assert vrange_status(fd, 1000 * PAGE, 3000 * PAGE) == (1500 * PAGE, 0)
    assert vrange_status(fd, PAGE, PAGE) == (0, 0)


def unmark_scattered_ranges(fd: int) -> set[int]:
    """Unmark about a hundred ranges scattered over the file (some hold data), one call each.

    Returns:
        The indexes of the ranges unmarked.
    """
    unmarked = set(range(8, RANGES, 8 * max(1, RANGES // 800)))
    for index in sorted(unmarked):
        assert fvrange(fd, 2 * index * PAGE, PAGE, VRANGE_NONVOLATILE) == (PAGE, False)
    assert vrange_status(fd) == ((RANGES - len(unmarked)) * PAGE, 0)
    return unmarked


def purge_the_oldest_ranges(mnt: Path, fd: int, unmarked: set[int], stride: int) -> None:
    """Purge four pages' worth: the oldest ranges go first, and no more than that.

    Ranges are taken in age order whether they hold data (FULL or PARTIAL) or not, until the
    purge has freed what it was asked for.
    """
    taken = freed_pages = 0
    for index in range(RANGES):
        if index in unmarked:
            continue
        taken += 1
        freed_pages += (2 * index) % stride == 0
        if freed_pages == 4:
            break
    assert purge(mnt, 4 * PAGE) == 4 * PAGE
    boundary = 2 * (index + 1) * PAGE
    assert vrange_status(fd, 0, boundary)[1] == taken * PAGE, "oldest ranges were not first"
    assert vrange_status(fd, boundary, 0)[1] == 0, "the purge took more than it needed"


def purge_the_rest(mnt: Path, fd: int, unmarked: set[int], data_pages: range) -> None:
    """Purge everything else (four pages went before): non-volatile data stays."""
    left = RANGES - len(unmarked)
    held = sum(1 for page in data_pages if page // 2 not in unmarked)
    assert purge(mnt) == (held - 4) * PAGE
    assert vrange_status(fd) == (left * PAGE, left * PAGE)
    assert statistics(fd)["purgeable_ranges"] == 0
    with pytest.raises(OSError) as caught:
        os.pread(fd, 8, 32 * PAGE)
    assert caught.value.errno == errno.EIO
    for page in data_pages:
        odd = page_pattern(page + 1)
        assert os.pread(fd, PAGE, (page + 1) * PAGE) == odd, f"page {page + 1} lost"
        if page // 2 in unmarked:
            even = page_pattern(page)
            assert os.pread(fd, PAGE, page * PAGE) == even, f"page {page} lost"


def test_a_file_with_a_million_volatile_ranges(mount_volfs: Callable[..., Mount]) -> None:
    """Every other page volatile: marking, status, partial and full purges, unmarking.

    Purged ranges keep a record of their lost pages: the bounds are raised to twice the
    ranges (and the cap to hold their data).
    """
    records = 2 * RANGES + 16
    mnt = mount_volfs(f"size=256M,max_ranges={records},max_file_ranges={records}").path
    pages = 2 * RANGES
    path = mnt / "ranges"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, pages * PAGE)
        # Data on pages kS and kS+1 (sparse elsewhere; S=16 up to 10^5 ranges, then sparser to
        # stay within the cap): even pages will be volatile.
        stride = 16 * max(1, RANGES // 100_000)
        data_pages = range(0, pages, stride)
        for page in data_pages:
            os.pwrite(fd, page_pattern(page), page * PAGE)
            os.pwrite(fd, page_pattern(page + 1), (page + 1) * PAGE)
        mark_even_pages_volatile(fd)
        unmarked = unmark_scattered_ranges(fd)
        purge_the_oldest_ranges(mnt, fd, unmarked, stride)
        purge_the_rest(mnt, fd, unmarked, data_pages)

        assert fvrange(fd, 0, 0, VRANGE_NONVOLATILE) == (pages * PAGE, True)
        assert vrange_status(fd) == (0, 0)
        assert statistics(fd)["ranges"] == 0
        assert os.pread(fd, PAGE, 0) == bytes(PAGE)
        for index in range(0, RANGES, 7):
            fvrange(fd, 2 * index * PAGE, PAGE, VRANGE_VOLATILE)
    finally:
        os.close(fd)
    # The last close drops every range at once.
    assert statistics(mnt)["ranges"] == 0
    assert_answers(mnt)


def test_a_removed_files_memory_serves_the_next_write_without_a_purge(
    mount_volfs: Callable[..., Mount],
) -> None:
    """The memory of a removed file comes back when the kernel forgets the inode, a few
    requests later: a write at the cap waits for it rather than fail or purge."""
    mount = mount_volfs("size=8M")
    cache = os.open(mount.path / "cache", os.O_CREAT | os.O_RDWR, 0o600)
    writer = os.open(mount.path / "next", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.pwrite(cache, b"c" * MiB, 0)
        fvrange(cache, 0, MiB, VRANGE_VOLATILE)  # another program's cache
        for _round in range(200):
            (mount.path / "big").write_bytes(b"b" * (6 * MiB))
            (mount.path / "big").unlink()
            assert os.pwrite(writer, b"n" * (2 * MiB), 0) == 2 * MiB
            os.ftruncate(writer, 0)
        assert vrange_status(cache) == (MiB, 0), "volatile data purged for nothing"
    finally:
        os.close(writer)
        os.close(cache)
