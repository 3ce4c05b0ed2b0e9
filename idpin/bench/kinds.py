"""The six kinds of ids as the race suite asks for, checks and undoes them.

Each kind offers two ways to get an object that should have id ``want``:

- ``steer(want)``: what ad-hoc restore scripts do. Write the kernel's knob
  (ns_last_pid, *_next_id) without any lock, or walk /dev/ptmx without any
  lock, then allocate, and take whatever came out.
- ``pin(want, mechanism)``: idpin's public API (``idpin.fork``,
  ``idpin.request`` with the routed stdlib and ``idpin.ipc`` calls).

Both return a ``Held``: the id handed to the caller and what must be undone.
``release(held, want)`` undoes it and says whether the object really had
``want``, read back independently of what was handed out: the child's own
getpid(), the thread's own gettid(), the object found at that IPC index,
TIOCGPTN on the pty master. An object handed out whose id is not ``want``
is a wrong id handed out silently.

Objects are kept until the worker has made all its attempts, as a restore
keeps what it restored: a wrong id then occupies an id another worker is
about to ask for, which is how one silent mistake spreads.
"""
import collections
import os
import threading

import idpin

from .. import _sys
from .. import ipc as idpin_ipc
from ..interpose import ORIGINALS

PTMX = "/dev/ptmx"
KINDS = ("pid", "tid", "sem", "shm", "msg", "pty")
# Exit status of a kept child that found its own pid differs from the one wanted.
CHILD_SAW_WRONG_PID = 3
# Strategy mechanism -> idpin.fork mechanism; kinds other than pid have one.
FORK_MECHANISM = {"knob": "ns_last_pid", "clone3": "clone3"}

Held = collections.namedtuple("Held", "id handle")


class _KnobFile:
    """One fd on a /proc/sys/kernel knob, written with pwrite at offset 0.

    The naive writers keep the fd open and pwrite at 0 (a second plain write
    on a sysctl fd is ignored): the fastest unlocked write there is, so the
    race window the naive strategy leaves is the smallest it can be.
    """

    def __init__(self, name):
        self.name = name
        self.fd = None

    def write(self, value):
        if self.fd is None:
            self.fd = os.open("/proc/sys/kernel/" + self.name, os.O_RDWR | os.O_CLOEXEC)
        os.pwrite(self.fd, b"%d" % value, 0)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Pids:
    name = "pid"
    # Far above the cursor, which the workers' and noise's own forks move.
    BASE = 100_000

    def __init__(self):
        self.knob = _KnobFile("ns_last_pid")

    def wanted(self, slot):
        return self.BASE + slot

    def steer(self, want):
        self.knob.write(want - 1)
        return self._keep(ORIGINALS["os.fork"](), want)

    def pin(self, want, mechanism):
        return self._keep(idpin.fork(pid=want, mechanism=FORK_MECHANISM[mechanism]), want)

    def _keep(self, child, want):
        if child == 0:
            # The child exits at once; as a zombie it keeps its pid until released.
            os._exit(0 if os.getpid() == want else CHILD_SAW_WRONG_PID)
        return Held(child, child)

    def release(self, held, want):
        _, status = os.waitpid(held.handle, 0)
        return held.id == want and os.waitstatus_to_exitcode(status) == 0

    def close(self):
        self.knob.close()


class _ParkedThread:
    """A thread that records its own tid and waits until released (a thread
    that ended would give its tid back)."""

    def __init__(self):
        self.seen = None
        self.leave = threading.Event()
        self.thread = threading.Thread(target=self._park)

    def _park(self):
        self.seen = threading.get_native_id()
        self.leave.wait()


class Tids:
    name = "tid"
    BASE = 200_000

    def __init__(self):
        self.knob = _KnobFile("ns_last_pid")

    def wanted(self, slot):
        return self.BASE + slot

    def steer(self, want):
        parked = _ParkedThread()
        self.knob.write(want - 1)
        ORIGINALS["threading.Thread.start"](parked.thread)
        return Held(parked.thread.native_id, parked)

    def pin(self, want, mechanism):
        parked = _ParkedThread()
        with idpin.request(tid=want):
            parked.thread.start()
        return Held(parked.thread.native_id, parked)

    def release(self, held, want):
        parked = held.handle
        parked.leave.set()
        parked.thread.join()
        return held.id == want and parked.seen == want

    def close(self):
        self.knob.close()


class SysV:
    """sem, shm or msg: the full id is index | seq << shift."""

    BASE_INDEX = 1000  # above the lowest free indices, where unpinned creations land
    SEQ = 5
    SIZE = {"sem": 1, "shm": 4096, "msg": 0}
    CREATE = {
        "sem": lambda size: idpin_ipc.semget(idpin_ipc.IPC_PRIVATE, size, 0o600),
        "shm": lambda size: idpin_ipc.shmget(idpin_ipc.IPC_PRIVATE, size, 0o600),
        "msg": lambda size: idpin_ipc.msgget(idpin_ipc.IPC_PRIVATE, 0o600),
    }

    def __init__(self, name):
        self.name = name
        self.code = _sys.IPC_KIND_CODES[name]
        self.size = self.SIZE[name]
        self.knob = _KnobFile(name + "_next_id")

    def wanted(self, slot):
        return (self.SEQ << idpin_ipc.ipc_shift()) | (self.BASE_INDEX + slot)

    def steer(self, want):
        self.knob.write(want)
        flags = _sys.IPC_CREAT | 0o600
        return Held(_sys.ipc_get(self.code, _sys.IPC_PRIVATE, self.size, flags), None)

    def pin(self, want, mechanism):
        with idpin.request(**{self.name: want}):
            return Held(self.CREATE[self.name](self.size), None)

    def release(self, held, want):
        found = _sys.ipc_stat_index(self.code, idpin_ipc.index_of(held.id))
        _sys.ipc_remove(self.code, held.id)
        return held.id == want and found == want

    def close(self):
        self.knob.close()


class Ptys:
    name = "pty"
    # Indices below BASE are left to noise and to other programs' ptys.
    BASE = 8

    def wanted(self, slot):
        return self.BASE + slot

    def steer(self, want):
        """Open ptmx until an index >= want comes out; keep that one."""
        fillers = []
        try:
            while True:
                fd = os.open(PTMX, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
                index = _sys.pty_index(fd)
                if index >= want:
                    return Held(index, fd)
                fillers.append(fd)
        finally:
            for fd in fillers:
                os.close(fd)

    def pin(self, want, mechanism):
        with idpin.request(pty=want):
            master, slave = os.openpty()
        try:
            name = os.ttyname(slave)
        finally:
            os.close(slave)
        return Held(int(name.rsplit("/", 1)[1]), master)

    def release(self, held, want):
        found = _sys.pty_index(held.handle)
        os.close(held.handle)
        return held.id == want and found == want

    def close(self):
        pass


def make(name):
    if name == "pid":
        return Pids()
    if name == "tid":
        return Tids()
    if name == "pty":
        return Ptys()
    return SysV(name)
