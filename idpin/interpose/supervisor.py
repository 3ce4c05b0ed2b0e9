"""The seccomp user-notification supervisor: chosen ids for unmodified programs.

``Supervisor(plan=None, strict=False).spawn(argv, pid=None, **popen_kwargs)``
starts ``argv`` (a subprocess.Popen, returned) with a seccomp filter whose
listener this process owns. A launcher (Popen's preexec_fn, between fork and
exec) installs the filter, with no_new_privs when it lacks CAP_SYS_ADMIN, and
passes the listener back over SCM_RIGHTS; the program is exec'd only once
the supervisor receives from it. The filter (interpose/filter.py) traps the
allocating calls of the program and all its descendants: clone, clone3,
fork, vfork, semget, shmget, msgget, the pty ioctls TIOCGPTN/TIOCGPTPEER,
and writes on the request fd.

Threads: one receive loop per listener (``_sys.notif_loop``: nogil in the
Cython backend) receives eagerly, because a trapped call waits
interruptibly until it is received and a signal then would fail it; calls
nobody asked anything of are answered CONTINUE inside the loop while nothing
is pending anywhere. The rest go to one worker thread, which serialises
them: a knob armed for one call can then not be consumed by another
supervised call.

For each trapped call the worker looks up the calling thread's pending id:
a request the thread wrote to $IDPIN_REQUEST_FD, then one its process sent
through a copy of that fd (the socket), then the next entry of the plan for
its process. With one:

- fork/clone/clone3/vfork: under idpin's pid lock, ns_last_pid = id - 1,
  CONTINUE, wait (bounded) until the knob moved, verify the task with that
  pid is the caller's new child (or thread). The supervisor is in the
  target's pid namespace, so its write acts on that namespace.
- semget/shmget/msgget: under the IPC lock, <kind>_next_id = id, CONTINUE,
  wait (bounded) until the knob reads -1 again, verify the object exists.
- pty (the first TIOCGPTN/TIOCGPTPEER on a new master): open the index
  itself (idpin.pty.open_many), put it in place of the caller's master with
  NOTIF_ADDFD + SETFD, then CONTINUE: the ioctl runs on the right master.

Target memory (a request line, a clone3 argument block) is read once;
NOTIF_ID_VALID then confirms the call still waits (its thread may have died
and its number gone to another task), and only that copy is acted on. A
continued clone3 is read again by the kernel, after any rewrite by another
thread of the program: a copy the kernel would refuse is refused here
(EINVAL), so no allocation follows a block that was invalid when validated;
a valid block rewritten into another valid one during the call is the
program racing itself, and the kernel does what it reads then: a pinned
process turned into a thread gets the pinned number as its tid (recorded
in ``errors``); a thread turned into a process while a pid is pending is
killed and recorded, so a clone3 that reads as a thread then is continued
under the pid lock and watched.

A taken id fails the call with EBUSY (a plan entry only with strict=True;
otherwise the call is ordinary). A continued call cannot be failed any
more: if verification finds a wrong id (only a process outside the
supervisor and outside idpin's lock can cause it) the wrong child is killed
and the event is recorded in ``errors``.
"""
import collections
import contextlib
import errno
import fcntl
import itertools
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback

from .. import _sys, ipc, knobs, pids
from .. import pty as idpin_pty
from ..errors import IdBusyError, RequestError, UnsupportedError
from ..request import KINDS, ORDER
from . import filter as seccomp_filter

ENV = "IDPIN_REQUEST_FD"
CLONE_THREAD = 0x00010000
CLONE_PARENT = 0x00008000
CLONE_VM = 0x00000100
CLONE_SIGHAND = 0x00000800
CLONE_DETACHED = 0x00400000
CLONE_NEWTIME = 0x00000080
CSIGNAL = 0x000000FF
CLONE_CLEAR_SIGHAND = 1 << 32
CLONE_INTO_CGROUP = 1 << 33
# clone3's argument block up to exit_signal: flags, pidfd, child_tid,
# parent_tid, exit_signal (u64 each); the kernel wants at least 64 bytes.
CLONE3_READ = 40
CLONE3_MIN_SIZE = 64
# Bounds on waiting for a continued call to allocate (it fails early, never
# allocating, only on bad arguments or limits), and for its task to show.
SETTLE_SECONDS = 2.0
# How many quick tests of a continued call's end come before the slower one
# that also asks /proc whether its thread is alive (the call usually ends
# within the first few).
DEATH_CHECK_AFTER = 200
LISTENER_SECONDS = 30.0
MAX_REQUEST_BYTES = 4096
# i386's ipc() multiplexer: call numbers (linux/ipc.h).
_IPC_CALLS = {2: "semget", 13: "msgget", 23: "shmget"}
_GET_KIND = {"semget": "sem", "shmget": "shm", "msgget": "msg"}


# ---------------------------------------------------------------- plans and request lines

