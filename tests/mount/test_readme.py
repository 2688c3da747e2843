"""The README's Python examples, pasted into a script as a reader would, on a real mount."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"


def python_examples() -> list[str]:
    """The README's ```python blocks that use a mount at /mnt/vol, in order."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return [block for block in blocks if "/mnt/vol/tiles.bin" in block]


def run_example(code: str, mountpoint: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code.replace("/mnt/vol", str(mountpoint))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_volatile_range_and_segment_examples_run_as_scripts_and_print_what_they_say(
    mnt: Path,
) -> None:
    ranges, segments = python_examples()
    done = run_example(ranges, mnt)
    assert done.returncode == 0, done.stderr
    expected = ["(1048576, False)", "1048576", "(1048576, 1048576)", "[Errno 5] Input/output error"]
    assert done.stdout.splitlines() == expected
    # ... and the README's comments say so, next to the prints.
    comments = [line.partition("#")[2] for line in ranges.splitlines() if "print(" in line]
    assert all(value in comment for value, comment in zip(expected, comments, strict=True))
    done = run_example(segments, mnt)
    assert (done.returncode, done.stderr) == (0, "")
