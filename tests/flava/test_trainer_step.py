"""One optimizer step of the trainer: gradient caching gives the global-batch contrastive loss (2 processes x 4
micro-batches == one batch 4x larger), ITM negatives never duplicate a positive's caption among the contrastive
columns, logit_scale stays fp32 under bf16 FSDP, padding to the batch's longest text changes no output, and every
collective of a 2-process run gets tensors on the run's device (a checked wrapper simulating an accelerator)."""

import contextlib
import math
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from flava.config import LossWeights, tiny
from flava.devcheck import COLLECTIVES
from flava.masking import itm_negatives
from flava.model import FlavaForPretraining
from flava.train import forward_backward, shard_model


from .conftest import make_batch, perturb_, spawn_ranks

WORLD, ACCUM, MB = 2, 4, 3



def _model(**weights) -> FlavaForPretraining:
    cfg = tiny()
    w = dict(mim=0, mlm=0, global_contrastive=1, itm=1, mmm_image=0, mmm_text=0)
    w.update(weights)
    cfg.loss_weights = LossWeights(**w)
    torch.manual_seed(5)
    model = FlavaForPretraining(cfg)
    perturb_(model, seed=5)
    return model.train()


def _micro_batches(cfg, rank: int) -> list[dict]:
    # one ITM negative per micro-batch: the positive-row mask and the excluded columns are exercised too
    return [make_batch(cfg, batch=MB, seed=100 + rank * ACCUM + i, negatives=(i % MB,)) for i in range(ACCUM)]


def _big_batch(cfg) -> dict:
    parts = [b for r in range(WORLD) for b in _micro_batches(cfg, r)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _init(rank: int, port: int) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)


def _step_worker(rank: int, port: int, out_dir: str) -> None:
    _init(rank, port)
    try:
        res = {}
        model = _model()
        shard_model(model, torch.float32)
        batches = _micro_batches(model.config, rank)
        nothing = contextlib.nullcontext()
        losses = forward_backward(model, batches, ACCUM, nothing, sync=True, cached=True)
        res["cached"] = {k: v.detach() for k, v in losses.items()}
        res["grads"] = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        losses = forward_backward(model, batches, ACCUM, nothing, sync=True, cached=False)
        res["per_micro"] = {k: v.detach() for k, v in losses.items()}

        # bf16 FSDP: the temperature used is the fp32 parameter, not its bf16 rounding
        bf = _model()
        master = bf.logit_scale.detach().clone()
        shard_model(bf, torch.bfloat16)
        with torch.no_grad():
            out = bf(**batches[0])
        texts = [torch.empty_like(out.text_embedding) for _ in range(WORLD)]
        dist.all_gather(texts, out.text_embedding.contiguous())
        res["bf16"] = dict(
            master=master, logit_scale=out.logit_scale, logits=out.logits_per_image, image=out.image_embedding,
            texts=torch.cat(texts), itm=batches[0]["itm_labels"],
        )
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def step_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("step"))
    return spawn_ranks(_step_worker, WORLD, out_dir)


@pytest.mark.slow
def test_gradient_cache_equals_one_batch_four_times_larger(step_results):
    model = _model()
    out = model(**_big_batch(model.config))
    out.loss.backward()
    mean = lambda key, name: sum(r[key][name] for r in step_results) / WORLD  # noqa: E731
    torch.testing.assert_close(mean("cached", "loss"), out.loss.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        mean("cached", "global_contrastive"), out.losses.global_contrastive.detach(), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(mean("cached", "itm"), out.losses.itm.detach(), atol=1e-5, rtol=1e-5)
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    got = step_results[0]["grads"]
    assert set(got) == set(ref) and "logit_scale" in ref
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-5, msg=name)
    # without the cache each micro-batch is its own softmax: a different loss (so the comparison above can fail)
    assert abs(mean("per_micro", "global_contrastive") - out.losses.global_contrastive).item() > 1e-2


@pytest.mark.slow
def test_logit_scale_stays_fp32_under_bf16_fsdp(step_results):
    for r in step_results:
        b = r["bf16"]
        master = b["master"].item()
        assert abs(b["master"].bfloat16().item() - master) > 1e-3  # a value bf16 cannot hold exactly
        assert b["logit_scale"].dtype == torch.float32 and b["logit_scale"].item() == master
        u = F.normalize(b["image"].float(), dim=-1)
        v = F.normalize(b["texts"].float(), dim=-1)
        expected = u @ v.t() * math.exp(master)
        finite = torch.isfinite(b["logits"])
        torch.testing.assert_close(b["logits"][finite], expected[finite], atol=1e-5, rtol=1e-5)


