"""Mounts for the scripts: a FUSE daemon (volfs or another) or a kernel tmpfs, always undone.

A daemon runs in the foreground (``<python> -m volfs -f -o OPTIONS MOUNTPOINT`` for volfs) in a
session of its own, so Ctrl-C reaches only the script, which unmounts; its output goes to a
log file whose end is shown when it fails. It counts as mounted once /proc/self/mounts lists
the mountpoint with the expected type and the mountpoint answers a stat. Unmounting retries
``fusermount3 -u`` (``umount`` for a tmpfs) for a while if busy, then detaches lazily.

The scripts import this module as ``volfs_mounts``: run as ``python scripts/NAME.py``, their
directory is the first entry of ``sys.path`` (tests that load a script by its path put it
there first).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

log = logging.getLogger("volfs_mounts")

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The type /proc/self/mounts shows for a volfs mount.
VOLFS_TYPE = "fuse.volfs"
#: Seconds to wait for a daemon to mount.
MOUNT_TIMEOUT = 30.0
#: Seconds to wait for a daemon to exit after the unmount, before terminating it.
EXIT_TIMEOUT = 60.0
#: Attempts at a plain unmount, 0.1 s apart, before a lazy one.
UNMOUNT_ATTEMPTS = 20
#: Seconds between two looks at a mount that is not there yet.
POLL_INTERVAL = 0.02


class MountError(RuntimeError):
    """A mount failed or its daemon died; the message says why, with the end of its log."""


# -- looking -----------------------------------------------------------------------------------


def mount_type(path: Path) -> str | None:
    """The type of what is mounted on ``path`` per /proc/self/mounts, or None if nothing is.

    A dead FUSE mount (its daemon gone) is still listed. Of stacked mounts the top one counts.
    """
    target = os.path.realpath(path)
    kind = None
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[1].replace("\\040", " ") == target:
                kind = fields[2]
    return kind


def is_mounted(path: Path) -> bool:
    """True if anything is mounted on ``path`` (also a dead FUSE mount)."""
    return mount_type(path) is not None


# -- unmounting --------------------------------------------------------------------------------


def unmount(path: Path, *, fuse: bool = True) -> None:
    """Unmount ``path`` if mounted: retried while busy, then lazily.

    ``fusermount3 -u`` for a FUSE mount, ``umount`` for a kernel filesystem (``fuse=False``).
    """
    command = ["fusermount3", "-u"] if fuse else ["umount"]
    error = ""
    for attempt in range(UNMOUNT_ATTEMPTS):
        if not is_mounted(path):
            return
        if attempt:
            time.sleep(0.1)
        result = subprocess.run(
            [*command, str(path)],
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if result.returncode == 0:
            return
        error = result.stderr.strip()
    log.warning("%s %s failed (%s), unmounting lazily", " ".join(command), path, error)
    subprocess.run(
        [*command, "-z" if fuse else "-l", str(path)], check=False, stdin=subprocess.DEVNULL
    )


def remove_mountpoint(path: Path, name: str) -> None:
    """Remove the (empty) directory ``path``, unless ``name`` is somehow still mounted there."""
    if is_mounted(path):
        log.error("%s is still mounted on %s", name, path)
    else:
        with contextlib.suppress(OSError):
            path.rmdir()


def remove_workdir(workdir: Path) -> None:
    """Remove a directory of mountpoints and logs, unless something is still mounted in it."""
    if any(is_mounted(path) for path in workdir.iterdir()):
        log.error("leaving %s in place: something is still mounted there", workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


# -- daemons -----------------------------------------------------------------------------------


def volfs_command(mountpoint: Path, options: str, python: str = sys.executable) -> list[str]:
    """The command line of a volfs daemon serving ``mountpoint`` in the foreground."""
    return [python, "-m", "volfs", "-f", "-o", options, str(mountpoint)]


@dataclass
class Daemon:
    """A FUSE daemon serving ``mountpoint`` in the foreground, its output in ``log_path``."""

    #: What to call it in messages: ``volfs``, or a benchmark's name for the target.
    name: str
    mountpoint: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    #: The type /proc/self/mounts shows once it is mounted; None: any.
    fstype: str | None = VOLFS_TYPE
    #: Its death was already raised as a MountError (with its log), so not to be logged again.
    reported: bool = False

    @property
    def command(self) -> str:
        """The command line, for messages."""
        args = self.process.args
        return " ".join(map(str, args)) if isinstance(args, list) else str(args)

    def log_text(self) -> str:
        """What the daemon wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the daemon's output."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise MountError, with the end of the daemon's log, if the daemon has exited."""
        status = self.process.poll()
        if status is not None:
            self.reported = True
            raise MountError(
                f"the {self.name} daemon exited with status {status} ({self.command}):\n"
                f"{self.tail()}"
            )

    def wait_mounted(self, timeout: float = MOUNT_TIMEOUT) -> None:
        """Wait until the mount is there and answers; raise MountError if it does not come."""
        deadline = time.monotonic() + timeout
        while not (
            (self.fstype is None or mount_type(self.mountpoint) == self.fstype)
            and os.path.ismount(self.mountpoint)
        ):
            self.check_alive()
            if time.monotonic() > deadline:
                self.reported = True
                raise MountError(
                    f"{self.name} not mounted after {timeout:g} s ({self.command}):\n{self.tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def stop(self, *, report_exit: bool = True) -> int:
        """Unmount and wait for the daemon (terminate it if it lingers); return its status.

        With ``report_exit`` a failure status not yet raised is logged with the end of the log.
        """
        unmount(self.mountpoint)
        try:
            status = self.process.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("the %s daemon still runs after the unmount, terminating it", self.name)
            self.process.terminate()
            try:
                status = self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                status = self.process.wait()
        if status != 0 and report_exit and not self.reported:
            log.warning("the %s daemon exited with status %s:\n%s", self.name, status, self.tail())
        return status

    def outcome(self) -> dict[str, object]:
        """How the exited daemon ended: status, logged exception, and the log if either is bad."""
        text = self.log_text()
        outcome: dict[str, object] = {
            "exit_status": self.process.returncode,
            "logged_exception": "Traceback" in text,
        }
        if outcome["exit_status"] != 0 or outcome["logged_exception"]:
            outcome["log"] = text
        return outcome


@contextlib.contextmanager
def mounted(
    command: Sequence[str],
    mountpoint: Path,
    log_path: Path,
    *,
    name: str = "volfs",
    fstype: str | None = VOLFS_TYPE,
    env: Mapping[str, str] | None = None,
    timeout: float = MOUNT_TIMEOUT,
    outcome: dict[str, object] | None = None,
) -> Iterator[Daemon]:
    """Run a daemon serving the existing directory ``mountpoint`` until the block ends.

    The daemon runs in the repository (with it first on PYTHONPATH, so ``-m volfs`` is this
    volfs), with ``env`` added to the environment, in a session of its own. The block starts
    once it is mounted (MountError if it is not within ``timeout``); afterwards the daemon is
    always unmounted and waited for, and ``mountpoint`` removed. Given ``outcome``, how the
    daemon ended goes there (see :meth:`Daemon.outcome`) instead of being logged.
    """
    environment = dict(os.environ, **(env or {}))
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")])
    )
    log.debug("starting %s", " ".join(command))
    try:
        with open(log_path, "wb") as log_file:
            try:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=REPO_ROOT,
                    env=environment,
                    start_new_session=True,  # Ctrl-C reaches the script, which unmounts
                )
            except OSError as error:
                raise MountError(f"cannot start {name} ({' '.join(command)}): {error}") from None
        daemon = Daemon(name, mountpoint, process, log_path, fstype)
        try:
            daemon.wait_mounted(timeout)
            log.info("%s mounted on %s (pid %d)", name, mountpoint, daemon.process.pid)
            yield daemon
        finally:
            daemon.stop(report_exit=outcome is None)
            if outcome is not None:
                outcome.update(daemon.outcome())
    finally:
        remove_mountpoint(mountpoint, name)


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """Mount a kernel tmpfs of ``size`` on ``mountpoint`` (needs root) until the block ends.

    Afterwards it is always unmounted and ``mountpoint`` removed.
    """
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise MountError(f"mounting a tmpfs on {mountpoint} failed: {result.stderr.strip()}")
        log.info("tmpfs mounted on %s", mountpoint)
        yield mountpoint
    finally:
        unmount(mountpoint, fuse=False)
        remove_mountpoint(mountpoint, "tmpfs")


# -- main --------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def setup_main(verbose: bool) -> None:
    """Log to stderr (debug if ``verbose``); make SIGTERM raise KeyboardInterrupt.

    So a script stopped with SIGTERM still unmounts what it mounted.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGTERM, _interrupt)
