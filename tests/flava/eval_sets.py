"""Generated evaluation sets in their published formats: Karpathy split files with image zips/folders, ImageFolder
directories, WebDataset tars and labelled Parquet, all from tests.flava.shards' coloured-shape images."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flava.templates import IMAGENET_TEMPLATES
from tests.archive_files import write_zip

from .shards import CLASSES, make_rows


def labelled(n: int, seed: int = 0, size: int = 32) -> list[tuple[bytes, str]]:
    """``(jpeg, class name)``, the classes cycling through CLASSES."""
    return [(r["image"], json.loads(r["meta"])["label"]) for r in make_rows(n, seed=seed, size=size)]


def write_imagefolder(root: Path, samples) -> Path:
    for i, (img, label) in enumerate(samples):
        d = root / label
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:05d}.jpg").write_bytes(img)
    return root


def imagefolder_order(samples) -> list[tuple[bytes, str]]:
    """The order an image folder is read in: sorted class directories, sorted file names."""
    indexed = sorted(enumerate(samples), key=lambda x: (x[1][1], x[0]))
    return [s for _, s in indexed]


def write_wds(path: Path, samples, classes=CLASSES) -> Path:
    with tarfile.open(path, "w") as tar:
        for i, (img, label) in enumerate(samples):
            for ext, data in (("jpg", img), ("cls", str(classes.index(label)).encode())):
                info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_labelled_parquet(path: Path, samples, as_struct: bool = False) -> Path:
    images = [{"bytes": img, "path": None} for img, _ in samples] if as_struct else [img for img, _ in samples]
    pq.write_table(pa.table({"image": images, "label": [label for _, label in samples]}), path, row_group_size=7)
    return path


def write_karpathy(root: Path, n_test: int = 20, n_train: int = 4, flickr: bool = False, missing: int = 0):
    """A Karpathy split file (COCO's layout, or Flickr30k's with bare file names) and the images (a zip for COCO,
    ``flickr30k-images/`` for Flickr30k); returns ``(json path, image path, [(jpeg, [captions])] of the test split
    whose image is present)``. The last ``missing`` test images are left out of the archive."""
    root.mkdir(parents=True, exist_ok=True)
    rows = make_rows(n_test + n_train, seed=11, size=32)
    records, members, present = [], {}, []
    for i, r in enumerate(rows):
        split = "test" if i < n_test else "train"
        name = f"{i:012d}.jpg" if flickr else f"COCO_val2014_{i:012d}.jpg"
        # distinct captions in the tiny tokenizer's vocabulary (a number would be [UNK]): identical ones tie
        # exactly, and the two evaluators break ties differently
        label = json.loads(r["meta"])["label"]
        caps = [IMAGENET_TEMPLATES[i % 80].format(label), IMAGENET_TEMPLATES[(i + 40) % 80].format(label),
                IMAGENET_TEMPLATES[(i + 20) % 80].format(CLASSES[(i + 1) % len(CLASSES)])][: 1 + i % 3]
        rec = {"filename": name, "imgid": i, "split": split,
               "sentences": [{"raw": c, "tokens": c.split(), "imgid": i, "sentid": 10 * i + j}
                             for j, c in enumerate(caps)]}
        if not flickr:
            rec.update(filepath="val2014", cocoid=1000 + i)
        records.append(rec)
        if split == "test" and i >= n_test - missing:
            continue
        members[(f"flickr30k-images/{name}" if flickr else f"val2014/{name}")] = r["image"]
        if split == "test":
            present.append((r["image"], caps))
    dataset = "flickr30k" if flickr else "coco"
    js = root / f"dataset_{dataset}.json"
    js.write_text(json.dumps({"images": records, "dataset": dataset}))
    if flickr:
        for name, data in members.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        images = root / "flickr30k-images"
    else:
        images = write_zip(root / "val2014.zip", members)
    return js, images, present
