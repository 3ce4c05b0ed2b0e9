"""Chosen pids.

Two mechanisms, decided per fork:

- ``clone3``: clone3() with set_tid, through CPython's fork protocol. Exact by
  construction (the kernel refuses a taken pid with EEXIST) and lock-free, so
  parallel workers fork truly in parallel. A raw clone3 skips glibc's fork
  handlers, which is only safe while the process has one thread (KERNEL.md).
- ``ns_last_pid``: glibc's fork with the namespace knob armed under the pid
  namespace lock, for multi-threaded callers. The kernel silently gives the
  next free pid when the asked one is taken, so the child checks its own pid
  before running any caller code and exits if it is wrong; the parent kills
  and reaps it and raises IdBusyError (or retries, if the pid is still free:
  a fork outside the lock only moved the cursor).

Forks that asked for nothing are steered past a tid a block of this process
armed (``without_armed_tid``): pids and tids share the namespace's cursor.
"""
import errno
import os
import signal
import threading
import time
from typing import TYPE_CHECKING

from . import _sys, knobs, signals
from .errors import NEEDS_NAMESPACE_HINT, Id, IdBusyError, IdpinError, RequestError, UnsupportedError
from .interpose import ORIGINALS
from .request import Kind, pending, register_kind, uncredit, validate_int


def undo_fork(child):
    """A held signal's handler raised as the fork returned: the caller never gets the child."""
    if child > 0:
        undo_child(child)
        uncredit("pid", child)


PID_MAX_LIMIT = 4194304  # the kernel's PID_MAX_LIMIT on 64-bit
MECHANISMS = ("clone3", "ns_last_pid")
# Exit status of a knob-path child that was born with the wrong pid.
WRONG_PID_EXIT = 125
# Knob-path forks retried when a fork outside the lock moved the cursor
# without taking the pid: at most this many attempts, within this many
# seconds (each lost attempt costs a child that is killed at once).
KNOB_ATTEMPTS = 64
KNOB_RETRY_SECONDS = 0.5
# How long a taken pid or tid is looked at again before IdBusyError.
BUSY_RECHECK_SECONDS = 0.05

_clone3_missing = False
try:
    # glibc's struct pthread layout: the same for the life of the process.
    _tid_offset = _sys.tid_cache_offset()
except RuntimeError:
    _tid_offset = None  # the clone3 path reports it, and falls back to ns_last_pid
_pid_max_by_namespace = {}


def namespace_pid_max(refresh=False):
    """pid_max of this process's pid namespace (per namespace since 6.14).

    Cached per namespace, since it is checked on every pinned fork; a value
    the cache refuses, or an allocation the kernel refuses, reads it again
    (``refresh``), so a raised or lowered pid_max is never held against a
    request.
    """
    namespace = knobs.own_pid_namespace()
    cached = None if refresh else _pid_max_by_namespace.get(namespace)
    if cached is None:
        try:
            with open("/proc/sys/kernel/pid_max") as f:
                cached = int(f.read())
        except (OSError, ValueError):
            return PID_MAX_LIMIT
        _pid_max_by_namespace[namespace] = cached
    return cached


def validate_in_pid_range(kind, value):
    """An int in 1..pid_max-1 of this namespace, read again before refusing."""
    if type(value) is int and 1 <= value < namespace_pid_max():
        return value
    if type(value) is int and value >= 1:
        namespace_pid_max(refresh=True)
    return validate_int(kind, value, 1, namespace_pid_max() - 1, "this namespace's pid_max - 1")


def out_of_range_error(kind, value):
    """After the kernel refused ``value`` as out of range: RequestError naming today's range."""
    pid_max = namespace_pid_max(refresh=True)
    return RequestError(
        "%s %d is out of range: valid %ss are 1..%d (this namespace's pid_max - 1, read "
        "just now)" % (kind, value, kind, pid_max - 1),
        kind=kind,
    )


def validate_pid(value):
    """An int, or a tuple of ints innermost first (clone3 set_tid order)."""
    if isinstance(value, tuple):
        if not 1 <= len(value) <= _sys.MAX_PID_NS_LEVEL:
            raise RequestError(
                "pid tuple must have 1..%d entries (one per pid namespace level, innermost "
                "first), not %d" % (_sys.MAX_PID_NS_LEVEL, len(value)),
                kind="pid",
            )
        inner = validate_in_pid_range("pid", value[0])
        outer = [_validate_level(v, PID_MAX_LIMIT, "PID_MAX_LIMIT - 1") for v in value[1:]]
        return (inner, *outer)
    return validate_in_pid_range("pid", value)


