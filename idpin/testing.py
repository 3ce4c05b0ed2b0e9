"""Run code in fresh namespaces, where exact ids can be asserted.

``run_in_namespaces(fn, ...)`` forks; the child enters new user, pid, IPC
and mount namespaces (mapping the caller's uid to root there), forks again so
that ``fn`` runs as pid 1 with its own /proc and its own devpts instance
(/dev/ptmx bound to it), and sends the outcome back pickled over a pipe. The
caller gets fn's return value, or fn's exception re-raised with the child's
traceback as a note. Nothing of the host is changed: every write (knobs,
mounts) happens inside the new namespaces, which die with pid 1.

By default it then checks that ``fn`` left nothing behind: no other process,
no IPC object, no armed knob, no pty, no new fd, no idpin lock held.

The test suite runs every test this way; users can call it to try their
restore code without touching their system.
"""
import os
import pickle
import select
import signal
import time
import traceback
from collections.abc import Callable
from typing import IO, Any, NoReturn, TypeVar

from . import _sys, knobs
from .interpose import ORIGINALS

NOBODY = 65534
T = TypeVar("T")
_NEW_NAMESPACES = _sys.CLONE_NEWUSER | _sys.CLONE_NEWPID | _sys.CLONE_NEWIPC | _sys.CLONE_NEWNS


class ChildError(RuntimeError):
    """The namespace child failed outside fn, or died without reporting."""


