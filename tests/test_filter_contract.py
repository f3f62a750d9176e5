"""The seam every filter relies on (layers.FilterEngine, EngineAdapter,
filters.base.FilterBackend, filters.build_stack): no filter is bypassed,
a stack is as strict as its strictest layer, FUA and fast zero are
decided once at the bottom, and the asynchronous path stays open only
where no filter needs to see the reads and writes."""

import errno
import subprocess

import pytest

from conftest import CLIENT_ENV, need
from inprocess import serving
from memory_engine import MemoryBackend
from vddktool import filters, params
from vddktool.engine import (FLAG_FAST_ZERO, FLAG_FUA, FUA_EMULATE, FUA_NATIVE,
                             PARALLEL, SERIALIZE_REQUESTS, EngineError)
from vddktool.layers import FilterEngine
from vddktool.filters.base import FilterBackend

DATA = bytes(range(256)) * 1024      # 256 KiB


def stack(names, backend=None, readonly=False, **values):
    """build_stack over a MemoryBackend; returns (top, memory backend)."""
    memory = backend or MemoryBackend(DATA)
    settings = params.defaults()
    settings.update((key.replace("_", "-"), value)
                    for key, value in values.items())

    def engine_backend(values, below_readonly):
        memory.readonly = below_readonly
        return memory
    return filters.build_stack(names, engine_backend, settings,
                               readonly), memory


class ReadCounter(FilterEngine):
    """Overrides pread only, as rate and retry do."""
    reads = 0

    def pread(self, count, offset, flags=0):
        ReadCounter.reads += 1
        return self.next.pread(count, offset, flags)


class SparseOnly(FilterEngine):
    def pread_sparse(self, count, offset, flags=0):
        return self.next.pread_sparse(count, offset, flags)


class WriteWatcher(FilterEngine):
    """Sees every write, both ways."""

    def pwrite(self, buf, offset, flags=0):
        return self.next.pwrite(buf, offset, flags)

    def submit_pwrite(self, buf, offset, flags, done):
        self.next.submit_pwrite(buf, offset, flags, done)


class Serializing(FilterEngine):
    thread_model = SERIALIZE_REQUESTS


class Keeping(FilterEngine):
    keeps_write_buffers = True


def open_memory(**options):
    return MemoryBackend(DATA, **options).open_engine("", False)


# --- reads are never bypassed --------------------------------------------


def test_sparse_reads_go_through_a_filter_that_overrides_pread():
    ReadCounter.reads = 0
    engine = ReadCounter(open_memory())
    pieces = engine.pread_sparse(4096, 8192)
    assert ReadCounter.reads == 1
    assert b"".join(bytes(data) for _, data in pieces) == DATA[8192:12288]


def test_a_filter_that_reads_for_itself_closes_the_async_path():
    below = open_memory(asynchronous=True)
    assert FilterEngine(below).can_submit()
    assert not ReadCounter(below).can_submit()
    assert not SparseOnly(below).can_submit()


def test_a_filter_that_sees_writes_both_ways_keeps_the_async_path():
    assert WriteWatcher(open_memory(asynchronous=True)).can_submit()
    assert not WriteWatcher(open_memory()).can_submit()


def test_the_stack_takes_the_strictest_thread_model():
    parallel = open_memory()
    serial = open_memory(thread_model=SERIALIZE_REQUESTS)
    assert FilterEngine(parallel).thread_model == PARALLEL
    assert Serializing(parallel).thread_model == SERIALIZE_REQUESTS
    assert FilterEngine(serial).thread_model == SERIALIZE_REQUESTS
    assert FilterEngine(Serializing(parallel)).thread_model == \
        SERIALIZE_REQUESTS


def test_keeping_write_buffers_is_passed_on():
    assert not FilterEngine(open_memory()).keeps_write_buffers
    assert FilterEngine(open_memory(keeps_write_buffers=True)) \
        .keeps_write_buffers
    assert Keeping(open_memory()).keeps_write_buffers


def test_a_filter_that_replaces_next_reaches_the_new_engine():
    class Swapper(FilterEngine):
        replaces_next = True

    first, second = open_memory(), MemoryBackend(b"x" * 512).open_engine(
        "", False)
    engine = Swapper(first)
    engine.next = second
    assert engine.get_size() == 512
    assert bytes(engine.pread(1, 0)) == b"x"


# --- FUA and fast zero, once at the bottom ----------------------------------


def test_fua_is_emulated_under_the_filters_with_one_flush():
    top, memory = stack(["noextents"],
                        MemoryBackend(DATA, fua=FUA_EMULATE))
    top.open_engine("", False).pwrite(b"a" * 512, 0, FLAG_FUA)
    assert [c[0] for c in memory.calls] == ["pwrite", "flush"]
    assert memory.calls[0][3] & FLAG_FUA == 0


def test_native_fua_reaches_the_engine():
    top, memory = stack(["noextents"], MemoryBackend(DATA, fua=FUA_NATIVE))
    top.open_engine("", False).pwrite(b"a" * 512, 0, FLAG_FUA)
    assert memory.calls == [("pwrite", 512, 0, FLAG_FUA)]


