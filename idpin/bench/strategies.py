"""The ways of asking for an id that the race suite compares.

- naive: steer the kernel without a lock and take what comes out (an
  unlocked knob write, or an unlocked ptmx walk), as ad-hoc restore scripts
  do. Wrong ids are handed out silently.
- create-then-check: the same, then check the id; keep the object if it is
  right, otherwise undo it and try again, up to CHECK_TRIES times. Never
  wrong, but every lost race costs a creation, an undo and a retry.
- idpin-knob: idpin's locked, verified path (the knob under the namespace
  lock; for ptys the walk under the devpts lock).
- idpin-clone3: idpin's lock-free clone3(set_tid) fork (pids only).

Each idpin strategy runs once per backend of idpin._sys.
"""
import collections

from ..errors import IdBusyError

NAIVE = "naive"
CREATE_THEN_CHECK = "create-then-check"
IDPIN_KNOB = "idpin-knob"
IDPIN_CLONE3 = "idpin-clone3"
IDPIN = (IDPIN_KNOB, IDPIN_CLONE3)
CHECK_TRIES = 5



class Strategy(collections.namedtuple("Strategy", "name backend")):
    """A strategy, with the _sys backend its idpin calls use (None: not idpin)."""

    __slots__ = ()

    @property
    def label(self):
        return self.name + ("/" + self.backend if self.backend else "")


class GaveUp(Exception):
    """create-then-check lost the race CHECK_TRIES times in a row."""


def naive(kind, want):
    return kind.steer(want)


def create_then_check(kind, want):
    for _ in range(CHECK_TRIES):
        held = kind.steer(want)
        if held.id == want:
            return held
        kind.release(held, want)
    raise GaveUp("%s %d: the id came out wrong %d times" % (kind.name, want, CHECK_TRIES))


def idpin_knob(kind, want):
    return kind.pin(want, "knob")


def idpin_clone3(kind, want):
    # Only pids have a clone3 path; in the mixed scenario the other kinds
    # use idpin's one mechanism for them.
    return kind.pin(want, "clone3" if kind.name == "pid" else "knob")


OBTAIN = {
    NAIVE: naive,
    CREATE_THEN_CHECK: create_then_check,
    IDPIN_KNOB: idpin_knob,
    IDPIN_CLONE3: idpin_clone3,
}
# Refusals that are the strategy's honest answer, not a failure of the bench.
REFUSED = (IdBusyError, GaveUp)


def strategies_for(kinds, backends):
    """The strategies that apply to a scenario over ``kinds``, idpin ones per backend."""
    chosen = [Strategy(NAIVE, None), Strategy(CREATE_THEN_CHECK, None)]
    chosen += [Strategy(IDPIN_KNOB, backend) for backend in backends]
    if "pid" in kinds:
        chosen += [Strategy(IDPIN_CLONE3, backend) for backend in backends]
    return chosen
