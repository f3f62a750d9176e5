"""The VDDK engine on the server's asynchronous path, against the fake
library: many ReadAsync/WriteAsync in flight on one connection, one
thread at a time inside a handle, FLUSH after the writes it covers."""

import ctypes
import threading

import pytest

from conftest import need, run
from fake_vddk.fixtures import fake_vddk, session  # noqa: F401 (fixtures)
from test_vddk_engine import backend_for, steer  # noqa: F401 (fixtures)
from test_vddk_serve import nbdsh, pattern, serve

MiB = 1024 * 1024
# A pause of up to 20 ms per request: requests submitted together are
# still in flight together however loaded the machine is.
SLOW_PAUSE_US = "20000"


def copied_out(server, tmp_path):
    """The disk as nbdcopy reads it on one connection, 32 requests of
    64 KiB in flight."""
    out = str(tmp_path / "copy.raw")
    run([need("nbdcopy"), "--connections=1", "--requests=32",
         "--request-size=65536", server.uri, out])
    with open(out, "rb") as f:
        return f.read()


def most_in_flight(calls):
    """The largest number of async requests the fake held at once, from
    its record of submissions and completions."""
    in_flight = most = 0
    for call in calls:
        if call.name in ("ReadAsync", "WriteAsync"):
            in_flight += 1
            most = max(most, in_flight)
        elif call.name == "Completed":
            in_flight -= 1
    return most


def test_one_connection_keeps_many_reads_in_flight(fake_vddk, start_server,
                                                   tmp_path):
    fake_vddk.env["FAKE_VDDK_RECORD_COMPLETIONS"] = "1"
    data = pattern(16 * MiB)
    server = serve(start_server, fake_vddk,
                   fake_vddk.local_disk(size=16 * MiB, data=data))
    assert copied_out(server, tmp_path) == data
    calls = fake_vddk.calls()
    assert len([c for c in calls if c.name == "ReadAsync"]) >= 256
    # With the fake's 0-2 ms pause, one at a time would be 1.
    assert most_in_flight(calls) >= 8


def test_completions_from_a_few_long_lived_threads(fake_vddk, start_server,
                                                    tmp_path):
    """As VDDK's own background threads deliver them: the fake's pool
    keeps the pause (counted from each submit), so requests still
    overlap and finish out of order."""
    fake_vddk.env["FAKE_VDDK_RECORD_COMPLETIONS"] = "1"
    fake_vddk.env["FAKE_VDDK_COMPLETION_THREADS"] = "3"
    data = pattern(8 * MiB)
    disk = fake_vddk.local_disk(size=8 * MiB, data=data)
    server = serve(start_server, fake_vddk, disk)
    out = str(tmp_path / "copy.raw")
    run([need("nbdcopy"), "--connections=1", "--requests=32",
         "--request-size=65536", server.uri, out])
    source = str(tmp_path / "source.raw")
    with open(source, "wb") as f:
        f.write(pattern(8 * MiB)[::-1])
    run([need("nbdcopy"), "--connections=1", "--requests=32",
         "--request-size=65536", source, server.uri])
    with open(out, "rb") as f:
        assert f.read() == data
    with open(disk, "rb") as f:
        assert f.read() == pattern(8 * MiB)[::-1]
    calls = fake_vddk.calls()
    completed = [c for c in calls if c.name == "Completed"]
    assert len(completed) == 256
    assert len(set(c["thread"] for c in completed)) <= 3
    assert most_in_flight(calls) >= 8
    sectors = [c.number("sector") for c in completed
               if c["op"] == "ReadAsync"]
    assert sectors != sorted(sectors)


