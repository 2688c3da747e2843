"""WeightedKeys and covered() against brute force over a plain dict of key -> weight."""

from __future__ import annotations

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from volfs.core.sums import WeightedKeys, covered

HUGE = 2**52


def weight_below(model: dict[int, int], key: int) -> int:
    """The total weight of the keys of ``model`` below ``key``, by brute force."""
    return sum(weight for start, weight in model.items() if start < key)


def below(model: dict[int, int], key: int) -> tuple[int, int | None, int]:
    """What ``WeightedKeys.below`` answers, by brute force."""
    lower = [start for start in model if start < key]
    if not lower:
        return 0, None, 0
    last = max(lower)
    return weight_below(model, key), last, model[last]


def pages_covered(model: dict[int, int], first: int, end: int) -> int:
    """The pages of [first, end) inside the intervals [start, start + weight) of ``model``."""
    return sum(
        max(0, min(start + length, end) - max(start, first)) for start, length in model.items()
    )


def overlaps(model: dict[int, int], start: int, length: int) -> bool:
    """True if [start, start + length) shares a page or a start with an interval of ``model``."""
    return start in model or any(
        start < other + other_length and other < start + length
        for other, other_length in model.items()
    )


def assert_matches(sums: WeightedKeys, model: dict[int, int]) -> None:
    """Assert that ``sums`` holds exactly ``model`` and that its invariants hold."""
    sums._check()
    assert len(sums) == len(model)
    assert sums.total == sum(model.values())
    assert list(sums.items()) == sorted(model.items())


def tree_height(sums: WeightedKeys) -> int:
    """The number of levels of the tree, leaves included."""
    height = 1
    children = sums._root[2]
    while children is not None:
        height += 1
        children = children[0][2]
    return height


# -- seeded random stress ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "load", "key_space", "base"),
    [
        (1, 4, 60, 0),
        (2, 4, 1000, 0),
        (3, 5, 400, HUGE - 500),
        (4, 8, 2**52, 0),
        (5, 64, 100_000, 0),
    ],
)
def test_random_operations_match_a_dict(seed: int, load: int, key_space: int, base: int) -> None:
    """Adds, removes, failed adds and removes and queries, checking everything after each."""
    rng = random.Random(seed)
    sums = WeightedKeys(load)
    model: dict[int, int] = {}
    for step in range(1500):
        # Grow, then shrink back to nothing, so that splits and merges both run at every level.
        growing = step < 900
        action = rng.random()
        if action < (0.7 if growing else 0.25) or not model:
            key = base + rng.randrange(key_space)
            weight = rng.choice([0, 1, rng.randrange(2**20), rng.randrange(2**62)])
            if key in model:
                with pytest.raises(ValueError, match="already present"):
                    sums.add(key, weight)
            else:
                sums.add(key, weight)
                model[key] = weight
        elif action < 0.95 or not growing:
            key = rng.choice(list(model))
            assert sums.remove(key) == model.pop(key)
        else:
            key = base + rng.randrange(key_space)
            if key not in model:
                with pytest.raises(KeyError):
                    sums.remove(key)
        assert_matches(sums, model)
        for _ in range(2):
            probe = base + rng.randrange(-1, key_space + 2)
            assert sums.weight_below(probe) == weight_below(model, probe)
            assert sums.below(probe) == below(model, probe)
    while model:
        key = rng.choice(list(model))
        assert sums.remove(key) == model.pop(key)
        if len(model) % 16 == 0:
            assert_matches(sums, model)
    assert_matches(sums, model)
    assert tree_height(sums) == 1


@pytest.mark.parametrize(("seed", "load"), [(11, 4), (12, 6), (13, 64)])
def test_covered_matches_brute_force(seed: int, load: int) -> None:
    """Disjoint (and touching) intervals; spans inside, across and outside them."""
    rng = random.Random(seed)
    pages = 3000
    sums = WeightedKeys(load)
    model: dict[int, int] = {}
    for _ in range(1200):
        if rng.random() < 0.6 or not model:
            start = rng.randrange(pages)
            length = rng.choice([0, 1, 2, rng.randrange(1, 40)])
            if not overlaps(model, start, length):
                sums.add(start, length)
                model[start] = length
        else:
            start = rng.choice(list(model))
            assert sums.remove(start) == model.pop(start)
        sums._check()
        for _ in range(3):
            first = rng.randrange(-2, pages + 40)
            end = first + rng.choice([0, 1, 5, rng.randrange(-3, 200), pages])
            assert covered(sums, first, end) == pages_covered(model, first, end)


def test_many_keys_in_order_then_out() -> None:
    """Ascending adds grow the tree at its right edge only; removing from the left shrinks it."""
    sums = WeightedKeys(4)
    for key in range(3000):
        sums.add(key, key % 3)
    sums._check()
    assert tree_height(sums) >= 5
    assert sums.weight_below(1500) == sum(key % 3 for key in range(1500))
    for key in range(2999, 999, -1):
        assert sums.remove(key) == key % 3
    sums._check()
    for key in range(1000):
        sums.remove(key)
    sums._check()
    assert len(sums) == 0
    assert tree_height(sums) == 1


# -- edge cases --------------------------------------------------------------------------------


def test_empty() -> None:
    sums = WeightedKeys()
    sums._check()
    assert len(sums) == 0
    assert sums.total == 0
    assert sums.weight_below(0) == 0
    assert sums.weight_below(HUGE) == 0
    assert sums.below(5) == (0, None, 0)
    assert covered(sums, 0, HUGE) == 0
    assert list(sums.items()) == []
    with pytest.raises(KeyError):
        sums.remove(0)


