"""--filter=noextents: the whole disk reads as allocated data.

For engines whose extents are wrong or slow (VDDK on local files): the
client is told there are no extents, and the server then answers every
block-status query with one data extent, as nbdkit does.  Reads and
writes are untouched, so the asynchronous path stays open.
"""

from ..layers import FilterEngine
from .base import FilterBackend


class NoExtentsEngine(FilterEngine):
    def __init__(self, backend, below, request):
        super().__init__(below)

    def can_extents(self):
        return False


class NoExtentsFilter(FilterBackend):
    name = "noextents"
    summary = "report the whole disk as allocated data"
    engine_class = NoExtentsEngine


FILTER = NoExtentsFilter
