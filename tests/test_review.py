"""Adversarial review of issue 9's fast paths (idpin.fork in C, lazy forgetting,
cached namespaces, create_many in one call): each test is a way found to make a
fast path decide differently from the Python path, and what it must do instead."""
import contextlib
import os
import signal
import threading

import pytest

import idpin
from idpin import _sys, pids

from helpers import fork_exact, reap, second_thread

PID = 31001

class Tick(Exception):
    pass


@contextlib.contextmanager
def raising_timer_storm():
    """SIGALRM every 200 us; its handler raises Tick every other time while
    ``inside[0]`` is set (yields that one-item list)."""
    ticks, inside = [], [False]

    def tick(signum, frame):
        ticks.append(signum)
        if inside[0] and len(ticks) % 2:
            raise Tick()

    previous = signal.signal(signal.SIGALRM, tick)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
        yield inside
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- children born in another pid namespace (unshare(CLONE_NEWPID) after arming) ---------


def test_an_armed_knob_path_refuses_when_children_go_to_a_new_pid_namespace(backend):
    # The C knob path used to write this namespace's ns_last_pid and fork into
    # the new one: the parent saw the pid asked for (the child's outer pid)
    # and returned it, while the child, whose own pid differed, exited 125
    # before running anything. The Python path refuses.
    fork_exact(PID, mechanism="ns_last_pid")
    _sys.unshare(_sys.CLONE_NEWPID)
    with pytest.raises(idpin.UnsupportedError, match="unshare"):
        idpin.fork(pid=PID + 1, mechanism="ns_last_pid")


def test_an_armed_knob_path_refuses_a_new_pid_namespace_with_threads_too(backend):
    with second_thread():  # started before the unshare: no thread can be made after it
        fork_exact(PID)  # several threads: the knob path, armed
        _sys.unshare(_sys.CLONE_NEWPID)
        with pytest.raises(idpin.UnsupportedError, match="unshare"):
            idpin.fork(pid=PID + 1)


def test_an_armed_clone3_path_gives_the_new_namespaces_init_as_the_python_path_does(backend):
    # The C path took the parent's view of the child (its outer pid) for a
    # wrong pid: it killed the new namespace's init (so the namespace could
    # never have another process) and the retry failed with a raw ENOMEM.
    fork_exact(PID)
    _sys.unshare(_sys.CLONE_NEWPID)
    init = idpin.fork(pid=1)
    if init == 0:
        os._exit(0 if os.getpid() == 1 else 1)
    assert init > 1  # its pid here: set_tid pins the innermost level only
    assert reap(init) == 0


# -- threads of one process on the knob path at once -------------------------------------


def test_a_thread_never_takes_or_drops_the_lock_another_thread_holds_on_the_c_knob_path(backend):
    # An at-fork hook can let the GIL go while a thread holds the pid lock in
    # the C knob path. Another thread's C knob path used to flock the same
    # description (a no-op: it is the same lock), find the first thread's
    # cursor record, and unlock it: a whole pinned fork then went through
    # inside the first thread's locked section.
    fork_exact(PID, mechanism="ns_last_pid")
    first = threading.get_ident()
    inside = {}
    other_done = threading.Event()
    outcome = {}

    def other_fork():
        try:
            child = idpin.fork(pid=PID + 50, mechanism="ns_last_pid")
            if child == 0:
                os._exit(0)
            outcome["child"] = child
        except BaseException as err:  # reported below
            outcome["error"] = err
        other_done.set()

    def before_fork():
        if threading.get_ident() == first and "done" not in inside:
            inside["thread"] = threading.Thread(target=other_fork)
            inside["thread"].start()
            # The other thread must wait for this one's lock: it cannot finish now.
            inside["done"] = other_done.wait(0.5)

    os.register_at_fork(before=before_fork)  # this test's process only
    child = idpin.fork(pid=PID + 10, mechanism="ns_last_pid")
    if child == 0:
        os._exit(0)
    inside["thread"].join(10)
    assert not inside["thread"].is_alive()
    assert (child, outcome.get("error"), outcome.get("child")) == (PID + 10, None, PID + 50)
    assert reap(child) == 0 and reap(PID + 50) == 0
    assert inside["done"] is False


