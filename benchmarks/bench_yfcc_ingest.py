"""YFCC ingest rate vs the raw fastText predict loop over the same texts, and peak memory vs input size.

Generates a 25-field yfcc100m_dataset file (default 1M lines) with realistic mixes (English and other-language
descriptions and titles, empty fields, URL-encoding, HTML, videos), then in one run measures:
  1. the peer: a bare loop of fastText lid.176.ftz `predict` over the texts LID sees (one core);
  2. `pmd ingest yfcc100m` in-process (one core) and on local Ray with every core;
  3. peak RSS of the ingest at two input sizes (constant memory means the peak does not grow with the input).
Run: python benchmarks/bench_yfcc_ingest.py [--lines 1000000] [--workdir bench-out/yfcc]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

ENGLISH = ["a", "the", "dog", "beach", "sunset", "over", "harbour", "walk", "with", "my", "family", "in", "park",
           "old", "church", "village", "river", "after", "rain", "snow", "mountain", "view", "from", "top", "kids",
           "playing", "city", "night", "lights", "street", "market", "morning", "fog", "bridge", "lake", "boats"]
GERMAN = ["der", "die", "das", "Hund", "spielt", "im", "Schnee", "Sonnenuntergang", "am", "Hafen", "mit", "und"]
FRENCH = ["le", "la", "les", "chien", "joue", "dans", "neige", "coucher", "de", "soleil", "sur", "port", "et"]
HTML = '<a href="http://www.flickr.com/x">link</a> '


def _sentence(rng: random.Random, words: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))


def generate(path: Path, lines: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    enc = urllib.parse.quote_plus
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            kind = rng.random()
            if kind < 0.45:
                description = _sentence(rng, ENGLISH, 4, 25)
            elif kind < 0.55:
                description = HTML + _sentence(rng, ENGLISH, 3, 12)
            elif kind < 0.70:
                description = _sentence(rng, rng.choice([GERMAN, FRENCH]), 3, 15)
            else:
                description = ""
            title = _sentence(rng, ENGLISH if rng.random() < 0.7 else GERMAN, 1, 6) if rng.random() < 0.8 else ""
            photo = 10_000_000 + i
            marker = "1" if rng.random() < 0.01 else "0"
            fields = [str(i), str(photo), f"{rng.getrandbits(128):032x}", "12345678@N00", "some+one",
                      "2010-05-01 10:00:00.0", "1272708000", "Canon+EOS+400D", enc(title), enc(description),
                      "beach,summer+holiday", "", "2.35", "48.85", "16",
                      f"http://www.flickr.com/photos/12345678@N00/{photo}/",
                      f"http://farm4.staticflickr.com/3001/{photo}_abcdef1234.jpg", "Attribution+License",
                      "http://creativecommons.org/licenses/by/2.0/", "3001", "4", "abcdef1234", "1234abcdef", "jpg",
                      marker]
            f.write("\t".join(fields) + "\n")


def lid_texts(path: Path, min_words: int = 3, threshold: float = 0.5) -> list[str]:
    """Exactly the texts the YFCC rule sends to fastText: each photo's cleaned description when it has enough
    words, and its cleaned title when the description failed and the title has enough words."""
    from pmd.text import LanguageIdentifier, clean_flickr_text

    lid = LanguageIdentifier()
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if fields[24] != "0":
                continue
            description = clean_flickr_text(fields[9])
            if len(description.split()) >= min_words:
                texts.append(description)
                lang = lid.identify(description)
                if lang.lang == "en" and lang.score >= threshold:
                    continue
            title = clean_flickr_text(fields[8])
            if len(title.split()) >= min_words:
                texts.append(title)
    return texts


def raw_predict_seconds(texts: list[str]) -> float:
    """The peer: fastText's own Python API in a bare loop, nothing else."""
    import fasttext

    from pmd.text import bundled_lid_model_path

    model = fasttext.load_model(str(bundled_lid_model_path()))
    start = time.perf_counter()
    for text in texts:
        model.predict(text, k=1)
    return time.perf_counter() - start


