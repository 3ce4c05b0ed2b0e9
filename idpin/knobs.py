"""Knob files and idpin's namespace locks.

The kernel's "next id" knobs (ns_last_pid, {sem,shm,msg}_next_id) are per
namespace, not per thread. idpin turns them into per-thread requests by
holding a namespace-wide lock from the knob write until the allocating call
has returned. Three small pieces, each safe on its own against an exception
(a raising signal handler) between any two of its steps:

- ``NamespaceLock``: flock(LOCK_EX) on the namespace file (/proc/self/ns/pid,
  /proc/self/ns/ipc) or, for ptys, on the devpts instance's root directory:
  the same inode through every proc mount, so it excludes across mounts, and
  the kernel drops it when its holder dies. Each thread locks through an open
  file description of its own, so the flock excludes the threads of this
  process exactly as it excludes other processes (no second, in-process
  mutex that a thread could leave owned), and unlocking a description never
  releases another thread's hold. Every wait is bounded (``lock_timeout``).
- One lock order for every acquisition: pid, then ipc, then pts. The IPC
  lock takes the pid lock first, so nested blocks (a tid block inside a sem
  block or the reverse, a knob-path fork or ``create_many`` inside any block)
  can never wait for each other in a cycle.
- ``Namespace``: what threads of this process share about one namespace:
  its knob fds, the values their blocks armed (so that other allocations
  can steer clear), the routed creations blocks are watching for, and
  ``alloc``, a short mutex around each knob write and the allocation that
  consumes it (and around each routed allocation that asked for nothing).

A forked child inherits copies of the parent's lock descriptions: it closes
them (unlocking one would release the parent's lock) and starts afresh,
remembering which knobs its parent had armed.
"""
import contextlib
import fcntl
import os
import threading
import time

from . import _sys, signals
from .errors import NEEDS_NAMESPACE_HINT, LockTimeoutError, UnsupportedError

DEFAULT_LOCK_TIMEOUT = 5.0
_ENV_TIMEOUT = "IDPIN_LOCK_TIMEOUT"


def _timeout_from_environment():
    text = os.environ.get(_ENV_TIMEOUT)
    if not text:
        return DEFAULT_LOCK_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UnsupportedError(
            "%s=%r: it must be a number of seconds above 0" % (_ENV_TIMEOUT, text)
        )
    return value


_lock_timeout = _timeout_from_environment()


def lock_timeout():
    """Seconds a wait for idpin's lock may last before LockTimeoutError."""
    return _lock_timeout


def set_lock_timeout(seconds):
    """Set how long a wait for idpin's lock may last; returns the previous value.

    The default is 5 s, or $IDPIN_LOCK_TIMEOUT. A wait that lasts this long
    is almost always a block waiting for a process or thread that itself
    waits for that block (a child forked inside it that makes a request).
    """
    global _lock_timeout
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        from .errors import RequestError

        raise RequestError("the lock timeout must be a number of seconds above 0, not %r" % (seconds,))
    previous, _lock_timeout = _lock_timeout, float(seconds)
    return previous


_registry_lock = threading.Lock()
_namespaces = {}
_generation = 0
# (lock, thread ident) of every hold in this process: the namespace runner
# checks that none is left.
_held = set()


def any_held():
    if _forked:
        settle_after_fork()
    return bool(_held)


# The fcntl module's flock is the C function itself: used for unlocking in
# cleanup paths, where a Python-level wrapper could be interrupted by a
# signal handler before it made the call.
_unlock_call = fcntl.flock


