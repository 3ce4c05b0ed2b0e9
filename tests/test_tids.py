import _thread
import os
import threading

import pytest

import idpin

from helpers import as_root_and_nobody, knob, wait_until


def start_and_join(thread):
    thread.start()
    thread.join()
    return thread.native_id


@as_root_and_nobody
def test_thread_start_in_a_request_gets_the_tid(uid):
    seen = []
    with idpin.request(tid=4321) as req:
        thread = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
        assert start_and_join(thread) == 4321
    assert seen == [4321] and req.consumed == {"tid": 4321}


def test_busy_tid_raises_before_starting_anything():
    ran = []
    with idpin.request(tid=os.getpid()) as req:
        with pytest.raises(idpin.IdBusyError) as info:
            threading.Thread(target=ran.append, args=(1,)).start()
    assert (info.value.kind, info.value.id) == ("tid", 1)
    assert ran == [] and req.consumed == {}


def test_tid_request_is_one_shot_and_per_thread():
    with idpin.request(tid=5000):
        first = start_and_join(threading.Thread(target=lambda: None))
        second = start_and_join(threading.Thread(target=lambda: None))
    assert first == 5000 and second != 5000


def test_thread_created_outside_threading_honours_the_armed_knob():
    # _thread.start_new_thread is a pthread_create idpin does not route.
    done = threading.Event()
    seen = []

    def body():
        seen.append(threading.get_native_id())
        done.set()

    with idpin.request(tid=5100):
        assert knob("ns_last_pid") == 5099
        _thread.start_new_thread(body, ())
        assert done.wait(10)
        assert wait_until(lambda: not os.path.exists("/proc/self/task/5100"))
    assert seen == [5100]


def test_thread_created_outside_threading_is_verified_at_block_exit():
    stop = threading.Event()
    with pytest.raises(idpin.IdBusyError, match="outside threading.Thread"):
        with idpin.request(tid=5200):
            # Something else takes the knob first, so the raw thread gets 5201.
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write("5200")
            _thread.start_new_thread(stop.wait, (10,))
    stop.set()
    assert wait_until(lambda: len(os.listdir("/proc/self/task")) == 1)


def test_leaving_the_block_releases_the_pid_lock():
    with idpin.request(tid=5300):
        pass
    assert not idpin.knobs.any_held()
