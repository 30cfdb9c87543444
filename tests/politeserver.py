"""tests/httpserver.py's loopback server with a request log on its own clock, for the politeness tests (issue 25).

Extra routes (all GET; the others are LoopbackServer's):
  /robots.txt             `robots_status` with `robots_txt` as its body (default 404: no rules)
  /hold/N.jpg             /img/N.jpg after `hold_s` seconds (requests overlap: in-flight counts mean something)
  /same/N.jpg             the same JPEG (the n=1 image) whatever N: one image under many URLs
  /gone/N.jpg             302 to /pw/images/en-us/photo_unavailable.png (Flickr's answer for a removed photo)
  /pw/images/en-us/photo_unavailable.png   a grey PNG
  /noai-stall.jpg         `X-Robots-Tag: noai`, a Content-Length of 1 MB, 1 kB of body, then a 3 s stall
  /once429/S/N.jpg        the first request of the server to any /once429/ path answers 429 with `Retry-After: S`;
                          every other one is /hold/N.jpg
  /chain/N/K.jpg          N > 0: 302 to the relative `../N-1/K.jpg`; N = 0: 301 to `/img/K.jpg` (N + 1 redirects)
  /moved-chunked/N.jpg    302 to /img/N.jpg with a short chunked body (a connection that stays usable once read)
  /moved-close/N.jpg      302 to /img/N.jpg with a body of no length, ended by closing the connection
  any path of `redirects` 302 to the Location it maps to (another server, a relative path ...)

`log` holds (path, arrived, answered) per request, `time.monotonic()` of this process (answered: when the answer
starts); `peak_in_flight` the most requests between arrival and answer at once (robots.txt included).
"""

from __future__ import annotations

import io
import time

from PIL import Image

from pmd_demo.drawings import numbered_jpeg as jpeg
from tests.httpserver import LoopbackServer, _Handler


def grey_png() -> bytes:
    out = io.BytesIO()
    Image.new("L", (500, 374), 200).save(out, format="PNG")
    return out.getvalue()


class _PoliteHandler(_Handler):
    server: PoliteServer  # type: ignore[assignment]

    def do_GET(self) -> None:
        srv = self.server
        self._path, self._arrived, self._answered = self.path.split("?")[0], time.monotonic(), False
        with srv.lock:
            srv.in_flight += 1
            srv.peak_in_flight = max(srv.peak_in_flight, srv.in_flight)
        try:
            self._route(self._path)
        finally:
            self._answer()

    def _answer(self) -> None:
        """The request stops counting as in flight when its answer starts: a client may send its next request as
        soon as it has read this answer, before this thread runs again."""
        if not self._answered:
            self._answered = True
            with self.server.lock:
                self.server.in_flight -= 1
                self.server.log.append((self._path, self._arrived, time.monotonic()))

    def _send(self, status: int, body: bytes, content_type: str = "image/jpeg", headers: dict | None = None) -> None:
        self._answer()
        super()._send(status, body, content_type, headers)

    def _route(self, path: str) -> None:
        srv = self.server
        w, h = srv.image_size
        if path in srv.redirects:
            self._send(302, b"", "text/plain", headers={"Location": srv.redirects[path]})
        elif path.startswith(("/moved-chunked/", "/moved-close/")):
            self._answer()
            self.send_response(302)
            self.send_header("Location", f"/img/{path.rsplit('/', 1)[1]}")
            chunked = path.startswith("/moved-chunked/")
            self.send_header("Transfer-Encoding" if chunked else "Connection", "chunked" if chunked else "close")
            self.end_headers()
            self.wfile.write(b"5\r\nmoved\r\n6\r\n here.\r\n0\r\n\r\n" if chunked else b"moved here.")
            self.close_connection = not chunked
        elif path.startswith("/chain/"):
            _, _, n, name = path.split("/", 3)
            location = f"../{int(n) - 1}/{name}" if int(n) > 0 else f"/img/{name}"
            self._send(302 if int(n) > 0 else 301, b"", "text/plain", headers={"Location": location})
        elif path == "/robots.txt":
            self._send(srv.robots_status, srv.robots_txt.encode(), "text/plain")
        elif path.startswith("/hold/"):
            time.sleep(srv.hold_s)
            self._send(200, jpeg(int(path.rsplit("/", 1)[1].split(".")[0]), w, h))
        elif path.startswith("/same/"):
            self._send(200, jpeg(1, w, h))
        elif path.startswith("/gone/"):
            self._send(302, b"", "text/plain", headers={"Location": "/pw/images/en-us/photo_unavailable.png"})
        elif path == "/pw/images/en-us/photo_unavailable.png":
            self._send(200, grey_png(), "image/png")
        elif path == "/noai-stall.jpg":
            self._answer()
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(1 << 20))
            self.send_header("X-Robots-Tag", "noai")
            self.end_headers()
            self.wfile.write(bytes(1024))
            self.wfile.flush()
            time.sleep(3.0)
            self.close_connection = True
        elif path.startswith("/once429/"):
            _, _, seconds, name = path.split("/", 3)
            with srv.lock:
                first, srv.refused = not srv.refused, True
            if first:
                self._send(429, b"slow down", "text/plain", headers={"Retry-After": seconds})
                with srv.lock:
                    srv.refused_at = time.monotonic()
            else:
                time.sleep(srv.hold_s)
                self._send(200, jpeg(int(name.split(".")[0]), w, h))
        else:
            super().do_GET()


class PoliteServer(LoopbackServer):
    def __init__(self, hold_s: float = 0.05, robots_txt: str = "", robots_status: int = 404,
                 redirects: dict[str, str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.redirects: dict[str, str] = dict(redirects or {})  # path -> Location (may be set after start)
        self.RequestHandlerClass = _PoliteHandler
        self.hold_s = hold_s
        self.robots_txt, self.robots_status = robots_txt, robots_status
        self.in_flight = 0
        self.peak_in_flight = 0
        self.log: list[tuple[str, float, float]] = []
        self.refused = False
        self.refused_at: float | None = None  # when the 429 was answered

    def requests(self, prefix: str) -> list[tuple[str, float, float]]:
        with self.lock:
            return [r for r in self.log if r[0].startswith(prefix)]

