"""--filter=limit: serve at most limit=N clients at once (default 1).

A client beyond the limit is turned away before the handshake
(preconnect); the count is of open engines, checked again when one
opens, since a client may dawdle between connecting and choosing its
export.
"""

import errno
import threading

from ..engine import EngineError
from ..layers import FilterEngine
from .base import FilterBackend


class LimitEngine(FilterEngine):
    def __init__(self, backend, below, request):
        super().__init__(below)
        self._backend = backend
        self._counted = True

    def close(self):
        try:
            self.next.close()
        finally:
            if self._counted:
                self._counted = False
                self._backend.closed_one()


class LimitFilter(FilterBackend):
    name = "limit"
    summary = "limit how many clients are served at once"
    engine_class = LimitEngine

    def configure(self, params):
        self.limit = params.get("limit", 1)
        self._open = 0
        self._lock = threading.Lock()

    def _refuse_if_full(self):
        if self.limit and self._open >= self.limit:
            raise EngineError(errno.EBUSY, "limit: too many clients "
                              "connected (limit=%d), connection refused"
                              % self.limit)

    def preconnect(self, readonly):
        super().preconnect(readonly)
        with self._lock:
            self._refuse_if_full()

    def open(self, export_name, readonly, is_tls=False):
        with self._lock:
            self._refuse_if_full()
            self._open += 1
        try:
            return super().open(export_name, readonly, is_tls)
        except BaseException:
            self.closed_one()
            raise

    def closed_one(self):
        with self._lock:
            self._open -= 1


FILTER = LimitFilter
