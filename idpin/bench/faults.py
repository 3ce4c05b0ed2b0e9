"""``idpin bench faults``: faults at random points of idpin calls, per kind.

Four faults; the first three for every kind of request (``KINDS``):

- kill: a worker process runs one kind's requests in a loop and is
  SIGKILLed after a random delay. Then this process, the next idpin user of
  the namespace, must find it clean once it has taken idpin's locks: no
  object idpin made left, knobs idle (a plain fork gets none of the pids or
  tids the worker asked for), IPC limits as they were, no lock held, and the
  very ids the worker asked for requestable again.
- interrupt: a timer whose handler raises KeyboardInterrupt fires after a
  random delay while this process runs the kind's requests (the handler
  raises only when it lands inside idpin's code, not in the caller's own
  lines between idpin's calls). Afterwards nothing may be left: no flock, no
  in-process mutex owned (another thread can make a request), no knob armed,
  no object, child, pty or fd idpin made, no request left on the thread's
  stack (a plain fork outside any block gets an ordinary pid).
- storm: the same, the handler raising up to three times 20-200 us apart
  (Ctrl-C pressed again while idpin cleans up after the first).
- foreign (sem, shm, msg): blocks whose own creation idpin does not see
  (sysv_ipc), beside a process and a thread that create objects without
  idpin and remove older ones (the object count stays put). A block that
  ends without an error must have given its object the id.

Each trial reports the problems it found as readable lines, and the ids
handed out silently wrong. Every trial series runs in a forked runner with
a deadline, as a child subreaper (a killed worker's children come back to
it). The CI runs a few trials per kind (tests/test_faults.py); ``idpin
bench faults`` runs hundreds, each kind in fresh namespaces.

What the caller legitimately holds (objects it created, its children, its
fds) is recognisable: its IPC objects have mode ``CALLER_MODE``, and the
ops record whatever idpin handed them. Anything else left is idpin's.
"""
import collections
import fcntl
import faulthandler
import os
import pickle
import random
import select
import signal
import sys
import threading
import time

import idpin

from .. import _sys, knobs, signals, testing
from .. import ipc
from ..interpose import ORIGINALS
from ..request import ORDER, pending

# Mode bits of the IPC objects the caller creates (idpin's own never have them).
CALLER_MODE = 0o641
# Exit status of a child that found its own pid is not the one asked for.
WRONG_CHILD = 3
# Ids the trials ask for: far from the cursor and from each other.
PID, PID2 = 30001, 30003
TID = 40001
SEM = (5 << 15) | 700
SHM = (6 << 15) | 701
MSG = (7 << 15) | 702
SEM2, SHM2, MSG2 = SEM + 1, SHM + 1, MSG + 1
PTY, PTY2 = 3, 5
# Ids the mutex check asks for from another thread.
CHECK_TID, CHECK_SEM, CHECK_PTY = 45001, (9 << 15) | 900, 7
# How long another thread may need for a request before we call it stuck.
OTHER_THREAD_SECONDS = 3.0
LIMITS = ("msgmni", "shmmni", "shmall", "sem")

_HERE = os.path.abspath(__file__)
if _HERE.endswith((".pyc", ".pyo")):
    _HERE = _HERE[:-1]


# -- what a caller holds ---------------------------------------------------------


class Got:
    """What idpin handed the caller during one op, to check and undo."""

    def __init__(self):
        self.children = []  # (pid, wanted pid)
        self.threads = []  # (thread, wanted tid, [tid it saw])
        self.fds = []
        self.ptys = []  # (slave fd, wanted index)
        self.objects = []  # (kind, id, wanted id)
        self.completed = False  # the op returned normally: what it got was handed out

    def undo(self):
        """Undo everything; the silent wrong ids among what was handed out.

        Only an op that returned normally handed anything out: after a fault
        its ids were never the caller's answer.
        """
        wrong = []
        for child, want in self.children:
            _, status = os.waitpid(child, 0)
            code = os.waitstatus_to_exitcode(status)
            if child != want or code == WRONG_CHILD:
                wrong.append("pid %d handed out as %d (child exit %d)" % (want, child, code))
        for thread, want, seen in self.threads:
            if not _started_soon(thread):
                continue  # never started
            thread.join(OTHER_THREAD_SECONDS)
            _wait_for_task_gone(thread.native_id)
            if thread.native_id != want or seen[:1] != [want]:
                wrong.append("tid %d: thread got %s, saw %s" % (want, thread.native_id, seen))
        for slave, want in self.ptys:
            name = os.ttyname(slave)
            if name != "/dev/pts/%d" % want:
                wrong.append("pty %d handed out as %s" % (want, name))
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        for kind, id, want in self.objects:
            if id != want:
                wrong.append("%s %d handed out as %d" % (kind, want, id))
            try:
                _sys.ipc_remove(ipc.CODE[kind], id)
            except OSError:
                pass
        return wrong if self.completed else []


def _started_soon(thread):
    # A start interrupted after the OS thread began (as with plain
    # threading) still runs the thread: it sets its ident a moment later.
    deadline = time.monotonic() + 0.5
    while thread.ident is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


