"""The ctypes twin of the Cython backend: the same small interface.

It keeps idpin working where the extension was not built (IDPIN_BACKEND=ctypes
forces it) and is the benchmarks' baseline for the Cython hot paths. Calls
that must keep the GIL (the fork protocol, as CPython's own os.fork does) go
through a PyDLL handle; the rest use a CDLL handle that releases it.
Failures raise plain OSError from errno; idpin's layers above translate.
"""
import ctypes
import errno
import fcntl
import os
import signal
import threading

from . import _abi
from ._glibc import pthread_self as _pthread_self

BACKEND = "ctypes"

_libc = ctypes.CDLL(None, use_errno=True)
_libc_gil = ctypes.PyDLL(None, use_errno=True)
_api = ctypes.pythonapi

# sigset_t is 128 bytes in glibc; the full set is built once, and each
# block/restore is one libc call (signal.pthread_sigmask converts a Python
# set of every signal on every call).
_SIGSET_BYTES = 128
_FULL_SIGSET = ctypes.create_string_buffer(_SIGSET_BYTES)
_libc.sigfillset(_FULL_SIGSET)
_sigmask = _libc.pthread_sigmask
_sigmask.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


def _block_signals():
    """Block every signal; the previous mask, for _restore_signals."""
    previous = ctypes.create_string_buffer(_SIGSET_BYTES)
    _sigmask(signal.SIG_BLOCK, _FULL_SIGSET, previous)
    return previous


def _restore_signals(previous):
    _sigmask(signal.SIG_SETMASK, previous, None)

_raw_syscall = _libc.syscall
_raw_syscall.restype = ctypes.c_long
_fork_syscall = _libc_gil.syscall
_fork_syscall.restype = ctypes.c_long

for _name in ("PyOS_BeforeFork", "PyOS_AfterFork_Child", "PyOS_AfterFork_Parent"):
    getattr(_api, _name).restype = None
    getattr(_api, _name).argtypes = []


class _CloneArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack",
            "stack_size", "tls", "set_tid", "set_tid_size", "cgroup",
        )
    ]


def _oserror(call, detail=""):
    code = ctypes.get_errno()
    message = "%s: %s" % (call, os.strerror(code))
    if detail:
        message += " (%s)" % detail
    return OSError(code, message)


def _clone_args(set_tid, flags=0, child_tid=0):
    tids = (ctypes.c_int * len(set_tid))(*set_tid)
    args = _CloneArgs(
        flags=flags,
        child_tid=child_tid,
        # clone3 refuses an exit signal with CLONE_PARENT (EINVAL): the child
        # then takes the caller's own, which is SIGCHLD for a forked caller.
        exit_signal=0 if flags & _abi.CLONE_PARENT else signal.SIGCHLD,
        set_tid=ctypes.addressof(tids),
        set_tid_size=len(set_tid),
    )
    return args, tids


class _ForkScratch(threading.local):
    """What one clone3 fork passes the kernel, built once per thread and reused:
    every object a fork cycle makes or touches costs the parent a page fault
    once the fork has write-protected its memory."""

    def __init__(self):
        self.args = _CloneArgs()
        self.tids = (ctypes.c_int * _abi.MAX_PID_NS_LEVEL)()
        self.args.set_tid = ctypes.addressof(self.tids)
        self.args_ref = ctypes.byref(self.args)
        self.head = ctypes.c_void_p()
        self.size = ctypes.c_size_t()
        self.robust_refs = (ctypes.byref(self.head), ctypes.byref(self.size))
        self.previous_mask = ctypes.create_string_buffer(_SIGSET_BYTES)


_scratch = _ForkScratch()
_NR_CLONE3 = ctypes.c_long(_abi.SYS_clone3)
_NR_GET_ROBUST_LIST = ctypes.c_long(_abi.SYS_get_robust_list)
_NR_SET_ROBUST_LIST = ctypes.c_long(_abi.SYS_set_robust_list)
_CURRENT_THREAD = ctypes.c_long(0)
_CLONE_ARGS_SIZE = ctypes.c_size_t(ctypes.sizeof(_CloneArgs))


def clone3_fork(set_tid, tid_offset):
    """Fork with clone3(set_tid) following CPython's own fork protocol.

    Returns 0 in the child and the child's pid in the parent. The GIL is held
    throughout (PyDLL), as os.fork holds it across fork().
    """
    return _clone3_fork(set_tid, tid_offset, 0)


