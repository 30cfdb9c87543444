"""The configured image byte cap reaches the build's archive reads (not only the library default)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.pipelines.build_fixtures import make_coco

PMD = str(Path(sys.executable).with_name("pmd"))


def test_max_image_bytes_applies_to_archive_members(tmp_path):
    coco = make_coco(tmp_path / "in", n_images=8)  # image 3 missing, image 5 not a JPEG (24 bytes)
    out = tmp_path / "out"
    r = subprocess.run([PMD, "build", "coco", str(coco.karpathy), *sum((["--images", str(z)] for z in coco.zips), []),
                        "--out", str(out), "--executor", "local", "--max-image-bytes", "200", "-q", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    coco_acc = json.loads((out / "manifest.json").read_text())["accounting"]["coco"]
    # Every real JPEG of the fixture (16x16 and 80x60) is over 200 bytes: 6 images x 5 captions.
    assert coco_acc["failures_by_reason"] == {"too_large": 30, "missing_member": 5, "decode_error": 5}
    assert coco_acc["pairs"] == 0
