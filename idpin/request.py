"""Per-thread request state and the ``idpin.request`` context manager.

A request belongs to the thread that entered it and is one-shot per kind: the
first allocation of that kind in the block consumes it; later ones are
ordinary. Blocks nest: for a kind, the innermost block that names it decides,
so a consumed inner request hides the outer one until the inner block ends.

Each resource module registers its kind here with a validator, and, if the
kind must also be honoured by creators idpin does not see (C code,
third-party libraries), an ``arm``/``disarm`` pair run at block entry and exit.
"""
import os
import threading

from . import _sys, signals
from .errors import Id, RequestError

_local = threading.local()


class Kind:
    __slots__ = ("name", "validate", "arm", "disarm")

    def __init__(self, name, validate, arm=None, disarm=None):
        self.name = name
        self.validate = validate
        self.arm = arm
        self.disarm = disarm


KINDS = {}
# Arming order is fixed so that locks are always taken in the same order.
ORDER = ("pid", "tid", "sem", "shm", "msg", "pty")
_UNWIND_ORDER = tuple(reversed(ORDER))


def register_kind(kind):
    KINDS[kind.name] = kind


class Request:
    """What ``idpin.request(...)`` returns; ``consumed`` maps kind -> id obtained."""

    ids: dict[str, Id]
    consumed: dict[str, Id]

    def __init__(self, ids: dict[str, Id]) -> None:
        self.ids = ids
        self.consumed = {}
        self.armed = {}
        self._state = "new"

    def __repr__(self) -> str:
        return "idpin.request(%s)" % ", ".join("%s=%r" % kv for kv in self.ids.items())

    @signals.door(undo=lambda self: self._unwind())
    def __enter__(self) -> "Request":
        if self._state != "new":
            raise RuntimeError(
                "%r was already entered; a request is one-shot: create a new one per block" % self
            )
        self._state = "active"
        # Each kind's arm records what it holds in self.armed before taking
        # it, so _unwind undoes exactly that, whatever point an exception
        # (a signal handler's included) interrupted.
        try:
            _stack().append(self)
            for name in self._kinds_in_order():
                kind = KINDS[name]
                if kind.arm is not None:
                    kind.arm(self, name)
        except BaseException:
            _sys.finish(self._unwind)  # completes even if handlers keep raising
            raise
        return self

    # C-level when the extension is built, so that a signal handler cannot
    # raise between the with statement and the unwinding: _sys.resumable_exit.
    __exit__ = _sys.resumable_exit

    @signals.exit_steps
    def _exit(self, exc_type, exc, tb):
        if self._state == "forked":
            # This is a forked child's copy of the block: the knobs and locks
            # belong to the parent, which leaves its own copy of the block.
            return False
        error = self._unwind()
        if error is not None:
            if exc is None:
                raise error
            _note(exc, "idpin: also, on leaving the block: %s" % error)
        return False

    def _kinds_in_order(self):
        return [name for name in ORDER if name in self.ids]

    def _unwind(self):
        """Disarm every armed kind, in reverse order, even if one fails; the first error.

        An exception (a signal handler's) that interrupts the walk between
        two kinds, or a kind's disarm half-way, is followed by a second walk:
        each disarm is resumable, and leaves ``armed`` only once done.
        """
        errors = []
        try:
            try:
                self._disarm_all(errors)
            except BaseException as err:  # noqa: B902 - between two kinds
                errors.append(err)
                self._disarm_all(errors)
        finally:
            self._state = "done"
            # No call before the removal: a signal handler could raise at a
            # function's entry and leave this request on the stack.
            try:
                stack = _local.stack
            except AttributeError:
                stack = ()
            if self in stack:
                stack.remove(self)
        return errors[0] if errors else None

    def _disarm_all(self, errors):
        for name in _UNWIND_ORDER:
            if name not in self.armed:
                continue
            try:
                KINDS[name].disarm(self, name)
            except BaseException as err:  # noqa: B902 - keep disarming the rest
                errors.append(err)
                if name in self.armed:
                    try:
                        KINDS[name].disarm(self, name)  # finish what was interrupted
                    except BaseException as again:  # noqa: B902
                        errors.append(again)


def _note(exc, text):
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(text)


def _stack():
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def request(**ids: Id | None) -> Request:
    """Ask that this thread's next allocation of each kind get the given id.

    Kinds: pid (int, or a tuple innermost first for nested pid namespaces),
    tid, sem, shm, msg, pty. ``None`` means no request for that kind. Invalid
    ids raise RequestError here, before any side effect.
    """
    wanted = {}
    for name, value in ids.items():
        if name not in KINDS:
            raise RequestError(
                "unknown kind %r: idpin.request takes %s" % (name, ", ".join(ORDER)), kind=name
            )
        if value is None:
            continue
        wanted[name] = KINDS[name].validate(value)
    return Request(wanted)


def pending(kind: str) -> "tuple[Request, Id] | None":
    """(request, id) that this thread's next ``kind`` allocation must honour, or None."""
    stack = getattr(_local, "stack", None)
    if not stack:
        return None
    for req in reversed(stack):
        if kind in req.ids and req._state == "active":
            if kind in req.consumed:
                return None
            return req, req.ids[kind]
    return None


def enclosing_pending_request(req, kind):
    """The outer request of this thread that still wants ``kind``, or None."""
    stack = getattr(_local, "stack", None) or []
    if req not in stack:
        return None
    for outer in reversed(stack[: stack.index(req)]):
        if kind in outer.ids:
            return None if kind in outer.consumed else outer
    return None


def consume(req, kind, value):
    req.consumed[kind] = value


def uncredit(kind, value):
    """An allocation credited to a request of this thread was undone: the request is
    pending again. Whether one was credited with it."""
    for req in reversed(getattr(_local, "stack", None) or ()):
        if req.consumed.get(kind) == value:
            del req.consumed[kind]
            return True
    return False


def _forget_in_child():
    # A forked child is a new process: its copy of the parent's blocks does
    # not own the parent's knobs or locks, and its own allocations ask for
    # nothing unless it opens its own block.
    stack = getattr(_local, "stack", None)
    if stack:
        for req in stack:
            req._state = "forked"
        _local.stack = []


os.register_at_fork(after_in_child=_forget_in_child)


def validate_int(kind, value, low, high, what):
    """An int in [low, high]; bool and other types are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(
            "%s must be an int in %d..%d (%s), not %r" % (kind, low, high, what, value), kind=kind
        )
    if not low <= value <= high:
        raise RequestError(
            "%s %d is out of range: valid %ss are %d..%d (%s)" % (kind, value, kind, low, high, what),
            kind=kind,
        )
    return value