def clone3_sibling(set_tid, tid_offset):
    """clone3_fork with CLONE_PARENT: the child is the caller's sibling.

    Its parent is the caller's parent (which reaps it and gets its SIGCHLD),
    so several helpers can create one parent's children in parallel. The init
    of a pid namespace cannot do this (EINVAL). Returns 0 in the child and
    the child's pid in the caller.
    """
    return _clone3_fork(set_tid, tid_offset, _abi.CLONE_PARENT)


def _clone3_fork(set_tid, tid_offset, extra_flags):
    scratch = _scratch
    args = scratch.args
    n = len(set_tid)
    if not 1 <= n <= _abi.MAX_PID_NS_LEVEL:
        raise ValueError("set_tid needs 1 to %d pids (one per pid namespace level), got %d"
                         % (_abi.MAX_PID_NS_LEVEL, n))
    scratch.tids[:n] = set_tid
    flags = _abi.CLONE_CHILD_SETTID | _abi.CLONE_CHILD_CLEARTID | extra_flags
    args.flags = flags
    args.child_tid = _pthread_self() + tid_offset
    # clone3 refuses an exit signal with CLONE_PARENT (EINVAL): the child
    # then takes the caller's own, which is SIGCHLD for a forked caller.
    args.exit_signal = 0 if flags & _abi.CLONE_PARENT else signal.SIGCHLD
    args.set_tid_size = n
    if _raw_syscall(_NR_GET_ROBUST_LIST, _CURRENT_THREAD, *scratch.robust_refs) != 0:
        raise _oserror("get_robust_list")
    # Python code runs between these C calls here: a signal handler raising
    # there would skip PyOS_AfterFork_* and leave the import lock held.
    previous = scratch.previous_mask
    _sigmask(signal.SIG_BLOCK, _FULL_SIGSET, previous)
    _api.PyOS_BeforeFork()
    pid = _fork_syscall(_NR_CLONE3, scratch.args_ref, _CLONE_ARGS_SIZE)
    if pid == 0:
        # The kernel dropped the robust futex registration in the child.
        _fork_syscall(_NR_SET_ROBUST_LIST, scratch.head, scratch.size)
        _api.PyOS_AfterFork_Child()
        _restore_signals(previous)
        return 0
    code = ctypes.get_errno()
    _api.PyOS_AfterFork_Parent()
    _restore_signals(previous)
    if pid < 0:
        raise OSError(code, "clone3(set_tid=%s): %s" % (list(set_tid), os.strerror(code)))
    return pid


_fork_call = _libc_gil.fork
_fork_call.restype = ctypes.c_int
_getpid_call = _libc_gil.getpid
# pwrite that keeps the GIL (os.pwrite lets it go): between PyOS_BeforeFork
# and the fork no other thread may run, so none can be half-way through
# handing the GIL over when the child is made (the child copies that state,
# and runs bytecode before PyOS_AfterFork_Child re-initializes it).
_pwrite_holding_gil = _libc_gil.pwrite
_pwrite_holding_gil.restype = ctypes.c_ssize_t
_pwrite_holding_gil.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_long]


def knob_fork(knob_fd, pid):
    """glibc's fork() with ns_last_pid armed to ``pid - 1`` just before it.

    CPython's fork protocol, as os.fork follows it, except that a child born
    with another pid exits (status 125) before PyOS_AfterFork_Child, so it
    runs nothing of the caller's, not even os.register_at_fork hooks.
    Returns 0 in the child and the child's pid in the parent.
    """
    data = b"%d" % (pid - 1)
    previous = _block_signals()
    _api.PyOS_BeforeFork()
    written = _pwrite_holding_gil(knob_fd, data, len(data), 0)
    if written < 0:
        code = ctypes.get_errno()
        _api.PyOS_AfterFork_Parent()
        _restore_signals(previous)
        raise OSError(code, os.strerror(code))
    if written != len(data):
        _api.PyOS_AfterFork_Parent()
        _restore_signals(previous)
        raise OSError(errno.EIO, "short write of %d to a knob" % (pid - 1))
    child = _fork_call()
    if child == 0:
        if _getpid_call() != pid:
            os._exit(125)
        _api.PyOS_AfterFork_Child()
        _restore_signals(previous)
        return 0
    code = ctypes.get_errno()
    _api.PyOS_AfterFork_Parent()
    _restore_signals(previous)
    if child < 0:
        raise OSError(code, "fork: %s" % os.strerror(code))
    return child


