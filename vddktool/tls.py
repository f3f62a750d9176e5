"""TLS settings and the server's ssl.SSLContext, from nbdkit's options.

``--tls=off|on|require``, ``--tls-certificates=DIR`` (nbdkit's file
names), ``--tls-verify-peer`` and ``--tls-psk=FILE`` (nbdkit's
``username:hexkey`` lines).  Everything is checked when the server
starts, so a missing file or a bad key is one line on the terminal,
never a failed handshake later in a daemon's log.  Only the standard
library's ``ssl`` module is used.
"""

import os
import stat
import sys

from . import log
from .engine import UsageError

MODES = ("off", "on", "require")

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"

# Where nbdkit looks when no directory is given: root in the system's
# directory, anyone else in their own.
SYSTEM_CERTIFICATES = "/etc/pki/nbdkit"
USER_CERTIFICATES = (os.path.join(".pki", "nbdkit"),
                     os.path.join(".config", "pki", "nbdkit"))

# ssl.SSLContext.set_psk_server_callback arrived in Python 3.13.
PSK_PYTHON = (3, 13)

# TLS 1.2 ciphers for PSK clients (TLS 1.3 brings its own suites): the
# authenticated-encryption ones only.
PSK_TLS12_CIPHERS = "PSK+AESGCM:PSK+CHACHA20"


def _ssl():
    """The ssl module, or a usage error on a Python built without it."""
    try:
        import ssl
    except ImportError:
        raise UsageError("--tls: this Python has no ssl module (use a "
                         "Python built with OpenSSL, or --tls=off)")
    return ssl


def default_certificate_dirs(euid=None, home=None):
    """The directories nbdkit searches, in order."""
    if euid is None:
        euid = os.geteuid()
    if euid == 0:
        return [SYSTEM_CERTIFICATES]
    if home is None:
        home = os.environ.get("HOME", "")
    return [os.path.join(home, path) for path in USER_CERTIFICATES] \
        if home else []


def _has_server_files(directory):
    return all(os.path.isfile(os.path.join(directory, name))
               for name in (SERVER_CERT, SERVER_KEY))


def find_certificates(given, mode):
    """The certificate directory to use: ``given``, checked, or the first
    default one holding a server certificate and key."""
    if given:
        directory = os.path.abspath(given)
        if not os.path.isdir(directory):
            raise UsageError("--tls-certificates=%s: no such directory (give "
                             "the directory holding %s and %s)"
                             % (given, SERVER_CERT, SERVER_KEY))
        for name in (SERVER_CERT, SERVER_KEY):
            if not os.path.isfile(os.path.join(directory, name)):
                raise UsageError("--tls-certificates=%s: %s is missing (put "
                                 "the server's certificate and key there as "
                                 "%s and %s)" % (given, name, SERVER_CERT,
                                                 SERVER_KEY))
        return directory
    tried = default_certificate_dirs()
    for directory in tried:
        if _has_server_files(directory):
            return directory
    if not tried:
        raise UsageError("--tls=%s: no certificate directory given and $HOME "
                         "is not set (give --tls-certificates=DIR or "
                         "--tls-psk=FILE)" % mode)
    raise UsageError("--tls=%s: no certificates found in %s (put %s and %s "
                     "there, or give --tls-certificates=DIR or "
                     "--tls-psk=FILE)" % (mode, " or ".join(tried),
                                          SERVER_CERT, SERVER_KEY))


def _warn_if_others_can_read(path, option):
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s: %s can be read by other users (chmod 600 it)",
                    option, path)


def read_psk_file(path):
    """nbdkit's PSK file: ``username:hexkey`` per line -> {user: key}.
    Errors name the line, never its key."""
    option = "--tls-psk=%s" % path
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise UsageError("%s: cannot read it: %s (give a readable file of "
                         "USERNAME:HEXKEY lines)" % (option, exc.strerror))
    keys = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        user, sep, hexkey = line.partition(b":")
        try:
            user = user.decode("utf-8")
            key = bytes.fromhex(hexkey.decode("ascii")) if sep else b""
        except (UnicodeDecodeError, ValueError):
            key = b""
        if not user or not key:
            raise UsageError("%s: line %d is not USERNAME:HEXKEY (a name, a "
                             "colon, then the key in hex digits)"
                             % (option, number))
        if user in keys:
            raise UsageError("%s: line %d: user %r appears twice (keep one "
                             "line per user)" % (option, number, user))
        keys[user] = key
    if not keys:
        raise UsageError("%s: the file holds no keys (add USERNAME:HEXKEY "
                         "lines)" % option)
    _warn_if_others_can_read(path, "--tls-psk")
    return keys