class NamespaceLock:
    """flock on one file; reentrant per thread; every wait bounded.

    Each thread locks through its own open file description (taken from a
    pool of idle ones, or opened), so threads of this process exclude each
    other through the kernel, like processes do. ``before`` is a lock that
    is always taken first and released last: the lock order.
    """

    def __init__(self, path, label, before=None, keep_open=True):
        st = os.stat(path)
        self.path = path
        self.label = label
        self.inode = st.st_ino
        self.before = before
        # Namespace files keep their descriptions pooled (which also keeps
        # the namespace, hence the inode the registry is keyed by, alive); a
        # devpts directory is open only while held, never keeping it busy.
        self._keep_open = keep_open
        self._local = threading.local()
        self._fds = set()
        self._idle = []
        self.namespace = None  # the Namespace this lock is the lock of (set by it)
        if keep_open:
            self._idle.append(self._open())

    def _open(self):
        fd = _tracked(os.open(self.path, os.O_RDONLY | os.O_CLOEXEC))
        self._fds.add(fd)
        return fd

    def describe(self):
        return "%s lock (%s, inode %d)" % (self.label, self.path, self.inode)

    def held_by_this_thread(self):
        if _forked:
            settle_after_fork()
        return bool(getattr(self._local, "depth", 0))

    def acquire(self, timeout=None):
        if _forked:
            settle_after_fork()
        local = self._local
        depth = getattr(local, "depth", 0)
        if depth:
            local.depth = depth + 1
            return
        if self.before is not None:
            self.before.acquire(timeout)
        try:
            self._take(local, timeout)
        except BaseException:
            if self.before is not None:
                _sys.finish(self.before.release)  # completes even if handlers keep raising
            raise
        hook = ON_ACQUIRE.get(self.label)
        if hook is not None:
            try:
                hook(self)
            except BaseException:
                _sys.finish(self.release)
                raise

    def _take(self, local, timeout):
        # Subscript and del, not list.pop(): a signal handler can raise after
        # a C call returns, which would lose the fd it returned.
        if self._idle:
            fd = self._idle[-1]
            del self._idle[-1]
        else:
            fd = self._open()
        hold = (self, threading.get_ident())
        try:
            wait_for_flock(fd, self, timeout)
            _held.add(hold)
            # Published only once held, in two stores no handler can split:
            # a signal handler that takes this lock while this thread waits
            # uses a description of its own and leaves these as it found them.
            local.fd = fd
            local.depth = 1
        except BaseException:
            if getattr(local, "fd", -1) != fd:
                # The flock may have been granted just before the exception.
                _held.discard(hold)
                _sys.finish(self._return_fd, fd)
            raise

    def _put_back(self, local):
        # Resumable: the unlock comes first and the fd is forgotten only
        # after it, so a call interrupted anywhere is finished by the next.
        fd = local.fd
        _unlock_call(fd, fcntl.LOCK_UN)
        local.fd = -1
        self._pool(fd)

    def _return_fd(self, fd):
        _unlock_call(fd, fcntl.LOCK_UN)
        self._pool(fd)

    def _pool(self, fd):
        # Idempotent, so that an interrupted caller can simply call it again.
        if self._keep_open:
            if fd not in self._idle:
                self._idle.append(fd)
        elif fd in self._fds:
            self._fds -= {fd}  # forgotten before closed: the number may be reused at once
            _close_tracked(fd)

    def release(self):
        """Release one hold of this thread.

        Resumable: if an exception (a signal handler's) interrupts it, calling
        it again finishes what the first call began, and never releases a
        second hold.
        """
        if _forked:
            settle_after_fork()
        local = self._local
        depth = getattr(local, "depth", 0)
        if depth > 1:
            local.depth = depth - 1
            return
        if depth == 1:
            local.owes_before = self.before is not None
            local.depth = 0
        if getattr(local, "fd", -1) >= 0:
            _held.discard((self, threading.get_ident()))
            self._put_back(local)
        if getattr(local, "owes_before", False):
            self.before.release()
            local.owes_before = False

    def held(self):
        """Context manager: acquire on entry, release on exit."""
        return _Held(self)

    def forget_in_child(self):
        # Its descriptions were the parent's: the child closed them at the
        # fork (LOCK_UN would have released the parent's lock).
        self._fds = set()
        self._idle = []
        self._local = threading.local()


class _Held:
    __slots__ = ("lock",)

    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        self.lock.acquire()
        return self.lock

    # C-level when the extension is built: see _sys.resumable_exit.
    __exit__ = _sys.resumable_exit

    @signals.exit_steps
    def _exit(self, *exc):
        self.lock.release()  # resumable
        return False


def wait_for_flock(fd, lock, timeout=None):
    """flock(LOCK_EX) on ``fd``, waiting at most ``timeout`` (default: lock_timeout()).

    Polled with LOCK_NB and short sleeps, so the wait is bounded; signals
    that arrive meanwhile are handled between two polls, where an exception
    finds nothing half-done (Ctrl-C ends the wait at once).
    """
    try:
        _sys.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    limit = _lock_timeout if timeout is None else timeout
    deadline = time.monotonic() + limit
    delay = 20e-6
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LockTimeoutError(lock.describe(), limit, lock_holders(lock.inode))
        time.sleep(min(delay, remaining))
        signals.deliver_here()
        delay = min(delay * 2, 2e-3)
        try:
            _sys.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass


