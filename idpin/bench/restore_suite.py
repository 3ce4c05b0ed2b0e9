"""``idpin bench restore``: a whole tree restored and verified, against its floor.

For each shape (flat, binary, deep chain, and a realistic mix of sessions
and groups with 10 % dead leaders) and size (1,000 and 10,000 tasks), one
fresh namespace per measurement (idpin.testing.run_in_namespaces) runs, side
by side in the same run:

- the C floor: the same tree, unpinned, made with plain fork() by a small C
  program compiled at run time (tree_floor.c): each process forks its own
  children, so depth costs a chain of forks just as it does in a restore;
- the Python floor: the same with os.fork from Python;
- ``idpin.restore.restore(plan, workers=W)`` for W = 1, 2, 4: fresh
  namespaces, every id chosen, sessions and groups made, stand-ins for dead
  leaders, and every id read back from /proc before the block is entered.

And the IPC objects: 10,000 SysV objects (sem sets with values, queues with
messages, segments with bytes) restored with their ids by a restore of a
one-process plan, against the same objects created and filled plainly.

Ratios are restore time / floor time of the same run (the machine is shared:
absolute times drift, ratios much less). ``--quick`` restores small trees
and checks correctness only: every restore verified, nothing left behind.
"""
import base64
import ctypes
import os
import shutil
import time

from .. import _sys
from ..interpose import ORIGINALS
from ..testing import run_in_namespaces
from . import floor as floor_build
from .measure import Progress, median
from .report import table

SHAPES = ("flat", "mix", "binary", "chain")
FULL_SIZES, QUICK_SIZES = (1000, 10000), (20,)
FULL_WORKERS, QUICK_WORKERS = (1, 2, 4), (1, 2)
REPEATS = {1000: 1, 10000: 1, 20: 1}  # one run per cell: a full run takes about an hour on a shared 2-core machine
FULL_IPC, QUICK_IPC = 10000, 20
# Targets of issue 8.
TARGET_VS_C_FLOOR = 1.5      # 10,000 tasks, W = 2, restore time / C floor time at most
TARGET_SCALING = 1.7         # W = 1 -> 2 on wide (flat) trees, speedup at least
NAMESPACE_TIMEOUT = 1800.0
RESTORE_TIMEOUT = 1200.0
SESSION_SIZE, GROUP_SIZE, DEAD_EVERY = 50, 5, 10


# -- plans of each shape ---------------------------------------------------------

def proc(pid, ppid, pgid, sid):
    return {"pid": pid, "ppid": ppid, "pgid": pgid, "sid": sid, "tids": [pid]}


