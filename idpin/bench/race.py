"""``idpin bench race``: the race-condition suite.

Scenarios x strategies. A scenario is W parallel workers pinning disjoint
ids of one kind (or of every kind: "mixed"), alone or beside K noise
processes that create objects of those kinds on their own. Every cell
(scenario, strategy, backend) runs as pid 1 of fresh namespaces
(idpin.testing.run_in_namespaces): nothing on the host is written, and what
the cell left behind is read afterwards in a namespace nobody else uses.

Per cell: attempts, exact ids, wrong ids handed out silently, refusals
(IdBusyError for idpin; giving up for create-then-check), refusals while the
id was free (it is free again within 20 ms of the refusal: noise took the
knob, the next pty index or the id itself for a moment), leftovers, throughput and latency.
The invariants: no idpin strategy ever hands out a wrong id, no cell leaves
anything behind or fails unexpectedly, and (full runs) every idpin strategy
refuses a free id in under 1 % of its attempts beside noise.
"""
import collections
import errno
import os
import resource
import time

from .. import _sys, testing
from .. import ipc as idpin_ipc
from . import kinds as kind_module
from .measure import Progress, percentile
from .noise import Noise
from .report import table
from .strategies import CHECK_TRIES, IDPIN, OBTAIN, REFUSED, strategies_for
from .workers import run_parallel

MIXED = "mixed"
FULL = {"workers": (1, 2, 4, 8), "noise": (0, 2), "attempts": 480}
# CI smoke: every kind and strategy once, under noise, in a few seconds.
QUICK = {"workers": (2,), "noise": (1,), "attempts": 12}
CELL_TIMEOUT = 90.0
MAX_EXAMPLES = 3
# Issue 7 item 10: an idpin strategy may refuse a free id in under this share
# of its attempts beside noise (checked in full runs, where cells are large).
MAX_REFUSED_FREE = 0.01


class Scenario(collections.namedtuple("Scenario", "kind workers noise attempts")):
    """``attempts`` ids over ``workers`` workers, beside ``noise`` noise processes."""

    __slots__ = ()

    @property
    def kinds(self):
        return kind_module.KINDS if self.kind == MIXED else (self.kind,)

    @property
    def label(self):
        return "%s W=%d K=%d" % (self.kind, self.workers, self.noise)


def scenarios(quick):
    shape = QUICK if quick else FULL
    return [
        Scenario(kind, workers, noise, shape["attempts"])
        for kind in kind_module.KINDS + (MIXED,)
        for workers in shape["workers"]
        for noise in shape["noise"]
    ]


def plan(scenario, worker):
    """The (kind, slot) pairs one worker asks for, in order.

    Slots interleave the workers (worker w takes w, w + W, w + 2W, ...), so
    every worker's ids sit among the others': a wrong id handed to one is
    one another is about to ask for. In the mixed scenario a worker forks
    its processes before it starts threads, as a restore does: a process
    with threads cannot use the clone3 fork path.
    """
    per_worker = scenario.attempts // scenario.workers
    kinds = scenario.kinds
    order = sorted((kinds[j % len(kinds)] for j in range(per_worker)), key=lambda k: k == "tid")
    taken = collections.Counter()
    pairs = []
    for kind in order:
        pairs.append((kind, taken[kind] * scenario.workers + worker))
        taken[kind] += 1
    return pairs


# -- inside a worker ------------------------------------------------------------


