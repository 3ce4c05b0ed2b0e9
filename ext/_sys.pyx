# cython: language_level=3
"""The Cython backend of idpin._sys: every syscall idpin makes, in C.

Built as ``idpin._sys._cython``. ``idpin/_sys/_ctypes.py`` is its twin: the
same functions take the same arguments, return the same values and raise the
same plain OSError from errno, worded as the twin words it; idpin's layers
above translate. Syscalls run with the GIL released, as the twin's CDLL calls
do, except the fork protocol, which holds it as os.fork does. The multi-step
operations (a pinned IPC creation, a ptmx walk) run as one C call each.
"""
import os

from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.long cimport PyLong_AsUnsignedLongMask
from cpython.object cimport PyObject_AsFileDescriptor
from libc.errno cimport errno, EINTR, EINVAL, EIO, EMFILE, EIDRM
from libc.signal cimport SIGCHLD
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset
cimport posix.stat as libc_stat
from posix.fcntl cimport open as c_open, O_RDWR, O_NOCTTY, O_CLOEXEC
from posix.resource cimport getrlimit, rlimit, rlim_t, RLIMIT_NOFILE
from posix.unistd cimport close, pread, pwrite, _exit, getpid, fork as c_fork
from posix.wait cimport waitpid

from _sys cimport *

from idpin._sys import _abi

BACKEND = "cython"

# The kind codes are idpin's own convention, so they come from _abi, not from
# a header.
cdef int KIND_SEM = _abi.SEM
cdef int KIND_SHM = _abi.SHM
_GET_CALLS = ("semget", "shmget", "msgget")
_STAT_CMDS = (SEM_STAT_ANY, SHM_STAT_ANY, MSG_STAT_ANY)


# ---------------------------------------------------------------- errors

cdef object _oserror(str call, int code, detail=""):
    message = "%s: %s" % (call, os.strerror(code))
    if detail:
        message += " (%s)" % detail
    return OSError(code, message)


cdef object _stdlib_error(int code, filename=None):
    # Where the twin calls os.open/os.pwrite/os.pread/os.waitpid/fcntl.flock,
    # raise what those raise (PyErr_SetFromErrno's wording).
    if filename is None:
        return OSError(code, os.strerror(code))
    return OSError(code, os.strerror(code), filename)


cdef inline int _c_int(value) except? -1:
    # ctypes converts int arguments by masking, not by range check (an IPC
    # key such as 0xDEADBEEF reaches the kernel as the same 32 bits); do the
    # same so both backends pass the kernel the same value.
    return <int>PyLong_AsUnsignedLongMask(value)


cdef bytes _fsencode_or_none(value):
    if value is None:
        return None
    return os.fsencode(value)


cdef inline const char *_c_str(bytes value):
    if value is None:
        return NULL
    return value


# ---------------------------------------------------------------- clone3

cdef tuple _set_tid_items(set_tid, int *tids):
    items = tuple(set_tid)
    n = len(items)
    # The kernel takes one pid per pid namespace level, innermost first, and
    # never more than MAX_PID_NS_LEVEL; an empty set_tid is EINVAL.
    if not 1 <= n <= MAX_PID_NS_LEVEL:
        raise ValueError(
            "set_tid needs 1 to %d pids (one per pid namespace level), got %d"
            % (MAX_PID_NS_LEVEL, n)
        )
    cdef int i
    for i in range(n):
        # A pid beyond int range is an OverflowError here, never a pid
        # truncated to one the caller did not ask for.
        tids[i] = items[i]
    return items


cdef void _clone_args(clone_args *args, const int *tids, Py_ssize_t n,
                      uint64_t flags, uint64_t child_tid) noexcept nogil:
    # Zeroed, and passed with its full size: a 64-byte struct makes the kernel
    # ignore set_tid silently.
    memset(args, 0, sizeof(clone_args))
    args.flags = flags
    args.child_tid = child_tid
    # clone3 refuses an exit signal with CLONE_PARENT (EINVAL): the child
    # then takes the caller's own, which is SIGCHLD for a forked caller.
    args.exit_signal = 0 if flags & CLONE_PARENT else SIGCHLD
    args.set_tid = <uint64_t><uintptr_t>tids
    args.set_tid_size = <uint64_t>n


def clone3_fork(set_tid, tid_offset):
    """Fork with clone3(set_tid) following CPython's own fork protocol.

    Returns 0 in the child and the child's pid in the parent.
    """
    return _clone3_fork(set_tid, tid_offset, 0)


def clone3_sibling(set_tid, tid_offset):
    """clone3_fork with CLONE_PARENT: the child is the caller's sibling.

    Its parent is the caller's parent (which reaps it and gets its SIGCHLD),
    so several helpers can create one parent's children in parallel. The init
    of a pid namespace cannot do this (EINVAL). Returns 0 in the child and
    the child's pid in the caller.
    """
    return _clone3_fork(set_tid, tid_offset, CLONE_PARENT)


cdef object _clone3_fork(set_tid, tid_offset, uint64_t extra_flags):
    cdef int tids[MAX_PID_NS_LEVEL]
    cdef int code = 0
    cdef long pid
    items = _set_tid_items(set_tid, tids)
    pid = _clone3_raw(tids, len(items), tid_offset, extra_flags, &code)
    if pid == 0:
        return 0
    if pid < 0:
        if code == 0:
            raise _oserror("get_robust_list", errno)
        raise OSError(code, "clone3(set_tid=%s): %s" % (list(items), os.strerror(code)))
    return pid


cdef long _clone3_raw(const int *tids, Py_ssize_t n, Py_ssize_t offset, uint64_t extra_flags,
                      int *code):
    """clone3(set_tid) inside CPython's fork protocol: the pid, 0 in the child, or -1
    with ``*code`` the errno (0: get_robust_list failed, before anything)."""
    cdef clone_args args
    cdef void *robust_head = NULL
    cdef size_t robust_len = 0
    cdef long pid
    # glibc caches the tid in its struct pthread and the child inherits the
    # parent's copy: CHILD_SETTID has the kernel write the child's own tid
    # there, CHILD_CLEARTID clears it at exit. These are the flags glibc's
    # fork passes for the same field.
    _clone_args(&args, tids, n, CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | extra_flags,
                <uint64_t><uintptr_t>(<char *>pthread_self() + offset))
    # A new task starts with no robust futex list; glibc's fork registers the
    # parent's head again in the child, so read it while we still can.
    if syscall(SYS_get_robust_list, <long>0, &robust_head, &robust_len) != 0:
        code[0] = 0
        return -1
    # The GIL is held across the fork protocol, as os.fork holds it across
    # fork(): PyOS_BeforeFork takes the interpreter's locks and runs the
    # os.register_at_fork hooks, and no other thread may run between it and
    # the AfterFork call. Nothing here touches a Python object in between.
    PyOS_BeforeFork()
    pid = syscall(SYS_clone3, &args, sizeof(args))
    if pid == 0:
        syscall(SYS_set_robust_list, robust_head, robust_len)
        PyOS_AfterFork_Child()
        return 0
    code[0] = errno
    PyOS_AfterFork_Parent()
    return pid


cdef enum:
    KNOB_NOT_WRITTEN = -2


def knob_fork(knob_fd, pid):
    """glibc's fork() with ns_last_pid armed to ``pid - 1`` just before it.

    CPython's fork protocol, as os.fork follows it, except that a child born
    with another pid exits (status 125) before PyOS_AfterFork_Child, so it
    runs nothing of the caller's, not even os.register_at_fork hooks. The
    knob is written after PyOS_BeforeFork, the last moment before the fork,
    to leave a process forking outside idpin's lock the shortest window.
    Returns 0 in the child and the child's pid in the parent.
    """
    data = b"%d" % (pid - 1)
    cdef int code = 0
    cdef int child = _knob_fork_raw(knob_fd, data, len(data), pid, &code)
    if child == KNOB_NOT_WRITTEN:
        if code:
            raise _stdlib_error(code)
        raise OSError(EIO, "short write of %d to a knob" % (pid - 1))
    if child < 0:
        raise OSError(code, "fork: %s" % os.strerror(code))
    return child


