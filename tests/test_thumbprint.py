"""--thumbprint HOST[:PORT] prints a server's certificate fingerprints in
the form thumbprint= takes, checked against openssl on a local TLS server
that the test starts."""

import socket
import ssl
import threading

import pytest

from conftest import free_tcp_port, need, run, vddktool
from vddktool import thumbprint
from vddktool.engine import UsageError


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate and key made by openssl: (cert, key)."""
    need("openssl")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
         "-keyout", key, "-out", cert, "-days", "2", "-subj",
         "/CN=esxi.example.com"])
    return cert, key


def openssl_fingerprint(cert, digest):
    out = run(["openssl", "x509", "-in", cert, "-noout", "-fingerprint",
               "-" + digest]).stdout.strip()
    return out.split("=", 1)[1]


class Listener(object):
    """A loopback server answering each connection with ``answer``
    (which gets the accepted socket), in a thread, until stopped."""

    def __init__(self, answer):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.thread = threading.Thread(target=self._serve)
        self.thread.daemon = True
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                self.answer(conn)
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def stop(self):
        try:
            # Wakes the accept() (close alone does not, on Linux).
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def tls_server(certificate):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)

    def handshake(conn):
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)
    server = Listener(handshake)
    yield server
    server.stop()


@pytest.fixture
def plain_server():
    """Speaks HTTP without TLS, as a wrong port might."""
    def answer(conn):
        conn.recv(4096)
        conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
    server = Listener(answer)
    yield server
    server.stop()


def test_prints_the_sha1_and_sha256_fingerprints(certificate, tls_server):
    proc = vddktool("--thumbprint", "127.0.0.1:%d" % tls_server.port)
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [
        "thumbprint=" + openssl_fingerprint(certificate[0], "sha1"),
        "sha256=" + openssl_fingerprint(certificate[0], "sha256")]
    assert proc.stderr == ""


def test_the_sha1_line_is_vddks_form(tls_server):
    line = vddktool("--thumbprint=localhost:%d" % tls_server.port) \
        .stdout.splitlines()[0]
    value = line[len("thumbprint="):]
    pairs = value.split(":")
    assert len(pairs) == 20
    assert all(len(p) == 2 and p == p.upper() for p in pairs)
    int(value.replace(":", ""), 16)


def one_error_line(*args):
    proc = vddktool(*args, check=False)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_a_server_without_tls_is_one_clear_line(plain_server):
    line = one_error_line("--thumbprint", "127.0.0.1:%d" % plain_server.port)
    assert line.startswith("vddktool: --thumbprint: 127.0.0.1 port %d does "
                           "not answer TLS (" % plain_server.port)


def test_nothing_listening_is_one_clear_line():
    port = free_tcp_port()
    line = one_error_line("--thumbprint", "127.0.0.1:%d" % port)
    assert line.startswith("vddktool: --thumbprint: cannot connect to "
                           "127.0.0.1 port %d: " % port)


def test_a_bad_port_is_one_clear_line():
    line = one_error_line("--thumbprint", "esxi.example.com:https")
    assert line == ("vddktool: --thumbprint: 'https' is not a port number "
                    "(use 1 to 65535; ESXi and vCenter use 443)")


@pytest.mark.parametrize("text,target", [
    ("esxi.example.com", ("esxi.example.com", 443)),
    ("esxi.example.com:8443", ("esxi.example.com", 8443)),
    ("192.0.2.7", ("192.0.2.7", 443)),
    ("[2001:db8::7]:9443", ("2001:db8::7", 9443)),
    ("[2001:db8::7]", ("2001:db8::7", 443)),
    ("2001:db8::7", ("2001:db8::7", 443)),
])
def test_targets(text, target):
    assert thumbprint.parse_target(text) == target


@pytest.mark.parametrize("text", ["", ":443", "[::1", "[::1]x", "h:0",
                                  "h:70000"])
def test_bad_targets(text):
    with pytest.raises(UsageError):
        thumbprint.parse_target(text)
