"""Capture (idpin.restore.capture, `idpin capture`): a live tree gives exactly its plan."""
import base64
import contextlib
import errno
import importlib
import io
import json
import os
import select
import signal
import threading
import time

import pytest
import sysv_ipc

import idpin
from idpin import _sys, cli
from idpin.restore import plan
from idpin.restore.capture import capture, frozen

from helpers import as_root_and_nobody, wait_until

MASTER_FD, SLAVE_FD = 40, 41
PTY_INDEX = 5
EMPTY_NEXT = {kind: [] for kind in plan.NEXT_KINDS}
SETUP_SECONDS = 20.0


class Pipes:
    def __init__(self):
        self.ready_read, self.ready = os.pipe()
        self.release, self.release_write = os.pipe()


def report(pipes, role, ids):
    os.write(pipes.ready, ("%s %s\n" % (role, " ".join(map(str, ids)))).encode())


def wait_for_release(pipes):
    os.read(pipes.release, 1)  # b"" once the test closes the write end


def reap_children():
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def fork_role(role, pipes, body=None, threads=0, wait=wait_for_release, after_fork=None):
    """Fork a process of the tree: it runs body, starts threads, reports, waits, reaps, exits."""
    pid = os.fork()
    if pid:
        if after_fork is not None:
            after_fork(pid)
        return pid
    status = 1
    try:
        for fd in (pipes.ready_read, pipes.release_write):
            with contextlib.suppress(OSError):
                os.close(fd)
        if body is not None:
            body()
        workers = [threading.Thread(target=os.read, args=(pipes.release, 1), daemon=True) for _ in range(threads)]
        for worker in workers:
            worker.start()
        report(pipes, role, [os.getpid()] + [worker.native_id for worker in workers])
        wait(pipes)
        reap_children()
        status = 0
    finally:
        os._exit(status)


def join_group(pid, pgid):
    # Parent and child both call setpgid, so the group exists before the next fork.
    with contextlib.suppress(PermissionError, ProcessLookupError):
        os.setpgid(pid, pgid)


def root_body(pipes, forker):
    """R: leads session R; subreaper; holds the pty's master; two threads."""
    os.close(SLAVE_FD)
    os.setsid()
    _sys.prctl(_sys.PR_SET_CHILD_SUBREAPER, 1)
    fork_role("A", pipes, lambda: a_body(pipes))
    fork_role("B", pipes, lambda: b_body(pipes), threads=1)
    if forker:
        fork_role("F", pipes, lambda: os.close(MASTER_FD), wait=keep_forking)


def a_body(pipes):
    """A: in R's session and group; holds the pty's slave; parent of group A1 (A1, A2)."""
    os.close(MASTER_FD)
    fd = os.open("/dev/pts/%d" % PTY_INDEX, os.O_RDWR | os.O_NOCTTY)
    os.dup2(fd, SLAVE_FD, inheritable=False)
    os.close(fd)

    def own_group():
        os.close(SLAVE_FD)
        os.setpgid(0, 0)

    a1 = fork_role("A1", pipes, own_group, after_fork=lambda pid: join_group(pid, pid))

    def a1_group():
        os.close(SLAVE_FD)
        os.setpgid(0, a1)

    fork_role("A2", pipes, a1_group, after_fork=lambda pid: join_group(pid, a1))


def b_body(pipes):
    """B: leads session B; B1 in its group; D led group D and died (D1 lives on); Z is a zombie."""
    os.close(MASTER_FD)
    os.setsid()
    fork_role("B1", pipes)
    d = os.fork()
    if d == 0:
        try:
            os.setpgid(0, 0)
            report(pipes, "D", [os.getpid()])
            fork_role("D1", pipes)
        finally:
            os._exit(0)
    join_group(d, d)
    os.waitpid(d, 0)  # D is gone; D1, orphaned, is now R's child (R is a subreaper)
    z = os.fork()
    if z == 0:
        os._exit(0)
    os.waitid(os.P_PID, z, os.WEXITED | os.WNOWAIT)  # a zombie until B leaves
    report(pipes, "Z", [z])


def keep_forking(pipes):
    """F: forks and reaps short-lived children until released (a tree that moves)."""
    for _ in range(10**6):
        if select.select([pipes.release], [], [], 0)[0]:
            return
        child = os.fork()
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)


ROLES = ("R", "A", "A1", "A2", "B", "B1", "D", "D1", "Z")


