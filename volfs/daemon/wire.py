"""The kernel's FUSE messages for the requests the bridge hands to Python undecoded.

The bridge (``volfs/daemon/_bridge.c``) passes the namespace's most frequent requests to
:meth:`volfs.daemon.fs.VolfsOperations.answer_at_once` as the kernel sent them, and sends
back the bytes it returns, instead of going through libfuse's decoding, pyfuse3's coroutines
and libfuse's encoding: a create+stat+unlink is six such round trips. The layouts are the
kernel's ``include/uapi/linux/fuse.h`` (protocol 7.12 on, which the bridge checks), little
endian as on every architecture this daemon builds for.
"""

from __future__ import annotations

import struct

#: Opcodes (enum fuse_opcode).
FUSE_LOOKUP = 1
FUSE_FORGET = 2
FUSE_GETATTR = 3
FUSE_UNLINK = 10
FUSE_OPEN = 14
FUSE_RELEASE = 18
FUSE_CREATE = 35
FUSE_BATCH_FORGET = 42

#: fuse_open_out.open_flags: keep the page cache across opens.
FOPEN_KEEP_CACHE = 1 << 1

#: struct fuse_attr: ino, size, blocks, atime, mtime, ctime (signed seconds: a time may be
#: before 1970), their nanoseconds, mode, nlink, uid, gid, rdev, blksize, flags.
_ATTR = "3Q3q10I"
#: struct fuse_entry_out: nodeid, generation, entry_valid, attr_valid, their nanoseconds, attr.
ENTRY_OUT = struct.Struct("<4Q2I" + _ATTR)
#: struct fuse_attr_out: attr_valid, its nanoseconds, padding, attr.
ATTR_OUT = struct.Struct("<Q2I" + _ATTR)
#: struct fuse_open_out: fh, open_flags, backing_id.
OPEN_OUT = struct.Struct("<QIi")
#: struct fuse_create_in: flags, mode, umask, open_flags; the name follows.
CREATE_IN = struct.Struct("<4I")
#: struct fuse_open_in: flags, open_flags.
OPEN_IN = struct.Struct("<2I")
#: struct fuse_release_in: fh, flags, release_flags, lock_owner.
RELEASE_IN = struct.Struct("<Q2IQ")
#: struct fuse_forget_in: nlookup.
FORGET_IN = struct.Struct("<Q")
#: struct fuse_batch_forget_in: count, padding; struct fuse_forget_one (nodeid, nlookup)
#: entries follow.
BATCH_FORGET_IN = struct.Struct("<2I")
FORGET_ONE = struct.Struct("<2Q")


def name_of(argument: bytes, offset: int = 0) -> bytes:
    """The NUL-terminated name at ``offset`` of a request's argument."""
    end = argument.find(b"\0", offset)
    return argument[offset:] if end < 0 else argument[offset:end]


def seconds_and_nanoseconds(timeout: float) -> tuple[int, int]:
    """A cache timeout as the kernel takes it, as libfuse converts it."""
    seconds = int(timeout)
    return seconds, int((timeout - seconds) * 1e9)
