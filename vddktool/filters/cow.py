"""--filter=cow: writes go to a private overlay; the disk stays as it was.

Every layer below is opened read-only, so not one byte of the disk can
change.  The overlay is a sparse temporary file in $TMPDIR (/var/tmp if
unset), removed from the directory as soon as it is created, so nothing
is left behind however the process ends; it is shared by every
connection (one per export), as nbdkit's is, so all clients see the same
writes.  It is kept in blocks of cow-block-size (64K); each block is not
yet copied (read from the disk), copied (read from the overlay) or
trimmed (reads as zeros).  A write of part of a block first copies the
whole block up.  cow-on-read (true, or /PATH: while PATH exists) also
copies what is read; cow-on-cache copies what a cache request names.

What the client is told follows nbdkit: writable, trim, flush and FUA
(all local, so FUA and flush cost nothing), extents, cache, multi-conn;
no write-zeroes, since the engine below, opened read-only, has none.

Over an engine that can submit (VDDK), reads of blocks not copied go
down as submitted requests, many in flight (a read none of whose blocks
is in the overlay passes straight down), and a copy-up on read is
stored when its read completes; writes, zeroes and the overlay's part
of a read are local and done at once.
"""

import errno
import os
import re
import tempfile
import threading

from ..engine import (CACHE_EMULATE, CACHE_NATIVE, EXTENT_HOLE, EXTENT_ZERO,
                      FLAG_FAST_ZERO, FLAG_REQ_ONE, FUA_NATIVE, EngineError,
                      Extent, UsageError, in_memory)
from ..layers import FilterEngine
from .base import (FilterBackend, clip_extents, finish_at_once,
                   placed_into, reassembled)

DEFAULT_TMPDIR = "/var/tmp"

# Block states, one byte per block.
NOT_COPIED, COPIED, TRIMMED = 0, 1, 3
# The first byte of another state, per state: runs are found in C.
_OTHER_STATE = dict((state, re.compile(b"[^" + re.escape(bytes([state]))
                                       + b"]"))
                    for state in (NOT_COPIED, COPIED, TRIMMED))
# Largest range asked of the layer below in one extents query.
_MAX_QUERY = 0xffffffff


def overlay_directory():
    return os.environ.get("TMPDIR") or DEFAULT_TMPDIR


