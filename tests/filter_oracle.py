"""Side by side with nbdkit: the same bytes served by Debian's nbdkit
(file plugin on a raw file) and by vddktool (native engine on a
monolithicFlat VMDK whose extent is a copy of that file), the same
filters and parameters on both, and what clients see compared.

``pair = side_by_side(tmp_path, start_server, start_nbdkit, data,
["--filter=blocksize"], ["minblock=512"])`` (both fixtures from
conftest) gives ``pair.ours`` and ``pair.theirs`` (servers with
``.uri``) and the files behind them.
"""

import json
import os

from conftest import need, run
from vmdk_fixtures import write_descriptor

# nbdinfo --json keys a filter may change and both servers decide alike.
# Left out: export names, URIs and descriptions; can_fast_zero and
# can_cache (the engines differ: our native engine zeroes natively and
# caches by reading); block_size_maximum (vddktool caps what it
# advertises at its 64 MiB request limit; nbdkit advertises 4G - 1).
COMPARED_KEYS = ("is_read_only", "can_flush", "can_fua", "can_trim",
                 "can_zero", "can_multi_conn", "block_size_minimum",
                 "block_size_preferred", "export-size", "contexts")


def flat_vmdk(directory, name, data):
    """A monolithicFlat VMDK holding ``data`` (sparse where zero):
    (descriptor path, extent path)."""
    assert len(data) % 512 == 0
    extent = os.path.join(directory, name + "-flat.vmdk")
    write_sparse(extent, data)
    descriptor = os.path.join(directory, name + ".vmdk")
    write_descriptor(descriptor, "monolithicFlat",
                     ['RW %d FLAT "%s" 0' % (len(data) // 512,
                                             os.path.basename(extent))])
    return descriptor, extent


def write_sparse(path, data, unit=4096):
    """``data`` in a file with holes where whole units are zero."""
    with open(path, "wb") as f:
        f.truncate(len(data))
        for start in range(0, len(data), unit):
            piece = data[start:start + unit]
            if any(piece):
                f.seek(start)
                f.write(piece)


class Pair(object):
    def __init__(self, ours, theirs, our_file, their_file):
        self.ours = ours
        self.theirs = theirs
        self.our_file = our_file        # the flat extent vddktool serves
        self.their_file = their_file    # the raw file nbdkit serves


def side_by_side(tmp_path, start_server, start_nbdkit, data, filter_args,
                 params=(), server_args=(), env=None):
    """The same filters and parameters over the same bytes, in both."""
    descriptor, ours_file = flat_vmdk(str(tmp_path), "ours", data)
    theirs_file = str(tmp_path / "theirs.raw")
    write_sparse(theirs_file, data)
    ours = start_server(*(list(server_args) + list(filter_args) +
                          [descriptor] + list(params)), env=env)
    theirs = start_nbdkit(*(list(server_args) + list(filter_args) +
                            ["file", theirs_file] + list(params)), env=env)
    return Pair(ours, theirs, ours_file, theirs_file)


def info(uri):
    """nbdinfo --json's one export, as a dict."""
    need("nbdinfo")
    return json.loads(run(["nbdinfo", "--json", uri]).stdout)["exports"][0]


def compared_info(uri):
    full = info(uri)
    return dict((key, full.get(key)) for key in COMPARED_KEYS)


def assert_same_info(pair):
    """The COMPARED_KEYS alike; block sizes only where nbdkit sends them
    (its file plugin has none; vddktool's server always sends them)."""
    ours, theirs = compared_info(pair.ours.uri), compared_info(
        pair.theirs.uri)
    if theirs["block_size_minimum"] is None:
        for key in ("block_size_minimum", "block_size_preferred"):
            del ours[key], theirs[key]
    assert ours == theirs
    return ours


def block_map(uri, *options):
    """nbdinfo --map as [(offset, length, type)]."""
    need("nbdinfo")
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(
        run(["nbdinfo", "--map", "--json"] + list(options) + [uri]).stdout)]


def contents(uri, tmp_path, name):
    need("nbdcopy")
    out = str(tmp_path / name)
    run(["nbdcopy", uri, out])
    with open(out, "rb") as f:
        return f.read()


def nbdsh(uri, script, check=True):
    """Run ``script`` in nbdsh connected to ``uri`` (with base:allocation
    asked for, so block_status works)."""
    need("nbdsh")
    return run(["nbdsh", "--base-allocation", "-u", uri, "-c", script],
               check=check)


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()
