"""The daemon's life: options, the size cap, background mode, signals, mount(8)."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import volfs
from tests.conftest import MOUNT_TIMEOUT, Mount, force_unmount, is_mounted, wait_for
from volfs import client
from volfs.abi import PAGE_SIZE, VRANGE_NONVOLATILE, VRANGE_VOLATILE
from volfs.daemon import options
from volfs.daemon.options import OptionError, parse_mount_options, parse_size

MiB = 1024 * 1024


def run_volfs(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "volfs", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("size=lots", "size=lots"),
        ("size=10x", "size=10x"),
        ("size=100T", "larger than volfs supports"),
        ("nr_inodes=-1", "nr_inodes=-1"),
        ("mode=999", "mode=999"),
        ("uid=root", "uid=root"),
        ("colour=blue", "unknown mount option 'colour=blue'"),
        ("allow_other=yes", "unknown mount option"),
    ],
)
def test_bad_options_fail_with_one_line_and_mount_nothing(
    tmp_path: Path, options: str, message: str
) -> None:
    result = run_volfs("-f", "-o", options, str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("volfs: ") and message in lines[0], lines
    assert not is_mounted(tmp_path)


def test_missing_mountpoint_is_named(tmp_path: Path) -> None:
    result = run_volfs("-f", str(tmp_path / "absent"))
    assert result.returncode == 1
    assert (
        result.stderr.strip() == f"volfs: mountpoint {tmp_path / 'absent'}: "
        "No such file or directory"
    )


def test_option_parsing_units() -> None:
    memory = 8 << 30
    assert parse_size("64M", memory=memory) == 64 * MiB
    assert parse_size("1g", memory=memory) == 1 << 30
    assert parse_size("25%", memory=memory) == 2 << 30
    assert parse_size("1000", memory=memory) == 4096  # rounded up to a page
    options = parse_mount_options(
        ["size=1k,nr_inodes=2k", "mode=0700,uid=5,gid=6,allow_other"], source="cache", memory=memory
    )
    assert (options.size, options.nr_inodes, options.mode, options.uid, options.gid) == (
        4096,
        2048,
        0o700,
        5,
        6,
    )
    assert {"allow_other", "fsname=cache", "subtype=volfs"} <= options.fuse_options
    default = parse_mount_options([], memory=memory)
    assert default.size == memory // 2 and default.mode == 0o1777
    with pytest.raises(OptionError):
        parse_mount_options(["size="], memory=memory)


def test_size_cap_gives_enospc_and_keeps_earlier_data(mount_volfs: Callable[..., Mount]) -> None:
    mnt = mount_volfs("size=8M").path
    first = os.urandom(6 * MiB)
    (mnt / "first").write_bytes(first)
    fd = os.open(mnt / "second", os.O_WRONLY | os.O_CREAT)
    try:
        assert os.write(fd, b"a" * MiB) == MiB
        # As on tmpfs, a write that only partly fits is short; the next one fails.
        assert os.write(fd, b"b" * (2 * MiB)) == MiB
        with pytest.raises(OSError) as caught:
            os.write(fd, b"c")
        assert caught.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert (mnt / "first").read_bytes() == first
    assert (mnt / "second").read_bytes() == b"a" * MiB + b"b" * MiB
    usage = shutil.disk_usage(mnt)
    assert usage.total == 8 * MiB and usage.used == 8 * MiB
    (mnt / "first").unlink()
    (mnt / "third").write_bytes(b"c" * (5 * MiB))
    assert (mnt / "third").read_bytes() == b"c" * (5 * MiB)


def test_df_shows_cap_and_use(mount_volfs: Callable[..., Mount]) -> None:
    mnt = mount_volfs("size=64M").path
    (mnt / "f").write_bytes(b"x" * (3 * MiB))
    output = subprocess.run(
        ["df", "-B1", "--output=size,used", str(mnt)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert output[-2:] == [str(64 * MiB), str(3 * MiB)]


def test_nr_inodes_limits_files(mount_volfs: Callable[..., Mount]) -> None:
    mnt = mount_volfs("nr_inodes=5").path  # the root is one of them
    for index in range(4):
        (mnt / str(index)).write_bytes(b"")
    with pytest.raises(OSError) as caught:
        (mnt / "one-too-many").write_bytes(b"")
    assert caught.value.errno == errno.ENOSPC
    (mnt / "0").unlink()
    (mnt / "again").mkdir()


def test_root_mode_uid_gid(mount_volfs: Callable[..., Mount]) -> None:
    info = mount_volfs("mode=0750,uid=1234,gid=4321").path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o750
    assert (info.st_uid, info.st_gid) == (1234, 4321)
    default = mount_volfs("size=1M", name="other").path.stat()
    assert stat.S_IMODE(default.st_mode) == 0o1777


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_unmount_cleanly(mount_volfs: Callable[..., Mount], signum: int) -> None:
    mount = mount_volfs()
    (mount.path / "f").write_bytes(b"x")
    mount.process.send_signal(signum)
    assert mount.process.wait(timeout=MOUNT_TIMEOUT) == 0
    assert not is_mounted(mount.path)


@pytest.mark.parametrize("pause", [0.0, 0.002, 0.01, 0.02])
def test_a_second_stop_signal_while_unmounting_is_harmless(
    mount_volfs: Callable[..., Mount], pause: float
) -> None:
    """An impatient admin (or systemd and a shell at once) sends SIGTERM twice: the second
    one must not kill the daemon half way through its unmount and leave a dead mount."""
    mount = mount_volfs("size=16M")
    for index in range(200):
        (mount.path / f"f{index}").write_bytes(b"x")
    mount.process.send_signal(signal.SIGTERM)
    time.sleep(pause)  # the second signal lands somewhere in the teardown
    with contextlib.suppress(ProcessLookupError):
        mount.process.send_signal(signal.SIGTERM)
    assert mount.process.wait(timeout=MOUNT_TIMEOUT) == 0
    assert not is_mounted(mount.path)


def _abort_fuse_connection(path: Path) -> None:
    """Abort the FUSE connection of the mount at ``path`` (through fusectl), so that a daemon
    stuck in the kernel can go."""
    connections = Path("/sys/fs/fuse/connections")
    if not any(connections.iterdir()):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(connections)], check=False)
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields[4] == os.path.realpath(path):
                minor = fields[2].split(":")[1]
                (connections / minor / "abort").write_text("1")


def test_sigterm_during_a_purge_of_dirty_mmap_pages_unmounts(
    mount_volfs: Callable[..., Mount],
) -> None:
    """A purge drops its pages from the kernel's cache, which first writes dirty mmap pages
    back through the daemon: a SIGTERM meanwhile must let that finish, not stop serving under
    it (the drop would wait for ever, and the daemon could not even be killed)."""
    mount = mount_volfs("size=512M")
    size = 128 << 20
    fd = os.open(mount.path / "dirty", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as pages:
            for offset in range(0, size, PAGE_SIZE):
                pages[offset] = 1
            client.fvrange(fd, 0, size, VRANGE_VOLATILE)

            def purge() -> None:
                # The unmount may end the ioctl (ENOTCONN): what counts here is the daemon.
                with contextlib.suppress(OSError):
                    client.purge(fd)

            purging = threading.Thread(target=purge, daemon=True)
            purging.start()
            mount.process.send_signal(signal.SIGTERM)
            try:
                status = mount.process.wait(timeout=MOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                _abort_fuse_connection(mount.path)
                pytest.fail("the daemon hung in its teardown")
            finally:
                purging.join(timeout=MOUNT_TIMEOUT)
            assert status == 0
    finally:
        # Closed all the same; the flush of a file whose mount is gone reports ENOTCONN.
        with contextlib.suppress(OSError):
            os.close(fd)
    assert not is_mounted(mount.path)


def test_background_mode_returns_once_mounted(tmp_path: Path) -> None:
    mnt = tmp_path / "bg"
    mnt.mkdir()
    result = run_volfs("-o", "size=16M", str(mnt))
    try:
        assert result.returncode == 0, result.stderr
        assert is_mounted(mnt)  # no polling: the command returned only once it was ready
        (mnt / "f").write_bytes(b"served in the background")
        assert (mnt / "f").read_bytes() == b"served in the background"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    wait_for(lambda: not is_mounted(mnt), MOUNT_TIMEOUT, "unmount")


def test_background_mode_reports_mount_failure(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"")
    result = run_volfs(str(target))
    assert result.returncode == 1
    assert "not a directory" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) needs root")
def test_mount_t_fuse_volfs(tmp_path: Path) -> None:
    """mount(8) -> mount.fuse3 -> `volfs SOURCE MOUNTPOINT -o ...` found on PATH."""
    mnt = tmp_path / "m"
    mnt.mkdir()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(
        ["mount", "-t", "fuse.volfs", "cache", str(mnt), "-o", "size=32M,nr_inodes=100"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    try:
        assert result.returncode == 0, result.stderr
        assert is_mounted(mnt)
        with open("/proc/self/mounts") as mounts:
            line = next(line for line in mounts if f" {mnt} " in line)
        assert line.startswith("cache ")
        assert shutil.disk_usage(mnt).total == 32 * MiB
        (mnt / "f").write_bytes(b"via mount(8)")
        assert (mnt / "f").read_bytes() == b"via mount(8)"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        if is_mounted(mnt):
            force_unmount(mnt)
    assert not is_mounted(mnt)


def test_a_dead_mount_is_detached_and_mounted_again(mount_volfs: Callable[..., Mount]) -> None:
    mount = mount_volfs("size=16M")
    mount.process.kill()
    mount.process.wait()
    with pytest.raises(OSError) as caught:
        os.listdir(mount.path)
    assert caught.value.errno == errno.ENOTCONN  # callers fail fast, they do not hang
    result = run_volfs("-o", "size=16M", str(mount.path))
    try:
        assert result.returncode == 0, result.stderr
        assert "detaching the dead mount" in result.stderr
        (mount.path / "f").write_bytes(b"mounted again")
        assert (mount.path / "f").read_bytes() == b"mounted again"
    finally:
        subprocess.run(["fusermount3", "-u", str(mount.path)], check=False)
    wait_for(lambda: not is_mounted(mount.path), MOUNT_TIMEOUT, "unmount")


def test_sigterm_during_heavy_io_unmounts_cleanly(mount_volfs: Callable[..., Mount]) -> None:
    mount = mount_volfs("size=512M")
    writer = subprocess.Popen(
        ["dd", "if=/dev/zero", f"of={mount.path / 'big'}", "bs=1M", "count=400"],
        stderr=subprocess.DEVNULL,
    )
    wait_for((mount.path / "big").exists, 10, "the writer to start")
    mount.process.send_signal(signal.SIGTERM)
    assert mount.process.wait(timeout=MOUNT_TIMEOUT) == 0
    assert writer.wait(timeout=MOUNT_TIMEOUT) is not None  # the writer is not left stuck
    assert not is_mounted(mount.path)


def virtual_memory_size(pid: int) -> int:
    """The bytes of address space process ``pid`` has mapped (VmSize)."""
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


def test_out_of_memory_fails_one_request_and_the_daemon_serves_on(
    mount_volfs: Callable[..., Mount],
) -> None:
    mount = mount_volfs("size=256M")
    kept = os.urandom(MiB)
    (mount.path / "small").write_bytes(b"before")
    # In small writes: the daemon's allocator keeps no 1 MiB block free for later.
    with open(mount.path / "kept", "wb") as kept_file:
        for start in range(0, MiB, 64 * 1024):
            kept_file.write(kept[start : start + 64 * 1024])
    with open(mount.path / "cache", "wb") as cache_file:
        for _ in range(64):
            cache_file.write(os.urandom(64 * 1024))
    cache = os.open(mount.path / "cache", os.O_RDWR)
    try:
        # No address space beyond what the daemon has mapped now: a request whose data needs
        # a fresh mapping (a 1 MiB write's buffer) cannot be allocated.
        pid = mount.process.pid
        limit = virtual_memory_size(pid)
        resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))
        outcomes: list[int | str] = []
        for attempt in range(20):
            descriptor = os.open(mount.path / f"big{attempt}", os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                outcomes.append(os.write(descriptor, os.urandom(MiB)))
            except OSError as error:
                outcomes.append(errno.errorcode[error.errno])
            finally:
                os.close(descriptor)
        assert "ENOMEM" in outcomes, outcomes
        assert all(outcome == "ENOMEM" or isinstance(outcome, int) for outcome in outcomes)
        # The daemon still serves, and nothing stored before is lost.
        assert (mount.path / "kept").read_bytes() == kept
        assert (mount.path / "small").read_bytes() == b"before"
        assert "kept" in os.listdir(mount.path)
        with open(mount.path / "small", "r+b") as small:
            small.write(b"after!")
        assert (mount.path / "small").read_bytes() == b"after!"
        # Giving memory back works when it is short: marking, purging (whose pages leave the
        # kernel's cache and the daemon from threads started at mount), unmarking.
        assert client.fvrange(cache, 0, 0, VRANGE_VOLATILE) == (4 * MiB, False)
        assert client.purge(mount.path) == 4 * MiB
        assert client.fvrange(cache, 0, 0, VRANGE_NONVOLATILE) == (4 * MiB, True)
        assert os.pread(cache, 4096, 0) == bytes(4096)
    finally:
        os.close(cache)
    assert mount.process.poll() is None
    assert "write_buf request failed before its handler ran: out of memory" in mount.log()


def test_help_lists_every_mount_option_and_version_prints_the_version() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "volfs", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name, option in options._VALUE_OPTIONS.items():
        if option.owner != "ignored":
            assert f"  {name}=" in shown, name
    for flag in options.FUSE_FLAG_OPTIONS - {"default_permissions"}:
        assert flag in shown, flag
    assert "%%" not in shown and "N%" in shown
    assert "[-f] [-d]" in shown
    version = subprocess.run(
        [sys.executable, "-m", "volfs", "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout == f"volfs {volfs.__version__}\n"


def test_d_serves_in_the_foreground_with_libfuses_trace_and_debug_log(tmp_path: Path) -> None:
    mountpoint = tmp_path / "m"
    mountpoint.mkdir()
    log = tmp_path / "log"
    with open(log, "wb") as output:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "volfs", "-d", "-o", "size=16M", str(mountpoint)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: is_mounted(mountpoint), MOUNT_TIMEOUT, "the mount")
        (mountpoint / "f").write_bytes(b"traced")
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        force_unmount(mountpoint)
    text = log.read_text()
    assert "opcode: CREATE" in text  # libfuse's trace of each request
    assert "DEBUG:" in text
