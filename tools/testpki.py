"""Certificates for TLS tests and tools, made with openssl: a CA, a
server certificate for localhost, client certificates signed by the CA
and by another CA, and a revocation list.

``PKI(root)`` lays out directories as the programs want them:

  server        ca-cert.pem server-cert.pem server-key.pem   (vddktool,
                nbdkit: --tls-certificates)
  client        ca-cert.pem client-cert.pem client-key.pem   (libnbd's
                tls-certificates=, qemu's tls-creds-x509 dir=)
  anonymous     ca-cert.pem only: checks the server, shows no certificate
  stranger      a client certificate signed by another CA
  revoking      the server's files and a ca-crl.pem revoking the client

EC keys (P-256): quick to make, and every client here speaks them.
"""

import os
import subprocess

# Debian's openssl ahead of anything else on PATH.
ENV = dict(os.environ, PATH="/usr/bin:/bin:" + os.environ.get("PATH", ""))

SERVER_NAMES = "subjectAltName=DNS:localhost,IP:127.0.0.1\n" \
    "extendedKeyUsage=serverAuth\n"
CLIENT_NAMES = "extendedKeyUsage=clientAuth\n"


def _openssl(*args):
    subprocess.check_call(["openssl"] + list(args), env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _key_and_request(key, csr, subject):
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-subj", subject,
             "-keyout", key, "-out", csr)


def make_ca(directory, name):
    key = os.path.join(directory, name + "-key.pem")
    cert = os.path.join(directory, name + "-cert.pem")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-days", "30",
             "-subj", "/CN=%s" % name, "-keyout", key, "-out", cert)
    return key, cert


def sign(ca, key, cert, subject, extensions, work):
    """A key and a certificate for ``subject``, signed by ``ca``."""
    csr = os.path.join(work, os.path.basename(cert) + ".csr")
    ext = os.path.join(work, os.path.basename(cert) + ".ext")
    with open(ext, "w") as f:
        f.write(extensions)
    _key_and_request(key, csr, subject)
    ca_key, ca_cert = ca
    _openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key,
             "-CAcreateserial", "-days", "30", "-extfile", ext, "-out", cert)


class PKI(object):
    def __init__(self, root):
        self.root = str(root)
        work = self.path("work")
        self.ca = make_ca(work, "ca")
        other_ca = make_ca(work, "other-ca")
        self.server = self.path("server")
        self.client = self.path("client")
        self.anonymous = self.path("anonymous")
        self.stranger = self.path("stranger")
        for directory in (self.server, self.client, self.anonymous,
                          self.stranger):
            _copy(self.ca[1], os.path.join(directory, "ca-cert.pem"))
        sign(self.ca, os.path.join(self.server, "server-key.pem"),
             os.path.join(self.server, "server-cert.pem"), "/CN=localhost",
             SERVER_NAMES, work)
        sign(self.ca, os.path.join(self.client, "client-key.pem"),
             os.path.join(self.client, "client-cert.pem"), "/CN=client",
             CLIENT_NAMES, work)
        sign(other_ca, os.path.join(self.stranger, "client-key.pem"),
             os.path.join(self.stranger, "client-cert.pem"), "/CN=stranger",
             CLIENT_NAMES, work)
        self.revoking = self.path("revoking")
        for name in os.listdir(self.server):
            _copy(os.path.join(self.server, name),
                  os.path.join(self.revoking, name))
        self._revoke(os.path.join(self.client, "client-cert.pem"),
                     os.path.join(self.revoking, "ca-crl.pem"), work)
        for directory in (self.server, self.client, self.stranger,
                          self.revoking):
            for name in os.listdir(directory):
                if name.endswith("-key.pem"):
                    os.chmod(os.path.join(directory, name), 0o600)

    def _revoke(self, cert, crl, work):
        config = os.path.join(work, "ca.cnf")
        with open(config, "w") as f:
            f.write("[ca]\ndefault_ca = ca\n[ca]\n"
                    "database = %s/index.txt\ncrlnumber = %s/crlnumber\n"
                    "default_md = sha256\ndefault_crl_days = 30\n"
                    % (work, work))
        open(os.path.join(work, "index.txt"), "w").close()
        with open(os.path.join(work, "crlnumber"), "w") as f:
            f.write("01\n")
        ca_key, ca_cert = self.ca
        common = ["-config", config, "-keyfile", ca_key, "-cert", ca_cert]
        _openssl("ca", "-revoke", cert, *common)
        _openssl("ca", "-gencrl", "-out", crl, *common)

    def path(self, name):
        path = os.path.join(self.root, name)
        if not os.path.isdir(path):
            os.makedirs(path)
        return path


def _copy(source, target):
    with open(source, "rb") as f, open(target, "wb") as g:
        g.write(f.read())
