"""Stdlib process creation in a pid request block (idpin/interpose/spawn.py).

subprocess (run, Popen, check_output; fork_exec and its posix_spawn path),
os.posix_spawn, os.posix_spawnp, os.system and os.spawn* inside
``request(pid=N)`` give the program pid N (it prints its own pid), or raise
IdBusyError with nothing left behind. Where the stdlib has semantics of its
own (Popen's options, posix_spawn's attributes, system()'s signals, the
errors of a failed exec or a bad argument), the pinned call is compared
with the stock one run beside it.
"""
import contextlib
import errno
import os
import signal
import subprocess
import tempfile
import threading
import time

import pytest

import idpin
from idpin import _sys, pids
from idpin.interpose import ORIGINALS, spawn
from idpin.testing import Forker

from helpers import as_root_and_nobody, reap

# The program prints its pid, and logs it where program_log() says.
PRINT_PID = 'echo $$; [ -z "$IDPIN_TEST_LOG" ] || echo $$ >>"$IDPIN_TEST_LOG"'


# ------------------------------------------------------------------ helpers


@contextlib.contextmanager
def child_output():
    """(fd for the child's stdout, read()): an inheritable pipe end, and its reader."""
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    chunks = []

    def read():
        if write_end not in closed:
            os.close(write_end)
            closed.add(write_end)
        while True:
            chunk = os.read(read_end, 65536)
            if not chunk:
                return b"".join(chunks).decode()
            chunks.append(chunk)

    closed = set()
    try:
        yield write_end, read
    finally:
        if write_end not in closed:
            os.close(write_end)
        os.close(read_end)


def via_run():
    return int(subprocess.run(["sh", "-c", PRINT_PID], stdout=subprocess.PIPE, check=True).stdout)


def via_popen():
    with subprocess.Popen(["sh", "-c", PRINT_PID], stdout=subprocess.PIPE) as proc:
        printed = int(proc.stdout.read())
    assert proc.returncode == 0 and proc.pid == printed
    return printed


def via_check_output():
    return int(subprocess.check_output(PRINT_PID, shell=True))


def via_popen_posix_spawn_path():
    # An absolute program and close_fds=False: Popen calls os.posix_spawn.
    assert subprocess._USE_POSIX_SPAWN
    with subprocess.Popen(["/bin/sh", "-c", PRINT_PID], stdout=subprocess.PIPE,
                          close_fds=False) as proc:
        printed = int(proc.stdout.read())
    assert proc.pid == printed
    return printed


def _spawned(spawn_call, program):
    with child_output() as (out, read):
        actions = [(os.POSIX_SPAWN_DUP2, out, 1)]
        pid = spawn_call(program, ["sh", "-c", PRINT_PID], os.environ, file_actions=actions)
        printed = int(read())
    assert reap(pid) == 0 and pid == printed
    return printed


def via_posix_spawn():
    return _spawned(os.posix_spawn, "/bin/sh")


def via_posix_spawnp():
    return _spawned(os.posix_spawnp, "sh")


def via_system():
    with child_output() as (out, read):
        assert os.system("{ %s; } >/proc/$$/fd/%d" % (PRINT_PID, out)) == 0
        return int(read())


def via_spawnv():
    with child_output() as (out, read):
        command = "{ %s; } >/proc/$$/fd/%d" % (PRINT_PID, out)
        pid = os.spawnv(os.P_NOWAIT, "/bin/sh", ["sh", "-c", command])
        printed = int(read())
    assert reap(pid) == 0 and pid == printed
    return printed


ENTRIES = {
    "run": via_run,
    "popen": via_popen,
    "check_output": via_check_output,
    "popen_posix_spawn": via_popen_posix_spawn_path,
    "posix_spawn": via_posix_spawn,
    "posix_spawnp": via_posix_spawnp,
    "system": via_system,
    "spawnv": via_spawnv,
}
entries = pytest.mark.parametrize("entry", sorted(ENTRIES))


