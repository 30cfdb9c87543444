"""The streaming loader: partitioning across ranks/workers, per-pass order, exact resume of the loader state, bad
rows, transforms, the per-step kind choice, the tokenizer, and clear errors on bad data."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flava.data import (
    DataError,
    DataSpec,
    Source,
    SourceLoader,
    StreamingDataset,
    decode_train,
    kind_for_step,
)
from flava.tokenizer import load_tokenizer, train_wordpiece

from .shards import make_build, make_rows


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return make_build(tmp_path_factory.mktemp("build"), n=120, seed=0, size=40, bad=4, shards=2, row_group_size=20)


@pytest.fixture(scope="module")
def tok(build, tmp_path_factory):
    from flava.data import iter_texts

    return train_wordpiece(iter_texts([str(build)]), tmp_path_factory.mktemp("tok") / "tok", vocab_size=200)


def _spec(**kw):
    base = dict(kind="pairs", batch_size=4, image_size=32, codebook_size=32, grid_size=4, text_max_length=16,
                seed=3, shuffle_buffer=30)
    base.update(kw)
    return DataSpec(**base)


def test_units_partition_rows_across_ranks_and_workers_each_pass(build, tok):
    src = Source("pairs", [str(build)])
    assert src.num_rows == 120 and len(src.units) == 6
    world, workers = 2, 2
    ds = StreamingDataset(src, _spec(), tok, rank=0, world_size=world, num_workers=workers)
    for pass_idx in (0, 1):
        seen = []
        for stream in range(world * workers):
            seen += [(u.file, u.group, u.start) for u in ds.stream_units(pass_idx, stream)]
        assert sorted(seen) == sorted((u.file, u.group, u.start) for u in ds.units)  # every unit once, no overlap
    orders = {tuple(ds.stream_units(p, 0)) for p in range(4)}
    assert len(orders) > 1  # a new order per pass


def test_rows_of_a_pass_cover_the_stream_once(build, tok):
    src = Source("pairs", [str(build)])
    ds = StreamingDataset(src, _spec(), tok, rank=1, world_size=2, num_workers=1)
    texts, n_expected = [], sum(u.rows for u in ds.stream_units(0, 1))
    for cursor, row, _ in ds.rows(1, (0, 0, 0)):
        if cursor[0] > 0:
            break
        texts.append(row["text"])
    assert len(texts) == n_expected


def test_fewer_units_than_streams_are_split(tmp_path, tok):
    b = make_build(tmp_path / "b", n=24, shards=1, row_group_size=100, size=32)
    src = Source("pairs", [str(b)])
    assert len(src.units) == 1
    units = src.split_units(4)
    assert len(units) >= 4 and sum(u.rows for u in units) == 24


def _take(loader, n):
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_resumes_exactly(build, tok, workers):
    src = Source("pairs", [str(build)])
    args = dict(source=src, spec=_spec(), tokenizer=tok, rank=0, world_size=1)
    full = SourceLoader(args, workers, 2)
    ref = _take(full, 9)
    first = SourceLoader(args, workers, 2)
    _take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    first.close()
    resumed = SourceLoader(args, workers, 2, state)
    rest = _take(resumed, 4)
    for a, b in zip(ref[5:], rest):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert resumed.state_dict()["batches"] == 9


def test_bad_rows_are_skipped_and_counted(build, tok):
    src = Source("pairs", [str(build)])
    loader = SourceLoader(dict(source=src, spec=_spec(batch_size=8), tokenizer=tok, rank=0, world_size=1), 0, 2)
    for _ in range(16):  # > one pass (116 good rows)
        b = next(loader)
        assert b["pixels"].shape == (8, 3, 32, 32) and b["pixels"].dtype == torch.uint8
        assert b["input_ids"].shape[0] == 8 and b["input_ids"].shape[1] <= 16  # padded to the longest caption
        assert b["patch_mask"].shape == (8, 16)
    assert loader.bad["decode_error"] >= 2 and loader.bad["empty_text"] >= 2


def test_batch_contents(build, tok):
    src = Source("pairs", [str(build)])
    ds = StreamingDataset(src, _spec(batch_size=16, itm_probability=0.5), tok, 0, 1, 0)
    b = next(iter(ds))
    assert (b["itm_labels"] == 0).any() and (b["itm_labels"] == 1).any()
    sel = b["mlm_labels"] != -100
    assert sel.any() and (b["input_ids"][sel] == b["mlm_labels"][sel]).all()
    assert (b["input_ids"][:, 0] == tok.cls_id).all()
    assert 1 <= int(b["patch_mask"].sum(1).min()) and int(b["patch_mask"].sum(1).max()) < 16
    t = next(iter(StreamingDataset(Source("text", [str(build)]), _spec(kind="text"), tok, 0, 1, 0)))
    assert set(t) == {"input_ids", "input_ids_masked", "attention_mask", "mlm_labels", "_meta"}
    i = next(iter(StreamingDataset(Source("images", [str(build)]), _spec(kind="images"), tok, 0, 1, 0)))
    assert set(i) == {"pixels", "codebook_pixels", "patch_mask", "_meta"}


def test_two_way_crop_is_the_same_crop():
    from pmd_demo.drawings import Drawing, draw, jpeg

    data = jpeg(draw(Drawing("red", "circle", 0), 200))
    rng = np.random.default_rng(0)
    enc, cb = decode_train(data, 64, 32, rng, (0.9, 1.0), (0.75, 4 / 3))
    assert enc.shape == (64, 64, 3) and cb.shape == (32, 32, 3)
    small = enc.reshape(32, 2, 32, 2, 3).mean((1, 3))
    assert np.abs(small - cb.astype(float)).mean() < 12  # same region, different resampling


def test_image_folder_and_text_file_sources(tmp_path, tok):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, row in enumerate(make_rows(6, size=32)):
        (folder / f"{i}.jpg").write_bytes(row["image"])
    (folder / "broken.jpg").write_bytes(b"nope")
    src = Source("images", [str(folder)])
    assert src.num_rows == 7
    b = next(iter(StreamingDataset(src, _spec(kind="images", batch_size=6), tok, 0, 1, 0)))
    assert b["pixels"].shape[0] == 6 and b["_meta"]["bad"].get("decode_error", 0) <= 1
    txt = tmp_path / "corpus.txt"
    txt.write_text("a red circle\n\nthe blue square is big\n" * 5)
    t = next(iter(StreamingDataset(Source("text", [str(txt)]), _spec(kind="text", batch_size=4), tok, 0, 1, 0)))
    assert t["input_ids"].shape[0] == 4 and t["input_ids"].shape[1] <= 16  # padded to the longest line


def test_kind_for_step_is_a_pure_function_with_the_ratios():
    ratios = {"pairs": 0.7, "images": 0.15, "text": 0.15}
    kinds = [kind_for_step(1, s, ratios) for s in range(4000)]
    assert kinds == [kind_for_step(1, s, ratios) for s in range(4000)]
    frac = {k: kinds.count(k) / len(kinds) for k in ratios}
    assert abs(frac["pairs"] - 0.7) < 0.03 and abs(frac["images"] - 0.15) < 0.03
    assert kind_for_step(1, 5, {"pairs": 1.0}) == "pairs"


def test_tokenizer_is_bert_loadable_and_deterministic_ids(tok, tmp_path, build):
    from transformers import BertTokenizerFast

    from flava.data import iter_texts

    tok_dir = tmp_path / "t"
    train_wordpiece(iter_texts([str(build)]), tok_dir, vocab_size=200)
    hf = BertTokenizerFast.from_pretrained(str(tok_dir))
    ours = load_tokenizer(tok_dir)
    ids, attn = ours.encode(["A Red circle"], 8)
    assert hf("A Red circle")["input_ids"] == ids[0][: int(attn.sum())].tolist()
    assert (hf.pad_token_id, hf.mask_token_id) == (0, ours.mask_id) and ours.pad_id == 0
    assert len(hf) == len(ours) <= 200


def test_bad_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Source("pairs", [str(tmp_path / "nope")])
    b = make_build(tmp_path / "b", n=10, shards=2)
    (b / "shards" / "shard-00001.parquet").unlink()
    with pytest.raises(DataError, match="missing"):
        Source("pairs", [str(b)])
    wrong = tmp_path / "w"
    wrong.mkdir()
    pq.write_table(pa.table({"caption": ["x"], "jpg": [b"y"]}), wrong / "part.parquet")
    with pytest.raises(DataError, match="wrong schema"):
        Source("pairs", [str(wrong)])
    empty = tmp_path / "e"
    empty.mkdir()
    with pytest.raises(DataError, match="no shards"):
        Source("pairs", [str(empty)])


def test_txt_units_are_read_linearly(tmp_path, monkeypatch):
    """Each .txt unit seeks to its own chunk: a pass reads every line about once (a rescan from line 0 for every
    unit read ~units/2 times as many), and the rows are exactly the file's lines, in order, CRLF or not."""
    import builtins

    import flava.data as fdata

    monkeypatch.setattr(fdata, "_TEXT_CHUNK", 10)
    lines = [f"line {i} é" for i in range(205)]
    path = tmp_path / "corpus.txt"
    path.write_bytes(("\r\n".join(lines[:100]) + "\r\n" + "\n".join(lines[100:]) + "\n").encode())
    source = fdata.Source("text", [str(path)])
    read = {"lines": 0}

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def seek(self, *a):
            return self.fh.seek(*a)

        def __iter__(self):
            for line in self.fh:
                read["lines"] += 1
                yield line

    monkeypatch.setattr(fdata, "open", lambda *a, **kw: Counting(builtins.open(*a, **kw)), raising=False)
    units = source.split_units(30)  # more streams than chunks: units cut inside a chunk too
    got = [t for u in units for t in source.read(u, ("text",))["text"]]
    assert got == lines
    # a cut unit skips at most the rest of its chunk; a rescan from line 0 would read ~4,300 lines here
    assert read["lines"] <= 2 * len(lines) + len(units), (read["lines"], len(units))
