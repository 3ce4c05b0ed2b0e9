"""idpin: get back exact pids, tids, SysV IPC ids and pty numbers.

    with idpin.request(pid=1234):
        pid = os.fork()          # 1234 in the parent; os.getpid() == 1234 in the child

A request is per thread and one-shot per kind; the id is exactly right or the
allocation raises IdBusyError. See README.md for the contract.

Importing idpin replaces os.fork, os.forkpty, os.openpty, pty.fork,
pty.openpty, threading.Thread.start and the stdlib's process creation
(subprocess, os.posix_spawn, os.posix_spawnp, os.system) for the whole
process with versions routed through idpin (ordinary calls when no request
is pending), and signal.signal and signal.getsignal, so that Python signal
handlers run only as an idpin call returns, never inside it (idpin.signals);
idpin.uninstall() puts the originals back and idpin.install() routes again.
"""
from . import _sys
from .errors import IdBusyError, IdpinError, LockTimeoutError, RequestError, UnsupportedError
from .knobs import lock_timeout, set_lock_timeout
from .request import Request, request
from . import pids, tids, ipc, pty  # noqa: E402  (each registers its kind)
from .pids import fork
from .probe import Capability, probe
from .interpose import stdlib as _stdlib
from .interpose.stdlib import install, installed, uninstall
from .interpose.supervisor import Supervisor

__version__ = "0.1.0"
__all__ = [
    "Capability", "IdBusyError", "IdpinError", "LockTimeoutError", "Request", "RequestError",
    "Supervisor", "UnsupportedError", "fork", "install", "installed", "ipc", "lock_timeout", "probe",
    "pty", "request", "set_lock_timeout", "uninstall",
]

for _name in ("Request", "request", "fork", "probe", "Capability", "install", "installed", "uninstall",
              "lock_timeout", "set_lock_timeout", "Supervisor"):
    globals()[_name].__module__ = "idpin"

# Importing idpin routes the stdlib's id-allocating calls through it,
# process-wide (README, "What import idpin changes"); idpin.uninstall() undoes it.
_stdlib.install()
del _name
