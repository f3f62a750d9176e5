"""The per-connection request threads (leader and followers), without
sockets."""

import threading
import time

import pytest

from vddktool.server.dispatch import LeaderFollowers


class Recorder(object):
    """read/execute/deliver callables: requests come from a list, and the
    recorder notes what ran, on which thread, and how many at once."""

    def __init__(self, requests, delays=None):
        self.requests = list(requests)
        self.reads = 0
        self.delays = delays or {}
        self.lock = threading.Lock()
        self.delivered = []
        self.threads = set()
        self.concurrent = 0
        self.most_concurrent = 0

    def read(self):
        self.reads += 1
        return self.requests.pop(0) if self.requests else None

    def execute(self, item):
        with self.lock:
            self.threads.add(threading.current_thread())
            self.concurrent += 1
            self.most_concurrent = max(self.most_concurrent, self.concurrent)
        time.sleep(self.delays.get(item, 0))
        with self.lock:
            self.concurrent -= 1
        return item

    def deliver(self, reply):
        with self.lock:
            self.delivered.append(reply)

    def loop(self, size, patience=0.005):
        return LeaderFollowers(self.read, self.execute, self.deliver, size,
                                patience)


def test_every_request_is_answered_before_run_returns():
    recorder = Recorder(range(200))
    recorder.loop(4).run()
    assert sorted(recorder.delivered) == list(range(200))


def test_fast_requests_stay_on_the_reading_thread():
    recorder = Recorder(range(500))
    # A generous patience: only the absence of stalls is under test.
    recorder.loop(4, patience=2.0).run()
    assert recorder.threads == {threading.current_thread()}
    assert len(recorder.delivered) == 500


def test_a_slow_request_does_not_hold_up_the_next():
    recorder = Recorder(["slow", "fast"], {"slow": 1.0})
    runner = threading.Thread(target=recorder.loop(4).run)
    runner.start()
    deadline = time.time() + 0.5
    while "fast" not in recorder.delivered and time.time() < deadline:
        time.sleep(0.01)
    assert recorder.delivered == ["fast"]
    runner.join(10)
    assert recorder.delivered == ["fast", "slow"]


def test_stuck_requests_bring_in_up_to_size_threads():
    recorder = Recorder(range(10), dict((i, 0.3) for i in range(10)))
    recorder.loop(3).run()
    assert recorder.most_concurrent == 3
    assert len(recorder.delivered) == 10


def test_reading_stops_while_every_thread_is_stuck():
    release = threading.Event()
    recorder = Recorder(range(10))
    loop = LeaderFollowers(recorder.read, lambda item: release.wait(),
                            recorder.deliver, 1, 0.005)
    runner = threading.Thread(target=loop.run)
    runner.start()
    time.sleep(0.2)
    # One thread, stuck in its request: the rest wait in the socket.
    assert recorder.reads == 1
    release.set()
    runner.join(10)
    assert len(recorder.delivered) == 10


def test_a_failing_read_ends_the_loop_and_reaches_the_caller():
    def read():
        raise OSError("connection reset")
    loop = LeaderFollowers(read, lambda item: item, lambda reply: None, 4,
                            0.005)
    with pytest.raises(OSError):
        loop.run()


def test_once_the_disk_stalls_slow_requests_run_side_by_side():
    """After one stall the leader hands reading over at once, instead of
    each request waiting out the patience before the next is read."""
    recorder = Recorder(range(12), dict((i, 0.5) for i in range(12)))
    start = time.monotonic()
    recorder.loop(12, patience=0.2).run()
    elapsed = time.monotonic() - start
    assert len(recorder.delivered) == 12
    # Serially stalled: 11 patiences plus a request, about 2.7 s.
    # Side by side: one patience plus a request, about 0.7 s.
    assert elapsed < 1.5
    assert recorder.most_concurrent >= 8


def test_an_eager_loop_runs_requests_side_by_side_from_the_first():
    """A latency-bound engine (VDDK): each request waits about 20 ms, far
    below the patience, yet they overlap from the first one."""
    recorder = Recorder(range(16), dict((i, 0.02) for i in range(16)))
    LeaderFollowers(recorder.read, recorder.execute, recorder.deliver, 8,
                    5.0, eager=True).run()
    assert sorted(recorder.delivered) == list(range(16))
    assert recorder.most_concurrent >= 4


def test_without_eagerness_such_requests_run_one_at_a_time():
    recorder = Recorder(range(16), dict((i, 0.02) for i in range(16)))
    LeaderFollowers(recorder.read, recorder.execute, recorder.deliver, 8,
                    5.0).run()
    assert recorder.most_concurrent == 1


def test_a_read_failing_on_another_thread_reaches_the_caller():
    """The client may hang up while a worker thread leads: the error is
    raised by run() in the connection's thread, not lost in the worker."""
    recorder = Recorder([], {"slow": 0.3})
    calls = []

    def read():
        calls.append(threading.current_thread())
        if len(calls) == 1:
            return "slow"
        raise ConnectionResetError("connection reset by peer")
    loop = LeaderFollowers(read, recorder.execute, recorder.deliver, 4,
                            0.005)
    with pytest.raises(ConnectionResetError):
        loop.run()
    assert calls[1] is not threading.current_thread()
    assert recorder.delivered == ["slow"]


class ListRecorder(Recorder):
    """Requests are tuples; each reply is a list of their buffers."""

    def execute(self, item):
        return list(super().execute(item))


def test_replies_are_corked_while_cheap_requests_wait_and_sent_together():
    # The next request is "cheap" except every fifth.
    requests = [(b"%03d" % n,) for n in range(20)]
    recorder = ListRecorder(requests)
    cheap = lambda: bool(recorder.requests) and \
        int(recorder.requests[0][0]) % 5 != 0
    LeaderFollowers(recorder.read, recorder.execute, recorder.deliver, 4,
                    2.0, cheap).run()
    assert recorder.delivered == [
        [b"%03d" % n for n in range(first, first + 5)]
        for first in range(0, 20, 5)]


def test_corking_stops_at_cork_bytes():
    big = b"x" * (LeaderFollowers.CORK_BYTES // 2)
    recorder = ListRecorder([(big,) for _ in range(6)])
    LeaderFollowers(recorder.read, recorder.execute, recorder.deliver, 4,
                    2.0, lambda: bool(recorder.requests)).run()
    # Two halves fill the cork; the third reply goes out with them.
    assert [len(reply) for reply in recorder.delivered] == [3, 3]
