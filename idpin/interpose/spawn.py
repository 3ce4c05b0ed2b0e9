"""Stdlib process creation in a pid request block.

Inside ``with idpin.request(pid=N):`` the first process this thread creates
through ``subprocess`` (Popen and everything built on it), ``os.posix_spawn``,
``os.posix_spawnp`` or ``os.system`` gets pid N, or the call raises
IdBusyError. ``os.spawn*`` and ``pty.spawn`` fork through the routed
``os.fork`` already. With no pid pending, each route costs one thread-local
check before the stdlib's own C function.

Why the stdlib's own child code cannot be kept: _posixsubprocess,
posix_spawn and system() create their process with glibc's fork, vfork or
clone(CLONE_VFORK), none of which takes set_tid. The only way to steer them
is the ns_last_pid knob, and a child born with the wrong pid would run the
program before anyone could look at it (a vfork child runs until exec while
its parent is suspended; without a preexec_fn nothing of ours runs in it).

So the process is made by idpin's pinned fork (``pids.pinned_fork``): clone3
with set_tid in a single-threaded process (exact by construction, no lock),
glibc's fork with the knob under the pid lock in a multi-threaded one (a
child born with the wrong pid exits inside pids before returning here, and
is killed and reaped). The child then does, in the same order, what the
stdlib's child would have done, and execs:

- subprocess: _posixsubprocess's child steps (fds to keep made inheritable,
  the parent's pipe ends closed, stdio dup2'd, cwd, umask, restore_signals,
  setsid, process_group, groups/gid/uid, preexec_fn, close_fds, the exec
  over executable_list); a failure is written to Popen's error pipe in
  _posixsubprocess's "Name:hexerrno:" format, so Popen raises what it
  always raises (FileNotFoundError for a missing program, with "noexec"
  marking a failure before exec, e.g. in chdir).
- posix_spawn(p): glibc's child steps (handlers reset, setsigdef, scheduler,
  setsid, setpgroup, resetids, the file actions in order, the signal mask,
  the exec; posix_spawnp searches the caller's PATH like glibc); a failure
  is reported and the child reaped before the call raises OSError with the
  path as filename, as posix_spawn does.
- system: glibc's system(): SIGINT and SIGQUIT ignored (process-wide,
  counted across concurrent callers) and SIGCHLD blocked in the calling
  thread while it waits, Python's signal handlers run once it returns;
  ``sh -c command`` with SIGINT/SIGQUIT back to default and the caller's
  signal mask; the wait status is returned, 127 << 8 when the shell could
  not be run.

Every argument is checked in the parent before the fork, raising the
stdlib's exception types, so a bad call leaves the request pending and
creates nothing.

Only a process that execs consumes the request: the parent waits until the
child has exec'd (a close-on-exec pipe of ours reaches EOF) or reported a
failure (a failed exec leaves the request pending, like a fork that
raised). All signals are blocked in the caller from just before the fork
until the child's pid is in hand (as glibc's posix_spawn blocks them around
its clone), so a raising handler cannot strand a child; an exception while
waiting for the exec kills and reaps the child before it propagates.

Differences from the originals:

- The child is a full fork through CPython's fork protocol where the
  stdlib uses vfork: ``os.register_at_fork`` hooks run (as they do for a
  preexec_fn), and the caller's page tables are copied (a vfork-style
  clone3 with set_tid doing these steps in C, in _sys, would avoid that).
  The garbage collector is off in the child, so no finalizer of the
  parent's objects runs there.
- glibc's posix_spawn child leaves glibc's two internal signals (32, 33)
  ignored in the program; a pinned child leaves them as the caller had
  them (glibc programs install their own handlers for both at startup).
- An environment entry that is not ``name=value`` with a non-empty name
  (the stdlib passes it through to execve) is refused with ValueError:
  os.execve, which the child uses, takes a mapping.
- SIGINT/SIGQUIT are saved and put back by a count of pinned system()
  callers; glibc keeps its own count for the stock system(). A stock
  os.system in another thread overlapping a pinned one can therefore see
  the other's SIG_IGN as the disposition to restore (glibc's count has the
  same hazard against any code that changes these signals meanwhile).
- Unpinned calls are the stdlib's own, unsteered: inside another thread's
  tid block, a subprocess that asked for nothing can take the armed tid (as
  a fork from C code can).
"""
import collections.abc
import contextlib
import errno
import fcntl
import gc
import operator
import os
import signal
import sys
import threading
from typing import Any
# signal.pthread_sigmask converts every signal of the returned set to an
# enum member: a millisecond per call on a loaded machine, twice per spawn.
# _signal's is the same C function without the conversion.
from _signal import pthread_sigmask as _pthread_sigmask

