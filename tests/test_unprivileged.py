"""An unprivileged user: refused outside any user namespace, and told why;
served inside user namespaces it creates itself."""
import os

import pytest

import idpin
from idpin.testing import NOBODY, run_in_namespaces

outside = pytest.mark.namespaces(uid=NOBODY, userns=False)


@outside
def test_probe_explains_what_is_missing_and_the_fix():
    caps = idpin.probe()
    for kind in ("pid", "tid", "sem", "shm", "msg"):
        assert not caps[kind].ok
        assert "CAP_CHECKPOINT_RESTORE" in caps[kind].reason
        assert "unshare --user --map-root-user --pid" in caps[kind].reason


@outside
def test_pinned_fork_raises_unsupported_and_leaves_no_child():
    with pytest.raises(idpin.UnsupportedError, match="unshare --user"):
        idpin.fork(pid=300)  # valid under any pid_max; EPERM comes before EEXIST
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


@outside
def test_ipc_request_raises_unsupported():
    with pytest.raises(idpin.UnsupportedError, match="sem_next_id"):
        with idpin.request(sem=5):
            pass


# Inside user namespaces it creates itself, an unprivileged user gets every
# kind: run_in_namespaces needs no privilege (idpin demo: tests/test_cli.py).


def _pid_uid_and_sem_knob():
    with open("/proc/sys/kernel/sem_next_id") as f:
        return os.getpid(), os.getuid(), int(f.read())


@outside
def test_run_in_namespaces_needs_no_privilege():
    assert os.getuid() == NOBODY
    assert run_in_namespaces(_pid_uid_and_sem_knob) == (1, 0, -1)


@outside
def test_run_in_namespaces_refuses_a_uid_switch_it_cannot_make():
    with pytest.raises(PermissionError, match="needs root to switch to that uid"):
        run_in_namespaces(_pid_uid_and_sem_knob, uid=0)

