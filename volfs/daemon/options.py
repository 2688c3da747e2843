"""Mount options: tmpfs-style sizes and ownership, plus the FUSE options passed through.

``parse_mount_options`` turns the ``-o`` strings into a validated :class:`MountOptions` or
raises :class:`OptionError` with a message fit to show the user as is. Each ``name=value``
option is one row of ``_VALUE_OPTIONS``: the setting it fills and the parser of its value.
"""

from __future__ import annotations

import logging
import os
import re
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from volfs import sizes
from volfs.abi import PAGE_SIZE, pages_for
from volfs.daemon.meminfo import meminfo

#: The most a size cap may be: the arena is one mapping and must fit the address space.
MAX_SIZE = 1 << 46

#: The longest ``fsname=``: all mount options together must fit the kernel's one page.
MAX_FSNAME = 255

#: Default bounds on volatile range records (ranges and runs of purged pages): each costs the
#: daemon a few hundred bytes, so these keep a client's ranges within tens of MiB.
DEFAULT_MAX_RANGES = 131072
DEFAULT_MAX_FILE_RANGES = 65536

#: The PSI window (µs). Without CAP_SYS_RESOURCE the kernel only accepts multiples of 2 s, and
#: a stall threshold must fit within the window.
PSI_WINDOW_US = 2_000_000
#: ``pressure_stall=`` bounds, in milliseconds.
MIN_STALL_MS = 1
MAX_STALL_MS = PSI_WINDOW_US // 1000

#: Defaults: the size cap and the ``MemAvailable`` watermark in percent of RAM, the root
#: directory's mode, the PSI stall threshold (ms) and a pressure event's purge.
DEFAULT_SIZE_PERCENT = 50
DEFAULT_WATERMARK_PERCENT = 2
DEFAULT_MODE = 0o1777
DEFAULT_STALL_MS = 150
DEFAULT_BATCH = 64 << 20

#: ``(uid_t)-1`` tells the kernel "no id": ids stop below it.
NO_ID = 0xFFFFFFFF

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
    #: PSI trigger: purge when "some" tasks stall this long (µs) within a window.
    stall_us: int = DEFAULT_STALL_MS * 1000
    window_us: int = PSI_WINDOW_US
    #: Purge while MemAvailable is below this many bytes (0: no watermark).
    watermark: int = 0
    #: Seconds between watermark samples.
    interval: float = 1.0
    #: Bytes purged per batch.
    batch: int = DEFAULT_BATCH


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
    #: ``log_level=``: the least severe messages logged.
    log_level: int = logging.INFO


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


def split_options(option_strings: Iterable[str]) -> list[str]:
    """Split ``-o`` arguments at commas, dropping empty items."""
    return [item for text in option_strings for item in text.split(",") if item]


# -- the parsers of option values: (name, value, memory) -> the setting ----------------------


def _size(name: str, value: str, memory: int) -> int:
    return parse_size(value, memory=memory, name=name)


def _count(name: str, value: str, _memory: int) -> int:
    return parse_count(name, value)


def _mode(name: str, value: str, _memory: int) -> int:
    if not re.fullmatch(r"[0-7]{1,4}", value):
        raise OptionError(f"{name}={value}: expected octal permission bits such as 1777")
    return int(value, 8)


def _id(name: str, value: str, _memory: int) -> int:
    if not re.fullmatch(r"[0-9]+", value) or int(value) >= NO_ID:
        raise OptionError(f"{name}={value}: expected a numeric id")
    return int(value)


def _purged_reads_zero(name: str, value: str, _memory: int) -> bool:
    if value not in ("eio", "zero"):
        raise OptionError(f"{name}={value}: expected eio or zero")
    return value == "zero"


def _on(name: str, value: str, _memory: int) -> bool:
    if value not in ("on", "off"):
        raise OptionError(f"{name}={value}: expected on or off")
    return value == "on"


def _stall_us(name: str, value: str, _memory: int) -> int:
    if not re.fullmatch(r"[0-9]+", value) or not MIN_STALL_MS <= int(value) <= MAX_STALL_MS:
        raise OptionError(
            f"{name}={value}: expected milliseconds, {MIN_STALL_MS} to {MAX_STALL_MS}"
        )
    return int(value) * 1000


def _watermark(name: str, value: str, memory: int) -> int:
    watermark = parse_size(value, memory=memory, name=name)
    if watermark > memory:
        # MemAvailable never gets that high: volatile data would be purged nonstop.
        raise OptionError(f"{name}={value}: more than the machine's memory")
    return watermark


def _batch(name: str, value: str, memory: int) -> int:
    batch = parse_size(value, memory=memory, name=name)
    if not batch:
        raise OptionError(f"{name}={value}: must be more than 0")
    return batch


def _text(_name: str, value: str, _memory: int) -> str:
    return value


#: ``log_level=`` values and the logging levels they stand for.
LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _log_level(name: str, value: str, _memory: int) -> int:
    if value not in LOG_LEVELS:
        raise OptionError(f"{name}={value}: expected {', '.join(LOG_LEVELS)}")
    return LOG_LEVELS[value]


class _ValueOption(NamedTuple):
    """What a ``name=value`` option sets, how its value is read, and how ``--help`` shows it."""

    #: Whose setting it is: a MountOptions field, a PressureSettings field, libfuse's
    #: (``fsname``), or nobody's (ignored once parsed).
    owner: Literal["mount", "pressure", "fuse", "ignored"]
    #: The field (or libfuse option) it sets.
    setting: str
    #: Reads the value; raises OptionError naming the option.
    parse: Callable[[str, str, int], Any]
    #: The value's form in ``--help`` (``BYTES|N%``); empty for an option not shown there.
    value: str = ""
    #: One line for ``--help``: what it does and its default.
    help: str = ""


