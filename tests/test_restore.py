"""idpin.restore.restore: a whole tree's ids, exact, verified, and nothing left on failure.

Each test body runs as pid 1 of fresh namespaces (conftest), so a restore
with ``here=True`` lands in the test's own namespaces (where leftovers are
checked by the harness), and the default restore nests fresh namespaces.
"""
import base64
import json
import os
import signal
import tempfile

import pytest

import idpin
import idpin.restore
from idpin import _sys
from idpin.restore import workers as restore_workers
from helpers import as_root_and_nobody

SEM, MSG, SHM = 32769 + 3, 98307 + 5, 65538 + 7
SHM_BYTES = b"restored bytes\x00\xff"


def proc(pid, ppid, pgid, sid, tids=None, fds=None):
    entry = {"pid": pid, "ppid": ppid, "pgid": pgid, "sid": sid, "tids": tids or [pid]}
    if fds:
        entry["fds"] = fds
    return entry


def rich_plan(root=1):
    """Sessions, groups, a dead group leader, a dead session leader, threads, IPC, a shared pty.

    root 1: the root is the fresh pid namespace's init; otherwise the tree
    hangs under ``root`` (for here=True inside the test's namespace).
    """
    r = root
    processes = [
        proc(r, 0, r, r, fds={"7": {"pty": 2, "end": "master"}}),
        # a session of its own, with a thread and a second group whose leader is dead (150)
        proc(100, r, 100, 100, tids=[100, 101, 109]),
        proc(102, 100, 100, 100, fds={"0": {"pty": 2, "end": "slave"}, "1": {"pty": 2, "end": "slave"}}),
        proc(103, 100, 150, 100),
        proc(104, 102, 150, 100),
        # a group leader in the root's session, and a member in another subtree
        proc(200, r, 200, r),
        proc(201, 200, 200, r),
        proc(210, r, 200, r, tids=[210, 211]),
        # orphans of dead session leader 300 (its group 300 lives on), adopted by the root
        proc(301, r, 300, 300),
        proc(302, 301, 300, 300),
        proc(303, r, 303, 300),
    ]
    return {
        "idpin_plan": 1,
        "root": r,
        "processes": processes,
        "ipc": [
            {"kind": "sem", "id": SEM, "key": 0, "mode": 0o600, "nsems": 3, "values": [0, 7, 32767]},
            {"kind": "msg", "id": MSG, "key": 0x1234, "mode": 0o640,
             "messages": [{"type": 1, "data": _b64(b"first")}, {"type": 9, "data": _b64(b"")},
                          {"type": 2, "data": _b64(b"third \x00 message")}]},
            {"kind": "shm", "id": SHM, "key": 0, "mode": 0o600, "size": 4096, "data": _b64(SHM_BYTES.ljust(4096, b"\0"))},
        ],
        "ptys": [{"index": 2}],
    }


def _b64(data):
    return base64.b64encode(data).decode()


