import os
import pty as stdlib_pty

import pytest

import idpin
from idpin import _sys
from idpin import pty as idpin_pty
from idpin.testing import open_fds

from helpers import as_root_and_nobody, reap


def open_indices():
    return sorted(int(name) for name in os.listdir("/dev/pts") if name.isdigit())


def close(*fds):
    for fd in fds:
        os.close(fd)


@as_root_and_nobody
def test_os_openpty_in_a_request_gets_the_index(uid):
    with idpin.request(pty=5) as req:
        master, slave = os.openpty()
    assert os.ttyname(slave) == "/dev/pts/5" and _sys.pty_index(master) == 5
    assert open_indices() == [5]  # fillers 0..4 were closed
    assert not os.get_inheritable(master) and not os.get_inheritable(slave)
    assert req.consumed == {"pty": 5}
    os.write(master, b"ping\n")
    assert os.read(slave, 5) == b"ping\n"
    close(master, slave)


def test_pty_module_functions_are_routed():
    with idpin.request(pty=3):
        master, slave = stdlib_pty.openpty()
    assert os.ttyname(slave) == "/dev/pts/3"
    close(master, slave)


@pytest.mark.parametrize("fork", [os.forkpty, stdlib_pty.fork, idpin_pty.fork])
def test_forkpty_with_pid_and_pty_requests(fork):
    with idpin.request(pid=321, pty=2) as req:
        pid, master = fork()
        if pid == 0:
            ok = os.getpid() == 321 and os.ttyname(0) == "/dev/pts/2" and os.getsid(0) == 321
            os.write(1, b"ok" if ok else b"no")
            os._exit(0)
    assert pid == 321 and req.consumed == {"pid": 321, "pty": 2}
    assert os.read(master, 2) == b"ok"
    assert reap(pid) == 0
    os.close(master)


def test_busy_index_raises_and_leaves_nothing_open():
    holder_master, holder_slave = os.openpty()  # index 0
    taken = _sys.pty_index(holder_master)
    before = open_fds()
    with idpin.request(pty=taken) as req:
        with pytest.raises(idpin.IdBusyError) as info:
            os.openpty()
    assert (info.value.kind, info.value.id) == ("pty", taken)
    assert isinstance(info.value, OSError) and req.consumed == {}
    assert open_fds() == before and open_indices() == [taken]
    close(holder_master, holder_slave)


def test_pty_fork_does_not_swallow_a_busy_error():
    # pty.fork catches OSError from os.forkpty and falls back to another pty.
    master, slave = os.openpty()
    with idpin.request(pty=0):
        with pytest.raises(idpin.IdBusyError):
            stdlib_pty.fork()
    close(master, slave)


def test_open_many_walks_once_for_several_indices():
    low_master, low_slave = os.openpty()  # 0 stays busy: the walk steps over it
    pairs = idpin_pty.open_many([7, 2, 4])
    assert sorted(pairs) == [2, 4, 7]
    for index, (master, slave) in pairs.items():
        assert os.ttyname(slave) == "/dev/pts/%d" % index
    assert open_indices() == [0, 2, 4, 7]
    for master, slave in pairs.values():
        close(master, slave)
    close(low_master, low_slave)


def test_open_many_is_all_or_nothing():
    master, slave = os.openpty()  # 0
    with pytest.raises(idpin.IdBusyError) as info:
        idpin_pty.open_many([3, 0, 5])
    assert info.value.id == 0 and open_indices() == [0]
    close(master, slave)


def test_open_many_refuses_duplicates_and_bad_indices():
    with pytest.raises(idpin.RequestError, match="distinct"):
        idpin_pty.open_many([1, 1])
    with pytest.raises(idpin.RequestError, match="pty"):
        idpin_pty.open_many([-1])


def test_private_devpts_instance(tmp_path):
    # A second instance, mounted here, numbers from 0 on its own.
    root = tmp_path / "pts"
    root.mkdir()
    _sys.mount("devpts", str(root), "devpts", 0, "newinstance,ptmxmode=0666")
    try:
        other_master, other_slave = os.openpty()  # /dev/pts/0 of the test's instance
        instance = idpin_pty.find_instance(str(root / "ptmx"))
        assert instance.root == str(root)
        pairs = idpin_pty.open_many([0, 2], ptmx=str(root / "ptmx"))
        assert sorted(os.listdir(root)) == ["0", "2", "ptmx"]
        for master, slave in pairs.values():
            close(master, slave)
        close(other_master, other_slave)
    finally:
        # idpin keeps nothing open on the instance: it can be unmounted.
        assert os.system("umount %s" % root) == 0


def test_busy_pid_in_forkpty_keeps_the_pty_request_pending():
    with idpin.request(pid=1, pty=3) as req:
        with pytest.raises(idpin.IdBusyError):
            os.forkpty()
        assert open_indices() == [] and req.consumed == {}
        master, slave = os.openpty()
    assert os.ttyname(slave) == "/dev/pts/3" and req.consumed == {"pty": 3}
    close(master, slave)


def test_index_beyond_an_instance_max_is_refused(tmp_path):
    root = tmp_path / "pts"
    root.mkdir()
    _sys.mount("devpts", str(root), "devpts", 0, "newinstance,ptmxmode=0666,max=2")
    try:
        with pytest.raises(idpin.RequestError, match="0..1"):
            idpin_pty.open_many([5], ptmx=str(root / "ptmx"))
        pairs = idpin_pty.open_many(iter([1]), ptmx=str(root / "ptmx"))
        close(*pairs[1])
    finally:
        assert os.system("umount %s" % root) == 0


def test_sem_and_pty_in_one_block():
    with idpin.request(sem=77, pty=1) as req:
        sem = idpin.ipc.semget(idpin.ipc.IPC_PRIVATE, 1, 0o600)
        master, slave = os.openpty()
    assert sem == 77 and os.ttyname(slave) == "/dev/pts/1"
    assert req.consumed == {"sem": 77, "pty": 1}
    idpin.ipc.remove("sem", sem)
    close(master, slave)


def test_walk_needs_enough_file_descriptors():
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    with idpin.request(pty=100):
        with pytest.raises(idpin.UnsupportedError, match="RLIMIT_NOFILE"):
            os.openpty()