cdef int _knob_fork_raw(int knob_fd, const char *value, size_t size, int want,
                        int *code) noexcept:
    """PyOS_BeforeFork, the knob armed to ``value``, fork(), the after step.

    The GIL is held throughout, as os.fork holds it across fork(). Returns 0
    in the child (a child born with a pid other than ``want`` exits with 125
    first), the child's pid, -1 with ``*code`` the fork's errno, or
    KNOB_NOT_WRITTEN with ``*code`` the write's errno (0: a short write).
    """
    cdef ssize_t written
    cdef int child
    PyOS_BeforeFork()
    written = _pwrite_at_zero(knob_fd, value, size)
    if written < 0 or <size_t>written != size:
        code[0] = errno if written < 0 else 0
        PyOS_AfterFork_Parent()
        return KNOB_NOT_WRITTEN
    child = c_fork()
    if child == 0:
        if getpid() != want:
            _exit(125)
        PyOS_AfterFork_Child()
        return 0
    code[0] = errno
    PyOS_AfterFork_Parent()
    return child


def clone3_probe(set_tid):
    """errno of a clone3(set_tid) that cannot create a child (set_tid in use).

    The kernel checks range, then privilege, then whether the pid is free, so
    a set_tid that is surely taken reports whether set_tid is permitted with
    no side effect: EEXIST means permitted. Returns 0 if a child was created
    after all (it exits at once and is reaped).
    """
    cdef int tids[MAX_PID_NS_LEVEL]
    cdef clone_args args
    cdef long pid
    items = _set_tid_items(set_tid, tids)
    _clone_args(&args, tids, len(items), 0, 0)
    # No fork protocol: a child, if one is born, runs no Python and leaves at
    # once, so the interpreter's state in it never matters.
    pid = syscall(SYS_clone3, &args, sizeof(args))
    if pid == 0:
        _exit(0)
    if pid < 0:
        return errno
    _reap(<int>pid)
    return 0


cdef int _reap(int pid) except -1:
    cdef int status, got, code
    while True:
        with nogil:
            got = waitpid(pid, &status, 0)
            code = errno
        if got >= 0:
            return 0
        if code != EINTR:
            raise _stdlib_error(code)
        PyErr_CheckSignals()


# ---------------------------------------------------------------- prctl, namespaces, mounts, locks

def prctl(option, arg):
    cdef int coption = _c_int(option)
    cdef unsigned long carg = PyLong_AsUnsignedLongMask(arg)
    cdef int rc, code
    with nogil:
        # The unused arguments are passed as 0: several options fail with
        # EINVAL when they are not.
        rc = c_prctl(coption, carg, <unsigned long>0, <unsigned long>0, <unsigned long>0)
        code = errno
    if rc < 0:
        raise _oserror("prctl", code, "option %d" % option)


def unshare(flags):
    cdef int cflags = _c_int(flags)
    cdef int rc, code
    with nogil:
        rc = c_unshare(cflags)
        code = errno
    if rc != 0:
        raise _oserror("unshare", code, hex(flags))


def setns(fd, nstype):
    cdef int cfd = _c_int(fd)
    cdef int ctype = _c_int(nstype)
    cdef int rc, code
    with nogil:
        rc = c_setns(cfd, ctype)
        code = errno
    if rc != 0:
        raise _oserror("setns", code)


def mount(source, target, fstype, flags, data):
    cdef bytes bsource = _fsencode_or_none(source)
    cdef bytes btarget = _fsencode_or_none(target)
    cdef bytes bfstype = _fsencode_or_none(fstype)
    cdef unsigned long cflags = PyLong_AsUnsignedLongMask(flags)
    cdef bytes bdata = _fsencode_or_none(data)
    cdef const char *csource = _c_str(bsource)
    cdef const char *ctarget = _c_str(btarget)
    cdef const char *cfstype = _c_str(bfstype)
    cdef const char *cdata = _c_str(bdata)
    cdef int rc, code
    with nogil:
        rc = c_mount(csource, ctarget, cfstype, cflags, cdata)
        code = errno
    if rc != 0:
        raise _oserror("mount", code, "%s on %s" % (source, target))


def flock(fd, int operation):
    cdef int cfd = PyObject_AsFileDescriptor(fd)
    cdef int rc, code
    # LOCK_EX waits for the holder: release the GIL, and retry after a signal
    # as fcntl.flock does (PEP 475).
    while True:
        with nogil:
            rc = c_flock(cfd, operation)
            code = errno
        if rc == 0:
            return
        if code != EINTR:
            raise _stdlib_error(code)
        PyErr_CheckSignals()


# ---------------------------------------------------------------- sysctl knobs

cdef ssize_t _pwrite_at_zero(int fd, const char *data, size_t size) noexcept nogil:
    # Offset 0 every time: with sysctl_writes_strict=1 a write past the start
    # of a sysctl file is accepted and silently ignored.
    cdef ssize_t written
    while True:
        written = pwrite(fd, data, size, 0)
        if written >= 0 or errno != EINTR:
            return written


def knob_write(fd, value):
    """pwrite at offset 0: a second plain write on a sysctl fd is ignored."""
    data = b"%d" % value
    cdef int cfd = fd
    cdef const char *cdata = data
    cdef size_t size = len(data)
    cdef ssize_t written
    cdef int code
    with nogil:
        written = _pwrite_at_zero(cfd, cdata, size)
        code = errno
    if written < 0:
        raise _stdlib_error(code)
    if <size_t>written != size:
        raise OSError(EIO, "short write of %d to a knob" % value)


def knob_read(fd):
    cdef int cfd = fd
    cdef char buf[32]
    cdef ssize_t got
    cdef int code
    while True:
        with nogil:
            got = pread(cfd, buf, sizeof(buf), 0)
            code = errno
        if got >= 0:
            break
        if code != EINTR:
            raise _stdlib_error(code)
        PyErr_CheckSignals()
    return int(buf[:got])


def fd_nlink(fd):
    """fstat(fd).st_nlink, without building a stat result (it is read before every pinned fork)."""
    cdef int cfd = fd
    cdef libc_stat.struct_stat st
    cdef int rc, code
    with nogil:
        rc = libc_stat.fstat(cfd, &st)
        code = errno
    if rc < 0:
        raise _stdlib_error(code)
    return st.st_nlink


def proc_read(fd):
    """The whole content of a /proc file, read again from its start (pread at 0 on).

    A cached fd read this way is a fresh snapshot each time, without the
    path walk an open() makes.
    """
    cdef int cfd = fd
    cdef char buf[16384]
    cdef ssize_t got
    cdef long long offset = 0
    cdef int code
    parts = []
    while True:
        with nogil:
            got = pread(cfd, buf, sizeof(buf), offset)
            code = errno
        if got < 0:
            if code == EINTR:
                PyErr_CheckSignals()
                continue
            raise _stdlib_error(code)
        if got == 0:
            break
        parts.append(buf[:got])
        offset += got
    return parts[0] if len(parts) == 1 else b"".join(parts)


# ---------------------------------------------------------------- SysV IPC

cdef union ipc_stat_buf:
    semid_ds sem
    shmid_ds shm
    msqid_ds msg


cdef int _ipc_get_raw(int kind, key_t key, unsigned long arg, int flags) noexcept nogil:
    if kind == KIND_SEM:
        return semget(key, <int>arg, flags)
    if kind == KIND_SHM:
        return shmget(key, <size_t>arg, flags)
    return msgget(key, flags)


cdef int _ipc_ctl(int kind, int id, int cmd, ipc_stat_buf *buf) noexcept nogil:
    if kind == KIND_SEM:
        return semctl(id, 0, cmd, buf)
    if kind == KIND_SHM:
        return shmctl(id, cmd, <shmid_ds *>buf)
    return msgctl(id, cmd, <msqid_ds *>buf)


def ipc_get(kind, key, arg, flags):
    """semget(key, arg, flags), shmget(key, arg, flags) or msgget(key, flags)."""
    cdef int ckind = kind
    cdef key_t ckey = _c_int(key)
    cdef unsigned long carg = PyLong_AsUnsignedLongMask(arg)
    cdef int cflags = _c_int(flags)
    cdef int got, code
    with nogil:
        got = _ipc_get_raw(ckind, ckey, carg, cflags)
        code = errno
    if got < 0:
        raise _oserror(_GET_CALLS[kind], code)
    return got


