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
__all__ = [
    "IPC_CREAT", "IPC_EXCL", "IPC_PRIVATE", "KINDS", "Spec", "create_many", "msgget", "remove",
    "semget", "shmget",
]

import collections
import errno
import json
import time
import operator
import os
import threading
from collections.abc import Iterable
from typing import Any

from . import _sys, knobs, pids, signals, tids
from .errors import IdBusyError, IdpinError, RequestError, UnsupportedError
from .request import (Kind, consume, enclosing_pending_request, pending, register_kind, uncredit,
                      validate_int)

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
    """The IPC namespace's Namespace; its lock takes the pid namespace's first."""
    return knobs.namespace_lock("ipc")


def _clean_up_after_dead_holders(lock):
    """Taking the lock: undo what a holder killed mid-block may have left.

    Every holder leaves the knobs idle and its throwaway objects removed
    before unlocking, so an armed knob or an object with idpin's key found
    now was left by a holder that died (or by a tool that does not take the
    lock): both are undone before anything else. Throwaway objects and
    raised limits exist only while the consuming record does, so a holder
    that finds none looks no further (one failed mq_open).
    """
    ns = lock.namespace
    if _sys.record_exists(CONSUMING_RECORD):
        put_back_recorded_limits()
        for kind in KINDS:
            _reclaim_throwaway(kind)
        _sys.record_remove(CONSUMING_RECORD)
    for kind in KINDS:
        if _sys.knob_read(ns.knob(KNOB[kind])) != _IDLE:
            consume_knob(kind, ns)


knobs.ON_ACQUIRE["ipc"] = _clean_up_after_dead_holders


# idpin's own throwaway objects carry this key and mode, so that one left by
# a holder killed between creating and removing it can be told from anyone
# else's object and removed.
THROWAWAY_KEY = 0x49445049  # "IDPI"
THROWAWAY_MODE = 0o000
# Pinned creations tried again when a creation outside idpin's lock took the
# knob but the id is free again: at most this many, within this many seconds.
RETRY_ATTEMPTS = 64
RETRY_SECONDS = 0.5


def _reclaim_throwaway(kind):
    """Remove a throwaway object a killed holder left; whether the key is free now."""
    try:
        id = _sys.ipc_get(CODE[kind], THROWAWAY_KEY, 0, 0)
    except FileNotFoundError:
        return True
    if _mode_of(kind, id) != THROWAWAY_MODE:
        return False  # someone else's object with that key: not idpin's to remove
    try:
        _sys.ipc_remove(CODE[kind], id)
    except OSError:
        pass
    return True


def _mode_of(kind, id):
    with open("/proc/sysvipc/" + kind) as f:
        for line in f.readlines()[1:]:
            row = line.split()
            if int(row[1]) == id:
                return int(row[2], 8) & 0o777
    return None


def consume_knob(kind, ns):
    """Use up an armed knob with a throwaway object, removed at once.

    A creation refused before it reads the knob (a full namespace, a limit
    lowered below the objects in use) would leave the knob armed for a later,
    unrelated creation: then the limits are raised just enough for the
    throwaway and put back, with a record that lets the next holder put them
    back if this one is killed meanwhile.
    """
    _write_consuming_record()
    try:
        _throwaway(kind)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EINVAL, errno.ENOMEM):
            raise
        _throwaway_with_room(kind)
    _sys.record_remove(CONSUMING_RECORD)
    if _sys.knob_read(ns.knob(KNOB[kind])) != _IDLE:
        raise UnsupportedError(
            "%s stays armed after idpin's throwaway %s creation: a process outside idpin's "
            "lock re-armed it" % (KNOB[kind], kind), kind=kind,
        )


# A POSIX message queue (it belongs to the IPC namespace) that exists while a
# holder consumes a knob: a throwaway object, or limits raised for one, can
# have been left only by a holder killed while it existed. Every other lock
# holder pays one failed mq_open to know there is nothing of the kind.
CONSUMING_RECORD = "/idpin.ipc-consuming"


def _write_consuming_record():
    try:
        _sys.record_write(CONSUMING_RECORD, b"")
    except FileExistsError:
        pass  # left by a holder killed while consuming, and not yet acted on
    except OSError:
        # No room for a POSIX queue (fs.mqueue.queues_max, RLIMIT_MSGQUEUE):
        # a throwaway left by a SIGKILL in the next microseconds is then found
        # by the next throwaway's creation (its key exists) instead.
        pass


