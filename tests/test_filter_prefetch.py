"""--filter=readahead and --filter=scan: what the engine below is asked
(a counting engine), and the data clients see, side by side with
nbdkit's filters of the same names."""

import threading
import time

import pytest

from fake_vddk.fixtures import fake_vddk  # noqa: F401 (a fixture)
from filter_oracle import assert_same_info, contents, nbdsh, side_by_side
from memory_engine import MemoryBackend
from vddktool.engine import CACHE_EMULATE, CACHE_NONE, SERIALIZE_REQUESTS
from vddktool.filters.readahead import ReadaheadFilter
from vddktool.filters.scan import ScanFilter
from vmdk_fixtures import random_disk

KiB = 1024
MiB = 1024 * 1024
DATA = random_disk(8 * MiB, seed=12)


@pytest.mark.parametrize("name", ["readahead", "scan"])
def test_same_data_and_info_as_nbdkit(tmp_path, start_server, start_nbdkit,
                                      name):
    pair = side_by_side(tmp_path, start_server, start_nbdkit, DATA,
                        ["--filter=" + name])
    assert_same_info(pair)
    ours = contents(pair.ours.uri, tmp_path, "ours.out")
    assert ours == contents(pair.theirs.uri, tmp_path, "theirs.out")
    assert ours == DATA


# --- readahead --------------------------------------------------------------


def below_reads(memory):
    return [(offset, count) for name, count, offset, _ in
            memory.calls_named("pread")]


def test_sequential_reads_grow_the_window_and_hit_the_buffer():
    memory = MemoryBackend(DATA)
    engine = ReadaheadFilter(memory, {}).open_engine("", False)
    for offset in range(0, 2 * MiB, 4 * KiB):
        assert engine.pread(4 * KiB, offset) == DATA[offset:offset + 4 * KiB]
    reads = below_reads(memory)
    # 512 client reads became a handful, each twice the one before.
    assert [count for _, count in reads[:5]] == [64 * KiB, 128 * KiB,
                                                 256 * KiB, 512 * KiB, MiB]
    assert len(reads) <= 6
    # And they follow each other with no gap and no overlap.
    assert all(a[0] + a[1] == b[0] for a, b in zip(reads, reads[1:]))


def test_the_window_stops_at_4m_and_at_what_the_engine_takes():
    memory = MemoryBackend(DATA)
    engine = ReadaheadFilter(memory, {}).open_engine("", False)
    for offset in range(0, len(DATA), 64 * KiB):
        engine.pread(64 * KiB, offset)
    assert max(count for _, count in below_reads(memory)) == 4 * MiB
    small = MemoryBackend(DATA, block_limits=(512, 4096, 256 * KiB))
    engine = ReadaheadFilter(small, {}).open_engine("", False)
    for offset in range(0, 2 * MiB, 64 * KiB):
        engine.pread(64 * KiB, offset)
    assert max(count for _, count in below_reads(small)) == 256 * KiB


def test_a_jump_starts_the_window_again():
    memory = MemoryBackend(DATA)
    engine = ReadaheadFilter(memory, {}).open_engine("", False)
    for offset in (0, 64 * KiB, 192 * KiB):
        engine.pread(4 * KiB, offset)
    engine.pread(4 * KiB, 5 * MiB)
    assert below_reads(memory)[-1] == (5 * MiB, 64 * KiB)


def test_a_write_on_any_connection_is_seen_by_the_next_read():
    memory = MemoryBackend(DATA)
    backend = ReadaheadFilter(memory, {})
    reader = backend.open_engine("", False)
    writer = backend.open_engine("", False)
    assert reader.pread(4 * KiB, 0) == DATA[:4 * KiB]    # buffered 64K
    writer.pwrite(b"new!", 8 * KiB)
    assert reader.pread(4, 8 * KiB) == b"new!"
    writer.zero(4 * KiB, 16 * KiB)
    assert reader.pread(4, 16 * KiB) == bytes(4)
    writer.trim(4 * KiB, 20 * KiB)
    assert reader.pread(4, 20 * KiB) == bytes(4)


# --- scan -------------------------------------------------------------------


class SlowCache(MemoryBackend):
    """Cache requests take a while, so a test can act while a scan runs."""

    def __init__(self, data, pause=0.0, **options):
        super().__init__(data, **options)
        self.pause = pause

    def open(self, export_name, readonly, is_tls=False):
        engine = super().open(export_name, readonly, is_tls)
        cache = engine.cache

        def slow_cache(count, offset, flags=0):
            time.sleep(self.pause)
            return cache(count, offset, flags)
        engine.cache = slow_cache
        return engine


def scan_settings(**values):
    settings = {"scan-ahead": True, "scan-clock": True,
                "scan-forever": False, "scan-size": MiB}
    settings.update((key.replace("_", "-"), value)
                    for key, value in values.items())
    return settings


def cached_offsets(memory):
    return [offset for _, _, offset, _ in memory.calls_named("cache")]


