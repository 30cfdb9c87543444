"""A corpus that documents itself: OUT/README.md (a dataset card in the Hugging Face Hub's format) and
OUT/croissant.json (pmd/croissant.py), written from the manifest, checked against it.

1. `dataset_card(manifest)`: YAML front matter the Hub and `datasets.load_dataset(OUT)` read (`configs`: the shards
   as the `train` split of the default config, the failures as a `failures` config; licence, task categories,
   size category) and a `pmd` block naming the manifest it was made from (created_at, pairs, failures, the sha256
   of every file), then the audit's tables beside the paper's Table 2, licences and commercial use per source, the
   build's command, config, pmd version and git revision, decontamination and takedown records, and how to cite.
2. `write_docs(manifest)`: both files, atomically. `pmd build` and `pmd takedown` call it just before they write
   the manifest (the manifest stays the last file written: its presence means the corpus, card included, is
   complete); `pmd card OUT` calls it on a finished corpus. Both files are pure functions of the manifest and the
   catalog, so a rerun writes the same bytes.
3. `problems(manifest)`: what `pmd verify` reports: a file missing, or one that disagrees with the manifest (its
   build date, counts or file digests): a stale card.
"""

from __future__ import annotations

import json
import logging
import re

import yaml

from pmd import atomic, storage
from pmd.catalog import PAPER_TOTAL_PAIRS, PMD_CITATION_KEY, citations
from pmd.croissant import CROISSANT_FILE, FAILURE_FILES, SHARD_FILES, built_sources, croissant_metadata
from pmd.manifest import FAILURES_DIR, SHARDS_DIR, Manifest

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
FAILURES_CONFIG = "failures"
TASK_CATEGORIES = ("image-to-text", "text-to-image", "zero-shot-image-classification")
# The Hub's size categories: upper bounds (exclusive) and their names.
_SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                    (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.S)


class CardError(ValueError):
    pass


def size_category(pairs: int) -> str:
    for bound, name in _SIZE_CATEGORIES:
        if pairs < bound:
            return name
    return "n>1T" if pairs >= 10**12 else "1B<n<10B"


def _fingerprint(manifest: Manifest) -> dict:
    """What ties the card to one manifest: checked by `problems`."""
    totals = manifest.data.get("totals", {})
    return {
        "created_at": manifest.data.get("created_at", ""),
        "code_version": manifest.data.get("code_version", ""),
        "pairs": int(totals.get("pairs", manifest.rows)),
        "failures": int(totals.get("failures", sum(e.rows for e in manifest.failures))),
        "files": {e.file: e.sha256 for e in (*manifest.shards, *manifest.failures)},
    }


