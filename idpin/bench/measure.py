"""Statistics and the progress line, shared by the race suite and the perf benchmarks."""
import math
import statistics
import sys
import time


def percentile(values, fraction):
    """Nearest-rank percentile (``fraction`` in 0..1) of ``values``; None when empty.

    Nearest rank, not interpolation: a p99 of 100 latencies is the slowest
    but one, an attempt that really happened.
    """
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def median(values):
    return statistics.median(values) if values else None


def paired_ratio(subject_rates, floor_rates):
    """Median over rounds of subject rate / floor rate measured in the same round.

    Pairing rounds cancels the slow drift of a shared machine (frequency,
    other tenants) that a ratio of two overall medians would keep.
    """
    ratios = [s / f for s, f in zip(subject_rates, floor_rates) if f]
    return median(ratios)


class Progress:
    """One line on stderr saying how far a long run is.

    Silent for runs shorter than ``QUIET_SECONDS`` (a --quick run says
    nothing). On a terminal the line is rewritten in place; in a log it is
    printed every ``LOG_EVERY`` seconds.
    """

    QUIET_SECONDS = 3.0
    LOG_EVERY = 15.0

    def __init__(self, label, total, stream=None):
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.done = 0
        self.started = time.monotonic()
        self._last_log = self.started
        self._shown = False
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, what):
        """Say that unit number ``done + 1`` (``what``) is starting."""
        self.done += 1
        now = time.monotonic()
        if now - self.started < self.QUIET_SECONDS:
            return
        line = "[idpin bench %s] %d/%d  %s  (%.0f s)" % (
            self.label, self.done, self.total, what, now - self.started)
        if self._tty:
            self.stream.write("\r\033[K" + line)
            self._shown = True
        elif now - self._last_log >= self.LOG_EVERY:
            self.stream.write(line + "\n")
            self._last_log = now
        self.stream.flush()

    def finish(self):
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
        return time.monotonic() - self.started