def stat_of(pid):
    with open("/proc/%d/stat" % pid, "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[1]), int(fields[2]), int(fields[3])


def assert_tree_here(plan, parent_of_root):
    for entry in plan["processes"]:
        pid = entry["pid"]
        ppid = parent_of_root if pid == plan["root"] else entry["ppid"]
        assert stat_of(pid) == (ppid, entry["pgid"], entry["sid"]), entry
        assert sorted(int(t) for t in os.listdir("/proc/%d/task" % pid)) == sorted(entry["tids"])
        for number, held in entry.get("fds", {}).items():
            link = os.readlink("/proc/%d/fd/%s" % (pid, number))
            if held["end"] == "slave":
                assert link == "/dev/pts/%d" % held["pty"]
            else:
                with open("/proc/%d/fdinfo/%s" % (pid, number)) as f:
                    assert "tty-index:\t%d\n" % held["pty"] in f.read()


def assert_ipc_contents():
    assert list(_sys.sem_getall(SEM)) == [0, 7, 32767]
    assert _shm_bytes(SHM)[: len(SHM_BYTES)] == SHM_BYTES
    copied = [_sys.msg_copy(MSG, n, 4096) for n in range(3)]
    assert [(t, bytes(d)) for t, d in copied] == [
        (1, b"first"), (9, b""), (2, b"third \x00 message")]


def _shm_bytes(id):
    return bytes(_sys.shm_read(id, 4096))


@as_root_and_nobody
@pytest.mark.parametrize("workers", [1, 2])
def test_here_every_id_exact_then_nothing_left(uid, workers):
    plan = rich_plan(root=50)
    with idpin.restore.restore(plan, workers=workers, here=True) as tree:
        assert tree.root == 50
        assert tree.pids == {p["pid"]: p["pid"] for p in plan["processes"]}
        assert_tree_here(plan, parent_of_root=tree.restorer)
        assert_ipc_contents()
    # the harness checks no process, IPC object, pty or fd is left


def _reader_of(path):
    def target(entry):
        # Runs in each restored process, after the whole tree was verified.
        line = {"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgrp(),
                "sid": os.getsid(0), "tids": sorted(int(t) for t in os.listdir("/proc/self/task")),
                "entry": entry["pid"]}
        if entry["pid"] == 1:
            line["sem"] = list(_sys.sem_getall(SEM))
            line["shm"] = _b64(_shm_bytes(SHM)[: len(SHM_BYTES)])
            line["msg"] = [[t, _b64(bytes(d))] for t, d in (_sys.msg_copy(MSG, n, 4096) for n in range(3))]
            line["pts"] = os.readlink("/proc/102/fd/0")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.write(fd, (json.dumps(line) + "\n").encode())
        os.close(fd)
    return target


def _wait_lines(path, count):
    from helpers import wait_until

    def enough():
        with open(path) as f:
            return len(f.readlines()) >= count
    assert wait_until(enough, timeout=20)
    with open(path) as f:
        return [json.loads(line) for line in f]


@as_root_and_nobody
@pytest.mark.parametrize("workers", [1, 2])
def test_fresh_namespaces_root_is_init(uid, workers):
    plan = rich_plan(root=1)
    with tempfile.NamedTemporaryFile("w+") as log:
        os.chmod(log.name, 0o666)
        with idpin.restore.restore(plan, workers=workers, target=_reader_of(log.name)) as tree:
            lines = _wait_lines(log.name, len(plan["processes"]))
            assert sorted(tree.pids) == sorted(p["pid"] for p in plan["processes"])
            assert tree.root == tree.pids[1] != 1
    seen = {line["pid"]: line for line in lines}
    for entry in plan["processes"]:
        line = seen[entry["pid"]]
        assert line["entry"] == entry["pid"]
        assert (line["ppid"], line["pgid"], line["sid"]) == (entry["ppid"], entry["pgid"], entry["sid"])
        assert line["tids"] == sorted(entry["tids"])
    root = seen[1]
    assert root["sem"] == [0, 7, 32767]
    assert base64.b64decode(root["shm"]) == SHM_BYTES
    assert [(t, base64.b64decode(d)) for t, d in root["msg"]] == [
        (1, b"first"), (9, b""), (2, b"third \x00 message")]
    assert root["pts"] == "/dev/pts/2"


def test_fresh_namespaces_idpin_init_holds_a_root_that_is_not_1():
    plan = rich_plan(root=40)
    with idpin.restore.restore(plan, workers=2) as tree:
        assert sorted(tree.pids) == sorted(p["pid"] for p in plan["processes"])
        assert tree.report["processes"] == len(plan["processes"])


def wide_plan(root, children, first=1000):
    processes = [proc(root, 0, root, root)]
    processes += [proc(first + i, root, root, root) for i in range(children)]
    return {"idpin_plan": 1, "root": root, "processes": processes}


@pytest.mark.parametrize("workers", [2, 3])
def test_wide_level_split_over_helpers(workers):
    plan = wide_plan(60, 40)
    with idpin.restore.restore(plan, workers=workers, here=True) as tree:
        assert_tree_here(plan, parent_of_root=tree.restorer)
        with open("/proc/60/task/60/children") as f:
            assert sorted(int(c) for c in f.read().split()) == list(range(1000, 1040))


def test_deep_chain_needs_no_deep_stack():
    processes = [proc(70, 0, 70, 70)] + [proc(2000 + i, 2000 + i - 1 if i else 70, 70, 70)
                                       for i in range(60)]
    plan = {"idpin_plan": 1, "root": 70, "processes": processes}
    with idpin.restore.restore(plan, here=True) as tree:
        assert_tree_here(plan, parent_of_root=tree.restorer)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_taken_pid_tears_everything_down_and_names_the_entry(workers):
    plan = rich_plan(root=50)
    plan["processes"] += [proc(400 + i, 50, 50, 50) for i in range(30)]
    holder = idpin.fork(pid=104)  # 104 is deep in the tree, restored last in its subtree
    if holder == 0:
        os.pause()
        os._exit(0)
    try:
        with pytest.raises(idpin.IdBusyError) as caught:
            with idpin.restore.restore(plan, workers=workers, here=True):
                pytest.fail("the restore must not succeed")
        assert caught.value.id == 104
        assert caught.value.entry == "processes[4] (pid 104)"
        assert _processes_other_than(holder) == []
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)


def _processes_other_than(*pids):
    mine = {os.getpid(), *pids}
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in mine)


def _killer(step, pid):
    def fault(at, task):
        if (at, task) == (step, pid) or (pid is None and at == step):
            os.kill(os.getpid(), signal.SIGKILL)
    return fault


