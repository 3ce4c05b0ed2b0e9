"""``idpin bench``: the smoke modes of both suites, and their invariant checks.

These tests run in the pytest process (``host``): the suites create their
own fresh namespaces for every cell. They check correctness only — no
wrong id from idpin, nothing left behind — never speed.
"""
import io
import json

import pytest

from idpin import cli
from idpin.bench import perf, race

KINDS = {"pid", "tid", "sem", "shm", "msg", "pty", "mixed"}
IDPIN_STRATEGIES = {"idpin-knob", "idpin-clone3"}


def run_quick(suite, out_dir, *extra):
    out = io.StringIO()
    status = cli.main(["bench", suite, "--quick", "--out", str(out_dir), *extra], out=out)
    with open(out_dir / "results.json") as f:
        return status, out.getvalue(), json.load(f)


@pytest.mark.host
def test_race_quick_every_kind_and_strategy_no_wrong_id_from_idpin_nothing_left(tmp_path):
    status, text, results = run_quick("race", tmp_path)
    section = results["race"]
    assert status == 0, text
    assert section["ok"] and section["violations"] == [], section["violations"]
    cells = section["cells"]
    assert {cell["kind"] for cell in cells} == KINDS
    assert {(cell["strategy"], cell["backend"]) for cell in cells} == {
        ("naive", None), ("create-then-check", None),
        ("idpin-knob", "cython"), ("idpin-knob", "ctypes"),
        ("idpin-clone3", "cython"), ("idpin-clone3", "ctypes"),
    }
    for cell in cells:
        assert cell["noise"] >= 1 and cell["noise_ops"] > 0, cell
        assert cell["exact"] + cell["wrong"] + cell["refused"] == cell["attempts"] > 0, cell
        assert cell["leaks"] == [] and cell["errors"] == 0, cell
        if cell["strategy"] in IDPIN_STRATEGIES:
            assert cell["wrong"] == 0, cell
        else:
            assert cell["backend"] is None
    # The naive strategy's failure rate is reported beside idpin's.
    assert "naive" in text and "WRONG" in text and "Invariants held" in text


@pytest.mark.host
def test_perf_quick_every_pinned_id_right_nothing_left_and_both_sections_kept(tmp_path):
    run_quick("race", tmp_path)
    status, text, results = run_quick("perf", tmp_path)
    section = results["perf"]
    assert status == 0, text
    assert section["ok"] and section["violations"] == [], section["violations"]
    assert "race" in results  # one results.json holds both suites
    rows = section["rows"]
    assert {row["backend"] for row in rows} == {"cython", "ctypes"}
    measured = {row["benchmark"].split(":")[0].split(",")[0] for row in rows}
    assert {"fork clone3", "fork knob", "sysv sem", "sysv shm", "sysv msg"} <= measured
    assert any(b.startswith("batch") for b in measured) and any(b.startswith("pty") for b in measured)
    assert sum(row["checked"] for row in rows) > 0
    for row in rows:
        assert row["error"] is None and row["wrong"] == 0 and row["leaks"] == [], row
        assert not row.get("skipped"), row  # the C floor compiled
        assert row["ratio"] > 0 and row["met"] in (True, False, None)


@pytest.mark.host
def test_perf_quick_draws_its_chart(tmp_path):
    pytest.importorskip("matplotlib")
    status, text, _ = run_quick("perf", tmp_path, "--plot")
    assert status == 0, text
    assert (tmp_path / "perf.png").stat().st_size > 0


def _cell(**fields):
    cell = race.new_cell(race.Scenario("sem", 2, 1, 10), race.strategies_for(("sem",), ["cython"])[2])
    cell.update(dict({"exact": 10}, **fields))
    return cell


@pytest.mark.host
def test_race_invariants_catch_a_wrong_idpin_id_a_leak_and_an_error():
    assert race.violations([_cell()]) == []
    assert "wrong ids" in race.violations([_cell(exact=9, wrong=1)])[0]
    assert "left behind" in race.violations([_cell(leaks=["sem objects with ids 5"])])[0]
    assert "unexpected errors" in race.violations([_cell(exact=9, errors=1)])[0]
    naive = _cell(exact=9, wrong=1, strategy="naive", backend=None)
    assert race.violations([naive]) == []  # reported, not a failure: that is the point


@pytest.mark.host
def test_perf_invariants_catch_a_wrong_id_and_a_failed_benchmark_but_not_a_missed_target():
    slow = perf.rate_row("fork clone3, 1 worker", "cython", "forks/s", [50.0], [100.0],
                         (">=", 0.98), wrong=0, checked=5, leaks=[])
    assert slow["met"] is False and perf.violations([slow]) == []
    wrong = dict(slow, wrong=1)
    assert "came out wrong" in perf.violations([wrong])[0]
    failed = dict(slow, error="boom")
    assert "failed: boom" in perf.violations([failed])[0]


@pytest.mark.host
def test_supervisor_quick_every_planned_id_right_nothing_left(tmp_path):
    status, text, results = run_quick("supervisor", tmp_path)
    section = results["supervisor"]
    assert status == 0, text
    assert section["ok"] and section["violations"] == [], section["violations"]
    rows = section["rows"]
    assert {row["backend"] for row in rows} == {"cython", "ctypes"}
    names = {row["benchmark"] for row in rows}
    assert {"pinned fork via supervisor vs unsupervised", "pinned pty via supervisor vs unsupervised",
            "trapped call, nothing pending (SYNC_WAKE_UP=1)"} <= names
    for row in rows:
        assert row["subject"] > 0 and row["floor"] > 0, row