def _wait_for_task_gone(tid):
    # A joined thread's task lingers a moment, its tid still in use.
    deadline = time.monotonic() + 1.0
    while tid is not None and os.path.exists("/proc/self/task/%d" % tid):
        if time.monotonic() > deadline:
            return
        time.sleep(0.0002)


def _fork_child(got, want):
    child = os.fork()
    if child == 0:
        os._exit(0 if os.getpid() == want else WRONG_CHILD)
    got.children.append((child, want))


def _noop():
    pass


def _new_thread(got, want):
    seen = []
    thread = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
    got.threads.append((thread, want, seen))
    return thread


def _keep_pair(got, pair, want):
    master, slave = pair
    got.fds += [master, slave]
    got.ptys.append((slave, want))


# -- the ops: one kind's requests, as a caller writes them --------------------------


def op_pid_clone3(got, rng):
    if rng.random() < 0.5:
        with idpin.request(pid=PID):
            _fork_child(got, PID)
    else:
        child = idpin.fork(pid=PID)
        if child == 0:
            os._exit(0 if os.getpid() == PID else WRONG_CHILD)
        got.children.append((child, PID))


def op_pid_knob(got, rng):
    # The process has a parked thread (setup_threaded): the knob path.
    with idpin.request(pid=PID):
        _fork_child(got, PID)


def op_tid(got, rng):
    thread = _new_thread(got, TID)
    with idpin.request(tid=TID):
        thread.start()


def _sysv_lib_create(kind, mode=CALLER_MODE):
    import sysv_ipc

    if kind == "sem":
        return sysv_ipc.Semaphore(None, sysv_ipc.IPC_CREX, mode=mode).id
    if kind == "shm":
        memory = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=mode, size=4096)
        memory.detach()  # attached, a removed segment would linger until exit
        return memory.id
    return sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=mode).id


def _routed_create(kind):
    if kind == "sem":
        return ipc.semget(ipc.IPC_PRIVATE, 1, CALLER_MODE)
    if kind == "shm":
        return ipc.shmget(ipc.IPC_PRIVATE, 4096, CALLER_MODE)
    return ipc.msgget(ipc.IPC_PRIVATE, CALLER_MODE)


IPC_IDS = {"sem": SEM, "shm": SHM, "msg": MSG}


def _op_ipc(kind):
    def op(got, rng):
        want = IPC_IDS[kind]
        variant = rng.randrange(3)
        with idpin.request(**{kind: want}):
            if variant == 0:
                got.objects.append((kind, _routed_create(kind), want))
            elif variant == 1:
                got.objects.append((kind, _sysv_lib_create(kind), want))
            # variant 2: nothing created; leaving the block consumes the knob

    op.__name__ = "op_" + kind
    return op


def _op_ipc_full(kind):
    # In a namespace at its limit: leaving the block needs the limit raised.
    def op(got, rng):
        with idpin.request(**{kind: IPC_IDS[kind]}):
            pass

    op.__name__ = "op_%s_full" % kind
    return op


def op_pty(got, rng):
    variant = rng.randrange(3)
    if variant == 0:
        with idpin.request(pty=PTY):
            _keep_pair(got, os.openpty(), PTY)
    elif variant == 1:
        import pty as stdlib_pty

        with idpin.request(pty=PTY):
            _keep_pair(got, stdlib_pty.openpty(), PTY)
    else:
        with idpin.request(pty=PTY, pid=PID):
            child, master = os.forkpty()
            if child == 0:
                os._exit(0 if os.getpid() == PID and os.ttyname(0) == "/dev/pts/%d" % PTY
                         else WRONG_CHILD)
            got.children.append((child, PID))
            got.fds.append(master)


def op_create_many(got, rng):
    specs = [ipc.Spec("sem", SEM, size=2, mode=CALLER_MODE),
             ipc.Spec("shm", SHM, size=4096, mode=CALLER_MODE),
             ipc.Spec("msg", MSG, mode=CALLER_MODE)]
    ids = ipc.create_many(specs)
    got.objects += [(spec.kind, id, spec.id) for spec, id in zip(specs, ids)]


def op_open_many(got, rng):
    pairs = idpin.pty.open_many([PTY, PTY2])
    for index, pair in pairs.items():
        _keep_pair(got, pair, index)


def op_nested(got, rng):
    thread = _new_thread(got, TID)
    with idpin.request(sem=SEM, msg=MSG):
        with idpin.request(sem=SEM2, tid=TID):
            thread.start()
            got.objects.append(("sem", _routed_create("sem"), SEM2))
        got.objects.append(("sem", _routed_create("sem"), SEM))
        with idpin.request(msg=MSG2, pty=PTY):
            _keep_pair(got, os.openpty(), PTY)
        # msg: MSG2's block ended unused; MSG stays pending and is consumed at exit


