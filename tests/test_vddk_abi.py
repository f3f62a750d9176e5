"""Every offset and size of ../shared/docs/vddk-abi.md, checked three ways.

A ctypes layout that is wrong still "works" against a fake written from the
same mistake, so the document's numbers are written out here once and
compared with (1) the binding's ctypes declarations, (2) what gcc made of
the fake's C declarations, and (3) the bytes and values that actually
cross the boundary between the binding and the fake library.
"""

import ctypes
import struct

import pytest

from fake_vddk.fixtures import (  # noqa: F401 (fixtures)
    BindingSession, compiled_layout, fake_vddk, session)
from vddktool.vddk import abi

POINTER_SIZE = 8

# "field path": (offset, size) in bytes on x86-64, straight from the
# document; a structure's own entry is its total size.
DOCUMENTED_LAYOUT = {
    "ConnectParams": 128,
    "ConnectParams.vmxSpec": (0, 8),
    "ConnectParams.serverName": (8, 8),
    "ConnectParams.thumbPrint": (16, 8),
    "ConnectParams.reserved1": (24, 8),
    "ConnectParams.credType": (32, 4),
    "ConnectParams.creds.uid.userName": (40, 8),
    "ConnectParams.creds.sessionId.cookie": (40, 8),
    "ConnectParams.creds.uid.password": (48, 8),
    "ConnectParams.creds.sessionId.userName": (48, 8),
    "ConnectParams.creds.sessionId.key": (56, 8),
    "ConnectParams.port": (64, 4),
    "ConnectParams.nfcHostPort": (68, 4),
    "ConnectParams.reserved3": (72, 8),
    "ConnectParams.reserved4": (80, 8),
    "ConnectParams.reserved5": (88, 8),
    "ConnectParams.spec.vStorageObjSpec": (96, 24),
    "ConnectParams.spec.vStorageObjSpec.id": (96, 8),
    "ConnectParams.spec.vStorageObjSpec.datastoreMoRef": (104, 8),
    "ConnectParams.spec.vStorageObjSpec.ssId": (112, 8),
    "ConnectParams.specType": (120, 4),
    "Info": 64,
    "Info.biosGeo": (0, 12),
    "Info.biosGeo.cylinders": (0, 4),
    "Info.biosGeo.heads": (4, 4),
    "Info.biosGeo.sectors": (8, 4),
    "Info.physGeo": (12, 12),
    "Info.physGeo.cylinders": (12, 4),
    "Info.physGeo.heads": (16, 4),
    "Info.physGeo.sectors": (20, 4),
    "Info.capacity": (24, 8),
    "Info.adapterType": (32, 4),
    "Info.numLinks": (36, 4),
    "Info.parentFileNameHint": (40, 8),
    "Info.uuid": (48, 8),
    "Info.logicalSectorSize": (56, 4),
    "Info.physicalSectorSize": (60, 4),
    "Block": 16,
    "Block.offset": (0, 8),
    "Block.length": (8, 8),
    "BlockList.numBlocks": (0, 4),
    "BlockList.blocks.offset": (8, 8),
    "BlockList.blocks.length": (16, 8),
    "CreateParams": 32,
    "CreateParams.diskType": (0, 4),
    "CreateParams.adapterType": (4, 4),
    "CreateParams.hwVersion": (8, 2),
    "CreateParams.capacity": (16, 8),
    "CreateParams.logicalSectorSize": (24, 4),
    "CreateParams.physicalSectorSize": (28, 4),
}

