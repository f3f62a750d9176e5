"""The VDDK engine: serves local or remote VMware disks through libvixDiskLib.

Order of events (see engine.Backend): config_complete checks the parameters
and finds the library; get_ready re-executes with LD_LIBRARY_PATH if needed,
loads it and, for create=true, creates the disk in a short-lived child;
after_fork calls InitEx (VDDK's threads would not survive the daemonizing
fork); open connects and opens the disk once per NBD connection.
"""

import ctypes
import errno
import os
import threading

from .. import log, params as paramtable
from ..engine import (EXTENT_HOLE, EXTENT_ZERO, FUA_EMULATE, MAX_REQUEST_SIZE,
                      PARALLEL, Backend, Engine, EngineError, Extent,
                      UsageError)
from . import abi
from .library import (DEFAULT_LIBDIR, PREFIX, Library, VddkError,
                      find_library, loaded_path, require_library)
from .reexec import (reexec_if_needed, recover_secrets,
                     restore_caller_environment)
from .settings import check_settings, explain_open_failure
from .stats import STATS, now
from .wildcard import wildcard_matches

# The API level we ask InitEx for: the oldest VDDK we support (6.7).
API_MAJOR, API_MINOR = 6, 7

# VDDK's Open and Close are not thread-safe: one at a time, process-wide.
OPEN_CLOSE_LOCK = threading.Lock()

SECTOR = abi.SECTOR_SIZE
CHUNK_SECTORS = abi.MIN_CHUNK_SIZE
MAX_SECTORS_PER_QUERY = abi.MAX_CHUNK_NUMBER * CHUNK_SECTORS


def _encode(text):
    return None if text is None else text.encode("utf-8")


def _secret_text(secret):
    return None if secret is None else secret.value


# ---------------------------------------------------------------------------
# asynchronous completions


class Completion(object):
    __slots__ = ("event", "result")

    def __init__(self):
        self.event = threading.Event()
        self.result = abi.VIX_OK


