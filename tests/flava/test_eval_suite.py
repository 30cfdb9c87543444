"""The evaluation sets in their formats (image folders, WebDataset, labelled Parquet, Karpathy split files) and
`flava eval suite` (one JSON, one Markdown table, the paper's figures beside ours for the published model)."""

import json
import shutil
from pathlib import Path

import pytest

from pmd_cli.flava import main
from flava.data import DataError
from flava.eval_data import LabelMap, detect_format, load_classes
from flava.eval_suite import RESULTS_JSON, RESULTS_MD, is_conversion_of, load_suite
from tests.archive_files import write_zip

from .eval_sets import (
    labelled,
    write_imagefolder,
    write_karpathy,
    write_labelled_parquet,
    write_wds,
)
from .shards import CLASSES, make_rows, write_build
from .test_retrieval import hf_dir  # noqa: F401 - the tiny random FLAVA, a module fixture

ROOT = Path(__file__).resolve().parents[2]


def _run(capsys, *args) -> dict:
    assert main(list(args) + ["--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_zeroshot_reads_every_format_alike(hf_dir, tmp_path, capsys):  # noqa: F811
    samples = labelled(36, seed=6)
    sets = {
        "imagefolder": write_imagefolder(tmp_path / "folder", samples),
        "webdataset": write_wds(tmp_path / "set.tar", samples),
        "parquet": write_labelled_parquet(tmp_path / "set.parquet", samples),
        "parquet-struct": write_labelled_parquet(tmp_path / "struct.parquet", samples, as_struct=True),
    }
    base = ["eval", "zeroshot", "--checkpoint", str(hf_dir), "--classes", ",".join(CLASSES), "--templates",
            "a photo of a {}.|a {}."]
    got = {}
    for name, path in sets.items():
        assert detect_format(path) == name.split("-")[0]
        got[name] = _run(capsys, *base, "--data", str(path))
    keys = ("top1", "top5", "n", "rows", "unlabelled", "undecodable")
    first = {k: got["imagefolder"][k] for k in keys}
    assert first["n"] == 36 and first["unlabelled"] == first["undecodable"] == 0
    # the same images in another order: each image scored alike, so the same counts
    for name, res in got.items():
        assert {k: res[k] for k in keys} == first, name
    # PMD shards of the same images label by meta: the same figures again
    rows = [dict(r, image=img) for r, (img, _) in zip(make_rows(36, seed=6, size=32), samples)]
    build = write_build(tmp_path / "build", rows)
    assert {k: _run(capsys, *base, "--data", str(build))[k] for k in keys} == first
    # bad samples are counted, not guessed: a WebDataset sample without cls, a label outside the classes
    bad = samples[:5] + [(b"not an image", CLASSES[0])]
    write_labelled_parquet(tmp_path / "bad.parquet", bad + [(samples[0][0], "purple hexagon")])
    res = _run(capsys, *base, "--data", str(tmp_path / "bad.parquet"))
    assert (res["n"], res["rows"], res["unlabelled"], res["undecodable"]) == (5, 7, 1, 1)


def test_label_map_and_class_lists(tmp_path):
    names = load_classes("imagenet")
    assert len(names) == 1000 and names[:2] == ["tench", "goldfish"]
    # ImageNet's folders are wnids: they map by sorted position, which needs one name per folder
    lm = LabelMap(["cat", "dog", "fox"], ["n001", "n002", "n003"])
    assert [lm("n002"), lm(2), lm(3), lm("cat"), lm(None), lm(True)] == [1, 2, None, 0, None, None]
    with pytest.raises(DataError, match="2 class directories"):
        LabelMap(["cat", "dog", "fox"], ["n001", "n002"])
    with pytest.raises(DataError, match="given twice"):
        load_classes("a,b,a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither an image folder"):
        detect_format(tmp_path / "empty")


def test_karpathy_zip_needs_the_dataset_and_counts_the_split(hf_dir, tmp_path, capsys):  # noqa: F811
    coco_json, coco_images, present = write_karpathy(tmp_path / "coco", n_test=12, n_train=3)
    f_json, f_images, f_present = write_karpathy(tmp_path / "f30k", n_test=8, n_train=2, flickr=True)
    zipped = write_zip(tmp_path / "caption_datasets.zip", {"dataset_coco.json": coco_json.read_bytes(),
                                                           "dataset_flickr30k.json": f_json.read_bytes()})
    base = ["eval", "retrieval", "--checkpoint", str(hf_dir), "--karpathy", str(zipped)]
    assert main(base + ["--images", str(coco_images)]) == 2
    assert "say which dataset" in capsys.readouterr().err
    res = _run(capsys, *base, "--karpathy-dataset", "coco", "--images", str(coco_images))
    assert (res["n_images"], res["n_texts"]) == (12, sum(len(c) for _, c in present))
    res = _run(capsys, *base, "--karpathy-dataset", "flickr30k", "--images", str(f_images))
    assert (res["n_images"], res["n_texts"]) == (8, sum(len(c) for _, c in f_present))
    # the train split of the same file, and a split the file does not know
    res = _run(capsys, *base, "--karpathy-dataset", "coco", "--images", str(coco_images), "--split", "train")
    assert res["n_images"] == 3
    assert main(base + ["--karpathy-dataset", "coco", "--images", str(coco_images), "--split", "dev"]) == 2
    assert "unknown Karpathy split" in capsys.readouterr().err
    assert main(["eval", "retrieval", "--checkpoint", str(hf_dir), "--karpathy", str(coco_json)]) == 2
    assert "needs the images" in capsys.readouterr().err
    assert main(["eval", "retrieval", "--checkpoint", str(hf_dir), "--karpathy", str(coco_json), "--images",
                 str(tmp_path / "nowhere.zip")]) == 2
    assert "not found" in capsys.readouterr().err


def _suite_files(tmp_path: Path) -> Path:
    samples = labelled(48, seed=8)
    write_imagefolder(tmp_path / "zs", samples[:24])
    write_imagefolder(tmp_path / "train", labelled(48, seed=9))
    write_karpathy(tmp_path / "k", n_test=10, n_train=2)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    cfg = tmp_path / "eval.toml"
    cfg.write_text("""
[suite]
name = "test suite"
paper = "a paper"

[[task]]
name = "coco"
kind = "retrieval"
karpathy = "k/dataset_coco.json"
images = ["k/val2014.zip"]
[task.paper]
cite = "the paper, its retrieval table"
i2t_r1 = 42.74
t2i_r1 = 38.38

[[task]]
name = "shapes_zeroshot"
kind = "zeroshot"
data = ["zs"]
classes = "classes.txt"
templates = "single"

[[task]]
name = "shapes_probe"
kind = "linear_probe"
train = ["train"]
test = ["zs"]
""")
    return cfg


def test_suite_equals_its_tasks_run_alone(hf_dir, tmp_path, capsys):  # noqa: F811
    cfg = _suite_files(tmp_path)
    out = tmp_path / "out"
    assert main(["eval", "suite", "--checkpoint", str(hf_dir), "--config", str(cfg), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / RESULTS_JSON).read_text())
    assert list(results["tasks"]) == ["coco", "shapes_zeroshot", "shapes_probe"] and not results["paper_shown"]
    alone = {
        "coco": _run(capsys, "eval", "retrieval", "--checkpoint", str(hf_dir), "--karpathy",
                     str(tmp_path / "k/dataset_coco.json"), "--images", str(tmp_path / "k/val2014.zip")),
        "shapes_zeroshot": _run(capsys, "eval", "zeroshot", "--checkpoint", str(hf_dir), "--data",
                                str(tmp_path / "zs"), "--classes", str(tmp_path / "classes.txt"),
                                "--single-template"),
        "shapes_probe": _run(capsys, "eval", "linear-probe", "--checkpoint", str(hf_dir), "--train",
                             str(tmp_path / "train"), "--test", str(tmp_path / "zs")),
    }
    for name, res in alone.items():
        assert results["tasks"][name]["result"] == res, name
    md = (out / RESULTS_MD).read_text()
    assert md == printed.split("results: ")[0]
    assert f"| coco | i2t_r1 | {100 * alone['coco']['i2t_r1']:.2f} |\n" in md and "paper" not in md
    assert f"| shapes_probe | top1 | {100 * alone['shapes_probe']['top1']:.2f} |" in md
    # the published model's conversion (here forced, as the test has no hub) gets the paper column and citation
    assert main(["eval", "suite", "--checkpoint", str(hf_dir), "--config", str(cfg), "--out", str(out),
                 "--paper"]) == 0
    md = capsys.readouterr().out
    assert f"| coco | i2t_r1 | {100 * alone['coco']['i2t_r1']:.2f} | 42.74 |" in md
    assert f"| coco | t2i_r5 | {100 * alone['coco']['t2i_r5']:.2f} | |" in md
    assert "Paper figures: the paper, its retrieval table" in md


def test_conversion_detected_and_shipped_config_loads(hf_dir, tmp_path):  # noqa: F811
    assert is_conversion_of("facebook/flava-full", "facebook/flava-full")
    assert not is_conversion_of(hf_dir, "facebook/flava-full")
    saved = tmp_path / "converted"
    shutil.copytree(hf_dir, saved)
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(dict(cfg, _name_or_path="facebook/flava-full")))
    assert is_conversion_of(saved, "facebook/flava-full")
    shipped = load_suite(ROOT / "configs" / "eval.toml")
    assert [t.kind for t in shipped.task] == ["retrieval", "retrieval", "zeroshot", "linear_probe"]
    assert all("cite" in t.paper for t in shipped.task if t.paper)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[task]]\nname = "x"\nkind = "retrieval"\ndata = ["d"]\n[task.paper]\ntop1 = 1.0\n')
    from pmd.config_loader import ConfigError

    with pytest.raises(ConfigError, match="not among"):
        load_suite(bad)
