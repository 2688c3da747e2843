"""The namespace's frequent requests, answered at once: the bridge hands LOOKUP, GETATTR,
CREATE, OPEN, RELEASE, UNLINK and the FORGETs to Python undecoded, and sends the bytes it
returns (volfs/daemon/wire.py), without pyfuse3.

Each test checks what a program sees, and the count of requests answered that way the daemon
logs at unmount shows the path was really taken.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Mount
from tests.mount.test_request_threads import counters
from volfs.client import VRANGE_VOLATILE, fvrange, vrange_status

PAGE = 4096

_libc = ctypes.CDLL(None, use_errno=True)
#: statx(2): ask the filesystem, whatever the kernel has cached.
AT_STATX_FORCE_SYNC = 0x2000
STATX_BASIC_STATS = 0x7FF
#: struct statx up to stx_mtime: mask, blksize, attributes, nlink, uid, gid, mode, padding,
#: ino, size, blocks, attributes_mask, then atime, btime, ctime, mtime (sec, nsec, padding).
_STATX = struct.Struct("<IIQIIIHHQQQQ" + "qIi" * 4)


def answered_at_once(mount: Mount) -> int:
    """Unmount, and return the requests the daemon answered at once."""
    return counters(mount)[2]


def attributes(path: Path, *, from_the_daemon: bool) -> tuple[int, ...]:
    """What stat(2) shows of ``path``: the kernel's cached attributes, or the daemon's now."""
    buffer = ctypes.create_string_buffer(256)
    flags = AT_STATX_FORCE_SYNC if from_the_daemon else 0
    if _libc.statx(-100, os.fsencode(path), flags, STATX_BASIC_STATS, buffer) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), str(path))
    fields = _STATX.unpack_from(buffer)
    nlink, uid, gid, mode, ino, size, blocks = fields[3:7] + fields[8:11]
    atime, mtime, ctime = fields[12:14], fields[24:26], fields[18:20]
    return (nlink, uid, gid, mode, ino, size, blocks, *atime, *mtime, *ctime)


def drop_dentries() -> None:
    """Make the kernel forget the names and inodes nobody uses: the next stat looks up."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as drop:
        drop.write("2")


@pytest.mark.skipif(os.geteuid() != 0, reason="drops the kernel's dentries: root only")
def test_names_and_attributes_answered_at_once_are_those_a_program_expects(
    mount_volfs: Callable[..., Mount],
) -> None:
    mount = mount_volfs("size=64M,log_level=debug")
    root = mount.path
    files = 200
    umask = os.umask(0o027)
    try:
        for index in range(files):
            path = root / f"f{index}"
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            made = os.stat(path)
            assert (stat.S_IFMT(made.st_mode), stat.S_IMODE(made.st_mode)) == (stat.S_IFREG, 0o640)
            assert (made.st_nlink, made.st_size, made.st_blocks, made.st_uid) == (1, 0, 0, 0)
            os.unlink(path)
            with pytest.raises(FileNotFoundError):
                os.stat(path)
    finally:
        os.umask(umask)
    assert os.listdir(root) == []

    # Attributes the kernel cached from other replies (a write in C, SETATTR through
    # pyfuse3) are those GETATTR and LOOKUP answer at once: times before 1970 too.
    path = root / "data"
    path.write_bytes(b"d" * (PAGE + 5))
    os.utime(path, ns=(-1_500_000_000_123, 1_700_000_000_999_999_999))
    os.chmod(path, 0o4751)
    cached = attributes(path, from_the_daemon=False)
    assert attributes(path, from_the_daemon=True) == cached
    drop_dentries()
    assert attributes(path, from_the_daemon=False) == cached
    assert cached[5:7] == (PAGE + 5, 16)

    assert answered_at_once(mount) >= 4 * files  # LOOKUP, CREATE, RELEASE and UNLINK


@pytest.mark.skipif(os.geteuid() != 0, reason="opens as another user: root only")
def test_opens_and_releases_answered_at_once_keep_every_rule(
    mount_volfs: Callable[..., Mount],
) -> None:
    mount = mount_volfs("size=64M,log_level=debug,allow_other")
    root = mount.path
    path = root / "data"
    path.write_bytes(b"d" * (PAGE + 5))
    os.utime(path, ns=(0, 1_700_000_000_999_999_999))

    # An open that truncates a non-empty file goes through pyfuse3; it still truncates.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        assert os.fstat(fd).st_mtime_ns > 1_700_000_000_999_999_999
    finally:
        os.close(fd)

    # An O_TRUNC open by a user without CAP_FSETID removes setuid, even of an empty file.
    os.chmod(path, 0o4777)
    os.chmod(root, 0o777)
    os.utime(path, ns=(0, 0))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            inside = os.open(root, os.O_PATH)  # the test's directories are root's alone
            os.setuid(65534)
            os.close(os.open(path.name, os.O_WRONLY | os.O_TRUNC, dir_fd=inside))
            status = 0
        finally:
            os._exit(status)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    truncated = os.stat(path)
    assert stat.S_IMODE(truncated.st_mode) == 0o777
    assert truncated.st_mtime_ns > 0, "an O_TRUNC open sets mtime, as on tmpfs"

    # The last RELEASE ends the file's volatility, the one before does not.
    path.write_bytes(bytes(8 * PAGE))
    first, second = os.open(path, os.O_RDWR), os.open(path, os.O_RDONLY)
    fvrange(first, 0, 8 * PAGE, VRANGE_VOLATILE)
    os.close(first)
    assert vrange_status(second) == (8 * PAGE, 0)
    os.close(second)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert vrange_status(fd) == (0, 0)
    finally:
        os.close(fd)

    assert answered_at_once(mount) >= 4  # the OPENs and RELEASEs that did not truncate


def _replace_current(directory: str, worker: int, rounds: int) -> None:
    """Write a file of one's own, rename it over "current", read whatever "current" is."""
    own = os.path.join(directory, f"new-{worker}")
    current = os.path.join(directory, "current")
    for round_ in range(rounds):
        payload = f"{worker}:{round_}:".encode() * 200
        fd = os.open(own, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
        os.rename(own, current)
        try:
            seen = Path(current).read_bytes()
        except FileNotFoundError:
            continue
        # Whole, and from one writer's one round: never a mix or a stranger's bytes.
        word = seen.split(b":", 2)
        assert len(word) == 3 and seen == (word[0] + b":" + word[1] + b":") * 200, (
            len(seen),
            seen[:40],
        )
        if round_ % 7 == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(current)


def test_processes_racing_over_names_see_whole_files(mount_volfs: Callable[..., Mount]) -> None:
    mount = mount_volfs("size=64M,log_level=debug")
    workers = [
        multiprocessing.get_context("fork").Process(
            target=_replace_current, args=(str(mount.path), worker, 150)
        )
        for worker in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0] * 4
    assert set(os.listdir(mount.path)) <= {"current"}
    assert answered_at_once(mount) >= 4 * 150 * 2  # CREATE and RELEASE at least
