"""Mounts for the scripts and the tests: a FUSE daemon (volfs or another) or a kernel tmpfs.

This is the one place that knows how to start a daemon, tell that it mounted, take it down
and judge how it ended; tests/conftest.py builds its fixtures on it. It lives beside the
scripts and needs nothing but the standard library because the scripts run as plain programs:
run as ``python scripts/NAME.py``, a script has this directory first on ``sys.path`` and
imports the module as ``volfs_mounts``; conftest.py puts the directory there too, so the
tests, and the scripts they load, share one copy of it.

A daemon runs in the foreground (``<python> -m volfs -f -o OPTIONS MOUNTPOINT`` for volfs) in a
session of its own, so Ctrl-C reaches only the caller, which unmounts; its output goes to a
log file whose end is shown when it fails. It counts as mounted once /proc/self/mounts lists
the mountpoint with the expected type and the mountpoint answers a stat. Unmounting retries
``fusermount3 -u`` (``umount`` for a kernel filesystem) for a while if busy, then detaches
lazily. Whatever these helpers mount, they undo, also when the caller fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
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
#: Seconds to wait for a terminated daemon to exit, before killing it.
TERMINATE_TIMEOUT = 10.0
#: Attempts at a plain unmount before a lazy one, UNMOUNT_RETRY_INTERVAL s apart.
UNMOUNT_ATTEMPTS = 20
UNMOUNT_RETRY_INTERVAL = 0.1
#: Seconds between two looks at a condition that does not hold yet.
POLL_INTERVAL = 0.01
#: Lines of a daemon's log shown when it fails.
LOG_TAIL_LINES = 20
#: What a Python daemon writes when an exception escaped somewhere: a bug, even if it went on.
EXCEPTION_MARK = "Traceback"


class MountError(RuntimeError):
    """A mount failed or its daemon died; the message says why, with the end of its log."""


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds.

    Raises:
        TimeoutError: it did not hold within ``timeout`` seconds; the message names ``what``.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL_INTERVAL)


def memory_bytes(pid: int) -> int:
    """The memory process ``pid`` holds, from /proc: its resident memory other than shared
    memory (``VmRSS`` less ``RssShmem``) plus every page of the memfds it has open, mapped or
    not. volfs writes its files' data into a memfd without mapping it, so ``VmRSS`` alone
    misses most of that data.
    """
    private = shared = None
    with open(f"/proc/{pid}/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                private = int(line.split()[1]) * 1024
            elif line.startswith("RssShmem:"):
                shared = int(line.split()[1]) * 1024
    if private is None or shared is None:
        raise ValueError(f"process {pid} has no VmRSS (a kernel thread?)")
    memfds: dict[tuple[int, int], int] = {}  # a memfd open twice counts once
    descriptors = f"/proc/{pid}/fd"
    for name in os.listdir(descriptors):
        path = os.path.join(descriptors, name)
        try:
            if os.readlink(path).startswith("/memfd:"):
                status = os.stat(path)
                memfds[status.st_dev, status.st_ino] = status.st_blocks * 512
        except FileNotFoundError:
            pass  # closed meanwhile
    return private - shared + sum(memfds.values())


# -- looking -----------------------------------------------------------------------------------


def _unescape(text: str) -> str:
    r"""A path as /proc/self/mounts writes it (``\040`` for a space, and so on), decoded."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), text)


def mount_type(path: Path) -> str | None:
    """The type of what is mounted on ``path`` per /proc/self/mounts, or None if nothing is.

    A dead FUSE mount (its daemon gone) is still listed. Of stacked mounts the top one counts.
    """
    target = os.path.realpath(path)
    kind = None
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as mounts:
        for line in mounts:
            _source, where, fstype, *_options = line.split()
            if _unescape(where) == target:
                kind = fstype
    return kind


def is_mounted(path: Path) -> bool:
    """True if anything is mounted on ``path`` (also a dead FUSE mount)."""
    return mount_type(path) is not None


# -- unmounting --------------------------------------------------------------------------------


