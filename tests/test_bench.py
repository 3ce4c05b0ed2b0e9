"""``idpin bench``: the smoke modes of both suites, and their invariant checks.

These tests run in the pytest process (``host``): the suites create their
own fresh namespaces for every cell. They check correctness only — no
wrong id from idpin, nothing left behind — never speed.
"""
import io
import json

import pytest

from idpin import cli
from idpin.bench import measure, perf, race

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
        assert row["ratio"] > 0 and row["met"] is None  # quick: no target is judged
    assert "quick: ratios not measured" in text
    table = text.split("\n\n")[1].splitlines()
    assert table[0].split()[-1] == "met"
    targeted = [line for line in table[2:] if ">=" in line or "<=" in line]
    assert targeted and all(line.endswith("not measured") for line in targeted), targeted
    assert not [line for line in table[2:] if line.endswith(" NO")]


@pytest.mark.host
def test_perf_quick_draws_its_chart(tmp_path):
    # matplotlib comes with the test extra (which pulls the bench extra).
    status, text, _ = run_quick("perf", tmp_path, "--plot")
    assert status == 0, text
    assert (tmp_path / "perf.png").stat().st_size > 0


@pytest.mark.host
@pytest.mark.parametrize("suite", ["race", "perf"])
def test_plot_without_matplotlib_fails_before_the_run(tmp_path, monkeypatch, suite):
    import idpin.bench

    monkeypatch.setattr(idpin.bench, "plotting_missing", lambda: "matplotlib, which is not installed")
    out = io.StringIO()
    status = cli.main(["bench", suite, "--quick", "--plot", "--out", str(tmp_path)], out=out)
    assert status == 2
    assert out.getvalue() == ("--plot needs matplotlib, which is not installed: install it with: "
                              "pip install 'idpin[bench]'\n")
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing was written


@pytest.mark.host
def test_plotting_is_available_with_the_test_extra():
    import idpin.bench

    assert idpin.bench.plotting_missing() is None


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


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.host
def test_progress_lines_in_a_log_say_how_much_time_is_left():
    clock, log = Clock(), io.StringIO()
    progress = measure.Progress("perf", 4, stream=log, clock=clock)
    progress.step("fork, cython")
    clock.now = 2.0
    progress.step("sysv, cython")  # still quiet: a short run says nothing
    clock.now = 20.0
    progress.step("batch, cython")
    clock.now = 30.0
    progress.step("pty, cython")  # within LOG_EVERY of the last line: not logged
    clock.now = 41.0
    assert progress.finish() == 41.0 and progress.done == 4
    assert log.getvalue() == (
        "[idpin bench perf] 2/4 done, 20 s elapsed, about 20 s left  batch, cython\n")
    assert progress.line("x", 150.0) == "[idpin bench perf] 4/4 done, 2 min 30 s elapsed, about 0 s left  x"


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.host
def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch):
    monkeypatch.setattr(measure.Progress, "QUIET_SECONDS", 0)
    terminal = Terminal()
    progress = measure.Progress("race", 3, stream=terminal)
    for what in ("a", "b", "c"):
        progress.step(what)
    progress.finish()
    text = terminal.getvalue()
    assert "idpin bench race:" in text and "/3" in text and "[idpin bench" not in text
