"""The one size grammar: what it accepts, what it refuses and how it says so."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from volfs.daemon.options import OptionError, parse_mount_options
from volfs.sizes import (
    MAX_VALUE,
    SizeError,
    parse_size,
    parse_sizes,
    size_argument,
    sizes_argument,
)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

UNITS = {"k": KiB, "m": MiB, "g": GiB, "t": TiB, "p": 1 << 50, "e": 1 << 60}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("4096", 4096),
        ("4k", 4 * KiB),
        ("4K", 4 * KiB),
        ("4KiB", 4 * KiB),
        ("4kib", 4 * KiB),
        ("4KB", 4 * KiB),
        ("64B", 64),
        ("1m", MiB),
        ("16M", 16 * MiB),
        ("2g", 2 * GiB),
        ("1T", TiB),
        ("1P", 1 << 50),
        ("15E", 15 << 60),
        ("1 G", GiB),
        (" 64M\t", 64 * MiB),
        ("1_000_000", 1_000_000),
        ("007", 7),
        (str(MAX_VALUE), MAX_VALUE),
    ],
)
def test_accepted_forms(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "k",
        "KiB",
        "1.5M",
        "-4096",
        "+4096",
        "0x1000",
        "4 KiB B",
        "4iB",
        "4KK",
        "1_",
        "_1",
        "1__0",
        "4Q",
        "१२",
        "1e3",
        "4,096",
        "50 percent",
    ],
)
def test_malformed_sizes_are_refused(text: str) -> None:
    with pytest.raises(SizeError) as refused:
        parse_size(text)
    assert refused.value.reason == (
        "expected a number with an optional K, M, G, T, P or E suffix (powers of 1024)"
    )
    assert str(refused.value) == f"invalid size {text!r}: {refused.value.reason}"


@pytest.mark.parametrize("text", [str(MAX_VALUE + 1), "16E", "16384P", "9" * 5000])
def test_more_than_64_bits_is_refused(text: str) -> None:
    with pytest.raises(SizeError, match="larger than 64 bits hold"):
        parse_size(text)


def test_a_percentage_needs_a_whole() -> None:
    with pytest.raises(SizeError, match="a percentage means nothing here"):
        parse_size("50%")
    assert parse_size("50%", percent_of=8 * GiB) == 4 * GiB
    assert parse_size("1%", percent_of=1000) == 10
    assert parse_size("3%", percent_of=10) == 0  # rounded down
    assert parse_size("150 %", percent_of=GiB) == GiB + GiB // 2
    assert parse_size("64M", percent_of=GiB) == 64 * MiB  # a plain size is still one
    for text in ("50%M", "%", "0.5%", "50%%"):
        with pytest.raises(SizeError, match="or a percentage such as 50%"):
            parse_size(text, percent_of=GiB)


@given(
    st.integers(min_value=0, max_value=1 << 20),
    st.sampled_from(sorted(UNITS)),
    st.sampled_from(["", "b", "ib"]),
    st.booleans(),
)
def test_every_unit_is_a_power_of_1024_in_either_case(
    number: int, unit: str, tail: str, upper: bool
) -> None:
    text = f"{number}{unit}{tail}"
    text = text.upper() if upper else text
    value = number * UNITS[unit]
    if value > MAX_VALUE:
        with pytest.raises(SizeError):
            parse_size(text)
    else:
        assert parse_size(text) == value


@given(st.text(max_size=30), st.one_of(st.none(), st.integers(min_value=0, max_value=1 << 50)))
def test_any_text_is_a_size_or_a_size_error(text: str, whole: int | None) -> None:
    try:
        value = parse_size(text, percent_of=whole)
    except SizeError as error:
        assert str(error).isprintable()  # the text shows quoted, control characters escaped
        return
    assert 0 <= value <= MAX_VALUE


def test_lists_of_sizes() -> None:
    assert parse_sizes("64,4K,1M") == [64, 4 * KiB, MiB]
    assert parse_sizes(" 64 , ,4KiB,") == [64, 4 * KiB]
    assert parse_sizes("10%,1k", percent_of=1000) == [100, KiB]
    with pytest.raises(SizeError, match="one size or more"):
        parse_sizes(" , ")
    with pytest.raises(SizeError, match="invalid size 'lots'"):
        parse_sizes("64,lots")


def test_argparse_types_say_why() -> None:
    parser = argparse.ArgumentParser(prog="tool", exit_on_error=False)
    parser.add_argument("--size", type=size_argument)
    parser.add_argument("--sizes", type=sizes_argument)
    arguments = parser.parse_args(["--size", "16M", "--sizes", "64,4K"])
    assert (arguments.size, arguments.sizes) == (16 * MiB, [64, 4 * KiB])
    with pytest.raises(argparse.ArgumentError) as refused:
        parser.parse_args(["--size", "lots"])
    assert str(refused.value) == (
        "argument --size: invalid size 'lots': expected a number with an optional "
        "K, M, G, T, P or E suffix (powers of 1024)"
    )
    with pytest.raises(argparse.ArgumentError, match=r"invalid size '1\.5M'"):
        parser.parse_args(["--sizes", "64,1.5M"])


def test_mount_options_speak_the_same_grammar() -> None:
    memory = 8 * GiB
    options = parse_mount_options(
        ["size=1GiB,nr_inodes=2K,max_ranges=1_000,pressure_batch=4MB,pressure_watermark=1%"],
        memory=memory,
    )
    assert (options.size, options.nr_inodes, options.max_ranges) == (GiB, 2 * KiB, 1000)
    one_percent_in_pages = -(-(memory // 100) // 4096) * 4096
    assert (options.pressure.batch, options.pressure.watermark) == (4 * MiB, one_percent_in_pages)
    # Each option names itself; a count takes no percentage.
    with pytest.raises(OptionError, match=r"^pressure_batch=lots: expected a number .* 50%$"):
        parse_mount_options(["pressure_batch=lots"], memory=memory)
    with pytest.raises(OptionError, match=r"^nr_inodes=50%: .* a percentage means nothing here$"):
        parse_mount_options(["nr_inodes=50%"], memory=memory)
    # Rules of the mount on top of the grammar: whole pages, at most 64T.
    assert parse_mount_options(["size=1B"], memory=memory).size == 4096
    with pytest.raises(OptionError, match=r"^size=65TiB: larger than volfs supports \(64T\)$"):
        parse_mount_options(["size=65TiB"], memory=memory)
