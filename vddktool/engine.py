"""The one interface between the NBD server and what it serves.

Two levels, after nbdkit's plugin API:

* A ``Backend`` lives for the whole process.  The CLI builds it from the
  parsed KEY=VALUE parameters, calls ``config_complete`` (validate),
  ``get_ready`` (before daemonizing: may re-exec), ``after_fork`` (after
  daemonizing: start threads, load libraries), then for each client
  connection ``preconnect`` (which may refuse it) and ``open``, and
  ``cleanup`` at exit.  Filters (filters/base.py) are Backends that wrap
  the next one.
* An ``Engine`` is one open disk, owned by one connection.  The server
  and filters open it with ``Backend.open_engine``, which puts an
  ``EngineAdapter`` (layers.py) under it: the one place where what NBD
  asks and the engine cannot do natively (FUA, fast zero) is emulated or
  refused.
  Filters wrap an engine and override what they change
  (``layers.FilterEngine``).

All offsets and counts are in bytes.  The server has already checked that
requests lie inside the disk and respect ``block_size()``.  Engines report
failure by raising ``EngineError`` (or ``OSError``): its errno is what the
client sees.
"""

import errno
import os
import queue
import threading

# Largest request the server accepts: nbdkit's limit.  The NBD reference
# tester sends 48 MiB, libnbd and qemu at most 32 MiB.
MAX_REQUEST_SIZE = 64 * 1024 * 1024

# Values of can_fua() and can_cache(), as in nbdkit.
FUA_NONE, FUA_EMULATE, FUA_NATIVE = 0, 1, 2
CACHE_NONE, CACHE_EMULATE, CACHE_NATIVE = 0, 1, 2

# Extent flags, the same bits as NBD's base:allocation context.
EXTENT_HOLE = 1
EXTENT_ZERO = 2

# Flags on data calls, one word as in nbdkit (the server maps NBD's
# command flags onto these; filters pass them down or change them).
FLAG_MAY_TRIM = 1 << 0    # zero: punching a hole is allowed
FLAG_FUA = 1 << 1         # pwrite, zero, trim: durable before returning
FLAG_REQ_ONE = 1 << 2     # extents: one extent is enough
FLAG_FAST_ZERO = 1 << 3   # zero: fail with ENOTSUP unless it is fast

# Thread models, strictest first: may the server call one engine from
# several threads at once?  A stack takes the strictest of its layers.
SERIALIZE_REQUESTS = "serialize_requests"
PARALLEL = "parallel"
THREAD_MODELS = (SERIALIZE_REQUESTS, PARALLEL)


# Set once the server begins to shut down: a filter that waits between
# attempts (retry) stops waiting and gives up.
SHUTTING_DOWN = threading.Event()


def stricter(model, other):
    """The stricter of two thread models."""
    return min(model, other, key=THREAD_MODELS.index)


class EngineError(Exception):
    """A request failed; ``errno`` is what the NBD client is told.
    ``expected`` marks an answer the protocol foresees (a fast zero that
    cannot be fast), which the server does not log as a failure."""

    def __init__(self, err, message, expected=False):
        super().__init__(message)
        self.errno = err
        self.message = message
        self.expected = expected

    def __str__(self):
        return self.message


class UsageError(Exception):
    """A user mistake found before serving: one line, exit status 1."""


class Extent(object):
    __slots__ = ("offset", "length", "flags")

    def __init__(self, offset, length, flags):
        self.offset = offset
        self.length = length
        self.flags = flags

    def __eq__(self, other):
        return (self.offset, self.length, self.flags) == (
            other.offset, other.length, other.flags)

    def __repr__(self):
        return "Extent(%d, %d, %d)" % (self.offset, self.length, self.flags)


class FileRange(object):
    """A piece of ``pread_sparse`` still in a file: ``length`` bytes at
    ``offset`` of the open descriptor ``fd``.

    The server sends it to a socket with sendfile(2), so the data never
    passes through Python; a piece of a reply cannot be taken back, so the
    engine checks the range lies inside the file before returning it, and
    keeps ``fd`` open while the connection lasts.  ``read()`` gives the
    bytes to whoever needs them (pipes, filters, tests).
    """

    __slots__ = ("fd", "offset", "length")

    def __init__(self, fd, offset, length):
        self.fd = fd
        self.offset = offset
        self.length = length

    def __len__(self):
        return self.length

    def __repr__(self):
        return "FileRange(%d, %d, %d)" % (self.fd, self.offset, self.length)

    def read(self):
        data = os.pread(self.fd, self.length, self.offset)
        if len(data) == self.length:
            return data
        parts = [data]
        got = len(data)
        while got < self.length:
            more = os.pread(self.fd, self.length - got, self.offset + got)
            if not more:
                raise EngineError(errno.EIO, "the file ends %d bytes short "
                                  "of a read" % (self.length - got))
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    __bytes__ = read


