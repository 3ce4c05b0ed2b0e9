"""Chosen tids for threads: ns_last_pid under the pid namespace lock.

clone3 set_tid could pick a tid only for raw threads; threading.Thread and
pthread_create go through glibc, which takes the next pid from the
namespace's cursor. So a tid block holds the pid namespace lock from entry to
exit with ns_last_pid = tid - 1, and this thread's next thread gets the tid:

- threading.Thread.start (routed) starts a carrier OS thread with the knob
  armed just before it. A carrier that got the tid runs the Thread's own
  bootstrap; one that got another tid (a process forking outside idpin's
  lock moved the cursor) ends without running anything, and the start is
  tried again while the tid is still free, a bounded number of times. So the
  Thread object only ever runs on the right tid.
- a pthread_create idpin does not see (C code) consumes the armed knob; at
  block exit idpin compares this process's threads before and after and
  raises IdBusyError if a new thread appeared without the tid. A thread that
  was created and ended within the block cannot be checked.
"""
import _thread
import os
import threading
import time

from . import _sys, knobs, pids, signals
from .errors import IdBusyError
from .interpose import ORIGINALS
from .request import Kind, consume, enclosing_pending_request, pending, register_kind

# Starts retried when a fork outside the lock moved the cursor without
# taking the tid: at most this many attempts, within this many seconds.
START_ATTEMPTS = 64
START_RETRY_SECONDS = 0.5
# How long a carrier thread may take to report its tid.
CARRIER_TIMEOUT = 10.0

_pinned = threading.local()
# OS threads threading has started in this process (a block checking an
# unrouted creation asks whether another thread could have made it).
_starts = 0


def thread_starts():
    return _starts


def validate_tid(value):
    return pids.validate_in_pid_range("tid", value)


def _tasks():
    return set(int(name) for name in os.listdir("/proc/self/task"))


def _arm_knob(ns, tid):
    with ns.alloc:
        _write_tid_knob(ns, tid)
        ns.armed["ns_last_pid"] = tid - 1


def _write_tid_knob(ns, tid):
    try:
        knobs.write_knob(ns.knob("ns_last_pid"), "ns_last_pid", tid - 1)
    except OSError as err:
        if err.errno == pids.errno.EINVAL:
            raise pids.out_of_range_error("tid", tid) from None
        raise


def arm(req, kind):
    ns = knobs.namespace_lock("pid")
    # Recorded before anything is taken, so that an exception at any point
    # (a signal handler's included) leaves disarm something exact to undo.
    req.armed["tid"] = block = knobs.BlockHold(ns)
    ns.acquire()
    block.held = True
    with ns.alloc:  # no thread start between the census and the arming
        block.before = _tasks()
        block.routed = ns.watch("tid")
        # The cursor as the namespace had it: put back if the block ends
        # with the tid unused, so no later allocation takes it unasked.
        block.cursor = _sys.knob_read(ns.knob("ns_last_pid"))
        pids.record_cursor(ns, req.ids["tid"] - 1, block.cursor)
        _arm_knob(ns, req.ids["tid"])


def disarm(req, kind):
    """Leave a tid block: check, disarm, unlock. Resumable after an interruption."""
    block = req.armed["tid"]
    try:
        if block.held:
            _settle_and_clean(req, block)
            block.ns.release()
            block.held = False
    finally:
        if not block.held:
            del req.armed["tid"]


def _settle_and_clean(req, block):
    ns = block.ns
    try:
        if not block.settled:
            block.settled = True
            if "tid" not in req.consumed and block.routed is not None:
                with ns.alloc:  # the census must match the routed starts noted
                    _settle_unrouted(req, block.before, block.routed)
    finally:
        if not block.cleaned:
            with ns.alloc:
                ns.armed.pop("ns_last_pid", None)
                if block.routed is not None:
                    ns.unwatch("tid", block.routed)
                outer = enclosing_pending_request(req, "tid")
                if outer is not None:
                    # What the inner block made is not the outer block's to judge.
                    outer.armed["tid"].before = _tasks()
                    pids.record_cursor(ns, outer.ids["tid"] - 1)
                    _arm_knob(ns, outer.ids["tid"])
                elif block.cursor is not None:
                    _put_back_cursor(ns, req.ids["tid"] - 1, block.cursor)
                pids.forget_cursor(ns)
            block.cleaned = True