def _throwaway_key(kind):
    """The key for a throwaway: idpin's own, unless another program holds it."""
    return THROWAWAY_KEY if _reclaim_throwaway(kind) else IPC_PRIVATE


def _throwaway(kind):
    code = CODE[kind]
    flags = IPC_CREAT | IPC_EXCL | THROWAWAY_MODE
    key = THROWAWAY_KEY
    try:
        try:
            id = _sys.ipc_get(code, key, 1, flags)
        except FileExistsError:
            # Left by a holder killed between create and remove (or another
            # program's): an existing key fails before the knob is read.
            key = _throwaway_key(kind)
            id = _sys.ipc_get(code, key, 1, flags)
        _sys.ipc_remove(code, id)
    except BaseException:
        if key == THROWAWAY_KEY:
            _reclaim_throwaway(kind)  # found by its key, even if the id was lost
        raise


# The limits a throwaway object counts against, per kind:
# (sysctl file, field, how much of it one more object needs from the usage).
_LIMITS = {
    "msg": [("msgmni", 0, "objects")],
    "shm": [("shmmni", 0, "objects"), ("shmall", 0, "pages")],
    "sem": [("sem", 0, "one"), ("sem", 1, "sems"), ("sem", 3, "objects")],  # semmsl, semmns, semmni
}


