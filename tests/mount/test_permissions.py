"""Permissions and isolation as ordinary users see them, side by side with a kernel tmpfs.

Each scenario is set up by root on a volfs mounted with ``allow_other`` and on a tmpfs, then
run by forked children that drop to unprivileged uids (``setgroups``/``setgid``/``setuid``)
and report what each call did (``"ok"`` or the errno's name) through a pipe. volfs must give
exactly what tmpfs gives, and both what the mode bits say.

Mountpoints live in a directory of their own under /tmp that every user may traverse (pytest's
own temporary directories are private to root), so an EACCES seen by a user comes from the
mount itself and not from a directory on the way to it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import volfs_mounts

from tests.conftest import MOUNT_TIMEOUT, Mount, is_mounted, start_volfs, stop_volfs, wait_for
from tests.mount.test_segments import segment_token
from volfs import client as volfs_client
from volfs.abi import SEGMENT_PURGED
from volfs.client import (
    VRANGE_NONVOLATILE,
    VRANGE_VOLATILE,
    Segment,
    SegmentTable,
    fvrange,
    purge,
    vrange_status,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: other uids, tmpfs, allow_other"),
]

PAGE = 4096
_T = TypeVar("_T")

#: A group alice and bob share as a supplementary group, and dave as his primary one.
SHARED_GID = 41000


@dataclass(frozen=True, slots=True)
class User:
    """Credentials a child process takes before it acts."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def in_group(self, gid: int) -> bool:
        """True if ``gid`` is this user's primary or a supplementary group."""
        return gid == self.gid or gid in self.groups


ROOT = User("root", 0, 0)
ALICE = User("alice", 41001, 41001, (SHARED_GID,))
BOB = User("bob", 41002, 41002, (SHARED_GID,))
CAROL = User("carol", 41003, 41003)
DAVE = User("dave", 41004, SHARED_GID)
USERS = (ROOT, ALICE, BOB, CAROL, DAVE)


def attempt(call: Callable[[], object]) -> str:
    """``"ok"`` if the call succeeds, else the name of its errno: comparable across mounts."""
    try:
        call()
    except OSError as error:
        return errno.errorcode.get(error.errno or 0, str(error.errno))
    return "ok"


def run_as(user: User, action: Callable[[], _T]) -> _T:
    """Run ``action`` in a child process with ``user``'s credentials and return its result.

    The child sets umask 0 so that modes are exactly what the calls ask for.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(read_end)
            try:
                os.umask(0)
                if user.uid:
                    os.setgroups(list(user.groups))
                    os.setgid(user.gid)
                    os.setuid(user.uid)
                payload = pickle.dumps(("result", action()))
                status = 0
            except BaseException:
                payload = pickle.dumps(("failure", traceback.format_exc()))
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(payload)
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    _pid, wait_status = os.waitpid(pid, 0)
    assert payload, f"{user.name}'s process died: wait status {wait_status:#x}"
    kind, value = pickle.loads(payload)
    if kind == "failure":
        pytest.fail(f"{user.name}'s process failed:\n{value}")
    assert os.waitstatus_to_exitcode(wait_status) == 0
    return value  # type: ignore[no-any-return]


def write_some(path: Path, data: bytes = b"x") -> None:
    """Open for writing without truncating and write ``data`` at the start."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


O_TRUNCATE = os.O_WRONLY | os.O_TRUNC


def with_descriptor(path: Path, call: Callable[..., object], *args: int) -> None:
    """``call(fd, *args)`` on a descriptor of ``path`` open for writing."""
    fd = os.open(path, os.O_WRONLY)
    try:
        call(fd, *args)
    finally:
        os.close(fd)


