"""The fake libvixDiskLib keeps its side of the contract the VDDK engine's
tests rely on: library variants, ConnectEx checks, path mapping, the
record file, faults, async completions and QueryAllocatedBlocks rules."""

import ctypes
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from fake_vddk.build import OPTIONAL_FUNCTIONS
from fake_vddk.fixtures import (  # noqa: F401 (fixtures)
    BindingSession, compiled_layout, fake_vddk, make_fake_vddk, session)
from vddktool.vddk import abi
from vddktool.vddk.library import Library, find_library

CHUNK = abi.MIN_CHUNK_SIZE
# The fake answers a broken QueryAllocatedBlocks rule with VIX_E_INVALID_ARG.
FAKE_INVALID_ARG = 3


def _exported(path):
    dll = ctypes.CDLL(path)
    return set(name for name in abi.PROTOTYPES if hasattr(dll, name))


def _soname(path):
    out = subprocess.check_output(["readelf", "-d", path]).decode()
    return [line.split("[")[1].rstrip("]") for line in out.splitlines()
            if "SONAME" in line]


def _remote(**overrides):
    params = abi.ConnectParams()
    params.vmxSpec = b"moref=vm-16"
    params.serverName = b"vcenter.example.com"
    params.thumbPrint = b"AA:BB"
    params.credType = abi.CRED_UID
    params.creds.uid.userName = b"admin"
    params.creds.uid.password = b"pw"
    params.port = 443
    params.nfcHostPort = 902
    for name, value in overrides.items():
        setattr(params, name, value)
    return params


def _connect_error(session, params, **kwargs):
    with pytest.raises(Exception) as raised:
        session.connect(params, **kwargs)
    return raised.value


# -- library variants

@pytest.mark.parametrize("major", [6, 7, 8, 9])
def test_library_has_the_major_in_name_soname_and_layout(make_fake_vddk,
                                                         major):
    fake = make_fake_vddk(major=major)
    assert fake.library.endswith("/lib64/libvixDiskLib.so.%d" % major)
    assert _soname(fake.library) == ["libvixDiskLib.so.%d" % major]
    assert compiled_layout(fake.library)["major"] == major
    assert find_library(fake.libdir) == (fake.library, major)


def test_full_library_exports_every_declared_function(fake_vddk):
    assert _exported(fake_vddk.library) == set(abi.PROTOTYPES)


def test_old_library_lacks_only_the_optional_functions(make_fake_vddk):
    fake = make_fake_vddk(optional=False)
    assert _exported(fake.library) == \
        set(abi.PROTOTYPES) - set(OPTIONAL_FUNCTIONS)
    library = Library(fake.library, fake.major)
    assert not library.has("QueryAllocatedBlocks")
    assert library.has("ListTransportModes")


def test_library_can_sit_directly_in_libdir(make_fake_vddk):
    fake = make_fake_vddk(subdir="")
    assert os.path.dirname(fake.library) == fake.libdir
    assert find_library(fake.libdir) == (fake.library, fake.major)


def test_list_transport_modes(session):
    assert session.lib.transport_modes() == "file:san:hotadd:nbdssl:nbd"


@pytest.mark.parametrize("major,sector_size", [(6, 0), (7, 512)])
def test_sector_sizes_in_info_only_from_vddk_7(make_fake_vddk, monkeypatch,
                                              major, sector_size):
    fake = make_fake_vddk(major=major)
    session = BindingSession(fake, monkeypatch)
    handle = session.open(session.connect(), fake.local_disk())
    info = ctypes.POINTER(abi.Info)()
    session.lib.check("GetInfo", handle, ctypes.byref(info))
    sizes = (info.contents.logicalSectorSize,
             info.contents.physicalSectorSize)
    session.lib.call("FreeInfo", info)
    assert sizes == (sector_size, sector_size)


# -- ConnectEx checks

EXPECTATIONS = [
    ("server", "esxi.example.com"),
    ("thumbprint", "12:34"),
    ("user", "root"),
    ("password", "other"),
    ("vm", "moref=vm-99"),
    ("snapshot", "snapshot-1"),
    ("transports", "hotadd"),
    ("port", "8443"),
    ("nfchostport", "9999"),
]


