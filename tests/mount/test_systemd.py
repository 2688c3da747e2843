"""volfs under systemd and fstab: the shipped units, sd_notify, and an fstab line via mount(8).

This machine need not run systemd: the units are checked with ``systemd-analyze verify`` where
it is installed, and the service's command lines are run the way systemd would run them:
``%f``, ``%i``, ``${VOLFS_OPTIONS}`` and ``$$`` expanded, with the environment systemd gives
each (``$NOTIFY_SOCKET`` pointing at a socket the test owns, ``$RUNTIME_DIRECTORY``,
``$SERVICE_RESULT`` and ``$EXIT_STATUS`` for ExecStopPost), the capability bounding set applied
with setpriv.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import MOUNT_TIMEOUT, REPO_ROOT, Mount, force_unmount, is_mounted
from volfs.client import statistics

MiB = 1024 * 1024
SYSTEMD_DIR = REPO_ROOT / "systemd"
SERVICE = SYSTEMD_DIR / "volfs@.service"
MOUNT_UNIT = SYSTEMD_DIR / "mnt-vol.mount"
INSTALLED_VOLFS = "/usr/local/bin/volfs"
VENV_BIN = Path(sys.executable).parent
#: Where scripts/setup.sh installs volfs for every user; /usr/local/bin links into it.
INSTALL_DIR = Path("/usr/local/lib/volfs")
#: root's default PATH (Debian's login.defs and systemd's): what mount(8) helpers, fstab and
#: units find commands on.
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The prefixes an Exec line may start with (``-``: its failure is ignored, and so on).
EXEC_PREFIXES = "-@:+!"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, values in file order (sections merged).

    A line ending in a backslash goes on on the next line, the backslash read as a space.
    """
    settings: dict[str, list[str]] = {}
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";", "["))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        key, _, value = (pending + line).partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
        pending = ""
    return settings


def escape_path(path: Path) -> str:
    """``systemd-escape --path``: the instance name of a path (``/mnt/vol``: ``mnt-vol``)."""
    text = "/".join(part for part in str(path).split("/") if part)
    escaped = ""
    for i, char in enumerate(text):
        if char == "/":
            escaped += "-"
        elif char.isascii() and (char.isalnum() or char in ":_" or (char == "." and i)):
            escaped += char
        else:
            escaped += "".join(f"\\x{byte:02x}" for byte in char.encode())
    return escaped or "-"


def exec_command(line: str, mountpoint: Path, env: dict[str, str]) -> list[str]:
    """An Exec line of the service as systemd runs it for the instance of ``mountpoint``.

    Its prefixes dropped; specifiers (``%f`` the mountpoint, ``%i`` the instance, ``%%``) in
    the text; split into words as systemd unquotes them; then ``${NAME}`` within a word,
    ``$NAME`` as a word of its own (split at whitespace) and ``$$`` (a ``$``) from ``env``.
    The installed ``volfs`` is replaced by this checkout's.
    """
    specifiers = {"f": str(mountpoint), "i": escape_path(mountpoint), "%": "%"}
    text = re.sub(r"%(.)", lambda match: specifiers[match[1]], line.lstrip(EXEC_PREFIXES))
    argv: list[str] = []
    for word in shlex.split(text):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            argv += env.get(whole[1], "").split()
            continue
        argv.append(
            re.sub(
                r"\$\$|\$\{(\w+)\}",
                lambda match: "$" if match[0] == "$$" else env.get(match[1], ""),
                word,
            )
        )
    if argv[0] == INSTALLED_VOLFS:
        argv[:1] = [sys.executable, "-m", "volfs"]
    return argv


