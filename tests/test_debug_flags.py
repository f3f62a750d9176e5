"""-D flags as nbdkit takes them: nbdkit.backend.datapath=0 quiets the
per-request lines of -v, and a flag nothing reads is warned about."""

import re

import pytest

from conftest import need, run, vddktool
from test_log_syslog import disk  # noqa: F401 (a fixture)
from test_manual import debug_flags_in_the_code
from vddktool import log


@pytest.fixture
def flags(monkeypatch):
    """A clean slate of -v and -D for in-process checks."""
    monkeypatch.setattr(log, "_flags", {})
    monkeypatch.setattr(log, "_state", dict(log._state))
    return log


def test_datapath_debug_follows_v_and_the_flag(flags):
    flags.configure(verbose=False, dest="null")
    assert not flags.datapath_debug()
    flags.configure(verbose=True, dest="null")
    assert flags.datapath_debug()
    flags.set_debug_flag("nbdkit.backend.datapath", 0)
    assert not flags.datapath_debug()
    flags.set_debug_flag("nbdkit.backend.datapath", 1)
    assert flags.datapath_debug()


def test_every_flag_the_code_reads_is_known():
    assert debug_flags_in_the_code() == set(log.KNOWN_DEBUG_FLAGS)


def test_unknown_flag_is_warned_about_by_name(disk):
    proc = vddktool("-U", "-", "-D", "vddk.datapth=0", "-D", "vddk.stats=1",
                    disk, "--run", "true", check=False)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines()
                if "warning" in line]
    assert warnings == ["vddktool: warning: -D vddk.datapth: no such debug "
                        "flag, so it changes nothing (the flags are listed "
                        "under DEBUG FLAGS in vddktool(1))"]


def test_known_flags_are_not_warned_about(disk):
    proc = vddktool("-U", "-", "-D", "nbdkit.backend.datapath=0",
                    "-D", "vddk.datapath=0", "-D", "vddk.stats=1",
                    "-D", "vddk.extents=1", "-D", "vddk.diskinfo=1",
                    disk, "--run", "true", check=False)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr


def serve_and_read(start_server, disk, *options):
    server = start_server("-v", *options, disk)
    run([need("nbdinfo"), "--map", server.uri])
    server.stop()
    return server.log()


PER_REQUEST = re.compile(r"(READ|BLOCK_STATUS) flags 0x[0-9a-f]+ offset ")


def test_v_logs_each_request(start_server, disk):
    assert PER_REQUEST.search(serve_and_read(start_server, disk))


def test_backend_datapath_0_silences_each_request(start_server, disk):
    text = serve_and_read(start_server, disk, "-D",
                          "nbdkit.backend.datapath=0")
    assert "new connection" in text       # -v itself still works
    assert not PER_REQUEST.search(text), text
