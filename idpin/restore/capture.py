"""Capture: a plan (idpin.restore.plan) read from a live process tree.

What it reads, as the caller's pid namespace sees it (its /proc must be that
namespace's):

- from /proc: each process's pid, ppid, pgid, sid, threads, cmdline, and
  which fds are an end of a pty of the caller's devpts instance (the one
  /dev/ptmx allocates from: the one a restore would use); other fds, zombies
  and the ptys of other instances are not part of a plan;
- the SysV objects of the caller's IPC namespace with their contents:
  semaphore values (semctl GETALL), messages copied without being removed
  (msgrcv MSG_COPY), shm bytes (attached read-only). Segments already
  removed but still attached (SHM_DEST) are reachable only by their
  attachers and are left out.

Without ``freeze`` the tree may change while it is read: the capture reads
the process table again at the end and starts over (a few times) if the
tree moved. ``freeze=True`` stops the tree with SIGSTOP first (bounded in
time) and, whatever happens, resumes exactly the processes it stopped. The
IPC objects are then consistent with the tree as long as no process outside
it changes them; a capturing process killed while the tree is stopped leaves
it stopped (resume it with SIGCONT). A stop is visible to the root's
parent (SIGCHLD, waitpid with WUNTRACED): an interactive shell reports its
job as stopped, and continued.
"""
import base64
import collections
import contextlib
import errno
import os
import signal
import stat
import time

from .. import _sys
from .. import pty as _pty
from ..errors import IdpinError, RequestError, UnsupportedError
from . import plan as _plan

FREEZE_TIMEOUT = 5.0
CAPTURE_ATTEMPTS = 5
# The plan format's caps (plan-v1.schema.json).
SHM_SIZE_MAX = 1 << 30
MSG_SIZE_MAX = 1 << 20
MESSAGES_MAX = 65536

UNIX98_PTY_SLAVE_MAJORS = range(136, 144)
PTMX_DEVICE = os.makedev(5, 2)
_STOPPED = "Tt"  # group stop, or stopped by a tracer
_DEAD = "ZX"

__all__ = ["capture", "frozen"]


class _TreeMoved(Exception):
    """The tree or an object changed while it was read: start over."""


def capture(pid, freeze=False, timeout=FREEZE_TIMEOUT):
    """The plan of the tree rooted at ``pid`` and of the caller's IPC namespace.

    The plan validates (idpin.restore.plan.load accepts it); ``next`` lists
    are empty. ``freeze`` stops the tree for a consistent snapshot.
    """
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 1:
        raise RequestError("capture needs a pid (a positive int), not %r" % (pid,), kind="pid")
    _check_proc_is_ours()
    if pid not in _descendants(_process_table(), pid):
        _no_such_process(pid)
    _check_same_ipc_namespace(pid)
    if freeze:
        with frozen(pid, timeout):
            return _capture_consistent(pid)
    return _capture_consistent(pid)


def _no_such_process(pid):
    raise RequestError("no live process %d in this pid namespace" % pid, kind="pid")


def _check_proc_is_ours():
    if os.readlink("/proc/self") != str(os.getpid()):
        raise UnsupportedError(
            "/proc is not mounted for this process's pid namespace, so its pids are not the "
            "ones this namespace sees: mount one ('mount -t proc proc /proc' in a new mount "
            "namespace, or 'unshare --mount-proc')")


def _check_same_ipc_namespace(pid):
    try:
        theirs = os.stat("/proc/%d/ns/ipc" % pid).st_ino
    except PermissionError:
        return  # not ours to inspect; the objects read are the caller's namespace's, as documented
    except FileNotFoundError:
        _no_such_process(pid)
    if theirs != os.stat("/proc/self/ns/ipc").st_ino:
        raise UnsupportedError(
            "process %d is in another IPC namespace than the caller, whose SysV objects a "
            "capture reads: run the capture inside it (e.g. 'nsenter --ipc --target %d')" % (pid, pid))


