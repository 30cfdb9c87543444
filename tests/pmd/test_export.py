"""`pmd export --format webdataset`: tars that the webdataset library reads back to the corpus, resumable."""

from __future__ import annotations

import hashlib
import json
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pmd import schema
from pmd_cli.pmd import main as pmd_main
from pmd.export import ExportError, ExportOptions, export
from tests.pmd.build_fixture import known_build


def corpus_rows(build) -> list[dict]:
    manifest = json.loads((build / "manifest.json").read_text())
    rows = []
    for s in manifest["shards"]:
        rows += pq.read_table(build / s["file"]).to_pylist()
    return rows


@pytest.fixture
def build(tmp_path):
    return known_build(tmp_path / "build")


def test_webdataset_reads_back_every_pair_in_order(build, tmp_path):
    out = tmp_path / "wds"
    assert pmd_main(["export", str(build), "--format", "webdataset", "--out", str(out), "--shard-size", "3",
                     "-q"]) == 0
    listing = json.loads((out / "shards.json").read_text())
    rows = corpus_rows(build)
    assert listing["samples"] == len(rows) == 8
    assert [e["samples"] for e in listing["shards"]] == [3, 3, 2]
    assert listing["urls"] == "pmd-{000000..000002}.tar"
    for e in listing["shards"]:
        assert hashlib.sha256((out / e["file"]).read_bytes()).hexdigest() == e["sha256"]

    samples = list(wds.WebDataset(str(out / listing["urls"]), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(8)]
    for sample, row in zip(samples, rows, strict=True):
        assert sample["jpg"] == row[schema.IMAGE]
        assert sample["txt"].decode() == row[schema.TEXT]
        record = json.loads(sample["json"])
        assert record["key"] == row[schema.KEY] and record["source"] == row[schema.SOURCE]
        assert record["split"] == row[schema.SPLIT] and record["meta"] == json.loads(row[schema.META])
        assert record["image_sha256"] == hashlib.sha256(sample["jpg"]).hexdigest()
        assert (record["width"], record["height"]) == (row[schema.WIDTH], row[schema.HEIGHT])


def test_rerun_after_a_kill_gives_identical_tars(build, tmp_path):
    out = tmp_path / "wds"
    first = export(build, out, ExportOptions(shard_size=3, progress=False))
    digests = {e["file"]: e["sha256"] for e in first["shards"]}
    # A killed export: the last tar half written under its temporary name, the middle one gone.
    (out / "pmd-000001.tar").unlink()
    last = out / "pmd-000002.tar"
    last.unlink()
    partial = out / ".pmd-000002.tar.tmp-999999"  # pmd.atomic's temporary name of a killed writer
    partial.write_bytes(b"partial")
    again = export(build, out, ExportOptions(shard_size=3, progress=False))
    assert {e["file"]: e["sha256"] for e in again["shards"]} == digests
    assert not partial.exists() and sorted(p.name for p in out.iterdir()) == [
        "pmd-000000.tar", "pmd-000001.tar", "pmd-000002.tar", "shards.json"]
    with tarfile.open(out / "pmd-000001.tar") as tar:
        assert [m.name for m in tar.getmembers()] == [f"{i:09d}.{ext}" for i in (3, 4, 5)
                                                      for ext in ("jpg", "txt", "json")]


def test_bad_requests_are_clear_errors(build, tmp_path):
    with pytest.raises(ExportError, match="shard size"):
        ExportOptions(shard_size=0)
    with pytest.raises(ExportError, match="format"):
        ExportOptions(format="tfrecord")
    with pytest.raises(FileNotFoundError, match="not a finished pmd build"):
        export(tmp_path / "nothing", tmp_path / "o")
    # A corpus whose manifest promises more rows than its shards hold is refused, not exported short.
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["shards"][0]["rows"] += 1
    (build / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="the manifest lists 9 rows"):
        export(build, tmp_path / "o2", ExportOptions(progress=False))