DOCUMENTED_CONSTANTS = {
    "VIX_OK": 0, "VIX_E_FAIL": 1, "VIX_E_NOT_SUPPORTED": 6,
    "VIX_ASYNC": 25000, "SECTOR_SIZE": 512,
    "FLAG_OPEN_UNBUFFERED": 1, "FLAG_OPEN_SINGLE_LINK": 2,
    "FLAG_OPEN_READ_ONLY": 4, "FLAG_OPEN_COMPRESSION_ZLIB": 16,
    "FLAG_OPEN_COMPRESSION_FASTLZ": 32, "FLAG_OPEN_COMPRESSION_SKIPZ": 64,
    "DISK_MONOLITHIC_SPARSE": 1, "DISK_MONOLITHIC_FLAT": 2,
    "DISK_SPLIT_SPARSE": 3, "DISK_SPLIT_FLAT": 4, "DISK_VMFS_FLAT": 5,
    "DISK_STREAM_OPTIMIZED": 6, "DISK_VMFS_THIN": 7, "DISK_VMFS_SPARSE": 8,
    "ADAPTER_IDE": 1, "ADAPTER_SCSI_BUSLOGIC": 2,
    "ADAPTER_SCSI_LSILOGIC": 3, "ADAPTER_UNKNOWN": 256,
    "HWVERSION_WORKSTATION_4": 3, "HWVERSION_WORKSTATION_5": 4,
    "HWVERSION_WORKSTATION_6": 6, "HWVERSION_ESX30": 4,
    "HWVERSION_ESX4X": 7, "HWVERSION_ESX50": 8, "HWVERSION_ESX51": 9,
    "HWVERSION_ESX55": 10, "HWVERSION_ESX60": 11, "HWVERSION_ESX65": 13,
    "CRED_UID": 1, "CRED_SESSIONID": 2, "CRED_TICKETID": 3, "CRED_SSPI": 4,
    "CRED_UNKNOWN": 256,
    "SPEC_VMX": 0, "SPEC_VSTORAGE_OBJECT": 1, "SPEC_UNKNOWN": 2,
    "MIN_CHUNK_SIZE": 128, "MAX_CHUNK_NUMBER": 512 * 1024,
}

# The document's function tables.  Argument kinds: u32/u64 unsigned
# integers, char a one-byte integer, error the 64-bit VixError, ptr any
# pointer (opaque handles, strings, buffers), "Name*" a pointer to that
# binding structure, "Name**" a pointer to such a pointer, "ptr*" a pointer
# to an opaque pointer (the out handles), log/completion the callbacks.
DOCUMENTED_FUNCTIONS = {
    "InitEx": ("error", ["u32", "u32", "log", "log", "log", "ptr", "ptr"],
               True),
    "Exit": ("void", [], True),
    "GetErrorText": ("ptr", ["error", "ptr"], True),
    "FreeErrorText": ("void", ["ptr"], True),
    "ConnectEx": ("error", ["ConnectParams*", "char", "ptr", "ptr", "ptr*"],
                  True),
    "Disconnect": ("error", ["ptr"], True),
    "Open": ("error", ["ptr", "ptr", "u32", "ptr*"], True),
    "Close": ("error", ["ptr"], True),
    "GetTransportMode": ("ptr", ["ptr"], True),
    "GetInfo": ("error", ["ptr", "Info**"], True),
    "FreeInfo": ("void", ["Info*"], True),
    "Read": ("error", ["ptr", "u64", "u64", "ptr"], True),
    "Write": ("error", ["ptr", "u64", "u64", "ptr"], True),
    "Create": ("error", ["ptr", "ptr", "CreateParams*", "ptr", "ptr"], True),
    "FreeConnectParams": ("void", ["ConnectParams*"], True),
    "Flush": ("error", ["ptr"], True),
    "ReadAsync": ("error", ["ptr", "u64", "u64", "ptr", "completion", "ptr"],
                  True),
    "WriteAsync": ("error", ["ptr", "u64", "u64", "ptr", "completion",
                             "ptr"], True),
    "Wait": ("error", ["ptr"], True),
    "QueryAllocatedBlocks": ("error", ["ptr", "u64", "u64", "u64",
                                       "BlockList**"], False),
    "FreeBlockList": ("error", ["BlockList*"], False),
    "AllocateConnectParams": ("ConnectParams*", [], False),
    # Not in the document's tables; the fake has it and the binding must
    # not depend on it.
    "ListTransportModes": ("ptr", [], False),
}

STRUCTURES = ("ConnectParams", "Info", "Block", "BlockList", "CreateParams")


def binding_layout(path):
    """(offset, size) of a dotted field path in the binding's classes, or
    the structure's size for a bare name.  An array field stands for its
    first element, so "BlockList.blocks.offset" reaches into blocks[0]."""
    names = path.split(".")
    cls = getattr(abi, names[0])
    if len(names) == 1:
        return ctypes.sizeof(cls)
    offset = 0
    for name in names[1:]:
        if issubclass(cls, ctypes.Array):
            cls = cls._type_
        descriptor = getattr(cls, name)
        offset += descriptor.offset
        cls = dict(cls._fields_)[name]
    return offset, ctypes.sizeof(cls)


@pytest.mark.parametrize("path", sorted(DOCUMENTED_LAYOUT))
def test_binding_layout_matches_document(path):
    assert binding_layout(path) == DOCUMENTED_LAYOUT[path]


@pytest.mark.parametrize("path", sorted(DOCUMENTED_LAYOUT))
def test_fake_library_layout_matches_document(fake_vddk, path):
    assert compiled_layout(fake_vddk.library)[path] == \
        DOCUMENTED_LAYOUT[path]


