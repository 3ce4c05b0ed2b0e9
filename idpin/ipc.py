"""Chosen SysV IPC ids: semaphore sets, shared memory segments, message queues.

The kernel offers one knob per kind and IPC namespace,
/proc/sys/kernel/{sem,shm,msg}_next_id, holding the full id the next creation
of that kind (by anyone) will get. It is namespace-wide, silently yields the
next free index when the asked one is taken, cannot be cancelled (writing -1
is EINVAL), and is not consumed by a creation that fails early. So:

- a request block holds the IPC namespace lock from entry to exit with the
  knob armed, after checking the index is free (a busy id raises IdBusyError
  when the block is entered: the knob could not report it later);
- routed creations (``semget``/``shmget``/``msgget`` here, ``create_many``)
  re-arm, create and verify in one backend call, removing a wrongly numbered
  object before raising;
- creations idpin does not see (C code, the sysv_ipc package) consume the
  armed knob; at block exit idpin checks the object got the id;
- leaving a block never leaves a knob armed: an unconsumed value is consumed
  by a throwaway object, removed at once;
- every holder leaves the knobs idle before unlocking, so a value found armed
  when the lock is taken was left by a holder that died mid-block (or by a
  tool that does not take the lock); it is consumed before anything else.

A creation by another process that bypasses idpin can still consume an armed
knob: idpin detects it (the id differs) and raises IdBusyError; the kernel
offers no way to prevent it.
"""
import collections
import contextlib
import errno
import operator
import os

from . import _sys, knobs
from .errors import IdBusyError, RequestError, UnsupportedError
from .request import Kind, consume, enclosing_pending_request, pending, register_kind, validate_int

IPC_PRIVATE = _sys.IPC_PRIVATE
IPC_CREAT = _sys.IPC_CREAT
IPC_EXCL = _sys.IPC_EXCL

KINDS = ("sem", "shm", "msg")
KNOB = {"sem": "sem_next_id", "shm": "shm_next_id", "msg": "msg_next_id"}
CODE = _sys.IPC_KIND_CODES
INT_MAX = 2**31 - 1
_IDLE = -1

_shift = None


def ipc_shift():
    """Bits of the index in an IPC id: 15, or 24 with the ipcmni_extend boot option."""
    global _shift
    if _shift is None:
        try:
            with open("/proc/cmdline") as f:
                extended = "ipcmni_extend" in f.read().split()
        except OSError:
            extended = False
        _shift = 24 if extended else 15
    return _shift


def index_of(id):
    return id & ((1 << ipc_shift()) - 1)


def _validator(kind):
    def validate(value):
        shift = ipc_shift()
        return validate_int(
            kind, value, 0, INT_MAX,
            "index = id & %d below %d, seq = id >> %d" % ((1 << shift) - 1, 1 << shift, shift),
        )

    return validate


def ipc_lock():
    return knobs.namespace_lock("ipc", on_acquire=_consume_stale_knobs)


def _consume_stale_knobs(lock):
    for kind in KINDS:
        if _sys.knob_read(lock.knob(KNOB[kind])) != _IDLE:
            consume_knob(kind, lock)


def consume_knob(kind, lock):
    """Use up an armed knob with a throwaway object, removed at once.

    A full namespace refuses the throwaway before it reads the knob, which
    would stay armed for a later, unrelated creation: then the limits are
    raised by one for the throwaway and put back.
    """
    try:
        _throwaway(kind)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        with _one_more_object(kind):
            _throwaway(kind)


def _throwaway(kind):
    code = CODE[kind]
    _sys.ipc_remove(code, _sys.ipc_get(code, IPC_PRIVATE, 1, IPC_CREAT | 0o600))


# The limits a throwaway object counts against, per kind: (file, field).
_LIMITS = {
    "msg": [("msgmni", 0)],
    "shm": [("shmmni", 0), ("shmall", 0)],
    "sem": [("sem", 1), ("sem", 3)],  # semmns, semmni
}


@contextlib.contextmanager
def _one_more_object(kind):
    changed = []
    try:
        for name, field in _LIMITS[kind]:
            changed.append((name, _bump_limit(name, field)))
        yield
    except PermissionError:
        raise UnsupportedError(
            "%s stays armed: the IPC namespace is full and raising its limits was refused; "
            "remove a %s object, then take the lock again (any idpin request) to consume it"
            % (KNOB[kind], kind), kind=kind,
        ) from None
    finally:
        for name, text in reversed(changed):
            _write_text("/proc/sys/kernel/" + name, text)


