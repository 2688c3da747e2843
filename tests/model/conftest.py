"""Fixtures of the model tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from volfs.abi import PAGE_SIZE
from volfs.core.namespace import Namespace
from volfs.core.store import Store


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    """A namespace over a 64-page store, owned by root, with no bound on inodes."""
    store = Store(64 * PAGE_SIZE)
    try:
        yield Namespace(store, max_inodes=0, root_mode=0o755, root_uid=0, root_gid=0)
    finally:
        store.close()
