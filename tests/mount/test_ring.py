"""The shared-memory message ring (volfs.ring) on real mounts, between separate processes."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import random
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, Mount, wait_for
from tests.mount import ring_programs
from volfs.client import SegmentTable, purge, statistics, vrange_status
from volfs.ring import (
    _ATTACHED,
    _HEAD,  # the header's index words (byte offset / 8), to watch the ring from outside
    _LINE,
    _STATE_MASK,
    _STATUS,
    _TAIL,
    Consumer,
    PeerVanishedError,
    Producer,
    RingBusyError,
    RingClosedError,
    RingError,
    RingTimeoutError,
    create_ring,
)

PAGE = 4096
KiB = 1 << 10
MiB = 1 << 20
DEMO = REPO_ROOT / "scripts" / "ring_demo.py"
BENCH = REPO_ROOT / "scripts" / "bench_ring.py"
#: Seconds a whole stream of messages may take, start to end.
TRAFFIC_TIMEOUT = 60.0

#: Starts a program of tests.mount.ring_programs with keyword arguments; see the ``spawn`` fixture.
Spawn = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def reaper() -> Iterator[list[subprocess.Popen[str]]]:
    """Helper processes to kill if a test fails before it reaps them."""
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def piped(argv: list[str], reaper: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    """Start ``argv`` in the repository with pipes for its stdin, stdout and stderr; the
    reaper kills it afterwards if it still runs."""
    process = subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reaper.append(process)
    return process


@pytest.fixture
def spawn(reaper: list[subprocess.Popen[str]]) -> Spawn:
    """``spawn(ring_programs.send, ring=path, ...)`` runs that program in a process of its own.

    Not a fork of this process: a fresh interpreter, as another program using the ring would
    be. Its stdin, stdout and stderr are pipes; it is killed afterwards if still running.
    """

    def start(program: Callable[..., None], **arguments: object) -> subprocess.Popen[str]:
        module = ring_programs.__name__
        return piped(
            [sys.executable, "-m", module, program.__name__, json.dumps(arguments, default=str)],
            reaper,
        )

    return start


def read_line(stream: Any, timeout: float) -> str:
    """The next line of a helper's output, failing the test if none comes within ``timeout``."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no output within {timeout} s"
    line: str = stream.readline()
    return line


def next_report(process: subprocess.Popen[str], timeout: float = 30) -> dict[str, Any]:
    """The next report of a ring program; fails the test with its stderr if none comes."""
    assert process.stdout is not None and process.stderr is not None
    line = read_line(process.stdout, timeout)
    if not line:
        process.wait(timeout=10)
        pytest.fail(f"exit status {process.returncode} before a report:\n{process.stderr.read()}")
    report: dict[str, Any] = json.loads(line)
    return report


def finish(process: subprocess.Popen[str], timeout: float = 30) -> None:
    """Let a ring program go on from its hold (close its stdin) and check that it exits 0."""
    _out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"exit status {process.returncode}:\n{err}"


@contextlib.contextmanager
def purging(mnt: Path) -> Iterator[list[int]]:
    """Purge ``mnt`` over and over in a thread, as memory pressure would, until the block ends.

    Yields the list of what each purge freed, filled as they happen.
    """
    stop = threading.Event()
    freed: list[int] = []

    def purge_all_the_time() -> None:
        while not stop.is_set():
            freed.append(purge(mnt))
            time.sleep(0.001)  # not back to back: let the ring's own calls to volfs in

    purger = threading.Thread(target=purge_all_the_time)
    purger.start()
    try:
        yield freed
    finally:
        stop.set()
        purger.join()


