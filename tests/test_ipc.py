import errno
import os
import signal
import threading

import pytest
import sysv_ipc

import idpin
from idpin import ipc

from helpers import as_root_and_nobody, knob, reap, run_workers

SEM, SHM, MSG = (1 << 15) | 7, (2 << 15) | 9, (3 << 15) | 11


def remove_all(**ids):
    for kind, id in ids.items():
        ipc.remove(kind, id)


@as_root_and_nobody
def test_routed_creations_get_the_ids(uid):
    with idpin.request(sem=SEM, shm=SHM, msg=MSG) as req:
        got = dict(
            sem=ipc.semget(ipc.IPC_PRIVATE, 3, 0o600),
            shm=ipc.shmget(ipc.IPC_PRIVATE, 4096, 0o600),
            msg=ipc.msgget(ipc.IPC_PRIVATE, 0o600),
        )
    assert got == dict(sem=SEM, shm=SHM, msg=MSG) == req.consumed
    assert all(knob(k + "_next_id") == -1 for k in ipc.KINDS)
    remove_all(**got)


@as_root_and_nobody
def test_sysv_ipc_creations_honour_the_request(uid):
    with idpin.request(sem=SEM, shm=SHM, msg=MSG) as req:
        sem = sysv_ipc.Semaphore(None, sysv_ipc.IPC_CREX)
        shm = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, size=4096)
        msg = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX)
    assert (sem.id, shm.id, msg.id) == (SEM, SHM, MSG)
    assert req.consumed == dict(sem=SEM, shm=SHM, msg=MSG)
    shm.detach()
    for obj in (sem, shm, msg):
        obj.remove()


@pytest.mark.parametrize("kind", ipc.KINDS)
def test_busy_id_raises_when_the_block_starts(kind):
    holder = ipc._sys.ipc_get(ipc.CODE[kind], ipc.IPC_PRIVATE, 1, ipc.IPC_CREAT | 0o600)
    same_index = holder + (5 << 15)  # another seq, the same index
    try:
        with pytest.raises(idpin.IdBusyError) as info:
            with idpin.request(**{kind: same_index}):
                pytest.fail("the block must not run")
        assert (info.value.kind, info.value.id, info.value.errno) == (kind, same_index, 16)
        assert knob(ipc.KNOB[kind]) == -1
    finally:
        ipc.remove(kind, holder)


@pytest.mark.parametrize("kind", ipc.KINDS)
def test_unconsumed_request_leaves_no_knob_armed(kind):
    with idpin.request(**{kind: 4242}) as req:
        assert knob(ipc.KNOB[kind]) == 4242
    assert knob(ipc.KNOB[kind]) == -1 and req.consumed == {}
    # ... and the id was not left taken by the throwaway either.
    assert ipc._holder(kind, 4242) == -1


def test_routed_creation_of_an_index_taken_meanwhile_is_refused_before_creating():
    # A process outside idpin's lock takes the index after the block was
    # entered: the routed creation checks again and creates nothing.
    with pytest.raises(idpin.IdBusyError, match="no object created during the block has the id"):
        with idpin.request(sem=SEM) as req:
            intruder = ipc._sys.ipc_get(ipc._sys.SEM, ipc.IPC_PRIVATE, 1, ipc.IPC_CREAT | 0o600)
            assert intruder == SEM  # it consumed the armed knob
            with pytest.raises(idpin.IdBusyError, match="held by sem id %d" % SEM):
                ipc.semget(ipc.IPC_PRIVATE, 1, 0o600)
            ipc.remove("sem", intruder)
            assert ipc._holder("sem", SEM + 1) == -1
    assert req.consumed == {}


