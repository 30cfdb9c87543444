"""Where a corpus lives: a local path, or a URL on object storage (`s3://bucket/prefix`, `gs://...`, any fsspec
protocol), behind one small set of functions that take either.

Filesystems come from pyarrow.fs: its S3 and GCS clients are the ones pyarrow's Parquet and dataset readers use
natively (ranged reads of a footer and of single row groups, no Python in the data path), and they read the
standard credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL,
AWS_DEFAULT_REGION, ~/.aws). Any other protocol goes through fsspec (`fsspec.filesystem(protocol)`, wrapped in
pyarrow's FSSpecHandler), so a filesystem an fsspec plugin provides (az://, hf://, memory://...) works the same way.

Storage options (`pmd ... --storage-option KEY=VALUE`, or the JSON object in the environment variable
PMD_STORAGE_OPTIONS) are keyword arguments of that filesystem's constructor (S3: pyarrow.fs.S3FileSystem's
endpoint_override, region, access_key, ...). They travel in the environment so that Ray workers resolve URLs the way
the driver does. A value that parses as JSON (true, 3, ...) is passed parsed, anything else as a string.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

log = logging.getLogger(__name__)
OPTIONS_ENV = "PMD_STORAGE_OPTIONS"
# What a Ray cluster's workers get from the driver's environment (pipelines/ray_runtime.py); not the credentials.
PROPAGATED_ENV = (OPTIONS_ENV, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
_PYARROW_SCHEMES = {"s3": pafs.S3FileSystem, "gs": pafs.GcsFileSystem, "gcs": pafs.GcsFileSystem}


# `--storage-option KEY=VALUE` of every command that takes a build location.
STORAGE_OPTION_ARGS = ("--storage-option",)
STORAGE_OPTION_KWARGS = {"action": "append", "default": [], "metavar": "KEY=VALUE",
                         "help": "option of the object-storage filesystem (repeatable), e.g. "
                                 "endpoint_override=http://127.0.0.1:9000; see docs/build.md"}


class StorageError(ValueError):
    """Storage options that do not make a filesystem."""


def is_remote(location: str | os.PathLike) -> bool:
    """A URL with a scheme other than file:// (a Windows drive letter is not a scheme)."""
    scheme = urlsplit(str(location)).scheme
    return len(scheme) > 1 and scheme != "file"