# -- faults inside the C paths: SIGKILL, signal storms ------------------------------------


def reap_every_child():
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def knob_now():
    with open("/proc/sys/kernel/ns_last_pid") as f:
        return int(f.read())


@pytest.mark.parametrize("threads", [False, True], ids=["one-thread", "threads"])
def test_a_process_killed_at_random_inside_c_knob_path_forks_leaves_nothing_armed(backend, threads):
    import random
    import time

    from idpin import testing
    from idpin.interpose import ORIGINALS

    rnd = random.Random(9)
    record = pids.cursor_record_name(os.stat("/proc/self/ns/pid").st_ino)
    for round_ in range(12):
        base = 40000 + round_ * 2000
        ready_read, ready_write = os.pipe()
        worker = ORIGINALS["os.fork"]()
        if worker == 0:
            os.close(ready_read)
            if threads:
                threading.Thread(target=threading.Event().wait, daemon=True).start()
            for index in range(600):
                # Every third pid: the cursor a killed worker armed differs from the one it found.
                child = idpin.fork(pid=base + 3 * index, mechanism="ns_last_pid")
                if child == 0:
                    os._exit(0)
                if index == 0:
                    os.write(ready_write, b"r")
                os.waitpid(child, 0)
            os._exit(0)
        os.close(ready_write)
        os.read(ready_read, 1)
        os.close(ready_read)
        time.sleep(rnd.uniform(0, 0.008))
        os.kill(worker, signal.SIGKILL)
        reap_every_child()  # the worker, and its orphans (this process is their init)
        left = _sys.record_read(record)  # a read takes the message: put it back
        if left is not None:
            _sys.record_remove(record)
            _sys.record_write(record, left)
        assert testing.leftovers() == []  # takes the locks as the next idpin user would
        if left:  # killed with a cursor recorded: it was put back, or a fork consumed it
            previous, armed = (int(value) for value in left.split())
            assert knob_now() in (previous, armed + 1)
        fork_exact(base + 1999, mechanism="ns_last_pid")  # the next user gets exact pids


@pytest.mark.parametrize("mechanism", ["clone3", "ns_last_pid"])
def test_a_storm_of_raising_signals_during_c_path_forks_hands_out_only_exact_children(
        backend, mechanism):
    fork_exact(PID, mechanism=mechanism)  # arms the C path (Cython)
    got, interrupted = [], 0
    with raising_timer_storm() as inside:
        for pid in range(PID + 1, PID + 151):
            try:
                inside[0] = True
                child = idpin.fork(pid=pid, mechanism=mechanism)
                if child == 0:
                    os._exit(0 if os.getpid() == pid else 1)
                inside[0] = False
                got.append(child)
            except Tick:
                # Raised inside idpin.fork (its child undone) or just after it
                # returned (that child is this test's, lost: reaped below).
                inside[0] = False
                interrupted += 1
    assert got == sorted(set(got)) and all(PID < child <= PID + 150 for child in got)
    assert [reap(child) for child in got] == [0] * len(got)
    lost = []
    while True:
        try:
            lost.append(os.waitstatus_to_exitcode(os.waitpid(-1, 0)[1]))
        except ChildProcessError:
            break
    assert lost == [0] * len(lost)  # each ran as the pid it was forked for
    assert interrupted > 0 and len(got) > 0


def test_a_child_forked_by_another_thread_during_a_c_knob_fork_runs_its_signal_handlers(backend):
    # The main thread lets the GIL go in an at-fork hook inside the C knob
    # path (logging's hook waits for its lock, for one); another thread forks
    # then. Its child inherited "the main thread is inside idpin.fork" and
    # held every signal for good: its handlers never ran.
    import time

    fork_exact(PID, mechanism="ns_last_pid")
    main = threading.get_ident()
    go = threading.Event()
    forked = {}

    def fork_from_another_thread():
        go.wait(10)
        child = os.fork()
        if child == 0:
            ran = []
            signal.signal(signal.SIGUSR1, lambda signum, frame: ran.append(signum))
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(200):
                if ran:
                    break
                time.sleep(0.001)
            os._exit(0 if ran else 1)
        forked["child"] = child

    other = threading.Thread(target=fork_from_another_thread)
    other.start()

    def before_fork():
        if threading.get_ident() == main and not go.is_set():
            go.set()
            # The Python path holds the pid allocation mutex here, which the other
            # thread's fork waits for: there it forks only after this one.
            other.join(1)

    os.register_at_fork(before=before_fork)
    child = idpin.fork(pid=PID + 10, mechanism="ns_last_pid")
    if child == 0:
        os._exit(0)
    other.join(10)
    assert child == PID + 10 and reap(child) == 0
    assert reap(forked["child"]) == 0


