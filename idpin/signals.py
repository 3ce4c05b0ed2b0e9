"""Signal handlers never run inside idpin: they run as the idpin call returns.

A Python signal handler runs between two bytecodes of whatever the main
thread executes. One that raises (Ctrl-C's KeyboardInterrupt) in the middle
of idpin's own steps could split a step from its record: a lock taken but not
yet noted, an fd opened but not yet kept, a child forked but not yet known, a
cleanup half done, and pressed again, the cleanup of that cleanup. C code
holds signals back over such steps with sigprocmask; idpin's steps are
Python, so it holds back the Python handlers instead, the way a blocked
signal stays pending:

- ``import idpin`` routes ``signal.signal`` (and ``getsignal``), so that every
  Python handler is called through a ``HeldInsideIdpin`` wrapper (handlers
  installed before the import are wrapped then). A signal that arrives while
  the main thread is inside a call through one of idpin's doors (public
  functions, the routed stdlib calls, a request block's ``__enter__`` and
  ``__exit__``), whatever code that call runs, is held: the wrapper notes it
  and returns.
- Held signals are delivered where an exception is harmless: at the door
  through which the call leaves idpin (``door``), or at a point inside where
  an exception is handled like any other (``deliver_here``: a bounded wait).
  A handler that raises at the door of a call that succeeded makes the call
  fail as though the exception had come first: what the call made is undone
  (the door's ``undo``), then the exception propagates, so the caller is
  never left holding a child, an fd or an object it was not given. A call
  whose effect cannot be undone (a thread started, os.system) delivers after
  it, as the stdlib would.
- Handlers are called with the frame the signal arrived in, so they can tell
  where it landed.

Only the main thread runs Python handlers, so only it holds and delivers.
"""
import _signal
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["door", "exit_steps", "deliver_here", "install", "uninstall"]

ORIGINAL_SIGNAL = signal.signal
ORIGINAL_GETSIGNAL = signal.getsignal
# The C function under signal.getsignal (which turns numbers into enums in
# Python): delivery must not run more Python than it needs.
_c_getsignal = _signal.getsignal

# Code inside which signals are held: the doors, the steps of the C-level
# ``__exit__`` (which has no frame of its own), and the delivery itself (a
# signal arriving while a handler runs waits for it to return, as a signal
# is blocked during its own handler).
_SHIELDED_CODES: set[Any] = set()
# signum -> the frame it arrived in, in arrival order; a signal arriving again
# while held is one pending signal, as with sigprocmask.
held: dict[int, FrameType | None] = {}
_MAIN_THREAD = threading.main_thread().ident
_wrapper_active = False
# Whether a door written in C (idpin.fork's fast path) is running: it has no
# frame to find on the stack. Set by the module that installs that door.
inside_c_door: Callable[[], bool] = bool


def inside_idpin(frame):
    """Whether ``frame`` (the main thread's, innermost first) is inside a call through a door.

    Only door calls hold signals, because only they are sure to deliver them
    on the way out; idpin's internals called another way (the restore
    engine, the supervisor, tests) run handlers at once, as Python does.
    """
    if inside_c_door():
        return True
    while frame is not None:
        if frame.f_code in _SHIELDED_CODES:
            return True
        frame = frame.f_back
    return False


def door_codes() -> frozenset[Any]:
    """The code objects of the doors and exit steps: a signal arriving inside one of their
    calls arrived inside idpin (the delivery's own code holds signals too, but it also
    runs for a signal that arrived in the caller's code)."""
    return frozenset(_SHIELDED_CODES - {_deliver.__code__, _run_handler.__code__})


