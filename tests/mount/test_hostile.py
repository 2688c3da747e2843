"""A mount shared with users who do not trust each other: what one of them can make the daemon
hold, and what another then reads.

Each test mounts a volfs with ``allow_other`` under a directory every user may traverse and
acts as the unprivileged user ``nobody`` through forked children (see
:mod:`tests.mount.test_permissions`), measuring what a user notices: errnos, bytes read, the space
``df`` shows, the daemon's resident memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import resource
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Mount, wait_for
from tests.mount.test_permissions import Mounts, User, attempt, mounts, run_as
from volfs.client import (
    VRANGE_NONVOLATILE,
    VRANGE_VOLATILE,
    SegmentTable,
    fvrange,
    purge,
    statistics,
    vrange_status,
)

__all__ = ["mounts"]  # the fixture, shared with test_permissions

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: other uids, allow_other"),
]

PAGE = 4096
MIB = 1 << 20
NOBODY = User("nobody", 65534, 65534)


def mount(mounts: Mounts, options: str) -> tuple[Path, Mount]:
    """Mount a volfs with ``allow_other``; return its path and daemon."""
    path = mounts.volfs(options=f"{options},allow_other")
    return path, mounts.volfs_mounts[-1]


def used_bytes(path: Path) -> int:
    """What ``df`` shows as used."""
    info = os.statvfs(path)
    return (info.f_blocks - info.f_bfree) * info.f_frsize


class TwoPhaseChild:
    """A child process, running as ``user``, that does ``first``, reports its result, waits
    for the parent's word and then does ``then`` (holding whatever ``first`` opened).

    The results travel as text; the child's exit status is 0 only if both phases returned.
    """

    def __init__(
        self, user: User, first: Callable[[], object], then: Callable[[], object] = lambda: None
    ) -> None:
        report_read, report_write = os.pipe()
        go_read, self._go = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child
            os.close(report_read)
            os.close(self._go)
            status = 1
            try:
                os.setgroups([])
                os.setgid(user.gid)
                os.setuid(user.uid)
                os.write(report_write, str(first()).encode())
                os.close(report_write)
                os.read(go_read, 1)
                then()
                status = 0
            finally:
                os._exit(status)
        os.close(report_write)
        os.close(go_read)
        with os.fdopen(report_read, "rb") as report:
            self.first_result = report.read().decode()

    def finish(self) -> int:
        """Let ``then`` run; return the child's exit status."""
        os.close(self._go)
        _pid, wait_status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(wait_status)


# -- directory handles ---------------------------------------------------------------------


def test_open_directory_handles_hold_no_copy_of_the_listing(mounts: Mounts) -> None:
    mnt, daemon = mount(mounts, "size=64M")
    directory = mnt / "big"
    directory.mkdir(mode=0o755)
    for index in range(10_000):
        os.mknod(directory / f"entry-{index:05d}")
    # nobody holds the listings, in a child; root measures the daemon, whose /proc nobody
    # may not read.
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    before = daemon.memory_bytes()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY.gid)
            os.setuid(NOBODY.uid)
            held = []
            for _ in range(200):
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
                listing = os.scandir(fd)
                next(listing)  # a listing begun and left open, as a slow reader would
                held.append(listing)
            os.write(from_child, b"held")
            os.read(to_child, 1)
            os.write(from_child, str(sum(1 for _ in held[0]) + 1).encode())
            status = 0
        except BaseException:
            traceback.print_exc()  # to pytest's captured output
        finally:
            os._exit(status)
    os.close(from_child)
    os.close(to_child)
    try:
        assert os.read(to_parent, 4) == b"held"
        grown = daemon.memory_bytes() - before
        os.write(from_parent, b"!")
        complete = int(os.read(to_parent, 32) or b"0")
    finally:
        os.close(from_parent)
        os.close(to_parent)
        _pid, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    # A copy of the listing per handle would be 200 x 10,000 entries: about 130 MB.
    assert grown < 16 * MIB, f"200 open listings grew the daemon by {grown / MIB:.0f} MiB"
    assert complete == 10_000, "a listing resumed after its first entry missed entries"


