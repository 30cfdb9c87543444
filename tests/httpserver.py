"""A loopback HTTP server for download tests and the build benchmark: generated images plus every bad case.

Routes (all GET):
  /img/N.jpg            a generated JPEG (WxH from the server's image_size), content depends on N only
  /status/404|429|500   that status with a short body
  /sleep.jpg            answers after `sleep_s` (past the client timeout)
  /slow.jpg             sends headers and half a JPEG, then stalls past the timeout
  /truncated.jpg        the first half of a JPEG, with a matching Content-Length (decodes as broken)
  /html.jpg             an HTML page served as image/jpeg
  /bomb.png             a 10000x10000 1-bit PNG (100 Mpx > the 89.5 Mpx limit) of a few kB
  /tiny.jpg             a 1x1 JPEG
  /redirect/301/N.jpg   301 to /img/N.jpg (likewise 302)
  /noai.jpg             a good JPEG with `X-Robots-Tag: noai`
  /flaky/F/N.jpg        503 for the first F requests of this exact URL (query included), then /img/N.jpg
  /huge.jpg             a JPEG padded to `huge_bytes` (declared in Content-Length), streamed
  /huge-chunked.jpg     the same body with no Content-Length (read until the server closes)
  /trickle.jpg          a JPEG sent one byte every `trickle_s` seconds
  /lying-length.jpg     a JPEG whose Content-Length claims 10x its size; the server then stalls `sleep_s`
  /gzip-bomb.jpg        `Content-Encoding: gzip` of `bomb_bytes` zero bytes (1 GiB inflates from ~1 MB)
  /gzip.jpg             a good JPEG sent with `Content-Encoding: gzip`
  /retry-after/N/S/K.jpg  the first N requests of this path answer 429 with `Retry-After: S`, then /img/K.jpg

Every server counts its connections (`connections`, `peak_connections`: open at once, idle keep-alive included)
and can charge `connect_delay_s` per new connection (a stand-in for the TCP/TLS handshakes of a remote host).

Run as a script (`python tests/httpserver.py --port 0 --size 64x48`) it prints its port and serves until killed: the
benchmark runs it in its own process so that serving does not compete with the measured process for the GIL.
"""

from __future__ import annotations

import argparse
import gzip
import io
import zlib
import sys
import threading
import time
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

# Every route's image: deterministic, its bytes differ for every n (tests compare bodies with it).
from pmd_demo.drawings import numbered_jpeg as jpeg

BAD_CASES: dict[str, tuple[str, str]] = {
    # path -> (expected stage, expected reason) once it goes through `pmd build`
    "/status/404": ("download", "http_404"),
    "/status/429": ("download", "http_429"),
    "/status/500": ("download", "http_500"),
    "/sleep.jpg": ("download", "timeout"),
    "/slow.jpg": ("download", "timeout"),
    "/truncated.jpg": ("decode", "decode_error"),
    "/html.jpg": ("decode", "decode_error"),
    "/bomb.png": ("check", "too_many_pixels"),
    "/tiny.jpg": ("check", "too_small"),
    "/noai.jpg": ("download", "opted_out"),
}
GOOD_REDIRECTS = ("/redirect/301/7.jpg", "/redirect/302/8.jpg")
# Hostile-server cases (issue 14 item 2), bounded by the downloader: path -> (stage, reason) through `pmd build`.
HOSTILE_CASES: dict[str, tuple[str, str]] = {
    "/huge.jpg": ("download", "too_large"),
    "/huge-chunked.jpg": ("download", "too_large"),
    "/trickle.jpg": ("download", "timeout"),
    "/lying-length.jpg": ("download", "timeout"),
    "/gzip-bomb.jpg": ("download", "too_large"),
}


@lru_cache(maxsize=None)
def bomb_png() -> bytes:
    out = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(out, "PNG", optimize=False)
    return out.getvalue()


