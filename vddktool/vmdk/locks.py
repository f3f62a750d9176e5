"""Image locks that qemu and vddktool both honour: one writer at a time.

qemu marks every image file it opens with open file description (OFD)
byte-range locks, always shared (read) locks, one byte per permission:

- byte 100 + bit for each permission it holds,
- byte 200 + bit for each permission it refuses to share,

with the permission bits 0 consistent read, 1 write, 2 write unchanged,
3 resize.  After taking its own bytes it asks the kernel (F_OFD_GETLK,
probing with a write lock) whether another open file description holds a
byte that conflicts: the "refuses to share" byte of a permission it
needs, or the "holds" byte of a permission it refuses to share.  Doing
the same here makes vddktool and qemu-img, qemu-io, qemu-nbd and QEMU
itself see each other:

- a writer holds consistent read, write and resize, and shares neither
  write nor resize, so it is alone;
- a reader holds consistent read and shares neither write nor resize, so
  readers share the image but no writer can join them;
- force-share (qemu's -U) holds consistent read and refuses nothing, so
  it reads alongside a writer (at its own risk) and blocks no one.

OFD locks belong to the open file description: they survive the
daemonizing fork, go away with the last descriptor, and are not touched
by other descriptors of the same file in this process.
"""

import errno
import fcntl
import os
import struct

from .. import log
from .extent import VmdkError

# Linux numbers, for Pythons whose fcntl module lacks the names (< 3.9).
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)

CONSISTENT_READ = 1 << 0
WRITE = 1 << 1
WRITE_UNCHANGED = 1 << 2
RESIZE = 1 << 3
ALL_PERMISSIONS = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE

HELD_BASE = 100
UNSHARED_BASE = 200

# struct flock on Linux: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid, then padding.
_FLOCK = struct.Struct("hhqqi4x")


class ImageLocked(VmdkError):
    """Another process holds the image in a way that excludes us."""


def permissions(writer, force_share):
    """(held, unshared) permission masks, as qemu's block layer computes
    them for an image file opened read-write, read-only, or with -U."""
    if writer:
        return CONSISTENT_READ | WRITE | RESIZE, WRITE | RESIZE
    if force_share:
        return CONSISTENT_READ, 0
    return CONSISTENT_READ, WRITE | RESIZE


def _bits(mask):
    return [bit for bit in range(ALL_PERMISSIONS.bit_length())
            if mask & (1 << bit)]


def _flock(lock_type, offset):
    return _FLOCK.pack(lock_type, os.SEEK_SET, offset, 1, 0)


def _take(fd, offset):
    fcntl.fcntl(fd, F_OFD_SETLK, _flock(fcntl.F_RDLCK, offset))


def _taken_by_another(fd, offset):
    answer = fcntl.fcntl(fd, F_OFD_GETLK, _flock(fcntl.F_WRLCK, offset))
    return _FLOCK.unpack(answer)[0] != fcntl.F_UNLCK


class ImageLocks(object):
    """The lock descriptors of one image's files (read-only descriptors,
    opened only to carry the locks)."""

    def __init__(self, writer, force_share=False):
        self.writer = writer
        self.held, self.unshared = permissions(writer, force_share)
        self._fds = {}

    def lock(self, path):
        """Take the bytes on ``path`` and check nobody conflicts; raise
        ImageLocked naming the file if somebody does.  A file that does
        not exist is left to the caller's open to report."""
        key = os.path.realpath(path)
        if key in self._fds:
            return
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return
        except OSError as e:
            raise VmdkError("%s: %s" % (path, e.strerror))
        self._fds[key] = fd
        try:
            self._apply(fd, path)
        except OSError as e:
            self._unsupported(path, e)

    def _apply(self, fd, path):
        for bit in _bits(self.held):
            self._take_or_refuse(fd, path, HELD_BASE + bit)
        for bit in _bits(self.unshared):
            self._take_or_refuse(fd, path, UNSHARED_BASE + bit)
        # What others hold that we refuse to share (a writer's write and
        # resize), then what others refuse to share that we hold (every
        # reader and writer refuses to share writing).
        for bit in _bits(self.unshared):
            if _taken_by_another(fd, HELD_BASE + bit):
                raise self._refusal(path, other_writes=True)
        for bit in _bits(self.held):
            if _taken_by_another(fd, UNSHARED_BASE + bit):
                raise self._refusal(path, other_writes=False)

    def _take_or_refuse(self, fd, path, offset):
        try:
            _take(fd, offset)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise self._refusal(path, other_writes=True)
            raise

    def _refusal(self, path, other_writes):
        """One line: which file, that another process holds it, and what
        the user can do."""
        if self.writer and other_writes:
            why = ("it may be writing the image, and two writers corrupt "
                   "it; stop that process first, or add -r "
                   "force-share=true to read it anyway")
        elif self.writer:
            why = ("it is reading the image, which a writer would change "
                   "underneath; stop that process first, or add -r to "
                   "read it too")
        elif other_writes:
            why = ("it may be writing the image; stop that process first, "
                   "or read it anyway with -r force-share=true (what is "
                   "read may change meanwhile)")
        else:
            why = ("it lets nobody else read the image; stop that process "
                   "first")
        return ImageLocked("%s: another process (qemu or vddktool) holds a "
                           "lock on this file: %s" % (path, why))

    def _unsupported(self, path, error):
        if error.errno == errno.EINVAL:
            # A kernel without OFD locks (before Linux 3.15): qemu does
            # not lock either.
            log.debug("%s: this system has no open file description "
                      "locks: the image is not locked", path)
        else:
            log.warning("%s: cannot lock the file (%s): other programs "
                        "will not see that it is in use", path,
                        error.strerror)

    def release(self):
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
