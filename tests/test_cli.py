import io
import os
import subprocess
import sys

import pytest

import idpin
from idpin import _sys, cli


def run(*argv):
    out = io.StringIO()
    return cli.main(list(argv), out=out), out.getvalue()


def every_parser(p=None, path=()):
    """(path, parser) for the idpin parser and every subcommand under it, at any depth."""
    p = p or cli.parser()
    yield path, p
    for name, child in cli.subcommands(p).items():
        yield from every_parser(child, path + (name,))


def help_text(capsys, *argv):
    with pytest.raises(SystemExit) as exit:
        cli.main(list(argv), out=io.StringIO())
    captured = capsys.readouterr()
    assert exit.value.code == 0, captured.err
    return captured.out


@pytest.mark.host
def test_the_walk_finds_every_registered_command_and_the_bench_suites():
    paths = {path for path, _ in every_parser()}
    assert {(name,) for name in cli.COMMANDS} <= paths
    assert {(), ("bench", "race"), ("bench", "perf")} <= paths


@pytest.mark.host
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_subcommand_help_works_and_lists_its_options(capsys, flag):
    for path, p in every_parser():
        text = help_text(capsys, *path, flag)
        assert text.startswith("usage: " + " ".join(("idpin",) + path)), (path, text)
        options = [o for action in p._actions for o in action.option_strings]
        assert "-h" in options and "--help" in options
        missing = [o for o in options if o not in text]
        assert missing == [], (path, missing)
        missing = [name for name in cli.subcommands(p) if name not in text]
        assert missing == [], (path, missing)


@pytest.mark.host
@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(capsys, flag):
    assert help_text(capsys, flag) == "idpin %s\n" % idpin.__version__


@pytest.mark.host
@pytest.mark.parametrize("path", [(), ("bench",)], ids=["idpin", "bench"])
def test_a_command_without_its_subcommand_lists_them(path):
    status, text = run(*path)
    assert status == 2
    names = cli.COMMANDS if path == () else ("race", "perf")
    assert text.startswith("usage: ") and all(name in text for name in names), text


