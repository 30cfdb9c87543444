"""What the bounds cost: the bounded readers (pmd.sources.inputs) against the same reads unbounded, side by side.

JSON: `iter_json_items` (numpy byte scan in front of ijson's C parser) vs `ijson.items` on the raw stream, on a
Karpathy-like `dataset_coco.json` and on a Visual-Genome-like regions file. Lines: `iter_lines` (readline with a
cap) vs the same Records from `for line in stream`, on a YFCC-like TSV, plain and gzipped. YFCC conversion:
`convert_tables_limited` (over-long lines and captions) vs `convert_tables`, on a chunk of realistic lines
(benchmarks/bench_yfcc_ingest.py's generator). Alternating rounds, median seconds and MB/s.

    python benchmarks/bench_bounded_readers.py --mb 40 --rounds 5
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ijson

from pmd.sources.base import Record
from pmd.sources.inputs import iter_json_items, iter_lines
from pmd.sources.yfcc import YfccAdapter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_yfcc_ingest import generate


def karpathy_like(target: int, rng: random.Random) -> bytes:
    words = "a man riding a wave on top of a surfboard with the sky and sea behind him".split()
    images, size, i = [], 0, 0
    while size < target:
        sentences = []
        for s in range(5):
            tokens = rng.sample(words, rng.randint(8, 14))
            sentences.append({"tokens": tokens, "raw": " ".join(tokens).capitalize() + ".", "imgid": i,
                              "sentid": 5 * i + s})
        image = {"filepath": "val2014", "sentids": [5 * i + s for s in range(5)],
                 "filename": f"COCO_val2014_{i:012d}.jpg", "imgid": i, "split": "train", "sentences": sentences,
                 "cocoid": i}
        images.append(image)
        size += len(json.dumps(image))
        i += 1
    return json.dumps({"images": images, "dataset": "coco"}).encode()


def regions_like(target: int, rng: random.Random) -> bytes:
    entries, size, i = [], 0, 0
    while size < target:
        regions = [{"region_id": 100 * i + r, "width": rng.randint(1, 500), "height": rng.randint(1, 500),
                    "image_id": i, "phrase": "the clock is green in colour", "y": rng.randint(0, 500),
                    "x": rng.randint(0, 500)} for r in range(rng.randint(20, 60))]
        entry = {"regions": regions, "id": i}
        entries.append(entry)
        size += len(json.dumps(entry))
        i += 1
    return json.dumps(entries).encode()


def tsv_like(target: int, rng: random.Random) -> bytes:
    row = ("{i}\t12345678@N00\tnick\t2010-01-01+00%3A00%3A00.0\t1262304000\tCanon+EOS\ta+title+{i}\t"
           "a+description+of+the+photo+with+some+words\ttag1%2Ctag2\t\t\t\t\thttp://www.flickr.com/photos/x/{i}/\t"
           "http://farm1.staticflickr.com/1/{i}_abcdef.jpg\tAttribution\thttp://creativecommons.org/\t1\t1\tabcdef\t"
           "fedcba\tjpg\t0\n")
    out, size, i = [], 0, 0
    while size < target:
        line = row.format(i=i)
        out.append(line)
        size += len(line)
        i += 1
    return "".join(out).encode()


def json_bounded(path: Path, prefix: str) -> int:
    return sum(1 for _ in iter_json_items(path, prefix))


def json_unbounded(path: Path, prefix: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in ijson.items(f, prefix, use_float=True))


def lines_bounded(path: Path) -> int:
    return sum(1 for _ in iter_lines(path))


def _unbounded_lines(path: Path):
    """iter_lines as it was before the cap: the same Records, from `for line in stream`."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            yield Record(str(path), line_no, line.rstrip(b"\r\n"))


def lines_unbounded(path: Path) -> int:
    return sum(1 for _ in _unbounded_lines(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=40, help="size of each generated file in MB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--yfcc-lines", type=int, default=50_000, help="lines of the YFCC conversion chunk")
    args = parser.parse_args()
    rng = random.Random(0)
    target = int(args.mb * 1e6)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "dataset_coco.json").write_bytes(karpathy_like(target, rng))
        (root / "region_descriptions.json").write_bytes(regions_like(target, rng))
        tsv = tsv_like(target, rng)
        (root / "yfcc.tsv").write_bytes(tsv)
        (root / "yfcc.tsv.gz").write_bytes(gzip.compress(tsv, 6))
        cases = [
            ("karpathy JSON", root / "dataset_coco.json", "images.item"),
            ("VG regions JSON", root / "region_descriptions.json", "item"),
            ("YFCC TSV", root / "yfcc.tsv", None),
            ("YFCC TSV .gz", root / "yfcc.tsv.gz", None),
        ]
        yfcc_lines = root / "yfcc100m_dataset"
        generate(yfcc_lines, args.yfcc_lines)
        adapter = YfccAdapter()
        records = [Record(str(yfcc_lines), i + 1, line.rstrip(b"\n"))
                   for i, line in enumerate(yfcc_lines.read_bytes().splitlines(keepends=True))]
        context = adapter.prepare([yfcc_lines])
        adapter.convert_tables(records[:100], context)  # load fastText outside the timings
        print(f"| input ({args.mb:g} MB) | unbounded s | bounded s | bounded / unbounded | bounded MB/s |")
        print("|---|---:|---:|---:|---:|")
        for label, path, prefix in cases:
            runs: dict[str, list[float]] = {"unbounded": [], "bounded": []}
            counts = set()
            for _ in range(args.rounds):
                for kind in ("unbounded", "bounded"):  # alternating rounds: drift hits both alike
                    fn = {"unbounded": json_unbounded if prefix else lines_unbounded,
                          "bounded": json_bounded if prefix else lines_bounded}[kind]
                    start = time.perf_counter()
                    counts.add(fn(path, prefix) if prefix else fn(path))
                    runs[kind].append(time.perf_counter() - start)
            assert len(counts) == 1, f"{label}: the readers disagree ({counts})"
            base, ours = statistics.median(runs["unbounded"]), statistics.median(runs["bounded"])
            raw_mb = (len(tsv) if prefix is None else path.stat().st_size) / 1e6
            print(f"| {label} | {base:.3f} | {ours:.3f} | {ours / base:.2f} | {raw_mb / ours:.0f} |")
        runs = {"unbounded": [], "bounded": []}
        for _ in range(args.rounds):
            for kind, fn in (("unbounded", adapter.convert_tables), ("bounded", adapter.convert_tables_limited)):
                start = time.perf_counter()
                pairs, rejects = fn(records, context)
                runs[kind].append(time.perf_counter() - start)
                assert pairs.num_rows + rejects.num_rows == len(records)
        base, ours = statistics.median(runs["unbounded"]), statistics.median(runs["bounded"])
        print(f"| YFCC convert, {len(records):,} lines (rows/s) | {base:.3f} | {ours:.3f} | {ours / base:.2f} | "
              f"{len(records) / ours:,.0f} rows/s |")


if __name__ == "__main__":
    main()
