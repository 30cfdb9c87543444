"""Localized Narratives (COCO, Flickr30k, ADE20k, Open Images): one pair per sentence of a narrative.

Inputs are the upstream caption files from `https://storage.googleapis.com/localized-narratives/annotations/`,
`{dataset}_{split}_captions.jsonl` (possibly .gz/.bz2, or zipped), one JSON object per line:
`{"dataset_id", "image_id", "annotator_id", "caption"}` (the `*_localized_narratives.jsonl` files add
`timed_caption`, `traces` and `voice_recording`; those are read too and the extra fields left out of meta). The split
is named by the file (`train`/`train_v6` -> train, `val`/`validation` -> validation, `test` -> test).

PMD's `*_captions_multi.jsonl` are these narratives split into sentences, and so are the pairs here: the narrative
is split on '.', blank pieces are skipped, each piece becomes `piece.strip() + "."`. Keys are
`{source}/{image_id}/{annotator_id}/{sentence_index}` (0-based over the kept sentences); `meta` keeps the full
narrative as `original_caption` but not the bulky mouse traces, timed words and recording path.

LN-COCO drops every image in Karpathy's val/test (one `decontaminated` reject per narrative, keyed
`{source}/{image_id}/{annotator_id}`), which needs `dataset_coco.json` or `caption_datasets.zip` among the inputs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pmd.sources.base import (InputError, Pair, Reason, Record, Reject, SourceAdapter, decode_line, meta_json,
                              reject)
from pmd.sources.inputs import input_name, iter_lines, parse_json_line, strip_compression_suffix
from pmd.sources.karpathy import (
    KARPATHY_HELP,
    DecontaminationOptions,
    eval_cocoids,
    partition_inputs,
    require_karpathy,
)
from pmd.text import clean_caption

# `coco_train_captions.jsonl`, `open_images_train_v6_captions.jsonl`, `ade20k_validation_captions.jsonl`, ...
_FILE_NAME = re.compile(r"^(?P<dataset>[a-z0-9_]+?)_(?P<split>train_v6|train|validation|val|test)_captions\.jsonl$")
_SPLITS = {"train": "train", "train_v6": "train", "val": "validation", "validation": "validation", "test": "test"}
#: Upstream fields too big (or useless without the audio) to repeat in every sentence's meta.
_DROPPED_FIELDS = frozenset({"caption", "timed_caption", "traces", "voice_recording"})


def split_sentences(narrative: str) -> list[str]:
    """PMD's rule: split on '.', skip blank pieces, each piece stripped and given back its '.'; then cleaned."""
    sentences = []
    for piece in narrative.split("."):
        sentence = clean_caption(piece.strip() + ".") if piece.strip() else ""
        if sentence:
            sentences.append(sentence)
    return sentences


def _member_name(input_file: str) -> str:
    """The upstream file name of an input (the member name for `archive.zip!member`), without compression."""
    return strip_compression_suffix(Path(input_file.split("!")[-1]).name)


def _parse_file_name(input_file: str) -> tuple[str, str] | None:
    """(dataset prefix, upstream split word) from the file name, or None if it is not an LN caption file."""
    match = _FILE_NAME.match(_member_name(input_file))
    return (match["dataset"], match["split"]) if match else None


