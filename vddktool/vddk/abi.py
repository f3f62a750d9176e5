"""The VixDiskLib C ABI (x86-64 Linux, LP64) as ctypes declarations.

Every layout here is checked offset by offset against the published header
(tests/test_vddk_abi.py), because a wrong layout would still "work" against
a fake library written from the same mistake.  Nothing in this module talks
to a library: library.py applies ``PROTOTYPES`` to a loaded one.
"""

import ctypes
import threading
from ctypes import (CFUNCTYPE, POINTER, Structure, Union, c_char, c_char_p,
                    c_int, c_long, c_uint8, c_uint16, c_uint32, c_uint64,
                    c_void_p)

from .. import log

# ---------------------------------------------------------------------------
# constants

VixError = c_uint64
VIX_OK = 0
VIX_E_FAIL = 1
VIX_E_NOT_SUPPORTED = 6
VIX_ASYNC = 25000

SECTOR_SIZE = 512

FLAG_OPEN_UNBUFFERED = 1
FLAG_OPEN_SINGLE_LINK = 2
FLAG_OPEN_READ_ONLY = 4
FLAG_OPEN_COMPRESSION_ZLIB = 16
FLAG_OPEN_COMPRESSION_FASTLZ = 32
FLAG_OPEN_COMPRESSION_SKIPZ = 64

COMPRESSION_FLAGS = {
    "none": 0,
    "zlib": FLAG_OPEN_COMPRESSION_ZLIB,
    "fastlz": FLAG_OPEN_COMPRESSION_FASTLZ,
    "skipz": FLAG_OPEN_COMPRESSION_SKIPZ,
}

DISK_MONOLITHIC_SPARSE = 1
DISK_MONOLITHIC_FLAT = 2
DISK_SPLIT_SPARSE = 3
DISK_SPLIT_FLAT = 4
DISK_VMFS_FLAT = 5
DISK_STREAM_OPTIMIZED = 6
DISK_VMFS_THIN = 7
DISK_VMFS_SPARSE = 8

ADAPTER_IDE = 1
ADAPTER_SCSI_BUSLOGIC = 2
ADAPTER_SCSI_LSILOGIC = 3
ADAPTER_UNKNOWN = 256

HWVERSION_WORKSTATION_4 = 3
HWVERSION_WORKSTATION_5 = 4
HWVERSION_WORKSTATION_6 = 6
HWVERSION_ESX30 = 4
HWVERSION_ESX4X = 7
HWVERSION_ESX50 = 8
HWVERSION_ESX51 = 9
HWVERSION_ESX55 = 10
HWVERSION_ESX60 = 11
HWVERSION_ESX65 = 13

CRED_UID = 1
CRED_SESSIONID = 2
CRED_TICKETID = 3
CRED_SSPI = 4
CRED_UNKNOWN = 256

SPEC_VMX = 0
SPEC_VSTORAGE_OBJECT = 1
SPEC_UNKNOWN = 2

# QueryAllocatedBlocks rules, in sectors.
MIN_CHUNK_SIZE = 128
MAX_CHUNK_NUMBER = 512 * 1024

# ---------------------------------------------------------------------------
# structures


class UidCreds(Structure):
    _fields_ = [("userName", c_char_p),
                ("password", c_char_p)]


class SessionIdCreds(Structure):
    _fields_ = [("cookie", c_char_p),
                ("userName", c_char_p),
                ("key", c_char_p)]


class Creds(Union):
    _fields_ = [("uid", UidCreds),
                ("sessionId", SessionIdCreds),
                # ticketId and SSPI variants are never used; this keeps
                # the union at the header's size whatever the others are.
                ("_reserved", c_char * 24)]


class VStorageObjSpec(Structure):
    _fields_ = [("id", c_char_p),
                ("datastoreMoRef", c_char_p),
                ("ssId", c_char_p)]


class Spec(Union):
    _fields_ = [("vStorageObjSpec", VStorageObjSpec)]


class ConnectParams(Structure):
    _fields_ = [("vmxSpec", c_char_p),
                ("serverName", c_char_p),
                ("thumbPrint", c_char_p),
                ("reserved1", c_long),
                ("credType", c_int),
                ("creds", Creds),
                ("port", c_uint32),
                ("nfcHostPort", c_uint32),
                ("reserved3", c_char_p),
                ("reserved4", c_char * 8),
                ("reserved5", c_void_p),
                ("spec", Spec),
                ("specType", c_int)]


