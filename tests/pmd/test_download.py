"""Downloads per chunk against the loopback server, with both backends: every bad and hostile case ends with the
right stage and reason, memory and time stay bounded, and no host sees more than `max_per_host` connections."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest

from pmd.build import ChunkTask, read_chunk, run_chunk
from pmd import schema
from pmd.download import BACKENDS, DownloadOptions, classify_error, download_chunk
from pmd.http_client import HttpClient, is_disallowed, parse_retry_after
from pmd.resolver import Resolver
from pmd.images import ImageOptions
from tests.loopback import loopback_guard, loopback_options
from tests.httpserver import (BAD_CASES, GOOD_REDIRECTS, HOSTILE_CASES, LoopbackServer, bomb_png, gzip_zeros,
                              jpeg)

MAX_BYTES = 256 * 1024  # the byte cap of these tests: the hostile bodies are 4x that, or inflate to 64x
# img2dataset bounds each socket read, not the whole download: a byte every 0.2 s is never a timeout there
# (documented in pmd/download_img2dataset.py and docs/build.md), so that case runs with the http backend only.
IMG2DATASET_UNBOUNDED = {"/trickle.jpg"}


@pytest.fixture(scope="module")
def server():
    srv = LoopbackServer(image_size=(64, 48), sleep_s=2.0, huge_bytes=4 * MAX_BYTES, bomb_bytes=64 * MAX_BYTES,
                         trickle_s=0.2).start()
    # Generated once per process (the 100 Mpx PNG takes a while): not on the clock of a 0.8 s deadline.
    bomb_png(), gzip_zeros(srv.bomb_bytes)
    yield srv
    srv.stop()


def _cases(backend: str) -> dict[str, tuple[str, str]]:
    cases = {**BAD_CASES, **HOSTILE_CASES}
    if backend == "img2dataset":
        cases = {p: v for p, v in cases.items() if p not in IMG2DATASET_UNBOUNDED}
    return cases


@pytest.mark.parametrize("message, reason", [
    ("HTTP Error 404: Not Found", "http_404"),
    ("HTTP Error 429: Too Many Requests", "http_429"),
    ("timed out", "timeout"),
    ("<urlopen error timed out>", "timeout"),
    ("Use of image disallowed by X-Robots-Tag directive", "opted_out"),
    ("<urlopen error [Errno 111] Connection refused>", "connection_error"),
    ("IncompleteRead(10 bytes read, 20 more expected)", "truncated_body"),
    ("something odd", "download_error"),
])
def test_classify_error(message, reason):
    assert classify_error(message) == reason


@pytest.mark.parametrize("backend", BACKENDS)
def test_download_chunk_reasons(server, tmp_path, backend):
    paths = ["/img/1.jpg", *GOOD_REDIRECTS, "/gzip.jpg", "/status/404", "/noai.jpg", "/sleep.jpg", "/huge.jpg",
             "/gzip-bomb.jpg"]
    got = {d.key: d for d in download_chunk(paths, [server.url(p) for p in paths],
                                            loopback_options(timeout=0.8, thread_count=8, backend=backend),
                                            tmp_path / "w", max_bytes=MAX_BYTES)}
    assert list(got) == paths  # input order, one result per key
    assert all(got[p].data and got[p].data[:2] == b"\xff\xd8" for p in ["/img/1.jpg", *GOOD_REDIRECTS])
    assert got["/img/1.jpg"].data == jpeg(1, 64, 48) and got["/gzip.jpg"].data == jpeg(11, 64, 48)
    assert [got[p].reason for p in paths[4:]] == ["http_404", "opted_out", "timeout", "too_large", "too_large"]
    assert not (tmp_path / "w").exists()  # scratch removed


@pytest.mark.parametrize("backend", BACKENDS)
def test_robots_directives_can_be_ignored(server, tmp_path, backend):
    [d] = download_chunk(["k"], [server.url("/noai.jpg")],
                         loopback_options(disallowed_header_directives=[], backend=backend), tmp_path / "w")
    assert d.reason is None and d.data


@pytest.mark.parametrize("backend", BACKENDS)
def test_url_chunk_every_bad_case(server, tmp_path, backend):
    cases = _cases(backend)
    paths = ["/img/1.jpg", *GOOD_REDIRECTS, *cases]
    n = len(paths)
    table = pa.table({
        schema.KEY: [f"t/{i}" for i in range(n)], schema.SOURCE: ["t"] * n, schema.TEXT: [f"c{i}" for i in range(n)],
        schema.IMAGE_URL: [server.url(p) for p in paths], schema.IMAGE_REF: [None] * n, schema.SPLIT: ["train"] * n,
        schema.META: ["{}"] * n, schema.LANG: [None] * n, schema.LANG_SCORE: [None] * n,
    }, schema=schema.PAIR_SCHEMA)
    path = tmp_path / "images" / "t" / "chunk-00000.arrow"
    started = time.monotonic()
    summary = run_chunk(ChunkTask("t", 0, table, path, ImageOptions(image_size=32, max_image_bytes=MAX_BYTES),
                                  seed=0, mode="url", download=loopback_options(timeout=0.8, backend=backend)))
    # Every case runs in parallel, each bounded by the 0.8 s deadline (the trickle alone would take 4 minutes).
    assert time.monotonic() - started < 10
    assert summary["rows"] == n and summary["ok"] == 3
    result = read_chunk(path).to_pylist()
    by_path = dict(zip(paths, result))
    for p, (stage, reason) in cases.items():
        assert (by_path[p]["stage"], by_path[p]["reason"]) == (stage, reason), (p, by_path[p]["detail"])
        assert by_path[p]["image"] is None
    for p in ["/img/1.jpg", *GOOD_REDIRECTS]:
        row = by_path[p]
        assert row["reason"] is None and row["image_sha256"] and (row["width"], row["height"]) == (43, 32)
        assert (row["original_width"], row["original_height"]) == (64, 48)
    assert not list(path.parent.glob(".*tmp*"))


def test_byte_cap_holds_memory_and_time(server):
    """A body 4x the cap is given up after about the cap (the server's write is cut short), not read whole."""
    client = HttpClient(max_per_host=2, guard=loopback_guard())
    for path in ("/huge.jpg", "/huge-chunked.jpg"):
        got = client.fetch(server.url(path), timeout=2.0, max_bytes=MAX_BYTES, disallowed_directives=[])
        assert (got.data, got.reason) == (None, "too_large"), path
    # Declared above the cap: refused from the header, before any body byte.
    assert "Content-Length" in client.fetch(server.url("/huge.jpg"), 2.0, MAX_BYTES, []).detail
    # A cap above the body: the whole padded body arrives intact.
    big = client.fetch(server.url("/huge.jpg"), 5.0, 4 * MAX_BYTES, [])
    assert big.reason is None and len(big.data) == 4 * MAX_BYTES and big.data.startswith(jpeg(6, 64, 48))


def test_trickle_ends_at_the_deadline(server):
    client = HttpClient(max_per_host=2, guard=loopback_guard())
    started = time.monotonic()
    got = client.fetch(server.url("/trickle.jpg"), timeout=0.7, max_bytes=MAX_BYTES, disallowed_directives=[])
    elapsed = time.monotonic() - started
    assert got.reason == "timeout" and 0.6 < elapsed < 1.2, (got, elapsed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retry_after_is_honoured(server, tmp_path, backend):
    """429 twice with Retry-After: 1, then the image: two retries succeed; the http backend waits >= 2 x 1 s."""
    url = server.url(f"/retry-after/2/1/{backend == 'http'}{time.monotonic_ns()}.jpg".replace("True", "1")
                     .replace("False", "2"))
    started = time.monotonic()
    [d] = download_chunk(["k"], [url], loopback_options(timeout=2.0, retries=2, backend=backend), tmp_path / "w")
    elapsed = time.monotonic() - started
    assert d.reason is None and d.data[:2] == b"\xff\xd8"
    if backend == "http":
        assert 2.0 <= elapsed < 4.0
    # Without retries the first answer is the row's failure.
    [d] = download_chunk(["k"], [server.url(f"/retry-after/1/0/{time.monotonic_ns() % 10**6}.jpg")],
                         loopback_options(timeout=2.0, backend=backend), tmp_path / "w")
    assert d.reason == "http_429"


def test_max_retry_after_bounds_the_pause(server, tmp_path):
    url = server.url(f"/retry-after/1/3600/{time.monotonic_ns() % 10**6}.jpg")
    started = time.monotonic()
    [d] = download_chunk(["k"], [url], loopback_options(timeout=2.0, retries=1, max_retry_after=0.3), tmp_path / "w")
    assert d.reason is None and time.monotonic() - started < 1.5


def test_no_host_sees_more_than_max_per_host_connections(tmp_path):
    """Four hosts (ports), 32 threads, max_per_host 3: each server counts at most 3 connections open at once,
    reuses them (keep-alive), and every image arrives; a slow host (connect delay) does not hold the others."""
    servers = [LoopbackServer(image_size=(16, 16), connect_delay_s=0.05 if i == 0 else 0.0).start()
               for i in range(4)]
    try:
        urls = [servers[i % 4].url(f"/img/{i}.jpg") for i in range(200)]
        keys = [str(i) for i in range(200)]
        got = list(download_chunk(keys, urls, loopback_options(timeout=5.0, thread_count=32, max_per_host=3),
                                  tmp_path / "w"))
        assert [d.data for d in got] == [jpeg(i, 16, 16) for i in range(200)]
        for srv in servers:
            assert 1 <= srv.peak_connections <= 3, srv.peak_connections
            assert srv.connections <= 3  # kept alive: no connection per image
    finally:
        for srv in servers:
            srv.stop()


def test_a_slow_host_does_not_stall_the_others(tmp_path):
    """6 URLs that stall past the deadline on one host, 100 quick ones on another, 8 threads, max_per_host 2: the
    slow host holds 2 threads at a time (3 waves of 0.5 s), the quick host's images all arrive during the first."""
    slow = LoopbackServer(sleep_s=3.0).start()
    fast = LoopbackServer(image_size=(16, 16)).start()
    try:
        urls = [slow.url("/sleep.jpg?" + str(i)) for i in range(6)] + [fast.url(f"/img/{i}.jpg") for i in range(100)]
        done: list[float] = []
        started = time.monotonic()
        got = list(download_chunk([str(i) for i in range(106)], urls,
                                  loopback_options(timeout=0.5, thread_count=8, max_per_host=2), tmp_path / "w",
                                  lambda data: done.append(time.monotonic() - started) or data))
        elapsed = time.monotonic() - started
        assert [d.reason for d in got] == ["timeout"] * 6 + [None] * 100
        # 1.5 s: never more than 2 stalls at once (the server cannot tell: it sleeps on after the client gave up).
        assert len(done) == 100 and elapsed >= 1.5 and max(done) < 1.0, (elapsed, max(done))
    finally:
        slow.stop()
        fast.stop()


def test_both_backends_send_the_same_user_agent(tmp_path):
    from pmd.http_client import user_agent

    agents = []
    for backend in BACKENDS:
        srv = LoopbackServer(image_size=(16, 16)).start()
        try:
            [d] = download_chunk(["k"], [srv.url("/img/1.jpg")], loopback_options(backend=backend), tmp_path / "w")
            assert d.reason is None
            agents.append(srv.user_agents)
        finally:
            srv.stop()
    assert agents[0] == agents[1] == {user_agent("pmd")} and "compatible; pmd;" in user_agent("pmd")


def test_img2dataset_backend_opens_a_connection_per_image(server, tmp_path):
    """The reference behaviour the benchmark measures against: no keep-alive with img2dataset."""
    srv = LoopbackServer(image_size=(16, 16)).start()
    try:
        got = list(download_chunk([str(i) for i in range(20)], [srv.url(f"/img/{i}.jpg") for i in range(20)],
                                  loopback_options(backend="img2dataset", thread_count=4), tmp_path / "w"))
        assert all(d.reason is None for d in got) and srv.connections == 20
    finally:
        srv.stop()


def test_dns_cache_resolves_once_and_caches_failures(monkeypatch):
    calls = []

    import socket

    def fake(host, port, *args):
        calls.append(host)
        if host == "bad.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(2, 1, 6, "", ("10.0.0.1", port)), (2, 1, 6, "", ("10.0.0.2", port)), (2, 1, 6, "", ("10.0.0.1", port))]

    monkeypatch.setattr("socket.getaddrinfo", fake)  # nothing connects here: only the cache is exercised
    cache = Resolver(timeout=2.0)
    assert cache.resolve("a.example") == ["10.0.0.1", "10.0.0.2"] == cache.resolve("A.example.")
    for _ in range(2):
        with pytest.raises(OSError):
            cache.resolve("bad.invalid")
    assert calls == ["a.example", "bad.invalid"] and cache.lookups == 2


def test_refused_and_bad_urls(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    got = list(download_chunk(["a", "b"], [f"http://127.0.0.1:{port}/x.jpg", "ftp://example.com/x.jpg"],
                              loopback_options(timeout=2.0), tmp_path / "w"))
    assert [d.reason for d in got] == ["connection_error", "download_error"]


@pytest.mark.parametrize("values, token, disallowed", [
    (["noai"], "pmd", True), (["pmd: noimageai"], "pmd", True), (["otherbot: noai"], "pmd", False),
    (["noarchive, nofollow"], "pmd", False), (["NoIndex"], "pmd", True), ([], "pmd", False),
])
def test_is_disallowed_matches_img2dataset(values, token, disallowed):
    from email.message import Message

    from img2dataset.downloader import is_disallowed as reference
    headers = Message()
    for v in values:
        headers["X-Robots-Tag"] = v
    directives = ["noai", "noimageai", "noindex", "noimageindex"]
    assert is_disallowed(values, token, directives) == reference(headers, token, directives) == disallowed


def test_parse_retry_after():
    assert parse_retry_after("7") == 7.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0


def test_options_validate():
    with pytest.raises(ValueError, match="backend"):
        DownloadOptions(backend="curl")
    with pytest.raises(ValueError, match="max_per_host"):
        DownloadOptions(max_per_host=0)


def test_worker_bug_fails_the_chunk(server, tmp_path):
    def boom(data):
        raise RuntimeError("transform bug")
    with pytest.raises(RuntimeError, match="transform bug"):
        list(download_chunk(["k"], [server.url("/img/1.jpg")], loopback_options(), tmp_path / "w", boom))
    assert threading.active_count() < 200


def test_host_backoff_doubles_without_retry_after_and_is_capped():
    from pmd.download_http import HostGate
    from pmd.http_client import Fetched

    gate = HostGate(max_per_host=4)
    pauses = []
    for status, retry_after in [(503, None), (503, None), (429, None), (429, 100.0), (200, None)]:
        gate.state("h").active += 1
        gate.state("h").paused_until = 0.0  # the previous pause is over: this answer is a new round
        before = time.monotonic()
        gate.release("h", Fetched(None if status != 200 else b"x", None, None, status, retry_after), 5.0)
        state = gate.hosts.get("h")
        pauses.append(round(state.paused_until - before) if state else None)
    # 1, 2, 4 s while the host keeps refusing, Retry-After 100 capped at 5; a success resets the strikes.
    assert pauses == [1, 2, 4, 5, None] and "h" not in gate.hosts  # idle, no pause, no strike: forgotten
    # Answers of one burst (while the pause runs) are one strike.
    gate = HostGate(max_per_host=4)
    for _ in range(3):
        gate.state("h").active += 1
        gate.release("h", Fetched(None, "http_503", None, 503, None), 5.0)
    assert gate.hosts["h"].strikes == 1


def test_connections_use_the_dns_cache(server):
    port = server.server_address[1]
    resolver = Resolver()
    client = HttpClient(max_per_host=1, guard=loopback_guard(), resolver=resolver)
    for _ in range(3):
        # A server-closed connection each time (huge-chunked closes): every fetch opens a new one.
        assert client.fetch(f"http://localhost:{port}/huge-chunked.jpg", 2.0, MAX_BYTES, []).reason == "too_large"
    assert server.connections >= 3 and resolver.lookups == 1 and "localhost" in resolver._entries


def test_a_keep_alive_connection_closed_under_us_is_retried_once(server, monkeypatch):
    from http.client import RemoteDisconnected

    from urllib3.exceptions import MaxRetryError, ProtocolError

    client = HttpClient(max_per_host=2, guard=loopback_guard())
    real = client._manager.urlopen
    failures = []

    def flaky(*args, **kwargs):
        if failures:
            failures.pop()
            raise MaxRetryError(None, args[1], ProtocolError("Connection aborted.", RemoteDisconnected("closed")))
        return real(*args, **kwargs)

    monkeypatch.setattr(client._manager, "urlopen", flaky)
    failures[:] = [1]
    assert client.fetch(server.url("/img/3.jpg"), 2.0, MAX_BYTES, []).data == jpeg(3, 64, 48)
    failures[:] = [1, 1]  # twice in a row: the server really is dropping us
    assert client.fetch(server.url("/img/3.jpg"), 2.0, MAX_BYTES, []).reason == "connection_error"


def test_a_host_refusing_everything_is_given_up_in_the_chunk(tmp_path):
    """60 URLs on a host answering 503 to all, 2 at a time, pauses capped at 0.1 s: after GIVE_UP_STRIKES refused
    rounds the rest fail at once with http_503 (transient, for --retry-failures), not one round per pause."""
    from pmd.download_http import GIVE_UP_STRIKES

    srv = LoopbackServer().start()
    try:
        got = list(download_chunk([str(i) for i in range(60)], [srv.url(f"/status/503?{i}") for i in range(60)],
                                  loopback_options(timeout=2.0, thread_count=8, max_per_host=2, max_retry_after=0.1),
                                  tmp_path / "w"))
        assert [d.reason for d in got] == ["http_503"] * 60
        asked = sum("not asked again" not in d.detail for d in got)
        assert GIVE_UP_STRIKES <= asked <= 2 * GIVE_UP_STRIKES  # one or two requests per round
        assert srv.connections <= 2
    finally:
        srv.stop()



def test_timeout_detail_is_the_same_in_every_run(server):
    """urllib3 names the read timeout it was given (the time left before the deadline, a new float each run); the
    failure's detail must not, or the failures file differs between identical builds."""
    client = HttpClient("pmd", 4, guard=loopback_guard())
    details = set()
    for _ in range(2):
        got = client.fetch(server.url("/sleep.jpg"), 0.3, MAX_BYTES, [])
        assert got.reason == "timeout"
        details.add(got.detail)
    assert len(details) == 1, details
    assert "timeout=" not in details.pop()


def test_a_refusal_after_a_redirect_backs_off_the_target_not_the_first_host():
    from pmd.download_http import HostGate, host_key
    from pmd.http_client import Fetched

    a, b = "http://a.example:80", "http://b.example:80"
    gate = HostGate(max_per_host=4)
    gate.state(a).active += 1
    gate.state(a).strikes = 2  # earlier refusals of a's own
    before = time.monotonic()
    gate.release(a, Fetched(None, "http_429", "HTTP Error 429", 429, 3.0, answered_by="http://b.example/img/1.jpg"),
                 5.0)
    assert host_key("http://b.example/img/1.jpg") == b
    assert a not in gate.hosts  # its slot back; it answered a redirect: no pause, no strike
    assert gate.hosts[b].strikes == 1 and gate.hosts[b].active == 0
    assert round(gate.hosts[b].paused_until - before) == 3
    # The URL's own host refusing is still its own backoff.
    gate.state(a).active += 1
    gate.release(a, Fetched(None, "http_503", None, 503, None), 5.0)
    assert gate.hosts[a].strikes == 1 and gate.hosts[a].paused_until > time.monotonic()


class _OneWriteServer:
    """HTTP/1.1 keep-alive on loopback: /bytes/N answers N deterministic bytes, status line, headers and body in
    one send (so a client that reads through a large enough buffer gets the whole response in one recv)."""

    def __init__(self):
        import socket

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @staticmethod
    def body(n: int) -> bytes:
        return bytes((i * 7 + n) % 251 for i in range(n))

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn):
        with conn, conn.makefile("rb") as f:
            while (line := f.readline()) and line.strip():
                n = int(line.split()[1].rsplit(b"/", 1)[1])
                while f.readline().strip():  # the request's headers
                    pass
                body = self.body(n)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))

    def close(self):
        self.listener.close()