def tree_plan(shape, n):
    """A plan of ``n`` tasks of ``shape``, root pid 1 (the fresh namespace's init)."""
    if shape == "mix":
        processes = _mix(n)
    else:
        parent = {"flat": lambda i: 0, "binary": lambda i: (i - 1) // 2, "chain": lambda i: i - 1}[shape]
        processes = [proc(1, 0, 1, 1)] + [proc(i + 1, parent(i) + 1, 1, 1) for i in range(1, n)]
    return {"idpin_plan": 1, "root": 1, "processes": processes}


def _mix(n):
    """Sessions of 50 under the root, groups of 5 in each; every 10th leader is dead."""
    processes = [proc(1, 0, 1, 1)]
    dead_base = 1_000_000  # dead leaders' pids: no process has them
    next_pid, sessions, groups = 2, 0, 0
    while len(processes) < n:
        sessions += 1
        dead_session = sessions % DEAD_EVERY == 0
        if dead_session:
            sid, adopter = dead_base + sessions, 1
        else:
            sid = adopter = next_pid
            processes.append(proc(sid, 1, sid, sid))
            next_pid += 1
        members = 0
        while members < SESSION_SIZE and len(processes) < n:
            groups += 1
            if groups % DEAD_EVERY == 0:
                pgid, parent = dead_base + 500_000 + groups, adopter
            else:
                pgid = parent = next_pid
                processes.append(proc(pgid, adopter, pgid, sid))
                next_pid += 1
                members += 1
            for _ in range(GROUP_SIZE - 1):
                if len(processes) >= n:
                    break
                processes.append(proc(next_pid, parent, pgid, sid))
                next_pid += 1
                members += 1
    return processes


def floor_shape(plan):
    """(first_child, children) index arrays of the plan's tree, for the floors."""
    index = {p["pid"]: i for i, p in enumerate(plan["processes"])}
    kids = [[] for _ in plan["processes"]]
    for p in plan["processes"][1:]:
        kids[index[p["ppid"]]].append(index[p["pid"]])
    first, children = [0], []
    for own in kids:
        children.extend(own)
        first.append(len(children))
    return first, children


def ipc_plan(count):
    """A one-process plan with ``count`` SysV objects and their contents."""
    objects = []
    for i in range(count):
        kind = ("sem", "msg", "sem", "msg", "shm")[i % 5]
        obj = {"kind": kind, "id": i, "key": 0, "mode": 0o600}
        if kind == "sem":
            obj.update(nsems=4, values=[i % 7, 1, 2, 3])
        elif kind == "msg":
            obj["messages"] = [{"type": 1, "data": base64.b64encode(b"m%063d" % i).decode()},
                               {"type": 2, "data": base64.b64encode(b"second").decode()}]
        else:
            obj.update(size=4096, data=base64.b64encode(b"s%0255d" % i).decode())
        objects.append(obj)
    return {"idpin_plan": 1, "root": 1, "processes": [proc(1, 0, 1, 1)], "ipc": objects}


# -- measurements (each runs as pid 1 of its own fresh namespaces) ------------

def measure_restore(plan, workers):
    from .. import restore

    started = time.perf_counter()
    with restore.restore(plan, workers=workers, timeout=RESTORE_TIMEOUT) as tree:
        elapsed = time.perf_counter() - started
        assert tree.report["processes"] == len(plan["processes"])
    return elapsed


def measure_c_floor(shared, plan):
    first, children = floor_shape(plan)
    loop = ctypes.CDLL(shared).tree_floor
    loop.restype = ctypes.c_long
    loop.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int),
                     ctypes.c_int, ctypes.c_int]
    first_array = (ctypes.c_int * len(first))(*first)
    children_array = (ctypes.c_int * max(len(children), 1))(*children)
    read_end, write_end = os.pipe()
    try:
        started = time.perf_counter()
        got = loop(len(plan["processes"]), first_array, children_array, write_end, read_end)
        elapsed = time.perf_counter() - started
    finally:
        os.close(read_end)
        os.close(write_end)
    if got != len(plan["processes"]):
        raise RuntimeError("the C floor made %d of %d tasks" % (got, len(plan["processes"])))
    return elapsed


def measure_python_floor(plan):
    first, children = floor_shape(plan)
    n = len(plan["processes"])
    read_end, write_end = os.pipe()
    started = time.perf_counter()
    me = os.getpid()
    root = ORIGINALS["os.fork"]()
    if root == 0:
        os.close(read_end)
        _python_floor_task(0, first, children, write_end, me)
    got = 0
    while got < n:
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        got += len(chunk)
    elapsed = time.perf_counter() - started
    os.kill(root, 9)
    _reap_all()
    os.close(read_end)
    os.close(write_end)
    if got != n:
        raise RuntimeError("the Python floor made %d of %d tasks" % (got, n))
    return elapsed


def _python_floor_task(task, first, children, ready, parent):
    try:
        while True:
            _sys.prctl(_sys.PR_SET_PDEATHSIG, 9)
            if os.getppid() != parent:
                os._exit(1)
            following = None
            for k in range(first[task], first[task + 1]):
                me = os.getpid()
                if ORIGINALS["os.fork"]() == 0:
                    following, parent = children[k], me
                    break
            if following is None:
                break
            task = following
        os.write(ready, b"x")
        while True:
            os.pause() if hasattr(os, "pause") else time.sleep(3600)
    finally:
        os._exit(0)


