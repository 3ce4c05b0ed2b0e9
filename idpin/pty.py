"""Chosen pty numbers (/dev/pts/N).

devpts has no knob: it always hands out the lowest free index of its
instance, and TIOCGPTN only reads it. So idpin walks: under a flock on the
instance's root directory it opens ptmx again and again, holding every fd,
until TIOCGPTN reports N; the lower ones (fillers) are then closed. An index
above N first means N is in use: everything is closed and IdBusyError raised.
Several indices cost one walk (``open_many``), not one walk each.

Only routed calls are honoured (``openpty``/``fork`` here, and os.openpty,
os.forkpty, pty.openpty, pty.fork while a request is pending): an open of
/dev/ptmx from C code cannot be steered without the seccomp supervisor.
"""
__all__ = ["PTMX", "fork", "open_many", "openpty"]

import collections
import errno
import os
import resource
import time
from collections.abc import Iterable

from . import _sys, knobs, pids, signals
from .errors import IdBusyError, IdpinError, RequestError, UnsupportedError
from .interpose import ORIGINALS
from .request import Kind, pending, register_kind, uncredit, validate_int

PTMX = "/dev/ptmx"
# fds the walk must leave free for the caller and for the interpreter itself.
_FD_HEADROOM = 16
# Walks retried when a busy index turns out free afterwards (another process
# opened a pty outside idpin's lock for a moment): at most this many, within
# this many seconds.
WALK_ATTEMPTS = 64
WALK_RETRY_SECONDS = 0.5

Instance = collections.namedtuple("Instance", "ptmx root dev max")
Instance.__doc__ = """A devpts instance: the ptmx path to open, its root directory (the lock),
its device number and the highest number of ptys it allows."""


def _unescape(field):
    # mountinfo escapes space, tab, newline and backslash as octal.
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _devpts_mounts():
    """(dev, root, mount point, super options) of every devpts mount."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] != "devpts":
                continue
            major, minor = (int(n) for n in fields[2].split(":"))
            yield os.makedev(major, minor), _unescape(fields[3]), _unescape(fields[4]), fields[sep + 3]


def _global_pty_max():
    try:
        with open("/proc/sys/kernel/pty/max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def find_instance(ptmx=PTMX):
    """The devpts instance that opening ``ptmx`` allocates from."""
    try:
        st = os.stat(ptmx)
    except FileNotFoundError:
        raise UnsupportedError("%s does not exist: mount devpts and create ptmx" % ptmx) from None
    mounts = list(_devpts_mounts())
    # A ptmx inside a devpts (pts/ptmx, or a bind mount of it) belongs to that
    # instance; the legacy /dev/ptmx node uses the devpts mounted at ./pts.
    dev = st.st_dev if any(m[0] == st.st_dev for m in mounts) else None
    if dev is None:
        pts_dir = os.path.join(os.path.dirname(os.path.realpath(ptmx)), "pts")
        try:
            dev = os.stat(pts_dir).st_dev
        except FileNotFoundError:
            dev = None
    for mdev, root, mount_point, options in mounts:
        if mdev == dev and root == "/":
            return Instance(ptmx, mount_point, dev, _instance_max(options))
    raise UnsupportedError(
        "no devpts instance found for %s: mount one, e.g. 'mount -t devpts -o "
        "newinstance,ptmxmode=0666 devpts /dev/pts'" % ptmx
    )


def _instance_max(options):
    limit = _global_pty_max()
    for option in options.split(","):
        if option.startswith("max="):
            limit = min(limit, int(option[4:]))
    return limit


def validate_pty(value, instance=None):
    if instance is None:
        try:
            instance = find_instance()
        except UnsupportedError:
            instance = Instance(PTMX, None, None, _global_pty_max())
    return validate_int("pty", value, 0, instance.max - 1, "the devpts instance's max - 1")


def _check_fd_budget(highest):
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = highest + 1 + len(os.listdir("/proc/self/fd")) + _FD_HEADROOM
    if soft != resource.RLIM_INFINITY and needed > soft:
        raise UnsupportedError(
            "reaching pty index %d holds %d descriptors open at once, above RLIMIT_NOFILE "
            "(soft limit %d): raise it, e.g. 'ulimit -n %d' or "
            "resource.setrlimit(resource.RLIMIT_NOFILE, ...)" % (highest, needed, soft, needed),
            kind="pty",
        )


def close_quietly(*fds):
    """Close each fd, ignoring one already closed (an undo that may run twice)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _uncredit_master(master):
    """The pty of ``master`` is taken back: a request credited with its index is pending again."""
    try:
        uncredit("pty", _sys.pty_index(master))
    except OSError:
        pass


def _undo_pair(pair):
    """A held signal's handler raised as the pair was returned: the caller never gets it."""
    _uncredit_master(pair[0])
    close_quietly(*pair)


def _undo_pairs(pairs):
    for pair in pairs.values():
        close_quietly(*pair)


def _undo_fork(result):
    pid, master = result
    if pid > 0:
        _uncredit_master(master)
        close_quietly(master)
        pids.undo_fork(pid)