@contextlib.contextmanager
def program_log():
    """read(): the pids of every program run in the block (through PRINT_PID)."""
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "ran")
        open(path, "w").close()
        os.environ["IDPIN_TEST_LOG"] = path
        try:
            yield lambda: [int(line) for line in open(path).read().split()]
        finally:
            del os.environ["IDPIN_TEST_LOG"]


@contextlib.contextmanager
def another_thread():
    """The process is multi-threaded inside: idpin forks through the knob."""
    done = threading.Event()
    thread = threading.Thread(target=done.wait, args=(30,))
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextlib.contextmanager
def sleeper():
    """A child that holds a pid until the block ends."""
    read_end, write_end = os.pipe()
    pid = ORIGINALS["os.fork"]()
    if pid == 0:
        os.close(write_end)
        os.read(read_end, 1)
        os._exit(0)
    os.close(read_end)
    try:
        yield pid
    finally:
        os.close(write_end)
        reap(pid)


def processes_besides(*known):
    """Processes of this pid namespace other than this one and ``known``."""
    return [int(name) for name in os.listdir("/proc")
            if name.isdigit() and int(name) not in (os.getpid(), *known)]


# glibc's posix_spawn child leaves its two internal signals (32 and 33)
# ignored; a pinned child leaves them as the caller had them. Programs on
# glibc install their own handlers for both at startup.
GLIBC_INTERNAL_SIGNALS = (1 << 31) | (1 << 32)


def signal_state(text, who):
    """{"SigBlk:": mask, "SigIgn:": mask} of ``who`` in a SIGNAL_STATE report."""
    fields = [line.split() for line in text.splitlines()]
    return {words[1]: int(words[2], 16) for words in fields if words[:1] == [who]}


def outcome(call):
    """What a call did: its return value, or its exception's type, errno, filename, text."""
    try:
        return "returned", call()
    except Exception as err:  # noqa: B902 - compared, stock against pinned
        return type(err), getattr(err, "errno", None), getattr(err, "filename", None), str(err)


# ------------------------------------------------------------------ the pid


@as_root_and_nobody
@entries
def test_each_entry_point_gives_the_program_the_pid(uid, entry):
    with idpin.request(pid=4321) as req:
        printed = ENTRIES[entry]()
    assert printed == 4321
    assert req.consumed == {"pid": 4321}


@entries
def test_each_entry_point_from_a_multithreaded_caller(entry):
    with another_thread():
        assert pids.thread_count() > 1  # so the knob path: glibc's fork, verified
        with idpin.request(pid=5432) as req:
            printed = ENTRIES[entry]()
    assert printed == 5432
    assert req.consumed == {"pid": 5432}


@pytest.mark.parametrize("entry", ["run", "posix_spawn", "system"])
def test_entry_point_called_from_a_thread_other_than_main(entry):
    results = []

    def work():
        with idpin.request(pid=6543) as req:
            results.append((ENTRIES[entry](), req.consumed))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert results == [(6543, {"pid": 6543})]


