"""The audit as a report: PNG plots (matplotlib) and a self-contained Markdown + HTML page.

Views only: every figure comes from `pmd.stats.audit`'s dict.
"""

from __future__ import annotations

import base64
import functools
import html
import json
from pathlib import Path

from pmd.catalog import COMMERCIAL, load_catalog


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def table2_rows(result: dict) -> list[list[str]]:
    """Source | paper pairs | our pairs | ratio | paper words | our words | ratio."""
    rows = []
    for name, s in result["sources"].items():
        t = s["table2"] or {}
        rows.append([name, _fmt(t.get("paper_pairs")), _fmt(s["pairs"]), _fmt(t.get("pairs_ratio"), 4),
                     _fmt(t.get("paper_avg_words"), 1), _fmt(s["words"]["mean"], 1), _fmt(t.get("words_ratio"), 2)])
    t, s = result["total"]["table2"], result["total"]
    rows.append(["total", _fmt(t["paper_pairs"]), _fmt(s["pairs"]), _fmt(t["pairs_ratio"], 4),
                 _fmt(t["paper_avg_words"], 1), _fmt(s["words"]["mean"], 1), _fmt(t["words_ratio"], 2)])
    return rows


LICENCE_HEADER = ["licence", "pairs", "share"]
COMMERCIAL_HEADER = ["source", *(f"commercial use {k}" for k in COMMERCIAL)]
TABLE2_HEADER = ["source", "paper pairs", "our pairs", "ratio", "paper words", "our words", "ratio"]
SOURCE_HEADER = ["source", "pairs", "unique images", "mean words", "median words", "image success",
                 "download success", "rejects", "failures", "accounting"]


def source_rows(result: dict) -> list[list[str]]:
    rows = []
    for name, s in [*result["sources"].items(), ("total", result["total"])]:
        acc = s["accounting"]
        rows.append([name, _fmt(s["pairs"]), _fmt(s["unique_images"]), _fmt(s["words"]["mean"], 1),
                     _fmt(s["words"]["median"], 1), _pct(s["success"]["image_success_rate"]),
                     _pct(s["success"]["download_success_rate"]),
                     _fmt(acc["rejects"]) if acc else "n/a", _fmt(sum(s["failures_by_reason"].values())),
                     ("ok" if acc["identity_holds"] else "BROKEN") if acc else "no manifest"])
    return rows


DOWNLOADS_KEY = "downloads_saved_by_url_dedup"


def downloads_saved_rows(result: dict) -> list[list[str]]:
    """Source | downloads URL dedup saved; empty for a build whose manifest does not record it."""
    if DOWNLOADS_KEY not in result["total"]:
        return []
    rows = [[name, _fmt(s[DOWNLOADS_KEY])] for name, s in result["sources"].items() if DOWNLOADS_KEY in s]
    return rows + [["total", _fmt(result["total"][DOWNLOADS_KEY])]]


def downloads_saved_line(result: dict) -> str | None:
    rows = downloads_saved_rows(result)
    if not rows:
        return None
    per_source = ", ".join(f"{name} {n}" for name, n in rows[:-1])
    return f"URL dedup saved {rows[-1][1]} downloads ({per_source})"


# ------------------------------------------------------------------------------------------------------ plots
@functools.cache
def _pyplot():
    """matplotlib's pyplot on the file backend, imported on the first plot: every `pmd` command imports this
    module (the demo's config), and pyplot alone cost ~0.26 s of each command's start (python -X importtime)."""
    import matplotlib

    matplotlib.use("Agg")  # files, never a window: this runs on headless build machines
    import matplotlib.pyplot as plt

    return plt


def _figure():
    return _pyplot().subplots(figsize=(8, 4.5))


def _grouped_histogram(result: dict, histogram_of, xlabel: str, title: str, path: Path) -> Path:
    """One bar group per bin, one bar per source: each source's share of its pairs in the bin."""
    fig, ax = _figure()
    names = list(result["sources"])
    bins = list(histogram_of(result["total"]))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        hist = histogram_of(result["sources"][name])
        total = sum(hist.values()) or 1
        ax.bar([j + i * width for j in range(len(bins))], [hist[b] / total for b in bins], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bins))], bins)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of the source's pairs")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_caption_lengths(result: dict, path: Path) -> Path:
    return _grouped_histogram(result, lambda s: s["words"]["histogram"], "caption length (words)",
                              "Caption length per source", path)


def plot_image_sizes(result: dict, path: Path) -> Path:
    """The original images' shorter side per source: what resizing to 256 px keeps, shrinks or leaves small."""
    return _grouped_histogram(result, lambda s: s["image"]["shorter_side_histogram"],
                              "shorter side of the original image (pixels)", "Image sizes per source", path)


def plot_success(result: dict, path: Path) -> Path:
    fig, ax = _figure()
    names = list(result["sources"])
    rates = [result["sources"][n]["success"]["image_success_rate"] for n in names]
    ax.bar(names, [100 * r if r is not None else 0 for r in rates], color="tab:green")
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of candidates with a usable image")
    ax.set_title("Image success rate per source")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    return _save(fig, path)


