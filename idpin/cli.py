"""The ``idpin`` command line: doctor, demo, bench, capture, restore."""
import argparse
import sys

from . import __version__, _sys
from .probe import probe
from .demo import table


def doctor(args, out):
    caps = probe()
    rows = [(kind, "yes" if cap.ok else "NO", cap.mechanism, cap.reason or "-") for kind, cap in caps.items()]
    out.write(table(("kind", "ok", "mechanism", "reason / fix"), rows) + "\n\n")
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


def restore(args, out):
    from .restore import command

    return command.main(args, out)


def capture(args, out):
    from .errors import IdpinError
    from .restore import plan
    from .restore.capture import capture as capture_tree

    try:
        captured = capture_tree(args.pid, freeze=args.freeze)
    except IdpinError as err:
        sys.stderr.write("idpin capture: %s\n" % err)
        return 1
    plan.dump(captured, args.output or out)
    return 0


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
    capture_parser = sub.add_parser(
        "capture", help="write the plan of a live process tree and of this IPC namespace (JSON)")
    capture_parser.add_argument("pid", type=int, help="the root of the tree")
    capture_parser.add_argument("-o", "--output", metavar="PLAN", help="write here (default: standard output)")
    capture_parser.add_argument("--freeze", action="store_true",
                                help="stop the tree (SIGSTOP) while it is read, then resume it")
    from .restore import command as restore_command

    restore_command.add_parser(sub)
    return p


COMMANDS = {"doctor": doctor, "demo": demo, "bench": bench, "capture": capture, "restore": restore}


def main(argv=None, out=None):
    args = parser().parse_args(argv)
    return COMMANDS[args.command](args, out or sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
