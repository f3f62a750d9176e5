"""How the server moves bytes: socket and pipe channels, stdio detection."""

import os
import socket
import threading

from vddktool.server.channels import PipeChannel, SocketChannel, stdio_channel


def test_tcp_connections_turn_off_nagle():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        SocketChannel(accepted)
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        for sock in (client, accepted, listener):
            sock.close()


class ShortWriter(object):
    """A socket whose sendmsg takes only a few bytes, as after a signal."""

    family = socket.AF_UNIX

    def __init__(self):
        self.received = bytearray()

    def recv_into(self, *args):
        return 0

    def sendmsg(self, buffers):
        taken = bytes(buffers[0])[:3]
        self.received += taken
        return len(taken)

    def sendall(self, data):
        self.received += bytes(data)


def test_partial_sendmsg_is_completed_in_order():
    sock = ShortWriter()
    SocketChannel(sock).send([b"header", bytearray(b"payload"),
                               memoryview(b"tail")])
    assert bytes(sock.received) == b"headerpayloadtail"


def test_many_buffers_are_sent_in_batches():
    left, right = socket.socketpair()
    try:
        pieces = [bytes([i % 256]) * 3 for i in range(2000)]
        sender = threading.Thread(target=SocketChannel(left).send,
                                  args=(pieces,))
        sender.start()
        view = memoryview(bytearray(6000))
        assert SocketChannel(right).read_into(view)
        sender.join()
        assert view.tobytes() == b"".join(pieces)
    finally:
        left.close()
        right.close()


def test_socket_read_reports_end_of_stream():
    left, right = socket.socketpair()
    left.sendall(b"abc")
    left.close()
    try:
        assert not SocketChannel(right).read_into(memoryview(bytearray(4)))
    finally:
        right.close()


def test_stop_reading_wakes_a_blocked_socket_reader():
    left, right = socket.socketpair()
    channel = SocketChannel(right)
    result = []
    reader = threading.Thread(target=lambda: result.append(
        channel.read_into(memoryview(bytearray(28)))))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive()
    channel.stop_reading()
    reader.join(10)
    assert result == [False]
    left.close()
    right.close()


def test_pipe_channel_reads_writes_and_stops():
    to_server_r, to_server_w = os.pipe()
    from_server_r, from_server_w = os.pipe()
    stop_r, stop_w = os.pipe()
    try:
        channel = PipeChannel(to_server_r, from_server_w, stop_r)
        channel.send([b"abc", memoryview(b"def")])
        assert os.read(from_server_r, 10) == b"abcdef"
        os.write(to_server_w, b"12345")
        view = memoryview(bytearray(5))
        assert channel.read_into(view) and view.tobytes() == b"12345"
        os.write(stop_w, b"!")
        assert not channel.read_into(memoryview(bytearray(1)))
    finally:
        for fd in (to_server_r, to_server_w, from_server_r, from_server_w,
                   stop_r, stop_w):
            os.close(fd)


def test_stdio_on_one_socket_uses_the_socket_channel():
    left, right = socket.socketpair()
    stop_r, stop_w = os.pipe()
    try:
        channel = stdio_channel(right.fileno(), right.fileno(), stop_r)
        assert isinstance(channel, SocketChannel)
        left.sendall(b"hi")
        view = memoryview(bytearray(2))
        assert channel.read_into(view) and view.tobytes() == b"hi"
        channel.sock.close()
    finally:
        for sock in (left, right):
            sock.close()
        os.close(stop_r)
        os.close(stop_w)


def test_stdio_on_pipes_uses_the_pipe_channel():
    read_fd, write_fd = os.pipe()
    try:
        channel = stdio_channel(read_fd, write_fd, write_fd)
        assert isinstance(channel, PipeChannel)
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_buffered_reads_split_a_burst_exactly():
    left, right = socket.socketpair()
    try:
        burst = os.urandom(28 * 3) + os.urandom(40000) + os.urandom(10)
        sender = threading.Thread(target=left.sendall, args=(burst,))
        sender.start()
        channel = SocketChannel(right)
        out = []
        for size in (28, 28, 28, 40000, 10):
            view = memoryview(bytearray(size))
            assert channel.read_into(view)
            out.append(view.tobytes())
        sender.join()
        assert b"".join(out) == burst
        left.close()
        assert not channel.read_into(memoryview(bytearray(1)))
    finally:
        left.close()
        right.close()


def test_end_of_stream_inside_a_buffered_read():
    left, right = socket.socketpair()
    left.sendall(b"x" * 20)
    left.close()
    try:
        assert not SocketChannel(right).read_into(
            memoryview(bytearray(28)))
    finally:
        right.close()


def test_every_channel_keeps_the_whole_contract():
    """The dispatchers call these on whatever channel a connection has;
    one missing on one kind of channel fails only its clients."""
    from vddktool.server.tls_channel import TlsChannel
    contract = ("read_into", "buffered", "send", "stop_reading", "abort",
                "close", "zero_copy", "is_tls")
    for channel in (SocketChannel, PipeChannel, TlsChannel):
        missing = [name for name in contract
                   if not hasattr(channel, name)]
        assert not missing, (channel.__name__, missing)
