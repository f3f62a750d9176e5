"""The options that decide who may connect: TLS (nbdkit's --tls,
--tls-certificates, --tls-verify-peer, --tls-psk).  cli.py hands these
options here and passes what ``server_settings`` returns to the server.
"""

from .engine import UsageError
from .tls import MODES, TlsSettings

LONG_OPTIONS = ["tls=", "tls-certificates=", "tls-verify-peer", "tls-psk="]

HELP_OPTIONS = """\
  --tls=off|on|require  TLS: none (default), offered, or required
  --tls-certificates DIR  server-cert.pem, server-key.pem, ca-cert.pem
  --tls-verify-peer     require a client certificate signed by the CA
  --tls-psk FILE        TLS with pre-shared keys (USERNAME:HEXKEY lines)
"""


class ExposureOptions(object):
    def __init__(self):
        self.tls = TlsSettings()


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
    else:
        return False
    return True


def _nonempty(option, value):
    if not value:
        raise UsageError("%s: needs a value (see --help)" % option)
    return value


def server_settings(options):
    """Check the options (files are read now, while errors can still
    reach the terminal) -> keyword arguments for ServerSettings."""
    return {
        "tls": options.tls.mode,
        "tls_context": options.tls.server_context(),
    }
