"""Blocks, threads and forked children sharing one namespace's knobs."""
import os
import threading

import pytest
import sysv_ipc

import idpin
from idpin import _sys, ipc, knobs
from idpin import pty as idpin_pty

from helpers import knob, reap, wait_until

SEM = (1 << 15) | 21


def semget_in_thread(result):
    thread = threading.Thread(target=lambda: result.append(ipc.semget(ipc.IPC_PRIVATE, 1, 0o600)))
    thread.start()
    return thread


def test_a_block_whose_exit_raised_leaves_nothing_armed():
    with pytest.raises(idpin.IdBusyError):
        with idpin.request(sem=SEM):
            with open("/proc/sys/kernel/sem_next_id", "w") as f:
                f.write("12")  # a tool outside idpin takes over the knob
    assert not knobs.any_armed() and knob("sem_next_id") == -1
    got = []
    semget_in_thread(got).join(10)
    assert len(got) == 1  # an unpinned creation does not wait for a dead block
    ipc.remove("sem", got[0])


def test_a_nested_block_refused_at_entry_keeps_the_outer_one_armed():
    holder = ipc.semget(ipc.IPC_PRIVATE, 1, 0o600)
    with idpin.request(sem=SEM) as outer:
        with pytest.raises(idpin.IdBusyError):
            with idpin.request(sem=holder):
                pass
        got = []
        other = semget_in_thread(got)  # must wait: the outer knob is still armed
        assert not wait_until(lambda: got, timeout=0.3)
        mine = ipc.semget(ipc.IPC_PRIVATE, 1, 0o600)
    other.join(10)
    assert mine == SEM and outer.consumed == {"sem": SEM} and got[0] != SEM
    for id in (holder, mine, got[0]):
        ipc.remove("sem", id)


def test_routed_creations_are_left_out_when_crediting_an_unrouted_one():
    with idpin.request(sem=SEM) as req:
        ipc.create_many([("sem", SEM + 1), ("msg", 3)])
        foreign = sysv_ipc.Semaphore(None, sysv_ipc.IPC_CREX)
    assert foreign.id == SEM and req.consumed == {"sem": SEM}
    foreign.remove()
    ipc.remove("sem", SEM + 1), ipc.remove("msg", 3)


def test_threads_other_threads_start_do_not_count_against_a_tid_block():
    stop = threading.Event()
    started = []

    def keep_starting():
        while not stop.is_set() and len(started) < 200:
            thread = threading.Thread(target=lambda: None)
            thread.start()
            started.append(thread)
            thread.join()

    starter = threading.Thread(target=keep_starting)
    starter.start()
    try:
        assert wait_until(lambda: started)
        for tid in range(6000, 6400, 2):  # until the starter has run beside enough blocks
            with idpin.request(tid=tid) as req:
                pass  # no thread of its own: nothing to credit, nothing wrong
            assert req.consumed == {}
            if len(started) >= 50:
                break
    finally:
        stop.set()
        starter.join()
    # The starter ran beside the blocks; its threads were steered, not
    # counted (a thread that took an armed tid would have been credited).
    assert started


def test_a_child_forked_in_a_block_waits_for_it_instead_of_taking_its_id():
    ready_read, ready_write = os.pipe()
    with idpin.request(sem=SEM) as req:
        child = os.fork()
        if child == 0:
            os.write(ready_write, b"1")
            got = ipc.semget(ipc.IPC_PRIVATE, 1, 0o600)  # waits for the parent's block
            os._exit(0 if got != SEM else 1)
        os.read(ready_read, 1)
        assert wait_until(lambda: _waiting_on_a_lock(child), timeout=10)
    assert reap(child) == 0 and req.consumed == {}
    os.close(ready_read), os.close(ready_write)
    for line in open("/proc/sysvipc/sem").readlines()[1:]:
        ipc.remove("sem", int(line.split()[1]))


def _waiting_on_a_lock(pid):
    """Whether ``pid`` is in idpin's lock wait: flock, or the sleep between LOCK_NB tries."""
    with open("/proc/%d/syscall" % pid) as f:
        number = f.read().split()[0]
    # x86-64: flock 73, nanosleep 35, clock_nanosleep 230; and no sem was made meanwhile.
    return number in ("73", "35", "230") and len(open("/proc/sysvipc/sem").readlines()) == 1


def test_a_new_devpts_instance_at_another_path_gets_its_own_lock(tmp_path):
    for name in ("a", "b"):
        root = tmp_path / name
        root.mkdir()
        _sys.mount("devpts", str(root), "devpts", 0, "newinstance,ptmxmode=0666")
        pairs = idpin_pty.open_many([1], ptmx=str(root / "ptmx"))
        assert _sys.pty_index(pairs[1][0]) == 1 and sorted(os.listdir(root)) == ["1", "ptmx"]
        os.close(pairs[1][0]), os.close(pairs[1][1])
        assert os.system("umount %s" % root) == 0
        root.rmdir()


def test_create_many_refuses_out_of_range_c_arguments():
    with pytest.raises(idpin.RequestError, match="key"):
        ipc.create_many([ipc.Spec("sem", SEM, key=2**32 + 5)])
    with pytest.raises(idpin.RequestError, match="size"):
        ipc.create_many([ipc.Spec("shm", SEM, size=2**64 + 4096)])


@pytest.mark.parametrize("fork", [os.fork, os.forkpty, __import__("pty").fork],
                         ids=["os.fork", "os.forkpty", "pty.fork"])
def test_unpinned_forks_of_every_kind_are_steered_past_another_threads_tid(fork):
    armed, forked = threading.Event(), threading.Event()
    got = {}

    def block_owner():
        with idpin.request(tid=500):
            armed.set()
            forked.wait(10)
            thread = threading.Thread(target=lambda: None)
            thread.start()
            thread.join()
            got["tid"] = thread.native_id

    owner = threading.Thread(target=block_owner)
    owner.start()
    assert armed.wait(10)
    result = fork()
    child = result if isinstance(result, int) else result[0]
    if child == 0:
        os._exit(0)
    forked.set()
    owner.join(10)
    reap(child)
    if not isinstance(result, int):
        os.close(result[1])
    assert child != 500 and got == {"tid": 500}


def test_nested_tid_blocks_do_not_blame_the_outer_for_the_inner_thread():
    import _thread

    done = threading.Event()
    with idpin.request(tid=600) as outer:
        with idpin.request(tid=700) as inner:
            _thread.start_new_thread(lambda: done.wait(10), ())
            assert wait_until(lambda: os.path.exists("/proc/self/task/700"))
    done.set()
    assert inner.consumed == {"tid": 700} and outer.consumed == {}
    assert wait_until(lambda: len(os.listdir("/proc/self/task")) == 1)