# -- SysV IPC: create_many, the consuming record ------------------------------------------

MSG = (3 << 15) | 101
SEM = (5 << 15) | 202


def write_limit(name, value):
    with open("/proc/sys/kernel/" + name, "w") as f:  # this test's own IPC namespace
        f.write(value)


def read_limit(name):
    with open("/proc/sys/kernel/" + name) as f:
        return f.read().strip()


def ids_present(kind):
    with open("/proc/sysvipc/" + kind) as f:
        return {int(line.split()[1]): int(line.split()[0]) for line in f.readlines()[1:]}


def test_create_many_refuses_a_spec_whose_kind_is_unhashable_with_a_request_error(backend):
    # Its one-expression check of plain Specs looked the kind up in a dict first.
    from idpin import ipc

    for kind in (["sem"], {"sem": 1}):
        with pytest.raises(idpin.RequestError, match="kind"):
            ipc.create_many([ipc.Spec("msg", MSG), ipc.Spec(kind, SEM)])
    assert ids_present("msg") == {}


def test_create_many_stopped_by_a_full_namespace_midway_leaves_nothing(backend):
    from idpin import ipc

    write_limit("msgmni", "2")
    specs = [ipc.Spec("msg", MSG + n, key=0x5000 + n) for n in range(4)]
    with pytest.raises(idpin.UnsupportedError, match="msgmni"):
        ipc.create_many(specs)
    assert ids_present("msg") == {} and read_limit("msgmni") == "2"
    assert ipc.create_many(specs[:2]) == [MSG, MSG + 1]  # room for two: exact
    for spec in specs[:2]:
        ipc.remove("msg", spec.id)


def test_create_many_beside_a_foreign_creator_never_hands_out_a_wrong_object(backend):

    from idpin import ipc
    from idpin.interpose import ORIGINALS

    ready_read, ready_write = os.pipe()
    foreign = ORIGINALS["os.fork"]()
    if foreign == 0:  # creates and removes queues flat out, without idpin's lock
        os.write(ready_write, b"r")
        for _ in range(200000):
            _sys.ipc_remove(ipc.CODE["msg"], _sys.ipc_get(ipc.CODE["msg"], 0, 0, 0o600))
        os._exit(0)
    os.read(ready_read, 1)
    os.close(ready_read)
    os.close(ready_write)
    exact = busy = 0
    try:
        for round_ in range(60):
            specs = [ipc.Spec("msg", (round_ << 15) | (200 + n), key=0x6000 + n) for n in range(5)]
            try:
                got = ipc.create_many(specs)
            except idpin.IdBusyError:
                busy += 1
                continue
            assert got == [spec.id for spec in specs]
            present = ids_present("msg")
            # Each id holds this batch's object (its key), not the foreign one's.
            assert all(present.get(spec.id) == spec.key for spec in specs), present
            for spec in specs:
                ipc.remove("msg", spec.id)
            exact += 1
    finally:
        os.kill(foreign, signal.SIGKILL)
        reap(foreign)
    for id in ids_present("msg"):
        ipc.remove("msg", id)  # the foreign process's last queue, killed before removing it
    assert exact > 0 and all(_knob_idle(kind) for kind in ("sem", "shm", "msg"))


def _knob_idle(kind):
    return read_limit(kind + "_next_id") == "-1"