def force_unmount(path: Path) -> None:
    """Detach what is mounted on ``path`` now (lazily), whatever state its daemon is in."""
    # fusermount3 for a user's FUSE mount; it refuses anything else, which umount detaches.
    for command in (["fusermount3", "-u", "-z"], ["umount", "-l"]):
        if not is_mounted(path):
            return
        subprocess.run(
            [*command, str(path)], check=False, stdin=subprocess.DEVNULL, capture_output=True
        )


def unmount(path: Path) -> None:
    """Unmount ``path`` if mounted: retried while busy, then lazily.

    ``fusermount3 -u`` for a FUSE mount (so an ordinary user can undo a mount of theirs),
    ``umount`` for a kernel filesystem.
    """
    error = ""
    for attempt in range(UNMOUNT_ATTEMPTS):
        kind = mount_type(path)
        if kind is None:
            return
        if attempt:
            time.sleep(UNMOUNT_RETRY_INTERVAL)  # busy: give the files open there time to close
        command = ["fusermount3", "-u"] if kind.startswith("fuse") else ["umount"]
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
    log.warning("unmounting %s failed (%s), detaching it lazily", path, error)
    force_unmount(path)


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
    return [python, "-m", "volfs", "-f", *(["-o", options] if options else []), str(mountpoint)]


@dataclass
class Mount:
    """A FUSE daemon serving ``path`` in the foreground, its output in ``log_path``."""

    path: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    #: What to call it in messages: ``volfs``, or a benchmark's name for the target.
    name: str = "volfs"
    #: The type /proc/self/mounts shows once it is mounted; None: any.
    fstype: str | None = VOLFS_TYPE
    #: Its death was already raised as a MountError (with its log), so not to be logged again.
    reported: bool = field(default=False, init=False)

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        return self.process.pid

    @property
    def command(self) -> str:
        """The command line, for messages."""
        args = self.process.args
        return " ".join(map(str, args)) if isinstance(args, list) else str(args)

    def log(self) -> str:
        """What the daemon wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the daemon's output."""
        return "\n".join(self.log().splitlines()[-lines:])

    def logged_exception(self) -> bool:
        """True if an exception escaped somewhere in the daemon, per its log."""
        return EXCEPTION_MARK in self.log()

    def memory_bytes(self) -> int:
        """The memory the daemon holds (see :func:`memory_bytes`)."""
        return memory_bytes(self.pid)

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

        def ready() -> bool:
            self.check_alive()
            return (
                self.fstype is None or mount_type(self.path) == self.fstype
            ) and os.path.ismount(self.path)

        try:
            wait_for(ready, timeout, f"{self.name} to mount {self.path}")
        except TimeoutError as error:
            self.reported = True
            raise MountError(f"{error} ({self.command}):\n{self.tail()}") from None
        log.info("%s mounted on %s (pid %d)", self.name, self.path, self.pid)

    def unmount(self, *, report_exit: bool = True) -> int:
        """Unmount and wait for the daemon (terminate it if it lingers); return its status.

        With ``report_exit`` a failure status not yet raised is logged with the end of the log.
        """
        unmount(self.path)
        try:
            status = self.process.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("the %s daemon still runs after the unmount, terminating it", self.name)
            self.process.terminate()
            try:
                status = self.process.wait(timeout=TERMINATE_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                status = self.process.wait()
        if status != 0 and report_exit and not self.reported:
            log.warning("the %s daemon exited with status %s:\n%s", self.name, status, self.tail())
        return status

    def unmount_and_judge(self) -> str | None:
        """Unmount; say what was wrong with how the daemon ended, or None if nothing was.

        A daemon still running must exit 0 on the unmount; one that had exited already (a
        test may kill it on purpose) must only not have logged an exception.
        """
        was_running = self.process.poll() is None
        status = self.unmount(report_exit=False)
        if was_running and status != 0:
            return f"{self.path}: the {self.name} daemon exited with status {status}\n{self.log()}"
        if self.logged_exception():
            return f"{self.path}: the {self.name} daemon logged an exception\n{self.log()}"
        return None

    def outcome(self) -> dict[str, object]:
        """How the exited daemon ended: status, logged exception, and the log if either is bad."""
        outcome: dict[str, object] = {
            "exit_status": self.process.returncode,
            "logged_exception": self.logged_exception(),
        }
        if outcome["exit_status"] != 0 or outcome["logged_exception"]:
            outcome["log"] = self.log()
        return outcome


def spawn(
    command: Sequence[str],
    path: Path,
    log_path: Path,
    *,
    name: str = "volfs",
    fstype: str | None = VOLFS_TYPE,
    env: Mapping[str, str] | None = None,
) -> Mount:
    """Start a daemon that is to serve ``path``; :meth:`Mount.wait_mounted` waits for it.

    The daemon runs in the repository (with it first on PYTHONPATH, so ``-m volfs`` is this
    volfs), with ``env`` added to the environment, in a session of its own (Ctrl-C reaches
    the caller, which unmounts), its output in ``log_path``.

    Raises:
        MountError: the command could not be started.
    """
    environment = dict(os.environ, **(env or {}))
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")])
    )
    log.debug("starting %s", " ".join(command))
    with open(log_path, "wb") as log_file:
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=environment,
                start_new_session=True,
            )
        except OSError as error:
            raise MountError(f"cannot start {name} ({' '.join(command)}): {error}") from None
    return Mount(path, process, log_path, name, fstype)