def front_matter(manifest: Manifest) -> dict:
    configs = [{"config_name": "default", "default": True,
                "data_files": [{"split": "train", "path": f"{SHARDS_DIR}/*.parquet"}]}]
    if manifest.failures:
        configs.append({"config_name": FAILURES_CONFIG,
                        "data_files": [{"split": "train", "path": f"{FAILURES_DIR}/*.parquet"}]})
    entries = built_sources(manifest)
    return {
        "pretty_name": "PMD (Public Multimodal Datasets), rebuilt with pmd",
        "license": "other",
        "license_name": "mixed-per-source",
        "license_details": "Each pair keeps its source's licence and its image's owner's terms: see the "
                           "per-source licence table below.",
        "language": ["en"],
        "task_categories": list(TASK_CATEGORIES),
        "size_categories": [size_category(_fingerprint(manifest)["pairs"])],
        "tags": ["image-text pairs", "pmd", "flava", "croissant"],
        "source_datasets": [e.name for e in entries],
        "configs": configs,
        "pmd": _fingerprint(manifest),
    }


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _n(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else ("n/a" if value is None else str(value))


def _ratio(ours: int, paper: int) -> str:
    return f"{ours / paper:.4f}" if paper else "n/a"


def _composition(manifest: Manifest) -> str:
    rows = []
    accounting = manifest.accounting
    for entry in built_sources(manifest):
        acc = accounting.get(entry.name, {})
        pairs = int(acc.get("pairs", 0))
        paper = f"{entry.table2_pairs:,}" + (" (apportioned)" if entry.table2_apportioned else "")
        rows.append([entry.name, _n(acc.get("input_rows")), _n(pairs), paper, _ratio(pairs, entry.table2_pairs),
                     f"{entry.table2_avg_words:.1f}", _n(acc.get("unique_images")), _n(acc.get("rejects")),
                     _n(acc.get("failures"))])
    totals = manifest.data.get("totals", {})
    pairs = int(totals.get("pairs", 0))
    rows.append(["total", _n(totals.get("input_rows")), _n(pairs), f"{PAPER_TOTAL_PAIRS:,}",
                 _ratio(pairs, PAPER_TOTAL_PAIRS), "12.1", _n(totals.get("unique_images")),
                 _n(totals.get("rejects")), _n(totals.get("failures"))])
    return _table(["source", "input rows", "pairs", "Table 2 pairs", "ratio", "Table 2 words", "unique images",
                   "rejects", "failures"], rows)


def _failures(manifest: Manifest) -> str:
    rows = []
    for source, acc in manifest.accounting.items():
        for reason, n in sorted(acc.get("failures_by_reason", {}).items()):
            rows.append([source, reason, _n(int(n))])
        for reason, n in sorted(acc.get("rejects_by_reason", {}).items()):
            rows.append([source, f"{reason} (ingest reject)", _n(int(n))])
    return _table(["source", "reason", "rows"], rows) if rows else "None."


def _licences(manifest: Manifest) -> str:
    return _table(["source", "licence", "a pair's image", "commercial use"],
                  [[e.name, e.licence, e.pair_licence or "as the source", e.commercial]
                   for e in built_sources(manifest)])


def _plain(value: object) -> object:
    """A JSON value as TOML can hold it: nulls left out."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value if v is not None]
    return value


def _config_toml(manifest: Manifest) -> str:
    import tomli_w

    return tomli_w.dumps(_plain(manifest.data.get("config", {})))


def _decontamination(manifest: Manifest) -> str:
    decon = manifest.data.get("config", {}).get("decontaminate", {})
    removed = [[s, _n(int(a.get("failures_by_reason", {}).get("eval_overlap", 0)))]
               for s, a in manifest.accounting.items()]
    lines = [f"- evaluation image sets (pHash, Hamming threshold {decon.get('threshold', 'n/a')}): "
             + (", ".join(f"`{p}`" for p in decon.get("against", [])) or "none"),
             "- evaluation Flickr id lists: " + (", ".join(f"`{p}`" for p in decon.get("flickr_ids", [])) or "none"),
             "", _table(["source", "pairs removed (eval_overlap)"], removed)]
    return "\n".join(lines)


def _takedowns(manifest: Manifest) -> str:
    takedowns = manifest.data.get("takedowns", [])
    if not takedowns:
        return "No removal request has been applied to this corpus."
    return _table(["request (list sha256)", "kind", "reason", "listed", "pairs removed", "applied at"],
                  [[str(t.get("list_sha256", ""))[:12], t.get("kind", ""), t.get("reason", ""), _n(t.get("listed")),
                    _n(t.get("rows")), t.get("applied_at", "")] for t in takedowns])


def _citation_block(manifest: Manifest) -> str:
    cites = citations()
    seen, blocks = set(), []
    for key in (PMD_CITATION_KEY, *(e.name for e in built_sources(manifest))):
        bibtex = cites[key].bibtex
        if bibtex not in seen:  # the four Localized Narratives sources share one paper
            seen.add(bibtex)
            blocks.append(bibtex)
    return "```bibtex\n" + "\n\n".join(blocks) + "\n```"


def dataset_card(manifest: Manifest) -> str:
    """The whole README.md of the corpus `manifest` describes."""
    meta = yaml.safe_dump(front_matter(manifest), sort_keys=False, allow_unicode=True, width=100)
    code_version = manifest.data.get("code_version", "")
    revision = code_version.split("+git.", 1)[1] if "+git." in code_version else "unknown"
    totals = manifest.data.get("totals", {})
    sections = [
        f"---\n{meta}---\n",
        "# PMD (Public Multimodal Datasets), rebuilt with pmd\n",
        f"{_n(totals.get('pairs', 0))} image-text pairs ({_n(totals.get('unique_images'))} distinct images) in "
        f"{len(manifest.shards)} Parquet shard(s), rebuilt from the public sources of the FLAVA paper's "
        f"pretraining corpus. Every candidate that did not become a pair is in `failures/` with its reason; the "
        f"counts add up per source (input rows = pairs + rejects + failures). `croissant.json` describes the same "
        f"files in Croissant (with its Responsible-AI fields); `manifest.json` is the build's own record.\n",
        "```python\nfrom datasets import load_dataset\n\npairs = load_dataset(\"path/to/this/folder\", "
        "split=\"train\")\nfailures = load_dataset(\"path/to/this/folder\", \"failures\", split=\"train\")\n```\n",
        "## Composition beside the paper's Table 2\n",
        _composition(manifest) + "\n",
        "Caption length statistics (the paper's average words) come from the audit: `pmd stats OUT`.\n",
        "## Failures and rejects by reason\n",
        _failures(manifest) + "\n",
        "## Licences and commercial use\n",
        _licences(manifest) + "\n",
        "YFCC100M rows carry their own Creative Commons licence URL in `meta`; `pmd stats` counts pairs per "
        "licence.\n",
        "## How it was built\n",
        f"- pmd version `{code_version}`, git revision `{revision}`; built {manifest.data.get('created_at', '')} "
        f"on the `{manifest.data.get('executor', 'n/a')}` executor.\n"
        "- to rebuild, save the configuration below as `build.toml` and run "
        "`pmd build --config build.toml --out OUT` (resumable: rerun the same command).\n",
        "```toml\n" + _config_toml(manifest) + "```\n",
        "## Decontamination\n",
        _decontamination(manifest) + "\n",
        "## Takedowns\n",
        _takedowns(manifest) + "\n\nRemoval requests: `pmd takedown OUT --keys|--urls|--image-sha256 FILE`; "
        "every later build applies them too.\n",
        "## Known limitations\n",
        "- Link rot: URL sources lose images every year; a rebuild holds fewer pairs than Table 2.\n"
        "- Placeholders: hosts that answer a removed image with a generic image; known ones are refused.\n"
        "- Personal information: photos may show identifiable people; captions and `meta` carry upstream user "
        "text. No face blurring or PII removal was applied.\n"
        "- Intended use: research on vision-language pretraining and the audit of such corpora.\n",
        "## Citation\n",
        _citation_block(manifest) + "\n",
    ]
    return "\n".join(sections)


def write_docs(manifest: Manifest) -> None:
    """OUT/croissant.json and OUT/README.md of the corpus `manifest` describes (atomically, each whole)."""
    doc = croissant_metadata(manifest)
    atomic.write_bytes((json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode(),
                       storage.join(manifest.out, CROISSANT_FILE))
    atomic.write_bytes(dataset_card(manifest).encode(), storage.join(manifest.out, CARD_FILE))
    log.info("wrote %s and %s", CROISSANT_FILE, CARD_FILE)


def read_front_matter(text: str) -> dict:
    m = _FRONT_MATTER.match(text)
    if not m:
        raise CardError("no YAML front matter")
    data = yaml.safe_load(m.group(1))
    if not isinstance(data, dict):
        raise CardError("the front matter is not a mapping")
    return data


def problems(manifest: Manifest) -> list[str]:
    """Each way OUT/README.md or OUT/croissant.json disagrees with the manifest, as sentences (empty: current)."""
    found: list[str] = []
    expected = _fingerprint(manifest)
    card_path = storage.join(manifest.out, CARD_FILE)
    try:
        card = read_front_matter(storage.read_text(card_path)).get("pmd")
    except FileNotFoundError:
        found.append(f"{CARD_FILE}: missing (write it with `pmd card OUT`)")
    except (CardError, yaml.YAMLError, UnicodeDecodeError) as e:
        found.append(f"{CARD_FILE}: unreadable ({e})")
    else:
        if card != expected:
            differs = sorted(k for k in expected if not isinstance(card, dict) or card.get(k) != expected[k])
            found.append(f"{CARD_FILE}: stale, its {', '.join(differs)} disagree with the manifest "
                         f"(rewrite it with `pmd card OUT`)")
    try:
        doc = json.loads(storage.read_text(storage.join(manifest.out, CROISSANT_FILE)))
    except FileNotFoundError:
        found.append(f"{CROISSANT_FILE}: missing (write it with `pmd card OUT`)")
        return found
    except ValueError as e:
        found.append(f"{CROISSANT_FILE}: not valid JSON ({e})")
        return found
    listed = {f.get("contentUrl"): (f.get("sha256"), f.get("contentSize")) for f in doc.get("distribution", [])
              if isinstance(f, dict) and f.get("@type") == "cr:FileObject"}
    want = {e.file: (e.sha256, f"{e.bytes} B") for e in (*manifest.shards, *manifest.failures)}
    if listed != want:
        wrong = sorted(set(listed) ^ set(want) | {k for k in set(listed) & set(want) if listed[k] != want[k]})
        found.append(f"{CROISSANT_FILE}: stale, its distribution disagrees with the manifest on {len(wrong)} "
                     f"file(s), e.g. {wrong[0]} (rewrite it with `pmd card OUT`)")
    if doc.get("datePublished") != expected["created_at"]:
        found.append(f"{CROISSANT_FILE}: stale, datePublished {doc.get('datePublished')!r} is not the build's "
                     f"{expected['created_at']!r}")
    file_sets = {f.get("@id") for f in doc.get("distribution", []) if isinstance(f, dict)}
    for needed in (SHARD_FILES, *([FAILURE_FILES] if manifest.failures else [])):
        if needed not in file_sets:
            found.append(f"{CROISSANT_FILE}: no file set {needed!r}")
    return found