def clone3_probe(set_tid):
    """errno of a clone3(set_tid) that cannot create a child (set_tid in use).

    The kernel checks range, then privilege, then whether the pid is free, so
    a set_tid that is surely taken reports whether set_tid is permitted with
    no side effect: EEXIST means permitted.
    """
    args, tids = _clone_args(set_tid)
    pid = _fork_syscall(ctypes.c_long(_abi.SYS_clone3), ctypes.byref(args),
                        ctypes.c_size_t(ctypes.sizeof(args)))
    if pid == 0:
        os._exit(0)
    if pid > 0:
        os.waitpid(pid, 0)
        return 0
    return ctypes.get_errno()


def prctl(option, arg):
    if _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0),
                   ctypes.c_ulong(0), ctypes.c_ulong(0)) < 0:
        raise _oserror("prctl", "option %d" % option)


def unshare(flags):
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        raise _oserror("unshare", hex(flags))


def setns(fd, nstype):
    if _libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)) != 0:
        raise _oserror("setns")


def mount(source, target, fstype, flags, data):
    if _libc.mount(_bytes(source), _bytes(target), _bytes(fstype),
                   ctypes.c_ulong(flags), _bytes(data)) != 0:
        raise _oserror("mount", "%s on %s" % (source, target))


def _bytes(value):
    if value is None:
        return None
    return os.fsencode(value)


# The C function itself: no Python frame between a caller's cleanup path
# and the syscall, where a signal handler could raise first.
flock = fcntl.flock


def knob_write(fd, value):
    """pwrite at offset 0: a second plain write on a sysctl fd is ignored."""
    data = b"%d" % value
    if os.pwrite(fd, data, 0) != len(data):
        raise OSError(errno.EIO, "short write of %d to a knob" % value)


def knob_read(fd):
    return int(os.pread(fd, 32, 0))


def fd_nlink(fd):
    return os.fstat(fd).st_nlink


def proc_read(fd):
    parts = []
    while True:
        chunk = os.pread(fd, 16384, sum(map(len, parts)))
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


_libc.semget.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
_libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
_libc.msgget.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_libc.msgctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
# A buffer comfortably larger than any of semid64_ds/shmid64_ds/msqid64_ds.
_STAT_BUF = ctypes.create_string_buffer(256)


def _ipc_get_raw(kind, key, arg, flags):
    if kind == _abi.SEM:
        return _libc.semget(key, arg, flags)
    if kind == _abi.SHM:
        return _libc.shmget(key, arg, flags)
    return _libc.msgget(key, flags)


def ipc_get(kind, key, arg, flags):
    """semget(key, arg, flags), shmget(key, arg, flags) or msgget(key, flags)."""
    got = _ipc_get_raw(kind, key, arg, flags)
    if got < 0:
        raise _oserror(("semget", "shmget", "msgget")[kind])
    return got


def _ipc_ctl(kind, id, cmd, buf):
    if kind == _abi.SEM:
        return _libc.semctl(ctypes.c_int(id), ctypes.c_int(0), ctypes.c_int(cmd), buf)
    if kind == _abi.SHM:
        return _libc.shmctl(id, cmd, buf)
    return _libc.msgctl(id, cmd, buf)


def ipc_remove(kind, id):
    if _ipc_ctl(kind, id, _abi.IPC_RMID, None) < 0:
        raise _oserror("IPC_RMID", "id %d" % id)


def ipc_stat_index(kind, index):
    """The full id of the object at this index, or -1 if the index is free."""
    cmd = (_abi.SEM_STAT_ANY, _abi.SHM_STAT_ANY, _abi.MSG_STAT_ANY)[kind]
    got = _ipc_ctl(kind, index, cmd, _STAT_BUF)
    if got >= 0:
        return got
    if ctypes.get_errno() == errno.EINVAL:
        return -1
    raise _oserror("*_STAT_ANY", "index %d" % index)


def ipc_count(kind):
    """How many objects of this kind exist in the IPC namespace (*_INFO)."""
    cmd = (_abi.SEM_INFO, _abi.SHM_INFO, _abi.MSG_INFO)[kind]
    ctypes.memset(_STAT_BUF, 0, ctypes.sizeof(_STAT_BUF))
    if _ipc_ctl(kind, 0, cmd, _STAT_BUF) < 0:
        raise _oserror("*_INFO")
    field = _abi.INFO_IN_USE_FIELD[kind]
    return ctypes.cast(_STAT_BUF, ctypes.POINTER(ctypes.c_int))[field]


# ------------------------------------------------- IPC contents (capture)

_msgrcv = _libc.msgrcv
_msgrcv.restype = ctypes.c_ssize_t
_msgrcv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long, ctypes.c_int]
_shmat = _libc.shmat
_shmat.restype = ctypes.c_void_p
_shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_shmdt = _libc.shmdt
_shmdt.argtypes = [ctypes.c_void_p]
_SHMAT_FAILED = ctypes.c_void_p(-1).value


