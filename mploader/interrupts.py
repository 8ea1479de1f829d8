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

One more step makes the KeyboardInterrupt reach the user.  TensorFlow's C++
calls back into Python (the ``__init__`` of the exception ``GetNext``'s status
becomes, a composite's ``_type_spec`` under ``tf.nest``, an ``__import__``) and
does not always pass an exception raised there on: pybind11 reports
``RuntimeError: ... MISMATCH ... REPLACED BY KeyboardInterrupt``, ``tf.nest``
a ``SystemError: ... returned a result with an exception set`` that Keras
prints and goes on from.  Python runs a SIGINT handler in whatever frame the
main thread is in, so a Ctrl-C that lands there is lost.  So, where SIGINT has
Python's default handler, ``install`` puts :func:`_keyboard_interrupt` in its
place: while TensorFlow's Python code is on top of the main thread's stack
(the standard library's frames above it count as TensorFlow's), the
KeyboardInterrupt is raised as the outermost of those TensorFlow frames
returns to the code that called it (:class:`_RaiseOnReturn`), that is from
the TensorFlow call the user or Keras made; elsewhere at once.  A second Ctrl-C
while the first waits raises at once, as Python would.
"""
from __future__ import annotations

import os
import signal
import sys
import sysconfig
import threading
from types import FrameType

_read_fd: int | None = None
_tf_dir: str | None = None     # TensorFlow's package folder, with a trailing separator
_stdlib_dirs: tuple[str, ...] = ()
_waiting: "_RaiseOnReturn | None" = None   # a KeyboardInterrupt not raised yet


def _in_tensorflow(frame: FrameType) -> bool:
    return _tf_dir is not None and frame.f_code.co_filename.startswith(_tf_dir)


def _in_stdlib(frame: FrameType) -> bool:
    name = frame.f_code.co_filename
    return name.startswith("<frozen ") or (name.startswith(_stdlib_dirs)
                                            and "-packages" not in name)


def _outermost_tensorflow_frame(frame: FrameType | None) -> FrameType | None:
    """The frame through which the stack's top TensorFlow calls were entered,
    or None where the top of the stack is not TensorFlow's code."""
    while frame is not None and _in_stdlib(frame):
        frame = frame.f_back
    if frame is None or not _in_tensorflow(frame):
        return None
    while frame.f_back is not None and (_in_tensorflow(frame.f_back)
                                        or _in_stdlib(frame.f_back)):
        frame = frame.f_back
    return frame


class _RaiseOnReturn:
    """A trace function that raises KeyboardInterrupt as ``frame`` returns (or
    unwinds), and takes itself away (putting back any trace function it
    replaced).  It traces no other frame: every frame called meanwhile runs
    above ``frame``."""

    def __init__(self, frame: FrameType) -> None:
        self._frame = frame
        self._previous = sys.gettrace()
        frame.f_trace = self
        sys.settrace(self)

    def __call__(self, frame: FrameType, event: str, arg: object) -> "_RaiseOnReturn | None":
        if event == "call":
            return None
        if frame is self._frame and event == "return":
            self.raise_now()
        return self

    def raise_now(self) -> None:
        global _waiting
        _waiting = None
        self._frame.f_trace = None
        sys.settrace(self._previous)
        raise KeyboardInterrupt


def _keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    """Python's default SIGINT handler, raised outside TensorFlow's frames
    (see the module docstring)."""
    global _waiting
    if _waiting is not None:
        _waiting.raise_now()  # pressed again: at once
    outermost = _outermost_tensorflow_frame(frame)
    if outermost is None:
        raise KeyboardInterrupt
    _waiting = _RaiseOnReturn(outermost)


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
    global _tf_dir, _stdlib_dirs
    tf = sys.modules.get("tensorflow")
    if tf is not None and getattr(tf, "__file__", None):
        _tf_dir = os.path.dirname(tf.__file__) + os.sep
    _stdlib_dirs = tuple({os.path.join(sysconfig.get_paths()[key], "")
                          for key in ("stdlib", "platstdlib")})
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
