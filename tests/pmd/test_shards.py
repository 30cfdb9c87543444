"""Shard placement hash, atomic writing, and verify's diagnostics on a hand-made build."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pmd import card, schema, spill
from pmd.atomic import write_json
from pmd.manifest import Manifest
from pmd.shards import describe_file, file_sha256, shard_name, shuffle_hash, verify, write_shard_file


def _rows(keys: list[str], source: str = "coco") -> pa.Table:
    n = len(keys)
    return pa.table({
        schema.KEY: keys, schema.SOURCE: [source] * n, schema.TEXT: ["t"] * n, schema.IMAGE_URL: [None] * n,
        schema.IMAGE_REF: ["r"] * n, schema.SPLIT: ["train"] * n, schema.META: ["{}"] * n, schema.LANG: [None] * n,
        schema.LANG_SCORE: [None] * n, schema.IMAGE: [b"\xff\xd8x"] * n, schema.IMAGE_SHA256: ["s"] * n,
        schema.WIDTH: [1] * n, schema.HEIGHT: [1] * n, schema.ORIGINAL_WIDTH: [1] * n,
        schema.ORIGINAL_HEIGHT: [1] * n,
    }, schema=schema.SHARD_SCHEMA)


def test_shuffle_hash_is_stable():
    # Fixed values: the placement of every shard row depends on them; changing the function changes every build.
    assert shuffle_hash(0, "coco/1") == 12267673572178782781
    assert shuffle_hash(1, "coco/1") == 11461378730438240191
    assert shuffle_hash(0, "a") == 13682308312085749477
    assert shuffle_hash(7, "yfcc100m/5000000") == 5570883472462237189


def _build(tmp_path, tables):
    shards = []
    for i, t in enumerate(tables):
        write_shard_file(t, tmp_path / shard_name(i), row_group_rows=2)
        shards.append(describe_file(tmp_path, shard_name(i)).to_dict())
    pairs = sum(t.num_rows for t in tables)
    manifest = {"format": "pmd-build", "shards": shards, "failures": [],
                "accounting": {"coco": {"input_rows": pairs + 1, "pairs": pairs, "rejects": 1, "failures": 0}}}
    _write(tmp_path, manifest)
    return manifest


def _write(out, manifest: dict) -> None:
    """The manifest, and the card and croissant.json that agree with it (pmd.card), as a build writes them."""
    card.write_docs(Manifest(out, manifest))
    write_json(manifest, out / "manifest.json")


def test_atomic_write_small_row_groups_and_verify_ok(tmp_path):
    _build(tmp_path, [_rows(["coco/1", "coco/2", "coco/3"]), _rows(["coco/4"])])
    pf = pq.ParquetFile(tmp_path / shard_name(0))
    assert pf.metadata.num_row_groups == 2 and pf.schema_arrow.names == list(schema.SHARD_COLUMNS)
    assert not list(tmp_path.rglob(".*tmp*"))
    assert verify(tmp_path) == []


def test_verify_reports_duplicates_counts_and_schema(tmp_path):
    manifest = _build(tmp_path, [_rows(["coco/1", "coco/2"]), _rows(["coco/2"])])
    problems = verify(tmp_path)
    assert any("keys also in an earlier shard" in p and "coco/2" in p for p in problems)

    manifest["shards"][1]["rows"] = 5
    manifest["accounting"]["coco"]["failures"] = 3
    write_json(manifest, tmp_path / "manifest.json")
    problems = "\n".join(verify(tmp_path))
    assert "1 rows, manifest says 5" in problems and "input_rows" in problems

    pq.write_table(_rows(["coco/9"]).drop_columns([schema.IMAGE]), tmp_path / shard_name(1))
    manifest["shards"][1] = describe_file(tmp_path, shard_name(1)).to_dict()
    write_json(manifest, tmp_path / "manifest.json")
    assert any("schema mismatch" in p for p in verify(tmp_path))


def test_verify_without_manifest(tmp_path):
    assert "missing" in verify(tmp_path)[0]
    (tmp_path / "manifest.json").write_text("{")
    assert "not valid JSON" in verify(tmp_path)[0]
    assert file_sha256(tmp_path / "manifest.json") == "021fb596db81e6d02bf3d2586ee3981fe519f275c0ac9ca76bbcf2ebb4097d96"


@pytest.mark.parametrize("partition_rows", [1 << 19, 2])
def test_verify_key_checks_over_spilled_partitions(tmp_path, monkeypatch, partition_rows):
    """The key checks run over hash partitions on disk; the sentences and their order are those of the in-memory
    check they replace (pinned from it): per listed file, in listing order, a file listed twice included."""
    monkeypatch.setattr(spill, "PARTITION_ROWS", partition_rows)
    manifest = _build(tmp_path, [_rows(["coco/a", "coco/b", "coco/c", "coco/a"]), _rows(["coco/b", "coco/d"]),
                                 _rows(["coco/c", "coco/b", "coco/e"]),
                                 _rows(["coco/e", "coco/a", "coco/f", "coco/f", "coco/z"])])
    (tmp_path / shard_name(4)).write_bytes((tmp_path / shard_name(1)).read_bytes())
    manifest["shards"].append(dict(manifest["shards"][1]))
    manifest["shards"].insert(2, {"file": shard_name(9), "rows": 3, "bytes": 10, "sha256": "x", "sources": {}})
    manifest["shards"][3]["bytes"] += 1
    _write(tmp_path, manifest)
    size = (tmp_path / shard_name(2)).stat().st_size
    assert verify(tmp_path, spill_dir=tmp_path / "spill") == [
        "shards/shard-00000.parquet: keys repeated within the shard",
        "shards/shard-00001.parquet: 1 keys also in an earlier shard, e.g. 'coco/b'",
        "shards/shard-00009.parquet: shard file missing",
        f"shards/shard-00002.parquet: {size} bytes, manifest says {size + 1}",
        "shards/shard-00002.parquet: 2 keys also in an earlier shard, e.g. 'coco/b'",
        "shards/shard-00003.parquet: keys repeated within the shard",
        "shards/shard-00003.parquet: 2 keys also in an earlier shard, e.g. 'coco/a'",
        "shards/shard-00001.parquet: 2 keys also in an earlier shard, e.g. 'coco/b'",
        "shards/shard-00004.parquet: not listed in the manifest",
        "accounting coco: shards hold 16 pairs, the manifest says 14",
    ]
    assert not list((tmp_path / "spill").iterdir())