@pytest.mark.parametrize("field,expected", EXPECTATIONS)
def test_connect_fails_when_an_expected_value_differs(fake_vddk, monkeypatch,
                                                      field, expected):
    fake_vddk.expect(**{field: expected})
    session = BindingSession(fake_vddk, monkeypatch)
    error = _connect_error(session, _remote(), snapshot=b"snapshot-0",
                           transports=b"nbd")
    assert "ConnectEx" in str(error)
    assert "fake VDDK error" in str(error)


def test_connect_succeeds_when_every_expected_value_matches(fake_vddk,
                                                            monkeypatch):
    fake_vddk.expect(server="vcenter.example.com", thumbprint="AA:BB",
                     user="admin", password="pw", vm="moref=vm-16",
                     snapshot="snapshot-0", transports="nbd:nbdssl",
                     port=443, nfchostport=902)
    session = BindingSession(fake_vddk, monkeypatch)
    assert session.connect(_remote(), snapshot=b"snapshot-0",
                           transports=b"nbd:nbdssl")


def test_wrong_thumbprint_logs_the_real_one(fake_vddk, monkeypatch):
    fake_vddk.expect(thumbprint="B2:31:BD:DE")
    session = BindingSession(fake_vddk, monkeypatch)
    _connect_error(session, _remote(thumbPrint=b"12"))
    assert ("VixDiskLibVim: Failed to verify SSL certificate: "
            "actual thumbprint=B2:31:BD:DE expected=12") in session.messages


def test_expected_cookie_needs_session_id_credentials(fake_vddk,
                                                      monkeypatch):
    fake_vddk.expect(cookie="vmware_soap_session=1")
    session = BindingSession(fake_vddk, monkeypatch)
    # The right string in the UID fields is still refused.
    _connect_error(session, _remote(credType=abi.CRED_UID))
    params = _remote(credType=abi.CRED_SESSIONID)
    params.creds.sessionId.cookie = b"vmware_soap_session=1"
    params.creds.sessionId.userName = b"admin"
    assert session.connect(params)


def test_local_connection_ignores_remote_expectations(fake_vddk,
                                                      monkeypatch):
    fake_vddk.expect(server="esxi.example.com", user="root")
    session = BindingSession(fake_vddk, monkeypatch)
    assert session.connect()


