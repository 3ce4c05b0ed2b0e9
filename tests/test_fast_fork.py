"""idpin.fork's fast path: with the Cython backend, an explicit-pid fork of a
single-threaded process is decided and made in C (idpin._sys._cython.fork),
armed by the first such fork of the Python path. It must give exactly what
the Python path gives, and step aside whenever that path would decide
otherwise."""
import os
import threading

import pytest

import idpin
from idpin import _sys, knobs, pids

from helpers import child_exits_with, flock_held_elsewhere, fork_exact, reap, second_thread

PID = 32001


def test_the_first_explicit_pid_fork_arms_the_c_path_and_later_ones_are_exact(backend):
    assert not pids.fast_path_armed()
    fork_exact(PID)
    assert pids.fast_path_armed() == (backend == "cython")
    for pid in range(PID + 1, PID + 20):
        fork_exact(pid)
    fork_exact(PID + 20, mechanism="clone3")
    assert pids.fast_path_armed() == (backend == "cython")


def test_a_busy_pid_on_the_fast_path_is_idbusyerror_and_no_child(backend):
    fork_exact(PID)
    holder = idpin.fork(pid=PID + 1)
    if holder == 0:
        os.read(os.pipe()[0], 1)  # held until killed
    try:
        with pytest.raises(idpin.IdBusyError, match=str(PID + 1)):
            idpin.fork(pid=PID + 1)
    finally:
        os.kill(holder, 9)
        reap(holder)
    fork_exact(PID + 1)


def test_out_of_range_and_bad_pids_are_refused_on_the_fast_path_too(backend):
    fork_exact(PID)
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    with pytest.raises(idpin.RequestError, match="out of range"):
        idpin.fork(pid=pid_max)
    with pytest.raises(idpin.RequestError):
        idpin.fork(pid=0)
    with pytest.raises(idpin.RequestError):
        idpin.fork(pid=True)
    with pytest.raises(idpin.RequestError, match="mechanism"):
        idpin.fork(pid=PID, mechanism="vfork")
    assert pids.fast_path_armed() == (backend == "cython")


def test_a_lowered_pid_max_is_honoured_after_the_path_was_armed(backend):
    fork_exact(PID)
    with open("/proc/sys/kernel/pid_max", "w") as f:
        f.write(str(PID))  # this test's own pid namespace: pid_max is per namespace
    with pytest.raises(idpin.RequestError, match="out of range"):
        idpin.fork(pid=PID + 5)
    fork_exact(PID - 5)


def test_a_second_thread_makes_the_fork_take_the_knob_path(backend):
    fork_exact(PID)
    with second_thread():
        fork_exact(PID + 1)  # clone3 would be unsafe here: the Python path chooses ns_last_pid
        with pytest.raises(idpin.UnsupportedError, match="single-threaded"):
            idpin.fork(pid=PID + 2, mechanism="clone3")
    fork_exact(PID + 3)


def test_a_forked_child_does_not_inherit_the_armed_path(backend):
    fork_exact(PID)
    child = os.fork()
    if child == 0:
        child_exits_with(forks_exactly_without_its_parents_path)
    assert reap(child) == 0


def forks_exactly_without_its_parents_path():
    # Its parent's /proc/self/task fd and thread count are not its own.
    if pids.fast_path_armed():
        return False
    grandchild = idpin.fork(pid=PID + 1)
    if grandchild == 0:
        os._exit(0 if os.getpid() == PID + 1 else 1)
    return grandchild == PID + 1 and reap(grandchild) == 0


def test_changing_the_backend_disarms_it(backend):
    fork_exact(PID)
    _sys.use("ctypes")
    try:
        assert not pids.fast_path_armed()
        fork_exact(PID + 1)
        assert not pids.fast_path_armed()
    finally:
        _sys.use(backend)
    fork_exact(PID + 2)
    assert pids.fast_path_armed() == (backend == "cython")


# -- the knob path (ns_last_pid), made in C once armed ---------------------------------


def knob_value():
    with open("/proc/sys/kernel/ns_last_pid") as f:
        return int(f.read())


def test_the_first_knob_path_fork_arms_the_c_path_and_later_ones_are_exact(backend):
    fork_exact(PID, mechanism="ns_last_pid")
    assert pids.fast_path_armed() == (backend == "cython")
    for pid in range(PID + 1, PID + 10):
        fork_exact(pid, mechanism="ns_last_pid")
    with second_thread():  # the thread takes the pid after the cursor: stay clear of it
        for pid in range(PID + 100, PID + 110):
            fork_exact(pid)  # several threads: the knob path is the default
    assert _sys.record_read(pids.cursor_record_name(os.stat("/proc/self/ns/pid").st_ino)) is None


