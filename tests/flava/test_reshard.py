"""Resuming the loader on another number of processes: every stream of the checkpoint is finished to the end of
the pass, in its old order (while they last, the batches are exactly the old ones), then the new partition takes
over; across the interruption every row of the pass is read exactly once."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flava.data import DataSpec, Source, SourceLoader, parse_position, reshard_loader_states
from flava.tokenizer import train_wordpiece

N = 70  # 7 row groups of 10, dealt unevenly to the streams: segments end mid-batch


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    texts = [f"item{i}" for i in range(N)]
    pq.write_table(pa.table({"text": texts}), root / "text.parquet", row_group_size=10)
    tok = train_wordpiece(texts, root / "tok", vocab_size=100)
    return Source("text", [str(root / "text.parquet")]), tok, set(texts)


SPEC = DataSpec(kind="text", batch_size=4, image_size=32, codebook_size=32, grid_size=4, text_max_length=8, seed=5,
                shuffle_buffer=15)


def _loader(source, tok, rank, world, state=None):
    return SourceLoader(dict(source=source, spec=SPEC, tokenizer=tok, rank=rank, world_size=world), 0, 2, state)


def _texts(batch, tok) -> list[str]:
    return [tok.decode(ids) for ids in batch["input_ids"]]


@pytest.mark.parametrize("old_world,new_world,taken", [(2, 1, 3), (1, 3, 5), (3, 2, 2), (2, 2, 4)])
def test_resharded_loader_reads_every_row_of_the_pass_once(corpus, old_world, new_world, taken):
    source, tok, rows = corpus
    old = [_loader(source, tok, r, old_world) for r in range(old_world)]
    read: Counter = Counter()
    for ld in old:
        for _ in range(taken):
            read.update(_texts(next(ld), tok))
    states = [json.loads(json.dumps({"text": ld.state_dict()})) for ld in old]  # what a checkpoint holds
    end_pass = max(parse_position(c)[0][0] for st in states for c in st["text"]["cursors"])
    assert end_pass == 0

    new = []
    for r in range(new_world):
        state, summary = reshard_loader_states(states, r, new_world, 0)
        assert summary["text"]["old_streams"] == old_world and summary["text"]["new_streams"] == new_world
        new.append(_loader(source, tok, r, new_world, state["text"]))

    if (old_world, new_world) == (2, 1):  # the old streams' next batches, in turn
        (ld,) = new
        want = [next(old[i % 2]) for i in range(4)]
        got = [next(ld) for _ in range(4)]
        for a, b in zip(want, got):
            for k in a:
                assert torch.equal(a[k], b[k]), k
        for b in got:
            read.update(_texts(b, tok))
    next_pass: Counter = Counter()  # rows of pass end_pass + 1 read to complete the segments' last batches
    for r, ld in enumerate(new):
        while parse_position(ld.state_dict()["cursors"][0])[1]:  # inherited segments left
            read.update(_texts(next(ld), tok))
        cursor = parse_position(ld.state_dict()["cursors"][0])[0]
        if old_world == new_world:  # same partition: each stream just continues
            assert cursor[0] == 0 and ld.dataset is None
            continue
        assert cursor[0] == end_pass + 1
        if cursor == (1, 0, 0):
            continue
        windows = ld.dataset.windows(ld.dataset.stream_units(1, r))
        n = sum(u.rows for w in windows[: cursor[1]] for u in w) + cursor[2]
        for _, (_, row, _) in zip(range(n), ld.dataset.rows(r, (1, 0, 0))):
            next_pass[row["text"]] += 1
    if old_world == new_world:
        return
    assert read - next_pass == Counter(rows)  # pass 0: every row exactly once, none repeated, none skipped
    assert sum(read.values()) == N + sum(next_pass.values())


def test_a_second_reshard_keeps_unfinished_segments(corpus):
    source, tok, rows = corpus
    states = [{"text": _loader(source, tok, r, 2).state_dict()} for r in range(2)]
    for r, ld in enumerate(_loader(source, tok, r, 2) for r in range(2)):
        next(ld)
        states[r] = json.loads(json.dumps({"text": ld.state_dict()}))
    one, _ = reshard_loader_states(states, 0, 1, 0)  # 2 -> 1
    ld = _loader(source, tok, 0, 1, one["text"])
    next(ld)  # one batch of old stream 0; stream 1 is next
    again, _ = reshard_loader_states([{"text": ld.state_dict()}], 1, 2, 0)  # 1 -> 2, before finishing
    cursor, segments, nxt = parse_position(again["text"]["cursors"][0])
    # rank 1 of 2 inherits nothing (one old stream, dealt to stream 0); rank 0 has both 2-stream segments pending,
    # the one that was next first, then the 1-stream main cursor (nothing read of it)
    assert segments == [] and cursor == (1, 0, 0)
    cursor0, segments0, _ = parse_position(reshard_loader_states([{"text": ld.state_dict()}], 0, 2, 0)[0]["text"]
                                           ["cursors"][0])
    assert [s[:2] for s in segments0] == [(2, 1), (2, 0)] and cursor0 == (1, 0, 0)
