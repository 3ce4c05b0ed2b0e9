"""Typed use of idpin's public API, checked by mypy (tests/test_packaging.py), never run.

``assert_type`` fails the check when an annotation is missing (the type
would be Any) or wrong; a ``type: ignore`` that mypy finds unneeded fails it
too (warn_unused_ignores), so the wrong uses below prove the types are seen.
"""
from typing import assert_type

import idpin
import idpin.testing


def _probe_types() -> None:
    caps = idpin.probe()
    assert_type(caps, dict[str, idpin.Capability])
    assert_type(caps["pid"].ok, bool)
    assert_type(caps["pid"].reason, str)
    wrong: str = idpin.probe()  # type: ignore[assignment]


def _error_types(err: idpin.IdBusyError, timeout: idpin.LockTimeoutError) -> None:
    assert_type(err.kind, str)
    assert_type(err.id, int | tuple[int, ...])
    assert_type(timeout.holders, tuple[int, ...])
    idpin.RequestError(5)  # type: ignore[arg-type]


def _testing_types() -> None:
    assert_type(idpin.testing.run_in_namespaces(lambda: 5), int)
    assert_type(idpin.testing.leftovers(), list[str])
    idpin.testing.run_in_namespaces(lambda: 5, uid="nobody")  # type: ignore[arg-type]


def _routing_types() -> None:
    assert_type(idpin.installed(), bool)
    assert_type(idpin.uninstall(), None)


def _request_and_fork_types() -> None:
    with idpin.request(pid=5, sem=None) as req:
        assert_type(req, idpin.Request)
        assert_type(idpin.fork(), int)
    assert_type(req.consumed, dict[str, int | tuple[int, ...]])
    idpin.request(pid="5")  # type: ignore[arg-type]


def _ipc_and_pty_types() -> None:
    assert_type(idpin.ipc.semget(idpin.ipc.IPC_PRIVATE, 1, 0o600), int)
    assert_type(idpin.ipc.create_many([idpin.ipc.Spec("sem", 32769)]), list[int])
    assert_type(idpin.pty.openpty(), tuple[int, int])
    assert_type(idpin.pty.fork(), tuple[int, int])
    assert_type(idpin.pty.open_many([1, 2]), dict[int, tuple[int, int]])
    idpin.ipc.remove("sem", "5")  # type: ignore[arg-type]