from .. import _sys, pids, signals
from ..errors import UnsupportedError
from ..request import consume, pending
from . import ORIGINALS

# _posixsubprocess's exit status after reporting on Popen's error pipe.
SUBPROCESS_FAILED_EXIT = 255
# glibc's posix_spawn child exit status when it could not exec; system()
# returns this as the shell's exit status when the shell could not be run.
SPAWN_FAILED_EXIT = 127
SHELL = b"/bin/sh"
# glibc's default search path for posix_spawnp when PATH is unset.
DEFAULT_PATH = b"/bin:/usr/bin"
# Errors after which glibc's posix_spawnp tries the next PATH entry.
_TRY_NEXT_DIRECTORY = frozenset((errno.ENOENT, errno.ESTALE, errno.ENOTDIR, errno.ENODEV,
                                 errno.ETIMEDOUT))
_SIGNALS = sorted(set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP})
_NSIG = signal.NSIG
_ALL_SIGNALS = set(signal.valid_signals())
_SPAWN_KEYWORDS = ("file_actions", "setpgroup", "resetids", "setsid", "setsigmask", "setsigdef",
                   "scheduler")



# ------------------------------------------------------------------ routes

# A held signal's handler raising as a process creation returns: the caller
# never gets the process, so it is killed and reaped (and a pid request that
# was credited with it is pending again).
@signals.door(undo=pids.undo_fork)
def fork_exec(*args):
    found = pending("pid")
    if found is None:
        return ORIGINALS["subprocess._fork_exec"](*args)
    return create_pinned(found, PopenChild(args)).pid


@signals.door(undo=pids.undo_fork)
def posix_spawn(*args, **kwargs):
    found = pending("pid")
    if found is None:
        return ORIGINALS["os.posix_spawn"](*args, **kwargs)
    child = SpawnChild("posix_spawn", args, kwargs, search=False)
    sys.audit("os.posix_spawn", *args)
    return _spawn_or_raise(found, child)


@signals.door(undo=pids.undo_fork)
def posix_spawnp(*args, **kwargs):
    found = pending("pid")
    if found is None:
        return ORIGINALS["os.posix_spawnp"](*args, **kwargs)
    child = SpawnChild("posix_spawnp", args, kwargs, search=True)
    sys.audit("os.posix_spawn", *args)
    return _spawn_or_raise(found, child)


@signals.door()  # the command has run: handlers run after, as after os.system
def system(command):
    found = pending("pid")
    if found is None:
        return ORIGINALS["os.system"](command)
    return _system_pinned(found, command)


_route: Any
for _route, _original in ((fork_exec, "subprocess._fork_exec"), (posix_spawn, "os.posix_spawn"),
                          (posix_spawnp, "os.posix_spawnp"), (system, "os.system")):
    _route.__doc__ = "%s, routed through idpin (see idpin.interpose.spawn)." % _original
    _route.__wrapped__ = ORIGINALS[_original]


# ------------------------------------------------------------------ the pinned process


class Created:
    __slots__ = ("pid", "error")

    def __init__(self, pid, error):
        self.pid = pid
        self.error = error  # None once the child exec'd, else the errno it failed with