def _bump_limit(name, field):
    path = "/proc/sys/kernel/" + name
    with open(path) as f:
        text = f.read()
    values = text.split()
    values[field] = str(int(values[field]) + 1)
    _write_text(path, " ".join(values))
    return text


def _write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def _holder(kind, id):
    """The id holding ``id``'s index, or -1."""
    return _sys.ipc_stat_index(CODE[kind], index_of(id))


def _busy_error(kind, id, holder):
    return IdBusyError(kind, id, "index %d is held by %s id %d" % (index_of(id), kind, holder))


def _wrong_id_error(kind, id, got):
    # ipc_create_pinned has already removed the wrongly numbered object.
    return IdBusyError(
        kind, id, "the kernel gave %d (the index was taken outside idpin's lock); it was removed" % got
    )


# -- request blocks -------------------------------------------------------


def arm(req, kind):
    value = req.ids[kind]
    lock = ipc_lock()
    lock.acquire()
    try:
        holder = _holder(kind, value)
        if holder != -1:
            raise _busy_error(kind, value, holder)
        with lock.alloc:  # no routed creation between the count and the arming
            req.armed[kind] = (lock, _sys.ipc_count(CODE[kind]), lock.watch(kind))
            _arm(lock, kind, value)
    except BaseException:
        entry = req.armed.pop(kind, None)
        if entry is not None:
            lock.unwatch(kind, entry[2])
        lock.release()
        raise


def _arm(lock, kind, value):
    with lock.alloc:
        knobs.write_knob(lock.knob(KNOB[kind]), KNOB[kind], value)
        lock.armed[KNOB[kind]] = value


def shm_creator(id):
    """The pid (as /proc shows it) that created shm segment ``id``, or None."""
    with open("/proc/sysvipc/shm") as f:
        for line in f.readlines()[1:]:
            row = line.split()
            if int(row[1]) == id:
                return int(row[4])
    return None


def _proc_pid():
    try:
        return int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return None


def disarm(req, kind):
    lock, before, routed = req.armed.pop(kind)
    try:
        if kind not in req.consumed:
            with lock.alloc:  # the count must match the routed creations noted
                _settle_unrouted(req, kind, lock, before, routed)
    finally:
        try:
            with lock.alloc:
                lock.armed.pop(KNOB[kind], None)
            lock.unwatch(kind, routed)
            outer = enclosing_pending_request(req, kind)
            if outer is not None:
                _rearm_outer(lock, outer, kind)
        finally:
            lock.release()


def _rearm_outer(lock, outer, kind):
    # What the inner block's creators made is not the outer block's to judge.
    _, _, routed = outer.armed[kind]
    outer.armed[kind] = (lock, _sys.ipc_count(CODE[kind]) - len(routed.made) + routed.removed, routed)
    _arm(lock, kind, outer.ids[kind])


def _settle_unrouted(req, kind, lock, count_before, routed):
    """Check a creation idpin did not route, from what changed during the block.

    Any creation of this kind in the namespace consumes the knob. The block
    knows how many objects of the kind existed when it was entered and which
    ones routed calls (of any thread here) made or removed since, so it
    credits the id only if exactly one other object appeared and it has the
    id (shm: created by this process). Otherwise it cannot tell whose
    creation got the id, and says so rather than guess. (A removal outside
    idpin during the block can hide a creation from this count.)
    """
    value = req.ids[kind]
    now = _sys.knob_read(lock.knob(KNOB[kind]))
    if now == value:
        consume_knob(kind, lock)
        return
    if now != _IDLE:
        consume_knob(kind, lock)
        raise IdBusyError(kind, value, "%s was overwritten with %d by a process outside idpin's "
                          "lock" % (KNOB[kind], now))
    appeared = _sys.ipc_count(CODE[kind]) - count_before - len(routed.made) + routed.removed
    exists = _holder(kind, value) == value
    creator = shm_creator(value) if exists and kind == "shm" else None
    if exists and creator is not None:
        if creator == _proc_pid():
            consume(req, kind, value)
            return
        raise IdBusyError(kind, value, "shm %d was created by pid %d, not by this process"
                          % (value, creator))
    if exists and appeared == 1:
        consume(req, kind, value)
        return
    if not exists:
        detail = ("a creation consumed %s, but no object has the id: a process outside "
                  "idpin's lock took the knob, or the index was taken meanwhile" % KNOB[kind])
    else:
        detail = ("%d %s objects appeared during the block besides idpin's routed ones, and "
                  "any creation consumes the knob: idpin cannot tell which one got the id; "
                  "create with idpin.ipc.%sget for an exact answer" % (appeared, kind, kind))
    raise IdBusyError(kind, value, detail)