OPS = collections.OrderedDict([
    ("pid-clone3", op_pid_clone3),
    ("pid-knob", op_pid_knob),
    ("tid", op_tid),
    ("sem", _op_ipc("sem")),
    ("shm", _op_ipc("shm")),
    ("msg", _op_ipc("msg")),
    ("sem-full", _op_ipc_full("sem")),
    ("shm-full", _op_ipc_full("shm")),
    ("msg-full", _op_ipc_full("msg")),
    ("pty", op_pty),
    ("create_many", op_create_many),
    ("open_many", op_open_many),
    ("nested", op_nested),
])
KINDS = tuple(OPS)
# The ids each kind asks for, as (kind, id) pairs: the next user asks for them again.
WANTED = {
    "pid-clone3": [("pid", PID)], "pid-knob": [("pid", PID)], "tid": [("tid", TID)],
    "sem": [("sem", SEM)], "shm": [("shm", SHM)], "msg": [("msg", MSG)],
    "sem-full": [("sem", SEM)], "shm-full": [("shm", SHM)], "msg-full": [("msg", MSG)],
    "pty": [("pty", PTY), ("pid", PID)], "create_many": [("sem", SEM), ("shm", SHM), ("msg", MSG)],
    "open_many": [("pty", PTY), ("pty", PTY2)],
    "nested": [("sem", SEM), ("sem", SEM2), ("msg", MSG), ("tid", TID), ("pty", PTY)],
}


def needs_threads(kind):
    return kind in ("pid-knob", "nested")


def single_threaded(kind):
    """Kinds whose op needs a single-threaded process.

    The clone3 fork path is used only then, and an unrouted IPC creation
    (sysv_ipc) is credited only when the block's thread was the only one.
    """
    return kind in ("pid-clone3", "pty", "sem", "shm", "msg")


# -- namespace state ----------------------------------------------------------------


def read_limits():
    values = {}
    for name in LIMITS:
        with open("/proc/sys/kernel/" + name) as f:
            values[name] = f.read().split()
    return values


def write_limits(values):
    for name, fields in values.items():
        with open("/proc/sys/kernel/" + name, "w") as f:
            f.write(" ".join(fields))


def fill_namespace(kind):
    """Make the namespace full for ``kind`` (its object-count limit at 0)."""
    limits = read_limits()
    if kind == "msg":
        limits["msgmni"] = ["0"]
    elif kind == "shm":
        limits["shmmni"] = ["0"]
    else:
        limits["sem"][3] = "0"
    write_limits(limits)


def ipc_objects():
    """[(kind, id, mode)] of every IPC object in the namespace."""
    found = []
    for kind in ipc.KINDS:
        with open("/proc/sysvipc/" + kind) as f:
            for line in f.readlines()[1:]:
                row = line.split()
                found.append((kind, int(row[1]), int(row[2], 8) & 0o777))
    return found


def armed_knobs():
    armed = {}
    for kind in ipc.KINDS:
        with open("/proc/sys/kernel/%s_next_id" % kind) as f:
            value = int(f.read())
        if value != -1:
            armed[kind] = value
    return armed


def flocks():
    """[(pid, device:inode)] of every lock (and waiter) in /proc/locks."""
    found = []
    with open("/proc/locks") as f:
        for line in f:
            fields = [field for field in line.split() if field != "->"]
            if len(fields) > 5:
                found.append((int(fields[4]), fields[5]))
    return found


def other_processes():
    me = os.getpid()
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, me))


def open_ptys():
    return sorted(int(n) for n in os.listdir("/dev/pts") if n.isdigit())


def reap_all(deadline_seconds=5.0):
    """Reap every child (a killed worker's orphans come here); kill laggards."""
    deadline = time.monotonic() + deadline_seconds
    killed = []
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return killed
        if pid:
            continue
        if time.monotonic() > deadline:
            for pid in other_processes():
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + deadline_seconds
        time.sleep(0.0005)


def force_clean(limits):
    """Put the namespace back by hand after a trial that left something."""
    for kind, id, _ in ipc_objects():
        try:
            _sys.ipc_remove(ipc.CODE[kind], id)
        except OSError:
            pass
    roomy = read_limits()
    roomy["msgmni"], roomy["shmmni"] = ["32000"], ["4096"]
    roomy["sem"][3] = "32000"
    write_limits(roomy)
    for kind in armed_knobs():
        code = ipc.CODE[kind]
        _sys.ipc_remove(code, _sys.ipc_get(code, ipc.IPC_PRIVATE, 1, ipc.IPC_CREAT | 0o600))
    write_limits(limits)


# -- checks after a trial -----------------------------------------------------------


def plain_fork_is_ordinary(wanted_pids):
    """A plain os.fork() outside any block works and gets none of the wanted pids."""
    try:
        child = os.fork()
    except Exception as err:
        return "a plain os.fork() outside any block raised %r" % err
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    if child in wanted_pids:
        return "a plain os.fork() outside any block got pid %d, a pid asked for earlier" % child
    return None


def _request_everything():
    """One request of each idpin lock (pid, ipc, pts); None, or what it raised."""
    try:
        with idpin.request(sem=CHECK_SEM):  # the IPC lock, after the pid lock
            pass
        with idpin.request(tid=CHECK_TID):
            pass
        for master, slave in idpin.pty.open_many([CHECK_PTY]).values():
            os.close(master)
            os.close(slave)
    except BaseException as err:  # reported, not raised: the check's answer
        return err
    return None


