"""Ctrl-C for a consumer that runs on a TensorFlow thread.

Python runs signal handlers only in the main thread.  Under ``from_generator``
the main thread sits in TensorFlow's C++ ``GetNext`` while our generator waits
for workers on a TensorFlow thread, so a Ctrl-C would only be seen once the
next element arrives: never, if the workers are stuck.  ``signal.set_wakeup_fd``
makes the C-level handler write the signal number to a pipe that any thread can
read.  A pass that runs under ``dataset()`` (only those: a user's own thread
iterating a loader keeps Python's rules) checks that pipe after every wait
slice when it is not on the main thread; on SIGINT it stops the workers and
ends the element stream normally, so ``GetNext`` returns and the main thread
runs Python's handler, which raises a KeyboardInterrupt the user can catch
(tf/adapter.py says why the stream ends rather than raises).

Installed only from the main thread, only if no one else (asyncio, a notebook
kernel) uses the wakeup fd, and only acted on while SIGINT has Python's default
handler (or ours, below), so a program that handles Ctrl-C itself keeps that
behaviour.

One more step makes the KeyboardInterrupt catchable.  When ``GetNext``
returns, TensorFlow turns its status into a Python exception inside pybind11,
which runs the exception class's ``__init__`` (Python code) while
normalizing it; the main thread's pending SIGINT handler runs right there,
and pybind11 reports ``RuntimeError: ... MISMATCH ... REPLACED BY
KeyboardInterrupt``, which ``except KeyboardInterrupt`` does not catch.  So,
where SIGINT has Python's default handler, ``install`` puts in its place
:func:`_keyboard_interrupt`: the same KeyboardInterrupt, but asked for again
while the main thread is inside the ``__init__`` of one of TensorFlow's
exception classes: a trace function raises it at the next line of plain
Python code (:class:`_RaiseSoon`), as the default handler would have.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

_read_fd: int | None = None
# The Python files whose exception classes pybind11 normalizes (see above).
_TF_EXCEPTION_FILES = (os.path.join("tensorflow", "python", "eager", "core.py"),
                       os.path.join("tensorflow", "python", "framework", "errors_impl.py"))
_FRAMES_CHECKED = 12  # an exception's __init__ and what it calls, no deeper


def _in_tf_exception_init(frame: FrameType | None) -> bool:
    for _ in range(_FRAMES_CHECKED):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "__init__" and code.co_filename.endswith(_TF_EXCEPTION_FILES):
            return True
        frame = frame.f_back
    return False


class _RaiseSoon:
    """Raise KeyboardInterrupt at the next event outside TensorFlow's exception
    constructors: a new frame, or a line or exception in a frame of the stack
    now.  A trace function, removed (and any previous one put back) as it fires."""

    def __init__(self, frame: FrameType) -> None:
        self._previous = sys.gettrace()
        self._frames = []
        while frame is not None:
            frame.f_trace = self
            self._frames.append(frame)
            frame = frame.f_back
        sys.settrace(self)

    def __call__(self, frame: FrameType, event: str, arg: object) -> "_RaiseSoon | None":
        if _in_tf_exception_init(frame):
            return self
        for traced in self._frames:
            traced.f_trace = None
        self._frames.clear()
        sys.settrace(self._previous)
        raise KeyboardInterrupt


def _keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    """Python's default SIGINT handler, deferred out of TensorFlow's exception
    constructors (see the module docstring)."""
    if frame is not None and _in_tf_exception_init(frame):
        _RaiseSoon(frame)
        return
    raise KeyboardInterrupt


def install() -> None:
    """Route signal numbers to our pipe, if we are in the main thread and it is free."""
    global _read_fd
    if _read_fd is not None or threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    if previous != -1:  # someone else relies on it: leave theirs in place
        signal.set_wakeup_fd(previous)
        os.close(read_fd)
        os.close(write_fd)
        return
    _read_fd = read_fd
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _keyboard_interrupt)


def _pending() -> bytes:
    try:
        return os.read(_read_fd, 512) if _read_fd is not None else b""
    except BlockingIOError:
        return b""


def forget_pending() -> None:
    """Drop signals delivered before now (at the start of a pass)."""
    while _pending():
        pass


def sigint_pending() -> bool:
    """True if Ctrl-C was pressed and Python's default handler will raise
    KeyboardInterrupt for it in the main thread; only for a non-main thread."""
    if _read_fd is None or threading.current_thread() is threading.main_thread():
        return False
    return (bytes([signal.SIGINT]) in _pending()
            and signal.getsignal(signal.SIGINT) in (signal.default_int_handler,
                                                    _keyboard_interrupt))
