"""An S3-compatible server on loopback for tests: moto's standalone server (moto[server]) on 127.0.0.1 and a free
port. `s3_environment` gives the variables a test (or a `pmd` subprocess) needs: dummy credentials and the
endpoint in AWS_ENDPOINT_URL, which pmd.storage passes to pyarrow's S3 client."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests.ports import free_port



@dataclass
class Traffic:
    """What the server answered, by object path (`/bucket/key`): requests by method, GET requests and the body
    bytes they returned.
    A test that must prove an object was read in part (not downloaded whole) compares `bytes_out` to its size."""

    gets: Counter = field(default_factory=Counter)
    requests: Counter = field(default_factory=Counter)  # (method, path) -> requests, every method
    bytes_out: Counter = field(default_factory=Counter)
    latency_s: float = 0.0  # added to every GET, as a store across a network would (a benchmark sets it)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reset(self) -> None:
        with self._lock:
            self.gets.clear()
            self.requests.clear()
            self.bytes_out.clear()

    def wrap(self, app):
        def count(path: str, body):
            for piece in body:
                with self._lock:  # before it is sent: a client that has the bytes finds them counted
                    self.bytes_out[path] += len(piece)
                yield piece

        def counted(environ, start_response):
            path = environ.get("PATH_INFO", "")
            with self._lock:
                self.requests[(environ.get("REQUEST_METHOD"), path)] += 1
            if environ.get("REQUEST_METHOD") != "GET":
                return app(environ, start_response)
            with self._lock:
                self.gets[path] += 1
            if self.latency_s:
                time.sleep(self.latency_s)
            return count(path, app(environ, start_response))

        return counted


def _counting_server(port: int, traffic: Traffic):
    """moto's threaded server with its WSGI application wrapped by `traffic`."""
    from moto.server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class Counting(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = traffic.wrap(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    return Counting(ip_address="127.0.0.1", port=port, verbose=False)


@contextlib.contextmanager
def s3_server(buckets: tuple[str, ...] = ("pmd",), traffic: Traffic | None = None) -> Iterator[dict[str, str]]:
    """Start the server, create `buckets`, yield the environment that points clients at it; stop it after.
    With `traffic`, every GET it answers is counted there."""
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = free_port()
    server = (ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False) if traffic is None
              else _counting_server(port, traffic))
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        s3 = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                               endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
        for bucket in buckets:
            s3.create_dir(bucket)
        yield env
    finally:
        server.stop()


@contextlib.contextmanager
def s3_environment(buckets: tuple[str, ...] = ("pmd",), traffic: Traffic | None = None
                   ) -> Iterator[dict[str, str]]:
    """`s3_server` with its environment set in this process (os.environ) while it runs, restored after: for a
    module's fixture, where pytest's monkeypatch (function-scoped) cannot reach."""
    with s3_server(buckets, traffic) as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