def test_a_listing_follows_the_live_directory(mounts: Mounts) -> None:
    mnt, _daemon = mount(mounts, "size=64M")
    directory = mnt / "changing"
    directory.mkdir()
    steady = {f"steady-{index:04d}" for index in range(3000)}
    doomed = [f"doomed-{index:04d}" for index in range(3000)]
    for name in sorted(steady | set(doomed)):
        os.mknod(directory / name)
    seen: list[str] = []
    removed_ahead: set[str] = set()
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(fd) as listing:
            for count, entry in enumerate(listing):
                seen.append(entry.name)
                if count % 200 == 0 and count < 1400:
                    # Names come and go while the listing goes on, across several getdents.
                    # Those removed lie far beyond what one getdents buffer can have fetched.
                    for name in doomed[count + 1500 : count + 1600]:
                        (directory / name).unlink()
                        removed_ahead.add(name)
                    os.mknod(directory / f"new-{count:05d}")
                    (directory / f"new-{count:05d}").rename(directory / f"renamed-{count:05d}")
    finally:
        os.close(fd)
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    assert steady <= set(seen), "an entry present all along was not listed"
    assert not removed_ahead & set(seen), "entries removed before the listing got there"
    assert set(seen) <= steady | set(doomed) | {n for n in os.listdir(directory)}


# -- symlinks ------------------------------------------------------------------------------


def test_long_symlink_targets_are_charged_to_the_size_cap(mounts: Mounts) -> None:
    mnt, _daemon = mount(mounts, "size=16M")
    target = "t" * 4000

    def make_links() -> tuple[int, str, int]:
        links = mnt / "links"
        links.mkdir()
        count = 0
        while count < 10_000:
            outcome = attempt(lambda n=count: os.symlink(target, links / f"l{n}"))
            if outcome != "ok":
                return count, outcome, used_bytes(mnt)
            count += 1
        return count, "ok", used_bytes(mnt)

    count, outcome, used = run_as(NOBODY, make_links)
    # As on a size=16M tmpfs: a page a long target, ENOSPC once the 4,096 pages are taken.
    assert outcome == "ENOSPC" and 4000 <= count <= 4096, (count, outcome)
    assert used >= count * PAGE, "df does not show the targets"
    assert os.readlink(mnt / "links" / "l0") == target
    for index in range(count):
        (mnt / "links" / f"l{index}").unlink()
    # Given back once the kernel forgets the removed links (at once: nothing holds them).
    wait_for(lambda: used_bytes(mnt) < 16 * PAGE, 10, "the removed symlinks' charges")
    for index in range(5000):
        os.symlink("short", mnt / f"s{index}")  # short targets live in the inode, as on tmpfs
    assert used_bytes(mnt) < 16 * PAGE


def read_link_of(descriptor: int) -> str:
    """The target of the symlink an O_PATH descriptor holds: readlinkat(fd, "")."""
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(4096)
    length = libc.readlinkat(descriptor, b"", buffer, len(buffer))
    if length < 0:
        raise OSError(ctypes.get_errno(), "readlinkat")
    return buffer.raw[:length].decode()


