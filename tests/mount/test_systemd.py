"""volfs under systemd and fstab: the shipped units, sd_notify, and an fstab line via mount(8).

This machine need not run systemd: the units are checked with ``systemd-analyze verify`` and
``systemd-analyze security`` where it is installed, and the service's command lines are run the
way systemd would run them: ``%f``, ``%i``, ``${VOLFS_OPTIONS}`` and ``$$`` expanded, with the
environment systemd gives each (``$NOTIFY_SOCKET`` pointing at a socket the test owns,
``$RUNTIME_DIRECTORY``, ``$SERVICE_RESULT`` and ``$EXIT_STATUS`` for ExecStopPost), and where
it can under the unit's confinement: its capability bounding set and no_new_privs (setpriv),
and its system call filter, MemoryDenyWriteExecute=, RestrictAddressFamilies= and UMask=
(a seccomp filter built with libseccomp from ``systemd-analyze syscall-filter``'s sets, which
kills a process at its first call outside them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import json
import mmap
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import MOUNT_TIMEOUT, REPO_ROOT, Mount, force_unmount, is_mounted, wait_for
from volfs.client import SegmentTable, purge, statistics
from volfs.daemon.logs import escaped_mountpoint

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


def exec_command(line: str, mountpoint: Path, env: dict[str, str]) -> list[str]:
    """An Exec line of the service as systemd runs it for the instance of ``mountpoint``.

    Its prefixes dropped; specifiers (``%f`` the mountpoint, ``%i`` the instance, ``%%``) in
    the text; split into words as systemd unquotes them; then ``${NAME}`` within a word,
    ``$NAME`` as a word of its own (split at whitespace) and ``$$`` (a ``$``) from ``env``.
    The installed ``volfs`` is replaced by this checkout's.
    """
    specifiers = {"f": str(mountpoint), "i": escaped_mountpoint(str(mountpoint)), "%": "%"}
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


# -- the unit's confinement ---------------------------------------------------------------------

#: libseccomp's actions and comparison (seccomp.h).
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
#: shmat()'s flag for an executable attachment (linux/shm.h).
SHM_EXEC = 0o100000


class ScmpArgCmp(ctypes.Structure):
    """libseccomp's ``struct scmp_arg_cmp``: an argument, an operator, two operands."""

    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


@functools.cache
def syscall_groups() -> dict[str, list[str]]:
    """``systemd-analyze syscall-filter``: each ``@group`` and what it lists (groups, calls)."""
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    for line in listing.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#"):
            members.append(line.strip())
    return groups


def expand_syscalls(names: Sequence[str]) -> set[str]:
    """The system calls that ``names`` (calls and ``@groups``) stand for."""
    calls: set[str] = set()
    for name in names:
        if name.startswith("@"):
            calls |= expand_syscalls(syscall_groups()[name])
        else:
            calls.add(name)
    return calls


def unit_allowed_syscalls() -> list[str]:
    """What the unit's SystemCallFilter= lines allow: the first an allow list, then ``~`` lists
    taking calls out of it."""
    [allowed, *denied] = unit_settings(SERVICE)["SystemCallFilter"]
    assert not allowed.startswith("~"), "the first SystemCallFilter= is the allow list"
    calls = expand_syscalls(allowed.split())
    for entry in denied:
        assert entry.startswith("~"), entry
        calls -= expand_syscalls(entry[1:].split())
    return sorted(calls)


