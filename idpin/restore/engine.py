"""The restorer: one process that drives a restore, and the caller's handle on it.

``restore(plan, ...)`` (the caller's side) validates the plan and computes
its layout before any side effect, then forks the restorer and waits for its
verdict. The restorer (a child of the caller, killed with it through
PR_SET_PDEATHSIG) enters fresh user+pid+ipc+mount namespaces with their own
devpts (unless ``here``), opens the plan's ptys in one walk, forks the top of
the tree and the IPC worker, collects every task's report, reads /proc back
for the whole tree, and only then lets the tasks go. On any failure, and
when the caller leaves the block, it kills and reaps the whole tree and
removes what it created, then exits.

The restorer is the tree's subreaper: a task whose parent dies is
reparented to it, never to the host's init.
"""
import base64
import gc
import os
import pickle
import select
import signal
import time

from .. import _sys, ipc as idpin_ipc, pty as idpin_pty
from ..errors import IdpinError, RequestError
from ..interpose import ORIGINALS
from . import tree, workers
from .workers import FAILED, IPC_DONE, READY

# Seconds a restore may take: a base, plus this much per task and IPC object
# (generous: a loaded 2-core machine forks a Python process in ~10 ms).
BASE_TIMEOUT = 30.0
PER_ITEM_TIMEOUT = 0.05
# How often the restorer tells the caller how far it got.
PROGRESS_EVERY = 0.1
# Bounded waits of the teardown: killing and reaping 10,000 tasks on a loaded
# 2-core machine takes a while.
TEARDOWN_SECONDS = 20.0
PER_TASK_TEARDOWN = 0.02
_NEW_NAMESPACES = _sys.CLONE_NEWUSER | _sys.CLONE_NEWPID | _sys.CLONE_NEWIPC | _sys.CLONE_NEWNS
# Commands from the caller to the restorer (one byte each).
TEAR_DOWN, DETACH = b"T", b"D"


# -- the caller's side ---------------------------------------------------------

class Tree:
    """A restored tree, as the caller sees it.

    ``root``: the root's pid as seen here. ``pids``: {plan pid: pid as seen
    here} (read from /proc on first use). ``restorer``: the pid of the
    process that holds the tree (the root's parent, or the fresh
    namespaces' creator). ``report``: counts and timings.
    """

    def __init__(self, plan, fresh, restorer, to_restorer, from_restorer, info):
        self.plan = plan
        self.fresh = fresh
        self.restorer = restorer
        self._to = to_restorer
        self._from = from_restorer
        self.report = info
        self._top = info["top"]
        self._pids = None
        self._open = True

    @property
    def pids(self):
        if self._pids is None:
            if self.fresh:
                planned = {p["pid"] for p in self.plan["processes"]}
                found = _outer_pids(self._top)
                self._pids = {pid: found[pid] for pid in found if pid in planned}
            else:
                self._pids = {p["pid"]: p["pid"] for p in self.plan["processes"]}
        return self._pids

    @property
    def root(self):
        if self.fresh and self.plan["root"] == tree.INIT:
            return self._top
        return self.pids[self.plan["root"]]

    def detach(self):
        """Keep the tree running after the block; the restorer stays as its holder.

        The restorer process (``self.restorer``, a child of this process)
        exits once the tree's root has; reap it then (os.waitpid).
        """
        if self._open:
            _send(self._to, DETACH)
            idpin_pty.close_quietly(self._to, self._from)
            self._open = False

    def close(self):
        """Kill and reap the whole tree, and everything the restore created."""
        if not self._open:
            return
        self._open = False
        _send(self._to, TEAR_DOWN)
        idpin_pty.close_quietly(self._to)
        _wait_restorer(self.restorer, self._from, len(self.plan["processes"]))
        idpin_pty.close_quietly(self._from)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _send(fd, command):
    try:
        os.write(fd, command)
    except OSError:
        pass  # the restorer is gone already


def teardown_seconds(tasks):
    return TEARDOWN_SECONDS + PER_TASK_TEARDOWN * tasks


