"""Every upstream input on object storage (the loopback S3 server): `pmd ingest` and `pmd build` given `s3://` URLs
for their metadata files, `--images` archives (a zip and a plain tar), `--decontaminate-against` and
`--eval-flickr-ids` write the same candidates and the same shard bytes as with the same files on local disk; a
takedown list is read from the store; an object overwritten with other bytes makes the ingest stale."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.build import load_config, run_build
from pipelines.ingest import IngestConfig, run_ingest
from pmd import storage
from pmd.decontaminate import EvalHashIndex
from pmd.eval_ids import load_eval_flickr_ids
from pmd.ingest import input_fingerprint, read_summary
from pmd.takedown import read_request
from tests.archive_files import write_tar
from tests.httpserver import LoopbackServer
from tests.loopback import toml_allow_line
from tests.pipelines.build_fixtures import make_cc12m, make_coco
from tests.s3server import s3_environment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3():
    with s3_environment() as env:
        yield env


def upload_tree(local: Path, url: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.upload(path, storage.join(url, *path.relative_to(local).parts))


def parts(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*.parquet"))}


def rejects(directory: Path, prefix: str) -> list[dict]:
    """Reject rows with the input file's location made relative (it names the local path or the URL)."""
    rows = []
    for path in sorted((directory / "rejects").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            row["input_file"] = row["input_file"].removeprefix(prefix)
            rows.append(row)
    return rows


def ingest(source: str, inputs: list, out: Path) -> dict:
    return run_ingest(IngestConfig(source=source, inputs=inputs, out=out, executor="local", chunk_records=7,
                                   progress=False))


def sbu_inputs(directory: Path) -> list[Path]:
    n = 40
    data = json.dumps({"image_urls": [f"http://static.flickr.com/1/{1000 + i}_ab.jpg" for i in range(n)],
                       "user_ids": [f"{i}@N00" for i in range(n)],
                       "captions": [f"caption number {i}" if i % 9 else " " for i in range(n)]}).encode()
    return [write_tar(directory / "sbu-captions-all.tar.gz", {"sbu-captions-all.json": data})]


def visual_genome_inputs(directory: Path) -> list[Path]:
    images, regions = [], []
    for i in range(12):
        images.append({"image_id": i + 1, "url": f"https://cs.stanford.edu/VG_100K/{i + 1}.jpg", "width": 80,
                       "height": 60, "coco_id": None, "flickr_id": 5000 + i})
        regions.append({"id": i + 1, "regions": [
            {"region_id": 10 * i + j, "image_id": i + 1, "phrase": f"thing {i} part {j}" if j else "",
             "x": j, "y": j, "width": 20, "height": 10} for j in range(3)]})
    paths = []
    for name, value in (("region_descriptions.json", regions), ("image_data.json", images)):
        with zipfile.ZipFile(directory / f"{name}.zip", "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(name, json.dumps(value))
        paths.append(directory / f"{name}.zip")
    coco = make_coco(directory / "coco", n_images=4)
    return [*paths, coco.karpathy]


@pytest.mark.parametrize("source, make", [("sbu_captions", sbu_inputs), ("visual_genome", visual_genome_inputs)])
def test_an_ingest_of_inputs_on_s3_writes_the_same_parts(s3, tmp_path, source, make):
    (tmp_path / "in").mkdir()
    local_inputs = make(tmp_path / "in")
    url = f"s3://pmd/ingest-{source}"
    upload_tree(tmp_path / "in", url)
    remote_inputs = [storage.join(url, *p.relative_to(tmp_path / "in").parts) for p in local_inputs]
    local, remote = ingest(source, local_inputs, tmp_path / "local"), ingest(source, remote_inputs, tmp_path / "s3")
    assert remote["counts"] == local["counts"] and local["counts"]["pairs"] > 20 and local["counts"]["rejects"] > 2
    assert remote["parts"] == local["parts"] > 1
    candidates = parts(tmp_path / "local" / source / "candidates")
    assert parts(tmp_path / "s3" / source / "candidates") == candidates and candidates
    assert rejects(tmp_path / "s3" / source, url) == rejects(tmp_path / "local" / source, str(tmp_path / "in"))
    assert [i["path"] for i in remote["inputs"]] == remote_inputs and all(i["etag"] for i in remote["inputs"])


def test_an_object_overwritten_with_other_bytes_makes_its_ingest_stale(s3, tmp_path):
    url = "s3://pmd/stale/cc3m.tsv"
    (tmp_path / "a.tsv").write_text("a caption one\thttp://127.0.0.1/1.jpg\n")
    storage.upload(tmp_path / "a.tsv", url)
    summary = ingest("conceptual_captions", [url], tmp_path / "out")
    assert read_summary(tmp_path / "out" / "conceptual_captions")["inputs"] == input_fingerprint([url])
    assert summary["counts"]["pairs"] == 1
    (tmp_path / "a.tsv").write_text("a caption two\thttp://127.0.0.1/2.jpg\n")  # the same size
    storage.upload(tmp_path / "a.tsv", url)
    assert summary["inputs"] != input_fingerprint([url])
    assert summary["inputs"][0]["bytes"] == input_fingerprint([url])[0]["bytes"]


def test_eval_ids_decontamination_sets_and_takedown_lists_are_read_from_s3(s3, tmp_path):
    captions = {"images": [{"id": 1000 + i, "file_name": f"COCO_val2014_{1000 + i:012d}.jpg",
                            "flickr_url": f"http://farm4.staticflickr.com/3153/{777 + i}_164f0c0b83_z.jpg"}
                           for i in range(3)]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(captions))
    storage.upload(tmp_path / "captions_val2014.json", "s3://pmd/eval/captions_val2014.json")
    ids = load_eval_flickr_ids(["s3://pmd/eval/captions_val2014.json"])
    assert ids == load_eval_flickr_ids([tmp_path / "captions_val2014.json"]) and sorted(ids) == [777, 778, 779]

    coco = make_coco(tmp_path / "coco", n_images=10)
    with zipfile.ZipFile(coco.zips[0]) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    write_tar(tmp_path / "evalset.tar", members, mode="w")
    storage.upload(tmp_path / "evalset.tar", "s3://pmd/eval/evalset.tar")
    remote, local = EvalHashIndex.build(["s3://pmd/eval/evalset.tar"]), EvalHashIndex.build([tmp_path / "evalset.tar"])
    assert remote.names == local.names and len(local) >= 2 and remote.set_names == ["evalset.tar"]
    assert remote.hashes.tolist() == local.hashes.tolist()

    (tmp_path / "urls.txt").write_text("# removal request\nhttp://127.0.0.1/img/101.jpg\n\nhttp://127.0.0.1/a.jpg\n")
    storage.upload(tmp_path / "urls.txt", "s3://pmd/takedown/urls.txt")
    assert read_request("urls", "s3://pmd/takedown/urls.txt") == read_request("urls", tmp_path / "urls.txt")
    with pytest.raises(FileNotFoundError):
        read_request("urls", "s3://pmd/takedown/absent.txt")


def build_config(root: Path, inputs: str, against: str) -> str:
    return ("shard_rows = 30\nchunk_rows = 16\nseed = 5\nexecutor = \"pool\"\nnum_cpus = 2\n"
            "[image]\nimage_size = 24\n[download]\ntimeout = 3.0\nthread_count = 8\n" + toml_allow_line()
            + f'[decontaminate]\nagainst = ["{against}"]\n'
            f'[[sources]]\nname = "conceptual_12m"\ninputs = ["{inputs}/cc12m.tsv"]\n'
            f'[[sources]]\nname = "coco"\ninputs = ["{inputs}/dataset_coco.json"]\n'
            f'images = ["{inputs}/val2014.tar", "{inputs}/train2014.zip"]\n')


def test_a_build_whose_inputs_are_on_s3_writes_the_same_shards(s3, tmp_path):
    # A 3 s download timeout (the server's stalls last 4 s): a good image never times out on a loaded machine.
    server = LoopbackServer(image_size=(64, 48), sleep_s=4.0).start()
    try:
        make_cc12m(tmp_path / "in", server, n_good=24)
        coco = make_coco(tmp_path / "in", n_images=16)
        with zipfile.ZipFile(coco.zips[0]) as archive:  # val2014 as a plain tar: its members by ranged reads
            members = {n: archive.read(n) for n in archive.namelist()}
        write_tar(tmp_path / "in" / "val2014.tar", members, mode="w")
        (tmp_path / "in" / "val2014.zip").unlink()
        # Two of COCO's images are also an evaluation set: their pairs fail as eval_overlap in both builds.
        (tmp_path / "eval" / "evalset").mkdir(parents=True)
        for name in (f"val2014/COCO_val2014_{1000 + n:012d}.jpg" for n in (9, 11)):
            (tmp_path / "eval" / "evalset" / Path(name).name).write_bytes(members[name])
        upload_tree(tmp_path / "in", "s3://pmd/inputs")
        upload_tree(tmp_path / "eval", "s3://pmd/eval")
        manifests = {}
        for name, inputs, against in (("local", tmp_path / "in", tmp_path / "eval" / "evalset"),
                                      ("s3", "s3://pmd/inputs", "s3://pmd/eval/evalset")):
            (tmp_path / f"{name}.toml").write_text(build_config(tmp_path, str(inputs), str(against)))
            config = load_config(tmp_path / f"{name}.toml", {"out": str(tmp_path / f"out-{name}")})
            config.progress = False
            manifests[name] = run_build(config)
    finally:
        server.stop()
    local, remote = manifests["local"], manifests["s3"]
    assert local["totals"]["pairs"] > 50 and len(local["shards"]) >= 3
    assert remote["shards"] == local["shards"]
    assert [(s, k, a.get(k), local["accounting"][s].get(k)) for s, a in remote["accounting"].items()
            for k in {*a, *local["accounting"][s]} if a.get(k) != local["accounting"][s].get(k)] == []
    assert parts(tmp_path / "out-s3" / "shards") == parts(tmp_path / "out-local" / "shards")
    failures = {p.name: pq.read_table(p).drop_columns(["detail"]).to_pylist()
                for p in sorted((tmp_path / "out-local" / "failures").glob("*.parquet"))}
    assert failures == {p.name: pq.read_table(p).drop_columns(["detail"]).to_pylist()
                        for p in sorted((tmp_path / "out-s3" / "failures").glob("*.parquet"))}
    rows = [row for rows in failures.values() for row in rows]
    overlap = sorted(int(r["key"].split("/")[1]) for r in rows
                     if r["reason"] == "eval_overlap" and r["source"] == "coco")
    assert overlap == [45 + i for i in range(5)] + [55 + i for i in range(5)]  # sentids of images 9 and 11
    assert sum(r["reason"] == "missing_member" for r in rows) == 5
    entry = remote["sources"]["coco"]
    assert [a["path"] for a in entry["archives"]] == ["s3://pmd/inputs/val2014.tar", "s3://pmd/inputs/train2014.zip"]
    assert entry["inputs"][0]["etag"] and "sha256" not in entry["inputs"][0]


def test_the_command_line_keeps_input_urls_as_urls(tmp_path):
    """`pmd build coco s3://b/dataset_coco.json ...`: every input flag keeps its URL (a Path would fold `//`), and a
    config file's URLs are not made relative to the file; local paths still are."""
    from pmd_cli.pmd import _build_config, build_parser

    args = build_parser().parse_args([
        "build", "coco", "s3://b/up/dataset_coco.json", "--images", "s3://b/up/val2014.zip", "--images",
        str(tmp_path / "train2014.zip"), "--eval-flickr-ids", "gs://e/dataset_flickr30k.json",
        "--decontaminate-against", "s3://b/eval/coco-test/", "--out", "s3://b/pmd"])
    config = _build_config(args)
    spec = config.sources[0]
    assert spec.inputs == ["s3://b/up/dataset_coco.json"]
    assert spec.images == ["s3://b/up/val2014.zip", tmp_path / "train2014.zip"]
    assert config.decontaminate.flickr_ids == ["gs://e/dataset_flickr30k.json"]
    assert config.decontaminate.against == ["s3://b/eval/coco-test/"]
    (tmp_path / "b.toml").write_text('[[sources]]\nname = "conceptual_12m"\ninputs = ["s3://b/cc12m.tsv", "cc3.tsv"]\n')
    spec = load_config(tmp_path / "b.toml", {"out": str(tmp_path / "out")}).sources[0]
    assert spec.inputs == ["s3://b/cc12m.tsv", tmp_path / "cc3.tsv"]
