"""What a client may cost: the handshake limit drops clients that do not
finish negotiating, --max-connections refuses clients beyond the cap, and
a flood of idle connections leaves no thread or descriptor behind."""

import socket
import threading
import time

import pytest

from conftest import idle_counts, settles_at, threads_and_descriptors
from nbdclient import NbdClient
from tls_fixtures import pki  # noqa: F401 (fixture)
from vddktool import protocol as nbd
from vddktool.server.limits import HandshakeWatchdog, NegotiationExpired


@pytest.fixture
def disk(tmp_path):
    return [str(tmp_path / "disk.vmdk"), "create=true", "create-size=1M"]


def connect(server):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(server.sock)
    return sock


def greeted(sock):
    """True when the server sent its greeting, False when it hung up."""
    data = b""
    while len(data) < nbd.GREETING.size:
        piece = sock.recv(nbd.GREETING.size - len(data))
        if not piece:
            return False
        data += piece
    return True


def hung_up(sock):
    """Wait for the server to close the connection (True), or for it
    to send something instead (False)."""
    try:
        while True:
            piece = sock.recv(4096)
            if not piece:
                return True
            if not piece.startswith(b"NBDMAGIC"):
                return False
    except ConnectionResetError:
        return True


# ---------------------------------------------------------------------------
# --handshake-limit


def test_a_silent_client_is_dropped(start_server, disk):
    server = start_server("--handshake-limit=0.5", *disk)
    idle = idle_counts(server)
    sock = connect(server)
    try:
        assert greeted(sock)
        assert hung_up(sock)
    finally:
        sock.close()
    assert settles_at(server.proc.pid, idle) == idle
    assert "still negotiating after 0.5 seconds" in server.log()


def test_a_client_stalling_in_the_tls_handshake_is_dropped(start_server, pki,
                                                           disk):
    server = start_server("--handshake-limit=0.5", "--tls=require",
                          "--tls-certificates=" + pki.server, *disk)
    client = NbdClient.unix(server.sock)
    try:
        client.greet()
        client.option(nbd.OPT_STARTTLS)
        assert client.reply()[1] == nbd.REP_ACK
        client.send(b"\x16\x03\x01")    # a TLS record that never ends
        assert client.at_eof()
    finally:
        client.close()
    assert "still negotiating" in server.log()


def test_a_slow_option_stream_is_dropped(start_server, disk):
    # Options keep coming, but negotiation never ends: the limit is on
    # the whole negotiation, not on each read.
    server = start_server("--handshake-limit=0.5", *disk)
    client = NbdClient.unix(server.sock)
    try:
        client.greet()
        dropped = False
        for _ in range(200):
            try:
                client.option(nbd.OPT_STRUCTURED_REPLY)
                client.reply()
            except Exception:
                dropped = True
                break
            time.sleep(0.05)
        assert dropped
    finally:
        client.close()


class FakeConnection(object):
    def __init__(self):
        self.expired = threading.Event()
        self.report = "not called"

    def negotiation_expired(self, report):
        self.report = report
        self.expired.set()


def test_watchdog_expires_connections_and_logs_the_first_only():
    watchdog = HandshakeWatchdog(0.05)
    first, second = FakeConnection(), FakeConnection()
    try:
        for connection in (first, second):
            with pytest.raises(NegotiationExpired):
                with watchdog.watch(connection):
                    assert connection.expired.wait(30)
    finally:
        watchdog.stop()
    # The first says so; the next, within a minute, is only counted.
    assert first.report == 0 and second.report is None
    assert watchdog._unreported == 1


def test_time_the_server_works_for_the_client_does_not_count():
    watchdog = HandshakeWatchdog(0.5)
    connection = FakeConnection()
    try:
        with watchdog.watch(connection) as timer:
            with timer.paused():
                time.sleep(0.8)     # a disk slow to open
        assert not connection.expired.is_set()
    finally:
        watchdog.stop()


def test_no_limit_means_no_thread():
    watchdog = HandshakeWatchdog(0)
    with watchdog.watch(FakeConnection()) as timer:
        with timer.paused():
            pass
    assert watchdog._thread is None


# ---------------------------------------------------------------------------
# --max-connections


def test_clients_beyond_the_cap_are_refused(start_server, disk):
    server = start_server("--max-connections=2", *disk)
    first, second = connect(server), connect(server)
    try:
        assert greeted(first) and greeted(second)
        third = connect(server)
        assert not greeted(third)
        third.close()
        first.close()
        # Once the first has gone, there is room again.
        deadline = time.time() + 30
        while True:
            fourth = connect(server)
            if greeted(fourth):
                break
            fourth.close()
            assert time.time() < deadline, "no room after a client left"
            time.sleep(0.05)
        fourth.close()
    finally:
        first.close()
        second.close()
    assert "refused 1 more" in server.log()


def test_a_flood_of_idle_clients_is_bounded_and_leaves_nothing(start_server,
                                                               disk):
    cap = 20
    server = start_server("--handshake-limit=1",
                          "--max-connections=%d" % cap, *disk)
    idle = idle_counts(server)
    socks = [connect(server) for _ in range(3 * cap)]
    try:
        answered = sum(greeted(sock) for sock in socks)
        threads, _ = threads_and_descriptors(server.proc.pid)
        # One thread per admitted connection, no more.
        assert answered <= cap and threads <= idle[0] + cap
        assert all(hung_up(sock) for sock in socks)
    finally:
        for sock in socks:
            sock.close()
    assert settles_at(server.proc.pid, idle) == idle
    # One line in the log for the lot, not one per client.
    assert server.log().count("still negotiating") == 1
    # ... and the server still serves.
    client = NbdClient.unix(server.sock)
    client.greet()
    assert client.go() == 1024 * 1024
    client.close()

