"""A lean loopback image server for benchmarks/bench_build.py (`--server asyncio`): /img/N.jpg only.

The benchmark's servers stand in for remote CDNs, whose CPU is not the measured machine's. tests/httpserver.py
(http.server: a thread per connection, headers parsed and written by Python) costs ~0.3 ms of CPU per image on the
same 2 cores as the tools it serves; this server answers from one asyncio loop with the response bytes built once
per image (~0.05 ms), so the measured machine's cores go to the tools. It serves the same bytes as
tests/httpserver.py (`jpeg(n, w, h)`) with the same headers, keeps connections alive unless the request says
`Connection: close` (HTTP/1.0 or urllib's default), and charges the same `--connect-delay` per new connection
before reading its first request (a stand-in for the TCP/TLS handshakes of a remote host).

    python benchmarks/loopback_asyncio.py --size 320x240 --connect-delay 0.05   # prints its port, serves until killed
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import sys
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from httpserver import jpeg  # the same generated images as the test server

_IMG = re.compile(rb"^GET /img/(\d+)\.jpg[ ?]")
_HEAD_END = b"\r\n\r\n"


@lru_cache(maxsize=65536)
def _image_response(n: int, width: int, height: int, close: bool) -> bytes:
    body = jpeg(n, width, height)
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n"
            f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n").encode()
    return head + body


def _not_found(close: bool) -> bytes:
    return (f"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n"
            f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\nnope").encode()


class _Connection(asyncio.Protocol):
    def __init__(self, size: tuple[int, int], delay: float):
        self.size = size
        self.delay = delay
        self.buffer = b""
        self.ready = delay <= 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.ready:
            # The handshake delay: the first request is not read before it has passed.
            transport.pause_reading()
            asyncio.get_running_loop().call_later(self.delay, self._open)

    def _open(self) -> None:
        self.ready = True
        if not self.transport.is_closing():
            self.transport.resume_reading()
            self._serve()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.ready:
            self._serve()

    def _serve(self) -> None:
        while (end := self.buffer.find(_HEAD_END)) >= 0:
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            lowered = head.lower()
            close = b"connection: close" in lowered or lowered.split(b"\r\n", 1)[0].endswith(b" http/1.0")
            m = _IMG.match(head)
            self.transport.write(_image_response(int(m.group(1)), *self.size, close) if m else _not_found(close))
            if close:
                self.transport.close()
                return


async def _serve(size: tuple[int, int], delay: float, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(size, delay), "127.0.0.1", port, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--size", default="64x48")
    parser.add_argument("--connect-delay", type=float, default=0.0, help="seconds charged per new connection")
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    asyncio.run(_serve((w, h), args.connect_delay, args.port))


if __name__ == "__main__":
    main()