def exit_steps(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator of the ``_exit`` that ``_sys.resumable_exit`` runs: signals are held inside it
    (the C-level ``__exit__`` delivers them as it returns)."""
    _SHIELDED_CODES.add(fn.__code__)
    return fn


class HeldInsideIdpin:
    """A Python signal handler, called through idpin so that it never runs inside it."""

    __slots__ = ("handler",)

    def __init__(self, handler):
        self.handler = handler

    def __call__(self, signum, frame):
        global _wrapper_active
        if signum not in held:
            held[signum] = frame
        # One wrapper at a time: a signal arriving while this one looks at
        # the stack or delivers waits for it (the loop in _deliver takes it),
        # instead of nesting another walk, which a fast interval timer could
        # repeat until the stack overflows. No call between the test and the
        # store, so no handler can run between them.
        if _wrapper_active:
            return
        _wrapper_active = True
        try:
            if not inside_idpin(frame):
                _deliver()
        finally:
            _wrapper_active = False

    def __repr__(self):
        return "<idpin: %r, held while idpin runs>" % (self.handler,)


_TAKEN = object()


def _deliver():
    """Run the held signals' handlers, in arrival order, all of them.

    A handler that raises does not keep the others held past the door (no
    later point is sure to come): they run too, and the last exception
    propagates, the earlier ones as its context.
    """
    error = None
    while held:
        signum = next(iter(held))
        frame = held.pop(signum, _TAKEN)
        if frame is _TAKEN:
            continue  # a nested delivery (a signal during a handler) took it
        try:
            _run_handler(signum, frame)
        except BaseException as err:  # noqa: B902 - raised once the others have run
            if error is not None and err is not error and err.__context__ is None:
                err.__context__ = error
            error = err
    if error is not None:
        raise error


def _run_handler(signum, frame):
    handler = _c_getsignal(signum)
    if isinstance(handler, HeldInsideIdpin):
        handler.handler(signum, frame)
    elif callable(handler):
        handler(signum, frame)  # installed around idpin's routing
    elif handler == signal.SIG_DFL:
        # Its handler was removed while it was held: what the signal would
        # do now (terminate, for most).
        signal.raise_signal(signum)


def deliver_here():
    """At a point inside idpin where an exception is handled like any other
    (a bounded wait): run held handlers now rather than at the door."""
    if held and threading.get_ident() == _MAIN_THREAD:
        _deliver()


def _deliver_at_door(caller, result, undo):
    if threading.get_ident() != _MAIN_THREAD or inside_idpin(caller):
        return  # not the main thread, or a door nested in an idpin call: its door delivers
    try:
        _deliver()
    except BaseException:
        if undo is not None:
            from . import _sys

            # Made with its signals held; undone with them held, and finished
            # even if something raises in between.
            _sys.finish(undo, result)
        if held:
            _deliver()  # arrived during the undo: raises with the first as context
        raise


def door(undo: Callable[[Any], object] | None = None) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator of a function through which callers enter idpin.

    Held signals are delivered as it returns or raises. ``undo(result)``
    takes back what a successful call made, when a delivered handler raises.
    """

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def enter_idpin(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                if held:
                    _deliver_at_door(sys._getframe(1), None, None)
                raise
            # No handler can run between the call's return and this test: the
            # interpreter checks for signals at calls and backward jumps only,
            # and this frame holds them back anyway.
            if held:
                _deliver_at_door(sys._getframe(1), result, undo)
            return result

        return enter_idpin

    return decorate


def exit_door(depth=1):
    """The door of ``__exit__`` (_sys.resumable_exit): deliver to the frame ``depth``
    levels up (1 for the C-level one, which has no frame of its own)."""
    if held:
        _deliver_at_door(sys._getframe(depth), None, None)


def c_door_exit(result, undo):
    """The door of a call written in C, which has no frame: deliver held signals to
    its caller's frame, undoing ``result`` if a handler raises."""
    if held:
        _deliver_at_door(sys._getframe(1), result, undo)
    return result


def _door_codes():
    probe = door()(lambda: None)
    return {probe.__code__}


# Delivery holds signals too: one arriving while a handler runs waits for it
# (the loop in _deliver takes it next), and the door's undo cannot be skipped.
_SHIELDED_CODES |= _door_codes() | {_deliver.__code__, _run_handler.__code__, _deliver_at_door.__code__,
                                    exit_door.__code__, deliver_here.__code__, c_door_exit.__code__}


# -- routing of signal.signal ---------------------------------------------------------


def unwrapped(handler):
    return handler.handler if isinstance(handler, HeldInsideIdpin) else handler


def routed_signal(signalnum, handler):
    """signal.signal, routed through idpin: the handler never runs inside idpin."""
    if callable(handler) and not isinstance(handler, HeldInsideIdpin):
        handler = HeldInsideIdpin(handler)
    return unwrapped(ORIGINAL_SIGNAL(signalnum, handler))


def routed_getsignal(signalnum):
    """signal.getsignal, routed through idpin: the handler as it was installed."""
    return unwrapped(ORIGINAL_GETSIGNAL(signalnum))


functools.update_wrapper(routed_signal, ORIGINAL_SIGNAL, assigned=("__name__", "__qualname__"))
functools.update_wrapper(routed_getsignal, ORIGINAL_GETSIGNAL, assigned=("__name__", "__qualname__"))


def _installed_python_handlers():
    for signum in signal.valid_signals():
        try:
            handler = _c_getsignal(signum)
        except (ValueError, OSError):
            continue
        if callable(handler):
            yield signum, handler


def install():
    """Wrap the Python handlers installed now (main thread only: elsewhere
    signal.signal cannot be called; later ones are wrapped as installed)."""
    if threading.get_ident() != _MAIN_THREAD:
        return
    for signum, handler in list(_installed_python_handlers()):
        if not isinstance(handler, HeldInsideIdpin):
            ORIGINAL_SIGNAL(signum, HeldInsideIdpin(handler))


def uninstall():
    """Put back the handlers as they were installed (main thread only)."""
    if threading.get_ident() != _MAIN_THREAD:
        return
    for signum, handler in list(_installed_python_handlers()):
        if isinstance(handler, HeldInsideIdpin):
            ORIGINAL_SIGNAL(signum, handler.handler)


def _forget_in_child():
    # The kernel does not pass pending signals on to a child, nor does Python.
    # The forking thread is the child's main thread (threading says so too).
    global _wrapper_active, _MAIN_THREAD
    held.clear()
    _wrapper_active = False
    _MAIN_THREAD = threading.get_ident()


os.register_at_fork(after_in_child=_forget_in_child)