def test_a_busy_ring_loses_no_message_to_purges_of_what_it_consumed(
    mnt: Path, spawn: Spawn
) -> None:
    ring, count = mnt / "ring", 3000
    stream = {"ring": ring, "messages": "mixed", "capacity": 512 * KiB, "segment_size": 32 * KiB}
    with purging(mnt) as freed:
        consumer = spawn(ring_programs.receive, **stream)
        # No pauses: the ring is busy throughout, and the consumer unpins each segment it has
        # passed all the same, for the purges to take.
        producer = spawn(ring_programs.send, **stream, count=count)
        sent = next_report(producer, TRAFFIC_TIMEOUT)
        finish(producer)
        received = next_report(consumer)
        finish(consumer)

    assert received["received"] == sent["messages"] == count
    assert received["payload_bytes"] == sent["payload_bytes"]
    # The purges took consumed segments while messages flowed: the producer was told when it
    # pinned them again, and wrote fresh data over the zeros.
    assert sum(freed) > 0
    assert received["unpins"] > 0
    assert sent["purged"] > 0


def test_empty_and_full_ring_without_waiting_and_with_timeouts(mnt: Path) -> None:
    ring = mnt / "ring"
    with Consumer(ring, capacity=16 * KiB) as consumer, Producer(ring) as producer:
        assert consumer.try_receive() is None  # empty: None, at once
        started = time.monotonic()
        with pytest.raises(RingTimeoutError, match=r"no message within 0\.2 s") as caught:
            consumer.receive(timeout=0.2)
        assert 0.2 <= time.monotonic() - started < 5
        assert isinstance(caught.value, TimeoutError)

        message = os.urandom(1000)  # a record of 1008 bytes
        sent = 0
        while producer.try_send(message):
            sent += 1
        assert sent == 16 * KiB // 1008
        started = time.monotonic()
        with pytest.raises(RingTimeoutError, match=r"no room for 1008 bytes within 0\.2 s"):
            producer.send(message, timeout=0.2)
        assert 0.2 <= time.monotonic() - started < 5

        for _ in range(sent):
            assert consumer.try_receive() == message
        assert consumer.try_receive() is None
        assert producer.try_send(message)  # the consumer gave the consumed segments back
        assert consumer.receive(timeout=5) == message
        with pytest.raises(ValueError, match="timeout"):
            consumer.receive(timeout=-1)


def test_too_large_messages_fail_and_the_largest_fits_at_any_position(mnt: Path) -> None:
    ring = mnt / "ring"
    with Consumer(ring, capacity=64 * KiB) as consumer, Producer(ring) as producer:
        # The default segment is a quarter of so small a ring; a segment less fits at once.
        assert producer.segment_size == 16 * KiB
        assert producer.max_message == consumer.max_message == 48 * KiB
        with pytest.raises(ValueError, match=r"49153 bytes is larger than the ring's maximum"):
            producer.send(bytes(producer.max_message + 1))
        with pytest.raises(ValueError):
            producer.try_send(bytearray(producer.max_message + 1))

        # One thread drives both ends: the ring is empty before each send, wherever its head
        # is, so even the largest message fits at once.
        rng = random.Random(6)
        for i in range(150):
            size = producer.max_message if i % 10 == 0 else rng.randrange(0, 20 * KiB)
            message = memoryview(rng.randbytes(size))
            assert producer.try_send(message), f"message {i} of {size} bytes did not fit"
            assert consumer.receive(timeout=5) == message
        assert producer.statistics().messages == consumer.statistics().messages == 150


def test_producers_one_after_another_rewrite_what_volfs_purged(mnt: Path) -> None:
    ring = mnt / "ring"
    with Consumer(ring, capacity=64 * KiB, segment_size=16 * KiB) as consumer:
        for session in range(3):
            with Producer(ring) as producer:
                for i in range(40):  # 160 KiB: two and a half laps
                    message = bytes([session, i]) * 2048
                    assert producer.try_send(message)
                    assert consumer.receive(timeout=5) == message
                    if i == 20:
                        assert purge(mnt) > 0  # in mid-stream: the consumed segments go
                # It found segments the consumer had unpinned purged, and rewrote them.
                assert producer.statistics().purged > 0
            with pytest.raises(RingClosedError):
                consumer.try_receive()
            # Between producers all but the segment holding head is unpinned, and goes.
            assert purge(mnt) > 0
            fd = os.open(ring, os.O_RDONLY)
            try:
                assert vrange_status(fd, PAGE, 64 * KiB)[0] >= 48 * KiB
            finally:
                os.close(fd)
        assert consumer.statistics().messages == 120