class Geometry(Structure):
    _fields_ = [("cylinders", c_uint32),
                ("heads", c_uint32),
                ("sectors", c_uint32)]


class Info(Structure):
    _fields_ = [("biosGeo", Geometry),
                ("physGeo", Geometry),
                ("capacity", c_uint64),
                ("adapterType", c_int),
                ("numLinks", c_int),
                ("parentFileNameHint", c_char_p),
                ("uuid", c_char_p),
                ("logicalSectorSize", c_uint32),
                ("physicalSectorSize", c_uint32)]


class CreateParams(Structure):
    _fields_ = [("diskType", c_int),
                ("adapterType", c_int),
                ("hwVersion", c_uint16),
                ("capacity", c_uint64),
                ("logicalSectorSize", c_uint32),
                ("physicalSectorSize", c_uint32)]


class Block(Structure):
    _fields_ = [("offset", c_uint64),
                ("length", c_uint64)]


class BlockList(Structure):
    """Variable length: ``numBlocks`` Blocks follow; use ``blocks_of``."""
    _fields_ = [("numBlocks", c_uint32),
                ("blocks", Block * 1)]


def blocks_of(block_list_ptr):
    """The Blocks of a BlockList returned by the library, as a ctypes
    array over its memory (valid until FreeBlockList)."""
    count = block_list_ptr.contents.numBlocks
    address = ctypes.addressof(block_list_ptr.contents) + BlockList.blocks.offset
    return (Block * count).from_address(address)


# ---------------------------------------------------------------------------
# callbacks

# void fn(const char *fmt, va_list args): on x86-64 a va_list parameter is
# a pointer to the caller's __va_list_tag.
LogFunc = CFUNCTYPE(None, c_char_p, c_void_p)
# void fn(void *data, VixError result)
CompletionFunc = CFUNCTYPE(None, c_void_p, VixError)

ConnectionPtr = c_void_p
HandlePtr = c_void_p

# ---------------------------------------------------------------------------
# functions: name -> (restype, argtypes, required)

REQUIRED, OPTIONAL = True, False

PROTOTYPES = {
    "VixDiskLib_InitEx": (VixError, [c_uint32, c_uint32, LogFunc, LogFunc,
                                     LogFunc, c_char_p, c_char_p], REQUIRED),
    "VixDiskLib_Exit": (None, [], REQUIRED),
    # restype c_void_p, not c_char_p: the text must be handed back to
    # FreeErrorText, so its address has to survive the call.
    "VixDiskLib_GetErrorText": (c_void_p, [VixError, c_char_p], REQUIRED),
    "VixDiskLib_FreeErrorText": (None, [c_void_p], REQUIRED),
    "VixDiskLib_ConnectEx": (VixError, [POINTER(ConnectParams), c_char,
                                        c_char_p, c_char_p,
                                        POINTER(ConnectionPtr)], REQUIRED),
    "VixDiskLib_Disconnect": (VixError, [ConnectionPtr], REQUIRED),
    "VixDiskLib_Open": (VixError, [ConnectionPtr, c_char_p, c_uint32,
                                   POINTER(HandlePtr)], REQUIRED),
    "VixDiskLib_Close": (VixError, [HandlePtr], REQUIRED),
    "VixDiskLib_GetTransportMode": (c_char_p, [HandlePtr], REQUIRED),
    "VixDiskLib_GetInfo": (VixError, [HandlePtr, POINTER(POINTER(Info))],
                           REQUIRED),
    "VixDiskLib_FreeInfo": (None, [POINTER(Info)], REQUIRED),
    "VixDiskLib_Read": (VixError, [HandlePtr, c_uint64, c_uint64,
                                   POINTER(c_uint8)], REQUIRED),
    "VixDiskLib_Write": (VixError, [HandlePtr, c_uint64, c_uint64,
                                    POINTER(c_uint8)], REQUIRED),
    "VixDiskLib_Create": (VixError, [ConnectionPtr, c_char_p,
                                     POINTER(CreateParams), c_void_p,
                                     c_void_p], REQUIRED),
    "VixDiskLib_FreeConnectParams": (None, [POINTER(ConnectParams)],
                                     REQUIRED),
    "VixDiskLib_Flush": (VixError, [HandlePtr], REQUIRED),
    "VixDiskLib_ReadAsync": (VixError, [HandlePtr, c_uint64, c_uint64,
                                        POINTER(c_uint8), CompletionFunc,
                                        c_void_p], REQUIRED),
    "VixDiskLib_WriteAsync": (VixError, [HandlePtr, c_uint64, c_uint64,
                                         POINTER(c_uint8), CompletionFunc,
                                         c_void_p], REQUIRED),
    "VixDiskLib_Wait": (VixError, [HandlePtr], REQUIRED),
    "VixDiskLib_QueryAllocatedBlocks": (VixError, [
        HandlePtr, c_uint64, c_uint64, c_uint64,
        POINTER(POINTER(BlockList))], OPTIONAL),
    "VixDiskLib_FreeBlockList": (VixError, [POINTER(BlockList)], OPTIONAL),
    "VixDiskLib_AllocateConnectParams": (POINTER(ConnectParams), [],
                                         OPTIONAL),
    "VixDiskLib_ListTransportModes": (c_char_p, [], OPTIONAL),
}

