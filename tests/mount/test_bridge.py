"""The C bridge's lifetimes, its failed replies and the libfuse and pyfuse3 versions it takes.

Most tests run a small program in a subprocess that mounts a volfs with
:func:`volfs.daemon.main.run_mount` and answers ioctls with a handler of its own, so that it can
keep requests and call the bridge after the session has gone: the program's output and exit
status say how the bridge behaved.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, force_unmount, is_mounted
from volfs.daemon import _bridge, bridge

PROGRAM_TIMEOUT = 60.0

#: What every program starts with: a volfs to mount and ways to make requests to it.
PRELUDE = """
import errno, fcntl, logging, os, sys, threading
import trio
from volfs.daemon import bridge, main as daemon, replies, session
from volfs.abi import VOLFS_IOC_STATS, VOLFS_STATS
from volfs.daemon.options import parse_mount_options

logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
mountpoint = sys.argv[1]
options = parse_mount_options(["size=16M"])


def ask_stats():
    \"\"\"VOLFS_IOC_STATS on the mount's root: "answered" or the errno's name.\"\"\"
    fd = os.open(mountpoint, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, VOLFS_IOC_STATS, bytes(VOLFS_STATS.size))
        return "answered"
    except OSError as error:
        return errno.errorcode[error.errno]
    finally:
        os.close(fd)


def serve(ioctl, callers):
    \"\"\"Mount with `ioctl` answering ioctls, run `callers` threads of ask_stats, serve
    until told to stop, unmount.

    The callers may be held until the unmount: they are joined only after it.
    \"\"\"
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(ask_stats())) for _ in range(callers)
    ]

    def ready():
        bridge.set_handlers(ioctl=ioctl)
        for thread in threads:
            thread.start()

    trio.run(daemon.run_mount, options, mountpoint, ready)
    for thread in threads:
        thread.join()
    return sorted(results)


def attempt(what, call):
    \"\"\"Print what `call()` did: "ok" or the errno it raised.\"\"\"
    try:
        call()
        print(what, "ok", flush=True)
    except OSError as error:
        print(what, "OSError", errno.errorcode.get(error.errno, error.errno), flush=True)
"""


def run_program(
    body: str, *args: str, env: dict[str, str] | None = None, prelude: str = PRELUDE
) -> subprocess.CompletedProcess[str]:
    """Run ``prelude`` then ``body`` in a new interpreter with ``args`` as sys.argv[1:]."""
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(body), *args],
        capture_output=True,
        text=True,
        timeout=PROGRAM_TIMEOUT,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )


def lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The program's output lines, after checking that it exited 0 without a traceback."""
    assert result.returncode == 0, f"status {result.returncode}\n{result.stdout}{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout.splitlines()


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    """An empty directory to mount on, detached afterwards if a program left a mount."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if is_mounted(path):
        force_unmount(path)


@pytest.fixture
def fuse_connections() -> Iterator[Path]:
    """/sys/fs/fuse/connections, with fusectl mounted there for the test if it was not."""
    path = Path("/sys/fs/fuse/connections")
    with open("/proc/self/mounts") as mounts:
        mounted = any(line.split()[2] == "fusectl" for line in mounts)
    if not mounted:
        result = subprocess.run(
            ["mount", "-t", "fusectl", "fusectl", str(path)], capture_output=True, check=False
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount fusectl: {result.stderr.decode(errors='replace')}")
    yield path
    if not mounted:
        subprocess.run(["umount", str(path)], capture_output=True, check=False)


# -- lifetimes ---------------------------------------------------------------------------------

ENDED_SESSION = """
kept = []


def keep(request, ino, cmd, fh, is_dir, data):
    kept.append(request)
    if len(kept) == 4:
        session.terminate()


