"""create-type=stream-optimized: StreamWriter takes forward writes that
arrive out of order and leaves a stream qemu-img checks and compares."""

import random
import struct
import threading

import pytest

from conftest import need, run
from vmdk_fixtures import (mapped, random_disk, read_all,
                           stream_grain_sectors)
from vddktool.vmdk.extent import DATA, UNALLOCATED, VmdkError
from vddktool.vmdk import stream_writer
from vddktool.vmdk.stream import StreamExtent
from vddktool.vmdk.stream_writer import StreamWriter, create_stream_optimized

GRAIN = 64 * 1024
MIB = 1024 * 1024


def qemu_accepts(tmp_path, image, data):
    """qemu-img check passes and the image equals ``data``."""
    need("qemu-img")
    raw = tmp_path / "expected.raw"
    raw.write_bytes(data)
    run(["qemu-img", "check", image])
    assert "identical" in run(["qemu-img", "compare", image,
                               str(raw)]).stdout


def write_shuffled(writer, data, request, seed, spread=16):
    """Write ``data`` in requests of ``request`` bytes, reordered within
    groups of ``spread`` as a client with requests in flight would."""
    offsets = list(range(0, len(data), request))
    rng = random.Random(seed)
    for start in range(0, len(offsets), spread):
        group = offsets[start:start + spread]
        rng.shuffle(group)
        for offset in group:
            writer.write(offset, data[offset:offset + request])


def test_out_of_order_writes_make_a_valid_stream(tmp_path):
    data = random_disk(5 * MIB, 1, chunk=GRAIN)
    path = str(tmp_path / "new.vmdk")
    writer = create_stream_optimized(path, len(data), "scsi-lsilogic", 7)
    write_shuffled(writer, data, 256 * 1024, seed=1)
    writer.close()
    qemu_accepts(tmp_path, path, data)
    extent = StreamExtent(path, len(data))
    try:
        assert read_all(extent) == data
        # Zero grains were not stored.
        for offset, length, state in mapped(extent):
            for grain in range(offset, offset + length, GRAIN):
                chunk = data[grain:grain + GRAIN]
                assert (state == DATA) == any(chunk)
    finally:
        extent.close()


def test_writes_from_many_threads(tmp_path):
    # The server calls write from one thread per request in flight.
    data = random_disk(4 * MIB, 6, chunk=GRAIN)
    path = str(tmp_path / "threads.vmdk")
    writer = create_stream_optimized(path, len(data), "ide", 4)
    offsets = list(range(0, len(data), 32 * 1024))
    lock = threading.Lock()
    errors = []

    def worker():
        while True:
            with lock:
                if not offsets:
                    return
                offset = offsets.pop(0)
            try:
                writer.write(offset, data[offset:offset + 32 * 1024])
            except Exception as exc:          # reported by the assert
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    assert errors == []
    qemu_accepts(tmp_path, path, data)


def test_grains_compressed_out_of_order_are_appended_in_order(
        tmp_path, monkeypatch):
    # Thread A finishes grain 0 but compresses slowly; grain 1, finished
    # later, is compressed first.  The file must still hold grain 0 first,
    # and a flush must wait for grain 0.
    release = threading.Event()
    real_compress = stream_writer._compress_grain

    def slow_for_grain_zero(data):
        if data[:1] == b"\x01":
            assert release.wait(10)
        return real_compress(data)

    monkeypatch.setattr(stream_writer, "_compress_grain", slow_for_grain_zero)
    path = str(tmp_path / "order.vmdk")
    writer = create_stream_optimized(path, MIB, "ide", 4)
    slow = threading.Thread(target=writer.write, args=(0, b"\x01" * GRAIN))
    slow.start()
    while 0 not in writer._finishing:
        slow.join(0.01)
    writer.write(GRAIN, b"\x02" * GRAIN)
    assert writer.map(0, 2 * GRAIN) == [(2 * GRAIN, DATA)]
    assert bytes(writer.read(0, 4)[0][1]) == b"\x01" * 4
    flusher = threading.Thread(target=writer.flush)
    flusher.start()
    flusher.join(0.2)
    assert flusher.is_alive()                # waiting for grain 0
    release.set()
    slow.join(10)
    flusher.join(10)
    writer.close()
    sectors = stream_grain_sectors(path)
    assert sectors[0] < sectors[1]
    expected = b"\x01" * GRAIN + b"\x02" * GRAIN + bytes(MIB - 2 * GRAIN)
    qemu_accepts(tmp_path, path, expected)