def test_every_binding_structure_is_documented():
    """A field the binding adds, or one the document forgot, shows here."""
    for name in STRUCTURES:
        for field, _ in getattr(abi, name)._fields_:
            prefixed = "%s.%s" % (name, field)
            assert any(key == prefixed or key.startswith(prefixed + ".")
                       for key in DOCUMENTED_LAYOUT), prefixed


@pytest.mark.parametrize("name", sorted(DOCUMENTED_CONSTANTS))
def test_binding_constant_matches_document(name):
    assert getattr(abi, name) == DOCUMENTED_CONSTANTS[name]


# -- function prototypes

def _is_pointer(ctype):
    if ctype in (ctypes.c_void_p, ctypes.c_char_p):
        return True
    return issubclass(ctype, (ctypes._Pointer, ctypes._CFuncPtr))


def _matches_kind(ctype, kind):
    if kind == "void":
        return ctype is None
    if kind == "error":
        return ctype is abi.VixError and ctypes.sizeof(ctype) == 8 \
            and ctype(-1).value > 0
    if kind in ("u32", "u64"):
        size = 4 if kind == "u32" else 8
        return ctype not in (ctypes.c_void_p, ctypes.c_char_p) \
            and not _is_pointer(ctype) \
            and ctypes.sizeof(ctype) == size and ctype(-1).value > 0
    if kind == "char":
        return ctypes.sizeof(ctype) == 1 and not _is_pointer(ctype)
    if kind == "ptr":
        return _is_pointer(ctype) and \
            not issubclass(ctype, ctypes._CFuncPtr)
    if kind == "ptr*":
        return issubclass(ctype, ctypes._Pointer) and \
            _matches_kind(ctype._type_, "ptr")
    if kind == "log":
        return ctype is abi.LogFunc
    if kind == "completion":
        return ctype is abi.CompletionFunc
    if kind.endswith("**"):
        return issubclass(ctype, ctypes._Pointer) and \
            _matches_kind(ctype._type_, kind[:-1])
    if kind.endswith("*"):
        return issubclass(ctype, ctypes._Pointer) and \
            ctype._type_ is getattr(abi, kind[:-1])
    raise AssertionError("unknown kind %r" % kind)


@pytest.mark.parametrize("name", sorted(DOCUMENTED_FUNCTIONS))
def test_binding_prototype_matches_document(name):
    returns, arguments, required = DOCUMENTED_FUNCTIONS[name]
    restype, argtypes, binding_required = abi.PROTOTYPES["VixDiskLib_" + name]
    assert binding_required == required
    assert _matches_kind(restype, returns), (restype, returns)
    assert len(argtypes) == len(arguments)
    for position, (ctype, kind) in enumerate(zip(argtypes, arguments)):
        assert _matches_kind(ctype, kind), (position, ctype, kind)


def test_binding_declares_only_documented_functions():
    assert sorted(abi.PROTOTYPES) == sorted(
        "VixDiskLib_" + name for name in DOCUMENTED_FUNCTIONS)


def test_callbacks_take_documented_arguments():
    # void fn(const char *fmt, va_list args); void fn(void *, VixError)
    assert abi.LogFunc._restype_ is None
    assert abi.LogFunc._argtypes_ == (ctypes.c_char_p, ctypes.c_void_p)
    assert abi.CompletionFunc._restype_ is None
    assert abi.CompletionFunc._argtypes_ == (ctypes.c_void_p, abi.VixError)


# -- what crosses the boundary

def _u32(raw, offset):
    return struct.unpack_from("<I", raw, offset)[0]


def _i32(raw, offset):
    return struct.unpack_from("<i", raw, offset)[0]


def _u64(raw, offset):
    return struct.unpack_from("<Q", raw, offset)[0]


def _offset(path):
    return DOCUMENTED_LAYOUT[path][0]


def _remote_params(**overrides):
    params = abi.ConnectParams()
    params.vmxSpec = b"moref=vm-16"
    params.serverName = b"esxi.example.com"
    params.thumbPrint = b"B2:31:BD:DE"
    params.credType = abi.CRED_UID
    params.creds.uid.userName = b"root"
    params.creds.uid.password = b"s3cret pass"
    params.port = 4443
    params.nfcHostPort = 9020
    for name, value in overrides.items():
        setattr(params, name, value)
    return params


