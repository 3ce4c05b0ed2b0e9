"""Signal handlers never run inside idpin (idpin.signals; issue 7, item 3).

A signal that arrives while idpin runs is held and its handler runs at the
door the call leaves by. These tests make a signal arrive at a chosen step
inside idpin (an at-fork hook, or a step function wrapped for the test, both
called from idpin's frames) and check where the handler ran, what the call
left and what it returned.
"""
import contextlib
import os
import signal
import subprocess
import sys

import pytest

import idpin
from idpin import ipc, knobs, pids, pty, signals, tids
from idpin.interpose import ORIGINALS
from idpin.request import pending

from helpers import flock_held_elsewhere, reap

PID = 31001
TID = 31011
SEM = (3 << 15) | 21
PTY = 4
IDPIN_FILES = {os.path.abspath(m.__file__) for m in (ipc, knobs, pids, pty, tids)}


class Boom(Exception):
    pass


@contextlib.contextmanager
def handler_on_sigusr1(raises):
    """A SIGUSR1 handler; yields the list of the stacks (file names) it ran on."""
    ran = []

    def handler(signum, frame):
        stack, caller = [], sys._getframe(1)
        while caller is not None:
            stack.append(os.path.abspath(caller.f_code.co_filename))
            caller = caller.f_back
        ran.append(stack)
        if raises:
            raise Boom("handler")

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        yield ran
    finally:
        signal.signal(signal.SIGUSR1, previous)


def ran_outside_idpin(stack):
    return not IDPIN_FILES & set(stack)


@contextlib.contextmanager
def signal_during(owner, name):
    """Make ``owner.name`` (a step idpin calls) raise SIGUSR1 the first time it runs."""
    original = getattr(owner, name)
    raised = []

    def step(*args, **kwargs):
        if not raised:
            raised.append(True)
            signal.raise_signal(signal.SIGUSR1)
        return original(*args, **kwargs)

    setattr(owner, name, step)
    try:
        yield
    finally:
        setattr(owner, name, original)


_fork_signal = []


def _raise_in_fork_hook():
    if _fork_signal:
        signal.raise_signal(signal.SIGUSR1)


os.register_at_fork(before=_raise_in_fork_hook)


@contextlib.contextmanager
def signal_inside_fork():
    _fork_signal.append(True)
    try:
        yield
    finally:
        _fork_signal.clear()


def a_plain_fork_gets_another_pid_than(armed):
    """Whether a fork outside idpin (any fork in the namespace) gets a pid other than
    ``armed``: no knob was left armed for it."""
    child = ORIGINALS["os.fork"]()
    if child == 0:
        os._exit(0)
    reap(child)
    return child != armed


def exit_with_my_pid_check(want):
    os._exit(0 if os.getpid() == want else 1)


# -- routing of signal.signal ------------------------------------------------------------


def test_signal_and_getsignal_give_back_the_handler_as_installed():
    def handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGUSR1, handler)
    assert signal.getsignal(signal.SIGUSR1) is handler
    assert signal.signal(signal.SIGUSR1, previous) is handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # Underneath, the kernel-facing handler is idpin's wrapper around it.
    assert isinstance(signals.ORIGINAL_GETSIGNAL(signal.SIGINT), signals.HeldInsideIdpin)


def test_uninstall_puts_back_the_handlers_and_install_wraps_them_again():
    idpin.uninstall()
    try:
        assert signals.ORIGINAL_GETSIGNAL(signal.SIGINT) is signal.default_int_handler
        assert signal.signal is ORIGINALS["signal.signal"]
    finally:
        idpin.install()
    assert isinstance(signals.ORIGINAL_GETSIGNAL(signal.SIGINT), signals.HeldInsideIdpin)