def _wait_restorer(pid, from_restorer, tasks):
    """Reap the restorer; it tears down first. Bounded: killed if it hangs."""
    deadline = time.monotonic() + teardown_seconds(tasks) + TEARDOWN_SECONDS
    while time.monotonic() < deadline:
        try:
            got, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return  # reaped already
        if got == pid:
            return
        select.select([from_restorer], [], [], 0.05)
        try:
            os.read(from_restorer, 1 << 16)
        except OSError:
            pass
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _outer_pids(top):
    """{pid in the fresh namespace: pid here}, walking the tree down from its top."""
    found = {}
    pending = [top]
    while pending:
        pid = pending.pop()
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if line.startswith("NSpid:"):
                        levels = line.split()[1:]
                        found[int(levels[-1])] = pid
                        break
            for task in os.listdir("/proc/%d/task" % pid):
                with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                    pending.extend(int(child) for child in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


class Restore:
    """The context manager ``restore()`` returns: the tree on entry, torn down on exit."""

    def __init__(self, plan, workers=1, here=False, target=None, timeout=None, progress=None):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise RequestError("workers must be an int >= 1, not %r" % (workers,))
        if target is not None and not callable(target):
            raise RequestError("target must be a callable taking the plan entry, or None")
        if progress is not None and not callable(progress):
            raise RequestError("progress must be a callable(done, total), or None")
        self.plan = checked(plan)
        self.workers = workers
        self.here = bool(here)
        self.target = target
        self.progress = progress
        items = len(self.plan["processes"]) + len(self.plan.get("ipc") or ())
        self.timeout = timeout if timeout is not None else BASE_TIMEOUT + PER_ITEM_TIMEOUT * items
        ambient = (os.getsid(0), os.getpgrp())
        self.layout = tree.layout(self.plan, workers, fresh=not self.here, ambient=ambient)
        self.tree = None

    def __enter__(self):
        self.tree = start(self)
        return self.tree

    def __exit__(self, *exc):
        if self.tree is not None:
            self.tree.close()
        return False


def checked(plan):
    """The one place a plan is validated (idpin.restore.plan), before any side effect."""
    from . import plan as plan_format

    return plan_format.load(plan)


def start(job):
    to_read, to_write = os.pipe2(os.O_CLOEXEC)
    from_read, from_write = os.pipe2(os.O_CLOEXEC)
    caller = os.getpid()
    deadline = time.monotonic() + job.timeout
    restorer = ORIGINALS["os.fork"]()
    if restorer == 0:
        status = 70
        try:
            os.close(to_write)
            os.close(from_read)
            status = Restorer(job, caller, to_read, from_write, deadline).run()
        except BaseException as err:
            _message(from_write, ("failed", "the restorer", workers._picklable(err), ""))
        finally:
            os._exit(status)
    os.close(to_read)
    os.close(from_write)
    try:
        info = _await_ready(job, restorer, from_read, deadline)
    except BaseException:
        idpin_pty.close_quietly(to_write)
        _wait_restorer(restorer, from_read, len(job.plan["processes"]))
        idpin_pty.close_quietly(from_read)
        raise
    return Tree(job.plan, not job.here, restorer, to_write, from_read, info)


def _await_ready(job, restorer, from_read, deadline):
    buffer = b""
    while True:
        ready, _, _ = select.select([from_read], [], [], max(deadline - time.monotonic() + 5, 0))
        if not ready:
            raise IdpinError("the restorer did not answer within %.0f s" % job.timeout)
        chunk = os.read(from_read, 1 << 16)
        if not chunk:
            raise IdpinError("the restorer died before the tree was verified (killed?); "
                             "everything it created went with it")
        buffer += chunk
        messages, buffer = workers.read_records(buffer)
        for message in messages:
            if message[0] == "progress" and job.progress is not None:
                job.progress(message[1], message[2])
            elif message[0] == "ready":
                return message[1]
            elif message[0] == "failed":
                _wait_restorer(restorer, from_read, len(job.plan["processes"]))
                raise _failure(*message[1:])


def _failure(where, error, child_traceback):
    if not isinstance(error, BaseException):
        error = IdpinError(str(error))
    try:
        error.entry = where
    except AttributeError:
        pass
    error.add_note("the restore failed at %s; everything it had created was torn down" % where)
    if child_traceback:
        error.add_note("--- traceback in the restore task ---\n" + child_traceback.rstrip())
    return error


def _message(fd, message):
    data = pickle.dumps(message)
    data = len(data).to_bytes(4, "little") + data
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- the restorer --------------------------------------------------------------

class Restorer:
    def __init__(self, job, caller, from_caller, to_caller, deadline):
        self.job = job
        self.plan = job.plan
        self.layout = job.layout
        self.caller = caller
        self.from_caller = from_caller
        self.to_caller = to_caller
        self.deadline = deadline
        self.fresh = not job.here
        self.children = {}          # pid here -> what it is (task pid or "ipc")
        self.top = None
        self.ipc_worker = None
        self.ipc_done = not self.plan.get("ipc")
        self.ipc_created = False
        self.timings = {}

    def run(self):
        started = time.monotonic()
        workers.arm_parent_death(self.caller)
        _sys.prctl(_sys.PR_SET_CHILD_SUBREAPER, 1)
        failure = None
        try:
            self.prepare()
            self.timings["prepare"] = time.monotonic() - started
            self.launch()
            self.collect()
            self.timings["tree"] = time.monotonic() - started
            self.verify()
            self.timings["verified"] = time.monotonic() - started
        except workers.TaskFailed as err:
            failure = (err.where, err.error)
        except Exception as err:
            failure = ("the restorer", err)
        if failure is not None:
            self.tear_down()
            where, error = failure
            _message(self.to_caller, ("failed", where, workers._picklable(error), ""))
            return 1
        info = {"top": self.top, "processes": len(self.layout.process_pids),
                "ipc": len(self.plan.get("ipc") or ()), "ptys": len(self.plan.get("ptys") or ()),
                "workers": self.job.workers, "seconds": self.timings}
        _message(self.to_caller, ("ready", info))
        os.close(self.go_write)  # every task sees EOF: go
        return self.hold()

    # -- before the first fork

    def prepare(self):
        self.keep_only_standard_fds()
        if self.fresh:
            self.enter_namespaces()
        self.pty_fds = self.open_ptys()
        self.status_read, status_write = os.pipe2(os.O_CLOEXEC)
        go_read, self.go_write = os.pipe2(os.O_CLOEXEC)
        floor = self.fd_floor()
        status_write = _lift(status_write, floor)
        go_read = _lift(go_read, floor)
        self.pty_fds = {index: (_lift(m, floor), _lift(s, floor)) for index, (m, s) in self.pty_fds.items()}
        self.ctx = workers.Context(self.layout, status_write, go_read, self.deadline, self.job.target,
                                   restorer_fds=(self.status_read, self.go_write, self.from_caller,
                                                 self.to_caller))
        self.ctx.pty_fds = self.pty_fds
        self.ctx.restorer_pid = 0 if self.fresh else os.getpid()

    def keep_only_standard_fds(self):
        # The tree must not inherit the caller's descriptors (only 0, 1, 2).
        keep = sorted({0, 1, 2, self.from_caller, self.to_caller})
        low = 0
        for fd in keep:
            if fd > low:
                os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, _fd_limit())

    def enter_namespaces(self):
        uid, gid = os.getuid(), os.getgid()
        _sys.unshare(_NEW_NAMESPACES)
        _write("/proc/self/uid_map", "0 %d 1\n" % uid)
        _write("/proc/self/setgroups", "deny\n")
        _write("/proc/self/gid_map", "0 %d 1\n" % gid)
        # Mounts made here must never propagate back.
        _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE, None)
        _sys.mount("devpts", "/dev/pts", "devpts", _sys.MS_NOSUID | _sys.MS_NOEXEC,
                   "newinstance,ptmxmode=0666,mode=0620")
        _sys.mount("/dev/pts/ptmx", "/dev/ptmx", None, _sys.MS_BIND, None)

    def open_ptys(self):
        indices = [p["index"] for p in self.plan.get("ptys") or ()]
        if not indices:
            return {}
        try:
            return idpin_pty.open_many(indices)
        except IdpinError as err:
            raise workers.TaskFailed("ptys (index %s)" % getattr(err, "id", indices), err) from None

    def fd_floor(self):
        numbers = [int(n) for p in self.plan["processes"] for n in (p.get("fds") or {})]
        return max(numbers + [9]) + 1

    # -- the tree

    def launch(self):
        # Every task is a fork of this process: with the collector off and
        # the heap frozen, no task's collection writes to pages it shares
        # (copy-on-write would copy them, thousands of times over).
        gc.disable()
        gc.freeze()
        script = self.layout.restorer
        for pid in script.standins:
            self.spawn(pid)
        for pid in script.children:
            self.top = self.spawn(pid)
        if not self.ipc_done:
            self.spawn_ipc_worker()
        os.close(self.ctx.status_fd)
        os.close(self.ctx.go_fd)
        # A pty whose master no restored process held was held outside the
        # tree (a terminal, a supervisor): the restorer holds it in its
        # place, or closing the last master would hang the slaves up.
        held = {h["pty"] for p in self.plan["processes"] for h in (p.get("fds") or {}).values()
                if h["end"] == "master"}
        self.outside_masters = []
        for index, (master, slave) in self.pty_fds.items():
            os.close(slave)
            if index in held:
                os.close(master)
            else:
                self.outside_masters.append(master)

    def spawn(self, pid):
        try:
            child = workers.fork_task(self.ctx, pid, self.layout.scripts[pid].where())
        except workers._Born as born:
            workers.serve(self.ctx, born.pid, born.work)
        self.children[child] = pid
        return child

    def spawn_ipc_worker(self):
        ctx, plan, fresh = self.ctx, self.plan, self.fresh

        def fill():
            ipc_worker(ctx, plan, fresh)
        try:
            child = workers.fork_spare(ctx, self.layout.ipc_pids, "IPC worker", fill)
        except workers._Born as born:
            workers.serve(ctx, born.pid, born.work)
        self.ipc_worker = child
        self.children[child] = "ipc"

    def collect(self):
        """Every task's report, or the first failure; bounded by the deadline."""
        expected = set(self.layout.process_pids)
        total = len(expected)
        buffer = b""
        last_progress = 0.0
        while expected or not self.ipc_done:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(expected)[:5]
                where = self.layout.scripts[missing[0]].where() if missing else "the IPC worker"
                raise workers.TaskFailed(where, IdpinError(
                    "not restored before the deadline (%d tasks missing, first %s)"
                    % (len(expected), missing)))
            ready, _, _ = select.select([self.status_read, self.from_caller], [], [],
                                        min(remaining, PROGRESS_EVERY))
            if self.from_caller in ready:
                raise workers.TaskFailed("the restorer", IdpinError("the caller went away"))
            if self.status_read in ready:
                chunk = os.read(self.status_read, 1 << 16)
                buffer += chunk
                records, buffer = workers.read_records(buffer)
                for tag, pid, payload in records:
                    if tag == READY:
                        expected.discard(pid)
                    elif tag == IPC_DONE:
                        self.ipc_created = True
                        self.ipc_done = True
                    elif tag == FAILED:
                        where, error, _ = payload
                        raise workers.TaskFailed(where, error)
            self.check_children()
            now = time.monotonic()
            if now - last_progress >= PROGRESS_EVERY:
                _message(self.to_caller, ("progress", total - len(expected), total))
                last_progress = now
        self.reap_ipc_worker()
        _message(self.to_caller, ("progress", total, total))

    def check_children(self):
        """A child of the restorer that ended: a stand-in done, or a failure."""
        while True:
            try:
                got, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if got == 0:
                return
            what = self.children.pop(got, None)
            code = os.waitstatus_to_exitcode(status)
            if what is None:
                continue  # an orphan adopted by the subreaper: its ancestor reports the cause
            if what == "ipc":
                self.ipc_worker = None
                if code != 0 and not self.ipc_done:
                    raise workers.TaskFailed("the IPC worker", IdpinError("exited with %d" % code))
                continue
            script = self.layout.scripts.get(what)
            if script is not None and script.role in ("session", "group") and code == 0:
                continue
            where = script.where() if script is not None else "pid %d" % got
            raise workers.TaskFailed(where, IdpinError(
                "ended before the restore was verified (%s %d)"
                % ("signal" if code < 0 else "status", abs(code))))

    def reap_ipc_worker(self):
        while self.ipc_worker is not None:
            if time.monotonic() > self.deadline:
                raise workers.TaskFailed("the IPC worker", IdpinError("did not exit in time"))
            self.check_children()
            time.sleep(0.001)

    # -- verification

    def verify(self):
        """Read /proc back for the whole tree and compare it with the plan."""
        for pid in self.layout.process_pids:
            script = self.layout.scripts[pid]
            _verify_process(script, self.expected_ppid(script))
        if self.fresh:
            present = {int(n) for n in os.listdir("/proc") if n.isdigit()}
            wanted = set(self.layout.process_pids) | ({tree.INIT} if tree.INIT in self.layout.scripts
                                                      and self.layout.scripts[tree.INIT].role == "init"
                                                      else set())
            extra = sorted(present - wanted)
            if extra:
                raise workers.TaskFailed("pid %d" % extra[0], IdpinError(
                    "processes %s are in the restored namespace but not in the plan" % extra[:10]))

    def expected_ppid(self, script):
        if script.parent != tree.RESTORER:
            return script.parent
        return 0 if self.fresh else os.getpid()

    # -- after go

    def hold(self):
        """Until the caller says: tear down (or went away), or detach."""
        while True:
            ready, _, _ = select.select([self.from_caller], [], [], 1.0)
            self.reap_quietly()
            if not ready:
                continue
            command = os.read(self.from_caller, 1)
            if command == DETACH:
                return self.hold_detached()
            self.tear_down()
            return 0

    def hold_detached(self):
        _sys.prctl(_sys.PR_SET_PDEATHSIG, 0)
        while True:
            try:
                os.wait()
            except ChildProcessError:
                return 0

    def reap_quietly(self):
        while True:
            try:
                got, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if got == 0:
                return
            self.children.pop(got, None)

    def tear_down(self):
        """Kill and reap everything; remove the IPC objects made here. Bounded."""
        deadline = time.monotonic() + teardown_seconds(len(self.layout.process_pids))
        if not self.fresh:
            self.let_ipc_worker_finish(deadline)
        while time.monotonic() < deadline:
            # Fresh namespaces die with their init (the top); here, the
            # restorer is the subreaper: whatever is left is its child.
            children = list(self.children) if self.fresh else _children_of(os.getpid())
            if not children:
                break
            for child in children:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.reap_quietly()
            time.sleep(0.001)
        if not self.fresh and self.ipc_created:
            for obj in self.plan.get("ipc") or ():
                try:
                    _sys.ipc_remove(_sys.IPC_KIND_CODES[obj["kind"]], obj["id"])
                except OSError:
                    pass  # removed already by the tree's own code

    def let_ipc_worker_finish(self, deadline):
        # Killed mid-way, it could leave objects in the caller's namespace: let
        # it finish (it removes its objects itself when it fails).
        while self.ipc_worker is not None and time.monotonic() < deadline:
            got, status = os.waitpid(self.ipc_worker, os.WNOHANG)
            if got:
                self.ipc_worker = None
                break
            ready, _, _ = select.select([self.status_read], [], [], 0.01)
            if ready:
                records, _ = workers.read_records(os.read(self.status_read, 1 << 16))
                if any(tag == IPC_DONE for tag, _, _ in records):
                    self.ipc_created = True


