"""Licences per pair: YFCC rows by their own deed URL, other sources from the catalog."""

from __future__ import annotations

import json

import polars as pl
import pytest

from pmd.catalog import COMMERCIAL, load_catalog
from pmd.licences import classify_url, licence_counts, with_licences


@pytest.mark.parametrize("url, expected", [
    ("http://creativecommons.org/licenses/by/2.0/", ("CC BY 2.0", "allowed")),
    ("http://creativecommons.org/licenses/by-sa/2.0/", ("CC BY-SA 2.0", "allowed")),
    ("http://creativecommons.org/licenses/by-nd/2.0/", ("CC BY-ND 2.0", "allowed")),
    ("http://creativecommons.org/licenses/by-nc/2.0/", ("CC BY-NC 2.0", "not")),
    ("http://creativecommons.org/licenses/by-nc-sa/2.0/", ("CC BY-NC-SA 2.0", "not")),
    ("https://creativecommons.org/licenses/by-nc-nd/4.0/", ("CC BY-NC-ND 4.0", "not")),
    ("https://creativecommons.org/publicdomain/zero/1.0/", ("CC0", "allowed")),
    ("https://www.flickr.com/commons/usage/", ("No known copyright restrictions", "allowed")),
    ("", None),
    ("http://example.org/all-rights-reserved", None),
])
def test_deed_urls(url, expected):
    assert classify_url(url) == expected


def test_every_catalog_source_states_a_licence_and_its_commercial_use():
    for entry in load_catalog():
        assert entry.pair_licence and entry.commercial in COMMERCIAL, entry.name


def test_rows_use_their_own_licence_where_the_upstream_row_states_it():
    frame = pl.DataFrame({
        "source": ["yfcc100m", "yfcc100m", "yfcc100m", "coco", "wit", "localized_narratives__ADE20k"],
        "meta": [json.dumps({"license_url": "http://creativecommons.org/licenses/by-nc/2.0/"}),
                 json.dumps({"license_url": "http://creativecommons.org/licenses/by/2.0/"}),
                 json.dumps({"text_field": "texts[0]"}), "{}", "{}", "{}"],
    })
    tagged = with_licences(frame)
    assert tagged["licence"].to_list() == [
        "CC BY-NC 2.0", "CC BY 2.0", "yfcc100m: licence not stated in the row",
        "Flickr licences, per image, not in the metadata", "Wikimedia Commons free licence, per image",
        "ADE20K terms: research use"]
    assert tagged["commercial"].to_list() == ["not", "allowed", "unknown", "unknown", "allowed", "not"]
    by_licence, by_use = licence_counts(frame)
    assert by_licence["yfcc100m"] == {"CC BY-NC 2.0": 1, "CC BY 2.0": 1, "yfcc100m: licence not stated in the row": 1}
    assert by_use == {"yfcc100m": {"not": 1, "allowed": 1, "unknown": 1}, "coco": {"unknown": 1},
                      "wit": {"allowed": 1}, "localized_narratives__ADE20k": {"not": 1}}
