"""--filter=rate: the token buckets on a fake clock, and the bandwidth a
real copy gets, side by side with nbdkit's (within 20%, as the issue
allows: each copy moves enough bytes to last seconds, so scheduling
noise of a few tens of milliseconds does not matter)."""

import time

import pytest

from conftest import need, run
from filter_oracle import flat_vmdk, side_by_side
from memory_engine import MemoryBackend
from vddktool import params
from vddktool.filters import rate as rate_filter
from vddktool.filters.rate import RateFilter
from vmdk_fixtures import random_disk

MiB = 1024 * 1024


class FakeClock(object):
    """time.monotonic and time.sleep for the rate module: sleeping moves
    the clock on."""

    def __init__(self):
        self.now = 1000.0
        self.slept = 0.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.slept += seconds
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(rate_filter.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(rate_filter.time, "sleep", fake.sleep)
    return fake


def test_a_full_bucket_lets_a_burst_through_then_holds_the_rate(clock):
    bucket = rate_filter.Bucket(8 * MiB, 2.0)     # 1 MiB/s, 2 s of burst
    bucket.consume(2 * MiB * 8)
    assert clock.slept == 0
    for _ in range(16):             # 4 MiB in requests of 256K
        bucket.consume(256 * 1024 * 8)
    assert clock.slept == pytest.approx(4.0)


def test_an_idle_bucket_fills_up_to_its_capacity_only(clock):
    bucket = rate_filter.Bucket(8 * MiB, 2.0)
    bucket.consume(2 * MiB * 8)
    clock.now += 60                 # a minute idle: still only 2 s' worth
    bucket.consume(3 * MiB * 8)
    assert clock.slept == pytest.approx(1.0)


def test_no_rate_means_no_limit(clock):
    rate_filter.Bucket(None, 2.0).consume(10 ** 12)
    assert clock.slept == 0


def test_submitted_requests_wait_for_their_tokens_then_go_down(clock):
    """Over an engine that submits, the rate still holds: each request
    waits for its tokens, then is submitted as it was."""
    below = MemoryBackend(bytes(4 * MiB), asynchronous=True)
    settings = params.defaults()
    settings["connection-rate"] = 8 * MiB      # 1 MiB/s, 2 s of burst
    engine = RateFilter(below, settings).open_engine("", False)
    assert engine.can_submit()
    answers = []
    for index in range(16):                    # 4 MiB in 256K pieces
        engine.submit_pread(256 * 1024, index * 256 * 1024, 0,
                            lambda error, data: answers.append(error))
    assert answers == [None] * 16
    assert clock.slept == pytest.approx(2.0)   # 2 MiB of burst, then 1/s
    assert len(below.calls_named("submit_pread")) == 16
    engine.submit_pwrite(bytearray(MiB), 0, 0,
                         lambda error, data: answers.append(error))
    assert clock.slept == pytest.approx(2.0)   # writes: a bucket apart
    assert below.calls_named("submit_pwrite")


def test_a_rate_file_changes_the_rate(clock, tmp_path):
    path = tmp_path / "rate"
    bucket = rate_filter.Bucket(8 * MiB, 2.0)
    rate_file = rate_filter.RateFile(str(path), bucket)
    rate_file.apply()               # absent: nothing changes
    assert bucket.rate == 8 * MiB
    path.write_text("16M\n")
    rate_file.apply()
    assert (bucket.rate, bucket.capacity) == (16 * MiB, 32 * MiB)
    path.write_text("fast\n")       # not a rate: ignored
    rate_file.apply()
    assert bucket.rate == 16 * MiB


def timed(command):
    start = time.monotonic()
    run(command)
    return time.monotonic() - start


# Copies that take about 2.5 s at the rate: 12 MiB, of which the bucket
# (0.5 s' worth of 32 Mibit/s = 2 MiB) passes at once, then 10 MiB at
# 4 MiB/s.
DISK = 12 * MiB
RATE = "32M"
BYTES_PER_SECOND = 4 * MiB
BURST = "burstiness=0.5"
EXPECTED = (DISK - BYTES_PER_SECOND * 0.5) / BYTES_PER_SECOND


def test_read_bandwidth_matches_nbdkit(tmp_path, start_server,
                                       start_nbdkit):
    need("nbdcopy")
    data = random_disk(DISK, seed=8, hole_every=10 ** 9, zero_every=10 ** 9)
    pair = side_by_side(tmp_path, start_server, start_nbdkit, data,
                        ["--filter=rate"], ["rate=" + RATE, BURST])
    ours = timed(["nbdcopy", "-C", "1", pair.ours.uri,
                  str(tmp_path / "ours.out")])
    theirs = timed(["nbdcopy", "-C", "1", pair.theirs.uri,
                    str(tmp_path / "theirs.out")])
    assert (tmp_path / "ours.out").read_bytes() == data
    assert ours == pytest.approx(theirs, rel=0.2)
    assert ours == pytest.approx(EXPECTED, rel=0.2)


def test_write_bandwidth_matches_nbdkit(tmp_path, start_server,
                                        start_nbdkit):
    need("nbdcopy")
    data = random_disk(DISK, seed=9, hole_every=10 ** 9, zero_every=10 ** 9)
    source = tmp_path / "source.raw"
    source.write_bytes(data)
    pair = side_by_side(tmp_path, start_server, start_nbdkit, bytes(DISK),
                        ["--filter=rate"], ["rate=" + RATE, BURST])
    ours = timed(["nbdcopy", "-C", "1", str(source), pair.ours.uri])
    theirs = timed(["nbdcopy", "-C", "1", str(source), pair.theirs.uri])
    assert ours == pytest.approx(theirs, rel=0.2)
    assert ours == pytest.approx(EXPECTED, rel=0.2)


def parallel_copies(uri, tmp_path, clients):
    """Seconds for ``clients`` nbdcopy processes, each with one
    connection, to copy the whole disk at the same time."""
    import subprocess
    from conftest import CLIENT_ENV
    start = time.monotonic()
    procs = [subprocess.Popen(["nbdcopy", "-C", "1", uri,
                               str(tmp_path / ("out%d" % n))],
                              env=CLIENT_ENV) for n in range(clients)]
    assert [proc.wait(60) for proc in procs] == [0] * clients
    return time.monotonic() - start


@pytest.mark.parametrize("limit,disk", [
    # Two clients share one rate: 2 x 6 MiB less one burst, at 4 MiB/s.
    ("rate=" + RATE, DISK // 2),
    # Each client has the rate to itself: 12 MiB less its burst each.
    ("connection-rate=" + RATE, DISK)])
def test_total_and_per_connection_rates(tmp_path, start_server, limit,
                                        disk):
    need("nbdcopy")
    data = random_disk(disk, seed=10, hole_every=10 ** 9,
                       zero_every=10 ** 9)
    descriptor = flat_vmdk(str(tmp_path), "disk", data)[0]
    server = start_server("--filter=rate", descriptor, limit, BURST)
    elapsed = parallel_copies(server.uri, tmp_path, 2)
    assert elapsed == pytest.approx(EXPECTED, rel=0.2)


def test_a_rate_file_sets_the_rate_while_serving(tmp_path, start_server):
    need("nbdcopy")
    data = random_disk(DISK, seed=11, hole_every=10 ** 9,
                       zero_every=10 ** 9)
    rate_path = tmp_path / "rate.txt"
    rate_path.write_text(RATE + "\n")
    descriptor = flat_vmdk(str(tmp_path), "disk", data)[0]
    server = start_server("--filter=rate", descriptor,
                          "rate-file=" + str(rate_path), BURST)
    elapsed = timed(["nbdcopy", "-C", "1", server.uri,
                     str(tmp_path / "out")])
    # The bucket starts empty (no rate= given), so no burst.
    assert elapsed == pytest.approx(DISK / BYTES_PER_SECOND, rel=0.2)
