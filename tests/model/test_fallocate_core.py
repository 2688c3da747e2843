"""fallocate(2) modes in the namespace core, without FUSE.

Through a real mount the kernel refuses every mode FUSE does not forward (and PUNCH_HOLE
without KEEP_SIZE, or with ZERO_RANGE) before the daemon sees it, so the daemon's own
EOPNOTSUPP path can only be reached here.
"""

from __future__ import annotations

import errno
import os

import pytest

from volfs.abi import (
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_INSERT_RANGE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_UNSHARE_RANGE,
    FALLOC_FL_WRITE_ZEROES,
    FALLOC_FL_ZERO_RANGE,
    PAGE_SIZE,
    VRANGE_FULL,
    VRANGE_VOLATILE,
)
from volfs.core.inode import Inode
from volfs.core.namespace import ROOT_INODE, Namespace


def snapshot(namespace: Namespace, inode: Inode) -> tuple[object, ...]:
    """What a program could observe of a file: size, blocks, bytes, volatility, space used."""
    assert inode.contents is not None
    return (
        inode.size,
        inode.blocks,
        bytes(inode.contents.read(0, inode.size)),
        namespace.volatility.status(inode, 0, 0),
        namespace.statistics().used_bytes,
    )


@pytest.mark.parametrize(
    "mode",
    [
        FALLOC_FL_COLLAPSE_RANGE,
        FALLOC_FL_INSERT_RANGE,
        FALLOC_FL_UNSHARE_RANGE,
        FALLOC_FL_WRITE_ZEROES,
        FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_KEEP_SIZE,
        0x100,  # no such flag yet
        FALLOC_FL_PUNCH_HOLE,  # without KEEP_SIZE
        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE,
        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
    ],
    ids=hex,
)
def test_unsupported_modes_fail_with_eopnotsupp_and_change_nothing(
    namespace: Namespace, mode: int
) -> None:
    inode = namespace.mknod(ROOT_INODE, b"f", 0o644, 0, 0)
    assert inode.contents is not None
    inode.contents.write(0, os.urandom(8 * PAGE_SIZE))
    # Pages 4..8 volatile and purged: a mode that punched or zeroed first would forget that.
    namespace.volatility.vrange(inode, 4 * PAGE_SIZE, 4 * PAGE_SIZE, VRANGE_VOLATILE, VRANGE_FULL)
    namespace.purger.purge(0, [])
    before = snapshot(namespace, inode)
    assert before[3] == (4 * PAGE_SIZE, 4 * PAGE_SIZE)

    with pytest.raises(OSError) as caught:
        namespace.fallocate(inode, mode, 2 * PAGE_SIZE, 4 * PAGE_SIZE)

    assert caught.value.errno == errno.EOPNOTSUPP
    assert snapshot(namespace, inode) == before