@pytest.mark.host
def test_handlers_installed_before_import_idpin_are_held_too():
    code = (
        "import signal\n"
        "def h(s, f): pass\n"
        "signal.signal(signal.SIGUSR1, h)\n"
        "import idpin\n"
        "from idpin import signals\n"
        "assert signal.getsignal(signal.SIGUSR1) is h\n"
        "assert signals.ORIGINAL_GETSIGNAL(signal.SIGUSR1).handler is h\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


# -- forks -------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["clone3", "ns_last_pid"])
def test_a_handler_raising_inside_a_pinned_fork_undoes_the_fork_and_leaves_the_request(mechanism):
    with handler_on_sigusr1(raises=True) as ran:
        with idpin.request(pid=PID) as req:
            with signal_inside_fork(), pytest.raises(Boom):
                idpin.fork(mechanism=mechanism)
            assert len(ran) == 1 and ran_outside_idpin(ran[0])
            # The fork was taken back: its child is gone and the request still pending.
            assert req.consumed == {}
            assert pending("pid") == (req, PID)
            child = idpin.fork(mechanism=mechanism)
            if child == 0:
                exit_with_my_pid_check(PID)
        assert child == PID and reap(child) == 0
        assert req.consumed == {"pid": PID}


def test_a_handler_that_returns_runs_once_after_the_fork_which_keeps_its_child():
    with handler_on_sigusr1(raises=False) as ran:
        with idpin.request(pid=PID) as req:
            with signal_inside_fork():
                child = os.fork()
            if child == 0:
                exit_with_my_pid_check(PID)
            assert len(ran) == 1 and ran_outside_idpin(ran[0])
    assert child == PID and reap(child) == 0
    assert req.consumed == {"pid": PID}


def test_a_plain_fork_interrupted_inside_idpin_leaves_no_child():
    with handler_on_sigusr1(raises=True) as ran:
        with signal_inside_fork(), pytest.raises(Boom):
            os.fork()
    assert len(ran) == 1
    # The namespace runner fails the test if a child is left.


# -- request blocks -----------------------------------------------------------------------


def test_a_handler_raising_while_a_tid_block_arms_unwinds_it_before_the_body():
    with handler_on_sigusr1(raises=True) as ran:
        with signal_during(tids, "_tasks"), pytest.raises(Boom):
            with idpin.request(tid=TID):
                pytest.fail("the block's body ran")
    assert len(ran) == 1 and ran_outside_idpin(ran[0])
    assert not knobs.any_held() and pending("tid") is None
    assert a_plain_fork_gets_another_pid_than(TID)


def test_a_handler_raising_while_a_block_cleans_up_lets_the_cleanup_finish():
    # Ctrl-C during idpin's own cleanup (leaving a tid block unused).
    with handler_on_sigusr1(raises=True) as ran:
        with signal_during(tids, "_put_back_cursor"), pytest.raises(Boom):
            with idpin.request(tid=TID):
                pass
    assert len(ran) == 1 and ran_outside_idpin(ran[0])
    assert not knobs.any_held()
    assert a_plain_fork_gets_another_pid_than(TID)


# -- IPC and ptys -------------------------------------------------------------------------


def test_a_handler_raising_inside_a_pinned_semget_removes_the_set_and_leaves_the_request():
    with handler_on_sigusr1(raises=True) as ran:
        with idpin.request(sem=SEM) as req:
            with signal_during(ipc, "_holder"), pytest.raises(Boom):
                ipc.semget(ipc.IPC_PRIVATE, 1, 0o600)
            assert len(ran) == 1 and ran_outside_idpin(ran[0])
            assert req.consumed == {}
            assert ipc.semget(ipc.IPC_PRIVATE, 1, 0o600) == SEM
    ipc.remove("sem", SEM)


def test_a_handler_raising_inside_a_pinned_openpty_closes_the_pair_and_leaves_the_request():
    with handler_on_sigusr1(raises=True) as ran:
        with idpin.request(pty=PTY) as req:
            with signal_during(pty, "_with_slaves"), pytest.raises(Boom):
                os.openpty()
            assert len(ran) == 1 and ran_outside_idpin(ran[0])
            assert req.consumed == {}
            master, slave = os.openpty()
    assert os.ttyname(slave) == "/dev/pts/%d" % PTY
    os.close(master)
    os.close(slave)


def test_a_handler_raising_inside_create_many_removes_the_batch():
    specs = [ipc.Spec("sem", SEM), ipc.Spec("msg", (4 << 15) | 22)]
    with handler_on_sigusr1(raises=True) as ran:
        with signal_during(ipc, "_create_all"), pytest.raises(Boom):
            ipc.create_many(specs)
    assert len(ran) == 1 and ran_outside_idpin(ran[0])
    # The namespace runner fails the test if an object is left; and the ids are free:
    assert ipc.create_many(specs) == [SEM, (4 << 15) | 22]
    ipc.remove("sem", SEM)
    ipc.remove("msg", (4 << 15) | 22)


def test_a_signal_arriving_while_waiting_for_the_lock_ends_the_wait_at_once():
    # Another process holds the pid namespace's lock for good; a handler that
    # raises must end the wait (between two polls), not the 30 s timeout.
    previous = idpin.set_lock_timeout(30)
    try:
        with flock_held_elsewhere("/proc/self/ns/pid"), handler_on_sigusr1(raises=True) as ran:
            with signal_during(knobs.time, "sleep"), pytest.raises(Boom):
                with idpin.request(tid=TID):
                    pytest.fail("entered a block whose lock another process holds")
        assert len(ran) == 1
    finally:
        idpin.set_lock_timeout(previous)
    assert not knobs.any_held()


def test_a_handler_raising_inside_an_explicit_pid_fork_undoes_it(backend):
    # The Cython backend makes these in C once the first has armed that path.
    first = idpin.fork(pid=PID)
    if first == 0:
        exit_with_my_pid_check(PID)
    assert first == PID and reap(first) == 0
    assert pids.fast_path_armed() == (backend == "cython")
    with handler_on_sigusr1(raises=True) as ran:
        with signal_inside_fork(), pytest.raises(Boom):
            idpin.fork(pid=PID)
        assert len(ran) == 1 and ran_outside_idpin(ran[0])
    child = idpin.fork(pid=PID)  # free again: the interrupted fork's child is gone
    if child == 0:
        exit_with_my_pid_check(PID)
    assert child == PID and reap(child) == 0


def test_a_handler_that_returns_inside_an_explicit_pid_fork_keeps_the_child(backend):
    first = idpin.fork(pid=PID)
    if first == 0:
        exit_with_my_pid_check(PID)
    assert reap(first) == 0
    with handler_on_sigusr1(raises=False) as ran:
        with signal_inside_fork():
            child = idpin.fork(pid=PID)
            if child == 0:
                exit_with_my_pid_check(PID)
        assert len(ran) == 1 and ran_outside_idpin(ran[0])
    assert child == PID and reap(child) == 0


def test_a_handler_raising_inside_a_knob_path_fork_undoes_it(backend):
    first = idpin.fork(pid=PID, mechanism="ns_last_pid")  # arms the C path (Cython)
    if first == 0:
        exit_with_my_pid_check(PID)
    assert first == PID and reap(first) == 0
    with handler_on_sigusr1(raises=True) as ran:
        with signal_inside_fork(), pytest.raises(Boom):
            idpin.fork(pid=PID, mechanism="ns_last_pid")
        assert len(ran) == 1 and ran_outside_idpin(ran[0])
    child = idpin.fork(pid=PID, mechanism="ns_last_pid")
    if child == 0:
        exit_with_my_pid_check(PID)
    assert child == PID and reap(child) == 0
