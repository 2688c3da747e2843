"""volfs as scripts/setup.sh installs it: for every user, where man, pkg-config and cc look.

These use the installed commands (/usr/local/bin), not this checkout's virtualenv: what a user
of the machine gets.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, force_unmount, is_mounted
from volfs import __version__
from volfs.abi import VOLFS_IOC_VRANGE_STATUS
from volfs.daemon.logs import escaped_mountpoint

pytestmark = pytest.mark.root

PREFIX = Path("/usr/local")
SETUP = REPO_ROOT / "scripts" / "setup.sh"
#: What an unprivileged user's shell finds first.
USER_PATH = "/usr/local/bin:/usr/bin:/bin"


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``command``, capturing its output as text; never raises for its exit status."""
    kwargs.setdefault("timeout", 300)
    return subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)


@pytest.mark.slow
def test_a_second_setup_changes_nothing_prints_nothing_and_needs_no_network(
    tmp_path: Path,
) -> None:
    first = run(["bash", str(SETUP)])
    assert first.returncode == 0, first.stderr
    # No package index and no apt: a run that wanted either would fail.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("apt-get", "apt"):
        (fake_bin / tool).write_text('#!/bin/sh\necho "$0 called" >&2\nexit 100\n')
        (fake_bin / tool).chmod(0o755)
    links = {name: os.readlink(PREFIX / "bin" / name) for name in ("volfs", "vrangectl")}
    second = run(
        ["bash", str(SETUP)],
        env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "PIP_NO_INDEX": "1"},
    )
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    assert {name: os.readlink(PREFIX / "bin" / name) for name in links} == links


def test_the_installed_commands_print_their_version() -> None:
    for command in ("volfs", "vrangectl"):
        done = run([str(PREFIX / "bin" / command), "--version"])
        assert (done.returncode, done.stdout) == (0, f"{command} {__version__}\n")


@pytest.mark.parametrize(("section", "page"), [("7", "volfs"), ("8", "volfs"), ("1", "vrangectl")])
def test_man_finds_the_pages(section: str, page: str) -> None:
    done = run(["man", "-w", section, page])
    assert done.returncode == 0, done.stderr
    # Debian's /usr/local/man is a link to /usr/local/share/man.
    found = os.path.realpath(done.stdout.strip())
    assert found == str(PREFIX / "share" / "man" / f"man{section}" / f"{page}.{section}")
    shown = run(["man", section, page], env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "80"})
    assert shown.returncode == 0 and page in shown.stdout.lower()


STATUS_PROGRAM = """\
{first}
#include <stdio.h>
#include <fcntl.h>
#include <sys/ioctl.h>
{last}

int main(int argc, char **argv) {{
    struct vrange_status status = {{0}};
    int fd = open(argv[1], O_RDONLY);
    if (argc != 2 || fd < 0 || ioctl(fd, VOLFS_IOC_VRANGE_STATUS, &status) != 0) {{
        perror("status");
        return 1;
    }}
    printf("%#lx volatile=%llu\\n", (unsigned long)VOLFS_IOC_VRANGE_STATUS,
           (unsigned long long)status.volatile_bytes);
    return 0;
}}
"""


@pytest.mark.parametrize(
    ("standard", "first", "last"),
    [
        # The compiler's default (GNU C), the header after the system's.
        ("", "", "#include <volfs.h>"),
        # Strict C99: the header first, as it documents, so that it can ask for what it needs.
        ("-std=c99", "#include <volfs.h>", ""),
    ],
)
def test_pkg_config_gives_what_a_c_program_needs_to_use_volfs_h(
    tmp_path: Path, mnt: Path, standard: str, first: str, last: str
) -> None:
    cflags = run(["pkg-config", "--cflags", "volfs"])
    assert cflags.returncode == 0, cflags.stderr
    assert run(["pkg-config", "--modversion", "volfs"]).stdout == f"{__version__}\n"
    source = tmp_path / "status.c"
    source.write_text(STATUS_PROGRAM.format(first=first, last=last))
    program = tmp_path / "status"
    compiled = run(
        [
            "sh",
            "-c",
            f'cc {standard} -Wall -Werror $(pkg-config --cflags volfs) "{source}" -o "{program}"',
        ]
    )
    assert compiled.returncode == 0, compiled.stderr
    (mnt / "f").write_bytes(b"x" * 4096)
    done = run([str(program), str(mnt / "f")])
    assert (done.returncode, done.stdout) == (0, f"{VOLFS_IOC_VRANGE_STATUS:#x} volatile=0\n")


