"""Where a volfs daemon's log goes, and ``log_level=``.

A daemon in the background has no terminal. Without a journal or syslog (this machine has
neither unless a test gives it one) its log goes to ``/run/volfs/MOUNT.log`` for root.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import force_unmount, is_mounted, wait_for
from volfs.client import VRANGE_VOLATILE, fvrange, purge
from volfs.daemon.logs import (
    JOURNAL_SOCKET,
    SYSLOG_SOCKET,
    JournalHandler,
    escaped_mountpoint,
    log_file_paths,
)

pytestmark = pytest.mark.skipif(
    os.path.exists(JOURNAL_SOCKET) or os.path.exists(SYSLOG_SOCKET),
    reason="a journal or syslog takes the log here",
)


@pytest.fixture
def background_mountpoint(tmp_path: Path) -> Iterator[Path]:
    """A mountpoint for a daemon started without -f; unmounted and its log removed after."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    yield mountpoint
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
        wait_for(lambda: not is_mounted(mountpoint), 10, "the unmount")
    force_unmount(mountpoint)
    [path] = log_file_paths(str(mountpoint))
    for name in (path, f"{path}.1"):
        if os.path.exists(name):
            os.unlink(name)


def mount_in_background(mountpoint: Path, options: str) -> subprocess.CompletedProcess[str]:
    """Run ``volfs -o OPTIONS MOUNTPOINT``, which returns once the mount is ready."""
    return subprocess.run(
        [sys.executable, "-m", "volfs", "-o", options, str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )


def purge_one_range(mountpoint: Path) -> None:
    """Write 64 KiB, mark it volatile and purge it: a purge the daemon logs at INFO."""
    fd = os.open(mountpoint / "cache", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 65536)
        fvrange(fd, 0, 65536, VRANGE_VOLATILE)
        assert purge(fd) == 65536
    finally:
        os.close(fd)


def unmount_and_wait_for_daemon(mountpoint: Path, log: Path) -> str:
    """Unmount, wait for the daemon's last line, and return the whole log."""
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
    wait_for(lambda: "unmounted" in log.read_text(), 10, "the daemon's last log line")
    return log.read_text()


def test_a_background_daemon_without_syslog_logs_to_a_file_under_run(
    background_mountpoint: Path,
) -> None:
    done = mount_in_background(background_mountpoint, "size=16M")
    assert done.stdout == "" and done.stderr == ""
    log = Path(f"/run/volfs/{escaped_mountpoint(str(background_mountpoint))}.log")
    assert log.exists()
    assert os.stat(log).st_mode & 0o777 == 0o600
    assert os.stat(log.parent).st_mode & 0o777 == 0o700
    purge_one_range(background_mountpoint)
    text = unmount_and_wait_for_daemon(background_mountpoint, log)
    assert f"mounted on {background_mountpoint}" in text
    assert "purge (ioctl): 1 ranges, 65536 bytes freed" in text


def test_log_level_warning_leaves_out_the_purges(background_mountpoint: Path) -> None:
    mount_in_background(background_mountpoint, "size=16M,log_level=warning")
    purge_one_range(background_mountpoint)
    log = Path(f"/run/volfs/{escaped_mountpoint(str(background_mountpoint))}.log")
    subprocess.run(["fusermount3", "-u", str(background_mountpoint)], check=True)
    wait_for(lambda: not is_mounted(background_mountpoint), 10, "the unmount")
    assert log.exists()
    text = log.read_text()
    assert "purge" not in text and "mounted on" not in text


def test_a_bad_log_level_is_refused_before_mounting(background_mountpoint: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "volfs", "-o", "log_level=loud", str(background_mountpoint)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == "volfs: log_level=loud: expected debug, info, warning, error\n"
    assert not is_mounted(background_mountpoint)


def test_the_journal_gets_whole_records_with_a_priority(tmp_path: Path) -> None:
    """The native protocol's length-prefixed fields keep a multi-line message whole."""
    address = str(tmp_path / "journal")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
        journal.bind(address)
        handler = JournalHandler(address)
        try:
            handler.emit(
                logging.LogRecord(
                    "volfs", logging.WARNING, __file__, 1, "first line\nsecond line", None, None
                )
            )
        finally:
            handler.close()
        datagram = journal.recv(65536)
    fields = parse_native(datagram)
    assert fields["MESSAGE"] == "first line\nsecond line"
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "volfs"


def parse_native(datagram: bytes) -> dict[str, str]:
    """Decode the journal's native protocol (binary-safe form only)."""
    fields = {}
    while datagram:
        name, _, rest = datagram.partition(b"\n")
        (length,) = struct.unpack("<Q", rest[:8])
        fields[name.decode()] = rest[8 : 8 + length].decode()
        datagram = rest[8 + length + 1 :]
    return fields


@pytest.mark.parametrize(
    "path", ["/mnt/vol", "/", "/srv/my-cache dir", "/.hidden/x", "/é/a.b", "/srv/a:b"]
)
def test_log_files_are_named_as_systemd_escape_names_the_mountpoint(path: str) -> None:
    if shutil.which("systemd-escape") is None:
        pytest.skip("systemd-escape is not installed")
    escaped = subprocess.run(
        ["systemd-escape", "--path", path], capture_output=True, text=True, check=True
    )
    assert escaped_mountpoint(path) == escaped.stdout.strip()
