"""TLS with real clients: nbdinfo, nbdcopy and qemu-img over nbds+unix://
and nbds://, certificates made by openssl (tls_fixtures.py)."""

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import (ROOT, Server, free_tcp_port, need, run, vddktool,
                      vddktool_cmd)
from nbdclient import NbdClient, client_context
from tls_fixtures import pki, tls_uri  # noqa: F401 (fixture)
from vddktool import protocol as nbd
from vddktool import tls

MiB = 1024 * 1024


@pytest.fixture
def disk(tmp_path):
    """A 4 MiB sparse VMDK with data at 1 MiB; (path, its bytes)."""
    need("qemu-img")
    raw = str(tmp_path / "source.raw")
    data = bytearray(4 * MiB)
    data[MiB:MiB + 65536] = os.urandom(65536)
    with open(raw, "wb") as f:
        f.write(data)
    path = str(tmp_path / "disk.vmdk")
    run(["qemu-img", "convert", "-O", "vmdk", raw, path])
    return path, bytes(data)


def nbdinfo(uri, check=True):
    return run([need("nbdinfo"), uri], check=check)


def log_after(server, text, timeout=30):
    """The server's log once it holds ``text`` (the server may write it
    just after the client has gone), or as it is when time runs out."""
    deadline = time.time() + timeout
    while text not in server.log() and time.time() < deadline:
        time.sleep(0.02)
    return server.log()


def copy_out(uri, tmp_path):
    out = str(tmp_path / "copy.raw")
    run([need("nbdcopy"), uri, out])
    with open(out, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------
# --tls=require


def test_required_tls_serves_a_tls_client(start_server, pki, disk, tmp_path):
    path, data = disk
    server = start_server("--tls=require",
                          "--tls-certificates=" + pki.server, path)
    uri = tls_uri(server.sock, pki.client)
    assert "with TLS" in nbdinfo(uri).stdout
    assert copy_out(uri, tmp_path) == data


def test_required_tls_refuses_a_plain_client(start_server, pki, disk):
    server = start_server("--tls=require",
                          "--tls-certificates=" + pki.server, disk[0])
    proc = nbdinfo(server.uri, check=False)
    assert proc.returncode != 0
    assert "export-size" not in proc.stdout
    # The server goes on serving TLS clients.
    assert "with TLS" in nbdinfo(tls_uri(server.sock, pki.client)).stdout
    assert "Traceback" not in server.log()


def test_required_tls_lists_exports_only_after_the_upgrade(start_server, pki,
                                                           disk):
    server = start_server("--tls=require",
                          "--tls-certificates=" + pki.server, disk[0])
    plain = run([need("nbdinfo"), "--list", server.uri], check=False)
    assert plain.returncode != 0 and "VMDK" not in plain.stdout
    listed = run([need("nbdinfo"), "--list",
                  tls_uri(server.sock, pki.client)]).stdout
    assert "VMDK" in listed     # the export's description


def test_writes_over_tls_read_back(start_server, pki, tmp_path):
    target = str(tmp_path / "new.vmdk")
    server = start_server("--tls=require",
                          "--tls-certificates=" + pki.server, target,
                          "create=true", "create-size=8M")
    source = str(tmp_path / "source.raw")
    data = os.urandom(8 * MiB)
    with open(source, "wb") as f:
        f.write(data)
    uri = tls_uri(server.sock, pki.client)
    run([need("nbdcopy"), source, uri])
    assert copy_out(uri, tmp_path) == data


# ---------------------------------------------------------------------------
# --tls=on


def test_optional_tls_serves_plain_and_tls_clients(start_server, pki, disk):
    server = start_server("--tls=on", "--tls-certificates=" + pki.server,
                          disk[0])
    assert "without TLS" in nbdinfo(server.uri).stdout
    assert "with TLS" in nbdinfo(tls_uri(server.sock, pki.client)).stdout


def test_tls_off_refuses_starttls(start_server, pki, disk):
    server = start_server(disk[0])
    proc = nbdinfo(tls_uri(server.sock, pki.client), check=False)
    assert proc.returncode != 0
    assert "without TLS" in nbdinfo(server.uri).stdout


# ---------------------------------------------------------------------------
# --tls-verify-peer


@pytest.fixture
def verifying_server(start_server, pki, disk):
    return start_server("--tls=require", "--tls-verify-peer",
                        "--tls-certificates=" + pki.server, disk[0])


def test_a_client_certificate_signed_by_the_ca_gets_in(verifying_server,
                                                       pki, disk, tmp_path):
    uri = tls_uri(verifying_server.sock, pki.client)
    assert copy_out(uri, tmp_path) == disk[1]


@pytest.mark.parametrize("who", ["anonymous", "stranger"])
def test_other_clients_are_refused(verifying_server, pki, who):
    proc = nbdinfo(tls_uri(verifying_server.sock, getattr(pki, who)),
                   check=False)
    assert proc.returncode != 0 and "export-size" not in proc.stdout
    log_text = log_after(verifying_server, "TLS handshake failed")
    assert "TLS handshake failed" in log_text
    assert "Traceback" not in log_text
    # ... and the server still lets the right client in.
    assert "with TLS" in nbdinfo(tls_uri(verifying_server.sock,
                                         pki.client)).stdout


# ---------------------------------------------------------------------------
# TCP: nbds:// and qemu-img


@pytest.fixture
def tcp_server(tmp_path):
    started = []

    def start(*args):
        port = free_tcp_port()
        log_path = str(tmp_path / ("tcp%d.log" % len(started)))
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                vddktool_cmd("-f", "-i", "127.0.0.1", "-p", str(port),
                             *args),
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=log_file)
        server = Server(proc, None, log_path)
        server.port = port
        started.append(server)
        wait_for_port(port, proc)
        return server

    yield start
    for server in started:
        server.stop()