def test_clean_close_ends_the_stream_once_and_roles_are_exclusive(mnt: Path) -> None:
    ring = mnt / "ring"
    with Consumer(ring, capacity=64 * KiB) as consumer:
        with Producer(ring) as producer:
            producer.send(b"first")
            producer.send(b"")
            with pytest.raises(
                RingBusyError, match=f"a producer is already attached .pid {os.getpid()}"
            ):
                Producer(ring)
            with pytest.raises(RingBusyError):
                Consumer(ring)
        assert list(consumer) == [b"first", b""]  # the end comes after the last message
        # Reported once: the next receive waits for the next producer.
        with pytest.raises(RingTimeoutError):
            consumer.receive(timeout=0.1)
        with Producer(ring) as producer:
            producer.send(b"second session")
            assert consumer.receive(timeout=5) == b"second session"
            consumer.close()
            assert consumer.closed
            with pytest.raises(RingClosedError, match=r"the consumer \(pid \d+\) closed the ring"):
                producer.send(b"nobody reads this")
            with pytest.raises(ValueError, match="closed"):
                consumer.receive()
    # A consumer gone before the producer came is no error: the ring keeps the messages.
    with Producer(ring) as producer:
        producer.send(b"for the next consumer")
    with Consumer(ring) as consumer:
        assert list(consumer) == [b"for the next consumer"]


def test_a_killed_producer_is_reported_after_its_last_message(mnt: Path, spawn: Spawn) -> None:
    ring = mnt / "ring"
    producer = spawn(
        ring_programs.send, ring=ring, messages="numbered", count=3, capacity=64 * KiB, stay=True
    )
    assert next_report(producer)["messages"] == 3
    with Consumer(ring) as consumer:
        assert consumer.receive(timeout=5) == b"message 0"
        producer.send_signal(signal.SIGKILL)
        assert producer.wait(timeout=10) == -signal.SIGKILL
        consumer.check_peer()  # messages are left: nothing to report yet
        assert consumer.receive(timeout=5) == b"message 1"
        assert consumer.receive(timeout=5) == b"message 2"
        started = time.monotonic()
        with pytest.raises(
            PeerVanishedError, match=f"the producer .pid {producer.pid}. went away without closing"
        ):
            consumer.receive(timeout=30)
        assert time.monotonic() - started < 5  # noticed, not timed out
        with pytest.raises(RingTimeoutError):  # reported once
            consumer.receive(timeout=0.1)


def test_a_killed_consumer_is_reported_to_the_producer(mnt: Path, spawn: Spawn) -> None:
    ring = mnt / "ring"
    consumer = spawn(ring_programs.receive_one, ring=ring, capacity=16 * KiB)
    wait_for(ring.exists, 10, "the consumer to create the ring")
    with Producer(ring) as producer:
        producer.send(b"hello")
        assert next_report(consumer) == {"message": "hello"}
        consumer.send_signal(signal.SIGKILL)
        assert consumer.wait(timeout=10) == -signal.SIGKILL
        with pytest.raises(PeerVanishedError):
            producer.check_peer()  # at once, when asked
        sends = 0
        with pytest.raises(
            PeerVanishedError, match=f"the consumer .pid {consumer.pid}. went away without closing"
        ):
            while True:  # noticed at the latest when the ring is full
                producer.send(bytes(1000), timeout=30)
                sends += 1
        assert sends <= 16 * KiB // 1008