class OtherThread:
    """A thread of this process that makes a request of each lock when asked.

    One thread for a whole series (starting a thread per trial costs more
    than the trial); kinds whose op needs a single-threaded process (the
    clone3 fork path) start one per check instead (``persistent=False``).
    """

    def __init__(self, persistent):
        self.persistent = persistent
        self.thread = None
        if persistent:
            self._ask = threading.Event()
            self._done = threading.Event()
            self._stop = False
            self.thread = threading.Thread(target=self._serve, daemon=True)
            self.thread.start()

    def _serve(self):
        while True:
            self._ask.wait()
            self._ask.clear()
            if self._stop:
                return
            self.outcome = _request_everything()
            self._done.set()

    def check(self):
        """None, or why another thread could not make a request."""
        if self.persistent:
            self._done.clear()
            self._ask.set()
            finished = self._done.wait(OTHER_THREAD_SECONDS)
            thread = self.thread
        else:
            outcome = []
            thread = threading.Thread(target=lambda: outcome.append(_request_everything()))
            thread.start()
            thread.join(OTHER_THREAD_SECONDS)
            finished = not thread.is_alive()
            if finished:
                _wait_for_threads_gone()
                self.outcome = outcome[0]
        if not finished:
            return ("another thread's request did not finish within %.0f s (an idpin lock or "
                    "mutex left owned); it waits in %s" % (OTHER_THREAD_SECONDS, where_stuck(thread)))
        if self.outcome is not None:
            return "another thread's request raised %r" % self.outcome
        return None

    def stop(self):
        if self.persistent and self.thread.is_alive():
            self._stop = True
            self._ask.set()
            self.thread.join(OTHER_THREAD_SECONDS)


def where_stuck(thread):
    """The innermost frames of a stuck thread, as file:line function."""
    frame = sys._current_frames().get(thread.ident)
    where = []
    while frame is not None and len(where) < 4:
        where.append("%s:%d %s" % (os.path.basename(frame.f_code.co_filename), frame.f_lineno,
                                   frame.f_code.co_name))
        frame = frame.f_back
    return " < ".join(where) or "?"


