"""Upstream inputs read in place from object storage (the loopback S3 server of the tests, moto) against the same
files on local disk: what reading a few archive members costs in requests and bytes, what indexing a plain tar
costs cold and from its cached member list, the wall time of `pmd ingest` of a TSV local vs S3, and of reading
every member of a zip on S3 one GET at a time vs several in flight, with a network's latency added to each GET
(alternating rounds, medians and ratios).

Run: python benchmarks/bench_remote_inputs.py [--members 400] [--member-kb 100] [--lines 200000] [--rounds 3]
     [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

from tests.archive_files import write_tar, write_zip
from tests.s3server import Traffic, s3_server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=400)
    parser.add_argument("--member-kb", type=int, default=100)
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added to each GET of the member reads")
    args = parser.parse_args()
    traffic = Traffic()
    with s3_server(traffic=traffic) as env, tempfile.TemporaryDirectory() as tmp:
        os.environ.update(env)
        from pipelines.ingest import IngestConfig, run_ingest
        from pmd import storage
        from pmd.archives import ArchiveIndex

        root = Path(tmp)
        rng = random.Random(0)
        members = {f"images/{i:05d}.jpg": rng.randbytes(args.member_kb * 1000) for i in range(args.members)}
        write_zip(root / "a.zip", members, compression=zipfile.ZIP_STORED)
        write_tar(root / "a.tar", members, mode="w")
        (root / "cc.tsv").write_text("".join(f"caption number {i} of the benchmark\thttp://127.0.0.1/{i}.jpg\n"
                                             for i in range(args.lines)))
        for name in ("a.zip", "a.tar", "cc.tsv"):
            storage.upload(root / name, f"s3://pmd/{name}")
        wanted = [sorted(members)[i] for i in (3, len(members) // 2, len(members) - 1)]
        figures: dict = {"members": args.members, "member_bytes": args.member_kb * 1000, "lines": args.lines}

        for name in ("a.zip", "a.tar"):
            for run in ("cold", "cached"):
                traffic.reset()
                t = time.perf_counter()
                with ArchiveIndex.build([f"s3://pmd/{name}"], cache=root / "index-cache") as index:
                    got = [d for _, d, _ in index.read_many(wanted)]
                assert got == [members[w] for w in wanted]
                figures[f"{name} 3 members, {run} index"] = {
                    "archive_bytes": storage.size(f"s3://pmd/{name}"), "gets": traffic.gets[f"/pmd/{name}"],
                    "bytes_read": traffic.bytes_out[f"/pmd/{name}"], "s": round(time.perf_counter() - t, 3)}

        def ingest(location, out: Path) -> float:
            t = time.perf_counter()
            run_ingest(IngestConfig(source="conceptual_captions", inputs=[location], out=out, executor="local",
                                    progress=False))
            return time.perf_counter() - t

        def read_all(location) -> float:
            t = time.perf_counter()
            with ArchiveIndex.build([location], cache=root / "index-cache") as index:
                assert sum(len(d) for _, d, _ in index.read_many(index.refs())) == sum(map(len, small.values()))
            return time.perf_counter() - t

        # Every member of a small zip (moto copies the whole object for each ranged GET, so a small one keeps
        # its own cost low) with a network's latency per GET: one request at a time against RANGES_IN_FLIGHT.
        small = {f"images/{i:05d}.jpg": rng.randbytes(20_000) for i in range(200)}
        write_zip(root / "small.zip", small, compression=zipfile.ZIP_STORED)
        storage.upload(root / "small.zip", "s3://pmd/small.zip")
        in_flight = storage.RANGES_IN_FLIGHT
        times: dict[str, list[float]] = {}
        for r in range(args.rounds):  # alternating: a busy neighbour slows both alike
            for where, location in (("local", root / "cc.tsv"), ("s3", "s3://pmd/cc.tsv")):
                times.setdefault(f"ingest {where}", []).append(ingest(location, root / f"out-{where}-{r}"))
            times.setdefault("200 zip members local", []).append(read_all(root / "small.zip"))
            traffic.latency_s = args.latency_ms / 1000
            for n in (1, in_flight):
                storage.RANGES_IN_FLIGHT = n
                times.setdefault(f"200 zip members s3, {n} in flight", []).append(read_all("s3://pmd/small.zip"))
            storage.RANGES_IN_FLIGHT, traffic.latency_s = in_flight, 0.0
        for key, values in times.items():
            figures[f"{key} median s"] = round(statistics.median(values), 3)
        figures["ingest s3/local"] = round(figures["ingest s3 median s"] / figures["ingest local median s"], 2)
        figures[f"200 zip members at {args.latency_ms} ms per GET, 1 / {in_flight} in flight"] = round(
            figures["200 zip members s3, 1 in flight median s"]
            / figures[f"200 zip members s3, {in_flight} in flight median s"], 2)
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
