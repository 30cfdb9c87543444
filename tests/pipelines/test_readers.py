"""Every reader docs/build-format.md names reads a built corpus, each in a fresh process importing only itself.

The import order of a fresh process matters: Ray Data's `read_parquet` of several files once failed unless
`pyarrow.parquet` had been imported first (fsspec's HTTP filesystem needs aiohttp). So each reader runs alone in
a new interpreter, and every reader must give the same rows, keys and image bytes as the manifest promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pmd import schema
from tests.pipelines.build_fixtures import make_coco

pytestmark = pytest.mark.slow

PMD = str(Path(sys.executable).with_name("pmd"))
REPO = Path(__file__).resolve().parents[2]

# Each script gets the shard files as argv[1:] and prints {key: sha256(image bytes)} as JSON on its last line.
READERS = {
    "pyarrow": """
import hashlib, json, sys
import pyarrow.parquet as pq
out = {}
for f in sys.argv[1:]:
    t = pq.read_table(f, columns=["key", "image"])
    for k, img in zip(t.column("key").to_pylist(), t.column("image").to_pylist()):
        out[k] = hashlib.sha256(img).hexdigest()
print(json.dumps(out))
""",
    "polars": """
import hashlib, json, sys
import polars as pl
df = pl.read_parquet(sys.argv[1:], columns=["key", "image"])
print(json.dumps({k: hashlib.sha256(img).hexdigest() for k, img in zip(df["key"], df["image"])}))
""",
    "ray_data": """
import hashlib, json, sys, tempfile
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
         _temp_dir=tempfile.mkdtemp(prefix="pmdray"))
ds = ray.data.read_parquet(sys.argv[1:], columns=["key", "image"])
out = {r["key"]: hashlib.sha256(r["image"]).hexdigest() for r in ds.iter_rows()}
ray.shutdown()
print(json.dumps(out))
""",
    "webdataset": """
import hashlib, json, sys
import webdataset as wds
out = {}
for sample in wds.WebDataset(sys.argv[1:], shardshuffle=False):
    out[json.loads(sample["json"])["key"]] = hashlib.sha256(sample["jpg"]).hexdigest()
print(json.dumps(out))
""",
    "datasets": """
import hashlib, json, sys
from datasets import load_dataset
ds = load_dataset("parquet", data_files=sys.argv[1:], split="train")
print(json.dumps({r["key"]: hashlib.sha256(r["image"]).hexdigest() for r in ds}))
""",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """A real `pmd build` (archive source, in-process executor) cut into several small shards."""
    root = tmp_path_factory.mktemp("readers")
    coco = make_coco(root / "in", n_images=12)
    out = root / "out"
    cmd = [PMD, "build", "coco", str(coco.karpathy), *sum((["--images", str(z)] for z in coco.zips), []),
           "--out", str(out), "--executor", "local", "--shard-rows", "16", "--row-group-rows", "4",
           "--image-size", "32", "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    files = [str(out / s["file"]) for s in manifest["shards"]]
    assert len(files) >= 3
    wds = root / "wds"
    r = subprocess.run([PMD, "export", str(out), "--format", "webdataset", "--out", str(wds), "--shard-size", "10",
                        "-q"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, files


@pytest.fixture(scope="module")
def expected(corpus) -> dict[str, str]:
    """Keys and image digests as the build recorded them (the `image_sha256` column, counts from the manifest)."""
    out, files = corpus
    rows = {}
    for f in files:
        t = pq.read_table(f, columns=[schema.KEY, schema.IMAGE_SHA256])
        rows.update(zip(t.column(schema.KEY).to_pylist(), t.column(schema.IMAGE_SHA256).to_pylist()))
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(rows) == sum(s["rows"] for s in manifest["shards"]) == manifest["totals"]["pairs"] > 0
    return rows


@pytest.mark.parametrize("reader", sorted(READERS))
def test_reader_in_a_fresh_process(reader, corpus, expected, tmp_path):
    out, files = corpus
    if reader == "webdataset":  # reads `pmd export --format webdataset` of the same corpus
        files = sorted(str(p) for p in (out.parent / "wds").glob("*.tar"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run([sys.executable, "-c", READERS[reader], *files], capture_output=True, text=True,
                       timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, f"{reader} failed to read the shards:\n{r.stderr[-3000:]}"
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == expected  # same keys, and each image's bytes hash to the digest the build stored


def test_docs_name_only_tested_readers():
    """docs/build-format.md's list of readers is exactly the readers tested above."""
    text = (REPO / "docs" / "build-format.md").read_text()
    start = text.index("The files read with")
    line = text[start:text.index("test_readers.py", start)]
    named = {"pyarrow": "pyarrow", "polars": "polars", "Ray Data": "ray_data", "`datasets`": "datasets",
             "WebDataset": "webdataset"}
    assert {v for k, v in named.items() if k in line} == set(READERS)