def _usage(kind):
    """{"objects": n, "sems": total semaphores, "pages": total shm pages} in use."""
    rows = []
    with open("/proc/sysvipc/" + kind) as f:
        for line in f.readlines()[1:]:
            rows.append(line.split())
    usage = {"objects": len(rows), "one": 0}
    if kind == "sem":
        usage["sems"] = sum(int(row[3]) for row in rows)
    if kind == "shm":
        page = os.sysconf("SC_PAGE_SIZE")
        usage["pages"] = sum((int(row[3]) + page - 1) // page for row in rows)
    return usage


# A POSIX message queue (it belongs to the IPC namespace and has limits of
# its own) holding the SysV limits idpin is about to raise, written before
# they are raised and removed once they are back: a holder killed between
# the two leaves it for the next one, which puts the limits back.
LIMITS_RECORD = "/idpin.ipc-limits"


def _throwaway_with_room(kind):
    """The throwaway, with the limits raised just enough for it and put back."""
    usage = _usage(kind)
    texts = {}
    for name, _, _ in _LIMITS[kind]:
        path = "/proc/sys/kernel/" + name
        if path not in texts:
            with open(path) as f:
                texts[path] = f.read().strip()
    raised = dict(texts)
    for name, field, need in _LIMITS[kind]:
        path = "/proc/sys/kernel/" + name
        values = raised[path].split()
        values[field] = str(max(int(values[field]), usage[need] + 1))
        raised[path] = " ".join(values)
    changed = {path: texts[path] for path in texts if raised[path].split() != texts[path].split()}
    put_back_recorded_limits()
    try:
        record = {path: [texts[path], raised[path]] for path in changed}
        _sys.record_write(LIMITS_RECORD, json.dumps(record).encode())
    except OSError:
        # No room for a POSIX queue either (fs.mqueue.queues_max,
        # RLIMIT_MSGQUEUE): the limits are still put back below, but a
        # SIGKILL in between would leave them raised.
        pass
    try:
        try:
            for path in changed:
                _write_text(path, raised[path])
            _throwaway(kind)
        finally:
            for path, text in changed.items():
                _write_text(path, text)
    except PermissionError:
        raise UnsupportedError(
            "%s stays armed: the IPC namespace has no room for another %s (kernel.%s are at "
            "or below what is in use) and raising them was refused; raise them or remove a "
            "%s object, then take idpin's lock again (any idpin request) to consume it"
            % (KNOB[kind], kind, ", kernel.".join(sorted({n for n, _, _ in _LIMITS[kind]})),
               kind),
            kind=kind,
        ) from None
    finally:
        _sys.record_remove(LIMITS_RECORD)


def _write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def put_back_recorded_limits():
    """Limits a holder killed while they were raised left in the record: put them back."""
    data = _sys.record_read(LIMITS_RECORD)
    if data is None:
        return
    if data:
        for path, (old, raised) in json.loads(data).items():
            with open(path) as f:
                now = f.read()
            # Only a limit still at the value idpin raised it to: one changed
            # since (someone made room on purpose) is theirs.
            if now.split() == raised.split():
                _write_text(path, old)
    _sys.record_remove(LIMITS_RECORD)


def _holder(kind, id):
    """The id holding ``id``'s index, or -1 (also for an object being removed just now)."""
    try:
        return _sys.ipc_stat_index(CODE[kind], index_of(id))
    except OSError as err:
        if err.errno == errno.EIDRM:
            return -1  # being removed (EIDRM): the pinned creation itself will tell
        raise


def _busy_error(kind, id, holder):
    return IdBusyError(kind, id, "index %d is held by %s id %d" % (index_of(id), kind, holder))


def _wrong_id_error(kind, id, got):
    # ipc_create_pinned has already removed the wrongly numbered object.
    return IdBusyError(
        kind, id, "the kernel gave %d (the index was taken outside idpin's lock); it was removed" % got
    )


def _full_error(kind, err):
    return UnsupportedError(
        "the IPC namespace refused another %s (%s): it is at its limits (kernel.%s); "
        "raise them or remove objects" % (kind, err.strerror or err, ", kernel.".join(
            sorted({n for n, _, _ in _LIMITS[kind]}))), kind=kind,
    )


# -- request blocks -------------------------------------------------------


def census(kind, ns):
    """{id: creator pid for shm (as /proc shows it), else None} of every object of ``kind``."""
    return parse_census(kind, census_text(kind, ns))


def census_text(kind, ns):
    """/proc/sysvipc/<kind> as it is now, unparsed: a block takes it at entry and
    parses it only if a creation idpin did not route must be checked."""
    return _sys.proc_read(ns.reader("/proc/sysvipc/" + kind))


def parse_census(kind, text):
    objects = {}
    for line in text.split(b"\n")[1:]:
        row = line.split()
        if row:
            objects[int(row[1])] = int(row[4]) if kind == "shm" else None
    return objects


class _IpcBlock(knobs.BlockHold):
    __slots__ = ("alone", "starts")

    def __init__(self, ns):
        super().__init__(ns)
        # Whether this thread was the process's only one, and how many
        # threads threading had started: an unrouted creation can be this
        # thread's only if no other thread could have made it.
        self.alone = pids.thread_count() == 1
        self.starts = tids.thread_starts()


def arm(req, kind):
    value = req.ids[kind]
    ns = ipc_lock()
    # Recorded before anything is taken, so that an exception at any point
    # (a signal handler's included) leaves disarm something exact to undo.
    req.armed[kind] = block = _IpcBlock(ns)
    ns.acquire()
    block.held = True
    holder = _holder(kind, value)
    if holder != -1:
        raise _busy_error(kind, value, holder)
    with ns.alloc:  # no routed creation between the census and the arming
        block.before = census_text(kind, ns)
        block.routed = ns.watch(kind)
        block.cursor = _pid_cursor(ns)
        _arm(ns, kind, value)


def _arm(ns, kind, value):
    with ns.alloc:
        ns.armed[KNOB[kind]] = value
        knobs.write_knob(ns.knob(KNOB[kind]), KNOB[kind], value)


def _pid_cursor(ns):
    """ns_last_pid: the last pid or tid the pid namespace handed out (-1 if unreadable).

    Read through a read-only fd: an IPC-only user may not be allowed to open
    the knob for writing."""
    try:
        return _sys.knob_read(ns.reader("/proc/sys/kernel/ns_last_pid"))
    except (OSError, ValueError):
        return -1


def _proc_pid():
    try:
        return int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return None


def disarm(req, kind):
    """Leave an IPC block: check, disarm, unlock. Resumable after an interruption."""
    block = req.armed[kind]
    try:
        if block.held:
            _settle_and_clean(req, kind, block)
            block.ns.release()
            block.held = False
    finally:
        if not block.held:
            del req.armed[kind]


def _settle_and_clean(req, kind, block):
    ns = block.ns
    try:
        if not block.settled:
            # Checked once: an error here is the block's verdict; an
            # interrupted check leaves the knob to the cleaning below.
            block.settled = True
            if kind not in req.consumed and block.routed is not None:
                with ns.alloc:  # the census must match the routed creations noted
                    _settle_unrouted(req, kind, ns, block)
    finally:
        if not block.cleaned:
            with ns.alloc:
                ns.armed.pop(KNOB[kind], None)
                if block.routed is not None:
                    ns.unwatch(kind, block.routed)
                outer = enclosing_pending_request(req, kind)
                if outer is not None:
                    _rearm_outer(ns, outer, kind)
                _leave_knob_as_blocks_expect(kind, ns)
            block.cleaned = True


def _leave_knob_as_blocks_expect(kind, ns):
    """However the exit went: the knob holds what an enclosing block armed, or is idle."""
    if _sys.knob_read(ns.knob(KNOB[kind])) not in (_IDLE, ns.armed.get(KNOB[kind], _IDLE)):
        consume_knob(kind, ns)
        if KNOB[kind] in ns.armed:
            _arm(ns, kind, ns.armed[KNOB[kind]])


def _rearm_outer(ns, outer, kind):
    # What the inner block's creators made is not the outer block's to judge.
    outer_block = outer.armed[kind]
    outer_block.before = census_text(kind, ns)
    _arm(ns, kind, outer.ids[kind])


def _settle_unrouted(req, kind, ns, block):
    """Check a creation idpin did not route, from the objects that appeared during the block.

    Any creation of this kind in the namespace consumes the knob. The block
    knows every object that existed when it was entered and which ones
    routed calls (of any thread here) made since, so it credits the id only
    if the one object that appeared besides those has the id (shm: and was
    created by this process). Objects are told apart by id, which includes a
    sequence number, so a removal cannot hide a creation. Otherwise it
    cannot tell whose creation got the id, and says so rather than guess.
    """
    value = req.ids[kind]
    now = _sys.knob_read(ns.knob(KNOB[kind]))
    if now == value:
        consume_knob(kind, ns)  # nothing was created: nothing to check
        return
    if now != _IDLE:
        consume_knob(kind, ns)
        raise IdBusyError(kind, value, "%s was overwritten with %d by a process outside idpin's "
                          "lock" % (KNOB[kind], now))
    objects = census(kind, ns)
    appeared = set(objects) - set(parse_census(kind, block.before)) - block.routed.made
    if appeared == {value}:
        creator = objects[value]
        if kind == "shm" and creator != _proc_pid():
            raise IdBusyError(kind, value, "shm %d was created by pid %d, not by this process"
                              % (value, creator))
        # Any thread or process created in the pid namespace moves its
        # cursor: one that began and ended within the block (a C library's
        # thread) could have made the object, so the cursor must not move.
        if not (block.alone and pids.thread_count() == 1 and tids.thread_starts() == block.starts
                and _pid_cursor(ns) == block.cursor):
            raise IdBusyError(
                kind, value,
                "%s %d appeared during the block, but this process had other threads, or a "
                "task was created in the pid namespace meanwhile, and it could have made "
                "it: idpin cannot prove it was this thread's; "
                "create with idpin.ipc.%sget for an exact answer" % (kind, value, kind),
            )
        consume(req, kind, value)
        return
    if value not in appeared:
        detail = ("a creation consumed %s, but no object created during the block has the id: "
                  "a process outside idpin's lock took the knob, or the index was taken "
                  "meanwhile" % KNOB[kind])
    else:
        detail = ("%d %s objects appeared during the block besides idpin's routed ones "
                  "(%s), and any creation consumes the knob: idpin cannot tell which one got "
                  "the id; create with idpin.ipc.%sget for an exact answer"
                  % (len(appeared), kind, ", ".join(str(i) for i in sorted(appeared)), kind))
    raise IdBusyError(kind, value, detail)


# -- routed creations -------------------------------------------------------


def _undo_pinned_creation(kind):
    def undo(id):
        # Only a creation a request was credited with is surely this call's:
        # without IPC_EXCL, a plain one may have found an existing object.
        if uncredit(kind, id):
            ns = ipc_lock()
            with ns.held(), ns.alloc:
                _undo_created(kind, id, None)
                restore_knob(kind, ns)  # pending again: armed again if its block armed it

    return undo


@signals.door(undo=_undo_pinned_creation("sem"))
def semget(key: int, nsems: int, flags: int) -> int:
    """semget(2); inside ``request(sem=N)`` the new set gets id N or IdBusyError."""
    return _get("sem", key, nsems, flags)


@signals.door(undo=_undo_pinned_creation("shm"))
def shmget(key: int, size: int, flags: int) -> int:
    """shmget(2); inside ``request(shm=N)`` the new segment gets id N or IdBusyError."""
    return _get("shm", key, size, flags)


@signals.door(undo=_undo_pinned_creation("msg"))
def msgget(key: int, flags: int) -> int:
    """msgget(2); inside ``request(msg=N)`` the new queue gets id N or IdBusyError."""
    return _get("msg", key, 0, flags)


@signals.door()
def remove(kind: str, id: int) -> None:
    """IPC_RMID the object ``id`` of ``kind`` ("sem", "shm" or "msg")."""
    _sys.ipc_remove(_code(kind), id)


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
    block = req.armed.get(kind)
    # Inside this thread's block: its namespace, held since the block began.
    ns = block.ns if block is not None and block.held else None
    got = create_pinned(kind, value, key, arg, flags, ns)
    if got is not None:
        req.consumed[kind] = value  # inline: no call between creating and recording
        return got
    # The key existed and the caller did not ask for IPC_EXCL: a lookup, not
    # an allocation; the request stays pending.
    return _plain_get(kind, key, arg, flags)


def _may_allocate(key, flags):
    return key == IPC_PRIVATE or bool(flags & IPC_CREAT)


def _plain_get(kind, key, arg, flags):
    """A creation that asked for nothing must not consume a knob a block armed.

    Another thread's block, or a block of the parent this process was forked
    from: take the namespace lock like any other idpin user, so the creation
    waits (bounded) until that block has ended. A block of this thread: it
    is this thread's own creation, made with its knob armed, like any
    creator idpin does not see.
    """
    if not _may_allocate(key, flags):
        return _sys.ipc_get(CODE[kind], key, arg, flags)
    with knobs.allocating("ipc"):
        ns = knobs.existing_namespace_lock("ipc") if knobs.any_armed() else None
        if ns is None:
            if KNOB[kind] not in knobs.inherited_armed("ipc"):
                return _sys.ipc_get(CODE[kind], key, arg, flags)
        elif ns.held_by_this_thread() or KNOB[kind] not in ns.armed:
            return _noted(ns, kind, _sys.ipc_get(CODE[kind], key, arg, flags))
    ns = ipc_lock()
    with ns.held(), ns.alloc:
        return _noted(ns, kind, _sys.ipc_get(CODE[kind], key, arg, flags))


def _noted(ns, kind, id):
    ns.note(kind, id)
    return id


def create_pinned(kind: str, value: int, key: int, arg: int, flags: int, ns: Any = None) -> int:
    """Create with id ``value``, or raise IdBusyError leaving no object.

    IPC_EXCL is always added: a creation that finds an existing key must fail
    rather than return that object's id (which would then look wrong and be
    removed). Returns None if the key exists and ``flags`` lacked IPC_EXCL.
    ``ns``: the IPC Namespace, when the caller already holds its lock.
    """
    deadline = time.monotonic() + RETRY_SECONDS
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        got = _create_pinned_once(kind, value, key, arg, flags, ns)
        if got is None or got == value:
            return got
        # A creation outside idpin's lock consumed the knob (and got the id,
        # or moved on): only an id still taken afterwards is busy.
        if time.monotonic() >= deadline or not _free_soon(kind, value):
            break
    raise _wrong_id_error(kind, value, got)


def _create_pinned_once(kind, value, key, arg, flags, ns):
    """One pinned creation: the id (``value`` or a wrong one, already removed) or None."""
    ns = ns or ipc_lock()
    checked = False
    try:
        with ns.held(), ns.alloc:
            holder = _holder(kind, value)
            if holder != -1:
                raise _busy_error(kind, value, holder)
            checked = True  # from here, an object at ``value`` is this call's
            got = _create_pinned_checked(ns, kind, value, key, arg, flags)
        return got
    except (IdpinError, OSError):
        raise  # refused before or by the creation: nothing of this call exists
    except BaseException:
        if checked:
            # A signal handler's exception, however far it got (even after
            # the lock was released): no object.
            _sys.finish(_undo_created, kind, value, None)
        raise


def _free_soon(kind, value):
    """Whether ``value``'s index is free, or becomes free within the busy re-check time."""
    deadline = time.monotonic() + pids.BUSY_RECHECK_SECONDS
    while _holder(kind, value) != -1:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.0005)
    return True