def describe_process(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "gone"
    fields = stat[stat.rindex(")") + 2:].split()
    return "state %s, ppid %s, %s" % (fields[0], fields[1], cmdline[:60] or stat[:stat.index(")") + 1])


def _wait_for_threads_gone():
    # A joined thread's task lingers a moment; the clone3 path needs it gone.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if os.stat("/proc/self/task").st_nlink - 2 <= threading.active_count():
            return
        time.sleep(0.0002)


LOCK_FILES = ("/proc/self/ns/pid", "/proc/self/ns/ipc", "/dev/pts")


def held_lock_files():
    """The lock files of idpin's locks someone holds a flock on (any process, this one too).

    A probe through a description of its own conflicts with every other
    description's flock, this process's included; cheaper than /proc/locks,
    which lists the whole machine's locks.
    """
    held = []
    for path in LOCK_FILES:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(path)
        finally:
            os.close(fd)  # drops the probe's own lock with it
    return held


def leftovers(limits, fds_before, wanted_pids, other_thread=None):
    """What the trial left, as lines; cleans it by hand so the next trial starts clean.

    ``other_thread``: the trial's faults hit this process (not a killed
    worker), so another of its threads must still be able to make requests.
    """
    problems = []
    for kind, id, mode in ipc_objects():
        problems.append("%s object %d (mode %o) left" % (kind, id, mode))
    for kind, value in armed_knobs().items():
        problems.append("%s_next_id left armed at %d" % (kind, value))
    now = read_limits()
    for name in LIMITS:
        if now[name] != limits[name]:
            problems.append("kernel.%s left at %s (was %s)" % (
                name, " ".join(now[name]), " ".join(limits[name])))
    new_fds = sorted(testing.open_fds() - fds_before)
    for fd in new_fds:
        problems.append("fd %d left open (%s)" % (fd, _fd_target(fd)))
        os.close(fd)
    for pid in other_processes():
        problems.append("process %d left (%s)" % (pid, describe_process(pid)))
    killed = reap_all(0.2)
    if killed:
        problems.append("processes %s had to be killed" % killed)
    ptys = open_ptys()
    if ptys:
        problems.append("pty indices %s left open" % ptys)
    if knobs.any_held():
        problems.append("idpin.knobs.any_held() is true with no block active")
    for name in testing.records_left():
        problems.append("idpin's record %s (a POSIX message queue) left" % name)
    for path in held_lock_files():
        holders = ["pid %d" % pid for pid, inode in flocks()
                   if inode.endswith(":%d" % os.stat(path).st_ino)]
        problems.append("idpin's lock on %s left held (by %s)" % (
            path, ", ".join(holders) or "a holder /proc/locks does not name"))
    for kind in ORDER:
        if pending(kind) is not None:
            problems.append("a %s request left on this thread's stack" % kind)
    if problems:
        force_clean(limits)
    checks = [lambda: plain_fork_is_ordinary(wanted_pids)]
    if other_thread is not None:
        checks.append(other_thread.check)
    for check in checks:
        problem = check()
        if problem:
            problems.append(problem)
    return problems


def _fd_target(fd):
    try:
        return os.readlink("/proc/self/fd/%d" % fd)
    except OSError:
        return "?"


# -- the next idpin user ------------------------------------------------------------


def after_the_next_user(wanted_pids):
    """The next idpin user takes every lock (asking for no pid or tid); then no stale knob may act.

    A worker killed with ns_last_pid armed for its pid or tid leaves the next
    fork anyone makes in the namespace that id, unless the next lock holder
    puts the cursor back.
    """
    try:
        with idpin.request(sem=CHECK_SEM):  # the IPC lock, after the pid lock
            pass
        for master, slave in idpin.pty.open_many([CHECK_PTY]).values():
            os.close(master)
            os.close(slave)
    except idpin.IdpinError as err:
        return ["the next idpin user's request raised %r" % err]
    problem = plain_fork_is_ordinary(wanted_pids)
    return [problem + " (after the next idpin user took every lock)"] if problem else []


def request_again(kind):
    """Ask for the kind's ids again from this process; problems and wrong ids."""
    problems, wrong = [], []
    for what, value in WANTED[kind]:
        got = Got()
        try:
            _ask_once(what, value, got, kind)
            got.completed = True
        except idpin.IdpinError as err:
            problems.append("%s %d not requestable again: %s" % (what, value, err))
        finally:
            wrong += got.undo()
    return problems, wrong


def _ask_once(what, value, got, kind):
    if what == "pid":
        child = idpin.fork(pid=value, mechanism="ns_last_pid" if kind == "pid-knob" else None)
        if child == 0:
            os._exit(0 if os.getpid() == value else WRONG_CHILD)
        got.children.append((child, value))
    elif what == "tid":
        thread = _new_thread(got, value)
        with idpin.request(tid=value):
            thread.start()
    elif what == "pty":
        with idpin.request(pty=value):
            _keep_pair(got, os.openpty(), value)
    elif kind.endswith("-full"):
        with idpin.request(**{what: value}):
            pass  # the namespace is full: consuming the knob is all a block can do
    else:
        with idpin.request(**{what: value}):
            got.objects.append((what, _routed_create(what), value))


# -- running a trial series within a deadline ------------------------------------------


class Hung(Exception):
    pass


def run_bounded(fn, timeout, *args):
    """fn(*args) in a forked runner (a child subreaper); its result, or Hung after ``timeout``."""
    read_end, write_end = os.pipe()
    stacks_read, stacks_write = os.pipe()
    runner = ORIGINALS["os.fork"]()
    if runner == 0:
        status = 0
        try:
            os.close(read_end)
            os.close(stacks_read)
            # On SIGUSR2 (sent at the deadline), where every thread is: the
            # hang's report says. A C-level handler: no thread, no Python.
            faulthandler.register(signal.SIGUSR2, file=stacks_write, all_threads=True)
            _sys.prctl(PR_SET_CHILD_SUBREAPER, 1)
            try:
                outcome = ("ok", fn(*args))
            except BaseException as err:
                import traceback

                outcome = ("error", "%r\n%s" % (err, traceback.format_exc()))
            data = pickle.dumps(outcome)
            view = memoryview(data)
            while view:
                view = view[os.write(write_end, view):]
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    os.close(stacks_write)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(runner, signal.SIGUSR2)
                select.select([stacks_read], [], [], 1.0)
                time.sleep(0.1)  # the rest of the dump
                os.kill(runner, signal.SIGKILL)
                os.waitpid(runner, 0)
                reap_all()
                raise Hung("%s did not finish within %.0f s (killed); its threads were at:\n%s" % (
                    getattr(fn, "__name__", fn), timeout, _read_all(stacks_read)))
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.close(stacks_read)
    os.waitpid(runner, 0)
    reap_all()
    if not chunks:
        raise RuntimeError("the runner died without reporting")
    tag, value = pickle.loads(b"".join(chunks))
    if tag != "ok":
        raise RuntimeError("the runner raised: " + value)
    return value


PR_SET_CHILD_SUBREAPER = 36


def _read_all(fd):
    os.set_blocking(fd, False)
    data = b""
    try:
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    return data.decode(errors="replace")


def my_locks_in_proc_locks():
    """Lines of /proc/locks naming this process (read once per series: it lists the machine's)."""
    me = os.getpid()
    return ["/proc/locks still lists a lock of this process on %s" % inode
            for pid, inode in flocks() if pid == me]


class Tally:
    """The outcome of a trial series: counts and the first problems."""

    def __init__(self, kind, fault):
        self.kind = kind
        self.fault = fault
        self.trials = 0
        self.faulted = 0  # trials where the fault landed (kill: during the loop; raise: inside idpin)
        self.dirty = 0  # trials after which something was left
        self.wrong = 0  # ids handed out silently wrong
        self.problems = []

    def add(self, problems, wrong):
        self.trials += 1
        if problems:
            self.dirty += 1
        self.wrong += len(wrong)
        for line in problems + ["SILENT WRONG ID: " + w for w in wrong]:
            if len(self.problems) < 12:
                self.problems.append("trial %d: %s" % (self.trials, line))

    def as_dict(self):
        return dict(kind=self.kind, fault=self.fault, trials=self.trials, faulted=self.faulted,
                    dirty=self.dirty, wrong=self.wrong, problems=self.problems)


# -- kill trials --------------------------------------------------------------------


def _prepare(kind):
    if kind.endswith("-full"):
        fill_namespace(kind.split("-")[0])


def _park_a_thread():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    ORIGINALS["threading.Thread.start"](thread)
    return stop, thread


def _worker_loop(kind, seed, ready_write, iterations, seconds):
    """In the worker: the kind's op in a loop until killed (or out of iterations)."""
    rng = random.Random(seed)
    op = OPS[kind]
    if needs_threads(kind):
        _park_a_thread()
    os.write(ready_write, b"r")
    deadline = time.monotonic() + seconds
    for _ in range(iterations):
        if time.monotonic() > deadline:
            break
        got = Got()
        try:
            op(got, rng)
            got.completed = True
        except idpin.IdpinError:
            pass
        got.undo()
    os._exit(0)


def start_worker(kind, seed, iterations=100000, seconds=20.0, before_loop=None):
    """Fork a worker running ``kind``'s op in a loop; its pid, once it is looping."""
    ready_read, ready_write = os.pipe()
    worker = ORIGINALS["os.fork"]()
    if worker == 0:
        try:
            os.close(ready_read)
            if before_loop is not None:
                before_loop()
            _worker_loop(kind, seed, ready_write, iterations, seconds)
        finally:
            os._exit(70)
    os.close(ready_write)
    os.read(ready_read, 1)
    os.close(ready_read)
    return worker


def kill_trials(kind, trials, seed, max_delay=0.01):
    """``trials`` workers of ``kind``, each SIGKILLed after a random delay."""
    rng = random.Random(seed)
    tally = Tally(kind, "kill")
    _prepare(kind)
    limits = read_limits()
    fds_before = testing.open_fds()
    wanted_pids = {v for what, v in WANTED[kind] if what in ("pid", "tid")}
    for trial in range(trials):
        worker = start_worker(kind, rng.randrange(1 << 30))
        time.sleep(rng.uniform(0, max_delay))
        os.kill(worker, signal.SIGKILL)
        _, status = os.waitpid(worker, 0)
        if os.WIFSIGNALED(status):
            tally.faulted += 1
        reap_all()
        for obj_kind, id, mode in ipc_objects():
            if mode == CALLER_MODE:  # the worker's own, left when it was killed
                _sys.ipc_remove(ipc.CODE[obj_kind], id)
        problems = after_the_next_user(wanted_pids)
        more, wrong = request_again(kind)
        problems += more + leftovers(limits, fds_before, wanted_pids)
        tally.add(problems, wrong)
    return tally.as_dict()


# -- interrupt trials -----------------------------------------------------------------


class _Interrupter:
    """A SIGALRM handler that raises KeyboardInterrupt, but only inside idpin's code."""

    def __init__(self):
        self.raised = 0
        self.budget = 1  # raises left in this trial; the timer stops at 0

    def __call__(self, signum, frame):
        # The interpreter swallows what a weakref callback raises: no fault there.
        if frame is not None and frame.f_code.co_filename.endswith("_weakrefset.py"):
            return
        if self.budget > 0 and _inside_idpin(frame):
            self.raised += 1
            self.budget -= 1
            if self.budget == 0:
                signal.setitimer(signal.ITIMER_REAL, 0)
            raise KeyboardInterrupt("idpin.bench.faults: raised at a random point")


def _inside_idpin(frame):
    # Where the signal arrived (handlers get that frame, even when idpin held
    # them): inside a call through one of idpin's doors, whatever code the
    # call was running (contextlib, threading, an at-fork hook). Not inside:
    # the caller's own code, and a delivery the caller's code set off (a
    # signal arriving while idpin's wrapper ran a handler for one that
    # arrived in the caller's lines), whose exception lands in the caller's
    # lines as it would without idpin.
    while frame is not None:
        code = frame.f_code
        if code is _WRAPPER_CALL or code.co_filename == _HERE:
            return False
        if code in _DOOR_CODES:
            return True
        frame = frame.f_back
    return False


_WRAPPER_CALL = signals.HeldInsideIdpin.__call__.__code__
_DOOR_CODES = signals.door_codes()


def _time_op(op, rng, runs=3):
    spent = []
    for _ in range(runs):
        got = Got()
        began = time.perf_counter()
        op(got, rng)
        spent.append(time.perf_counter() - began)
        got.completed = True
        got.undo()
    return sorted(spent)[len(spent) // 2]


# idpin's bounded lock wait during the series: a lock left held shows up as
# another thread's LockTimeoutError well within OTHER_THREAD_SECONDS.
SERIES_LOCK_TIMEOUT = 1.0


# Runs per wanted landing before a series gives up: a timer signal lands
# inside a pty call in only ~1 run of 5 (its walk is short next to the
# caller's own lines), so 2 per trial left the 6-trial test series with no
# landing at all about 1 time in 10.
ATTEMPTS_PER_TRIAL = 8
# A storm: Ctrl-C pressed again while idpin cleans up after the first one.
STORM_RAISES = 3
STORM_INTERVAL = (20e-6, 200e-6)


def storm_trials(kind, trials, seed):
    """Like interrupt_trials, with up to STORM_RAISES raises close together per trial."""
    return interrupt_trials(kind, trials, seed, storm=STORM_RAISES)


def interrupt_trials(kind, trials, seed, storm=1):
    """Runs of ``kind``'s op, each with a timer raising at a random point.

    Runs go on until the handler has raised inside idpin in ``trials`` of
    them, or ``ATTEMPTS_PER_TRIAL * trials`` runs were made (a timer can
    also fire in the caller's own lines, or while idpin holds signals back).
    ``storm``: how many times the handler raises per run (the later ones
    land in idpin's cleanup after the first).
    """
    rng = random.Random(seed)
    idpin.set_lock_timeout(SERIES_LOCK_TIMEOUT)
    tally = Tally(kind, "interrupt" if storm == 1 else "storm")
    _prepare(kind)
    if needs_threads(kind):
        stop, parked = _park_a_thread()
    limits = read_limits()
    op = OPS[kind]
    span = _time_op(op, rng)
    fds_before = testing.open_fds()
    wanted_pids = {v for what, v in WANTED[kind] if what in ("pid", "tid")}
    interrupter = _Interrupter()
    other_thread = OtherThread(persistent=not single_threaded(kind))
    previous = signal.signal(signal.SIGALRM, interrupter)
    try:
        for attempt in range(ATTEMPTS_PER_TRIAL * trials):
            if tally.faulted >= trials:
                break
            got = Got()
            raised_before = interrupter.raised
            interrupter.budget = storm
            signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-6, span * 1.2),
                             rng.uniform(*STORM_INTERVAL) if storm > 1 else 0)
            try:
                try:
                    op(got, rng)
                    got.completed = True
                finally:
                    # First, and in a store no handler can split: a signal
                    # still pending raises nothing in this harness's checks.
                    interrupter.budget = 0
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except KeyboardInterrupt:
                pass
            except Exception as err:  # noqa: BLE001 - idpin's answer to the fault, reported
                got.problems_extra = "the op raised %r instead of KeyboardInterrupt" % err
            if interrupter.raised > raised_before:
                tally.faulted += 1
            wrong = got.undo()
            problems = leftovers(limits, fds_before, wanted_pids, other_thread)
            extra = getattr(got, "problems_extra", None)
            if extra:
                problems.append(extra)
            tally.add(problems, wrong)
            if any("did not finish" in p for p in problems):
                break  # a thread is stuck: later trials would only repeat it
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        other_thread.stop()
        if needs_threads(kind):
            stop.set()
            parked.join()
    left = my_locks_in_proc_locks()
    if left:
        tally.add(left, [])
        tally.trials -= 1  # a finding of the whole series, not of one more trial
    return tally.as_dict()