def predict_variants_seconds(texts: list[str], rounds: int = 3) -> dict[str, float]:
    """Ways of calling fastText over the same texts (median of alternating rounds): the peer's loop, pmd's loop
    over the binding (LanguageIdentifier.identify_many), and fastText's batch call on a list (`multilinePredict`: one
    C++ call for the whole list; fasttext-predict's returns the labels only, no probabilities, and its Python
    `predict(list)` wrapper fails unpacking that, so the binding is called directly)."""
    import fasttext

    from pmd.text import LanguageIdentifier, bundled_lid_model_path

    model = fasttext.load_model(str(bundled_lid_model_path()))
    lid = LanguageIdentifier()

    def peer():
        for text in texts:
            model.predict(text, k=1)

    variants = {"peer loop (model.predict per text)": peer,
                "pmd loop (identify_many)": lambda: lid.identify_many(texts),
                "batch (multilinePredict, labels only)": lambda: model.f.multilinePredict(
                    [t + "\n" for t in texts], 1, 0.0, "replace")}
    times: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return {n: sorted(v)[len(v) // 2] for n, v in times.items()}


def run_ingest_subprocess(path: Path, out: Path, executor: str) -> dict:
    """`pmd ingest` in a child process, so its peak RSS (and its Ray workers') is measured alone."""
    code = (
        "import json, resource, sys, time\n"
        "from pipelines.ingest import IngestConfig, run_ingest\n"
        "t = time.perf_counter()\n"
        f"s = run_ingest(IngestConfig('yfcc100m', [{str(path)!r}], {str(out)!r}, executor={executor!r}, "
        "progress=False))\n"
        "s['wall_s'] = time.perf_counter() - t\n"
        "u = resource.getrusage(resource.RUSAGE_SELF)\n"
        "s['peak_rss_mb'] = u.ru_maxrss / 1024\n"
        "s['cpu_s'] = u.ru_utime + u.ru_stime\n"
        "print(json.dumps(s))\n"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["children_peak_rss_mb"] = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/yfcc"))
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--predict-only", action="store_true",
                        help="only compare the ways of calling fastText (peer loop, pmd's loop, batch predict)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1

    small, big = args.workdir / "small.tsv", args.workdir / "yfcc100m_dataset"
    if not big.exists() or sum(1 for _ in open(big)) != args.lines:
        print(f"generating {args.lines:,} lines ...", flush=True)
        generate(big, args.lines)
    generate(small, max(args.lines // 4, 1000), seed=1)
    size_mb = big.stat().st_size / 1e6

    texts = lid_texts(big)
    if args.predict_only:
        for name, seconds in predict_variants_seconds(texts).items():
            print(f"{name:<40} {seconds:6.2f}s = {args.lines / seconds:>10,.0f} rows/s of the file", flush=True)
        return
    peer_s = raw_predict_seconds(texts)
    # Both rates in rows of the same file: the peer only runs fastText on the texts the ingest sends to it.
    peer = args.lines / peer_s
    print(f"peer: raw fastText predict loop over the {len(texts):,} texts LID sees: {peer_s:.1f}s = "
          f"{peer:,.0f} rows/s (1 core)", flush=True)

    local = run_ingest_subprocess(big, args.workdir / "out-local", "local")
    local_rate = local["counts"]["records"] / local["wall_s"]
    cpu_rate = local["counts"]["records"] / local["cpu_s"]
    print(f"pmd ingest, in-process (1 core)   {local_rate:>10,.0f} rows/s  ratio {local_rate / peer:.2f}  "
          f"({cpu_rate:,.0f} rows per CPU-second incl. imports: ratio {cpu_rate / peer:.2f})  "
          f"peak RSS {local['peak_rss_mb']:.0f} MB", flush=True)
    small_local = run_ingest_subprocess(small, args.workdir / "out-small", "local")
    print(f"peak RSS at {args.lines // 4:,} lines: {small_local['peak_rss_mb']:.0f} MB; "
          f"at {args.lines:,} lines: {local['peak_rss_mb']:.0f} MB", flush=True)
    results = {"lines": args.lines, "input_mb": round(size_mb, 1), "cores": cores, "lid_texts": len(texts),
               "peer_seconds": peer_s, "peer_rows_per_s": peer,
               "local_rows_per_s": local_rate, "local_ratio": local_rate / peer,
               "local_cpu_s": local["cpu_s"], "local_rows_per_cpu_s": cpu_rate,
               "local_peak_rss_mb": local["peak_rss_mb"], "small_peak_rss_mb": small_local["peak_rss_mb"],
               "counts": local["counts"]}
    if not args.skip_ray:
        ray_ = run_ingest_subprocess(big, args.workdir / "out-ray", "ray")
        ray_rate = ray_["counts"]["records"] / ray_["wall_s"]
        print(f"pmd ingest, local Ray ({cores} cores)  {ray_rate:>10,.0f} rows/s  "
              f"per core {ray_rate / cores:,.0f}  ratio per core {ray_rate / cores / peer:.2f}  "
              f"(wall {ray_['wall_s']:.1f}s incl. Ray start)", flush=True)
        results.update(ray_rows_per_s=ray_rate, ray_ratio_per_core=ray_rate / cores / peer)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "counts"}, indent=2))


if __name__ == "__main__":
    main()