def test_connect_in_a_process_forked_after_init_fails(fake_vddk):
    # Run in a child interpreter: forking pytest itself is not safe.
    script = textwrap.dedent("""
        import ctypes, os, sys
        from vddktool.vddk import abi
        from vddktool.vddk.library import Library
        lib = Library(sys.argv[1], 8)
        router = abi.MessageRouter()
        lib.check("InitEx", 6, 7, router.log_func, router.warn_func,
                  router.panic_func, None, None)
        def connect():
            conn = abi.ConnectionPtr()
            return lib.call("ConnectEx", ctypes.byref(abi.ConnectParams()),
                            b"\\0", None, None, ctypes.byref(conn))
        pid = os.fork()
        if pid == 0:
            os._exit(0 if connect() != abi.VIX_OK else 1)
        child = os.waitpid(pid, 0)[1]
        print("parent=%d child_refused=%d" % (connect(), child == 0))
        """)
    out = subprocess.check_output(
        [sys.executable, "-c", script, fake_vddk.library],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.decode().split() == ["parent=0", "child_refused=1"]


# -- disks and paths

def test_remote_path_maps_into_the_datastore_root(fake_vddk, monkeypatch):
    name = fake_vddk.remote_disk("datastore1", "vm 1/vm 1.vmdk",
                                 data=b"R" * 1024, size=None)
    assert name == "[datastore1] vm 1/vm 1.vmdk"
    session = BindingSession(fake_vddk, monkeypatch)
    handle = session.open(session.connect(_remote()), name)
    buffer = (ctypes.c_uint8 * 512)()
    session.lib.check("Read", handle, 1, 1, buffer)
    assert bytes(buffer) == b"R" * 512
    assert fake_vddk.calls("Open")[-1]["path"] == name


def test_missing_disk_is_not_found(session):
    with pytest.raises(Exception) as raised:
        session.open(session.connect(), session.fake.disk_dir + "/nope")
    assert "The file was not found" in str(raised.value)


@pytest.mark.parametrize("transports,mode", [
    (None, "nbdssl"), (b"hotadd:nbd", "hotadd"), (b"nbd", "nbd")])
def test_remote_transport_mode_is_the_first_asked_for(fake_vddk, monkeypatch,
                                                      transports, mode):
    session = BindingSession(fake_vddk, monkeypatch)
    name = fake_vddk.remote_disk()
    handle = session.open(session.connect(_remote(), transports=transports),
                          name)
    assert session.lib.call("GetTransportMode", handle).decode() == mode


def test_local_transport_mode_is_file(session):
    handle = session.open(session.connect(), session.fake.local_disk())
    assert session.lib.call("GetTransportMode", handle) == b"file"


def _create(session, connection, path, sectors):
    params = abi.CreateParams()
    params.diskType = abi.DISK_MONOLITHIC_SPARSE
    params.adapterType = abi.ADAPTER_SCSI_LSILOGIC
    params.hwVersion = abi.HWVERSION_ESX65
    params.capacity = sectors
    return session.lib.call("Create", connection, path.encode(),
                            ctypes.byref(params), None, None)


def test_create_makes_a_sparse_file_of_the_capacity(session, tmp_path):
    path = str(tmp_path / "new.vmdk")
    assert _create(session, session.connect(), path, 4096) == abi.VIX_OK
    assert os.path.getsize(path) == 4096 * 512
    assert os.stat(path).st_blocks == 0
    call = session.fake.calls("Create")[-1]
    assert (call.number("diskType"), call.number("adapterType"),
            call.number("hwVersion")) == (1, 3, 13)


def test_create_refuses_an_existing_file(session):
    existing = session.fake.local_disk(data=b"keep", size=None)
    err = _create(session, session.connect(), existing, 8)
    assert "already exists" in session.lib.error_text(err)
    with open(existing, "rb") as f:
        assert f.read() == b"keep"


def test_create_refuses_remote_connections(fake_vddk, monkeypatch, tmp_path):
    session = BindingSession(fake_vddk, monkeypatch)
    path = str(tmp_path / "remote-new.vmdk")
    err = _create(session, session.connect(_remote()), path, 8)
    assert err == abi.VIX_E_NOT_SUPPORTED
    assert not os.path.exists(path)


# -- the record file

def test_record_lists_the_calls_in_order(session):
    handle = session.open(session.connect(read_only=True),
                          session.fake.local_disk(),
                          abi.FLAG_OPEN_READ_ONLY)
    buffer = (ctypes.c_uint8 * 1024)()
    session.lib.check("Read", handle, 3, 2, buffer)
    session.lib.check("Flush", handle)
    session.lib.check("Close", handle)
    session.lib.call("Exit")
    calls = session.fake.calls()
    assert [c.name for c in calls] == [
        "InitEx", "ConnectEx", "Open", "Read", "Flush", "Close", "Exit"]
    assert (calls[0]["major"], calls[0]["minor"], calls[0]["libdir"]) == \
        ("6", "7", None)
    assert (calls[1]["readOnly"], calls[1]["serverName"]) == ("1", None)
    assert calls[2].number("flags") == abi.FLAG_OPEN_READ_ONLY
    assert (calls[3].number("sector"), calls[3].number("count")) == (3, 2)


def test_record_holds_query_arguments(session):
    disk = session.fake.local_disk(size=4 * CHUNK * 512)
    handle = session.open(session.connect(), disk)
    blocks = ctypes.POINTER(abi.BlockList)()
    session.lib.check("QueryAllocatedBlocks", handle, CHUNK, 2 * CHUNK,
                      CHUNK, ctypes.byref(blocks))
    session.lib.check("FreeBlockList", blocks)
    call = session.fake.calls("QueryAllocatedBlocks")[-1]
    assert (call.number("start"), call.number("count"),
            call.number("chunk")) == (CHUNK, 2 * CHUNK, CHUNK)


# -- faults

def test_read_fault_hits_only_requests_covering_the_byte(fake_vddk,
                                                         monkeypatch):
    fake_vddk.fail_read_at(5 * 512 + 7)
    session = BindingSession(fake_vddk, monkeypatch)
    handle = session.open(session.connect(), fake_vddk.local_disk())
    buffer = (ctypes.c_uint8 * 2048)()
    assert session.lib.call("Read", handle, 0, 4, buffer) == abi.VIX_OK
    assert session.lib.call("Read", handle, 4, 2, buffer) != abi.VIX_OK
    assert session.lib.call("Read", handle, 6, 4, buffer) == abi.VIX_OK


def test_write_fault_leaves_the_disk_unchanged(fake_vddk, monkeypatch):
    fake_vddk.fail_write_at(0)
    session = BindingSession(fake_vddk, monkeypatch)
    disk = fake_vddk.local_disk(data=b"\0" * 1024, size=None)
    handle = session.open(session.connect(), disk)
    buffer = (ctypes.c_uint8 * 512).from_buffer_copy(b"W" * 512)
    assert session.lib.call("Write", handle, 0, 1, buffer) != abi.VIX_OK
    assert session.lib.call("Write", handle, 1, 1, buffer) == abi.VIX_OK
    with open(disk, "rb") as f:
        assert f.read() == b"\0" * 512 + b"W" * 512


def test_open_fault(fake_vddk, monkeypatch):
    fake_vddk.fail_open()
    session = BindingSession(fake_vddk, monkeypatch)
    with pytest.raises(Exception) as raised:
        session.open(session.connect(), fake_vddk.local_disk())
    assert "Unknown error" in str(raised.value)
    assert any("Cannot open disk" in m for m in session.messages)


def test_writes_on_a_read_only_open_fail(session):
    handle = session.open(session.connect(), session.fake.local_disk(),
                          abi.FLAG_OPEN_READ_ONLY)
    buffer = (ctypes.c_uint8 * 512)()
    err = session.lib.call("Write", handle, 0, 1, buffer)
    assert "write-protected" in session.lib.error_text(err)


def test_io_beyond_the_end_fails(session):
    handle = session.open(session.connect(),
                          session.fake.local_disk(size=8 * 512))
    buffer = (ctypes.c_uint8 * 1024)()
    assert session.lib.call("Read", handle, 7, 2, buffer) != abi.VIX_OK


# -- asynchronous I/O

def test_async_completions_come_back_out_of_order(fake_vddk, monkeypatch):
    # Pauses of up to 20 ms dwarf any scheduling delay of a loaded host.
    fake_vddk.env["FAKE_VDDK_ASYNC_DELAY_US"] = "20000"
    session = BindingSession(fake_vddk, monkeypatch)
    requests = 48
    data = bytes(bytearray(range(256))) * 2 * requests
    disk = session.fake.local_disk(data=data, size=None)
    handle = session.open(session.connect(), disk)
    order = []
    callback = abi.CompletionFunc(lambda tag, result: order.append(
        (tag, result)))
    buffers = [(ctypes.c_uint8 * 512)() for _ in range(requests)]
    for sector, buffer in enumerate(buffers):
        assert session.lib.call("ReadAsync", handle, sector, 1, buffer,
                                callback, sector + 1) == abi.VIX_ASYNC
    session.lib.check("Wait", handle)
    assert sorted(order) == [(tag, abi.VIX_OK)
                             for tag in range(1, requests + 1)]
    assert [tag for tag, _ in order] != sorted(tag for tag, _ in order)
    assert b"".join(bytes(b) for b in buffers) == data


def test_async_write_lands_before_wait_returns(session):
    disk = session.fake.local_disk(size=4096)
    handle = session.open(session.connect(), disk)
    results = []
    callback = abi.CompletionFunc(lambda tag, result: results.append(result))
    buffer = (ctypes.c_uint8 * 1024).from_buffer_copy(b"A" * 1024)
    assert session.lib.call("WriteAsync", handle, 2, 2, buffer, callback,
                            None) == abi.VIX_ASYNC
    session.lib.check("Wait", handle)
    assert results == [abi.VIX_OK]
    with open(disk, "rb") as f:
        f.seek(1024)
        assert f.read(1024) == b"A" * 1024
    assert [c.name for c in session.fake.calls()][-2:] == \
        ["WriteAsync", "Wait"]


def test_async_fault_completes_with_an_error(fake_vddk, monkeypatch):
    fake_vddk.fail_write_at(512)
    session = BindingSession(fake_vddk, monkeypatch)
    handle = session.open(session.connect(), fake_vddk.local_disk())
    results = []
    callback = abi.CompletionFunc(lambda tag, result: results.append(result))
    buffer = (ctypes.c_uint8 * 1024)()
    assert session.lib.call("WriteAsync", handle, 0, 2, buffer, callback,
                            None) == abi.VIX_ASYNC
    session.lib.check("Wait", handle)
    assert len(results) == 1 and results[0] != abi.VIX_OK


# -- QueryAllocatedBlocks

def _query(session, handle, start, count, chunk):
    blocks = ctypes.POINTER(abi.BlockList)()
    err = session.lib.call("QueryAllocatedBlocks", handle, start, count,
                           chunk, ctypes.byref(blocks))
    if err != abi.VIX_OK:
        return err
    found = [(b.offset, b.length) for b in abi.blocks_of(blocks)]
    session.lib.check("FreeBlockList", blocks)
    return found


@pytest.fixture
def sparse_handle(session):
    """A disk of 64 chunks whose data sits in chunks 1, 5-6 and 63."""
    disk = session.fake.local_disk(size=64 * CHUNK * 512)
    with open(disk, "r+b") as f:
        for byte in (CHUNK * 512 + 3, 5 * CHUNK * 512 + 510,
                     6 * CHUNK * 512, 64 * CHUNK * 512 - 1):
            f.seek(byte)
            f.write(b"x")
    return session.open(session.connect(), disk)


@pytest.mark.parametrize("start,count,chunk", [
    (0, 64 * CHUNK, CHUNK // 2),            # chunk below the minimum
    (CHUNK // 2, CHUNK, CHUNK),             # start not chunk-aligned
    (0, CHUNK + 1, CHUNK),                  # count not whole chunks
    (0, 65 * CHUNK, CHUNK),                 # beyond the disk
])
def test_query_refuses_breaking_the_chunk_rules(session, sparse_handle,
                                                start, count, chunk):
    assert _query(session, sparse_handle, start, count, chunk) == \
        FAKE_INVALID_ARG


def test_query_refuses_too_many_chunks(session):
    sectors = (abi.MAX_CHUNK_NUMBER + 1) * CHUNK
    handle = session.open(session.connect(),
                          session.fake.local_disk(size=sectors * 512))
    assert _query(session, handle, 0, sectors, CHUNK) == \
        FAKE_INVALID_ARG
    assert _query(session, handle, 0, sectors - CHUNK, CHUNK) == []


def test_query_reports_data_in_whole_chunks(session, sparse_handle):
    assert _query(session, sparse_handle, 0, 64 * CHUNK, CHUNK) == [
        (CHUNK, CHUNK), (5 * CHUNK, 2 * CHUNK), (63 * CHUNK, CHUNK)]


def test_query_of_a_window_stays_inside_it(session, sparse_handle):
    assert _query(session, sparse_handle, 6 * CHUNK, 4 * CHUNK, CHUNK) == [
        (6 * CHUNK, CHUNK)]


def test_query_with_larger_chunks(session, sparse_handle):
    assert _query(session, sparse_handle, 0, 64 * CHUNK, 4 * CHUNK) == [
        (0, 8 * CHUNK), (60 * CHUNK, 4 * CHUNK)]


# -- ownership of what the library hands out

def test_everything_handed_out_is_counted_until_freed(session):
    handle = session.open(session.connect(), session.fake.local_disk())
    info = ctypes.POINTER(abi.Info)()
    session.lib.check("GetInfo", handle, ctypes.byref(info))
    text = session.lib.call("GetErrorText", abi.VIX_E_FAIL, None)
    assert session.outstanding() == 2
    session.lib.call("FreeInfo", info)
    session.lib.call("FreeErrorText", text)
    assert session.outstanding() == 0


def test_freeing_connect_params_it_did_not_allocate_is_refused(session):
    own = abi.ConnectParams()
    session.lib.call("FreeConnectParams", ctypes.byref(own))
    assert session.warnings == [
        "VixDiskLib: FreeConnectParams of memory it did not allocate"]


# -- Open and Close must be serialized by the caller

def test_overlapping_opens_are_caught(fake_vddk, monkeypatch):
    # Long Opens, started together: they overlap however loaded the host.
    fake_vddk.env["FAKE_VDDK_OPEN_CLOSE_PAUSE_MS"] = "300"
    session = BindingSession(fake_vddk, monkeypatch)
    connection = session.connect()
    disk = fake_vddk.local_disk()
    start_together = threading.Barrier(2)
    results = []

    def open_disk():
        handle = abi.HandlePtr()
        start_together.wait()
        results.append(session.lib.call("Open", connection, disk.encode(),
                                        0, ctypes.byref(handle)))

    threads = [threading.Thread(target=open_disk) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert session.fake.calls("Overlap")
    assert abi.VIX_E_FAIL in results
    assert any("while another Open or Close runs" in warning
               for warning in session.warnings)


def test_serialized_opens_and_closes_are_not_overlaps(session):
    connection = session.connect()
    disk = session.fake.local_disk()
    lock = threading.Lock()

    def open_and_close():
        with lock:
            handle = session.open(connection, disk)
        with lock:
            session.lib.check("Close", handle)

    threads = [threading.Thread(target=open_and_close) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert session.fake.call_names().count("Close") == 4
    assert not session.fake.calls("Overlap")


# -- failures real VDDK is known for

def test_local_disk_in_read_only_directory_fails_to_lock(session, tmp_path):
    directory = tmp_path / "read-only"
    directory.mkdir()
    disk = str(directory / "disk.raw")
    with open(disk, "wb") as f:
        f.truncate(4096)
    directory.chmod(0o555)
    try:
        with pytest.raises(Exception) as raised:
            session.open(session.connect(), disk)
        read_only = session.open(session.connect(), disk,
                                 abi.FLAG_OPEN_READ_ONLY)
    finally:
        directory.chmod(0o755)
    assert "Insufficient permissions" in str(raised.value)
    assert session.warnings == [
        "FILE: FileLockCreateEntryDirectory creation failure on "
        "'%s.lck': Permission denied" % disk]
    assert read_only


def test_large_remote_requests_run_out_of_server_memory(fake_vddk,
                                                        monkeypatch):
    fake_vddk.limit_remote_requests(64 * 1024)
    session = BindingSession(fake_vddk, monkeypatch)
    handle = session.open(session.connect(_remote()),
                          fake_vddk.remote_disk())
    buffer = (ctypes.c_uint8 * (128 * 1024))()
    assert session.lib.call("Read", handle, 0, 128, buffer) == abi.VIX_OK
    err = session.lib.call("Read", handle, 0, 129, buffer)
    assert "out of memory" in session.lib.error_text(err)
    assert session.warnings == [
        "[NFC ERROR] NfcFssrvrProcessErrorMsg: received NFC error 5 from "
        "server: Failed to allocate the requested %d bytes"
        % (129 * 512 + 24)]


def test_request_limit_spares_local_disks(fake_vddk, monkeypatch):
    fake_vddk.limit_remote_requests(512)
    session = BindingSession(fake_vddk, monkeypatch)
    handle = session.open(session.connect(), fake_vddk.local_disk())
    buffer = (ctypes.c_uint8 * 4096)()
    assert session.lib.call("Read", handle, 0, 8, buffer) == abi.VIX_OK