def ipc_remove(kind, id):
    cdef int ckind = kind
    cdef int cid = _c_int(id)
    cdef int rc, code
    with nogil:
        rc = _ipc_ctl(ckind, cid, IPC_RMID, NULL)
        code = errno
    if rc < 0:
        raise _oserror("IPC_RMID", code, "id %d" % id)


def ipc_stat_index(kind, index):
    """The full id of the object at this index, or -1 if the index is free."""
    cdef int cmd = _STAT_CMDS[kind]
    cdef int ckind = kind
    cdef int cindex = _c_int(index)
    cdef ipc_stat_buf buf
    cdef int got, code
    with nogil:
        got = _ipc_ctl(ckind, cindex, cmd, &buf)
        code = errno
    if got >= 0:
        return got
    if code == EINVAL:
        return -1
    raise _oserror("*_STAT_ANY", code, "index %d" % index)


_INFO_CMDS = (_abi.SEM_INFO, _abi.SHM_INFO, _abi.MSG_INFO)


def ipc_count(kind):
    """How many objects of this kind exist in the IPC namespace (*_INFO)."""
    cdef int cmd = _INFO_CMDS[kind]
    cdef int ckind = kind
    cdef int field = _abi.INFO_IN_USE_FIELD[kind]
    cdef ipc_stat_buf buf
    cdef int got, code
    memset(&buf, 0, sizeof(buf))
    with nogil:
        got = _ipc_ctl(ckind, 0, cmd, &buf)
        code = errno
    if got < 0:
        raise _oserror("*_INFO", code)
    return (<int *>&buf)[field]


# ------------------------------------------------- IPC contents (capture)

from libc.errno cimport EFBIG, ENOMSG


def sem_getall(id):
    """The values of every semaphore of set ``id``: IPC_STAT for nsems, then GETALL."""
    cdef int cid = _c_int(id)
    cdef semid_ds ds
    cdef unsigned short *values
    cdef unsigned long n, i
    cdef int rc, code
    with nogil:
        rc = semctl(cid, 0, IPC_STAT, &ds)
        code = errno
    if rc < 0:
        raise _oserror("semctl IPC_STAT", code, "id %d" % id)
    # A set's nsems is fixed at creation and the id names this set until it
    # is removed and its index's sequence number wraps (65536 creations).
    n = ds.sem_nsems
    values = <unsigned short *>malloc((n + 1) * sizeof(unsigned short))
    if values == NULL:
        raise MemoryError()
    try:
        with nogil:
            rc = semctl(cid, 0, GETALL, values)
            code = errno
        if rc < 0:
            raise _oserror("semctl GETALL", code, "id %d" % id)
        return [values[i] for i in range(n)]
    finally:
        free(values)


def msg_copy(id, index, size):
    """Message ``index`` (0 is the oldest) of queue ``id``, left in the queue.

    Returns (mtype, text) or None when the queue has no such message; E2BIG
    when the text is longer than ``size`` bytes. msgrcv with MSG_COPY needs
    CONFIG_CHECKPOINT_RESTORE (ENOSYS without it).
    """
    cdef int cid = _c_int(id)
    cdef long cindex = index
    cdef size_t csize = size
    cdef char *buf = <char *>malloc(sizeof(long) + csize)
    cdef ssize_t got
    cdef int code
    if buf == NULL:
        raise MemoryError()
    try:
        with nogil:
            got = msgrcv(cid, buf, csize, cindex, IPC_NOWAIT | MSG_COPY)
            code = errno
        if got < 0:
            if code == ENOMSG:
                return None
            raise _oserror("msgrcv MSG_COPY", code, "id %d, message %d" % (id, index))
        return (<long *>buf)[0], buf[sizeof(long):sizeof(long) + got]
    finally:
        free(buf)


def shm_read(id, limit):
    """The bytes of segment ``id``, attached read-only and detached again.

    EFBIG, before copying anything, when the segment is larger than ``limit``.
    """
    cdef int cid = _c_int(id)
    cdef shmid_ds ds
    cdef void *addr
    cdef int rc, code
    with nogil:
        addr = shmat(cid, NULL, SHM_RDONLY)
        code = errno
    if addr == <void *>-1:
        raise _oserror("shmat", code, "id %d" % id)
    try:
        # While attached, the id keeps naming this segment: its size is the
        # mapping's, so the copy below stays inside it.
        with nogil:
            rc = shmctl(cid, IPC_STAT, &ds)
            code = errno
        if rc < 0:
            raise _oserror("shmctl IPC_STAT", code, "id %d" % id)
        if ds.shm_segsz > limit:
            raise OSError(EFBIG, "shm id %d is %d bytes, more than %d" % (id, ds.shm_segsz, limit))
        return (<char *>addr)[:ds.shm_segsz]
    finally:
        shmdt(addr)


cdef enum PinStep:
    PIN_DONE
    PIN_KNOB
    PIN_SHORT
    PIN_GET
    PIN_RMID


cdef struct Pin:
    int step
    int err
    int got


cdef void _create_pinned(Pin *pin, int knob_fd, const char *value, size_t size,
                         long long want, int kind, key_t key, unsigned long arg,
                         int flags) noexcept nogil:
    cdef ssize_t written = _pwrite_at_zero(knob_fd, value, size)
    if written < 0:
        pin.step, pin.err = PIN_KNOB, errno
        return
    if <size_t>written != size:
        pin.step = PIN_SHORT
        return
    pin.got = _ipc_get_raw(kind, key, arg, flags)
    if pin.got < 0:
        pin.step, pin.err = PIN_GET, errno
        return
    # The kernel silently gives the next free index when the asked one is
    # taken; an object with the wrong id must not outlive this call.
    if pin.got != want and _ipc_ctl(kind, pin.got, IPC_RMID, NULL) < 0:
        pin.step, pin.err = PIN_RMID, errno
        return
    pin.step = PIN_DONE


def ipc_create_pinned(knob_fd, kind, want, key, arg, flags):
    """Arm the knob, create, and remove the object again if its id is wrong.

    Returns the id the kernel gave: ``want``, or the id of an object that
    existed only briefly (the kernel silently takes the next free index).
    """
    value = b"%d" % want
    cdef int cknob = knob_fd
    cdef int ckind = kind
    cdef key_t ckey = _c_int(key)
    cdef unsigned long carg = PyLong_AsUnsignedLongMask(arg)
    cdef int cflags = _c_int(flags)
    cdef const char *cvalue = value
    cdef size_t size = len(value)
    cdef long long cwant
    cdef Pin pin
    try:
        cwant = want
    except OverflowError:
        # The knob takes only 0..INT_MAX, so the write fails before any id
        # is compared with this one.
        cwant = -1
    with nogil:
        _create_pinned(&pin, cknob, cvalue, size, cwant, ckind, ckey, carg, cflags)
    if pin.step == PIN_KNOB:
        raise _stdlib_error(pin.err)
    if pin.step == PIN_SHORT:
        raise OSError(EIO, "short write of %d to a knob" % want)
    if pin.step == PIN_GET:
        raise _oserror(_GET_CALLS[kind], pin.err)
    if pin.step == PIN_RMID:
        raise _oserror("IPC_RMID", pin.err, "id %d" % pin.got)
    return pin.got


cdef struct BatchItem:
    int kind
    int stat_cmd
    long long want
    key_t key
    unsigned long arg
    int flags
    size_t size
    char value[24]


cdef int BATCH_WRONG = _abi.BATCH_WRONG
cdef int BATCH_BUSY = _abi.BATCH_BUSY


