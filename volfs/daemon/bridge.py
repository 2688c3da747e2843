"""Load the C bridge that adds ioctl, fallocate, lseek and range invalidation to pyfuse3.

The bridge replaces libfuse's ``fuse_session_new`` for pyfuse3, so it must be loaded into the
global symbol scope before pyfuse3's extension is: this module does that when imported, and
:mod:`volfs.daemon.fs` imports it ahead of pyfuse3.

The bridge relies on pyfuse3's internals: that a request pyfuse3 fails to hand to its handler
leaves a Python exception set, and that an exception left by a callback is raised from
``fuse_session_process_buf`` (Cython 3's ``except *``, pyfuse3 3.3 onwards). Importing this
module therefore fails for a pyfuse3 outside the releases checked against it.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import metadata

#: The pyfuse3 releases the bridge was checked against: from the first to the first not.
PYFUSE3_SUPPORTED = ((3, 3), (3, 6))


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def check_pyfuse3_version(version: str) -> None:
    """Raise ImportError unless pyfuse3 ``version`` is one the bridge works with."""
    first, after = PYFUSE3_SUPPORTED
    release = _release(version)
    if not first <= release < after:
        raise ImportError(
            f"volfs needs pyfuse3 >= {'.'.join(map(str, first))} and < "
            f"{'.'.join(map(str, after))}, whose internals its FUSE bridge relies on; "
            f"pyfuse3 {version} is installed"
        )


def _check_installed_pyfuse3() -> None:
    try:
        version = metadata.version("pyfuse3")
    except metadata.PackageNotFoundError:
        raise ImportError("volfs needs pyfuse3, which is not installed") from None
    check_pyfuse3_version(version)


if "pyfuse3" in sys.modules:
    raise ImportError("volfs.daemon.bridge must be imported before pyfuse3")
_check_installed_pyfuse3()

_flags = sys.getdlopenflags()
sys.setdlopenflags(_flags | os.RTLD_GLOBAL)
try:
    from volfs.daemon._bridge import (
        Request,
        active,
        close,
        drop_purged_ranges,
        end_exemption,
        exempt_writeback,
        invalidate_range,
        invalidate_ranges,
        libfuse,
        serve_pages,
        served,
        set_handlers,
    )
finally:
    sys.setdlopenflags(_flags)

__all__ = [
    "PYFUSE3_SUPPORTED",
    "Request",
    "active",
    "check_pyfuse3_version",
    "close",
    "drop_purged_ranges",
    "end_exemption",
    "exempt_writeback",
    "invalidate_range",
    "invalidate_ranges",
    "libfuse",
    "serve_pages",
    "served",
    "set_handlers",
]