@signals.door(undo=_undo_pairs)
def open_many(indices: Iterable[int], ptmx: str = PTMX) -> dict[int, tuple[int, int]]:
    """Open ptys with exactly these indices in one walk: {index: (master, slave)}.

    The fds are close-on-exec, like os.openpty's. All or nothing: a busy index
    raises IdBusyError and leaves no fd open and no index held.
    """
    try:
        indices = list(indices)
    except TypeError:
        raise RequestError(
            "pty indices must be an iterable of ints, not %r" % (indices,), kind="pty"
        ) from None
    instance = find_instance(ptmx)
    wanted = sorted({validate_pty(index, instance) for index in indices})
    if len(wanted) != len(indices):
        raise RequestError("pty indices must be distinct: %r" % (indices,), kind="pty")
    if not wanted:
        return {}
    _check_fd_budget(wanted[-1])
    lock = knobs.directory_lock(instance.root, "pts")
    pairs = {}
    walk_failed = False
    in_use = _indices_in_use(instance)
    try:
        with lock.held():
            # Held back until every pty is paired or closed again.
            with _sys.signals_blocked():
                try:
                    masters = _walk(instance, wanted)
                except (IdpinError, OSError):
                    walk_failed = True  # a failed walk leaves nothing open
                    raise
                pairs = _with_slaves(dict(zip(wanted, masters)))
        return pairs
    except BaseException:
        if not walk_failed:
            # Every wanted index was free when the walk began: a pty at one
            # of them now is this call's, even one an exception (a signal
            # handler's) kept from ``pairs``.
            _close_ptys_at(instance, wanted, pairs, in_use)
        raise


def _walk(instance, wanted):
    """The walk, tried again while a busy index turns out free: noise held it only briefly."""
    deadline = time.monotonic() + WALK_RETRY_SECONDS
    for attempt in range(1, WALK_ATTEMPTS + 1):
        masters, busy = _walk_once(instance, wanted)
        if busy < 0:
            return masters
        if _index_in_use(instance, busy):
            raise IdBusyError("pty", busy, "in use in the devpts instance at %s" % instance.root)
        if time.monotonic() >= deadline:
            break
    raise IdBusyError(
        "pty", busy,
        "another process opening ptys outside idpin's lock held it during each of %d walks "
        "in a row; it is free now" % attempt,
    )


def _index_in_use(instance, index):
    """Whether the index is still allocated after a short look (noise holds one briefly)."""
    # devpts keeps a node for an index exactly as long as its pty is allocated.
    node = os.path.join(instance.root, str(index))
    deadline = time.monotonic() + pids.BUSY_RECHECK_SECONDS
    while os.path.exists(node):
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.0005)
    return False


def _walk_once(instance, wanted):
    try:
        return _sys.ptmx_walk(instance.ptmx, tuple(wanted))
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise UnsupportedError(
            "pty index %d cannot be reached: the devpts instance at %s ran out of ptys "
            "(its max=%d option, kernel.pty.max, and for instances other than the first "
            "kernel.pty.max - kernel.pty.reserve)" % (wanted[-1], instance.root, instance.max),
            kind="pty",
        ) from None


def _with_slaves(masters):
    pairs = {}
    try:
        for index, master in masters.items():
            pairs[index] = (master, _sys.pty_peer(master))
    except BaseException:
        for index, master in masters.items():
            os.close(master)
            if index in pairs:
                os.close(pairs[index][1])
        raise
    return pairs


def _indices_in_use(instance):
    return {int(name) for name in os.listdir(instance.root) if name.isdigit()}


def _close_ptys_at(instance, wanted, pairs, in_use):
    """Close every fd of this process on a pty this walk took.

    The walk took the ``wanted`` indices and, as fillers, lower ones: every
    index not in use before it (``in_use``) up to the highest wanted one.
    """
    for master, slave in pairs.values():
        for fd in (master, slave):
            try:
                os.close(fd)
            except OSError:
                pass
    taken = set(range(max(wanted) + 1)) - in_use
    slaves = {os.path.join(instance.root, str(index)) for index in taken}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            target = os.readlink("/proc/self/fd/" + name)
        except OSError:
            continue
        if target in slaves:
            os.close(fd)
        elif os.path.basename(target) == "ptmx":
            try:
                if _sys.pty_index(fd) in taken:
                    os.close(fd)
            except OSError:
                pass


def _pending_pair():
    """(pair, request, index) for this thread's pending pty request, not yet consumed."""
    found = pending("pty")
    if found is None:
        return ORIGINALS["os.openpty"](), None, None
    req, index = found
    return open_many([index])[index], req, index


@signals.door(undo=_undo_pair)
def openpty() -> tuple[int, int]:
    """os.openpty, honouring this thread's pending pty request."""
    pair, req, index = _pending_pair()
    if req is not None:
        req.consumed["pty"] = index  # inline: no call between getting and returning the pair
    return pair


@signals.door(undo=_undo_fork)
def fork() -> tuple[int, int]:
    """pty.fork / os.forkpty: (pid, master fd); the child runs on the slave.

    Honours this thread's pending pty and pid requests; neither is consumed
    unless both the pty and the fork succeed. In the child the fd returned is
    -1 (the stdlib's is closed, hence as invalid).
    """
    (master, slave), req, index = _pending_pair()
    try:
        pid = pids.fork()
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    if pid == 0:
        try:
            os.close(master)
            os.login_tty(slave)
        except BaseException:
            # As glibc's forkpty does: a child that cannot take its terminal
            # (the master was closed meanwhile) must not run the caller's code.
            os._exit(1)
        return 0, -1
    try:
        os.close(slave)
    except BaseException:
        os.close(master)
        raise
    if req is not None:
        req.consumed["pty"] = index
    return pid, master


register_kind(Kind("pty", validate_pty))


def __dir__() -> list[str]:
    # dir(idpin.pty) lists its public names, not the modules it imports.
    return sorted(__all__)
