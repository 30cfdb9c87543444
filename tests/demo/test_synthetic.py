import hashlib
import io
import urllib.request

import numpy as np
import pytest
from PIL import Image

from pmd.sources import create_adapter
from pmd.sources.base import Pair, Reject
from pmd_demo import drawings, synthetic
from pmd_demo.serve import serve_directory


def test_generated_corpus_reads_through_the_real_adapters(tmp_path):
    corpus = synthetic.generate(tmp_path, "http://127.0.0.1:9", images=40, seed=3)
    counts = {}
    for source, inputs in corpus.inputs.items():
        out = list(create_adapter(source).iter_converted(inputs))
        counts[source] = (sum(isinstance(o, Pair) for o in out), sum(isinstance(o, Reject) for o in out))
    assert counts["coco"] == (200, 0)
    assert counts["conceptual_captions"] == (40, 0)
    assert counts["red_caps"] == (40, 0)
    assert counts["yfcc100m"] == (40 - corpus.expected_rejects["yfcc100m"], corpus.expected_rejects["yfcc100m"])
    assert corpus.expected_rejects["yfcc100m"] == 12
    # German descriptions fall back to their English titles.
    yfcc = [o for o in create_adapter("yfcc100m").iter_converted(corpus.inputs["yfcc100m"]) if isinstance(o, Pair)]
    assert sum('"text_field":"title"' in p.meta for p in yfcc) == 8


def test_captions_describe_the_images():
    d = drawings.Drawing("red", "circle", seed=1)
    img = drawings.draw(d, 64)
    colours = img.getcolors(64 * 64)
    assert any(c == drawings.COLOURS["red"] for _, c in colours)
    assert d.caption(0) == "a red circle" and "red circle" in d.caption(1)


@pytest.mark.parametrize(("shape", "fill"), [("circle", 3.14159 / 4), ("square", 1.0), ("triangle", 0.5)])
def test_each_shape_fills_its_box_as_the_caption_says(shape, fill):
    """The shape is the caption's: coloured pixels over their bounding box is pi/4, 1 or 1/2."""
    for seed in range(5):
        pixels = np.asarray(drawings.draw(drawings.Drawing("blue", shape, seed), (120, 90)))
        ys, xs = np.nonzero((pixels == drawings.COLOURS["blue"]).all(axis=2))
        box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
        assert len(xs) / box == pytest.approx(fill, abs=0.05), (shape, seed)


def test_numbered_images_differ_for_every_n_and_keep_their_size():
    bodies = [drawings.numbered_jpeg(n, 16, 16) for n in range(3000)]
    assert len({hashlib.sha256(b).digest() for b in bodies}) == 3000
    assert drawings.numbered_jpeg(7, 64, 48) == drawings.numbered_jpeg(7, 64, 48)  # deterministic
    for size in [(64, 48), (16, 16), (1, 1)]:
        assert Image.open(io.BytesIO(drawings.numbered_jpeg(5, *size))).size == size


def test_loopback_server_serves_and_breaks_on_purpose(tmp_path):
    with serve_directory(tmp_path / "http") as base:
        corpus = synthetic.generate(tmp_path, base, images=30, seed=0, broken_every=5)
        kinds = set(corpus.broken_urls.values())
        assert kinds == set(synthetic.BROKEN_KINDS)
        with urllib.request.urlopen(f"{base}/cc_00000.jpg") as r:
            assert Image.open(r).size == (96, 96)
        missing = next(p for p, k in corpus.broken_urls.items() if k == "missing")
        try:
            urllib.request.urlopen(base + missing)
            raise AssertionError("expected a 404")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