def append_some(path: Path) -> None:
    """Append a byte through O_APPEND."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"+")
    finally:
        os.close(fd)


def open_close(path: Path, flags: int) -> None:
    """Open ``path`` with ``flags`` and close it again."""
    os.close(os.open(path, flags, 0o644))


def execute(path: Path) -> None:
    """Run ``path`` and require exit status 0 (exec errors raise OSError)."""
    pid = os.posix_spawn(path, [str(path)], {})
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def mode_of(path: Path) -> str:
    """The permission bits of ``path`` in octal, special bits included."""
    return f"{stat.S_IMODE(os.lstat(path).st_mode):04o}"


# -- mounts -----------------------------------------------------------------------------------


@dataclass
class Mounts:
    """volfs and tmpfs mounts under a directory every user may traverse."""

    base: Path
    logs: Path
    volfs_mounts: list[Mount] = field(default_factory=list)
    tmpfs_mounts: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def volfs(
        self, name: str = "volfs", options: str = "size=64M,allow_other", owner: User = ROOT
    ) -> Path:
        """Mount a volfs; ``owner`` other than root mounts it as that user would."""
        path = self.base / name
        if owner is ROOT:
            mount = start_volfs(path, options, self.logs / f"{name}.log")
        else:
            mount = start_volfs_as(owner, path, options, self.logs / f"{name}.log")
        self.volfs_mounts.append(mount)
        return path

    def tmpfs(self, name: str = "tmpfs", options: str = "size=64M") -> Path:
        """Mount a kernel tmpfs."""
        return self.tmpfs_mounts.enter_context(
            volfs_mounts.tmpfs(self.base / name, options=options)
        )

    def both(self, volfs_options: str = "size=64M,allow_other") -> dict[str, Path]:
        """A volfs and a tmpfs with the same tmpfs-style options."""
        tmpfs_options = ",".join(
            item for item in volfs_options.split(",") if item not in ("allow_other", "pressure=off")
        )
        return {
            "volfs": self.volfs(options=volfs_options),
            "tmpfs": self.tmpfs(options=tmpfs_options),
        }


def start_volfs_as(owner: User, path: Path, options: str, log_path: Path) -> Mount:
    """Start a volfs daemon whose real ids are ``owner``'s: the mount belongs to that user.

    The interpreter lives under /root, which ordinary users cannot read, so the daemon keeps
    an effective uid of 0; libfuse and the kernel take the mount's owner from the real ids
    (``user_id=``/``group_id=``), and volfs its own idea of "the user who mounted it".
    """
    path.mkdir()
    os.chown(path, owner.uid, owner.gid)

    def become_owner() -> None:
        os.setgroups(list(owner.groups))
        os.setresgid(owner.gid, 0, 0)
        os.setresuid(owner.uid, 0, 0)

    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "volfs", "-f", "-o", options, str(path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=become_owner,  # noqa: PLW1509 - ids must change between fork and exec
        )
    mount = Mount(path, process, log_path)

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"volfs exited with {process.returncode} before mounting:\n{mount.log()}")
        return is_mounted(path)

    wait_for(ready, MOUNT_TIMEOUT, f"volfs to mount {path}")
    return mount


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    """Mount factories; teardown unmounts all and checks each daemon exited 0 quietly."""
    base = Path(tempfile.mkdtemp(prefix="volfs-permissions-", dir="/tmp"))
    base.chmod(0o755)
    created = Mounts(base, tmp_path)
    failures = []
    try:
        yield created
    finally:
        created.tmpfs_mounts.close()
        for mount in created.volfs_mounts:
            was_running = mount.process.poll() is None
            status = stop_volfs(mount)
            if was_running and status != 0:
                failures.append(f"{mount.path}: daemon exit status {status}\n{mount.log()}")
            elif "Traceback" in mount.log():
                failures.append(f"{mount.path}: the daemon logged an exception\n{mount.log()}")
        shutil.rmtree(base, ignore_errors=True)
    if failures:
        pytest.fail("\n".join(failures))


def on_both(roots: dict[str, Path], scenario: Callable[[Path], _T]) -> dict[str, _T]:
    """Run ``scenario`` on every mount: same calls, comparable results."""
    return {name: scenario(root) for name, root in roots.items()}


def assert_same(results: dict[str, _T]) -> _T:
    """volfs gave what tmpfs gave; return that."""
    assert results["volfs"] == results["tmpfs"], results
    return results["volfs"]


# -- the access model -------------------------------------------------------------------------

READ, WRITE, EXECUTE = 4, 2, 1


def permitted(user: User, mode: int, uid: int, gid: int, want: int, *, directory: bool) -> bool:
    """What the mode bits grant ``user`` (one class only: owner, else group, else other)."""
    if user.uid == 0:
        # CAP_DAC_OVERRIDE: everything, except running a file nobody may execute.
        return want != EXECUTE or directory or bool(mode & 0o111)
    if user.uid == uid:
        bits = mode >> 6
    elif user.in_group(gid):
        bits = mode >> 3
    else:
        bits = mode
    return bool(bits & want)


FILE_MODES = (
    0o000, 0o400, 0o200, 0o100, 0o040, 0o020, 0o010, 0o004, 0o002, 0o001,
    0o070, 0o007, 0o604, 0o460, 0o046, 0o755,
)  # fmt: skip
DIRECTORY_MODES = (
    0o000, 0o700, 0o500, 0o300, 0o100, 0o400, 0o070, 0o050, 0o030, 0o005, 0o003, 0o001,
    0o707, 0o777,
)  # fmt: skip


def test_file_access_follows_the_mode_bits_for_owner_group_and_others(mounts: Mounts) -> None:
    roots = mounts.both()

    def prepare(root: Path) -> None:
        files = root / "files"
        files.mkdir(mode=0o755)
        for mode in FILE_MODES:
            path = files / f"{mode:04o}"
            shutil.copyfile("/bin/true", path)
            os.chown(path, ALICE.uid, SHARED_GID)
            os.chmod(path, mode)

    def probe(files: Path) -> dict[str, str]:
        results = {}
        for mode in FILE_MODES:
            path = files / f"{mode:04o}"
            results[f"{mode:04o} read"] = attempt(lambda p=path: open_close(p, os.O_RDONLY))
            results[f"{mode:04o} write"] = attempt(lambda p=path: open_close(p, os.O_WRONLY))
            results[f"{mode:04o} exec"] = attempt(lambda p=path: execute(p))
        return results

    on_both(roots, prepare)
    for user in USERS:
        seen = assert_same(
            on_both(roots, lambda root, u=user: run_as(u, lambda: probe(root / "files")))
        )
        for mode in FILE_MODES:
            for name, want in (("read", READ), ("write", WRITE), ("exec", EXECUTE)):
                allowed = permitted(user, mode, ALICE.uid, SHARED_GID, want, directory=False)
                assert seen[f"{mode:04o} {name}"] == ("ok" if allowed else "EACCES"), (
                    user.name,
                    f"{mode:04o}",
                    name,
                )


def test_directory_access_follows_the_mode_bits(mounts: Mounts) -> None:
    roots = mounts.both()

    def prepare(root: Path) -> None:
        for mode in DIRECTORY_MODES:
            directory = root / f"d{mode:04o}"
            directory.mkdir()
            (directory / "inner").write_bytes(b"inner")
            for user in USERS:
                (directory / f"victim-{user.name}").write_bytes(b"")
            os.chown(directory, ALICE.uid, SHARED_GID)
            os.chmod(directory, mode)

    def probe(root: Path, user: User) -> dict[str, str]:
        results = {}
        for mode in DIRECTORY_MODES:
            directory = root / f"d{mode:04o}"
            new = directory / f"new-{user.name}"
            victim = directory / f"victim-{user.name}"
            results[f"{mode:04o} list"] = attempt(lambda d=directory: os.listdir(d))
            results[f"{mode:04o} lookup"] = attempt(lambda d=directory: os.stat(d / "inner"))
            results[f"{mode:04o} create"] = attempt(
                lambda p=new: open_close(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            )
            results[f"{mode:04o} mkdir"] = attempt(
                lambda d=directory: os.mkdir(d / f"m-{user.uid}")
            )
            results[f"{mode:04o} unlink"] = attempt(lambda p=victim: os.unlink(p))
        return results

    on_both(roots, prepare)
    for user in USERS:
        seen = assert_same(on_both(roots, lambda root, u=user: run_as(u, lambda: probe(root, u))))
        for mode in DIRECTORY_MODES:

            def may(want: int, m: int = mode, u: User = user) -> str:
                granted = all(
                    permitted(u, m, ALICE.uid, SHARED_GID, bit, directory=True)
                    for bit in (READ, WRITE, EXECUTE)
                    if want & bit
                )
                return "ok" if granted else "EACCES"

            expected = {
                "list": may(READ),
                "lookup": may(EXECUTE),
                "create": may(WRITE | EXECUTE),
                "mkdir": may(WRITE | EXECUTE),
                "unlink": may(WRITE | EXECUTE),
            }
            for name, outcome in expected.items():
                assert seen[f"{mode:04o} {name}"] == outcome, (user.name, f"{mode:04o}", name)


def test_sticky_directory_protects_other_users_entries(mounts: Mounts) -> None:
    roots = mounts.both()

    def scenario(root: Path) -> dict[str, str]:
        sticky = root / "tmp"
        sticky.mkdir()
        os.chmod(sticky, 0o1777)
        owned = root / "carols"  # sticky, but owned by carol: she may remove anything in it
        owned.mkdir()
        os.chown(owned, CAROL.uid, CAROL.gid)
        os.chmod(owned, 0o1777)
        plain = root / "plain"
        plain.mkdir()
        os.chmod(plain, 0o777)
        for directory in (sticky, owned, plain):
            for user in (ALICE, BOB):
                run_as(
                    user,
                    lambda d=directory, u=user: open_close(d / u.name, os.O_CREAT | os.O_WRONLY),
                )
                run_as(user, lambda d=directory, u=user: os.mkdir(d / f"{u.name}.d"))
        results = {}
        for directory in (sticky, owned, plain):
            tag = directory.name
            # Bob against alice's entries.
            results[f"{tag}: bob unlinks alice's"] = run_as(
                BOB, lambda d=directory: attempt(lambda: os.unlink(d / "alice"))
            )
            results[f"{tag}: bob renames alice's away"] = run_as(
                BOB, lambda d=directory: attempt(lambda: os.rename(d / "alice.d", d / "moved.d"))
            )
            results[f"{tag}: bob renames over alice's"] = run_as(
                BOB, lambda d=directory: attempt(lambda: os.rename(d / "bob", d / "alice"))
            )
            results[f"{tag}: bob removes alice's dir"] = run_as(
                BOB, lambda d=directory: attempt(lambda: os.rmdir(d / "alice.d"))
            )
            results[f"{tag}: bob writes alice's"] = run_as(
                BOB, lambda d=directory: attempt(lambda: write_some(d / "alice"))
            )
            results[f"{tag}: carol unlinks bob's"] = run_as(
                CAROL, lambda d=directory: attempt(lambda: os.unlink(d / "bob"))
            )
            results[f"{tag}: alice unlinks her own"] = run_as(
                ALICE, lambda d=directory: attempt(lambda: os.unlink(d / "alice"))
            )
            results[f"{tag}: root removes bob's dir"] = attempt(
                lambda d=directory: os.rmdir(d / "bob.d")
            )
        results["entries left"] = ",".join(
            f"{d}/{name}"
            for d in ("tmp", "carols", "plain")
            for name in sorted(os.listdir(root / d))
        )
        return results

    seen = assert_same(on_both(roots, scenario))
    assert seen["tmp: bob unlinks alice's"] == "EPERM"
    assert seen["tmp: bob renames alice's away"] == "EPERM"
    assert seen["tmp: bob renames over alice's"] == "EPERM"
    assert seen["tmp: bob removes alice's dir"] == "EPERM"
    assert seen["tmp: bob writes alice's"] == "EACCES"  # 0644: the sticky bit adds nothing
    assert seen["tmp: carol unlinks bob's"] == "EPERM"
    assert seen["tmp: alice unlinks her own"] == "ok"
    assert seen["tmp: root removes bob's dir"] == "ok"
    assert seen["carols: carol unlinks bob's"] == "ok"  # the directory's owner may
    assert seen["carols: bob unlinks alice's"] == "EPERM"
    # Without the sticky bit, write permission on the directory is all it takes.
    assert seen["plain: bob unlinks alice's"] == "ok"
    assert seen["plain: bob renames alice's away"] == "ok"


def test_setuid_and_setgid_bits_are_cleared_on_write_by_others(mounts: Mounts) -> None:
    roots = mounts.both()

    def fresh(root: Path, name: str, mode: int, gid: int = SHARED_GID) -> Path:
        path = root / name
        path.write_bytes(b"#" * 100)
        os.chown(path, ALICE.uid, gid)
        os.chmod(path, mode)
        return path

    def scenario(root: Path) -> dict[str, tuple[str, str]]:
        results: dict[str, tuple[str, str]] = {}

        def record(name: str, user: User, path: Path, call: Callable[[], object]) -> None:
            outcome = run_as(user, lambda: attempt(call))
            results[name] = (outcome, mode_of(path))

        path = fresh(root, "bob-writes", 0o6777)
        record("bob writes", BOB, path, lambda: write_some(path))
        path = fresh(root, "alice-writes", 0o6777)
        record("owner writes", ALICE, path, lambda: write_some(path))
        path = fresh(root, "root-writes", 0o6777)
        record("root writes", ROOT, path, lambda: write_some(path))
        path = fresh(root, "bob-truncates", 0o6777)
        record("bob truncates", BOB, path, lambda: os.truncate(path, 10))
        path = fresh(root, "bob-appends", 0o6777)
        record("bob appends", BOB, path, lambda: append_some(path))
        # setgid without group execute marks mandatory locking, not privilege: kept.
        path = fresh(root, "sgid-no-gx", 0o2666)
        record("bob writes sgid without g+x", BOB, path, lambda: write_some(path))
        path = fresh(root, "chowned", 0o6755)
        record("root chowns", ROOT, path, lambda: os.chown(path, BOB.uid, -1))
        path = fresh(root, "carols-group", 0o0755, gid=CAROL.gid)
        record("owner sets g+s outside the group", ALICE, path, lambda: os.chmod(path, 0o2755))
        path = fresh(root, "own-group", 0o0755)
        record("owner sets g+s in the group", ALICE, path, lambda: os.chmod(path, 0o2755))
        return results

    seen = assert_same(on_both(roots, scenario))
    assert seen["bob writes"] == ("ok", "0777")
    assert seen["owner writes"] == ("ok", "0777")
    assert seen["root writes"] == ("ok", "6777")  # CAP_FSETID keeps them
    assert seen["bob truncates"] == ("ok", "0777")
    assert seen["bob writes sgid without g+x"] == ("ok", "2666")
    assert seen["root chowns"][1] == "0755"
    assert seen["owner sets g+s outside the group"] == ("ok", "0755")
    assert seen["owner sets g+s in the group"] == ("ok", "2755")


def test_setuid_and_setgid_are_cleared_by_every_kind_of_write_by_others(mounts: Mounts) -> None:
    """volfs removes the bits itself when the kernel asks (FUSE_HANDLE_KILLPRIV_V2): on an
    open with O_TRUNC, a truncation through a descriptor, fallocate, and again after the
    bits were set once more."""
    roots = mounts.both()

    def scenario(root: Path) -> dict[str, tuple[str, str]]:
        results: dict[str, tuple[str, str]] = {}

        def record(name: str, user: User, call: Callable[[Path], object]) -> None:
            path = root / name
            path.write_bytes(b"#" * 100)
            os.chown(path, ALICE.uid, SHARED_GID)
            os.chmod(path, 0o6777)
            outcome = run_as(user, lambda: attempt(lambda: call(path)))
            results[name] = (outcome, mode_of(path))

        record("bob opens with O_TRUNC", BOB, lambda p: os.close(os.open(p, O_TRUNCATE)))
        record("bob ftruncates", BOB, lambda p: with_descriptor(p, os.ftruncate, 10))
        record("bob fallocates", BOB, lambda p: with_descriptor(p, os.posix_fallocate, 0, 8192))
        record("root fallocates", ROOT, lambda p: with_descriptor(p, os.posix_fallocate, 0, 8192))
        # The first write leaves the kernel believing the file has nothing to remove; setting
        # the bits again must make the next write remove them again.
        record("bob writes", BOB, write_some)
        os.chmod(root / "bob writes", 0o6777)
        record_again = run_as(BOB, lambda: attempt(lambda: write_some(root / "bob writes")))
        results["bob writes after u+s again"] = (record_again, mode_of(root / "bob writes"))
        return results

    seen = assert_same(on_both(roots, scenario))
    assert seen == {
        "bob opens with O_TRUNC": ("ok", "0777"),
        "bob ftruncates": ("ok", "0777"),
        "bob fallocates": ("ok", "0777"),
        "root fallocates": ("ok", "6777"),
        "bob writes": ("ok", "0777"),
        "bob writes after u+s again": ("ok", "0777"),
    }


def test_a_setgid_directory_hands_down_its_group(mounts: Mounts) -> None:
    """A setgid directory hands its group down, and its bit to subdirectories.

    A creator outside that group does not get a setgid file.
    """
    roots = mounts.both()

    def scenario(root: Path) -> dict[str, tuple[str, str]]:
        results: dict[str, tuple[str, str]] = {}
        directory = root / "sgid-dir"
        directory.mkdir()
        os.chown(directory, 0, SHARED_GID)
        os.chmod(directory, 0o2777)
        run_as(CAROL, lambda: open_close(directory / "file", os.O_CREAT | os.O_WRONLY))
        run_as(CAROL, lambda: os.mkdir(directory / "sub", 0o755))
        run_as(ALICE, lambda: os.close(os.open(directory / "member", os.O_CREAT, 0o2755)))
        run_as(CAROL, lambda: os.close(os.open(directory / "outsider", os.O_CREAT, 0o2755)))
        for name in ("file", "sub", "member", "outsider"):
            info = os.stat(directory / name)
            results[f"in setgid dir: {name}"] = (str(info.st_gid), mode_of(directory / name))
        return results

    seen = assert_same(on_both(roots, scenario))
    assert seen["in setgid dir: file"] == (str(SHARED_GID), "0644")
    assert seen["in setgid dir: sub"] == (str(SHARED_GID), "2755")
    assert seen["in setgid dir: member"] == (str(SHARED_GID), "2755")
    assert seen["in setgid dir: outsider"] == (str(SHARED_GID), "0755")


def test_only_root_changes_owners_and_only_owners_change_modes(mounts: Mounts) -> None:
    roots = mounts.both()

    def scenario(root: Path) -> dict[str, tuple[str, tuple[int, int, str]]]:
        results: dict[str, tuple[str, tuple[int, int, str]]] = {}
        targets = {}
        for name, mode in (("private", 0o644), ("shared", 0o666)):
            path = root / name
            path.write_bytes(b"data")
            os.chown(path, ALICE.uid, ALICE.gid)
            os.chmod(path, mode)
            targets[name] = path

        def record(name: str, user: User, path: Path, call: Callable[[], object]) -> None:
            outcome = run_as(user, lambda: attempt(call))
            info = os.stat(path)
            results[name] = (outcome, (info.st_uid, info.st_gid, mode_of(path)))

        private, shared = targets["private"], targets["shared"]
        record("owner gives file away", ALICE, private, lambda: os.chown(private, BOB.uid, -1))
        record("owner keeps uid", ALICE, private, lambda: os.chown(private, ALICE.uid, -1))
        record(
            "owner to non-member group", ALICE, private, lambda: os.chown(private, -1, CAROL.gid)
        )
        record("owner to own group", ALICE, private, lambda: os.chown(private, -1, SHARED_GID))
        record("other takes file", BOB, private, lambda: os.chown(private, BOB.uid, -1))
        record("other chmods", BOB, shared, lambda: os.chmod(shared, 0o777))
        record("owner chmods", ALICE, private, lambda: os.chmod(private, 0o600))
        record("other sets times", BOB, shared, lambda: os.utime(shared, (1, 1)))
        record("writer touches", BOB, shared, lambda: os.utime(shared))
        record("non-writer touches", CAROL, private, lambda: os.utime(private))
        record("other sets user xattr", BOB, private, lambda: os.setxattr(private, "user.k", b"v"))
        record(
            "owner sets trusted xattr",
            ALICE,
            private,
            lambda: os.setxattr(private, "trusted.k", b"v"),
        )
        record(
            "owner sets security xattr",
            ALICE,
            private,
            lambda: os.setxattr(private, "security.k", b"v"),
        )
        record("root gives file away", ROOT, private, lambda: os.chown(private, BOB.uid, BOB.gid))
        record("other links", CAROL, shared, lambda: os.link(shared, root / "carols-link"))
        return results

    seen = assert_same(on_both(roots, scenario))
    assert seen["owner gives file away"][0] == "EPERM"
    assert seen["owner keeps uid"][0] == "ok"
    assert seen["owner to non-member group"][0] == "EPERM"
    assert seen["owner to own group"] == ("ok", (ALICE.uid, SHARED_GID, "0644"))
    assert seen["other takes file"][0] == "EPERM"
    assert seen["other chmods"] == ("EPERM", (ALICE.uid, ALICE.gid, "0666"))
    assert seen["owner chmods"][0] == "ok"
    assert seen["other sets times"][0] == "EPERM"
    assert seen["writer touches"][0] == "ok"
    assert seen["non-writer touches"][0] == "EACCES"
    assert seen["other sets user xattr"][0] in ("EACCES", "EPERM")
    assert seen["owner sets trusted xattr"][0] == "EPERM"  # CAP_SYS_ADMIN only
    assert seen["root gives file away"] == ("ok", (BOB.uid, BOB.gid, "0600"))


@pytest.mark.parametrize(
    "options", ["uid=41001,gid=41000,mode=0750", "mode=1777", "mode=0", "uid=41003,mode=700"]
)
def test_root_directory_takes_uid_gid_and_mode_options(mounts: Mounts, options: str) -> None:
    roots = mounts.both(f"size=16M,allow_other,{options}")

    def scenario(root: Path) -> dict[str, object]:
        info = os.stat(root)
        results: dict[str, object] = {"root": (info.st_uid, info.st_gid, mode_of(root))}
        for user in (ALICE, BOB, CAROL):
            results[f"{user.name} lists"] = run_as(user, lambda: attempt(lambda: os.listdir(root)))
            results[f"{user.name} creates"] = run_as(
                user, lambda u=user: attempt(lambda: os.mkdir(root / u.name, 0o777))
            )
        # mode= is for the root only: a new directory gets what mkdir asked for.
        os.mkdir(root / "sub", 0o711)
        results["sub"] = mode_of(root / "sub")
        return results

    seen = assert_same(on_both(roots, scenario))
    fields = dict(item.split("=") for item in options.split(","))
    mode = int(fields["mode"], 8)
    uid, gid = int(fields.get("uid", 0)), int(fields.get("gid", 0))
    assert seen["root"] == (uid, gid, f"{mode:04o}")
    for user in (ALICE, BOB, CAROL):
        for name, want in (("lists", READ), ("creates", WRITE | EXECUTE)):
            granted = all(
                permitted(user, mode, uid, gid, bit, directory=True)
                for bit in (READ, WRITE, EXECUTE)
                if want & bit
            )
            assert seen[f"{user.name} {name}"] == ("ok" if granted else "EACCES"), (user, name)


# -- volatility and purging -------------------------------------------------------------------


def test_volatility_needs_a_writable_descriptor(mounts: Mounts) -> None:
    root = mounts.volfs()
    path = root / "cache"
    path.write_bytes(b"c" * (4 * PAGE))
    os.chown(path, ALICE.uid, ALICE.gid)
    os.chmod(path, 0o644)

    def as_owner() -> dict[str, object]:
        read_only = os.open(path, os.O_RDONLY)
        read_write = os.open(path, os.O_RDWR)
        write_only = os.open(path, os.O_WRONLY)
        try:
            return {
                "read-only mark": attempt(lambda: fvrange(read_only, 0, PAGE, VRANGE_VOLATILE)),
                "write-only mark and unmark": (
                    fvrange(write_only, 3 * PAGE, PAGE, VRANGE_VOLATILE),
                    fvrange(write_only, 3 * PAGE, PAGE, VRANGE_NONVOLATILE),
                ),
                "read-write mark": fvrange(read_write, 0, 2 * PAGE, VRANGE_VOLATILE),
                "read-only unmark": attempt(
                    lambda: fvrange(read_only, 0, PAGE, VRANGE_NONVOLATILE)
                ),
                "read-only status": vrange_status(read_only),
                "purge": attempt(lambda: purge(read_write)),
                "status after purge": vrange_status(read_only),
                "read-write unmark": fvrange(read_write, 0, 2 * PAGE, VRANGE_NONVOLATILE),
            }
        finally:
            os.close(read_only)
            os.close(read_write)
            os.close(write_only)

    seen = run_as(ALICE, as_owner)
    assert seen == {
        "read-only mark": "EBADF",
        "write-only mark and unmark": ((PAGE, False), (PAGE, False)),
        "read-write mark": (2 * PAGE, False),
        "read-only unmark": "EBADF",
        "read-only status": (2 * PAGE, 0),
        "purge": "EPERM",  # alice did not mount it
        "status after purge": (2 * PAGE, 0),
        "read-write unmark": (2 * PAGE, False),
    }

    def as_reader() -> dict[str, object]:
        fd = os.open(path, os.O_RDONLY)
        try:
            return {
                "open for writing": attempt(lambda: os.open(path, os.O_RDWR)),
                "mark": attempt(lambda: fvrange(fd, 0, PAGE, VRANGE_VOLATILE)),
                "status": vrange_status(fd),
                "purge through a file": attempt(lambda: purge(fd)),
                "purge through the root": attempt(lambda: purge(root)),
            }
        finally:
            os.close(fd)

    assert run_as(BOB, as_reader) == {
        "open for writing": "EACCES",
        "mark": "EBADF",
        "status": (0, 0),
        "purge through a file": "EPERM",
        "purge through the root": "EPERM",
    }


def test_purge_is_for_root_and_the_user_who_mounted(mounts: Mounts) -> None:
    root = mounts.volfs("alices", "size=64M,allow_other", owner=ALICE)
    assert os.stat(root).st_uid == ALICE.uid  # uid= defaults to the mounting user
    path = root / "cache"
    path.write_bytes(b"a" * (4 * PAGE))
    fd = os.open(path, os.O_RDWR)
    try:
        fvrange(fd, 0, 4 * PAGE, VRANGE_VOLATILE)
        for user in (BOB, CAROL):
            assert run_as(user, lambda: attempt(lambda: purge(root))) == "EPERM", user
            assert run_as(user, lambda: attempt(lambda: purge(path))) == "EPERM", user
        assert vrange_status(fd) == (4 * PAGE, 0), "a refused purge purged"
        assert run_as(ALICE, lambda: purge(root)) == 4 * PAGE
        assert vrange_status(fd) == (4 * PAGE, 4 * PAGE)
        assert fvrange(fd, 0, 4 * PAGE, VRANGE_NONVOLATILE) == (4 * PAGE, True)
        os.pwrite(fd, b"b" * (4 * PAGE), 0)
        fvrange(fd, 0, 4 * PAGE, VRANGE_VOLATILE)
        assert purge(root) == 4 * PAGE  # root may purge a user's mount
        assert fvrange(fd, 0, 4 * PAGE, VRANGE_NONVOLATILE) == (4 * PAGE, True)
    finally:
        os.close(fd)


# -- isolation without allow_other ------------------------------------------------------------


def test_without_allow_other_other_users_get_nothing(mounts: Mounts) -> None:
    private = mounts.volfs("private", "size=16M")
    shared = mounts.volfs("shared", "size=16M,allow_other")
    for root in (private, shared):
        (root / "file").write_bytes(b"for everyone")
        os.chmod(root / "file", 0o666)
        (root / "dir").mkdir(mode=0o777)

    def probe(root: Path) -> dict[str, str]:
        return {
            "stat root": attempt(lambda: os.stat(root)),
            "list root": attempt(lambda: os.listdir(root)),
            "stat file": attempt(lambda: os.stat(root / "file")),
            "open file": attempt(lambda: open_close(root / "file", os.O_RDONLY)),
            "write file": attempt(lambda: write_some(root / "file")),
            "create": attempt(lambda: open_close(root / "new", os.O_CREAT | os.O_WRONLY)),
            "enter dir": attempt(lambda: os.chdir(root / "dir")),
        }

    everything = run_as(ROOT, lambda: probe(shared))
    assert everything == dict.fromkeys(everything, "ok")
    os.unlink(shared / "new")
    for user in (ALICE, CAROL):
        assert run_as(user, lambda: probe(private)) == dict.fromkeys(everything, "EACCES")
        assert run_as(user, lambda: probe(shared)) == everything
        os.unlink(shared / "new")
    assert run_as(ROOT, lambda: probe(private)) == everything  # root mounted it
    # statfs is not refused, but tells a stranger nothing.
    assert run_as(ALICE, lambda: os.statvfs(private).f_blocks) == 0
    assert run_as(ALICE, lambda: os.statvfs(shared).f_blocks) == 16 * 256


def test_a_users_mount_is_closed_to_root_and_others(mounts: Mounts) -> None:
    private = mounts.volfs("alices", "size=16M", owner=ALICE)
    with_root = mounts.volfs("alices-and-root", "size=16M,allow_root", owner=ALICE)

    def probe(root: Path) -> dict[str, str]:
        return {
            "create": attempt(lambda: open_close(root / "f", os.O_CREAT | os.O_WRONLY)),
            "open": attempt(lambda: open_close(root / "f", os.O_RDONLY)),
            "list": attempt(lambda: os.listdir(root)),
            "purge": attempt(lambda: purge(root)),
        }

    # With allow_root the kernel lets everyone in and libfuse refuses strangers' requests;
    # what the kernel answers from its caches (stat of a name looked up moments ago) is not
    # refused, so only calls that reach the daemon are probed.
    allowed = {"create": "ok", "open": "ok", "list": "ok", "purge": "ok"}
    denied = dict.fromkeys(allowed, "EACCES")
    assert run_as(ALICE, lambda: probe(private)) == allowed
    assert run_as(ALICE, lambda: probe(with_root)) == allowed
    assert probe(private) == denied  # not even root
    assert run_as(BOB, lambda: probe(private)) == denied
    assert run_as(BOB, lambda: probe(with_root)) == denied
    assert probe(with_root) == allowed


def test_segments_on_a_shared_mount_stay_with_those_who_may_write(mounts: Mounts) -> None:
    root = mounts.volfs("alices", "size=64M,allow_other", owner=ALICE)
    path = root / "bobs"
    os.chown(root, ALICE.uid, ALICE.gid)
    os.chmod(root, 0o777)

    def as_bob_unpinning() -> list[int]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(fd, b"b" * (4 * PAGE), 0)
        table = SegmentTable(fd)
        segments = [table.register(0, 2 * PAGE), table.register(2 * PAGE, 2 * PAGE)]
        for segment in segments:
            segment.unpin()
        table.close()
        os.close(fd)
        return [segment.index for segment in segments]

    # The table belongs to the file: it lives while somebody has the file open.
    run_as(BOB, lambda: path.touch(mode=0o644))
    keeper = os.open(path, os.O_RDONLY)
    try:
        indexes = run_as(BOB, as_bob_unpinning)
        assert run_as(ALICE, lambda: purge(root)) == 4 * PAGE  # she mounted it
        assert run_as(CAROL, lambda: attempt(lambda: purge(root))) == "EPERM"

        def as_carol_reading() -> dict[str, object]:
            fd = os.open(path, os.O_RDONLY)
            try:
                table = SegmentTable(fd)
                pid, token, name = segment_token(fd)
                memfd = volfs_client._receive_table(pid, token, name)
                try:
                    reopened = attempt(lambda: os.open(f"/proc/self/fd/{memfd}", os.O_RDWR))
                finally:
                    os.close(memfd)
                seen = Segment(table, indexes[0], 0, 2 * PAGE, False)
                return {
                    "writable": table.writable,
                    "states": [table.state(index) for index in indexes],
                    "pin": attempt(seen.pin),
                    "register": attempt(lambda: table.register(0, PAGE)),
                    "reopen for writing": reopened,
                }
            finally:
                os.close(fd)

        assert run_as(CAROL, as_carol_reading) == {
            "writable": False,
            "states": [SEGMENT_PURGED, SEGMENT_PURGED],
            "pin": "EBADF",
            "register": "EBADF",
            "reopen for writing": "EACCES",
        }

        def as_bob_pinning() -> list[bool]:
            fd = os.open(path, os.O_RDWR)
            try:
                with SegmentTable(fd) as table:
                    return [Segment(table, index, 0, 2 * PAGE, False).pin() for index in indexes]
            finally:
                os.close(fd)

        assert run_as(BOB, as_bob_pinning) == [True, True]
    finally:
        os.close(keeper)


@pytest.mark.skipif(shutil.which("setcap") is None, reason="setcap (libcap2-bin) is not installed")
def test_a_write_removes_file_capabilities_as_on_tmpfs(mounts: Mounts) -> None:
    roots = mounts.both()

    def scenario(root: Path) -> dict[str, str]:
        results = {}
        for name, user in (("bob-writes", BOB), ("root-writes", ROOT)):
            path = root / name
            path.write_bytes(b"#" * 100)
            os.chmod(path, 0o777)
            subprocess.run(["setcap", "cap_net_raw+ep", str(path)], check=True)
            before = "security.capability" in os.listxattr(path)
            outcome = run_as(user, lambda path=path: attempt(lambda: write_some(path)))
            after = "security.capability" in os.listxattr(path)
            results[name] = f"{outcome} {before}->{after}"
        return results

    assert assert_same(on_both(roots, scenario)) == {
        "bob-writes": "ok True->False",
        "root-writes": "ok True->False",
    }