def wait_for_port(port, proc, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the server exited"
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("nothing listens on port %d" % port)


def test_nbds_over_tcp(tcp_server, pki, disk, tmp_path):
    server = tcp_server("--tls=require", "--tls-verify-peer",
                        "--tls-certificates=" + pki.server, disk[0])
    uri = "nbds://localhost:%d/?tls-certificates=%s" % (server.port,
                                                        pki.client)
    assert "with TLS" in nbdinfo(uri).stdout
    assert copy_out(uri, tmp_path) == disk[1]
    plain = nbdinfo("nbd://localhost:%d/" % server.port, check=False)
    assert plain.returncode != 0


def qemu_img_tls(args, port, directory):
    need("qemu-img")
    return run(["qemu-img"] + args[:1] + [
        "--object", "tls-creds-x509,id=tls0,endpoint=client,dir=" + directory,
        "--image-opts",
        "driver=nbd,server.type=inet,server.host=localhost,"
        "server.port=%d,tls-creds=tls0" % port] + args[1:], check=False)


def test_qemu_img_over_tls(tcp_server, pki, disk, tmp_path):
    server = tcp_server("--tls=require", "--tls-verify-peer",
                        "--tls-certificates=" + pki.server, disk[0])
    out = str(tmp_path / "qemu.raw")
    proc = qemu_img_tls(["convert", "-O", "raw", out], server.port,
                        pki.client)
    assert proc.returncode == 0, proc.stderr
    with open(out, "rb") as f:
        assert f.read() == disk[1]
    refused = qemu_img_tls(["info"], server.port, pki.stranger)
    assert refused.returncode != 0


# ---------------------------------------------------------------------------
# -s: TLS over a socket pair and over pipes


def test_tls_on_stdin_stdout_socket(pki, disk):
    # libnbd's connect_command hands the server one end of a socket pair.
    script = (
        "h.set_tls(nbd.TLS_REQUIRE)\n"
        "h.set_tls_certificates(%r)\n"
        "h.connect_command(%r)\n"
        "print(h.get_size(), h.get_tls_negotiated())\n"
    ) % (pki.client, vddktool_cmd("-s", "--tls=require",
                                  "--tls-certificates=" + pki.server,
                                  disk[0]))
    out = run([need("nbdsh"), "-c", script], cwd=ROOT).stdout.split()
    assert out == [str(4 * MiB), "True"]


def test_tls_on_stdin_stdout_pipes(pki, disk):
    proc = subprocess.Popen(
        vddktool_cmd("-s", "--tls=require", "--tls-verify-peer",
                     "--tls-certificates=" + pki.server, disk[0]),
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        client = NbdClient.pipes(proc.stdout.fileno(), proc.stdin.fileno())
        client.greet()
        client.starttls(client_context(pki.client))
        size = client.go()
        data = client.pread(65536, MiB).data
        client.disconnect()
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
    assert size == 4 * MiB
    assert data == disk[1][MiB:MiB + 65536]
    assert "Traceback" not in stderr


def test_tls_client_info_does_not_leak_secrets(start_server, pki, disk):
    # The server's key never appears in what the server prints.
    server = start_server("-v", "--tls=require",
                          "--tls-certificates=" + pki.server, disk[0])
    nbdinfo(tls_uri(server.sock, pki.client))
    with open(os.path.join(pki.server, "server-key.pem")) as f:
        key_lines = [line for line in f.read().splitlines()
                     if line and not line.startswith("-----")]
    log_text = server.log()
    assert "TLS started" in log_text
    assert not any(line in log_text for line in key_lines)



# ---------------------------------------------------------------------------
# TLS-PSK (Python 3.13 and newer)


def test_psk_with_libnbd(start_server, disk, tmp_path):
    keys = str(tmp_path / "keys.psk")
    with open(keys, "w") as f:
        f.write("alice:%s\n" % os.urandom(32).hex())
    os.chmod(keys, 0o600)
    args = ("--tls=require", "--tls-psk=" + keys, disk[0])
    if sys.version_info < tls.PSK_PYTHON:
        proc = vddktool(*args, check=False)
        assert proc.returncode == 1
        assert "needs Python 3.13 or newer" in proc.stderr
        return
    server = start_server(*args)

    def uri(user, key_file):
        return "nbds+unix://%s@/?socket=%s&tls-psk-file=%s" % (
            user, server.sock, key_file)

    assert "with TLS" in nbdinfo(uri("alice", keys)).stdout
    assert copy_out(uri("alice", keys), tmp_path) == disk[1]
    # An unknown user, and the right user with another key, are refused.
    assert nbdinfo(uri("mallory", keys), check=False).returncode != 0
    other = str(tmp_path / "other.psk")
    with open(other, "w") as f:
        f.write("alice:%s\n" % os.urandom(32).hex())
    assert nbdinfo(uri("alice", other), check=False).returncode != 0
    assert "Traceback" not in server.log()


def test_run_gets_an_nbds_uri_when_tls_is_required(pki, disk):
    # As nbdkit: $uri says nbds, and the command adds its certificates.
    proc = vddktool("-U", "-", "--tls=require",
                    "--tls-certificates=" + pki.server, disk[0], "--run",
                    'echo "$tls $uri"; nbdinfo --size '
                    '"$uri&tls-certificates=%s"' % pki.client)
    tls_mode, uri, size = proc.stdout.split()
    assert tls_mode == "2" and uri.startswith("nbds+unix:///?socket=")
    assert size == str(4 * MiB)


def test_a_revoked_client_certificate_is_refused(start_server, pki, disk):
    # ca-crl.pem next to the CA revokes the otherwise good client.
    server = start_server("--tls=require", "--tls-verify-peer",
                          "--tls-certificates=" + pki.revoking, disk[0])
    proc = nbdinfo(tls_uri(server.sock, pki.client), check=False)
    assert proc.returncode != 0 and "export-size" not in proc.stdout
    log_text = log_after(server, "TLS handshake failed")
    assert "TLS handshake failed: certificate verify failed" in log_text
    if sys.version_info >= (3, 7):     # 3.6 does not say why
        assert "certificate revoked" in log_text


def test_engines_learn_whether_the_client_is_on_tls(tmp_path, pki):
    # nbdkit passes is_tls to open and list_exports; so does vddktool.
    from inprocess import serving
    from vddktool.tls import TlsSettings
    from vddktool.vmdk.backend import NativeBackend

    seen = []

    class Recording(NativeBackend):
        def list_exports(self, is_tls=False):
            seen.append(("list", is_tls))
            return super().list_exports(is_tls)

        def open(self, export_name, readonly, is_tls=False):
            seen.append(("open", is_tls))
            return super().open(export_name, readonly, is_tls)

    need("qemu-img")
    disk = str(tmp_path / "disk.vmdk")
    run(["qemu-img", "create", "-q", "-f", "vmdk", disk, "1M"])
    backend = Recording({"file": disk})
    backend.get_ready()
    settings = TlsSettings()
    settings.mode, settings.certificates = "on", pki.server
    try:
        with serving(backend, tmp_path, tls="on",
                     tls_context=settings.server_context()) as uri:
            sock = uri.split("socket=")[1]
            for context in (None, client_context(pki.client)):
                client = NbdClient.unix(sock)
                client.greet()
                if context is not None:
                    client.starttls(context)
                client.option(nbd.OPT_LIST)
                client.replies_until_final()
                client.go()
                client.disconnect()
                client.close()
    finally:
        backend.cleanup()
    assert seen == [("list", False), ("open", False),
                    ("list", True), ("open", True)]
