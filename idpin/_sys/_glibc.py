"""Where glibc caches a thread's tid, found at run time.

A raw clone3 child inherits the parent's ``struct pthread`` with the parent's
tid in it; glibc reads that cache for pthread_self()-based calls, so those
would silently target the parent (KERNEL.md). Passing CLONE_CHILD_SETTID with
child_tid pointing at the cache makes the kernel refresh it in the child.
glibc does not export the offset, so it is found by looking for gettid()
inside pthread_self()'s struct. It is found once, when idpin._sys is
imported (before any request exists, so nothing can consume a pending tid).
If this thread's struct holds its tid at more than one offset, a probe
thread started with the raw _thread module (never routed through idpin)
settles it: the one offset that holds each thread's own tid in both.
"""
import _thread
import ctypes
import os
import threading
import time

# struct pthread's tid is within its first few hundred bytes on every glibc
# since 2.3; the struct itself is over 2 KiB, so this window stays inside it.
_SCAN_BYTES = 1024
_offset = None
_lock = threading.Lock()

_libc = ctypes.CDLL(None, use_errno=True)
_libc.pthread_self.restype = ctypes.c_void_p
_libc.pthread_self.argtypes = []


def _candidates():
    base = _libc.pthread_self()
    tid = threading.get_native_id()
    raw = ctypes.string_at(base, _SCAN_BYTES)
    return {
        off
        for off in range(0, _SCAN_BYTES - 3, 4)
        if int.from_bytes(raw[off : off + 4], "little", signed=True) == tid
    }


def _wait_until_single_threaded(deadline_s=2.0):
    # Thread.join returns before the kernel task is gone; the clone3 path
    # counts /proc/self/task, so wait for the probe thread to leave it.
    end = time.monotonic() + deadline_s
    while len(os.listdir("/proc/self/task")) > 1 and time.monotonic() < end:
        time.sleep(0.001)


def pthread_self():
    return _libc.pthread_self()


def tid_cache_offset():
    """Offset of the tid field in glibc's struct pthread (cached per process)."""
    global _offset
    with _lock:
        if _offset is None:
            _offset = _find_offset()
        return _offset


def _find_offset():
    here = _candidates()
    if len(here) == 1:
        return next(iter(here))
    there = _candidates_in_probe_thread()
    common = here & there
    if len(common) != 1:
        raise RuntimeError(
            "idpin: cannot locate glibc's cached tid in struct pthread "
            "(candidates %s / %s); the clone3 fork path is unavailable" % (sorted(here), sorted(there))
        )
    return common.pop()


def _candidates_in_probe_thread():
    single = len(os.listdir("/proc/self/task")) == 1
    found = []
    done = _thread.allocate_lock()
    done.acquire()

    def probe():
        try:
            found.append(_candidates())
        finally:
            done.release()

    _thread.start_new_thread(probe, ())
    done.acquire()
    if single:
        _wait_until_single_threaded()
    return found[0] if found else set()
