import json
import re
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from pmd import schema
from pipelines.ingest import IngestConfig, run_ingest
from tests.pmd.sources.test_yfcc import yfcc_line

TEXTS = [
    ("A+long+walk+along+the+beach+at+low+tide", ""),
    ("Mein+Hund+spielt+im+Schnee", "Sunset+over+the+harbour"),  # falls back to the title
    ("Wir+waren+im+Zoo", "Hafen"),  # rejected: not English / too short
    ("", ""),  # rejected: empty
]


def write_yfcc(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            description, title = TEXTS[i % len(TEXTS)]
            marker = "1" if i % 10 == 9 else "0"
            f.write(yfcc_line(1000 + i, title=title, description=description, marker=marker, line_number=i) + "\n")
        f.write("broken\tline\n")


def read_dir(d: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted(d.glob("*.parquet")))


def test_counts_add_up_and_outputs_follow_the_schema(tmp_path):
    src = tmp_path / "yfcc100m_dataset"
    write_yfcc(src, 100)
    summary = run_ingest(IngestConfig("yfcc100m", [src], tmp_path / "out", executor="local", chunk_records=30,
                                      progress=False))
    counts = summary["counts"]
    assert counts["records"] == 101
    # 10 videos and one broken line; of the 90 photos, TEXTS[0] and TEXTS[1] pass.
    photos = [i for i in range(100) if i % 10 != 9]
    passing = sum(1 for i in photos if i % 4 in (0, 1))
    assert counts["pairs"] == passing
    assert counts["rejects"] == 101 - passing
    # TEXTS[2]: the German description fails, then the one-word title: the title's reason is reported.
    assert counts["rejects_by_reason"] == {
        "video": 10, "wrong_field_count": 1,
        "too_short": sum(1 for i in photos if i % 4 == 2),
        "empty_text": sum(1 for i in photos if i % 4 == 3),
    }
    assert sum(counts["rejects_by_reason"].values()) == counts["rejects"]
    assert counts["pairs"] + counts["rejects"] == counts["records"] == counts["rows"]
    source_dir = tmp_path / "out" / "yfcc100m"
    assert summary["parts"] == 4
    assert sorted(p.name for p in (source_dir / "candidates").iterdir()) == [
        f"part-0000{i}.parquet" for i in range(4)]
    for part in (source_dir / "candidates").iterdir():
        assert pq.read_schema(part).equals(schema.CANDIDATE_SCHEMA, check_metadata=True)
    for part in (source_dir / "rejects").iterdir():
        assert pq.read_schema(part).equals(schema.REJECT_SCHEMA, check_metadata=True)
    pairs, rejects = read_dir(source_dir / "candidates"), read_dir(source_dir / "rejects")
    assert pairs.height == counts["pairs"] and rejects.height == counts["rejects"]
    assert pairs["key"].n_unique() == pairs.height
    assert json.loads((source_dir / "ingest.json").read_text())["counts"] == counts
    # Every upstream photo id is accounted for exactly once, as a pair or a reject.
    seen = set(pairs["key"].to_list()) | set(k for k in rejects["key"].to_list() if k)
    assert seen == {f"yfcc100m/{1000 + i}" for i in range(100)}


def test_exact_reasons(tmp_path):
    src = tmp_path / "yfcc100m_dataset"
    write_yfcc(src, 8)  # i=0..7: pass, title, reject, empty, pass, title, reject, empty; then a broken line
    summary = run_ingest(IngestConfig("yfcc100m", [src], tmp_path / "out", executor="local", progress=False))
    assert summary["counts"]["rejects_by_reason"] == {"empty_text": 2, "too_short": 2, "wrong_field_count": 1}
    rejects = read_dir(tmp_path / "out" / "yfcc100m" / "rejects").sort("position")
    assert rejects.select("position", "reason", "key").rows() == [
        (3, "too_short", "yfcc100m/1002"), (4, "empty_text", "yfcc100m/1003"), (7, "too_short", "yfcc100m/1006"),
        (8, "empty_text", "yfcc100m/1007"), (9, "wrong_field_count", None)]
    assert re.fullmatch(r"description: not_english \(de [01]\.\d{3}\); title: too_short", rejects["detail"][0])


def test_ray_path_writes_the_same_parts_as_local(tmp_path, ray_local):
    src = tmp_path / "yfcc100m_dataset"
    write_yfcc(src, 120)
    local = run_ingest(IngestConfig("yfcc100m", [src], tmp_path / "local", executor="local", chunk_records=25,
                                    progress=False))
    ray_ = run_ingest(IngestConfig("yfcc100m", [src], tmp_path / "ray", executor="ray", chunk_records=25,
                                   progress=False))
    assert ray_["executor"] == "ray" and local["executor"] == "local"
    assert ray_["counts"] == local["counts"] and ray_["parts"] == local["parts"] == 5
    for sub in ("candidates", "rejects"):
        a = read_dir(tmp_path / "local" / "yfcc100m" / sub)
        b = read_dir(tmp_path / "ray" / "yfcc100m" / sub)
        assert a.equals(b)


def test_ray_path_ships_the_context_prepare_returned(tmp_path, ray_local):
    """Visual Genome's workers convert with the image data and decontamination ids `prepare` loaded on the driver:
    the same parts as the local path, crops included."""
    from tests.pmd.sources import test_visual_genome as vg

    paths = vg.inputs(tmp_path / "in")
    local = run_ingest(IngestConfig("visual_genome", paths, tmp_path / "local", executor="local", chunk_records=1,
                                    progress=False))
    ray_ = run_ingest(IngestConfig("visual_genome", paths, tmp_path / "ray", executor="ray", chunk_records=1,
                                   progress=False))
    assert ray_["counts"] == local["counts"] and ray_["parts"] == local["parts"] == 3
    assert local["counts"]["rejects_by_reason"] == {"decontaminated": 2}
    for sub in ("candidates", "rejects"):
        assert read_dir(tmp_path / "local" / "visual_genome" / sub).equals(
            read_dir(tmp_path / "ray" / "visual_genome" / sub))
    crops = read_dir(tmp_path / "ray" / "visual_genome" / "candidates")["crop"].to_list()
    assert crops == [{"x": 421, "y": 57, "width": 82, "height": 139}, {"x": 0, "y": 388, "width": 119, "height": 209},
                     {"x": 100, "y": 50, "width": 40, "height": 60}]


def test_rerun_replaces_previous_output(tmp_path):
    src = tmp_path / "yfcc100m_dataset"
    write_yfcc(src, 100)
    cfg = dict(executor="local", progress=False)
    run_ingest(IngestConfig("yfcc100m", [src], tmp_path / "out", chunk_records=10, **cfg))
    write_yfcc(src, 20)
    summary = run_ingest(IngestConfig("yfcc100m", [src], tmp_path / "out", chunk_records=10, **cfg))
    parts = list((tmp_path / "out" / "yfcc100m" / "candidates").glob("*.parquet"))
    assert len(parts) == summary["parts"] == 3
    assert read_dir(tmp_path / "out" / "yfcc100m" / "candidates").height == summary["counts"]["pairs"]


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="executor"):
        IngestConfig("yfcc100m", [tmp_path / "x"], tmp_path, executor="spark")
    with pytest.raises(ValueError, match="no input files"):
        IngestConfig("yfcc100m", [], tmp_path)
