"""`pmd stats`: the audit of a build as a terminal table, JSON, or a report with plots."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pmd.storage import STORAGE_OPTION_ARGS, STORAGE_OPTION_KWARGS


def add_parser(sub) -> None:
    p = sub.add_parser("stats", help="audit a build: figures per source beside the paper's Table 2")
    p.add_argument("out", help="the build directory (holds manifest.json and the shards)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON (stable keys, docs/stats.md)")
    p.add_argument("--report", metavar="DIR", help="write report.md, report.html and PNG plots into DIR")
    p.add_argument("--compare", metavar="OTHER", help="show what changed since the build in OTHER")
    p.add_argument(*STORAGE_OPTION_ARGS, **STORAGE_OPTION_KWARGS)
    p.set_defaults(func=cmd_stats)


def _table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r, end_section=r[0] == "total" or False)
    return table


def cmd_stats(args: argparse.Namespace) -> int:
    from pmd import redact, report, stats

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    if args.compare:
        result = redact.value(stats.compare(args.out, args.compare, report_dir=args.report))
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            rows = [[name, f"{s['before']:,}", f"{s['after']:,}", f"+{s['gained']:,}", f"-{s['lost']:,}"]
                    for name, s in result["sources"].items()]
            t = result["total"]
            rows.append(["total", f"{t['before']:,}", f"{t['after']:,}", f"+{t['gained']:,}", f"-{t['lost']:,}"])
            console.print(_table(f"{result['before']} -> {result['after']}",
                                 ["source", "before", "after", "gained", "lost"], rows))
            for name, s in result["sources"].items():
                if s["lost_examples"]:
                    console.print(f"{name}: lost e.g. {', '.join(s['lost_examples'][:5])}")
        _print_problems(result["problems"])
        return 0 if result["trusted"] else 1

    from pmd.lease import warn_if_written

    warn_if_written(args.out)
    result = redact.value(stats.audit(args.out))  # a URL's credentials never reach the report or the output
    if args.report:
        written = report.write_report(result, Path(args.report))
        if not args.json:
            console.print(f"report: {written['html']} and {written['markdown']}")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        console.print(_table("Sources", report.SOURCE_HEADER, report.source_rows(result)))
        console.print(_table("Against the FLAVA paper (Table 2)", report.TABLE2_HEADER, report.table2_rows(result)))
        dup = result["duplicates"]
        console.print(f"duplicates: {dup['pairs_dropped']:,} pairs dropped; {dup['images_with_several_captions']:,} "
                      f"images carry several captions ({dup['pairs_on_shared_images']:,} pairs); "
                      f"{dup['images_across_sources']:,} images appear in more than one source")
        saved = report.downloads_saved_line(result)
        if saved:
            console.print(saved)
        failures = sorted(result["total"]["failures_by_reason"].items(), key=lambda kv: -kv[1])
        if failures:
            console.print("failures: " + ", ".join(f"{k} {v:,}" for k, v in failures))
        console.print(_table("Commercial use (pairs, by licence)", report.COMMERCIAL_HEADER,
                             report.commercial_rows(result)))
        console.print(_table("Pairs per licence", report.LICENCE_HEADER, report.licence_rows(result)))
        for source, sets in result.get("eval_overlap", {}).items():
            console.print(f"evaluation images kept out of {source}: "
                          + ", ".join(f"{name} {n:,}" for name, n in sets.items()))
        for p in result.get("placeholders", []):
            what = f"sha256 {p['sha256']}" if p["sha256"] else f"redirect to {p.get('redirect')}"
            console.print(f"placeholder ({p['rule']}) {what}: {p['rows']:,} rows, {p['urls']:,} URLs, e.g. "
                          + ", ".join(p["sample_urls"][:3]))
    _print_problems(result["problems"])
    return 0 if result["trusted"] else 1


def _print_problems(problems: list[str]) -> None:
    for p in problems:
        print(f"pmd stats: problem: {p}", file=sys.stderr)
