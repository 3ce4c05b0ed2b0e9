"""``import idpin`` routes the stdlib's id-allocating calls; uninstall() and install() undo and redo it."""
import os
import pty
import signal
import subprocess
import threading

import idpin
from idpin.interpose import ORIGINALS

ROUTED = {"os.fork": (os, "fork"), "os.forkpty": (os, "forkpty"), "os.openpty": (os, "openpty"),
          "pty.fork": (pty, "fork"), "pty.openpty": (pty, "openpty"),
          "threading.Thread.start": (threading.Thread, "start"),
          "threading._start_new_thread": (threading, "_start_new_thread"),
          "subprocess._fork_exec": (subprocess, "_fork_exec"),
          "os.posix_spawn": (os, "posix_spawn"), "os.posix_spawnp": (os, "posix_spawnp"),
          "os.system": (os, "system"),
          # handlers are held while idpin runs (idpin.signals)
          "signal.signal": (signal, "signal"), "signal.getsignal": (signal, "getsignal")}


def current(name):
    owner, attr = ROUTED[name]
    return getattr(owner, attr)


def forked_pid(pid):
    """The pid a plain os.fork() gets inside ``request(pid=pid)``, and what the request consumed."""
    with idpin.request(pid=pid) as req:
        child = os.fork()
        if child == 0:
            os._exit(0)
    os.waitpid(child, 0)
    return child, req.consumed


def test_import_routes_every_call_and_uninstall_puts_the_originals_back():
    assert set(ROUTED) == set(ORIGINALS)
    assert idpin.installed()
    assert [name for name in ROUTED if current(name) is ORIGINALS[name]] == []
    idpin.uninstall()
    try:
        assert not idpin.installed()
        assert [name for name in ROUTED if current(name) is not ORIGINALS[name]] == []
        # A plain fork now ignores the request; idpin's explicit entry point does not.
        child, consumed = forked_pid(500)
        assert child != 500 and consumed == {}
        child = idpin.fork(pid=600)
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)
        assert child == 600
    finally:
        idpin.install()
    assert idpin.installed()
    assert [name for name in ROUTED if current(name) is ORIGINALS[name]] == []
    assert forked_pid(700) == (700, {"pid": 700})


def test_install_and_uninstall_are_public_and_idempotent():
    assert {"install", "uninstall", "installed"} <= set(idpin.__all__)
    assert idpin.uninstall.__module__ == "idpin" and idpin.uninstall.__doc__
    idpin.install()
    idpin.install()
    assert os.fork is not ORIGINALS["os.fork"]
    idpin.uninstall()
    idpin.uninstall()
    assert os.fork is ORIGINALS["os.fork"]
    idpin.install()