def attempt_all(pairs, strategy_name):
    """Ask for every id of ``pairs``, keep what came out, then release it all."""
    made = {name: kind_module.make(name) for name, _ in pairs}
    obtain = OBTAIN[strategy_name]
    fds_before = testing.open_fds()
    tally = collections.Counter()
    latencies, examples, kept, refused_free_examples = [], [], [], []
    started = time.monotonic()
    for name, slot in pairs:
        kind = made[name]
        want = kind.wanted(slot)
        began = time.perf_counter()
        refused = None
        try:
            kept.append((kind, obtain(kind, want), want))
        except REFUSED as err:
            tally["refused"] += 1
            refused = err
        except Exception as err:  # counted, shown, and a violation of the invariants
            tally["errors"] += 1
            examples.append("%s %d: %r" % (name, want, err))
        latencies.append((time.perf_counter() - began) * 1e6)
        if refused is not None and id_turns_out_free(name, want):
            tally["refused_free"] += 1
            if len(refused_free_examples) < MAX_EXAMPLES:
                refused_free_examples.append("%s %d: %s" % (name, want, refused))
    finished = time.monotonic()
    for kind, held, want in reversed(kept):
        tally["exact" if kind.release(held, want) else "wrong"] += 1
    for kind in made.values():
        kind.close()
    leaked = sorted(testing.open_fds() - fds_before)
    return {
        "tally": dict(tally, attempts=len(pairs)),
        "latencies_us": latencies,
        "examples": examples[:MAX_EXAMPLES],
        "refused_free_examples": refused_free_examples,
        "started": started,
        "finished": finished,
        "leaked_fds": leaked,
    }


# Noise holds what it creates for microseconds; a worker keeps what it got
# until the cell ends. An id free within this long after a refusal was
# refused for a moment's noise, not because it was taken.
FREE_GRACE_SECONDS = 0.02


def id_turns_out_free(kind_name, want):
    """Whether ``want`` is free within FREE_GRACE_SECONDS of a refusal."""
    deadline = time.monotonic() + FREE_GRACE_SECONDS
    while not id_is_free(kind_name, want):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


def id_is_free(kind_name, want):
    """Whether no task, IPC object or pty has ``want`` now."""
    if kind_name in ("pid", "tid"):
        try:
            os.kill(want, 0)
        except ProcessLookupError:
            return True
        except OSError as err:
            return err.errno != errno.EPERM
        return False
    if kind_name == "pty":
        return not os.path.exists("/dev/pts/%d" % want)
    code = _sys.IPC_KIND_CODES[kind_name]
    return _sys.ipc_stat_index(code, idpin_ipc.index_of(want)) == -1


# -- inside the namespace ---------------------------------------------------------


def run_cell(scenario, strategy):
    """One cell, as pid 1 of fresh namespaces: noise, workers, then the leftovers."""
    allow_fds_for_kept_ptys(scenario)
    fds_before = testing.open_fds()
    plans = [plan(scenario, worker) for worker in range(scenario.workers)]
    with Noise(scenario.kinds, scenario.noise) as noise:
        outcomes = run_parallel(lambda index: attempt_all(plans[index], strategy.name), scenario.workers)
    leaks = testing.leftovers(fds_before)
    return summarize(scenario, strategy, outcomes, noise, leaks)