@pytest.mark.parametrize("here", [True, False], ids=["here", "fresh"])
@pytest.mark.parametrize("step, pid, named", [
    ("forked", 102, "processes[2] (pid 102)"),     # a process, once it forked its children
    ("born", 303, "processes[10] (pid 303)"),      # an orphan made by a session stand-in
    ("session", 300, "the session stand-in 300"),  # the stand-in itself
])
def test_a_task_killed_mid_restore_leaves_nothing(here, step, pid, named):
    plan = rich_plan(root=50 if here else 1)
    restore_workers.fault = _killer(step, pid)
    try:
        with pytest.raises(idpin.IdpinError) as caught:
            with idpin.restore.restore(plan, here=here, timeout=20):
                pytest.fail("the restore must not succeed")
    finally:
        restore_workers.fault = None
    assert caught.value.entry == named
    assert _processes_other_than() == []


def test_a_helper_killed_mid_restore_leaves_nothing():
    plan = wide_plan(60, 40)
    restore_workers.fault = _killer("helper", None)
    try:
        with pytest.raises(idpin.IdpinError) as caught:
            with idpin.restore.restore(plan, workers=2, here=True, timeout=20):
                pytest.fail("the restore must not succeed")
    finally:
        restore_workers.fault = None
    assert "helper" in caught.value.entry
    assert _processes_other_than() == []


def test_a_busy_ipc_id_names_its_entry():
    plan = rich_plan(root=50)
    with idpin.request(msg=MSG):
        taken = idpin.ipc.msgget(idpin.ipc.IPC_PRIVATE, 0o600)
    try:
        with pytest.raises(idpin.IdBusyError) as caught:
            with idpin.restore.restore(plan, here=True):
                pytest.fail("the restore must not succeed")
        assert caught.value.entry == "ipc[1] (msg %d)" % MSG
        assert _processes_other_than() == []
        assert not os.path.exists("/dev/pts/2")
    finally:
        _sys.ipc_remove(_sys.MSG, taken)


def test_bad_plan_refused_before_any_side_effect():
    plan = rich_plan(root=50)
    plan["processes"][3]["ppid"] = 999
    with pytest.raises(idpin.RequestError) as caught:
        idpin.restore.restore(plan, here=True)
    assert "processes[3]" in str(caught.value)
    with pytest.raises(idpin.RequestError):
        idpin.restore.restore(rich_plan(root=50), workers=0)
    assert _processes_other_than() == []


@as_root_and_nobody
def test_round_trip_capture_teardown_restore_capture(uid):
    from idpin.restore import plan as plan_format

    planned = rich_plan(root=50)
    with idpin.restore.restore(planned, here=True):
        first = idpin.restore.capture(50)
    # What was captured is what was planned (a restored skeleton has the
    # restorer's cmdline), and nothing of it is left once torn down.
    assert plan_format.comparable(first, ignore=("cmdline",)) == \
        plan_format.comparable(planned, ignore=("cmdline",))
    assert _processes_other_than() == []
    with idpin.restore.restore(first, here=True, workers=2):
        second = idpin.restore.capture(50)
    assert plan_format.comparable(second) == plan_format.comparable(first)


def test_cli_restore_execs_each_cmdline_and_holds_until_the_root_exits(tmp_path):
    import io

    from idpin import cli

    path = tmp_path / "plan.json"
    marker = tmp_path / "ran"
    plan = {"idpin_plan": 1, "root": 1, "processes": [
        dict(proc(1, 0, 1, 1), cmdline=["/bin/sh", "-c", "sleep 0.3"]),
        dict(proc(7, 1, 7, 7), cmdline=["/bin/sh", "-c", "echo $$ > %s; sleep 30" % marker]),
    ]}
    path.write_text(json.dumps(plan))
    os.chmod(tmp_path, 0o777)
    out = io.StringIO()
    assert cli.main(["restore", str(path), "--exec", "--workers", "2"], out=out) == 0
    text = out.getvalue()
    assert "restored 2 processes" in text and "root: " in text and "plainly" in text
    assert marker.read_text().strip() == "7"  # the pid it was restored with, seen by itself
    assert _processes_other_than() == []


def test_cli_restore_refuses_a_bad_plan(tmp_path, capsys):
    from idpin import cli

    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"idpin_plan": 1, "root": 1, "processes": []}))
    assert cli.main(["restore", str(path)]) == 2
    assert _processes_other_than() == []