def lock_holders(inode):
    """Pids /proc/locks names as holding a flock on ``inode`` (as this pid namespace sees them)."""
    holders = []
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return holders
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 00:04:4026531836 0 EOF"; waiters add "->".
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        if fields[5].rsplit(":", 1)[-1] == str(inode) and fields[4].isdigit():
            holders.append(int(fields[4]))
    return holders


# One short mutex per kind of namespace for the whole process, around every
# knob write and the allocation that consumes it, and around every routed
# allocation that asked for nothing (which must see the knob as armed or not,
# with no window between looking and allocating). Reentrant: a signal handler
# may allocate while its thread holds it. Only ever taken with ``with`` (its
# C-level enter/exit cannot be split by a signal handler) and never held
# while waiting for a namespace lock.
_alloc_mutexes = {}


def allocating(label):
    if _forked:
        settle_after_fork()
    mutex = _alloc_mutexes.get(label)
    if mutex is None:
        mutex = _alloc_mutexes.setdefault(label, threading.RLock())
    return mutex


def any_armed():
    """Whether a block of this process has a knob armed, or the parent had when
    this process was forked: the only times an unpinned allocation must look."""
    if _forked:
        settle_after_fork()
    return bool(_inherited_armed) or any(ns.armed for ns in list(_namespaces.values()))


