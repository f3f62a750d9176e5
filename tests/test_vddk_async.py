"""The VDDK engine on the server's asynchronous path, against the fake
library: many ReadAsync/WriteAsync in flight on one connection, one
thread at a time inside a handle, FLUSH after the writes it covers."""

import threading

from conftest import need, run
from fake_vddk.fixtures import fake_vddk, session  # noqa: F401 (fixtures)
from test_vddk_serve import nbdsh, pattern, serve

MiB = 1024 * 1024


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
    out = str(tmp_path / "copy.raw")
    run([need("nbdcopy"), "--connections=1", "--requests=32",
         "--request-size=65536", server.uri, out])
    with open(out, "rb") as f:
        assert f.read() == data
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


def test_a_filter_that_changes_reads_keeps_requests_overlapping(
        fake_vddk, start_server, tmp_path):
    """cow changes reads, so the stack takes the synchronous path; VDDK
    being latency-bound, requests still overlap there.  (retry, as in
    nbdkit, serializes requests: virt-v2v's full stack runs one at a
    time in both.)"""
    fake_vddk.env["FAKE_VDDK_RECORD_COMPLETIONS"] = "1"
    data = pattern(16 * MiB)
    server = serve(start_server, fake_vddk, "--filter", "cow", "--filter",
                   "cacheextents",
                   fake_vddk.local_disk(size=16 * MiB, data=data))
    out = str(tmp_path / "copy.raw")
    run([need("nbdcopy"), "--requests=32", server.uri, out])
    with open(out, "rb") as f:
        assert f.read() == data
    assert most_in_flight(fake_vddk.calls()) >= 4


def read_async_rounds(session, completions, handle, rounds, per_round=32):
    """ReadAsync of 4 KiB pieces through ``completions``, a round at a
    time; the data each piece read."""
    from vddktool.vddk import disk as vddk_disk
    read = session.lib.functions["ReadAsync"]
    pieces = []
    for _ in range(rounds):
        finished = threading.Semaphore(0)
        got = {}

        def done(error, data, index):
            got[index] = (error, bytes(data or b""))
            finished.release()
        for index in range(per_round):
            buffer = bytearray(4096)
            array = vddk_disk._ctypes_view(buffer, 4096)
            transfer = vddk_disk._Transfer(
                session.lib, "ReadAsync", 4096, buffer, array,
                lambda error, data, index=index: done(error, data, index),
                False)
            request = completions.add(transfer)
            assert read(handle, index * 8, 8, array, completions.callback,
                        request) == 25000      # VIX_ASYNC
        for _ in range(per_round):
            finished.acquire()
        pieces += [got[index] for index in range(per_round)]
    return pieces


def test_long_lived_completion_threads_keep_their_thread_state(
        session, fake_vddk, monkeypatch):
    """On 3.11+ a callback thread seen twice keeps its Python thread
    state (see vddk/threadstates.py); the fake's pool has 2 threads."""
    from vddktool.vddk import disk as vddk_disk, threadstates
    monkeypatch.setenv("FAKE_VDDK_COMPLETION_THREADS", "2")
    data = pattern(MiB)
    connection = session.connect()
    handle = session.open(connection, fake_vddk.local_disk(size=MiB,
                                                           data=data))
    completions = vddk_disk.AsyncCompletions()
    try:
        pieces = read_async_rounds(session, completions, handle, 3)
    finally:
        session.lib.check("Close", handle)
        session.lib.check("Disconnect", connection)
        session.lib.call("Exit")    # which ends the fake's pool threads
    assert pieces == [(None, data[i * 4096:(i + 1) * 4096])
                      for i in range(32)] * 3
    if threadstates.WORTH_KEEPING:
        assert 1 <= completions.thread_states.kept() <= 2
    else:
        assert completions.thread_states is None


def test_a_new_thread_per_completion_keeps_nothing(session, fake_vddk):
    from vddktool.vddk import disk as vddk_disk
    data = pattern(MiB)
    connection = session.connect()
    handle = session.open(connection, fake_vddk.local_disk(size=MiB,
                                                           data=data))
    completions = vddk_disk.AsyncCompletions()
    pieces = read_async_rounds(session, completions, handle, 2)
    session.lib.check("Close", handle)
    session.lib.check("Disconnect", connection)
    assert pieces == [(None, data[i * 4096:(i + 1) * 4096])
                      for i in range(32)] * 2
    if completions.thread_states is not None:
        assert completions.thread_states.kept() == 0


def test_thread_states_kept_are_bounded(monkeypatch):
    from vddktool.vddk import threadstates
    monkeypatch.setattr(threadstates, "MAX_KEPT", 2)
    states = threadstates.ThreadStates()
    ensured = []
    states._ensure = lambda: ensured.append(threading.get_ident())

    # All alive at once, so no two share an identity.
    together = threading.Barrier(5)

    def twice():
        together.wait()
        states.note()
        states.note()
        together.wait()
    threads = [threading.Thread(target=twice) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    states.note()           # this thread: seen once, not kept
    assert states.kept() == 2 and len(ensured) == 2