def _create_pinned_checked(ns, kind, value, key, arg, flags):
    try:
        got = _sys.ipc_create_pinned(
            ns.knob(KNOB[kind]), CODE[kind], value, key, arg, flags | IPC_EXCL
        )
    except FileExistsError:
        restore_knob(kind, ns)
        if flags & IPC_EXCL:
            raise
        return None
    except OSError as err:
        restore_knob(kind, ns)
        if err.errno in (errno.ENOSPC, errno.ENOMEM):
            raise _full_error(kind, err) from None
        raise
    except BaseException:
        restore_knob(kind, ns)
        raise
    if got != value:
        restore_knob(kind, ns)
        return got  # removed already: the caller decides whether to try again
    ns.armed.pop(KNOB[kind], None)  # consumed
    ns.note(kind, got)
    return got


def _undo_created(kind, value, got):
    """Remove the object a pinned creation made (``got``), or found at ``value`` if unknown.

    Only called under the IPC lock and the allocation mutex, after ``value``
    was checked free: an object at ``value`` is this creation's.
    """
    if got is None and _holder(kind, value) == value:
        got = value
    if got == value:
        try:
            _sys.ipc_remove(CODE[kind], value)
        except OSError:
            pass


def restore_knob(kind, ns):
    """After a failed pinned creation: the knob as this thread's blocks expect it.

    A creation that fails before allocating leaves the knob armed; one that
    got a wrong id consumed it. A pending request keeps its id armed (it is
    still pending); with none, the knob must be idle.
    """
    fd = ns.knob(KNOB[kind])
    found = pending(kind)
    if found is not None and KNOB[kind] in ns.armed:
        _arm(ns, kind, found[1])
    elif _sys.knob_read(fd) != _IDLE:
        consume_knob(kind, ns)


