import ctypes
import errno
import os
import pickle
import threading

import pytest

import idpin
from idpin import _sys, pids
from idpin.testing import Forker

from helpers import as_root_and_nobody, child_exits_with, reap, run_workers


@as_root_and_nobody
def test_fork_in_a_request_gives_the_pid_in_parent_and_child(uid):
    assert os.getuid() == 0  # root of its own user namespace either way
    with idpin.request(pid=1234) as req:
        child = os.fork()
        if child == 0:
            child_exits_with(lambda: os.getpid() == 1234 and threading.get_native_id() == 1234)
    assert child == 1234
    assert reap(child) == 0
    assert req.consumed == {"pid": 1234}


def test_clone3_child_has_its_own_tid_in_glibcs_cache():
    # A stale cache would make pthread_self()-based calls target the parent.
    def cached_tid():
        address = idpin._sys._glibc.pthread_self() + _sys.tid_cache_offset()
        return ctypes.c_int.from_address(address).value

    child = idpin.fork(pid=777, mechanism="clone3")
    if child == 0:
        child_exits_with(lambda: cached_tid() == os.getpid() == 777)
    assert child == 777
    assert reap(child) == 0


def test_child_of_a_pinned_fork_is_a_normal_fork_child():
    events = []
    os.register_at_fork(before=lambda: events.append("before"),
                        after_in_parent=lambda: events.append("parent"))
    read_end, write_end = os.pipe()
    child = idpin.fork(pid=555)
    if child == 0:
        # Locks the interpreter held are usable; threads can start.
        worker = threading.Thread(target=lambda: os.write(write_end, b"ok"))
        worker.start()
        worker.join()
        os._exit(0)
    os.close(write_end)
    assert os.read(read_end, 2) == b"ok"
    os.close(read_end)
    assert reap(child) == 0
    assert events == ["before", "parent"]


@pytest.mark.parametrize("mechanism", ["clone3", "ns_last_pid"])
def test_explicit_fork_with_each_mechanism(mechanism):
    child = idpin.fork(pid=4000, mechanism=mechanism)
    if child == 0:
        child_exits_with(lambda: os.getpid() == 4000)
    assert child == 4000
    assert reap(child) == 0


@pytest.mark.parametrize("mechanism", ["clone3", "ns_last_pid"])
def test_busy_pid_raises_and_leaves_no_child(mechanism):
    sleeper = os.fork()
    if sleeper == 0:
        os.read(os.pipe()[0], 1)  # blocks until killed
    try:
        with pytest.raises(idpin.IdBusyError) as info:
            idpin.fork(pid=sleeper, mechanism=mechanism)
    finally:
        pids.undo_child(sleeper)
    err = info.value
    assert (err.errno, err.kind, err.id) == (errno.EBUSY, "pid", sleeper)
    assert isinstance(err, OSError) and isinstance(err, idpin.IdpinError)


def test_busy_pid_in_a_request_is_not_consumed():
    with idpin.request(pid=1) as req:
        with pytest.raises(idpin.IdBusyError):
            os.fork()
        with pytest.raises(idpin.IdBusyError):
            os.fork()
    assert req.consumed == {}


def test_request_is_one_shot():
    with idpin.request(pid=3000) as req:
        first = os.fork()
        if first == 0:
            os._exit(0)
        second = os.fork()
        if second == 0:
            os._exit(0)
    assert first == 3000 and second != 3000
    reap(first), reap(second)
    assert req.consumed == {"pid": 3000}


def test_unconsumed_request_is_discarded_at_block_exit():
    with idpin.request(pid=3100) as req:
        pass
    child = os.fork()
    if child == 0:
        os._exit(0)
    reap(child)
    assert child != 3100 and req.consumed == {}


def test_none_means_no_request():
    with idpin.request(pid=None) as req:
        child = os.fork()
        if child == 0:
            os._exit(0)
    reap(child)
    assert req.consumed == {} and req.ids == {}


