"""Fixtures that mount a real volfs and take it down again, checking the daemon's exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MOUNT_TIMEOUT = 20.0


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail the test with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def is_mounted(path: Path) -> bool:
    """True if a volfs is mounted at ``path`` (per /proc/self/mounts)."""
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mounts", "rb") as mounts:
        return any(
            line.split()[1] == target and line.split()[2] == b"fuse.volfs" for line in mounts
        )


def force_unmount(path: Path) -> None:
    """Last resort: detach a mount whatever state its daemon is in."""
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@dataclass
class Mount:
    """A running volfs daemon and its mountpoint."""

    path: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        return self.process.pid

    def log(self) -> str:
        """What the daemon has written to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def unmount(self) -> int:
        """Unmount with fusermount3 and return the daemon's exit status."""
        subprocess.run(["fusermount3", "-u", str(self.path)], check=True, capture_output=True)
        return self.process.wait(timeout=MOUNT_TIMEOUT)

    def rss_bytes(self) -> int:
        """The daemon's resident memory, anonymous and shared, from /proc."""
        fields = {}
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                fields[key] = value
        return int(fields["VmRSS"].split()[0]) * 1024


def start_volfs(
    path: Path, options: str, log_path: Path, env: dict[str, str] | None = None
) -> Mount:
    """Start ``python -m volfs -f`` on ``path`` and wait until the mount answers."""
    path.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "volfs", "-f", str(path)]
    if options:
        command[4:4] = ["-o", options]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=None if env is None else {**os.environ, **env},
        )
    mount = Mount(path, process, log_path)

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"volfs exited with {process.returncode} before mounting:\n{mount.log()}")
        return is_mounted(path)

    wait_for(ready, MOUNT_TIMEOUT, f"volfs to mount {path}")
    return mount


def stop_volfs(mount: Mount) -> int | None:
    """Unmount and reap the daemon; return its exit status, or None if it had to be killed."""
    if mount.process.poll() is not None:
        force_unmount(mount.path)
        return mount.process.returncode
    try:
        return mount.unmount()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        mount.process.send_signal(signal.SIGTERM)
        try:
            mount.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            mount.process.kill()
            mount.process.wait()
        force_unmount(mount.path)
        return None


@pytest.fixture
def mount_volfs(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """A factory: ``mount_volfs("size=64M")`` mounts a volfs; all are unmounted afterwards.

    Teardown asserts that each daemon still running exits 0 on unmount and logged no
    exception: a request that failed on a bug shows up here even if the test did not see it.
    """
    mounts: list[Mount] = []

    def factory(
        options: str = "size=256M", name: str = "mnt", env: dict[str, str] | None = None
    ) -> Mount:
        mount = start_volfs(tmp_path / name, options, tmp_path / f"{name}.log", env)
        mounts.append(mount)
        return mount

    yield factory
    failures = []
    for mount in mounts:
        was_running = mount.process.poll() is None
        status = stop_volfs(mount)
        if was_running and status != 0:
            failures.append(f"{mount.path}: daemon exit status {status}\n{mount.log()}")
        elif "Traceback" in mount.log():
            failures.append(f"{mount.path}: the daemon logged an exception\n{mount.log()}")
    if failures:
        pytest.fail("\n".join(failures))


@pytest.fixture
def volfs(mount_volfs: Callable[..., Mount]) -> Mount:
    """One volfs mounted with a 256 MiB cap."""
    return mount_volfs()


@pytest.fixture
def mnt(volfs: Mount) -> Path:
    """The mountpoint of a fresh volfs."""
    return volfs.path