# -- batches ---------------------------------------------------------------

Spec = collections.namedtuple("Spec", "kind id key size mode", defaults=(IPC_PRIVATE, 1, 0o600))
Spec.__doc__ = """One object for create_many: kind ("sem", "shm", "msg"), the id it must get,
its key (IPC_PRIVATE by default), size (semaphores in the set for sem, bytes for
shm, ignored for msg) and permission bits."""


def _as_spec(item, position):
    if type(item) is Spec and _plain_spec(*item):
        return item  # the common case, checked in one expression
    try:
        if isinstance(item, Spec):
            spec = item
        elif isinstance(item, dict):
            spec = Spec(**item)
        elif isinstance(item, (tuple, list)):
            spec = Spec(*item)
        else:
            raise TypeError("not a Spec, tuple or dict")
    except TypeError as err:
        raise RequestError(
            "create_many: spec %d (%r) is not a Spec: give Spec(kind, id, key=IPC_PRIVATE, "
            "size=1, mode=0o600), a tuple of those fields or a dict of them (%s)"
            % (position, item, err)
        ) from None
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


def _plain_spec(kind, id, key, size, mode):
    """Whether a Spec's fields are plain ints in range (what _as_spec checks at length)."""
    return (type(kind) is str and kind in _ARG_RANGES and type(id) is int and 0 <= id <= INT_MAX
            and type(key) is int and _KEY_RANGE[0] <= key <= _KEY_RANGE[1]
            and type(mode) is int and 0 <= mode <= 0o777
            and (kind == "msg" or (type(size) is int and 0 <= size <= _ARG_RANGES[kind][2])))