def load_plan(plan):
    """A plan (dict, or a path to its JSON) checked just enough to drive a supervisor.

    The single place that reads plans here: the schema-based validator
    (idpin.restore.plan) replaces its body once it lands.
    """
    if not isinstance(plan, dict):
        import json

        try:
            with open(plan) as f:
                plan = json.load(f)
        except (OSError, ValueError) as err:
            raise RequestError("cannot read plan %s: %s" % (plan, err)) from None
    if plan.get("idpin_plan") != 1:
        raise RequestError("not an idpin plan of version 1 (\"idpin_plan\": 1 is missing or newer)")
    unknown = set(plan) - {"idpin_plan", "root", "processes", "ipc", "ptys"}
    if unknown:
        raise RequestError("plan has unknown fields %s" % sorted(unknown))
    processes = plan.get("processes", [])
    if not isinstance(processes, list):
        raise RequestError("plan 'processes' must be a list")
    nexts = {}
    for i, entry in enumerate(processes):
        where = "plan processes[%d]" % i
        if not isinstance(entry, dict) or "pid" not in entry:
            raise RequestError("%s needs a 'pid'" % where)
        pid = pids.validate_pid(entry["pid"])
        if not isinstance(pid, int):
            raise RequestError("%s: pid must be an int" % where, kind="pid")
        if pid in nexts:
            raise RequestError("%s: pid %d appears twice" % (where, pid), kind="pid")
        nexts[pid] = _plan_next(entry.get("next", {}), where)
    root = plan.get("root")
    if root is not None and (isinstance(root, bool) or not isinstance(root, int) or root < 1):
        raise RequestError("plan 'root' must be a pid (int >= 1), not %r" % (root,), kind="pid")
    return {"root": root, "next": nexts}


def _plan_next(spec, where):
    if not isinstance(spec, dict):
        raise RequestError("%s: 'next' must map kinds to lists of ids" % where)
    lists = {}
    for kind, ids in spec.items():
        if kind not in KINDS:
            raise RequestError("%s: unknown kind %r in 'next' (kinds: %s)" % (where, kind, ", ".join(ORDER)))
        if not isinstance(ids, list):
            raise RequestError("%s: next.%s must be a list" % (where, kind), kind=kind)
        lists[kind] = collections.deque(_validate(kind, value) for value in ids)
    return lists


def _validate(kind, value):
    value = KINDS[kind].validate(value)
    if isinstance(value, tuple):
        raise RequestError("%s: a supervised program's ids are single ints, not %r" % (kind, value), kind=kind)
    return value


def parse_request(data):
    """{kind: id} from one request line such as b"sem=32769 pty=5"; RequestError if bad."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise RequestError("a request line is ASCII text such as 'pid=1234'") from None
    words = text.split()
    if not words:
        raise RequestError("an empty request line: write e.g. 'pid=1234' or 'sem=32769 pty=5'")
    ids = {}
    for word in words:
        kind, sep, value = word.partition("=")
        if not sep or kind not in KINDS:
            raise RequestError("bad request %r: write kind=id with kind one of %s" % (word, ", ".join(ORDER)))
        if kind in ids:
            raise RequestError("kind %s is requested twice in one line" % kind, kind=kind)
        try:
            number = int(value, 10)
        except ValueError:
            raise RequestError("bad id %r for %s: a decimal integer" % (value, kind), kind=kind) from None
        ids[kind] = _validate(kind, number)
    return ids


# ---------------------------------------------------------------- what is pending, per thread and process

class Pending:
    """Ids waiting for allocations: per thread (request fd), per process
    (request socket), and the plan's lists per process. Thread-safe."""

    def __init__(self, plan_next):
        self._plan = plan_next
        self._threads = {}
        self._processes = {}
        self._lock = threading.Lock()

    def empty(self):
        with self._lock:
            return not self._threads and not self._processes and not any(
                ids for lists in self._plan.values() for ids in lists.values())

    def add_thread(self, tid, ids):
        with self._lock:
            self._threads.setdefault(tid, {}).update(ids)

    def add_process(self, tgid, ids):
        with self._lock:
            self._processes.setdefault(tgid, {}).update(ids)

    def peek(self, tid, tgid, kind):
        """(source, id) the next ``kind`` allocation of this thread must get, or None."""
        with self._lock:
            if kind in self._threads.get(tid, ()):
                return "thread", self._threads[tid][kind]
            if kind in self._processes.get(tgid, ()):
                return "process", self._processes[tgid][kind]
            ids = self._plan.get(tgid, {}).get(kind)
            if ids:
                return "plan", ids[0]
        return None

    def take(self, source, tid, tgid, kind):
        with self._lock:
            if source == "plan":
                self._plan[tgid][kind].popleft()
                return
            table, key = (self._threads, tid) if source == "thread" else (self._processes, tgid)
            table[key].pop(kind, None)
            if not table[key]:
                del table[key]

    def plan_left(self):
        with self._lock:
            return {pid: {k: list(v) for k, v in lists.items() if v}
                    for pid, lists in self._plan.items() if any(lists.values())}


# ---------------------------------------------------------------- the launcher (runs between fork and exec)

class _WrongPid(Exception):
    pass


