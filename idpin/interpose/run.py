"""``idpin run``: an unmodified program under the supervisor, with its planned ids.

By default the program runs in fresh user+pid+ipc+mount namespaces with
their own /proc and devpts (idpin.testing's setup): this process enters
them and forks their init, which runs the Supervisor and starts the program
with its pid (``--pid N``, else the plan's root). A program that must be
pid 1 is the init itself, with the supervisor beside it (_run_as_init). The supervisor lives in
the program's namespaces, so its knob writes act on them. ``--here`` runs in
the current namespaces instead (it needs CAP_CHECKPOINT_RESTORE or
CAP_SYS_ADMIN over them). Signals sent to ``idpin run`` are passed on to the
program; its exit status (128 + N when killed by signal N) is returned.
"""
import os
import signal
import socket
import sys
import time

from .. import _sys, pids, testing
from ..interpose import ORIGINALS
from . import filter as seccomp_filter
from .supervisor import ENV, Supervisor, _install, load_plan

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT)


def exit_status(returncode):
    return 128 - returncode if returncode < 0 else returncode


def root_pid(pid, plan):
    """The pid the program itself gets: --pid, else the plan's root, else None."""
    root = pid if pid is not None else (plan or {}).get("root")
    if root is None:
        return None
    return pids.validate_pid(root)


def run(argv, pid=None, plan=None, strict=False, here=False):
    """Run ``argv`` supervised; its exit status."""
    if not argv:
        raise ValueError("idpin run needs a command: idpin run [options] -- CMD [ARG...]")
    loaded = load_plan(plan) if plan is not None else None
    root = root_pid(pid, loaded)
    if here:
        return _supervise(argv, root, plan, strict)
    if root == 1:
        return _run_as_init(argv, plan, strict)
    testing.enter_namespaces()
    init = ORIGINALS["os.fork"]()
    if init == 0:
        status = 70
        try:
            testing.mount_proc_and_devpts()
            # The supervisor's threads take pids here: from the top of the
            # range, not the low ones a plan names.
            _move_cursor(pids.namespace_pid_max() - 64)
            status = _supervise(argv, root, plan, strict)
        finally:
            os._exit(status)
    return _forward_until_exit(init)


def _run_as_init(argv, plan, strict):
    """The program as pid 1 of fresh namespaces, the supervisor beside it.

    The program is forked first (the namespace's init); the supervisor is
    forked next with clone3 set_tid at the top of the pid range, so that it
    is a member of the same pid namespace (its ns_last_pid writes and its
    /proc act on it) without taking a pid a plan could name. The program
    installs the filter and hands the listener over before it execs. When
    the program exits, the kernel ends everything else in its namespace,
    the supervisor included.
    """
    request_number = 3
    bpf = seccomp_filter.build_bpf(request_number)
    supervisor_pid = pids.namespace_pid_max() - 1
    testing.enter_namespaces()
    handoff, handoff_peer = socket.socketpair()
    requests, request_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    program = ORIGINALS["os.fork"]()
    if program == 0:
        handoff.close()
        requests.close()
        _launch_init(argv, bpf, handoff_peer, request_end, request_number)
    handoff_peer.close()
    request_inode = os.fstat(request_end.fileno()).st_ino
    request_end.close()
    supervisor = pids.fork(pid=supervisor_pid, mechanism="clone3")
    if supervisor == 0:
        _supervise_init(plan, strict, handoff, requests, request_inode)
    handoff.close()
    requests.close()
    # The supervisor must be reaped while we wait: the exiting init waits
    # until every task of its namespace is gone, a zombie child of ours too.
    return _forward_until_exit(program, also=supervisor)


def _launch_init(argv, bpf, handoff, request_end, request_number):
    status = 127
    try:
        fd = _install(bpf, _sys.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV)
        socket.send_fds(handoff, [b"L"], [fd])
        os.close(fd)
        if handoff.recv(1) != b"A":
            raise RuntimeError("idpin: the supervisor did not take the listener")
        os.dup2(request_end.fileno(), request_number, inheritable=True)
        os.closerange(request_number + 1, 1 << 16)
        env = dict(os.environ, **{ENV: str(request_number)})
        os.execvpe(argv[0], argv, env)
    except BaseException as err:
        sys.stderr.write("idpin run: cannot start %s: %s\n" % (argv[0], err))
    finally:
        os._exit(status)


def _supervise_init(plan, strict, handoff, requests, request_inode):
    status = 70
    try:
        testing.mount_proc_and_devpts()
        # Our threads take pids of this namespace: start them at the top of
        # the range, then give the cursor back to the program.
        _move_cursor(os.getpid() - 16)
        sup = Supervisor(plan, strict=strict)
        _, fds, _, _ = socket.recv_fds(handoff, 1, 1)
        sup.attach(fds[0], requests, request_inode)
        _move_cursor(1)
        handoff.send(b"A")
        while True:  # until the program's exit ends the namespace
            time.sleep(3600)
    except BaseException as err:
        sys.stderr.write("idpin run: the supervisor failed: %s\n" % err)
    finally:
        os._exit(status)


def _move_cursor(last_pid):
    """ns_last_pid = last_pid in this (fresh) pid namespace."""
    knob = os.open("/proc/sys/kernel/ns_last_pid", os.O_RDWR | os.O_CLOEXEC)
    try:
        _sys.knob_write(knob, last_pid)
    finally:
        os.close(knob)


def _supervise(argv, root, plan, strict):
    with Supervisor(plan, strict=strict) as sup:
        proc = sup.spawn(argv, pid=root)
        previous = {sig: signal.signal(sig, lambda sig, frame: _pass_on(proc.pid, sig)) for sig in FORWARDED}
        try:
            returncode = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return exit_status(returncode)


def _pass_on(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _forward_until_exit(init, also=None):
    """Wait for ``init`` (passing signals on), reaping ``also`` too; init's status."""
    previous = {sig: signal.signal(sig, lambda sig, frame: _pass_on(init, sig)) for sig in FORWARDED}
    try:
        while True:
            try:
                pid, status = os.waitpid(-1 if also else init, 0)
            except InterruptedError:
                continue
            if pid == init:
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if also:
            _pass_on(also, signal.SIGKILL)
            try:
                os.waitpid(also, 0)
            except ChildProcessError:
                pass  # reaped in the loop
    return os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else exit_status(
        os.waitstatus_to_exitcode(status))
