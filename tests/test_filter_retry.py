"""--filter=retry: the retry loop on a fake clock, the fake VDDK's faults
(one that clears after the first attempt, one that never does), and the
same outcome from nbdkit's retry filter over its error filter."""

import errno
import os
import threading
import time

import pytest

from fake_vddk.fixtures import fake_vddk  # noqa: F401 (a fixture)
from filter_oracle import nbdsh
from memory_engine import MemoryBackend
from vddktool.engine import (FLAG_FAST_ZERO, PARALLEL, SHUTTING_DOWN,
                             EngineError)
from vddktool.filters import retry as retry_filter
from vddktool.filters.retry import RetryFilter

MiB = 1024 * 1024
FAULT_AT = MiB + 4096


class Flaky(MemoryBackend):
    """Reads fail ``read_failures`` times; opens after the first fail
    ``open_failures`` times."""

    def __init__(self, read_failures=0, open_failures=0, **options):
        super().__init__(bytes(range(256)) * 64, **options)
        self.read_failures = read_failures
        self.open_failures = open_failures

    def open(self, export_name, readonly, is_tls=False):
        if self.opened and self.open_failures:
            self.open_failures -= 1
            self.opened += 1
            raise EngineError(errno.EIO, "cannot reach the server")
        engine = super().open(export_name, readonly, is_tls)
        read = engine.pread

        def flaky_read(count, offset, flags=0):
            if self.read_failures:
                self.read_failures -= 1
                raise EngineError(errno.EIO, "connection reset")
            return read(count, offset, flags)
        engine.pread = flaky_read
        return engine


@pytest.fixture
def waits(monkeypatch):
    slept = []
    monkeypatch.setattr(retry_filter, "_pause",
                        lambda seconds: slept.append(seconds) or False)
    return slept


def retrying(backend, **values):
    settings = {"retries": 5, "retry-delay": 2, "retry-exponential": True,
                "retry-readonly": False}
    settings.update((key.replace("_", "-"), value)
                    for key, value in values.items())
    return RetryFilter(backend, settings).open_engine("", False)


def test_a_server_shutting_down_ends_the_waits_at_once():
    engine = retrying(Flaky(read_failures=100), retry_delay=30)
    SHUTTING_DOWN.set()
    try:
        start = time.monotonic()
        with pytest.raises(EngineError) as caught:
            engine.pread(512, 0)
        assert time.monotonic() - start < 5
        assert caught.value.errno == errno.EIO
    finally:
        SHUTTING_DOWN.clear()


def test_a_fault_that_clears_costs_one_wait_and_one_reopen(waits):
    backend = Flaky(read_failures=1)
    engine = retrying(backend)
    assert bytes(engine.pread(4, 0)) == b"\x00\x01\x02\x03"
    assert waits == [2]
    assert backend.opened == 2 and backend.open_engines == 1


def test_the_defaults_wait_about_a_minute_then_give_the_last_error(waits):
    backend = Flaky(read_failures=100)
    with pytest.raises(EngineError) as e:
        retrying(backend).pread(4, 0)
    assert e.value.errno == errno.EIO and "reset" in str(e.value)
    assert waits == [2, 4, 8, 16, 32]
    assert backend.opened == 6


def test_no_exponential_back_off_and_no_retries(waits):
    with pytest.raises(EngineError):
        retrying(Flaky(read_failures=100), retries=3,
                 retry_exponential=False, retry_delay=1).pread(4, 0)
    assert waits == [1, 1, 1]
    del waits[:]
    with pytest.raises(EngineError):
        retrying(Flaky(read_failures=1), retries=0).pread(4, 0)
    assert waits == []


def test_a_failed_reopen_counts_as_an_attempt(waits):
    backend = Flaky(read_failures=1, open_failures=2)
    assert bytes(retrying(backend).pread(2, 0)) == b"\x00\x01"
    assert len(waits) == 3 and backend.open_engines == 1


def test_a_reopen_that_never_works_ends_in_eshutdown(waits):
    backend = Flaky(read_failures=1, open_failures=100)
    with pytest.raises(EngineError) as e:
        retrying(backend, retries=2).pread(2, 0)
    assert e.value.errno == errno.ESHUTDOWN


def test_retry_readonly_refuses_writes_after_a_failure(waits):
    backend = Flaky(read_failures=1)
    engine = retrying(backend, retry_readonly=True)
    engine.pwrite(b"ok", 0)
    engine.pread(2, 0)
    with pytest.raises(EngineError) as e:
        engine.pwrite(b"no", 0)
    assert e.value.errno == errno.EROFS
    assert backend.data[:2] == b"ok"
    # The engine was reopened read-only.
    assert not engine.can_write()


def test_an_answer_the_protocol_expects_is_not_retried(waits):
    engine = retrying(MemoryBackend(bytes(4096), fast_zero=False))
    with pytest.raises(EngineError) as e:
        engine.zero(512, 0, FLAG_FAST_ZERO)
    assert e.value.errno == errno.ENOTSUP and waits == []


