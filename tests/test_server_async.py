"""The server's asynchronous path (server/dispatch.py, AsyncWindow): an
engine that submits requests and completes them later, on its own
threads and out of order, served in-process to real clients."""

import errno
import json
import random
import socket
import threading
import time

from conftest import need, run
from inprocess import serving
from vddktool import protocol as nbd
from vddktool.engine import Backend, Engine, EngineError

KiB = 1024
MiB = 1024 * KiB
SIZE = 256 * MiB


def content(offset, count):
    """What the disk holds: each 8-byte word is its own offset."""
    first = offset // 8
    words = (count + 7) // 8 + 1
    blob = b"".join((first + i).to_bytes(8, "big") for i in range(words))
    skip = offset % 8
    return blob[skip:skip + count]


class LaterEngine(Engine):
    """Completes each submitted request after a random pause, on a timer
    thread of its own, and counts what is in flight at once."""

    def __init__(self, backend):
        self.backend = backend
        self.written = backend.written

    def get_size(self):
        return SIZE

    def can_write(self):
        return True

    def can_flush(self):
        return True

    def can_submit(self):
        return True

    def submit_pread(self, count, offset, flags, done):
        self.backend.started(count)
        if offset in self.backend.fail_reads_at:
            self._later(done, EngineError(errno.EIO, "injected"), None,
                        count)
        elif self.backend.zeros:
            self._later(done, None, bytes(count), count)
        else:
            self._later(done, None, content(offset, count), count)

    def submit_pwrite(self, buf, offset, flags, done):
        self.backend.started(len(buf))
        self.written[offset] = bytes(buf)
        self._later(done, None, None, len(buf), ("write", offset))

    def _later(self, done, error, data, count, event=None):
        def finish():
            self.backend.wait_for_gate()
            self.backend.finished(count, event)
            done(error, data)
        timer = threading.Timer(random.uniform(self.backend.min_pause,
                                               self.backend.max_pause),
                                finish)
        timer.daemon = True
        timer.start()

    def pread(self, count, offset, flags=0):
        return content(offset, count)

    def pwrite(self, buf, offset, flags=0):
        self.written[offset] = bytes(buf)

    def flush(self, flags=0):
        self.backend.note(("flush",))

    def close(self):
        self.backend.closed(self)


class LaterBackend(Backend):
    """gate=N holds every completion until N requests have been in flight
    at once (or ten seconds have passed), so a test that asserts overlap
    does not depend on how fast a loaded machine submits: a server that
    serves one request at a time still fails, only ten seconds later."""

    def __init__(self, max_pause=0.005, min_pause=0.0, gate=0):
        super().__init__({})
        self.gate = gate
        self.gate_open = threading.Event()
        if gate <= 1:
            self.gate_open.set()
        self.min_pause = min_pause
        self.max_pause = max_pause
        self.zeros = False          # read zeros, not the pattern
        self.written = {}           # offset -> data, every connection
        self.fail_reads_at = set()
        self.lock = threading.Lock()
        self.in_flight = self.in_flight_bytes = 0
        self.most = self.most_bytes = 0
        self.events = []
        self.in_flight_at_close = []

    def open(self, export_name, readonly, is_tls=False):
        return LaterEngine(self)

    def started(self, count):
        with self.lock:
            self.in_flight += 1
            self.in_flight_bytes += count
            self.most = max(self.most, self.in_flight)
            self.most_bytes = max(self.most_bytes, self.in_flight_bytes)
            if self.in_flight >= self.gate:
                self.gate_open.set()

    def wait_for_gate(self):
        self.gate_open.wait(10)

    def finished(self, count, event):
        with self.lock:
            self.in_flight -= 1
            self.in_flight_bytes -= count
            if event:
                self.events.append(event)

    def note(self, event):
        with self.lock:
            self.events.append(event)

    def closed(self, engine):
        with self.lock:
            self.in_flight_at_close.append(self.in_flight)


def nbdsh_json(script):
    out = run([need("nbdsh"), "-c", "import json\n" + script])
    return json.loads(out.stdout)


READ_MANY = """
h.connect_uri(%r)
size, count = %d, %d
bufs = [nbd.Buffer(size) for _ in range(count)]
cookies = [h.aio_pread(bufs[i], i * size) for i in range(count)]
while h.aio_in_flight() > 0:
    h.poll(-1)
print(json.dumps([bytes(b.to_bytearray()).hex() for b in bufs]))
"""


def test_many_reads_in_flight_each_reply_with_its_own_data(tmp_path):
    backend = LaterBackend(gate=8)
    with serving(backend, tmp_path) as uri:
        replies = nbdsh_json(READ_MANY % (uri, 4096, 64))
    assert [bytes.fromhex(r) for r in replies] == [
        content(i * 4096, 4096) for i in range(64)]
    # One connection had many requests in flight, not one at a time.
    assert backend.most >= 8
    assert backend.in_flight_at_close == [0]


