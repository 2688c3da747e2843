"""Sets of disjoint page intervals kept in a ``SortedDict`` of start -> end.

Intervals never overlap or touch: adding merges with neighbours. Each operation costs
O(log m + k) for m intervals in the set and k intervals it touches, and returns what it
changed, for a caller that keeps something in step with the set.
"""

from __future__ import annotations

from collections.abc import Iterator

from sortedcontainers import SortedDict

#: What an operation changed: the intervals ``(start, end)`` it removed, then those it added.
Change = tuple[list[tuple[int, int]], list[tuple[int, int]]]


def clip(intervals: SortedDict[int, int], first: int, end: int) -> Iterator[tuple[int, int]]:
    """Yield the parts of ``intervals`` (start -> end) inside [first, end)."""
    index = max(intervals.bisect_right(first) - 1, 0)
    keys, values = intervals.keys(), intervals.values()
    for i in range(index, len(keys)):
        lo, hi = keys[i], values[i]
        if lo >= end:
            return
        if hi > first:
            yield max(lo, first), min(hi, end)


def add_interval(intervals: SortedDict[int, int], first: int, end: int) -> Change:
    """Add [first, end) to disjoint, non-touching intervals, merging. O(log m + k)."""
    index = max(intervals.bisect_right(first) - 1, 0)
    keys = intervals.keys()
    merged = []
    for i in range(index, len(keys)):
        lo = keys[i]
        if lo > end:
            break
        if intervals[lo] >= first:
            merged.append(lo)
    removed = []
    for lo in merged:
        hi = intervals.pop(lo)
        removed.append((lo, hi))
        first, end = min(first, lo), max(end, hi)
    intervals[first] = end
    return removed, [(first, end)]


def remove_interval(intervals: SortedDict[int, int], first: int, end: int) -> Change:
    """Remove [first, end) from a set of disjoint intervals. O(log m + k)."""
    index = max(intervals.bisect_right(first) - 1, 0)
    keys = intervals.keys()
    touched = []
    for i in range(index, len(keys)):
        lo = keys[i]
        if lo >= end:
            break
        if intervals[lo] > first:
            touched.append(lo)
    removed, added = [], []
    for lo in touched:
        hi = intervals.pop(lo)
        removed.append((lo, hi))
        if lo < first:
            intervals[lo] = first
            added.append((lo, first))
        if hi > end:
            intervals[end] = hi
            added.append((end, hi))
    return removed, added