class TlsSettings(object):
    """What the --tls options say; ``server_context()`` checks it all and
    returns the SSLContext every TLS connection is made from (None when
    TLS is off)."""

    def __init__(self):
        self.mode = "off"
        self.certificates = None
        self.verify_peer = False
        self.psk_file = None

    def server_context(self):
        if self.mode == "off":
            for given, name in ((self.certificates, "--tls-certificates"),
                                (self.psk_file, "--tls-psk"),
                                (self.verify_peer, "--tls-verify-peer")):
                if given:
                    log.warning("%s: ignored, TLS is off (add --tls=require "
                                "to use it)", name)
            return None
        ssl = _ssl()
        if self.psk_file:
            return _psk_context(ssl, self.psk_file)
        directory = find_certificates(self.certificates, self.mode)
        return _certificate_context(ssl, directory, self.verify_peer)


def _new_context(ssl):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # The NBD spec: TLS 1.2 or later unless configured otherwise.
    if hasattr(context, "minimum_version"):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    else:   # Python 3.6
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
    # A client asking to renegotiate could make the server redo costly
    # handshakes at will; nbdkit's clients never ask.
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    return context


def _certificate_context(ssl, directory, verify_peer):
    option = "--tls-certificates=%s" % directory
    context = _new_context(ssl)
    cert = os.path.join(directory, SERVER_CERT)
    key = os.path.join(directory, SERVER_KEY)
    asked = []

    def no_passphrase():
        # Never prompt (a daemon has no terminal): say so instead.  An
        # exception raised here would not get through on Python 3.6.
        asked.append(True)
        return b""

    try:
        context.load_cert_chain(cert, key, password=no_passphrase)
    except (ssl.SSLError, OSError) as exc:
        if asked:
            raise UsageError("%s: %s is protected by a passphrase (store it "
                             "unencrypted, readable only by the server's "
                             "user)" % (option, SERVER_KEY))
        raise UsageError("%s: cannot use %s with %s: %s (check that both "
                         "are PEM files and that the key belongs to the "
                         "certificate)" % (option, SERVER_CERT, SERVER_KEY,
                                           _reason(exc)))
    _warn_if_others_can_read(key, "--tls-certificates")
    if verify_peer:
        ca = os.path.join(directory, CA_CERT)
        if not os.path.isfile(ca):
            raise UsageError("%s: %s is missing (--tls-verify-peer checks "
                             "clients against it: put the CA's certificate "
                             "there)" % (option, CA_CERT))
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            raise UsageError("%s: cannot use %s: %s (it must hold PEM "
                             "certificates)" % (option, CA_CERT,
                                                _reason(exc)))
        crl = os.path.join(directory, CA_CRL)
        if os.path.isfile(crl):
            try:
                context.load_verify_locations(cafile=crl)
            except (ssl.SSLError, OSError) as exc:
                raise UsageError("%s: cannot use %s: %s (it must be a PEM "
                                 "certificate revocation list, or remove "
                                 "it)" % (option, CA_CRL, _reason(exc)))
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _psk_context(ssl, path):
    if not hasattr(ssl.SSLContext, "set_psk_server_callback") \
            or not getattr(ssl, "HAS_PSK", False):
        raise UsageError("--tls-psk: TLS-PSK needs Python %d.%d or newer "
                         "built with PSK support; this is Python %d.%d (run "
                         "vddktool with a newer python3, or use "
                         "--tls-certificates)"
                         % (PSK_PYTHON + tuple(sys.version_info[:2])))
    keys = read_psk_file(path)
    context = _new_context(ssl)
    context.set_ciphers(PSK_TLS12_CIPHERS)

    def lookup(identity):
        # An empty key refuses the handshake: unknown users get no hint.
        key = keys.get(identity or "", b"")
        if not key and log.verbose():
            log.debug("TLS-PSK: unknown user %r", identity)
        return key

    context.set_psk_server_callback(lookup)
    return context


def _reason(exc):
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) \
        or str(exc)
