"""A small synthetic PMD in the exact upstream formats, whose captions describe their images.

Images are coloured shapes (a red circle, a blue square ...) on plain backgrounds, so that a tiny model can learn
the pairing in minutes on a CPU. The metadata files are written exactly as the upstream publishers do (Karpathy
COCO JSON with its images in train2014/val2014 zips, Conceptual Captions TSV, the 25-field YFCC100M TSV with
URL-encoded English and non-English text, RedCaps annotation JSON), so the whole real pipeline runs on them.
URL-based images are written to a folder that `pmd_demo.serve` serves on 127.0.0.1; a few URLs are broken on purpose
(missing, truncated, too small, not an image) to show the failure accounting.
"""

from __future__ import annotations

import json
import random
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from pmd_demo.drawings import COLOURS, SHAPES, Drawing, draw, jpeg

GERMAN = {"red": "roter", "green": "grüner", "blue": "blauer", "yellow": "gelber", "purple": "lila",
          "orange": "oranger"}
GERMAN_SHAPES = {"circle": "Kreis", "square": "Würfel", "triangle": "Keil"}
BROKEN_KINDS = ("missing", "truncated", "tiny", "html")


@dataclass
class SyntheticCorpus:
    """Where the generated files are, and what a build of them must give (for checks and the demo's summary)."""

    root: Path
    images_dir: Path  # served over HTTP: the URL sources' images
    inputs: dict[str, list[Path]] = field(default_factory=dict)  # source -> upstream metadata files
    archives: dict[str, list[Path]] = field(default_factory=dict)  # source -> image archives (--images)
    broken_urls: dict[str, str] = field(default_factory=dict)  # url path -> kind of breakage
    expected_rejects: dict[str, int] = field(default_factory=dict)  # by the source's own filters


class _Drawer:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.counter = 0

    def next(self) -> Drawing:
        self.counter += 1
        return Drawing(self.rng.choice(list(COLOURS)), self.rng.choice(SHAPES), self.rng.getrandbits(32))


def _write_image(images_dir: Path, name: str, d: Drawing, size: int) -> str:
    (images_dir / name).write_bytes(jpeg(draw(d, size)))
    return name


