"""TLS and limit options: where certificates are looked for, the PSK file,
and one clear line (exit 1, no traceback, no secret) for every mistake."""

import os
import shutil
import sys

import pytest

from conftest import ROOT, run, vddktool_cmd
from test_cli import fails
from tls_fixtures import pki  # noqa: F401 (fixture)
from vddktool import exposure, tls
from vddktool.engine import UsageError

HAS_PSK = sys.version_info >= tls.PSK_PYTHON
SECRET_KEY = "7a1b8f0c9d3e2f415263748596a7b8c9"


def test_default_directories_for_a_user_are_their_own():
    assert tls.default_certificate_dirs(euid=1000, home="/home/ann") == [
        "/home/ann/.pki/nbdkit", "/home/ann/.config/pki/nbdkit"]


def test_default_directory_for_root_is_the_system_one():
    assert tls.default_certificate_dirs(euid=0, home="/root") == [
        "/etc/pki/nbdkit"]


def test_no_certificates_found_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UsageError) as caught:
        tls.find_certificates(None, "require")
    message = str(caught.value)
    assert message.startswith("--tls=require: no certificates found in ")
    assert os.path.join(str(tmp_path), ".pki", "nbdkit") in message
    assert os.path.join(str(tmp_path), ".config", "pki", "nbdkit") in message


def test_root_looks_in_the_system_directory(monkeypatch, tmp_path, pki):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(tls, "SYSTEM_CERTIFICATES", str(tmp_path / "etc"))
    with pytest.raises(UsageError) as caught:
        tls.find_certificates(None, "on")
    assert str(tmp_path / "etc") in str(caught.value)
    monkeypatch.setattr(tls, "SYSTEM_CERTIFICATES", pki.server)
    assert tls.find_certificates(None, "on") == pki.server


def test_the_first_default_directory_with_a_key_wins(monkeypatch, tmp_path,
                                                     pki):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path))
    second = tmp_path / ".config" / "pki" / "nbdkit"
    shutil.copytree(pki.server, str(second))
    assert tls.find_certificates(None, "on") == str(second)
    first = tmp_path / ".pki" / "nbdkit"
    shutil.copytree(pki.server, str(first))
    assert tls.find_certificates(None, "on") == str(first)


def test_missing_directory(tmp_path):
    line = fails("--tls=require", "--tls-certificates=" + str(tmp_path / "x"),
                 "/x")
    assert "--tls-certificates=" in line and "no such directory" in line


def test_missing_key(tmp_path, pki):
    directory = tmp_path / "certs"
    shutil.copytree(pki.server, str(directory))
    os.unlink(str(directory / "server-key.pem"))
    line = fails("--tls=on", "--tls-certificates=" + str(directory), "/x")
    assert "server-key.pem is missing" in line


def test_a_key_that_is_not_the_certificates(tmp_path, pki):
    directory = tmp_path / "certs"
    shutil.copytree(pki.server, str(directory))
    shutil.copy(os.path.join(pki.client, "client-key.pem"),
                str(directory / "server-key.pem"))
    line = fails("--tls=on", "--tls-certificates=" + str(directory), "/x")
    assert "cannot use server-cert.pem with server-key.pem" in line


def test_an_encrypted_key_is_refused_without_a_prompt(tmp_path, pki):
    directory = tmp_path / "certs"
    shutil.copytree(pki.server, str(directory))
    key = str(directory / "server-key.pem")
    run(["openssl", "ec", "-in", key, "-out", key, "-aes256", "-passout",
         "pass:" + SECRET_KEY])
    line = fails("--tls=on", "--tls-certificates=" + str(directory), "/x",
                 input="")
    assert "protected by a passphrase" in line


def test_verify_peer_needs_the_ca(tmp_path, pki):
    directory = tmp_path / "certs"
    shutil.copytree(pki.server, str(directory))
    os.unlink(str(directory / "ca-cert.pem"))
    line = fails("--tls=require", "--tls-verify-peer",
                 "--tls-certificates=" + str(directory), "/x")
    assert "ca-cert.pem is missing" in line


@pytest.mark.parametrize("args, option", [
    (["--tls=maybe"], "--tls"),
    (["--handshake-limit=soon"], "--handshake-limit"),
    (["--handshake-limit=-1"], "--handshake-limit"),
    (["--max-connections=0"], "--max-connections"),
    (["--max-connections=many"], "--max-connections"),
])
def test_bad_values_name_their_option(args, option):
    assert fails(*(args + ["/x"])).startswith("vddktool: %s: " % option)


def test_limits_parse():
    options = exposure.ExposureOptions()
    assert options.handshake_limit == 10 and options.max_connections == 256
    exposure.apply_option(options, "--handshake-limit", "0")
    exposure.apply_option(options, "--max-connections", "3")
    assert options.handshake_limit == 0 and options.max_connections == 3
    assert not exposure.apply_option(options, "--port", "1")


# ---------------------------------------------------------------------------
# PSK files


def psk_file(tmp_path, text):
    path = str(tmp_path / "keys.psk")
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def test_psk_lines(tmp_path):
    path = psk_file(tmp_path, "alice:%s\n\nbob:00ff\n" % SECRET_KEY)
    assert tls.read_psk_file(path) == {"alice": bytes.fromhex(SECRET_KEY),
                                       "bob": b"\x00\xff"}


@pytest.mark.parametrize("text, line", [
    ("alice:%s\nbob %s\n" % (SECRET_KEY, SECRET_KEY), 2),
    ("alice:%sz\n" % SECRET_KEY, 1),
    (":%s\n" % SECRET_KEY, 1),
    ("alice:\n", 1),
    ("alice:%s\nalice:%s\n" % (SECRET_KEY, SECRET_KEY), 2),
])
def test_bad_psk_lines_are_named_without_their_key(tmp_path, text, line):
    path = psk_file(tmp_path, text)
    with pytest.raises(UsageError) as caught:
        tls.read_psk_file(path)
    message = str(caught.value)
    assert "line %d" % line in message
    assert SECRET_KEY not in message and SECRET_KEY[:8] not in message


def test_empty_psk_file(tmp_path):
    with pytest.raises(UsageError) as caught:
        tls.read_psk_file(psk_file(tmp_path, "\n"))
    assert "holds no keys" in str(caught.value)


def test_psk_on_the_command_line(tmp_path):
    path = psk_file(tmp_path, "alice:%s\nbob\n" % SECRET_KEY)
    line = fails("--tls=require", "--tls-psk=" + path, "/x")
    if HAS_PSK:
        assert "line 2 is not USERNAME:HEXKEY" in line
    else:
        # One line saying which Python TLS-PSK needs.
        assert "--tls-psk: TLS-PSK needs Python 3.13 or newer" in line
    assert SECRET_KEY not in line


def test_a_key_others_can_read_is_warned_about(tmp_path, pki):
    directory = tmp_path / "certs"
    shutil.copytree(pki.server, str(directory))
    os.chmod(str(directory / "server-key.pem"), 0o644)
    proc = run(vddktool_cmd("--tls=on", "--tls-certificates=" + str(directory),
                            "/nonexistent/disk.vmdk"), check=False, cwd=ROOT)
    assert "server-key.pem can be read by other users (chmod 600 it)" \
        in proc.stderr
    assert "BEGIN" not in proc.stderr
