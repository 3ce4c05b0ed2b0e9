"""``idpin bench perf``: what idpin costs, as a ratio of its physical floor.

Every benchmark measures idpin and its floor in the same fresh namespaces,
in alternating rounds (the order rotates every round), and reports the
median over rounds of the ratio measured within one round: a shared
machine drifts, and pairing cancels the drift.

- fork: ``idpin.fork(pid=N)`` through clone3 (1 and 2 workers) and through
  the ns_last_pid knob, vs plain ``os.fork()``: a child that exits at once,
  reaped before the next fork.
- sysv: a pinned creation as users write it (``with idpin.request(sem=N):
  idpin.ipc.semget(...)``, then ``idpin.ipc.remove``) vs the same syscalls
  (flock, pwrite the knob, create, unlock, remove) in a C loop (floor.c).
  Two more rows split the gap: ``ipc.create_pinned`` alone, and the bare
  backend calls idpin's path ends in, made from Python.
- batch: ``idpin.ipc.create_many`` of sem, shm and msg objects vs creating
  the same objects unpinned with the backend's bare call; the same
  unpinned creations through ``idpin.ipc.semget`` etc. (outside a request)
  are shown against that floor too.
- pty: ``idpin.pty.open_many`` of several indices (one walk) vs a single
  walk to the highest of them, and vs one walk per index.

``--quick`` runs each a few times and checks only that every id came out
right and nothing was left behind.
"""
import collections
import ctypes
import fcntl
import os
import shutil
import time

import idpin

from .. import _sys, ipc, pids, testing
from .. import pty as idpin_pty
from ..interpose import ORIGINALS
from . import floor
from .kinds import SysV
from .measure import Progress, median, paired_ratio
from .report import table
from .workers import run_parallel

Shape = collections.namedtuple(
    "Shape", "fork_rounds fork_per_round sysv_rounds sysv_per_round batch_rounds batch_size "
             "batch_reps pty_rounds pty_indices")
FULL = Shape(fork_rounds=25, fork_per_round=100, sysv_rounds=15, sysv_per_round=500,
             batch_rounds=15, batch_size=64, batch_reps=10, pty_rounds=9,
             pty_indices=tuple(range(32, 257, 32)))
QUICK = Shape(fork_rounds=2, fork_per_round=6, sysv_rounds=2, sysv_per_round=10,
              batch_rounds=2, batch_size=9, batch_reps=1, pty_rounds=2, pty_indices=(4, 8, 12))

FORK_FLOOR = "os.fork"
FORK_BASE = 300_000
SYSV_FLOOR = "C loop"
SYSV_FLAGS = ipc.IPC_CREAT | 0o600
NAMESPACE_TIMEOUT = 300.0


def rotated(items, round_):
    shift = round_ % len(items)
    return items[shift:] + items[:shift]


def in_namespaces(measure, backend, *args):
    """Run ``measure(*args)`` in fresh namespaces; its result with the leftovers added."""
    return testing.run_in_namespaces(_measure_and_check, measure, args, backend=backend,
                                     check_leaks=False, timeout=NAMESPACE_TIMEOUT)


def _measure_and_check(measure, args):
    fds_before = testing.open_fds()
    result = measure(*args)
    result["leaks"] = testing.leftovers(fds_before)
    return result


# -- fork ---------------------------------------------------------------------------


class OsFork:
    """The floor: CPython's own os.fork (not idpin's routing of it)."""

    def fork(self, pid):
        return ORIGINALS["os.fork"]()

    def close(self):
        pass


class IdpinFork(OsFork):
    def __init__(self, mechanism):
        self.mechanism = mechanism

    def fork(self, pid):
        return idpin.fork(pid=pid, mechanism=self.mechanism)


class Clone3Call(OsFork):
    """The backend call idpin's clone3 path ends in, and nothing else."""

    def __init__(self):
        self.tid_offset = _sys.tid_cache_offset()

    def fork(self, pid):
        return _sys.clone3_fork((pid,), self.tid_offset)


class KnobCalls(OsFork):
    """The knob path's syscalls from Python: lock, arm ns_last_pid, fork, unlock."""

    def __init__(self):
        self.lock_fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.knob_fd = os.open("/proc/sys/kernel/ns_last_pid", os.O_RDWR | os.O_CLOEXEC)

    def fork(self, pid):
        _sys.flock(self.lock_fd, fcntl.LOCK_EX)
        _sys.knob_write(self.knob_fd, pid - 1)
        child = ORIGINALS["os.fork"]()
        if child:
            # Only the parent unlocks: the child shares the open file description.
            _sys.flock(self.lock_fd, fcntl.LOCK_UN)
        return child

    def close(self):
        os.close(self.lock_fd)
        os.close(self.knob_fd)