def run_in_namespaces(fn: Callable[..., T], *args: Any, uid: int | None = None, userns: bool = True,
                      backend: str | None = None, check_leaks: bool = True, timeout: float = 120.0,
                      **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` as pid 1 of fresh namespaces; return its result.

    Needs no privilege: the caller's uid becomes root of the new user
    namespace (where unprivileged user namespaces are enabled).
    uid: the host uid the child switches to before creating its user
    namespace (None: stay the caller's; e.g. NOBODY, from root, for the
    unprivileged path).
    userns=False runs fn in a plain forked child with the host's namespaces,
    for code that must see the host's refusals (only sensible with uid != 0).
    backend: "cython" or "ctypes" to force idpin._sys's backend in the child.
    """
    if uid is not None and uid != os.getuid() and os.geteuid() != 0:
        raise PermissionError("run_in_namespaces(uid=%d) needs root to switch to that uid; "
                              "leave uid unset to run as yourself (uid %d)" % (uid, os.getuid()))
    read_end, write_end = os.pipe()
    middle = ORIGINALS["os.fork"]()
    if middle == 0:
        os.close(read_end)
        _middle(write_end, fn, args, kwargs, uid, userns, backend, check_leaks)
    os.close(write_end)
    try:
        outcome = _collect(read_end, middle, timeout)
    finally:
        os.close(read_end)
    return _unpack(outcome)


def _middle(write_end: int, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
            uid: int | None, userns: bool, backend: str | None, check_leaks: bool) -> NoReturn:
    status = 70
    try:
        if backend is not None:
            _sys.use(backend)
        if uid is not None and uid != os.getuid():
            _preload()
            _become(uid)
        if not userns:
            _report(write_end, ("pid", os.getpid()))
            _run_body(write_end, fn, args, kwargs, backend, check_leaks=False)
            status = 0
        else:
            _enter_namespaces()
            go_read, go_write = os.pipe()
            init = ORIGINALS["os.fork"]()
            if init == 0:
                # Report only after the middle has: two writers would interleave.
                os.close(go_write)
                os.read(go_read, 1)
                os.close(go_read)
                _init(write_end, fn, args, kwargs, backend, check_leaks)
            os.close(go_read)
            _report(write_end, ("pid", init))
            os.close(go_write)
            _, wait_status = os.waitpid(init, 0)
            status = os.waitstatus_to_exitcode(wait_status) & 0xFF
    except BaseException as err:
        _report(write_end, ("setup-error", "%s: %s" % (type(err).__name__, err), traceback.format_exc()))
    finally:
        os._exit(status)


def _preload() -> None:
    # After dropping root the child may not be able to read the installation
    # (e.g. under a 0700 /root): import now what idpin and its tests load lazily.
    import importlib
    import pkgutil

    import idpin

    for module in pkgutil.walk_packages(idpin.__path__, "idpin."):
        # Not the benchmarks: their plotting imports start threads, and a
        # multi-threaded process cannot create a user namespace.
        if module.name != "idpin.__main__" and not module.name.startswith("idpin.bench"):
            try:
                importlib.import_module(module.name)
            except ImportError:
                pass  # the other backend, when it was not built
    for name in ("tempfile", "resource", "ctypes", "errno", "pickle", "sysv_ipc"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    # The plan schema is a data file, and jsonschema imports parts of itself
    # on first use: validate a small plan once, while the files are readable.
    from .restore import plan

    plan.load({"idpin_plan": 1, "root": 1, "processes": [
        {"pid": 1, "ppid": 0, "pgid": 1, "sid": 1, "tids": [1]}]})


def _become(uid: int) -> None:
    if _setgroups_allowed():
        os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    # Changing credentials clears "dumpable", which makes /proc/self/*_map
    # root-owned: the child could not map itself in its user namespace.
    _sys.prctl(_sys.PR_SET_DUMPABLE, 1)


def _setgroups_allowed() -> bool:
    # Inside a user namespace whose setgroups is denied, the supplementary
    # groups are fixed: setgroups fails with EPERM even for its root.
    try:
        with open("/proc/self/setgroups") as f:
            return f.read().strip() != "deny"
    except FileNotFoundError:
        return True


def _enter_namespaces() -> None:
    uid, gid = os.getuid(), os.getgid()
    try:
        _sys.unshare(_NEW_NAMESPACES)
    except PermissionError as err:
        raise PermissionError(err.errno, (
            "uid %d may not create user namespaces here: unprivileged user namespaces are "
            "disabled (e.g. sysctl user.max_user_namespaces=0, kernel.unprivileged_userns_clone=0 "
            "or an AppArmor restriction); run as root, or enable them" % uid)) from err
    _write("/proc/self/uid_map", "0 %d 1\n" % uid)
    _write("/proc/self/setgroups", "deny\n")
    _write("/proc/self/gid_map", "0 %d 1\n" % gid)
    # Mounts made here must never propagate back to the host.
    _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE, None)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _init(write_end: int, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
          backend: str | None, check_leaks: bool) -> NoReturn:
    status = 71
    try:
        mount_proc_and_devpts()
        _run_body(write_end, fn, args, kwargs, backend, check_leaks)
        status = 0
    except BaseException as err:
        _report(write_end, ("setup-error", "%s: %s" % (type(err).__name__, err), traceback.format_exc()))
    finally:
        os._exit(status)


def mount_proc_and_devpts() -> None:
    """In the init of fresh pid+mount namespaces: its own /proc and devpts."""
    flags = _sys.MS_NOSUID | _sys.MS_NODEV | _sys.MS_NOEXEC
    _sys.mount("proc", "/proc", "proc", flags, None)
    _sys.mount("devpts", "/dev/pts", "devpts", _sys.MS_NOSUID | _sys.MS_NOEXEC,
               "newinstance,ptmxmode=0666,mode=0620")
    _sys.mount("/dev/pts/ptmx", "/dev/ptmx", None, _sys.MS_BIND, None)


def enter_namespaces() -> None:
    """unshare user+pid+ipc+mount (this uid as root there), mounts private.

    The caller must be single-threaded; its next child is the new pid
    namespace's init, which calls mount_proc_and_devpts().
    """
    _enter_namespaces()


def _run_body(write_end: int, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
              backend: str | None, check_leaks: bool) -> None:
    if backend is not None:
        _sys.use(backend)
    fds_before = _open_fds()
    try:
        result = fn(*args, **kwargs)
    except BaseException as err:
        _report(write_end, ("raised", _picklable(err), traceback.format_exc()))
        return
    if check_leaks:
        left = leftovers(fds_before)
        if left:
            _report(write_end, ("leaked", left))
            return
    _report(write_end, ("returned", result))


def _open_fds() -> set[int]:
    listed = set(int(fd) for fd in os.listdir("/proc/self/fd"))
    # One of them was listdir's own, closed by now.
    return {fd for fd in listed if _is_open(fd)}


def open_fds() -> set[int]:
    """This process's open fds, less the ones idpin keeps open on purpose."""
    return _open_fds() - knobs.cached_fds()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def leftovers(fds_before: set[int] | None = None) -> list[str]:
    """What the code run in this namespace left behind, as readable lines."""
    found = []
    others = sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid())
    if others:
        found.append("processes %s (children not reaped, or still running)" % others)
    for kind in ("sem", "shm", "msg"):
        with open("/proc/sysvipc/" + kind) as f:
            objects = [line.split()[1] for line in f.readlines()[1:]]
        if objects:
            found.append("%s objects with ids %s" % (kind, ", ".join(objects)))
        with open("/proc/sys/kernel/%s_next_id" % kind) as f:
            value = int(f.read())
        if value != -1:
            found.append("%s_next_id left armed at %d" % (kind, value))
    ptys = sorted(int(n) for n in os.listdir("/dev/pts") if n.isdigit())
    if ptys:
        found.append("pty indices %s still open" % ptys)
    if knobs.any_held():
        found.append("idpin namespace locks still held")
    for name in records_left():
        found.append("idpin's record %s (a POSIX message queue) left" % name)
    if fds_before is not None:
        # idpin keeps one namespace file and its knobs open per namespace.
        new = sorted(_open_fds() - fds_before - knobs.cached_fds())
        if new:
            found.append("file descriptors left open: %s" % ", ".join(
                "%d -> %s" % (fd, _fd_target(fd)) for fd in new))
    return found


def records_left() -> list[str]:
    """idpin's records (POSIX message queues, which outlive processes) left in this namespace.

    A holder killed while holding idpin's lock leaves its record for the next
    holder to act on: so this takes the locks as the next idpin user would,
    and reports what is still there after that (and any record this process
    itself still claims).
    """
    from . import ipc, pids

    names = [ipc.LIMITS_RECORD, ipc.CONSUMING_RECORD,
             pids.cursor_record_name(os.stat("/proc/self/ns/pid").st_ino)]
    if not any(_sys.record_exists(name) for name in names):
        return []
    mine = knobs.existing_namespace_lock("pid")
    if mine is not None and mine.cursor_record is not None:
        return ["%s (claimed by this process, which holds no lock)" % names[-1]]
    with ipc.ipc_lock().held():  # the pid lock first, then the IPC lock: both clean up
        pass
    left = [name for name in names if _sys.record_exists(name)]
    for name in left:
        _sys.record_remove(name)
    return left


def _fd_target(fd: int) -> str:
    try:
        return os.readlink("/proc/self/fd/%d" % fd)
    except OSError:
        return "?"


def _picklable(err: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return ChildError("%s: %s (not picklable)" % (type(err).__name__, err))


def _report(write_end: int, message: tuple[Any, ...]) -> None:
    data = pickle.dumps(message)
    os.write(write_end, len(data).to_bytes(8, "little"))
    view = memoryview(data)
    while view:
        written = os.write(write_end, view)
        view = view[written:]


def _collect(read_end: int, middle: int, timeout: float) -> tuple[Any, ...]:
    """Read the child's messages until EOF or timeout; kill what we started on timeout."""
    deadline = time.monotonic() + timeout
    buffer = b""
    init = None
    while True:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([read_end], [], [], max(remaining, 0))
        if not ready:
            _kill_started(middle, init)
            raise ChildError("the namespace child did not finish within %.0f s; killed" % timeout)
        chunk = os.read(read_end, 1 << 16)
        if not chunk:
            break
        buffer += chunk
        messages, buffer = _split(buffer)
        for message in messages:
            if message[0] == "pid":
                init = message[1]
            else:
                outcome = message
    _, status = os.waitpid(middle, 0)
    try:
        return outcome
    except NameError:
        raise ChildError(
            "the namespace child exited (status %d) without reporting" % os.waitstatus_to_exitcode(status)
        ) from None


def _split(buffer: bytes) -> tuple[list[tuple[Any, ...]], bytes]:
    messages = []
    while len(buffer) >= 8:
        size = int.from_bytes(buffer[:8], "little")
        if len(buffer) < 8 + size:
            break
        messages.append(pickle.loads(buffer[8 : 8 + size]))
        buffer = buffer[8 + size :]
    return messages, buffer


def _kill_started(middle: int, init: int | None) -> None:
    for pid in (init, middle):
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    os.waitpid(middle, 0)


def _unpack(outcome: tuple[Any, ...]) -> Any:
    tag = outcome[0]
    if tag == "returned":
        return outcome[1]
    if tag == "raised":
        err, child_traceback = outcome[1], outcome[2]
        err.add_note("--- traceback in the namespace child ---\n" + child_traceback.rstrip())
        raise err
    if tag == "leaked":
        raise AssertionError("left behind: " + "; ".join(outcome[1]))
    raise ChildError("namespace setup failed: %s\n%s" % (outcome[1], outcome[2]))


class Forker:
    """A non-cooperating process that forks and reaps children in a loop.

    It never takes idpin's lock, like any program that forks on its own, so
    it races every ns_last_pid write. The pids its children got are logged;
    ``stop()`` ends it (it also ends by itself after ``max_seconds``) and
    returns them. Use it as a context manager around the code under test.
    """

    def __init__(self, max_seconds: float = 60.0) -> None:
        self.max_seconds = max_seconds
        self.pid: int | None = None
        self.children: list[int] = []
        self._log: IO[bytes]

    def __enter__(self) -> "Forker":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        import tempfile

        self._log = tempfile.TemporaryFile()
        self._stop_read, self._stop_write = os.pipe()
        ready_read, ready_write = os.pipe()
        self.pid = ORIGINALS["os.fork"]()
        if self.pid == 0:
            os.close(ready_read)
            self._loop(ready_write)
        os.close(ready_write)
        os.read(ready_read, 1)  # wait until it is forking
        os.close(ready_read)

    def _loop(self, ready_write: int) -> NoReturn:
        try:
            fork = ORIGINALS["os.fork"]
            deadline = time.monotonic() + self.max_seconds
            log = self._log.fileno()
            os.write(ready_write, b"1")
            while time.monotonic() < deadline:
                if select.select([self._stop_read], [], [], 0)[0]:
                    break
                child = fork()
                if child == 0:
                    os._exit(0)
                os.waitpid(child, 0)
                os.write(log, child.to_bytes(4, "little"))
        finally:
            os._exit(0)

    def stop(self) -> list[int]:
        if self.pid is None:
            return self.children
        os.write(self._stop_write, b"x")
        os.waitpid(self.pid, 0)
        for fd in (self._stop_read, self._stop_write):
            os.close(fd)
        self._log.seek(0)
        raw = self._log.read()
        self._log.close()
        self.children = [int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), 4)]
        self.pid = None
        return self.children
