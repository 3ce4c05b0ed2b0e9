"""The restore's tasks, as they run in the processes they become.

Each task is a process forked (clone3 set_tid) by the task the layout names:
it checks its parent is alive (PR_SET_PDEATHSIG: a killed restorer takes its
whole tree with it), forks what its script says in the script's order, joins
its group, installs its pty fds, starts its threads, reports ready on the
shared status pipe and waits for the restorer's go (the go pipe's EOF). Then
it runs ``target(entry)`` or waits until torn down.

A forked child does not return into its parent's frames: ``_Born`` unwinds
to ``serve``, which runs the child's own script, so a 10,000-deep chain
needs no deeper Python stack than a flat tree. Nothing between ``serve`` and
a fork has a ``finally`` with side effects, and failures are caught as
``Exception`` (``_Born`` is not one).

Every wait is bounded by the restore's deadline (CLOCK_MONOTONIC is one
clock for all processes).
"""
import errno
import gc
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback

from .. import _sys, pids
from ..errors import IdBusyError, IdpinError
from ..request import request as id_request
from .tree import RESTORER

# Status records: a 4-byte length and a pickle, written in one write() no
# longer than PIPE_BUF so that records of many writers never interleave.
RECORD_MAX = 4000
READY, FAILED, IPC_DONE = "ready", "failed", "ipc"
# The exit status of a task that failed (after reporting why).
FAILED_EXIT = 3
# Polling a group that another subtree's process creates: first and last pause.
POLL_FIRST, POLL_LAST = 0.0002, 0.005

# Called as fault(step, pid) at each step of each task (tests inject faults:
# a SIGKILL between two steps). None in normal use.
fault = None


class _Born(BaseException):
    """Raised in a freshly forked child: unwind to ``serve`` and become task ``pid``.

    A helper has no script: ``work`` is what it does instead.
    """

    def __init__(self, pid, work=None):
        self.pid = pid
        self.work = work


class TaskFailed(Exception):
    """A task failed; ``where`` names the plan entry (or stand-in) concerned."""

    def __init__(self, where, error):
        self.where = where
        self.error = error
        Exception.__init__(self, "%s: %s" % (where, error))


class Context:
    """What every task needs; inherited by fork, never changed after the first."""

    def __init__(self, layout, status_fd, go_fd, deadline, target, restorer_fds=()):
        self.layout = layout
        self.scripts = layout.scripts
        self.status_fd = status_fd
        self.go_fd = go_fd
        self.deadline = deadline
        self.target = target
        self.restorer_fds = tuple(restorer_fds)  # closed by the tasks the restorer forks
        self.restorer_pid = 0                     # their parent, as they see it
        self.pty_fds = {}                         # pty index -> (master, slave), inherited
        self.tid_offset = _sys.tid_cache_offset()

    def remaining(self):
        return self.deadline - time.monotonic()


# -- reporting -------------------------------------------------------------

def report(ctx, tag, pid, payload=None):
    data = pickle.dumps((tag, pid, payload))
    if len(data) > RECORD_MAX:
        data = pickle.dumps((tag, pid, _shrunk(payload)))
    os.write(ctx.status_fd, len(data).to_bytes(4, "little") + data)


def _shrunk(payload):
    if isinstance(payload, tuple) and len(payload) == 3:
        where, error, tb = payload
        return where, RuntimeError(("%s: %s" % (type(error).__name__, error))[:1500]), tb[-1500:]
    return None


