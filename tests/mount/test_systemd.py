"""volfs under systemd and fstab: the shipped units, sd_notify, and an fstab line via mount(8).

This machine need not run systemd: the units are checked with ``systemd-analyze verify`` where
it is installed, and the service is run the way systemd would run it (its ExecStartPre and
ExecStart with ``%f`` and ``${VOLFS_OPTIONS}`` filled in, ``$NOTIFY_SOCKET`` pointing at a
socket the test owns, its capability bounding set applied with setpriv).
"""

from __future__ import annotations

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


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, values in file order (sections merged)."""
    settings: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def service_command(key: str, mountpoint: Path, options: str) -> list[str]:
    """The unit's ``key`` (ExecStart, ExecStartPre) as systemd would run it for ``mountpoint``.

    ``%f`` is the unescaped instance with its leading slash, i.e. the mountpoint itself; the
    installed ``volfs`` is replaced by this checkout's.
    """
    [line] = unit_settings(SERVICE)[key]
    argv = [
        word.replace("%f", str(mountpoint)).replace("${VOLFS_OPTIONS}", options)
        for word in shlex.split(line)
    ]
    if argv[0] == INSTALLED_VOLFS:
        argv[:1] = [sys.executable, "-m", "volfs"]
    return argv


def start_service(
    tmp_path: Path, mountpoint: Path, env: dict[str, str], prefix: list[str] | None = None
) -> Mount:
    """Run the unit's ExecStartPre, then start its ExecStart (without waiting for the mount)."""
    subprocess.run(service_command("ExecStartPre", mountpoint, ""), check=True)
    log_path = tmp_path / "service.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [*(prefix or []), *service_command("ExecStart", mountpoint, "size=32M")],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    return Mount(mountpoint, process, log_path)


@pytest.fixture
def services() -> Iterator[list[Mount]]:
    """Daemons a test started; each is stopped and reaped afterwards, whatever happened."""
    started: list[Mount] = []
    yield started
    for mount in started:
        mount.unmount(report_exit=False)


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


# -- the installed commands ---------------------------------------------------------------------

#: root's default PATH (Debian's login.defs and systemd's): what mount(8) helpers, fstab and
#: units find commands on.
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Where scripts/setup.sh installs volfs for every user; /usr/local/bin links into it.
INSTALL_DIR = Path("/usr/local/lib/volfs")


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