def allow_fds_for_kept_ptys(scenario):
    """Raise this process's soft RLIMIT_NOFILE so one worker can hold its ptys.

    A worker keeps every pty it got (one fd each) and a walk to index N holds
    about N fds more: with all the attempts in one worker that passes the
    common soft limit of 1024. Only this namespace's processes inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * (scenario.attempts + kind_module.Ptys.BASE) + 256
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def summarize(scenario, strategy, outcomes, noise, leaks):
    cell = new_cell(scenario, strategy)
    tally = collections.Counter()
    latencies, spans = [], []
    for status, value in outcomes:
        if status != "ok":
            tally["errors"] += 1
            cell["error_examples"].append(value.strip().splitlines()[-1])
            continue
        tally.update(value["tally"])
        latencies += value["latencies_us"]
        spans.append((value["started"], value["finished"]))
        cell["error_examples"] += value["examples"]
        cell["refused_free_examples"] += value.get("refused_free_examples", [])
        if value["leaked_fds"]:
            leaks.append("worker left fds %s open" % value["leaked_fds"])
    for field in ("attempts", "exact", "wrong", "refused", "refused_free", "errors"):
        cell[field] = tally[field]
    cell["error_examples"] = cell["error_examples"][:MAX_EXAMPLES]
    cell["refused_free_examples"] = cell["refused_free_examples"][:MAX_EXAMPLES]
    cell["leaks"] = leaks
    if spans:
        seconds = max(end for _, end in spans) - min(start for start, _ in spans)
        cell["seconds"] = seconds
        cell["throughput"] = cell["attempts"] / seconds if seconds > 0 else None
    cell["p50_us"] = percentile(latencies, 0.50)
    cell["p99_us"] = percentile(latencies, 0.99)
    cell["noise_ops"] = noise.ops
    cell["noise_failures"] = noise.failures
    return cell


def new_cell(scenario, strategy):
    return {
        "scenario": scenario.label, "kind": scenario.kind, "workers": scenario.workers,
        "noise": scenario.noise, "strategy": strategy.name, "backend": strategy.backend,
        "attempts": scenario.attempts, "exact": 0, "wrong": 0, "refused": 0, "refused_free": 0,
        "errors": 0, "error_examples": [], "refused_free_examples": [], "leaks": [],
        "seconds": None, "throughput": None, "p50_us": None, "p99_us": None, "noise_ops": 0,
        "noise_failures": 0,
    }


# -- on the host ----------------------------------------------------------------


def run_suite(quick, backends):
    """Every cell in its own namespaces; the list of cells."""
    plan_ = [(scenario, strategy) for scenario in scenarios(quick)
             for strategy in strategies_for(scenario.kinds, backends)]
    progress = Progress("race", len(plan_))
    cells = []
    for scenario, strategy in plan_:
        progress.step("%s  %s" % (scenario.label, strategy.label))
        cells.append(run_cell_in_namespaces(scenario, strategy))
    return cells, progress.finish()


def run_cell_in_namespaces(scenario, strategy):
    try:
        return testing.run_in_namespaces(
            run_cell, scenario, strategy, backend=strategy.backend, check_leaks=False,
            timeout=CELL_TIMEOUT)
    except Exception as err:  # a crashed cell is reported, and fails the run
        cell = new_cell(scenario, strategy)
        cell["errors"] = 1
        cell["error_examples"] = ["the cell failed: %s" % str(err).splitlines()[0]]
        return cell


def violations(cells, check_refusals=False):
    """Every broken invariant, as readable lines (empty: all held).

    ``check_refusals``: also hold every idpin strategy to refusing a free id in
    under MAX_REFUSED_FREE of its attempts beside noise, per kind (full runs:
    a quick run's few attempts per cell make a share meaningless).
    """
    found = []
    if check_refusals:
        found += refused_free_violations(cells)
    for cell in cells:
        where = "%s, %s%s" % (cell["scenario"], cell["strategy"],
                              "/" + cell["backend"] if cell["backend"] else "")
        if cell["strategy"] in IDPIN and cell["wrong"]:
            found.append("%s: %d wrong ids handed out silently" % (where, cell["wrong"]))
        if cell["leaks"]:
            found.append("%s: left behind: %s" % (where, "; ".join(cell["leaks"])))
        if cell["errors"]:
            found.append("%s: %d unexpected errors, e.g. %s" % (
                where, cell["errors"], "; ".join(cell["error_examples"]) or "?"))
        counted = cell["exact"] + cell["wrong"] + cell["refused"] + cell["errors"]
        if not cell["errors"] and counted != cell["attempts"]:
            found.append("%s: %d attempts but %d outcomes" % (where, cell["attempts"], counted))
    return found


def refused_free_violations(cells):
    totals = collections.OrderedDict()
    for cell in cells:
        if cell["strategy"] in IDPIN and cell["noise"]:
            key = (cell["kind"], strategy_label(cell))
            attempts, refused_free = totals.get(key, (0, 0))
            totals[key] = (attempts + cell["attempts"], refused_free + cell.get("refused_free", 0))
    return ["%s, %s beside noise: refused %d free ids in %d attempts (%.1f %%, limit %.0f %%)" % (
                kind, label, refused_free, attempts, pct(refused_free, attempts), 100 * MAX_REFUSED_FREE)
            for (kind, label), (attempts, refused_free) in totals.items()
            if attempts and refused_free >= MAX_REFUSED_FREE * attempts]


# -- tables -------------------------------------------------------------------


def pct(part, whole):
    return 100.0 * part / whole if whole else None


def strategy_label(cell):
    return cell["strategy"] + ("/" + cell["backend"] if cell["backend"] else "")


def summary_rows(cells):
    """One row per (kind, strategy): totals over its scenarios, quiet and noisy apart."""
    groups = collections.OrderedDict()
    for cell in cells:
        key = (cell["kind"], strategy_label(cell), "noise" if cell["noise"] else "quiet")
        groups.setdefault(key, []).append(cell)
    rows = []
    for (kind, label, noise), group in groups.items():
        attempts = sum(c["attempts"] for c in group)
        rows.append((kind, noise, label, attempts,
                     pct(sum(c["exact"] for c in group), attempts),
                     sum(c["wrong"] for c in group), pct(sum(c["wrong"] for c in group), attempts),
                     pct(sum(c["refused"] for c in group), attempts),
                     pct(sum(c.get("refused_free", 0) for c in group), attempts),
                     sum(len(c["leaks"]) + c["errors"] for c in group)))
    return rows


SUMMARY_HEADER = ("kind", "noise", "strategy", "attempts", "exact %", "WRONG", "wrong %",
                  "refused %", "refused free %", "leaks+errors")
CELL_HEADER = ("scenario", "strategy", "attempts", "exact", "WRONG", "refused", "refused free",
               "leaks", "ids/s", "p50 us", "p99 us")


def cell_rows(cells, kind):
    return [(c["scenario"], strategy_label(c), c["attempts"], c["exact"], c["wrong"], c["refused"],
             c.get("refused_free", 0), len(c["leaks"]) + c["errors"], c["throughput"], c["p50_us"],
             c["p99_us"])
            for c in cells if c["kind"] == kind]


LEGEND = """\
W = parallel workers, K = noise processes creating objects without idpin.
WRONG = an id handed out that is not the one asked for, with no error.
refused = IdBusyError (idpin) or gave up after %d tries (create-then-check).
refused free = refused although the id was free within %.0f ms (noise took the knob, the
next pty index or the id itself for a moment); idpin must stay under 1 %% beside noise.
ids/s = attempts per second over the workers' run; p50/p99 = latency of one attempt.
idpin-knob on ptys is idpin's walk under the devpts lock; idpin-clone3 in
"mixed" forks with clone3 and uses idpin's locked paths for the other kinds.""" % (
    CHECK_TRIES, FREE_GRACE_SECONDS * 1000)