def test_no_two_threads_enter_one_handle(fake_vddk, start_server, tmp_path):
    # Each call on a handle lasts 200 us longer: long enough for an
    # overlap between the submitting thread and a flush, block status or
    # the fake's own completions to be seen.
    fake_vddk.env["FAKE_VDDK_HANDLE_PAUSE_US"] = "200"
    data = pattern(8 * MiB)
    disk = fake_vddk.local_disk(size=8 * MiB, data=data)
    server = serve(start_server, fake_vddk, disk)
    copy = str(tmp_path / "copy.raw")
    reader = threading.Thread(target=run, args=(
        [need("nbdcopy"), "--requests=32", server.uri, copy],))
    reader.start()
    nbdsh(server, """
for i in range(64):
    h.aio_pwrite(bytes([i + 1]) * 4096, 4 * 1024 * 1024 + i * 4096)
    if i %% 8 == 0:
        h.aio_flush()
        h.block_status(65536, 0, lambda *args: 0)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
""".replace("%%", "%"), setup="h.add_meta_context('base:allocation')\n")
    reader.join()
    assert not fake_vddk.calls("HandleOverlap"), fake_vddk.calls(
        "HandleOverlap")
    with open(disk, "rb") as f:
        f.seek(4 * MiB)
        written = f.read(64 * 4096)
    assert written == b"".join(bytes([i + 1]) * 4096 for i in range(64))