def generate(root: Path, base_url: str, images: int = 120, seed: int = 0, size: int = 96,
             broken_every: int = 15) -> SyntheticCorpus:
    """Write COCO (Karpathy + zips), CC3M, YFCC100M and RedCaps inputs under `root`, about `images` images each.

    `base_url` is where `root/http` will be served (e.g. http://127.0.0.1:PORT). Every `broken_every`-th URL image
    is broken in one of the BROKEN_KINDS ways.
    """
    root = Path(root)
    http = root / "http"
    http.mkdir(parents=True, exist_ok=True)
    corpus = SyntheticCorpus(root=root, images_dir=http)
    drawer = _Drawer(seed)
    base_url = base_url.rstrip("/")

    def url_image(prefix: str, i: int, d: Drawing) -> str:
        name = f"{prefix}_{i:05d}.jpg"
        if broken_every and i % broken_every == broken_every - 1:
            kind = BROKEN_KINDS[(i // broken_every) % len(BROKEN_KINDS)]
            corpus.broken_urls[f"/{name}"] = kind
            data = jpeg(draw(d, size))
            if kind == "truncated":
                (http / name).write_bytes(data[: len(data) // 3])
            elif kind == "tiny":
                (http / name).write_bytes(jpeg(draw(d, 1)))
            elif kind == "html":
                (http / name).write_bytes(b"<html><body>Not an image</body></html>")
            # "missing": no file, the server answers 404
        else:
            _write_image(http, name, d, size)
        return f"{base_url}/{name}"

    # COCO: Karpathy JSON, five captions an image, images inside train2014.zip / val2014.zip.
    coco_dir = root / "coco"
    coco_dir.mkdir(exist_ok=True)
    records = []
    splits = ["train"] * 6 + ["restval"] * 2 + ["val", "test"]
    zips = {"train2014": zipfile.ZipFile(coco_dir / "train2014.zip", "w"),
            "val2014": zipfile.ZipFile(coco_dir / "val2014.zip", "w")}
    sentid = 1000
    combos = [(c, s) for s in SHAPES for c in COLOURS]
    test_images = 0
    for i in range(images):
        d = drawer.next()
        split = splits[i % len(splits)]
        if split == "test":  # held-out images cycle through every colour and shape, so their captions differ
            d = Drawing(*combos[test_images % len(combos)], d.seed)
            test_images += 1
        folder = "train2014" if split == "train" else "val2014"
        cocoid = 100000 + i
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        zips[folder].writestr(f"{folder}/{filename}", jpeg(draw(d, size)))
        sentences = []
        for v in range(5):
            raw = d.caption(v) + (". " if v % 2 else "")
            sentences.append({"tokens": raw.lower().strip(" .").split(), "raw": raw, "imgid": i, "sentid": sentid})
            sentid += 1
        records.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences], "filename": filename,
                        "imgid": i, "split": split, "sentences": sentences, "cocoid": cocoid})
    for z in zips.values():
        z.close()
    (coco_dir / "dataset_coco.json").write_text(json.dumps({"images": records, "dataset": "coco"}))
    corpus.inputs["coco"] = [coco_dir / "dataset_coco.json"]
    corpus.archives["coco"] = [coco_dir / "train2014.zip", coco_dir / "val2014.zip"]

    # Conceptual Captions: caption TAB url, no header.
    cc = root / "Train_GCC-training.tsv"
    with open(cc, "w", encoding="utf-8") as f:
        for i in range(images):
            d = drawer.next()
            f.write(f"{d.caption(i)}\t{url_image('cc', i, d)}\n")
    corpus.inputs["conceptual_captions"] = [cc]

    # YFCC100M: 25 fields, URL-encoded; English descriptions, German ones with an English title to fall back to,
    # German-only rows (rejected), two-word rows (rejected) and videos (rejected).
    yfcc = root / "yfcc100m_dataset"
    rejected = 0
    with open(yfcc, "w", encoding="utf-8") as f:
        for i in range(images):
            d = drawer.next()
            kind = i % 10
            title, description, marker = "", "", "0"
            if kind < 5:
                description = f"{d.caption(i)} that I drew this morning"
            elif kind < 7:
                description = f"Ein {GERMAN[d.colour]} {GERMAN_SHAPES[d.shape]} auf einem hellen Hintergrund"
                title = f"{d.caption(0)} drawing"
            elif kind == 7:
                description = f"Ein {GERMAN[d.colour]} {GERMAN_SHAPES[d.shape]} auf einem hellen Hintergrund"
                title = "Zeichnung"
                rejected += 1
            elif kind == 8:
                title = f"{d.colour} {d.shape}"
                rejected += 1
            else:
                description = d.caption(i)
                marker = "1"
                rejected += 1
            photo = 5_000_000 + i
            url = url_image("yfcc", i, d)
            fields = [str(i), str(photo), f"{random.Random(photo).getrandbits(128):032x}", "12345678@N00",
                      "demo+user", "2012-02-16 09:56:37.0", "1329386197", "Canon+PowerShot+ELPH+310+HS",
                      urllib.parse.quote_plus(title), urllib.parse.quote_plus(description), "shapes,drawing", "",
                      "", "", "", f"http://www.flickr.com/photos/12345678@N00/{photo}/", url,
                      "Attribution License", "http://creativecommons.org/licenses/by/2.0/", "1", "1",
                      "abcdef1234", "abcdef1234", "jpg", marker]
            f.write("\t".join(fields) + "\n")
    corpus.inputs["yfcc100m"] = [yfcc]
    corpus.expected_rejects["yfcc100m"] = rejected

    # RedCaps: annotations/{subreddit}_{year}.json.
    rc_dir = root / "annotations"
    rc_dir.mkdir(exist_ok=True)
    annotations = []
    for i in range(images):
        d = drawer.next()
        annotations.append({"image_id": f"rc{i:05d}", "author": "demo_user", "url": url_image("rc", i, d),
                            "raw_caption": f"I made a {d.colour} {d.shape}",
                            "caption": f"i made a {d.colour} {d.shape}",
                            "subreddit": "shapes", "score": 10 + i, "created_utc": 1_600_000_000 + i,
                            "permalink": f"/r/shapes/comments/{i}/", "crosspost_parents": None})
    rc = rc_dir / "shapes_2020.json"
    rc.write_text(json.dumps({"info": {"subreddit": "shapes", "year": 2020}, "annotations": annotations}))
    corpus.inputs["red_caps"] = [rc]
    return corpus
