"""``idpin bench supervisor``: what the seccomp supervisor costs a program.

Everything runs in fresh namespaces, supervisor and programs together, in
alternating rounds; each figure is the median over rounds of a ratio taken
within one round. The programs are one C binary (supervisor.c, compiled at
run time) that times its own calls, so no Python is inside a measurement.

- trapped call, nothing pending: ioctl(/dev/null, TIOCGPTN) (trapped by the
  filter, answered CONTINUE by the receive loop) under idpin's supervisor,
  vs the same under a C supervisor that answers CONTINUE (the floor), each
  with and without SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP; the unsupervised call
  is shown too. Target: idpin <= 2x the floor.
- pinned fork / semget / pty through the supervisor (every id from a plan)
  vs the same calls unsupervised. Target for fork: >= 0.9x the speed.
- a shell script forking (and exec'ing /bin/true) 1,000 times, supervised
  with nothing pending vs unsupervised. Target: >= 0.9x the speed.

``--quick`` (CI) makes a few calls of each and checks only that every pinned
id came out right and nothing was left behind.
"""
import collections
import importlib.resources
import os
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time

from .. import testing
from ..interpose.supervisor import Supervisor
from .floor import FloorUnavailable
from .report import table

Shape = collections.namedtuple("Shape", "rounds calls forks ptys shell_forks")
FULL = Shape(rounds=7, calls=20000, forks=200, ptys=40, shell_forks=1000)
QUICK = Shape(rounds=1, calls=200, forks=5, ptys=3, shell_forks=20)

PROGRAM_PID = 900
FIRST_PID = 1000
FIRST_PTY = 10
NAMESPACE_TIMEOUT = 900.0


