#!/usr/bin/env python3
"""The performance benchmarks: the same as ``idpin bench perf``.

    python benchmarks/perf/run.py [--quick] [--plot] [--out DIR]

It runs the installed idpin (``pip install '.[bench]'`` first): from this
directory, the source tree is not on sys.path, and it lacks the compiled
backend. The benchmarks live in idpin/bench/perf.py, the C floor in
idpin/bench/floor.c.
"""
import sys

from idpin import bench

if __name__ == "__main__":
    sys.exit(bench.main(["perf"] + sys.argv[1:]))
