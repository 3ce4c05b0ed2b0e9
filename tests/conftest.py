"""Every test runs in fresh user+pid+ipc+mount namespaces, once per backend.

The test body is run by idpin.testing.run_in_namespaces as pid 1 of its own
namespaces, so it can assert exact ids and cannot touch the host; afterwards
the runner checks nothing was left behind (processes, IPC objects, armed
knobs, ptys, fds, locks). Options come from the ``namespaces`` marker
(``uid=NOBODY`` for the unprivileged path). Tests marked ``host`` run in the
pytest process itself and are not parametrized by backend.
"""
import importlib.util
import pathlib

import hypothesis
import pytest

import idpin
from idpin import _sys, testing

SOURCE_PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "idpin"

hypothesis.settings.register_profile("idpin", deadline=None, database=None, max_examples=60)
hypothesis.settings.load_profile("idpin")


def pytest_configure(config):
    # One clear error instead of a failure in every test.
    if shadowed_by_the_source_tree():
        raise pytest.UsageError(
            "idpin was imported from the source tree (%s), which has no compiled extension, "
            "instead of the installed package: 'python -m pytest' puts the current directory "
            "first on sys.path. Install with \"pip install '.[test]'\" and run the 'pytest' "
            "command from the repository root." % SOURCE_PACKAGE)


def shadowed_by_the_source_tree():
    """Whether ``import idpin`` found this checkout's sources rather than a built package."""
    loaded = pathlib.Path(idpin.__file__).resolve().parent
    return loaded == SOURCE_PACKAGE and importlib.util.find_spec("idpin._sys._cython") is None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # CI skips nothing: a skip would hide a missing feature or dependency.
    report = (yield).get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = ("%s; but the suite skips nothing: install what the test needs "
                           "(pip install '.[test]') or make it run" % reason)


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("host"):
        return
    if "backend" not in metafunc.fixturenames:
        metafunc.fixturenames.append("backend")
    metafunc.parametrize("backend", _sys.BACKENDS)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if pyfuncitem.get_closest_marker("host"):
        return None
    marker = pyfuncitem.get_closest_marker("namespaces")
    options = dict(marker.kwargs) if marker else {}
    backend = pyfuncitem.callspec.params["backend"]
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    body = pyfuncitem.obj
    testing.run_in_namespaces(lambda: body(**kwargs), backend=backend, **options)
    return True


@pytest.fixture
def backend():
    """The _sys backend this test runs against (parametrized)."""