def test_a_wrongly_numbered_pinned_creation_is_removed_by_the_backend():
    # The kernel silently gives the next free index when the asked one is
    # taken: the backend's one-step creation removes that object again.
    ns = ipc.ipc_lock()
    with ns.held():
        taken = ipc._sys.ipc_get(ipc._sys.SEM, ipc.IPC_PRIVATE, 1, ipc.IPC_CREAT | 0o600)
        got = ipc._sys.ipc_create_pinned(ns.knob("sem_next_id"), ipc._sys.SEM, taken,
                                         ipc.IPC_PRIVATE, 1, ipc.IPC_CREAT | 0o600)
    assert got != taken and ipc._holder("sem", got) == -1
    ipc.remove("sem", taken)


def test_foreign_creation_that_missed_is_reported_at_block_exit():
    with pytest.raises(idpin.IdBusyError, match="sem_next_id"):
        with idpin.request(sem=SEM):
            # Another tool consumes the knob with its own value.
            with open("/proc/sys/kernel/sem_next_id", "w") as f:
                f.write("12")
            other = sysv_ipc.Semaphore(None, sysv_ipc.IPC_CREX)
            assert other.id == 12
            other.remove()
    assert knob("sem_next_id") == -1


def test_unrouted_creation_cannot_be_credited_when_another_process_took_the_knob():
    with pytest.raises(idpin.IdBusyError, match="cannot tell which one") as info:
        with idpin.request(sem=SEM) as req:
            other = os.fork()
            if other == 0:  # a process outside idpin creates first
                sysv_ipc.Semaphore(None, sysv_ipc.IPC_CREX)
                os._exit(0)
            reap(other)
            mine = sysv_ipc.Semaphore(None, sysv_ipc.IPC_CREX)
    assert mine.id != SEM and req.consumed == {} and info.value.id == SEM
    mine.remove()
    ipc.remove("sem", SEM)


def test_unrouted_shm_is_credited_by_its_creator_pid():
    with idpin.request(shm=SHM) as req:
        mine = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, size=4096)
    assert mine.id == SHM and req.consumed == {"shm": SHM}
    mine.detach()
    mine.remove()


def test_two_unrouted_creations_in_a_block_are_not_credited():
    # Another thread could have made either: which one consumed the knob
    # cannot be proven, so the block says so instead of guessing.
    with pytest.raises(idpin.IdBusyError, match="cannot tell which one"):
        with idpin.request(shm=SHM) as req:
            mine = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, size=4096)
            second = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, size=4096)
    assert mine.id == SHM and second.id != SHM and req.consumed == {}
    for segment in (mine, second):
        segment.detach()
        segment.remove()


def test_full_namespace_still_leaves_no_knob_armed():
    with open("/proc/sys/kernel/msgmni", "w") as f:
        f.write("1")
    queue = ipc.msgget(ipc.IPC_PRIVATE, 0o600)  # the namespace is now full
    with idpin.request(msg=MSG) as req:
        with pytest.raises(idpin.UnsupportedError, match="msgmni"):
            ipc.msgget(ipc.IPC_PRIVATE, 0o600)
    assert knob("msg_next_id") == -1 and req.consumed == {}
    with open("/proc/sys/kernel/msgmni") as f:
        assert f.read().strip() == "1"  # the limit was put back
    ipc.remove("msg", queue)
    assert ipc.msgget(ipc.IPC_PRIVATE, 0o600) != MSG  # nothing left to hijack it
    ipc.remove("msg", knob_id_of_last_queue())


def knob_id_of_last_queue():
    with open("/proc/sysvipc/msg") as f:
        return int(f.readlines()[-1].split()[1])


def test_create_many_inside_a_block_keeps_the_blocks_knob_armed():
    with idpin.request(sem=SEM) as req:
        assert ipc.create_many([("sem", SEM + 1), ("shm", SHM)]) == [SEM + 1, SHM]
        assert knob("sem_next_id") == SEM
        assert ipc.semget(ipc.IPC_PRIVATE, 1, 0o600) == SEM
    assert req.consumed == {"sem": SEM}
    remove_all(shm=SHM)
    ipc.remove("sem", SEM), ipc.remove("sem", SEM + 1)


