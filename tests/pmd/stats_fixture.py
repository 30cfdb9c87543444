"""A generated build with what the audit must get exactly right: several shards of uneven size, images shared
within and across sources, keys repeated across shards, float scores with nulls and repeats, empty captions,
captions past every histogram edge, a source only the manifest knows, and one the catalog does not."""

from __future__ import annotations

import numpy as np

from tests.pmd.build_fixture import failure, shard_row, write_build

SOURCES = ("coco", "yfcc100m", "red_caps", "mystery")  # mystery: not in the catalog (no Table 2 entry)
_WORDS = ("a", "dog", "on", "the", "beach", "red", "ball", "sunset", "city", "bike")
_REASONS = (("download", "http_404"), ("download", "timeout"), ("decode", "not_an_image"), ("check", "too_small"),
            ("dedup", "duplicate"), ("read", "missing_member"))


def crafted_rows(seed: int = 7, shards: int = 7) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    images = [bytes([i % 251, i // 251, 7]) * 5 for i in range(900)]
    score_pool = rng.random(40).astype(np.float32)
    out, key = [], 0
    for _ in range(shards):
        rows = []
        for _ in range(int(rng.integers(1, 900))):
            source = SOURCES[int(rng.choice(4, p=[0.35, 0.35, 0.2, 0.1]))]
            n_words = int(rng.choice([0, int(rng.integers(1, 30)), int(rng.integers(30, 80))], p=[0.05, 0.85, 0.1]))
            text = " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), n_words))
            lang = score = None
            if source == "yfcc100m":
                lang = ("en", "de", "fr", None)[int(rng.integers(0, 4))]
                if rng.random() < 0.8:
                    score = float(score_pool[rng.integers(0, 40)] if rng.random() < 0.3 else np.float32(rng.random()))
            original = (int(rng.integers(40, 3000)), int(rng.integers(40, 3000)))
            rows.append(shard_row(f"{source}/{key}", source, text, images[int(rng.integers(0, len(images)))],
                                  width=int(rng.integers(100, 300)), height=int(rng.integers(100, 300)),
                                  original=original, split=("train", "validation", "test")[int(rng.integers(0, 3))],
                                  lang=lang, lang_score=score))
            key += 1
        out.append(rows)
    out[-1] += [dict(r) for r in out[0][:3]]  # three keys repeated in a later shard
    return out


def crafted_build(root, seed: int = 7, rows: list[list[dict]] | None = None):
    rows = crafted_rows(seed) if rows is None else rows
    rng = np.random.default_rng(seed + 1)
    failures = [failure(f"{SOURCES[i % 3]}/f{i}", SOURCES[i % 3], *_REASONS[int(rng.integers(0, len(_REASONS)))])
                for i in range(120)]
    accounting = {}
    for source in SOURCES:
        pairs = sum(r["source"] == source for shard in rows for r in shard)
        fails = sum(f["source"] == source for f in failures)
        accounting[source] = {"input_rows": pairs + 4 + fails, "pairs": pairs, "rejects": 4, "failures": fails,
                              "rejects_by_reason": {"empty_text": 3, "too_long": 1}}
    accounting["wit"] = {"input_rows": 5, "pairs": 0, "rejects": 5, "failures": 0,
                         "rejects_by_reason": {"not_english": 5}}
    return write_build(root, rows, failures, accounting)
