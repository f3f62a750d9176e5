"""Builders for VMDK sub-formats qemu-img cannot create.

Written from the format facts with struct and zlib only, independently of
vddktool's own readers and writers, so a test that builds a file here and
reads it through vddktool checks one implementation against another.
Each builder takes the disk contents as bytes and returns what it
allocated, so tests can compare map() with it.
"""

import os
import random
import struct
import zlib

SECTOR = 512


def random_disk(size, seed, hole_every=3, zero_every=5, chunk=4096):
    """Random contents with runs of zeros: chunk i is zero when i is a
    multiple of ``hole_every`` or ``zero_every``, so a builder that skips
    zero grains leaves holes in predictable places."""
    rng = random.Random(seed)
    out = bytearray(size)
    for start in range(0, size, chunk):
        index = start // chunk
        if index % hole_every == 0 or index % zero_every == 0:
            continue
        n = min(chunk, size - start)
        out[start:start + n] = rng.getrandbits(8 * n).to_bytes(n, "little")
    return bytes(out)


def _pad(data, unit=SECTOR):
    return data + bytes(-len(data) % unit)


def write_descriptor(path, create_type, extents, parent_hint=None,
                     parent_cid="ffffffff"):
    """A separate descriptor file; ``extents`` are extent lines."""
    lines = ["# Disk DescriptorFile", "version=1", "CID=12345678",
             "parentCID=%s" % parent_cid, 'createType="%s"' % create_type]
    if parent_hint:
        lines.append('parentFileNameHint="%s"' % parent_hint)
    # A comment, not a blank line, before the extents: qemu 7.2 reads an
    # extent line that follows a blank line twice.
    lines += ["# Extent description"] + list(extents) + [
        "# The Disk Data Base", 'ddb.adapterType = "lsilogic"',
        'ddb.virtualHWVersion = "4"']
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# --- streamOptimized, VMware's layout --------------------------------------

_KDMV = struct.Struct("<4sIIQQQQIQQQB4sH")


def _kdmv_header(capacity, grain_sectors, gd_offset, flags, desc_sectors):
    header = _KDMV.pack(b"KDMV", 3, flags, capacity, grain_sectors, 1,
                        desc_sectors, 512, 0, gd_offset, 128, 0,
                        b"\n \r\n", 1)
    return _pad(header)


def _marker(sectors, kind):
    return _pad(struct.pack("<QII", sectors, 0, kind))


