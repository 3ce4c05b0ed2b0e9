"""The ``idpin`` command line.

Each subcommand is one function registered with ``@command(name, help,
arguments)``: ``arguments(parser)`` adds its options (and may add
subcommands of its own), the function runs it as ``fn(args, out)`` and
returns the exit status. Adding a subcommand is adding one such function;
its ``--help`` works at once, and tests/test_cli.py walks every registered
parser's ``--help``. A command with subcommands of its own, called without
one (``idpin``, ``idpin bench``), prints its help, which lists them.
"""
import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from . import __version__

Run = Callable[[argparse.Namespace, TextIO], int]
Arguments = Callable[[argparse.ArgumentParser], None]


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Run
    arguments: Arguments | None = None
    description: str | None = None


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, arguments: Arguments | None = None,
            description: str | None = None) -> Callable[[Run], Run]:
    """Register the decorated ``fn(args, out) -> status`` as ``idpin <name>``."""

    def register(run: Run) -> Run:
        COMMANDS[name] = Command(name, help, run, arguments, description)
        return run

    return register


# -- doctor --------------------------------------------------------------------------------

DOCTOR_DESCRIPTION = """\
What this system lets idpin do, kind by kind, and how to fix what it
cannot. Exit status: 0; with --check, 1 when a checked kind is not
available; 2 for wrong usage."""


def doctor_arguments(p: argparse.ArgumentParser) -> None:
    from .probe import KINDS

    p.add_argument("--check", nargs="*", metavar="KIND", choices=KINDS,
                   help="exit 1 unless every KIND (default: all of %s) is available" % ", ".join(KINDS))


@command("doctor", "what this system lets idpin do, and how to fix what it cannot",
         doctor_arguments, DOCTOR_DESCRIPTION)
def doctor(args: argparse.Namespace, out: TextIO) -> int:
    from . import doctor as report

    return report.main(out, check=args.check)


# -- demo ----------------------------------------------------------------------------------

@command("demo", "a short showcase in fresh namespaces (no privilege needed)")
def demo(args: argparse.Namespace, out: TextIO) -> int:
    from . import demo as showcase

    return showcase.main(out)


# -- bench ---------------------------------------------------------------------------------

def bench_arguments(p: argparse.ArgumentParser) -> None:
    from . import bench as suites

    suites.add_arguments(p)


@command("bench", "the race-condition suite and the performance benchmarks", bench_arguments,
         "The race-condition suite and the performance benchmarks, in fresh namespaces.")
def bench(args: argparse.Namespace, out: TextIO) -> int:
    from . import bench as suites

    return suites.run(args, out)


# -- capture -------------------------------------------------------------------------------

def capture_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pid", type=int, help="the root of the tree")
    p.add_argument("-o", "--output", metavar="PLAN", help="write here (default: standard output)")
    p.add_argument("--freeze", action="store_true",
                   help="stop the tree (SIGSTOP) while it is read, then resume it")


@command("capture", "write the plan of a live process tree and of this IPC namespace (JSON)",
         capture_arguments)
def capture(args: argparse.Namespace, out: TextIO) -> int:
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


# -- restore -------------------------------------------------------------------------------

def restore_arguments(p: argparse.ArgumentParser) -> None:
    from .restore import command as restore_command

    restore_command.add_arguments(p)


@command("restore", "recreate a plan's process tree with exactly its ids", restore_arguments,
         "Recreate a plan's process tree, IPC objects and ptys with exactly its ids, verify "
         "every id, then hold the tree.")
def restore(args: argparse.Namespace, out: TextIO) -> int:
    from .restore import command as restore_command

    return restore_command.main(args, out)


# -- the parser and the entry point --------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idpin", description="Exact pids, tids, SysV IPC ids and pty numbers.")
    p.add_argument("-V", "--version", action="version", version="idpin %s" % __version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        cmd_parser = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
        if cmd.arguments is not None:
            cmd.arguments(cmd_parser)
    _remember_parsers(p)
    return p


def _remember_parsers(p: argparse.ArgumentParser) -> None:
    # The deepest parser reached sets args._parser (a subparser's defaults
    # override its parent's): main prints its help when its subcommand is missing.
    p.set_defaults(_parser=p)
    action = _subparsers(p)
    if action is None:
        return
    if p.epilog is None:
        p.epilog = "'%s %s --help' shows the options of each." % (p.prog, action.metavar or "CMD")
    for child in action.choices.values():
        _remember_parsers(child)


def _subparsers(p: argparse.ArgumentParser) -> "argparse._SubParsersAction[argparse.ArgumentParser] | None":
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``p``'s subcommand parsers by name (empty when it has none)."""
    action = _subparsers(p)
    return dict(action.choices) if action is not None else {}


def _subcommand_missing(args: argparse.Namespace) -> bool:
    action = _subparsers(args._parser)
    return action is not None and getattr(args, action.dest, None) is None


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run ``idpin <argv>`` (default: sys.argv[1:]); the exit status.

    The command's function gets the parsed arguments, with ``args.argv`` the
    command line after ``idpin``, and writes its report to ``out``.
    """
    out = out or sys.stdout
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    if _subcommand_missing(args):
        # Listing the choices helps more than argparse's "required" error.
        out.write(args._parser.format_help())
        return 2
    return COMMANDS[args.command].run(args, out)


if __name__ == "__main__":
    sys.exit(main())
