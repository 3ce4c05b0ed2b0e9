"""Small helpers shared by the tests (they run inside the namespace child)."""
import contextlib
import fcntl
import os
import pickle
import signal
import threading

import pytest

import idpin
from idpin.interpose import ORIGINALS
from idpin.testing import NOBODY

# Run a test as root and as an unprivileged user (each in its own user namespace).
as_root_and_nobody = pytest.mark.parametrize(
    "uid", [0, pytest.param(NOBODY, marks=pytest.mark.namespaces(uid=NOBODY))], ids=["root", "nobody"]
)


def reap(pid):
    """Wait for ``pid``; its exit code."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def child_exits_with(check):
    """In a forked child: exit 0 if check() is true, else 1; never returns."""
    try:
        ok = check()
    except BaseException:
        ok = False
    os._exit(0 if ok else 1)


def run_workers(work, count):
    """Run ``work(index)`` in ``count`` forked processes at once; their results.

    The workers start together, once all are forked, so that forking them
    does not take pids from the ranges the first ones are already pinning.
    """
    go_read, go_write = os.pipe()
    pipes, children = [], []
    for index in range(count):
        read_end, write_end = os.pipe()
        child = ORIGINALS["os.fork"]()
        if child == 0:
            os.close(read_end)
            try:
                os.read(go_read, 1)
                result = ("ok", work(index))
            except BaseException as err:
                result = ("err", repr(err))
            os.write(write_end, pickle.dumps(result))
            os._exit(0)
        os.close(write_end)
        pipes.append(read_end)
        children.append(child)
    os.write(go_write, b"g" * count)
    os.close(go_read)
    os.close(go_write)
    results = []
    for read_end, child in zip(pipes, children):
        chunks = []
        while True:
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read_end)
        reap(child)
        tag, value = pickle.loads(b"".join(chunks))
        assert tag == "ok", value
        results.append(value)
    return results


def knob(name):
    with open("/proc/sys/kernel/" + name) as f:
        return int(f.read())


def wait_until(condition, timeout=10.0):
    """Poll ``condition`` until true or ``timeout`` seconds; whether it became true."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.001)
    return condition()


@contextlib.contextmanager
def flock_held_elsewhere(path):
    """Another process (not using idpin) holds flock(LOCK_EX) on ``path`` for the whole
    with block: its pid. It is killed and reaped at the end."""
    ready_read, ready_write = os.pipe()
    never_read, never_write = os.pipe()
    holder = ORIGINALS["os.fork"]()
    if holder == 0:
        fd = os.open(path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(ready_write, b"1")
        os.read(never_read, 1)  # until killed
        os._exit(0)
    os.read(ready_read, 1)
    try:
        yield holder
    finally:
        os.kill(holder, signal.SIGKILL)
        reap(holder)
        for fd in (ready_read, ready_write, never_read, never_write):
            os.close(fd)


@contextlib.contextmanager
def second_thread():
    """A second, idle thread for the with block: idpin takes its multi-threaded paths
    (knob-path forks)."""
    stop = threading.Event()
    parked = threading.Thread(target=stop.wait)
    parked.start()
    try:
        yield
    finally:
        stop.set()
        parked.join()


def fork_exact(pid, **options):
    """idpin.fork(pid=pid) gives exactly ``pid``, in parent and child; reaped."""
    child = idpin.fork(pid=pid, **options)
    if child == 0:
        child_exits_with(lambda: os.getpid() == pid == threading.get_native_id())
    assert child == pid
    assert reap(child) == 0
