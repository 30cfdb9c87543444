"""Generated inputs for build tests: a Conceptual 12M TSV over the loopback server, a COCO Karpathy file + zip.

Both are small (a few hundred pairs), deterministic, and contain every case the build must account for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pmd_demo.drawings import numbered_jpeg
from tests.httpserver import BAD_CASES, GOOD_REDIRECTS, LoopbackServer
from tests.loopback import LOOPBACK_NETWORKS, toml_allow_line


@dataclass
class UrlFixture:
    tsv: Path
    lines: int  # input rows (ingest: pairs + rejects)
    expected_failures: dict[str, int]  # reason -> rows (download/decode/check + duplicate)
    expected_rejects: int


def make_cc12m(directory: Path, server: LoopbackServer, n_good: int = 150, slow_every: int = 0) -> UrlFixture:
    """`url TAB caption` lines: good images, every bad case, redirects, duplicates, and two ingest rejects.

    slow_every > 0 adds a /sleep.jpg row every `slow_every` good rows (each costs a download timeout: it keeps a
    chunk busy long enough for the kill-and-resume test to land mid-build).
    """
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    failures: dict[str, int] = {}
    for i in range(n_good):
        lines.append(f"{server.url(f'/img/{100 + i}.jpg')}\ta photo of thing number {i}")
        if slow_every and i % slow_every == slow_every - 1:
            lines.append(f"{server.url('/sleep.jpg')}?n={i}\ta slow one {i}")
            failures["timeout"] = failures.get("timeout", 0) + 1
    for path, (_, reason) in BAD_CASES.items():
        lines.append(f"{server.url(path)}\tbad case {path}")
        failures[reason] = failures.get(reason, 0) + 1
    for path in GOOD_REDIRECTS:
        lines.append(f"{server.url(path)}\tredirected {path}")
    # Exact duplicates (same image, same caption) -> failures "duplicate"; same image, new caption -> kept.
    for i in range(5):
        lines.append(f"{server.url(f'/img/{100 + i}.jpg')}\ta photo of thing number {i}")
    failures["duplicate"] = failures.get("duplicate", 0) + 5
    for i in range(3):
        lines.append(f"{server.url(f'/img/{100 + i}.jpg')}\tanother caption for {i}")
    # Ingest rejects: not an http URL, and an empty caption.
    lines.append("ftp://example.org/x.jpg\tno http url")
    lines.append(f"{server.url('/img/1.jpg')}\t   ")
    tsv = directory / "cc12m.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    return UrlFixture(tsv, len(lines), failures, 2)


@dataclass
class CocoFixture:
    karpathy: Path
    zips: list[Path]
    pairs: int
    expected_failures: dict[str, int]
    unique_images: int


def make_mixed_tsv(path: Path, server: LoopbackServer, first_image: int, word: str, n_images: int = 12) -> Path:
    """A Conceptual-Captions-shaped TSV: `n_images` distinct loopback images, one 404 and the fourth image's URL again
    (a failure, and a URL two rows share)."""
    lines = [f"{server.url(f'/img/{first_image + i}.jpg')}\t{word} {i}" for i in range(n_images)]
    lines += [f"{server.url('/status/404')}\tgone", f"{server.url(f'/img/{first_image + 3}.jpg')}\t{word} 3 again"]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_coco(directory: Path, n_images: int = 40) -> CocoFixture:
    """Karpathy `dataset_coco.json` (5 sentences per image) + val2014.zip/train2014.zip holding the images.

    Special images: one missing from the zips, one corrupt, one 16x16 (too small); one image has two identical
    sentences (a duplicate pair).
    """
    directory.mkdir(parents=True, exist_ok=True)
    images = []
    members: dict[str, dict[str, bytes]] = {"val2014": {}, "train2014": {}}
    sentid = 0
    for n in range(n_images):
        folder = "val2014" if n % 2 else "train2014"
        split = ("val", "test", "restval", "train")[n % 4] if folder == "val2014" or n % 4 in (2, 0) else "train"
        cocoid = 1000 + n
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        sentences = []
        for j in range(5):
            raw = f"Image {n} seen the {j}th way."
            if n == 7 and j == 4:
                raw = f"Image {n} seen the 3th way."  # identical to sentence 3: a duplicate pair
            sentences.append({"tokens": raw.lower().split(), "raw": raw, "imgid": n, "sentid": sentid})
            sentid += 1
        images.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences], "filename": filename,
                       "imgid": n, "split": split, "sentences": sentences, "cocoid": cocoid})
        if n == 3:
            continue  # missing member
        data = b"\xff\xd8 garbage, not a jpeg" if n == 5 else numbered_jpeg(n, *((16, 16) if n == 6 else (80, 60)))
        members[folder][f"{folder}/{filename}"] = data
    karpathy = directory / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": images, "dataset": "coco"}))
    zips = []
    for folder, files in members.items():
        path = directory / f"{folder}.zip"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, data in sorted(files.items()):
                zf.writestr(name, data)
        zips.append(path)
    failures = {"missing_member": 5, "decode_error": 5, "too_small": 5, "duplicate": 1}
    return CocoFixture(karpathy, zips, n_images * 5, failures, n_images - 3)


def two_source_config(*, shard_rows: int, chunk_rows: int, seed: int, image_size: int, timeout: float,
                      thread_count: int, executor: str | None = None) -> str:
    """The build config of the URL + archive fixture pair above (in/cc12m.tsv, in/dataset_coco.json + zips)."""
    return (f"shard_rows = {shard_rows}\nchunk_rows = {chunk_rows}\nseed = {seed}\n"
            + (f'executor = "{executor}"\n' if executor else "")
            + f"[image]\nimage_size = {image_size}\n[download]\ntimeout = {timeout}\nthread_count = {thread_count}\n"
            + toml_allow_line()  # the URL source's images are on a loopback server
            + '[[sources]]\nname = "conceptual_12m"\ninputs = ["in/cc12m.tsv"]\n'
            + '[[sources]]\nname = "coco"\ninputs = ["in/dataset_coco.json"]\n'
            + 'images = ["in/val2014.zip", "in/train2014.zip"]\n')


def kill_build_mid_image_stage(cmd: list[str], work: Path, env: dict, chunks: int = 2, timeout_s: float = 120) -> None:
    """Start `pmd build` (cmd), kill -9 its whole process group (driver, raylet, workers) once `chunks` image
    chunks are finished under `work`; fails if the build ends first."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((work / "images").glob("*/chunk-*.arrow"))) >= chunks:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the build finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def url_build_config(source: str, inputs: list[Path], out: Path, **overrides):  # -> pipelines.build.BuildConfig
    """The build config of one URL source whose images are on the tests' loopback servers (`overrides`: dotted
    keys of load_config, e.g. "download.max_per_host"). Where the address guard's loopback allow-list goes."""
    from pipelines.build import load_config

    return load_config(None, {"sources": [{"name": source, "inputs": [str(p) for p in inputs]}], "out": str(out),
                              "progress": False, "download.allow_networks": list(LOOPBACK_NETWORKS), **overrides})
