import json

import pytest

from pmd import catalog
from pmd.catalog import PAPER_TOTAL_PAIRS, CatalogError, _parse, load_catalog
from pmd_cli.pmd import main
from pmd.schema import SOURCE_NAMES


def test_twelve_sources_in_schema_order_sum_to_the_paper_total():
    entries = load_catalog()
    assert tuple(e.name for e in entries) == SOURCE_NAMES
    assert sum(e.table2_pairs for e in entries) == PAPER_TOTAL_PAIRS == 70_000_000
    ln = [e for e in entries if e.name.startswith("localized_narratives__")]
    assert sum(e.table2_pairs for e in ln) == 1_900_000 and all(e.table2_apportioned for e in ln)
    by_name = {e.name: e for e in entries}
    assert by_name["yfcc100m"].table2_pairs == 30_300_000 and by_name["yfcc100m"].table2_avg_words == 12.7
    assert by_name["visual_genome"].images == "archive" and by_name["conceptual_12m"].images == "url"
    for e in entries:
        assert e.metadata and e.licence and e.format


def test_localized_narratives_apportioned_by_narrative_counts():
    """Table 2's 1.9M LN pairs over the sub-sources PMD builds, in proportion to the upstream narrative counts
    (Open Images train+val+test, COCO train+val, ADE20k 20,476 train + 2,053 validation), largest remainder."""
    counts = {"localized_narratives__openimages": 675_155, "localized_narratives__coco": 142_845,
              "localized_narratives__ADE20k": 20_476 + 2_053}
    total, narratives = 1_900_000, sum(counts.values())
    exact = {name: total * n / narratives for name, n in counts.items()}
    shares = {name: int(x) for name, x in exact.items()}
    for name in sorted(exact, key=lambda k: exact[k] - shares[k], reverse=True)[:total - sum(shares.values())]:
        shares[name] += 1
    by_name = {e.name: e.table2_pairs for e in load_catalog()}
    assert {name: by_name[name] for name in counts} == shares
    assert by_name["localized_narratives__flickr30k"] == 0


def test_catalog_rejects_unknown_fields_and_wrong_sources():
    with pytest.raises(CatalogError, match=r"^manifests/sources.toml: source\[0\]: unknown key\(s\) \['colour'\]; "):
        _parse({"source": [{"name": "coco", "colour": "blue"}]})
    rows = [e.to_dict() for e in load_catalog()][:3]
    with pytest.raises(CatalogError, match=r"^manifests/sources.toml: source\[1\]: missing key\(s\) \['licence'\]$"):
        _parse({"source": [rows[0], {k: v for k, v in rows[1].items() if k != "licence"}]})
    with pytest.raises(CatalogError, match=r"^manifests/sources.toml: source\[0\].table2_pairs: expected an integer"):
        _parse({"source": [{**rows[0], "table2_pairs": "many"}]})
    with pytest.raises(CatalogError, match=r"source\[0\]: coco: images must be 'url' or 'archive', not 'ftp'"):
        _parse({"source": [{**rows[0], "images": "ftp"}]})
    with pytest.raises(CatalogError, match="differ"):
        _parse({"source": rows})


def test_pmd_sources_json(capsys):
    assert main(["sources", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(SOURCE_NAMES)
    assert sum(r["table2_pairs"] for r in rows) == 70_000_000


def test_pmd_sources_table(capsys):
    assert main(["sources"]) == 0
    out = capsys.readouterr().out
    for name in SOURCE_NAMES:
        assert name in out
    assert "70.0M" in out


def test_catalog_is_cached():
    assert catalog.load_catalog() is catalog.load_catalog()
