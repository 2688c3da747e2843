"""Open file descriptions, as the kernel passed them to OPEN or CREATE, by handle number."""

from __future__ import annotations

import os
from dataclasses import dataclass

from volfs.core.inode import Inode


@dataclass(slots=True)
class OpenFile:
    """One open file description."""

    inode: Inode
    flags: int

    @property
    def writable(self) -> bool:
        """True if opened for writing."""
        return self.flags & os.O_ACCMODE != os.O_RDONLY


class OpenFiles:
    """The open file descriptions of a mount, by the handle the kernel quotes back."""

    def __init__(self) -> None:
        self._files: dict[int, OpenFile] = {}
        self._next_handle = 1

    def add(self, inode: Inode, flags: int) -> int:
        """Record an open description of ``inode``; return its handle."""
        handle = self._next_handle
        self._next_handle += 1
        self._files[handle] = OpenFile(inode, flags)
        return handle

    def __getitem__(self, handle: int) -> OpenFile:
        return self._files[handle]

    def get(self, handle: int) -> OpenFile | None:
        """The description behind ``handle``, or None."""
        return self._files.get(handle)

    def pop(self, handle: int) -> OpenFile:
        """Forget the description behind ``handle`` (RELEASE) and return it."""
        return self._files.pop(handle)
