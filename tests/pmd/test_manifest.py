"""pmd.manifest: one reader and writer; a manifest read and written again is byte-identical."""

import json

import pytest

from pmd.manifest import (FileEntry, Manifest, ManifestError, ManifestMissing, accounting_problems, identity_holds,
                          manifest_path)


def test_round_trip_is_byte_identical_and_entries_are_typed(tmp_path):
    data = {"format": "pmd-build", "schema_version": 1, "zeta_unknown_section": {"b": 2, "a": 1},
            "shards": [{"file": "shards/shard-00000.parquet", "rows": 3, "bytes": 10, "sha256": "ab",
                        "sources": {"sbu": 1, "coco": 2}}],
            "failures": [], "accounting": {"coco": {"input_rows": 5, "pairs": 2, "rejects": 1, "failures": 2}}}
    text = json.dumps(data, indent=2) + "\n"
    (tmp_path / "manifest.json").write_text(text)
    m = Manifest.read(tmp_path)
    assert m.shards == [FileEntry("shards/shard-00000.parquet", 3, 10, "ab", {"sbu": 1, "coco": 2})]
    assert m.rows == 3 and m.shard_locations() == [tmp_path / "shards" / "shard-00000.parquet"]
    assert m.format_problem is None and m.accounting_problems() == []
    (tmp_path / "manifest.json").unlink()
    m.write()
    assert (tmp_path / "manifest.json").read_text() == text


def test_the_identity_and_its_sentence():
    good = {"input_rows": 7, "pairs": 3, "rejects": 2, "failures": 2}
    bad = dict(good, failures=1)
    assert identity_holds(good) and not identity_holds(bad)
    assert accounting_problems({"coco": good, "sbu": bad}) == [
        "sbu: input_rows 7 != pairs 3 + rejects 2 + failures 1"]


def test_bad_manifests_are_clear_errors(tmp_path):
    with pytest.raises(ManifestMissing, match="not a finished pmd build"):
        Manifest.read(tmp_path)
    manifest_path(tmp_path).write_text("{nope")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.read(tmp_path)
    manifest_path(tmp_path).write_text('{"format": "pmd-build", "shards": {"file": "x"}}')
    with pytest.raises(ManifestError, match="`shards` is not a list of file entries"):
        Manifest.read(tmp_path)
    manifest_path(tmp_path).write_text('{"format": "other"}')
    assert "format is 'other', not 'pmd-build'" in Manifest.read(tmp_path).format_problem
