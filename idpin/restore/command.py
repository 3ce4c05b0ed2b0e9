"""``idpin restore plan.json``: the command line of a parallel restore.

It restores the plan's skeleton (fresh namespaces unless --here), prints a
report and the root's pid, then holds the tree until the root exits, or
Ctrl-C / SIGTERM tears it down; --detach leaves it running instead.

--exec makes each restored process exec its captured cmdline once the whole
tree is verified. The seccomp supervisor that would make the exec'd
programs' later allocations follow the plan's ``next`` ids (issue 10) is not
part of idpin yet: --exec execs plainly, and says so.
"""
import os
import select
import signal
import sys

from ..errors import IdpinError

EXEC_NOTE = ("note: --exec execs each process's cmdline plainly, not yet under idpin's supervisor "
             "('idpin run'), so what the programs fork or create later gets ordinary ids, not the "
             "plan's 'next' ids\n")


def add_arguments(p):
    """The options of ``idpin restore`` (registered in idpin.cli)."""
    p.add_argument("plan", help="the plan (JSON, as written by 'idpin capture')")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="helpers that split each wide level of the tree (default: 1)")
    p.add_argument("--here", action="store_true",
                   help="restore into the current namespaces (default: fresh user+pid+ipc+mount "
                        "namespaces, where a root with pid 1 is their init)")
    p.add_argument("--exec", action="store_true", dest="exec_",
                   help="each restored process execs its captured cmdline once all ids are verified")
    p.add_argument("--progress", action="store_true",
                   help="a progress bar on the terminal (tasks restored / total, rate)")
    p.add_argument("--detach", action="store_true",
                   help="leave the tree running and exit (default: hold it until the root exits "
                        "or Ctrl-C)")


def main(args, out):
    from . import restore
    from .plan import load

    try:
        plan = load(args.plan)
    except IdpinError as err:
        sys.stderr.write("idpin restore: %s\n" % err)
        return 2
    if args.exec_:
        out.write(EXEC_NOTE)
    bar = ProgressBar() if args.progress else None
    try:
        job = restore(plan, workers=args.workers, here=args.here,
                      target=exec_cmdline if args.exec_ else None, progress=bar)
        tree = job.__enter__()
    except (IdpinError, OSError) as err:
        if bar is not None:
            bar.close()
        sys.stderr.write("idpin restore: %s\n" % err)
        for note in getattr(err, "__notes__", ())[:1]:
            sys.stderr.write("  %s\n" % note)
        return 1
    if bar is not None:
        bar.close()
    try:
        out.write(report(plan, tree, args))
        out.flush()
        if args.detach:
            tree.detach()
            return 0
        hold(tree)
    finally:
        tree.close()
    return 0


def report(plan, tree, args):
    seconds = tree.report["seconds"]
    lines = [
        "restored %d processes, %d IPC objects, %d ptys with every id verified in %.3f s "
        "(%s, %d worker%s)" % (
            tree.report["processes"], tree.report["ipc"], tree.report["ptys"],
            seconds.get("verified", 0.0), "current namespaces" if args.here else "fresh namespaces",
            args.workers, "" if args.workers == 1 else "s"),
        "restorer: %d" % tree.restorer,
        "root: %d" % tree.root,
    ]
    return "\n".join(lines) + "\n"


def exec_cmdline(entry):
    """The --exec target: the process becomes its captured command (none: it waits)."""
    cmdline = entry.get("cmdline") or []
    if cmdline:
        os.execvp(cmdline[0], cmdline)


def hold(tree):
    """Until the root exits, Ctrl-C or SIGTERM (which tear the tree down)."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        watch = os.pidfd_open(tree.root)
    except OSError:
        return
    try:
        while True:
            ready, _, _ = select.select([watch], [], [], 3600)
            if ready:
                return
    except KeyboardInterrupt:
        return
    finally:
        os.close(watch)
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt()


class ProgressBar:
    """A tqdm bar on stderr when it is a terminal; nothing otherwise."""

    def __init__(self):
        self.bar = None
        if sys.stderr.isatty():
            import tqdm

            # No monitor thread: the restore forks from this process.
            tqdm.tqdm.monitor_interval = 0
            self.bar = tqdm.tqdm(total=0, unit="task", desc="restoring", file=sys.stderr)

    def __call__(self, done, total):
        if self.bar is None:
            return
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
