"""The demo end to end at CI size: a break anywhere in the chain (sources, build, verify, stats, trainer, eval)
turns this red."""

import json

import pytest

from pmd_demo.demo import DemoConfig
from pmd.cli import main


@pytest.mark.slow
def test_quick_demo_runs_the_whole_chain(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    # 60 images per source: COCO 5 captions each; YFCC's own filters reject 18 of 60 (generator's mix);
    # 1 in 15 URL images is broken on purpose (4 per URL source).
    sources = summary["sources"]
    assert sources["coco"]["pairs"] == 300
    for name in ("conceptual_captions", "red_caps"):
        assert sources[name]["accounting"]["failures"] == 4 and sources[name]["pairs"] == 56
    yfcc = sources["yfcc100m"]["accounting"]
    assert yfcc["rejects"] == 18 and yfcc["input_rows"] == 60
    for s in sources.values():
        acc = s["accounting"]
        assert acc["identity_holds"] and acc["input_rows"] == acc["pairs"] + acc["rejects"] + acc["failures"]
    assert summary["train"]["steps"] == 20
    assert summary["retrieval"]["n_texts"] == summary["heldout_pairs"] == 6
    assert summary["retrieval"]["n_images"] == 6  # one caption per held-out image
    assert summary["retrieval"]["chance_t2i_r1"] == pytest.approx(1 / 6)
    for path in ("report/report.html", "report/composition.png", "build/manifest.json", "run/metrics.jsonl"):
        assert (tmp_path / "demo" / path).exists(), path
    assert "zero-shot retrieval" in out and "where everything is" in out


def test_demo_config_validation(tmp_path):
    with pytest.raises(ValueError, match="at least 20 images"):
        DemoConfig(out=tmp_path, images=5)
    with pytest.raises(ValueError, match="positive"):
        DemoConfig(out=tmp_path, train_steps=0)
    assert DemoConfig.quick(tmp_path).images == 60