@pytest.mark.parametrize("call, match", [
    (lambda: ipc.semget(None, 1, 0o600), "key must be an int"),
    (lambda: ipc.semget(0, 2**32 + 2, 0o600), "nsems must be an int in 0..2147483647"),
    (lambda: ipc.shmget(0, -1, 0o600), "size must be"),
    (lambda: ipc.msgget(0, "0600"), "flags must be an int"),
    (lambda: ipc.semget(True, 1, 0o600), "key"),
])
def test_bad_c_arguments_are_refused_before_anything_happens(call, match):
    with idpin.request(sem=SEM, msg=MSG) as req:
        with pytest.raises(idpin.RequestError, match=match):
            call()
        assert knob("sem_next_id") == SEM and knob("msg_next_id") == MSG
    assert req.consumed == {}


def test_a_stale_knob_is_consumed_by_the_next_lock_holder():
    # As if a holder had died mid-block: the knob is armed, nobody holds the lock.
    with open("/proc/sys/kernel/msg_next_id", "w") as f:
        f.write("999")
    with idpin.request(sem=SEM):
        assert knob("msg_next_id") == -1
        sem = ipc.semget(ipc.IPC_PRIVATE, 1, 0o600)
    plain = ipc.msgget(ipc.IPC_PRIVATE, 0o600)
    assert plain != 999  # not hijacked
    remove_all(sem=sem, msg=plain)


def test_a_holder_killed_mid_block_leaves_no_knob_that_hijacks_later():
    ready_read, ready_write = os.pipe()
    holder = os.fork()
    if holder == 0:
        with idpin.request(msg=MSG):
            os.write(ready_write, b"1")
            os.read(os.pipe()[0], 1)  # killed here: lock held, knob armed
    os.read(ready_read, 1)
    os.kill(holder, signal.SIGKILL)
    reap(holder)
    os.close(ready_read), os.close(ready_write)
    assert knob("msg_next_id") == MSG  # the kernel keeps it; the flock died with the holder
    with idpin.request(shm=SHM):
        assert knob("msg_next_id") == -1  # the next lock holder consumed it
        segment = ipc.shmget(ipc.IPC_PRIVATE, 64, 0o600)
    unrelated = ipc.msgget(ipc.IPC_PRIVATE, 0o600)
    assert unrelated != MSG and ipc._holder("msg", MSG) in (-1, unrelated)
    remove_all(shm=segment, msg=unrelated)


def test_key_lookup_is_not_an_allocation():
    existing = ipc.semget(0x1234, 2, ipc.IPC_CREAT | 0o600)
    with idpin.request(sem=SEM) as req:
        assert ipc.semget(0x1234, 2, ipc.IPC_CREAT | 0o600) == existing
        assert req.consumed == {}
        assert ipc.semget(0x5678, 2, ipc.IPC_CREAT | 0o600) == SEM
    remove_all(sem=existing)
    ipc.remove("sem", SEM)


def test_excl_creation_of_an_existing_key_fails_and_keeps_the_request():
    existing = ipc.msgget(0x4321, ipc.IPC_CREAT | 0o600)
    with idpin.request(msg=MSG) as req:
        with pytest.raises(FileExistsError):
            ipc.msgget(0x4321, ipc.IPC_CREAT | ipc.IPC_EXCL | 0o600)
        assert knob("msg_next_id") == MSG
    assert req.consumed == {} and knob("msg_next_id") == -1
    ipc.remove("msg", existing)


def test_nested_requests_rearm_the_outer_id():
    with idpin.request(sem=SEM) as outer:
        with idpin.request(sem=SEM + 1) as inner:
            a = ipc.semget(ipc.IPC_PRIVATE, 1, 0o600)
        assert knob("sem_next_id") == SEM
        b = ipc.semget(ipc.IPC_PRIVATE, 1, 0o600)
    assert (a, b) == (SEM + 1, SEM)
    assert inner.consumed == {"sem": SEM + 1} and outer.consumed == {"sem": SEM}
    remove_all(sem=a)
    ipc.remove("sem", b)


