"""Fixtures that mount a real volfs or a kernel tmpfs and take it down again.

How to mount, wait, unmount and judge a daemon's end is defined once, in
scripts/volfs_mounts.py, which the scripts use too; this module turns it into fixtures and
passes its names on to the tests (``from tests.conftest import Mount, wait_for``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The scripts import the harness as a top-level module; so do the tests, to share one copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

# isort: split


import volfs_mounts
from volfs_mounts import (
    MOUNT_TIMEOUT,
    REPO_ROOT,
    Mount,
    force_unmount,
    is_mounted,
    start_volfs,
    wait_for,
)

from volfs.daemon.logs import SYSTEM_LOG_DIRECTORY, escaped_mountpoint

__all__ = [
    "MOUNT_TIMEOUT",
    "REPO_ROOT",
    "Mount",
    "force_unmount",
    "is_mounted",
    "start_volfs",
    "stop_volfs",
    "wait_for",
]


def stop_volfs(mount: Mount) -> int:
    """Unmount ``mount`` and reap its daemon (terminated if it lingers); its exit status."""
    return mount.unmount(report_exit=False)


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
    failures = [problem for mount in mounts if (problem := mount.unmount_and_judge())]
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


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """A factory: ``mount_tmpfs("64M", nr_inodes=1000)`` mounts a kernel tmpfs (needs root).

    Each is mounted on ``tmp_path / name`` and unmounted afterwards, also if the test failed.
    """
    with contextlib.ExitStack() as mounts:

        def factory(
            size: str | None = None, *, nr_inodes: int | None = None, name: str = "tmpfs"
        ) -> Path:
            return mounts.enter_context(
                volfs_mounts.tmpfs(tmp_path / name, size, nr_inodes=nr_inodes)
            )

        yield factory


@pytest.fixture(scope="session", autouse=True)
def _remove_log_files_of_test_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Background daemons of the tests log to /run/volfs (no journal or syslog here): their
    files go with the session's temporary directories."""
    yield
    prefix = escaped_mountpoint(str(tmp_path_factory.getbasetemp()))
    for log in Path(SYSTEM_LOG_DIRECTORY).glob("*.log*"):
        if log.name.startswith(prefix):
            log.unlink(missing_ok=True)
