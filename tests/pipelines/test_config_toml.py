"""`config_to_toml` writes a BuildConfig that `load_config` reads back equal, whatever its paths hold."""

import tomllib

import pytest

from pipelines.build import BuildConfig, SourceSpec, config_to_toml, load_config
from pmd.download import DownloadOptions
from pmd.eval_screen import EvalScreenOptions
from pmd.images import ImageOptions


def _config(root) -> BuildConfig:
    odd = root / 'quote " back\\slash ü [x] = #.json'  # every character TOML must escape or may misread
    return BuildConfig(
        sources=[SourceSpec("coco", [odd], [root / "train2014.zip", root / "val2014.zip"]),
                 SourceSpec("yfcc100m", [root / "yfcc"], options={"lang_threshold": "0.6"}),
                 SourceSpec("conceptual_captions", [root / "cc.tsv"])],
        out=root / "out", shard_rows=250, row_group_rows=50, chunk_rows=100, seed=7, executor="local",
        ray_address="ray://head:10001", num_cpus=3, task_cpus=0.5, retry_failures=True,
        image=ImageOptions(image_size=64, jpeg_quality=80, min_side=16, max_aspect_ratio=4.5, max_pixels=1000),
        download=DownloadOptions(timeout=5.0, retries=2, thread_count=16, disallowed_header_directives=["noai"],
                                 backend="img2dataset", max_per_host=3, max_retry_after=1.5),
        decontaminate=EvalScreenOptions(against=[root / "evals"], flickr_ids=[root / "ids.json"], threshold=6),
    )


def test_written_config_reads_back_equal(tmp_path):
    config = _config(tmp_path)
    path = tmp_path / "build.toml"
    path.write_text(config_to_toml(config))
    assert load_config(path) == config
    # Defaults and None: ray_address left out, every other key explicit, `progress` (a command-line flag) never.
    plain = BuildConfig(sources=[SourceSpec("conceptual_captions", [tmp_path / "cc.tsv"])], out=tmp_path / "o")
    text = config_to_toml(plain)
    path.write_text(text)
    assert load_config(path) == plain
    raw = tomllib.loads(text)
    assert "ray_address" not in raw and "progress" not in raw and "num_cpus" not in raw
    assert raw["image"]["image_size"] == 256 and raw["download"]["user_agent_token"] == "pmd"
    assert raw["sources"] == [{"name": "conceptual_captions", "inputs": [str(tmp_path / "cc.tsv")], "images": []}]


def test_relative_paths_are_written_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = BuildConfig(sources=[SourceSpec("conceptual_captions", ["cc.tsv"])], out="o")
    raw = tomllib.loads(config_to_toml(config))
    assert raw["out"] == str(tmp_path / "o") and raw["sources"][0]["inputs"] == [str(tmp_path / "cc.tsv")]


def test_a_none_toml_cannot_hold_is_an_error(tmp_path):
    config = BuildConfig(sources=[SourceSpec("conceptual_captions", [tmp_path / "cc.tsv"])], out=tmp_path / "o",
                         download=DownloadOptions(user_agent_token=None))
    with pytest.raises(ValueError, match="download.user_agent_token is None"):
        config_to_toml(config)