print("callers", *serve(keep, 4), flush=True)
print("active", bridge.active(), flush=True)
attempt("invalidate", lambda: bridge.invalidate_range(1, 0, 4096))
print("invalidate many", *bridge.invalidate_ranges([(1, 0, 4096), (2, 1 << 62, 1 << 62)]))
attempt("reply_ioctl", lambda: kept[0].reply_ioctl(0, bytes(VOLFS_STATS.size)))
attempt("reply_error", lambda: kept[1].reply_error(errno.EIO))
print("answered", *(request.answered for request in kept), flush=True)
kept.pop(2)
print("dropped", flush=True)
old = kept.pop()



def answer_on_the_new_session(request, ino, cmd, fh, is_dir, data):
    try:
        print("active while mounted again", bridge.active(), flush=True)
        attempt("invalidate while mounted again", lambda: bridge.invalidate_range(1, 0, 4096))
        print("invalidate many again", bridge.invalidate_ranges([(1, 0, 1), (1, 1 << 62, 1 << 62)]))
        attempt("reply to an old request", lambda: old.reply_lseek(0))
        request.reply_ioctl(0, bytes(VOLFS_STATS.size))
    finally:
        session.terminate()


print("callers", *serve(answer_on_the_new_session, 1), flush=True)
print("active", bridge.active(), flush=True)
"""


@pytest.mark.root
def test_a_session_that_ended_is_never_touched_again(mountpoint: Path) -> None:
    """Notifications and replies after the unmount fail cleanly instead of using freed memory.

    Requests kept from ioctls are answered (or dropped) after the unmount destroyed the
    session, and one is answered while a new session is mounted: it must not reach the new
    session. MALLOC_PERTURB_ scribbles over freed memory so that a use after free misbehaves.
    """
    result = run_program(ENDED_SESSION, str(mountpoint), env={"MALLOC_PERTURB_": "165"})
    output = lines(result)
    assert output[0].split()[0] == "callers"
    # The kept requests' callers are released by the unmount aborting the connection.
    assert set(output[0].split()[1:]) <= {"ECONNABORTED", "ENOTCONN"}, output
    assert output[1:] == [
        "active False",
        "invalidate OSError ENOTCONN",
        f"invalidate many (1, {errno.ENOTCONN}) (2, {errno.ENOTCONN})",
        "reply_ioctl OSError ENOTCONN",
        "reply_error OSError ENOTCONN",
        "answered True True False False",
        "dropped",
        "active while mounted again True",
        "invalidate while mounted again ok",
        "invalidate many again []",
        "reply to an old request OSError ENOTCONN",
        "callers answered",
        "active False",
    ]
    assert not is_mounted(mountpoint)


ABORTED_CONNECTION = """
connections = sys.argv[2]
kept = []


def connection():
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            if fields[4] == os.path.realpath(mountpoint):
                return fields[2].split(":")[1]
    raise LookupError(mountpoint)


def abort_then_answer(request, ino, cmd, fh, is_dir, data):
    kept.append(request)
    if len(kept) < 2:
        return
    with open(os.path.join(connections, connection(), "abort"), "w") as abort:
        abort.write("1")
    try:
        kept[0].reply_ioctl(0, bytes(VOLFS_STATS.size))
        print("reply ok", flush=True)
    except OSError as error:
        print("reply OSError", kept[0].answered, flush=True)
        print("errno", errno.errorcode[error.errno], flush=True)
    kept.clear()
    print("dropped", flush=True)


print("callers", *serve(abort_then_answer, 2), flush=True)
"""


@pytest.mark.root
def test_a_failed_reply_raises_and_counts_as_the_answer(
    mountpoint: Path, fuse_connections: Path
) -> None:
    """A reply libfuse cannot deliver raises OSError; a dropped request's failure is logged.

    The connection is aborted through fusectl while two ioctls wait for their answer: the
    reply to one raises (the kernel no longer knows the request) and marks it answered; the
    other, dropped unanswered, answers EIO in vain and says so in the log.
    """
    result = run_program(ABORTED_CONNECTION, str(mountpoint), str(fuse_connections))
    output = lines(result)
    assert output[0] == "reply OSError True", output
    assert output[1] in ("errno ENOENT", "errno ENODEV", "errno ENOTCONN"), output
    assert output[2:] == ["dropped", "callers ECONNABORTED ECONNABORTED"]
    assert "volfs.daemon.bridge WARNING cannot answer EIO to a request dropped unanswered" in (
        result.stderr
    )


INIT_FAILS = """
import sys

