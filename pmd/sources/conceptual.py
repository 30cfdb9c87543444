"""Conceptual Captions 3M (`caption TAB url`) and Conceptual 12M (`url TAB caption`): two columns, no header.

Neither file has row ids: the row's line number in its file is its id, and the split is named by the file
(CC3M ships `Train_GCC-training.tsv` and `Validation_GCC-1.1.0-Validation.tsv`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

from pmd.sources.base import Pair, Reason, Record, Reject, SourceAdapter, decode_line, meta_json, reject
from pmd.sources.inputs import iter_lines
from pmd.text import clean_caption


def _split_of(input_file: str) -> str:
    name = Path(input_file.split("!")[-1]).name.lower()
    if "validation" in name or name.startswith("val"):
        return "validation"
    if "test" in name:
        return "test"
    return "train"


def _file_id(input_file: str) -> str:
    """The file's stem without compression suffixes: part of the key, so two files never collide."""
    name = Path(input_file.split("!")[-1]).name
    for suffix in (".gz", ".bz2", ".zip", ".tsv", ".txt", ".csv"):
        name = name.removesuffix(suffix)
    return name


class _TwoColumnTsv(SourceAdapter):
    line_records = True
    url_column: ClassVar[int]
    #: Whether the key carries the file name (CC3M has two files whose line numbers overlap).
    key_has_file: ClassVar[bool]

    def prepare(self, inputs: Sequence[Path]) -> None:
        """Nothing to load: a record converts from itself and the options."""
        return None

    def records(self, inputs: Sequence[Path]) -> Iterator[Record]:
        for path in inputs:
            yield from iter_lines(path)

    def convert(self, record: Record, context: None) -> Iterator[Pair | Reject]:
        line = decode_line(record)
        if isinstance(line, Reject):
            yield line
            return
        # The URL never holds a tab; a caption may. So the URL column is split off and the caption keeps the rest.
        fields = line.rsplit("\t", 1) if self.url_column == 1 else line.split("\t", 1)
        if len(fields) != 2:
            yield reject(record, Reason.WRONG_FIELD_COUNT, f"expected 2 tab-separated fields, got {len(fields)}")
            return
        url = fields[self.url_column].strip()
        caption = clean_caption(fields[1 - self.url_column])
        key = (f"{self.name}/{_file_id(record.input_file)}/{record.position}" if self.key_has_file
               else f"{self.name}/{record.position}")
        if not url.lower().startswith(("http://", "https://")):
            yield reject(record, Reason.NO_URL, f"not an http(s) URL: {url[:100]!r}", key=key)
            return
        if not caption:
            yield reject(record, Reason.EMPTY_TEXT, key=key)
            return
        yield Pair(
            key=key,
            text=caption,
            split=_split_of(record.input_file),
            meta=meta_json({"line": record.position, "file": Path(record.input_file).name}),
            image_url=url,
        )


class ConceptualCaptionsAdapter(_TwoColumnTsv):
    name = "conceptual_captions"
    inputs_help = "Train_GCC-training.tsv and/or Validation_GCC-1.1.0-Validation.tsv (caption TAB url)"
    url_column = 1
    key_has_file = True


class Conceptual12mAdapter(_TwoColumnTsv):
    name = "conceptual_12m"
    inputs_help = "cc12m.tsv (url TAB caption)"
    url_column = 0
    key_has_file = False