# -- foreign creators ------------------------------------------------------------------

# A rotating pool: create one object, remove the oldest. Each step leaves the
# namespace's object count unchanged, so a block that judges unrouted
# creations by the count alone cannot see this creator's.
POOL = 64
FOREIGN_BASE_INDEX = 2000


def _rotate_forever(kind, create, stop):
    code = ipc.CODE[kind]
    pool = []
    try:
        while not stop():
            try:
                pool.append(create())
            except Exception:  # noqa: BLE001 - a full table is noise too
                pass
            if len(pool) > POOL:
                _sys.ipc_remove(code, pool.pop(0))
    finally:
        for id in pool:
            try:
                _sys.ipc_remove(code, id)
            except OSError:
                pass


def _raw_creator(kind):
    code = ipc.CODE[kind]
    return lambda: _sys.ipc_get(code, ipc.IPC_PRIVATE, 4096 if kind == "shm" else 1,
                                ipc.IPC_CREAT | 0o600)


class ForeignCreators:
    """A process and a thread of this process creating ``kind`` objects without idpin."""

    def __init__(self, kind):
        self.kind = kind

    def __enter__(self):
        self._stop_read, self._stop_write = os.pipe()
        ready_read, ready_write = os.pipe()
        self.pid = ORIGINALS["os.fork"]()
        if self.pid == 0:
            try:
                os.write(ready_write, b"r")
                stop_read = self._stop_read
                _rotate_forever(self.kind, _raw_creator(self.kind),
                                lambda: select.select([stop_read], [], [], 0)[0])
            finally:
                os._exit(0)
        os.read(ready_read, 1)
        for fd in (ready_read, ready_write):
            os.close(fd)
        self._stopping = threading.Event()
        # The thread is C code to idpin (sysv_ipc): its creations are not routed.
        self.thread = threading.Thread(target=_rotate_forever, args=(
            self.kind, lambda: _sysv_lib_create(self.kind, mode=0o600), self._stopping.is_set))
        ORIGINALS["threading.Thread.start"](self.thread)
        return self

    def __exit__(self, *exc):
        self._stopping.set()
        self.thread.join()
        os.write(self._stop_write, b"x")
        os.waitpid(self.pid, 0)
        for fd in (self._stop_read, self._stop_write):
            os.close(fd)
        return False


