"""Python thread states kept for VDDK's completion threads.

VDDK calls ReadAsync's and WriteAsync's callback from threads Python did
not start.  For each such call ctypes makes a Python thread state and
throws it away afterwards; from Python 3.11 a thread state also maps a
stack of its own, so every completion maps and unmaps memory (in a
threaded process, a TLB flush on every core): about 15 us a completion,
against 0.2 us on a thread that keeps its state.

VDDK's completion threads are its own background threads, which live as
long as the library, so a thread seen calling back a second time keeps
its thread state from then on (one PyGILState_Ensure that is never
released).  A library that made a new thread per request would never be
seen twice; should a new thread reuse a dead one's identity, the state
kept for it is a little memory, and no more than MAX_KEPT states are
ever kept.  Before 3.11 a thread state is cheap to make: nothing is kept.
"""

import ctypes
import sys
import threading

# States kept at most (VDDK runs a handful of background threads).
MAX_KEPT = 64
# Threads seen once that are remembered (a new thread per request would
# otherwise fill this without end).
MAX_SEEN = 4096

WORTH_KEEPING = sys.version_info >= (3, 11)

# pthread ids are reused as soon as a thread ends; the kernel's thread ids
# (3.8+) much later.  Only 3.11+ keeps states, so 3.6's lack of them does
# not matter there.
_native_id = getattr(threading, "get_native_id", lambda: 0)


class ThreadStates(object):
    def __init__(self):
        self._lock = threading.Lock()
        self._seen = set()
        self._kept = set()
        self._ensure = None

    def note(self):
        """Called at the start of each completion, on the library's
        thread, with the GIL held."""
        key = (threading.get_ident(), _native_id())
        if key in self._kept:
            return
        with self._lock:
            if key not in self._seen:
                if len(self._seen) >= MAX_SEEN:
                    self._seen.clear()
                self._seen.add(key)
                return
            if len(self._kept) >= MAX_KEPT:
                return
            self._seen.discard(key)
            self._kept.add(key)
            if self._ensure is None:
                ensure = ctypes.pythonapi.PyGILState_Ensure
                ensure.restype = ctypes.c_int
                self._ensure = ensure
            # Never released: the thread state now outlives the call.
            self._ensure()

    def kept(self):
        with self._lock:
            return len(self._kept)