def create_pinned(found, child):
    """Create the process with the pending pid and have it run ``child.run``.

    Returns once the child has exec'd (the request is then consumed) or has
    reported a failure (the request stays pending; the failed child is left
    for the caller to reap, as the stdlib leaves it for Popen).
    """
    req, value = found
    ready_read, ready_write = _exec_report_pipe()
    pid = 0
    try:
        with _all_signals_blocked() as mask:
            pid = pids.pinned_fork(value)
            if pid == 0:
                _in_child(child, mask, ready_read, ready_write)
            os.close(ready_write)
            ready_write = -1
        # Held signals are handled here, when the mask is restored, or
        # while waiting: either way the child is undone before they propagate.
        error = _read_exec_report(ready_read)
    except BaseException:
        if pid > 0:
            _kill_and_reap(pid)
        raise
    finally:
        for fd in (ready_read, ready_write):
            if fd >= 0:
                os.close(fd)
    if error is None:
        consume(req, "pid", value)
    return Created(pid, error)


@contextlib.contextmanager
def _all_signals_blocked():
    # A raising handler between the fork and ``pid`` being held here would
    # strand the child; held signals are handled once the pid is ours.
    mask = _pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
    try:
        yield mask
    finally:
        _pthread_sigmask(signal.SIG_SETMASK, mask)


def _exec_report_pipe():
    # The write end must not be one of the descriptors the child moves
    # stdio onto (0-2): a caller may have closed them.
    read_end, write_end = os.pipe()
    if write_end < 3:
        moved = fcntl.fcntl(write_end, fcntl.F_DUPFD_CLOEXEC, 3)
        os.close(write_end)
        write_end = moved
    return read_end, write_end


def _read_exec_report(fd):
    """None when the child exec'd (EOF, nothing written), else its errno."""
    data = b""
    while True:
        chunk = os.read(fd, 16)
        if not chunk:
            break
        data += chunk
    if not data:
        return None
    return int.from_bytes(data[1:5], "little")


def _in_child(child, mask, ready_read, ready_write):
    """The new process: run the child's steps and exec; never returns."""
    code = errno.EINVAL
    child.report_fd = ready_write
    try:
        # No finalizer of the parent's objects may run here: one could
        # flush a buffer into a pipe the parent still writes to.
        gc.disable()
        os.close(ready_read)
        code = child.run(mask)
    finally:
        # Reached only when the exec failed (or never happened): say so
        # before exiting, so the parent does not count it as run.
        _write_all(child.report_fd, b"F" + code.to_bytes(4, "little"))
        os._exit(child.exit_status)


def _write_all(fd, data):
    while data:
        try:
            data = data[os.write(fd, data):]
        except OSError:
            return


