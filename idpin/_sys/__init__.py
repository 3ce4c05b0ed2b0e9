"""The one home of every syscall idpin makes.

Two backends implement one small interface: the Cython extension
(``idpin._sys._cython``, built from ext/_sys.pyx) and its ctypes twin
(``idpin._sys._ctypes``). This module exposes the chosen backend's functions
as its own attributes; callers write ``_sys.clone3_fork(...)`` so that
``use(name)`` (the test suite runs against both) takes effect everywhere.

``IDPIN_BACKEND=ctypes`` forces the twin; ``IDPIN_BACKEND=cython`` makes a
missing extension an ImportError instead of a fallback. Without the variable
the extension is used when it was built, else the twin.
"""
import contextlib
from collections.abc import Callable
import importlib
import os
import signal

from typing import TYPE_CHECKING

from .. import signals as _signals
from ._abi import *  # noqa: F401,F403  (constants are part of the interface)
from ._glibc import tid_cache_offset  # noqa: F401

if TYPE_CHECKING:
    # Type checkers read the interface off the ctypes twin (the Cython
    # module, which has the same signatures, carries no type information);
    # at run time use() puts the chosen backend's functions here.
    from ._ctypes import (  # noqa: F401
        clone3_fork, clone3_probe, fd_nlink, flock, ipc_count, ipc_create_batch, ipc_create_pinned,
        ipc_get, ipc_remove, ipc_stat_index, knob_fork, knob_read, knob_write, mount, prctl,
        proc_read, ptmx_walk, pty_index, pty_peer, record_exists, record_read, record_remove,
        record_write, setns, unshare)

INTERFACE = (
    "BACKEND",
    "clone3_fork",
    "clone3_probe",
    "knob_fork",
    "prctl",
    "unshare",
    "setns",
    "mount",
    "flock",
    "knob_write",
    "knob_read",
    "proc_read",
    "fd_nlink",
    "ipc_get",
    "ipc_remove",
    "ipc_stat_index",
    "ipc_count",
    "ipc_create_pinned",
    "ipc_create_batch",
    "sem_getall",
    "msg_copy",
    "shm_read",
    "record_write",
    "record_read",
    "record_exists",
    "record_remove",
    "pty_index",
    "pty_peer",
    "ptmx_walk",
    "sigaction",
    # the parallel restore (idpin.restore)
    "clone3_sibling",
    "ipc_sem_setall",
    "ipc_msg_send",
    "ipc_shm_write",
    "seccomp_listen",
    "seccomp_notif_sizes",
    "seccomp_action_avail",
    "notif_recv",
    "notif_send",
    "notif_id_valid",
    "notif_addfd",
    "notif_set_flags",
    "notif_loop",
    "process_vm_read",
    "pidfd_getfd",
)

BACKENDS = ("cython", "ctypes")
_ALL_SIGNALS = set(signal.valid_signals())


@contextlib.contextmanager
def signals_blocked():
    """Hold signals (Ctrl-C among them) across steps that must not be split.

    They stay pending and are handled once the block ends, when everything
    opened is either handed to the caller or closed again.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
BACKEND = None
load_error = None


def _module_for(name):
    if name not in BACKENDS:
        raise ValueError("IDPIN_BACKEND must be one of %s, not %r" % (", ".join(BACKENDS), name))
    return importlib.import_module("idpin._sys._" + name)


# Called whenever the backend changes, by modules that cached a path through the previous one.
ON_USE: list[Callable[[], object]] = []


def use(name):
    """Make ``name`` ("cython" or "ctypes") the backend of every later call."""
    module = _module_for(name)
    missing = [attr for attr in INTERFACE if not hasattr(module, attr)]
    if missing:
        raise ImportError("idpin backend %r lacks %s" % (name, ", ".join(missing)))
    globals().update({attr: getattr(module, attr) for attr in INTERFACE})
    for forget in ON_USE:
        forget()


def _load_default():
    global load_error
    forced = os.environ.get("IDPIN_BACKEND")
    if forced:
        use(forced)
        return
    try:
        use("cython")
    except ImportError as err:
        load_error = err
        use("ctypes")


_load_default()


def _python_resumable_exit(self, exc_type, exc, tb):
    """``__exit__`` of idpin's context managers, without the compiled extension.

    The same as the extension's ``resumable_exit``, except that a Python
    signal handler can still raise at this function's first instruction and
    between its calls.
    """
    try:
        result = _python_finish(self._exit, exc_type, exc, tb)
    except BaseException:
        _signals.exit_door(2)
        raise
    _signals.exit_door(2)
    return result


def _python_finish(fn, *args):
    """``fn(*args)``, called again while it raises (see the extension's ``finish``)."""
    first = None
    for _ in range(16):
        try:
            result = fn(*args)
        except BaseException as err:  # noqa: B902 - finished by the next call
            if first is None:
                first = err
            continue
        if first is None:
            return result
        break
    raise first


try:
    # Control flow, not syscalls: taken from the extension whichever
    # backend makes the syscalls.
    from ._cython import finish, resumable_exit, set_exit_door
except ImportError:
    finish, resumable_exit = _python_finish, _python_resumable_exit
else:
    set_exit_door(_signals.exit_door, _signals.held)

try:
    tid_cache_offset()
except RuntimeError:
    pass  # the clone3 fork path reports it, and falls back to ns_last_pid
