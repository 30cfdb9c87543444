"""pmd.storage and pmd.atomic on object storage (moto's S3 server on loopback) and on local disk alike."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pmd import atomic, storage
from tests.s3server import Traffic, s3_server


@pytest.fixture(scope="module")
def s3():
    with s3_server() as env:
        yield env


@pytest.fixture
def s3_env(s3, monkeypatch):
    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(storage.OPTIONS_ENV, "{}")  # recorded: restored after the test
    return s3


def test_is_remote_and_join():
    assert storage.is_remote("s3://b/x") and storage.is_remote("memory://x")
    assert not storage.is_remote("/a/b") and not storage.is_remote("rel/b") and not storage.is_remote("file:///a")
    assert storage.join("s3://b/x/", "shards", "a.parquet") == "s3://b/x/shards/a.parquet"
    assert storage.basename("s3://b/x/shards/a.parquet") == "a.parquet"
    assert storage.parse_options(["endpoint_override=http://h:1", "allow_bucket_creation=true", "n=3"]) == {
        "endpoint_override": "http://h:1", "allow_bucket_creation": True, "n": 3}
    with pytest.raises(storage.StorageError, match="KEY=VALUE"):
        storage.parse_options(["no-equals-sign"])


def test_files_on_s3_are_written_whole_listed_read_and_deleted(s3_env):
    base = "s3://pmd/storage-test"
    atomic.write_json({"a": 1}, storage.join(base, "m.json"))
    table = pa.table({"k": ["x", "y", "z"]})
    atomic.write_parquet(table, storage.join(base, "shards", "s-1.parquet"), row_group_size=2)
    atomic.write_bytes(b"tar", storage.join(base, "shards", "t.tar"))
    assert storage.read_text(storage.join(base, "m.json")) == '{\n  "a": 1\n}\n'
    assert pq.ParquetFile(storage.open_input(storage.join(base, "shards", "s-1.parquet"))).read().equals(table)
    assert storage.list_files(storage.join(base, "shards"), ".parquet") == [f"{base}/shards/s-1.parquet"]
    assert storage.list_files(base, recursive=True) == [f"{base}/m.json", f"{base}/shards/s-1.parquet",
                                                        f"{base}/shards/t.tar"]
    assert storage.is_dir(base) and not storage.is_dir("s3://pmd/nothing-here")
    assert storage.size(storage.join(base, "shards", "t.tar")) == 3
    # A writer that fails leaves no object (the PUT happens only once the file is complete).
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(storage.join(base, "half.json")) as f:
            f.write(b"{")
            raise RuntimeError("killed")
    assert not storage.exists(storage.join(base, "half.json"))
    storage.delete(storage.join(base, "m.json"))
    storage.delete(storage.join(base, "m.json"))  # missing: not an error
    assert not storage.exists(storage.join(base, "m.json"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "m.json"))


def test_a_whole_object_is_read_in_one_get_and_no_head(monkeypatch):
    """read_bytes (every work file the build reads back) is one request; pyarrow's stream made it a HEAD and a
    ranged GET per 256 KiB. With a storage option botocore's client does not mirror it stays with pyarrow."""
    traffic = Traffic()
    with s3_server(traffic=traffic) as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv(storage.OPTIONS_ENV, "{}")
        data = bytes(range(256)) * (12 << 10)  # 3 MiB
        atomic.write_bytes(data, "s3://pmd/one-get/blob.gz")  # .gz: its own bytes, nothing decompressed
        traffic.reset()
        assert storage.read_bytes("s3://pmd/one-get/blob.gz") == data
        assert dict(traffic.requests) == {("GET", "/pmd/one-get/blob.gz"): 1}
        assert traffic.bytes_out["/pmd/one-get/blob.gz"] == len(data)
        with pytest.raises(FileNotFoundError, match="no-such"):
            storage.read_bytes("s3://pmd/one-get/no-such")
        with pytest.raises(FileNotFoundError):
            storage.read_bytes("s3://no-such-bucket/x")
        # A marker not yet written: one HEAD, no listing of its prefix (pyarrow's file info adds one)
        traffic.reset()
        assert not storage.is_file("s3://pmd/one-get/marker.json")
        assert dict(traffic.requests) == {("HEAD", "/pmd/one-get/marker.json"): 1}
        assert storage.is_file("s3://pmd/one-get/blob.gz") and not storage.is_file("s3://pmd/one-get")
        assert storage.is_dir("s3://pmd/one-get") and storage.exists("s3://pmd/one-get")
        atomic.write_bytes(b"x", "s3://pmd/one-get/gone/last")
        traffic.reset()
        storage.delete("s3://pmd/one-get/gone/last")
        storage.delete("s3://pmd/one-get/gone/last")  # missing: not an error
        assert dict(traffic.requests) == {("DELETE", "/pmd/one-get/gone/last"): 2}  # no HEAD, no parent marker
        assert not storage.exists("s3://pmd/one-get/gone/last") and not storage.is_dir("s3://pmd/one-get/gone")
        # A tree: one LIST and one multi-object DELETE; a sibling sharing the name's start stays; no parent marker
        for name in ("tree/a", "tree/sub/b", "tree/sub/c", "treehouse/d"):
            atomic.write_bytes(b"x", f"s3://pmd/one-get/{name}")
        traffic.reset()
        storage.remove_tree("s3://pmd/one-get/tree")
        assert sorted(m for m, _ in traffic.requests.elements()) == ["GET", "POST"]
        assert storage.list_files("s3://pmd/one-get", recursive=True) == ["s3://pmd/one-get/blob.gz",
                                                                          "s3://pmd/one-get/treehouse/d"]
        storage.remove_tree("s3://pmd/one-get/tree")  # nothing there: not an error
        # Several files: one multi-object DELETE; missing ones (and a missing bucket) are not an error
        for name in ("many/a", "many/b", "many/c"):
            atomic.write_bytes(b"x", f"s3://pmd/one-get/{name}")
        traffic.reset()
        storage.delete_many([f"s3://pmd/one-get/many/{n}" for n in "abz"])
        assert [m for m, _ in traffic.requests.elements()] == ["POST"]
        assert storage.list_files("s3://pmd/one-get/many") == ["s3://pmd/one-get/many/c"]
        storage.delete_many(["s3://no-such-bucket/x"])
        storage.remove_tree("s3://no-such-bucket/tree")
        monkeypatch.setenv(storage.OPTIONS_ENV, json.dumps({"connect_timeout": 5.0}))
        traffic.reset()
        assert storage.read_bytes("s3://pmd/one-get/blob.gz") == data
        assert traffic.requests[("HEAD", "/pmd/one-get/blob.gz")] == 1  # pyarrow's client, which honours the option