class RecyclingEngine(LaterEngine):
    """Reads into bytearrays of its own and takes them back through
    recycle(), scribbling over each: a buffer given back before its
    reply was sent would reach the client scribbled."""

    def submit_pread(self, count, offset, flags, done):
        data = bytearray(content(offset, count))
        with self.backend.lock:
            self.backend.handed_out.add(id(data))
            self.backend.keep.append(data)  # ids stay unique meanwhile
        self.backend.started(count)
        self._later(done, None, data, count)

    def recycle(self, data):
        with self.backend.lock:
            self.backend.recycled.append(id(data))
        data[:] = b"\xff" * len(data)


class RecyclingBackend(LaterBackend):
    def __init__(self):
        super().__init__()
        self.handed_out, self.recycled, self.keep = set(), [], []

    def open(self, export_name, readonly, is_tls=False):
        return RecyclingEngine(self)


def test_read_buffers_go_back_to_the_engine_once_their_reply_is_sent(
        tmp_path):
    backend = RecyclingBackend()
    with serving(backend, tmp_path) as uri:
        replies = nbdsh_json(READ_MANY % (uri, 4096, 64))
    assert [bytes.fromhex(r) for r in replies] == [
        content(i * 4096, 4096) for i in range(64)]
    assert sorted(backend.recycled) == sorted(backend.handed_out)
    assert len(backend.recycled) == 64


def test_window_holds_requests_in_flight_to_four_per_thread(tmp_path):
    backend = LaterBackend(gate=2)
    with serving(backend, tmp_path, threads=2) as uri:
        replies = nbdsh_json(READ_MANY % (uri, 512, 64))
    assert len(replies) == 64
    assert 2 <= backend.most <= 2 * 4


def test_window_holds_bytes_in_flight(tmp_path):
    backend = LaterBackend()
    backend.zeros = True
    with serving(backend, tmp_path) as uri:
        nbdsh_json(READ_MANY.replace(
            "print(json.dumps([bytes(b.to_bytearray()).hex() for b in bufs]))",
            "print(json.dumps(len(bufs)))") % (uri, 8 * MiB, 32))
    # 16 threads * 4 MiB, and never less than one 64 MiB request.
    assert 2 <= backend.most and backend.most_bytes <= 64 * MiB


def test_a_failed_request_gets_eio_and_its_neighbours_succeed(tmp_path):
    backend = LaterBackend()
    backend.fail_reads_at.add(5 * 4096)
    with serving(backend, tmp_path) as uri:
        out = nbdsh_json("""
h.connect_uri(%r)
bufs = [nbd.Buffer(4096) for _ in range(10)]
cookies = [h.aio_pread(bufs[i], i * 4096) for i in range(10)]
while h.aio_in_flight() > 0:
    h.poll(-1)
results = []
for cookie, buf in zip(cookies, bufs):
    try:
        h.aio_command_completed(cookie)
        results.append(bytes(buf.to_bytearray()).hex())
    except nbd.Error as e:
        results.append(e.errno)
print(json.dumps(results))
""" % uri)
    expected = [content(i * 4096, 4096).hex() for i in range(10)]
    expected[5] = "EIO"
    assert out == expected


def test_flush_waits_for_the_writes_in_flight(tmp_path):
    backend = LaterBackend(max_pause=0.05)
    with serving(backend, tmp_path) as uri:
        nbdsh_json("""
h.connect_uri(%r)
for i in range(16):
    h.aio_pwrite(bytes([i]) * 4096, i * 4096)
h.aio_flush()
while h.aio_in_flight() > 0:
    h.poll(-1)
print(json.dumps(0))
""" % uri)
    events = backend.events
    assert events.index(("flush",)) == 16, events
    assert sorted(offset for _, offset in events[:16]) == [
        i * 4096 for i in range(16)]


def test_zero_and_block_status_run_beside_submitted_requests(tmp_path):
    backend = LaterBackend()
    with serving(backend, tmp_path) as uri:
        out = nbdsh_json("""
h.add_meta_context("base:allocation")
h.connect_uri(%r)
for i in range(8):
    h.aio_pread(nbd.Buffer(4096), i * 4096)
h.zero(4096, 0)
seen = []
h.block_status(65536, 0, lambda ctx, off, ents, err: seen.extend(ents))
while h.aio_in_flight() > 0:
    h.poll(-1)
print(json.dumps(seen))
""" % uri)
    assert out == [65536, 0]
    assert backend.written[0] == bytes(4096)  # the zero was written


