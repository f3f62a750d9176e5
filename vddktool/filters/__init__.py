"""--filter=NAME: layers between the server and the engine, as nbdkit's.

The first --filter on the command line is nearest the client, the last
nearest the engine.  Each filter is a module here whose ``FILTER`` is a
``base.FilterBackend`` subclass; its parameters are in params.py's table
under the group "filter:NAME".
"""

import importlib

from .. import params
from ..engine import PARALLEL, UsageError, stricter

# NAME -> module in this package, imported only when used.
FILTER_MODULES = {
    "blocksize": "blocksize",
    "cacheextents": "cacheextents",
    "cow": "cow",
    "limit": "limit",
    "noextents": "noextents",
    "rate": "rate",
    "readahead": "readahead",
    "retry": "retry",
    "scan": "scan",
}

NAMES = sorted(FILTER_MODULES)


def filter_class(name):
    """The FilterBackend subclass of --filter=NAME."""
    module_name = FILTER_MODULES.get(name)
    if module_name is None:
        raise UsageError("--filter=%s: no such filter (the filters are %s)"
                         % (name, ", ".join(NAMES)))
    return importlib.import_module("." + module_name, __name__).FILTER


def parameters_of(name):
    return [p for p in params.PARAMS if p.group == "filter:" + name]


def check_parameters(filter_names, given):
    """Refuse a filter's parameter when that filter is not in use: it
    would silently do nothing."""
    for key in given:
        owner = params.filter_of(key)
        if owner is not None and owner not in filter_names:
            raise UsageError("%s: a parameter of --filter=%s, which is not "
                             "on the command line (add --filter=%s, or drop "
                             "%s=)" % (key, owner, owner, key))


def thread_model(filter_names):
    """The strictest thread model the filters impose (the engine's may be
    stricter still)."""
    model = PARALLEL
    for name in filter_names:
        model = stricter(model, filter_class(name).thread_model())
    return model


def build_stack(filter_names, backend_class, values, readonly):
    """The engine's backend wrapped in the filters, the first named
    outermost.  Below a filter that never writes (cow) every layer, the
    engine too, is opened read-only."""
    classes = [filter_class(name) for name in filter_names]
    readonly_at = []
    below_readonly = readonly
    for cls in classes:
        readonly_at.append(below_readonly)
        below_readonly = below_readonly or cls.opens_below_readonly
    backend = backend_class(values, below_readonly)
    for cls, level_readonly in reversed(list(zip(classes, readonly_at))):
        backend = cls(backend, values, level_readonly)
    return backend
