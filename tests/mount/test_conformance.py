"""Conformance in CI: a few stress-ng stressors and fio verification, volfs beside a tmpfs.

Drives ``scripts/conformance.py`` (the whole suite: ``sudo python scripts/conformance.py``) on
a volfs of the fixture, so the fixture's checks of the daemon apply, and on a kernel tmpfs.
Needs stress-ng and fio; without them the tests skip.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO_ROOT, Mount

SCRIPT = REPO_ROOT / "scripts" / "conformance.py"
#: Seconds per stressor in CI.
TIMEOUT = 3.0

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting tmpfs needs root"),
    pytest.mark.skipif(
        shutil.which("stress-ng") is None,
        reason="stress-ng is not installed (scripts/setup.sh should install it)",
    ),
    pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed"),
]


def load_conformance() -> ModuleType:
    """Import scripts/conformance.py (scripts/ is no package; its modules import each other)."""
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("volfs_conformance", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


conformance = load_conformance()


def test_volfs_passes_what_tmpfs_passes(
    mount_volfs: Callable[..., Mount], mount_tmpfs: Callable[..., Path]
) -> None:
    rows = conformance.run_suite(
        conformance.select(conformance.CI_CASES),
        {"tmpfs": mount_tmpfs("512M"), "volfs": mount_volfs("size=512M").path},
        timeout=TIMEOUT,
    )
    table = conformance.format_table(rows)
    print(table)
    assert not conformance.violations(rows), table
    # Not vacuous: every CI case works on both, and did work.
    for row in rows:
        for name, outcome in row.outcomes.items():
            assert outcome.status == conformance.PASS, f"{row.case.name} on {name}\n{table}"
            assert outcome.rate, f"{row.case.name} on {name} did nothing\n{table}"


def test_the_verdict_and_the_table() -> None:
    """A case tmpfs passes and volfs does not is a violation, unless it is a known one."""
    passed = conformance.Outcome(conformance.PASS, rate=100.0)
    failed = conformance.Outcome(conformance.FAIL, "verify: data mismatch at 4096")
    skipped = conformance.Outcome(conformance.SKIP, "FS_IOC_FIEMAP not supported")
    case = conformance.Case("hdd", "stress-ng", ("--hdd",))
    regression = conformance.Row(case, {"tmpfs": passed, "volfs": failed})
    both_skip = conformance.Row(case, {"tmpfs": skipped, "volfs": skipped})
    both_fail = conformance.Row(case, {"tmpfs": failed, "volfs": failed})
    slower = conformance.Row(
        case, {"tmpfs": passed, "volfs": conformance.Outcome("pass", rate=25.0)}
    )
    problems = conformance.violations([regression, both_skip, both_fail, slower])
    assert problems == ["hdd: passes on tmpfs, fail on volfs (verify: data mismatch at 4096)"]
    table = conformance.format_table([regression, both_skip, slower])
    assert table.splitlines()[0].split("|")[1:4] == [" stressor ", " tmpfs ", " volfs "]
    assert "volfs: verify: data mismatch at 4096" in table
    assert "| FS_IOC_FIEMAP not supported |" in table  # the same reason on both: once
    assert "volfs at 25% of tmpfs's rate" in table


def test_the_script_mounts_its_own_and_reports() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--cases", "fio-mmap,fiemap", "--size", "256M"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| fio-mmap " in result.stdout and "| fiemap " in result.stdout
    assert "conformance: OK: volfs passes every case tmpfs passes (1 of 2 cases)" in result.stdout
