"""pmd.atomic: a killed writer never leaves a partial file under the final name, and its leftovers are found."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pmd import atomic


def test_json_parquet_ipc_land_whole_and_leave_no_temporary(tmp_path):
    atomic.write_json({"b": 1, "a": [1, 2]}, tmp_path / "x" / "m.json")
    assert (tmp_path / "x" / "m.json").read_text() == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'
    table = pa.table({"k": ["a", "b", "c"]})
    atomic.write_parquet(table, tmp_path / "t.parquet", row_group_size=2)
    assert pq.read_table(tmp_path / "t.parquet").equals(table)
    assert pq.ParquetFile(tmp_path / "t.parquet").num_row_groups == 2
    atomic.write_ipc(table, tmp_path / "t.arrow")
    assert pa.ipc.open_file(pa.memory_map(str(tmp_path / "t.arrow"))).read_all().equals(table)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m.json", "t.arrow", "t.parquet", "x"]


def test_files_written_back_to_back_land_as_one_file_with_their_lengths(tmp_path):
    """write_concatenated (a scatter group's pack): on disk and on a store, each source whole, in order, from its
    start whatever its position; the lengths it returns are where each one begins and ends."""
    import tempfile

    from pmd import storage

    parts = [b"first" * 1000, b"", bytes(range(256)) * 40_000, b"x"]  # the third larger than a read block
    sources = []
    for data in parts:
        f = tempfile.TemporaryFile()
        f.write(data)  # left at its end: the writer must start each from the beginning
        sources.append(f)
    for target in (str(tmp_path / "packs" / "g.pack"), f"memory://concatenated-{os.getpid()}/packs/g.pack"):
        assert atomic.write_concatenated(sources, target) == [len(p) for p in parts]
        assert storage.read_bytes(target) == b"".join(parts)
    assert sorted(p.name for p in (tmp_path / "packs").iterdir()) == ["g.pack"]  # no temporary left
    for f in sources:
        f.close()


def test_an_exception_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "m.json"
    atomic.write_json({"v": 1}, target)
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(target) as f:
            f.write(b"{half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_directory_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "tok"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic.atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (target / "new.txt").exists()  # nothing visible before the block ends
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_a_killed_writer_leaves_only_a_temporary_name_that_is_cleaned_up(tmp_path):
    """kill -9 in the middle of a write: the final name never appears; remove_temp_files finds the rest."""
    target = tmp_path / "d" / "shard.parquet"
    code = ("import os, sys\nfrom pmd import atomic\n"
            "with atomic.atomic_file(sys.argv[1]) as f:\n"
            "    f.write(b'x' * 1000); f.flush(); os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True)
    assert proc.returncode == -9
    left = list(target.parent.iterdir())
    assert not target.exists() and len(left) == 1 and atomic.is_temp_name(left[0].name)
    assert left[0].name.startswith(".shard.parquet.tmp-")
    (tmp_path / "d" / ".partdir.tmp-7").mkdir()
    (tmp_path / "d" / ".partdir.tmp-7" / "x").write_text("x")
    assert atomic.remove_temp_files(tmp_path) == 2
    assert list(target.parent.iterdir()) == []


def test_temp_name_convention():
    assert atomic.temp_path("/a/b.json").name == f".b.json.tmp-{os.getpid()}"
    assert atomic.temp_path("/a/step-00000010", owner="ranks").name == ".step-00000010.tmp-ranks"
    assert not atomic.is_temp_name("b.json") and not atomic.is_temp_name(".hidden")