def confine_and_exec(argv: list[str]) -> None:
    """Load a seccomp filter as the unit's settings make systemd load one, then exec.

    ``argv``: a JSON object (``allowed``: system calls; ``mdwe``: MemoryDenyWriteExecute=;
    ``families``: RestrictAddressFamilies= as numbers; ``umask``), then the command. Any other
    call kills the process (SIGSYS), where systemd would fail it with EPERM: the point is to
    see every call made, not only those that would matter.
    """
    config, command = json.loads(argv[0]), argv[1:]
    library = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    library.seccomp_init.restype = ctypes.c_void_p
    library.seccomp_init.argtypes = [ctypes.c_uint32]
    library.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    library.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ScmpArgCmp),
    ]
    library.seccomp_load.argtypes = [ctypes.c_void_p]
    write_exec = mmap.PROT_WRITE | mmap.PROT_EXEC
    # Calls allowed only with some arguments: each list is one rule's conditions.
    conditional: dict[str, list[list[tuple[int, int, int, int]]]] = {
        "socket": [[(0, SCMP_CMP_EQ, family, 0)] for family in config["families"]],
    }
    if config["mdwe"]:  # no mapping both writable and executable, now or later
        conditional["mmap"] = [
            [(2, SCMP_CMP_MASKED_EQ, write_exec, prot)]
            for prot in (0, mmap.PROT_WRITE, mmap.PROT_EXEC)
        ]
        for name in ("mprotect", "pkey_mprotect"):
            conditional[name] = [[(2, SCMP_CMP_MASKED_EQ, mmap.PROT_EXEC, 0)]]
        conditional["shmat"] = [[(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, 0)]]
    context = library.seccomp_init(SCMP_ACT_KILL_PROCESS)
    for name in config["allowed"]:
        number = library.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            continue  # not a call of this architecture
        for conditions in conditional.get(name, [[]]):
            array = (ScmpArgCmp * len(conditions))(*(ScmpArgCmp(*c) for c in conditions))
            result = library.seccomp_rule_add_array(
                context, SCMP_ACT_ALLOW, number, len(conditions), array
            )
            assert result == 0, f"seccomp_rule_add({name}): {-result}"
    assert library.seccomp_load(context) == 0, "seccomp_load failed"
    os.umask(config["umask"])
    os.execvp(command[0], command)


def unit_confinement() -> list[str]:
    """The command prefix that confines what follows as the unit confines its commands.

    Skips the test where that cannot be done: not root, or no setpriv, systemd-analyze or
    libseccomp.
    """
    if os.geteuid() != 0:
        pytest.skip("the service runs as root")
    for command in ("setpriv", "systemd-analyze"):
        if shutil.which(command) is None:
            pytest.skip(f"{command} is missing")
    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp is missing")
    settings = unit_settings(SERVICE)
    [capabilities] = settings["CapabilityBoundingSet"]
    assert settings["NoNewPrivileges"] == ["yes"]
    bounding = ",".join(["-all"] + [f"+{name[4:].lower()}" for name in capabilities.split()])
    [families] = settings["RestrictAddressFamilies"]
    config = {
        "allowed": unit_allowed_syscalls(),
        "mdwe": settings["MemoryDenyWriteExecute"] == ["yes"],
        "families": [getattr(socket, family) for family in families.split()],
        "umask": int(settings["UMask"][0], 8),
    }
    launcher = (
        f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); "
        "from tests.mount.test_systemd import confine_and_exec; confine_and_exec(sys.argv[1:])"
    )
    return [
        "setpriv",
        f"--bounding-set={bounding}",
        "--inh-caps=-all",
        "--no-new-privs",
        sys.executable,
        "-c",
        launcher,
        json.dumps(config),
    ]


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
        path = self.tmp_path / "run" / name.replace("%i", escaped_mountpoint(str(self.mountpoint)))
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