def _check_distinct(specs):
    seen = {}
    mask = (1 << ipc_shift()) - 1
    for spec in specs:
        slot = (spec.kind, spec.id & mask)
        if slot in seen:
            raise RequestError(
                "%s ids %d and %d share index %d: only one can exist"
                % (spec.kind, seen[slot], spec.id, slot[1]),
                kind=spec.kind,
            )
        seen[slot] = spec.id


def _undo_batch_made(ids):
    # The batch's ids, paired with their kinds by the call (ids of kinds differ).
    made = getattr(_last_batch, "made", None)
    if made is not None and [id for _, id in made] == ids:
        for kind, id in reversed(made):
            _remove_quietly(kind, id)
        _last_batch.made = None


_last_batch = threading.local()


@signals.door(undo=_undo_batch_made)
def create_many(specs: Iterable["Spec | tuple[Any, ...] | dict[str, Any]"]) -> list[int]:
    """Create many pinned objects under one lock acquisition, all or nothing.

    ``specs`` is an iterable of Spec (or tuples/dicts with its fields).
    Returns the ids in order. On any failure every object it created is
    removed and no knob is left armed.
    """
    try:
        items = list(specs)
    except TypeError:
        raise RequestError("create_many takes an iterable of Spec, not %r" % (specs,)) from None
    specs = [_as_spec(item, position) for position, item in enumerate(items)]
    _check_distinct(specs)
    if not specs:
        return []
    ns = ipc_lock()
    calls = [(CODE[spec.kind], spec.id, spec.key, spec.size if spec.kind != "msg" else 0,
              IPC_CREAT | IPC_EXCL | spec.mode) for spec in specs]
    # Filled by the backend before it returns: how far the batch got, even if
    # a signal handler's exception interrupts this frame right after.
    outcome = [0, _sys.BATCH_DONE, 0, 0]
    try:
        with ns.held(), ns.alloc:
            _create_all(ns, specs, calls, outcome)
            ns.note_many((spec.kind, spec.id) for spec in specs)
            for kind in {spec.kind for spec in specs}:
                restore_knob(kind, ns)  # a block of this thread may have armed it
        _last_batch.made = [(spec.kind, spec.id) for spec in specs]
        return [spec.id for spec in specs]
    except BaseException:
        _sys.finish(_undo_batch, ns, specs[:outcome[0]])
        raise