class _Fds:
    """Where the request fd goes in the program, and which fds it keeps.

    A shell's '>&N' takes one digit only, so the request fd gets the lowest
    number from 3 up that the caller does not pass itself. The launcher
    moves it there and does close_fds' work itself: Popen's close_fds would
    close that number (pass_fds must name fds open in the parent).
    """

    def __init__(self, request_end, keep, close_fds):
        self.source = request_end.fileno()
        self.keep = tuple(keep)
        self.close_fds = close_fds
        self.number = next(fd for fd in range(3, 1 << 20) if fd not in self.keep)
        # Reserve the number here if it is free, so that none of the fds
        # Popen opens next (its error pipe) can get it; if something else
        # holds it, that is an fd of ours the program's copy may lose.
        reserved = fcntl.fcntl(self.source, fcntl.F_DUPFD_CLOEXEC, self.number)
        self.reserved = reserved if reserved == self.number else -1
        if self.reserved < 0:
            os.close(reserved)
        self.before = _open_fds()

    def close(self):
        if self.reserved >= 0:
            os.close(self.reserved)
            self.reserved = -1

    def arrange(self):
        """In the launcher: the request fd at its number, close_fds done."""
        if self.source == self.number:
            os.set_inheritable(self.number, True)
        else:
            os.dup2(self.source, self.number, inheritable=True)
        for fd in self.keep:
            os.set_inheritable(fd, True)
        if not self.close_fds:
            return
        # Popen's own fds opened after ``before`` (its error pipe) are
        # close-on-exec; so is everything Python opened: only the rest.
        for fd in self.before:
            if fd > 2 and fd != self.number and fd not in self.keep:
                try:
                    if os.get_inheritable(fd):
                        os.close(fd)
                except OSError:
                    pass


def _open_fds():
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _launcher(bpf, flags, channel_sock, want_pid, user_preexec, fds):
    """Popen's preexec_fn: check the pid, install the filter, hand over the listener.

    It runs in the child between fork and exec, so it calls nothing that
    takes a lock another thread of the parent could have held at the fork.
    """

    def launch():
        if want_pid is not None and os.getpid() != want_pid:
            # Born with the wrong pid: never run the program.
            raise _WrongPid("idpin: born with pid %d instead of %d" % (os.getpid(), want_pid))
        if user_preexec is not None:
            user_preexec()
        fd = _install(bpf, flags)
        socket.send_fds(channel_sock, [b"L"], [fd])
        os.close(fd)
        # exec only once the supervisor receives: a call trapped before
        # that would wait unreceived, and a signal would fail it.
        if channel_sock.recv(1) != b"A":
            raise RuntimeError("idpin: the supervisor did not take the listener")
        fds.arrange()

    return launch


def _install(bpf, flags):
    try:
        return _sys.seccomp_listen(bpf, flags)
    except OSError as err:
        if err.errno == errno.EACCES:
            # Without CAP_SYS_ADMIN in its user namespace a process may only
            # install a filter under no_new_privs.
            _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
            return _sys.seccomp_listen(bpf, flags)
        if err.errno == errno.EINVAL and flags:
            return _install(bpf, 0)  # a kernel before 5.19: no WAIT_KILLABLE_RECV
        raise


# ---------------------------------------------------------------- one listener

class _Channel:
    """One spawned program: its listener, its request socket, its receive thread."""

    def __init__(self, requests, request_inode=None):
        self.listener = -1
        self.requests = requests
        # The program's end of the request socket: a trapped write on its fd
        # number is a request only while that number still holds this socket.
        self.request_inode = request_inode
        self.thread = None


# _classify: a call the kernel would refuse with EINVAL, judged from the copy read.
INVALID = ("invalid", None)

# Outcomes of a pinning attempt.
OK, BUSY, WRONG, NOT_ALLOCATED, GONE = "ok", "busy", "wrong", "not-allocated", "gone"


