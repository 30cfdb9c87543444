"""COCO captions with Karpathy's splits: one pair per sentence of `dataset_coco.json`.

Split: Karpathy train + restval -> `train`, val -> `validation`, test -> `test` (FLAVA trains on `train` only, so
the Karpathy val/test images stay out). Images are not URLs but members of COCO's `train2014.zip` / `val2014.zip`:
`image_ref` is `{filepath}/{filename}`, e.g. `val2014/COCO_val2014_000000391895.jpg`, the member path inside
`val2014.zip`.

A record is one image; it yields one pair (or reject) per sentence, keyed by the globally unique `sentid`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pmd.sources.base import InputError, Pair, Reason, Record, Reject, SourceAdapter, meta_json, reject
from pmd.sources.karpathy import KARPATHY_HELP, SPLIT_MAP, iter_karpathy_images, partition_inputs, require_karpathy
from pmd.text import clean_caption


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _image_problem(item: Any) -> str | None:
    """Why an image record cannot be read, or None."""
    if not isinstance(item, dict):
        return f"image record is a {type(item).__name__}, not an object"
    for field in ("filepath", "filename", "split"):
        if not isinstance(item.get(field), str) or not item[field]:
            return f"missing or non-string '{field}'"
    for field in ("cocoid", "imgid"):
        if not _is_int(item.get(field)):
            return f"missing or non-integer '{field}'"
    if item["split"] not in SPLIT_MAP:
        return f"unknown Karpathy split {item['split']!r}"
    if not isinstance(item.get("sentences"), list):
        return "missing or non-list 'sentences'"
    return None


class CocoAdapter(SourceAdapter):
    name = "coco"
    inputs_help = f"{KARPATHY_HELP}; images: train2014.zip, val2014.zip"

    def prepare(self, inputs: Sequence[Path]) -> None:
        """Nothing to load: a record converts from itself and the options."""
        return None

    def records(self, inputs: Sequence[Path]) -> Iterator[Record]:
        karpathy, others = partition_inputs(inputs)
        if others:
            raise InputError(others[0], f"not an input of {self.name}; expected {self.inputs_help}")
        yield from iter_karpathy_images(require_karpathy(karpathy, self.name, purpose="captions"))

    def convert(self, record: Record, context: None) -> Iterator[Pair | Reject]:
        item = record.raw
        problem = _image_problem(item)
        if problem is not None:
            yield reject(record, Reason.MALFORMED, problem)
            return
        split = SPLIT_MAP[item["split"]]
        image_ref = f"{item['filepath']}/{item['filename']}"
        for index, sentence in enumerate(item["sentences"]):
            # A sentence's reject carries the sentence itself, so the row can be found (and read) again.
            sentence_record = Record(record.input_file, record.position, sentence)
            if not isinstance(sentence, dict) or not _is_int(sentence.get("sentid")):
                yield reject(sentence_record, Reason.MALFORMED, f"sentence {index}: missing or non-integer 'sentid'")
                continue
            key = f"{self.name}/{sentence['sentid']}"
            raw = sentence.get("raw")
            if not isinstance(raw, str):
                yield reject(sentence_record, Reason.MALFORMED, f"sentence {index}: missing or non-string 'raw'",
                             key=key)
                continue
            text = clean_caption(raw)
            if not text:
                yield reject(sentence_record, Reason.EMPTY_TEXT, key=key)
                continue
            yield Pair(
                key=key,
                text=text,
                split=split,
                meta=meta_json({
                    "cocoid": item["cocoid"],
                    "imgid": item["imgid"],
                    "sentid": sentence["sentid"],
                    "filename": item["filename"],
                    "filepath": item["filepath"],
                    "karpathy_split": item["split"],
                    "tokens": sentence.get("tokens"),
                }),
                image_ref=image_ref,
            )