from volfs.daemon import fs, main as daemon


def init(self):
    raise RuntimeError("init failed on purpose")


fs.VolfsOperations.init = init
sys.exit(daemon.main(["-f", sys.argv[1]]))
"""


@pytest.mark.root
def test_a_failed_init_ends_the_mount(mountpoint: Path) -> None:
    """An exception from pyfuse3's init stops the daemon at once, unmounted, exit status 1.

    The bridge leaves that exception to pyfuse3, which raises it from its main loop right
    after INIT: no other request is served by a filesystem whose init failed, and none is
    answered twice because of a stale exception.
    """
    result = run_program(INIT_FAILS, str(mountpoint), prelude="")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "RuntimeError: init failed on purpose" in result.stderr
    assert not is_mounted(mountpoint)


ANSWERING_AFTER_THE_END = """
kept = []


def keep(request, ino, cmd, fh, is_dir, data):
    kept.append(request)
    session.terminate()


serve(keep, 1)
try:
    with replies.answering(kept[0], "a request kept past its session"):
        raise OSError(errno.EINVAL, "failing once the session has ended")
    print("contained", kept[0].answered, flush=True)
except OSError as error:
    print("escaped", errno.errorcode[error.errno], flush=True)
"""


@pytest.mark.root
def test_answering_contains_a_reply_that_cannot_be_sent(mountpoint: Path) -> None:
    """A handler failing after its session ended must not raise out of ``replies.answering``.

    Out of an ioctl handler the error would be printed as unraisable; out of a trio task
    (purges, fallocate) it would end the serving nursery.
    """
    result = run_program(ANSWERING_AFTER_THE_END, str(mountpoint))
    assert lines(result) == ["contained True"]


# -- libfuse 3.17 ------------------------------------------------------------------------------


class _DlInfo(ctypes.Structure):
    _fields_ = (
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    )


def test_the_bridge_defines_both_session_constructors_and_the_session_end() -> None:
    """The loaded module defines each libfuse entry point a pyfuse3 build may call.

    fuse_session_new@FUSE_3.0 for pyfuse3 built against libfuse < 3.17,
    fuse_session_new_versioned@FUSE_3.17 for one built against 3.17 headers, and the
    unmount and destroy that end a session.
    """
    assert bridge.libfuse() in ("libfuse3.so.3", "libfuse3.so.4")
    library = ctypes.CDLL(_bridge.__file__)
    dladdr = ctypes.CDLL(None).dladdr
    dladdr.argtypes = (ctypes.c_void_p, ctypes.POINTER(_DlInfo))
    for name in (
        "fuse_session_new",
        "fuse_session_new_versioned",
        "fuse_session_unmount",
        "fuse_session_destroy",
    ):
        address = ctypes.cast(getattr(library, name), ctypes.c_void_p).value
        info = _DlInfo()
        assert dladdr(address, ctypes.byref(info)), name
        assert info.dli_sname == name.encode()
        assert info.dli_fname is not None
        assert os.path.samefile(os.fsdecode(info.dli_fname), _bridge.__file__), name


#: A stand-in for libfuse >= 3.17's libfuse3.so.4, built on the installed libfuse3.so.3: the
#: same versioned entry points, counting their calls. As in libfuse, fuse_session_new@FUSE_3.0
#: goes through fuse_session_new_versioned as the global scope resolves it, i.e. the bridge's.
FAKE_LIBFUSE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

struct fuse_args;
struct fuse_lowlevel_ops;
struct fuse_session;
struct libfuse_version;

typedef struct fuse_session *(*new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                       size_t, void *);
typedef struct fuse_session *(*versioned_fn)(struct fuse_args *,
                                             const struct fuse_lowlevel_ops *, size_t,
                                             struct libfuse_version *, void *);
typedef void (*end_fn)(struct fuse_session *);
typedef int (*mount_fn)(struct fuse_session *, const char *);

int fake_compat_calls, fake_versioned_calls, fake_unmount_calls, fake_destroy_calls;
const void *fake_last_ops, *fake_last_version;

static void *real(const char *name) {
    void *handle = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_NOLOAD);
    return handle ? dlvsym(handle, name, "FUSE_3.0") : NULL;
}

struct fuse_session *fuse_session_new_versioned(struct fuse_args *args,
                                                const struct fuse_lowlevel_ops *op,
                                                size_t op_size, struct libfuse_version *version,
                                                void *userdata) {
    fake_versioned_calls++;
    fake_last_ops = op;
    fake_last_version = version;
    return ((new_fn)real("fuse_session_new"))(args, op, op_size, userdata);
}

struct fuse_session *fuse_session_new(struct fuse_args *args,
                                      const struct fuse_lowlevel_ops *op, size_t op_size,
                                      void *userdata) {
    static unsigned unknown[4];
    fake_compat_calls++;
    versioned_fn versioned = (versioned_fn)dlsym(RTLD_DEFAULT, "fuse_session_new_versioned");
    return versioned(args, op, op_size, (struct libfuse_version *)unknown, userdata);
}

int fuse_session_mount(struct fuse_session *se, const char *mountpoint) {
    return ((mount_fn)real("fuse_session_mount"))(se, mountpoint);
}

void fuse_session_unmount(struct fuse_session *se) {
    fake_unmount_calls++;
    ((end_fn)real("fuse_session_unmount"))(se);
}

void fuse_session_destroy(struct fuse_session *se) {
    fake_destroy_calls++;
    ((end_fn)real("fuse_session_destroy"))(se);
}
"""