@pytest.mark.host
def test_bench_restore_quick_every_restore_verified_nothing_left(tmp_path):
    import io

    from idpin import cli

    out = io.StringIO()
    status = cli.main(["bench", "restore", "--quick", "--out", str(tmp_path)], out=out)
    with open(tmp_path / "results.json") as f:
        section = json.load(f)["restore"]
    assert status == 0, out.getvalue()
    assert section["ok"] and section["violations"] == []
    shapes = {row["shape"] for row in section["rows"] if row["kind"] == "tree"}
    assert shapes == {"flat", "binary", "chain", "mix"}
    for row in section["rows"]:
        if row["kind"] == "tree":
            assert row["c_floor"] > 0 and row["py_floor"] > 0
            assert row["restore_w1"] > 0 and row["restore_w2"] > 0
        else:
            assert row["plain"] > 0 and row["restore"] > 0


@pytest.mark.host
def test_bench_restore_mix_has_sessions_groups_and_dead_leaders():
    from idpin.bench import restore_suite

    plan = restore_suite.tree_plan("mix", 1000)
    idpin.restore.validate(plan)
    pids = {p["pid"] for p in plan["processes"]}
    sids = {p["sid"] for p in plan["processes"]}
    pgids = {p["pgid"] for p in plan["processes"]}
    assert len(plan["processes"]) == 1000
    assert len(sids) > 10 and len(pgids) > 100
    dead = (sids | pgids) - pids
    assert 0.05 < len(dead) / len(sids | pgids) < 0.15  # about 10 % dead leaders
    first, children = restore_suite.floor_shape(plan)
    assert len(children) == 999 and first[-1] == 999


def test_a_killed_restorer_takes_the_whole_tree_with_it():
    from helpers import wait_until

    plan = rich_plan(root=50)
    del plan["ipc"]  # here, objects of a killed IPC worker would stay: see the restorer's notes

    def kill_the_restorer(step, pid):
        if (step, pid) == ("forked", 100):
            os.kill(int(open("/proc/50/stat").read().split(")")[1].split()[1]), signal.SIGKILL)
    restore_workers.fault = kill_the_restorer
    try:
        with pytest.raises(idpin.IdpinError, match="the restorer died"):
            with idpin.restore.restore(plan, here=True, timeout=20):
                pytest.fail("the restore must not succeed")
    finally:
        restore_workers.fault = None

    def all_gone():
        # This test is pid 1 here: the tree's orphans come to it, to be reaped.
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        return _processes_other_than() == []
    assert wait_until(all_gone, timeout=10)


# -- the _sys entries the restore added (both backends) ---------------------------

def test_clone3_sibling_makes_a_child_of_the_callers_parent():
    from helpers import reap

    me = os.getpid()
    helper = idpin.fork(pid=500)
    if helper == 0:
        # The helper makes 501 a child of its own parent (this test), then leaves.
        child = _sys.clone3_sibling((501,), _sys.tid_cache_offset())
        if child == 0:
            os._exit(0 if os.getppid() == me else 1)
        os._exit(0 if child == 501 else 2)
    assert reap(helper) == 0
    assert reap(501) == 0  # ours to reap: it is this process's child
    with pytest.raises(OSError) as caught:
        _sys.clone3_sibling((502,), _sys.tid_cache_offset())  # pid 1 of its namespace: EINVAL
    assert caught.value.errno == 22


def test_sysv_content_writers_fill_and_refuse():
    import errno

    sem = _sys.ipc_get(_sys.SEM, 0, 3, 0o1600)
    msg = _sys.ipc_get(_sys.MSG, 0, 0, 0o1600)
    shm = _sys.ipc_get(_sys.SHM, 0, 4096, 0o1600)
    try:
        _sys.ipc_sem_setall(sem, [5, 0, 32767])
        assert list(_sys.sem_getall(sem)) == [5, 0, 32767]
        with pytest.raises(OverflowError):
            _sys.ipc_sem_setall(sem, [1, 2, 70000])
        with pytest.raises(OSError) as caught:
            _sys.ipc_sem_setall(sem, [1, 2, 32768])  # above SEMVMX
        assert caught.value.errno == errno.ERANGE
        _sys.ipc_msg_send(msg, 4, b"abc\x00")
        assert tuple(_sys.msg_copy(msg, 0, 64)) == (4, b"abc\x00")
        with pytest.raises(OSError) as caught:
            _sys.ipc_msg_send(msg, 0, b"x")  # a message type must be > 0
        assert caught.value.errno == errno.EINVAL
        _sys.ipc_shm_write(shm, b"\x01\x02")
        assert bytes(_sys.shm_read(shm, 4096))[:3] == b"\x01\x02\x00"
        with pytest.raises(OSError):
            _sys.ipc_shm_write(2 ** 30, b"x")
        from test_sys_leaks import run_many
        run_many(lambda: _sys.ipc_sem_setall(sem, [1, 2, 3]), calls=1000)
        run_many(lambda: _sys.ipc_shm_write(shm, b"y" * 100), calls=1000)
    finally:
        for kind, id in ((_sys.SEM, sem), (_sys.MSG, msg), (_sys.SHM, shm)):
            _sys.ipc_remove(kind, id)