def _id_text(value: Any) -> str | None:
    """An id field as text for keys and paths (image ids are strings upstream, annotator ids integers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip() and "/" not in value:
        return value.strip()
    return None


class _LocalizedNarratives(SourceAdapter):
    #: The upstream file-name prefix of this dataset (`coco`, `flickr30k`, `ade20k`, `open_images`).
    file_prefix: ClassVar[str]
    #: Upstream split words this dataset publishes (for the error message).
    file_splits: ClassVar[tuple[str, ...]]
    #: Whether Karpathy's split file is one of the inputs (LN-COCO's decontamination).
    takes_karpathy: ClassVar[bool] = False
    #: Options dataclass, or None for a source that takes none (registry convention).
    Options: ClassVar[type | None] = None

    def __init__(self, options: Any = None):
        self.options = options

    # -- inputs ---------------------------------------------------------------------------------------------------

    def _expected(self) -> str:
        return " / ".join(f"{self.file_prefix}_{split}_captions.jsonl" for split in self.file_splits)

    def _check_caption_file(self, path: Path) -> None:
        parsed = _parse_file_name(input_name(path))
        if parsed is None or parsed[0] != self.file_prefix:
            raise InputError(path, f"not an input of {self.name}; expected {self.inputs_help}")

    def _identify(self, inputs: Sequence[Path]) -> tuple[Path | None, list[Path]]:
        """(the Karpathy input or None, the caption files), or the `InputError` naming the input that is wrong."""
        karpathy, captions = partition_inputs(inputs)
        for path in captions:
            self._check_caption_file(path)
        if karpathy is not None and not self.takes_karpathy:
            raise InputError(karpathy, f"not an input of {self.name}; expected {self.inputs_help}")
        if not captions:
            raise InputError(self._expected(), f"no caption file among the inputs of {self.name}; "
                                               f"expected {self.inputs_help}")
        return karpathy, captions

    def prepare(self, inputs: Sequence[Path]) -> frozenset[int] | None:
        """The decontamination ids (LN-COCO; None for the other three, which need nothing)."""
        self._identify(inputs)
        return None

    def records(self, inputs: Sequence[Path]) -> Iterator[Record]:
        _, captions = self._identify(inputs)
        for path in captions:
            # In a zip read only the caption file itself, whatever else the archive holds.
            yield from iter_lines(path, member_pattern=f"*{strip_compression_suffix(input_name(path))}")

    # -- images ---------------------------------------------------------------------------------------------------

    def image(self, image_id: str, split: str) -> tuple[str | None, str | None] | str:
        """(image_url, image_ref) for an image of this dataset, or a string saying why there is none."""
        raise NotImplementedError

    def decontamination_reject(self, record: Record, image_id: str, key: str, context: frozenset[int] | None
                               ) -> Reject | None:
        return None

    # -- conversion -----------------------------------------------------------------------------------------------

    def convert(self, record: Record, context: frozenset[int] | None) -> Iterator[Pair | Reject]:
        parsed = _parse_file_name(record.input_file)
        if parsed is None:  # records() only reads LN caption files; this is a record from somewhere else
            yield reject(record, Reason.MALFORMED, "not from a Localized Narratives caption file")
            return
        split = _SPLITS[parsed[1]]
        line = decode_line(record)
        if isinstance(line, Reject):
            yield line
            return
        try:
            item = parse_json_line(line)
        except ValueError as exc:
            yield reject(record, Reason.MALFORMED, f"invalid JSON ({exc})")
            return
        if not isinstance(item, dict):
            yield reject(record, Reason.MALFORMED, f"line is a JSON {type(item).__name__}, not an object")
            return
        image_id = _id_text(item.get("image_id"))
        annotator_id = _id_text(item.get("annotator_id"))
        if image_id is None or annotator_id is None:
            yield reject(record, Reason.MALFORMED, "missing or invalid 'image_id' or 'annotator_id'")
            return
        narrative_key = f"{self.name}/{image_id}/{annotator_id}"
        caption = item.get("caption")
        if not isinstance(caption, str):
            yield reject(record, Reason.MALFORMED, "missing or non-string 'caption'", key=narrative_key)
            return
        image = self.image(image_id, split)
        if isinstance(image, str):
            yield reject(record, Reason.MALFORMED, image, key=narrative_key)
            return
        contaminated = self.decontamination_reject(record, image_id, narrative_key, context)
        if contaminated is not None:
            yield contaminated
            return
        sentences = split_sentences(caption)
        if not sentences:
            yield reject(record, Reason.EMPTY_TEXT, key=narrative_key)
            return
        image_url, image_ref = image
        base_meta = {k: v for k, v in item.items() if k not in _DROPPED_FIELDS}
        base_meta["original_caption"] = caption
        for index, sentence in enumerate(sentences):
            yield Pair(
                key=f"{narrative_key}/{index}",
                text=sentence,
                split=split,
                meta=meta_json({**base_meta, "sentence_index": index}),
                image_url=image_url,
                image_ref=image_ref,
            )


class LocalizedNarrativesCoco(_LocalizedNarratives):
    """COCO 2017 images (`train2017.zip` / `val2017.zip`); Karpathy val/test images are dropped."""

    name = "localized_narratives__coco"
    inputs_help = (f"coco_train_captions.jsonl and/or coco_val_captions.jsonl, plus {KARPATHY_HELP} "
                   "for decontamination; images: train2017.zip, val2017.zip")
    file_prefix = "coco"
    file_splits = ("train", "val")
    takes_karpathy = True
    Options = DecontaminationOptions

    def __init__(self, options: DecontaminationOptions | None = None):
        super().__init__(options if options is not None else DecontaminationOptions())

    def prepare(self, inputs: Sequence[Path]) -> frozenset[int] | None:
        """Cocoids of Karpathy's val/test images (10,000 ints: about 0.9 MB of heap, 50 kB pickled, measured by
        benchmarks/bench_context_size.py); None with `decontaminate=false`."""
        karpathy, _ = self._identify(inputs)
        return eval_cocoids(require_karpathy(karpathy, self.name)) if self.options.decontaminate else None

    def image(self, image_id: str, split: str) -> tuple[str | None, str | None] | str:
        if not (image_id.isascii() and image_id.isdigit()):
            return f"COCO image_id {image_id!r} is not an integer"
        folder = "train2017" if split == "train" else "val2017"
        return None, f"{folder}/{int(image_id):012d}.jpg"

    def decontamination_reject(self, record: Record, image_id: str, key: str, context: frozenset[int] | None
                               ) -> Reject | None:
        if not self.options.decontaminate:
            return None
        if not isinstance(context, frozenset):
            # Not a bad row but a misuse: converting without the decontamination set would leak test images.
            raise TypeError(f"{self.name}: convert() needs the Karpathy val/test ids prepare() returns, "
                            f"not {type(context).__name__}")
        if int(image_id) in context:
            return reject(record, Reason.DECONTAMINATED, "COCO image in Karpathy val/test", key=key)
        return None


class LocalizedNarrativesFlickr30k(_LocalizedNarratives):
    """Flickr30k images from `flickr30k-images.tar.gz` (manual download)."""

    name = "localized_narratives__flickr30k"
    inputs_help = ("flickr30k_train_captions.jsonl, flickr30k_val_captions.jsonl and/or "
                   "flickr30k_test_captions.jsonl; images: flickr30k-images.tar.gz")
    file_prefix = "flickr30k"
    file_splits = ("train", "val", "test")

    def image(self, image_id: str, split: str) -> tuple[str | None, str | None] | str:
        return None, f"flickr30k-images/{image_id}.jpg"


class LocalizedNarrativesAde20k(_LocalizedNarratives):
    """ADE20k images from `ADEChallengeData2016.zip`."""

    name = "localized_narratives__ADE20k"
    inputs_help = ("ade20k_train_captions.jsonl and/or ade20k_validation_captions.jsonl; "
                   "images: ADEChallengeData2016.zip")
    file_prefix = "ade20k"
    file_splits = ("train", "validation")

    def image(self, image_id: str, split: str) -> tuple[str | None, str | None] | str:
        folder = "training" if split == "train" else "validation"
        return None, f"ADEChallengeData2016/images/{folder}/{image_id}.jpg"


class LocalizedNarrativesOpenImages(_LocalizedNarratives):
    """Open Images, by URL on the public S3 bucket."""

    name = "localized_narratives__openimages"
    inputs_help = ("open_images_train_v6_captions.jsonl, open_images_validation_captions.jsonl and/or "
                   "open_images_test_captions.jsonl")
    file_prefix = "open_images"
    file_splits = ("train_v6", "validation", "test")

    def image(self, image_id: str, split: str) -> tuple[str | None, str | None] | str:
        return f"https://s3.amazonaws.com/open-images-dataset/{split}/{image_id}.jpg", None
