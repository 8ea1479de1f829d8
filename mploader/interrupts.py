"""Ctrl-C for a consumer that runs on a TensorFlow thread.

Python runs signal handlers only in the main thread.  Under ``from_generator``
the main thread sits in TensorFlow's C++ ``GetNext`` while our generator waits
for workers on a TensorFlow thread, so a Ctrl-C would only be seen once the
next element arrives: never, if the workers are stuck.  ``signal.set_wakeup_fd``
makes the C-level handler write the signal number to a pipe that any thread can
read.  A pass that runs under ``dataset()`` (only those: a user's own thread
iterating a loader keeps Python's rules) checks that pipe after every wait
slice when it is not on the main thread; on SIGINT it raises KeyboardInterrupt there, which
ends the element with an error, so ``GetNext`` returns and the main thread
raises its own KeyboardInterrupt as usual.

Installed only from the main thread, only if no one else (asyncio, a notebook
kernel) uses the wakeup fd, and only acted on while SIGINT has Python's default
handler, so a program that handles Ctrl-C itself keeps that behaviour.
"""
from __future__ import annotations

import os
import signal
import threading

_read_fd: int | None = None


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


def _pending() -> bytes:
    try:
        return os.read(_read_fd, 512) if _read_fd is not None else b""
    except BlockingIOError:
        return b""


def forget_pending() -> None:
    """Drop signals delivered before now (at the start of a pass)."""
    while _pending():
        pass


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt on this (non-main) thread if Ctrl-C was pressed."""
    if _read_fd is None or threading.current_thread() is threading.main_thread():
        return
    if (bytes([signal.SIGINT]) in _pending()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        raise KeyboardInterrupt("Ctrl-C while waiting for mploader workers")
