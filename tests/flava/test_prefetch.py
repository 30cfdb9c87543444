"""Loader window prefetch (data.prefetch_window): the next shuffle window is read in the background while the
current one is served, and the batches, their order, their cursors and a resume from any cursor are exactly those
without prefetch (across window and pass boundaries, and for the inherited segments of a resharded resume)."""

import threading

import pytest
import torch

from flava.data import DataSpec, Source, StreamingDataset

from .shards import make_build


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return make_build(tmp_path_factory.mktemp("build"), n=72, seed=1, size=32, bad=2, shards=2, row_group_size=12)


@pytest.fixture(scope="module")
def tok(build, tmp_path_factory):
    from flava.data import iter_texts
    from flava.tokenizer import train_wordpiece

    return train_wordpiece(iter_texts([str(build)]), tmp_path_factory.mktemp("tok") / "tok", vocab_size=200)


def _ds(build, tok, prefetch: bool, cursors=None) -> StreamingDataset:
    spec = DataSpec(kind="pairs", batch_size=5, image_size=32, codebook_size=32, grid_size=4, text_max_length=16,
                    seed=3, shuffle_buffer=20, prefetch_window=prefetch)
    return StreamingDataset(Source("pairs", [str(build)]), spec, tok, 0, 1, 0, cursors=cursors)


def _take(ds, n: int) -> list[dict]:
    it = iter(ds)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _same(a: dict, b: dict) -> None:
    assert a["_meta"] == b["_meta"]
    for k in set(a) - {"_meta"}:
        assert torch.equal(a[k], b[k]), k


def test_prefetched_batches_order_and_cursors_equal_plain_reads(build, tok):
    plain, ahead = _take(_ds(build, tok, False), 20), _take(_ds(build, tok, True), 20)
    cursors = [b["_meta"]["cursor"] for b in plain]  # (pass, window, row)
    assert {c[0] for c in cursors} >= {0, 1} and len({c[:2] for c in cursors}) >= 5  # windows and passes crossed
    for a, b in zip(plain, ahead):
        _same(a, b)


def test_resume_from_every_cursor_with_prefetch_equals_the_uninterrupted_stream(build, tok):
    plain = _take(_ds(build, tok, False), 14)
    for k in (2, 3, 7, 11):  # mid-window, window ends, the pass boundary
        resumed = _take(_ds(build, tok, True, cursors=[plain[k - 1]["_meta"]["cursor"]]), 14 - k)
        for a, b in zip(plain[k:], resumed):
            _same(a, b)


def test_the_next_window_is_read_while_this_one_is_served(build, tok, monkeypatch):
    ds = _ds(build, tok, True)
    reads, started = [], threading.Event()
    real = Source.read

    def read(self, unit, cols):
        reads.append(threading.current_thread().name)
        if len(reads) > len(ds.windows(ds.stream_units(0, 0))[0]):
            started.set()  # a unit of window 1
        return real(self, unit, cols)

    monkeypatch.setattr(Source, "read", read)
    rows = ds.rows(0, (0, 0, 0))
    next(rows)  # window 0 served: its first row
    assert started.wait(5.0), "window 1 was not read ahead"
    assert all(name.startswith("flava-window") for name in reads)
    rows.close()
