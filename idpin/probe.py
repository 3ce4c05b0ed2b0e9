"""What this system lets idpin do, kind by kind, and why not.

Probing has no side effects: clone3 privilege is read off a clone3 that
cannot create a child (its set_tid is this process's own pid: the kernel
checks privilege before it finds the pid taken), and IPC knob privilege off
an open for writing (the kernel checks it at open), with nothing written.
"""
import errno
import os
from typing import NamedTuple

from . import _sys, ipc, pids, signals
from . import pty as idpin_pty
from .errors import NEEDS_NAMESPACE_HINT, UnsupportedError


class Capability(NamedTuple):
    """Whether idpin can honour a kind here (ok), with which mechanism, and if
    not, why and how to fix it (reason)."""

    ok: bool
    mechanism: str
    reason: str


_NO_PRIVILEGE = (
    "no CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN over this process's %s namespace; "
    + NEEDS_NAMESPACE_HINT
)


KINDS = ("pid", "tid", "sem", "shm", "msg", "pty")

# The inode numbers of the host's initial namespaces: fixed by the kernel
# (PROC_PID_INIT_INO and PROC_IPC_INIT_INO in include/linux/proc_ns.h).
# Children are created in pid_for_children (it differs from pid after an
# unshare(CLONE_NEWPID); it is missing until that namespace's first child).
INITIAL_NAMESPACE_INODES = {"pid_for_children": 0xEFFFFFFC, "ipc": 0xEFFFFFFF}
NAMESPACE_OF = {"pid": "pid", "tid": "pid", "sem": "ipc", "shm": "ipc", "msg": "ipc"}


@signals.door()
def probe() -> dict[str, Capability]:
    """dict kind -> Capability for pid, tid, sem, shm, msg and pty."""
    caps = {"pid": probe_pid(), "tid": probe_tid()}
    for kind in ipc.KINDS:
        caps[kind] = probe_ipc(kind)
    caps["pty"] = probe_pty()
    return caps


def probe_supervisor() -> dict[str, Capability]:
    """dict feature -> Capability of the seccomp supervisor's kernel features."""
    from .interpose.features import probe_supervisor as probe_features

    return probe_features()


def clone3_errno() -> int:
    return _sys.clone3_probe((os.getpid(),))


def probe_pid() -> Capability:
    if pids.children_in_new_pid_namespace():
        # A clone3 probe there could create the namespace's init: not probed.
        return Capability(True, "clone3", "not probed: the next child is the init of a new pid "
                          "namespace and must be pid 1 (or a tuple starting with 1)")
    code = clone3_errno()
    if code == errno.EPERM:
        return Capability(False, "clone3", _NO_PRIVILEGE % "pid")
    if code in (errno.ENOSYS, errno.E2BIG):
        knob = probe_tid()
        reason = knob.reason or "clone3 set_tid is missing (Linux < 5.5): ns_last_pid is used"
        return Capability(knob.ok, "ns_last_pid", reason)
    if code != errno.EEXIST:
        return Capability(False, "clone3", "clone3 probe failed: %s" % os.strerror(code))
    if pids.thread_count() > 1:
        return Capability(True, "ns_last_pid", "")
    return Capability(True, "clone3", "")


def probe_tid() -> Capability:
    if pids.children_in_new_pid_namespace():
        return _knob_present("ns_last_pid")
    code = clone3_errno()
    if code == errno.EPERM:
        return Capability(False, "ns_last_pid", _NO_PRIVILEGE % "pid")
    if code == errno.EEXIST:
        # The ns_last_pid write and clone3 set_tid check the same capability.
        return _knob_present("ns_last_pid")
    return _knob_writable_by_rewrite("ns_last_pid")


def _knob_present(name: str) -> Capability:
    if os.path.exists("/proc/sys/kernel/" + name):
        return Capability(True, name, "")
    return Capability(
        False, name, "/proc/sys/kernel/%s is missing: the kernel lacks CONFIG_CHECKPOINT_RESTORE" % name
    )


def _knob_writable_by_rewrite(name: str) -> Capability:
    # Only on kernels without clone3: rewrite the value read, under the lock.
    from . import knobs

    try:
        lock = knobs.namespace_lock("pid")
        with lock.held():
            fd = lock.knob(name)
            knobs.write_knob(fd, name, _sys.knob_read(fd))
    except UnsupportedError as err:
        return Capability(False, name, str(err))
    return Capability(True, name, "")


def probe_ipc(kind: str) -> Capability:
    name = ipc.KNOB[kind]
    try:
        fd = os.open("/proc/sys/kernel/" + name, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return _knob_present(name)
    except PermissionError:
        return Capability(False, name, _NO_PRIVILEGE % "IPC")
    os.close(fd)
    return Capability(True, name, "")


def probe_pty() -> Capability:
    try:
        instance = idpin_pty.find_instance()
    except UnsupportedError as err:
        return Capability(False, "ptmx-walk", str(err))
    if not os.access(instance.ptmx, os.R_OK | os.W_OK):
        return Capability(False, "ptmx-walk", "%s is not readable and writable" % instance.ptmx)
    return Capability(True, "ptmx-walk", "")


def host_namespaces() -> list[str]:
    """The namespaces of ours ("pid", "ipc") that are the host's initial ones.

    Pinning an id there writes the host's own knobs and takes ids the host's
    other processes would have got.
    """
    found = []
    for name, inode in INITIAL_NAMESPACE_INODES.items():
        try:
            if os.stat("/proc/self/ns/" + name).st_ino == inode:
                found.append(name.split("_")[0])
        except FileNotFoundError:
            pass
    return found
