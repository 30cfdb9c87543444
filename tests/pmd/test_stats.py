import json
import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pmd import spill, stats
from pmd_cli.pmd import main
from tests.pmd.build_fixture import known_build, shard_row, write_build
from tests.pmd.stats_fixture import crafted_build, crafted_rows


def test_figures_of_a_known_build(tmp_path):
    result = stats.audit(known_build(tmp_path / "b"))
    assert result["trusted"], result["problems"]
    assert result["shards"] == 2
    coco, yfcc, total = result["sources"]["coco"], result["sources"]["yfcc100m"], result["total"]
    assert (coco["pairs"], coco["unique_images"]) == (5, 2)
    assert (yfcc["pairs"], yfcc["unique_images"]) == (3, 3)
    assert (total["pairs"], total["unique_images"]) == (8, 4)
    # coco words: 5, 10, 2, 2, 9 -> mean 5.6, median 5
    assert coco["words"]["mean"] == pytest.approx(5.6) and coco["words"]["median"] == 5.0
    assert coco["words"]["histogram"] == {"0-4": 2, "5-9": 2, "10-14": 1, "15-19": 0, "20-29": 0, "30-49": 0,
                                          "50+": 0}
    assert coco["splits"] == {"train": 4, "validation": 1}
    assert coco["lang"] is None
    assert yfcc["lang"]["counts"] == {"en": 3}
    assert yfcc["lang"]["score"]["mean"] == pytest.approx(0.7, abs=1e-6)
    assert coco["image"]["original_width"]["p50"] == 640.0
    assert yfcc["image"]["original_height"]["p50"] == 375.0
    # shorter sides: coco 480 x5; yfcc 375, 333, 480
    assert coco["image"]["shorter_side_histogram"] == {"0-127": 0, "128-255": 0, "256-511": 5, "512-1023": 0,
                                                       "1024-2047": 0, "2048+": 0}
    assert total["image"]["shorter_side_histogram"]["256-511"] == 8
    # Table 2: coco's paper figure is 0.9M pairs, 12.4 words.
    assert coco["table2"]["paper_pairs"] == 900_000
    assert coco["table2"]["pairs_ratio"] == pytest.approx(5 / 900_000)
    assert coco["table2"]["words_ratio"] == pytest.approx(5.6 / 12.4)
    assert total["table2"]["paper_pairs"] == 70_000_000
    # Accounting and success rates.
    assert yfcc["accounting"] == {"input_rows": 10, "pairs": 3, "rejects": 3, "failures": 4,
                                  "rejects_by_reason": {"not_english": 2, "too_short": 1}, "identity_holds": True}
    assert yfcc["failures_by_reason"] == {"http_404": 2, "timeout": 1, "too_small": 1}
    assert yfcc["success"] == {"attempted": 7, "image_failures": 4, "image_success_rate": pytest.approx(3 / 7),
                               "download_success_rate": pytest.approx(4 / 7)}
    assert coco["success"]["image_success_rate"] == 1.0  # a duplicate is not an image failure
    assert total["accounting"]["input_rows"] == 17 and total["accounting"]["identity_holds"]
    assert result["duplicates"] == {"pairs_dropped": 1, "images_with_several_captions": 2,
                                    "pairs_on_shared_images": 6, "images_across_sources": 1}


def test_stats_reads_no_image_bytes(tmp_path, monkeypatch):
    """The audit must project the metadata columns: scanning `image` would read the whole corpus."""
    root = known_build(tmp_path / "b")
    import polars as pl

    real_scan = pl.scan_parquet
    selected = []

    class Spy:
        def __init__(self, lf):
            self.lf = lf

        def select(self, *cols):
            flat = [c for group in cols for c in (group if isinstance(group, list) else [group])]
            selected.append(flat)
            return self.lf.select(*cols)

    monkeypatch.setattr(stats.pl, "scan_parquet", lambda *a, **k: Spy(real_scan(*a, **k)))
    stats.audit(root)
    assert selected and all("image" not in cols for cols in selected)


def test_broken_builds_are_reported_not_fatal(tmp_path, capsys):
    root = known_build(tmp_path / "b")
    # Corrupt one shard, lie about the other's row count: both named, the audit still runs, exit non-zero.
    (root / "shards" / "shard-00000.parquet").write_bytes(b"PAR1 this is not parquet")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][1]["rows"] = 99
    (root / "manifest.json").write_text(json.dumps(manifest))
    result = stats.audit(root)
    assert not result["trusted"]
    text = "\n".join(result["problems"])
    assert "shard-00000.parquet: unreadable Parquet" in text
    assert "shard-00001.parquet: 4 rows, the manifest says 99" in text
    assert "coco: input_rows 7 != pairs 2 + rejects 1 + failures 1" in text
    assert result["total"]["pairs"] == 4  # the readable shard is still counted
    assert main(["stats", str(root)]) == 1
    assert "unreadable Parquet" in capsys.readouterr().err