def _create_all(ns, specs, calls, outcome):
    """Every creation of a batch in as few backend calls as its outcome allows.

    One call checks every index and makes every object. A creation outside
    idpin's lock that consumed the knob stops it at that object (the wrongly
    numbered one removed already): as for a single creation, only an id still
    taken afterwards is busy, and the batch goes on from there.
    """
    knob_fds = tuple(ns.knob(KNOB[kind]) for kind in KINDS)
    mask = (1 << ipc_shift()) - 1
    check, attempts, deadline = True, 0, time.monotonic() + RETRY_SECONDS
    while True:
        _sys.ipc_create_batch(knob_fds, calls, outcome[0], check, mask, outcome)
        made, code, value, at = outcome
        if code == _sys.BATCH_DONE:
            return
        spec = specs[at]
        if code == _sys.BATCH_BUSY:
            raise _busy_error(spec.kind, spec.id, value)
        if code == _sys.BATCH_WRONG:
            attempts += 1
            if (attempts < RETRY_ATTEMPTS and time.monotonic() < deadline
                    and _free_soon(spec.kind, spec.id)):
                check = False  # checked already; a creation still verifies its id
                continue
            raise _wrong_id_error(spec.kind, spec.id, value)
        if code == _sys.BATCH_RMID:
            raise OSError(errno.EIO, "%s %d was created with a wrong id and could not be "
                          "removed" % (spec.kind, value))
        if code == _sys.BATCH_SHORT:
            raise OSError(errno.EIO, "short write of %d to %s" % (spec.id, KNOB[spec.kind]))
        if value in (errno.ENOSPC, errno.ENOMEM):
            raise _full_error(spec.kind, OSError(value, os.strerror(value)))
        raise OSError(value, os.strerror(value))


def _undo_batch(ns, made):
    """Resumable: remove what a batch made, and leave the knobs as blocks expect."""
    for spec in reversed(made):
        _remove_quietly(spec.kind, spec.id)
    with ns.held(), ns.alloc:
        for kind in KINDS:
            restore_knob(kind, ns)


def _remove_quietly(kind, id):
    try:
        _sys.ipc_remove(CODE[kind], id)
    except OSError:
        pass  # removed already (a resumed undo)


KIND_OBJECTS = {kind: Kind(kind, _validator(kind), arm, disarm) for kind in KINDS}
for _kind in KIND_OBJECTS.values():
    register_kind(_kind)


def __dir__() -> list[str]:
    # dir(idpin.ipc) lists its public names, not the modules it imports.
    return sorted(__all__)