def render(section, out):
    """The tables: a summary per kind and strategy, then every cell."""
    cells = section["cells"]
    out.write("Race-condition suite (%s), %d cells in %.0f s\n%s\n\n" % (
        section["mode"], len(cells), section["seconds"], section["machine_line"]))
    out.write(LEGEND + "\n\n")
    out.write("Summary (all worker counts together):\n\n")
    out.write(table(SUMMARY_HEADER, summary_rows(cells)) + "\n\n")
    for kind in kind_module.KINDS + (MIXED,):
        rows = cell_rows(cells, kind)
        if rows:
            out.write("%s:\n\n%s\n\n" % (kind, table(CELL_HEADER, rows)))
    examples = ["%s, %s: %s" % (c["scenario"], strategy_label(c), e) for c in cells
                if c["strategy"] in IDPIN for e in c.get("refused_free_examples", [])[:1]]
    if examples:
        out.write("idpin's refusals of ids that were free (one per cell):\n%s\n\n" % "\n".join(
            "  " + e for e in examples))
    if section["violations"]:
        out.write("INVARIANTS BROKEN:\n" + "\n".join("  " + v for v in section["violations"]) + "\n")
    else:
        out.write("Invariants held: no idpin strategy handed out a wrong id, and no cell left "
                  "anything behind or failed.\n")