def _capture_consistent(root):
    for _ in range(CAPTURE_ATTEMPTS):
        try:
            return _capture_once(root)
        except _TreeMoved:
            continue
    raise IdpinError("the tree of process %d kept changing while it was read (%d attempts): "
                     "capture it with freeze=True (--freeze)" % (root, CAPTURE_ATTEMPTS))


def _capture_once(root):
    table = _process_table()
    tree = _descendants(table, root)
    if root not in tree:
        _no_such_process(root)
    scope = _caller_devpts()
    processes = [_process(pid, table, root, scope) for pid in tree]
    ipc = _ipc_objects()
    if _shape(table, root) != _shape(_process_table(), root):
        raise _TreeMoved()
    ptys = sorted({held["pty"] for p in processes for held in p["fds"].values()})
    plan = {"idpin_plan": _plan.VERSION, "root": root, "processes": processes,
            "ipc": ipc, "ptys": [{"index": index} for index in ptys]}
    return _plan.validate(plan)


# ---------------------------------------------------------------- processes

def _stat_fields(pid, task=None):
    """(state, ppid, pgid, sid) of ``pid``'s main thread (or its thread ``task``), None if gone."""
    path = "/proc/%d/stat" % pid if task is None else "/proc/%d/task/%s/stat" % (pid, task)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may hold spaces and parentheses: the fields follow the last ')'.
    fields = text[text.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[3])


def _shape(table, root):
    """The tree's (pid, ppid, pgid, sid) rows: what must not move during a capture."""
    return [(pid,) + table[pid][1:] for pid in _descendants(table, root)]


def _process_table():
    """pid -> (state, ppid, pgid, sid) of every process this /proc shows."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None:
                table[int(name)] = fields
    return table


def _is_live(table, pid):
    return pid in table and (table[pid][0] not in _DEAD or _has_live_threads(pid))


def _descendants(table, root):
    """``root`` and its live descendants, parents before children, by pid within a level.

    Empty if ``root`` is not a live process.
    """
    children = {}
    for pid, (_, ppid, _, _) in table.items():
        if _is_live(table, pid):
            children.setdefault(ppid, []).append(pid)
    order, level = [], [root] if _is_live(table, root) else []
    while level:
        order.extend(level)
        level = sorted(child for pid in level for child in children.get(pid, ()))
    return order


def _has_live_threads(pid):
    # A process whose main thread exited (state Z) lives on in its other threads.
    try:
        return len(os.listdir("/proc/%d/task" % pid)) > 1
    except FileNotFoundError:
        return False


def _process(pid, table, root, scope):
    _, ppid, pgid, sid = table[pid]
    try:
        tids = sorted(int(tid) for tid in os.listdir("/proc/%d/task" % pid))
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            raw = f.read()
        fds = _pty_fds(pid, scope)
    except (FileNotFoundError, ProcessLookupError):
        raise _TreeMoved() from None
    except PermissionError:
        raise UnsupportedError("cannot read the fds of process %d in /proc: capture as the owner of "
                               "the tree or as root in its user namespace" % pid) from None
    tids.remove(pid)
    return {
        "pid": pid,
        "ppid": 0 if pid == root else ppid,
        "pgid": pgid,
        "sid": sid,
        "tids": [pid] + tids,
        "cmdline": [os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]],
        "fds": fds,
        "next": {kind: [] for kind in _plan.NEXT_KINDS},
    }


# ---------------------------------------------------------------- ptys

PtyScope = collections.namedtuple("PtyScope", "dev devpts_devs")
PtyScope.__doc__ = """The caller's devpts instance (its device) and the devices of every devpts mount."""


def _caller_devpts():
    try:
        instance = _pty.find_instance()
    except UnsupportedError:
        return None  # no devpts here: no fd can be a pty a restore could give back
    return PtyScope(instance.dev, frozenset(dev for dev, *_ in _pty._devpts_mounts()))


