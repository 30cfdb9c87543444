"""The `img2dataset` download backend: one chunk's URLs fetched with img2dataset's downloader, in-process.

Why not `img2dataset.download(...)` itself: it starts a spawned logger process and a spawned multiprocessing pool on
every call (each re-imports cv2, albumentations and wandb: seconds per call), keeps its resume state in `_stats.json`
files, and its own distributors would fight Ray for the CPUs. Our unit of work is already a chunk run as a Ray task,
so a task runs img2dataset's `Downloader` on the chunk in-process, exactly as img2dataset's own Ray distributor does
(`ray_download(downloader, shard)`): same HTTP client, retries, timeout, user agent, X-Robots-Tag opt-out, sha256 and
parquet output with `status`/`error_message` per row. This relies on img2dataset 1.47.0's `Downloader` signature,
which pyproject pins exactly.

img2dataset is told not to decode or re-encode at all (`disable_all_reencoding=True`): it hands back the bytes as
downloaded, and `pmd.images.process_image` decodes each image exactly once. Instead of img2dataset's Parquet writer,
a collecting writer hands each image to the caller's `transform` as it arrives, so processing overlaps the chunk's
remaining downloads; the status/error of every row is kept as img2dataset reports it (`classify_error` maps it).

What this backend cannot bound (img2dataset's `urlopen(...).read()` reads whole bodies; its timeout is per socket
read): a huge body is held in memory whole before it is found `too_large`; a body that trickles faster than one
byte per `timeout` is read to its end however long that takes; each image opens a new connection (no keep-alive,
no per-host limit or backoff). urllib does not decode `Content-Encoding`, so a body starting with the gzip magic is
inflated here, capped at `max_bytes` (`too_large` past it), as the `http` backend does for a gzip-encoded body.

The address guard (pmd.netguard) cannot sit inside img2dataset's urllib: it neither sees the address urllib
connects to nor the redirect hops. So each URL's host is resolved here before the chunk is handed over (`precheck`,
the process's DNS cache) and a URL whose host resolves only to refused addresses fails `blocked_address` (a name
that does not resolve fails `dns_nxdomain` / `dns_error`; a scheme other than http/https `download_error`, so
urllib never opens a file:// or ftp:// URL). What remains open, and is said in docs/build.md and in a warning when
this backend is chosen: urllib resolves the name a second time (DNS rebinding could answer differently) and follows
redirects to any address.
"""

from __future__ import annotations

import logging
import os
import shutil
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
from urllib3.util import parse_url

from pmd.netguard import AddressGuard, scheme_allowed
from pmd.resolver import check_host, resolver_for

log = logging.getLogger(__name__)

WARNING = ("download backend img2dataset: the address guard only pre-checks each URL's host; img2dataset resolves it "
           "again and follows redirects to any address (docs/build.md, Network safety)")

_KEY_COLUMN = "pmd_key"  # img2dataset reserves `key` for its own sample ids
_GZIP_MAGIC = b"\x1f\x8b"


