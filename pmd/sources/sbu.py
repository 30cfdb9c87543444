"""SBU Captions: 1M Flickr photos with their user-written captions.

Two published layouts of the same rows, either of which is one complete copy of the source:
- `sbu-captions-all.json` (also the only member of `sbu-captions-all.tar.gz`, the current download): one JSON object
  of three parallel arrays `image_urls`, `user_ids`, `captions`. The file is read as three lockstep ijson streams
  (the input is opened three times), so memory stays constant whatever the key order inside the object.
- the older pair `SBU_captioned_photo_dataset_urls.txt` + `SBU_captioned_photo_dataset_captions.txt`: line i of one
  belongs to line i of the other. No user ids.

Neither layout has row ids: the 0-based row index is the id (`sbu_captions/{index}`), so exactly one copy may be given.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterator, Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

from pmd.sources.base import InputError, Pair, Reason, Record, Reject, SourceAdapter, meta_json, reject
from pmd.sources.inputs import (decode_utf8, input_location, input_name, iter_json_items, iter_lines, require_file,
                                strip_compression_suffix)
from pmd.text import clean_caption

# (JSON array, record field), in the order a row is assembled.
_ARRAYS: tuple[tuple[str, str], ...] = (("image_urls", "image_url"), ("captions", "caption"), ("user_ids", "user_id"))
_ARCHIVE_MEMBER = "*.json"

# Flickr static URLs: .../{server}/{photo id}_{secret}[_{size}].{ext}, e.g.
# http://static.flickr.com/2723/4385058960_b0f291553e.jpg
_FLICKR_FILE = re.compile(r"(\d+)_[0-9a-fA-F]+(?:_[A-Za-z0-9]+)?\.[A-Za-z0-9]+")


def flickr_photo_id(url: str) -> str | None:
    """The photo id of a Flickr static image URL, or None when the URL is not one."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return None
    if "flickr.com" not in (parts.hostname or ""):
        return None
    match = _FLICKR_FILE.fullmatch(parts.path.rsplit("/", 1)[-1])
    return match.group(1) if match else None


def _input_kind(path: Path) -> str | None:
    name = input_name(path).lower()
    base = strip_compression_suffix(name)
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".zip")) or base.endswith(".json"):
        return "json"
    if base.endswith("urls.txt"):
        return "urls"
    if base.endswith("captions.txt"):
        return "captions"
    return None


