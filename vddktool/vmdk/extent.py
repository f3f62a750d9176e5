"""What every extent reader of the native engine provides.

A VMDK disk is the concatenation of the extents named by its descriptor
(FLAT, SPARSE, ZERO, VMFS, VMFSSPARSE, SESPARSE, ...), and a snapshot is a
chain of disks each falling through to its parent where it holds nothing.
Each extent kind implements ``ExtentReader``; the disk (descriptor.py /
image code) maps virtual offsets onto extents and walks the parent chain.

All offsets and lengths here are bytes relative to the start of the extent.
"""

# States of a run of an extent, returned by ``ExtentReader.map``.
DATA = "data"            # allocated: read it from this extent
ZERO = "zero"            # reads as zeros and hides the parent
UNALLOCATED = "unalloc"  # nothing here: the parent's data, or zeros


class VmdkError(Exception):
    """A damaged, truncated or unsupported file.  The message names the
    file and what is wrong; it reaches the user as one line."""


class ExtentReader(object):
    """One extent.  Subclasses: flat, hosted sparse, stream, COWD, seSparse,
    zero.  Thread safety: ``map`` and ``read`` may run concurrently;
    ``write``/``zero``/``trim`` are serialized by the caller's image lock
    when they allocate."""

    #: size of the extent in bytes (sectors * 512 from the extent line)
    size = 0
    #: False for RDONLY/NOACCESS extents and read-only formats
    writable = False

    def map(self, offset, count):
        """[(length, state)] covering exactly ``count`` bytes from ``offset``,
        state one of DATA, ZERO, UNALLOCATED.  Adjacent runs of the same
        state may or may not be merged.  Must not read grain data."""
        raise NotImplementedError

    def read(self, offset, count):
        """[(length, value)] covering exactly ``count`` bytes: value is a
        bytes-like of that length (DATA), ZERO, or UNALLOCATED."""
        raise NotImplementedError

    def read_range(self, offset, count):
        """Like ``read``, but a DATA value may be an ``engine.FileRange``
        that the server sends straight from the file (flat extents)."""
        return self.read(offset, count)

    def write(self, offset, data):
        """Write ``data`` (bytes-like) at ``offset``, allocating as needed.
        ``data`` is reused once this returns: copy what must outlive it."""
        raise VmdkError("this extent is read-only")

    def zero(self, offset, count, may_trim=False):
        """Make the range read as zeros (hiding any parent).  Returns nothing."""
        raise VmdkError("this extent is read-only")

    def flush(self):
        pass

    def close(self):
        pass