def start_volfs(
    path: Path, options: str, log_path: Path, env: Mapping[str, str] | None = None
) -> Mount:
    """Mount this repository's volfs with ``options`` on ``path`` (created if missing).

    Returns once it is mounted; the caller unmounts it (:meth:`Mount.unmount`).

    Raises:
        MountError: it did not start or mount (it is stopped again then).
    """
    path.mkdir(exist_ok=True)
    mount = spawn(volfs_command(path, options), path, log_path, env=env)
    try:
        mount.wait_mounted()
    except BaseException:
        mount.unmount()
        raise
    return mount


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
) -> Iterator[Mount]:
    """Run a daemon serving the existing directory ``mountpoint`` until the block ends.

    It is started as :func:`spawn` says. The block starts once it is mounted (MountError if it
    is not within ``timeout``); afterwards the daemon is always unmounted and waited for, and
    ``mountpoint`` removed. Given ``outcome``, how the daemon ended goes there (see
    :meth:`Mount.outcome`) instead of being logged.
    """
    try:
        mount = spawn(command, mountpoint, log_path, name=name, fstype=fstype, env=env)
        try:
            mount.wait_mounted(timeout)
            yield mount
        finally:
            mount.unmount(report_exit=outcome is None)
            if outcome is not None:
                outcome.update(mount.outcome())
    finally:
        remove_mountpoint(mountpoint, name)


@contextlib.contextmanager
def tmpfs(
    mountpoint: Path,
    size: str | None = None,
    *,
    nr_inodes: int | None = None,
    options: str = "",
) -> Iterator[Path]:
    """Mount a kernel tmpfs on ``mountpoint`` (needs root) until the block ends.

    Args:
        mountpoint: where; created if missing, and removed afterwards.
        size: its size cap (``size=``: ``64M``, ``1T``); None: the kernel's default.
        nr_inodes: its inode cap (``nr_inodes=``); None: the kernel's default.
        options: more of mount(8)'s ``-o`` options, comma-separated (``mode=1777,uid=1000``).

    Raises:
        MountError: mount(8) failed.
    """
    settings = [
        f"{key}={value}"
        for key, value in (("size", size), ("nr_inodes", nr_inodes))
        if value is not None
    ]
    if options:
        settings.append(options)
    command = ["mount", "-t", "tmpfs", *(["-o", ",".join(settings)] if settings else [])]
    mountpoint.mkdir(exist_ok=True)
    try:
        result = subprocess.run(
            [*command, "tmpfs", str(mountpoint)],
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
        unmount(mountpoint)
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
