"""Fuzzing the mount options: random ``-o`` strings to the parser and to a real daemon.

The parser must either accept a string or refuse it with one printable line (OptionError),
never fail otherwise; the daemon must do what the parser decided: refuse with exit status 2,
that line and nothing mounted, or mount a filesystem that works and unmount it cleanly.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import MOUNT_TIMEOUT, force_unmount, is_mounted, wait_for
from volfs.daemon.options import IGNORED_OPTIONS, MAX_SIZE, OptionError, parse_mount_options

MEMORY = 8 << 30

NAMES = (
    "size",
    "nr_inodes",
    "mode",
    "uid",
    "gid",
    "purged",
    "pressure",
    "pressure_stall",
    "pressure_watermark",
    "pressure_batch",
    "max_ranges",
    "max_file_ranges",
    "fsname",
    "subtype",
    "allow_other",
    "default_permissions",
    "ro",
    "noatime",
    "defaults",
    "x-systemd.automount",
    "max_read",
    "blkdev",
)
VALUES = (
    "",
    "0",
    "1",
    "64M",
    "1g",
    "50%",
    "100%",
    "101%",
    "0700",
    "1777",
    "8888",
    "-1",
    "4294967295",
    "eio",
    "zero",
    "on",
    "off",
    "2000",
    "2001",
    "1.5G",
    "१२",
    "64T",
    "65T",
    str(2**64),
    "a\nb",
    "\x00",
    "x" * 300,
)


#: A sensible value for each option that takes one, so that some fuzzed strings mount.
SENSIBLE = {
    "size": ("1", "64M", "10%"),
    "nr_inodes": ("1", "2k"),
    "mode": ("0700", "1777"),
    "uid": ("0", "1000"),
    "gid": ("0", "1000"),
    "purged": ("eio", "zero"),
    "pressure": ("on", "off"),
    "pressure_stall": ("150",),
    "pressure_watermark": ("64M",),
    "pressure_batch": ("1M",),
    "max_ranges": ("1", "100k"),
    "max_file_ranges": ("0", "64k"),
    "fsname": ("cache",),
    "subtype": ("volfs",),
}


def option_item(rng: random.Random) -> str:
    """One ``name``, ``name=value`` or piece of junk, drawn from likely and unlikely parts."""
    roll = rng.random()
    if roll < 0.08:
        return "".join(rng.choice("abz=,%-_ \t\x01é0") for _ in range(rng.randrange(1, 12)))
    name = rng.choice(NAMES)
    if roll < 0.2 or (roll < 0.75 and name not in SENSIBLE):
        return name
    if roll < 0.75:
        return f"{name}={rng.choice(SENSIBLE[name])}"
    return f"{name}={rng.choice(VALUES)}"


items = st.one_of(
    st.sampled_from(NAMES),
    st.builds(lambda name, value: f"{name}={value}", st.sampled_from(NAMES), st.text(max_size=20)),
    st.builds(
        lambda name, value: f"{name}={value}", st.sampled_from(NAMES), st.sampled_from(VALUES)
    ),
    st.text(max_size=30),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(items, max_size=6).map(",".join), max_size=3))
def test_the_parser_accepts_or_refuses_with_one_printable_line(option_strings: list[str]) -> None:
    try:
        options = parse_mount_options(option_strings, memory=MEMORY)
    except OptionError as error:
        message = str(error)
        assert message and message.isprintable(), repr(message)
        return
    assert 0 <= options.size <= MAX_SIZE and options.size % 4096 == 0
    assert 0 <= options.mode <= 0o7777
    assert 0 <= options.uid < 2**32 - 1 and 0 <= options.gid < 2**32 - 1
    assert options.pressure.watermark <= MEMORY
    assert options.pressure.batch > 0
    assert options.max_ranges >= 0 and options.max_file_ranges >= 0
    for fuse_option in options.fuse_options:
        name = fuse_option.partition("=")[0]
        assert name not in IGNORED_OPTIONS and name not in {"max_read", "blkdev"}, fuse_option
        assert "," not in fuse_option


def start(mountpoint: Path, options: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "volfs", "-f", "-o", options, str(mountpoint)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def wait_mounted_or_exited(process: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """Wait until the daemon mounted or exited; TimeoutError if it did neither."""
    wait_for(
        lambda: process.poll() is not None or is_mounted(mountpoint),
        MOUNT_TIMEOUT,
        "the daemon to mount or exit",
    )


def check_the_mount_works(mountpoint: Path, options: str) -> None:
    """Whatever the options, the mount answers; a file written reads back."""
    os.statvfs(mountpoint)
    os.listdir(mountpoint)
    try:
        (mountpoint / "probe").write_bytes(b"probe")
    except OSError as error:
        # A read-only mount, a cap of one page or one inode: refused, and said why.
        assert error.errno in (errno.EROFS, errno.ENOSPC), (options, error)
        return
    assert (mountpoint / "probe").read_bytes() == b"probe"


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting FUSE with allow_other needs root")
@pytest.mark.parametrize("seed", range(4))
def test_the_daemon_does_what_the_parser_decided(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    for case in range(8):
        options = ",".join(option_item(rng) for _ in range(rng.randrange(1, 5)))
        # The command line cannot carry a NUL byte.
        options = options.replace("\x00", "")
        try:
            parse_mount_options([options])
            refusal = None
        except OptionError as error:
            refusal = f"volfs: {error}"
        log = tmp_path / f"volfs-{case}.log"
        process = start(mountpoint, options, log)
        try:
            wait_mounted_or_exited(process, mountpoint)
            if refusal is not None:
                assert process.wait(timeout=MOUNT_TIMEOUT) == 2, (options, log.read_text())
                assert log.read_text(errors="replace").splitlines() == [refusal], options
                assert not is_mounted(mountpoint)
                continue
            assert is_mounted(mountpoint), (options, log.read_text())
            check_the_mount_works(mountpoint, options)
            subprocess.run(["umount", str(mountpoint)], check=True)
            assert process.wait(timeout=MOUNT_TIMEOUT) == 0, (options, log.read_text())
            assert "Traceback" not in log.read_text(errors="replace"), options
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if is_mounted(mountpoint):
                force_unmount(mountpoint)
            wait_for(lambda: not is_mounted(mountpoint), MOUNT_TIMEOUT, "unmount")
