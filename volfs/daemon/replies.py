"""Answering FUSE requests: the core's errors become their errno, and a bug fails only the
request that met it (EIO, logged with its traceback), never the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

from volfs.daemon import bridge  # binds ahead of pyfuse3: see volfs.daemon.bridge

# isort: split
import pyfuse3

log = logging.getLogger(__name__)

#: ERESTARTSYS and the errnos after it are the kernel's own: never an answer to a program.
_FIRST_INTERNAL_ERRNO = 512

_S = TypeVar("_S")
_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextlib.contextmanager
def answering(request: bridge.Request, what: str, *args: object) -> Iterator[None]:
    """Answer ``request`` with the errno of an error escaping the block (EIO for a bug).

    ``what`` and ``args`` describe the request in the log (``%``-style) if a bug shows.
    """
    try:
        yield
    except OSError as error:
        _answer_error(request, error.errno or errno.EIO)
    except Exception:
        log.exception(what + " failed; answering EIO", *args)
        _answer_error(request, errno.EIO)


def _answer_error(request: bridge.Request, code: int) -> None:
    """Answer ``request`` with errno ``code`` (EIO if the kernel cannot take it), unless it was.

    A reply that cannot be sent is dropped: the kernel no longer waits for the request (its
    connection was aborted) or the request's session has ended.
    """
    if request.answered:
        return
    try:
        request.reply_error(code if 0 < code < _FIRST_INTERNAL_ERRNO else errno.EIO)
    except OSError as error:
        log.debug("cannot answer a request with %s: %s", errno.errorcode.get(code, code), error)


def fuse_errors(
    handler: Callable[Concatenate[_S, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[_S, _P], Coroutine[Any, Any, _R]]:
    """Map the core's errors to ``FUSEError`` and contain unexpected ones to the request."""

    async def wrapper(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
        except MemoryError:
            log.error("%s: out of memory", handler.__name__)
            raise pyfuse3.FUSEError(errno.ENOMEM) from None
        except Exception:
            log.exception("%s failed; answering EIO", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    functools.update_wrapper(wrapper, handler)
    return wrapper