def _pty_fds(pid, scope):
    """{fd: {"pty": index, "end": ...}} for the fds of ``pid`` that are ptys of the caller's instance."""
    found = {}
    if scope is None:
        return found
    for name in os.listdir("/proc/%d/fd" % pid):
        link = "/proc/%d/fd/%s" % (pid, name)
        try:
            # stat follows the fd's own file: it never opens it (opening a
            # ptmx fd's path would allocate a new pty).
            st = os.stat(link)
            held = _pty_end(pid, name, link, st, scope) if stat.S_ISCHR(st.st_mode) else None
        except (FileNotFoundError, PermissionError):
            continue  # closed meanwhile, or not a file this caller may inspect
        if held is not None:
            found[name] = held
    return dict(sorted(found.items(), key=lambda item: int(item[0])))


def _pty_end(pid, fd, link, st, scope):
    major = os.major(st.st_rdev)
    if major in UNIX98_PTY_SLAVE_MAJORS and st.st_dev == scope.dev:
        return {"pty": (major - UNIX98_PTY_SLAVE_MAJORS[0]) * 256 + os.minor(st.st_rdev), "end": "slave"}
    if st.st_rdev == PTMX_DEVICE and _ptmx_instance_dev(link, st, scope) == scope.dev:
        with open("/proc/%d/fdinfo/%s" % (pid, fd)) as f:
            for line in f:
                if line.startswith("tty-index:"):
                    return {"pty": int(line.split()[1]), "end": "master"}
        raise UnsupportedError("this kernel does not say which pty a ptmx fd holds "
                               "(no tty-index in /proc/%d/fdinfo/%s)" % (pid, fd))
    return None


def _ptmx_instance_dev(link, st, scope):
    # pts/ptmx (or a bind mount of it) lives in its instance; the legacy
    # /dev/ptmx node uses the devpts mounted beside it, as path lookup finds it.
    if st.st_dev in scope.devpts_devs:
        return st.st_dev
    try:
        return _pty.find_instance(os.readlink(link)).dev
    except (OSError, UnsupportedError):
        return None


# ---------------------------------------------------------------- SysV IPC

def _sysvipc_rows(kind):
    with open("/proc/sysvipc/" + kind) as f:
        header = f.readline().split()
        return [dict(zip(header, line.split())) for line in f]


def _ipc_objects():
    objects = []
    for kind, reader in (("sem", _sem), ("msg", _msg), ("shm", _shm)):
        for row in _sysvipc_rows(kind):
            perms = int(row["perms"], 8)
            if kind == "shm" and perms & 0o1000:  # SHM_DEST: removed, attached still
                continue
            id = int(row[{"sem": "semid", "msg": "msqid", "shm": "shmid"}[kind]])
            obj = {"kind": kind, "id": id, "key": int(row["key"]), "mode": perms & 0o777}
            try:
                obj.update(reader(id, row))
            except OSError as err:
                _ipc_read_failed(kind, id, err)
            objects.append(obj)
    return objects


def _ipc_read_failed(kind, id, err):
    if err.errno in (errno.EINVAL, errno.EIDRM):
        raise _TreeMoved() from None  # removed since it was listed
    if err.errno == errno.EACCES:
        raise UnsupportedError("cannot read %s id %d: no read permission; capture as its owner "
                               "or as root in the user namespace owning the IPC namespace" % (kind, id)) from None
    if err.errno == errno.ENOSYS:
        raise UnsupportedError("reading message queues needs msgrcv(MSG_COPY), which this kernel "
                               "lacks: it must be built with CONFIG_CHECKPOINT_RESTORE") from None
    if err.errno in (errno.EFBIG, errno.E2BIG):
        raise UnsupportedError("%s id %d is larger than a plan holds: %s" % (kind, id, err.strerror)) from None
    raise err


