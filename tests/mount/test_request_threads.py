"""Reads and writes of ordinary pages, served by the bridge in C (volfs/daemon/_bridge.c).

Each test checks what a program sees (the bytes, the errors), and the debug line the daemon
logs at unmount shows the C side really served: a test that passed through Python alone
would prove nothing about it.
"""

from __future__ import annotations

import errno
import mmap
import multiprocessing
import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Mount
from tests.mount.test_limits import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from volfs.client import VRANGE_NONVOLATILE, VRANGE_VOLATILE, fvrange, purge

PAGE = 4096
KiB = 1024
#: The counters the daemon logs at unmount (log_level=debug).
COUNTERS = re.compile(
    r"served (\d+) reads and (\d+) writes in C; .* (\d+) requests answered at once"
)


def counters(mount: Mount) -> tuple[int, int, int]:
    """Unmount, and return the reads and writes the daemon served in C and the requests it
    answered at once."""
    assert mount.unmount() == 0
    found = COUNTERS.search(mount.log())
    assert found, mount.tail()
    return int(found[1]), int(found[2]), int(found[3])


def served(mount: Mount) -> tuple[int, int]:
    """Unmount, and return the reads and writes the daemon served in C."""
    reads, writes, _at_once = counters(mount)
    return reads, writes


def uncached_read(path: Path, length: int, offset: int) -> bytes:
    """Read through the daemon, not the kernel's cache of the file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def test_reads_and_writes_of_held_pages_are_served_in_c_with_every_attribute(
    mount_volfs: Callable[..., Mount],
) -> None:
    mount = mount_volfs("size=64M,log_level=debug")
    path = mount.path / "data"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, bytes(64 * KiB))  # new pages: Python allocates them
        blocks = os.fstat(fd).st_blocks
        before = os.fstat(fd)
        time.sleep(0.01)
        expected = bytearray(64 * KiB)
        for index in range(64):
            page = (index * 7) % 16
            data = bytes([index + 1]) * PAGE
            assert os.pwrite(fd, data, page * PAGE) == PAGE
            expected[page * PAGE : (page + 1) * PAGE] = data
        # Growing within the last held page, and a write across two pages.
        os.pwrite(fd, b"tail", 64 * KiB - 2)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    expected[64 * KiB - 2 :] = b"ta"
    assert after.st_size == 64 * KiB + 2
    assert after.st_blocks == blocks + 8  # the tail's page is new: Python's
    assert after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns
    assert uncached_read(path, 64 * KiB, 0) == bytes(expected)
    assert uncached_read(path, 10, 64 * KiB - 2) == b"tail"
    # A sparse file: holes read as zeros, past EOF nothing.
    sparse = mount.path / "sparse"
    with open(sparse, "wb") as file:
        file.seek(10 * PAGE)
        file.write(b"x" * PAGE)
    assert uncached_read(sparse, 12 * PAGE, 0) == bytes(10 * PAGE) + b"x" * PAGE
    reads, writes = served(mount)
    assert writes >= 60 and reads >= 3, (reads, writes)


def test_an_unprivileged_writer_is_served_in_c_until_the_file_is_setuid(
    mount_volfs: Callable[..., Mount],
) -> None:
    """Each write by a caller without CAP_FSETID asks the daemon to remove privileges."""
    mount = mount_volfs("size=64M,log_level=debug,allow_other")
    os.chmod(mount.path, 0o777)
    path = mount.path / "shared"

    def as_nobody() -> None:
        os.chdir(mount.path)  # the ancestors of the mount may be closed to nobody
        os.setgid(65534)
        os.setuid(65534)
        fd = os.open(path.name, os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, bytes(16 * PAGE))
        for index in range(40):
            os.pwrite(fd, b"n" * PAGE, (index % 16) * PAGE)
        os.fchmod(fd, 0o4755)
        os.pwrite(fd, b"s", 0)
        os._exit(0 if stat.S_IMODE(os.fstat(fd).st_mode) == 0o755 else 3)

    child = multiprocessing.get_context("fork").Process(target=as_nobody)
    child.start()
    child.join(30)
    assert child.exitcode == 0, "the write left the setuid bit"
    assert uncached_read(path, 2, 0) == b"sn"
    _reads, writes = served(mount)
    assert writes >= 35, writes


def test_volatile_files_are_python_s_and_purged_data_still_fails(
    mount_volfs: Callable[..., Mount],
) -> None:
    mount = mount_volfs("size=64M,log_level=debug")
    path = mount.path / "cache"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"c" * (64 * KiB))
        for index in range(16):
            os.pwrite(fd, b"d" * PAGE, index * PAGE)
        assert fvrange(fd, 0, 0, VRANGE_VOLATILE) == (64 * KiB, False)
        assert purge(mount.path) == 64 * KiB
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(OSError) as caught:
            os.pread(fd, PAGE, 0)
        assert caught.value.errno == errno.EIO
        # A write into purged pages repopulates them, and is not lost.
        os.pwrite(fd, b"w" * PAGE, 0)
        assert fvrange(fd, 0, 0, VRANGE_NONVOLATILE)[1] is True
        assert os.pread(fd, PAGE, 0) == b"w" * PAGE
        for _ in range(8):
            os.pwrite(fd, b"e" * PAGE, 0)
    finally:
        os.close(fd)
    assert uncached_read(path, PAGE, 0) == b"e" * PAGE
    assert uncached_read(path, PAGE, PAGE) == bytes(PAGE)  # purged, acknowledged: a hole
    _reads, writes = served(mount)
    assert writes >= 16


def test_mmap_stores_and_loads_are_served_in_c(mount_volfs: Callable[..., Mount]) -> None:
    mount = mount_volfs("size=64M,log_level=debug")
    path = mount.path / "mapped"
    path.write_bytes(bytes(256 * KiB))
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with mmap.mmap(fd, 256 * KiB) as mapping:
            for page in range(64):
                mapping[page * PAGE : page * PAGE + 2] = page.to_bytes(2, "little")
            mapping.flush()
    finally:
        os.close(fd)
    data = uncached_read(path, 256 * KiB, 0)
    for page in range(64):
        assert data[page * PAGE : page * PAGE + 2] == page.to_bytes(2, "little")
    reads, writes = served(mount)
    assert reads >= 1 and writes >= 1, (reads, writes)


def _overwrite(path: Path, byte: int, deadline: float) -> None:
    """Overwrite the first 16 pages of ``path`` with ``byte`` until ``deadline``."""
    fd = os.open(path, os.O_WRONLY)
    data = bytes([byte]) * PAGE
    while time.monotonic() < deadline:
        for page in range(16):
            os.pwrite(fd, data, page * PAGE)
    os.close(fd)


def _free_pages(path: Path, deadline: float) -> None:
    """Truncate and regrow ``path``, or punch its pages out, until ``deadline``: either way
    its pages go back to the store."""
    fd = os.open(path, os.O_RDWR)
    rounds = 0
    while time.monotonic() < deadline:
        if rounds % 2:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, 16 * PAGE)
        else:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 16 * PAGE)
        rounds += 1
    os.close(fd)


def _fill_and_check(directory: Path, deadline: float, report: multiprocessing.Queue) -> None:
    """Fill new files with b'B' (taking freed pages) and read them back until ``deadline``."""
    count = 0
    while time.monotonic() < deadline:
        path = directory / f"b{count % 8}"
        path.write_bytes(b"B" * (16 * PAGE))
        data = uncached_read(path, 16 * PAGE, 0)
        if data != b"B" * (16 * PAGE):
            report.put(f"{path.name} read {set(data)}")
            return
        path.unlink()
        count += 1
    report.put(count)


def test_writes_in_c_racing_truncation_never_reach_freed_pages(
    mount_volfs: Callable[..., Mount],
) -> None:
    """Pages freed by a truncation or a punched hole are reused by other files at once: a
    write served in C that raced the change must land before it or find the new runs."""
    mount = mount_volfs("size=64M,log_level=debug")
    victim = mount.path / "victim"
    victim.write_bytes(b"A" * (16 * PAGE))
    others = mount.path / "others"
    others.mkdir()
    deadline = time.monotonic() + 4
    context = multiprocessing.get_context("fork")
    report: multiprocessing.Queue = context.Queue()
    workers = [
        context.Process(target=_overwrite, args=(victim, ord("A"), deadline)),
        context.Process(target=_overwrite, args=(victim, ord("A"), deadline)),
        context.Process(target=_free_pages, args=(victim, deadline)),
        context.Process(target=_fill_and_check, args=(others, deadline, report)),
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    filled = report.get(timeout=5)
    assert isinstance(filled, int) and filled > 10, filled
    assert set(uncached_read(victim, 16 * PAGE, 0)) <= {0, ord("A")}
    _reads, writes = served(mount)
    assert writes > 100, writes


def test_timestamps_past_2262_stay_exact_as_on_tmpfs(mnt: Path) -> None:
    """A regular file's times live where C updates them, and still hold any time_t."""
    path = mnt / "dated"
    path.write_bytes(b"x" * PAGE)
    year_2300 = 10_413_792_000 * 10**9 + 5
    year_1500 = -14_831_769_600 * 10**9
    os.utime(path, ns=(year_1500, year_2300))
    status = os.stat(path)
    assert (status.st_atime_ns, status.st_mtime_ns) == (year_1500, year_2300)
    assert uncached_read(path, PAGE, 0) == b"x" * PAGE  # relatime: an atime before mtime moves
    assert os.stat(path).st_atime_ns > year_1500
