"""Model assets a run takes from the Hugging Face Hub: list them from a config, fetch them once, check them offline.

GPU nodes often have no internet. ``flava fetch-assets --config CONFIG --to DIR`` (:func:`fetch_assets`) downloads
every hub asset the config names into ``DIR/<asset>/`` with ``huggingface_hub``, records repository, revision and
the sha256 of every file in ``DIR/assets.json``, and writes ``DIR/config.yaml``: the config with each asset key
pointing at its local copy. :func:`check_assets` runs before training or evaluation: an asset that is neither a
local path nor in the Hugging Face cache, and cannot be downloaded (offline, no network), raises :class:`AssetError`,
which the command prints as one line naming the asset, the config key and the fetch command.

The assets (name, config key):

* ``codebook``   ``model.codebook``  the frozen DALL-E dVAE (``facebook/flava-image-codebook``), unless ``random``
* ``tokenizer``  ``data.tokenizer``  tokenizer files only (``bert-base-uncased``), unless trained from captions
* ``pretrained`` ``model.pretrained``  a transformers FLAVA to continue from (``facebook/flava-full``)
* ``image_encoder_init`` / ``text_encoder_init``  ``model.image_encoder_init`` / ``model.text_encoder_init``:
  encoder-only initial weights (a transformers ViT such as ``facebook/dino-vitb16``, a BERT / RoBERTa)
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pmd.atomic import replace_directory, temp_path, write_json

log = logging.getLogger(__name__)

MANIFEST = "assets.json"
CONFIG_COPY = "config.yaml"
# (asset name, dotted config key, kind): "tokenizer" fetches tokenizer files only, "model" config + weights
ASSET_KEYS: tuple[tuple[str, str, str], ...] = (
    ("codebook", "model.codebook", "model"),
    ("tokenizer", "data.tokenizer", "tokenizer"),
    ("pretrained", "model.pretrained", "model"),
    ("image_encoder_init", "model.image_encoder_init", "model"),
    ("text_encoder_init", "model.text_encoder_init", "model"),
)
NOT_ASSETS = ("", "random")  # values of an asset key that name no file
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "config.json",
                   "merges.txt", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class AssetError(ValueError):
    """An asset the run needs is not available. ``str()`` is the one line the commands print."""

    def __init__(self, name: str, key: str, value: str, reason: str, fetch: str) -> None:
        self.name, self.key, self.value, self.reason, self.fetch = name, key, value, reason, fetch
        super().__init__(f"missing asset {name} ({key}={value}): {reason}; fetch it on a machine with network: {fetch}")


class FetchError(RuntimeError):
    """``flava fetch-assets`` could not download an asset (one line: which, from where, why)."""


@dataclass(frozen=True)
class Asset:
    name: str
    key: str
    value: str
    kind: str  # model | tokenizer

    @property
    def is_local(self) -> bool:
        return Path(self.value).expanduser().exists()


def fetch_command(config: str, overrides: list[str] | None = None, to: str = "ASSETS_DIR") -> str:
    return " ".join(["flava fetch-assets --config", str(config), "--to", to, *(overrides or [])])


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part, None)
    return node


def config_assets(cfg) -> list[Asset]:
    """The assets a :class:`flava.run_config.RunConfig` names (local or hub), in ``ASSET_KEYS`` order."""
    out = []
    for name, key, kind in ASSET_KEYS:
        value = _get(cfg, key)
        if isinstance(value, str) and value.strip() not in NOT_ASSETS:
            out.append(Asset(name, key, value.strip(), kind))
    return out


def is_hub_id(value: str) -> bool:
    """``org/name`` or ``name`` that is not an existing path (transformers' own rule: a local path wins)."""
    return bool(_HUB_ID.match(value)) and not Path(value).expanduser().exists()


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _in_cache(asset: Asset) -> bool:
    from huggingface_hub import try_to_load_from_cache

    probes = ("tokenizer.json", "vocab.txt") if asset.kind == "tokenizer" else ("config.json",)
    return any(isinstance(try_to_load_from_cache(asset.value, f), str) for f in probes)


def select_files(files: list[str], kind: str) -> list[str]:
    """The files of a hub repository an asset needs: tokenizer files; or configs plus ONE weight format
    (safetensors when present, else PyTorch ``.bin``), never TF / Flax / ONNX copies."""
    top = [f for f in files if "/" not in f]
    if kind == "tokenizer":
        return sorted(f for f in top if f in TOKENIZER_FILES)
    keep = [f for f in top if f.endswith(".json") or f.endswith(".txt")]
    safetensors = [f for f in top if f.endswith(".safetensors")]
    weights = safetensors or [f for f in top if fnmatch.fnmatch(f, "pytorch_model*.bin")]
    return sorted(set(keep + weights))


def _hub_files(asset: Asset, revision: str | None = None) -> tuple[str, list[str]]:
    """(commit sha, files to fetch) from the hub's repository listing."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(asset.value, revision=revision)
    files = select_files([s.rfilename for s in (info.siblings or [])], asset.kind)
    if not files:
        raise RuntimeError(f"{asset.value} has none of the files a {asset.kind} needs")
    return info.sha, files


def check_assets(cfg, config_arg: str, overrides: list[str] | None = None) -> None:
    """Make sure every asset of ``cfg`` is loadable before anything is built: a local path must exist; a hub name
    must be in the Hugging Face cache or be downloaded now (into the cache). Raises :class:`AssetError`."""
    fetch = fetch_command(config_arg, overrides)
    for asset in config_assets(cfg):
        ensure_asset(asset, fetch)


def ensure_asset(asset: Asset, fetch: str) -> None:
    if asset.is_local:
        return
    if not is_hub_id(asset.value):
        raise AssetError(asset.name, asset.key, asset.value, "no such file or directory", fetch)
    if _in_cache(asset):
        return
    if _offline():
        reason = "neither a local path nor in the Hugging Face cache, and HF_HUB_OFFLINE is set"
        raise AssetError(asset.name, asset.key, asset.value, reason, fetch)
    try:
        from huggingface_hub import snapshot_download

        sha, files = _hub_files(asset)
        snapshot_download(asset.value, revision=sha, allow_patterns=files)
    except Exception as e:  # noqa: BLE001 - network, auth and missing repos all end in the same one-line advice
        from huggingface_hub import constants

        reason = (f"neither a local path nor in the Hugging Face cache, and not downloadable from {constants.ENDPOINT} "
                  f"({type(e).__name__})")
        raise AssetError(asset.name, asset.key, asset.value, reason, fetch) from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_assets(config: str, to: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Download every hub asset of ``config`` (+ ``overrides``) into ``to``; write ``assets.json`` and the config
    copy ``config.yaml``. Assets that are already local paths are left where they are. Returns the manifest."""
    import yaml
    from huggingface_hub import snapshot_download

    from .run_config import apply_overrides, load_run_config, read_config_dict

    cfg = load_run_config(config, overrides)
    out = Path(to).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    records, new_overrides = [], []
    for asset in config_assets(cfg):
        if asset.is_local:
            log.info("%s: %s is a local path, not fetched", asset.key, asset.value)
            continue
        if not is_hub_id(asset.value):
            raise AssetError(asset.name, asset.key, asset.value, "no such file or directory, nor a hub name",
                             fetch_command(config, overrides))
        dest = out / asset.name
        tmp = temp_path(dest, owner="download")  # kept across runs: snapshot_download resumes into it
        try:
            sha, files = _hub_files(asset)
            log.info("fetching %s (%s@%s): %d file(s)", asset.name, asset.value, sha, len(files))
            snapshot_download(asset.value, revision=sha, allow_patterns=files, local_dir=str(tmp))
        except Exception as e:  # noqa: BLE001 - one line that says which asset and why
            from huggingface_hub import constants

            first = (str(e).strip().splitlines() or [""])[0]
            raise FetchError(
                f"cannot fetch asset {asset.name} ({asset.key}={asset.value}) from {constants.ENDPOINT}: "
                f"{type(e).__name__}: {first}"
            ) from None
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping, not part of the asset
        replace_directory(tmp, dest)
        records.append({
            "name": asset.name, "key": asset.key, "repo_id": asset.value, "revision": sha, "path": asset.name,
            "files": [{"path": f, "size": (dest / f).stat().st_size, "sha256": _sha256(dest / f)} for f in files],
        })
        new_overrides.append(f"{asset.key}={dest}")
    data = apply_overrides(read_config_dict(config), list(overrides or []) + new_overrides)
    (out / CONFIG_COPY).write_text(yaml.safe_dump(data, sort_keys=False))
    manifest = {"format": "flava-assets", "config": str(config), "assets": records, "overrides": new_overrides,
                "config_copy": str(out / CONFIG_COPY)}
    write_json(manifest, out / MANIFEST)
    return manifest


def verify_assets(directory: str | os.PathLike) -> list[str]:
    """Files of ``DIR/assets.json`` that are missing or whose sha256 differs (empty: all intact)."""
    d = Path(directory)
    bad = []
    for rec in json.loads((d / MANIFEST).read_text())["assets"]:
        for f in rec["files"]:
            p = d / rec["path"] / f["path"]
            if not p.is_file() or _sha256(p) != f["sha256"]:
                bad.append(str(p))
    return bad


def check_model_arg(value: str, flag: str = "--checkpoint") -> None:
    """A ``--checkpoint`` that is no local path is a hub model: it must be cached or reachable."""
    if os.path.exists(value):
        return
    fetch = fetch_command("tiny", [f"model.pretrained={value}"]) + f" (then {flag} ASSETS_DIR/pretrained)"
    if not is_hub_id(value):
        raise AssetError("model", flag, value, "no such file or directory", fetch)
    ensure_asset(Asset("model", flag, value, "model"), fetch)