@pytest.fixture
def created_user() -> Iterator[pwd.struct_passwd]:
    """A user made for the test, with a home directory; removed afterwards with what it owns."""
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    name = f"volfs-{uuid.uuid4().hex[:8]}"
    # Under /home, as a user's home would be: fusermount3 checks the mountpoint as the user,
    # who cannot pass through pytest's private temporary directories.
    made = run(["useradd", "--create-home", "--shell", "/bin/sh", name])
    assert made.returncode == 0, made.stderr
    user = pwd.getpwnam(name)
    home = Path(user.pw_dir)
    try:
        yield user
    finally:
        mountpoint = home / "mnt"
        if is_mounted(mountpoint):
            force_unmount(mountpoint)
        run(["userdel", "--remove", name])


def as_user(user: pwd.struct_passwd, script: str) -> subprocess.CompletedProcess[str]:
    """Run a shell script as ``user`` with the environment a login would give."""
    return run(
        [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--init-groups",
            "env",
            "-i",
            f"HOME={user.pw_dir}",
            f"USER={user.pw_name}",
            f"PATH={USER_PATH}",
            "sh",
            "-euc",
            script,
        ],
        cwd=user.pw_dir,
    )


def test_a_user_mounts_writes_marks_purges_and_unmounts_a_volfs_of_its_own(
    created_user: pwd.struct_passwd,
) -> None:
    done = as_user(
        created_user,
        """
        mkdir mnt
        volfs -o size=16M mnt
        head -c 64K /dev/urandom > mnt/cache.bin
        exec 3<>mnt/cache.bin
        vrangectl volatile /dev/fd/3 0 64K
        vrangectl purge mnt
        vrangectl status /dev/fd/3
        if cat mnt/cache.bin > /dev/null 2>&1; then echo read; else echo read failed; fi
        vrangectl nonvolatile /dev/fd/3 0 64K
        exec 3>&-
        stat -c '%U %s' mnt/cache.bin
        fusermount3 -u mnt
        grep -c " $HOME/mnt " /proc/mounts || true
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "marked=65536 purged=0",
        "purged=65536",
        "volatile=65536 purged=65536",
        "read failed",
        "marked=65536 purged=1",
        f"{created_user.pw_name} 65536",
        "0",
    ]
    # Without a journal or syslog the user's daemon logged to a file of the user's own.
    if not os.path.exists("/dev/log") and not os.path.exists("/run/systemd/journal/socket"):
        log = (
            Path(created_user.pw_dir)
            / ".local/state/volfs"
            / f"{escaped_mountpoint(created_user.pw_dir + '/mnt')}.log"
        )
        assert "purge (ioctl): 1 ranges, 65536 bytes freed" in log.read_text()
        assert log.stat().st_uid == created_user.pw_uid


def test_another_user_cannot_enter_a_users_mount_and_allow_other_needs_fuse_conf(
    created_user: pwd.struct_passwd,
) -> None:
    done = as_user(created_user, "mkdir mnt && volfs -o size=16M,allow_other mnt")
    fuse_conf = Path("/etc/fuse.conf")
    allowed = fuse_conf.exists() and any(
        line.strip() == "user_allow_other" for line in fuse_conf.read_text().splitlines()
    )
    if allowed:
        pytest.skip("/etc/fuse.conf has user_allow_other on this machine")
    assert done.returncode == 1
    assert "user_allow_other" in done.stderr
    mountpoint = Path(created_user.pw_dir) / "mnt"
    assert not is_mounted(mountpoint)
    mounted = as_user(created_user, "volfs -o size=16M mnt")
    assert mounted.returncode == 0, mounted.stderr
    try:
        # Root too: without allow_other (or allow_root) only the mounting user gets in.
        with pytest.raises(PermissionError):
            os.stat(mountpoint / "anything")
    finally:
        assert as_user(created_user, "fusermount3 -u mnt").returncode == 0


def build_output_warnings(output: str) -> list[str]:
    """The lines of a build's output that warn about the project (this machine's pip settings
    and Python's own environment are not the project's)."""
    return [
        line
        for line in output.splitlines()
        if "warn" in line.lower()
        and "is neither a file nor a directory" not in line
        and "byte-compiling is disabled" not in line
    ]


@pytest.mark.slow
def test_a_fresh_virtualenv_installs_volfs_from_the_sdist_and_mounts(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    built = run([sys.executable, "-m", "build", "--outdir", str(dist), str(REPO_ROOT)], env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    assert build_output_warnings(built.stdout + built.stderr) == []
    [sdist] = dist.glob("volfs-*.tar.gz")
    assert len(list(dist.glob("volfs-*.whl"))) == 1
    venv = tmp_path / "venv"
    assert run(["/usr/bin/python3", "-m", "venv", str(venv)]).returncode == 0
    installed = run([str(venv / "bin" / "pip"), "install", "-q", str(sdist)], env=env)
    assert installed.returncode == 0, installed.stderr
    package = Path(
        run(
            [str(venv / "bin" / "python"), "-c", "import volfs; print(volfs.__file__)"]
        ).stdout.strip()
    ).parent
    assert (package / "include" / "volfs.h").read_bytes() == (
        REPO_ROOT / "volfs" / "include" / "volfs.h"
    ).read_bytes()
    assert {page.name for page in (package / "man").iterdir()} >= {
        "volfs.7",
        "volfs.8",
        "vrangectl.1",
    }
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mounted = run([str(venv / "bin" / "volfs"), "-o", "size=16M", str(mountpoint)])
    assert mounted.returncode == 0, mounted.stderr
    try:
        (mountpoint / "f").write_bytes(b"from the sdist")
        assert (mountpoint / "f").read_bytes() == b"from the sdist"
        status = run([str(venv / "bin" / "vrangectl"), "status", str(mountpoint / "f")])
        assert (status.returncode, status.stdout) == (0, "volatile=0 purged=0\n")
    finally:
        assert run(["fusermount3", "-u", str(mountpoint)]).returncode == 0
        if is_mounted(mountpoint):
            force_unmount(mountpoint)


def test_a_daemon_with_nowhere_to_log_says_so_and_leaves_its_callers_output(
    created_user: pwd.struct_passwd,
) -> None:
    """No journal, no syslog, no HOME and a /tmp/volfs-UID that is not the user's: the
    command warns and returns; the daemon keeps no pipe of its caller open while it serves."""
    if os.path.exists("/dev/log") or os.path.exists("/run/systemd/journal/socket"):
        pytest.skip("a journal or syslog takes the log here")
    squatted = Path(f"/tmp/volfs-{created_user.pw_uid}")
    squatted.mkdir(mode=0o755)
    mountpoint = Path(created_user.pw_dir) / "mnt"
    mountpoint.mkdir()
    os.chown(mountpoint, created_user.pw_uid, created_user.pw_gid)
    try:
        # capture_output: a daemon holding the pipe would make this wait until the unmount.
        done = run(
            [
                "setpriv",
                f"--reuid={created_user.pw_uid}",
                f"--regid={created_user.pw_gid}",
                "--init-groups",
                "env",
                "-i",
                f"PATH={USER_PATH}",
                "volfs",
                "-o",
                "size=16M",
                str(mountpoint),
            ],
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert "the daemon's log is discarded" in done.stderr
        assert is_mounted(mountpoint)
    finally:
        if is_mounted(mountpoint):
            assert as_user(created_user, "fusermount3 -u mnt").returncode == 0
        squatted.rmdir()
