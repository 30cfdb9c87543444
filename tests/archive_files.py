"""Zip and tar archives for tests: members from a {name: bytes} mapping, written to a path or returned as bytes.

`directories` adds directory entries first (readers must skip them: they are not members).
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO


def write_zip(target: Path | BinaryIO, members: Mapping[str, bytes], compression: int = zipfile.ZIP_DEFLATED,
              directories: Iterable[str] = ()) -> Path | BinaryIO:
    with zipfile.ZipFile(target, "w", compression) as archive:
        for name in directories:
            archive.writestr(name.rstrip("/") + "/", b"")
        for name, data in members.items():
            archive.writestr(name, data)
    return target


def write_tar(target: Path | BinaryIO, members: Mapping[str, bytes], mode: str = "w:gz",
              directories: Iterable[str] = ()) -> Path | BinaryIO:
    opened = tarfile.open(target, mode) if isinstance(target, (str, Path)) else tarfile.open(fileobj=target, mode=mode)
    with opened as archive:
        for name in directories:
            folder = tarfile.TarInfo(name)
            folder.type = tarfile.DIRTYPE
            archive.addfile(folder)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return target


def zip_bytes(members: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()
    write_zip(buf, members)
    return buf.getvalue()


def tar_gz_bytes(members: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()
    write_tar(buf, members)
    return buf.getvalue()
