"""--thumbprint HOST[:PORT]: print the fingerprints of a server's TLS
certificate, in the form thumbprint= takes.

Nothing is verified: the point is to read the certificate of a server
whose certificate is not trusted yet.  The user compares the answer with
one obtained another way (the host's console) before relying on it.
"""

import hashlib
import socket
import ssl
import sys

from .engine import UsageError

HTTPS_PORT = 443
TIMEOUT_SECONDS = 20


def parse_target(text):
    """(host, port) from HOST, HOST:PORT, [IPV6] or [IPV6]:PORT (a bare
    IPv6 address, with several colons, has no port)."""
    host, port = text, HTTPS_PORT
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            host = ""
        elif rest:
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host:
        raise UsageError("--thumbprint: %r is not HOST or HOST:PORT (for "
                         "example --thumbprint esxi.example.com)" % text)
    if isinstance(port, str):
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise UsageError("--thumbprint: %r is not a port number (use 1 "
                             "to 65535; ESXi and vCenter use 443)" % port)
        port = int(port)
    return host, port


def colon_hex(digest):
    """VDDK's spelling: upper-case hex pairs separated by colons."""
    return ":".join("%02X" % byte for byte in bytearray(digest))


def fetch_certificate(host, port, timeout=TIMEOUT_SECONDS):
    """The server's certificate (DER bytes), or UsageError saying why
    there is none."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        # Old ESXi hosts may use keys or algorithms that OpenSSL's default
        # security level refuses: only a certificate is read, no data.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    where = "%s port %d" % (host, port)
    try:
        sock = socket.create_connection((host, port), timeout)
    except socket.gaierror as e:
        raise UsageError("--thumbprint: cannot resolve %s: %s (check the "
                         "host name)" % (host, e.strerror))
    except socket.timeout:
        raise UsageError("--thumbprint: %s did not answer within %d seconds "
                         "(check the host, the port and any firewall)"
                         % (where, timeout))
    except OSError as e:
        raise UsageError("--thumbprint: cannot connect to %s: %s (check the "
                         "host, the port and any firewall)"
                         % (where, e.strerror or e))
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            certificate = tls.getpeercert(binary_form=True)
    except (ssl.SSLError, OSError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) \
            or str(e) or type(e).__name__
        raise UsageError("--thumbprint: %s does not answer TLS (%s); ESXi "
                         "and vCenter answer on port %d"
                         % (where, reason, HTTPS_PORT))
    finally:
        sock.close()
    if not certificate:
        raise UsageError("--thumbprint: %s sent no certificate" % where)
    return certificate


def report_lines(certificate):
    return ["thumbprint=%s" % colon_hex(hashlib.sha1(certificate).digest()),
            "sha256=%s" % colon_hex(hashlib.sha256(certificate).digest())]


def main(target):
    """Print the lines for ``target``; the exit status."""
    host, port = parse_target(target)
    lines = report_lines(fetch_certificate(host, port))
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0
