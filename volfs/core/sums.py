"""Prefix sums of weights over sorted int keys in O(log n): the sidecar of an interval map.

:class:`WeightedKeys` holds distinct int keys, each with a non-negative int weight, and tells
the total weight of the keys below any key in O(log n). Kept next to a ``SortedDict`` of
disjoint intervals, with each interval's length as the weight of its start, it answers how many
pages of a span the intervals cover (:func:`covered`) without walking the intervals in the span.

The structure is a B+ tree whose nodes are tuples ``(bounds, sums, children)``. A leaf holds its
sorted keys in ``bounds`` and their weights in ``sums``, both ``array('q')``, and None for
``children``. An inner node holds, for each child, a bound (no key of the child is above it,
every key of the next child is) and the child's total weight, in lists. Each level of a descent
costs one C ``bisect`` and one C ``sum`` over at most half a node, so the Python-level work per
level is a few bytecodes, and the tree is three levels deep at a million keys. The leaves keep
keys and weights unboxed and contiguous: with a million keys the leaves do not fit in the
caches, and following pointers to scattered int objects costs more than the boxing that
``bisect`` and ``sum`` do on arrays.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterator, MutableSequence
from itertools import pairwise
from typing import TypeAlias

_Node: TypeAlias = "tuple[MutableSequence[int], MutableSequence[int], list[_Node] | None]"

#: Default node size: nodes other than the root hold between load // 2 and 2 * load entries.
#: Small nodes keep the sums within a node short, large ones keep the tree shallow; 32 to 128
#: measured alike at 10^6 keys. The wide gap between the limits (an (a, b)-tree with b >= 4a)
#: makes splits and merges amortised O(1) per update.
DEFAULT_LOAD = 64
#: The smallest node size: a node split in two or merged with a sibling stays within limits.
MIN_LOAD = 4

#: Keys and weights live in signed 64-bit arrays.
_INT64 = 1 << 63


def _leaf() -> _Node:
    """Return a new empty leaf."""
    return (array("q"), array("q"), None)


class WeightedKeys:
    """A set of distinct int keys, each with a non-negative int weight, with prefix sums by key.

    Keys are page numbers in practice; any ``-2**63 <= key < 2**63`` works, and weights must be
    below ``2**63`` (their total is unbounded). Every operation costs O(log n) in the worst
    case: a split or merge touches only nodes on one root-to-leaf path and their siblings.
    """

    __slots__ = ("_len", "_max", "_min", "_root", "_total")

    def __init__(self, load: int = DEFAULT_LOAD) -> None:
        """Create an empty set.

        Runtime complexity: O(1).

        Args:
            load: Node size: nodes other than the root hold between ``load // 2`` and
                ``2 * load`` entries. Small loads make deep trees out of few keys, for tests.

        Raises:
            ValueError: ``load`` is below :data:`MIN_LOAD`.
        """
        if load < MIN_LOAD:
            raise ValueError(f"load {load} below {MIN_LOAD}")
        self._max = 2 * load
        self._min = load // 2
        self._root = _leaf()
        self._total = 0
        self._len = 0

    def __len__(self) -> int:
        """Return the number of keys.

        Runtime complexity: O(1).
        """
        return self._len

    @property
    def total(self) -> int:
        """The sum of all weights.

        Runtime complexity: O(1).
        """
        return self._total

    def clear(self) -> None:
        """Remove every key.

        Runtime complexity: O(n) to free the nodes.
        """
        self._root = _leaf()
        self._total = 0
        self._len = 0

    def items(self) -> Iterator[tuple[int, int]]:
        """Yield every ``(key, weight)`` in key order.

        Runtime complexity: O(n) for the whole iteration. The set must not change meanwhile.
        """
        stack = [self._root]
        while stack:
            bounds, sums, children = stack.pop()
            if children is None:
                yield from zip(bounds, sums, strict=True)
            else:
                stack.extend(reversed(children))

    def add(self, key: int, weight: int) -> None:
        """Add ``key`` with ``weight``.

        Runtime complexity: O(log n) worst case.

        Args:
            key: The key, not present yet.
            weight: Its weight, ``0 <= weight < 2**63``.

        Raises:
            ValueError: ``key`` is already present, or ``weight`` is negative.
            OverflowError: ``key`` or ``weight`` does not fit in 64 bits.
        """
        # Checked first: the descent updates the sums on its way down.
        if not (0 <= weight < _INT64 and -_INT64 <= key < _INT64):
            if weight < 0:
                raise ValueError(f"negative weight {weight}")
            raise OverflowError(f"key {key} or weight {weight} beyond 64 bits")
        node = self._root
        bounds, sums, children = node
        path: list[tuple[_Node, int]] = []
        while children is not None:
            i = bisect_left(bounds, key)
            if i == len(bounds):
                # Above every key of this subtree: the last child's bound rises to the key.
                i -= 1
                bounds[i] = key
            sums[i] += weight
            path.append((node, i))
            node = children[i]
            bounds, sums, children = node
        i = bisect_left(bounds, key)
        if i < len(bounds) and bounds[i] == key:
            # A present key is at most every bound on its path, so no bound rose on the way.
            for parent, j in path:
                parent[1][j] -= weight
            raise ValueError(f"key {key} already present")
        bounds.insert(i, key)
        sums.insert(i, weight)
        self._total += weight
        self._len += 1
        if len(bounds) > self._max:
            self._split(node, path)

    def remove(self, key: int) -> int:
        """Remove ``key`` and return its weight.

        Runtime complexity: O(log n) worst case.

        Raises:
            KeyError: ``key`` is not present.
        """
        node = self._root
        bounds, sums, children = node
        path: list[tuple[_Node, int]] = []
        while children is not None:
            i = bisect_left(bounds, key)
            if i == len(bounds):
                raise KeyError(key)
            path.append((node, i))
            node = children[i]
            bounds, sums, children = node
        i = bisect_left(bounds, key)
        if i == len(bounds) or bounds[i] != key:
            raise KeyError(key)
        # The bounds above the key may stay: a bound only has to separate two children.
        del bounds[i]
        weight = sums.pop(i)
        for parent, j in path:
            parent[1][j] -= weight
        self._total -= weight
        self._len -= 1
        if len(bounds) < self._min and path:
            self._merge(path)
        return weight

    def weight_below(self, key: int) -> int:
        """Return the total weight of the keys strictly less than ``key``.

        Runtime complexity: O(log n) worst case.
        """
        return self.below(key)[0]

    def below(self, key: int) -> tuple[int, int | None, int]:
        """Return the weight below ``key``, the greatest key below it, and that key's weight.

        Runtime complexity: O(log n) worst case.

        Returns:
            ``(weight_below(key), last, weight)`` where ``last`` is the greatest key strictly
            less than ``key`` and ``weight`` its weight, or ``(0, None, 0)`` if there is none.
        """
        bounds, sums, children = self._root
        node_total = self._total
        below = 0
        # The subtree holding the keys just before those of the current node, if any.
        before: _Node | None = None
        while True:
            i = bisect_left(bounds, key)
            # Summing the shorter side halves the work on average.
            if i + i <= len(sums):
                below += sum(sums[:i])
            else:
                below += node_total - sum(sums[i:])
            if children is None:
                if i:
                    return below, bounds[i - 1], sums[i - 1]
                break
            if i == len(bounds):
                before = (bounds, sums, children)
                break
            if i:
                before = children[i - 1]
            node_total = sums[i]
            bounds, sums, children = children[i]
        if before is None:
            return below, None, 0
        bounds, sums, children = before
        while children is not None:
            bounds, sums, children = children[-1]
        return below, bounds[-1], sums[-1]

    # -- internals -------------------------------------------------------------------------

    def _split(self, node: _Node, path: list[tuple[_Node, int]]) -> None:
        """Split the overfull ``node``, then its ancestors on ``path`` that overflow in turn."""
        while len(node[0]) > self._max:
            right = _cut(node)
            moved = sum(right[1])
            if not path:
                kept = sum(node[1])
                self._root = ([node[0][-1], right[0][-1]], [kept, moved], [node, right])
                return
            parent, j = path.pop()
            _adopt(parent, j, node, right, moved)
            node = parent

    def _merge(self, path: list[tuple[_Node, int]]) -> None:
        """Merge the underfull last node of ``path`` with a sibling, then its ancestors."""
        while path:
            parent, j = path.pop()
            bounds, sums, children = parent
            assert children is not None
            if len(children[j][0]) >= self._min:
                break
            if j == len(children) - 1:
                j -= 1
            left, right = children[j], children.pop(j + 1)
            left[0].extend(right[0])
            left[1].extend(right[1])
            left_children, right_children = left[2], right[2]
            if left_children is not None and right_children is not None:
                left_children.extend(right_children)
            # The merged node keeps the right one's bound, above all of its keys.
            del bounds[j]
            sums[j] += sums.pop(j + 1)
            if len(left[0]) > self._max:
                right = _cut(left)
                _adopt(parent, j, left, right, sum(right[1]))
        root_children = self._root[2]
        while root_children is not None and len(root_children) == 1:
            self._root = root_children[0]
            root_children = self._root[2]

    def _check(self) -> None:
        """Assert every invariant of the tree.

        Runtime complexity: O(n).
        """
        assert self._min >= MIN_LOAD // 2 and 2 * self._min <= self._max, "node size limits"
        root_children = self._root[2]
        assert root_children is None or len(root_children) > 1, "inner root with one child"
        count, total, _ = self._check_node(self._root, None, None, is_root=True)
        assert count == self._len, "wrong length"
        assert total == self._total, "wrong total"

    def _check_node(
        self, node: _Node, low: int | None, high: int | None, *, is_root: bool
    ) -> tuple[int, int, int]:
        """Assert the invariants of the subtree ``node``, whose keys are in (low, high].

        Runtime complexity: O(size of the subtree).

        Returns:
            The subtree's number of keys, total weight and height.
        """
        bounds, sums, children = node
        assert len(bounds) == len(sums), "bounds and sums differ in length"
        assert is_root or self._min <= len(bounds) <= self._max, "node size out of range"
        assert all(a < b for a, b in pairwise(bounds)), "bounds unsorted"
        if bounds:
            assert low is None or bounds[0] > low, "key or bound below the parent's range"
            assert high is None or bounds[-1] <= high, "key or bound above the parent's bound"
        if children is None:
            assert isinstance(bounds, array) and isinstance(sums, array), "leaf not arrays"
            assert all(weight >= 0 for weight in sums), "negative weight"
            return len(bounds), sum(sums), 1
        assert isinstance(bounds, list) and isinstance(sums, list), "inner node not lists"
        assert len(children) == len(bounds), "children and bounds differ in length"
        count = 0
        heights = set()
        for i, child in enumerate(children):
            child_count, child_total, height = self._check_node(
                child, bounds[i - 1] if i else low, bounds[i], is_root=False
            )
            assert child_total == sums[i], "stale sum of a child"
            count += child_count
            heights.add(height)
        assert len(heights) == 1, "leaves at different depths"
        return count, sum(sums), heights.pop() + 1


def _cut(node: _Node) -> _Node:
    """Move the upper half of ``node``'s entries to a new node and return that node."""
    bounds, sums, children = node
    half = len(bounds) // 2
    right: _Node = (bounds[half:], sums[half:], None if children is None else children[half:])
    del bounds[half:]
    del sums[half:]
    if children is not None:
        del children[half:]
    return right


