"""Secrets stay out of everything pmd writes or prints: logs, progress and summary lines, error messages, the
manifest, failure rows, reports, export listings.

A secret is
- the user:password part of a URL (`https://user:pass@host/...`, `s3://KEY:SECRET@bucket/...`): replaced by `***`
  (`https://***@host/...`), wherever the URL comes from (a source's metadata, --out, an input, an error message);
- the value of an `AWS_*` variable (keys, tokens, profile, role: all but the region, the endpoint and yes/no
  switches, which locate and configure, and which error messages need);
- the value of a storage option (`--storage-option`, PMD_STORAGE_OPTIONS) other than those that only locate the
  store (`NOT_SECRET_OPTIONS`).
`text` replaces each of them with `***`. The values are read from this process's environment when they change
(the command line's storage options are in the environment too: pmd.storage.set_options).

Where: `install` makes every log record of the process pass through `text` (a record factory, so also records
of libraries and of handlers pmd did not make), and the traceback of an unexpected error too; commands print
errors and summaries through `text`; `value` redacts a JSON value (the manifest, an export listing) and
`url_columns` the URL-bearing columns of the candidates and rejects an ingest writes, so a credential in upstream
metadata is never stored: the row is then fetched without it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from pmd.storage import OPTIONS_ENV

MASK = "***"
NOT_SECRET_OPTIONS = frozenset({"endpoint_override", "region", "scheme", "allow_bucket_creation",
                                "allow_bucket_deletion", "force_virtual_addressing", "background_writes",
                                "connect_timeout", "request_timeout", "anonymous", "default_metadata",
                                "project_id"})
_NOT_SECRET_AWS = re.compile(r"REGION|ENDPOINT|METADATA_DISABLED|MAX_ATTEMPTS|RETRY_MODE|CA_BUNDLE|CONFIG_FILE|"
                             r"SHARED_CREDENTIALS_FILE|USE_FIPS|USE_DUALSTACK")
_SWITCHES = frozenset({"", "0", "1", "true", "false", "yes", "no", "on", "off", "none", "null"})
_MIN_SECRET = 4  # shorter values would mask ordinary words and numbers
# scheme://userinfo@ : userinfo holds no '/', so `https://host/@user/x.jpg` is left alone; `:/` too, as a URL
# taken for a path prints (`https:/user:pass@host`). RE2 syntax (pyarrow).
_USERINFO = r"([A-Za-z][A-Za-z0-9+.\-]*:/+)[^/\s@?#\"'<>]+@"
_USERINFO_RE = re.compile(_USERINFO)


def _strings(value: object) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def _secret_values(environ: dict[str, str]) -> list[str]:
    values = [v for k, v in environ.items() if k.startswith("AWS_") and not _NOT_SECRET_AWS.search(k)]
    try:
        options = json.loads(environ.get(OPTIONS_ENV) or "{}")
    except ValueError:
        options = {}
    if isinstance(options, dict):
        values += [s for k, v in options.items() if k not in NOT_SECRET_OPTIONS for s in _strings(v)]
    found = {v for v in values if len(v) >= _MIN_SECRET and v.lower() not in _SWITCHES}
    return sorted(found, key=len, reverse=True)  # longest first: a secret holding another is masked whole


@functools.lru_cache(maxsize=8)
def _pattern(relevant: tuple[tuple[str, str], ...]) -> re.Pattern | None:
    values = _secret_values(dict(relevant))
    return re.compile("|".join(re.escape(v) for v in values)) if values else None


def _current() -> re.Pattern | None:
    return _pattern(tuple(sorted((k, v) for k, v in os.environ.items()
                                 if k.startswith("AWS_") or k == OPTIONS_ENV)))


def text(message: object) -> str:
    """`message` as a string with every secret replaced by `***`."""
    out = _USERINFO_RE.sub(rf"\1{MASK}@", str(message))
    secrets = _current()
    return secrets.sub(MASK, out) if secrets is not None else out


def value(data: object) -> object:
    """A JSON value with every string redacted (keys too)."""
    if isinstance(data, str):
        return text(data)
    if isinstance(data, dict):
        return {text(k): value(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [value(v) for v in data]
    return data


def url_columns(table: pa.Table, columns: Iterable[str]) -> pa.Table:
    """The credentials of URLs in these string columns replaced by `***` (vectorised: RE2 over the column)."""
    for name in columns:
        if name not in table.column_names:
            continue
        i = table.column_names.index(name)
        column = table.column(i)
        if not pc.any(pc.match_substring(column, "@")).as_py():  # the usual case: nothing to look at
            continue
        table = table.set_column(i, table.field(i), pc.replace_substring_regex(column, _USERINFO, rf"\1{MASK}@"))
    return table


_installed = False


def install() -> None:
    """Every log record made in this process from now on carries a redacted message, and an uncaught exception
    prints a redacted traceback (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    make = logging.getLogRecordFactory()
    hook = sys.excepthook

    def redacted_traceback(kind, exc, tb) -> None:
        if not issubclass(kind, Exception):  # KeyboardInterrupt, SystemExit: Python's own way
            hook(kind, exc, tb)
            return
        sys.stderr.write(text("".join(traceback.format_exception(kind, exc, tb))))

    sys.excepthook = redacted_traceback

    def redacted(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logging's to report, unredacted args dropped
            return record
        record.msg, record.args = text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = text(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(redacted)
