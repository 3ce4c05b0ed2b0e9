"""Non-cooperating noise: processes that create objects on their own.

A restore rarely has its namespaces to itself. A noise process loops over
its kinds, creating one object and undoing it at once, never taking idpin's
lock and never making a request: like any program that forks, starts
threads, makes IPC objects or opens ptys. Every such creation can consume a
knob another process armed, or take the pty index a walk is heading for.
The pid loop is idpin.testing.Forker's (fork, reap); the others follow it.
"""
import os
import pickle
import select
import threading
import time

from .. import _sys
from ..interpose import ORIGINALS
from .workers import read_all

PTMX = "/dev/ptmx"
# Objects a noise process creates are as small as the kernel allows.
_IPC_SIZE = {"sem": 1, "shm": 4096, "msg": 0}


def churn_pid():
    child = ORIGINALS["os.fork"]()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)


def _nothing():
    pass


def churn_tid():
    # Each thread takes the next pid from the namespace's cursor, as a fork does.
    thread = threading.Thread(target=_nothing)
    ORIGINALS["threading.Thread.start"](thread)
    thread.join()


def _churn_ipc(kind):
    code = _sys.IPC_KIND_CODES[kind]

    def churn():
        # IPC_PRIVATE always allocates, so it consumes an armed *_next_id.
        made = _sys.ipc_get(code, _sys.IPC_PRIVATE, _IPC_SIZE[kind], _sys.IPC_CREAT | 0o600)
        _sys.ipc_remove(code, made)

    return churn


def churn_pty():
    os.close(os.open(PTMX, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC))


CHURN = {
    "pid": churn_pid,
    "tid": churn_tid,
    "sem": _churn_ipc("sem"),
    "shm": _churn_ipc("shm"),
    "msg": _churn_ipc("msg"),
    "pty": churn_pty,
}


class Noise:
    """``processes`` noise processes, each cycling over ``kinds``; a context manager.

    After the block, ``ops`` is how many objects they created and
    ``failures`` how many creations failed (with one example message).
    """

    def __init__(self, kinds, processes, max_seconds=300.0):
        self.kinds = tuple(kinds)
        self.processes = processes
        self.max_seconds = max_seconds
        self.ops = 0
        self.failures = 0
        self.failure_example = None
        self._started = []

    def __enter__(self):
        if self.processes:
            self._stop_read, self._stop_write = os.pipe()
            for _ in range(self.processes):
                self._started.append(self._start_one())
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def _start_one(self):
        report_read, report_write = os.pipe()
        ready_read, ready_write = os.pipe()
        pid = ORIGINALS["os.fork"]()
        if pid == 0:
            os.close(report_read)
            os.close(ready_read)
            self._loop(ready_write, report_write)
        os.close(report_write)
        os.close(ready_write)
        os.read(ready_read, 1)  # it is creating objects before any worker starts
        os.close(ready_read)
        return pid, report_read

    def _loop(self, ready_write, report_write):
        ops = failures = 0
        example = None
        try:
            churns = [CHURN[kind] for kind in self.kinds]
            deadline = time.monotonic() + self.max_seconds
            os.write(ready_write, b"1")
            while time.monotonic() < deadline and not select.select([self._stop_read], [], [], 0)[0]:
                try:
                    churns[ops % len(churns)]()
                except OSError as err:
                    # A full table (ENOSPC, EMFILE) is noise too: keep going.
                    failures += 1
                    example = example or repr(err)
                ops += 1
            os.write(report_write, pickle.dumps((ops, failures, example)))
        finally:
            os._exit(0)

    def stop(self):
        if not self._started:
            return
        os.write(self._stop_write, b"x")  # stays readable: every process sees it
        for pid, report_read in self._started:
            data = read_all(report_read)
            os.close(report_read)
            os.waitpid(pid, 0)
            if data:
                ops, failures, example = pickle.loads(data)
                self.ops += ops
                self.failures += failures
                self.failure_example = self.failure_example or example
        os.close(self._stop_read)
        os.close(self._stop_write)
        self._started = []