class Supervisor:
    """Chosen ids for supervised programs; see the module docstring.

    ``plan``: a plan dict or path (its processes' ``next`` lists are used);
    ``strict``: an allocation the plan (or a request) does not name, or a
    named id that is taken, fails with EBUSY instead of being ordinary.
    ``log`` lists (tgid, kind, id, outcome) of every pinned allocation;
    ``errors`` what could not be done right (wrong ids undone, bad lines).
    """

    def __init__(self, plan=None, strict=False, sync_wakeup=False):
        self.plan = load_plan(plan) if plan is not None else None
        self.strict = bool(strict)
        self.pending = Pending(self.plan["next"] if self.plan else {})
        self.log = []
        self.errors = []
        self._sync_wakeup = sync_wakeup
        self._names = seccomp_filter.syscall_names()
        self._write_nr = seccomp_filter.syscall_number("write")
        self._channels = []
        self._queue = queue.SimpleQueue()
        self._stop_read, self._stop_write = os.pipe2(os.O_CLOEXEC)
        self._control = bytearray(4 * _sys.LOOP_CONTROL_INTS)
        struct.pack_into("=II", self._control, 4 * _sys.LOOP_SLOW_NR, self._write_nr,
                         seccomp_filter.NATIVE_ARCH)
        struct.pack_into("=III", self._control, 4 * _sys.LOOP_EXITS_FAST, 1,
                         *(seccomp_filter.syscall_number(name) for name in seccomp_filter.EXIT_CALLS))
        self._holds = 0
        self._latest = {}
        self._installed_ptys = set()
        self._pid_namespace = None
        self._state_lock = threading.Lock()
        self._closed = False
        self._filter_flags = _sys.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
        self._worker = threading.Thread(target=self._work, name="idpin-supervisor", daemon=True)
        self._worker.start()
        self._update_fast_path()

    # -- public

    def spawn(self, argv, pid=None, **popen_kwargs):
        """Start ``argv`` supervised; a subprocess.Popen. ``pid``: the pid it must get."""
        if self._closed:
            raise RuntimeError("this Supervisor is closed")
        if pid is not None:
            pid = _validate("pid", pid)
        requests, request_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        requests.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        requests.setblocking(False)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = _Channel(requests, os.fstat(request_end.fileno()).st_ino)
        receiver = None
        fds = None
        try:
            fds = _Fds(request_end, popen_kwargs.pop("pass_fds", ()), popen_kwargs.pop("close_fds", True))
            bpf = seccomp_filter.build_bpf(fds.number)
            env = dict(popen_kwargs.pop("env", None) or os.environ)
            env[ENV] = str(fds.number)
            launch = _launcher(bpf, self._filter_flags, theirs, pid, popen_kwargs.pop("preexec_fn", None), fds)
            receiver = threading.Thread(target=self._take_listener, args=(channel, ours), daemon=True)
            receiver.start()
            with self._pinned_spawn(pid):
                try:
                    proc = subprocess.Popen(argv, env=env, close_fds=False, preexec_fn=launch,
                                            **popen_kwargs)
                except subprocess.SubprocessError as err:
                    if pid is not None and "preexec_fn" in str(err) and channel.listener < 0:
                        raise IdBusyError("pid", pid, "the program's process got another pid "
                                          "(a process forking outside idpin's lock); it was "
                                          "reaped before it ran anything") from None
                    raise
        except BaseException:
            if fds is not None:
                fds.close()
            theirs.close()
            ours.close()
            if receiver is not None:
                receiver.join(LISTENER_SECONDS)
            self._drop(channel)
            request_end.close()
            raise
        fds.close()
        theirs.close()
        request_end.close()
        ours.close()  # the launcher got its answer before it exec'd
        if channel.listener < 0:
            proc.kill()
            proc.wait()
            self._drop(channel)
            raise RuntimeError("idpin: the supervised program's listener never arrived")
        proc.supervisor = self
        return proc

    def close(self):
        """Stop supervising: the programs' later trapped calls fail with ENOSYS."""
        if self._closed:
            return
        self._closed = True
        os.write(self._stop_write, b"x")
        for channel in list(self._channels):
            if channel.thread is not None:
                channel.thread.join(LISTENER_SECONDS)
        self._queue.put(None)
        self._worker.join(LISTENER_SECONDS)
        for channel in list(self._channels):
            self._drop(channel)
        os.close(self._stop_read)
        os.close(self._stop_write)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    @property
    def fast_answers(self):
        """How many calls the receive loops answered themselves (nothing pending)."""
        return struct.unpack_from("=I", self._control, 4)[0]

    # -- listener hand-over and receive loops

    def _take_listener(self, channel, ours):
        ours.settimeout(LISTENER_SECONDS)
        try:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        except OSError:
            return
        if not fds:
            return  # the launcher failed before it installed anything
        self._start(channel, fds[0], thread=False)
        try:
            ours.send(b"A")
        except OSError:
            pass
        # This thread becomes the receive loop: a thread started now would
        # take the pid right after the program's, which a plan may name.
        self._receive(channel)

    def attach(self, listener, requests, request_inode=None):
        """Supervise a program this process did not spawn: its filter's
        ``listener`` fd and our end of its request socket (both are closed
        by close()); ``request_inode``: the inode of the program's end."""
        requests.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        requests.setblocking(False)
        self._start(_Channel(requests, request_inode), listener)

    def _start(self, channel, listener, thread=True):
        channel.listener = listener
        if self._sync_wakeup:
            try:
                _sys.notif_set_flags(channel.listener, _sys.SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
            except OSError:
                pass  # before 6.6: ordinary wake-ups
        self._channels.append(channel)
        if thread:
            channel.thread = threading.Thread(target=self._receive, args=(channel,),
                                              name="idpin-receive", daemon=True)
            channel.thread.start()
        else:
            channel.thread = threading.current_thread()

    def _receive(self, channel):
        while True:
            try:
                notification = _sys.notif_loop(channel.listener, self._stop_read,
                                               channel.requests.fileno(), self._control)
            except OSError as err:
                self.errors.append("receive loop: %s" % err)
                return
            if notification is None:
                return
            if notification == ():
                self._drain_requests(channel)
                continue
            self._set_fast(False)
            # A thread has one call at a time: a newer notification from it
            # means its continued call is over (a restart after a signal).
            self._latest[notification[1]] = notification[:5]
            self._queue.put((channel, notification))

    def _drop(self, channel):
        if channel.listener >= 0:
            os.close(channel.listener)
            channel.listener = -1
        channel.requests.close()
        if channel in self._channels:
            self._channels.remove(channel)

    # -- the fast path: on only while nothing is pending anywhere

    def _set_fast(self, on):
        struct.pack_into("=I", self._control, 0, 1 if on else 0)

    def _update_fast_path(self):
        with self._state_lock:
            self._set_fast(not self.strict and self._holds == 0 and self._queue.empty()
                           and self.pending.empty())

    @contextlib.contextmanager
    def _exits_held(self):
        """Exits wait for the worker meanwhile: a short child is still there
        to be verified (the loop answers them itself otherwise)."""
        struct.pack_into("=I", self._control, 4 * _sys.LOOP_EXITS_FAST, 0)
        try:
            yield
        finally:
            struct.pack_into("=I", self._control, 4 * _sys.LOOP_EXITS_FAST, 1)

    @contextlib.contextmanager
    def _holding(self):
        with self._state_lock:
            self._holds += 1
            self._set_fast(False)
        try:
            yield
        finally:
            with self._state_lock:
                self._holds -= 1
            self._update_fast_path()

    @contextlib.contextmanager
    def _pinned_spawn(self, pid):
        if pid is None:
            yield
            return
        lock = knobs.namespace_lock("pid")
        with self._holding(), lock.held():
            if pids.pid_in_use(pid):
                raise IdBusyError("pid", pid, "in use")
            # Recorded first: a supervisor killed now leaves the next holder
            # of the lock the cursor to put back (pids.record_cursor).
            pids.record_cursor(lock, pid - 1)
            try:
                knobs.write_knob(lock.knob("ns_last_pid"), "ns_last_pid", pid - 1)
                yield
            finally:
                pids.forget_cursor(lock)

    # -- requests through the socket (a copy of the request fd)

    def _drain_requests(self, channel):
        space = socket.CMSG_SPACE(struct.calcsize("3i"))
        while True:
            try:
                data, ancillary, _, _ = channel.requests.recvmsg(MAX_REQUEST_BYTES, space)
            except (BlockingIOError, OSError):
                return
            sender = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = struct.unpack("3i", payload[:12])[0]
            try:
                ids = parse_request(data)
            except RequestError as err:
                self.errors.append("bad request line from pid %s on the request socket: %s" % (sender, err))
                continue
            if sender:
                self.pending.add_process(sender, ids)
                self._set_fast(False)

    # -- the worker

    def _work(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            channel, notification = item
            try:
                self._handle(channel, notification)
            except Exception as err:  # a failing handler must not stop the others
                where = traceback.extract_tb(err.__traceback__)[-1]
                self.errors.append("handling %r: %s: %s (at %s:%d)" % (
                    notification[:3], type(err).__name__, err, os.path.basename(where.filename), where.lineno))
                self._answer(channel, notification, -errno.EBUSY)
            if self._queue.empty():
                self._update_fast_path()

    def _answer(self, channel, notification, error=0, value=0):
        if channel.listener < 0:
            return False
        flags = 0 if error or value else _sys.SECCOMP_USER_NOTIF_FLAG_CONTINUE
        return _sys.notif_send(channel.listener, notification[0], value, error, flags)

    def _valid(self, channel, notification):
        return _sys.notif_id_valid(channel.listener, notification[0])

    def _handle(self, channel, notification):
        nid, tid, nr, arch, ip, args = notification
        name = self._names.get((arch, nr))
        self._drain_requests(channel)
        if name == "write":
            return self._request_write(channel, notification)
        what = self._classify(channel, notification, name)
        if what is None:
            return self._answer(channel, notification)
        if what is INVALID:
            return self._answer(channel, notification, -errno.EINVAL)
        kind, detail = what
        tgid = _tgid(tid)
        found = self.pending.peek(tid, tgid, kind) if tgid else None
        if found is None:
            if self.strict:
                self.log.append((tgid, kind, None, BUSY))
                return self._answer(channel, notification, -errno.EBUSY)
            if name == "clone3" and kind == "tid" and self.pending.peek(tid, tgid, "pid"):
                return self._continue_watched(channel, notification, tgid)
            return self._answer(channel, notification)
        source, want = found
        pin = {"pid": self._pin_pid, "tid": self._pin_pid, "pty": self._pin_pty}.get(kind, self._pin_ipc)
        outcome = pin(channel, notification, tgid, kind, want, detail)
        self.log.append((tgid, kind, want, outcome))
        if outcome in (OK, WRONG):
            self.pending.take(source, tid, tgid, kind)
        elif outcome == BUSY:
            self.pending.take(source, tid, tgid, kind)
            if source == "plan" and not self.strict:
                return self._answer(channel, notification)  # ordinary, as asked
            return self._answer(channel, notification, -errno.EBUSY)

    def _classify(self, channel, notification, name):
        """(kind, detail) of an allocating call, or None for one that allocates nothing."""
        args = notification[5]
        if name in ("fork", "vfork"):
            return "pid", 0
        if name == "clone":
            flags = args[0]
        elif name == "clone3":
            if args[1] < CLONE3_MIN_SIZE:
                return None  # the kernel fails it with EINVAL before reading it
            try:
                raw = _sys.process_vm_read(notification[1], args[0], CLONE3_READ)
            except OSError:
                return None  # gone, or the kernel fails it with EFAULT
            if len(raw) != CLONE3_READ or not self._valid(channel, notification):
                return None
            flags, _, _, _, exit_signal = struct.unpack("=5Q", raw)
            if _clone3_invalid(flags, exit_signal):
                # The kernel reads the block again once continued, and a
                # thread of the program may have rewritten it by then:
                # decide from the copy validated, which no allocation
                # could follow.
                return INVALID
        elif name == "msgget":
            return "msg", (args[0], 0, args[1])  # msgget(key, flags)
        elif name in _GET_KIND:
            return _GET_KIND[name], (args[0], args[1], args[2])
        elif name == "ipc":
            call = _IPC_CALLS.get(args[0] & 0xFFFF)
            if call is None:
                return None
            if call == "msgget":
                return "msg", (args[1], 0, args[2])
            return _GET_KIND[call], (args[1], args[2], args[3])
        elif name == "ioctl":
            return "pty", args[0] & 0xFFFFFFFF
        else:
            return None
        return ("tid" if flags & CLONE_THREAD else "pid"), flags

    # -- request lines written on the request fd itself (per thread)

    def _request_write(self, channel, notification):
        nid, tid, nr, arch, ip, args = notification
        if not self._is_request_fd(channel, tid, args[0] & 0xFFFFFFFF):
            return self._answer(channel, notification)  # the number was reused: a plain write
        count = args[2]
        if count > MAX_REQUEST_BYTES:
            return self._answer(channel, notification, -errno.EINVAL)
        try:
            data = _sys.process_vm_read(tid, args[1], count)
        except OSError:
            data = None
        # Only now is what was read the waiting call's (its thread may have
        # died and its number gone to another task): decide from this copy.
        if not self._valid(channel, notification):
            return False
        if data is None or len(data) != count:
            return self._answer(channel, notification, -errno.EFAULT)
        try:
            ids = parse_request(data)
        except RequestError as err:
            self.errors.append("bad request line from thread %d: %s" % (tid, err))
            return self._answer(channel, notification, -errno.EINVAL)
        self.pending.add_thread(tid, ids)
        return self._answer(channel, notification, value=count)

    def _is_request_fd(self, channel, tid, fd):
        if channel.request_inode is None:
            return True
        try:
            pidfd = os.pidfd_open(_tgid(tid) or tid)
        except OSError:
            return True  # gone: the answer does not matter
        try:
            theirs = _sys.pidfd_getfd(pidfd, fd)
        except OSError:
            return False
        finally:
            os.close(pidfd)
        try:
            return os.fstat(theirs).st_ino == channel.request_inode
        finally:
            os.close(theirs)

    # -- pids and tids: ns_last_pid under the lock, CONTINUE, verify

    def _pin_pid(self, channel, notification, tgid, kind, want, flags):
        lock = self._pid_lock()
        with lock.held(), self._exits_held():
            if pids.pid_in_use(want):
                return BUSY
            knob = lock.knob("ns_last_pid")
            pids.record_cursor(lock, want - 1)
            try:
                return self._continue_pinned(channel, notification, tgid, kind, want, flags, knob)
            finally:
                pids.forget_cursor(lock)

    def _continue_pinned(self, channel, notification, tgid, kind, want, flags, knob):
        """The pid lock held and the cursor recorded: arm, continue, verify."""
        knobs.write_knob(knob, "ns_last_pid", want - 1)
        if not self._answer(channel, notification):
            return GONE
        over = self._call_over(notification)
        got = _wait_knob(knob, lambda value: value != want - 1, over)
        if got is None:
            # Over without allocating: a signal restarts a fork before
            # it allocates (its restart is trapped again), or it failed
            # early (limits, bad flags).
            return NOT_ALLOCATED
        if got == want:
            born = _born(want, tgid, kind, flags, over)
            if born is None and self._restarted(notification):
                return NOT_ALLOCATED  # failed after allocating; restarted
            if born is None or born:
                # Allocated while every other supervised allocation
                # waited: ours. (Not seen: killed by a signal and reaped
                # already; a normal exit would wait in our queue.)
                return OK
        if not _alive(tgid):
            return GONE  # killed meanwhile: its children went to their reaper
        self._undo_wrong(tgid, got, kind, want)
        return WRONG

    def _pid_lock(self):
        # A process's own pid namespace (/proc/self/ns/pid) is fixed for its
        # life: looked up once, not with an os.stat on every pinned fork
        # (15 us of the 70 us before a pinned fork is continued).
        if self._pid_namespace is None:
            self._pid_namespace = knobs.namespace_lock("pid")
        return self._pid_namespace

    def _continue_watched(self, channel, notification, tgid):
        """Continue a clone3 whose validated block makes a thread, while a
        pid is pending for the caller.

        The kernel reads the block again once continued: if a thread of the
        program rewrote it into a process meanwhile, that process must not
        keep an ordinary pid while the pending one waits. Under the pid lock
        (nothing else supervised or idpin's moves the cursor meanwhile), the
        task made is looked at: a child process is killed and recorded, and
        the pid stays pending.
        """
        lock = self._pid_lock()
        with lock.held(), self._exits_held():
            knob = lock.knob("ns_last_pid")
            before = _sys.knob_read(knob)
            if not self._answer(channel, notification):
                return
            got = _wait_knob(knob, lambda value: value != before, self._call_over(notification))
            if got is None or _ppid(got) != tgid:
                return  # nothing made, or a thread (its parent is tgid's)
            _kill(got)
        self.log.append((tgid, "pid", None, WRONG))
        self.errors.append("process %d made a process (pid %d) from a clone3 block that was a "
                           "thread's when the supervisor validated it, while a pid was pending: "
                           "killed it" % (tgid, got))

    def _call_over(self, notification):
        """A test: is the call behind ``notification`` over (its thread has
        trapped again since, died, or waits in another syscall)?

        The first DEATH_CHECK_AFTER tests only look for a newer trap. After
        them /proc is asked too: a thread killed during its continued call
        never traps again, nor does one whose call failed early and that
        now waits, untrapped, for something (a thread's or child's exit
        held in our queue meanwhile): without this, the wait would last
        SETTLE_SECONDS, and every other supervised call with it.
        """
        tid, nid, nr = notification[1], notification[0], notification[2]
        tests = itertools.count()

        def over():
            if self._latest.get(tid, (nid,))[0] != nid:
                return True
            if next(tests) < DEATH_CHECK_AFTER:
                return False
            return not _alive(tid) or _in_another_syscall(tid, nr)

        return over

    def _restarted(self, notification):
        """Whether the thread's newest trapped call is this one again: the
        same syscall from the same instruction (a restart after a signal)."""
        latest = self._latest.get(notification[1], notification[:5])
        return latest[0] != notification[0] and latest[2:5] == notification[2:5]

    def _undo_wrong(self, tgid, got, kind, want):
        # The knob moved to ``got``: the last pid allocated. If the caller's
        # new child has it, the caller lost the knob to a process outside
        # the supervisor and idpin's lock.
        if kind == "tid":
            self.errors.append("a thread of %d got a tid other than %d (a process outside the "
                               "supervisor and idpin's lock raced the knob)" % (tgid, want))
            return
        if got == want and os.path.exists("/proc/%d/task/%d" % (tgid, want)):
            self.errors.append("process %d made a thread, not a process, with pid %d (its clone3 "
                               "block was rewritten during the call)" % (tgid, want))
        elif got != want and _ppid(got) == tgid:
            _kill(got)
            self.errors.append("process %d forked pid %d instead of %d (a process outside the "
                               "supervisor and idpin's lock raced the knob, or the pid was still "
                               "being freed): killed it" % (tgid, got, want))
        else:
            self.errors.append("process %d: pid %d went to another process; its own child's pid "
                               "is unknown" % (tgid, want))

    # -- SysV IPC: the kind's knob under the IPC lock, CONTINUE, verify

    def _pin_ipc(self, channel, notification, tgid, kind, want, call):
        key, arg, flags = call
        key &= 0xFFFFFFFF
        code = ipc.CODE[kind]
        if not _same_namespace(tgid, "ipc"):
            return BUSY
        lock = ipc.ipc_lock()
        with lock.held():
            if key != ipc.IPC_PRIVATE and (not flags & ipc.IPC_CREAT or _key_exists(kind, key)):
                self._answer(channel, notification)
                return NOT_ALLOCATED  # finds an existing object (or fails): nothing is allocated
            if kind != "msg" and arg == 0:
                self._answer(channel, notification)
                return NOT_ALLOCATED  # EINVAL before the knob is read
            if _held_at(code, want) != -1:
                return BUSY
            name = ipc.KNOB[kind]
            knob = lock.knob(name)
            knobs.write_knob(knob, name, want)
            if not self._answer(channel, notification):
                ipc.consume_knob(kind, lock)
                return GONE
            if _wait_knob(knob, lambda value: value == -1, self._call_over(notification)) is None:
                ipc.consume_knob(kind, lock)  # never leave it armed
                return NOT_ALLOCATED
            held = _held_at(code, want)
            if held in (want, -1):
                # Created while every other supervised creation waited:
                # ours (-1: the program removed it already).
                return OK
            self.errors.append("%s of process %d: the knob for %d was consumed by a creator "
                               "outside the supervisor" % (kind, tgid, want))
            return WRONG

    # -- ptys: open the index here, put it in place of the caller's master

    def _pin_pty(self, channel, notification, tgid, kind, want, fd):
        try:
            pidfd = os.pidfd_open(tgid)
        except OSError:
            return GONE
        try:
            try:
                theirs = _sys.pidfd_getfd(pidfd, fd)
            except OSError:
                self._answer(channel, notification)
                return NOT_ALLOCATED  # not an fd: the ioctl fails on its own
        finally:
            os.close(pidfd)
        try:
            try:
                current = _sys.pty_index(theirs)
            except OSError:
                self._answer(channel, notification)
                return NOT_ALLOCATED  # not a pty master
            if (tgid, fd, current) in self._installed_ptys:
                # A master put in place earlier (glibc's openpty asks for its
                # index more than once): not a new allocation.
                self._answer(channel, notification)
                return NOT_ALLOCATED
            if current == want:
                if not self._answer(channel, notification):
                    return GONE  # what was read may be another process's
                self._installed_ptys.add((tgid, fd, want))
                return OK
            instance = idpin_pty.find_instance()
            if os.fstat(theirs).st_dev != instance.dev:
                # Another devpts instance than ours, if the fd read was the
                # waiting call's (BUSY spends the pending id).
                return BUSY if self._valid(channel, notification) else GONE
            status = fcntl.fcntl(theirs, fcntl.F_GETFL)
            cloexec = _fd_cloexec(tgid, fd)
        finally:
            os.close(theirs)
        try:
            pairs = idpin_pty.open_many([want])
        except IdBusyError:
            return BUSY
        master, slave = pairs[want]
        try:
            os.close(slave)
            fcntl.fcntl(master, fcntl.F_SETFL, status)
            if not self._valid(channel, notification):
                return GONE
            _sys.notif_addfd(channel.listener, notification[0], master, fd,
                             _sys.SECCOMP_ADDFD_FLAG_SETFD, os.O_CLOEXEC if cloexec else 0)
        finally:
            os.close(master)
        self._installed_ptys.add((tgid, fd, want))
        return OK if self._answer(channel, notification) else GONE


def _clone3_invalid(flags, exit_signal):
    """Whether clone3 with these fields fails with EINVAL before it allocates
    (kernel/fork.c: copy_clone_args_from_user, clone3_args_valid and the
    flag checks at the top of copy_process)."""
    if exit_signal & ~CSIGNAL or exit_signal > 64:
        return True
    if flags & ~(0xFFFFFFFF | CLONE_CLEAR_SIGHAND | CLONE_INTO_CGROUP):
        return True
    if flags & (CLONE_DETACHED | (CSIGNAL & ~CLONE_NEWTIME)):
        return True
    if flags & CLONE_SIGHAND and flags & CLONE_CLEAR_SIGHAND:
        return True
    if flags & (CLONE_THREAD | CLONE_PARENT) and exit_signal:
        return True
    if flags & CLONE_THREAD and not flags & CLONE_SIGHAND:
        return True
    return bool(flags & CLONE_SIGHAND and not flags & CLONE_VM)


# ---------------------------------------------------------------- /proc helpers

def _read_proc(path, size=4096):
    """The first ``size`` bytes of a /proc file, or None if it is gone.

    Raw os calls: on the pinned-call path Python's text I/O costs more than
    the kernel's making of the file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)


def _tgid(tid):
    if not tid:
        return None  # not visible in our pid namespace
    # pidfd_open succeeds only for a thread group leader (EINVAL for other
    # threads): the common case costs one syscall, not a /proc read.
    try:
        os.close(os.pidfd_open(tid))
        return tid
    except OSError as err:
        if err.errno != errno.EINVAL:
            return None  # gone
    return (_status_fields(tid, {"Tgid"}) or {}).get("Tgid")


def _status_fields(pid, names):
    data = _read_proc("/proc/%d/status" % pid)
    if data is None:
        return None
    found = {}
    try:
        for line in data.decode().splitlines():
            key, _, value = line.partition(":")
            if key in names:
                found[key] = int(value.split()[0])
    except (ValueError, IndexError):
        return None
    return found


def _ppid(pid):
    """The parent of process ``pid`` (from /proc/PID/stat, cheaper than status), or None."""
    data = _read_proc("/proc/%d/stat" % pid, 1024)
    try:
        # "pid (comm) state ppid ...": comm may hold anything but its last ')'.
        return int(data.rpartition(b")")[2].split()[1])
    except (AttributeError, ValueError, IndexError):
        return None


def _wait_knob(knob, done, over, timeout=SETTLE_SECONDS):
    """Poll a knob until ``done(value)``; the value, or None once ``over()``
    or after ``timeout``.

    The first polls only yield the CPU: the continued call usually allocates
    within tens of microseconds, and a short child must still be there when
    it is verified.
    """
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        value = _sys.knob_read(knob)
        if done(value):
            return value
        if over() or time.monotonic() > deadline:
            return None if not done(_sys.knob_read(knob)) else _sys.knob_read(knob)
        polls += 1
        if polls < 200:
            os.sched_yield()
        else:
            time.sleep(0.0002)


def _born(pid, tgid, kind, flags, over, timeout=0.02):
    """Whether task ``pid`` is the new thread of ``tgid`` or its child; None
    if it does not show within ``timeout`` (it may already be reaped)."""
    parent = _ppid(tgid) if kind != "tid" and flags & CLONE_PARENT else tgid
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        related = _related(pid, tgid, kind, parent)
        if related is not None:
            return related
        if over() or time.monotonic() > deadline:
            return None
        # The knob moves when the pid is allocated, a little before the
        # task shows in /proc: yield first, sleep only if it takes longer.
        polls += 1
        if polls < 50:
            os.sched_yield()
        else:
            time.sleep(0.0001)


def _related(pid, tgid, kind, parent):
    """Whether task ``pid`` is a thread of ``tgid`` (kind "tid") or a child
    of ``parent``; None if there is no such task."""
    if kind == "tid":
        if os.path.exists("/proc/%d/task/%d" % (tgid, pid)):
            return True
        return False if os.path.exists("/proc/%d" % pid) else None
    ppid = _ppid(pid)
    return None if ppid is None else ppid == parent


def _in_another_syscall(tid, nr):
    """Whether thread ``tid`` is blocked in a syscall other than ``nr``
    (/proc/TID/syscall; "running" or unreadable: not known, so no)."""
    data = _read_proc("/proc/%d/syscall" % tid, 256)
    try:
        current = int(data.split()[0])
    except (AttributeError, ValueError, IndexError):
        return False
    return current >= 0 and current != nr


def _alive(pid):
    """Whether process ``pid`` exists and is not a zombie."""
    data = _read_proc("/proc/%d/stat" % pid, 1024)
    try:
        return data.rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except (AttributeError, IndexError):
        return False


def _kill(pid):
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def _same_namespace(tgid, kind):
    try:
        return os.stat("/proc/%d/ns/%s" % (tgid, kind)).st_ino == os.stat("/proc/self/ns/" + kind).st_ino
    except OSError:
        return False


def _held_at(code, id):
    """The id of the object at ``id``'s index, -1 if free; one being removed
    right now (EIDRM: the program removes what it made at once) is gone."""
    try:
        return _sys.ipc_stat_index(code, ipc.index_of(id))
    except OSError as err:
        if err.errno != errno.EIDRM:
            raise
        return -1


def _key_exists(kind, key):
    with open("/proc/sysvipc/" + kind) as f:
        next(f)
        for line in f:
            if int(line.split()[0]) & 0xFFFFFFFF == key:
                return True
    return False


def _fd_cloexec(tgid, fd):
    try:
        with open("/proc/%d/fdinfo/%d" % (tgid, fd)) as f:
            for line in f:
                if line.startswith("flags:"):
                    return bool(int(line.split()[1], 8) & os.O_CLOEXEC)
    except OSError:
        pass
    return False


def _report(text):
    sys.stderr.write("idpin supervisor: %s\n" % text)
