"""The shell workflows of tests/shell/*.sh, each run against a fresh mount.

The scripts check themselves (they exit non-zero on the first surprise); here each one must
also exit 0, print exactly the transcript below and nothing on stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHELL_DIR = Path(__file__).parent / "shell"

TRANSCRIPTS = {
    "mark_purge_unmark.sh": """\
marked=1048576 purged=0
volatile=1048576 purged=0
purged=1048576
volatile=1048576 purged=1048576
marked=1048576 purged=1
volatile=0 purged=0
marked=1048576 purged=0
marked=1048576 purged=0
""",
    "purged_read_eio.sh": """\
marked=16384 purged=0
purged=16384
dd exit status 1
dd: Input/output error
marked=16384 purged=1
""",
    "two_shells.sh": """\
marked=524288 purged=0
volatile=524288 purged=0
marked=131072 purged=0
marked=262144 purged=0
volatile=655360 purged=0
 START      END  LENGTH  STATE
131072   524288  393216  volatile
786432  1048576  262144  volatile
purged=655360
marked=1048576 purged=1
""",
    "last_close.sh": """\
marked=1048576 purged=0
volatile=0 purged=0
marked=1048576 purged=0
volatile=1048576 purged=0
volatile=0 purged=0
purged=0
""",
}


def run_script(name: str, mountpoint: Path) -> subprocess.CompletedProcess[str]:
    """Run a script as a user would: executable, vrangectl found on PATH."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run(
        [SHELL_DIR / name, str(mountpoint)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_every_script_has_a_transcript() -> None:
    assert sorted(path.name for path in SHELL_DIR.glob("*.sh")) == sorted(TRANSCRIPTS)


@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
def test_script(mnt: Path, name: str) -> None:
    result = run_script(name, mnt)
    assert (result.returncode, result.stderr) == (0, ""), result.stdout
    assert result.stdout == TRANSCRIPTS[name]


def test_scripts_fail_off_volfs(tmp_path: Path) -> None:
    """Run elsewhere, a script stops at the first vrangectl error, with vrangectl's message."""
    result = run_script("mark_purge_unmark.sh", tmp_path)
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr == "vrangectl: /dev/fd/3: not a file on a volfs mount\n"
