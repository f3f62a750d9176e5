"""Option- and command-level behaviour, driven through libnbd (nbdsh)."""

import json
import sys
import time

import pytest

import rawserver
from rawserver import make_disk, nbdsh, raw_server  # noqa: F401 (fixture)


def nbdsh_json(script):
    """Run ``script`` in nbdsh; it prints one JSON value at the end."""
    return json.loads(nbdsh("import json\n" + script).stdout.strip()
                      .splitlines()[-1])


def opt_mode(uri, structured=True):
    return ("h.set_opt_mode(True)\n"
            "h.set_request_structured_replies(%r)\n"
            "h.connect_uri(%r)\n" % (structured, uri))


def test_opt_list_returns_all_exports(raw_server):
    server = raw_server("--ram", "4096", "--export", "a=first",
                        "--export", "b")
    result = nbdsh_json(opt_mode(server.uri) + """
names = []
h.opt_list(lambda name, desc: names.append([name, desc]) or 0)
h.opt_abort()
print(json.dumps(names))
""".replace("json.", "json."))
    assert result == [["a", "first"], ["b", ""]]


def test_opt_abort_ends_negotiation_cleanly(raw_server):
    server = raw_server("--ram", "4096")
    result = nbdsh_json(opt_mode(server.uri) + """
h.opt_abort()
print(int(h.aio_is_closed()))
""")
    assert result == 1


def test_list_meta_context_lists_base_allocation(raw_server):
    server = raw_server("--ram", "4096")
    result = nbdsh_json(opt_mode(server.uri) + """
found = []
count = h.opt_list_meta_context(lambda name: found.append(name) or 0)
print(json.dumps([count, found]))
h.opt_abort()
""")
    assert result == [1, ["base:allocation"]]


def test_opt_info_on_unknown_export_keeps_negotiating(raw_server):
    server = raw_server("--ram", "4096", "--export", "real")
    result = nbdsh_json(opt_mode(server.uri) + """
h.set_export_name("missing")
try:
    h.opt_info()
    first = "ok"
except nbd.Error as e:
    first = e.errno
h.set_export_name("real")
h.opt_info()
print(json.dumps([first, h.get_size()]))
h.opt_abort()
""")
    assert result == ["ENOENT", 4096]


def test_info_reports_name_and_description(raw_server):
    server = raw_server("--ram", "8192", "--export", "d=disk one")
    result = nbdsh_json(opt_mode(server.uri) + """
h.set_full_info(True)
h.set_export_name("d")
h.opt_info()
print(json.dumps([h.get_canonical_export_name(),
                                h.get_export_description()]))
h.opt_abort()
""")
    assert result == ["d", "disk one"]


def test_export_name_handshake_for_old_clients(raw_server, tmp_path):
    content = make_disk(str(tmp_path / "disk"))
    server = raw_server("--file", str(tmp_path / "disk"))
    result = nbdsh_json("""
h.set_handshake_flags(0)
h.connect_uri(%r)
print(json.dumps([h.get_size(), h.pread(16, 1048576).hex(),
                                h.get_structured_replies_negotiated()]))
""" % server.uri)
    assert result == [4 << 20, content[1 << 20:(1 << 20) + 16].hex(), False]


def test_tls_required_client_is_refused(raw_server):
    server = raw_server("--ram", "4096")
    result = nbdsh_json("""
h.set_tls(nbd.TLS_REQUIRE)
try:
    h.connect_uri(%r)
    print('"connected"')
except nbd.Error as e:
    print(json.dumps(e.string))
""" % server.uri)
    assert "server refused TLS" in result


def test_tls_allowed_client_falls_back_to_plain(raw_server):
    server = raw_server("--ram", "4096")
    result = nbdsh_json("""
h.set_tls(nbd.TLS_ALLOW)
h.connect_uri(%r)
print(h.get_size())
""" % server.uri)
    assert result == 4096


# ---------------------------------------------------------------------------
# commands


def test_block_status_req_one_returns_one_short_extent(raw_server, tmp_path):
    make_disk(str(tmp_path / "disk"))
    server = raw_server("--file", str(tmp_path / "disk"), "--sparse")
    result = nbdsh_json("""
h.add_meta_context("base:allocation")
h.connect_uri(%r)
seen = []
def cb(context, offset, entries, err):
    seen.append(entries)
    return 0
h.block_status(65536, 1048576 - 4096, cb, nbd.CMD_FLAG_REQ_ONE)
h.block_status(65536, 0, cb)
print(json.dumps(seen))
""" % server.uri)
    one, full = result
    assert len(one) == 2 and one[0] <= 65536 and one[1] == 3
    assert full[0] <= 65536 and sum(full[0::2]) <= 65536
    assert all(length > 0 for length in full[0::2])


