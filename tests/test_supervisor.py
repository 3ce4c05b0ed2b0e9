"""The seccomp supervisor: unmodified programs get their planned ids.

The programs are a C program built here (tests/programs/allocate.c) and
shell scripts; neither knows idpin. Each test body runs as pid 1 of fresh
namespaces (conftest), so the supervisor is in the programs' namespaces and
the planned ids are free; the runner checks nothing is left behind
(processes, IPC objects, armed knobs, ptys, fds, locks).
"""
import ctypes
import errno
import json
import os
import pathlib
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import idpin
from idpin import _sys, cli
from idpin.interpose import ORIGINALS
from idpin.interpose import filter as seccomp_filter
from idpin.interpose import supervisor as supervisor_module
from idpin.interpose.supervisor import parse_request
from idpin.testing import open_fds as testing_open_fds

from helpers import as_root_and_nobody, knob, reap, wait_until

PROGRAMS = pathlib.Path(__file__).resolve().parent / "programs"
SEM, SHM, MSG = (2 << 15) | 7, (3 << 15) | 4, (1 << 15) | 9


def _compiled(name):
    """tests/programs/NAME.c, compiled in a directory nobody can read too; yields its path."""
    workdir = tempfile.mkdtemp(prefix="idpin-test-supervisor-")
    os.chmod(workdir, 0o755)
    binary = os.path.join(workdir, name)
    subprocess.run(["gcc", "-O2", "-pthread", "-o", binary, str(PROGRAMS / (name + ".c")), "-lutil"],
                   check=True, timeout=120)
    yield binary
    shutil.rmtree(workdir)


@pytest.fixture(scope="module")
def allocate():
    """tests/programs/allocate.c, compiled for this module."""
    yield from _compiled("allocate")


@pytest.fixture(scope="module")
def rewrite():
    """tests/programs/rewrite.c: a second thread rewrites what the first passes to a trapped call."""
    yield from _compiled("rewrite")


def plan_of(processes):
    return {"idpin_plan": 1, "root": processes[0]["pid"], "processes": processes}


def run(argv, plan=None, strict=False, pid=None, timeout=60):
    """Run ``argv`` supervised; (stdout lines, return code, the supervisor's log and errors)."""
    with idpin.Supervisor(plan, strict=strict) as sup:
        proc = sup.spawn(argv, pid=pid, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=timeout)
        log, errors = list(sup.log), list(sup.errors)
    return out.decode().split(), proc.returncode, log, errors, err.decode()


@as_root_and_nobody
def test_a_c_program_gets_its_planned_pid_tid_ipc_ids_and_pty(allocate, uid):
    plan = plan_of([{"pid": 100, "next": {"pid": [200], "tid": [300], "sem": [SEM], "shm": [SHM],
                                          "msg": [MSG], "pty": [3]}}])
    lines, status, log, errors, _ = run([allocate, "all"], plan, pid=100)
    assert status == 0
    assert lines == ["pid=200", "tid=300", "sem=%d" % SEM, "shm=%d" % SHM, "msg=%d" % MSG, "pty=3"]
    assert [entry[1:] for entry in log] == [
        ("pid", 200, "ok"), ("tid", 300, "ok"), ("sem", SEM, "ok"), ("shm", SHM, "ok"),
        ("msg", MSG, "ok"), ("pty", 3, "ok")]
    assert errors == []


@as_root_and_nobody
def test_a_shell_script_gets_its_planned_pids_ipc_ids_and_pty(uid):
    script = """
        sleep 0 & echo $!; wait
        ipcmk -S 1
        ipcmk -M 4096
        ipcmk -Q
        script -qc tty /dev/null
        ipcrm -s %d -m %d -q %d
    """ % (SEM, SHM, MSG)
    # Each command is a process of its own: the shell's n-th fork gets the
    # n-th pid, and each of those processes finds its own entry.
    plan = plan_of([
        {"pid": 50, "next": {"pid": [60, 61, 62, 63, 64, 65]}},
        {"pid": 61, "next": {"sem": [SEM]}},
        {"pid": 62, "next": {"shm": [SHM]}},
        {"pid": 63, "next": {"msg": [MSG]}},
        {"pid": 64, "next": {"pty": [5]}},
    ])
    words, status, log, errors, stderr = run(["sh", "-c", script], plan, pid=50)
    assert status == 0, (stderr, words, log, errors)
    assert words == ["60", "Semaphore", "id:", str(SEM), "Shared", "memory", "id:", str(SHM),
                     "Message", "queue", "id:", str(MSG), "/dev/pts/5"]
    assert errors == []


