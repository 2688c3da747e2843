"""A single-producer, single-consumer message ring in one shared file, consumed part volatile.

Two independent processes open the same file (any two: no common parent needed), map it with
``mmap(MAP_SHARED)`` and pass variable-length byte messages through it::

    # process A                                  # process B
    with Producer("/mnt/vol/ring", capacity=16 << 20) as ring:
        ring.send(b"hello")                      with Consumer("/mnt/vol/ring") as ring:
                                                     for message in ring:  # until A closes
                                                         print(message)

On volfs the ring's data area is a row of *segments* (:class:`volfs.client.SegmentTable`,
64 KiB each by default). The consumer unpins each segment as soon as it has consumed all of it,
and the producer pins a segment before it writes into it: at any moment only the segments
holding messages not yet received, and the one the producer is filling, are pinned; volfs may
purge every other page of the ring whenever it needs memory, while the ring is busy as well as
when it is idle. A pin or an unpin is a compare-and-swap in memory shared with the daemon, no
system call, so the ring pays for volatility at memory speed. Messages not yet received are
never volatile and never lost.

File layout
-----------
Page 0 is the header, never volatile: the static geometry and, each group on a cache line of
its own and written by one side only, the indices and the two endpoints' pid and state. The
data area (``capacity`` bytes) follows, cut into ``capacity / segment_size`` segments, at least
two. Positions are absolute byte counts since the ring was created (``head``: bytes published
by the producer; ``tail``: bytes consumed), mapped into the data area modulo ``capacity``. A
message is a record: an 8-byte length, then the payload, padded to 8 bytes. Records wrap
around the end of the data area (they are copied in two pieces), so a message may span any
number of pages and segments.

Segments
--------
The consumer publishes ``released``, a position on a segment boundary: the segments before it
are consumed and unpinned. The producer may write position ``p`` only if
``p < released + capacity``. So it enters a segment only once the consumer has consumed and
unpinned all of the segment's previous lap, and the two never share a segment the consumer
could unpin under the producer.

- The consumer, as soon as its tail has passed the end of a segment, unpins it and then
  publishes ``released`` past it. It never reads a segment again after unpinning it.
- The producer pins the segments a record will occupy before it writes the record (those it
  has not pinned yet in this lap). A pin that reports the segment purged means only consumed
  data was lost: the producer writes fresh data over the zeros (counted in
  :attr:`RingStatistics.purged`).
- So what is pinned at any time is the segments from the one holding ``tail`` to the one
  holding ``head`` (the producer pins no further ahead than its current record). An idle ring
  whose consumer has caught up keeps one segment pinned at most, besides the header page.
- Each side touches only pinned segments through its mapping: a purge never takes a message,
  and no process touches a purged page (which would raise SIGBUS).

The table belongs to the file: every endpoint gets it (``SegmentTable(fd)``) and finds the
segments in it, and it ends with the file's last close (pins would then fail with ESTALE; a
ring nobody has open keeps its consumed pages as plain memory until an endpoint comes). The
endpoints set up their segments one at a time, under an OFD lock on a header byte: each
looks for a segment spanning each of the data area's segments in the table (any slot, checked
by its start and length) and registers those it does not find, pinned. An endpoint that
registers any has a table nobody else has set up (an endpoint attached holds the file open and
so the table, whose segments it found or registered before it touched the data area): it pins
the segments holding unconsumed messages and unpins the rest, from the header's indices.
Registering over pages that were purged under an earlier table and that nobody was told of
fails (EBUSY); those are consumed data, so the endpoint acknowledges them with one
NON_VOLATILE call and registers again.

Afterwards each side tidies what a predecessor left behind: a consumer unpins the segments
behind its tail that it finds unreleased (its predecessor died between the two), and a
producer unpins those ahead of ``head`` up to ``released + capacity`` (a predecessor that
died had pinned ahead; they hold nothing and only the producer pins). A producer that closes
unpins the segments ahead of ``head`` that it had pinned.

Maximum message size
--------------------
``max_message = capacity - segment_size``. The consumer gives segments back whole, so once it
has caught up the producer may write up to ``released + capacity``, where ``released`` is the
start of the segment holding ``head``; a record of ``8 + capacity - segment_size`` bytes
always fits then. Larger messages raise :class:`ValueError` at once, since waiting could never
make them fit.

Memory ordering
---------------
Each index has a single writer and is an aligned 8-byte word, read and written as an item of a
``memoryview`` of the mapping cast to ``"Q"``: CPython does that with one 8-byte ``memcpy``,
which compiles to one load or store instruction, atomic on x86-64 for an aligned word.
(``struct.pack_into`` would not do: it clears the destination before it writes the value, so
the other side can read 0 in between.) The producer copies a record into the mapping and only
then stores ``head``; the consumer loads ``head`` and only then reads the record. The consumer
unpins a segment (a locked compare-and-swap, a full barrier) before it stores ``released``;
the producer loads ``released`` before it pins. x86-64 keeps stores in program order and loads
in program order (TSO), and each copy is a separate C call the compiler cannot move across
another, so no other fences are needed. Weakly ordered CPUs (ARM, POWER) would need
release/acquire fences, which Python does not offer: the ring assumes x86-64.

Waiting
-------
There is no futex, eventfd or FIFO both sides could share without a common parent, so a blocked
endpoint polls: it re-checks at once a few times (yielding the CPU), then sleeps 20 us,
doubling up to 1 ms per check. A message sent to an idle consumer is therefore seen within
about a millisecond; a busy one sees it at once.

Throughput
----------
Messages are copied into and out of the mapping at memory speed; each side makes one pin or
unpin (a fraction of a microsecond) per segment it passes, and no call to the daemon at all
once both have attached. On a FUSE filesystem the kernel writes dirty mapped pages back to the
daemon, and once a FUSE filesystem holds more dirty pages than its share of the dirty limit
(``/sys/class/bdi/<device>/max_bytes``, about 1% of it: some 47 MiB on a machine with 24 GiB)
it throttles the writer to the daemon's write speed. A ring meant to stream fast should stay
well below that, e.g. 16 MiB; a large ring works as well, only slower while it is busy. A
segment volfs purged costs the producer a page fault per page when it reuses it (the kernel
asks the daemon for each page before the write).

Closing and vanishing
---------------------
Each endpoint holds an open-file-description lock (``F_OFD_SETLK``) on a byte of the header
while it is attached, which the kernel drops when the process dies however it dies (pid reuse
cannot fool it), and records its pid, its state and a session number (one per attach) in the
header. A peer whose state says attached but whose lock is gone has vanished. What each side
sees:

- The producer closed: the consumer receives every message sent, then
  :class:`RingClosedError` once (iteration stops); a receive after that waits for the next
  producer to attach. A producer that closed before this consumer attached counts too (its
  messages and its end are still in the ring), unless a consumer already saw its end.
- The producer vanished while this consumer was attached: the same, with
  :class:`PeerVanishedError`. A producer that had vanished before the consumer attached does
  not count: the consumer receives what it left and waits for the next producer.
- The consumer closed or vanished while this producer was attached: every send raises
  :class:`RingClosedError` or :class:`PeerVanishedError` until another consumer attaches (a
  vanished consumer is noticed when the producer has to wait, or has written a MiB since it
  last looked: the lock probe is a system call).
  Messages not received stay in the ring for the next consumer. A consumer that had closed
  or vanished before the producer attached does not count: the producer fills the ring for
  the next one.
- A producer that closes after a send or ``check_peer`` told it that its consumer had gone,
  with no consumer attached since, broke its stream off rather than ended it: its state says
  so (``_LEFT``), and the next consumer receives what is left and waits for the next
  producer instead of reporting an end.

So either side, started again after the other died (or after the survivor gave up and
closed), goes on with the same ring: a consumer receives what is left and then waits for a
producer, a producer goes on from ``head`` for whichever consumer comes. Positions live in
the header, so no message is lost or received twice: the consumer stores ``tail`` as soon as
it has copied a message out, and a record the producer had not published when it died was
never sent.

The ring assumes one thread per endpoint; the endpoint objects are not thread-safe. Both ends
of a ring on volfs must use segments (``volatile=True``, the default) or both not: a producer
without segments would write into segments the consumer unpinned.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self

from volfs.abi import PAGE_SIZE, SEGMENTS_PER_FILE_MAX
from volfs.client import VRANGE_NONVOLATILE, Segment, SegmentTable, fvrange, vrange_status

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "PAGE_SIZE",
    "Consumer",
    "PeerVanishedError",
    "Producer",
    "RingBusyError",
    "RingClosedError",
    "RingError",
    "RingStatistics",
    "RingTimeoutError",
    "create_ring",
    "default_segment_size",
]

#: The largest default segment: what the consumer gives back and the producer pins at once.
DEFAULT_SEGMENT_SIZE: Final = 64 << 10

MAGIC: Final = b"volring\x00"
#: 2: the data area is a row of volfs segments, given back whole (1 marked ranges).
VERSION: Final = 2

#: magic, version, page size, capacity, segment size.
_GEOMETRY = struct.Struct("=8sIIQQ")
#: The pid word read before the file is mapped (RingBusyError).
_PID = struct.Struct("Q")

# Header words (index = byte offset / 8), each group on a cache line (64 bytes) of its own
# and written by one side only.
_HEAD: Final = 8  # producer: bytes published
_TAIL: Final = 16  # consumer: bytes consumed
_RELEASED: Final = 17  # consumer: the segments before it are consumed and unpinned
_LINE: Final = {"producer": 24, "consumer": 32}  # pid, then status
_STATUS: Final = 1  # within the line: session << 2 | state, one word so both change at once
_ACKED: Final = 34  # consumer: the producer session whose end it reported
_CONSUMER_STATUS: Final = 32 + _STATUS
#: Header bytes each endpoint keeps an OFD write lock on while it is attached.
_LOCK_BYTE: Final = {"producer": 2048, "consumer": 2049}
#: Header byte locked while an endpoint sets up its segments (see "Segments").
_SETUP_LOCK_BYTE: Final = 2050

# Endpoint states, the low two bits of the status word.
_NEVER: Final = 0
_ATTACHED: Final = 1
_CLOSED: Final = 2
#: A producer closed after it was told that its consumer had gone, before another consumer
#: attached: its stream broke off, so a consumer does not take the close for its end.
_LEFT: Final = 3
_STATE_BITS: Final = 2
_STATE_MASK: Final = 3

#: struct flock on x86-64: l_type, l_whence, l_start, l_len, l_pid (32 bytes).
_FLOCK = struct.Struct("hhqqi4x")

_RECORD_HEADER: Final = 8
#: A producer sending without waiting looks for a vanished consumer (a system call) once it
#: has written this many bytes since it last looked.
_PEER_CHECK_BYTES: Final = 1 << 20
#: A ring has at least this many segments: one the consumer reads, one the producer fills.
_SEGMENTS_AT_LEAST: Final = 2
#: A default segment is at most this part of the capacity (and so of the largest message).
_DEFAULT_SEGMENTS_AT_LEAST: Final = 4

# Waiting: re-check this many times at once, then sleep from the first to the last delay,
# doubling.
_SPINS: Final = 20
_FIRST_SLEEP: Final = 20e-6
_LAST_SLEEP: Final = 1e-3

Role = Literal["producer", "consumer"]
Message = bytes | bytearray | memoryview


class RingError(Exception):
    """A ring cannot be used: not a ring file, not on volfs, corrupt."""


class RingBusyError(RingError):
    """Another endpoint is already attached to the ring in the same role."""


class RingClosedError(RingError):
    """The other side closed the ring (for a consumer: and every message has been received)."""


class PeerVanishedError(RingError):
    """The other side went away without closing the ring (killed, crashed)."""


class RingTimeoutError(RingError, TimeoutError):
    """A send or receive did not complete within its timeout."""


@dataclass(frozen=True, slots=True)
class RingStatistics:
    """What one endpoint has done since it attached."""

    #: Messages sent (producer) or received (consumer).
    messages: int
    #: Payload bytes of those messages.
    payload_bytes: int
    #: Times the endpoint found the ring full (producer) or empty (consumer) and had to wait.
    waits: int
    #: Segments pinned: by the producer before writing into them, by an endpoint that set up
    #: a fresh table for those holding unconsumed messages.
    pins: int
    #: Segments unpinned: by the consumer once consumed, by the producer ahead of ``head``
    #: (when it attaches and closes), by an endpoint that set up a fresh table.
    unpins: int
    #: Segments found purged (consumed data volfs had thrown away) by a pin, or on setting up
    #: a fresh table.
    purged: int


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def default_segment_size(capacity: int) -> int:
    """The segment size :func:`create_ring` picks: the largest multiple of 4096 up to 64 KiB
    and a quarter of the capacity that divides the capacity (larger only if a table could not
    hold that many segments)."""
    pages = capacity // PAGE_SIZE
    fewest = -(-pages // SEGMENTS_PER_FILE_MAX)  # pages a segment needs for the table's sake
    most = max(fewest, min(DEFAULT_SEGMENT_SIZE // PAGE_SIZE, pages // _DEFAULT_SEGMENTS_AT_LEAST))
    below = (n for n in range(most, fewest - 1, -1) if n > 0 and pages % n == 0)
    above = (n for n in range(most + 1, pages // 2 + 1) if pages % n == 0)
    return PAGE_SIZE * next(below, next(above, 1))


def _check_geometry(capacity: int, segment_size: int) -> str | None:
    """What is wrong with a ring of this geometry, or None."""
    if capacity < 2 * PAGE_SIZE or capacity % PAGE_SIZE:
        return f"ring capacity {capacity} must be a multiple of {PAGE_SIZE}, at least two pages"
    if (
        segment_size < PAGE_SIZE
        or segment_size % PAGE_SIZE
        or capacity % segment_size
        or not _SEGMENTS_AT_LEAST <= capacity // segment_size <= SEGMENTS_PER_FILE_MAX
    ):
        return (
            f"segment size {segment_size} must be a multiple of {PAGE_SIZE} that divides the "
            f"capacity {capacity} into {_SEGMENTS_AT_LEAST} to {SEGMENTS_PER_FILE_MAX} segments"
        )
    return None


def create_ring(
    path: str | os.PathLike[str],
    capacity: int,
    *,
    segment_size: int | None = None,
    exist_ok: bool = False,
) -> bool:
    """Create a ring file of ``capacity`` data bytes (plus one header page).

    The file appears atomically (made under a temporary name, then linked into place), so two
    processes may race to create the same ring: one wins, the other opens its file.

    Args:
        path: where the ring file goes (on volfs, or any filesystem with ``volatile=False``).
        capacity: bytes of the data area, a multiple of 4096 and at least two pages.
        segment_size: bytes of each segment, the unit the consumer gives back and the producer
            pins: a multiple of 4096 that divides the capacity into 2 to 131072 segments. The
            largest message is the capacity minus one segment. The default is
            :func:`default_segment_size`.
        exist_ok: if the file exists already, leave it and return False instead of raising.

    Returns:
        True if this call created the file.

    Raises:
        ValueError: a bad capacity or segment size.
        FileExistsError: the file exists and ``exist_ok`` is false.
    """
    if segment_size is None:
        segment_size = default_segment_size(capacity)
    problem = _check_geometry(capacity, segment_size)
    if problem is not None:
        raise ValueError(problem)
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new")
    fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        os.ftruncate(fd, PAGE_SIZE + capacity)
        os.pwrite(fd, _GEOMETRY.pack(MAGIC, VERSION, PAGE_SIZE, capacity, segment_size), 0)
        try:
            os.link(temporary, path)
        except FileExistsError:
            if not exist_ok:
                raise
            return False
        return True
    finally:
        os.close(fd)
        os.unlink(temporary)


class _Endpoint:
    """What both ends share: the mapping, the header, the lock, the peer, the segments."""

    _role: Role
    _peer: Role

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        capacity: int | None = None,
        segment_size: int | None = None,
        volatile: bool = True,
    ) -> None:
        #: The ring file.
        self.path = Path(path)
        #: Whether this endpoint pins and unpins segments (False: any filesystem, no
        #: volatility).
        self.volatile = volatile
        self._messages = self._payload_bytes = self._waits = 0
        self._pins = self._unpins = self._purged = 0
        #: A peer session whose end is not (or no longer) reported.
        self._ignored_session = 0
        self._table: SegmentTable | None = None
        #: The data area's segments in file order (none without volatility).
        self._segments: list[Segment] = []
        if capacity is not None:
            create_ring(self.path, capacity, segment_size=segment_size, exist_ok=True)
        self._mm: mmap.mmap | None = None
        self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._attach()
        except BaseException:
            self._detach()
            raise

    def _attach(self) -> None:
        self._read_geometry()
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, self._flock(_LOCK_BYTE[self._role]))
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            pid = _PID.unpack(os.pread(self._fd, 8, 8 * _LINE[self._role]))[0]
            raise RingBusyError(
                f"{self.path}: a {self._role} is already attached (pid {pid})"
            ) from None
        mm = mmap.mmap(self._fd, PAGE_SIZE + self.capacity, mmap.MAP_SHARED)
        # The file as 8-byte words: the indices, the states and the record lengths. Item
        # access is one 8-byte memcpy (see "Memory ordering"); struct.pack_into is not.
        words = self._words = memoryview(mm).cast("Q")
        self._mm = mm
        if self.volatile:
            self._set_up_segments()
        # The lock is taken before the state says attached, and the state says closed before
        # the lock goes: "attached" without the lock means the process died.
        line = _LINE[self._role]
        self._session = (words[line + _STATUS] >> _STATE_BITS) + 1
        words[line] = os.getpid()
        words[line + _STATUS] = self._session << _STATE_BITS | _ATTACHED

    def _read_geometry(self) -> None:
        """Check the header and the file, and take the ring's geometry from them."""
        geometry = os.pread(self._fd, _GEOMETRY.size, 0)
        if len(geometry) < _GEOMETRY.size or geometry[:8] != MAGIC:
            raise RingError(f"{self.path}: not a ring file")
        _magic, version, page_size, capacity, segment = _GEOMETRY.unpack(geometry)
        if version != VERSION or page_size != PAGE_SIZE:
            raise RingError(f"{self.path}: ring version {version}, page size {page_size}")
        problem = _check_geometry(capacity, segment)
        if problem is not None:
            raise RingError(f"{self.path}: corrupt header: {problem}")
        if os.fstat(self._fd).st_size != PAGE_SIZE + capacity:
            raise RingError(f"{self.path}: file size does not match the ring's capacity")
        #: Bytes of the data area.
        self.capacity: int = capacity
        #: Bytes of each segment: what the consumer gives back and the producer pins at once.
        self.segment_size: int = segment
        #: The largest message the ring takes: the capacity minus one segment.
        self.max_message: int = capacity - segment
        if self.volatile:
            try:
                vrange_status(self._fd, 0, PAGE_SIZE)
            except OSError as error:
                if error.errno != errno.ENOTTY:
                    raise
                raise RingError(
                    f"{self.path}: not on a volfs mount (use volatile=False elsewhere)"
                ) from None

    def _set_up_segments(self) -> None:
        """Get the file's table and find or register the data area's segments in it.

        One endpoint at a time (the setup lock); see "Segments" in the module docstring.
        """
        setup = self._flock(_SETUP_LOCK_BYTE)
        fcntl.fcntl(self._fd, fcntl.F_OFD_SETLKW, setup)
        try:
            count = self.capacity // self.segment_size
            table = self._table = SegmentTable(self._fd, count)
            size = self.segment_size
            found = {slot.start: slot.slot for slot in table.slots() if slot.length == size}
            registered = False
            for offset in range(PAGE_SIZE, PAGE_SIZE + self.capacity, size):
                index = found.get(offset)
                if index is None:
                    index = self._register(table, offset)
                    registered = True
                self._segments.append(Segment(table, index, offset, size, False))
            if registered:
                self._settle()
        finally:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, self._flock(_SETUP_LOCK_BYTE, fcntl.F_UNLCK))

    def _register(self, table: SegmentTable, offset: int) -> int:
        """Register the segment at file ``offset``; return its slot."""
        size = self.segment_size
        try:
            return table.register(offset, size).index
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise RingError(
                    f"{self.path}: the file's segment table ({table.capacity} slots) has no "
                    "room for the ring's segments"
                ) from None
            if error.errno != errno.EBUSY:
                raise
        # Pages purged under a table that has ended, nobody told: consumed data (only
        # unpinned segments are purged). Acknowledge them, and they read as zeros.
        try:
            self._purged += fvrange(self._fd, offset, size, VRANGE_NONVOLATILE)[1]
            return table.register(offset, size).index
        except OSError as error:
            if error.errno != errno.EBUSY:
                raise
            raise RingError(
                f"{self.path}: bytes {offset}-{offset + size} are in a segment that is not "
                "the ring's"
            ) from None

    def _settle(self) -> None:
        """Pin the segments holding unconsumed messages, unpin the others.

        For the endpoint that registered segments: nobody else can touch the data area until
        it lets go of the setup lock, so the header's indices hold still.
        """
        size, count = self.segment_size, len(self._segments)
        words = self._words
        held = {n % count for n in range(words[_TAIL] // size, -(-words[_HEAD] // size))}
        for number, segment in enumerate(self._segments):
            if number in held:
                self._purged += segment.pin()
                self._pins += 1
            else:
                segment.unpin()
                self._unpins += 1

    def _unpin(self, start: int, end: int) -> None:
        """Unpin the segments of positions [start, end) (segment boundaries)."""
        if not self.volatile:
            return
        size, segments = self.segment_size, self._segments
        for position in range(start, end, size):
            segments[position // size % len(segments)].unpin()
            self._unpins += 1

    def _detach(self) -> None:
        """Unmap and close; the kernel drops the OFD locks with the last reference."""
        if self._mm is not None:
            self._words.release()
            self._mm.close()
            self._mm = None
        if self._table is not None:
            self._segments = []
            self._table.close()
            self._table = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @staticmethod
    def _flock(byte: int, kind: int = fcntl.F_WRLCK) -> bytes:
        return _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._mm is None

    def statistics(self) -> RingStatistics:
        """Counters of this endpoint since it attached."""
        return RingStatistics(
            self._messages,
            self._payload_bytes,
            self._waits,
            self._pins,
            self._unpins,
            self._purged,
        )

    def _peer_end(self) -> tuple[type[RingError], int, int] | None:
        """How the other side's current session ended, if it did and is not ignored.

        Returns:
            None while the peer is attached (or never was, or its end is ignored); else the
            exception class to raise, the peer's pid and its session.
        """
        line = _LINE[self._peer]
        status = self._words[line + _STATUS]
        pid = self._words[line]
        session, state = status >> _STATE_BITS, status & _STATE_MASK
        if session == self._ignored_session or state in (_NEVER, _LEFT):
            return None
        if state == _CLOSED:
            return RingClosedError, pid, session
        probe = fcntl.fcntl(self._fd, fcntl.F_OFD_GETLK, self._flock(_LOCK_BYTE[self._peer]))
        if _FLOCK.unpack(probe)[0] != fcntl.F_UNLCK:
            return None
        # Between the two looks it may have closed (closing sets the state before the lock
        # goes), or a new peer may have come (taking the lock before setting the state).
        if self._words[line + _STATUS] != status:
            return None
        return PeerVanishedError, pid, session

    def _peer_error(self, kind: type[RingError], pid: int) -> RingError:
        if kind is RingClosedError:
            return kind(f"{self.path}: the {self._peer} (pid {pid}) closed the ring")
        return kind(f"{self.path}: the {self._peer} (pid {pid}) went away without closing")

    def _closed_error(self) -> ValueError:
        return ValueError(f"{self.path}: this ring {self._role} is closed")

    def _set_state_closed(self, state: int = _CLOSED) -> None:
        self._words[_LINE[self._role] + _STATUS] = self._session << _STATE_BITS | state

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def check_peer(self) -> None:
        """Raise now what the next send or receive would raise about the other side.

        Sends and receives look at the other side by themselves whenever they wait; this is
        for a program that wants to know before it next has to (one fcntl call).

        Raises:
            RingClosedError: the other side closed the ring (a consumer: and every message
                has been received).
            PeerVanishedError: the other side went away without closing (likewise).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Detach cleanly (the other side sees :class:`RingClosedError`); idempotent."""
        raise NotImplementedError


class _Backoff:
    """Polling with exponential backoff: a few immediate re-checks, then 20 us to 1 ms sleeps."""

    __slots__ = ("deadline", "delay", "spins", "started")

    def __init__(self, timeout: float | None) -> None:
        self.started = time.monotonic()
        self.deadline = None if timeout is None else self.started + timeout
        self.spins = 0
        self.delay = _FIRST_SLEEP

    @property
    def sleeping(self) -> bool:
        """True once the immediate re-checks are used up."""
        return self.spins >= _SPINS

    def wait(self) -> bool:
        """Pause before the next check; return False if the deadline has passed."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self.spins < _SPINS:
            self.spins += 1
            os.sched_yield()
            return True
        delay = self.delay
        if self.deadline is not None:
            delay = min(delay, max(0.0, self.deadline - time.monotonic()))
        time.sleep(delay)
        self.delay = min(self.delay * 2, _LAST_SLEEP)
        return True


class Producer(_Endpoint):
    """The sending end of a ring.

    Args:
        path: the ring file.
        capacity: if given and the file does not exist, create it with this many data bytes
            (see :func:`create_ring`); an existing ring keeps its own capacity.
        segment_size: for creation, bytes of each segment.
        volatile: pin segments before writing them (needs volfs); False runs the same ring
            on any filesystem (tmpfs, say) without volatility.

    Raises:
        RingBusyError: another producer is attached.
        RingError: not a ring file, or not on volfs while ``volatile`` is true.
    """

    _role = "producer"
    _peer = "consumer"

    def _attach(self) -> None:
        super()._attach()
        # A consumer that is gone already when we come is no news: fill the ring for the next.
        end = self._peer_end()
        if end is not None:
            self._ignored_session = end[2]
        #: The consumer session whose end a send or check_peer raised (see close).
        self._told: int | None = None
        self._head = self._words[_HEAD]
        # The segment holding head on may or may not be pinned: pin them again (a pin of a
        # pinned segment changes nothing).
        self._pinned = self._head // self.segment_size * self.segment_size
        #: Where the next send looks for a vanished consumer.
        self._check_at = self._head
        self._refresh()
        # Ahead of head nothing is written and only a producer pins: what a predecessor that
        # died had pinned there goes back.
        self._unpin(_round_up(self._head, self.segment_size), self._limit)

    def _refresh(self) -> None:
        """Read how far the consumer has given segments back."""
        self._limit = self._words[_RELEASED] + self.capacity

    def try_send(self, message: Message) -> bool:
        """Send without waiting; return False if the ring has no room for it now.

        Raises:
            ValueError: the message is longer than :attr:`max_message`.
            RingClosedError: the consumer closed the ring.
            PeerVanishedError: the consumer went away without closing.
        """
        return self._send(message, 0.0, False)

    def send(self, message: Message, timeout: float | None = None) -> None:
        """Send a message, waiting up to ``timeout`` seconds (None: for ever) for room.

        Raises:
            ValueError: the message is longer than :attr:`max_message`.
            RingTimeoutError: no room within the timeout.
            RingClosedError: the consumer closed the ring.
            PeerVanishedError: the consumer went away without closing (noticed when the
                producer has to wait, or has written a MiB since it last looked).
        """
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout {timeout} must be non-negative or None")
        self._send(message, timeout, True)

    def _send(self, message: Message, timeout: float | None, block: bool) -> bool:
        mm = self._mm
        if mm is None:
            raise self._closed_error()
        size = len(message) if isinstance(message, bytes) else memoryview(message).nbytes
        if size > self.max_message:
            raise ValueError(
                f"message of {size} bytes is larger than the ring's maximum of "
                f"{self.max_message} bytes (its capacity minus one segment)"
            )
        words = self._words
        if words[_CONSUMER_STATUS] & _STATE_MASK == _CLOSED:
            self._check_consumer()
        head = self._head
        end = head + _RECORD_HEADER + ((size + 7) & ~7)
        if end > self._limit and not self._wait_for_room(end, timeout, block):
            return False
        if end > self._pinned:
            self._pin(end)
        capacity = self.capacity
        offset = head % capacity + PAGE_SIZE
        words[offset >> 3] = size
        offset += _RECORD_HEADER
        if offset == PAGE_SIZE + capacity:
            offset = PAGE_SIZE
        room = PAGE_SIZE + capacity - offset
        if size <= room:
            mm[offset : offset + size] = message
        else:
            view = memoryview(message).cast("B")
            mm[offset:] = view[:room]
            mm[PAGE_SIZE : PAGE_SIZE + size - room] = view[room:]
        # The record first, then the index that publishes it (see "Memory ordering").
        words[_HEAD] = end
        self._head = end
        self._messages += 1
        self._payload_bytes += size
        return True

    def check_peer(self) -> None:
        """Raise if the consumer closed or went away while this producer was attached."""
        if self._mm is None:
            raise self._closed_error()
        self._check_consumer()

    def _check_consumer(self) -> None:
        end = self._peer_end()
        if end is not None:
            self._told = end[2]
            raise self._peer_error(end[0], end[1])

    def _wait_for_room(self, end: int, timeout: float | None, block: bool) -> bool:
        self._refresh()
        if end <= self._limit:
            return True
        if not block:
            self._check_consumer()
            return False
        self._waits += 1
        backoff = _Backoff(timeout)
        while True:
            if backoff.sleeping:
                self._check_consumer()
            if not backoff.wait():
                self._check_consumer()  # a gone consumer says more than a timeout
                raise RingTimeoutError(
                    f"{self.path}: no room for {end - self._head} bytes within {timeout} s"
                )
            self._refresh()
            if end <= self._limit:
                return True

    def _pin(self, end: int) -> None:
        """Pin the segments up to the one holding ``end`` before writing into them.

        The consumer gave them back (``end <= released + capacity``), so they hold nothing
        it has yet to read; one it unpinned that volfs purged now reads as zeros.
        """
        if end > self._check_at:
            # Not at every segment: the lock probe costs more than a segment's pin.
            self._check_consumer()
            self._check_at = end + _PEER_CHECK_BYTES
        size = self.segment_size
        stop = _round_up(end, size)
        if self.volatile:
            segments = self._segments
            for position in range(self._pinned, stop, size):
                # Consumed data was purged: nothing lost, the producer writes fresh data.
                self._purged += segments[position // size % len(segments)].pin()
                self._pins += 1
        self._pinned = stop

    def close(self) -> None:
        """Detach: the consumer receives what was sent, then :class:`RingClosedError`.

        Unless a send or :meth:`check_peer` raised because the consumer had gone and no
        consumer attached since: the stream broke off, it did not end. The next consumer then
        receives what is left in the ring and waits for the next producer.

        The segments this producer pinned ahead of ``head`` are unpinned first.
        """
        if self._mm is None:
            return
        try:
            # No consumer came since this producer was told of the last one's end (a consumer
            # writes its new session before it receives anything): not the end of the stream.
            consumer = self._words[_CONSUMER_STATUS] >> _STATE_BITS
            # Closed first: the consumer sees a clean end even if unpinning fails. Nobody else
            # can attach as producer and pin those segments until the lock goes with _detach.
            self._set_state_closed(_LEFT if consumer == self._told else _CLOSED)
            self._unpin(_round_up(self._head, self.segment_size), self._pinned)
        finally:
            self._detach()


class Consumer(_Endpoint):
    """The receiving end of a ring; iterating yields messages until the producer closes.

    Args:
        path: the ring file.
        capacity: if given and the file does not exist, create it (see :func:`create_ring`).
        segment_size: for creation, bytes of each segment.
        volatile: unpin each segment once consumed (needs volfs); False for any filesystem.

    Raises:
        RingBusyError: another consumer is attached.
        RingError: not a ring file, or not on volfs while ``volatile`` is true.
    """

    _role = "consumer"
    _peer = "producer"

    def _attach(self) -> None:
        super()._attach()
        words = self._words
        # The end of a producer session that an earlier consumer reported is not news, nor
        # is a producer that died before this consumer came: the consumer receives what is
        # left and waits for the next producer. A producer's clean close is the end of its
        # stream, which this consumer reports once it has received the rest.
        self._ignored_session = words[_ACKED]
        end = self._peer_end()
        if end is not None and end[0] is PeerVanishedError:
            self._ignored_session = end[2]
        self._tail = words[_TAIL]
        self._released = words[_RELEASED]
        self._head = words[_HEAD]
        # Segments a predecessor consumed but did not give back (it died in between).
        self._release()

    def try_receive(self) -> bytes | None:
        """Receive a message if one is waiting; return None if the ring is empty.

        Raises:
            RingClosedError: the ring is empty and the producer closed it.
            PeerVanishedError: the ring is empty and the producer went away without closing.
        """
        return self._receive(0.0, False)

    def receive(self, timeout: float | None = None) -> bytes:
        """Receive the next message, waiting up to ``timeout`` seconds (None: for ever).

        Raises:
            RingTimeoutError: nothing arrived within the timeout.
            RingClosedError: the producer closed the ring and every message has been received.
            PeerVanishedError: the producer went away without closing, and every message it
                published has been received.
        """
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout {timeout} must be non-negative or None")
        message = self._receive(timeout, True)
        assert message is not None
        return message

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> bytes:
        try:
            return self.receive()
        except RingClosedError:
            raise StopIteration from None

    def _receive(self, timeout: float | None, block: bool) -> bytes | None:
        mm = self._mm
        if mm is None:
            raise self._closed_error()
        words = self._words
        tail = self._tail
        if tail == self._head:
            self._head = words[_HEAD]
            if tail == self._head and not self._wait_for_message(timeout, block):
                return None
        capacity = self.capacity
        offset = tail % capacity + PAGE_SIZE
        size = words[offset >> 3]
        end = tail + _RECORD_HEADER + ((size + 7) & ~7)
        if size > self.max_message or end > self._head:
            raise RingError(f"{self.path}: corrupt record of {size} bytes at position {tail}")
        offset += _RECORD_HEADER
        if offset == PAGE_SIZE + capacity:
            offset = PAGE_SIZE
        room = PAGE_SIZE + capacity - offset
        if size <= room:
            message = mm[offset : offset + size]
        else:
            message = mm[offset:] + mm[PAGE_SIZE : PAGE_SIZE + size - room]
        # Copied out: the segments behind the new tail may go from now on.
        self._tail = end
        words[_TAIL] = end
        if end - self._released >= self.segment_size:
            self._release()
        self._messages += 1
        self._payload_bytes += size
        return message

    def _release(self) -> None:
        """Unpin every segment the tail has passed, then give them to the producer."""
        upto = self._tail // self.segment_size * self.segment_size
        if upto > self._released:
            self._unpin(self._released, upto)
            # Unpinned first (see "Memory ordering"): the producer pins them only after this.
            self._words[_RELEASED] = self._released = upto

    def _wait_for_message(self, timeout: float | None, block: bool) -> bool:
        """Wait until head moves past tail; False if not blocking and nothing came."""
        if not block:
            self._check_producer()
            return False
        self._waits += 1
        backoff = _Backoff(timeout)
        while True:
            if backoff.sleeping:
                self._check_producer()
            if not backoff.wait():
                self._check_producer()  # a gone producer says more than a timeout
                raise RingTimeoutError(f"{self.path}: no message within {timeout} s")
            self._head = self._words[_HEAD]
            if self._head != self._tail:
                return True

    def check_peer(self) -> None:
        """Raise if the producer closed or went away and every message has been received.

        Like a receive, this reports the end of a producer once; after it the consumer waits
        for the next producer.
        """
        if self._mm is None:
            raise self._closed_error()
        self._check_producer()

    def _check_producer(self) -> None:
        """Raise if the producer's session ended and it published nothing more before."""
        end = self._peer_end()
        if end is None:
            return
        # The producer publishes head before it closes (or dies): look once more.
        self._head = self._words[_HEAD]
        if self._head != self._tail:
            return
        kind, pid, session = end
        # Reported once: the next receive waits for the next producer.
        self._ignored_session = session
        self._words[_ACKED] = session
        raise self._peer_error(kind, pid)

    def close(self) -> None:
        """Detach; the producer's sends then raise :class:`RingClosedError`. Messages not
        received stay in the ring for the next consumer (what was consumed is unpinned
        already).
        """
        if self._mm is None:
            return
        try:
            self._set_state_closed()
        finally:
            self._detach()