def _validate_level(value, pid_max, what):
    return validate_int("pid", value, 1, pid_max - 1, what)


def set_tid_of(value):
    return value if isinstance(value, tuple) else (value,)


def thread_count() -> int:
    """Threads of this process, as the kernel sees them (C threads included)."""
    try:
        # procfs counts a task directory's links as 2 + its threads.
        return _sys.fd_nlink(knobs.task_directory()) - 2
    except OSError:
        return threading.active_count()


@signals.door(undo=undo_fork)
def fork(pid: Id | None = None, mechanism: str | None = None) -> int:
    """Fork; the child gets ``pid`` (or this thread's pending pid request).

    Returns 0 in the child and the child's pid in the parent, like os.fork.
    ``mechanism`` forces "clone3" or "ns_last_pid" (default: decided per fork).
    """
    # With the Cython backend, idpin.fork is its C twin (_cython.fork), which
    # makes the common case itself and calls this for everything else.
    if mechanism is not None and mechanism not in MECHANISMS:
        raise RequestError(
            "mechanism must be one of %s or None, not %r" % (", ".join(MECHANISMS), mechanism),
            kind="pid",
        )
    if pid is not None:
        value = validate_pid(pid)
    else:
        found = pending("pid")
        if found is None:
            return plain_fork()
        req, value = found
    # The common case first, in as few steps as possible: a single-threaded
    # process, one pid level, clone3. Every page the parent or the child
    # touches after the fork costs a copy-on-write fault, so the decision is
    # one fstat and the fork one backend call; anything else (a refusal
    # included) takes pinned_fork, which decides in full and explains.
    child = -1
    if (type(value) is int and mechanism != "ns_last_pid" and _tid_offset is not None
            and not _clone3_missing and thread_count() == 1):
        try:
            child = _sys.clone3_fork((value,), _tid_offset)
        except OSError:
            pass  # retried, translated or reported by pinned_fork
        except BaseException:
            undo_interrupted_fork(value)
            raise
        if child > 0 and pid is not None:
            _arm_fast_path()
    if child == -1:
        child = pinned_fork(value, mechanism)
    if pid is None:
        req.consumed["pid"] = value  # inline: no call between the fork and recording it
    return child


def _arm_fast_path(knob_namespace=None):
    """Let the C twin make the next such forks (and knob-path ones, given the pid
    Namespace): it reads what it needs from C variables."""
    if _fast is None or _sys.BACKEND != "cython":
        return
    # Called once the fork is made: a failure here (EMFILE, say) must not turn
    # it into an error while the child runs; the path stays unarmed, the next
    # fork tries again.
    try:
        _fast.arm_fast_fork(knobs.task_directory(), namespace_pid_max(),
                            None if _clone3_missing else _tid_offset, threading.main_thread().ident)
        if knob_namespace is not None:
            # A description of the namespace file of its own: its flock excludes
            # every other holder, this process's threads included.
            _fast.arm_fast_knob_fork(knob_namespace.reader("/proc/self/ns/pid"),
                                     knob_namespace.knob("ns_last_pid"),
                                     _cursor_record(knob_namespace))
    except OSError:
        pass


def _disarm_fast_path():
    if _fast is not None:
        _fast.disarm_fast_fork()


def fast_path_armed() -> bool:
    """Whether idpin.fork's next explicit-pid fork may be made by its C twin."""
    return _fast is not None and _fast.fast_fork_armed()


# The Python path of idpin.fork (with the Cython backend, idpin.fork is its C twin).
python_fork = fork

try:
    from ._sys import _cython as _fast
except ImportError:
    _fast = None
else:
    _fast.set_fork_paths(python_fork, signals.c_door_exit, undo_fork, signals.held)
    signals.inside_c_door = _fast.inside_fast_fork
    # A forked child's task directory and thread count are not its parent's;
    # another backend makes its own forks.
    knobs.ON_CHILD.append(_fast.forget_fast_fork_in_child)
    _sys.ON_USE.append(_fast.disarm_fast_fork)
    _fast.fork.__doc__ = fork.__doc__
    if not TYPE_CHECKING:  # type checkers keep the Python path's signature: the same
        fork = _fast.fork  # noqa: F811 - the public idpin.fork


