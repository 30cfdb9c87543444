"""img2dataset per chunk against the loopback server: every bad case ends with the right stage and reason."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pmd.download import DownloadOptions, classify_error, download_chunk
from pmd.build import ChunkTask, read_chunk, run_chunk
from pmd import schema
from pmd.images import ImageOptions
from tests.httpserver import BAD_CASES, GOOD_REDIRECTS, LoopbackServer


@pytest.fixture(scope="module")
def server():
    srv = LoopbackServer(image_size=(64, 48), sleep_s=2.0).start()
    yield srv
    srv.stop()


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


def test_download_chunk_reasons(server, tmp_path):
    paths = ["/img/1.jpg", *GOOD_REDIRECTS, "/status/404", "/noai.jpg", "/sleep.jpg"]
    got = {d.key: d for d in download_chunk(paths, [server.url(p) for p in paths],
                                            DownloadOptions(timeout=0.8, thread_count=8), tmp_path / "w")}
    assert list(got) == paths  # input order, one result per key
    assert all(got[p].data and got[p].data[:2] == b"\xff\xd8" for p in ["/img/1.jpg", *GOOD_REDIRECTS])
    assert (got["/status/404"].reason, got["/noai.jpg"].reason, got["/sleep.jpg"].reason) == \
        ("http_404", "opted_out", "timeout")
    assert not (tmp_path / "w").exists()  # scratch removed


def test_robots_directives_can_be_ignored(server, tmp_path):
    [d] = download_chunk(["k"], [server.url("/noai.jpg")], DownloadOptions(disallowed_header_directives=[]),
                         tmp_path / "w")
    assert d.reason is None and d.data


def test_url_chunk_every_bad_case(server, tmp_path):
    paths = ["/img/1.jpg", *GOOD_REDIRECTS, *BAD_CASES]
    n = len(paths)
    table = pa.table({
        schema.KEY: [f"t/{i}" for i in range(n)], schema.SOURCE: ["t"] * n, schema.TEXT: [f"c{i}" for i in range(n)],
        schema.IMAGE_URL: [server.url(p) for p in paths], schema.IMAGE_REF: [None] * n, schema.SPLIT: ["train"] * n,
        schema.META: ["{}"] * n, schema.LANG: [None] * n, schema.LANG_SCORE: [None] * n,
    }, schema=schema.PAIR_SCHEMA)
    path = tmp_path / "images" / "t" / "chunk-00000.arrow"
    summary = run_chunk(ChunkTask("t", 0, table, path, ImageOptions(image_size=32), seed=0, mode="url",
                                  download=DownloadOptions(timeout=0.8)))
    assert summary["rows"] == n and summary["ok"] == 3
    result = read_chunk(path).to_pylist()
    by_path = dict(zip(paths, result))
    for p, (stage, reason) in BAD_CASES.items():
        assert (by_path[p]["stage"], by_path[p]["reason"]) == (stage, reason), p
        assert by_path[p]["image"] is None
    for p in ["/img/1.jpg", *GOOD_REDIRECTS]:
        row = by_path[p]
        assert row["reason"] is None and row["image_sha256"] and (row["width"], row["height"]) == (43, 32)
        assert (row["original_width"], row["original_height"]) == (64, 48)
    assert not list(path.parent.glob(".*tmp*"))
