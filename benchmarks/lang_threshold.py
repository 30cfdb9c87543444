"""Choose the YFCC English threshold on a labelled sample of Flickr-style titles and descriptions.

For each threshold: how many English captions are kept (recall) and how many non-English or junk texts pass as
English (false accepts). Only texts of more than two words are scored, as the YFCC rule applies LID after the
word filter. Run: python benchmarks/lang_threshold.py [--sample FILE]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from pmd.text import LanguageIdentifier, word_count

DEFAULT_SAMPLE = Path(__file__).parent / "data" / "flickr_lang_sample.tsv"
THRESHOLDS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.8, 0.9)


def load_sample(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(row["label"], row["text"]) for row in csv.DictReader(f, delimiter="\t")]


def evaluate(sample: list[tuple[str, str]], thresholds=THRESHOLDS) -> list[dict]:
    lid = LanguageIdentifier()
    scored = [(label, lid.identify(text)) for label, text in sample if word_count(text) >= 3]
    english = [lang for label, lang in scored if label == "en"]
    other = [lang for label, lang in scored if label != "en"]
    rows = []
    for t in thresholds:
        kept = sum(1 for lang in english if lang.lang == "en" and lang.score >= t)
        false = sum(1 for lang in other if lang.lang == "en" and lang.score >= t)
        rows.append({"threshold": t, "english_kept": kept, "english_total": len(english),
                     "false_accepts": false, "other_total": len(other)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE)
    args = parser.parse_args()
    print(f"{'threshold':>9}  {'English kept':>14}  {'false accepts':>14}")
    for r in evaluate(load_sample(args.sample)):
        print(f"{r['threshold']:>9.2f}  {r['english_kept']:>6}/{r['english_total']:<7}  "
              f"{r['false_accepts']:>6}/{r['other_total']:<7}")


if __name__ == "__main__":
    main()
