"""Type information for the C extension; see volfs/daemon/_bridge.c."""

import mmap
from collections.abc import Callable, Sequence

from volfs.core._pagemap import PageTable

class Request:
    """A FUSE request awaiting exactly one reply.

    A second reply raises RuntimeError. A reply that fails raises OSError with libfuse's errno
    (ENOTCONN once the request's session has ended) and still counts as the answer.
    """

    uid: int
    gid: int
    pid: int
    @property
    def answered(self) -> bool: ...
    def reply_ioctl(self, result: int, data: bytes) -> None: ...
    def reply_error(self, errno: int) -> None: ...
    def reply_ok(self) -> None: ...
    def reply_lseek(self, offset: int) -> None: ...

IoctlHandler = Callable[[Request, int, int, int, bool, bytes], None]
FallocateHandler = Callable[[Request, int, int, int, int, int], None]
LseekHandler = Callable[[Request, int, int, int, int], None]
#: Answers a request as the kernel sent it: opcode, nodeid, uid, gid, argument; returns the
#: reply's bytes, an errno, or None for pyfuse3 to answer it.
AtOnceHandler = Callable[[int, int, int, int, bytes], bytes | int | None]
#: Told of a request pyfuse3 could not hand to its handler: operation, exception, errno sent.
FailureHandler = Callable[[str, BaseException, int], None]

def set_handlers(
    *,
    ioctl: IoctlHandler | None = None,
    fallocate: FallocateHandler | None = None,
    lseek: LseekHandler | None = None,
    failure: FailureHandler | None = None,
    kill_privileges: Callable[[int], None] | None = None,
    at_once: AtOnceHandler | None = None,
) -> None: ...
def close() -> None: ...
def invalidate_range(ino: int, offset: int, length: int) -> None: ...
def invalidate_ranges(ranges: Sequence[tuple[int, int, int]]) -> list[tuple[int, int]]: ...
def exempt_writeback(ino: int, offset: int, length: int, /) -> None: ...
def end_exemption(ino: int, /) -> None: ...
def drop_purged_ranges(
    ranges: Sequence[tuple[int, int, int]],
) -> tuple[int, list[tuple[int, int]]]: ...
def serve_pages(
    table: PageTable,
    arena: memoryview,
    *,
    arena_fd: int,
    mapped: mmap.mmap,
    threads: int,
    relatime_ns: int,
    deny_others: bool,
) -> None: ...
def served() -> tuple[int, int, int, int]: ...
def active() -> bool: ...
def libfuse() -> str: ...