# -- routed creations -------------------------------------------------------


def semget(key, nsems, flags):
    """semget(2); inside ``request(sem=N)`` the new set gets id N or IdBusyError."""
    return _get("sem", key, nsems, flags)


def shmget(key, size, flags):
    """shmget(2); inside ``request(shm=N)`` the new segment gets id N or IdBusyError."""
    return _get("shm", key, size, flags)


def msgget(key, flags):
    """msgget(2); inside ``request(msg=N)`` the new queue gets id N or IdBusyError."""
    return _get("msg", key, 0, flags)


def remove(kind, id):
    """IPC_RMID the object ``id`` of ``kind`` ("sem", "shm" or "msg")."""
    code = _code(kind)
    with knobs.allocating("ipc"):  # a block's object count must see both or neither
        _sys.ipc_remove(code, id)
        lock = knobs.existing_namespace_lock("ipc") if knobs.any_armed() else None
        if lock is not None:
            lock.note_removed(kind)


def _code(kind):
    try:
        return CODE[kind]
    except KeyError:
        raise RequestError("IPC kind must be one of %s, not %r" % (", ".join(KINDS), kind)) from None


# C argument ranges of semget/shmget/msgget: key_t and int flags (negative
# or unsigned spellings both), int nsems, size_t size.
_KEY_RANGE = (-(2**31), 2**32 - 1)
_ARG_RANGES = {"sem": ("nsems", 0, INT_MAX), "shm": ("size", 0, 2**64 - 1), "msg": ("arg", 0, 0)}


def _check_c_args(kind, key, arg, flags):
    name, low, high = _ARG_RANGES[kind]
    # The common case, plain ints in range, costs three comparisons each.
    if (type(key) is int and type(arg) is int and type(flags) is int
            and _KEY_RANGE[0] <= key <= _KEY_RANGE[1] and low <= arg <= high
            and _KEY_RANGE[0] <= flags <= _KEY_RANGE[1]):
        return
    for what, value, (lo, hi) in (("key", key, _KEY_RANGE), (name, arg, (low, high)),
                                  ("flags", flags, _KEY_RANGE)):
        try:
            number = operator.index(value)
        except TypeError:
            raise RequestError("%sget: %s must be an int, not %r" % (kind, what, value), kind=kind) from None
        if isinstance(value, bool) or not lo <= number <= hi:
            raise RequestError("%sget: %s must be an int in %d..%d, not %r" % (kind, what, lo, hi, value),
                               kind=kind)


def _get(kind, key, arg, flags):
    _check_c_args(kind, key, arg, flags)
    found = pending(kind)
    if found is None or not _may_allocate(key, flags):
        return _plain_get(kind, key, arg, flags)
    req, value = found
    got = create_pinned(kind, value, key, arg, flags)
    if got is not None:
        consume(req, kind, value)
        return got
    # The key existed and the caller did not ask for IPC_EXCL: a lookup, not
    # an allocation; the request stays pending.
    return _plain_get(kind, key, arg, flags)


def _may_allocate(key, flags):
    return key == IPC_PRIVATE or bool(flags & IPC_CREAT)


def _plain_get(kind, key, arg, flags):
    """A creation that asked for nothing must not consume a knob a block armed.

    Another thread's block: wait while a knob of this kind is armed. A
    process forked inside a block of its parent: take the namespace lock like
    any other process (so it waits for that block to end).
    """
    if not _may_allocate(key, flags):
        return _sys.ipc_get(CODE[kind], key, arg, flags)
    while True:
        with knobs.allocating("ipc"):
            lock = knobs.existing_namespace_lock("ipc") if knobs.any_armed() else None
            if lock is None:
                if KNOB[kind] in knobs.inherited_armed("ipc"):
                    break
                return _sys.ipc_get(CODE[kind], key, arg, flags)
            if lock.held_by_this_thread() or KNOB[kind] not in lock.armed:
                return _noted(lock, kind, _sys.ipc_get(CODE[kind], key, arg, flags))
        with lock.excluding_other_threads():
            pass
    lock = ipc_lock()
    with lock.held():
        return _noted(lock, kind, _sys.ipc_get(CODE[kind], key, arg, flags))


def _noted(lock, kind, id):
    lock.note(kind, id)
    return id


