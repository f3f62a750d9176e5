"""The per-connection worker pool, without sockets."""

import threading
import time

from vddktool.server import _WorkerPool


class Recorder(object):
    """execute/deliver callables that note what ran and how many at once."""

    def __init__(self, delays=None):
        self.delays = delays or {}
        self.lock = threading.Lock()
        self.delivered = []
        self.concurrent = 0
        self.most_concurrent = 0

    def execute(self, item):
        with self.lock:
            self.concurrent += 1
            self.most_concurrent = max(self.most_concurrent, self.concurrent)
        time.sleep(self.delays.get(item, 0))
        with self.lock:
            self.concurrent -= 1
        return item

    def deliver(self, reply):
        with self.lock:
            self.delivered.append(reply)


def test_close_finishes_every_queued_request():
    recorder = Recorder()
    pool = _WorkerPool(recorder.execute, recorder.deliver, 4, 0.005)
    for item in range(200):
        pool.submit(item)
    pool.close()
    assert sorted(recorder.delivered) == list(range(200))


def test_a_slow_request_does_not_hold_up_the_next():
    recorder = Recorder({"slow": 1.0})
    pool = _WorkerPool(recorder.execute, recorder.deliver, 4, 0.005)
    pool.submit("slow")
    time.sleep(0.05)
    pool.submit("fast")
    deadline = time.time() + 0.5
    while "fast" not in recorder.delivered and time.time() < deadline:
        time.sleep(0.01)
    assert recorder.delivered == ["fast"]
    pool.close()
    assert recorder.delivered == ["fast", "slow"]


def test_stuck_requests_bring_in_up_to_size_threads():
    recorder = Recorder(dict((i, 0.3) for i in range(10)))
    pool = _WorkerPool(recorder.execute, recorder.deliver, 3, 0.005)
    for item in range(10):
        pool.submit(item)
    pool.close()
    assert recorder.most_concurrent == 3
    assert len(recorder.delivered) == 10


def test_submit_blocks_when_the_queue_is_full():
    release = threading.Event()
    pool = _WorkerPool(lambda item: release.wait(), lambda reply: None, 1,
                       0.005)
    submitted = []

    def flood():
        for item in range(10):
            pool.submit(item)
            submitted.append(item)
    flooder = threading.Thread(target=flood)
    flooder.start()
    deadline = time.time() + 10
    while len(submitted) < 3 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    # One running plus a queue of twice the pool size; the rest must wait.
    assert len(submitted) == 3
    release.set()
    flooder.join(10)
    pool.close()
    assert len(submitted) == 10
