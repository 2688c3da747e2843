"""Purging under pressure: the pressure watcher, memory given back, data kept."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import mmap
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Mount, wait_for
from volfs.client import (
    VRANGE_NONVOLATILE,
    VRANGE_PARTIAL,
    VRANGE_VOLATILE,
    fvrange,
    purge,
    statistics,
    vrange_status,
)
from volfs.daemon.meminfo import meminfo

MiB = 1 << 20
PAGE = 4096

_libc = ctypes.CDLL(None, use_errno=True)


def open_fifo_writer(fifo: Path) -> int:
    """Open a FIFO for writing without blocking; ENXIO means nobody reads it."""
    return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)


def test_meminfo_reads_what_the_watermark_compares_in_bytes() -> None:
    total = meminfo("MemTotal")
    assert total == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < meminfo("MemAvailable") <= total
    with pytest.raises(OSError) as missing:
        meminfo("MemNowhere")
    assert missing.value.errno == errno.ENOENT


def test_pressure_event_purges_a_batch_oldest_first(
    mount_volfs: Callable[..., Mount], tmp_path: Path
) -> None:
    fifo = tmp_path / "pressure"
    os.mkfifo(fifo)
    mount = mount_volfs(
        "size=256M,pressure_batch=8M,pressure_watermark=0",
        env={"MEMORY_PRESSURE_WATCH": str(fifo)},
    )
    data = os.urandom(32 * MiB)
    (mount.path / "cache").write_bytes(data)
    fd = os.open(mount.path / "cache", os.O_RDWR)
    try:
        for index in range(4):
            fvrange(fd, index * 8 * MiB, 8 * MiB, VRANGE_VOLATILE)
        writer = open_fifo_writer(fifo)
        try:
            os.write(writer, b"pressure\n")
            wait_for(lambda: vrange_status(fd)[1] == 8 * MiB, 10, "one batch to be purged")
        finally:
            os.close(writer)
        assert vrange_status(fd, 0, 8 * MiB) == (8 * MiB, 8 * MiB)  # the oldest range
        assert fvrange(fd, 8 * MiB, 24 * MiB, VRANGE_NONVOLATILE) == (24 * MiB, False)
        assert os.pread(fd, 24 * MiB, 8 * MiB) == data[8 * MiB :]
        logged = re.search(r"purge \(pressure\): 1 ranges, (\d+) bytes freed; (.*)", mount.log())
        assert logged, mount.log()
        assert int(logged[1]) == 8 * MiB
        counters = dict(field.split("=") for field in logged[2].split())
        assert counters["purges_pressure"] == "1" and counters["purged_bytes"] == str(8 * MiB)
        assert counters["volatile_bytes"] == str(32 * MiB) and counters["inodes"] == "2"
    finally:
        os.close(fd)


def test_pressure_off_watches_nothing(mount_volfs: Callable[..., Mount], tmp_path: Path) -> None:
    fifo = tmp_path / "pressure"
    os.mkfifo(fifo)
    mount = mount_volfs("size=64M,pressure=off", env={"MEMORY_PRESSURE_WATCH": str(fifo)})
    os.listdir(mount.path)  # served: the watcher would have opened the FIFO before serving
    with pytest.raises(OSError) as caught:
        open_fifo_writer(fifo)
    assert caught.value.errno == errno.ENXIO  # no reader: the daemon did not open it


def test_purged_memory_returns_to_the_system(mount_volfs: Callable[..., Mount]) -> None:
    mount = mount_volfs("size=1G,pressure=off")
    keep = os.urandom(MiB)
    (mount.path / "keep").write_bytes(keep)
    block = os.urandom(MiB)
    with open(mount.path / "cache", "wb") as file:
        for _ in range(512):
            file.write(block)
    fd = os.open(mount.path / "cache", os.O_RDWR)
    try:
        fvrange(fd, 0, 512 * MiB, VRANGE_VOLATILE)
        before = mount.memory_bytes()
        assert purge(mount.path) == 512 * MiB
        wait_for(lambda: before - mount.memory_bytes() > 500 * MiB, 10, "memory to drop by 512 MiB")
        assert os.statvfs(mount.path).f_bfree * 4096 == 1023 * MiB
    finally:
        os.close(fd)
    assert (mount.path / "keep").read_bytes() == keep


def test_purging_dirty_mmap_pages_neither_hangs_nor_hides_the_loss(
    mount_volfs: Callable[..., Mount],
) -> None:
    """The kernel writes dirty pages of a purged range back while dropping them from its cache.

    That must not deadlock the daemon, and the written-back pages, which repopulate the range,
    must not pass for intact data: NON_VOLATILE still reports the purge.
    """
    mnt = mount_volfs("size=64M,pressure=off").path
    (mnt / "shared").write_bytes(bytes(64 * 4096))
    fd = os.open(mnt / "shared", os.O_RDWR)
    try:
        view = mmap.mmap(fd, 64 * 4096, mmap.MAP_SHARED)
        try:
            fvrange(fd, 0, 32 * 4096, VRANGE_VOLATILE)
            for page in range(0, 64, 2):
                view[page * 4096 : page * 4096 + 5] = b"dirty"  # dirty, inside and outside
            freed: list[int] = []
            purger = threading.Thread(target=lambda: freed.append(purge(mnt)), daemon=True)
            purger.start()
            purger.join(30)
            assert not purger.is_alive(), "the purge hangs on the dirty pages' writeback"
            assert freed == [32 * 4096]
            assert fvrange(fd, 0, 32 * 4096, VRANGE_NONVOLATILE)[1] is True
            for page in range(32, 64, 2):
                assert view[page * 4096 : page * 4096 + 5] == b"dirty"
            view.flush()
        finally:
            view.close()
        assert os.pread(fd, 5, 40 * 4096) == b"dirty"
    finally:
        os.close(fd)


@pytest.mark.skipif(not os.path.exists("/proc/pressure/memory"), reason="kernel without PSI")
def test_the_psi_trigger_is_armed_by_default(mount_volfs: Callable[..., Mount]) -> None:
    mount = mount_volfs("size=16M")
    (mount.path / "cache").write_bytes(b"c" * MiB)
    fd = os.open(mount.path / "cache", os.O_RDWR)
    try:
        fvrange(fd, 0, MiB, VRANGE_VOLATILE)
        for _ in range(200):  # the daemon goes round its loop; an idle trigger stays quiet
            vrange_status(fd)
        assert vrange_status(fd) == (MiB, 0)
        assert statistics(mount.path)["purges_pressure"] == 0
    finally:
        os.close(fd)
    assert "memory pressure: watching " in mount.log()
    assert "no PSI source" not in mount.log()


def test_low_free_memory_purges_batch_after_batch_until_nothing_is_volatile(
    mount_volfs: Callable[..., Mount],
) -> None:
    # A watermark of all the machine's memory is always breached: the watcher keeps purging.
    mount = mount_volfs("size=64M,pressure_batch=4M,pressure_watermark=100%")
    keep = os.urandom(8 * MiB)
    (mount.path / "keep").write_bytes(keep)
    (mount.path / "cache").write_bytes(os.urandom(12 * MiB))
    fd = os.open(mount.path / "cache", os.O_RDWR)
    try:
        for index in range(3):
            fvrange(fd, index * 4 * MiB, 4 * MiB, VRANGE_VOLATILE)
        wait_for(lambda: vrange_status(fd)[1] == 12 * MiB, 10, "every range to be purged")
        assert statistics(mount.path)["purges_pressure"] >= 3  # one 4 MiB batch per range
        assert fvrange(fd, 0, 12 * MiB, VRANGE_NONVOLATILE) == (12 * MiB, True)
    finally:
        os.close(fd)
    assert (mount.path / "keep").read_bytes() == keep
    assert statistics(mount.path)["used_bytes"] == 8 * MiB


def test_systemd_pressure_socket_gets_the_trigger_and_its_events_purge(
    mount_volfs: Callable[..., Mount], tmp_path: Path
) -> None:
    """``$MEMORY_PRESSURE_WATCH`` naming a socket: connect, write ``$MEMORY_PRESSURE_WRITE``."""
    trigger = b"some 123000 2000000\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "pressure.sock"))
        listener.listen(1)
        listener.settimeout(10)
        mount = mount_volfs(
            "size=64M,pressure_batch=4M,pressure_watermark=0",
            env={
                "MEMORY_PRESSURE_WATCH": str(tmp_path / "pressure.sock"),
                "MEMORY_PRESSURE_WRITE": base64.b64encode(trigger).decode(),
            },
        )
        connection, _address = listener.accept()
    with connection:
        connection.settimeout(10)
        assert connection.recv(4096) == trigger
        (mount.path / "cache").write_bytes(os.urandom(8 * MiB))
        fd = os.open(mount.path / "cache", os.O_RDWR)
        try:
            fvrange(fd, 0, 4 * MiB, VRANGE_VOLATILE)
            fvrange(fd, 4 * MiB, 4 * MiB, VRANGE_VOLATILE)
            connection.send(b"pressure")
            wait_for(lambda: vrange_status(fd)[1] == 4 * MiB, 10, "one batch to be purged")
            assert vrange_status(fd, 0, 4 * MiB) == (4 * MiB, 4 * MiB)  # the older range
            connection.close()  # the source goes away: the watcher must stop, not spin
            wait_for(lambda: "can signal no more" in mount.log(), 10, "the watcher to stop")
            for _ in range(100):
                assert vrange_status(fd, 4 * MiB, 4 * MiB) == (4 * MiB, 0)
            assert statistics(mount.path)["purges_pressure"] == 1
        finally:
            os.close(fd)
    assert "memory pressure: watching " + str(tmp_path / "pressure.sock") in mount.log()


def resident_pages(view: mmap.mmap, pages: int) -> list[bool]:
    """Which pages of a file mapping are in the kernel's page cache (mincore(2))."""
    anchor = ctypes.c_char.from_buffer(view)
    try:
        vector = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), pages * PAGE, vector):
            raise OSError(ctypes.get_errno(), "mincore")
        return [bool(byte & 1) for byte in vector]
    finally:
        del anchor


