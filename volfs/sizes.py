"""Sizes and counts as people write them: ``4096``, ``64k``, ``16M``, ``1GiB``, ``50%``.

One grammar for the mount options, ``vrangectl`` and the scripts: a decimal number (``_`` may
group its digits), then optionally a unit ``K``, ``M``, ``G``, ``T``, ``P`` or ``E``, in either
case and each a power of 1024, which may be followed by ``B`` or ``iB``; ``B`` alone means
bytes. Where there is a whole to take a share of, ``N%`` is that share of it. Every value fits
in 64 bits, the width of every size and count volfs hands on.

Only the standard library and :mod:`volfs.abi` are needed: the daemon and the client-side
tools both use it.
"""

from __future__ import annotations

import argparse
import re

from volfs.abi import U64_MAX

#: The largest value a size or count may have: it must fit an unsigned 64-bit field.
MAX_VALUE = U64_MAX

#: Unit letters in order: the n-th (from 1) multiplies by 1024**n.
_UNITS = "kmgtpe"

_SIZE = re.compile(
    r"\s*(?P<digits>[0-9]+(?:_[0-9]+)*)\s*"
    r"(?:(?P<unit>[kmgtpe])(?:i?b)?|b|(?P<percent>%))?\s*",
    re.IGNORECASE | re.ASCII,
)

_SYNTAX = "a number with an optional K, M, G, T, P or E suffix (powers of 1024)"


class SizeError(ValueError):
    """A text that is not a size (or count) here.

    ``str()`` names the text and the reason; :attr:`reason` alone suits a caller that names
    the text its own way (``size=lots: ...``).
    """

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"invalid size {text!r}: {reason}")
        #: What was wrong, or what was expected instead.
        self.reason = reason


def parse_size(text: str, *, percent_of: int | None = None) -> int:
    """Parse a size or count such as ``4096``, ``64k``, ``16M``, ``1GiB`` or ``50%``.

    Args:
        text: the size as written; whitespace around it is ignored.
        percent_of: the whole that ``N%`` is a share of (rounded down); without it a
            percentage is refused.

    Returns:
        The value, at most :data:`MAX_VALUE`.

    Raises:
        SizeError: not a size, a percentage without a whole, or more than 64 bits hold.
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        expected = _SYNTAX if percent_of is None else f"{_SYNTAX}, or a percentage such as 50%"
        raise SizeError(text, f"expected {expected}")
    digits = match["digits"].replace("_", "").lstrip("0")
    # Checked before int(): a huge number of digits would otherwise cost time, then fail.
    if len(digits) > len(str(MAX_VALUE)):
        raise SizeError(text, "larger than 64 bits hold")
    number = int(digits or "0")
    if match["percent"] is None:
        unit = match["unit"]
        value = number << (10 * (_UNITS.index(unit.lower()) + 1)) if unit else number
    elif percent_of is None:
        raise SizeError(text, f"expected {_SYNTAX}; a percentage means nothing here")
    else:
        value = percent_of * number // 100
    if value > MAX_VALUE:
        raise SizeError(text, "larger than 64 bits hold")
    return value


def parse_sizes(text: str, *, percent_of: int | None = None) -> list[int]:
    """Parse a comma-separated list of sizes (``64,4K,1M``); empty items are skipped.

    Raises:
        SizeError: an item is not a size (see :func:`parse_size`), or there is none.
    """
    sizes = [parse_size(item, percent_of=percent_of) for item in text.split(",") if item.strip()]
    if not sizes:
        raise SizeError(text, "expected one size or more, separated by commas")
    return sizes


def size_argument(text: str) -> int:
    """:func:`parse_size` as an ``argparse`` ``type=``, so that usage errors say why."""
    try:
        return parse_size(text)
    except SizeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def sizes_argument(text: str) -> list[int]:
    """:func:`parse_sizes` as an ``argparse`` ``type=``, so that usage errors say why."""
    try:
        return parse_sizes(text)
    except SizeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