# ---------------------------------------------------------------------------
# formatting the library's printf-style messages

_libc = ctypes.CDLL(None, use_errno=True)
_vsnprintf = _libc.vsnprintf
_vsnprintf.restype = c_int
_vsnprintf.argtypes = [c_void_p, ctypes.c_size_t, c_char_p, c_void_p]

# sizeof(__va_list_tag) on x86-64: vsnprintf consumes the va_list, so a
# second attempt with a larger buffer needs the original state back
# (va_copy is a plain copy of this structure on this ABI).
_VA_LIST_SIZE = 24
_FIRST_TRY = 1024


def format_va_list(fmt, va_list):
    """Expand a printf format with its va_list into a str."""
    if not fmt:
        return ""
    if not va_list:
        return fmt.decode("utf-8", "replace")
    saved = ctypes.create_string_buffer(_VA_LIST_SIZE)
    ctypes.memmove(saved, va_list, _VA_LIST_SIZE)
    buf = ctypes.create_string_buffer(_FIRST_TRY)
    needed = _vsnprintf(buf, len(buf), fmt, va_list)
    if needed >= len(buf):
        ctypes.memmove(va_list, saved, _VA_LIST_SIZE)
        buf = ctypes.create_string_buffer(needed + 1)
        needed = _vsnprintf(buf, len(buf), fmt, va_list)
    if needed < 0:
        return fmt.decode("utf-8", "replace")
    return buf.value.decode("utf-8", "replace")


class MessageRouter(object):
    """The log, warning and panic callbacks given to InitEx.

    VDDK's chatter goes to debug (seen with -v); its warnings and panics
    are errors.  ``secrets`` are masked out, in case the library echoes a
    password or cookie back.  Between ``capture()`` and ``captured()`` a
    thread's messages are also kept, so that a failed call can quote the
    one that explains it (VDDK's error codes rarely do).
    """

    # Enough for the chatter of one ConnectEx and Open.
    MAX_CAPTURED = 200

    def __init__(self, secrets=()):
        self.secrets = [s for s in secrets if s]
        # The CFUNCTYPE objects must outlive every call the library makes.
        self.log_func = LogFunc(self._on_log)
        self.warn_func = LogFunc(self._on_warning)
        self.panic_func = LogFunc(self._on_panic)
        self._kept = threading.local()

    def capture(self):
        """Start keeping the messages VDDK logs in this thread."""
        self._kept.lines = []

    def captured(self):
        """The messages kept since ``capture()``; stops keeping them."""
        lines = getattr(self._kept, "lines", None) or []
        self._kept.lines = None
        return lines

    def _keep(self, message):
        lines = getattr(self._kept, "lines", None)
        if lines is not None and len(lines) < self.MAX_CAPTURED:
            lines.append(message)
        return message

    def text(self, fmt, va_list):
        message = format_va_list(fmt, va_list).rstrip("\n")
        for secret in self.secrets:
            message = message.replace(secret, "***")
        return message

    def _on_log(self, fmt, va_list):
        log.debug("%s", self._keep(self.text(fmt, va_list)))

    def _on_warning(self, fmt, va_list):
        log.error("%s", self._keep(self.text(fmt, va_list)))

    def _on_panic(self, fmt, va_list):
        log.error("VDDK panic: %s", self.text(fmt, va_list))
