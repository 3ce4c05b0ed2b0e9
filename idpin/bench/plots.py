"""PNG charts of a suite's results (``--plot``; matplotlib, the ``bench`` extra).

Imported only when a chart is asked for: the suites themselves need nothing
beyond the standard library.
"""
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed, or wanted, in CI

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from . import kinds as kind_module  # noqa: E402
from .race import MIXED, strategy_label  # noqa: E402

# The failing strategies warm, idpin's cool; one shade per backend.
COLORS = {
    "naive": "tab:red", "create-then-check": "tab:orange",
    "idpin-knob/cython": "tab:blue", "idpin-knob/ctypes": "lightskyblue",
    "idpin-clone3/cython": "tab:green", "idpin-clone3/ctypes": "yellowgreen",
}
RACE_PANELS = (
    ("wrong ids handed out silently (%)", lambda c: 100.0 * c["wrong"] / c["attempts"]),
    ("refused: IdBusyError / gave up (%)", lambda c: 100.0 * c["refused"] / c["attempts"]),
    ("ids per second", lambda c: c["throughput"]),
)


def _series(cells, kind):
    """{(strategy label, noise): [(workers, cell), ...]} for one kind."""
    series = {}
    for cell in cells:
        if cell["kind"] == kind and cell["attempts"]:
            series.setdefault((strategy_label(cell), cell["noise"]), []).append((cell["workers"], cell))
    return series


def draw_race(section, out_dir):
    cells = section["cells"]
    kinds = [k for k in kind_module.KINDS + (MIXED,) if any(c["kind"] == k for c in cells)]
    fig, axes = plt.subplots(len(kinds), len(RACE_PANELS), figsize=(15, 3.1 * len(kinds)),
                             squeeze=False)
    for row, kind in enumerate(kinds):
        for col, (title, value) in enumerate(RACE_PANELS):
            ax = axes[row][col]
            for (label, noise), points in sorted(_series(cells, kind).items()):
                points.sort(key=lambda p: p[0])
                ax.plot([w for w, _ in points], [value(c) or 0 for _, c in points],
                        color=COLORS.get(label, "tab:gray"), linestyle="--" if noise else "-", marker="o",
                        markersize=3, label="%s, K=%d" % (label, noise))
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({c["workers"] for c in cells}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_title("%s: %s" % (kind, title), fontsize=9)
            ax.set_xlabel("workers (W)", fontsize=8)
            ax.tick_params(labelsize=8)
            if col == 2:
                ax.set_yscale("log")
    handles, names = axes[0][0].get_legend_handles_labels()
    inch = 1.0 / fig.get_figheight()  # the header is laid out in inches from the top
    fig.suptitle("idpin race-condition suite (%s): %s" % (section["mode"], section["machine_line"]),
                 fontsize=10, y=1 - 0.1 * inch, va="top")
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.4 * inch), ncol=4,
               fontsize=8, title="solid: no noise (K=0); dashed: K noise processes", title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 1.25 * inch))
    return _save(fig, out_dir, "race.png")


def draw_perf(section, out_dir):
    rows = [r for r in section["rows"] if r.get("ratio") is not None]
    fig, ax = plt.subplots(figsize=(11, 0.34 * len(rows) + 1.5))
    names = ["%s (%s)" % (r["benchmark"], r["backend"]) for r in rows]
    colors = [{True: "tab:green", False: "tab:red", None: "tab:gray"}[r["met"]] for r in rows]
    positions = range(len(rows))
    ax.barh(positions, [r["ratio"] for r in rows], color=colors)
    for y, r in zip(positions, rows):
        if r["target"]:
            ax.plot([r["target"][1]] * 2, [y - 0.4, y + 0.4], color="black", linewidth=2)
        ax.text(r["ratio"], y, " %.2fx" % r["ratio"], va="center", fontsize=7)
    ax.set_yticks(list(positions))
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="gray", linewidth=0.5)
    ax.set_xlabel("ratio to the floor (rates: idpin/floor, higher is better; pty times: "
                  "lower is better); black tick: target; green met, red missed, gray no target "
                  "or not measured (quick)", fontsize=8)
    ax.set_title("idpin perf (%s): %s" % (section["mode"], section["machine_line"]), fontsize=9)
    fig.tight_layout()
    return _save(fig, out_dir, "perf.png")


def _save(fig, out_dir, name):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long row labels stay inside
    plt.close(fig)
    return path


def draw_restore(section, out_dir):
    """Restore time / C floor time per shape and size, one bar per W."""
    rows = [r for r in section["rows"] if r["kind"] == "tree" and r.get("c_floor")]
    workers = sorted({int(k[len("restore_w"):]) for r in rows for k in r if k.startswith("restore_w")})
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / max(len(workers), 1)
    for i, w in enumerate(workers):
        ratios = [(r.get("restore_w%d" % w) or 0) / r["c_floor"] for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], ratios, width, label="W=%d" % w)
    ax.axhline(1.5, color="black", linewidth=1, linestyle="--", label="target (10,000 tasks, W=2)")
    ax.set_xticks([x + width * (len(workers) - 1) / 2 for x in range(len(rows))])
    ax.set_xticklabels(["%s %d" % (r["shape"], r["tasks"]) for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("restore time / C floor time (lower is better)", fontsize=8)
    ax.set_title("idpin bench restore: %s" % section["machine_line"], fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_dir, "restore.png")


DRAW = {"race": draw_race, "perf": draw_perf, "restore": draw_restore}
