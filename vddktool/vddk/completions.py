"""How ReadAsync and WriteAsync completions get from VDDK's threads back
to Python.

VDDK calls a completion callback on a thread of its own.  A Python
callback there costs more than the request's bookkeeping: the thread
must take the GIL, and on a thread Python has never seen (the fake
starts one per request) it also needs a new thread state, which from
3.11 maps a frame stack of its own for the Python code it runs.  So the
callback runs no Python code at all: its two arguments, ``(void *data,
VixError result)``, are declared as one structure of two 8-byte
integers, which the x86-64 and arm64 calling conventions pass in the
same two registers, and ctypes hands that structure straight to a
queue's ``put``, which is C (3.7+).  Whoever reads the queue calls the
structure's ``run``, which finishes the transfer: the connection's
sender thread for submitted requests (Engine.complete_on), the waiting
thread itself for synchronous ones (``wait_for``).

Elsewhere (another architecture, or a Python without queue.SimpleQueue)
a small Python callback builds the same structure and queues it.
"""

import ctypes
import itertools
import platform
import queue
import sys
import threading

from ..engine import CompletionQueue
from . import abi
from .stats import STATS, now


class Transfer(object):
    """One ReadAsync or WriteAsync in flight.  Holds the buffer and its
    ctypes view: VDDK writes into or reads from them until it completes."""

    __slots__ = ("lib", "function", "count", "buffer", "array", "done",
                 "started")

    def __init__(self, lib, function, count, buffer, array, done, timed):
        self.lib = lib
        self.function = function
        self.count = count
        self.buffer = buffer
        self.array = array
        self.done = done
        # Timed only for -D vddk.stats=1: completions are the hot path.
        self.started = now() if timed else None

    def finish(self, result):
        if self.started is not None:
            STATS.record(self.function, now() - self.started, self.count)
        done, buffer = self.done, self.buffer
        self.buffer = self.array = self.done = None
        if result != abi.VIX_OK:
            done(self.lib.error(self.function, result), None)
        else:
            done(None, buffer if self.function == "ReadAsync" else None)


# Transfers in flight, by the number passed to VDDK as ``data``.  Adding
# and popping a dict entry are atomic in CPython: no lock.
_in_flight = {}
_numbers = itertools.count(1)


def start(transfer):
    """The number to pass as ``data`` for ``transfer``."""
    number = next(_numbers)
    _in_flight[number] = transfer
    return number


def forget(number):
    """The transfer, no longer in flight (None if already forgotten)."""
    return _in_flight.pop(number, None)


def in_flight():
    return len(_in_flight)


class QueuedCompletion(ctypes.Structure):
    """A completion callback's arguments, queued to be finished later."""

    _fields_ = [("data", ctypes.c_uint64), ("result", ctypes.c_uint64)]

    def run(self):
        transfer = _in_flight.pop(self.data, None)
        if transfer is not None:
            transfer.finish(self.result)


# Where the structure arrives exactly as the two arguments do (on s390x
# or Windows a 16-byte structure is passed by reference instead).
_STRUCTURE_MATCHES_ARGUMENTS = (
    sys.platform.startswith("linux") and
    ctypes.sizeof(ctypes.c_void_p) == 8 and
    platform.machine() in ("x86_64", "aarch64"))

_PUT_IS_C = (_STRUCTURE_MATCHES_ARGUMENTS and
             CompletionQueue is not queue.Queue)

_QueuedCompletionFunc = ctypes.CFUNCTYPE(None, QueuedCompletion)


class QueueingCallback(object):
    """A VDDK completion callback that queues each completion with
    ``put``.  ``pointer`` is what ReadAsync and WriteAsync take; the
    object must live as long as VDDK may call it."""

    def __init__(self, put):
        if _PUT_IS_C:
            self._function = _QueuedCompletionFunc(put)
            self.pointer = ctypes.cast(self._function, abi.CompletionFunc)
        else:
            def completed(data, result):
                put(QueuedCompletion(data or 0, result))
            self._function = self.pointer = abi.CompletionFunc(completed)


def _finish_now(data, result):
    # For submits the server has offered no queue for (complete_on):
    # finished on VDDK's thread, as the Engine contract allows.
    QueuedCompletion(data or 0, result).run()


IMMEDIATE_CALLBACK = abi.CompletionFunc(_finish_now)


class _Waiter(threading.local):
    """Each thread's own queue for the requests it waits for."""

    def __init__(self):
        self.queue = CompletionQueue()
        self.callback = QueueingCallback(self.queue.put)


_waiter = _Waiter()


def wait_for(start_request, first, offset):
    """Run one request to its end on this thread:
    ``start_request(first, offset, done, callback)`` starts it.  Returns
    its data, or raises its error."""
    outcome = []

    def done(error, data):
        outcome.append((error, data))
    waiter = _waiter
    start_request(first, offset, done, waiter.callback.pointer)
    get = waiter.queue.get
    while not outcome:      # done() already ran if VDDK refused at once
        get().run()
    error, data = outcome[0]
    if error is not None:
        raise error
    return data