def _unsigned_long_at(buf, offset):
    return ctypes.c_ulong.from_buffer(buf, offset).value


def sem_getall(id):
    """The values of every semaphore of set ``id``: IPC_STAT for nsems, then GETALL."""
    ds = ctypes.create_string_buffer(_abi.SEMID_DS_SIZE)
    if _ipc_ctl(_abi.SEM, id, _abi.IPC_STAT, ds) < 0:
        raise _oserror("semctl IPC_STAT", "id %d" % id)
    # A set's nsems is fixed at creation and the id names this set until it
    # is removed and its index's sequence number wraps (65536 creations).
    values = (ctypes.c_ushort * (_unsigned_long_at(ds, _abi.SEMID_DS_NSEMS_OFFSET) + 1))()
    if _ipc_ctl(_abi.SEM, id, _abi.GETALL, values) < 0:
        raise _oserror("semctl GETALL", "id %d" % id)
    return list(values[:-1])


def msg_copy(id, index, size):
    """Message ``index`` (0 is the oldest) of queue ``id``, left in the queue.

    Returns (mtype, text) or None when the queue has no such message; E2BIG
    when the text is longer than ``size`` bytes. msgrcv with MSG_COPY needs
    CONFIG_CHECKPOINT_RESTORE (ENOSYS without it).
    """
    buf = ctypes.create_string_buffer(ctypes.sizeof(ctypes.c_long) + size)
    got = _msgrcv(id, buf, size, index, _abi.IPC_NOWAIT | _abi.MSG_COPY)
    if got < 0:
        if ctypes.get_errno() == errno.ENOMSG:
            return None
        raise _oserror("msgrcv MSG_COPY", "id %d, message %d" % (id, index))
    start = ctypes.sizeof(ctypes.c_long)
    return ctypes.c_long.from_buffer(buf).value, buf.raw[start:start + got]


def shm_read(id, limit):
    """The bytes of segment ``id``, attached read-only and detached again.

    EFBIG, before copying anything, when the segment is larger than ``limit``.
    """
    addr = _shmat(id, None, _abi.SHM_RDONLY)
    if addr == _SHMAT_FAILED:
        raise _oserror("shmat", "id %d" % id)
    try:
        # While attached, the id keeps naming this segment: its size is the
        # mapping's, so the copy below stays inside it.
        ds = ctypes.create_string_buffer(_abi.SHMID_DS_SIZE)
        if _ipc_ctl(_abi.SHM, id, _abi.IPC_STAT, ds) < 0:
            raise _oserror("shmctl IPC_STAT", "id %d" % id)
        size = _unsigned_long_at(ds, _abi.SHMID_DS_SEGSZ_OFFSET)
        if size > limit:
            raise OSError(errno.EFBIG, "shm id %d is %d bytes, more than %d" % (id, size, limit))
        return ctypes.string_at(addr, size)
    finally:
        _shmdt(addr)


def ipc_create_pinned(knob_fd, kind, want, key, arg, flags):
    """Arm the knob, create, and remove the object again if its id is wrong.

    Returns the id the kernel gave: ``want``, or the id of an object that
    existed only briefly (the kernel silently takes the next free index).
    """
    # One step to the caller, as in the Cython backend: no signal handler
    # may run between creating a wrongly numbered object and removing it.
    previous = _block_signals()
    try:
        return _create_pinned(knob_fd, kind, want, key, arg, flags)
    finally:
        _restore_signals(previous)


def _create_pinned(knob_fd, kind, want, key, arg, flags):
    knob_write(knob_fd, want)
    got = ipc_get(kind, key, arg, flags)
    if got != want:
        ipc_remove(kind, got)
    return got


def ipc_create_batch(knob_fds, calls, start, check, index_mask, outcome):
    """Pinned creations in a row from ``calls[start]`` (see the Cython backend's docstring).

    With every signal blocked throughout, as the Cython loop runs without
    returning to Python; ``outcome`` is filled before they are unblocked.
    """
    previous = _block_signals()
    try:
        outcome[:] = _create_batch(knob_fds, calls, start, check, index_mask)
    finally:
        _restore_signals(previous)


