"""The shell workflows of tests/mount/shell/*.sh, and the examples of README and --help, on
real mounts.

The scripts check themselves (they exit non-zero on the first surprise); here each one must
also exit 0, print exactly the transcript below and nothing on stderr. The examples are run
verbatim, /mnt/vol replaced by the test's mount, and must print what their comments show.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SHELL_DIR = Path(__file__).parent / "shell"
README = REPO_ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
#: Where the examples of README and --help mount volfs.
EXAMPLE_MOUNTPOINT = "/mnt/vol"

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
 START      END    SIZE  FLAGS  STATE
131072   524288  393216  FULL   intact
786432  1048576  262144  FULL   intact
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


def run_script(
    name: str, mountpoint: Path, path: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a script as a user would: executable, vrangectl found on PATH (or on ``path``)."""
    env = dict(os.environ, PATH=path or f"{VENV_BIN}:{os.environ['PATH']}")
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


@pytest.fixture(scope="module")
def coreutils_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PATH of one directory holding only bash, the coreutils commands and vrangectl."""
    if shutil.which("dpkg") is None:
        pytest.skip("dpkg is needed to list what coreutils installs")
    listing = subprocess.run(
        ["dpkg", "-L", "coreutils"], capture_output=True, text=True, check=True
    ).stdout.split()
    commands = [Path(entry) for entry in listing if re.fullmatch(r"(/usr)?/s?bin/[^/]+", entry)]
    bin_dir = tmp_path_factory.mktemp("coreutils-bin")
    for command in [*commands, Path("/bin/bash"), VENV_BIN / "vrangectl"]:
        if not (bin_dir / command.name).exists():
            (bin_dir / command.name).symlink_to(command)
    assert (bin_dir / "sha256sum").exists() and not (bin_dir / "cmp").exists()
    return str(bin_dir)


@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
def test_script_needs_only_bash_coreutils_and_vrangectl(
    mnt: Path, name: str, coreutils_path: str
) -> None:
    result = run_script(name, mnt, coreutils_path)
    assert (result.returncode, result.stderr) == (0, ""), result.stdout
    assert result.stdout == TRANSCRIPTS[name]


# -- the examples of README and --help ----------------------------------------------------------


@dataclass
class Step:
    """One command of an example and the output its comments show."""

    command: str
    #: The ``key=value`` words of its comment, then each comment-only line below it.
    shown: list[str] = field(default_factory=list)

    def accepts(self, printed: list[str]) -> bool:
        """True if ``printed`` is what the example shows; ``...`` stands for any value and
        says the output goes on (it is abridged)."""
        abridged = any("..." in line for line in self.shown)
        if len(printed) < len(self.shown) or (not abridged and len(printed) > len(self.shown)):
            return False
        return all(
            re.fullmatch(re.escape(shown).replace(re.escape("..."), r"\S+"), line)
            for shown, line in zip(self.shown, printed, strict=False)
        )


def example_steps(block: str) -> list[Step]:
    """Split a shell example into commands and the output each one's comments show.

    ``CMD  # key=value key=value, prose`` shows the line ``key=value key=value``; a comment
    without such words shows nothing. A line holding only ``# TEXT`` shows one more line,
    TEXT, of the command above it.
    """
    steps: list[Step] = []
    for raw in block.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            assert steps, f"output shown before any command: {raw!r}"
            steps[-1].shown.append(line[2:].rstrip())
        elif line:
            parts = re.fullmatch(r"(.*?)(?:\s+#\s(.*))?", line)
            assert parts is not None
            command, comment = parts.groups("")
            words = re.match(r"\w+=[^\s,:]+(?: \w+=[^\s,:]+)*", comment)
            steps.append(Step(command, [words[0]] if words else []))
    return steps


def run_example(block: str, mountpoint: Path) -> None:
    """Run ``block`` in bash, /mnt/vol replaced by ``mountpoint``; check what each step prints."""
    steps = example_steps(block.replace(EXAMPLE_MOUNTPOINT, str(mountpoint)))
    marker = "--- next step ---"
    script = "set -euo pipefail\n" + "".join(f"{step.command}\necho '{marker}'\n" for step in steps)
    result = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        env=dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}"),
        timeout=120,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stdout
    printed = result.stdout.split(f"{marker}\n")
    assert printed[-1] == "" and len(printed) == len(steps) + 1, result.stdout
    for step, output in zip(steps, printed, strict=False):
        lines = output.splitlines()
        assert step.accepts(lines), (
            f"{step.command!r} printed {lines}, the example shows {step.shown}"
        )


def test_help_examples_print_what_they_show(mnt: Path) -> None:
    help_text = subprocess.run(
        [VENV_BIN / "vrangectl", "--help"], capture_output=True, text=True, check=True
    ).stdout
    block = help_text.split("\nexamples:\n", 1)[1].split("\n\n", 1)[0]
    steps = example_steps(block)
    assert {step.command.split()[1] for step in steps if step.command.startswith("vrangectl")} == {
        "volatile",
        "nonvolatile",
        "status",
        "purge",
        "stats",
        "ls",
    }
    assert sum(len(step.shown) for step in steps) >= 10
    run_example(block, mnt)


def readme_section_blocks(title: str) -> list[str]:
    """The ```sh blocks of the README section ``## title``."""
    section = README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```sh\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)


def test_readme_vrangectl_examples_print_what_they_show(mnt: Path) -> None:
    blocks = readme_section_blocks("vrangectl")
    assert blocks, "the README's vrangectl section has no sh block"
    for block in blocks:
        assert any(step.shown for step in example_steps(block))
        run_example(block, mnt)