def test_inner_request_overrides_outer_which_stays_pending():
    with idpin.request(pid=2000) as outer:
        with idpin.request(pid=2100) as inner:
            a = os.fork()
            if a == 0:
                os._exit(0)
            b = os.fork()  # inner consumed: ordinary, the outer stays hidden
            if b == 0:
                os._exit(0)
        c = os.fork()
        if c == 0:
            os._exit(0)
    assert (a, c) == (2100, 2000) and b not in (2000, 2100)
    assert inner.consumed == {"pid": 2100} and outer.consumed == {"pid": 2000}
    for child in (a, b, c):
        reap(child)


def test_request_belongs_to_the_thread_that_made_it():
    armed, done = threading.Event(), threading.Event()
    got = {}

    def worker():
        with idpin.request(pid=2500):
            armed.set()
            done.wait(10)
            got["worker"] = child = os.fork()
            if child == 0:
                os._exit(0)

    thread = threading.Thread(target=worker)
    thread.start()
    assert armed.wait(10)
    got["main"] = other = os.fork()  # this thread asked for nothing
    if other == 0:
        os._exit(0)
    done.set()
    thread.join()
    assert got["worker"] == 2500 and got["main"] != 2500
    reap(got["worker"]), reap(other)


def test_unpinned_fork_inside_a_tid_block_does_not_take_the_tid():
    with idpin.request(tid=2800) as req:
        child = os.fork()  # asked for no pid
        if child == 0:
            os._exit(0)
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()
    reap(child)
    assert child != 2800 and thread.native_id == 2800 and req.consumed == {"tid": 2800}


def test_thread_started_in_a_tid_block_can_fork_while_the_block_waits_for_it():
    forked = []

    def work():
        child = os.fork()
        if child == 0:
            os._exit(0)
        forked.append(reap(child))

    with idpin.request(tid=2900):
        thread = threading.Thread(target=work)
        thread.start()
        thread.join(30)  # used to deadlock: the fork waited for the block to end
        assert not thread.is_alive()
    assert thread.native_id == 2900 and forked == [0]


def test_knob_path_refused_when_children_go_to_a_new_pid_namespace():
    _sys.unshare(_sys.CLONE_NEWPID)
    with pytest.raises(idpin.UnsupportedError, match="unshare"):
        idpin.fork(pid=(1, 5000), mechanism="ns_last_pid")


FRESH_INTERPRETER = """
import os, threading, idpin
with idpin.request(tid=4321, pid=1234) as req:
    child = os.fork()
    if child == 0:
        os._exit(0)
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
os.waitpid(child, 0)
print(child, thread.native_id, sorted(req.consumed.items()))
"""


def test_first_pinned_fork_of_a_fresh_interpreter_keeps_a_pending_tid(backend):
    # idpin once found glibc's tid cache with a probe thread at the first
    # clone3 fork, and that thread took the pending tid.
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", FRESH_INTERPRETER], capture_output=True,
                         text=True, timeout=60, cwd="/",  # not the source tree
                         env=dict(os.environ, IDPIN_BACKEND=backend))
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.split(None, 2) == ["1234", "4321", "[('pid', 1234), ('tid', 4321)]\n"]


def test_multithreaded_process_forks_through_the_knob():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, args=(10,))
    thread.start()
    try:
        assert pids.choose_mechanism((2600,)) == "ns_last_pid"
        with idpin.request(pid=2600):
            child = os.fork()
            if child == 0:
                os._exit(0)
    finally:
        stop.set()
        thread.join()
    assert child == 2600
    reap(child)