def test_a_holder_killed_at_random_while_consuming_a_knob_in_a_full_namespace_leaves_nothing(
        backend):
    import random
    import time

    from idpin import ipc, testing
    from idpin.interpose import ORIGINALS

    filler = ipc.msgget(0, 0o600)
    write_limit("msgmni", "1")  # full: consuming a knob needs the limit raised for a moment
    rnd = random.Random(7)
    for round_ in range(10):
        ready_read, ready_write = os.pipe()
        worker = ORIGINALS["os.fork"]()
        if worker == 0:
            os.close(ready_read)
            for n in range(2000):
                with idpin.request(msg=MSG + n):  # left unconsumed: the knob is consumed
                    pass
                if n == 0:
                    os.write(ready_write, b"r")
            os._exit(0)
        os.close(ready_write)
        os.read(ready_read, 1)
        os.close(ready_read)
        time.sleep(rnd.uniform(0, 0.01))
        os.kill(worker, signal.SIGKILL)
        reap(worker)
        with ipc.ipc_lock().held():  # the next idpin user: undoes what the worker left
            pass
        assert testing.leftovers() == ["msg objects with ids %d" % filler]
        assert read_limit("msgmni") == "1" and _knob_idle("msg")
        assert list(ids_present("msg")) == [filler]
    ipc.remove("msg", filler)


# -- running out of fds around the first fork (the one that arms the C path) -------------


def fork_with_fds_left(mechanism, free):
    """In a fresh child with only ``free`` fds left: idpin.fork's outcome, and whether a
    child with the pid exists when it raised."""
    import resource

    from idpin.interpose import ORIGINALS

    read_end, write_end = os.pipe()
    tester = ORIGINALS["os.fork"]()
    if tester == 0:
        os.close(read_end)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        fillers = []
        try:
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        for fd in fillers[len(fillers) - free:] if free else []:
            os.close(fd)
        try:
            child = idpin.fork(pid=PID + 70, mechanism=mechanism)
            if child == 0:
                os._exit(0)
            outcome = b"ok" if child == PID + 70 and reap(child) == 0 else b"wrong"
        except OSError:
            outcome = b"raised, no child"
            if pids.pid_in_use(PID + 70):
                outcome = b"raised, child left"
                reap(PID + 70)
        os.write(write_end, outcome)
        os._exit(0)
    os.close(write_end)
    outcome = os.read(read_end, 100).decode()
    os.close(read_end)
    assert reap(tester) == 0
    return outcome


@pytest.mark.parametrize("mechanism", [None, "ns_last_pid"])
def test_a_fork_that_runs_out_of_fds_while_arming_the_c_path_is_not_an_error(backend, mechanism):
    # Arming the C path opens fds after the fork was made: an EMFILE there
    # was raised to the caller while the child ran on.
    outcomes = [fork_with_fds_left(mechanism, free) for free in range(6)]
    assert "raised, child left" not in outcomes and "wrong" not in outcomes, outcomes
    assert outcomes[-1] == "ok"


# -- a forked child: lazy forgetting, exec ----------------------------------------------