FORKERS = {
    FORK_FLOOR: OsFork,
    "clone3": lambda: IdpinFork("clone3"),
    "clone3 _sys call": Clone3Call,
    "knob": lambda: IdpinFork("ns_last_pid"),
    "knob _sys calls": KnobCalls,
}
# Issue 9's targets: the Cython backend's fork paths, and the ctypes backend's
# clone3 path (its knob path has none: it is the Python path by design).
FORK_TARGETS = {("cython", "clone3"): 0.98, ("cython", "knob"): 0.95, ("ctypes", "clone3"): 0.9}


def fork_loop(subject, first, count):
    """``count`` forks of a child that exits at once, each reaped before the next."""
    forker = FORKERS[subject]()
    wrong = 0
    started = time.monotonic()
    for pid in range(first, first + count):
        child = forker.fork(pid)
        if child == 0:
            # Both children make the same check, so both cost the same.
            os._exit(0 if os.getpid() == pid or subject == FORK_FLOOR else 1)
        _, status = os.waitpid(child, 0)
        if subject != FORK_FLOOR and (child != pid or status != 0):
            wrong += 1
    finished = time.monotonic()
    forker.close()
    return started, finished, wrong


def measure_forks(subjects, workers, rounds, per_round):
    rates = {subject: [] for subject in subjects}
    wrong = collections.Counter()
    for round_ in range(rounds):
        for subject in rotated(list(subjects), round_):
            outcomes = run_parallel(
                lambda w: fork_loop(subject, FORK_BASE + w * per_round, per_round), workers)
            spans = [_unwrap(outcome) for outcome in outcomes]
            seconds = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
            rates[subject].append(workers * per_round / seconds)
            wrong[subject] += sum(w for _, _, w in spans)
    return {"rates": rates, "wrong": dict(wrong), "checked": rounds * per_round * workers}


def _unwrap(outcome):
    status, value = outcome
    if status != "ok":
        raise RuntimeError("a benchmark worker failed:\n" + value)
    return value


def fork_rows(backend, shape):
    rows = []
    for workers, subjects in ((1, ("clone3", "clone3 _sys call", "knob", "knob _sys calls")),
                              (2, ("clone3",))):
        got = in_namespaces(measure_forks, backend, (FORK_FLOOR,) + subjects, workers,
                            shape.fork_rounds, shape.fork_per_round)
        for subject in subjects:
            target = FORK_TARGETS.get((backend, subject))
            rows.append(rate_row(
                "fork %s, %d worker%s" % (subject, workers, "s" if workers > 1 else ""),
                backend, "forks/s", got["rates"][subject], got["rates"][FORK_FLOOR],
                (">=", target) if target else None,
                wrong=got["wrong"][subject], checked=got["checked"], leaks=got["leaks"]))
    return rows


# -- sysv: one pinned creation --------------------------------------------------------


def sysv_first_id():
    return (SysV.SEQ << ipc.ipc_shift()) | SysV.BASE_INDEX


class RequestBlock:
    """What users write: a request block around the routed creation, then remove."""

    def __init__(self, kind, shared=None):
        self.kind = kind
        self.create = SysV.CREATE[kind]
        self.size = SysV.SIZE[kind]

    def run(self, first, count):
        wrong = 0
        began = time.perf_counter()
        for want in range(first, first + count):
            with idpin.request(**{self.kind: want}):
                got = self.create(self.size)
            ipc.remove(self.kind, got)
            wrong += got != want
        return time.perf_counter() - began, wrong

    def close(self):
        pass


class CreatePinned(RequestBlock):
    """idpin.ipc.create_pinned alone: the lock, the stale-knob check, the creation."""

    def run(self, first, count):
        wrong = 0
        began = time.perf_counter()
        for want in range(first, first + count):
            got = ipc.create_pinned(self.kind, want, ipc.IPC_PRIVATE, self.size, SYSV_FLAGS)
            ipc.remove(self.kind, got)
            wrong += got != want
        return time.perf_counter() - began, wrong