def test_vmware_layout_and_descriptor(tmp_path):
    path = str(tmp_path / "new.vmdk")
    writer = create_stream_optimized(path, MIB, "ide", 6)
    writer.write(0, b"\x55" * GRAIN)
    writer.close()
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:4] == b"KDMV"
    assert struct.unpack_from("<Q", raw, 56)[0] == 0xFFFFFFFFFFFFFFFF
    assert struct.unpack_from("<QII", raw, len(raw) - 512) == (0, 0, 0)
    assert struct.unpack_from("<QII", raw, len(raw) - 1536)[1:] == (0, 3)
    text = raw[512:512 * 21].split(b"\0")[0].decode()
    assert 'createType="streamOptimized"' in text
    assert 'RW 2048 SPARSE "new.vmdk"' in text
    assert 'ddb.adapterType = "ide"' in text
    assert 'ddb.virtualHWVersion = "6"' in text
    info = run(["qemu-img", "info", path]).stdout
    assert "streamOptimized" in info


def test_size_not_a_multiple_of_the_grain(tmp_path):
    data = random_disk(2 * MIB + 5 * 512, 2, hole_every=1000,
                       zero_every=1000)
    path = str(tmp_path / "odd.vmdk")
    writer = create_stream_optimized(path, len(data), "ide", 4)
    write_shuffled(writer, data, 96 * 1024, seed=2)
    writer.close()
    qemu_accepts(tmp_path, path, data)


def test_empty_stream_is_valid(tmp_path):
    path = str(tmp_path / "empty.vmdk")
    create_stream_optimized(path, 3 * MIB, "scsi-buslogic", 4).close()
    qemu_accepts(tmp_path, path, bytes(3 * MIB))


def test_existing_file_is_never_overwritten(tmp_path):
    path = tmp_path / "there.vmdk"
    path.write_bytes(b"precious")
    with pytest.raises(VmdkError, match="there.vmdk"):
        create_stream_optimized(str(path), MIB, "ide", 4)
    assert path.read_bytes() == b"precious"


def test_write_back_to_a_finished_grain_is_refused(tmp_path):
    path = str(tmp_path / "s.vmdk")
    writer = create_stream_optimized(path, MIB, "ide", 4)
    try:
        writer.write(0, b"\x01" * GRAIN)      # complete: compressed now
        with pytest.raises(VmdkError, match="s.vmdk.*in order"):
            writer.write(512, b"\x02" * 512)
    finally:
        writer.close()
    extent = StreamExtent(path, MIB)
    try:
        assert bytes(extent.read(0, GRAIN)[0][1]) == b"\x01" * GRAIN
    finally:
        extent.close()


def test_a_full_buffer_finishes_the_lowest_grains(tmp_path):
    path = str(tmp_path / "s.vmdk")
    writer = StreamWriter(path, 16 * GRAIN, buffer_grains=3)
    try:
        writer.write(0, b"\x07" * 512)            # grain 0, incomplete
        for grain in (9, 11, 13):                 # a fourth grain buffered
            writer.write(grain * GRAIN + 512, b"\x09" * 512)
        with pytest.raises(VmdkError, match="in order"):
            writer.write(512, b"\x08" * 512)      # grain 0 is finished
        writer.write(9 * GRAIN, b"\x0a" * 512)    # grain 9 still buffered
    finally:
        writer.close()
    expected = bytearray(16 * GRAIN)
    expected[:512] = b"\x07" * 512
    for grain in (9, 11, 13):
        expected[grain * GRAIN + 512:grain * GRAIN + 1024] = b"\x09" * 512
    expected[9 * GRAIN:9 * GRAIN + 512] = b"\x0a" * 512
    qemu_accepts(tmp_path, path, bytes(expected))