def foreign_trials(kind, trials, seed):
    """``trials`` blocks whose own creation is unrouted, beside foreign creators.

    Every block that ends without an error must have given its object the id.
    Each block works a little (up to 0.3 ms) before its creation, as a real
    one does, which gives the foreign creators time to land inside it.
    """
    kind = kind.split("-")[0]
    rng = random.Random(seed)
    tally = Tally(kind + "-foreign", "foreign")
    limits = read_limits()
    fds_before = testing.open_fds()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the creator thread runs inside the blocks too
    try:
        with ForeignCreators(kind):
            for trial in range(trials):
                want = (3 << ipc.ipc_shift()) | (FOREIGN_BASE_INDEX + trial % 1000)
                got = Got()
                try:
                    with idpin.request(**{kind: want}):
                        time.sleep(rng.uniform(0, 0.0003))
                        got.objects.append((kind, _sysv_lib_create(kind), want))
                    got.completed = True
                except idpin.IdBusyError:
                    tally.faulted += 1  # refused: the foreign creator got in the way
                tally.add([], got.undo())
    finally:
        sys.setswitchinterval(switch)
    other_thread = OtherThread(persistent=True)
    problems = leftovers(limits, fds_before, set(), other_thread)
    other_thread.stop()
    if problems:
        tally.add(problems, [])
        tally.trials -= 1
    return tally.as_dict()


