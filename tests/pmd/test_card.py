"""OUT/README.md and OUT/croissant.json (pmd.card, pmd.croissant) of a real build: mlcroissant validates the
Croissant file and its record reader yields the shards' rows; `datasets.load_dataset(OUT, split="train")` reads
every pair through the card's YAML; `pmd card` is idempotent; `pmd verify` reports a stale or missing card."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pmd import card, schema
from pmd.catalog import catalog_entry, citations
from pmd_cli.pmd import main as pmd_main
from pmd.croissant import CROISSANT_FILE
from pmd.manifest import Manifest
from pmd.shards import verify
from tests.pipelines.build_fixtures import make_coco

PMD = str(Path(sys.executable).with_name("pmd"))
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("card")
    coco = make_coco(root / "in", n_images=70)
    out = root / "out"
    cmd = [PMD, "build", "coco", str(coco.karpathy), *sum((["--images", str(z)] for z in coco.zips), []),
           "--out", str(out), "--executor", "local", "--shard-rows", "64", "--row-group-rows", "16",
           "--image-size", "32", "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture
def corpus(built, tmp_path) -> Path:
    out = tmp_path / "corpus"
    shutil.copytree(built, out, ignore=shutil.ignore_patterns("work"))
    return out


def shard_rows(out: Path) -> list[dict]:
    manifest = Manifest.read(out)
    return [r for path in manifest.shard_locations() for r in pq.read_table(path).to_pylist()]


def failure_rows(out: Path) -> list[dict]:
    return [r for e in Manifest.read(out).failures for r in pq.read_table(out / e.file).to_pylist()]


def test_the_build_writes_both_files_and_verify_checks_them(built):
    assert (built / "README.md").is_file() and (built / CROISSANT_FILE).is_file()
    assert verify(built) == []
    meta = card.read_front_matter((built / "README.md").read_text())
    manifest = Manifest.read(built)
    assert meta["pmd"]["pairs"] == manifest.rows == len(shard_rows(built)) > 200
    assert meta["pmd"]["files"] == {e.file: e.sha256 for e in (*manifest.shards, *manifest.failures)}
    assert meta["size_categories"] == ["n<1K"] and meta["license"] == "other"
    assert [c["config_name"] for c in meta["configs"]] == ["default", "failures"]


def test_mlcroissant_validates_and_its_records_are_the_shards_rows(built):
    r = subprocess.run([str(Path(sys.executable).with_name("mlcroissant")), "validate", "--jsonld",
                        str(built / CROISSANT_FILE)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "error" not in (r.stdout + r.stderr).lower(), r.stderr[-3000:]

    import mlcroissant as mlc

    dataset = mlc.Dataset(jsonld=str(built / CROISSANT_FILE))
    licence = catalog_entry("coco").pair_licence
    expected = {r[schema.KEY]: r for r in shard_rows(built)}
    got = {}
    for record in dataset.records("pairs"):
        key = record["pairs/key"].decode()
        image = record["pairs/image"]
        got[key] = record
        row = expected[key]
        assert record["pairs/source"].decode() == row[schema.SOURCE]
        assert record["pairs/text"].decode() == row[schema.TEXT]
        assert record["pairs/image_ref"].decode() == row[schema.IMAGE_REF] and record["pairs/image_url"] is None
        assert (int(record["pairs/width"]), int(record["pairs/height"])) == (row[schema.WIDTH], row[schema.HEIGHT])
        assert record["pairs/image_sha256"].decode() == row[schema.IMAGE_SHA256]
        stored = Image.open(io.BytesIO(row[schema.IMAGE]))
        assert image.format == stored.format == "JPEG" and image.size == stored.size
        assert image.tobytes() == stored.tobytes()  # the same JPEG bytes, decoded
        assert record["pairs/licence"].decode() == licence  # joined from the sources record set
    assert sorted(got) == sorted(expected)

    failures = [(r["failures/key"].decode(), r["failures/reason"].decode()) for r in dataset.records("failures")]
    assert sorted(failures) == sorted((r[schema.KEY], r[schema.REASON]) for r in failure_rows(built))
    sources = list(dataset.records("sources"))
    assert [s["sources/name"] for s in sources] == ["coco"]


def test_croissant_lists_every_file_with_its_digest_and_the_rai_fields(built):
    doc = json.loads((built / CROISSANT_FILE).read_text())
    manifest = Manifest.read(built)
    objects = {f["contentUrl"]: f for f in doc["distribution"] if f["@type"] == "cr:FileObject"}
    assert {k: (f["sha256"], f["contentSize"]) for k, f in objects.items()} == {
        e.file: (e.sha256, f"{e.bytes} B") for e in (*manifest.shards, *manifest.failures)}
    image = next(f for f in doc["recordSet"][1]["field"] if f["name"] == "image")
    assert (image["dataType"], image["encodingFormat"]) == ("sc:ImageObject", "image/jpeg")
    for field in ("rai:dataCollection", "rai:dataPreprocessingProtocol", "rai:dataLimitations",
                  "rai:personalSensitiveInformation", "rai:dataUseCases", "rai:dataCollectionMissingData"):
        assert doc[field], field
    missing = doc["rai:dataCollectionMissingData"]
    assert f"{manifest.data['totals']['failures']:,} of {manifest.data['totals']['input_rows']:,}" in missing
    assert doc["citeAs"] == citations()["pmd"].bibtex
    assert [b["citation"] for b in doc["isBasedOn"]] == [citations()["coco"].bibtex]


def test_load_dataset_reads_every_pair_through_the_card(built, tmp_path):
    script = """