# --- requests in parallel ----------------------------------------------------

HELD = 8192


class Watched(Flaky):
    """Flaky, and its engines note closing; reads at HELD wait for
    ``release`` (``held`` is set once one does)."""

    def __init__(self, **options):
        super().__init__(**options)
        self.events = []
        self.held = threading.Event()
        self.release = threading.Event()

    def open(self, export_name, readonly, is_tls=False):
        engine = super().open(export_name, readonly, is_tls)
        read, close = engine.pread, engine.close

        def pread(count, offset, flags=0):
            if offset == HELD:
                self.held.set()
                self.release.wait(10)
                self.events.append("held read done")
            return read(count, offset, flags)

        def closing():
            self.events.append("close")
            close()
        engine.pread, engine.close = pread, closing
        return engine


def in_thread(call):
    """Run ``call`` on a thread: (the thread, its outcome list, an Event
    set when it returns)."""
    outcome, finished = [], threading.Event()

    def run():
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)
        finished.set()
    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome, finished


def test_a_request_waiting_to_retry_holds_up_no_other(monkeypatch):
    """nbdkit's filter serializes requests; here the others go on."""
    backend = Flaky(read_failures=1)
    engine = retrying(backend)
    # A stack that is not parallel, the server serializes (one lock).
    assert engine.thread_model == PARALLEL
    paused, resume = threading.Event(), threading.Event()

    def pause(seconds):
        paused.set()
        resume.wait(10)
        return False
    monkeypatch.setattr(retry_filter, "_pause", pause)
    first, outcome, _ = in_thread(lambda: bytes(engine.pread(4, 0)))
    assert paused.wait(10)
    _, other, finished = in_thread(lambda: bytes(engine.pread(4, 4)))
    assert finished.wait(5), "a request waited for another's back-off"
    assert other == [b"\x04\x05\x06\x07"] and backend.opened == 1
    resume.set()
    first.join(10)
    assert outcome == [b"\x00\x01\x02\x03"] and backend.opened == 2


def test_a_reopen_waits_for_the_requests_running_beside_it(waits):
    backend = Watched()
    engine = retrying(backend)
    held, held_outcome, _ = in_thread(lambda: bytes(engine.pread(4, HELD)))
    assert backend.held.wait(10)
    backend.read_failures = 1
    failing, outcome, finished = in_thread(lambda: bytes(engine.pread(4, 0)))
    # It failed and wants to reopen: not while the held read runs.
    assert not finished.wait(0.5)
    assert backend.events == [] and backend.opened == 1
    backend.release.set()
    held.join(10)
    failing.join(10)
    assert backend.events == ["held read done", "close"]
    assert held_outcome == [bytes(range(256))[HELD % 256:][:4]]
    assert outcome == [b"\x00\x01\x02\x03"] and backend.opened == 2


def test_requests_that_fail_together_reopen_once(monkeypatch):
    backend = Flaky(read_failures=2)
    engine = retrying(backend)
    both_failed = threading.Barrier(2, timeout=10)
    monkeypatch.setattr(retry_filter, "_pause",
                        lambda seconds: both_failed.wait() and False)
    threads = [in_thread(lambda offset=offset: bytes(engine.pread(2, offset)))
               for offset in (0, 2)]
    for thread, _, _ in threads:
        thread.join(10)
    assert [outcome for _, outcome, _ in threads] == \
        [[b"\x00\x01"], [b"\x02\x03"]]
    assert backend.opened == 2 and engine.reopens == 1


class FailingSubmits(MemoryBackend):
    """Asynchronous, its first ``failures`` submitted reads fail; notes
    the completion queue each engine is offered."""

    def __init__(self, failures):
        super().__init__(bytes(range(256)) * 64, asynchronous=True)
        self.failures = failures
        self.offered = []

    def open(self, export_name, readonly, is_tls=False):
        engine = super().open(export_name, readonly, is_tls)
        submit = engine.submit_pread

        def submit_pread(count, offset, flags, done):
            if self.failures:
                self.failures -= 1
                done(EngineError(errno.EIO, "connection reset"), None)
            else:
                submit(count, offset, flags, done)
        engine.submit_pread = submit_pread
        engine.complete_on = self.offered.append
        return engine


def submitted_read(engine, count, offset):
    outcome, finished = [], threading.Event()

    def done(error, data):
        outcome.append((error, data and bytes(data),
                        threading.current_thread().name))
        finished.set()
    engine.submit_pread(count, offset, 0, done)
    assert finished.wait(10)
    return outcome[0]


