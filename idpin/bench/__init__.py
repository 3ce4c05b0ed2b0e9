"""``idpin bench``: the race-condition suite and the performance benchmarks.

    idpin bench race [--quick] [--plot] [--out DIR]
    idpin bench perf [--quick] [--plot] [--out DIR]
    idpin bench supervisor [--quick] [--out DIR]
    idpin bench faults [--quick] [--out DIR]
    idpin bench restore [--quick] [--out DIR]

Everything runs in fresh namespaces (idpin.testing.run_in_namespaces): no
knob of the host is ever written. Each suite prints its tables, puts its
section in DIR/results.json and, with --plot, draws DIR/<suite>.png
(matplotlib: the ``bench`` extra). ``--quick`` is the CI smoke mode: small
runs that check correctness invariants only (no wrong id from idpin, nothing
left behind), never speed.

Exit status: 0 when every invariant held, 1 when one broke, 2 when --plot
cannot draw (matplotlib missing: found before the run; or broken) or for
wrong usage.
"""
import importlib.util
import os
import sys

from .. import _sys
from . import machine, race
from .report import write_results

DEFAULT_OUT = os.path.join("benchmarks", "results")


def add_arguments(p):
    """Add the suites, as subcommands, to the ``idpin bench`` parser ``p``."""
    sub = p.add_subparsers(dest="suite", metavar="SUITE")
    for name, text in (("race", "wrong ids, refusals and leftovers of each strategy, under contention"),
                       ("perf", "idpin's cost as a ratio of its physical floor, measured side by side"),
                       ("faults", "SIGKILLs, raising signal handlers (one or a storm) and foreign "
                                  "creators at random points, per kind: leftovers and silent wrong "
                                  "ids"),
                       ("restore", "a whole tree restored and verified, against the same tree forked plainly"),
                       ("supervisor", "the seccomp supervisor's cost to a program, vs a C supervisor "
                                      "and vs running unsupervised")):
        suite = sub.add_parser(name, help=text, description=text)
        suite.add_argument("--quick", action="store_true",
                           help="a short smoke run that checks correctness invariants only")
        suite.add_argument("--plot", action="store_true", help="also draw PNG charts (needs matplotlib)")
        suite.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                           help="where results.json and the charts go (default: %(default)s)")
        if name == "restore":
            suite.add_argument("--sizes", metavar="N,N", help="tree sizes (default: 1000,10000)")
            suite.add_argument("--shapes", metavar="S,S", help="tree shapes (default: flat,mix,binary,chain)")
            suite.add_argument("--workers", metavar="W,W", help="restore workers (default: 1,2,4)")


def main(argv, out=None):
    """Run ``idpin bench <argv>``; the exit status (the same as the command line's)."""
    from .. import cli

    return cli.main(["bench", *argv], out)


def run(args, out):
    """Run the suite ``args`` (parsed by ``idpin bench``) names; the exit status."""
    if args.plot and plotting_missing():
        out.write("--plot needs %s: install it with: pip install 'idpin[bench]'\n" % plotting_missing())
        return 2
    # Found here once, so that namespace children inherit it instead of each
    # starting a probe thread (a worker with a thread cannot use clone3).
    _sys.tid_cache_offset()
    backends, missing = machine.available_backends()
    for name, why in missing.items():
        out.write("note: the %s backend is not available (%s); its cells are skipped\n" % (name, why))
    section = SUITES[args.suite](args, backends)
    section["command"] = "idpin " + " ".join(args.argv)
    section["machine"] = machine.describe()
    section["machine_line"] = machine.one_line(section["machine"])
    section["mode"] = "quick" if args.quick else "full"
    section["ok"] = not section["violations"]
    path = write_results(args.out, args.suite, section)  # first: a closed stdout loses nothing
    RENDER[args.suite](section, out)
    out.write("\nresults: %s\n" % path)
    status = 0 if section["ok"] else 1
    if args.plot:
        status = status or draw(args.suite, section, args.out, out)
    return status


def run_race(args, backends):
    cells, seconds = race.run_suite(args.quick, backends)
    return {"suite": "race", "seconds": seconds, "cells": cells,
            "violations": race.violations(cells, check_refusals=not args.quick)}


def run_perf(args, backends):
    from . import perf

    rows, seconds = perf.run_suite(args.quick, backends)
    return {"suite": "perf", "seconds": seconds, "rows": rows, "violations": perf.violations(rows)}


def render_perf(section, out):
    from . import perf

    perf.render(section, out)


def run_faults(args, backends):
    from . import faults

    rows, seconds = faults.run_suite(args.quick, backends)
    return {"suite": "faults", "seconds": seconds, "rows": rows, "violations": faults.violations(rows)}


def render_faults(section, out):
    from . import faults

    faults.render(section, out)


def run_restore(args, backends):
    from . import restore_suite

    def checkpoint(rows):
        # A full run takes long on a shared machine: keep what is measured so far.
        write_results(args.out, "restore", {"suite": "restore", "partial": True, "rows": list(rows)})

    sizes = tuple(int(n) for n in args.sizes.split(",")) if args.sizes else None
    shapes = tuple(args.shapes.split(",")) if args.shapes else None
    worker_counts = tuple(int(w) for w in args.workers.split(",")) if args.workers else None
    rows, seconds = restore_suite.run_suite(args.quick, backends, checkpoint, sizes, shapes,
                                            worker_counts)
    return {"suite": "restore", "seconds": seconds, "rows": rows,
            "violations": restore_suite.violations(rows), "targets": restore_suite.targets(rows)}


def render_restore(section, out):
    from . import restore_suite

    restore_suite.render(section, out)


def run_supervisor(args, backends):
    from . import supervisor

    rows, seconds = supervisor.run_suite(args.quick, backends)
    return {"suite": "supervisor", "seconds": seconds, "rows": rows, "violations": supervisor.violations(rows)}


def render_supervisor(section, out):
    from . import supervisor

    supervisor.render(section, out)


SUITES = {"race": run_race, "perf": run_perf, "faults": run_faults, "restore": run_restore,
          "supervisor": run_supervisor}
RENDER = {"race": race.render, "perf": render_perf, "faults": render_faults, "restore": render_restore,
          "supervisor": render_supervisor}


def plotting_missing():
    """What --plot lacks (None: nothing). Found without importing matplotlib:
    its import can start threads, and the suites fork."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib, which is not installed"
    return None


def draw(suite, section, out_dir, out):
    """Draw the suite's chart; 0, or 2 when matplotlib is missing."""
    if suite not in ("race", "perf"):
        out.write("no plot: the %s suite has only its table\n" % suite)
        return 0
    try:
        from . import plots
    except ImportError as err:
        out.write("no plot: %s; install it with: pip install 'idpin[bench]'\n" % err)
        return 2
    path = plots.DRAW[suite](section, out_dir)
    out.write("plot: %s\n" % path)
    return 0