def _create_batch(knob_fds, calls, start, check, index_mask):
    if check:
        for position in range(start, len(calls)):
            kind, want = calls[position][:2]
            try:
                holder = ipc_stat_index(kind, want & index_mask)
            except OSError as err:
                if err.errno == errno.EIDRM:
                    continue
                return start, _abi.BATCH_GET, err.errno, position
            if holder != -1:
                return start, _abi.BATCH_BUSY, holder, position
    for position in range(start, len(calls)):
        kind, want, key, arg, flags = calls[position]
        try:
            knob_write(knob_fds[kind], want)
        except OSError as err:
            return position, _abi.BATCH_KNOB, err.errno, position
        try:
            got = ipc_get(kind, key, arg, flags)
        except OSError as err:
            return position, _abi.BATCH_GET, err.errno, position
        if got != want:
            try:
                ipc_remove(kind, got)
            except OSError:
                return position, _abi.BATCH_RMID, got, position
            return position, _abi.BATCH_WRONG, got, position
    return len(calls), _abi.BATCH_DONE, 0, len(calls)


class _MqAttr(ctypes.Structure):
    _fields_ = [("mq_flags", ctypes.c_long), ("mq_maxmsg", ctypes.c_long),
                ("mq_msgsize", ctypes.c_long), ("mq_curmsgs", ctypes.c_long)]


_libc.mq_open.restype = ctypes.c_int
_libc.mq_send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint]
_libc.mq_receive.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mq_receive.restype = ctypes.c_ssize_t
_libc.mq_unlink.argtypes = [ctypes.c_char_p]


def record_write(name, data):
    """Create the POSIX message queue ``name`` holding ``data`` as its one message.

    POSIX message queues belong to the IPC namespace and count against
    limits of their own, so a record can be written even when the SysV
    limits leave no room. FileExistsError if the record exists.
    """
    payload = bytes(data)
    attr = _MqAttr(0, 1, max(len(payload), 1), 0)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    # One step to the caller, as in the Cython backend: no signal handler
    # may run while the queue's descriptor is open.
    previous = _block_signals()
    try:
        queue = _libc.mq_open(os.fsencode(name), flags, ctypes.c_uint(0o600), ctypes.byref(attr))
        if queue < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), name)
        rc = _libc.mq_send(queue, payload, len(payload), 0)
        code = ctypes.get_errno()
        _libc.mq_close(queue)
    finally:
        _restore_signals(previous)
    if rc < 0:
        record_remove(name)
        raise OSError(code, "mq_send: %s" % os.strerror(code))