def ipc_create_batch(knob_fds, calls, Py_ssize_t start, bint check, long long index_mask,
                     list outcome):
    """Pinned creations in a row, from ``calls[start]`` on, without returning to Python.

    ``calls``: (kind, want, key, arg, flags) each; ``knob_fds[kind]`` the
    kind's knob. With ``check``, every remaining index (``want & index_mask``)
    is looked at first (*_STAT_ANY) and a held one stops the batch before
    anything is created. Then each is made as ipc_create_pinned makes one
    (arm, create, remove a wrongly numbered object), stopping at the first
    that does not come out right. No Python code (a signal handler) runs in
    between.

    ``outcome`` (a list of 4) is filled before returning, so that a caller
    interrupted as this returns still knows what exists: [made, code, value,
    at]: calls[start:made] exist with their ids; ``code`` (the BATCH_*
    constants of _abi) says why call ``at`` stopped the batch, with ``value``.
    """
    cdef Py_ssize_t n = len(calls)
    cdef Py_ssize_t i
    cdef BatchItem *items
    cdef int fds[3]
    cdef Pin pin
    cdef ipc_stat_buf buf
    cdef int holder, code
    cdef Py_ssize_t made = start
    cdef Py_ssize_t at = n
    cdef int result = PIN_DONE
    cdef long long value = 0
    if len(outcome) != 4:
        raise ValueError("outcome must be a list of 4")
    for i in range(3):
        fds[i] = knob_fds[i]
    items = <BatchItem *>malloc(sizeof(BatchItem) * (n - start + 1))
    if items == NULL:
        raise MemoryError()
    try:
        for i in range(start, n):
            kind, want, key, arg, flags = calls[i]
            text = b"%d" % want
            if len(text) >= 24:
                raise OverflowError("id %r out of range" % (want,))
            items[i - start].kind = kind
            items[i - start].stat_cmd = _STAT_CMDS[kind]
            items[i - start].want = want
            items[i - start].key = _c_int(key)
            items[i - start].arg = PyLong_AsUnsignedLongMask(arg)
            items[i - start].flags = _c_int(flags)
            items[i - start].size = len(text)
            memcpy(items[i - start].value, <const char *>text, len(text))
        with nogil:
            if check:
                for i in range(start, n):
                    holder = _ipc_ctl(items[i - start].kind,
                                      <int>(items[i - start].want & index_mask),
                                      items[i - start].stat_cmd, &buf)
                    code = errno
                    if holder >= 0:
                        at, result, value = i, BATCH_BUSY, holder
                        break
                    if code != EINVAL and code != EIDRM:
                        at, result, value = i, PIN_GET, code
                        break
            if result == PIN_DONE:
                for i in range(start, n):
                    _create_pinned(&pin, fds[items[i - start].kind], items[i - start].value,
                                   items[i - start].size, items[i - start].want,
                                   items[i - start].kind, items[i - start].key,
                                   items[i - start].arg, items[i - start].flags)
                    if pin.step != PIN_DONE:
                        at, result = i, pin.step
                        value = pin.got if pin.step == PIN_RMID else pin.err
                        break
                    if pin.got != items[i - start].want:
                        at, result, value = i, BATCH_WRONG, pin.got
                        break
                    made = i + 1
    finally:
        free(items)
    outcome[0] = made
    outcome[1] = result
    outcome[2] = value
    outcome[3] = at


# ---------------------------------------------------------------- SysV contents (restore)

def ipc_sem_setall(id, values):
    """semctl(id, 0, SETALL): every semaphore of the set at once."""
    cdef int cid = _c_int(id)
    cdef Py_ssize_t n = len(values)
    cdef Py_ssize_t i
    cdef int rc, code
    cdef unsigned short *array = <unsigned short *>malloc((n if n else 1) * sizeof(unsigned short))
    if array == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            # An OverflowError here, never a value truncated to another one.
            array[i] = values[i]
        with nogil:
            rc = semctl(cid, 0, SETALL, array)
            code = errno
        if rc < 0:
            raise _oserror("semctl(SETALL)", code, "id %d" % id)
    finally:
        free(array)


def ipc_msg_send(id, mtype, data):
    """msgsnd(id, {mtype, data}, IPC_NOWAIT): a full queue is EAGAIN, never a wait."""
    cdef bytes body = bytes(data)
    cdef Py_ssize_t size = len(body)
    cdef int cid = _c_int(id)
    cdef long ctype = mtype
    cdef int rc, code
    cdef char *message = <char *>malloc(sizeof(long) + (size if size else 1))
    if message == NULL:
        raise MemoryError()
    try:
        (<long *>message)[0] = ctype
        memcpy(message + sizeof(long), <const char *>body, size)
        while True:
            with nogil:
                rc = msgsnd(cid, message, <size_t>size, IPC_NOWAIT)
                code = errno
            if rc == 0:
                return
            if code != EINTR:
                raise _oserror("msgsnd", code, "id %d" % id)
            PyErr_CheckSignals()
    finally:
        free(message)


def ipc_shm_write(id, data):
    """Copy ``data`` to the start of segment ``id`` (shmat, memcpy, shmdt)."""
    cdef bytes body = bytes(data)
    cdef Py_ssize_t size = len(body)
    cdef const char *source = body
    cdef int cid = _c_int(id)
    cdef void *at
    cdef int code
    with nogil:
        at = shmat(cid, NULL, 0)
        code = errno
    if at == <void *>-1:
        raise _oserror("shmat", code, "id %d" % id)
    with nogil:
        memcpy(at, source, size)
        shmdt(at)


# ---------------------------------------------------------------- ptys

def pty_index(fd):
    cdef int cfd = _c_int(fd)
    cdef unsigned int index
    cdef int rc, code
    with nogil:
        rc = ioctl(cfd, TIOCGPTN, &index)
        code = errno
    if rc != 0:
        raise _oserror("TIOCGPTN", code)
    return index


def pty_peer(master):
    """Open the slave of ``master`` without a path lookup (TIOCGPTPEER)."""
    cdef int cmaster = _c_int(master)
    cdef int slave, code
    with nogil:
        slave = ioctl(cmaster, TIOCGPTPEER, <unsigned long>(O_RDWR | O_NOCTTY | O_CLOEXEC))
        code = errno
    if slave < 0:
        raise _oserror("TIOCGPTPEER", code)
    return slave


cdef enum WalkStep:
    WALK_HELD
    WALK_BUSY
    WALK_OPEN
    WALK_PTN
    WALK_UNLOCK


cdef struct PtmxWalk:
    const char *path
    const long long *wanted
    Py_ssize_t n_wanted
    int *kept               # one master per wanted index, in wanted's order
    Py_ssize_t n_kept
    int *fillers            # the lower indices, held so devpts moves past them
    Py_ssize_t n_fillers
    Py_ssize_t cap_fillers
    Py_ssize_t busy_at      # position in wanted of the last busy index, or -1
    int step
    int err


cdef int _open_ptmx(const char *path) noexcept nogil:
    cdef int fd
    while True:
        fd = c_open(path, O_RDWR | O_NOCTTY | O_CLOEXEC)
        if fd >= 0 or errno != EINTR:
            return fd


cdef int _hold_index(PtmxWalk *w, long long want) noexcept nogil:
    # devpts hands out the lowest free index and no call asks for one, so
    # open until ``want`` comes out, holding each lower index as a filler; a
    # higher index means ``want`` is in use.
    cdef int fd
    cdef unsigned int index
    while True:
        fd = _open_ptmx(w.path)
        if fd < 0:
            w.err = errno
            return WALK_OPEN
        if ioctl(fd, TIOCGPTN, &index) != 0:
            w.err = errno
            close(fd)
            return WALK_PTN
        if <long long>index == want:
            w.kept[w.n_kept] = fd
            w.n_kept += 1
            return WALK_HELD
        if <long long>index > want:
            close(fd)
            return WALK_BUSY
        if w.n_fillers == w.cap_fillers:
            # Held indices are distinct and below max(wanted), and the array
            # also fits RLIMIT_NOFILE, so only a raised limit gets here.
            close(fd)
            w.err = EMFILE
            return WALK_OPEN
        w.fillers[w.n_fillers] = fd
        w.n_fillers += 1