@lru_cache(maxsize=4)
def gzip_zeros(n: int) -> bytes:
    """gzip of n zero bytes, compressed piecewise (1 GiB -> ~1 MB without ever holding 1 GiB)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [z.compress(block) for _ in range(n >> 20)]
    parts.append(z.compress(bytes(n & ((1 << 20) - 1))))
    parts.append(z.flush())
    return b"".join(parts)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as separate writes: with Nagle on, a kept-alive connection's body would wait for the
    # client's delayed ACK (40 ms), an artefact of this server that real servers (writev, corking) do not have.
    disable_nagle_algorithm = True
    server: LoopbackServer  # type: ignore[assignment]

    def log_message(self, format, *args):
        pass

    def _send(self, status: int, body: bytes, content_type: str = "image/jpeg", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _send_huge(self, head: bytes, size: int, declared: bool) -> None:
        """`head` padded with zeros to `size` bytes, streamed; without a declared length the server closes."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if declared:
            self.send_header("Content-Length", str(size))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(head)
        block = bytes(1 << 16)
        left = size - len(head)
        while left > 0:
            self.wfile.write(block[:left])
            left -= len(block)

    def do_GET(self) -> None:
        srv = self.server
        path = self.path.split("?")[0]
        srv.user_agents.add(self.headers.get("User-Agent", ""))
        w, h = srv.image_size
        try:
            if path.startswith("/img/"):
                self._send(200, jpeg(int(path[5:].split(".")[0]), w, h))
            elif path.startswith("/status/"):
                code = int(path.rsplit("/", 1)[1])
                self._send(code, b"nope", "text/plain")
            elif path == "/sleep.jpg":
                time.sleep(srv.sleep_s)
                self._send(200, jpeg(1, w, h))
            elif path == "/slow.jpg":
                body = jpeg(2, w, h)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                time.sleep(srv.sleep_s)
                self.wfile.write(body[len(body) // 2:])
            elif path == "/truncated.jpg":
                self._send(200, jpeg(3, w, h)[: len(jpeg(3, w, h)) // 2])
            elif path == "/html.jpg":
                self._send(200, b"<!doctype html><html><body>not an image</body></html>")
            elif path == "/bomb.png":
                self._send(200, bomb_png(), "image/png")
            elif path == "/tiny.jpg":
                self._send(200, jpeg(4, 1, 1))
            elif path.startswith("/redirect/"):
                _, _, code, rest = path.split("/", 3)
                self.send_response(int(code))
                self.send_header("Location", f"/img/{rest}")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path == "/noai.jpg":
                self._send(200, jpeg(5, w, h), headers={"X-Robots-Tag": "noai"})
            elif path in ("/huge.jpg", "/huge-chunked.jpg"):
                self._send_huge(jpeg(6, w, h), srv.huge_bytes, declared=path == "/huge.jpg")
            elif path == "/trickle.jpg":
                body = jpeg(9, w, h)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(srv.trickle_s)
            elif path == "/lying-length.jpg":
                body = jpeg(10, w, h)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(10 * len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                time.sleep(srv.sleep_s)
                self.close_connection = True
            elif path == "/gzip-bomb.jpg":
                self._send(200, gzip_zeros(srv.bomb_bytes), headers={"Content-Encoding": "gzip"})
            elif path == "/gzip.jpg":
                self._send(200, gzip.compress(jpeg(11, w, h)), headers={"Content-Encoding": "gzip"})
            elif path.startswith("/retry-after/"):
                _, _, n, seconds, rest = path.split("/", 4)
                with srv.lock:
                    seen = srv.hits[path] = srv.hits.get(path, 0) + 1
                if seen <= int(n):
                    self._send(429, b"slow down", "text/plain", headers={"Retry-After": seconds})
                else:
                    self._send(200, jpeg(int(rest.split(".")[0]), w, h))
            elif path.startswith("/flaky/"):
                _, _, fails, name = path.split("/", 3)
                if srv.count_request(self.path) <= int(fails):
                    self._send(503, b"try again later", "text/plain")
                else:
                    self._send(200, jpeg(int(name.split(".")[0]), w, h))
            else:
                self._send(404, b"unknown", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, image_size: tuple[int, int] = (64, 48), sleep_s: float = 3.0, port: int = 0,
                 connect_delay_s: float = 0.0, huge_bytes: int = 64 * 2**20, bomb_bytes: int = 2**30,
                 trickle_s: float = 1.0, host: str = "127.0.0.1"):
        super().__init__((host, port), _Handler)
        self.image_size = image_size
        self.sleep_s = sleep_s
        self.connect_delay_s = connect_delay_s
        self.huge_bytes = huge_bytes
        self.bomb_bytes = bomb_bytes
        self.trickle_s = trickle_s
        self.lock = threading.Lock()
        self.hits: dict[str, int] = {}  # path -> requests seen (/retry-after/)
        self.user_agents: set[str] = set()  # every User-Agent seen
        self.connections = 0  # opened so far
        self.open_connections = 0
        self.peak_connections = 0  # most open at once
        self._thread: threading.Thread | None = None
        self._requests: dict[str, int] = {}
        self._requests_lock = threading.Lock()

    def count_request(self, path: str) -> int:
        """How many times `path` has been requested, this one included."""
        with self._requests_lock:
            self._requests[path] = self._requests.get(path, 0) + 1
            return self._requests[path]

    def process_request_thread(self, request, client_address) -> None:
        with self.lock:
            self.connections += 1
            self.open_connections += 1
            self.peak_connections = max(self.peak_connections, self.open_connections)
        try:
            if self.connect_delay_s:
                time.sleep(self.connect_delay_s)
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.open_connections -= 1

    @property
    def base_url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def start(self) -> LoopbackServer:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--size", default="64x48")
    parser.add_argument("--sleep", type=float, default=3.0)
    parser.add_argument("--connect-delay", type=float, default=0.0, help="seconds charged per new connection")
    args = parser.parse_args()
    w, h = (int(x) for x in args.size.split("x"))
    server = LoopbackServer((w, h), args.sleep, args.port, connect_delay_s=args.connect_delay)
    print(server.server_address[1], flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
