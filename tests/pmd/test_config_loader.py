"""pmd.config_loader: the one dict-to-dataclass loader and its one error style (place, key, what was expected)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pmd.config_loader import (ConfigError, Extend, Where, apply_overrides, from_dict, merge,
                               parse_assignments)


@dataclass
class Inner:
    size: int = 4
    ratio: float = 0.5


@dataclass
class Outer:
    name: str
    paths: list[Path]
    inner: Inner = field(default_factory=Inner)
    tags: tuple[str, ...] = ()
    limit: int | None = None
    enabled: bool = True
    options: dict[str, str | int | float | bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name == "bad":
            raise ValueError("name must not be 'bad'")


FILE = Where("conf.toml")


def test_unknown_key_names_place_key_and_accepted_keys():
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, {"name": "a", "paths": [], "colour": "red"}, FILE)
    assert str(e.value) == ("conf.toml: unknown key(s) ['colour']; accepted keys are "
                            "['enabled', 'inner', 'limit', 'name', 'options', 'paths', 'tags']")
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, {"name": "a", "paths": [], "inner": {"sise": 3, "ratio": 1.0}}, FILE)
    assert str(e.value) == "conf.toml: inner: unknown key(s) ['sise']; accepted keys are ['ratio', 'size']"
    with pytest.raises(ConfigError) as e:  # no file: the dotted path alone
        from_dict(Outer, {"name": "a", "paths": [], "inner": {"x": 1}}, "Outer")
    assert str(e.value) == "Outer.inner: unknown key(s) ['x']; accepted keys are ['ratio', 'size']"


def test_wrong_type_names_the_key_and_what_was_expected():
    cases = [
        ({"inner": {"size": "big"}}, "conf.toml: inner.size: expected an integer, got 'big'"),
        ({"inner": {"size": 2.5}}, "conf.toml: inner.size: expected an integer, got 2.5"),
        ({"inner": {"size": True}}, "conf.toml: inner.size: expected an integer, got True"),
        ({"inner": {"ratio": "fast"}}, "conf.toml: inner.ratio: expected a number, got 'fast'"),
        ({"inner": 3}, "conf.toml: inner: expected a mapping, got 3"),
        ({"enabled": "maybe"}, "conf.toml: enabled: expected true/false, got 'maybe'"),
        ({"enabled": 1}, "conf.toml: enabled: expected true/false, got 1"),
        ({"name": 7}, "conf.toml: name: expected a string, got 7"),
        ({"paths": ["a", 3]}, "conf.toml: paths[1]: expected a path, got 3"),
        ({"paths": {"a": 1}}, "conf.toml: paths: expected a list, got dict {'a': 1}"),
        ({"limit": "many"}, "conf.toml: limit: expected an integer or null, got 'many'"),
        ({"options": {"k": [1]}}, "conf.toml: options.k: expected a string or an integer or a number or true/false, "
                                  "got list [1]"),
    ]
    for given, message in cases:
        with pytest.raises(ConfigError) as e:
            from_dict(Outer, {"name": "a", "paths": [], **given}, FILE)
        assert str(e.value) == message


def test_missing_keys_and_post_init_errors_name_their_place():
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, {"paths": []}, FILE)
    assert str(e.value) == "conf.toml: missing key(s) ['name']"
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, {}, FILE)
    assert str(e.value) == "conf.toml: missing key(s) ['name', 'paths']"
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, {"name": "bad", "paths": []}, FILE)
    assert str(e.value) == "conf.toml: name must not be 'bad'"
    assert isinstance(e.value, ValueError)  # callers that catch ValueError keep working


def test_conversions_a_file_or_command_line_needs():
    cfg = from_dict(Outer, {"name": "a", "paths": "one.json", "inner": {"size": "8", "ratio": "2e-4"},
                            "tags": ["x", "y"], "limit": 3.0, "enabled": "off",
                            "options": {"n": 1, "s": "v", "b": False}}, FILE)
    assert cfg == Outer(name="a", paths=[Path("one.json")], inner=Inner(size=8, ratio=2e-4), tags=("x", "y"),
                        limit=3, enabled=False, options={"n": 1, "s": "v", "b": False})
    assert type(cfg.limit) is int and type(cfg.inner.ratio) is float
    assert from_dict(Inner, {"ratio": 1}).ratio == 1  # an int stays as written where a float belongs
    assert type(from_dict(Inner, {"ratio": 1}).ratio) is int
    empty = from_dict(Outer, {"name": "a", "paths": [], "inner": None}, FILE)  # an empty section: its defaults
    assert empty.inner == Inner() and empty.limit is None
    assert from_dict(Inner, None) == Inner()


def test_apply_overrides_from_strings_and_from_flags():
    data = {"optim": {"lr": 1.0}, "decontaminate": {"against": ["a"]}}
    out = apply_overrides(data, ["optim.lr=2e-4", "data.ratios={pairs: 1.0}", "run.steps=5", "x.y="])
    # values are YAML: `2e-4` (no dot) stays a string there, which from_dict parses where a number belongs
    assert out == {"optim": {"lr": "2e-4"}, "decontaminate": {"against": ["a"]}, "data": {"ratios": {"pairs": 1.0}},
                   "run": {"steps": 5}, "x": {"y": None}}
    assert data["optim"]["lr"] == 1.0  # the input is not changed
    flags = {"optim.lr": None, "seed": 3, "decontaminate.against": Extend(["b"]),
             "decontaminate.flickr_ids": Extend([])}
    assert apply_overrides(data, flags) == {"optim": {"lr": 1.0}, "seed": 3,
                                            "decontaminate": {"against": ["a", "b"], "flickr_ids": []}}
    for bad, message in (("lr", "override 'lr' is not key=value"), ("=1", "override '=1' has an empty key"),
                         ("optim.lr.x=1", "override 'optim.lr.x=1': lr is not a mapping")):
        with pytest.raises(ConfigError) as e:
            apply_overrides(data, [bad])
        assert str(e.value) == message


def test_parse_assignments_and_merge():
    assert parse_assignments(["a=1", " b =x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    with pytest.raises(ConfigError) as e:
        parse_assignments(["novalue"])
    assert str(e.value) == "option 'novalue' is not KEY=VALUE"
    base = {"image": {"size": 224, "patch": 16}, "dim": 768}
    assert merge(base, {"image": {"size": 64}, "dim": 32}) == {"image": {"size": 64, "patch": 16}, "dim": 32}
    assert base["image"]["size"] == 224


def test_every_config_of_the_project_speaks_the_same_style(tmp_path):
    from flava.config import FlavaConfig
    from flava.run_config import load_run_config
    from pipelines.build import load_config
    from pmd.sources import create_adapter

    with pytest.raises(ConfigError) as e:
        FlavaConfig.from_dict({"codebook": {"vocab_size": "lots"}})
    assert str(e.value) == "FlavaConfig.codebook.vocab_size: expected an integer, got 'lots'"
    with pytest.raises(ConfigError) as e:
        load_run_config("tiny", ["run.steps=ten"])
    assert str(e.value) == "run config: run.steps: expected an integer, got 'ten'"
    with pytest.raises(ConfigError) as e:
        create_adapter("wit", {"text_fallback": "perhaps"})
    assert str(e.value) == "source 'wit': options.text_fallback: expected true/false, got 'perhaps'"
    config = tmp_path / "b.toml"
    config.write_text('[[sources]]\nname = "coco"\ninputs = ["x"]\n[download]\nretries = "twice"\n')
    with pytest.raises(ConfigError) as e:
        load_config(config, {"out": str(tmp_path)})
    assert str(e.value) == f"{config}: download.retries: expected an integer, got 'twice'"
    config.write_text('[[sources]]\ninputs = ["x"]\n')
    with pytest.raises(ConfigError) as e:
        load_config(config, {"out": str(tmp_path)})
    assert str(e.value) == f"{config}: sources[0]: missing key(s) ['name']"
