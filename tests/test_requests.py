"""Bad input gets a RequestError naming the kind and range, before any side effect."""
import threading

import pytest
from hypothesis import given, strategies as st

import idpin
from idpin import ipc

from helpers import knob

INT_MAX = 2**31 - 1


def knob_state():
    return {name: knob(name) for name in ("ns_last_pid", "sem_next_id", "shm_next_id", "msg_next_id")}


def pid_max():
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read())


def assert_refused(kind, value, match=None):
    before = knob_state()
    with pytest.raises(idpin.RequestError, match=match) as info:
        idpin.request(**{kind: value})
    assert knob_state() == before
    assert info.value.kind == kind
    assert isinstance(info.value, ValueError) and isinstance(info.value, idpin.IdpinError)
    return info.value


@given(st.one_of(st.integers(max_value=0), st.integers(min_value=4194304)))
def test_pid_out_of_range(value):
    err = assert_refused("pid", value)
    assert "1..%d" % (pid_max() - 1) in str(err)


@given(st.one_of(st.integers(max_value=0), st.integers(min_value=4194304)))
def test_tid_out_of_range(value):
    assert_refused("tid", value, match="tid")


@given(st.sampled_from(ipc.KINDS),
       st.one_of(st.integers(max_value=-1), st.integers(min_value=INT_MAX + 1)))
def test_ipc_id_out_of_range(kind, value):
    err = assert_refused(kind, value)
    assert "0..%d" % INT_MAX in str(err) and "index" in str(err)


@given(st.sampled_from(["pid", "tid", "sem", "shm", "msg", "pty"]),
       st.one_of(st.booleans(), st.floats(), st.text(max_size=3), st.lists(st.integers(), max_size=2)))
def test_wrong_types(kind, value):
    assert_refused(kind, value, match="must be an int")


def test_pty_above_the_instance_maximum():
    with open("/proc/sys/kernel/pty/max") as f:
        highest = int(f.read()) - 1
    assert_refused("pty", highest + 1, match="0..%d" % highest)
    assert_refused("pty", -1)


def test_pid_tuples():
    assert_refused("pid", (), match="1..32 entries")
    assert_refused("pid", tuple(range(1, 34)), match="1..32 entries")
    assert_refused("pid", (5, 0))
    assert_refused("pid", (5, True), match="must be an int")


def test_unknown_kind():
    with pytest.raises(idpin.RequestError, match="unknown kind 'uid'.*pid, tid, sem, shm, msg, pty"):
        idpin.request(uid=5)


def test_valid_requests_are_accepted_without_side_effects():
    before = knob_state()
    req = idpin.request(pid=(1, 2), tid=3, sem=INT_MAX, shm=0, msg=None, pty=0)
    assert req.ids == {"pid": (1, 2), "tid": 3, "sem": INT_MAX, "shm": 0, "pty": 0}
    assert knob_state() == before


def test_a_request_object_is_entered_once():
    req = idpin.request(pid=9000)
    with req:
        pass
    with pytest.raises(RuntimeError, match="one-shot"):
        with req:
            pass


def test_requests_in_other_threads_are_independent():
    from idpin.request import pending

    seen = []
    with idpin.request(pid=4100):
        assert pending("pid")[1] == 4100
        thread = threading.Thread(target=lambda: seen.append(pending("pid")))
        thread.start()
        thread.join()
    assert seen == [None] and pending("pid") is None