def _picklable(error):
    """``error``, or a RuntimeError saying what it was when it cannot cross a pipe."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError("%s: %s" % (type(error).__name__, error))


def report_failure(ctx, pid, where, error):
    if isinstance(error, TaskFailed):
        where, error = error.where, error.error
    error = _picklable(error)
    tb = "".join(traceback.format_exception(error))[-2000:]
    try:
        report(ctx, FAILED, pid, (where, error, tb))
    except OSError:
        pass  # the restorer is gone: its death tears everything down anyway


def read_records(buffer):
    """Split complete records off ``buffer``; (records, rest)."""
    records = []
    while len(buffer) >= 4:
        size = int.from_bytes(buffer[:4], "little")
        if len(buffer) < 4 + size:
            break
        records.append(pickle.loads(buffer[4:4 + size]))
        buffer = buffer[4 + size:]
    return records, buffer


# -- forking ---------------------------------------------------------------

def fork_task(ctx, pid, where, sibling=False):
    """Fork the task ``pid`` (its own pid through set_tid); its pid, or _Born in it."""
    try:
        if sibling:
            child = _sys.clone3_sibling((pid,), ctx.tid_offset)
        else:
            child = _sys.clone3_fork((pid,), ctx.tid_offset)
    except OSError as err:
        raise TaskFailed(where, pids._translate_clone3_error(err, pid)) from None
    if child == 0:
        raise _Born(pid)
    return child


def fork_spare(ctx, candidates, role, work):
    """Fork a helper running ``work`` on the first free pid of ``candidates``; its pid."""
    for pid in candidates:
        try:
            child = _sys.clone3_fork((pid,), ctx.tid_offset)
        except OSError as err:
            if err.errno == errno.EEXIST:
                continue
            raise TaskFailed("idpin's %s" % role, pids._translate_clone3_error(err, pid)) from None
        if child == 0:
            raise _Born(pid, work)
        return child
    raise TaskFailed("idpin's %s" % role, IdBusyError(
        "pid", candidates[0], "no spare pid free among %s for a restore helper" % candidates))


def serve(ctx, pid, work=None):
    """Run task ``pid`` in this (new) process, then the tasks it is forked into; never returns."""
    status = FAILED_EXIT
    while True:
        try:
            if work is not None:
                work()
            else:
                run_script(ctx, ctx.scripts[pid])
            status = 0
            break
        except _Born as born:
            pid, work = born.pid, born.work
            continue
        except _Orphaned:
            break
        except BaseException as err:
            where = ctx.scripts[pid].where() if work is None else "idpin's helper %d" % pid
            report_failure(ctx, pid, where, err)
            break
    os._exit(status)


# -- the steps of a task -----------------------------------------------------

def _step(step, pid):
    if fault is not None:
        fault(step, pid)


class _Orphaned(BaseException):
    """The parent died before PR_SET_PDEATHSIG took effect: leave without a report.

    The parent's death is the failure; whoever sees it (its own parent, the
    restorer) names it. A report from here would race that one.
    """


def arm_parent_death(parent):
    """SIGKILL this process when its parent dies (a killed restorer takes its tree with it).

    The parent may have died before the prctl took effect: check it.
    """
    _sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        raise _Orphaned()


def run_script(ctx, script):
    _step("born", script.pid)
    forked_by_restorer = script.parent == RESTORER
    arm_parent_death(ctx.restorer_pid if forked_by_restorer else script.parent)
    if forked_by_restorer:
        for fd in ctx.restorer_fds:
            os.close(fd)
        if ctx.layout.fresh:
            # The first process of the fresh pid namespace: its own /proc.
            _sys.mount("proc", "/proc", "proc", _sys.MS_NOSUID | _sys.MS_NODEV | _sys.MS_NOEXEC, None)
    waited = []
    for pid in script.early:
        fork_task(ctx, pid, ctx.scripts[pid].where())
    if script.setsid:
        os.setsid()
    if script.lead_group:
        os.setpgid(0, 0)
    _step("session", script.pid)
    for pid in script.standins:
        waited.append((fork_task(ctx, pid, ctx.scripts[pid].where()), ctx.scripts[pid].where()))
    for candidates, chunk in script.helpers:
        waited.append((start_helper(ctx, script, candidates, chunk),
                       "idpin's helper for %s" % script.where()))
    for pid in script.children:
        fork_task(ctx, pid, ctx.scripts[pid].where())
    for pid in script.siblings:
        fork_task(ctx, pid, ctx.scripts[pid].where(), sibling=True)
    _step("forked", script.pid)
    if script.role == "group":
        wait_for_member(ctx, script)
    if script.join is not None and os.getpgrp() != script.join:
        join_group(ctx, script)
    if script.role == "process":
        install_fds(ctx, script)
        start_threads(ctx, script)
    reap_all(ctx, waited)
    if script.role in ("session", "group"):
        if script.role == "session" and script.members:
            wait_for_member(ctx, script)
        return  # a stand-in's role is done once its session or group exists
    _step("ready", script.pid)
    report(ctx, READY, script.pid)
    wait_for_go(ctx, script)
    if script.role == "process" and ctx.target is not None:
        run_target(ctx, script)
    wait_forever(script)


def start_helper(ctx, script, candidates, chunk):
    """A helper creating part of a wide level with CLONE_PARENT, in parallel with us."""
    def create_chunk():
        arm_parent_death(script.pid)
        _step("helper", os.getpid())
        for pid in chunk:
            fork_task(ctx, pid, ctx.scripts[pid].where(), sibling=True)
    return fork_spare(ctx, candidates, "helper", create_chunk)


def join_group(ctx, script):
    """setpgid into a group another subtree creates: retry until it exists (bounded)."""
    pause = POLL_FIRST
    while True:
        try:
            os.setpgid(0, script.join)
            return
        except PermissionError:
            pass  # no such group in our session yet
        if ctx.remaining() <= 0:
            raise TaskFailed(script.where(), IdpinError(
                "process group %d did not appear before the restore's deadline" % script.join))
        time.sleep(pause)
        pause = min(pause * 2, POLL_LAST)


def wait_for_member(ctx, script):
    """A group stand-in leaves once one member has joined: the group then lives on."""
    pause = POLL_FIRST
    while True:
        for member in script.members:
            try:
                if os.getpgid(member) == script.pid:
                    return
            except ProcessLookupError:
                pass
        if ctx.remaining() <= 0:
            raise TaskFailed(script.where(), IdpinError(
                "no member of group %d joined before the restore's deadline" % script.pid))
        time.sleep(pause)
        pause = min(pause * 2, POLL_LAST)


def install_fds(ctx, script):
    """The pty ends this process held, at their fd numbers; the inherited sources closed."""
    for number, held in sorted((script.entry.get("fds") or {}).items()):
        master, slave = ctx.pty_fds[held["pty"]]
        os.dup2(master if held["end"] == "master" else slave, int(number))
    for master, slave in ctx.pty_fds.values():
        os.close(master)
        os.close(slave)


def start_threads(ctx, script):
    tids = script.entry.get("tids") or [script.pid]
    for tid in tids[1:]:
        thread = threading.Thread(target=_idle, name="idpin-restored-%d" % tid, daemon=True)
        try:
            with id_request(tid=tid):
                thread.start()
        except IdpinError as err:
            raise TaskFailed(script.where(), err) from None


_never = threading.Event()


def _idle():
    # A restored thread holds its tid until the process is torn down.
    _never.wait()


def reap_all(ctx, waited):
    for child, where in waited:
        status = _wait_child(ctx, child, where)
        if status != 0:
            raise TaskFailed(where, IdpinError(
                "exited with status %d (it reported why, or was killed)" % status))


def _wait_child(ctx, child, where):
    while True:
        got, status = os.waitpid(child, os.WNOHANG)
        if got == child:
            return os.waitstatus_to_exitcode(status)
        if ctx.remaining() <= 0:
            raise TaskFailed(where, IdpinError("did not finish before the restore's deadline"))
        time.sleep(POLL_LAST)


def wait_for_go(ctx, script):
    """Block until the restorer closes the go pipe; a child dying meanwhile is a failure."""
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *args: None)
    try:
        while True:
            _check_children(ctx)
            ready, _, _ = select.select([ctx.go_fd, wake_read], [], [], max(ctx.remaining() + 30, 0))
            if not ready:
                raise TaskFailed(script.where(), IdpinError("no go from the restorer in time"))
            if ctx.go_fd in ready:
                break
            os.read(wake_read, 512)
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.close(wake_read)
        os.close(wake_write)
    os.close(ctx.go_fd)
    os.close(ctx.status_fd)


def _check_children(ctx):
    """A child of ours that died is a failure to report; an orphan adopted here is not.

    An orphan (a task whose parent was killed, reparented to this subreaper
    or init) dies of PR_SET_PDEATHSIG: its parent's own parent reports the
    death that caused it, so it is reaped silently.
    """
    me = os.getpid()
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            return
        child = ctx.scripts.get(info.si_pid)
        if child is not None and child.parent == me:
            break
        os.waitpid(info.si_pid, 0)
    if info is not None:
        raise TaskFailed(child.where(), IdpinError(
            "died before the restore was verified (%s %d)"
            % ("killed by signal" if info.si_code != os.CLD_EXITED else "exit status",
               info.si_status)))


def run_target(ctx, script):
    gc.enable()  # the restorer turned it off for the restore (copy-on-write)
    try:
        ctx.target(script.entry)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()


def wait_forever(script):
    # Until torn down by SIGKILL (from the restorer, or our parent's death).
    # idpin's init reaps what is reparented to it, as an init must.
    while True:
        if script.role != "init":
            signal.pause()
            continue
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(1)
