"""Purging under pressure: the pressure watcher, memory given back, data kept."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Mount, wait_for
from volfs.client import (
    VRANGE_NONVOLATILE,
    VRANGE_VOLATILE,
    fvrange,
    purge,
    statistics,
    vrange_status,
)

MiB = 1 << 20


def open_fifo_writer(fifo: Path) -> int:
    """Open a FIFO for writing without blocking; ENXIO means nobody reads it."""
    return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)


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
        assert "purge (pressure)" in mount.log()
    finally:
        os.close(fd)


def test_pressure_off_watches_nothing(mount_volfs: Callable[..., Mount], tmp_path: Path) -> None:
    fifo = tmp_path / "pressure"
    os.mkfifo(fifo)
    mount_volfs("size=64M,pressure=off", env={"MEMORY_PRESSURE_WATCH": str(fifo)})
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
        before = mount.rss_bytes()
        assert purge(mount.path) == 512 * MiB
        wait_for(lambda: before - mount.rss_bytes() > 500 * MiB, 10, "RSS to drop by 512 MiB")
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
            assert purge(mnt) >= 0  # returns: no deadlock on the writeback
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
