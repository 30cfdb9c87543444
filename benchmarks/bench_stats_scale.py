"""Peak memory and time of `pmd stats --json` and `pmd verify` at 1M, 4M and 16M rows, old vs new side by side.

"old" is the in-memory code of a git revision (default `main`: pmd/stats.py and pmd.shards.verify as they were
before streaming), loaded from `git show`; "new" is the working tree. Each run is a fresh process that reports
its own peak RSS (ru_maxrss); rounds alternate old and new and the medians are printed. The two variants' JSON
must be identical (checked on every size where both run).

The generated builds carry the real shard schema with 16-byte images (a metadata-only build: the audit never
reads image bytes, and verify's sha256 of a file is a stream, so image size changes neither's memory).
Run: python benchmarks/bench_stats_scale.py [--sizes 1000000 4000000 16000000] [--old-up-to 4000000]
     [--rounds 3] [--workdir bench-out/stats-scale] [--old-rev main]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pmd import schema
from pmd.manifest import Manifest
from pmd.shards import describe_file

SOURCES = ["coco", "conceptual_12m", "red_caps", "yfcc100m", "visual_genome", "wit"]
WORDS = np.array(["a", "dog", "on", "the", "beach", "with", "red", "ball", "sunset", "over", "city", "man"])

CHILD = r"""
import importlib.util, json, resource, sys, time
from pathlib import Path
variant, command, build, out, old_dir = sys.argv[1:6]
import pmd.shards, pmd.stats
if variant == "old":
    def load(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    sys.modules["pmd.stats"] = load("pmd.stats", f"{old_dir}/stats.py")
    pmd.shards.verify = load("old_shards", f"{old_dir}/shards.py").verify
start = time.perf_counter()
if command == "stats":
    result = sys.modules["pmd.stats"].audit(build)
else:
    result = pmd.shards.verify(Path(build))
seconds = time.perf_counter() - start
Path(out).write_text(json.dumps(result))
print(json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def generate(root: Path, rows: int, shard_rows: int = 100_000) -> None:
    """Shards in the build format: keys unique, about half the images carry two captions, 6 sources."""
    rng = np.random.default_rng(0)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    entries, accounting = [], {}
    for shard, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        lengths = rng.integers(3, 25, n)
        words = WORDS[rng.integers(0, len(WORDS), int(lengths.sum()))]
        cuts = np.cumsum(lengths)[:-1]
        texts = [" ".join(w) for w in np.split(words, cuts)]
        sources = np.array(SOURCES)[rng.integers(0, len(SOURCES), n)]
        image_ids = rng.integers(0, rows // 2, n)
        yfcc = sources == "yfcc100m"
        table = pa.table({
            "key": [f"k/{start + i}" for i in range(n)], "source": sources, "text": texts,
            "image_url": pa.nulls(n, pa.string()), "image_ref": pa.nulls(n, pa.string()), "split": ["train"] * n,
            "meta": ["{}"] * n, "lang": pa.array(np.where(yfcc, "en", None)),
            "lang_score": pa.array(rng.random(n).astype(np.float32), mask=~yfcc),
            "image": [b"0123456789abcdef"] * n,
            "image_sha256": [hashlib.sha256(int(i).to_bytes(8, "little")).hexdigest() for i in image_ids],
            "width": rng.integers(200, 300, n).astype(np.int32), "height": rng.integers(200, 300, n).astype(np.int32),
            "original_width": rng.integers(300, 1200, n).astype(np.int32),
            "original_height": rng.integers(300, 1200, n).astype(np.int32),
        }).cast(schema.SHARD_SCHEMA)
        path = root / "shards" / f"shard-{shard:05d}.parquet"
        pq.write_table(table, path, row_group_size=1000)
        per_source = {c["values"]: c["counts"] for c in table.column("source").value_counts().to_pylist()}
        for s, c in per_source.items():
            acc = accounting.setdefault(s, {"input_rows": 0, "pairs": 0, "rejects": 0, "failures": 0,
                                            "rejects_by_reason": {}})
            acc["input_rows"] += c
            acc["pairs"] += c
        entries.append(describe_file(root, f"shards/{path.name}"))
    Manifest.new(root, entries, accounting=accounting).write()


def differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in {**a, **b} for d in differences(a.get(k), b.get(k), f"{path}.{k}")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def run(variant: str, command: str, build: Path, out: Path, old_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, variant, command, str(build), str(out), str(old_dir)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    parser.add_argument("--old-up-to", type=int, default=4_000_000, help="largest size the old code runs at "
                        "(it holds every row: ~0.5 KiB a row)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/stats-scale"))
    parser.add_argument("--old-rev", default="main")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old_dir = Path(tmp)
        for name in ("stats", "shards"):
            (old_dir / f"{name}.py").write_text(subprocess.run(
                ["git", "show", f"{args.old_rev}:pmd/{name}.py"], capture_output=True, text=True, check=True).stdout)
        results = []
        for rows in args.sizes:
            build = args.workdir / f"rows-{rows}"
            if not (build / "manifest.json").exists():
                print(f"generating {rows:,} rows in {build} ...", file=sys.stderr, flush=True)
                generate(build, rows)
            variants = ["old", "new"] if rows <= args.old_up_to else ["new"]
            for command in ("stats", "verify"):
                runs: dict[str, list[dict]] = {v: [] for v in variants}
                outputs = {}
                for _ in range(args.rounds if rows <= args.old_up_to else 1):
                    for v in variants:
                        outputs[v] = old_dir / f"{v}-{command}.json"
                        runs[v].append(run(v, command, build, outputs[v], old_dir))
                identical = None
                if "old" in outputs:
                    before, after = (json.loads(outputs[v].read_text()) for v in ("old", "new"))
                    identical = before == after
                    if not identical:
                        print(f"old != new: {differences(before, after)[:10]}", file=sys.stderr, flush=True)
                row = {"rows": rows, "command": command, "identical": identical}
                for v, rs in runs.items():
                    row[f"{v}_peak_rss_mib"] = round(statistics.median(r["peak_rss_mib"] for r in rs))
                    row[f"{v}_s"] = round(statistics.median(r["seconds"] for r in rs), 2)
                    row[f"{v}_rows_per_s"] = round(rows / statistics.median(r["seconds"] for r in rs))
                results.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps({"cores": os.cpu_count(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
