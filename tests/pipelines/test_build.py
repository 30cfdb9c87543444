"""End-to-end `pmd build`: a URL source over loopback + an archive source, on Ray (2 CPUs), with accounting,
`pmd verify`, determinism across executors, and kill -9 + resume against an uninterrupted build."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.build import BuildConfig, BuildError, load_config, run_build
from pmd import schema
from pmd.build import read_chunk, write_ipc_atomic
from pmd_cli.pmd import main as pmd_main
from pmd.final import dedup
from pmd.shards import verify
from tests.httpserver import LoopbackServer
from tests.pipelines.build_fixtures import kill_build_mid_image_stage, make_cc12m, make_coco, two_source_config
from tests.pipelines.test_build_retry import image_bytes_in_work

pytestmark = pytest.mark.slow

PMD = str(Path(sys.executable).with_name("pmd"))
CONFIG = two_source_config(shard_rows=64, chunk_rows=24, seed=7, image_size=32, timeout=1.0, thread_count=16)


@pytest.fixture(scope="module")
def server():
    srv = LoopbackServer(image_size=(64, 48), sleep_s=2.5).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, server):
    root = tmp_path_factory.mktemp("build")
    url = make_cc12m(root / "in", server, n_good=180, slow_every=30)
    coco = make_coco(root / "in", n_images=40)
    config_file = root / "build.toml"
    config_file.write_text(CONFIG)
    return root, config_file, url, coco


def shard_files(out: Path) -> list[Path]:
    """Shards as the issue defines them: *.parquet outside failures/ and ingest candidates/ rejects/."""
    return sorted(p for p in out.rglob("*.parquet")
                  if not {"failures", "candidates", "rejects"} & set(p.relative_to(out).parts[:-1]))


def shard_contents(out: Path) -> dict[str, tuple[str, bytes]]:
    rows = {}
    for f in shard_files(out):
        t = pq.read_table(f, columns=[schema.KEY, schema.IMAGE_SHA256, schema.IMAGE])
        for k, sha, img in zip(*(t.column(c).to_pylist() for c in t.column_names)):
            rows[k] = (sha, img)
    return rows


def assert_accounting(manifest: dict) -> None:
    for source, a in manifest["accounting"].items():
        assert a["input_rows"] == a["pairs"] + a["rejects"] + a["failures"], (source, a)
    per_source = {}
    for s in manifest["shards"]:
        for k, v in s["sources"].items():
            per_source[k] = per_source.get(k, 0) + v
    assert per_source == {k: a["pairs"] for k, a in manifest["accounting"].items() if a["pairs"]}


@pytest.fixture(scope="module")
def ray_build(inputs, ray_local):
    root, config_file, _, _ = inputs
    config = load_config(config_file, {"out": str(root / "out-ray"), "executor": "ray"})
    config.progress = False
    manifest = run_build(config)
    return root / "out-ray", manifest


def test_build_on_ray_accounts_for_every_row(ray_build, inputs):
    out, manifest = ray_build
    _, _, url, coco = inputs
    assert_accounting(manifest)
    acc = manifest["accounting"]
    assert acc["conceptual_12m"]["input_rows"] == url.lines
    assert acc["conceptual_12m"]["rejects"] == url.expected_rejects
    assert acc["conceptual_12m"]["failures_by_reason"] == dict(sorted(url.expected_failures.items()))
    good_urls = 180 + 2 + 3  # good images, two redirects, three extra captions of known images
    assert acc["conceptual_12m"]["pairs"] == good_urls
    assert acc["conceptual_12m"]["unique_images"] == 180 + 2
    assert acc["coco"]["failures_by_reason"] == coco.expected_failures
    assert acc["coco"]["pairs"] == coco.pairs - sum(coco.expected_failures.values())
    assert acc["coco"]["unique_images"] == coco.unique_images
    assert verify(out) == []

    # Failures: every non-shard candidate, with a stage and reason, keys disjoint from the shards.
    failures = pl.read_parquet(out / "failures")
    assert failures.height == sum(a["failures"] for a in acc.values())
    stages = dict(zip(*failures.select("reason", "stage").unique().sort("reason").to_dict(as_series=False).values()))
    assert stages["http_404"] == "download" and stages["decode_error"] == "decode"
    assert stages["too_small"] == "check" and stages["duplicate"] == "dedup" and stages["missing_member"] == "read"
    contents = shard_contents(out)
    assert not set(contents) & set(failures["key"].to_list())


def test_shards_format_and_mixing(ray_build, ray_local):
    out, manifest = ray_build
    files = shard_files(out)
    assert [str(f.relative_to(out)) for f in files] == [s["file"] for s in manifest["shards"]]
    sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
    assert all(n == 64 for n in sizes[:-1]) and 0 < sizes[-1] <= 64
    assert pq.ParquetFile(files[0]).metadata.num_row_groups >= 1
    mixed = [s for s in manifest["shards"] if len(s["sources"]) == 2]
    assert len(mixed) >= len(files) - 1  # a seeded hash spreads both sources over (almost) every shard
    table = pq.read_table(files[0])
    assert table.schema.names == list(schema.SHARD_COLUMNS)
    for row in table.slice(0, 10).to_pylist():
        im = Image.open(io.BytesIO(row["image"]))
        assert im.format == "JPEG" and im.size == (row["width"], row["height"])
        assert min(im.size) == 32 and row["original_width"] >= 64
    # Readable by polars and Ray Data as well.
    assert pl.read_parquet(files[0]).height == sizes[0]
    import ray

    # One directory path, not a list of files: Ray Data 2.60 resolves a list in parallel threads, which races on
    # importing fsspec's HTTP filesystem when aiohttp is absent ("cannot import name 'HTTPFileSystem'").
    ds = ray.data.read_parquet(str(out / "shards"))
    assert ds.count() == sum(sizes)
    # And the Hugging Face `datasets` parquet loader (offline, a private cache).
    import datasets

    hf = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train",
                               cache_dir=str(out.parent / "hf-cache"))
    assert hf.num_rows == sum(sizes) and hf.features["image"].dtype == "binary"
    assert len(set(hf["key"])) == hf.num_rows
    # The CLI verify agrees.
    assert pmd_main(["verify", str(out)]) == 0


def test_local_executor_writes_identical_shards(ray_build, inputs):
    out, _ = ray_build
    root, config_file, _, _ = inputs
    config = load_config(config_file, {"out": str(root / "out-local"), "executor": "local"})
    config.progress = False
    run_build(config)
    assert [f.read_bytes() for f in shard_files(root / "out-local")] == [f.read_bytes() for f in shard_files(out)]
    # Rerunning a finished build redoes nothing and keeps the bytes.
    before = {f: f.stat().st_mtime_ns for f in shard_files(root / "out-local")}
    run_build(config)
    assert {f: f.stat().st_mtime_ns for f in shard_files(root / "out-local")} == before


def test_auto_executor_pools_a_small_build_and_writes_what_ray_writes(ray_build, inputs, caplog):
    """A URL source and an archive source: "auto" takes the process pool on a build this small, and its shards,
    failures and accounting are the Ray executor's, byte for byte."""
    out, ray_manifest = ray_build
    root, config_file, _, _ = inputs
    config = load_config(config_file, {"out": str(root / "out-auto"), "executor": "auto"})
    config.progress = False
    with caplog.at_level("INFO", logger="pipelines.build"):
        manifest = run_build(config)
    assert "executor auto: pool" in caplog.messages
    pooled = root / "out-auto"
    assert [f.read_bytes() for f in shard_files(pooled)] == [f.read_bytes() for f in shard_files(out)]
    failures = sorted((out / "failures").glob("*.parquet"))
    assert failures and [f.read_bytes() for f in sorted((pooled / "failures").glob("*.parquet"))] == \
        [f.read_bytes() for f in failures]
    for key in ("accounting", "totals", "shards", "failures", "layout"):
        assert manifest[key] == ray_manifest[key], key
    assert {n: s["downloads"] for n, s in manifest["sources"].items()} == \
        {n: s["downloads"] for n, s in ray_manifest["sources"].items()}


