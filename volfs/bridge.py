"""Load the C bridge that adds ioctl, fallocate, lseek and range invalidation to pyfuse3.

The bridge replaces libfuse's ``fuse_session_new`` for pyfuse3, so it must be loaded into the
global symbol scope before pyfuse3's extension is: this module does that when imported, and
:mod:`volfs.fs` imports it ahead of pyfuse3.
"""

from __future__ import annotations

import os
import sys

if "pyfuse3" in sys.modules:
    raise ImportError("volfs.bridge must be imported before pyfuse3")

_flags = sys.getdlopenflags()
sys.setdlopenflags(_flags | os.RTLD_GLOBAL)
try:
    from volfs._bridge import Request, active, invalidate_range, set_handlers
finally:
    sys.setdlopenflags(_flags)

__all__ = ["Request", "active", "invalidate_range", "set_handlers"]
