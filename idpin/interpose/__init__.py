"""Routing of stdlib calls through idpin (see stdlib.py).

ORIGINALS holds the real stdlib functions, captured before anything is
patched: idpin's own mechanisms call these, never the routed versions.
"""
import os
import pty
import signal
import subprocess
import threading

ORIGINALS = {
    "os.fork": os.fork,
    "os.forkpty": os.forkpty,
    "os.openpty": os.openpty,
    "pty.fork": pty.fork,
    "pty.openpty": pty.openpty,
    "threading.Thread.start": threading.Thread.start,
    # What Thread.start calls to make the OS thread (CPython 3.11 and 3.12).
    "threading._start_new_thread": threading._start_new_thread,  # type: ignore[attr-defined]  # private
    "subprocess._fork_exec": subprocess._fork_exec,  # type: ignore[attr-defined]  # private
    "os.posix_spawn": os.posix_spawn,
    "os.posix_spawnp": os.posix_spawnp,
    "os.system": os.system,
    "signal.signal": signal.signal,
    "signal.getsignal": signal.getsignal,
}