def _adopt(parent: _Node, j: int, left: _Node, right: _Node, moved: int) -> None:
    """Insert ``right``, cut from ``parent``'s child ``left`` at ``j`` with weight ``moved``."""
    bounds, sums, children = parent
    assert children is not None
    # ``left`` takes its last key as bound; ``right`` inherits the bound ``left`` had.
    bounds.insert(j, left[0][-1])
    sums[j] -= moved
    sums.insert(j + 1, moved)
    children.insert(j + 1, right)


def covered(sums: WeightedKeys, first: int, end: int) -> int:
    """Return how many pages of [first, end) the intervals held by ``sums`` cover.

    ``sums`` holds intervals ``[key, key + weight)``: each keyed by its start, weighing its
    length. They must not overlap (they may touch).

    Runtime complexity: O(log n) worst case.
    """
    if first >= end:
        return 0
    below_end, last, last_pages = sums.below(end)
    if last is None:
        return 0
    if last < first:
        # No interval starts in the span: only the one before it can reach in.
        return max(0, min(last + last_pages, end) - first)
    below_first, before, before_pages = sums.below(first)
    # The intervals starting in the span, less the part of the last one past its end, plus the
    # part of the one starting before the span that reaches in (it ends before ``last`` starts).
    pages = below_end - below_first - max(0, last + last_pages - end)
    if before is not None:
        pages += max(0, before + before_pages - first)
    return pages