def plot_composition(result: dict, path: Path) -> Path:
    """Share of pairs per source, ours against the paper's Table 2."""
    fig, ax = _figure()
    paper = {e.name: e.table2_pairs for e in load_catalog()}
    names = sorted(set(paper) | set(result["sources"]))
    ours_total = result["total"]["pairs"] or 1
    paper_total = sum(paper.values())
    ours = [100 * result["sources"].get(n, {}).get("pairs", 0) / ours_total for n in names]
    theirs = [100 * paper.get(n, 0) / paper_total for n in names]
    ax.barh([i + 0.2 for i in range(len(names))], ours, 0.4, label="this build")
    ax.barh([i - 0.2 for i in range(len(names))], theirs, 0.4, label="FLAVA paper, Table 2")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("% of pairs")
    ax.set_title("Composition: this build against the paper")
    ax.legend(fontsize=7)
    return _save(fig, path)


def licence_rows(result: dict) -> list[list[str]]:
    """Pairs per licence, most first, with the share of the corpus."""
    total = result["total"]["pairs"] or 1
    return [[name, _fmt(n), _pct(n / total)]
            for name, n in sorted(result["total"].get("licences", {}).items(), key=lambda kv: -kv[1])]


def commercial_rows(result: dict) -> list[list[str]]:
    rows = []
    for name, s in [*result["sources"].items(), ("total", result["total"])]:
        use = s.get("commercial_use", {})
        rows.append([name, *(_fmt(use.get(k, 0)) for k in COMMERCIAL)])
    return rows


def plot_commercial_use(result: dict, path: Path) -> Path:
    """Pairs per source whose licence allows commercial use, does not, or is unknown (stacked)."""
    fig, ax = _figure()
    names = list(result["sources"])
    left = [0] * len(names)
    colours = {"allowed": "tab:green", "not": "tab:red", "unknown": "tab:gray"}
    for use in COMMERCIAL:
        values = [result["sources"][n].get("commercial_use", {}).get(use, 0) for n in names]
        ax.barh(names, values, left=left, color=colours[use], label=use)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("pairs")
    ax.set_title("Commercial use allowed by the pairs' licences")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


# ----------------------------------------------------------------------------------------------------- report
def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(result: dict, out_dir: Path) -> dict[str, Path]:
    """Write report.md, report.html (images embedded) and the PNGs into out_dir; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "caption_lengths": plot_caption_lengths(result, out_dir / "caption_lengths.png"),
        "image_sizes": plot_image_sizes(result, out_dir / "image_sizes.png"),
        "success_rate": plot_success(result, out_dir / "success_rate.png"),
        "composition": plot_composition(result, out_dir / "composition.png"),
        "commercial_use": plot_commercial_use(result, out_dir / "commercial_use.png"),
    }
    failures = sorted(result["total"]["failures_by_reason"].items(), key=lambda kv: -kv[1])
    rejects = sorted(((result["total"]["accounting"] or {}).get("rejects_by_reason") or {}).items(),
                     key=lambda kv: -kv[1])
    dup = result["duplicates"]
    sections = [
        ("Sources", SOURCE_HEADER, source_rows(result)),
        ("Against the FLAVA paper (Table 2)", TABLE2_HEADER, table2_rows(result)),
        ("Failures by reason", ["reason", "count"], [[k, _fmt(v)] for k, v in failures]),
        ("Rejects by reason", ["reason", "count"], [[k, _fmt(v)] for k, v in rejects]),
        ("Duplicates", ["figure", "count"], [[k.replace("_", " "), _fmt(v)] for k, v in dup.items()]),
        ("Pairs per licence", LICENCE_HEADER, licence_rows(result)),
        ("Commercial use", COMMERCIAL_HEADER, commercial_rows(result)),
    ]
    if downloads_saved_rows(result):
        sections.append(("Downloads saved by URL dedup", ["source", "downloads saved"], downloads_saved_rows(result)))
    problems = result["problems"]
    status = "trusted: every check passed" if result["trusted"] else f"NOT trusted: {len(problems)} problem(s)"

    md = [f"# PMD build audit: {result['build']}", "", f"{result['shards']} shards; {status}.", ""]
    md += [f"- {p}" for p in problems] + ([""] if problems else [])
    for title, header, rows in sections:
        md += [f"## {title}", "", _md_table(header, rows), ""]
    md += ["## Plots", ""] + [f"![{name}]({p.name})" for name, p in plots.items()] + [""]
    (out_dir / "report.md").write_text("\n".join(md))

    parts = [f"<h1>PMD build audit: {html.escape(result['build'])}</h1>",
             f"<p>{result['shards']} shards; {html.escape(status)}.</p>"]
    if problems:
        parts.append("<ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in problems) + "</ul>")
    for title, header, rows in sections:
        parts += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows)]
    parts.append("<h2>Plots</h2>")
    for name, p in plots.items():
        data = base64.b64encode(p.read_bytes()).decode()
        parts.append(f'<figure><img alt="{name}" src="data:image/png;base64,{data}"/></figure>')
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}")
    (out_dir / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>PMD audit"
                                         f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    (out_dir / "stats.json").write_text(json.dumps(result, indent=2))
    return {"markdown": out_dir / "report.md", "html": out_dir / "report.html", **plots}