def in_memory(data):
    """A piece's data as a bytes-like object, reading a FileRange."""
    return data.read() if type(data) is FileRange else data


def errno_of(exc):
    """The errno to send for an exception raised by an engine."""
    err = getattr(exc, "errno", None)
    return err if isinstance(err, int) and err > 0 else errno.EIO


class Engine(object):
    """One open disk.  Subclasses override what they can do.

    The defaults describe a read-only disk with no extents; ``zero`` and
    ``cache`` have generic fallbacks so an engine need only implement
    ``pread`` and ``get_size`` to be served.  ``flags`` is a word of the
    FLAG_* bits above; an engine never sees FLAG_FUA unless ``can_fua``
    says FUA_NATIVE, nor FLAG_FAST_ZERO unless ``can_fast_zero``.
    """

    thread_model = PARALLEL

    # Whether pwrite may hold on to its buffer after returning (queued
    # asynchronous writes).  An engine that always copies or writes before
    # returning sets this False, and the server then reuses the buffer for
    # the next write instead of allocating and zeroing a new one.
    keeps_write_buffers = True

    # --- what the disk is and can do ------------------------------------
    def get_size(self):
        raise NotImplementedError

    def block_size(self):
        """(minimum, preferred, maximum) request sizes in bytes."""
        return (1, 4096, MAX_REQUEST_SIZE)

    def can_write(self):
        return False

    def can_flush(self):
        return False

    def can_fua(self):
        return FUA_EMULATE if self.can_flush() else FUA_NONE

    def can_trim(self):
        return False

    def can_zero(self):
        """True when WRITE_ZEROES may be advertised (native or emulated)."""
        return self.can_write()

    def can_fast_zero(self):
        """True only when zero() is always faster than writing zeros."""
        return False

    def can_extents(self):
        return False

    def can_cache(self):
        return CACHE_NONE

    def can_multi_conn(self):
        """True when writes on one connection are seen by all others after
        a flush (one shared image, or read-only)."""
        return False

    def is_rotational(self):
        return False

    def is_latency_bound(self):
        """True when every request waits on something far away (VDDK's
        network), so that requests on the synchronous path should run
        side by side from the first, not after some have stalled."""
        return False

    def can_submit(self):
        """True when submit_pread and submit_pwrite start a request and
        return at once (see there)."""
        return False

    # --- the data path ----------------------------------------------------
    def pread(self, count, offset, flags=0):
        """Return exactly ``count`` bytes (bytes, bytearray or memoryview)."""
        raise NotImplementedError

    def pread_sparse(self, count, offset, flags=0):
        """Like pread, but may say where holes are.

        Returns a list of ``(offset, data)`` pieces in order covering the
        request; ``data`` is None for a run that reads as zeros, bytes-like,
        or a ``FileRange`` the server may send without copying it (use
        ``in_memory(data)`` to get the bytes).  The server turns None
        pieces into OFFSET_HOLE chunks.
        """
        return [(offset, self.pread(count, offset, flags))]

    def pwrite(self, buf, offset, flags=0):
        raise EngineError(errno.EPERM, "this disk is read-only")

    def write_target(self, count, offset):
        """``(fd, file_offset)`` when a write of ``count`` bytes at
        ``offset`` would only copy them into one file there (no
        allocation, no lock, no other bookkeeping), else None.  The
        server may then move a payload from the socket into the file
        itself (splice(2)) instead of calling pwrite."""
        return None

    def flush(self, flags=0):
        pass

    def trim(self, count, offset, flags=0):
        raise EngineError(errno.EINVAL, "trim is not supported")

    def zero(self, count, offset, flags=0):
        """Make the range read as zeros.  The default writes zeros."""
        chunk = bytes(min(count, 1024 * 1024))
        view = memoryview(chunk)
        end = offset + count
        while offset < end:
            n = min(len(chunk), end - offset)
            self.pwrite(view[:n], offset)
            offset += n

    def extents(self, count, offset, flags=0):
        """Return a list of Extent starting at ``offset``, in order, covering
        at least one byte and at most ``count`` bytes (the server trims)."""
        return [Extent(offset, count, 0)]

    def cache(self, count, offset, flags=0):
        """Prefetch the range.  The default reads it and throws it away."""
        step = 4 * 1024 * 1024
        end = offset + count
        while offset < end:
            n = min(step, end - offset)
            self.pread(n, offset)
            offset += n

    # --- asynchronous requests (only where can_submit() is true) ----------
    #
    # ``done(error, data)`` is called exactly once, from any thread, maybe
    # before submit returns: error is None or an exception, data the bytes
    # read (None for writes).  It never blocks, and the engine must not
    # hold a lock the server could need while calling it.  A flush()
    # covers every write whose done() has been called.
    def submit_pread(self, count, offset, flags, done):
        raise NotImplementedError

    def submit_pwrite(self, buf, offset, flags, done):
        raise NotImplementedError

    def complete_on(self, put):
        """The server's offer, made before the first submit: ``put(item)``
        queues ``item`` for the connection's sender thread, which calls
        ``item.run()`` there (and must not be kept waiting by it).  An
        engine whose completions arrive on a library's threads may queue
        them unfinished this way, so that all the library's callback does
        is queue; ``run`` then calls ``done``.  Engines that call ``done``
        themselves ignore it."""

    def recycle(self, data):
        """The server has sent ``data``, which a submit_pread gave to
        done(), and holds it no more: an engine that allocated it may
        fill it again for a later read.  Data given to done() belongs to
        the caller, so no layer may keep it."""

    def submit_zero(self, count, offset, flags, done):
        """Emulated with submit_pwrite from a shared buffer of zeros, in
        pieces all in flight together (never from a completion: a submit
        from a library's callback thread could deadlock the library)."""
        if count <= len(_ZEROS):
            # One piece (nbdcopy's zeroes are 256 KiB): no tally.
            if count:
                self.submit_pwrite(_ZERO_VIEW[:count], offset, 0, done)
            else:
                done(None, None)
            return
        pieces = range(offset, offset + count, len(_ZEROS))
        tally = Tally(len(pieces), done)
        end = offset + count
        for start in pieces:
            self.submit_pwrite(_ZERO_VIEW[:min(len(_ZEROS), end - start)],
                               start, 0, tally.one_done)

    def close(self):
        pass