def test_writes_far_ahead_do_not_finish_earlier_grains(tmp_path):
    # A client skipping a hole of the source writes far ahead while its
    # earlier requests are still in flight.
    size = 4096 * GRAIN
    path = str(tmp_path / "s.vmdk")
    writer = create_stream_optimized(path, size, "ide", 4)
    try:
        writer.write(0, b"\x01" * 1024)
        writer.write(size - GRAIN, b"\x02" * GRAIN)
        writer.write(1024, b"\x03" * 1024)        # still accepted
    finally:
        writer.close()
    extent = StreamExtent(path, size)
    try:
        assert bytes(extent.read(0, 2048)[0][1]) == (
            b"\x01" * 1024 + b"\x03" * 1024)
    finally:
        extent.close()


def test_flush_leaves_a_complete_stream_and_writing_goes_on(tmp_path):
    data = random_disk(2 * MIB, 3, chunk=GRAIN)
    half = MIB
    path = str(tmp_path / "s.vmdk")
    writer = create_stream_optimized(path, len(data), "ide", 4)
    try:
        write_shuffled(writer, data[:half], 128 * 1024, seed=3)
        writer.flush()
        partial = StreamExtent(path, len(data))
        try:
            assert read_all(partial) == data[:half] + bytes(len(data) - half)
        finally:
            partial.close()
        for offset in range(half, len(data), 128 * 1024):
            writer.write(offset, data[offset:offset + 128 * 1024])
    finally:
        writer.close()
    qemu_accepts(tmp_path, path, data)


def test_reads_and_map_while_writing(tmp_path):
    path = str(tmp_path / "s.vmdk")
    writer = create_stream_optimized(path, MIB, "ide", 4)
    try:
        writer.write(0, b"\x03" * GRAIN)          # appended
        writer.write(3 * GRAIN, b"\x04" * 1024)   # still buffered
        assert writer.map(0, 4 * GRAIN) == [
            (GRAIN, DATA), (2 * GRAIN, UNALLOCATED), (GRAIN, DATA)]
        assert read_all(writer)[:4 * GRAIN] == (
            b"\x03" * GRAIN + bytes(2 * GRAIN) + b"\x04" * 1024
            + bytes(GRAIN - 1024))
    finally:
        writer.close()


def test_zero_requests(tmp_path):
    path = str(tmp_path / "s.vmdk")
    writer = create_stream_optimized(path, MIB, "ide", 4)
    try:
        writer.write(2 * GRAIN, b"\x05" * 4096)   # buffered
        writer.zero(2 * GRAIN, 1024)              # zeroes buffered bytes
        writer.zero(0, GRAIN)                     # nothing there: fine
        writer.write(4 * GRAIN, b"\x06" * GRAIN)
        writer.flush()                            # all final now
        writer.zero(0, GRAIN)                     # a finished hole: fine
        with pytest.raises(VmdkError, match="in order"):
            writer.zero(4 * GRAIN, 512)           # finished data: refused
    finally:
        writer.close()
    expected = bytearray(MIB)
    expected[2 * GRAIN + 1024:2 * GRAIN + 4096] = b"\x05" * 3072
    expected[4 * GRAIN:5 * GRAIN] = b"\x06" * GRAIN
    qemu_accepts(tmp_path, path, bytes(expected))


def test_zeroing_far_ahead_does_not_finish_buffered_grains(tmp_path):
    # nbdcopy zeroes the holes of its source as it finds them, possibly
    # far ahead of the data it is still writing.
    size = 2048 * GRAIN
    path = str(tmp_path / "s.vmdk")
    writer = create_stream_optimized(path, size, "ide", 4)
    try:
        writer.write(GRAIN, b"\x0a" * 512)
        writer.zero(size - 2 * GRAIN, 2 * GRAIN)
        writer.write(GRAIN + 512, b"\x0b" * 512)   # still accepted
    finally:
        writer.close()
    extent = StreamExtent(path, size)
    try:
        assert bytes(extent.read(GRAIN, 1024)[0][1]) == (
            b"\x0a" * 512 + b"\x0b" * 512)
    finally:
        extent.close()


def test_writes_outside_the_disk_are_refused(tmp_path):
    path = str(tmp_path / "s.vmdk")
    writer = create_stream_optimized(path, MIB, "ide", 4)
    try:
        with pytest.raises(VmdkError, match="outside"):
            writer.write(MIB - 512, b"x" * 1024)
    finally:
        writer.close()