@contextlib.contextmanager
def live_tree(forker=False):
    """Build the tree in this test's namespaces; yield {role: [pid, tids...]}; tear it down."""
    with idpin.request(pty=PTY_INDEX):
        master, slave = os.openpty()
    os.dup2(master, MASTER_FD, inheritable=False)
    os.dup2(slave, SLAVE_FD, inheritable=False)
    os.close(master)
    os.close(slave)
    pipes = Pipes()
    root, ids = None, {}
    try:
        root = fork_role("R", pipes, lambda: root_body(pipes, forker), threads=2)
        os.close(MASTER_FD)
        os.close(SLAVE_FD)
        os.close(pipes.ready)
        collect(pipes.ready_read, ROLES + (("F",) if forker else ()), ids)
        yield ids
    finally:
        os.close(pipes.release_write)
        os.close(pipes.release)
        teardown(root, pipes.ready_read, ids)


def collect(ready_read, roles, ids):
    buffer = b""
    deadline = time.monotonic() + SETUP_SECONDS
    while set(ids) != set(roles):
        assert time.monotonic() < deadline, "the tree did not come up: %s reported" % sorted(ids)
        if select.select([ready_read], [], [], 0.1)[0]:
            chunk = os.read(ready_read, 4096)
            assert chunk, "a process of the tree died while it was built: %s reported" % sorted(ids)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                role, *numbers = line.decode().split()
                ids[role] = [int(n) for n in numbers]


def teardown(root, ready_read, ids):
    """Released processes exit once their children have; reap them all, killing after a bound."""
    deadline = time.monotonic() + SETUP_SECONDS
    while root is not None and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.005)
    else:
        # Stuck (a process left stopped, a failed build): kill what we started.
        for pid in [root] + [numbers[0] for numbers in ids.values()]:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    os.close(ready_read)
    for _ in range(1000):  # orphans of a killed tree come to us (pid 1)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break


@contextlib.contextmanager
def sysv_objects():
    """A sem set with a value, one of three sems, a queue with three messages, a segment with bytes."""
    made = []
    try:
        one = sysv_ipc.Semaphore(0x5E0, sysv_ipc.IPC_CREX, mode=0o600, initial_value=5)
        made.append(one.remove)
        three = idpin.ipc.semget(idpin.ipc.IPC_PRIVATE, 3, 0o640)
        made.append(lambda: idpin.ipc.remove("sem", three))
        queue = sysv_ipc.MessageQueue(0x3E5, sysv_ipc.IPC_CREX, mode=0o620)
        made.append(queue.remove)
        for text, mtype in ((b"first", 1), (b"\x00\xffbin", 42), (b"", 7)):
            queue.send(text, type=mtype)
        segment = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o644, size=5000, init_character=b"\0")
        made.append(segment.remove)
        made.append(segment.detach)
        segment.write(b"hello", offset=4096)
        # Removed while attached (SHM_DEST): reachable by its attachers only, so not in a plan.
        gone = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, size=4096)
        made.append(gone.detach)
        gone.remove()
        yield [
            {"kind": "sem", "id": one.id, "key": 0x5E0, "mode": 0o600, "nsems": 1, "values": [5]},
            {"kind": "sem", "id": three, "key": 0, "mode": 0o640, "nsems": 3, "values": [0, 0, 0]},
            {"kind": "msg", "id": queue.id, "key": 0x3E5, "mode": 0o620, "messages": [
                {"type": 1, "data": base64.b64encode(b"first").decode()},
                {"type": 42, "data": base64.b64encode(b"\x00\xffbin").decode()},
                {"type": 7, "data": ""},
            ]},
            {"kind": "shm", "id": segment.id, "key": segment.key, "mode": 0o644, "size": 5000,
             "data": base64.b64encode(bytes(4096) + b"hello" + bytes(899)).decode()},
        ]
    finally:
        for undo in reversed(made):
            undo()


def expected_plan(ids, objects):
    with open("/proc/self/cmdline", "rb") as f:
        cmdline = [os.fsdecode(arg) for arg in f.read().split(b"\0")[:-1]]
    pid = {role: numbers[0] for role, numbers in ids.items()}

    def proc(role, ppid, pgid, sid, fds=None):
        return {"pid": pid[role], "ppid": ppid, "pgid": pgid, "sid": sid,
                "tids": [pid[role]] + sorted(ids[role][1:]), "cmdline": cmdline,
                "fds": fds or {}, "next": EMPTY_NEXT}

    r, b = pid["R"], pid["B"]
    return {
        "idpin_plan": 1,
        "root": r,
        "processes": [
            proc("R", 0, r, r, {str(MASTER_FD): {"pty": PTY_INDEX, "end": "master"}}),
            proc("A", r, r, r, {str(SLAVE_FD): {"pty": PTY_INDEX, "end": "slave"}}),
            proc("A1", pid["A"], pid["A1"], r),
            proc("A2", pid["A"], pid["A1"], r),
            proc("B", r, b, b),
            proc("B1", b, b, b),
            proc("D1", r, pid["D"], b),  # D is gone: its pid lives on as D1's group
        ],
        "ipc": objects,
        "ptys": [{"index": PTY_INDEX}],
    }