def test_the_fake_catches_two_threads_in_one_handle(session, fake_vddk,
                                                    monkeypatch):
    """The check above could not fail if the fake missed overlaps."""
    monkeypatch.setenv("FAKE_VDDK_HANDLE_PAUSE_US", "20000")
    connection = session.connect()
    handle = session.open(connection, fake_vddk.local_disk(size=MiB))
    threads = [threading.Thread(target=session.lib.call,
                                args=("GetTransportMode", handle))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    session.lib.check("Close", handle)
    session.lib.check("Disconnect", connection)
    assert [c["call"] for c in fake_vddk.calls("HandleOverlap")] == [
        "GetTransportMode"]
    assert any("another call uses the handle" in w for w in session.warnings)


def test_flush_is_answered_after_the_writes_before_it(fake_vddk,
                                                      start_server):
    fake_vddk.env["FAKE_VDDK_RECORD_COMPLETIONS"] = "1"
    disk = fake_vddk.local_disk(size=MiB)
    server = serve(start_server, fake_vddk, disk)
    nbdsh(server, """
for i in range(16):
    h.aio_pwrite(bytes([i]) * 4096, i * 4096)
h.aio_flush()
while h.aio_in_flight() > 0:
    h.poll(-1)
""")
    names = [(c.name, c["op"] if c.name == "Completed" else None)
             for c in fake_vddk.calls()]
    flush = names.index(("Flush", None))
    completed_writes = [i for i, name in enumerate(names)
                        if name == ("Completed", "WriteAsync")]
    assert len(completed_writes) == 16
    assert max(completed_writes) < flush
    assert names[flush - 1] == ("Wait", None)


def test_a_client_gone_with_requests_in_flight_leaves_nothing_behind(
        fake_vddk, start_server):
    fake_vddk.env["FAKE_VDDK_ASYNC_DELAY_US"] = "50000"
    disk = fake_vddk.local_disk(size=4 * MiB, data=pattern(4 * MiB))
    server = serve(start_server, fake_vddk, disk)
    # nbdsh leaves with 32 reads unanswered (no poll, no shutdown).
    nbdsh(server, """
for i in range(32):
    h.aio_pread(nbd.Buffer(65536), i * 65536)
""")
    # The engine waited for them, then closed; the server serves on.
    out = nbdsh(server, "print(h.pread(512, 0) == %r)" % pattern(512))
    assert out.stdout.strip() == "True"
    server.stop()
    names = fake_vddk.call_names()
    assert names.count("Open") == names.count("Close") == 2
    assert "Overlap" not in names and "HandleOverlap" not in names


@pytest.mark.parametrize("filters", [
    ["--filter=cow", "--filter=cacheextents"],
    # virt-v2v's stack: nbdkit's retry serializes it, ours does not.
    ["--filter=cow", "--filter=cacheextents", "--filter=retry"]])
def test_a_filter_that_changes_reads_keeps_requests_overlapping(
        fake_vddk, start_server, tmp_path, filters):
    """cow reads for itself, and submits the reads of blocks it does not
    hold: requests overlap through it, and through retry below it."""
    fake_vddk.env["FAKE_VDDK_ASYNC_DELAY_US"] = SLOW_PAUSE_US
    fake_vddk.env["FAKE_VDDK_RECORD_COMPLETIONS"] = "1"
    data = pattern(16 * MiB)
    server = serve(start_server, fake_vddk, *filters + [
        fake_vddk.local_disk(size=16 * MiB, data=data)])
    out = str(tmp_path / "copy.raw")
    run([need("nbdcopy"), "--requests=32", server.uri, out])
    with open(out, "rb") as f:
        assert f.read() == data
    assert most_in_flight(fake_vddk.calls()) >= 4


def test_kubevirt_cdi_stack_submits_and_recovers_from_a_fault(
        fake_vddk, start_server, tmp_path):
    """CDI's filters (retry, cacheextents) leave reads submitted: many in
    flight on one connection.  A read that fails is retried after one
    reopen, and the copy comes out whole.  (That a reopen waits for the
    requests running beside it: test_filter_retry.py.)"""
    fake_vddk.env["FAKE_VDDK_ASYNC_DELAY_US"] = SLOW_PAUSE_US
    fake_vddk.env["FAKE_VDDK_RECORD_COMPLETIONS"] = "1"
    data = pattern(16 * MiB)
    disk = fake_vddk.local_disk(size=16 * MiB, data=data)
    fake_vddk.fail_read_at(8 * MiB + 4096, times=1)
    server = serve(start_server, fake_vddk, "-r", "--filter=retry",
                   "--filter=cacheextents", "retry-delay=1", disk)
    assert copied_out(server, tmp_path) == data
    calls = fake_vddk.calls()
    assert most_in_flight(calls) >= 8
    names = [c.name for c in calls if c.name in ("Open", "Close")]
    assert names[:3] == ["Open", "Close", "Open"]
    server.stop()
    assert "HandleOverlap" not in fake_vddk.call_names()


def read_async(session, callback, handle, count, sectors=8):
    """ReadAsync of ``count`` pieces of ``sectors`` each through
    ``callback``; their buffers, by the number passed as data."""
    from vddktool.vddk import abi
    read = session.lib.functions["ReadAsync"]
    buffers = {}
    for index in range(count):
        number = 1000 + index
        buffers[number] = bytearray(sectors * 512)
        array = (ctypes.c_uint8 * (sectors * 512)).from_buffer(
            buffers[number])
        assert read(handle, index * sectors, sectors, array, callback,
                    number) == abi.VIX_ASYNC
    return buffers


@pytest.mark.parametrize("pool", ["", "2"])
def test_queued_completions_carry_data_and_result(session, fake_vddk,
                                                  monkeypatch, pool):
    """VDDK's callback only queues: what arrives is the data and result
    VDDK passed (a failed read's error too), from its own threads, with
    a new thread per request or from long-lived ones."""
    from vddktool.vddk import abi, completions
    monkeypatch.setenv("FAKE_VDDK_COMPLETION_THREADS", pool)
    monkeypatch.setenv("FAKE_VDDK_FAIL_READ_AT", str(5 * 4096))
    data = pattern(MiB)
    connection = session.connect()
    handle = session.open(connection, fake_vddk.local_disk(size=MiB,
                                                           data=data))
    arrived = completions.CompletionQueue()
    callback = completions.QueueingCallback(arrived.put)
    try:
        buffers = read_async(session, callback.pointer, handle, 32)
        session.lib.check("Wait", handle)
    finally:
        session.lib.check("Close", handle)
        session.lib.check("Disconnect", connection)
        session.lib.call("Exit")    # which ends the fake's pool threads
    queued = [arrived.get(timeout=10) for _ in range(32)]
    assert arrived.empty()
    assert all(type(item) is completions.QueuedCompletion for item in queued)
    results = dict((item.data, item.result) for item in queued)
    assert sorted(results) == sorted(buffers)
    assert results.pop(1005) not in (abi.VIX_OK, abi.VIX_ASYNC)
    assert set(results.values()) == {abi.VIX_OK}
    for number in results:
        index = number - 1000
        assert buffers[number] == data[index * 4096:(index + 1) * 4096]


def test_a_queued_completion_finishes_its_transfer_once(session):
    from vddktool.vddk import abi, completions
    finished = []
    buffer = bytearray(512)
    number = completions.start(completions.Transfer(
        session.lib, "ReadAsync", 512, buffer, None,
        lambda error, data: finished.append((error, data)), False))
    completions.QueuedCompletion(number, abi.VIX_OK).run()
    completions.QueuedCompletion(number, abi.VIX_OK).run()  # a stray one
    assert finished == [(None, buffer)]
    assert completions.forget(number) is None


def test_submitted_requests_finish_on_the_sender_thread(
        fake_vddk, backend_for, tmp_path, monkeypatch):
    """Served in-process: every transfer of an nbdcopy in both
    directions is finished by a connection's sender, none on VDDK's
    threads (no Python code runs there)."""
    from inprocess import serving
    from vddktool.vddk import completions
    threads = []
    finish = completions.Transfer.finish

    def noting(transfer, result):
        threads.append(threading.current_thread().name)
        finish(transfer, result)
    monkeypatch.setattr(completions.Transfer, "finish", noting)
    data = pattern(4 * MiB)
    disk = fake_vddk.local_disk(size=4 * MiB, data=data)
    with serving(backend_for(fake_vddk, file=disk), tmp_path) as uri:
        out = str(tmp_path / "copy.raw")
        run([need("nbdcopy"), "--requests=16", "--request-size=65536",
             uri, out])
        run([need("nbdcopy"), "--requests=16", "--request-size=65536",
             out, uri])
    with open(out, "rb") as f:
        assert f.read() == data
    assert len(threads) >= 2 * 64
    assert set(threads) == {"nbd-sender"}


def test_a_submitted_write_that_fails_is_retried_and_lands(
        fake_vddk, start_server, tmp_path):
    """Writes through retry stay submitted; one that fails is written
    again after a reopen, and the disk ends up as the client wrote it."""
    fake_vddk.env["FAKE_VDDK_ASYNC_DELAY_US"] = SLOW_PAUSE_US
    fake_vddk.env["FAKE_VDDK_RECORD_COMPLETIONS"] = "1"
    disk = fake_vddk.local_disk(size=8 * MiB, data=bytes(8 * MiB))
    fake_vddk.fail_write_at(5 * MiB + 512, times=1)
    server = serve(start_server, fake_vddk, "--filter=retry",
                   "retry-delay=1", disk)
    source = str(tmp_path / "source.raw")
    with open(source, "wb") as f:
        f.write(pattern(8 * MiB))
    run([need("nbdcopy"), "--connections=1", "--requests=32",
         "--request-size=65536", "--flush", source, server.uri])
    server.stop()
    with open(disk, "rb") as f:
        assert f.read() == pattern(8 * MiB)
    calls = fake_vddk.calls()
    assert most_in_flight(calls) >= 8
    assert [c.name for c in calls if c.name in ("Open", "Close")][:3] == \
        ["Open", "Close", "Open"]


def test_the_seeds_blocksize_remedy_splits_submitted_requests(
        fake_vddk, start_server, tmp_path):
    """--filter=blocksize minblock=512 maxdata=2M (the seed's remedy for
    ESXi running out of memory): 4 MiB requests reach VDDK as 2 MiB parts
    in flight together, both ways; an unaligned write still lands, by
    read-modify-write."""
    fake_vddk.env["FAKE_VDDK_ASYNC_DELAY_US"] = SLOW_PAUSE_US
    fake_vddk.env["FAKE_VDDK_RECORD_COMPLETIONS"] = "1"
    disk = fake_vddk.local_disk(size=32 * MiB, data=bytes(32 * MiB))
    server = serve(start_server, fake_vddk, "--filter=blocksize",
                   "minblock=512", "maxdata=2M", disk)
    source, out = str(tmp_path / "source.raw"), str(tmp_path / "out.raw")
    with open(source, "wb") as f:
        f.write(pattern(32 * MiB))
    copy = [need("nbdcopy"), "--connections=1", "--requests=8",
            "--request-size=%d" % (4 * MiB)]
    run(copy + [source, server.uri])
    run(copy + [server.uri, out])
    with open(out, "rb") as f:
        assert f.read() == pattern(32 * MiB)
    calls = fake_vddk.calls()
    sizes = set(c.number("count") * 512 for c in calls
                if c.name in ("ReadAsync", "WriteAsync"))
    assert sizes == {2 * MiB}
    assert most_in_flight(calls) >= 4
    written = nbdsh(server, "h.pwrite(b'x' * 100, 1000)\n"
                            "print(h.pread(1200, 900) == %r)"
                    % (pattern(1000)[900:] + b"x" * 100 +
                       pattern(2100)[1100:]))
    assert written.stdout.strip() == "True"