FAKE_LIBFUSE_VERSIONS = """
FUSE_3.0 {
    global:
        fuse_session_new;
        fuse_session_mount;
        fuse_session_unmount;
        fuse_session_destroy;
        fake_*;
    local:
        *;
};

FUSE_3.17 {
    global:
        fuse_session_new_versioned;
} FUSE_3.0;
"""

#: Loads the stand-in libfuse3.so.4 (privately, as a DT_NEEDED library is not in the scope
#: the bridge is found in first) before the bridge, then mounts and asks for statistics.
WITH_FAKE_LIBFUSE_317 = """
import ctypes
import sys

fake = ctypes.CDLL(sys.argv[2])
"""

ON_FAKE_LIBFUSE_317 = """
from volfs.daemon import _bridge


def counters():
    return tuple(
        ctypes.c_int.in_dll(fake, f"fake_{name}_calls").value
        for name in ("compat", "versioned", "unmount", "destroy")
    )


def answer_then_stop(request, ino, cmd, fh, is_dir, data):
    try:
        request.reply_ioctl(0, bytes(VOLFS_STATS.size))
    finally:
        session.terminate()


print("libfuse", bridge.libfuse(), flush=True)
print("callers", *serve(answer_then_stop, 1), flush=True)
print("calls", *counters(), flush=True)


class Arguments(ctypes.Structure):
    _fields_ = (("argc", ctypes.c_int), ("argv", ctypes.c_void_p), ("allocated", ctypes.c_int))


# As a pyfuse3 built against libfuse 3.17's headers would: no arguments, so that libfuse
# refuses to create the session once the bridge has handed it on.
new = ctypes.CDLL(_bridge.__file__).fuse_session_new_versioned
new.restype = ctypes.c_void_p
new.argtypes = (ctypes.c_void_p,) * 5
operations_table = ctypes.create_string_buffer(256)
version = (ctypes.c_uint32 * 4)(3, 17, 4, 0)
arguments = Arguments(0, None, 0)
session = new(ctypes.byref(arguments), operations_table, 0, version, None)
print("direct", session, *counters(), flush=True)
last_ops = ctypes.c_void_p.in_dll(fake, "fake_last_ops").value
last_version = ctypes.c_void_p.in_dll(fake, "fake_last_version").value
print("wrapped", last_ops != ctypes.addressof(operations_table), flush=True)
print("version passed on", last_version == ctypes.addressof(version), flush=True)
"""