@as_root_and_nobody
def test_capture_of_a_live_tree_gives_exactly_the_expected_plan(uid):
    with sysv_objects() as objects, live_tree() as ids:
        captured = capture(ids["R"][0])
        expected = expected_plan(ids, objects)
    assert len(ids["R"]) == 3 and len(ids["B"]) == 2, ids  # the threads were reported
    assert plan.comparable(captured) == plan.comparable(expected)
    assert captured["processes"][0]["pid"] == captured["root"] == ids["R"][0]
    assert plan.load(json.loads(json.dumps(captured))) == captured


def stopped_processes(pids):
    """Those of ``pids`` whose every thread is stopped."""
    def stopped(pid):
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/stat" % (pid, tid), "rb") as f:
                text = f.read()
            if text[text.rindex(b")") + 2:text.rindex(b")") + 3] not in (b"T", b"t"):
                return False
        return True

    return {pid for pid in pids if stopped(pid)}


def tree_pids(ids):
    return [numbers[0] for role, numbers in ids.items() if role not in ("D", "Z")]


@as_root_and_nobody
def test_freeze_stops_the_whole_tree_and_resumes_only_what_it_stopped(uid):
    with sysv_objects(), live_tree(forker=True) as ids:
        pids = tree_pids(ids)
        already = ids["A2"][0]
        os.kill(already, signal.SIGSTOP)
        assert wait_until(lambda: stopped_processes([already]) == {already})
        with frozen(ids["R"][0]):
            # Every process and thread, the forker's last children included.
            tree = [p["pid"] for p in capture(ids["R"][0])["processes"]]
            assert set(pids) <= set(tree) and stopped_processes(tree) == set(tree)
        assert wait_until(lambda: stopped_processes(pids) == {already})
        with pytest.raises(RuntimeError, match="inside"), frozen(ids["R"][0]):
            raise RuntimeError("inside")
        assert wait_until(lambda: stopped_processes(pids) == {already})
        captured = capture(ids["R"][0], freeze=True)
        assert wait_until(lambda: stopped_processes(pids) == {already})
        assert set(pids) <= {p["pid"] for p in captured["processes"]}
        os.kill(already, signal.SIGCONT)


def test_freeze_is_bounded_and_resumes_what_it_stopped_when_a_process_never_stops():
    # idpin.restore.capture is the function (DESIGN.md); the module is in sys.modules.
    capturing = importlib.import_module("idpin.restore.capture")

    with live_tree() as ids:
        pids = tree_pids(ids)
        never = ids["B1"][0]  # as a process in uninterruptible sleep would
        real = capturing._all_threads_stopped
        capturing._all_threads_stopped = lambda pid: pid != never and real(pid)
        try:
            with pytest.raises(idpin.IdpinError, match=r"did not stop within 0.3 s \(still running: %d\)" % never):
                capture(ids["R"][0], freeze=True, timeout=0.3)
        finally:
            capturing._all_threads_stopped = real
        assert wait_until(lambda: stopped_processes(pids) == set())


def test_a_tree_that_moves_while_read_is_read_again_and_the_retries_are_bounded():
    # idpin.restore.capture is the function (DESIGN.md); the module is in sys.modules.
    capturing = importlib.import_module("idpin.restore.capture")

    with live_tree() as ids:
        victim = ids["B1"][0]
        real_ipc, real_shape = capturing._ipc_objects, capturing._shape
        calls = []

        def ipc_objects_while_b1_dies():
            calls.append(1)
            if len(calls) == 1:  # after the processes were read
                os.kill(victim, signal.SIGKILL)
                assert wait_until(lambda: capturing._stat_fields(victim)[0] == "Z")
            return real_ipc()

        capturing._ipc_objects = ipc_objects_while_b1_dies
        try:
            captured = capture(ids["R"][0])
            capturing._shape = lambda table, root: calls.append(2) or len(calls)
            with pytest.raises(idpin.IdpinError, match="kept changing while it was read \\(5 attempts\\): "
                                                       "capture it with freeze=True"):
                capture(ids["R"][0])
        finally:
            capturing._ipc_objects, capturing._shape = real_ipc, real_shape
    assert calls[:2] == [1, 1], "the first reading must have been thrown away"
    pids = {p["pid"] for p in captured["processes"]}
    assert victim not in pids and set(tree_pids(ids)) - pids == {victim}