def start_service(tmp_path: Path, mountpoint: Path, env: dict[str, str]) -> Mount:
    """Run the unit's ExecStartPre, then start its ExecStart (without waiting for the mount)."""
    unit = ServiceRun(tmp_path, mountpoint, [])
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
        # volfs's escaping (log names, and %i here) agrees, also where it has to escape.
        awkward = "/mnt/my-vol.d/.x y/\u00e9"
        systemds = subprocess.run(
            ["systemd-escape", "--path", awkward], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert escaped_mountpoint(awkward) == systemds


#: Settings that give the service a mount namespace of its own, where its mount would stay.
MOUNT_NAMESPACE_SETTINGS = (
    "PrivateDevices",
    "PrivateTmp",
    "PrivateMounts",
    "PrivateNetwork",  # newer systemd gives it a mount namespace too
    "ProtectSystem",
    "ProtectHome",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "InaccessiblePaths",
    "TemporaryFileSystem",
    "BindPaths",
    "RootDirectory",
    "RootImage",
)

#: What ``systemd-analyze security`` still flags in the unit, and why the unit cannot take it.
CANNOT_TAKE = {
    "User=/DynamicUser=": "mount(2) needs root",
    "CapabilityBoundingSet=~CAP_SYS_ADMIN": "mount(2) needs it",
    "SystemCallFilter=~@mount": "mount(2) and umount2(2)",
    "PrivateUsers=": "CAP_SYS_ADMIN must be the host's",
    "PrivateNetwork=": "the segment handover's abstract socket is in the host's network namespace",
    "RestrictAddressFamilies=~AF_UNIX": "sd_notify and the segment handover",
    "DeviceAllow=": "/dev/fuse (and ProtectClock='s char-rtc r)",
    **{
        f"{name}=": "a mount namespace would hide the mount"
        for name in MOUNT_NAMESPACE_SETTINGS
        if name != "PrivateNetwork"
    },
    "RootDirectory=/RootImage=": "a mount namespace would hide the mount",
}


def test_hardening_keeps_the_mount_on_the_host() -> None:
    settings = unit_settings(SERVICE)
    assert not set(MOUNT_NAMESPACE_SETTINGS) & set(settings)
    assert "PrivateUsers" not in settings
    for key, value in {
        "CapabilityBoundingSet": "CAP_SYS_ADMIN",
        "NoNewPrivileges": "yes",
        "DevicePolicy": "closed",
        "DeviceAllow": "/dev/fuse rw",
        "RestrictAddressFamilies": "AF_UNIX",
        "IPAddressDeny": "any",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "MemoryDenyWriteExecute": "yes",
        "UMask": "0077",
        "SystemCallArchitectures": "native",
        "SystemCallErrorNumber": "EPERM",
    }.items():
        assert settings[key] == [value], key
    assert settings["SystemCallFilter"] == ["@system-service @mount", "~@privileged @resources"]
    # What the unit's own mount needs mounted, and that consumers can order after it.
    assert settings["RequiresMountsFor"] == ["%f /usr/local/lib/volfs"]
    assert settings["Before"] == ["remote-fs.target"]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (scripts/setup.sh installs it where it can)",
)
def test_systemd_analyze_security_flags_only_what_the_unit_cannot_take(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None
    if systemd_version(analyze) < 250:
        pytest.skip("systemd-analyze security --offline needs systemd 250")
    (tmp_path / SERVICE.name).write_text(
        SERVICE.read_text().replace(INSTALLED_VOLFS, str(VENV_BIN / "volfs"))
    )
    (tmp_path / "volfs@mnt-vol.service").symlink_to(SERVICE.name)
    result = subprocess.run(
        [analyze, "security", "--offline=true", str(tmp_path / "volfs@mnt-vol.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    flagged = set(re.findall(r"^✗ (\S+)", result.stdout, re.MULTILINE))
    assert flagged <= set(CANNOT_TAKE), f"flagged, and maybe possible: {flagged - set(CANNOT_TAKE)}"
    # 5.3 before the unit took ProtectClock=, ProtectHostname=, IPAddressDeny=, UMask=,
    # MemoryDenyWriteExecute= and a system call filter and gave up CAP_SYS_RESOURCE; 3.4
    # after, with systemd 252.
    overall = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert overall is not None, result.stdout
    assert float(overall[1]) <= 3.5, result.stdout


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


def exercise(mountpoint: Path, pressure: Path) -> None:
    """Use a freshly mounted volfs the ways a daemon's system calls depend on.

    Files, mmap, fallocate, marking and purging (vrangectl), a segment table fetched over the
    daemon's socket and a pin that finds its segment purged, a purge on a pressure event (a
    byte into the FIFO the daemon watches), and a file's mode under the caller's umask.
    """
    path = mountpoint / "dir" / "f"
    made = subprocess.run(
        [
            "sh",
            "-c",
            'umask 022 && mkdir "$1" && head -c 1048576 /dev/zero >"$1/f"',
            "sh",
            str(path.parent),
        ],
        check=False,
    )
    assert made.returncode == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # the caller's umask, not the daemon's
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, MiB) as mapped:
            mapped[:5] = b"hello"
            mapped.flush()
        assert os.pread(fd, 5, 0) == b"hello"
        os.posix_fallocate(fd, 0, 2 * MiB)
        punched = subprocess.run(
            ["fallocate", "-p", "-o", "0", "-l", "64K", str(path)], check=False
        )
        assert punched.returncode == 0
        marked = subprocess.run(
            [VENV_BIN / "vrangectl", "volatile", f"/dev/fd/{fd}", "1M", "1M"],
            pass_fds=[fd],
            capture_output=True,
            text=True,
            check=True,
        )
        assert marked.stdout == "marked=1048576 purged=0\n"
        purged = subprocess.run(
            [VENV_BIN / "vrangectl", "purge", str(mountpoint)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert purged.stdout == "purged=1048576\n"
        with SegmentTable(fd, 4) as table:
            segment = table.register(256 * 1024, 64 * 1024)
            segment.unpin()
            assert purge(mountpoint) == 64 * 1024
            assert segment.pin()  # it was purged while unpinned
            segment.unpin()
            # A pressure event purges what is volatile.
            writer = os.open(pressure, os.O_WRONLY | os.O_NONBLOCK)
            try:
                os.write(writer, b"\n")
            finally:
                os.close(writer)
            wait_for(
                lambda: statistics(mountpoint)["purges_pressure"] > 0,
                MOUNT_TIMEOUT,
                "a purge on the pressure event",
            )
            segment.pin()
    finally:
        os.close(fd)
    os.rename(path, mountpoint / "g")
    os.truncate(mountpoint / "g", 100)
    os.setxattr(mountpoint / "g", "user.kept", b"yes")
    assert os.getxattr(mountpoint / "g", "user.kept") == b"yes"
    os.rmdir(mountpoint / "dir")
    os.unlink(mountpoint / "g")


@pytest.mark.root
def test_the_service_works_confined_as_the_unit_confines_it(tmp_path: Path) -> None:
    """ExecStartPre, ExecStart, ExecStartPost and ExecStopPost under the unit's capability
    bounding set, no_new_privs, system call filter, MemoryDenyWriteExecute=,
    RestrictAddressFamilies= and UMask=; any call outside the filter would kill them."""
    unit = ServiceRun(tmp_path, tmp_path / "mnt" / "vol", unit_confinement())
    pressure = tmp_path / "pressure"
    os.mkfifo(pressure)
    listener, address = bind_notify_socket(tmp_path, "abstract")
    with listener:
        unit.run("ExecStartPre")
        env = {"NOTIFY_SOCKET": address, "MEMORY_PRESSURE_WATCH": str(pressure)}
        mount = unit.start("size=32M", env)
        try:
            assert "READY=1" in receive(listener, mount, "READY=1")
            status = Path(f"/proc/{mount.pid}/status").read_text()
            assert re.search(r"^NoNewPrivs:\s+1$", status, re.MULTILINE)
            assert re.search(r"^Seccomp:\s+2$", status, re.MULTILINE)  # a filter is loaded
            unit.run("ExecStartPost", MAINPID=str(mount.pid))
            assert statistics(unit.mountpoint)["capacity_bytes"] == 32 * MiB
            exercise(unit.mountpoint, pressure)
            mount.process.send_signal(signal.SIGTERM)  # the daemon unmounts itself
            assert receive(listener, mount, "STOPPING=1") == ["STOPPING=1"]
            assert mount.process.wait(timeout=MOUNT_TIMEOUT) == 0, mount.log()
        finally:
            mount.unmount(report_exit=False)
    unit.run("ExecStopPost", SERVICE_RESULT="success", EXIT_CODE="exited", EXIT_STATUS="0")
    assert not is_mounted(unit.mountpoint)
    assert "Traceback" not in mount.log()


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
