"""The ``vrangectl`` command: volatile ranges of volfs files from a shell.

Volatility ends with the last close of a file, so a shell keeps the file open itself and hands
``vrangectl`` a descriptor path::

    head -c 1M /dev/urandom >/mnt/vol/cache.bin
    exec 3<>/mnt/vol/cache.bin
    vrangectl volatile /dev/fd/3 0 1M        # marked=1048576 purged=0
    vrangectl purge /mnt/vol                 # purged=1048576
    vrangectl nonvolatile /dev/fd/3 0 1M     # marked=1048576 purged=1
    exec 3>&-

Output is ``key=value`` words, tables or (``--json``) JSON on stdout. A failed operation
prints one line naming the file and the reason on stderr and exits 1; a usage error exits 2.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import io
import itertools
import json
import os
import re
import shlex
import stat
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from volfs import __version__
from volfs.abi import (
    PAGE_SIZE,
    SEGMENT_PINNED,
    SEGMENT_PURGED,
    SEGMENT_PURGING,
    SEGMENT_STALE,
    SEGMENT_UNPINNED,
    VOLFS_STATS_FIELDS,
    pages_for,
)
from volfs.client import (
    VRANGE_FULL,
    VRANGE_NONVOLATILE,
    VRANGE_PARTIAL,
    VRANGE_VOLATILE,
    FileInfo,
    SegmentSlot,
    SegmentTable,
    VRange,
    file_info,
    fvrange,
    purge,
    statistics,
    vrange_ranges,
    vrange_status,
)
from volfs.sizes import size_argument

EXIT_FAILURE = 1
T = TypeVar("T")

#: Paths naming a descriptor the calling shell passed down.
_DESCRIPTOR_PATH = re.compile(r"/(?:dev|proc/self)/fd/(\d+)")

EXAMPLES = """\
examples:
  head -c 2M /dev/urandom >/mnt/vol/cache.bin    # a file with data worth caching
  exec 3<>/mnt/vol/cache.bin                     # the shell holds it open
  vrangectl volatile /dev/fd/3 0 1M              # marked=1048576 purged=0
  vrangectl volatile /dev/fd/3 1M 1M --partial   # marked=1048576 purged=0
  vrangectl status /dev/fd/3                     # volatile=2097152 purged=0
  vrangectl purge /mnt/vol --bytes 64K           # purged=1048576: the oldest range goes whole
  vrangectl status /dev/fd/3 --ranges            # volatile=2097152 purged=1048576, and:
                                                 #   START      END     SIZE  FLAGS    STATE
                                                 #       0  1048576  1048576  FULL     purged
                                                 # 1048576  2097152  1048576  PARTIAL  intact
  vrangectl ls /mnt/vol                          # the files holding volatile or purged data:
  #    SIZE  RESIDENT  VOLATILE   PURGED  OPENERS  PATH
  # 2097152   1048576   2097152  1048576        1  /mnt/vol/cache.bin
  # 2097152   1048576   2097152  1048576        -  TOTAL
  vrangectl nonvolatile /dev/fd/3 0 1M           # marked=1048576 purged=1
  vrangectl stats /mnt/vol                       # capacity_bytes=... one counter a line
  exec 3>&-                                      # the last close ends all volatility

Volatility lasts while any descriptor of the file is open, in any process: vrangectl's own
descriptor closes when it exits, so keep the file open in the shell (exec 3<>FILE) and pass
/dev/fd/3; given a file nothing else holds open, volatile warns on stderr that the marking
ended as vrangectl exited (and exits 0: the marking was made). OFFSET, LENGTH and N are bytes
with an optional K, M, G or T suffix (powers of 1024: 64K = 64KiB = 65536); OFFSET and LENGTH
must be multiples of 4096, and LENGTH 0 means up to the end of the file.

