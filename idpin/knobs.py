"""Knob files and the namespace lock.

The kernel's "next id" knobs (ns_last_pid, {sem,shm,msg}_next_id) are per
namespace, not per thread. idpin turns them into per-thread requests by
holding a namespace-wide lock from the knob write until the allocating call
has returned. The lock is flock(LOCK_EX) on the namespace file
(/proc/self/ns/pid, /proc/self/ns/ipc) or, for ptys, on the devpts instance's
root directory: the same nsfs inode through every proc mount, so it excludes
across mounts, and the kernel drops it when its holder dies.

Inside one process a reentrant mutex per namespace serialises the threads'
blocks, and one open file description per namespace carries the flock. That
description is never shared with a forked child: the child closes its copies
(without unlocking, which would release the parent's lock) and starts
afresh, remembering which knobs its parent had armed. A second, short mutex
per kind of namespace (``allocating``) covers each knob write with the
allocation that consumes it, and each allocation that asked for nothing.
"""
import contextlib
import fcntl
import os
import threading

from . import _sys
from .errors import NEEDS_NAMESPACE_HINT, UnsupportedError

_registry_lock = threading.Lock()
_locks = {}
_generation = 0
# Locks some thread of this process holds (the namespace runner checks that
# none is left held).
_held = set()


def any_held():
    return bool(_held)


# One short mutex per kind of namespace for the whole process, around every
# knob write and the allocation that consumes it, and around every routed
# allocation that asked for nothing (which must see the knob as armed or not,
# with no window between looking and allocating). Reentrant: a signal handler
# may allocate while its thread holds it.
_alloc_mutexes = {}


def allocating(label):
    mutex = _alloc_mutexes.get(label)
    if mutex is None:
        # setdefault is atomic: two threads get the same mutex. (Not under
        # _registry_lock: NamespaceLock() is built while holding it.)
        mutex = _alloc_mutexes.setdefault(label, threading.RLock())
    return mutex


def any_armed():
    """Whether a block of this process has a knob armed, or the parent had when
    this process was forked: the only times an unpinned allocation must look."""
    return bool(_inherited_armed) or any(lock.armed for lock in list(_locks.values()))


