"""Labelled image sets for zero-shot classification and linear probes, in the formats they are published in.

- ImageFolder: ``DIR/CLASS/IMAGE`` (torchvision's layout; ImageNet's val set is ``val/n01440764/*.JPEG``). The
  label is the sub-directory; classes in sorted directory order (ImageNet's wnid order is its class-index order).
- WebDataset tars (``*.tar`` or a directory of them): samples are members sharing a key (the name up to the first
  dot of its base name), an image (``jpg``/``jpeg``/``png``/``webp``) and an integer ``cls``, CLIP_benchmark's
  layout.
- Parquet with a label column (a file or a directory of them): ``image`` as bytes or as a struct with ``bytes``
  (what Hugging Face datasets writes), the label an integer class index or a class name.
- PMD shards without a label column: the row's ``meta[label_key]``, else the longest class name in its caption
  (the held-out half of a build).

Each reader yields ``(image bytes, raw label)``: an int, a str, or None when the sample has none. Turning raw
labels into class indices is the caller's (:class:`LabelMap`), so that the same reader serves a zero-shot class list
and a linear probe's train/test splits.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

from .data import DataError, parquet_file

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
WDS_LABEL_KEY = "cls"
IMAGEFOLDER, WEBDATASET, PARQUET, SHARDS = "imagefolder", "webdataset", "parquet", "shards"
FORMATS = (IMAGEFOLDER, WEBDATASET, PARQUET, SHARDS)
#: ``--classes imagenet``: ImageNet-1k's class names in class-index order, as CLIP prompts them (package data).
IMAGENET = "imagenet"
_CLASSNAMES_FILE = "imagenet_classes.txt"


def imagenet_classes() -> list[str]:
    text = resources.files("flava").joinpath("eval_assets", _CLASSNAMES_FILE).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def load_classes(spec: str) -> list[str]:
    """``imagenet`` (the bundled 1000), a file with one name a line, or a comma-separated list."""
    if spec == IMAGENET:
        return imagenet_classes()
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = [c.strip() for c in spec.split(",") if c.strip()]
    if not names:
        raise DataError(f"no class names in {spec!r}")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise DataError(f"class name(s) given twice: {dup}")
    return names


def load_templates(spec: str | None) -> list[str] | None:
    """``imagenet`` or None (CLIP's 80), ``single`` (one), a file with one template a line, or ``a|b``."""
    from .templates import IMAGENET_TEMPLATES, SINGLE_TEMPLATE

    if spec is None or spec == IMAGENET:
        return list(IMAGENET_TEMPLATES)
    if spec == "single":
        return [SINGLE_TEMPLATE]
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    return spec.split("|")


def detect_format(path: str | os.PathLike, label_column: str = "label") -> str:
    """Which of :data:`FORMATS` a ``--data`` path is (Parquet with ``label_column``: labelled; without: shards)."""
    p = Path(path)
    if str(path).startswith(("s3://", "gs://")):
        return SHARDS
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_file():
        if p.name.endswith(".tar"):
            return WEBDATASET
        if p.suffix == ".parquet":
            return PARQUET if _has_label_column(p, label_column) else SHARDS
        raise DataError(f"{p}: not a .tar (WebDataset) or .parquet file")
    if (p / "manifest.json").is_file() or (p / "shards").is_dir():
        return SHARDS
    parquets = sorted(p.glob("*.parquet"))
    if parquets:
        return PARQUET if _has_label_column(parquets[0], label_column) else SHARDS
    if any(p.glob("*.tar")):
        return WEBDATASET
    if any(d.is_dir() for d in p.iterdir()):
        return IMAGEFOLDER
    raise DataError(f"{p}: neither an image folder (DIR/CLASS/IMAGE), WebDataset tars, Parquet nor a PMD build")


_LABEL_COLUMN = "label"


def _has_label_column(f: Path, column: str | None = None) -> bool:
    return (column or _LABEL_COLUMN) in parquet_file(f).schema_arrow.names


def folder_classes(path: str | os.PathLike) -> list[str]:
    """The class directories of an image folder, sorted (torchvision's ImageFolder order)."""
    return sorted(d.name for d in Path(path).iterdir() if d.is_dir() and not d.name.startswith("."))


def iter_imagefolder(path: str | os.PathLike) -> Iterator[tuple[bytes, str]]:
    for cls in folder_classes(path):
        for root, dirs, files in os.walk(Path(path) / cls):
            dirs.sort()
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    yield (Path(root) / name).read_bytes(), cls


def _tar_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*.tar"))


def iter_webdataset(path: str | os.PathLike) -> Iterator[tuple[bytes | None, int | None]]:
    """Samples of WebDataset tars, streamed: members sharing a key are one sample (they are stored together)."""

    def sample(fields: dict) -> tuple[bytes | None, int | None]:
        image = next((fields[k] for k in WDS_IMAGE_KEYS if k in fields), None)
        label = None
        if WDS_LABEL_KEY in fields:
            try:
                label = int(fields[WDS_LABEL_KEY].decode().strip())
            except ValueError:
                label = None
        return image, label

    for tar in _tar_files(Path(path)):
        key, fields = None, {}
        try:
            with tarfile.open(tar, mode="r|*") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    dirname, _, base = member.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    k = f"{dirname}/{stem}"
                    if k != key and fields:
                        yield sample(fields)
                        fields = {}
                    key = k
                    fields[ext.lower()] = archive.extractfile(member).read()
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{tar}: not a readable tar ({e})") from None
        if fields:
            yield sample(fields)


def iter_parquet(path: str | os.PathLike, label_column: str = _LABEL_COLUMN, image_column: str = "image",
                 ) -> Iterator[tuple[bytes | None, int | str | None]]:
    """Rows of Parquet files with an image and a label column, one row group at a time."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("*.parquet"))
    for f in files:
        pf = parquet_file(f)
        missing = [c for c in (image_column, label_column) if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"{f}: no column(s) {missing} (has {pf.schema_arrow.names})")
        for g in range(pf.metadata.num_row_groups):
            t = pf.read_row_group(g, columns=[image_column, label_column]).to_pydict()
            for img, label in zip(t[image_column], t[label_column]):
                if isinstance(img, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
                    img = img.get("bytes")
                yield img, label


def iter_shards(paths: Sequence[str], classes: Sequence[str], label_key: str = "label", split: str | None = None,
                ) -> Iterator[tuple[bytes, str | None]]:
    """PMD shards: ``meta[label_key]`` when it names a class, else the longest class name in the caption."""
    from .evaluate import iter_eval_rows

    by_len = sorted(classes, key=len, reverse=True)
    names = set(classes)
    for _, image, text, meta in iter_eval_rows(list(paths), split=split):
        label = None
        if meta:
            try:
                value = json.loads(meta).get(label_key)
            except (ValueError, AttributeError):
                value = None
            if value in names:
                label = value
        if label is None:
            low = text.lower()
            label = next((c for c in by_len if c.lower() in low), None)
        yield image, label


def iter_labelled(paths: Sequence[str], fmt: str | None = None, classes: Sequence[str] | None = None,
                  label_column: str = _LABEL_COLUMN, split: str | None = None, limit: int | None = None,
                  label_key: str = "label") -> Iterator[tuple[bytes | None, int | str | None]]:
    """``(image bytes, raw label)`` of every sample of ``paths`` (each its own format unless ``fmt``)."""
    n = 0
    shard_paths = []
    for path in paths:
        f = fmt or detect_format(path, label_column)
        if f not in FORMATS:
            raise DataError(f"unknown data format {f!r}; one of {', '.join(FORMATS)}")
        if f == SHARDS:  # shards keep iter_eval_rows' handling of builds and object storage, all paths at once
            shard_paths.append(path)
            continue
        if split is not None:
            raise DataError(f"{path}: --split only applies to PMD shards (a {f} set is one split)")
        it = {IMAGEFOLDER: iter_imagefolder, WEBDATASET: iter_webdataset}.get(f)
        rows = it(path) if it else iter_parquet(path, label_column)
        for row in rows:
            yield row
            n += 1
            if limit is not None and n >= limit:
                return
    if shard_paths:
        if not classes:
            raise DataError("PMD shards carry no class list: give the class names")
        for row in iter_shards(shard_paths, classes, label_key, split=split):
            yield row
            n += 1
            if limit is not None and n >= limit:
                return


class LabelMap:
    """Raw labels -> class indices. Class names map by name; integers are indices (range-checked); an image folder
    whose directory names are not the class names (ImageNet's wnids) maps by sorted directory position, which needs
    as many names as directories."""

    def __init__(self, classes: Sequence[str], folders: Sequence[str] = ()) -> None:
        self.classes = list(classes)
        self.index = {c: i for i, c in enumerate(self.classes)}
        self.folder_index: dict[str, int] = {}
        unknown = [d for d in folders if d not in self.index]
        if unknown:
            if len(folders) != len(self.classes):
                raise DataError(f"{len(folders)} class directories ({', '.join(list(folders)[:3])}...) but "
                                f"{len(self.classes)} class names, and the directories are not class names")
            self.folder_index = {d: i for i, d in enumerate(folders)}

    def __call__(self, raw: int | str | None) -> int | None:
        if raw is None or isinstance(raw, bool):
            return None
        if isinstance(raw, int):
            return raw if 0 <= raw < len(self.classes) else None
        if raw in self.folder_index:
            return self.folder_index[raw]
        return self.index.get(raw)


def folder_names(paths: Sequence[str], fmt: str | None = None) -> list[str]:
    """The class directories of the image folders among ``paths`` (the same set in each, or an error)."""
    found: list[str] | None = None
    for path in paths:
        if (fmt or detect_format(path)) == IMAGEFOLDER:
            names = folder_classes(path)
            if found is not None and names != found:
                raise DataError(f"{path}: class directories differ from the other image folder's")
            found = names
    return found or []