def test_ptys_of_another_devpts_instance_are_not_in_the_plan(tmp_path):
    # A restore can give back only ptys of the instance /dev/ptmx allocates from.
    other = str(tmp_path)
    _sys.mount("devpts", other, "devpts", _sys.MS_NOSUID | _sys.MS_NOEXEC, "newinstance,ptmxmode=0666")
    foreign = os.open(other + "/ptmx", os.O_RDWR | os.O_NOCTTY)
    assert _sys.pty_index(foreign) == 0  # an index this instance's pty 0 shares with nothing of ours
    with idpin.request(pty=2):
        master, slave = os.openpty()
    release, hold = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(hold)
        os.read(release, 1)
        os._exit(0)
    try:
        captured = capture(child)
    finally:
        os.close(hold)
        os.waitpid(child, 0)
        for fd in (release, foreign, master, slave):
            os.close(fd)
    assert captured["processes"][0]["fds"] == {
        str(master): {"pty": 2, "end": "master"}, str(slave): {"pty": 2, "end": "slave"}}
    assert captured["ptys"] == [{"index": 2}]


def test_freeze_refuses_a_tree_holding_the_caller_and_stops_nothing():
    with live_tree() as ids:
        with pytest.raises(idpin.RequestError, match="contains the capturing process 1"):
            capture(1, freeze=True)
        assert stopped_processes(tree_pids(ids)) == set()
        without = capture(1)  # unfrozen, the caller's own tree is fine
        assert without["root"] == 1 and without["processes"][1]["pid"] == ids["R"][0]


def test_cli_capture_writes_a_valid_plan_to_a_file_or_stdout(tmp_path):
    with sysv_objects(), live_tree() as ids:
        root = str(ids["R"][0])
        out = io.StringIO()
        assert cli.main(["capture", root, "--freeze"], out=out) == 0
        path = tmp_path / "plan.json"
        assert cli.main(["capture", root, "-o", str(path)], out=io.StringIO()) == 0
        direct = capture(ids["R"][0])
    assert plan.comparable(json.loads(out.getvalue())) == plan.comparable(plan.load(path)) == plan.comparable(direct)
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        assert cli.main(["capture", "4000000"], out=io.StringIO()) == 1
    assert errors.getvalue() == "idpin capture: no live process 4000000 in this pid namespace\n"


def test_capture_refuses_what_is_not_a_live_process():
    for bad in (True, 0, -3, "1", 1.0):
        with pytest.raises(idpin.RequestError, match="capture needs a pid"):
            capture(bad)
    zombie = os.fork()
    if zombie == 0:
        os._exit(0)
    os.waitid(os.P_PID, zombie, os.WEXITED | os.WNOWAIT)
    try:
        with pytest.raises(idpin.RequestError, match="no live process %d" % zombie):
            capture(zombie)
    finally:
        os.waitpid(zombie, 0)
    with pytest.raises(idpin.RequestError, match="no live process %d" % zombie):
        capture(zombie)


def test_sys_reads_ipc_contents_and_reports_errors(backend):
    queue = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX)
    segment = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, size=10, init_character=b"x")
    semaphore = sysv_ipc.Semaphore(None, sysv_ipc.IPC_CREX, initial_value=3)
    try:
        queue.send(b"0123456789", type=9)
        assert _sys.msg_copy(queue.id, 0, 10) == (9, b"0123456789")
        assert _sys.msg_copy(queue.id, 0, 10) == (9, b"0123456789"), "MSG_COPY must not remove it"
        assert _sys.msg_copy(queue.id, 1, 10) is None
        with pytest.raises(OSError) as too_small:
            _sys.msg_copy(queue.id, 0, 9)
        assert too_small.value.errno == errno.E2BIG and queue.current_messages == 1
        assert _sys.shm_read(segment.id, 10) == b"x" * 10
        with pytest.raises(OSError) as too_big:
            _sys.shm_read(segment.id, 9)
        assert too_big.value.errno == errno.EFBIG
        assert _sys.sem_getall(semaphore.id) == [3]
        for call, args in ((_sys.msg_copy, (12345, 0, 10)), (_sys.shm_read, (12345, 10)), (_sys.sem_getall, (12345,))):
            with pytest.raises(OSError) as missing:
                call(*args)
            assert missing.value.errno == errno.EINVAL
    finally:
        queue.remove()
        segment.detach()
        segment.remove()
        semaphore.remove()


def test_a_process_name_that_mimics_stat_fields_does_not_fool_the_capture():
    ready, started = os.pipe()
    release, hold = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(hold)
        with open("/proc/self/comm", "w") as f:
            f.write("x) R 7 7 7 (y")  # /proc/PID/stat: "pid (comm) state ppid pgrp session ..."
        os.setpgid(0, 0)
        os.write(started, b"!")
        os.read(release, 1)
        os._exit(0)
    try:
        os.read(ready, 1)
        captured = capture(child)
    finally:
        os.close(hold)
        os.waitpid(child, 0)
        for fd in (ready, started, release):
            os.close(fd)
    process = captured["processes"][0]
    assert (process["pid"], process["ppid"], process["pgid"], process["sid"]) == (child, 0, child, 0)
