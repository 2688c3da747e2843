"""fsx against volfs: seeded random operations on one file, checked against a model.

The tests drive ``scripts/fsx.py`` in a process of its own (it forks children that die of
SIGBUS on purpose) on a mount of the fixture, whose teardown checks the daemon too. A long run:
``python scripts/fsx.py --duration 3600``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, Mount

SCRIPT = REPO_ROOT / "scripts" / "fsx.py"
#: Operations per seeded run in CI: a few seconds each.
OPS = 8000


def fsx(*arguments: str | Path | int, timeout: float = 240) -> tuple[int, dict[str, Any], str]:
    """Run fsx with ``--json``; return its exit status, its summary and its stderr."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.stdout, f"fsx printed no summary (exit {result.returncode}):\n{result.stderr}"
    return result.returncode, json.loads(result.stdout), result.stderr


@pytest.mark.parametrize("seed", [20240611, 7, 31337])
def test_random_operations_match_the_model(mount_volfs: Callable[..., Mount], seed: int) -> None:
    mnt = mount_volfs("size=64M,pressure=off").path
    status, summary, stderr = fsx("--file", mnt / "fsx.bin", "--seed", seed, "--ops", OPS)
    assert status == 0, summary["failure"] or stderr
    assert summary["operations"] == OPS
    counts = summary["counts"]
    # The run got where it is meant to go: purges seen by reads, unmarks, mmap and the model.
    for outcome in (
        "nonvolatile purged=0",
        "nonvolatile purged=1",
        "read EIO",
        "probe SIGBUS",
        "purged pages",
        "mapread",
        "mapwrite",
        "punch",
        "zero",
        "reopen",
        "mapwrite held across a purge",
    ):
        assert counts.get(outcome, 0) > 0, f"no {outcome} in {counts}"


def test_purged_zero_mounts_read_zeros_instead(mount_volfs: Callable[..., Mount]) -> None:
    mnt = mount_volfs("size=64M,pressure=off,purged=zero").path
    status, summary, stderr = fsx(
        "--file", mnt / "fsx.bin", "--purged-zero", "--seed", 17, "--ops", OPS // 2
    )
    assert status == 0, summary["failure"] or stderr
    counts = summary["counts"]
    assert counts.get("probe zeros", 0) > 0 and counts.get("purged pages", 0) > 0, counts
    assert "read EIO" not in counts and "probe SIGBUS" not in counts


def test_a_larger_file_with_few_collisions(mount_volfs: Callable[..., Mount]) -> None:
    mnt = mount_volfs("size=64M,pressure=off").path
    status, summary, stderr = fsx(
        "--file", mnt / "fsx.bin", "--seed", 5, "--ops", OPS // 2, "--max-size", 4 << 20
    )
    assert status == 0, summary["failure"] or stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting tmpfs needs root")
def test_the_model_holds_on_tmpfs(mount_tmpfs: Callable[..., Path]) -> None:
    """Without the volfs operations, the model must describe a kernel tmpfs exactly."""
    tmpfs = mount_tmpfs("64M")
    status, summary, stderr = fsx("--plain", "--file", tmpfs / "f", "--seed", 3, "--ops", OPS)
    assert status == 0, summary["failure"] or stderr
    assert "volatile" not in summary["counts"]


def test_a_corruption_is_reported_with_its_offset(mount_volfs: Callable[..., Mount]) -> None:
    mnt = mount_volfs("size=64M,pressure=off").path
    status, summary, stderr = fsx(
        "--file", mnt / "fsx.bin", "--seed", 11, "--ops", 2000, "--corrupt-at", 600
    )
    assert status == 1
    assert summary["operations"] == 600 and not summary["ok"]
    corrupted = re.search(r"CORRUPT byte (\d+)", stderr)
    assert corrupted, stderr
    assert f"first difference at offset {corrupted.group(1)} " in stderr, stderr
    assert "last 40 operations:" in stderr and "reproduce:" in stderr


def test_fsx_on_a_volfs_of_its_own() -> None:
    status, summary, stderr = fsx("--seed", 2, "--ops", 1000)
    assert status == 0, summary["failure"] or stderr
    assert summary["daemon"] == {"exit_status": 0, "logged_exception": False}
