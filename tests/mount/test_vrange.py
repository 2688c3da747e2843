"""Volatile ranges on a real mount, through ioctl(2), read(2), mmap and other processes."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Mount
from volfs import abi
from volfs.client import (
    VRANGE_FULL,
    VRANGE_NONVOLATILE,
    VRANGE_PARTIAL,
    VRANGE_VOLATILE,
    VRange,
    fvrange,
    pinned,
    purge,
    statistics,
    vrange_ranges,
    vrange_status,
)

PAGE = 4096
MiB = 1 << 20


def errno_of(call: Callable[[], object]) -> int:
    with pytest.raises(OSError) as caught:
        call()
    assert caught.value.errno is not None
    return caught.value.errno


@pytest.fixture
def data_file(mnt: Path) -> Iterator[tuple[Path, int, bytes]]:
    """A 1 MiB file of random bytes on the mount, open read-write."""
    path = mnt / "cache.bin"
    data = os.urandom(MiB)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        yield path, fd, data
    finally:
        os.close(fd)


def test_mark_purge_read_unmark_cycle(mnt: Path, data_file: tuple[Path, int, bytes]) -> None:
    _path, fd, data = data_file
    assert os.pread(fd, PAGE, 0) == data[:PAGE]  # cached by the kernel before the purge
    assert fvrange(fd, 0, MiB, VRANGE_VOLATILE) == (MiB, False)
    assert vrange_status(fd) == (MiB, 0)
    assert os.pread(fd, PAGE, 0) == data[:PAGE]  # volatile but not purged: intact

    assert purge(mnt) == MiB
    assert vrange_status(fd) == (MiB, MiB)
    assert errno_of(lambda: os.pread(fd, PAGE, 0)) == errno.EIO  # not from the page cache
    assert errno_of(lambda: os.pread(fd, 10, 5000)) == errno.EIO

    assert fvrange(fd, 0, MiB, VRANGE_NONVOLATILE) == (MiB, True)
    assert vrange_status(fd) == (0, 0)
    assert os.pread(fd, MiB, 0) == bytes(MiB)  # purged bytes read as zeros from now on

    # A new cycle does not report the old purge.
    os.pwrite(fd, data, 0)
    fvrange(fd, 0, MiB, VRANGE_VOLATILE)
    assert fvrange(fd, 0, MiB, VRANGE_NONVOLATILE) == (MiB, False)
    assert os.pread(fd, MiB, 0) == data


def test_only_purged_pages_fail_and_writes_repopulate(
    mnt: Path, data_file: tuple[Path, int, bytes]
) -> None:
    _path, fd, data = data_file
    fvrange(fd, 8 * PAGE, 4 * PAGE, VRANGE_VOLATILE)
    purge(mnt)
    assert os.pread(fd, 8 * PAGE, 0) == data[: 8 * PAGE]
    assert os.pread(fd, PAGE, 12 * PAGE) == data[12 * PAGE : 13 * PAGE]
    # A read across the edge gets the intact pages before it (the kernel stops at the
    # error) or EIO, never purged bytes.
    try:
        across = os.pread(fd, 2 * PAGE, 7 * PAGE)
    except OSError as error:
        assert error.errno == errno.EIO
    else:
        assert across == data[7 * PAGE : 8 * PAGE]

    os.pwrite(fd, b"n" * PAGE, 9 * PAGE)
    assert os.pread(fd, PAGE, 9 * PAGE) == b"n" * PAGE
    assert errno_of(lambda: os.pread(fd, PAGE, 10 * PAGE)) == errno.EIO
    assert vrange_status(fd, 8 * PAGE, 4 * PAGE) == (4 * PAGE, 3 * PAGE)
    assert fvrange(fd, 8 * PAGE, 4 * PAGE, VRANGE_NONVOLATILE)[1] is True
    assert os.pread(fd, 4 * PAGE, 8 * PAGE) == bytes(PAGE) + b"n" * PAGE + bytes(2 * PAGE)


def test_bad_requests_fail_cleanly_and_change_nothing(
    mnt: Path, data_file: tuple[Path, int, bytes]
) -> None:
    path, fd, data = data_file
    fvrange(fd, 0, PAGE, VRANGE_VOLATILE)
    for start, length in [(1, PAGE), (0, PAGE + 1), (0, MiB + PAGE), (MiB + PAGE, 0)]:
        assert errno_of(lambda s=start, n=length: fvrange(fd, s, n, VRANGE_VOLATILE)) == (
            errno.EINVAL
        )
    assert errno_of(lambda: fvrange(fd, 0, PAGE, 2)) == errno.EINVAL
    assert errno_of(lambda: fvrange(fd, 0, PAGE, VRANGE_VOLATILE, 4)) == errno.EINVAL
    overflow = bytearray(abi.VRANGE_ARGS.pack(2**64 - PAGE, 2 * PAGE, 0, 0, 0, 0, 0))
    assert errno_of(lambda: fcntl.ioctl(fd, abi.VOLFS_IOC_VRANGE, overflow, True)) == (errno.EINVAL)
    reserved = bytearray(abi.VRANGE_ARGS.pack(0, PAGE, 0, 0, 0, 0, 1))
    assert errno_of(lambda: fcntl.ioctl(fd, abi.VOLFS_IOC_VRANGE, reserved, True)) == (errno.EINVAL)
    assert vrange_status(fd) == (PAGE, 0), "a failed request changed the ranges"

    read_only = os.open(path, os.O_RDONLY)
    try:
        assert errno_of(lambda: fvrange(read_only, 0, PAGE, VRANGE_NONVOLATILE)) == errno.EBADF
        assert vrange_status(read_only) == (PAGE, 0)  # the query works on any descriptor
    finally:
        os.close(read_only)
    directory = os.open(mnt, os.O_RDONLY)
    try:
        assert errno_of(lambda: fvrange(directory, 0, PAGE, VRANGE_VOLATILE)) == errno.EISDIR
        assert errno_of(lambda: fcntl.ioctl(directory, 0x5401, bytes(64))) == errno.ENOTTY
    finally:
        os.close(directory)
    assert errno_of(lambda: fcntl.ioctl(fd, 0xC0087690, bytes(8))) == errno.ENOTTY
    assert os.pread(fd, MiB, 0) == data


def test_length_zero_means_to_the_page_rounded_end(mnt: Path) -> None:
    path = mnt / "odd"
    path.write_bytes(b"x" * 10000)
    fd = os.open(path, os.O_RDWR)
    try:
        assert fvrange(fd, 0, 0, VRANGE_VOLATILE) == (3 * PAGE, False)
        assert fvrange(fd, PAGE, 0, VRANGE_NONVOLATILE) == (2 * PAGE, False)
        assert vrange_status(fd) == (PAGE, 0)
        assert fvrange(fd, 3 * PAGE, 0, VRANGE_VOLATILE) == (0, False)
    finally:
        os.close(fd)


def test_ranges_merge_when_overlapping_not_when_adjacent(
    mnt: Path, data_file: tuple[Path, int, bytes]
) -> None:
    _path, fd, _data = data_file
    fvrange(fd, 0, 4 * PAGE, VRANGE_VOLATILE)
    purge(mnt)
    # Overlapping the purged range: the merged range counts as purged.
    fvrange(fd, 2 * PAGE, 6 * PAGE, VRANGE_VOLATILE)
    assert fvrange(fd, 6 * PAGE, 2 * PAGE, VRANGE_NONVOLATILE) == (2 * PAGE, True)
    fvrange(fd, 0, 8 * PAGE, VRANGE_NONVOLATILE)
    # Adjacent to a purged range: stays apart, keeps its own state.
    fvrange(fd, 0, 4 * PAGE, VRANGE_VOLATILE)
    purge(mnt)
    fvrange(fd, 4 * PAGE, 4 * PAGE, VRANGE_VOLATILE)
    assert fvrange(fd, 4 * PAGE, 4 * PAGE, VRANGE_NONVOLATILE) == (4 * PAGE, False)
    assert fvrange(fd, 0, 4 * PAGE, VRANGE_NONVOLATILE) == (4 * PAGE, True)


def test_volatility_is_shared_by_every_opener(
    mnt: Path, data_file: tuple[Path, int, bytes]
) -> None:
    path, fd, _data = data_file
    child = textwrap.dedent(f"""
        import os, sys
        from volfs.client import fvrange, VRANGE_VOLATILE
        fd = os.open({str(path)!r}, os.O_RDWR)
        fvrange(fd, 0, 65536, VRANGE_VOLATILE)
        sys.stdout.write("marked\\n"); sys.stdout.flush()
        sys.stdin.readline()
        os.close(fd)
    """)
    with subprocess.Popen(
        [sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None and process.stdin is not None
        assert process.stdout.readline() == "marked\n"
        assert vrange_status(fd) == (65536, 0)  # seen through our own open
        assert fvrange(fd, 0, 4 * PAGE, VRANGE_NONVOLATILE) == (4 * PAGE, False)
        process.stdin.write("close\n")
        process.stdin.flush()
        assert process.wait(timeout=30) == 0
    # The other process closed, but this descriptor keeps the volatility alive.
    assert vrange_status(fd) == (65536 - 4 * PAGE, 0)


def test_last_close_ends_volatility_but_dup_fork_and_reopen_count(
    mnt: Path, data_file: tuple[Path, int, bytes]
) -> None:
    path, fd, _data = data_file
    other = os.open(path, os.O_RDWR)
    fvrange(other, 0, 8 * PAGE, VRANGE_VOLATILE)
    duplicate = os.dup(other)
    os.close(other)
    assert vrange_status(fd) == (8 * PAGE, 0)  # dup keeps the open file alive
    reopened = os.open(f"/proc/self/fd/{duplicate}", os.O_RDWR)
    os.close(duplicate)
    assert vrange_status(fd) == (8 * PAGE, 0)  # a /dev/fd re-open is its own handle
    pid = os.fork()
    if pid == 0:  # the child holds an inherited copy a little longer
        os.close(reopened)
        os._exit(0)
    os.waitpid(pid, 0)
    os.close(reopened)
    assert vrange_status(fd) == (8 * PAGE, 0)
    os.close(fd)
    fd2 = os.open(path, os.O_RDWR)
    try:
        assert vrange_status(fd2) == (0, 0)  # the last close dropped it
    finally:
        os.close(fd2)
    # Reopen for the fixture's cleanup.
    os.dup2(os.open(path, os.O_RDWR), fd)


def test_purge_order_is_least_recently_marked_first(mnt: Path) -> None:
    fds = []
    for name in ("old", "new"):
        (mnt / name).write_bytes(os.urandom(16 * PAGE))
        fds.append(os.open(mnt / name, os.O_RDWR))
    old, new = fds
    try:
        fvrange(old, 0, 16 * PAGE, VRANGE_VOLATILE)
        fvrange(new, 0, 16 * PAGE, VRANGE_VOLATILE)
        assert purge(mnt, 1) == 16 * PAGE  # a FULL range goes whole, oldest first
        assert vrange_status(old)[1] == 16 * PAGE
        assert vrange_status(new)[1] == 0
        fvrange(old, 0, 16 * PAGE, VRANGE_NONVOLATILE)
        # Marking again makes a range the newest.
        fvrange(new, 0, 16 * PAGE, VRANGE_VOLATILE)
        assert purge(mnt, 1) == 16 * PAGE
        assert vrange_status(new)[1] == 16 * PAGE
    finally:
        for fd in fds:
            os.close(fd)


def test_partial_ranges_lose_only_what_is_needed(
    mnt: Path, data_file: tuple[Path, int, bytes]
) -> None:
    _path, fd, data = data_file
    fvrange(fd, 0, 64 * PAGE, VRANGE_VOLATILE, VRANGE_PARTIAL)
    assert purge(mnt, 4 * PAGE) == 4 * PAGE
    assert vrange_status(fd, 0, 64 * PAGE) == (64 * PAGE, 4 * PAGE)
    assert os.pread(fd, 60 * PAGE, 0) == data[: 60 * PAGE]
    assert errno_of(lambda: os.pread(fd, PAGE, 63 * PAGE)) == errno.EIO
    assert fvrange(fd, 0, 60 * PAGE, VRANGE_NONVOLATILE) == (60 * PAGE, False)
    assert fvrange(fd, 60 * PAGE, 4 * PAGE, VRANGE_NONVOLATILE) == (4 * PAGE, True)


def test_truncate_trims_ranges_and_unlinked_files_keep_them(mnt: Path) -> None:
    path = mnt / "t"
    path.write_bytes(os.urandom(8 * PAGE))
    fd = os.open(path, os.O_RDWR)
    try:
        fvrange(fd, 0, 8 * PAGE, VRANGE_VOLATILE)
        os.ftruncate(fd, 4 * PAGE + 1)
        assert vrange_status(fd) == (5 * PAGE, 0)
        os.ftruncate(fd, 8 * PAGE)
        assert vrange_status(fd) == (5 * PAGE, 0)
        path.unlink()
        assert vrange_status(fd) == (5 * PAGE, 0)
        assert purge(mnt) == 5 * PAGE
        assert fvrange(fd, 0, 8 * PAGE, VRANGE_NONVOLATILE)[1] is True
    finally:
        os.close(fd)


def test_pinned_context_manager(mnt: Path, data_file: tuple[Path, int, bytes]) -> None:
    _path, fd, data = data_file
    fvrange(fd, 0, MiB, VRANGE_VOLATILE)
    with pinned(fd, 0, MiB) as pin:
        assert not pin.purged
        assert vrange_status(fd) == (0, 0)
        assert os.pread(fd, MiB, 0) == data
    assert vrange_status(fd) == (MiB, 0)
    purge(mnt)
    with pinned(fd, 0, MiB) as pin:
        assert pin.purged
        os.pwrite(fd, data, 0)
    assert vrange_status(fd) == (MiB, 0)


def test_mmap_of_purged_page_raises_sigbus_then_reads_zeros(
    mnt: Path, data_file: tuple[Path, int, bytes]
) -> None:
    path, fd, data = data_file
    child = textwrap.dedent(f"""
        import mmap, os, sys
        fd = os.open({str(path)!r}, os.O_RDWR)
        view = mmap.mmap(fd, {MiB}, mmap.MAP_SHARED)
        assert view[:4] == {data[:4]!r}           # faulted in before the purge
        view[{MiB - PAGE}:{MiB - PAGE + 5}] = b"dirty"  # a dirty page outside the range
        sys.stdout.write("mapped\\n"); sys.stdout.flush()
        sys.stdin.readline()
        assert view[{MiB - PAGE}:{MiB - PAGE + 5}] == b"dirty"
        sys.stdout.write("touching\\n"); sys.stdout.flush()
        view[5]                                   # purged: SIGBUS
        sys.stdout.write("survived\\n"); sys.stdout.flush()
    """)
    with subprocess.Popen(
        [sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None and process.stdin is not None
        assert process.stdout.readline() == "mapped\n"
        fvrange(fd, 0, 16 * PAGE, VRANGE_VOLATILE)
        assert purge(mnt) == 16 * PAGE
        process.stdin.write("go\n")
        process.stdin.flush()
        assert process.stdout.readline() == "touching\n"
        assert process.wait(timeout=30) == -signal.SIGBUS
        assert process.stdout.read() == ""
    assert os.pread(fd, 5, MiB - PAGE) == b"dirty"  # the dirty page outside was kept
    fvrange(fd, 0, 16 * PAGE, VRANGE_NONVOLATILE)
    view = mmap.mmap(fd, MiB, mmap.MAP_SHARED)
    try:
        assert view[: 16 * PAGE] == bytes(16 * PAGE)
        assert view[16 * PAGE : 17 * PAGE] == data[16 * PAGE : 17 * PAGE]
    finally:
        view.close()


def test_purged_zero_option_reads_zeros(mount_volfs: Callable[..., Mount]) -> None:
    mnt = mount_volfs("size=64M,purged=zero").path
    (mnt / "f").write_bytes(b"z" * (4 * PAGE))
    fd = os.open(mnt / "f", os.O_RDWR)
    try:
        fvrange(fd, 0, 4 * PAGE, VRANGE_VOLATILE)
        purge(mnt)
        assert os.pread(fd, 4 * PAGE, 0) == bytes(4 * PAGE)
        assert vrange_status(fd) == (4 * PAGE, 4 * PAGE)
        assert fvrange(fd, 0, 4 * PAGE, VRANGE_NONVOLATILE)[1] is True
    finally:
        os.close(fd)


def test_purge_needs_root_or_the_mount_owner(mount_volfs: Callable[..., Mount]) -> None:
    mnt = mount_volfs("size=64M,allow_other").path
    (mnt / "f").write_bytes(b"q" * PAGE)
    fd = os.open(mnt / "f", os.O_RDWR)
    try:
        fvrange(fd, 0, PAGE, VRANGE_VOLATILE)
        pid = os.fork()
        if pid == 0:
            try:
                os.setuid(65534)
                purge(fd)
                os._exit(0)
            except OSError as error:
                os._exit(error.errno or 100)
            except BaseException:
                os._exit(101)
        _pid, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == errno.EPERM
        assert vrange_status(fd) == (PAGE, 0)
    finally:
        os.close(fd)


def test_header_matches_the_python_abi(tmp_path: Path) -> None:
    source = tmp_path / "abi.c"
    source.write_text(
        textwrap.dedent("""
        #include <stdio.h>
        #include <volfs.h>
        int main(void) {
            printf("%lu %lu %lu %lu %lu %lu %lu %lu %lu %lu %lu %lu %lu %d %d %d %d\\n",
                   (unsigned long)VOLFS_IOC_VRANGE, (unsigned long)VOLFS_IOC_VRANGE_STATUS,
                   (unsigned long)VOLFS_IOC_PURGE, (unsigned long)VOLFS_IOC_STATS,
                   (unsigned long)VOLFS_IOC_VRANGE_NEXT, (unsigned long)VOLFS_IOC_FILE_INFO,
                   sizeof(struct vrange_args), sizeof(struct vrange_status),
                   sizeof(struct volfs_purge), sizeof(struct volfs_stats),
                   sizeof(struct vrange_next), sizeof(struct volfs_file_info),
                   offsetof(struct volfs_file_info, segments),
                   VRANGE_VOLATILE, VRANGE_NONVOLATILE, VRANGE_FULL, VRANGE_PARTIAL);
            return 0;
        }
    """)
    )
    binary = compile_c(source)
    output = subprocess.run([binary], capture_output=True, text=True, check=True).stdout.split()
    assert [int(word) for word in output] == [
        abi.VOLFS_IOC_VRANGE,
        abi.VOLFS_IOC_VRANGE_STATUS,
        abi.VOLFS_IOC_PURGE,
        abi.VOLFS_IOC_STATS,
        abi.VOLFS_IOC_VRANGE_NEXT,
        abi.VOLFS_IOC_FILE_INFO,
        abi.VRANGE_ARGS.size,
        abi.VRANGE_STATUS.size,
        abi.VOLFS_PURGE.size,
        abi.VOLFS_STATS.size,
        abi.VRANGE_NEXT.size,
        abi.VOLFS_FILE_INFO.size,
        abi.FileInfo._fields.index("segments") * 8,
        abi.VRANGE_VOLATILE,
        abi.VRANGE_NONVOLATILE,
        abi.VRANGE_FULL,
        abi.VRANGE_PARTIAL,
    ]


def compile_c(source: Path) -> str:
    include = Path(abi.__file__).parent / "include"
    binary = source.with_suffix("")
    subprocess.run(
        ["cc", "-Wall", "-Werror", "-I", str(include), "-o", str(binary), str(source)], check=True
    )
    return str(binary)


def test_vrange_next_lists_the_ranges_themselves(
    mnt: Path, data_file: tuple[Path, int, bytes], tmp_path: Path
) -> None:
    path, fd, _data = data_file
    fvrange(fd, 64 * PAGE, 16 * PAGE, VRANGE_VOLATILE)
    fvrange(fd, 0, 4 * PAGE, VRANGE_VOLATILE)
    fvrange(fd, 4 * PAGE, 4 * PAGE, VRANGE_VOLATILE, VRANGE_PARTIAL)  # touches: stays apart
    first, partial, last = (
        VRange(0, 4 * PAGE, VRANGE_FULL, False),
        VRange(4 * PAGE, 8 * PAGE, VRANGE_PARTIAL, False),
        VRange(64 * PAGE, 80 * PAGE, VRANGE_FULL, False),
    )
    assert list(vrange_ranges(fd)) == [first, partial, last]  # in file order, not marking order

    # Oldest first: the FULL ranges go whole, then the PARTIAL one loses its last page, which
    # becomes a range of its own.
    assert purge(mnt, PAGE) == 16 * PAGE
    assert purge(mnt, PAGE) == 4 * PAGE
    assert purge(mnt, PAGE) == PAGE
    after = [
        first._replace(purged=True),
        partial._replace(end=7 * PAGE),
        VRange(7 * PAGE, 8 * PAGE, VRANGE_PARTIAL, True),
        last._replace(purged=True),
    ]
    assert list(vrange_ranges(fd)) == after
    # A start inside a range lists that range whole; past the last one, nothing.
    assert list(vrange_ranges(fd, 5 * PAGE)) == after[1:]
    assert list(vrange_ranges(fd, 8 * PAGE)) == after[3:]
    assert list(vrange_ranges(fd, 80 * PAGE)) == []
    assert list(vrange_ranges(fd, 1 << 62)) == []

    read_only = os.open(path, os.O_RDONLY)
    try:
        assert list(vrange_ranges(read_only)) == after  # any descriptor will do
    finally:
        os.close(read_only)
    assert errno_of(lambda: list(vrange_ranges(fd, 100))) == errno.EINVAL
    directory = os.open(mnt, os.O_RDONLY)
    try:
        assert errno_of(lambda: list(vrange_ranges(directory))) == errno.EISDIR
    finally:
        os.close(directory)

    # C programs walk the same list with the header's struct.
    source = tmp_path / "ranges.c"
    source.write_text(
        textwrap.dedent("""
        #include <fcntl.h>
        #include <stdio.h>
        #include <sys/ioctl.h>
        #include <volfs.h>

        int main(int argc, char **argv) {
            int fd = open(argv[1], O_RDONLY);
            struct vrange_next next = {.start = 0};
            for (;;) {
                if (ioctl(fd, VOLFS_IOC_VRANGE_NEXT, &next) != 0) return 1;
                if (next.range_end == 0) return 0;
                printf("%llu %llu %u %u\\n", (unsigned long long)next.range_start,
                       (unsigned long long)next.range_end, next.flags, next.purged);
                next.start = next.range_end;
            }
        }
    """)
    )
    listed = subprocess.run(
        [compile_c(source), str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert listed == "".join(f"{r.start} {r.end} {r.flags} {int(r.purged)}\n" for r in after)

    fvrange(fd, 0, MiB, VRANGE_NONVOLATILE)
    assert list(vrange_ranges(fd)) == []


def test_c_program_marks_purges_and_unmarks(mnt: Path, tmp_path: Path) -> None:
    source = tmp_path / "cache.c"
    source.write_text(
        textwrap.dedent("""
        #include <errno.h>
        #include <fcntl.h>
        #include <stdio.h>
        #include <string.h>
        #include <sys/ioctl.h>
        #include <unistd.h>
        #include <volfs.h>

        int main(int argc, char **argv) {
            char page[4096];
            memset(page, 'c', sizeof page);
            int fd = open(argv[1], O_RDWR | O_CREAT, 0600);
            for (int i = 0; i < 4; i++)
                if (write(fd, page, sizeof page) != sizeof page) return 10;
            struct vrange_args mark = {.start = 0, .length = 4 * 4096,
                                       .mode = VRANGE_VOLATILE, .flags = VRANGE_FULL};
            if (ioctl(fd, VOLFS_IOC_VRANGE, &mark) != 0) return 11;
            struct volfs_purge purge = {.bytes = 0};
            if (ioctl(fd, VOLFS_IOC_PURGE, &purge) != 0) return 12;
            struct vrange_status status = {.start = 0, .length = 0};
            if (ioctl(fd, VOLFS_IOC_VRANGE_STATUS, &status) != 0) return 13;
            errno = 0;
            ssize_t got = pread(fd, page, sizeof page, 0);
            int read_errno = errno;
            struct vrange_args unmark = {.start = 0, .length = 4 * 4096,
                                         .mode = VRANGE_NONVOLATILE};
            if (ioctl(fd, VOLFS_IOC_VRANGE, &unmark) != 0) return 14;
            printf("marked=%llu purged=%llu volatile=%llu lost=%llu read=%zd/%d "
                   "unmarked=%llu was_purged=%u\\n",
                   (unsigned long long)mark.marked, (unsigned long long)purge.purged,
                   (unsigned long long)status.volatile_bytes,
                   (unsigned long long)status.purged_bytes, got, read_errno,
                   (unsigned long long)unmark.marked, unmark.purged);
            return 0;
        }
    """)
    )
    binary = compile_c(source)
    result = subprocess.run(
        [binary, str(mnt / "c.bin")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result
    assert result.stdout.split() == [
        "marked=16384",
        "purged=16384",
        "volatile=16384",
        "lost=16384",
        f"read=-1/{errno.EIO}",
        "unmarked=16384",
        "was_purged=1",
    ]


@pytest.mark.parametrize("seed", range(3))
def test_malformed_ioctls_never_hurt_the_daemon(
    mnt: Path, data_file: tuple[Path, int, bytes], seed: int
) -> None:
    rng = random.Random(seed)
    _path, fd, data = data_file
    fvrange(fd, 0, 4 * PAGE, VRANGE_VOLATILE)
    directory = os.open(mnt, os.O_RDONLY)
    try:
        for _ in range(300):
            direction = rng.choice([0, 1, 2, 3])
            size = rng.choice([0, 1, 8, 16, 32, 40, 64, 200])
            number = rng.choice([0x80, 0x81, 0x82, 0x83, 0x84, rng.randrange(256)])
            kind = rng.choice([ord("v"), ord("v"), rng.randrange(256)])
            cmd = (direction << 30) | (size << 16) | (kind << 8) | number
            payload = bytearray(rng.randbytes(size)) if size else bytearray(8)
            target = rng.choice([fd, directory])
            try:
                fcntl.ioctl(target, cmd, payload, True)
            except OSError as error:
                assert error.errno in (
                    errno.ENOTTY,
                    errno.EINVAL,
                    errno.EISDIR,
                    errno.EBADF,
                    errno.EFAULT,
                    errno.EPERM,
                    errno.EIO,
                    errno.ENXIO,
                    errno.EOPNOTSUPP,
                ), (hex(cmd), error)
    finally:
        os.close(directory)
    # Whatever the fuzzing did to volatility, the daemon answers and non-volatile data is intact.
    fvrange(fd, 0, MiB, VRANGE_NONVOLATILE)
    assert os.pread(fd, MiB - 4 * PAGE, 4 * PAGE) == data[4 * PAGE :]


def test_size_cap_purges_volatile_data_before_enospc(mount_volfs: Callable[..., Mount]) -> None:
    mnt = mount_volfs("size=64M").path
    (mnt / "a").write_bytes(b"a" * (48 * MiB))
    fd = os.open(mnt / "a", os.O_RDWR)
    try:
        fvrange(fd, 0, 48 * MiB, VRANGE_VOLATILE)
        written = os.urandom(40 * MiB)
        (mnt / "b").write_bytes(written)  # fits only once A's volatile data is purged
        assert (mnt / "b").read_bytes() == written
        assert fvrange(fd, 0, 48 * MiB, VRANGE_NONVOLATILE)[1] is True
        # With nothing volatile left, the cap is a hard limit again.
        with pytest.raises(OSError) as caught:
            (mnt / "c").write_bytes(b"c" * (30 * MiB))
        assert caught.value.errno == errno.ENOSPC
        assert (mnt / "b").read_bytes() == written
    finally:
        os.close(fd)


def test_statistics_count_what_happened(mnt: Path, data_file: tuple[Path, int, bytes]) -> None:
    _path, fd, _data = data_file
    before = statistics(mnt)
    assert before["capacity_bytes"] == 256 * MiB and before["used_bytes"] == MiB
    fvrange(fd, 0, 8 * PAGE, VRANGE_VOLATILE)
    fvrange(fd, 16 * PAGE, 8 * PAGE, VRANGE_VOLATILE, VRANGE_PARTIAL)
    middle = statistics(fd)
    assert (middle["volatile_bytes"], middle["ranges"], middle["purgeable_ranges"]) == (
        16 * PAGE,
        2,
        2,
    )
    purge(mnt)
    after = statistics(mnt)
    assert after["purged_bytes"] - before["purged_bytes"] == 16 * PAGE
    assert after["purges_ioctl"] == before["purges_ioctl"] + 1
    assert (after["ranges"], after["purgeable_ranges"]) == (2, 0)
    assert after["used_bytes"] == MiB - 16 * PAGE