class Overlay(object):
    """One export's overlay: the temporary file and the block states.

    ``lock`` covers the states and every write to the file, so that a
    block copied up on read can never overwrite a client's write."""

    def __init__(self, directory, size, block_size):
        fd, path = tempfile.mkstemp(prefix="vddktool-cow-", dir=directory)
        os.unlink(path)
        self.fd = fd
        self.size = size
        self.block_size = block_size
        blocks = -(-size // block_size)
        try:
            os.ftruncate(fd, blocks * block_size)
        except OSError:
            os.close(fd)
            raise
        self.states = bytearray(blocks)
        self.lock = threading.Lock()
        # Serializes read-modify-write of partial blocks.
        self.rmw_lock = threading.Lock()

    def close(self):
        os.close(self.fd)

    def run(self, block, limit):
        """(state, number of blocks from ``block`` in that state, at most
        ``limit``)."""
        with self.lock:
            state = self.states[block]
            other = _OTHER_STATE[state].search(self.states, block + 1,
                                               block + limit)
        return state, (other.start() if other else block + limit) - block

    def read(self, count, offset):
        parts = []
        while count:
            data = os.pread(self.fd, count, offset)
            if not data:
                raise EngineError(errno.EIO, "the cow overlay is short")
            parts.append(data)
            count -= len(data)
            offset += len(data)
        return b"".join(parts)

    def write_blocks(self, block, data, only_not_copied=False):
        """Store whole blocks from ``block`` on; with only_not_copied,
        skip blocks already copied or trimmed (a copy-up must not undo a
        write that came first)."""
        size = self.block_size
        view = memoryview(data)
        with self.lock:
            for first, count in self._spans(block, len(view) // size,
                                            only_not_copied):
                piece = view[(first - block) * size:
                             (first - block + count) * size]
                _pwrite_all(self.fd, piece, first * size)
                self.states[first:first + count] = \
                    bytes([COPIED]) * count

    def _spans(self, block, count, only_not_copied):
        if not only_not_copied:
            return [(block, count)]
        spans = []
        end = block + count
        while block < end:
            start = self.states.find(NOT_COPIED, block, end)
            if start < 0:
                break
            other = _OTHER_STATE[NOT_COPIED].search(self.states, start, end)
            stop = other.start() if other else end
            spans.append((start, stop - start))
            block = stop
        return spans

    def trim_blocks(self, block, count):
        with self.lock:
            self.states[block:block + count] = bytes([TRIMMED]) * count


def _pwrite_all(fd, data, offset):
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class CowEngine(FilterEngine):
    keeps_write_buffers = False

    def __init__(self, backend, below, request):
        super().__init__(below)
        self.backend = backend
        self.overlay = backend.overlay_for(request.export_name,
                                           below.get_size())
        self.block = self.overlay.block_size

    # --- what the client is told -----------------------------------------
    def get_size(self):
        return self.overlay.size

    def block_size(self):
        minimum, preferred, maximum = self.next.block_size()
        if maximum >= self.block:
            preferred = max(preferred, self.block)
        return (minimum, preferred, maximum)

    def can_write(self):
        return True

    def can_trim(self):
        return True

    def can_zero(self):
        return self.next.can_zero()     # none below: the disk is read-only

    def can_fast_zero(self):
        return True

    def can_flush(self):
        return True

    def can_fua(self):
        return FUA_NATIVE

    def can_extents(self):
        return True

    def can_cache(self):
        return CACHE_NATIVE

    def can_multi_conn(self):
        return True

    # --- reads ------------------------------------------------------------
    def _runs(self, offset, count):
        """(state, first block, blocks, lo, hi) for each run of blocks in
        one state that [offset, offset + count) touches; [lo, hi) is the
        part of the range the run holds."""
        size = self.block
        end = offset + count
        block = offset // size
        last = (end - 1) // size
        while block <= last:
            state, run = self.overlay.run(block, last - block + 1)
            yield (state, block, run, max(block * size, offset),
                   min((block + run) * size, end))
            block += run

    def pread(self, count, offset, flags=0):
        size = self.block
        copy_up = self.backend.copies_on_read()
        out = None
        for state, block, run, lo, hi in self._runs(offset, count):
            if state == NOT_COPIED and not copy_up and hi - lo == count:
                return self.next.pread(count, offset, flags)
            if out is None:
                out = bytearray(count)
            if state == NOT_COPIED:
                if copy_up:
                    data = self._copy_up(block, run)
                    data = memoryview(data)[lo - block * size:
                                            hi - block * size]
                else:
                    data = in_memory(self.next.pread(hi - lo, lo, flags))
                out[lo - offset:hi - offset] = data
            elif state == COPIED:
                out[lo - offset:hi - offset] = self.overlay.read(hi - lo, lo)
        return out

    def _from_disk(self, block, count):
        """Whole blocks as the disk has them (zeros past its end)."""
        size = self.block
        offset = block * size
        length = min(count * size, self.overlay.size - offset)
        data = bytearray(count * size)
        data[:length] = in_memory(self.next.pread(length, offset))
        return data

    def _copy_up(self, block, count):
        data = self._from_disk(block, count)
        self.overlay.write_blocks(block, data, only_not_copied=True)
        return data

    def _whole_block(self, block):
        """One block's current contents, whatever its state."""
        state, _ = self.overlay.run(block, 1)
        if state == COPIED:
            return bytearray(self.overlay.read(self.block, block * self.block))
        if state == TRIMMED:
            return bytearray(self.block)
        return self._from_disk(block, 1)

    # --- submitted: the server's asynchronous path ------------------------
    def submit_pread(self, count, offset, flags, done):
        size = self.block
        copy_up = self.backend.copies_on_read()
        below = []      # (lo, hi, first block, blocks) to read from the disk
        out = None
        try:
            for state, block, run, lo, hi in self._runs(offset, count):
                if state == NOT_COPIED and not copy_up and hi - lo == count:
                    # Nothing of it in the overlay: straight down.
                    self.next.submit_pread(count, offset, flags, done)
                    return
                if out is None:
                    out = bytearray(count)
                if state == NOT_COPIED:
                    below.append((lo, hi, block, run))
                elif state == COPIED:
                    out[lo - offset:hi - offset] = self.overlay.read(hi - lo,
                                                                     lo)
        except Exception as exc:
            done(exc, None)
            return
        if not below:
            done(None, out if out is not None else bytearray())
            return
        tally = reassembled(len(below), out, done)
        for lo, hi, first, blocks in below:
            if copy_up:
                start = first * size
                self.next.submit_pread(
                    min(blocks * size, self.overlay.size - start), start,
                    flags, self._copied_up(first, blocks, out, lo - offset,
                                           lo - start, hi - lo, tally))
            else:
                self.next.submit_pread(hi - lo, lo, flags, placed_into(
                    out, lo - offset, 0, hi - lo, tally))

    def _copied_up(self, first, blocks, out, at, skip, length, tally):
        """A completion for a read of whole blocks to copy up: stores them
        in the overlay (but for blocks written meanwhile: the client's
        write came first), then puts the part asked for into ``out``."""
        place = placed_into(out, at, skip, length, tally)

        def done(error, data):
            if error is None:
                try:
                    contents = bytearray(blocks * self.block)
                    data = in_memory(data)
                    contents[:len(data)] = data
                    self.overlay.write_blocks(first, contents,
                                              only_not_copied=True)
                    data = contents
                except Exception as exc:
                    error, data = exc, None
            place(error, data)
        return done

    def submit_pwrite(self, buf, offset, flags, done):
        # A write lands in the overlay at once (a partial block's copy-up
        # reads the disk first, synchronously).
        finish_at_once(done, self.pwrite, buf, offset, flags)

    def submit_zero(self, count, offset, flags, done):
        finish_at_once(done, self.zero, count, offset, flags)

    def recycle(self, data):
        # Data a read passed straight down returned, or a buffer of this
        # filter's own that nobody holds: either may go to the engine.
        self.next.recycle(data)

    # --- writes -----------------------------------------------------------
    def _patch(self, block, start, data):
        with self.overlay.rmw_lock:
            contents = self._whole_block(block)
            contents[start:start + len(data)] = data
            self.overlay.write_blocks(block, contents)

    def _each_part(self, count, offset, whole, partial):
        """Split [offset, offset + count) at block boundaries: calls
        partial(block, start in it, length, bytes before) for a partial
        block at either end, whole(first block, blocks, bytes before)
        for the blocks in between."""
        size = self.block
        done = 0
        head = offset % size
        if head:
            done = min(size - head, count)
            partial(offset // size, head, done, 0)
        blocks = (count - done) // size
        if blocks:
            whole((offset + done) // size, blocks, done)
            done += blocks * size
        if done < count:
            partial((offset + done) // size, 0, count - done, done)

    def pwrite(self, buf, offset, flags=0):
        view = memoryview(buf).cast("B")
        size = self.block
        self._each_part(
            len(view), offset,
            lambda block, blocks, done: self.overlay.write_blocks(
                block, view[done:done + blocks * size]),
            lambda block, start, length, done: self._patch(
                block, start, view[done:done + length]))

    def zero(self, count, offset, flags=0):
        if flags & FLAG_FAST_ZERO:
            raise EngineError(errno.ENOTSUP, "the cow overlay zeroes by "
                              "writing zeros, which is not fast",
                              expected=True)
        size = self.block

        def zero_blocks(block, blocks, done):
            step = max(1, (1024 * 1024) // size)
            zeros = bytes(min(step, blocks) * size)
            while blocks:
                n = min(step, blocks)
                self.overlay.write_blocks(block, memoryview(zeros)[:n * size])
                block += n
                blocks -= n
        self._each_part(count, offset, zero_blocks,
                        lambda block, start, length, done: self._patch(
                            block, start, bytes(length)))

    def trim(self, count, offset, flags=0):
        self._each_part(
            count, offset,
            lambda block, blocks, done: self.overlay.trim_blocks(block,
                                                                 blocks),
            lambda block, start, length, done: self._patch(
                block, start, bytes(length)))

    def flush(self, flags=0):
        pass    # the overlay is thrown away at exit: nothing to make durable

    # --- cache and extents ------------------------------------------------
    def cache(self, count, offset, flags=0):
        size = self.block
        mode = self.next.can_cache()
        block = offset // size
        last = (offset + count - 1) // size
        while block <= last:
            state, run = self.overlay.run(block, last - block + 1)
            if state == NOT_COPIED:
                if self.backend.cow_on_cache:
                    self._copy_up(block, run)
                elif mode == CACHE_NATIVE:
                    start = block * size
                    self.next.cache(min(run * size, self.overlay.size - start),
                                    start)
                elif mode == CACHE_EMULATE:
                    self._from_disk(block, run)
            block += run

    def extents(self, count, offset, flags=0):
        size = self.block
        end = min(offset + count, self.overlay.size)
        position = offset - offset % size
        found = []
        while position < end:
            block = position // size
            state, run = self.overlay.run(block, -(-(end - position) // size))
            run_end = min(position + run * size, end)
            if state == COPIED:
                found.append(Extent(position, run_end - position, 0))
            elif state == TRIMMED:
                found.append(Extent(position, run_end - position,
                                    EXTENT_HOLE | EXTENT_ZERO))
            else:
                found.extend(self._disk_extents(
                    position, min(run_end, position + _MAX_QUERY), flags))
                run_end = found[-1].offset + found[-1].length
            position = run_end
            if flags & FLAG_REQ_ONE and found:
                break
        return clip_extents(found, offset, offset + count)

    def _disk_extents(self, start, end, flags):
        """The disk's extents of [start, end) (its end clips it), all of
        them unless one is enough."""
        end = min(end, self.overlay.size)
        if not self.next.can_extents():
            return [Extent(start, max(end - start, 1), 0)]
        found = []
        position = start
        while position < end:
            got = clip_extents(self.next.extents(end - position, position,
                                                 flags), position, end)
            if not got or got[0].offset != position:
                raise EngineError(errno.EIO, "the disk returned no extents "
                                  "at offset %d" % position)
            found.extend(got)
            position = got[-1].offset + got[-1].length
            if flags & FLAG_REQ_ONE:
                break
        return found


class CowFilter(FilterBackend):
    name = "cow"
    summary = "keep writes in a temporary overlay; the disk never changes"
    engine_class = CowEngine
    opens_below_readonly = True

    def configure(self, params):
        self.block_size = params.get("cow-block-size") or 64 * 1024
        self.cow_on_read = params.get("cow-on-read") or False
        self.cow_on_cache = bool(params.get("cow-on-cache"))
        self._overlays = {}
        self._lock = threading.Lock()

    def copies_on_read(self):
        if isinstance(self.cow_on_read, bool):
            return self.cow_on_read
        return os.path.exists(self.cow_on_read)

    def get_ready(self):
        super().get_ready()
        directory = overlay_directory()
        try:
            tempfile.TemporaryFile(prefix="vddktool-cow-",
                                   dir=directory).close()
        except OSError as e:
            raise UsageError("cow: cannot create the overlay in %s: %s (set "
                             "TMPDIR to a writable directory)"
                             % (directory, e.strerror or e))

    def overlay_for(self, export_name, size):
        with self._lock:
            overlay = self._overlays.get(export_name)
            if overlay is None:
                overlay = Overlay(overlay_directory(), size, self.block_size)
                self._overlays[export_name] = overlay
            return overlay

    def cleanup(self):
        with self._lock:
            for overlay in self._overlays.values():
                overlay.close()
            self._overlays.clear()
        super().cleanup()


FILTER = CowFilter