# ---- ITM negatives are not contrastive duplicates --------------------------------------------------------------
def _batch_with_collated_negatives(cfg, batch=12, seed=3):
    """A pair batch whose ITM negatives are made as the collator makes them: another row's caption."""
    b = make_batch(cfg, batch=batch, seed=seed, negatives=())
    idx, itm = itm_negatives(batch, 0.4, torch.Generator().manual_seed(seed))
    for k in ("input_ids", "input_ids_masked", "attention_mask", "mlm_labels"):
        b[k] = b[k][idx]
    b["itm_labels"] = itm
    return b, idx


def _identical_negatives(logits: torch.Tensor, pos: torch.Tensor) -> int:
    n = 0
    for i in torch.nonzero(pos).flatten().tolist():
        row = logits[i]
        others = torch.cat([row[:i], row[i + 1 :]])
        n += int((torch.isfinite(others) & (others - row[i]).abs().le(1e-6)).sum())
    return n


def test_no_positive_has_an_identical_negative_logit():
    model = _model(mim=1, mlm=1, mmm_image=1, mmm_text=1).eval()
    batch, idx = _batch_with_collated_negatives(model.config)
    pos = batch["itm_labels"].bool()
    # negatives that carry the caption of a positive row: each one duplicates that positive's column
    duplicates = int(sum(pos[idx[j]] for j in torch.nonzero(~pos).flatten()))
    assert 2 <= int((~pos).sum()) and pos.sum() >= 4
    with torch.no_grad():
        out = model(**batch)
    assert _identical_negatives(out.logits_per_image, pos) == 0
    assert torch.isfinite(out.losses.global_contrastive)
    # every excluded column is a negative row's caption, and only those are excluded
    excluded = ~torch.isfinite(out.logits_per_image[pos])
    assert (excluded.any(0) == ~pos).all()
    # the same batch with transformers' behaviour (columns kept) does have identical "negatives"
    model.config.contrastive_exclude_itm_negatives = False
    with torch.no_grad():
        kept = model(**batch)
    assert _identical_negatives(kept.logits_per_image, pos) == duplicates >= 1


# ---- padding to the batch's longest text -----------------------------------------------------------------------
def _pad_to(batch: dict, length: int) -> dict:
    out = dict(batch)
    fill = {"input_ids": 0, "input_ids_masked": 0, "attention_mask": 0, "mlm_labels": -100}
    for k, v in fill.items():
        if k in out:
            extra = torch.full((out[k].shape[0], length - out[k].shape[1]), v, dtype=out[k].dtype)
            out[k] = torch.cat([out[k], extra], dim=1)
    return out


@pytest.mark.parametrize("kind", ["pairs", "text"])
def test_padding_to_longest_changes_no_output(kind):
    model = _model(mim=1, mlm=1, mmm_image=1, mmm_text=1)
    batch = make_batch(model.config, batch=4, length=12)
    if kind == "text":
        batch = {k: batch[k] for k in ("input_ids_masked", "attention_mask", "mlm_labels")}
    outs, grads = [], []
    for b in (batch, _pad_to(batch, 40)):
        model.zero_grad(set_to_none=True)
        out = model(**b)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    short, full = outs
    assert set(short.losses.as_dict()) == set(full.losses.as_dict())
    for name, v in short.losses.as_dict().items():
        torch.testing.assert_close(v, full.losses.as_dict()[name], atol=1e-6, rtol=1e-5, msg=name)
    enc = short.text_masked.last_hidden_state
    real = batch["attention_mask"].bool()  # every real position is unchanged, whatever the padding
    torch.testing.assert_close(enc[real], full.text_masked.last_hidden_state[:, :12][real], atol=1e-5, rtol=1e-5)
    assert set(grads[0]) == set(grads[1])
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_collate_pads_to_the_longest_caption(tmp_path):
    from flava.data import DataSpec, Source, StreamingDataset, iter_texts
    from flava.tokenizer import train_wordpiece

    from .shards import make_build

    build = make_build(tmp_path / "b", n=24, seed=0, size=32, shards=1, row_group_size=12)
    tok = train_wordpiece(iter_texts([str(build)]), tmp_path / "tok", vocab_size=200)
    for kind in ("pairs", "text"):
        spec = dict(kind=kind, batch_size=8, image_size=32, codebook_size=32, grid_size=4, text_max_length=48,
                    seed=3, shuffle_buffer=12, itm_probability=0.5)
        short, full = (
            next(iter(StreamingDataset(Source(kind, [str(build)]), DataSpec(**spec, pad_to_longest=p), tok, 0, 1, 0)))
            for p in (True, False)
        )
        n = short["attention_mask"].shape[1]
        assert n == int(full["attention_mask"].sum(1).max()) < 48 and full["attention_mask"].shape[1] == 48
        for k in ("input_ids", "input_ids_masked", "attention_mask", "mlm_labels"):
            assert torch.equal(short[k], full[k][:, :n]), k  # same masking draws, same ITM negatives
        assert (full["attention_mask"][:, n:] == 0).all() and (full["mlm_labels"][:, n:] == -100).all()
        for k in set(full) - {"input_ids", "input_ids_masked", "attention_mask", "mlm_labels", "_meta"}:
            assert torch.equal(short[k], full[k]), k


