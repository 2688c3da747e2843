"""Handing segment tables to the users of a file: one-time tokens, and the socket that
redeems them for the table's memfd.

A FUSE file's pages cannot be shared with the daemon (the kernel's page cache sits between
them), so a table comes from the daemon directly. VOLFS_IOC_SEGMENTS on a descriptor of the
file answers a token (:meth:`TableHandover.grant`); the client connects to the daemon's
socket in the abstract namespace, checks with SO_PEERCRED that the daemon is at the other
end, and sends the token; the daemon answers a status and, on success, the memfd with
SCM_RIGHTS (a read-only descriptor's token gets the memfd reopened read-only).

A token proves access to one table, once, for :data:`SEGMENT_TOKEN_SECONDS`. Tokens,
connections (of all users, and of each) and the time a connection may take are bounded, so
that nobody can make the daemon hold more than a little for them, nor keep others from being
served for long.
"""

from __future__ import annotations

import array
import collections
import errno
import logging
import os
import secrets
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass

import trio

from volfs.abi import (
    PEER_CREDENTIALS,
    SEGMENT_HANDOVER_STATUS,
    SEGMENT_SOCKET_NAME_BYTES,
    SEGMENT_TOKEN_BYTES,
    SEGMENT_TOKEN_SECONDS,
)
from volfs.core.segments import SegmentTable

log = logging.getLogger(__name__)

#: Tokens waiting to be redeemed, at most; the oldest goes first.
GRANTS_MAX = 1024
#: Connections served at once; more wait in the listen queue.
CONNECTIONS_MAX = 16
#: Connections of one user served at once; more are hung up on at once.
CONNECTIONS_PER_USER = 4
#: How long one connection may take to send its token.
CONNECTION_SECONDS = 2.0
#: The pause after a failed accept.
ACCEPT_RETRY_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class _Grant:
    table: SegmentTable
    writable: bool
    expires: float


class TableHandover:
    """The tokens of one mount and the socket redeeming them."""

    def __init__(self) -> None:
        """Choose the socket's name; :meth:`serve` binds it."""
        self.name = f"volfs-{os.getpid()}-{secrets.token_hex(8)}"
        assert len(self.name) < SEGMENT_SOCKET_NAME_BYTES
        self._grants: OrderedDict[bytes, _Grant] = OrderedDict()
        self._connections = trio.Semaphore(CONNECTIONS_MAX)
        self._per_user: collections.Counter[int] = collections.Counter()

    def grant(self, table: SegmentTable, *, writable: bool) -> bytes:
        """A one-time token for ``table``, read-only unless ``writable``.

        Runtime complexity: O(1) amortised.
        """
        now = time.monotonic()
        grants = self._grants
        while grants and (len(grants) >= GRANTS_MAX or next(iter(grants.values())).expires < now):
            grants.popitem(last=False)
        token = secrets.token_bytes(SEGMENT_TOKEN_BYTES)
        grants[token] = _Grant(table, writable, now + SEGMENT_TOKEN_SECONDS)
        return token

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Redeem tokens until cancelled."""
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with listener:
            await listener.bind(b"\0" + self.name.encode())
            listener.listen(CONNECTIONS_MAX)
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    await self._connections.acquire()
                    try:
                        connection, _address = await listener.accept()
                    except OSError as error:
                        # Out of descriptors, say: the mount goes on, tables a moment later.
                        self._connections.release()
                        log.warning("cannot accept a segment table request: %s", error)
                        await trio.sleep(ACCEPT_RETRY_SECONDS)
                        continue
                    except BaseException:
                        self._connections.release()
                        raise
                    nursery.start_soon(self._answer, connection)

    async def _answer(self, connection: trio.socket.SocketType) -> None:
        """Read one token, answer it, hang up; never more than :data:`CONNECTION_SECONDS`,
        and never more than :data:`CONNECTIONS_PER_USER` of one user's at a time."""
        uid = None
        try:
            credentials = connection.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CREDENTIALS.size
            )
            _pid, uid, _gid = PEER_CREDENTIALS.unpack(credentials)
            if self._per_user[uid] >= CONNECTIONS_PER_USER:
                uid = None
                connection.close()  # one user cannot take every slot from the others
                return
            self._per_user[uid] += 1
            with connection, trio.move_on_after(CONNECTION_SECONDS):
                token = b""
                while len(token) < SEGMENT_TOKEN_BYTES:
                    chunk = await connection.recv(SEGMENT_TOKEN_BYTES - len(token))
                    if not chunk:
                        return
                    token += chunk
                await self._redeem(connection, token)
        except OSError as error:
            log.debug("segment table handover failed: %s", error)
        except Exception:
            # A task of the mount's nursery: what escapes would end the daemon.
            log.exception("segment table handover failed")
        finally:
            self._connections.release()
            if uid is not None:
                self._per_user[uid] -= 1
                if not self._per_user[uid]:
                    del self._per_user[uid]

    async def _redeem(self, connection: trio.socket.SocketType, token: bytes) -> None:
        grant = self._grants.pop(token, None)
        if grant is None or grant.expires < time.monotonic():
            await connection.send(SEGMENT_HANDOVER_STATUS.pack(errno.EACCES))
            return
        table = grant.table
        if table.ended:
            await connection.send(SEGMENT_HANDOVER_STATUS.pack(errno.ESTALE))
            return
        if grant.writable:
            memfd = table.memfd
        else:
            # A new open file description, read-only: its holder cannot map the table for
            # writing, whatever it does with the descriptor.
            memfd = os.open(f"/proc/self/fd/{table.memfd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            await connection.sendmsg(
                [SEGMENT_HANDOVER_STATUS.pack(0)],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [memfd]))],
            )
        finally:
            if memfd != table.memfd:
                os.close(memfd)