def record_read(name):
    """The message of the record ``name``, or None if there is none."""
    buf = ctypes.create_string_buffer(65536)
    previous = _block_signals()
    try:
        queue = _libc.mq_open(os.fsencode(name), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if queue < 0:
            code = ctypes.get_errno()
            if code == errno.ENOENT:
                return None
            raise OSError(code, os.strerror(code), name)
        got = _libc.mq_receive(queue, buf, 65536, None)
        code = ctypes.get_errno()
        _libc.mq_close(queue)
    finally:
        _restore_signals(previous)
    if got < 0:
        if code == errno.EAGAIN:
            return b""
        raise OSError(code, "mq_receive: %s" % os.strerror(code))
    return buf.raw[:got]


def record_exists(name):
    """Whether the record ``name`` exists (its message, if any, left in place)."""
    previous = _block_signals()
    try:
        queue = _libc.mq_open(os.fsencode(name), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        code = ctypes.get_errno()
        if queue >= 0:
            _libc.mq_close(queue)
    finally:
        _restore_signals(previous)
    if queue >= 0:
        return True
    if code == errno.ENOENT:
        return False
    raise OSError(code, os.strerror(code), name)


def record_remove(name):
    """Remove the record ``name``; nothing if there is none."""
    if _libc.mq_unlink(os.fsencode(name)) < 0:
        code = ctypes.get_errno()
        if code != errno.ENOENT:
            raise OSError(code, os.strerror(code), name)
_libc.msgsnd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.shmat.restype = ctypes.c_void_p
_libc.shmdt.argtypes = [ctypes.c_void_p]


def ipc_sem_setall(id, values):
    """semctl(id, 0, SETALL): every semaphore of the set at once."""
    array = (ctypes.c_ushort * max(len(values), 1))()
    for i, value in enumerate(values):
        if not 0 <= value <= 0xFFFF:
            raise OverflowError("semaphore value %d does not fit an unsigned short" % value)
        array[i] = value
    if _libc.semctl(ctypes.c_int(id), ctypes.c_int(0), ctypes.c_int(_abi.SETALL), array) < 0:
        raise _oserror("semctl(SETALL)", "id %d" % id)


def ipc_msg_send(id, mtype, data):
    """msgsnd(id, {mtype, data}, IPC_NOWAIT): a full queue is EAGAIN, never a wait."""
    body = bytes(data)
    message = ctypes.create_string_buffer(ctypes.sizeof(ctypes.c_long) + max(len(body), 1))
    ctypes.c_long.from_buffer(message).value = mtype
    ctypes.memmove(ctypes.addressof(message) + ctypes.sizeof(ctypes.c_long), body, len(body))
    while _libc.msgsnd(id, message, len(body), _abi.IPC_NOWAIT) != 0:
        if ctypes.get_errno() != errno.EINTR:
            raise _oserror("msgsnd", "id %d" % id)


def ipc_shm_write(id, data):
    """Copy ``data`` to the start of segment ``id`` (shmat, memcpy, shmdt)."""
    body = bytes(data)
    at = _libc.shmat(id, None, 0)
    if at is None or at == ctypes.c_void_p(-1).value:
        raise _oserror("shmat", "id %d" % id)
    ctypes.memmove(at, body, len(body))
    _libc.shmdt(ctypes.c_void_p(at))


_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def pty_index(fd):
    index = ctypes.c_uint()
    if _libc.ioctl(fd, _abi.TIOCGPTN, ctypes.byref(index)) != 0:
        raise _oserror("TIOCGPTN")
    return index.value


def _pty_unlock(fd):
    zero = ctypes.c_int(0)
    if _libc.ioctl(fd, _abi.TIOCSPTLCK, ctypes.byref(zero)) != 0:
        raise _oserror("TIOCSPTLCK")


def pty_peer(master):
    """Open the slave of ``master`` without a path lookup (TIOCGPTPEER)."""
    flags = os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC
    slave = _libc.ioctl(master, _abi.TIOCGPTPEER, ctypes.c_void_p(flags))
    if slave < 0:
        raise _oserror("TIOCGPTPEER")
    return slave


def ptmx_walk(path, wanted):
    """Open ``path`` (a ptmx) until each index in sorted ``wanted`` is held.

    devpts hands out the lowest free index, so lower indices are fillers held
    open and closed at the end; an index above the next wanted one means that
    one is busy. Returns (masters aligned with wanted, -1), or ((), busy index)
    with every fd closed.
    """
    kept, fillers = [], []
    busy = -1
    try:
        for want in wanted:
            while True:
                fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
                index = pty_index(fd)
                if index == want:
                    kept.append(fd)
                    break
                if index > want:
                    os.close(fd)
                    busy = want
                    break
                fillers.append(fd)
            if busy >= 0:
                break
        if busy < 0:
            for fd in kept:
                _pty_unlock(fd)
    except BaseException:
        _close_all(kept)
        raise
    finally:
        _close_all(fillers)
    if busy >= 0:
        _close_all(kept)
        return (), busy
    return tuple(kept), -1


def _close_all(fds):
    for fd in fds:
        os.close(fd)


class _Sigaction(ctypes.Structure):
    # glibc's struct sigaction on x86-64 and aarch64 (not the kernel's).
    _fields_ = [
        ("handler", ctypes.c_void_p),
        ("mask", ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong)))),
        ("flags", ctypes.c_int),
        ("restorer", ctypes.c_void_p),
    ]


_libc.sigaction.argtypes = [ctypes.c_int, ctypes.POINTER(_Sigaction), ctypes.POINTER(_Sigaction)]


def sigaction(signum, action):
    """Set ``signum``'s disposition; return the previous one as (handler, saved).

    See the Cython backend's docstring: None reads, an int sets that handler
    with an empty mask and no flags, saved bytes are put back exactly.
    """
    new_ptr = None
    if isinstance(action, bytes):
        if len(action) != ctypes.sizeof(_Sigaction):
            raise ValueError("a saved sigaction is %d bytes, not %d"
                             % (ctypes.sizeof(_Sigaction), len(action)))
        new_ptr = ctypes.pointer(_Sigaction.from_buffer_copy(action))
    elif action is not None:
        new_ptr = ctypes.pointer(_Sigaction(handler=int(action)))
    old = _Sigaction()
    if _libc.sigaction(signum, new_ptr, ctypes.byref(old)) != 0:
        raise _oserror("sigaction")
    return old.handler or 0, bytes(old)


# ---------------------------------------------------------------- seccomp user notification

class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _SeccompData(ctypes.Structure):
    _fields_ = [("nr", ctypes.c_int), ("arch", ctypes.c_uint32),
                ("instruction_pointer", ctypes.c_uint64), ("args", ctypes.c_uint64 * 6)]


class _Notif(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("data", _SeccompData)]