def test_replies_come_back_out_of_order(raw_server):
    server = raw_server("--ram", str(1 << 20), "--delay-read", "0:1.0")
    result = nbdsh_json("""
h.connect_uri(%r)
done = []
def finished(tag):
    return lambda err: done.append(tag) or 1
slow = h.aio_pread(bytearray(4096), 0, completion=finished("slow"))
fast = h.aio_pread(bytearray(4096), 65536, completion=finished("fast"))
while len(done) < 2:
    h.poll(-1)
print(json.dumps(done))
""" % server.uri)
    assert result == ["fast", "slow"]


@pytest.mark.parametrize("structured", [True, False],
                         ids=["error-chunk", "simple-reply"])
def test_read_error_is_reported_and_the_connection_lives(raw_server,
                                                          structured):
    """Structured replies carry the error in an error chunk; simple replies
    in the reply header (data is read before anything is sent)."""
    server = raw_server("--ram", str(1 << 20), "--fail-read", "8192")
    result = nbdsh_json("""
h.set_request_structured_replies(%r)
h.connect_uri(%r)
try:
    h.pread(4096, 8192)
    first = "ok"
except nbd.Error as e:
    first = e.errno
after = len(h.pread(4096, 0))
print(json.dumps([first, after, h.get_structured_replies_negotiated()]))
""" % (structured, server.uri))
    assert result == ["EIO", 4096, structured]


def test_write_error_is_reported(raw_server):
    server = raw_server("--ram", str(1 << 20), "--fail-write", "0")
    result = nbdsh_json("""
h.connect_uri(%r)
try:
    h.pwrite(b"x" * 512, 0)
    print('"ok"')
except nbd.Error as e:
    print(json.dumps(e.errno))
""" % server.uri)
    assert result == "EIO"


def test_sparse_read_sends_hole_chunks_unless_df(raw_server, tmp_path):
    make_disk(str(tmp_path / "disk"))
    server = raw_server("--file", str(tmp_path / "disk"), "--sparse")
    result = nbdsh_json("""
h.connect_uri(%r)
def reader(kinds):
    return lambda buf, offset, status, err: kinds.append(status) or 0
plain, df = [], []
buf = h.pread_structured(2 << 20, 0, reader(plain))
h.pread_structured(2 << 20, 0, reader(df), nbd.CMD_FLAG_DF)
print(json.dumps([plain, df, buf[:1048576].count(0)]))
""" % server.uri)
    plain, df, zeros = result
    assert 2 in plain and 1 in plain  # nbd.READ_HOLE, nbd.READ_DATA
    assert df == [1]
    assert zeros == 1 << 20


def test_fast_zero_is_refused_unless_the_engine_is_fast(raw_server):
    slow = raw_server("--ram", str(1 << 20))
    fast = raw_server("--ram", str(1 << 20), "--fast-zero")
    script = """
h.connect_uri(%r)
h.pwrite(b"\\xff" * 4096, 0)
try:
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    status = "ok"
except nbd.Error as e:
    status = e.errno
print(json.dumps([status, h.pread(4096, 0).count(0)]))
"""
    assert nbdsh_json(script % slow.uri) == ["ENOTSUP", 0]
    assert nbdsh_json(script % fast.uri) == ["ok", 4096]


def test_zero_trim_cache_flush_round_trip(raw_server):
    server = raw_server("--ram", str(1 << 20))
    result = nbdsh_json("""
h.connect_uri(%r)
h.pwrite(b"\\x55" * 8192, 0)
h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)
h.trim(4096, 4096)
h.cache(8192, 0)
h.flush()
data = h.pread(8192, 0)
print(json.dumps([data.count(0), h.can_cache()]))
""" % server.uri)
    assert result == [8192, True]


def test_write_past_the_end_is_enospc_and_read_is_einval(raw_server):
    server = raw_server("--ram", "4096")
    result = nbdsh_json("""
h.connect_uri(%r)
h.set_strict_mode(0)
out = []
for call in (lambda: h.pwrite(b"ab", 4095), lambda: h.pread(2, 4095),
             lambda: h.zero(2, 4095)):
    try:
        call()
        out.append("ok")
    except nbd.Error as e:
        out.append(e.errno)
print(json.dumps(out))
""" % server.uri)
    assert result == ["ENOSPC", "EINVAL", "ENOSPC"]


def test_write_to_readonly_is_eperm(raw_server):
    server = raw_server("--ram", "4096", "--readonly")
    result = nbdsh_json("""
h.connect_uri(%r)
h.set_strict_mode(0)
try:
    h.pwrite(b"ab", 0)
    print('"ok"')
except nbd.Error as e:
    print(json.dumps(e.errno))
""" % server.uri)
    assert result == "EPERM"


