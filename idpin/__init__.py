"""idpin: get back exact pids, tids, SysV IPC ids and pty numbers.

    with idpin.request(pid=1234):
        pid = os.fork()          # 1234 in the parent; os.getpid() == 1234 in the child

A request is per thread and one-shot per kind; the id is exactly right or the
allocation raises IdBusyError. See README.md for the contract.
"""
from . import _sys
from .errors import IdBusyError, IdpinError, LockTimeoutError, RequestError, UnsupportedError
from .knobs import lock_timeout, set_lock_timeout
from .request import Request, request
from . import pids, tids, ipc, pty  # noqa: E402  (each registers its kind)
from .pids import fork
from .probe import Capability, probe
from .interpose import stdlib as _stdlib
from .interpose.supervisor import Supervisor

__version__ = "0.1.0"
__all__ = [
    "Capability", "IdBusyError", "IdpinError", "LockTimeoutError", "Request", "RequestError",
    "Supervisor", "UnsupportedError", "fork", "ipc", "lock_timeout", "probe", "pty", "request",
    "set_lock_timeout",
]

for _name in ("Request", "request", "fork", "probe", "Capability", "lock_timeout",
              "set_lock_timeout", "Supervisor"):
    globals()[_name].__module__ = "idpin"

_stdlib.install()
del _name
