"""The `pmd` command: thin wrappers over the library and the pipelines."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from pmd import atomic, redact, storage
from pmd.config_loader import Extend, parse_assignments
from pmd.lease import Lease
from pmd.manifest import identity_holds
from pmd.storage import STORAGE_OPTION_ARGS, STORAGE_OPTION_KWARGS

log = logging.getLogger("pmd")

# The errors a user can cause, each with the exit code of the command it ends: printed as one line, without a
# traceback. Only these classes: a ValueError or KeyError our own code raises is a bug and keeps its traceback.
# The first match wins. Classes are named by module and looked up only once their module is loaded, so mapping an
# error never imports Ray or the build.
USER_ERRORS: tuple[tuple[str, str, str | None, int], ...] = (
    # (module, class, only for this command, exit code)
    ("pmd.atomic", "OutOfSpace", None, 1),  # disk full or a store's quota: one line naming the file and phase
    ("pmd.lease", "LeaseHeld", None, 2),  # a second writer of one corpus
    ("pmd.lease", "LeaseLost", None, 1),
    ("pipelines.build", "BuildError", None, 1),
    ("builtins", "RuntimeError", "demo", 1),  # a demo stage that failed
    ("pmd.fetch", "FetchError", None, 2),
    ("pmd.sources.base", "InputError", None, 2),
    ("pmd.sources", "UnknownSourceError", None, 2),
    ("pmd.sources.limits", "LimitExceeded", None, 2),
    ("pmd.config_loader", "ConfigError", None, 2),
    ("pmd.manifest", "ManifestError", None, 2),
    ("pmd.storage", "StorageError", None, 2),
    ("pmd.takedown", "TakedownError", None, 2),
    ("pmd.export", "ExportError", None, 2),
    ("pmd.catalog", "CatalogError", None, 2),
    ("pmd.archives", "ArchiveError", None, 2),
    ("pmd.decontaminate", "DecontaminationError", None, 2),
    ("pmd_cli.pmd", "UsageError", None, 2),
    ("builtins", "FileNotFoundError", None, 2),  # a build or input directory that is not there
)


class UsageError(ValueError):
    """Arguments that do not go together (the parser cannot say it: e.g. --config beside a one-source form)."""


def exit_code(command: str, exc: BaseException) -> int | None:
    """The exit code for ``exc`` raised by ``command`` (USER_ERRORS); None for a bug."""
    for module, name, only, code in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls) and only in (None, command):
            return code
    return None


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 160)


# ---------------------------------------------------------------------------------------------------- sources
def cmd_sources(args: argparse.Namespace) -> int:
    from pmd.catalog import PAPER_AVG_WORDS, PAPER_TOTAL_PAIRS, load_catalog

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
    table.add_row("total", "", f"{total / 1e6:.1f}M", f"{PAPER_AVG_WORDS:.1f}", "", "", end_section=True)
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
        source=args.source, inputs=args.inputs, out=args.out, options=parse_assignments(args.option),
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


# ------------------------------------------------------------------------------------------------------ build
def print_build_summary(manifest: dict, console: Console) -> None:
    table = Table(title=f"pmd build: {len(manifest['shards'])} shards, {manifest['timings']['total_s']:.1f}s")
    for col in ("source", "input rows", "pairs", "rejects", "failures", "unique images", "adds up"):
        table.add_column(col, justify="left" if col == "source" else "right")
    rows = list(manifest["accounting"].items()) + [("total", manifest["totals"])]
    for i, (name, a) in enumerate(rows):
        ok = identity_holds(a)
        table.add_row(name, f"{a['input_rows']:,}", f"{a['pairs']:,}", f"{a['rejects']:,}", f"{a['failures']:,}",
                      f"{a['unique_images']:,}", "yes" if ok else "NO", end_section=i == len(rows) - 2)
    console.print(table)
    reasons = Table(title="failures by reason")
    for col in ("source", "reason", "rows"):
        reasons.add_column(col, justify="right" if col == "rows" else "left")
    for name, a in manifest["accounting"].items():
        for reason, n in a["failures_by_reason"].items():
            reasons.add_row(name, reason, f"{n:,}")
    if reasons.row_count:
        console.print(reasons)
    t = manifest["timings"]
    console.print(f"stages: ingest {t.get('ingest_s', 0):.1f}s, images {t.get('images_s', 0):.1f}s, "
                  f"plan {t.get('plan_s', 0):.1f}s, shards {t.get('shards_s', 0):.1f}s"
                  + (f" ({t['shard_rows_per_s']:,.0f} rows/s, {t['shard_mb_per_s']:.1f} MB/s)"
                     if t.get("shard_rows_per_s") else ""))


def _build_config(args: argparse.Namespace):
    """The build configuration: --config FILE, or the one-source form, with the flags laid on it."""
    from pipelines.build import load_config

    if args.config and (args.source or args.inputs or args.images or args.option):
        raise UsageError("give either --config FILE or SOURCE INPUT... [--images PATH], not both")
    if not args.config and (not args.source or not args.inputs):
        raise UsageError("give SOURCE INPUT... (or --config FILE)")
    one_source = None if args.config else [{"name": args.source, "inputs": args.inputs, "images": args.images,
                                            "options": parse_assignments(args.option)}]
    flags = {
        "sources": one_source, "out": args.out, "shard_rows": args.shard_rows, "chunk_rows": args.chunk_rows,
        "seed": args.seed, "executor": args.executor, "ray_address": args.ray_address, "num_cpus": args.num_cpus,
        "task_cpus": args.task_cpus, "row_group_rows": args.row_group_rows, "retry_failures": args.retry_failures,
        "work": args.work,
        "progress": not args.quiet,
        "image.image_size": args.image_size, "image.jpeg_quality": args.jpeg_quality,
        "image.max_image_bytes": args.max_image_bytes,
        "download.timeout": args.timeout, "download.retries": args.retries, "download.thread_count": args.threads,
        "download.user_agent_token": args.user_agent_token, "download.backend": args.download_backend,
        "download.max_per_host": args.max_per_host,
        "download.disallowed_header_directives": [] if args.ignore_robots else None,
        "download.respect_robots_txt": False if args.ignore_robots else None,
        "download.max_rate_per_host": args.max_rate_per_host,
        "download.placeholder_min_urls": args.placeholder_min_urls,
        "download.allow_networks": Extend(args.allow_network),  # adds to the file's list
        "download.resolver": args.resolver, "download.dns_timeout": args.dns_timeout,
        # these add to the file's lists
        "decontaminate.against": Extend(args.decontaminate_against),
        "decontaminate.flickr_ids": Extend(args.eval_flickr_ids),
        "decontaminate.threshold": args.eval_hash_threshold,
    }
    return load_config(args.config, flags)


def cmd_build(args: argparse.Namespace) -> int:
    from pipelines.build import run_build

    config = _build_config(args)
    with Lease(config.out, "pmd build"), \
            atomic.stop_when_full(lambda path: atomic.phase_of(path, [config.work, config.out])):
        manifest = run_build(config)
    if args.json:
        print(json.dumps({k: manifest[k] for k in ("accounting", "totals", "timings")}, indent=2))
    else:
        print_build_summary(manifest, _console())
        _console().print(redact.text(f"wrote {config.out}/manifest.json, shards/, failures/"))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pmd.lease import warn_if_written
    from pmd.shards import verify

    warn_if_written(args.out)
    problems = verify(args.out, check_sha256=not args.no_sha256)
    if problems:
        for p in problems:
            print(redact.text(f"{args.out}: {p}"), file=sys.stderr)
        print(f"pmd verify: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    _console().print(redact.text(f"{args.out}: OK"))
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from pmd.card import CARD_FILE, write_docs
    from pmd.croissant import CROISSANT_FILE
    from pmd.manifest import Manifest

    write_docs(Manifest.read(args.out))
    _console().print(f"{args.out}: wrote {CARD_FILE} and {CROISSANT_FILE} from manifest.json")
    return 0


def cmd_takedown(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pmd.takedown import apply, read_request

    kind, path = next((k, v) for k, v in (("urls", args.urls), ("keys", args.keys),
                                          ("image_sha256", args.image_sha256)) if v)
    request = read_request(kind, path, args.reason or "")
    if not storage.is_remote(args.out) and not Path(args.out).is_dir():
        raise FileNotFoundError(f"{args.out}: no such build directory")
    with Lease(args.out, "pmd takedown"), atomic.stop_when_full(lambda path: "takedown"):
        result = apply(args.out, request)
    if result["applied"]:
        _console().print(redact.text(f"{args.out}: takedown {request.id[:12]}: {result['rows']:,} pairs removed, "
                                     f"{result['shards']} shards rewritten; run `pmd verify {args.out}` to check"))
    else:
        _console().print(redact.text(f"{args.out}: takedown {request.id[:12]} was already applied; nothing changed"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pmd.export import ExportOptions, export

    with Lease(args.out, "pmd export"), atomic.stop_when_full(lambda path: "export"):
        listing = export(args.build, args.out,
                         ExportOptions(format=args.format, shard_size=args.shard_size, progress=not args.quiet))
    _console().print(redact.text(f"{args.out}: {listing['samples']:,} pairs in {len(listing['shards'])} tars "
                                 f"({listing['urls']}), listed in {args.out}/shards.json"))
    return 0


def cmd_fetch_metadata(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pmd.fetch import describe_manual, fetch

    summary = fetch(Path(args.to), args.sources, mirror=args.mirror, attempts=args.attempts,
                    timeout=args.timeout, progress=not args.quiet, allow_networks=args.allow_network)
    console = _console()
    table = Table(title=f"pmd fetch-metadata -> {args.to}")
    for col in ("file", "status", "bytes", "sha256"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for name, info in summary["files"].items():
        status = "fetched" if name in summary["fetched"] else "already there"
        table.add_row(name, status, f"{info['bytes']:,}", info["sha256"][:16])
    for name, error in summary["failed"].items():
        table.add_row(name, redact.text(f"FAILED: {error}"), "", "")  # the error may name a --mirror URL
    console.print(table)
    for line in describe_manual(summary["manual"]):
        print(line)
    if summary["failed"]:
        print(f"pmd fetch-metadata: {len(summary['failed'])} file(s) failed; rerun to resume them", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pmd_demo.demo import DemoConfig, run_demo

    config = DemoConfig.quick(Path(args.out)) if args.quick else DemoConfig(out=Path(args.out))
    if args.steps is not None:
        config.train_steps = args.steps
    run_demo(config, _console())
    return 0


# ------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from pathlib import Path

    from pipelines.build import EXECUTORS, POOL_MAX_CANDIDATES, BuildConfig
    from pipelines.ingest import INGEST_EXECUTORS, IngestConfig
    from pmd.download import BACKENDS, DownloadOptions
    from pmd.eval_screen import EvalScreenOptions
    from pmd.export import FORMATS as EXPORT_FORMATS
    from pmd.export import ExportOptions
    from pmd.fetch import fetch
    from pmd.images import ImageOptions
    from pmd_cli.defaults import default_of, field_default, keyword_default, shown
    from pmd_demo.demo import DemoConfig

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
    p.add_argument("--executor", choices=INGEST_EXECUTORS, default=field_default(IngestConfig, "executor"),
                   help="where chunks run: auto = Ray for inputs over 256 MB or when a cluster is named "
                        + default_of(IngestConfig, "executor"))
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else local)")
    p.add_argument("--chunk-records", type=int, default=field_default(IngestConfig, "chunk_records"),
                   help="records per part file (unit of work) " + default_of(IngestConfig, "chunk_records"))
    p.add_argument(*STORAGE_OPTION_ARGS, **STORAGE_OPTION_KWARGS)  # inputs may be URLs (docs/build.md)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ingest)

    from pmd_cli import stats as cli_stats

    cli_stats.add_parser(sub)

    p = sub.add_parser("demo", help="the whole system offline: generate, serve, build, verify, audit, train, eval")
    p.add_argument("--out", default="pmd-demo", help="where everything goes (default: ./pmd-demo)")
    p.add_argument("--quick", action="store_true", help="CI size: fewer images and training steps")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default {DemoConfig(out=Path('.')).train_steps}; "
                        f"--quick {DemoConfig.quick(Path('.')).train_steps})")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("build", help="sources -> images -> dedup -> shuffled Parquet shards + failures + manifest")
    p.add_argument("source", nargs="?", help="source name (one-source form), see `pmd sources`")
    p.add_argument("inputs", nargs="*", help="the source's upstream metadata files")
    p.add_argument("--config", help="TOML/YAML file listing several sources (see docs/build.md)")
    p.add_argument("--out", required=True, help="output directory or object-storage URL such as s3://bucket/pmd "
                   "(resumable: rerun the same command)")
    p.add_argument("--work", default=None, metavar="DIR|URL", help="the build's work state, a directory or a URL "
                   "such as s3://bucket/work (default OUT/work, on OUT's store; see docs/build.md)")
    p.add_argument(*STORAGE_OPTION_ARGS, **STORAGE_OPTION_KWARGS)
    p.add_argument("--images", action="append", default=[], metavar="PATH",
                   help="archive(s) or directory holding the images (archive sources); repeatable")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="adapter option")
    p.add_argument("--shard-rows", type=int, default=None,
                   help="rows per shard " + default_of(BuildConfig, "shard_rows"))
    p.add_argument("--row-group-rows", type=int, default=None,
                   help="rows per Parquet row group " + default_of(BuildConfig, "row_group_rows"))
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="candidates per image task " + default_of(BuildConfig, "chunk_rows"))
    p.add_argument("--seed", type=int, default=None, help="shuffle seed " + default_of(BuildConfig, "seed"))
    p.add_argument("--image-size", type=int, default=None,
                   help="shorter side after resize; 0 keeps the size " + default_of(ImageOptions, "image_size"))
    p.add_argument("--jpeg-quality", type=int, default=None,
                   help="JPEG quality of stored images " + default_of(ImageOptions, "jpeg_quality"))
    p.add_argument("--max-image-bytes", type=int, default=None,
                   help="bytes of one image (download body or archive member) above which the row fails as "
                        "too_large " + default_of(ImageOptions, "max_image_bytes"))
    p.add_argument("--timeout", type=float, default=None,
                   help="download timeout in seconds " + default_of(DownloadOptions, "timeout"))
    p.add_argument("--retries", type=int, default=None,
                   help="download retries " + default_of(DownloadOptions, "retries"))
    p.add_argument("--threads", type=int, default=None,
                   help="download threads per task " + default_of(DownloadOptions, "thread_count"))
    p.add_argument("--user-agent-token", default=None,
                   help="token added to the User-Agent " + default_of(DownloadOptions, "user_agent_token"))
    p.add_argument("--ignore-robots", action="store_true",
                   help="do not honour robots.txt nor X-Robots-Tag noai/noindex (docs/build.md, Politeness)")
    p.add_argument("--download-backend", choices=BACKENDS, default=None,
                   help="URL image downloader: http (keep-alive pools, polite per host) or img2dataset "
                        + default_of(DownloadOptions, "backend"))
    p.add_argument("--max-per-host", type=int, default=None,
                   help="http backend: connections per host (or catalog host group) for the whole build, every "
                        "download process together " + default_of(DownloadOptions, "max_per_host"))
    p.add_argument("--max-rate-per-host", type=float, default=None, metavar="R",
                   help="http backend: requests per second per host (or host group) for the whole build "
                        + default_of(DownloadOptions, "max_rate_per_host") + "; 0: no rate cap")
    p.add_argument("--placeholder-min-urls", type=int, default=None, metavar="N",
                   help="an image served for at least N distinct URLs fails as placeholder "
                        + default_of(DownloadOptions, "placeholder_min_urls") + "; 0: off")
    p.add_argument("--allow-network", action="append", default=[], metavar="CIDR",
                   help="also connect to this network (a mirror, a test server), e.g. 10.1.0.0/16 or 127.0.0.1/32; "
                        "repeatable. Without it only globally routable addresses are fetched: loopback, private, "
                        "link-local (cloud metadata), CGNAT ... fail as blocked_address (docs/build.md, Network "
                        "safety) " + default_of(DownloadOptions, "allow_networks"))
    p.add_argument("--resolver", default=None, metavar="ADDR",
                   help="ask this DNS resolver (IP[:PORT], e.g. a local caching resolver) instead of the system's "
                        + default_of(DownloadOptions, "resolver"))
    p.add_argument("--dns-timeout", type=float, default=None, metavar="S",
                   help="seconds one DNS lookup may take, then the row fails dns_error (transient) "
                        + default_of(DownloadOptions, "dns_timeout"))
    p.add_argument("--retry-failures", action="store_true", default=None,
                   help="download again the rows whose last failure is transient (timeouts, 429, 5xx, ...)")
    p.add_argument("--executor", choices=EXECUTORS, default=None,
                   help=f"auto (pool up to {POOL_MAX_CANDIDATES:,} candidates without a cluster, else ray), ray, "
                        "pool (a process pool on this machine, no Ray) or local (in-process, one task at a time) "
                        + default_of(BuildConfig, "executor"))
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else local)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the embedded local Ray or the pool (default: all)")
    p.add_argument("--task-cpus", type=float, default=None,
                   help="CPUs per image/shard task " + default_of(BuildConfig, "task_cpus"))
    p.add_argument("--json", action="store_true", help="print accounting and timings as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--decontaminate-against", action="append", default=[], metavar="PATH",
                   help="evaluation images (folder, zip or tar; repeatable): corpus images within the pHash "
                        "threshold of one fail as eval_overlap")
    p.add_argument("--eval-flickr-ids", action="append", default=[], metavar="PATH",
                   help="Karpathy dataset_flickr30k.json / dataset_coco.json / caption_datasets.zip or COCO "
                        "captions_*2014.json (repeatable): candidates that are these Flickr photos fail as "
                        "eval_overlap before download")
    p.add_argument("--eval-hash-threshold", type=int, default=None,
                   help="largest pHash Hamming distance taken as the same image "
                        + default_of(EvalScreenOptions, "threshold"))
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("verify", help="re-read every shard of a build against its manifest")
    p.add_argument("out", help="the build directory")
    p.add_argument("--no-sha256", action="store_true", help="skip the (slow) file digests")
    p.add_argument(*STORAGE_OPTION_ARGS, **STORAGE_OPTION_KWARGS)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("card", help="rewrite a built corpus's dataset card (README.md) and croissant.json from its "
                       "manifest")
    p.add_argument("out", help="the build directory or object-storage URL")
    p.add_argument(*STORAGE_OPTION_ARGS, **STORAGE_OPTION_KWARGS)
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("fetch-metadata", help="download the catalog's public upstream metadata files (resumable)")
    p.add_argument("sources", nargs="*", help="source names (default: all), see `pmd sources`")
    p.add_argument("--to", required=True, help="directory for the files and fetched.json")
    p.add_argument("--mirror", default=None, help="fetch HOST/PATH from this base URL instead (a cache or mirror); "
                   "its host's addresses are admitted by the address guard for this command")
    p.add_argument("--allow-network", action="append", default=[], metavar="CIDR",
                   help="also connect to this network (repeatable); otherwise only global addresses and --mirror's")
    p.add_argument("--attempts", type=int, default=keyword_default(fetch, "attempts"),
                   help=f"tries per file, each resuming the last (default {keyword_default(fetch, 'attempts')})")
    p.add_argument("--timeout", type=float, default=keyword_default(fetch, "timeout"),
                   help=f"connect/read timeout in seconds (default {shown(keyword_default(fetch, 'timeout'))})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_fetch_metadata)

    p = sub.add_parser("takedown", help="remove the pairs a removal request names from a built corpus")
    p.add_argument("out", help="the build directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--urls", metavar="FILE", help="image URLs to remove, one per line")
    which.add_argument("--keys", metavar="FILE", help="pair keys to remove, one per line")
    which.add_argument("--image-sha256", metavar="FILE", help="image sha256 digests to remove, one per line")
    p.add_argument("--reason", default=None, help="recorded with the request and in each failure's detail")
    p.add_argument(*STORAGE_OPTION_ARGS, **STORAGE_OPTION_KWARGS)  # OUT and the list may be URLs
    p.set_defaults(func=cmd_takedown)

    p = sub.add_parser("export", help="a built corpus in another format (WebDataset tars)")
    p.add_argument("build", help="the build directory")
    p.add_argument("--format", choices=EXPORT_FORMATS, required=True, help="output format")
    p.add_argument("--out", required=True, help="output directory (resumable: rerun the same command)")
    p.add_argument("--shard-size", type=int, default=field_default(ExportOptions, "shard_size"),
                   help="pairs per tar " + default_of(ExportOptions, "shard_size"))
    p.add_argument(*STORAGE_OPTION_ARGS, **STORAGE_OPTION_KWARGS)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    redact.install()
    try:
        storage.add_options(getattr(args, "storage_option", None) or [])
        return args.func(args)
    except Exception as exc:
        code = exit_code(args.command, exc)
        if code is None:
            raise
        print(redact.text(f"pmd {args.command}: error: {exc}"), file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
