"""The namespace core without FUSE: a Hypothesis state machine against a plain tree model.

The model is a tree of dicts whose nodes stand for inodes by identity, each with the three
counts that keep an inode alive: links (directory entries), open handles and kernel lookups.
After every step the namespace must agree with it on every directory's entries, every nlink
and count, the inode slots in use (``nr_inodes``), the memory held by file contents and which
inode numbers still resolve; every failing operation must fail with the model's errno.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from volfs.abi import PAGE_SIZE, RENAME_EXCHANGE, RENAME_NOREPLACE
from volfs.core.inode import Inode
from volfs.core.namespace import ROOT_INODE, Namespace
from volfs.core.store import Store

T = TypeVar("T")
Kind = Literal["file", "directory", "symlink"]
Place = Literal["entry", "directory", "below", "any"]

#: Few names, so that creations collide and renames replace.
NAMES = (b"a", b"b", b"c")
#: Small enough for ENOSPC to come up now and then, counting extra hard links.
MAX_INODES = 8
STORE_PAGES = 1024
#: Writes land in the first pages of a file, a page or two at a time.
WRITE_PAGES = 4

#: An index into a list of candidates, taken modulo its length.
picks = st.integers(0, 31)
#: A pick mostly among the candidates an operation expects, sometimes among all inodes.
usual_picks = st.tuples(st.sampled_from((True,) * 7 + (False,)), picks)
#: Where an operation finds its entry: an existing one of the kind it expects, a name in a
#: directory, or a name under any inode.
places = st.tuples(st.sampled_from(("entry",) * 4 + ("directory",) * 3 + ("any",)), picks)
#: For a rename's target, also a directory below the one moved (EINVAL).
rename_places = st.tuples(
    st.sampled_from(("entry",) * 4 + ("directory",) * 2 + ("below", "any")), picks
)
new_names = st.sampled_from((*NAMES, *NAMES, b".", b".."))
kinds = st.sampled_from(("file", "file", "directory", "directory", "symlink"))
rename_flags = st.sampled_from((0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_EXCHANGE, 3, 4))


@dataclass(eq=False)
class Node:
    """The expected state of one inode; directories are linked while ``links`` is 1."""

    ino: int
    kind: Kind
    links: int = 1
    opens: int = 0
    lookups: int = 1
    #: Regular files: the pages written and not freed since.
    pages: set[int] = field(default_factory=set)
    #: Directories: name -> node.
    entries: dict[bytes, Node] | None = None
    #: Directories: the directory they were last linked in.
    parent: Node | None = None

    @property
    def nlink(self) -> int:
        """``st_nlink``: the links of a file; 2 and a link per subdirectory for a directory."""
        if self.entries is None or not self.links:
            return self.links
        return 2 + sum(child.entries is not None for child in self.entries.values())

    @property
    def removed(self) -> bool:
        """True while only the kernel refers to it: no link and no handle."""
        return not (self.links or self.opens) and self.lookups > 0

    @property
    def referenced(self) -> bool:
        """True while a link, a handle or the kernel refers to it: its number resolves."""
        return bool(self.links or self.opens or self.lookups)


def writable(node: Node) -> bool:
    """True for a regular file a program can write to: it has a name or a handle."""
    return node.kind == "file" and bool(node.links or node.opens)


def is_ancestor(candidate: Node, node: Node) -> bool:
    """True if ``candidate`` is ``node`` or a directory above it."""
    while node is not candidate:
        assert node.parent is not None
        if node.parent is node:
            return False
        node = node.parent
    return True


class Model:
    """The expected namespace: each ``*_error`` method gives the errno an operation must fail
    with (None for success), and the method of the operation's own name applies a success."""

    def __init__(self, root_ino: int) -> None:
        self.root = Node(root_ino, "directory", entries={})
        self.root.parent = self.root
        #: Every inode ever created, by number.
        self.nodes: dict[int, Node] = {root_ino: self.root}

    @property
    def live_inodes(self) -> int:
        """Inode slots in use: an inode with a link, a handle or the kernel's reference, plus
        each extra hard link."""
        return sum(
            node.referenced + (max(0, node.links - 1) if node.entries is None else 0)
            for node in self.nodes.values()
        )

    @property
    def used_pages(self) -> int:
        """Pages held by file contents."""
        return sum(len(node.pages) for node in self.nodes.values())

    def release(self, node: Node) -> None:
        """What the namespace does once no name, no handle and no reference of the kernel's
        refers to an inode: its contents go (its slot with them, see :attr:`live_inodes`)."""
        if node.links or node.opens:
            return
        if not node.lookups:
            node.pages.clear()

    @staticmethod
    def directory_error(node: Node) -> int | None:
        """Why ``node`` cannot be used as a directory, if it cannot."""
        if not node.referenced:
            return errno.ENOENT
        if node.entries is None:
            return errno.ENOTDIR
        return None

    def new_entry_error(self, parent: Node, name: bytes) -> int | None:
        """Why a new inode or link cannot be named ``name`` in ``parent``, if it cannot."""
        error = self.directory_error(parent)
        if error is not None:
            return error
        assert parent.entries is not None
        if not parent.links:
            return errno.ENOENT
        if name in parent.entries or name in (b".", b".."):
            return errno.EEXIST
        if self.live_inodes >= MAX_INODES:
            return errno.ENOSPC
        return None

    def create(self, parent: Node, name: bytes, ino: int, kind: Kind) -> None:
        """A new inode ``ino`` named ``name`` in ``parent``, looked up once."""
        assert ino not in self.nodes, "inode number reused"
        node = Node(ino, kind)
        if kind == "directory":
            node.entries = {}
            node.parent = parent
        assert parent.entries is not None
        parent.entries[name] = node
        self.nodes[ino] = node

    def link_error(self, node: Node, parent: Node, name: bytes) -> int | None:
        """Why ``node`` cannot get a hard link ``name`` in ``parent``, if it cannot."""
        if not node.referenced:
            return errno.ENOENT
        if node.entries is not None:
            return errno.EPERM
        if not node.links:
            return errno.ENOENT
        return self.new_entry_error(parent, name)

    @staticmethod
    def link(node: Node, parent: Node, name: bytes) -> None:
        """A hard link ``name`` in ``parent`` to ``node``, looked up once."""
        assert parent.entries is not None
        parent.entries[name] = node
        node.links += 1
        node.lookups += 1

    def entry_error(self, parent: Node, name: bytes) -> int | None:
        """Why ``parent`` has no entry ``name`` to remove or move, if it has none."""
        error = self.directory_error(parent)
        if error is not None:
            return error
        assert parent.entries is not None
        if name not in parent.entries:
            # What rmdir(2) answers for these two; any other missing name is ENOENT.
            return {b".": errno.EINVAL, b"..": errno.ENOTEMPTY}.get(name, errno.ENOENT)
        return None

    def unlink_error(self, parent: Node, name: bytes) -> int | None:
        """Why the non-directory ``name`` cannot be unlinked from ``parent``, if it cannot."""
        error = self.entry_error(parent, name)
        if error is not None:
            return error
        assert parent.entries is not None
        return errno.EISDIR if parent.entries[name].entries is not None else None

    def unlink(self, parent: Node, name: bytes) -> None:
        """Remove a non-directory's entry."""
        assert parent.entries is not None
        node = parent.entries.pop(name)
        node.links -= 1
        self.release(node)

    def rmdir_error(self, parent: Node, name: bytes) -> int | None:
        """Why the directory ``name`` cannot be removed from ``parent``, if it cannot."""
        error = self.entry_error(parent, name)
        if error is not None:
            return error
        assert parent.entries is not None
        node = parent.entries[name]
        if node.entries is None:
            return errno.ENOTDIR
        if node.entries:
            return errno.ENOTEMPTY
        return None

    def rmdir(self, parent: Node, name: bytes) -> None:
        """Remove an empty directory."""
        assert parent.entries is not None
        node = parent.entries.pop(name)
        node.links = 0
        self.release(node)

    def lookup_error(self, parent: Node, name: bytes) -> int | None:
        """Why ``name`` cannot be looked up in ``parent``, if it cannot."""
        error = self.directory_error(parent)
        if error is not None:
            return error
        assert parent.entries is not None
        if name not in parent.entries and name not in (b".", b".."):
            return errno.ENOENT
        if name == b".." and not parent.links:
            return errno.ENOENT  # a removed directory's parent may be gone
        return None

    @staticmethod
    def lookup(parent: Node, name: bytes) -> Node:
        """The node ``name`` names in ``parent``, its lookup counted."""
        assert parent.entries is not None and parent.parent is not None
        if name == b".":
            node = parent
        elif name == b"..":
            node = parent.parent
        else:
            node = parent.entries[name]
        node.lookups += 1
        return node

    def rename_error(
        self, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes, flags: int
    ) -> int | None:
        """Why the rename cannot be done, if it cannot."""
        if flags not in (0, RENAME_NOREPLACE, RENAME_EXCHANGE):
            return errno.EINVAL
        error = self.entry_error(old_parent, old_name) or self.directory_error(new_parent)
        if error is not None:
            return error
        if new_name in (b".", b".."):
            return errno.EBUSY
        if not new_parent.links:
            return errno.ENOENT  # a removed directory takes no entries
        assert old_parent.entries is not None and new_parent.entries is not None
        moved = old_parent.entries[old_name]
        target = new_parent.entries.get(new_name)
        if moved.entries is not None and is_ancestor(moved, new_parent):
            return errno.EINVAL
        if flags == RENAME_EXCHANGE:
            if target is None:
                return errno.ENOENT
            if target.entries is not None and is_ancestor(target, old_parent):
                return errno.EINVAL
            return None
        return self.replace_error(moved, target, flags)

    @staticmethod
    def replace_error(moved: Node, target: Node | None, flags: int) -> int | None:
        """Why ``moved`` cannot take the place of ``target``, if it cannot."""
        if target is None:
            return None
        if flags == RENAME_NOREPLACE:
            return errno.EEXIST
        if target is moved:
            return None
        if moved.entries is not None:
            if target.entries is None:
                return errno.ENOTDIR
            return errno.ENOTEMPTY if target.entries else None
        return errno.EISDIR if target.entries is not None else None

    def rename(
        self, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes, flags: int
    ) -> None:
        """Move (or exchange) an entry; a replaced target loses its link."""
        assert old_parent.entries is not None and new_parent.entries is not None
        moved = old_parent.entries[old_name]
        target = new_parent.entries.get(new_name)
        if flags == RENAME_EXCHANGE:
            assert target is not None
            old_parent.entries[old_name], new_parent.entries[new_name] = target, moved
            if target.entries is not None:
                target.parent = old_parent
            if moved.entries is not None:
                moved.parent = new_parent
            return
        if target is moved:
            return  # two links to one inode: nothing happens
        del old_parent.entries[old_name]
        new_parent.entries[new_name] = moved
        if moved.entries is not None:
            moved.parent = new_parent
        if target is not None:
            target.links = 0 if target.entries is not None else target.links - 1
            self.release(target)


