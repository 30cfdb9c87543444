"""The speed/memory choices of a run, each equal in result to its default: an async DCP save holds the state of its
step (though training goes on while it is written), is no checkpoint until finished, and a run resumed from async
saves equals one resumed from sync saves; `run.compile` gives the eager loss and gradients (inductor, CPU);
`run.reshard_after_forward=false` gives the same step with fewer all-gathers (FSDP2, 2 processes, gloo)."""

import contextlib
import json
import os
import shutil
import traceback

import pytest
import torch
import torch.distributed as dist

from flava import checkpoint as ckpt_mod
from flava.config import tiny
from flava.distributed import shard_model
from flava.model import FlavaForPretraining
from flava.optim import build_optimizer
from flava.run_config import OptimSection, load_run_config
from flava.train import compile_layers, forward_backward, train

from .conftest import make_batch, perturb_, spawn_ranks
from .shards import make_build


def _model(seed=4) -> FlavaForPretraining:
    torch.manual_seed(seed)
    model = FlavaForPretraining(tiny())
    perturb_(model, seed=seed)
    return model.train()


def _step(model, optimizer, seed) -> None:
    model(**make_batch(model.config, batch=4, seed=seed)).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _state(model, optimizer) -> dict:
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for p, st in optimizer.state.items():
        for k, v in st.items():
            out[f"optim.{id(p)}.{k}"] = v.clone()
    return out


def _loaded(ckpt) -> dict:
    model = _model(seed=99)  # other weights: the load must overwrite every one
    optimizer = build_optimizer(model, OptimSection())
    ckpt_mod.load_checkpoint(ckpt, model, optimizer)
    return {f"model.{k}": v for k, v in model.state_dict().items()}, optimizer


def test_async_save_holds_its_steps_state_and_is_no_checkpoint_until_finished(tmp_path):
    model = _model()
    optimizer = build_optimizer(model, OptimSection())
    ckpt_mod.init_optimizer_state(optimizer)
    _step(model, optimizer, seed=1)
    at_save = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sync = ckpt_mod.save_checkpoint(tmp_path / "sync", 1, model, optimizer, {"step": 1}, {"r": 0})
    pending = ckpt_mod.save_checkpoint(tmp_path / "async", 1, model, optimizer, {"step": 1}, {"r": 0},
                                       async_save=True)
    assert isinstance(pending, ckpt_mod.PendingSave)
    _step(model, optimizer, seed=2)  # training goes on while the save is written
    assert ckpt_mod.list_checkpoints(tmp_path / "async") == []  # no COMPLETE yet: not a checkpoint
    final = pending.wait()
    assert [s for s, _ in ckpt_mod.list_checkpoints(tmp_path / "async")] == [1]
    (a, opt_a), (b, opt_b) = _loaded(final), _loaded(sync)
    for k, v in at_save.items():
        assert torch.equal(a[f"model.{k}"], v) and torch.equal(b[f"model.{k}"], v), k
    for pa, pb in zip(opt_a.state.values(), opt_b.state.values()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(pa[key], pb[key]), key


@pytest.mark.slow
def test_resume_from_async_saves_equals_resume_from_sync_saves_cpu(tmp_path):
    data = make_build(tmp_path / "data", n=64, seed=0, size=32, shards=1, row_group_size=16)
    base = ["run.progress=false", "run.tensorboard=false", "data.num_workers=0", f"data.pairs=[{data}]",
            "run.checkpoint_every=2", "run.export_final=false", "data.tokenizer_vocab_size=200",
            "run.global_batch_size=8", "run.micro_batch_size=4"]
    rows = {}
    for mode in ("false", "true"):
        run = tmp_path / f"run-{mode}"
        train(load_run_config("tiny", [*base, f"run.async_checkpoint={mode}", "run.steps=3"]), run)
        # resume from step 2's checkpoint: the one written while step 3 ran (async)
        shutil.rmtree(run / "checkpoints" / "step-00000003")
        train(load_run_config("tiny", [*base, f"run.async_checkpoint={mode}", "run.steps=5"]), run)
        rows[mode] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows["true"]] == [1, 2, 3, 4, 5]
    for a, b in zip(rows["false"], rows["true"]):
        assert a["loss"] == b["loss"] and a["kind"] == b["kind"], (a, b)


def _inductor_missing() -> str | None:
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        return "no C++ compiler for inductor's CPU kernels"
    return None


@pytest.mark.slow
def test_compiled_layers_equal_eager_cpu():
    if (why := _inductor_missing()) is not None:
        pytest.skip(why)
    model = _model()
    b = make_batch(model.config, batch=4, seed=1)
    batch = {k: b[k] for k in ("pixel_values", "patch_mask", "image_token_ids")}  # one stack: one compile
    ref = model(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    keys = set(model.state_dict())
    compile_layers(model)
    try:
        got = model(**batch).loss
        got.backward()
    except Exception as e:
        if "compil" in str(e).lower() and "inductor" in type(e).__module__ + str(e).lower():
            pytest.skip(f"inductor unavailable: {str(e)[:200]}")
        raise
    assert set(model.state_dict()) == keys  # checkpoints of compiled and eager runs are interchangeable
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def _reshard_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as pg  # FSDP2's one all-gather entry

    res = {}
    real = pg.foreach_all_gather
    try:
        for reshard in (True, False):
            calls = {"n": 0}

            def counted(*a, _calls=calls, **k):
                _calls["n"] += 1
                return real(*a, **k)

            model = _model()
            shard_model(model, torch.float32, reshard_after_forward=reshard)
            batches = [make_batch(model.config, batch=3, seed=30 + 4 * rank + i) for i in range(4)]
            pg.foreach_all_gather = counted
            losses = forward_backward(model, batches, 4, contextlib.nullcontext(), sync=True, cached=True,
                                      reshard=reshard)
            pg.foreach_all_gather = real
            res[reshard] = {"gathers": calls["n"], "loss": losses["loss"],
                            "grads": {n: p.grad.full_tensor() for n, p in model.named_parameters()
                                      if p.grad is not None}}
    except Exception:  # noqa: BLE001 - reported to the test
        res["error"] = traceback.format_exc()
    finally:
        pg.foreach_all_gather = real
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_keeping_gathered_weights_gives_the_same_step_with_fewer_gathers_cpu(tmp_path):
    for res in spawn_ranks(_reshard_worker, 2, str(tmp_path)):
        assert "error" not in res, res["error"]
        on, off = res[True], res[False]
        torch.testing.assert_close(off["loss"], on["loss"], rtol=0, atol=0)
        assert set(off["grads"]) == set(on["grads"])
        for n, g in on["grads"].items():
            torch.testing.assert_close(off["grads"][n], g, rtol=1e-6, atol=1e-7, msg=n)
        # on: each unit is gathered for every forward and again for every backward (2 passes + the embedding pass
        # of the cache); off: once for the whole step
        assert off["gathers"] < on["gathers"] / 2, (off["gathers"], on["gathers"])
