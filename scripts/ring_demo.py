"""Two terminals talking through a volfs ring: one sends the lines it reads, one prints them.

Run the two ends as separate commands, in either order; the first creates the ring file:

  terminal 1:  python scripts/ring_demo.py consumer /mnt/vol/ring
  terminal 2:  python scripts/ring_demo.py producer /mnt/vol/ring

Each line typed into the producer (without its newline) is one message; the consumer prints
every message on a line of its own. Ctrl-D at the producer closes the ring and the consumer
exits 0 once it has printed everything; if either end is killed the other reports it and
exits 1 (a producer waiting for its next line notices within a fraction of a second). Start a
new producer or consumer at any time to carry on with the same ring: a consumer prints what is
left in it and waits for a producer; a producer sends for whichever consumer comes.

Exit status: 0 at the end of the stream, 1 on an error (one line on stderr), 2 for bad usage,
130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from volfs.ring import (
    Consumer,
    Producer,
    RingClosedError,
    RingError,
)
from volfs.sizes import size_argument

#: While waiting for input the producer looks at the consumer this often (milliseconds).
PEER_CHECK_MS = 200


def input_lines(ring: Producer) -> Iterator[bytes]:
    """Yield the lines of stdin without their newlines, checking the consumer while waiting.

    Reads the descriptor itself (a buffered file would hide what it holds from ``poll``), so
    that a consumer killed while nobody types is reported within ``PEER_CHECK_MS``, not at the
    next line.
    """
    fd = sys.stdin.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    pending = b""
    while True:
        if not poller.poll(PEER_CHECK_MS):
            ring.check_peer()
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        yield from lines
    if pending:
        yield pending  # a last line without a newline


def produce(ring: Producer) -> int:
    """Send each line of stdin; close the ring at the end of the input."""
    if sys.stdin.isatty():
        print(
            f"ring_demo: sending lines to {ring.path} (messages up to {ring.max_message} "
            "bytes); Ctrl-D ends",
            file=sys.stderr,
        )
    for line in input_lines(ring):
        ring.check_peer()  # a consumer killed since the last line: say so now
        ring.send(line)
    # A consumer killed after the last line would otherwise go unmentioned.
    ring.check_peer()
    return 0


def consume(ring: Consumer) -> int:
    """Print each message on a line of its own until the producer closes the ring."""
    if sys.stdout.isatty():
        print(f"ring_demo: printing messages from {ring.path}", file=sys.stderr)
    out = sys.stdout.buffer
    while True:
        try:
            message = ring.receive()
        except RingClosedError as end:
            # The end of the stream, not a failure: the error names the producer and its pid.
            print(f"ring_demo: {end}", file=sys.stderr)
            return 0
        out.write(message + b"\n")
        out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    assert __doc__ is not None
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("role", choices=("producer", "consumer"), help="which end to run")
    parser.add_argument("path", type=Path, help="the ring file (created if missing)")
    parser.add_argument(
        "--size",
        type=size_argument,
        default=1 << 20,
        help="capacity when creating the ring: bytes with a K, M or G suffix (default 1M)",
    )
    parser.add_argument(
        "--no-volatile",
        dest="volatile",
        action="store_false",
        help="no segments (no volatility), for a ring on a filesystem other than volfs",
    )
    args = parser.parse_args(argv)
    endpoint = Producer if args.role == "producer" else Consumer
    try:
        with endpoint(args.path, capacity=args.size, volatile=args.volatile) as ring:
            if isinstance(ring, Producer):
                return produce(ring)
            return consume(ring)
    except KeyboardInterrupt:
        return 130
    except (RingError, ValueError, OSError) as error:
        # A peer gone (a consumer closed, either end killed), a line longer than the ring
        # takes, a busy role, no volfs.
        if isinstance(error, OSError) and not isinstance(error, RingError):
            error_text = f"{args.path}: {error.strerror or error}"
        else:
            error_text = str(error)
        print(f"ring_demo: {error_text}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
