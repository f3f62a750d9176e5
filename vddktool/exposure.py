"""The options that decide who may connect and what a connection may
cost: TLS (nbdkit's --tls, --tls-certificates, --tls-verify-peer,
--tls-psk) and the limits (qemu-nbd's --handshake-limit, and
--max-connections).  cli.py hands these options here and passes what
``server_settings`` returns to the server.
"""

from .engine import UsageError
from .tls import MODES, TlsSettings

LONG_OPTIONS = ["tls=", "tls-certificates=", "tls-verify-peer", "tls-psk=",
                "handshake-limit=", "max-connections="]

# qemu-nbd's default since CVE-2024-7409: a client that has not finished
# negotiating after this long is dropped.
DEFAULT_HANDSHAKE_LIMIT = 10.0
# Connections served at once; more are accepted and closed at once.
DEFAULT_MAX_CONNECTIONS = 256

HELP_OPTIONS = """\
  --tls=off|on|require  TLS: none (default), offered, or required
  --tls-certificates DIR  server-cert.pem, server-key.pem, ca-cert.pem
  --tls-verify-peer     require a client certificate signed by the CA
  --tls-psk FILE        TLS with pre-shared keys (USERNAME:HEXKEY lines)
  --handshake-limit SECONDS  drop clients still negotiating (default 10)
  --max-connections N   clients served at once (default 256)
"""


class ExposureOptions(object):
    def __init__(self):
        self.tls = TlsSettings()
        self.handshake_limit = DEFAULT_HANDSHAKE_LIMIT
        self.max_connections = DEFAULT_MAX_CONNECTIONS


def apply_option(options, option, value):
    """Take one of LONG_OPTIONS; False for any other option."""
    tls = options.tls
    if option == "--tls":
        if value not in MODES:
            raise UsageError("--tls: %r is not one of %s (use --tls=require "
                             "to insist on TLS)" % (value, ", ".join(MODES)))
        tls.mode = value
    elif option == "--tls-certificates":
        tls.certificates = _nonempty(option, value)
    elif option == "--tls-verify-peer":
        tls.verify_peer = True
    elif option == "--tls-psk":
        tls.psk_file = _nonempty(option, value)
    elif option == "--handshake-limit":
        options.handshake_limit = parse_seconds(option, value)
    elif option == "--max-connections":
        options.max_connections = parse_count(option, value)
    else:
        return False
    return True


def _nonempty(option, value):
    if not value:
        raise UsageError("%s: needs a value (see --help)" % option)
    return value


def parse_seconds(option, value):
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 1e9:
        raise UsageError("%s: %r is not a number of seconds (use 0 for no "
                         "limit, or for example %s=10)" % (option, value,
                                                           option))
    return seconds


def parse_count(option, value):
    if not value.isdigit() or int(value) < 1:
        raise UsageError("%s: %r is not a number of connections (use a "
                         "whole number of 1 or more, for example %s=256)"
                         % (option, value, option))
    return int(value)


def server_settings(options):
    """Check the options (files are read now, while errors can still
    reach the terminal) -> keyword arguments for ServerSettings."""
    return {
        "tls": options.tls.mode,
        "tls_context": options.tls.server_context(),
        "handshake_limit": options.handshake_limit,
        "max_connections": options.max_connections,
    }
