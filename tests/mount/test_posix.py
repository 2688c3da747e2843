"""The POSIX namespace through the kernel: files, directories, links, rename, attributes."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import time
from pathlib import Path

import pytest

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(old: Path, new: Path, flags: int) -> None:
    """rename(2) with flags, which the os module does not offer."""
    result = _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old))


def raises_errno(code: int) -> pytest.RaisesContext[OSError]:
    return pytest.raises(OSError, match=rf"\[Errno {code}\]")


def all_memory_freed(mnt: Path, timeout: float = 10.0) -> bool:
    """Whether ``df`` shows every page free, waiting a little: the memory of a file without
    names goes when the kernel forgets the inode, which it tells the daemon a moment after
    the last close (it may queue a FORGET behind other requests)."""
    deadline = time.monotonic() + timeout
    while True:
        statvfs = os.statvfs(mnt)
        if statvfs.f_blocks == statvfs.f_bfree:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def test_write_read_and_overwrite(mnt: Path) -> None:
    path = mnt / "file"
    path.write_bytes(b"hello world")
    assert path.read_bytes() == b"hello world"
    with open(path, "r+b") as file:
        file.seek(6)
        file.write(b"volfs")
    assert path.read_bytes() == b"hello volfs"
    with open(path, "ab") as file:
        file.write(b"!")
    assert path.read_bytes() == b"hello volfs!"
    assert path.stat().st_size == 12


def test_large_file_round_trip_with_unaligned_pieces(mnt: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 123)
    path = mnt / "big"
    with open(path, "wb") as file:
        for start in range(0, len(data), 70001):
            file.write(data[start : start + 70001])
    assert path.read_bytes() == data
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 5000, 1_000_003) == data[1_000_003:1_005_003]
        assert os.pread(fd, 100, len(data) - 10) == data[-10:]
        assert os.pread(fd, 100, len(data) + 10) == b""
    finally:
        os.close(fd)


def test_sparse_growth_and_truncate(mnt: Path) -> None:
    path = mnt / "sparse"
    with open(path, "wb") as file:
        file.seek(10 * 1024 * 1024)
        file.write(b"end")
    info = path.stat()
    assert info.st_size == 10 * 1024 * 1024 + 3
    assert info.st_blocks == 8  # one page held, the rest is a hole
    data = path.read_bytes()
    assert data[:-3] == bytes(10 * 1024 * 1024) and data[-3:] == b"end"

    path.write_bytes(b"x" * 10000)
    os.truncate(path, 5000)
    assert path.read_bytes() == b"x" * 5000
    os.truncate(path, 9000)
    assert path.read_bytes() == b"x" * 5000 + bytes(4000)
    os.truncate(path, 0)
    assert path.read_bytes() == b"" and path.stat().st_blocks == 0


def test_open_with_o_trunc_empties_the_file(mnt: Path) -> None:
    path = mnt / "t"
    path.write_bytes(b"old contents")
    before = path.stat().st_mtime_ns
    time.sleep(0.01)
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert path.read_bytes() == b""
    assert path.stat().st_mtime_ns > before


def test_directories_listing_and_link_counts(mnt: Path) -> None:
    (mnt / "d").mkdir()
    (mnt / "d" / "sub1").mkdir()
    (mnt / "d" / "sub2").mkdir()
    (mnt / "d" / "f").write_bytes(b"")
    assert (mnt / "d").stat().st_nlink == 4
    assert sorted(os.listdir(mnt / "d")) == ["f", "sub1", "sub2"]
    names = {entry.name: entry.inode() for entry in os.scandir(mnt / "d")}
    assert names["f"] == (mnt / "d" / "f").stat().st_ino
    assert (mnt / "d" / "sub1" / "..").stat().st_ino == (mnt / "d").stat().st_ino
    assert (mnt / "d" / ".").stat().st_ino == (mnt / "d").stat().st_ino
    with raises_errno(errno.ENOTEMPTY):
        (mnt / "d").rmdir()
    with raises_errno(errno.EEXIST):
        (mnt / "d" / "sub1").mkdir()
    with raises_errno(errno.ENOTDIR):
        (mnt / "d" / "f" / "x").mkdir()
    (mnt / "d" / "sub1").rmdir()
    assert (mnt / "d").stat().st_nlink == 3
    with raises_errno(errno.ENOENT):
        (mnt / "d" / "sub1").stat()


def test_listing_a_large_directory_while_it_changes(mnt: Path) -> None:
    directory = mnt / "many"
    directory.mkdir()
    for index in range(2000):
        (directory / f"file-{index:05d}").write_bytes(b"")
    seen = []
    with os.scandir(directory) as entries:
        for count, entry in enumerate(entries):
            seen.append(entry.name)
            if count == 10:
                (directory / "file-01999").unlink()
                (directory / "added").write_bytes(b"")
    assert len(seen) == len(set(seen)), "an entry was returned twice"
    expected = {f"file-{index:05d}" for index in range(1999)}
    assert expected <= set(seen)


def test_symlinks(mnt: Path) -> None:
    (mnt / "target").write_bytes(b"data")
    os.symlink("target", mnt / "link")
    assert os.readlink(mnt / "link") == "target"
    assert (mnt / "link").read_bytes() == b"data"
    assert stat.S_ISLNK((mnt / "link").lstat().st_mode)
    assert (mnt / "link").lstat().st_size == len("target")
    os.symlink("/nowhere/at/all", mnt / "dangling")
    with raises_errno(errno.ENOENT):
        (mnt / "dangling").read_bytes()


def test_hard_links_share_data_and_count(mnt: Path) -> None:
    (mnt / "a").write_bytes(b"one")
    os.link(mnt / "a", mnt / "b")
    assert (mnt / "a").stat().st_nlink == 2
    assert (mnt / "a").stat().st_ino == (mnt / "b").stat().st_ino
    (mnt / "b").write_bytes(b"two")
    assert (mnt / "a").read_bytes() == b"two"
    (mnt / "a").unlink()
    assert (mnt / "b").stat().st_nlink == 1
    assert (mnt / "b").read_bytes() == b"two"
    (mnt / "d").mkdir()
    with raises_errno(errno.EPERM):
        os.link(mnt / "d", mnt / "d2")


def test_unlinked_open_file_lives_until_last_close(mnt: Path) -> None:
    path = mnt / "gone"
    data = os.urandom(300_000)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        path.unlink()
        assert not path.exists()
        assert os.pread(fd, len(data), 0) == data
        os.pwrite(fd, b"more", len(data))
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 4, len(data)) == b"more"
    finally:
        os.close(fd)
    assert all_memory_freed(mnt), "the unlinked file's pages were not freed"


def test_a_file_reached_before_its_last_name_went_still_opens_whole(mnt: Path) -> None:
    """As on tmpfs: what a path walk found (here an O_PATH descriptor) opens with its data
    after an unlink or a rename over it, and its memory goes once nothing refers to it."""
    for replace in (Path.unlink, (mnt / "newer").replace):
        path = mnt / "victim"
        data = os.urandom(40_000)
        path.write_bytes(data)
        (mnt / "newer").write_bytes(b"newer")
        found = os.open(path, os.O_PATH)
        try:
            replace(path)
            fd = os.open(f"/proc/self/fd/{found}", os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # from the daemon
                assert os.fstat(fd).st_size == len(data)
                assert os.pread(fd, len(data) + 1, 0) == data
            finally:
                os.close(fd)
        finally:
            os.close(found)
        (mnt / "newer").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    assert all_memory_freed(mnt), "the files' pages were not freed"


def test_rename_replaces_moves_and_keeps_inode(mnt: Path) -> None:
    (mnt / "a").write_bytes(b"A")
    (mnt / "b").write_bytes(b"B")
    ino = (mnt / "a").stat().st_ino
    os.rename(mnt / "a", mnt / "b")
    assert not (mnt / "a").exists()
    assert (mnt / "b").read_bytes() == b"A"
    assert (mnt / "b").stat().st_ino == ino

    (mnt / "d1").mkdir()
    (mnt / "d2").mkdir()
    (mnt / "d1" / "sub").mkdir()
    os.rename(mnt / "d1" / "sub", mnt / "d2" / "sub")
    assert (mnt / "d1").stat().st_nlink == 2
    assert (mnt / "d2").stat().st_nlink == 3
    assert (mnt / "d2" / "sub" / "..").stat().st_ino == (mnt / "d2").stat().st_ino

    (mnt / "d2" / "sub" / "x").write_bytes(b"")
    with raises_errno(errno.ENOTEMPTY):
        os.rename(mnt / "d1", mnt / "d2" / "sub")
    with raises_errno(errno.EINVAL):
        os.rename(mnt / "d2", mnt / "d2" / "sub" / "inside")
    with raises_errno(errno.EISDIR):
        os.rename(mnt / "b", mnt / "d1")
    with raises_errno(errno.ENOTDIR):
        os.rename(mnt / "d1", mnt / "b")
    os.rename(mnt / "d1", mnt / "d3")
    assert sorted(os.listdir(mnt)) == ["b", "d2", "d3"]


def test_rename_noreplace_and_exchange(mnt: Path) -> None:
    (mnt / "a").write_bytes(b"A")
    (mnt / "b").write_bytes(b"B")
    with raises_errno(errno.EEXIST):
        renameat2(mnt / "a", mnt / "b", RENAME_NOREPLACE)
    assert (mnt / "a").read_bytes() == b"A" and (mnt / "b").read_bytes() == b"B"
    renameat2(mnt / "a", mnt / "c", RENAME_NOREPLACE)
    assert (mnt / "c").read_bytes() == b"A"

    (mnt / "dir").mkdir()
    (mnt / "dir" / "inner").write_bytes(b"I")
    renameat2(mnt / "c", mnt / "dir", RENAME_EXCHANGE)
    assert (mnt / "dir").read_bytes() == b"A"
    assert (mnt / "c" / "inner").read_bytes() == b"I"
    with raises_errno(errno.ENOENT):
        renameat2(mnt / "b", mnt / "missing", RENAME_EXCHANGE)


def test_chmod_chown_utimens_and_ctime(mnt: Path) -> None:
    path = mnt / "f"
    path.write_bytes(b"x")
    ctime = path.stat().st_ctime_ns
    time.sleep(0.01)
    os.chmod(path, 0o640)
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o640 and stat.S_ISREG(info.st_mode)
    assert info.st_ctime_ns > ctime
    os.chown(path, 1234, 5678)
    info = path.stat()
    assert (info.st_uid, info.st_gid) == (1234, 5678)
    os.utime(path, ns=(1_000_000_123, 2_000_000_456))
    info = path.stat()
    assert (info.st_atime_ns, info.st_mtime_ns) == (1_000_000_123, 2_000_000_456)


def test_write_updates_mtime_and_directory_changes_update_parent(mnt: Path) -> None:
    path = mnt / "f"
    path.write_bytes(b"x")
    os.utime(path, ns=(1, 1))
    with open(path, "ab") as file:
        file.write(b"y")
    assert path.stat().st_mtime_ns > 10**18
    os.utime(mnt, ns=(1, 1))
    (mnt / "new").write_bytes(b"")
    assert mnt.stat().st_mtime_ns > 10**18
    os.utime(mnt, ns=(1, 1))
    (mnt / "new").unlink()
    assert mnt.stat().st_mtime_ns > 10**18


def test_extended_attributes(mnt: Path) -> None:
    path = mnt / "f"
    path.write_bytes(b"")
    os.setxattr(path, "user.colour", b"blue")
    assert os.getxattr(path, "user.colour") == b"blue"
    assert os.listxattr(path) == ["user.colour"]
    with raises_errno(errno.EEXIST):
        os.setxattr(path, "user.colour", b"red", os.XATTR_CREATE)
    with raises_errno(errno.ENODATA):
        os.setxattr(path, "user.size", b"big", os.XATTR_REPLACE)
    os.setxattr(path, "user.big", b"v" * 65536)
    assert os.getxattr(path, "user.big") == b"v" * 65536
    os.removexattr(path, "user.colour")
    with raises_errno(errno.ENODATA):
        os.getxattr(path, "user.colour")
    assert os.listxattr(path) == ["user.big"]


def test_names_of_255_bytes_work_and_256_fail(mnt: Path) -> None:
    (mnt / ("n" * 255)).write_bytes(b"ok")
    assert (mnt / ("n" * 255)).read_bytes() == b"ok"
    with raises_errno(errno.ENAMETOOLONG):
        (mnt / ("n" * 256)).write_bytes(b"")


def test_inode_numbers_are_stable(mnt: Path) -> None:
    (mnt / "f").write_bytes(b"")
    ino = (mnt / "f").stat().st_ino
    os.rename(mnt / "f", mnt / "g")
    (mnt / "other").write_bytes(b"")
    assert (mnt / "g").stat().st_ino == ino
    assert (mnt / "other").stat().st_ino != ino


def test_special_files(mnt: Path) -> None:
    os.mkfifo(mnt / "fifo")
    assert stat.S_ISFIFO((mnt / "fifo").stat().st_mode)
    os.mknod(mnt / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    info = (mnt / "null").stat()
    assert stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(1, 3)


def test_statfs_reports_cap_and_use(mnt: Path) -> None:
    before = os.statvfs(mnt)
    assert before.f_bsize == 4096
    assert before.f_blocks * before.f_frsize == 256 * 1024 * 1024
    (mnt / "f").write_bytes(b"x" * (1024 * 1024))
    after = os.statvfs(mnt)
    assert before.f_bfree - after.f_bfree == 256
    assert before.f_ffree - after.f_ffree == 1
