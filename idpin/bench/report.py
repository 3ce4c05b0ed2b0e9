"""Tables a person can read, and results.json.

Both suites write into one ``results.json`` in the output directory, one
top-level section per suite ("race", "perf"), so that running one suite
keeps the other's latest numbers. Each section carries its own command,
machine and date.
"""
import json
import os


def cell_text(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 100:
            return "%.0f" % value
        if value >= 10:
            return "%.1f" % value
        return "%.2f" % value
    return str(value)


def _numeric(text):
    return text.replace(".", "", 1).replace("-", "", 1).replace("x", "").replace("%", "").isdigit()


def table(header, rows):
    """Columns padded to their widest cell; numbers right-aligned, text left."""
    cells = [[cell_text(value) for value in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(header)]
    right = [bool(cells) and all(_numeric(row[i]) or row[i] == "-" for row in cells)
             for i in range(len(header))]

    def line(values):
        return "  ".join(
            (v.rjust(w) if r else v.ljust(w)) for v, w, r in zip(values, widths, right)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in cells])


def write_results(out_dir, suite, section):
    """Put ``section`` under ``suite`` in out_dir/results.json; its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        results = {}
    results[suite] = section
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path