_VALUE_OPTIONS: dict[str, _ValueOption] = {
    "size": _ValueOption(
        "mount",
        "size",
        _size,
        "BYTES|N%",
        f"memory cap (K/M/G/T suffixes, % of RAM); default {DEFAULT_SIZE_PERCENT}%",
    ),
    "nr_inodes": _ValueOption(
        "mount", "nr_inodes", _count, "N", "most inodes at once; default half the RAM's pages"
    ),
    "mode": _ValueOption(
        "mount", "mode", _mode, "OCTAL", f"root directory's mode; default {DEFAULT_MODE:o}"
    ),
    "uid": _ValueOption("mount", "uid", _id, "N", "root directory's owner; default the caller"),
    "gid": _ValueOption("mount", "gid", _id, "N", "root directory's group; default the caller's"),
    "fsname": _ValueOption(
        "fuse", "fsname", _text, "NAME", "source shown by mount and df; default the SOURCE"
    ),
    "purged": _ValueOption(
        "mount",
        "purged_reads_zero",
        _purged_reads_zero,
        "eio|zero",
        "reads of purged volatile data fail (eio, default) or read zeros",
    ),
    "pressure": _ValueOption(
        "pressure", "enabled", _on, "on|off", "purge when the system is short of memory; on"
    ),
    "pressure_stall": _ValueOption(
        "pressure",
        "stall_us",
        _stall_us,
        "MS",
        f"purge when tasks stall MS ms in {PSI_WINDOW_US // 1_000_000} s; {DEFAULT_STALL_MS}",
    ),
    "pressure_watermark": _ValueOption(
        "pressure",
        "watermark",
        _watermark,
        "BYTES|N%",
        f"purge while MemAvailable is below it; {DEFAULT_WATERMARK_PERCENT}%, 0 = off",
    ),
    "pressure_batch": _ValueOption(
        "pressure",
        "batch",
        _batch,
        "BYTES",
        f"volatile data one pressure event purges; {DEFAULT_BATCH >> 20}M",
    ),
    "max_ranges": _ValueOption(
        "mount", "max_ranges", _count, "N", f"range records in the mount; {DEFAULT_MAX_RANGES}"
    ),
    "max_file_ranges": _ValueOption(
        "mount",
        "max_file_ranges",
        _count,
        "N",
        f"range records in one file; {DEFAULT_MAX_FILE_RANGES}",
    ),
    "log_level": _ValueOption(
        "mount", "log_level", _log_level, "LEVEL", "debug, info (default), warning or error"
    ),
    # mount.fuse3 passes the type's subtype on; it is always volfs.
    "subtype": _ValueOption("ignored", "subtype", _text),
}


def options_help() -> str:
    """The ``-o`` options as ``volfs --help`` lists them: one a line, then the FUSE flags."""
    shown = [
        (f"{name}={option.value}", option.help)
        for name, option in _VALUE_OPTIONS.items()
        if option.help
    ]
    width = max(len(usage) for usage, _ in shown)
    flags = ", ".join(sorted(FUSE_FLAG_OPTIONS - {"default_permissions"}))
    return "\n".join(
        [
            "mount options (-o, comma-separated):",
            *(f"  {usage:<{width}}  {text}" for usage, text in shown),
            *textwrap.wrap(
                f"FUSE and mount flags passed on: {flags}.",
                width=88,
                initial_indent="  ",
                subsequent_indent="  ",
            ),
        ]
    )


def _is_ignored(name: str, has_value: bool) -> bool:
    """Whether an option is one mount(8), fstab or systemd may add that means nothing here."""
    return (not has_value and name in IGNORED_OPTIONS) or name.startswith(("x-", "comment"))


def _defaults(memory: int, source: str) -> dict[str, dict[str, Any]]:
    """The settings without options, by owner (see :class:`_ValueOption`), for ``memory``."""
    return {
        "mount": {
            "size": memory * DEFAULT_SIZE_PERCENT // 100 // PAGE_SIZE * PAGE_SIZE,
            "nr_inodes": memory // PAGE_SIZE // 2,
            "mode": DEFAULT_MODE,
            "uid": os.getuid(),
            "gid": os.getgid(),
        },
        "pressure": {"watermark": memory * DEFAULT_WATERMARK_PERCENT // 100},
        "fuse": {"fsname": source},
        "ignored": {},
    }


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
    settings = _defaults(memory, source)
    fuse_flags = {"default_permissions"}
    for item in split_options(option_strings):
        name, equals, value = item.partition("=")
        has_value = bool(equals)
        option = _VALUE_OPTIONS.get(name) if has_value else None
        if option is not None:
            settings[option.owner][option.setting] = option.parse(name, value, memory)
        elif not has_value and name in FUSE_FLAG_OPTIONS:
            fuse_flags.add(name)
        elif not _is_ignored(name, has_value):
            raise OptionError(f"unknown mount option '{item}'")
    fsname = settings["fuse"]["fsname"]
    if not fsname or "," in fsname or len(fsname.encode()) > MAX_FSNAME:
        raise OptionError(
            f"fsname={fsname[:40]}: must be a name of 1 to {MAX_FSNAME} bytes without commas"
        )
    return MountOptions(
        **settings["mount"],
        fuse_options=frozenset({*fuse_flags, "subtype=volfs", f"fsname={fsname}"}),
        pressure=PressureSettings(**settings["pressure"]),
    )
