"""Shared fixtures for the FLAVA model tests: offline, tiny configs, a random transformers model and batches."""

import faulthandler
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch

from flava import config as C


def perturb_(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Add noise to every parameter (zero-initialised CLS/position/mask tokens and unit LayerNorms would make a
    parity test blind to swapped or missing weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def make_hf_config(**overrides):
    from transformers import FlavaConfig

    enc = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    kw = dict(
        image_config=dict(**enc, image_size=32, patch_size=8, vocab_size=64),
        text_config=dict(**enc, vocab_size=512, max_position_embeddings=64),
        multimodal_config=dict(**enc),
        image_codebook_config=dict(hidden_size=8, vocab_size=64),
        hidden_size=32,
        projection_dim=24,
        init_codebook=True,
    )
    kw.update(overrides)
    return FlavaConfig(**kw)


@pytest.fixture
def hf_model():
    from transformers import FlavaForPreTraining

    torch.manual_seed(0)
    model = FlavaForPreTraining(make_hf_config())
    perturb_(model)
    return model.train()


def make_batch(cfg: C.FlavaConfig, batch: int = 4, length: int = 12, seed: int = 1, negatives=(1,)):
    """A pair batch with text padding, masked text/patches, codebook targets and ITM labels."""
    g = torch.Generator().manual_seed(seed)
    P = cfg.image.num_patches
    V = cfg.text.vocab_size
    pixel_values = torch.randn(batch, cfg.image.num_channels, cfg.image.image_size, cfg.image.image_size, generator=g)
    input_ids = torch.randint(110, V, (batch, length), generator=g)
    input_ids[:, 0] = 101
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch, 2):
        attention_mask[row, length // 2 + row % 3 :] = 0
    input_ids[attention_mask == 0] = 0
    selected = (torch.rand(batch, length, generator=g) < 0.3) & attention_mask.bool()
    selected[:, 0] = False
    selected[:, 1] = True
    mlm_labels = torch.full((batch, length), -100).masked_scatter(selected, input_ids[selected])
    input_ids_masked = input_ids.masked_fill(selected, 103)
    patch_mask = torch.rand(batch, P, generator=g) < 0.4
    patch_mask[:, 0] = True
    image_token_ids = torch.randint(0, cfg.image.vocab_size, (batch, P), generator=g)
    itm_labels = torch.ones(batch, dtype=torch.long)
    for r in negatives:
        itm_labels[r] = 0
    return dict(
        pixel_values=pixel_values,
        input_ids=input_ids,
        input_ids_masked=input_ids_masked,
        attention_mask=attention_mask,
        patch_mask=patch_mask,
        image_token_ids=image_token_ids,
        mlm_labels=mlm_labels,
        itm_labels=itm_labels,
    )


def hf_kwargs(batch: dict) -> dict:
    """Our batch names -> transformers FlavaForPreTraining keyword arguments (labels cloned: it mutates them)."""
    out = dict(
        pixel_values=batch.get("pixel_values"),
        input_ids=batch.get("input_ids"),
        input_ids_masked=batch.get("input_ids_masked"),
        attention_mask=batch.get("attention_mask"),
        bool_masked_pos=batch.get("patch_mask"),
        mim_labels=None if batch.get("image_token_ids") is None else batch["image_token_ids"].clone(),
        mlm_labels=None if batch.get("mlm_labels") is None else batch["mlm_labels"].clone(),
        itm_labels=batch.get("itm_labels"),
    )
    return {k: v for k, v in out.items() if v is not None}


def _rank_main(rank: int, worker, *args) -> None:
    """One spawned rank: the worker saves its result and tears its group down; then the process leaves without
    interpreter finalisation. Under load a C++ thread of the finished gloo group was sometimes still joinable when
    static destructors ran ("terminate called without an active exception", SIGABRT after the worker had returned),
    which failed the spawn though every rank's result was on disk and correct. A worker that raises still fails
    the spawn, and faulthandler prints the Python stack of a rank that aborts before returning."""
    faulthandler.enable()
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(worker, world: int, out_dir: str, *args) -> list:
    """Run worker(rank, port, *args, out_dir) on `world` spawned processes (gloo on loopback) and load what each
    rank saved as OUT_DIR/rank{r}.pt."""
    import torch.multiprocessing as mp

    from tests.ports import free_port

    mp.start_processes(_rank_main, args=(worker, free_port(), *args, out_dir), nprocs=world, join=True,
                       start_method="spawn")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
