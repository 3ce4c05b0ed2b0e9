"""Chosen tids for threads: ns_last_pid under the pid namespace lock.

clone3 set_tid could pick a tid only for raw threads; threading.Thread and
pthread_create go through glibc, which takes the next pid from the
namespace's cursor. So a tid block holds the pid namespace lock from entry to
exit with ns_last_pid = tid - 1, and this thread's next thread gets the tid:

- threading.Thread.start (routed) re-arms the knob, starts the thread and
  checks its native_id. The new thread checks its own tid before running its
  target, so a wrongly numbered thread runs nothing and is joined before
  IdBusyError is raised.
- a pthread_create idpin does not see (C code) consumes the armed knob; at
  block exit idpin compares this process's threads before and after and
  raises IdBusyError if a new thread appeared without the tid. A thread that
  was created and ended within the block cannot be checked.
"""
import os
import threading

from . import knobs, pids
from .errors import IdBusyError
from .interpose import ORIGINALS
from .request import Kind, consume, enclosing_pending_request, pending, register_kind, validate_int


def validate_tid(value):
    return validate_int(
        "tid", value, 1, pids.namespace_pid_max() - 1, "this namespace's pid_max - 1"
    )


def _tasks():
    return set(int(name) for name in os.listdir("/proc/self/task"))


def _arm_knob(lock, tid):
    with lock.alloc:
        knobs.write_knob(lock.knob("ns_last_pid"), "ns_last_pid", tid - 1)
        lock.armed["ns_last_pid"] = tid - 1


def arm(req, kind):
    lock = knobs.namespace_lock("pid")
    lock.acquire()
    try:
        with lock.alloc:  # no thread start between the census and the arming
            req.armed["tid"] = (lock, _tasks(), lock.watch("tid"))
            _arm_knob(lock, req.ids["tid"])
    except BaseException:
        entry = req.armed.pop("tid", None)
        if entry is not None:
            lock.unwatch("tid", entry[2])
        lock.release()
        raise


def disarm(req, kind):
    lock, before, routed = req.armed.pop("tid")
    try:
        if "tid" not in req.consumed:
            with lock.alloc:  # the census must match the routed starts noted
                _settle_unrouted(req, before, routed)
    finally:
        try:
            with lock.alloc:
                lock.armed.pop("ns_last_pid", None)
            lock.unwatch("tid", routed)
            outer = enclosing_pending_request(req, "tid")
            if outer is not None:
                with lock.alloc:
                    # What the inner block made is not the outer block's to judge.
                    _, _, outer_routed = outer.armed["tid"]
                    outer.armed["tid"] = (lock, _tasks(), outer_routed)
                    _arm_knob(lock, outer.ids["tid"])
        finally:
            lock.release()


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


def start_thread(thread):
    """threading.Thread.start, honouring this thread's pending tid request."""
    found = pending("tid")
    if found is None:
        return plain_start(thread)
    req, tid = found
    if pids.pid_in_use(tid):
        raise IdBusyError("tid", tid, "in use (found before starting the thread)")
    lock = knobs.namespace_lock("pid")
    with lock.held(), lock.alloc:
        knobs.write_knob(lock.knob("ns_last_pid"), "ns_last_pid", tid - 1)
        _run_only_with_tid(thread, tid)
        ORIGINALS["threading.Thread.start"](thread)
        # Consumed (or lost): nothing of this block stays armed.
        lock.armed.pop("ns_last_pid", None)
        lock.note("tid", thread.native_id)
    if thread.native_id != tid:
        thread.join()
        raise IdBusyError(
            "tid", tid,
            "the thread got tid %d (a process outside idpin's lock took the knob); "
            "it ended without running its target" % thread.native_id,
        )
    consume(req, "tid", tid)


def plain_start(thread):
    """An unpinned thread start that cannot consume a tid a block of this process armed."""
    pids.without_armed_tid(
        lambda: ORIGINALS["threading.Thread.start"](thread),
        on_steered=lambda lock: lock.note("tid", thread.native_id),
    )


def _run_only_with_tid(thread, tid):
    run = thread.run

    def run_if_pinned():
        if threading.get_native_id() == tid:
            run()

    thread.run = run_if_pinned


register_kind(Kind("tid", validate_tid, arm, disarm))