def test_a_busy_pid_on_the_knob_path_is_idbusyerror_and_no_child(backend):
    fork_exact(PID, mechanism="ns_last_pid")
    holder = idpin.fork(pid=PID + 1)
    if holder == 0:
        os.read(os.pipe()[0], 1)  # held until killed
    try:
        with pytest.raises(idpin.IdBusyError, match=str(PID + 1)):
            idpin.fork(pid=PID + 1, mechanism="ns_last_pid")
    finally:
        os.kill(holder, 9)
        reap(holder)


def test_the_knob_path_waits_for_a_lock_held_elsewhere_like_the_python_path(backend):
    fork_exact(PID, mechanism="ns_last_pid")
    previous = idpin.set_lock_timeout(0.3)
    try:
        with flock_held_elsewhere("/proc/self/ns/pid") as holder:  # it takes the next pid
            with pytest.raises(idpin.LockTimeoutError, match=str(holder)):
                idpin.fork(pid=PID + 200, mechanism="ns_last_pid")
    finally:
        idpin.set_lock_timeout(previous)
    fork_exact(PID + 200, mechanism="ns_last_pid")


def test_a_killed_holders_cursor_is_put_back_before_a_knob_path_fork(backend):
    fork_exact(PID, mechanism="ns_last_pid")
    # What a holder killed with ns_last_pid armed leaves: the knob, and its record.
    before = knob_value()
    record = pids.cursor_record_name(os.stat("/proc/self/ns/pid").st_ino)
    _sys.record_write(record, b"%d %d" % (before, 40000 - 1))
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(40000 - 1))
    fork_exact(PID + 1, mechanism="ns_last_pid")
    assert _sys.record_read(record) is None
    plain = os.fork()  # the cursor was put back: not the killed holder's pid
    if plain == 0:
        os._exit(0)
    reap(plain)
    assert plain != 40000


def test_a_knob_path_fork_inside_this_threads_tid_block_keeps_the_armed_tid(backend):
    fork_exact(PID, mechanism="ns_last_pid")
    with idpin.request(tid=PID + 50):
        fork_exact(PID + 1, mechanism="ns_last_pid")  # this thread holds the pid lock
        assert knob_value() == PID + 50 - 1
        started = threading.Thread(target=lambda: None)
        started.start()
        assert started.native_id == PID + 50
        started.join()


# -- what a forked child keeps of its parent's idpin state -------------------------------


def test_a_child_never_keeps_its_parents_lock_alive_after_the_parent_is_killed(backend):
    ready_read, ready_write = os.pipe()
    holder = os.fork()
    if holder == 0:
        with idpin.request(tid=PID + 300):  # holds the pid namespace's lock
            bystander = os.fork()  # a child that never uses idpin again
            if bystander == 0:
                os.read(os.pipe()[0], 1)  # until killed
            os.write(ready_write, b"%d" % bystander)
            os.read(os.pipe()[0], 1)  # killed here, lock held
    bystander = int(os.read(ready_read, 16))
    os.kill(holder, 9)
    reap(holder)
    previous = idpin.set_lock_timeout(2)
    try:
        with idpin.request(tid=PID + 301):  # the lock died with its holder
            pass
    finally:
        idpin.set_lock_timeout(previous)
        os.kill(bystander, 9)
        os.close(ready_read)
        os.close(ready_write)
    # The bystander was the holder's child: it is this process's now (pid 1), to reap.
    reap(bystander)


def test_a_child_forgets_its_parents_state_at_its_first_use_and_keeps_no_fd(backend):
    fork_exact(PID)  # the parent has namespaces, knobs and fds cached
    with idpin.request(sem=(1 << 15) | 7):
        pass
    inherited = sorted(knobs.cached_fds())
    child = os.fork()
    if child == 0:
        def check():
            # Closed at the fork: none of the parent's cached fds is open here.
            if any(os.path.exists("/proc/self/fd/%d" % fd) for fd in inherited):
                return False
            fork_exact(PID + 1)  # and its own use of idpin works from scratch
            with idpin.request(sem=(1 << 15) | 8):
                pass
            return True
        child_exits_with(check)
    assert reap(child) == 0