try:
    # The queue complete_on's put feeds (and engines waiting on their own
    # completions use): in C from 3.7, its put takes no Python-level lock
    # and wakes a getter only when one waits.
    CompletionQueue = queue.SimpleQueue
except AttributeError:      # Python 3.6
    CompletionQueue = queue.Queue


# What submit_zero writes.  Engines only ever read from it, and it is
# never written, so every connection shares it.
_ZEROS = bytearray(1024 * 1024)
_ZERO_VIEW = memoryview(_ZEROS)


class Tally(object):
    """Calls ``done`` once ``count`` parts are done, with the first error
    any of them had (for one request submitted in several parts)."""

    def __init__(self, count, done):
        self._left = count
        self._error = None
        self._done = done
        self._lock = threading.Lock()

    def one_done(self, error, data):
        with self._lock:
            if error is not None and self._error is None:
                self._error = error
            self._left -= 1
            last = self._left == 0
        if last:
            self._done(self._error, None)


class Backend(object):
    """What the server serves: one per process, opens one Engine per
    connection.  ``params`` is the dict of parsed KEY=VALUE parameters
    (see params.py); ``readonly`` is the -r option."""

    name = "?"

    def __init__(self, params, readonly=False):
        self.params = params
        self.readonly = readonly

    def config_complete(self):
        """Check the parameters together; raise UsageError on a mistake."""

    def get_ready(self):
        """Last step before the server daemonizes (may re-exec)."""

    def after_fork(self):
        """First step after daemonizing: start threads, initialise libraries."""

    def preconnect(self, readonly):
        """Called once per client connection, before the handshake.
        Raise EngineError to refuse the client (too many connections)."""

    def list_exports(self, is_tls=False):
        """[(name, description)] for NBD_OPT_LIST.  ``is_tls``: the client
        asked over TLS (a backend may show more to it)."""
        return [("", self.describe(""))]

    def describe(self, export_name):
        """A one-line description of an export, for NBD_INFO_DESCRIPTION."""
        return ""

    def open(self, export_name, readonly, is_tls=False):
        """Return an Engine.  Raise EngineError(ENOENT, ...) for an export
        name this backend does not serve.  ``is_tls``: the connection is
        encrypted."""
        raise NotImplementedError

    def open_engine(self, export_name, readonly, is_tls=False):
        """What the server and filters call: ``open`` with the adapter
        under it.  Engines implement ``open``, never this."""
        # Imported here: layers.py builds on this module.
        from .layers import EngineAdapter
        return EngineAdapter(self.open(export_name, readonly, is_tls))

    def cleanup(self):
        """Called once at exit, after every connection has closed."""

    @classmethod
    def dump_plugin(cls, params):
        """Lines of KEY=VALUE for --dump-plugin, backend-specific part."""
        return []