def test_nested_pid_namespaces_take_a_tuple_innermost_first():
    _sys.unshare(_sys.CLONE_NEWPID)  # children go into a new, nested pid namespace
    def nspid(pid):  # /proc is the outer namespace's: pids outer first
        with open("/proc/%d/status" % pid) as f:
            return [line.split()[1:] for line in f if line.startswith("NSpid:")][0]

    with idpin.request(pid=(1, 500)):
        init = os.fork()
        if init == 0:
            # pid 1 of the inner namespace, 500 in the outer one.
            with idpin.request(pid=(7, 600)):
                grandchild = os.fork()
                if grandchild == 0:
                    os.read(os.pipe()[0], 1)  # until killed
            ok = nspid(600) == ["600", "7"] and os.getpid() == 1 and grandchild == 7
            os.kill(7, 9)
            os._exit(0 if ok and reap(7) == -9 else 1)
    assert init == 500 and nspid(500) == ["500", "1"]
    assert reap(init) == 0


def test_nested_pid_that_the_kernel_refuses_is_a_request_error():
    _sys.unshare(_sys.CLONE_NEWPID)
    # A new pid namespace's first process must be its init, pid 1.
    with pytest.raises(idpin.RequestError, match="pid 1"):
        idpin.fork(pid=(5, 501))


def test_nested_pids_need_clone3_so_threads_are_refused():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, args=(10,))
    thread.start()
    try:
        with pytest.raises(idpin.UnsupportedError, match="single-threaded"):
            idpin.fork(pid=(1, 502))
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("mechanism", ["clone3", "ns_last_pid"])
def test_parallel_workers_beside_a_forker_never_get_a_wrong_pid(mechanism):
    count = 300

    def work(index):
        exact, busy = [], []
        for pid in range(10000 + index * 1000, 10000 + index * 1000 + count):
            try:
                child = idpin.fork(pid=pid, mechanism=mechanism)
            except idpin.IdBusyError:
                busy.append(pid)
                continue
            if child == 0:
                os._exit(0)
            reap(child)
            assert child == pid, "wrong pid %d for %d" % (child, pid)
            exact.append(pid)
        return exact, busy

    with Forker() as forker:
        results = run_workers(work, 2)
    taken = set(forker.stop())
    assert len(taken) > 0
    for exact, busy in results:
        assert len(exact) + len(busy) == count
        # Busy only when the pid really was taken, by the forker's children.
        assert set(busy) <= taken


def test_exceptions_pickle_with_their_attributes():
    for err in (idpin.IdBusyError("pid", (7, 1234), "in use"),
                idpin.RequestError("pid -1 is out of range", kind="pid"),
                idpin.UnsupportedError("needs privilege", kind="sem")):
        copy = pickle.loads(pickle.dumps(err))
        assert type(copy) is type(err) and str(copy) == str(err)
        assert copy.kind == err.kind
    busy = pickle.loads(pickle.dumps(idpin.IdBusyError("pid", 5)))
    assert (busy.errno, busy.id) == (errno.EBUSY, 5)


def test_a_forked_child_does_not_inherit_the_parents_request():
    with idpin.request(pid=2700):
        child = os.fork()
        if child == 0:
            grandchild = os.fork()  # the child asked for nothing
            if grandchild == 0:
                os._exit(0)
            reap(grandchild)
            os._exit(0 if grandchild != 2700 else 1)
    assert child == 2700 and reap(child) == 0


def test_an_ambiguous_tid_cache_scan_is_settled_by_a_raw_probe_thread():
    # If another field of this thread's struct pthread held its tid too, a
    # probe thread (raw _thread, never routed) picks the offset both share.
    from idpin._sys import _glibc

    real = _glibc._candidates
    main = threading.get_ident()

    def with_a_decoy():
        found = real()
        return found | {found and max(found) + 64} if threading.get_ident() == main else found

    assert len(with_a_decoy()) >= 2  # as pid 1, many fields hold "1" anyway
    _glibc._candidates = with_a_decoy
    try:
        assert _glibc._find_offset() == _sys.tid_cache_offset()
    finally:
        _glibc._candidates = real
    # The probe thread is gone before it returns: the clone3 path counts threads.
    assert pids.thread_count() == 1
