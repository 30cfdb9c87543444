"""RedCaps: Reddit image posts and their titles, one annotation file per subreddit and year.

Inputs: the annotations zip `redcaps_v1.0_annotations.zip` (members `annotations/{subreddit}_{year}.json`), single
annotation files, or a directory holding them (its `*.json`, else its `annotations/*.json`). Each file is
`{"info": {...}, "annotations": [{image_id, author, url, raw_caption, caption, subreddit, score, created_utc,
permalink, crosspost_parents}, ...]}`, streamed element by element.

Like HF M4's rebuild, the text is `raw_caption` (the post title as written), not the normalised `caption`, which is
kept in `meta`. The key is the Reddit post id (`red_caps/{image_id}`); an annotation file given twice (say, loose
and inside the zip) is refused up front since its keys would repeat.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from pathlib import Path

from pmd.sources.base import InputError, Pair, Reason, Record, Reject, SourceAdapter, meta_json, reject
from pmd import storage
from pmd.sources.inputs import (input_location, input_name, iter_json_items, open_zip, require_file,
                                strip_compression_suffix)
from pmd.text import clean_caption

ZIP_MEMBERS = "annotations/*.json"
_PAIR_FIELDS = ("image_id", "url", "raw_caption")


def _annotation_files(path: Path) -> list[tuple[Path, list[str]]]:
    """(input file, base names of the annotation files it holds) for one input path."""
    if storage.is_dir(path):
        found = (storage.list_files(path, ".json") or storage.list_files(storage.join(path, "annotations"), ".json"))
        if not found:
            raise InputError(path, "directory holds no *.json or annotations/*.json files")
        return [(input_location(p), [input_name(p)]) for p in found]
    require_file(path)
    name = input_name(path)
    if name.lower().endswith(".zip"):
        with open_zip(path) as archive:
            names = [n for n in archive.namelist() if fnmatch.fnmatch(n, ZIP_MEMBERS)]
        if not names:
            raise InputError(path, f"zip archive has no member matching {ZIP_MEMBERS}")
        return [(path, [Path(n).name for n in names])]
    if strip_compression_suffix(name).lower().endswith(".json"):
        return [(path, [strip_compression_suffix(name)])]
    return []


class RedCapsAdapter(SourceAdapter):
    name = "red_caps"
    inputs_help = ("redcaps_v1.0_annotations.zip, annotations/{subreddit}_{year}.json files, "
                   "or a directory of them")

    def prepare(self, inputs: Sequence[Path]) -> None:
        """Nothing to load: a record converts from itself and the options."""
        return None

    def records(self, inputs: Sequence[Path]) -> Iterator[Record]:
        files: list[Path] = []
        seen: dict[str, Path] = {}
        for path in map(input_location, inputs):
            found = _annotation_files(path)
            if not found:
                raise InputError(path, f"not a RedCaps input; expected {self.inputs_help}")
            for file, members in found:
                for member in members:
                    if member in seen:
                        raise InputError(file, f"annotation file {member} given twice (also in {seen[member]})")
                    seen[member] = file
                files.append(file)
        for file in files:
            yield from iter_json_items(file, "annotations.item", member_pattern=ZIP_MEMBERS)

    def convert(self, record: Record, context: None) -> Iterator[Pair | Reject]:
        annotation = record.raw
        if not isinstance(annotation, dict):
            yield reject(record, Reason.MALFORMED, f"annotation is a {type(annotation).__name__}, not an object")
            return
        image_id = annotation.get("image_id")
        if isinstance(image_id, bool) or not isinstance(image_id, (str, int)) or not str(image_id).strip():
            yield reject(record, Reason.MALFORMED, "missing image_id")
            return
        key = f"{self.name}/{str(image_id).strip()}"
        url = annotation.get("url")
        if url is None or url == "":
            yield reject(record, Reason.MALFORMED, "missing url", key=key)
            return
        if not isinstance(url, str) or not url.strip().lower().startswith(("http://", "https://")):
            yield reject(record, Reason.NO_URL, f"not an http(s) URL: {str(url)[:100]!r}", key=key)
            return
        raw_caption = annotation.get("raw_caption")
        if raw_caption is not None and not isinstance(raw_caption, str):
            yield reject(record, Reason.MALFORMED, f"raw_caption is a {type(raw_caption).__name__}", key=key)
            return
        text = clean_caption(raw_caption or "")
        if not text:
            yield reject(record, Reason.EMPTY_TEXT, "empty raw_caption", key=key)
            return
        meta = {k: v for k, v in annotation.items() if k not in _PAIR_FIELDS}
        yield Pair(key=key, text=text, split="train", meta=meta_json(meta), image_url=url.strip())