def test_an_idle_caught_up_ring_gives_its_memory_back_on_purge(
    mount_volfs: Callable[..., Mount], spawn: Spawn
) -> None:
    volfs = mount_volfs("size=256M")
    ring, capacity, segment = volfs.path / "ring", 64 * MiB, 64 * KiB
    message_size = 100 * KiB  # records end anywhere in a segment
    count = 620  # 62 MiB of records: the ring filled once
    baseline = volfs.memory_bytes()
    blocks = {"ring": ring, "count": count, "size": message_size, "capacity": capacity}
    producer = spawn(ring_programs.send_blocks, **blocks)
    consumer = spawn(ring_programs.receive_blocks, **blocks)
    assert next_report(producer, TRAFFIC_TIMEOUT)["messages"] == count
    # The consumer unpinned each segment as it passed it: no idle time needed.
    assert next_report(consumer, TRAFFIC_TIMEOUT)["unpins"] >= count * message_size // segment

    data = count * (message_size + 8)
    fd = os.open(ring, os.O_RDWR)
    try:
        # The two ends attached at once to a file nobody had open: one registered the
        # segments, the other found them.
        with SegmentTable(fd, create=False) as table:
            assert sorted((slot.start, slot.length) for slot in table.slots()) == [
                (PAGE + offset, segment) for offset in range(0, capacity, segment)
            ]
        # The data went in through the mappings; the kernel writes dirty pages back to the
        # daemon within 30 s on its own, fsync does it now.
        os.fsync(fd)
        full = volfs.memory_bytes()
        assert full - baseline > 0.9 * data, "the ring's data never reached the daemon"
        volatile, _purged = vrange_status(fd)
        assert volatile >= data - segment  # every segment but the one holding head
        assert purge(volfs.path) >= data - segment
        wait_for(
            lambda: full - volfs.memory_bytes() > 0.9 * data,
            10,
            "the daemon's memory to drop by the data",
        )
        # What is left of the file: the header page and the segment holding head.
        assert os.fstat(fd).st_blocks * 512 <= PAGE + segment
        # And of the mount, besides: the segment table and the daemon's records of the
        # ring's 1024 segments (about 300 KiB).
        assert statistics(volfs.path)["used_bytes"] <= data // 100
    finally:
        os.close(fd)
    finish(producer)
    finish(consumer)


def test_a_ring_everyone_closed_keeps_its_messages_and_forgets_its_purges(mnt: Path) -> None:
    ring, capacity, segment = mnt / "ring", 256 * KiB, 16 * KiB
    with (
        Producer(ring, capacity=capacity, segment_size=segment) as producer,
        Consumer(ring) as consumer,
    ):
        for i in range(100):  # one and a half laps
            producer.send(bytes([i]) * 4000)
            assert consumer.receive(timeout=5) == bytes([i]) * 4000
        assert purge(mnt) > 0  # the consumed segments
        for i in range(300):  # 5 KiB, left for the next consumer
            producer.send(b"unread %d" % i)
    # Everybody closed: the table ended, and the purged pages nobody was told of stay lost.
    with Consumer(ring) as consumer:
        # It made a fresh table: acknowledged the purged pages, pinned the segments holding
        # the unread messages, unpinned the others.
        assert consumer.statistics().purged > 0
        fd = os.open(ring, os.O_RDWR)
        try:
            with SegmentTable(fd, create=False) as table:
                assert sorted((slot.start, slot.length) for slot in table.slots()) == [
                    (PAGE + offset, segment) for offset in range(0, capacity, segment)
                ]
            assert vrange_status(fd)[0] >= capacity - 2 * segment
            purge(mnt)
        finally:
            os.close(fd)
        assert [consumer.receive(timeout=5) for _ in range(300)] == [
            b"unread %d" % i for i in range(300)
        ]
        with Producer(ring) as producer:
            for i in range(100):
                producer.send(bytes([i]) * 4000)
                assert consumer.receive(timeout=5) == bytes([i]) * 4000