def test_key_zero_and_weight_zero() -> None:
    sums = WeightedKeys()
    sums.add(0, 0)
    assert sums.weight_below(0) == 0
    assert sums.weight_below(1) == 0
    assert sums.below(1) == (0, 0, 0)
    assert covered(sums, 0, 10) == 0
    sums.add(1, 5)
    assert sums.below(1) == (0, 0, 0)
    assert sums.below(2) == (5, 1, 5)
    assert covered(sums, 0, 10) == 5
    assert sums.remove(0) == 0
    assert sums.total == 5
    sums._check()


def test_huge_keys() -> None:
    sums = WeightedKeys(4)
    # Intervals of 3 pages end to end up to 2**52, and the extreme 64-bit keys.
    keys = [HUGE - 3 * i for i in range(1, 41)] + [0, 2**63 - 1, -(2**63)]
    for key in keys:
        sums.add(key, 3)
    sums._check()
    assert sums.weight_below(HUGE) == 3 * 42
    assert sums.weight_below(2**64) == 3 * 43
    assert sums.weight_below(-(2**63)) == 0
    assert sums.weight_below(-(2**63) + 1) == 3
    assert sums.below(HUGE) == (3 * 42, HUGE - 3, 3)
    assert sums.below(2**100) == (3 * 43, 2**63 - 1, 3)
    assert covered(sums, HUGE - 120, HUGE) == 120
    assert covered(sums, HUGE - 121, HUGE + 5) == 120
    assert covered(sums, HUGE - 119, HUGE - 1) == 118
    for key in keys:
        assert sums.remove(key) == 3
    sums._check()


def test_out_of_range_and_duplicates_leave_it_unchanged() -> None:
    sums = WeightedKeys(4)
    model = {key: key + 1 for key in range(0, 200, 2)}
    for key, weight in model.items():
        sums.add(key, weight)
    for key, weight in [(2**63, 1), (-(2**63) - 1, 1), (5, 2**63), (1, 2**64)]:
        with pytest.raises(OverflowError):
            sums.add(key, weight)
    with pytest.raises(ValueError, match="negative"):
        sums.add(1, -1)
    for key in [0, 2, 100, 198]:
        with pytest.raises(ValueError, match="already present"):
            sums.add(key, 3)
    for key in [-1, 1, 199, 200, 2**70]:
        with pytest.raises(KeyError):
            sums.remove(key)
    assert_matches(sums, model)


def test_clear() -> None:
    sums = WeightedKeys(4)
    for key in range(100):
        sums.add(key, 2)
    sums.clear()
    assert_matches(sums, {})
    sums.add(3, 4)
    assert_matches(sums, {3: 4})


def test_load_too_small() -> None:
    with pytest.raises(ValueError, match="load"):
        WeightedKeys(3)


@pytest.mark.parametrize(
    ("first", "end", "expected"),
    [
        (0, 100, 25),  # everything
        (15, 17, 2),  # inside one interval
        (10, 20, 10),  # exactly one interval
        (20, 20, 0),  # empty span
        (25, 10, 0),  # reversed span
        (19, 21, 2),  # across touching intervals
        (21, 22, 1),
        (29, 41, 2),  # ends of two intervals around a gap
        (30, 40, 0),  # the gap itself
        (42, 1000, 3),  # past the last start
    ],
)
def test_covered_cases(first: int, end: int, expected: int) -> None:
    sums = WeightedKeys()
    for start, length in [(10, 10), (20, 10), (40, 5), (50, 0)]:
        sums.add(start, length)
    assert covered(sums, first, end) == expected


# -- Hypothesis --------------------------------------------------------------------------------


class IntervalsMachine(RuleBasedStateMachine):
    """Disjoint intervals added and removed at random; every query against brute force."""

    PAGES = 120

    def __init__(self) -> None:
        super().__init__()
        self.sums = WeightedKeys(4)
        self.model: dict[int, int] = {}
        self.base = 0

    @initialize(base=st.sampled_from([0, 1, HUGE - 200]))
    def place(self, base: int) -> None:
        self.base = base

    @rule(start=st.integers(0, PAGES), length=st.integers(0, 12))
    def add(self, start: int, length: int) -> None:
        start += self.base
        if start in self.model:
            with pytest.raises(ValueError, match="already present"):
                self.sums.add(start, length)
        elif not overlaps(self.model, start, length):
            self.sums.add(start, length)
            self.model[start] = length

    @precondition(lambda self: bool(self.model))
    @rule(index=st.integers(0, 1000))
    def remove(self, index: int) -> None:
        start = sorted(self.model)[index % len(self.model)]
        assert self.sums.remove(start) == self.model.pop(start)

    @rule(start=st.integers(0, PAGES))
    def remove_missing(self, start: int) -> None:
        start += self.base
        if start not in self.model:
            with pytest.raises(KeyError):
                self.sums.remove(start)

    @rule(first=st.integers(-2, PAGES + 15), length=st.integers(-1, PAGES + 15))
    def query(self, first: int, length: int) -> None:
        first += self.base
        end = first + length
        assert self.sums.weight_below(first) == weight_below(self.model, first)
        assert self.sums.weight_below(end) == weight_below(self.model, end)
        assert self.sums.below(first) == below(self.model, first)
        assert covered(self.sums, first, end) == pages_covered(self.model, first, end)

    @invariant()
    def matches_the_model(self) -> None:
        assert_matches(self.sums, self.model)


IntervalsMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=60, deadline=None, database=None
)
TestIntervalsMachine = IntervalsMachine.TestCase