def test_connect_params_arrive_at_documented_offsets(session):
    params = _remote_params()
    session.connect(params, read_only=True, snapshot=b"snapshot-7",
                    transports=b"nbd:nbdssl")
    call = session.fake.calls("ConnectEx")[-1]
    raw = call.raw("params")
    assert len(raw) == DOCUMENTED_LAYOUT["ConnectParams"]
    assert _i32(raw, _offset("ConnectParams.credType")) == 1
    assert _u32(raw, _offset("ConnectParams.port")) == 4443
    assert _u32(raw, _offset("ConnectParams.nfcHostPort")) == 9020
    assert _i32(raw, _offset("ConnectParams.specType")) == abi.SPEC_VMX
    # The fake read each string through the pointer at the C offset that
    # the layout test ties to the document.
    assert call["vmxSpec"] == "moref=vm-16"
    assert call["serverName"] == "esxi.example.com"
    assert call["thumbPrint"] == "B2:31:BD:DE"
    assert call["userName"] == "root"
    assert call["password"] == "s3cret pass"
    assert call["cookie"] is None
    assert (call["readOnly"], call["snapshot"], call["transports"]) == \
        ("1", "snapshot-7", "nbd:nbdssl")


def test_connect_params_pointers_sit_at_documented_offsets(session):
    params = _remote_params()
    session.connect(params)
    raw = session.fake.calls("ConnectEx")[-1].raw("params")
    for field in ("vmxSpec", "serverName", "thumbPrint",
                  "creds.uid.userName", "creds.uid.password"):
        pointer = _u64(raw, _offset("ConnectParams." + field))
        expected = getattr(params, field.split(".")[-1]) \
            if "." not in field else \
            getattr(params.creds.uid, field.split(".")[-1])
        assert ctypes.string_at(pointer) == expected, field
    for unset in ("reserved1", "creds.sessionId.key", "reserved3",
                  "reserved5", "spec.vStorageObjSpec.id"):
        assert _u64(raw, _offset("ConnectParams." + unset)) == 0, unset


def test_session_cookie_arrives_in_the_session_id_credentials(session):
    params = _remote_params(credType=abi.CRED_SESSIONID)
    params.creds.sessionId.cookie = b"vmware_soap_session=52a1"
    params.creds.sessionId.userName = b"admin@vsphere.local"
    session.connect(params)
    call = session.fake.calls("ConnectEx")[-1]
    raw = call.raw("params")
    assert _i32(raw, _offset("ConnectParams.credType")) == 2
    assert ctypes.string_at(_u64(raw, _offset(
        "ConnectParams.creds.sessionId.cookie"))) == \
        b"vmware_soap_session=52a1"
    assert call["cookie"] == "vmware_soap_session=52a1"
    assert call["userName"] == "admin@vsphere.local"
    assert call["password"] is None


def test_library_allocated_connect_params_work_and_are_freed(session):
    pointer = session.lib.call("AllocateConnectParams")
    assert pointer, "AllocateConnectParams returned NULL"
    assert session.outstanding() == 1
    pointer.contents.port = 902
    pointer.contents.credType = abi.CRED_UID
    connection = session.connect(pointer.contents)
    raw = session.fake.calls("ConnectEx")[-1].raw("params")
    assert _u32(raw, _offset("ConnectParams.port")) == 902
    session.lib.check("Disconnect", connection)
    session.lib.call("FreeConnectParams", pointer)
    assert session.outstanding() == 0


def test_create_params_arrive_at_documented_offsets(session, tmp_path):
    connection = session.connect(abi.ConnectParams())
    params = abi.CreateParams()
    params.diskType = abi.DISK_MONOLITHIC_FLAT
    params.adapterType = abi.ADAPTER_SCSI_BUSLOGIC
    params.hwVersion = abi.HWVERSION_ESX65
    params.capacity = 0x1_0000_0001
    params.logicalSectorSize = 512
    params.physicalSectorSize = 4096
    path = str(tmp_path / "new.vmdk")
    session.lib.check("Create", connection, path.encode(),
                      ctypes.byref(params), None, None)
    call = session.fake.calls("Create")[-1]
    raw = call.raw("params")
    assert len(raw) == DOCUMENTED_LAYOUT["CreateParams"]
    assert _i32(raw, _offset("CreateParams.diskType")) == 2
    assert _i32(raw, _offset("CreateParams.adapterType")) == 2
    assert struct.unpack_from(
        "<H", raw, _offset("CreateParams.hwVersion"))[0] == 13
    assert _u64(raw, _offset("CreateParams.capacity")) == 0x1_0000_0001
    assert _u32(raw, _offset("CreateParams.logicalSectorSize")) == 512
    assert _u32(raw, _offset("CreateParams.physicalSectorSize")) == 4096
    assert (call["path"], call.number("capacity")) == (path, 0x1_0000_0001)


