"""--filter=limit: side by side with nbdkit's, a client beyond the limit
is turned away before the handshake, and a place frees when one leaves."""

import subprocess
import time

import pytest

from conftest import CLIENT_ENV, need, run
from filter_oracle import side_by_side

HOLD = ("import sys\n"
        "print('connected', flush=True)\n"
        "sys.stdin.read()\n")


class HeldConnection(object):
    """A client that stays connected until released."""

    def __init__(self, uri):
        need("nbdsh")
        self.proc = subprocess.Popen(
            ["nbdsh", "-u", uri, "-c", HOLD], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CLIENT_ENV)
        line = self.proc.stdout.readline()
        assert line == b"connected\n", self.proc.stderr.read()

    def release(self):
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0


def connects(uri):
    return run([need("nbdinfo"), "--size", uri], check=False).returncode == 0


def eventually_connects(uri, timeout=20):
    deadline = time.monotonic() + timeout
    while not connects(uri):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("limit,clients_at_once", [
    ([], 1), (["limit=2"], 2), (["limit=0"], 4)])
def test_same_as_nbdkit(tmp_path, start_server, start_nbdkit, limit,
                        clients_at_once):
    pair = side_by_side(tmp_path, start_server, start_nbdkit, bytes(65536),
                        ["--filter=limit"], limit)
    for server in (pair.ours, pair.theirs):
        held = [HeldConnection(server.uri)
                for _ in range(min(clients_at_once, 3))]
        assert connects(server.uri) == (clients_at_once > len(held)), \
            server.uri
        held.pop().release()
        # A place is free again once the server has seen the client go
        # (a moment after the client's process ends).
        assert eventually_connects(server.uri)
        for connection in held:
            connection.release()
    refused = clients_at_once <= 3
    assert ("limit: too many clients" in pair.ours.log()) == refused


def test_the_refusal_comes_before_the_handshake(tmp_path, start_server):
    from filter_oracle import flat_vmdk
    server = start_server("--filter=limit",
                          flat_vmdk(str(tmp_path), "d", bytes(4096))[0])
    held = HeldConnection(server.uri)
    import socket
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(server.sock)
        sock.settimeout(20)
        # No greeting: the server closes at once.
        assert sock.recv(8) == b""
    held.release()
    assert "limit: too many clients connected (limit=1)" in server.log()
