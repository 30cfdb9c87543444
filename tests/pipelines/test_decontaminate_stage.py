"""Both evaluation screens inside the image stage of one chunk: Flickr ids before reading, pHash after processing."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from pmd.build import ChunkTask, read_chunk, run_chunk
from pmd import schema
from pmd.archives import ArchiveIndex
from pmd_cli.pmd import _build_config, build_parser
from pmd.decontaminate import EVAL_OVERLAP, STAGE, EvalHashIndex
from pmd.eval_screen import EvalScreenOptions
from pmd.images import ImageOptions
from pmd.sources.base import Pair, pairs_table
from tests.pmd.test_decontaminate import encode, picture


def test_chunk_with_both_screens(tmp_path):
    evals = tmp_path / "coco_karpathy_test"
    evals.mkdir()
    (evals / "COCO_val2014_000000000042.jpg").write_bytes(encode(picture(42), "JPEG", quality=92))
    corpus = tmp_path / "images"
    corpus.mkdir()
    # The evaluation picture re-encoded at another size, a different picture, and an evaluation photo by id.
    (corpus / "copy.jpg").write_bytes(encode(picture(42).resize((640, 480), Image.Resampling.BICUBIC), "JPEG",
                                             quality=70))
    (corpus / "other.png").write_bytes(encode(picture(43)))
    (corpus / "1001773457.jpg").write_bytes(encode(picture(44)))
    pairs = [Pair("localized_narratives__flickr30k/copy/0/0", "a copy", "train", "{}", image_ref="copy.jpg"),
             Pair("localized_narratives__flickr30k/other/0/0", "another", "train", "{}", image_ref="other.png"),
             Pair("localized_narratives__flickr30k/1001773457/0/0", "by id", "train", "{}",
                  image_ref="1001773457.jpg")]
    task = ChunkTask(source="localized_narratives__flickr30k", index=0,
                     candidates=pairs_table(pairs, "localized_narratives__flickr30k"),
                     path=tmp_path / "work" / "images" / "ln" / "chunk-00000.arrow", image_options=ImageOptions(),
                     seed=0, mode="archive", archive_state=ArchiveIndex.build([corpus]).to_state(),
                     eval_ids={1001773457: "flickr30k_test!1001773457.jpg"},
                     eval_index=EvalHashIndex.build([evals]))
    result = run_chunk(task)
    assert result == {"source": "localized_narratives__flickr30k", "index": 0, "rows": 3, "ok": 1,
                      "failures_by_reason": {EVAL_OVERLAP: 2}}
    rows = read_chunk(task.path, [schema.KEY, schema.STAGE, schema.REASON, schema.DETAIL]).to_pylist()
    assert [(r[schema.STAGE], r[schema.REASON]) for r in rows] == [(STAGE, EVAL_OVERLAP), (None, None),
                                                                   (STAGE, EVAL_OVERLAP)]
    assert rows[0][schema.DETAIL].startswith("coco_karpathy_test!COCO_val2014_000000000042.jpg (hamming ")
    assert rows[2][schema.DETAIL] == "flickr30k_test!1001773457.jpg (flickr photo 1001773457)"


def test_build_flags_and_config(tmp_path):
    from pipelines.build import BuildConfig, SourceSpec, load_config

    (tmp_path / "evals").mkdir()
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": [], "dataset": "flickr30k"}))
    (tmp_path / "meta.tsv").write_text("")
    (tmp_path / "build.toml").write_text(
        'out = "o"\n[[sources]]\nname = "conceptual_captions"\ninputs = ["meta.tsv"]\n'
        '[decontaminate]\nagainst = ["evals"]\nthreshold = 8\n')
    config = load_config(tmp_path / "build.toml")
    assert config.decontaminate == EvalScreenOptions(against=[tmp_path / "evals"], threshold=8)
    args = build_parser().parse_args(["build", "--config", str(tmp_path / "build.toml"), "--out", "o",
                                      "--eval-flickr-ids", str(tmp_path / "dataset_flickr30k.json")])
    assert (args.decontaminate_against, args.eval_hash_threshold) == ([], None)
    config = _build_config(args)
    assert config.decontaminate.flickr_ids == [tmp_path / "dataset_flickr30k.json"]
    assert config.decontaminate.threshold == 8 and config.to_dict()["decontaminate"]["against"] == [
        str(tmp_path / "evals")]
    args = build_parser().parse_args(["build", "--config", str(tmp_path / "build.toml"), "--out", "o",
                                      "--decontaminate-against", "a", "--decontaminate-against", "b",
                                      "--eval-hash-threshold", "6"])
    config = _build_config(args)
    # the flags add to the file's list; the file's paths are relative to the file, the flags' to the directory
    assert config.decontaminate.against == [tmp_path / "evals", Path("a"), Path("b")]
    assert config.decontaminate.threshold == 6
    args = build_parser().parse_args(["build", "conceptual_captions", "x", "--out", "o", "--decontaminate-against",
                                      "a", "--eval-hash-threshold", "6"])
    config = _build_config(args)
    assert config.decontaminate == EvalScreenOptions(against=[Path("a")], threshold=6)
    assert config.sources[0].inputs == [Path("x")]
    plain = BuildConfig(sources=[SourceSpec("conceptual_captions", [tmp_path / "meta.tsv"])], out=tmp_path / "p")
    assert plain.decontaminate.load() == (None, None)


def test_local_build_keeps_an_evaluation_image_out(tmp_path, capsys):
    """`pmd build` end to end (in-process): the evaluation picture, stored at another size in the COCO zip, is removed
    with its five captions; `pmd stats` counts them for the source and the evaluation set."""
    import zipfile

    from pmd import stats
    from pmd_cli.pmd import main
    from tests.pmd.sources._karpathy_fixtures import image

    images, members = [], {}
    for n in range(6):
        name = f"COCO_train2014_{n:012d}.jpg"
        images.append(image(n, "train", [(10 * n + j, f"Picture {n}, caption {j}.") for j in range(5)], imgid=n,
                            filepath="train2014") | {"filename": name})
        members[f"train2014/{name}"] = encode(picture(n).resize((400, 300)), "JPEG", quality=85)
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": images, "dataset": "coco"}))
    archive = tmp_path / "train2014.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    evals = tmp_path / "flickr30k_test"
    evals.mkdir()
    (evals / "3.jpg").write_bytes(encode(picture(3), "JPEG", quality=95))
    out = tmp_path / "out"
    assert main(["build", "coco", str(karpathy), "--images", str(archive), "--out", str(out), "--executor", "local",
                 "--decontaminate-against", str(evals), "-q", "--json"]) == 0
    accounting = json.loads(capsys.readouterr().out)["accounting"]["coco"]
    assert (accounting["pairs"], accounting["failures"]) == (25, 5)
    assert accounting["failures_by_reason"] == {EVAL_OVERLAP: 5}
    result = stats.audit(out)
    assert result["trusted"], result["problems"]
    assert result["eval_overlap"] == {"coco": {"flickr30k_test": 5}}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["decontaminate"]["against"] == [str(evals)]
