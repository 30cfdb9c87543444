"""Archives and metadata files read in place on object storage (the loopback S3 server): a few members of a large
zip or tar cost a small part of its bytes, a tar's member list is cached and not scanned again, every reader gives
what it gives for the same local file, and an object overwritten with other bytes of the same size gets a new
fingerprint."""

from __future__ import annotations

import random
import zipfile

import pytest

from pmd import storage
from pmd.archives import ArchiveIndex
from pmd.ingest import input_fingerprint
from pmd.sources.base import InputError
from pmd.sources.inputs import iter_json_items, iter_line_ranges, iter_lines, require_file
from tests.archive_files import write_tar, write_zip
from tests.s3server import Traffic, s3_environment

MEMBERS = 48
MEMBER_BYTES = 200_000


@pytest.fixture(scope="module")
def s3():
    traffic = Traffic()
    with s3_environment(traffic=traffic):
        yield traffic


@pytest.fixture(scope="module")
def archives(s3, tmp_path_factory):
    """The same ~9.6 MB of incompressible members as a stored zip, a plain tar and a folder, locally and on S3."""
    root = tmp_path_factory.mktemp("archives")
    rng = random.Random(7)
    members = {f"images/{i:03d}.jpg": rng.randbytes(MEMBER_BYTES) for i in range(MEMBERS)}
    write_zip(root / "big.zip", members, compression=zipfile.ZIP_STORED)
    write_tar(root / "big.tar", members, mode="w")
    (root / "folder" / "images").mkdir(parents=True)
    for name, data in list(members.items())[:5]:
        (root / "folder" / name).write_bytes(data)
    for name in ("big.zip", "big.tar"):
        storage.upload(root / name, f"s3://pmd/in/{name}")
    for name in list(members)[:5]:
        storage.upload(root / "folder" / name, f"s3://pmd/in/folder/{name}")
    return root, members


WANTED = ["images/003.jpg", "images/020.jpg", "images/047.jpg"]


@pytest.mark.parametrize("name", ["big.zip", "big.tar"])
def test_three_members_of_a_large_remote_archive_cost_a_small_part_of_its_bytes(s3, archives, name, tmp_path):
    root, members = archives
    url = f"s3://pmd/in/{name}"
    size = storage.size(url)
    assert size > MEMBERS * MEMBER_BYTES
    s3.reset()
    with ArchiveIndex.build([url], cache=tmp_path / "cache") as index:
        assert len(index) == MEMBERS
        got = {ref: (data, error) for ref, data, error in index.read_many(WANTED)}
    assert got == {ref: (members[ref], None) for ref in WANTED}
    read = s3.bytes_out[f"/pmd/in/{name}"]
    # The index (central directory, or 48 tar headers) and three members: well under a quarter of the archive.
    assert 3 * MEMBER_BYTES <= read < size / 4, (read, size)
    with ArchiveIndex.build([root / name]) as local:
        assert local.refs() == index.refs()


def test_a_remote_tars_member_list_is_cached_and_a_changed_object_is_indexed_again(s3, archives, tmp_path):
    root, members = archives
    url, cache = "s3://pmd/in/cached.tar", f"s3://pmd/work/{tmp_path.name}/archive-index"
    storage.upload(root / "big.tar", url)
    ArchiveIndex.build([url], cache=cache).close()
    assert len(storage.list_files(cache, ".json")) == 1
    s3.reset()
    with ArchiveIndex.build([url], cache=cache) as again:
        assert len(again) == MEMBERS
        assert s3.gets[f"/pmd/in/{url.split('/', 3)[-1]}"] == 0  # not a header read
        assert dict((r, d) for r, d, _ in again.read_many(WANTED[:1])) == {WANTED[0]: members[WANTED[0]]}
    write_tar(tmp_path / "other.tar", {"images/new.jpg": b"x" * 10}, mode="w")
    storage.upload(tmp_path / "other.tar", url)
    with ArchiveIndex.build([url], cache=cache) as changed:
        assert changed.refs() == ["images/new.jpg"]
    assert len(storage.list_files(cache, ".json")) == 2


