"""--filter=blocksize: the client may send any size and alignment; the
layer below sees only what it accepts.

minblock: every request passed down is aligned to it (unaligned heads
and tails of writes and zeroes become read-modify-write of one block,
of trims are skipped, of reads are read whole and cut); the disk's size
is rounded down to it.  maxdata: reads and writes are split to at most
this.  maxlen: trims, zeroes, extents queries and cache requests are
split to at most this.  Defaults as nbdkit: minblock the engine's own
minimum, maxdata 64M (or maxlen, or the engine's maximum, if smaller),
maxlen 4G less minblock.

A read-modify-write holds a lock no other write may hold at the same
time, so overlapping writes cannot lose each other's bytes.

Over an engine that can submit (VDDK), aligned reads, writes and zeroes
are submitted, split in parts in flight together where they are too
large (a submitted write holds the lock's shared side until it
completes); unaligned ones, which need a read-modify-write, are done
synchronously.
"""

import errno

from ..engine import (FLAG_FAST_ZERO, FLAG_FUA, FUA_NATIVE, EngineError,
                      Extent, Tally, in_memory)
from ..layers import FilterEngine
from .base import (FilterBackend, RWLock, clip_extents, finish_at_once,
                   placed_into, reassembled)

DEFAULT_MAXDATA = 64 * 1024 * 1024
# What the client is told it may send: anything the protocol carries.
ADVERTISED_MAXIMUM = 0xffffffff


def round_down(value, unit):
    return value - value % unit