@pytest.mark.host
def test_the_installed_command_line_answers_bench_help(tmp_path):
    # Through the real argv handling, from a directory without the source tree.
    done = subprocess.run([sys.executable, "-m", "idpin", "bench", "perf", "-h"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--plot" in done.stdout


def test_probe_reports_every_kind_with_its_mechanism():
    caps = idpin.probe()
    assert {k: (c.ok, c.mechanism, c.reason) for k, c in caps.items()} == {
        "pid": (True, "clone3", ""),
        "tid": (True, "ns_last_pid", ""),
        "sem": (True, "sem_next_id", ""),
        "shm": (True, "shm_next_id", ""),
        "msg": (True, "msg_next_id", ""),
        "pty": (True, "ptmx-walk", ""),
    }


def test_probe_does_not_create_the_init_of_a_new_pid_namespace():
    idpin._sys.unshare(idpin._sys.CLONE_NEWPID)
    caps = idpin.probe()
    assert caps["pid"].ok and "must be pid 1" in caps["pid"].reason
    child = idpin.fork(pid=(1, 3333))  # the namespace can still get its init
    if child == 0:
        os._exit(0 if os.getpid() == 1 else 1)
    assert child == 3333 and os.waitpid(child, 0)[1] == 0


def fits_80_columns(text):
    return max(len(line) for line in text.splitlines()) <= 79


def test_doctor_prints_a_table_and_the_backend(backend):
    for argv in (["doctor"], ["doctor", "--check"], ["doctor", "--check", "pid", "pty"]):
        status, text = run(*argv)
        assert status == 0, (argv, text)
    lines = text.splitlines()
    assert lines[0].split() == ["kind", "ok", "mechanism", "reason", "/", "fix"]
    assert [line.split()[:3] for line in lines[2:8]] == [
        ["pid", "yes", "clone3"], ["tid", "yes", "ns_last_pid"], ["sem", "yes", "sem_next_id"],
        ["shm", "yes", "shm_next_id"], ["msg", "yes", "msg_next_id"], ["pty", "yes", "ptmx-walk"],
    ]
    assert "backend: %s" % backend in text
    assert fits_80_columns(text)
    assert "warning" not in text  # fresh namespaces: pinning here changes nothing of the host's


@pytest.mark.namespaces(uid=idpin.testing.NOBODY, userns=False)
def test_doctor_says_why_and_how_to_fix_when_unprivileged_in_80_columns_and_check_fails():
    status, text = run("doctor")
    assert status == 0
    assert fits_80_columns(text)
    rows = [line for line in text.splitlines() if line.startswith(("pid ", "sem ", "pty "))]
    assert [row.split()[:2] for row in rows] == [["pid", "NO"], ["sem", "NO"], ["pty", "yes"]]
    # The reason is wrapped under its column, the fix whole on the lines below.
    reason = " ".join(line.strip() for line in text.split("\npid")[1].split("\ntid")[0].splitlines())
    assert "unshare --user --map-root-user --pid" in reason
    assert "warning" not in text  # it can pin nothing here
    status, text = run("doctor", "--check")
    assert status == 1 and "check failed: not available: pid, tid, sem, shm, msg\n" in text
    assert run("doctor", "--check", "pty")[0] == 0
    assert run("doctor", "--check", "pty", "tid")[0] == 1


def test_doctor_warns_where_pinning_would_change_the_hosts_namespaces(monkeypatch):
    import importlib

    probe = importlib.import_module("idpin.probe")  # idpin.probe is the function
    assert probe.host_namespaces() == []
    # Make this test's fresh namespaces look like the host's initial ones.
    monkeypatch.setattr(probe, "INITIAL_NAMESPACE_INODES", {
        name: os.stat("/proc/self/ns/" + name).st_ino for name in ("pid_for_children", "ipc")})
    assert probe.host_namespaces() == ["pid", "ipc"]
    status, text = run("doctor")
    assert status == 0 and fits_80_columns(text)
    warning = " ".join(text.split("warning: ")[1].split())
    assert warning.startswith("this process can pin ids (pid, tid, sem, shm, msg) in the host's own "
                              "pid and IPC namespaces: that changes the host"), warning
    assert "unshare --user --map-root-user --pid --ipc" in warning


@pytest.mark.host
def test_the_test_suite_runs_in_the_hosts_initial_namespaces():
    # The other side of the doctor's warning: .ci/run runs pytest as root on
    # the host, where this process's namespaces are the initial ones.
    from idpin.probe import host_namespaces

    assert host_namespaces() == ["pid", "ipc"]


@pytest.mark.host
def test_doctor_refuses_an_unknown_kind_to_check(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["doctor", "--check", "pids"])
    assert exit.value.code == 2 and "invalid choice: 'pids'" in capsys.readouterr().err


def _demo_as_this_user():
    return os.getuid(), run("demo")


@pytest.mark.host
def test_demo_needs_no_privilege_shows_naive_failures_and_no_idpin_wrong_pid():
    # As uid 65534 (.ci/run runs 'idpin demo' as root). Once, not per backend:
    # the demo is the slowest command.
    uid, (status, text) = idpin.testing.run_in_namespaces(
        _demo_as_this_user, uid=idpin.testing.NOBODY, userns=False)
    assert (uid, status) == (idpin.testing.NOBODY, 0), text
    exact = {line.split()[0]: line.split()[1:3] for line in text.splitlines()[4:10]}
    assert exact == {"pid": ["4242", "4242"], "tid": ["4343", "4343"], "sem": ["32776", "32776"],
                     "shm": ["98316", "98316"], "msg": ["294917", "294917"],
                     "pty": ["/dev/pts/5", "/dev/pts/5"]}, text
    rows = {line.split(":")[0] + ":" + line.split(":")[1].split()[0]: line.split()[-4:]
            for line in text.splitlines() if line.startswith(("naive:", "idpin:"))}
    assert len(rows) == 3
    for name, (attempts, exact, wrong, busy) in rows.items():
        assert int(exact) + int(wrong) + int(busy) == int(attempts) == 300
        if name.startswith("idpin"):
            assert wrong == "0"
    assert "/dev/pts/5  /dev/pts/5" in text


@pytest.mark.host
def test_the_installed_package_is_tested_with_its_cython_backend():
    # The suite must run against the built package: a source tree on
    # sys.path would silently fall back to the ctypes twin.
    import importlib

    if _sys.load_error is not None or _sys.BACKEND != "cython":
        assert os.environ.get("IDPIN_BACKEND") == "ctypes", (
            "the Cython backend did not load (%s): install with 'pip install .' and run "
            "pytest from the repository root, not 'python -m pytest'" % _sys.load_error
        )
    module = importlib.import_module("idpin._sys._cython")
    assert module.BACKEND == "cython"
    assert all(hasattr(module, name) for name in _sys.INTERFACE)


@pytest.mark.host
def test_both_backends_expose_the_same_interface():
    import importlib

    for name in _sys.BACKENDS:
        module = importlib.import_module("idpin._sys._" + name)
        missing = [attr for attr in _sys.INTERFACE if not hasattr(module, attr)]
        assert missing == [], (name, missing)
