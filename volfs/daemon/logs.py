"""Where the daemon's log goes.

In the foreground (``-f``, and so under systemd) the log goes to stderr, which systemd hands to
the journal. A daemon in the background has no terminal, so its log goes, in this order of
preference, to the journal (its native socket), to syslog (``/dev/log``), or to a file of its
own: ``/run/volfs/MOUNT.log`` for root, ``$XDG_STATE_HOME/volfs/MOUNT.log`` (by default
``~/.local/state/volfs/MOUNT.log``), else ``/tmp/volfs-UID/MOUNT.log``, for other users, MOUNT
being the mountpoint as ``systemd-escape --path`` writes it (``/mnt/vol``: ``mnt-vol``). A file
is kept to :data:`LOG_FILE_BYTES` and one older file, in a directory nobody else may write in.
When none of them can be opened the log is discarded, and the command says so on stderr: a
daemon that kept its caller's stderr would keep a pipe to it open for as long as it serves.
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import socket
import stat
import struct
import sys

#: The journal's native protocol socket.
JOURNAL_SOCKET = "/run/systemd/journal/socket"
#: The syslog socket.
SYSLOG_SOCKET = "/dev/log"
#: Where root's background daemons keep their log files when there is no journal or syslog.
SYSTEM_LOG_DIRECTORY = "/run/volfs"
#: A log file's size before it is rotated (one older file is kept): what clients can make the
#: daemon log must not fill the memory /run lives in.
LOG_FILE_BYTES = 1 << 20

_FOREGROUND_FORMAT = "volfs[%(process)d]: %(levelname)s: %(message)s"
_FILE_FORMAT = "%(asctime)s volfs[%(process)d]: %(levelname)s: %(message)s"

#: syslog priorities of the logging levels (the journal's PRIORITY= field).
_PRIORITIES = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class JournalHandler(logging.Handler):
    """Send records to the journal over its native protocol, one datagram each.

    Every field is sent in the protocol's length-prefixed form, so messages with newlines
    (tracebacks) arrive whole.
    """

    def __init__(self, address: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self._address = address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Fails at once (ENOENT, ECONNREFUSED, EACCES) if nobody listens: the caller falls back.
        self._socket.connect(address)

    def emit(self, record: logging.LogRecord) -> None:
        """Send one record; a failure is reported the way :mod:`logging` reports them."""
        try:
            fields = {
                "MESSAGE": self.format(record),
                "PRIORITY": str(_PRIORITIES.get(record.levelno, 6)),
                "SYSLOG_IDENTIFIER": "volfs",
                "SYSLOG_PID": str(record.process),
            }
            datagram = b"".join(
                name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
                for name, value in fields.items()
                for data in [value.encode(errors="replace")]
            )
            self._socket.send(datagram)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        """Close the socket."""
        self._socket.close()
        super().close()


def _syslog_handler() -> logging.Handler:
    """A handler for syslog; raises OSError if nothing listens on its socket.

    :class:`logging.handlers.SysLogHandler` itself accepts a socket that is not there and then
    loses every record, so the socket is tried first.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
        probe.connect(SYSLOG_SOCKET)
    return logging.handlers.SysLogHandler(address=SYSLOG_SOCKET)


def escaped_mountpoint(mountpoint: str) -> str:
    """``/mnt/vol`` as ``mnt-vol``, as ``systemd-escape --path`` writes it: ``/`` becomes ``-``;
    every other character but letters, digits, ``:``, ``_`` and ``.`` (not leading) a
    ``\\xNN`` escape of each of its bytes."""
    path = mountpoint.strip("/")

    def escaped(index: int, char: str) -> str:
        if char == "/":
            return "-"
        if char.isascii() and (char.isalnum() or char in ":_" or (char == "." and index)):
            return char
        return "".join(f"\\x{byte:02x}" for byte in char.encode(errors="surrogateescape"))

    return "".join(escaped(index, char) for index, char in enumerate(path)) or "-"


def log_file_paths(mountpoint: str) -> list[str]:
    """The files a background daemon for ``mountpoint`` may log to when there is no journal or
    syslog, the preferred first."""
    euid = os.geteuid()
    if euid == 0:
        directories = [SYSTEM_LOG_DIRECTORY]
    else:
        # The XDG base directory specification's place for logs; relative paths are invalid.
        state = os.environ.get("XDG_STATE_HOME", "")
        home = os.environ.get("HOME", "")
        directories = []
        if state.startswith("/"):
            directories.append(os.path.join(state, "volfs"))
        elif home.startswith("/"):
            directories.append(os.path.join(home, ".local", "state", "volfs"))
        directories.append(f"/tmp/volfs-{euid}")
    name = f"{escaped_mountpoint(mountpoint)}.log"
    return [os.path.join(directory, name) for directory in directories]


def _private_directory(directory: str) -> None:
    """Make ``directory`` (0700) unless it exists, and make sure nobody else can put files in
    it: the log is opened by name, so a link planted there would redirect it.

    Raises:
        OSError: it cannot be made, or it belongs to someone else or others may write in it.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise PermissionError(errno.EPERM, "not a directory of this user's alone", directory)


def _file_handler(path: str) -> logging.Handler:
    """A size-bounded handler appending to ``path``, in a directory of this user's alone."""
    _private_directory(os.path.dirname(path))
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=LOG_FILE_BYTES, backupCount=1, encoding="utf-8"
    )
    os.chmod(path, 0o600)
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    return handler


def configure_logging(level: int, *, foreground: bool, mountpoint: str) -> str:
    """Send the daemon's log where it can be read (see the module's docstring).

    Args:
        level: the least severe level logged.
        foreground: the daemon keeps its stderr.
        mountpoint: names the log file, if one is needed.

    Returns:
        Where the log goes: ``stderr``, ``journal``, ``syslog``, a file's path, or ``""`` if
        nowhere (a warning on stderr says so, while the command's caller still sees it).
    """
    handler: logging.Handler | None = None
    where = "stderr"
    if not foreground:
        handler, where = _background_handler(mountpoint)
    if handler is None and foreground:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FOREGROUND_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler or logging.NullHandler())
    root.setLevel(level)
    return where


def _background_handler(mountpoint: str) -> tuple[logging.Handler | None, str]:
    """The first of the journal, syslog and a log file that can be opened, and its name."""
    for name, make, text in (
        ("journal", JournalHandler, "%(message)s"),
        ("syslog", _syslog_handler, "volfs[%(process)d]: %(message)s"),
    ):
        try:
            handler = make()
        except OSError:
            continue
        handler.setFormatter(logging.Formatter(text))
        return handler, name
    reasons = []
    for path in log_file_paths(mountpoint):
        try:
            return _file_handler(path), path
        except OSError as error:
            reasons.append(f"{error.filename}: {error.strerror}")
    # The daemon leaves its caller's stderr once mounted (holding it would keep a pipe open),
    # so this is the last the caller hears.
    print(
        "volfs: warning: no journal, no syslog and no place for a log file "
        f"({'; '.join(reasons)}): the daemon's log is discarded; -f keeps it on stderr",
        file=sys.stderr,
    )
    return None, ""
