"""Segments on a real mount: pin and unpin through shared memory, seen through read(2),
ioctl(2), other processes and other users; and what a hostile holder of a table can do."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Mount, wait_for
from tests.mount.test_pressure import open_fifo_writer
from tests.mount.test_vrange import compile_c, errno_of
from volfs import abi, client
from volfs.client import (
    VRANGE_NONVOLATILE,
    VRANGE_VOLATILE,
    Segment,
    SegmentTable,
    fvrange,
    purge,
    statistics,
    vrange_status,
)

PAGE = 4096
SEGMENT = 64 * 1024
MiB = 1 << 20


@pytest.fixture
def data_file(mnt: Path) -> Iterator[tuple[int, bytes]]:
    """A 1 MiB file of random bytes on the mount, open read-write."""
    data = os.urandom(MiB)
    (mnt / "cache.bin").write_bytes(data)
    fd = os.open(mnt / "cache.bin", os.O_RDWR)
    try:
        yield fd, data
    finally:
        os.close(fd)


def segments_of(table: SegmentTable, count: int, size: int = SEGMENT) -> list[Segment]:
    return [table.register(index * size, size) for index in range(count)]


def test_unpinned_segments_are_purged_and_pin_reports_it(
    mnt: Path, data_file: tuple[int, bytes]
) -> None:
    fd, data = data_file
    with SegmentTable(fd) as table:
        first, second, third = segments_of(table, 3)
        assert [s.state for s in (first, second, third)] == [abi.SEGMENT_PINNED] * 3
        first.unpin()
        second.unpin()
        assert vrange_status(fd) == (2 * SEGMENT, 0)
        assert os.pread(fd, PAGE, 0) == data[:PAGE]  # unpinned, not purged: intact

        assert purge(mnt) == 2 * SEGMENT
        assert vrange_status(fd) == (2 * SEGMENT, 2 * SEGMENT)
        assert first.state == second.state == abi.SEGMENT_PURGED
        # Lost data never passes for data: not from the daemon, not from the page cache.
        assert errno_of(lambda: os.pread(fd, PAGE, 0)) == errno.EIO
        assert errno_of(lambda: os.pread(fd, 10, SEGMENT + 100)) == errno.EIO
        # The pinned segment is untouched.
        assert os.pread(fd, SEGMENT, 2 * SEGMENT) == data[2 * SEGMENT : 3 * SEGMENT]

        assert first.pin() is True
        assert os.pread(fd, SEGMENT, 0) == bytes(SEGMENT)  # told: zeros from now on
        assert errno_of(lambda: os.pread(fd, PAGE, SEGMENT)) == errno.EIO  # not told yet
        assert vrange_status(fd) == (SEGMENT, SEGMENT)
        assert first.pin() is False  # reported once

        # A write repopulates; a new cycle does not report the old purge.
        os.pwrite(fd, data[:SEGMENT], 0)
        first.unpin()
        assert first.pin() is False
        assert os.pread(fd, SEGMENT, 0) == data[:SEGMENT]
        assert third.pin() is False


def test_a_pinned_segment_survives_every_purge(mnt: Path, data_file: tuple[int, bytes]) -> None:
    fd, data = data_file
    with SegmentTable(fd) as table:
        segments = segments_of(table, 16)
        for segment in segments[::2]:
            segment.unpin()
        assert purge(mnt) == 8 * SEGMENT
        assert purge(mnt) == 0
        for index, segment in enumerate(segments):
            assert segment.pin() is (index % 2 == 0)
            if index % 2:
                start = index * SEGMENT
                assert os.pread(fd, SEGMENT, start) == data[start : start + SEGMENT]


def test_partial_segments_lose_only_the_tail_a_purge_needs(
    mnt: Path, data_file: tuple[int, bytes]
) -> None:
    fd, data = data_file
    with SegmentTable(fd) as table:
        segment = table.register(0, MiB, partial=True)
        segment.unpin()
        assert purge(mnt, 4 * PAGE) == 4 * PAGE
        assert vrange_status(fd) == (MiB, 4 * PAGE)
        assert os.pread(fd, MiB - 4 * PAGE, 0) == data[: MiB - 4 * PAGE]
        assert errno_of(lambda: os.pread(fd, PAGE, MiB - PAGE)) == errno.EIO
        assert segment.pin() is True
        assert os.pread(fd, MiB, 0) == data[: MiB - 4 * PAGE] + bytes(4 * PAGE)


def test_segments_and_ranges_share_the_lru_oldest_first(mnt: Path) -> None:
    fds = []
    for name in ("a", "b", "c"):
        (mnt / name).write_bytes(os.urandom(SEGMENT))
        fds.append(os.open(mnt / name, os.O_RDWR))
    try:
        tables = [SegmentTable(fds[0]), SegmentTable(fds[2])]
        oldest = tables[0].register(0, SEGMENT)
        newest = tables[1].register(0, SEGMENT)
        oldest.unpin()
        fvrange(fds[1], 0, SEGMENT, VRANGE_VOLATILE)  # between the two
        newest.unpin()
        assert purge(mnt, SEGMENT) == SEGMENT
        assert (oldest.state, newest.state) == (abi.SEGMENT_PURGED, abi.SEGMENT_UNPINNED)
        assert vrange_status(fds[1]) == (SEGMENT, 0)
        assert purge(mnt, SEGMENT) == SEGMENT
        assert vrange_status(fds[1]) == (SEGMENT, SEGMENT)
        assert newest.state == abi.SEGMENT_UNPINNED
        # Unpinning again renews the stamp: the range marked before it goes first.
        fvrange(fds[1], 0, SEGMENT, VRANGE_NONVOLATILE)
        os.pwrite(fds[1], b"x" * SEGMENT, 0)
        fvrange(fds[1], 0, SEGMENT, VRANGE_VOLATILE)
        newest.pin()
        newest.unpin()
        assert purge(mnt, SEGMENT) == SEGMENT
        assert vrange_status(fds[1]) == (SEGMENT, SEGMENT)
        assert newest.state == abi.SEGMENT_UNPINNED
        for table in tables:
            table.close()
    finally:
        for fd in fds:
            os.close(fd)


def test_segments_count_in_status_and_statistics(mnt: Path, data_file: tuple[int, bytes]) -> None:
    fd, _data = data_file
    before = statistics(mnt)
    with SegmentTable(fd) as table:
        segments = segments_of(table, 4)
        segments[0].unpin()
        segments[1].unpin()
        counters = statistics(mnt)
        assert counters["segments"] == 4
        assert counters["volatile_bytes"] == before["volatile_bytes"] + 2 * SEGMENT
        assert vrange_status(fd, SEGMENT, 2 * SEGMENT) == (SEGMENT, 0)
        segments[3].release()
        assert statistics(mnt)["segments"] == 3


def test_segments_and_ranges_never_overlap(mnt: Path, data_file: tuple[int, bytes]) -> None:
    fd, _data = data_file
    with SegmentTable(fd) as table:
        table.register(0, SEGMENT)
        assert errno_of(lambda: table.register(SEGMENT - PAGE, SEGMENT)) == errno.EBUSY
        assert errno_of(lambda: fvrange(fd, 0, 0, VRANGE_VOLATILE)) == errno.EBUSY
        assert errno_of(lambda: fvrange(fd, PAGE, PAGE, VRANGE_NONVOLATILE)) == errno.EBUSY
        fvrange(fd, 4 * SEGMENT, SEGMENT, VRANGE_VOLATILE)
        assert errno_of(lambda: table.register(4 * SEGMENT, PAGE)) == errno.EBUSY
        # Purged data nobody was told of is no place for a segment either.
        purge(mnt)
        assert errno_of(lambda: table.register(4 * SEGMENT, PAGE)) == errno.EBUSY
        assert fvrange(fd, 4 * SEGMENT, SEGMENT, VRANGE_NONVOLATILE) == (SEGMENT, True)
        assert table.register(4 * SEGMENT, SEGMENT).index == 1


def test_bad_requests_get_clear_errors(mnt: Path, data_file: tuple[int, bytes]) -> None:
    fd, _data = data_file
    register = abi.VOLFS_SEGMENT.pack(0, SEGMENT, 0, 0)
    assert errno_of(lambda: fcntl.ioctl(fd, abi.VOLFS_IOC_SEGMENT_REGISTER, register)) == (
        errno.ENOENT
    )
    assert errno_of(lambda: SegmentTable(fd, abi.SEGMENTS_PER_FILE_MAX + 1)) == errno.EINVAL
    flagged = abi.VOLFS_SEGMENTS.pack(0, 2, 0, 0, b"", b"")
    assert errno_of(lambda: fcntl.ioctl(fd, abi.VOLFS_IOC_SEGMENTS, flagged)) == errno.EINVAL
    assert errno_of(lambda: SegmentTable(fd, create=False)) == errno.ENOENT
    directory = os.open(mnt, os.O_RDONLY)
    try:
        assert errno_of(lambda: SegmentTable(directory)) == errno.EISDIR
    finally:
        os.close(directory)
    with SegmentTable(fd, 2) as table:
        assert table.capacity == 2
        for offset, length, expected in (
            (1, PAGE, errno.EINVAL),
            (0, PAGE + 1, errno.EINVAL),
            (0, 0, errno.EINVAL),
            (MiB, PAGE, errno.EINVAL),  # past the end of the file
            ((1 << 64) - PAGE, PAGE, errno.EINVAL),
        ):
            assert errno_of(lambda o=offset, n=length: table.register(o, n)) == expected
        table.register(0, PAGE)
        table.register(PAGE, PAGE)
        assert errno_of(lambda: table.register(2 * PAGE, PAGE)) == errno.ENOSPC
        release = abi.VOLFS_SEGMENT.pack(0, 0, 0, 7)
        assert errno_of(lambda: fcntl.ioctl(fd, abi.VOLFS_IOC_SEGMENT_RELEASE, release)) == (
            errno.EINVAL
        )
        garbage = Segment(table, 1 << 30, 0, PAGE, False)
        assert errno_of(garbage.pin) == errno.EINVAL


def test_the_last_close_makes_every_table_stale(mnt: Path) -> None:
    path = mnt / "f"
    path.write_bytes(bytes(MiB))
    fd = os.open(path, os.O_RDWR)
    table = SegmentTable(fd)
    segment = table.register(0, SEGMENT)
    segment.unpin()
    os.close(fd)  # the release reaches the daemon a moment later
    wait_for(lambda: segment.stale, 10, "the table to end")
    assert errno_of(segment.pin) == errno.ESTALE
    assert errno_of(segment.unpin) == errno.ESTALE
    # A new open gets a new table, with nothing of the old volatility.
    fd = os.open(path, os.O_RDWR)
    try:
        with SegmentTable(fd) as fresh:
            assert fresh.state(0) == abi.SEGMENT_FREE
            assert vrange_status(fd) == (0, 0)
    finally:
        os.close(fd)
    table.close()


def test_a_read_only_descriptor_sees_states_only(mnt: Path, data_file: tuple[int, bytes]) -> None:
    fd, _data = data_file
    early_reader = os.open(mnt / "cache.bin", os.O_RDONLY)
    try:  # a reader never makes a table
        assert errno_of(lambda: SegmentTable(early_reader)) == errno.ENOENT
    finally:
        os.close(early_reader)
    with SegmentTable(fd) as table:
        segment = table.register(0, SEGMENT)
        segment.unpin()
        reader_fd = os.open(mnt / "cache.bin", os.O_RDONLY)
        try:
            with SegmentTable(reader_fd) as reader:
                assert not reader.writable
                assert reader.state(segment.index) == abi.SEGMENT_UNPINNED
                seen = Segment(reader, segment.index, 0, SEGMENT, False)
                assert errno_of(seen.pin) == errno.EBADF
                # Nor can the memfd it got be mapped for writing.
                assert errno_of(lambda: reader.register(SEGMENT, SEGMENT)) == errno.EBADF
        finally:
            os.close(reader_fd)


def segment_token(fd: int) -> tuple[int, bytes, bytes]:
    """VOLFS_IOC_SEGMENTS by hand: the daemon's pid, a token and the socket's name."""
    buffer = bytearray(abi.VOLFS_SEGMENTS.pack(0, 0, 0, 0, b"", b""))
    fcntl.ioctl(fd, abi.VOLFS_IOC_SEGMENTS, buffer, True)
    _capacity, _flags, pid, _granted, token, name = abi.VOLFS_SEGMENTS.unpack(buffer)
    return pid, token, name.split(b"\0", 1)[0]


def test_a_token_is_good_once_and_only_from_the_daemon(
    volfs: Mount, data_file: tuple[int, bytes]
) -> None:
    fd, _data = data_file
    pid, token, name = segment_token(fd)
    assert pid == volfs.pid
    memfd = client._receive_table(pid, token, name)
    os.close(memfd)
    assert errno_of(lambda: client._receive_table(pid, token, name)) == errno.EACCES
    assert errno_of(lambda: client._receive_table(pid, os.urandom(16), name)) == errno.EACCES
    # Whoever else listens on a name is not the daemon: nothing it sends is taken.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as impostor:
        impostor.bind(b"\0volfs-impostor-" + os.urandom(4).hex().encode())
        impostor.listen(1)
        impostor_name = impostor.getsockname()[1:]
        _pid, token, _name = segment_token(fd)
        assert errno_of(lambda: client._receive_table(pid, token, impostor_name)) == errno.EPERM
    # A connection that sends nothing is dropped in time; others are served meanwhile.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(b"\0" + name)
        with SegmentTable(fd) as table:
            assert table.capacity == abi.SEGMENTS_DEFAULT
        idle.settimeout(10)
        assert idle.recv(8) == b""


def test_tables_are_charged_to_the_size_cap(mount_volfs: Callable[..., Mount]) -> None:
    mount = mount_volfs("size=4M")
    path = mount.path / "f"
    path.write_bytes(bytes(PAGE))
    fd = os.open(path, os.O_RDWR)
    try:
        used = statistics(mount.path)["used_bytes"]
        assert errno_of(lambda: SegmentTable(fd, abi.SEGMENTS_PER_FILE_MAX)) == errno.ENOSPC
        assert statistics(mount.path)["used_bytes"] == used  # nothing charged
        with SegmentTable(fd, 8192) as table:
            charged = statistics(mount.path)["used_bytes"] - used
            assert charged >= abi.segment_table_bytes(8192)
            table.register(0, PAGE)
    finally:
        os.close(fd)
    wait_for(lambda: statistics(mount.path)["used_bytes"] == used, 10, "the charge back")


def test_the_size_cap_purges_unpinned_segments_before_enospc(
    mount_volfs: Callable[..., Mount],
) -> None:
    mount = mount_volfs("size=8M")
    fd = os.open(mount.path / "cache", os.O_RDWR | os.O_CREAT)
    other = os.open(mount.path / "other", os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, os.urandom(6 * MiB), 0)
        with SegmentTable(fd) as table:
            segments = segments_of(table, 6, MiB)
            for segment in segments[:4]:
                segment.unpin()
            os.pwrite(other, os.urandom(3 * MiB), 0)  # needs a purge to fit
            assert statistics(mount.path)["purges_size"] >= 1
            purged = [segment.pin() for segment in segments]
            assert any(purged[:4]) and not any(purged[4:])

            # Pinned segments are never purged for room: the cap says no instead.
            def fill() -> None:
                for offset in range(3 * MiB, 16 * MiB, MiB):
                    os.pwrite(other, bytes(MiB), offset)

            assert errno_of(fill) == errno.ENOSPC
            assert all(segment.pin() is False for segment in segments)
    finally:
        os.close(fd)
        os.close(other)


def test_a_table_full_of_garbage_harms_only_its_file(
    mnt: Path, volfs: Mount, data_file: tuple[int, bytes]
) -> None:
    fd, _data = data_file
    bystander = mnt / "bystander"
    kept = os.urandom(MiB)
    bystander.write_bytes(kept)
    other = os.open(bystander, os.O_RDWR)
    rng = random.Random(1)
    try:
        with SegmentTable(other) as theirs, SegmentTable(fd, 4096) as table:
            mine = theirs.register(0, MiB)
            segments_of(table, 16)
            view = table._map
            for _ in range(200):
                offset = rng.randrange(len(view) - 64)
                view[offset : offset + 64] = rng.randbytes(64)
                if rng.random() < 0.2:
                    purge(mnt)
                    statistics(mnt)
                    vrange_status(fd)
                try:
                    os.pread(fd, PAGE, rng.randrange(16) * SEGMENT)
                except OSError as error:  # purged: fine, as long as it is said
                    assert error.errno == errno.EIO
            assert mine.pin() is False
            assert bystander.read_bytes() == kept
            assert volfs.process.poll() is None
    finally:
        os.close(other)


def test_vrangectl_shows_segments(mnt: Path, data_file: tuple[int, bytes]) -> None:
    fd, _data = data_file
    lone = os.open(mnt / "cache.bin", os.O_RDONLY)

    def vrangectl(*arguments: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-m", "volfs.vrangectl", *arguments],
            pass_fds=(fd, lone),
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.splitlines()

    try:
        # Asking never makes a table.
        assert vrangectl("status", f"/dev/fd/{lone}", "--ranges")[1:] == [
            "START  END  SIZE  FLAGS  STATE"
        ]
        assert "segments=0" in vrangectl("stats", str(mnt))
        with SegmentTable(fd) as table:
            table.register(0, SEGMENT)
            table.register(SEGMENT, SEGMENT, partial=True).unpin()
            assert vrangectl("status", f"/dev/fd/{lone}", "--ranges") == [
                f"volatile={SEGMENT} purged=0",
                "START  END  SIZE  FLAGS  STATE",
                "SEGMENT  START     END   SIZE  FLAGS    STATE",
                "      0      0   65536  65536  FULL     pinned",
                "      1  65536  131072  65536  PARTIAL  unpinned",
            ]
            assert "segments=2" in vrangectl("stats", str(mnt))
    finally:
        os.close(lone)


def test_segment_header_matches_the_python_abi(tmp_path: Path) -> None:
    names = {
        "VOLFS_IOC_SEGMENTS": abi.VOLFS_IOC_SEGMENTS,
        "VOLFS_IOC_SEGMENT_REGISTER": abi.VOLFS_IOC_SEGMENT_REGISTER,
        "VOLFS_IOC_SEGMENT_RELEASE": abi.VOLFS_IOC_SEGMENT_RELEASE,
        "sizeof(struct volfs_segments_args)": abi.VOLFS_SEGMENTS.size,
        "sizeof(struct volfs_segment_args)": abi.VOLFS_SEGMENT.size,
        "sizeof(struct volfs_segment_slot)": abi.SEGMENT_SLOT.size,
        "sizeof(struct volfs_segment_table_header)": abi.SEGMENT_TABLE_HEADER.size,
        "offsetof(struct volfs_segment_slot, stamp)": abi.SEGMENT_STAMP_OFFSET,
        "VOLFS_SEGMENT_FREE": abi.SEGMENT_FREE,
        "VOLFS_SEGMENT_PINNED": abi.SEGMENT_PINNED,
        "VOLFS_SEGMENT_UNPINNED": abi.SEGMENT_UNPINNED,
        "VOLFS_SEGMENT_PURGING": abi.SEGMENT_PURGING,
        "VOLFS_SEGMENT_PURGED": abi.SEGMENT_PURGED,
        "VOLFS_SEGMENT_STALE": abi.SEGMENT_STALE,
        "VOLFS_SEGMENT_TABLE_MAGIC": abi.SEGMENT_TABLE_MAGIC,
        "VOLFS_SEGMENT_TABLE_VERSION": abi.SEGMENT_TABLE_VERSION,
        "VOLFS_SEGMENTS_DEFAULT": abi.SEGMENTS_DEFAULT,
        "VOLFS_SEGMENTS_PER_FILE_MAX": abi.SEGMENTS_PER_FILE_MAX,
        "VOLFS_SEGMENTS_PER_MOUNT_MAX": abi.SEGMENTS_PER_MOUNT_MAX,
        "VOLFS_SEGMENT_TOKEN_BYTES": abi.SEGMENT_TOKEN_BYTES,
        "VOLFS_SEGMENT_TOKEN_SECONDS": abi.SEGMENT_TOKEN_SECONDS,
        "VOLFS_SEGMENT_SOCKET_NAME_BYTES": abi.SEGMENT_SOCKET_NAME_BYTES,
        "VOLFS_SEGMENTS_EXISTING": abi.VOLFS_SEGMENTS_EXISTING,
        "VOLFS_SEGMENT_HANDOVER_SECONDS": abi.SEGMENT_HANDOVER_SECONDS,
    }
    source = tmp_path / "segments_abi.c"
    prints = "\n".join(f'    printf("%llu\\n", (unsigned long long)({name}));' for name in names)
    source.write_text(
        f"#include <volfs.h>\n#include <stdio.h>\nint main(void) {{\n{prints}\n    return 0;\n}}\n"
    )
    output = subprocess.run([compile_c(source)], capture_output=True, text=True, check=True)
    assert dict(zip(names, map(int, output.stdout.split()), strict=True)) == names


def test_memory_pressure_purges_unpinned_segments_and_gives_the_memory_back(
    mount_volfs: Callable[..., Mount], tmp_path: Path
) -> None:
    fifo = tmp_path / "pressure"
    os.mkfifo(fifo)
    mount = mount_volfs(
        "size=256M,pressure_batch=32M,pressure_watermark=0",
        env={"MEMORY_PRESSURE_WATCH": str(fifo)},
    )
    data = os.urandom(64 * MiB)
    (mount.path / "cache").write_bytes(data)
    fd = os.open(mount.path / "cache", os.O_RDWR)
    try:
        with SegmentTable(fd) as table:
            segments = segments_of(table, 64, MiB)
            for segment in segments[:48]:
                segment.unpin()
            before = mount.memory_bytes()
            writer = open_fifo_writer(fifo)
            try:
                os.write(writer, b"pressure\n")
                wait_for(lambda: vrange_status(fd)[1] == 32 * MiB, 10, "one batch purged")
            finally:
                os.close(writer)
            wait_for(lambda: before - mount.memory_bytes() > 30 * MiB, 10, "memory to drop 32 MiB")
            # The 32 least recently unpinned went; the rest is intact.
            assert [segment.pin() for segment in segments] == [True] * 32 + [False] * 32
            assert os.pread(fd, 32 * MiB, 32 * MiB) == data[32 * MiB :]
            assert os.pread(fd, MiB, 0) == bytes(MiB)
    finally:
        os.close(fd)


def test_stamps_from_the_future_neither_stall_a_purge_nor_keep_segments(
    mnt: Path, data_file: tuple[int, bytes]
) -> None:
    fd, _data = data_file
    (mnt / "other").write_bytes(os.urandom(SEGMENT))
    other = os.open(mnt / "other", os.O_RDWR)
    try:
        with SegmentTable(fd) as table, SegmentTable(other) as theirs:
            # A clock far ahead (another time namespace, or a client lying): ordered as now.
            segments = segments_of(table, 16, 16 * PAGE)
            for segment in segments:
                segment.unpin()
                stamp = abi.segment_slot_offset(segment.index) + abi.SEGMENT_STAMP_OFFSET
                table._map[stamp : stamp + 8] = (1 << 62).to_bytes(8, "little")
            bystander = theirs.register(0, SEGMENT)
            bystander.unpin()
            started = time.monotonic()
            assert purge(mnt) == MiB + SEGMENT
            assert time.monotonic() - started < 5
            assert all(segment.pin() for segment in segments)
            assert bystander.pin() is True
    finally:
        os.close(other)


def test_one_user_cannot_take_every_handover_connection(
    data_file: tuple[int, bytes],
) -> None:
    fd, _data = data_file
    _pid, _token, name = segment_token(fd)
    hogs = []
    try:
        for _ in range(4):
            hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            hog.connect(b"\0" + name)
            hogs.append(hog)
        time.sleep(0.2)  # accepted and counted
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as fifth:
            fifth.settimeout(1)
            fifth.connect(b"\0" + name)
            assert fifth.recv(8) == b""  # hung up at once, not after the 2 s allowed
    finally:
        for hog in hogs:
            hog.close()
    time.sleep(0.2)
    with SegmentTable(fd) as table:
        assert table.capacity == abi.SEGMENTS_DEFAULT