cdef void _close_fds(int *fds, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        close(fds[i])


cdef inline bint _walk_busy(PtmxWalk *w) noexcept nogil:
    return w.busy_at >= 0 and w.wanted[w.busy_at] >= 0


cdef void _walk_ptmx(PtmxWalk *w) noexcept nogil:
    cdef Py_ssize_t i
    cdef int outcome
    cdef int unlocked = 0
    w.step = WALK_HELD
    w.busy_at = -1
    for i in range(w.n_wanted):
        outcome = _hold_index(w, w.wanted[i])
        if outcome == WALK_BUSY:
            w.busy_at = i
            if w.wanted[i] >= 0:
                break
        elif outcome != WALK_HELD:
            w.step = outcome
            break
    if w.step == WALK_HELD and not _walk_busy(w):
        # A new master starts locked: its slave cannot be opened until
        # TIOCSPTLCK clears the lock.
        for i in range(w.n_kept):
            if ioctl(w.kept[i], TIOCSPTLCK, &unlocked) != 0:
                w.step, w.err = WALK_UNLOCK, errno
                break
    _close_fds(w.fillers, w.n_fillers)
    w.n_fillers = 0
    if w.step != WALK_HELD or _walk_busy(w):
        _close_fds(w.kept, w.n_kept)
        w.n_kept = 0


cdef Py_ssize_t _filler_room(long long highest) except -1:
    # At most one filler per index below the highest wanted one (``highest``
    # is at least 0), and never more than the process may hold open.
    cdef rlimit limit
    cdef long long room = highest + 2
    if getrlimit(RLIMIT_NOFILE, &limit) == 0 and limit.rlim_cur < <rlim_t>room:
        room = <long long>limit.rlim_cur
    return <Py_ssize_t>room


def ptmx_walk(path, wanted):
    """Open ``path`` (a ptmx) until each index in sorted ``wanted`` is held.

    devpts hands out the lowest free index, so lower indices are fillers held
    open and closed at the end; an index above the next wanted one means that
    one is busy. Returns (masters aligned with wanted, -1), or ((), busy index)
    with every fd closed. Masters are unlocked; fillers are always closed.
    """
    wants = list(wanted)
    cdef Py_ssize_t n = len(wants)
    if n == 0:
        return (), -1
    bpath = os.fsencode(path)
    if b"\0" in bpath:
        raise ValueError("embedded null byte" if isinstance(path, str)
                         else "open: embedded null character in path")
    cdef PtmxWalk w
    cdef Py_ssize_t i
    cdef long long highest
    cdef long long *targets = <long long *>malloc(n * sizeof(long long))
    if targets == NULL:
        raise MemoryError()
    memset(&w, 0, sizeof(w))
    w.path = bpath
    w.wanted = targets
    w.n_wanted = n
    try:
        highest = 0
        for i in range(n):
            targets[i] = wants[i]
            if targets[i] > highest:
                highest = targets[i]
        w.cap_fillers = _filler_room(highest)
        w.kept = <int *>malloc((n + w.cap_fillers) * sizeof(int))
        if w.kept == NULL:
            raise MemoryError()
        w.fillers = w.kept + n
        with nogil:
            _walk_ptmx(&w)
        if w.step == WALK_OPEN:
            raise _stdlib_error(w.err, path)
        if w.step == WALK_PTN:
            raise _oserror("TIOCGPTN", w.err)
        if w.step == WALK_UNLOCK:
            raise _oserror("TIOCSPTLCK", w.err)
        if _walk_busy(&w):
            return (), wants[w.busy_at]
        return tuple([w.kept[i] for i in range(w.n_kept)]), -1
    finally:
        free(w.kept)
        free(targets)


# ---------------------------------------------------------------- control flow

def resumable_exit(self, exc_type, exc, tb):
    """``__exit__`` of idpin's context managers: ``self._exit(...)``, finished if interrupted.

    A C-level function, so no Python signal handler can run between the
    with statement and the call of ``self._exit`` (a Python ``__exit__`` can
    be interrupted at its very first instruction, before it releases
    anything). ``_exit`` is resumable: if exceptions (a handler's, Ctrl-C
    pressed again and again) land inside it, each further call finishes more
    of what the first began, up to EXIT_ATTEMPTS calls; then the first
    exception propagates. The loop is C: no handler runs between the calls.
    Signals held while it ran are delivered as it returns (idpin.signals).
    """
    try:
        result = finish(self._exit, exc_type, exc, tb)
    except BaseException:
        if _held_signals:
            _exit_door()
        raise
    if _held_signals:
        _exit_door()
    return result


# idpin.signals' held signals and what delivers them at a C-level exit.
_held_signals = {}
_exit_door = None


def set_exit_door(door, held):
    """Have ``resumable_exit`` call ``door()`` when ``held`` (a dict) is not empty."""
    global _exit_door, _held_signals
    _exit_door = door
    _held_signals = held


# Calls of a resumable exit before its first exception propagates: each
# lands between two of a handler's exceptions, so this bounds the
# interruptions survived in a row, not the work.
EXIT_ATTEMPTS = 16


# ---------------------------------------------------------------- records in the IPC namespace

cdef extern from "<mqueue.h>" nogil:
    ctypedef int mqd_t
    struct mq_attr:
        long mq_flags
        long mq_maxmsg
        long mq_msgsize
        long mq_curmsgs
    mqd_t mq_open(const char *name, int oflag, ...)
    int mq_send(mqd_t mqdes, const char *msg_ptr, size_t msg_len, unsigned int msg_prio)
    ssize_t mq_receive(mqd_t mqdes, char *msg_ptr, size_t msg_len, unsigned int *msg_prio)
    int mq_close(mqd_t mqdes)
    int mq_unlink(const char *name)

cdef extern from "<fcntl.h>" nogil:
    enum:
        O_RDONLY
        O_WRONLY
        O_CREAT
        O_EXCL
        O_NONBLOCK


def record_write(name, data):
    """Create the POSIX message queue ``name`` holding ``data`` as its one message.

    POSIX message queues belong to the IPC namespace and count against
    limits of their own, so a record can be written even when the SysV
    limits leave no room. FileExistsError if the record exists.
    """
    bname = os.fsencode(name)
    cdef bytes payload = bytes(data)
    cdef const char *cname = bname
    cdef const char *cdata = payload
    cdef size_t size = len(payload)
    cdef mq_attr attr
    cdef mqd_t queue
    cdef int rc, code
    memset(&attr, 0, sizeof(attr))
    attr.mq_maxmsg = 1
    attr.mq_msgsize = size if size > 0 else 1
    with nogil:
        queue = mq_open(cname, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, <unsigned int>0o600, &attr)
        code = errno
    if queue < 0:
        raise _stdlib_error(code, name)
    with nogil:
        rc = mq_send(queue, cdata, size, 0)
        code = errno
        mq_close(queue)
    if rc < 0:
        record_remove(name)
        raise _oserror("mq_send", code)


def record_read(name):
    """The message of the record ``name`` (left in place), or None if there is none."""
    bname = os.fsencode(name)
    cdef const char *cname = bname
    cdef mq_attr attr
    cdef mqd_t queue
    cdef ssize_t got
    cdef int code
    cdef char *buf
    with nogil:
        queue = mq_open(cname, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        code = errno
    if queue < 0:
        if code == 2:  # ENOENT
            return None
        raise _stdlib_error(code, name)
    try:
        # A fresh descriptor on a one-message queue: read without consuming
        # is not offered, so the message is received and the queue is the
        # record's only copy until it is removed.
        buf = <char *>malloc(65536)
        if buf == NULL:
            raise MemoryError()
        try:
            with nogil:
                got = mq_receive(queue, buf, 65536, NULL)
                code = errno
            if got < 0:
                if code == 11:  # EAGAIN: written but its message not yet, or already read
                    return b""
                raise _oserror("mq_receive", code)
            return buf[:got]
        finally:
            free(buf)
    finally:
        mq_close(queue)


def record_exists(name):
    """Whether the record ``name`` exists (its message, if any, left in place)."""
    bname = os.fsencode(name)
    cdef const char *cname = bname
    cdef mqd_t queue
    cdef int code
    with nogil:
        queue = mq_open(cname, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        code = errno
        if queue >= 0:
            mq_close(queue)
    if queue >= 0:
        return True
    if code == 2:  # ENOENT
        return False
    raise _stdlib_error(code, name)


def record_remove(name):
    """Remove the record ``name``; nothing if there is none."""
    bname = os.fsencode(name)
    cdef const char *cname = bname
    cdef int rc, code
    with nogil:
        rc = mq_unlink(cname)
        code = errno
    if rc < 0 and code != 2:  # ENOENT
        raise _stdlib_error(code, name)


# ---------------------------------------------------------------- signal dispositions

from posix.signal cimport sigaction_t, sigaction as c_sigaction, sigemptyset
from libc.string cimport memcpy


def sigaction(int signum, action):
    """Set ``signum``'s disposition; return the previous one as (handler, saved).

    ``action``: None (only read), an int handler (SIG_DFL 0 or SIG_IGN 1, set
    with an empty mask and no flags, as glibc's system() sets SIG_IGN) or the
    ``saved`` bytes of an earlier call (put back exactly). ``handler`` is the
    previous handler's value (0, 1 or an address). Unlike signal.signal it
    works in any thread and leaves Python's own handler table alone.
    """
    cdef sigaction_t new_action, old_action
    cdef const sigaction_t *new_ptr = NULL
    cdef bytes saved_new
    cdef int rc
    memset(&new_action, 0, sizeof(sigaction_t))
    memset(&old_action, 0, sizeof(sigaction_t))
    if isinstance(action, bytes):
        saved_new = action
        if len(saved_new) != sizeof(sigaction_t):
            raise ValueError("a saved sigaction is %d bytes, not %d"
                             % (sizeof(sigaction_t), len(saved_new)))
        memcpy(&new_action, <const char *>saved_new, sizeof(sigaction_t))
        new_ptr = &new_action
    elif action is not None:
        # The handler union is glibc's first member (declared here as a
        # function, so it is reached through a cast).
        (<void **>&new_action)[0] = <void *><uintptr_t>int(action)
        sigemptyset(&new_action.sa_mask)
        new_ptr = &new_action
    with nogil:
        rc = c_sigaction(signum, new_ptr, &old_action)
    if rc != 0:
        raise _oserror("sigaction", errno)
    return (<uintptr_t>(<void **>&old_action)[0],
            (<char *>&old_action)[:sizeof(sigaction_t)])


# ---------------------------------------------------------------- seccomp user notification

from libc.errno cimport ENOENT, EOPNOTSUPP
from libc.string cimport memcpy


def seccomp_listen(bpf, flags):
    """Install the classic-BPF program ``bpf`` (bytes, 8 per instruction) on
    this thread with SECCOMP_FILTER_FLAG_NEW_LISTENER | ``flags``; the listener fd.

    Meant for a launcher between fork and exec: the caller has set
    no_new_privs or holds CAP_SYS_ADMIN.
    """
    cdef bytes program = bytes(bpf)
    cdef sock_fprog prog
    cdef unsigned long cflags = PyLong_AsUnsignedLongMask(flags) | SECCOMP_FILTER_FLAG_NEW_LISTENER
    cdef long fd
    cdef int code
    if len(program) == 0 or len(program) % sizeof(sock_filter) or len(program) // sizeof(sock_filter) > 4096:
        raise ValueError("a seccomp filter is 1 to 4096 8-byte BPF instructions, got %d bytes" % len(program))
    prog.len = <unsigned short>(len(program) // sizeof(sock_filter))
    prog.filter = <sock_filter *><char *>program
    with nogil:
        fd = syscall(SYS_seccomp, <long>SECCOMP_SET_MODE_FILTER, cflags, &prog)
        code = errno
    if fd < 0:
        raise _oserror("seccomp(SET_MODE_FILTER)", code, "flags %#x" % cflags)
    return fd


def seccomp_notif_sizes():
    """(struct seccomp_notif, seccomp_notif_resp, seccomp_data) sizes as this kernel has them."""
    cdef notif_sizes sizes
    if syscall(SYS_seccomp, <long>SECCOMP_GET_NOTIF_SIZES, <long>0, &sizes) != 0:
        raise _oserror("seccomp(GET_NOTIF_SIZES)", errno)
    return sizes.seccomp_notif, sizes.seccomp_notif_resp, sizes.seccomp_data


def seccomp_action_avail(action):
    """Whether this kernel knows the filter return value ``action``."""
    cdef uint32_t caction = <uint32_t>PyLong_AsUnsignedLongMask(action)
    if syscall(SYS_seccomp, <long>SECCOMP_GET_ACTION_AVAIL, <long>0, &caction) == 0:
        return True
    if errno == EOPNOTSUPP:
        return False
    raise _oserror("seccomp(GET_ACTION_AVAIL)", errno)



cdef tuple _notification(seccomp_notif *n):
    d = &n.data
    return (n.id, n.pid, d.nr, d.arch, d.instruction_pointer,
            (d.args[0], d.args[1], d.args[2], d.args[3], d.args[4], d.args[5]))


cdef int _recv(int fd, seccomp_notif *n) noexcept nogil:
    # The kernel refuses a buffer that is not zeroed (it keeps the struct
    # extensible), so clear it before every receive.
    memset(n, 0, sizeof(seccomp_notif))
    return ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, n)


cdef int _send(int fd, uint64_t id, int64_t val, int32_t error, uint32_t flags) noexcept nogil:
    cdef seccomp_notif_resp resp
    memset(&resp, 0, sizeof(resp))
    resp.id = id
    resp.val = val
    resp.error = error
    resp.flags = flags
    return ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, &resp)


def notif_recv(fd):
    """One notification (id, pid, nr, arch, ip, args), or None when the call
    went away before it was received (ENOENT: a normal event)."""
    cdef int cfd = _c_int(fd)
    cdef seccomp_notif n
    cdef int rc, code
    while True:
        with nogil:
            rc = _recv(cfd, &n)
            code = errno
        if rc == 0:
            return _notification(&n)
        if code == ENOENT:
            return None
        if code != EINTR:
            raise _oserror("SECCOMP_IOCTL_NOTIF_RECV", code)
        PyErr_CheckSignals()


def notif_send(fd, id, val, error, flags):
    """Answer notification ``id``: True, or False when its caller is gone (ENOENT)."""
    cdef int cfd = _c_int(fd)
    cdef uint64_t cid = id
    cdef int64_t cval = val
    cdef int32_t cerror = error
    cdef uint32_t cflags = flags
    cdef int rc, code
    with nogil:
        rc = _send(cfd, cid, cval, cerror, cflags)
        code = errno
    if rc == 0:
        return True
    if code == ENOENT:
        return False
    raise _oserror("SECCOMP_IOCTL_NOTIF_SEND", code, "id %d" % id)


def notif_id_valid(fd, id):
    """Whether notification ``id`` still waits: what was read of its caller's
    memory since it was received is that call's."""
    cdef int cfd = _c_int(fd)
    cdef uint64_t cid = id
    cdef int rc, code
    with nogil:
        rc = ioctl(cfd, SECCOMP_IOCTL_NOTIF_ID_VALID, &cid)
        code = errno
    if rc == 0:
        return True
    if code == ENOENT:
        return False
    raise _oserror("SECCOMP_IOCTL_NOTIF_ID_VALID", code)


def notif_addfd(fd, id, srcfd, newfd, flags, newfd_flags=0):
    """Install our ``srcfd`` in the caller of notification ``id``; the fd number there.

    flags: SECCOMP_ADDFD_FLAG_SETFD (at ``newfd``), SECCOMP_ADDFD_FLAG_SEND
    (also answer the call with that number, atomically); newfd_flags:
    O_CLOEXEC or 0.
    """
    cdef int cfd = _c_int(fd)
    cdef seccomp_notif_addfd add
    cdef int rc, code
    memset(&add, 0, sizeof(add))
    add.id = id
    add.flags = flags
    add.srcfd = srcfd
    add.newfd = newfd
    add.newfd_flags = newfd_flags
    with nogil:
        rc = ioctl(cfd, SECCOMP_IOCTL_NOTIF_ADDFD, &add)
        code = errno
    if rc < 0:
        raise _oserror("SECCOMP_IOCTL_NOTIF_ADDFD", code, "id %d" % id)
    return rc


def notif_set_flags(fd, flags):
    """SECCOMP_IOCTL_NOTIF_SET_FLAGS (6.6): e.g. SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP."""
    cdef int cfd = _c_int(fd)
    cdef uint64_t cflags = flags
    cdef int rc, code
    with nogil:
        rc = ioctl(cfd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, cflags)
        code = errno
    if rc != 0:
        raise _oserror("SECCOMP_IOCTL_NOTIF_SET_FLAGS", code)


cdef enum LoopEnd:
    LOOP_NOTIFIED
    LOOP_STOPPED
    LOOP_EXTRA
    LOOP_FAILED


cdef int _loop(int fd, int stop_fd, int extra_fd, uint32_t *control, seccomp_notif *n,
               int *err) noexcept nogil:
    # Receive eagerly (a trapped call sleeps interruptibly until received: a
    # signal then would fail it), answer CONTINUE here for calls nobody asked
    # anything of, and hand the others back. poll first: a blocked RECV would
    # not wake when the last target exits or when we are told to stop.
    cdef pollfd fds[3]
    fds[0].fd = fd
    fds[0].events = POLLIN
    fds[1].fd = stop_fd
    fds[1].events = POLLIN
    # The listener is polled before the extra fd: a request written there
    # before a trapped call is then always seen with (or before) that call.
    fds[2].fd = extra_fd
    fds[2].events = POLLIN
    while True:
        fds[0].revents = 0
        fds[1].revents = 0
        fds[2].revents = 0
        if poll(fds, 3, -1) < 0:
            if errno == EINTR:
                continue
            err[0] = errno
            return LOOP_FAILED
        if fds[1].revents:
            return LOOP_STOPPED
        if fds[2].revents:
            return LOOP_EXTRA
        if not (fds[0].revents & POLLIN):
            # POLLHUP: every task using the filter is gone.
            return LOOP_STOPPED
        if _recv(fd, n) != 0:
            if errno == ENOENT or errno == EINTR:
                continue
            err[0] = errno
            return LOOP_FAILED
        if n.data.arch == control[3] and (
                (control[0] and <uint32_t>n.data.nr != control[2])
                or (control[4] and (<uint32_t>n.data.nr == control[5]
                                    or <uint32_t>n.data.nr == control[6]))):
            # ENOENT from SEND: the caller is gone, nothing to answer.
            _send(fd, n.id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)
            control[1] += 1
            continue
        return LOOP_NOTIFIED


def notif_loop(fd, stop_fd, extra_fd, control):
    """Receive until a call needs idpin: its notification tuple, None when
    ``stop_fd`` is readable or no target is left, () when ``extra_fd`` (-1:
    none) is readable.

    ``control`` is a writable buffer of 7 uint32 read on every notification:
    [0] nonzero = answer CONTINUE here for every call of arch [3] whose
    syscall number is not [2]; [4] nonzero = also for syscall numbers [5]
    and [6] of arch [3]; [1] counts those answers.
    """
    cdef int cfd = _c_int(fd)
    cdef int cstop = _c_int(stop_fd)
    cdef int cextra = _c_int(extra_fd)
    cdef unsigned char[::1] view = control
    if view.shape[0] < 28:
        raise ValueError("the loop control buffer needs 7 uint32")
    cdef uint32_t *ctl = <uint32_t *>&view[0]
    cdef seccomp_notif n
    cdef int err = 0
    cdef int end
    with nogil:
        end = _loop(cfd, cstop, cextra, ctl, &n, &err)
    if end == LOOP_STOPPED:
        return None
    if end == LOOP_EXTRA:
        return ()
    if end == LOOP_FAILED:
        raise _oserror("seccomp notification loop", err)
    return _notification(&n)


def process_vm_read(pid, addr, size):
    """``size`` bytes at ``addr`` in process ``pid`` (check NOTIF_ID_VALID after)."""
    cdef int cpid = pid
    cdef Py_ssize_t csize = size
    cdef iovec local, remote
    cdef ssize_t got
    cdef int code
    buf = bytearray(csize)
    cdef unsigned char[::1] view = buf
    if csize == 0:
        return b""
    local.iov_base = &view[0]
    local.iov_len = csize
    remote.iov_base = <void *><uintptr_t>PyLong_AsUnsignedLongMask(addr)
    remote.iov_len = csize
    with nogil:
        got = process_vm_readv(cpid, &local, 1, &remote, 1, 0)
        code = errno
    if got < 0:
        raise _oserror("process_vm_readv", code, "pid %d" % pid)
    return bytes(buf[:got])


def pidfd_getfd(pidfd, targetfd):
    """A copy of fd ``targetfd`` of the process behind ``pidfd`` (close-on-exec)."""
    cdef long rc
    cdef int code
    cdef int cpidfd = _c_int(pidfd)
    cdef int ctarget = _c_int(targetfd)
    with nogil:
        rc = syscall(SYS_pidfd_getfd, cpidfd, ctarget, <long>0)
        code = errno
    if rc < 0:
        raise _oserror("pidfd_getfd", code, "fd %d" % targetfd)
    return rc


def finish(fn, *args):
    """``fn(*args)``, called again while it raises, up to EXIT_ATTEMPTS calls; its result.

    For cleanup that must complete even while signal handlers keep raising
    (Ctrl-C pressed again and again): ``fn`` must be resumable, each call
    finishing what an interrupted one began. A C loop, so no handler runs
    between the calls; the first exception propagates once ``fn`` is done.
    """
    cdef int attempt
    first = None
    for attempt in range(EXIT_ATTEMPTS):
        try:
            result = fn(*args)
        except BaseException as err:
            if first is None:
                first = err
            continue
        if first is None:
            return result
        break
    raise first


from libc.errno cimport ESRCH, EEXIST
from libc.stdio cimport snprintf
from libc.stdlib cimport strtol
from posix.signal cimport kill


# -- idpin.fork's fast path ------------------------------------------------------------
#
# Every page the parent writes between two forks costs it a fault (fork
# write-protects them all), and Python touches many pages per call: the code
# objects' inline caches, frames, the refcounts of every object named. So the
# common case (an explicit pid, one level, a single-threaded process, the
# Cython backend) is decided and made here, from C variables that Python
# (idpin.pids) sets once per process: anything else is the Python path.

cdef bint _fast_armed = False
cdef int _fast_task_fd = -1
cdef long _fast_pid_max = 0
cdef Py_ssize_t _fast_tid_offset = 0
cdef unsigned long _fast_main_thread = 0
cdef bint _inside_fast_fork = False
cdef bint _clone3_armed = False
# The knob path's (armed apart, by the first knob-path fork): a description of
# the pid namespace file of its own (its flock excludes every other holder's),
# ns_last_pid, and the name of the cursor record.
cdef bint _knob_armed = False
cdef int _knob_lock_fd = -1
cdef int _knob_fd = -1
cdef bytes _knob_record = None
cdef unsigned long _knob_pid_namespace = 0
# Whether a thread is inside _knob_fork_locked: it can let the GIL go (at-fork
# hooks) while it holds the flock, and a flock is its description's, so another
# thread locking or unlocking _knob_lock_fd would share or drop it.
cdef bint _knob_in_use = False
cdef object _fast_slow = None
cdef object _fast_door_exit = None
cdef object _fast_undo = None
cdef dict _fast_held = None


def set_fork_paths(slow, door_exit, undo, held):
    """The Python path (``slow(pid, mechanism)``); the door's delivery of held signals
    (``door_exit(child, undo)``, which calls ``undo(child)`` if a handler raises); the
    held signals' dict."""
    global _fast_slow, _fast_door_exit, _fast_undo, _fast_held
    _fast_slow, _fast_door_exit, _fast_undo, _fast_held = slow, door_exit, undo, held


def arm_fast_fork(task_fd, pid_max, tid_offset, main_thread):
    """Let fork() take the fast path: the fd of /proc/self/task (its link count says
    how many threads there are), this pid namespace's pid_max, glibc's tid offset
    (None: no clone3 path), the main thread (signal handlers run there)."""
    global _fast_armed, _fast_task_fd, _fast_pid_max, _fast_tid_offset, _fast_main_thread
    global _clone3_armed
    _fast_task_fd, _fast_pid_max, _fast_main_thread = task_fd, pid_max, main_thread
    _clone3_armed = tid_offset is not None
    _fast_tid_offset = tid_offset if _clone3_armed else 0
    _fast_armed = True


def arm_fast_knob_fork(lock_fd, knob_fd, record_name):
    """Let fork() make knob-path forks too (see _knob_fork_locked)."""
    global _knob_armed, _knob_lock_fd, _knob_fd, _knob_record, _knob_pid_namespace
    _knob_lock_fd, _knob_fd, _knob_record = lock_fd, knob_fd, os.fsencode(record_name)
    _knob_pid_namespace = os.fstat(lock_fd).st_ino  # lock_fd is /proc/self/ns/pid's
    _knob_armed = True


def disarm_fast_fork():
    global _fast_armed, _knob_armed
    _fast_armed = _knob_armed = False


def forget_fast_fork_in_child():
    """In a forked child: its task fd and thread count are not its parent's, and a
    fork made by another thread while the main thread was inside fork() (letting
    the GIL go in an at-fork hook) must not leave the child holding every signal."""
    global _inside_fast_fork
    _inside_fast_fork = False
    disarm_fast_fork()


def fast_fork_armed():
    return bool(_fast_armed)


def inside_fast_fork():
    """Whether the fast path is forking: a signal arriving now arrived inside idpin."""
    return bool(_inside_fast_fork)


cdef int _fast_mechanism(pid, mechanism, long *value):
    """FAST_CLONE3, FAST_KNOB, or FAST_NONE (the Python path decides)."""
    cdef libc_stat.struct_stat st
    cdef bint main
    if not _fast_armed or type(pid) is not int:
        return FAST_NONE
    if not 1 <= pid < _fast_pid_max:
        return FAST_NONE
    value[0] = pid
    if libc_stat.fstat(_fast_task_fd, &st) != 0:
        return FAST_NONE
    main = PyThread_get_thread_ident() == _fast_main_thread
    # procfs counts a task directory's links as 2 + its threads.
    if (_clone3_armed and st.st_nlink == 3 and main
            and (mechanism is None or mechanism == "clone3")):
        return FAST_CLONE3
    if (_knob_armed and (mechanism == "ns_last_pid" or (mechanism is None and st.st_nlink > 3))
            and _children_born_here()):
        return FAST_KNOB
    return FAST_NONE


cdef bint _children_born_here():
    """Whether this process's children are born in its own pid namespace: after
    unshare(CLONE_NEWPID) they are not, ns_last_pid cannot reach theirs, and the
    Python path refuses (the link is missing while that namespace has no init)."""
    cdef libc_stat.struct_stat st
    return (libc_stat.stat(b"/proc/self/ns/pid_for_children", &st) == 0
            and st.st_ino == _knob_pid_namespace)


cdef enum:
    FAST_NONE
    FAST_CLONE3
    FAST_KNOB


cdef long _knob_fork_locked(long want, bint *refused) except? -2:
    """_knob_fork_flocked, unless another thread of this process is inside it (then
    ``*refused``: the Python path waits for the lock on a description of its own)."""
    global _knob_in_use
    if _knob_in_use:
        refused[0] = True
        return -1
    _knob_in_use = True
    try:
        return _knob_fork_flocked(want, refused)
    finally:
        _knob_in_use = False


cdef long _knob_fork_flocked(long want, bint *refused) except? -2:
    """The knob path as idpin's Python path makes it, in one step: the pid lock
    (never waited for), the cursor record, ns_last_pid, fork, and back.

    ``*refused``: nothing was done, the Python path must decide (the lock is
    held by someone, a killed holder's record is there to act on, the pid is
    taken, a syscall failed). A child born with another pid (a fork outside
    the lock took the cursor) exits at once with 125, before any Python runs.
    """
    cdef char text[64]
    cdef char previous_text[32]
    cdef int size, child
    cdef int code = 0
    cdef ssize_t got
    cdef long previous
    cdef mq_attr attr
    cdef mqd_t record = -1
    refused[0] = True
    if kill(<int>want, 0) == 0 or errno != ESRCH:
        return -1
    if c_flock(_knob_lock_fd, LOCK_EX | LOCK_NB) != 0:
        return -1
    got = pread(_knob_fd, previous_text, sizeof(previous_text) - 1, 0)
    if got <= 0:
        c_flock(_knob_lock_fd, LOCK_UN)
        return -1
    previous_text[got] = 0
    previous = strtol(previous_text, NULL, 10)
    size = snprintf(text, sizeof(text), "%ld %ld", previous, want - 1)
    memset(&attr, 0, sizeof(attr))
    attr.mq_maxmsg = 1
    attr.mq_msgsize = size
    record = mq_open(<const char *>_knob_record, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
                     <unsigned int>0o600, &attr)
    if record < 0:
        if errno == EEXIST:  # a killed holder's: the Python path puts its cursor back
            c_flock(_knob_lock_fd, LOCK_UN)
            return -1
        # No room for a POSIX queue: armed without a record, as the Python path does.
    elif mq_send(record, text, size, 0) != 0:
        mq_close(record)
        mq_unlink(<const char *>_knob_record)
        c_flock(_knob_lock_fd, LOCK_UN)
        return -1
    else:
        mq_close(record)
    size = snprintf(text, sizeof(text), "%ld", want - 1)
    child = _knob_fork_raw(_knob_fd, text, size, <int>want, &code)
    if child == 0:
        return 0
    if child < 0:
        child = -1  # not written, or no fork: the Python path explains
    else:
        refused[0] = False
    # The knob was consumed by the fork (or never written): the record goes.
    if record >= 0:
        mq_unlink(<const char *>_knob_record)
    c_flock(_knob_lock_fd, LOCK_UN)
    return child


def fork(pid=None, mechanism=None):
    """Fork; the child gets ``pid`` (or this thread's pending pid request).

    Returns 0 in the child and the child's pid in the parent, like os.fork.
    ``mechanism`` forces "clone3" or "ns_last_pid" (default: decided per fork).
    """
    global _inside_fast_fork, _fast_armed
    cdef long value = 0
    cdef int tid
    cdef int code = 0
    cdef long child
    cdef bint refused = False
    cdef int how = _fast_mechanism(pid, mechanism, &value)
    cdef bint main = PyThread_get_thread_ident() == _fast_main_thread
    if how == FAST_NONE:
        return _fast_slow(pid, mechanism)
    tid = <int>value
    # A signal arriving from here (an at-fork hook's, one during the fork) is
    # held, as inside any of idpin's doors, and delivered below. Only the main
    # thread runs Python handlers: another thread holds nothing.
    # Only the thread that set it clears it: another thread's fork (the GIL can
    # be let go in an at-fork hook) must not end the main thread's hold.
    if main:
        _inside_fast_fork = True
    if how == FAST_CLONE3:
        child = _clone3_raw(&tid, 1, _fast_tid_offset, 0, &code)
    else:
        child = _knob_fork_locked(value, &refused)
    if child == 0:
        _inside_fast_fork = False
        _fast_armed = False  # the child's fd and thread count are not these
        return 0
    if child < 0:
        if main:
            _inside_fast_fork = False
        return _fast_slow(pid, mechanism)  # tried again, translated or explained there
    try:
        # Idpin's handler wrappers hold what arrived; a handler installed
        # around them runs now, and if it raises the caller never gets the child.
        PyErr_CheckSignals()
    except BaseException:
        if main:
            _inside_fast_fork = False
        finish(_fast_undo, child)
        raise
    if main:
        _inside_fast_fork = False
    if how == FAST_KNOB and child != value:
        # (clone3 set_tid gives that pid or fails; after unshare(CLONE_NEWPID) it is
        # the child's own namespace's, and the parent sees another.)
        # A fork outside the lock took the cursor: that child exits at once; the
        # Python path retries, or says why not.
        finish(_fast_undo, child)
        return _fast_slow(pid, mechanism)
    if main and _fast_held:
        return _fast_door_exit(child, _fast_undo)
    return child