def test_a_submitted_read_that_fails_is_retried_on_a_thread_of_its_own(
        waits):
    backend = FailingSubmits(failures=0)
    engine = retrying(backend)
    assert engine.can_submit()
    put = object()
    engine.complete_on(put)
    me = threading.current_thread().name
    assert submitted_read(engine, 4, 4) == (None, b"\x04\x05\x06\x07", me)
    backend.failures = 1
    error, data, thread = submitted_read(engine, 4, 0)
    assert error is None and data == b"\x00\x01\x02\x03"
    assert thread == "nbd-retry" and waits == [2]
    # The reopened engine completes through the same queue.
    assert backend.opened == 2 and backend.offered == [put, put]


def test_a_submitted_read_gets_the_last_error_after_the_retries(waits):
    backend = FailingSubmits(failures=1)
    engine = retrying(backend, retries=0)
    error, data, thread = submitted_read(engine, 4, 0)
    assert isinstance(error, EngineError) and error.errno == errno.EIO
    assert thread == threading.current_thread().name
    assert backend.opened == 1 and waits == []


# --- end to end -------------------------------------------------------------


def vddk_server(start_server, fake, *args):
    disk = fake.local_disk(size=2 * MiB, data=bytes(range(256)) * 8192)
    return start_server("-v", "--filter=retry", "backend=vddk",
                        "libdir=" + fake.libdir, disk, *args, env=fake.env)


def reads_of(fake, offset):
    return [c for c in fake.calls("ReadAsync")
            if c.number("sector") * 512 <= offset <
            (c.number("sector") + c.number("count")) * 512]


READ_AT_FAULT = ("print(bytes(h.pread(4096, %d)) == bytes(range(256)) * 16)"
                 % FAULT_AT)


def test_vddk_fault_that_clears_after_one_attempt(fake_vddk, start_server):
    fake_vddk.fail_read_at(FAULT_AT, times=1)
    server = vddk_server(start_server, fake_vddk, "retry-delay=1")
    assert nbdsh(server.uri, READ_AT_FAULT).stdout.split() == ["True"]
    assert len(reads_of(fake_vddk, FAULT_AT)) == 2
    names = [name for name in fake_vddk.call_names()
             if name in ("Open", "Close", "ReadAsync")]
    # Opened, the read failed, closed, opened again, read again.
    assert names[:5] == ["Open", "ReadAsync", "Close", "Open", "ReadAsync"]


def test_vddk_fault_that_stays_reaches_the_client(fake_vddk, start_server):
    fake_vddk.fail_read_at(FAULT_AT)
    server = vddk_server(start_server, fake_vddk, "retries=2",
                         "retry-delay=1")
    out = nbdsh(server.uri, "try:\n    h.pread(4096, %d)\n"
                "except nbd.Error as e:\n    print(e.errnum)" % FAULT_AT)
    assert out.stdout.split() == [str(errno.EIO)]
    assert len(reads_of(fake_vddk, FAULT_AT)) == 3
    assert len(fake_vddk.calls("Open")) == 3
    log = server.log()
    assert "retry 1 in 1 seconds" in log and "retry 2 in 2 seconds" in log
    assert wait_for_line(server, "reopens needed: ") == \
        "reopens needed: 2"


def test_nbdkit_recovers_from_the_same_passing_fault(tmp_path, start_nbdkit):
    """The oracle: nbdkit's retry filter over its error filter, the error
    switched off once the first retry is under way."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(range(256)) * 8192)
    switch = tmp_path / "fail"
    switch.write_bytes(b"")
    server = start_nbdkit("-v", "--filter=retry", "--filter=error", "file",
                          str(disk), "error-pread-rate=100%",
                          "error-pread-file=" + str(switch),
                          "retry-delay=1")

    def clear_once_retrying():
        deadline = time.monotonic() + 30
        while "retry 1" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.unlink(str(switch))
    clearer = threading.Thread(target=clear_once_retrying)
    clearer.start()
    try:
        assert nbdsh(server.uri, READ_AT_FAULT).stdout.split() == ["True"]
    finally:
        clearer.join()
    assert wait_for_line(server, "reopens needed: ") == \
        "reopens needed: 1"


def wait_for_line(server, start, timeout=20):
    """The first log line from ``start`` on, once it is there (nbdkit
    logs at close, a moment after the client leaves)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log().splitlines():
            if start in line:
                return line[line.index(start):]
        time.sleep(0.05)
    raise AssertionError("%r not logged:\n%s" % (start, server.log()))


def test_nbdkit_gives_the_same_error_after_the_same_retries(tmp_path,
                                                            start_nbdkit):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(2 * MiB))
    server = start_nbdkit("-v", "--filter=retry", "--filter=error", "file",
                          str(disk), "error-pread-rate=100%", "retries=2",
                          "retry-delay=1")
    out = nbdsh(server.uri, "try:\n    h.pread(4096, %d)\n"
                "except nbd.Error as e:\n    print(e.errnum)" % FAULT_AT)
    assert out.stdout.split() == [str(errno.EIO)]
    assert wait_for_line(server, "reopens needed: ") == \
        "reopens needed: 2"
