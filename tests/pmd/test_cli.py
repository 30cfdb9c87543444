import json

from pmd_cli.pmd import main
from tests.real_fixtures import REAL


def test_ingest_prints_and_writes_counts(tmp_path, capsys):
    rc = main(["ingest", "conceptual_captions", str(REAL / "cc3m_sample.tsv"), "--out", str(tmp_path), "-q",
               "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["records"] == summary["counts"]["pairs"] == 30
    assert json.loads((tmp_path / "conceptual_captions" / "ingest.json").read_text()) == summary


def test_ingest_table_output(tmp_path, capsys):
    assert main(["ingest", "yfcc100m", str(REAL / "yfcc100m_sample.tsv"), "--out", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "records read" in out and "pairs + rejects" in out


def test_errors_name_the_problem_and_exit_nonzero(tmp_path, capsys):
    assert main(["ingest", "yfcc100m", str(tmp_path / "missing.tsv"), "--out", str(tmp_path)]) == 2
    assert "missing.tsv: no such file" in capsys.readouterr().err
    assert main(["ingest", "nope", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "unknown source 'nope'" in capsys.readouterr().err
    assert main(["ingest", "yfcc100m", str(REAL / "yfcc100m_sample.tsv"), "--out", str(tmp_path),
                 "-o", "lang_threshold=high"]) == 2
    assert "source 'yfcc100m': options.lang_threshold: expected a number, got 'high'" in capsys.readouterr().err
    assert main(["ingest", "yfcc100m", str(REAL / "yfcc100m_sample.tsv"), "--out", str(tmp_path), "-o", "x"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    truncated = tmp_path / "cut.tsv.gz"
    truncated.write_bytes(b"\x1f\x8b\x08\x00garbage")
    assert main(["ingest", "conceptual_12m", str(truncated), "--out", str(tmp_path)]) == 2
    assert "cut.tsv.gz" in capsys.readouterr().err


def test_build_config_errors_and_the_one_exit_code_table(tmp_path, capsys):
    from pmd_cli.pmd import exit_code

    bad = tmp_path / "b.toml"
    bad.write_text('shard_rowz = 5\n[[sources]]\nname = "coco"\ninputs = ["x"]\n')
    assert main(["build", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith(
        f"pmd build: error: {bad}: unknown key(s) ['shard_rowz']; accepted keys are ['chunk_rows', ")
    assert main(["build", "--config", str(bad), "coco", "x", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == ("pmd build: error: give either --config FILE or SOURCE INPUT... "
                                       "[--images PATH], not both\n")
    assert main(["build", "coco", "x", "--out", str(tmp_path / "o"), "--jpeg-quality", "101"]) == 2
    assert capsys.readouterr().err == ("pmd build: error: command line: image: ImageOptions.jpeg_quality must be "
                                       "in 1..100, got 101\n")

    from pipelines.build import BuildError
    from pmd.fetch import FetchError

    assert exit_code("build", BuildError("x")) == exit_code("demo", BuildError("x")) == 1
    assert exit_code("demo", RuntimeError("a stage failed")) == 1
    assert exit_code("build", RuntimeError("a bug")) is None  # keeps its traceback
    assert exit_code("fetch-metadata", FetchError("x")) == 2
    assert exit_code("verify", FileNotFoundError("f")) == 2
    from pmd.config_loader import ConfigError
    from pmd.manifest import ManifestError

    assert exit_code("build", ConfigError("c")) == exit_code("stats", ManifestError("m")) == 2
    # A ValueError or KeyError raised by our own code is a bug: it keeps its traceback.
    assert exit_code("stats", KeyError("k")) is exit_code("build", ValueError("v")) is None
    assert exit_code("stats", ZeroDivisionError()) is None


def test_a_bug_keeps_its_traceback(monkeypatch):
    import pmd.catalog
    import pytest

    def broken():
        raise KeyError("a bug in our code")

    monkeypatch.setattr(pmd.catalog, "load_catalog", broken)
    with pytest.raises(KeyError, match="a bug in our code"):
        main(["sources"])


def test_help_defaults_and_choices_come_from_the_config_dataclasses():
    """Each `(default X)` of `pmd build --help` is the default of the dataclass field the flag sets, and the
    choices are the library's own tuples (a default or a choice restated by hand drifts; one did)."""
    import argparse

    from pipelines.build import EXECUTORS, BuildConfig
    from pmd.download import BACKENDS, DownloadOptions
    from pmd.eval_screen import EvalScreenOptions
    from pmd.export import ExportOptions
    from pmd.images import ImageOptions
    from pmd_cli.defaults import field_default, shown
    from pmd_cli.pmd import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    build = {a.dest: a for a in sub.choices["build"]._actions}
    owners = {"shard_rows": (BuildConfig, "shard_rows"), "seed": (BuildConfig, "seed"),
              "task_cpus": (BuildConfig, "task_cpus"), "executor": (BuildConfig, "executor"),
              "image_size": (ImageOptions, "image_size"), "jpeg_quality": (ImageOptions, "jpeg_quality"),
              "timeout": (DownloadOptions, "timeout"), "threads": (DownloadOptions, "thread_count"),
              "max_per_host": (DownloadOptions, "max_per_host"), "download_backend": (DownloadOptions, "backend"),
              "eval_hash_threshold": (EvalScreenOptions, "threshold")}
    for dest, (cls, name) in owners.items():
        assert build[dest].help.endswith(f"(default {shown(field_default(cls, name))})"), (dest, build[dest].help)
    assert tuple(build["executor"].choices) == EXECUTORS and tuple(build["download_backend"].choices) == BACKENDS
    assert "thread pool" not in build["executor"].help and "process pool" in build["executor"].help
    export = parser.parse_args(["export", "b", "--format", "webdataset", "--out", "o"])
    assert export.shard_size == ExportOptions().shard_size