def _children_of(pid):
    children = []
    for task in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                children.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return children


def _verify_process(script, ppid):
    pid, entry = script.pid, script.entry
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        raise workers.TaskFailed(script.where(), IdpinError("no process %d after the restore" % pid))
    fields = stat.rsplit(b")", 1)[1].split()
    state, got = fields[0], tuple(int(v) for v in fields[1:4])
    threads = int(fields[17])
    wanted = (ppid, entry["pgid"], entry["sid"])
    if state in (b"Z", b"X") or got != wanted:
        raise workers.TaskFailed(script.where(), IdpinError(
            "read back ppid %d, pgid %d, sid %d (state %s); the plan has %d, %d, %d"
            % (got + (state.decode(),) + wanted)))
    tids = entry.get("tids") or [pid]
    if threads != len(tids) or (len(tids) > 1 and sorted(
            int(t) for t in os.listdir("/proc/%d/task" % pid)) != sorted(tids)):
        raise workers.TaskFailed(script.where(), IdpinError(
            "read back threads %s; the plan has %s"
            % (sorted(int(t) for t in os.listdir("/proc/%d/task" % pid)), sorted(tids))))
    for number, held in (entry.get("fds") or {}).items():
        _verify_fd(script, int(number), held)


def _verify_fd(script, number, held):
    path = "/proc/%d/fd/%d" % (script.pid, number)
    try:
        target = os.readlink(path)
        if held["end"] == "slave":
            ok = target == "/dev/pts/%d" % held["pty"]
        else:
            ok = _fdinfo_tty_index(script.pid, number) == held["pty"]
    except FileNotFoundError:
        target, ok = "nothing", False
    if not ok:
        raise workers.TaskFailed(script.where(), IdpinError(
            "fd %d is %s, not the %s of pty %d" % (number, target, held["end"], held["pty"])))