@dataclass
class ServiceRun:
    """One run of volfs@.service for ``mountpoint``, its command lines run as systemd would.

    ``prefix`` goes before each command (the unit's confinement, or nothing). The runtime
    directory (RuntimeDirectory=) is made as systemd makes it, under ``tmp_path``.
    """

    tmp_path: Path
    mountpoint: Path
    prefix: list[str]

    @property
    def runtime_directory(self) -> Path:
        [name] = unit_settings(SERVICE)["RuntimeDirectory"]
        path = self.tmp_path / "run" / name.replace("%i", escape_path(self.mountpoint))
        path.mkdir(parents=True, exist_ok=True)
        return path

    def environment(self, **extra: str) -> dict[str, str]:
        """What systemd hands every command of the unit, and ``extra``."""
        return {"PATH": ROOT_PATH, "RUNTIME_DIRECTORY": str(self.runtime_directory), **extra}

    def run(self, key: str, **extra: str) -> subprocess.CompletedProcess[str]:
        """Run the unit's ``key`` (ExecStartPre, ExecStartPost, ExecStopPost) to its end.

        Fails the test if it failed, unless the line's ``-`` prefix tells systemd to ignore
        that; fails it anyway if the filter killed it.
        """
        [line] = unit_settings(SERVICE)[key]
        env = self.environment(**extra)
        result = subprocess.run(
            [*self.prefix, *exec_command(line, self.mountpoint, env)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        what = f"{key} exited with {result.returncode}:\n{result.stderr}"
        assert result.returncode != -signal.SIGSYS, f"a system call outside the filter: {what}"
        assert result.returncode == 0 or line.startswith("-"), what
        return result

    def start(self, options: str, env: dict[str, str]) -> Mount:
        """Start the unit's ExecStart with these options (without waiting for the mount)."""
        [line] = unit_settings(SERVICE)["ExecStart"]
        log_path = self.tmp_path / "service.log"
        command = exec_command(line, self.mountpoint, {"VOLFS_OPTIONS": options})
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [*self.prefix, *command],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.environment(), "PATH": os.environ["PATH"], **env},
            )
        return Mount(self.mountpoint, process, log_path)


def start_service(
    tmp_path: Path, mountpoint: Path, env: dict[str, str], prefix: list[str] | None = None
) -> Mount:
    """Run the unit's ExecStartPre, then start its ExecStart (without waiting for the mount)."""
    unit = ServiceRun(tmp_path, mountpoint, prefix or [])
    unit.run("ExecStartPre")
    return unit.start("size=32M", env)


@pytest.fixture
def services() -> Iterator[list[Mount]]:
    """Daemons a test started; each is stopped and reaped afterwards, whatever happened."""
    started: list[Mount] = []
    yield started
    for mount in started:
        mount.unmount(report_exit=False)