def build_stream(path, data, grain_sectors=128, level=6, zeroed=(),
                 keep_zero_grains=False, footer=True, markers=True,
                 extent_name=None):
    """A streamOptimized file from ``data``: VMware's layout (gdOffset all
    ones, footer, end-of-stream) or, with footer=False, a real gdOffset in
    the header.  Zero grains are left out unless keep_zero_grains; grains
    in ``zeroed`` get the zeroed-grain table entry.  markers=False stores
    bare zlib streams (and no table markers), as the old compressed
    hosted format did.  The embedded descriptor's extent line names
    ``extent_name`` (default: the file's own name).  Returns the set of
    grain indices stored with data."""
    assert len(data) % SECTOR == 0
    capacity = len(data) // SECTOR
    grain = grain_sectors * SECTOR
    per_table = 512
    tables = -(-capacity // (grain_sectors * per_table))
    flags = (1 | (1 << 16) | ((1 << 17) if markers else 0)
             | ((1 << 2) if zeroed else 0))
    desc = _pad(('# Disk DescriptorFile\nversion=1\nCID=fffffffe\n'
                 'parentCID=ffffffff\ncreateType="streamOptimized"\n'
                 'RW %d SPARSE "%s"\n' % (capacity, extent_name or
                                          os.path.basename(path))
                 ).encode())
    out = bytearray(SECTOR)
    out += desc
    out += bytes(128 * SECTOR - len(out))
    directory = [0] * tables
    stored = set()
    for table in range(tables):
        entries = [0] * per_table
        for slot in range(per_table):
            index = table * per_table + slot
            chunk = data[index * grain:(index + 1) * grain]
            if not chunk:
                break
            if index in zeroed:
                entries[slot] = 1
                continue
            if not keep_zero_grains and not any(chunk):
                continue
            packed = zlib.compress(chunk, level)
            entries[slot] = len(out) // SECTOR
            head = struct.pack("<QI", index * grain_sectors, len(packed))
            out += _pad((head if markers else b"") + packed)
            stored.add(index)
        if any(entries):
            out += _marker(4, 1) if markers else b""
            directory[table] = len(out) // SECTOR
            out += struct.pack("<512I", *entries)
    gd = _pad(struct.pack("<%dI" % tables, *directory))
    out += _marker(len(gd) // SECTOR, 2) if markers else b""
    gd_offset = len(out) // SECTOR
    out += gd
    real = _kdmv_header(capacity, grain_sectors, gd_offset, flags, 1)
    if footer:
        out += _marker(1, 3) + real + _marker(0, 0)
        out[0:SECTOR] = _kdmv_header(capacity, grain_sectors,
                                     0xFFFFFFFFFFFFFFFF, flags, 1)
    else:
        out[0:SECTOR] = real
    with open(path, "wb") as f:
        f.write(out)
    return stored


def stream_grain_sectors(path):
    """{grain index: sector of its marker} read back from a built stream."""
    with open(path, "rb") as f:
        raw = f.read()
    fields = _KDMV.unpack_from(raw, 0)
    if fields[9] == 0xFFFFFFFFFFFFFFFF:
        fields = _KDMV.unpack_from(raw, len(raw) - 1024)
    capacity, grain_sectors, gd = fields[3], fields[4], fields[9]
    tables = -(-capacity // (grain_sectors * 512))
    found = {}
    for table, gt in enumerate(struct.unpack_from("<%dI" % tables, raw,
                                                  gd * SECTOR)):
        if gt:
            for slot, entry in enumerate(struct.unpack_from(
                    "<512I", raw, gt * SECTOR)):
                if entry > 1:
                    found[table * 512 + slot] = entry
    return found


# --- ESXi vmfsSparse (COWD) ------------------------------------------------

COWD_GT_ENTRIES = 4096


def build_cowd(path, data, grain_sectors=1, parent=None, skip_zero=True,
               unclean=False):
    """A COWD file holding ``data``; zero grains left unallocated when
    skip_zero.  ``parent`` (a file name) makes it a child.  Returns the
    set of allocated grain indices."""
    assert len(data) % SECTOR == 0
    sectors = len(data) // SECTOR
    grain = grain_sectors * SECTOR
    per_dir_entry = grain_sectors * COWD_GT_ENTRIES
    dir_entries = -(-sectors // per_dir_entry)
    gd_offset = 4
    gd_sectors = -(-dir_entries * 4 // SECTOR)
    free = gd_offset + gd_sectors
    directory = [0] * dir_entries
    tables = {}
    blobs = []
    allocated = set()
    for index in range(-(-len(data) // grain)):
        chunk = data[index * grain:(index + 1) * grain]
        if skip_zero and not any(chunk):
            continue
        table = index // COWD_GT_ENTRIES
        if table not in tables:
            tables[table] = [0] * COWD_GT_ENTRIES
            directory[table] = free
            blobs.append((free, None, table))
            free += COWD_GT_ENTRIES * 4 // SECTOR
        tables[table][index % COWD_GT_ENTRIES] = free
        blobs.append((free, chunk, None))
        free += grain_sectors
        allocated.add(index)
    header = bytearray(2048)
    flags = 2 if parent else 3      # bit 0: root disk
    struct.pack_into("<4sIIIIIII", header, 0, b"COWD", 1, flags, sectors,
                     grain_sectors, gd_offset, dir_entries, free)
    if parent:
        name = parent.encode()
        header[32:32 + len(name)] = name
        struct.pack_into("<I", header, 1056, 7)
    else:
        struct.pack_into("<III", header, 32, sectors // (16 * 63), 16, 63)
    struct.pack_into("<I", header, 1060, 1)
    struct.pack_into("<I", header, 1648, 1 if unclean else 0)
    with open(path, "wb") as f:
        f.write(header)
        f.seek(gd_offset * SECTOR)
        f.write(struct.pack("<%dI" % dir_entries, *directory))
        for sector, chunk, table in blobs:
            f.seek(sector * SECTOR)
            if table is not None:
                f.write(struct.pack("<%dI" % COWD_GT_ENTRIES,
                                    *tables[table]))
            else:
                f.write(chunk)
        f.truncate(free * SECTOR)
    return allocated


def cowd_header(path):
    """(freeSector, uncleanShutdown) of a COWD file."""
    with open(path, "rb") as f:
        raw = f.read(2048)
    return (struct.unpack_from("<I", raw, 28)[0],
            struct.unpack_from("<I", raw, 1648)[0])


# --- seSparse --------------------------------------------------------------

SESPARSE_GRAIN = 8 * SECTOR
SESPARSE_GT_ENTRIES = 4096


def sesparse_grain_entry(index):
    """An allocated-grain entry for grain slot ``index`` (the format keeps
    the low 12 bits of the index in bits 48-59 and the rest below)."""
    return (3 << 60) | ((index & 0xFFF) << 48) | (index >> 12)


def build_sesparse(path, data, zero=(), unmapped=(), first_slot=4100,
                   replay_journal=0, magic=0xCAFEBABE):
    """A seSparse file holding ``data``: nonzero grains are stored (in
    reverse order, from slot ``first_slot`` on, so both halves of the slot
    encoding are used), grains in ``zero``/``unmapped`` get those entries.
    Returns {grain index: state} with state "data", "zero" or "unmapped"."""
    assert len(data) % SECTOR == 0
    capacity = len(data) // SECTOR
    grains = -(-len(data) // SESPARSE_GRAIN)
    tables_needed = -(-grains // SESPARSE_GT_ENTRIES)
    gd_offset, gd_sectors = 2, max(1, -(-tables_needed * 8 // SECTOR))
    gt_offset = gd_offset + gd_sectors
    gt_sectors = 64
    grains_offset = gt_offset + tables_needed * gt_sectors
    states = {}
    entries = {}
    payload = []
    wanted = [i for i in range(grains)
              if any(data[i * SESPARSE_GRAIN:(i + 1) * SESPARSE_GRAIN])]
    for slot, index in enumerate(reversed(wanted), first_slot):
        entries[index] = sesparse_grain_entry(slot)
        payload.append((grains_offset + slot * 8, index))
        states[index] = "data"
    for index in zero:
        entries[index] = 2 << 60
        states[index] = "zero"
    for index in unmapped:
        entries[index] = 1 << 60
        states[index] = "unmapped"
    directory = [0] * (gd_sectors * SECTOR // 8)
    # GT slots handed out in reverse too, so GT index != directory index.
    used_tables = sorted({i // SESPARSE_GT_ENTRIES for i in entries})
    for n, table in enumerate(reversed(used_tables)):
        directory[table] = 0x1000000000000000 | n
    header = struct.pack(
        "<26Q", magic, 0x0000000200000001, capacity, 8, 64, 0, 0, 0, 0, 0,
        1, 1, 0, 0, 0, 0, gd_offset, gd_sectors, gt_offset,
        tables_needed * gt_sectors, 0, 0, 0, 0, grains_offset,
        grains * 8 + first_slot * 8)
    volatile = struct.pack("<4Q", 0xCAFECAFE, 0, 1, replay_journal)
    with open(path, "wb") as f:
        f.write(_pad(header))
        f.write(_pad(volatile))
        f.seek(gd_offset * SECTOR)
        f.write(struct.pack("<%dQ" % len(directory), *directory))
        for table in used_tables:
            n = len(used_tables) - 1 - used_tables.index(table)
            gt = [entries.get(table * SESPARSE_GT_ENTRIES + slot, 0)
                  for slot in range(SESPARSE_GT_ENTRIES)]
            f.seek((gt_offset + n * gt_sectors) * SECTOR)
            f.write(struct.pack("<%dQ" % SESPARSE_GT_ENTRIES, *gt))
        end = grains_offset * SECTOR
        for sector, index in payload:
            f.seek(sector * SECTOR)
            f.write(_pad(data[index * SESPARSE_GRAIN:
                              (index + 1) * SESPARSE_GRAIN]))
            end = max(end, (sector + 8) * SECTOR)
        f.truncate(end)
    return states


def read_all(extent, step=None):
    """Everything an extent reads, with ZERO and UNALLOCATED as zeros."""
    out = bytearray()
    step = step or extent.size
    for offset in range(0, extent.size, step):
        count = min(step, extent.size - offset)
        pieces = extent.read(offset, count)
        assert sum(length for length, _ in pieces) == count
        for length, value in pieces:
            if isinstance(value, str):
                out += bytes(length)
            else:
                assert len(value) == length
                out += bytes(value)
    return bytes(out)


def mapped(extent):
    """The extent's map() as a list of (offset, length, state)."""
    runs, offset = [], 0
    for length, state in extent.map(0, extent.size):
        runs.append((offset, length, state))
        offset += length
    return runs


# --- through a running server ----------------------------------------------

def served_bytes(server, tmp_path, name="served.raw"):
    """Everything the server serves, copied out with nbdcopy."""
    from conftest import need, run
    need("nbdcopy")
    out = tmp_path / name
    run(["nbdcopy", server.uri, str(out)])
    return out.read_bytes()


def served_map(server):
    """nbdinfo --map as [(offset, length, "data"|"zero")], neighbours of
    the same kind merged (hole+zero and plain zero both count as zero)."""
    import json
    from conftest import need, run
    need("nbdinfo")
    runs = []
    for entry in json.loads(run(["nbdinfo", "--map", "--json",
                                 server.uri]).stdout):
        kind = "zero" if entry["type"] & 2 else "data"
        if runs and runs[-1][2] == kind:
            runs[-1] = (runs[-1][0], runs[-1][1] + entry["length"], kind)
        else:
            runs.append((entry["offset"], entry["length"], kind))
    return runs


def expected_map(data, unit, stored):
    """The map a server should give for grains of ``unit`` bytes when the
    grains in ``stored`` hold data and the rest read as zeros."""
    runs = []
    for index in range(-(-len(data) // unit)):
        kind = "data" if index in stored else "zero"
        length = min(unit, len(data) - index * unit)
        if runs and runs[-1][2] == kind:
            runs[-1] = (runs[-1][0], runs[-1][1] + length, kind)
        else:
            runs.append((index * unit, length, kind))
    return runs