def test_rings_need_a_ring_file_and_volfs_unless_volatile_is_off(mnt: Path, tmp_path: Path) -> None:
    (mnt / "plain").write_bytes(b"hello")
    with pytest.raises(RingError, match="not a ring file"):
        Consumer(mnt / "plain")
    with pytest.raises(ValueError, match="multiple of 4096"):
        create_ring(mnt / "bad", 10000)
    with pytest.raises(ValueError, match="divides the capacity"):
        create_ring(mnt / "bad", 12 * KiB, segment_size=8 * KiB)
    with pytest.raises(ValueError, match="into 2 to 131072 segments"):
        create_ring(mnt / "bad", 64 * KiB, segment_size=64 * KiB)
    assert create_ring(mnt / "ring", 64 * KiB)
    assert not create_ring(mnt / "ring", 64 * KiB, exist_ok=True)
    with pytest.raises(FileExistsError):
        create_ring(mnt / "ring", 64 * KiB)
    assert sorted(os.listdir(mnt)) == ["plain", "ring"]  # no temporary file left behind

    elsewhere = tmp_path / "ring"
    create_ring(elsewhere, 64 * KiB)
    with pytest.raises(RingError, match="not on a volfs mount"):
        Producer(elsewhere)
    with Producer(elsewhere, volatile=False) as producer, Consumer(elsewhere, volatile=False) as c:
        producer.send(b"no volfs needed")
        assert c.receive(timeout=5) == b"no volfs needed"
        assert producer.statistics().pins == c.statistics().unpins == 0


