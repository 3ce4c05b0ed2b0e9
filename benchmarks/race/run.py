#!/usr/bin/env python3
"""The race-condition suite: the same as ``idpin bench race``.

    python benchmarks/race/run.py [--quick] [--plot] [--out DIR]

It runs the installed idpin (``pip install '.[bench]'`` first): from this
directory, the source tree is not on sys.path, and it lacks the compiled
backend. The suite itself lives in idpin/bench/race.py.
"""
import sys

from idpin import bench

if __name__ == "__main__":
    sys.exit(bench.main(["race"] + sys.argv[1:]))