def top_mount_id(path: Path) -> int | None:
    """The mount ID of the topmost mount on ``path`` (/proc/self/mountinfo), or None."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as mounts:
        for line in mounts:
            fields = line.split()
            where = re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), fields[4])
            if where == str(path):
                found = int(fields[0])
    return found


# -- the units ----------------------------------------------------------------------------------


def systemd_version(analyze: str) -> int:
    first = subprocess.run([analyze, "--version"], capture_output=True, text=True, check=True)
    match = re.match(r"systemd (\d+)", first.stdout)
    assert match, first.stdout
    return int(match[1])


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (scripts/setup.sh installs it where it can)",
)
@pytest.mark.parametrize("unit", ["volfs@mnt-vol.service", "mnt-vol.mount"])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, unit: str) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None
    for source in (SERVICE, MOUNT_UNIT):
        # This checkout's volfs, so that verify's check that the command exists does not
        # depend on scripts/setup.sh having linked /usr/local/bin/volfs.
        text = source.read_text().replace(INSTALLED_VOLFS, str(VENV_BIN / "volfs"))
        (tmp_path / source.name).write_text(text)
    # An instance of the template, as `systemctl start volfs@mnt-vol` would load it.
    (tmp_path / "volfs@mnt-vol.service").symlink_to("volfs@.service")
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    complaints = (result.stdout + result.stderr).splitlines()
    if systemd_version(analyze) < 254:  # the key is newer; older systemd ignores it
        complaints = [line for line in complaints if "'MemoryPressureWatch'" not in line]
    assert (result.returncode, complaints) == (0, [])


def test_instance_is_the_escaped_mountpoint() -> None:
    settings = unit_settings(SERVICE)
    assert settings["Type"] == ["notify"]
    assert settings["ExecStart"] == [f"{INSTALLED_VOLFS} -f -o ${{VOLFS_OPTIONS}} %f"]
    assert settings["EnvironmentFile"] == ["-/etc/default/volfs", "-/etc/volfs/%i.env"]
    if shutil.which("systemd-escape"):
        escaped = subprocess.run(
            ["systemd-escape", "--path", "--template=volfs@.service", "/mnt/vol"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert escaped == "volfs@mnt-vol.service"
        # The tests' own escaping (for %i) agrees, also where it has to escape.
        awkward = "/mnt/my-vol.d/.x y/\u00e9"
        systemds = subprocess.run(
            ["systemd-escape", "--path", awkward], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert escape_path(Path(awkward)) == systemds


# -- sd_notify ----------------------------------------------------------------------------------


def bind_notify_socket(tmp_path: Path, kind: str) -> tuple[socket.socket, str]:
    """A datagram socket standing in for systemd's; returns it and the $NOTIFY_SOCKET value."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "abstract":
        name = f"volfs-test-{os.getpid()}-{tmp_path.name}"
        listener.bind("\0" + name)
        return listener, "@" + name
    listener.bind(str(tmp_path / "notify"))
    return listener, str(tmp_path / "notify")


def receive(listener: socket.socket, mount: Mount, what: str) -> list[str]:
    """The next notification's lines; fails with the daemon's log if none comes in time."""
    listener.settimeout(MOUNT_TIMEOUT)
    try:
        return listener.recv(4096).decode().split("\n")
    except TimeoutError:
        pytest.fail(f"no {what} within {MOUNT_TIMEOUT} s; daemon log:\n{mount.log()}")


def nothing_pending(listener: socket.socket) -> bool:
    listener.setblocking(False)
    try:
        listener.recv(4096)
    except BlockingIOError:
        return True
    return False


@pytest.mark.parametrize("kind", ["path", "abstract"])
@pytest.mark.parametrize("stop", ["SIGTERM", "umount"])
def test_ready_once_mounted_and_stopping_on_the_way_out(
    tmp_path: Path, services: list[Mount], kind: str, stop: str
) -> None:
    listener, address = bind_notify_socket(tmp_path, kind)
    mountpoint = tmp_path / "mnt" / "vol"  # not there yet: ExecStartPre makes it
    with listener:
        mount = start_service(tmp_path, mountpoint, {"NOTIFY_SOCKET": address})
        services.append(mount)
        ready = receive(listener, mount, "READY=1")
        assert is_mounted(mountpoint), "READY=1 came before the mount"
        assert "READY=1" in ready and "STOPPING=1" not in ready
        # Whoever systemd starts next can use the mount at once, ioctls included.
        (mountpoint / "f").write_bytes(b"ready")
        assert (mountpoint / "f").read_bytes() == b"ready"
        assert statistics(mountpoint)["capacity_bytes"] == 32 * MiB
        assert nothing_pending(listener)

        if stop == "SIGTERM":
            mount.process.send_signal(signal.SIGTERM)
        else:
            subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
        assert receive(listener, mount, "STOPPING=1") == ["STOPPING=1"]
        assert mount.process.wait(timeout=MOUNT_TIMEOUT) == 0
        assert not is_mounted(mountpoint)
        assert nothing_pending(listener)
    assert "Traceback" not in mount.log()


