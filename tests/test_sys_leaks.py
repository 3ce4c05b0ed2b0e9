"""Each _sys entry point, called many times, leaks neither objects nor fds.

A reference leak in the Cython backend (or a descriptor left open on an
error path) grows with every call: sys.getallocatedblocks and the fd table
show it after a few thousand calls.
"""
import errno
import fcntl
import os
import sys

import pytest

from idpin import _sys
from idpin.testing import open_fds

CALLS = 3000
# Allowance for caches that fill once (interned ints, free lists).
SLACK_BLOCKS = 200


def knob_fd(name):
    return os.open("/proc/sys/kernel/" + name, os.O_RDWR | os.O_CLOEXEC)


def run_many(call, calls=CALLS):
    for _ in range(200):
        call()
    fds = open_fds()
    blocks = sys.getallocatedblocks()
    for _ in range(calls):
        call()
    assert open_fds() == fds
    assert sys.getallocatedblocks() - blocks < SLACK_BLOCKS


def pinned_create_and_remove():
    fd = knob_fd("sem_next_id")
    try:
        got = _sys.ipc_create_pinned(fd, _sys.SEM, 4242, 0, 1, 0o1600)
        _sys.ipc_remove(_sys.SEM, got)
    finally:
        os.close(fd)


def knob_round_trip():
    fd = knob_fd("ns_last_pid")
    try:
        _sys.knob_write(fd, _sys.knob_read(fd))
    finally:
        os.close(fd)


def walk_and_close():
    masters, busy = _sys.ptmx_walk("/dev/ptmx", (3,))
    assert busy == -1
    slave = _sys.pty_peer(masters[0])
    os.close(slave)
    os.close(masters[0])


def busy_walk():
    assert _sys.ptmx_walk("/dev/ptmx", (0,)) == ((), 0)


def failing_calls():
    # Not pytest.raises: its bookkeeping allocates per call.
    try:
        _sys.ipc_remove(_sys.MSG, 123456)
    except OSError as err:
        assert err.errno == errno.EINVAL
    else:
        raise AssertionError("IPC_RMID of a missing queue succeeded")
    assert _sys.ipc_stat_index(_sys.SHM, 77) == -1


def refused_clone3():
    assert _sys.clone3_probe((os.getpid(),)) == errno.EEXIST


def lock_and_unlock():
    fd = os.open("/proc/self/ns/ipc", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _sys.flock(fd, fcntl.LOCK_EX)
        _sys.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "call", [pinned_create_and_remove, knob_round_trip, walk_and_close, failing_calls, lock_and_unlock],
    ids=lambda call: call.__name__,
)
def test_entry_point_does_not_leak(call):
    run_many(call)


def test_refused_clone3_does_not_leak():
    # The kernel copies the whole process before refusing the pid (~0.7 ms):
    # fewer calls, still more than the slack.
    run_many(refused_clone3, calls=2 * SLACK_BLOCKS)


def test_busy_walk_does_not_leak():
    holder = os.openpty()  # index 0 stays busy
    run_many(busy_walk)
    os.close(holder[0]), os.close(holder[1])


def test_ipc_content_readers_do_not_leak():
    import sysv_ipc

    semaphore = _sys.ipc_get(_sys.SEM, _sys.IPC_PRIVATE, 3, 0o600)
    segment = _sys.ipc_get(_sys.SHM, _sys.IPC_PRIVATE, 8192, 0o600)
    queue = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX)
    queue.send(b"m", type=1)

    def read_contents():
        assert _sys.sem_getall(semaphore) == [0, 0, 0]
        assert _sys.shm_read(segment, 8192) == bytes(8192)
        assert _sys.msg_copy(queue.id, 0, 16) == (1, b"m")
        assert _sys.msg_copy(queue.id, 1, 16) is None
        for call, args, code in ((_sys.shm_read, (segment, 10), errno.EFBIG),
                                 (_sys.msg_copy, (queue.id, 0, 0), errno.E2BIG),
                                 (_sys.sem_getall, (123456,), errno.EINVAL)):
            try:
                call(*args)
            except OSError as err:
                assert err.errno == code
            else:
                raise AssertionError("%s%r did not fail" % (call.__name__, args))

    try:
        run_many(read_contents)
    finally:
        _sys.ipc_remove(_sys.SEM, semaphore)
        _sys.ipc_remove(_sys.SHM, segment)
        queue.remove()
