"""Archive members over max_image_bytes: refused by their declared size before a byte is read, reads capped for
members whose header understates them, and a 4 GiB member costs nothing under a 1 GiB address-space cap."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest

from pmd.archives import DEFAULT_MAX_BYTES, ArchiveIndex
from pmd.images import ImageOptions
from tests.archive_files import write_tar

GIB = 1024**3
MIB = 1024**2


class _RepeatedBlock:
    """A deflate 'compressor' for a stream of 1 MiB zero buffers: one full-flush block of zeros, repeated. Lets
    zipfile write a genuine 4 GiB ZIP64 member (sizes, CRC) as 4 MB on disk in a couple of seconds."""

    def __init__(self) -> None:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        self.block = compressor.compress(bytes(MIB)) + compressor.flush(zlib.Z_FULL_FLUSH)

    def compress(self, data: bytes) -> bytes:
        assert len(data) == MIB and not data.count(1)
        return self.block

    def flush(self) -> bytes:
        return b"\x03\x00"  # an empty final block


def zip_with_zero_member(path: Path, name: str, size: int) -> Path:
    zeros = bytes(MIB)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("small.jpg", b"tiny")
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as member:
            member._compressor = _RepeatedBlock()
            for _ in range(size // MIB):
                member.write(zeros)
    return path


def sparse_tar(path: Path, name: str, size: int) -> Path:
    """A plain tar whose member is `size` bytes of zeros, written as a hole (no disk space, no time)."""
    with open(path, "wb") as f:
        small = tarfile.TarInfo("small.jpg")
        small.size = 4
        f.write(small.tobuf(format=tarfile.GNU_FORMAT) + b"tiny".ljust(512, b"\0"))
        big = tarfile.TarInfo(name)
        big.size = size
        f.write(big.tobuf(format=tarfile.GNU_FORMAT))
        f.seek(size, os.SEEK_CUR)
        f.write(b"\0" * 1024)  # end-of-archive blocks (the member data is a multiple of 512)
    return path


def test_default_cap_is_the_image_option() -> None:
    assert DEFAULT_MAX_BYTES == ImageOptions().max_image_bytes == 32 * MIB


_READER = """
import json, resource, sys
from pmd.archives import ArchiveIndex
resource.setrlimit(resource.RLIMIT_AS, (GIB, GIB))
index = ArchiveIndex.build([sys.argv[1]])
out = [(ref, None if data is None else len(data), error) for ref, data, error in index.read_many(sys.argv[2:])]
print(json.dumps(out))
""".replace("GIB", str(GIB))


@pytest.mark.slow
def test_four_gib_members_are_too_large_under_a_one_gib_address_space(tmp_path: Path) -> None:
    archives = [zip_with_zero_member(tmp_path / "images.zip", "big/huge.jpg", 4 * GIB),
                sparse_tar(tmp_path / "images.tar", "big/huge.jpg", 4 * GIB)]
    assert (tmp_path / "images.zip").stat().st_size < 10 * MIB
    for archive in archives:
        done = subprocess.run([sys.executable, "-c", _READER, str(archive), "big/huge.jpg", "small.jpg"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        got = {ref: (size, error) for ref, size, error in json.loads(done.stdout)}
        assert got["small.jpg"] == (4, None)
        size, error = got["big/huge.jpg"]
        assert size is None
        assert error == f"too_large: big/huge.jpg declares {4 * GIB:,} bytes, over max_image_bytes={32 * MIB:,}"



@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz", "dir"])
def test_max_bytes_boundary_for_every_kind(tmp_path: Path, kind: str) -> None:
    members = {"a/exact.jpg": b"x" * 1000, "a/over.jpg": b"y" * 1001, "a/small.jpg": b"z"}
    if kind == "zip":
        path = tmp_path / "images.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    elif kind == "tar":
        path = tmp_path / "images.tar"
        with tarfile.open(path, "w") as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    elif kind == "tar.gz":
        path = write_tar(tmp_path / "images.tar.gz", members)
    else:
        path = tmp_path / "images"
        for name, data in members.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
    index = ArchiveIndex.build([path])
    got = {ref: (data, error) for ref, data, error in index.read_many(sorted(members), max_bytes=1000)}
    assert got["a/exact.jpg"] == (members["a/exact.jpg"], None)
    assert got["a/small.jpg"] == (b"z", None)
    assert got["a/over.jpg"][0] is None
    assert got["a/over.jpg"][1] == "too_large: a/over.jpg declares 1,001 bytes, over max_image_bytes=1,000"
    # The failure reason the image stage records is the part before the colon.
    assert got["a/over.jpg"][1].partition(":")[0] == "too_large"
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        list(index.read_many(["a/small.jpg"], max_bytes=0))


def test_zip_member_whose_header_understates_it_is_not_read_past_its_size(tmp_path: Path) -> None:
    """The central directory says 100 bytes, the data inflates to 10 MB: the read stops at the declared size
    and the CRC check fails the member (archive_error); nothing near 10 MB is held."""
    path = tmp_path / "images.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("liar.jpg", b"a" * (10 * MIB))
        zf.writestr("ok.jpg", b"fine")
    raw = bytearray(path.read_bytes())
    central = raw.index(b"PK\x01\x02")  # the first central directory entry: liar.jpg
    raw[central + 24:central + 28] = (100).to_bytes(4, "little")  # its uncompressed size
    path.write_bytes(bytes(raw))
    index = ArchiveIndex.build([path])
    got = {ref: (data, error) for ref, data, error in index.read_many(["liar.jpg", "ok.jpg"])}
    assert got["ok.jpg"] == (b"fine", None)
    assert got["liar.jpg"][0] is None and got["liar.jpg"][1].startswith("archive_error: BadZipFile")


def test_loose_file_that_grows_past_the_cap_after_its_size_was_read(tmp_path: Path, monkeypatch) -> None:
    """A read never takes more than max_bytes + 1 bytes, whatever the size on disk said."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "grow.jpg").write_bytes(b"q" * 50)
    index = ArchiveIndex.build([folder])
    real_fstat = os.fstat

    class _Stat:
        st_size = 10  # claims less than the file holds

    monkeypatch.setattr("pmd.archives.os.fstat", lambda fd: _Stat())
    got = list(index.read_many(["grow.jpg"], max_bytes=20))
    monkeypatch.setattr("pmd.archives.os.fstat", real_fstat)
    assert got == [("grow.jpg", None, "too_large: grow.jpg holds more bytes than its header says, "
                                      "over max_image_bytes=20")]


def test_cli_and_config_carry_max_image_bytes(tmp_path: Path) -> None:
    from pmd_cli.pmd import _build_config, build_parser

    args = build_parser().parse_args(["build", "coco", str(tmp_path / "dataset_coco.json"), "--out",
                                      str(tmp_path / "out"), "--max-image-bytes", "12345"])
    assert _build_config(args).image.max_image_bytes == 12345
    args = build_parser().parse_args(["build", "coco", str(tmp_path / "dataset_coco.json"), "--out",
                                      str(tmp_path / "out")])
    assert _build_config(args).image.max_image_bytes == 32 * MIB