exit status: 0 done (warnings and ls's count of what it could not open go to stderr), 1 the
operation failed (one line on stderr says why), 2 usage error.
"""


class CommandError(Exception):
    """An operation failed; the message is the line to print after ``vrangectl: ``."""


def explain(path: str, error: OSError, hint: str = "") -> CommandError:
    """Turn an errno into the one line the user sees, naming ``path``."""
    code = error.errno or errno.EIO
    if code == errno.ENOTTY:
        # Any other filesystem answers the unknown ioctl so; "Inappropriate ioctl" misleads.
        reason = "not a file on a volfs mount"
    elif code == errno.EBADF:
        # The daemon's answer for a read-only descriptor, as for fallocate.
        reason = "descriptor not open for writing"
    else:
        reason = os.strerror(code)
        if code == errno.EPERM:
            hint = hint or "purging needs root or the user who mounted the filesystem"
        if hint:
            reason = f"{reason} ({hint})"
    return CommandError(f"{path}: {reason}")


def warn(message: str) -> None:
    """Print a line on stderr that does not make the command fail."""
    print(f"vrangectl: {message}", file=sys.stderr)


def _inherited_read_only(path: str) -> int | None:
    """The descriptor ``path`` names if it is an inherited read-only one, else None."""
    match = _DESCRIPTOR_PATH.fullmatch(path)
    if match is None:
        return None
    try:
        flags = fcntl.fcntl(int(match[1]), fcntl.F_GETFL)
    except OSError:
        return None
    return int(match[1]) if flags & os.O_ACCMODE == os.O_RDONLY else None


def _closed_descriptor(path: str) -> int | None:
    """The descriptor ``path`` names if it is one that is not open here, else None."""
    match = _DESCRIPTOR_PATH.fullmatch(path)
    if match is None:
        return None
    try:
        os.fstat(int(match[1]))
    except OSError:
        return int(match[1])
    return None


@contextmanager
def opened(path: str, *, writable: bool) -> Iterator[int]:
    """Open ``path`` for an ioctl and close it afterwards.

    ``/dev/fd/N`` is opened anew like any path: a new handle on the shell's file, whose
    volatility is the inode's and so shared. Only when N is read-only is N itself used, since
    reopening it for writing would quietly grant what the shell's descriptor lacks; the daemon
    then refuses with EBADF, as it does for any read-only descriptor.

    Raises:
        CommandError: the file cannot be opened.
    """
    # O_NONBLOCK: opening a FIFO must not hang; it does nothing to a regular file.
    flags = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    inherited = _inherited_read_only(path) if writable else None
    try:
        if inherited is not None:
            fd = os.dup(inherited)
        else:
            fd = os.open(path, flags | (os.O_RDWR if writable else os.O_RDONLY))
    except OSError as error:
        closed = _closed_descriptor(path)
        if closed is not None:
            raise CommandError(
                f"{path}: descriptor {closed} is not open (open the file in the shell first, "
                f"e.g. exec {closed}<>FILE)"
            ) from None
        hint = ""
        if writable and error.errno in (errno.EACCES, errno.EROFS):
            hint = "changing volatility needs the file open for writing"
        raise explain(path, error, hint) from None
    try:
        yield fd
    finally:
        os.close(fd)


def _page_rounded_size(fd: int) -> int:
    """The file's size rounded up to whole pages: where spans must end."""
    return pages_for(os.fstat(fd).st_size) * PAGE_SIZE


def _span_hint(fd: int, offset: int, length: int) -> str:
    """Why the daemon may have called a span invalid (EINVAL), or "" if no reason shows."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if offset % PAGE_SIZE or length % PAGE_SIZE:
        return f"offset and length must be multiples of {PAGE_SIZE}"
    end_of_file = _page_rounded_size(fd)
    end = offset + length if length else offset
    if end > end_of_file:
        return f"the span ends at {end}, past the end of the file at {end_of_file}"
    return ""


def _on_span(path: str, fd: int, offset: int, length: int, call: Callable[[], T]) -> T:
    """Return ``call()``; report a failure as about ``path`` and its span."""
    try:
        return call()
    except OSError as error:
        if error.errno == errno.ENOTTY and not stat.S_ISREG(os.fstat(fd).st_mode):
            # A FIFO or device node on volfs: its ioctls never reach the filesystem.
            raise CommandError(f"{path}: not a regular file") from None
        hint = _span_hint(fd, offset, length) if error.errno == errno.EINVAL else ""
        raise explain(path, error, hint) from None


def cmd_volatile(arguments: argparse.Namespace) -> list[str]:
    """``volatile FILE OFFSET LENGTH [--partial]``.

    The marking succeeded even if vrangectl held the file's only descriptor, so that case
    exits 0 too; but the marking ends as vrangectl exits, which a warning says.
    """
    path, offset, length = arguments.file, arguments.offset, arguments.length
    flags = VRANGE_PARTIAL if arguments.partial else VRANGE_FULL
    with opened(path, writable=True) as fd:
        marked, _purged = _on_span(
            path, fd, offset, length, lambda: fvrange(fd, offset, length, VRANGE_VOLATILE, flags)
        )
        if _sole_opener(fd):
            partial = " --partial" if arguments.partial else ""
            warn(
                f"warning: {path}: nothing else has the file open, so the marking ended when "
                f"vrangectl exited; keep it open in the shell: exec 3<>{shlex.quote(path)}; "
                f"vrangectl volatile /dev/fd/3 {offset} {length}{partial}"
            )
    return [f"marked={marked} purged=0"]


def _sole_opener(fd: int) -> bool:
    """True if ``fd`` is the only open file description of its file, in any process."""
    try:
        return file_info(fd).openers == 1
    except OSError:
        return False  # a daemon too old to say: no warning rather than a false one


def cmd_nonvolatile(arguments: argparse.Namespace) -> list[str]:
    """``nonvolatile FILE OFFSET LENGTH``."""
    path, offset, length = arguments.file, arguments.offset, arguments.length
    with opened(path, writable=True) as fd:
        marked, purged = _on_span(
            path, fd, offset, length, lambda: fvrange(fd, offset, length, VRANGE_NONVOLATILE)
        )
    return [f"marked={marked} purged={int(purged)}"]


#: A row of a table as ``--json`` prints it: column name (the title in lower case) to value.
Record = dict[str, int | str | bool]


def _flags_name(flags: int) -> str:
    return "PARTIAL" if flags == VRANGE_PARTIAL else "FULL"


def range_record(r: VRange) -> Record:
    """One volatile range: ``start end size flags state`` (bytes, END exclusive)."""
    return {
        "start": r.start,
        "end": r.end,
        "size": r.end - r.start,
        "flags": _flags_name(r.flags),
        "state": "purged" if r.purged else "intact",
    }


def _table(records: Sequence[Record], columns: Sequence[str], text_columns: int = 2) -> list[str]:
    """``records`` under their ``columns`` titled in upper case: numbers right-aligned, then
    the last ``text_columns`` columns left-aligned (FLAGS and STATE; PATH), the last of them
    unpadded since it ends the line."""
    table = [[column.upper() for column in columns]]
    table += [[str(record[column]) for column in columns] for record in records]
    numbers = len(columns) - text_columns
    widths = [max(len(row[column]) for row in table) for column in range(len(columns) - 1)]
    return [
        "  ".join(
            [
                cell.rjust(width) if column < numbers else cell.ljust(width)
                for column, (cell, width) in enumerate(zip(row, widths, strict=False))
            ]
            + [row[-1]]
        )
        for row in table
    ]


#: How ``status --ranges`` names segment states.
SEGMENT_STATE_NAMES = {
    SEGMENT_PINNED: "pinned",
    SEGMENT_UNPINNED: "unpinned",
    SEGMENT_PURGING: "purging",
    SEGMENT_PURGED: "purged",
    SEGMENT_STALE: "stale",
}


def segment_record(s: SegmentSlot) -> Record:
    """One segment: ``segment start end size flags state``."""
    return {
        "segment": s.slot,
        "start": s.start,
        "end": s.start + s.length,
        "size": s.length,
        "flags": _flags_name(s.flags),
        "state": SEGMENT_STATE_NAMES.get(s.state, f"garbage({s.state})"),
    }


#: The columns of the two tables of ``status --ranges``, and the keys of their ``--json``.
RANGE_COLUMNS = ("start", "end", "size", "flags", "state")
SEGMENT_COLUMNS = ("segment", *RANGE_COLUMNS)


def _segments_in(fd: int, start: int, end: int) -> list[SegmentSlot]:
    """The segments overlapping ``[start, end)``, whole, in file order; none if the file has
    no table (asking never makes one)."""
    try:
        table = SegmentTable(fd, create=False)
    except OSError as error:
        if error.errno == errno.ENOENT:
            return []
        raise
    with table:
        slots = [s for s in table.slots() if s.start < end and s.start + s.length > start]
    return sorted(slots, key=lambda s: s.start)


def _ranges_in(fd: int, start: int, end: int) -> list[VRange]:
    """The volatile ranges overlapping ``[start, end)``, each whole, in file order."""
    return list(itertools.takewhile(lambda r: r.start < end, vrange_ranges(fd, start)))


def cmd_status(arguments: argparse.Namespace) -> list[str]:
    """``status FILE [OFFSET LENGTH] [--ranges] [--json]``."""
    path, offset, length = arguments.file, arguments.offset or 0, arguments.length or 0
    with opened(path, writable=False) as fd:
        volatile, purged = _on_span(
            path, fd, offset, length, lambda: vrange_status(fd, offset, length)
        )
        if arguments.ranges:
            # The span is valid (the status said so): list every range overlapping it, whole.
            end = offset + length if length else _page_rounded_size(fd)
            ranges = _on_span(path, fd, offset, length, lambda: _ranges_in(fd, offset, end))
            segments = _on_span(path, fd, offset, length, lambda: _segments_in(fd, offset, end))
    report: dict[str, object] = {"volatile": volatile, "purged": purged}
    lines = [f"volatile={volatile} purged={purged}"]
    if arguments.ranges:
        report["ranges"] = range_records = [range_record(r) for r in ranges]
        report["segments"] = segment_records = [segment_record(s) for s in segments]
        lines += _table(range_records, RANGE_COLUMNS)
        if segment_records:
            lines += _table(segment_records, SEGMENT_COLUMNS)
    return [json.dumps(report, indent=2)] if arguments.json else lines


def cmd_purge(arguments: argparse.Namespace) -> list[str]:
    """``purge PATH [--bytes N]``."""
    with opened(arguments.path, writable=False) as fd:
        try:
            purged = purge(fd, arguments.bytes)
        except OSError as error:
            raise explain(arguments.path, error) from None
    return [f"purged={purged}"]


def cmd_stats(arguments: argparse.Namespace) -> list[str]:
    """``stats MOUNTPOINT [--json]``."""
    with opened(arguments.mountpoint, writable=False) as fd:
        try:
            counters = statistics(fd)
        except OSError as error:
            raise explain(arguments.mountpoint, error) from None
    values = {name: counters[name] for name in VOLFS_STATS_FIELDS}
    if arguments.json:
        return [json.dumps(values, indent=2)]
    return [f"{name}={value}" for name, value in values.items()]


#: The columns of ``ls``: bytes, the openers, then the path, last so that paths of any length
#: (and with spaces) leave the numbers aligned, as in fincore and lsof.
LS_COLUMNS = ("size", "resident", "volatile", "purged", "openers", "path")
#: What the kernel appends to the path of an unlinked file in /proc/PID/fd.
_DELETED = " (deleted)"


@dataclass(frozen=True, slots=True)
class ListedFile:
    """A regular file as ``ls`` shows it."""

    #: Its path; for an unlinked file, the one it had.
    path: str
    #: Unlinked, found open through /proc/PID/fd.
    deleted: bool
    #: What the daemon said, ``openers`` not counting vrangectl's own.
    info: FileInfo

    def record(self) -> Record:
        """The file as ``ls --json`` prints it."""
        return {
            "path": self.path,
            "deleted": self.deleted,
            "size": self.info.size,
            "resident": self.info.resident_bytes,
            "volatile": self.info.volatile_bytes,
            "purged": self.info.purged_bytes,
            "openers": self.info.openers,
            "segments": self.info.segments,
        }


@dataclass(slots=True)
class Listing:
    """The regular files ``ls`` found, each once, and how many it could not open."""

    files: list[ListedFile] = field(default_factory=list)
    skipped: int = 0
    #: Why they could not be opened (strerror texts).
    reasons: set[str] = field(default_factory=set)
    _seen: set[tuple[int, int]] = field(default_factory=set)

    def skip(self, error: OSError) -> None:
        """Count a file or directory that could not be opened; one removed meanwhile is
        simply not there."""
        if error.errno != errno.ENOENT:
            self.skipped += 1
            self.reasons.add(os.strerror(error.errno or errno.EIO))

    def first_time(self, seen: os.stat_result) -> bool:
        """True the first time the file ``seen`` describes comes up: a file with several
        names (hard links) is listed once."""
        key = (seen.st_dev, seen.st_ino)
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def add(self, path: str, seen: os.stat_result, opener: str | None = None) -> None:
        """Ask the daemon about the regular file ``path`` (``lstat`` gave ``seen``) through
        ``opener`` (a /proc/PID/fd link for an unlinked file), unless listed already."""
        if not self.first_time(seen):
            return
        try:
            info = _ask(opener or path, seen, follow=opener is not None)
        except OSError as error:
            self.skip(error)
            return
        if info is not None:
            self.files.append(ListedFile(path, opener is not None, info))


def _ask(path: str, seen: os.stat_result, *, follow: bool) -> FileInfo | None:
    """Open ``path``, ask VOLFS_IOC_FILE_INFO and close it: one file open at a time, whatever
    the size of the tree. None if ``path`` is no longer the regular file ``seen`` describes.

    Raises:
        OSError: the file cannot be opened or asked.
    """
    # O_NONBLOCK: a FIFO put in the file's place must not hang the walk.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    fd = os.open(path, flags if follow else flags | os.O_NOFOLLOW)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino) or not stat.S_ISREG(now.st_mode):
            return None
        info = file_info(fd)
    finally:
        os.close(fd)
    return info._replace(openers=info.openers - 1)


def _walk(top: str, device: int, listing: Listing) -> None:
    """Add the regular files below the directory ``top`` to ``listing``: symlinks are not
    followed and mounts below (another ``st_dev``) not entered; directories that cannot be
    read are skipped."""
    pending = [top]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as listed:
                # Read whole before going down: one directory open at a time.
                entries = sorted(listed, key=lambda entry: entry.name)
        except OSError as error:
            listing.skip(error)
            continue
        below = []
        for entry in entries:
            try:
                seen = entry.stat(follow_symlinks=False)
            except OSError as error:
                listing.skip(error)
                continue
            if seen.st_dev != device:
                continue
            if stat.S_ISDIR(seen.st_mode):
                below.append(entry.path)
            elif stat.S_ISREG(seen.st_mode):
                listing.add(entry.path, seen)
        pending.extend(reversed(below))


def _mount_ids(devices: set[int]) -> set[int]:
    """The ids of this namespace's mounts of the filesystems ``devices`` (bind mounts too)."""
    ids = set()
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            major, minor = map(int, fields[2].split(":"))
            if os.makedev(major, minor) in devices:
                ids.add(int(fields[0]))
    return ids


def _mount_id(fdinfo: str) -> int | None:
    """The ``mnt_id`` a ``/proc/PID/fdinfo/N`` file names, None if it cannot be read."""
    try:
        with open(fdinfo) as lines:
            for line in lines:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _held_unlinked(devices: set[int]) -> Iterator[tuple[str, str, os.stat_result]]:
    """The unlinked regular files on ``devices`` that processes the caller may look at hold
    open, as lsof finds them: ``(a /proc/PID/fd link, the file's former path, its status)``,
    once per descriptor.

    Only descriptors on one of those mounts (``mnt_id`` in fdinfo, which reaches no
    filesystem) are looked at further: a stat reaches the file's filesystem, and one of
    another mount may hang (a dead NFS server, a stuck FUSE daemon).
    """
    mounts = _mount_ids(devices)
    for pid in sorted(filter(str.isdigit, os.listdir("/proc")), key=int):
        directory = f"/proc/{pid}/fd"
        try:
            descriptors = os.listdir(directory)
        except OSError:
            continue  # gone, or another user's
        for descriptor in descriptors:
            if _mount_id(f"/proc/{pid}/fdinfo/{descriptor}") not in mounts:
                continue
            link = f"{directory}/{descriptor}"
            try:
                target = os.readlink(link)
                seen = os.stat(link) if target.endswith(_DELETED) else None
            except OSError:
                continue
            if (
                seen is not None
                and seen.st_dev in devices
                and seen.st_nlink == 0
                and stat.S_ISREG(seen.st_mode)
            ):
                yield link, target.removesuffix(_DELETED), seen


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _ls_operand(path: str, listing: Listing) -> tuple[int, str | None] | None:
    """List the operand ``path`` into ``listing``; for a directory return ``(its st_dev,
    the directory whose unlinked files belong to it, None for the whole mount)``.

    Raises:
        CommandError: ``path`` is missing, unreadable, or not on a volfs mount.
    """
    try:
        seen = os.stat(path)
        if stat.S_ISREG(seen.st_mode):
            info = _ask(path, seen, follow=True)
            if info is not None and listing.first_time(seen):
                listing.files.append(ListedFile(path, False, info))
            return None
        if not stat.S_ISDIR(seen.st_mode):
            raise CommandError(f"{path}: not a regular file or directory")
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            statistics(fd)  # ENOTTY off volfs
        finally:
            os.close(fd)
    except OSError as error:
        raise explain(path, error) from None
    _walk(path, seen.st_dev, listing)
    return seen.st_dev, None if os.path.ismount(path) else os.path.realpath(path)


def cmd_ls(arguments: argparse.Namespace) -> list[str]:
    """``ls [--all] [--json] PATH...``."""
    listing = Listing()
    directories = [
        found for path in arguments.paths if (found := _ls_operand(path, listing)) is not None
    ]
    if directories:
        for link, former, seen in _held_unlinked({device for device, _ in directories}):
            if any(
                device == seen.st_dev and (top is None or _within(former, top))
                for device, top in directories
            ):
                listing.add(former, seen, opener=link)
    if listing.skipped:
        what = "file or directory" if listing.skipped == 1 else "files or directories"
        warn(
            f"skipped {listing.skipped} {what} that could not be opened: "
            + ", ".join(sorted(listing.reasons))
        )
    files = sorted(
        (f for f in listing.files if arguments.all or f.info.volatile_bytes or f.info.purged_bytes),
        key=lambda f: (f.deleted, f.path),
    )
    records = [f.record() for f in files]
    total: Record = {"files": len(files)}
    for column in LS_COLUMNS[:4]:  # the bytes
        total[column] = sum(int(r[column]) for r in records)
    if arguments.json:
        return [
            json.dumps({"files": records, "total": total, "skipped": listing.skipped}, indent=2)
        ]
    rows = [{**r, "path": f"{r['path']}{_DELETED}" if r["deleted"] else r["path"]} for r in records]
    return _table([*rows, {**total, "openers": "-", "path": "TOTAL"}], LS_COLUMNS, 1)


def _wrap(text: str) -> str:
    """Fill a help paragraph (the raw formatter keeps the examples' layout, and so this too)."""
    return textwrap.fill(text, 88)


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser, one subcommand per operation."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="vrangectl",
        description=_wrap(
            "Mark byte ranges of files on a volfs mount volatile (the filesystem may "
            "drop them under memory pressure) or non-volatile, inspect and purge them, and list "
            "the files that hold volatile data."
        ),
        epilog=EXAMPLES,
        formatter_class=formatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"vrangectl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def span_arguments(command: argparse.ArgumentParser, *, optional: bool = False) -> None:
        nargs = "?" if optional else None
        command.add_argument(
            "offset", type=size_argument, nargs=nargs, metavar="OFFSET", help="first byte"
        )
        command.add_argument(
            "length", type=size_argument, nargs=nargs, metavar="LENGTH", help="0: to the end"
        )

    volatile = commands.add_parser(
        "volatile",
        help="mark a range volatile: prints marked=BYTES purged=0",
        description=_wrap(
            "Mark [OFFSET, OFFSET+LENGTH) volatile: volfs may purge it from now on, "
            "until it is marked non-volatile or the file's last descriptor closes."
        ),
        epilog="example:\n  head -c 1M /dev/urandom >/mnt/vol/cache.bin\n"
        "  exec 3<>/mnt/vol/cache.bin\n"
        "  vrangectl volatile /dev/fd/3 0 1M        # marked=1048576 purged=0",
        formatter_class=formatter,
    )
    volatile.add_argument("file", metavar="FILE", help="a file on a volfs mount")
    span_arguments(volatile)
    volatile.add_argument(
        "--partial",
        action="store_true",
        help="let volfs purge part of the range, a page at a time (default: all or nothing)",
    )
    volatile.set_defaults(run=cmd_volatile)

    nonvolatile = commands.add_parser(
        "nonvolatile",
        help="mark a range non-volatile: prints marked=BYTES purged=0|1",
        description=_wrap(
            "Mark [OFFSET, OFFSET+LENGTH) non-volatile. purged=1 says some of it was "
            "purged meanwhile: those bytes read as zeros now and must be regenerated."
        ),
        epilog="example:\n  vrangectl nonvolatile /dev/fd/3 0 1M     # marked=1048576 purged=1",
        formatter_class=formatter,
    )
    nonvolatile.add_argument("file", metavar="FILE", help="a file on a volfs mount")
    span_arguments(nonvolatile)
    nonvolatile.set_defaults(run=cmd_nonvolatile)

    status = commands.add_parser(
        "status",
        usage="vrangectl status [-h] [-r] [--json] FILE [OFFSET LENGTH]",
        help="show volatile and purged bytes: prints volatile=BYTES purged=BYTES",
        description=_wrap(
            "Count the volatile bytes of the file (or of [OFFSET, OFFSET+LENGTH)) and "
            "the purged ones, which fail to read (EIO) until rewritten or marked non-volatile. "
            "With --ranges, also list the volatile ranges overlapping the span, whole, a range a "
            "line: START END SIZE (bytes, END exclusive), FLAGS FULL or PARTIAL as marked, STATE "
            "purged if any of it was purged since it was marked (nonvolatile would report "
            "purged=1), else intact. Ranges that only touch are listed apart, and a purge that "
            "takes the tail of a PARTIAL range leaves that tail a range of its own. Unpinned "
            "segments count as volatile; if the file has segments, --ranges lists them after "
            "the ranges: SEGMENT (its index in the file's table), START END SIZE FLAGS as "
            "registered, STATE pinned, unpinned, purging or purged. Any descriptor will do, "
            "read-only included."
        ),
        epilog="examples:\n"
        "  vrangectl status /dev/fd/3                # volatile=1048576 purged=0\n"
        "  vrangectl status /mnt/vol/cache.bin 0 64K --ranges   # and the ranges, one a line",
        formatter_class=formatter,
    )
    status.add_argument("file", metavar="FILE", help="a file on a volfs mount")
    span_arguments(status, optional=True)
    status.add_argument(
        "-r",
        "--ranges",
        action="store_true",
        help="also list the volatile ranges and the segments, one a line",
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead: volatile, purged and, with --ranges, lists of "
        "ranges and segments with the table's columns as keys",
    )
    status.set_defaults(run=cmd_status, subparser=status)

    purge_command = commands.add_parser(
        "purge",
        help="purge volatile data of the whole mount: prints purged=BYTES",
        description=_wrap(
            "Purge volatile data of the mount holding PATH, least recently marked "
            "first, as memory pressure would. Needs root or the user who mounted the filesystem."
        ),
        epilog="examples:\n  vrangectl purge /mnt/vol                  # all of it\n"
        "  vrangectl purge /mnt/vol --bytes 16M      # at least 16 MiB, if there is that much",
        formatter_class=formatter,
    )
    purge_command.add_argument("path", metavar="PATH", help="any file or directory of the mount")
    purge_command.add_argument(
        "--bytes",
        type=size_argument,
        default=0,
        metavar="N",
        help="purge at least N bytes (default: all volatile data)",
    )
    purge_command.set_defaults(run=cmd_purge)

    stats = commands.add_parser(
        "stats",
        help="show the filesystem's counters",
        description=_wrap(
            "Print the counters of the volfs mounted at MOUNTPOINT (any file or "
            f"directory of it will do), one key=value a line: {', '.join(VOLFS_STATS_FIELDS)}."
        ),
        epilog="examples:\n  vrangectl stats /mnt/vol\n  vrangectl stats /mnt/vol --json",
        formatter_class=formatter,
    )
    stats.add_argument("mountpoint", metavar="MOUNTPOINT", help="a volfs mount")
    stats.add_argument("--json", action="store_true", help="print one JSON object instead")
    stats.set_defaults(run=cmd_stats)

    ls = commands.add_parser(
        "ls",
        help="list the files holding volatile or purged data, with their bytes",
        description=_wrap(
            "List the regular files below each PATH (a volfs mount, or a directory or "
            "file on one) that hold volatile or purged data, or with --all every regular file, "
            "a file a line: SIZE, RESIDENT (memory its data holds), VOLATILE and PURGED (bytes, "
            "as status counts them), OPENERS (open file descriptions of it in all processes, "
            "vrangectl's own not counted; volatility ends with the last), PATH; then a TOTAL "
            "line. Symlinks are not followed, mounts below not entered, and a file with several "
            "names is listed once. Unlinked files still held open, which keep their volatile "
            "data, are listed as PATH (deleted) if their processes can be looked at "
            "(/proc/PID/fd), as lsof finds them. Files and directories that cannot be opened "
            "are skipped, with one line on stderr saying how many; that is not an error. One "
            "file is open at a time, and only for the query."
        ),
        epilog="examples:\n"
        "  vrangectl ls /mnt/vol                     # the files with volatile or purged data\n"
        "  vrangectl ls --all --json /mnt/vol/cache  # every file below, as JSON",
        formatter_class=formatter,
    )
    ls.add_argument(
        "paths", nargs="+", metavar="PATH", help="a volfs mount, or a directory or file on one"
    )
    ls.add_argument("-a", "--all", action="store_true", help="list every regular file")
    ls.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead: files (path, deleted, size, resident, volatile, "
        "purged, openers, segments), total and skipped",
    )
    ls.set_defaults(run=cmd_ls)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vrangectl`` command."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "status" and arguments.length is None and arguments.offset is not None:
        arguments.subparser.error("give both OFFSET and LENGTH, or neither")
    run: Callable[[argparse.Namespace], list[str]] = arguments.run
    try:
        lines = run(arguments)
    except CommandError as error:
        print(f"vrangectl: {error}", file=sys.stderr)
        return EXIT_FAILURE
    if isinstance(sys.stdout, io.TextIOWrapper):
        # Paths are bytes: printed as they are, whatever their encoding, as ls(1) does.
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as coreutils do. Python would
        # complain again flushing stdout at exit, so it gets /dev/null instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