def test_a_fast_zero_the_engine_cannot_do_is_refused_before_it():
    top, memory = stack(["noextents"],
                        MemoryBackend(DATA, fast_zero=False))
    with pytest.raises(EngineError) as e:
        top.open_engine("", False).zero(4096, 0, FLAG_FAST_ZERO)
    assert e.value.errno == errno.ENOTSUP and e.value.expected
    assert memory.calls_named("zero", "pwrite") == []


# --- the process-wide half --------------------------------------------------


def test_the_first_filter_named_is_nearest_the_client():
    top, memory = stack(["noextents", "cacheextents", "retry"])
    assert [type(layer).name for layer in (top, top.next, top.next.next)] \
        == ["noextents", "cacheextents", "retry"]
    assert top.next.next.next is memory
    engine = top.open_engine("", False)
    kinds = []
    while isinstance(engine, FilterEngine):
        kinds.append(type(engine).__name__)
        engine = engine.next
    assert kinds == ["NoExtentsEngine", "CacheExtentsEngine", "RetryEngine",
                     "EngineAdapter"]


def test_below_cow_everything_is_read_only():
    top, memory = stack(["noextents", "cow", "cacheextents"])
    assert (top.readonly, top.next.readonly, top.next.next.readonly,
            memory.readonly) == (False, False, True, True)
    engine = top.open_engine("", False)
    assert engine.can_write()
    engine.pwrite(b"z" * 4096, 0)
    assert memory.calls_named("pwrite") == []
    assert memory.data == bytearray(DATA)


def test_every_step_reaches_the_engine_backend():
    steps = []

    class Watching(MemoryBackend):
        def config_complete(self):
            steps.append("config_complete")

        def get_ready(self):
            steps.append("get_ready")

        def after_fork(self):
            steps.append("after_fork")

        def cleanup(self):
            steps.append("cleanup")
    top, memory = stack(["noextents", "rate"], Watching(DATA))
    top.config_complete()
    top.get_ready()
    top.after_fork()
    top.preconnect(False)
    top.cleanup()
    assert steps == ["config_complete", "get_ready", "after_fork", "cleanup"]
    assert memory.preconnects == 1


def test_a_failing_filter_engine_closes_what_it_opened_below():
    class Failing(FilterEngine):
        def __init__(self, backend, below, request):
            raise EngineError(errno.EIO, "no")

    class FailingFilter(FilterBackend):
        engine_class = Failing
    memory = MemoryBackend(DATA)
    with pytest.raises(EngineError):
        FailingFilter(memory, {}).open_engine("", False)
    assert memory.opened == 1 and memory.open_engines == 0


# --- through the server ------------------------------------------------------


def nbdsh(uri, script):
    need("nbdsh")
    return subprocess.run(
        ["nbdsh", "-u", uri, "-c", script], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=CLIENT_ENV, timeout=60, check=True
    ).stdout.decode()


@pytest.mark.parametrize("names,submitted", [
    (["noextents"], True), (["scan"], True), (["cacheextents"], True),
    (["blocksize"], True), (["retry"], True),
    (["noextents", "rate"], True), (["readahead"], False)])
def test_the_server_submits_only_through_filters_that_allow_it(
        tmp_path, names, submitted):
    top, memory = stack(names, MemoryBackend(DATA, asynchronous=True))
    with serving(top, tmp_path) as uri:
        out = nbdsh(uri, "h.pwrite(b'w' * 4096, 8192)\n"
                    "print(h.pread(4096, 8192) == b'w' * 4096)\n"
                    "print(h.pread(4096, 0) == %r)" % DATA[:4096])
    assert out.split() == ["True", "True"]
    used = memory.calls_named("submit_pread", "submit_pwrite")
    assert bool(used) == submitted, memory.calls


def test_structured_reads_reach_a_filter_that_overrides_pread(tmp_path):
    ReadCounter.reads = 0

    class CountingFilter(FilterBackend):
        engine_class = type("Counting", (ReadCounter,), {
            "__init__": lambda self, backend, below, request:
            ReadCounter.__init__(self, below)})
    backend = CountingFilter(MemoryBackend(DATA), {})
    with serving(backend, tmp_path) as uri:
        out = nbdsh(uri, "print(h.get_structured_replies_negotiated())\n"
                    "print(h.pread(8192, 4096) == %r)" % DATA[4096:12288])
    assert out.split() == ["True", "True"]
    assert ReadCounter.reads == 1


class _Recycles(FilterEngine):
    """The bottom of a small stack: records what comes back to it."""

    def __init__(self):
        self.back = []

    def recycle(self, data):
        self.back.append(data)


class _NotesReads(FilterEngine):
    def submit_pread(self, count, offset, flags, done):
        self.next.submit_pread(count, offset, flags, done)


class _ReadsForItself(FilterEngine):
    def pread(self, count, offset, flags=0):
        return self.next.pread(count, offset, flags)


def test_read_buffers_go_back_down_only_through_filters_that_never_saw_them():
    bottom = _Recycles()
    FilterEngine(FilterEngine(bottom)).recycle(b"passed through")
    # A filter that sees reads may have kept what it saw.
    _NotesReads(bottom).recycle(b"seen on its way up")
    _ReadsForItself(bottom).recycle(b"its own")
    FilterEngine(_NotesReads(bottom)).recycle(b"seen lower down")
    assert bottom.back == [b"passed through"]
