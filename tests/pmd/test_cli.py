import json

from pmd.cli import main
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