def _kill_and_reap(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def _unblock(mask):
    _pthread_sigmask(signal.SIG_SETMASK, mask)


def _reset_caught_signals():
    """Handlers of the parent must not run in the child: caught signals back to SIG_DFL.

    (Ignored and default dispositions survive exec as they are.)
    """
    for sig in _SIGNALS:
        try:
            handler, _ = _sys.sigaction(sig, None)
        except OSError:
            continue  # a signal the C library keeps for itself
        if handler not in (signal.SIG_DFL, signal.SIG_IGN):
            _sys.sigaction(sig, signal.SIG_DFL)


def _close_fds_except(keep):
    """Close every descriptor >= 3 not in ``keep`` (close_fds=True)."""
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        open_fds = range(3, os.sysconf("SC_OPEN_MAX"))
    for fd in open_fds:
        if fd >= 3 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _fsencode_arg(value):
    encoded = os.fsencode(value)
    if b"\0" in encoded:
        raise ValueError("embedded null byte")
    return encoded


def _env_mapping(entries):
    """A ``name=value`` byte list as the mapping os.execve takes."""
    env = {}
    for entry in entries:
        if not isinstance(entry, bytes):
            raise TypeError("expected bytes, %s found" % type(entry).__name__)
        name, sep, value = entry.partition(b"=")
        if not sep or not name or b"\0" in entry:
            raise ValueError("illegal environment variable name")
        env[name] = value
    return env


# ------------------------------------------------------------------ subprocess


class PopenChild:
    """The arguments of _posixsubprocess.fork_exec, checked, and its child's steps."""

    exit_status = SUBPROCESS_FAILED_EXIT
    report_fd = -1

    def __init__(self, args):
        # CPython 3.11 and 3.12 pass 23 arguments, the last allow_vfork
        # (never used here: ignored); 22 is the same list without it.
        if len(args) not in (22, 23):
            raise UnsupportedError(
                "this Python's _posixsubprocess.fork_exec takes %d arguments; idpin knows the "
                "3.11-3.13 forms (22 or 23): a pinned subprocess needs that form" % len(args),
                kind="pid",
            )
        (argv, executable_list, self.close_fds, keep, cwd, env,
         self.p2cread, self.p2cwrite, self.c2pread, self.c2pwrite, self.errread, self.errwrite,
         self.errpipe_read, self.errpipe_write, self.restore_signals, self.call_setsid,
         pgid, gid, groups, uid, umask, self.preexec_fn) = args[:22]
        self.close_fds = bool(self.close_fds)
        if self.close_fds and self.errpipe_write < 3:
            raise ValueError("errpipe_write must be >= 3")
        self.keep = self._fds_to_keep(keep)
        self.executables = [self._bytes(item) for item in executable_list]
        self.argv = None if argv is None else [_fsencode_arg(arg) for arg in argv]
        self.env = None if env is None else _env_mapping(env)
        self.cwd = None if cwd is None else _fsencode_arg(cwd)
        self.groups = self._groups(groups)
        self.gid = -1 if gid is None else operator.index(gid)
        self.uid = -1 if uid is None else operator.index(uid)
        self.pgid = operator.index(pgid)
        self.umask = operator.index(umask)
        self.restore_signals = bool(self.restore_signals)
        self.call_setsid = bool(self.call_setsid)
        if self.preexec_fn is not None and not callable(self.preexec_fn):
            raise TypeError("preexec_fn must be callable or None")

    @staticmethod
    def _fds_to_keep(keep):
        if not isinstance(keep, tuple):
            raise TypeError("fork_exec() argument 4 must be tuple, not %s" % type(keep).__name__)
        previous = -1
        for fd in keep:
            if not isinstance(fd, int) or fd < 0 or fd <= previous or fd > 0x7FFFFFFF:
                raise ValueError("bad value(s) in fds_to_keep")
            previous = fd
        return keep

    @staticmethod
    def _bytes(item):
        if not isinstance(item, bytes):
            raise TypeError("expected bytes, %s found" % type(item).__name__)
        return item

    @staticmethod
    def _groups(groups):
        if groups is None:
            return None
        if not isinstance(groups, list):
            raise TypeError("setgroups argument must be a list")
        if len(groups) > os.sysconf("SC_NGROUPS_MAX"):
            raise ValueError("too many extra_groups")
        for gid in groups:
            if not isinstance(gid, int):
                raise TypeError("extra_groups must be integers")
        return groups

    def run(self, mask):
        """_posixsubprocess's child steps; returns the errno reported if it could not exec."""
        reached_preexec = False
        message = ""
        code = 0
        try:
            if self.preexec_fn is not None:
                # The stdlib forks without blocking signals when it calls a
                # preexec_fn: it runs with the caller's signal handling.
                _unblock(mask)
            for fd in self.keep:
                if fd != self.errpipe_write:
                    os.set_inheritable(fd, True)
            for fd in (self.p2cwrite, self.c2pread, self.errread):
                if fd != -1:
                    os.close(fd)
            os.close(self.errpipe_read)
            self._stdio()
            if self.cwd is not None:
                os.chdir(self.cwd)
            if self.umask >= 0:
                os.umask(self.umask)
            if self.restore_signals:
                for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ"):
                    if hasattr(signal, name):
                        _sys.sigaction(getattr(signal, name), signal.SIG_DFL)
            if self.preexec_fn is None:
                _reset_caught_signals()
                _unblock(mask)
            if self.call_setsid:
                os.setsid()
            if self.pgid >= 0:
                os.setpgid(0, self.pgid)
            if self.groups is not None:
                # An empty list clears the groups (CVE-2023-6507: 3.12.0 skipped it).
                os.setgroups(self.groups)
            if self.gid != -1:
                os.setregid(self.gid, self.gid)
            if self.uid != -1:
                os.setreuid(self.uid, self.uid)
            reached_preexec = True
            if self.preexec_fn is not None:
                try:
                    self.preexec_fn()
                except BaseException:
                    message = "Exception occurred in preexec_fn."
                    raise _PreexecFailed() from None
            if self.close_fds:
                _close_fds_except(set(self.keep) | {self.report_fd})
            code = self._exec()
        except _PreexecFailed:
            code = 0
        except OSError as err:
            code = err.errno or 0
        except BaseException as err:  # noqa: B902 - reported to the parent, as the stdlib reports
            code = 0
            message = "%s: %s" % (type(err).__name__, err)
        if code:
            record = "OSError:%x:%s" % (code, "" if reached_preexec else "noexec")
        else:
            record = "SubprocessError:0:" + message
        _write_all(self.errpipe_write, record.encode())
        return code

    def _stdio(self):
        # A pipe end that is itself one of 0-2 must be moved out of the way
        # before the dup2 that would overwrite it.
        c2pwrite, errwrite = self.c2pwrite, self.errwrite
        if c2pwrite == 0:
            c2pwrite = os.dup(c2pwrite)
        while errwrite in (0, 1):
            errwrite = os.dup(errwrite)
        for fd, target in ((self.p2cread, 0), (c2pwrite, 1), (errwrite, 2)):
            if fd == target:
                os.set_inheritable(fd, True)  # dup2 onto itself would not clear CLOEXEC
            elif fd != -1:
                os.dup2(fd, target)

    def _exec(self):
        # The first error that is not "not here" wins, as in os._execvpe.
        first = 0
        last = errno.ENOENT
        for executable in self.executables:
            try:
                if self.env is None:
                    os.execv(executable, self.argv)
                else:
                    os.execve(executable, self.argv, self.env)
            except OSError as err:
                last = err.errno
            if last not in (errno.ENOENT, errno.ENOTDIR) and not first:
                first = last
        return first or last


class _PreexecFailed(Exception):
    pass


# ------------------------------------------------------------------ posix_spawn


def _spawn_or_raise(found, child):
    created = create_pinned(found, child)
    if created.error is not None:
        os.waitpid(created.pid, 0)
        raise OSError(created.error, os.strerror(created.error), child.path_object)
    return created.pid


class SpawnChild:
    """os.posix_spawn(p)'s arguments, checked as posixmodule checks them; glibc's child steps."""

    exit_status = SPAWN_FAILED_EXIT
    report_fd = -1

    def __init__(self, name, args, kwargs, search):
        if len(args) != 3:
            raise TypeError(
                "%s() takes exactly 3 positional arguments (%d given)" % (name, len(args)))
        for key in kwargs:
            if key not in _SPAWN_KEYWORDS:
                raise TypeError("%r is an invalid keyword argument for %s()" % (key, name))
        path, argv, env = args
        self.path_object = path
        self.path = _fsencode_arg(path)
        self.search = search
        self.argv = self._argv(name, argv)
        self.env = self._env(name, env)
        self.file_actions = self._file_actions(kwargs.get("file_actions"))
        self.setpgroup = None
        if "setpgroup" in kwargs:
            self.setpgroup = operator.index(kwargs["setpgroup"])
        self.resetids = bool(kwargs.get("resetids", False))
        self.setsid = bool(kwargs.get("setsid", False))
        self.setsigmask = self._signals(kwargs["setsigmask"]) if "setsigmask" in kwargs else None
        self.setsigdef = self._signals(kwargs.get("setsigdef", ()))
        self.scheduler = self._scheduler(name, kwargs.get("scheduler"))
        # glibc's posix_spawnp searches the caller's PATH, not the child's.
        self.search_path = None
        if search and b"/" not in self.path:
            self.search_path = os.environb.get(b"PATH", DEFAULT_PATH)

    @staticmethod
    def _argv(name, argv):
        if not isinstance(argv, (list, tuple)):
            raise TypeError("%s: argv must be a tuple or list" % name)
        if not argv:
            raise ValueError("%s: argv must not be empty" % name)
        encoded = [_fsencode_arg(arg) for arg in argv]
        if not encoded[0]:
            raise ValueError("%s: argv first element cannot be empty" % name)
        return encoded

    @staticmethod
    def _env(name, env):
        # posixmodule asks only for a __getitem__ (PyMapping_Check), then
        # for keys(): a list gets past the first and fails at the second.
        if not hasattr(type(env), "__getitem__"):
            raise TypeError("%s: environment must be a mapping object" % name)
        encoded = {}
        for key in env.keys():
            name_bytes, value = _fsencode_arg(key), _fsencode_arg(env[key])
            if not name_bytes or b"=" in name_bytes:
                raise ValueError("illegal environment variable name")
            encoded[name_bytes] = value
        return encoded

    @staticmethod
    def _file_actions(actions):
        if actions is None:
            return []
        if not isinstance(actions, collections.abc.Sequence) and not hasattr(actions, "__iter__"):
            raise TypeError("file_actions must be a sequence or None")
        checked = []
        for action in actions:
            if not isinstance(action, tuple) or not action:
                raise TypeError("Each file_actions element must be a non-empty tuple")
            tag = operator.index(action[0])
            if tag == os.POSIX_SPAWN_OPEN:
                if len(action) != 5:
                    raise TypeError("A open file_action tuple must have 5 elements")
                _, fd, path, flags, mode = action
                checked.append((tag, _valid_fd(fd), _fsencode_arg(path), operator.index(flags),
                                operator.index(mode)))
            elif tag == os.POSIX_SPAWN_CLOSE:
                if len(action) != 2:
                    raise TypeError("A close file_action tuple must have 2 elements")
                checked.append((tag, _valid_fd(action[1])))
            elif tag == os.POSIX_SPAWN_DUP2:
                if len(action) != 3:
                    raise TypeError("A dup2 file_action tuple must have 3 elements")
                checked.append((tag, _valid_fd(action[1]), _valid_fd(action[2])))
            else:
                raise TypeError("Unknown file_actions identifier")
        return checked

    @staticmethod
    def _signals(signals):
        checked = set()
        for sig in signals:
            sig = operator.index(sig)
            if not 1 <= sig < _NSIG:
                raise ValueError("signal number %d out of range [1; %d]" % (sig, _NSIG - 1))
            checked.add(sig)
        return checked

    @staticmethod
    def _scheduler(name, scheduler):
        if scheduler is None:
            return None
        if not isinstance(scheduler, tuple):
            raise TypeError("%s: scheduler must be a tuple or None" % name)
        if len(scheduler) != 2:
            raise TypeError("A scheduler tuple must have two elements")
        policy, param = scheduler
        if not isinstance(param, os.sched_param):
            raise TypeError("must have a sched_param object")
        return (None if policy is None else operator.index(policy)), param

    def run(self, mask):
        """glibc's posix_spawn child steps; returns the errno if it could not exec."""
        try:
            for sig in self.setsigdef:
                if sig not in (signal.SIGKILL, signal.SIGSTOP):
                    _sys.sigaction(sig, signal.SIG_DFL)
            _reset_caught_signals()
            if self.scheduler is not None:
                policy, param = self.scheduler
                if policy is None:
                    os.sched_setparam(0, param)
                else:
                    os.sched_setscheduler(0, policy, param)
            if self.setsid:
                os.setsid()
            if self.setpgroup is not None:
                os.setpgid(0, self.setpgroup)
            if self.resetids:
                os.seteuid(os.getuid())
                os.setegid(os.getgid())
            self._move_report_fd_clear_of_actions()
            for action in self.file_actions:
                self._file_action(action)
            _unblock(mask if self.setsigmask is None else self.setsigmask)
            return self._exec()
        except OSError as err:
            return err.errno or errno.EINVAL

    def _move_report_fd_clear_of_actions(self):
        # Any fd an action names, as source or target.
        targets = {action[1] for action in self.file_actions}
        targets |= {action[2] for action in self.file_actions if action[0] == os.POSIX_SPAWN_DUP2}
        if self.report_fd in targets:
            moved = fcntl.fcntl(self.report_fd, fcntl.F_DUPFD_CLOEXEC, max(targets) + 1)
            os.close(self.report_fd)
            self.report_fd = moved

    @staticmethod
    def _file_action(action):
        tag = action[0]
        if tag == os.POSIX_SPAWN_OPEN:
            _, fd, path, flags, mode = action
            opened = os.open(path, flags, mode)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
            elif not flags & os.O_CLOEXEC:
                os.set_inheritable(fd, True)  # os.open adds O_CLOEXEC; open(2) does not
        elif tag == os.POSIX_SPAWN_CLOSE:
            try:
                os.close(action[1])
            except OSError:
                # glibc reports a failed close only for an fd out of range.
                if action[1] >= os.sysconf("SC_OPEN_MAX"):
                    raise
        else:
            _, fd, new_fd = action
            if fd == new_fd:
                os.set_inheritable(fd, True)
            else:
                os.dup2(fd, new_fd)

    def _exec(self):
        if self.search_path is None:
            return self._exec_one(self.path)
        saw_eacces = False
        code = errno.ENOENT
        for directory in self.search_path.split(b":"):
            code = self._exec_one(os.path.join(directory or b".", self.path))
            if code == errno.EACCES:
                saw_eacces = True
            elif code not in _TRY_NEXT_DIRECTORY:
                return code
        return errno.EACCES if saw_eacces else code

    def _exec_one(self, path):
        try:
            os.execve(path, self.argv, self.env)
        except OSError as err:
            return err.errno
        return errno.EINVAL  # unreachable: execve returns only by raising


def _valid_fd(fd):
    fd = operator.index(fd)
    # posix_spawn_file_actions_add* refuse an fd the process could never have.
    if not 0 <= fd < os.sysconf("SC_OPEN_MAX"):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    return fd


# ------------------------------------------------------------------ system


class _InterruptsIgnored:
    """SIGINT and SIGQUIT ignored while any pinned os.system call waits.

    Dispositions are process-wide; like glibc's system(), the first caller
    saves them and the last one puts them back.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._saved = {}

    @contextlib.contextmanager
    def held(self):
        with self._lock:
            if self._users == 0:
                self._saved = {sig: _sys.sigaction(sig, signal.SIG_IGN)
                               for sig in (signal.SIGINT, signal.SIGQUIT)}
            self._users += 1
            saved = dict(self._saved)
        try:
            yield saved
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    for sig, (_, raw) in self._saved.items():
                        _sys.sigaction(sig, raw)


_interrupts_ignored = _InterruptsIgnored()


def _system_pinned(found, command):
    line = _fsencode_arg(command)
    sys.audit("os.system", command)
    # system() runs with the GIL released: Python's handlers run once it
    # has returned. Holding the signals they catch in this thread does the
    # same (a process-directed one is left pending or taken by another
    # thread, which only trips Python's flag); the rest act at once, as
    # they would during system().
    held = {sig for sig in _SIGNALS if callable(signal.getsignal(sig))}
    with _interrupts_ignored.held() as saved:
        caller_mask = _pthread_sigmask(signal.SIG_BLOCK, held | {signal.SIGCHLD})
        try:
            child = SpawnChild("system", (SHELL, [b"sh", b"-c", line], dict(os.environb)), {
                "setsigmask": caller_mask,
                "setsigdef": [sig for sig, (handler, _) in saved.items()
                              if handler != signal.SIG_IGN],
            }, search=False)
            created = create_pinned(found, child)
            if created.error is not None:
                os.waitpid(created.pid, 0)
                return SPAWN_FAILED_EXIT << 8
            return _wait_status(created.pid)
        finally:
            _pthread_sigmask(signal.SIG_SETMASK, caller_mask)


def _wait_status(pid):
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return -1  # reaped by someone else (a SIGCHLD handler of C code), as glibc reports
