"""Peak memory of `pmd ingest` on the worst files the limits allow: rows just under every cap, many of them.

Each case writes a file, runs `pmd ingest SOURCE FILE --executor local` in a child process and reports the child's
peak resident set (ru_maxrss) and time. The cases are the shapes the limits exist for: lines just under
MAX_LINE_BYTES (plain: byte ranges; gzipped: line blocks), 10 MB lines (rejected), JSON elements just under
MAX_JSON_ITEM_BYTES, and a valid-looking file of tiny elements (per-object overhead).

    python benchmarks/bench_hostile_memory.py --mb 300
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pmd.sources.limits import MAX_JSON_ITEM_BYTES, MAX_LINE_BYTES


def write_long_lines(path: Path, total: int, line_bytes: int, compress: bool) -> None:
    line = b"w " * (line_bytes // 2 - 12) + b"\thttp://x.org/1.jpg\n"
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        for _ in range(max(1, total // len(line))):
            f.write(line)


def write_big_elements(path: Path, total: int) -> None:
    """Visual Genome regions: image entries each just under the element cap (many small regions)."""
    region = json.dumps({"region_id": 1, "image_id": 1, "phrase": "a dog", "x": 1, "y": 1, "width": 5, "height": 5})
    per_entry = (MAX_JSON_ITEM_BYTES - 64) // (len(region) + 2)
    entry = ('{"id": 1, "regions": [' + ", ".join([region] * per_entry) + "]}").encode()
    with open(path, "wb") as f:
        f.write(b"[")
        for i in range(max(1, total // len(entry))):
            f.write((b", " if i else b"") + entry)
        f.write(b"]")


def write_tiny_elements(path: Path, total: int) -> None:
    """RedCaps with millions of tiny annotations: the per-record Python overhead, with a chunk byte budget."""
    item = b'{"image_id": "a", "url": "https://i.redd.it/a.jpg", "raw_caption": "x"}'
    with open(path, "wb") as f:
        f.write(b'{"annotations": [')
        for i in range(max(1, total // (len(item) + 2))):
            f.write((b", " if i else b"") + item)
        f.write(b"]}")


def run(source: str, inputs: list[Path], out: Path, options: list[str]) -> tuple[float, float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from pmd_cli.pmd import main; raise SystemExit(main())", "ingest",
                           source, *map(str, inputs), "--out", str(out), "--executor", "local", "-q", "--json",
                           *options], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if done.returncode != 0:
        raise SystemExit(f"{source}: exit {done.returncode}: {done.stderr[-2000:]}")
    records = json.loads(done.stdout)["counts"]["records"]
    # RUSAGE_CHILDREN is the largest child so far: run the cases from the smallest expected peak up.
    return elapsed, max(peak, before) / 1024, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=300, help="size of each generated file in MB")
    args = parser.parse_args()
    total = int(args.mb * 1e6)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = []
        tiny = root / "tiny_2020.json"
        write_tiny_elements(tiny, total)
        cases.append(("RedCaps, tiny annotations", "red_caps", [tiny], []))
        plain = root / "Train_GCC-training.tsv"
        write_long_lines(plain, total, MAX_LINE_BYTES - 64, compress=False)
        cases.append(("CC3M, 4 MiB lines (byte ranges)", "conceptual_captions", [plain], []))
        packed = root / "Validation_GCC-1.1.0-Validation.tsv.gz"
        write_long_lines(packed, total, MAX_LINE_BYTES - 64, compress=True)
        cases.append(("CC3M, 4 MiB lines, gzipped (line blocks)", "conceptual_captions", [packed], []))
        over = root / "cc12m.tsv"
        write_long_lines(over, total, 10_000_000, compress=False)
        cases.append(("CC12M, 10 MB lines (all rejected)", "conceptual_12m", [over], []))
        regions = root / "region_descriptions.json"
        write_big_elements(regions, total)
        image_data = root / "image_data.json"
        image_data.write_text(json.dumps([{"image_id": 1, "url": "https://x.org/VG_100K/1.jpg", "width": 9,
                                           "height": 9}]))
        cases.append(("VG, 8 MiB image entries", "visual_genome", [regions, image_data], ["-o", "decontaminate=false"]))
        print(f"| input ({args.mb:g} MB each) | records | seconds | peak RSS (MB, largest child so far) |")
        print("|---|---:|---:|---:|")
        for label, source, inputs, options in cases:
            elapsed, peak_mb, records = run(source, inputs, root / "out", options)
            print(f"| {label} | {records:,} | {elapsed:.1f} | {peak_mb:.0f} |", flush=True)


if __name__ == "__main__":
    main()