def _reap_all():
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def measure_ipc_restore(plan):
    from .. import restore

    started = time.perf_counter()
    with restore.restore(plan, timeout=RESTORE_TIMEOUT):
        elapsed = time.perf_counter() - started
    return elapsed


def measure_ipc_plain(plan):
    """The same objects created and filled without chosen ids (the floor)."""
    flags = 0o1000 | 0o600
    created = []
    started = time.perf_counter()
    for obj in plan["ipc"]:
        kind = _sys.IPC_KIND_CODES[obj["kind"]]
        size = obj.get("nsems") or obj.get("size") or 0
        id = _sys.ipc_get(kind, 0, size, flags)
        created.append((kind, id))
        if obj["kind"] == "sem":
            _sys.ipc_sem_setall(id, obj["values"])
        elif obj["kind"] == "msg":
            for message in obj["messages"]:
                _sys.ipc_msg_send(id, message["type"], base64.b64decode(message["data"]))
        else:
            _sys.ipc_shm_write(id, base64.b64decode(obj["data"]))
    elapsed = time.perf_counter() - started
    for kind, id in created:
        _sys.ipc_remove(kind, id)
    return elapsed


def in_namespaces(measure, backend, *args):
    return run_in_namespaces(measure, *args, backend=backend, timeout=NAMESPACE_TIMEOUT)


# -- the suite ---------------------------------------------------------------

def run_suite(quick, backends, checkpoint=None, sizes=None, shapes=None, worker_counts=None):
    """Rows of measurements; (rows, seconds). ``checkpoint(rows)`` after each row.

    The largest trees first (the issue's targets are theirs), the deep chain
    last: a run cut short still has the numbers that matter most.
    """
    backend = "cython" if "cython" in backends else backends[0]
    sizes = sizes or (QUICK_SIZES if quick else FULL_SIZES)
    unknown = set(shapes or ()) - set(SHAPES)
    if unknown:
        raise SystemExit("idpin bench restore: unknown shapes %s (known: %s)"
                         % (", ".join(sorted(unknown)), ", ".join(SHAPES)))
    worker_counts = worker_counts or (QUICK_WORKERS if quick else FULL_WORKERS)
    try:
        shared, workdir = floor_build.build("tree_floor")
    except floor_build.FloorUnavailable as err:
        shared, workdir, floor_missing = None, None, str(err)
    else:
        floor_missing = None
    cells = [(size, shape) for size in sorted(sizes, reverse=True) for shape in shapes or SHAPES]
    progress = Progress("restore", len(cells) + 1)
    rows = []
    try:
        if shapes is None:
            progress.step("ipc")
            rows.append(ipc_row(backend, QUICK_IPC if quick else FULL_IPC, quick))
        for size, shape in cells:
            if checkpoint is not None:
                checkpoint(rows)
            progress.step("%s %d" % (shape, size))
            rows.append(tree_row(backend, shape, size, worker_counts, shared, quick))
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    seconds = progress.finish()
    if floor_missing:
        for row in rows:
            row.setdefault("notes", []).append("no C floor: " + floor_missing)
    return rows, seconds


def _timed(repeats, measure, *args):
    times, errors = [], []
    for _ in range(repeats):
        try:
            times.append(measure(*args))
        except Exception as err:  # a failed restore is a violation, reported in the row
            errors.append("%s: %s" % (type(err).__name__, str(err).splitlines()[0][:300]))
    return median(times), errors


