"""The `pmd` command: thin wrappers over the library and the pipelines."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from pmd.sources.base import InputError

log = logging.getLogger("pmd")


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 160)


def _parse_options(pairs: Sequence[str]) -> dict[str, str]:
    options = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"option {item!r} is not KEY=VALUE")
        options[key.strip()] = value
    return options


# ---------------------------------------------------------------------------------------------------- sources
def cmd_sources(args: argparse.Namespace) -> int:
    from pmd.catalog import PAPER_TOTAL_PAIRS, load_catalog

    catalog = load_catalog()
    if args.json:
        print(json.dumps([e.to_dict() for e in catalog], indent=2))
        return 0
    table = Table(title="PMD sources (FLAVA paper, Table 2)", show_lines=False)
    for col, justify in (("source", "left"), ("images", "left"), ("paper pairs", "right"),
                         ("avg words", "right"), ("manual", "left"), ("licence", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for e in catalog:
        pairs = f"{e.table2_pairs / 1e6:.2f}M" + ("*" if e.table2_apportioned else "")
        table.add_row(e.name, e.images, pairs, f"{e.table2_avg_words:.1f}", "yes" if e.manual else "",
                      e.licence)
    total = sum(e.table2_pairs for e in catalog)
    table.add_row("total", "", f"{total / 1e6:.1f}M", "12.1", "", "", end_section=True)
    console = _console()
    console.print(table)
    console.print("* Localized Narratives' 1.9M apportioned over its sub-sources by narrative count "
                  "(manifests/sources.toml).")
    if total != PAPER_TOTAL_PAIRS:
        log.error("catalog total %d differs from the paper's %d", total, PAPER_TOTAL_PAIRS)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------- ingest
def print_ingest_summary(summary: dict, console: Console) -> None:
    counts = summary["counts"]
    table = Table(title=f"ingest {summary['source']} ({summary['executor']}, {summary['elapsed_s']:.1f}s)")
    table.add_column("")
    table.add_column("rows", justify="right")
    table.add_row("records read", f"{counts['records']:,}")
    table.add_row("pairs", f"{counts['pairs']:,}")
    for split, n in counts["pairs_by_split"].items():
        table.add_row(f"  split {split}", f"{n:,}")
    table.add_row("rejects", f"{counts['rejects']:,}")
    for reason, n in counts["rejects_by_reason"].items():
        table.add_row(f"  {reason}", f"{n:,}")
    table.add_row("pairs + rejects", f"{counts['rows']:,}", end_section=True)
    console.print(table)


def cmd_ingest(args: argparse.Namespace) -> int:
    from pipelines.ingest import IngestConfig, run_ingest

    config = IngestConfig(
        source=args.source, inputs=args.inputs, out=args.out, options=_parse_options(args.option),
        chunk_records=args.chunk_records, executor=args.executor, ray_address=args.ray_address,
        progress=not args.quiet,
    )
    summary = run_ingest(config)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_ingest_summary(summary, _console())
        _console().print(f"wrote {config.source_dir} (candidates/, rejects/, ingest.json)")
    return 0


# ------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmd", description="Rebuild PMD from its public sources.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sources", help="the source catalog beside the paper's Table 2")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_sources)

    p = sub.add_parser("ingest", help="upstream metadata files -> candidate pairs and rejects (Parquet)")
    p.add_argument("source", help="source name, see `pmd sources`")
    p.add_argument("inputs", nargs="+", help="upstream metadata files as published (.gz/.bz2/.zip/.tar.gz ok)")
    p.add_argument("--out", required=True, help="output directory; writes OUT/SOURCE/{candidates,rejects}/")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="adapter option, e.g. -o lang_threshold=0.6 for yfcc100m")
    p.add_argument("--executor", choices=("auto", "local", "ray"), default="auto",
                   help="where chunks run: auto = Ray for inputs over 256 MB or when a cluster is named")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else local)")
    p.add_argument("--chunk-records", type=int, default=50_000, help="records per part file (unit of work)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ingest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except InputError as exc:
        print(f"pmd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, KeyError) as exc:
        print(f"pmd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
