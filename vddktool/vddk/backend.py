"""The VDDK backend: serves local or remote VMware disks through
libvixDiskLib (one open disk, the engine, is in disk.py).

Order of events (see engine.Backend): config_complete checks the parameters
and finds the library; get_ready re-executes with LD_LIBRARY_PATH if needed,
loads it and, for create=true, creates the disk in a short-lived child;
after_fork calls InitEx (VDDK's threads would not survive the daemonizing
fork); open connects and opens the disk once per NBD connection.
"""

import ctypes
import errno
import os

from .. import log, params as paramtable
from ..engine import Backend, EngineError, UsageError
from . import abi
from .connect import Connection, encode, secret_text
from .disk import OPEN_CLOSE_LOCK, SECTOR, VddkEngine
from .library import (DEFAULT_LIBDIR, Library, VddkError, find_library,
                      loaded_path, require_library)
from .reexec import (reexec_if_needed, recover_secrets,
                     restore_caller_environment)
from .settings import check_settings, explain_open_failure
from .stats import STATS
from .wildcard import climbs_out, wildcard_matches

# The API level we ask InitEx for: the oldest VDDK we support (6.7).
API_MAJOR, API_MINOR = 6, 7


class VddkBackend(Backend):
    name = "vddk"

    def __init__(self, params, readonly=False):
        super().__init__(params, readonly)
        self.lib = None
        self.library_path = None
        self.major = None
        self.messages = None
        self.initialized = False

    # --- configuration ------------------------------------------------
    def _get(self, name):
        return self.params.get(name)

    def is_remote(self):
        return paramtable.is_remote(self.params)

    def config_complete(self):
        recover_secrets(self.params)
        check_settings(self.params)
        self.library_path, self.major = require_library(self._get("libdir"))

    def get_ready(self):
        if self.library_path is None:
            self.library_path, self.major = require_library(
                self._get("libdir"))
        reexec_if_needed(os.path.dirname(self.library_path), self.params)
        self.lib = Library(self.library_path, self.major)
        restore_caller_environment()
        log.debug("VDDK library %s (major version %d)", self.library_path,
                  self.major)
        if not self.lib.has("QueryAllocatedBlocks"):
            log.debug("this VDDK has no VixDiskLib_QueryAllocatedBlocks: "
                      "extents are not available")
        if self._get("create"):
            self._create_disk_in_child()

    def _init_library(self):
        secrets = [secret_text(self._get(name))
                   for name in ("password", "cookie")]
        self.messages = abi.MessageRouter(secrets)
        self.lib.check("InitEx", API_MAJOR, API_MINOR,
                       self.messages.log_func, self.messages.warn_func,
                       self.messages.panic_func,
                       encode(self._get("libdir") or DEFAULT_LIBDIR),
                       encode(self._get("config")))

    def after_fork(self):
        if self.lib is None:
            self.get_ready()
        self._init_library()
        self.initialized = True

    def _create_disk_in_child(self):
        """create=true, done before daemonizing so that a failure reaches
        the terminal, yet in a throw-away child: this process must not
        call InitEx before it forks (VDDK's threads would be lost)."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(read_fd)
                self._init_library()
                try:
                    self._create_disk()
                finally:
                    self.lib.call("Exit")
                status = 0
            except BaseException as e:
                os.write(write_fd, str(e).encode("utf-8", "replace"))
            finally:
                os._exit(status)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode("utf-8", "replace")
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise UsageError(message or "file: cannot create %s (see the "
                             "messages above)" % self._get("file"))

    def _create_disk(self):
        create = abi.CreateParams()
        create.diskType = paramtable.CREATE_TYPES[
            self._get("create-type") or "monolithic-sparse"]
        create.adapterType = paramtable.ADAPTER_TYPES[
            self._get("create-adapter-type") or "scsi-buslogic"]
        hwversion = self._get("create-hwversion")
        create.hwVersion = (paramtable.HWVERSIONS["workstation5"]
                            if hwversion is None else hwversion)
        create.capacity = self._get("create-size") // SECTOR
        create.logicalSectorSize = SECTOR
        create.physicalSectorSize = SECTOR
        connection = Connection(self.lib, {}, readonly=False)
        try:
            connection.create_disk(self._get("file"), create)
        except VddkError as e:
            raise UsageError("file: cannot create %s: %s (check that its "
                             "directory exists and is writable)"
                             % (self._get("file"), e))
        finally:
            connection.close()
        log.debug("created %s", self._get("file"))

    # --- exports ------------------------------------------------------
    def list_exports(self, is_tls=False):
        if self._get("export") is not None:
            # Remote datastores cannot be listed through VDDK.
            return []
        return super().list_exports(is_tls)

    def path_for(self, export_name):
        wildcard = self._get("export")
        if wildcard is None:
            return self._get("file")
        if not export_name or not wildcard_matches(wildcard, export_name):
            raise EngineError(errno.ENOENT,
                              "export %r does not match export=%s"
                              % (export_name, wildcard))
        if climbs_out(export_name):
            raise EngineError(errno.ENOENT,
                              "export %r has a '..' component, which "
                              "export=WILDCARD never serves" % export_name)
        return export_name

    def open_flags(self, readonly):
        flags = 0
        if readonly:
            flags |= abi.FLAG_OPEN_READ_ONLY
        if self._get("single-link"):
            flags |= abi.FLAG_OPEN_SINGLE_LINK
        if self._get("unbuffered"):
            flags |= abi.FLAG_OPEN_UNBUFFERED
        flags |= abi.COMPRESSION_FLAGS[self._get("compression") or "none"]
        return flags

    def open(self, export_name, readonly, is_tls=False):
        path = self.path_for(export_name)
        readonly = bool(readonly or self.readonly)
        self.messages.capture()
        try:
            with OPEN_CLOSE_LOCK:
                connection = Connection(self.lib, self.params, readonly)
                try:
                    handle = abi.HandlePtr()
                    self.lib.check("Open", connection.handle, encode(path),
                                   self.open_flags(readonly),
                                   ctypes.byref(handle))
                except Exception:
                    connection.close()
                    raise
        except VddkError as e:
            explain_open_failure(e, path, self.messages.captured())
            raise
        finally:
            self.messages.captured()
        engine = VddkEngine(self, connection, handle, readonly)
        try:
            engine.load_info()
        except Exception:
            engine.close()
            raise
        return engine

    def cleanup(self):
        if self.initialized:
            self.lib.call("Exit")
            self.initialized = False
        STATS.log_report()

    # --- --dump-plugin ------------------------------------------------
    @classmethod
    def dump_plugin(cls, params):
        lines = ["vddk_default_libdir=%s" % DEFAULT_LIBDIR,
                 "vddk_has_nfchostport=1"]
        found = find_library(params.get("libdir"))
        if found is None:
            return lines
        path, major = found
        try:
            lib = Library(path, major)
        except UsageError:
            # Real VDDK may need its own directory on LD_LIBRARY_PATH to
            # load at all; if that is what is missing, a re-exec fixes it.
            reexec_if_needed(os.path.dirname(path), params)
            raise
        lines.append("vddk_library_version=%d" % major)
        lines.append("vddk_dll=%s" % loaded_path(lib))
        modes = lib.transport_modes()
        if modes:
            lines.append("vddk_transport_modes=%s" % modes)
        lines.extend("%s=1" % name for name in lib.function_names())
        return lines