def plain_fork():
    """An unpinned fork that cannot consume a knob a block of this process armed."""
    return without_armed_tid(ORIGINALS["os.fork"])


def without_armed_tid(allocate, on_steered=None):
    """Run ``allocate`` (an unpinned fork or thread start) past any armed tid.

    A tid block of this process: move the cursor past the armed tid for this
    allocation (then ``on_steered(lock)``). A block of the parent this
    process was forked from: wait for it, like any other process.
    """
    with knobs.allocating("pid"):
        if not knobs.any_armed():
            return allocate()
        lock = knobs.existing_namespace_lock("pid")
        if lock is not None:
            with lock.steered_clear_of("ns_last_pid"):
                result = allocate()
            if on_steered is not None:
                on_steered(lock)
            return result
        if "ns_last_pid" not in knobs.inherited_armed("pid"):
            return allocate()
    with knobs.namespace_lock("pid").held():
        return allocate()


def children_in_new_pid_namespace() -> bool:
    """unshare(CLONE_NEWPID) was called: children go to a namespace this process is not in."""
    active = knobs.own_pid_namespace()
    if active is None:
        return False
    try:
        return os.stat("/proc/self/ns/pid_for_children").st_ino != active
    except FileNotFoundError:
        # The kernel hides a pid namespace that has no init yet.
        return True
    except OSError:
        return False


def pinned_fork(value, mechanism=None):
    set_tid = set_tid_of(value)
    try:
        return _pinned_fork(set_tid, value, mechanism)
    except (IdpinError, OSError):
        raise  # refused: no child
    except BaseException:
        # A signal handler's exception, possibly after the fork completed (a
        # lock's release after it is a C call, after which a handler runs):
        # the caller will never know that child.
        undo_interrupted_fork(set_tid[0])
        raise


def _pinned_fork(set_tid, value, mechanism):
    if choose_mechanism(set_tid, mechanism) == "clone3":
        try:
            return fork_clone3(value)
        except _Clone3Missing:
            if mechanism == "clone3" or len(set_tid) > 1:
                raise UnsupportedError(
                    "clone3 with set_tid is not available (Linux >= 5.5 is needed)", kind="pid"
                ) from None
    return fork_knob(set_tid[0])


def choose_mechanism(set_tid, forced=None):
    threads = thread_count()
    if threads == 1 and forced != "ns_last_pid" and not _clone3_missing:
        return "clone3"  # what every branch below decides for a single-threaded process
    if forced != "clone3" and children_in_new_pid_namespace():
        # ns_last_pid acts on this process's pid namespace, not on the one
        # its children are born in.
        if forced == "ns_last_pid" or threads > 1 or _clone3_missing:
            raise UnsupportedError(
                "this process called unshare(CLONE_NEWPID): its children are born in a pid "
                "namespace ns_last_pid cannot reach, so only clone3 set_tid can choose their "
                "pid, and idpin uses it only in a single-threaded process (this one has %d "
                "threads)" % threads,
                kind="pid",
            )
        return "clone3"
    if forced == "ns_last_pid" or (forced is None and (threads > 1 or _clone3_missing)):
        if len(set_tid) > 1:
            raise UnsupportedError(
                "a pid for %d namespace levels needs clone3 with set_tid, which idpin uses "
                "only in a single-threaded process (this one has %d threads; glibc's fork "
                "handlers would not run); fork from a single-threaded process"
                % (len(set_tid), threads),
                kind="pid",
            )
        return "ns_last_pid"
    if threads > 1:
        raise UnsupportedError(
            "the clone3 fork path needs a single-threaded process (this one has %d threads: "
            "a raw clone3 child could deadlock in malloc); use mechanism=None or "
            "'ns_last_pid'" % threads,
            kind="pid",
        )
    return "clone3"


class _Clone3Missing(Exception):
    pass