def wait_for(condition, timeout=20):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_scan_prefetches_the_whole_disk_once():
    memory = SlowCache(DATA)
    engine = ScanFilter(memory, scan_settings()).open_engine("", False)
    wait_for(lambda: 7 * MiB in cached_offsets(memory))
    time.sleep(0.05)
    engine.close()
    assert cached_offsets(memory) == [n * MiB for n in range(8)]


def test_a_read_ahead_of_the_scan_makes_it_skip_forward():
    memory = SlowCache(DATA * 4, pause=0.05)        # 32 MiB
    engine = ScanFilter(memory, scan_settings()).open_engine("", False)
    engine.pread(4 * KiB, 20 * MiB)
    wait_for(lambda: 32 * MiB in [offset + count for _, count, offset, _
                                  in memory.calls_named("cache")])
    engine.close()
    offsets = cached_offsets(memory)
    assert len(offsets) < 16                     # most of the start skipped
    assert 20 * MiB + 4 * KiB in offsets         # resumed after the read


def test_without_scan_ahead_reads_do_not_move_the_scan():
    memory = SlowCache(DATA, pause=0.01)
    engine = ScanFilter(memory, scan_settings(scan_ahead=False)) \
        .open_engine("", False)
    engine.pread(4 * KiB, 6 * MiB)
    wait_for(lambda: 7 * MiB in cached_offsets(memory))
    engine.close()
    assert cached_offsets(memory) == [n * MiB for n in range(8)]


@pytest.mark.parametrize("clock", [True, False])
def test_the_next_client_resumes_the_clock(clock):
    memory = SlowCache(DATA, pause=0.02)
    backend = ScanFilter(memory, scan_settings(scan_clock=clock))
    first = backend.open_engine("", False)
    wait_for(lambda: 3 * MiB in cached_offsets(memory))
    first.close()
    memory.forget_calls()
    second = backend.open_engine("", False)
    wait_for(lambda: 7 * MiB in cached_offsets(memory))
    second.close()
    start = cached_offsets(memory)[0]
    assert (start >= 3 * MiB) if clock else (start == 0)


def test_scan_forever_starts_again():
    memory = SlowCache(DATA)
    engine = ScanFilter(memory, scan_settings(scan_forever=True)) \
        .open_engine("", False)
    wait_for(lambda: cached_offsets(memory).count(0) >= 2)
    engine.close()
    assert cached_offsets(memory)[:9] == [n * MiB for n in range(8)] + [0]


@pytest.mark.parametrize("options", [{"cache_mode": CACHE_NONE},
                                     {"thread_model": SERIALIZE_REQUESTS}])
def test_no_scan_where_the_engine_cannot_prefetch_in_parallel(
        options, capfd):
    memory = SlowCache(DATA, **options)
    engine = ScanFilter(memory, scan_settings()).open_engine("", False)
    time.sleep(0.1)
    engine.close()
    assert cached_offsets(memory) == []
    assert "scan: " in capfd.readouterr().err


def test_an_emulated_cache_is_used_too():
    memory = SlowCache(DATA, cache_mode=CACHE_EMULATE)
    engine = ScanFilter(memory, scan_settings()).open_engine("", False)
    wait_for(lambda: 7 * MiB in cached_offsets(memory))
    engine.close()


def test_reads_during_a_scan_are_right():
    memory = SlowCache(DATA, pause=0.001)
    backend = ScanFilter(memory, scan_settings(scan_size=512 * KiB,
                                               scan_forever=True))
    engines = [backend.open_engine("", False) for _ in range(3)]
    errors = []

    def reader(engine, step):
        for offset in range(0, len(DATA), step):
            if engine.pread(4 * KiB, offset) != DATA[offset:offset + 4 * KiB]:
                errors.append(offset)
    threads = [threading.Thread(target=reader, args=(e, 64 * KiB * (i + 1)))
               for i, e in enumerate(engines)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for engine in engines:
        engine.close()
    assert errors == []


def test_scan_over_vddk_through_cow_reads_the_whole_disk(fake_vddk,
                                                         start_server):
    """VDDK cannot prefetch; cow-on-cache below scan keeps what the scan
    reads, as the manual's example does."""
    disk = fake_vddk.local_disk(size=len(DATA), data=DATA)
    server = start_server("-v", "--filter=scan", "--filter=cow",
                          "backend=vddk",
                          "libdir=" + fake_vddk.libdir, disk,
                          "cow-on-cache=true", env=fake_vddk.env)

    def read_to_the_end():
        return any((c.number("sector") + c.number("count")) * 512 ==
                   len(DATA) for c in fake_vddk.calls("ReadAsync"))
    script = ("import time\n"
              "deadline = time.monotonic() + 30\n"
              "while time.monotonic() < deadline:\n"
              "    if 'finished scanning' in open(%r).read(): break\n"
              "    time.sleep(0.02)\n"
              "print(h.pread(4096, 7 * 1024 * 1024) == %r)"
              % (server.log_path, DATA[7 * MiB:7 * MiB + 4096]))
    assert nbdsh(server.uri, script).stdout.split() == ["True"]
    assert read_to_the_end()
    # The client's read came from the overlay: no read of its own.
    reads = fake_vddk.calls("ReadAsync")
    assert sum(c.number("count") for c in reads) * 512 == len(DATA)