def _encodable(text: str) -> bool:
    """False for strings holding lone surrogates (JSON `\\ud83d` escapes): not writable as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(value: Any) -> Any:
    return value.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(value, str) else value


class SbuAdapter(SourceAdapter):
    name = "sbu_captions"
    inputs_help = ("sbu-captions-all.tar.gz or sbu-captions-all.json, or the pair SBU_captioned_photo_dataset_urls.txt "
                   "+ SBU_captioned_photo_dataset_captions.txt")

    def prepare(self, inputs: Sequence[Path]) -> None:
        """Nothing to load: a record converts from itself and the options."""
        return None

    def records(self, inputs: Sequence[Path]) -> Iterator[Record]:
        by_kind: dict[str, list[Path]] = {"json": [], "urls": [], "captions": []}
        for path in map(input_location, inputs):
            kind = _input_kind(path)
            if kind is None:
                raise InputError(path, f"not an SBU Captions input; expected {self.inputs_help}")
            by_kind[kind].append(require_file(path))
        given = [p for paths in by_kind.values() for p in paths]
        if not given:
            return
        # Row indices are the keys: two copies of the source would collide, and half a pair has no rows.
        if by_kind["json"]:
            if len(given) > 1:
                raise InputError(given[1], f"give exactly one copy of SBU Captions (already have {given[0]})")
            yield from self._json_records(by_kind["json"][0])
            return
        urls, captions = by_kind["urls"], by_kind["captions"]
        if len(urls) != 1 or len(captions) != 1:
            raise InputError(given[0], "the text layout needs exactly one *_urls.txt and one *_captions.txt file "
                                       f"(got {len(urls)} and {len(captions)})")
        yield from self._text_records(urls[0], captions[0])

    def _json_records(self, path: Path) -> Iterator[Record]:
        streams = [iter_json_items(path, f"{array}.item", _ARCHIVE_MEMBER) for array, _ in _ARRAYS]
        try:
            member: str | None = None
            for items in zip_longest(*streams):
                if any(item is None for item in items):
                    # The exhausted arrays ended at this index; count what is left of the others (constant memory).
                    base = next(item.position for item in items if item is not None)
                    counts = [base if item is None else base + 1 + sum(1 for _ in stream)
                              for item, stream in zip(items, streams)]
                    lengths = ", ".join(f"{array} has {n}" for (array, _), n in zip(_ARRAYS, counts))
                    raise InputError(member or path, f"parallel arrays of different lengths: {lengths} elements")
                first = items[0]
                if member is None:
                    member = first.input_file
                if any(item.input_file != member for item in items):
                    raise InputError(path, f"more than one JSON file in the archive ({member} and another)")
                yield Record(member, first.position, {field: item.raw for (_, field), item in zip(_ARRAYS, items)})
        finally:
            for stream in streams:
                stream.close()

    def _text_records(self, urls_path: Path, captions_path: Path) -> Iterator[Record]:
        urls, captions = iter_lines(urls_path), iter_lines(captions_path)
        try:
            for url, caption in zip_longest(urls, captions):
                if url is None or caption is None:
                    done = (url or caption).position - 1  # type: ignore[union-attr]
                    n_urls = done + (0 if url is None else 1 + sum(1 for _ in urls))
                    n_captions = done + (0 if caption is None else 1 + sum(1 for _ in captions))
                    raise InputError(captions_path, f"{n_captions} lines, but {urls_path} has {n_urls}: "
                                                    "the two files must have one line per photo")
                yield Record(caption.input_file, caption.position, (url.raw, caption.raw))
        finally:
            urls.close()
            captions.close()

    def convert(self, record: Record, context: None) -> Iterator[Pair | Reject]:
        raw = record.raw
        if isinstance(raw, tuple):  # the text layout: (url line, caption line) as bytes, position = 1-based line
            index = record.position - 1
            shown = Record(record.input_file, record.position, raw[0] + b"\t" + raw[1])
            url, caption, user_id = decode_utf8(raw[0]), decode_utf8(raw[1]), None
            key = f"{self.name}/{index}"
            if url is None or caption is None:
                yield reject(shown, Reason.INVALID_UTF8, "url line" if url is None else "caption line", key=key)
                return
        elif isinstance(raw, dict):  # the JSON layout, position = 0-based array index
            index = record.position
            url, caption, user_id = raw.get("image_url"), raw.get("caption"), raw.get("user_id")
            key = f"{self.name}/{index}"
            shown = record
            bad = [f for f in ("image_url", "caption", "user_id")
                   if isinstance(raw.get(f), str) and not _encodable(raw[f])]
            if bad:
                shown = Record(record.input_file, record.position, {k: _printable(v) for k, v in raw.items()})
                yield reject(shown, Reason.INVALID_UTF8, f"unpaired surrogate in {', '.join(bad)}", key=key)
                return
        else:
            yield reject(record, Reason.MALFORMED, f"unexpected record type {type(raw).__name__}")
            return
        if not isinstance(url, str) or not url.strip().lower().startswith(("http://", "https://")):
            yield reject(shown, Reason.NO_URL, f"not an http(s) URL: {str(url)[:100]!r}", key=key)
            return
        url = url.strip()
        if caption is not None and not isinstance(caption, str):
            yield reject(shown, Reason.MALFORMED, f"caption is a {type(caption).__name__}, not a string", key=key)
            return
        text = clean_caption(caption or "")
        if not text:
            yield reject(shown, Reason.EMPTY_TEXT, key=key)
            return
        meta: dict[str, Any] = {"index": index}
        if user_id is not None:
            meta["user_id"] = user_id
        photo_id = flickr_photo_id(url)
        if photo_id is not None:
            meta["photo_id"] = photo_id
        yield Pair(key=key, text=text, split="train", meta=meta_json(meta), image_url=url)
