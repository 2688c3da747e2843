"""Memory given back, mmap sharing between processes, and concurrent clients."""

from __future__ import annotations

import hashlib
import mmap
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tests.conftest import Mount, wait_for
from tests.mount.test_request_threads import served
from volfs.client import VRANGE_VOLATILE, fvrange

MiB = 1024 * 1024
GiB = 1024 * MiB


def fill(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as file:
        for _ in range(size // MiB):
            file.write(block)


def test_truncating_or_deleting_a_1gib_file_returns_the_memory(
    mount_volfs: Callable[..., Mount],
) -> None:
    mount = mount_volfs("size=2G")
    path = mount.path / "big"
    baseline = mount.memory_bytes()
    fill(path, GiB)
    grown = mount.memory_bytes()
    assert grown - baseline > 0.95 * GiB, (baseline, grown)
    os.truncate(path, 0)
    # Large releases are punched in the background: wait for the memory, not for a time.
    wait_for(lambda: grown - mount.memory_bytes() > 0.95 * GiB, 10, "memory to drop after truncate")

    fill(path, GiB)
    grown = mount.memory_bytes()
    path.unlink()
    wait_for(lambda: grown - mount.memory_bytes() > 0.95 * GiB, 10, "memory to drop after unlink")
    assert os.statvfs(mount.path).f_bfree == os.statvfs(mount.path).f_blocks


def mapped_shared_bytes(mount: Mount) -> int:
    """The daemon's RssShmem: shared memory it has mapped and touched."""
    with open(f"/proc/{mount.pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem in the daemon's status")


def test_written_data_stays_unmapped_until_read(mount_volfs: Callable[..., Mount]) -> None:
    """A purge returns memory as fast as a tmpfs punch only if the daemon has not mapped the
    pages: punching a mapped page must unmap it first. Writes, served in C (overwrites) or
    in Python (new pages, files with volatile ranges), store the data without mapping it;
    reading maps the pages, and overwrites of those are copied through the mapping."""
    mount = mount_volfs("size=1G,log_level=debug")  # debug: the daemon's counters
    before = mount.memory_bytes()
    plain = mount.path / "plain"
    fill(plain, 128 * MiB)
    fd = os.open(mount.path / "volatile", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, bytes(4096))
        fvrange(fd, 0, 4096, VRANGE_VOLATILE)
        block = os.urandom(MiB)
        for offset in range(MiB, 129 * MiB, MiB):
            os.pwrite(fd, block, offset)
    finally:
        os.close(fd)
    assert mount.memory_bytes() - before > 250 * MiB
    assert mapped_shared_bytes(mount) < 16 * MiB

    def overwrite() -> bytes:
        """Write new bytes over every page of the plain file; return them."""
        data = os.urandom(128 * MiB)
        with open(plain, "r+b", buffering=0) as file:
            for offset in range(0, len(data), MiB):
                file.write(data[offset : offset + MiB])
        return data

    def read_back() -> bytes:
        """The plain file as read from the daemon, not the kernel's cache."""
        with open(plain, "rb", buffering=0) as file:
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            return file.read()

    expected = overwrite()  # into pages the daemon has not read
    assert mapped_shared_bytes(mount) < 16 * MiB
    assert read_back() == expected
    # Reading mapped the pages, and the measure above sees it.
    assert mapped_shared_bytes(mount) > 120 * MiB
    expected = overwrite()  # into mapped pages
    assert read_back() == expected
    _reads, writes = served(mount)
    assert writes >= 256  # both overwrites were served in C


def test_mmap_shared_between_two_processes(mnt: Path) -> None:
    path = mnt / "shared"
    size = 16 * 4096
    path.write_bytes(bytes(size))
    child = textwrap.dedent(f"""
        import mmap, os, sys
        fd = os.open({str(path)!r}, os.O_RDWR)
        view = mmap.mmap(fd, {size}, mmap.MAP_SHARED)
        sys.stdout.write("ready\\n"); sys.stdout.flush()
        sys.stdin.readline()                      # parent has written through its mapping
        assert view[4096:4101] == b"hello", view[4096:4101]
        view[8192:8197] = b"world"                # answer through our own mapping
        view.flush()
        sys.stdout.write("done\\n"); sys.stdout.flush()
        view.close(); os.close(fd)
    """)
    with subprocess.Popen(
        [sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None and process.stdin is not None
        fd = os.open(path, os.O_RDWR)
        try:
            view = mmap.mmap(fd, size, mmap.MAP_SHARED)
            assert process.stdout.readline() == "ready\n"
            view[4096:4101] = b"hello"
            process.stdin.write("go\n")
            process.stdin.flush()
            assert process.stdout.readline() == "done\n"
            assert process.wait(timeout=30) == 0
            assert view[8192:8197] == b"world"
            view.flush()
            view.close()
        finally:
            os.close(fd)
    # The data reached the daemon: a fresh open after munmap, with the cache dropped, sees it.
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    data = path.read_bytes()
    assert data[4096:4101] == b"hello" and data[8192:8197] == b"world"


def _writer(path: str, seed: int, rounds: int) -> str:
    """Write a private file and overwrite a shared one in a pattern; return the private hash."""
    rng_block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    digest = hashlib.sha256()
    with open(f"{path}/own-{seed}", "wb") as own:
        for round_number in range(rounds):
            block = bytes([round_number % 256]) + rng_block[1:]
            own.write(block)
            digest.update(block)
    fd = os.open(f"{path}/common", os.O_RDWR)
    try:
        for round_number in range(rounds):
            # Each process owns every 8th 64 KiB slot of the common file.
            offset = ((round_number * 8) + seed) * len(rng_block)
            os.pwrite(fd, rng_block, offset)
            assert os.pread(fd, len(rng_block), offset) == rng_block
    finally:
        os.close(fd)
    with open(f"{path}/own-{seed}", "rb") as own:
        assert hashlib.sha256(own.read()).hexdigest() == digest.hexdigest()
    return digest.hexdigest()


def test_many_processes_reading_and_writing_at_once(mnt: Path) -> None:
    (mnt / "common").write_bytes(b"")
    rounds = 64
    with ProcessPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(_writer, [str(mnt)] * 8, range(8), [rounds] * 8))
    assert len(set(results)) == 8
    common = (mnt / "common").read_bytes()
    for seed in range(8):
        block = hashlib.sha256(str(seed).encode()).digest() * 2048
        for round_number in range(rounds):
            offset = ((round_number * 8) + seed) * len(block)
            assert common[offset : offset + len(block)] == block
