"""The ``idpin`` command line: doctor, demo, bench, run."""
import argparse
import sys

from . import __version__, _sys
from .probe import probe
from .demo import table


def doctor(args, out):
    caps = probe()
    rows = [(kind, "yes" if cap.ok else "NO", cap.mechanism, cap.reason or "-") for kind, cap in caps.items()]
    out.write(table(("kind", "ok", "mechanism", "reason / fix"), rows) + "\n\n")
    from .probe import probe_supervisor

    rows = [(name, "yes" if cap.ok else "NO", cap.mechanism, cap.reason or "-")
            for name, cap in probe_supervisor().items()]
    out.write("supervisor (idpin run, idpin.Supervisor):\n")
    out.write(table(("feature", "ok", "kernel name", "reason / fix"), rows) + "\n\n")
    out.write("backend: %s" % _sys.BACKEND)
    if _sys.load_error is not None:
        out.write(" (the Cython extension did not load: %s)" % _sys.load_error)
    out.write("\n")
    return 0


def demo(args, out):
    from . import demo as showcase

    return showcase.main(out)


def bench(args, out):
    from . import bench as suite

    return suite.main(args.rest, out)


def run(args, out):
    from .interpose.run import run as run_supervised

    from .errors import IdpinError

    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    try:
        return run_supervised(command, pid=args.pid, plan=args.plan, strict=args.strict, here=args.here)
    except (IdpinError, ValueError) as err:
        sys.stderr.write("idpin run: %s\n" % err)
        return 2


def parser():
    p = argparse.ArgumentParser(prog="idpin", description="Exact pids, tids, SysV IPC ids and pty numbers.")
    p.add_argument("--version", action="version", version="idpin %s" % __version__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="what this system lets idpin do, and how to fix what it cannot")
    sub.add_parser("demo", help="a short showcase in fresh namespaces")
    bench_parser = sub.add_parser(
        "bench", help="the race-condition suite and the performance benchmarks ('idpin bench --help')",
        add_help=False,
    )
    bench_parser.add_argument("rest", nargs=argparse.REMAINDER)
    run_parser = sub.add_parser(
        "run", help="run a program supervised: its forks, SysV objects and ptys get planned ids")
    run_parser.add_argument("--pid", type=int, help="the program's own pid (default: the plan's root)")
    run_parser.add_argument("--plan", metavar="FILE", help="a plan (JSON): its processes' 'next' ids")
    run_parser.add_argument("--strict", action="store_true",
                            help="fail (EBUSY) allocations the plan does not name, and taken ids")
    run_parser.add_argument("--here", action="store_true",
                            help="run in the current namespaces instead of fresh ones (needs privilege)")
    run_parser.add_argument("command_line", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    return p


COMMANDS = {"doctor": doctor, "demo": demo, "bench": bench, "run": run}


def main(argv=None, out=None):
    args = parser().parse_args(argv)
    return COMMANDS[args.command](args, out or sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