def fork_clone3(value):
    global _clone3_missing
    set_tid = set_tid_of(value)
    try:
        offset = _sys.tid_cache_offset()
    except RuntimeError as err:
        # Without glibc's tid cache refreshed, the child would be subtly wrong.
        _clone3_missing = True
        _disarm_fast_path()
        raise _Clone3Missing() from err
    deadline = time.monotonic() + KNOB_RETRY_SECONDS
    unseen = 0  # EEXIST with no task to be seen: a process group or session id, or a task just gone
    while True:
        try:
            return _sys.clone3_fork(set_tid, offset)
        except OSError as err:
            if err.errno in (errno.ENOSYS, errno.E2BIG):
                _clone3_missing = True
                _disarm_fast_path()
                raise _Clone3Missing() from err
            # A short-lived process outside idpin (a forking program's child)
            # can hold the pid for a moment: try again once it is free.
            # A pid used only as a process group or session id looks free
            # but stays EEXIST: tried again only twice.
            if err.errno == errno.EEXIST and len(set_tid) == 1 and time.monotonic() < deadline:
                seen = pid_in_use(set_tid[0])
                unseen += not seen
                if (seen and free_soon(set_tid[0])) or (not seen and unseen <= 2):
                    continue
            raise _translate_clone3_error(err, value) from err
        except BaseException:
            undo_interrupted_fork(set_tid[0])
            raise


def _translate_clone3_error(err, value):
    if err.errno == errno.EEXIST:
        return IdBusyError(
            "pid", value,
            "in use (a live task or thread, a zombie not yet reaped, or a process group "
            "or session id still in use)",
        )
    if err.errno == errno.EPERM:
        return UnsupportedError(
            "clone3 set_tid=%s was refused (EPERM): it needs CAP_CHECKPOINT_RESTORE or "
            "CAP_SYS_ADMIN over every pid namespace level asked for; %s"
            % (list(set_tid_of(value)), NEEDS_NAMESPACE_HINT),
            kind="pid",
        )
    if err.errno == errno.EINVAL:
        inner = set_tid_of(value)[0]
        if inner >= namespace_pid_max(refresh=True):
            return out_of_range_error("pid", inner)
        return RequestError(
            "pid %s was refused by clone3 (EINVAL): each pid must be below its namespace's "
            "pid_max, the tuple no longer than the pid namespace nesting + 1, and a new "
            "pid namespace's first process must be pid 1" % (value,),
            kind="pid",
        )
    return err


def free_soon(pid, seconds=None):
    """Whether ``pid`` is free, or becomes free within BUSY_RECHECK_SECONDS.

    A process outside idpin's lock can hold a pid for a moment (a forking
    program's short-lived child): only a pid still taken after that is busy.
    """
    if not pid_in_use(pid):
        return True
    deadline = time.monotonic() + (BUSY_RECHECK_SECONDS if seconds is None else seconds)
    while time.monotonic() < deadline:
        time.sleep(0.0005)
        if not pid_in_use(pid):
            return True
    return False