@pytest.fixture
def fake_libfuse_317(tmp_path: Path) -> Path:
    """The stand-in libfuse3.so.4, compiled for the test."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    source = tmp_path / "fake_libfuse.c"
    source.write_text(FAKE_LIBFUSE)
    versions = tmp_path / "fake_libfuse.map"
    versions.write_text(FAKE_LIBFUSE_VERSIONS)
    library = tmp_path / "libfuse3.so.4"
    subprocess.run(
        [
            compiler,
            "-shared",
            "-fPIC",
            "-o",
            str(library),
            "-Wl,-soname,libfuse3.so.4",
            f"-Wl,--version-script,{versions}",
            str(source),
            "-ldl",
        ],
        check=True,
        capture_output=True,
    )
    return library


@pytest.mark.root
def test_the_bridge_hooks_libfuse_317_when_it_is_loaded(
    mountpoint: Path, fake_libfuse_317: Path
) -> None:
    """With a libfuse3.so.4 loaded, the bridge takes libfuse 3.17's functions from it.

    The mount (pyfuse3 calls fuse_session_new@FUSE_3.0, which libfuse 3.17 implements through
    fuse_session_new_versioned) wraps pyfuse3's operations once: the nested call is passed
    straight on, and ioctls are answered. Unmount and destroy reach libfuse3.so.4's. Called
    directly, as by a pyfuse3 built against 3.17, fuse_session_new_versioned hands the
    bridge's operations and the caller's version on to libfuse3.so.4.
    """
    result = run_program(
        ON_FAKE_LIBFUSE_317,
        str(mountpoint),
        str(fake_libfuse_317),
        prelude=WITH_FAKE_LIBFUSE_317 + PRELUDE,
    )
    assert lines(result) == [
        "libfuse libfuse3.so.4",
        "callers answered",
        "calls 1 1 1 1",
        "direct None 1 2 1 1",
        "wrapped True",
        "version passed on True",
    ]
    assert "empty argv passed to fuse_session_new" in result.stderr


# -- pyfuse3 versions --------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["3.3.0", "3.4.0", "3.4.2", "3.5.0", "3.5.1"])
def test_pyfuse3_releases_the_bridge_was_checked_against_are_accepted(version: str) -> None:
    """The releases from 3.3 up to 3.6 keep the internals the bridge relies on."""
    bridge.check_pyfuse3_version(version)


@pytest.mark.parametrize("version", ["3.2.3", "3.0.0", "2.0.0", "3.6.0", "3.6.0rc1", "4.0", "x"])
def test_other_pyfuse3_releases_are_refused(version: str) -> None:
    """Before 3.3 a failure before a handler is printed and dropped: its request would hang."""
    with pytest.raises(ImportError, match=rf"pyfuse3 >= 3\.3 and < 3\.6.*pyfuse3 {version} is"):
        bridge.check_pyfuse3_version(version)


def test_the_dependency_bound_is_the_bridge_bound() -> None:
    """pyproject.toml asks pip for the releases the bridge accepts at import."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (requirement,) = [d for d in project["dependencies"] if d.startswith("pyfuse3")]
    first, after = (".".join(map(str, bound)) for bound in bridge.PYFUSE3_SUPPORTED)
    assert requirement == f"pyfuse3>={first},<{after}"


def test_importing_the_bridge_with_an_unsupported_pyfuse3_fails_clearly() -> None:
    """The check runs when volfs.daemon.bridge (so the adapter) is imported, before pyfuse3."""
    result = run_program(
        """
        from importlib import metadata

        metadata.version = lambda name: "3.2.3"
        try:
            import volfs.daemon.fs
        except ImportError as error:
            print(error)
        print("pyfuse3 loaded", "pyfuse3" in sys.modules)
        """,
        prelude="import sys\n",
    )
    assert lines(result) == [
        "volfs needs pyfuse3 >= 3.3 and < 3.6, whose internals its FUSE bridge relies on; "
        "pyfuse3 3.2.3 is installed",
        "pyfuse3 loaded False",
    ]
