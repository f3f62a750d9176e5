"""A VixDiskLib connection (ConnectEx) and the ConnectParams it was made
with: VDDK may keep pointers into them until Disconnect."""

import ctypes
import errno

from .. import log
from ..engine import EngineError
from . import abi


def encode(text):
    return None if text is None else text.encode("utf-8")


def secret_text(secret):
    return None if secret is None else secret.value


class Connection(object):
    """Connected (ConnectEx) with ``settings``: the parsed parameters, or
    {} for a local disk."""

    STRING_FIELDS = ("vmxSpec", "serverName", "thumbPrint")

    def __init__(self, lib, settings, readonly):
        self.lib = lib
        self._allocated = None
        if lib.has("AllocateConnectParams"):
            self._allocated = lib.call("AllocateConnectParams")
            if not self._allocated:
                raise EngineError(errno.ENOMEM,
                                  "VixDiskLib_AllocateConnectParams failed")
            # This one object keeps our strings alive: keep it, not a
            # fresh .contents each time.
            self.params = self._allocated.contents
        else:
            self.params = abi.ConnectParams()
        self._fill(settings)
        self.handle = abi.ConnectionPtr()
        try:
            lib.check("ConnectEx", ctypes.byref(self.params),
                      b"\x01" if readonly else b"\x00",
                      encode(settings.get("snapshot")),
                      encode(settings.get("transports")),
                      ctypes.byref(self.handle))
        except Exception:
            self._free_params()
            raise

    def _fill(self, settings):
        p = self.params
        if settings.get("server") is None:
            return      # local: no server, no credentials
        p.vmxSpec = encode(settings.get("vm"))
        p.serverName = encode(settings["server"])
        p.thumbPrint = encode(settings.get("thumbprint"))
        cookie = secret_text(settings.get("cookie"))
        if cookie is not None:
            p.credType = abi.CRED_SESSIONID
            p.creds.sessionId.cookie = encode(cookie)
            p.creds.sessionId.userName = encode(settings.get("user"))
        else:
            p.credType = abi.CRED_UID
            p.creds.uid.userName = encode(settings.get("user"))
            p.creds.uid.password = encode(
                secret_text(settings.get("password")))
        p.port = settings.get("port") or 0
        p.nfcHostPort = settings.get("nfchostport") or 0
        p.specType = abi.SPEC_VMX

    def _free_params(self):
        if self._allocated is None:
            return
        # The strings are ours (Python's), not the library's: unhook them
        # so FreeConnectParams cannot free them.
        p = self.params
        for name in self.STRING_FIELDS:
            setattr(p, name, None)
        ctypes.memset(ctypes.addressof(p) + abi.ConnectParams.creds.offset,
                      0, ctypes.sizeof(abi.Creds))
        self.lib.call("FreeConnectParams", self._allocated)
        self._allocated = None

    def create_disk(self, path, create_params):
        self.lib.check("Create", self.handle, encode(path),
                       ctypes.byref(create_params), None, None)

    def close(self):
        try:
            if self.handle:
                err = self.lib.call("Disconnect", self.handle)
                if err != abi.VIX_OK:
                    log.error("%s", self.lib.error("Disconnect", err))
                self.handle = abi.ConnectionPtr()
        finally:
            self._free_params()