def test_the_program_itself_gets_the_pid_asked_for(allocate):
    lines, status, _, _, _ = run(["sh", "-c", "echo $$"], pid=4321)
    assert (lines, status) == (["4321"], 0)


def test_a_taken_planned_id_fails_with_ebusy_in_strict_mode(allocate):
    held_master, held_slave = os.openpty()  # pty 0 is taken
    try:
        plan = plan_of([{"pid": 100, "next": {"pid": [1], "pty": [0]}}])
        lines, status, log, _, _ = run([allocate, "all"], plan, strict=True, pid=100)
        assert lines[0] == "pid:errno=%d" % errno.EBUSY  # pid 1 is this test's init
        assert lines[1] == "tid:errno=%d" % errno.EBUSY  # strict: the plan names no tid
        assert lines[-1] == "pty:errno=%d" % errno.EBUSY
        assert ("pid", 1, "busy") in [entry[1:] for entry in log]
    finally:
        os.close(held_master)
        os.close(held_slave)


def test_without_strict_a_taken_planned_id_gives_an_ordinary_one(allocate):
    plan = plan_of([{"pid": 100, "next": {"pid": [1]}}])
    lines, status, log, _, _ = run([allocate, "fork", "1"], plan, pid=100)
    assert status == 0 and lines[0].startswith("pid=") and lines[0] != "pid=1"
    assert [entry[1:] for entry in log] == [("pid", 1, "busy")]


def test_an_exhausted_plan_gives_ordinary_ids_or_ebusy_when_strict(allocate):
    plan = plan_of([{"pid": 100, "next": {"pid": [200]}}])
    lines, _, _, _, _ = run([allocate, "fork", "2"], plan, pid=100)
    assert lines[0] == "pid=200" and lines[1].startswith("pid=") and lines[1] != "pid=200"
    lines, _, _, _, _ = run([allocate, "fork", "2"], plan, strict=True, pid=100)
    assert lines == ["pid=200", "pid:errno=%d" % errno.EBUSY]


@as_root_and_nobody
def test_a_shell_asks_for_a_pid_through_the_request_fd(uid):
    lines, status, log, errors, stderr = run(
        ["sh", "-c", "echo pid=4242 >&$IDPIN_REQUEST_FD; sleep 0.1 & echo $!; wait"])
    assert (lines, status, errors) == (["4242"], 0, []), stderr


def test_a_c_program_asks_for_its_thread_s_next_pid(allocate):
    lines, status, _, errors, _ = run([allocate, "request", "pid=4243"])
    assert lines == ["write=8", "pid=4243"]
    lines, status, _, errors, _ = run([allocate, "request", "pid=x"])
    assert lines[0] == "write:errno=%d" % errno.EINVAL and lines[1] != "pid=x"
    assert len(errors) == 1 and "bad id 'x'" in errors[0]


def test_a_request_fd_number_reused_for_a_file_is_a_plain_write(allocate):
    with tempfile.TemporaryDirectory() as workdir:
        path = os.path.join(workdir, "log")
        lines, status, _, errors, _ = run([allocate, "reuse", path])
        with open(path) as f:
            assert f.read() == "pid=9"
    assert lines[:2] == [lines[0], "write=5"] and lines[0].startswith("reused=")
    assert lines[2] != "pid=9" and errors == []


def test_a_taken_requested_id_is_ebusy_even_without_strict(allocate):
    lines, _, _, _, _ = run([allocate, "request", "pid=1"])
    assert lines == ["write=5", "pid:errno=%d" % errno.EBUSY]