class _OwnFds:
    """The IPC namespace lock file and knobs, opened apart from idpin's own."""

    def __init__(self, *kinds):
        self.lock_fd = os.open("/proc/self/ns/ipc", os.O_RDONLY | os.O_CLOEXEC)
        self.knob_fds = {kind: os.open("/proc/sys/kernel/%s_next_id" % kind, os.O_RDWR | os.O_CLOEXEC)
                         for kind in kinds}
        self.knob_fd = self.knob_fds[kinds[0]]

    def close(self):
        os.close(self.lock_fd)
        for fd in self.knob_fds.values():
            os.close(fd)


class BackendCalls(_OwnFds):
    """The C floor's sequence made from Python through idpin._sys, nothing else."""

    def __init__(self, kind, shared=None):
        super().__init__(kind)
        self.code = _sys.IPC_KIND_CODES[kind]
        self.size = SysV.SIZE[kind]

    def run(self, first, count):
        wrong = 0
        flags = SYSV_FLAGS | ipc.IPC_EXCL
        began = time.perf_counter()
        for want in range(first, first + count):
            _sys.flock(self.lock_fd, fcntl.LOCK_EX)
            got = _sys.ipc_create_pinned(self.knob_fd, self.code, want, ipc.IPC_PRIVATE, self.size, flags)
            _sys.flock(self.lock_fd, fcntl.LOCK_UN)
            _sys.ipc_remove(self.code, got)
            wrong += got != want
        return time.perf_counter() - began, wrong


class CLoop(_OwnFds):
    """floor.c's loop: one ctypes call for all ``count`` creations."""

    def __init__(self, kind, shared):
        super().__init__(kind)
        self.loop = floor.load(shared)
        self.code = _sys.IPC_KIND_CODES[kind]
        self.size = SysV.SIZE[kind]

    def run(self, first, count):
        began = time.perf_counter()
        _, wrong = self.loop(self.lock_fd, self.knob_fd, self.code, first, count, self.size)
        seconds = time.perf_counter() - began
        if wrong:
            # Nothing else creates objects in these namespaces: the floor is broken.
            raise RuntimeError("the C floor got %d wrong ids of %d" % (wrong, count))
        return seconds, wrong


class CheckedCLoop:
    """floor.c's other loop: the syscalls of idpin's request block (and the
    removal) in C, as strace shows idpin making them: the floor of its design."""

    def __init__(self, kind, shared):
        self.loop = floor.load_checked(shared)
        self.code = _sys.IPC_KIND_CODES[kind]
        self.size = SysV.SIZE[kind]
        opened = []

        def keep(path, flags=os.O_RDONLY):
            opened.append(os.open(path, flags | os.O_CLOEXEC))
            return opened[-1]

        self.fds = floor.BlockFds(
            pid_lock=keep("/proc/self/ns/pid"), ipc_lock=keep("/proc/self/ns/ipc"),
            knobs=(ctypes.c_int * 3)(*(keep("/proc/sys/kernel/%s_next_id" % k, os.O_RDWR)
                                       for k in ipc.KINDS)),
            census=keep("/proc/sysvipc/" + kind), cursor=keep("/proc/sys/kernel/ns_last_pid"),
            tasks=keep("/proc/self/task"))
        self.opened = opened
        self.cursor_record = pids.cursor_record_name(os.stat("/proc/self/ns/pid").st_ino)

    def run(self, first, count):
        began = time.perf_counter()
        _, wrong = self.loop(self.fds, self.cursor_record, ipc.CONSUMING_RECORD, self.code, first,
                             count, self.size, ipc.ipc_shift())
        seconds = time.perf_counter() - began
        if wrong:
            raise RuntimeError("the C loop of a block's syscalls got %d wrong ids of %d"
                               % (wrong, count))
        return seconds, wrong

    def close(self):
        for fd in self.opened:
            os.close(fd)


SYSV_SUBJECTS = {"request block": RequestBlock, "ipc.create_pinned": CreatePinned,
                 "_sys calls": BackendCalls, "block's syscalls in C": CheckedCLoop}


def measure_sysv(kind, subjects, rounds, per_round, shared):
    loops = {name: SYSV_SUBJECTS[name](kind, shared) for name in subjects}
    loops[SYSV_FLOOR] = CLoop(kind, shared)
    rates = {name: [] for name in loops}
    wrong = collections.Counter()
    try:
        for round_ in range(rounds):
            for name in rotated(list(loops), round_):
                seconds, bad = loops[name].run(sysv_first_id(), per_round)
                rates[name].append(per_round / seconds)
                wrong[name] += bad
    finally:
        for loop in loops.values():
            loop.close()
    return {"rates": rates, "wrong": dict(wrong), "checked": rounds * per_round}


