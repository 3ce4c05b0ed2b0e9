"""The namespace runner itself: failures and leftovers do reach the test."""
import os

import pytest

from idpin import _sys, ipc
from idpin.testing import ChildError, run_in_namespaces

pytestmark = pytest.mark.host


def test_body_runs_as_pid_1_of_fresh_namespaces():
    def body():
        with open("/proc/sys/kernel/sem_next_id") as f:
            return os.getpid(), os.getuid(), int(f.read()), sorted(os.listdir("/dev/pts"))

    assert run_in_namespaces(body) == (1, 0, -1, ["ptmx"])


def test_a_failed_assertion_is_raised_with_the_childs_traceback():
    def body():
        assert 1 + 1 == 3, "arithmetic"

    with pytest.raises(AssertionError, match="arithmetic") as info:
        run_in_namespaces(body)
    assert any("namespace child" in note for note in info.value.__notes__)


@pytest.mark.parametrize(
    "leave, what",
    [
        (lambda: os.fork() or os.read(os.pipe()[0], 1), "processes"),
        (lambda: _sys.ipc_get(_sys.SEM, ipc.IPC_PRIVATE, 1, ipc.IPC_CREAT | 0o600), "sem objects"),
        (lambda: os.openpty(), "pty indices"),
        (lambda: os.open("/dev/null", os.O_RDONLY), "file descriptors"),
        (lambda: open("/proc/sys/kernel/msg_next_id", "w").write("77"), "msg_next_id left armed"),
    ],
    ids=["child", "ipc", "pty", "fd", "knob"],
)
def test_leftovers_fail_the_test(leave, what):
    with pytest.raises(AssertionError, match="left behind: .*" + what):
        run_in_namespaces(leave)


def test_a_body_that_hangs_is_killed_at_the_timeout():
    with pytest.raises(ChildError, match="did not finish"):
        run_in_namespaces(lambda: os.read(os.pipe()[0], 1), timeout=1)


def test_python_m_pytest_from_the_source_tree_stops_at_once_with_the_reason():
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    built_in_place = list((root / "idpin" / "_sys").glob("_cython*.so"))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_readme.py::test_the_readme_has_examples"],
        cwd=root, capture_output=True, text=True, timeout=120)
    if built_in_place:  # an in-place build ('pip install -e .'): the source tree works
        assert done.returncode == 0, done.stdout + done.stderr
        return
    assert done.returncode == 4, done.stdout + done.stderr  # pytest's usage error, no test run
    assert "idpin was imported from the source tree" in done.stderr
    assert "'python -m pytest' puts the current directory first on sys.path" in done.stderr
    assert "passed" not in done.stdout and "failed" not in done.stdout


def test_a_skipped_test_fails_the_suite(tmp_path):
    import pathlib
    import shutil
    import subprocess
    import sys

    shutil.copy(pathlib.Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\n\n"
        "@pytest.mark.host\n"
        "def test_needs_something_missing():\n"
        "    pytest.importorskip('no_such_module_anywhere')\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_skips.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]
    assert "could not import 'no_such_module_anywhere'" in done.stdout
    assert "the suite skips nothing" in done.stdout