class _NotifResp(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("val", ctypes.c_int64), ("error", ctypes.c_int32),
                ("flags", ctypes.c_uint32)]


class _NotifAddfd(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("srcfd", ctypes.c_uint32),
                ("newfd", ctypes.c_uint32), ("newfd_flags", ctypes.c_uint32)]


class _NotifSizes(ctypes.Structure):
    _fields_ = [("notif", ctypes.c_uint16), ("resp", ctypes.c_uint16), ("data", ctypes.c_uint16)]


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_ioctl_ptr = ctypes.CDLL(None, use_errno=True).ioctl
_ioctl_ptr.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl_ptr.restype = ctypes.c_int
_poll = _libc.poll
_poll.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int]
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong,
                                   ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
_libc.process_vm_readv.restype = ctypes.c_ssize_t


def seccomp_listen(bpf, flags):
    """Install the classic-BPF program ``bpf`` (bytes, 8 per instruction) on
    this thread with SECCOMP_FILTER_FLAG_NEW_LISTENER | ``flags``; the listener fd.

    Meant for a launcher between fork and exec: the caller has set
    no_new_privs or holds CAP_SYS_ADMIN.
    """
    program = bytes(bpf)
    if not program or len(program) % 8 or len(program) // 8 > 4096:
        raise ValueError("a seccomp filter is 1 to 4096 8-byte BPF instructions, got %d bytes" % len(program))
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    flags = flags | _abi.SECCOMP_FILTER_FLAG_NEW_LISTENER
    fd = _raw_syscall(ctypes.c_long(_abi.SYS_seccomp), ctypes.c_long(_abi.SECCOMP_SET_MODE_FILTER),
                      ctypes.c_ulong(flags), ctypes.byref(prog))
    if fd < 0:
        raise _oserror("seccomp(SET_MODE_FILTER)", "flags %#x" % flags)
    return fd


def seccomp_notif_sizes():
    """(struct seccomp_notif, seccomp_notif_resp, seccomp_data) sizes as this kernel has them."""
    sizes = _NotifSizes()
    if _raw_syscall(ctypes.c_long(_abi.SYS_seccomp), ctypes.c_long(_abi.SECCOMP_GET_NOTIF_SIZES),
                    ctypes.c_long(0), ctypes.byref(sizes)) != 0:
        raise _oserror("seccomp(GET_NOTIF_SIZES)")
    return sizes.notif, sizes.resp, sizes.data


def seccomp_action_avail(action):
    """Whether this kernel knows the filter return value ``action``."""
    value = ctypes.c_uint32(action)
    if _raw_syscall(ctypes.c_long(_abi.SYS_seccomp), ctypes.c_long(_abi.SECCOMP_GET_ACTION_AVAIL),
                    ctypes.c_long(0), ctypes.byref(value)) == 0:
        return True
    if ctypes.get_errno() == errno.EOPNOTSUPP:
        return False
    raise _oserror("seccomp(GET_ACTION_AVAIL)")


def _notification(n):
    d = n.data
    return (n.id, n.pid, d.nr, d.arch, d.instruction_pointer, tuple(d.args))


def _recv(fd, n):
    # The kernel refuses a buffer that is not zeroed: clear it every time.
    ctypes.memset(ctypes.byref(n), 0, ctypes.sizeof(n))
    return _ioctl_ptr(fd, _abi.SECCOMP_IOCTL_NOTIF_RECV, ctypes.byref(n))


def _send(fd, id, val, error, flags):
    resp = _NotifResp(id, val, error, flags)
    return _ioctl_ptr(fd, _abi.SECCOMP_IOCTL_NOTIF_SEND, ctypes.byref(resp))


def notif_recv(fd):
    """One notification (id, pid, nr, arch, ip, args), or None when the call
    went away before it was received (ENOENT: a normal event)."""
    n = _Notif()
    while True:
        if _recv(fd, n) == 0:
            return _notification(n)
        code = ctypes.get_errno()
        if code == errno.ENOENT:
            return None
        if code != errno.EINTR:
            raise _oserror("SECCOMP_IOCTL_NOTIF_RECV")


def notif_send(fd, id, val, error, flags):
    """Answer notification ``id``: True, or False when its caller is gone (ENOENT)."""
    if _send(fd, id, val, error, flags) == 0:
        return True
    if ctypes.get_errno() == errno.ENOENT:
        return False
    raise _oserror("SECCOMP_IOCTL_NOTIF_SEND", "id %d" % id)


