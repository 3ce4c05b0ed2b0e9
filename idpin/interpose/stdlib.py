"""Routing of stdlib calls that allocate ids through idpin.

os.fork, os.forkpty, os.openpty, pty.fork, pty.openpty and
threading.Thread.start go through idpin. With no request pending in this
thread and no knob armed in this process they cost a thread-local check and
a flag test; forks and thread starts that asked for nothing are steered past
a tid another thread's block armed, and IPC creations wait for it. The pty
module's functions are routed themselves: they catch OSError from the os
functions and fall back to another pty, which would swallow IdBusyError.
"""
import os
import pty as stdlib_pty
import threading

from .. import pids, tids
from .. import pty as idpin_pty
from . import ORIGINALS
from ..request import pending


def fork():
    return pids.fork()


def forkpty():
    # Always idpin's: even when this thread asked for nothing, its fork must
    # be steered past a tid another thread's block armed (see pids.plain_fork).
    return idpin_pty.fork()


def openpty():
    return idpin_pty.openpty()


def pty_fork():
    return idpin_pty.fork()


def pty_openpty():
    if pending("pty") is None:
        return ORIGINALS["pty.openpty"]()
    return idpin_pty.openpty()


def thread_start(self):
    return tids.start_thread(self)


def start_new_thread(function, args, kwargs=None):
    return tids.start_new_thread(function, args, kwargs)


for _routed, _original in ((fork, "os.fork"), (forkpty, "os.forkpty"), (openpty, "os.openpty"),
                           (pty_fork, "pty.fork"), (pty_openpty, "pty.openpty"),
                           (thread_start, "threading.Thread.start"),
                           (start_new_thread, "threading._start_new_thread")):
    _routed.__doc__ = "%s, routed through idpin (see idpin.interpose.stdlib)." % _original
    _routed.__wrapped__ = ORIGINALS[_original]

ROUTES = {
    (os, "fork"): fork,
    (os, "forkpty"): forkpty,
    (os, "openpty"): openpty,
    (stdlib_pty, "fork"): pty_fork,
    (stdlib_pty, "openpty"): pty_openpty,
    (threading.Thread, "start"): thread_start,
    (threading, "_start_new_thread"): start_new_thread,
}


def install():
    for (owner, name), routed in ROUTES.items():
        setattr(owner, name, routed)


def uninstall():
    """Put the stdlib functions back (tests of the routing use this)."""
    for (owner, name), _ in ROUTES.items():
        key = "%s.%s" % ("threading.Thread" if owner is threading.Thread else owner.__name__, name)
        setattr(owner, name, ORIGINALS[key])


def installed():
    return os.fork is fork
