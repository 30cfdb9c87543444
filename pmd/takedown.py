"""`pmd takedown`: remove every pair a removal request names from a built corpus, keeping it consistent.

A request is a list of image URLs, pair keys or image sha256 digests (one per line; blank lines and `#` comments
ignored). Applying it:
1. records the request as received: OUT/takedowns/ID.json (ID = sha256 of the list file), so that later builds
   apply it again (`load_filter`) and an auditor sees what was asked and when;
2. finds the matching pairs with a metadata-only scan of the shards, into a journal (OUT/takedowns/ID.pending.parquet);
3. rewrites only the shards that hold a match: the other rows in the same order, each row group kept as a row group
   (minus its removed rows);
4. writes the removed pairs as failures with stage and reason `takedown` (failures/takedown-ID12-NNN.parquet)
   and keeps their full metadata, every shard column but the image, in OUT/takedowns/ID-NNN.removed.parquet: the
   permanent record of what was removed, and what a later `pmd build --retry-failures` needs to take the shortened
   shards back to pieces (pmd.final.unbuild_shard);
5. updates the manifest last (shard digests, the accounting, unique images, and the request under `takedowns`),
   then drops the journal.
Every file is replaced atomically and the journal makes a rerun after kill -9 finish the same request with the
same result; a request already applied changes nothing.

The build applies every recorded request too (`load_filter`): the final phase turns the kept rows a request names
into failures with stage and reason `takedown`, so a retry or a rebuild never brings a removed pair back, and the
manifest it writes lists the requests again (`manifest_entries`) with their rows in failures/SOURCE.parquet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pmd import atomic, card, schema, storage
from pmd.manifest import FAILURES_DIR, Manifest
from pmd.reasons import Stage
from pmd.shards import describe_file, sum_counts, write_shard_file

log = logging.getLogger(__name__)

TAKEDOWN_DIR = "takedowns"
TAKEDOWN = Stage.TAKEDOWN  # the failure stage (and reason, Reason.TAKEDOWN: the same string) of a removed pair
KINDS: dict[str, str] = {"urls": schema.IMAGE_URL, "keys": schema.KEY, "image_sha256": schema.IMAGE_SHA256}
_SHA256_HEX = frozenset("0123456789abcdef")
_APPLICATION = b"pmd.takedown.application"  # journal metadata: len(manifest["takedowns"]) when it was made
_JOURNAL_COLUMNS = list(schema.SHARD_METADATA_COLUMNS)  # every shard column but the image
REMOVED_SUFFIX = ".removed.parquet"


class TakedownError(ValueError):
    pass


@dataclass(frozen=True)
class TakedownRequest:
    kind: str  # a key of KINDS
    values: tuple[str, ...]  # sorted, unique
    list_sha256: str  # of the list file as given
    reason: str = ""

    @property
    def id(self) -> str:
        return self.list_sha256

    def to_dict(self) -> dict:
        return {"kind": self.kind, "list_sha256": self.list_sha256, "reason": self.reason,
                "values": list(self.values)}

    @classmethod
    def from_dict(cls, d: dict) -> TakedownRequest:
        return cls(d["kind"], tuple(d["values"]), d["list_sha256"], d.get("reason", ""))


def read_request(kind: str, path: Path | str, reason: str = "") -> TakedownRequest:
    """A removal list as the user gives it (a local file or a URL on object storage); a malformed line is an error
    naming the line, never skipped."""
    if kind not in KINDS:
        raise TakedownError(f"takedown list kind must be one of {sorted(KINDS)}, not {kind!r}")
    data = storage.read_bytes(path)
    values = set()
    for number, raw in enumerate(data.decode("utf-8", errors="strict").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if kind == "image_sha256":
            line = line.lower()
            if len(line) != 64 or not set(line) <= _SHA256_HEX:
                raise TakedownError(f"{path}:{number}: {raw!r} is not a hex sha256")
        elif kind == "urls" and not line.startswith(("http://", "https://")):
            raise TakedownError(f"{path}:{number}: {raw!r} is not an http(s) URL")
        values.add(line)
    if not values:
        raise TakedownError(f"{path}: the list names nothing")
    return TakedownRequest(kind, tuple(sorted(values)), hashlib.sha256(data).hexdigest(), reason)


def _manifest(out: Path) -> dict:
    return Manifest.read(out).data


def _failures_name(request: TakedownRequest, application: int) -> str:
    return f"{FAILURES_DIR}/{TAKEDOWN}-{request.id[:12]}-{application:03d}.parquet"


def _removed_name(request: TakedownRequest, application: int) -> str:
    return f"{TAKEDOWN_DIR}/{request.id}-{application:03d}{REMOVED_SUFFIX}"


def _find(out: Path, manifest: dict, request: TakedownRequest) -> pa.Table:
    """The pairs the request names, in shard order, with the shard they are in (metadata columns only)."""
    column = KINDS[request.kind]
    wanted = pa.array(request.values, pa.string())
    found = []
    for entry in manifest["shards"]:
        table = pq.read_table(out / entry["file"], columns=_JOURNAL_COLUMNS)
        hits = table.filter(pc.is_in(table.column(column), value_set=wanted))
        if hits.num_rows:
            found.append(hits.append_column("shard", pa.array([entry["file"]] * hits.num_rows, pa.string())))
    schema_ = pa.schema([*(schema.SHARD_SCHEMA.field(c) for c in _JOURNAL_COLUMNS), pa.field("shard", pa.string())])
    return pa.concat_tables(found).cast(schema_) if found else schema_.empty_table()


def _rewrite(path: Path, drop_keys: pa.Array) -> int:
    """The shard without `drop_keys`, row groups kept; returns the rows removed (0: nothing to do)."""
    parquet = pq.ParquetFile(path)
    groups, removed = [], 0
    for i in range(parquet.num_row_groups):
        group = parquet.read_row_group(i)
        keep = pc.invert(pc.is_in(group.column(schema.KEY), value_set=drop_keys))
        kept = group.filter(keep)
        removed += group.num_rows - kept.num_rows
        if kept.num_rows:
            groups.append(kept)
    if removed:
        atomic.write_parquet_row_groups(groups, path, parquet.schema_arrow,
                                        **schema.parquet_options(parquet.schema_arrow.names))
    return removed


def _unique_images(out: Path, manifest: dict, removed: pa.Table) -> tuple[dict[str, int], int]:
    """How many distinct images per source (and overall) vanish: removed digests that no kept row still has."""
    digests = pc.unique(removed.column(schema.IMAGE_SHA256))
    still: dict[str, set[str]] = {}
    anywhere: set[str] = set()
    for entry in manifest["shards"]:
        t = pq.read_table(out / entry["file"], columns=[schema.SOURCE, schema.IMAGE_SHA256])
        t = t.filter(pc.is_in(t.column(schema.IMAGE_SHA256), value_set=digests))
        for source, digest in zip(t.column(schema.SOURCE).to_pylist(), t.column(schema.IMAGE_SHA256).to_pylist()):
            still.setdefault(source, set()).add(digest)
            anywhere.add(digest)
    gone: dict[str, int] = {}
    for source, digest in {(s, d) for s, d in zip(removed.column(schema.SOURCE).to_pylist(),
                                                   removed.column(schema.IMAGE_SHA256).to_pylist())}:
        if digest not in still.get(source, set()):
            gone[source] = gone.get(source, 0) + 1
    total_gone = len(set(digests.to_pylist()) - anywhere)
    return gone, total_gone


def apply(out: Path, request: TakedownRequest) -> dict:
    """Remove what `request` names from the corpus in `out`; returns {rows, shards, applied} (applied False when
    the request had already been applied and nothing changed)."""
    if storage.is_remote(out):
        raise TakedownError(f"{out}: pmd takedown rewrites shards in place and works on a local build; copy the "
                            "build to local disk, apply the request, and copy it back")
    out = Path(out)
    manifest = _manifest(out)
    requests = out / TAKEDOWN_DIR
    record = requests / f"{request.id}.json"
    journal = requests / f"{request.id}.pending.parquet"
    if not record.exists():
        atomic.write_json({**request.to_dict(), "received_at": _now()}, record)
    applied = manifest.get("takedowns", [])

    if journal.exists():
        found = pq.read_table(journal)
        application = int(found.schema.metadata[_APPLICATION])
        if any(t["list_sha256"] == request.id for t in applied[application:]):
            # Killed after the manifest was written (only the journal was left), or a build applied the recorded
            # request since (a build lists every recorded request): nothing left to do.
            journal.unlink()
            return {"rows": 0, "shards": 0, "applied": False}
    else:
        application = len(applied)
        found = _find(out, manifest, request)
        if not found.num_rows and any(t["list_sha256"] == request.id for t in applied):
            return {"rows": 0, "shards": 0, "applied": False}
        found = found.replace_schema_metadata({_APPLICATION: str(application)})
        write_shard_file(found, journal)
    removed_rel = _removed_name(request, application)
    if found.num_rows and not (out / removed_rel).exists():  # durable before any shard loses a row
        write_shard_file(found.replace_schema_metadata(None), out / removed_rel)

    keys = pc.unique(found.column(schema.KEY))
    shards = sorted(set(found.column("shard").to_pylist()))
    for rel in shards:
        _rewrite(out / rel, keys)  # 0 when a killed run had rewritten it already

    failures_rel = _failures_name(request, application)
    failure_rows = pa.table({
        schema.KEY: found.column(schema.KEY), schema.SOURCE: found.column(schema.SOURCE),
        schema.IMAGE_URL: found.column(schema.IMAGE_URL), schema.IMAGE_REF: found.column(schema.IMAGE_REF),
        schema.STAGE: pa.array([TAKEDOWN] * found.num_rows, pa.string()),
        schema.REASON: pa.array([TAKEDOWN] * found.num_rows, pa.string()),
        schema.DETAIL: pa.array([_detail(request)] * found.num_rows, pa.string()),
    }, schema=schema.FAILURE_SCHEMA)
    if found.num_rows:
        write_shard_file(failure_rows, out / failures_rel)

    removed_by_source = dict(sorted(Counter(found.column(schema.SOURCE).to_pylist()).items()))
    gone, total_gone = _unique_images(out, manifest, found) if found.num_rows else ({}, 0)
    entries = {e["file"]: e for e in manifest["shards"]}
    for rel in shards:
        entries[rel] = describe_file(out, rel).to_dict()
    manifest["shards"] = [entries[e["file"]] for e in manifest["shards"]]
    if found.num_rows:
        manifest["failures"] = [*manifest.get("failures", []), describe_file(out, failures_rel).to_dict()]
    for source, n in removed_by_source.items():
        acc = manifest["accounting"][source]
        acc["pairs"] -= n
        acc["failures"] += n
        acc["failures_by_reason"] = sum_counts([acc["failures_by_reason"], {TAKEDOWN: n}])
        if "unique_images" in acc:
            acc["unique_images"] -= gone.get(source, 0)
    totals = manifest.get("totals")
    if totals is not None:
        for k in ("pairs", "failures"):
            totals[k] = sum(a[k] for a in manifest["accounting"].values())
        totals["failures_by_reason"] = sum_counts(a["failures_by_reason"] for a in manifest["accounting"].values())
        if "unique_images" in totals:
            totals["unique_images"] -= total_gone
    manifest.setdefault("takedowns", []).append({
        "list_sha256": request.id, "kind": request.kind, "reason": request.reason, "listed": len(request.values),
        "rows": found.num_rows, "rows_by_source": removed_by_source, "shards_rewritten": len(shards),
        "failures_file": failures_rel if found.num_rows else None, "applied_at": _now()})
    card.write_docs(Manifest(out, manifest))  # the card and croissant.json list the rewritten files
    Manifest(out, manifest).write()  # last: the request is applied once this is on disk
    journal.unlink(missing_ok=True)
    log.info("takedown %s: %d pairs removed from %d shards", request.id[:12], found.num_rows, len(shards))
    return {"rows": found.num_rows, "shards": len(shards), "applied": True}


def recorded(out: Path) -> list[TakedownRequest]:
    """The requests recorded in OUT/takedowns, in the order they were received."""
    records = [json.loads(storage.read_text(p)) for p in storage.list_files(storage.join(out, TAKEDOWN_DIR), ".json")]
    records.sort(key=lambda d: (d.get("received_at", ""), d["list_sha256"]))
    return [TakedownRequest.from_dict(d) for d in records]


@dataclass(frozen=True)
class TakedownFilter:
    """Every recorded request, as the build's final phase applies it (small: the lists as given; picklable)."""

    requests: tuple[TakedownRequest, ...] = ()  # in received order: a row named by several is charged to the first

    def __bool__(self) -> bool:
        return bool(self.requests)

    @cached_property
    def _by_column(self) -> dict[str, dict[str, str]]:
        """column -> value -> id of the first request naming it: one membership test per column, however many
        requests."""
        result: dict[str, dict[str, str]] = {}
        for request in self.requests:
            named = result.setdefault(KINDS[request.kind], {})
            for value in request.values:
                named.setdefault(value, request.id)
        return result

    def match(self, table: pa.Table) -> list[str | None]:
        """Per row of `table` (which has the KINDS columns), the id of the first request naming it, else None."""
        ids: list[str | None] = [None] * table.num_rows
        for column, named in self._by_column.items():
            values = table.column(column)
            hits = pc.indices_nonzero(pc.is_in(values, value_set=pa.array(list(named), pa.string())))
            for i in hits.to_pylist():
                request = named[values[i].as_py()]
                if ids[i] is None or self._rank[request] < self._rank[ids[i]]:
                    ids[i] = request
        return ids

    @cached_property
    def _rank(self) -> dict[str, int]:
        return {r.id: i for i, r in enumerate(self.requests)}

    def detail(self, request_id: str) -> str:
        return _detail(next(r for r in self.requests if r.id == request_id))