class NamespaceLock:
    """The idpin lock of one namespace; reentrant per thread.

    A namespace lock keeps the namespace file open for its lifetime, which
    also keeps the namespace alive, so its inode number (the registry key) is
    never reused while this object exists, and knob fds cached here stay
    meaningful. A directory lock (a devpts instance) opens its directory only
    while held, so that it never keeps the instance mounted.

    Besides the block-long ownership (``acquire``/``release``), threads of
    this process share ``alloc``, a short mutex around each knob write and
    the allocation that consumes it, and ``armed``: the knob values request
    blocks of this process have armed, so that other allocations can steer
    clear of them.
    """

    def __init__(self, path, label, on_acquire=None, keep_open=True):
        self.path = path
        self.label = label
        self.alloc = allocating(label)
        self.armed = {}
        self._watchers = {}
        self._steering = threading.local()
        self._on_acquire = on_acquire
        self._keep_open = keep_open
        self._mutex = threading.RLock()
        self._depth = 0
        self._owner = None
        self._knobs = {}
        self._fd = self._open() if keep_open else -1

    def _open(self):
        return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def acquire(self):
        self._mutex.acquire()
        if self._depth == 0:
            try:
                if not self._keep_open:
                    self._fd = self._open()
                _sys.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._close_if_transient()
                self._mutex.release()
                raise
            self._owner = threading.get_ident()
            _held.add(self)
        self._depth += 1
        if self._depth == 1 and self._on_acquire is not None:
            try:
                self._on_acquire(self)
            except BaseException:
                self.release()
                raise

    def release(self):
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            _held.discard(self)
            _sys.flock(self._fd, fcntl.LOCK_UN)
            self._close_if_transient()
        self._mutex.release()

    def _close_if_transient(self):
        if not self._keep_open and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def held(self):
        """Context manager that is a no-op on exit in a forked child."""
        return _Held(self)

    def held_by_this_thread(self):
        return self._owner == threading.get_ident()

    def excluding_other_threads(self):
        """Hold only the in-process mutex: no other thread of ours can arm a knob."""
        return self._mutex

    def knob(self, name):
        """The fd of /proc/sys/kernel/<name>, opened once per namespace."""
        fd = self._knobs.get(name)
        if fd is None:
            fd = open_knob(name)
            self._knobs[name] = fd
        return fd

    def rearm(self, name):
        """Write back the value a block armed, after an allocation moved the knob."""
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
        write_knob(self.knob(name), name, value + 1)
        self._steering.depth = 1
        try:
            yield
        finally:
            self._steering.depth = 0
            if generation == _generation:
                write_knob(self.knob(name), name, value)

    def watch(self, kind):
        """What routed calls of ``kind`` make (ids) and remove (a count) from now on.

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

    def note_removed(self, kind):
        for watcher in self._watchers.get(kind, ()):
            watcher.removed += 1

    def forget_in_child(self):
        # The child holds copies of the parent's descriptions: closing them
        # drops a reference; LOCK_UN would release the parent's lock.
        for fd in [self._fd, *self._knobs.values()]:
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError:
                pass


class Watcher:
    __slots__ = ("made", "removed")

    def __init__(self):
        self.made = set()
        self.removed = 0


class _Held:
    __slots__ = ("lock", "generation")

    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        self.lock.acquire()
        self.generation = _generation
        return self.lock

    def __exit__(self, *exc):
        if self.generation == _generation:
            self.lock.release()
        return False


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


def namespace_lock(kind, on_acquire=None):
    """The lock of this process's current ``kind`` ("pid" or "ipc") namespace."""
    return _lock_for("/proc/self/ns/" + kind, kind, on_acquire)


def directory_lock(path, label):
    """The lock on a directory (a devpts instance's root), open only while held."""
    return _lock_for(path, label, None, keep_open=False)


def existing_namespace_lock(kind):
    """The lock if this process has made one for its current namespace, else None.

    Free for a process that never made a request (no lookup at all).
    """
    if not _locks:
        return None
    try:
        st = os.stat("/proc/self/ns/" + kind)
    except OSError:
        return None
    return _locks.get((kind, st.st_dev, st.st_ino))


def _lock_for(path, label, on_acquire, keep_open=True):
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
    lock = _locks.get(key)
    if lock is None:
        with _registry_lock:
            lock = _locks.get(key)
            if lock is None:
                lock = NamespaceLock(path, label, on_acquire, keep_open)
                _locks[key] = lock
    return lock


def cached_fds():
    """fds idpin keeps open on purpose: one namespace file and its knobs per namespace."""
    fds = set()
    for lock in list(_locks.values()):
        if lock._keep_open:
            fds.add(lock._fd)
        fds.update(lock._knobs.values())
    return fds


# Knobs the parent had armed when this process was forked: (label, dev,
# ino) -> {knob name: value}. The child must not consume them unnoticed.
_inherited_armed = {}


def inherited_armed(kind):
    """{knob: value} armed in this namespace by the process this one forked from."""
    if not _inherited_armed:
        return {}
    try:
        st = os.stat("/proc/self/ns/" + kind)
    except OSError:
        return {}
    return _inherited_armed.get((kind, st.st_dev, st.st_ino), {})


def _forget_all_in_child():
    global _generation, _registry_lock
    _generation += 1
    _registry_lock = threading.Lock()
    # Another thread of the parent may have held one at the fork.
    _alloc_mutexes.clear()
    _inherited_armed.clear()
    for key, lock in list(_locks.items()):
        if lock.armed:
            _inherited_armed[key[:3]] = dict(lock.armed)
        lock.forget_in_child()
    _locks.clear()
    _held.clear()


os.register_at_fork(after_in_child=_forget_all_in_child)

