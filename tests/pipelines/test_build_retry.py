"""`--retry-failures`: transient download failures downloaded again on a finished build, over loopback with URLs
that fail their first requests (503) and then answer; the result equals a build whose first attempt succeeded."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from pipelines.build import BuildConfig, SourceSpec, run_build
from pmd.http_client import TRANSIENT_REASONS, is_transient
from tests.loopback import loopback_options
from pmd.images import ImageOptions
from pmd.shards import verify
from tests.httpserver import LoopbackServer

pytestmark = pytest.mark.slow

N_GOOD, N_FLAKY, N_STUBBORN = 40, 6, 2


@pytest.fixture(scope="module")
def server():
    srv = LoopbackServer(image_size=(64, 48), sleep_s=2.0).start()
    yield srv
    srv.stop()


def image_bytes_in_work(out: Path) -> int:
    """Image bytes held by work files (a finished build must hold none: the shards are the only copy)."""
    total = 0
    for path in (out / "work").rglob("*.arrow"):
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        if "image" in table.column_names:
            total += sum(len(b) for b in table.column("image").to_pylist() if b)
    return total


def config(tsv: Path, out: Path, retry: bool) -> BuildConfig:
    return BuildConfig(sources=[SourceSpec("conceptual_12m", [tsv])], out=out, shard_rows=4, chunk_rows=8,
                       seed=3, image=ImageOptions(image_size=32),
                       download=loopback_options(timeout=2.0, thread_count=8),
                       executor="local", progress=False, retry_failures=retry)


def read_bytes(out: Path, pattern: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted(out.glob(pattern))]


def test_transient_reasons():
    assert {"timeout", "connection_error", "http_429", "http_503", "http_408"} <= TRANSIENT_REASONS
    assert is_transient("http_599") and is_transient("http_503") and is_transient("timeout")
    for reason in ("http_404", "http_410", "decode_error", "too_small", "opted_out", "duplicate", "missing_member",
                   None):
        assert not is_transient(reason)


def test_retry_failures_downloads_transient_rows_again(server, tmp_path):
    lines = [f"{server.url('/flaky/1/300.jpg')}\tcaption 300"]  # fails once; same image+text as a later good row
    lines += [f"{server.url(f'/img/{200 + i}.jpg')}\tgood {i}" for i in range(N_GOOD)]
    lines += [f"{server.url(f'/flaky/1/{301 + i}.jpg')}\tflaky {i}" for i in range(N_FLAKY - 1)]
    lines += [f"{server.url(f'/flaky/3/{400 + i}.jpg')}\tstubborn {i}" for i in range(N_STUBBORN)]
    lines += [f"{server.url('/status/404')}\tgone", f"{server.url('/img/300.jpg')}\tcaption 300"]
    # A later row (another chunk) naming a stubborn URL: fetched with it, once per round, failing with it.
    lines += [f"{server.url('/flaky/3/400.jpg')}\tstubborn again"]
    stubborn = N_STUBBORN + 1
    tsv = tmp_path / "cc12m.tsv"
    tsv.write_text("\n".join(lines) + "\n")

    out = tmp_path / "out"
    first = run_build(config(tsv, out, retry=False))
    acc = first["accounting"]["conceptual_12m"]
    assert acc["failures_by_reason"] == {"http_404": 1, "http_503": N_FLAKY + stubborn}
    assert acc["pairs"] == N_GOOD + 1
    assert first["sources"]["conceptual_12m"]["downloads"]["attempts"] == 1

    retried = run_build(config(tsv, out, retry=True))
    acc = retried["accounting"]["conceptual_12m"]
    # The flaky rows now succeed; the first of them takes the place of the later row with the same image and text.
    assert acc["failures_by_reason"] == {"duplicate": 1, "http_404": 1, "http_503": stubborn}
    assert acc["pairs"] == N_GOOD + 1 + N_FLAKY - 1
    assert acc["input_rows"] == acc["pairs"] + acc["rejects"] + acc["failures"]
    downloads = retried["sources"]["conceptual_12m"]["downloads"]
    assert downloads["attempts"] == 2 and downloads["retried"] == N_FLAKY + stubborn
    assert (downloads["urls"], downloads["unique_urls"], downloads["saved_by_url_dedup"]) == (len(lines),
                                                                                              len(lines) - 1, 1)
    assert verify(out) == []
    assert image_bytes_in_work(out) == 0
    failures = pl.read_parquet(out / "failures")
    dup = failures.filter(pl.col("reason") == "duplicate")
    assert dup["image_url"].to_list() == [server.url("/img/300.jpg")]
    assert dup["detail"].to_list() == [f"same image and text as {first_key(out, '/flaky/1/300')}"]

    # A fresh build against the same server: the flaky URLs answer at once, the stubborn ones fail a third time.
    reference = tmp_path / "reference"
    run_build(config(tsv, reference, retry=False))
    assert read_bytes(out, "shards/*.parquet") == read_bytes(reference, "shards/*.parquet")
    assert read_bytes(out, "failures/*.parquet") == read_bytes(reference, "failures/*.parquet")

    # A second round: the stubborn URLs answer on their fourth request.
    again = run_build(config(tsv, out, retry=True))
    acc = again["accounting"]["conceptual_12m"]
    assert acc["failures_by_reason"] == {"duplicate": 1, "http_404": 1}
    assert acc["pairs"] == N_GOOD + N_FLAKY + stubborn
    assert again["sources"]["conceptual_12m"]["downloads"]["attempts"] == 3
    assert again["sources"]["conceptual_12m"]["downloads"]["retried"] == N_FLAKY + 2 * stubborn
    assert verify(out) == [] and image_bytes_in_work(out) == 0


def test_retry_after_a_run_stopped_between_dedup_and_the_first_write(server, tmp_path, monkeypatch):
    """Every bucket decided, none written, then `--retry-failures`: the rows that now succeed join decided buckets,
    whose decisions must be made again (they were not: the accounting did not add up, 46 rows against 40 pairs)."""
    from pmd import final

    lines = [f"{server.url(f'/img/{800 + i}.jpg')}\tgood {i}" for i in range(N_GOOD)]
    lines += [f"{server.url(f'/flaky/1/{900 + i}.jpg')}\tflaky {i}" for i in range(N_FLAKY)]
    tsv = tmp_path / "cc12m.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("stopped before the first write")

    monkeypatch.setattr(final, "write_bucket", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_build(config(tsv, out, retry=False))
    monkeypatch.undo()
    decided = sorted((out / "work" / "final" / "dedup").glob("bucket-*[0-9].json"))
    assert decided and not list((out / "work" / "final").glob("written/*.json"))

    retried = run_build(config(tsv, out, retry=True))
    acc = retried["accounting"]["conceptual_12m"]
    assert acc["pairs"] == N_GOOD + N_FLAKY and acc["failures"] == 0
    assert verify(out) == [] and image_bytes_in_work(out) == 0
    reference = tmp_path / "reference"  # the flaky URLs answer at once now
    run_build(config(tsv, reference, retry=False))
    assert read_bytes(out, "shards/*.parquet") == read_bytes(reference, "shards/*.parquet")
    assert read_bytes(out, "failures/*.parquet") == read_bytes(reference, "failures/*.parquet")


def first_key(out: Path, url_part: str) -> str:
    shards = pl.read_parquet(out / "shards")
    return shards.filter(pl.col("image_url").str.contains(url_part, literal=True))["key"].to_list()[0]


def test_a_url_named_by_several_rows_and_sources_is_downloaded_once(server, tmp_path):
    """/flaky/0/N.jpg always answers and is counted by the server: each URL must be requested exactly once."""
    counted = [server.url(f"/flaky/0/{600 + i}.jpg?run=dedup") for i in range(3)]
    fillers = [f"{server.url(f'/img/{700 + i}.jpg')}\tfiller {i}" for i in range(6)]
    cc12m = [f"{counted[0]}\tfirst", *fillers[:3], f"{counted[1]}\tsecond", *fillers[3:], f"{counted[0]}\tagain"]
    cc3m = [f"third\t{counted[0]}", f"fourth\t{counted[2]}", f"fifth\t{counted[1]}"]
    (tmp_path / "cc12m.tsv").write_text("\n".join(cc12m) + "\n")
    (tmp_path / "cc3m.tsv").write_text("\n".join(cc3m) + "\n")
    cfg = config(tmp_path / "cc12m.tsv", tmp_path / "out", retry=False)
    cfg.sources = [SourceSpec("conceptual_12m", [tmp_path / "cc12m.tsv"]),
                   SourceSpec("conceptual_captions", [tmp_path / "cc3m.tsv"])]
    cfg.chunk_rows = 2  # the rows naming one URL lie in different chunks and sources
    manifest = run_build(cfg)
    for url in counted:
        path = url[len(server.base_url):]
        assert server._requests[path] == 1, (path, server._requests[path])
    acc = manifest["accounting"]
    assert acc["conceptual_12m"]["pairs"] == len(cc12m) and acc["conceptual_captions"]["pairs"] == len(cc3m)
    d12, d3 = (manifest["sources"][s]["downloads"] for s in ("conceptual_12m", "conceptual_captions"))
    assert (d12["urls"], d12["unique_urls"], d12["saved_by_url_dedup"]) == (len(cc12m), len(cc12m) - 1, 1)
    assert (d3["urls"], d3["unique_urls"], d3["saved_by_url_dedup"]) == (3, 1, 2)
    shards = pl.read_parquet(tmp_path / "out" / "shards")
    by_text = dict(zip(shards["text"].to_list(), shards["image_sha256"].to_list()))
    assert by_text["first"] == by_text["again"] == by_text["third"] and by_text["second"] == by_text["fifth"]
    assert verify(tmp_path / "out") == []
