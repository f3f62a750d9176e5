"""The ABI end to end: parameters given to a running vddktool reach the
fake libvixDiskLib at the offsets ../shared/docs/vddk-abi.md gives.

test_vddk_abi.py ties the document to the binding's classes and to the
fake's C structures; these tests close the loop through the whole program
(command line, re-exec, engine, ctypes) with a real NBD client.
"""

import struct
import subprocess

from conftest import CLIENT_ENV, need, run
from fake_vddk.fixtures import fake_vddk  # noqa: F401 (fixture)
from test_vddk_abi import DOCUMENTED_LAYOUT

THUMBPRINT = ":".join(["B2"] * 20)


def _field(raw, path, fmt):
    offset, size = DOCUMENTED_LAYOUT[path]
    assert struct.calcsize(fmt) == size
    return struct.unpack_from(fmt, raw, offset)[0]


def _serve_remote(start_server, fake, *credentials):
    disk = fake.remote_disk("datastore1", "vm-16/vm-16.vmdk",
                            size=1024 * 1024)
    server = start_server(
        "vddk", "libdir=" + fake.libdir, "server=esxi.example.com",
        "thumbprint=" + THUMBPRINT, "vm=moref=vm-16", "port=8443",
        "nfchostport=9902", "snapshot=snapshot-3", "transports=nbd:nbdssl",
        "file=" + disk, *credentials, env=fake.env)
    run([need("nbdinfo"), "--size", server.uri])
    server.stop()
    calls = fake.calls("ConnectEx")
    assert calls, "the fake saw no ConnectEx:\n" + server.log()
    return calls[-1]


def test_password_connection_reaches_documented_offsets(fake_vddk,
                                                       start_server):
    call = _serve_remote(start_server, fake_vddk, "user=root",
                         "password=vmware pass")
    raw = call.raw("params")
    assert len(raw) == DOCUMENTED_LAYOUT["ConnectParams"]
    assert _field(raw, "ConnectParams.credType", "<i") == 1     # UID
    assert _field(raw, "ConnectParams.port", "<I") == 8443
    assert _field(raw, "ConnectParams.nfcHostPort", "<I") == 9902
    assert _field(raw, "ConnectParams.specType", "<i") == 0     # VMX
    for pointer in ("vmxSpec", "serverName", "thumbPrint",
                    "creds.uid.userName", "creds.uid.password"):
        assert _field(raw, "ConnectParams." + pointer, "<Q") != 0, pointer
    assert _field(raw, "ConnectParams.creds.sessionId.key", "<Q") == 0
    assert (call["vmxSpec"], call["serverName"], call["thumbPrint"],
            call["userName"], call["password"], call["cookie"]) == (
        "moref=vm-16", "esxi.example.com", THUMBPRINT, "root",
        "vmware pass", None)
    assert (call["snapshot"], call["transports"]) == \
        ("snapshot-3", "nbd:nbdssl")


def test_cookie_connection_uses_session_id_credentials(fake_vddk,
                                                       start_server):
    call = _serve_remote(start_server, fake_vddk, "user=root",
                         "cookie=vmware_soap_session=\"52a1\"")
    raw = call.raw("params")
    assert _field(raw, "ConnectParams.credType", "<i") == 2     # SESSIONID
    assert _field(raw, "ConnectParams.creds.sessionId.cookie", "<Q") != 0
    assert _field(raw, "ConnectParams.creds.sessionId.userName", "<Q") != 0
    assert (call["cookie"], call["userName"], call["password"]) == \
        ("vmware_soap_session=\"52a1\"", "root", None)


def test_local_connection_has_no_server_or_credentials(fake_vddk,
                                                       start_server):
    disk = fake_vddk.local_disk(size=1024 * 1024)
    server = start_server("vddk", "libdir=" + fake_vddk.libdir,
                          "file=" + disk, env=fake_vddk.env)
    run([need("nbdinfo"), "--size", server.uri])
    server.stop()
    raw = fake_vddk.calls("ConnectEx")[-1].raw("params")
    assert raw == bytes(len(raw)), "a local ConnectParams is all zeroes"


def test_create_params_reach_documented_offsets(fake_vddk, start_server,
                                                tmp_path):
    path = str(tmp_path / "created.vmdk")
    server = start_server(
        "vddk", "libdir=" + fake_vddk.libdir, "file=" + path, "create=true",
        "create-size=3M", "create-type=vmfs-flat",
        "create-adapter-type=scsi-lsilogic", "create-hwversion=esx65",
        env=fake_vddk.env)
    out = run([need("nbdinfo"), "--size", server.uri]).stdout
    server.stop()
    assert int(out) == 3 * 1024 * 1024
    raw = fake_vddk.calls("Create")[-1].raw("params")
    assert len(raw) == DOCUMENTED_LAYOUT["CreateParams"]
    assert _field(raw, "CreateParams.diskType", "<i") == 5      # VMFS_FLAT
    assert _field(raw, "CreateParams.adapterType", "<i") == 3   # LSILOGIC
    assert _field(raw, "CreateParams.hwVersion", "<H") == 13    # ESX65
    assert _field(raw, "CreateParams.capacity", "<Q") == 3 * 2048


def test_concurrent_clients_never_overlap_open_and_close(fake_vddk,
                                                         start_server):
    """VDDK crashes when Open or Close run in two threads at once; the
    fake records such overlaps, and the server must cause none."""
    disk = fake_vddk.local_disk(size=1024 * 1024)
    server = start_server("vddk", "libdir=" + fake_vddk.libdir,
                          "file=" + disk, env=fake_vddk.env)
    clients = [subprocess.Popen([need("nbdinfo"), "--size", server.uri],
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=CLIENT_ENV)
               for _ in range(6)]
    outputs = [client.communicate(timeout=60) for client in clients]
    server.stop()
    assert [out.strip() for out, _ in outputs] == [b"1048576"] * 6, outputs
    assert fake_vddk.call_names().count("Open") == 6
    assert fake_vddk.call_names().count("Close") == 6
    assert not fake_vddk.calls("Overlap")