def test_a_purge_drops_only_the_purged_pages_from_the_kernel_cache(mnt: Path) -> None:
    data = os.urandom(64 * PAGE)
    (mnt / "cached").write_bytes(data)
    fd = os.open(mnt / "cached", os.O_RDWR)
    try:
        assert os.pread(fd, 64 * PAGE, 0) == data
        view = mmap.mmap(fd, 64 * PAGE, mmap.MAP_SHARED)
        try:
            assert all(resident_pages(view, 64)), "the read did not fill the page cache"
            fvrange(fd, 16 * PAGE, 16 * PAGE, VRANGE_VOLATILE)
            assert purge(mnt) == 16 * PAGE
            resident = resident_pages(view, 64)
        finally:
            view.close()
        assert not any(resident[16:32])  # dropped: the kernel cannot serve purged data
        assert all(resident[:16]) and all(resident[32:])  # the rest of the file stays cached
    finally:
        os.close(fd)


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A memory cgroup (v2 or v1) capped at ``limit`` bytes, removed afterwards."""
    root = Path("/sys/fs/cgroup")
    subtree = root / "cgroup.subtree_control"
    if subtree.exists() and "memory" in subtree.read_text().split():
        group, limit_file = root / "volfs-test-thrash", "memory.max"
    elif (root / "memory" / "memory.limit_in_bytes").exists():
        group, limit_file = root / "memory" / "volfs-test-thrash", "memory.limit_in_bytes"
    else:
        pytest.skip("no memory cgroup to make a process thrash in")
    group.mkdir(exist_ok=True)
    try:
        (group / limit_file).write_text(str(limit))
        yield group
    finally:
        wait_for(lambda: not (group / "cgroup.procs").read_text().strip(), 10, "thrasher gone")
        group.rmdir()


def memory_stall_us() -> int:
    """Microseconds some task stalled on memory since boot, system-wide (PSI)."""
    some = Path("/proc/pressure/memory").read_text().splitlines()[0]
    return int(some.rpartition("total=")[2])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a memory cgroup")
@pytest.mark.skipif(not os.path.exists("/proc/pressure/memory"), reason="kernel without PSI")
def test_real_memory_pressure_fires_the_psi_trigger_and_purges(
    mount_volfs: Callable[..., Mount], tmp_path: Path
) -> None:
    """A process thrashing in a small memory cgroup makes tasks stall on memory for real.

    The daemon watches the system-wide PSI file as systemd would hand it over, without a
    trigger to write: it arms its own (``pressure_stall=50``: 50 ms of stall in 2 s).
    """
    mount = mount_volfs(
        "size=64M,pressure_stall=50,pressure_watermark=0",
        env={"MEMORY_PRESSURE_WATCH": "/proc/pressure/memory"},
    )
    keep = os.urandom(4 * MiB)
    (mount.path / "keep").write_bytes(keep)
    (mount.path / "cache").write_bytes(os.urandom(8 * MiB))
    churn = tmp_path / "churn"  # on a disk filesystem: its pages can be evicted and re-read
    churn.write_bytes(os.urandom(12 * MiB))
    fd = os.open(mount.path / "cache", os.O_RDWR)
    try:
        fvrange(fd, 0, 8 * MiB, VRANGE_VOLATILE)
        with memory_cgroup(8 * MiB) as group:
            churn_fd = os.open(churn, os.O_RDONLY)
            os.fsync(churn_fd)
            os.posix_fadvise(churn_fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(churn_fd)
            stalled_before = memory_stall_us()
            # Re-reading a file bigger than the cgroup's memory refaults its own pages: the
            # reader stalls on memory, which PSI counts system-wide.
            thrasher = subprocess.Popen(
                [
                    "sh",
                    "-c",
                    f"echo $$ > {group / 'cgroup.procs'}; "
                    f'while :; do cat "{churn}" > /dev/null; done',
                ],
                start_new_session=True,
            )
            try:
                deadline = time.monotonic() + 30
                while not statistics(mount.path)["purges_pressure"]:
                    if time.monotonic() > deadline:
                        stalled = memory_stall_us() - stalled_before
                        # Twice the trigger's 50 ms per 2 s window, on average: it must fire.
                        if stalled < 1_500_000:
                            pytest.skip(f"the machine stalled only {stalled} us in 30 s")
                        pytest.fail(f"{stalled} us of memory stall and no purge")
                    time.sleep(0.05)
            finally:
                os.killpg(thrasher.pid, signal.SIGKILL)
                thrasher.wait()
        assert vrange_status(fd) == (8 * MiB, 8 * MiB)
        assert fvrange(fd, 0, 8 * MiB, VRANGE_NONVOLATILE) == (8 * MiB, True)
    finally:
        os.close(fd)
    assert (mount.path / "keep").read_bytes() == keep
    assert "memory pressure: watching /proc/pressure/memory" in mount.log()


def test_the_size_cap_purges_oldest_first_and_only_what_it_needs(
    mount_volfs: Callable[..., Mount],
) -> None:
    mount = mount_volfs("size=32M,pressure=off")
    contents = {name: os.urandom(8 * MiB) for name in ("old", "partial", "new")}
    fds = {}
    for name, data in contents.items():
        (mount.path / name).write_bytes(data)
        fds[name] = os.open(mount.path / name, os.O_RDWR)
    try:
        fvrange(fds["old"], 0, 8 * MiB, VRANGE_VOLATILE)
        fvrange(fds["partial"], 0, 8 * MiB, VRANGE_VOLATILE, VRANGE_PARTIAL)
        fvrange(fds["new"], 0, 8 * MiB, VRANGE_VOLATILE)

        first = os.urandom(12 * MiB)  # 4 MiB more than is free: the oldest range goes whole
        (mount.path / "first").write_bytes(first)
        assert vrange_status(fds["old"]) == (8 * MiB, 8 * MiB)
        assert vrange_status(fds["partial"]) == (8 * MiB, 0)

        second = os.urandom(6 * MiB)  # 2 MiB more: the PARTIAL range loses just its tail
        (mount.path / "second").write_bytes(second)
        assert vrange_status(fds["partial"]) == (8 * MiB, 2 * MiB)
        assert vrange_status(fds["partial"], 6 * MiB, 2 * MiB) == (2 * MiB, 2 * MiB)
        assert os.pread(fds["partial"], 6 * MiB, 0) == contents["partial"][: 6 * MiB]

        assert fvrange(fds["new"], 0, 8 * MiB, VRANGE_NONVOLATILE) == (8 * MiB, False)
        assert os.pread(fds["new"], 8 * MiB, 0) == contents["new"]
        assert fvrange(fds["old"], 0, 8 * MiB, VRANGE_NONVOLATILE) == (8 * MiB, True)
        assert (mount.path / "first").read_bytes() == first
        assert (mount.path / "second").read_bytes() == second
        assert statistics(mount.path)["purges_size"] >= 2
    finally:
        for fd in fds.values():
            os.close(fd)


def test_rewriting_held_pages_at_the_cap_purges_only_for_the_new_ones(
    mount_volfs: Callable[..., Mount],
) -> None:
    mount = mount_volfs("size=16M,pressure=off")
    (mount.path / "other").write_bytes(os.urandom(11 * MiB))
    target = os.urandom(MiB)
    (mount.path / "target").write_bytes(target)
    cache = os.urandom(4 * MiB)
    (mount.path / "cache").write_bytes(cache)  # the mount is full
    fd = os.open(mount.path / "cache", os.O_RDWR)
    try:
        fvrange(fd, 0, 4 * MiB, VRANGE_VOLATILE, VRANGE_PARTIAL)
        update = os.urandom(MiB)  # one request: 512 KiB over held pages, 512 KiB new
        target_fd = os.open(mount.path / "target", os.O_WRONLY)
        try:
            assert os.pwrite(target_fd, update, 512 * 1024) == MiB
        finally:
            os.close(target_fd)
        assert vrange_status(fd) == (4 * MiB, 512 * 1024)  # only the new pages' worth
        assert os.pread(fd, 3 * MiB, 0) == cache[: 3 * MiB]
    finally:
        os.close(fd)
    assert (mount.path / "target").read_bytes() == target[: 512 * 1024] + update


def test_a_request_bigger_than_the_filesystem_purges_nothing(
    mount_volfs: Callable[..., Mount],
) -> None:
    mount = mount_volfs("size=16M,pressure=off")
    (mount.path / "cache").write_bytes(os.urandom(8 * MiB))
    fd = os.open(mount.path / "cache", os.O_RDWR)
    big = os.open(mount.path / "big", os.O_RDWR | os.O_CREAT)
    try:
        fvrange(fd, 0, 8 * MiB, VRANGE_VOLATILE)
        with pytest.raises(OSError) as caught:
            os.posix_fallocate(big, 0, 1 << 40)  # can never fit: no one's cache is given up
        assert caught.value.errno == errno.ENOSPC
        assert vrange_status(fd) == (8 * MiB, 0)
        assert statistics(mount.path)["purges_size"] == 0
    finally:
        os.close(big)
        os.close(fd)
