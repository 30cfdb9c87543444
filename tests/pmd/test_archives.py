import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from pmd.archives import ArchiveIndex
from tests.archive_files import write_tar, write_zip


def _image_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (seed % 256, 7, 9)).save(buf, "PNG")
    return buf.getvalue()


FILES = {
    "val2014/COCO_val2014_000000391895.jpg": _image_bytes(1),
    "val2014/COCO_val2014_000000000042.jpg": _image_bytes(2),
    "annotations/captions_val2014.json": b"{}",
}


def _zip(path: Path, files: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    return write_zip(path, files, compression, directories=["val2014"])  # a directory entry: not a member


def _read_all(index: ArchiveIndex, refs) -> list[tuple[str, bytes | None, str | None]]:
    return list(index.read_many(refs))


def test_zip_index_and_read(tmp_path):
    index = ArchiveIndex.build([_zip(tmp_path / "val2014.zip", FILES)])
    assert len(index) == 3
    ref = "val2014/COCO_val2014_000000391895.jpg"
    assert ref in index and "val2014/" not in index and "nope.jpg" not in index
    assert index.locate(ref) == (str((tmp_path / "val2014.zip").resolve()), ref)
    with pytest.raises(KeyError):
        index.locate("val2014/missing.jpg")
    refs = [ref, "val2014/missing.jpg", "val2014/COCO_val2014_000000000042.jpg", ref]
    got = _read_all(index, refs)
    assert sorted(r for r, _, _ in got) == sorted(refs)  # each request once, duplicates included
    for r, data, error in got:
        if r == "val2014/missing.jpg":
            assert (data, error) == (None, "missing_member")
        else:
            assert error is None and data == FILES[r]
    index.close()


@pytest.mark.parametrize(("name", "mode"), [("imgs.tar.gz", "w:gz"), ("imgs.tgz", "w:gz"), ("imgs.tar", "w")])
def test_tar_index_and_read(tmp_path, name, mode):
    files = {f"flickr30k-images/{i}.jpg": _image_bytes(i) for i in range(20)}
    files["./flickr30k-images/dot.jpg"] = b"dot"  # tar members often start with ./
    index = ArchiveIndex.build([write_tar(tmp_path / name, files, mode)])
    assert len(index) == 21
    refs = ["flickr30k-images/3.jpg", "flickr30k-images/17.jpg", "flickr30k-images/3.jpg", "flickr30k-images/dot.jpg"]
    got = _read_all(index, refs + ["flickr30k-images/99.jpg"])
    assert len(got) == 5
    by_ref: dict[str, list] = {}
    for r, data, error in got:
        by_ref.setdefault(r, []).append((data, error))
    assert by_ref["flickr30k-images/3.jpg"] == [(files["flickr30k-images/3.jpg"], None)] * 2
    assert by_ref["flickr30k-images/17.jpg"] == [(files["flickr30k-images/17.jpg"], None)]
    assert by_ref["flickr30k-images/dot.jpg"] == [(b"dot", None)]
    assert by_ref["flickr30k-images/99.jpg"] == [(None, "missing_member")]


def test_directory_with_loose_files_and_nested_archives(tmp_path):
    root = tmp_path / "images"
    (root / "train2017").mkdir(parents=True)
    (root / "train2017" / "000000000009.jpg").write_bytes(b"loose")
    _zip(root / "val2014.zip", FILES)
    (root / "sub").mkdir()
    write_tar(root / "sub" / "ade.tar.gz", {"ADEChallengeData2016/images/training/ADE_train_00000001.jpg": b"ade"})
    index = ArchiveIndex.build([root])
    assert "train2017/000000000009.jpg" in index
    assert "val2014/COCO_val2014_000000391895.jpg" in index
    assert "ADEChallengeData2016/images/training/ADE_train_00000001.jpg" in index
    assert "val2014.zip" not in index  # archives are indexed, not served as loose files
    assert index.locate("train2017/000000000009.jpg") == (str(root.resolve()), "train2017/000000000009.jpg")
    got = dict((r, (d, e)) for r, d, e in _read_all(index, [
        "train2017/000000000009.jpg",
        "ADEChallengeData2016/images/training/ADE_train_00000001.jpg",
        "val2014/COCO_val2014_000000000042.jpg",
    ]))
    assert got == {
        "train2017/000000000009.jpg": (b"loose", None),
        "ADEChallengeData2016/images/training/ADE_train_00000001.jpg": (b"ade", None),
        "val2014/COCO_val2014_000000000042.jpg": (FILES["val2014/COCO_val2014_000000000042.jpg"], None),
    }
    # A loose file deleted after indexing is a missing member, not an exception.
    (root / "train2017" / "000000000009.jpg").unlink()
    [(_, data, error)] = _read_all(index, ["train2017/000000000009.jpg"])
    assert data is None and error.startswith("missing_member:")


def test_corrupt_zip_member_is_an_error_string(tmp_path):
    good, bad = _image_bytes(1), bytes(range(256)) * 40
    path = _zip(tmp_path / "c.zip", {"a/good.jpg": good, "a/bad.jpg": bad}, zipfile.ZIP_STORED)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("a/bad.jpg")
        # Local header is 30 bytes + name + extra; flip bytes in the middle of the stored data.
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
    raw = bytearray(path.read_bytes())
    for i in range(start, start + 8):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    index = ArchiveIndex.build([path])
    got = {r: (d, e) for r, d, e in _read_all(index, ["a/bad.jpg", "a/good.jpg"])}
    assert got["a/good.jpg"] == (good, None)
    data, error = got["a/bad.jpg"]
    assert data is None and error.startswith("archive_error:") and "CRC" in error


def test_corrupt_deflated_zip_member(tmp_path):
    payload = b"".join(_image_bytes(i) for i in range(30))
    path = _zip(tmp_path / "d.zip", {"x/one.png": payload, "x/two.png": b"two"})
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("x/one.png")
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.compress_size // 2
    raw = bytearray(path.read_bytes())
    for i in range(start, start + 16):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    got = {r: (d, e) for r, d, e in _read_all(ArchiveIndex.build([path]), ["x/one.png", "x/two.png"])}
    assert got["x/two.png"] == (b"two", None)
    assert got["x/one.png"][0] is None and got["x/one.png"][1].startswith("archive_error:")


def test_truncated_tar_gz_fails_only_unread_members(tmp_path):
    files = {f"d/{i}.bin": bytes([i]) * 5000 for i in range(10)}
    path = write_tar(tmp_path / "t.tar.gz", files)
    index = ArchiveIndex.build([path])
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    got = _read_all(index, list(files))
    assert len(got) == 10
    errors = [e for _, d, e in got if d is None]
    assert errors and all(e.startswith("archive_error:") for e in errors)
    assert all(d == files[r] for r, d, e in got if d is not None)


def test_suffix_match_and_ambiguity(tmp_path):
    path = _zip(tmp_path / "vg.zip", {
        "images/VG_100K_2/1.jpg": b"one",
        "images/VG_100K/2.jpg": b"two-a",
        "other/VG_100K/2.jpg": b"two-b",
    })
    index = ArchiveIndex.build([path])
    assert "VG_100K_2/1.jpg" in index
    assert index.locate("VG_100K_2/1.jpg")[1] == "images/VG_100K_2/1.jpg"
    assert "1.jpg" not in index  # single-component suffixes are not indexed
    assert "VG_100K/2.jpg" not in index  # ambiguous
    with pytest.raises(KeyError, match="ambiguous"):
        index.locate("VG_100K/2.jpg")
    got = _read_all(index, ["VG_100K_2/1.jpg", "VG_100K/2.jpg", "images/VG_100K/2.jpg"])
    assert got[0] == ("VG_100K/2.jpg", None, got[0][2])
    assert got[0][2].startswith("missing_member: ambiguous")
    assert set(got[1:]) == {("VG_100K_2/1.jpg", b"one", None), ("images/VG_100K/2.jpg", b"two-a", None)}


def test_first_source_wins(tmp_path):
    a = _zip(tmp_path / "a.zip", {"x/1.jpg": b"from-a"})
    b = _zip(tmp_path / "b.zip", {"x/1.jpg": b"from-b", "x/2.jpg": b"only-b"})
    index = ArchiveIndex.build([a, b])
    assert len(index) == 2
    got = {r: d for r, d, _ in _read_all(index, ["x/1.jpg", "x/2.jpg"])}
    assert got == {"x/1.jpg": b"from-a", "x/2.jpg": b"only-b"}


def test_state_round_trip(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "loose").mkdir()
    (root / "loose" / "a.jpg").write_bytes(b"a")
    paths = [
        _zip(tmp_path / "val2014.zip", FILES),
        write_tar(tmp_path / "f.tar", {"f/1.jpg": b"tar-plain"}, "w"),
        write_tar(tmp_path / "g.tar.gz", {"g/1.jpg": b"tar-gz"}),
        root,
    ]
    index = ArchiveIndex.build(paths)
    state = index.to_state()
    restored = ArchiveIndex.from_state(json.loads(json.dumps(state)))
    assert len(restored) == len(index) == 6
    refs = ["val2014/COCO_val2014_000000391895.jpg", "f/1.jpg", "g/1.jpg", "loose/a.jpg", "x/none.jpg"]
    assert sorted(_read_all(restored, refs), key=str) == sorted(_read_all(index, refs), key=str)
    for ref in refs[:-1]:
        assert restored.locate(ref) == index.locate(ref)
    _read_all(index, refs)  # opens (and caches) a zip handle, which must not get in the way of pickling
    unpickled = pickle.loads(pickle.dumps(index))
    assert sorted(_read_all(unpickled, refs), key=str) == sorted(_read_all(index, refs), key=str)
    with pytest.raises(ValueError):
        ArchiveIndex.from_state({"format": "something-else", "version": 1, "sources": []})


def test_plain_tar_changed_after_indexing(tmp_path):
    path = write_tar(tmp_path / "p.tar", {"p/1.jpg": b"x" * 100}, "w")
    index = ArchiveIndex.build([path])
    path.write_bytes(path.read_bytes()[:600])
    [(ref, data, error)] = _read_all(index, ["p/1.jpg"])
    assert data is None and error.startswith("archive_error:")


def test_unreadable_archive_fails_its_refs(tmp_path):
    path = _zip(tmp_path / "z.zip", {"z/1.jpg": b"1"})
    index = ArchiveIndex.build([path])
    index.close()
    path.write_bytes(b"not a zip any more")
    [(ref, data, error)] = _read_all(index, ["z/1.jpg"])
    assert ref == "z/1.jpg" and data is None and error.startswith("archive_error:")


def test_build_rejects_unknown_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        ArchiveIndex.build([tmp_path / "absent.zip"])
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(ValueError):
        ArchiveIndex.build([other])