import json, sys
from datasets import load_dataset
pairs = load_dataset(sys.argv[1], split="train")
failures = load_dataset(sys.argv[1], "failures", split="train")
print(json.dumps({"keys": sorted(pairs["key"]), "columns": pairs.column_names, "failures": sorted(failures["key"])}))
"""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", script, str(built)], capture_output=True, text=True, timeout=600,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["keys"] == sorted(r[schema.KEY] for r in shard_rows(built))
    assert got["columns"] == list(schema.SHARD_COLUMNS)
    assert got["failures"] == sorted(r[schema.KEY] for r in failure_rows(built))


def test_the_card_config_rebuilds_the_same_configuration(built):
    from pipelines.build import load_config

    text = (built / "README.md").read_text()
    toml = text.split("```toml\n", 1)[1].split("```", 1)[0]
    config_file = built.parent / "from-card.toml"
    config_file.write_text(toml)
    assert tomllib.loads(toml)
    config = load_config(config_file, {"out": str(built.parent / "again")})
    assert config.to_dict() == Manifest.read(built).data["config"]


def test_pmd_card_is_idempotent_and_verify_reports_a_stale_card(corpus, capsys):
    before = {n: (corpus / n).read_bytes() for n in ("README.md", CROISSANT_FILE)}
    assert pmd_main(["card", str(corpus)]) == 0
    assert {n: (corpus / n).read_bytes() for n in before} == before  # byte for byte

    (corpus / CROISSANT_FILE).unlink()
    assert verify(corpus) == [f"{CROISSANT_FILE}: missing (write it with `pmd card OUT`)"]
    assert pmd_main(["card", str(corpus)]) == 0 and verify(corpus) == []
    assert (corpus / CROISSANT_FILE).read_bytes() == before[CROISSANT_FILE]

    # A manifest that moved on (here: a shard's digest and the build date) without its card: both files stale.
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest["created_at"] = "2027-01-01T00:00:00Z"
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    problems = verify(corpus, check_sha256=False)
    assert any(p.startswith("README.md: stale, its created_at disagree") for p in problems), problems
    assert any(p.startswith(f"{CROISSANT_FILE}: stale, datePublished") for p in problems), problems
    assert pmd_main(["card", str(corpus)]) == 0 and verify(corpus) == []

    (corpus / "README.md").write_text("no front matter\n")
    assert verify(corpus) == ["README.md: unreadable (no YAML front matter)"]


def test_a_takedown_rewrites_the_card(corpus, tmp_path):
    victims = [r[schema.KEY] for r in shard_rows(corpus)[:3]]
    (tmp_path / "k.txt").write_text("\n".join(victims) + "\n")
    assert pmd_main(["takedown", str(corpus), "--keys", str(tmp_path / "k.txt"), "--reason", "owner request"]) == 0
    assert verify(corpus) == []
    text = (corpus / "README.md").read_text()
    meta = card.read_front_matter(text)
    assert meta["pmd"]["pairs"] == Manifest.read(corpus).rows == len(shard_rows(corpus))
    assert "| keys | owner request | 3 | 3 |" in text


def test_every_source_has_one_citation_and_the_catalog_checks_it():
    cites = citations()
    assert set(cites) == {"pmd", *(e for e in schema.SOURCE_NAMES)}
    assert all(c.bibtex.startswith("@") and c.bibtex.rstrip().endswith("}") and c.creators for c in cites.values())


def test_size_categories_follow_the_hub_bounds():
    assert [card.size_category(n) for n in (0, 999, 1000, 69_999_999, 70_000_000, 100_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "10M<n<100M", "10M<n<100M", "100M<n<1B"]


def test_docs_describe_both_files():
    text = (REPO / "docs" / "build-format.md").read_text()
    assert "croissant.json" in text and "README.md" in text and "pmd card" in text
