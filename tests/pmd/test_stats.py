import json
import struct

import pyarrow.parquet as pq
import pytest

from pmd import stats
from pmd.cli import main
from tests.pmd.build_fixture import known_build, shard_row, write_build


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
    assert "coco: input rows 7 != pairs 2 + rejects 1 + failures 1" in text
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
