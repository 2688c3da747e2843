"""The page store without FUSE: random operations against a bytearray model."""

from __future__ import annotations

import errno
import itertools
import os
import random
from collections.abc import Callable

import pytest
import trio

from volfs.core.store import GIVE_BACK_RUNS, PAGE_SIZE, Arena, FileContents, Store, coalesced


def check_all(store: Store, files: list[FileContents]) -> None:
    store.arena._check()
    for contents in files:
        contents._check()
    assert store.arena.used_pages == sum(contents.pages for contents in files)


def random_write(rng: random.Random, contents: FileContents, model: bytearray) -> None:
    """Write random bytes at a random offset; a write that does not fit changes nothing."""
    offset = rng.randrange(0, 40 * PAGE_SIZE)
    data = rng.randbytes(rng.choice([1, 100, PAGE_SIZE, 3 * PAGE_SIZE + 7, 9000]))
    before = bytes(model)
    try:
        assert contents.write(offset, data) == len(data)
    except OSError as error:
        assert error.errno == errno.ENOSPC
        assert bytes(contents.read(0, len(model) + 1)) == before
    else:
        if len(model) < offset:
            model.extend(bytes(offset - len(model)))
        model[offset : offset + len(data)] = data


def random_truncate(rng: random.Random, contents: FileContents, model: bytearray) -> None:
    """Shrink or extend to a random size."""
    size = rng.randrange(0, 45 * PAGE_SIZE)
    contents.truncate(size)
    if size < len(model):
        del model[size:]
    else:
        model.extend(bytes(size - len(model)))


def random_punch_or_allocate(rng: random.Random, contents: FileContents, model: bytearray) -> None:
    """Punch a hole (it reads as zeros) or allocate a span (contents unchanged)."""
    offset = rng.randrange(0, 40 * PAGE_SIZE)
    length = rng.randrange(1, 6 * PAGE_SIZE)
    if rng.random() < 0.5:
        contents.punch(offset, length)
        lo, hi = offset, min(len(model), offset + length)
        if lo < hi:
            model[lo:hi] = bytes(hi - lo)
    else:
        try:
            contents.allocate(offset, length)
        except OSError as error:
            assert error.errno == errno.ENOSPC


def random_release(rng: random.Random, contents: FileContents, model: bytearray) -> None:
    """Release a few whole pages: they read as zeros."""
    first = rng.randrange(0, 45)
    count = rng.randrange(1, 8)
    contents.release_pages(first, first + count)
    lo, hi = first * PAGE_SIZE, min(len(model), (first + count) * PAGE_SIZE)
    if lo < hi:
        model[lo:hi] = bytes(hi - lo)


def random_read_and_seek(rng: random.Random, contents: FileContents, model: bytearray) -> None:
    """Read a random span and check SEEK_DATA and SEEK_HOLE from its start."""
    offset = rng.randrange(0, 45 * PAGE_SIZE)
    length = rng.randrange(0, 10 * PAGE_SIZE)
    assert bytes(contents.read(offset, length)) == bytes(model[offset : offset + length])
    data_at = contents.seek_data(offset)
    hole_at = contents.seek_hole(offset)
    if offset >= len(model):
        assert data_at is None and hole_at is None
    else:
        assert hole_at is not None and offset <= hole_at <= len(model)
        assert data_at is None or offset <= data_at < len(model)
        if data_at is not None and data_at > offset:
            # Everything skipped reads as zeros.
            assert not any(model[offset:data_at])


Operation = Callable[[random.Random, FileContents, bytearray], None]

#: Each operation with the upper end of its share of a uniform draw in [0, 1).
OPERATIONS: tuple[tuple[float, Operation], ...] = (
    (0.45, random_write),
    (0.6, random_truncate),
    (0.62, random_punch_or_allocate),
    (0.65, random_release),
    (1.0, random_read_and_seek),
)


def random_operation(rng: random.Random) -> Operation:
    """One of ``OPERATIONS``, chosen by a single draw from ``rng``."""
    draw = rng.random()
    return next(operation for limit, operation in OPERATIONS if draw < limit)


