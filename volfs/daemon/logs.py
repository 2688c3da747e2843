"""Where the daemon's log goes.

In the foreground (``-f``, and so under systemd) the log goes to stderr, which systemd hands to
the journal. A daemon in the background has no terminal, so its log goes, in this order of
preference, to the journal (its native socket), to syslog (``/dev/log``), or to a file of its
own: ``/run/volfs/MOUNT.log`` for root, ``$XDG_STATE_HOME/volfs/MOUNT.log`` (by default
``~/.local/state/volfs/MOUNT.log``) for other users, MOUNT being the mountpoint as
``systemd-escape --path`` writes it (``/mnt/vol``: ``mnt-vol``). A file is kept to
:data:`LOG_FILE_BYTES` and one older file. Only when none of them can be opened does the log
stay on the stderr the command was started with.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import struct

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
    """``/mnt/vol`` as ``mnt-vol``, as ``systemd-escape --path`` writes it: ``/`` becomes ``-``
    and every other character but letters, digits, ``_`` and ``.`` a ``\\xNN`` escape."""
    path = mountpoint.strip("/")
    return (
        "".join(
            "-"
            if char == "/"
            else char
            if char.isascii() and (char.isalnum() or char in "_.")
            else "".join(f"\\x{byte:02x}" for byte in char.encode(errors="surrogateescape"))
            for char in path
        )
        or "-"
    )


def log_file_path(mountpoint: str) -> str | None:
    """The file a background daemon for ``mountpoint`` logs to when there is no journal or
    syslog, or None if this user has no place for one."""
    if os.geteuid() == 0:
        directory = SYSTEM_LOG_DIRECTORY
    else:
        # The XDG base directory specification's place for logs; relative paths are invalid.
        state = os.environ.get("XDG_STATE_HOME", "")
        home = os.environ.get("HOME", "")
        if state.startswith("/"):
            directory = os.path.join(state, "volfs")
        elif home.startswith("/"):
            directory = os.path.join(home, ".local", "state", "volfs")
        else:
            return None
    return os.path.join(directory, f"{escaped_mountpoint(mountpoint)}.log")


def _file_handler(path: str) -> logging.Handler:
    """A size-bounded handler appending to ``path``, in a directory only its user may enter."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    # Refuse a file planted as a symlink: the log would be written wherever it points.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600))
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=LOG_FILE_BYTES, backupCount=1, encoding="utf-8"
    )
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    return handler


def configure_logging(level: int, *, foreground: bool, mountpoint: str) -> str:
    """Send the daemon's log where it can be read (see the module's docstring).

    Args:
        level: the least severe level logged.
        foreground: the daemon keeps its stderr.
        mountpoint: names the log file, if one is needed.

    Returns:
        Where the log goes: ``stderr``, ``journal``, ``syslog`` or a file's path.
    """
    handler: logging.Handler | None = None
    where = "stderr"
    if not foreground:
        for name, make, text in (
            ("journal", JournalHandler, "%(message)s"),
            ("syslog", _syslog_handler, "volfs[%(process)d]: %(message)s"),
        ):
            try:
                handler = make()
            except OSError:
                continue
            handler.setFormatter(logging.Formatter(text))
            where = name
            break
        path = log_file_path(mountpoint)
        if handler is None and path is not None:
            try:
                handler = _file_handler(path)
                where = path
            except OSError:
                handler = None
    if handler is None:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FOREGROUND_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    return where