def _bounded(data: bytes, max_bytes: int) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, None, None), or (None, reason, detail) when the body (or its gzip inflation) exceeds max_bytes."""
    if len(data) > max_bytes:
        return None, "too_large", f"body of {len(data)} bytes > {max_bytes} bytes"
    if data[:2] == _GZIP_MAGIC:
        z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = z.decompress(data, max_bytes + 1)
        except zlib.error:
            return data, None, None  # not gzip after all: process_image says what it is
        if len(out) > max_bytes:
            return None, "too_large", f"gzip body inflates past {max_bytes} bytes"
        return out, None, None
    return data, None, None


def _collecting_writer(results: dict, transform: Callable[[bytes], Any] | None, max_bytes: int,
                       classify: Callable[[str], str]) -> type:
    """A stand-in for img2dataset's sample writer that keeps (or transforms) each image as it arrives.

    img2dataset calls `write` from its download loop while its threads keep fetching, so a `transform` (decode,
    check, resize, encode) overlaps the downloads of the rest of the chunk, and no image is written to disk and
    read back in img2dataset's own format.
    """

    class CollectingWriter:
        def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
            pass

        def write(self, img_str, key, caption, meta):
            pmd_key = meta[_KEY_COLUMN]
            if meta.get("status") == "success" and img_str is not None:
                data, reason, detail = _bounded(img_str, max_bytes)
                if data is not None and transform is not None:
                    data = transform(data)
                results[pmd_key] = (data, reason, detail)
            else:
                message = meta.get("error_message") or meta.get("status") or "unknown"
                results[pmd_key] = (None, classify(message), message[:500])

        def close(self):
            pass

    return CollectingWriter


def precheck(urls: list[str], options) -> list[tuple[str, str] | None]:
    """Per URL: None if it may be handed to img2dataset, else (reason, detail): not http(s), its host does not
    resolve, or every address it resolves to is refused by the guard (`options.allow_networks` admitted)."""
    guard = AddressGuard.from_strings(options.allow_networks)
    resolver = resolver_for(options.resolver, options.dns_timeout, options.dns_concurrency)
    hosts: dict[str, tuple[str, str] | None] = {}
    verdicts: list[tuple[str, str] | None | str] = []
    for url in urls:
        try:
            u = parse_url(url)
        except Exception as e:  # noqa: BLE001 - urllib3's LocationParseError and friends: not a URL we fetch
            verdicts.append(("download_error", f"unparseable URL: {e}"[:500]))
            continue
        if not scheme_allowed(u.scheme) or not u.host:
            verdicts.append(("download_error", f"URL scheme {u.scheme!r} is not fetched (http and https only)"))
            continue
        verdicts.append(u.host)
        hosts.setdefault(u.host, None)

    def judge(host: str) -> tuple[str, str] | None:
        return check_host(host, guard, resolver)

    with ThreadPoolExecutor(max(1, min(options.dns_concurrency, len(hosts)))) as pool:
        for host, verdict in zip(list(hosts), pool.map(judge, list(hosts))):
            hosts[host] = verdict
    return [hosts[v] if isinstance(v, str) else v for v in verdicts]


def download(keys: list[str], urls: list[str], options, work_dir: Path, max_bytes: int,
             transform: Callable[[bytes], Any] | None,
             classify: Callable[[str], str]) -> dict[str, tuple[Any, str | None, str | None]]:
    """key -> (data or transform(data), reason, detail). `work_dir` holds img2dataset's input file, then goes."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer

    results: dict[str, tuple[Any, str | None, str | None]] = {}
    passed_keys, passed_urls = [], []
    for key, url, refused in zip(keys, urls, precheck(urls, options)):
        if refused is None:
            passed_keys.append(key)
            passed_urls.append(url)
        else:
            results[key] = (None, *refused)
    if not passed_keys:
        return results
    keys, urls = passed_keys, passed_urls
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    try:
        table = pa.table({_KEY_COLUMN: pa.array(keys, pa.string()), "url": pa.array(urls, pa.string())})
        # img2dataset's downloader reads its shard as an Arrow IPC file (what its Reader writes to `_tmp`).
        shard_path = work_dir / "input.feather"
        with pa.OSFile(str(shard_path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        resizer = Resizer(image_size=0, resize_mode="no", resize_only_if_bigger=False, disable_all_reencoding=True)
        downloader = Downloader(
            sample_writer_class=_collecting_writer(results, transform, max_bytes, classify),
            resizer=resizer,
            thread_count=options.thread_count,
            save_caption=False,
            extract_exif=False,
            output_folder=str(work_dir),
            column_list=[_KEY_COLUMN, "url"],
            timeout=options.timeout,
            number_sample_per_shard=max(len(keys), 1),
            oom_shard_count=5,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format="jpg",
            retries=options.retries,
            user_agent_token=options.user_agent_token,
            disallowed_header_directives=list(options.disallowed_header_directives),
        )
        # download_shard raises on a broken shard (the Downloader.__call__ wrapper would only print it).
        downloader.download_shard((0, str(shard_path)))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return results