def _fdinfo_tty_index(pid, number):
    with open("/proc/%d/fdinfo/%d" % (pid, number)) as f:
        for line in f:
            if line.startswith("tty-index:"):
                return int(line.split()[1])
    return None


def ipc_worker(ctx, plan, fresh):
    """Create the plan's SysV objects with their ids (one create_many) and fill them."""
    workers.arm_parent_death(ctx.restorer_pid)
    for fd in ctx.restorer_fds + (ctx.go_fd,):
        os.close(fd)
    for master, slave in ctx.pty_fds.values():
        os.close(master)
        os.close(slave)
    if fresh:
        _wait_for_own_proc(ctx)
    objects = plan["ipc"]
    specs = [idpin_ipc.Spec(o["kind"], o["id"], o.get("key", 0), _size_of(o), o.get("mode", 0o600))
             for o in objects]
    try:
        idpin_ipc.create_many(specs)
    except IdpinError as err:
        raise workers.TaskFailed(_ipc_where(objects, err), err) from None
    try:
        for index, obj in enumerate(objects):
            _fill(index, obj)
    except BaseException:
        for obj in objects:
            try:
                _sys.ipc_remove(_sys.IPC_KIND_CODES[obj["kind"]], obj["id"])
            except OSError:
                pass
        raise
    workers.report(ctx, IPC_DONE, os.getpid(), len(objects))


