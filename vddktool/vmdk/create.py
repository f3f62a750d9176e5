"""create=true: make a new, empty VMDK of any create-type.

Extent files are written before the descriptor that names them, and
everything made is removed again if a step fails, so a failed create
leaves nothing behind.
"""

import os

from ..engine import UsageError
from .descriptor import ExtentLine, build
from .extent import VmdkError
from .flat import SECTOR, pwrite_all
from .sparse import SparseHeader
from .split import base_name, piece_names

# create-adapter-type -> ddb.adapterType
ADAPTER_NAMES = {"ide": "ide", "scsi-buslogic": "buslogic",
                 "scsi-lsilogic": "lsilogic"}

GRAIN_SECTORS = 128
GTES_PER_GT = 512
EMBEDDED_DESCRIPTOR_SECTORS = 20
# GTEs are 32-bit sector numbers: one sparse file cannot pass 2 TiB.
MAX_SPARSE_SECTORS = (1 << 32) - GRAIN_SECTORS * GTES_PER_GT

# Types another module creates: (module, function).
FOREIGN_CREATORS = {
    "stream-optimized": ("stream_writer", "create_stream_optimized"),
    "vmfs-sparse": ("cowd", "create_vmfs_sparse"),
}


def _foreign_creator(create_type):
    module, name = FOREIGN_CREATORS[create_type]
    try:
        mod = __import__("vddktool.vmdk." + module, fromlist=[name])
        return getattr(mod, name)
    except (ImportError, AttributeError):
        return None


def planned_files(path, size, create_type):
    """Every file the create-type makes, descriptor first."""
    directory = os.path.dirname(path)
    sectors = size // SECTOR
    stem = base_name(path)
    if create_type in ("monolithic-flat", "vmfs-flat", "vmfs-thin"):
        extra = [stem + "-flat.vmdk"]
    elif create_type == "vmfs-sparse":
        extra = [stem + "-delta.vmdk"]
    elif create_type in ("split-sparse", "split-flat"):
        letter = "s" if create_type == "split-sparse" else "f"
        extra = [name for name, _ in piece_names(path, sectors, letter)]
    else:
        extra = []
    return [path] + [os.path.join(directory, name) for name in extra]


def check_create(path, params):
    """The create=true checks that can be made before anything is
    written."""
    size = params.get("create-size")
    create_type = params.get("create-type") or "monolithic-sparse"
    if size is None:
        raise UsageError("create-size: required with create=true (add "
                         "create-size=SIZE, for example create-size=10G)")
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise UsageError("file: directory %s does not exist (create it "
                         "first)" % directory)
    for name in planned_files(path, size, create_type):
        if os.path.lexists(name):
            raise UsageError("file: %s already exists (create=true makes a "
                             "new disk: remove the file or drop "
                             "create=true)" % name)
    if create_type == "monolithic-sparse" and \
            size // SECTOR > MAX_SPARSE_SECTORS:
        raise UsageError("create-size: a monolithic-sparse disk holds at "
                         "most 2 TiB (use create-type=split-sparse or a "
                         "flat type)")
    if create_type in FOREIGN_CREATORS and \
            _foreign_creator(create_type) is None:
        raise UsageError("create-type: %s is not available in this build "
                         "(use monolithic-sparse or monolithic-flat)"
                         % create_type)


def create_from_params(path, params):
    return create(path, params["create-size"],
           params.get("create-type") or "monolithic-sparse",
           params.get("create-adapter-type") or "scsi-buslogic",
           params.get("create-hwversion") or 4)


