"""A loopback stand-in for the Hugging Face Hub: the few routes ``huggingface_hub.snapshot_download`` uses, serving
repositories given as ``{repo_id: {filename: bytes}}``. Point the client at it with ``HF_ENDPOINT``.

Routes:
  GET  /api/models/{repo}[/revision/{rev}]    repo info: sha (the commit) and siblings
  GET  /api/models/{repo}/tree/{rev}[/{path}] the file listing (type, path, size, oid)
  HEAD|GET /{repo}/resolve/{rev}/{file}       the file, with X-Repo-Commit, ETag and Content-Length
Anything else is a 404 that the test can see in ``server.requests``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.commits = {r: hashlib.sha1(r.encode()).hexdigest() for r in repos}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_HEAD(self):
                hub._serve(self, head=True)

            def do_GET(self):
                hub._serve(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _repo_and_rest(self, parts: list[str]):
        for n in (2, 1):
            repo = "/".join(parts[:n])
            if repo in self.repos:
                return repo, parts[n:]
        return None, parts

    def _serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append((h.command, h.path))
        parts = [p for p in path.split("/") if p]
        body, headers, status = b"not found", {}, 404
        if parts[:2] == ["api", "models"]:
            repo, rest = self._repo_and_rest(parts[2:])
            if repo is not None and (not rest or rest[0] in ("revision", "tree")):
                files = self.repos[repo]
                if not rest or rest[0] == "revision":
                    info = {"id": repo, "modelId": repo, "sha": self.commits[repo], "private": False,
                            "siblings": [{"rfilename": f} for f in sorted(files)]}
                else:
                    info = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                            for f, b in sorted(files.items())]
                body, status = json.dumps(info).encode(), 200
                headers = {"Content-Type": "application/json"}
        else:
            repo, rest = self._repo_and_rest(parts)
            if repo is not None and len(rest) >= 3 and rest[0] == "resolve":
                name = "/".join(rest[2:])
                if name in self.repos[repo]:
                    body, status = self.repos[repo][name], 200
                    headers = {"X-Repo-Commit": self.commits[repo], "ETag": f'"{hashlib.sha1(body).hexdigest()}"',
                               "Content-Type": "application/octet-stream"}
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
