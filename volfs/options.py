"""Mount options: tmpfs-style sizes and ownership, plus the FUSE options passed through.

``parse_mount_options`` turns the ``-o`` strings into a validated :class:`MountOptions` or
raises :class:`OptionError` with a message fit to show the user as is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from volfs import sizes
from volfs.abi import PAGE_SIZE, pages_for
from volfs.meminfo import meminfo

#: The most a size cap may be: the arena is one mapping and must fit the address space.
MAX_SIZE = 1 << 46

#: The longest ``fsname=``: all mount options together must fit the kernel's one page.
MAX_FSNAME = 255

#: Default bounds on volatile range records (ranges and runs of purged pages): each costs the
#: daemon a few hundred bytes, so these keep a client's ranges within tens of MiB.
DEFAULT_MAX_RANGES = 131072
DEFAULT_MAX_FILE_RANGES = 65536

#: Options handed to libfuse unchanged: its own, and the generic mount flags.
FUSE_FLAG_OPTIONS = frozenset(
    {
        "allow_other",
        "allow_root",
        "auto_unmount",
        "default_permissions",
        "rw",
        "ro",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",
        "noexec",
        "async",
        "sync",
        "dirsync",
        "atime",
        "noatime",
        "diratime",
        "nodiratime",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "debug",
    }
)

#: Options mount(8), mount.fuse3 or fstab may hand over that mean nothing to the daemon.
IGNORED_OPTIONS = frozenset(
    {
        "defaults",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "nofail",
        "_netdev",
        "lazytime",
        "nolazytime",
        "iversion",
        "noiversion",
    }
)


class OptionError(ValueError):
    """A mount option that is unknown or has a bad value.

    Its text is one printable line: control characters of the option quoted in it are
    shown escaped.
    """

    def __str__(self) -> str:
        text = super().__str__()
        return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


@dataclass(frozen=True, slots=True)
class PressureSettings:
    """The ``pressure=`` family of mount options."""

    enabled: bool = True
    #: PSI trigger: purge when "some" tasks stall this long (µs) within a window. Without
    #: CAP_SYS_RESOURCE the kernel only accepts windows in multiples of 2 s.
    stall_us: int = 150_000
    window_us: int = 2_000_000
    #: Purge while MemAvailable is below this many bytes (0: no watermark).
    watermark: int = 0
    #: Seconds between watermark samples.
    interval: float = 1.0
    #: Bytes purged per batch.
    batch: int = 64 << 20


@dataclass(frozen=True, slots=True)
class MountOptions:
    """Everything the daemon needs to know from ``-o``."""

    #: The size cap in bytes; 0 means no cap other than the machine's memory.
    size: int
    #: The most inodes at once; 0 means no limit.
    nr_inodes: int
    #: Permission bits of the root directory.
    mode: int
    uid: int
    gid: int
    #: Options for libfuse, ``fsname`` and ``subtype`` included.
    fuse_options: frozenset[str]
    #: ``purged=zero``: reads of purged volatile data return zeros instead of failing.
    purged_reads_zero: bool = False
    #: ``max_ranges=``: volatile range records in the whole mount.
    max_ranges: int = DEFAULT_MAX_RANGES
    #: ``max_file_ranges=``: volatile range records in one file.
    max_file_ranges: int = DEFAULT_MAX_FILE_RANGES
    #: ``pressure=``, ``pressure_stall=``, ``pressure_watermark=``, ``pressure_batch=``.
    pressure: PressureSettings = field(default_factory=PressureSettings)


def parse_size(text: str, *, memory: int, name: str = "size") -> int:
    """Parse a byte size option (:mod:`volfs.sizes`' syntax), ``N%`` being of ``memory``.

    The result is rounded up to whole pages, as tmpfs does.

    Args:
        text: the value.
        memory: RAM in bytes, the whole of a percentage.
        name: the option, to name in a message.

    Raises:
        OptionError: malformed or out of range.
    """
    try:
        size = pages_for(sizes.parse_size(text, percent_of=memory)) * PAGE_SIZE
    except sizes.SizeError as error:
        raise OptionError(f"{name}={text}: {error.reason}") from None
    if size > MAX_SIZE:
        raise OptionError(f"{name}={text}: larger than volfs supports ({MAX_SIZE >> 40}T)")
    return size


def parse_count(name: str, text: str) -> int:
    """Parse a count (``nr_inodes=``) in :mod:`volfs.sizes`' syntax, without percentages."""
    try:
        return sizes.parse_size(text)
    except sizes.SizeError as error:
        raise OptionError(f"{name}={text}: {error.reason}") from None


def _parse_id(name: str, text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text) or int(text) >= 0xFFFFFFFF:
        raise OptionError(f"{name}={text}: expected a numeric id")
    return int(text)


def split_options(option_strings: Iterable[str]) -> list[str]:
    """Split ``-o`` arguments at commas, dropping empty items."""
    return [item for text in option_strings for item in text.split(",") if item]


def parse_mount_options(
    option_strings: Iterable[str], *, source: str = "volfs", memory: int | None = None
) -> MountOptions:
    """Validate the ``-o`` arguments.

    Args:
        option_strings: the values of every ``-o``, each a comma-separated list.
        source: the device name mount(8) was given; shown as the filesystem's name.
        memory: RAM in bytes for percentages and defaults (read from the system if None).

    Raises:
        OptionError: an unknown option or a bad value; the message names it.
    """
    if memory is None:
        memory = meminfo("MemTotal")
    size = memory // 2 // PAGE_SIZE * PAGE_SIZE
    nr_inodes = memory // PAGE_SIZE // 2
    mode = 0o1777
    uid, gid = os.getuid(), os.getgid()
    fuse_options = {"default_permissions", "subtype=volfs"}
    fsname = source
    purged_reads_zero = False
    max_ranges, max_file_ranges = DEFAULT_MAX_RANGES, DEFAULT_MAX_FILE_RANGES
    pressure: dict[str, Any] = {"watermark": memory // 50}
    for item in split_options(option_strings):
        name, has_value, value = item.partition("=")
        if name == "size" and has_value:
            size = parse_size(value, memory=memory, name=name)
        elif name == "nr_inodes" and has_value:
            nr_inodes = parse_count(name, value)
        elif name == "mode" and has_value:
            if not re.fullmatch(r"[0-7]{1,4}", value):
                raise OptionError(f"mode={value}: expected octal permission bits such as 1777")
            mode = int(value, 8)
        elif name == "uid" and has_value:
            uid = _parse_id(name, value)
        elif name == "gid" and has_value:
            gid = _parse_id(name, value)
        elif name == "purged" and has_value:
            if value not in ("eio", "zero"):
                raise OptionError(f"purged={value}: expected eio or zero")
            purged_reads_zero = value == "zero"
        elif name == "max_ranges" and has_value:
            max_ranges = parse_count(name, value)
        elif name == "max_file_ranges" and has_value:
            max_file_ranges = parse_count(name, value)
        elif name == "pressure" and has_value:
            if value not in ("on", "off"):
                raise OptionError(f"pressure={value}: expected on or off")
            pressure["enabled"] = value == "on"
        elif name == "pressure_stall" and has_value:
            if not re.fullmatch(r"[0-9]+", value) or not 1 <= int(value) <= 2000:
                raise OptionError(f"pressure_stall={value}: expected milliseconds, 1 to 2000")
            pressure["stall_us"] = int(value) * 1000
        elif name == "pressure_watermark" and has_value:
            pressure["watermark"] = parse_size(value, memory=memory, name=name)
            if pressure["watermark"] > memory:
                # MemAvailable never gets that high: volatile data would be purged nonstop.
                raise OptionError(f"pressure_watermark={value}: more than the machine's memory")
        elif name == "pressure_batch" and has_value:
            pressure["batch"] = parse_size(value, memory=memory, name=name)
            if not pressure["batch"]:
                raise OptionError(f"pressure_batch={value}: must be more than 0")
        elif name == "fsname" and has_value:
            fsname = value
        elif name == "subtype" and has_value:
            continue  # mount.fuse3 passes the type's subtype on; it is always volfs
        elif not has_value and name in FUSE_FLAG_OPTIONS:
            fuse_options.add(name)
        elif (not has_value and name in IGNORED_OPTIONS) or name.startswith(("x-", "comment")):
            continue
        else:
            raise OptionError(f"unknown mount option '{item}'")
    if not fsname or "," in fsname or len(fsname.encode()) > MAX_FSNAME:
        raise OptionError(
            f"fsname={fsname[:40]}: must be a name of 1 to {MAX_FSNAME} bytes without commas"
        )
    fuse_options.add(f"fsname={fsname}")
    return MountOptions(
        size=size,
        nr_inodes=nr_inodes,
        mode=mode,
        uid=uid,
        gid=gid,
        fuse_options=frozenset(fuse_options),
        purged_reads_zero=purged_reads_zero,
        max_ranges=max_ranges,
        max_file_ranges=max_file_ranges,
        pressure=PressureSettings(**pressure),
    )
