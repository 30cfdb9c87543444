"""The trainer's step-1 gradient check: the parameters each batch kind must train (``gradient_parameters``) are
exactly those autograd reaches on a plain model, under every loss-weight mix; through FSDP2 (2 processes, gloo)
every one of them receives a gradient on every step kind, gradient-cached or not; and a parameter whose output is
deliberately detached fails the check with an error that names it."""

import contextlib
import os
import traceback

import pytest
import torch
import torch.distributed as dist

from flava.config import LossWeights, tiny
from flava.distributed import shard_model
from flava.model import FlavaForPretraining
from flava.train import GradientCheckError, check_gradients, forward_backward

from .conftest import make_batch, perturb_, spawn_ranks

WORLD = 2
ALL = dict(mim=1, mlm=1, global_contrastive=1, itm=1, mmm_image=1, mmm_text=1)


def _model(**weights) -> FlavaForPretraining:
    cfg = tiny()
    cfg.loss_weights = LossWeights(**{**ALL, **weights})
    torch.manual_seed(3)
    model = FlavaForPretraining(cfg)
    perturb_(model, seed=3)
    return model.train()


def _batch(cfg, kind: str, seed: int = 1) -> dict:
    b = make_batch(cfg, batch=4, seed=seed)
    if kind == "images":
        return {k: b[k] for k in ("pixel_values", "patch_mask", "image_token_ids")}
    if kind == "text":
        return {"input_ids_masked": b["input_ids_masked"], "attention_mask": b["attention_mask"],
                "mlm_labels": b["mlm_labels"]}
    return b


@pytest.mark.parametrize("weights", [
    {}, {"global_contrastive": 0}, {"itm": 0, "mmm_image": 0, "mmm_text": 0}, {"itm": 0, "mmm_text": 0},
    {"mim": 0, "mlm": 0},
])
@pytest.mark.parametrize("kind", ["pairs", "images", "text"])
def test_expected_set_is_what_autograd_reaches(kind, weights):
    model = _model(**weights)
    out = model(**_batch(model.config, kind))
    if out.loss is not None:
        out.loss.backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None}
    assert model.gradient_parameters(kind) == reached
    check_gradients(model, kind, 1)


def test_a_detached_output_is_named_in_the_error():
    model = _model()
    model.text_to_mm.register_forward_hook(lambda mod, args, out: out.detach())
    forward_backward(model, [_batch(model.config, "pairs")], 1, contextlib.nullcontext(), sync=False, cached=False)
    with pytest.raises(GradientCheckError, match=r"step 1 \(pairs\): 2 of \d+ .*text_to_mm.bias, text_to_mm.weight"):
        check_gradients(model, "pairs", 1)


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    res = {}
    try:
        nothing = contextlib.nullcontext()
        for kind, cached in (("pairs", True), ("pairs", False), ("images", False), ("text", False)):
            model = _model()
            shard_model(model, torch.float32)
            batches = [_batch(model.config, kind, seed=10 + 2 * rank + i) for i in range(2)]
            forward_backward(model, batches, 2, nothing, sync=True, cached=cached)
            try:
                check_gradients(model, kind, 1)
                res[(kind, cached)] = "ok"
            except GradientCheckError as e:
                res[(kind, cached)] = str(e)
            res[(kind, cached, "n")] = sum(p.grad is not None for p in model.parameters())
        model = _model()
        shard_model(model, torch.float32)
        model.image_projection.register_forward_hook(lambda mod, args, out: out.detach())
        batches = [_batch(model.config, "pairs", seed=20 + rank)]
        forward_backward(model, batches, 1, nothing, sync=False, cached=False)
        try:
            check_gradients(model, "pairs", 1)
            res["detached"] = "no error"
        except GradientCheckError as e:
            res["detached"] = str(e)
    except Exception:  # noqa: BLE001 - reported to the test
        res["error"] = traceback.format_exc()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_every_parameter_gets_a_gradient_and_a_detached_one_fails(tmp_path):
    results = spawn_ranks(_fsdp_worker, WORLD, str(tmp_path))
    expected = {kind: len(_model().gradient_parameters(kind)) for kind in ("pairs", "images", "text")}
    for res in results:
        assert "error" not in res, res.get("error")
        for kind, cached in (("pairs", True), ("pairs", False), ("images", False), ("text", False)):
            assert res[(kind, cached)] == "ok", res[(kind, cached)]
            assert res[(kind, cached, "n")] >= expected[kind]
        assert "image_projection.bias, image_projection.weight" in res["detached"], res["detached"]