def load_filter(out: Path) -> TakedownFilter:
    """What the build must keep out of the corpus: every request recorded in OUT/takedowns."""
    return TakedownFilter(tuple(recorded(out)))


def manifest_entries(takedown_filter: TakedownFilter, rows_by_request: dict[str, dict[str, int]]) -> list[dict]:
    """The manifest's `takedowns` as a build writes them: each recorded request with the rows the build took out
    (`rows_by_request`: request id -> source -> rows), which are in failures/SOURCE.parquet, not a file of their
    own; a build rewrites every shard, so none counts as rewritten by the request."""
    entries = []
    for request in takedown_filter.requests:
        by_source = dict(sorted(rows_by_request.get(request.id, {}).items()))
        entries.append({"list_sha256": request.id, "kind": request.kind, "reason": request.reason,
                        "listed": len(request.values), "rows": sum(by_source.values()), "rows_by_source": by_source,
                        "shards_rewritten": 0, "failures_file": None, "applied_at": _now()})
    return entries


def removed_rows(out: Path, keys: list[str]) -> pa.Table:
    """The saved metadata (OUT/takedowns/*.removed.parquet) of the removed rows with these keys, one row per key."""
    target = pa.schema([schema.SHARD_SCHEMA.field(c) for c in _JOURNAL_COLUMNS])
    files = storage.list_files(storage.join(out, TAKEDOWN_DIR), REMOVED_SUFFIX)
    wanted = pa.array(keys, pa.string())
    found = [t.filter(pc.is_in(t.column(schema.KEY), value_set=wanted)).select(_JOURNAL_COLUMNS).cast(target)
             for t in (pq.read_table(storage.open_input(f), columns=_JOURNAL_COLUMNS) for f in files)]
    table = pa.concat_tables(found) if found else target.empty_table()
    if table.num_rows:  # a key removed twice (two requests) is one row
        first = pl.from_arrow(table).with_row_index("_i").group_by(schema.KEY).agg(pl.col("_i").min())
        table = table.take(pa.array(sorted(first.get_column("_i").to_list()), pa.int64()))
    return table


def _detail(request: TakedownRequest) -> str:
    return f"takedown request {request.id[:12]} ({request.kind})" + (f": {request.reason}" if request.reason else "")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