@pytest.mark.parametrize("seed", range(8))
def test_random_operations_match_a_bytearray_model(seed: int) -> None:
    rng = random.Random(seed)
    store = Store(96 * PAGE_SIZE)
    files = [store.new_file() for _ in range(3)]
    models = [bytearray() for _ in files]
    for _step in range(1500):
        which = rng.randrange(len(files))
        contents, model = files[which], models[which]
        random_operation(rng)(rng, contents, model)
        assert contents.size == len(model)
        check_all(store, files)
    for contents, model in zip(files, models, strict=True):
        assert bytes(contents.read(0, len(model))) == bytes(model)
        contents.clear()
    check_all(store, files)
    assert store.used_bytes == 0
    store.close()


def test_sequential_writes_stay_one_run_and_read_without_copy() -> None:
    store = Store(1024 * PAGE_SIZE)
    contents = store.new_file()
    for block in range(64):
        contents.write(block * 8192, bytes([block]) * 8192)
    assert len(contents.map) == 1
    assert isinstance(contents.read(8192 * 3, 8192 * 5), memoryview)
    assert store.used_bytes == 64 * 8192


def test_write_that_does_not_fit_changes_nothing() -> None:
    store = Store(4 * PAGE_SIZE)
    contents = store.new_file()
    contents.write(0, b"a" * PAGE_SIZE)
    with pytest.raises(OSError) as caught:
        contents.write(PAGE_SIZE - 10, b"b" * (4 * PAGE_SIZE))
    assert caught.value.errno == errno.ENOSPC
    assert bytes(contents.read(0, 2 * PAGE_SIZE)) == b"a" * PAGE_SIZE
    assert store.used_bytes == PAGE_SIZE