def test_verify_names_what_is_wrong(ray_build, tmp_path):
    out, _ = ray_build
    broken = tmp_path / "broken"
    shutil.copytree(out, broken, ignore=shutil.ignore_patterns("work"))
    files = shard_files(broken)
    files[0].unlink()
    data = bytearray(files[1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[1].write_bytes(bytes(data))
    shutil.copy(files[2], broken / "shards" / "shard-09999.parquet")
    problems = "\n".join(verify(broken))
    assert "shard-00000.parquet: shard file missing" in problems
    assert "shard-00001.parquet: sha256 differs" in problems
    assert "shard-09999.parquet: not listed" in problems
    assert pmd_main(["verify", str(broken)]) == 1


def test_changed_configuration_is_refused(ray_build, inputs):
    out, _ = ray_build
    root, config_file, _, _ = inputs
    config = load_config(config_file, {"out": str(out), "shard_rows": 10, "executor": "local"})
    with pytest.raises(BuildError, match="different configuration"):
        run_build(config)


@pytest.mark.parametrize("executor", ["ray", "pool"])
def test_kill_and_resume_matches_uninterrupted_build(ray_build, inputs, executor):
    out, _ = ray_build
    root, config_file, _, _ = inputs
    resumed = root / f"out-killed-{executor}"
    cmd = [PMD, "build", "--config", str(config_file), "--out", str(resumed), "--num-cpus", "2", "-q",
           "--executor", executor]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}
    kill_build_mid_image_stage(cmd, resumed / "work", env)
    assert not (resumed / "manifest.json").exists()
    done_before = sorted((resumed / "work" / "images").glob("*/chunk-*.arrow"))
    assert done_before
    # Tag a failure in every finished chunk: a chunk that were recomputed would lose its tag, so the resumed
    # failures prove which chunks were reused.
    tagged = set()
    for path in done_before:
        table = read_chunk(path)
        details = table.column("detail").to_pylist()
        i = next(i for i, r in enumerate(table.column("reason").to_pylist()) if r) if any(
            table.column("reason").to_pylist()) else None
        if i is not None:
            details[i] = f"tag {path.name}"
            tagged.add((table.column("key")[i].as_py(), details[i]))
            write_ipc_atomic(table.set_column(table.schema.get_field_index("detail"), "detail",
                                              pa.array(details, pa.string())), path)
    assert tagged

    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Finished chunks were not recomputed; the shards equal the uninterrupted build's, byte for byte.
    manifest = json.loads((resumed / "manifest.json").read_text())
    failures = pl.read_parquet(resumed / "failures")
    assert tagged <= set(zip(failures["key"].to_list(), failures["detail"].to_list()))
    # The image stage's chunks were consumed by the final phase: no second copy of the images is left.
    assert image_bytes_in_work(resumed) == 0
    assert [f.name for f in shard_files(resumed)] == [f.name for f in shard_files(out)]
    assert shard_contents(resumed) == shard_contents(out)
    assert [f.read_bytes() for f in shard_files(resumed)] == [f.read_bytes() for f in shard_files(out)]
    assert_accounting(manifest)
    assert verify(resumed) == []
    assert subprocess.run([PMD, "verify", str(resumed)], capture_output=True).returncode == 0


def test_one_source_command_form(inputs, tmp_path, ray_local):
    root, _, _, coco = inputs
    out = tmp_path / "coco-only"
    rc = pmd_main(["build", "coco", str(coco.karpathy), "--out", str(out), "--images", str(coco.zips[0]),
                   "--images", str(coco.zips[1]), "--shard-rows", "50", "--image-size", "0", "-q"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert_accounting(manifest)
    assert manifest["config"]["image"]["image_size"] == 0
    first = pq.read_table(shard_files(out)[0]).to_pylist()[0]
    assert (first["width"], first["height"]) == (80, 60)  # image_size 0: kept at its size, still re-encoded
    assert verify(out) == []


def test_dedup_keeps_first_in_source_then_candidate_order_whatever_the_row_order():
    meta = pl.DataFrame({
        "key": ["a/1", "a/2", "a/3", "b/1", "b/2"], "image_sha256": ["x", "x", "x", "x", "y"],
        "text_hash": [1, 1, 2, 1, 1], "source_index": [0, 0, 0, 1, 1], "candidate_index": [5, 2, 9, 0, 1],
    }, schema_overrides={"text_hash": pl.UInt64, "source_index": pl.Int32, "candidate_index": pl.Int64})
    for frame in (meta, meta.reverse(), meta.sample(fraction=1.0, shuffle=True, seed=3)):
        kept = dict(zip(*dedup(frame).select("key", "kept_key").to_dict(as_series=False).values()))
        # (x, 1): a/2 (source 0, candidate 2) beats a/1 (candidate 5) and b/1 (source 1, candidate 0).
        assert kept == {"a/1": "a/2", "a/2": "a/2", "a/3": "a/3", "b/1": "a/2", "b/2": "b/2"}


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('shard_rowz = 5\n[[sources]]\nname = "coco"\ninputs = ["x"]\n')
    with pytest.raises(ValueError, match="unknown key.*shard_rowz"):
        load_config(bad, {"out": str(tmp_path)})
    bad.write_text('[image]\nsize = 5\n[[sources]]\nname = "coco"\ninputs = ["x"]\n')
    with pytest.raises(ValueError, match=r"bad.toml: image: unknown key\(s\) \['size'\]; accepted keys are \['image_"):
        load_config(bad, {"out": str(tmp_path)})
    y = tmp_path / "ok.yaml"
    y.write_text("sources:\n  - name: coco\n    inputs: [a.json]\n    images: img.zip\n    colour: red\n")
    with pytest.raises(ValueError, match="sources\\[0\\].*colour"):
        load_config(y, {"out": str(tmp_path)})
    y.write_text("shard_rows: 5\nsources:\n  - name: coco\n    inputs: [a.json]\n    images: img.zip\n")
    config = load_config(y, {"out": str(tmp_path)})
    assert isinstance(config, BuildConfig) and config.shard_rows == 5
    assert config.sources[0].images == [tmp_path / "img.zip"] and config.sources[0].mode == "archive"
    y.write_text("sources:\n  - name: nosuch\n    inputs: [a.json]\n")
    with pytest.raises(ValueError, match="unknown source"):
        load_config(y, {"out": str(tmp_path)})
