"""The man pages in ``volfs/man`` say what the code does, and cannot drift from it.

Each page renders without a warning, and every option ``volfs --help`` lists, every
subcommand and option of ``vrangectl``, and every ioctl, struct field and constant of the ABI
(``volfs.abi``, with the structs as ``volfs.h`` declares them) appears in its page, found where
it belongs. The lists come from the code: a new option or ioctl fails here until documented.
No mount is needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import volfs
from volfs import abi, vrangectl

MAN = Path(volfs.__file__).parent / "man"
PAGES = ("volfs.7", "volfs.8", "vrangectl.1")
HEADER = Path(abi.__file__).parent / "include" / "volfs.h"

#: Sizes of the C types the ABI's structs use.
C_SIZES = {"__u64": 8, "__s64": 8, "__u32": 4, "__s32": 4, "__u16": 2, "__u8": 1, "char": 1}


# -- reading the pages --------------------------------------------------------------------------


@functools.cache
def page(name: str) -> str:
    """The source of a man page."""
    return (MAN / name).read_text(encoding="utf-8")


def plain(text: str) -> str:
    """Roff source with the escapes a reader does not see undone: fonts, ``\\-``, ``\\(aq``."""
    text = re.sub(r"\\f(?:\[[^\]]*\]|\(..|.)", "", text)
    for escape, char in (("\\-", "-"), ("\\(aq", "'"), ("\\&", ""), ("\\e", "\\"), ("\\ ", " ")):
        text = text.replace(escape, char)
    return re.sub(r"\\~", " ", text)


def sections(name: str) -> dict[str, str]:
    """A page cut at its ``.SH`` and ``.SS`` headings: heading -> the source up to the next one.

    A heading is its plain text, e.g. ``VOLFS_IOC_VRANGE`` or ``MOUNT OPTIONS``; an ``.SH``
    section ends where its first ``.SS`` begins.
    """
    parts = re.split(r'^\.S[HS][ \t]+"?([^"\n]*)"?[ \t]*$', page(name), flags=re.MULTILINE)
    headings, bodies = parts[1::2], parts[2::2]
    return {plain(heading).strip(): body for heading, body in zip(headings, bodies, strict=True)}


def section(name: str, heading: str) -> str:
    """One section of a page, which must be there."""
    found = sections(name)
    assert heading in found, f"{name} has no section {heading!r}"
    return found[heading]


def word(text: str) -> re.Pattern[str]:
    """``text`` not inside a longer option, identifier or number (``size=`` may have a value
    after it)."""
    after = "" if text.endswith("=") else r"(?![\w-])"
    return re.compile(rf"(?<![\w=-]){re.escape(text)}{after}")


def has_tag(body: str, item: str) -> bool:
    """Whether a ``.TP`` paragraph of ``body`` is tagged with ``item`` (a field, an option) in
    a font macro, e.g. ``.BR \\-f ", " \\-\\-foreground``."""
    tag = re.compile(r"^\.TP[^\n]*\n(\.(?:[BI]|[BIR][BIR]) [^\n]*)", re.MULTILINE)
    return any(word(item).search(plain(line)) for line in tag.findall(body))


# -- rendering ----------------------------------------------------------------------------------


def _renderer(page_path: Path) -> list[str]:
    if shutil.which("man"):
        return ["man", "--warnings", "-E", "UTF-8", "-l", str(page_path)]
    if shutil.which("groff"):
        return ["groff", "-man", "-ww", "-z", "-Tutf8", str(page_path)]
    pytest.skip("neither man nor groff is installed")


@pytest.mark.parametrize("name", PAGES)
def test_page_renders_without_warnings(name: str) -> None:
    environment = {**os.environ, "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "80"}
    result = subprocess.run(
        _renderer(MAN / name), capture_output=True, text=True, env=environment, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "volfs" in result.stdout


@pytest.mark.parametrize("name", PAGES)
def test_page_source_is_clean_roff(name: str) -> None:
    """man(7) macros only; hyphens of options escaped; no line a control line by accident."""
    title, section_number = name.split(".")
    assert page(name).startswith(f".TH {title.upper()} {section_number} ")
    assert f'"volfs {volfs.__version__}"' in page(name).splitlines()[0]
    for number, line in enumerate(page(name).splitlines(), 1):
        where = f"{name}:{number}: {line}"
        assert not line.startswith("'"), f"a line starting with a quote is a request: {where}"
        assert not re.match(r"\.(?:Dd|Dt|Nm|Sh|Fl|Op)\b", line), f"mdoc macro: {where}"
        if line.startswith('.\\"'):
            continue
        assert not re.search(r"(?<![\\\w])--?[A-Za-z]", line), f"unescaped hyphen: {where}"


# -- volfs(8) -----------------------------------------------------------------------------------


@functools.cache
def volfs_help() -> str:
    """What ``volfs --help`` prints: the real command, options and mount options."""
    return subprocess.run(
        [sys.executable, "-m", "volfs", "--help"], capture_output=True, text=True, check=True
    ).stdout


def help_flags() -> list[str]:
    """Every ``-x`` and ``--long`` flag ``volfs --help`` shows, before its mount options."""
    options = volfs_help().partition("\nmount options")[0]
    return sorted(set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", options)))


def help_mount_options() -> list[str]:
    """The ``name=`` of each mount option ``volfs --help`` lists."""
    listing = volfs_help().partition("\nmount options")[2]
    return re.findall(r"^ +([a-z_]+)=", listing, flags=re.MULTILINE)


def help_fuse_flags() -> list[str]:
    """The FUSE and mount flags ``volfs --help`` says it passes on."""
    listing = volfs_help().partition("\nmount options")[2]
    flags = re.search(r"passed on:(.*?)\.\s*$", listing, flags=re.DOTALL | re.MULTILINE)
    assert flags is not None, "volfs --help lists no FUSE flags"
    return [flag.strip() for flag in flags[1].split(",")]


def test_volfs_help_is_parsed() -> None:
    assert {"-f", "--foreground", "-o", "-h", "--version"} <= set(help_flags())
    assert {"size", "purged", "max_file_ranges"} <= set(help_mount_options())
    assert "allow_other" in help_fuse_flags()


def test_volfs_8_lists_every_command_line_option() -> None:
    described = plain(section("volfs.8", "OPTIONS"))
    synopsis = plain(section("volfs.8", "SYNOPSIS"))
    for flag in help_flags():
        assert word(flag).search(described), f"volfs(8) OPTIONS lacks {flag}"
        if not flag.startswith("--"):
            assert word(flag).search(synopsis), f"volfs(8) SYNOPSIS lacks {flag}"
    assert "volfs --version" in plain(page("volfs.8"))


def test_volfs_8_lists_every_mount_option() -> None:
    body = section("volfs.8", "MOUNT OPTIONS")
    for name in help_mount_options():
        assert has_tag(body, f"{name}="), f"volfs(8) MOUNT OPTIONS has no entry for {name}="
    for flag in help_fuse_flags():
        assert word(flag).search(plain(body)), f"volfs(8) MOUNT OPTIONS lacks the flag {flag}"


# -- vrangectl(1) -------------------------------------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """vrangectl's subcommands and their parsers, from the parser itself."""
    parser = vrangectl.build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


def options_of(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string of a parser (``-h`` and ``--help`` included)."""
    return [option for action in parser._actions for option in action.option_strings]


def test_vrangectl_1_describes_every_subcommand_and_option() -> None:
    commands = subcommands()
    assert {"volatile", "nonvolatile", "status", "purge", "stats"} <= set(commands)
    synopsis = plain(section("vrangectl.1", "SYNOPSIS"))
    for name, parser in commands.items():
        body = section("vrangectl.1", name)
        assert f"vrangectl {name}" in synopsis, f"vrangectl(1) SYNOPSIS lacks {name}"
        for option in options_of(parser):
            if option in ("-h", "--help"):
                continue
            assert has_tag(body, option), f"vrangectl(1) {name} has no entry for {option}"
            assert word(option).search(synopsis), f"vrangectl(1) SYNOPSIS lacks {name} {option}"
    top = section("vrangectl.1", "OPTIONS")
    for option in {*options_of(vrangectl.build_parser()), "-h", "--help"}:
        assert has_tag(top, option), f"vrangectl(1) OPTIONS has no entry for {option}"


def test_vrangectl_1_lists_every_counter_of_stats() -> None:
    body = section("vrangectl.1", "stats")
    for name in abi.VOLFS_STATS_FIELDS:
        assert has_tag(body, name), f"vrangectl(1) stats does not describe {name}"


# -- volfs(7) -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CStruct:
    """A struct as volfs.h declares it: its fields' C types and names, in order."""

    name: str
    fields: tuple[tuple[str, str], ...]
    size: int


@functools.cache
def header_structs() -> dict[str, CStruct]:
    """The structs volfs.h defines for programs (not its ``volfs__`` internals)."""
    text = HEADER.read_text(encoding="ascii")
    numbers = {
        name: int(value, 0)
        for name, value in re.findall(r"^#define\s+(\w+)\s+(\d+|0x[0-9a-fA-F]+)u?\b", text, re.M)
    }
    structs = {}
    for name, body in re.findall(r"^struct\s+(\w+)\s*\{(.*?)^\};", text, re.MULTILINE | re.DOTALL):
        if "__" in name:
            continue
        declarations = re.sub(r"/\*.*?\*/", "", body, flags=re.DOTALL)
        fields, size = [], 0
        for declared, field, count in re.findall(
            r"([A-Za-z_][\w ]*?[\s*]+)(\w+)\s*(?:\[(\w+)\])?\s*;", declarations
        ):
            kind = " ".join(declared.replace("*", " * ").split())
            fields.append((kind, field))
            times = 1 if not count else numbers.get(count) or int(count)
            size += C_SIZES.get(kind, 0) * times
        structs[name] = CStruct(name, tuple(fields), size)
    return structs


@functools.cache
def header_ioctls() -> dict[str, str]:
    """Each ioctl volfs.h defines -> the struct it takes."""
    text = HEADER.read_text(encoding="ascii")
    return dict(
        re.findall(r"#define\s+(VOLFS_IOC_\w+)\s+_IO\w*\('v',\s*\w+,\s*struct\s+(\w+)\)", text)
    )


def abi_ioctls() -> dict[str, int]:
    """Every ioctl of volfs.abi and its number."""
    return {
        name: value
        for name, value in vars(abi).items()
        if name.startswith("VOLFS_IOC_") and isinstance(value, int)
    }


def abi_constants() -> dict[str, int]:
    """The named constants of the ABI: modes, flags, segment states, table layout, limits."""
    prefixes = ("VRANGE_", "SEGMENT_", "SEGMENTS_", "VOLFS_")
    return {
        name: value
        for name, value in vars(abi).items()
        if type(value) is int
        and (name == "PAGE_SIZE" or name.startswith(prefixes))
        and not name.startswith("VOLFS_IOC_")
    }


def abi_records() -> Iterator[tuple[str, str, list[str]]]:
    """The records volfs.abi names fields of: (class, C struct, fields), e.g. FileInfo."""
    for name, value in vars(abi).items():
        if not isinstance(value, type) or value.__module__ != abi.__name__:
            continue
        struct = re.search(r"struct (\w+)", value.__doc__ or "")
        if struct is None:
            continue
        if dataclasses.is_dataclass(value):
            yield name, struct[1], [field.name for field in dataclasses.fields(value)]
        elif hasattr(value, "_fields"):
            yield name, struct[1], list(value._fields)


def struct_block(body: str, struct: CStruct) -> str:
    """The declaration ``struct NAME { ... };`` a section shows, in plain text."""
    block = re.search(rf"^struct {struct.name} \{{.*?^\}};", plain(body), re.MULTILINE | re.DOTALL)
    assert block is not None, f"no declaration of struct {struct.name}"
    return block[0]


def check_struct(body: str, struct: CStruct) -> None:
    """``body`` declares ``struct`` with every field, in order, and describes each field."""
    block = struct_block(body, struct)
    position = 0
    for kind, field in struct.fields:
        pattern = r"\s*".join(map(re.escape, kind.split())) + rf"\s*\b{field}\b\s*(\[\w+\])?;"
        found = re.compile(pattern).search(block, position)
        assert found is not None, f"struct {struct.name}: {kind} {field} missing or out of order"
        position = found.end()
        assert has_tag(body, field), f"struct {struct.name}: no paragraph for {field}"


def struct_sections() -> dict[str, str]:
    """Each struct volfs(7) declares -> the section declaring it (first one)."""
    found: dict[str, str] = {}
    for body in sections("volfs.7").values():
        for name in re.findall(r"^struct (\w+) \{", plain(body), re.MULTILINE):
            found.setdefault(name, body)
    return found


def test_volfs_7_documents_every_ioctl_with_its_number_and_struct() -> None:
    ioctls = abi_ioctls()
    assert len(ioctls) >= 8
    synopsis = plain(section("volfs.7", "SYNOPSIS"))
    for name, number in ioctls.items():
        assert name in header_ioctls(), f"volfs.h does not define {name}"
        struct = header_structs()[header_ioctls()[name]]
        assert struct.size == (number >> 16) & 0x3FFF, f"volfs.h's struct {struct.name} size"
        body = section("volfs.7", name)
        assert f"{number:#010x}" in plain(body).lower(), f"volfs(7) {name}: no {number:#010x}"
        assert re.search(rf"\b{name}\b[^;]*\bstruct {struct.name}\b", synopsis), name
        check_struct(body, struct)
        assert re.search(r"^Errors", plain(body), re.MULTILINE), f"volfs(7) {name}: no errors"


def test_volfs_7_documents_every_struct_of_the_header() -> None:
    declared = struct_sections()
    for name, struct in header_structs().items():
        assert name in declared, f"volfs(7) does not declare struct {name}"
        check_struct(declared[name], struct)


def test_volfs_7_describes_every_field_the_abi_module_names() -> None:
    declared = struct_sections()
    records = list(abi_records())
    assert {"MountStatistics", "FileInfo"} & {name for name, _, _ in records}
    for name, struct, fields in records:
        assert struct in declared, f"{name}: volfs(7) does not declare struct {struct}"
        for field in fields:
            assert has_tag(declared[struct], field), f"volfs(7) struct {struct}: no {field}"


def test_volfs_7_gives_every_constant_with_its_value() -> None:
    lines = plain(page("volfs.7")).splitlines()
    constants = abi_constants()
    assert {"VRANGE_PARTIAL", "SEGMENT_STALE", "SEGMENTS_DEFAULT"} <= set(constants)
    for name, value in constants.items():
        names = [word(name), word(f"VOLFS_{name}")]
        values = re.compile(rf"(?<![\w.])(?:{value}|{value:#x})(?![\w.])", re.IGNORECASE)
        assert any(any(n.search(line) for n in names) and values.search(line) for line in lines), (
            f"volfs(7) never gives {name} with its value {value} ({value:#x})"
        )
