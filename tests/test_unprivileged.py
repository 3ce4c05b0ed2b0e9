"""Outside any user namespace, an unprivileged user is refused, and told why."""
import os

import pytest

import idpin
from idpin.testing import NOBODY

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