class NamespaceMachine(RuleBasedStateMachine):
    """Random operations on a :class:`Namespace` and on a :class:`Model`, compared."""

    def __init__(self) -> None:
        super().__init__()
        self.store = Store(STORE_PAGES * PAGE_SIZE)
        self.namespace = Namespace(
            self.store, max_inodes=MAX_INODES, root_mode=0o755, root_uid=0, root_gid=0
        )
        root = self.namespace.root
        self.model = Model(root.ino)
        #: The namespace's inode objects, by number: identities must never change.
        self.inodes: dict[int, Inode] = {root.ino: root}

    def teardown(self) -> None:
        self.store.close()

    # -- picking ----------------------------------------------------------------------------

    def _nodes(self, keep: Callable[[Node], bool]) -> list[Node]:
        return [node for node in self.model.nodes.values() if keep(node)]

    def _pick(self, pick: tuple[bool, int], usual: Callable[[Node], bool]) -> Node:
        """Mostly a node ``usual`` accepts; otherwise (or if there is none) any node."""
        usual_only, index = pick
        nodes = self._nodes(usual) if usual_only else []
        nodes = nodes or self._nodes(lambda _node: True)
        return nodes[index % len(nodes)]

    def _parent(self, pick: tuple[bool, int]) -> Node:
        return self._pick(pick, lambda node: node.entries is not None)

    def _place(
        self, place: tuple[Place, int], name: bytes, usual: Callable[[Node], bool]
    ) -> tuple[Node, bytes]:
        """A directory and a name: an entry whose inode ``usual`` accepts, or ``name`` in a
        directory, or ``name`` under any inode."""
        where, index = place
        if where == "entry":
            entries = [
                (node, entry)
                for node in self.model.nodes.values()
                if node.entries is not None
                for entry, child in node.entries.items()
                if usual(child)
            ]
            if entries:
                return entries[index % len(entries)]
        return self._pick((where != "any", index), lambda node: node.entries is not None), name

    @staticmethod
    def _attempt(expected: int | None, operation: Callable[[], T]) -> T | None:
        """Run ``operation``; it must fail with ``expected``, or succeed if that is None."""
        if expected is None:
            return operation()
        with pytest.raises(OSError) as caught:
            operation()
        found = caught.value.errno
        assert found == expected, (
            f"{errno.errorcode.get(found or 0)}, not {errno.errorcode[expected]}"
        )
        return None

    # -- rules ------------------------------------------------------------------------------

    @initialize(tree=st.lists(st.tuples(picks, st.sampled_from(NAMES), kinds), max_size=8))
    def populate(self, tree: list[tuple[int, bytes, Kind]]) -> None:
        # Whichever rules a run leaves out, the others get a tree to work on.
        for pick, name, kind in tree:
            self.create((True, pick), name, kind)

    @rule(parent_pick=usual_picks, name=new_names, kind=kinds)
    def create(self, parent_pick: tuple[bool, int], name: bytes, kind: Kind) -> None:
        parent = self._parent(parent_pick)
        makers: dict[Kind, Callable[[], Inode]] = {
            "file": lambda: self.namespace.mknod(parent.ino, name, 0o644, 0, 0),
            "directory": lambda: self.namespace.mkdir(parent.ino, name, 0o755, 0, 0),
            "symlink": lambda: self.namespace.symlink(parent.ino, name, b"target", 0, 0),
        }
        inode = self._attempt(self.model.new_entry_error(parent, name), makers[kind])
        if inode is not None:
            self.model.create(parent, name, inode.ino, kind)
            self.inodes[inode.ino] = inode

    @rule(pick=usual_picks, parent_pick=usual_picks, name=new_names)
    def link(self, pick: tuple[bool, int], parent_pick: tuple[bool, int], name: bytes) -> None:
        node = self._pick(pick, lambda node: node.entries is None)
        parent = self._parent(parent_pick)
        expected = self.model.link_error(node, parent, name)
        inode = self._attempt(expected, lambda: self.namespace.link(node.ino, parent.ino, name))
        if inode is not None:
            assert inode is self.inodes[node.ino]
            self.model.link(node, parent, name)

    @rule(place=places, name=st.sampled_from(NAMES))
    def unlink(self, place: tuple[Place, int], name: bytes) -> None:
        parent, name = self._place(place, name, lambda node: node.entries is None)
        expected = self.model.unlink_error(parent, name)
        self._attempt(expected, lambda: self.namespace.unlink(parent.ino, name))
        if expected is None:
            self.model.unlink(parent, name)

    @rule(place=places, name=new_names)
    def rmdir(self, place: tuple[Place, int], name: bytes) -> None:
        parent, name = self._place(place, name, lambda node: node.entries is not None)
        expected = self.model.rmdir_error(parent, name)
        self._attempt(expected, lambda: self.namespace.rmdir(parent.ino, name))
        if expected is None:
            self.model.rmdir(parent, name)

    @rule(
        source=places,
        old_name=st.sampled_from(NAMES),
        onto=rename_places,
        new_name=new_names,
        flags=rename_flags,
    )
    def rename(
        self,
        source: tuple[Place, int],
        old_name: bytes,
        onto: tuple[Place, int],
        new_name: bytes,
        flags: int,
    ) -> None:
        old_parent, old_name = self._place(source, old_name, lambda _node: True)
        moved = None if old_parent.entries is None else old_parent.entries.get(old_name)
        moved_is_dir = moved is not None and moved.entries is not None
        below = [
            node
            for node in self._nodes(lambda node: node.entries is not None)
            if moved is not None and moved_is_dir and node is not moved and is_ancestor(moved, node)
        ]
        if onto[0] == "below" and below:
            new_parent = below[onto[1] % len(below)]
        else:
            # Mostly onto an entry of the same kind, where replacing and exchanging can succeed.
            new_parent, new_name = self._place(
                onto, new_name, lambda node: (node.entries is not None) == moved_is_dir
            )
        expected = self.model.rename_error(old_parent, old_name, new_parent, new_name, flags)
        self._attempt(
            expected,
            lambda: self.namespace.rename(
                old_parent.ino, old_name, new_parent.ino, new_name, flags
            ),
        )
        if expected is None:
            self.model.rename(old_parent, old_name, new_parent, new_name, flags)

    @rule(parent_pick=usual_picks, name=new_names)
    def lookup(self, parent_pick: tuple[bool, int], name: bytes) -> None:
        parent = self._parent(parent_pick)
        expected = self.model.lookup_error(parent, name)
        inode = self._attempt(expected, lambda: self.namespace.lookup(parent.ino, name))
        if inode is not None:
            assert inode is self.inodes[self.model.lookup(parent, name).ino]

    @rule(pick=usual_picks, count=st.integers(1, 3))
    def forget(self, pick: tuple[bool, int], count: int) -> None:
        node = self._pick(pick, lambda node: node.lookups > 0)
        self.namespace.forget(node.ino, count)
        if node.referenced:
            node.lookups = max(0, node.lookups - count)
            self.model.release(node)

    @precondition(lambda self: bool(self._nodes(lambda node: node.lookups > 0)))
    @rule(pick=usual_picks, truncate=st.booleans())
    def open(self, pick: tuple[bool, int], truncate: bool) -> None:
        # Only what the kernel has looked up can be opened.
        usual_only, index = pick
        nodes = self._nodes(
            lambda node: node.lookups > 0 and (node.kind == "file" or not usual_only)
        )
        nodes = nodes or self._nodes(lambda node: node.lookups > 0)
        node = nodes[index % len(nodes)]
        expected = {"file": None, "directory": errno.EISDIR, "symlink": errno.ENXIO}[node.kind]
        inode = self.inodes[node.ino]
        self._attempt(expected, lambda: self.namespace.open(inode, truncate=truncate))
        if expected is None:
            node.opens += 1
            if truncate:
                node.pages.clear()

    @precondition(lambda self: bool(self._nodes(lambda node: node.opens > 0)))
    @rule(pick=picks)
    def close(self, pick: int) -> None:
        nodes = self._nodes(lambda node: node.opens > 0)
        node = nodes[pick % len(nodes)]
        self.namespace.close(self.inodes[node.ino])
        node.opens -= 1
        self.model.release(node)

    @precondition(lambda self: bool(self._nodes(lambda node: node.kind == "file")))
    @rule(pick=picks, size=st.integers(0, WRITE_PAGES * PAGE_SIZE))
    def truncate(self, pick: int, size: int) -> None:
        # Through a name, a handle or, for a removed file, /proc/PID/fd of an O_PATH one.
        nodes = self._nodes(lambda node: node.kind == "file" and node.referenced)
        if not nodes:
            return
        node = nodes[pick % len(nodes)]
        self.namespace.truncate(self.inodes[node.ino], size)
        node.pages = {index for index in node.pages if index < -(-size // PAGE_SIZE)}

    @precondition(lambda self: bool(self._nodes(writable)))
    @rule(
        pick=usual_picks,
        offset=st.integers(0, WRITE_PAGES * PAGE_SIZE - 1),
        length=st.integers(1, 2 * PAGE_SIZE),
    )
    def write(self, pick: tuple[bool, int], offset: int, length: int) -> None:
        # Mostly through an open handle, so that unlinked files keep memory until closed.
        usual_only, index = pick
        nodes = self._nodes(lambda node: writable(node) and (node.opens > 0 or not usual_only))
        nodes = nodes or self._nodes(writable)
        node = nodes[index % len(nodes)]
        contents = self.inodes[node.ino].contents
        assert contents is not None
        contents.write(offset, bytes([node.ino & 0xFF]) * length)
        node.pages.update(range(offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE + 1))

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def counts_match(self) -> None:
        statistics = self.namespace.statistics()
        assert statistics.inodes == self.model.live_inodes
        nodes = self.model.nodes.values()
        assert self.namespace.unlinked_inodes == sum(
            not node.links and node.referenced for node in nodes
        )
        removed = [node for node in nodes if node.removed]
        assert self.store.unforgotten_pages == sum(len(node.pages) for node in removed)
        assert statistics.used_bytes == self.store.used_bytes
        assert self.store.used_bytes == self.model.used_pages * PAGE_SIZE

    @invariant()
    def inodes_match(self) -> None:
        for node in self.model.nodes.values():
            inode = self.inodes[node.ino]
            counts = (inode.nlink, inode.opens, inode.lookups)
            assert counts == (node.nlink, node.opens, node.lookups), node.ino
            if inode.contents is not None:
                assert inode.contents.pages == len(node.pages), node.ino
            if not node.referenced:
                with pytest.raises(OSError) as caught:
                    self.namespace.get(node.ino)
                assert caught.value.errno == errno.ENOENT
                continue
            assert self.namespace.get(node.ino) is inode
            if node.entries is not None:
                self._check_listing(node)

    def _check_listing(self, node: Node) -> None:
        listing = list(self.namespace.directory_listing(node.ino, 0))
        found = {name: inode.ino for _offset, name, inode in listing}
        assert len(found) == len(listing), "a name listed twice"
        assert node.entries is not None and node.parent is not None
        expected = {name: child.ino for name, child in node.entries.items()}
        expected[b"."] = node.ino
        if node.links:
            expected[b".."] = node.parent.ino
        else:
            del found[b".."]  # where a removed directory's ".." leads is not specified
        assert found == expected, node.ino


NamespaceMachine.TestCase.settings = settings(
    max_examples=500, stateful_step_count=50, deadline=None, database=None
)
TestNamespaceMachine = NamespaceMachine.TestCase


# -- explicit cases ----------------------------------------------------------------------------


def test_a_directory_cannot_be_renamed_into_itself(namespace: Namespace) -> None:
    directory = namespace.mkdir(ROOT_INODE, b"a", 0o755, 0, 0)
    with pytest.raises(OSError) as caught:
        namespace.rename(ROOT_INODE, b"a", directory.ino, b"b")
    assert caught.value.errno == errno.EINVAL
    assert namespace.lookup(ROOT_INODE, b"a") is directory


def test_nothing_can_be_renamed_into_a_removed_directory(namespace: Namespace) -> None:
    directory = namespace.mkdir(ROOT_INODE, b"d", 0o755, 0, 0)
    namespace.rmdir(ROOT_INODE, b"d")
    namespace.mknod(ROOT_INODE, b"f", 0o644, 0, 0)
    with pytest.raises(OSError) as caught:
        namespace.rename(ROOT_INODE, b"f", directory.ino, b"f")
    assert caught.value.errno == errno.ENOENT