def test_threads_in_parallel_each_get_their_own_pid():
    results = {}
    # Every thread exists before any pid is pinned: a thread started after
    # a pinned fork would get the next tid, which a later attempt wants.
    all_started = threading.Barrier(3, timeout=30)

    def work(pid, entry):
        all_started.wait()
        for attempt in range(3):  # a busy id would be a bug here: none is taken
            with idpin.request(pid=pid + attempt) as req:
                results[pid + attempt] = (entry(), req.consumed)

    workers = [threading.Thread(target=work, args=(pid, entry))
               for pid, entry in ((11000, via_run), (12000, via_posix_spawn), (13000, via_system))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert results == {pid: (pid, {"pid": pid})
                       for base in (11000, 12000, 13000) for pid in range(base, base + 3)}


def test_nested_pid_namespace_levels_via_subprocess():
    # A tuple needs clone3 set_tid: the child is born in a pid namespace of
    # its own (pid 1 there), with pid 2345 here.
    _sys.unshare(_sys.CLONE_NEWPID)
    with idpin.request(pid=(1, 2345)) as req:
        with subprocess.Popen(["sh", "-c", PRINT_PID], stdout=subprocess.PIPE) as proc:
            printed = int(proc.stdout.read())
    assert (proc.pid, printed) == (2345, 1)
    assert req.consumed == {"pid": (1, 2345)}


def signal_settings():
    """This thread's mask and the SIGINT/SIGQUIT dispositions (system() changes them)."""
    return (signal.pthread_sigmask(signal.SIG_BLOCK, []),
            _sys.sigaction(signal.SIGINT, None)[0], _sys.sigaction(signal.SIGQUIT, None)[0])


@entries
def test_busy_pid_raises_and_leaves_nothing(entry):
    before = signal_settings()
    with sleeper() as taken, program_log() as programs_run:
        with idpin.request(pid=taken) as req:
            with pytest.raises(idpin.IdBusyError) as info:
                ENTRIES[entry]()
        assert programs_run() == []
        assert (info.value.errno, info.value.kind, info.value.id) == (errno.EBUSY, "pid", taken)
        assert req.consumed == {}
        assert processes_besides(taken) == []  # no child, no zombie
    assert signal_settings() == before


@pytest.mark.parametrize("entry", ["run", "posix_spawn", "system"])
def test_busy_pid_from_a_multithreaded_caller(entry):
    with another_thread(), sleeper() as taken, program_log() as programs_run:
        with idpin.request(pid=taken) as req:
            with pytest.raises(idpin.IdBusyError):
                ENTRIES[entry]()
        assert req.consumed == {} and programs_run() == []
        assert processes_besides(taken) == []


def test_request_is_consumed_once():
    with idpin.request(pid=3000) as req:
        first = via_popen()
        second = via_popen()
        third = via_posix_spawn()
    assert first == 3000 and 3000 not in (second, third)
    assert req.consumed == {"pid": 3000}


def test_no_pid_request_means_the_stdlibs_own_calls():
    assert subprocess._fork_exec is spawn.fork_exec
    assert (os.posix_spawn, os.posix_spawnp, os.system) == (
        spawn.posix_spawn, spawn.posix_spawnp, spawn.system)
    with idpin.request(pty=3) as req:  # a block, but no pid in it
        assert via_run() != 3 and via_system() > 1
    assert req.consumed == {}


# ------------------------------------------------------------------ failures


def spawnp_with_path(path, program):
    saved = os.environ["PATH"]
    os.environ["PATH"] = path
    try:
        return os.posix_spawnp(program, [program], {})
    finally:
        os.environ["PATH"] = saved


FAILING_CALLS = {
    "run_missing": lambda: subprocess.run(["/nonexistent/program"]),
    "run_missing_on_path": lambda: subprocess.run(["no-such-program-here"]),
    "run_missing_cwd": lambda: subprocess.run(["true"], cwd="/nonexistent"),
    "run_not_executable": lambda: subprocess.run(["/proc/self/status"]),
    "run_preexec_raises": lambda: subprocess.run(["true"], preexec_fn=lambda: 1 / 0),
    # setgroups is refused in a user namespace with setgroups=deny (EPERM).
    "run_extra_groups_empty": lambda: subprocess.run(["true"], extra_groups=[]),
    "popen_posix_spawn_missing": lambda: subprocess.Popen(["/nonexistent/p"], close_fds=False),
    "posix_spawn_missing": lambda: os.posix_spawn("/nonexistent/p", ["p"], {}),
    "posix_spawnp_missing": lambda: os.posix_spawnp("no-such-program-here", ["p"], {}),
    # On the caller's PATH, a non-executable match (EACCES) wins over later misses.
    "posix_spawnp_not_executable": lambda: spawnp_with_path("/proc/self:/nonexistent", "status"),
    "posix_spawn_open_fails": lambda: os.posix_spawn("/bin/true", ["true"], {}, file_actions=[
        (os.POSIX_SPAWN_OPEN, 5, "/nonexistent/file", os.O_RDONLY, 0)]),
}


# The tables below run in one test each: a namespace per case would cost
# more than the cases themselves.
def test_failed_exec_raises_as_the_stdlib_does_and_leaves_the_request_pending():
    for index, name in enumerate(sorted(FAILING_CALLS)):
        stock = outcome(FAILING_CALLS[name])
        assert stock[0] != "returned", name  # each of these must fail
        pid = 7000 + index
        with idpin.request(pid=pid) as req:
            assert outcome(FAILING_CALLS[name]) == stock, name
            assert req.consumed == {}, name
            with pytest.raises(ChildProcessError):
                os.waitpid(-1, os.WNOHANG)  # the failed child was reaped
            assert via_run() == pid, name  # still pending: the next process gets it
        assert req.consumed == {"pid": pid}, name


BAD_ARGUMENTS = {
    "argv_empty": lambda spawn_call: spawn_call("/bin/true", [], {}),
    "argv_not_a_list": lambda spawn_call: spawn_call("/bin/true", "true", {}),
    "argv_first_empty": lambda spawn_call: spawn_call("/bin/true", [""], {}),
    "argv_bad_type": lambda spawn_call: spawn_call("/bin/true", ["true", 5], {}),
    "path_null_byte": lambda spawn_call: spawn_call("/bin/tr\0ue", ["true"], {}),
    "env_bad_name": lambda spawn_call: spawn_call("/bin/true", ["true"], {"A=B": "1"}),
    "env_not_a_mapping": lambda spawn_call: spawn_call("/bin/true", ["true"], 5),
    "env_a_list": lambda spawn_call: spawn_call("/bin/true", ["true"], []),
    "env_bad_key_type": lambda spawn_call: spawn_call("/bin/true", ["true"], {1: "x"}),
    "actions_not_iterable": lambda spawn_call: spawn_call("/bin/true", ["true"], {},
                                                          file_actions=5),
    "scheduler_short": lambda spawn_call: spawn_call("/bin/true", ["true"], {},
                                                     scheduler=(1,)),
    "action_not_a_tuple": lambda spawn_call: spawn_call("/bin/true", ["true"], {},
                                                        file_actions=[[1]]),
    "action_unknown": lambda spawn_call: spawn_call("/bin/true", ["true"], {},
                                                    file_actions=[(99,)]),
    "action_short": lambda spawn_call: spawn_call("/bin/true", ["true"], {},
                                                  file_actions=[(os.POSIX_SPAWN_CLOSE,)]),
    "action_bad_fd": lambda spawn_call: spawn_call("/bin/true", ["true"], {},
                                                   file_actions=[(os.POSIX_SPAWN_CLOSE, -1)]),
    "setpgroup_none": lambda spawn_call: spawn_call("/bin/true", ["true"], {}, setpgroup=None),
    "signal_out_of_range": lambda spawn_call: spawn_call("/bin/true", ["true"], {},
                                                        setsigmask=[0]),
    "scheduler_not_param": lambda spawn_call: spawn_call("/bin/true", ["true"], {},
                                                         scheduler=(None, 1)),
    "unknown_keyword": lambda spawn_call: spawn_call("/bin/true", ["true"], {}, nonsense=1),
    "too_many_positional": lambda spawn_call: spawn_call("/bin/true", ["true"], {}, ()),
}


def test_bad_posix_spawn_arguments_raise_what_the_stdlib_raises():
    for name, call in sorted(BAD_ARGUMENTS.items()):
        stock = outcome(lambda: call(ORIGINALS["os.posix_spawn"]))
        assert stock[0] != "returned", name
        with idpin.request(pid=7100) as req:
            assert outcome(lambda: call(os.posix_spawn)) == stock, name
        assert req.consumed == {}, name
    assert processes_besides() == []


BAD_POPEN_ARGUMENTS = {
    "null_in_program": lambda: subprocess.run(["tr\0ue"]),
    "null_in_argument": lambda: subprocess.run(["true", "a\0b"]),
    "null_in_cwd": lambda: subprocess.run(["true"], cwd="/tm\0p"),
    "negative_pass_fd": lambda: subprocess.run(["true"], pass_fds=[-1]),
    "bad_argument_type": lambda: subprocess.run(["true", 5]),
    "bad_group_type": lambda: subprocess.run(["true"], extra_groups=[0.5]),
}


def test_bad_popen_arguments_raise_what_the_stdlib_raises():
    for name, call in sorted(BAD_POPEN_ARGUMENTS.items()):
        stock = outcome(call)
        assert stock[0] != "returned", name
        with idpin.request(pid=7150) as req:
            assert outcome(call) == stock, name
        assert req.consumed == {}, name


def test_bad_system_and_popen_arguments_raise_before_anything_happens():
    with idpin.request(pid=7200) as req:
        with pytest.raises(ValueError, match="embedded null byte"):
            os.system("echo \0")
        with pytest.raises(TypeError):
            os.system(None)
        with pytest.raises(TypeError):
            subprocess.run(["true", 5])
    assert req.consumed == {}


# ------------------------------------------------------------------ semantics kept


# Shell builtins read the shell's own signal state: a fork in between (dash
# blocks every signal around its vfork) could show a passing mask.
SIGNAL_STATE = """
while read key value; do
  case $key in SigBlk:|SigIgn:) echo "$1 $key $value";; esac
done < /proc/$2/status
"""
SHOW_PROCESS = """
show_signals() {%s}
show_signals self $$
read line; echo "in=$line"; echo "cwd=$(pwd)"; echo "foo=$FOO"; echo "umask=$(umask)"
set -- $(cut -d' ' -f5,6 /proc/$$/stat)
[ "$1" = $$ ] && echo "own group"; [ "$2" = $$ ] && echo "own session"
for fd in 3 4 5 6 7 8 9; do [ -e /proc/$$/fd/$fd ] && echo "fd $fd open"; done
echo err >&2
""" % SIGNAL_STATE


def _show_process(passed, **options):
    with subprocess.Popen(["sh", "-c", SHOW_PROCESS], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          pass_fds=passed, **options) as proc:
        out, err = proc.communicate(b"hello\n", timeout=30)
    return proc.pid, proc.returncode, out.decode(), err.decode()


POPEN_OPTIONS = {
    "defaults": {},
    "session_env_cwd_umask": {"start_new_session": True, "env": {"FOO": "bar"},
                              "cwd": "/proc", "umask": 0o027},
    "group_no_restore": {"process_group": 0, "restore_signals": False},
    "no_close_fds": {"close_fds": False},
    "user_group": {"user": 0, "group": 0},
    "preexec": {"preexec_fn": lambda: os.environ.__setitem__("FOO", "from-preexec")},
}


@pytest.mark.parametrize("name", sorted(POPEN_OPTIONS))
def test_popen_options_work_as_in_the_stdlib(name):
    passed = os.open("/dev/null", os.O_RDONLY)
    other = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(other, True)
    try:
        options = POPEN_OPTIONS[name]
        kept = () if options.get("close_fds") is False else (passed,)
        stock = _show_process(kept, **options)
        with idpin.request(pid=8000) as req:
            pinned = _show_process(kept, **options)
    finally:
        os.close(passed)
        os.close(other)
    assert pinned[0] == 8000 and req.consumed == {"pid": 8000}
    assert pinned[1:] == stock[1:]
    assert "in=hello" in pinned[2] and pinned[3] == "err\n"


SPAWN_ATTRIBUTES = {
    "none": {},
    "setsid": {"setsid": True},
    "setpgroup": {"setpgroup": 0},
    "signals": {"setsigmask": [signal.SIGUSR1, signal.SIGHUP], "setsigdef": [signal.SIGPIPE]},
    "resetids_scheduler": {"resetids": True, "scheduler": (None, os.sched_param(0))},
    "scheduler_policy": {"scheduler": (os.SCHED_OTHER, os.sched_param(0))},
}


def _show_spawned(spawn_call, program, attributes):
    with tempfile.TemporaryDirectory() as scratch, child_output() as (out, read):
        actions = [
            (os.POSIX_SPAWN_OPEN, 7, scratch + "/made", os.O_WRONLY | os.O_CREAT, 0o600),
            (os.POSIX_SPAWN_DUP2, out, 1),
            (os.POSIX_SPAWN_DUP2, 1, 1),
            (os.POSIX_SPAWN_CLOSE, out),
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        ]
        pid = spawn_call(program, ["sh", "-c", SHOW_PROCESS], {"FOO": "spawned"},
                         file_actions=actions, **attributes)
        shown = read()
        status = reap(pid)
        made = os.path.exists(scratch + "/made")
    return pid, status, shown, made


@pytest.mark.parametrize("name", sorted(SPAWN_ATTRIBUTES))
def test_posix_spawn_attributes_and_file_actions_work_as_in_the_stdlib(name):
    stock = _show_spawned(ORIGINALS["os.posix_spawnp"], "sh", SPAWN_ATTRIBUTES[name])
    with idpin.request(pid=8100) as req:
        pinned = _show_spawned(os.posix_spawnp, "sh", SPAWN_ATTRIBUTES[name])
    assert pinned[0] == 8100 and req.consumed == {"pid": 8100}
    assert (pinned[1], pinned[3]) == (stock[1], stock[3])
    pinned_signals, stock_signals = signal_state(pinned[2], "self"), signal_state(stock[2], "self")
    stock_signals["SigIgn:"] &= ~GLIBC_INTERNAL_SIGNALS
    assert pinned_signals == stock_signals
    assert [line for line in pinned[2].splitlines() if not line.startswith("self")] == [
        line for line in stock[2].splitlines() if not line.startswith("self")]
    assert "fd 7 open" in pinned[2] and "foo=spawned" in pinned[2]


SYSTEM_PROBE = ("show_signals() {%s}; exec >/proc/$$/fd/%%d; show_signals caller $PPID; "
                "show_signals shell $$; kill -INT $PPID; echo $$; exit 3" % SIGNAL_STATE)


@pytest.mark.parametrize("where", ["main", "thread"])
def test_system_keeps_its_signal_semantics_and_status(where):
    before = (_sys.sigaction(signal.SIGINT, None)[0], _sys.sigaction(signal.SIGQUIT, None)[0],
              signal.getsignal(signal.SIGINT))
    results = {}

    def probe():
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        results["stock"] = _system_probe_with(ORIGINALS["os.system"])
        with idpin.request(pid=8200) as req:
            results["pinned"] = _system_probe_with(os.system)
        results["consumed"] = req.consumed
        results["mask"] = (mask, signal.pthread_sigmask(signal.SIG_BLOCK, []))

    if where == "main":
        probe()
    else:
        thread = threading.Thread(target=probe)
        thread.start()
        thread.join()
    assert results["consumed"] == {"pid": 8200}
    stock, pinned = results["stock"], results["pinned"]
    # The caller ignored SIGINT (no KeyboardInterrupt) and blocked SIGCHLD
    # while it waited; the shell had SIGINT back; the status is the raw one.
    assert pinned[0] == stock[0] == 3 << 8
    assert pinned[2] == 8200
    shell, stock_shell = signal_state(pinned[1], "shell"), signal_state(stock[1], "shell")
    stock_shell["SigIgn:"] &= ~GLIBC_INTERNAL_SIGNALS
    assert shell == stock_shell
    # The caller's mask is read while it may still be inside the fork (both
    # block every signal there): compare what it ignores, and see SIGCHLD
    # blocked (/proc/PID/status shows the main thread's mask).
    caller, stock_caller = signal_state(pinned[1], "caller"), signal_state(stock[1], "caller")
    assert caller["SigIgn:"] == stock_caller["SigIgn:"]
    assert caller["SigIgn:"] & 0b110 == 0b110  # SIGINT, SIGQUIT
    if where == "main":
        assert caller["SigBlk:"] & (1 << (signal.SIGCHLD - 1))
    assert results["mask"][0] == results["mask"][1]
    after = (_sys.sigaction(signal.SIGINT, None)[0], _sys.sigaction(signal.SIGQUIT, None)[0],
             signal.getsignal(signal.SIGINT))
    assert after == before


def _system_probe_with(system_call):
    with child_output() as (out, read):
        status = system_call(SYSTEM_PROBE % out)
        lines = read().splitlines()
    shell = lines.pop()
    return status, "\n".join(lines), int(shell)


# ------------------------------------------------------------------ faults


class Raised(Exception):
    pass


@contextlib.contextmanager
def raising_on(sig):
    def handler(signum, frame):
        raise Raised()

    previous = signal.signal(sig, handler)
    try:
        yield
    finally:
        signal.signal(sig, previous)


def _signal_parent_then_hang():
    os.kill(os.getppid(), signal.SIGUSR1)
    time.sleep(30)  # killed by the parent long before


def test_a_raising_handler_while_waiting_for_the_exec_undoes_the_child():
    with raising_on(signal.SIGUSR1), idpin.request(pid=9000) as req:
        with pytest.raises(Raised):
            subprocess.run(["true"], preexec_fn=_signal_parent_then_hang)
        assert req.consumed == {}
        assert processes_besides() == []
        assert via_run() == 9000


def test_a_raising_handler_during_system_is_raised_once_the_shell_is_reaped():
    before = _sys.sigaction(signal.SIGINT, None)[0]
    with raising_on(signal.SIGUSR1), idpin.request(pid=9100) as req:
        with pytest.raises(Raised):
            os.system("kill -USR1 $PPID; exit 4")
    assert req.consumed == {"pid": 9100}
    assert processes_besides() == []
    assert _sys.sigaction(signal.SIGINT, None)[0] == before
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()


# ------------------------------------------------------------------ noise


@pytest.mark.parametrize("threads", [1, 2])
def test_no_wrong_pid_with_a_process_forking_beside(threads):
    wanted = [20000 + 37 * i for i in range(12)]
    got, busy = [], []
    with contextlib.ExitStack() as stack:
        if threads > 1:
            stack.enter_context(another_thread())
        programs_run = stack.enter_context(program_log())
        stack.enter_context(Forker())
        for i, pid in enumerate(wanted):
            entry = (via_run, via_posix_spawn, via_system)[i % 3]
            try:
                with idpin.request(pid=pid) as req:
                    got.append((pid, entry(), req.consumed))
            except idpin.IdBusyError as err:
                assert err.id == pid
                busy.append(pid)
        ran = programs_run()
    assert all(printed == pid and consumed == {"pid": pid} for pid, printed, consumed in got)
    assert len(got) + len(busy) == len(wanted) and got
    # No program ran under a wrong pid, nor for a request that raised.
    assert ran == [pid for pid, _, _ in got]


# ------------------------------------------------------------------ _sys.sigaction


def test_sigaction_sets_reads_and_restores_from_any_thread():
    handler, saved = _sys.sigaction(signal.SIGUSR2, signal.SIG_IGN)
    assert handler == signal.SIG_DFL
    assert _sys.sigaction(signal.SIGUSR2, None)[0] == signal.SIG_IGN
    thread = threading.Thread(target=_sys.sigaction, args=(signal.SIGUSR2, saved))
    thread.start()
    thread.join()
    assert _sys.sigaction(signal.SIGUSR2, None)[0] == signal.SIG_DFL
    # Python's own table is left alone; its C handler survives a round trip.
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    python_handler, saved_int = _sys.sigaction(signal.SIGINT, signal.SIG_IGN)
    assert python_handler not in (signal.SIG_DFL, signal.SIG_IGN)
    _sys.sigaction(signal.SIGINT, saved_int)
    assert _sys.sigaction(signal.SIGINT, None)[0] == python_handler
    with pytest.raises(OSError) as info:
        _sys.sigaction(signal.SIGKILL, signal.SIG_IGN)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(ValueError, match="saved sigaction"):
        _sys.sigaction(signal.SIGUSR2, b"short")


def test_sigaction_does_not_leak():
    from test_sys_leaks import run_many

    def round_trip():
        _, saved = _sys.sigaction(signal.SIGUSR2, signal.SIG_IGN)
        _sys.sigaction(signal.SIGUSR2, saved)

    run_many(round_trip)
