"""Certificates for TLS tests, made with openssl once per test session
(tools/testpki.py): ``pki`` is a testpki.PKI."""

import pytest

from conftest import need
from testpki import PKI


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    need("openssl")
    return PKI(tmp_path_factory.mktemp("pki"))


def tls_uri(sock, directory, export=""):
    """libnbd's URI for a Unix socket with TLS and these certificates."""
    return "nbds+unix:///%s?socket=%s&tls-certificates=%s" % (
        export, sock, directory)