# -- the bench ------------------------------------------------------------------------

FULL = {"trials": 300, "timeout": 600.0}
# Foreign creators hit a block's window rarely: many more blocks per series.
FOREIGN_TRIALS_FACTOR = 10
QUICK = {"trials": 3, "timeout": 120.0}
FAULTS = {"kill": kill_trials, "interrupt": interrupt_trials, "storm": storm_trials,
          "foreign": foreign_trials}
FOREIGN_KINDS = ("sem", "shm", "msg")


def run_series(fault, kind, trials, seed, timeout):
    """One series in a bounded runner; its tally (a dict), a hang counted as a problem."""
    try:
        return run_bounded(FAULTS[fault], timeout, kind, trials, seed)
    except (Hung, RuntimeError) as err:
        tally = Tally(kind, fault)
        tally.add(["the series failed: %s" % str(err).splitlines()[0]], [])
        tally.trials = 0
        return tally.as_dict()


def run_kind_in_namespaces(fault, kind, trials, seed, backend, timeout):
    try:
        return testing.run_in_namespaces(
            run_series, fault, kind, trials, seed, timeout, backend=backend, check_leaks=False,
            timeout=timeout + 30)
    except Exception as err:
        tally = Tally(kind, fault)
        tally.add(["the namespace failed: %s" % str(err).splitlines()[0]], [])
        tally.trials = 0
        return tally.as_dict()


def run_suite(quick, backends, seed=1):
    from .measure import Progress

    shape = QUICK if quick else FULL
    plan = [(fault, kind, backend) for backend in backends for fault in FAULTS
            for kind in (FOREIGN_KINDS if fault == "foreign" else KINDS)]
    progress = Progress("faults", len(plan))
    rows = []
    for fault, kind, backend in plan:
        progress.step("%s %s %s" % (fault, kind, backend))
        trials = shape["trials"] * (FOREIGN_TRIALS_FACTOR if fault == "foreign" else 1)
        row = run_kind_in_namespaces(fault, kind, trials, seed, backend, shape["timeout"])
        row["backend"] = backend
        rows.append(row)
    return rows, progress.finish()


def violations(rows):
    found = []
    for row in rows:
        where = "%s %s/%s" % (row["fault"], row["kind"], row["backend"])
        if row["dirty"] or row["wrong"] or not row["trials"]:
            found.append("%s: %d of %d trials left something, %d silent wrong ids; e.g. %s" % (
                where, row["dirty"], row["trials"], row["wrong"], "; ".join(row["problems"][:2])))
    return found


HEADER = ("fault", "kind", "backend", "trials", "fault landed", "left something", "WRONG ids")
LEGEND = """\
kill: a worker running the kind's requests in a loop is SIGKILLed after a random
delay; then this process makes the same requests and checks the namespace.
interrupt: a timer signal arrives at a random point inside an idpin call and its handler
raises KeyboardInterrupt (idpin holds it and runs it as the call returns: idpin.signals).
storm: the same, raising up to 3 times 20-200 us apart (Ctrl-C again during the cleanup).
foreign: blocks whose own creation idpin does not see (sysv_ipc), beside a process and a
thread creating and removing objects without idpin (a rotating pool: the count stays put).
fault landed = trials where the kill hit a running worker / the handler raised inside idpin /
the block was refused (IdBusyError) beside the foreign creators.
left something = trials after which an object, knob, limit, lock, fd, pty, process or
request was left (or the ids could not be requested again)."""


def render(section, out):
    from .report import table

    rows = section["rows"]
    out.write("Fault-injection suite (%s), %d series in %.0f s\n%s\n\n%s\n\n" % (
        section["mode"], len(rows), section["seconds"], section["machine_line"], LEGEND))
    out.write(table(HEADER, [(r["fault"], r["kind"], r["backend"], r["trials"], r["faulted"],
                              r["dirty"], r["wrong"]) for r in rows]) + "\n\n")
    if section["violations"]:
        out.write("FAULTS LEFT SOMETHING OR GAVE WRONG IDS:\n")
        for row in rows:
            for line in row["problems"][:3]:
                out.write("  %s %s/%s %s\n" % (row["fault"], row["kind"], row["backend"], line))
    else:
        out.write("Invariants held: after every kill and every raising handler, nothing was left "
                  "and no id was wrong.\n")