def sysv_rows(backend, shape, shared):
    rows = []
    for kind in ipc.KINDS:
        # The breakdown rows once (sem); the other kinds show the same gap.
        subjects = tuple(SYSV_SUBJECTS) if kind == "sem" else ("request block",)
        got = in_namespaces(measure_sysv, backend, kind, subjects, shape.sysv_rounds,
                            shape.sysv_per_round, shared)
        for subject in subjects:
            target = (">=", 0.8) if subject == "request block" else None
            rows.append(rate_row(
                "sysv %s: %s" % (kind, subject), backend, "creations/s", got["rates"][subject],
                got["rates"][SYSV_FLOOR], target, wrong=got["wrong"][subject],
                checked=got["checked"], leaks=got["leaks"]))
    return rows


# -- batch creation -----------------------------------------------------------------


def batch_specs(size):
    first = sysv_first_id()
    kinds = [ipc.KINDS[i % len(ipc.KINDS)] for i in range(size)]
    return [ipc.Spec(kind, first + i, size=SysV.SIZE[kind]) for i, kind in enumerate(kinds)]


def timed_batch(specs):
    began = time.perf_counter()
    ids = ipc.create_many(specs)
    return time.perf_counter() - began, ids


def timed_routed(specs):
    """Unpinned creations through idpin's API (outside any request)."""
    began = time.perf_counter()
    ids = [SysV.CREATE[spec.kind](spec.size) for spec in specs]
    return time.perf_counter() - began, ids


def timed_raw(specs):
    """The floor: the backend's bare creation call, no idpin logic at all."""
    calls = [(_sys.IPC_KIND_CODES[spec.kind], spec.size) for spec in specs]
    get, private, flags = _sys.ipc_get, ipc.IPC_PRIVATE, SYSV_FLAGS
    began = time.perf_counter()
    ids = [get(code, private, size, flags) for code, size in calls]
    return time.perf_counter() - began, ids


class BackendBatch(_OwnFds):
    """create_many's syscalls made from Python through idpin._sys: the lock once,
    then per object the check that its index is free and the pinned creation."""

    def __init__(self):
        super().__init__(*ipc.KINDS)

    def __call__(self, specs):
        flags = SYSV_FLAGS | ipc.IPC_EXCL
        calls = [(self.knob_fds[s.kind], ipc.CODE[s.kind], s.id, s.size) for s in specs]
        began = time.perf_counter()
        _sys.flock(self.lock_fd, fcntl.LOCK_EX)
        for _, code, want, _ in calls:
            _sys.ipc_stat_index(code, ipc.index_of(want))
        ids = [_sys.ipc_create_pinned(knob, code, want, ipc.IPC_PRIVATE, size, flags)
               for knob, code, want, size in calls]
        _sys.flock(self.lock_fd, fcntl.LOCK_UN)
        return time.perf_counter() - began, ids


def measure_batch(rounds, size, reps):
    specs = batch_specs(size)
    backend_batch = BackendBatch()
    ways = {"create_many": timed_batch, "_sys calls": backend_batch, "routed": timed_routed,
            "raw": timed_raw}
    rates = {name: [] for name in ways}
    wrong = 0
    try:
        for round_ in range(rounds):
            for name in rotated(list(ways), round_):
                total = 0.0
                for _ in range(reps):
                    seconds, ids = ways[name](specs)
                    total += seconds
                    if name in ("create_many", "_sys calls"):
                        wrong += sum(got != spec.id for got, spec in zip(ids, specs))
                    for spec, got in zip(specs, ids):
                        ipc.remove(spec.kind, got)
                rates[name].append(size * reps / total)
    finally:
        backend_batch.close()
    return {"rates": rates, "wrong": wrong, "checked": rounds * reps * size * 2}


def batch_rows(backend, shape):
    got = in_namespaces(measure_batch, backend, shape.batch_rounds, shape.batch_size, shape.batch_reps)
    rates, label = got["rates"], "batch of %d" % shape.batch_size
    common = dict(checked=got["checked"], leaks=got["leaks"])
    return [
        rate_row(label + ": create_many", backend, "objects/s", rates["create_many"], rates["raw"],
                 (">=", 0.5), wrong=got["wrong"], **common),
        rate_row(label + ": _sys calls", backend, "objects/s", rates["_sys calls"], rates["raw"],
                 None, wrong=0, **common),
        rate_row(label + ": unpinned idpin.ipc.*get", backend, "objects/s", rates["routed"],
                 rates["raw"], None, wrong=0, **common),
    ]