def test_a_child_forked_inside_a_tid_block_uses_idpin_from_several_threads_at_once(backend):
    fork_exact(PID, mechanism="ns_last_pid")  # the parent's state: paths armed, fds cached
    results_read, results_write = os.pipe()
    with idpin.request(tid=PID + 400):  # holds the pid lock, ns_last_pid armed for the tid
        child = os.fork()
        if child == 0:
            os.close(results_read)

            together = threading.Barrier(4)

            def work(index):
                try:
                    together.wait(10)  # every thread made (a tid each) before any fork
                    grandchild = idpin.fork(pid=PID + 500 + index)
                    if grandchild == 0:
                        os._exit(0)
                    sem = (1 << 15) | (300 + index)  # an index each: only one object per index
                    with idpin.request(sem=sem):
                        got = idpin.ipc.semget(idpin.ipc.IPC_PRIVATE, 1, 0o600)
                    idpin.ipc.remove("sem", got)
                    ok = grandchild == PID + 500 + index and reap(grandchild) == 0 and got == sem
                except BaseException:
                    ok = False
                os.write(results_write, b"1" if ok else b"0")

            workers = [threading.Thread(target=work, args=(n,)) for n in range(4)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(20)
            os._exit(0)
        # The child's forks wait for this block (its parent's) to end.
        started = threading.Thread(target=lambda: None)
        started.start()
        started.join()
    os.close(results_write)
    results = b""
    while len(results) < 4:
        chunk = os.read(results_read, 4)
        if not chunk:
            break
        results += chunk
    os.close(results_read)
    assert reap(child) == 0
    assert started.native_id == PID + 400 and results == b"1111"


# Exits 1 if it holds an fd of the kind idpin keeps (namespace files, /proc files,
# POSIX queues); the test harness's own inherited fds are neither.
EXEC_CHECKS_FDS = """
import os, sys
targets = []
for fd in os.listdir("/proc/self/fd"):
    try:
        targets.append(os.readlink("/proc/self/fd/" + fd))
    except OSError:
        pass  # the listing's own fd, closed by now
sys.exit(1 if any(t.startswith(("pid:", "ipc:", "/proc/", "/dev/mqueue")) for t in targets) else 0)
"""


def test_a_child_of_the_c_path_that_execs_keeps_no_fd_of_idpins(backend):
    import sys

    fork_exact(PID, mechanism="ns_last_pid")  # both paths armed, idpin's fds open
    with idpin.request(msg=(2 << 15) | 9):
        pass
    with second_thread():
        child = idpin.fork(pid=PID + 10)  # the C knob path, with a thread beside it
        if child == 0:
            os.execv(sys.executable, [sys.executable, "-c", EXEC_CHECKS_FDS])
    assert child == PID + 10 and reap(child) == 0


def test_threads_forking_on_the_c_knob_path_beside_a_thread_making_tid_blocks_all_get_exact_ids(
        backend):
    fork_exact(PID, mechanism="ns_last_pid")  # armed (Cython): the threads below use it
    errors, tids = [], []
    together = threading.Barrier(3)  # every thread made (a tid each) before any allocation

    def forker(base):
        try:
            together.wait(10)
            for pid in range(base, base + 40):
                child = idpin.fork(pid=pid)
                if child == 0:
                    os._exit(0 if os.getpid() == pid else 1)
                if child != pid or reap(child) != 0:
                    errors.append((pid, child))
        except BaseException as err:
            errors.append(repr(err))

    def tid_maker():
        try:
            together.wait(10)
            for tid in range(PID + 3000, PID + 3040):
                with idpin.request(tid=tid):
                    started = threading.Thread(target=lambda: None)
                    started.start()
                started.join()
                tids.append(started.native_id == tid)
        except BaseException as err:
            errors.append(repr(err))

    # Ranges far apart: each thread's allocations move the cursor past its own only.
    workers = [threading.Thread(target=forker, args=(PID + 1000,)),
               threading.Thread(target=forker, args=(PID + 2000,)),
               threading.Thread(target=tid_maker)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not any(worker.is_alive() for worker in workers)
    assert errors == [] and tids == [True] * 40


def test_a_storm_of_raising_signals_during_create_many_leaves_all_or_nothing(backend):
    from idpin import ipc

    made = interrupted = 0
    with raising_timer_storm() as inside:
        for round_ in range(150):
            specs = [ipc.Spec(("sem", "shm", "msg")[n % 3], (round_ % 60 << 15) | (400 + n),
                              key=0x7000 + n) for n in range(6)]
            try:
                inside[0] = True
                got = ipc.create_many(specs)
                inside[0] = False
                assert got == [spec.id for spec in specs]
                made += 1
            except Tick:
                inside[0] = False
                interrupted += 1
            # Either the whole batch exists (made, or interrupted just after it
            # returned) or none of it: never a part.
            present = [spec.id in ids_present(spec.kind) for spec in specs]
            assert present in ([True] * 6, [False] * 6), present
            if present[0]:
                for spec in specs:
                    ipc.remove(spec.kind, spec.id)
    assert made > 0 and interrupted > 0
    assert all(_knob_idle(kind) for kind in ("sem", "shm", "msg"))


def test_a_raised_pid_max_after_arming_gives_the_new_range_exactly(backend):
    with open("/proc/sys/kernel/pid_max", "w") as f:
        f.write(str(PID + 100))  # this test's own pid namespace
    fork_exact(PID)  # armed with the lowered pid_max
    fork_exact(PID + 1, mechanism="ns_last_pid")
    with open("/proc/sys/kernel/pid_max", "w") as f:
        f.write(str(PID + 1000))
    fork_exact(PID + 500)  # above the pid_max the C path was armed with
    fork_exact(PID + 501, mechanism="ns_last_pid")
    with second_thread():  # takes the pid after the cursor: stay clear of it
        fork_exact(PID + 510)
