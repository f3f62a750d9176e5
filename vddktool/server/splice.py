"""Moving a write's payload from the socket into the disk file with
splice(2), through a pipe, without passing through Python.

A plain receive copies the payload from the socket into a Python buffer,
and pwrite copies it again into the page cache; splice moves the
socket's pages into a pipe and copies once, into the file.  Python only
has os.splice from 3.10, so libc's is called through ctypes; where it is
missing (not Linux) or the socket refuses it, the server receives as
before.  From 3.10 os.splice is used: a C call costs a fraction of a
ctypes one, and a write takes two to four of them.
"""

import ctypes
import errno
import fcntl
import os

# From <fcntl.h>: a larger pipe moves a whole request in fewer calls.
_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1024 * 1024
_SPLICE_F_MOVE = 1


def _load_splice():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.splice
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64),
                         ctypes.c_int, ctypes.POINTER(ctypes.c_int64),
                         ctypes.c_size_t, ctypes.c_uint]
    function.restype = ctypes.c_ssize_t
    return function


_os_splice = getattr(os, "splice", None)
_splice = None if _os_splice is not None else _load_splice()


class FileWriteFailed(Exception):
    """The file refused the payload (ENOSPC, EIO...); the payload was
    still taken from the socket, so the connection goes on."""

    def __init__(self, err):
        super().__init__(os.strerror(err))
        self.errno = err


class Splicer(object):
    """Moves payloads from one socket into files.  ``move`` returns True
    when the payload is in the file, False at end of stream, and raises
    FileWriteFailed when the file failed (the payload is consumed
    anyway).  ``usable`` turns False for good when the socket cannot be
    spliced; the caller then receives as usual."""

    def __init__(self, sock_fd):
        self.sock_fd = sock_fd
        self.usable = _splice is not None or _os_splice is not None
        self._pipe = None

    def _pipe_fds(self):
        if self._pipe is None:
            read_fd, write_fd = os.pipe()
            try:
                fcntl.fcntl(write_fd, _F_SETPIPE_SZ, _PIPE_SIZE)
            except OSError:
                pass    # the default 64 KiB pipe works, in more calls
            self._pipe = (read_fd, write_fd)
        return self._pipe

    def move(self, fd, offset, count):
        """Move ``count`` bytes from the socket into ``fd`` at ``offset``.
        None when splice turned out not to work before anything moved."""
        read_fd, write_fd = self._pipe_fds()
        failure = 0
        left = count
        while left:
            taken = _call(self.sock_fd, write_fd, left)
            if taken < 0:
                err = -taken
                if left == count and err in (errno.EINVAL, errno.ENOSYS):
                    self.usable = False     # this socket cannot be spliced
                    return None
                raise OSError(err, os.strerror(err))
            if taken == 0:
                return False                # the client hung up
            left -= taken
            in_pipe = taken
            while in_pipe:
                if failure:
                    moved = len(os.read(read_fd, in_pipe))  # drain it
                else:
                    moved = _call(read_fd, fd, in_pipe, offset)
                    if moved <= 0:
                        failure = -moved if moved < 0 else errno.EIO
                        continue
                    offset += moved
                in_pipe -= moved
        if failure:
            raise FileWriteFailed(failure)
        return True

    def close(self):
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None


def _ctypes_call(fd_in, fd_out, count, offset_out=None):
    """splice(2) through ctypes; the count moved, or -errno.  EINTR is
    retried."""
    position = None if offset_out is None else \
        ctypes.byref(ctypes.c_int64(offset_out))
    while True:
        moved = _splice(fd_in, None, fd_out, position, count, _SPLICE_F_MOVE)
        if moved >= 0:
            return moved
        err = ctypes.get_errno()
        if err != errno.EINTR:
            return -err


def _os_call(fd_in, fd_out, count, offset_out=None):
    """The same through os.splice (3.10+, which retries EINTR itself)."""
    try:
        return _os_splice(fd_in, fd_out, count, offset_dst=offset_out,
                          flags=_SPLICE_F_MOVE)
    except OSError as exc:
        return -exc.errno


_call = _os_call if _os_splice is not None else _ctypes_call