class Namespace:
    """What the threads of this process share about one namespace.

    ``lock`` is idpin's lock of the namespace (``held()``, ``acquire()``,
    ``release()`` act on it); ``alloc`` the short allocation mutex; ``armed``
    the knob values request blocks of this process have armed, so that other
    allocations can steer clear of them.
    """

    def __init__(self, lock, label):
        self.lock = lock
        self.label = label
        self.alloc = allocating(label)
        self.armed = {}
        # (cursor found, values armed) this process recorded for a successor
        # should it be killed with ns_last_pid armed (pids.record_cursor).
        self.cursor_record = None
        self._watchers = {}
        self._steering = threading.local()
        self._knobs = {}
        self._readers = {}

    def acquire(self, timeout=None):
        self.lock.acquire(timeout)

    def release(self):
        self.lock.release()

    def held(self):
        return self.lock.held()

    def held_by_this_thread(self):
        return self.lock.held_by_this_thread()

    def knob(self, name):
        """The fd of /proc/sys/kernel/<name>, opened once per namespace."""
        if _forked:
            settle_after_fork()
        fd = self._knobs.get(name)
        if fd is None:
            fd = _kept(self._knobs, name, open_knob(name))
        return fd

    def reader(self, path):
        """A read-only fd of ``path`` (under /proc), opened once per namespace.

        Read with _sys.proc_read or _sys.knob_read: each read is a fresh
        snapshot, without the path walk of another open().
        """
        if _forked:
            settle_after_fork()
        fd = self._readers.get(path)
        if fd is None:
            fd = _kept(self._readers, path, os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        return fd

    def rearm(self, name):
        """Write back the value a block armed, after an allocation moved the knob."""
        if _forked:
            settle_after_fork()
        value = self.armed.get(name)
        if value is not None:
            write_knob(self.knob(name), name, value)

    @contextlib.contextmanager
    def steered_clear_of(self, name):
        """For a pid allocation that asked for nothing, while a tid is armed.

        ns_last_pid is one cursor for pids and tids: moving it just past the
        armed tid makes this allocation take any other pid, and the armed
        value is written back afterwards (in this process only: a forked
        child must not touch the knob).
        """
        value = self.armed.get(name)
        depth = getattr(self._steering, "depth", 0)
        if value is None or depth:
            yield  # nothing armed, or already steered by this thread
            return
        generation = _generation
        self._steering.depth = 1
        try:
            write_knob(self.knob(name), name, value + 1)
            yield
        finally:
            self._steering.depth = 0
            if generation == _generation:
                write_knob(self.knob(name), name, value)

    def watch(self, kind):
        """What routed calls of ``kind`` make (ids) from now on.

        A block checking creations it did not route leaves these out.
        """
        watcher = Watcher()
        self._watchers.setdefault(kind, []).append(watcher)
        return watcher

    def unwatch(self, kind, watcher):
        watchers = self._watchers.get(kind, [])
        watchers[:] = [w for w in watchers if w is not watcher]

    def note(self, kind, id):
        """A routed allocation of ``kind`` got ``id``."""
        for watcher in self._watchers.get(kind, ()):
            watcher.made.add(id)

    def note_many(self, made):
        """Routed allocations got these (kind, id): nothing to do unless a block watches."""
        if any(self._watchers.values()):
            for kind, id in made:
                self.note(kind, id)

    def forget_in_child(self):
        self.lock.forget_in_child()
        self._knobs = {}  # closed at the fork, with every fd idpin keeps
        self._readers = {}


class BlockHold:
    """What a request block of a knob kind holds; its exit undoes exactly what is recorded.

    Recorded before anything is taken (``held`` once the lock is), so that an
    exception at any point, a signal handler's included, leaves the exit
    something exact to undo; ``settled`` and ``cleaned`` make the exit
    resumable. ``before`` is the census taken at entry, ``routed`` the
    watcher of routed allocations, ``cursor`` the knob value found at entry.
    """

    __slots__ = ("ns", "held", "before", "routed", "settled", "cleaned", "cursor")

    def __init__(self, ns):
        self.ns = ns
        self.held = False
        self.before = None
        self.routed = None
        self.settled = False
        self.cleaned = False
        self.cursor = None


class Watcher:
    __slots__ = ("made",)

    def __init__(self):
        self.made = set()


def open_knob(name):
    path = "/proc/sys/kernel/" + name
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UnsupportedError(
            "%s does not exist: the kernel lacks CONFIG_CHECKPOINT_RESTORE "
            "(or /proc is not mounted); use a kernel built with it" % path
        ) from None
    except PermissionError:
        raise UnsupportedError(
            "%s is not writable: it needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN "
            "over the namespace; %s" % (path, NEEDS_NAMESPACE_HINT)
        ) from None


def write_knob(fd, name, value):
    """Arm a knob; a refused write becomes an UnsupportedError with the fix."""
    try:
        _sys.knob_write(fd, value)
    except PermissionError:
        raise UnsupportedError(
            "writing /proc/sys/kernel/%s was refused: it needs CAP_CHECKPOINT_RESTORE "
            "or CAP_SYS_ADMIN over the namespace; %s" % (name, NEEDS_NAMESPACE_HINT)
        ) from None


# The lock order: a lock may be taken only after its ``before``.
_BEFORE = {"ipc": "pid"}
# What taking each kind's lock must do first (undo what a holder killed while
# holding it left behind): set by the module owning the kind's knobs.
ON_ACQUIRE = {}


def namespace_lock(kind):
    """The Namespace of this process's current ``kind`` ("pid" or "ipc") namespace.

    Looked up once per process and kept: a process's own pid namespace never
    changes (unshare and setns change only its children's), and an IPC
    namespace change is seen by reading the namespace link again, half the
    cost of the stat a first lookup makes.
    """
    if _forked:
        settle_after_fork()
    current = _current.get(kind)
    if kind == "pid" and current is not None:
        return current[1]
    link = _link_of(kind)
    if current is not None and current[0] == link:
        return current[1]
    namespace = _namespace_for("/proc/self/ns/" + kind, kind, _BEFORE.get(kind))
    _current[kind] = (link, namespace)
    return namespace


def _link_of(kind):
    """The namespace link's text ("ipc:[4026531839]"): which namespace this is."""
    try:
        return os.readlink("/proc/self/ns/" + kind)
    except OSError:
        return None


# kind -> (namespace link text, Namespace) of this process's current namespaces.
_current = {}


def task_directory():
    """An fd of this process's /proc/self/task, opened once per process: its link
    count says how many threads the process has (fstat, no path walk)."""
    if _forked:
        settle_after_fork()
    fd = _current.get("task fd")
    if fd is None:
        fd = _kept(_current, "task fd",
                   os.open("/proc/self/task", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    return fd


def own_pid_namespace():
    """The inode of this process's own pid namespace, or None if /proc cannot say.

    Read once per process: unshare and setns change only the children's."""
    if _forked:
        settle_after_fork()
    inode = _current.get("pid inode")
    if inode is None:
        try:
            inode = _current["pid inode"] = os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            return None
    return inode


def directory_lock(path, label):
    """The lock on a directory (a devpts instance's root), open only while held."""
    return _namespace_for(path, label, None, keep_open=False)


def existing_namespace_lock(kind):
    """The Namespace if this process has made one for its current namespace, else None.

    Free for a process that never made a request (no lookup at all).
    """
    if _forked:
        settle_after_fork()
    if not _namespaces:
        return None
    current = _current.get(kind)
    if current is not None and (kind == "pid" or _link_of(kind) == current[0]):
        return current[1]
    try:
        st = os.stat("/proc/self/ns/" + kind)
    except OSError:
        return None
    return _namespaces.get((kind, st.st_dev, st.st_ino))


def _namespace_for(path, label, before_kind, keep_open=True):
    if _forked:
        settle_after_fork()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UnsupportedError(
            "%s does not exist: mount /proc (or run with a private /proc, e.g. "
            "'unshare --mount-proc')" % path
        ) from None
    # A devpts instance can reuse an unmounted one's device number and root
    # inode, so directory locks are also told apart by path.
    key = (label, st.st_dev, st.st_ino) if keep_open else (label, st.st_dev, st.st_ino, path)
    namespace = _namespaces.get(key)
    if namespace is None:
        # Looked up only when this lock is made (the lock keeps it), and
        # outside the registry lock: looking it up may make it.
        before = namespace_lock(before_kind).lock if before_kind else None
        with _registry_lock:
            namespace = _namespaces.get(key)
            if namespace is None:
                lock = NamespaceLock(path, label, before, keep_open)
                namespace = Namespace(lock, label)
                lock.namespace = namespace
                _namespaces[key] = namespace
    return namespace


def cached_fds():
    """fds idpin keeps open on purpose: pooled lock descriptions and knobs per namespace."""
    if _forked:
        settle_after_fork()
    fds = {_current["task fd"]} if "task fd" in _current else set()
    for namespace in list(_namespaces.values()):
        if namespace.lock._keep_open:
            fds.update(namespace.lock._fds)  # never closed: idle, or held by a thread
        fds.update(namespace._knobs.values())
        fds.update(namespace._readers.values())
    return fds


# Knobs the parent had armed when this process was forked: (label, dev,
# ino) -> {knob name: value}. The child must not consume them unnoticed.
_inherited_armed = {}


def inherited_armed(kind):
    """{knob: value} armed in this namespace by the process this one forked from."""
    if _forked:
        settle_after_fork()
    if not _inherited_armed:
        return {}
    try:
        st = os.stat("/proc/self/ns/" + kind)
    except OSError:
        return {}
    return _inherited_armed.get((kind, st.st_dev, st.st_ino), {})


# Run first in a forked child, by modules that cache what it must not inherit.
ON_CHILD: list = []

# Every fd idpin keeps open (lock descriptions, knobs, readers, the task
# directory): a forked child closes them all at once.
_tracked_fds: set = set()


def _tracked(fd):
    _tracked_fds.add(fd)
    return fd


def _kept(cache, key, fd):
    """Keep ``fd`` as ``cache[key]``, unless another thread kept one first: then that one."""
    kept = cache.setdefault(key, fd)
    if kept != fd:
        os.close(fd)
    else:
        _tracked(fd)
    return kept


def _close_tracked(fd):
    _tracked_fds.discard(fd)  # forgotten before closed: the number may be reused at once
    os.close(fd)


# A forked child does the least at the fork itself, because every page it
# writes then costs a copy (and its parent waits for it, typically): it
# closes the fds and marks the rest to be forgotten at its first use of
# idpin's locks (settle_after_fork), which most children (an exec, an exit)
# never make.
_forked = False
_settling = threading.RLock()


def _forget_all_in_child():
    global _generation, _forked, _settling
    for forget in ON_CHILD:
        forget()
    _generation += 1
    _settling = threading.RLock()  # a parent thread may have held it at the fork
    _forked = True
    # The parent's descriptions: closing drops a reference (a lock held in
    # them is the parent's to release, and must not outlive it because of
    # this child); LOCK_UN would release the parent's lock.
    for fd in _tracked_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _tracked_fds.clear()


def settle_after_fork():
    """In a forked child, at its first use of idpin's locks: forget the parent's."""
    global _forked
    with _settling:  # the child's threads may all arrive here; one forgets
        if _forked:
            _forget_parents_state()
            _forked = False  # only once forgotten: no thread goes on with the parent's


def _forget_parents_state():
    global _registry_lock
    _registry_lock = threading.Lock()
    # Another thread of the parent may have held one at the fork.
    _alloc_mutexes.clear()
    _inherited_armed.clear()
    for key, namespace in list(_namespaces.items()):
        if namespace.armed:
            _inherited_armed[key[:3]] = dict(namespace.armed)
        namespace.forget_in_child()
    _namespaces.clear()
    _current.clear()
    _held.clear()


os.register_at_fork(after_in_child=_forget_all_in_child)