# ---- collectives on the run's device ---------------------------------------------------------------------------
def _counted(name, fn, seen):
    def wrapper(*args, **kwargs):
        seen.append(name)
        return fn(*args, **kwargs)

    return wrapper


def _run_worker(rank: int, port: int, data: str, run_dir: str, out_dir: str) -> None:
    from flava.run_config import load_run_config
    from flava.train import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    seen: list[str] = []
    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _counted(name, getattr(dist, name), seen))
    cfg = load_run_config("tiny", [
        "run.progress=false", "run.tensorboard=false", "data.num_workers=0", f"data.pairs=[{data}]",
        "run.global_batch_size=8", "run.micro_batch_size=2", "run.contrastive_gradient_cache=true",
        "run.checkpoint_every=2", "run.export_final=false", "data.tokenizer_vocab_size=200", "run.steps=3",
        "run.check_devices=true",
    ])
    error = ""
    try:
        train(cfg, run_dir)
    except Exception:  # noqa: BLE001 - reported to the test
        error = traceback.format_exc()
    torch.save({"error": error, "seen": sorted(set(seen))}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_every_collective_of_a_run_gets_device_tensors(tmp_path):
    from .shards import make_build

    data = make_build(tmp_path / "data", n=48, seed=0, size=32, shards=1, row_group_size=12)
    for attempt in range(3):  # the free port can be taken by another job before rank 0 binds it: try another
        out_dir, run_dir = tmp_path / f"out{attempt}", tmp_path / f"run{attempt}"
        out_dir.mkdir()
        results = spawn_ranks(_run_worker, WORLD, str(out_dir), str(data), str(run_dir))
        if not any("address already in use" in res["error"].lower() for res in results):
            break
    for res in results:
        assert res["error"] == "", res["error"]
        # the step-end stop flag, the logged losses, the contrastive gathers, FSDP and the checkpoint all ran
        assert {"all_reduce", "all_gather"} <= set(res["seen"]), res["seen"]
    assert (run_dir / "checkpoints").is_dir()


def test_cached_step_consumes_micro_batches_as_they_arrive_and_equals_one_big_batch():
    """Gradient caching embeds each micro-batch when it arrives (no list(batches) first: the device would idle
    through the whole step's loading), and its gradient equals that of one uncached batch ACCUM times larger."""
    model = _model()
    parts = _micro_batches(model.config, 0)
    embedded = {"n": 0}
    real_forward = model.forward

    def counting_forward(*a, **kw):
        embedded["n"] += bool(kw.get("embeddings_only"))
        return real_forward(*a, **kw)

    model.forward = counting_forward

    def arriving():
        for i, b in enumerate(parts):
            assert embedded["n"] == i, f"micro-batch {i} fetched after {embedded['n']} embedding passes"
            yield b

    nothing = contextlib.nullcontext()
    cached = forward_backward(model, arriving(), ACCUM, nothing, sync=False, cached=True)
    assert embedded["n"] == ACCUM
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    big = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    ref = forward_backward(model, [big], 1, nothing, sync=False, cached=False)
    torch.testing.assert_close(cached["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
