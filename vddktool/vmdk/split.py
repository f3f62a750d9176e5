"""Split disks (2GbMaxExtentSparse, 2GbMaxExtentFlat): many extent files.

Reading needs nothing special, since a split disk is just a descriptor with
several extent lines and the sizes come from those lines (producers differ:
VMware cuts at 2047 MiB, qemu at 2 GiB).  This module names and sizes the
pieces when creating one.
"""

import os

# VMware's cut: 2047 MiB, in sectors, so each file stays under 2 GiB.
SPLIT_EXTENT_SECTORS = 2047 * 2048


def base_name(path):
    """disk.vmdk -> disk: the stem extent files are named after."""
    name = os.path.basename(path)
    return name[:-5] if name.lower().endswith(".vmdk") else name


def piece_sectors(total_sectors, limit=SPLIT_EXTENT_SECTORS):
    """Sizes of the pieces of a disk of ``total_sectors``: all full but
    the last."""
    sizes = []
    left = total_sectors
    while left > 0:
        sizes.append(min(limit, left))
        left -= sizes[-1]
    return sizes


def piece_names(path, total_sectors, letter):
    """[(file name, sectors)]: NAME-s001.vmdk... (letter s) or
    NAME-f001.vmdk... (letter f)."""
    stem = base_name(path)
    return [("%s-%s%03d.vmdk" % (stem, letter, i + 1), sectors)
            for i, sectors in enumerate(piece_sectors(total_sectors))]