def notif_id_valid(fd, id):
    """Whether notification ``id`` still waits: what was read of its caller's
    memory since it was received is that call's."""
    value = ctypes.c_uint64(id)
    if _ioctl_ptr(fd, _abi.SECCOMP_IOCTL_NOTIF_ID_VALID, ctypes.byref(value)) == 0:
        return True
    if ctypes.get_errno() == errno.ENOENT:
        return False
    raise _oserror("SECCOMP_IOCTL_NOTIF_ID_VALID")


def notif_addfd(fd, id, srcfd, newfd, flags, newfd_flags=0):
    """Install our ``srcfd`` in the caller of notification ``id``; the fd number there.

    flags: SECCOMP_ADDFD_FLAG_SETFD (at ``newfd``), SECCOMP_ADDFD_FLAG_SEND
    (also answer the call with that number, atomically); newfd_flags:
    O_CLOEXEC or 0.
    """
    add = _NotifAddfd(id, flags, srcfd, newfd, newfd_flags)
    got = _ioctl_ptr(fd, _abi.SECCOMP_IOCTL_NOTIF_ADDFD, ctypes.byref(add))
    if got < 0:
        raise _oserror("SECCOMP_IOCTL_NOTIF_ADDFD", "id %d" % id)
    return got


def notif_set_flags(fd, flags):
    """SECCOMP_IOCTL_NOTIF_SET_FLAGS (6.6): e.g. SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP."""
    if _ioctl_ptr(fd, _abi.SECCOMP_IOCTL_NOTIF_SET_FLAGS, ctypes.c_void_p(flags)) != 0:
        raise _oserror("SECCOMP_IOCTL_NOTIF_SET_FLAGS")


class _Pollfd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


_POLLIN = 1


def notif_loop(fd, stop_fd, extra_fd, control):
    """Receive until a call needs idpin: its notification tuple, None when
    ``stop_fd`` is readable or no target is left, () when ``extra_fd`` (-1:
    none) is readable.

    ``control`` is a writable buffer of 7 uint32 read on every notification:
    [0] nonzero = answer CONTINUE here for every call of arch [3] whose
    syscall number is not [2]; [4] nonzero = also for syscall numbers [5]
    and [6] of arch [3]; [1] counts those answers.
    """
    ctl = (ctypes.c_uint32 * 7).from_buffer(control)
    # The listener is polled before the extra fd: a request written there
    # before a trapped call is then always seen with (or before) that call.
    fds = (_Pollfd * 3)(_Pollfd(fd, _POLLIN, 0), _Pollfd(stop_fd, _POLLIN, 0),
                        _Pollfd(extra_fd, _POLLIN, 0))
    n = _Notif()
    while True:
        fds[0].revents = fds[1].revents = fds[2].revents = 0
        # poll first: a blocked RECV would not wake when the last target
        # exits or when we are told to stop. CDLL calls release the GIL.
        if _poll(fds, 3, -1) < 0:
            if ctypes.get_errno() == errno.EINTR:
                continue
            raise _oserror("seccomp notification loop")
        if fds[1].revents:
            return None
        if fds[2].revents:
            return ()
        if not fds[0].revents & _POLLIN:
            return None
        if _recv(fd, n) != 0:
            if ctypes.get_errno() in (errno.ENOENT, errno.EINTR):
                continue
            raise _oserror("seccomp notification loop")
        nr = n.data.nr & 0xFFFFFFFF
        if n.data.arch == ctl[3] and ((ctl[0] and nr != ctl[2]) or (ctl[4] and nr in (ctl[5], ctl[6]))):
            _send(fd, n.id, 0, 0, _abi.SECCOMP_USER_NOTIF_FLAG_CONTINUE)
            ctl[1] += 1
            continue
        return _notification(n)


def process_vm_read(pid, addr, size):
    """``size`` bytes at ``addr`` in process ``pid`` (check NOTIF_ID_VALID after)."""
    if size == 0:
        return b""
    buf = ctypes.create_string_buffer(size)
    local = _Iovec(ctypes.addressof(buf), size)
    remote = _Iovec(addr, size)
    got = _libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if got < 0:
        raise _oserror("process_vm_readv", "pid %d" % pid)
    return buf.raw[:got]


def pidfd_getfd(pidfd, targetfd):
    """A copy of fd ``targetfd`` of the process behind ``pidfd`` (close-on-exec)."""
    fd = _raw_syscall(ctypes.c_long(_abi.SYS_pidfd_getfd), ctypes.c_long(pidfd),
                      ctypes.c_long(targetfd), ctypes.c_long(0))
    if fd < 0:
        raise _oserror("pidfd_getfd", "fd %d" % targetfd)
    return fd