def test_a_system_out_of_memory_partway_makes_a_short_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The memfd takes bytes until the system has no memory left: the write is short and
    the size covers only what was taken; with nothing taken, the write fails and the size
    stays."""
    store = Store(64 * PAGE_SIZE)
    contents = store.new_file()
    contents.write(0, b"a" * PAGE_SIZE)
    store.new_file().write(0, b"o")  # takes the arena page after: the next run starts apart
    room = [100]  # bytes the memfd still takes
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: memoryview, position: int) -> int:
        if not room[0]:
            raise OSError(errno.ENOMEM, "out of memory")
        taken = real_pwrite(fd, data[: room[0]], position)
        room[0] -= taken
        return taken

    monkeypatch.setattr("volfs.core.store.os.pwrite", pwrite)
    assert contents.write(PAGE_SIZE - 50, b"b" * (3 * PAGE_SIZE)) == 100
    assert len(contents.map) == 2  # copied in two pieces, the second cut short
    assert contents.size == PAGE_SIZE + 50
    assert bytes(contents.read(0, 2 * PAGE_SIZE)) == b"a" * (PAGE_SIZE - 50) + b"b" * 100
    with pytest.raises(OSError) as caught:
        contents.write(PAGE_SIZE + 50, b"c")
    assert caught.value.errno == errno.ENOMEM
    assert contents.size == PAGE_SIZE + 50


def test_a_truncate_the_kernel_cannot_zero_for_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = Store(64 * PAGE_SIZE)
    contents = store.new_file()
    data = os.urandom(3 * PAGE_SIZE)
    contents.write(0, data)

    def pwrite(fd: int, data: memoryview, position: int) -> int:
        raise OSError(errno.ENOMEM, "out of memory")

    monkeypatch.setattr("volfs.core.store.os.pwrite", pwrite)
    with pytest.raises(OSError) as caught:
        contents.truncate(PAGE_SIZE + 10)  # the rest of page 1 must be zeroed
    assert caught.value.errno == errno.ENOMEM
    assert contents.size == 3 * PAGE_SIZE
    assert contents.pages == 3
    assert bytes(contents.read(0, 3 * PAGE_SIZE)) == data


def test_freed_pages_come_back_zeroed() -> None:
    arena = Arena(8)
    contents = FileContents(arena)
    contents.write(0, b"\xff" * 8 * PAGE_SIZE)
    contents.truncate(10)
    contents.truncate(8 * PAGE_SIZE)
    other = FileContents(arena)
    other.write(0, b"x")
    other.truncate(7 * PAGE_SIZE)
    other.write(7 * PAGE_SIZE - 1, b"y")
    assert bytes(contents.read(0, 8 * PAGE_SIZE)) == b"\xff" * 10 + bytes(8 * PAGE_SIZE - 10)
    assert bytes(other.read(1, 7 * PAGE_SIZE - 2)) == bytes(7 * PAGE_SIZE - 2)


def test_runs_that_touch_are_punched_as_one() -> None:
    assert coalesced([]) == []
    assert coalesced([(0, 4), (4, 2), (8, 1), (9, 3), (5, 1), (20, 1)]) == [
        (0, 6),
        (8, 4),
        (5, 1),
        (20, 1),
    ]


def test_pages_released_range_by_range_come_back_zeroed_in_one_punch() -> None:
    arena = Arena(64)
    contents = FileContents(arena)
    contents.write(0, b"\xff" * 64 * PAGE_SIZE)
    arena.on_release = lambda: None  # held back, as the reclaimer does, then punched at once
    for first in range(0, 64, 4):
        contents.release_pages(first, first + 4)
    runs = arena.take_dirty()
    assert len(runs) == 16 and coalesced(runs) == [(0, 64)]
    arena.punch(runs)
    arena.give_back(runs)
    arena._check()
    assert arena.free_pages == 64 and arena.punching_pages == 0
    assert bytes(arena.view) == bytes(64 * PAGE_SIZE)


def test_background_reclaim_returns_pages_and_write_waits_for_them() -> None:
    store = Store(2048 * PAGE_SIZE)
    big, other = store.new_file(), store.new_file()

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run_reclaimer)
            big.write(0, b"z" * (2000 * PAGE_SIZE))
            big.truncate(0)
            assert store.used_bytes == 0 and store.reclaim_pending
            await store.wait_reclaimed()
            assert not store.reclaim_pending
            assert store.arena.free_pages == 2048
            other.write(0, b"y" * (2048 * PAGE_SIZE))
            other.truncate(PAGE_SIZE)
            # Dirty pages are punched on demand when an allocation needs them.
            big.write(0, b"x" * (2047 * PAGE_SIZE))
            nursery.cancel_scope.cancel()

    trio.run(scenario)
    store.arena._check()
    assert bytes(big.read(0, 3)) == b"xxx" and bytes(other.read(0, 2)) == b"yy"
    assert store.arena.dirty_pages == store.arena.punching_pages == 0


def test_many_released_runs_come_back_over_several_turns_of_the_loop() -> None:
    """Tens of thousands of one-page files freed at once must not hold the event loop while
    their runs go back to the free space: a slice of runs a turn."""
    runs = 8 * GIVE_BACK_RUNS + 1
    store = Store(2 * runs * PAGE_SIZE)
    files = [store.new_file() for _ in range(runs)]
    spacer = store.new_file()
    for index, contents in enumerate(files):
        contents.write(0, b"f" * PAGE_SIZE)
        spacer.write(index * PAGE_SIZE, b"s" * PAGE_SIZE)  # keeps the freed runs apart
    seen: list[int] = []

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run_reclaimer)
            for contents in files:
                contents.truncate(0)
            with trio.fail_after(10):
                while store.arena.free_pages < runs:
                    await trio.sleep(0)
                    seen.append(store.arena.free_pages)
            nursery.cancel_scope.cancel()

    trio.run(scenario)
    store.arena._check()
    given_back = [after - before for before, after in itertools.pairwise(seen) if after > before]
    # Trio orders a turn's tasks at random: two turns of the reclaimer may fall between two of
    # this task's.
    assert len(given_back) >= 4 and max(given_back) <= 2 * GIVE_BACK_RUNS, given_back
    assert store.arena.free_pages == runs and store.arena.punching_pages == 0


def test_seeking_crosses_more_runs_than_are_fetched_at_once() -> None:
    store = Store(4096 * PAGE_SIZE)
    contents, spacer = store.new_file(), store.new_file()
    for page in range(100):
        contents.write(page * PAGE_SIZE, b"d" * PAGE_SIZE)
        spacer.write(page * PAGE_SIZE, b"s" * PAGE_SIZE)  # keeps the file's runs apart
    contents.truncate(110 * PAGE_SIZE)
    contents.write(105 * PAGE_SIZE, b"e")
    assert len(contents.map) == 101
    assert contents.seek_hole(0) == 100 * PAGE_SIZE
    assert contents.seek_data(100 * PAGE_SIZE) == 105 * PAGE_SIZE
    assert contents.seek_hole(105 * PAGE_SIZE) == 106 * PAGE_SIZE
    assert contents.seek_data(50 * PAGE_SIZE + 7) == 50 * PAGE_SIZE + 7