def _sem(id, row):
    values = _sys.sem_getall(id)
    return {"nsems": len(values), "values": values}


def _msg(id, row):
    # A message is no longer than the queue's bytes nor than msgmax was
    # when it was sent; the plan's cap bounds both.
    size = min(max(int(row["cbytes"]), _msgmax()), MSG_SIZE_MAX)
    messages = []
    for index in range(MESSAGES_MAX + 1):
        message = _sys.msg_copy(id, index, size)
        if message is None:
            return {"messages": messages}
        mtype, text = message
        messages.append({"type": mtype, "data": base64.b64encode(text).decode()})
    raise OSError(errno.E2BIG, "more than %d messages" % MESSAGES_MAX)


def _msgmax():
    with open("/proc/sys/kernel/msgmax") as f:
        return int(f.read())


def _shm(id, row):
    data = _sys.shm_read(id, SHM_SIZE_MAX)
    return {"size": len(data), "data": base64.b64encode(data).decode()}


# ---------------------------------------------------------------- freezing

@contextlib.contextmanager
def frozen(root, timeout=FREEZE_TIMEOUT):
    """Stop the tree of ``root`` with SIGSTOP; on leaving, resume what this stopped.

    Processes found stopped already stay stopped. Children forked while the
    tree is being stopped are stopped in further rounds. Raises IdpinError
    (after resuming) if the tree is not stopped within ``timeout`` seconds.
    """
    stopped = {}  # pid -> pidfd: SIGCONT goes to that process even if its pid is reused
    try:
        _stop_tree(root, stopped, time.monotonic() + timeout, timeout)
        yield
    finally:
        _resume(stopped)


def _stop_tree(root, stopped, deadline, timeout):
    already = set()  # found stopped: someone else's to resume
    while True:
        table = _process_table()
        tree = _descendants(table, root)
        if os.getpid() in tree:
            raise RequestError("cannot freeze the tree of %d: it contains the capturing process %d"
                               % (root, os.getpid()), kind="pid")
        fresh = [pid for pid in tree if pid not in stopped and pid not in already]
        if not fresh:
            return
        _check_deadline(fresh, deadline, timeout)
        signalled = [pid for pid in fresh if _stop(pid, table[pid], stopped, already)]
        _wait_stopped(signalled, deadline, timeout)


def _stop(pid, listed, stopped, already):
    """SIGSTOP ``pid`` if it is still the process listed and runs; whether it was sent."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    # Checked once the pidfd is open: the pidfd is the process listed, not a
    # later one that reused its pid (that one is listed again next round).
    fields = _stat_fields(pid)
    if fields is None or fields[1:] != listed[1:] or fields[0] in _STOPPED:
        os.close(pidfd)
        if fields is not None and fields[0] in _STOPPED:
            already.add(pid)
        return False
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
    except ProcessLookupError:
        os.close(pidfd)
        return False
    except PermissionError:
        os.close(pidfd)
        raise UnsupportedError("cannot stop process %d: not allowed to signal it; capture with "
                               "--freeze as its owner or as root" % pid) from None
    stopped[pid] = pidfd
    return True


def _check_deadline(running, deadline, timeout):
    if time.monotonic() > deadline:
        raise IdpinError("the tree did not stop within %.1f s (still running: %s)"
                         % (timeout, ", ".join(map(str, running[:10]))))


def _wait_stopped(pids, deadline, timeout):
    while True:
        running = [pid for pid in pids if not _all_threads_stopped(pid)]
        if not running:
            return
        _check_deadline(running, deadline, timeout)
        time.sleep(0.001)


def _all_threads_stopped(pid):
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except FileNotFoundError:
        return True
    states = (_stat_fields(pid, tid) for tid in tids)
    return all(fields is None or fields[0] in _STOPPED + _DEAD for fields in states)


def _resume(stopped):
    for pid, pidfd in stopped.items():
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGCONT)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)
    stopped.clear()