def tree_row(backend, shape, size, worker_counts, shared, quick):
    plan = tree_plan(shape, size)
    repeats = REPEATS.get(size, 1)
    row = {"kind": "tree", "shape": shape, "tasks": size, "errors": []}
    if shared:
        row["c_floor"], errors = _timed(repeats, in_namespaces, measure_c_floor, backend, shared, plan)
        row["errors"] += ["C floor: " + e for e in errors]
    row["py_floor"], errors = _timed(repeats, in_namespaces, measure_python_floor, backend, plan)
    row["errors"] += ["Python floor: " + e for e in errors]
    for workers in worker_counts:
        seconds, errors = _timed(repeats, in_namespaces, measure_restore, backend, plan, workers)
        row["restore_w%d" % workers] = seconds
        row["errors"] += ["restore W=%d: %s" % (workers, e) for e in errors]
    return row


def ipc_row(backend, count, quick):
    plan = ipc_plan(count)
    row = {"kind": "ipc", "objects": count, "errors": []}
    row["plain"], errors = _timed(1, in_namespaces, measure_ipc_plain, backend, plan)
    row["errors"] += ["plain: " + e for e in errors]
    row["restore"], errors = _timed(1, in_namespaces, measure_ipc_restore, backend, plan)
    row["errors"] += ["restore: " + e for e in errors]
    return row


def _ratio(a, b):
    return a / b if a and b else None


def violations(rows):
    """Correctness only: a restore (or floor) that failed. Speed targets are reported, not enforced."""
    return ["%s: %s" % (_label(row), error) for row in rows for error in row["errors"]]


def _label(row):
    if row["kind"] == "ipc":
        return "ipc %d objects" % row["objects"]
    return "%s %d" % (row["shape"], row["tasks"])


def targets(rows):
    """The issue's two speed targets, each with its measured value and whether it was met."""
    found = []
    for row in rows:
        if row["kind"] != "tree" or row["tasks"] < 10000:
            continue
        vs_floor = _ratio(row.get("restore_w2"), row.get("c_floor"))
        if vs_floor is not None:
            found.append({"target": "%s 10,000 tasks, W=2 <= %.1fx C floor" % (row["shape"], TARGET_VS_C_FLOOR),
                          "value": vs_floor, "met": vs_floor <= TARGET_VS_C_FLOOR})
        if row["shape"] == "flat":
            scaling = _ratio(row.get("restore_w1"), row.get("restore_w2"))
            if scaling is not None:
                found.append({"target": "flat 10,000 tasks, W 1 -> 2 speedup >= %.1fx" % TARGET_SCALING,
                              "value": scaling, "met": scaling >= TARGET_SCALING})
    return found


def render(section, out):
    rows = section["rows"]
    tree_rows = [r for r in rows if r["kind"] == "tree"]
    workers = sorted({int(k[len("restore_w"):]) for r in tree_rows for k in r if k.startswith("restore_w")})
    header = ["shape", "tasks", "C floor s", "Python floor s"] + ["W=%d s" % w for w in workers] + \
             ["W=%d / C" % w for w in workers] + ["W1/W2"]
    body = []
    for r in tree_rows:
        body.append([r["shape"], r["tasks"], r.get("c_floor"), r.get("py_floor")]
                    + [r.get("restore_w%d" % w) for w in workers]
                    + [_ratio(r.get("restore_w%d" % w), r.get("c_floor")) for w in workers]
                    + [_ratio(r.get("restore_w1"), r.get("restore_w2"))])
    out.write("restore: a whole tree, every id chosen and read back, vs the same tree forked plainly\n")
    out.write(table(header, body) + "\n\n")
    for r in rows:
        if r["kind"] == "ipc":
            out.write(table(["SysV objects with contents", "plain create+fill s", "restore s", "restore / plain"],
                            [[r["objects"], r.get("plain"), r.get("restore"),
                              _ratio(r.get("restore"), r.get("plain"))]]) + "\n\n")
    for t in section.get("targets", []):
        out.write("target %s: %.2f (%s)\n" % (t["target"], t["value"], "met" if t["met"] else "MISSED"))
    for v in section["violations"]:
        out.write("VIOLATION %s\n" % v)
    out.write("machine: %s (shared with other tenants: compare ratios, not seconds)\n"
              % section.get("machine_line", "?"))
