"""How big the adapters' contexts are at PMD scale: what `prepare` loads and the ingest ships to every worker once.

Visual Genome: `image_data.json` of v1.2's 108,077 images (51,208 with a COCO id, as upstream), plus Karpathy's
`dataset_coco.json` (123,287 images, 5,000 val + 5,000 test). LN-COCO: the same Karpathy file. Written with the
upstream field names and URL shapes (ids and sizes generated), then read by the adapters' own `prepare`. Per
context: Python heap held (tracemalloc), pickled bytes (what `ray.put` stores), and median seconds for `prepare`
and for one pickle round trip.

    python benchmarks/bench_context_size.py --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import random
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

from pmd.sources import create_adapter

VG_IMAGES = 108_077
VG_WITH_COCO = 51_208
KARPATHY_IMAGES = 123_287
KARPATHY_EVAL = 5_000  # per split: val and test


def write_inputs(root: Path, seed: int = 0) -> dict[str, list[Path]]:
    rng = random.Random(seed)
    coco_ids = rng.sample(range(1, 600_000), KARPATHY_IMAGES)
    splits = ["val"] * KARPATHY_EVAL + ["test"] * KARPATHY_EVAL + ["train"] * (KARPATHY_IMAGES - 2 * KARPATHY_EVAL)
    karpathy = root / "dataset_coco.json"
    images = [{"filepath": "val2014", "filename": f"COCO_val2014_{c:012d}.jpg", "imgid": i, "split": s,
               "cocoid": c, "sentids": [], "sentences": []} for i, (c, s) in enumerate(zip(coco_ids, splits))]
    karpathy.write_text(json.dumps({"images": images, "dataset": "coco"}))
    with_coco = set(rng.sample(range(1, VG_IMAGES + 1), VG_WITH_COCO))
    image_data = [{"width": rng.choice([500, 800, 1024]), "url": f"https://cs.stanford.edu/people/rak248/"
                   f"{'VG_100K' if i < 60_000 else 'VG_100K_2'}/{i}.jpg", "height": rng.choice([333, 375, 600, 768]),
                   "image_id": i, "coco_id": coco_ids[i % KARPATHY_IMAGES] if i in with_coco else None,
                   "flickr_id": rng.randrange(10**9) if i in with_coco else None} for i in range(1, VG_IMAGES + 1)]
    (root / "image_data.json").write_text(json.dumps(image_data))
    (root / "region_descriptions.json").write_text("[]")
    (root / "coco_train_captions.jsonl").write_text("")
    return {"visual_genome": [root / "region_descriptions.json", root / "image_data.json", karpathy],
            "localized_narratives__coco": [root / "coco_train_captions.jsonl", karpathy]}


def measure(source: str, inputs: list[Path]) -> dict:
    """One round: `prepare` timed on its own, then again under tracemalloc for the heap its context holds."""
    adapter = create_adapter(source)
    gc.collect()
    start = time.perf_counter()
    context = adapter.prepare(inputs)
    prepare_s = time.perf_counter() - start
    start = time.perf_counter()
    data = pickle.dumps(context, protocol=pickle.HIGHEST_PROTOCOL)
    assert pickle.loads(data) == context
    pickle_s = time.perf_counter() - start
    del context
    gc.collect()
    tracemalloc.start()
    context = adapter.prepare(inputs)
    held = tracemalloc.get_traced_memory()[0]  # with the context alive: what it holds
    tracemalloc.stop()
    del context
    return {"held_mb": held / 1e6, "pickled_mb": len(data) / 1e6, "prepare_s": prepare_s,
            "pickle_round_trip_s": pickle_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = write_inputs(Path(tmp))
        # Alternating: one round of each source in turn, `rounds` times over.
        results: dict[str, list[dict]] = {source: [] for source in inputs}
        for _ in range(args.rounds):
            for source, paths in inputs.items():
                results[source].append(measure(source, paths))
    print(f"{'source':30} {'held MB':>8} {'pickled MB':>11} {'prepare s':>10} {'pickle s':>9}")
    for source, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in ("held_mb", "pickled_mb", "prepare_s",
                                                                   "pickle_round_trip_s")}
        print(f"{source:30} {med['held_mb']:8.1f} {med['pickled_mb']:11.2f} {med['prepare_s']:10.2f} "
              f"{med['pickle_round_trip_s']:9.3f}")


if __name__ == "__main__":
    main()
