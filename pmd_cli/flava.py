"""The ``flava`` command: thin wrappers over flava.train, flava.evaluate and flava.tokenizer.

    flava train --config configs/tiny.yaml --data BUILD --out RUN [--steps N] [--nproc N] [key=value ...]
    flava eval retrieval --checkpoint RUN --data SHARDS [--split test] [--save-embeddings FILE.npz] [--json]
    flava eval retrieval --checkpoint RUN --karpathy caption_datasets.zip --karpathy-dataset coco --images val2014.zip
    flava eval zeroshot --checkpoint RUN --data SHARDS --classes "red circle,blue square" [--single-template] [--json]
    flava eval zeroshot --checkpoint RUN --data IMAGEFOLDER|TARS|PARQUET --classes imagenet [--templates FILE]
    flava eval linear-probe --checkpoint RUN --train DATA --test DATA [--save-embeddings FILE.npz] [--json]
    flava eval suite --checkpoint RUN --config eval.toml --out DIR [--paper]
    flava tokenizer train --data SHARDS --out DIR [--vocab-size N]
    flava export --checkpoint RUN --out DIR
    flava fetch-assets --config CONFIG --to DIR [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from pmd import redact


def _user_errors():
    from flava.assets import AssetError, FetchError
    from flava.checkpoint import CheckpointError
    from flava.data import DataError
    from flava.run_config import ConfigError
    from flava.tokenizer import TokenizerError

    return (ConfigError, DataError, CheckpointError, TokenizerError, AssetError, FetchError)


_OVERRIDE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flava", description="FLAVA pretraining and evaluation on PMD shards")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="pretrain (resumes from the latest checkpoint in --out)")
    t.add_argument("--config", required=True, help="YAML file, or a packaged config name: tiny, flava_full")
    t.add_argument("--data", nargs="+", default=None, help="pair shards: build dir, manifest.json, dir or .parquet")
    t.add_argument("--images", nargs="+", default=None, help="image-only data (image shards or folders), for MIM")
    t.add_argument("--text", nargs="+", default=None, help="text-only data (Parquet `text` column or .txt), for MLM")
    t.add_argument("--out", required=True, help="run directory (metrics.jsonl, checkpoints/, tokenizer/, final/)")
    t.add_argument("--steps", type=int, default=None, help="train until this optimizer step (run.steps)")
    t.add_argument("--nproc", type=int, default=None, help="spawn N local processes (torchrun --standalone)")
    t.add_argument("overrides", nargs="*", help="dotted key=value config overrides, e.g. optim.lr=1e-4 (anywhere)")

    e = sub.add_parser("eval", help="zero-shot evaluation")
    esub = e.add_subparsers(dest="eval_command", required=True)
    for name, helptext in (("retrieval", "image-text retrieval R@1/5/10"), ("zeroshot", "zero-shot classification"),
                           ("linear-probe", "logistic regression on frozen image features (CLIP's protocol)"),
                           ("suite", "the tasks of an eval.toml: one JSON and a Markdown table")):
        q = esub.add_parser(name, help=helptext)
        q.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir, or transformers FLAVA dir/name")
        q.add_argument("--device", default="cpu")
        q.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "suite":
            q.add_argument("--config", required=True, help="the suite's TOML file (example: configs/eval.toml)")
            q.add_argument("--out", required=True, help="directory for results.json and results.md")
            q.add_argument("--paper", action=argparse.BooleanOptionalAction, default=None,
                           help="show the paper's figures (default: when the checkpoint is the published model)")
            continue
        q.add_argument("--limit", type=int, default=None, help="at most this many rows (default: the whole split)")
        if name == "linear-probe":
            q.add_argument("--train", nargs="+", required=True, help="labelled train split (any zeroshot format)")
            q.add_argument("--test", nargs="+", required=True, help="labelled test split")
            q.add_argument("--format", default=None,
                           help="imagefolder, webdataset, parquet or shards (default: detected)")
            q.add_argument("--label-column", default="label", help="Parquet label column")
            q.add_argument("--seed", type=int, default=0, help="the held-out validation part's draw")
            q.add_argument("--save-embeddings", default=None, metavar="FILE.npz",
                           help="cache the features here; an existing file is read instead of running the model")
            continue
        q.add_argument("--data", nargs="+", default=None if name == "retrieval" else argparse.SUPPRESS,
                       required=name != "retrieval", help="held-out pair shards, or a labelled image set")
        q.add_argument("--split", default=None, help="only rows whose split column equals this")
        if name == "retrieval":
            q.add_argument("--save-embeddings", default=None, metavar="FILE.npz",
                           help="write image_embeddings, text_embeddings and text_image_index (each text's image)")
            q.add_argument("--karpathy", default=None, help="Karpathy's dataset_coco.json / dataset_flickr30k.json "
                                                           "or caption_datasets.zip (then --split defaults to test)")
            q.add_argument("--karpathy-dataset", default=None, help="coco or flickr30k: the member of a zip")
            q.add_argument("--images", nargs="+", default=None, help="the Karpathy split's image archives/folders")
        if name == "zeroshot":
            q.add_argument("--classes", required=True,
                           help="'imagenet' (bundled), comma-separated class names, or a file with one a line")
            q.add_argument("--templates", default=None,
                           help="'|'-separated prompt templates with {}, a file, or 'imagenet' "
                                "(default: CLIP's 80 ImageNet templates)")
            q.add_argument("--single-template", action="store_true",
                           help="only 'a photo of a {}.' instead of the 80-template ensemble")
            q.add_argument("--label-key", default="label", help="key of the true label in the meta JSON column")
            q.add_argument("--format", default=None,
                           help="imagefolder, webdataset, parquet or shards (default: detected)")
            q.add_argument("--label-column", default="label", help="Parquet label column")

    k = sub.add_parser("tokenizer", help="tokenizer tools")
    ksub = k.add_subparsers(dest="tok_command", required=True)
    kt = ksub.add_parser("train", help="train a BERT-uncased WordPiece vocabulary on captions")
    kt.add_argument("--data", nargs="+", required=True, help="shards / Parquet with a text column / .txt files")
    kt.add_argument("--out", required=True)
    kt.add_argument("--vocab-size", type=int, default=30522)
    kt.add_argument("--limit", type=int, default=1_000_000, help="at most this many texts")

    f = sub.add_parser("fetch-assets", help="download the hub assets a config needs, for offline runs")
    f.add_argument("--config", required=True, help="YAML file, or a packaged config name: tiny, flava_full")
    f.add_argument("--to", required=True, help="directory for the assets, assets.json and config.yaml")
    f.add_argument("--json", action="store_true", help="print the manifest as one JSON object")
    f.add_argument("overrides", nargs="*", help="dotted key=value config overrides, as for `flava train`")

    x = sub.add_parser("export", help="export a run's latest checkpoint to transformers format")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True)
    return p


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less ``--nproc N`` / ``--nproc=N``: what each spawned process runs."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    return rest


def _cmd_train(args, argv) -> int:
    from flava.assets import check_assets
    from flava.run_config import load_train_config

    cfg = load_train_config(args.config, args.overrides, args.data, args.images, args.text, args.steps)
    if args.nproc is not None and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        # validated here first, so a bad config fails once and clearly instead of in every child
        from flava.distributed import launch_local

        cfg.validate(args.nproc)
        check_assets(cfg, args.config, args.overrides)
        return launch_local(["-m", "pmd_cli.flava", *_without_nproc(argv)], args.nproc)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one download per node; the other ranks read the cache
        check_assets(cfg, args.config, args.overrides)
    from flava.train import train

    summary = train(cfg, args.out)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"run": str(args.out), **{k: v for k, v in summary.items() if k != "last"},
                          "last": summary.get("last")}))
    return 0


def _print_result(res: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(res))
        return
    for k, v in res.items():
        print(f"{k:>12}: {v:.4f}" if isinstance(v, float) else f"{k:>12}: {v}")


def _cmd_eval(args) -> int:
    from flava import evaluate
    from flava.assets import check_model_arg

    check_model_arg(args.checkpoint)
    if args.eval_command == "suite":
        from flava.eval_suite import RESULTS_JSON, RESULTS_MD, run_suite

        res = run_suite(args.checkpoint, args.config, args.out, device=args.device, paper=args.paper)
        if args.json:
            print(json.dumps(res, default=str))
        else:
            print((Path(args.out) / RESULTS_MD).read_text(), end="")
            print(f"results: {Path(args.out) / RESULTS_JSON}")
        return 0
    limit = args.limit or None
    if args.eval_command == "retrieval":
        res = evaluate.retrieval(args.checkpoint, args.data, split=args.split, limit=limit, device=args.device,
                                 save_embeddings=args.save_embeddings, karpathy=args.karpathy, images=args.images,
                                 karpathy_dataset=args.karpathy_dataset)
    elif args.eval_command == "linear-probe":
        from flava.linear_probe import run

        res = run(args.checkpoint, args.train, args.test, fmt=args.format, label_column=args.label_column,
                  limit=limit, device=args.device, save_embeddings=args.save_embeddings, seed=args.seed)
    else:
        from flava.eval_data import load_classes, load_templates

        templates = load_templates(args.templates)
        if args.templates is None and args.single_template:
            templates = load_templates("single")
        res = evaluate.zeroshot(args.checkpoint, args.data, load_classes(args.classes), templates,
                                label_key=args.label_key, split=args.split, limit=limit, device=args.device,
                                fmt=args.format, label_column=args.label_column)
    _print_result(res, args.json)
    return 0


def _cmd_tokenizer(args) -> int:
    from flava.data import iter_texts
    from flava.tokenizer import train_wordpiece

    tok = train_wordpiece(iter_texts(args.data, limit=args.limit), args.out, vocab_size=args.vocab_size)
    print(json.dumps({"out": args.out, "vocab_size": len(tok)}))
    return 0


def _cmd_export(args) -> int:
    from flava.assets import check_model_arg
    from flava.convert import export_checkpoint

    check_model_arg(args.checkpoint)
    ckpt = export_checkpoint(args.checkpoint, args.out)
    print(json.dumps({"out": args.out, "from": str(ckpt)}))
    return 0


def _cmd_fetch_assets(args) -> int:
    from flava.assets import fetch_assets

    manifest = fetch_assets(args.config, args.to, args.overrides)
    if args.json:
        print(json.dumps(manifest))
        return 0
    for rec in manifest["assets"]:
        print(f"fetched {rec['name']}: {rec['repo_id']}@{rec['revision']} ({len(rec['files'])} files)")
    print(f"manifest: {os.path.join(args.to, 'assets.json')}")
    print(f"offline run: flava train --config {manifest['config_copy']} ...")
    if manifest["overrides"]:
        print("or add to the original config: " + " ".join(manifest["overrides"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # key=value overrides may stand anywhere, also after --data's paths (which would otherwise swallow them)
    overrides = [a for a in argv if _OVERRIDE_RE.match(a)]
    args = _parser().parse_args([a for a in argv if not _OVERRIDE_RE.match(a)])
    if args.command in ("train", "fetch-assets"):
        args.overrides = list(args.overrides) + overrides
    elif overrides:
        _parser().error(f"key=value overrides are only accepted by `flava train` and `fetch-assets`: {overrides}")
    rank = os.environ.get("RANK")
    fmt = ("[rank %s] " % rank if rank is not None else "") + "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt)
    redact.install()
    for noisy in ("httpx", "httpx2"):  # one INFO line per hub request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "train":
            return _cmd_train(args, argv)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "tokenizer":
            return _cmd_tokenizer(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "fetch-assets":
            return _cmd_fetch_assets(args)
    except _user_errors() as e:
        print(redact.text(f"flava: error: {e}"), file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