# -- ptys -----------------------------------------------------------------------------


def timed_walks(indices, together):
    """Seconds to hold every index, one walk for all or one walk each; wrong ones."""
    began = time.perf_counter()
    pairs = {}
    if together:
        pairs = idpin_pty.open_many(indices)
    else:
        for index in indices:
            pairs.update(idpin_pty.open_many([index]))
    seconds = time.perf_counter() - began
    wrong = 0
    for index, (master, slave) in pairs.items():
        wrong += _sys.pty_index(master) != index
        os.close(master)
        os.close(slave)
    return seconds, wrong + len(set(indices) - set(pairs))


def measure_ptys(rounds, indices):
    ways = {"one walk": (indices, True), "highest alone": ((max(indices),), True),
            "one walk each": (indices, False)}
    times = {name: [] for name in ways}
    wrong = 0
    for round_ in range(rounds):
        for name in rotated(list(ways), round_):
            seconds, bad = timed_walks(*ways[name])
            times[name].append(seconds)
            wrong += bad
    return {"times": times, "wrong": wrong, "checked": rounds * (2 * len(indices) + 1)}


def pty_rows(backend, shape):
    got = in_namespaces(measure_ptys, backend, shape.pty_rounds, list(shape.pty_indices))
    times = got["times"]
    label = "pty %d indices up to %d" % (len(shape.pty_indices), max(shape.pty_indices))
    common = dict(wrong=got["wrong"], checked=got["checked"], leaks=got["leaks"])
    return [
        time_row(label + ": one walk vs highest alone", backend, times["one walk"],
                 times["highest alone"], ("<=", 1.2), **common),
        time_row(label + ": one walk each vs one walk", backend, times["one walk each"],
                 times["one walk"], None, wrong=0, checked=0, leaks=[]),
    ]


# -- rows, the suite, the table ----------------------------------------------------------


def new_row(benchmark, backend, unit, target):
    return {"benchmark": benchmark, "backend": backend, "unit": unit, "idpin": None,
            "floor": None, "ratio": None, "target": list(target) if target else None,
            "met": None, "wrong": 0, "checked": 0, "leaks": [], "error": None}


def rate_row(benchmark, backend, unit, subject_rates, floor_rates, target, wrong, checked, leaks):
    """A row whose ratio is idpin's rate over the floor's (higher is better)."""
    row = new_row(benchmark, backend, unit, target)
    row.update(idpin=median(subject_rates), floor=median(floor_rates),
               ratio=paired_ratio(subject_rates, floor_rates), wrong=wrong, checked=checked,
               leaks=list(leaks))
    row["met"] = meets(row["ratio"], target)
    return row


def time_row(benchmark, backend, subject_times, floor_times, target, wrong, checked, leaks):
    """A row whose ratio is idpin's time over the floor's (lower is better), in ms."""
    row = new_row(benchmark, backend, "ms", target)
    row.update(idpin=median(subject_times) * 1e3, floor=median(floor_times) * 1e3,
               ratio=paired_ratio(subject_times, floor_times), wrong=wrong, checked=checked,
               leaks=list(leaks))
    row["met"] = meets(row["ratio"], target)
    return row


def meets(ratio, target):
    if target is None or ratio is None:
        return None
    op, value = target
    return ratio >= value if op == ">=" else ratio <= value


def jobs(shape, backends, shared, floor_missing):
    """(what, run) for every namespace run of the suite, backend by backend."""
    found = []
    for backend in backends:
        found.append(("fork, " + backend, lambda b=backend: fork_rows(b, shape)))
        if shared is not None:
            found.append(("sysv, " + backend, lambda b=backend: sysv_rows(b, shape, shared)))
        else:
            found.append(("sysv, " + backend, lambda b=backend: [skipped_row("sysv", b, floor_missing)]))
        found.append(("batch, " + backend, lambda b=backend: batch_rows(b, shape)))
        found.append(("pty, " + backend, lambda b=backend: pty_rows(b, shape)))
    return found


def skipped_row(benchmark, backend, why):
    row = new_row(benchmark, backend, "-", None)
    row["skipped"] = why
    return row


