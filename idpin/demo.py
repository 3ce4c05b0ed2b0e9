"""``idpin demo``: a short, real showcase, run in fresh namespaces.

It asks for ids of every kind and prints what it asked for beside what it
got, then races a background forker (a process that forks on its own, as
any program may) against three ways of choosing pids: writing ns_last_pid
without a lock, as ad-hoc restore scripts do; idpin through the same knob,
locked and verified; and idpin through clone3 set_tid.
"""
import errno
import os
import threading

from . import ipc, pids, request
from .errors import IdBusyError
from .interpose import ORIGINALS
from .testing import Forker, run_in_namespaces

RACE_ATTEMPTS = 300
RACE_BASE = 20000


def exact_ids():
    """Rows (kind, requested, obtained, mechanism) for one id of each kind."""
    rows = []
    with request(pid=4242) as req:
        child = os.fork()
        if child == 0:
            os._exit(0 if os.getpid() == 4242 else 1)
    os.waitpid(child, 0)
    rows.append(("pid", 4242, req.consumed.get("pid", child), pids.choose_mechanism((4242,))))

    got = []
    with request(tid=4343):
        worker = threading.Thread(target=lambda: got.append(threading.get_native_id()))
        worker.start()
        worker.join()
    rows.append(("tid", 4343, got[0], "ns_last_pid"))

    wanted = {"sem": 32769 + 7, "shm": (3 << 15) | 12, "msg": (9 << 15) | 5}
    with request(**wanted):
        made = {
            "sem": ipc.semget(ipc.IPC_PRIVATE, 3, 0o600),
            "shm": ipc.shmget(ipc.IPC_PRIVATE, 4096, 0o600),
            "msg": ipc.msgget(ipc.IPC_PRIVATE, 0o600),
        }
    for kind, id in made.items():
        rows.append((kind, wanted[kind], id, ipc.KNOB[kind]))
        ipc.remove(kind, id)

    with request(pty=5):
        master, slave = os.openpty()
    rows.append(("pty", "/dev/pts/5", os.ttyname(slave), "ptmx-walk"))
    os.close(master)
    os.close(slave)
    return rows


SUPERVISED_SCRIPT = "sleep 0 & echo $!; wait; ipcmk -S 1; script -qc tty /dev/null; ipcrm -s 65543"


def supervised_ids():
    """Rows (kind, requested, obtained) for an unmodified shell script under the supervisor."""
    import subprocess

    from .interpose.supervisor import Supervisor

    plan = {"idpin_plan": 1, "root": 700, "processes": [
        {"pid": 700, "next": {"pid": [4200, 4201, 4202, 4203]}},
        {"pid": 4201, "next": {"sem": [65543]}},
        {"pid": 4202, "next": {"pty": [7]}},
    ]}
    with Supervisor(plan) as sup:
        proc = sup.spawn(["sh", "-c", "echo $$; " + SUPERVISED_SCRIPT], pid=700, stdout=subprocess.PIPE)
        words = proc.communicate(timeout=60)[0].decode().split()
    got = dict(zip(("self", "fork", "sem", "pty"), (words[0], words[1], words[-2] if len(words) > 5 else "?",
                                                    words[-1])))
    return [("pid of the program", 700, got["self"]), ("pid of its first fork", 4200, got["fork"]),
            ("sem id made by ipcmk", 65543, got["sem"]), ("pty opened by script", "/dev/pts/7", got["pty"])]


def _naive_fork(pid):
    with open("/proc/sys/kernel/ns_last_pid", "w") as knob:
        knob.write(str(pid - 1))
    return ORIGINALS["os.fork"]()


def _idpin_fork(mechanism):
    return lambda pid: pids.fork(pid=pid, mechanism=mechanism)


def race(strategy, fork_with_pid, attempts=RACE_ATTEMPTS, base=RACE_BASE):
    """Fork ``attempts`` times asking for consecutive pids, beside a Forker."""
    exact = wrong = busy = 0
    with Forker():
        for pid in range(base, base + attempts):
            try:
                child = fork_with_pid(pid)
            except IdBusyError:
                busy += 1
                continue
            if child == 0:
                os._exit(0)
            os.waitpid(child, 0)
            if child == pid:
                exact += 1
            else:
                wrong += 1
    return (strategy, attempts, exact, wrong, busy)


def races():
    return [
        race("naive: ns_last_pid, no lock", _naive_fork, base=RACE_BASE),
        race("idpin: ns_last_pid, locked + verified", _idpin_fork("ns_last_pid"), base=RACE_BASE + 1000),
        race("idpin: clone3 set_tid", _idpin_fork("clone3"), base=RACE_BASE + 2000),
    ]


def _showcase():
    return exact_ids(), races()


def table(header, rows):
    rows = [tuple(str(cell) for cell in row) for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join("%-*s" % (w, h) for w, h in zip(widths, header))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join("%-*s" % (w, c) for w, c in zip(widths, row)) for row in rows]
    return "\n".join(out)


def main(out):
    ids, race_rows = run_in_namespaces(_showcase)
    out.write("Exact ids, in fresh user+pid+ipc+mount namespaces:\n\n")
    out.write(table(("kind", "requested", "obtained", "mechanism"), ids) + "\n\n")
    out.write(
        "Racing a process that forks on its own (%d pids asked for per strategy):\n\n" % RACE_ATTEMPTS
    )
    out.write(table(("strategy", "attempts", "exact", "WRONG pid", "IdBusyError"), race_rows) + "\n\n")
    out.write(
        "A wrong pid is a child that silently got another pid than the one asked for.\n"
        "idpin never hands one out: it raises IdBusyError (errno %d) instead.\n" % errno.EBUSY
    )
    supervised = run_in_namespaces(supervised_ids)
    out.write("\nAn unmodified shell script under the supervisor (idpin run --plan), in fresh namespaces:\n")
    out.write("  sh -c '%s'\n\n" % SUPERVISED_SCRIPT)
    out.write(table(("what", "planned", "obtained"), supervised) + "\n")
    failures = [row for row in ids + supervised if str(row[1]) != str(row[2])]
    failures += [row for row in race_rows if row[0].startswith("idpin") and row[3]]
    return 1 if failures else 0
