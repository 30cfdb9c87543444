"""flava's loader reads a build on object storage (moto's S3 server on loopback): the same files, units and
batches as from the local copy, with and without DataLoader workers."""

from __future__ import annotations

import pytest
import torch

from flava.data import DataError, DataSpec, Source, SourceLoader, resolve_files
from flava.tokenizer import train_wordpiece
from pmd import atomic, storage
from tests.s3server import s3_server

from .shards import make_build


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    local = make_build(tmp_path_factory.mktemp("build"), n=60, seed=1, size=32, shards=2, row_group_size=10)
    with s3_server() as env, pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.setenv(storage.OPTIONS_ENV, "{}")
        for path in sorted(local.rglob("*")):
            if path.is_file():
                atomic.write_bytes(path.read_bytes(), storage.join("s3://pmd/build", *path.relative_to(local).parts))
        yield local, "s3://pmd/build"


def _spec() -> DataSpec:
    return DataSpec(kind="pairs", batch_size=4, image_size=32, codebook_size=32, grid_size=4, text_max_length=16,
                    seed=3, shuffle_buffer=20)


def _take(loader: SourceLoader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def test_every_form_of_data_path_resolves_on_s3(builds):
    local, remote = builds
    names = [p.name for p in resolve_files(local, "pairs")[1]]
    for form in (remote, remote + "/", remote + "/manifest.json", remote + "/shards"):
        fmt, files = resolve_files(form, "pairs")
        assert fmt == "parquet" and [storage.basename(f) for f in files] == names
    assert resolve_files(remote + "/shards/shard-00001.parquet", "pairs")[1] == [remote + "/shards/shard-00001.parquet"]
    from flava.evaluate import iter_eval_rows

    assert list(iter_eval_rows([remote])) == list(iter_eval_rows([str(local)]))  # `flava eval --data s3://...`
    with pytest.raises(DataError, match="no shards"):
        resolve_files("s3://pmd/nothing", "pairs")
    with pytest.raises(DataError, match="does not exist"):
        resolve_files("s3://pmd/build/shards/nope.parquet", "pairs")


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_from_s3_equal_batches_from_local_disk(builds, tmp_path, workers):
    local, remote = builds
    from flava.data import iter_texts

    tok = train_wordpiece(iter_texts([str(local)]), tmp_path / "tok", vocab_size=120)
    assert list(iter_texts([remote])) == list(iter_texts([str(local)]))
    sources = {name: Source("pairs", [path]) for name, path in (("local", str(local)), ("s3", remote))}
    assert sources["s3"].units == sources["local"].units and sources["s3"].num_rows == 60
    got = {name: _take(SourceLoader(dict(source=src, spec=_spec(), tokenizer=tok, rank=0, world_size=1), workers, 2),
                       6) for name, src in sources.items()}
    for a, b in zip(got["local"], got["s3"], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
