"""The VDDK engine driven in-process against the fake libvixDiskLib.

These tests call VddkBackend/VddkEngine directly, the way the server does,
and check both what the engine returns and what the fake library saw.
"""

import errno
import os
import threading

import pytest

from fake_vddk.fixtures import (fake_vddk, load_helpers,  # noqa: F401
                                make_fake_vddk)
from vddktool import log, params
from vddktool.engine import EXTENT_HOLE, EXTENT_ZERO, FLAG_FUA, EngineError
from vddktool.vddk import abi
from vddktool.vddk.backend import VddkBackend
from vddktool.vddk import completions
from vddktool.vddk.stats import STATS

MiB = 1024 * 1024
CHUNK = 128 * 512

REMOTE = dict(server="esxi.example.com",
              thumbprint=":".join(["B2"] * 20),
              user="root", password=params.Secret("vmware"),
              vm="moref=vm-16")


def pattern(size, seed=0):
    return bytes((i * 7 + seed + i // 512) % 251 for i in range(size))


@pytest.fixture
def steer(monkeypatch):
    """Apply a FakeVddk's environment to this process (the fake reads it
    at each call) and keep the library's directory on LD_LIBRARY_PATH so
    get_ready never re-executes pytest."""
    def apply(fake):
        for name, value in fake.env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("LD_LIBRARY_PATH", os.path.dirname(fake.library))
    return apply


@pytest.fixture
def backend_for(steer):
    made = []

    def make(fake, readonly=False, **values):
        steer(fake)
        settings = params.defaults()
        settings["libdir"] = fake.libdir
        settings.update(values)
        backend = VddkBackend(settings, readonly)
        backend.config_complete()
        backend.get_ready()
        backend.after_fork()
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.cleanup()


@pytest.fixture
def open_engine(backend_for):
    engines = []

    def make(fake, export_name="", readonly=False, **values):
        engine = backend_for(fake, **values).open_engine(export_name, readonly)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def test_size_comes_from_get_info(fake_vddk, open_engine):
    disk = fake_vddk.local_disk(size=3 * MiB + 5 * 512)
    engine = open_engine(fake_vddk, file=disk)
    assert engine.get_size() == 3 * MiB + 5 * 512
    assert "GetInfo" in fake_vddk.call_names()


def test_block_size_is_whole_sectors(fake_vddk, open_engine):
    engine = open_engine(fake_vddk, file=fake_vddk.local_disk())
    minimum, preferred, maximum = engine.block_size()
    assert minimum == 512
    assert preferred >= 4096 and preferred % 512 == 0
    assert maximum >= preferred and maximum % 512 == 0


@pytest.mark.parametrize("count,offset", [(100, 0), (512, 100), (513, 512)])
def test_unaligned_read_is_refused_with_einval(fake_vddk, open_engine,
                                               count, offset):
    engine = open_engine(fake_vddk, file=fake_vddk.local_disk())
    with pytest.raises(EngineError) as caught:
        engine.pread(count, offset)
    assert caught.value.errno == errno.EINVAL
    assert not fake_vddk.calls("ReadAsync")


def test_read_returns_the_disk_through_read_async(fake_vddk, open_engine):
    data = pattern(MiB)
    disk = fake_vddk.local_disk(size=MiB, data=data)
    engine = open_engine(fake_vddk, file=disk)
    assert bytes(engine.pread(8192, 4096)) == data[4096:4096 + 8192]
    call = fake_vddk.calls("ReadAsync")[-1]
    assert (call.number("sector"), call.number("count")) == (8, 16)
    assert not fake_vddk.calls("Read")


def test_write_with_fua_lands_and_flushes(fake_vddk, open_engine):
    disk = fake_vddk.local_disk(size=MiB)
    engine = open_engine(fake_vddk, file=disk)
    engine.pwrite(bytearray(b"\xab" * 1024), 2048, FLAG_FUA)
    with open(disk, "rb") as f:
        f.seek(2048)
        assert f.read(1024) == b"\xab" * 1024
    names = fake_vddk.call_names()
    assert names.index("WriteAsync") < names.index("Flush")


def test_write_accepts_bytes_and_memoryviews(fake_vddk, open_engine):
    disk = fake_vddk.local_disk(size=MiB)
    engine = open_engine(fake_vddk, file=disk)
    engine.pwrite(b"\x01" * 512, 0)
    engine.pwrite(memoryview(b"\x02" * 1024)[512:], 512)
    assert bytes(engine.pread(1024, 0)) == b"\x01" * 512 + b"\x02" * 512


def test_flush_waits_for_queued_requests_first(fake_vddk, open_engine):
    engine = open_engine(fake_vddk, file=fake_vddk.local_disk())
    engine.flush()
    names = fake_vddk.call_names()
    assert names[-2:] == ["Wait", "Flush"]


def test_concurrent_requests_each_get_their_own_data(fake_vddk,
                                                     open_engine):
    data = pattern(MiB, seed=3)
    engine = open_engine(fake_vddk,
                         file=fake_vddk.local_disk(size=MiB, data=data))
    offsets = list(range(0, MiB, 64 * 1024))
    results = {}

    def read(offset):
        results[offset] = bytes(engine.pread(64 * 1024, offset))

    threads = [threading.Thread(target=read, args=(o,)) for o in offsets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == offsets
    for offset in offsets:
        assert results[offset] == data[offset:offset + 64 * 1024], offset


def test_requests_of_one_engine_are_in_flight_together(
        fake_vddk, open_engine, monkeypatch):
    monkeypatch.setenv("FAKE_VDDK_ASYNC_DELAY_US", "50000")
    engine = open_engine(fake_vddk, file=fake_vddk.local_disk(size=MiB))
    threads = [threading.Thread(target=engine.pread, args=(4096, n * 4096))
               for n in range(8)]
    for thread in threads:
        thread.start()
    most = 0
    while any(thread.is_alive() for thread in threads):
        most = max(most, completions.in_flight())
    for thread in threads:
        thread.join()
    assert most >= 2
    assert completions.in_flight() == 0


def test_read_fault_is_eio_with_vddk_text_and_next_read_works(
        fake_vddk, open_engine, capfd):
    fake_vddk.fail_read_at(MiB // 2)
    engine = open_engine(fake_vddk, file=fake_vddk.local_disk(size=MiB))
    with pytest.raises(EngineError) as caught:
        engine.pread(4096, MiB // 2 - 512)
    assert caught.value.errno == errno.EIO
    assert "VixDiskLib_ReadAsync" in caught.value.message
    assert "VixError" in caught.value.message
    # The server logs the failure with the request it belongs to; the
    # engine logging it too would say it twice.
    assert "VixDiskLib_ReadAsync" not in capfd.readouterr().err
    assert len(engine.pread(4096, 0)) == 4096


def test_write_fault_is_eio(fake_vddk, open_engine):
    fake_vddk.fail_write_at(8192)
    engine = open_engine(fake_vddk, file=fake_vddk.local_disk(size=MiB))
    with pytest.raises(EngineError) as caught:
        engine.pwrite(bytearray(1024), 8192)
    assert caught.value.errno == errno.EIO
    engine.pwrite(bytearray(1024), 0)


def test_failed_open_is_an_error_and_disconnects(fake_vddk, backend_for):
    fake_vddk.fail_open()
    backend = backend_for(fake_vddk, file=fake_vddk.local_disk())
    with pytest.raises(EngineError) as caught:
        backend.open("", False)
    assert "VixDiskLib_Open" in str(caught.value)
    assert "run with -v" in str(caught.value)
    assert fake_vddk.call_names()[-1] == "Disconnect"


def test_close_waits_closes_and_disconnects(fake_vddk, backend_for):
    backend = backend_for(fake_vddk, file=fake_vddk.local_disk())
    backend.open("", False).close()
    assert fake_vddk.call_names()[-3:] == ["Wait", "Close", "Disconnect"]


def test_init_happens_after_fork_and_exit_at_cleanup(fake_vddk, steer,
                                                    tmp_path):
    steer(fake_vddk)
    config = tmp_path / "vddk.conf"
    config.write_text("")
    settings = params.defaults()
    settings.update(libdir=fake_vddk.libdir, file=fake_vddk.local_disk(),
                    config=str(config))
    backend = VddkBackend(settings)
    backend.config_complete()
    backend.get_ready()
    assert "InitEx" not in fake_vddk.call_names()
    backend.after_fork()
    init = fake_vddk.calls("InitEx")[0]
    assert (init["libdir"], init["config"]) == (fake_vddk.libdir,
                                                str(config))
    backend.cleanup()
    assert fake_vddk.call_names()[-1] == "Exit"


def test_everything_the_library_hands_out_is_given_back(fake_vddk,
                                                         backend_for):
    fake_vddk.fail_read_at(0)
    backend = backend_for(fake_vddk,
                          file=fake_vddk.local_disk(size=MiB, data=b"x"))
    helpers = load_helpers(fake_vddk.library)
    for _ in range(2):
        engine = backend.open("", False)
        assert helpers.fake_vddk_outstanding() > 0   # the ConnectParams
        with pytest.raises(EngineError):
            engine.pread(512, 0)            # error text
        engine.extents(MiB, 0)              # block list
        engine.close()                      # info, connect params
    assert helpers.fake_vddk_outstanding() == 0


def test_open_and_close_never_overlap(fake_vddk, backend_for,
                                      monkeypatch):
    monkeypatch.setenv("FAKE_VDDK_OPEN_CLOSE_PAUSE_MS", "20")
    backend = backend_for(fake_vddk, file=fake_vddk.local_disk())
    engines = []

    def open_one():
        engines.append(backend.open("", True))

    def run_all(targets):
        threads = [threading.Thread(target=t) for t in targets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)

    run_all([open_one] * 6)
    assert len(engines) == 6
    run_all([engine.close for engine in engines])
    names = fake_vddk.call_names()
    assert names.count("Open") == names.count("Close") == 6
    assert "Overlap" not in names


# -- open flags and connection parameters


@pytest.mark.parametrize("values,readonly,flags", [
    ({}, False, 0),
    ({}, True, abi.FLAG_OPEN_READ_ONLY),
    ({"single-link": True}, False, abi.FLAG_OPEN_SINGLE_LINK),
    ({"unbuffered": True}, False, abi.FLAG_OPEN_UNBUFFERED),
    ({"compression": "zlib"}, False, abi.FLAG_OPEN_COMPRESSION_ZLIB),
    ({"compression": "fastlz"}, False, abi.FLAG_OPEN_COMPRESSION_FASTLZ),
    ({"compression": "skipz"}, True,
     abi.FLAG_OPEN_COMPRESSION_SKIPZ | abi.FLAG_OPEN_READ_ONLY),
])
def test_parameters_become_open_flags(fake_vddk, open_engine, values,
                                      readonly, flags):
    open_engine(fake_vddk, file=fake_vddk.local_disk(), readonly=readonly,
                **values)
    assert fake_vddk.calls("Open")[-1].number("flags") == flags
    assert fake_vddk.calls("ConnectEx")[-1]["readOnly"] == \
        ("1" if readonly else "0")


def test_local_connection_has_no_server_or_credentials(fake_vddk,
                                                       open_engine):
    open_engine(fake_vddk, file=fake_vddk.local_disk())
    call = fake_vddk.calls("ConnectEx")[-1]
    for field in ("serverName", "vmxSpec", "userName", "password",
                  "cookie", "thumbPrint"):
        assert call[field] is None, field


def test_remote_parameters_reach_connect(fake_vddk, open_engine):
    name = fake_vddk.remote_disk("datastore1", "Fedora/Fedora.vmdk")
    open_engine(fake_vddk, file=name, port=4443, nfchostport=9020,
                snapshot="snapshot-3", transports="nbd:nbdssl", **REMOTE)
    call = fake_vddk.calls("ConnectEx")[-1]
    assert call["serverName"] == "esxi.example.com"
    assert call["thumbPrint"] == REMOTE["thumbprint"]
    assert call["vmxSpec"] == "moref=vm-16"
    assert (call["userName"], call["password"]) == ("root", "vmware")
    assert call.number("credType") == abi.CRED_UID
    assert (call.number("port"), call.number("nfcHostPort")) == (4443, 9020)
    assert (call["snapshot"], call["transports"]) == ("snapshot-3",
                                                      "nbd:nbdssl")
    assert fake_vddk.calls("Open")[-1]["path"] == name


def test_cookie_switches_to_session_credentials(fake_vddk, open_engine):
    name = fake_vddk.remote_disk()
    values = dict(REMOTE, password=None,
                  cookie=params.Secret("vmware_soap_session=5a"))
    open_engine(fake_vddk, file=name, **values)
    call = fake_vddk.calls("ConnectEx")[-1]
    assert call.number("credType") == abi.CRED_SESSIONID
    assert call["cookie"] == "vmware_soap_session=5a"
    assert call["password"] is None


def test_wrong_thumbprint_fails_connect_with_vddk_text(fake_vddk,
                                                      backend_for):
    name = fake_vddk.remote_disk()
    fake_vddk.expect(thumbprint=":".join(["C3"] * 20))
    backend = backend_for(fake_vddk, file=name, **REMOTE)
    with pytest.raises(EngineError) as caught:
        backend.open("", False)
    assert "VixDiskLib_ConnectEx" in str(caught.value)


# -- export=WILDCARD


def test_export_wildcard_opens_matching_names(fake_vddk, open_engine):
    name = fake_vddk.remote_disk("datastore1", "Fedora/Fedora.vmdk",
                                 size=2 * MiB)
    engine = open_engine(fake_vddk, export_name=name,
                         export=r"\[datastore1\] Fedora/*.vmdk", **REMOTE)
    assert engine.get_size() == 2 * MiB
    assert fake_vddk.calls("Open")[-1]["path"] == name


@pytest.mark.parametrize("export_name", [
    "", "[datastore2] Fedora/Fedora.vmdk", "[datastore1] Other/Fedora.vmdk",
    "[datastore1] Fedora/Fedora.vmdk.bak"])
def test_export_wildcard_refuses_other_names(fake_vddk, backend_for,
                                             export_name):
    backend = backend_for(fake_vddk, export=r"\[datastore1\] Fedora/*.vmdk",
                          **REMOTE)
    with pytest.raises(EngineError) as caught:
        backend.open(export_name, False)
    assert caught.value.errno == errno.ENOENT
    assert not fake_vddk.calls("ConnectEx")


# -- create=true


@pytest.mark.parametrize("create_type", sorted(params.CREATE_TYPES))
def test_create_passes_every_create_type(fake_vddk, open_engine, tmp_path,
                                         create_type):
    path = str(tmp_path / "new.vmdk")
    engine = open_engine(fake_vddk, file=path, create=True,
                         **{"create-size": 10 * MiB,
                            "create-type": create_type})
    call = fake_vddk.calls("Create")[0]
    assert call["path"] == path
    assert call.number("diskType") == params.CREATE_TYPES[create_type]
    assert call.number("capacity") == 10 * MiB // 512
    assert engine.get_size() == 10 * MiB


def test_create_defaults_and_choices(fake_vddk, open_engine, tmp_path):
    path = str(tmp_path / "new.vmdk")
    open_engine(fake_vddk, file=path, create=True,
                **{"create-size": MiB, "create-adapter-type": "ide",
                   "create-hwversion": params.HWVERSIONS["esx65"]})
    call = fake_vddk.calls("Create")[0]
    assert call.number("adapterType") == abi.ADAPTER_IDE
    assert call.number("hwVersion") == abi.HWVERSION_ESX65
    assert call.number("diskType") == abi.DISK_MONOLITHIC_SPARSE
    names = fake_vddk.call_names()
    assert names.index("Create") < names.index("Open")


# -- extents


def test_extents_report_holes_and_data(fake_vddk, open_engine):
    disk = fake_vddk.local_disk(size=4 * MiB)
    with open(disk, "r+b") as f:
        f.seek(MiB)
        f.write(b"x" * 4096)
    engine = open_engine(fake_vddk, file=disk)
    assert engine.can_extents()
    extents = engine.extents(4 * MiB, 0)
    assert extents[0].offset == 0
    assert sum(e.length for e in extents) == 4 * MiB
    data = [e for e in extents if e.flags == 0]
    assert data and all(e.offset <= MiB < e.offset + e.length
                        for e in data[:1])
    assert all(e.flags == EXTENT_HOLE | EXTENT_ZERO
               for e in extents if e not in data)


def test_extent_queries_follow_the_chunk_rules(fake_vddk, open_engine):
    engine = open_engine(fake_vddk,
                         file=fake_vddk.local_disk(size=4 * MiB))
    extents = engine.extents(5000 * 512 - 3 * 512, 3 * 512)
    assert extents[0].offset == 3 * 512
    for call in fake_vddk.calls("QueryAllocatedBlocks"):
        assert call.number("chunk") == 128
        assert call.number("start") % 128 == 0
        assert call.number("count") % 128 == 0
        assert call.number("count") // 128 <= 512 * 1024


def test_partial_last_chunk_is_reported_as_data(fake_vddk, open_engine):
    size = 2 * CHUNK + 3 * 512
    engine = open_engine(fake_vddk, file=fake_vddk.local_disk(size=size))
    extents = engine.extents(size - 2 * CHUNK, 2 * CHUNK)
    assert [(e.offset, e.length, e.flags) for e in extents] == \
        [(2 * CHUNK, 3 * 512, 0)]
    for call in fake_vddk.calls("QueryAllocatedBlocks"):
        assert call.number("start") + call.number("count") <= 2 * 128


def test_no_extents_without_query_allocated_blocks(make_fake_vddk,
                                                   open_engine):
    fake = make_fake_vddk(major=6, optional=False)
    engine = open_engine(fake, file=fake.local_disk())
    assert not engine.can_extents()


# -- statistics


@pytest.fixture
def stats_flag(monkeypatch):
    """-D vddk.stats=1: only then are completions timed."""
    monkeypatch.setitem(log._flags, "vddk.stats", 1)


def test_stats_count_calls_and_bytes(fake_vddk, open_engine, stats_flag):
    engine = open_engine(fake_vddk, file=fake_vddk.local_disk(size=MiB))
    before = STATS.snapshot().get("ReadAsync", (0, 0, 0))
    engine.pread(8192, 0)
    engine.pread(4096, 8192)
    seconds, calls, nbytes = STATS.snapshot()["ReadAsync"]
    assert calls - before[1] == 2
    assert nbytes - before[2] == 12288
    assert seconds >= before[0]


def test_no_timing_without_the_stats_flag(fake_vddk, open_engine):
    engine = open_engine(fake_vddk, file=fake_vddk.local_disk(size=MiB))
    before = STATS.snapshot().get("ReadAsync", (0, 0, 0))
    engine.pread(8192, 0)
    assert STATS.snapshot().get("ReadAsync", (0, 0, 0)) == before


def test_stats_table_is_sorted_by_time(fake_vddk, open_engine, stats_flag):
    engine = open_engine(fake_vddk, file=fake_vddk.local_disk(size=MiB))
    engine.pread(4096, 0)
    lines = STATS.report_lines()
    times = [int(line.split()[1]) for line in lines[2:]]
    assert times == sorted(times, reverse=True)
    assert any(line.split()[0] == "ReadAsync" for line in lines[2:])


def test_vddk_messages_go_to_debug_with_secrets_masked(capfd):
    log.configure(verbose=True)
    try:
        router = abi.MessageRouter(["hunter2"])
        router._on_log(b"login root/hunter2 ok\n", None)
    finally:
        log.configure(verbose=False)
    err = capfd.readouterr().err
    assert "debug: login root/*** ok" in err
    assert "hunter2" not in err
