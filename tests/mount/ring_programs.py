"""Ring endpoints that run in processes of their own, for tests/mount/test_ring.py.

The ring is shared between processes through a real mount, so the tests run the other end in
a fresh interpreter (not a fork of pytest's):
``python -m tests.mount.ring_programs PROGRAM '{"ring": PATH, ...}'`` calls the function PROGRAM of
this module with the JSON object as its keyword arguments.

A program reports on stdout, one JSON object a line, so that a test waits for a report and not
for time to pass; it fails with a message on stderr and a nonzero status. Programs that
``hold`` stay attached after their report until the test writes a line to their stdin or
closes it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from collections.abc import Callable

from volfs.ring import Consumer, Producer

PAGE = 4096
KiB = 1 << 10
#: Seconds a program waits for a message or for room before it gives up.
TIMEOUT = 30.0

#: The ``i``-th message of a stream, given the largest message the ring takes.
MessageSource = Callable[[int, int], bytes]


def mixed_message(i: int, largest: int) -> bytes:
    """Mostly small messages, many across pages, a few about as large as the ring allows."""
    rng = random.Random(i)
    kind = rng.random()
    if kind < 0.4:
        size = rng.randrange(0, 100)
    elif kind < 0.8:
        size = rng.randrange(100, 3 * PAGE + 100)
    elif kind < 0.97:
        size = rng.randrange(0, 64 * KiB)
    else:
        size = largest - rng.randrange(0, 64)
    return rng.randbytes(size)


def spanning_message(i: int, largest: int) -> bytes:
    """Up to three pages and a bit: many records span pages."""
    rng = random.Random(i)
    return rng.randbytes(rng.randrange(0, 3 * PAGE + 100))


def numbered_message(i: int, largest: int) -> bytes:
    """``message 0``, ``message 1``, ...: easy to tell apart in a failure."""
    return b"message %d" % i


#: The streams a test may ask for, by name; both ends of a test compute the same one.
MESSAGES: dict[str, MessageSource] = {
    "mixed": mixed_message,
    "spanning": spanning_message,
    "numbered": numbered_message,
}


def report(value: object) -> None:
    """Tell the test something, as one JSON line."""
    print(json.dumps(value), flush=True)


def hold() -> None:
    """Stay as we are until the test writes a line to our stdin or closes it."""
    sys.stdin.readline()


def pause_after(count: int, every: int, seconds: float) -> None:
    """Sleep ``seconds`` after every ``every``-th message (never if ``every`` is 0)."""
    if every and count % every == 0:
        time.sleep(seconds)


def send(
    ring: str,
    messages: str,
    count: int,
    capacity: int,
    segment_size: int | None = None,
    stay: bool = False,
) -> None:
    """Send ``count`` messages of the stream ``messages`` as fast as the ring takes them;
    report the producer's statistics.

    With ``stay`` the producer stays attached after its report (see :func:`hold`).
    """
    source = MESSAGES[messages]
    with Producer(ring, capacity=capacity, segment_size=segment_size) as producer:
        for i in range(count):
            producer.send(source(i, producer.max_message), timeout=TIMEOUT)
        report(dataclasses.asdict(producer.statistics()))
        if stay:
            hold()


def send_blocks(ring: str, count: int, size: int, capacity: int) -> None:
    """Send ``count`` messages of ``size`` patterned bytes, report, and stay attached."""
    block = (bytes(range(256)) * (size // 256 + 1))[:size]
    with Producer(ring, capacity=capacity) as producer:
        for _ in range(count):
            producer.send(block, timeout=TIMEOUT)
        report(dataclasses.asdict(producer.statistics()))
        hold()


def receive(
    ring: str,
    messages: str,
    capacity: int,
    segment_size: int | None = None,
    pause_every: int = 0,
    pause: float = 0.0,
) -> None:
    """Receive until the producer closes, checking every message against the stream.

    Reports how many arrived and the consumer's statistics. A pause after every
    ``pause_every`` messages lets unconsumed messages pile up in the ring.
    """
    expected = MESSAGES[messages]
    with Consumer(ring, capacity=capacity, segment_size=segment_size) as consumer:
        received = 0
        for data in consumer:
            want = expected(received, consumer.max_message)
            if data != want:
                sys.exit(f"message {received}: {len(data)} bytes, not the {len(want)} sent")
            received += 1
            pause_after(received, pause_every, pause)
        report({"received": received, **dataclasses.asdict(consumer.statistics())})


def receive_one(ring: str, capacity: int) -> None:
    """Receive one message, report it as text, and stay attached."""
    with Consumer(ring, capacity=capacity) as consumer:
        report({"message": consumer.receive(timeout=TIMEOUT).decode()})
        hold()


def receive_blocks(ring: str, count: int, size: int, capacity: int) -> None:
    """Receive ``count`` messages of ``size`` bytes; report the consumer's statistics and stay
    attached, the ring empty."""
    with Consumer(ring, capacity=capacity) as consumer:
        for i in range(count):
            data = consumer.receive(timeout=TIMEOUT)
            if len(data) != size:
                sys.exit(f"message {i}: {len(data)} bytes, not {size}")
        report(dataclasses.asdict(consumer.statistics()))
        hold()


PROGRAMS: dict[str, Callable[..., None]] = {
    program.__name__: program
    for program in (send, send_blocks, receive, receive_one, receive_blocks)
}


def main(argv: list[str] | None = None) -> None:
    """Run the program the command line names with the arguments it gives."""
    name, arguments = sys.argv[1:] if argv is None else argv
    PROGRAMS[name](**json.loads(arguments))


if __name__ == "__main__":
    main()
