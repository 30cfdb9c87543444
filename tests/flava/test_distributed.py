"""Global contrastive loss with 2 processes (gloo, CPU) equals the single-process loss on the concatenated batch,
and so do its gradients (embeddings, logit_scale and, through the whole model, every parameter)."""

import os

import pytest
import torch
import torch.distributed as dist

from flava.config import LossWeights, tiny
from flava.losses import all_gather_with_grad, global_contrastive_loss
from flava.model import FlavaForPretraining

from tests.ports import free_port

from .conftest import make_batch, perturb_, spawn_ranks

WORLD = 2
B = 3  # local batch
D = 8



def _embeddings():
    g = torch.Generator().manual_seed(7)
    return torch.randn(WORLD * B, D, generator=g), torch.randn(WORLD * B, D, generator=g)


def _gc_model(seed=11) -> FlavaForPretraining:
    cfg = tiny()
    cfg.loss_weights = LossWeights(mim=0, mlm=0, global_contrastive=1, itm=0, mmm_image=0, mmm_text=0)
    torch.manual_seed(seed)
    model = FlavaForPretraining(cfg)
    perturb_(model, seed=seed)
    return model.train()


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        # 1) the loss function on raw embeddings
        img, txt = _embeddings()
        sl = slice(rank * B, (rank + 1) * B)
        u = img[sl].clone().requires_grad_(True)
        v = txt[sl].clone().requires_grad_(True)
        scale = torch.tensor([2.0], requires_grad=True)
        loss, lpi, _ = global_contrastive_loss(u, v, scale)
        loss.backward()
        # gathered tensor really holds both ranks' rows
        gathered = all_gather_with_grad(torch.full((2, 1), float(rank)))
        # 2) the whole model, GC only, each rank on its half of the batch
        model = _gc_model()
        full = make_batch(model.config, batch=WORLD * B, negatives=())
        half = {k: v[sl] for k, v in full.items()}
        out = model(**half)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        for g in grads.values():  # what DDP / FSDP do: average parameter gradients over ranks
            dist.all_reduce(g)
            g /= WORLD
        torch.save(
            dict(
                loss=loss.detach(), u_grad=u.grad, v_grad=v.grad, scale_grad=scale.grad, logits=lpi.detach(),
                gathered=gathered, model_loss=out.loss.detach(), model_grads=grads,
            ),
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("gc"))
    return spawn_ranks(_worker, WORLD, out_dir)


def test_gather_is_global(results):
    for r in results:
        assert r["gathered"].flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
        assert r["logits"].shape == (B, WORLD * B)  # local rows against the global batch


def test_two_process_loss_and_gradients_equal_single_process(results):
    img, txt = _embeddings()
    u, v = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    scale = torch.tensor([2.0], requires_grad=True)
    loss, _, _ = global_contrastive_loss(u, v, scale)
    loss.backward()
    # the mean of the per-rank losses is the single-process loss
    torch.testing.assert_close(sum(r["loss"] for r in results) / WORLD, loss.detach(), atol=1e-6, rtol=1e-6)
    # embedding gradients: each rank's local gradient (summed over every rank's loss) = W x single-process slice
    dist_u = torch.cat([r["u_grad"] for r in results]) / WORLD
    dist_v = torch.cat([r["v_grad"] for r in results]) / WORLD
    torch.testing.assert_close(dist_u, u.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dist_v, v.grad, atol=1e-6, rtol=1e-5)
    # logit_scale is replicated: DDP's average of the per-rank gradients
    torch.testing.assert_close(sum(r["scale_grad"] for r in results) / WORLD, scale.grad, atol=1e-6, rtol=1e-5)


def test_two_process_model_gradients_equal_single_process(results):
    model = _gc_model()
    batch = make_batch(model.config, batch=WORLD * B, negatives=())
    out = model(**batch)
    out.loss.backward()
    torch.testing.assert_close(
        sum(r["model_loss"] for r in results) / WORLD, out.loss.detach(), atol=1e-5, rtol=1e-5
    )
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    dist_grads = results[0]["model_grads"]
    assert set(dist_grads) == set(grads)
    for name, g in grads.items():
        torch.testing.assert_close(dist_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_world_size_one_process_group_is_single_process_loss(tmp_path):
    """An initialised group of size 1 gives exactly the non-distributed loss."""
    img, txt = _embeddings()
    ref, _, _ = global_contrastive_loss(img, txt, torch.tensor([2.0]))
    port = free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        got, _, _ = global_contrastive_loss(img, txt, torch.tensor([2.0]))
    finally:
        dist.destroy_process_group()
    assert torch.equal(got, ref)


def test_process_group_gets_the_configured_timeout(monkeypatch):
    """Rank 0 may train the tokenizer while the others wait in a barrier: the group's timeout is
    run.dist_timeout_minutes, not NCCL's 10-minute default."""
    import datetime

    from flava import distributed as fd
    from flava.run_config import ConfigError, RunConfig

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setattr(dist, "new_group", lambda backend, **kw: seen.update(host_group=(backend, kw["timeout"])))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    model = {"preset": "flava_full", "allow_random_codebook": True}  # the defaults' text lengths fit flava_full
    cfg = RunConfig.from_dict({"model": model, "run": {"dist_timeout_minutes": 90}})
    fd.setup_distributed("cpu", cfg.run.dist_timeout_minutes)
    assert seen["backend"] == "gloo" and seen["timeout"] == datetime.timedelta(minutes=90)
    assert seen["host_group"] == ("gloo", datetime.timedelta(minutes=90))  # the loop's host-side flags
    assert RunConfig().run.dist_timeout_minutes == 60
    with pytest.raises(ConfigError, match="dist_timeout_minutes"):
        RunConfig.from_dict({"model": model, "run": {"dist_timeout_minutes": 0}})
