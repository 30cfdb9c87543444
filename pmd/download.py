"""URL images of one chunk of candidates, fetched with img2dataset's downloader.

Why not `img2dataset.download(...)` itself: it starts a spawned logger process and a spawned multiprocessing pool on
every call (each re-imports cv2, albumentations and wandb: seconds per call), keeps its resume state in `_stats.json`
files, and its own distributors would fight Ray for the CPUs. Our unit of work is already a chunk run as a Ray task,
so a task runs img2dataset's `Downloader` on the chunk in-process, exactly as img2dataset's own Ray distributor does
(`ray_download(downloader, shard)`): same HTTP client, retries, timeout, user agent, X-Robots-Tag opt-out, sha256 and
parquet output with `status`/`error_message` per row. This relies on img2dataset 1.47.0's `Downloader` signature,
which pyproject pins exactly.

img2dataset is told not to decode or re-encode at all (`disable_all_reencoding=True`): it hands back the bytes as
downloaded, and `pmd.images.process_image` decodes each image exactly once (checks, resize, JPEG encode). Instead
of img2dataset's Parquet writer, a collecting writer hands each image to the caller's `transform` as it arrives, so
processing overlaps the chunk's remaining downloads; the status/error of every row is kept as img2dataset reports
it (`classify_error` maps it to a failure reason).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

log = logging.getLogger(__name__)

# X-Robots-Tag directives that opt an image out of AI training: img2dataset's default list, spelled out so the
# manifest records what was respected.
DEFAULT_DISALLOWED_DIRECTIVES: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")

_KEY_COLUMN = "pmd_key"  # img2dataset reserves `key` for its own sample ids


@dataclass
class DownloadOptions:
    timeout: float = 10.0
    retries: int = 0
    thread_count: int = 64
    user_agent_token: str | None = "pmd"
    disallowed_header_directives: list[str] = field(default_factory=lambda: list(DEFAULT_DISALLOWED_DIRECTIVES))

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError("download timeout must be positive")
        if self.retries < 0:
            raise ValueError("download retries must be >= 0")
        if self.thread_count < 1:
            raise ValueError("download thread_count must be positive")
        self.disallowed_header_directives = [str(d) for d in self.disallowed_header_directives]


@dataclass(frozen=True, slots=True)
class Downloaded:
    key: str
    data: Any  # the downloaded bytes, or what `transform` made of them; None on failure
    reason: str | None  # None on success
    detail: str | None


def _collecting_writer(results: dict, transform: Callable[[bytes], Any] | None) -> type:
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
                results[pmd_key] = Downloaded(pmd_key, transform(img_str) if transform else img_str, None, None)
            else:
                message = meta.get("error_message") or meta.get("status") or "unknown"
                results[pmd_key] = Downloaded(pmd_key, None, classify_error(message), message[:500])

        def close(self):
            pass

    return CollectingWriter


_HTTP = re.compile(r"HTTP Error (\d{3})")


def classify_error(message: str) -> str:
    """img2dataset's free-text `error_message` -> a short, stable failure reason."""
    m = _HTTP.search(message)
    if m:
        return f"http_{m.group(1)}"
    lowered = message.lower()
    if "x-robots-tag" in lowered:
        return "opted_out"
    if "timed out" in lowered or "timeout" in lowered:
        return "timeout"
    if "incompleteread" in lowered or "incomplete read" in lowered:
        return "truncated_body"
    if "redirect" in lowered:
        return "redirect_error"
    if any(s in lowered for s in ("connection refused", "connection reset", "remote end closed", "name or service",
                                   "temporary failure in name resolution", "no route", "urlopen error")):
        return "connection_error"
    return "download_error"


def download_chunk(keys: list[str], urls: list[str], options: DownloadOptions, work_dir: Path,
                   transform: Callable[[bytes], Any] | None = None) -> Iterator[Downloaded]:
    """Download `urls` (one per key) into memory; yields one `Downloaded` per key, in input order.

    `transform`, if given, is applied to each image's bytes as soon as it arrives (it must not raise); its result
    is the `data` of that key. `work_dir` is scratch space for img2dataset's input file; it is removed at the end.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer

    by_key: dict[str, Downloaded] = {}
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
            sample_writer_class=_collecting_writer(by_key, transform),
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
    for key in keys:
        # A row img2dataset did not report is a failure with a reason, never a silent loss.
        yield by_key.get(key) or Downloaded(key, None, "download_error", "img2dataset returned no row")