def test_other_threads_routed_creations_do_not_take_the_armed_knob():
    armed, done = threading.Event(), threading.Event()
    got = {}

    def worker():
        with idpin.request(shm=SHM):
            armed.set()
            done.wait(10)
            got["worker"] = ipc.shmget(ipc.IPC_PRIVATE, 4096, 0o600)

    thread = threading.Thread(target=worker)
    thread.start()
    assert armed.wait(10)
    creator = threading.Thread(target=lambda: got.update(main=ipc.shmget(ipc.IPC_PRIVATE, 4096, 0o600)))
    creator.start()  # blocks on the in-process lock until the worker's block ends
    done.set()
    thread.join()
    creator.join()
    assert got["worker"] == SHM and got["main"] != SHM
    remove_all(shm=got["worker"])
    ipc.remove("shm", got["main"])


def test_create_many_all_or_nothing():
    specs = [ipc.Spec("sem", SEM, size=4), ("shm", SHM, ipc.IPC_PRIVATE, 8192),
             dict(kind="msg", id=MSG, mode=0o640)]
    assert ipc.create_many(specs) == [SEM, SHM, MSG]
    with pytest.raises(idpin.IdBusyError) as info:
        ipc.create_many([("msg", MSG + 1), ("sem", SEM + (1 << 15))])  # index of SEM is taken
    assert info.value.id == SEM + (1 << 15)
    assert ipc._holder("msg", MSG + 1) == -1
    remove_all(sem=SEM, shm=SHM, msg=MSG)


def test_create_many_rolls_back_on_a_late_failure():
    key = 0x7777
    taken = ipc.semget(key, 1, ipc.IPC_CREAT | 0o600)
    with pytest.raises(FileExistsError):
        ipc.create_many([("msg", MSG), ("shm", SHM), ("sem", SEM, key)])
    assert ipc._holder("msg", MSG) == -1 and ipc._holder("shm", SHM) == -1
    assert all(knob(k + "_next_id") == -1 for k in ipc.KINDS)
    ipc.remove("sem", taken)


def test_create_many_refuses_bad_specs_before_creating_anything():
    with pytest.raises(idpin.RequestError, match="share index"):
        ipc.create_many([("sem", 5), ("sem", 5 + (1 << 15))])
    with pytest.raises(idpin.RequestError, match="kind"):
        ipc.create_many([("sock", 5)])
    with pytest.raises(idpin.RequestError, match="mode"):
        ipc.create_many([("sem", 5, 0, 1, 0o4777)])


def test_two_workers_create_500_objects_each_with_no_wrong_id():
    kinds = ipc.KINDS

    def work(index):
        created = []
        for n in range(500):
            kind = kinds[n % 3]
            want = (index * 600 + n) | ((n % 7) << 15)
            with idpin.request(**{kind: want}):
                creator = {"sem": lambda: ipc.semget(0, 1, 0o600),
                           "shm": lambda: ipc.shmget(0, 64, 0o600),
                           "msg": lambda: ipc.msgget(0, 0o600)}[kind]
                got = creator()
            assert got == want, (kind, got, want)
            created.append((kind, got))
        return created

    for created in run_workers(work, 2):
        assert len(created) == 500
        for kind, id in created:
            ipc.remove(kind, id)


def test_message_queue_checkpoint_restore_round_trip():
    # As the kernel's msgque selftest does: dump, delete, re-create with the
    # same key and id, re-send, compare.
    key = 0x51CE
    queue = sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=0o600)
    sent = [(b"first", 1), (b"second message", 2), (bytes(range(256)), 3)]
    for body, mtype in sent:
        queue.send(body, type=mtype)
    saved_id, saved_mode = queue.id, queue.mode
    dumped = [queue.receive() for _ in sent]
    queue.remove()
    with idpin.request(msg=saved_id):
        restored = sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=saved_mode)
    assert (restored.id, restored.key, restored.mode) == (saved_id, key, saved_mode)
    for body, mtype in dumped:
        restored.send(body, type=mtype)
    assert [restored.receive() for _ in sent] == dumped == sent
    restored.remove()