def test_request_lines_are_checked():
    assert parse_request(b"sem=32769 pty=5\n") == {"sem": 32769, "pty": 5}
    for bad in (b"", b"pid", b"pid=1 pid=2", b"nope=3", b"pid=-4", b"sem=2147483648", b"\xff"):
        with pytest.raises(idpin.RequestError):
            parse_request(bad)


def test_a_bad_plan_is_refused_before_anything_runs():
    with pytest.raises(idpin.RequestError, match="unknown kind"):
        idpin.Supervisor(plan_of([{"pid": 5, "next": {"fd": [3]}}]))
    with pytest.raises(idpin.RequestError, match="version 1"):
        idpin.Supervisor({"idpin_plan": 2})


def test_calls_with_nothing_pending_are_answered_in_the_receive_loop(allocate):
    with idpin.Supervisor() as sup:
        proc = sup.spawn([allocate, "fork", "20"], stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and len(out.split()) == 20
        assert sup.fast_answers >= 20 and sup.log == []


def test_forks_under_a_signal_storm_keep_their_planned_pids(allocate):
    # SIGALRM every 2 ms (about the time a pinned fork takes): a call interrupted before it is received restarts
    # (SA_RESTART) and is trapped again; none may come out with another pid.
    wanted = list(range(1000, 1040))
    plan = plan_of([{"pid": 100, "next": {"pid": wanted}}])
    lines, status, _, errors, _ = run([allocate, "signals", str(len(wanted))], plan, pid=100, timeout=30)
    assert lines == ["pid=%d" % pid for pid in wanted]
    assert (status, errors) == (0, [])


def test_a_program_killed_mid_call_leaves_nothing_and_the_supervisor_goes_on(allocate):
    plan = plan_of([{"pid": 100, "next": {"pid": list(range(2000, 2400)), "sem": [SEM]}}])
    with idpin.Supervisor(plan) as sup:
        proc = sup.spawn([allocate, "fork", "400"], pid=100, stdout=subprocess.DEVNULL)
        time.sleep(0.05)
        proc.kill()
        proc.wait()
        # Its last child may be a zombie reparented to us (pid 1).
        _reap_orphans()
        assert sup.errors == []
        again = sup.spawn(["sh", "-c", "echo pid=3000 >&$IDPIN_REQUEST_FD; sleep 0 & echo $!; wait"],
                          stdout=subprocess.PIPE)
        assert again.communicate(timeout=60)[0].split() == [b"3000"]
    assert knob("sem_next_id") == -1


def test_a_killed_supervisor_fails_the_programs_calls_and_arms_nothing(allocate):
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()
    out_read, out_write = os.pipe()
    supervisor = os.fork()
    if supervisor == 0:
        try:
            sup = idpin.Supervisor(plan_of([{"pid": 100, "next": {"pid": [600], "sem": [SEM]}}]))
            sup.spawn(["sh", "-c", "read x; sleep 0 & echo forked $!"], pid=100,
                      stdin=go_read, stdout=out_write, stderr=out_write)
            os.write(ready_write, b"r")
            time.sleep(60)
        finally:
            os._exit(1)
    for fd in (ready_write, go_read, out_write):
        os.close(fd)
    assert os.read(ready_read, 1) == b"r"
    os.kill(supervisor, signal.SIGKILL)
    reap(supervisor)
    os.write(go_write, b"go\n")
    os.close(go_write)
    output = b""
    while chunk := os.read(out_read, 4096):
        output += chunk
    os.close(out_read)
    os.close(ready_read)
    reap(100)  # the program was reparented to this test's init
    text = output.decode()
    # ENOSYS once the listener is gone: dash reports it and gives up.
    assert "Cannot fork" in text and "forked" not in text
    assert knob("sem_next_id") == -1


def test_a_call_whose_caller_died_is_enoent_not_an_error(backend):
    bpf = seccomp_filter.build_bpf()
    ours, theirs = socket.socketpair()
    child = os.fork()
    if child == 0:
        try:
            fd = _sys.seccomp_listen(bpf, 0)
            socket.send_fds(theirs, [b"L"], [fd])
            os.fork()  # trapped: waits for us, and we never answer
        finally:
            os._exit(0)
    theirs.close()
    _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    ours.close()
    listener = fds[0]
    try:
        notification = _sys.notif_recv(listener)
        assert notification[1] == child
        assert _sys.notif_id_valid(listener, notification[0])
        os.kill(child, signal.SIGKILL)
        reap(child)
        assert not _sys.notif_id_valid(listener, notification[0])
        assert _sys.notif_send(listener, notification[0], 0, 0, _sys.SECCOMP_USER_NOTIF_FLAG_CONTINUE) is False
    finally:
        os.close(listener)


def _reap_orphans(timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)


class IdpinRun:
    """``idpin run ARGS`` in a forked child (cli.main: no interpreter to exec,
    which an unprivileged user may not be able to read)."""

    def __init__(self, *args):
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        self.pid = ORIGINALS["os.fork"]()
        if self.pid == 0:
            status = 70
            try:
                os.dup2(out_write, 1)
                os.dup2(err_write, 2)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                status = cli.main(["run", *args])
                sys.stderr.flush()
            finally:
                os._exit(status)
        os.close(out_write)
        os.close(err_write)
        self.stdout = os.fdopen(out_read, "rb")
        self.stderr = os.fdopen(err_read, "rb")

    def finish(self):
        out, err = self.stdout.read(), self.stderr.read()
        self.stdout.close()
        self.stderr.close()
        return out, err, reap(self.pid)


@as_root_and_nobody
def test_idpin_run_gives_the_planned_pids_in_fresh_namespaces_and_passes_the_status(uid):
    with tempfile.NamedTemporaryFile("w", suffix=".json") as plan:
        json.dump(plan_of([{"pid": 100, "next": {"pid": [2, 101]}}]), plan)
        plan.flush()
        out, err, status = IdpinRun("--plan", plan.name, "--", "sh", "-c",
                                    "echo $$; sleep 0 & echo $!; wait; sleep 0 & echo $!; wait; exit 3").finish()
    assert (out.split(), status) == ([b"100", b"2", b"101"], 3), err


def test_idpin_run_passes_signals_on_and_honours_the_request_fd():
    script = 'trap "echo got TERM; exit 5" TERM; echo pid=4242 >&$IDPIN_REQUEST_FD; ' \
             'sleep 0 & echo $!; wait; echo ready; while :; do sleep 0.05; done'
    run = IdpinRun("--pid", "77", "--", "sh", "-c", script)
    assert run.stdout.readline() == b"4242\n"
    assert run.stdout.readline() == b"ready\n"
    os.kill(run.pid, signal.SIGTERM)
    out, _, status = run.finish()
    assert (out, status) == (b"got TERM\n", 5)


def test_the_supervisor_s_threads_leave_the_pids_after_the_program_s_free(allocate):
    plan = plan_of([{"pid": 100, "next": {"pid": [101, 102]}}])
    lines, status, _, errors, _ = run([allocate, "fork", "2"], plan, pid=100)
    assert (lines, status, errors) == (["pid=101", "pid=102"], 0, [])


def test_idpin_run_here_supervises_in_the_current_namespaces():
    out, err, status = IdpinRun("--here", "--pid", "300", "--", "sh", "-c",
                                "echo $$; echo pid=301 >&$IDPIN_REQUEST_FD; sleep 0 & echo $!; wait").finish()
    assert (out.split(), status) == ([b"300", b"301"], 0), err


@as_root_and_nobody
def test_idpin_run_makes_a_plan_root_of_pid_1_the_namespace_s_init(uid):
    with tempfile.NamedTemporaryFile("w", suffix=".json") as plan:
        json.dump(plan_of([{"pid": 1, "next": {"pid": [2, 3]}}, {"pid": 3, "next": {"sem": [SEM]}}]), plan)
        plan.flush()
        script = "echo $$; sleep 0 & echo $!; wait; ipcmk -S 1; echo pid=77 >&$IDPIN_REQUEST_FD; " \
                 "sh -c 'echo $$'; exit 4"
        out, err, status = IdpinRun("--plan", plan.name, "--", "sh", "-c", script).finish()
    assert (out.split(), status) == ([b"1", b"2", b"Semaphore", b"id:", str(SEM).encode(), b"77"], 4), err


def test_the_feature_probe_finds_what_this_kernel_version_has():
    from idpin.interpose.features import FEATURES

    release = tuple(int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
    from idpin.probe import probe_supervisor

    caps = probe_supervisor()
    for name, (_, version) in FEATURES.items():
        wanted = tuple(int(part) for part in version.split("."))
        assert caps[name].ok == (release >= wanted), (name, caps[name])
        assert caps[name].ok or "Linux %s" % version in caps[name].reason


def test_the_notification_calls_leak_neither_objects_nor_fds(backend):
    calls, warmup = 3000, 200
    bpf = seccomp_filter.build_bpf(only=("getppid",))
    ours, theirs = socket.socketpair()
    child = os.fork()
    if child == 0:
        try:
            socket.send_fds(theirs, [b"L"], [_sys.seccomp_listen(bpf, 0)])
            for _ in range(calls + warmup):
                os.getppid()
        finally:
            os._exit(0)
    theirs.close()
    listener = socket.recv_fds(ours, 1, 1)[1][0]
    ours.close()
    stop_read, stop_write = os.pipe()
    control = bytearray(4 * _sys.LOOP_CONTROL_INTS)

    def one():
        nid, pid, nr, arch, ip, args = _sys.notif_loop(listener, stop_read, -1, control)
        assert _sys.process_vm_read(pid, ip, 8) and _sys.notif_id_valid(listener, nid)
        assert _sys.notif_send(listener, nid, 0, 0, _sys.SECCOMP_USER_NOTIF_FLAG_CONTINUE)

    try:
        for _ in range(warmup):
            one()
        fds, blocks = testing_open_fds(), sys.getallocatedblocks()
        for _ in range(calls):
            one()
        assert testing_open_fds() == fds
        assert sys.getallocatedblocks() - blocks < 200
        assert _sys.notif_loop(listener, stop_read, -1, control) is None  # the child is gone: POLLHUP
    finally:
        for fd in (listener, stop_read, stop_write):
            os.close(fd)
        reap(child)


# ---------------------------------------------------------------- the program rewriting its memory meanwhile

REWRITES = 40


def test_a_request_line_rewritten_during_the_write_acts_as_the_copy_the_supervisor_validated(rewrite):
    # The line flips between "pid=4500" and "pid=xxxx" (any mix of the two is
    # invalid) while the write waits: each write either asked for 4500, and
    # the fork after it gets exactly 4500, or failed with EINVAL, and the fork
    # after it is ordinary (nothing was left pending).
    lines, status, log, errors, stderr = run([rewrite, "request", "4500", str(REWRITES)])
    assert status == 0, stderr
    asked = [line for line in lines if line.startswith("ok=")]
    refused = [line for line in lines if line.startswith("einval=")]
    assert len(asked) + len(refused) == REWRITES, lines
    assert asked == ["ok=4500"] * len(asked)
    assert all(int(line.split("=")[1]) not in (-1, 4500) for line in refused), refused
    assert [entry[1:] for entry in log] == [("pid", 4500, "ok")] * len(asked)
    assert len(errors) == len(refused) and all("bad request line" in error for error in errors), errors


@pytest.mark.parametrize("bad_flags", [
    pytest.param(1 << 40, id="unknown-flag"),
    pytest.param(0x10000, id="clone-thread-alone"),  # CLONE_THREAD without CLONE_SIGHAND
])
def test_a_clone3_block_rewritten_during_the_call_gives_the_asked_pid_or_einval(rewrite, bad_flags):
    # Each clone3 follows a request for pid 4600 while a second thread flips
    # its flags between 0 (a plain process) and an invalid value: the kernel
    # reads the block again when the call continues, so each call either
    # creates a process with exactly pid 4600 or fails with EINVAL; never a
    # process with another pid, never a thread.
    lines, status, log, errors, stderr = run([rewrite, "clone3", "4600", str(REWRITES), "%x" % bad_flags])
    assert status == 0, stderr
    made = [line for line in lines if line == "clone3=4600"]
    failed = [line for line in lines if line == "clone3:errno=%d" % errno.EINVAL]
    assert len(made) + len(failed) == REWRITES, (lines, log)
    outcomes = [entry[1:] for entry in log]
    assert outcomes.count(("pid", 4600, "ok")) == len(made), outcomes
    assert errors == []


def test_a_fork_interrupted_before_it_is_received_is_retried_and_gets_the_planned_pid(rewrite):
    # A trapped call waits interruptibly until it is received: a signal then
    # fails it with EINTR (no SA_RESTART). Nobody receives here until the
    # signal has done so; the call is gone (RECV: ENOENT, no error), the plan
    # entry is not spent, and the program's retry gets it.
    ours, theirs = socket.socketpair()
    out_read, out_write = os.pipe()
    go_read, go_write = os.pipe()
    bpf = seccomp_filter.build_bpf()
    child = ORIGINALS["os.fork"]()
    if child == 0:
        try:
            os.dup2(go_read, 0)
            os.dup2(out_write, 1)
            listener = _sys.seccomp_listen(bpf, _sys.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV)
            socket.send_fds(theirs, [b"L"], [listener])
            os.execv(rewrite, [rewrite, "eintr"])
        finally:
            os._exit(70)
    theirs.close()
    os.close(out_write)
    os.close(go_read)
    listener = socket.recv_fds(ours, 1, 1)[1][0]
    ours.close()
    requests, program_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with os.fdopen(out_read, "rb") as out:
        try:
            assert out.readline() == b"forking\n"
            waiting = select.poll()
            waiting.register(listener, select.POLLIN)
            assert waiting.poll(10_000), "the program's fork was never trapped"
            os.kill(child, signal.SIGUSR1)
            assert out.readline() == b"pid:errno=%d\n" % errno.EINTR
            assert _sys.notif_recv(listener) is None  # the interrupted call is gone
            with idpin.Supervisor(plan_of([{"pid": child, "next": {"pid": [700]}}])) as sup:
                sup.attach(listener, requests)
                listener = -1  # the supervisor's now
                os.write(go_write, b"g")
                assert out.readline() == b"pid=700\n"
                assert reap(child) == 0
                assert (sup.log, sup.errors) == ([(child, "pid", 700, "ok")], [])
                child = 0
        finally:
            if child:
                os.kill(child, signal.SIGKILL)
                reap(child)
            if listener >= 0:
                os.close(listener)
            os.close(go_write)
            program_end.close()


REQUEST_FD = 99  # trapped whatever it is: the filter matches the number


@pytest.mark.parametrize("call", ["write", "clone3"])
def test_memory_read_after_its_caller_died_and_its_pid_was_reused_is_not_acted_on(call):
    # The caller is killed after its call was received, and another process
    # gets its pid with the same bytes at the same address (both forked from
    # here, the buffers made before): the supervisor's read succeeds, and
    # only NOTIF_ID_VALID tells that what it read is not the call's. Nothing
    # may come of it: no request recorded, no knob armed, no error.
    line = ctypes.create_string_buffer(b"pid=800", 7)
    clone_args = ctypes.create_string_buffer(88)
    struct_args = (ctypes.c_uint64 * 11).from_buffer(clone_args)
    struct_args[4] = signal.SIGCHLD  # exit_signal
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    bpf = seccomp_filter.build_bpf(request_fd=REQUEST_FD)
    ours, theirs = socket.socketpair()
    caller = ORIGINALS["os.fork"]()
    if caller == 0:
        try:
            socket.send_fds(theirs, [b"L"], [_sys.seccomp_listen(bpf, 0)])
            if call == "write":
                libc.write(REQUEST_FD, line, 7)
            else:
                libc.syscall(435, clone_args, 88)  # SYS_clone3
        finally:
            os._exit(0)
    theirs.close()
    listener = socket.recv_fds(ours, 1, 1)[1][0]
    ours.close()
    requests, program_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    requests.setblocking(False)
    wait_read, wait_write = os.pipe()
    try:
        notification = _sys.notif_recv(listener)
        assert notification[1] == caller
        os.kill(caller, signal.SIGKILL)
        reap(caller)
        with idpin.request(pid=caller):
            impostor = os.fork()
        if impostor == 0:
            os.read(wait_read, 1)
            os._exit(0)
        try:
            assert impostor == caller
            address = notification[5][0 if call == "clone3" else 1]
            expected = clone_args.raw[:8] if call == "clone3" else line.raw
            assert _sys.process_vm_read(impostor, address, len(expected)) == expected
            with idpin.Supervisor(plan_of([{"pid": caller, "next": {"pid": [900]}}])) as sup:
                channel = supervisor_module._Channel(requests)
                channel.listener = listener
                last_pid = knob("ns_last_pid")  # the supervisor's threads are made
                sup._handle(channel, notification)
                assert knob("ns_last_pid") == last_pid
                assert (sup.log, sup.errors) == ([], [])
                assert sup.pending.peek(caller, caller, "pid") == ("plan", 900)  # the plan's, not the line's
        finally:
            os.write(wait_write, b"x")
            reap(impostor)
    finally:
        for fd in (listener, wait_read, wait_write):
            os.close(fd)
        requests.close()
        program_end.close()


def test_the_clone3_blocks_the_supervisor_refuses_itself_are_the_ones_the_kernel_refuses():
    # What the supervisor answers EINVAL from its copy must be EINVAL from
    # the kernel too, and what it lets through must not be refused by it.
    from idpin.interpose.supervisor import _clone3_invalid

    invalid = [(1 << 40, 17), (0x11, 17), (0x00400000, 17), (0x10000, 0), (0x800, 0), (0x8000, 17),
               (0, 65), (0, 0x100), (0x100 | 0x800 | (1 << 32), 0)]
    pthread = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000 | 0x80000 | 0x100000 | 0x200000
    valid = [(0, 17), (0x8000, 0), (pthread, 0), (0x100 | 0x4000, 17), (0x80, 17), (1 << 32, 17)]
    assert [_clone3_invalid(*case) for case in invalid + valid] == [True] * len(invalid) + [False] * len(valid)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    for flags, exit_signal in invalid:
        block = (ctypes.c_uint64 * 11)(flags, 0, 0, 0, exit_signal)
        rc = libc.syscall(435, block, 88)  # SYS_clone3
        if rc == 0:
            libc.syscall(231, 0)  # SYS_exit_group: a child the kernel should not have made
        if rc > 0:
            reap(rc)
        assert (rc, ctypes.get_errno()) == (-1, errno.EINVAL), (hex(flags), exit_signal)


# ---------------------------------------------------------------- faults while a call waits

def test_forks_under_interrupting_signals_keep_their_planned_pids_none_lost(rewrite):
    # SIGALRM every 2 ms through a handler without SA_RESTART: a fork hit
    # before it is received fails with EINTR and the program tries again; a
    # received one waits killably and runs. No plan entry may be spent on a
    # fork that failed, and none may go to another fork.
    wanted = list(range(1100, 1130))
    plan = plan_of([{"pid": 100, "next": {"pid": wanted}}])
    lines, status, _, errors, stderr = run([rewrite, "storm", str(len(wanted))], plan, pid=100, timeout=30)
    assert (status, errors) == (0, []), stderr
    assert lines[:-1] == ["pid=%d" % pid for pid in wanted]
    assert lines[-1].startswith("retried=")


def test_a_program_killed_while_its_pinned_semget_waits_leaves_no_knob_armed(rewrite):
    # The semget is refused before it reads the knob the supervisor armed
    # (too many semaphores), and the program is killed before it makes
    # another call: the supervisor's wait ends and it consumes the knob.
    plan = plan_of([{"pid": 100, "next": {"sem": [SEM]}}])
    with idpin.Supervisor(plan) as sup:
        proc = sup.spawn([rewrite, "stalled"], pid=100, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"sem:errno=%d\n" % errno.EINVAL
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    assert [entry[1:] for entry in sup.log] == [("sem", SEM, "not-allocated")]
    assert sup.errors == []
    assert knob("sem_next_id") == -1


def test_a_supervisor_killed_while_a_knob_is_armed_leaves_it_to_the_next_idpin_user(rewrite, monkeypatch):
    # Killed between arming sem_next_id and seeing it consumed, the
    # supervisor can undo nothing: the program's later calls fail (ENOSYS,
    # never the armed id), and the next process to take idpin's IPC lock
    # finds the knob armed by a dead holder and consumes it.
    # The supervisor waits for the call's end long enough to be killed in it.
    monkeypatch.setattr(supervisor_module._wait_knob, "__defaults__", (60.0,))
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()
    out_read, out_write = os.pipe()
    supervisor = ORIGINALS["os.fork"]()
    if supervisor == 0:
        try:
            sup = idpin.Supervisor(plan_of([{"pid": 100, "next": {"sem": [SEM]}}]))
            sup.spawn([rewrite, "stalled"], pid=100, stdin=go_read, stdout=out_write)
            os.write(ready_write, b"r")
            time.sleep(60)
        finally:
            os._exit(1)
    for fd in (ready_write, go_read, out_write):
        os.close(fd)
    with os.fdopen(out_read, "rb") as out:
        try:
            assert os.read(ready_read, 1) == b"r"
            assert out.readline() == b"sem:errno=%d\n" % errno.EINVAL
            assert knob("sem_next_id") == SEM  # the supervisor waits for the call to consume it
            os.kill(supervisor, signal.SIGKILL)
            reap(supervisor)
            os.write(go_write, b"g")
            assert out.readline() == b"sem:errno=%d\n" % errno.ENOSYS
            # Reparented to this test's init. Its exit_group is trapped too
            # and fails with ENOSYS, so glibc's _exit ends it with a fault:
            # reaped, whatever its status.
            reap(100)
            assert knob("sem_next_id") == SEM
            with idpin.request(sem=SEM + 1):
                pass
            assert knob("sem_next_id") == -1
        finally:
            os.close(ready_read)
            os.close(go_write)


def test_a_clone3_block_rewritten_between_a_thread_and_a_process_never_keeps_a_wrong_pid(rewrite):
    # Both blocks are valid, so the supervisor cannot refuse either: each
    # clone3 follows a request for pid 4700, and the kernel makes what it
    # reads once the call continues. A process made that way has exactly
    # 4700, or it is killed and recorded (the block was a thread's when the
    # supervisor read it, or 4700 was not free yet); a thread may have any
    # tid, 4700 included.
    lines, status, log, errors, stderr = run([rewrite, "kinds", "4700", str(REWRITES)])
    assert status == 0, stderr
    processes = [line for line in lines if line.startswith("process=")]
    threads = [line for line in lines if line.startswith("thread=")]
    busy = [line for line in lines if line == "clone3:errno=%d" % errno.EBUSY]
    assert len(processes) + len(threads) + len(busy) == REWRITES, lines
    killed = [line for line in processes if line.endswith(":%d" % signal.SIGKILL)]
    assert sorted(processes) == sorted(["process=4700:0"] * (len(processes) - len(killed)) + killed), lines
    assert len([error for error in errors if "killed it" in error]) == len(killed), errors
    assert all(entry[1:] in (("pid", 4700, "ok"), ("pid", 4700, "wrong"), ("pid", None, "wrong"),
                             ("pid", 4700, "busy")) for entry in log), log


def test_a_pinned_call_that_failed_early_is_over_while_its_thread_waits_elsewhere(rewrite, monkeypatch):
    # The semget is refused before it reads the knob, and the program then
    # waits in read(2), which is not trapped: no newer trap will tell the
    # supervisor the call is over. /proc does (the thread is in another
    # syscall): the knob is consumed and the plan entry kept, long before
    # the (here 60 s) bound on the wait.
    monkeypatch.setattr(supervisor_module._wait_knob, "__defaults__", (60.0,))
    plan = plan_of([{"pid": 100, "next": {"sem": [SEM]}}])
    with idpin.Supervisor(plan) as sup:
        proc = sup.spawn([rewrite, "stalled"], pid=100, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"sem:errno=%d\n" % errno.EINVAL
        assert wait_until(lambda: sup.log, timeout=30)
        assert [entry[1:] for entry in sup.log] == [("sem", SEM, "not-allocated")]
        assert knob("sem_next_id") == -1
        out, _ = proc.communicate(b"g", timeout=30)
        assert (out, proc.returncode) == (b"sem=%d\n" % SEM, 0)  # the entry was kept for it
        assert sup.errors == []