def _put_back_cursor(ns, armed, cursor):
    """An unused tid stays armed in the shared cursor: give the namespace its cursor back."""
    fd = ns.knob("ns_last_pid")
    if _sys.knob_read(fd) == armed:
        knobs.write_knob(fd, "ns_last_pid", cursor)


def _settle_unrouted(req, before, routed):
    tid = req.ids["tid"]
    # Threads started through threading (steered or pinned) are accounted for.
    created = _tasks() - before - routed.made
    if tid in created:
        consume(req, "tid", tid)
    elif created:
        raise IdBusyError(
            "tid", tid,
            "thread(s) %s were created in this block outside threading.Thread without "
            "getting it (a process outside idpin's lock took the knob, or another thread "
            "created them)" % sorted(created),
        )


@signals.door()  # a started thread cannot be taken back: handlers run after
def start_thread(thread: threading.Thread) -> None:
    """threading.Thread.start, honouring this thread's pending tid request."""
    found = pending("tid")
    if found is None:
        return plain_start(thread)
    req, tid = found
    if not pids.free_soon(tid):
        raise IdBusyError("tid", tid, "in use (found before starting the thread)")
    ns = knobs.namespace_lock("pid")
    with ns.held(), ns.alloc:
        _pinned.start = (ns, tid)
        try:
            pids.record_cursor(ns, tid - 1)
            ORIGINALS["threading.Thread.start"](thread)
        finally:
            _pinned.start = None
            # Consumed (or lost): nothing of this block stays armed.
            ns.armed.pop("ns_last_pid", None)
            pids.forget_cursor(ns)
    req.consumed["tid"] = tid


@signals.door()
def start_new_thread(function, args, kwargs=None):
    """threading's _start_new_thread: a pinned start goes through a carrier."""
    global _starts
    _starts += 1
    pinned = getattr(_pinned, "start", None)
    if pinned is None:
        if kwargs is None:
            return ORIGINALS["threading._start_new_thread"](function, args)
        return ORIGINALS["threading._start_new_thread"](function, args, kwargs)
    _pinned.start = None  # one OS thread per request
    ns, tid = pinned
    return _start_with_tid(ns, tid, function, args, kwargs or {})


def _start_with_tid(ns, tid, function, args, kwargs):
    deadline = time.monotonic() + START_RETRY_SECONDS
    for attempt in range(1, START_ATTEMPTS + 1):
        carrier = _Carrier(tid, function, args, kwargs)
        _write_tid_knob(ns, tid)
        ident = ORIGINALS["threading._start_new_thread"](carrier.run, ())
        got = carrier.wait()
        ns.note("tid", got)
        if got == tid:
            return ident
        if not pids.free_soon(tid):
            raise IdBusyError(
                "tid", tid,
                "a process outside idpin's lock took it between the knob write and the "
                "thread start (the thread got tid %d and ended without running)" % got,
            )
        if got < tid and tid >= pids.namespace_pid_max(refresh=True):
            raise pids.out_of_range_error("tid", tid)
        if time.monotonic() >= deadline:
            break
    raise IdBusyError(
        "tid", tid,
        "lost the race with processes forking outside idpin's lock %d times in a row (each "
        "time the thread got another tid and ended without running); the tid is free" % attempt,
    )


class _Carrier:
    """An OS thread that runs ``function`` only if it got ``tid``."""

    __slots__ = ("tid", "function", "args", "kwargs", "got", "_reported")

    def __init__(self, tid, function, args, kwargs):
        self.tid = tid
        self.function = function
        self.args = args
        self.kwargs = kwargs
        self.got = None
        self._reported = _thread.allocate_lock()
        self._reported.acquire()

    def run(self):
        self.got = threading.get_native_id()
        self._reported.release()
        if self.got == self.tid:
            self.function(*self.args, **self.kwargs)

    def wait(self):
        if not self._reported.acquire(timeout=CARRIER_TIMEOUT):
            raise RuntimeError("a new thread did not report its tid within %g s" % CARRIER_TIMEOUT)
        return self.got


def plain_start(thread):
    """An unpinned thread start that cannot consume a tid a block of this process armed."""
    pids.without_armed_tid(
        lambda: ORIGINALS["threading.Thread.start"](thread),
        on_steered=lambda ns: ns.note("tid", thread.native_id),
    )


register_kind(Kind("tid", validate_tid, arm, disarm))
