"""The one home of idpin's exception hierarchy.

Every exception carries its subject as attributes and pickles, because
restore workers send them across process boundaries (a child reports an
IdBusyError to its parent over a pipe).
"""
import errno
import os
from collections.abc import Iterable
from typing import Any

# A pid or tid, one per pid-namespace level (innermost first), or an IPC id or pty index.
Id = int | tuple[int, ...]

__all__ = ["IdpinError", "IdBusyError", "LockTimeoutError", "RequestError", "UnsupportedError"]


class IdpinError(Exception):
    """Base class of every error idpin raises on purpose."""


class IdBusyError(IdpinError, OSError):
    """The requested id is in use, or was taken by a process that raced the knob.

    Raised by the allocation that would have consumed the request (or at the
    end of the block, for an allocation idpin could only observe). Nothing is
    left behind: a wrongly numbered child, object or pty has been undone.
    ``errno`` is EBUSY; ``kind`` and ``id`` name what was asked for.
    """

    def __init__(self, kind: str, id: Id, detail: str | None = None) -> None:
        self.kind = kind
        self.id = id
        self.detail = detail
        message = "%s %s is busy" % (kind, _format_id(id))
        if detail:
            message += ": " + detail
        OSError.__init__(self, errno.EBUSY, message)

    def __str__(self) -> str:
        return "[Errno %d] %s" % (errno.EBUSY, self.strerror)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.kind, self.id, self.detail))


class RequestError(IdpinError, ValueError):
    """A request that can never be honoured: unknown kind, wrong type, out of range.

    Raised before any side effect; the message names the kind and the valid range.
    """

    def __init__(self, message: str, kind: str | None = None) -> None:
        self.kind = kind
        ValueError.__init__(self, message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.kind))


class UnsupportedError(IdpinError):
    """This system cannot provide the mechanism (privilege, kernel version, knob).

    The message says what is missing and the command that would fix it.
    """

    def __init__(self, message: str, kind: str | None = None) -> None:
        self.kind = kind
        Exception.__init__(self, message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.kind))


class LockTimeoutError(IdpinError, TimeoutError):
    """A wait for idpin's namespace lock lasted longer than the lock timeout.

    Raised instead of waiting forever; nothing was allocated and nothing is
    held. ``lock`` names the lock (namespace kind, file, inode), ``timeout``
    the seconds waited and ``holders`` the pids /proc/locks names as holding
    it. Almost always a request block that waits for a process or thread
    which itself makes an idpin request in the same namespace.
    """

    def __init__(self, lock: str, timeout: float, holders: Iterable[int] = ()) -> None:
        self.lock = lock
        self.timeout = timeout
        self.holders = tuple(holders)
        if not self.holders:
            who = "its holder is not listed in /proc/locks"
        elif self.holders == (os.getpid(),):
            who = "held by this process (pid %d): another thread's request block" % os.getpid()
        else:
            who = "held by pid %s" % ", ".join(str(pid) for pid in self.holders)
        message = (
            "idpin's %s was not free within %g s (%s). A request block must not wait for "
            "a process or thread that makes its own idpin request in the same namespace "
            "(a child forked inside the block, for instance); to wait longer, call "
            "idpin.set_lock_timeout() or set IDPIN_LOCK_TIMEOUT" % (lock, timeout, who)
        )
        OSError.__init__(self, errno.ETIMEDOUT, message)

    def __str__(self) -> str:
        return self.strerror or ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.lock, self.timeout, self.holders))


def _format_id(id: Id) -> str:
    if isinstance(id, tuple):
        return "(%s)" % ", ".join(str(i) for i in id)
    return str(id)


NEEDS_NAMESPACE_HINT = (
    "run inside a user namespace that owns the namespaces, for example "
    "'unshare --user --map-root-user --pid --ipc --mount --fork --mount-proc <command>', "
    "or as root"
)


for _cls in (IdpinError, IdBusyError, LockTimeoutError, RequestError, UnsupportedError):
    _cls.__module__ = "idpin"
