"""The supervisor's seccomp filter, built with libseccomp through ctypes.

libseccomp gets the ABI details right that a hand-written BPF program gets
wrong: every architecture a process on this machine can enter the kernel
with (x86-64, and the i386 and x32 ABIs of the same process), the x32 bit,
and the 64-bit argument comparisons. Its runtime (libseccomp.so.2) is on
every Debian system; its headers are not needed: the few entry points used
here are declared below. No released Python binding can drive a listener fd
it did not create (KERNEL.md), so this module only *builds* the program and
exports its BPF; ``idpin._sys.seccomp_listen`` installs it (with
NEW_LISTENER and, where the kernel has it, WAIT_KILLABLE_RECV) in the
launcher, between fork and exec, and idpin's own loop drives the listener.

What is trapped: clone, clone3, fork, vfork; exit and exit_group (answered
at once; see EXIT_CALLS); semget, shmget, msgget (and
i386's ipc multiplexer); ioctl TIOCGPTN and TIOCGPTPEER (the first thing a
pty allocation does with a new master: glibc's grantpt and openpty, and
Python's os.openpty through them); and write on the request fd. Only the
ioctl command and the fd number are matched: no other ioctl or write pays
for a round trip. Opens of /dev/ptmx cannot be matched (BPF sees no paths),
and trapping every open would make every file a program opens pay one.
"""
import ctypes
import ctypes.util
import os

from ..errors import UnsupportedError
from .. import _sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_NOTIFY = 0x7FC00000
SCMP_CMP_MASKED_EQ = 7
SCMP_ARCH_X86_64 = 0xC000003E
SCMP_ARCH_X86 = 0x40000003
SCMP_ARCH_X32 = 0x4000003E
NATIVE_ARCH = SCMP_ARCH_X86_64

PROCESS_CALLS = ("clone", "clone3", "fork", "vfork")
# Trapped so that a task born to a pinned clone cannot be gone before it is
# verified: while a verification runs, its exit waits in the queue.
EXIT_CALLS = ("exit", "exit_group")
IPC_CALLS = ("semget", "shmget", "msgget")
PTY_IOCTLS = (_sys.TIOCGPTN, _sys.TIOCGPTPEER)
_LOW32 = 0xFFFFFFFF


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


_lib = None


def libseccomp():
    """The libseccomp runtime, loaded once; UnsupportedError with the fix if absent."""
    global _lib
    if _lib is None:
        try:
            # The soname first: find_library runs ldconfig, a process that
            # takes a pid in a namespace whose pids a plan names.
            lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        except OSError:
            lib = None
        name = None if lib is not None else ctypes.util.find_library("seccomp")
        try:
            lib = lib or ctypes.CDLL(name or "libseccomp.so.2", use_errno=True)
        except OSError:
            raise UnsupportedError(
                "the seccomp supervisor needs libseccomp's runtime library (libseccomp.so.2): "
                "install it, e.g. 'apt-get install libseccomp2'"
            ) from None
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
        lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        _lib = lib
    return _lib


def syscall_number(name, arch=NATIVE_ARCH):
    """The number of syscall ``name`` on ``arch``, or None where it does not exist."""
    nr = libseccomp().seccomp_syscall_resolve_name_arch(arch, name.encode())
    return None if nr < 0 else nr


def syscall_names():
    """{(arch, nr): name} of every trapped call, for the supervisor's dispatch."""
    names = {}
    for arch in (SCMP_ARCH_X86_64, SCMP_ARCH_X86, SCMP_ARCH_X32):
        for name in PROCESS_CALLS + EXIT_CALLS + IPC_CALLS + ("ioctl", "write", "ipc"):
            nr = syscall_number(name, arch)
            if nr is not None:
                names[(arch, nr)] = name
    return names


def _check(rc, what):
    if rc < 0:
        raise OSError(-rc, "libseccomp %s: %s" % (what, os.strerror(-rc)))


def _masked_eq(arg, value):
    return _ArgCmp(arg, SCMP_CMP_MASKED_EQ, _LOW32, value & _LOW32)


def _notify(lib, ctx, name, *cmps):
    nr = lib.seccomp_syscall_resolve_name_arch(NATIVE_ARCH, name.encode())
    if nr < 0:
        return  # not a syscall of this architecture (fork on arm64, say)
    array = (_ArgCmp * max(1, len(cmps)))(*cmps)
    _check(lib.seccomp_rule_add_array(ctx, SCMP_ACT_NOTIFY, nr, len(cmps), array), "rule for " + name)


def build_bpf(request_fd=None, only=None):
    """The filter's BPF program (bytes) trapping idpin's calls.

    request_fd: the fd number whose writes are requests ($IDPIN_REQUEST_FD).
    only: trap just these syscall names instead (the feature probe).
    """
    lib = libseccomp()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError(ctypes.get_errno(), "libseccomp seccomp_init failed")
    try:
        for arch in (SCMP_ARCH_X86, SCMP_ARCH_X32):
            # A 64-bit process can still enter through these ABIs; without
            # them in the filter it would allocate unseen.
            _check(lib.seccomp_arch_add(ctx, arch), "arch_add")
        if only is not None:
            for name in only:
                _notify(lib, ctx, name)
            return _export(lib, ctx)
        for name in PROCESS_CALLS + EXIT_CALLS + IPC_CALLS:
            _notify(lib, ctx, name)
        for command in PTY_IOCTLS:
            _notify(lib, ctx, "ioctl", _masked_eq(1, command))
        if request_fd is not None:
            _notify(lib, ctx, "write", _masked_eq(0, request_fd))
        return _export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)


def _export(lib, ctx):
    fd = os.memfd_create("idpin-seccomp-bpf", os.MFD_CLOEXEC)
    try:
        _check(lib.seccomp_export_bpf(ctx, fd), "export_bpf")
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)
