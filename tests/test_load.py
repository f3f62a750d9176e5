"""Load (a short run of tools/load.py): 100 concurrent connections of
mixed reads, writes, flushes, zeroes and block status, each on its own
region, every byte checked afterwards; and no thread or descriptor left
once they have gone."""

import pytest

from conftest import idle_counts, settles_at
from load import run_load
from nbdclient import client_context
from tls_fixtures import pki  # noqa: F401 (fixture)

REGION = 256 * 1024


@pytest.mark.parametrize("connections, tls", [(100, False), (20, True)],
                         ids=["plain", "tls"])
def test_concurrent_connections_keep_every_byte(start_server, tmp_path, pki,
                                                connections, tls):
    args, context = [], None
    if tls:
        args = ["--tls=require", "--tls-certificates=" + pki.server]
        context = client_context(pki.client)
    server = start_server(*args + [str(tmp_path / "disk.vmdk"),
                                   "create=true",
                                   "create-size=%d" % (REGION * connections)])
    idle = idle_counts(server, context)
    tally, mismatches = run_load(server.sock, connections, REGION, seed=3,
                                 batches=6, context=context)
    assert tally.problems == []
    assert mismatches == 0
    # Everything was exercised, on every connection.
    assert set(tally.operations) == {"read", "write", "write-fua", "zero",
                                     "zero-no-hole", "flush", "block-status"}
    assert sum(tally.operations.values()) >= connections * 6
    assert settles_at(server.proc.pid, idle) == idle
