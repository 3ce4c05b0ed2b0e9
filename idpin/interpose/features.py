"""Which seccomp user-notification features this kernel has, tried for real.

A forked child installs a filter trapping getppid (with no_new_privs: it
changes nothing else and dies with the child) and makes two trapped calls;
this process answers them using each feature once. Kernel versions:
user notification 5.0, FLAG_CONTINUE 5.5, NOTIF_ADDFD 5.9,
ADDFD_FLAG_SEND 5.14, WAIT_KILLABLE_RECV 5.19, SYNC_WAKE_UP 6.6.
"""
import errno
import os
import select
import socket

from .. import _sys
from ..errors import UnsupportedError
from ..probe import Capability
from . import filter as seccomp_filter

FEATURES = {
    "user notification": ("SECCOMP_RET_USER_NOTIF", "5.0"),
    "CONTINUE": ("SECCOMP_USER_NOTIF_FLAG_CONTINUE", "5.5"),
    "ADDFD": ("SECCOMP_IOCTL_NOTIF_ADDFD", "5.9"),
    "ADDFD_FLAG_SEND": ("SECCOMP_ADDFD_FLAG_SEND", "5.14"),
    "WAIT_KILLABLE_RECV": ("SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV", "5.19"),
    "SYNC_WAKE_UP": ("SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP", "6.6"),
}
_WAIT_SECONDS = 5.0


def _cap(name, ok, reason=""):
    mechanism, version = FEATURES[name]
    if not ok and not reason:
        reason = "the kernel lacks it (Linux %s or later has it)" % version
    return Capability(ok, mechanism, reason)


def probe_supervisor():
    """{feature: Capability} of the supervisor's kernel features."""
    if not _sys.seccomp_action_avail(_sys.SECCOMP_RET_USER_NOTIF):
        return {name: _cap(name, False, "no seccomp user notification (Linux 5.0)") for name in FEATURES}
    try:
        bpf = seccomp_filter.build_bpf(only=("getppid",))
    except UnsupportedError as err:
        return {name: _cap(name, False, str(err)) for name in FEATURES}
    ours, theirs = socket.socketpair()
    child = os.fork()
    if child == 0:
        _trapped_child(bpf, theirs)
    theirs.close()
    try:
        return _answer_child(ours)
    finally:
        ours.close()
        try:
            os.kill(child, 9)
        except ProcessLookupError:
            pass
        os.waitpid(child, 0)


def _trapped_child(bpf, sock):
    try:
        _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
        try:
            fd, killable = _sys.seccomp_listen(bpf, _sys.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV), b"1"
        except OSError:
            fd, killable = _sys.seccomp_listen(bpf, 0), b"0"
        socket.send_fds(sock, [killable], [fd])
        os.close(fd)
        os.getppid()
        os.getppid()
    finally:
        os._exit(0)


def _receive(listener):
    if not select.select([listener], [], [], _WAIT_SECONDS)[0]:
        raise TimeoutError("the probe child made no trapped call")
    return _sys.notif_recv(listener)


def _answer_child(sock):
    caps = {"user notification": _cap("user notification", True)}
    killable, fds, _, _ = socket.recv_fds(sock, 1, 1)
    listener = fds[0]
    try:
        caps["WAIT_KILLABLE_RECV"] = _cap("WAIT_KILLABLE_RECV", killable == b"1")
        caps["SYNC_WAKE_UP"] = _cap("SYNC_WAKE_UP", _try(
            _sys.notif_set_flags, listener, _sys.SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP))
        first = _receive(listener)
        continued = _try(_sys.notif_send, listener, first[0], 0, 0, _sys.SECCOMP_USER_NOTIF_FLAG_CONTINUE)
        if not continued:
            _sys.notif_send(listener, first[0], os.getpid(), 0, 0)
        caps["CONTINUE"] = _cap("CONTINUE", continued)
        second = _receive(listener)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            caps["ADDFD"] = _cap("ADDFD", _try(_sys.notif_addfd, listener, second[0], null, 0, 0))
            sent = _try(_sys.notif_addfd, listener, second[0], null, 0, _sys.SECCOMP_ADDFD_FLAG_SEND)
        finally:
            os.close(null)
        if not sent:
            _sys.notif_send(listener, second[0], 0, 0, 0)
        caps["ADDFD_FLAG_SEND"] = _cap("ADDFD_FLAG_SEND", sent)
    finally:
        os.close(listener)
    return {name: caps[name] for name in FEATURES}


def _try(call, *args):
    try:
        call(*args)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.ENOTTY, errno.EOPNOTSUPP):
            return False
        raise
    return True
