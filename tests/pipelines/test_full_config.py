from pathlib import Path

from pipelines.build import load_config
from pmd.catalog import load_catalog
from pmd.schema import SOURCE_NAMES

CONFIG = Path(__file__).parents[2] / "manifests" / "builds" / "pmd-full.toml"


def test_the_ready_config_builds_all_twelve_sources_the_catalog_way():
    config = load_config(CONFIG, {"out": "/tmp/pmd-full-test"})
    assert [s.name for s in config.sources] == list(SOURCE_NAMES)
    catalog = {e.name: e for e in load_catalog()}
    for spec in config.sources:
        # Archive sources name their archives; URL sources download.
        assert spec.mode == catalog[spec.name].images, spec.name
        assert all(p.is_absolute() and p.parent.parent == CONFIG.parent for p in spec.inputs)