def test_a_remote_folder_reads_like_the_local_one(s3, archives):
    root, members = archives
    with ArchiveIndex.build(["s3://pmd/in/folder"]) as remote, ArchiveIndex.build([root / "folder"]) as local:
        assert remote.refs() == local.refs() == sorted(members)[:5]
        refs = [*remote.refs(), "images/nope.jpg"]
        cap = MEMBER_BYTES
        assert list(remote.read_many(refs, max_bytes=cap)) == list(local.read_many(refs, max_bytes=cap))
        small = list(remote.read_many(refs[:1], max_bytes=1000))
        assert small[0][1] is None and small[0][2].startswith("too_large")


def test_metadata_readers_give_the_same_records_from_s3(s3, tmp_path):
    lines = [f"http://127.0.0.1/{i}.jpg\tcaption {i}" for i in range(2500)]
    text = "\ufeff" + "\n".join(lines) + "\n"
    (tmp_path / "cc.tsv").write_text(text)
    write_zip(tmp_path / "cc.zip", {"sub/cc.tsv": text.encode()})
    import gzip
    (tmp_path / "cc.tsv.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "d.json").write_text('{"images": [' + ",".join(f'{{"i": {i}}}' for i in range(300)) + "]}")
    for name in ("cc.tsv", "cc.zip", "cc.tsv.gz", "d.json"):
        storage.upload(tmp_path / name, f"s3://pmd/meta/{name}")

    def strip(records):
        return [(r.position, r.raw) for r in records]

    for name in ("cc.tsv", "cc.zip", "cc.tsv.gz"):
        local, remote = strip(iter_lines(tmp_path / name)), strip(iter_lines(f"s3://pmd/meta/{name}"))
        assert remote == local and len(local) == 2500 and local[0][1].startswith(b"http")
    ranges = list(iter_line_ranges("s3://pmd/meta/cc.tsv", 1000))
    assert [r.lines for r in ranges] == [1000, 1000, 500]
    assert [x for r in ranges for x in strip(r.records())] == strip(iter_lines(tmp_path / "cc.tsv"))
    assert strip(iter_json_items("s3://pmd/meta/d.json", "images.item")) == strip(
        iter_json_items(tmp_path / "d.json", "images.item"))
    with pytest.raises(InputError, match="no such file"):
        require_file("s3://pmd/meta/absent.tsv")
    with pytest.raises(InputError, match="not a regular file"):
        require_file("s3://pmd/meta")


def test_an_object_overwritten_with_other_bytes_of_the_same_size_gets_a_new_fingerprint(s3, tmp_path):
    url = "s3://pmd/meta/fp.tsv"
    (tmp_path / "a").write_text("http://127.0.0.1/1.jpg\tone\n")
    (tmp_path / "b").write_text("http://127.0.0.1/2.jpg\ttwo\n")
    storage.upload(tmp_path / "a", url)
    first = input_fingerprint([url])
    assert first == input_fingerprint([url]) and first[0]["bytes"] == 27 and first[0]["etag"]
    s3.reset()
    input_fingerprint([url])
    assert s3.gets[url.replace("s3://", "/")] == 0  # a HEAD: no byte of it read
    storage.upload(tmp_path / "b", url)  # the same size, within the same second
    assert input_fingerprint([url]) != first


def test_any_fsspec_protocol_is_an_input_too():
    """memory:// (fsspec's in-process filesystem) stands for the protocols pyarrow has no client of its own for."""
    import io
    import time

    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe("/inputs/cc.tsv", b"http://127.0.0.1/1.jpg\tone\n")
    buffer = io.BytesIO()
    write_zip(buffer, {"images/1.jpg": b"jpeg bytes"})
    memory.pipe("/inputs/a.zip", buffer.getvalue())
    assert [r.raw for r in iter_lines("memory://inputs/cc.tsv")] == [b"http://127.0.0.1/1.jpg\tone"]
    with ArchiveIndex.build(["memory://inputs/a.zip"]) as index:
        assert list(index.read_many(["images/1.jpg"])) == [("images/1.jpg", b"jpeg bytes", None)]
    first = input_fingerprint(["memory://inputs/cc.tsv"])
    time.sleep(0.01)
    memory.pipe("/inputs/cc.tsv", b"http://127.0.0.1/2.jpg\ttwo\n")  # the same size
    assert input_fingerprint(["memory://inputs/cc.tsv"]) != first
