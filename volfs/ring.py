"""A single-producer, single-consumer message ring in one shared file, consumed part volatile.

Two independent processes open the same file (any two: no common parent needed), map it with
``mmap(MAP_SHARED)`` and pass variable-length byte messages through it::

    # process A                                  # process B
    with Producer("/mnt/vol/ring", capacity=16 << 20) as ring:
        ring.send(b"hello")                      with Consumer("/mnt/vol/ring") as ring:
                                                     for message in ring:  # until A closes
                                                         print(message)

On volfs the part of the ring the consumer has passed becomes *volatile* once the ring goes
idle: under memory pressure volfs may purge it, so an idle ring whose consumer has caught up
costs almost no memory. Messages not yet received are never volatile and never lost.

File layout
-----------
Page 0 is the header, never volatile: the static geometry and, each group on a cache line of
its own and written by one side only, the indices and the two endpoints' pid and state. The
data area (``capacity`` bytes, a multiple of the page size) follows. Positions are absolute
byte counts since the ring was created (``head``: bytes published by the producer; ``tail``:
bytes consumed), mapped into the data area modulo ``capacity``. A message is a record: an
8-byte length, then the payload, padded to 8 bytes. Records wrap around the end of the data
area (they are copied in two pieces), so a message may span any number of pages.

Volatility protocol
-------------------
A page of the data area is either *in use* (non-volatile: the producer may write it, or it
holds messages not yet consumed) or *free* (consumed and given back by the consumer). The
consumer publishes ``released``, a page-aligned position: the pages before it are free, and
the producer may write a page only in the lap after the consumer freed it
(``position < released + capacity``). Each side touches only pages in use, so a purge never
takes a message, and no process touches a purged page through its mapping (which would raise
SIGBUS).

- The producer marks the pages it is about to write NON_VOLATILE first, up to the end of the
  segment (``segment_size``). If that reports them purged, the data in them had been consumed:
  it simply writes fresh data (counted in :attr:`RingStatistics.purged`).
- The consumer frees the pages it has passed in one of two ways. When the ring goes idle (the
  consumer has found it empty for 10 ms, or closes) it marks them all VOLATILE and then
  publishes ``released``; shorter gaps are a producer busy or descheduled, not idleness worth
  a FUSE round trip. When the producer is waiting for room (it publishes the position it
  needs in ``wanted``), the consumer hands just that much back without marking it: it
  publishes ``released`` and leaves ``unmarked`` (the start of the run of pages freed without
  marking) where it was, and the producer skips the NON_VOLATILE call for those pages, which
  were never volatile. The producer asks for up to a segment's end at a time, so a stream
  that fills the ring waits about once per segment. The consumer never reads a page again
  after freeing it.
- A producer that closes marks every free page it could have written VOLATILE, so a producer
  that comes after it skips NON_VOLATILE only for pages freed unmarked after it attached.

Marking costs a FUSE round trip (~50-100 us of the daemon's time), so a busy ring makes no
fvrange calls at all: the pages the producer waits for go straight back to it, and volatility
is only paid for when there is something to gain, a ring left idle. An idle ring whose
consumer has caught up keeps little that cannot be purged: the page holding ``head``, and up
to a segment each pinned ahead by the producer and handed back to it but not yet written.
Volatility belongs to the file and ends when its last descriptor closes (every endpoint keeps
its descriptor open); consumed pages of a ring nobody had open count as memory again until
they are reused.

Maximum message size
--------------------
``max_message = capacity - PAGE_SIZE``. The consumer frees only whole pages, so a record can
never reach back into the page that holds ``head`` when it starts; a record of
``8 + capacity - PAGE_SIZE`` bytes always fits once the consumer has caught up. Larger
messages raise :class:`ValueError` at once, since waiting could never make them fit.

Memory ordering
---------------
Each index has a single writer and is an aligned 8-byte word, read and written as an item of a
``memoryview`` of the mapping cast to ``"Q"``: CPython does that with one 8-byte ``memcpy``,
which compiles to one load or store instruction, atomic on x86-64 for an aligned word.
(``struct.pack_into`` would not do: it clears the destination before it writes the value, so
the other side can read 0 in between.) The producer copies a record into the mapping and only
then stores ``head``; the consumer loads ``head`` and only then reads the record; likewise the
consumer marks pages and then stores ``released``, and stores ``unmarked`` before
``released`` (the producer loads them in the opposite order). x86-64 keeps stores in program
order and loads in program order (TSO), and each copy is a separate C call the compiler cannot
move across another, so no fences are needed. Weakly ordered CPUs (ARM, POWER) would need
release/acquire fences, which Python does not offer: the ring assumes x86-64.

Waiting
-------
There is no futex, eventfd or FIFO both sides could share without a common parent, so a blocked
endpoint polls: it re-checks at once a few times (yielding the CPU), then sleeps 20 us,
doubling up to 1 ms per check. A message sent to an idle consumer is therefore seen within
about a millisecond; a busy one sees it at once.

Throughput
----------
Messages are copied into and out of the mapping at memory speed; only the fvrange calls go to
the daemon. On a FUSE filesystem the kernel writes dirty mapped pages back to the daemon, and
once a FUSE filesystem holds more dirty pages than its share of the dirty limit
(``/sys/class/bdi/<device>/max_bytes``, about 1% of it: some 47 MiB on a machine with 24 GiB)
it throttles the writer to the daemon's write speed. A ring meant to stream fast should stay
well below that, e.g. 16 MiB; a large ring works as well, only slower while it is busy.

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
- The producer vanished: the same, with :class:`PeerVanishedError`.
- The consumer closed or vanished while this producer was attached: every send raises
  :class:`RingClosedError` or :class:`PeerVanishedError` until another consumer attaches (a
  vanished consumer is noticed when the producer enters a new segment or has to wait).
  Messages not received stay in the ring for the next consumer. A consumer that had closed
  before the producer attached does not count: the producer fills the ring for the next one.

The ring assumes one thread per endpoint; the endpoint objects are not thread-safe.
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

from volfs.abi import PAGE_SIZE, pages_for
from volfs.client import VRANGE_NONVOLATILE, VRANGE_VOLATILE, fvrange, vrange_status

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "IDLE_SECONDS",
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
]

#: Default bytes the producer makes non-volatile per fvrange call.
DEFAULT_SEGMENT_SIZE: Final = 1 << 20
#: A consumer that has found the ring empty this long marks what it consumed volatile.
IDLE_SECONDS: Final = 0.01

MAGIC: Final = b"volring\x00"
VERSION: Final = 1

#: magic, version, page size, capacity, segment size.
_GEOMETRY = struct.Struct("=8sIIQQ")
#: The pid word read before the file is mapped (RingBusyError).
_PID = struct.Struct("Q")

# Header words (index = byte offset / 8), each group on a cache line (64 bytes) of its own
# and written by one side only.
_HEAD: Final = 8  # producer: bytes published
_WANTED: Final = 9  # producer: the ``released`` it waits for, 0 if none
_TAIL: Final = 16  # consumer: bytes consumed
_RELEASED: Final = 17  # consumer: pages before it are free
_UNMARKED: Final = 18  # consumer: pages from here to ``released`` were freed without marking
_LINE: Final = {"producer": 24, "consumer": 32}  # pid, then status
_STATUS: Final = 1  # within the line: session << 2 | state, one word so both change at once
_ACKED: Final = 34  # consumer: the producer session whose end it reported
_CONSUMER_STATUS: Final = 32 + _STATUS
#: Header bytes each endpoint keeps an OFD write lock on while it is attached.
_LOCK_BYTE: Final = {"producer": 2048, "consumer": 2049}

# Endpoint states, the low two bits of the status word.
_NEVER: Final = 0
_ATTACHED: Final = 1
_CLOSED: Final = 2
_STATE_BITS: Final = 2
_STATE_MASK: Final = 3

#: struct flock on x86-64: l_type, l_whence, l_start, l_len, l_pid (32 bytes).
_FLOCK = struct.Struct("hhqqi4x")

_RECORD_HEADER: Final = 8

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
    #: fvrange calls made (NON_VOLATILE by the producer, VOLATILE by the consumer).
    marks: int
    #: Producer only: NON_VOLATILE calls that reported consumed pages purged.
    purged: int


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _page_floor(position: int) -> int:
    return position // PAGE_SIZE * PAGE_SIZE


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
        segment_size: bytes the producer makes non-volatile per fvrange call: a multiple of
            4096 that divides the capacity. The default is the largest such size up to 1 MiB
            and a quarter of the capacity.
        exist_ok: if the file exists already, leave it and return False instead of raising.

    Returns:
        True if this call created the file.

    Raises:
        ValueError: a bad capacity or segment size.
        FileExistsError: the file exists and ``exist_ok`` is false.
    """
    if capacity < 2 * PAGE_SIZE or capacity % PAGE_SIZE:
        raise ValueError(
            f"ring capacity {capacity} must be a multiple of {PAGE_SIZE}, at least {2 * PAGE_SIZE}"
        )
    if segment_size is None:
        pages = capacity // PAGE_SIZE
        most = max(1, min(DEFAULT_SEGMENT_SIZE // PAGE_SIZE, pages // 4))
        segment_size = PAGE_SIZE * next(n for n in range(most, 0, -1) if pages % n == 0)
    if segment_size < PAGE_SIZE or segment_size % PAGE_SIZE or capacity % segment_size:
        raise ValueError(
            f"segment size {segment_size} must be a multiple of {PAGE_SIZE} that divides the "
            f"capacity {capacity}"
        )
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
    """What both ends share: the mapping, the header, the lock, the peer, marking."""

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
        #: Whether this endpoint makes fvrange calls (False: any filesystem, no volatility).
        self.volatile = volatile
        self._messages = self._payload_bytes = self._waits = self._marks = self._purged = 0
        #: A peer session whose end is not (or no longer) reported.
        self._ignored_session = 0
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
        geometry = os.pread(self._fd, _GEOMETRY.size, 0)
        if len(geometry) < _GEOMETRY.size or geometry[:8] != MAGIC:
            raise RingError(f"{self.path}: not a ring file")
        _magic, version, page_size, capacity, segment = _GEOMETRY.unpack(geometry)
        if version != VERSION or page_size != PAGE_SIZE:
            raise RingError(f"{self.path}: ring version {version}, page size {page_size}")
        if os.fstat(self._fd).st_size != PAGE_SIZE + capacity:
            raise RingError(f"{self.path}: file size does not match the ring's capacity")
        #: Bytes of the data area.
        self.capacity: int = capacity
        #: Bytes the producer makes non-volatile per fvrange call.
        self.segment_size: int = segment
        #: The largest message the ring takes: the capacity minus one page.
        self.max_message: int = capacity - PAGE_SIZE
        if self.volatile:
            try:
                vrange_status(self._fd, 0, PAGE_SIZE)
            except OSError as error:
                if error.errno != errno.ENOTTY:
                    raise
                raise RingError(
                    f"{self.path}: not on a volfs mount (use volatile=False elsewhere)"
                ) from None
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, self._flock(self._role, fcntl.F_WRLCK))
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            pid = _PID.unpack(os.pread(self._fd, 8, 8 * _LINE[self._role]))[0]
            raise RingBusyError(
                f"{self.path}: a {self._role} is already attached (pid {pid})"
            ) from None
        mm = mmap.mmap(self._fd, PAGE_SIZE + capacity, mmap.MAP_SHARED)
        # The file as 8-byte words: the indices, the states and the record lengths. Item
        # access is one 8-byte memcpy (see "Memory ordering"); struct.pack_into is not.
        words = self._words = memoryview(mm).cast("Q")
        self._mm = mm
        # The lock is taken before the state says attached, and the state says closed before
        # the lock goes: "attached" without the lock means the process died.
        line = _LINE[self._role]
        self._session = (words[line + _STATUS] >> _STATE_BITS) + 1
        words[line] = os.getpid()
        words[line + _STATUS] = self._session << _STATE_BITS | _ATTACHED

    def _detach(self) -> None:
        """Unmap and close; the kernel drops the OFD lock with the last reference."""
        if self._mm is not None:
            self._words.release()
            self._mm.close()
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @staticmethod
    def _flock(role: Role, kind: int) -> bytes:
        return _FLOCK.pack(kind, os.SEEK_SET, _LOCK_BYTE[role], 1, 0)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._mm is None

    def statistics(self) -> RingStatistics:
        """Counters of this endpoint since it attached."""
        return RingStatistics(
            self._messages, self._payload_bytes, self._waits, self._marks, self._purged
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
        if session == self._ignored_session or state == _NEVER:
            return None
        if state == _CLOSED:
            return RingClosedError, pid, session
        probe = fcntl.fcntl(self._fd, fcntl.F_OFD_GETLK, self._flock(self._peer, fcntl.F_WRLCK))
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

    def _mark(self, start: int, end: int, mode: int) -> bool:
        """fvrange the data pages of absolute positions [start, end); return "purged"."""
        length = end - start
        offset = start % self.capacity
        first = min(length, self.capacity - offset)
        purged = fvrange(self._fd, PAGE_SIZE + offset, first, mode)[1]
        self._marks += 1
        if length > first:
            purged |= fvrange(self._fd, PAGE_SIZE, length - first, mode)[1]
            self._marks += 1
        return purged

    def _closed_error(self) -> ValueError:
        return ValueError(f"{self.path}: this ring {self._role} is closed")

    def _set_state_closed(self) -> None:
        self._words[_LINE[self._role] + _STATUS] = self._session << _STATE_BITS | _CLOSED

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
        segment_size: for creation, bytes made non-volatile per fvrange call.
        volatile: mark pages NON_VOLATILE before writing them (needs volfs); False runs the
            same ring on any filesystem (tmpfs, say) without volatility calls.

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
        words = self._words
        words[_WANTED] = 0
        self._head = words[_HEAD]
        # The page holding head on may or may not be non-volatile: pin them again.
        self._pinned = _page_floor(self._head)
        # Pages freed unmarked before we came may have been marked volatile by an earlier
        # producer's close: skip NON_VOLATILE only for pages freed from now on.
        self._trusted = words[_RELEASED]
        self._refresh()

    def _refresh(self) -> None:
        """Read how far the consumer has freed, and which of that was freed unmarked."""
        words = self._words
        released = words[_RELEASED]  # before ``unmarked``: see "Memory ordering"
        unmarked = words[_UNMARKED]
        self._limit = released + self.capacity
        self._unmarked = max(unmarked, self._trusted) + self.capacity

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
                producer enters a new segment or has to wait).
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
                f"{self.max_message} bytes (its capacity minus one page)"
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
            raise self._peer_error(end[0], end[1])

    def _wait_for_room(self, end: int, timeout: float | None, block: bool) -> bool:
        self._refresh()
        if end <= self._limit:
            return True
        # Ask the consumer to hand back what it has consumed, up to a segment's end (see
        # "Volatility protocol"); we go on as soon as this message fits.
        self._words[_WANTED] = _round_up(end - self.capacity, self.segment_size)
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
        """Make the pages up to ``end`` non-volatile, up to a segment's end, before writing.

        Pages the consumer handed back unmarked were never volatile: no call for them.
        """
        self._check_consumer()
        stop = min(_round_up(end, self.segment_size), self._limit)
        marked_until = min(stop, self._unmarked)
        if (
            self.volatile
            and self._pinned < marked_until
            and self._mark(self._pinned, marked_until, VRANGE_NONVOLATILE)
        ):
            # Consumed data was purged: nothing lost, the pages read as zeros now.
            self._purged += 1
        self._pinned = stop

    def close(self) -> None:
        """Detach: the consumer receives what was sent, then :class:`RingClosedError`.

        The free pages this producer could have written become volatile first.
        """
        if self._mm is None:
            return
        try:
            # Closed first: the consumer sees a clean end even if marking fails. Nobody else
            # can attach as producer and touch those pages until the lock goes with _detach.
            self._words[_WANTED] = 0
            self._set_state_closed()
            self._refresh()
            unused = pages_for(self._head) * PAGE_SIZE
            if self.volatile and self._limit > unused:
                self._mark(unused, self._limit, VRANGE_VOLATILE)
        finally:
            self._detach()


class Consumer(_Endpoint):
    """The receiving end of a ring; iterating yields messages until the producer closes.

    Args:
        path: the ring file.
        capacity: if given and the file does not exist, create it (see :func:`create_ring`).
        segment_size: for creation, bytes made non-volatile per fvrange call.
        volatile: mark consumed pages VOLATILE when idle (needs volfs); False for any
            filesystem.

    Raises:
        RingBusyError: another consumer is attached.
        RingError: not a ring file, or not on volfs while ``volatile`` is true.
    """

    _role = "consumer"
    _peer = "producer"

    def _attach(self) -> None:
        super()._attach()
        words = self._words
        # The end of a producer session that an earlier consumer reported is not news.
        self._ignored_session = words[_ACKED]
        self._tail = words[_TAIL]
        self._released = words[_RELEASED]
        self._head = words[_HEAD]
        #: When try_receive first found the ring empty (None: it did not, lately).
        self._empty_since: float | None = None

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
        # Copied out: the pages behind the new tail may be freed from now on.
        self._tail = end
        words[_TAIL] = end
        if words[_WANTED] > self._released:
            self._hand_back()
        self._empty_since = None
        self._messages += 1
        self._payload_bytes += size
        return message

    def _wait_for_message(self, timeout: float | None, block: bool) -> bool:
        """Wait until head moves past tail; False if not blocking and nothing came."""
        if not block:
            now = time.monotonic()
            if self._empty_since is None:
                self._empty_since = now
            self._idle(now - self._empty_since)
            self._check_producer()
            return False
        self._waits += 1
        backoff = _Backoff(timeout)
        while True:
            if backoff.sleeping:
                self._idle(time.monotonic() - backoff.started)
                self._check_producer()
            if not backoff.wait():
                self._check_producer()  # a gone producer says more than a timeout
                raise RingTimeoutError(f"{self.path}: no message within {timeout} s")
            self._head = self._words[_HEAD]
            if self._head != self._tail:
                return True

    def _idle(self, seconds: float) -> None:
        """The ring has been empty for ``seconds``: free what the producer waits for, and
        everything consumed, marked volatile, once the ring has been idle a while."""
        if self._words[_WANTED] > self._released:
            self._hand_back()
        if seconds >= IDLE_SECONDS:
            self._free_marked()

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

    def _hand_back(self) -> None:
        """Free, unmarked, the consumed pages the waiting producer asked for (no fvrange)."""
        upto = min(_page_floor(self._tail), pages_for(self._words[_WANTED]) * PAGE_SIZE)
        if upto > self._released:
            # ``unmarked`` stays: these pages extend the run freed without marking.
            self._words[_RELEASED] = self._released = upto

    def _free_marked(self) -> None:
        """Mark every whole consumed page volatile, then publish it free."""
        upto = _page_floor(self._tail)
        if upto <= self._released:
            return
        if self.volatile:
            self._mark(self._released, upto, VRANGE_VOLATILE)
        words = self._words
        words[_UNMARKED] = upto  # before ``released``: see "Memory ordering"
        words[_RELEASED] = self._released = upto

    def close(self) -> None:
        """Detach, marking everything consumed volatile; the producer's sends then raise
        :class:`RingClosedError`. Messages not received stay in the ring for the next consumer.
        """
        if self._mm is None:
            return
        try:
            self._set_state_closed()
            self._free_marked()
        finally:
            self._detach()