def test_binding_reads_info_the_library_filled(session):
    disk = session.fake.local_disk(size=3 * 1024 * 1024)
    handle = session.open(session.connect(abi.ConnectParams()), disk)
    info = ctypes.POINTER(abi.Info)()
    session.lib.check("GetInfo", handle, ctypes.byref(info))
    try:
        assert info.contents.capacity == 3 * 1024 * 1024 // 512
        assert info.contents.numLinks == 1
        assert info.contents.adapterType == abi.ADAPTER_SCSI_LSILOGIC
        assert info.contents.biosGeo.heads == 16
        assert info.contents.physGeo.sectors == 63
        assert info.contents.parentFileNameHint is None
        assert info.contents.uuid.startswith(b"60 00 C2 ")
        assert info.contents.logicalSectorSize == 512
        assert info.contents.physicalSectorSize == 512
    finally:
        session.lib.call("FreeInfo", info)
    assert session.outstanding() == 0


def test_binding_reads_block_list_the_library_filled(session):
    chunk = abi.MIN_CHUNK_SIZE * abi.SECTOR_SIZE
    disk = session.fake.local_disk(size=16 * chunk)
    with open(disk, "r+b") as f:
        for chunk_index in (2, 3, 9):
            f.seek(chunk_index * chunk + 100)
            f.write(b"data")
    handle = session.open(session.connect(abi.ConnectParams()), disk)
    blocks = ctypes.POINTER(abi.BlockList)()
    session.lib.check("QueryAllocatedBlocks", handle, 0,
                      16 * abi.MIN_CHUNK_SIZE, abi.MIN_CHUNK_SIZE,
                      ctypes.byref(blocks))
    try:
        found = [(b.offset, b.length) for b in abi.blocks_of(blocks)]
    finally:
        session.lib.check("FreeBlockList", blocks)
    assert found == [(2 * abi.MIN_CHUNK_SIZE, 2 * abi.MIN_CHUNK_SIZE),
                     (9 * abi.MIN_CHUNK_SIZE, abi.MIN_CHUNK_SIZE)]


def test_error_text_survives_to_be_freed(session):
    text = session.lib.error_text(abi.VIX_E_NOT_SUPPORTED)
    assert "not supported" in text
    assert session.outstanding() == 0


def test_log_callback_formats_varargs(session, tmp_path):
    disk = session.fake.local_disk()
    session.open(session.connect(abi.ConnectParams()), disk,
                 abi.FLAG_OPEN_READ_ONLY)
    assert "VixDiskLib: Open %s flags 4" % disk in session.messages


def test_log_callback_formats_messages_longer_than_first_buffer(session,
                                                                tmp_path):
    # A path of ~2000 bytes makes the message outgrow the binding's first
    # vsnprintf buffer, so the va_list must be restored for the retry.
    deep = tmp_path
    for _ in range(20):
        deep = deep / ("d" * 100)
    deep.mkdir(parents=True)
    disk = session.fake.local_disk()
    target = str(deep / "disk.raw")
    with open(disk, "rb") as src, open(target, "wb") as dst:
        dst.write(src.read())
    session.open(session.connect(abi.ConnectParams()), target, 0)
    assert "VixDiskLib: Open %s flags 0" % target in session.messages


def test_completion_callback_receives_data_and_result(fake_vddk,
                                                      monkeypatch):
    # Sectors 4-5 hold byte 2048, where the fake is told to fail.
    monkeypatch.setenv("FAKE_VDDK_FAIL_READ_AT", "2048")
    session = BindingSession(fake_vddk, monkeypatch)
    disk = fake_vddk.local_disk(data=b"\xab" * 4096, size=None)
    handle = session.open(session.connect(abi.ConnectParams()), disk)
    results = {}

    def completed(data, result):
        results[data] = result

    callback = abi.CompletionFunc(completed)
    buffers = {0: ctypes.create_string_buffer(1024),
               4: ctypes.create_string_buffer(1024)}
    for data, sector in ((0x1234, 0), (0x5678, 4)):
        err = session.lib.call(
            "ReadAsync", handle, sector, 2,
            ctypes.cast(buffers[sector], ctypes.POINTER(ctypes.c_uint8)),
            callback, data)
        assert err == abi.VIX_ASYNC
    session.lib.check("Wait", handle)
    assert results[0x1234] == abi.VIX_OK
    assert results[0x5678] not in (abi.VIX_OK, abi.VIX_ASYNC)
    assert buffers[0].raw == b"\xab" * 1024