def test_a_byte_range_is_one_ranged_get_and_a_range_past_the_end_is_an_error(monkeypatch, tmp_path):
    """read_range (a bucket's piece in a scatter group's pack) returns exactly the bytes asked for: on S3 one GET
    that sends only those bytes, on disk a seek and a read; a range past the end raises, never returns fewer."""
    data = bytes(range(256)) * 4096  # 1 MiB, every offset distinguishable
    local = tmp_path / "pack"
    local.write_bytes(data)
    traffic = Traffic()
    with s3_server(traffic=traffic) as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        for options in ("{}", json.dumps({"connect_timeout": 5.0})):  # botocore's client, then pyarrow's
            monkeypatch.setenv(storage.OPTIONS_ENV, options)
            atomic.write_bytes(data, "s3://pmd/ranges/pack")
            for offset, length in ((0, 1), (1000, 70_001), (len(data) - 5, 5), (3, 0)):
                expected = data[offset:offset + length]
                assert storage.read_range(str(local), offset, length) == expected
                traffic.reset()
                assert storage.read_range("s3://pmd/ranges/pack", offset, length) == expected
                if options == "{}":
                    assert dict(traffic.requests) == ({("GET", "/pmd/ranges/pack"): 1} if length else {})
                    assert traffic.bytes_out["/pmd/ranges/pack"] == length
            for location in (str(local), "s3://pmd/ranges/pack"):
                with pytest.raises(OSError, match="shorter|Range|range"):
                    storage.read_range(location, len(data) - 5, 6)
            with pytest.raises(FileNotFoundError):
                storage.read_range("s3://pmd/ranges/no-such", 0, 4)
        with pytest.raises(FileNotFoundError):
            storage.read_range(str(tmp_path / "no-such"), 0, 4)


def test_options_come_from_the_environment_or_the_command_line(s3, monkeypatch):
    """Without AWS_ENDPOINT_URL the client would go to AWS; the endpoint given as a storage option reaches moto."""
    for k, v in s3.items():
        if k != "AWS_ENDPOINT_URL":
            monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv(storage.OPTIONS_ENV, "{}")  # recorded: restored after the test
    storage.add_options([f"endpoint_override={s3['AWS_ENDPOINT_URL']}"])
    assert json.loads(storage.os.environ[storage.OPTIONS_ENV]) == {"endpoint_override": s3["AWS_ENDPOINT_URL"]}
    atomic.write_json([1], "s3://pmd/opts/x.json")
    assert storage.read_text("s3://pmd/opts/x.json") == "[\n  1\n]\n"
    monkeypatch.setenv(storage.OPTIONS_ENV, json.dumps({"no_such_option": 1}))
    with pytest.raises(storage.StorageError, match="no_such_option"):
        storage.exists("s3://pmd/opts/x.json")


def test_a_remote_work_path_joins_lists_and_deletes_like_a_path():
    """storage.RemotePath on fsspec's in-memory store: the operations the work layout uses, and no `Path()` fold."""
    import pickle
    from pathlib import Path

    root = storage.as_path("memory://work-path-test/w")
    assert isinstance(root, storage.RemotePath)
    assert str(root / "final" / "a.json") == "memory://work-path-test/w/final/a.json"
    assert storage.as_path("/tmp/x") == Path("/tmp/x")
    atomic.write_json({"n": 1}, root / "final" / "group-00001.json")
    atomic.write_json({"n": 2}, root / "final" / "group-00000.json")
    atomic.write_bytes(b"x", root / "final" / "bucket-00000.arrow")
    found = (root / "final").glob("group-*.json")
    assert [p.name for p in found] == ["group-00000.json", "group-00001.json"]
    assert json.loads(found[1].read_text()) == {"n": 1} and found[1].parent == root / "final"
    assert (root / "final" / "nothing").glob("*") == []
    (root / "final" / "group-00000.json").unlink()
    assert not (root / "final" / "group-00000.json").exists()
    (root / "final" / "group-00000.json").unlink(missing_ok=True)
    storage.remove_tree(root / "final")
    assert (root / "final").glob("*") == [] and not (root / "final" / "bucket-00000.arrow").exists()
    assert pickle.loads(pickle.dumps(root)) == root