def parse_options(pairs: list[str]) -> dict[str, object]:
    """`KEY=VALUE` strings (the command line's --storage-option) -> constructor keyword arguments."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise StorageError(f"storage option {pair!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def set_options(options: Mapping[str, object]) -> None:
    """Make `options` the storage options of this process and of the processes it starts (Ray workers)."""
    if options:
        os.environ[OPTIONS_ENV] = json.dumps(dict(options), sort_keys=True)
    else:
        os.environ.pop(OPTIONS_ENV, None)


def add_options(pairs: list[str]) -> None:
    """Command-line `KEY=VALUE` options on top of those already in the environment."""
    if pairs:
        set_options({**json.loads(_options()), **parse_options(pairs)})


def _options() -> str:
    return os.environ.get(OPTIONS_ENV, "{}")


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, options_json: str, endpoint: str | None, pid: int) -> pafs.FileSystem:
    """One filesystem per scheme, options and process: a client made before a fork (a DataLoader worker) is not
    used after it."""
    try:
        options = json.loads(options_json)
    except ValueError as e:
        raise StorageError(f"{OPTIONS_ENV} is not a JSON object ({e})") from None
    try:
        if scheme == "s3" and "endpoint_override" not in options:
            # The AWS SDKs' standard variable (boto3, botocore, the CLI); pyarrow's client does not read it itself.
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                options["endpoint_override"] = endpoint
        if scheme in _PYARROW_SCHEMES:
            return _PYARROW_SCHEMES[scheme](**options)
        import fsspec

        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme, **options)))
    except (TypeError, ValueError, ImportError) as e:
        raise StorageError(f"cannot open a {scheme}:// filesystem with options {sorted(options)}: {e}") from None


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path or a URL."""
    text = str(location)
    if not is_remote(text):
        if text.startswith("file://"):
            text = urlsplit(text).path
        return pafs.LocalFileSystem(), str(Path(text).absolute())
    parts = urlsplit(text)
    fs = _filesystem(parts.scheme, _options(),
                     os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"), os.getpid())
    if parts.scheme in _PYARROW_SCHEMES:
        return fs, (parts.netloc + parts.path).rstrip("/")
    return fs, text.split("://", 1)[1].rstrip("/")


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location/part/...` for a path or a URL (object keys always use `/`)."""
    if not is_remote(location):
        return str(Path(location).joinpath(*parts))
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])


def basename(location: str | os.PathLike) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1] if is_remote(location) else Path(location).name


def location(value: str | os.PathLike) -> str | Path:
    """A command-line or config value as the build keeps it: URLs as strings, paths as Paths."""
    return str(value) if is_remote(value) else Path(value)


def _info(location: str | os.PathLike) -> pafs.FileInfo:
    fs, path = resolve(location)
    return fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    return _info(location).type == pafs.FileType.File


def is_dir(location: str | os.PathLike) -> bool:
    """A directory; on object storage, a prefix that holds at least one object."""
    if not is_remote(location):
        return Path(location).is_dir()
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        return True
    return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False)))


def size(location: str | os.PathLike) -> int:
    info = _info(location)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: no such file")
    return info.size


def read_bytes(location: str | os.PathLike) -> bytes:
    if not is_remote(location):
        return Path(location).read_bytes()
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{location}: no such file") from None


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def open_input(location: str | os.PathLike):
    """A random-access file (pyarrow NativeFile) for pyarrow's readers; a local path opens as itself."""
    if not is_remote(location):
        return pafs.LocalFileSystem().open_input_file(str(location))
    fs, path = resolve(location)
    return fs.open_input_file(path)


def list_files(location: str | os.PathLike, suffix: str = "", recursive: bool = False) -> list[str]:
    """Files under a directory (or prefix) whose name ends in `suffix`, as locations of the same kind, sorted.
    Names starting with a dot (temporary files) are left out. A missing directory lists nothing."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    base = str(location).rstrip("/") if is_remote(location) else str(Path(location))
    found = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.base_name.endswith(suffix) or info.base_name.startswith("."):
            continue
        relative = info.path[len(path):].lstrip("/")
        found.append(join(base, *relative.split("/")))
    return sorted(found, key=lambda p: p.split("/"))  # as paths sort: by component


def delete(location: str | os.PathLike) -> None:
    """Remove a file; a missing one is not an error."""
    if not is_remote(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = resolve(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def upload(local: Path, location: str | os.PathLike) -> None:
    """Copy a complete local file to `location` in one streamed PUT (multipart for large files)."""
    fs, path = resolve(location)
    if not is_remote(location):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        while block := src.read(8 << 20):
            dst.write(block)


def sha256(location: str | os.PathLike, block: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    if not is_remote(location):
        with open(location, "rb") as f:
            while data := f.read(block):
                digest.update(data)
        return digest.hexdigest()
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------- conditional writes
# A small object written only if it is still what the caller last read (compare-and-swap): what pmd.lease builds
# one writer per corpus on. `version` is an opaque string from `read_versioned`; None means "absent".
#   local disk: create = link(2) of a complete temporary file (fails if the name exists, also over NFS);
#     replace = rename the current file aside to a unique name (only one renamer of an inode succeeds), check it
#     is the version read, then link the new one in (a concurrent creator that saw the name free in that instant
#     wins and the replace fails: safe, one writer either way).
#   s3:// : PUT with If-None-Match: * (create) or If-Match: ETAG (replace), DELETE with If-Match; S3 and
#     S3-compatible stores evaluate the condition atomically (HTTP 412 when it does not hold).
#   any other store (gs://, fsspec): read, compare, write. Not atomic: two writers acting within one round trip
#     of each other can both succeed (docs/build.md "One writer per corpus" names this window).
class PreconditionFailed(Exception):
    """The object is not (or no longer) in the version the caller expected."""


_S3_UNCONDITIONAL: set[str] = set()  # buckets whose store answered 501 to a conditional PUT


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def s3_client():
    """A botocore S3 client configured as pyarrow's S3 filesystem is (storage options, AWS_* variables): pyarrow
    exposes no conditional PUT, botocore does."""
    return _s3_client(_options(), os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
                      os.environ.get("AWS_DEFAULT_REGION"), os.getpid())


@functools.lru_cache(maxsize=4)
def _s3_client(options_json: str, env_endpoint: str | None, env_region: str | None, pid: int):
    import botocore.config
    import botocore.session

    options = json.loads(options_json)
    endpoint = options.get("endpoint_override") or env_endpoint
    if endpoint and "://" not in str(endpoint):
        endpoint = f"{options.get('scheme', 'https')}://{endpoint}"
    config = botocore.config.Config(retries={"max_attempts": 3, "mode": "standard"},
                                    s3={"addressing_style": "path" if endpoint else "auto"})
    return botocore.session.get_session().create_client(
        "s3", region_name=options.get("region") or env_region or "us-east-1",
        endpoint_url=endpoint, aws_access_key_id=options.get("access_key"),
        aws_secret_access_key=options.get("secret_key"), aws_session_token=options.get("session_token"),
        config=config)


def _s3_key(location: str) -> tuple[str, str]:
    parts = urlsplit(location)
    return parts.netloc, parts.path.lstrip("/")


def _s3_status(error: Exception) -> int:
    return int(getattr(error, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def read_versioned(location: str | os.PathLike) -> tuple[bytes, str] | None:
    """(bytes, version) of a small object, None when there is none."""
    text = str(location)
    if urlsplit(text).scheme == "s3":
        import botocore.exceptions

        bucket, key = _s3_key(text)
        try:
            reply = s3_client().get_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as e:
            if _s3_status(e) == 404:
                return None
            raise OSError(f"{location}: {e}") from None
        return reply["Body"].read(), reply["ETag"]
    try:
        data = read_bytes(location)
    except FileNotFoundError:
        return None
    return data, _digest(data)


def put_if(location: str | os.PathLike, data: bytes, version: str | None) -> str:
    """Write `data` if the object is in `version` (None: if there is none); returns the new version. Raises
    PreconditionFailed otherwise."""
    text = str(location)
    if urlsplit(text).scheme == "s3":
        import botocore.exceptions

        bucket, key = _s3_key(text)
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            if bucket not in _S3_UNCONDITIONAL:
                return s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        except botocore.exceptions.ClientError as e:
            # 412: the condition does not hold; 409: a concurrent conditional write to the key; 404: gone (If-Match)
            if _s3_status(e) in (404, 409, 412):
                raise PreconditionFailed(text) from None
            if _s3_status(e) != 501:
                raise OSError(f"{location}: {e}") from None
            _S3_UNCONDITIONAL.add(bucket)
            log.warning("%s: this S3 store has no conditional writes (If-None-Match/If-Match); the lease falls back to "
                        "read-compare-write, which two writers starting at once can both pass (docs/build.md)", text)
        # a store without conditional writes: the generic path below (versions are still ETags: read_versioned)
    if is_remote(text):
        current = read_versioned(text)
        if (current is None) != (version is None) or (current is not None and current[1] != version):
            raise PreconditionFailed(text)
        from pmd import atomic  # pmd.atomic imports this module

        atomic.write_bytes(data, text)
        return read_versioned(text)[1]  # an S3 object's version is its ETag, not the digest
    return _local_put_if(Path(text), data, version)


def _local_put_if(path: Path, data: bytes, version: str | None) -> str:
    import uuid

    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    new = path.with_name(f".{path.name}.new-{token}")
    with open(new, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        if version is not None:
            aside = path.with_name(f".{path.name}.old-{token}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                raise PreconditionFailed(str(path)) from None
            if _digest(aside.read_bytes()) != version:  # changed since it was read: put it back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                aside.unlink()
                raise PreconditionFailed(str(path))
            aside.unlink()
        try:
            os.link(new, path)
        except FileExistsError:
            raise PreconditionFailed(str(path)) from None
    finally:
        new.unlink(missing_ok=True)
    return _digest(data)


def delete_if(location: str | os.PathLike, version: str) -> None:
    """Remove the object if it is still in `version`; otherwise leave it (it is someone else's now)."""
    text = str(location)
    if urlsplit(text).scheme == "s3":
        import botocore.exceptions

        bucket, key = _s3_key(text)
        try:
            if bucket not in _S3_UNCONDITIONAL:
                s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=version)
                return
        except botocore.exceptions.ClientError as e:
            if _s3_status(e) in (404, 409, 412):
                return
            if _s3_status(e) != 501:
                raise OSError(f"{location}: {e}") from None
            _S3_UNCONDITIONAL.add(bucket)
    if is_remote(text):
        current = read_versioned(text)
        if current is not None and current[1] == version:
            delete(text)
        return
    import uuid

    path = Path(text)
    aside = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _digest(aside.read_bytes()) != version:
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink()
