"""--filter=noextents and --filter=cacheextents: side by side with
nbdkit's, and how often VDDK is asked (the fake's record)."""

import json

import pytest

from conftest import need, run
from fake_vddk.fixtures import fake_vddk  # noqa: F401 (a fixture)
from filter_oracle import (assert_same_info, block_map, contents, nbdsh,
                           side_by_side, write_sparse)
from inprocess import serving
from memory_engine import MemoryBackend
from vddktool.filters.cacheextents import CacheExtentsFilter
from vmdk_fixtures import random_disk

MiB = 1024 * 1024


@pytest.mark.parametrize("name", ["noextents", "cacheextents"])
def test_same_as_nbdkit(tmp_path, start_server, start_nbdkit, name):
    data = random_disk(2 * MiB, seed=5, hole_every=4, zero_every=9,
                       chunk=64 * 1024)
    pair = side_by_side(tmp_path, start_server, start_nbdkit, data,
                        ["--filter=" + name])
    assert_same_info(pair)
    ours = block_map(pair.ours.uri)
    assert ours == block_map(pair.theirs.uri)
    if name == "noextents":
        assert ours == [(0, len(data), 0)]
    else:
        assert len(ours) > 4    # holes and data, as the file has them
    assert contents(pair.ours.uri, tmp_path, "ours.out") == data


MAP_AFTER_WRITE = """
import json
def extents():
    found = []
    def seen(metacontext, offset, entries, err):
        found.extend(entries)
    h.block_status(h.get_size(), 0, seen)
    return found
before = extents()
h.pwrite(b'\\x5a' * 65536, 65536)
after = extents()
print(json.dumps([before, after]))
"""


def test_a_write_is_seen_by_the_next_query_as_in_nbdkit(
        tmp_path, start_server, start_nbdkit):
    data = bytes(MiB)      # all hole, until written
    pair = side_by_side(tmp_path, start_server, start_nbdkit, data,
                        ["--filter=cacheextents"])
    answers = [json.loads(nbdsh(server.uri, MAP_AFTER_WRITE).stdout)
               for server in (pair.ours, pair.theirs)]
    assert answers[0] == answers[1]
    before, after = answers[0]
    assert before == [MiB, 3]
    assert after[:4] == [65536, 3, 65536, 0]


def qemu_img_map(uri):
    need("qemu-img")
    return json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw",
                           uri]).stdout)


@pytest.mark.parametrize("filters,expected_queries", [
    ([], "many"), (["--filter=cacheextents"], "one")])
def test_qemu_img_map_queries_vddk_once(fake_vddk, start_server, filters,
                                        expected_queries):
    data = random_disk(8 * MiB, seed=6, hole_every=3, zero_every=1000,
                       chunk=128 * 512)
    disk = fake_vddk.local_disk(size=len(data))
    write_sparse(disk, data)
    server = start_server(*(filters + ["backend=vddk",
                                       "libdir=" + fake_vddk.libdir, disk]),
                          env=fake_vddk.env)
    entries = qemu_img_map(server.uri.replace("nbd+unix:///",
                                              "nbd+unix://"))
    assert sum(not e["data"] for e in entries) >= 5
    queries = len(fake_vddk.calls("QueryAllocatedBlocks"))
    if expected_queries == "one":
        assert queries == 1
    else:
        assert queries >= 5


ZERO_AFTER_WRITE = MAP_AFTER_WRITE + """
h.zero(65536, 65536)
print(json.dumps(extents()))
"""


def test_asynchronous_writes_and_zeroes_forget_the_cache(tmp_path):
    memory = MemoryBackend(bytes(MiB), asynchronous=True)
    backend = CacheExtentsFilter(memory, {})
    with serving(backend, tmp_path) as uri:
        lines = nbdsh(uri, ZERO_AFTER_WRITE).stdout.splitlines()
    assert memory.calls_named("submit_pwrite")
    assert json.loads(lines[0])[1][:4] == [65536, 3, 65536, 0]
    assert json.loads(lines[1]) == [MiB, 3]
    # Every query was answered by the engine (each change forgot the
    # answer before): three queries in all.
    assert len(memory.calls_named("extents")) == 3