def run_suite(quick, backends):
    shape = QUICK if quick else FULL
    try:
        shared, workdir = floor.build()
        floor_missing = None
    except floor.FloorUnavailable as err:
        shared = workdir = None
        floor_missing = str(err)
    todo = jobs(shape, backends, shared, floor_missing)
    progress = Progress("perf", len(todo))
    rows = []
    try:
        for what, run in todo:
            progress.step(what)
            rows += _run_job(what, run)
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if quick:
        for row in rows:
            row["met"] = None  # too few rounds: a ratio measured nothing, so no target is judged
    return rows, progress.finish()


def _run_job(what, run):
    try:
        return run()
    except Exception as err:  # reported as a failed row, which fails the run
        row = new_row(what, None, "-", None)
        row["error"] = str(err).splitlines()[0] if str(err) else repr(err)
        return [row]


def violations(rows):
    found = []
    for row in rows:
        where = "%s (%s)" % (row["benchmark"], row["backend"])
        if row["error"]:
            found.append("%s: failed: %s" % (where, row["error"]))
        if row["wrong"]:
            found.append("%s: %d of %d ids came out wrong" % (where, row["wrong"], row["checked"]))
        if row["leaks"]:
            found.append("%s: left behind: %s" % (where, "; ".join(row["leaks"])))
    return found


HEADER = ("benchmark", "backend", "unit", "idpin", "floor", "ratio", "target", "met")

LEGEND = """\
idpin and floor are medians over rounds; ratio is the median of the ratios
measured within each round (idpin/floor: rates, higher is better; for
times, lower is better).
fork: idpin.fork(pid=N, mechanism=clone3|ns_last_pid) vs CPython's own
  os.fork(); each child exits at once and is reaped before the next fork.
  'clone3 _sys call' is _sys.clone3_fork alone; 'knob _sys calls' is flock,
  _sys.knob_write, os.fork and unlock from Python: the floor of idpin's
  Python layer.
sysv <kind>: 'request block' is `with idpin.request(sem=N): idpin.ipc.semget()`
  then idpin.ipc.remove; 'ipc.create_pinned' is that call alone; '_sys calls'
  is flock, _sys.ipc_create_pinned (pwrite + create), unlock and remove from
  Python. The floor is the same syscalls in a C loop (floor.c), one call.
  'block's syscalls in C' is every syscall idpin's request block makes (21,
  as strace shows them: namespace check, both locks and their dead-holder
  checks, busy checks, census and cursor, arming, creation, exit check,
  unlocks, removal) in a C loop: the floor of idpin's design.
batch: idpin.ipc.create_many of sem, shm and msg objects vs creating the
  same objects unpinned with the backend's bare call (_sys.ipc_get).
  '_sys calls' is create_many's syscalls from Python (lock once; per object
  _sys.ipc_stat_index and _sys.ipc_create_pinned; unlock); 'unpinned
  idpin.ipc.*get' is the routed semget/shmget/msgget outside any request.
pty: idpin.pty.open_many(indices), one walk, vs open_many of the highest
  index alone; and one open_many per index vs the one walk."""


def render(section, out):
    rows = section["rows"]
    quick = section["mode"] == "quick"
    out.write("Performance benchmarks (%s) in %.0f s\n%s\n\n" % (
        QUICK_MODE if quick else section["mode"], section["seconds"], section["machine_line"]))
    out.write(table(HEADER, [table_row(row, quick) for row in rows]) + "\n\n" + LEGEND + "\n\n")
    for row in rows:
        if row.get("skipped"):
            out.write("skipped: %s (%s): %s\n" % (row["benchmark"], row["backend"], row["skipped"]))
    if section["violations"]:
        out.write("INVARIANTS BROKEN:\n" + "\n".join("  " + v for v in section["violations"]) + "\n")
    else:
        checked = sum(row["checked"] for row in rows)
        out.write("Invariants held: all %d pinned ids came out right, nothing was left behind.\n"
                  % checked)
    if quick:
        out.write("(--quick: too few rounds for the ratios to mean anything, so they are not "
                  "measured against the targets; only the invariants are checked)\n")


QUICK_MODE = "quick: ratios not measured, invariants only"


def table_row(row, quick=False):
    target = "%s %gx" % tuple(row["target"]) if row["target"] else "-"
    if quick and row["target"]:
        met = "not measured"
    else:
        met = {True: "yes", False: "NO", None: "-"}[row["met"]]
    ratio = "%.3fx" % row["ratio"] if row["ratio"] is not None else "-"
    return (row["benchmark"], row["backend"] or "-", row["unit"], row["idpin"], row["floor"],
            ratio, target, met)