def test_removed_symlinks_held_open_keep_their_charge(mounts: Mounts) -> None:
    """A removed symlink held by an O_PATH descriptor keeps its target, readable through the
    descriptor: charged until the descriptor closes, as on tmpfs, so holding them cannot take
    the daemon's memory past the cap."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 4200:
        pytest.skip("holding the removed links takes 4,200 descriptors")
    mnt, _daemon = mount(mounts, "size=16M")
    target = "t" * 4000

    def hold_removed_links() -> tuple[int, str, int, str]:
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        held = []
        outcome = "ok"
        while len(held) < min(hard - 64, 8000):
            link = mnt / f"l{len(held)}"
            outcome = attempt(lambda link=link: os.symlink(target, link))
            if outcome != "ok":
                break
            held.append(os.open(link, os.O_PATH | os.O_NOFOLLOW))
            link.unlink()
        return len(held), outcome, used_bytes(mnt), read_link_of(held[0])

    count, outcome, used, first = run_as(NOBODY, hold_removed_links)
    assert outcome == "ENOSPC" and 4000 <= count <= 4096, (count, outcome)
    assert used >= count * PAGE, "df does not show the held targets"
    assert first == target
    wait_for(lambda: used_bytes(mnt) < 16 * PAGE, 10, "the charges once the descriptors closed")


# -- volatile ranges -----------------------------------------------------------------------


def test_range_records_are_bounded_per_file_and_per_mount(mounts: Mounts) -> None:
    mnt, _daemon = mount(mounts, "size=64M,max_file_ranges=100,max_ranges=150")

    def exhaust() -> dict[str, object]:
        results: dict[str, object] = {}
        first = os.open(mnt / "first", os.O_RDWR | os.O_CREAT, 0o600)
        second = os.open(mnt / "second", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(first, 1 << 30)
        os.ftruncate(second, 1 << 30)
        for index in range(100):
            fvrange(first, 2 * index * PAGE, PAGE, VRANGE_VOLATILE)
        status = vrange_status(first)
        results["101st"] = attempt(lambda: fvrange(first, 400 * PAGE, PAGE, VRANGE_VOLATILE))
        results["unchanged"] = vrange_status(first) == status
        # Merging two ranges needs no record; a split of one at the bound needs one.
        results["merge"] = attempt(lambda: fvrange(first, 0, 3 * PAGE, VRANGE_VOLATILE))
        fvrange(first, 1000 * PAGE, 8 * PAGE, VRANGE_VOLATILE)
        results["split"] = attempt(lambda: fvrange(first, 1002 * PAGE, PAGE, VRANGE_NONVOLATILE))
        results["trim"] = attempt(lambda: fvrange(first, 1000 * PAGE, PAGE, VRANGE_NONVOLATILE))
        results["after"] = vrange_status(first)
        for index in range(50):
            fvrange(second, 2 * index * PAGE, PAGE, VRANGE_VOLATILE)
        results["mount"] = attempt(lambda: fvrange(second, 200 * PAGE, PAGE, VRANGE_VOLATILE))
        os.close(first)  # the last close gives the file's records back
        results["freed"] = attempt(lambda: fvrange(second, 200 * PAGE, PAGE, VRANGE_VOLATILE))
        os.close(second)
        return results

    results = run_as(NOBODY, exhaust)
    assert results["101st"] == "ENOSPC"
    assert results["unchanged"] is True
    assert results["merge"] == "ok"
    assert results["split"] == "ENOSPC"
    assert results["trim"] == "ok"
    assert results["after"] == ((99 - 1 + 3 + 7) * PAGE, 0)
    assert results["mount"] == "ENOSPC"
    assert results["freed"] == "ok"


def test_pages_purged_from_released_segments_count_as_range_records(mounts: Mounts) -> None:
    mnt, _daemon = mount(mounts, "size=16M,max_ranges=100")

    def churn() -> dict[str, object]:
        holes = os.open(mnt / "holes", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(holes, 1 << 30)
        table = SegmentTable(holes, 64)
        filler = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        cycles, page, outcome = 0, 0, "ok"
        while cycles < 20 and outcome == "ok":
            segments = []
            try:
                for index in range(40):  # one page each, apart: one lost run each
                    segments.append(table.register((page + 2 * index) * PAGE, PAGE))
            except OSError as error:
                outcome = errno.errorcode[error.errno or 0]
            page += 80
            for segment in segments:
                segment.unpin()
            # To the cap, where a write purges every unpinned segment, freeing nothing.
            with contextlib.suppress(OSError):
                while True:
                    os.write(filler, bytes(PAGE))
            for segment in segments:  # their charges make room for the next cycle's
                segment.release()
            cycles += 1
        return {"cycles": cycles, "outcome": outcome, "lost": vrange_status(holes)[1] // PAGE}

    results = run_as(NOBODY, churn)
    # 40 lost runs a cycle: registers are refused once the records reach the bound, so the
    # lost runs stop at the bound plus one cycle's segments.
    assert results == {"cycles": 4, "outcome": "ENOSPC", "lost": 120}


def test_segment_tables_leave_the_daemon_descriptors_of_its_own(mounts: Mounts) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # what the daemon inherits
    try:
        mnt, daemon = mount(mounts, "size=64M")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE) == (hard, hard)
    # Each table holds two descriptors in the daemon; of 300 it keeps 256 for itself.
    resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (300, 300))

    def take_tables() -> dict[str, object]:
        tables = []
        for index in itertools.count():
            fd = os.open(mnt / f"table-{index}", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                tables.append(SegmentTable(fd, 1))
            except OSError as error:
                return {"tables": index, "errno": errno.errorcode[error.errno or 0]}
        raise AssertionError("unreachable")

    assert run_as(NOBODY, take_tables) == {"tables": (300 - 256) // 2, "errno": "ENOSPC"}
    # The daemon had descriptors left to serve, and the tables went with their last close.
    fd = os.open(mnt / "root-table", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with SegmentTable(fd, 1) as table:
            assert table.capacity == 1
    finally:
        os.close(fd)


def test_last_close_of_a_file_with_many_ranges_ends_their_volatility_at_once(
    mounts: Mounts,
) -> None:
    mnt, _daemon = mount(mounts, "size=64M")
    data = os.urandom(64 * PAGE)
    path = mnt / "many"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, data)
    os.ftruncate(fd, 40_000 * PAGE)
    for index in range(20_000):
        fvrange(fd, 2 * index * PAGE, PAGE, VRANGE_VOLATILE)
    assert statistics(mnt)["ranges"] == 20_000
    os.close(fd)
    # The ranges are dropped in the background; none of them may be purged meanwhile.
    assert statistics(mnt)["ranges"] == 0
    assert statistics(mnt)["volatile_bytes"] == 0
    assert purge(mnt) == 0
    with open(path, "rb") as again:
        assert again.read(len(data)) == data


# -- counters ------------------------------------------------------------------------------


def test_counters_saturate_and_purges_still_drop_the_cache(mounts: Mounts) -> None:
    mnt, _daemon = mount(mounts, "size=64M")
    cached = os.urandom(MIB)
    fd = os.open(mnt / "cached", os.O_RDWR | os.O_CREAT, 0o666)
    os.write(fd, cached)
    assert os.pread(fd, MIB, 0) == cached  # now in the kernel's page cache

    def mark_huge_files() -> dict[str, int]:
        for name in ("h1", "h2", "h3"):
            huge = os.open(mnt / name, os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(huge, (1 << 63) - 1)
            fvrange(huge, 0, 0, VRANGE_VOLATILE)  # held open: volatility lasts
        return statistics(mnt)

    # nobody keeps the huge files open while root goes on.
    child = TwoPhaseChild(NOBODY, lambda: mark_huge_files()["volatile_bytes"])
    try:
        assert child.first_result == str((1 << 64) - 1), (
            "VOLFS_IOC_STATS failed or wrapped for every user"
        )
        fvrange(fd, 0, MIB, VRANGE_VOLATILE)
        # A write that needs the size cap to purge.
        filler = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for _ in range(64):
                os.write(filler, bytes(MIB))
        finally:
            os.close(filler)
        assert statistics(mnt)["purges_size"] >= 1
        # The purged range must fail, never read stale bytes from the kernel's cache.
        with pytest.raises(OSError) as caught:
            os.pread(fd, MIB, 0)
        assert caught.value.errno == errno.EIO
        os.unlink(mnt / "filler")
        os.pwrite(fd, cached, 0)
        fvrange(fd, 0, MIB, VRANGE_VOLATILE)
        assert os.pread(fd, MIB, 0) == cached
        assert purge(mnt) == MIB
        with pytest.raises(OSError) as caught:
            os.pread(fd, MIB, 0)
        assert caught.value.errno == errno.EIO
    finally:
        assert child.finish() == 0
        os.close(fd)


# -- purged data across the last close -----------------------------------------------------


def test_data_purged_before_the_last_close_stays_lost_until_reported(mounts: Mounts) -> None:
    mnt, _daemon = mount(mounts, "size=64M")
    path = mnt / "cache.bin"
    data = os.urandom(16 * MIB)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, data)
    fvrange(fd, 0, 16 * MIB, VRANGE_VOLATILE)

    # nobody holds the file open across root's close, then fills the cap and closes.
    held: list[int] = []

    def fill_then_close() -> None:
        filler = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(filler, bytes(MIB))
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
        os.close(filler)
        os.unlink(mnt / "filler")
        os.close(held[0])

    child = TwoPhaseChild(NOBODY, lambda: held.append(os.open(path, os.O_RDONLY)), fill_then_close)
    os.close(fd)  # root expects volatility to be over; nobody still has the file open
    assert child.finish() == 0

    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as caught:
            os.pread(fd, MIB, 0)
        assert caught.value.errno == errno.EIO, "purged data read back as data"
        assert vrange_status(fd) == (0, 16 * MIB)
        # A write repopulates its pages; the rest stays lost until an unmark reports it.
        os.pwrite(fd, data[:PAGE], 0)
        assert os.pread(fd, PAGE, 0) == data[:PAGE]
        assert fvrange(fd, 0, 16 * MIB, VRANGE_NONVOLATILE) == (16 * MIB, True)
        assert os.pread(fd, MIB, MIB) == bytes(MIB)
        assert fvrange(fd, 0, 16 * MIB, VRANGE_NONVOLATILE) == (16 * MIB, False)
    finally:
        os.close(fd)


# -- extended attributes -------------------------------------------------------------------


def test_extended_attributes_are_charged_and_bounded_per_inode(mounts: Mounts) -> None:
    mnt, _daemon = mount(mounts, "size=64M")

    def set_many() -> tuple[int, str, int, int, int]:
        path = mnt / "tagged"
        path.touch()
        before = used_bytes(mnt)
        count = 0
        while count < 100_000:
            outcome = attempt(lambda n=count: os.setxattr(path, f"user.{n:06d}", b""))
            if outcome != "ok":
                break
            count += 1
        charged = used_bytes(mnt) - before
        listed = len(os.listxattr(path))
        path.unlink()
        return count, outcome, charged, listed, before

    count, outcome, charged, listed, before = run_as(NOBODY, set_many)
    # Names of 11 bytes and a NUL: the kernel's 64 KiB listxattr limit holds 5,461 of them.
    assert outcome == "ENOSPC" and count == 65536 // 12, (count, outcome)
    assert listed == count, "attributes were set that listxattr cannot return"
    assert charged >= count * 128, f"{count} attributes charged only {charged} bytes"
    # Once the kernel forgets the removed file, a moment after the unlink.
    wait_for(lambda: used_bytes(mnt) <= before, 10, "a removed file's attributes' charge")


def test_what_a_released_inode_gains_is_given_back(mounts: Mounts) -> None:
    mnt, _daemon = mount(mounts, "size=64M")
    free = used_bytes(mnt)
    # Attributes set through a removed directory that is still held open.
    fd = os.open(mnt, os.O_RDONLY)
    os.mkdir(mnt / "gone")
    held = os.open(mnt / "gone", os.O_RDONLY)
    os.rmdir(mnt / "gone")
    for index in range(100):
        os.setxattr(f"/proc/self/fd/{held}", f"user.a{index}", b"v" * 65536)
    os.close(held)
    # An unlinked file reopened through /proc/self/fd and written.
    os.close(os.open(mnt / "file", os.O_CREAT | os.O_RDWR, 0o600))
    path_only = os.open(mnt / "file", os.O_PATH)
    os.unlink(mnt / "file")
    writer = os.open(f"/proc/self/fd/{path_only}", os.O_RDWR)
    os.write(writer, bytes(16 * MIB))
    os.close(writer)
    os.close(path_only)
    os.close(fd)

    def given_back() -> bool:
        # The kernel forgets the inodes (and volfs frees what they held) once it drops them.
        with open("/proc/sys/vm/drop_caches", "w") as drop:
            drop.write("2")
        return used_bytes(mnt) <= free

    wait_for(given_back, 10, "the released inodes' charges to come back")