def create_pinned(kind, value, key, arg, flags):
    """Create with id ``value``, or raise IdBusyError leaving no object.

    IPC_EXCL is always added: a creation that finds an existing key must fail
    rather than return that object's id (which would then look wrong and be
    removed). Returns None if the key exists and ``flags`` lacked IPC_EXCL.
    """
    lock = ipc_lock()
    with lock.held(), lock.alloc:
        try:
            got = _sys.ipc_create_pinned(
                lock.knob(KNOB[kind]), CODE[kind], value, key, arg, flags | IPC_EXCL
            )
        except FileExistsError:
            restore_knob(kind, lock)
            if flags & IPC_EXCL:
                raise
            return None
        except BaseException:
            restore_knob(kind, lock)
            raise
        if got != value:
            restore_knob(kind, lock)
            raise _wrong_id_error(kind, value, got)
        lock.armed.pop(KNOB[kind], None)  # consumed
        lock.note(kind, got)
    return got


def restore_knob(kind, lock):
    """After a failed pinned creation: the knob as this thread's blocks expect it.

    A creation that fails before allocating leaves the knob armed; one that
    got a wrong id consumed it. A pending request keeps its id armed (it is
    still pending); with none, the knob must be idle.
    """
    fd = lock.knob(KNOB[kind])
    found = pending(kind)
    if found is not None:
        knobs.write_knob(fd, KNOB[kind], found[1])
        lock.armed[KNOB[kind]] = found[1]
    elif _sys.knob_read(fd) != _IDLE:
        consume_knob(kind, lock)


# -- batches ---------------------------------------------------------------

Spec = collections.namedtuple("Spec", "kind id key size mode", defaults=(IPC_PRIVATE, 1, 0o600))
Spec.__doc__ = """One object for create_many: kind ("sem", "shm", "msg"), the id it must get,
its key (IPC_PRIVATE by default), size (semaphores in the set for sem, bytes for
shm, ignored for msg) and permission bits."""


def _as_spec(item):
    if isinstance(item, Spec):
        spec = item
    elif isinstance(item, dict):
        spec = Spec(**item)
    else:
        spec = Spec(*item)
    if spec.kind not in KINDS:
        raise RequestError(
            "spec kind must be one of %s, not %r" % (", ".join(KINDS), spec.kind), kind=spec.kind
        )
    if not (type(spec.id) is int and 0 <= spec.id <= INT_MAX):
        KIND_OBJECTS[spec.kind].validate(spec.id)  # raises, naming the range
    if isinstance(spec.mode, bool) or not isinstance(spec.mode, int):
        raise RequestError("spec mode must be an int, not %r" % (spec.mode,), kind=spec.kind)
    _check_c_args(spec.kind, spec.key, spec.size if spec.kind != "msg" else 0, spec.mode)
    if spec.mode & ~0o777:
        raise RequestError("spec mode must be permission bits (0..0o777), not %o" % spec.mode)
    return spec


def _check_distinct(specs):
    seen = {}
    for spec in specs:
        slot = (spec.kind, index_of(spec.id))
        if slot in seen:
            raise RequestError(
                "%s ids %d and %d share index %d: only one can exist"
                % (spec.kind, seen[slot], spec.id, slot[1]),
                kind=spec.kind,
            )
        seen[slot] = spec.id


def create_many(specs):
    """Create many pinned objects under one lock acquisition, all or nothing.

    ``specs`` is an iterable of Spec (or tuples/dicts with its fields).
    Returns the ids in order. On any failure every object it created is
    removed and no knob is left armed.
    """
    specs = [_as_spec(item) for item in specs]
    _check_distinct(specs)
    if not specs:
        return []
    lock = ipc_lock()
    created = []
    with lock.held(), lock.alloc:
        try:
            for spec in specs:
                holder = _holder(spec.kind, spec.id)
                if holder != -1:
                    raise _busy_error(spec.kind, spec.id, holder)
            for spec in specs:
                created.append(_create_one(lock, spec))
        except BaseException:
            for kind, id in reversed(created):
                _sys.ipc_remove(CODE[kind], id)
            for kind in KINDS:
                restore_knob(kind, lock)
            raise
        for kind, id in created:
            lock.note(kind, id)
        for kind in {spec.kind for spec in specs}:
            restore_knob(kind, lock)  # a block of this thread may have armed it
    return [id for _, id in created]


def _create_one(lock, spec):
    flags = IPC_CREAT | IPC_EXCL | spec.mode
    got = _sys.ipc_create_pinned(
        lock.knob(KNOB[spec.kind]), CODE[spec.kind], spec.id, spec.key, spec.size, flags
    )
    if got != spec.id:
        raise _wrong_id_error(spec.kind, spec.id, got)
    return spec.kind, got


KIND_OBJECTS = {kind: Kind(kind, _validator(kind), arm, disarm) for kind in KINDS}
for _kind in KIND_OBJECTS.values():
    register_kind(_kind)