def test_demo_two_commands_talk_through_a_ring(
    mnt: Path, reaper: list[subprocess.Popen[str]]
) -> None:
    ring = mnt / "chat"
    consumer = subprocess.Popen(
        [sys.executable, str(DEMO), "consumer", str(ring), "--size", "64K"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reaper.append(consumer)
    lines = "hello\nvolatile world\n\nlast line\n"
    producer = subprocess.run(
        [sys.executable, str(DEMO), "producer", str(ring), "--size", "64K"],
        input=lines,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert producer.returncode == 0, producer.stderr
    out, err = consumer.communicate(timeout=30)
    assert consumer.returncode == 0, err
    assert out == lines
    assert "closed the ring" in err


def data_spans(start: int, end: int, capacity: int) -> list[tuple[int, int]]:
    """File ``(offset, length)`` spans of ring positions ``[start, end)``, split at the wrap."""
    spans = []
    while start < end:
        offset = start % capacity
        length = min(end - start, capacity - offset)
        spans.append((PAGE + offset, length))
        start += length
    return spans


@dataclass
class PageWatch:
    """What an observer saw of a ring's pages while messages went through it."""

    samples: int = 0
    #: Samples in which the tail stayed in its segment, so the unconsumed pages could be
    #: judged.
    unconsumed_samples: int = 0
    #: Of those, samples in which consumed segments were volatile beside the unconsumed ones.
    both_at_once: int = 0
    #: The most volatile bytes seen in the data pages at once.
    most_volatile: int = 0


def check_running(processes: Sequence[subprocess.Popen[str]]) -> None:
    """Fail the test, with its stderr, if one of the ring programs has exited."""
    for process in processes:
        if process.poll() is not None:
            err = process.communicate()[1]
            pytest.fail(f"a ring program exited early, status {process.returncode}:\n{err}")


def sample_pages(fd: int, words: memoryview, capacity: int, segment: int, watch: PageWatch) -> None:
    """Look at the ring's pages once; assert the header and unconsumed pages are kept."""
    tail = words[_TAIL]
    head = words[_HEAD]  # after tail: [tail, head) is published and not consumed
    start, end = tail // PAGE * PAGE, -(-head // PAGE) * PAGE
    assert vrange_status(fd, 0, PAGE) == (0, 0), "the header page became volatile"
    unconsumed = [vrange_status(fd, *span) for span in data_spans(start, end, capacity)]
    volatile, _purged = vrange_status(fd, PAGE, capacity)
    watch.samples += 1
    watch.most_volatile = max(watch.most_volatile, volatile)
    # The consumer unpins only whole segments behind its tail: if the tail stayed in its
    # segment, the pages from it on were pinned all along.
    if words[_TAIL] // segment == tail // segment and unconsumed:
        assert all(status == (0, 0) for status in unconsumed), (
            f"unconsumed pages [{start}, {end}) volatile or purged: {unconsumed}"
        )
        watch.unconsumed_samples += 1
        watch.both_at_once += volatile > 0


def watch_pages(
    ring: Path,
    capacity: int,
    segment: int,
    total: int,
    processes: Sequence[subprocess.Popen[str]],
) -> PageWatch:
    """Sample the ring's pages until the consumer's tail reaches ``total``."""
    watch = PageWatch()
    with contextlib.ExitStack() as cleanup:
        fd = os.open(ring, os.O_RDONLY)
        cleanup.callback(os.close, fd)
        page_0 = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ)
        header = cleanup.enter_context(page_0)
        words = memoryview(header).cast("Q")
        cleanup.callback(words.release)
        deadline = time.monotonic() + TRAFFIC_TIMEOUT
        while words[_TAIL] < total:
            check_running(processes)
            assert time.monotonic() < deadline, f"no end of traffic in {TRAFFIC_TIMEOUT} s"
            sample_pages(fd, words, capacity, segment, watch)
    return watch


def test_header_and_unconsumed_pages_are_never_volatile_while_purges_run(
    mnt: Path, spawn: Spawn
) -> None:
    ring, count, capacity, segment = mnt / "ring", 1500, 256 * KiB, 16 * KiB
    stream = {"ring": ring, "messages": "spanning", "capacity": capacity, "segment_size": segment}
    # The producer sends without a pause, and stays attached until the observer is done.
    producer = spawn(ring_programs.send, **stream, count=count, stay=True)
    # The consumer's pauses let unconsumed messages pile up, some of them across the wrap.
    consumer = spawn(ring_programs.receive, **stream, pause_every=40, pause=0.005)
    # Where the consumer's tail ends: every record is an 8-byte length and a padded payload.
    total = sum(
        8 + (len(ring_programs.spanning_message(i, capacity)) + 7) // 8 * 8 for i in range(count)
    )
    wait_for(ring.exists, 10, "the ring file")
    with purging(mnt) as freed:
        watch = watch_pages(ring, capacity, segment, total, (producer, consumer))
    sent = next_report(producer)
    finish(producer)
    received = next_report(consumer)
    finish(consumer)

    assert sent["messages"] == received["received"] == count
    assert watch.samples > 10 and watch.unconsumed_samples > 0, watch
    # While messages flowed, consumed segments were volatile next to unconsumed ones, and
    # purges took them.
    assert received["unpins"] > 0 and watch.most_volatile > 0 and watch.both_at_once > 0
    assert sum(freed) > 0
    assert sent["purged"] > 0


@pytest.mark.parametrize(
    ("killed", "then_eof"),
    [("producer", False), ("consumer", False), ("consumer", True)],
    ids=["producer", "consumer", "consumer-then-ctrl-d"],
)
def test_demo_reports_a_killed_peer_in_one_line_and_exits_1(
    mnt: Path, reaper: list[subprocess.Popen[str]], killed: str, then_eof: bool
) -> None:
    ring = mnt / "chat"
    processes = {}
    for role in ("consumer", "producer"):
        processes[role] = subprocess.Popen(
            [sys.executable, str(DEMO), role, str(ring), "--size", "64K"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        reaper.append(processes[role])
    producer, consumer = processes["producer"], processes["consumer"]
    assert producer.stdin is not None and consumer.stdout is not None
    producer.stdin.write("hello\n")
    producer.stdin.flush()
    assert read_line(consumer.stdout, 10) == "hello\n"

    victim = processes[killed]
    survivor = consumer if victim is producer else producer
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=10) == -signal.SIGKILL
    if then_eof:
        producer.stdin.close()  # Ctrl-D: the end of the input must not hide the loss
    # Otherwise the survivor notices on its own: the producer's stdin stays open, nobody types.
    assert survivor.wait(timeout=10) == 1
    assert survivor.stderr is not None
    err = survivor.stderr.read()
    assert re.fullmatch(
        f"ring_demo: {re.escape(str(ring))}: the {killed} \\(pid {victim.pid}\\) "
        "went away without closing\n",
        err,
    ), err


def test_a_producer_told_its_consumer_went_breaks_the_stream_off_without_ending_it(
    mnt: Path,
) -> None:
    ring = mnt / "ring"
    with Producer(ring, capacity=64 * KiB) as producer:
        with Consumer(ring) as consumer:
            producer.send(b"read")
            producer.send(b"left")
            assert consumer.receive(timeout=5) == b"read"
        with pytest.raises(RingClosedError):
            producer.send(b"refused")
    # The producer gave up because its consumer had gone: no end of the stream for the next.
    with Consumer(ring) as consumer:
        assert consumer.try_receive() == b"left"
        assert consumer.try_receive() is None
        with pytest.raises(RingTimeoutError):
            consumer.receive(timeout=0.1)
        with Producer(ring) as producer:
            producer.send(b"next")
            assert consumer.receive(timeout=5) == b"next"
        # Closed without having been told anything: that is the end.
        with pytest.raises(RingClosedError):
            consumer.receive(timeout=5)


def test_a_producer_that_died_before_the_consumer_came_is_no_news(mnt: Path, spawn: Spawn) -> None:
    ring = mnt / "ring"
    producer = spawn(
        ring_programs.send, ring=ring, messages="numbered", count=2, capacity=64 * KiB, stay=True
    )
    assert next_report(producer)["messages"] == 2
    producer.send_signal(signal.SIGKILL)
    assert producer.wait(timeout=10) == -signal.SIGKILL
    with Consumer(ring) as consumer:
        assert [consumer.receive(timeout=5) for _ in range(2)] == [b"message 0", b"message 1"]
        consumer.check_peer()
        with pytest.raises(RingTimeoutError):  # waits for the next producer
            consumer.receive(timeout=0.2)
        with Producer(ring) as successor:
            successor.send(b"from the next producer")
            assert consumer.receive(timeout=5) == b"from the next producer"


def start_demo(role: str, ring: Path, reaper: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    """``ring_demo.py ROLE RING`` with pipes for its stdin, stdout and stderr."""
    return piped([sys.executable, str(DEMO), role, str(ring), "--size", "64K"], reaper)


def header_word(ring: Path, index: int) -> int:
    """Word ``index`` of the ring's header, read from outside."""
    fd = os.open(ring, os.O_RDONLY)
    try:
        return int.from_bytes(os.pread(fd, 8, 8 * index), sys.byteorder)
    finally:
        os.close(fd)


def read_output(stream: Any, size: int, timeout: float) -> str:
    """The next ``size`` bytes a helper writes (ASCII), read from its pipe unbuffered, so
    that what follows is left in the pipe."""
    deadline = time.monotonic() + timeout
    data = b""
    while len(data) < size:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"{data!r} and no more output within {timeout} s"
        chunk = os.read(stream.fileno(), size - len(data))
        assert chunk, f"{data!r} and the end of the output"
        data += chunk
    return data.decode()


def type_line(producer: subprocess.Popen[str], ring: Path, line: str) -> None:
    """Type ``line`` into a demo producer and wait until the ring has it."""
    assert producer.stdin is not None
    head = header_word(ring, _HEAD)
    producer.stdin.write(line + "\n")
    producer.stdin.flush()
    wait_for(lambda: header_word(ring, _HEAD) > head, 10, f"the producer to send {line!r}")


def attached_and_waiting(process: subprocess.Popen[str], ring: Path, role: str) -> None:
    """Assert that a demo ``role`` is attached to the ring and stays, waiting."""
    line = _LINE[role]
    wait_for(
        lambda: (
            header_word(ring, line) == process.pid
            and header_word(ring, line + _STATUS) & _STATE_MASK == _ATTACHED
        ),
        10,
        f"the {role} to attach",
    )
    # A side that took the other's death for the end of the stream would be gone by now.
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=0.5)


@pytest.mark.parametrize("restarted_first", ["consumer", "producer"])
@pytest.mark.parametrize("killed", ["producer", "consumer"])
def test_demo_either_side_started_again_goes_on_with_the_same_ring(
    mnt: Path, reaper: list[subprocess.Popen[str]], killed: str, restarted_first: str
) -> None:
    ring = mnt / "chat"
    consumer = start_demo("consumer", ring, reaper)
    wait_for(ring.exists, 10, "the consumer to create the ring")
    producer = start_demo("producer", ring, reaper)
    assert consumer.stdout is not None and consumer.stderr is not None
    type_line(producer, ring, "hello")
    assert read_line(consumer.stdout, 10) == "hello\n"
    # Messages the consumer has not received when one side dies.
    consumer.send_signal(signal.SIGSTOP)
    type_line(producer, ring, "left 1")
    type_line(producer, ring, "left 2")
    victim, survivor = (producer, consumer) if killed == "producer" else (consumer, producer)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=10) == -signal.SIGKILL
    consumer.send_signal(signal.SIGCONT)
    assert survivor.wait(timeout=10) == 1
    if killed == "producer":
        # The running consumer receives what was sent, then says the producer went away.
        assert consumer.communicate(timeout=10) == (
            "left 1\nleft 2\n",
            f"ring_demo: {ring}: the producer (pid {producer.pid}) went away without closing\n",
        )
        unreceived = ""
    else:
        unreceived = "left 1\nleft 2\n"

    if restarted_first == "consumer":
        consumer = start_demo("consumer", ring, reaper)
        assert consumer.stdout is not None
        assert read_output(consumer.stdout, len(unreceived), 10) == unreceived
        unreceived = ""
        attached_and_waiting(consumer, ring, "consumer")
        producer = start_demo("producer", ring, reaper)
        type_line(producer, ring, "after")
    else:
        producer = start_demo("producer", ring, reaper)
        type_line(producer, ring, "after")  # the ring keeps it for the next consumer
        attached_and_waiting(producer, ring, "producer")
        consumer = start_demo("consumer", ring, reaper)
    assert producer.stdin is not None
    producer.stdin.close()  # Ctrl-D: the end of the stream
    assert producer.wait(timeout=10) == 0
    out, err = consumer.communicate(timeout=10)
    assert consumer.returncode == 0, err
    assert out == unreceived + "after\n"  # nothing lost, nothing twice
    assert "closed the ring" in err


def test_bench_quick_run_prints_figures_for_every_size_and_transport() -> None:
    # The benchmark mounts a volfs and finds a tmpfs of its own.
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = re.findall(
        r"^(64 B|4 KiB|1 MiB) +(volfs ring|volfs, no segments|tmpfs ring|mp\.Pipe|os\.pipe)"
        r" +([\d,]+) +([\d,.]+) ",
        result.stdout,
        re.MULTILINE,
    )
    figures = {(size, transport): (rate, mib) for size, transport, rate, mib in rows}
    assert len(rows) == len(figures) == 15, result.stdout
    for (size, transport), (rate, mib) in figures.items():
        assert float(rate.replace(",", "")) > 0, (size, transport)
        assert float(mib.replace(",", "")) > 0, (size, transport)
    # The idle ring of 2 MiB kept no more than its header page and one 64 KiB segment.
    idle = re.search(r"after the purge ([\d,]+) KiB", result.stdout)
    assert idle is not None, result.stdout
    assert int(idle[1].replace(",", "")) <= 68, result.stdout
    assert "not judged: --quick" in result.stdout