def round_up(value, unit):
    return -(-value // unit) * unit


class BlocksizeEngine(FilterEngine):
    def __init__(self, backend, below, request):
        super().__init__(below)
        self.lock = backend.rmw_lock
        minimum, preferred, maximum = below.block_size()
        minblock = max(backend.minblock or 1, minimum, 1)
        maxdata = backend.maxdata
        if not maxdata:
            maxdata = min(backend.maxlen or DEFAULT_MAXDATA, DEFAULT_MAXDATA)
        if maximum:
            maxdata = min(maxdata, maximum)
        self.minblock = minblock
        self.maxdata = max(round_down(maxdata, minblock), minblock)
        self.maxlen = (round_down(backend.maxlen, minblock) if backend.maxlen
                       else 2 ** 32 - minblock)
        self.maxlen = max(self.maxlen, minblock)
        self.preferred = max(preferred, 4096, minblock)
        self.size = round_down(below.get_size(), minblock)

    def get_size(self):
        return self.size

    def block_size(self):
        # Anything goes from the client; the splitting happens here.
        return (1, self.preferred, ADVERTISED_MAXIMUM)

    # --- reads ------------------------------------------------------------
    def pread(self, count, offset, flags=0):
        unit = self.minblock
        if not (offset | count) % unit and count <= self.maxdata:
            return self.next.pread(count, offset, flags)
        out = bytearray(count)
        done = 0
        head = offset % unit
        if head:
            block = in_memory(self.next.pread(unit, offset - head, flags))
            done = min(unit - head, count)
            out[:done] = block[head:head + done]
        while count - done >= unit:
            n = min(self.maxdata, round_down(count - done, unit))
            out[done:done + n] = in_memory(
                self.next.pread(n, offset + done, flags))
            done += n
        if done < count:
            block = in_memory(self.next.pread(unit, offset + done, flags))
            out[done:] = block[:count - done]
        return out

    # --- writes -----------------------------------------------------------
    def _split_fua(self, flags):
        """FUA the layer below would emulate with a flush per piece is
        done once, after the last piece."""
        if flags & FLAG_FUA and self.next.can_fua() != FUA_NATIVE:
            return flags & ~FLAG_FUA, True
        return flags, False

    def _patch_block(self, block_offset, start, data, flags):
        """Read-modify-write of one minblock: ``data`` at ``start``
        inside it (only FUA of the flags applies to the write)."""
        with self.lock.exclusive():
            block = bytearray(in_memory(
                self.next.pread(self.minblock, block_offset)))
            block[start:start + len(data)] = data
            self.next.pwrite(block, block_offset, flags & FLAG_FUA)

    def pwrite(self, buf, offset, flags=0):
        unit = self.minblock
        view = memoryview(buf).cast("B")
        count = len(view)
        if not (offset | count) % unit and count <= self.maxdata:
            if unit == 1:   # no read-modify-write could overlap it
                return self.next.pwrite(buf, offset, flags)
            with self.lock.shared():
                return self.next.pwrite(buf, offset, flags)
        flags, flush_after = self._split_fua(flags)
        done = 0
        head = offset % unit
        if head:
            done = min(unit - head, count)
            self._patch_block(offset - head, head, view[:done], flags)
        while count - done >= unit:
            n = min(self.maxdata, round_down(count - done, unit))
            with self.lock.shared():
                self.next.pwrite(view[done:done + n], offset + done, flags)
            done += n
        if done < count:
            self._patch_block(offset + done, 0, view[done:], flags)
        if flush_after:
            self.next.flush()

    def zero(self, count, offset, flags=0):
        unit = self.minblock
        if flags & FLAG_FAST_ZERO and ((offset | count) % unit or
                                       count > self.maxlen):
            # A split request could only fail late: call it slow at once.
            raise EngineError(errno.ENOTSUP, "zeroing unaligned or large "
                              "ranges is not fast here", expected=True)
        flags, flush_after = self._split_fua(flags)
        done = 0
        head = offset % unit
        if head:
            done = min(unit - head, count)
            self._patch_block(offset - head, head, bytes(done), flags)
        while count - done >= unit:
            n = min(self.maxlen, round_down(count - done, unit))
            with self.lock.shared():
                self.next.zero(n, offset + done, flags)
            done += n
        if done < count:
            self._patch_block(offset + done, 0, bytes(count - done), flags)
        if flush_after:
            self.next.flush()

    def trim(self, count, offset, flags=0):
        unit = self.minblock
        flags, flush_after = self._split_fua(flags)
        # Unaligned ends are left alone: trim is only advice.
        start = round_up(offset, unit)
        end = round_down(offset + count, unit)
        while start < end:
            n = min(self.maxlen, end - start)
            with self.lock.shared():
                self.next.trim(n, start, flags)
            start += n
        if flush_after:
            self.next.flush()

    # --- submitted: the server's asynchronous path ------------------------
    def submit_pread(self, count, offset, flags, done):
        unit, most = self.minblock, self.maxdata
        if (offset | count) % unit:
            finish_at_once(done, self.pread, count, offset, flags)
        elif count <= most:
            self.next.submit_pread(count, offset, flags, done)
        else:
            out = bytearray(count)
            parts = range(0, count, most)
            tally = reassembled(len(parts), out, done)
            for start in parts:
                length = min(most, count - start)
                self.next.submit_pread(length, offset + start, flags,
                                       placed_into(out, start, 0, length,
                                                   tally))

    def submit_pwrite(self, buf, offset, flags, done):
        view = memoryview(buf).cast("B")
        count, most = len(view), self.maxdata
        if (offset | count) % self.minblock:
            finish_at_once(done, self.pwrite, buf, offset, flags)
            return
        parts = range(0, count, most)
        if not parts:
            done(None, None)
        elif len(parts) > 1:
            done = Tally(len(parts), done).one_done
        for start in parts:
            self._submit_shared(self.next.submit_pwrite,
                                view[start:start + most], offset + start,
                                flags, done)

    def submit_zero(self, count, offset, flags, done):
        if (offset | count) % self.minblock or count > self.maxlen:
            finish_at_once(done, self.zero, count, offset, flags)
        else:
            self._submit_shared(self.next.submit_zero, count, offset, flags,
                                done)

    def _submit_shared(self, submit, first, offset, flags, done):
        """Submit a write or zero holding the lock's shared side until it
        completes, so that no read-modify-write runs beside it."""
        if self.minblock == 1:      # no read-modify-write is ever needed
            submit(first, offset, flags, done)
            return
        lock = self.lock
        lock.acquire_shared()

        def finished(error, data):
            lock.release_shared()
            done(error, data)
        submit(first, offset, flags, finished)

    def recycle(self, data):
        # A read passed straight down, or a buffer of this filter's own
        # that nobody holds: either may go to the engine.
        self.next.recycle(data)

    # --- the rest ---------------------------------------------------------
    def extents(self, count, offset, flags=0):
        unit = self.minblock
        start = round_down(offset, unit)
        limit = min(round_up(offset + count, unit), start + self.maxlen)
        merged = aligned_extents(self.next, start, limit, flags, unit)
        return clip_extents(merged, offset, offset + count)

    def cache(self, count, offset, flags=0):
        unit = self.minblock
        start = round_down(offset, unit)
        end = round_up(offset + count, unit)
        while start < end:
            n = min(self.maxdata, end - start)
            self.next.cache(n, start, flags)
            start += n


def aligned_extents(engine, start, limit, flags, unit):
    """Extents of [start, limit) from ``engine``, both ends multiples of
    ``unit``, in whole units: a unit the engine splits takes the flags
    all its parts share (a hole only if all are holes).  May stop short
    of ``limit`` after the first whole unit, as extents may."""
    out = []
    partial = None      # (unit start, flags so far) of a unit not yet whole
    position = start
    while position < limit:
        got = clip_extents(engine.extents(limit - position, position, flags),
                           position, limit)
        if not got or got[0].offset != position:
            raise EngineError(errno.EIO, "the disk returned no extents at "
                              "offset %d" % position)
        for extent in got:
            if extent.offset != position:
                break   # a gap: ask again from here
            piece_start = extent.offset
            piece_end = extent.offset + extent.length
            if partial is not None:
                unit_start, unit_flags = partial
                unit_flags &= extent.flags
                if piece_end < unit_start + unit:
                    partial = (unit_start, unit_flags)
                    position = piece_end
                    continue
                _append(out, unit_start, unit, unit_flags)
                partial = None
                piece_start = unit_start + unit
            whole_end = round_down(piece_end, unit)
            if whole_end > piece_start:
                _append(out, piece_start, whole_end - piece_start,
                        extent.flags)
                piece_start = whole_end
            if piece_end > piece_start:
                partial = (piece_start, extent.flags)
            position = piece_end
        if out:
            break
    return out


def _append(extents, offset, length, flags):
    last = extents[-1] if extents else None
    if last is not None and last.flags == flags and \
            last.offset + last.length == offset:
        last.length += length
    else:
        extents.append(Extent(offset, length, flags))


class BlocksizeFilter(FilterBackend):
    name = "blocksize"
    summary = "split and align requests to sizes the disk accepts"
    engine_class = BlocksizeEngine

    def configure(self, params):
        self.minblock = params.get("minblock")
        self.maxdata = params.get("maxdata")
        self.maxlen = params.get("maxlen")
        # Process-wide, as the disk below is shared by all connections.
        self.rmw_lock = RWLock()

    def config_complete(self):
        for name in ("maxdata", "maxlen"):
            value = getattr(self, name)
            if value and self.minblock and value % self.minblock:
                raise self.usage_error(
                    name, "%d is not a multiple of minblock=%d (use a "
                    "multiple, such as %d)" % (value, self.minblock,
                                               round_up(value,
                                                        self.minblock)))
        super().config_complete()


FILTER = BlocksizeFilter
