"""Routing of stdlib calls that allocate ids through idpin.

os.fork, os.forkpty, os.openpty, pty.fork, pty.openpty and
threading.Thread.start go through idpin; so do subprocess's fork_exec,
os.posix_spawn, os.posix_spawnp and os.system (see spawn.py: a pid
request makes their process). With no request pending in this
thread and no knob armed in this process they cost a thread-local check and
a flag test; forks and thread starts that asked for nothing are steered past
a tid another thread's block armed, and IPC creations wait for it. The pty
module's functions are routed themselves: they catch OSError from the os
functions and fall back to another pty, which would swallow IdBusyError.
"""
import os
import pty as stdlib_pty
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any

from .. import pids, signals, tids
from .. import pty as idpin_pty
from . import ORIGINALS, spawn
from ..request import pending


def fork() -> int:
    return pids.fork()


def forkpty() -> tuple[int, int]:
    # Always idpin's: even when this thread asked for nothing, its fork must
    # be steered past a tid another thread's block armed (see pids.plain_fork).
    return idpin_pty.fork()


def openpty() -> tuple[int, int]:
    return idpin_pty.openpty()


def pty_fork() -> tuple[int, int]:
    return idpin_pty.fork()


def pty_openpty() -> tuple[int, int]:
    if pending("pty") is None:
        return ORIGINALS["pty.openpty"]()
    return idpin_pty.openpty()


def thread_start(self: threading.Thread) -> None:
    return tids.start_thread(self)


def start_new_thread(function: Callable[..., object], args: tuple[Any, ...],
                     kwargs: dict[str, Any] | None = None) -> int:
    return tids.start_new_thread(function, args, kwargs)


for _routed, _original in ((fork, "os.fork"), (forkpty, "os.forkpty"), (openpty, "os.openpty"),
                           (pty_fork, "pty.fork"), (pty_openpty, "pty.openpty"),
                           (thread_start, "threading.Thread.start"),
                           (start_new_thread, "threading._start_new_thread")):
    _routed.__doc__ = "%s, routed through idpin (see idpin.interpose.stdlib)." % _original
    setattr(_routed, "__wrapped__", ORIGINALS[_original])

ROUTES: dict[tuple[Any, str], Callable[..., Any]] = {
    (os, "fork"): fork,
    (os, "forkpty"): forkpty,
    (os, "openpty"): openpty,
    (stdlib_pty, "fork"): pty_fork,
    (stdlib_pty, "openpty"): pty_openpty,
    (threading.Thread, "start"): thread_start,
    (threading, "_start_new_thread"): start_new_thread,
    (subprocess, "_fork_exec"): spawn.fork_exec,
    (os, "posix_spawn"): spawn.posix_spawn,
    (os, "posix_spawnp"): spawn.posix_spawnp,
    (os, "system"): spawn.system,
    # Python signal handlers are held while idpin runs (see idpin.signals).
    (signal, "signal"): signals.routed_signal,
    (signal, "getsignal"): signals.routed_getsignal,
}


def install() -> None:
    """Route os.fork, os.forkpty, os.openpty, pty.fork, pty.openpty,
    threading.Thread.start (and threading's internal _start_new_thread) and
    the stdlib's process creation (subprocess's _fork_exec, os.posix_spawn,
    os.posix_spawnp, os.system) through idpin, process-wide (``import
    idpin`` does it)."""
    for (owner, name), routed in ROUTES.items():
        setattr(owner, name, routed)
    signals.install()


def uninstall() -> None:
    """Put the stdlib's own functions back (every one ``install`` routes),
    process-wide.

    Request blocks then reach only idpin's explicit entry points
    (idpin.fork, idpin.ipc.*, idpin.pty.*) and the kernel knobs (tid, IPC):
    a plain os.fork or os.openpty ignores a pid or pty request, and an
    unpinned fork is no longer steered past a tid another thread armed.
    Call it outside request blocks; ``install()`` routes them again.
    """
    signals.uninstall()
    for (owner, name), _ in ROUTES.items():
        key = "%s.%s" % ("threading.Thread" if owner is threading.Thread else owner.__name__, name)
        setattr(owner, name, ORIGINALS[key])


def installed() -> bool:
    """Whether the stdlib calls are routed through idpin."""
    return os.fork is fork
