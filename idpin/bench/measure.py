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
    """How far a long run is, and an estimate of the time left, on stderr.

    Silent for runs shorter than ``QUIET_SECONDS`` (a --quick run says
    nothing). On a terminal it is a tqdm bar (the ``bench`` extra); in a log,
    or without tqdm, a line every ``LOG_EVERY`` seconds. The estimate assumes
    the units left take as long, on average, as the ones done.
    """

    QUIET_SECONDS = 3.0
    LOG_EVERY = 15.0

    def __init__(self, label, total, stream=None, clock=time.monotonic):
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.clock = clock
        self.done = 0  # units finished
        self._started_one = False
        self.started = clock()
        self._last_log = self.started
        self._bar = self._terminal_bar()

    def _terminal_bar(self):
        if not (hasattr(self.stream, "isatty") and self.stream.isatty()):
            return None
        try:
            import tqdm
        except ImportError:
            return None
        # No monitor thread: the suites fork, and a forking process had better
        # have one thread (the namespace children must be single-threaded anyway).
        tqdm.tqdm.monitor_interval = 0
        return tqdm.tqdm(total=self.total, desc="idpin bench " + self.label, file=self.stream,
                         delay=self.QUIET_SECONDS, leave=False, unit=" runs", dynamic_ncols=True)

    def step(self, what):
        """Say that unit number ``done + 1`` (``what``) is starting: the one before it is done."""
        if self._started_one:
            self._advance()
        self._started_one = True
        if self._bar is not None:
            self._bar.set_postfix_str(what)
            return
        now = self.clock()
        if now - self.started >= self.QUIET_SECONDS and now - self._last_log >= self.LOG_EVERY:
            self.stream.write(self.line(what, now) + "\n")
            self.stream.flush()
            self._last_log = now

    def _advance(self):
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)

    def line(self, what, now):
        elapsed = now - self.started
        left = "?" if not self.done else _minutes(elapsed / self.done * (self.total - self.done))
        return "[idpin bench %s] %d/%d done, %s elapsed, about %s left  %s" % (
            self.label, self.done, self.total, _minutes(elapsed), left, what)

    def finish(self):
        """The run is over; its duration in seconds."""
        if self._started_one:
            self._advance()
        if self._bar is not None:
            self._bar.close()
        return self.clock() - self.started


def _minutes(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return "%d s" % seconds
    return "%d min %02d s" % divmod(seconds, 60)
