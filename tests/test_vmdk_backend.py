"""backend=native as the server sees it: parameters, engine capabilities,
holes in reads, extents flags."""

import errno

import pytest

from conftest import need, run
from vddktool.engine import (EXTENT_HOLE, EXTENT_ZERO, FLAG_FUA, FLAG_REQ_ONE,
                             EngineError, Extent, UsageError)
from vddktool.params import defaults
from vddktool.vmdk.backend import NativeBackend

MiB = 1024 * 1024
HOLE_ZERO = EXTENT_HOLE | EXTENT_ZERO


def backend_for(readonly=False, **values):
    params = defaults()
    params.update(dict((k.replace("_", "-"), v) for k, v in values.items()))
    return NativeBackend(params, readonly)


@pytest.fixture
def image(tmp_path):
    """16 MiB sparse: 64 KiB of 0xaa at 1 MiB, everything else a hole."""
    path = tmp_path / "b.vmdk"
    need("qemu-img")
    run(["qemu-img", "create", "-q", "-f", "vmdk", str(path), "16M"])
    run(["qemu-io", "-f", "vmdk", "-c", "write -P 0xaa 1M 64k", str(path)])
    return path


@pytest.fixture
def served(image):
    backend = backend_for(file=str(image))
    backend.config_complete()
    backend.get_ready()
    backend.after_fork()
    yield backend
    backend.cleanup()


@pytest.mark.parametrize("values,start", [
    ({}, "file: no disk"),
    ({"file": "rel/x.vmdk"}, "file: 'rel/x.vmdk' is a relative path"),
    ({"file": "/nonexistent/x.vmdk"}, "file: /nonexistent/x.vmdk does not"),
    ({"file": "/nonexistent.vmdk", "create": True}, "create-size: needed"),
    ({"file": "/tmp", "create": False}, "file: /tmp is a directory"),
])
def test_parameter_mistakes_are_one_line_naming_the_parameter(values, start):
    with pytest.raises(UsageError) as err:
        backend_for(**values).config_complete()
    assert str(err.value).startswith(start)
    assert "\n" not in str(err.value)


def test_a_damaged_file_is_a_usage_error_before_serving(tmp_path):
    path = tmp_path / "bad.vmdk"
    path.write_bytes(b"KDMV" + bytes(508))
    backend = backend_for(file=str(path))
    backend.config_complete()
    with pytest.raises(UsageError) as err:
        backend.get_ready()
    assert str(err.value).startswith("file: %s: " % path)


def test_any_export_name_opens_the_one_disk(served):
    first = served.open("", False)
    other = served.open("whatever/name", False)
    assert first.disk is other.disk
    assert first.get_size() == other.get_size() == 16 * MiB
    assert served.describe("") == "VMDK monolithicSparse %s" % served.path


def test_capabilities_of_a_writable_sparse_disk(served):
    engine = served.open("", False)
    assert engine.can_write() and engine.can_zero() and engine.can_trim()
    assert engine.can_flush() and engine.can_extents()
    assert engine.can_multi_conn()
    assert engine.block_size() == (1, 65536, 64 * MiB)


def test_a_readonly_connection_refuses_writes(served):
    engine = served.open("", True)
    assert not engine.can_write()
    with pytest.raises(EngineError) as err:
        engine.pwrite(b"x", 0)
    assert err.value.errno == errno.EPERM


def test_minus_r_opens_the_file_read_only(image):
    backend = backend_for(readonly=True, file=str(image))
    backend.get_ready()
    try:
        assert not backend.disk.writable
        assert not backend.open("", False).can_write()
    finally:
        backend.cleanup()


def test_sparse_reads_report_holes(served):
    engine = served.open("", False)
    pieces = engine.pread_sparse(2 * MiB, 0)
    assert [(pos, data is None) for pos, data in pieces] == [
        (0, True), (MiB, False), (MiB + 65536, True)]
    assert bytes(pieces[1][1]) == b"\xaa" * 65536
    assert bytes(engine.pread(8, MiB - 4)) == bytes(4) + b"\xaa" * 4


def test_extents_flags_follow_the_grain_tables(served):
    engine = served.open("", False)
    assert engine.extents(4 * MiB, 0) == [
        Extent(0, MiB, HOLE_ZERO), Extent(MiB, 65536, 0),
        Extent(MiB + 65536, 3 * MiB - 65536, HOLE_ZERO)]
    assert engine.extents(4 * MiB, 0, FLAG_REQ_ONE) == [
        Extent(0, MiB, HOLE_ZERO)]


def test_writes_with_fua_are_seen_by_another_connection(served):
    one = served.open_engine("", False)
    two = served.open_engine("other", False)
    one.pwrite(b"\x42" * 4096, 8 * MiB, FLAG_FUA)
    assert bytes(two.pread(4096, 8 * MiB)) == b"\x42" * 4096
    assert two.extents(65536, 8 * MiB)[0].flags == 0
    one.zero(4096, 8 * MiB)
    assert bytes(two.pread(4096, 8 * MiB)) == bytes(4096)


def test_create_true_makes_and_serves_a_new_disk(tmp_path):
    path = tmp_path / "new.vmdk"
    backend = backend_for(file=str(path), create=True, create_size=MiB)
    backend.config_complete()
    backend.get_ready()
    try:
        engine = backend.open("", False)
        assert engine.get_size() == MiB
        engine.pwrite(b"new", 0)
    finally:
        backend.cleanup()
    run(["qemu-img", "check", str(path)])


def test_create_refuses_an_existing_file(image):
    backend = backend_for(file=str(image), create=True, create_size=MiB)
    with pytest.raises(UsageError, match="already exists"):
        backend.config_complete()


def test_a_file_we_may_not_write_is_served_read_only(image, monkeypatch,
                                                     capfd):
    from vddktool.vmdk import backend as backend_module
    from vddktool.vmdk.extent import VmdkError
    real_disk = backend_module.Disk

    def disk_refusing_writes(path, writable=False, **options):
        if writable:
            error = VmdkError("%s: cannot open: Permission denied" % path)
            error.errno = errno.EACCES
            raise error
        return real_disk(path, writable, **options)

    monkeypatch.setattr(backend_module, "Disk", disk_refusing_writes)
    backend = backend_for(file=str(image))
    backend.get_ready()
    try:
        assert not backend.open("", False).can_write()
    finally:
        backend.cleanup()
    assert "serving read-only" in capfd.readouterr().err


def test_a_new_stream_is_not_offered_to_several_connections(tmp_path):
    backend = backend_for(file=str(tmp_path / "st.vmdk"), create=True,
                          create_size=4 * MiB,
                          create_type="stream-optimized")
    backend.config_complete()
    backend.get_ready()
    try:
        assert backend.describe("").startswith("VMDK streamOptimized ")
        assert not backend.open("", False).can_multi_conn()
        # Reading only: nothing to keep in order.
        assert backend.open("", True).can_multi_conn()
    finally:
        backend.cleanup()