def disk_database(size, adapter, hwversion, thin=False):
    """ddb entries: adapter, hardware version and a BIOS geometry."""
    adapter_name = ADAPTER_NAMES.get(adapter, adapter)
    heads = 16 if adapter_name == "ide" else 255
    sectors_per_track = 63
    cylinders = -(-(size // SECTOR) // (heads * sectors_per_track))
    if adapter_name == "ide":
        cylinders = min(cylinders, 16383)
    ddb = [("virtualHWVersion", str(hwversion)),
           ("geometry.cylinders", str(cylinders)),
           ("geometry.heads", str(heads)),
           ("geometry.sectors", str(sectors_per_track)),
           ("adapterType", adapter_name)]
    if thin:
        ddb.append(("thinProvisioned", "1"))
    return ddb


def create(path, size, create_type="monolithic-sparse",
           adapter="scsi-buslogic", hwversion=4):
    """Create the disk; raise VmdkError or OSError, leaving nothing.
    Returns None, or an open extent that must serve as the new disk's only
    extent (a stream writer can be written once, by its creator)."""
    if create_type in FOREIGN_CREATORS:
        creator = _foreign_creator(create_type)
        if creator is None:
            raise VmdkError("%s: create-type %s is not available"
                            % (path, create_type))
        return creator(path, size, adapter, hwversion)
    made = []
    try:
        _create_native(path, size, create_type, adapter, hwversion, made)
    except BaseException:
        for name in made:
            try:
                os.unlink(name)
            except OSError:
                pass
        raise
    return None


def _create_native(path, size, create_type, adapter, hwversion, made):
    directory = os.path.dirname(path)
    sectors = size // SECTOR
    ddb = disk_database(size, adapter, hwversion,
                        thin=create_type == "vmfs-thin")
    stem = base_name(path)
    if create_type == "monolithic-sparse":
        # The descriptor lives inside the sparse file: build it first.
        line = ExtentLine("RW", sectors, "SPARSE", os.path.basename(path))
        descriptor = build("monolithicSparse", [line], ddb)
        made.append(path)
        write_sparse_extent(path, sectors, descriptor.encode())
        return
    if create_type in ("monolithic-flat", "vmfs-flat", "vmfs-thin"):
        name = stem + "-flat.vmdk"
        kind = "FLAT" if create_type == "monolithic-flat" else "VMFS"
        made.append(os.path.join(directory, name))
        write_flat_extent(made[-1], size,
                          preallocate=create_type == "vmfs-flat")
        lines = [ExtentLine("RW", sectors, kind, name, 0)]
        create_name = ("monolithicFlat" if create_type == "monolithic-flat"
                       else "vmfs")
    elif create_type in ("split-sparse", "split-flat"):
        sparse = create_type == "split-sparse"
        lines = []
        for name, piece in piece_names(path, sectors, "s" if sparse else "f"):
            made.append(os.path.join(directory, name))
            if sparse:
                write_sparse_extent(made[-1], piece)
            else:
                write_flat_extent(made[-1], piece * SECTOR)
            lines.append(ExtentLine("RW", piece,
                                    "SPARSE" if sparse else "FLAT", name, 0))
        create_name = ("twoGbMaxExtentSparse" if sparse
                       else "twoGbMaxExtentFlat")
    else:
        raise VmdkError("%s: unknown create-type %s" % (path, create_type))
    descriptor = build(create_name, lines, ddb)
    made.append(path)
    _write_new_file(path, descriptor.encode())


def _write_new_file(path, data, size=None):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if data:
            pwrite_all(fd, data, 0, path)
        if size is not None:
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_flat_extent(path, size, preallocate=False):
    """A flat extent of ``size`` bytes of zeros: sparse unless asked to
    preallocate (vmfs-flat is VMware's preallocated type)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, size)
        if preallocate and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError:
                pass  # the file system cannot: it stays sparse, still valid
        os.fsync(fd)
    finally:
        os.close(fd)


def sparse_layout(sectors, with_descriptor):
    """A SparseHeader for an empty extent laid out as VMware and qemu do:
    header, descriptor, redundant GD and GTs, GD and GTs, then grains
    from the next grain boundary."""
    per_table = GRAIN_SECTORS * GTES_PER_GT
    tables = -(-sectors // per_table)
    gd_sectors = -(-(tables * 4) // SECTOR)
    gt_sectors = GTES_PER_GT * 4 // SECTOR
    header = SparseHeader(capacity=sectors, grain_size=GRAIN_SECTORS,
                          gtes_per_gt=GTES_PER_GT)
    position = 1
    if with_descriptor:
        header.descriptor_offset = 1
        header.descriptor_size = EMBEDDED_DESCRIPTOR_SECTORS
        position += EMBEDDED_DESCRIPTOR_SECTORS
    header.rgd_offset = position
    position += gd_sectors + tables * gt_sectors
    header.gd_offset = position
    position += gd_sectors + tables * gt_sectors
    header.overhead = -(-position // GRAIN_SECTORS) * GRAIN_SECTORS
    return header, tables, gd_sectors, gt_sectors


def write_sparse_extent(path, sectors, descriptor=None):
    """An empty hosted sparse extent, its grain tables preallocated."""
    header, tables, gd_sectors, gt_sectors = sparse_layout(
        sectors, descriptor is not None)
    if descriptor is not None and \
            len(descriptor) > header.descriptor_size * SECTOR:
        raise VmdkError("%s: the descriptor is too long to embed" % path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, header.overhead * SECTOR)
        pwrite_all(fd, header.pack(), 0, path)
        if descriptor is not None:
            pwrite_all(fd, descriptor, header.descriptor_offset * SECTOR,
                        path)
        for directory in (header.rgd_offset, header.gd_offset):
            first_table = directory + gd_sectors
            entries = b"".join(
                (first_table + i * gt_sectors).to_bytes(4, "little")
                for i in range(tables))
            pwrite_all(fd, entries, directory * SECTOR, path)
        os.fsync(fd)
    finally:
        os.close(fd)
