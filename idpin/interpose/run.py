"""``idpin run``: an unmodified program under the supervisor, with its planned ids.

By default the program runs in fresh user+pid+ipc+mount namespaces with
their own /proc and devpts (idpin.testing's setup): this process enters
them and forks their init, which runs the Supervisor and starts the program
with its pid (``--pid N``, else the plan's root). The supervisor lives in
the program's namespaces, so its knob writes act on them. ``--here`` runs in
the current namespaces instead (it needs CAP_CHECKPOINT_RESTORE or
CAP_SYS_ADMIN over them). Signals sent to ``idpin run`` are passed on to the
program; its exit status (128 + N when killed by signal N) is returned.
"""
import os
import signal

from .. import pids, testing
from ..errors import UnsupportedError
from ..interpose import ORIGINALS
from .supervisor import Supervisor, load_plan

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT)


def exit_status(returncode):
    return 128 - returncode if returncode < 0 else returncode


def root_pid(pid, plan):
    """The pid the program itself gets: --pid, else the plan's root, else None."""
    root = pid if pid is not None else (plan or {}).get("root")
    if root is None:
        return None
    return pids.validate_pid(root)


def run(argv, pid=None, plan=None, strict=False, here=False):
    """Run ``argv`` supervised; its exit status."""
    if not argv:
        raise ValueError("idpin run needs a command: idpin run [options] -- CMD [ARG...]")
    loaded = load_plan(plan) if plan is not None else None
    root = root_pid(pid, loaded)
    if here:
        return _supervise(argv, root, plan, strict)
    if root == 1:
        raise UnsupportedError(
            "in fresh namespaces pid 1 is the supervisor (it must live in the program's pid "
            "namespace to write its ns_last_pid); give the program another pid with --pid, "
            "or run the plan's root under an init of your own with --here"
        )
    testing.enter_namespaces()
    init = ORIGINALS["os.fork"]()
    if init == 0:
        status = 70
        try:
            testing.mount_proc_and_devpts()
            status = _supervise(argv, root, plan, strict)
        finally:
            os._exit(status)
    return _forward_until_exit(init)


def _supervise(argv, root, plan, strict):
    with Supervisor(plan, strict=strict) as sup:
        proc = sup.spawn(argv, pid=root)
        previous = {sig: signal.signal(sig, lambda sig, frame: _pass_on(proc.pid, sig)) for sig in FORWARDED}
        try:
            returncode = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return exit_status(returncode)


def _pass_on(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _forward_until_exit(init):
    previous = {sig: signal.signal(sig, lambda sig, frame: _pass_on(init, sig)) for sig in FORWARDED}
    try:
        while True:
            try:
                _, status = os.waitpid(init, 0)
                break
            except InterruptedError:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else exit_status(
        os.waitstatus_to_exitcode(status))