def pid_in_use(pid):
    """Whether a task (process, thread or zombie) has this pid here."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fork_knob(pid):
    """glibc's fork with ns_last_pid = pid - 1 under the pid namespace lock.

    A fork outside the lock can land between the knob write and ours. If it
    took the pid, that is a conflict: IdBusyError. If it only moved the
    cursor (the pid is still free once our wrong child is gone), the race was
    lost, not the pid: try again, up to KNOB_ATTEMPTS times within
    KNOB_RETRY_SECONDS.
    """
    deadline = time.monotonic() + KNOB_RETRY_SECONDS
    for attempt in range(1, KNOB_ATTEMPTS + 1):
        if not free_soon(pid):
            raise IdBusyError("pid", pid, "in use")
        child = _fork_with_knob(pid)
        if child in (0, pid):
            return child
        undo_child(child)
        if not free_soon(pid):
            raise IdBusyError(
                "pid", pid,
                "a process forking outside idpin's lock took it between the knob write and "
                "the fork (our child got pid %d and was killed)" % child,
            )
        if child < pid and pid >= namespace_pid_max(refresh=True):
            raise out_of_range_error("pid", pid)
        if time.monotonic() >= deadline:
            break
    raise IdBusyError(
        "pid", pid,
        "lost the race with processes forking outside idpin's lock %d times in a row (each "
        "time the child got another pid and was killed before running anything); the pid "
        "is free" % attempt,
    )


def _fork_with_knob(pid):
    ns = knobs.namespace_lock("pid")
    with ns.held(), ns.alloc:
        record_cursor(ns, pid - 1)
        try:
            child = _knob_fork_held(ns, pid)
        except BaseException:
            forget_cursor(ns)
            raise
        if child == 0:
            return 0  # the child leaves the record to its parent
        # A tid block of this process armed the same cursor: give it back.
        ns.rearm("ns_last_pid")
        forget_cursor(ns)
    if child == pid:
        _arm_fast_path(ns)
    return child


def _knob_fork_held(ns, pid):
        try:
            child = _sys.knob_fork(ns.knob("ns_last_pid"), pid)
        except PermissionError:
            knobs.write_knob(ns.knob("ns_last_pid"), "ns_last_pid", pid - 1)  # raises the fix
            raise
        except OSError as err:
            if err.errno == errno.EINVAL:
                raise out_of_range_error("pid", pid) from None
            raise
        except BaseException:
            undo_interrupted_fork(pid)
            raise
        return child


def undo_interrupted_fork(pid):
    """A fork completed, but an exception (a signal handler's) kept its child from the caller.

    The caller will never know that child, so it is killed and reaped: the
    one born with ``pid``, and a wrongly numbered knob-path child (it exits
    at once with WRONG_PID_EXIT and would stay a zombie).
    """
    me = os.getpid()
    for child, state, exit_code in _children_of(me):
        if child == pid or (state == "Z" and exit_code == WRONG_PID_EXIT << 8):
            undo_child(child)


def _children_of(parent):
    """(pid, state, exit code) of this process's children, from /proc."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After "pid (comm)": state, ppid, ... field 52 of stat is the exit code.
        if int(fields[1]) == parent:
            found.append((int(name), fields[0], int(fields[-1]) if len(fields) >= 50 else 0))
    return found


def undo_child(child):
    try:
        os.kill(child, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(child, 0)
    except ChildProcessError:
        pass  # SIGCHLD is ignored here: the kernel reaped it already


# -- the cursor a holder armed ---------------------------------------------------------
#
# ns_last_pid has no idle value: a holder SIGKILLed with it armed would hand
# its pid (or tid) to the next fork in the namespace, idpin's or not. So
# before arming it, a holder records in a POSIX message queue (which belongs
# to the IPC namespace and outlives the process) the cursor it found and the
# values it arms; it removes the record once nothing of its is armed. The
# next holder, on taking the lock, puts the cursor back if it still stands at
# a recorded value: nothing has forked since. (A holder in another IPC
# namespace sharing the pid namespace does not see the record.)


def _cursor_record(ns):
    return cursor_record_name(ns.lock.inode)


def cursor_record_name(inode):
    """The record's name for the pid namespace whose /proc/self/ns/pid has ``inode``."""
    return "/idpin.pid-cursor.%d" % inode


def record_cursor(ns, armed, previous=None):
    """Record that this holder is about to arm ns_last_pid at ``armed``.

    ``previous``: the cursor before this process armed anything (read here
    if not given). Costs a few syscalls once per hold, a rewrite per new value.
    """
    held = ns.cursor_record
    if held is not None and armed in held[1]:
        return
    if held is None:
        if previous is None:
            previous = _sys.knob_read(ns.knob("ns_last_pid"))
        held = (previous, frozenset((armed,)))
    else:
        held = (held[0], held[1] | {armed})
    text = " ".join(str(value) for value in (held[0],) + tuple(sorted(held[1])))
    name = _cursor_record(ns)
    try:
        if ns.cursor_record is not None:
            _sys.record_remove(name)  # this holder's own, rewritten with the new value
        _sys.record_write(name, text.encode())
    except OSError:
        # No room for a POSIX queue (fs.mqueue.queues_max, RLIMIT_MSGQUEUE):
        # armed without a record, as before records existed.
        return
    ns.cursor_record = held


def forget_cursor(ns):
    """Nothing of this holder's is armed any more: drop its record."""
    if ns.cursor_record is not None and "ns_last_pid" not in ns.armed:
        _sys.record_remove(_cursor_record(ns))
        ns.cursor_record = None


def put_back_dead_holders_cursor(lock):
    """Taking the pid lock: a cursor a killed holder left armed is put back."""
    ns = lock.namespace
    name = _cursor_record(ns)
    data = _sys.record_read(name)
    if data is None:
        return
    try:
        values = [int(field) for field in data.split()]
    except ValueError:
        values = []
    if len(values) >= 2:
        fd = ns.knob("ns_last_pid")
        if _sys.knob_read(fd) in values[1:]:
            knobs.write_knob(fd, "ns_last_pid", values[0])
    _sys.record_remove(name)


knobs.ON_ACQUIRE["pid"] = put_back_dead_holders_cursor

register_kind(Kind("pid", validate_pid))