def test_responses_read_through_a_large_buffer_keep_their_framing(monkeypatch):
    """Bodies on both sides of the response buffer's size (8 KiB io default, 64 KiB ours) over one kept-alive
    connection each come back exact. The status line is read through the large buffer: the first recv asks for 64
    KiB, so a small image's response can come whole in one recv, not two (each recv a GIL release that every
    download thread contends for; how much one recv gets depends on the kernel's timing, what it asks for does not)."""
    import socket

    from pmd.http_client import _READ_SIZE

    srv = _OneWriteServer()
    try:
        client = HttpClient(max_per_host=1, guard=loopback_guard())
        sizes = [1, 8191, 8192, 8193, _READ_SIZE - 1, _READ_SIZE, _READ_SIZE + 1, 200_000, 5, 40_000]
        for n in sizes + sizes[::-1]:
            got = client.fetch(f"http://127.0.0.1:{srv.port}/bytes/{n}", 5.0, MAX_BYTES, [])
            assert got.reason is None and got.data == srv.body(n), n
        assert srv.connections == 1
        calls = []
        real = socket.socket.recv_into

        def counted(self, *args, **kwargs):
            n = real(self, *args, **kwargs)
            calls.append((len(args[0]) if args else None, n))
            return n

        monkeypatch.setattr(socket.socket, "recv_into", counted)
        assert client.fetch(f"http://127.0.0.1:{srv.port}/bytes/40000", 5.0, MAX_BYTES, []).data == srv.body(40000)
        assert calls and calls[0][0] == _READ_SIZE and len(calls) <= 2, calls
    finally:
        srv.close()