def _ipc_where(objects, err):
    for index, obj in enumerate(objects):
        if obj["id"] == getattr(err, "id", None) and obj["kind"] == getattr(err, "kind", None):
            return "ipc[%d] (%s %d)" % (index, obj["kind"], obj["id"])
    return "ipc"


def _size_of(obj):
    if obj["kind"] == "sem":
        return obj["nsems"]
    if obj["kind"] == "shm":
        return obj["size"]
    return 0


def _fill(index, obj):
    try:
        if obj["kind"] == "sem" and obj.get("values"):
            _sys.ipc_sem_setall(obj["id"], obj["values"])
        elif obj["kind"] == "msg":
            for message in obj.get("messages") or ():
                _sys.ipc_msg_send(obj["id"], message["type"], base64.b64decode(message["data"]))
        elif obj["kind"] == "shm" and obj.get("data"):
            data = base64.b64decode(obj["data"])
            if len(data) > obj["size"]:
                raise RequestError("%d bytes of data do not fit a %d-byte segment"
                                   % (len(data), obj["size"]))
            _sys.ipc_shm_write(obj["id"], data)
    except (OSError, RequestError, OverflowError) as err:
        raise workers.TaskFailed("ipc[%d] (%s %d)" % (index, obj["kind"], obj["id"]), err) from None


def _wait_for_own_proc(ctx):
    # The top task mounts the fresh namespace's /proc; until then this
    # process has no /proc/self (idpin's locks live there).
    while True:
        try:
            os.readlink("/proc/self")
            return
        except OSError:
            pass
        if ctx.remaining() <= 0:
            raise workers.TaskFailed("the IPC worker", IdpinError("/proc was not mounted in time"))
        time.sleep(0.0005)


def _lift(fd, floor):
    """Move ``fd`` to a number >= floor, so the tree can dup2 onto lower numbers freely."""
    import fcntl

    lifted = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
    os.close(fd)
    return lifted


def _fd_limit():
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 65536


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