def test_missing_shard_and_empty_build(tmp_path, capsys):
    root = known_build(tmp_path / "b")
    (root / "shards" / "shard-00001.parquet").unlink()
    result = stats.audit(root)
    assert any("shard-00001.parquet: listed in the manifest but missing" in p for p in result["problems"])
    empty = tmp_path / "empty"
    empty.mkdir()
    result = stats.audit(empty)
    assert not result["trusted"] and result["total"]["pairs"] == 0
    assert any("no readable shards" in p for p in result["problems"])
    assert main(["stats", str(tmp_path / "nope")]) == 2
    assert "no such build directory" in capsys.readouterr().err


def test_json_and_report(tmp_path, capsys):
    root = known_build(tmp_path / "b")
    assert main(["stats", str(root), "--json", "--report", str(tmp_path / "r")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["total"]["pairs"] == 8 and set(result) >= {"sources", "total", "duplicates", "problems", "trusted"}
    for name in ("caption_lengths", "image_sizes", "success_rate", "composition"):
        png = (tmp_path / "r" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", png[16:24])
        assert width > 300 and height > 200
    html = (tmp_path / "r" / "report.html").read_text()
    assert "data:image/png;base64," in html and "yfcc100m" in html
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| coco | 900,000 | 5 |" in md and "![composition](composition.png)" in md
    assert main(["stats", str(root)]) == 0
    out = capsys.readouterr().out
    assert "Table 2" in out and "coco" in out


def test_compare_two_builds(tmp_path, capsys):
    before = known_build(tmp_path / "before")
    after = tmp_path / "after"
    # The rebuild lost coco/2 and yfcc100m/11 (link rot) and gained yfcc100m/20.
    rows = [r for r in pq.read_table(before / "shards").to_pylist() if r["key"] not in ("coco/2", "yfcc100m/11")]
    rows.append(shard_row("yfcc100m/20", "yfcc100m", "a new photo of the bay", b"E" * 10, lang="en",
                          lang_score=0.8))
    write_build(after, [rows], [], {})
    result = stats.compare(after, before, lost_keys_to=tmp_path / "lost.parquet")
    assert result["total"] == {"before": 8, "after": 7, "gained": 1, "lost": 2}
    assert result["sources"]["coco"]["lost_examples"] == ["coco/2"]
    assert result["sources"]["yfcc100m"]["lost_examples"] == ["yfcc100m/11"]
    assert result["sources"]["yfcc100m"]["gained_examples"] == ["yfcc100m/20"]
    assert pq.read_table(tmp_path / "lost.parquet").to_pylist() == [
        {"key": "coco/2", "source": "coco"}, {"key": "yfcc100m/11", "source": "yfcc100m"}]
    assert main(["stats", str(after), "--compare", str(before), "--json", "--report", str(tmp_path / "r")]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["lost"] == 2
    assert pq.read_table(tmp_path / "r" / "lost_keys.parquet").num_rows == 2


PINNED = Path(__file__).parent / "data" / "stats_pinned.json"


def _after_rows() -> list[list[dict]]:
    rows = crafted_rows(7)
    after = [[r for i, r in enumerate(shard) if i % 9 != 4] for shard in rows]
    after[1] += [dict(r, key=r["key"] + "-new") for r in rows[2][:30]]
    return after


@pytest.mark.parametrize("batch_rows, partition_rows, bitmask_sources",
                         [(stats.BATCH_ROWS, spill.PARTITION_ROWS, 64), (700, 400, 64), (700, 400, 2)])
def test_streaming_audit_equals_the_in_memory_one(tmp_path, monkeypatch, batch_rows, partition_rows,
                                                  bitmask_sources):
    """The figures pinned from the in-memory audit (pmd/stats.py as of b10793e on main, the last before streaming:
    its `audit` and `compare` run on these crafted builds) on a crafted build, value for value.

    Small batches and partitions make every figure merge across several batches and spill files; a bitmask
    too small for the build's sources takes the group-by path for images."""
    monkeypatch.setattr(stats, "BATCH_ROWS", batch_rows)
    monkeypatch.setattr(spill, "PARTITION_ROWS", partition_rows)
    monkeypatch.setattr(stats, "_BITMASK_SOURCES", bitmask_sources)
    pinned = json.loads(PINNED.read_text())
    result = stats.audit(crafted_build(tmp_path / "b"), spill_dir=tmp_path / "spill")
    result["build"] = "BUILD"
    # Licences came after the pinned in-memory audit: checked against the library on the whole table, then left out.
    licences = _licences_in_memory(tmp_path / "b")
    for name, figures in [*result["sources"].items(), (None, result["total"])]:
        assert (figures.pop("licences"), figures.pop("commercial_use")) == licences.get(name, ({}, {})), name
    assert result.pop("placeholders") == []  # came after it too (pmd.placeholders; no placeholder failure here)
    assert json.loads(json.dumps(result)) == pinned["audit"]
    assert list(result["sources"]) == list(pinned["audit"]["sources"])  # same order too
    assert not list((tmp_path / "spill").iterdir())  # spill files are gone

    before = tmp_path / "b"
    after = crafted_build(tmp_path / "after", rows=_after_rows())
    compared = stats.compare(after, before, lost_keys_to=tmp_path / "lost.parquet")
    compared["before"], compared["after"] = "BEFORE", "AFTER"
    expected = dict(pinned["compare"])
    lost_keys = expected.pop("lost_keys")
    assert json.loads(json.dumps(compared)) == expected
    assert pq.read_table(tmp_path / "lost.parquet").to_pylist() == lost_keys


def _licences_in_memory(build) -> dict:
    """Pairs per licence and per commercial use, the whole corpus in one frame (source -> figures; None: total)."""
    import polars as pl

    from pmd.licences import with_licences

    tagged = with_licences(pl.read_parquet(sorted((build / "shards").glob("*.parquet")), columns=["source", "meta"]))
    out = {}
    for name in [*tagged["source"].unique().to_list(), None]:
        part = tagged if name is None else tagged.filter(pl.col("source") == name)
        out[name] = tuple(dict(sorted(part[c].value_counts().iter_rows())) for c in ("licence", "commercial"))
    return out


def test_exact_float32_quantiles_across_buckets(tmp_path, monkeypatch):
    """Scores spread over many buckets, negative and repeated values, nulls: polars on the whole column decides."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.normal(0, 3, 700), np.full(50, 0.25), rng.random(200) * 1e-3]).astype(np.float32)
    rows = [[shard_row(f"yfcc100m/{i}", "yfcc100m", "x y", bytes([i % 256, i // 256]), lang="en",
                       lang_score=None if i % 13 == 0 else float(s)) for i, s in enumerate(scores)]]
    monkeypatch.setattr(stats, "BATCH_ROWS", 100)
    result = stats.audit(write_build(tmp_path / "b", rows, [], {}))
    frame = pl.DataFrame({"s": [r["lang_score"] for r in rows[0]]}, schema={"s": pl.Float32})
    want = frame.select(pl.col("s").mean().alias("mean"), *(pl.col("s").quantile(q, "linear").alias(
        f"p{int(q * 100)}") for q in stats.QUANTILES)).row(0, named=True)
    assert result["sources"]["yfcc100m"]["lang"]["score"] == want


def test_downloads_saved_by_url_dedup(tmp_path, capsys):
    """Reported per source and in total when the manifest has it; a manifest without it reports nothing."""
    root = known_build(tmp_path / "b")
    assert "downloads_saved_by_url_dedup" not in json.dumps(stats.audit(root))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["accounting"]["coco"]["downloads"] = {"attempts": 4, "urls": 7, "unique_urls": 4,
                                                   "saved_by_url_dedup": 3, "retried": 0}
    manifest["accounting"]["yfcc100m"]["downloads"] = {"attempts": 9, "urls": 9, "unique_urls": 9,
                                                       "saved_by_url_dedup": 0, "retried": 2}
    (root / "manifest.json").write_text(json.dumps(manifest))
    result = stats.audit(root)
    assert result["sources"]["coco"]["downloads_saved_by_url_dedup"] == 3
    assert result["sources"]["yfcc100m"]["downloads_saved_by_url_dedup"] == 0
    assert result["total"]["downloads_saved_by_url_dedup"] == 3
    assert main(["stats", str(root), "--report", str(tmp_path / "r")]) == 0
    assert "URL dedup saved 3 downloads (coco 3, yfcc100m 0)" in capsys.readouterr().out
    assert "| coco | 3 |" in (tmp_path / "r" / "report.md").read_text()


def test_exact_score_sums_subnormal_and_infinite():
    """The float32 sum is exact down to subnormals; an infinity decides the mean as in polars."""
    from fractions import Fraction

    import numpy as np
    import polars as pl

    values = np.array([1e-45, 3e-45, 1e-40, 0.5, 1.0, 7.25, 3.4e38], dtype=np.float32)
    assert Fraction(stats._exact_sum(values), 1 << 149) == sum(Fraction(float(v)) for v in values)
    sums = stats._ScoreSums()
    sums.add(np.array([1.0, np.inf, 2.0], dtype=np.float32))
    assert sums.special == float("inf") and sums.nonnull == 3
    frame = pl.DataFrame({"s": [1.0, float("inf"), 2.0]}, schema={"s": pl.Float32})
    assert frame.select(pl.col("s").mean()).item() == float(np.float32(sums.special))