class AsyncCompletions(object):
    """Maps the ``data`` pointer of ReadAsync/WriteAsync to the request
    waiting for it.  One instance per process: the callback object must
    stay alive as long as the library may call it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._next_id = 1
        self._pending = {}
        self.callback = abi.CompletionFunc(self._completed)

    def submit(self):
        completion = Completion()
        with self._lock:
            request_id = self._next_id
            self._next_id += 1
            self._pending[request_id] = completion
        return request_id, completion

    def in_flight(self):
        with self._lock:
            return len(self._pending)

    def forget(self, request_id):
        with self._lock:
            self._pending.pop(request_id, None)

    def _completed(self, data, result):
        with self._lock:
            completion = self._pending.pop(data, None)
        if completion is not None:
            completion.result = result
            completion.event.set()


COMPLETIONS = AsyncCompletions()


def _writable_array(buf, count):
    """A ctypes view of ``buf`` without copying when the buffer allows."""
    try:
        return (ctypes.c_uint8 * count).from_buffer(buf)
    except TypeError:
        return (ctypes.c_uint8 * count).from_buffer_copy(buf)


# ---------------------------------------------------------------------------
# connections


class Connection(object):
    """A VixDiskLib connection and the ConnectParams it was made with
    (VDDK may keep pointers into them until Disconnect)."""

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
                      _encode(settings.get("snapshot")),
                      _encode(settings.get("transports")),
                      ctypes.byref(self.handle))
        except Exception:
            self._free_params()
            raise

    def _fill(self, settings):
        p = self.params
        if settings.get("server") is None:
            return      # local: no server, no credentials
        p.vmxSpec = _encode(settings.get("vm"))
        p.serverName = _encode(settings["server"])
        p.thumbPrint = _encode(settings.get("thumbprint"))
        cookie = _secret_text(settings.get("cookie"))
        if cookie is not None:
            p.credType = abi.CRED_SESSIONID
            p.creds.sessionId.cookie = _encode(cookie)
            p.creds.sessionId.userName = _encode(settings.get("user"))
        else:
            p.credType = abi.CRED_UID
            p.creds.uid.userName = _encode(settings.get("user"))
            p.creds.uid.password = _encode(
                _secret_text(settings.get("password")))
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
        self.lib.check("Create", self.handle, _encode(path),
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


# ---------------------------------------------------------------------------
# the backend


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
        secrets = [_secret_text(self._get(name))
                   for name in ("password", "cookie")]
        self.messages = abi.MessageRouter(secrets)
        self.lib.check("InitEx", API_MAJOR, API_MINOR,
                       self.messages.log_func, self.messages.warn_func,
                       self.messages.panic_func,
                       _encode(self._get("libdir") or DEFAULT_LIBDIR),
                       _encode(self._get("config")))

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
    def list_exports(self):
        if self._get("export") is not None:
            # Remote datastores cannot be listed through VDDK.
            return []
        return super().list_exports()

    def path_for(self, export_name):
        wildcard = self._get("export")
        if wildcard is None:
            return self._get("file")
        if not export_name or not wildcard_matches(wildcard, export_name):
            raise EngineError(errno.ENOENT,
                              "export %r does not match export=%s"
                              % (export_name, wildcard))
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

    def open(self, export_name, readonly):
        path = self.path_for(export_name)
        readonly = bool(readonly or self.readonly)
        self.messages.capture()
        try:
            with OPEN_CLOSE_LOCK:
                connection = Connection(self.lib, self.params, readonly)
                try:
                    handle = abi.HandlePtr()
                    self.lib.check("Open", connection.handle, _encode(path),
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


# ---------------------------------------------------------------------------
# one open disk


class VddkEngine(Engine):
    thread_model = PARALLEL

    def __init__(self, backend, connection, handle, readonly):
        self.backend = backend
        self.lib = backend.lib
        self.connection = connection
        self.handle = handle
        self.readonly = readonly
        self.capacity = 0           # sectors
        self.preferred = 4096
        self._datapath_debug = (log.verbose() and
                                log.debug_flag("vddk.datapath", 1))

    def load_info(self):
        info_ptr = ctypes.POINTER(abi.Info)()
        self.lib.check("GetInfo", self.handle, ctypes.byref(info_ptr))
        try:
            info = info_ptr.contents
            self.capacity = info.capacity
            physical = info.physicalSectorSize if self.lib.major >= 7 else 0
            if physical and physical & (physical - 1) == 0:
                self.preferred = max(self.preferred, physical)
            if log.debug_flag("vddk.diskinfo"):
                self._log_info(info)
        finally:
            self.lib.call("FreeInfo", info_ptr)
        mode = self.lib.call("GetTransportMode", self.handle)
        log.debug("transport mode: %s",
                  mode.decode("utf-8", "replace") if mode else "unknown")

    def _log_info(self, info):
        def text(value):
            return value.decode("utf-8", "replace") if value else "(none)"
        log.debug("disk info: capacity %d sectors (%d bytes)",
                  info.capacity, info.capacity * SECTOR)
        log.debug("disk info: BIOS geometry %d/%d/%d, physical geometry "
                  "%d/%d/%d", info.biosGeo.cylinders, info.biosGeo.heads,
                  info.biosGeo.sectors, info.physGeo.cylinders,
                  info.physGeo.heads, info.physGeo.sectors)
        log.debug("disk info: adapter type %d, %d link(s), parent %s, "
                  "uuid %s", info.adapterType, info.numLinks,
                  text(info.parentFileNameHint), text(info.uuid))
        if self.lib.major >= 7:
            log.debug("disk info: sector size %d logical, %d physical",
                      info.logicalSectorSize, info.physicalSectorSize)

    # --- what the disk can do -----------------------------------------
    def get_size(self):
        return self.capacity * SECTOR

    def block_size(self):
        return (SECTOR, self.preferred, MAX_REQUEST_SIZE)

    def can_write(self):
        return not self.readonly

    def can_flush(self):
        return True

    def can_fua(self):
        return FUA_EMULATE

    def can_zero(self):
        return not self.readonly

    def can_fast_zero(self):
        return False

    def can_extents(self):
        return self.lib.has("QueryAllocatedBlocks")

    # --- data ---------------------------------------------------------
    @staticmethod
    def _check_aligned(count, offset):
        if offset % SECTOR or count % SECTOR:
            raise EngineError(errno.EINVAL,
                              "VDDK reads and writes whole 512-byte sectors "
                              "only (offset %d, length %d)" % (offset, count))

    def _transfer(self, function, array, count, offset):
        """One ReadAsync or WriteAsync, waiting for its own completion so
        that other requests of the connection stay in flight meanwhile."""
        sector, sectors = offset // SECTOR, count // SECTOR
        if self._datapath_debug:
            log.debug("%s%s: sector %d, %d sectors", PREFIX, function,
                      sector, sectors)
        request_id, completion = COMPLETIONS.submit()
        start = now()
        err = self.lib.functions[function](
            self.handle, sector, sectors, array, COMPLETIONS.callback,
            request_id)
        if err == abi.VIX_ASYNC:
            completion.event.wait()
            err = completion.result
        else:
            COMPLETIONS.forget(request_id)
        STATS.record(function, now() - start, count)
        if err != abi.VIX_OK:
            raise self._failed(function, err)

    def _failed(self, function, err):
        error = self.lib.error(function, err)
        log.error("%s", error)
        return error

    def pread(self, count, offset):
        self._check_aligned(count, offset)
        buf = bytearray(count)
        if count:
            self._transfer("ReadAsync", _writable_array(buf, count), count,
                           offset)
        return buf

    def pwrite(self, buf, offset, fua=False):
        count = len(buf) if not isinstance(buf, memoryview) else buf.nbytes
        self._check_aligned(count, offset)
        if self.readonly:
            raise EngineError(errno.EPERM, "this disk is read-only")
        if count:
            self._transfer("WriteAsync", _writable_array(buf, count), count,
                           offset)
        if fua:
            self.flush()

    def flush(self):
        try:
            # Flush only covers writes VDDK has been handed, so let the
            # queued ones land first.
            self.lib.check("Wait", self.handle)
            self.lib.check("Flush", self.handle)
        except EngineError as e:
            log.error("%s", e)
            raise

    # --- extents ------------------------------------------------------
    def _allocated_blocks(self, start, sectors):
        """[(start, length)] in sectors of the allocated chunks in a
        chunk-aligned range."""
        block_list = ctypes.POINTER(abi.BlockList)()
        try:
            self.lib.check("QueryAllocatedBlocks", self.handle, start,
                           sectors, CHUNK_SECTORS, ctypes.byref(block_list))
        except EngineError as e:
            log.error("%s", e)
            raise
        try:
            blocks = [(b.offset, b.length) for b in abi.blocks_of(block_list)]
        finally:
            self.lib.call("FreeBlockList", block_list)
        if log.debug_flag("vddk.extents"):
            for block_start, length in blocks:
                log.debug("allocated: sector %d, %d sectors",
                          block_start, length)
        return blocks

    def _query_runs(self, start, end, req_one):
        """(start, length, flags) runs in sectors covering [start, end),
        both multiples of the chunk size."""
        runs = []
        while start < end:
            sectors = min(end - start, MAX_SECTORS_PER_QUERY)
            cursor, stop = start, start + sectors
            for block_start, length in self._allocated_blocks(start,
                                                              sectors):
                block_start = max(block_start, cursor)
                block_end = min(block_start + length, stop)
                if block_end <= block_start:
                    continue
                if block_start > cursor:
                    runs.append((cursor, block_start - cursor,
                                 EXTENT_HOLE | EXTENT_ZERO))
                runs.append((block_start, block_end - block_start, 0))
                cursor = block_end
            if cursor < stop:
                runs.append((cursor, stop - cursor, EXTENT_HOLE | EXTENT_ZERO))
            start = stop
            if req_one:
                break
        return runs

    def extents(self, count, offset, req_one=False):
        end_byte = min(offset + count, self.get_size())
        # QueryAllocatedBlocks only takes whole chunks, and the disk may
        # end in a partial one: that tail is reported as data.
        queryable_end = self.capacity // CHUNK_SECTORS * CHUNK_SECTORS
        first = offset // SECTOR // CHUNK_SECTORS * CHUNK_SECTORS
        last = -(-end_byte // SECTOR // CHUNK_SECTORS) * CHUNK_SECTORS
        last = min(last, queryable_end)
        runs = self._query_runs(first, last, req_one) if first < last else []
        tail = max(last, first) * SECTOR
        if tail < end_byte and not (req_one and runs):
            runs.append((tail // SECTOR, -(-(end_byte - tail) // SECTOR), 0))
        return _clip_extents(runs, offset, end_byte)

    # --- end ----------------------------------------------------------
    def close(self):
        with OPEN_CLOSE_LOCK:
            try:
                if self.handle:
                    for function in ("Wait", "Close"):
                        err = self.lib.call(function, self.handle)
                        if err != abi.VIX_OK:
                            log.error("%s", self.lib.error(function, err))
                    self.handle = abi.HandlePtr()
            finally:
                self.connection.close()


def _clip_extents(runs, start, end):
    """Sector runs -> byte Extents inside [start, end), neighbours with the
    same flags merged."""
    extents = []
    for run_start, length, flags in runs:
        lo = max(run_start * SECTOR, start)
        hi = min((run_start + length) * SECTOR, end)
        if hi <= lo:
            continue
        if extents and extents[-1].flags == flags and \
                extents[-1].offset + extents[-1].length == lo:
            extents[-1].length += hi - lo
        else:
            extents.append(Extent(lo, hi - lo, flags))
    if not extents:
        extents.append(Extent(start, max(end - start, 1), 0))
    return extents
