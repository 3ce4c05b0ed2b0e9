"""``idpin doctor``: what this system lets idpin do, kind by kind.

The report fits an 80-column terminal (reasons are wrapped under their
column). ``--check`` makes it usable from scripts: exit status 1 when a
checked kind is not available. When this process could pin ids in the
host's own pid or IPC namespaces, it warns that doing so changes the host.
"""
import textwrap
from collections.abc import Sequence
from typing import TextIO

from . import _sys
from .probe import NAMESPACE_OF, Capability, host_namespaces, probe

WIDTH = 79  # at most, per line: an 80-column terminal never wraps it
HEADER = ("kind", "ok", "mechanism", "reason / fix")
GAP = "  "
FRESH_NAMESPACES = "'unshare --user --map-root-user --pid --ipc --mount --fork --mount-proc <command>'"


def main(out: TextIO, check: Sequence[str] | None = None) -> int:
    """Write the report; the exit status (1: a kind in ``check`` is unavailable; [] checks all)."""
    caps = probe()
    out.write(table(caps) + "\n\n")
    out.write(wrap(backend_line()) + "\n")
    warning = host_warning(caps, host_namespaces())
    if warning:
        out.write("\n" + wrap(warning, indent="  ") + "\n")
    if check is None:
        return 0
    missing = [kind for kind in (check or caps) if not caps[kind].ok]
    if missing:
        out.write("\ncheck failed: not available: %s\n" % ", ".join(missing))
        return 1
    return 0


def table(caps: dict[str, Capability]) -> str:
    rows = [(kind, "yes" if cap.ok else "NO", cap.mechanism, cap.reason or "-") for kind, cap in caps.items()]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(HEADER[:3])]
    indent = sum(widths) + len(GAP) * len(widths)
    reason_width = WIDTH - indent
    lines = [_line(widths, HEADER), _line(widths, ["-" * w for w in widths] + ["-" * reason_width])]
    for row in rows:
        reason = textwrap.wrap(row[3], reason_width, break_on_hyphens=False) or [""]
        lines.append(_line(widths, row[:3] + (reason[0],)))
        lines += [" " * indent + more for more in reason[1:]]
    return "\n".join(lines)


def _line(widths: list[int], cells: Sequence[str]) -> str:
    padded = [cell.ljust(width) for cell, width in zip(cells, widths)]
    return GAP.join(padded + list(cells[len(widths):])).rstrip()


def wrap(text: str, indent: str = "") -> str:
    return "\n".join(textwrap.wrap(text, WIDTH, subsequent_indent=indent, break_on_hyphens=False))


def backend_line() -> str:
    line = "backend: %s" % _sys.BACKEND
    if _sys.load_error is not None:
        line += " (the Cython extension did not load: %s)" % _sys.load_error
    return line


def host_warning(caps: dict[str, Capability], host: Sequence[str]) -> str | None:
    """The warning for kinds this process could pin in the host's own namespaces, if any."""
    kinds = [kind for kind, namespace in NAMESPACE_OF.items() if namespace in host and caps[kind].ok]
    if not kinds:
        return None
    namespaces = " and ".join(name for name in ("pid", "ipc") if name in host).replace("ipc", "IPC")
    return ("warning: this process can pin ids (%s) in the host's own %s namespace%s: that "
            "changes the host, whose other processes then miss those ids or find knobs armed. "
            "Prefer fresh namespaces: run inside %s, or use idpin.testing.run_in_namespaces(fn)." % (
                ", ".join(kinds), namespaces, "s" if " and " in namespaces else "", FRESH_NAMESPACES))