def test_a_client_leaving_with_requests_in_flight(tmp_path):
    backend = LaterBackend(max_pause=0.05)
    with serving(backend, tmp_path) as uri:
        path = uri.split("socket=", 1)[1]
        before = threading.active_count()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        handshake(sock)
        for i in range(32):
            sock.sendall(nbd.encode_request(nbd.CMD_READ, i, i * 4096, 4096))
        sock.close()
        deadline = time.monotonic() + 10
        while backend.in_flight_at_close == [] and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        # The engine closed only once nothing was in flight.
        assert backend.in_flight_at_close == [0]
        while threading.active_count() > before and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        assert threading.active_count() <= before
        # The server lives on.
        replies = nbdsh_json(READ_MANY % (uri, 512, 4))
        assert len(replies) == 4


def handshake(sock):
    """Fixed newstyle, NBD_OPT_EXPORT_NAME "", simple replies."""
    def recv(count):
        data = b""
        while len(data) < count:
            piece = sock.recv(count - len(data))
            assert piece, "server hung up"
            data += piece
        return data
    recv(18)
    sock.sendall((nbd.CLIENT_FLAG_FIXED_NEWSTYLE |
                  nbd.CLIENT_FLAG_NO_ZEROES).to_bytes(4, "big"))
    sock.sendall(nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 0))
    recv(10)


def test_zeroes_are_submitted_as_writes_of_zeros_in_flight_together(
        tmp_path):
    backend = LaterBackend(max_pause=0.05, min_pause=0.02)
    with serving(backend, tmp_path) as uri:
        out = nbdsh_json("""
h.connect_uri(%r)
h.pwrite(b"\\xff" * 4096, 0)
h.zero(3 * 1024 * 1024, 0)
try:
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    fast = "done"
except nbd.Error as e:
    fast = e.errno
print(json.dumps(fast))
""" % uri)
    assert out == "ENOTSUP"
    # One engine without a zero of its own: three 1 MiB writes of zeros,
    # submitted together rather than one after another.
    assert sorted(backend.written) == [0, MiB, 2 * MiB]
    assert all(data == bytes(MiB) for data in backend.written.values())
    assert backend.most >= 3


class ZerosEngine(Engine):
    """Answers at once: the leader/followers path."""

    def get_size(self):
        return SIZE

    def pread(self, count, offset, flags=0):
        return bytes(count)


class ZerosBackend(Backend):
    def __init__(self):
        super().__init__({})

    def open(self, export_name, readonly, is_tls=False):
        return ZerosEngine()


def read_one(sock, cookie):
    sock.sendall(nbd.encode_request(nbd.CMD_READ, cookie, 0, 4096))
    got = b""
    while len(got) < 16 + 4096:
        piece = sock.recv(65536)
        assert piece, "server hung up"
        got += piece
    assert nbd.SIMPLE_REPLY.unpack_from(got) == (
        nbd.SIMPLE_REPLY_MAGIC, 0, cookie)


def test_an_idle_client_costs_one_thread_on_either_path(tmp_path,
                                                        monkeypatch):
    from vddktool.server.dispatch import AsyncWindow, LeaderFollowers
    monkeypatch.setattr(AsyncWindow, "QUIET_SECONDS", 0.2)
    monkeypatch.setattr(LeaderFollowers, "QUIET_SECONDS", 0.2)
    for number, backend in enumerate((LaterBackend(), ZerosBackend())):
        place = tmp_path / str(number)
        place.mkdir()
        with serving(backend, place) as uri:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(20)
            sock.connect(uri.split("socket=", 1)[1])
            try:
                handshake(sock)
                time.sleep(0.1)
                negotiated = threading.active_count()
                for cookie in range(8):
                    read_one(sock, cookie)
                busy = threading.active_count()
                deadline = time.monotonic() + 10
                while threading.active_count() > negotiated and \
                        time.monotonic() < deadline:
                    time.sleep(0.05)
                # The sender or the standby came with the requests and
                # left once the client was quiet.
                assert busy > negotiated, type(backend).__name__
                assert threading.active_count() == negotiated
                read_one(sock, 99)  # and the connection still serves
            finally:
                sock.close()


def test_a_corked_reply_is_not_held_behind_an_invalid_request(tmp_path):
    """Two small reads arrive together, the second out of bounds: the
    first reply must not wait in the cork while the server answers the
    second and waits for a third that never comes."""
    with serving(ZerosBackend(), tmp_path) as uri:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(uri.split("socket=", 1)[1])
        try:
            handshake(sock)
            sock.sendall(nbd.encode_request(nbd.CMD_READ, 1, 0, 4096) +
                         nbd.encode_request(nbd.CMD_READ, 2, SIZE, 4096))
            got = b""
            while len(got) < 2 * 16 + 4096:
                piece = sock.recv(65536)   # times out if a reply is held
                assert piece, "server hung up"
                got += piece
        finally:
            sock.close()
    errors = dict((cookie, error) for magic, error, cookie in (
        nbd.SIMPLE_REPLY.unpack_from(got, at) for at in (0, 16 + 4096)))
    assert errors == {1: 0, 2: nbd.NBD_EINVAL}