def test_unreachable_notify_socket_is_not_fatal(mount_volfs: Callable[..., Mount]) -> None:
    absent = "/run/volfs-test-no-such-socket"
    mount = mount_volfs("size=16M", env={"NOTIFY_SOCKET": absent})
    (mount.path / "f").write_bytes(b"served anyway")
    assert (mount.path / "f").read_bytes() == b"served anyway"
    assert f"cannot notify the service manager at {absent}" in mount.log()


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="the service runs as root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_service_works_with_its_capability_bounding_set(
    tmp_path: Path, services: list[Mount]
) -> None:
    settings = unit_settings(SERVICE)
    [capabilities] = settings["CapabilityBoundingSet"]
    assert settings["NoNewPrivileges"] == ["yes"]
    bounding = ",".join(["-all"] + [f"+{name[4:].lower()}" for name in capabilities.split()])
    mountpoint = tmp_path / "vol"
    mount = start_service(
        tmp_path,
        mountpoint,
        {},
        prefix=["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs"],
    )
    services.append(mount)
    mount.wait_mounted()
    (mountpoint / "f").write_bytes(os.urandom(MiB))
    fd = os.open(mountpoint / "f", os.O_RDWR)
    try:
        result = subprocess.run(
            [VENV_BIN / "vrangectl", "volatile", f"/dev/fd/{fd}", "0", "1M"],
            pass_fds=[fd],
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout == "marked=1048576 purged=0\n"
        purged = subprocess.run(
            [VENV_BIN / "vrangectl", "purge", str(mountpoint)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert purged.stdout == "purged=1048576\n"
    finally:
        os.close(fd)
    assert mount.unmount() == 0


# -- undoing a mount: only this unit's, only a dead one -----------------------------------------


def test_a_failed_start_leaves_another_mount_at_the_path_alone(
    tmp_path: Path, mount_volfs: Callable[..., Mount]
) -> None:
    other = mount_volfs("size=16M", name="vol")
    (other.path / "theirs").write_bytes(b"not the unit's")
    theirs = top_mount_id(other.path)
    unit = ServiceRun(tmp_path, other.path, [])
    unit.run("ExecStartPre")
    # A typo in VOLFS_OPTIONS: volfs exits 2 before it mounts, so it never sends READY=1 and
    # systemd runs no ExecStartPost; it does run ExecStopPost.
    failed = unit.start("size=1G,mdoe=0755", {})
    assert failed.process.wait(timeout=MOUNT_TIMEOUT) == 2, failed.log()
    unit.run("ExecStopPost", SERVICE_RESULT="exit-code", EXIT_CODE="exited", EXIT_STATUS="2")
    assert top_mount_id(other.path) == theirs
    assert (other.path / "theirs").read_bytes() == b"not the unit's"


@pytest.mark.parametrize(
    ("stop", "result"),
    [
        (
            signal.SIGKILL,
            {"SERVICE_RESULT": "signal", "EXIT_CODE": "killed", "EXIT_STATUS": "KILL"},
        ),
        (signal.SIGTERM, {"SERVICE_RESULT": "success", "EXIT_CODE": "exited", "EXIT_STATUS": "0"}),
    ],
    ids=["crash", "clean-stop"],
)
def test_only_the_units_own_dead_mount_is_detached(
    tmp_path: Path, mount_volfs: Callable[..., Mount], stop: signal.Signals, result: dict[str, str]
) -> None:
    """The unit's volfs mounted on top of another one: after a crash its dead mount goes and
    the other stays; after a clean stop there is nothing to undo."""
    other = mount_volfs("size=16M", name="vol")
    (other.path / "theirs").write_bytes(b"not the unit's")
    theirs = top_mount_id(other.path)
    unit = ServiceRun(tmp_path, other.path, [])
    listener, address = bind_notify_socket(tmp_path, "path")
    with listener:
        unit.run("ExecStartPre")
        mount = unit.start("size=32M", {"NOTIFY_SOCKET": address})
        ours = None
        try:
            assert "READY=1" in receive(listener, mount, "READY=1")
            ours = top_mount_id(unit.mountpoint)
            assert ours not in (None, theirs)
            unit.run("ExecStartPost", MAINPID=str(mount.pid))
            assert statistics(unit.mountpoint)["capacity_bytes"] == 32 * MiB  # the unit's
            mount.process.send_signal(stop)
            mount.process.wait(timeout=MOUNT_TIMEOUT)
            if stop == signal.SIGKILL:
                with pytest.raises(OSError) as dead:
                    os.statvfs(unit.mountpoint)
                assert dead.value.errno == errno.ENOTCONN
                assert top_mount_id(unit.mountpoint) == ours
            unit.run("ExecStopPost", **result)
            assert top_mount_id(unit.mountpoint) == theirs
            assert (other.path / "theirs").read_bytes() == b"not the unit's"
        finally:
            if mount.process.poll() is None:
                mount.process.kill()
                mount.process.wait()
            if ours is not None and top_mount_id(unit.mountpoint) == ours:
                force_unmount(unit.mountpoint)


# -- the installed commands ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["volfs", "vrangectl"])
def test_roots_path_runs_the_commands_installed_from_this_checkout(command: str) -> None:
    """`mount -t fuse.volfs`, fstab and the unit run `volfs` from root's PATH: the copy
    scripts/setup.sh installed from this checkout."""
    found = shutil.which(command, path=ROOT_PATH)
    where = found and os.path.realpath(found)
    installed = os.path.realpath(INSTALL_DIR / "bin" / command)
    assert where == installed, (
        f"root's PATH runs {found or 'no ' + command} ({where}), not {installed}: "
        "see scripts/setup.sh"
    )
    source = (INSTALL_DIR / "volfs-source").read_text().split(" ", 1)[1].strip()
    assert source == str(REPO_ROOT), f"{INSTALL_DIR} was installed from {source}: run setup.sh"
    if command == "volfs":
        assert os.path.realpath(INSTALLED_VOLFS) == installed  # the unit's ExecStart


# -- fstab --------------------------------------------------------------------------------------


def mount_unit_line(mountpoint: Path) -> str:
    """The example mount unit's What, Type and Options as an fstab line for ``mountpoint``."""
    settings = unit_settings(MOUNT_UNIT)
    [what], [kind], [options] = settings["What"], settings["Type"], settings["Options"]
    return f"{what}  {mountpoint}  {kind}  {options}  0 0"


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) needs root")
@pytest.mark.parametrize(
    ("line", "size", "mode"),
    [
        ("volfs  {mnt}  fuse.volfs  size=24M,mode=0750,nr_inodes=1k  0 0", 24 * MiB, 0o750),
        (None, 1024 * MiB, 0o1777),
    ],
    ids=["fstab-line", "mount-unit-example"],
)
def test_fstab_line_mounts(tmp_path: Path, line: str | None, size: int, mode: int) -> None:
    """`mount MOUNTPOINT` finds the line in fstab (here a file given with -T) and mounts."""
    mountpoint = tmp_path / "vol"
    mountpoint.mkdir()
    fstab = tmp_path / "fstab"
    entry = line.format(mnt=mountpoint) if line else mount_unit_line(mountpoint)
    fstab.write_text(f"# volfs test\n{entry}\n")
    # mount(8) runs mount.fuse3, which runs `volfs` from PATH: this checkout's. It runs where
    # no file is called "volfs": mount(8) would take the source for that file's path.
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    result = subprocess.run(
        ["mount", "-T", str(fstab), str(mountpoint)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    try:
        assert result.returncode == 0, result.stderr
        assert is_mounted(mountpoint)
        with open("/proc/self/mounts") as mounts:
            [mounted] = [entry for entry in mounts if entry.split()[1] == str(mountpoint)]
        assert mounted.split()[0] == "volfs"
        assert shutil.disk_usage(mountpoint).total == size
        assert stat.S_IMODE(mountpoint.stat().st_mode) == mode
        (mountpoint / "f").write_bytes(b"from fstab")
        assert (mountpoint / "f").read_bytes() == b"from fstab"
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
        if is_mounted(mountpoint):
            force_unmount(mountpoint)
    assert not is_mounted(mountpoint)
