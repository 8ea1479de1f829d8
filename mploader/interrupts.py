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
becomes, a composite's ``_type_spec`` under ``tf.nest``, an ``__import__``, a
``py_function``'s body) and does not always pass an exception raised there
on: pybind11 reports ``RuntimeError: ... MISMATCH ... REPLACED BY
KeyboardInterrupt``, ``tf.nest`` a ``SystemError: ... returned a result with
an exception set`` that Keras prints and goes on from, ``py_function`` an
``UnknownError``.  Python runs a SIGINT handler in whatever frame the main
thread is in, so a Ctrl-C that lands there is lost.  So, where SIGINT has
Python's default handler, ``install`` puts :func:`_keyboard_interrupt` in its
place.  It raises at once, as Python's would, unless one of TensorFlow's
frames below the one running is suspended in a call into TensorFlow's C++ (its
line calls a ``pywrap`` module: :func:`_suspended_in_tensorflow_cxx`).  Then
it waits for the outermost such call to come back into its frame and raises
there (:class:`_RaiseInFrame`, a trace function on that frame alone), in
Python that TensorFlow's C++ did not call.  The wait is as long as that C++
call, never longer; a thread wait or a Python loop inside TensorFlow's Python
raises at once.  A second Ctrl-C while the first waits raises at once, as
Python would.  A trace function that raises is taken away by CPython, so
where one is already set (a debugger's, coverage's) the handler raises at
once rather than replace it, as Python's own would.
"""
from __future__ import annotations

import linecache
import os
import signal
import sys
import threading
from types import FrameType

_read_fd: int | None = None
_tf_dir: str | None = None     # TensorFlow's package folder, with a trailing separator
_waiting: "_RaiseInFrame | None" = None   # a Ctrl-C not raised yet


def _suspended_in_tensorflow_cxx(frame: FrameType | None) -> FrameType | None:
    """The outermost frame of TensorFlow's, among ``frame``'s callers (not
    ``frame`` itself: it runs), whose line calls into TensorFlow's C++ (a
    ``pywrap`` module: ``_pywrap_utils.Flatten``, ``pywrap_tfe.TFE_Py_Execute``);
    None if there is none."""
    found = None
    frame = frame.f_back if frame is not None else None
    while frame is not None:
        name = frame.f_code.co_filename
        if _tf_dir is not None and name.startswith(_tf_dir) and \
                "pywrap" in linecache.getline(name, frame.f_lineno):
            found = frame
        frame = frame.f_back
    return found


class _RaiseInFrame:
    """A trace function that raises KeyboardInterrupt at the first event of
    ``frame`` (its call into C++ has come back) and traces nothing else."""

    def __init__(self, frame: FrameType) -> None:
        self._frame = frame
        frame.f_trace = self
        sys.settrace(self)

    def __call__(self, frame: FrameType, event: str, arg: object) -> "_RaiseInFrame | None":
        if frame is not self._frame:
            return None
        self.cancel()
        raise KeyboardInterrupt

    def cancel(self) -> None:
        global _waiting
        _waiting = None
        self._frame.f_trace = None
        sys.settrace(None)


def _keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    """Python's default SIGINT handler, raised outside TensorFlow's calls back
    into Python (see the module docstring)."""
    global _waiting
    if _waiting is not None:
        _waiting.cancel()   # pressed again: at once
        raise KeyboardInterrupt
    suspended = _suspended_in_tensorflow_cxx(frame) if sys.gettrace() is None else None
    if suspended is None:
        raise KeyboardInterrupt
    _waiting = _RaiseInFrame(suspended)


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
    global _tf_dir
    tf = sys.modules.get("tensorflow")
    if tf is not None and getattr(tf, "__file__", None):
        _tf_dir = os.path.dirname(tf.__file__) + os.sep
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