def test_largest_request_is_served(raw_server):
    server = raw_server("--ram", str(64 << 20))
    result = nbdsh_json("""
h.connect_uri(%r)
h.pwrite(b"\\x07" * (64 << 20), 0)
print(h.pread(64 << 20, 0).count(7))
""" % server.uri)
    assert result == 64 << 20


def test_fua_is_emulated_with_a_flush(raw_server):
    server = raw_server("--ram", "4096")
    nbdsh("h.connect_uri(%r)\nh.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_FUA)"
          % server.uri)
    plain = raw_server("--ram", "4096")
    nbdsh("h.connect_uri(%r)\nh.pwrite(b'x' * 512, 0)" % plain.uri)
    server.stop()
    plain.stop()
    assert "after 1 flushes" in server.log()
    # A client that leaves gets no flush at disconnect.
    assert "after 0 flushes" in plain.log()


def test_stdio_connection_via_connect_command(tmp_path):
    content = make_disk(str(tmp_path / "disk"))
    result = nbdsh_json("""
h.connect_command(%r)
print(json.dumps([h.get_size(), h.pread(8, 3 << 20).hex()]))
""" % [sys.executable, rawserver.THIS, "--stdio", "--file",
       str(tmp_path / "disk")])
    assert result == [4 << 20, content[3 << 20:(3 << 20) + 8].hex()]


def test_info_opens_and_closes_the_disk(raw_server):
    server = raw_server("--ram", "4096")
    nbdsh(opt_mode(server.uri) + "h.opt_info()\nh.opt_info()\nh.opt_abort()")
    server.stop()
    assert server.log().count("closed export") == 2


def test_default_export_name_serves_clients_asking_for_none(raw_server):
    server = raw_server("--ram", "4096", "--export", "named=the one",
                        "--export-name", "named")
    result = nbdsh_json(opt_mode(server.uri) + """
h.set_full_info(True)
h.opt_go()
print(json.dumps([h.get_canonical_export_name(), h.get_size()]))
""")
    assert result == ["named", 4096]


def test_engine_block_sizes_reach_the_client_and_are_enforced(raw_server):
    server = raw_server("--ram", str(1 << 20), "--block-size",
                        "512,4096,1048576")
    result = nbdsh_json("""
h.set_request_block_size(True)
h.connect_uri(%r)
h.set_strict_mode(0)
sizes = [h.get_block_size(nbd.SIZE_MINIMUM),
         h.get_block_size(nbd.SIZE_PREFERRED),
         h.get_block_size(nbd.SIZE_MAXIMUM)]
try:
    h.pread(100, 0)
    unaligned = "ok"
except nbd.Error as e:
    unaligned = e.errno
print(json.dumps([sizes, unaligned, len(h.pread(512, 512))]))
""" % server.uri)
    assert result == [[512, 4096, 1 << 20], "EINVAL", 512]


def engine_calls(server):
    # The client has gone; let the server see it before stopping it (a
    # server that stops while a connection is open flushes for it).
    deadline = time.monotonic() + 10
    while "closed export" not in server.log() and \
            time.monotonic() < deadline:
        time.sleep(0.02)
    server.stop()
    return [line.split("call: ", 1)[1] for line in server.log().splitlines()
            if "call: " in line]


WRITE_WITH_FUA = """
h.connect_uri(%r)
h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_FUA)
h.zero(512, 512, nbd.CMD_FLAG_FUA)
"""


def test_native_fua_goes_to_the_engine(raw_server):
    server = raw_server("--ram", "4096", "--native-fua", "--log-calls")
    nbdsh(WRITE_WITH_FUA % server.uri)
    assert engine_calls(server) == [
        "pwrite 512 0 fua=True", "flush",
        "zero 512 512 may_trim=True fua=True", "flush"]


def test_emulated_fua_is_a_plain_write_then_a_flush(raw_server):
    server = raw_server("--ram", "4096", "--log-calls")
    nbdsh(WRITE_WITH_FUA % server.uri)
    assert engine_calls(server) == [
        "pwrite 512 0 fua=False", "flush",
        "zero 512 512 may_trim=True fua=False", "flush"]


def test_no_hole_zero_forbids_trimming_and_trim_reaches_the_engine(
        raw_server):
    server = raw_server("--ram", "4096", "--log-calls")
    nbdsh("h.connect_uri(%r)\nh.zero(512, 0, nbd.CMD_FLAG_NO_HOLE)\n"
          "h.trim(512, 1024)" % server.uri)
    assert engine_calls(server) == ["zero 512 0 may_trim=False fua=False",
                                    "trim 512 1024 fua=False"]