def build():
    """Compile supervisor.c; (binary path, directory to remove)."""
    compiler = shlex.split(os.environ.get("CC", "gcc"))
    if shutil.which(compiler[0]) is None:
        raise FloorUnavailable("no C compiler %r (set CC, or apt-get install gcc)" % compiler[0])
    workdir = tempfile.mkdtemp(prefix="idpin-bench-supervisor-")
    os.chmod(workdir, 0o755)
    source = os.path.join(workdir, "supervisor.c")
    binary = os.path.join(workdir, "supervisor")
    with open(source, "wb") as f:
        f.write(importlib.resources.files(__package__).joinpath("supervisor.c").read_bytes())
    command = compiler + ["-O2", "-o", binary, source, "-lutil"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise FloorUnavailable("%s failed: %s" % (" ".join(command), done.stderr.strip()[-500:]))
    return binary, workdir


def parse(output):
    """(ns per operation, [ids]) from a workload's output; an error's ids are None."""
    lines = output.decode().split()
    ns = float(lines[0].partition("=")[2])
    ids = [int(line[3:]) if line.startswith("id=") else None for line in lines[1:]]
    return ns, ids


def plain(binary, what, n):
    done = subprocess.run([binary, what, str(n)], capture_output=True, timeout=300, check=True)
    return parse(done.stdout)


def floor(binary, sync, n):
    done = subprocess.run([binary, "floor", str(int(sync)), str(n), binary, "ioctl", str(n)],
                          capture_output=True, timeout=300, check=True)
    return parse(done.stdout)[0]


def supervised(binary, what, n, plan=None, sync=False):
    """(ns per operation, ids, the supervisor's errors) of the workload under idpin."""
    with Supervisor(plan, sync_wakeup=sync) as sup:
        proc = sup.spawn([binary, what, str(n)], pid=PROGRAM_PID if plan else None,
                         stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=300)
        errors = list(sup.errors)
    if proc.returncode != 0:
        raise RuntimeError("%s %s exited with %d" % (binary, what, proc.returncode))
    ns, ids = parse(out)
    return ns, ids, errors


def plan_for(kind, ids):
    return {"idpin_plan": 1, "root": PROGRAM_PID,
            "processes": [{"pid": PROGRAM_PID, "next": {kind: list(ids)}}]}


def shell_seconds(n, sup=None):
    script = 'i=0; while [ $i -lt %d ]; do /bin/true; i=$((i+1)); done' % n
    start = time.perf_counter()
    if sup is None:
        subprocess.run(["sh", "-c", script], check=True, timeout=600)
    else:
        proc = sup.spawn(["sh", "-c", script])
        if proc.wait(timeout=600) != 0:
            raise RuntimeError("the supervised shell loop failed")
    return time.perf_counter() - start


def one_round(binary, shape):
    """Every measurement once, in this namespace; {name: value} and wrong ids."""
    m, wrong = {}, []
    m["ioctl bare"] = plain(binary, "ioctl", shape.calls)[0]
    for sync in (False, True):
        m["ioctl floor sync=%d" % sync] = floor(binary, sync, shape.calls)
        m["ioctl idpin sync=%d" % sync] = supervised(binary, "ioctl", shape.calls, sync=sync)[0]
    pinned = {
        "fork": ("pid", list(range(FIRST_PID, FIRST_PID + shape.forks))),
        "semget": ("sem", [(1 << 15) | i for i in range(shape.forks)]),
        "pty": ("pty", list(range(FIRST_PTY, FIRST_PTY + shape.ptys))),
    }
    for what, (kind, ids) in pinned.items():
        m[what + " plain"] = plain(binary, what, len(ids))[0]
        ns, got, errors = supervised(binary, what, len(ids), plan_for(kind, ids))
        m[what + " pinned"] = ns
        if got != ids or errors:
            wrong.append("%s: asked %s, got %s (%s)" % (what, ids, got, errors))
    m["shell plain"] = shell_seconds(shape.shell_forks)
    with Supervisor() as sup:
        m["shell supervised"] = shell_seconds(shape.shell_forks, sup)
    return m, wrong


def measure(binary, shape):
    rounds, wrong = [], []
    for _ in range(shape.rounds):
        values, bad = one_round(binary, shape)
        rounds.append(values)
        wrong += bad
    return rounds, wrong


def median_of(rounds, name):
    return statistics.median(r[name] for r in rounds)


def paired(rounds, top, bottom):
    return statistics.median(r[top] / r[bottom] for r in rounds)


def rows_of(backend, rounds, wrong):
    best_floor = min(median_of(rounds, "ioctl floor sync=0"), median_of(rounds, "ioctl floor sync=1"))
    rows = []
    for sync in (0, 1):
        ns = median_of(rounds, "ioctl idpin sync=%d" % sync)
        rows.append(row("trapped call, nothing pending (SYNC_WAKE_UP=%d)" % sync, backend, "us/call",
                        ns / 1000, median_of(rounds, "ioctl floor sync=%d" % sync) / 1000,
                        paired(rounds, "ioctl idpin sync=%d" % sync, "ioctl floor sync=%d" % sync),
                        "<= 2x floor", "time"))
    rows.append(row("(floor: best C supervisor; unsupervised call)", backend, "us/call", best_floor / 1000,
                    median_of(rounds, "ioctl bare") / 1000, None, "-", "time"))
    for what, target in (("fork", ">= 0.9x speed"), ("semget", "-"), ("pty", "-")):
        rows.append(row("pinned %s via supervisor vs unsupervised" % what, backend, "us/op",
                        median_of(rounds, what + " pinned") / 1000, median_of(rounds, what + " plain") / 1000,
                        paired(rounds, what + " plain", what + " pinned"), target, "speed"))
    rows.append(row("shell forking %d times, supervised vs not" % SHAPE_SHELL[0], backend, "s",
                    median_of(rounds, "shell supervised"), median_of(rounds, "shell plain"),
                    paired(rounds, "shell plain", "shell supervised"), ">= 0.9x speed", "speed"))
    rows[-1]["wrong"] = wrong
    return rows


SHAPE_SHELL = [FULL.shell_forks]


def row(benchmark, backend, unit, subject, floor_value, ratio, target, sense):
    return {"benchmark": benchmark, "backend": backend, "unit": unit, "subject": subject,
            "floor": floor_value, "ratio": ratio, "target": target, "sense": sense,
            "meets": meets(ratio, target), "wrong": []}


def meets(ratio, target):
    if ratio is None or target == "-":
        return None
    if target.startswith("<="):
        return ratio <= float(target.split()[1].rstrip("x"))
    return ratio >= float(target.split()[1].rstrip("x"))


def run_suite(quick, backends):
    shape = QUICK if quick else FULL
    SHAPE_SHELL[0] = shape.shell_forks
    binary, workdir = build()
    started = time.monotonic()
    rows = []
    try:
        for backend in backends:
            rounds, wrong = testing.run_in_namespaces(measure, binary, shape, backend=backend,
                                                      timeout=NAMESPACE_TIMEOUT)
            rows += rows_of(backend, rounds, wrong)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows, time.monotonic() - started


def violations(rows):
    return [text for row in rows for text in row["wrong"]]


def render(section, out):
    header = ("benchmark", "backend", "unit", "idpin", "baseline", "ratio", "target", "met")
    body = [(r["benchmark"], r["backend"], r["unit"], r["subject"], r["floor"],
             None if r["ratio"] is None else "%.2fx" % r["ratio"], r["target"],
             {True: "yes", False: "NO", None: "-"}[r["meets"]]) for r in section["rows"]]
    out.write("Supervisor cost (%s run, %.0f s; %s)\n\n" % (
        section.get("mode", "?"), section["seconds"], section.get("machine_line", "")))
    out.write(table(header, body) + "\n\n")
    out.write("ratio: 'time' rows idpin/floor (lower is better); 'speed' rows baseline/idpin time "
              "(higher is better). baseline: the C floor supervisor, or the unsupervised program.\n")
    if section["violations"]:
        out.write("\nINVARIANTS BROKEN:\n" + "\n".join(section["violations"]) + "\n")
    else:
        out.write("Invariants held: every pinned id exact, nothing left behind.\n")
