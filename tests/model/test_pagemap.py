"""The C page map (volfs/core/_pagemap.c) against a dictionary of page -> arena page."""

from __future__ import annotations

import gc
import random

import pytest

from volfs.core._pagemap import PageMap, PageTable


def expected_runs(pages: dict[int, int]) -> list[tuple[int, int, int]]:
    """Maximal runs of pages contiguous in the file and the arena."""
    runs: list[tuple[int, int, int]] = []
    for page in sorted(pages):
        arena = pages[page]
        if runs and runs[-1][0] + runs[-1][2] == page and runs[-1][1] + runs[-1][2] == arena:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((page, arena, 1))
    return runs


@pytest.mark.parametrize("seed", range(6))
def test_inserts_and_removes_match_a_dictionary(seed: int) -> None:
    rng = random.Random(seed)
    pages: dict[int, int] = {}
    free_arena = list(range(4096))
    rng.shuffle(free_arena)
    page_map = PageMap()
    for _step in range(600):
        if rng.random() < 0.6 and free_arena:
            start = rng.randrange(0, 400)
            count = rng.randrange(1, 12)
            if any(page in pages for page in range(start, start + count)):
                with pytest.raises(ValueError):
                    page_map.insert(start, 5000, count)
                continue
            # Mostly arena runs that continue a neighbour's, so merging is exercised.
            before = pages.get(start - 1)
            arena = before + 1 if before is not None and rng.random() < 0.7 else None
            if arena is None or any(a in pages.values() for a in range(arena, arena + count)):
                arena = 10_000 + rng.randrange(0, 10**6) * 16
            with page_map:
                page_map.insert(start, arena, count)
            for offset in range(count):
                pages[start + offset] = arena + offset
        else:
            first = rng.randrange(0, 420)
            end = first + rng.randrange(0, 40)
            with page_map:
                released = page_map.remove(first, end)
            gone = {page: pages.pop(page) for page in sorted(pages) if first <= page < end}
            assert sorted(a + i for a, n in released for i in range(n)) == sorted(gone.values())
        runs = expected_runs(pages)
        assert page_map.items() == runs
        assert page_map.pages == len(pages)
        assert len(page_map) == len(runs)
        probe = rng.randrange(-2, 430)
        floor = [run for run in runs if run[0] <= probe]
        assert page_map.floor(probe) == (floor[-1] if floor else None)
        first = rng.randrange(0, 430)
        end = first + rng.randrange(0, 50)
        assert page_map.runs(first, end) == [
            run for run in runs if run[0] < end and run[0] + run[2] > first
        ]


def test_the_last_page_of_the_largest_file() -> None:
    page_map = PageMap()
    last = (1 << 51) - 1
    with page_map:
        page_map.insert(last, 7, 1)
        page_map.insert(0, 8, 1)
    assert page_map.floor(1 << 52) == (last, 7, 1)
    with page_map:
        assert page_map.remove(1, 1 << 52) == [(7, 1)]
    assert page_map.items() == [(0, 8, 1)]
    with pytest.raises(ValueError):
        page_map.insert(0, 0, 0)
    with pytest.raises(ValueError):
        page_map.insert((1 << 63) - 1, 0, 2)


def test_fields_and_holds() -> None:
    page_map = PageMap(atime_ns=1, mtime_ns=2, ctime_ns=3)
    assert (page_map.atime_ns, page_map.mtime_ns, page_map.ctime_ns) == (1, 2, 3)
    page_map.size = 1 << 62
    assert page_map.size == 1 << 62
    page_map.set_hold(2, True)
    page_map.set_hold(8, True)
    page_map.set_hold(2, False)
    assert page_map.holds == 8
    with pytest.raises(AttributeError):
        del page_map.size


def test_a_table_forgets_a_map_once_it_is_freed_or_replaced() -> None:
    table = PageTable()
    first, second = PageMap(), PageMap()
    table.add(1, first)
    table.add(2, second)
    with pytest.raises(ValueError):
        table.add(3, first)
    assert len(table) == 2 and table.serves(1) and table.serves(2)
    del first
    gc.collect()
    assert not table.serves(1) and len(table) == 1
    replacement = PageMap()
    table.add(2, replacement)  # a new map for the same inode: the old one's freeing keeps it
    del second
    gc.collect()
    assert table.serves(2)
    table.discard(2)
    assert len(table) == 0
    del replacement
    many = [PageMap() for _ in range(1000)]
    for ino, page_map in enumerate(many, start=10):
        table.add(ino, page_map)
    assert len(table) == 1000 and all(table.serves(ino) for ino in range(10, 1010))


def test_timestamps_of_any_time_t_round_trip_exactly() -> None:
    """tmpfs keeps years past 2262 and before 1677, which 64-bit nanoseconds cannot hold."""
    year_2300 = 10_413_792_000 * 10**9 + 123
    year_1500 = -14_831_769_600 * 10**9 + 500_000_000
    page_map = PageMap(atime_ns=year_2300, mtime_ns=year_1500, ctime_ns=-1)
    assert (page_map.atime_ns, page_map.mtime_ns, page_map.ctime_ns) == (year_2300, year_1500, -1)
    page_map.mtime_ns = 2**62
    assert page_map.mtime_ns == 2**62
    with pytest.raises(OverflowError):
        page_map.atime_ns = 2**200


def test_runs_can_be_fetched_a_few_at_a_time() -> None:
    page_map = PageMap()
    with page_map:
        for page in range(0, 100, 2):
            page_map.insert(page, 1000 + 3 * page, 2)  # contiguous in the file, not the arena
    assert len(page_map) == 50
    assert page_map.runs(0, 200, 3) == [(0, 1000, 2), (2, 1006, 2), (4, 1012, 2)]
    assert page_map.runs(7, 200, 1) == [(6, 1018, 2)]
    assert len(page_map.runs(0, 200)) == 50
